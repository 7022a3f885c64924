//! Legacy: runs in MLflow's file-store layout, so that
//! `mlflow ui --backend-store-uri mlruns` lists them without a tracking
//! server. MLflow 3 keeps this store in maintenance mode (reading it needs
//! `MLFLOW_ALLOW_FILE_STORE=true`) and later versions drop it: log to a
//! tracking server with [`MlflowRun`](crate::MlflowRun) instead.
//!
//! ```text
//! mlruns/<experiment_id>/meta.yaml             the experiment
//! mlruns/<experiment_id>/<run_id>/meta.yaml    the run
//! mlruns/<experiment_id>/<run_id>/params/<key>       the value, as text
//! mlruns/<experiment_id>/<run_id>/metrics/<key>      lines `timestamp value step`
//! mlruns/<experiment_id>/<run_id>/tags/mlflow.runName
//! ```
//!
//! Timestamps are milliseconds since the Unix epoch; run status codes are
//! MLflow's `RunStatus` (1 running, 3 finished, 4 failed).

use crate::RunStatus;
use moe_core::{MoeError, Result};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// One MLflow run being written in the (legacy) file-store layout.
#[derive(Debug)]
pub struct MlflowFileStoreRun {
    dir: PathBuf,
    experiment_id: String,
    run_id: String,
    run_name: String,
    start_time: u128,
}

impl MlflowFileStoreRun {
    /// Creates a run in the experiment called `experiment` under `root`
    /// (`mlruns`), creating the experiment (and MLflow's `Default`
    /// experiment 0) when missing.
    pub fn create(root: &Path, experiment: &str, run_name: &str) -> Result<Self> {
        let root = absolute(root)?;
        fs::create_dir_all(&root).map_err(|e| MoeError::io(&root, e))?;
        if !root.join("0").join("meta.yaml").is_file() {
            write_experiment(&root, "0", "Default")?;
        }
        let experiment_id = match find_experiment(&root, experiment)? {
            Some(id) => id,
            None => {
                let id = next_experiment_id(&root)?;
                write_experiment(&root, &id, experiment)?;
                id
            }
        };
        let start_time = now_ms();
        let run_id = format!(
            "{:032x}",
            start_time
                .wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835)
                .wrapping_add(std::process::id() as u128)
        );
        let dir = root.join(&experiment_id).join(&run_id);
        for sub in ["params", "metrics", "tags", "artifacts"] {
            let path = dir.join(sub);
            fs::create_dir_all(&path).map_err(|e| MoeError::io(&path, e))?;
        }
        let run = MlflowFileStoreRun {
            dir,
            experiment_id,
            run_id,
            run_name: run_name.to_string(),
            start_time,
        };
        write(&run.dir.join("tags").join("mlflow.runName"), run_name)?;
        run.write_meta(None, 1)?;
        Ok(run)
    }

    /// The run's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The run's id.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Logs a parameter (MLflow keeps the value as the file's text).
    pub fn log_param(&self, key: &str, value: impl std::fmt::Display) -> Result<()> {
        write(&self.dir.join("params").join(key), &value.to_string())
    }

    /// Appends `timestamp value step` to `metrics/<key>`.
    pub fn log_metric(&self, key: &str, value: f64, step: i64) -> Result<()> {
        let path = self.dir.join("metrics").join(key);
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| MoeError::io(&path, e))?;
        writeln!(file, "{} {value} {step}", now_ms()).map_err(|e| MoeError::io(&path, e))
    }

    /// Copies the file at `path` into the run's `artifacts/` folder.
    pub fn log_artifact(&self, path: &Path) -> Result<()> {
        let name = path
            .file_name()
            .ok_or_else(|| MoeError::config(format!("{} names no file", path.display())))?;
        let dest = self.dir.join("artifacts").join(name);
        fs::copy(path, &dest)
            .map(drop)
            .map_err(|e| MoeError::io(path, e))
    }

    /// Marks the run finished or failed, with its end time.
    pub fn finish(&self, status: RunStatus) -> Result<()> {
        let code = match status {
            RunStatus::Finished => 3,
            RunStatus::Failed => 4,
        };
        self.write_meta(Some(now_ms()), code)
    }

    fn write_meta(&self, end_time: Option<u128>, status: u8) -> Result<()> {
        let end = end_time.map_or("null".to_string(), |t| t.to_string());
        let artifacts = file_uri(&self.dir.join("artifacts"));
        let meta = format!(
            "artifact_uri: {artifacts}\nend_time: {end}\nentry_point_name: ''\n\
             experiment_id: '{}'\nlifecycle_stage: active\nrun_id: {id}\nrun_name: {}\n\
             run_uuid: {id}\nsource_name: ''\nsource_type: 4\nsource_version: ''\n\
             start_time: {}\nstatus: {status}\ntags: []\nuser_id: moe-layers\n",
            self.experiment_id,
            yaml_string(&self.run_name),
            self.start_time,
            id = self.run_id,
        );
        write(&self.dir.join("meta.yaml"), &meta)
    }
}

fn write_experiment(root: &Path, id: &str, name: &str) -> Result<()> {
    let dir = root.join(id);
    fs::create_dir_all(&dir).map_err(|e| MoeError::io(&dir, e))?;
    let now = now_ms();
    let meta = format!(
        "artifact_location: {}\ncreation_time: {now}\nexperiment_id: '{id}'\n\
         last_update_time: {now}\nlifecycle_stage: active\nname: {}\n",
        file_uri(&dir),
        yaml_string(name)
    );
    write(&dir.join("meta.yaml"), &meta)
}

/// The id of the experiment named `name`, if one exists under `root`.
fn find_experiment(root: &Path, name: &str) -> Result<Option<String>> {
    let wanted = format!("name: {}", yaml_string(name));
    for (id, meta) in experiments(root)? {
        if meta.lines().any(|l| l == wanted) {
            return Ok(Some(id));
        }
    }
    Ok(None)
}

fn next_experiment_id(root: &Path) -> Result<String> {
    let max = experiments(root)?
        .iter()
        .filter_map(|(id, _)| id.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    Ok((max + 1).to_string())
}

/// `(id, meta.yaml text)` of every experiment folder under `root`.
fn experiments(root: &Path) -> Result<Vec<(String, String)>> {
    let entries = fs::read_dir(root).map_err(|e| MoeError::io(root, e))?;
    Ok(entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let meta = fs::read_to_string(e.path().join("meta.yaml")).ok()?;
            Some((e.file_name().to_string_lossy().into_owned(), meta))
        })
        .collect())
}

/// A YAML single-quoted scalar (quotes doubled).
fn yaml_string(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn file_uri(path: &Path) -> String {
    format!("file://{}", path.display())
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).map_err(|e| MoeError::io(path, e))
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).map_err(|e| MoeError::io(path, e))
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}
