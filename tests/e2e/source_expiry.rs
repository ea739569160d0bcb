//! A source that expires snapshots while a lane copies them: the files of
//! an expired snapshot are deleted, and a lane that loaded the source just
//! before finds them gone. The lane loads the source again and replicates
//! what is still there, instead of stopping on the missing file.
//!
//! The window between a lane's load and its copy is too short to hit by
//! timing, so a stand-in in front of the primary (a real rustberg) answers
//! the lane's first load with the table as it was before the expiry, as a
//! load a moment earlier would have. Everything else is forwarded.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::response::IntoResponse;
use serde_json::{Value, json};

use crate::harness::{Relay, Rustberg, Served, stand_in, unique};
use crate::replication::{
    Replica, history, ident, lane_status, local_primary_toml, read_catalog, relay_toml_for, wait_status, write_with,
};

/// What the stand-in does with loads of the table.
#[derive(Default)]
struct Stale {
    /// The path whose load answers are kept or replayed.
    table_path: String,
    /// The kept answer of a load.
    kept: Option<Bytes>,
    /// Keep the next load's answer.
    keep_next: bool,
    /// Answer the next load with the kept answer.
    replay_next: bool,
    /// Loads answered with the kept answer.
    replayed: usize,
    /// Loads forwarded after one was answered with the kept answer.
    loads_after_replay: usize,
}

/// Forwards everything to `primary`; loads of the table follow [`Stale`].
async fn stale_primary(primary: &Rustberg, stale: Arc<Mutex<Stale>>) -> Served {
    stand_in(&primary.uri, move |upstream, parts, body| {
        let stale = stale.clone();
        async move {
            // A lane's full load (reconcile's quick look asks `snapshots=refs`).
            let is_load = parts.method == axum::http::Method::GET
                && !parts.uri.query().is_some_and(|q| q.contains("snapshots=refs"))
                && {
                    let s = stale.lock().expect("lock");
                    !s.table_path.is_empty() && parts.uri.path().ends_with(&s.table_path)
                };
            if is_load {
                let mut s = stale.lock().expect("lock");
                if s.replay_next
                    && let Some(kept) = s.kept.clone()
                {
                    s.replay_next = false;
                    s.replayed += 1;
                    return ([("content-type", "application/json")], kept).into_response();
                }
                if s.replayed > 0 {
                    s.loads_after_replay += 1;
                }
            }
            let answer = upstream.forward(&parts, body).await;
            if is_load && answer.status.is_success() {
                let mut s = stale.lock().expect("lock");
                if s.keep_next {
                    s.keep_next = false;
                    s.kept = Some(answer.body.clone());
                }
            }
            answer.into_response()
        }
    })
    .await
}

fn snapshot_ids(written: &Value) -> Vec<i64> {
    written["snapshots"].as_array().into_iter().flatten().filter_map(|s| s["id"].as_i64()).collect()
}

/// Where `main` is after a write.
fn main_of(written: &Value) -> i64 {
    written["refs"]["main"].as_i64().unwrap_or_else(|| panic!("no main: {written}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_expired_while_a_lane_copies_them_are_skipped_not_fatal() {
    let primary: &'static Rustberg = Box::leak(Box::new(Rustberg::start("expiry-primary")));
    let replica = Rustberg::shared();
    let stale = Arc::new(Mutex::new(Stale::default()));
    let stand_in = stale_primary(primary, stale.clone()).await;
    let ns = unique("expiring");
    let table = format!("{ns}.t");
    let dir = tempfile::tempdir().expect("dir");
    // Reconcile rarely: the lane's own runs are the only loads of the table.
    // The primary is the stand-in; the files are the real primary's.
    let toml = relay_toml_for(
        &local_primary_toml(&stand_in.url, &primary.warehouse),
        Replica::Rustberg(replica),
        &ns,
        &dir.path().join("state"),
        "reconcile_interval = \"1h\"\nretry_initial_backoff = \"200ms\"",
    );
    let relay = Relay::start(&toml).await;
    let through = json!({"uri": relay.url, "warehouse": primary.warehouse});
    let direct = primary.client_conn();

    let first = write_with(
        through.clone(),
        &table,
        json!([{"op": "create", "partitioned": false, "format_version": 2}, {"op": "append", "start": 0, "rows": 3}]),
    )
    .await;
    let s1 = main_of(&first);
    wait_status(&relay.admin_url, &table, "the first snapshot replicated", |s| s["status"] == "completed").await;

    let http = reqwest::Client::new();
    let action = format!("{}/v1/replication/namespaces/{ns}/tables/t/destinations/dr", relay.admin_url);
    let post = |a: &str| http.post(format!("{action}/{a}")).header("content-type", "application/json");
    assert_eq!(post("pause").send().await.expect("pause").status(), 200);

    // s2 is committed, and the table as it is then kept for the lane.
    let second = write_with(through.clone(), &table, json!([{"op": "append", "start": 10, "rows": 2}])).await;
    let s2 = main_of(&second);
    {
        let mut s = stale.lock().expect("lock");
        s.table_path = format!("/namespaces/{ns}/tables/t");
        s.keep_next = true;
    }
    let through_stand_in = crate::replication::rustberg_catalog(&stand_in.url, &primary.warehouse);
    through_stand_in.load_table(&ident(&table)).await.expect("load").expect("table");
    assert!(stale.lock().expect("lock").kept.is_some(), "the load before the expiry is kept");

    // Then s3, and the expiry of s1 and s2, which deletes s2's manifest list
    // as Spark's expiry would (PyIceberg's leaves files alone).
    let third = write_with(direct.clone(), &table, json!([{"op": "append", "start": 20, "rows": 2}])).await;
    let s3 = main_of(&third);
    let kept = stale.lock().expect("lock").kept.clone().expect("kept");
    let old: Value = serde_json::from_slice(&kept).expect("json");
    let list = old["metadata"]["snapshots"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["snapshot-id"].as_i64() == Some(s2))
        .and_then(|s| s["manifest-list"].as_str())
        .expect("s2's manifest list")
        .to_owned();
    let expired = write_with(direct.clone(), &table, json!([{"op": "expire", "keep_last": 1}])).await;
    assert_eq!(snapshot_ids(&expired), vec![s3], "s1 and s2 expired on the source");
    let path = list.trim_start_matches("file://").trim_start_matches("file:");
    std::fs::remove_file(path).unwrap_or_else(|e| panic!("delete {path}: {e}"));

    // The lane's next load sees the table from before the expiry.
    stale.lock().expect("lock").replay_next = true;
    assert_eq!(post("resume").send().await.expect("resume").status(), 200);
    let done = wait_status(&relay.admin_url, &table, "s3 replicated", |s| {
        s["status"] == "completed" && s["source_metadata_location"] == expired["metadata_location"]
    })
    .await;
    let (replayed, reloads) = {
        let s = stale.lock().expect("lock");
        (s.replayed, s.loads_after_replay)
    };
    assert_eq!(replayed, 1, "the lane loaded the table from before the expiry");
    assert!(reloads >= 1, "and, finding s2's manifest list gone, loaded it again");
    assert!(done["last_error"].is_null(), "{done}");

    let copy = Replica::Rustberg(replica).catalog().load_table(&ident(&table)).await.expect("load").expect("replica");
    let ids: Vec<i64> = history(&copy.metadata).into_keys().collect();
    assert!(ids.contains(&s1) && ids.contains(&s3), "s1 kept, s3 replicated: {ids:?}");
    assert!(!ids.contains(&s2), "s2 was expired before it could be replicated: {ids:?}");
    let rows = read_catalog(replica.client_conn(), &table).await;
    let source_rows = read_catalog(direct, &table).await;
    let at = |r: &Value, id: i64| r["pyiceberg"][id.to_string()].clone();
    assert!(at(&rows, s3).is_array(), "{rows}");
    assert_eq!(at(&rows, s3), at(&source_rows, s3), "the replica's rows at s3");
    assert_eq!(at(&rows, s1), first["rows"][s1.to_string()], "s1 as it was replicated before");
    assert!(lane_status(&relay.admin_url, &table).await.is_some_and(|s| s["status"] == "completed"));
}
