//! The sinks of a training run's typed events ([`TrainEvent`]):
//! `metrics.jsonl` (every record), the terminal's progress bar, and MLflow
//! with its fail-soft policy ([`MlflowLog`]: a tracking server that fails
//! is warned about once and left, the training goes on). [`RunLog`] sends
//! each event to all of them.

use crate::{
    JsonlWriter, MlflowClient, MlflowFileStoreRun, MlflowRun, PreparedRun, Progress, RunConfig,
    RunStatus,
};
use moe_core::{MoeError, Result};
use moe_train::TrainEvent;
use std::path::{Path, PathBuf};

/// Where a run is logged to MLflow; each setting falls back to MLflow's
/// environment variable (`MLFLOW_TRACKING_URI`, `MLFLOW_EXPERIMENT_NAME`).
/// With the `cli` feature, the flags `--mlflow-uri`, `--mlflow-experiment`
/// and `--mlflow-file-store` of every program that logs (`#[command(flatten)]`).
#[derive(Debug, Clone, Default)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct MlflowOptions {
    /// Log the run to the MLflow tracking server at this address
    /// (http://HOST:PORT or https://...; MLFLOW_TRACKING_URI when not
    /// given): parameters, metrics per step and per evaluation, the plot. A
    /// server that is down or answers an error is warned about once and
    /// left; the training goes on and metrics.jsonl keeps every record
    #[cfg_attr(feature = "cli", arg(long = "mlflow-uri"))]
    pub uri: Option<String>,
    /// The MLflow experiment (else MLFLOW_EXPERIMENT_NAME, else the program's)
    #[cfg_attr(feature = "cli", arg(long = "mlflow-experiment"))]
    pub experiment: Option<String>,
    /// Legacy: also write the run in MLflow's file-store layout under DIR
    /// (MLflow 3 reads it only with MLFLOW_ALLOW_FILE_STORE=true; newer
    /// versions not at all)
    #[cfg_attr(feature = "cli", arg(long = "mlflow-file-store", value_name = "DIR"))]
    pub file_store: Option<PathBuf>,
}

/// A run logged to MLflow: a tracking server, whose first failure prints
/// one warning and ends the logging to it (never the training), and the
/// legacy file store, a local folder whose errors stop the run as
/// `metrics.jsonl`'s do.
pub struct MlflowLog {
    server: Option<MlflowRun>,
    /// The server's address, for the warning.
    uri: String,
    warned: bool,
    file_store: Option<MlflowFileStoreRun>,
}

impl MlflowLog {
    /// Starts the run `run_name` on the server (`options.uri`, else
    /// `MLFLOW_TRACKING_URI`; none: not logged) and in the file store,
    /// logging every field of `config` as a parameter (`model.n_embd`,
    /// ...). A bad `options.uri` is an error; a server that fails is a
    /// warning. The server's credentials come from
    /// `MLFLOW_TRACKING_TOKEN`, or `MLFLOW_TRACKING_USERNAME` and
    /// `MLFLOW_TRACKING_PASSWORD`.
    pub fn start(
        options: &MlflowOptions,
        default_experiment: &str,
        run_name: &str,
        config: &RunConfig,
    ) -> Result<Self> {
        let env = |key: &str| std::env::var(key).ok().filter(|v| !v.is_empty());
        let mut log = MlflowLog {
            server: None,
            uri: String::new(),
            warned: false,
            file_store: None,
        };
        let params = config_params(config)?;
        let experiment = (options.experiment.clone())
            .or_else(|| env("MLFLOW_EXPERIMENT_NAME"))
            .unwrap_or_else(|| default_experiment.into());
        if let Some(dir) = &options.file_store {
            let run = MlflowFileStoreRun::create(dir, &experiment, run_name)?;
            for (key, value) in &params {
                run.log_param(key, value)?;
            }
            log.file_store = Some(run);
        }
        let client = match (&options.uri, env("MLFLOW_TRACKING_URI")) {
            (Some(uri), _) => MlflowClient::new(uri)?,
            (None, None) => return Ok(log),
            (None, Some(uri)) => match MlflowClient::new(&uri) {
                Ok(client) => client,
                Err(_) => {
                    eprintln!(
                        "warning: MLFLOW_TRACKING_URI={uri} is not an http(s) tracking server: \
                         the run is not logged to MLflow"
                    );
                    return Ok(log);
                }
            },
        };
        let client = match (
            env("MLFLOW_TRACKING_TOKEN"),
            env("MLFLOW_TRACKING_USERNAME"),
        ) {
            (Some(token), _) => client.with_bearer_token(&token),
            (None, Some(user)) => {
                let password = env("MLFLOW_TRACKING_PASSWORD").unwrap_or_default();
                client.with_basic_auth(&user, &password)
            }
            (None, None) => client,
        };
        log.uri = client.uri().to_string();
        let started = client.start_run(&experiment, run_name).and_then(|mut run| {
            run.log_params(params)?;
            Ok(run)
        });
        match started {
            Ok(run) => {
                println!(
                    "MLflow: {}/#/experiments/{}/runs/{}",
                    log.uri,
                    run.experiment_id(),
                    run.run_id()
                );
                log.server = Some(run);
            }
            Err(e) => log.warn("logging stopped", &e, None),
        }
        Ok(log)
    }

    /// Prints the one warning of the run about the server: `what`
    /// happened (the logging stopped, a file was not uploaded) because of `e`.
    fn warn(&mut self, what: &str, e: &MoeError, progress: Option<&Progress>) {
        if std::mem::replace(&mut self.warned, true) {
            return;
        }
        let line = format!(
            "warning: MLflow at {}: {what} ({e}); the training goes on and \
             metrics.jsonl keeps every record",
            self.uri
        );
        match progress {
            Some(progress) => progress.eprintln(&line),
            None => eprintln!("{line}"),
        }
    }

    /// Logs the metrics of `step`, sent to the server at once when `flush`.
    pub fn metrics(
        &mut self,
        step: i64,
        values: &[(&str, f64)],
        flush: bool,
        progress: Option<&Progress>,
    ) -> Result<()> {
        if let Some(run) = &self.file_store {
            for &(key, value) in values {
                run.log_metric(key, value, step)?;
            }
        }
        if let Some(run) = self.server.as_mut() {
            let logged = values
                .iter()
                .try_for_each(|&(key, value)| run.log_metric(key, value, step))
                .and_then(|()| if flush { run.flush() } else { Ok(()) });
            if let Err(e) = logged {
                self.server = None;
                self.warn("logging stopped", &e, progress);
            }
        }
        Ok(())
    }

    /// Uploads a file of the run. The server's run goes on after a failed
    /// upload (a server that keeps artifacts elsewhere still takes metrics).
    pub fn artifact(&mut self, path: &Path) -> Result<()> {
        if let Some(run) = &self.file_store {
            run.log_artifact(path)?;
        }
        if let Some(Err(e)) = self.server.as_ref().map(|run| run.log_artifact(path)) {
            let what = format!("{} not uploaded", path.display());
            self.warn(&what, &e, None);
        }
        Ok(())
    }

    /// Marks the run finished or failed.
    pub fn finish(mut self, status: RunStatus) -> Result<()> {
        if let Some(Err(e)) = self.server.take().map(|run| run.finish(status)) {
            self.warn("the run's end not recorded", &e, None);
        }
        self.file_store
            .take()
            .map_or(Ok(()), |run| run.finish(status))
    }
}

/// Every field of the config as an MLflow parameter (`model.n_embd`, ...).
fn config_params(config: &RunConfig) -> Result<Vec<(String, String)>> {
    let value = serde_json::to_value(config)
        .map_err(|e| MoeError::config(format!("cannot serialise the config: {e}")))?;
    let mut params = Vec::new();
    for (section, fields) in value.as_object().into_iter().flatten() {
        for (key, v) in fields.as_object().into_iter().flatten() {
            let text = v.as_str().map_or(v.to_string(), str::to_string);
            params.push((format!("{section}.{key}"), text));
        }
    }
    Ok(params)
}

/// A run's event sinks together: every event to `metrics.jsonl`; the start,
/// each logged step and each evaluation to the progress bar; steps and
/// evaluations to MLflow.
pub struct RunLog {
    metrics: JsonlWriter,
    progress: Progress,
    mlflow: MlflowLog,
}

/// The name of the run whose folder is `dir`: the folder's name (`run`
/// when it has none).
pub fn run_name(dir: &Path) -> String {
    std::path::absolute(dir)
        .ok()
        .and_then(|dir| dir.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "run".into())
}

impl RunLog {
    /// Sinks writing `metrics`, showing `progress` and logging to `mlflow`.
    pub fn new(metrics: JsonlWriter, progress: Progress, mlflow: MlflowLog) -> Self {
        RunLog {
            metrics,
            progress,
            mlflow,
        }
    }

    /// The sinks of `run` in its folder `dir`, on the process that reports
    /// ([`PreparedRun::reports`]; `None` on the other ranks):
    /// `dir/metrics.jsonl` (appended to when the run resumes), the progress
    /// bar from the run's first step to `max_iters`, and MLflow as `mlflow`
    /// says, the run named after `dir` ([`run_name`]) in
    /// `default_experiment` unless `mlflow` or the environment names another.
    pub fn for_run(
        run: &PreparedRun,
        dir: &Path,
        mlflow: &MlflowOptions,
        default_experiment: &str,
    ) -> Result<Option<Self>> {
        if !run.reports() {
            return Ok(None);
        }
        std::fs::create_dir_all(dir).map_err(|e| MoeError::io(dir, e))?;
        let path = dir.join("metrics.jsonl");
        let metrics = match run.resumes() {
            Some(_) => JsonlWriter::append(&path)?,
            None => JsonlWriter::create(&path)?,
        };
        let config = run.config();
        let mlflow = MlflowLog::start(mlflow, default_experiment, &run_name(dir), config)?;
        let progress = Progress::new(config.train.max_iters, run.first_step());
        Ok(Some(RunLog::new(metrics, progress, mlflow)))
    }

    /// Sends `event` to every sink.
    pub fn event(&mut self, event: &TrainEvent) -> Result<()> {
        self.metrics.write(event)?;
        let progress = &self.progress;
        match *event {
            TrainEvent::Start {
                parameters,
                active_parameters,
                ref device,
                ref model,
                ..
            } => progress.println(&format!(
                "{:.6} M parameters ({:.3} M active per token), device {device}, vocabulary {}",
                parameters as f64 / 1e6,
                active_parameters as f64 / 1e6,
                model.vocab_size()
            )),
            TrainEvent::Step {
                step,
                loss,
                lr,
                ms_per_step,
                tokens_per_s,
                eta_s,
                ..
            } => {
                progress.step(step, loss, ms_per_step, tokens_per_s, eta_s);
                let values = [("loss", loss), ("lr", lr)];
                self.mlflow.metrics(step, &values, false, Some(progress))?;
            }
            TrainEvent::Eval {
                step,
                train_loss,
                val_loss,
                tokens_per_s,
                eval_s,
                load_cv,
                ..
            } => {
                progress.println(&format!(
                    "step {step}: train loss {train_loss:.4}, val loss {val_loss:.4} (eval {eval_s:.1} s)"
                ));
                let values = [
                    ("train_loss", train_loss),
                    ("val_loss", val_loss),
                    ("tokens_per_s", tokens_per_s),
                    ("load_cv", load_cv),
                ];
                // Sent now: a person following the run sees each evaluation.
                self.mlflow.metrics(step, &values, true, Some(progress))?;
            }
            // The end, and events a later trainer may add: metrics.jsonl has them.
            _ => {}
        }
        Ok(())
    }

    /// Closes the progress bar; the MLflow run stays open for artifacts.
    pub fn finish(self) -> MlflowLog {
        self.progress.finish();
        self.mlflow
    }
}
