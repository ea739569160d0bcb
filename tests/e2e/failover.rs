//! Disaster recovery end to end: replicas are read-only through any
//! icerelay, a failover promotes them, and the audit log records it all.
//!
//! The primary is a SeaweedFS of this test's own (it is killed); the replica
//! is the shared replica SeaweedFS. icerelay A replicates the primary to
//! destination `dr`; icerelay B stands in front of the replica catalog, as
//! engines would use it after a failover.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Relay, SeaweedFs, icerelay, python, unique};
use crate::replication::{
    Replica, ident, lane_status, read_catalog, relay_toml_from, validate, wait_replicated, write_with,
};

/// The read-only mark's property key.
const MARK: &str = "icerelay.replica-of";

/// An icerelay with `catalog` as its primary and no replication.
fn proxy_toml(catalog: &SeaweedFs) -> String {
    format!(
        "[primary]\nuri = \"{}\"\nwarehouse = \"{}\"\nauth = {}\n",
        catalog.catalog_uri(),
        catalog.warehouse(),
        catalog.auth_toml()
    )
}

/// Snapshot ids of a table's metadata, in sequence-number order.
fn snapshot_ids(metadata: &Value) -> Vec<i64> {
    let mut snapshots: Vec<(i64, i64)> = metadata["snapshots"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| Some((s["sequence-number"].as_i64()?, s["snapshot-id"].as_i64()?)))
        .collect();
    snapshots.sort_unstable();
    snapshots.into_iter().map(|(_, id)| id).collect()
}

async fn audit(admin: &str, table: &str) -> Value {
    let url = format!("{admin}/v1/replication/audit?table={table}");
    let answer = crate::harness::http_client().get(&url).send().await.expect("audit");
    assert_eq!(answer.status(), 200, "{url}");
    answer.json().await.expect("audit json")
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_refuse_writes_and_a_failover_promotes_them_at_their_recovery_point() {
    let primary = SeaweedFs::start("failover-primary");
    let replica_catalog = SeaweedFs::shared_replica();
    let replica = Replica::Seaweed(replica_catalog);
    let ns = unique("failover");
    let table = format!("{ns}.orders");
    let state = tempfile::tempdir().expect("state");
    let a = Relay::start(&relay_toml_from(&primary, replica, &ns, state.path(), "")).await;
    let b = Relay::start(&proxy_toml(replica_catalog)).await;

    // Phase 1: replicated in full.
    let ops = json!([
        {"op": "create"},
        {"op": "append", "start": 0, "rows": 3},
        {"op": "append", "start": 10, "rows": 3},
        {"op": "append", "start": 20, "rows": 3},
    ]);
    let written = write_with(primary.client_conn(&a.url), &table, ops).await;
    let location = written["metadata_location"].as_str().expect("location").to_owned();
    let status = wait_replicated(&a.admin_url, &table, &location).await;
    let source_rows = read_catalog(primary.client_conn(primary.catalog_uri()), &table).await;
    assert_eq!(source_rows["errors"], json!({}), "{source_rows}");
    let on_replica = replica.catalog().load_table(&ident(&table)).await.expect("load").expect("replica");
    let mark = on_replica.metadata["properties"][MARK].as_str().expect("the replica carries the mark").to_owned();
    assert!(mark.starts_with(&format!("{table} at {}", primary.catalog_uri())) && mark.ends_with("(destination dr)"));

    // A write to the replica through an icerelay is refused with what to do,
    // and nothing reaches the replica catalog; reads work.
    let attempt = python("try_write.py", vec![replica_catalog.client_conn(&b.url).to_string(), table.clone()]).await;
    assert_eq!(attempt["ok"], false, "{attempt}");
    let refusal = attempt["error"].as_str().unwrap_or_default();
    assert!(refusal.contains("read-only replica of"), "{refusal}");
    assert!(refusal.contains(&format!("icerelay promote --table {table} --destination dr")), "{refusal}");
    let unchanged = replica.catalog().load_table(&ident(&table)).await.expect("load").expect("replica");
    assert_eq!(snapshot_ids(&unchanged.metadata), snapshot_ids(&on_replica.metadata), "the refused write landed");
    // The same through an icerelay without credentials of its own: it reads
    // the mark with the engine's.
    let bare =
        Relay::start(&proxy_toml(replica_catalog).replace(&format!("auth = {}\n", replica_catalog.auth_toml()), ""))
            .await;
    let attempt = python("try_write.py", vec![replica_catalog.client_conn(&bare.url).to_string(), table.clone()]).await;
    assert_eq!(attempt["ok"], false, "{attempt}");
    assert!(attempt["error"].as_str().unwrap_or_default().contains("read-only replica of"), "{attempt}");
    assert_eq!(attempt["error_type"], "ForbiddenError", "{attempt}");
    let unchanged = replica.catalog().load_table(&ident(&table)).await.expect("load").expect("replica");
    assert_eq!(snapshot_ids(&unchanged.metadata), snapshot_ids(&on_replica.metadata), "the refused write landed");
    let read = read_catalog(replica_catalog.client_conn(&b.url), &table).await;
    assert_eq!(read["errors"], json!({}), "{read}");
    for reader in ["pyiceberg", "duckdb"] {
        assert_eq!(read[reader], source_rows[reader], "{reader} through icerelay B reads the replica as the source");
    }

    // Phase 2: the primary dies while commits stream in and replicate.
    let first_replica_metadata = status["replica_metadata_location"].clone();
    let writer = {
        let conn = primary.client_conn(&a.url);
        let table = table.clone();
        let ops: Vec<Value> = (0..10).map(|k| json!({"op": "append", "start": 100 + 10 * k, "rows": 2})).collect();
        tokio::task::spawn_blocking(move || {
            // Fails once the primary is gone: expected.
            std::process::Command::new(crate::harness::python_bin())
                .arg(crate::harness::repo_root().join("tests/clients/writer.py"))
                .args([conn.to_string(), table, Value::Array(ops).to_string()])
                .current_dir(crate::harness::repo_root().join("tests/clients"))
                .output()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let lane = lane_status(&a.admin_url, &table).await.expect("status");
        if lane["replica_metadata_location"] != first_replica_metadata {
            break;
        }
        assert!(Instant::now() < deadline, "the second phase never replicated: {lane}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    primary.stop();
    let _ = writer.await;

    // Draining needs the source: it cannot, and says to use --now.
    let admin = ["--admin".to_owned(), a.admin_url.clone()];
    let mut args = vec!["promote".to_owned()];
    args.extend(admin.clone());
    args.extend(["--destination", "dr", "--table", &table, "--timeout", "3s"].map(str::to_owned));
    let (code, stdout, stderr) = icerelay(args.clone()).await;
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(stderr.contains("--now"), "{stderr}");
    let still = replica.catalog().load_table(&ident(&table)).await.expect("load").expect("replica");
    assert!(still.metadata["properties"].get(MARK).is_some(), "a withdrawn promotion keeps the mark");

    args.push("--now".into());
    let (code, stdout, stderr) = icerelay(args).await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let promoted = replica.catalog().load_table(&ident(&table)).await.expect("load").expect("replica");
    assert!(promoted.metadata["properties"].get(MARK).is_none(), "the mark is gone: {}", promoted.metadata);
    let replica_snapshots = snapshot_ids(&promoted.metadata);
    let recovery_point = promoted.metadata["current-snapshot-id"].as_i64().expect("a current snapshot");
    assert!(stdout.contains(&format!("recovery point: snapshot {recovery_point}")), "{stdout}");
    assert!(stdout.contains(promoted.metadata_location.as_deref().unwrap_or("?")), "{stdout}");
    assert!(stdout.contains("the source did not answer"), "{stdout}");
    assert!(replica_snapshots.len() > 3, "phase 2 reached the replica in part: {replica_snapshots:?}");
    let lane = lane_status(&a.admin_url, &table).await.expect("status");
    assert_eq!(lane["status"], "promoted", "{lane}");
    assert_eq!(lane["promotion"]["recovery_point"]["snapshot_id"], recovery_point, "{lane}");

    // Engines through B read every replicated snapshot (phase 1 as the source
    // showed it; phase 2 rows by construction) and write new ones.
    let read = read_catalog(replica_catalog.client_conn(&b.url), &table).await;
    assert_eq!(read["errors"], json!({}), "{read}");
    for reader in ["pyiceberg", "duckdb"] {
        for (id, rows) in source_rows[reader].as_object().expect("rows") {
            assert_eq!(&read[reader][id], rows, "{reader} at common snapshot {id}");
        }
        for (i, id) in replica_snapshots.iter().enumerate() {
            let expected = 3 * (i + 1).min(3) + 2 * (i + 1).saturating_sub(3);
            let rows = read[reader][id.to_string()].as_array().map_or(0, Vec::len);
            assert_eq!(rows, expected, "{reader} at snapshot {id} ({i})");
        }
    }
    let after =
        write_with(replica_catalog.client_conn(&b.url), &table, json!([{"op": "append", "start": 900, "rows": 1}]))
            .await;
    let ids: Vec<i64> = after["snapshots"].as_array().into_iter().flatten().filter_map(|s| s["id"].as_i64()).collect();
    assert_eq!(ids.len(), replica_snapshots.len() + 1, "a write through B lands on the promoted table: {after}");

    // The audit log: every replica commit once (by snapshot), the bootstrap,
    // the promotion at its recovery point; the answer is as described.
    let log = audit(&a.admin_url, &table).await;
    let entries = log["entries"].as_array().expect("entries");
    let committed: Vec<i64> = entries
        .iter()
        .filter(|e| e["action"] == "commit" && e["outcome"] == "ok")
        .flat_map(|e| e["source_snapshots"].as_array().cloned().unwrap_or_default())
        .filter_map(|id| id.as_i64())
        .collect();
    let unique_commits: BTreeSet<i64> = committed.iter().copied().collect();
    assert_eq!(unique_commits, replica_snapshots.iter().copied().collect(), "{log}");
    assert_eq!(committed.len(), unique_commits.len(), "one line per replica commit: {log}");
    assert_eq!(entries.iter().filter(|e| e["action"] == "bootstrap").count(), 1, "{log}");
    let promotions: Vec<&Value> = entries.iter().filter(|e| e["action"] == "promote").collect();
    assert_eq!(promotions.len(), 1, "{log}");
    assert_eq!(promotions[0]["source_snapshots"], json!([recovery_point]));
    assert_eq!(promotions[0]["detail"]["recovery_point"], recovery_point);
    let actions: BTreeMap<String, usize> = entries.iter().fold(BTreeMap::new(), |mut m, e| {
        *m.entry(e["action"].as_str().unwrap_or("?").to_owned()).or_default() += 1;
        m
    });
    assert!(actions.get("failure").is_some_and(|n| *n >= 1), "the failed drain is recorded: {actions:?}");
    let mut wrong = log.clone();
    wrong["entries"][0]["outcome"] = json!("maybe");
    let checked = validate("AuditPage", &[&log, &wrong]).await;
    let errors: Vec<&str> = checked["errors"].as_array().expect("errors").iter().filter_map(Value::as_str).collect();
    assert!(errors.iter().all(|e| e.starts_with("document 1")), "{errors:?}");
    assert!(!errors.is_empty(), "the negative control must fail validation");
    // The lane is promoted for good: other actions are refused.
    let (ns_part, name) = table.rsplit_once('.').expect("ns.table");
    let resync = crate::harness::http_client()
        .post(format!("{}/v1/replication/namespaces/{ns_part}/tables/{name}/destinations/dr/resync", a.admin_url))
        .json(&json!({}))
        .send()
        .await
        .expect("resync");
    assert_eq!(resync.status(), 409);
}
