//! Lifecycle of the real services the end-to-end tests run against.
//!
//! - [`SeaweedFs`]: a real S3 store + Iceberg REST catalog, started once per
//!   test binary through `scripts/teststack/seaweedfs.sh` with a watchdog on
//!   this process, so no server outlives the run. Tests share it and keep
//!   apart by using their own namespaces ([`unique`]).
//! - [`Relay`]: icerelay itself, either in-process (fast, for error paths) or
//!   as the real binary with its logs captured ([`RelayProcess`]).
//! - [`python`]: runs a client script from `tests/clients/` in the test venv.
//!
//! Everything comes from `.teststack/` (or `$ICERELAY_TESTSTACK`), which
//! `scripts/setup-test-env.sh` fills. A missing piece fails the test with the
//! command to run; nothing is skipped silently.

#![allow(dead_code)]

pub mod java_rest;
pub mod postgres;
pub mod tls;
pub mod upstream;
pub mod vending;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use icerelay::config::{self, Config, MapEnv};
use icerelay::serve::Server;
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where `scripts/setup-test-env.sh` installed the test stack.
pub fn teststack() -> PathBuf {
    std::env::var_os("ICERELAY_TESTSTACK").map_or_else(|| repo_root().join(".teststack"), PathBuf::from)
}

fn require(path: PathBuf, what: &str) -> PathBuf {
    assert!(path.exists(), "{what} not found at {}; run scripts/setup-test-env.sh", path.display());
    path
}

/// The venv's Python interpreter.
pub fn python_bin() -> PathBuf {
    require(teststack().join("venv/bin/python"), "the test venv")
}

/// The class path of Spark's Iceberg runtime (the jars setup-test-env.sh completed).
pub fn spark_classpath() -> String {
    let file = require(teststack().join("spark/classpath"), "the Spark class path");
    std::fs::read_to_string(file).expect("read the Spark class path").trim().to_owned()
}

/// DuckDB's extension directory inside the venv.
pub fn duckdb_extensions() -> PathBuf {
    require(teststack().join("venv/duckdb_extensions"), "the DuckDB extensions")
}

/// A name no other test (or earlier run against the same server) uses.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() % 1_000_000);
    format!("{prefix}_{}_{t}_{n}", std::process::id())
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("bind an ephemeral port")
}

/// A base port such that `base..=base+span` are all free.
fn free_port_range(span: u16) -> u16 {
    // Each call starts elsewhere, so servers started at the same moment by
    // tests running in parallel do not pick the same range.
    static CALLS: AtomicU32 = AtomicU32::new(0);
    let call = CALLS.fetch_add(1, Ordering::Relaxed) as u16;
    let seed = (std::process::id() as u16).wrapping_add(call.wrapping_mul(4099));
    // Below the kernel's ephemeral ports (32768 and up, where every port-0
    // bind of a parallel test lands) and the demo test's (20000-29999): no
    // other test takes one of these between the check and the server's start.
    for attempt in 0..200u16 {
        let base = 10000 + (seed.wrapping_mul(7).wrapping_add(attempt.wrapping_mul(97)) % 9900);
        let all_free = (base..=base + span).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok());
        if all_free {
            return base;
        }
    }
    panic!("no free range of {span} ports found");
}

// === SeaweedFS ===

/// A running SeaweedFS (`weed mini`): S3 + Iceberg REST catalog.
#[derive(Debug)]
pub struct SeaweedFs {
    dir: tempfile::TempDir,
    name: String,
    base: u16,
    /// Everything `seaweedfs.sh` printed (`S3_ENDPOINT`, `CATALOG_URI`, ...).
    pub endpoints: HashMap<String, String>,
}

impl SeaweedFs {
    /// Starts a new instance (blocking, ~2 s).
    pub fn start(name: &str) -> Self {
        Self::start_with_warehouse(name, "warehouse")
    }

    /// Starts a new instance whose table bucket (warehouse) is `warehouse`.
    pub fn start_with_warehouse(name: &str, warehouse: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let base = free_port_range(16);
        let endpoints =
            seaweed_script(&["start", name, &dir.path().display().to_string(), &base.to_string()], warehouse);
        Self { dir, name: name.to_owned(), base, endpoints }
    }

    /// Stops the server (its data stays).
    pub fn stop(&self) {
        seaweed_script(&["stop", &self.dir.path().display().to_string()], self.warehouse());
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&self) {
        let dir = self.dir.path().display().to_string();
        seaweed_script(&["start", &self.name, &dir, &self.base.to_string()], self.warehouse());
    }

    /// The instance shared by all tests of this binary.
    pub fn shared() -> &'static SeaweedFs {
        static SHARED: OnceLock<SeaweedFs> = OnceLock::new();
        SHARED.get_or_init(|| SeaweedFs::start("e2e"))
    }

    /// A second shared instance (warehouse `replica`), the replica catalog of
    /// replication tests.
    pub fn shared_replica() -> &'static SeaweedFs {
        static SHARED: OnceLock<SeaweedFs> = OnceLock::new();
        SHARED.get_or_init(|| SeaweedFs::start_with_warehouse("e2e-replica", "replica"))
    }

    /// An icerelay `auth` inline table that signs with SigV4, as for S3 Tables
    /// (`secret` replaces the real secret key when given).
    pub fn sigv4_auth_toml(&self, secret: Option<&str>) -> String {
        format!(
            "{{ type = \"sigv4\", service = \"s3tables\", region = \"us-east-1\", access_key_id = \"{}\", secret_access_key = \"{}\" }}",
            self.get("ACCESS_KEY"),
            secret.unwrap_or(self.get("SECRET_KEY"))
        )
    }

    /// The keys of this instance (access key id, secret).
    pub fn keys(&self) -> (&str, &str) {
        (self.get("ACCESS_KEY"), self.get("SECRET_KEY"))
    }

    /// An icerelay `auth` inline table for this instance's catalog.
    pub fn auth_toml(&self) -> String {
        format!(
            "{{ type = \"oauth2\", client_id = \"{}\", client_secret = \"{}\" }}",
            self.get("ACCESS_KEY"),
            self.get("SECRET_KEY")
        )
    }

    fn get(&self, key: &str) -> &str {
        self.endpoints.get(key).map_or("", String::as_str)
    }

    /// The catalog's base URI.
    pub fn catalog_uri(&self) -> &str {
        self.get("CATALOG_URI")
    }

    /// The S3 endpoint.
    pub fn s3_endpoint(&self) -> &str {
        self.get("S3_ENDPOINT")
    }

    /// The warehouse (table bucket) name.
    pub fn warehouse(&self) -> &str {
        self.get("WAREHOUSE")
    }

    /// Connection settings for the client scripts, for a catalog at `uri`
    /// (the catalog itself or icerelay in front of it).
    pub fn client_conn(&self, uri: &str) -> Value {
        json!({
            "uri": uri.trim_end_matches('/'),
            "warehouse": self.warehouse(),
            "credential": format!("{}:{}", self.get("ACCESS_KEY"), self.get("SECRET_KEY")),
            "s3": {"endpoint": self.s3_endpoint(), "access_key_id": self.get("ACCESS_KEY"),
                   "secret_access_key": self.get("SECRET_KEY"), "region": "us-east-1"},
        })
    }

    /// The OAuth2 client secret (also the S3 secret key).
    pub fn secret(&self) -> &str {
        self.get("SECRET_KEY")
    }

    /// S3 settings for the client scripts.
    pub fn s3_json(&self) -> Value {
        json!({"endpoint": self.s3_endpoint(), "access_key_id": self.get("ACCESS_KEY"),
               "secret_access_key": self.get("SECRET_KEY"), "region": "us-east-1"})
    }

    /// An icerelay `[[storage]]` section for this instance's warehouse bucket.
    pub fn storage_toml(&self) -> String {
        format!(
            "[[storage]]\nprefix = \"s3://{}/\"\nendpoint = \"{}\"\npath_style = true\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
            self.warehouse(),
            self.s3_endpoint(),
            self.get("ACCESS_KEY"),
            self.get("SECRET_KEY")
        )
    }
}

fn seaweed_script(args: &[&str], warehouse: &str) -> HashMap<String, String> {
    let output = Command::new(repo_root().join("scripts/teststack/seaweedfs.sh"))
        .args(args)
        .env("ICERELAY_TESTSTACK", teststack())
        .env("WAREHOUSE", warehouse)
        .env("WATCH_PID", std::process::id().to_string())
        // On two busy cores (tests, catalogs and clients in parallel) a start
        // has been seen to take over a minute.
        .env("STARTUP_TIMEOUT", "180")
        .stderr(Stdio::inherit())
        .output()
        .expect("run seaweedfs.sh");
    assert!(output.status.success(), "seaweedfs.sh {} failed (see stderr above)", args[0]);
    parse_env(&String::from_utf8_lossy(&output.stdout))
}

/// Runs `scripts/teststack/<script>` with `args` (its servers stop when
/// this process does); the endpoints it prints.
fn teststack_script(script: &str, args: &[&str]) -> HashMap<String, String> {
    let output = Command::new(repo_root().join("scripts/teststack").join(script))
        .args(args)
        .env("ICERELAY_TESTSTACK", teststack())
        .env("WATCH_PID", std::process::id().to_string())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    assert!(output.status.success(), "{script} {args:?} failed (see stderr above)");
    parse_env(&String::from_utf8_lossy(&output.stdout))
}

fn parse_env(text: &str) -> HashMap<String, String> {
    text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())).collect()
}

// === rustberg ===

/// A running rustberg 0.3.0 (Iceberg REST catalog with a `file://` warehouse, no auth).
#[derive(Debug)]
pub struct Rustberg {
    _dir: tempfile::TempDir,
    /// The catalog's base URI.
    pub uri: String,
    /// The warehouse, `file:///.../wh` (pass verbatim as `?warehouse=`).
    pub warehouse: String,
}

impl Rustberg {
    /// Starts a new instance.
    pub fn start(name: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        // Below the ephemeral range, where Spark's JVMs bind ports by the dozen.
        let port = free_port_range(0);
        let endpoints =
            teststack_script("rustberg.sh", &["start", name, &dir.path().display().to_string(), &port.to_string()]);
        Self { _dir: dir, uri: endpoints["CATALOG_URI"].clone(), warehouse: endpoints["WAREHOUSE"].clone() }
    }

    /// The instance shared by all tests of this binary.
    pub fn shared() -> &'static Rustberg {
        static SHARED: OnceLock<Rustberg> = OnceLock::new();
        SHARED.get_or_init(|| Rustberg::start("e2e-rustberg"))
    }

    /// Connection settings for the client scripts.
    pub fn client_conn(&self) -> Value {
        json!({"uri": self.uri, "warehouse": self.warehouse})
    }

    /// The local directory of the warehouse.
    pub fn warehouse_dir(&self) -> PathBuf {
        PathBuf::from(self.warehouse.trim_start_matches("file://"))
    }

    /// The `[[storage]]` section that lets icerelay read and write the warehouse.
    pub fn storage_toml(&self) -> String {
        format!("[[storage]]\nprefix = \"{}/\"\n", self.warehouse)
    }
}

// === clients ===

/// An HTTP client for the tests' own calls that trusts the test CA too
/// (for `https://localhost` listeners).
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder().tls_certs_merge([tls::TestCa::shared().reqwest_root()]).build().expect("client")
}

/// Runs the `icerelay` binary to completion; returns (exit code, stdout, stderr).
pub async fn icerelay(args: Vec<String>) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let output = Command::new(env!("CARGO_BIN_EXE_icerelay")).args(&args).output().expect("run icerelay");
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    })
    .await
    .expect("icerelay task")
}

/// The longest a client script may run: a hung client (a Spark JVM, say)
/// fails its test instead of holding the whole run.
const PYTHON_DEADLINE: Duration = Duration::from_secs(600);

/// Runs `tests/clients/<script>` with `args` and parses its JSON output.
pub async fn python(script: &str, args: Vec<String>) -> Value {
    let script = repo_root().join("tests/clients").join(script);
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut child = Command::new(python_bin())
            .arg(&script)
            .args(&args)
            .current_dir(script.parent().unwrap_or(Path::new(".")))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run python");
        let (stdout, stderr) = (drain(child.stdout.take()), drain(child.stderr.take()));
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for python") {
                break status;
            }
            if started.elapsed() > PYTHON_DEADLINE {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
                panic!("{} did not finish in {PYTHON_DEADLINE:?}; killed:\n{stderr}", script.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let output = std::process::Output {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        };
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{} failed after {:?}:\n{stderr}", script.display(), started.elapsed());
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!("{} printed no JSON ({e}): {}\n{stderr}", script.display(), String::from_utf8_lossy(&output.stdout))
        })
    })
    .await
    .expect("python task")
}

/// An axum app served on a loopback port for as long as this is kept (the
/// stand-in upstreams and catalogs of the tests).
pub struct Served {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `app` on an ephemeral loopback port.
pub async fn serve(app: axum::Router) -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a stand-in");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Served { url, task }
}

/// An upstream's answer to a request a stand-in forwarded.
pub struct Answer {
    /// Its status.
    pub status: axum::http::StatusCode,
    /// Its `content-type`, if any.
    pub content_type: Option<axum::http::HeaderValue>,
    /// Its body.
    pub body: axum::body::Bytes,
}

impl axum::response::IntoResponse for Answer {
    fn into_response(self) -> axum::response::Response {
        let mut response = (self.status, self.body).into_response();
        if let Some(kind) = self.content_type {
            response.headers_mut().insert("content-type", kind);
        }
        response
    }
}

/// The real catalog behind a stand-in (see [`stand_in`]).
#[derive(Clone)]
pub struct Upstream {
    /// A client for it.
    pub http: reqwest::Client,
    /// Its base URI.
    pub uri: String,
}

impl Upstream {
    /// Its answer to a request as the stand-in received it (see [`forward`]).
    pub async fn forward(&self, parts: &axum::http::request::Parts, body: axum::body::Body) -> Answer {
        forward(&self.http, &self.uri, parts, body).await
    }
}

/// Serves a stand-in in front of the catalog at `uri`: every request goes to
/// `handle`, which answers it itself or forwards it to the [`Upstream`].
pub async fn stand_in<F, Fut>(uri: &str, handle: F) -> Served
where
    F: Fn(Upstream, axum::http::request::Parts, axum::body::Body) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = axum::response::Response> + Send + 'static,
{
    let upstream = Upstream { http: reqwest::Client::new(), uri: uri.to_owned() };
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let (upstream, handle) = (upstream.clone(), handle.clone());
        async move {
            let (parts, body) = request.into_parts();
            handle(upstream, parts, body).await
        }
    });
    serve(app).await
}

/// Forwards a stand-in's request to `upstream` (a catalog's base URI) as it
/// came: method, path and query, body and content type. An upstream that
/// cannot be reached answers 502.
async fn forward(
    http: &reqwest::Client,
    upstream: &str,
    parts: &axum::http::request::Parts,
    body: axum::body::Body,
) -> Answer {
    let body = http_body_util::BodyExt::collect(body).await.map(|b| b.to_bytes()).unwrap_or_default();
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut forwarded =
        http.request(parts.method.clone(), format!("{}{target}", upstream.trim_end_matches('/'))).body(body);
    if let Some(kind) = parts.headers.get("content-type") {
        forwarded = forwarded.header("content-type", kind);
    }
    match forwarded.send().await {
        Ok(answer) => Answer {
            status: answer.status(),
            content_type: answer.headers().get("content-type").cloned(),
            body: answer.bytes().await.unwrap_or_default(),
        },
        Err(e) => {
            Answer { status: axum::http::StatusCode::BAD_GATEWAY, content_type: None, body: e.to_string().into() }
        }
    }
}

/// Reads a child's pipe to its end on a thread of its own (a full pipe
/// would stall the child).
fn drain<R: std::io::Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}

// === icerelay in-process ===

/// icerelay running inside the test process; stops when dropped.
pub struct Relay {
    /// `http://127.0.0.1:PORT` of the proxy.
    pub url: String,
    /// `http://127.0.0.1:PORT` of the admin listener.
    pub admin_url: String,
    stop: Option<oneshot::Sender<()>>,
}

impl Relay {
    /// Starts icerelay with `toml` (listen addresses default to ephemeral ports).
    pub async fn start(toml: &str) -> Self {
        Self::start_config(relay_config(toml)).await
    }

    /// Starts icerelay with a validated configuration.
    pub async fn start_config(config: Config) -> Self {
        let server = Server::bind(config).await.expect("bind icerelay");
        let url = format!("http://{}", server.proxy_addr());
        let admin_url = format!("http://{}", server.admin_addr());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            if let Err(e) = server
                .run(async move {
                    let _ = stopped.await;
                })
                .await
            {
                eprintln!("icerelay stopped with an error: {e}");
            }
        });
        Self { url, admin_url, stop: Some(stop) }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Parses and validates a test configuration, with ephemeral listen ports
/// unless the text sets them.
pub fn relay_config(toml: &str) -> Config {
    let mut text = String::new();
    if !toml.contains("listen =") {
        text.push_str("listen = \"127.0.0.1:0\"\n");
    }
    if !toml.contains("admin_listen") {
        text.push_str("admin_listen = \"127.0.0.1:0\"\n");
    }
    text.push_str(toml);
    let raw = config::parse(&text, &MapEnv::default()).unwrap_or_else(|e| panic!("test config: {e}"));
    config::validate(raw).unwrap_or_else(|e| panic!("test config: {e}"))
}

// === icerelay as a process ===

/// The real `icerelay` binary, with stdout and stderr captured to a file.
pub struct RelayProcess {
    child: Child,
    /// Proxy URL.
    pub url: String,
    /// Admin URL.
    pub admin_url: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl RelayProcess {
    /// Runs `icerelay <args>` plus `--listen`/`--admin-listen` on free ports,
    /// with `env` added, and waits until `/healthz` answers.
    pub async fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_with_ulimit(args, env, None).await
    }

    /// Like [`RelayProcess::start`], with `ulimit <flags>` applied first
    /// (`-Sn 1024`: the common soft default; `-n 256`: soft and hard).
    pub async fn start_with_ulimit(args: &[&str], env: &[(&str, &str)], ulimit: Option<&str>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("icerelay.log");
        let listen: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let file = std::fs::File::create(&log).expect("log file");
        let mut command = match ulimit {
            None => Command::new(env!("CARGO_BIN_EXE_icerelay")),
            Some(flags) => {
                let mut sh = Command::new("sh");
                sh.args(["-c", &format!("ulimit {flags} && exec \"$0\" \"$@\""), env!("CARGO_BIN_EXE_icerelay")]);
                sh
            }
        };
        // Hermetic AWS: no keys from the test's own environment, and never the
        // instance metadata endpoint (not a loopback address).
        for inherited in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"] {
            command.env_remove(inherited);
        }
        command.env("AWS_EC2_METADATA_DISABLED", "true");
        let child = command
            .args(args)
            .args(["--listen", &listen.to_string(), "--admin-listen", &admin.to_string()])
            .envs(env.iter().copied())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("start icerelay");
        let process =
            Self { child, url: format!("http://{listen}"), admin_url: format!("http://{admin}"), log, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        let http = reqwest::Client::new();
        loop {
            if http.get(format!("{}/healthz", process.admin_url)).send().await.is_ok() {
                return process;
            }
            assert!(Instant::now() < deadline, "icerelay did not start:\n{}", process.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process has written so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the process with SIGKILL (no chance to clean up) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return self.child.wait().expect("wait");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a metric's value from Prometheus text, summing every series whose
/// labels contain all of `labels` (`key="value"` strings).
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' ')))
        .filter(|l| labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
