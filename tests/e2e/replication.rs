//! Replication end to end: writers go through icerelay to a real primary
//! catalog (SeaweedFS); the replica is another real catalog (a second
//! SeaweedFS, or rustberg) read directly with PyIceberg and DuckDB.
//!
//! For every case the replica must have the source's snapshot ids, parents,
//! sequence numbers, timestamps and refs, in the source's order; the same rows
//! at every snapshot; no path into the source's storage; and the status API
//! must say `completed` with the replica's real metadata location.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use icerelay::catalog::{ClientSettings, Namespace, RestCatalog, TableIdent};
use icerelay::config::{AuthConfig, Secret};
use serde_json::{Value, json};

use axum::response::IntoResponse;

use crate::harness::java_rest::JavaRest;
use crate::harness::vending::{EXPIRED_SECRET, VendingCatalog};
use crate::harness::{
    Relay, RelayProcess, Rustberg, SeaweedFs, Served, duckdb_extensions, icerelay, python, stand_in, unique,
};

/// A replica catalog of the tests.
#[derive(Clone, Copy)]
pub(crate) enum Replica {
    Seaweed(&'static SeaweedFs),
    Rustberg(&'static Rustberg),
    Java(&'static JavaRest),
}

impl Replica {
    pub(crate) fn destination_toml(self) -> String {
        match self {
            Self::Seaweed(s) => seaweed_destination_toml(s, "dr"),
            Self::Rustberg(r) => {
                format!(
                    "[[destinations]]\nname = \"dr\"\nuri = \"{}\"\nwarehouse = \"{}\"\n\n{}",
                    r.uri,
                    r.warehouse,
                    r.storage_toml()
                )
            }
            Self::Java(j) => format!(
                "[[destinations]]\nname = \"dr\"\nuri = \"{}\"\nwarehouse = \"{}\"\n\n{}",
                j.uri,
                j.warehouse,
                j.storage_toml()
            ),
        }
    }

    pub(crate) fn conn(self) -> Value {
        match self {
            Self::Seaweed(s) => s.client_conn(s.catalog_uri()),
            Self::Rustberg(r) => r.client_conn(),
            Self::Java(j) => j.client_conn(),
        }
    }

    pub(crate) fn catalog(self) -> RestCatalog {
        match self {
            Self::Seaweed(s) => seaweed_catalog(s),
            Self::Rustberg(r) => rustberg_catalog(&r.uri, &r.warehouse),
            Self::Java(j) => rustberg_catalog(&j.uri, &j.warehouse),
        }
    }

    /// S3 settings for check_copy.py, when the replica's files are on S3.
    fn s3(self) -> Option<Value> {
        match self {
            Self::Seaweed(s) => Some(s.s3_json()),
            Self::Rustberg(_) | Self::Java(_) => None,
        }
    }
}

/// A client of the catalog without auth at `uri` (rustberg, the Java
/// catalog, or a stand-in in front of one).
pub(crate) fn rustberg_catalog(uri: &str, warehouse: &str) -> RestCatalog {
    RestCatalog::new(
        "rustberg",
        reqwest::Url::parse(uri).expect("uri"),
        Some(warehouse.to_owned()),
        &AuthConfig::None,
        settings(),
    )
    .expect("client")
}

fn settings() -> ClientSettings {
    ClientSettings { connect_timeout: Duration::from_secs(5), request_timeout: Duration::from_secs(30), ca_file: None }
}

pub(crate) fn seaweed_catalog(s: &SeaweedFs) -> RestCatalog {
    let auth = AuthConfig::OAuth2 {
        client_id: "admin".into(),
        client_secret: Secret::new(s.secret()),
        token_endpoint: None,
        scope: "catalog".into(),
    };
    RestCatalog::new(
        "test",
        reqwest::Url::parse(s.catalog_uri()).expect("uri"),
        Some(s.warehouse().into()),
        &auth,
        settings(),
    )
    .expect("client")
}

/// icerelay's configuration: the shared SeaweedFS as primary, `replica` as
/// the destination, a rule for `namespace`.
fn relay_toml(replica: Replica, namespace: &str, state: &std::path::Path, extra: &str) -> String {
    relay_toml_from(SeaweedFs::shared(), replica, namespace, state, extra)
}

/// A SeaweedFS as the destination `name`, with its storage.
pub(crate) fn seaweed_destination_toml(s: &SeaweedFs, name: &str) -> String {
    format!(
        "[[destinations]]\nname = \"{name}\"\nuri = \"{}\"\nwarehouse = \"{}\"\nauth = {}\n\n{}",
        s.catalog_uri(),
        s.warehouse(),
        s.auth_toml(),
        s.storage_toml()
    )
}

/// [`relay_toml`] with another SeaweedFS as the primary.
pub(crate) fn relay_toml_from(
    source: &SeaweedFs,
    replica: Replica,
    namespace: &str,
    state: &std::path::Path,
    extra: &str,
) -> String {
    relay_toml_with(source, &replica.destination_toml(), "dr", namespace, state, extra)
}

/// icerelay replicating `source` to the destination `destination_toml`
/// describes (named `name`) for `namespace`.
pub(crate) fn relay_toml_with(
    source: &SeaweedFs,
    destination_toml: &str,
    name: &str,
    namespace: &str,
    state: &std::path::Path,
    extra: &str,
) -> String {
    format!(
        "state_dir = \"{}\"\n{extra}\n[primary]\nuri = \"{}\"\nwarehouse = \"{}\"\nauth = {}\n\n[replication]\nreconcile_interval = \"2s\"\nretry_initial_backoff = \"200ms\"\nretry_max_backoff = \"2s\"\n\n{}\n{destination_toml}\n[[rules]]\nnamespace = \"{namespace}\"\ndestinations = [\"{name}\"]\n",
        state.display(),
        source.catalog_uri(),
        source.warehouse(),
        source.auth_toml(),
        source.storage_toml(),
    )
}

/// icerelay replicating a fresh namespace (`prefix_...`) of the shared
/// SeaweedFS to `replica`: the namespace, its table `name`, the state
/// directory (kept while the test holds it) and icerelay.
async fn replicating(replica: Replica, prefix: &str, name: &str) -> (String, String, tempfile::TempDir, Relay) {
    let ns = unique(prefix);
    let table = format!("{ns}.{name}");
    let state = tempfile::tempdir().expect("state");
    let relay = Relay::start(&relay_toml(replica, &ns, state.path(), "")).await;
    (ns, table, state, relay)
}

/// Runs `writer.py` against the catalog at `uri` (icerelay or the primary itself).
async fn write(uri: &str, table: &str, ops: Value) -> Value {
    write_with(SeaweedFs::shared().client_conn(uri), table, ops).await
}

pub(crate) async fn write_with(conn: Value, table: &str, ops: Value) -> Value {
    python(
        "writer.py",
        vec![conn.to_string(), table.into(), ops.to_string(), duckdb_extensions().display().to_string()],
    )
    .await
}

/// Waits until the lane of `table` satisfies `done`; returns its status.
pub(crate) async fn wait_status(admin: &str, table: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = None;
    while Instant::now() < deadline {
        if let Some(s) = lane_status(admin, table).await {
            if done(&s) {
                return s;
            }
            last = Some(s);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{table}: {what} did not happen within 120 s; last status: {last:?}");
}

/// Validates documents against a schema of `openapi/admin.yaml`.
pub(crate) async fn validate(schema: &str, documents: &[&Value]) -> Value {
    let spec = crate::harness::repo_root().join("openapi/admin.yaml").display().to_string();
    let mut args = vec![spec, schema.to_owned()];
    args.extend(documents.iter().map(|d| d.to_string()));
    python("validate_openapi.py", args).await
}

pub(crate) async fn read_catalog(conn: Value, table: &str) -> Value {
    python(
        "read_snapshots.py",
        vec![json!({"catalog": conn, "table": table}).to_string(), duckdb_extensions().display().to_string()],
    )
    .await
}

/// `admin_token` of the tests that set one.
const ADMIN_TOKEN: &str = "test-admin-token-7731";

/// The whole `GET /v1/replication/status` answer.
pub(crate) async fn status(admin: &str) -> Value {
    let answer = reqwest::get(format!("{admin}/v1/replication/status")).await.expect("status");
    assert!(answer.status().is_success());
    answer.json().await.expect("json")
}

pub(crate) async fn lane_status(admin: &str, table: &str) -> Option<Value> {
    let (ns, name) = table.rsplit_once('.').expect("ns.table");
    let url = format!("{admin}/v1/replication/namespaces/{ns}/tables/{name}");
    // The token of the tests that protect the admin API; ignored by the others.
    let answer = crate::harness::http_client().get(&url).bearer_auth(ADMIN_TOKEN).send().await.ok()?;
    if !answer.status().is_success() {
        return None;
    }
    answer.json::<Value>().await.ok()?["destinations"].get(0).cloned()
}

/// Waits until the lane of `table` has replicated `source_metadata` and is completed.
pub(crate) async fn wait_replicated(admin: &str, table: &str, source_metadata: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = None;
    while Instant::now() < deadline {
        if let Some(s) = lane_status(admin, table).await {
            if s["status"] == "completed" && s["source_metadata_location"] == source_metadata {
                return s;
            }
            last = Some(s);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{table} was not replicated within 120 s; last status: {last:?}");
}

pub(crate) fn ident(table: &str) -> TableIdent {
    let (ns, name) = table.rsplit_once('.').expect("ns.table");
    TableIdent::new(Namespace::from_dotted(ns), name)
}

/// Snapshots as (id, parent, sequence number, timestamp, summary, schema fields), in log order.
pub(crate) fn history(metadata: &Value) -> BTreeMap<i64, Value> {
    let schemas: BTreeMap<i64, Value> = metadata["schemas"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| Some((s["schema-id"].as_i64()?, s["fields"].clone())))
        .collect();
    metadata["snapshots"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| {
            let id = s["snapshot-id"].as_i64()?;
            let fields = s["schema-id"].as_i64().and_then(|i| schemas.get(&i).cloned()).unwrap_or(Value::Null);
            Some((
                id,
                json!({"parent": s["parent-snapshot-id"], "seq": s["sequence-number"], "ts": s["timestamp-ms"],
                       "summary": s["summary"], "schema": fields}),
            ))
        })
        .collect()
}

pub(crate) fn refs(metadata: &Value) -> BTreeMap<String, i64> {
    metadata["refs"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, r)| Some((k.clone(), r["snapshot-id"].as_i64()?)))
        .collect()
}

/// Checks the replica against the source: identity of every source snapshot,
/// refs, the rows every reader sees, no source path, true sizes.
pub(crate) async fn assert_replica_matches(replica: Replica, table: &str, source_rows: &Value, status: &Value) {
    let source = SeaweedFs::shared();
    let source_table = seaweed_catalog(source).load_table(&ident(table)).await.expect("load source").expect("source");
    let replica_table =
        replica.catalog().load_table(&ident(table)).await.expect("load replica").expect("replica exists");
    let (s, r) = (history(&source_table.metadata), history(&replica_table.metadata));
    for (id, snapshot) in &s {
        assert_eq!(r.get(id), Some(snapshot), "snapshot {id} of {table} differs on the replica");
    }
    assert_eq!(refs(&replica_table.metadata), refs(&source_table.metadata), "refs of {table}");
    // Order and grouping: over the snapshots both hold, the replica's
    // snapshot-log is the source's (time travel by timestamp reads it): an
    // intermediate snapshot the source committed together with the next one
    // (an overwrite's delete) is in neither.
    let both: std::collections::BTreeSet<i64> = s.keys().filter(|id| r.contains_key(id)).copied().collect();
    let log = |m: &Value| -> Vec<i64> {
        m["snapshot-log"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["snapshot-id"].as_i64())
            .filter(|id| both.contains(id))
            .collect()
    };
    assert_eq!(log(&replica_table.metadata), log(&source_table.metadata), "snapshot log of {table}");
    assert_eq!(
        status["replica_metadata_location"],
        replica_table.metadata_location.clone().unwrap_or_default(),
        "the status names the replica's current metadata"
    );

    let seen = read_catalog(replica.conn(), table).await;
    assert_eq!(seen["errors"], json!({}), "readers failed on the replica: {seen}");
    for reader in ["pyiceberg", "duckdb"] {
        for (id, rows) in source_rows[reader].as_object().expect("rows by snapshot") {
            assert_eq!(&seen[reader][id], rows, "{reader} at snapshot {id} of {table}");
        }
    }

    let mut args = vec![
        replica_table.metadata_location.clone().expect("replica metadata location"),
        format!("s3://{}/", source.warehouse()),
    ];
    args.extend(replica.s3().map(|s3| s3.to_string()));
    let report = python("check_copy.py", args).await;
    assert_eq!(report["violations"], json!([]), "{table} on the replica: {report}");
}

pub(crate) async fn source_rows(table: &str) -> Value {
    let source = SeaweedFs::shared();
    let rows = read_catalog(source.client_conn(source.catalog_uri()), table).await;
    assert_eq!(rows["errors"], json!({}), "readers failed on the source: {rows}");
    rows
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_created_through_icerelay_is_followed_commit_by_commit() {
    followed_commit_by_commit(Replica::Seaweed(SeaweedFs::shared_replica())).await;
}

/// The same into Iceberg's own Java catalog logic, whose validation most
/// production catalogs share.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_created_through_icerelay_is_followed_into_the_java_catalog() {
    followed_commit_by_commit(Replica::Java(JavaRest::shared())).await;
}

/// A table created through icerelay and written with every kind of commit
/// PyIceberg and DuckDB make, expired on the source and dropped, against `replica`.
async fn followed_commit_by_commit(replica: Replica) {
    let (_ns, table, state, relay) = replicating(replica, "follow", "events").await;

    let written = write(
        &relay.url,
        &table,
        json!([
            {"op": "create"},
            {"op": "append", "start": 0, "rows": 6},
            {"op": "append", "start": 6, "rows": 6},
            {"op": "append", "start": 12, "rows": 6},
            {"op": "add_column", "name": "note"},
            {"op": "append", "start": 18, "rows": 4},
            {"op": "partition_by", "field": "category"},
            {"op": "append", "start": 22, "rows": 4},
            {"op": "overwrite", "category": "a", "start": 100, "rows": 3},
            {"op": "delete_below", "id": 4},
            {"op": "tag", "name": "v1"},
            {"op": "branch", "name": "audit"},
            {"op": "append", "start": 200, "rows": 2, "branch": "audit"},
            {"op": "overwrite", "category": "b", "start": 700, "rows": 2, "branch": "audit"},
            {"op": "append", "start": 300, "rows": 2},
            {"op": "set_property", "key": "owner", "value": "e2e"},
        ]),
    )
    .await;
    let location = written["metadata_location"].as_str().expect("location").to_owned();
    let status = wait_replicated(&relay.admin_url, &table, &location).await;
    // The overwrite on `audit` added a delete and an append snapshot in one
    // commit, which no snapshot-log shows (it records main): the proxy saw
    // the commit, and the replica got both in one commit too.
    let head = written["refs"]["audit"].as_i64().expect("audit");
    let parent_of = |id: i64| {
        written["snapshots"].as_array().into_iter().flatten().find(|s| s["id"] == id).and_then(|s| s["parent"].as_i64())
    };
    let delete = parent_of(head).expect("the overwrite's delete snapshot");
    let audit = std::fs::read_to_string(state.path().join("audit.log")).expect("audit log");
    let commits: Vec<Vec<i64>> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["action"] == "commit")
        .map(|e| e["source_snapshots"].as_array().into_iter().flatten().filter_map(Value::as_i64).collect())
        .collect();
    assert!(
        commits.iter().any(|c| c.contains(&delete) && c.contains(&head)),
        "the branch overwrite in one replica commit: {commits:?}"
    );
    // The probe picks registerTable where it keeps the whole history (Java's catalog does).
    let mode = if matches!(replica, Replica::Java(_)) { "register+replay" } else { "create+replay" };
    assert!(status["mode"].as_str().is_some_and(|m| m.starts_with(mode)), "{status}");
    assert_eq!(status["snapshots_behind"], 0);
    let before_expiry = source_rows(&table).await;
    assert!(before_expiry["snapshots"].as_array().map_or(0, Vec::len) >= 10, "{before_expiry}");
    assert_replica_matches(replica, &table, &before_expiry, &status).await;
    let replica_props = replica.catalog().load_table(&ident(&table)).await.expect("load").expect("replica");
    assert_eq!(replica_props.metadata["properties"]["owner"], "e2e", "properties follow");

    // Expiry on the source stays on the source; the next commit still follows.
    let written =
        write(&relay.url, &table, json!([{"op": "expire", "keep_last": 1}, {"op": "append", "start": 400, "rows": 3}]))
            .await;
    assert!(
        written["snapshots"].as_array().map_or(0, Vec::len) < before_expiry["snapshots"].as_array().map_or(0, Vec::len)
    );
    let location = written["metadata_location"].as_str().expect("location").to_owned();
    let status = wait_replicated(&relay.admin_url, &table, &location).await;
    let after = source_rows(&table).await;
    assert_replica_matches(replica, &table, &after, &status).await;
    let kept = read_catalog(replica.conn(), &table).await;
    for (id, rows) in before_expiry["pyiceberg"].as_object().expect("rows") {
        assert_eq!(&kept["pyiceberg"][id], rows, "expired on the source, still on the replica: {id}");
    }

    // Dropping the source keeps the replica (the default).
    write(&relay.url, &table, json!([{"op": "drop"}])).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = lane_status(&relay.admin_url, &table).await.expect("status");
        if s["source_dropped"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "the drop was not noticed: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let still = replica.catalog().load_table(&ident(&table)).await.expect("load");
    assert!(still.is_some(), "the replica survives the source's drop");
}

#[tokio::test(flavor = "multi_thread")]
async fn merge_on_read_deletes_reach_the_replica_rewritten() {
    let replica = Replica::Seaweed(SeaweedFs::shared_replica());
    let (ns, table, _state, relay) = replicating(replica, "mor", "t").await;
    let conn = SeaweedFs::shared().client_conn(&relay.url);
    let ext = duckdb_extensions().display().to_string();
    let made =
        python("fixture_tables.py", vec!["duckdb-mor".into(), conn.to_string(), ns.clone(), "t".into(), ext]).await;
    let location = made["metadata_location"].as_str().expect("location").to_owned();
    let status = wait_replicated(&relay.admin_url, &table, &location).await;
    let rows = source_rows(&table).await;
    assert_replica_matches(replica, &table, &rows, &status).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn three_writers_on_three_tables_replicate_in_parallel() {
    let replica = Replica::Seaweed(SeaweedFs::shared_replica());
    let ns = unique("three");
    let state = tempfile::tempdir().expect("state");
    let relay = Relay::start(&relay_toml(replica, &ns, state.path(), "")).await;
    let ops = |k: i64| {
        json!([{"op": "create", "partitioned": k != 1}, {"op": "append", "start": 0, "rows": 3},
               {"op": "append", "start": 10 * k, "rows": 4}, {"op": "append", "start": 100 * k, "rows": 2},
               {"op": "append", "start": 1000 * k, "rows": 1}])
    };
    let tables: Vec<String> = (1..=3).map(|k| format!("{ns}.t{k}")).collect();
    let writes = tables.iter().enumerate().map(|(i, t)| write(&relay.url, t, ops(i as i64 + 1)));
    let written = futures::future::join_all(writes).await;
    for (t, w) in tables.iter().zip(&written) {
        let location = w["metadata_location"].as_str().expect("location");
        let status = wait_replicated(&relay.admin_url, t, location).await;
        let rows = source_rows(t).await;
        assert_replica_matches(replica, t, &rows, &status).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn commits_made_around_icerelay_arrive_through_reconcile() {
    let replica = Replica::Seaweed(SeaweedFs::shared_replica());
    let (_ns, table, _state, relay) = replicating(replica, "around", "t").await;
    let created = write(&relay.url, &table, json!([{"op": "create"}, {"op": "append", "rows": 3}])).await;
    wait_replicated(&relay.admin_url, &table, created["metadata_location"].as_str().expect("location")).await;

    // Straight to the primary: icerelay gets no hint.
    let source = SeaweedFs::shared();
    let around = write(source.catalog_uri(), &table, json!([{"op": "append", "start": 50, "rows": 2}])).await;
    let location = around["metadata_location"].as_str().expect("location");
    let status = wait_replicated(&relay.admin_url, &table, location).await;
    let rows = source_rows(&table).await;
    assert_replica_matches(replica, &table, &rows, &status).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_existing_table_with_history_is_bootstrapped_into_rustberg_and_followed() {
    let replica = Replica::Rustberg(Rustberg::shared());
    let ns = unique("boot");
    let table = format!("{ns}.t");
    // Written before any rule covers it, straight to the primary.
    let source = SeaweedFs::shared();
    let conn = source.client_conn(source.catalog_uri());
    let ext = duckdb_extensions().display().to_string();
    python("fixture_tables.py", vec!["pyiceberg".into(), conn.to_string(), ns.clone(), "t".into(), ext]).await;

    let state = tempfile::tempdir().expect("state");
    let relay = Relay::start(&relay_toml(replica, &ns, state.path(), "")).await;
    let current = seaweed_catalog(source).load_table(&ident(&table)).await.expect("load").expect("table");
    let location = current.metadata_location.expect("location");
    let status = wait_replicated(&relay.admin_url, &table, &location).await;
    assert!(status["mode"].as_str().is_some_and(|m| m.starts_with("register+replay")), "{status}");
    let rows = source_rows(&table).await;
    assert_replica_matches(replica, &table, &rows, &status).await;
    let registered = replica.catalog().load_table(&ident(&table)).await.expect("load").expect("replica");
    assert_eq!(registered.metadata["table-uuid"], current.metadata["table-uuid"], "registration keeps the uuid");

    // Then follows by replay.
    let more =
        write(&relay.url, &table, json!([{"op": "append", "start": 500, "rows": 2}, {"op": "tag", "name": "later"}]))
            .await;
    let location = more["metadata_location"].as_str().expect("location");
    let status = wait_replicated(&relay.admin_url, &table, location).await;
    let rows = source_rows(&table).await;
    assert_replica_matches(replica, &table, &rows, &status).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_replication_loses_nothing() {
    killed_mid_replication(Replica::Seaweed(SeaweedFs::shared_replica()), "kill").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_replication_into_the_java_catalog_loses_nothing() {
    killed_mid_replication(Replica::Java(JavaRest::shared()), "killjava").await;
}

/// icerelay SIGKILLed once `replica` has some of eight appends: a new
/// process finishes them, with the same ids in the same order, none twice,
/// and an audit log without a torn line.
async fn killed_mid_replication(replica: Replica, prefix: &str) {
    let ns = unique(prefix);
    let table = format!("{ns}.t");
    let state = tempfile::tempdir().expect("state");
    let config = state.path().join("icerelay.toml");
    std::fs::write(&config, relay_toml(replica, &ns, &state.path().join("state"), "")).expect("config");
    let config = config.display().to_string();
    let mut first = RelayProcess::start(&["serve", "--config", &config], &[]).await;
    // A second instance on the same state directory refuses to start, naming the first.
    let (code, _, stderr) = icerelay(
        ["serve", "--config", &config, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
            .map(str::to_owned)
            .to_vec(),
    )
    .await;
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains(&format!("pid {}", first.pid())), "names the holder: {stderr}");
    let mut ops = vec![json!({"op": "create"})];
    ops.extend((0..8).map(|k| json!({"op": "append", "start": k * 10, "rows": 3})));
    let written = write(&first.url, &table, Value::Array(ops)).await;
    // Kill as soon as the replica has some of it, but not all.
    let deadline = Instant::now() + Duration::from_secs(60);
    while lane_status(&first.admin_url, &table).await.is_none_or(|s| s["replica_metadata_location"].is_null()) {
        assert!(Instant::now() < deadline, "replication never started:\n{}", first.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill();

    let second = RelayProcess::start(&["serve", "--config", &config], &[]).await;
    let location = written["metadata_location"].as_str().expect("location");
    let status = wait_replicated(&second.admin_url, &table, location).await;
    let rows = source_rows(&table).await;
    assert_replica_matches(replica, &table, &rows, &status).await;
    let replica_table = replica.catalog().load_table(&ident(&table)).await.expect("load").expect("replica");
    let ids: Vec<i64> = replica_table.metadata["snapshots"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["snapshot-id"].as_i64())
        .collect();
    let source_ids: Vec<i64> =
        written["snapshots"].as_array().into_iter().flatten().filter_map(|s| s["id"].as_i64()).collect();
    assert_eq!(ids, source_ids, "same snapshots, same order, none twice");

    // The audit log survived the kill whole: every line is JSON, and every
    // replica snapshot is in a commit line (committed, or adopted after the restart).
    let text = std::fs::read_to_string(state.path().join("state/audit.log")).expect("audit log");
    let mut audited = std::collections::BTreeSet::new();
    for line in text.lines() {
        let entry: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("a torn audit line ({e}): {line}"));
        if entry["action"] == "commit" {
            audited.extend(entry["source_snapshots"].as_array().into_iter().flatten().filter_map(Value::as_i64));
        }
    }
    assert_eq!(audited, ids.iter().copied().collect(), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_status_api_matches_its_openapi_description() {
    let replica = Replica::Seaweed(SeaweedFs::shared_replica());
    let (ns, table, _state, relay) = replicating(replica, "api", "t").await;
    let written = write(&relay.url, &table, json!([{"op": "create"}, {"op": "append", "rows": 2}])).await;
    wait_replicated(&relay.admin_url, &table, written["metadata_location"].as_str().expect("location")).await;

    let http = reqwest::Client::new();
    let all: Value = http
        .get(format!("{}/v1/replication/status", relay.admin_url))
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("json");
    let one: Value = http
        .get(format!("{}/v1/replication/namespaces/{ns}/tables/t", relay.admin_url))
        .send()
        .await
        .expect("table")
        .json()
        .await
        .expect("json");
    let resynced = http
        .post(format!("{}/v1/replication/namespaces/{ns}/tables/t/destinations/dr/resync", relay.admin_url))
        .json(&json!({}))
        .send()
        .await
        .expect("resync");
    assert_eq!(resynced.status(), 200);
    let resynced: Value = resynced.json().await.expect("json");
    let missing = http
        .get(format!("{}/v1/replication/namespaces/{ns}/tables/nope", relay.admin_url))
        .send()
        .await
        .expect("missing");
    assert_eq!(missing.status(), 404);
    let missing: Value = missing.json().await.expect("json");
    let mut audit_refusals = Vec::new();
    for (query, names) in [("since=yesterday", "\"yesterday\" is not an RFC 3339 time"), ("until=now", "until")] {
        let refused =
            http.get(format!("{}/v1/replication/audit?{query}", relay.admin_url)).send().await.expect("audit");
        assert_eq!(refused.status(), 400, "{query}");
        let refused: Value = refused.json().await.expect("an ErrorModel, not plain text");
        assert!(refused["error"]["message"].as_str().is_some_and(|m| m.contains(names)), "{refused}");
        audit_refusals.push(refused);
    }

    assert_eq!(all["summary"]["lanes"], 1, "{all}");
    assert!(all["destinations"][0]["mode"].as_str().is_some_and(|m| m.contains("probed")), "{all}");
    assert_eq!(validate("ReplicationStatus", &[&all]).await["errors"], json!([]));
    assert_eq!(validate("TableStatus", &[&one]).await["errors"], json!([]));
    assert_eq!(validate("LaneStatus", &[&resynced]).await["errors"], json!([]));
    assert_eq!(validate("ErrorModel", &[&missing]).await["errors"], json!([]));
    assert_eq!(validate("ErrorModel", &audit_refusals.iter().collect::<Vec<_>>()).await["errors"], json!([]));
    // The validator is not blind.
    let mut wrong = one.clone();
    wrong["destinations"][0]["status"] = json!("fine");
    assert_ne!(validate("TableStatus", &[&wrong]).await["errors"], json!([]), "negative control");
    // And nothing secret is in it.
    let secret = SeaweedFs::shared().secret();
    assert!(!all.to_string().contains(secret) && !one.to_string().contains(secret));
    let metrics =
        http.get(format!("{}/metrics", relay.admin_url)).send().await.expect("metrics").text().await.expect("text");
    assert!(
        crate::harness::metric_sum(&metrics, "icerelay_replication_commits_total", &["destination=\"dr\""]) >= 1.0,
        "{metrics}"
    );
    assert!(crate::harness::metric_sum(&metrics, "icerelay_replication_files_copied_total", &[]) >= 3.0, "{metrics}");
    assert!(!metrics.contains(secret));

    // The same, as a user reads it.
    let (code, stdout, stderr) =
        crate::harness::icerelay(vec!["status".into(), "--admin".into(), relay.admin_url.clone()]).await;
    assert_eq!(code, 0, "{stderr}");
    let row = stdout.lines().find(|l| l.starts_with(&format!("{ns}.t"))).unwrap_or_else(|| panic!("{stdout}"));
    assert!(row.contains("dr") && row.contains("completed"), "{stdout}");
    let (code, _, stderr) =
        crate::harness::icerelay(vec!["status".into(), "--admin".into(), "http://127.0.0.1:1".into()]).await;
    assert_eq!(code, 2, "an unreachable admin API is exit code 2");
    assert!(stderr.contains("cannot reach http://127.0.0.1:1"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_that_is_down_catches_up_when_it_is_back() {
    let replica_server: &'static SeaweedFs = Box::leak(Box::new(SeaweedFs::start_with_warehouse("down", "replica")));
    down_and_back(Replica::Seaweed(replica_server), || replica_server.stop(), || replica_server.restart()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_java_catalog_replica_that_is_down_catches_up_when_it_is_back() {
    let java: &'static JavaRest = Box::leak(Box::new(JavaRest::start("down")));
    down_and_back(Replica::Java(java), || java.stop(), || java.restart()).await;
}

/// `replica` goes down (`stop`) while the source takes commits, and comes
/// back (`restart`): the lane retries on its own, counts what the replica
/// lacks meanwhile, and catches up.
async fn down_and_back(replica: Replica, stop: impl Fn(), restart: impl Fn()) {
    let (_ns, table, _state, relay) = replicating(replica, "down", "t").await;
    let written = write(&relay.url, &table, json!([{"op": "create"}, {"op": "append", "rows": 2}])).await;
    wait_replicated(&relay.admin_url, &table, written["metadata_location"].as_str().expect("location")).await;

    stop();
    // Writers do not notice: the primary answers as always.
    let mut ops: Vec<Value> = (1..=3).map(|k| json!({"op": "append", "start": k * 10, "rows": 2})).collect();
    ops.push(json!({"op": "add_column", "name": "note"}));
    ops.push(json!({"op": "append", "start": 90, "rows": 1}));
    let written = write(&relay.url, &table, Value::Array(ops)).await;
    let failing = wait_status(&relay.admin_url, &table, "a failure while the replica is down", |s| {
        s["status"] == "failed" && s["last_error"]["attempts"].as_i64().unwrap_or(0) >= 1
    })
    .await;
    assert_eq!(failing["last_error"]["waits_for_operator"], false, "retries on its own: {failing}");
    // The four snapshots the replica lacks are counted while it is down.
    let behind = wait_status(&relay.admin_url, &table, "the snapshots behind counted", |s| {
        s["snapshots_behind"].as_i64().unwrap_or(0) >= 4
    })
    .await;
    assert_eq!(behind["snapshots_behind"], 4, "{behind}");
    // Gauges are recomputed every few seconds.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics =
            reqwest::get(format!("{}/metrics", relay.admin_url)).await.expect("metrics").text().await.expect("text");
        let behind =
            crate::harness::metric_sum(&metrics, "icerelay_replication_snapshots_behind", &["destination=\"dr\""]);
        if behind == 4.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the gauge says {behind} snapshots behind, not 4:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(failing["last_error"]["message"].as_str().is_some_and(|m| m.contains("dr")), "{failing}");

    restart();
    let location = written["metadata_location"].as_str().expect("location");
    let status = wait_replicated(&relay.admin_url, &table, location).await;
    assert_eq!(status["last_error"], Value::Null);
    let rows = source_rows(&table).await;
    assert_replica_matches(replica, &table, &rows, &status).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_written_around_icerelay_is_reported_and_never_overwritten() {
    let replica_server = SeaweedFs::shared_replica();
    let replica = Replica::Seaweed(replica_server);
    let (_ns, table, _state, relay) = replicating(replica, "diverge", "t").await;
    let written = write(&relay.url, &table, json!([{"op": "create"}, {"op": "append", "rows": 2}])).await;
    wait_replicated(&relay.admin_url, &table, written["metadata_location"].as_str().expect("location")).await;

    let foreign = write_with(
        replica_server.client_conn(replica_server.catalog_uri()),
        &table,
        json!([{"op": "append", "start": 7000, "rows": 1}]),
    )
    .await;
    let foreign_id = foreign["snapshots"].as_array().and_then(|s| s.last()).and_then(|s| s["id"].as_i64()).expect("id");
    write(&relay.url, &table, json!([{"op": "append", "start": 20, "rows": 2}])).await;
    let failed = wait_status(&relay.admin_url, &table, "divergence reported", |s| s["status"] == "failed").await;
    let message = failed["last_error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("diverged") && message.contains(&foreign_id.to_string()), "{failed}");
    assert_eq!(failed["last_error"]["waits_for_operator"], true);
    let on_replica = replica.catalog().load_table(&ident(&table)).await.expect("load").expect("replica");
    assert_eq!(refs(&on_replica.metadata)["main"], foreign_id, "the foreign write is not overwritten");
}

#[tokio::test(flavor = "multi_thread")]
async fn renames_follow_and_a_paused_lane_waits() {
    let replica = Replica::Seaweed(SeaweedFs::shared_replica());
    let (ns, renamed, _state, relay) = rename_followed(replica).await;
    let catalog = replica.catalog();

    // The admin API is locked: no token, a wrong one, or a cross-site form
    // post change nothing; the probes stay open.
    let http = reqwest::Client::new();
    let action = |a: &str| format!("{}/v1/replication/namespaces/{ns}/tables/b/destinations/dr/{a}", relay.admin_url);
    let status_url = format!("{}/v1/replication/status", relay.admin_url);
    assert_eq!(http.get(&status_url).send().await.expect("status").status(), 401);
    assert_eq!(http.get(format!("{}/metrics", relay.admin_url)).send().await.expect("metrics").status(), 401);
    assert_eq!(http.get(format!("{}/healthz", relay.admin_url)).send().await.expect("healthz").status(), 200);
    let json_post = |url: String| http.post(url).header("content-type", "application/json");
    assert_eq!(json_post(action("pause")).send().await.expect("pause").status(), 401);
    assert_eq!(json_post(action("pause")).bearer_auth("wrong").send().await.expect("pause").status(), 401);
    let forged = http
        .post(action("pause"))
        .header("content-type", "text/plain")
        .header("origin", "https://attacker.example")
        .bearer_auth(ADMIN_TOKEN)
        .body("x=1")
        .send()
        .await
        .expect("forged");
    assert_eq!(forged.status(), 403);
    let not_json = http.post(action("pause")).bearer_auth(ADMIN_TOKEN).send().await.expect("pause");
    assert_eq!(not_json.status(), 415);
    assert_eq!(lane_status(&relay.admin_url, &renamed).await.expect("status")["status"], "completed");
    let (code, _, stderr) = icerelay(vec!["status".into(), "--admin".into(), relay.admin_url.clone()]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--token"), "says how to pass the token: {stderr}");
    let (code, stdout, stderr) = icerelay(vec![
        "status".into(),
        "--admin".into(),
        relay.admin_url.clone(),
        "--token".into(),
        ADMIN_TOKEN.into(),
    ])
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(&renamed), "{stdout}");

    let post = |a: &str| json_post(action(a)).bearer_auth(ADMIN_TOKEN);
    assert_eq!(post("pause").send().await.expect("pause").status(), 200);
    let written = write(&relay.url, &renamed, json!([{"op": "append", "start": 20, "rows": 2}])).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let paused = lane_status(&relay.admin_url, &renamed).await.expect("status");
    assert_eq!(paused["status"], "paused", "{paused}");
    let replica_ids = history(&catalog.load_table(&ident(&renamed)).await.expect("load").expect("t").metadata);
    let newest = written["snapshots"].as_array().and_then(|s| s.last()).and_then(|s| s["id"].as_i64()).expect("id");
    assert!(!replica_ids.contains_key(&newest), "a paused lane commits nothing");
    assert_eq!(post("resume").send().await.expect("resume").status(), 200);
    let status =
        wait_replicated(&relay.admin_url, &renamed, written["metadata_location"].as_str().expect("location")).await;
    let rows = source_rows(&renamed).await;
    assert_replica_matches(replica, &renamed, &rows, &status).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn history_a_catalog_would_refuse_fails_with_the_rule_and_the_remedy() {
    let replica = Replica::Seaweed(SeaweedFs::shared_replica());
    let ns = unique("old");
    let table = format!("{ns}.t");
    let source = SeaweedFs::shared();
    // Several commits of several kinds: the ways of carrying history below
    // replay all but the first.
    write(
        source.catalog_uri(),
        &table,
        json!([
            {"op": "create"},
            {"op": "append", "rows": 2},
            {"op": "add_column", "name": "note"},
            {"op": "append", "start": 10, "rows": 3},
            {"op": "overwrite", "category": "a", "start": 100, "rows": 2},
            {"op": "tag", "name": "v1"},
            {"op": "branch", "name": "audit"},
            {"op": "append", "start": 200, "rows": 2, "branch": "audit"},
            {"op": "set_property", "key": "owner", "value": "e2e"},
            {"op": "tx_delete_append", "id": 12, "start": 300, "rows": 2},
        ]),
    )
    .await;
    // Older than the 60 s a catalog tolerates.
    tokio::time::sleep(Duration::from_secs(62)).await;
    let state = tempfile::tempdir().expect("state");
    let relay = Relay::start(&relay_toml(replica, &ns, state.path(), "")).await;
    let failed = wait_status(&relay.admin_url, &table, "the refusal", |s| s["status"] == "failed").await;
    let message = failed["last_error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("timestamp rule") && message.contains("bootstrap = \"register\""), "{failed}");
    assert_eq!(failed["last_error"]["waits_for_operator"], true);
    assert!(replica.catalog().load_table(&ident(&table)).await.expect("load").is_none(), "no partial replica");
    // SeaweedFS's registerTable loses history, and it refuses a create
    // transaction with old snapshots: the probe tried both.
    let all = status(&relay.admin_url).await;
    let destination = &all["destinations"][0];
    let mode = destination["mode"].as_str().unwrap_or_default();
    assert!(
        mode.starts_with("create+replay: probed: registerTable loses history")
            && mode.contains("a create transaction with a snapshot from days ago is refused"),
        "{destination}"
    );

    // Iceberg's Java catalog keeps a registered table's history whole, and
    // takes it in a create transaction too: the same old table bootstraps
    // there each way, every snapshot, timestamp and snapshot-log entry kept.
    let current = seaweed_catalog(source).load_table(&ident(&table)).await.expect("load").expect("table");
    let source_rows = source_rows(&table).await;
    for way in [OldHistory::Probed, OldHistory::ProbedWithoutRegister, OldHistory::CreateTransaction] {
        let (server, uri) = way.catalog().await;
        let java = Replica::Java(server);
        let state = tempfile::tempdir().expect("state");
        let toml = relay_toml(java, &ns, state.path(), "")
            .replace(&server.uri, &uri)
            .replace("name = \"dr\"\n", &format!("name = \"dr\"\n{}\n", way.destination_setting()));
        let relay = Relay::start(&toml).await;
        let location = current.metadata_location.clone().expect("location");
        let status = wait_replicated(&relay.admin_url, &table, &location).await;
        assert!(status["mode"].as_str().is_some_and(|m| m.starts_with(way.mode())), "{way:?}: {status}");
        assert_replica_matches(java, &table, &source_rows, &status).await;
        let copy = java.catalog().load_table(&ident(&table)).await.expect("load").expect("replica");
        assert_eq!(
            copy.metadata["snapshot-log"], current.metadata["snapshot-log"],
            "{way:?}: the whole log, timestamps too"
        );
        assert_eq!(history(&copy.metadata), history(&current.metadata), "{way:?}");
        assert_eq!(copy.metadata["table-uuid"], current.metadata["table-uuid"], "{way:?}: the source's uuid");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn renames_follow_into_the_java_catalog() {
    rename_followed(Replica::Java(JavaRest::shared())).await;
}

/// A table renamed on the source (and written after) is renamed on
/// `replica`, and its rows follow; icerelay's admin API takes [`ADMIN_TOKEN`].
/// The namespace, the new name, the state directory and icerelay.
async fn rename_followed(replica: Replica) -> (String, String, tempfile::TempDir, Relay) {
    let ns = unique("rename");
    let state = tempfile::tempdir().expect("state");
    let extra = format!("admin_token = \"{ADMIN_TOKEN}\"");
    let relay = Relay::start(&relay_toml(replica, &ns, state.path(), &extra)).await;
    let written = write(&relay.url, &format!("{ns}.a"), json!([{"op": "create"}, {"op": "append", "rows": 2}])).await;
    wait_replicated(&relay.admin_url, &format!("{ns}.a"), written["metadata_location"].as_str().expect("location"))
        .await;

    let renamed = format!("{ns}.b");
    let written = write(
        &relay.url,
        &format!("{ns}.a"),
        json!([{"op": "rename", "to": renamed}, {"op": "append", "start": 10, "rows": 2}]),
    )
    .await;
    let status =
        wait_replicated(&relay.admin_url, &renamed, written["metadata_location"].as_str().expect("location")).await;
    let catalog = replica.catalog();
    assert!(catalog.load_table(&ident(&format!("{ns}.a"))).await.expect("load").is_none(), "the old name is gone");
    let rows = source_rows(&renamed).await;
    assert_replica_matches(replica, &renamed, &rows, &status).await;
    (ns, renamed, state, relay)
}

/// The ways an old table reaches a Java catalog.
#[derive(Debug, Clone, Copy)]
enum OldHistory {
    /// `bootstrap = "auto"`: the probe finds registerTable keeps history.
    Probed,
    /// `auto` in front of a catalog without registerTable (a stand-in that
    /// refuses it): the probe picks the create transaction.
    ProbedWithoutRegister,
    /// `bootstrap = "create-transaction"`, configured.
    CreateTransaction,
}

impl OldHistory {
    /// The Java catalog the replica lands in, and the URI icerelay is given for it.
    async fn catalog(self) -> (&'static JavaRest, String) {
        match self {
            Self::Probed => (JavaRest::shared(), JavaRest::shared().uri.clone()),
            Self::ProbedWithoutRegister => {
                let java: &'static JavaRest = Box::leak(Box::new(JavaRest::start("no-register")));
                let stand_in: &'static Served = Box::leak(Box::new(without_register(&java.uri).await));
                (java, stand_in.url.clone())
            }
            Self::CreateTransaction => {
                let java: &'static JavaRest = Box::leak(Box::new(JavaRest::start("create-transaction")));
                (java, java.uri.clone())
            }
        }
    }

    fn destination_setting(self) -> &'static str {
        match self {
            Self::CreateTransaction => "bootstrap = \"create-transaction\"",
            Self::Probed | Self::ProbedWithoutRegister => "",
        }
    }

    fn mode(self) -> &'static str {
        match self {
            Self::Probed => "register+replay: probed",
            Self::ProbedWithoutRegister => "create-transaction+replay: probed: registerTable is refused (",
            Self::CreateTransaction => "create-transaction+replay: configured",
        }
    }
}

/// A stand-in for a catalog that has no registerTable: `POST .../register`
/// answers 404 as an unknown route would; everything else goes to `upstream`.
async fn without_register(upstream: &str) -> Served {
    stand_in(upstream, |upstream, parts, body| async move {
        if parts.method == axum::http::Method::POST && parts.uri.path().ends_with("/register") {
            let error =
                json!({"error": {"message": "no route for this request", "type": "NotFoundException", "code": 404}});
            return (axum::http::StatusCode::NOT_FOUND, axum::Json(error)).into_response();
        }
        upstream.forward(&parts, body).await.into_response()
    })
    .await
}

/// icerelay replicating a fresh namespace (`prefix_...`) of a new rustberg
/// primary to the shared rustberg, with `replication` as its
/// `[replication]` section: the primary, the replica, the namespace, its
/// table `t`, the state directory and icerelay.
pub(crate) async fn between_rustbergs(
    prefix: &str,
    replication: &str,
) -> (&'static Rustberg, Replica, String, String, tempfile::TempDir, Relay) {
    from_rustberg_to(Replica::Rustberg(Rustberg::shared()), prefix, replication).await
}

/// [`between_rustbergs`] with `replica` as the destination.
pub(crate) async fn from_rustberg_to(
    replica: Replica,
    prefix: &str,
    replication: &str,
) -> (&'static Rustberg, Replica, String, String, tempfile::TempDir, Relay) {
    let primary: &'static Rustberg = Box::leak(Box::new(Rustberg::start(&format!("{prefix}-primary"))));
    let ns = unique(prefix);
    let table = format!("{ns}.t");
    let state = tempfile::tempdir().expect("state");
    let primary_toml = local_primary_toml(&primary.uri, &primary.warehouse);
    let relay = Relay::start(&relay_toml_for(&primary_toml, replica, &ns, state.path(), replication)).await;
    (primary, replica, ns, table, state, relay)
}

/// The `[primary]` of a catalog without auth on a local warehouse (rustberg,
/// the Java catalog), with the `[[storage]]` that reads it.
pub(crate) fn local_primary_toml(uri: &str, warehouse: &str) -> String {
    format!("[primary]\nuri = \"{uri}\"\nwarehouse = \"{warehouse}\"\n\n[[storage]]\nprefix = \"{warehouse}/\"\n")
}

/// icerelay's configuration: `primary_toml`, `replica` as the destination
/// `dr`, `replication` as the `[replication]` section, a rule for `namespace`.
pub(crate) fn relay_toml_for(
    primary_toml: &str,
    replica: Replica,
    namespace: &str,
    state: &std::path::Path,
    replication: &str,
) -> String {
    format!(
        "state_dir = \"{}\"\n{primary_toml}\n[replication]\n{replication}\n\n{}\n[[rules]]\nnamespace = \"{namespace}\"\ndestinations = [\"dr\"]\n",
        state.display(),
        replica.destination_toml(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn v3_tables_with_deletion_vectors_replicate_between_rustberg_catalogs() {
    // SeaweedFS refuses .puffin files, so deletion vectors replicate between
    // two rustberg catalogs (local warehouses) here.
    let (primary, replica, ns, table, _state, relay) = between_rustbergs(
        "vthree",
        "reconcile_interval = \"2s\"\nretry_initial_backoff = \"200ms\"\nretry_max_backoff = \"2s\"",
    )
    .await;
    let through = json!({"uri": relay.url, "warehouse": primary.warehouse});
    let ext = duckdb_extensions().display().to_string();
    let made =
        python("fixture_tables.py", vec!["duckdb-v3".into(), through.to_string(), ns.clone(), "t".into(), ext]).await;
    let location = made["metadata_location"].as_str().expect("location").to_owned();
    let status = wait_replicated(&relay.admin_url, &table, &location).await;

    let direct = RestCatalog::new(
        "primary",
        reqwest::Url::parse(&primary.uri).expect("uri"),
        Some(primary.warehouse.clone()),
        &AuthConfig::None,
        settings(),
    )
    .expect("client");
    let source_table = direct.load_table(&ident(&table)).await.expect("load").expect("source");
    assert_eq!(source_table.metadata["format-version"], 3);
    let replica_table = replica.catalog().load_table(&ident(&table)).await.expect("load").expect("replica");
    assert_eq!(replica_table.metadata["format-version"], 3);
    let (s, r) = (history(&source_table.metadata), history(&replica_table.metadata));
    for (id, snapshot) in &s {
        assert_eq!(r.get(id), Some(snapshot), "snapshot {id} differs on the replica");
    }
    let lineage = |m: &Value| (m["next-row-id"].clone(), m["last-sequence-number"].clone());
    assert_eq!(lineage(&replica_table.metadata), lineage(&source_table.metadata), "row lineage follows");
    assert_eq!(status["replica_metadata_location"], replica_table.metadata_location.clone().unwrap_or_default());

    let source_rows = read_catalog(primary.client_conn(), &table).await;
    let replica_rows = read_catalog(replica.conn(), &table).await;
    assert!(source_rows["errors"].get("duckdb").is_none(), "{source_rows}");
    assert_eq!(replica_rows["duckdb"], source_rows["duckdb"], "DuckDB reads the same rows at every snapshot");
    assert_eq!(replica_rows["pyiceberg"], source_rows["pyiceberg"]);
    assert_eq!(replica_rows["errors"], source_rows["errors"], "the same reader limits on both sides");
    let report = python(
        "check_copy.py",
        vec![replica_table.metadata_location.clone().expect("location"), primary.warehouse.clone()],
    )
    .await;
    assert_eq!(report["violations"], json!([]), "{report}");
    assert!(report["counts"]["puffins"].as_u64().unwrap_or(0) > 0, "deletion vectors were checked: {report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_source_dropped_and_created_again_does_not_overwrite_the_kept_replica() {
    let replica = Replica::Seaweed(SeaweedFs::shared_replica());
    let (_ns, table, _state, relay) = replicating(replica, "recreate", "t").await;
    let first = write(&relay.url, &table, json!([{"op": "create"}, {"op": "append", "rows": 3}])).await;
    wait_replicated(&relay.admin_url, &table, first["metadata_location"].as_str().expect("location")).await;
    let kept = replica.catalog().load_table(&ident(&table)).await.expect("load").expect("replica");

    write(&relay.url, &table, json!([{"op": "drop"}])).await;
    let again = write(&relay.url, &table, json!([{"op": "create"}, {"op": "append", "start": 50, "rows": 1}])).await;
    let failed = wait_status(&relay.admin_url, &table, "the refusal", |s| s["status"] == "failed").await;
    let message = failed["last_error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("dropped and created again") && message.contains("then resync"), "{failed}");
    let after = replica.catalog().load_table(&ident(&table)).await.expect("load").expect("replica");
    assert_eq!(history(&after.metadata), history(&kept.metadata), "the kept replica is untouched");
    assert_eq!(refs(&after.metadata), refs(&kept.metadata));

    // The remedy the refusal names: drop the old replica, then resync. The
    // new table is followed from its start.
    replica.catalog().drop_table(&ident(&table), false).await.expect("drop the old replica");
    let (ns, name) = table.rsplit_once('.').expect("ns.table");
    let resynced = crate::harness::http_client()
        .post(format!("{}/v1/replication/namespaces/{ns}/tables/{name}/destinations/dr/resync", relay.admin_url))
        .json(&json!({}))
        .send()
        .await
        .expect("resync");
    assert_eq!(resynced.status(), 200);
    wait_replicated(&relay.admin_url, &table, again["metadata_location"].as_str().expect("location")).await;
    let source = seaweed_catalog(SeaweedFs::shared()).load_table(&ident(&table)).await.expect("load").expect("source");
    let new_replica = replica.catalog().load_table(&ident(&table)).await.expect("load").expect("the new replica");
    assert_eq!(history(&new_replica.metadata), history(&source.metadata), "the new table's history, only");
    assert!(history(&new_replica.metadata).keys().all(|id| !history(&kept.metadata).contains_key(id)));
    assert_eq!(refs(&new_replica.metadata), refs(&source.metadata));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_promotion_with_no_replica_table_is_refused_at_once_and_leaves_the_lane_free() {
    let replica = Replica::Seaweed(SeaweedFs::shared_replica());
    let (ns, table, _state, relay) = replicating(replica, "nopromote", "t").await;
    let written = write(&relay.url, &table, json!([{"op": "create"}, {"op": "append", "rows": 2}])).await;
    wait_replicated(&relay.admin_url, &table, written["metadata_location"].as_str().expect("location")).await;
    replica.catalog().drop_table(&ident(&table), false).await.expect("drop the replica around icerelay");

    let http = crate::harness::http_client();
    let lane = format!("{}/v1/replication/namespaces/{ns}/tables/t/destinations/dr", relay.admin_url);
    let asked = Instant::now();
    let answer = http
        .post(format!("{lane}/promote"))
        .json(&json!({"now": true, "timeout_seconds": 60}))
        .send()
        .await
        .expect("promote");
    assert_eq!(answer.status(), 409);
    assert!(asked.elapsed() < Duration::from_secs(30), "answered when the lane withdrew, not at the timeout");
    let refusal: Value = answer.json().await.expect("json");
    let message = refusal["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("does not exist there") && message.contains("withdrawn"), "{refusal}");
    let status = lane_status(&relay.admin_url, &table).await.expect("status");
    assert_eq!((&status["promotion"], &status["promotion_requested"]), (&Value::Null, &Value::Null), "{status}");

    // Not held by the request: a resync makes the replica again.
    let resynced = http.post(format!("{lane}/resync")).json(&json!({})).send().await.expect("resync");
    assert_eq!(resynced.status(), 200);
    wait_replicated(&relay.admin_url, &table, written["metadata_location"].as_str().expect("location")).await;
    assert!(replica.catalog().load_table(&ident(&table)).await.expect("load").is_some(), "made again");
}

#[tokio::test(flavor = "multi_thread")]
async fn on_drop_propagate_drops_the_replica_too() {
    let replica = Replica::Seaweed(SeaweedFs::shared_replica());
    let ns = unique("propagate");
    let table = format!("{ns}.t");
    let state = tempfile::tempdir().expect("state");
    let toml = relay_toml(replica, &ns, state.path(), "")
        .replace("destinations = [\"dr\"]\n", "destinations = [\"dr\"]\non_drop = \"propagate\"\n");
    let relay = Relay::start(&toml).await;
    let written = write(&relay.url, &table, json!([{"op": "create"}, {"op": "append", "rows": 2}])).await;
    wait_replicated(&relay.admin_url, &table, written["metadata_location"].as_str().expect("location")).await;
    write(&relay.url, &table, json!([{"op": "drop"}])).await;
    wait_status(&relay.admin_url, &table, "the drop", |s| s["source_dropped"] == true).await;
    assert!(replica.catalog().load_table(&ident(&table)).await.expect("load").is_none(), "dropped on the replica too");
}

#[tokio::test(flavor = "multi_thread")]
async fn local_files_a_committer_points_at_are_never_read() {
    // Anyone with commit rights can point a table's data at a local
    // directory. icerelay's own disk is under no [[storage]] prefix, so the
    // lane stops before reading a byte, and says why.
    let replica = Replica::Seaweed(SeaweedFs::shared_replica());
    let (_ns, table, _state, relay) = replicating(replica, "confined", "t").await;
    let written = write(&relay.url, &table, json!([{"op": "create"}, {"op": "append", "rows": 2}])).await;
    wait_replicated(&relay.admin_url, &table, written["metadata_location"].as_str().expect("location")).await;

    let local = tempfile::tempdir().expect("local dir");
    let local_data = format!("file://{}/data", local.path().display());
    let written = write(
        &relay.url,
        &table,
        json!([{"op": "set_property", "key": "write.data.path", "value": local_data}, {"op": "append", "start": 10, "rows": 2}]),
    )
    .await;
    let local_files: Vec<_> = walk(local.path());
    assert!(!local_files.is_empty(), "the writer put its data files on the local disk");
    refused_for_an_operator(&relay, replica, &table, &written, &["outside every [[storage]] prefix", &local_data])
        .await;
}

/// The lane of `table` fails, waiting for an operator, with a message that
/// names each of `names`, and the newest snapshot of `written` never
/// reaches `replica`.
async fn refused_for_an_operator(relay: &Relay, replica: Replica, table: &str, written: &Value, names: &[&str]) {
    let failed = wait_status(&relay.admin_url, table, "a refusal", |s| s["status"] == "failed").await;
    let message = failed["last_error"]["message"].as_str().unwrap_or_default();
    assert!(names.iter().all(|name| message.contains(name)), "{names:?}: {failed}");
    assert_eq!(failed["last_error"]["waits_for_operator"], true, "{failed}");
    let newest = written["snapshots"].as_array().and_then(|s| s.last()).and_then(|s| s["id"].as_i64()).expect("id");
    let on_replica = replica.catalog().load_table(&ident(table)).await.expect("load").expect("replica");
    assert!(!history(&on_replica.metadata).contains_key(&newest), "the refused snapshot is not replicated");
}

#[tokio::test(flavor = "multi_thread")]
async fn paths_outside_the_rules_source_prefixes_are_never_read() {
    // Within the [[storage]] prefixes a committer could still point a table
    // at another table's files, which icerelay's credentials can read. A
    // rule's source_prefixes confine its tables.
    let replica = Replica::Seaweed(SeaweedFs::shared_replica());
    let ns = unique("prefixed");
    let table = format!("{ns}.t");
    let state = tempfile::tempdir().expect("state");
    let warehouse = SeaweedFs::shared().warehouse();
    let own = format!("s3://{warehouse}/{ns}");
    let toml = relay_toml(replica, &ns, state.path(), "")
        .replace("destinations = [\"dr\"]\n", &format!("destinations = [\"dr\"]\nsource_prefixes = [\"{own}\"]\n"));
    let relay = Relay::start(&toml).await;
    let written = write(&relay.url, &table, json!([{"op": "create"}, {"op": "append", "rows": 2}])).await;
    wait_replicated(&relay.admin_url, &table, written["metadata_location"].as_str().expect("location")).await;

    // Another table's directory (not replicated), which the writer may write to.
    let other = format!("{}.victim", unique("elsewhere"));
    let victim =
        write(SeaweedFs::shared().catalog_uri(), &other, json!([{"op": "create"}, {"op": "append", "rows": 1}])).await;
    let victim_metadata = victim["metadata_location"].as_str().expect("location");
    let elsewhere = format!("{}/data", victim_metadata.rsplit_once("/metadata/").expect("under metadata/").0);
    assert!(!elsewhere.starts_with(&format!("{own}/")), "{elsewhere} is another namespace's");
    let written = write(
        &relay.url,
        &table,
        json!([{"op": "set_property", "key": "write.data.path", "value": elsewhere}, {"op": "append", "start": 10, "rows": 2}]),
    )
    .await;
    let names = ["outside its rule's source_prefixes", elsewhere.as_str(), own.as_str()];
    refused_for_an_operator(&relay, replica, &table, &written, &names).await;
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

// === AWS SigV4 (SeaweedFS's Iceberg endpoint verifies it like S3 Tables) ===

/// icerelay's configuration with SigV4 everywhere: `primary_auth` and `replica_auth` are `auth` tables.
fn sigv4_toml(ns: &str, state: &std::path::Path, primary_auth: &str, replica_auth: &str) -> String {
    let (source, replica) = (SeaweedFs::shared(), SeaweedFs::shared_replica());
    format!(
        "state_dir = \"{}\"\n[primary]\nuri = \"{}\"\nwarehouse = \"{}\"\nauth = {primary_auth}\nengine_auth = \"sigv4\"\n\n[replication]\nreconcile_interval = \"2s\"\nretry_initial_backoff = \"200ms\"\nretry_max_backoff = \"1s\"\n\n{}\n[[destinations]]\nname = \"dr\"\nuri = \"{}\"\nwarehouse = \"{}\"\nauth = {replica_auth}\n\n{}\n[[rules]]\nnamespace = \"{ns}\"\ndestinations = [\"dr\"]\n",
        state.display(),
        source.catalog_uri(),
        source.warehouse(),
        source.storage_toml(),
        replica.catalog_uri(),
        replica.warehouse(),
        replica.storage_toml(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn sigv4_everywhere_with_engines_that_sign_and_engines_that_do_not() {
    let (source, replica) = (SeaweedFs::shared(), SeaweedFs::shared_replica());
    let ns = unique("sigv4");
    let table = format!("{ns}.t");
    let state = tempfile::tempdir().expect("state");
    let toml = sigv4_toml(&ns, state.path(), &source.sigv4_auth_toml(None), &replica.sigv4_auth_toml(None));
    let relay = Relay::start(&toml).await;

    // An engine configured for AWS signs for icerelay's address; icerelay
    // signs again for the primary. Another engine sends no credentials.
    let (id, secret) = source.keys();
    let signing = json!({"uri": relay.url, "warehouse": source.warehouse(), "s3": source.s3_json(),
                         "sigv4": {"access_key_id": id, "secret_access_key": secret}});
    let anonymous = json!({"uri": relay.url, "warehouse": source.warehouse(), "s3": source.s3_json()});
    write_with(
        signing,
        &table,
        json!([{"op": "create"}, {"op": "append", "rows": 4}, {"op": "add_column", "name": "note"},
               {"op": "append", "start": 10, "rows": 3}, {"op": "delete_below", "id": 2}, {"op": "tag", "name": "v1"}]),
    )
    .await;
    let written = write_with(anonymous, &table, json!([{"op": "append", "start": 20, "rows": 2}])).await;
    let status =
        wait_replicated(&relay.admin_url, &table, written["metadata_location"].as_str().expect("location")).await;
    let rows = source_rows(&table).await;
    assert_replica_matches(Replica::Seaweed(replica), &table, &rows, &status).await;
    let replica_table = Replica::Seaweed(replica).catalog().load_table(&ident(&table)).await.expect("load").expect("t");
    assert!(refs(&replica_table.metadata).contains_key("v1"), "the tag is replicated");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_sigv4_secret_names_the_key_id_and_never_the_secret() {
    let (source, replica) = (SeaweedFs::shared(), SeaweedFs::shared_replica());
    let ns = unique("sigv4bad");
    let table = format!("{ns}.t");
    let state = tempfile::tempdir().expect("state");
    let wrong = "wrong-secret-value-6621";
    let toml = sigv4_toml(
        &ns,
        &state.path().join("state"),
        &source.sigv4_auth_toml(None),
        &replica.sigv4_auth_toml(Some(wrong)),
    );
    let config = state.path().join("icerelay.toml");
    std::fs::write(&config, toml).expect("config");
    let relay = RelayProcess::start(&["serve", "--config", &config.display().to_string()], &[]).await;
    write(&relay.url, &table, json!([{"op": "create"}, {"op": "append", "rows": 2}])).await;
    let failed = wait_status(&relay.admin_url, &table, "a refused signature", |s| s["status"] == "failed").await;
    let message = failed["last_error"]["message"].as_str().unwrap_or_default();
    let (id, _) = replica.keys();
    assert!(
        message.contains("SigV4") && message.contains(&format!("key id {id}")) && message.contains("s3tables"),
        "{failed}"
    );
    let all = reqwest::get(format!("{}/v1/replication/status", relay.admin_url))
        .await
        .expect("status")
        .text()
        .await
        .expect("text");
    let metrics =
        reqwest::get(format!("{}/metrics", relay.admin_url)).await.expect("metrics").text().await.expect("text");
    for (what, text) in [("status", all), ("metrics", metrics), ("logs", relay.logs())] {
        assert!(!text.contains(wrong) && !text.contains(source.secret()), "a secret leaked into the {what}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigv4_keys_from_the_environment_and_a_rotated_profile_file() {
    let (source, replica) = (SeaweedFs::shared(), SeaweedFs::shared_replica());
    let (id, secret) = source.keys();
    let ns = unique("sigv4env");
    let table = format!("{ns}.t");
    let dir = tempfile::tempdir().expect("dir");
    // The primary's keys only in environment variables; the replica's only
    // in a shared credentials file, under a profile, with a wrong secret first.
    let credentials = dir.path().join("credentials");
    std::fs::write(
        &credentials,
        format!("[replica]\naws_access_key_id = {id}\naws_secret_access_key = stale-secret-0934\n"),
    )
    .expect("credentials");
    let from_env = "{ type = \"sigv4\", service = \"s3tables\", region = \"us-east-1\" }";
    let from_profile = "{ type = \"sigv4\", service = \"s3tables\", region = \"us-east-1\", profile = \"replica\" }";
    let config = dir.path().join("icerelay.toml");
    // The [[storage]] sections lose their keys too: S3 credentials come from the chain as well.
    let toml = sigv4_toml(&ns, &dir.path().join("state"), from_env, from_profile)
        .replace(&format!("access_key_id = \"{id}\"\nsecret_access_key = \"{secret}\"\n"), "");
    assert!(!toml.contains(secret), "no key left in the file:\n{toml}");
    std::fs::write(&config, toml).expect("config");
    let credentials_file = credentials.display().to_string();
    let missing = dir.path().join("no-config").display().to_string();
    let relay = RelayProcess::start(
        &["serve", "--config", &config.display().to_string()],
        &[
            ("AWS_ACCESS_KEY_ID", id),
            ("AWS_SECRET_ACCESS_KEY", secret),
            ("AWS_SHARED_CREDENTIALS_FILE", &credentials_file),
            ("AWS_CONFIG_FILE", &missing),
        ],
    )
    .await;
    let written = write(&relay.url, &table, json!([{"op": "create"}, {"op": "append", "rows": 2}])).await;
    let failed =
        wait_status(&relay.admin_url, &table, "the stale profile secret refused", |s| s["status"] == "failed").await;
    assert!(failed["last_error"]["message"].as_str().is_some_and(|m| m.contains("SigV4")), "{failed}");
    // Rotated in the file while icerelay runs: picked up without a restart.
    std::fs::write(&credentials, format!("[replica]\naws_access_key_id = {id}\naws_secret_access_key = {secret}\n"))
        .expect("rotate");
    let status =
        wait_replicated(&relay.admin_url, &table, written["metadata_location"].as_str().expect("location")).await;
    let rows = source_rows(&table).await;
    assert_replica_matches(Replica::Seaweed(replica), &table, &rows, &status).await;
    assert!(!relay.logs().contains("stale-secret-0934") && !relay.logs().contains(secret), "{}", relay.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_s3_tables_shaped_setup_replicates_with_vended_credentials_only() {
    use std::sync::atomic::Ordering;
    let (source, replica) = (SeaweedFs::shared(), SeaweedFs::shared_replica());
    // Catalogs that vend (expired at issue: they must be renewed before use)
    // in front of both SeaweedFS instances; SigV4 everywhere; no S3 keys.
    let lifetime = Duration::from_secs(3);
    let (primary, destination) =
        (VendingCatalog::start(source, lifetime).await, VendingCatalog::start(replica, lifetime).await);
    let ns = unique("vended");
    let table = format!("{ns}.t");
    let dir = tempfile::tempdir().expect("dir");
    let (id, secret) = source.keys();
    let toml =
        sigv4_toml(&ns, &dir.path().join("state"), &source.sigv4_auth_toml(None), &replica.sigv4_auth_toml(None))
            .replace(&format!("uri = \"{}\"", source.catalog_uri()), &format!("uri = \"{}\"", primary.url))
            .replace(&format!("uri = \"{}\"", replica.catalog_uri()), &format!("uri = \"{}\"", destination.url))
            .replace(&format!("access_key_id = \"{id}\"\nsecret_access_key = \"{secret}\"\n"), "");
    assert!(!toml.contains(&format!("secret_access_key = \"{secret}\"\n")), "[[storage]] has no keys:\n{toml}");
    let config = dir.path().join("icerelay.toml");
    std::fs::write(&config, toml).expect("config");
    let relay = RelayProcess::start(&["serve", "--config", &config.display().to_string()], &[]).await;

    let signing = json!({"uri": relay.url, "warehouse": source.warehouse(), "s3": source.s3_json(),
                         "sigv4": {"access_key_id": id, "secret_access_key": secret}});
    write_with(signing.clone(), &table, json!([{"op": "create"}, {"op": "append", "rows": 3}])).await;
    let written = write_with(signing.clone(), &table, json!([{"op": "append", "start": 10, "rows": 2}])).await;
    let status =
        wait_replicated(&relay.admin_url, &table, written["metadata_location"].as_str().expect("location")).await;
    let renewed = destination.counts.renewals.load(Ordering::SeqCst);
    assert!(primary.counts.vended.load(Ordering::SeqCst) > 0 && primary.counts.renewals.load(Ordering::SeqCst) > 0);
    assert!(destination.counts.vended.load(Ordering::SeqCst) > 0 && renewed > 0);

    // Past the renewed credentials' life: renewed again, replication goes on.
    tokio::time::sleep(lifetime + Duration::from_secs(1)).await;
    let written =
        write_with(signing, &table, json!([{"op": "delete_below", "id": 1}, {"op": "tag", "name": "v1"}])).await;
    let status2 =
        wait_replicated(&relay.admin_url, &table, written["metadata_location"].as_str().expect("location")).await;
    assert!(destination.counts.renewals.load(Ordering::SeqCst) > renewed, "renewed for the later commits too");
    let rows = source_rows(&table).await;
    assert_replica_matches(Replica::Seaweed(replica), &table, &rows, &status2).await;
    assert_ne!(status["replica_metadata_location"], status2["replica_metadata_location"]);
    for catalog in [&primary, &destination] {
        assert_eq!(catalog.counts.unsigned.load(Ordering::SeqCst), 0, "every request the catalogs got was signed");
    }
    let logs = relay.logs();
    assert!(!logs.contains(secret) && !logs.contains(EXPIRED_SECRET), "a secret leaked:\n{logs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn time_travel_by_timestamp_reads_the_same_rows_on_the_replica_at_every_moment_of_the_source_log() {
    let replica = Replica::Seaweed(SeaweedFs::shared_replica());
    let (_ns, table, _state, relay) = replicating(replica, "asof", "t").await;
    // An overwrite, a transaction with a delete and an append, and a dynamic
    // partition overwrite each add two snapshots in one commit.
    let written = write(
        &relay.url,
        &table,
        json!([
            {"op": "create", "partitioned": false},
            {"op": "partition_by", "field": "category"},
            {"op": "append", "start": 0, "rows": 6},
            {"op": "overwrite", "category": "a", "start": 100, "rows": 3},
            {"op": "tx_delete_append", "id": 3, "start": 200, "rows": 2},
            {"op": "dynamic_overwrite", "start": 300, "rows": 3},
            {"op": "append", "start": 400, "rows": 2},
        ]),
    )
    .await;
    let location = written["metadata_location"].as_str().expect("location");
    let status = wait_replicated(&relay.admin_url, &table, location).await;
    let rows = source_rows(&table).await;
    assert_replica_matches(replica, &table, &rows, &status).await;

    let source = seaweed_catalog(SeaweedFs::shared()).load_table(&ident(&table)).await.expect("load").expect("source");
    let log: Vec<(i64, i64)> = source.metadata["snapshot-log"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| Some((e["snapshot-id"].as_i64()?, e["timestamp-ms"].as_i64()?)))
        .collect();
    let logged: std::collections::BTreeSet<i64> = log.iter().map(|(id, _)| *id).collect();
    let intermediate: Vec<i64> = source.metadata["snapshots"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["snapshot-id"].as_i64().is_some_and(|id| !logged.contains(&id)))
        .filter_map(|s| s["timestamp-ms"].as_i64())
        .collect();
    assert!(intermediate.len() >= 3, "three commits of two snapshots each: {}", source.metadata["snapshots"]);
    // Every millisecond boundary of the source's log, and the intermediate snapshots' times.
    let mut times = std::collections::BTreeSet::new();
    for (_, ts) in &log {
        times.extend([ts - 1, *ts, ts + 1]);
    }
    times.extend(intermediate.iter().flat_map(|ts| [ts - 1, *ts]));
    let times = json!(times.into_iter().collect::<Vec<_>>()).to_string();
    let read = |conn: Value| {
        let args = vec![conn.to_string(), table.clone(), times.clone(), duckdb_extensions().display().to_string()];
        python("read_as_of.py", args)
    };
    let on_source = read(SeaweedFs::shared().client_conn(SeaweedFs::shared().catalog_uri())).await;
    let on_replica = read(replica.conn()).await;
    assert_eq!(on_source["errors"], json!({}), "{on_source}");
    assert_eq!(on_replica["errors"], json!({}), "{on_replica}");
    for reader in ["pyiceberg", "duckdb"] {
        assert_eq!(on_replica[reader], on_source[reader], "{reader}: rows as of each time");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ref_move_without_a_snapshot_gets_the_replicas_own_log_time_and_the_status_says_by_how_much() {
    let replica = Replica::Seaweed(SeaweedFs::shared_replica());
    let (_ns, table, _state, relay) = replicating(replica, "drift", "t").await;
    let ops =
        json!([{"op": "create"}, {"op": "append", "start": 0, "rows": 2}, {"op": "append", "start": 10, "rows": 2}]);
    let written = write(&relay.url, &table, ops).await;
    let status =
        wait_replicated(&relay.admin_url, &table, written["metadata_location"].as_str().expect("location")).await;
    assert_eq!(status["snapshot_log_drift"], json!({"entries": 0, "max_ms": 0}), "{status}");

    // A rollback moves main to an existing snapshot: a bare set-snapshot-ref on the replica.
    let rolled = write(&relay.url, &table, json!([{"op": "rollback"}])).await;
    let status =
        wait_replicated(&relay.admin_url, &table, rolled["metadata_location"].as_str().expect("location")).await;
    let source = seaweed_catalog(SeaweedFs::shared()).load_table(&ident(&table)).await.expect("load").expect("source");
    let on_replica = replica.catalog().load_table(&ident(&table)).await.expect("load").expect("replica");
    let last = |m: &Value| {
        let entry = m["snapshot-log"].as_array().and_then(|l| l.last()).cloned().expect("a log entry");
        (entry["snapshot-id"].as_i64().expect("id"), entry["timestamp-ms"].as_i64().expect("time"))
    };
    let ((source_id, source_at), (replica_id, replica_at)) = (last(&source.metadata), last(&on_replica.metadata));
    assert_eq!(source_id, replica_id, "the same snapshot is current on both");
    let gap = replica_at - source_at;
    assert!(gap > 0, "the replica's entry is stamped when the replica commits, after the source's: {gap} ms");
    assert_eq!(status["snapshot_log_drift"], json!({"entries": 1, "max_ms": gap}), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn reconcile_asks_a_catalog_with_entity_tags_conditionally_and_still_sees_commits_made_around_icerelay() {
    // rustberg answers loadTable with an ETag and `304 Not Modified` to it
    // (SeaweedFS sends none): an unchanged table costs no metadata.
    let (primary, _replica, _ns, table, _state, relay) =
        between_rustbergs("etag", "reconcile_interval = \"500ms\"").await;
    let through = json!({"uri": relay.url, "warehouse": primary.warehouse});
    let written = write_with(through, &table, json!([{"op": "create"}, {"op": "append", "rows": 2}])).await;
    wait_replicated(&relay.admin_url, &table, written["metadata_location"].as_str().expect("location")).await;

    let checks = || async {
        let text = crate::harness::http_client()
            .get(format!("{}/metrics", relay.admin_url))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        let count = |result: &str| {
            crate::harness::metric_sum(
                &text,
                "icerelay_replication_reconcile_checks_total",
                &[&format!("result=\"{result}\"")],
            )
        };
        (count("loaded"), count("not_modified"))
    };
    // Once the entity tag is known, passes over the unchanged table get 304s only.
    let deadline = Instant::now() + Duration::from_secs(60);
    while checks().await.1 < 1.0 {
        assert!(Instant::now() < deadline, "no conditional load answered 304: {:?}", checks().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (loaded, not_modified) = checks().await;
    while checks().await.1 < not_modified + 3.0 {
        assert!(Instant::now() < deadline, "reconcile stopped: {:?}", checks().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(checks().await.0, loaded, "three more passes loaded nothing in full");

    // A commit made straight on the primary changes the tag: the next pass loads it and replicates.
    let direct = json!({"uri": primary.uri, "warehouse": primary.warehouse});
    let around = write_with(direct, &table, json!([{"op": "append", "start": 10, "rows": 2}])).await;
    let location = around["metadata_location"].as_str().expect("location");
    let status = wait_replicated(&relay.admin_url, &table, location).await;
    assert!(checks().await.0 > loaded, "the changed table was loaded");
    assert_eq!(status["status"], "completed");
}
