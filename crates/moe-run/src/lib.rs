//! Run tooling of `moe-layers`: what turns a training loop into a run a
//! person can follow and compare. [`Run`] is the training recipe every
//! program shares (tokenizer, config completed and validated, seeded model,
//! each rank its share, dataset, trainer, checkpoints, resume, events to
//! sinks). [`RunConfig`] (model family, training and
//! tokenizer in one TOML or JSON file), [`JsonlWriter`] for `metrics.jsonl`,
//! MLflow logging to a tracking server ([`MlflowClient`], [`MlflowRun`]; the
//! legacy file-store writer [`MlflowFileStoreRun`]), the loss plot
//! ([`plot_loss_curve`]) and the terminal [`Progress`] bar; [`RunLog`] sends
//! a run's typed events to `metrics.jsonl`, the progress bar and MLflow
//! ([`MlflowLog`], fail-soft: a failing server is warned about once and
//! left).
//!
//! Features: `mlflow` (the REST client, through `ureq` with rustls) and
//! `plot` (through `plotters`); the facade's `lm` turns both on.
#![warn(missing_docs)]

mod metrics;
#[cfg(feature = "mlflow")]
mod mlflow;
mod mlflow_file_store;
#[cfg(feature = "plot")]
mod plot;
mod progress;
mod run;
#[cfg(feature = "cli")]
mod run_args;
mod run_config;
#[cfg(feature = "mlflow")]
mod run_log;
mod run_status;

pub use metrics::JsonlWriter;
#[cfg(feature = "mlflow")]
pub use mlflow::{MlflowClient, MlflowRun};
pub use mlflow_file_store::MlflowFileStoreRun;
#[cfg(feature = "plot")]
pub use plot::{plot_loss_curve, plot_series, plot_val_losses, LossCurves, FONT_PATHS};
pub use progress::{format_secs, Progress};
pub use run::{BuiltRun, PreparedRun, Run, TrainedRun};
#[cfg(feature = "cli")]
pub use run_args::RunArgs;
pub use run_config::RunConfig;
#[cfg(feature = "mlflow")]
pub use run_log::{run_name, MlflowLog, MlflowOptions, RunLog};
pub use run_status::RunStatus;
