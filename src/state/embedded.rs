//! The embedded state store: one SQLite database in the state directory.
//!
//! SQLite runs on a thread of its own; every operation is a closure sent to
//! it, answered through a oneshot channel. Async tasks (proxy workers
//! recording hints, lanes recording progress) therefore never block on disk,
//! and writes are naturally serialised. The database uses WAL journaling with
//! `synchronous = NORMAL`: a committed transaction survives the process being
//! killed (the case icerelay is built for: SIGKILL, OOM, a crash), and costs no
//! fsync; only an operating-system crash can lose the last transactions, which
//! the periodic reconcile repairs like any lost hint.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::mpsc;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Row, Transaction, params};
use tokio::sync::oneshot;

use super::encoding::{self, hint_kind, ns_text, to_json};
use super::{
    Adoption, CopiedFile, FailbackChoice, HintId, LaneChange, LaneError, LaneKey, LaneRecord, Millis, Progress,
    Promotion, PromotionMode, RecordedHint, RecordedTransaction, SourceSeen, StateError, StateStore, now_ms,
};
use crate::catalog::{Namespace, TableIdent};
use crate::proxy::commit_tap::CommitHint;

/// The database file inside the state directory.
pub const DATABASE_FILE: &str = "icerelay.db";
/// The lock file that keeps a second process off the state directory; it holds the owner's pid.
pub const LOCK_FILE: &str = "icerelay.lock";
/// How long opening waits for a store this same process dropped to let go.
#[cfg(not(test))]
const OWN_RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
#[cfg(test)]
const OWN_RELEASE_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// The newest schema this build writes: one per entry of [`MIGRATIONS`].
const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

const SCHEMA: &str = "
CREATE TABLE hints (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    prefix TEXT,
    kind TEXT NOT NULL,
    from_namespace TEXT,
    from_name TEXT,
    metadata_location TEXT,
    recorded_at INTEGER NOT NULL
);
CREATE TABLE cursor (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE lanes (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    destination TEXT NOT NULL,
    replica_namespace TEXT NOT NULL,
    replica_name TEXT NOT NULL,
    wanted INTEGER NOT NULL DEFAULT 1,
    done INTEGER NOT NULL DEFAULT 0,
    pending_since INTEGER,
    paused INTEGER NOT NULL DEFAULT 0,
    source_dropped INTEGER NOT NULL DEFAULT 0,
    source_metadata_location TEXT,
    replica_metadata_location TEXT,
    snapshots_behind INTEGER,
    last_success_at INTEGER,
    mode TEXT,
    error_message TEXT,
    error_at INTEGER,
    error_attempts INTEGER NOT NULL DEFAULT 0,
    error_parked INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (namespace, name, destination)
);
CREATE TABLE replicated_snapshots (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    destination TEXT NOT NULL,
    snapshot_id INTEGER NOT NULL,
    PRIMARY KEY (namespace, name, destination, snapshot_id)
);
CREATE TABLE copied_files (
    destination TEXT NOT NULL,
    source TEXT NOT NULL,
    target TEXT NOT NULL,
    size INTEGER NOT NULL,
    checksum TEXT,
    copied_at INTEGER NOT NULL,
    PRIMARY KEY (destination, source)
);
";

/// From version 1: pending replica renames, the properties a lane manages,
/// and the probed capabilities of each destination.
const MIGRATE_TO_2: &str = "
ALTER TABLE lanes ADD COLUMN renamed_from_namespace TEXT;
ALTER TABLE lanes ADD COLUMN renamed_from_name TEXT;
ALTER TABLE lanes ADD COLUMN managed_properties TEXT;
CREATE TABLE destinations (
    name TEXT PRIMARY KEY,
    uri TEXT NOT NULL,
    capabilities TEXT NOT NULL,
    probed_at INTEGER NOT NULL
);
";

/// From version 2: the refs a lane set on its replica, and its source's uuid.
const MIGRATE_TO_3: &str = "
ALTER TABLE lanes ADD COLUMN managed_refs TEXT;
ALTER TABLE lanes ADD COLUMN source_uuid TEXT;
";

/// From version 3: promotion (failover) requests and what a promotion
/// recorded; failback choices and adopted replica tables.
const MIGRATE_TO_4: &str = "
ALTER TABLE lanes ADD COLUMN promote_requested TEXT;
ALTER TABLE lanes ADD COLUMN promote_deadline INTEGER;
ALTER TABLE lanes ADD COLUMN promote_claimed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE lanes ADD COLUMN promoted_at INTEGER;
ALTER TABLE lanes ADD COLUMN recovery_point INTEGER;
ALTER TABLE lanes ADD COLUMN recovery_point_at INTEGER;
ALTER TABLE lanes ADD COLUMN missed_snapshots INTEGER;
ALTER TABLE lanes ADD COLUMN source_answered INTEGER;
ALTER TABLE lanes ADD COLUMN promoted_metadata_location TEXT;
ALTER TABLE lanes ADD COLUMN failback_choice TEXT;
ALTER TABLE lanes ADD COLUMN adoption TEXT;
ALTER TABLE lanes ADD COLUMN log_drift TEXT;
";

/// From version 4: the entity tag of the source as reconcile last loaded it,
/// and an index of the lanes with work (the scheduler's question).
const MIGRATE_TO_5: &str = "
ALTER TABLE lanes ADD COLUMN source_etag TEXT;
ALTER TABLE lanes ADD COLUMN source_etag_location TEXT;
CREATE INDEX lanes_with_work ON lanes (pending_since) WHERE wanted > done OR promote_requested IS NOT NULL;
";

/// From version 5: multi-table transactions of the primary (which snapshots
/// of which tables replicas commit together), and what a lane waits for.
const MIGRATE_TO_6: &str = "
ALTER TABLE lanes ADD COLUMN waiting_for TEXT;
CREATE TABLE transactions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    members TEXT NOT NULL,
    recorded_at INTEGER NOT NULL
);
CREATE TABLE transaction_snapshots (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    snapshot_id INTEGER NOT NULL,
    transaction_id INTEGER NOT NULL,
    PRIMARY KEY (namespace, name, snapshot_id)
);
CREATE INDEX transactions_by_age ON transactions (recorded_at);
CREATE INDEX transaction_snapshots_by_transaction ON transaction_snapshots (transaction_id);
";

/// Migrations, oldest first: entry `i` takes the database from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[SCHEMA, MIGRATE_TO_2, MIGRATE_TO_3, MIGRATE_TO_4, MIGRATE_TO_5, MIGRATE_TO_6];

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// SQLite-backed [`StateStore`].
#[derive(Debug, Clone)]
pub struct EmbeddedStore {
    jobs: mpsc::Sender<Job>,
    path: String,
}

impl EmbeddedStore {
    /// Opens (creating if needed) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        std::fs::create_dir_all(dir)
            .map_err(|source| StateError::Directory { path: dir.display().to_string(), source })?;
        let lock = lock_directory(dir)?;
        let file = dir.join(DATABASE_FILE);
        let path = file.display().to_string();
        let db = |source| StateError::Database { path: path.clone(), source };
        let mut connection = Connection::open(&file).map_err(db)?;
        connection
            .execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")
            .map_err(db)?;
        migrate(&mut connection, &path)?;

        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("icerelay-state".into())
            .spawn(move || {
                // Runs until every sender (every clone of the store) is gone;
                // the directory stays locked until the last job is done.
                let _lock = lock;
                while let Ok(job) = queue.recv() {
                    job(&mut connection);
                }
            })
            .map_err(|source| StateError::Directory { path: path.clone(), source })?;
        Ok(Self { jobs, path })
    }

    /// Runs `f` on the database thread.
    async fn call<T, F>(&self, f: F) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, &str) -> rusqlite::Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let path = self.path.clone();
        let job: Job = Box::new(move |connection| {
            let result = f(connection, &path).map_err(|source| StateError::Database { path, source });
            let _ = tx.send(result);
        });
        self.jobs.send(job).map_err(|_| StateError::Closed)?;
        rx.await.map_err(|_| StateError::Closed)?
    }
}

/// Takes the state directory's lock (an advisory `flock`, released by the
/// kernel when the process dies, however it dies) and writes our pid in it.
fn lock_directory(dir: &Path) -> Result<std::fs::File, StateError> {
    use std::io::{Read, Seek, Write};
    let path = dir.join(LOCK_FILE);
    let directory = |source| StateError::Directory { path: path.display().to_string(), source };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(directory)?;
    // A store this process dropped a moment ago lets go once its thread has
    // finished its last job: wait for that, but never for another process.
    let give_up = std::time::Instant::now() + OWN_RELEASE_WAIT;
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                file.rewind().map_err(directory)?;
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim().to_owned();
                if holder == std::process::id().to_string() && std::time::Instant::now() < give_up {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                }
                return Err(StateError::Locked {
                    path: dir.display().to_string(),
                    holder: if holder.is_empty() { "unknown".to_owned() } else { holder },
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(directory(e)),
        }
    }
    file.set_len(0).map_err(directory)?;
    file.rewind().map_err(directory)?;
    write!(file, "{}", std::process::id()).map_err(directory)?;
    Ok(file)
}

fn migrate(connection: &mut Connection, path: &str) -> Result<(), StateError> {
    let db = |source| StateError::Database { path: path.to_owned(), source };
    let version: i64 = connection.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(db)?;
    if version > SCHEMA_VERSION {
        return Err(StateError::NewerSchema { path: path.to_owned(), found: version, supported: SCHEMA_VERSION });
    }
    apply_migrations(connection, version).map_err(db)
}

fn apply_migrations(connection: &mut Connection, version: i64) -> rusqlite::Result<()> {
    migrate_between(connection, version, SCHEMA_VERSION)
}

/// Applies the migrations from version `from` to version `to`, in one transaction.
fn migrate_between(connection: &mut Connection, from: i64, to: i64) -> rusqlite::Result<()> {
    if from < to {
        let tx = connection.transaction()?;
        let steps = usize::try_from(from).unwrap_or(0)..usize::try_from(to).unwrap_or(0);
        for step in &MIGRATIONS[steps] {
            tx.execute_batch(step)?;
        }
        tx.execute_batch(&format!("PRAGMA user_version = {to}"))?;
        tx.commit()?;
    }
    Ok(())
}

// === encoding ===

fn ns_parse(text: &str) -> rusqlite::Result<Namespace> {
    encoding::ns_parse(text).map_err(conversion)
}

fn conversion(e: serde_json::Error) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
}

fn read_hint(row: &Row<'_>) -> rusqlite::Result<RecordedHint> {
    let table = TableIdent::new(ns_parse(&row.get::<_, String>("namespace")?)?, row.get::<_, String>("name")?);
    let from_namespace: Option<String> = row.get("from_namespace")?;
    let kind =
        encoding::hint_kind_parse(&row.get::<_, String>("kind")?, from_namespace.as_deref(), row.get("from_name")?)
            .map_err(conversion)?;
    Ok(RecordedHint {
        id: row.get("id")?,
        hint: CommitHint { kind, table, prefix: row.get("prefix")?, metadata_location: row.get("metadata_location")? },
        recorded_at: row.get("recorded_at")?,
    })
}

fn read_lane(row: &Row<'_>) -> rusqlite::Result<LaneRecord> {
    let table = TableIdent::new(ns_parse(&row.get::<_, String>("namespace")?)?, row.get::<_, String>("name")?);
    let replica_table =
        TableIdent::new(ns_parse(&row.get::<_, String>("replica_namespace")?)?, row.get::<_, String>("replica_name")?);
    let error_message: Option<String> = row.get("error_message")?;
    let renamed_from = match (
        row.get::<_, Option<String>>("renamed_from_namespace")?,
        row.get::<_, Option<String>>("renamed_from_name")?,
    ) {
        (Some(ns), Some(name)) => Some(TableIdent::new(ns_parse(&ns)?, name)),
        _ => None,
    };
    let managed_properties = json_column::<BTreeSet<String>>(row, "managed_properties")?;
    let managed_refs = json_column::<BTreeMap<String, i64>>(row, "managed_refs")?;
    let promoted = match row.get::<_, Option<i64>>("promoted_at")? {
        Some(at) => Some(Promotion {
            at,
            recovery_point: row.get("recovery_point")?,
            recovery_point_at: row.get("recovery_point_at")?,
            missed_snapshots: row.get("missed_snapshots")?,
            source_answered: row.get::<_, Option<bool>>("source_answered")?.unwrap_or(false),
            metadata_location: row.get("promoted_metadata_location")?,
        }),
        None => None,
    };
    let promotion = row.get::<_, Option<String>>("promote_requested")?.as_deref().and_then(PromotionMode::parse);
    Ok(LaneRecord {
        promotion,
        promotion_deadline: row.get("promote_deadline")?,
        promotion_claimed: row.get("promote_claimed")?,
        promoted,
        failback: json_column::<FailbackChoice>(row, "failback_choice")?,
        adoption: json_column::<Adoption>(row, "adoption")?,
        log_drift: json_column(row, "log_drift")?,
        source_seen: row
            .get::<_, Option<String>>("source_etag")?
            .map(|etag| -> rusqlite::Result<SourceSeen> {
                Ok(SourceSeen { etag, metadata_location: row.get("source_etag_location")? })
            })
            .transpose()?,
        waiting_for: row.get("waiting_for")?,
        replica_renamed_from: renamed_from,
        managed_properties,
        managed_refs,
        source_uuid: row.get("source_uuid")?,
        key: LaneKey::new(table, row.get::<_, String>("destination")?),
        replica_table,
        wanted: row.get("wanted")?,
        done: row.get("done")?,
        pending_since: row.get("pending_since")?,
        paused: row.get("paused")?,
        source_dropped: row.get("source_dropped")?,
        source_metadata_location: row.get("source_metadata_location")?,
        replica_metadata_location: row.get("replica_metadata_location")?,
        snapshots_behind: row.get("snapshots_behind")?,
        last_success_at: row.get("last_success_at")?,
        mode: row.get("mode")?,
        last_error: match error_message {
            Some(message) => Some(LaneError {
                message,
                at: row.get::<_, Option<i64>>("error_at")?.unwrap_or(0),
                attempts: row.get("error_attempts")?,
                parked: row.get("error_parked")?,
            }),
            None => None,
        },
    })
}

fn json_column<T: serde::de::DeserializeOwned>(row: &Row<'_>, column: &str) -> rusqlite::Result<Option<T>> {
    match row.get::<_, Option<String>>(column)? {
        Some(text) => serde_json::from_str(&text).map(Some).map_err(conversion),
        None => Ok(None),
    }
}

const LANE_WHERE: &str = "namespace = ?1 AND name = ?2 AND destination = ?3";

/// [`LaneRecord::has_work`] in SQL.
const WITH_WORK: &str = "promoted_at IS NULL AND (promote_requested IS NOT NULL OR (paused = 0 AND wanted > done))";

fn touch(tx: &Transaction<'_>, key: &LaneKey, replica: &TableIdent, at: i64) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO lanes (namespace, name, destination, replica_namespace, replica_name, wanted, done, pending_since)
         VALUES (?1, ?2, ?3, ?4, ?5, 1, 0, ?6)
         ON CONFLICT (namespace, name, destination) DO UPDATE SET
             wanted = wanted + 1,
             pending_since = COALESCE(pending_since, excluded.pending_since),
             source_dropped = 0",
        params![
            ns_text(&key.table.namespace),
            key.table.name,
            key.destination,
            ns_text(&replica.namespace),
            replica.name,
            at
        ],
    )?;
    Ok(())
}

fn apply_change(tx: &Transaction<'_>, change: &LaneChange) -> rusqlite::Result<()> {
    match change {
        LaneChange::Touch { key, replica_table, at } => touch(tx, key, replica_table, *at),
        LaneChange::Rename { from, to, replica_to, at } => {
            let to_key = LaneKey::new(to.clone(), from.destination.clone());
            let exists: bool = tx
                .query_row(
                    &format!("SELECT 1 FROM lanes WHERE {LANE_WHERE}"),
                    params![ns_text(&from.table.namespace), from.table.name, from.destination],
                    |_| Ok(true),
                )
                .optional()?
                .unwrap_or(false);
            if exists {
                // A lane already under the new name (a table of that name was
                // dropped, or reconcile saw the new name first) gives way: the
                // renamed table's lane, with its history, takes its place.
                for table in ["lanes", "replicated_snapshots"] {
                    tx.execute(
                        &format!("DELETE FROM {table} WHERE {LANE_WHERE}"),
                        params![ns_text(&to_key.table.namespace), to_key.table.name, to_key.destination],
                    )?;
                }
                // The replica keeps its history under the new name: move the lane
                // and what it replicated, then ask it to rename the replica.
                for table in ["lanes", "replicated_snapshots"] {
                    tx.execute(
                        &format!("UPDATE {table} SET namespace = ?4, name = ?5 WHERE {LANE_WHERE}"),
                        params![
                            ns_text(&from.table.namespace),
                            from.table.name,
                            from.destination,
                            ns_text(&to.namespace),
                            to.name
                        ],
                    )?;
                }
                // The replica is still under its old name until the lane renames
                // it; remember that name (the first one, if renames pile up).
                tx.execute(
                    &format!(
                        "UPDATE lanes SET renamed_from_namespace = COALESCE(renamed_from_namespace, replica_namespace),
                         renamed_from_name = COALESCE(renamed_from_name, replica_name)
                         WHERE {LANE_WHERE} AND (replica_namespace != ?4 OR replica_name != ?5)"
                    ),
                    params![
                        ns_text(&to_key.table.namespace),
                        to_key.table.name,
                        to_key.destination,
                        ns_text(&replica_to.namespace),
                        replica_to.name
                    ],
                )?;
                tx.execute(
                    &format!(
                        "UPDATE lanes SET replica_namespace = ?4, replica_name = ?5, wanted = wanted + 1,
                         pending_since = COALESCE(pending_since, ?6) WHERE {LANE_WHERE}"
                    ),
                    params![
                        ns_text(&to_key.table.namespace),
                        to_key.table.name,
                        to_key.destination,
                        ns_text(&replica_to.namespace),
                        replica_to.name,
                        at
                    ],
                )?;
                Ok(())
            } else {
                touch(tx, &to_key, replica_to, *at)
            }
        }
        LaneChange::Seen { key, seen } => {
            tx.execute(
                &format!("UPDATE lanes SET source_etag = ?4, source_etag_location = ?5 WHERE {LANE_WHERE}"),
                params![
                    ns_text(&key.table.namespace),
                    key.table.name,
                    key.destination,
                    seen.etag,
                    seen.metadata_location
                ],
            )?;
            Ok(())
        }
        LaneChange::SourceDropped { key, generation } => {
            tx.execute(
                &format!(
                    "UPDATE lanes SET source_dropped = 1, done = MAX(done, ?4), waiting_for = NULL,
                     pending_since = CASE WHEN wanted <= MAX(done, ?4) THEN NULL ELSE pending_since END
                     WHERE {LANE_WHERE}"
                ),
                params![ns_text(&key.table.namespace), key.table.name, key.destination, generation],
            )?;
            Ok(())
        }
    }
}

#[async_trait]
impl StateStore for EmbeddedStore {
    async fn append_hints(&self, hints: Vec<CommitHint>) -> Result<(), StateError> {
        self.call(move |c, _| {
            let tx = c.transaction()?;
            let at = now_ms();
            for h in &hints {
                let (from_ns, from_name) = encoding::hint_from(h);
                tx.execute(
                    "INSERT INTO hints (namespace, name, prefix, kind, from_namespace, from_name, metadata_location, recorded_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    params![
                        ns_text(&h.table.namespace),
                        h.table.name,
                        h.prefix,
                        hint_kind(&h.kind),
                        from_ns,
                        from_name,
                        h.metadata_location,
                        at
                    ],
                )?;
            }
            tx.commit()
        })
        .await
    }

    async fn pending_hints(&self, limit: usize) -> Result<Vec<RecordedHint>, StateError> {
        self.call(move |c, _| {
            let cursor: i64 =
                c.query_row("SELECT value FROM cursor WHERE name = 'hints'", [], |r| r.get(0)).optional()?.unwrap_or(0);
            let mut stmt = c.prepare_cached("SELECT * FROM hints WHERE id > ?1 ORDER BY id LIMIT ?2")?;
            let rows = stmt.query_map(params![cursor, i64::try_from(limit).unwrap_or(i64::MAX)], read_hint)?;
            rows.collect()
        })
        .await
    }

    async fn apply_lane_changes(&self, changes: Vec<LaneChange>, consumed: Vec<HintId>) -> Result<(), StateError> {
        // One writer thread: ids are committed in order, so the largest
        // consumed id is a cursor.
        let through = consumed.into_iter().max();
        self.call(move |c, _| {
            let tx = c.transaction()?;
            for change in &changes {
                apply_change(&tx, change)?;
            }
            if let Some(id) = through {
                tx.execute(
                    "INSERT INTO cursor (name, value) VALUES ('hints', ?1)
                     ON CONFLICT (name) DO UPDATE SET value = MAX(value, excluded.value)",
                    params![id],
                )?;
                tx.execute("DELETE FROM hints WHERE id <= ?1", params![id])?;
            }
            tx.commit()
        })
        .await
    }

    async fn lanes(&self) -> Result<Vec<LaneRecord>, StateError> {
        self.call(|c, _| {
            let mut stmt = c.prepare_cached("SELECT * FROM lanes ORDER BY namespace, name, destination")?;
            let rows = stmt.query_map([], read_lane)?;
            rows.collect()
        })
        .await
    }

    async fn lanes_with_work(&self) -> Result<Vec<LaneRecord>, StateError> {
        self.call(|c, _| {
            let mut stmt =
                c.prepare_cached(&format!("SELECT * FROM lanes WHERE {WITH_WORK} ORDER BY pending_since"))?;
            let rows = stmt.query_map([], read_lane)?;
            rows.collect()
        })
        .await
    }

    async fn lane(&self, key: &LaneKey) -> Result<Option<LaneRecord>, StateError> {
        let key = key.clone();
        self.call(move |c, _| {
            c.query_row(
                &format!("SELECT * FROM lanes WHERE {LANE_WHERE}"),
                params![ns_text(&key.table.namespace), key.table.name, key.destination],
                read_lane,
            )
            .optional()
        })
        .await
    }

    async fn replicated_snapshots(&self, key: &LaneKey) -> Result<BTreeSet<i64>, StateError> {
        let key = key.clone();
        self.call(move |c, _| {
            let mut stmt =
                c.prepare_cached(&format!("SELECT snapshot_id FROM replicated_snapshots WHERE {LANE_WHERE}"))?;
            let rows = stmt
                .query_map(params![ns_text(&key.table.namespace), key.table.name, key.destination], |r| {
                    r.get::<_, i64>(0)
                })?;
            rows.collect()
        })
        .await
    }

    async fn record_progress(&self, p: Progress) -> Result<(), StateError> {
        self.call(move |c, _| {
            let tx = c.transaction()?;
            let key = &p.key;
            let ns = ns_text(&key.table.namespace);
            tx.execute(
                &format!(
                    "UPDATE lanes SET source_metadata_location = ?4, replica_metadata_location = ?5,
                     snapshots_behind = ?6, mode = COALESCE(?7, mode),
                     managed_properties = COALESCE(?8, managed_properties),
                     managed_refs = COALESCE(?9, managed_refs), source_uuid = COALESCE(?10, source_uuid),
                     log_drift = COALESCE(?11, log_drift)
                     WHERE {LANE_WHERE}"
                ),
                params![
                    ns,
                    key.table.name,
                    key.destination,
                    p.source_metadata_location,
                    p.replica_metadata_location,
                    p.snapshots_behind,
                    p.mode,
                    to_json(p.managed_properties.as_ref()),
                    to_json(p.managed_refs.as_ref()),
                    p.source_uuid,
                    to_json(p.log_drift.as_ref())
                ],
            )?;
            for id in &p.added_snapshots {
                tx.execute(
                    "INSERT OR IGNORE INTO replicated_snapshots (namespace, name, destination, snapshot_id)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![ns, key.table.name, key.destination, id],
                )?;
            }
            tx.commit()
        })
        .await
    }

    async fn record_snapshots_behind(&self, key: &LaneKey, snapshots_behind: i64) -> Result<(), StateError> {
        let key = key.clone();
        self.call(move |c, _| {
            c.execute(
                &format!("UPDATE lanes SET snapshots_behind = ?4 WHERE {LANE_WHERE}"),
                params![ns_text(&key.table.namespace), key.table.name, key.destination, snapshots_behind],
            )
            .map(|_| ())
        })
        .await
    }

    async fn record_success(&self, key: &LaneKey, generation: i64) -> Result<(), StateError> {
        let key = key.clone();
        self.call(move |c, _| {
            c.execute(
                &format!(
                    "UPDATE lanes SET done = MAX(done, ?4), last_success_at = ?5,
                     pending_since = CASE WHEN wanted <= MAX(done, ?4) THEN NULL ELSE pending_since END,
                     error_message = NULL, error_at = NULL, error_attempts = 0, error_parked = 0, waiting_for = NULL
                     WHERE {LANE_WHERE}"
                ),
                params![ns_text(&key.table.namespace), key.table.name, key.destination, generation, now_ms()],
            )?;
            Ok(())
        })
        .await
    }

    async fn record_waiting(&self, key: &LaneKey, generation: i64, reason: String) -> Result<(), StateError> {
        let key = key.clone();
        self.call(move |c, _| {
            c.execute(
                &format!(
                    "UPDATE lanes SET done = MAX(done, ?4), waiting_for = ?5,
                     error_message = NULL, error_at = NULL, error_attempts = 0, error_parked = 0
                     WHERE {LANE_WHERE}"
                ),
                params![ns_text(&key.table.namespace), key.table.name, key.destination, generation, reason],
            )?;
            Ok(())
        })
        .await
    }

    async fn record_failure(&self, key: &LaneKey, message: String, parked: bool) -> Result<(), StateError> {
        let key = key.clone();
        self.call(move |c, _| {
            c.execute(
                &format!(
                    "UPDATE lanes SET error_message = ?4, error_at = ?5, error_attempts = error_attempts + 1,
                     error_parked = ?6, waiting_for = NULL WHERE {LANE_WHERE}"
                ),
                params![ns_text(&key.table.namespace), key.table.name, key.destination, message, now_ms(), parked],
            )?;
            Ok(())
        })
        .await
    }

    async fn set_paused(&self, key: &LaneKey, paused: bool) -> Result<bool, StateError> {
        let key = key.clone();
        self.call(move |c, _| {
            let n = c.execute(
                &format!("UPDATE lanes SET paused = ?4 WHERE {LANE_WHERE} AND promoted_at IS NULL"),
                params![ns_text(&key.table.namespace), key.table.name, key.destination, paused],
            )?;
            Ok(n > 0)
        })
        .await
    }

    async fn request_resync(&self, key: &LaneKey) -> Result<bool, StateError> {
        let key = key.clone();
        self.call(move |c, _| {
            let n = c.execute(
                &format!(
                    "UPDATE lanes SET wanted = wanted + 1, pending_since = COALESCE(pending_since, ?4),
                     error_attempts = 0, error_parked = 0, source_metadata_location = NULL, log_drift = NULL
                     WHERE {LANE_WHERE} AND promoted_at IS NULL"
                ),
                params![ns_text(&key.table.namespace), key.table.name, key.destination, now_ms()],
            )?;
            Ok(n > 0)
        })
        .await
    }

    async fn request_promotion(
        &self,
        key: &LaneKey,
        mode: PromotionMode,
        deadline: Millis,
    ) -> Result<bool, StateError> {
        let key = key.clone();
        self.call(move |c, _| {
            // Already promoted: nothing to ask, and the answer is the promotion.
            let n = c.execute(
                &format!(
                    "UPDATE lanes SET promote_requested = CASE WHEN promoted_at IS NULL THEN ?4 ELSE NULL END,
                     promote_deadline = CASE WHEN promoted_at IS NULL THEN ?6 ELSE NULL END,
                     wanted = CASE WHEN promoted_at IS NULL THEN wanted + 1 ELSE wanted END,
                     pending_since = CASE WHEN promoted_at IS NULL THEN COALESCE(pending_since, ?5) ELSE pending_since END,
                     error_attempts = 0, error_parked = 0 WHERE {LANE_WHERE}"
                ),
                params![
                    ns_text(&key.table.namespace),
                    key.table.name,
                    key.destination,
                    mode.as_str(),
                    now_ms(),
                    deadline
                ],
            )?;
            Ok(n > 0)
        })
        .await
    }

    async fn claim_promotion(&self, key: &LaneKey) -> Result<bool, StateError> {
        let key = key.clone();
        self.call(move |c, _| {
            let n = c.execute(
                &format!(
                    "UPDATE lanes SET promote_claimed = 1 WHERE {LANE_WHERE} AND promote_requested IS NOT NULL
                     AND promoted_at IS NULL AND (promote_claimed = 1 OR COALESCE(promote_deadline, ?4) >= ?4)"
                ),
                params![ns_text(&key.table.namespace), key.table.name, key.destination, now_ms()],
            )?;
            Ok(n > 0)
        })
        .await
    }

    async fn withdraw_promotion(&self, key: &LaneKey) -> Result<bool, StateError> {
        let key = key.clone();
        self.call(move |c, _| {
            let n = c.execute(
                &format!(
                    "UPDATE lanes SET promote_requested = NULL, promote_deadline = NULL, wanted = wanted + 1,
                     pending_since = COALESCE(pending_since, ?4)
                     WHERE {LANE_WHERE} AND promoted_at IS NULL AND promote_requested IS NOT NULL
                     AND promote_claimed = 0"
                ),
                params![ns_text(&key.table.namespace), key.table.name, key.destination, now_ms()],
            )?;
            Ok(n > 0)
        })
        .await
    }

    async fn record_promotion(&self, key: &LaneKey, p: Promotion) -> Result<bool, StateError> {
        let key = key.clone();
        self.call(move |c, _| {
            let n = c.execute(
                &format!(
                    "UPDATE lanes SET promote_requested = NULL, promote_deadline = NULL, promote_claimed = 0, waiting_for = NULL,
                     promoted_at = ?4, recovery_point = ?5,
                     recovery_point_at = ?6, missed_snapshots = ?7, source_answered = ?8,
                     promoted_metadata_location = ?9, replica_metadata_location = COALESCE(?9, replica_metadata_location),
                     done = wanted, pending_since = NULL,
                     error_message = NULL, error_at = NULL, error_attempts = 0, error_parked = 0
                     WHERE {LANE_WHERE} AND promote_claimed = 1 AND promoted_at IS NULL"
                ),
                params![
                    ns_text(&key.table.namespace),
                    key.table.name,
                    key.destination,
                    p.at,
                    p.recovery_point,
                    p.recovery_point_at,
                    p.missed_snapshots,
                    p.source_answered,
                    p.metadata_location
                ],
            )?;
            Ok(n > 0)
        })
        .await
    }

    async fn request_failback(&self, key: &LaneKey, choice: FailbackChoice) -> Result<bool, StateError> {
        let key = key.clone();
        self.call(move |c, _| {
            let n = c.execute(
                &format!(
                    "UPDATE lanes SET failback_choice = ?4, wanted = wanted + 1, pending_since = COALESCE(pending_since, ?5),
                     error_attempts = 0, error_parked = 0 WHERE {LANE_WHERE}"
                ),
                params![
                    ns_text(&key.table.namespace),
                    key.table.name,
                    key.destination,
                    to_json(Some(&choice)),
                    now_ms()
                ],
            )?;
            Ok(n > 0)
        })
        .await
    }

    async fn record_adoption(&self, key: &LaneKey, adoption: Adoption) -> Result<(), StateError> {
        let key = key.clone();
        self.call(move |c, _| {
            c.execute(
                &format!("UPDATE lanes SET adoption = ?4, failback_choice = NULL WHERE {LANE_WHERE}"),
                params![ns_text(&key.table.namespace), key.table.name, key.destination, to_json(Some(&adoption))],
            )?;
            Ok(())
        })
        .await
    }

    async fn finish_rename(&self, key: &LaneKey) -> Result<(), StateError> {
        let key = key.clone();
        self.call(move |c, _| {
            c.execute(
                &format!("UPDATE lanes SET renamed_from_namespace = NULL, renamed_from_name = NULL WHERE {LANE_WHERE}"),
                params![ns_text(&key.table.namespace), key.table.name, key.destination],
            )?;
            Ok(())
        })
        .await
    }

    async fn forget_replica(&self, key: &LaneKey) -> Result<(), StateError> {
        let key = key.clone();
        self.call(move |c, _| {
            let tx = c.transaction()?;
            let args = params![ns_text(&key.table.namespace), key.table.name, key.destination];
            tx.execute(&format!("DELETE FROM replicated_snapshots WHERE {LANE_WHERE}"), args)?;
            tx.execute(
                &format!(
                    "UPDATE lanes SET replica_metadata_location = NULL, managed_properties = NULL, mode = NULL,
                     managed_refs = NULL, source_uuid = NULL, adoption = NULL, log_drift = NULL WHERE {LANE_WHERE}"
                ),
                args,
            )?;
            tx.commit()
        })
        .await
    }

    async fn destination_capabilities(&self, name: &str, uri: &str) -> Result<Option<String>, StateError> {
        let (name, uri) = (name.to_owned(), uri.to_owned());
        self.call(move |c, _| {
            c.query_row("SELECT capabilities FROM destinations WHERE name = ?1 AND uri = ?2", params![name, uri], |r| {
                r.get(0)
            })
            .optional()
        })
        .await
    }

    async fn record_destination_capabilities(
        &self,
        name: &str,
        uri: &str,
        capabilities: String,
    ) -> Result<(), StateError> {
        let (name, uri) = (name.to_owned(), uri.to_owned());
        self.call(move |c, _| {
            c.execute(
                "INSERT INTO destinations (name, uri, capabilities, probed_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (name) DO UPDATE SET uri = excluded.uri, capabilities = excluded.capabilities,
                     probed_at = excluded.probed_at",
                params![name, uri, capabilities, now_ms()],
            )?;
            Ok(())
        })
        .await
    }

    async fn copied_file(&self, destination: &str, source: &str) -> Result<Option<CopiedFile>, StateError> {
        let (destination, source) = (destination.to_owned(), source.to_owned());
        self.call(move |c, _| {
            c.query_row(
                "SELECT target, size, checksum FROM copied_files WHERE destination = ?1 AND source = ?2",
                params![destination, source],
                |r| {
                    Ok(CopiedFile {
                        target: r.get(0)?,
                        size: r.get::<_, i64>(1)?.try_into().unwrap_or(0),
                        checksum: r.get(2)?,
                    })
                },
            )
            .optional()
        })
        .await
    }

    async fn record_copied_file(&self, destination: &str, source: &str, file: CopiedFile) -> Result<(), StateError> {
        let (destination, source) = (destination.to_owned(), source.to_owned());
        self.call(move |c, _| {
            c.execute(
                "INSERT INTO copied_files (destination, source, target, size, checksum, copied_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (destination, source) DO UPDATE SET
                     target = excluded.target, size = excluded.size, checksum = excluded.checksum,
                     copied_at = excluded.copied_at",
                params![
                    destination,
                    source,
                    file.target,
                    i64::try_from(file.size).unwrap_or(i64::MAX),
                    file.checksum,
                    now_ms()
                ],
            )?;
            Ok(())
        })
        .await
    }

    async fn prune_copied_files(&self, before: Millis) -> Result<u64, StateError> {
        self.call(move |c, _| {
            let n = c.execute("DELETE FROM copied_files WHERE copied_at < ?1", params![before])?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
        .await
    }

    async fn record_transaction(&self, transaction: crate::proxy::commit_tap::Transaction) -> Result<i64, StateError> {
        self.call(move |c, _| {
            let tx = c.transaction()?;
            let members = serde_json::to_string(&transaction.members).unwrap_or_default();
            tx.execute("INSERT INTO transactions (members, recorded_at) VALUES (?1, ?2)", params![members, now_ms()])?;
            let id = tx.last_insert_rowid();
            for member in &transaction.members {
                for snapshot in &member.snapshots {
                    tx.execute(
                        "INSERT OR IGNORE INTO transaction_snapshots (namespace, name, snapshot_id, transaction_id)
                         VALUES (?1, ?2, ?3, ?4)",
                        params![ns_text(&member.table.namespace), member.table.name, snapshot, id],
                    )?;
                }
            }
            tx.commit()?;
            Ok(id)
        })
        .await
    }

    async fn forget_transaction(&self, id: i64) -> Result<(), StateError> {
        self.call(move |c, _| {
            let tx = c.transaction()?;
            tx.execute("DELETE FROM transaction_snapshots WHERE transaction_id = ?1", params![id])?;
            tx.execute("DELETE FROM transactions WHERE id = ?1", params![id])?;
            tx.commit()
        })
        .await
    }

    async fn transaction_of(
        &self,
        table: &TableIdent,
        snapshots: &[i64],
    ) -> Result<Option<RecordedTransaction>, StateError> {
        let table = table.clone();
        let snapshots = snapshots.to_vec();
        self.call(move |c, _| {
            let ns = ns_text(&table.namespace);
            let mut find = c.prepare_cached(
                "SELECT t.id, t.members, t.recorded_at FROM transaction_snapshots s
                 JOIN transactions t ON t.id = s.transaction_id
                 WHERE s.namespace = ?1 AND s.name = ?2 AND s.snapshot_id = ?3",
            )?;
            // The oldest transaction any of them belongs to (as the Postgres store answers).
            let mut oldest: Option<(i64, String, i64)> = None;
            for snapshot in snapshots {
                let found = find
                    .query_row(params![ns, table.name, snapshot], |row| {
                        Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?, row.get::<_, i64>(2)?))
                    })
                    .optional()?;
                if let Some(found) = found
                    && oldest.as_ref().is_none_or(|o| found.0 < o.0)
                {
                    oldest = Some(found);
                }
            }
            let Some((id, members, recorded_at)) = oldest else { return Ok(None) };
            let members = serde_json::from_str(&members)
                .map_err(|e| rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, Box::new(e)))?;
            Ok(Some(RecordedTransaction { id, recorded_at, members }))
        })
        .await
    }

    async fn prune_transactions(&self, before: Millis) -> Result<u64, StateError> {
        self.call(move |c, _| {
            let tx = c.transaction()?;
            tx.execute(
                "DELETE FROM transaction_snapshots
                 WHERE transaction_id IN (SELECT id FROM transactions WHERE recorded_at < ?1)",
                params![before],
            )?;
            let n = tx.execute("DELETE FROM transactions WHERE recorded_at < ?1", params![before])?;
            tx.commit()?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
        .await
    }

    fn describe(&self) -> String {
        self.path.clone()
    }
}

#[cfg(test)]
mod tests;
