//! Promotion (failover): a replica becomes a table of its own.
//!
//! An operator asks for it (`icerelay promote`, or the admin API); the state
//! store keeps the request, and the lane's next run carries it out, so a
//! promotion is serial with the lane's replica commits and survives a crash
//! half way. The run claims the request before it changes the replica: an
//! unclaimed request can be withdrawn (and expires when the operator's wait
//! does), a claimed one is carried out to the end. In `drain` mode the run first replicates what the source still
//! serves (and fails, to be retried, while the source does not answer); in
//! `now` mode it takes the replica as it is. Then it removes the read-only
//! mark, records the recovery point (the replica's `main` snapshot: the last
//! source snapshot it received) and how many source snapshots it did not
//! receive, and the lane never writes the replica again.

use std::time::Duration;

use serde_json::{Value, json};

use super::Context;
use super::error::ReplicateError;
use super::mark::REPLICA_OF;
use super::plan;
use crate::audit::{Action, Event};
use crate::state::{LaneRecord, Promotion, now_ms};

/// How long the source gets to answer the count of snapshots the replica missed.
const SOURCE_CHECK: Duration = Duration::from_secs(5);

/// Promotes the lane's replica (the lane has converged already in `drain` mode).
pub async fn promote(ctx: &Context, lane: &LaneRecord) -> Result<(), ReplicateError> {
    let started = std::time::Instant::now();
    let key = &lane.key;
    let destination = ctx
        .destinations
        .get(&key.destination)
        .ok_or_else(|| ReplicateError::UnknownDestination(key.destination.clone()))?;
    // A rename the lane has not applied yet: the replica still has its old name.
    let mut replica_table = &lane.replica_table;
    let mut found = destination.catalog.load_table(replica_table).await?;
    if found.is_none()
        && let Some(old) = &lane.replica_renamed_from
    {
        replica_table = old;
        found = destination.catalog.load_table(replica_table).await?;
    }
    // Looked for before the claim: a claimed promotion is carried out to the
    // end, and one with nothing to promote would hold the lane for good.
    let Some(mut replica) = found else {
        ctx.store.withdraw_promotion(key).await?;
        return Err(ReplicateError::Refused(format!(
            "cannot promote {replica_table} on destination {}: the table does not exist there (it was never \
             replicated, or was dropped); the promotion request was withdrawn",
            destination.name()
        )));
    };
    if !ctx.store.claim_promotion(key).await? {
        tracing::info!("the promotion was withdrawn before it began; the replica stays a replica");
        return Ok(());
    }
    if replica.metadata.pointer("/properties").and_then(|p| p.get(REPLICA_OF)).is_some() {
        let mut requirements = Vec::new();
        if let Some(uuid) = replica.metadata.get("table-uuid").and_then(Value::as_str) {
            requirements.push(json!({"type": "assert-table-uuid", "uuid": uuid}));
        }
        let updates = [json!({"action": "remove-properties", "removals": [REPLICA_OF]})];
        ctx.confirm_lease().await?;
        replica = destination.catalog.update_table(replica_table, &requirements, &updates).await?;
    }
    let main = plan::ref_ids(&replica.metadata).get(plan::MAIN).copied();
    let main_at = main.and_then(|id| plan::snapshot_field(&replica.metadata, id, "timestamp-ms"));
    // The source may be gone (that is what failover is for): ask it briefly.
    let source = match tokio::time::timeout(SOURCE_CHECK, ctx.primary.load_table(&key.table)).await {
        Ok(Ok(Some(source))) => Some(source),
        _ => None,
    };
    let missed = match &source {
        Some(source) => Some(plan::snapshots_behind(&source.metadata, &replica.metadata) as i64),
        None => lane.snapshots_behind,
    };
    let promotion = Promotion {
        at: now_ms(),
        recovery_point: main,
        recovery_point_at: main_at,
        missed_snapshots: missed,
        source_answered: source.is_some(),
        metadata_location: replica.metadata_location.clone(),
    };
    if !ctx.store.record_promotion(key, promotion.clone()).await? {
        // Only a claimed promotion is recorded, and a claim cannot be withdrawn.
        return Err(ReplicateError::NoProgress(format!(
            "the promotion of {replica_table} was carried out but could not be recorded (the request is gone); \
             the replica is writable: check the lane's state"
        )));
    }
    let mut event = Event::ok(Action::Promote, key).took(started);
    event.replica = Some(replica_table.to_string());
    event.source_snapshots = main.into_iter().collect();
    event.replica_metadata_location = replica.metadata_location.clone();
    event.detail = Some(json!({
        "mode": lane.promotion.map(|m| m.as_str()),
        "recovery_point": promotion.recovery_point,
        "recovery_point_at": promotion.recovery_point_at.map(crate::state::rfc3339),
        "missed_snapshots": promotion.missed_snapshots,
        "source_answered": promotion.source_answered,
    }));
    ctx.audit.record(event);
    tracing::warn!(
        replica = %replica_table,
        recovery_point = ?main,
        missed_snapshots = ?missed,
        metadata = ?replica.metadata_location,
        "promoted the replica: it is writable and no longer follows the source"
    );
    Ok(())
}
