//! How the next token is drawn from the model's distribution: temperature,
//! top-k, top-p (nucleus) and a repetition penalty, applied in Hugging
//! Face's order (repetition penalty, temperature, top-k, top-p).

use moe_core::{MoeError, Result};
use tch::{Kind, Tensor};

/// The sampling settings of [`crate::generate`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Logits are divided by it; 1.0 is makeMoE's plain sampling.
    pub temperature: f64,
    /// Keep only the `k` most likely tokens (`None`: all; `Some(1)`: greedy).
    pub top_k: Option<i64>,
    /// Nucleus sampling (Holtzman et al. 2020, arXiv 1904.09751): keep the
    /// most likely tokens whose probabilities add up to at least `p`
    /// (always at least one); `None`: all.
    pub top_p: Option<f64>,
    /// CTRL's repetition penalty (Keskar et al. 2019, arXiv 1909.05858):
    /// the logit `l` of every token already in the context becomes `l / r`
    /// if `l > 0`, else `l * r`; 1.0: off.
    pub repetition_penalty: f64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 1.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
        }
    }
}

impl Sampling {
    /// Always the most likely token.
    pub fn greedy() -> Self {
        Sampling {
            top_k: Some(1),
            ..Sampling::default()
        }
    }

    /// Checks the settings against the vocabulary size.
    pub fn validate(&self, vocab_size: i64) -> Result<()> {
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
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(MoeError::config(format!(
                    "top_p must be in (0, 1], got {p}"
                )));
            }
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(MoeError::config(format!(
                "repetition_penalty must be a positive number, got {}",
                self.repetition_penalty
            )));
        }
        Ok(())
    }

    /// The probabilities the next token is drawn from, `[1, V]` (0 for
    /// excluded tokens), given the model's `logits` (`[1, V]`) and the
    /// `context` so far (prompt and generated tokens).
    pub fn distribution(&self, logits: &Tensor, context: &[i64]) -> Tensor {
        let mut logits = logits.to_kind(Kind::Float);
        if self.repetition_penalty != 1.0 && !context.is_empty() {
            let seen = Tensor::from_slice(context)
                .to_device(logits.device())
                .unsqueeze(0);
            let l = logits.gather(1, &seen, false);
            let r = self.repetition_penalty;
            let penalised = (&l * r).where_self(&l.lt(0.0), &(&l / r));
            logits = logits.scatter(1, &seen, &penalised);
        }
        logits /= self.temperature;
        if let Some(k) = self.top_k {
            let (top, _) = logits.topk(k, -1, true, true);
            let threshold = top.select(1, k - 1).unsqueeze(1);
            logits = logits.masked_fill(&logits.lt_tensor(&threshold), f64::NEG_INFINITY);
        }
        if let Some(p) = self.top_p {
            // Sorted descending, a token stays while the probability mass
            // before it is below p: the first token always stays.
            let (sorted, order) = logits.sort(-1, true);
            let probs = sorted.softmax(-1, Kind::Float);
            let before = probs.cumsum(-1, Kind::Float) - &probs;
            let drop_sorted = before.ge(p);
            let drop = drop_sorted.zeros_like().scatter(-1, &order, &drop_sorted);
            logits = logits.masked_fill(&drop, f64::NEG_INFINITY);
        }
        logits.softmax(-1, Kind::Float)
    }

    /// Draws one token (see [`Sampling::distribution`]).
    pub fn sample(&self, logits: &Tensor, context: &[i64]) -> i64 {
        self.distribution(logits, context)
            .multinomial(1, false)
            .int64_value(&[0, 0])
    }
}
