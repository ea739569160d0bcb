//! Multi-table transactions end to end: a client commits appends to two
//! tables in one `transactions/commit` through icerelay, and a reader of the
//! replica catalog (rustberg), polling both tables in a tight loop, must never
//! see one table changed without the other, also across a SIGKILL of
//! icerelay. On SeaweedFS the audit log and the metrics show one multi-table
//! commit per transaction. A
//! table of the transaction that replicates elsewhere does not hold them up.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::response::IntoResponse;
use serde_json::{Value, json};

use crate::harness::java_rest::JavaRest;
use crate::harness::{RelayProcess, Rustberg, SeaweedFs, Served, python, stand_in, unique};
use crate::replication::{
    Replica, history, ident, lane_status, local_primary_toml, read_catalog, relay_toml_for, relay_toml_from,
    wait_replicated,
};

/// The primary of a case: where the writer commits (through icerelay).
enum Primary {
    Seaweed(&'static SeaweedFs),
    Rustberg(&'static Rustberg),
    Java(&'static JavaRest),
}

impl Primary {
    /// Client settings for a connection through icerelay at `relay`.
    fn through(&self, relay: &str) -> Value {
        match self {
            Self::Seaweed(s) => s.client_conn(relay),
            Self::Rustberg(r) => json!({"uri": relay, "warehouse": r.warehouse}),
            Self::Java(j) => json!({"uri": relay, "warehouse": j.warehouse}),
        }
    }

    fn direct(&self) -> Value {
        match self {
            Self::Seaweed(s) => s.client_conn(s.catalog_uri()),
            Self::Rustberg(r) => r.client_conn(),
            Self::Java(j) => j.client_conn(),
        }
    }

    fn catalog(&self) -> icerelay::catalog::RestCatalog {
        match self {
            Self::Seaweed(s) => Replica::Seaweed(s).catalog(),
            Self::Rustberg(r) => Replica::Rustberg(r).catalog(),
            Self::Java(j) => Replica::Java(j).catalog(),
        }
    }

    fn toml(&self, replica: Replica, namespace: &str, state: &std::path::Path, elsewhere: Option<&Rustberg>) -> String {
        let extra = "reconcile_interval = \"2s\"\nretry_initial_backoff = \"200ms\"\nretry_max_backoff = \"2s\"";
        match self {
            // Its [replication] section is the same.
            Self::Seaweed(s) => relay_toml_from(s, replica, namespace, state, ""),
            Self::Rustberg(_) | Self::Java(_) => {
                let (uri, warehouse) = match self {
                    Self::Rustberg(r) => (&r.uri, &r.warehouse),
                    Self::Java(j) => (&j.uri, &j.warehouse),
                    Self::Seaweed(_) => unreachable!("matched above"),
                };
                let mut toml = relay_toml_for(&local_primary_toml(uri, warehouse), replica, namespace, state, extra);
                if let Some(other) = elsewhere {
                    // The namespace `{namespace}_x` goes to another destination.
                    toml.push_str(&format!(
                        "\n[[destinations]]\nname = \"dr2\"\nuri = \"{}\"\nwarehouse = \"{}\"\n\n{}\n[[rules]]\nnamespace = \"{namespace}_x\"\ndestinations = [\"dr2\"]\n",
                        other.uri,
                        other.warehouse,
                        other.storage_toml()
                    ));
                }
                toml
            }
        }
    }
}

async fn write(conn: &Value, ops: Value) -> Value {
    python("multi_table.py", vec![conn.to_string(), ops.to_string()]).await
}

/// icerelay's `replication_transactions` counter for `result`.
async fn transactions_metric(admin: &str, result: &str) -> u64 {
    let text = reqwest::get(format!("{admin}/metrics")).await.expect("metrics").text().await.expect("text");
    let wanted = format!("icerelay_replication_transactions_total{{destination=\"dr\",result=\"{result}\"}}");
    text.lines().find_map(|l| l.strip_prefix(wanted.as_str())).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// Runs the case: tables `a` and `b` made, then transactions appending to
/// both, with a reader on the replica throughout; with `kill`, icerelay is
/// SIGKILLed once the replica has some of them, and a new process finishes.
/// With `elsewhere`, the transactions also append to a table `c` that
/// replicates to that catalog only (atomic per destination).
async fn transactions_stay_whole(
    primary: Primary,
    replica: Replica,
    prefix: &str,
    kill: bool,
    elsewhere: Option<&'static Rustberg>,
) {
    let ns = unique(prefix);
    let tables = [format!("{ns}.a"), format!("{ns}.b")];
    let other = format!("{ns}_x.c");
    let mut changed = tables.to_vec();
    if elsewhere.is_some() {
        changed.push(other.clone());
    }
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("icerelay.toml");
    std::fs::write(&config, primary.toml(replica, &ns, &dir.path().join("state"), elsewhere)).expect("config");
    let config = config.display().to_string();
    let mut relay = RelayProcess::start(&["serve", "--config", &config], &[]).await;

    write(&primary.through(&relay.url), json!([{"op": "create", "tables": changed}])).await;
    let stop = dir.path().join("stop-reading");
    // Readers are watched where the replica catalog makes a multi-table
    // commit visible at once: rustberg does; SeaweedFS validates all parts
    // first but then switches the tables one after the other (its handler
    // says so), so a reader there may see a part early whatever icerelay sends.
    let reader = matches!(replica, Replica::Rustberg(_)).then(|| {
        tokio::spawn(python(
            "watch_together.py",
            vec![replica.conn().to_string(), json!(tables).to_string(), stop.display().to_string()],
        ))
    });
    let first = json!([{"op": "transactions", "tables": changed, "count": 8, "rows": 2}]);
    let mut written = write(&primary.through(&relay.url), first).await;

    if kill {
        // Killed once the replica has some of it.
        let deadline = Instant::now() + Duration::from_secs(60);
        while lane_status(&relay.admin_url, &tables[0]).await.is_none_or(|s| s["replica_metadata_location"].is_null()) {
            assert!(Instant::now() < deadline, "replication never started:\n{}", relay.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        relay.kill();
        relay = RelayProcess::start(&["serve", "--config", &config], &[]).await;
    }
    let second = json!([{"op": "transactions", "tables": changed, "count": 6, "start": 5000, "rows": 1}]);
    written = {
        let more = write(&primary.through(&relay.url), second).await;
        json!({"first": written, "second": more})
    };
    let last = &written["second"]["tables"];
    for table in &tables {
        let location = last[table.as_str()]["metadata_location"].as_str().expect("location");
        wait_replicated(&relay.admin_url, table, location).await;
    }
    if let Some(second_replica) = elsewhere {
        let location = last[other.as_str()]["metadata_location"].as_str().expect("location");
        wait_replicated(&relay.admin_url, &other, location).await;
        let copy = Replica::Rustberg(second_replica).catalog().load_table(&ident(&other)).await.expect("load");
        let source = primary.catalog().load_table(&ident(&other)).await.expect("load").expect("source");
        assert_eq!(
            history(&copy.expect("replica").metadata),
            history(&source.metadata),
            "{other} on its own destination"
        );
    }
    std::fs::write(&stop, "").expect("stop the reader");
    if let Some(reader) = reader {
        let seen = reader.await.expect("reader");
        assert_eq!(
            seen["violations"],
            json!([]),
            "a reader of the replica saw one table changed without the other: {seen}"
        );
        assert!(
            seen["states"].as_array().is_some_and(|s| s.len() >= 3),
            "the reader saw the replica move through several transactions: {seen}"
        );
    }

    // Every snapshot once, with the source's history, and the same rows.
    for table in &tables {
        let source = primary.catalog().load_table(&ident(table)).await.expect("load").expect("source");
        let copy = replica.catalog().load_table(&ident(table)).await.expect("load").expect("replica");
        assert_eq!(history(&copy.metadata), history(&source.metadata), "{table}: same snapshots, same history");
        assert_eq!(copy.metadata["snapshot-log"], source.metadata["snapshot-log"], "{table}: same snapshot-log");
        let (source_rows, replica_rows) =
            (read_catalog(primary.direct(), table).await, read_catalog(replica.conn(), table).await);
        assert_eq!(replica_rows["pyiceberg"], source_rows["pyiceberg"], "{table}: same rows at every snapshot");
    }

    // The instance that finished committed transactions whole: both tables' parts in one commit each.
    let atomic = transactions_metric(&relay.admin_url, "atomic").await;
    assert!(atomic >= 2, "tables committed in multi-table commits: {atomic}\n{}", relay.logs());
    assert_eq!(transactions_metric(&relay.admin_url, "table_by_table").await, 0, "{}", relay.logs());
    let audit = std::fs::read_to_string(dir.path().join("state/audit.log")).expect("audit log");
    let mut together: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    for line in audit.lines() {
        let entry: Value = serde_json::from_str(line).expect("audit line");
        if let Some(id) = entry["detail"]["transaction"]["id"].as_i64() {
            together.entry(id).or_default().push(entry["table"].as_str().unwrap_or_default().to_owned());
        }
    }
    // (A SIGKILL may lose the last lines written.)
    assert!(together.values().any(|parts| parts.len() == 2), "the audit log names the transactions: {audit}");
    for (id, parts) in &together {
        let unique: std::collections::BTreeSet<&String> = parts.iter().collect();
        assert_eq!(unique.len(), parts.len(), "transaction {id} committed once per table: {parts:?}");
    }
    let status = lane_status(&relay.admin_url, &tables[1]).await.expect("status");
    assert_eq!(status["status"], "completed");
    assert_eq!(status["waiting_for"], Value::Null);
}

#[tokio::test(flavor = "multi_thread")]
async fn multi_table_transactions_reach_rustberg_whole_across_a_sigkill() {
    let primary: &'static Rustberg = Box::leak(Box::new(Rustberg::start("txn-primary")));
    let second: &'static Rustberg = Box::leak(Box::new(Rustberg::start("txn-second")));
    transactions_stay_whole(
        Primary::Rustberg(primary),
        Replica::Rustberg(Rustberg::shared()),
        "txn",
        true,
        Some(second),
    )
    .await;
}

/// Into Iceberg's Java catalog: like SeaweedFS, it validates every part
/// first and then commits the tables one after the other, so no reader is
/// watched; icerelay must still send one commit per transaction, and Java's
/// validation must accept it.
#[tokio::test(flavor = "multi_thread")]
async fn multi_table_transactions_reach_the_java_catalog_in_one_commit_each() {
    let primary: &'static Rustberg = Box::leak(Box::new(Rustberg::start("txn-java-primary")));
    let replica = Replica::Java(JavaRest::shared());
    transactions_stay_whole(Primary::Rustberg(primary), replica, "txnjava", false, None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn multi_table_transactions_committed_to_the_java_catalog_reach_rustberg_whole() {
    let primary: &'static JavaRest = Box::leak(Box::new(JavaRest::start("txn-java-source")));
    let replica = Replica::Rustberg(Rustberg::shared());
    transactions_stay_whole(Primary::Java(primary), replica, "txnfromjava", false, None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn multi_table_transactions_reach_seaweedfs_whole() {
    let replica = Replica::Seaweed(SeaweedFs::shared_replica());
    transactions_stay_whole(Primary::Seaweed(SeaweedFs::shared()), replica, "txnsw", false, None).await;
}

/// Serves a catalog without multi-table commits, as some catalogs are: a stand-in
/// in front of a real rustberg that forwards everything but answers
/// `transactions/commit` as Java's catalog code does for an unsupported
/// operation (406 `UnsupportedOperationException`). No catalog here lacks
/// the endpoint, so this is the only way to see the fallback end to end.
async fn without_transactions(behind: &Rustberg) -> Served {
    stand_in(&behind.uri, |upstream, parts, body| async move {
        if parts.uri.path().ends_with("/transactions/commit") {
            let error = json!({"error": {"message": "multi-table commits are not supported",
                                         "type": "UnsupportedOperationException", "code": 406}});
            return (axum::http::StatusCode::NOT_ACCEPTABLE, axum::Json(error)).into_response();
        }
        upstream.forward(&parts, body).await.into_response()
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_destination_without_multi_table_commits_gets_the_tables_one_by_one_and_says_so() {
    let primary: &'static Rustberg = Box::leak(Box::new(Rustberg::start("txn-alone-primary")));
    let behind = Rustberg::shared();
    let stand_in = without_transactions(behind).await;
    let ns = unique("txnalone");
    let tables = [format!("{ns}.a"), format!("{ns}.b")];
    let dir = tempfile::tempdir().expect("dir");
    let toml = format!(
        "state_dir = \"{}\"\n[primary]\nuri = \"{}\"\nwarehouse = \"{}\"\n\n[replication]\nreconcile_interval = \"2s\"\nretry_initial_backoff = \"200ms\"\n\n{}\n[[destinations]]\nname = \"dr\"\nuri = \"{}\"\nwarehouse = \"{}\"\n\n{}\n[[rules]]\nnamespace = \"{ns}\"\ndestinations = [\"dr\"]\n",
        dir.path().join("state").display(),
        primary.uri,
        primary.warehouse,
        primary.storage_toml(),
        stand_in.url,
        behind.warehouse,
        behind.storage_toml(),
    );
    let relay = crate::harness::Relay::start(&toml).await;
    let through = json!({"uri": relay.url, "warehouse": primary.warehouse});
    write(&through, json!([{"op": "create", "tables": tables}])).await;
    let written = write(&through, json!([{"op": "transactions", "tables": tables, "count": 3, "rows": 2}])).await;
    for table in &tables {
        let location = written["tables"][table.as_str()]["metadata_location"].as_str().expect("location");
        wait_replicated(&relay.admin_url, table, location).await;
        let source =
            Primary::Rustberg(primary).catalog().load_table(&ident(table)).await.expect("load").expect("source");
        let copy = Replica::Rustberg(behind).catalog().load_table(&ident(table)).await.expect("load").expect("replica");
        assert_eq!(history(&copy.metadata), history(&source.metadata), "{table}: every snapshot, one by one");
    }
    // It was tried once, refused, and the destination says how it is written now.
    let status = crate::replication::status(&relay.admin_url).await;
    let how = status["destinations"][0]["multi_table_commits"].as_str().unwrap_or_default().to_owned();
    assert!(how.starts_with("table by table") && how.contains("refused"), "{status}");
    assert_eq!(transactions_metric(&relay.admin_url, "atomic").await, 0);
    assert!(transactions_metric(&relay.admin_url, "table_by_table").await >= 6, "every part, alone");
}

/// What the stand-in of a primary that publishes a transaction's tables one
/// after the other does.
#[derive(Default)]
struct LatePublisher {
    /// The path of the table shown late (`.../tables/b`).
    late_path: String,
    /// Its load answer from before the transaction.
    before: Option<axum::body::Bytes>,
    /// Until when icerelay is shown that answer.
    until: Option<Instant>,
    /// Loads answered with it.
    served: usize,
}

/// A primary (a real rustberg behind a stand-in) that applies a
/// `transactions/commit` whole but shows icerelay one of its tables late,
/// as catalogs that switch the tables one after the other (Java Iceberg's
/// `CatalogHandlers`, SeaweedFS) do for a moment: for 4 s after each
/// transaction, icerelay's loads of `late_path` get the table as it was
/// before. Writers (PyIceberg) see the truth.
async fn late_publisher(behind: &Rustberg, late: std::sync::Arc<std::sync::Mutex<LatePublisher>>) -> Served {
    stand_in(&behind.uri, move |upstream, parts, body| {
        let late = late.clone();
        async move {
            let late_path = late.lock().expect("lock").late_path.clone();
            let writer =
                parts.headers.get("user-agent").is_some_and(|v| v.to_str().unwrap_or_default().contains("PyIceberg"));
            if parts.method == axum::http::Method::GET && parts.uri.path().ends_with(&late_path) && !writer {
                let mut late = late.lock().expect("lock");
                if let (Some(before), Some(until)) = (late.before.clone(), late.until)
                    && Instant::now() < until
                {
                    late.served += 1;
                    return ([("content-type", "application/json")], before).into_response();
                }
            }
            if !parts.uri.path().ends_with("/transactions/commit") {
                return upstream.forward(&parts, body).await.into_response();
            }
            let prefix = parts.uri.path().trim_end_matches("/transactions/commit");
            let load = format!("{}{prefix}{late_path}", upstream.uri.trim_end_matches('/'));
            let before = match upstream.http.get(&load).send().await {
                Ok(answer) => answer.bytes().await.ok(),
                Err(_) => None,
            };
            let answer = upstream.forward(&parts, body).await;
            if answer.status.is_success() {
                let mut late = late.lock().expect("lock");
                late.before = before;
                late.until = Some(Instant::now() + Duration::from_secs(4));
            }
            answer.into_response()
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_the_primary_shows_late_is_waited_for_not_left_out() {
    // Seen once with Java as the primary: a lane that loaded its table
    // between the two tables' switches committed its part alone. The
    // moment is made long here, so that it is met every time.
    let primary: &'static Rustberg = Box::leak(Box::new(Rustberg::start("txn-late-primary")));
    let late = std::sync::Arc::new(std::sync::Mutex::new(LatePublisher::default()));
    let stand_in = late_publisher(primary, late.clone()).await;
    let replica = Replica::Rustberg(Rustberg::shared());
    let ns = unique("txnlate");
    let tables = [format!("{ns}.a"), format!("{ns}.b")];
    late.lock().expect("lock").late_path = format!("/namespaces/{ns}/tables/b");
    let dir = tempfile::tempdir().expect("dir");
    let replication = "reconcile_interval = \"2s\"\nretry_initial_backoff = \"200ms\"\nretry_max_backoff = \"2s\"";
    let toml = relay_toml_for(
        &local_primary_toml(&stand_in.url, &primary.warehouse),
        replica,
        &ns,
        &dir.path().join("state"),
        replication,
    );
    let relay = crate::harness::Relay::start(&toml).await;
    let through = json!({"uri": relay.url, "warehouse": primary.warehouse});
    write(&through, json!([{"op": "create", "tables": tables}])).await;
    let stop = dir.path().join("stop-reading");
    let reader = tokio::spawn(python(
        "watch_together.py",
        vec![replica.conn().to_string(), json!(tables).to_string(), stop.display().to_string()],
    ));
    let written = write(&through, json!([{"op": "transactions", "tables": tables, "count": 3, "rows": 2}])).await;
    for table in &tables {
        let location = written["tables"][table.as_str()]["metadata_location"].as_str().expect("location");
        wait_replicated(&relay.admin_url, table, location).await;
    }
    std::fs::write(&stop, "").expect("stop the reader");
    let seen = reader.await.expect("reader");
    assert!(late.lock().expect("lock").served > 0, "icerelay loaded the late table while it was late");
    assert_eq!(
        seen["violations"],
        json!([]),
        "a reader of the replica saw one table changed without the other: {seen}"
    );
    assert_eq!(
        transactions_metric(&relay.admin_url, "atomic").await,
        6,
        "three transactions of two tables, each whole"
    );
    for table in &tables {
        let source =
            Replica::Rustberg(primary).catalog().load_table(&ident(table)).await.expect("load").expect("source");
        let copy = replica.catalog().load_table(&ident(table)).await.expect("load").expect("replica");
        assert_eq!(history(&copy.metadata), history(&source.metadata), "{table}: same snapshots");
    }
}
