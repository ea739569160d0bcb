//! Passthrough overhead: `loadTable` through icerelay, versus directly, versus
//! nginx as a plain reverse proxy, against the same upstream in the same run.
//!
//! Two upstreams: SeaweedFS's real Iceberg REST catalog (upstream-bound), and
//! a static server answering a real loadTable response captured from it (so
//! the proxies' own cost dominates). Load comes from `wrk` with 64
//! connections; each target runs `--rounds` times in turn and the median
//! round is reported. On a small machine the load generator, the proxy and
//! the upstream share the CPU, which is the point: a proxy that costs less
//! CPU leaves more for the rest.
//!
//! Needs the test stack (`scripts/setup-test-env.sh`) and Debian's
//! `nginx-light` and `wrk`. Run: `cargo bench --bench proxy [-- --duration 10 --rounds 3]`.
//! `--baseline PATH` adds another icerelay binary (an earlier build, say) as
//! a target, so a change is measured against what it changed in one run.

#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn main() {
    let Some(args) = support::BenchArgs::from_env("proxy") else { return };
    let flag = |flag: &str, default: u64| args.get(flag, default);
    let duration = flag("--duration", 10);
    let rounds = flag("--rounds", 3);
    let connections = flag("--connections", 64);
    // `--only static` or `--only seaweedfs` runs one upstream.
    let only = args.text("--only").map(str::to_owned);
    let baseline = args.text("--baseline").map(str::to_owned);
    for tool in ["nginx", "wrk"] {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().map(|o| o.status.success());
        assert!(found.unwrap_or(false), "{tool} is required: apt-get install nginx-light wrk");
    }

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let teststack = std::env::var_os("ICERELAY_TESTSTACK").map_or_else(|| root.join(".teststack"), PathBuf::from);
    let work = tempfile::tempdir().expect("temp dir");

    // SeaweedFS with one table of a few snapshots.
    let seaweed_dir = work.path().join("seaweedfs");
    let base = free_port_range(16);
    let out = Command::new(root.join("scripts/teststack/seaweedfs.sh"))
        .args(["start", "bench", &seaweed_dir.display().to_string(), &base.to_string()])
        .env("ICERELAY_TESTSTACK", &teststack)
        .env("WATCH_PID", std::process::id().to_string())
        .stderr(Stdio::inherit())
        .output()
        .expect("seaweedfs.sh");
    assert!(out.status.success(), "SeaweedFS did not start");
    let endpoints: HashMap<String, String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let catalog = endpoints["CATALOG_URI"].clone();
    let conn = format!(
        r#"{{"uri":"{catalog}","warehouse":"warehouse","credential":"admin:adminsecret","s3":{{"endpoint":"{}","access_key_id":"admin","secret_access_key":"adminsecret"}}}}"#,
        endpoints["S3_ENDPOINT"]
    );
    let made = Command::new(teststack.join("venv/bin/python"))
        .arg(root.join("tests/clients/make_table.py"))
        .args([&conn, "bench", "events", "5"])
        .current_dir(root.join("tests/clients"))
        .output()
        .expect("make_table.py");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let token = oauth_token(&catalog);
    let path = "/v1/warehouse/namespaces/bench/tables/events";
    let body = curl_body(&format!("{catalog}{path}"), &token);
    eprintln!("loadTable answer: {} bytes", body.len());

    // The static upstream: the same answer, from a single-threaded server.
    let static_port = free_port();
    let static_body = body.clone();
    std::thread::spawn(move || support::serve_static(static_port, static_body));
    let static_url = format!("http://127.0.0.1:{static_port}");

    let mut report = String::new();
    let upstreams = [
        ("static", "static loadTable answer", static_url.as_str()),
        ("seaweedfs", "SeaweedFS catalog", catalog.as_str()),
    ];
    for (_, name, upstream) in upstreams.into_iter().filter(|(key, _, _)| only.as_deref().is_none_or(|o| o == *key)) {
        let relay = Icerelay::start(upstream, &[]);
        let earlier = baseline.as_deref().map(|binary| Icerelay::start_binary(binary, upstream, &[]));
        // engine_auth = "sigv4": the engine's token is dropped and every
        // request signed again (SeaweedFS verifies the signature).
        let signing = Icerelay::start(
            upstream,
            &[
                ("ICERELAY__PRIMARY__ENGINE_AUTH", "sigv4"),
                (
                    "ICERELAY__PRIMARY__AUTH",
                    r#"{ type = "sigv4", service = "s3tables", region = "us-east-1", access_key_id = "admin", secret_access_key = "adminsecret" }"#,
                ),
            ],
        );
        // TLS on the listener (wrk does not verify the certificate; the
        // handshake happens once per keep-alive connection).
        let (cert_file, key_file) = self_signed(work.path());
        let tls = Icerelay::start(
            upstream,
            &[("ICERELAY__TLS_CERT_FILE", cert_file.as_str()), ("ICERELAY__TLS_KEY_FILE", key_file.as_str())],
        );
        let tls_url = tls.url.replace("http://", "https://");
        let nginx = Nginx::start(upstream, &work.path().join(format!("nginx-{}", free_port())));
        let mut targets = vec![
            ("direct", upstream.to_owned(), Vec::new()),
            ("icerelay", relay.url.clone(), vec![relay.child.id()]),
            ("icerelay sigv4", signing.url.clone(), vec![signing.child.id()]),
            ("icerelay tls", tls_url, vec![tls.child.id()]),
            ("nginx", nginx.url.clone(), with_children(nginx.child.id())),
        ];
        if let Some(earlier) = &earlier {
            targets.insert(2, ("icerelay baseline", earlier.url.clone(), vec![earlier.child.id()]));
        }
        // Warm every path (connection pools, caches) before measuring.
        for (_, url, _) in &targets {
            wrk(&format!("{url}{path}"), &token, 2, connections);
        }
        let mut results: HashMap<&str, Vec<WrkResult>> = HashMap::new();
        for round in 0..rounds {
            for (target, url, pids) in &targets {
                let r = measure(&format!("{url}{path}"), &token, duration, connections, pids, None);
                eprintln!("[{name}] round {round} {target}: {r:?}");
                results.entry(target).or_default().push(r);
            }
        }
        let order: Vec<&str> = targets.iter().map(|(t, _, _)| *t).collect();
        report.push_str(&table(name, &order, &results));
        drop(nginx);
        drop(earlier);
        drop(signing);
        drop(relay);
    }
    // The commit path, on the static upstream: an updateTable POST through
    // icerelay with the read-only check (one loadTable first) and without.
    if only.as_deref().is_none_or(|o| o == "static") {
        let script = work.path().join("commit.lua");
        std::fs::write(
            &script,
            "wrk.method = \"POST\"\nwrk.body = '{\"requirements\":[],\"updates\":[]}'\n\
             wrk.headers[\"Content-Type\"] = \"application/json\"\n",
        )
        .expect("write commit.lua");
        let script = script.display().to_string();
        let checked = Icerelay::start(&static_url, &[]);
        let unchecked = Icerelay::start(&static_url, &[("ICERELAY__READ_ONLY_REPLICAS", "false")]);
        let targets = [
            ("direct", static_url.clone(), Vec::new()),
            ("icerelay, read_only_replicas = false", unchecked.url.clone(), vec![unchecked.child.id()]),
            ("icerelay (read-only check)", checked.url.clone(), vec![checked.child.id()]),
        ];
        for (_, url, _) in &targets {
            wrk_with(&format!("{url}{path}"), &token, 2, connections, Some(&script));
        }
        let mut results: HashMap<&str, Vec<WrkResult>> = HashMap::new();
        for round in 0..rounds {
            for (target, url, pids) in &targets {
                let r = measure(&format!("{url}{path}"), &token, duration, connections, pids, Some(&script));
                eprintln!("[commit] round {round} {target}: {r:?}");
                results.entry(target).or_default().push(r);
            }
        }
        let order: Vec<&str> = targets.iter().map(|(t, _, _)| *t).collect();
        report.push_str(&table("updateTable (POST) on the static upstream", &order, &results));
    }
    let _ = Command::new(root.join("scripts/teststack/seaweedfs.sh"))
        .args(["stop", &seaweed_dir.display().to_string()])
        .status();
    println!(
        "## Passthrough overhead (loadTable, {connections} connections, {duration} s x {rounds} rounds, median round)\n{report}"
    );
}

#[derive(Debug, Clone, Copy)]
struct WrkResult {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// CPU time (user + system) the proxy spent per request; NaN for direct.
    cpu_us: f64,
}

/// The round with the median throughput.
fn median(results: &[WrkResult]) -> WrkResult {
    let mut sorted = results.to_vec();
    sorted.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    sorted[sorted.len() / 2]
}

/// One section of the report: the median round of each target, against `direct`.
fn table(title: &str, targets: &[&str], results: &HashMap<&str, Vec<WrkResult>>) -> String {
    let direct = median(&results["direct"]);
    let mut out = format!(
        "\n### {title}\n\n| target | requests/s | p50 | p99 | throughput vs direct | p50 added | proxy CPU per request |\n|---|---:|---:|---:|---:|---:|---:|\n"
    );
    for target in targets {
        let m = median(&results[target]);
        let cpu = if m.cpu_us.is_nan() { "-".to_owned() } else { format!("{:.1} µs", m.cpu_us) };
        out.push_str(&format!(
            "| {target} | {:.0} | {:.2} ms | {:.2} ms | {:.2}x | {:+.2} ms | {cpu} |\n",
            m.rps,
            m.p50_ms,
            m.p99_ms,
            m.rps / direct.rps,
            m.p50_ms - direct.p50_ms
        ));
    }
    out
}

fn wrk(url: &str, token: &str, seconds: u64, connections: u64) -> WrkResult {
    wrk_with(url, token, seconds, connections, None)
}

/// wrk, with a Lua `script` (method, body) when given.
fn wrk_with(url: &str, token: &str, seconds: u64, connections: u64, script: Option<&str>) -> WrkResult {
    let mut command = Command::new("wrk");
    command.args(["-t2", &format!("-c{connections}"), &format!("-d{seconds}s"), "--latency", "-H"]);
    command.arg(format!("Authorization: Bearer {token}"));
    if let Some(script) = script {
        command.args(["-s", script]);
    }
    let out = command.arg(url).output().expect("wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("Non-2xx"), "errors from {url}:\n{text}");
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in wrk output:\n{text}"));
    let percentile = |p: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(p).map(|v| parse_latency(v.trim())))
            .unwrap_or_else(|| panic!("no {p} latency in wrk output:\n{text}"))
    };
    let requests = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in ").and_then(|(n, _)| n.trim().parse::<f64>().ok()))
        .unwrap_or(f64::NAN);
    WrkResult { rps, p50_ms: percentile("50%"), p99_ms: percentile("99%"), cpu_us: requests }
}

/// CPU seconds (user + system) used so far by `pids`.
fn cpu_seconds(pids: &[u32]) -> f64 {
    // Fields 14 and 15 of /proc/PID/stat are utime and stime in clock ticks (100 per second).
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            Some(fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?)
        })
        .sum::<f64>()
        / 100.0
}

/// `pid` and its direct children (nginx's workers).
fn with_children(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let parent = std::fs::read_to_string(format!("/proc/{child}/stat")).ok().and_then(|s| {
                s.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
            });
            if parent == Some(pid) {
                pids.push(child);
            }
        }
    }
    pids
}

/// Runs wrk against a proxy and charges it the CPU its processes used.
fn measure(
    url: &str,
    token: &str,
    seconds: u64,
    connections: u64,
    proxy_pids: &[u32],
    script: Option<&str>,
) -> WrkResult {
    let before = cpu_seconds(proxy_pids);
    let mut r = wrk_with(url, token, seconds, connections, script);
    let used = cpu_seconds(proxy_pids) - before;
    r.cpu_us = if proxy_pids.is_empty() { f64::NAN } else { used * 1e6 / r.cpu_us };
    r
}

/// wrk prints `123.45us`, `1.23ms` or `1.02s`.
fn parse_latency(v: &str) -> f64 {
    let (number, factor) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        (v, 1.0)
    };
    number.parse::<f64>().unwrap_or(f64::NAN) * factor
}

fn oauth_token(catalog: &str) -> String {
    let out = Command::new("curl")
        .args(["-s", "-X", "POST", &format!("{catalog}/v1/oauth/tokens"), "-d", "grant_type=client_credentials"])
        .args(["-d", "client_id=admin", "-d", "client_secret=adminsecret"])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&text).expect("token json");
    v["access_token"].as_str().expect("access_token").to_owned()
}

/// A self-signed certificate for 127.0.0.1, as PEM files in `dir`.
fn self_signed(dir: &Path) -> (String, String) {
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("certificate");
    let (cert, key) = (dir.join("bench.crt"), dir.join("bench.key"));
    std::fs::write(&cert, made.cert.pem()).expect("write certificate");
    std::fs::write(&key, made.signing_key.serialize_pem()).expect("write key");
    (cert.display().to_string(), key.display().to_string())
}

fn curl_body(url: &str, token: &str) -> Vec<u8> {
    let out = Command::new("curl")
        .args(["-sf", "-H", &format!("Authorization: Bearer {token}"), url])
        .output()
        .expect("curl");
    assert!(out.status.success(), "GET {url} failed");
    out.stdout
}

struct Icerelay {
    child: Child,
    url: String,
}

impl Icerelay {
    fn start(upstream: &str, env: &[(&str, &str)]) -> Self {
        Self::start_binary(env!("CARGO_BIN_EXE_icerelay"), upstream, env)
    }

    fn start_binary(binary: &str, upstream: &str, env: &[(&str, &str)]) -> Self {
        let port = free_port();
        let child = Command::new(binary)
            .args(["serve", "--upstream", upstream, "--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{}", free_port())])
            .envs(env.iter().copied())
            // The default log level, as users run it.
            .env_remove("RUST_LOG")
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start icerelay");
        wait_for_port(port);
        Self { child, url: format!("http://127.0.0.1:{port}") }
    }
}

impl Drop for Icerelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Nginx {
    child: Child,
    url: String,
}

impl Nginx {
    /// nginx as a plain reverse proxy: keep-alive upstream, no buffering, no logs.
    fn start(upstream: &str, dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("nginx dir");
        let port = free_port();
        let upstream_addr = upstream.trim_start_matches("http://");
        let d = dir.display();
        let conf = format!(
            "worker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\nevents {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
               upstream up {{ server {upstream_addr}; keepalive 128; }}\n\
               server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://up;\n\
                   proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_buffering off;\n\
                   proxy_request_buffering off;\n    }}\n  }}\n}}\n"
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let child = Command::new("nginx")
            .args(["-p", &d.to_string(), "-c", &conf_path.display().to_string(), "-g", "daemon off;"])
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nginx");
        wait_for_port(port);
        Self { child, url: format!("http://127.0.0.1:{port}") }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("ephemeral port")
}

fn free_port_range(span: u16) -> u16 {
    (0..200u16)
        .map(|i| 40000 + (std::process::id() as u16).wrapping_add(i.wrapping_mul(131)) % 20000)
        .find(|&b| (b..=b + span).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()))
        .expect("free port range")
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
