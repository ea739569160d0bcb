//! Apache Iceberg's own Java catalog logic as a local REST catalog
//! (`scripts/teststack/java_rest.sh`): the validation most production
//! catalogs (Polaris, Nessie, Gravitino) inherit from Java's `TableMetadata`,
//! which is stricter than SeaweedFS's or rustberg's in places.

use std::process::{Command, Stdio};
use std::sync::OnceLock;

use serde_json::{Value, json};

use super::{free_port_range, parse_env, repo_root, teststack};

/// A running Java REST catalog with a local `file://` warehouse.
pub struct JavaRest {
    dir: tempfile::TempDir,
    name: String,
    port: u16,
    /// The catalog's base URI.
    pub uri: String,
    /// The warehouse, `file:///.../wh`.
    pub warehouse: String,
}

impl JavaRest {
    /// Starts a new instance (about 2 s: a JVM).
    pub fn start(name: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port_range(0);
        let endpoints = java_rest(&["start", name, &dir.path().display().to_string(), &port.to_string()]);
        Self {
            dir,
            name: name.to_owned(),
            port,
            uri: endpoints["CATALOG_URI"].clone(),
            warehouse: endpoints["WAREHOUSE"].clone(),
        }
    }

    /// Stops it (an outage); its tables and files stay.
    pub fn stop(&self) {
        java_rest(&["stop", &self.dir.path().display().to_string()]);
    }

    /// Starts it again on the same port, catalog and warehouse.
    pub fn restart(&self) {
        java_rest(&["start", &self.name, &self.dir.path().display().to_string(), &self.port.to_string()]);
    }

    /// The instance shared by all tests of this binary.
    pub fn shared() -> &'static JavaRest {
        static SHARED: OnceLock<JavaRest> = OnceLock::new();
        SHARED.get_or_init(|| JavaRest::start("e2e-java-rest"))
    }

    /// Connection settings for the client scripts.
    pub fn client_conn(&self) -> Value {
        json!({"uri": self.uri, "warehouse": self.warehouse})
    }

    /// The `[[storage]]` section that lets icerelay read and write the warehouse.
    pub fn storage_toml(&self) -> String {
        format!("[[storage]]\nprefix = \"{}/\"\n", self.warehouse)
    }
}

/// Runs `java_rest.sh` with `args`; the endpoints it prints.
fn java_rest(args: &[&str]) -> std::collections::HashMap<String, String> {
    let output = Command::new(repo_root().join("scripts/teststack/java_rest.sh"))
        .args(args)
        .env("ICERELAY_TESTSTACK", teststack())
        .env("WATCH_PID", std::process::id().to_string())
        .stderr(Stdio::inherit())
        .output()
        .expect("run java_rest.sh");
    assert!(output.status.success(), "java_rest.sh {args:?} failed (see stderr above)");
    parse_env(&String::from_utf8_lossy(&output.stdout))
}
