//! A throwaway PostgreSQL cluster for the shared-state tests, started through
//! `scripts/teststack/postgres.sh` (Debian's `postgresql` package, no
//! container) with a watchdog on this process. Tests share one cluster and
//! keep apart by schema.

use std::process::{Command, Stdio};
use std::sync::OnceLock;

use super::{free_port_range, parse_env, repo_root};

/// The password of the test cluster's `icerelay` role: tests check that it
/// never shows in icerelay's logs, errors or status.
pub const PASSWORD: &str = "pg-secret-5521";

/// A running cluster.
#[derive(Debug)]
pub struct Postgres {
    dir: tempfile::TempDir,
    port: u16,
    /// `postgres://icerelay:<password>@127.0.0.1:<port>/postgres`.
    pub url: String,
}

impl Postgres {
    /// Starts a new cluster (blocking, ~2 s).
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port_range(0);
        let env = script(&["start", &dir.path().join("pg").display().to_string(), &port.to_string()]);
        let url = env.get("PG_URL").cloned().expect("postgres.sh prints PG_URL");
        Self { dir, port, url }
    }

    /// The cluster shared by the tests of this binary.
    pub fn shared() -> &'static Postgres {
        static SHARED: OnceLock<Postgres> = OnceLock::new();
        SHARED.get_or_init(Postgres::start)
    }

    /// Stops the server at once (its data stays).
    pub fn stop(&self) {
        script(&["stop", &self.data_dir().display().to_string()]);
    }

    /// Starts it again on the same port and data.
    pub fn restart(&self) {
        script(&["start", &self.data_dir().display().to_string(), &self.port.to_string()]);
    }

    fn data_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("pg")
    }

    /// A connection for inspecting what icerelay stored.
    pub async fn connect(&self) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(&self.url, tokio_postgres::NoTls).await.expect("connect to postgres");
        tokio::spawn(connection);
        client
    }
}

fn script(args: &[&str]) -> std::collections::HashMap<String, String> {
    let output = Command::new(repo_root().join("scripts/teststack/postgres.sh"))
        .args(args)
        .env("PG_PASSWORD", PASSWORD)
        .env("WATCH_PID", std::process::id().to_string())
        .stderr(Stdio::inherit())
        .output()
        .expect("run postgres.sh");
    assert!(output.status.success(), "postgres.sh {} failed (see stderr above)", args[0]);
    parse_env(&String::from_utf8_lossy(&output.stdout))
}
