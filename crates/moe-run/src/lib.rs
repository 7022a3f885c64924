//! Run tooling of `moe-layers`: what turns a training loop into a run a
//! person can follow and compare. [`RunConfig`] (model family, training and
//! tokenizer in one TOML or JSON file), [`JsonlWriter`] for `metrics.jsonl`,
//! an MLflow file-store writer ([`MlflowRun`]), the loss plot
//! ([`plot_loss_curve`]) and the terminal [`Progress`] bar; runs in child
//! processes ([`ProcessPool`]) and generated sections of Markdown files
//! ([`write_generated_section`]) for programs that compare many runs.

mod markdown;
mod metrics;
mod mlflow;
mod plot;
mod processes;
mod progress;
mod run_config;

pub use markdown::write_generated_section;
pub use metrics::JsonlWriter;
pub use mlflow::{MlflowRun, RunStatus};
pub use plot::{plot_loss_curve, plot_series, plot_val_losses, LossCurves, FONT_PATHS};
pub use processes::{print_result, threads_per_run, Finished, ProcessPool, RESULT_PREFIX};
pub use progress::{format_secs, Progress};
pub use run_config::RunConfig;
