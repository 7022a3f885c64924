use moe_core::{MoeError, Result};
use serde::{Deserialize, Serialize};

/// Hyper-parameters of training; `Default` is makeMoE's run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    pub batch_size: i64,
    pub max_iters: i64,
    /// Evaluate every this many steps (and at the last step).
    pub eval_interval: i64,
    /// Batches per split in each evaluation.
    pub eval_iters: i64,
    pub learning_rate: f64,
    /// AdamW's decoupled weight decay (PyTorch's default, which makeMoE keeps).
    pub weight_decay: f64,
    pub seed: i64,
    /// Fraction of the corpus used for training; the rest is validation.
    pub train_fraction: f64,
    /// Largest number of sequences evaluated in one forward pass: the
    /// `eval_iters` batches are stacked into chunks of at most this size.
    pub eval_rows: i64,
    /// Print a progress line every this many steps.
    pub log_interval: i64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            batch_size: 16,
            max_iters: 5000,
            eval_interval: 100,
            eval_iters: 400,
            learning_rate: 1e-3,
            weight_decay: 0.01,
            seed: 1337,
            train_fraction: 0.9,
            eval_rows: 1024,
            log_interval: 10,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("batch_size", self.batch_size),
            ("eval_interval", self.eval_interval),
            ("eval_iters", self.eval_iters),
            ("eval_rows", self.eval_rows),
            ("log_interval", self.log_interval),
        ];
        for (name, v) in positive {
            if v <= 0 {
                return Err(MoeError::config(format!(
                    "{name} must be positive, got {v}"
                )));
            }
        }
        if self.max_iters < 0 {
            return Err(MoeError::config(format!(
                "max_iters must be >= 0, got {}",
                self.max_iters
            )));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(MoeError::config(format!(
                "learning_rate must be a positive number, got {}",
                self.learning_rate
            )));
        }
        if !(self.train_fraction > 0.0 && self.train_fraction < 1.0) {
            return Err(MoeError::config(format!(
                "train_fraction must be in (0, 1), got {}",
                self.train_fraction
            )));
        }
        Ok(())
    }
}
