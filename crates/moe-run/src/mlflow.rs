//! Runs logged to an MLflow tracking server through its REST API
//! (`mlflow server`, MLflow 2 or 3): an [`MlflowClient`] finds or creates
//! the experiment and starts an [`MlflowRun`], which logs parameters,
//! buffered metrics (sent with `runs/log-batch`), artifacts (uploaded through
//! the server's artifact proxy) and the run's end.
//!
//! ```no_run
//! use moe_run::{MlflowClient, RunStatus};
//! # fn main() -> moe_core::Result<()> {
//! let client = MlflowClient::new("http://127.0.0.1:5000")?;
//! let mut run = client.start_run("shakespeare", "first")?;
//! run.log_params([("model.n_embd", "128")])?;
//! for step in 0..10 {
//!     run.log_metric("loss", 4.0 / (step + 1) as f64, step)?;
//! }
//! run.finish(RunStatus::Finished)?;
//! # Ok(())
//! # }
//! ```
//!
//! Every request has a time limit ([`MlflowClient::DEFAULT_TIMEOUT`] unless
//! [`MlflowClient::with_timeout`] says otherwise); a failure is a
//! [`MoeError::Mlflow`] naming the request's URL and what went wrong.

pub use crate::run_status::RunStatus;
use moe_core::{MoeError, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A connection to an MLflow tracking server (`http://HOST:PORT` or
/// `https://...`, optionally with a path prefix).
#[derive(Clone)]
pub struct MlflowClient {
    uri: String,
    agent: ureq::Agent,
    timeout: Duration,
    authorization: Option<String>,
}

impl std::fmt::Debug for MlflowClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlflowClient")
            .field("uri", &self.uri)
            .field("timeout", &self.timeout)
            .field("authorization", &self.authorization.as_ref().map(|_| ".."))
            .finish()
    }
}

impl MlflowClient {
    /// How long one request may take, connection included, unless
    /// [`MlflowClient::with_timeout`] sets another limit.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

    /// A client of the tracking server at `uri`, which must be an
    /// `http://` or `https://` URL (MLflow's `sqlite:`, `file:` or
    /// `databricks` tracking URIs are not servers: a config error).
    /// Nothing is sent yet.
    pub fn new(uri: &str) -> Result<Self> {
        let trimmed = uri.trim().trim_end_matches('/');
        let host = trimmed
            .strip_prefix("http://")
            .or_else(|| trimmed.strip_prefix("https://"));
        if host.is_none_or(str::is_empty) {
            return Err(MoeError::config(format!(
                "MLflow tracking URI `{uri}`: expected an http:// or https:// server \
                 address, e.g. http://127.0.0.1:5000"
            )));
        }
        Ok(MlflowClient {
            uri: trimmed.to_string(),
            agent: agent(Self::DEFAULT_TIMEOUT),
            timeout: Self::DEFAULT_TIMEOUT,
            authorization: None,
        })
    }

    /// The same client with `timeout` as the limit of each request (from
    /// connecting to reading the answer).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.agent = agent(timeout);
        self.timeout = timeout;
        self
    }

    /// The same client sending HTTP basic authentication (what MLflow's
    /// `MLFLOW_TRACKING_USERNAME` and `MLFLOW_TRACKING_PASSWORD` set).
    pub fn with_basic_auth(mut self, user: &str, password: &str) -> Self {
        let credentials = base64(format!("{user}:{password}").as_bytes());
        self.authorization = Some(format!("Basic {credentials}"));
        self
    }

    /// The same client sending a bearer token (MLflow's `MLFLOW_TRACKING_TOKEN`).
    pub fn with_bearer_token(mut self, token: &str) -> Self {
        self.authorization = Some(format!("Bearer {token}"));
        self
    }

    /// The server's address, as given (without a trailing `/`).
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The id of the experiment called `name`, created when missing.
    pub fn experiment_id(&self, name: &str) -> Result<String> {
        if let Some(id) = self.find_experiment(name)? {
            return Ok(id);
        }
        let created = self.post("experiments/create", &json!({ "name": name }));
        match created {
            Ok(answer) => string_field(
                &answer,
                "experiment_id",
                &self.endpoint("experiments/create"),
            ),
            // Another process created it in the meantime.
            Err(e) => self.find_experiment(name)?.ok_or(e),
        }
    }

    fn find_experiment(&self, name: &str) -> Result<Option<String>> {
        let url = self.endpoint("experiments/get-by-name");
        let request = self.agent.get(&url).query("experiment_name", name);
        let (status, body) = self.send(&url, self.authorize(request).call())?;
        if status == 404 && error_code(&body).as_deref() == Some("RESOURCE_DOES_NOT_EXIST") {
            return Ok(None);
        }
        let answer = check(&url, status, &body)?;
        let experiment = &answer["experiment"];
        if experiment["lifecycle_stage"] == "deleted" {
            return Err(MoeError::Mlflow {
                url,
                message: format!(
                    "experiment `{name}` is deleted: restore it (`mlflow experiments restore`) \
                     or log to another experiment"
                ),
            });
        }
        string_field(experiment, "experiment_id", &url).map(Some)
    }

    /// Starts a run called `run_name` in the experiment called
    /// `experiment` (created when missing), tagged with the program's name
    /// and the user (`USER`).
    pub fn start_run(&self, experiment: &str, run_name: &str) -> Result<MlflowRun> {
        let experiment_id = self.experiment_id(experiment)?;
        let mut tags = vec![json!({ "key": "mlflow.source.type", "value": "LOCAL" })];
        if let Some(program) = std::env::args().next() {
            let name = Path::new(&program)
                .file_name()
                .map_or(program.clone(), |n| n.to_string_lossy().into_owned());
            tags.push(json!({ "key": "mlflow.source.name", "value": name }));
        }
        if let Ok(user) = std::env::var("USER") {
            tags.push(json!({ "key": "mlflow.user", "value": user }));
        }
        let answer = self.post(
            "runs/create",
            &json!({
                "experiment_id": experiment_id,
                "run_name": run_name,
                "start_time": now_ms(),
                "tags": tags,
            }),
        )?;
        let url = self.endpoint("runs/create");
        let info = &answer["run"]["info"];
        Ok(MlflowRun {
            client: self.clone(),
            run_id: string_field(info, "run_id", &url)?,
            experiment_id,
            artifact_uri: string_field(info, "artifact_uri", &url)?,
            pending: Vec::new(),
            last_flush: Instant::now(),
            flush_interval: Duration::from_secs(10),
        })
    }

    fn endpoint(&self, method: &str) -> String {
        format!("{}/api/2.0/mlflow/{method}", self.uri)
    }

    fn authorize<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.authorization {
            Some(value) => request.header("Authorization", value),
            None => request,
        }
    }

    /// POSTs `body` to the REST method `method`; the answer's JSON.
    fn post(&self, method: &str, body: &Value) -> Result<Value> {
        let url = self.endpoint(method);
        let request = self
            .authorize(self.agent.post(&url))
            .content_type("application/json");
        let (status, answer) = self.send(&url, request.send(body.to_string()))?;
        check(&url, status, &answer)
    }

    /// The status and body of an answer, or the transport's error.
    fn send(
        &self,
        url: &str,
        response: std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<(u16, String)> {
        let fail = |e: ureq::Error| MoeError::Mlflow {
            url: url.to_string(),
            message: match e {
                ureq::Error::Timeout(_) => format!("no answer within {:?} ({e})", self.timeout),
                e => e.to_string(),
            },
        };
        let mut response = response.map_err(fail)?;
        let status = response.status().as_u16();
        let body = response.body_mut().read_to_string().map_err(fail)?;
        Ok((status, body))
    }
}

/// One MLflow run on a tracking server, started by
/// [`MlflowClient::start_run`]. Metrics are buffered and sent in batches:
/// when [`MlflowRun::MAX_METRICS_PER_BATCH`] are waiting, when the last send is older
/// than the flush interval (10 s unless [`MlflowRun::with_flush_interval`]
/// sets another), on [`MlflowRun::flush`] and at [`MlflowRun::finish`].
#[derive(Debug)]
pub struct MlflowRun {
    client: MlflowClient,
    run_id: String,
    experiment_id: String,
    artifact_uri: String,
    pending: Vec<Value>,
    last_flush: Instant,
    flush_interval: Duration,
}

impl MlflowRun {
    /// The most metrics one `runs/log-batch` request may carry (MLflow's limit).
    pub const MAX_METRICS_PER_BATCH: usize = 1000;

    /// The most parameters one `runs/log-batch` request may carry (MLflow's limit).
    pub const MAX_PARAMS_PER_BATCH: usize = 100;

    /// The run's id (32 hex digits).
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// The id of the run's experiment.
    pub fn experiment_id(&self) -> &str {
        &self.experiment_id
    }

    /// Where the server keeps the run's artifacts (`mlflow-artifacts:/...`
    /// when it serves them itself, `mlflow server`'s default).
    pub fn artifact_uri(&self) -> &str {
        &self.artifact_uri
    }

    /// The server's address.
    pub fn tracking_uri(&self) -> &str {
        self.client.uri()
    }

    /// Sends the buffered metrics once the last send is `interval` old
    /// (checked as metrics are logged).
    pub fn with_flush_interval(mut self, interval: Duration) -> Self {
        self.flush_interval = interval;
        self
    }

    /// Logs parameters (`key`, `value` as text), at most
    /// [`MlflowRun::MAX_PARAMS_PER_BATCH`] a request. MLflow refuses to change a
    /// parameter already logged with another value.
    pub fn log_params<K, V>(&mut self, params: impl IntoIterator<Item = (K, V)>) -> Result<()>
    where
        K: AsRef<str>,
        V: std::fmt::Display,
    {
        let params: Vec<Value> = params
            .into_iter()
            .map(|(k, v)| json!({ "key": k.as_ref(), "value": v.to_string() }))
            .collect();
        for chunk in params.chunks(Self::MAX_PARAMS_PER_BATCH) {
            self.client.post(
                "runs/log-batch",
                &json!({ "run_id": self.run_id, "params": chunk }),
            )?;
        }
        Ok(())
    }

    /// Buffers the value of metric `key` at `step`, timestamped now, and
    /// sends the buffer when it is full or old (see [`MlflowRun`]). NaN and
    /// infinities are sent as MLflow's JSON spells them.
    pub fn log_metric(&mut self, key: &str, value: f64, step: i64) -> Result<()> {
        let value = if value.is_finite() {
            json!(value)
        } else if value.is_nan() {
            json!("NaN")
        } else if value > 0.0 {
            json!("Infinity")
        } else {
            json!("-Infinity")
        };
        self.pending.push(json!({
            "key": key,
            "value": value,
            "timestamp": now_ms(),
            "step": step,
        }));
        if self.pending.len() >= Self::MAX_METRICS_PER_BATCH
            || self.last_flush.elapsed() >= self.flush_interval
        {
            self.flush()?;
        }
        Ok(())
    }

    /// The metrics logged but not sent yet.
    pub fn pending_metrics(&self) -> usize {
        self.pending.len()
    }

    /// Sends the buffered metrics, [`MlflowRun::MAX_METRICS_PER_BATCH`] a request. On
    /// an error the metrics not sent stay buffered for the next flush.
    pub fn flush(&mut self) -> Result<()> {
        self.last_flush = Instant::now();
        while !self.pending.is_empty() {
            let n = self.pending.len().min(Self::MAX_METRICS_PER_BATCH);
            self.client.post(
                "runs/log-batch",
                &json!({ "run_id": self.run_id, "metrics": &self.pending[..n] }),
            )?;
            self.pending.drain(..n);
        }
        Ok(())
    }

    /// Uploads the file at `path` into the run's artifact folder, under
    /// its file name, through the tracking server's artifact proxy
    /// (`PUT /api/2.0/mlflow-artifacts/artifacts/...`). An error when the
    /// server does not proxy the run's artifacts (an `artifact_uri` other
    /// than `mlflow-artifacts:`, from `mlflow server --no-serve-artifacts`).
    pub fn log_artifact(&self, path: &Path) -> Result<()> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| MoeError::config(format!("{} names no file", path.display())))?;
        let root = proxied_artifact_path(&self.artifact_uri).ok_or_else(|| MoeError::Mlflow {
            url: self.client.uri.clone(),
            message: format!(
                "the run's artifact store is {}, and artifacts are uploaded only through \
                 the tracking server's artifact proxy (an mlflow-artifacts: store, which \
                 `mlflow server` has unless started with --no-serve-artifacts)",
                self.artifact_uri
            ),
        })?;
        let bytes = std::fs::read(path).map_err(|e| MoeError::io(path, e))?;
        let url = format!(
            "{}/api/2.0/mlflow-artifacts/artifacts/{}/{}",
            self.client.uri,
            percent_encode(root.trim_matches('/')),
            percent_encode(&name)
        );
        let content_type = match path.extension().and_then(|e| e.to_str()) {
            Some("png") => "image/png",
            Some("json") => "application/json",
            Some("txt" | "jsonl" | "toml") => "text/plain",
            _ => "application/octet-stream",
        };
        let request = self
            .client
            .authorize(self.client.agent.put(&url))
            .content_type(content_type);
        let (status, body) = self.client.send(&url, request.send(&bytes[..]))?;
        check(&url, status, &body).map(drop)
    }

    /// Sends the buffered metrics, then marks the run finished or failed,
    /// with its end time.
    pub fn finish(mut self, status: RunStatus) -> Result<()> {
        self.flush()?;
        self.client
            .post(
                "runs/update",
                &json!({
                    "run_id": self.run_id,
                    "status": status.as_str(),
                    "end_time": now_ms(),
                }),
            )
            .map(drop)
    }
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(timeout))
        .timeout_global(Some(timeout))
        // Error answers carry MLflow's `error_code` and message in the body.
        .http_status_as_error(false)
        .user_agent(concat!("moe-layers/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

/// The answer's JSON when `status` is a success, else the server's error.
fn check(url: &str, status: u16, body: &str) -> Result<Value> {
    if (200..300).contains(&status) {
        return serde_json::from_str(if body.trim().is_empty() { "{}" } else { body }).map_err(
            |e| MoeError::Mlflow {
                url: url.to_string(),
                message: format!("the answer is not JSON ({e}): {}", excerpt(body)),
            },
        );
    }
    let message = match serde_json::from_str::<Value>(body) {
        Ok(json) if json["error_code"].is_string() => format!(
            "HTTP {status} {}: {}",
            json["error_code"].as_str().unwrap_or_default(),
            json["message"].as_str().unwrap_or_default()
        ),
        _ => format!("HTTP {status}: {}", excerpt(body)),
    };
    Err(MoeError::Mlflow {
        url: url.to_string(),
        message,
    })
}

/// MLflow's `error_code` in an error answer.
fn error_code(body: &str) -> Option<String> {
    let json: Value = serde_json::from_str(body).ok()?;
    json["error_code"].as_str().map(str::to_string)
}

/// A field of the answer that must be a string.
fn string_field(json: &Value, key: &str, url: &str) -> Result<String> {
    json[key]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| MoeError::Mlflow {
            url: url.to_string(),
            message: format!("the answer has no `{key}`: {}", excerpt(&json.to_string())),
        })
}

/// The text of an answer, tags dropped and cut to 200 characters.
fn excerpt(body: &str) -> String {
    let mut text = String::new();
    let mut in_tag = false;
    for c in body.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => text.push(if c.is_whitespace() { ' ' } else { c }),
            _ => {}
        }
    }
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match text.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None if text.is_empty() => "(empty)".to_string(),
        None => text,
    }
}

/// The path under the server's artifact proxy of an `mlflow-artifacts:`
/// URI (`mlflow-artifacts:/1/RUN/artifacts`, or with a host,
/// `mlflow-artifacts://HOST:PORT/1/RUN/artifacts`); `None` for other stores.
pub(crate) fn proxied_artifact_path(uri: &str) -> Option<&str> {
    let rest = uri.strip_prefix("mlflow-artifacts:")?;
    Some(match rest.strip_prefix("//") {
        Some(with_host) => with_host.find('/').map_or("", |i| &with_host[i..]),
        None => rest,
    })
}

/// Percent-encodes what is not unreserved in a URL path (`/` kept).
fn percent_encode(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifact_uris_map_to_the_proxy() {
        assert_eq!(
            proxied_artifact_path("mlflow-artifacts:/1/abc/artifacts"),
            Some("/1/abc/artifacts")
        );
        assert_eq!(
            proxied_artifact_path("mlflow-artifacts://host:5000/1/abc/artifacts"),
            Some("/1/abc/artifacts")
        );
        assert_eq!(proxied_artifact_path("s3://bucket/1/abc/artifacts"), None);
        assert_eq!(proxied_artifact_path("file:///tmp/mlruns/1"), None);
        assert_eq!(percent_encode("a b/c%.png"), "a%20b/c%25.png");
    }

    #[test]
    fn base64_pads() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
    }

    #[test]
    fn errors_quote_the_server() {
        let body = r#"{"error_code": "INVALID_PARAMETER_VALUE", "message": "Changing param values is not allowed."}"#;
        let err = check("http://h/x", 400, body).unwrap_err().to_string();
        assert_eq!(
            err,
            "MLflow at http://h/x: HTTP 400 INVALID_PARAMETER_VALUE: Changing param values is not allowed."
        );
        let html = "<!doctype html>\n<title>500 Internal Server Error</title>\n<h1>Internal\nServer Error</h1>";
        let err = check("http://h/x", 500, html).unwrap_err().to_string();
        assert!(
            err.ends_with("HTTP 500: 500 Internal Server Error Internal Server Error"),
            "{err}"
        );
        assert_eq!(check("http://h/x", 200, "").unwrap(), json!({}));
        assert!(MlflowClient::new("sqlite:///mlflow.db").is_err());
        assert!(MlflowClient::new("http://").is_err());
        assert_eq!(
            MlflowClient::new("http://127.0.0.1:5000/").unwrap().uri(),
            "http://127.0.0.1:5000"
        );
    }
}
