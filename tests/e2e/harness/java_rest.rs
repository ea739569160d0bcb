//! Apache Iceberg's own Java catalog logic as a local REST catalog
//! (`scripts/teststack/java_rest.sh`): the validation most production
//! catalogs (Polaris, Nessie, Gravitino) inherit from Java's `TableMetadata`,
//! which is stricter than SeaweedFS's or rustberg's in places.

use std::sync::OnceLock;

use serde_json::{Value, json};

use super::{free_port_range, teststack_script};

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
        let endpoints =
            teststack_script("java_rest.sh", &["start", name, &dir.path().display().to_string(), &port.to_string()]);
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
        teststack_script("java_rest.sh", &["stop", &self.dir.path().display().to_string()]);
    }

    /// Starts it again on the same port, catalog and warehouse.
    pub fn restart(&self) {
        teststack_script(
            "java_rest.sh",
            &["start", &self.name, &self.dir.path().display().to_string(), &self.port.to_string()],
        );
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
