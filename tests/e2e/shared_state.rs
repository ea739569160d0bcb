//! Several instances on one PostgreSQL state store: lanes shared by leases,
//! fencing, one reconcile, sidecars that only record hints.
//!
//! Postgres is a real throwaway cluster from Debian's package
//! (`harness::postgres`); each test keeps to its own schema.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use icerelay::catalog::TableIdent;
use icerelay::config::Secret;
use icerelay::proxy::commit_tap::{CommitHint, HintKind, Transaction, TransactionMember};
use icerelay::state::postgres::{PostgresSettings, PostgresStore};
use icerelay::state::{LaneChange, LaneKey, LaneStatus, Progress, StateError, StateStore};
use serde_json::{Value, json};

use crate::harness::postgres::{PASSWORD, Postgres};
use crate::harness::{RelayProcess, SeaweedFs, unique};
use crate::replication::{
    Replica, assert_replica_matches, history, ident, refs, relay_toml_from, source_rows, status, write_with,
};

fn settings(url: &str, schema: &str) -> PostgresSettings {
    PostgresSettings {
        url: Secret::new(url),
        schema: schema.to_owned(),
        ca_file: None,
        max_connections: 4,
        connect_timeout: Duration::from_secs(5),
    }
}

fn hint(table: &TableIdent) -> CommitHint {
    CommitHint { kind: HintKind::Commit, table: table.clone(), prefix: None, metadata_location: None }
}

fn progress(key: &LaneKey, snapshot: i64) -> Progress {
    Progress {
        key: key.clone(),
        source_metadata_location: None,
        replica_metadata_location: Some(format!("s3://replica/{snapshot}.metadata.json")),
        added_snapshots: vec![snapshot],
        snapshots_behind: 0,
        mode: None,
        managed_properties: None,
        managed_refs: None,
        source_uuid: None,
        log_drift: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_postgres_store_migrates_once_and_shares_hints_lanes_leases_and_passes() {
    let pg = Postgres::shared();
    let schema = unique("store");
    let settings = settings(&pg.url, &schema);

    // Four instances starting together: one migrates, all open.
    let opened = futures::future::join_all((0..4).map(|_| PostgresStore::open(&settings))).await;
    let stores: Vec<PostgresStore> = opened.into_iter().map(|s| s.expect("open")).collect();
    let db = pg.connect().await;
    let version: i32 =
        db.query_one(&format!("SELECT version FROM {schema}.schema_version"), &[]).await.expect("version").get(0);
    assert_eq!(version, icerelay::state::postgres::SCHEMA_VERSION);
    let rows = db.query(&format!("SELECT * FROM {schema}.schema_version"), &[]).await.expect("rows");
    assert_eq!(rows.len(), 1, "one version row however many instances migrated");
    assert!(!stores[0].describe().contains(PASSWORD), "{}", stores[0].describe());

    // Hints: a hint whose id is lower but whose transaction commits later is
    // not skipped by a fan-out that consumed a higher id meanwhile.
    let table = TableIdent::new(icerelay::catalog::Namespace::from_dotted("db"), "t");
    let mut late = pg.connect().await;
    let late_tx = late.transaction().await.expect("begin");
    late_tx
        .execute(
            &format!("INSERT INTO {schema}.hints (namespace, name, kind, recorded_at) VALUES ('[\"db\"]', 'late', 'commit', 1)"),
            &[],
        )
        .await
        .expect("insert");
    stores[1].append_hints(vec![hint(&table)]).await.expect("append");
    let seen = stores[2].pending_hints(100).await.expect("pending");
    assert_eq!(seen.len(), 1, "the uncommitted hint is not visible yet");
    stores[2].apply_lane_changes(Vec::new(), seen.iter().map(|h| h.id).collect()).await.expect("fan out");
    late_tx.commit().await.expect("commit the late hint");
    let seen_later = stores[3].pending_hints(100).await.expect("pending");
    assert_eq!(seen_later.len(), 1, "the late hint is still there: {seen_later:?}");
    assert_eq!(seen_later[0].hint.table.name, "late");
    assert!(seen_later[0].id < seen[0].id, "its id is the lower one");

    // Lanes and leases.
    let key = LaneKey::new(table.clone(), "dr");
    stores[0]
        .apply_lane_changes(
            vec![LaneChange::Touch { key: key.clone(), replica_table: table.clone(), at: 1 }],
            Vec::new(),
        )
        .await
        .expect("touch");
    let ttl = Duration::from_millis(400);
    let a = stores[0].acquire_lease(&key, "a", ttl).await.expect("acquire").expect("a gets the lane");
    assert!(stores[1].acquire_lease(&key, "b", ttl).await.expect("acquire").is_none(), "b waits while a holds it");
    assert!(stores[0].renew_lease(&a, ttl).await.expect("renew"), "a renews");
    let a_view = stores[0].fenced(a.clone()).expect("a fenced view");
    a_view.record_progress(progress(&key, 1)).await.expect("a records while it holds the lane");

    // a stops renewing (a long pause): b takes over after the expiry.
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    let b = stores[1].acquire_lease(&key, "b", ttl).await.expect("acquire").expect("b takes over the expired lease");
    assert!(b.generation > a.generation, "{b:?} after {a:?}");
    assert!(!stores[0].renew_lease(&a, ttl).await.expect("renew"), "a's lease is gone");
    let refused = a_view.record_progress(progress(&key, 2)).await.expect_err("a is fenced");
    assert!(matches!(refused, StateError::Fenced { .. }), "{refused}");
    let refused = a_view.record_success(&key, 5).await.expect_err("a is fenced");
    assert!(matches!(refused, StateError::Fenced { .. }), "{refused}");
    let b_view = stores[1].fenced(b.clone()).expect("b fenced view");
    b_view.record_progress(progress(&key, 3)).await.expect("b records");
    assert_eq!(
        stores[2].replicated_snapshots(&key).await.expect("snapshots"),
        BTreeSet::from([1, 3]),
        "nothing a recorded after losing the lane is kept"
    );
    // a giving up its old lease does not free b's.
    stores[0].release_lease(&a).await.expect("release");
    assert!(stores[2].acquire_lease(&key, "c", ttl).await.expect("acquire").is_none(), "b still holds it");
    stores[1].release_lease(&b).await.expect("release");
    assert!(stores[2].acquire_lease(&key, "c", ttl).await.expect("acquire").is_some(), "released at once");

    // Operator actions, promotion, failback, rename and drop on the shared store.
    use icerelay::state::{FailbackChoice, Promotion, PromotionMode};
    let ops = LaneKey::new(TableIdent::new(table.namespace.clone(), "ops"), "dr");
    let touch = |key: &LaneKey| LaneChange::Touch { key: key.clone(), replica_table: key.table.clone(), at: 5 };
    stores[0].apply_lane_changes(vec![touch(&ops)], Vec::new()).await.expect("touch");
    assert!(stores[0].set_paused(&ops, true).await.expect("pause"));
    assert!(stores[1].lane(&ops).await.expect("read").expect("lane").paused, "paused for every instance");
    assert!(stores[1].request_resync(&ops).await.expect("resync"));
    let deadline = icerelay::state::now_ms() + 60_000;
    assert!(stores[0].request_promotion(&ops, PromotionMode::Now, deadline).await.expect("promote"));
    let lane = stores[2].lane(&ops).await.expect("read").expect("lane");
    assert_eq!((lane.promotion, lane.promotion_deadline), (Some(PromotionMode::Now), Some(deadline)));
    assert!(stores[1].claim_promotion(&ops).await.expect("claim"));
    assert!(!stores[0].withdraw_promotion(&ops).await.expect("withdraw"), "a claimed promotion cannot be withdrawn");
    let promotion = Promotion {
        at: 7,
        recovery_point: Some(11),
        recovery_point_at: Some(12),
        missed_snapshots: Some(2),
        source_answered: true,
        metadata_location: Some("s3://r/m.json".into()),
    };
    assert!(stores[1].record_promotion(&ops, promotion.clone()).await.expect("record"));
    assert_eq!(stores[2].lane(&ops).await.expect("read").expect("lane").promoted, Some(promotion));
    let back = LaneKey::new(TableIdent::new(table.namespace.clone(), "back"), "dr");
    stores[0].apply_lane_changes(vec![touch(&back)], Vec::new()).await.expect("touch");
    let choice = FailbackChoice { keep_branch: Some("before".into()) };
    assert!(stores[0].request_failback(&back, choice.clone()).await.expect("failback"));
    assert_eq!(stores[1].lane(&back).await.expect("read").expect("lane").failback, Some(choice));
    let renamed = TableIdent::new(table.namespace.clone(), "back_renamed");
    let rename = LaneChange::Rename { from: back.clone(), to: renamed.clone(), replica_to: renamed.clone(), at: 9 };
    stores[1].apply_lane_changes(vec![rename], Vec::new()).await.expect("rename");
    let moved = LaneKey::new(renamed.clone(), "dr");
    let lane = stores[2].lane(&moved).await.expect("read").expect("the lane moved");
    assert_eq!(lane.replica_renamed_from, Some(back.table.clone()));
    assert!(stores[2].lane(&back).await.expect("read").is_none());
    stores[2]
        .apply_lane_changes(vec![LaneChange::SourceDropped { key: moved.clone(), generation: lane.wanted }], Vec::new())
        .await
        .expect("dropped");
    assert!(stores[0].lane(&moved).await.expect("read").expect("lane").source_dropped);

    // Copy checkpoints are shared, and old ones pruned.
    let file = icerelay::state::CopiedFile { target: "s3://r/a".into(), size: 3, checksum: None };
    stores[0].record_copied_file("dr", "s3://s/a", file.clone()).await.expect("record");
    assert_eq!(stores[1].copied_file("dr", "s3://s/a").await.expect("read"), Some(file));
    assert_eq!(stores[1].prune_copied_files(icerelay::state::now_ms() - 60_000).await.expect("prune"), 0);
    assert_eq!(stores[1].prune_copied_files(icerelay::state::now_ms() + 1).await.expect("prune"), 1);

    // Multi-table transactions are shared: recorded by one instance, found
    // by another from any snapshot of any member, and pruned by age.
    let table_x = TableIdent::new(icerelay::catalog::Namespace::from_dotted("db"), "x");
    let members = vec![
        TransactionMember { table: table_x.clone(), snapshots: vec![11, 12] },
        TransactionMember {
            table: TableIdent::new(icerelay::catalog::Namespace::from_dotted("db"), "y"),
            snapshots: vec![21],
        },
    ];
    let refused = stores[0].record_transaction(Transaction { members: members.clone() }).await.expect("record");
    stores[1].forget_transaction(refused).await.expect("forget what the primary refused");
    assert!(stores[2].transaction_of(&table_x, &[11, 12]).await.expect("read").is_none(), "forgotten");
    stores[0].record_transaction(Transaction { members: members.clone() }).await.expect("record");
    let found = stores[1].transaction_of(&table_x, &[99, 12]).await.expect("read").expect("found by 12");
    assert_eq!(found.members, members);
    assert!(stores[1].transaction_of(&table_x, &[21]).await.expect("read").is_none(), "21 is y's");
    assert_eq!(stores[2].prune_transactions(found.recorded_at).await.expect("prune"), 0);
    assert_eq!(stores[2].prune_transactions(found.recorded_at + 1).await.expect("prune"), 1);
    assert!(stores[0].transaction_of(&table_x, &[11]).await.expect("read").is_none());

    // A lane waiting for a transaction's other tables asks for no work, and
    // its next success clears the wait.
    let waiting_key = LaneKey::new(table_x.clone(), "dr-wait");
    let ask = LaneChange::Touch { key: waiting_key.clone(), replica_table: table_x.clone(), at: 1 };
    stores[0].apply_lane_changes(vec![ask], Vec::new()).await.expect("touch");
    let wanted = stores[0].lane(&waiting_key).await.expect("read").expect("lane").wanted;
    stores[1].record_waiting(&waiting_key, wanted, "db.y: its lane is paused".into()).await.expect("wait");
    let waiting = stores[2].lane(&waiting_key).await.expect("read").expect("lane");
    assert_eq!(
        (waiting.status(), waiting.waiting_for.as_deref()),
        (LaneStatus::Waiting, Some("db.y: its lane is paused"))
    );
    assert!(!waiting.has_work());
    stores[1].record_success(&waiting_key, wanted).await.expect("success");
    assert_eq!(stores[0].lane(&waiting_key).await.expect("read").expect("lane").waiting_for, None);

    // One instance per reconcile pass.
    let every = Duration::from_millis(600);
    assert!(stores[0].claim_pass("reconcile", "a", every).await.expect("claim"));
    assert!(!stores[1].claim_pass("reconcile", "b", every).await.expect("claim"), "not due again yet");
    tokio::time::sleep(every + Duration::from_millis(100)).await;
    assert!(stores[1].claim_pass("reconcile", "b", every).await.expect("claim"), "due again");
    assert!(!stores[0].claim_pass("reconcile", "a", every).await.expect("claim"));

    // A store written by a newer icerelay is refused, naming both versions.
    db.execute(&format!("UPDATE {schema}.schema_version SET version = 99"), &[]).await.expect("bump");
    let newer = PostgresStore::open(&settings).await.expect_err("newer schema");
    let message = newer.to_string();
    assert!(message.contains("99") && message.contains("newer icerelay"), "{message}");
    assert!(!message.contains(PASSWORD), "{message}");

    // A wrong password: the error says so and never shows either password.
    let wrong = pg.url.replace(PASSWORD, "not-the-password-8812");
    let refused = PostgresStore::open(&self::settings(&wrong, &schema)).await.expect_err("wrong password");
    let message = refused.to_string();
    assert!(message.contains("127.0.0.1") && message.contains("password"), "{message}");
    assert!(!message.contains("not-the-password-8812") && !message.contains(PASSWORD), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_store_of_every_older_schema_version_upgrades_and_keeps_its_lanes() {
    use icerelay::state::postgres::{MIGRATIONS, SCHEMA_VERSION};
    let pg = Postgres::shared();
    let db = pg.connect().await;
    for version in 1..SCHEMA_VERSION {
        let schema = unique("migrate");
        // A store as that version left it, with a lane and a hint in it.
        let mut script = format!("CREATE SCHEMA {schema}; SET search_path = {schema};");
        for step in &MIGRATIONS[..usize::try_from(version).expect("version")] {
            script.push_str(step);
        }
        script.push_str(&format!(
            "CREATE TABLE schema_version (version INTEGER NOT NULL); INSERT INTO schema_version VALUES ({version});
             INSERT INTO lanes (namespace, name, destination, replica_namespace, replica_name, wanted, done)
                 VALUES ('[\"db\"]', 't', 'dr', '[\"db\"]', 't', 3, 2);
             INSERT INTO hints (namespace, name, kind, recorded_at) VALUES ('[\"db\"]', 't', 'commit', 7);
             SET search_path = public;"
        ));
        db.batch_execute(&script).await.expect("an old store");

        let store =
            PostgresStore::open(&settings(&pg.url, &schema)).await.unwrap_or_else(|e| panic!("v{version}: {e}"));
        let table = TableIdent::new(icerelay::catalog::Namespace::from_dotted("db"), "t");
        let key = LaneKey::new(table, "dr");
        let lane = store.lane(&key).await.expect("read").expect("the lane is kept");
        assert_eq!((lane.wanted, lane.done), (3, 2), "v{version}");
        assert_eq!(store.pending_hints(10).await.expect("hints").len(), 1, "v{version}");
        let now: i32 =
            db.query_one(&format!("SELECT version FROM {schema}.schema_version"), &[]).await.expect("version").get(0);
        assert_eq!(now, SCHEMA_VERSION, "v{version} is migrated to the newest");
        // What the newer versions added works on the upgraded store.
        let seen =
            icerelay::state::SourceSeen { etag: "\"e1\"".into(), metadata_location: Some("s3://b/m.json".into()) };
        store
            .apply_lane_changes(vec![LaneChange::Seen { key: key.clone(), seen: seen.clone() }], Vec::new())
            .await
            .expect("seen");
        assert_eq!(store.lane(&key).await.expect("read").expect("lane").source_seen, Some(seen), "v{version}");
    }
}

/// An instance's configuration: the shared SeaweedFS to its replica, for
/// `namespace`, with state in Postgres under `schema`.
fn shared_toml(namespace: &str, schema: &str, state_dir: &std::path::Path) -> String {
    let state = format!("state = {{ type = \"postgres\", url = \"${{ICERELAY_PG_URL}}\", schema = \"{schema}\" }}");
    relay_toml_from(SeaweedFs::shared(), Replica::Seaweed(SeaweedFs::shared_replica()), namespace, state_dir, &state)
}

/// An instance on the shared store; `env` adds overrides (lease time, role).
async fn instance(dir: &std::path::Path, name: &str, toml: &str, env: &[(&str, &str)]) -> RelayProcess {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(&config, toml).expect("config");
    let mut vars = vec![("ICERELAY_PG_URL", Postgres::shared().url.as_str())];
    vars.extend_from_slice(env);
    RelayProcess::start(&["serve", "--config", &config.display().to_string()], &vars).await
}

/// The lanes' lease owners right now, by table name.
async fn lease_owners(db: &tokio_postgres::Client, schema: &str) -> BTreeMap<String, String> {
    db.query(
        &format!(
            "SELECT name, lease_owner FROM {schema}.lanes WHERE lease_owner IS NOT NULL
             AND lease_expires_at > (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT"
        ),
        &[],
    )
    .await
    .expect("leases")
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// Waits until every lane of the status is completed at the source's
/// current metadata (`expected`, by table name without its namespace).
async fn wait_all_replicated(admin: &str, expected: &BTreeMap<String, String>, logs: impl Fn() -> String) -> Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let s = status(admin).await;
        let done: BTreeSet<String> = s["tables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| {
                t["destinations"].as_array().into_iter().flatten().all(|d| {
                    d["status"] == "completed"
                        && expected
                            .get(t["table"].as_str().unwrap_or(""))
                            .is_some_and(|m| d["source_metadata_location"] == *m)
                })
            })
            .filter_map(|t| t["table"].as_str().map(str::to_owned))
            .collect();
        if expected.keys().all(|t| done.contains(t)) {
            return s;
        }
        assert!(Instant::now() < deadline, "not every table replicated within 180 s: {s}\n{}", logs());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Commit lines of every audit log under `dirs`: how many times each source
/// snapshot was committed to a replica. A line for a commit that landed
/// before its instance could record it (recorded later by whichever instance
/// ran the lane next, `detail.adopted`) is not a second commit.
fn audited_commits(dirs: &[std::path::PathBuf]) -> BTreeMap<i64, usize> {
    let mut counts = BTreeMap::new();
    for dir in dirs {
        let text = std::fs::read_to_string(dir.join("audit.log")).unwrap_or_default();
        for line in text.lines() {
            let entry: Value = serde_json::from_str(line).expect("audit line");
            if entry["action"] == "commit" && entry["detail"]["adopted"].is_null() {
                for id in entry["source_snapshots"].as_array().into_iter().flatten().filter_map(Value::as_i64) {
                    *counts.entry(id).or_insert(0) += 1;
                }
            }
        }
    }
    counts
}

/// Source metadata locations by table name (without namespace).
fn by_name(tables: &[String], written: &[Value]) -> BTreeMap<String, String> {
    tables
        .iter()
        .zip(written)
        .map(|(t, w)| {
            let name = t.rsplit_once('.').map_or(t.as_str(), |(_, n)| n);
            (name.to_owned(), w["metadata_location"].as_str().expect("location").to_owned())
        })
        .collect()
}

/// The status of `table`'s (only) lane in a status answer.
fn lane_of(status: &Value, table: &str) -> Value {
    let name = table.rsplit_once('.').map_or(table, |(_, n)| n);
    status["tables"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["table"] == name)
        .map(|t| t["destinations"][0].clone())
        .unwrap_or_else(|| panic!("no status for {table}: {status}"))
}

fn snapshot_ids(metadata: &Value) -> Vec<i64> {
    metadata["snapshots"].as_array().into_iter().flatten().filter_map(|s| s["snapshot-id"].as_i64()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn three_instances_on_one_postgres_replicate_every_commit_once_and_survive_a_sigkill() {
    const TABLES: usize = 20;
    let replica = Replica::Seaweed(SeaweedFs::shared_replica());
    let ns = unique("shared");
    let schema = unique("three");
    let work = tempfile::tempdir().expect("dir");
    let dirs: Vec<std::path::PathBuf> = (0..4).map(|i| work.path().join(format!("state{i}"))).collect();
    let lease = [("ICERELAY__REPLICATION__LEASE_TTL", "3s")];
    let mut relays = Vec::new();
    for (i, dir) in dirs.iter().take(3).enumerate() {
        relays.push(instance(work.path(), &format!("r{i}"), &shared_toml(&ns, &schema, dir), &lease).await);
    }
    // A sidecar: records hints, runs no lane.
    let sidecar = instance(
        work.path(),
        "sidecar",
        &shared_toml(&ns, &schema, &dirs[3]),
        &[("ICERELAY__REPLICATION__REPLICATE", "false")],
    )
    .await;
    let all_logs = |relays: &[RelayProcess]| relays.iter().map(|r| r.logs()).collect::<Vec<_>>().join("\n----\n");

    // Writers commit through all four, four at a time.
    let seaweed = SeaweedFs::shared();
    let urls: Vec<String> = relays.iter().map(|r| r.url.clone()).chain([sidecar.url.clone()]).collect();
    let tables: Vec<String> = (0..TABLES).map(|i| format!("{ns}.t{i}")).collect();
    let ops = json!([{"op": "create"}, {"op": "append", "start": 0, "rows": 3}, {"op": "append", "start": 10, "rows": 2},
                     {"op": "overwrite", "category": "a", "start": 100, "rows": 2}]);
    let written: Vec<Value> = futures::stream::iter(tables.iter().enumerate())
        .map(|(i, table)| write_with(seaweed.client_conn(&urls[i % urls.len()]), table, ops.clone()))
        .buffered(4)
        .collect()
        .await;
    let expected = by_name(&tables, &written);
    let converged = wait_all_replicated(&relays[0].admin_url, &expected, || all_logs(&relays)).await;

    // Every instance, the sidecar too, gives the same answer (the sidecar, which
    // never probes destinations, reports how the others found them).
    assert!(converged["destinations"][0]["mode"].is_string(), "{converged}");
    let converged = status(&relays[0].admin_url).await;
    for other in relays.iter().skip(1).chain([&sidecar]) {
        assert_eq!(status(&other.admin_url).await, converged, "status of {}", other.admin_url);
    }
    // The lanes were shared: more than one instance committed.
    let committers = dirs.iter().take(3).filter(|d| !audited_commits(&[d.to_path_buf()]).is_empty()).count();
    assert!(committers >= 2, "lanes ran on {committers} instance(s)");
    assert!(audited_commits(&[dirs[3].clone()]).is_empty(), "the sidecar committed nothing");
    // Each source snapshot was committed to its replica exactly once.
    let counts = audited_commits(&dirs);
    for (table, w) in tables.iter().zip(&written) {
        for id in w["snapshots"].as_array().into_iter().flatten().filter_map(|s| s["id"].as_i64()) {
            assert_eq!(counts.get(&id), Some(&1), "snapshot {id} of {table} was committed {:?} times", counts.get(&id));
        }
    }
    // Every replica has every source snapshot as it is (id, parent, sequence
    // number, time, summary, schema) and the same refs; three are also read
    // back at every snapshot with PyIceberg and DuckDB.
    let replica_catalog = replica.catalog();
    let source_catalog = crate::replication::seaweed_catalog(seaweed);
    for table in &tables {
        let source = source_catalog.load_table(&ident(table)).await.expect("load").expect("source");
        let copy = replica_catalog.load_table(&ident(table)).await.expect("load").expect("replica");
        assert_eq!(history(&copy.metadata), history(&source.metadata), "{table}");
        assert_eq!(refs(&copy.metadata), refs(&source.metadata), "{table}");
    }
    for table in &tables[..3] {
        let s = lane_of(&converged, table);
        assert_replica_matches(replica, table, &source_rows(table).await, &s).await;
    }

    // More commits, then SIGKILL an instance while it holds lanes: the others
    // finish them once its leases run out.
    let more = json!([{"op": "append", "start": 200, "rows": 2}, {"op": "append", "start": 300, "rows": 2},
                      {"op": "append", "start": 400, "rows": 2}]);
    let writes = futures::stream::iter(tables.iter().enumerate())
        .map(|(i, table)| write_with(seaweed.client_conn(&urls[1 + i % 3]), table, more.clone()))
        .buffered(4)
        .collect::<Vec<Value>>();
    let db = Postgres::shared().connect().await;
    let victim_pid = format!("/{}/", relays[0].pid());
    let victim = &mut relays[0];
    let killer = async {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let owners = lease_owners(&db, &schema).await;
            if owners.values().any(|o| o.contains(&victim_pid)) {
                victim.kill();
                return (owners, Instant::now());
            }
            assert!(Instant::now() < deadline, "the first instance never held a lane");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let (rewritten, (held, killed_at)) = tokio::join!(writes, killer);
    let held: Vec<&String> = held.iter().filter(|(_, o)| o.contains(&victim_pid)).map(|(t, _)| t).collect();
    let expected = by_name(&tables, &rewritten);
    let survivors = &relays[1..];
    wait_all_replicated(&survivors[0].admin_url, &expected, || all_logs(survivors)).await;
    eprintln!(
        "lanes held by the killed instance ({held:?}) finished on the others {:?} after the kill",
        killed_at.elapsed()
    );

    // Nothing lost, nothing doubled, same order: the replica's snapshots are the source's.
    for table in &tables {
        let source = source_catalog.load_table(&ident(table)).await.expect("load").expect("source");
        let copy = replica_catalog.load_table(&ident(table)).await.expect("load").expect("replica");
        assert_eq!(snapshot_ids(&copy.metadata), snapshot_ids(&source.metadata), "{table}");
    }
    let now = status(&survivors[0].admin_url).await;
    for name in held.iter().take(2) {
        let table = format!("{ns}.{name}");
        assert_replica_matches(replica, &table, &source_rows(&table).await, &lane_of(&now, &table)).await;
    }
    // The URL's password never reached a log.
    for relay in relays.iter().chain([&sidecar]) {
        assert!(!relay.logs().contains(PASSWORD), "a log shows the Postgres password");
    }
}

fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill").args([signal, &pid.to_string()]).status().expect("kill");
    assert!(status.success(), "kill {signal} {pid}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_paused_past_its_lease_commits_nothing_more_for_the_lane() {
    let replica = Replica::Seaweed(SeaweedFs::shared_replica());
    let ns = unique("fence");
    let table = format!("{ns}.big");
    let schema = unique("fence");
    let work = tempfile::tempdir().expect("dir");
    let dirs = [work.path().join("a"), work.path().join("b")];
    let lease = [("ICERELAY__REPLICATION__LEASE_TTL", "2s")];
    let mut relays = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        relays.push(instance(work.path(), &format!("r{i}"), &shared_toml(&ns, &schema, dir), &lease).await);
    }
    let seaweed = SeaweedFs::shared();
    write_with(seaweed.client_conn(&relays[0].url), &table, json!([{"op": "create", "partitioned": false}])).await;

    // A large commit takes a while to copy: pause whichever instance claims it, mid-run.
    let db = Postgres::shared().connect().await;
    let write = write_with(seaweed.client_conn(&relays[0].url), &table, json!([{"op": "append_random", "mb": 48}]));
    let pause = async {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let owners = lease_owners(&db, &schema).await;
            if let Some(owner) = owners.get("big") {
                let paused = relays
                    .iter()
                    .position(|r| owner.contains(&format!("/{}/", r.pid())))
                    .expect("the owner is one of the instances");
                signal(relays[paused].pid(), "-STOP");
                return paused;
            }
            assert!(Instant::now() < deadline, "nobody claimed the lane");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let (written, paused) = tokio::join!(write, pause);
    let other = 1 - paused;
    let location = written["metadata_location"].as_str().expect("location");
    let big = written["snapshots"].as_array().and_then(|s| s.last()).and_then(|s| s["id"].as_i64()).expect("snapshot");

    // The other instance takes the lane over once the lease runs out, and finishes it.
    let mut expected = BTreeMap::new();
    expected.insert("big".to_owned(), location.to_owned());
    wait_all_replicated(&relays[other].admin_url, &expected, || relays[other].logs()).await;

    // Resumed, the paused instance finds its lease gone and writes nothing.
    signal(relays[paused].pid(), "-CONT");
    let noticed = |logs: String| logs.contains("took over the lane") || logs.contains("stopped a lane run");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !noticed(relays[paused].logs()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Nor did it record anything about the lane: it is as the other left it.
    let after = lane_of(&status(&relays[other].admin_url).await, &table);
    assert_eq!(after["status"], "completed", "{after}");
    assert_eq!(after["source_metadata_location"], location, "{after}");
    let paused_commits = audited_commits(&[dirs[paused].clone()]);
    assert_eq!(paused_commits.get(&big), None, "the paused instance committed after losing its lease");
    assert_eq!(audited_commits(&dirs).get(&big), Some(&1), "committed once, by the instance that took over");
    assert!(noticed(relays[paused].logs()), "the paused instance says it stopped:\n{}", relays[paused].logs());

    // The replica's history is the source's: nothing twice, nothing missing.
    let source =
        crate::replication::seaweed_catalog(seaweed).load_table(&ident(&table)).await.expect("load").expect("source");
    let copy = replica.catalog().load_table(&ident(&table)).await.expect("load").expect("replica");
    assert_eq!(snapshot_ids(&copy.metadata), snapshot_ids(&source.metadata));

    // An instance stopped with SIGTERM in the middle of a run gives its lease
    // up on the way out: the lane is free at once, not after lease_ttl.
    let write = write_with(seaweed.client_conn(&relays[other].url), &table, json!([{"op": "append_random", "mb": 48}]));
    let stopper = async {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(owner) = lease_owners(&db, &schema).await.get("big") {
                let holder =
                    relays.iter().position(|r| owner.contains(&format!("/{}/", r.pid()))).expect("an instance");
                return holder;
            }
            assert!(Instant::now() < deadline, "nobody claimed the lane");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let (written, holder) = tokio::join!(write, stopper);
    let holder_pid = relays[holder].pid();
    assert!(relays[holder].terminate().success(), "a clean exit");
    let left = lease_owners(&db, &schema).await;
    assert!(
        left.get("big").is_none_or(|o| !o.contains(&format!("/{holder_pid}/"))),
        "the stopped instance still holds the lane: {left:?}"
    );
    let mut expected = BTreeMap::new();
    expected.insert("big".to_owned(), written["metadata_location"].as_str().expect("location").to_owned());
    let survivor = 1 - holder;
    wait_all_replicated(&relays[survivor].admin_url, &expected, || relays[survivor].logs()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_outage_under_load_costs_engines_nothing_and_replicas_converge_after() {
    // A cluster of its own: this test stops it.
    let pg = Postgres::start();
    let replica = Replica::Seaweed(SeaweedFs::shared_replica());
    let ns = unique("outage");
    let schema = unique("outage");
    let work = tempfile::tempdir().expect("dir");
    let dirs = [work.path().join("a"), work.path().join("b")];
    let env = [("ICERELAY__REPLICATION__LEASE_TTL", "3s"), ("ICERELAY_PG_URL", pg.url.as_str())];
    let mut relays = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let config = work.path().join(format!("r{i}.toml"));
        std::fs::write(&config, shared_toml(&ns, &schema, dir)).expect("config");
        relays.push(RelayProcess::start(&["serve", "--config", &config.display().to_string()], &env).await);
    }
    let seaweed = SeaweedFs::shared();
    let tables: Vec<String> = (0..4).map(|i| format!("{ns}.t{i}")).collect();
    for (i, table) in tables.iter().enumerate() {
        write_with(
            seaweed.client_conn(&relays[i % 2].url),
            table,
            json!([{"op": "create"}, {"op": "append", "rows": 2}]),
        )
        .await;
    }

    // Postgres goes away while writers keep committing through both instances.
    pg.stop();
    let stopped = Instant::now();
    let ops = json!([{"op": "append", "start": 10, "rows": 2}, {"op": "append", "start": 20, "rows": 2},
                     {"op": "append", "start": 30, "rows": 2}]);
    let written: Vec<Value> = futures::stream::iter(tables.iter().enumerate())
        .map(|(i, table)| write_with(seaweed.client_conn(&relays[i % 2].url), table, ops.clone()))
        .buffered(2)
        .collect()
        .await;
    // (write_with fails the test if any commit failed: engines saw no error.)
    let ready = reqwest::get(format!("{}/readyz", relays[0].admin_url)).await.expect("readyz");
    assert_eq!(ready.status(), 200, "the proxy stays in service");
    let ready: Value = ready.json().await.expect("json");
    assert_eq!(ready["state"]["reachable"], false, "{ready}");
    assert!(!ready.to_string().contains(PASSWORD), "{ready}");
    assert_eq!(crate::replication::validate("Readiness", &[&ready]).await["errors"], json!([]), "{ready}");
    let metrics =
        reqwest::get(format!("{}/metrics", relays[0].admin_url)).await.expect("metrics").text().await.expect("text");
    assert!(
        crate::harness::metric_sum(&metrics, "icerelay_commit_hints_failed_total", &[]) >= 1.0,
        "hints that could not be recorded are counted: {metrics}"
    );
    let status = reqwest::get(format!("{}/v1/replication/status", relays[1].admin_url)).await.expect("status");
    assert_eq!(status.status(), 503, "the status API says the state is unavailable");
    if let Some(left) = Duration::from_secs(30).checked_sub(stopped.elapsed()) {
        tokio::time::sleep(left).await;
    }
    pg.restart();

    // Reconcile finds what the lost hints would have said; every replica converges.
    let expected = by_name(&tables, &written);
    let logs = || relays.iter().map(RelayProcess::logs).collect::<Vec<_>>().join("\n----\n");
    let converged = wait_all_replicated(&relays[0].admin_url, &expected, logs).await;
    let counts = audited_commits(&dirs);
    for (table, w) in tables.iter().zip(&written) {
        for id in w["snapshots"].as_array().into_iter().flatten().filter_map(|s| s["id"].as_i64()) {
            assert_eq!(
                counts.get(&id),
                Some(&1),
                "snapshot {id} of {table}: committed {:?} times\n{}\n{}",
                counts.get(&id),
                std::fs::read_to_string(dirs[0].join("audit.log")).unwrap_or_default(),
                std::fs::read_to_string(dirs[1].join("audit.log")).unwrap_or_default()
            );
        }
    }
    let table = &tables[0];
    assert_replica_matches(replica, table, &source_rows(table).await, &lane_of(&converged, table)).await;
    for relay in &relays {
        assert!(!relay.logs().contains(PASSWORD), "a log shows the Postgres password");
    }
}
