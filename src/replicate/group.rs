//! Multi-table transactions on replicas: what the source committed to
//! several tables at once, each destination commits at once.
//!
//! The proxy records which snapshots a `transactions/commit` added to which
//! table (see [`crate::proxy::commit_tap::Transaction`]). When a lane's next
//! commit adds such snapshots, the tables of that transaction that route to
//! the same destination are its *members*, and the lane does not commit
//! alone:
//!
//! - a member whose replica is not at that transaction yet (earlier commits
//!   still to replay, a replica not made, a paused lane) is **waited for**:
//!   the lane stops and records what it waits for;
//! - once every member's next commit is its part of the transaction, the
//!   lane of the first member table (by name) copies every member's files
//!   and sends all parts in one `transactions/commit`, which the catalog
//!   applies entirely or not at all, then records every member's progress
//!   and asks the waiting lanes to go on. Another lane that finds every
//!   member ready asks that lane for work and waits.
//!
//! Lanes of other tables never wait. Where a destination does not take
//! multi-table commits (it does not advertise the endpoint, or refused one),
//! each table is committed on its own and the status API says so per
//! destination. A member that can no longer take part (its source table was
//! dropped or replaced, or its replica already has its part) is left out.
//!
//! Two runs that commit the same transaction anyway (instances sharing the
//! state, a lane started twice) send the same parts with the same
//! requirements (`assert-ref-snapshot-id`): the catalog refuses the second,
//! whose run then finds its part on the replica and records it as known.

use std::collections::BTreeSet;

use serde_json::json;

use super::Context;
use super::destination::Destination;
use super::error::ReplicateError;
use super::lane::{self, Commit, Following, Landed, Opened, Replayer};
use super::plan::Step;
use crate::catalog::{CatalogError, TableCommit};
use crate::metrics::TransactionLabels;
use crate::proxy::commit_tap::TransactionMember;
use crate::rewrite::metadata::snapshot_ids;
use crate::state::{LaneChange, LaneKey, LaneRecord, RecordedTransaction, now_ms};

/// How a lane's next commit relates to a multi-table transaction.
pub(super) enum Together {
    /// It was committed together with its transaction's other tables.
    Committed(Commit),
    /// Its transaction's other tables are not ready: why.
    Waiting(String),
    /// It is committed alone (no transaction, or none possible here).
    Alone,
}

/// Another table's part of the transaction, planned and ready to commit.
struct Member {
    lane: LaneRecord,
    following: Following,
    replayer: Replayer,
    step: Step,
}

/// Where another table of the transaction stands.
enum Standing {
    /// Its next commit is its part of the transaction.
    Ready(Box<Member>),
    /// It cannot or need not take part (its part is there already, its
    /// source is gone, its replica was promoted).
    LeftOut,
    /// Its part is not next yet: why.
    Behind(String),
    /// Its part cannot be one commit on the replica: why.
    Apart(String),
}

/// Commits `step` together with its transaction's other tables on this
/// destination, if it is part of one (see the module documentation).
pub(super) async fn commit_together(
    ctx: &Context,
    lane: &LaneRecord,
    destination: &Destination,
    following: &mut Following,
    replayer: &Replayer,
    step: &Step,
) -> Result<Together, ReplicateError> {
    if step.snapshots.is_empty() {
        return Ok(Together::Alone);
    }
    let Some(transaction) = ctx.store.transaction_of(&lane.key.table, &step.snapshots).await? else {
        return Ok(Together::Alone);
    };
    let others: Vec<&TransactionMember> = transaction
        .members
        .iter()
        .filter(|m| m.table != lane.key.table && ctx.rules.route(&m.table, destination.name()).is_some())
        .collect();
    if others.is_empty() {
        return Ok(Together::Alone);
    }
    let alone = |why: String| {
        tracing::warn!(
            transaction = transaction.id,
            "committing this table's part of a multi-table transaction on its own: {why}"
        );
        count(ctx, destination, "table_by_table", 1);
        Ok(Together::Alone)
    };
    if !destination.takes_transactions().await {
        return alone(destination.multi_table_commits().await);
    }
    let own = transaction.members.iter().find(|m| m.table == lane.key.table);
    if !own.is_some_and(|m| same_snapshots(&m.snapshots, &step.snapshots)) {
        return alone(format!("the replica's next commit adds snapshots {:?}, not this table's part", step.snapshots));
    }
    let mut members = Vec::new();
    for member in others {
        match standing(ctx, destination, member).await? {
            Standing::Ready(member) => members.push(*member),
            Standing::LeftOut => {}
            Standing::Behind(why) => return Ok(Together::Waiting(why)),
            Standing::Apart(why) => return alone(why),
        }
    }
    if members.is_empty() {
        return Ok(Together::Alone);
    }
    // One lane commits: the first table's. Lanes that get here together
    // would otherwise both copy everything, and all but one be refused.
    if let Some(first) =
        members.iter().map(|m| &m.lane).filter(|m| m.key.table < lane.key.table).min_by_key(|m| &m.key.table)
    {
        let ask =
            LaneChange::Touch { key: first.key.clone(), replica_table: first.replica_table.clone(), at: now_ms() };
        ctx.store.apply_lane_changes(vec![ask], Vec::new()).await?;
        return Ok(Together::Waiting(format!("{}: its lane commits this transaction", first.key.table)));
    }
    commit_all(ctx, lane, destination, following, replayer, step, &transaction, members).await
}

/// Where `member`'s lane to `destination` stands with its part.
async fn standing(
    ctx: &Context,
    destination: &Destination,
    member: &TransactionMember,
) -> Result<Standing, ReplicateError> {
    let table = &member.table;
    let key = LaneKey::new(table.clone(), destination.name().to_owned());
    let Some(lane) = ctx.store.lane(&key).await? else {
        return Ok(Standing::Behind(format!("{table}: its lane has not started yet")));
    };
    if lane.promoted.is_some() || lane.source_dropped {
        return Ok(Standing::LeftOut);
    }
    if lane.paused {
        return Ok(Standing::Behind(format!("{table}: its lane is paused")));
    }
    if lane.replica_renamed_from.is_some() {
        return Ok(Standing::Behind(format!("{table}: its replica is still to be renamed")));
    }
    let following = match lane::open_existing(ctx, &lane, destination).await? {
        Opened::Ready(following) => *following,
        Opened::SourceGone => return Ok(Standing::LeftOut),
        Opened::NoReplica => return Ok(Standing::Behind(format!("{table}: its replica is not made yet"))),
    };
    let there = snapshot_ids(&following.replica.metadata);
    if member.snapshots.iter().all(|id| there.contains(id)) {
        return Ok(Standing::LeftOut);
    }
    let replayer = Replayer::new(ctx, &key, destination, &following)?;
    let Some(step) = replayer.plan(&following)? else { return Ok(Standing::LeftOut) };
    if same_snapshots(&step.snapshots, &member.snapshots) {
        return Ok(Standing::Ready(Box::new(Member { lane, following, replayer, step })));
    }
    if step.snapshots.iter().any(|id| member.snapshots.contains(id)) {
        return Ok(Standing::Apart(format!(
            "the replica of {table} would take snapshots {:?} in one commit, the transaction added {:?}",
            step.snapshots, member.snapshots
        )));
    }
    Ok(Standing::Behind(format!("{table}: earlier commits to replicate first (next: {})", step.describe())))
}

/// Copies every part's files, then commits all parts in one multi-table
/// commit and records each table's progress.
#[allow(clippy::too_many_arguments)]
async fn commit_all(
    ctx: &Context,
    lane: &LaneRecord,
    destination: &Destination,
    following: &mut Following,
    replayer: &Replayer,
    step: &Step,
    transaction: &RecordedTransaction,
    mut members: Vec<Member>,
) -> Result<Together, ReplicateError> {
    let started = std::time::Instant::now();
    let report = replayer.copy(ctx, destination, following, step).await?;
    let mut reports = Vec::with_capacity(members.len());
    for member in &members {
        reports.push(member.replayer.copy(ctx, destination, &member.following, &member.step).await?);
    }
    let mut parts =
        vec![TableCommit { table: &lane.replica_table, requirements: &step.requirements, updates: &step.updates }];
    parts.extend(members.iter().map(|m| TableCommit {
        table: &m.lane.replica_table,
        requirements: &m.step.requirements,
        updates: &m.step.updates,
    }));
    let tables: Vec<String> = std::iter::once(&lane.key.table)
        .chain(members.iter().map(|m| &m.lane.key.table))
        .map(ToString::to_string)
        .collect();
    let detail = json!({"id": transaction.id, "tables": tables});

    ctx.confirm_lease().await?;
    let committed_here = match destination.catalog.commit_transaction(&parts).await {
        Ok(()) => true,
        Err(e @ (CatalogError::CommitOutcomeUnknown { .. } | CatalogError::CommitConflict { .. })) => {
            tracing::warn!(error = %e, "reloading the replica to see what it has");
            let replica = lane::reload_replica(destination, &lane.replica_table).await?;
            // All parts land or none: this table's part tells for all.
            if !lane::has_landed(step, &replica) {
                following.replica = replica;
                return Ok(Together::Committed(Commit::Reloaded(e)));
            }
            // A refused commit that is there was committed by another run.
            matches!(e, CatalogError::CommitOutcomeUnknown { .. })
        }
        Err(e) if e.status().is_some_and(|s| matches!(s.as_u16(), 405 | 501)) || unknown_endpoint(&e) => {
            destination.refused_transactions(format!("the catalog refused transactions/commit ({e})"));
            return Ok(Together::Alone);
        }
        Err(e) => return Err(e.into()),
    };

    let landed = Landed { step, report, started, transaction: Some(detail.clone()), committed_here };
    let replica = lane::reload_replica(destination, &lane.replica_table).await?;
    lane::record_landed(ctx, lane, destination, following, &landed, replica).await?;
    for (member, report) in members.iter_mut().zip(reports) {
        let landed = Landed { step: &member.step, report, started, transaction: Some(detail.clone()), committed_here };
        let replica = lane::reload_replica(destination, &member.lane.replica_table).await?;
        lane::record_landed(ctx, &member.lane, destination, &mut member.following, &landed, replica).await?;
    }
    // The other lanes stopped here (or will find their part done): they
    // go on with what follows the transaction.
    let now = now_ms();
    let go_on = members
        .iter()
        .map(|m| LaneChange::Touch { key: m.lane.key.clone(), replica_table: m.lane.replica_table.clone(), at: now })
        .collect();
    ctx.store.apply_lane_changes(go_on, Vec::new()).await?;
    if committed_here {
        count(ctx, destination, "atomic", tables.len() as u64);
        tracing::info!(transaction = transaction.id, tables = ?tables, "replicated a multi-table transaction in one commit");
    }
    Ok(Together::Committed(Commit::Applied))
}

/// A 404 that is not about a table or namespace: the endpoint is missing.
fn unknown_endpoint(e: &CatalogError) -> bool {
    match e {
        CatalogError::Status { status, error_type, .. } if status.as_u16() == 404 => {
            !error_type.as_deref().is_some_and(|t| t.starts_with("NoSuch"))
        }
        _ => false,
    }
}

fn same_snapshots(a: &[i64], b: &[i64]) -> bool {
    a.iter().collect::<BTreeSet<_>>() == b.iter().collect::<BTreeSet<_>>()
}

fn count(ctx: &Context, destination: &Destination, result: &'static str, tables: u64) {
    let labels = TransactionLabels { destination: destination.name().to_owned(), result };
    ctx.metrics.transactions.get_or_create(&labels).inc_by(tables);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_compared_as_sets_of_snapshots() {
        assert!(same_snapshots(&[1, 2], &[2, 1]));
        assert!(!same_snapshots(&[1, 2], &[1]));
        assert!(!same_snapshots(&[], &[1]));
    }

    #[test]
    fn only_a_404_that_names_no_missing_table_means_the_endpoint_is_missing() {
        let status = |code: u16, kind: Option<&str>| CatalogError::Status {
            catalog: "c".into(),
            operation: "commitTransaction a.x, a.y".into(),
            status: http::StatusCode::from_u16(code).expect("code"),
            error_type: kind.map(str::to_owned),
            message: "m".into(),
        };
        assert!(unknown_endpoint(&status(404, None)));
        assert!(unknown_endpoint(&status(404, Some("NotFoundException"))));
        assert!(!unknown_endpoint(&status(404, Some("NoSuchTableException"))));
        assert!(!unknown_endpoint(&status(400, None)));
    }
}
