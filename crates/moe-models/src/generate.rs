use crate::{CausalLm, ModelCache};
use moe_core::{MoeError, Result};
use tch::{Kind, Tensor};

/// How the next token is drawn from the model's distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Logits are divided by it; 1.0 is makeMoE's plain sampling.
    pub temperature: f64,
    /// Keep only the `k` most likely tokens (`None`: all; `Some(1)`: greedy).
    pub top_k: Option<i64>,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 1.0,
            top_k: None,
        }
    }
}

impl Sampling {
    /// Always the most likely token.
    pub fn greedy() -> Self {
        Sampling {
            temperature: 1.0,
            top_k: Some(1),
        }
    }

    fn validate(&self, vocab_size: i64) -> Result<()> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(MoeError::config(format!(
                "temperature must be a positive number, got {}",
                self.temperature
            )));
        }
        if let Some(k) = self.top_k {
            if k < 1 || k > vocab_size {
                return Err(MoeError::config(format!(
                    "sampling top_k must be in 1..={vocab_size}, got {k}"
                )));
            }
        }
        Ok(())
    }

    /// Draws one token from `softmax(logits / temperature)` restricted to the
    /// top-k; `logits`: `[1, V]`.
    fn sample(&self, logits: &Tensor) -> i64 {
        let mut logits = logits.to_kind(Kind::Float) / self.temperature;
        if let Some(k) = self.top_k {
            let (top, _) = logits.topk(k, -1, true, true);
            let threshold = top.select(1, k - 1).unsqueeze(1);
            logits = logits.masked_fill(&logits.lt_tensor(&threshold), f64::NEG_INFINITY);
        }
        logits
            .softmax(-1, Kind::Float)
            .multinomial(1, false)
            .int64_value(&[0, 0])
    }
}

/// Text generation with a KV cache: each new token costs one position's
/// forward pass instead of the whole context's.
///
/// The prompt (its last `block_size` tokens) is run once (prefill); then
/// each sampled token is fed alone, attending to the cached keys and values.
/// Learned absolute positions make a rolling window inexact (every cached
/// key would need its position changed), so when the context is full
/// (`block_size` tokens) the cache restarts from the last
/// `max(1, block_size / 2)` tokens, which are prefilled at positions
/// `0..`. While the text fits in `block_size` tokens the logits are those of
/// full recomputation; past it, each token sees between `block_size / 2` and
/// `block_size - 1` tokens of context (makeMoE's sliding window always sees
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
    on_token: impl FnMut(i64),
) -> Result<Vec<i64>> {
    generate_until(model, prompt, max_new_tokens, sampling, &[], on_token)
}

/// [`generate`] that also stops after sampling one of `stop_tokens` (a
/// checkpoint's end-of-sequence tokens), which ends the returned tokens
/// and is passed to `on_token` like the others.
pub fn generate_until<M: CausalLm + ?Sized>(
    model: &M,
    prompt: &[i64],
    max_new_tokens: usize,
    sampling: Sampling,
    stop_tokens: &[i64],
    mut on_token: impl FnMut(i64),
) -> Result<Vec<i64>> {
    let mut context = start_context(model, prompt, sampling)?;
    let block = model.max_context() as usize;
    let keep = (block / 2).max(1);
    let device = model.device();
    let row = |tokens: &[i64]| Tensor::from_slice(tokens).to_device(device).unsqueeze(0);
    let mut cache = model.new_cache();
    let mut new_tokens = Vec::with_capacity(max_new_tokens);
    tch::no_grad(|| -> Result<()> {
        let start = context.len().saturating_sub(block);
        let mut logits = last_logits(model, &row(&context[start..]), &mut cache)?;
        for i in 0..max_new_tokens {
            let next = sampling.sample(&logits);
            context.push(next);
            new_tokens.push(next);
            on_token(next);
            if i + 1 == max_new_tokens || stop_tokens.contains(&next) {
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
            let next = sampling.sample(&logits);
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
