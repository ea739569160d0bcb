//! Replication: replica catalogs that follow the primary, commit by commit.
//!
//! ```text
//! proxy ── hint ──▶ change log ──fan-out──▶ lanes ──scheduler──▶ lane runs ──▶ replica catalogs
//!                                  ▲
//!                     reconcile ───┘ (every reconcile_interval, and at start-up)
//! ```
//!
//! - [`rules`]: which tables go to which destinations.
//! - [`destination`]: a replica catalog and how its replicas are first made.
//! - [`plan`]: the next replica commit, from source and replica metadata (pure).
//! - [`lane`]: one run of one (table, destination) lane.
//! - `bootstrap`: how a lane's replica table is first made.
//! - `adopt`: a replica table that existed before its lane (failback).
//! - [`promote`]: failover, a replica becomes a table of its own.
//! - [`mark`]: the read-only mark every replica carries.
//! - `schedule`: which lanes run now (limits, backoff, parked lanes).
//! - `lease`: which instance runs a lane, where several share the state.
//!
//! The engine itself (this module) is three loops over the state store:
//!
//! 1. **Fan-out** turns change hints into lane changes (one lane per table
//!    and destination a rule names) and moves the change log's cursor, in one
//!    transaction.
//! 2. **Reconcile** lists the primary's tables, creates lanes for tables a
//!    rule covers that have none (configuring a rule backfills existing
//!    tables), and asks a lane for work whenever the source's metadata
//!    location differs from the last one replicated: commits made around the
//!    proxy and lost hints heal this way.
//! 3. **The scheduler** starts a run for each lane with work, at most
//!    `max_concurrent_lanes` at once and one per lane (serial inside a lane,
//!    parallel across lanes), retries failures with exponential backoff and
//!    jitter, and leaves parked lanes (divergence, refused history) to an
//!    operator. With a shared state each run holds the lane's lease, and
//!    reconcile runs on one instance per interval.
//!
//! Nothing here is the only copy of anything: every decision is in the state
//! store before it is acted on, so killing icerelay at any moment loses
//! nothing.

mod adopt;
mod bootstrap;
pub mod destination;
mod error;
mod group;
pub mod lane;
mod lease;
pub mod mark;
pub mod plan;
pub mod promote;
pub mod rules;
mod schedule;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use destination::{Bootstrap, Capabilities, Destination};
pub use error::ReplicateError;
pub use rules::{Route, Rules};

use crate::audit::AuditLog;
use crate::catalog::{CatalogError, Namespace, RestCatalog, TableCheck, TableIdent};
use crate::config::{Config, ReplicationConfig, StorageConfig};
use crate::metrics::{CheckLabels, ReplicationMetrics};
use crate::proxy::commit_tap::HintKind;
use crate::state::{ChangeLog, LaneChange, LaneKey, LaneRecord, SourceSeen, StateStore, now_ms};
use crate::storage::Storage;

/// How long a stopping scheduler may take to give its leases up.
const SCHEDULER_STOP: Duration = Duration::from_secs(3);
/// Hints fanned out per transaction.
const FAN_OUT_BATCH: usize = 512;

/// What lane runs share (a run's own copy adds its lease).
#[derive(Clone)]
pub struct Context {
    /// The durable state.
    pub store: Arc<dyn StateStore>,
    /// icerelay's client for the primary.
    pub primary: Arc<RestCatalog>,
    /// The primary's URI, as replicas' read-only marks name it.
    pub primary_uri: reqwest::Url,
    /// Destinations by name.
    pub destinations: BTreeMap<String, Arc<Destination>>,
    /// The rules.
    pub rules: Rules,
    /// Every configured store (source and replica storage).
    pub storage: Arc<Storage>,
    /// Replication's metrics.
    pub metrics: Arc<ReplicationMetrics>,
    /// Pacing and limits.
    pub settings: ReplicationConfig,
    /// Where every change to a replica is recorded.
    pub audit: Arc<AuditLog>,
    /// This instance's name in leases: host, process and a random part, so a
    /// restarted process is a new owner.
    pub instance: String,
    /// The lease of the lane run this context belongs to, where lanes are
    /// shared by several instances (`None` elsewhere).
    pub lease: Option<Arc<lease::LaneLease>>,
}

impl Context {
    /// Confirms, right before a replica write, that this run still holds its
    /// lane (always true where no other instance can hold it).
    pub async fn confirm_lease(&self) -> Result<(), ReplicateError> {
        match &self.lease {
            Some(lease) => lease.confirm().await,
            None => Ok(()),
        }
    }
}

/// A name for this process in leases.
fn instance_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "icerelay".to_owned());
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}/{}/{}", std::process::id(), &random[..8])
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("destinations", &self.destinations.keys()).finish_non_exhaustive()
    }
}

/// The replication engine.
#[derive(Debug)]
pub struct Replicator {
    ctx: Arc<Context>,
    appended: Arc<Notify>,
    wake: Arc<Notify>,
}

impl Replicator {
    /// Builds the engine from the configuration.
    pub fn new(
        config: &Config,
        store: Arc<dyn StateStore>,
        primary: RestCatalog,
        metrics: Arc<ReplicationMetrics>,
        audit: Arc<AuditLog>,
    ) -> Result<Self, CatalogError> {
        let storage = Arc::new(Storage::new(&config.storage));
        // Catalogs are asked for credentials only where some store would use
        // them: an S3 [[storage]] entry without keys.
        let keyless = config.storage.iter().any(StorageConfig::takes_vended_credentials);
        let vended = keyless.then(|| storage.vended().clone());
        let mut destinations = BTreeMap::new();
        for d in &config.destinations {
            let writer = mark::writer(&config.primary.uri, &d.name);
            destinations.insert(d.name.clone(), Arc::new(Destination::new(d.clone(), vended.as_ref(), &writer)?));
        }
        let primary = match &vended {
            Some(vended) if config.primary.vended_credentials => primary.vending_into(vended.clone()),
            _ => Arc::new(primary),
        };
        let ctx = Context {
            store,
            primary,
            primary_uri: config.primary.uri.clone(),
            destinations,
            rules: Rules::new(config.rules.clone()),
            storage,
            metrics,
            settings: config.replication.clone(),
            audit,
            instance: instance_name(),
            lease: None,
        };
        Ok(Self { ctx: Arc::new(ctx), appended: Arc::new(Notify::new()), wake: Arc::new(Notify::new()) })
    }

    /// Where the proxy records hints.
    pub fn change_log(&self) -> ChangeLog {
        ChangeLog::new(self.ctx.store.clone(), self.appended.clone())
    }

    /// What the admin API reads.
    pub fn context(&self) -> Arc<Context> {
        self.ctx.clone()
    }

    /// A handle that asks the scheduler to look at the lanes now (after an
    /// operator paused, resumed or resynced one).
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Runs until `stop` is cancelled. An instance with `replicate = false`
    /// runs nothing: it records hints and serves status from the shared store.
    pub async fn run(self, stop: CancellationToken) {
        if !self.ctx.settings.replicate {
            tracing::info!(store = %self.ctx.store.describe(), "replicate = false: recording commit hints only; other instances run the lanes");
            stop.cancelled().await;
            return;
        }
        let mut tasks = JoinSet::new();
        tasks.spawn(probe_destinations(self.ctx.clone()));
        tasks.spawn(follow_other_instances(self.ctx.clone(), self.appended.clone(), self.wake.clone()));
        tasks.spawn(fan_out(self.ctx.clone(), self.appended.clone(), self.wake.clone(), stop.clone()));
        tasks.spawn(reconcile_loop(self.ctx.clone(), self.wake.clone(), stop.clone()));
        let scheduler = tokio::spawn(schedule::schedule(self.ctx.clone(), self.wake.clone(), stop.clone()));
        stop.cancelled().await;
        tasks.abort_all();
        // The scheduler stops its runs and gives their leases up, so other
        // instances take the lanes over at once rather than after lease_ttl.
        let abort = scheduler.abort_handle();
        if tokio::time::timeout(SCHEDULER_STOP, scheduler).await.is_err() {
            abort.abort();
            tracing::warn!("the scheduler did not stop in time; the leases it held run out by themselves");
        }
        while tasks.join_next().await.is_some() {}
    }
}

/// Wakes fan-out when another instance sharing the store records hints, and
/// the scheduler when one gives lanes work (so a hint recorded by a sidecar
/// is replicated at once, not at the next poll).
async fn follow_other_instances(ctx: Arc<Context>, appended: Arc<Notify>, wake: Arc<Notify>) {
    ctx.store.watch_changes(appended, wake).await;
}

/// Learns every destination's capabilities at start-up, so the status API
/// and the logs say early which path each one uses.
async fn probe_destinations(ctx: Arc<Context>) {
    for destination in ctx.destinations.values() {
        match destination.capabilities(&ctx.store, &ctx.storage).await {
            Ok(c) => tracing::info!(destination = destination.name(), mode = %c.mode(), "destination ready"),
            Err(e) => {
                tracing::warn!(destination = destination.name(), error = %e, "could not probe the destination yet; lanes will try again")
            }
        }
    }
}

/// Moves hints from the change log to lanes.
async fn fan_out(ctx: Arc<Context>, appended: Arc<Notify>, wake: Arc<Notify>, stop: CancellationToken) {
    // While the store is down: one error, then quieter retries, up to 10 s apart.
    let mut failing: Option<Duration> = None;
    loop {
        match fan_out_once(&ctx).await {
            Ok(n) => {
                if failing.take().is_some() {
                    tracing::info!("fanning out change hints again");
                }
                if n > 0 {
                    wake.notify_one();
                    continue;
                }
                tokio::select! {
                    () = appended.notified() => {}
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                    () = stop.cancelled() => return,
                }
            }
            Err(e) => {
                let wait = match failing {
                    None => {
                        tracing::error!(error = %e, "could not fan out change hints; trying again");
                        Duration::from_secs(1)
                    }
                    Some(previous) => {
                        tracing::debug!(error = %e, "still cannot fan out change hints");
                        (previous * 2).min(Duration::from_secs(10))
                    }
                };
                failing = Some(wait);
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = stop.cancelled() => return,
                }
            }
        }
    }
}

/// Fans out one batch of hints; returns how many there were.
async fn fan_out_once(ctx: &Context) -> Result<usize, ReplicateError> {
    Ok(ctx.store.fan_out(FAN_OUT_BATCH, &|hints| lane_changes(&ctx.rules, hints)).await?)
}

/// The lane changes hints ask for: one per table and destination a rule names.
fn lane_changes(rules: &Rules, hints: &[crate::state::RecordedHint]) -> Vec<LaneChange> {
    let mut changes = Vec::new();
    for recorded in hints {
        let hint = &recorded.hint;
        for route in rules.routes(&hint.table) {
            let key = LaneKey::new(hint.table.clone(), route.destination.clone());
            changes.push(match &hint.kind {
                HintKind::Rename { from } => LaneChange::Rename {
                    from: LaneKey::new(from.clone(), route.destination.clone()),
                    to: hint.table.clone(),
                    replica_to: route.replica_table,
                    at: recorded.recorded_at,
                },
                // A drop is checked by the lane itself (the source may be
                // back by then), like every other change.
                HintKind::Commit | HintKind::Drop => {
                    LaneChange::Touch { key, replica_table: route.replica_table, at: recorded.recorded_at }
                }
            });
        }
    }
    changes
}

/// Reconciles at start-up and then every `reconcile_interval`; with a shared
/// store, only the instance that claims the pass, so the primary sees one
/// reconcile per interval however many instances there are.
async fn reconcile_loop(ctx: Arc<Context>, wake: Arc<Notify>, stop: CancellationToken) {
    loop {
        let claimed = ctx.store.claim_pass("reconcile", &ctx.instance, ctx.settings.reconcile_interval).await;
        let result = match claimed {
            Ok(true) => reconcile(&ctx).await,
            Ok(false) => Ok(0),
            Err(e) => Err(e.into()),
        };
        match result {
            Ok(touched) if touched > 0 => {
                tracing::info!(lanes = touched, "reconcile found tables to replicate");
                wake.notify_one();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reconcile failed; trying again at the next interval"),
        }
        tokio::select! {
            () = tokio::time::sleep(ctx.settings.reconcile_interval) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// How long copy checkpoints are kept: long enough for any copy to finish
/// or be resumed, short enough that the store stays bounded.
const CHECKPOINT_RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;
/// How long multi-table transactions are kept: a lane a week behind
/// commits those tables one by one.
const TRANSACTION_RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;

/// One reconcile pass; returns how many lanes it asked for work.
pub async fn reconcile(ctx: &Context) -> Result<usize, ReplicateError> {
    match ctx.store.prune_copied_files(now_ms() - CHECKPOINT_RETENTION_MS).await {
        Ok(0) => {}
        Ok(pruned) => tracing::debug!(pruned, "forgot old copy checkpoints"),
        Err(e) => tracing::warn!(error = %e, "could not prune old copy checkpoints"),
    }
    match ctx.store.prune_transactions(now_ms() - TRANSACTION_RETENTION_MS).await {
        Ok(0) => {}
        Ok(pruned) => tracing::debug!(pruned, "forgot old multi-table transactions"),
        Err(e) => tracing::warn!(error = %e, "could not prune old multi-table transactions"),
    }
    let tables = discover(ctx).await?;
    let lanes: HashMap<LaneKey, LaneRecord> =
        ctx.store.lanes().await?.into_iter().map(|l| (l.key.clone(), l)).collect();
    let mut changes = Vec::new();
    let mut asked_for_work = 0;
    let now = now_ms();
    let mut seen = HashSet::new();
    for table in &tables {
        let routes = ctx.rules.routes(table);
        if routes.is_empty() {
            continue;
        }
        let keys: Vec<LaneKey> =
            routes.iter().map(|route| LaneKey::new(table.clone(), route.destination.clone())).collect();
        let mut location: Option<Option<String>> = None;
        for (route, key) in routes.into_iter().zip(&keys) {
            seen.insert(key.clone());
            let wants_work = match lanes.get(key) {
                None => true,
                Some(lane) if lane.paused || lane.has_work() || lane.promoted.is_some() => false,
                Some(lane) => {
                    if location.is_none() {
                        let known = keys.iter().filter_map(|k| lanes.get(k)?.source_seen.as_ref()).next();
                        let checked = check_source(ctx, table, known, lane).await;
                        if let Some(fresh) = checked.seen {
                            changes.extend(
                                keys.iter()
                                    .filter(|k| lanes.contains_key(*k))
                                    .map(|k| LaneChange::Seen { key: k.clone(), seen: fresh.clone() }),
                            );
                        }
                        location = Some(checked.location);
                    }
                    location.as_ref().is_some_and(|l| *l != lane.source_metadata_location)
                }
            };
            if wants_work {
                asked_for_work += 1;
                changes.push(LaneChange::Touch { key: key.clone(), replica_table: route.replica_table, at: now });
            }
        }
    }
    // Lanes whose table is no longer listed: the lane finds out whether it was dropped.
    for (key, lane) in &lanes {
        let idle = !lane.source_dropped && !lane.paused && !lane.has_work() && lane.promoted.is_none();
        if !seen.contains(key) && idle && covered(ctx, &key.table) {
            asked_for_work += 1;
            changes.push(LaneChange::Touch { key: key.clone(), replica_table: lane.replica_table.clone(), at: now });
        }
    }
    if !changes.is_empty() {
        ctx.store.apply_lane_changes(changes, Vec::new()).await?;
    }
    ctx.metrics.reconcile_passes.inc();
    Ok(asked_for_work)
}

/// What reconcile learnt about a source table.
struct SourceCheck {
    /// Its metadata location now (`None`: the table is gone).
    location: Option<String>,
    /// A new entity tag to remember, if the primary gave one.
    seen: Option<SourceSeen>,
}

/// Asks the primary where `table`'s metadata is, conditionally when an
/// earlier answer's entity tag is `known`: a catalog that answers `304`
/// sends no metadata. A failure falls back to what `lane` last replicated,
/// so one table the primary will not show does not stop the pass.
async fn check_source(ctx: &Context, table: &TableIdent, known: Option<&SourceSeen>, lane: &LaneRecord) -> SourceCheck {
    let checks = &ctx.metrics.reconcile_checks;
    let mut answer = ctx.primary.check_table(table, known.map(|k| k.etag.as_str())).await;
    if answer.is_err() && known.is_some() {
        // Something on the way may not take a conditional request: a
        // stored tag must never hide the table's changes, so ask plainly.
        answer = ctx.primary.check_table(table, None).await;
    }
    match answer {
        Ok(TableCheck::Unchanged) => {
            checks.get_or_create(&CheckLabels { result: "not_modified" }).inc();
            SourceCheck { location: known.and_then(|k| k.metadata_location.clone()), seen: None }
        }
        Ok(TableCheck::Loaded { metadata_location, etag }) => {
            checks.get_or_create(&CheckLabels { result: "loaded" }).inc();
            let seen = etag
                .filter(|etag| known.is_none_or(|k| k.etag != *etag || k.metadata_location != metadata_location))
                .map(|etag| SourceSeen { etag, metadata_location: metadata_location.clone() });
            SourceCheck { location: metadata_location, seen }
        }
        Ok(TableCheck::Missing) => {
            checks.get_or_create(&CheckLabels { result: "loaded" }).inc();
            SourceCheck { location: None, seen: None }
        }
        Err(e) => {
            checks.get_or_create(&CheckLabels { result: "failed" }).inc();
            tracing::warn!(table = %table, error = %e, "reconcile could not load the table");
            SourceCheck { location: lane.source_metadata_location.clone(), seen: None }
        }
    }
}

/// Whether the rules list the table's namespace during discovery (else a
/// missing listing says nothing about the table).
fn covered(ctx: &Context, table: &TableIdent) -> bool {
    ctx.rules.namespaces().is_none_or(|listed| listed.contains(&table.namespace))
}

/// The primary's tables in the namespaces the rules cover.
async fn discover(ctx: &Context) -> Result<Vec<TableIdent>, ReplicateError> {
    let namespaces = match ctx.rules.namespaces() {
        Some(listed) => listed,
        None => {
            let mut all = Vec::new();
            let mut queue: Vec<Option<Namespace>> = vec![None];
            while let Some(parent) = queue.pop() {
                for ns in ctx.primary.list_namespaces(parent.as_ref()).await? {
                    // Some catalogs list a namespace under itself; do not loop.
                    if parent.as_ref() != Some(&ns) && !all.contains(&ns) {
                        all.push(ns.clone());
                        queue.push(Some(ns));
                    }
                }
                if all.len() > 100_000 {
                    break;
                }
            }
            all
        }
    };
    let mut tables = Vec::new();
    for ns in namespaces {
        match ctx.primary.list_tables(&ns).await {
            Ok(found) => tables.extend(found),
            Err(e) if e.status().is_some_and(|s| s.as_u16() == 404) => {}
            Err(e) => tracing::warn!(namespace = %ns, error = %e, "reconcile could not list the namespace"),
        }
    }
    Ok(tables)
}
