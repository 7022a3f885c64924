use crate::{CausalLm, ModelCache, Sampling};
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
            let next = sampling.sample(&logits, &context);
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
        for _ in 0..max_new_tokens {
            let start = context.len().saturating_sub(block);
            let idx = Tensor::from_slice(&context[start..])
                .to_device(device)
                .unsqueeze(0);
            let logits = model.forward_t(&idx, false)?.logits.select(1, -1);
            let next = sampling.sample(&logits, &context);
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

/// Feeds `idx` after the cached positions; the last position's logits, `[1, V]`.
fn last_logits<M: CausalLm + ?Sized>(
    model: &M,
    idx: &Tensor,
    cache: &mut ModelCache,
) -> Result<Tensor> {
    Ok(model.forward_cached(idx, cache)?.logits.select(1, -1))
}
