//! The MLflow REST client against a stand-in server (std's TCP, canned
//! answers): the requests it sends, MLflow's batch limits, the artifact
//! upload's path, error answers and a server that is not there. The real
//! `mlflow server` is the facade's `mlflow_server` test.

use moe_core::MoeError;
use moe_run::{MlflowClient, MlflowRun, RunStatus};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request the stand-in received.
#[derive(Debug, Clone)]
struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

type Answer = fn(&Request) -> (u16, String);

/// A server on a free port that answers each request with `answer`, one
/// request a connection; returns its address and what it received.
fn serve(answer: Answer) -> (String, Arc<Mutex<Vec<Request>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let received = Arc::new(Mutex::new(Vec::new()));
    let log = received.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (method, path) = (parts.next().unwrap().to_string(), parts.next().unwrap());
            let mut headers = Vec::new();
            loop {
                let mut header = String::new();
                reader.read_line(&mut header).unwrap();
                let header = header.trim_end();
                if header.is_empty() {
                    break;
                }
                let (k, v) = header.split_once(':').unwrap();
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
            let length = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .map_or(0, |(_, v)| v.parse().unwrap());
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let request = Request {
                method,
                path: path.to_string(),
                headers,
                body,
            };
            let (status, text) = answer(&request);
            log.lock().unwrap().push(request);
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{text}",
                text.len()
            );
        }
    });
    (address, received)
}

/// What `mlflow server` answers, in short.
fn mlflow(request: &Request) -> (u16, String) {
    let path = request.path.split('?').next().unwrap();
    let answer = match path {
        "/api/2.0/mlflow/experiments/get-by-name" => {
            return (
                404,
                json!({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no"}).to_string(),
            )
        }
        "/api/2.0/mlflow/experiments/create" => json!({"experiment_id": "7"}),
        "/api/2.0/mlflow/runs/create" => json!({"run": {"info": {
            "run_id": "abc",
            "experiment_id": "7",
            "artifact_uri": "mlflow-artifacts:/7/abc/artifacts",
        }}}),
        _ => json!({}),
    };
    (200, answer.to_string())
}

fn start(address: &str) -> MlflowRun {
    MlflowClient::new(address)
        .unwrap()
        .with_bearer_token("secret")
        .start_run("my experiment", "first")
        .unwrap()
}

#[test]
fn runs_are_created_logged_in_batches_uploaded_and_finished() {
    let (address, received) = serve(mlflow);
    let mut run = start(&address).with_flush_interval(Duration::from_secs(3600));
    assert_eq!((run.run_id(), run.experiment_id()), ("abc", "7"));
    let params: Vec<(String, usize)> = (0..250).map(|i| (format!("p{i}"), i)).collect();
    run.log_params(params).unwrap();
    for step in 0..2500 {
        run.log_metric("loss", step as f64, step).unwrap();
    }
    // Full batches went out as they filled.
    assert_eq!(run.pending_metrics(), 500);
    run.log_metric("lr", f64::NAN, 2500).unwrap();
    run.log_metric("lr", f64::NEG_INFINITY, 2501).unwrap();
    let dir = std::env::temp_dir().join(format!("moe-mlflow-rest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join("loss curve.png");
    std::fs::write(&png, b"\x89PNG...").unwrap();
    run.log_artifact(&png).unwrap();
    run.finish(RunStatus::Finished).unwrap();

    let requests = received.lock().unwrap().clone();
    let paths: Vec<&str> = requests.iter().map(|r| r.path.as_str()).collect();
    let batch = "/api/2.0/mlflow/runs/log-batch";
    assert_eq!(
        paths[..3],
        [
            "/api/2.0/mlflow/experiments/get-by-name?experiment_name=my%20experiment",
            "/api/2.0/mlflow/experiments/create",
            "/api/2.0/mlflow/runs/create",
        ]
    );
    assert!(requests
        .iter()
        .all(|r| r.header("authorization") == Some("Bearer secret")));
    let create = requests[2].json();
    assert_eq!(create["experiment_id"], "7");
    assert_eq!(create["run_name"], "first");
    assert!(create["start_time"].as_u64().unwrap() > 1_600_000_000_000);

    // 250 parameters in three requests, 2502 metrics in three.
    let batches: Vec<Value> = requests
        .iter()
        .filter(|r| r.path == batch)
        .map(Request::json)
        .collect();
    let count = |b: &Value, key: &str| b[key].as_array().map_or(0, Vec::len);
    let sizes: Vec<(usize, usize)> = batches
        .iter()
        .map(|b| (count(b, "params"), count(b, "metrics")))
        .collect();
    assert_eq!(
        sizes,
        [(100, 0), (100, 0), (50, 0), (0, 1000), (0, 1000), (0, 502)]
    );
    assert!(batches.iter().all(|b| b["run_id"] == "abc"));
    assert_eq!(batches[0]["params"][1], json!({"key": "p1", "value": "1"}));
    let metric = &batches[3]["metrics"][999];
    assert_eq!(
        (&metric["key"], &metric["value"]),
        (&json!("loss"), &json!(999.0))
    );
    assert_eq!(metric["step"], 999);
    let last = &batches[5]["metrics"];
    assert_eq!(last[500]["value"], "NaN");
    assert_eq!(last[501]["value"], "-Infinity");

    let upload = requests.iter().find(|r| r.method == "PUT").unwrap();
    assert_eq!(
        upload.path,
        "/api/2.0/mlflow-artifacts/artifacts/7/abc/artifacts/loss%20curve.png"
    );
    assert_eq!(upload.header("content-type"), Some("image/png"));
    assert_eq!(upload.body, b"\x89PNG...");
    let update = requests.last().unwrap();
    assert_eq!(update.path, "/api/2.0/mlflow/runs/update");
    assert_eq!(update.json()["status"], "FINISHED");
    assert!(update.json()["end_time"].as_u64().unwrap() >= create["start_time"].as_u64().unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn metrics_are_sent_when_the_flush_interval_has_passed() {
    let (address, received) = serve(mlflow);
    let mut run = start(&address).with_flush_interval(Duration::ZERO);
    run.log_metric("loss", 1.0, 0).unwrap();
    assert_eq!(run.pending_metrics(), 0);
    let batches = received
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.path.ends_with("log-batch"))
        .count();
    assert_eq!(batches, 1);
}

#[test]
fn errors_name_the_request_and_quote_the_server() {
    // An existing experiment is used, not created.
    let (address, received) = serve(|request| {
        match request.path.as_str() {
        p if p.contains("get-by-name") => (
            200,
            json!({"experiment": {"experiment_id": "3", "lifecycle_stage": "active"}}).to_string(),
        ),
        p if p.ends_with("runs/create") => (
            200,
            json!({"run": {"info": {"run_id": "r", "artifact_uri": "s3://bucket/3/r/artifacts"}}})
                .to_string(),
        ),
        _ => (
            400,
            json!({"error_code": "INVALID_PARAMETER_VALUE", "message": "Changing param values is not allowed."})
                .to_string(),
        ),
    }
    });
    let mut run = MlflowClient::new(&address)
        .unwrap()
        .start_run("e", "r")
        .unwrap();
    assert_eq!(run.experiment_id(), "3");
    assert_eq!(received.lock().unwrap().len(), 2);
    let err = run.log_params([("a", 1)]).unwrap_err();
    assert!(matches!(err, MoeError::Mlflow { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "MLflow at {address}/api/2.0/mlflow/runs/log-batch: HTTP 400 \
             INVALID_PARAMETER_VALUE: Changing param values is not allowed."
        )
    );
    // Metrics that could not be sent stay buffered.
    run.log_metric("loss", 1.0, 0).unwrap();
    assert!(run.flush().is_err());
    assert_eq!(run.pending_metrics(), 1);
    // Artifacts kept where only the server can write are not uploaded.
    let err = run.log_artifact(std::path::Path::new("x.png")).unwrap_err();
    assert!(
        err.to_string().contains("s3://bucket/3/r/artifacts"),
        "{err}"
    );
}

#[test]
fn a_server_that_is_not_there_is_an_error_at_once() {
    // A port just freed: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("http://127.0.0.1:{port}");
    let started = std::time::Instant::now();
    let err = MlflowClient::new(&address)
        .unwrap()
        .with_timeout(Duration::from_secs(2))
        .start_run("e", "r")
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "MLflow at {address}/api/2.0/mlflow/experiments/get-by-name: "
        )),
        "{text}"
    );
    let err = MlflowClient::new("file:./mlruns").unwrap_err().to_string();
    assert!(err.contains("http://"), "{err}");
}
