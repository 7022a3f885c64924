//! MLflow logging as a user sees it. A real tracking server (`mlflow
//! server` of `.venv`, which `cargo xtask test` installs, on SQLite with its
//! artifact proxy) takes a tiny training run with `--mlflow-uri`, and
//! MLflow's own Python client reads back its parameters, metric histories,
//! status and plot. A server that is not there, or that fails in the middle
//! of the run, costs one warning line and nothing of the training.

mod common;

use common::ok;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TINY: &str = "[model]\nn_embd = 32\nn_head = 4\nn_layer = 2\nnum_experts = 4\n\
                    block_size = 16\n[model.router]\nkind = \"top_k\"\nbias = false\n\
                    [train]\nbatch_size = 4\neval_iters = 2\neval_interval = 4\nlog_interval = 2\n";

/// The python of `.venv` (`cargo xtask` puts it first on PATH).
fn venv_bin(name: &str) -> PathBuf {
    let venv = std::env::var_os("VIRTUAL_ENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv"));
    venv.join("bin").join(name)
}

/// A fresh folder for one case.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moe-mlflow-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A tiny run of the shakespeare example writing into `out`.
fn train(dir: &Path, out: &Path, extra: &[&str]) -> Output {
    let config = dir.join("tiny.toml");
    std::fs::write(&config, TINY).unwrap();
    Command::new(common::example("shakespeare"))
        .arg("--config")
        .arg(&config)
        .args(["--device", "cpu", "--sample-chars", "0", "--max-iters", "6"])
        .args(["--plot", "--out"])
        .arg(out)
        .args(extra)
        .env_remove("MLFLOW_TRACKING_URI")
        .env_remove("MLFLOW_EXPERIMENT_NAME")
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap()
}

/// The records of `out/metrics.jsonl`.
fn records(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `(step, field)` of the records of one kind.
fn series(records: &[Value], event: &str, field: &str) -> Vec<(i64, f64)> {
    records
        .iter()
        .filter(|r| r["event"] == event)
        .map(|r| (r["step"].as_i64().unwrap(), r[field].as_f64().unwrap()))
        .collect()
}

/// `mlflow server` in its own process group, killed (the group: uvicorn
/// and its workers too) when dropped, also when the test panics.
struct Server {
    child: Child,
    uri: String,
    log: PathBuf,
}

impl Server {
    /// Starts the server on a free port with its store and artifacts under
    /// `dir`; waits (at most 120 s) for `/health` to answer.
    fn start(dir: &Path) -> Server {
        use std::os::unix::process::CommandExt;
        let mlflow = venv_bin("mlflow");
        let version = Command::new(venv_bin("python"))
            .args([
                "-c",
                "import importlib.metadata as m; print(m.version('mlflow'))",
            ])
            .output()
            .ok()
            .filter(|o| o.status.success());
        assert!(
            version.is_some() && mlflow.is_file(),
            "MLflow is not installed in {}: `cargo xtask test` installs it \
             (or `.venv/bin/pip install mlflow==3.17.2`)",
            mlflow.display()
        );
        let port = free_port();
        let log = dir.join("server.log");
        let child = Command::new(&mlflow)
            .arg("server")
            .arg("--backend-store-uri")
            .arg(format!("sqlite:///{}", dir.join("mlflow.db").display()))
            .arg("--artifacts-destination")
            .arg(dir.join("artifacts"))
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--workers", "1"])
            // No job runner (its consumers are processes the test does not need).
            .env("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join("server.err")).unwrap())
            .process_group(0)
            .spawn()
            .unwrap();
        let mut server = Server {
            child,
            uri: format!("http://127.0.0.1:{port}"),
            log,
        };
        let started = Instant::now();
        while !healthy(port) {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("mlflow server exited ({status}):\n{}", server.logs());
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "mlflow server did not answer /health within 120 s:\n{}",
                server.logs()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        eprintln!(
            "mlflow server up in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        server
    }

    fn logs(&self) -> String {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        format!(
            "{}{}",
            read(&self.log),
            read(&self.log.with_extension("err"))
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // The whole group: `mlflow server` leaves uvicorn's processes behind.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `GET /health` answers 200.
fn healthy(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    let mut answer = String::new();
    stream.write_all(request.as_bytes()).is_ok()
        && stream.read_to_string(&mut answer).is_ok()
        && answer.starts_with("HTTP/1.1 200")
}

/// What MLflow's Python client reads of the run called `run_name`: its
/// status, parameters, metric histories and artifacts, and the first bytes
/// of `loss_curve.png` downloaded from the server, as JSON.
const READ_BACK: &str = r#"
import json, sys
from mlflow.tracking import MlflowClient
uri, run_name, download = sys.argv[1:4]
client = MlflowClient(tracking_uri=uri)
experiment = client.get_experiment_by_name("shakespeare")
runs = client.search_runs([experiment.experiment_id],
                          filter_string=f"attributes.run_name = '{run_name}'")
assert len(runs) == 1, runs
run = runs[0]
keys = ["loss", "lr", "train_loss", "val_loss", "tokens_per_s", "load_cv"]
png = client.download_artifacts(run.info.run_id, "loss_curve.png", download)
print(json.dumps({
    "status": run.info.status,
    "run_name": run.info.run_name,
    "params": run.data.params,
    "metrics": {k: [[m.step, m.value] for m in client.get_metric_history(run.info.run_id, k)]
                for k in keys},
    "artifacts": [a.path for a in client.list_artifacts(run.info.run_id)],
    "png_head": list(open(png, "rb").read(8)),
}))
"#;

#[test]
fn a_run_logged_to_an_mlflow_server_reads_back_through_mlflows_client() {
    let dir = temp_dir("server");
    let server = Server::start(&dir);
    let out = dir.join("tiny-run");
    let started = Instant::now();
    let trained = train(&dir, &out, &["--mlflow-uri", &server.uri]);
    let stdout = ok(&trained);
    let stderr = String::from_utf8_lossy(&trained.stderr);
    eprintln!("training took {:.1} s", started.elapsed().as_secs_f64());
    assert!(!stderr.contains("warning"), "{stderr}");
    assert!(
        stdout.contains(&format!("MLflow: {}/#/experiments/", server.uri)),
        "{stdout}"
    );

    let read = Command::new(venv_bin("python"))
        .args(["-c", READ_BACK, &server.uri, "tiny-run"])
        .arg(dir.join("download"))
        .output()
        .unwrap();
    let run: Value = serde_json::from_str(&ok(&read)).unwrap();
    assert_eq!(run["status"], "FINISHED", "{}", server.logs());
    assert_eq!(run["run_name"], "tiny-run");

    // Every config field as a parameter, flags applied.
    let params = run["params"].as_object().unwrap();
    for (key, value) in [
        ("model.n_embd", "32"),
        ("model.num_experts", "4"),
        ("train.max_iters", "6"),
        ("train.batch_size", "4"),
        ("tokenizer.kind", "char"),
    ] {
        assert_eq!(params[key], value, "{key}: {params:?}");
    }
    assert!(params.len() > 30, "{params:?}");

    // The histories are metrics.jsonl's values: per step (every
    // log_interval) and per evaluation.
    let records = records(&out);
    let history = |key: &str| -> Vec<(i64, f64)> {
        run["metrics"][key]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_i64().unwrap(), p[1].as_f64().unwrap()))
            .collect()
    };
    let steps = series(&records, "step", "loss");
    assert_eq!(
        steps.iter().map(|s| s.0).collect::<Vec<_>>(),
        [2, 4, 6],
        "{records:?}"
    );
    assert_eq!(history("loss"), steps);
    assert_eq!(history("lr"), series(&records, "step", "lr"));
    for key in ["train_loss", "val_loss", "tokens_per_s", "load_cv"] {
        let evals = series(&records, "eval", key);
        assert_eq!(evals.len(), 3, "evals at steps 0, 4 and 5");
        assert_eq!(history(key), evals, "{key}");
    }

    assert_eq!(run["artifacts"], serde_json::json!(["loss_curve.png"]));
    assert_eq!(run["png_head"], serde_json::json!(b"\x89PNG\r\n\x1a\n"));
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A stand-in tracking server that starts a run (its artifact store
/// `artifact_uri`) and takes its parameters, then answers everything with
/// HTTP 503 when `fail`, else with success. Returns its address and the
/// request lines and bodies it received.
fn stand_in(fail: bool, artifact_uri: &'static str) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("http://{}", listener.local_addr().unwrap());
    let received = Arc::new(Mutex::new(Vec::new()));
    let log = received.clone();
    std::thread::spawn(move || {
        let mut batches = 0;
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let (mut line, mut length) = (String::new(), 0);
            let _ = reader.read_line(&mut line);
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
                    break;
                }
                let lower = header.to_ascii_lowercase();
                if let Some(n) = lower.strip_prefix("content-length:") {
                    length = n.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            log.lock().unwrap().push(format!(
                "{} {}",
                line.trim_end(),
                String::from_utf8_lossy(&body)
            ));
            batches += usize::from(line.contains("log-batch"));
            let created = format!(
                r#"{{"run": {{"info": {{"run_id": "r", "artifact_uri": "{artifact_uri}"}}}}}}"#
            );
            let (status, body) = if line.contains("get-by-name") {
                (
                    "200 OK",
                    r#"{"experiment": {"experiment_id": "1"}}"#.to_string(),
                )
            } else if line.contains("runs/create") {
                ("200 OK", created)
            } else if !fail || batches == 1 {
                ("200 OK", "{}".to_string())
            } else {
                (
                    "503 Service Unavailable",
                    "<html><h1>Service Unavailable</h1></html>".to_string(),
                )
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (uri, received)
}

#[test]
fn a_tracking_server_that_is_down_or_failing_costs_one_warning_and_no_record() {
    let dir = temp_dir("down");
    // Nothing listens on a port just freed.
    let down = format!("http://127.0.0.1:{}", free_port());
    let (failing, _) = stand_in(true, "mlflow-artifacts:/1/r/artifacts");
    // A server that keeps artifacts where this client cannot upload.
    let (s3, received) = stand_in(false, "s3://bucket/1/r/artifacts");
    let mut sequences = Vec::new();
    for (name, uri, warning) in [
        ("down", &down, "logging stopped"),
        ("failing", &failing, "logging stopped"),
        ("s3", &s3, "loss_curve.png not uploaded"),
    ] {
        let out = dir.join(name);
        let started = Instant::now();
        let trained = train(&dir, &out, &["--mlflow-uri", uri]);
        ok(&trained);
        assert!(started.elapsed() < Duration::from_secs(60));
        let stderr = String::from_utf8_lossy(&trained.stderr);
        let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("MLflow")).collect();
        assert_eq!(warnings.len(), 1, "{name}: {stderr}");
        let expected = format!("warning: MLflow at {uri}: ");
        assert!(
            warnings[0].starts_with(&expected) && warnings[0].contains(warning),
            "{name}: {stderr}"
        );
        assert!(out.join("loss_curve.png").is_file());
        // metrics.jsonl has the whole run.
        let records = records(&out);
        assert_eq!(records.first().unwrap()["event"], "start");
        assert_eq!(records.last().unwrap()["event"], "end");
        assert_eq!(series(&records, "step", "loss").len(), 3);
        assert_eq!(series(&records, "eval", "val_loss").len(), 3);
        let kinds: Vec<(String, i64)> = records
            .iter()
            .map(|r| (r["event"].to_string(), r["step"].as_i64().unwrap_or(-1)))
            .collect();
        sequences.push(kinds);
    }
    assert!(sequences.iter().all(|s| *s == sequences[0]));
    // After the upload that could not be, the run still ended.
    let last = received.lock().unwrap().last().cloned().unwrap();
    assert!(
        last.starts_with("POST /api/2.0/mlflow/runs/update") && last.contains("FINISHED"),
        "{last}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
