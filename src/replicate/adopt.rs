//! Adoption: a replica table that existed before its lane.
//!
//! Two cases meet here. A commit that landed on the replica just before a
//! crash was never recorded: what the replica shares with the source is
//! icerelay's, whoever recorded it. And after a failover, the old primary
//! configured as a destination of the new one has the tables already, with
//! history both sides share: it is followed from the newest snapshot both
//! have (the common ancestor). Snapshots only the old side has (written
//! after its last replication) stop the lane, named by id, until an operator
//! chooses (`icerelay failback`): kept on a branch or left unreferenced, and
//! the new primary's later sequence numbers shifted above the ones they took.

use serde_json::{Value, json};

use super::Context;
use super::destination::Destination;
use super::error::ReplicateError;
use super::lane::Known;
use super::plan;
use crate::audit::{Action, Event};
use crate::catalog::LoadedTable;
use crate::rewrite::SequenceShift;
use crate::rewrite::metadata::snapshot_ids;
use crate::state::{Adoption, FailbackChoice, LaneRecord};

/// Records as icerelay's the snapshots the replica shares with the source
/// that it did not record: a commit that landed just before a crash, or a
/// table that existed before the lane (the old primary, configured as a
/// destination after a failover). Such a table is followed from the newest
/// snapshot both have; snapshots only it has stop the lane, by id.
pub(super) async fn adopt_shared(
    ctx: &Context,
    lane: &LaneRecord,
    destination: &Destination,
    source: &LoadedTable,
    replica: &LoadedTable,
    known: &mut Known,
) -> Result<(), ReplicateError> {
    let key = &lane.key;
    let shared = plan::shared_snapshots(&source.metadata, &replica.metadata);
    let unrecorded: Vec<i64> = shared.difference(&known.replicated).copied().collect();
    if unrecorded.is_empty() {
        return Ok(());
    }
    let mut unrecorded = unrecorded;
    let existed = lane.replica_metadata_location.is_none()
        && known.replicated.is_empty()
        && !made_by(ctx, lane, destination, source, replica);
    if existed {
        let ancestor = plan::common_ancestor(&source.metadata, &replica.metadata);
        let (older, own) = own_snapshots(source, replica, ancestor);
        // Snapshots of the shared history the source has expired since are
        // history, not the old side's own.
        unrecorded.extend(older);
        if known.adoption.is_none() {
            let adoption = if own.is_empty() {
                // Recorded so that its files are kept as they are (see `table_copier`).
                Adoption {
                    common_ancestor: ancestor.unwrap_or_default(),
                    unreplicated: Vec::new(),
                    kept_branch: None,
                    kept_refs: Vec::new(),
                    main_at: plan::ref_ids(&replica.metadata).get(plan::MAIN).copied(),
                    sequence_shift: None,
                }
            } else {
                let Some(choice) = &lane.failback else {
                    return Err(failback_needed(lane, destination, shared.len(), ancestor, &own));
                };
                let adoption = adoption(lane, destination, source, replica, choice, ancestor, own)?;
                tracing::warn!(replica = %lane.replica_table, unreplicated = ?adoption.unreplicated, kept_branch = ?adoption.kept_branch, shift = ?adoption.sequence_shift, "failback: following the source from the common ancestor");
                let mut event = Event::ok(Action::Failback, key);
                event.replica = Some(lane.replica_table.to_string());
                event.source_snapshots = vec![adoption.common_ancestor];
                event.replica_metadata_location.clone_from(&replica.metadata_location);
                event.detail = serde_json::to_value(&adoption).ok();
                ctx.audit.record(event);
                adoption
            };
            ctx.store.record_adoption(key, adoption.clone()).await?;
            known.adoption = Some(adoption);
        }
    }
    record_adopted(ctx, lane, source, replica, known, unrecorded, existed).await
}

/// Whether `replica` is the one this lane made (its mark, the source's uuid)
/// though the store does not say so: a run that registered it, or created
/// it in a transaction, stopped before recording that.
fn made_by(
    ctx: &Context,
    lane: &LaneRecord,
    destination: &Destination,
    source: &LoadedTable,
    replica: &LoadedTable,
) -> bool {
    let mark = super::mark::value(&lane.key.table, &ctx.primary_uri, destination.name());
    let marked = replica.metadata.pointer("/properties").and_then(|p| p.get(super::mark::REPLICA_OF))
        == Some(&Value::String(mark));
    marked && replica.metadata.get("table-uuid") == source.metadata.get("table-uuid")
}

/// The divergence of a replica table that existed with snapshots of its own.
fn failback_needed(
    lane: &LaneRecord,
    destination: &Destination,
    shared: usize,
    ancestor: Option<i64>,
    own: &[i64],
) -> ReplicateError {
    let ancestor =
        ancestor.map_or_else(|| "no snapshot on the source's main branch".to_owned(), |id| format!("snapshot {id}"));
    let only_there: Vec<String> = own.iter().map(ToString::to_string).collect();
    plan::PlanError::FailbackChoiceNeeded {
        detail: format!(
            "destination {} already has {} with {shared} snapshot(s) of the source's history (the newest on the \
             source's main branch: {ancestor}) and {} snapshot(s) the source does not have: {} (written there after \
             its last replication, before a failover?). To follow the source from {ancestor}, choose what becomes \
             of them: `icerelay failback --table {} --destination {} --keep-unreplicated-as-branch NAME` keeps them \
             on a branch, `--continue-from-common-ancestor` leaves them unreferenced",
            destination.name(),
            lane.replica_table,
            only_there.len(),
            only_there.join(", "),
            lane.key.table,
            destination.name(),
        ),
    }
    .into()
}

/// The replica's snapshots the source does not have, split at the common
/// ancestor's sequence number: the older ones are shared history the source
/// expired, the newer ones the replica's own (written after the last
/// replication). Without a common ancestor, all are its own.
fn own_snapshots(source: &LoadedTable, replica: &LoadedTable, ancestor: Option<i64>) -> (Vec<i64>, Vec<i64>) {
    let source_ids = snapshot_ids(&source.metadata);
    let above = ancestor.and_then(|id| plan::snapshot_field(&replica.metadata, id, "sequence-number"));
    snapshot_ids(&replica.metadata).into_iter().filter(|id| !source_ids.contains(id)).partition(|id| {
        above.is_some_and(|above| {
            plan::snapshot_field(&replica.metadata, *id, "sequence-number").is_some_and(|n| n <= above)
        })
    })
}

/// How an adopted table with snapshots of its own (`unreplicated`) is
/// followed, from the operator's `choice`: from the common ancestor, its own
/// snapshots kept (on a branch, if asked), the source's later sequence
/// numbers shifted above the ones they took.
fn adoption(
    lane: &LaneRecord,
    destination: &Destination,
    source: &LoadedTable,
    replica: &LoadedTable,
    choice: &FailbackChoice,
    ancestor: Option<i64>,
    unreplicated: Vec<i64>,
) -> Result<Adoption, ReplicateError> {
    let refused = |why: String| {
        ReplicateError::Refused(format!(
            "cannot fail back onto {} on destination {}: {why}",
            lane.replica_table,
            destination.name()
        ))
    };
    let ancestor =
        ancestor.ok_or_else(|| refused("it has no snapshot of the source's main branch (no common history)".into()))?;
    if replica.metadata.get("format-version").and_then(Value::as_i64).unwrap_or(1) >= 3 {
        return Err(refused(
            "it is a v3 table, whose row ids (like its sequence numbers) its own snapshots have taken; icerelay does \
             not shift row ids yet. Rename or drop it there to have the replica made again"
                .into(),
        ));
    }
    let above = plan::snapshot_field(&replica.metadata, ancestor, "sequence-number").unwrap_or(0);
    let sequence = |id: i64| plan::snapshot_field(&replica.metadata, id, "sequence-number").unwrap_or(0);
    let refs = plan::ref_ids(&replica.metadata);
    let main_at = refs.get(plan::MAIN).copied();
    let last = replica.metadata.get("last-sequence-number").and_then(Value::as_i64).unwrap_or(above);
    let kept_branch = match &choice.keep_branch {
        None => None,
        Some(name) => {
            let taken = |m: &Value| m.get("refs").and_then(|r| r.get(name)).is_some();
            if taken(&source.metadata) || taken(&replica.metadata) {
                return Err(refused(format!("a ref named {name:?} exists already; choose another branch name")));
            }
            // Its main, if that is one of them; else the newest.
            let tip = main_at
                .filter(|id| unreplicated.contains(id))
                .or_else(|| unreplicated.iter().copied().max_by_key(|id| sequence(*id)))
                .ok_or_else(|| refused("it has no snapshot of its own to keep".into()))?;
            Some((name.clone(), tip))
        }
    };
    let kept_refs = refs
        .iter()
        .filter(|(name, id)| *name != plan::MAIN && unreplicated.contains(id))
        .map(|(n, _)| n.clone())
        .collect();
    Ok(Adoption {
        common_ancestor: ancestor,
        unreplicated,
        kept_branch,
        kept_refs,
        main_at,
        sequence_shift: (last > above).then_some(SequenceShift { above, by: last - above }),
    })
}

/// Records the shared snapshots as icerelay's (see [`adopt_shared`]).
async fn record_adopted(
    ctx: &Context,
    lane: &LaneRecord,
    source: &LoadedTable,
    replica: &LoadedTable,
    known: &mut Known,
    unrecorded: Vec<i64>,
    existed: bool,
) -> Result<(), ReplicateError> {
    let key = &lane.key;
    let mut event = Event::ok(Action::Commit, key);
    event.replica = Some(lane.replica_table.to_string());
    event.source_snapshots.clone_from(&unrecorded);
    event.replica_metadata_location.clone_from(&replica.metadata_location);
    event.detail = Some(json!({"adopted": if existed {
        "the table existed with this history (the old primary after a failover?); followed from here"
    } else {
        "committed before a restart, recorded now"
    }}));
    ctx.audit.record(event);
    if existed {
        tracing::warn!(replica = %lane.replica_table, shared = unrecorded.len(), "the replica table existed with the source's history; following it from there");
    }
    known.replicated.extend(&unrecorded);
    ctx.store.record_progress(known.progress(key, replica, &source.metadata, unrecorded)).await?;
    Ok(())
}
