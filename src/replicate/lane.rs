//! One run of one lane: bring a replica up to its source, commit by commit.
//!
//! A run reads the source's current metadata, makes the replica if it does
//! not exist yet (`bootstrap`), then repeats: plan the next
//! commit (`plan`), copy the files it references, commit it to the replica catalog,
//! record the progress. It stops when the plan is empty. Everything it needs
//! to know is re-read at the start, so a run after a crash, a lost hint or a
//! replica outage is the same as any other run.
//!
//! After a commit whose outcome is unknown (timeout, 5xx) or that a
//! requirement refused (409), the run reloads the replica and plans again:
//! a commit that did land is then simply not planned again (snapshot ids make
//! it idempotent), and a concurrent writer shows up as divergence.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::{Value, json};
use tracing::Instrument;

use super::Context;
use super::bootstrap::Bootstrapping;
use super::destination::Destination;
use super::error::ReplicateError;
use super::group::Together;
use super::plan::{self, PlanInput, Step};
use crate::audit::{Action, Event};
use crate::catalog::{CatalogError, LoadedTable, TableIdent};
use crate::config::OnDrop;
use crate::metrics::ReplicationMetrics;
use crate::rewrite::PathMap;
use crate::rewrite::metadata::{PATH_PROPERTIES, snapshot_ids};
use crate::state::{Adoption, LaneChange, LaneKey, LaneRecord, Progress, PromotionMode, RecordedTransaction, now_ms};
use crate::storage::checkpoint::StateCheckpoints;
use crate::storage::copy::{Copier, CopyReport, CopySettings};
use crate::table_copy::{NoProgress, TableCopier};

/// Catalogs refuse a snapshot this much older than the table's `last-updated-ms`.
pub(super) const TIMESTAMP_TOLERANCE_MS: i64 = 60_000;
/// Planning rounds after a refused or unknown commit before the run gives up.
const MAX_RELOADS: usize = 5;

/// Runs `lane` until its replica agrees with the source (or an error), and
/// carries out a requested promotion.
pub async fn run(ctx: Arc<Context>, lane: LaneRecord) -> Result<(), ReplicateError> {
    let span = tracing::info_span!("lane", table = %lane.key.table, destination = %lane.key.destination);
    async move {
        if lane.promoted.is_some() {
            // A promoted replica is a table of its own.
            return Ok(());
        }
        // A request nobody waits for any more is dropped, unless the lane
        // already began it.
        let expired = lane.promotion_deadline.is_some_and(|deadline| deadline < now_ms());
        if expired && ctx.store.withdraw_promotion(&lane.key).await? {
            tracing::info!("a promotion request expired before it was carried out; the replica stays a replica");
            return follow(&ctx, LaneRecord { promotion: None, ..lane }, false).await;
        }
        match lane.promotion {
            None => follow(&ctx, lane, false).await,
            // Begun already (a run that failed half way): finish it.
            Some(_) if lane.promotion_claimed => super::promote::promote(&ctx, &lane).await,
            Some(PromotionMode::Now) => super::promote::promote(&ctx, &lane).await,
            Some(PromotionMode::Drain) => {
                // Draining needs the source: a source that is gone (or
                // answers 404 after a bad restore) is not a drop to follow.
                if ctx.primary.load_table(&lane.key.table).await?.is_none() {
                    return Err(ReplicateError::Refused(format!(
                        "cannot drain {} before promoting its replica: the source does not have the table (any \
                         more); promote the replica as it is with --now",
                        lane.key.table
                    )));
                }
                follow(&ctx, lane.clone(), true).await?;
                super::promote::promote(&ctx, &lane).await
            }
        }
    }
    .instrument(span)
    .await
}

/// What a run knows about its replica, recorded after every confirmed commit.
pub(super) struct Known {
    pub(super) replicated: BTreeSet<i64>,
    pub(super) managed_properties: BTreeSet<String>,
    pub(super) managed_refs: BTreeMap<String, i64>,
    pub(super) mode: String,
    pub(super) source_uuid: Option<String>,
    pub(super) adoption: Option<Adoption>,
}

impl Known {
    /// What a confirmed commit of `step` put on the replica.
    fn applied(&mut self, step: &Step) {
        self.replicated.extend(step.snapshots.iter().copied());
        self.managed_properties.extend(step.managed_properties.iter().cloned());
        self.managed_refs = step.managed_refs.clone();
    }

    pub(super) fn progress(&self, key: &LaneKey, replica: &LoadedTable, source: &Value, added: Vec<i64>) -> Progress {
        Progress {
            key: key.clone(),
            source_metadata_location: None,
            replica_metadata_location: replica.metadata_location.clone(),
            added_snapshots: added,
            snapshots_behind: plan::snapshots_behind(source, &replica.metadata) as i64,
            mode: Some(self.mode.clone()),
            managed_properties: Some(self.managed_properties.clone()),
            managed_refs: Some(self.managed_refs.clone()),
            source_uuid: self.source_uuid.clone(),
            log_drift: None,
        }
    }
}

/// One run in four phases: identify the source, open (or make) the
/// replica, replay what it lacks, record that it converged (or what it
/// waits for). A drain before a promotion must converge: waiting is an
/// error it retries.
async fn follow(ctx: &Context, mut lane: LaneRecord, draining: bool) -> Result<(), ReplicateError> {
    let key = &lane.key.clone();
    let route = ctx.rules.route(&key.table, &key.destination).ok_or_else(|| ReplicateError::NoRoute {
        table: key.table.to_string(),
        destination: key.destination.clone(),
    })?;
    let destination = ctx
        .destinations
        .get(&key.destination)
        .cloned()
        .ok_or_else(|| ReplicateError::UnknownDestination(key.destination.clone()))?;
    let Some(source) = ctx.primary.load_table(&key.table).await? else {
        return source_dropped(ctx, &lane, &destination, route.on_drop, lane.wanted).await;
    };
    let source_file = match identify_source(&lane, &source, &destination) {
        Ok(file) => file,
        Err(refused) => {
            lane = follow_a_new_source_once_its_replica_is_gone(ctx, lane, &source, &destination, refused).await?;
            identify_source(&lane, &source, &destination)?
        }
    };
    if let Some(old) = &lane.replica_renamed_from {
        ctx.confirm_lease().await?;
        rename_replica(&destination, old, &lane.replica_table).await?;
        ctx.store.finish_rename(key).await?;
    }
    let mut following = open_replica(ctx, &lane, &destination, source, source_file).await?;
    match replay(ctx, &lane, &destination, &mut following).await? {
        Replayed::Converged => finish(ctx, &lane, &destination, following).await,
        Replayed::Waiting(reason) if draining => Err(ReplicateError::DrainWaits(reason)),
        Replayed::Waiting(reason) => wait(ctx, &lane, following, reason).await,
    }
}

/// What a run follows: the source as last loaded, the replica as last
/// committed, and what icerelay knows it put there.
pub(super) struct Following {
    pub(super) source: LoadedTable,
    pub(super) source_file: String,
    pub(super) replica: LoadedTable,
    pub(super) known: Known,
    /// The last commit's outcome was unknown: if its snapshots show up after
    /// all, this run committed them.
    pub(super) unknown_outcome: bool,
}

impl Following {
    /// Whether a commit that turned out to be on the replica after `error`
    /// was this run's: its outcome (or an earlier attempt's) was unknown. A
    /// refused commit that is there anyway was another run's. Remembers an
    /// unknown outcome for the next attempt.
    pub(super) fn outcome_was_unknown(&mut self, error: &CatalogError) -> bool {
        self.unknown_outcome |= matches!(error, CatalogError::CommitOutcomeUnknown { .. });
        self.unknown_outcome
    }
}

/// How a replay ended.
enum Replayed {
    /// The replica agrees with the source.
    Converged,
    /// The next commit belongs to a multi-table transaction whose other
    /// tables are not ready: why.
    Waiting(String),
}

/// How one replica commit ended.
pub(super) enum Commit {
    /// It landed, and is recorded.
    Applied,
    /// Its outcome was unknown or a requirement refused it, and it did not
    /// land: the replica was reloaded, plan again.
    Reloaded(CatalogError),
}

/// The source's metadata file, once it is known to be the table the replica follows.
fn identify_source(
    lane: &LaneRecord,
    source: &LoadedTable,
    destination: &Destination,
) -> Result<String, ReplicateError> {
    let key = &lane.key;
    let source_file =
        source.metadata_location.clone().ok_or_else(|| ReplicateError::NoMetadataLocation(key.table.to_string()))?;
    if let Some((followed, now)) = replaced_source(lane, source) {
        return Err(ReplicateError::Refused(format!(
            "the source table {} was dropped and created again (its uuid is now {now}; the replica {} \
             follows the earlier table, {followed}); icerelay keeps the replica as it is. Drop or rename the replica \
             table on destination {}, then resync, to replicate the new table",
            key.table,
            lane.replica_table,
            destination.name()
        )));
    }
    Ok(source_file)
}

/// The uuid the lane follows and the source's, when they differ: the source
/// was dropped and created again under the same name.
fn replaced_source<'a>(lane: &'a LaneRecord, source: &'a LoadedTable) -> Option<(&'a str, &'a str)> {
    let followed = lane.source_uuid.as_deref()?;
    let now = source.metadata.get("table-uuid").and_then(Value::as_str)?;
    (followed != now).then_some((followed, now))
}

/// The source was dropped and created again, so the replica follows another
/// table: kept as it is while it exists. Once it is gone (the operator
/// dropped or renamed it, as the refusal asks, or `on_drop = propagate` did),
/// what the lane knew of the old pair is forgotten and the new table is
/// followed from its start.
async fn follow_a_new_source_once_its_replica_is_gone(
    ctx: &Context,
    lane: LaneRecord,
    source: &LoadedTable,
    destination: &Destination,
    refused: ReplicateError,
) -> Result<LaneRecord, ReplicateError> {
    // With a rename not applied yet, the old replica is under its old name.
    if replaced_source(&lane, source).is_none()
        || lane.replica_renamed_from.is_some()
        || destination.catalog.load_table(&lane.replica_table).await?.is_some()
    {
        return Err(refused);
    }
    ctx.confirm_lease().await?;
    tracing::warn!(replica = %lane.replica_table, "the source was created again and its old replica is gone; following the new table");
    ctx.store.forget_replica(&lane.key).await?;
    ctx.store.lane(&lane.key).await?.ok_or_else(|| {
        ReplicateError::Refused(format!(
            "the lane of {} to destination {} was removed while it ran",
            lane.key.table, lane.key.destination
        ))
    })
}

/// Loads the replica, or makes it (by the destination's bootstrap), and
/// adopts the snapshots a crash left unrecorded.
async fn open_replica(
    ctx: &Context,
    lane: &LaneRecord,
    destination: &Destination,
    source: LoadedTable,
    source_file: String,
) -> Result<Following, ReplicateError> {
    let key = &lane.key;
    let replica_table = &lane.replica_table;
    // Counted before the replica is reached: while its catalog is down the
    // status must still say how far behind it is.
    let replicated = ctx.store.replicated_snapshots(key).await?;
    ctx.store.record_snapshots_behind(key, plan::snapshots_missing_from(&source.metadata, &replicated) as i64).await?;
    let mut known = known_of(ctx, lane, destination, &source, replicated).await?;
    let capabilities = destination.capabilities(&ctx.store, &ctx.storage).await?.clone();
    let replica = match destination.catalog.load_table(replica_table).await? {
        Some(t) => t,
        None => {
            ctx.confirm_lease().await?;
            if lane.replica_metadata_location.is_some() {
                // Forgotten before it is made again: a crash or a lost answer
                // while making it must not leave the old replica's refs to
                // call the new one diverged.
                tracing::warn!(replica = %replica_table, "the replica was gone; making it again");
                ctx.store.forget_replica(key).await?;
                known.adoption = None;
            }
            let started = std::time::Instant::now();
            let making =
                Bootstrapping { ctx, key, destination, replica_table, source: &source, source_file: &source_file };
            let made = super::bootstrap::make(making, &capabilities).await?;
            known.replicated = made.snapshots.iter().copied().collect();
            known.managed_properties = made.managed_properties;
            known.managed_refs = plan::ref_ids(&made.table.metadata);
            let mut event = Event::ok(Action::Bootstrap, key).took(started);
            event.replica = Some(replica_table.to_string());
            event.source_snapshots.clone_from(&made.snapshots);
            event.replica_metadata_location.clone_from(&made.table.metadata_location);
            event.files_copied = made.copied.copied_files;
            event.bytes_copied = made.copied.copied_bytes;
            event.detail = Some(json!({"mode": capabilities.mode()}));
            ctx.audit.record(event);
            ctx.store.record_progress(known.progress(key, &made.table, &source.metadata, made.snapshots)).await?;
            made.table
        }
    };
    super::adopt::adopt_shared(ctx, lane, destination, &source, &replica, &mut known).await?;
    Ok(Following { source, source_file, replica, known, unknown_outcome: false })
}

/// What the store says icerelay put on the lane's replica (`replicated`: its snapshots).
async fn known_of(
    ctx: &Context,
    lane: &LaneRecord,
    destination: &Destination,
    source: &LoadedTable,
    replicated: BTreeSet<i64>,
) -> Result<Known, ReplicateError> {
    let capabilities = destination.capabilities(&ctx.store, &ctx.storage).await?;
    Ok(Known {
        replicated,
        managed_properties: lane.managed_properties.clone().unwrap_or_default(),
        managed_refs: lane.managed_refs.clone().unwrap_or_default(),
        mode: capabilities.mode(),
        source_uuid: source.metadata.get("table-uuid").and_then(Value::as_str).map(str::to_owned),
        adoption: lane.adoption.clone(),
    })
}

/// What [`open_existing`] found.
pub(super) enum Opened {
    /// The source and its replica, ready to plan.
    Ready(Box<Following>),
    /// The source table is gone (or is another table now).
    SourceGone,
    /// The replica is not made yet.
    NoReplica,
}

/// Opens another lane's source and replica, writing nothing (the run that
/// does this does not hold that lane): a run that commits a multi-table
/// transaction plans that lane's part too. Snapshots a crash left
/// unrecorded need no adoption here: the source has them, so the plan
/// knows them.
pub(super) async fn open_existing(
    ctx: &Context,
    lane: &LaneRecord,
    destination: &Destination,
) -> Result<Opened, ReplicateError> {
    let Some(source) = ctx.primary.load_table(&lane.key.table).await? else { return Ok(Opened::SourceGone) };
    let Ok(source_file) = identify_source(lane, &source, destination) else { return Ok(Opened::SourceGone) };
    let Some(replica) = destination.catalog.load_table(&lane.replica_table).await? else {
        return Ok(Opened::NoReplica);
    };
    let replicated = ctx.store.replicated_snapshots(&lane.key).await?;
    let known = known_of(ctx, lane, destination, &source, replicated).await?;
    Ok(Opened::Ready(Box::new(Following { source, source_file, replica, known, unknown_outcome: false })))
}

/// A replica commit as planned, and the source commit the proxy recorded
/// its snapshots in (a multi-table transaction, or several snapshots of
/// this table), if it did.
pub(super) struct Planned {
    pub(super) step: Step,
    pub(super) recorded: Option<RecordedTransaction>,
}

/// What a replay keeps for the whole run: how paths map onto the replica,
/// what the destination sets on it, and how files are copied.
pub(super) struct Replayer {
    map: PathMap,
    unreplicated: BTreeSet<i64>,
    properties: BTreeMap<String, String>,
    copier: TableCopier,
}

impl Replayer {
    pub(super) fn new(
        ctx: &Context,
        key: &LaneKey,
        destination: &Destination,
        following: &Following,
    ) -> Result<Self, ReplicateError> {
        let known = &following.known;
        let replica_location = location_of(&following.replica.metadata, "replica")?;
        let shift = known.adoption.as_ref().and_then(|a| a.sequence_shift);
        Ok(Self {
            map: path_map(ctx, key, &following.source.metadata, &replica_location)?.with_sequence_shift(shift),
            unreplicated: known.adoption.as_ref().map(|a| a.unreplicated.iter().copied().collect()).unwrap_or_default(),
            properties: replica_properties(ctx, key, destination),
            copier: table_copier(ctx, destination, known.adoption.is_some()),
        })
    }

    /// The replica's next commit (see [`plan::next_step`]), with the
    /// snapshots the source committed together with its first one, where
    /// the proxy saw that commit (see [`crate::proxy::commit_tap::Transaction`]).
    pub(super) async fn next_commit(
        &self,
        ctx: &Context,
        table: &TableIdent,
        following: &Following,
    ) -> Result<Option<Planned>, ReplicateError> {
        let Some(step) = self.plan(following, &[])? else { return Ok(None) };
        let Some(&first) = step.snapshots.first() else { return Ok(Some(Planned { step, recorded: None })) };
        let recorded = ctx.store.transaction_of(table, &[first]).await?;
        let together = recorded
            .as_ref()
            .and_then(|r| r.members.iter().find(|m| &m.table == table))
            .map_or(&[][..], |m| m.snapshots.as_slice());
        let step = if together.len() > step.snapshots.len() { self.plan(following, together)? } else { Some(step) };
        Ok(step.map(|step| Planned { step, recorded }))
    }

    fn plan(&self, following: &Following, committed_together: &[i64]) -> Result<Option<Step>, ReplicateError> {
        let Following { source, source_file, replica, known, .. } = following;
        Ok(plan::next_step(&PlanInput {
            source: &source.metadata,
            source_file,
            replica: &replica.metadata,
            replicated: &known.replicated,
            map: &self.map,
            managed_properties: &known.managed_properties,
            managed_refs: &known.managed_refs,
            destination_properties: &self.properties,
            adopted: known.adoption.as_ref().map(|a| adopted(a, &self.unreplicated)),
            committed_together,
        })?)
    }

    /// Copies the files `step` references (its snapshots', its statistics')
    /// before it is committed.
    pub(super) async fn copy(
        &self,
        ctx: &Context,
        destination: &Destination,
        following: &Following,
        step: &Step,
    ) -> Result<CopyReport, ReplicateError> {
        let mut wanted: BTreeSet<i64> = step.statistics_of.clone();
        wanted.extend(step.snapshots.iter().copied());
        if wanted.is_empty() {
            return Ok(CopyReport::default());
        }
        let Following { source, source_file, .. } = following;
        let copied = self.copier.copy_snapshots(&source.metadata, source_file, &self.map, &wanted, &NoProgress).await?;
        count_copies(&ctx.metrics, destination.name(), copied.report);
        Ok(copied.report)
    }
}

/// Commits the planned steps, one source commit at a time, until the
/// replica agrees with the source (or waits for the other tables of a
/// multi-table transaction).
async fn replay(
    ctx: &Context,
    lane: &LaneRecord,
    destination: &Destination,
    following: &mut Following,
) -> Result<Replayed, ReplicateError> {
    let replayer = Replayer::new(ctx, &lane.key, destination, following)?;
    let mut reloads = 0;
    let mut previous: Option<Step> = None;
    // Each reason to load the source again is taken once per commit.
    let (mut reloaded_on_divergence, mut reloaded_on_missing_file) = (false, false);
    loop {
        let step = match replayer.next_commit(ctx, &lane.key.table, following).await {
            // The lane that commits a multi-table transaction writes this
            // replica too, from a newer look at the source than this run's:
            // what looks foreign may be the source's newer snapshots.
            Err(ReplicateError::Plan(plan::PlanError::Diverged { .. })) if !reloaded_on_divergence => {
                reloaded_on_divergence = true;
                source_moved_on(ctx, &lane.key, following).await?;
                continue;
            }
            planned => planned?,
        };
        let Some(Planned { step, recorded }) = step else { return Ok(Replayed::Converged) };
        if step.snapshots.is_empty() {
            // A commit without a snapshot moves the replica's last-updated-ms
            // to now; a snapshot the source took meanwhile must come in the
            // same commit (the timestamp rule), so look again first.
            if source_moved_on(ctx, &lane.key, following).await? {
                previous = None;
                continue;
            }
            if previous.as_ref().is_some_and(|p| p.snapshots.is_empty() && p.updates == step.updates) {
                return Err(ReplicateError::NoProgress(format!(
                    "destination {} accepted a commit but does not keep it (the same change is planned again: {}); \
                     icerelay stops instead of committing it forever",
                    destination.name(),
                    step.describe()
                )));
            }
        }
        tracing::debug!(step = %step.describe(), behind = step.snapshots_behind, "replaying");
        let run = LaneRun { ctx, lane, destination, replayer: &replayer };
        let commit = match commit_step(&run, following, &step, recorded.as_ref()).await {
            // The source expired snapshots (and deleted their files) since
            // this run loaded it: what is still there is planned again.
            Err(e) if !reloaded_on_missing_file && e.missing_file().is_some() => {
                reloaded_on_missing_file = true;
                if source_moved_on(ctx, &lane.key, following).await? {
                    tracing::warn!(error = %e, "a source file is gone and the source changed since: planning again");
                    continue;
                }
                return Err(e);
            }
            Err(e) => return Err(e),
            Ok(Attempt::Waiting(reason)) => return Ok(Replayed::Waiting(reason)),
            Ok(Attempt::Done(commit)) => commit,
        };
        match commit {
            Commit::Applied => {
                previous = Some(step);
                reloads = 0;
                (reloaded_on_divergence, reloaded_on_missing_file) = (false, false);
            }
            Commit::Reloaded(e) => {
                reloads += 1;
                if reloads > MAX_RELOADS {
                    return Err(ReplicateError::NoProgress(format!(
                        "{e}; the replica changed under icerelay {MAX_RELOADS} times in a row"
                    )));
                }
            }
        }
    }
}

/// What became of one planned step.
enum Attempt {
    /// Committed, or refused and the replica reloaded.
    Done(Commit),
    /// Waits for the other tables of its multi-table transaction.
    Waiting(String),
}

/// Commits one step: together with the other tables of its multi-table
/// transaction (`recorded`) where it has any, else alone.
async fn commit_step(
    run: &LaneRun<'_>,
    following: &mut Following,
    step: &Step,
    recorded: Option<&RecordedTransaction>,
) -> Result<Attempt, ReplicateError> {
    Ok(match super::group::commit_together(run, following, step, recorded).await? {
        Together::Attempted(commit) => Attempt::Done(commit),
        Together::Waiting(reason) => Attempt::Waiting(reason),
        Together::Alone { part_of_transaction } => {
            let commit = commit_alone(run, following, step).await?;
            if part_of_transaction && matches!(commit, Commit::Applied) {
                super::group::count(run.ctx, run.destination, "table_by_table", 1);
            }
            Attempt::Done(commit)
        }
    })
}

/// Whether the source has new metadata since it was loaded (then it is
/// the one followed from now on). A table created again under the name (a
/// new uuid) is not this run's to follow: the next run identifies it.
async fn source_moved_on(ctx: &Context, key: &LaneKey, following: &mut Following) -> Result<bool, ReplicateError> {
    let uuid = |metadata: &serde_json::Value| metadata.get("table-uuid").cloned();
    match ctx.primary.load_table(&key.table).await? {
        Some(fresh)
            if fresh.metadata_location.is_some()
                && fresh.metadata_location != following.source.metadata_location
                && uuid(&fresh.metadata) == uuid(&following.source.metadata) =>
        {
            following.source_file = fresh.metadata_location.clone().unwrap_or_default();
            following.source = fresh;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// What stays fixed while a run commits: its lane, where it writes, how it replays.
pub(super) struct LaneRun<'a> {
    pub(super) ctx: &'a Context,
    pub(super) lane: &'a LaneRecord,
    pub(super) destination: &'a Destination,
    pub(super) replayer: &'a Replayer,
}

/// Copies the step's files and commits it to the lane's replica alone.
async fn commit_alone(run: &LaneRun<'_>, following: &mut Following, step: &Step) -> Result<Commit, ReplicateError> {
    let LaneRun { ctx, lane, destination, replayer } = *run;
    let started = std::time::Instant::now();
    let report = replayer.copy(ctx, destination, following, step).await?;
    let mut landed = Landed { step, report, started, transaction: None, committed_here: true };
    ctx.confirm_lease().await?;
    match destination.catalog.update_table(&lane.replica_table, &step.requirements, &step.updates).await {
        Ok(committed) => {
            record_landed(ctx, lane, destination, following, &landed, committed).await?;
            Ok(Commit::Applied)
        }
        Err(e @ (CatalogError::CommitOutcomeUnknown { .. } | CatalogError::CommitConflict { .. })) => {
            tracing::warn!(error = %e, "reloading the replica to see what it has");
            let replica = reload_replica(destination, &lane.replica_table).await?;
            landed.committed_here = following.outcome_was_unknown(&e);
            if has_landed(step, &replica) {
                record_landed(ctx, lane, destination, following, &landed, replica).await?;
                return Ok(Commit::Applied);
            }
            following.replica = replica;
            Ok(Commit::Reloaded(e))
        }
        Err(e) => {
            Err(explain_refusal(e, step, &following.source.metadata, &following.replica.metadata, destination.name()))
        }
    }
}

/// The replica as its catalog has it now.
pub(super) async fn reload_replica(
    destination: &Destination,
    table: &TableIdent,
) -> Result<LoadedTable, ReplicateError> {
    destination
        .catalog
        .load_table(table)
        .await?
        .ok_or_else(|| ReplicateError::Refused(format!("the replica {table} disappeared during replication")))
}

/// Whether a commit of `step` is on `replica` (snapshot ids make that
/// certain; a commit without a snapshot is simply planned again).
pub(super) fn has_landed(step: &Step, replica: &LoadedTable) -> bool {
    let there = snapshot_ids(&replica.metadata);
    !step.snapshots.is_empty() && step.snapshots.iter().all(|id| there.contains(id))
}

/// A replica commit that landed, and what went into it.
pub(super) struct Landed<'a> {
    pub(super) step: &'a Step,
    pub(super) report: CopyReport,
    pub(super) started: std::time::Instant,
    /// The multi-table transaction it was part of, for the audit log.
    pub(super) transaction: Option<Value>,
    /// Whether this run committed it (else another run did, and it is only
    /// recorded as known).
    pub(super) committed_here: bool,
}

/// Counts and audits a commit this run made (first: it has landed,
/// whatever happens next); one another run made is theirs to count.
pub(super) fn audit_landed(
    ctx: &Context,
    lane: &LaneRecord,
    destination: &Destination,
    landed: &Landed<'_>,
    committed: &LoadedTable,
) {
    if !landed.committed_here {
        return;
    }
    let step = landed.step;
    ctx.metrics.commits.get_or_create(&ReplicationMetrics::labels(destination.name())).inc();
    let mut event = Event::ok(Action::Commit, &lane.key).took(landed.started);
    event.replica = Some(lane.replica_table.to_string());
    event.source_snapshots.clone_from(&step.snapshots);
    event.replica_metadata_location.clone_from(&committed.metadata_location);
    event.files_copied = landed.report.copied_files;
    event.bytes_copied = landed.report.copied_bytes;
    event.detail = Some(match &landed.transaction {
        Some(transaction) => json!({"updates": step.describe(), "transaction": transaction}),
        None => json!({"updates": step.describe()}),
    });
    ctx.audit.record(event);
}

/// Records a replica commit that landed: counted, audited (first: it has
/// landed, whatever happens next), known to the run, and its progress stored.
pub(super) async fn record_landed(
    ctx: &Context,
    lane: &LaneRecord,
    destination: &Destination,
    following: &mut Following,
    landed: &Landed<'_>,
    committed: LoadedTable,
) -> Result<(), ReplicateError> {
    let step = landed.step;
    audit_landed(ctx, lane, destination, landed, &committed);
    following.known.applied(step);
    following.unknown_outcome = false;
    let progress = following.known.progress(&lane.key, &committed, &following.source.metadata, step.snapshots.clone());
    ctx.store.record_progress(progress).await?;
    tracing::info!(
        table = %lane.key.table,
        step = %step.describe(),
        behind = plan::snapshots_behind(&following.source.metadata, &committed.metadata),
        "replicated"
    );
    following.replica = committed;
    Ok(())
}

/// The planner's view of an adopted table.
fn adopted<'a>(adoption: &'a Adoption, unreplicated: &'a BTreeSet<i64>) -> plan::Adopted<'a> {
    plan::Adopted {
        unreplicated,
        kept_branch: adoption.kept_branch.as_ref().map(|(name, id)| (name.as_str(), *id)),
        kept_refs: &adoption.kept_refs,
        main_at: adoption.main_at,
        sequence_shift: adoption.sequence_shift,
    }
}

/// Records that the lane converged at the generation it started for.
async fn finish(
    ctx: &Context,
    lane: &LaneRecord,
    destination: &Destination,
    following: Following,
) -> Result<(), ReplicateError> {
    let Following { source, source_file, replica, mut known, .. } = following;
    let properties = replica_properties(ctx, &lane.key, destination);
    known.managed_properties.extend(plan::managed_property_keys(&source.metadata, &properties));
    let mut done = known.progress(&lane.key, &replica, &source.metadata, Vec::new());
    done.source_metadata_location = Some(source_file);
    let drift = plan::log_drift(&source.metadata, &replica.metadata);
    if drift.entries > 0 {
        tracing::debug!(
            entries = drift.entries,
            max_ms = drift.max_ms,
            "the replica's snapshot-log times differ from the source's"
        );
    }
    done.log_drift = Some(drift);
    done.snapshots_behind = 0;
    ctx.store.record_progress(done).await?;
    ctx.store.record_success(&lane.key, lane.wanted).await?;
    Ok(())
}

/// Records that the run stopped at a multi-table transaction whose other
/// tables are not ready; the run of the last of them commits it and asks
/// this lane for work again. The source location is not recorded, so that
/// reconcile looks at the lane again should that ask be lost (a crash).
async fn wait(ctx: &Context, lane: &LaneRecord, following: Following, reason: String) -> Result<(), ReplicateError> {
    let Following { source, replica, known, .. } = following;
    tracing::info!(waiting_for = %reason, "the next commit is part of a multi-table transaction; waiting for its other tables");
    ctx.store.record_progress(known.progress(&lane.key, &replica, &source.metadata, Vec::new())).await?;
    ctx.store.record_waiting(&lane.key, lane.wanted, reason).await?;
    Ok(())
}

/// The source is gone: keep (or, if the rule says so, drop) the replica.
async fn source_dropped(
    ctx: &Context,
    lane: &LaneRecord,
    destination: &Destination,
    on_drop: OnDrop,
    generation: i64,
) -> Result<(), ReplicateError> {
    let key = &lane.key;
    // A rename fanned out while this run started looks like a drop of the
    // old name: only a lane that still exists as it was may drop anything.
    let current = ctx.store.lane(key).await?;
    if current.as_ref().is_none_or(|l| l.replica_table != lane.replica_table) {
        return Ok(());
    }
    // Nor may it drop a replica another lane still has to rename (a lane
    // brought back under the old name by a hint that arrived out of order).
    // (Every lane is read, so only where a drop is at stake.)
    let renaming = on_drop == OnDrop::Propagate
        && ctx.store.lanes().await?.into_iter().any(|other| {
            other.key != *key
                && other.key.destination == key.destination
                && other.replica_renamed_from.as_ref() == Some(&lane.replica_table)
        });
    if on_drop == OnDrop::Propagate && !renaming {
        ctx.confirm_lease().await?;
        destination.catalog.drop_table(&lane.replica_table, false).await?;
        tracing::info!(replica = %lane.replica_table, "the source was dropped; dropped the replica (on_drop = propagate)");
    } else if renaming {
        tracing::info!(replica = %lane.replica_table, "the source name is gone; the replica is kept: another lane renames it");
    } else {
        tracing::info!(replica = %lane.replica_table, "the source was dropped; the replica is kept");
    }
    ctx.store.apply_lane_changes(vec![LaneChange::SourceDropped { key: key.clone(), generation }], Vec::new()).await?;
    Ok(())
}

/// Renames the replica to follow a source rename. Done already (a run that
/// crashed after renaming) is fine; another table under the new name is refused.
async fn rename_replica(destination: &Destination, from: &TableIdent, to: &TableIdent) -> Result<(), ReplicateError> {
    if from == to {
        return Ok(());
    }
    let (old, new) = (destination.catalog.load_table(from).await?, destination.catalog.load_table(to).await?);
    match (old.is_some(), new.is_some()) {
        // Renamed already (a run that crashed after renaming), or nothing to rename.
        (false, _) => return Ok(()),
        (true, true) => {
            return Err(ReplicateError::Refused(format!(
                "the source was renamed to {to}, but destination {} already has a table {to} (the replica of an \
                 earlier table of that name?); icerelay does not overwrite it. Drop or rename it there, then resync",
                destination.name()
            )));
        }
        (true, false) => {}
    }
    destination.catalog.ensure_namespace(&to.namespace).await?;
    destination.catalog.rename_table(from, to).await?;
    tracing::info!(from = %from, to = %to, "renamed the replica after the source");
    Ok(())
}

/// Adds the catalog's message about the timestamp rule where it applies.
fn explain_refusal(e: CatalogError, step: &Step, source: &Value, replica: &Value, destination: &str) -> ReplicateError {
    let refused = e.status().is_some_and(|s| s.as_u16() == 400);
    let first = step.snapshots.first().copied();
    let snapshot_ts = first.and_then(|id| plan::snapshot_field(source, id, "timestamp-ms"));
    let last_updated = replica.get("last-updated-ms").and_then(Value::as_i64);
    match (refused, snapshot_ts, last_updated) {
        (true, Some(ts), Some(last)) if ts < last - TIMESTAMP_TOLERANCE_MS => ReplicateError::Refused(format!(
            "{e} — destination {destination} refuses snapshot {} because it is {} s older than the replica's last \
             update (the timestamp rule: at most 60 s). icerelay does not change snapshot timestamps; the replica \
             fell behind a metadata-only commit. Drop the replica table and resync to make it again",
            first.unwrap_or_default(),
            (last - ts) / 1000,
        )),
        _ => ReplicateError::Catalog(e),
    }
}

/// Source location to replica location, plus data and metadata paths that
/// live outside the table location. Every file a replica gets is under one
/// of these (a path no pair maps is an error), so they are first checked
/// against the rule's `source_prefixes`.
pub(super) fn path_map(
    ctx: &Context,
    key: &LaneKey,
    source: &Value,
    replica_location: &str,
) -> Result<PathMap, ReplicateError> {
    check_source_prefixes(ctx, key, source)?;
    let source_location = location_of(source, "source")?;
    let mut map = PathMap::from_locations(&source_location, replica_location).map_err(super::plan::PlanError::from)?;
    if let Some(props) = source.get("properties").and_then(Value::as_object) {
        for property in PATH_PROPERTIES {
            let Some(path) = props.get(property).and_then(Value::as_str) else { continue };
            if map.is_source_path(path) {
                continue;
            }
            let sub = if property == "write.metadata.path" { "metadata" } else { "data" };
            map.add(path, &format!("{}/{sub}", replica_location.trim_end_matches('/')))
                .map_err(super::plan::PlanError::from)?;
        }
    }
    Ok(map)
}

/// Refuses a source whose location or path properties are outside its
/// rule's `source_prefixes` (when the rule has some).
pub(super) fn check_source_prefixes(ctx: &Context, key: &LaneKey, source: &Value) -> Result<(), ReplicateError> {
    let confined = ctx.rules.route(&key.table, &key.destination).map(|r| r.source_prefixes).unwrap_or_default();
    if confined.is_empty() {
        return Ok(());
    }
    let location = location_of(source, "source")?;
    let properties = source.get("properties").and_then(Value::as_object);
    let paths = std::iter::once(("location", location.as_str()))
        .chain(PATH_PROPERTIES.iter().filter_map(|p| Some((*p, properties?.get(*p)?.as_str()?))));
    for (what, path) in paths {
        let normalized = crate::rewrite::path_map::normalize_file_url(path);
        if !confined.iter().any(|prefix| crate::storage::is_under(&normalized, prefix)) {
            return Err(ReplicateError::Refused(format!(
                "the source table {}'s {what} {path} is outside its rule's source_prefixes ({}); icerelay reads \
                 nothing there. If the table's files really are there, add the prefix to source_prefixes",
                key.table,
                confined.join(", ")
            )));
        }
    }
    Ok(())
}

pub(super) fn location_of(metadata: &Value, which: &'static str) -> Result<String, ReplicateError> {
    metadata.get("location").and_then(Value::as_str).map(str::to_owned).ok_or_else(|| {
        ReplicateError::Plan(super::plan::PlanError::InvalidMetadata { which, detail: "no `location`".into() })
    })
}

/// What the destination sets on this lane's replica: its configured
/// properties and the read-only mark.
pub(super) fn replica_properties(ctx: &Context, key: &LaneKey, destination: &Destination) -> BTreeMap<String, String> {
    let mark = super::mark::value(&key.table, &ctx.primary_uri, destination.name());
    super::mark::replica_properties(&destination.config.properties, mark)
}

/// The copier of a lane. For a replica table that existed before the lane
/// (the old primary after a failover), a rewritten file whose target exists
/// is kept as it is: it is the original the source's copy was made from, and
/// older manifests there record its size.
pub(super) fn table_copier(ctx: &Context, destination: &Destination, adopted: bool) -> TableCopier {
    let checkpoints = Arc::new(StateCheckpoints::new(ctx.store.clone(), destination.name()));
    let settings = CopySettings {
        parallelism: ctx.settings.copy_parallelism,
        keep_existing_rewrites: adopted,
        ..CopySettings::default()
    };
    TableCopier::new(Copier::new(ctx.storage.clone(), checkpoints, settings), 4)
}

pub(super) fn count_copies(metrics: &ReplicationMetrics, destination: &str, report: CopyReport) {
    let labels = ReplicationMetrics::labels(destination);
    metrics.files_copied.get_or_create(&labels).inc_by(report.copied_files);
    metrics.bytes_copied.get_or_create(&labels).inc_by(report.copied_bytes);
}
