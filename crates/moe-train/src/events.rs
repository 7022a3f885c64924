//! The typed records a training run reports: what [`crate::Trainer::run`]
//! hands its callback, and, serialised one per line, what `metrics.jsonl`
//! holds and the loss plot reads.

use crate::TrainConfig;
use moe_models::LmConfig;
use moe_routers::RoutingStats;
use serde::{Deserialize, Serialize};

/// One event of a training run, tagged by `event` in JSON
/// (`{"event": "eval", "step": 100, ...}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
// A few events per evaluation interval: their size does not matter, and
// unboxed configs keep them plain to match on.
#[allow(clippy::large_enum_variant)]
#[non_exhaustive]
pub enum TrainEvent {
    /// Before the first step of [`crate::Trainer::run`] (also after a resume).
    Start {
        /// The step training starts from (0, or the resumed step).
        step: i64,
        /// Trainable parameters.
        parameters: i64,
        /// Parameters a token passes through (chosen and shared experts).
        active_parameters: i64,
        /// Where the model runs, e.g. `Cpu` or `Cuda(0)`.
        device: String,
        /// The model family with its config.
        model: LmConfig,
        /// The training config.
        train: TrainConfig,
    },
    /// Every `log_interval` steps: the last step's loss and the speed of the
    /// steps since the start (evaluation excluded).
    Step {
        /// Steps done.
        step: i64,
        /// Training loss of the last step (balance losses included).
        loss: f64,
        /// Learning rate of the last step.
        lr: f64,
        /// Global gradient norm before clipping (when clipping is on).
        grad_norm: Option<f64>,
        /// Milliseconds per step.
        ms_per_step: f64,
        /// Training tokens per second.
        tokens_per_s: f64,
        /// Seconds left, training and remaining evaluations included.
        eta_s: f64,
    },
    /// Every `eval_interval` steps and at the last step, before that step trains.
    Eval {
        /// Steps done.
        step: i64,
        /// Mean cross-entropy on the training split.
        train_loss: f64,
        /// Mean cross-entropy on the validation split.
        val_loss: f64,
        /// Milliseconds per training step so far.
        ms_per_step: f64,
        /// Training tokens per second so far.
        tokens_per_s: f64,
        /// Seconds this evaluation took.
        eval_s: f64,
        /// Mean over MoE layers of the coefficient of variation of the
        /// experts' loads (0: perfectly even).
        load_cv: f64,
        /// Routing statistics of each MoE layer.
        routing: Vec<RoutingStats>,
    },
    /// After the last step (and the last checkpoint).
    End {
        /// Steps done.
        steps: i64,
        /// Losses of the last evaluation, if any.
        train_loss: Option<f64>,
        /// Validation loss of the last evaluation, if any.
        val_loss: Option<f64>,
        /// Wall-clock seconds of the run, evaluations included.
        wall_s: f64,
    },
}
