//! Run tooling of `moe-layers`: what turns a training loop into a run a
//! person can follow and compare. [`RunConfig`] (model family, training and
//! tokenizer in one TOML or JSON file), [`JsonlWriter`] for `metrics.jsonl`,
//! MLflow logging to a tracking server ([`MlflowClient`], [`MlflowRun`]; the
//! legacy file-store writer [`MlflowFileStoreRun`]), the loss plot
//! ([`plot_loss_curve`]) and the terminal [`Progress`] bar.
#![warn(missing_docs)]

mod metrics;
mod mlflow;
mod mlflow_file_store;
mod plot;
mod progress;
mod run_config;

pub use metrics::JsonlWriter;
pub use mlflow::{MlflowClient, MlflowRun, RunStatus};
pub use mlflow_file_store::MlflowFileStoreRun;
pub use plot::{plot_loss_curve, plot_val_losses, LossCurves, FONT_PATHS};
pub use progress::{format_secs, Progress};
pub use run_config::RunConfig;
