//! The real services benchmarks run against: SeaweedFS, PostgreSQL and
//! icerelay itself as processes on loopback, and what is read from them
//! (CPU time, resident memory). Not every benchmark uses all of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn pct(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    pct_sorted(&sorted, p)
}

pub fn pct_sorted(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// A SeaweedFS (S3 + Iceberg REST catalog) started by `scripts/teststack/seaweedfs.sh`.
pub struct Seaweed {
    dir: PathBuf,
    endpoints: Vec<(String, String)>,
}

impl Seaweed {
    pub fn start(root: &Path, teststack: &Path, dir: &Path, warehouse: &str) -> Self {
        let base = free_port_range(16);
        let out = Command::new(root.join("scripts/teststack/seaweedfs.sh"))
            .args(["start", warehouse, &dir.display().to_string(), &base.to_string()])
            .env("ICERELAY_TESTSTACK", teststack)
            .env("WAREHOUSE", warehouse)
            .env("WATCH_PID", std::process::id().to_string())
            .stderr(Stdio::inherit())
            .output()
            .expect("seaweedfs.sh");
        assert!(out.status.success(), "SeaweedFS did not start");
        let endpoints = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Self { dir: dir.to_owned(), endpoints }
    }

    /// An OAuth2 token for its catalog (client credentials admin/adminsecret).
    pub async fn token(&self) -> String {
        let answer: serde_json::Value = reqwest::Client::new()
            .post(format!("{}/v1/oauth/tokens", self.get("CATALOG_URI")))
            .form(&[("grant_type", "client_credentials"), ("client_id", "admin"), ("client_secret", "adminsecret")])
            .send()
            .await
            .expect("token")
            .json()
            .await
            .expect("token json");
        answer["access_token"].as_str().expect("access_token").to_owned()
    }

    /// Its `[[storage]]` entry in an icerelay configuration.
    pub fn storage_toml(&self) -> String {
        format!(
            "[[storage]]\nprefix = \"s3://{}/\"\nendpoint = \"{}\"\npath_style = true\naccess_key_id = \"admin\"\nsecret_access_key = \"adminsecret\"\n",
            self.get("WAREHOUSE"),
            self.get("S3_ENDPOINT")
        )
    }

    pub fn get(&self, key: &str) -> String {
        self.endpoints.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).unwrap_or_default()
    }

    pub fn stop(&self, root: &Path, teststack: &Path) {
        let _ = Command::new(root.join("scripts/teststack/seaweedfs.sh"))
            .args(["stop", &self.dir.display().to_string()])
            .env("ICERELAY_TESTSTACK", teststack)
            .status();
    }
}

/// The icerelay binary; proxy at `url`, admin API at `admin_url`.
pub struct Icerelay {
    child: Child,
    pub url: String,
    pub admin_url: String,
}

impl Icerelay {
    pub fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let port = free_port_range(0);
        let child = Command::new(env!("CARGO_BIN_EXE_icerelay"))
            .args(args)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--admin-listen", &format!("127.0.0.1:{}", port + 1)])
            .envs(env.iter().copied())
            .env_remove("RUST_LOG")
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start icerelay");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "icerelay did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, url: format!("http://127.0.0.1:{port}"), admin_url: format!("http://127.0.0.1:{}", port + 1) }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Icerelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A base port such that `base..=base+span+1` are all free.
pub fn free_port_range(span: u16) -> u16 {
    static CALLS: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let seed = (std::process::id() as u16).wrapping_add(call.wrapping_mul(4099));
    (0..500u16)
        .map(|i| 20_000 + (seed.wrapping_add(i.wrapping_mul(97)) % 40_000))
        .find(|base| (*base..=base + span + 1).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()))
        .expect("a free port range")
}

/// CPU time (user + system) a process has used so far.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after its `)`.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name; 100 ticks a second.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// Resident memory of a process, in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmRSS:")
}

/// The most resident memory a process has had so far (the kernel's high-water mark), in MiB.
#[allow(dead_code)]
pub fn peak_rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmHWM:")
}

/// A memory figure of `/proc/PID/status` (`key` with its colon), in MiB; NaN when unreadable.
fn status_mib(pid: u32, key: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// A throwaway PostgreSQL cluster (`scripts/teststack/postgres.sh`).
pub struct Postgres {
    dir: tempfile::TempDir,
    pub url: String,
}

impl Postgres {
    pub fn start(root: &Path) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port_range(0);
        let out = Command::new(root.join("scripts/teststack/postgres.sh"))
            .args(["start", &dir.path().join("pg").display().to_string(), &port.to_string()])
            .env("WATCH_PID", std::process::id().to_string())
            .stderr(Stdio::inherit())
            .output()
            .expect("postgres.sh");
        assert!(out.status.success(), "PostgreSQL did not start");
        let url = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("PG_URL="))
            .expect("PG_URL")
            .to_owned();
        Self { dir, url }
    }
}
