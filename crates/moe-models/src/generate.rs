use crate::{check_context, CausalLm, ModelCache, Sampling};
use moe_core::{MoeError, Result};
use std::ops::ControlFlow;
use tch::Tensor;

/// When generation stops, beside the callback: after `max_new_tokens`, or
/// after sampling one of `eos_token_ids` (which is reported and returned).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// The most tokens to generate.
    pub max_new_tokens: usize,
    /// How each token is drawn.
    pub sampling: Sampling,
    /// End-of-sequence tokens (a checkpoint's `eos_token_id`); empty: none.
    pub eos_token_ids: Vec<i64>,
}

/// Text generation with a KV cache: each new token costs one position's
/// forward pass instead of the whole context's.
///
/// The prompt (its last `max_context` tokens) is run once (prefill); then
/// each sampled token is fed alone, attending to the cached keys and values.
/// Learned absolute positions make a rolling window inexact (every cached
/// key would need its position changed), so when the context is full
/// (`max_context` tokens) the cache restarts from the last
/// `max(1, max_context / 2)` tokens, which are prefilled at positions
/// `0..`. While the text fits in the context the logits are those of
/// full recomputation; past it, each token sees between `max_context / 2` and
/// `max_context - 1` tokens of context (makeMoE's sliding window always sees
/// `block_size`, at the price of recomputing it for every token, see
/// [`generate_recompute`]).
///
/// makeMoE starts from token 0 when the prompt is empty. `on_token` sees each
/// new token as it comes (for streaming). Returns the new tokens only.
/// Logits that name no token (a NaN or `+inf`, or every one `-inf`: a
/// diverged or corrupt model) end generation with a [`MoeError::NonFinite`]
/// naming the step (0 for the first new token) and the batch row, not a
/// panic; greedy settings take the argmax ([`Sampling::sample`]).
pub fn generate<M: CausalLm + ?Sized>(
    model: &M,
    prompt: &[i64],
    max_new_tokens: usize,
    sampling: Sampling,
    mut on_token: impl FnMut(i64),
) -> Result<Vec<i64>> {
    let options = GenerateOptions {
        max_new_tokens,
        sampling,
        eos_token_ids: Vec::new(),
    };
    generate_with(model, prompt, &options, |id| {
        on_token(id);
        ControlFlow::Continue(())
    })
}

/// [`generate`] with end-of-sequence tokens, and a callback that can stop
/// generation (`ControlFlow::Break`, e.g. when the text so far ends with a
/// stop string): the token it saw is the last one returned.
pub fn generate_with<M: CausalLm + ?Sized>(
    model: &M,
    prompt: &[i64],
    options: &GenerateOptions,
    mut on_token: impl FnMut(i64) -> ControlFlow<()>,
) -> Result<Vec<i64>> {
    let sampling = options.sampling;
    let mut context = start_context(model, prompt, sampling)?;
    let block = model.max_context() as usize;
    let keep = (block / 2).max(1);
    let device = model.device();
    let row = |tokens: &[i64]| Tensor::from_slice(tokens).to_device(device).unsqueeze(0);
    let mut cache = model.new_cache();
    let mut new_tokens = Vec::with_capacity(options.max_new_tokens);
    tch::no_grad(|| -> Result<()> {
        let start = context.len().saturating_sub(block);
        let mut logits = last_logits(model, &row(&context[start..]), &mut cache)?;
        for i in 0..options.max_new_tokens {
            let next = sampling.sample_step(&logits, &context, i, 0)?;
            context.push(next);
            new_tokens.push(next);
            let stop = on_token(next).is_break() || options.eos_token_ids.contains(&next);
            if stop || i + 1 == options.max_new_tokens {
                break;
            }
            logits = if cache.len() as usize >= block {
                cache.clear();
                last_logits(model, &row(&context[context.len() - keep..]), &mut cache)?
            } else {
                last_logits(model, &row(&[next]), &mut cache)?
            };
        }
        Ok(())
    })?;
    Ok(new_tokens)
}

/// [`generate_with`] for several prompts at once, as one batch: each row's
/// new tokens, as its prompt alone would give them.
///
/// Prompts of different lengths are left-padded to the longest (`T`
/// positions) and the padding is masked out of every query's attention
/// ([`ModelCache::set_padding`], transformers' `attention_mask`), so the
/// real tokens of row `b` sit at positions `T - len_b ..` instead of `0..`.
/// With rotary positions that changes nothing: RoPE's attention score of
/// a query at position `m` and a key at `n` depends on `m - n` only, which
/// the shift keeps; so every row computes what its unbatched run computes
/// (up to rounding; a test checks logits and greedy tokens). Models whose
/// positions are absolute (makeMoE) or whose attention reads earlier inputs
/// outside the mask (Yuan's localized filtering) cannot be padded and
/// return an error for prompts of different lengths; prompts of one length
/// need no padding and work with every model. The padding tokens still pass
/// through the MoE layers: with a capacity-limited dispatch they take
/// expert capacity in the prefill, so rows can then differ from their
/// unbatched runs (the default dispatch has no capacity). With expert
/// choice per position the `B` rows are routed together at each position
/// (padding included), as a training batch is, while a row alone is routed
/// by the per-token top-k rule (`moe_routers::ExpertChoiceScope`): batched
/// rows then differ from their unbatched runs.
///
/// The prefill is one forward pass of `[B, T]`; each step then feeds the
/// `B` tokens just sampled. A row ends at one of `options.eos_token_ids`
/// or when `on_token(row, id)` breaks; its finished tokens are returned and
/// the other rows go on until all have ended or `max_new_tokens` are
/// drawn. Sampled rows draw from one generator in turn, so a sampled row
/// is not the draw its unbatched run makes; greedy rows are the same.
/// Errors on no prompt, an empty prompt, an id outside the vocabulary, or
/// when `T + max_new_tokens - 1` positions exceed the model's context (the
/// single-prompt [`generate_with`] restarts its cache there instead).
pub fn generate_batch<M: CausalLm + ?Sized>(
    model: &M,
    prompts: &[Vec<i64>],
    options: &GenerateOptions,
    mut on_token: impl FnMut(usize, i64) -> ControlFlow<()>,
) -> Result<Vec<Vec<i64>>> {
    let sampling = options.sampling;
    sampling.validate(model.vocab_size())?;
    if prompts.is_empty() {
        return Err(MoeError::config("generate_batch needs at least one prompt"));
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(MoeError::config(format!(
            "prompt {i} is empty: every row of a batch needs at least one token"
        )));
    }
    let mut contexts = prompts
        .iter()
        .map(|p| start_context(model, p, sampling))
        .collect::<Result<Vec<_>>>()?;
    let longest = contexts.iter().map(Vec::len).max().unwrap_or(0);
    let needed = longest + options.max_new_tokens.saturating_sub(1);
    check_context(needed as i64, model.max_context()).map_err(|_| {
        MoeError::config(format!(
            "the longest prompt ({longest} tokens) and {} new tokens need {needed} positions, \
             more than the model's context of {}: generate fewer tokens, or one prompt at a time \
             with generate_with",
            options.max_new_tokens,
            model.max_context()
        ))
    })?;
    let device = model.device();
    let batch = contexts.len();
    // Left padding: row b is `[0; longest - len_b] ++ prompt_b`.
    let mut ids = Vec::with_capacity(batch * longest);
    let mut real = Vec::with_capacity(batch * longest);
    for context in &contexts {
        let pad = longest - context.len();
        ids.extend(std::iter::repeat_n(0, pad).chain(context.iter().copied()));
        real.extend(
            std::iter::repeat_n(false, pad).chain(std::iter::repeat_n(true, context.len())),
        );
    }
    let shape = [batch as i64, longest as i64];
    let mut cache = model.new_cache();
    if real.iter().any(|&r| !r) {
        cache.set_padding(&Tensor::from_slice(&real).view(shape).to_device(device))?;
    }
    let mut new_tokens = vec![Vec::with_capacity(options.max_new_tokens); batch];
    let mut done = vec![false; batch];
    tch::no_grad(|| -> Result<()> {
        let idx = Tensor::from_slice(&ids).view(shape).to_device(device);
        let mut logits = last_logits(model, &idx, &mut cache)?;
        for step in 0..options.max_new_tokens {
            let mut fed = Vec::with_capacity(batch);
            for (row, context) in contexts.iter_mut().enumerate() {
                if done[row] {
                    fed.push(*context.last().expect("non-empty"));
                    continue;
                }
                let row_logits = logits.get(row as i64).unsqueeze(0);
                let next = sampling.sample_step(&row_logits, context, step, row)?;
                context.push(next);
                new_tokens[row].push(next);
                fed.push(next);
                done[row] = on_token(row, next).is_break() || options.eos_token_ids.contains(&next);
            }
            if done.iter().all(|&d| d) || step + 1 == options.max_new_tokens {
                break;
            }
            let idx = Tensor::from_slice(&fed).to_device(device).unsqueeze(1);
            logits = last_logits(model, &idx, &mut cache)?;
        }
        Ok(())
    })?;
    Ok(new_tokens)
}

/// makeMoE's `generate`: for every new token, run the whole context (its
/// last `block_size` tokens, a sliding window) through the model and sample
/// from the last position. The reference [`generate`] is measured against.
pub fn generate_recompute<M: CausalLm + ?Sized>(
    model: &M,
    prompt: &[i64],
    max_new_tokens: usize,
    sampling: Sampling,
    mut on_token: impl FnMut(i64),
) -> Result<Vec<i64>> {
    let mut context = start_context(model, prompt, sampling)?;
    let block = model.max_context() as usize;
    let device = model.device();
    let mut new_tokens = Vec::with_capacity(max_new_tokens);
    tch::no_grad(|| -> Result<()> {
        for step in 0..max_new_tokens {
            let start = context.len().saturating_sub(block);
            let idx = Tensor::from_slice(&context[start..])
                .to_device(device)
                .unsqueeze(0);
            let logits = model.forward_t(&idx, false)?.logits.select(1, -1);
            let next = sampling.sample_step(&logits, &context, step, 0)?;
            context.push(next);
            new_tokens.push(next);
            on_token(next);
        }
        Ok(())
    })?;
    Ok(new_tokens)
}

/// Checks the sampling and the prompt; the context generation starts from.
fn start_context<M: CausalLm + ?Sized>(
    model: &M,
    prompt: &[i64],
    sampling: Sampling,
) -> Result<Vec<i64>> {
    let vocab_size = model.vocab_size();
    sampling.validate(vocab_size)?;
    if let Some(&id) = prompt.iter().find(|&&t| t < 0 || t >= vocab_size) {
        return Err(MoeError::TokenOutOfVocab { id, vocab_size });
    }
    Ok(if prompt.is_empty() {
        vec![0]
    } else {
        prompt.to_vec()
    })
}

/// Feeds `idx` after the cached positions; the last position's logits, `[B, V]`.
fn last_logits<M: CausalLm + ?Sized>(
    model: &M,
    idx: &Tensor,
    cache: &mut ModelCache,
) -> Result<Tensor> {
    Ok(model.forward_cached(idx, cache)?.logits.select(1, -1))
}
