//! Spark as the writer: Spark 3.5 with Iceberg 1.10's REST catalog commits
//! through icerelay what PyIceberg and DuckDB never write (merge-on-read
//! deletes from `DELETE`/`UPDATE`/`MERGE INTO`, partition evolution with
//! `bucket`, tags and branches by SQL, `rewrite_data_files`,
//! `rewrite_manifests`, `expire_snapshots`, deletion vectors), with its
//! stock Hadoop file IO (local files recorded as `file:/path`), to a rustberg
//! primary; Spark then reads the replica straight from the replica catalog
//! at every snapshot.

use serde_json::{Value, json};

use crate::harness::java_rest::JavaRest;
use crate::harness::{Rustberg, python, spark_classpath};
use crate::java_catalog::from_java;
use crate::replication::{Replica, from_rustberg_to, history, ident, refs, rustberg_catalog, wait_replicated};

async fn spark(conn: &Value, table: &str, statements: &[&str]) -> Value {
    python("spark_sql.py", vec![conn.to_string(), spark_classpath(), table.to_owned(), json!(statements).to_string()])
        .await
}

/// Runs `statements` through icerelay on a new rustberg primary, waits for
/// the replica, then runs `maintenance` (expiry deletes the files of the
/// snapshots it removes: a replica that is still copying them would find
/// them gone) and waits again; compares what Spark reads on both sides,
/// including the snapshots the source expired and the replica kept.
async fn spark_writes_and_the_replica_reads_the_same(
    primary: SparkPrimary,
    replica: Replica,
    prefix: &str,
    statements: &[&str],
    maintenance: &[&str],
) {
    let (uri, warehouse, ns, _state, relay) = match primary {
        SparkPrimary::Rustberg => {
            let (p, _, ns, _, state, relay) = from_rustberg_to(replica, prefix, "reconcile_interval = \"2s\"").await;
            (p.uri.clone(), p.warehouse.clone(), ns, state, relay)
        }
        SparkPrimary::Java => {
            let (p, ns, state, relay) = from_java(prefix, replica).await;
            (p.uri.clone(), p.warehouse.clone(), ns, state, relay)
        }
    };
    let table = format!("{ns}.t");
    let through = json!({"uri": relay.url, "warehouse": warehouse});
    let mut all = vec!["CREATE NAMESPACE IF NOT EXISTS cat.`{ns}`"];
    all.extend_from_slice(statements);
    let all: Vec<String> = all.iter().map(|s| s.replace("{ns}", &ns)).collect();
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let mut written = vec![spark(&through, &table, &all).await];
    let source_catalog = rustberg_catalog(&uri, &warehouse);
    let replicated = || async {
        let source = source_catalog.load_table(&ident(&table)).await.expect("load").expect("source");
        let status =
            wait_replicated(&relay.admin_url, &table, &source.metadata_location.clone().expect("location")).await;
        assert_eq!(status["snapshots_behind"], 0, "{status}");
        source
    };
    replicated().await;
    if !maintenance.is_empty() {
        written.push(spark(&through, &table, maintenance).await);
    }
    let source = replicated().await;
    let copy = replica.catalog().load_table(&ident(&table)).await.expect("load").expect("replica");

    // The source's history, snapshot by snapshot (expiry on the source is not replayed).
    let (s, r) = (history(&source.metadata), history(&copy.metadata));
    for (id, snapshot) in &s {
        assert_eq!(r.get(id), Some(snapshot), "snapshot {id} differs on the replica");
    }
    assert_eq!(refs(&copy.metadata), refs(&source.metadata), "same branches and tags");
    assert_eq!(copy.metadata["format-version"], source.metadata["format-version"]);
    let text = copy.metadata.to_string();
    assert!(!text.contains(warehouse.trim_start_matches("file://")), "a path into the primary: {text}");

    // Spark reads the replica straight from the replica catalog: the same
    // rows at every snapshot Spark wrote, expired on the source or not.
    let read = spark(&replica.conn(), &table, &[]).await;
    let seen = read["rows"].as_object().expect("rows");
    for batch in &written {
        let wrote = batch["rows"].as_object().expect("rows");
        assert!(!wrote.is_empty());
        for (id, rows) in wrote {
            assert_eq!(seen.get(id), Some(rows), "Spark reads snapshot {id} differently on the replica");
        }
    }
    let last = written.last().expect("written");
    assert_eq!(read["current"], last["current"]);
    assert_eq!(read["refs"], last["refs"]);
}

/// The catalog Spark commits to, through icerelay.
#[derive(Clone, Copy)]
enum SparkPrimary {
    Rustberg,
    Java,
}

/// What Spark writes in [`spark_merge_on_read_evolution_maintenance_and_refs_replicate`].
const MERGE_ON_READ_AND_MAINTENANCE: &[&str] = &[
    "CREATE TABLE {t} (id BIGINT, category STRING, value DOUBLE) USING iceberg PARTITIONED BY (category)
             TBLPROPERTIES ('format-version' = '2', 'write.delete.mode' = 'merge-on-read',
                            'write.update.mode' = 'merge-on-read', 'write.merge.mode' = 'merge-on-read')",
    "INSERT INTO {t} VALUES (1, 'a', 1.0), (2, 'b', 2.0), (3, 'a', 3.0), (4, 'c', 4.0)",
    "INSERT INTO {t} VALUES (5, 'b', 5.0), (6, 'c', 6.0)",
    "DELETE FROM {t} WHERE id = 2",
    "UPDATE {t} SET value = value * 10 WHERE category = 'a'",
    "MERGE INTO {t} USING (SELECT 6 AS id, 'c' AS category, 60.0 AS value UNION ALL SELECT 7, 'a', 7.0) s
             ON {t}.id = s.id WHEN MATCHED THEN UPDATE SET value = s.value WHEN NOT MATCHED THEN INSERT *",
    "ALTER TABLE {t} ADD PARTITION FIELD bucket(4, id)",
    "INSERT INTO {t} VALUES (8, 'b', 8.0), (9, 'c', 9.0)",
    "ALTER TABLE {t} CREATE TAG v1",
    "ALTER TABLE {t} CREATE BRANCH audit",
    "CALL {cat}.system.rewrite_data_files(table => '{name}', options => map('min-input-files', '1'))",
    "CALL {cat}.system.rewrite_manifests('{name}')",
];
/// Spark's maintenance after it, in a second session.
const INSERT_AND_EXPIRE: &[&str] = &[
    "INSERT INTO {t} VALUES (10, 'a', 10.0)",
    "CALL {cat}.system.expire_snapshots(table => '{name}', older_than => TIMESTAMP '2100-01-01 00:00:00', retain_last => 4)",
];
/// What Spark writes in [`spark_v3_deletion_vectors_replicate`].
const DELETION_VECTORS: &[&str] = &[
    "CREATE TABLE {t} (id BIGINT, note STRING) USING iceberg
     TBLPROPERTIES ('format-version' = '3', 'write.delete.mode' = 'merge-on-read',
                    'write.update.mode' = 'merge-on-read')",
    "INSERT INTO {t} SELECT id, CONCAT('n', id) FROM range(0, 40)",
    "DELETE FROM {t} WHERE id % 7 = 0",
    "UPDATE {t} SET note = 'changed' WHERE id % 5 = 1",
    "DELETE FROM {t} WHERE id > 35",
];

#[tokio::test(flavor = "multi_thread")]
async fn spark_merge_on_read_evolution_maintenance_and_refs_replicate() {
    let replica = Replica::Rustberg(Rustberg::shared());
    spark_writes_and_the_replica_reads_the_same(
        SparkPrimary::Rustberg,
        replica,
        "spark",
        MERGE_ON_READ_AND_MAINTENANCE,
        INSERT_AND_EXPIRE,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn spark_v3_deletion_vectors_replicate() {
    spark_writes_and_the_replica_reads_the_same(
        SparkPrimary::Rustberg,
        Replica::Rustberg(Rustberg::shared()),
        "sparkv3",
        DELETION_VECTORS,
        &[],
    )
    .await;
}

/// Both into Iceberg's Java catalog, whose validation every replica commit
/// (replace snapshots, v3 row lineage, deletion vectors) must pass.
#[tokio::test(flavor = "multi_thread")]
async fn spark_writes_replicate_into_the_java_catalog() {
    let (primary, replica) = (SparkPrimary::Rustberg, Replica::Java(JavaRest::shared()));
    spark_writes_and_the_replica_reads_the_same(
        primary,
        replica,
        "sparkjava",
        MERGE_ON_READ_AND_MAINTENANCE,
        INSERT_AND_EXPIRE,
    )
    .await;
    spark_writes_and_the_replica_reads_the_same(primary, replica, "sparkjv3", DELETION_VECTORS, &[]).await;
}

/// Spark committing to the Java catalog (through icerelay), replicated to rustberg.
#[tokio::test(flavor = "multi_thread")]
async fn spark_writes_to_the_java_catalog_replicate_to_rustberg() {
    let (primary, replica) = (SparkPrimary::Java, Replica::Rustberg(Rustberg::shared()));
    spark_writes_and_the_replica_reads_the_same(
        primary,
        replica,
        "sparkfromjava",
        MERGE_ON_READ_AND_MAINTENANCE,
        INSERT_AND_EXPIRE,
    )
    .await;
}
