//! Apache Iceberg's own Java catalog logic (`harness::java_rest`) as a
//! primary and as a destination. Most production REST catalogs validate
//! commits with Java's `TableMetadata`, which is stricter than SeaweedFS or
//! rustberg in places (three timestamp checks, sequence numbers, its own
//! snapshot-log rules): every replica commit icerelay makes must pass it.
//! SeaweedFS → Java is `replication::a_table_created_through_icerelay_is_followed_into_the_java_catalog`.

use serde_json::{Value, json};

use crate::harness::java_rest::JavaRest;
use crate::harness::{Relay, Rustberg, python, unique};
use crate::replication::{
    Replica, history, ident, local_primary_toml, read_catalog, refs, relay_toml_for, rustberg_catalog, wait_replicated,
    write_with,
};

/// icerelay with a fresh Java catalog as the primary and `replica` as the
/// destination, for the namespace it returns.
pub(crate) async fn from_java(prefix: &str, replica: Replica) -> (&'static JavaRest, String, tempfile::TempDir, Relay) {
    let primary: &'static JavaRest = Box::leak(Box::new(JavaRest::start(&format!("{prefix}-primary"))));
    let ns = unique(prefix);
    let state = tempfile::tempdir().expect("state");
    let replication = "reconcile_interval = \"2s\"\nretry_initial_backoff = \"200ms\"\nretry_max_backoff = \"2s\"";
    let primary_toml = local_primary_toml(&primary.uri, &primary.warehouse);
    let toml = relay_toml_for(&primary_toml, replica, &ns, state.path(), replication);
    let relay = Relay::start(&toml).await;
    (primary, ns, state, relay)
}

/// PyIceberg writes every kind of commit through icerelay to the Java
/// catalog; `replica` must end with every snapshot (ids, parents, sequence
/// numbers, timestamps, summaries), the refs, the snapshot-log and the rows
/// PyIceberg and DuckDB read at every snapshot.
async fn java_primary_replicates_to(replica: Replica, prefix: &str) {
    let (primary, ns, _state, relay) = from_java(prefix, replica).await;
    let table = format!("{ns}.events");
    let through = json!({"uri": relay.url, "warehouse": primary.warehouse});
    let written = write_with(
        through,
        &table,
        json!([
            {"op": "create"},
            {"op": "append", "start": 0, "rows": 6},
            {"op": "append", "start": 6, "rows": 6},
            {"op": "add_column", "name": "note"},
            {"op": "append", "start": 12, "rows": 4},
            {"op": "partition_by", "field": "category"},
            {"op": "append", "start": 22, "rows": 4},
            {"op": "overwrite", "category": "a", "start": 100, "rows": 3},
            {"op": "delete_below", "id": 4},
            {"op": "tx_delete_append", "id": 8, "start": 500, "rows": 2},
            {"op": "tag", "name": "v1"},
            {"op": "branch", "name": "audit"},
            {"op": "append", "start": 200, "rows": 2, "branch": "audit"},
            {"op": "append", "start": 300, "rows": 2},
            {"op": "set_property", "key": "owner", "value": "e2e"},
        ]),
    )
    .await;
    let location = written["metadata_location"].as_str().expect("location").to_owned();
    let status = wait_replicated(&relay.admin_url, &table, &location).await;
    assert_eq!(status["snapshots_behind"], 0, "{status}");

    let source = rustberg_catalog(&primary.uri, &primary.warehouse)
        .load_table(&ident(&table))
        .await
        .expect("load")
        .expect("source");
    let copy = replica.catalog().load_table(&ident(&table)).await.expect("load").expect("replica");
    let (s, r) = (history(&source.metadata), history(&copy.metadata));
    assert!(s.len() >= 10, "{s:?}");
    assert_eq!(r, s, "every snapshot of {table}, as the source has it");
    assert_eq!(refs(&copy.metadata), refs(&source.metadata), "refs");
    let log = |m: &Value| m["snapshot-log"].clone();
    assert_eq!(log(&copy.metadata), log(&source.metadata), "snapshot-log");
    assert_eq!(copy.metadata["properties"]["owner"], "e2e");

    let source_rows = read_catalog(primary.client_conn(), &table).await;
    let replica_rows = read_catalog(replica.conn(), &table).await;
    assert_eq!(source_rows["errors"], json!({}), "{source_rows}");
    assert_eq!(replica_rows["errors"], json!({}), "{replica_rows}");
    assert_eq!(replica_rows["pyiceberg"], source_rows["pyiceberg"], "PyIceberg at every snapshot");
    assert_eq!(replica_rows["duckdb"], source_rows["duckdb"], "DuckDB at every snapshot");
    let report = python(
        "check_copy.py",
        vec![copy.metadata_location.clone().expect("location"), format!("{}/", primary.warehouse)],
    )
    .await;
    assert_eq!(report["violations"], json!([]), "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_java_catalog_as_primary_replicates_to_rustberg() {
    java_primary_replicates_to(Replica::Rustberg(Rustberg::shared()), "javarb").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_java_catalog_as_primary_replicates_to_the_java_catalog() {
    java_primary_replicates_to(Replica::Java(JavaRest::shared()), "javajava").await;
}
