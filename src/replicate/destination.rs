//! A replica catalog: icerelay's client for it, where its tables live, and
//! how its replicas are first made.
//!
//! Catalogs differ in what they accept (see the capability matrix in
//! README.md). The difference that decides the design is `registerTable`:
//! where it keeps a table's history (uuid, snapshots, schemas), a replica is
//! bootstrapped by writing a metadata.json with the whole retained history
//! and registering it; where it does not (SeaweedFS 4.48 answers 200 and then
//! loads an empty table), a replica can only be replayed from the source's
//! creation onwards, because every catalog refuses snapshots more than a
//! minute older than the table. In `auto` mode icerelay finds out once per
//! destination with a probe (register a throwaway table, load it back,
//! compare) and keeps the answer in the state store.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::OnceCell;

use super::error::ReplicateError;
use crate::catalog::{CatalogError, ClientSettings, Namespace, RestCatalog, TableIdent};
use crate::config::{BootstrapMode, DestinationConfig};
use crate::state::{StateStore, now_ms};
use crate::storage::Storage;
use crate::storage::vended::VendedCredentials;

/// Prefix of the capability probe's throwaway namespace. Each probe uses a
/// namespace of its own: two icerelay instances probing one catalog must not
/// drop a namespace the other is writing into (SeaweedFS then breaks it).
const PROBE_NAMESPACE: &str = "icerelay_probe";

/// How replica tables are first made on a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Bootstrap {
    /// Write the metadata with the full history, then registerTable.
    Register,
    /// createTable, then replay every snapshot.
    Create,
}

/// The multi-table commit endpoint, as catalogs advertise it.
const TRANSACTIONS_ENDPOINT: &str = "/v1/{prefix}/transactions/commit";

/// How the source's multi-table transactions reach a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MultiTableCommits {
    /// One `transactions/commit` per transaction.
    Atomic,
    /// Each table on its own, and why.
    TableByTable(String),
}

impl MultiTableCommits {
    /// Why tables are committed one by one, if they are.
    pub fn table_by_table(&self) -> Option<&str> {
        match self {
            Self::Atomic => None,
            Self::TableByTable(why) => Some(why),
        }
    }
}

impl std::fmt::Display for MultiTableCommits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Atomic => f.write_str("atomic"),
            Self::TableByTable(why) => write!(f, "table by table: {why}"),
        }
    }
}

/// What a destination can do, and how icerelay knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// How replica tables are first made.
    pub bootstrap: Bootstrap,
    /// Why: configured, or what the probe saw.
    pub reason: String,
}

impl Capabilities {
    /// The lane mode shown in the status API: how the replica is made, and
    /// that it follows by replay.
    pub fn mode(&self) -> String {
        match self.bootstrap {
            Bootstrap::Register => format!("register+replay: {}", self.reason),
            Bootstrap::Create => format!("create+replay: {}", self.reason),
        }
    }
}

/// A configured replica catalog.
#[derive(Debug)]
pub struct Destination {
    /// Its configuration.
    pub config: DestinationConfig,
    /// icerelay's client for it.
    pub catalog: Arc<RestCatalog>,
    capabilities: OnceCell<Capabilities>,
    /// Why the catalog does not take multi-table commits, once it refused one.
    no_transactions: std::sync::OnceLock<String>,
}

impl Destination {
    /// A destination from its configuration; credentials it vends go to
    /// `vended` (`None`: it is not asked for any).
    /// `writer` names icerelay as the writer of its replicas (see
    /// [`super::mark::writer`]).
    pub fn new(
        config: DestinationConfig,
        vended: Option<&Arc<VendedCredentials>>,
        writer: &str,
    ) -> Result<Self, CatalogError> {
        let settings = ClientSettings {
            connect_timeout: std::time::Duration::from_secs(5),
            request_timeout: config.request_timeout,
            ca_file: config.ca_file.clone(),
        };
        let catalog = RestCatalog::new(
            config.name.clone(),
            config.uri.clone(),
            config.warehouse.clone(),
            &config.auth,
            settings,
        )?
        .writing_replicas_as(writer);
        let catalog = match vended {
            Some(vended) if config.vended_credentials => catalog.vending_into(vended.clone()),
            _ => Arc::new(catalog),
        };
        Ok(Self { config, catalog, capabilities: OnceCell::new(), no_transactions: std::sync::OnceLock::new() })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// What it can do, from the configuration, the state store, or a probe
    /// (once; a failed probe is tried again on the next call).
    pub async fn capabilities(
        &self,
        store: &Arc<dyn StateStore>,
        storage: &Storage,
    ) -> Result<&Capabilities, ReplicateError> {
        self.capabilities
            .get_or_try_init(|| async {
                let configured = |bootstrap| Capabilities { bootstrap, reason: "configured (bootstrap)".into() };
                match self.config.bootstrap {
                    BootstrapMode::Register => return Ok(configured(Bootstrap::Register)),
                    BootstrapMode::Create => return Ok(configured(Bootstrap::Create)),
                    BootstrapMode::Auto => {}
                }
                let uri = self.config.uri.as_str();
                if let Some(text) = store.destination_capabilities(self.name(), uri).await?
                    && let Ok(known) = serde_json::from_str::<Capabilities>(&text)
                {
                    return Ok(known);
                }
                let probed = self.probe(storage).await?;
                tracing::info!(destination = self.name(), mode = %probed.mode(), "probed the destination");
                let text = serde_json::to_string(&probed).unwrap_or_default();
                store.record_destination_capabilities(self.name(), uri, text).await?;
                Ok(probed)
            })
            .await
    }

    /// How the source's multi-table transactions reach this destination.
    pub async fn multi_table_commits(&self) -> MultiTableCommits {
        if let Some(reason) = self.no_transactions.get() {
            return MultiTableCommits::TableByTable(reason.clone());
        }
        match self.catalog.config().await {
            Ok(config) if !config.supports("POST", TRANSACTIONS_ENDPOINT) => {
                MultiTableCommits::TableByTable("the catalog does not advertise transactions/commit".into())
            }
            _ => MultiTableCommits::Atomic,
        }
    }

    /// [`Self::multi_table_commits`] for the status API, which must answer
    /// while the destination does not: `None` if its configuration cannot
    /// be read within a second.
    pub async fn multi_table_commits_now(&self) -> Option<MultiTableCommits> {
        if self.no_transactions.get().is_none() {
            tokio::time::timeout(std::time::Duration::from_secs(1), self.catalog.config()).await.ok()?.ok()?;
        }
        Some(self.multi_table_commits().await)
    }

    /// Remembers that the catalog refused a multi-table commit as unsupported.
    pub fn refused_transactions(&self, reason: String) {
        let _ = self.no_transactions.set(reason);
    }

    /// The capabilities, if already known.
    pub fn known_capabilities(&self) -> Option<&Capabilities> {
        self.capabilities.get()
    }

    /// The capabilities as known here, or as another instance sharing the
    /// store probed them (a hint-only instance never probes); never probes.
    pub async fn recorded_capabilities(&self, store: &Arc<dyn StateStore>) -> Option<Capabilities> {
        if let Some(known) = self.known_capabilities() {
            return Some(known.clone());
        }
        let text = store.destination_capabilities(self.name(), self.config.uri.as_str()).await.ok()??;
        serde_json::from_str(&text).ok()
    }

    /// Where a replica table lives: under the configured `location`, or
    /// where the catalog would put a new table (asked with a staged create,
    /// which creates nothing).
    pub async fn table_location(&self, table: &TableIdent) -> Result<String, ReplicateError> {
        if let Some(base) = &self.config.location {
            return Ok(format!("{base}/{}/{}", table.namespace, table.name));
        }
        let request = json!({
            "name": table.name,
            "stage-create": true,
            "schema": {"type": "struct", "schema-id": 0, "fields": [{"id": 1, "name": "id", "type": "long", "required": false}]},
        });
        let staged = self.catalog.create_table(&table.namespace, &request).await?;
        staged.metadata.get("location").and_then(Value::as_str).map(|l| l.trim_end_matches('/').to_owned()).ok_or_else(
            || {
                ReplicateError::Refused(format!(
                    "destination {}: a staged create of {table} answered without a location; set destinations.location",
                    self.name()
                ))
            },
        )
    }

    /// Registers a throwaway table with history and loads it back.
    async fn probe(&self, storage: &Storage) -> Result<Capabilities, ReplicateError> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let namespace = Namespace::new(vec![format!("{PROBE_NAMESPACE}_{}", &id[..12])]);
        let table = TableIdent::new(namespace.clone(), "probe");
        self.catalog.ensure_namespace(&namespace).await?;
        let location = self.table_location(&table).await?;
        let uuid = uuid::Uuid::new_v4().to_string();
        let long_ago = now_ms() - 3 * 24 * 3600 * 1000;
        let snapshot_id: i64 = 4_242_424_242;
        let metadata = json!({
            "format-version": 2, "table-uuid": uuid, "location": location,
            "last-sequence-number": 1, "last-updated-ms": long_ago, "last-column-id": 3,
            "schemas": [{"type": "struct", "schema-id": 0, "fields": [
                {"id": 1, "name": "id", "type": "long", "required": false},
                {"id": 3, "name": "name", "type": "string", "required": false}]}],
            "current-schema-id": 0,
            "partition-specs": [{"spec-id": 0, "fields": []}], "default-spec-id": 0, "last-partition-id": 999,
            "sort-orders": [{"order-id": 0, "fields": []}], "default-sort-order-id": 0,
            "properties": {}, "current-snapshot-id": snapshot_id,
            "snapshots": [{"snapshot-id": snapshot_id, "sequence-number": 1, "timestamp-ms": long_ago,
                "manifest-list": format!("{location}/metadata/snap-{snapshot_id}-probe.avro"),
                "summary": {"operation": "append"}, "schema-id": 0}],
            "refs": {"main": {"snapshot-id": snapshot_id, "type": "branch"}},
            "snapshot-log": [{"snapshot-id": snapshot_id, "timestamp-ms": long_ago}], "metadata-log": [],
        });
        let file = format!("{location}/metadata/00000-{uuid}.metadata.json");
        storage.write(&file, Bytes::from(metadata.to_string())).await?;
        let registered = self.catalog.register_table(&table, &file).await;
        let loaded = match registered {
            Ok(_) => self.catalog.load_table(&table).await,
            Err(e) => Err(e),
        };
        let verdict = match &loaded {
            Ok(Some(t)) => {
                let m = &t.metadata;
                let kept_uuid = m.get("table-uuid").and_then(Value::as_str) == Some(uuid.as_str());
                let kept_snapshot = m.get("snapshots").and_then(Value::as_array).is_some_and(|s| {
                    s.iter().any(|s| s.get("snapshot-id").and_then(Value::as_i64) == Some(snapshot_id))
                });
                let ids: Vec<i64> = m
                    .pointer("/schemas/0/fields")
                    .and_then(Value::as_array)
                    .map(|f| f.iter().filter_map(|f| f.get("id").and_then(Value::as_i64)).collect())
                    .unwrap_or_default();
                if kept_uuid && kept_snapshot && ids == [1, 3] {
                    Capabilities {
                        bootstrap: Bootstrap::Register,
                        reason: "probed: registerTable keeps history, uuid and ids".into(),
                    }
                } else {
                    Capabilities {
                        bootstrap: Bootstrap::Create,
                        reason: format!(
                            "probed: registerTable loses history (uuid kept: {kept_uuid}, snapshot kept: {kept_snapshot}, \
                             field ids {ids:?} instead of [1, 3]), so replicas are replayed from the source's creation"
                        ),
                    }
                }
            }
            Ok(None) => Capabilities {
                bootstrap: Bootstrap::Create,
                reason: "probed: a registered table cannot be loaded back, so replicas are replayed from creation"
                    .into(),
            },
            // Only "not supported" answers say something about the catalog; a
            // refused credential or a rate limit must not be remembered as one.
            Err(e) if e.status().is_some_and(|s| matches!(s.as_u16(), 400 | 404 | 405 | 501)) => Capabilities {
                bootstrap: Bootstrap::Create,
                reason: format!("probed: registerTable is refused ({e}), so replicas are replayed from creation"),
            },
            Err(_) => {
                self.clean_up_probe(&table, &namespace).await;
                return Err(loaded.err().map_or_else(|| ReplicateError::Refused("probe failed".into()), Into::into));
            }
        };
        self.clean_up_probe(&table, &namespace).await;
        Ok(verdict)
    }

    async fn clean_up_probe(&self, table: &TableIdent, namespace: &Namespace) {
        if let Err(e) = self.catalog.drop_table(table, true).await {
            tracing::warn!(destination = self.name(), table = %table, error = %e, "could not drop the probe table");
        }
        if let Err(e) = self.catalog.drop_namespace(namespace).await {
            tracing::debug!(destination = self.name(), error = %e, "could not drop the probe namespace");
        }
    }
}
