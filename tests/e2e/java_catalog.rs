//! Apache Iceberg's own Java catalog logic (`harness::java_rest`) as a
//! primary and as a destination. Most production REST catalogs validate
//! commits with Java's `TableMetadata`, which is stricter than SeaweedFS or
//! rustberg in places (three timestamp checks, sequence numbers, its own
//! snapshot-log rules): every replica commit icerelay makes must pass it.
//! SeaweedFS → Java is `replication::a_table_created_through_icerelay_is_followed_into_the_java_catalog`.

use serde_json::{Value, json};

use crate::harness::java_rest::JavaRest;
use icerelay::catalog::{Namespace, TableIdent};
use icerelay::state::now_ms;

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

/// PyIceberg (and DuckDB, a merge-on-read delete) writes every kind of
/// commit through icerelay to the Java catalog; `replica` must end with every snapshot (ids, parents, sequence
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
            {"op": "duckdb_delete", "ids": [13, 14]},
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

/// What the Java catalog does with the requests of README.md's capability
/// matrix that no replication test shows, asked directly (and, for the
/// create transaction, what rustberg does; the probe never asks it there).
#[tokio::test(flavor = "multi_thread")]
async fn the_java_catalog_answers_as_the_capability_matrix_says() {
    let java = JavaRest::shared();
    let catalog = rustberg_catalog(&java.uri, &java.warehouse);
    let ns = Namespace::new(vec![unique("matrix")]);
    catalog.ensure_namespace(&ns).await.expect("namespace");
    let schema = json!({"type": "struct", "schema-id": 0, "fields": [
        {"id": 1, "name": "id", "type": "long", "required": false},
        {"id": 3, "name": "name", "type": "string", "required": false}]});
    let spec =
        json!({"spec-id": 0, "fields": [{"source-id": 3, "field-id": 1007, "name": "name", "transform": "identity"}]});

    // createTable numbers field ids and partition field ids afresh.
    let request = json!({"name": "ids", "schema": schema, "partition-spec": spec});
    let created = catalog.create_table(&ns, &request).await.expect("createTable");
    let field_ids = |m: &Value| -> Vec<i64> {
        m["schemas"][0]["fields"].as_array().into_iter().flatten().filter_map(|f| f["id"].as_i64()).collect()
    };
    println!(
        "createTable: field ids {:?}, spec {}",
        field_ids(&created.metadata),
        created.metadata["partition-specs"][0]
    );
    assert_eq!(field_ids(&created.metadata), [1, 2], "field ids reassigned");
    assert_eq!(created.metadata["partition-specs"][0]["fields"][0]["field-id"], 1000, "partition field ids reassigned");

    // The timestamp rule: a snapshot 120 s older than the table is refused,
    // one 30 s older is taken.
    let table = TableIdent::new(ns.clone(), "ids");
    let uuid = created.metadata["table-uuid"].as_str().expect("uuid").to_owned();
    let last_updated = created.metadata["last-updated-ms"].as_i64().expect("last-updated-ms");
    let location = created.metadata["location"].as_str().expect("location").to_owned();
    let snapshot = |id: i64, parent: Option<i64>, sequence: i64, at: i64| {
        let mut added = json!({"snapshot-id": id, "sequence-number": sequence, "timestamp-ms": at, "schema-id": 0,
            "summary": {"operation": "append"}, "manifest-list": format!("{location}/metadata/snap-{id}.avro")});
        if let Some(parent) = parent {
            added["parent-snapshot-id"] = json!(parent);
        }
        json!({"action": "add-snapshot", "snapshot": added})
    };
    let set_main =
        |id: i64| json!({"action": "set-snapshot-ref", "ref-name": "main", "type": "branch", "snapshot-id": id});
    let guard = |main: Option<i64>| {
        vec![
            json!({"type": "assert-table-uuid", "uuid": uuid}),
            json!({"type": "assert-ref-snapshot-id", "ref": "main", "snapshot-id": main}),
        ]
    };
    let old = catalog
        .update_table(&table, &guard(None), &[snapshot(11, None, 1, last_updated - 120_000), set_main(11)])
        .await;
    println!("a snapshot 120 s older than the table: {old:?}");
    assert!(old.as_ref().is_err_and(|e| e.status().is_some_and(|s| s.as_u16() == 400)), "refused: {old:?}");
    let recent =
        catalog.update_table(&table, &guard(None), &[snapshot(12, None, 1, last_updated - 30_000), set_main(12)]).await;
    assert!(recent.is_ok(), "within the minute: {recent:?}");

    // Idempotency-Key: the same commit sent twice with the same key.
    let commit = json!({"identifier": {"namespace": ns.levels(), "name": "ids"}, "requirements": guard(Some(12)),
        "updates": [snapshot(13, Some(12), 2, now_ms()), set_main(13)]});
    let url = format!("{}/v1/namespaces/{}/tables/ids", java.uri, ns.to_path_segment());
    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let answer = http
            .post(&url)
            .header("Idempotency-Key", "0190d1f6-0000-7000-8000-00000000abcd")
            .json(&commit)
            .send()
            .await
            .expect("commit");
        statuses.push(answer.status().as_u16());
    }
    println!("the same commit twice with one Idempotency-Key: {statuses:?}");
    assert_eq!(statuses, [200, 409], "the key is ignored: the second is refused by its requirement");

    // Dropping without purge keeps the table's files.
    let metadata_file =
        catalog.load_table(&table).await.expect("load").expect("table").metadata_location.expect("file");
    catalog.drop_table(&table, false).await.expect("drop");
    let path = metadata_file.trim_start_matches("file://");
    println!("after a drop without purge, {path} exists: {}", std::path::Path::new(path).exists());
    assert!(std::path::Path::new(path).exists(), "files kept");

    // A create transaction whose commit carries a snapshot 30 days old:
    // Java takes it with its history, rustberg refuses it (and makes nothing).
    for (name, uri, warehouse, takes_it) in [
        ("java", java.uri.as_str(), java.warehouse.as_str(), true),
        ("rustberg", Rustberg::shared().uri.as_str(), Rustberg::shared().warehouse.as_str(), false),
    ] {
        let catalog = rustberg_catalog(uri, warehouse);
        catalog.ensure_namespace(&ns).await.expect("namespace");
        let staged = catalog
            .create_table(&ns, &json!({"name": "staged", "schema": schema, "stage-create": true}))
            .await
            .expect("stage-create");
        let table = TableIdent::new(ns.clone(), "staged");
        let location = staged.metadata["location"].as_str().expect("location").to_owned();
        let long_ago = now_ms() - 30 * 24 * 3600 * 1000;
        let add = json!({"action": "add-snapshot", "snapshot": {"snapshot-id": 21, "sequence-number": 1,
            "timestamp-ms": long_ago, "schema-id": 0, "summary": {"operation": "append"},
            "manifest-list": format!("{location}/metadata/snap-21.avro")}});
        let uuid = uuid::Uuid::new_v4().to_string();
        let made = catalog.commit_create(&table, &staged.metadata, &uuid, &[add, set_main(21)]).await;
        let loaded = catalog.load_table(&table).await.expect("load");
        println!("{name}: a create transaction with a snapshot 30 days old: {:?}", made.as_ref().map(|_| "accepted"));
        if takes_it {
            assert!(made.is_ok(), "{name}: {made:?}");
            let loaded = loaded.expect("made");
            let log = &loaded.metadata["snapshot-log"];
            assert_eq!(log, &json!([{"snapshot-id": 21, "timestamp-ms": long_ago}]), "{name}: history kept");
            assert_eq!(loaded.metadata["table-uuid"], json!(uuid), "{name}: uuid kept");
        } else {
            assert!(made.as_ref().is_err_and(|e| e.status().is_some_and(|s| s.as_u16() == 400)), "{name}: {made:?}");
            assert!(loaded.is_none(), "{name}: a refused create transaction makes no table");
        }
    }
}

/// Sources whose schema ids have a gap (schema 1 of 0, 1, 2 removed): the
/// staged create numbers schema 2 as 1, so the first replica commit has to be
/// parted, metadata first, which dates the replica now. A young table's
/// snapshots replay after it; an old table's never could, so its create
/// transaction is refused before anything is made, with the remedy.
#[tokio::test(flavor = "multi_thread")]
async fn a_first_commit_a_create_transaction_cannot_carry_is_refused_before_anything_is_made() {
    let primary: &'static JavaRest = Box::leak(Box::new(JavaRest::start("gap-primary")));
    let destination: &'static JavaRest = Box::leak(Box::new(JavaRest::start("gap-replica")));
    let ns = unique("gap");
    let with_gap = |table: String| async move {
        let ops = json!([
            {"op": "create"},
            {"op": "add_column", "name": "x"},
            {"op": "add_column", "name": "y"},
            {"op": "append", "rows": 2},
            {"op": "append", "start": 2, "rows": 2},
        ]);
        write_with(primary.client_conn(), &table, ops).await;
        let removed = rustberg_catalog(&primary.uri, &primary.warehouse)
            .update_table(&ident(&table), &[], &[json!({"action": "remove-schemas", "schema-ids": [1]})])
            .await
            .expect("schema 1 removed");
        let ids: Vec<i64> = removed.metadata["schemas"]
            .as_array()
            .expect("schemas")
            .iter()
            .filter_map(|s| s["schema-id"].as_i64())
            .collect();
        assert_eq!(ids, [0, 2], "a gap in the source's schema ids");
        removed
    };
    let old = format!("{ns}.old");
    with_gap(old.clone()).await;
    // Older than the timestamp rule's minute.
    tokio::time::sleep(std::time::Duration::from_secs(62)).await;
    let young = format!("{ns}.young");
    let source = with_gap(young.clone()).await;

    let state = tempfile::tempdir().expect("state");
    let replication = "reconcile_interval = \"2s\"\nretry_initial_backoff = \"200ms\"\nretry_max_backoff = \"2s\"";
    let primary_toml = local_primary_toml(&primary.uri, &primary.warehouse);
    let toml = relay_toml_for(&primary_toml, Replica::Java(destination), &ns, state.path(), replication)
        .replace("name = \"dr\"\n", "name = \"dr\"\nbootstrap = \"create-transaction\"\n");
    let relay = Relay::start(&toml).await;

    let location = source.metadata_location.clone().expect("location");
    wait_replicated(&relay.admin_url, &young, &location).await;
    let copy = Replica::Java(destination).catalog().load_table(&ident(&young)).await.expect("load").expect("replica");
    assert_eq!(history(&copy.metadata), history(&source.metadata), "the young table, every snapshot");
    assert_eq!(copy.metadata["snapshot-log"], source.metadata["snapshot-log"]);

    let failed =
        crate::replication::wait_status(&relay.admin_url, &old, "the refusal", |s| s["status"] == "failed").await;
    let message = failed["last_error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("cannot be carried by a create transaction") && message.contains("bootstrap = \"register\""),
        "{failed}"
    );
    assert_eq!(failed["last_error"]["waits_for_operator"], true, "{failed}");
    let made = Replica::Java(destination).catalog().load_table(&ident(&old)).await.expect("load");
    assert!(made.is_none(), "no replica was made: {made:?}");
}
