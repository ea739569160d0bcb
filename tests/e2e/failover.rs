//! Disaster recovery end to end: replicas are read-only through any
//! icerelay, a failover promotes them, and the audit log records it all.
//!
//! The primary is a SeaweedFS of this test's own (it is killed); the replica
//! is the shared replica SeaweedFS. icerelay A replicates the primary to
//! destination `dr`; icerelay B stands in front of the replica catalog, as
//! engines would use it after a failover.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Relay, SeaweedFs, icerelay, python, unique};
use crate::replication::{
    Replica, ident, lane_status, read_catalog, relay_toml_from, relay_toml_with, seaweed_destination_toml, validate,
    wait_replicated, write_with,
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

/// icerelay's configuration replicating `source` to `destination` (named
/// `name`) for `namespace`.
fn replicate_toml(source: &SeaweedFs, destination: &SeaweedFs, name: &str, namespace: &str, state: &Path) -> String {
    relay_toml_with(source, &seaweed_destination_toml(destination, name), name, namespace, state, "")
}

async fn post_admin(admin: &str, path: &str) -> reqwest::StatusCode {
    let answer =
        crate::harness::http_client().post(format!("{admin}{path}")).json(&json!({})).send().await.expect("admin");
    answer.status()
}

/// Rows by snapshot id, both readers, read directly from a catalog.
async fn rows_on(catalog: &SeaweedFs, table: &str) -> Value {
    let rows = read_catalog(catalog.client_conn(catalog.catalog_uri()), table).await;
    assert_eq!(rows["errors"], json!({}), "{rows}");
    rows
}

#[tokio::test(flavor = "multi_thread")]
async fn failback_follows_the_old_primary_from_the_common_ancestor_and_a_second_promote_returns_the_roles() {
    let old_primary = SeaweedFs::start("failback-primary");
    let new_primary = SeaweedFs::shared_replica();
    let ns = unique("failback");
    let (clean, orphaned) = (format!("{ns}.clean"), format!("{ns}.orphaned"));
    let dir = tempfile::tempdir().expect("dir");

    // Before the disaster: icerelay A replicates the old primary to `dr`.
    let a = Relay::start(&replicate_toml(&old_primary, new_primary, "dr", &ns, &dir.path().join("a"))).await;
    for table in [&clean, &orphaned] {
        let ops = json!([{"op": "create"}, {"op": "append", "start": 0, "rows": 3},
                         {"op": "append", "start": 10, "rows": 3}, {"op": "append", "start": 20, "rows": 3}]);
        let written = write_with(old_primary.client_conn(&a.url), table, ops).await;
        wait_replicated(&a.admin_url, table, written["metadata_location"].as_str().expect("location")).await;
    }
    // Two commits on the old primary never replicate (the lane is paused), then it is lost.
    let (ns_part, orphaned_name) = orphaned.rsplit_once('.').expect("ns.table");
    let pause = format!("/v1/replication/namespaces/{ns_part}/tables/{orphaned_name}/destinations/dr/pause");
    assert_eq!(post_admin(&a.admin_url, &pause).await, 200);
    let lost = write_with(
        old_primary.client_conn(old_primary.catalog_uri()),
        &orphaned,
        json!([{"op": "append", "start": 500, "rows": 1}, {"op": "append", "start": 600, "rows": 1}]),
    )
    .await;
    let lost_ids: Vec<i64> =
        lost["snapshots"].as_array().into_iter().flatten().filter_map(|s| s["id"].as_i64()).skip(3).collect();
    assert_eq!(lost_ids.len(), 2, "{lost}");
    let before_disaster = rows_on(&old_primary, &orphaned).await;
    old_primary.stop();

    // Failover of the whole destination.
    let (code, stdout, stderr) =
        icerelay(["promote", "--admin", &a.admin_url, "--destination", "dr", "--now"].map(str::to_owned).to_vec())
            .await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains(&format!("replica of {clean}")) && stdout.contains(&format!("replica of {orphaned}")));

    // Engines write to the new primary through icerelay B, which replicates
    // it to the old primary (`back`) once that is back.
    let b = Relay::start(&replicate_toml(new_primary, &old_primary, "back", &ns, &dir.path().join("b"))).await;
    let mut orphaned_now = Value::Null;
    for table in [&clean, &orphaned] {
        let ops = json!([{"op": "append", "start": 100, "rows": 2}, {"op": "append", "start": 110, "rows": 2}]);
        orphaned_now = write_with(new_primary.client_conn(&b.url), table, ops).await;
    }
    let clean_now = write_with(new_primary.client_conn(&b.url), &clean, json!([])).await;
    old_primary.restart();

    // The clean table is followed from the common ancestor: only what is new
    // is copied (3 files a commit: data file, manifest, manifest list).
    let location = clean_now["metadata_location"].as_str().expect("location");
    let status = wait_replicated(&b.admin_url, &clean, location).await;
    let on_old = crate::replication::seaweed_catalog(&old_primary).load_table(&ident(&clean)).await.expect("load");
    let on_old = on_old.expect("the old primary's table");
    let on_new = crate::replication::seaweed_catalog(new_primary).load_table(&ident(&clean)).await.expect("load");
    let on_new = on_new.expect("the new primary's table");
    assert_eq!(snapshot_ids(&on_old.metadata), snapshot_ids(&on_new.metadata), "same snapshots, same order");
    assert_eq!(crate::replication::refs(&on_old.metadata), crate::replication::refs(&on_new.metadata));
    let mark = on_old.metadata["properties"][MARK].as_str().unwrap_or_default();
    assert!(mark.ends_with("(destination back)"), "the old primary is now a read-only replica: {mark}");
    assert_eq!(status["replica_metadata_location"], on_old.metadata_location.clone().unwrap_or_default());
    let log = audit(&b.admin_url, &clean).await;
    let commits: Vec<&Value> = log["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["action"] == "commit" && e["source_snapshots"].as_array().is_some_and(|s| !s.is_empty()))
        .collect();
    let adopted: Vec<&&Value> = commits.iter().filter(|e| e["detail"]["adopted"].is_string()).collect();
    assert_eq!(adopted.len(), 1, "{log}");
    assert_eq!(adopted[0]["source_snapshots"].as_array().map_or(0, Vec::len), 3, "the common history: {log}");
    let replayed: Vec<&&Value> = commits.iter().filter(|e| e["detail"]["adopted"].is_null()).collect();
    assert_eq!(replayed.len(), 2, "{log}");
    for commit in &replayed {
        assert_eq!(commit["files_copied"], 3, "nothing already there is copied again: {commit}");
    }
    let (old_rows, new_rows) = (rows_on(&old_primary, &clean).await, rows_on(new_primary, &clean).await);
    for reader in ["pyiceberg", "duckdb"] {
        assert_eq!(old_rows[reader], new_rows[reader], "{reader}: same rows at every snapshot on both sides");
    }

    // The table with unreplicated snapshots on the old side waits for an
    // operator, naming them.
    let failed = crate::replication::wait_status(&b.admin_url, &orphaned, "the orphans reported", |s| {
        s["status"] == "failed" && s["last_error"]["waits_for_operator"] == true
    })
    .await;
    let message = failed["last_error"]["message"].as_str().unwrap_or_default();
    for id in &lost_ids {
        assert!(message.contains(&id.to_string()), "orphan {id} named: {message}");
    }
    let untouched =
        crate::replication::seaweed_catalog(&old_primary).load_table(&ident(&orphaned)).await.expect("load");
    let untouched = untouched.expect("kept");
    assert_eq!(untouched.metadata["current-snapshot-id"].as_i64(), lost_ids.last().copied(), "nothing overwritten");

    // The operator keeps them on a branch; the new primary's snapshots follow
    // the common ancestor, their sequence numbers above the ones the old side took.
    let (code, stdout, stderr) = icerelay(
        [
            "failback",
            "--admin",
            &b.admin_url,
            "--destination",
            "back",
            "--table",
            &orphaned,
            "--keep-unreplicated-as-branch",
            "before_failover",
        ]
        .map(str::to_owned)
        .to_vec(),
    )
    .await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let location = orphaned_now["metadata_location"].as_str().expect("location");
    let status = wait_replicated(&b.admin_url, &orphaned, location).await;
    assert_eq!(status["adoption"]["kept_branch"]["name"], "before_failover", "{status}");
    assert_eq!(status["adoption"]["sequence_shift"]["by"], 2, "{status}");
    let kept = crate::replication::seaweed_catalog(&old_primary).load_table(&ident(&orphaned)).await.expect("load");
    let kept = kept.expect("table");
    let source = crate::replication::seaweed_catalog(new_primary).load_table(&ident(&orphaned)).await.expect("load");
    let source = source.expect("table");
    let kept_refs = crate::replication::refs(&kept.metadata);
    assert_eq!(kept_refs.get("before_failover"), lost_ids.last(), "{kept_refs:?}");
    assert_eq!(kept_refs.get("main"), crate::replication::refs(&source.metadata).get("main"));
    let sequence = |m: &Value, id: i64| {
        m["snapshots"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["snapshot-id"] == id)
            .map(|s| s["sequence-number"].clone())
    };
    let above = status["adoption"]["sequence_shift"]["above"].as_i64().expect("above");
    assert_eq!(above, 3, "the common ancestor is the third append: {status}");
    for id in snapshot_ids(&source.metadata) {
        let theirs = sequence(&source.metadata, id).and_then(|n| n.as_i64()).expect("source sequence number");
        let expected = if theirs > above { theirs + 2 } else { theirs };
        assert_eq!(sequence(&kept.metadata, id), Some(json!(expected)), "sequence number of snapshot {id}");
    }
    let (old_rows, new_rows) = (rows_on(&old_primary, &orphaned).await, rows_on(new_primary, &orphaned).await);
    for reader in ["pyiceberg", "duckdb"] {
        for (id, rows) in new_rows[reader].as_object().expect("rows") {
            assert_eq!(&old_rows[reader][id], rows, "{reader} at snapshot {id} of the new primary");
        }
        for id in &lost_ids {
            let id = id.to_string();
            assert_eq!(old_rows[reader][&id], before_disaster[reader][&id], "{reader}: the kept snapshot {id}");
        }
    }
    let log = audit(&b.admin_url, &orphaned).await;
    let failbacks: Vec<&Value> =
        log["entries"].as_array().expect("entries").iter().filter(|e| e["action"] == "failback").collect();
    assert_eq!(failbacks.len(), 2, "the choice and its execution: {log}");

    // Roles return: the old primary is promoted (drained first: the new
    // primary answers) and replicated to the old replica by icerelay C.
    let (code, stdout, stderr) = icerelay(
        ["promote", "--admin", &b.admin_url, "--destination", "back", "--table", &clean, "--timeout", "60s"]
            .map(str::to_owned)
            .to_vec(),
    )
    .await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("none: the replica had every source snapshot"), "{stdout}");
    let c = Relay::start(&replicate_toml(&old_primary, new_primary, "dr", &ns, &dir.path().join("c"))).await;
    let written =
        write_with(old_primary.client_conn(&c.url), &clean, json!([{"op": "append", "start": 900, "rows": 1}])).await;
    wait_replicated(&c.admin_url, &clean, written["metadata_location"].as_str().expect("location")).await;
    let back = crate::replication::seaweed_catalog(new_primary).load_table(&ident(&clean)).await.expect("load");
    let back = back.expect("table");
    assert!(back.metadata["properties"][MARK].as_str().is_some_and(|m| m.ends_with("(destination dr)")));
    let (old_rows, new_rows) = (rows_on(&old_primary, &clean).await, rows_on(new_primary, &clean).await);
    assert_eq!(old_rows["snapshots"], new_rows["snapshots"]);
    for reader in ["pyiceberg", "duckdb"] {
        assert_eq!(old_rows[reader], new_rows[reader], "{reader} after the roles returned");
    }
    drop(b);
    old_primary.stop();
}
