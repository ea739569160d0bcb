//! The shared state store: PostgreSQL, for several icerelay instances.
//!
//! Every instance connects to the same database (through a small connection
//! pool) and keeps its tables in one Postgres schema (`icerelay` unless
//! configured). The invariants of the embedded store ([`super`]) hold across
//! processes, plus three that only sharing needs:
//!
//! - **Hints are consumed by id, not by cursor.** Ids come from a sequence
//!   but commit out of order across sessions, so a fan-out deletes exactly the
//!   hints it read; a hint committed late is read by the next fan-out.
//! - **A lane run holds a lease** (owner, expiry by the database's clock,
//!   a generation drawn from one sequence by every claim and every rename,
//!   so a generation names exactly one claim). Its writes about its lane go through
//!   [`StateStore::fenced`]: each checks, in its transaction, that the lane's
//!   generation is still the run's, so an instance that lost its lease (a
//!   long pause, a partition) records nothing more for it.
//! - **Periodic passes are leased too** (`passes`): one instance runs each
//!   reconcile, whatever the number of instances.
//!
//! Schema migrations run at start under an advisory lock, so instances
//! starting together migrate once; the version is in `schema_version`.

use std::collections::BTreeSet;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::encoding::{self, hint_kind, ns_text, to_json};
use super::{
    Adoption, CopiedFile, FailbackChoice, Fence, HintId, LaneChange, LaneError, LaneKey, LaneRecord, Millis, Progress,
    Promotion, PromotionMode, RecordedHint, RecordedTransaction, SourceSeen, StateError, StateStore, now_ms,
};
use crate::catalog::TableIdent;
use crate::proxy::commit_tap::CommitHint;

/// The newest schema this build writes.
pub const SCHEMA_VERSION: i32 = 3;

/// Version 1: the embedded store's tables (as of its version 4), with lane
/// leases and leased passes.
const SCHEMA_1: &str = "
CREATE TABLE hints (
    id BIGSERIAL PRIMARY KEY,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    prefix TEXT,
    kind TEXT NOT NULL,
    from_namespace TEXT,
    from_name TEXT,
    metadata_location TEXT,
    recorded_at BIGINT NOT NULL
);
CREATE TABLE lanes (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    destination TEXT NOT NULL,
    replica_namespace TEXT NOT NULL,
    replica_name TEXT NOT NULL,
    wanted BIGINT NOT NULL DEFAULT 1,
    done BIGINT NOT NULL DEFAULT 0,
    pending_since BIGINT,
    paused BOOLEAN NOT NULL DEFAULT FALSE,
    source_dropped BOOLEAN NOT NULL DEFAULT FALSE,
    source_metadata_location TEXT,
    replica_metadata_location TEXT,
    snapshots_behind BIGINT,
    last_success_at BIGINT,
    mode TEXT,
    error_message TEXT,
    error_at BIGINT,
    error_attempts BIGINT NOT NULL DEFAULT 0,
    error_parked BOOLEAN NOT NULL DEFAULT FALSE,
    renamed_from_namespace TEXT,
    renamed_from_name TEXT,
    managed_properties TEXT,
    managed_refs TEXT,
    source_uuid TEXT,
    promote_requested TEXT,
    promote_deadline BIGINT,
    promote_claimed BOOLEAN NOT NULL DEFAULT FALSE,
    promoted_at BIGINT,
    recovery_point BIGINT,
    recovery_point_at BIGINT,
    missed_snapshots BIGINT,
    source_answered BOOLEAN,
    promoted_metadata_location TEXT,
    failback_choice TEXT,
    adoption TEXT,
    log_drift TEXT,
    lease_owner TEXT,
    lease_expires_at BIGINT,
    lease_generation BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (namespace, name, destination)
);
CREATE TABLE replicated_snapshots (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    destination TEXT NOT NULL,
    snapshot_id BIGINT NOT NULL,
    PRIMARY KEY (namespace, name, destination, snapshot_id)
);
CREATE TABLE copied_files (
    destination TEXT NOT NULL,
    source TEXT NOT NULL,
    target TEXT NOT NULL,
    size BIGINT NOT NULL,
    checksum TEXT,
    copied_at BIGINT NOT NULL,
    PRIMARY KEY (destination, source)
);
CREATE TABLE destinations (
    name TEXT PRIMARY KEY,
    uri TEXT NOT NULL,
    capabilities TEXT NOT NULL,
    probed_at BIGINT NOT NULL
);
CREATE TABLE passes (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    due_at BIGINT NOT NULL
);
CREATE SEQUENCE lease_generations;
";

/// From version 1: the entity tag of the source as reconcile last loaded it,
/// and an index of the lanes with work (every instance's scheduler asks).
const MIGRATE_TO_2: &str = "
ALTER TABLE lanes ADD COLUMN source_etag TEXT;
ALTER TABLE lanes ADD COLUMN source_etag_location TEXT;
CREATE INDEX lanes_with_work ON lanes (pending_since) WHERE wanted > done OR promote_requested IS NOT NULL;
";

/// From version 2: multi-table transactions of the primary (which snapshots
/// of which tables replicas commit together), and what a lane waits for.
const MIGRATE_TO_3: &str = "
ALTER TABLE lanes ADD COLUMN waiting_for TEXT;
CREATE TABLE transactions (
    id BIGSERIAL PRIMARY KEY,
    members TEXT NOT NULL,
    recorded_at BIGINT NOT NULL
);
CREATE TABLE transaction_snapshots (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    snapshot_id BIGINT NOT NULL,
    transaction_id BIGINT NOT NULL REFERENCES transactions (id) ON DELETE CASCADE,
    PRIMARY KEY (namespace, name, snapshot_id)
);
CREATE INDEX transactions_by_age ON transactions (recorded_at);
CREATE INDEX transaction_snapshots_by_transaction ON transaction_snapshots (transaction_id);
";

/// Migrations, oldest first: entry `i` takes the schema from version `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[SCHEMA_1, MIGRATE_TO_2, MIGRATE_TO_3];

/// The database's clock in milliseconds: leases expire by one clock, whatever
/// the instances' clocks say.
const DB_NOW: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";

/// [`LaneRecord::has_work`] in SQL.
const WITH_WORK: &str = "promoted_at IS NULL AND (promote_requested IS NOT NULL OR (NOT paused AND wanted > done))";

/// The lane a statement is about: `$1` namespace, `$2` name, `$3` destination.
const LANE_WHERE: &str = "namespace = $1 AND name = $2 AND destination = $3";

/// How to reach the shared store.
#[derive(Debug, Clone)]
pub struct PostgresSettings {
    /// The connection URL (`postgres://user:password@host:port/database?sslmode=...`).
    pub url: crate::config::Secret,
    /// The Postgres schema icerelay's tables live in.
    pub schema: String,
    /// Extra CA certificates for TLS to the server.
    pub ca_file: Option<std::path::PathBuf>,
    /// Connections in the pool.
    pub max_connections: usize,
    /// How long a call waits for a connection (an unreachable server fails this fast).
    pub connect_timeout: Duration,
}

/// PostgreSQL-backed [`StateStore`].
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    /// For the one connection outside the pool that listens for changes.
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    /// The `NOTIFY` channel of this store's changes: the schema's name.
    channel: String,
    /// Where the store is, for messages: host, port, database and schema, never credentials.
    target: String,
    /// Set on the view a lane run writes through.
    fence: Option<Fence>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").field("target", &self.target).finish_non_exhaustive()
    }
}

/// Checks a configured schema name: it is spliced into SQL, so only plain lower-case names.
pub fn valid_schema_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
}

/// Where a connection URL points, without its credentials.
pub fn describe_url(url: &str) -> Result<String, String> {
    let config = tokio_postgres::Config::from_str(url).map_err(|e| e.to_string())?;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    // An unencoded `@` in the password moves part of it into the host.
    if hosts.iter().any(|h| h.contains('@')) {
        return Err("the host part holds an '@': percent-encode '@' in the user name and password as %40".to_owned());
    }
    let port = config.get_ports().first().copied().unwrap_or(5432);
    Ok(format!("postgres://{}:{port}/{}", hosts.join(","), config.get_dbname().unwrap_or("")))
}

impl PostgresStore {
    /// Connects, and creates or migrates the schema (once, under an advisory
    /// lock, however many instances start together).
    pub async fn open(settings: &PostgresSettings) -> Result<Self, StateError> {
        let mut config = tokio_postgres::Config::from_str(settings.url.expose())
            .map_err(|e| StateError::Config { detail: format!("state.url is not a PostgreSQL connection URL: {e}") })?;
        let target = format!(
            "{} (schema {})",
            describe_url(settings.url.expose()).map_err(|detail| StateError::Config { detail })?,
            settings.schema
        );
        if !valid_schema_name(&settings.schema) {
            return Err(StateError::Config {
                detail: format!("state.schema {:?} must be a lower-case Postgres name", settings.schema),
            });
        }
        // Every session finds icerelay's tables first. A session stuck inside
        // a transaction (its process paused, cut off) is ended by the server,
        // so the lane row it locked does not block the instance taking over,
        // and a claim waits for a lock no longer than a call waits to connect.
        let session = format!(
            "-c search_path={} -c idle_in_transaction_session_timeout=5s -c lock_timeout={}ms",
            settings.schema,
            settings.connect_timeout.as_millis()
        );
        let options = match config.get_options() {
            Some(given) => format!("{given} {session}"),
            None => session,
        };
        config.options(options);
        config.application_name("icerelay");
        config.connect_timeout(settings.connect_timeout);
        // A connection whose server vanished (no reset, a partition) is found
        // out in about 25 s (10 s idle, then 3 probes 5 s apart), not after
        // the kernel's defaults (over ten minutes).
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3);
        let tls = crate::tls::client_config(settings.ca_file.as_deref())
            .map_err(|e| StateError::Config { detail: format!("state.ca_file: {e}") })?;
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls);
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.max_connections)
            .wait_timeout(Some(settings.connect_timeout))
            .create_timeout(Some(settings.connect_timeout))
            .recycle_timeout(Some(settings.connect_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StateError::Config { detail: format!("state: cannot build the connection pool: {e}") })?;
        let store = Self { pool, config, tls, channel: settings.schema.clone(), target, fence: None };
        store.migrate(&settings.schema).await?;
        Ok(store)
    }

    /// Listens on the store's channel until the connection fails: `hints`
    /// is notified when hints were recorded, `lanes` when lanes got work.
    async fn listen(&self, hints: &tokio::sync::Notify, lanes: &tokio::sync::Notify) -> Result<(), StateError> {
        use futures::StreamExt;
        let db = self.db();
        let (client, mut connection) = self.config.connect(self.tls.clone()).await.map_err(&db)?;
        let (tx, mut notified) = tokio::sync::mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                        if tx.send(n.payload() == "hints").is_err() {
                            return Ok(());
                        }
                    }
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        });
        client.batch_execute(&format!("LISTEN {}", self.channel)).await.map_err(&db)?;
        while let Some(hints_recorded) = notified.recv().await {
            if hints_recorded { hints.notify_one() } else { lanes.notify_one() }
        }
        drop(client);
        match driver.await {
            Ok(result) => result.map_err(&db),
            Err(e) => Err(StateError::Unavailable { target: self.target.clone(), detail: e.to_string() }),
        }
    }

    fn db(&self) -> impl Fn(tokio_postgres::Error) -> StateError + '_ {
        |e| StateError::Postgres { target: self.target.clone(), detail: crate::causes::chain(&e) }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StateError> {
        self.pool
            .get()
            .await
            .map_err(|e| StateError::Unavailable { target: self.target.clone(), detail: crate::causes::chain(&e) })
    }

    async fn migrate(&self, schema: &str) -> Result<(), StateError> {
        let mut client = self.client().await?;
        let db = self.db();
        // The lock is the session's: it is released below, or when the connection closes.
        let lock_key = format!("icerelay schema {schema}");
        // Another instance may be migrating: wait for it however long it takes.
        client.batch_execute("SET lock_timeout = 0").await.map_err(&db)?;
        client.execute("SELECT pg_advisory_lock(hashtext($1))", &[&lock_key]).await.map_err(&db)?;
        client.batch_execute("RESET lock_timeout").await.map_err(&db)?;
        let result = async {
            // Looked up first: `IF NOT EXISTS` would log a notice at every start.
            let exists = client
                .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&schema])
                .await
                .map_err(&db)?
                .is_some();
            if !exists {
                client.batch_execute(&format!("CREATE SCHEMA {schema}")).await.map_err(&db)?;
            }
            let versioned = client
                .query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[])
                .await
                .map_err(&db)?
                .try_get::<_, bool>(0)
                .map_err(&db)?;
            if !versioned {
                client.batch_execute("CREATE TABLE schema_version (version INTEGER NOT NULL)").await.map_err(&db)?;
            }
            let found: i32 = client
                .query_opt("SELECT version FROM schema_version", &[])
                .await
                .map_err(&db)?
                .map(|row| row.try_get(0))
                .transpose()
                .map_err(&db)?
                .unwrap_or(0);
            if found > SCHEMA_VERSION {
                return Err(StateError::NewerSchema {
                    path: self.target.clone(),
                    found: i64::from(found),
                    supported: i64::from(SCHEMA_VERSION),
                });
            }
            if found < SCHEMA_VERSION {
                let tx = client.transaction().await.map_err(&db)?;
                for step in MIGRATIONS.iter().skip(usize::try_from(found).unwrap_or(0)) {
                    tx.batch_execute(step).await.map_err(&db)?;
                }
                tx.execute("DELETE FROM schema_version", &[]).await.map_err(&db)?;
                tx.execute("INSERT INTO schema_version (version) VALUES ($1)", &[&SCHEMA_VERSION])
                    .await
                    .map_err(&db)?;
                tx.commit().await.map_err(&db)?;
                tracing::info!(store = %self.target, from = found, to = SCHEMA_VERSION, "migrated the state store");
            }
            Ok(())
        }
        .await;
        let unlocked = client.execute("SELECT pg_advisory_unlock(hashtext($1))", &[&lock_key]).await;
        result?;
        unlocked.map_err(&db)?;
        Ok(())
    }

    /// Begins a transaction; on a fenced view, only while the fence's lane
    /// still has the fence's generation (the row stays locked until commit,
    /// so no claim can slip in between the check and the writes). Only a
    /// claim changes the generation: a run may still record its end after
    /// giving its lease up, as long as nobody claimed the lane since.
    async fn begin<'c>(
        &self,
        client: &'c mut deadpool_postgres::Object,
    ) -> Result<deadpool_postgres::Transaction<'c>, StateError> {
        let tx = client.transaction().await.map_err(self.db())?;
        self.check_fence(&tx).await?;
        Ok(tx)
    }

    /// [`Self::begin`] for a transaction that changes several lanes: it
    /// waits for the others like it first (before any row lock, so the wait
    /// cannot close a cycle).
    async fn begin_serialized<'c>(
        &self,
        client: &'c mut deadpool_postgres::Object,
    ) -> Result<deadpool_postgres::Transaction<'c>, StateError> {
        let tx = client.transaction().await.map_err(self.db())?;
        self.serialize_lane_changes(&tx).await?;
        self.check_fence(&tx).await?;
        Ok(tx)
    }

    async fn check_fence(&self, tx: &deadpool_postgres::Transaction<'_>) -> Result<(), StateError> {
        let db = self.db();
        if let Some(fence) = &self.fence {
            let key = &fence.key;
            let check = tx
                .prepare_cached(&format!("SELECT 1 FROM lanes WHERE {LANE_WHERE} AND lease_generation = $4 FOR UPDATE"))
                .await
                .map_err(&db)?;
            let held = tx
                .query_opt(
                    &check,
                    &[&ns_text(&key.table.namespace), &key.table.name, &key.destination, &fence.generation],
                )
                .await
                .map_err(&db)?;
            if held.is_none() {
                return Err(StateError::Fenced { lane: key.to_string(), generation: fence.generation });
            }
        }
        Ok(())
    }

    /// One statement about one lane, in a (fenced) transaction; the lane's
    /// key is `$1..$3`, `more` follow. Returns the rows changed.
    async fn lane_update(&self, key: &LaneKey, set: &str, more: &[&(dyn ToSql + Sync)]) -> Result<u64, StateError> {
        let sql = format!("UPDATE lanes SET {set} WHERE {LANE_WHERE}");
        self.lane_statement(key, &sql, more).await
    }

    async fn lane_statement(&self, key: &LaneKey, sql: &str, more: &[&(dyn ToSql + Sync)]) -> Result<u64, StateError> {
        let ns = ns_text(&key.table.namespace);
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&ns, &key.table.name, &key.destination];
        params.extend_from_slice(more);
        let mut client = self.client().await?;
        let tx = self.begin(&mut client).await?;
        let statement = tx.prepare_cached(sql).await.map_err(self.db())?;
        let n = tx.execute(&statement, &params).await.map_err(self.db())?;
        tx.commit().await.map_err(self.db())?;
        Ok(n)
    }

    /// Applies lane changes and deletes the hints they came from, inside
    /// `tx`; tells the other instances' schedulers when lanes got work.
    async fn apply_in(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        changes: &[LaneChange],
        consumed: &[HintId],
    ) -> Result<(), StateError> {
        let db = self.db();
        for change in changes {
            apply_change(tx, change).await.map_err(&db)?;
        }
        if !consumed.is_empty() {
            tx.execute("DELETE FROM hints WHERE id = ANY($1)", &[&consumed]).await.map_err(&db)?;
        }
        if changes.iter().any(|c| !matches!(c, LaneChange::Seen { .. })) {
            tx.execute("SELECT pg_notify($1, 'lanes')", &[&self.channel]).await.map_err(&db)?;
        }
        Ok(())
    }

    /// Makes transactions that change several lanes (fan-out, reconcile)
    /// wait for each other: they cannot deadlock over lane rows, and hints are
    /// applied in order. They are short, and only database work.
    async fn serialize_lane_changes(&self, tx: &deadpool_postgres::Transaction<'_>) -> Result<(), StateError> {
        let key = format!("icerelay lane changes {}", self.channel);
        tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&key]).await.map_err(self.db())?;
        Ok(())
    }

    /// One statement outside a transaction. Statements are prepared once per
    /// pooled connection: the same few run thousands of times.
    async fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, StateError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await.map_err(self.db())?;
        match client.query(&statement, params).await {
            // A newer instance migrated the tables (a rolling upgrade): the
            // statements prepared before no longer fit; prepare them again.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED) => {
                client.statement_cache.clear();
                let statement = client.prepare_cached(sql).await.map_err(self.db())?;
                client.query(&statement, params).await.map_err(self.db())
            }
            answer => answer.map_err(self.db()),
        }
    }
}

// === reading rows ===

fn corrupt(target: &str, detail: impl std::fmt::Display) -> StateError {
    StateError::Corrupt { path: target.to_owned(), detail: detail.to_string() }
}

fn ns(target: &str, text: &str) -> Result<crate::catalog::Namespace, StateError> {
    encoding::ns_parse(text).map_err(|e| corrupt(target, format!("namespace {text:?}: {e}")))
}

fn json<T: serde::de::DeserializeOwned>(target: &str, row: &Row, column: &str) -> Result<Option<T>, StateError> {
    match get::<Option<String>>(target, row, column)? {
        Some(text) => serde_json::from_str(&text).map(Some).map_err(|e| corrupt(target, format!("{column}: {e}"))),
        None => Ok(None),
    }
}

fn get<'a, T: tokio_postgres::types::FromSql<'a>>(target: &str, row: &'a Row, column: &str) -> Result<T, StateError> {
    row.try_get(column).map_err(|e| corrupt(target, format!("{column}: {e}")))
}

fn read_hint(target: &str, row: &Row) -> Result<RecordedHint, StateError> {
    let table = TableIdent::new(ns(target, get(target, row, "namespace")?)?, get::<String>(target, row, "name")?);
    let from_namespace: Option<String> = get(target, row, "from_namespace")?;
    let kind =
        encoding::hint_kind_parse(get(target, row, "kind")?, from_namespace.as_deref(), get(target, row, "from_name")?)
            .map_err(|e| corrupt(target, format!("hint: {e}")))?;
    Ok(RecordedHint {
        id: get(target, row, "id")?,
        hint: CommitHint {
            kind,
            table,
            prefix: get(target, row, "prefix")?,
            metadata_location: get(target, row, "metadata_location")?,
        },
        recorded_at: get(target, row, "recorded_at")?,
    })
}

fn read_lane(t: &str, row: &Row) -> Result<LaneRecord, StateError> {
    let table = TableIdent::new(ns(t, get(t, row, "namespace")?)?, get::<String>(t, row, "name")?);
    let replica_table =
        TableIdent::new(ns(t, get(t, row, "replica_namespace")?)?, get::<String>(t, row, "replica_name")?);
    let renamed_from = match (
        get::<Option<String>>(t, row, "renamed_from_namespace")?,
        get::<Option<String>>(t, row, "renamed_from_name")?,
    ) {
        (Some(namespace), Some(name)) => Some(TableIdent::new(ns(t, &namespace)?, name)),
        _ => None,
    };
    let promoted = match get::<Option<i64>>(t, row, "promoted_at")? {
        Some(at) => Some(Promotion {
            at,
            recovery_point: get(t, row, "recovery_point")?,
            recovery_point_at: get(t, row, "recovery_point_at")?,
            missed_snapshots: get(t, row, "missed_snapshots")?,
            source_answered: get::<Option<bool>>(t, row, "source_answered")?.unwrap_or(false),
            metadata_location: get(t, row, "promoted_metadata_location")?,
        }),
        None => None,
    };
    let last_error = match get::<Option<String>>(t, row, "error_message")? {
        Some(message) => Some(LaneError {
            message,
            at: get::<Option<i64>>(t, row, "error_at")?.unwrap_or(0),
            attempts: get(t, row, "error_attempts")?,
            parked: get(t, row, "error_parked")?,
        }),
        None => None,
    };
    Ok(LaneRecord {
        key: LaneKey::new(table, get::<String>(t, row, "destination")?),
        replica_table,
        wanted: get(t, row, "wanted")?,
        done: get(t, row, "done")?,
        pending_since: get(t, row, "pending_since")?,
        paused: get(t, row, "paused")?,
        source_dropped: get(t, row, "source_dropped")?,
        source_metadata_location: get(t, row, "source_metadata_location")?,
        replica_metadata_location: get(t, row, "replica_metadata_location")?,
        snapshots_behind: get(t, row, "snapshots_behind")?,
        last_success_at: get(t, row, "last_success_at")?,
        mode: get(t, row, "mode")?,
        last_error,
        replica_renamed_from: renamed_from,
        managed_properties: json(t, row, "managed_properties")?,
        managed_refs: json(t, row, "managed_refs")?,
        source_uuid: get(t, row, "source_uuid")?,
        promotion: get::<Option<String>>(t, row, "promote_requested")?.as_deref().and_then(PromotionMode::parse),
        promotion_deadline: get(t, row, "promote_deadline")?,
        promotion_claimed: get(t, row, "promote_claimed")?,
        promoted,
        failback: json::<FailbackChoice>(t, row, "failback_choice")?,
        adoption: json::<Adoption>(t, row, "adoption")?,
        log_drift: json(t, row, "log_drift")?,
        source_seen: get::<Option<String>>(t, row, "source_etag")?
            .map(|etag| -> Result<SourceSeen, StateError> {
                Ok(SourceSeen { etag, metadata_location: get(t, row, "source_etag_location")? })
            })
            .transpose()?,
        waiting_for: get(t, row, "waiting_for")?,
    })
}

// === writing lane changes ===

async fn touch(
    tx: &deadpool_postgres::Transaction<'_>,
    key: &LaneKey,
    replica: &TableIdent,
    at: i64,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "INSERT INTO lanes (namespace, name, destination, replica_namespace, replica_name, wanted, done, pending_since)
         VALUES ($1, $2, $3, $4, $5, 1, 0, $6)
         ON CONFLICT (namespace, name, destination) DO UPDATE SET
             wanted = lanes.wanted + 1,
             pending_since = COALESCE(lanes.pending_since, excluded.pending_since),
             source_dropped = FALSE",
        &[
            &ns_text(&key.table.namespace),
            &key.table.name,
            &key.destination,
            &ns_text(&replica.namespace),
            &replica.name,
            &at,
        ],
    )
    .await?;
    Ok(())
}

async fn apply_change(
    tx: &deadpool_postgres::Transaction<'_>,
    change: &LaneChange,
) -> Result<(), tokio_postgres::Error> {
    match change {
        LaneChange::Touch { key, replica_table, at } => touch(tx, key, replica_table, *at).await,
        LaneChange::Rename { from, to, replica_to, at } => {
            let to_key = LaneKey::new(to.clone(), from.destination.clone());
            let (from_ns, to_ns) = (ns_text(&from.table.namespace), ns_text(&to.namespace));
            let replica_ns = ns_text(&replica_to.namespace);
            let exists = tx
                .query_opt(
                    &format!("SELECT 1 FROM lanes WHERE {LANE_WHERE} FOR UPDATE"),
                    &[&from_ns, &from.table.name, &from.destination],
                )
                .await?
                .is_some();
            if !exists {
                return touch(tx, &to_key, replica_to, *at).await;
            }
            // As in the embedded store: a lane under the new name gives way to
            // the renamed table's lane, which keeps its history and renames
            // its replica on its next run. A run under the old name stops at
            // its next fenced write or lease check (its row moved); the lease
            // does not move with the row, so the next run need not wait for it.
            for table in ["lanes", "replicated_snapshots"] {
                tx.execute(&format!("DELETE FROM {table} WHERE {LANE_WHERE}"), &[&to_ns, &to.name, &from.destination])
                    .await?;
            }
            for table in ["lanes", "replicated_snapshots"] {
                tx.execute(
                    &format!("UPDATE {table} SET namespace = $4, name = $5 WHERE {LANE_WHERE}"),
                    &[&from_ns, &from.table.name, &from.destination, &to_ns, &to.name],
                )
                .await?;
            }
            tx.execute(
                &format!(
                    "UPDATE lanes SET renamed_from_namespace = COALESCE(renamed_from_namespace, replica_namespace),
                     renamed_from_name = COALESCE(renamed_from_name, replica_name)
                     WHERE {LANE_WHERE} AND (replica_namespace != $4 OR replica_name != $5)"
                ),
                &[&to_ns, &to.name, &from.destination, &replica_ns, &replica_to.name],
            )
            .await?;
            tx.execute(
                &format!(
                    "UPDATE lanes SET replica_namespace = $4, replica_name = $5, wanted = wanted + 1,
                     pending_since = COALESCE(pending_since, $6), lease_owner = NULL, lease_expires_at = NULL,
                     lease_generation = nextval('lease_generations')
                     WHERE {LANE_WHERE}"
                ),
                &[&to_ns, &to.name, &from.destination, &replica_ns, &replica_to.name, at],
            )
            .await?;
            Ok(())
        }
        LaneChange::Seen { key, seen } => {
            tx.execute(
                &format!("UPDATE lanes SET source_etag = $4, source_etag_location = $5 WHERE {LANE_WHERE}"),
                &[
                    &ns_text(&key.table.namespace),
                    &key.table.name,
                    &key.destination,
                    &seen.etag,
                    &seen.metadata_location,
                ],
            )
            .await?;
            Ok(())
        }
        LaneChange::SourceDropped { key, generation } => {
            tx.execute(
                &format!(
                    "UPDATE lanes SET source_dropped = TRUE, done = GREATEST(done, $4), waiting_for = NULL,
                     pending_since = CASE WHEN wanted <= GREATEST(done, $4) THEN NULL ELSE pending_since END
                     WHERE {LANE_WHERE}"
                ),
                &[&ns_text(&key.table.namespace), &key.table.name, &key.destination, generation],
            )
            .await?;
            Ok(())
        }
    }
}

#[async_trait]
impl StateStore for PostgresStore {
    async fn append_hints(&self, hints: Vec<CommitHint>) -> Result<(), StateError> {
        let mut client = self.client().await?;
        let db = self.db();
        let tx = client.transaction().await.map_err(&db)?;
        let at = now_ms();
        let insert = tx
            .prepare_cached(
                "INSERT INTO hints (namespace, name, prefix, kind, from_namespace, from_name, metadata_location, recorded_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .await
            .map_err(&db)?;
        for h in &hints {
            let (from_ns, from_name) = encoding::hint_from(h);
            tx.execute(
                &insert,
                &[
                    &ns_text(&h.table.namespace),
                    &h.table.name,
                    &h.prefix,
                    &hint_kind(&h.kind),
                    &from_ns,
                    &from_name,
                    &h.metadata_location,
                    &at,
                ],
            )
            .await
            .map_err(&db)?;
        }
        // Delivered at commit: every instance's fan-out wakes at once.
        tx.execute("SELECT pg_notify($1, 'hints')", &[&self.channel]).await.map_err(&db)?;
        tx.commit().await.map_err(&db)
    }

    async fn pending_hints(&self, limit: usize) -> Result<Vec<RecordedHint>, StateError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.query("SELECT * FROM hints ORDER BY id LIMIT $1", &[&limit]).await?;
        rows.iter().map(|row| read_hint(&self.target, row)).collect()
    }

    async fn apply_lane_changes(&self, changes: Vec<LaneChange>, consumed: Vec<HintId>) -> Result<(), StateError> {
        let mut client = self.client().await?;
        let db = self.db();
        let tx = self.begin_serialized(&mut client).await?;
        self.apply_in(&tx, &changes, &consumed).await?;
        tx.commit().await.map_err(&db)
    }

    async fn lanes(&self) -> Result<Vec<LaneRecord>, StateError> {
        let rows = self.query("SELECT * FROM lanes ORDER BY namespace, name, destination", &[]).await?;
        rows.iter().map(|row| read_lane(&self.target, row)).collect()
    }

    async fn lanes_with_work(&self) -> Result<Vec<LaneRecord>, StateError> {
        let rows = self
            .query(
                &format!(
                    "SELECT * FROM lanes WHERE {WITH_WORK}
                     AND (lease_owner IS NULL OR lease_expires_at < {DB_NOW}) ORDER BY pending_since"
                ),
                &[],
            )
            .await?;
        rows.iter().map(|row| read_lane(&self.target, row)).collect()
    }

    async fn fan_out(
        &self,
        limit: usize,
        route: &(dyn for<'h> Fn(&'h [RecordedHint]) -> Vec<LaneChange> + Send + Sync),
    ) -> Result<usize, StateError> {
        let mut client = self.client().await?;
        let db = self.db();
        // One fan-out at a time, in hint order: a rename applied before an
        // earlier commit's touch of the old name would bring the old lane back.
        let tx = self.begin_serialized(&mut client).await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = tx.query("SELECT * FROM hints ORDER BY id LIMIT $1", &[&limit]).await.map_err(&db)?;
        let hints = rows.iter().map(|row| read_hint(&self.target, row)).collect::<Result<Vec<_>, _>>()?;
        if hints.is_empty() {
            return Ok(0);
        }
        let consumed: Vec<i64> = hints.iter().map(|h| h.id).collect();
        self.apply_in(&tx, &route(&hints), &consumed).await?;
        tx.commit().await.map_err(&db)?;
        Ok(hints.len())
    }

    async fn lane(&self, key: &LaneKey) -> Result<Option<LaneRecord>, StateError> {
        let rows = self
            .query(
                &format!("SELECT * FROM lanes WHERE {LANE_WHERE}"),
                &[&ns_text(&key.table.namespace), &key.table.name, &key.destination],
            )
            .await?;
        rows.first().map(|row| read_lane(&self.target, row)).transpose()
    }

    async fn replicated_snapshots(&self, key: &LaneKey) -> Result<BTreeSet<i64>, StateError> {
        let rows = self
            .query(
                &format!("SELECT snapshot_id FROM replicated_snapshots WHERE {LANE_WHERE}"),
                &[&ns_text(&key.table.namespace), &key.table.name, &key.destination],
            )
            .await?;
        rows.iter().map(|row| get::<i64>(&self.target, row, "snapshot_id")).collect()
    }

    async fn record_progress(&self, p: Progress) -> Result<(), StateError> {
        let mut client = self.client().await?;
        let db = self.db();
        let tx = self.begin(&mut client).await?;
        let key = &p.key;
        let ns = ns_text(&key.table.namespace);
        let update = tx
            .prepare_cached(&format!(
                "UPDATE lanes SET source_metadata_location = $4, replica_metadata_location = $5,
                 snapshots_behind = $6, mode = COALESCE($7, mode),
                 managed_properties = COALESCE($8, managed_properties),
                 managed_refs = COALESCE($9, managed_refs), source_uuid = COALESCE($10, source_uuid),
                 log_drift = COALESCE($11, log_drift)
                 WHERE {LANE_WHERE}"
            ))
            .await
            .map_err(&db)?;
        tx.execute(
            &update,
            &[
                &ns,
                &key.table.name,
                &key.destination,
                &p.source_metadata_location,
                &p.replica_metadata_location,
                &p.snapshots_behind,
                &p.mode,
                &to_json(p.managed_properties.as_ref()),
                &to_json(p.managed_refs.as_ref()),
                &p.source_uuid,
                &to_json(p.log_drift.as_ref()),
            ],
        )
        .await
        .map_err(&db)?;
        if !p.added_snapshots.is_empty() {
            let insert = tx
                .prepare_cached(
                    "INSERT INTO replicated_snapshots (namespace, name, destination, snapshot_id)
                     SELECT $1, $2, $3, UNNEST($4::BIGINT[]) ON CONFLICT DO NOTHING",
                )
                .await
                .map_err(&db)?;
            tx.execute(&insert, &[&ns, &key.table.name, &key.destination, &p.added_snapshots]).await.map_err(&db)?;
        }
        tx.commit().await.map_err(&db)
    }

    async fn record_snapshots_behind(&self, key: &LaneKey, snapshots_behind: i64) -> Result<(), StateError> {
        self.lane_update(key, "snapshots_behind = $4", &[&snapshots_behind]).await.map(drop)
    }

    async fn record_success(&self, key: &LaneKey, generation: i64) -> Result<(), StateError> {
        self.lane_update(
            key,
            "done = GREATEST(done, $4), last_success_at = $5,
             pending_since = CASE WHEN wanted <= GREATEST(done, $4) THEN NULL ELSE pending_since END,
             error_message = NULL, error_at = NULL, error_attempts = 0, error_parked = FALSE, waiting_for = NULL",
            &[&generation, &now_ms()],
        )
        .await
        .map(drop)
    }

    async fn record_waiting(&self, key: &LaneKey, generation: i64, reason: String) -> Result<(), StateError> {
        self.lane_update(
            key,
            "done = GREATEST(done, $4), waiting_for = $5,
             error_message = NULL, error_at = NULL, error_attempts = 0, error_parked = FALSE",
            &[&generation, &reason],
        )
        .await
        .map(drop)
    }

    async fn record_failure(&self, key: &LaneKey, message: String, parked: bool) -> Result<(), StateError> {
        self.lane_update(
            key,
            "error_message = $4, error_at = $5, error_attempts = error_attempts + 1, error_parked = $6, waiting_for = NULL",
            &[&message, &now_ms(), &parked],
        )
        .await
        .map(drop)
    }

    async fn set_paused(&self, key: &LaneKey, paused: bool) -> Result<bool, StateError> {
        let sql = format!("UPDATE lanes SET paused = $4 WHERE {LANE_WHERE} AND promoted_at IS NULL");
        Ok(self.lane_statement(key, &sql, &[&paused]).await? > 0)
    }

    async fn request_resync(&self, key: &LaneKey) -> Result<bool, StateError> {
        let sql = format!(
            "UPDATE lanes SET wanted = wanted + 1, pending_since = COALESCE(pending_since, $4), error_attempts = 0,
             error_parked = FALSE, source_metadata_location = NULL, log_drift = NULL
             WHERE {LANE_WHERE} AND promoted_at IS NULL"
        );
        Ok(self.lane_statement(key, &sql, &[&now_ms()]).await? > 0)
    }

    async fn request_promotion(
        &self,
        key: &LaneKey,
        mode: PromotionMode,
        deadline: Millis,
    ) -> Result<bool, StateError> {
        let n = self
            .lane_update(
                key,
                "promote_requested = CASE WHEN promoted_at IS NULL THEN $4::TEXT ELSE NULL END,
                 promote_deadline = CASE WHEN promoted_at IS NULL THEN $6::BIGINT ELSE NULL END,
                 wanted = CASE WHEN promoted_at IS NULL THEN wanted + 1 ELSE wanted END,
                 pending_since = CASE WHEN promoted_at IS NULL THEN COALESCE(pending_since, $5) ELSE pending_since END,
                 error_attempts = 0, error_parked = FALSE",
                &[&mode.as_str(), &now_ms(), &deadline],
            )
            .await?;
        Ok(n > 0)
    }

    async fn claim_promotion(&self, key: &LaneKey) -> Result<bool, StateError> {
        let sql = format!(
            "UPDATE lanes SET promote_claimed = TRUE WHERE {LANE_WHERE} AND promote_requested IS NOT NULL
             AND promoted_at IS NULL AND (promote_claimed OR COALESCE(promote_deadline, $4) >= $4)"
        );
        Ok(self.lane_statement(key, &sql, &[&now_ms()]).await? > 0)
    }

    async fn withdraw_promotion(&self, key: &LaneKey) -> Result<bool, StateError> {
        let sql = format!(
            "UPDATE lanes SET promote_requested = NULL, promote_deadline = NULL, wanted = wanted + 1,
             pending_since = COALESCE(pending_since, $4)
             WHERE {LANE_WHERE} AND promoted_at IS NULL AND promote_requested IS NOT NULL AND NOT promote_claimed"
        );
        Ok(self.lane_statement(key, &sql, &[&now_ms()]).await? > 0)
    }

    async fn record_promotion(&self, key: &LaneKey, p: Promotion) -> Result<bool, StateError> {
        let sql = format!(
            "UPDATE lanes SET promote_requested = NULL, promote_deadline = NULL, promote_claimed = FALSE, waiting_for = NULL,
             promoted_at = $4, recovery_point = $5, recovery_point_at = $6, missed_snapshots = $7,
             source_answered = $8, promoted_metadata_location = $9,
             replica_metadata_location = COALESCE($9, replica_metadata_location),
             done = wanted, pending_since = NULL,
             error_message = NULL, error_at = NULL, error_attempts = 0, error_parked = FALSE
             WHERE {LANE_WHERE} AND promote_claimed AND promoted_at IS NULL"
        );
        let n = self
            .lane_statement(
                key,
                &sql,
                &[
                    &p.at,
                    &p.recovery_point,
                    &p.recovery_point_at,
                    &p.missed_snapshots,
                    &p.source_answered,
                    &p.metadata_location,
                ],
            )
            .await?;
        Ok(n > 0)
    }

    async fn request_failback(&self, key: &LaneKey, choice: FailbackChoice) -> Result<bool, StateError> {
        let n = self
            .lane_update(
                key,
                "failback_choice = $4, wanted = wanted + 1, pending_since = COALESCE(pending_since, $5),
                 error_attempts = 0, error_parked = FALSE",
                &[&to_json(Some(&choice)), &now_ms()],
            )
            .await?;
        Ok(n > 0)
    }

    async fn record_adoption(&self, key: &LaneKey, adoption: Adoption) -> Result<(), StateError> {
        self.lane_update(key, "adoption = $4, failback_choice = NULL", &[&to_json(Some(&adoption))]).await.map(drop)
    }

    async fn finish_rename(&self, key: &LaneKey) -> Result<(), StateError> {
        self.lane_update(key, "renamed_from_namespace = NULL, renamed_from_name = NULL", &[]).await.map(drop)
    }

    async fn forget_replica(&self, key: &LaneKey) -> Result<(), StateError> {
        let mut client = self.client().await?;
        let db = self.db();
        let tx = self.begin(&mut client).await?;
        let ns = ns_text(&key.table.namespace);
        let args: [&(dyn ToSql + Sync); 3] = [&ns, &key.table.name, &key.destination];
        tx.execute(&format!("DELETE FROM replicated_snapshots WHERE {LANE_WHERE}"), &args).await.map_err(&db)?;
        tx.execute(
            &format!(
                "UPDATE lanes SET replica_metadata_location = NULL, managed_properties = NULL, mode = NULL,
                 managed_refs = NULL, source_uuid = NULL, adoption = NULL, log_drift = NULL WHERE {LANE_WHERE}"
            ),
            &args,
        )
        .await
        .map_err(&db)?;
        tx.commit().await.map_err(&db)
    }

    async fn destination_capabilities(&self, name: &str, uri: &str) -> Result<Option<String>, StateError> {
        let rows =
            self.query("SELECT capabilities FROM destinations WHERE name = $1 AND uri = $2", &[&name, &uri]).await?;
        rows.first().map(|row| get(&self.target, row, "capabilities")).transpose()
    }

    async fn record_destination_capabilities(
        &self,
        name: &str,
        uri: &str,
        capabilities: String,
    ) -> Result<(), StateError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO destinations (name, uri, capabilities, probed_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (name) DO UPDATE SET uri = excluded.uri, capabilities = excluded.capabilities,
                     probed_at = excluded.probed_at",
                &[&name, &uri, &capabilities, &now_ms()],
            )
            .await
            .map_err(self.db())
            .map(drop)
    }

    async fn copied_file(&self, destination: &str, source: &str) -> Result<Option<CopiedFile>, StateError> {
        let rows = self
            .query(
                "SELECT target, size, checksum FROM copied_files WHERE destination = $1 AND source = $2",
                &[&destination, &source],
            )
            .await?;
        rows.first()
            .map(|row| {
                Ok(CopiedFile {
                    target: get(&self.target, row, "target")?,
                    size: get::<i64>(&self.target, row, "size")?.try_into().unwrap_or(0),
                    checksum: get(&self.target, row, "checksum")?,
                })
            })
            .transpose()
    }

    async fn record_copied_file(&self, destination: &str, source: &str, file: CopiedFile) -> Result<(), StateError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO copied_files (destination, source, target, size, checksum, copied_at)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (destination, source) DO UPDATE SET
                     target = excluded.target, size = excluded.size, checksum = excluded.checksum,
                     copied_at = excluded.copied_at",
                &[
                    &destination,
                    &source,
                    &file.target,
                    &i64::try_from(file.size).unwrap_or(i64::MAX),
                    &file.checksum,
                    &now_ms(),
                ],
            )
            .await
            .map_err(self.db())
            .map(drop)
    }

    async fn prune_copied_files(&self, before: Millis) -> Result<u64, StateError> {
        let client = self.client().await?;
        client.execute("DELETE FROM copied_files WHERE copied_at < $1", &[&before]).await.map_err(self.db())
    }

    async fn record_transaction(&self, transaction: crate::proxy::commit_tap::Transaction) -> Result<i64, StateError> {
        let mut client = self.client().await?;
        let db = self.db();
        let tx = client.transaction().await.map_err(&db)?;
        let members = serde_json::to_string(&transaction.members).unwrap_or_default();
        let row = tx
            .query_one(
                "INSERT INTO transactions (members, recorded_at) VALUES ($1, $2) RETURNING id",
                &[&members, &now_ms()],
            )
            .await
            .map_err(&db)?;
        let id: i64 = row.try_get(0).map_err(&db)?;
        for member in &transaction.members {
            tx.execute(
                "INSERT INTO transaction_snapshots (namespace, name, snapshot_id, transaction_id)
                 SELECT $1, $2, snapshot, $4 FROM UNNEST($3::BIGINT[]) AS snapshot
                 ON CONFLICT DO NOTHING",
                &[&ns_text(&member.table.namespace), &member.table.name, &member.snapshots, &id],
            )
            .await
            .map_err(&db)?;
        }
        tx.commit().await.map_err(&db)?;
        Ok(id)
    }

    async fn forget_transaction(&self, id: i64) -> Result<(), StateError> {
        // Its snapshots go with it (ON DELETE CASCADE).
        let client = self.client().await?;
        client.execute("DELETE FROM transactions WHERE id = $1", &[&id]).await.map_err(self.db())?;
        Ok(())
    }

    async fn transaction_of(
        &self,
        table: &TableIdent,
        snapshots: &[i64],
    ) -> Result<Option<RecordedTransaction>, StateError> {
        let rows = self
            .query(
                "SELECT t.id, t.members, t.recorded_at FROM transaction_snapshots s
                 JOIN transactions t ON t.id = s.transaction_id
                 WHERE s.namespace = $1 AND s.name = $2 AND s.snapshot_id = ANY($3)
                 ORDER BY t.id LIMIT 1",
                &[&ns_text(&table.namespace), &table.name, &snapshots],
            )
            .await?;
        let Some(row) = rows.first() else { return Ok(None) };
        let t = &self.target;
        let members: String = get(t, row, "members")?;
        let members = serde_json::from_str(&members).map_err(|e| corrupt(t, format!("a recorded transaction: {e}")))?;
        Ok(Some(RecordedTransaction { id: get(t, row, "id")?, recorded_at: get(t, row, "recorded_at")?, members }))
    }

    async fn prune_transactions(&self, before: Millis) -> Result<u64, StateError> {
        let client = self.client().await?;
        client.execute("DELETE FROM transactions WHERE recorded_at < $1", &[&before]).await.map_err(self.db())
    }

    fn shares_lanes(&self) -> bool {
        true
    }

    async fn acquire_lease(&self, key: &LaneKey, owner: &str, ttl: Duration) -> Result<Option<Fence>, StateError> {
        let ttl = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let rows = self
            .query(
                &format!(
                    "UPDATE lanes SET lease_owner = $4, lease_generation = nextval('lease_generations'),
                     lease_expires_at = {DB_NOW} + $5
                     WHERE {LANE_WHERE} AND (lease_owner IS NULL OR lease_owner = $4 OR lease_expires_at < {DB_NOW})
                     RETURNING lease_generation"
                ),
                &[&ns_text(&key.table.namespace), &key.table.name, &key.destination, &owner, &ttl],
            )
            .await?;
        rows.first()
            .map(|row| {
                Ok(Fence {
                    key: key.clone(),
                    owner: owner.to_owned(),
                    generation: get(&self.target, row, "lease_generation")?,
                })
            })
            .transpose()
    }

    async fn renew_lease(&self, fence: &Fence, ttl: Duration) -> Result<bool, StateError> {
        let ttl = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let key = &fence.key;
        let rows = self
            .query(
                &format!(
                    "UPDATE lanes SET lease_expires_at = {DB_NOW} + $6
                     WHERE {LANE_WHERE} AND lease_owner = $4 AND lease_generation = $5 RETURNING 1"
                ),
                &[
                    &ns_text(&key.table.namespace),
                    &key.table.name,
                    &key.destination,
                    &fence.owner,
                    &fence.generation,
                    &ttl,
                ],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    async fn release_lease(&self, fence: &Fence) -> Result<(), StateError> {
        let key = &fence.key;
        // Other instances' schedulers look at once if the lane still has work
        // (a run stopped by a shutdown), not at their next poll.
        self.query(
            &format!(
                "WITH released AS (
                     UPDATE lanes SET lease_owner = NULL, lease_expires_at = NULL
                     WHERE {LANE_WHERE} AND lease_owner = $4 AND lease_generation = $5
                     RETURNING wanted > done AS has_work)
                 SELECT pg_notify($6, 'lanes') FROM released WHERE has_work"
            ),
            &[
                &ns_text(&key.table.namespace),
                &key.table.name,
                &key.destination,
                &fence.owner,
                &fence.generation,
                &self.channel,
            ],
        )
        .await
        .map(drop)
    }

    fn fenced(&self, fence: Fence) -> Option<std::sync::Arc<dyn StateStore>> {
        Some(std::sync::Arc::new(Self { fence: Some(fence), ..self.clone() }))
    }

    async fn claim_pass(&self, name: &str, owner: &str, every: Duration) -> Result<bool, StateError> {
        let every = i64::try_from(every.as_millis()).unwrap_or(i64::MAX);
        let rows = self
            .query(
                &format!(
                    "INSERT INTO passes (name, owner, due_at) VALUES ($1, $2, {DB_NOW} + $3)
                     ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, due_at = excluded.due_at
                     WHERE passes.due_at <= {DB_NOW}
                     RETURNING 1"
                ),
                &[&name, &owner, &every],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    async fn watch_changes(
        &self,
        hints: std::sync::Arc<tokio::sync::Notify>,
        lanes: std::sync::Arc<tokio::sync::Notify>,
    ) {
        let mut wait = Duration::from_secs(1);
        loop {
            let started = std::time::Instant::now();
            match self.listen(&hints, &lanes).await {
                Err(e) if wait == Duration::from_secs(1) => {
                    tracing::warn!(store = %self.target, error = %e, "lost the state store's change notifications; instances poll until they are back");
                }
                Err(e) => tracing::debug!(store = %self.target, error = %e, "still no change notifications"),
                Ok(()) => {}
            }
            // A connection that lasted is a new outage, not the same one.
            if started.elapsed() > Duration::from_secs(60) {
                wait = Duration::from_secs(1);
            }
            // Whatever happened while not listening is found by a look now.
            hints.notify_one();
            lanes.notify_one();
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(30));
        }
    }

    async fn ping(&self) -> Result<(), StateError> {
        self.query("SELECT 1", &[]).await.map(drop)
    }

    fn describe(&self) -> String {
        self.target.clone()
    }
}
