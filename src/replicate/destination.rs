//! A replica catalog: icerelay's client for it, where its tables live, and
//! how its replicas are first made.
//!
//! Catalogs differ in what they accept (see the capability matrix in
//! README.md). The difference that decides the design is `registerTable`:
//! where it keeps a table's history (uuid, snapshots, schemas), a replica is
//! bootstrapped by writing a metadata.json with the whole retained history
//! and registering it; where it does not (SeaweedFS 4.48 answers 200 and then
//! loads an empty table), a create transaction may carry it instead (Java
//! Iceberg's catalogs accept a table's first commit with old snapshots in it:
//! stage-create, then one `assert-create` commit). Where neither keeps
//! history, a replica can only be replayed from the source's creation
//! onwards, because every catalog refuses snapshots more than a minute older
//! than the table. In `auto` mode icerelay finds out once per destination
//! with a probe (make a throwaway table each way, load it back, compare) and
//! keeps the answer in the state store.

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

/// The probe's version. A verdict an older probe recorded is probed again
/// unless it is final: version 2 tries a create transaction where
/// registerTable loses history.
const PROBE_VERSION: u32 = 2;

/// HTTP statuses by which a catalog says it does not do something (as
/// against a refused credential or a rate limit, which say nothing about
/// the catalog).
pub(super) fn says_unsupported(error: &CatalogError) -> bool {
    error.status().is_some_and(|s| matches!(s.as_u16(), 400 | 404 | 405 | 406 | 409 | 422 | 501))
}

/// How replica tables are first made on a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Bootstrap {
    /// Write the metadata with the full history, then registerTable.
    Register,
    /// createTable, then replay every snapshot.
    Create,
    /// A create transaction (stage-create, then one `assert-create` commit)
    /// with the source's first commit in it, then replay the rest.
    #[serde(rename = "create-transaction")]
    CreateTransaction,
}

/// The probe's throwaway tables: the registered one, the one a create
/// transaction makes.
const PROBE_TABLES: [&str; 2] = ["probe", "probe_tx"];
/// The probe's snapshot: its id, and how old it is (older than the minute
/// a catalog tolerates).
const PROBE_SNAPSHOT: i64 = 4_242_424_242;
const PROBE_AGE_MS: i64 = 3 * 24 * 3600 * 1000;

/// What one way of making a table with history did with it.
enum Probed {
    /// The table came back with its history.
    Kept,
    /// It did not: how.
    Lost(String),
}

/// Whether a probe table loaded back as `metadata` kept its `uuid`, and its
/// snapshot with the timestamp `at`.
fn kept(metadata: &Value, uuid: &str, at: i64) -> (bool, bool) {
    let kept_uuid = metadata.get("table-uuid").and_then(Value::as_str) == Some(uuid);
    let kept_snapshot = metadata.get("snapshots").and_then(Value::as_array).is_some_and(|s| {
        s.iter().any(|s| {
            s.get("snapshot-id").and_then(Value::as_i64) == Some(PROBE_SNAPSHOT)
                && s.get("timestamp-ms").and_then(Value::as_i64) == Some(at)
        })
    });
    (kept_uuid, kept_snapshot)
}

/// The probe's snapshot, written `at` (its manifest list is never read).
fn probe_snapshot(location: &str, at: i64) -> Value {
    json!({"snapshot-id": PROBE_SNAPSHOT, "sequence-number": 1, "timestamp-ms": at,
        "manifest-list": format!("{location}/metadata/snap-{PROBE_SNAPSHOT}-probe.avro"),
        "summary": {"operation": "append"}, "schema-id": 0})
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
    /// The version of the probe that found it (0: configured, or before versions).
    #[serde(default)]
    pub probe: u32,
}

impl Capabilities {
    /// The lane mode shown in the status API: how the replica is made, and
    /// that it follows by replay.
    pub fn mode(&self) -> String {
        match self.bootstrap {
            Bootstrap::Register => format!("register+replay: {}", self.reason),
            Bootstrap::Create => format!("create+replay: {}", self.reason),
            Bootstrap::CreateTransaction => format!("create-transaction+replay: {}", self.reason),
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
                let configured =
                    |bootstrap| Capabilities { bootstrap, reason: "configured (bootstrap)".into(), probe: 0 };
                match self.config.bootstrap {
                    BootstrapMode::Register => return Ok(configured(Bootstrap::Register)),
                    BootstrapMode::Create => return Ok(configured(Bootstrap::Create)),
                    BootstrapMode::CreateTransaction => return Ok(configured(Bootstrap::CreateTransaction)),
                    BootstrapMode::Auto => {}
                }
                let uri = self.config.uri.as_str();
                if let Some(text) = store.destination_capabilities(self.name(), uri).await?
                    && let Ok(known) = serde_json::from_str::<Capabilities>(&text)
                    && (known.probe >= PROBE_VERSION || known.bootstrap == Bootstrap::Register)
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
            let (namespace, name) = location_segments(table).map_err(|why| {
                ReplicateError::Refused(format!(
                    "destination {}: the replica of {table} cannot be placed under destinations.location {base}: {why}; \
                     rename the table, or leave destinations.location unset so the catalog places it",
                    self.name()
                ))
            })?;
            return Ok(format!("{base}/{namespace}/{name}"));
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

    /// Finds out how the catalog keeps a table's history, each way on a
    /// throwaway table of a namespace of its own: registerTable first, then
    /// a create transaction.
    async fn probe(&self, storage: &Storage) -> Result<Capabilities, ReplicateError> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let namespace = Namespace::new(vec![format!("{PROBE_NAMESPACE}_{}", &id[..12])]);
        self.catalog.ensure_namespace(&namespace).await?;
        let verdict = self.judge(storage, &namespace).await;
        self.clean_up_probe(&namespace).await;
        let (bootstrap, reason) = verdict?;
        Ok(Capabilities { bootstrap, reason, probe: PROBE_VERSION })
    }

    /// The probe's verdict: how replicas are made, and why.
    async fn judge(&self, storage: &Storage, namespace: &Namespace) -> Result<(Bootstrap, String), ReplicateError> {
        let registered = match self.probe_register(storage, namespace).await? {
            Probed::Kept => {
                return Ok((Bootstrap::Register, "probed: registerTable keeps history, uuid and ids".into()));
            }
            Probed::Lost(why) => why,
        };
        Ok(match self.probe_create_transaction(namespace).await? {
            Probed::Kept => (
                Bootstrap::CreateTransaction,
                format!("probed: {registered}; a create transaction keeps it, so replicas are made by one"),
            ),
            Probed::Lost(why) => (
                Bootstrap::Create,
                format!("probed: {registered}, and {why}, so replicas are replayed from the source's creation"),
            ),
        })
    }

    /// Registers a throwaway table with history and loads it back.
    async fn probe_register(&self, storage: &Storage, namespace: &Namespace) -> Result<Probed, ReplicateError> {
        let table = TableIdent::new(namespace.clone(), PROBE_TABLES[0]);
        let location = self.table_location(&table).await?;
        let uuid = uuid::Uuid::new_v4().to_string();
        let long_ago = now_ms() - PROBE_AGE_MS;
        let metadata = json!({
            "format-version": 2, "table-uuid": uuid, "location": location,
            "last-sequence-number": 1, "last-updated-ms": long_ago, "last-column-id": 3,
            "schemas": [{"type": "struct", "schema-id": 0, "fields": [
                {"id": 1, "name": "id", "type": "long", "required": false},
                {"id": 3, "name": "name", "type": "string", "required": false}]}],
            "current-schema-id": 0,
            "partition-specs": [{"spec-id": 0, "fields": []}], "default-spec-id": 0, "last-partition-id": 999,
            "sort-orders": [{"order-id": 0, "fields": []}], "default-sort-order-id": 0,
            "properties": {}, "current-snapshot-id": PROBE_SNAPSHOT,
            "snapshots": [probe_snapshot(&location, long_ago)],
            "refs": {"main": {"snapshot-id": PROBE_SNAPSHOT, "type": "branch"}},
            "snapshot-log": [{"snapshot-id": PROBE_SNAPSHOT, "timestamp-ms": long_ago}], "metadata-log": [],
        });
        let file = format!("{location}/metadata/00000-{uuid}.metadata.json");
        storage.write(&file, Bytes::from(metadata.to_string())).await?;
        let loaded = match self.catalog.register_table(&table, &file).await {
            Ok(_) => self.catalog.load_table(&table).await,
            Err(e) if says_unsupported(&e) => {
                return Ok(Probed::Lost(format!("registerTable is refused ({})", self.refusal(&e))));
            }
            Err(e) => return Err(e.into()),
        };
        let Some(loaded) = loaded? else {
            return Ok(Probed::Lost("a registered table cannot be loaded back".into()));
        };
        let m = &loaded.metadata;
        let (kept_uuid, kept_snapshot) = kept(m, &uuid, long_ago);
        let ids: Vec<i64> = m
            .pointer("/schemas/0/fields")
            .and_then(Value::as_array)
            .map(|f| f.iter().filter_map(|f| f.get("id").and_then(Value::as_i64)).collect())
            .unwrap_or_default();
        Ok(if kept_uuid && kept_snapshot && ids == [1, 3] {
            Probed::Kept
        } else {
            Probed::Lost(format!(
                "registerTable loses history (uuid kept: {kept_uuid}, snapshot kept: {kept_snapshot}, field ids \
                 {ids:?} instead of [1, 3])"
            ))
        })
    }

    /// Makes a throwaway table by a create transaction whose commit adds a
    /// snapshot from days ago, and loads it back.
    async fn probe_create_transaction(&self, namespace: &Namespace) -> Result<Probed, ReplicateError> {
        let table = TableIdent::new(namespace.clone(), PROBE_TABLES[1]);
        let request = json!({
            "name": table.name, "stage-create": true, "properties": {"format-version": "2"},
            "schema": {"type": "struct", "schema-id": 0, "fields": [{"id": 1, "name": "id", "type": "long", "required": false}]},
        });
        let staged = match self.catalog.create_table(namespace, &request).await {
            Ok(staged) => staged,
            Err(e) if says_unsupported(&e) => {
                return Ok(Probed::Lost(format!("a staged create is refused ({})", self.refusal(&e))));
            }
            Err(e) => return Err(e.into()),
        };
        let location = staged.metadata.get("location").and_then(Value::as_str).unwrap_or_default().to_owned();
        let uuid = uuid::Uuid::new_v4().to_string();
        let long_ago = now_ms() - PROBE_AGE_MS;
        let updates = [
            json!({"action": "add-snapshot", "snapshot": probe_snapshot(&location, long_ago)}),
            json!({"action": "set-snapshot-ref", "ref-name": "main", "type": "branch", "snapshot-id": PROBE_SNAPSHOT}),
        ];
        match self.catalog.commit_create(&table, &staged.metadata, &uuid, &updates).await {
            Ok(_) => {}
            Err(e) if says_unsupported(&e) || matches!(e, CatalogError::CommitConflict { .. }) => {
                return Ok(Probed::Lost(format!(
                    "a create transaction with a snapshot from days ago is refused ({})",
                    self.refusal(&e)
                )));
            }
            Err(e) => return Err(e.into()),
        }
        let Some(loaded) = self.catalog.load_table(&table).await? else {
            return Ok(Probed::Lost("a table made by a create transaction cannot be loaded back".into()));
        };
        let m = &loaded.metadata;
        let (kept_uuid, kept_snapshot) = kept(m, &uuid, long_ago);
        let kept_log =
            m.get("snapshot-log") == Some(&json!([{"snapshot-id": PROBE_SNAPSHOT, "timestamp-ms": long_ago}]));
        Ok(if kept_uuid && kept_snapshot && kept_log {
            Probed::Kept
        } else {
            Probed::Lost(format!(
                "a create transaction loses history (uuid kept: {kept_uuid}, snapshot kept: {kept_snapshot}, \
                 snapshot-log kept: {kept_log})"
            ))
        })
    }

    /// A refusal the probe saw, as its verdict says it: the status and the
    /// error type, which do not change from one probe to the next (the
    /// message names the probe's table and times), so that instances
    /// sharing a state report the same verdict. The whole answer is logged.
    fn refusal(&self, error: &CatalogError) -> String {
        tracing::info!(destination = self.name(), error = %error, "the probe's request was refused");
        match error {
            CatalogError::Status { status, error_type, .. } => match error_type {
                Some(kind) => format!("{status} {kind}"),
                None => status.to_string(),
            },
            CatalogError::CommitConflict { .. } => "409 Conflict".to_owned(),
            other => other.to_string(),
        }
    }

    async fn clean_up_probe(&self, namespace: &Namespace) {
        for name in PROBE_TABLES {
            let table = TableIdent::new(namespace.clone(), name);
            if let Err(e) = self.catalog.drop_table(&table, true).await {
                tracing::warn!(destination = self.name(), table = %table, error = %e, "could not drop a probe table");
            }
        }
        if let Err(e) = self.catalog.drop_namespace(namespace).await {
            tracing::debug!(destination = self.name(), error = %e, "could not drop the probe namespace");
        }
    }
}

/// The two path segments of `table` under a configured replica location
/// (`ns/t`, nested levels joined by `.`), if they name it alone. Table names
/// come from whoever may create tables: one with a `/` would land inside
/// another table's replica (`sales/orders` + `metadata`), and a level with a
/// `.` on another's (the namespace `a.b` against the nested `a`, `b`).
fn location_segments(table: &TableIdent) -> Result<(String, String), String> {
    let levels = table.namespace.levels();
    let names = levels.iter().map(|l| ("namespace level", l.as_str())).chain([("table name", table.name.as_str())]);
    for (what, name) in names {
        if name.is_empty() || name == "." || name == ".." {
            return Err(format!("its {what} {name:?} is not a path segment"));
        }
        if let Some(c) = name.chars().find(|c| matches!(c, '/' | '\\' | '%' | '?' | '#') || c.is_control()) {
            return Err(format!("its {what} {name:?} has the character {c:?}, which a path would read differently"));
        }
    }
    if let Some(level) = levels.iter().find(|l| l.contains('.')) {
        return Err(format!(
            "its namespace level {level:?} has a `.`, which also joins nested levels, so {} could be another \
             namespace",
            table.namespace
        ));
    }
    Ok((table.namespace.to_string(), table.name.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Namespace;

    fn segments(levels: &[&str], name: &str) -> Result<(String, String), String> {
        location_segments(&TableIdent::new(Namespace::new(levels.iter().map(|l| (*l).to_owned()).collect()), name))
    }

    #[test]
    fn a_replica_location_names_its_table_alone() {
        assert_eq!(segments(&["sales"], "orders"), Ok(("sales".into(), "orders".into())));
        assert_eq!(segments(&["a", "b"], "t"), Ok(("a.b".into(), "t".into())));
        for (levels, name, names) in [
            (&["sales/orders"][..], "metadata", "\"sales/orders\""),
            (&["sales"][..], "orders/metadata", "\"orders/metadata\""),
            (&["a.b", "c"][..], "t", "\"a.b\" has a `.`"),
            (&["a.b"][..], "t", "\"a.b\" has a `.`"),
            (&["sales"][..], "..", "\"..\""),
            (&["sales"][..], "", "\"\""),
            (&["sales"][..], "a%2Fb", "'%'"),
            (&["sales"][..], "a\\b", "'\\\\'"),
            (&["sales"][..], "a\nb", "'\\n'"),
        ] {
            let e = segments(levels, name).expect_err("ambiguous");
            assert!(e.contains(names), "{levels:?} {name:?}: {e}");
        }
    }
}
