use crate::MoeLanguageModel;
use moe_core::{MoeError, Result};
use tch::{Kind, Tensor};

/// How the next token is drawn from the model's distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Logits are divided by it; 1.0 is makeMoE's plain sampling.
    pub temperature: f64,
    /// Keep only the `k` most likely tokens (`None`: all).
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

/// makeMoE's `generate`: repeatedly feed the last `block_size` tokens, take
/// the last position's logits, sample the next token from
/// `softmax(logits / temperature)` (restricted to the top-k), and append it.
/// `on_token` sees each new token as it comes (for streaming). The model
/// runs in evaluation mode. Returns the new tokens only.
pub fn generate(
    model: &MoeLanguageModel,
    prompt: &[i64],
    max_new_tokens: usize,
    sampling: Sampling,
    mut on_token: impl FnMut(i64),
) -> Result<Vec<i64>> {
    if !(sampling.temperature > 0.0 && sampling.temperature.is_finite()) {
        return Err(MoeError::config(format!(
            "temperature must be a positive number, got {}",
            sampling.temperature
        )));
    }
    let config = model.config();
    if let Some(k) = sampling.top_k {
        if k < 1 || k > config.vocab_size {
            return Err(MoeError::config(format!(
                "sampling top_k must be in 1..={}, got {k}",
                config.vocab_size
            )));
        }
    }
    if let Some(&id) = prompt.iter().find(|&&t| t < 0 || t >= config.vocab_size) {
        return Err(MoeError::TokenOutOfVocab {
            id,
            vocab_size: config.vocab_size,
        });
    }
    let device = model.device();
    // makeMoE starts from a single token 0 when there is no prompt.
    let mut context: Vec<i64> = if prompt.is_empty() {
        vec![0]
    } else {
        prompt.to_vec()
    };
    let mut new_tokens = Vec::with_capacity(max_new_tokens);
    tch::no_grad(|| -> Result<()> {
        for _ in 0..max_new_tokens {
            let start = context.len().saturating_sub(config.block_size as usize);
            let idx = Tensor::from_slice(&context[start..])
                .to_device(device)
                .unsqueeze(0);
            let logits = model.forward_t(&idx, false)?.logits.select(1, -1);
            let mut logits = logits.to_kind(Kind::Float) / sampling.temperature;
            if let Some(k) = sampling.top_k {
                let (top, _) = logits.topk(k, -1, true, true);
                let threshold = top.select(1, k - 1).unsqueeze(1);
                logits = logits.masked_fill(&logits.lt_tensor(&threshold), f64::NEG_INFINITY);
            }
            let next = logits
                .softmax(-1, Kind::Float)
                .multinomial(1, false)
                .int64_value(&[0, 0]);
            context.push(next);
            new_tokens.push(next);
            on_token(next);
        }
        Ok(())
    })?;
    Ok(new_tokens)
}
