//! Tests of the embedded store, including reopening the database as a restart would.

use super::*;
use crate::proxy::commit_tap::HintKind;
use crate::state::LaneStatus;

fn table(ns: &str, name: &str) -> TableIdent {
    TableIdent::new(Namespace::from_dotted(ns), name)
}

fn hint(kind: HintKind, t: TableIdent) -> CommitHint {
    CommitHint { kind, table: t, prefix: Some("wh".into()), metadata_location: None }
}

fn touch(key: &LaneKey) -> LaneChange {
    LaneChange::Touch { key: key.clone(), replica_table: key.table.clone(), at: 1_000 }
}

#[tokio::test]
async fn hints_are_kept_in_order_until_their_fan_out_is_recorded() {
    let dir = tempfile::tempdir().expect("dir");
    let store = EmbeddedStore::open(dir.path()).expect("open");
    store.append_hints(vec![hint(HintKind::Commit, table("a", "x"))]).await.expect("append");
    store
        .append_hints(vec![
            hint(HintKind::Drop, table("a", "y")),
            hint(HintKind::Rename { from: table("a", "x") }, table("b.c", "z")),
        ])
        .await
        .expect("append");
    let pending = store.pending_hints(10).await.expect("read");
    assert_eq!(pending.len(), 3);
    assert!(pending.windows(2).all(|w| w[0].id < w[1].id), "ids increase");
    assert_eq!(pending[2].hint.kind, HintKind::Rename { from: table("a", "x") });
    assert_eq!(pending[2].hint.table, table("b.c", "z"));
    assert_eq!(pending[0].hint.prefix.as_deref(), Some("wh"));

    // A restart before the fan-out is recorded sees the same hints.
    drop(store);
    let store = EmbeddedStore::open(dir.path()).expect("reopen");
    assert_eq!(store.pending_hints(10).await.expect("read").len(), 3);

    store.apply_lane_changes(Vec::new(), vec![pending[1].id]).await.expect("ack two");
    let left = store.pending_hints(10).await.expect("read");
    assert_eq!(left.iter().map(|h| h.id).collect::<Vec<_>>(), vec![pending[2].id]);
    // A stale acknowledgement never moves the cursor back.
    store.apply_lane_changes(Vec::new(), vec![pending[0].id]).await.expect("stale ack");
    assert_eq!(store.pending_hints(10).await.expect("read").len(), 1);
}

#[tokio::test]
async fn a_change_during_a_run_keeps_the_lane_pending() {
    let dir = tempfile::tempdir().expect("dir");
    let store = EmbeddedStore::open(dir.path()).expect("open");
    let key = LaneKey::new(table("db", "t"), "dr");
    store.apply_lane_changes(vec![touch(&key)], Vec::new()).await.expect("touch");
    let lane = store.lane(&key).await.expect("read").expect("exists");
    assert_eq!(lane.status(), LaneStatus::Pending);
    assert_eq!(lane.pending_since, Some(1_000));

    // A run starts at generation 1; a hint arrives meanwhile (generation 2).
    let generation = lane.wanted;
    store.apply_lane_changes(vec![touch(&key)], Vec::new()).await.expect("touch");
    store.record_success(&key, generation).await.expect("success");
    let lane = store.lane(&key).await.expect("read").expect("exists");
    assert_eq!(lane.status(), LaneStatus::Pending, "the second change is not done yet");
    assert!(lane.has_work());
    assert_eq!(lane.pending_since, Some(1_000));

    store.record_success(&key, lane.wanted).await.expect("success");
    let lane = store.lane(&key).await.expect("read").expect("exists");
    assert_eq!(lane.status(), LaneStatus::Completed);
    assert_eq!(lane.pending_since, None);
    assert!(lane.last_success_at.is_some());
}

#[tokio::test]
async fn failures_count_until_a_success_clears_them() {
    let dir = tempfile::tempdir().expect("dir");
    let store = EmbeddedStore::open(dir.path()).expect("open");
    let key = LaneKey::new(table("db", "t"), "dr");
    store.apply_lane_changes(vec![touch(&key)], Vec::new()).await.expect("touch");
    store.record_failure(&key, "replica down".into(), false).await.expect("fail");
    store.record_failure(&key, "replica still down".into(), true).await.expect("fail");
    let lane = store.lane(&key).await.expect("read").expect("exists");
    assert_eq!(lane.status(), LaneStatus::Failed);
    let error = lane.last_error.expect("error");
    assert_eq!((error.message.as_str(), error.attempts, error.parked), ("replica still down", 2, true));
    store.record_success(&key, lane.wanted).await.expect("success");
    let lane = store.lane(&key).await.expect("read").expect("exists");
    assert_eq!(lane.last_error, None);
    assert_eq!(lane.status(), LaneStatus::Completed);
}

#[tokio::test]
async fn progress_and_renames_keep_the_replicated_history() {
    let dir = tempfile::tempdir().expect("dir");
    let store = EmbeddedStore::open(dir.path()).expect("open");
    let key = LaneKey::new(table("db", "t"), "dr");
    store.apply_lane_changes(vec![touch(&key)], Vec::new()).await.expect("touch");
    store
        .record_progress(Progress {
            key: key.clone(),
            source_metadata_location: Some("s3://w/db/t/metadata/v3.metadata.json".into()),
            replica_metadata_location: Some("s3://r/db/t/metadata/v2.metadata.json".into()),
            added_snapshots: vec![11, 12],
            snapshots_behind: 1,
            mode: Some("create+replay".into()),
            managed_properties: Some(BTreeSet::from(["owner".to_owned()])),
            managed_refs: Some(BTreeMap::from([("main".to_owned(), 12)])),
            source_uuid: Some("u-1".into()),
            log_drift: None,
        })
        .await
        .expect("progress");
    assert_eq!(store.replicated_snapshots(&key).await.expect("read"), BTreeSet::from([11, 12]));

    let renamed = table("db", "t2");
    store
        .apply_lane_changes(
            vec![LaneChange::Rename { from: key.clone(), to: renamed.clone(), replica_to: renamed.clone(), at: 2_000 }],
            Vec::new(),
        )
        .await
        .expect("rename");
    assert!(store.lane(&key).await.expect("read").is_none());
    let moved = LaneKey::new(renamed.clone(), "dr");
    let lane = store.lane(&moved).await.expect("read").expect("moved");
    assert_eq!(lane.replica_table, renamed);
    assert_eq!(lane.replica_renamed_from, Some(table("db", "t")), "the replica is renamed by the lane");
    assert_eq!(lane.managed_properties, Some(BTreeSet::from(["owner".to_owned()])));
    assert_eq!(lane.managed_refs, Some(BTreeMap::from([("main".to_owned(), 12)])));
    assert_eq!(lane.source_uuid.as_deref(), Some("u-1"));
    store.finish_rename(&moved).await.expect("finish");
    assert_eq!(store.lane(&moved).await.expect("read").expect("lane").replica_renamed_from, None);
    assert_eq!(lane.mode.as_deref(), Some("create+replay"));
    assert_eq!(lane.snapshots_behind, Some(1));
    assert_eq!(store.replicated_snapshots(&moved).await.expect("read"), BTreeSet::from([11, 12]));

    let generation = store.lane(&moved).await.expect("read").expect("lane").wanted;
    store
        .apply_lane_changes(vec![LaneChange::SourceDropped { key: moved.clone(), generation }], Vec::new())
        .await
        .expect("drop");
    let lane = store.lane(&moved).await.expect("read").expect("kept");
    assert!(lane.source_dropped && !lane.has_work());
}

#[tokio::test]
async fn pause_resume_resync_and_copy_checkpoints() {
    let dir = tempfile::tempdir().expect("dir");
    let store = EmbeddedStore::open(dir.path()).expect("open");
    let key = LaneKey::new(table("db", "t"), "dr");
    assert!(!store.set_paused(&key, true).await.expect("no lane"));
    store.apply_lane_changes(vec![touch(&key)], Vec::new()).await.expect("touch");
    assert!(store.set_paused(&key, true).await.expect("pause"));
    let lane = store.lane(&key).await.expect("read").expect("exists");
    assert_eq!(lane.status(), LaneStatus::Paused);
    assert!(!lane.has_work());
    assert!(store.set_paused(&key, false).await.expect("resume"));
    store.record_success(&key, lane.wanted).await.expect("done");
    assert!(store.request_resync(&key).await.expect("resync"));
    assert!(store.lane(&key).await.expect("read").expect("exists").has_work());

    let file = CopiedFile { target: "s3://r/d.parquet".into(), size: 42, checksum: Some("abc".into()) };
    store.record_copied_file("dr", "s3://w/d.parquet", file.clone()).await.expect("record");
    store.record_copied_file("dr", "s3://w/d.parquet", file.clone()).await.expect("idempotent");
    assert_eq!(store.copied_file("dr", "s3://w/d.parquet").await.expect("read"), Some(file));
    assert_eq!(store.copied_file("other", "s3://w/d.parquet").await.expect("read"), None);
}

#[tokio::test]
async fn a_rename_onto_a_name_with_a_lane_replaces_that_lane() {
    let dir = tempfile::tempdir().expect("dir");
    let store = EmbeddedStore::open(dir.path()).expect("open");
    let a = LaneKey::new(table("db", "a"), "dr");
    let b = LaneKey::new(table("db", "b"), "dr");
    store.apply_lane_changes(vec![touch(&a), touch(&b)], Vec::new()).await.expect("touch");
    store
        .record_progress(Progress {
            key: b.clone(),
            source_metadata_location: None,
            replica_metadata_location: Some("s3://r/db/b/metadata/v1.metadata.json".into()),
            added_snapshots: vec![99],
            snapshots_behind: 0,
            mode: None,
            managed_properties: None,
            managed_refs: None,
            source_uuid: Some("old-b".into()),
            log_drift: None,
        })
        .await
        .expect("progress");
    let rename = LaneChange::Rename { from: a.clone(), to: table("db", "b"), replica_to: table("db", "b"), at: 5 };
    store.apply_lane_changes(vec![rename], vec![0]).await.expect("a rename onto an existing lane applies");
    let lane = store.lane(&b).await.expect("read").expect("lane");
    assert_eq!(lane.replica_renamed_from, Some(table("db", "a")));
    assert_eq!(lane.source_uuid, None, "the old lane's record is gone");
    assert!(store.replicated_snapshots(&b).await.expect("read").is_empty());
    assert!(store.lane(&a).await.expect("read").is_none());
}

#[tokio::test]
async fn a_second_process_on_the_same_state_dir_is_refused_with_the_holders_pid() {
    let dir = tempfile::tempdir().expect("dir");
    let store = EmbeddedStore::open(dir.path()).expect("open");
    let second = EmbeddedStore::open(dir.path()).expect_err("the directory is taken");
    assert!(
        matches!(&second, StateError::Locked { holder, .. } if *holder == std::process::id().to_string()),
        "{second}"
    );
    assert!(second.to_string().contains(&format!("pid {}", std::process::id())), "{second}");
    // Clones share the lock; it goes with the last one.
    let clone = store.clone();
    drop(store);
    assert!(EmbeddedStore::open(dir.path()).is_err());
    drop(clone);
    EmbeddedStore::open(dir.path()).expect("free again");
}

#[tokio::test]
async fn a_database_from_a_newer_icerelay_is_refused_naming_both_versions() {
    let dir = tempfile::tempdir().expect("dir");
    drop(EmbeddedStore::open(dir.path()).expect("open"));
    let connection = Connection::open(dir.path().join(DATABASE_FILE)).expect("sqlite");
    connection.execute_batch(&format!("PRAGMA user_version = {}", SCHEMA_VERSION + 1)).expect("bump");
    drop(connection);
    let e = EmbeddedStore::open(dir.path()).expect_err("newer");
    let text = e.to_string();
    assert!(matches!(e, StateError::NewerSchema { .. }), "{text}");
    assert!(
        text.contains(&format!("version {}", SCHEMA_VERSION + 1))
            && text.contains(&format!("up to version {SCHEMA_VERSION}")),
        "{text}"
    );
}

#[tokio::test]
async fn a_promotion_is_withdrawn_or_expires_until_claimed_and_is_carried_out_once_claimed() {
    let dir = tempfile::tempdir().expect("dir");
    let store = EmbeddedStore::open(dir.path()).expect("open");
    let key = LaneKey::new(table("db", "t"), "dr");
    store.apply_lane_changes(vec![touch(&key)], Vec::new()).await.expect("touch");
    let later = now_ms() + 60_000;

    // Unclaimed: withdrawn, and then nothing to claim.
    assert!(store.request_promotion(&key, PromotionMode::Now, later).await.expect("request"));
    let lane = store.lane(&key).await.expect("read").expect("lane");
    assert_eq!((lane.promotion, lane.promotion_claimed), (Some(PromotionMode::Now), false));
    assert!(lane.has_work());
    assert!(store.withdraw_promotion(&key).await.expect("withdraw"));
    assert!(!store.claim_promotion(&key).await.expect("claim"));

    // Expired unclaimed: cannot be claimed.
    store.request_promotion(&key, PromotionMode::Drain, now_ms() - 1).await.expect("request");
    assert!(!store.claim_promotion(&key).await.expect("claim"));
    assert!(store.withdraw_promotion(&key).await.expect("withdraw"));

    // Claimed: no longer withdrawn; recorded once; the lane is promoted for good.
    store.request_promotion(&key, PromotionMode::Now, later).await.expect("request");
    assert!(store.claim_promotion(&key).await.expect("claim"));
    assert!(!store.withdraw_promotion(&key).await.expect("withdraw"), "a claimed promotion runs to the end");
    let promotion = Promotion {
        at: 5,
        recovery_point: Some(42),
        recovery_point_at: Some(4),
        missed_snapshots: Some(1),
        source_answered: false,
        metadata_location: Some("s3://r/db/t/metadata/v9.metadata.json".into()),
    };
    assert!(store.record_promotion(&key, promotion.clone()).await.expect("record"));
    assert!(!store.record_promotion(&key, promotion.clone()).await.expect("again"), "recorded once");
    drop(store);
    let store = EmbeddedStore::open(dir.path()).expect("reopen");
    let lane = store.lane(&key).await.expect("read").expect("lane");
    assert_eq!(lane.promoted, Some(promotion));
    assert_eq!(lane.status(), LaneStatus::Promoted);
    store.apply_lane_changes(vec![touch(&key)], Vec::new()).await.expect("a later hint");
    let lane = store.lane(&key).await.expect("read").expect("lane");
    assert!(!lane.has_work() && lane.seconds_behind(now_ms() + 10_000) == 0, "a promoted lane follows nothing");
    // Asking again answers with the promotion and asks for nothing.
    assert!(store.request_promotion(&key, PromotionMode::Now, later).await.expect("request"));
    assert_eq!(store.lane(&key).await.expect("read").expect("lane").promotion, None);
    // Pause and resync leave a promoted lane alone.
    let before = store.lane(&key).await.expect("read").expect("lane");
    assert!(!store.set_paused(&key, true).await.expect("pause"));
    assert!(!store.request_resync(&key).await.expect("resync"));
    let lane = store.lane(&key).await.expect("read").expect("lane");
    assert!(!lane.paused && lane.wanted == before.wanted, "{lane:?}");
}

#[tokio::test]
async fn a_database_of_every_older_version_upgrades_and_keeps_its_lanes() {
    for version in 1..SCHEMA_VERSION {
        let dir = tempfile::tempdir().expect("dir");
        {
            let mut connection = Connection::open(dir.path().join(DATABASE_FILE)).expect("create");
            migrate_between(&mut connection, 0, version).expect("old schema");
            connection
                .execute(
                    "INSERT INTO lanes (namespace, name, destination, replica_namespace, replica_name, wanted, done)
                     VALUES ('[\"db\"]', 't', 'dr', '[\"db\"]', 't', 3, 2)",
                    [],
                )
                .expect("an old lane");
            connection
                .execute(
                    "INSERT INTO hints (namespace, name, kind, recorded_at) VALUES ('[\"db\"]', 't', 'commit', 7)",
                    [],
                )
                .expect("an old hint");
        }
        let store = EmbeddedStore::open(dir.path()).unwrap_or_else(|e| panic!("version {version} upgrades: {e}"));
        let key = LaneKey::new(table("db", "t"), "dr");
        let lane = store.lane(&key).await.expect("read").expect("the lane is kept");
        assert_eq!((lane.wanted, lane.done), (3, 2), "version {version}");
        assert_eq!(store.pending_hints(10).await.expect("hints").len(), 1, "version {version}");
        // What the newest version added works on the upgraded database.
        let seen = SourceSeen { etag: "\"e1\"".into(), metadata_location: Some("s3://b/m.json".into()) };
        store
            .apply_lane_changes(vec![LaneChange::Seen { key: key.clone(), seen: seen.clone() }], Vec::new())
            .await
            .expect("seen");
        assert_eq!(store.lane(&key).await.expect("read").expect("lane").source_seen, Some(seen), "version {version}");
    }
}

#[tokio::test]
async fn old_copy_checkpoints_are_pruned() {
    let dir = tempfile::tempdir().expect("dir");
    let store = EmbeddedStore::open(dir.path()).expect("open");
    let file = CopiedFile { target: "s3://r/a".into(), size: 3, checksum: None };
    store.record_copied_file("dr", "s3://s/a", file.clone()).await.expect("record");
    assert_eq!(store.prune_copied_files(now_ms() - 60_000).await.expect("prune"), 0, "recent ones stay");
    assert_eq!(store.copied_file("dr", "s3://s/a").await.expect("read"), Some(file));
    assert_eq!(store.prune_copied_files(now_ms() + 1).await.expect("prune"), 1);
    assert_eq!(store.copied_file("dr", "s3://s/a").await.expect("read"), None);
}

#[tokio::test]
async fn transactions_are_found_by_any_of_their_snapshots_and_pruned_by_age() {
    use crate::proxy::commit_tap::{Transaction, TransactionMember};
    let dir = tempfile::tempdir().expect("dir");
    let store = EmbeddedStore::open(dir.path()).expect("open");
    let members = vec![
        TransactionMember { table: table("a", "x"), snapshots: vec![11, 12] },
        TransactionMember { table: table("b", "y"), snapshots: vec![21] },
    ];
    let id = store.record_transaction(Transaction { members: members.clone() }).await.expect("record");
    let found = store.transaction_of(&table("a", "x"), &[99, 12]).await.expect("read").expect("found by 12");
    assert_eq!(found.id, id);
    assert_eq!(found.members, members);
    let same = store.transaction_of(&table("b", "y"), &[21]).await.expect("read").expect("found by 21");
    assert_eq!(same.id, found.id);
    assert!(store.transaction_of(&table("b", "y"), &[11]).await.expect("read").is_none(), "11 is x's, not y's");
    assert!(store.transaction_of(&table("a", "x"), &[]).await.expect("read").is_none());

    // Kept across a restart; pruned once old enough.
    drop(store);
    let store = EmbeddedStore::open(dir.path()).expect("reopen");
    assert_eq!(store.prune_transactions(found.recorded_at).await.expect("prune"), 0);
    assert_eq!(store.prune_transactions(found.recorded_at + 1).await.expect("prune"), 1);
    assert!(store.transaction_of(&table("a", "x"), &[11]).await.expect("read").is_none());

    // One the primary refused is forgotten, snapshots and all, and frees
    // them for the commit that really adds them.
    let refused = store.record_transaction(Transaction { members: members.clone() }).await.expect("record");
    let kept = vec![TransactionMember { table: table("c", "z"), snapshots: vec![31, 32] }];
    store.record_transaction(Transaction { members: kept.clone() }).await.expect("record");
    store.forget_transaction(refused).await.expect("forget");
    assert!(store.transaction_of(&table("a", "x"), &[11, 12]).await.expect("read").is_none());
    assert!(store.transaction_of(&table("b", "y"), &[21]).await.expect("read").is_none());
    assert_eq!(store.transaction_of(&table("c", "z"), &[31]).await.expect("read").expect("kept").members, kept);
    let real = vec![TransactionMember { table: table("a", "x"), snapshots: vec![11, 13] }];
    store.record_transaction(Transaction { members: real.clone() }).await.expect("record");
    assert_eq!(store.transaction_of(&table("a", "x"), &[11]).await.expect("read").expect("found").members, real);
}

#[tokio::test]
async fn a_waiting_lane_asks_for_no_work_and_its_next_success_clears_the_wait() {
    let dir = tempfile::tempdir().expect("dir");
    let store = EmbeddedStore::open(dir.path()).expect("open");
    let key = LaneKey::new(table("db", "t"), "dr");
    store.apply_lane_changes(vec![touch(&key)], Vec::new()).await.expect("touch");
    let lane = store.lane(&key).await.expect("read").expect("exists");
    store.record_failure(&key, "boom".into(), false).await.expect("fail");
    store.record_waiting(&key, lane.wanted, "db.u: its lane is paused".into()).await.expect("wait");
    let waiting = store.lane(&key).await.expect("read").expect("exists");
    assert_eq!(waiting.status(), LaneStatus::Waiting);
    assert_eq!(waiting.waiting_for.as_deref(), Some("db.u: its lane is paused"));
    assert!(!waiting.has_work());
    assert!(waiting.last_error.is_none(), "waiting is not a failure");

    // The lane that commits the transaction asks it to go on.
    store.apply_lane_changes(vec![touch(&key)], Vec::new()).await.expect("touch");
    let asked = store.lane(&key).await.expect("read").expect("exists");
    assert_eq!(asked.status(), LaneStatus::Pending);
    store.record_success(&key, asked.wanted).await.expect("success");
    let done = store.lane(&key).await.expect("read").expect("exists");
    assert_eq!(done.status(), LaneStatus::Completed);
    assert_eq!(done.waiting_for, None);
}
