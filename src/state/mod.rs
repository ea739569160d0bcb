//! Durable replication state: the change log, lanes, and copy checkpoints.
//!
//! Everything replication knows lives here, so that killing icerelay at any
//! moment loses nothing: a restart reads the same state and carries on.
//! The store is a trait ([`StateStore`]) with two implementations: the
//! embedded one ([`embedded::EmbeddedStore`], SQLite, one instance) and the
//! shared one ([`postgres::PostgresStore`], several instances, lanes shared
//! by leases).
//!
//! # Invariants
//!
//! - **Hint ids are monotonic.** A hint is appended once, after the primary
//!   answered 2xx, and gets the next id. Hints are read in id order.
//! - **A hint is deleted only once its fan-out is recorded.** Fanning hints
//!   out to lanes and moving the cursor past them is one transaction; a crash
//!   before it re-reads the same hints, and a second fan-out only asks the
//!   same lanes for work again, which is harmless.
//! - **A lane's work is counted, not listed.** Each hint or reconcile pass
//!   bumps the lane's `wanted` generation; a run that started at generation
//!   `g` and converged sets `done = g`. A lane has work while `wanted > done`,
//!   so a hint that arrives during a run is never lost.
//! - **Progress advances only after the replica commit is confirmed**, one
//!   commit at a time, and records the snapshot ids it added.
//! - **Copy checkpoints are idempotent**: recording the same copied file twice
//!   keeps one record; a checkpoint is written only after the copy was verified.
//! - **A multi-table transaction is recorded before its hints**, so no lane
//!   can run from those hints without knowing which tables to wait for.

pub mod embedded;
mod encoding;
pub mod postgres;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use crate::catalog::TableIdent;
use crate::proxy::commit_tap::{CommitHint, Transaction, TransactionMember};

/// The id of a recorded hint.
pub type HintId = i64;

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// The current time in milliseconds since the Unix epoch.
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A time as RFC 3339 text, to the millisecond (`2026-12-01T19:31:44.979Z`).
pub fn rfc3339(at: Millis) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(at).unwrap_or(0));
    humantime::format_rfc3339_millis(at).to_string()
}

/// A multi-table transaction as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedTransaction {
    /// Its id.
    pub id: i64,
    /// When it was recorded.
    pub recorded_at: Millis,
    /// The tables it added snapshots to, and which.
    pub members: Vec<TransactionMember>,
}

/// A hint as stored in the change log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedHint {
    /// Its id.
    pub id: HintId,
    /// The hint.
    pub hint: CommitHint,
    /// When it was recorded.
    pub recorded_at: Millis,
}

/// One ordered lane: a source table replicated to one destination.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct LaneKey {
    /// The table on the primary.
    pub table: TableIdent,
    /// The destination's name.
    pub destination: String,
}

impl LaneKey {
    /// Builds a key.
    pub fn new(table: TableIdent, destination: impl Into<String>) -> Self {
        Self { table, destination: destination.into() }
    }
}

impl fmt::Display for LaneKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.table, self.destination)
    }
}

/// A lane's status, as the admin API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LaneStatus {
    /// The source has changes the replica does not have yet.
    Pending,
    /// The replica has everything the source had at the last check.
    Completed,
    /// The last attempt failed; see `last_error`.
    Failed,
    /// An operator paused the lane.
    Paused,
    /// The replica was promoted: it is a table of its own, never written by the lane again.
    Promoted,
    /// The replica's next commit belongs to a multi-table transaction whose
    /// other tables are not ready yet; see `waiting_for`.
    Waiting,
}

impl LaneStatus {
    /// Its name in the status API and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Paused => "paused",
            Self::Promoted => "promoted",
            Self::Waiting => "waiting",
        }
    }
}

/// The last error of a lane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LaneError {
    /// What failed, where, and what to do (redacted: never a credential).
    pub message: String,
    /// When.
    pub at: Millis,
    /// Consecutive failed attempts.
    pub attempts: i64,
    /// Whether the lane waits for an operator (or a configuration change)
    /// instead of retrying on its own.
    pub parked: bool,
}

/// Everything the store keeps about a lane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneRecord {
    /// The lane.
    pub key: LaneKey,
    /// The table on the replica (same name unless a rule maps the namespace).
    pub replica_table: TableIdent,
    /// Bumped by each hint and reconcile pass.
    pub wanted: i64,
    /// The generation the last converged run started from.
    pub done: i64,
    /// When the oldest change the replica does not have yet was noticed.
    pub pending_since: Option<Millis>,
    /// Paused by an operator.
    pub paused: bool,
    /// The source table was dropped (replicas are kept).
    pub source_dropped: bool,
    /// The source metadata last replicated.
    pub source_metadata_location: Option<String>,
    /// The replica's metadata after the last replicated commit.
    pub replica_metadata_location: Option<String>,
    /// Source snapshots the replica does not have yet, as of the last check.
    pub snapshots_behind: Option<i64>,
    /// When the lane last converged.
    pub last_success_at: Option<Millis>,
    /// How the replica is written (`register+replay`, `create+replay`), and why.
    pub mode: Option<String>,
    /// The last error, cleared by the next success.
    pub last_error: Option<LaneError>,
    /// The replica's name before a source rename the lane has not applied yet.
    pub replica_renamed_from: Option<TableIdent>,
    /// Property keys icerelay set on the replica from the source (only these
    /// are removed when the source removes them; the rest are the replica's own).
    pub managed_properties: Option<BTreeSet<String>>,
    /// The refs icerelay set on the replica, and where it set them: a ref that
    /// moved elsewhere was moved by someone else.
    pub managed_refs: Option<BTreeMap<String, i64>>,
    /// The uuid of the source table the replica follows (a source dropped and
    /// created again under the same name is another table).
    pub source_uuid: Option<String>,
    /// An operator asked for the replica to be promoted; the lane's next run does it.
    pub promotion: Option<PromotionMode>,
    /// When an unclaimed promotion request expires (the operator stopped waiting).
    pub promotion_deadline: Option<Millis>,
    /// The lane began the requested promotion: it is carried out to the end.
    pub promotion_claimed: bool,
    /// The replica was promoted: the lane never writes it again.
    pub promoted: Option<Promotion>,
    /// An operator's choice for a replica table that existed with snapshots
    /// the source does not have (failback), not carried out yet.
    pub failback: Option<FailbackChoice>,
    /// How the lane follows a replica table that existed before it with
    /// snapshots of its own (failback), once carried out.
    pub adoption: Option<Adoption>,
    /// How the replica's snapshot-log times differ from the source's, as of
    /// the last converged run.
    pub log_drift: Option<crate::replicate::plan::LogDrift>,
    /// The source as reconcile last loaded it, for a conditional load next time.
    pub source_seen: Option<SourceSeen>,
    /// What the lane waits for: the other tables of a multi-table
    /// transaction its next commit belongs to.
    pub waiting_for: Option<String>,
}

/// A source table as a reconcile pass loaded it: the answer's entity tag and
/// the metadata location it carried. A catalog that answers `304 Not
/// Modified` to that tag still has that location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSeen {
    /// The answer's `ETag`.
    pub etag: String,
    /// The metadata location in that answer.
    pub metadata_location: Option<String>,
}

/// What to do with the snapshots only the old side has, on a failback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct FailbackChoice {
    /// Keep them on this branch (else they stay in the table, unreferenced).
    pub keep_branch: Option<String>,
}

/// A replica table the lane adopted with snapshots of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Adoption {
    /// The newest snapshot of the source's main branch that it had.
    pub common_ancestor: i64,
    /// Its snapshots the source does not have (never written by icerelay).
    pub unreplicated: Vec<i64>,
    /// The branch that keeps them, and the snapshot it points at.
    pub kept_branch: Option<(String, i64)>,
    /// Its own refs at those snapshots (besides `main`): kept as they are.
    #[serde(default)]
    pub kept_refs: Vec<String>,
    /// Where its `main` was when adopted (icerelay moves it from there only).
    #[serde(default)]
    pub main_at: Option<i64>,
    /// How the source's later sequence numbers are shifted on it.
    pub sequence_shift: Option<crate::rewrite::SequenceShift>,
}

/// How a promotion treats what the source still has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PromotionMode {
    /// Replicate what the source still serves first (the source must answer).
    Drain,
    /// Promote the replica as it is (the source may be gone).
    Now,
}

impl PromotionMode {
    /// Its stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Drain => "drain",
            Self::Now => "now",
        }
    }

    /// From its stored name.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "drain" => Some(Self::Drain),
            "now" => Some(Self::Now),
            _ => None,
        }
    }
}

/// What a promotion recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Promotion {
    /// When.
    pub at: Millis,
    /// The recovery point: the replica's `main` snapshot at promotion (the
    /// last source snapshot it received), if it had one.
    pub recovery_point: Option<i64>,
    /// That snapshot's timestamp.
    pub recovery_point_at: Option<Millis>,
    /// Source snapshots the replica did not receive: counted on the source if
    /// it answered, else as of the lane's last check.
    pub missed_snapshots: Option<i64>,
    /// Whether `missed_snapshots` was counted on the source at promotion.
    pub source_answered: bool,
    /// The replica's metadata after promotion.
    pub metadata_location: Option<String>,
}

impl LaneRecord {
    /// The status the admin API shows.
    pub fn status(&self) -> LaneStatus {
        if self.promoted.is_some() {
            LaneStatus::Promoted
        } else if self.paused {
            LaneStatus::Paused
        } else if self.last_error.is_some() {
            LaneStatus::Failed
        } else if self.wanted > self.done {
            LaneStatus::Pending
        } else if self.waiting_for.is_some() {
            LaneStatus::Waiting
        } else {
            LaneStatus::Completed
        }
    }

    /// Seconds since the oldest change the replica does not have yet (0 when
    /// none, and for a promoted replica, which follows nothing).
    pub fn seconds_behind(&self, now: Millis) -> i64 {
        if self.promoted.is_some() {
            return 0;
        }
        self.pending_since.map_or(0, |since| (now - since).max(0) / 1000)
    }

    /// Whether the lane has work to do (and is allowed to). A requested
    /// promotion is work even on a paused lane; a promoted lane has none.
    pub fn has_work(&self) -> bool {
        self.promoted.is_none() && (self.promotion.is_some() || !self.paused && self.wanted > self.done)
    }
}

/// A change to the set of lanes, decided by fanning out hints or by reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaneChange {
    /// The source table changed: create the lane if needed and ask it for work.
    Touch {
        /// The lane.
        key: LaneKey,
        /// Its table on the replica.
        replica_table: TableIdent,
        /// When the change was noticed.
        at: Millis,
    },
    /// The source table was renamed: the lane follows (and so will the replica).
    Rename {
        /// The lane under the old name.
        from: LaneKey,
        /// The source's new name.
        to: TableIdent,
        /// The replica's new name.
        replica_to: TableIdent,
        /// When.
        at: Millis,
    },
    /// Reconcile loaded the source table: remember its answer's entity tag
    /// (asks for no work).
    Seen {
        /// The lane.
        key: LaneKey,
        /// What was seen.
        seen: SourceSeen,
    },
    /// The source table was dropped; the lane stops asking for work.
    SourceDropped {
        /// The lane.
        key: LaneKey,
        /// The generation the run that saw the drop started from (a change
        /// after it, a re-create say, keeps the lane asking for work).
        generation: i64,
    },
}

/// What a lane records after each confirmed replica commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// The lane.
    pub key: LaneKey,
    /// The source metadata being replicated.
    pub source_metadata_location: Option<String>,
    /// The replica's metadata after the commit.
    pub replica_metadata_location: Option<String>,
    /// Snapshot ids the commit added to the replica.
    pub added_snapshots: Vec<i64>,
    /// Source snapshots still missing on the replica.
    pub snapshots_behind: i64,
    /// How the replica is written.
    pub mode: Option<String>,
    /// Property keys now managed from the source, if they changed.
    pub managed_properties: Option<BTreeSet<String>>,
    /// Refs icerelay set, and where, if they changed.
    pub managed_refs: Option<BTreeMap<String, i64>>,
    /// The source table's uuid, once known.
    pub source_uuid: Option<String>,
    /// How the replica's snapshot-log times differ from the source's, if measured.
    pub log_drift: Option<crate::replicate::plan::LogDrift>,
}

/// A lane run's lease on its lane, where several instances share the lanes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The lane.
    pub key: LaneKey,
    /// The instance holding the lease.
    pub owner: String,
    /// Bumped by every claim: a write made under an older one is refused.
    pub generation: i64,
}

/// A verified copy of a file at a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopiedFile {
    /// Where it was written.
    pub target: String,
    /// Its size at the target.
    pub size: u64,
    /// Its checksum at the target, when the store gives one.
    pub checksum: Option<String>,
}

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The database failed.
    #[error("state store {path}: {source}")]
    Database {
        /// The database file.
        path: String,
        /// Cause.
        #[source]
        source: rusqlite::Error,
    },
    /// The state directory could not be prepared.
    #[error("state directory {path}: {source}")]
    Directory {
        /// The directory.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A stored value is not what this version of icerelay wrote.
    #[error("state store {path}: corrupt record: {detail}")]
    Corrupt {
        /// The database file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// Another process holds the state directory.
    #[error(
        "state directory {path} is in use by another icerelay (pid {holder}); two instances on one state_dir would \
         both run every lane: stop the other one, or give this one its own state_dir"
    )]
    Locked {
        /// The directory.
        path: String,
        /// The holder's process id, as it wrote it (`unknown` if unreadable).
        holder: String,
    },
    /// The database was written by a newer icerelay.
    #[error(
        "state store {path} has schema version {found}, written by a newer icerelay; this one understands up to \
         version {supported}: run the newer icerelay, or point state_dir at another directory"
    )]
    NewerSchema {
        /// The database file.
        path: String,
        /// The database's version.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// The store's thread has stopped.
    #[error("the state store has shut down")]
    Closed,
    /// The state store's configuration is unusable.
    #[error("{detail}")]
    Config {
        /// What is wrong, naming the setting.
        detail: String,
    },
    /// The shared store answered with an error.
    #[error("state store {target}: {detail}")]
    Postgres {
        /// Host, port, database and schema (never credentials).
        target: String,
        /// The error with its causes (the server's message is a cause).
        detail: String,
    },
    /// The shared store cannot be reached.
    #[error("cannot reach the state store {target}: {detail}; replication waits for it, the proxy keeps serving")]
    Unavailable {
        /// Host, port, database and schema (never credentials).
        target: String,
        /// Cause.
        detail: String,
    },
    /// The lane run lost its lease: another instance runs the lane now.
    #[error(
        "lane {lane}: this instance lost its lease (generation {generation}) to another instance; it records \
         nothing more for the lane"
    )]
    Fenced {
        /// The lane.
        lane: String,
        /// The run's generation.
        generation: i64,
    },
}

/// The durable store behind replication.
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// Appends hints to the change log.
    async fn append_hints(&self, hints: Vec<CommitHint>) -> Result<(), StateError>;
    /// Hints after the fan-out cursor, oldest first, at most `limit`.
    async fn pending_hints(&self, limit: usize) -> Result<Vec<RecordedHint>, StateError>;
    /// Fans out up to `limit` hints: `route` turns them into lane changes,
    /// which are applied and the hints deleted in one transaction. Returns
    /// how many hints there were. Where several instances fan out at once,
    /// each takes other hints.
    async fn fan_out(
        &self,
        limit: usize,
        route: &(dyn for<'h> Fn(&'h [RecordedHint]) -> Vec<LaneChange> + Send + Sync),
    ) -> Result<usize, StateError> {
        let hints = self.pending_hints(limit).await?;
        if hints.is_empty() {
            return Ok(0);
        }
        let changes = route(&hints);
        self.apply_lane_changes(changes, hints.iter().map(|h| h.id).collect()).await?;
        Ok(hints.len())
    }
    /// Applies lane changes and, in the same transaction, deletes the hints
    /// they were made from (`consumed`, the ids `pending_hints` gave).
    async fn apply_lane_changes(&self, changes: Vec<LaneChange>, consumed: Vec<HintId>) -> Result<(), StateError>;
    /// Every lane.
    async fn lanes(&self) -> Result<Vec<LaneRecord>, StateError>;
    /// The lanes that have work (see [`LaneRecord::has_work`]) and that no
    /// other instance holds, oldest change first: what the scheduler looks
    /// at on every wake, without reading every lane.
    async fn lanes_with_work(&self) -> Result<Vec<LaneRecord>, StateError>;
    /// One lane.
    async fn lane(&self, key: &LaneKey) -> Result<Option<LaneRecord>, StateError>;
    /// Snapshot ids icerelay has committed to the lane's replica.
    async fn replicated_snapshots(&self, key: &LaneKey) -> Result<BTreeSet<i64>, StateError>;
    /// Records a confirmed replica commit (or a check that found nothing to do).
    async fn record_progress(&self, progress: Progress) -> Result<(), StateError>;
    /// Records how many source snapshots the replica lacks, as seen before
    /// the replica was reached (it may be down).
    async fn record_snapshots_behind(&self, key: &LaneKey, snapshots_behind: i64) -> Result<(), StateError>;
    /// Records that a run started at `generation` converged; clears the
    /// error and what it waited for.
    async fn record_success(&self, key: &LaneKey, generation: i64) -> Result<(), StateError>;
    /// Records that a run started at `generation` stopped to wait for other
    /// lanes (`reason` says which); it asks for no work until one of them
    /// (or a change) asks for it again. Clears the error.
    async fn record_waiting(&self, key: &LaneKey, generation: i64, reason: String) -> Result<(), StateError>;
    /// Records a failed attempt.
    async fn record_failure(&self, key: &LaneKey, message: String, parked: bool) -> Result<(), StateError>;
    /// Pauses or resumes a lane; `false` if there is no such lane, or it was promoted.
    async fn set_paused(&self, key: &LaneKey, paused: bool) -> Result<bool, StateError>;
    /// Asks a lane for a full check (resync); `false` if there is no such lane, or it was promoted.
    async fn request_resync(&self, key: &LaneKey) -> Result<bool, StateError>;
    /// Asks the lane to promote its replica, unless the request expires at
    /// `deadline` before the lane claims it; `false` if there is no such lane.
    async fn request_promotion(&self, key: &LaneKey, mode: PromotionMode, deadline: Millis)
    -> Result<bool, StateError>;
    /// The lane takes the request before it changes the replica: from then
    /// on it is carried out, and can no longer be withdrawn. `false` if there
    /// is no request (withdrawn, or expired unclaimed).
    async fn claim_promotion(&self, key: &LaneKey) -> Result<bool, StateError>;
    /// Withdraws a promotion request the lane has not claimed; `false` if it
    /// was claimed, carried out, or there was none.
    async fn withdraw_promotion(&self, key: &LaneKey) -> Result<bool, StateError>;
    /// Records that the lane carried out the promotion it claimed; `false` if
    /// it had not claimed one.
    async fn record_promotion(&self, key: &LaneKey, promotion: Promotion) -> Result<bool, StateError>;
    /// Records an operator's failback choice; `false` if there is no such lane.
    async fn request_failback(&self, key: &LaneKey, choice: FailbackChoice) -> Result<bool, StateError>;
    /// Records how the lane follows an adopted replica table.
    async fn record_adoption(&self, key: &LaneKey, adoption: Adoption) -> Result<(), StateError>;
    /// Records that the replica now has the lane's current name.
    async fn finish_rename(&self, key: &LaneKey) -> Result<(), StateError>;
    /// Forgets what the lane knew about its replica (the replica is gone and
    /// will be made again): replicated snapshots, managed properties, mode.
    async fn forget_replica(&self, key: &LaneKey) -> Result<(), StateError>;
    /// The capabilities probed for destination `name` at `uri`, as JSON.
    async fn destination_capabilities(&self, name: &str, uri: &str) -> Result<Option<String>, StateError>;
    /// Records the probed capabilities of a destination.
    async fn record_destination_capabilities(
        &self,
        name: &str,
        uri: &str,
        capabilities: String,
    ) -> Result<(), StateError>;
    /// A verified copy of `source` at `destination`, if one was recorded.
    async fn copied_file(&self, destination: &str, source: &str) -> Result<Option<CopiedFile>, StateError>;
    /// Records a verified copy.
    async fn record_copied_file(&self, destination: &str, source: &str, file: CopiedFile) -> Result<(), StateError>;
    /// Forgets copy checkpoints recorded before `before`; returns how many.
    /// (A forgotten checkpoint costs a `HEAD` if the file is copied again,
    /// never correctness, so the store stays bounded on a long run.)
    async fn prune_copied_files(&self, before: Millis) -> Result<u64, StateError>;
    /// Records a multi-table transaction of the primary; returns its id.
    async fn record_transaction(&self, transaction: Transaction) -> Result<i64, StateError>;
    /// Forgets the transaction recorded as `id` (the primary refused it).
    async fn forget_transaction(&self, id: i64) -> Result<(), StateError>;
    /// The recorded transaction that added any of `snapshots` to `table`.
    async fn transaction_of(
        &self,
        table: &TableIdent,
        snapshots: &[i64],
    ) -> Result<Option<RecordedTransaction>, StateError>;
    /// Forgets transactions recorded before `before`; returns how many. (A
    /// lane that far behind commits those tables one by one.)
    async fn prune_transactions(&self, before: Millis) -> Result<u64, StateError>;

    // --- sharing: what only a store several instances use needs ---

    /// Whether several instances may share this store (lanes then need leases).
    fn shares_lanes(&self) -> bool {
        false
    }
    /// Claims the lane for `owner` for `ttl`, unless another owner's lease
    /// is still valid (`None` then). One instance alone always gets it.
    async fn acquire_lease(&self, key: &LaneKey, owner: &str, _ttl: Duration) -> Result<Option<Fence>, StateError> {
        Ok(Some(Fence { key: key.clone(), owner: owner.to_owned(), generation: 0 }))
    }
    /// Extends a lease for `ttl` from now; `false` if it was lost (another
    /// instance claimed the lane since).
    async fn renew_lease(&self, _fence: &Fence, _ttl: Duration) -> Result<bool, StateError> {
        Ok(true)
    }
    /// Gives a lease up, so another instance may take the lane at once.
    async fn release_lease(&self, _fence: &Fence) -> Result<(), StateError> {
        Ok(())
    }
    /// The store as a lane run under `fence` writes it: writes about that
    /// lane are refused once another claim replaced the fence. `None` where
    /// nobody else can claim it.
    fn fenced(&self, _fence: Fence) -> Option<std::sync::Arc<dyn StateStore>> {
        None
    }
    /// Claims the periodic pass `name` if it is due, and makes it due again
    /// `every` from now; `false` if another instance ran it within `every`.
    async fn claim_pass(&self, _name: &str, _owner: &str, _every: Duration) -> Result<bool, StateError> {
        Ok(true)
    }
    /// Notifies `hints` whenever an instance records hints, and `lanes`
    /// whenever one gives lanes work, for as long as it runs (never returns
    /// where nobody else writes the store).
    async fn watch_changes(
        &self,
        _hints: std::sync::Arc<tokio::sync::Notify>,
        _lanes: std::sync::Arc<tokio::sync::Notify>,
    ) {
        std::future::pending::<()>().await;
    }
    /// Checks that the store answers.
    async fn ping(&self) -> Result<(), StateError> {
        Ok(())
    }
    /// Where the store is, for logs and the status API (never credentials).
    fn describe(&self) -> String;
}

/// The proxy's view of the store: commit hints go into the change log, and
/// replication is woken to fan them out.
#[derive(Clone)]
pub struct ChangeLog {
    store: std::sync::Arc<dyn StateStore>,
    appended: std::sync::Arc<tokio::sync::Notify>,
}

impl ChangeLog {
    /// Hints go into `store`; `appended` is notified after each append.
    pub fn new(store: std::sync::Arc<dyn StateStore>, appended: std::sync::Arc<tokio::sync::Notify>) -> Self {
        Self { store, appended }
    }
}

impl crate::proxy::commit_tap::HintSink for ChangeLog {
    fn record(
        &self,
        hints: Vec<CommitHint>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), crate::proxy::commit_tap::HintError>> + Send + '_>>
    {
        Box::pin(async move {
            self.store.append_hints(hints).await?;
            self.appended.notify_one();
            Ok(())
        })
    }

    fn record_transaction(
        &self,
        transaction: Transaction,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Option<i64>, crate::proxy::commit_tap::HintError>> + Send + '_>,
    > {
        Box::pin(async move { Ok(Some(self.store.record_transaction(transaction).await?)) })
    }

    fn forget_transaction(
        &self,
        id: i64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), crate::proxy::commit_tap::HintError>> + Send + '_>>
    {
        Box::pin(async move { Ok(self.store.forget_transaction(id).await?) })
    }
}
