//! The scheduler: which lanes run now.
//!
//! It starts a run for each lane with work, at most `max_concurrent_lanes`
//! at once and one per lane (serial inside a lane, parallel across lanes),
//! oldest change first; claims the lane's lease first where instances share
//! the state; retries failures with exponential backoff and jitter (counted
//! from the failure the store recorded, so instances back off together); and
//! leaves parked lanes (divergence, refused history) to an operator, with one
//! attempt after each start.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{Context, ReplicateError, lease};
use crate::audit::{Action, Event};
use crate::config::ReplicationConfig;
use crate::metrics::{ReplicationMetrics, StatusLabels};
use crate::state::{LaneKey, LaneRecord, now_ms};

/// How often the lane gauges are recomputed (from every lane).
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);
/// How long a wake waits for the wakes right behind it: a burst of commits
/// (or of other instances' notifications) costs one look at the lanes.
const WAKE_COALESCE: Duration = Duration::from_millis(20);
/// The longest the scheduler sleeps without a wake.
const IDLE_LOOK: Duration = Duration::from_secs(5);

/// Starts lane runs until `stop`.
pub(super) async fn schedule(ctx: Arc<Context>, wake: Arc<Notify>, stop: CancellationToken) {
    let mut scheduler = Scheduler::new(ctx, stop.clone());
    loop {
        scheduler.refresh_gauges().await;
        // With every slot taken there is nothing to start: no need to look.
        if scheduler.running.len() < scheduler.ctx.settings.max_concurrent_lanes {
            scheduler.start_due_lanes().await;
        }
        let sleep = scheduler.until_next_retry();
        tokio::select! {
            biased;
            () = stop.cancelled() => {
                scheduler.stop().await;
                return;
            }
            Some(done) = scheduler.running.join_next_with_id(), if !scheduler.running.is_empty() => {
                scheduler.finished(done);
            }
            () = wake.notified() => tokio::time::sleep(WAKE_COALESCE).await,
            () = tokio::time::sleep(sleep) => {}
        }
    }
}

/// What the scheduler knows between looks.
struct Scheduler {
    ctx: Arc<Context>,
    /// Runs in flight: each ends with its lane and, if it failed, the attempts so far.
    running: JoinSet<(LaneKey, Option<i64>)>,
    active: HashSet<LaneKey>,
    retry_at: HashMap<LaneKey, Instant>,
    /// Parked lanes get one attempt after a start: the configuration may have changed.
    tried_since_start: HashSet<LaneKey>,
    gauges_at: Option<Instant>,
    /// The leases of the runs in flight, given up if the scheduler stops.
    leases: HashMap<LaneKey, Arc<lease::LaneLease>>,
    /// Which lane each run task is for (a task that died still frees its lane).
    tasks: HashMap<tokio::task::Id, LaneKey>,
    stop: CancellationToken,
}

impl Scheduler {
    fn new(ctx: Arc<Context>, stop: CancellationToken) -> Self {
        Self {
            ctx,
            running: JoinSet::new(),
            active: HashSet::new(),
            retry_at: HashMap::new(),
            tried_since_start: HashSet::new(),
            gauges_at: None,
            leases: HashMap::new(),
            tasks: HashMap::new(),
            stop,
        }
    }

    /// Gauges need every lane: at most every few seconds, not on every wake.
    async fn refresh_gauges(&mut self) {
        if self.gauges_at.is_some_and(|at| at.elapsed() < GAUGE_INTERVAL) {
            return;
        }
        self.gauges_at = Some(Instant::now());
        match self.ctx.store.lanes().await {
            Ok(all) => record_gauges(&self.ctx.metrics, &all),
            Err(e) => tracing::error!(error = %e, "cannot read the lanes"),
        }
    }

    /// Starts a run for each lane that has work and is due, oldest change
    /// first (so busy tables cannot starve the others), up to the limit.
    async fn start_due_lanes(&mut self) {
        let mut lanes = match self.ctx.store.lanes_with_work().await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the lanes");
                return;
            }
        };
        lanes.sort_by_key(|l| l.pending_since.unwrap_or(i64::MAX));
        for lane in lanes {
            if self.running.len() >= self.ctx.settings.max_concurrent_lanes || self.stop.is_cancelled() {
                break;
            }
            if self.is_due(&lane) {
                self.start(lane).await;
            }
        }
    }

    fn is_due(&mut self, lane: &LaneRecord) -> bool {
        // A resync resets the attempts: retry now, not at the old backoff.
        if lane.last_error.as_ref().is_some_and(|e| e.attempts == 0) {
            self.retry_at.remove(&lane.key);
        }
        let parked = lane.last_error.as_ref().is_some_and(|e| e.parked)
            && self.tried_since_start.contains(&lane.key)
            && lane.promotion.is_none();
        // Backoff is kept here (with jitter) and follows from the store
        // (without): another instance that just failed this lane is waited for too.
        let backed_off = self.retry_at.get(&lane.key).is_none_or(|at| *at <= Instant::now())
            && due_by_store(&self.ctx.settings, lane);
        lane.has_work() && !parked && backed_off && !self.active.contains(&lane.key)
    }

    /// Claims the lane and starts its run; a lane another instance holds is left to it.
    async fn start(&mut self, lane: LaneRecord) {
        let key = lane.key.clone();
        let (run_ctx, lane) = match lease::claim(&self.ctx, lane).await {
            Ok(lease::Claim::Run(run_ctx, lane)) => (run_ctx, *lane),
            Ok(lease::Claim::Skip) => return,
            Err(e) => {
                tracing::warn!(table = %key.table, destination = %key.destination, error = %e, "could not claim the lane; trying again");
                return;
            }
        };
        self.active.insert(key.clone());
        if let Some(lease) = &run_ctx.lease {
            self.leases.insert(key.clone(), lease.clone());
        }
        self.tried_since_start.insert(key.clone());
        let task = self.running.spawn(async move {
            let key = lane.key.clone();
            let result =
                AssertUnwindSafe(lease::run_leased(run_ctx.clone(), lane)).catch_unwind().await.unwrap_or_else(|_| {
                    Err(ReplicateError::NoProgress("the lane run panicked (a bug: please report it)".into()))
                });
            // Recorded under the run's lease (fenced), then the lease is given up.
            let failed_attempts = record_outcome(&run_ctx, &key, result).await;
            if let Some(lease) = &run_ctx.lease {
                lease.release().await;
            }
            (key, failed_attempts)
        });
        self.tasks.insert(task.id(), key);
    }

    fn finished(&mut self, done: Result<(tokio::task::Id, (LaneKey, Option<i64>)), tokio::task::JoinError>) {
        let (id, failed_attempts) = match done {
            Ok((id, (_, failed_attempts))) => (id, failed_attempts),
            // The task itself failed (outside the run's own panic guard):
            // free the lane, and retry it like a failure.
            Err(e) => (e.id(), Some(1)),
        };
        let Some(key) = self.tasks.remove(&id) else { return };
        self.active.remove(&key);
        self.leases.remove(&key);
        match failed_attempts {
            None => self.retry_at.remove(&key),
            Some(attempts) => self.retry_at.insert(key, Instant::now() + backoff(&self.ctx.settings, attempts)),
        };
    }

    /// Stops every run and gives their leases up (a run stopped half way is
    /// like a run after a crash: the next one re-reads everything).
    async fn stop(&mut self) {
        self.running.abort_all();
        while self.running.join_next().await.is_some() {}
        futures::future::join_all(self.leases.values().map(|lease| lease.release())).await;
        self.leases.clear();
    }

    fn until_next_retry(&self) -> Duration {
        let now = Instant::now();
        let next_retry = self.retry_at.values().filter(|at| **at > now).min().copied();
        next_retry.map_or(IDLE_LOOK, |at| at - now).min(IDLE_LOOK)
    }
}

/// Records how a run ended, through the run's own (fenced) view of the
/// store; returns the failed attempts so far when the lane is to be retried.
async fn record_outcome(ctx: &Context, key: &LaneKey, result: Result<(), ReplicateError>) -> Option<i64> {
    let error = result.err()?;
    if error.is_lease_lost() {
        // Another instance runs the lane now; it records what happens next.
        tracing::info!(table = %key.table, destination = %key.destination, error = %error, "stopped a lane run");
        return None;
    }
    let parked = error.parks();
    let message = error.to_string();
    let attempts = match ctx.store.record_failure(key, message.clone(), parked).await {
        Ok(()) => ctx.store.lane(key).await.ok().flatten().and_then(|l| l.last_error).map_or(1, |e| e.attempts),
        Err(e @ crate::state::StateError::Fenced { .. }) => {
            tracing::info!(table = %key.table, destination = %key.destination, error = %message, fenced = %e, "stopped a lane run");
            return None;
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot record a lane failure");
            1
        }
    };
    ctx.metrics.failures.get_or_create(&ReplicationMetrics::labels(&key.destination)).inc();
    let action = if error.is_divergence() { Action::Divergence } else { Action::Failure };
    ctx.audit.record(Event::failed(action, key, message.clone()));
    if parked {
        tracing::error!(table = %key.table, destination = %key.destination, error = %message, "replication stopped; waiting for an operator (resync)");
    } else {
        tracing::warn!(table = %key.table, destination = %key.destination, error = %message, "replication failed; retrying");
    }
    Some(attempts)
}

/// Whether a failed lane's backoff, counted from its recorded failure, is
/// over (at the shortest jitter), whichever instance failed it.
fn due_by_store(settings: &ReplicationConfig, lane: &LaneRecord) -> bool {
    let Some(error) = lane.last_error.as_ref().filter(|e| e.attempts > 0 && !e.parked) else { return true };
    let wait = i64::try_from(base_backoff(settings, error.attempts).as_millis() / 2).unwrap_or(i64::MAX);
    now_ms() >= error.at.saturating_add(wait)
}

/// Exponential backoff with ±50% jitter, so failing lanes do not retry in step.
fn backoff(settings: &ReplicationConfig, attempts: i64) -> Duration {
    let jitter = 0.5 + f64::from(uuid::Uuid::new_v4().as_u128() as u16) / f64::from(u16::MAX);
    base_backoff(settings, attempts).mul_f64(jitter)
}

/// The backoff after `attempts` failures, before jitter: doubling from the
/// initial one up to the maximum.
fn base_backoff(settings: &ReplicationConfig, attempts: i64) -> Duration {
    let exponent = u32::try_from(attempts.clamp(1, 30) - 1).unwrap_or(0);
    settings.retry_initial_backoff.saturating_mul(2u32.saturating_pow(exponent)).min(settings.retry_max_backoff)
}

fn record_gauges(metrics: &ReplicationMetrics, lanes: &[LaneRecord]) {
    let now = now_ms();
    let mut lag: BTreeMap<&str, i64> = BTreeMap::new();
    let mut behind: BTreeMap<&str, i64> = BTreeMap::new();
    let mut by_status: BTreeMap<&'static str, i64> =
        [("pending", 0), ("completed", 0), ("failed", 0), ("paused", 0), ("promoted", 0), ("waiting", 0)]
            .into_iter()
            .collect();
    let mut queue = 0;
    for lane in lanes {
        let d = lane.key.destination.as_str();
        let entry = lag.entry(d).or_default();
        *entry = (*entry).max(lane.seconds_behind(now));
        *behind.entry(d).or_default() += lane.snapshots_behind.unwrap_or(0);
        *by_status.entry(lane.status().as_str()).or_default() += 1;
        if lane.has_work() {
            queue += 1;
        }
    }
    for (d, seconds) in lag {
        metrics.lag_seconds.get_or_create(&ReplicationMetrics::labels(d)).set(seconds);
    }
    for (d, n) in behind {
        metrics.snapshots_behind.get_or_create(&ReplicationMetrics::labels(d)).set(n);
    }
    for (status, n) in by_status {
        metrics.lanes.get_or_create(&StatusLabels { status }).set(n);
    }
    metrics.queue_depth.set(queue);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_maximum_with_jitter() {
        let settings = ReplicationConfig {
            retry_initial_backoff: Duration::from_secs(1),
            retry_max_backoff: Duration::from_secs(60),
            ..ReplicationConfig::default()
        };
        let first = backoff(&settings, 1);
        assert!(first >= Duration::from_millis(500) && first <= Duration::from_millis(1500), "{first:?}");
        let tenth = backoff(&settings, 10);
        assert!(tenth >= Duration::from_secs(30) && tenth <= Duration::from_secs(90), "{tenth:?}");
    }
}
