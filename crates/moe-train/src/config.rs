use moe_core::{MoeError, Result};
use serde::{Deserialize, Serialize};

/// Hyper-parameters of training; `Default` is makeMoE's run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// Sequences per batch `B`.
    pub batch_size: i64,
    /// Optimisation steps of the run.
    pub max_iters: i64,
    /// Evaluate every this many steps (and at the last step).
    pub eval_interval: i64,
    /// Batches per split in each evaluation.
    pub eval_iters: i64,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// AdamW's decoupled weight decay (PyTorch's default, which makeMoE keeps).
    pub weight_decay: f64,
    /// Seed of libtorch's generator (weights, batches, dropout).
    pub seed: i64,
    /// Fraction of the corpus used for training; the rest is validation.
    pub train_fraction: f64,
    /// Largest number of sequences evaluated in one forward pass: the
    /// `eval_iters` batches are stacked into chunks of at most this size.
    pub eval_rows: i64,
    /// Print a progress line every this many steps.
    pub log_interval: i64,
    /// How the learning rate moves over the run (makeMoE: constant).
    pub lr_schedule: LrSchedule,
    /// Clip the gradients' global L2 norm to this value before each update
    /// (nanoGPT: 1.0); `None`: no clipping (makeMoE).
    pub grad_clip: Option<f64>,
    /// Micro-batches of `batch_size` sequences whose gradients are summed
    /// (each loss divided by this count) before one optimizer step: the
    /// effective batch is `batch_size * grad_accum_steps` sequences.
    pub grad_accum_steps: i64,
    /// Which parameters weight decay applies to (makeMoE: all).
    pub weight_decay_on: DecayGroups,
}

/// Which trainable variables AdamW decays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DecayGroups {
    /// Every trainable variable (PyTorch's `AdamW(model.parameters())`, makeMoE).
    #[default]
    All,
    /// Weight matrices only: biases, norm gains and embeddings are not
    /// decayed (nanoGPT's `configure_optimizers`; the model decides which
    /// variables those are, [`moe_models::CausalLm::is_no_decay`]).
    Matrices,
}

/// The learning rate at each step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum LrSchedule {
    /// `learning_rate` at every step.
    #[default]
    Constant,
    /// nanoGPT's `get_lr`: linear warmup from 0 over `warmup_iters` steps,
    /// then a cosine decay from `learning_rate` to `min_lr` at
    /// `decay_iters` (the run's `max_iters` when `None`), `min_lr` after:
    ///
    /// `lr(s) = lr_max (s + 1) / warmup` for `s < warmup`;
    /// `lr(s) = min_lr + (lr_max - min_lr) (1 + cos(pi r)) / 2`,
    /// `r = (s - warmup) / (decay - warmup)`, for `warmup <= s <= decay`.
    WarmupCosine {
        /// Steps of linear warmup.
        warmup_iters: i64,
        /// Learning rate at the end of the decay.
        min_lr: f64,
        /// Step where the decay ends; `None`: the run's `max_iters`.
        decay_iters: Option<i64>,
    },
}

impl LrSchedule {
    /// The learning rate of step `step` (counted from 0) of a run of
    /// `max_iters` steps whose peak rate is `lr_max`.
    pub fn lr_at(&self, step: i64, lr_max: f64, max_iters: i64) -> f64 {
        match *self {
            LrSchedule::Constant => lr_max,
            LrSchedule::WarmupCosine {
                warmup_iters,
                min_lr,
                decay_iters,
            } => {
                let decay = decay_iters.unwrap_or(max_iters);
                if step < warmup_iters {
                    return lr_max * (step + 1) as f64 / warmup_iters as f64;
                }
                if step > decay || decay <= warmup_iters {
                    return min_lr;
                }
                let ratio = (step - warmup_iters) as f64 / (decay - warmup_iters) as f64;
                min_lr + 0.5 * (lr_max - min_lr) * (1.0 + (std::f64::consts::PI * ratio).cos())
            }
        }
    }

    /// Checks the schedule against the peak rate.
    pub fn validate(&self, lr_max: f64) -> Result<()> {
        if let LrSchedule::WarmupCosine {
            warmup_iters,
            min_lr,
            decay_iters,
        } = *self
        {
            if warmup_iters < 0 || decay_iters.is_some_and(|d| d < warmup_iters) {
                return Err(MoeError::config(format!(
                    "warmup_iters ({warmup_iters}) must be >= 0 and at most decay_iters ({decay_iters:?})"
                )));
            }
            if !(min_lr >= 0.0 && min_lr <= lr_max) {
                return Err(MoeError::config(format!(
                    "min_lr must be in [0, learning_rate = {lr_max}], got {min_lr}"
                )));
            }
        }
        Ok(())
    }
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
            lr_schedule: LrSchedule::Constant,
            grad_clip: None,
            grad_accum_steps: 1,
            weight_decay_on: DecayGroups::All,
        }
    }
}

impl TrainConfig {
    /// Checks every value; the error names the field and what was expected.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("batch_size", self.batch_size),
            ("eval_interval", self.eval_interval),
            ("eval_iters", self.eval_iters),
            ("eval_rows", self.eval_rows),
            ("log_interval", self.log_interval),
            ("grad_accum_steps", self.grad_accum_steps),
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
        if let Some(clip) = self.grad_clip {
            if !(clip > 0.0 && clip.is_finite()) {
                return Err(MoeError::config(format!(
                    "grad_clip must be a positive number, got {clip}"
                )));
            }
        }
        self.lr_schedule.validate(self.learning_rate)
    }
}
