//! Lane leases: which instance runs a lane, where several share the state.
//!
//! With a shared store any replicating instance may run any lane, but only
//! one at a time. A run starts by claiming the lane's lease (owner, expiry,
//! fencing generation); it renews the lease every third of `lease_ttl`
//! while it runs and gives it up when it ends. Two rules keep an instance
//! that lost its lease (paused past the expiry, cut off from the store) from
//! writing after another instance took the lane over:
//!
//! - before every replica write the run confirms the lease in the store and
//!   checks, by its own monotonic clock, that the confirmation is fresh (a
//!   pause between the two shows as elapsed time);
//! - every state write of the run goes through a fenced view of the store,
//!   refused once the generation changed.
//!
//! A pause between the confirmation and the request going out is not seen
//! by either rule. There the replica catalog's own commit requirements
//! (`assert-table-uuid`, `assert-ref-snapshot-id` on `main` and every ref
//! the commit moves) are the last line: a commit planned from a state
//! another instance has moved on from is refused by the catalog. (A stale
//! commit that moves no ref can only set what the source already had.)

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Context, ReplicateError};
use crate::state::{Fence, LaneRecord, StateStore};

/// A run's lease on its lane.
pub struct LaneLease {
    store: Arc<dyn StateStore>,
    fence: Fence,
    ttl: Duration,
    /// When the lease runs out by this process's clock: the time the last
    /// confirmation was asked for, plus the ttl.
    valid_until: Mutex<Instant>,
}

impl std::fmt::Debug for LaneLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaneLease").field("fence", &self.fence).finish_non_exhaustive()
    }
}

/// What a claim found.
pub enum Claim {
    /// The run's context (fenced store, lease) and the lane as of the claim.
    Run(Arc<Context>, Box<LaneRecord>),
    /// Another instance holds the lane, or it has no work any more.
    Skip,
}

/// Claims `lane` for a run. With a store only this instance uses, the claim
/// is the shared context itself.
pub async fn claim(ctx: &Arc<Context>, lane: LaneRecord) -> Result<Claim, ReplicateError> {
    if !ctx.store.shares_lanes() {
        return Ok(Claim::Run(ctx.clone(), Box::new(lane)));
    }
    let ttl = ctx.settings.lease_ttl;
    let asked = Instant::now();
    let Some(fence) = ctx.store.acquire_lease(&lane.key, &ctx.instance, ttl).await? else {
        return Ok(Claim::Skip);
    };
    let lease = Arc::new(LaneLease {
        store: ctx.store.clone(),
        fence: fence.clone(),
        ttl,
        valid_until: Mutex::new(asked + ttl),
    });
    // The lane as it is now: another instance may have finished it between
    // the scheduler's read and the claim.
    let current = match ctx.store.lane(&lane.key).await {
        Ok(Some(current)) if current.has_work() => current,
        Ok(_) => {
            lease.release().await;
            return Ok(Claim::Skip);
        }
        Err(e) => {
            lease.release().await;
            return Err(e.into());
        }
    };
    let store = ctx.store.fenced(fence).unwrap_or_else(|| ctx.store.clone());
    let run = Context { store, lease: Some(lease), ..Context::clone(ctx) };
    Ok(Claim::Run(Arc::new(run), Box::new(current)))
}

impl LaneLease {
    fn lost(&self) -> ReplicateError {
        ReplicateError::LeaseLost { lane: self.fence.key.to_string() }
    }

    fn valid_until(&self) -> Instant {
        *self.valid_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Renews the lease; a renewal that has not answered by the time the
    /// lease runs out counts as lost (a dead connection can hang for minutes).
    async fn renew(&self) -> Result<bool, crate::state::StateError> {
        let asked = Instant::now();
        let deadline = tokio::time::Instant::from_std(self.valid_until());
        let Ok(renewed) = tokio::time::timeout_at(deadline, self.store.renew_lease(&self.fence, self.ttl)).await else {
            return Ok(false);
        };
        let renewed = renewed?;
        if renewed {
            *self.valid_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = asked + self.ttl;
        }
        Ok(renewed)
    }

    /// Confirms the lease right before a replica write: the store says it is
    /// still this run's, and by this process's clock at least a third of the
    /// ttl is left (the confirmation itself took less than two thirds).
    pub async fn confirm(&self) -> Result<(), ReplicateError> {
        if !self.renew().await? {
            return Err(self.lost());
        }
        if Instant::now() + self.ttl / 3 > self.valid_until() {
            return Err(self.lost());
        }
        Ok(())
    }

    /// Renews the lease every third of the ttl; returns once it is lost (the
    /// store says another instance took it, or it could not be renewed
    /// before it ran out), and at the latest when it runs out.
    pub async fn keep(&self) {
        loop {
            let next = (Instant::now() + self.ttl / 3).min(self.valid_until());
            tokio::time::sleep_until(tokio::time::Instant::from_std(next)).await;
            if Instant::now() >= self.valid_until() {
                tracing::warn!(lane = %self.fence.key, "the lane's lease ran out before it could be renewed; stopping this run");
                return;
            }
            match self.renew().await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(lane = %self.fence.key, "another instance took over the lane; stopping this run");
                    return;
                }
                Err(e) if Instant::now() >= self.valid_until() => {
                    tracing::warn!(lane = %self.fence.key, error = %e, "could not renew the lane's lease before it ran out; stopping this run");
                    return;
                }
                Err(e) => {
                    tracing::warn!(lane = %self.fence.key, error = %e, "could not renew the lane's lease; trying again")
                }
            }
        }
    }

    /// Gives the lease up, so another instance can take the lane at once.
    pub async fn release(&self) {
        if let Err(e) = self.store.release_lease(&self.fence).await {
            tracing::debug!(lane = %self.fence.key, error = %e, "could not release the lane's lease; it runs out by itself");
        }
    }
}

/// Runs `lane` under `ctx`'s lease (if it has one), renewing it; the run
/// stops when the lease is lost. The caller releases it.
pub async fn run_leased(ctx: Arc<Context>, lane: LaneRecord) -> Result<(), ReplicateError> {
    let Some(lease) = ctx.lease.clone() else {
        return super::lane::run(ctx, lane).await;
    };
    tokio::select! {
        result = super::lane::run(ctx, lane) => result,
        () = lease.keep() => Err(lease.lost()),
    }
}
