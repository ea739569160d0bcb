//! Multi-table transactions on replicas: what the source committed to
//! several tables at once, each destination commits at once.
//!
//! The proxy records which snapshots a `transactions/commit` adds to which
//! table (see [`crate::proxy::commit_tap::Transaction`]). When a lane's next
//! commit adds such snapshots, the tables of that transaction that route to
//! the same destination are its *members*, and the lane does not commit
//! alone:
//!
//! - a member whose next commit is not its part yet (earlier commits still
//!   to replay, a replica not made, a paused or failed lane, a primary that
//!   does not show that table's part yet) is **waited for**: the lane stops
//!   and records what it waits for. The member gets there on its own (its
//!   own changes ask it for work), and reconcile looks at waiting lanes
//!   every pass;
//! - once every member's next commit is its part, the lane of the first
//!   member table (by name) copies every member's files and sends all parts
//!   in one `transactions/commit`, which the catalog applies entirely or not
//!   at all, then records the commit for every member and asks the other
//!   lanes to go on. Another lane that finds every member ready asks that
//!   lane for work and waits.
//!
//! Lanes of other tables never wait. Where a destination does not take
//! multi-table commits (it does not advertise the endpoint, or refused one
//! as unsupported), each table is committed on its own and the status API
//! says so per destination. A member that can no longer take part (its
//! source table was dropped, renamed or replaced, or expired the part, its
//! replica was promoted or already has its part) is left out; so is a member
//! whose part the replica would take in more than one commit, and then the
//! others commit alone (a part of several commits cannot go in one
//! transaction).
//!
//! The run that commits writes, for the other members, only what cannot go
//! wrong whoever else runs them: their replicated snapshots and status. Their
//! own next run (which they are asked for) records the rest from their
//! replicas. Two runs that send the same transaction anyway (instances
//! sharing the state) send the same parts with the same requirements
//! (`assert-ref-snapshot-id`): the catalog refuses the second, whose run then
//! finds the parts on the replicas and records them as known.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use super::Context;
use super::destination::Destination;
use super::error::ReplicateError;
use super::lane::{self, Commit, Following, Landed, LaneRun, Opened, Planned, Replayer};
use super::plan::Step;
use crate::catalog::{CatalogError, TableCommit, TableIdent};
use crate::metrics::TransactionLabels;
use crate::proxy::commit_tap::TransactionMember;
use crate::rewrite::metadata::snapshot_ids;
use crate::state::{LaneChange, LaneKey, LaneRecord, Millis, Progress, RecordedTransaction, now_ms};

/// How a lane's next commit relates to a multi-table transaction.
pub(super) enum Together {
    /// It was sent together with its transaction's other parts: how that went.
    Attempted(Commit),
    /// Its transaction's other tables are not ready: why.
    Waiting(String),
    /// It is committed alone; `part_of_transaction` when it belongs to one
    /// that cannot be committed whole here.
    Alone {
        /// Whether it is a transaction's part.
        part_of_transaction: bool,
    },
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
    /// It cannot or need not take part.
    LeftOut,
    /// Its part is not next yet: why.
    Behind(String),
    /// Its part cannot be one commit on the replica: why.
    Apart(String),
}

/// Commits `step` together with its transaction's other tables on this
/// destination, if it is part of one (`recorded`, as [`Replayer::next_commit`]
/// found it; see the module documentation).
pub(super) async fn commit_together(
    run: &LaneRun<'_>,
    following: &mut Following,
    step: &Step,
    recorded: Option<&RecordedTransaction>,
) -> Result<Together, ReplicateError> {
    let LaneRun { ctx, lane, destination, .. } = *run;
    let alone = Together::Alone { part_of_transaction: false };
    let Some(transaction) = recorded.filter(|_| !step.snapshots.is_empty()) else { return Ok(alone) };
    let others: Vec<&TransactionMember> = transaction
        .members
        .iter()
        .filter(|m| m.table != lane.key.table && ctx.rules.route(&m.table, destination.name()).is_some())
        .collect();
    if others.is_empty() {
        return Ok(alone);
    }
    let apart = |why: &str| {
        tracing::warn!(
            transaction = transaction.id,
            "committing this table's part of a multi-table transaction on its own: {why}"
        );
        Ok(Together::Alone { part_of_transaction: true })
    };
    if let Some(why) = destination.multi_table_commits().await.table_by_table() {
        return apart(why);
    }
    let own = transaction.members.iter().find(|m| m.table == lane.key.table);
    if !own.is_some_and(|m| same_snapshots(&m.snapshots, &step.snapshots)) {
        return apart(&format!(
            "the replica takes snapshots {:?} in one commit, not this table's part",
            step.snapshots
        ));
    }
    let mut members = Vec::new();
    for member in others {
        match standing(ctx, destination, member, transaction.recorded_at).await? {
            Standing::Ready(member) => members.push(*member),
            Standing::LeftOut => {}
            Standing::Behind(why) => return Ok(Together::Waiting(why)),
            Standing::Apart(why) => return apart(&why),
        }
    }
    if members.is_empty() {
        return Ok(alone);
    }
    // One lane commits: the first table's. Lanes that get here together
    // would otherwise both copy everything, and all but one be refused.
    if let Some(first) =
        members.iter().map(|m| &m.lane).filter(|m| m.key.table < lane.key.table).min_by_key(|m| &m.key.table)
    {
        ask_for_work(ctx, [first]).await?;
        return Ok(Together::Waiting(format!("{}: its lane commits this transaction", first.key.table)));
    }
    let tables: Vec<String> = std::iter::once(&lane.key.table)
        .chain(members.iter().map(|m| &m.lane.key.table))
        .map(ToString::to_string)
        .collect();
    let detail = json!({"id": transaction.id, "tables": tables});
    commit_all(run, following, step, members, detail).await
}

/// Where `member`'s lane to `destination` stands with its part. Its
/// problems (a failure, an unreachable catalog) make this lane wait, never
/// fail: they are the member's to report and retry.
async fn standing(
    ctx: &Context,
    destination: &Destination,
    member: &TransactionMember,
    recorded_at: Millis,
) -> Result<Standing, ReplicateError> {
    let table = &member.table;
    let key = LaneKey::new(table.clone(), destination.name().to_owned());
    let Some(lane) = ctx.store.lane(&key).await? else {
        // Renamed or dropped since (its part goes with its new name, alone), or not fanned out yet.
        return Ok(match ctx.primary.load_table(table).await {
            Ok(None) => Standing::LeftOut,
            _ => Standing::Behind(format!("{table}: its lane has not started yet")),
        });
    };
    // A replica being promoted is no longer this transaction's to write:
    // its lane commits what it still needs alone, or nothing.
    if lane.promoted.is_some() || lane.promotion.is_some() || lane.source_dropped {
        return Ok(Standing::LeftOut);
    }
    if lane.paused {
        return Ok(Standing::Behind(format!("{table}: its lane is paused")));
    }
    if let Some(error) = lane.last_error.as_ref().filter(|e| e.parked) {
        return Ok(Standing::Behind(format!("{table}: its lane waits for an operator ({})", error.message)));
    }
    if lane.replica_renamed_from.is_some() {
        return Ok(Standing::Behind(format!("{table}: its replica is still to be renamed")));
    }
    match plan_member(ctx, destination, lane, member, recorded_at).await {
        Ok(standing) => Ok(standing),
        Err(e) if e.is_lease_lost() => Err(e),
        Err(e) => Ok(Standing::Behind(format!("{table}: {e}"))),
    }
}

/// Plans `member`'s next commit and compares it with its part.
async fn plan_member(
    ctx: &Context,
    destination: &Destination,
    lane: LaneRecord,
    member: &TransactionMember,
    recorded_at: Millis,
) -> Result<Standing, ReplicateError> {
    let table = &member.table;
    let following = match lane::open_existing(ctx, &lane, destination).await? {
        Opened::Ready(following) => *following,
        Opened::SourceGone => return Ok(Standing::LeftOut),
        Opened::NoReplica => return Ok(Standing::Behind(format!("{table}: its replica is not made yet"))),
    };
    let there = snapshot_ids(&following.replica.metadata);
    if member.snapshots.iter().all(|id| there.contains(id)) {
        return Ok(Standing::LeftOut);
    }
    let replayer = Replayer::new(ctx, &lane.key, destination, &following)?;
    let Some(Planned { step, .. }) = replayer.next_commit(ctx, &lane.key.table, &following).await? else {
        return Ok(missing_from_source(table, recorded_at, now_ms()));
    };
    if same_snapshots(&step.snapshots, &member.snapshots) {
        return Ok(Standing::Ready(Box::new(Member { lane, following, replayer, step })));
    }
    // Earlier commits come first, and get there; a part split across
    // several commits never becomes one.
    if step.snapshots.iter().any(|id| member.snapshots.contains(id)) {
        return Ok(Standing::Apart(format!(
            "the replica of {table} would take snapshots {:?} in one commit, the transaction added {:?}",
            step.snapshots, member.snapshots
        )));
    }
    Ok(Standing::Behind(format!("{table}: earlier commits to replicate first (next: {})", step.describe())))
}

/// How long after a transaction was recorded a member's source may still
/// not show its part. Catalogs that apply a multi-table commit table after
/// table (Java Iceberg's `CatalogHandlers`, SeaweedFS) publish the others
/// milliseconds later; a part missing for longer was expired. (The proxy
/// records a transaction before the primary applies it: a primary slower
/// than this to commit at all gets its transaction split.)
const PUBLISHED_WITHIN_MS: Millis = 60_000;

/// Where a member stands whose source has nothing to replicate though its
/// replica lacks its part: the primary does not show the part yet (it
/// publishes the transaction's tables one after the other), or no longer
/// (the source expired it).
fn missing_from_source(table: &TableIdent, recorded_at: Millis, now: Millis) -> Standing {
    if now - recorded_at < PUBLISHED_WITHIN_MS {
        Standing::Behind(format!("{table}: the primary does not show its part of the transaction yet"))
    } else {
        Standing::LeftOut
    }
}

/// Copies every part's files, sends all parts in one multi-table commit,
/// and records each table's commit.
async fn commit_all(
    run: &LaneRun<'_>,
    following: &mut Following,
    step: &Step,
    mut members: Vec<Member>,
    detail: Value,
) -> Result<Together, ReplicateError> {
    let LaneRun { ctx, lane, destination, replayer } = *run;
    let started = std::time::Instant::now();
    let report = replayer.copy(ctx, destination, following, step).await?;
    let mut reports = Vec::with_capacity(members.len());
    for member in &members {
        match member.replayer.copy(ctx, destination, &member.following, &member.step).await {
            Ok(report) => reports.push(report),
            Err(e) => {
                return Ok(Together::Waiting(format!("{}: copying its files failed: {e}", member.lane.key.table)));
            }
        }
    }
    // Asked again just before the commit: a promotion may have been asked
    // for (or begun) while the files were copied.
    for member in &members {
        let now = ctx.store.lane(&member.lane.key).await?;
        if now.as_ref().is_none_or(|l| l.promotion.is_some() || l.promoted.is_some()) {
            return Ok(Together::Waiting(format!(
                "{}: its replica is being promoted; the transaction goes on without it",
                member.lane.key.table
            )));
        }
    }
    let sent = send(ctx, lane, destination, step, &members).await?;
    let (committed_here, error) = match sent {
        Sent::Committed => (true, None),
        Sent::Unsupported => {
            // The others may be waiting for this run: each commits its own part now.
            ask_for_work(ctx, members.iter().map(|m| &m.lane)).await?;
            return Ok(Together::Alone { part_of_transaction: true });
        }
        Sent::Unsure(e) => (following.outcome_was_unknown(&e), Some(e)),
    };
    let landed = Landed { step, report, started, transaction: Some(detail.clone()), committed_here };
    // All parts land or none; but a part may also be there because another
    // run committed it alone: each is checked after a doubtful answer.
    let replica = lane::reload_replica(destination, &lane.replica_table).await?;
    let own_landed = error.is_none() || lane::has_landed(step, &replica);
    if own_landed {
        lane::record_landed(ctx, lane, destination, following, &landed, replica).await?;
    } else {
        following.replica = replica;
    }
    let mut done = Vec::new();
    for (member, report) in members.iter_mut().zip(reports) {
        let replica = lane::reload_replica(destination, &member.lane.replica_table).await?;
        if error.is_none() || lane::has_landed(&member.step, &replica) {
            let landed =
                Landed { step: &member.step, report, started, transaction: Some(detail.clone()), committed_here };
            member_landed(ctx, member, destination, &landed, &replica).await?;
            done.push(&member.lane);
        }
    }
    // The other lanes stopped here (or will find their part done): they go
    // on with what follows, and record the rest of what they know.
    ask_for_work(ctx, done).await?;
    match error {
        Some(e) if !own_landed => Ok(Together::Attempted(Commit::Reloaded(e))),
        _ => {
            if committed_here {
                count(ctx, destination, "atomic", detail["tables"].as_array().map_or(0, |t| t.len() as u64));
                tracing::info!(transaction = %detail, "replicated a multi-table transaction in one commit");
            }
            Ok(Together::Attempted(Commit::Applied))
        }
    }
}

/// What the destination answered to a multi-table commit.
enum Sent {
    /// Applied.
    Committed,
    /// It does not take multi-table commits (remembered for this destination).
    Unsupported,
    /// Its outcome is unknown, or a requirement refused it: see what is there.
    Unsure(CatalogError),
}

async fn send(
    ctx: &Context,
    lane: &LaneRecord,
    destination: &Destination,
    step: &Step,
    members: &[Member],
) -> Result<Sent, ReplicateError> {
    let mut parts =
        vec![TableCommit { table: &lane.replica_table, requirements: &step.requirements, updates: &step.updates }];
    parts.extend(members.iter().map(|m| TableCommit {
        table: &m.lane.replica_table,
        requirements: &m.step.requirements,
        updates: &m.step.updates,
    }));
    ctx.confirm_lease().await?;
    match destination.catalog.commit_transaction(&parts).await {
        Ok(()) => Ok(Sent::Committed),
        Err(e @ (CatalogError::CommitOutcomeUnknown { .. } | CatalogError::CommitConflict { .. })) => {
            tracing::warn!(error = %e, "reloading the replicas to see what they have");
            Ok(Sent::Unsure(e))
        }
        Err(e) if unsupported(&e) => {
            tracing::warn!(destination = destination.name(), error = %e, "the destination does not take multi-table commits; committing table by table");
            destination.refused_transactions(format!("the catalog refused transactions/commit ({e})"));
            Ok(Sent::Unsupported)
        }
        Err(e) => Err(e.into()),
    }
}

/// Records a member's part as known: audited when this run committed it,
/// its snapshots recorded as icerelay's. What else its lane knows (refs and
/// properties it manages) is left to its own run, which may be running
/// elsewhere: nothing written here can undo what that run writes.
async fn member_landed(
    ctx: &Context,
    member: &Member,
    destination: &Destination,
    landed: &Landed<'_>,
    replica: &crate::catalog::LoadedTable,
) -> Result<(), ReplicateError> {
    lane::audit_landed(ctx, &member.lane, destination, landed, replica);
    let progress = Progress {
        key: member.lane.key.clone(),
        source_metadata_location: None,
        replica_metadata_location: replica.metadata_location.clone(),
        added_snapshots: member.step.snapshots.clone(),
        snapshots_behind: super::plan::snapshots_behind(&member.following.source.metadata, &replica.metadata) as i64,
        mode: None,
        managed_properties: None,
        managed_refs: None,
        source_uuid: None,
        log_drift: None,
    };
    ctx.store.record_progress(progress).await?;
    Ok(())
}

/// Asks `lanes` for work (they run again, and go on from where they are).
async fn ask_for_work<'a>(
    ctx: &Context,
    lanes: impl IntoIterator<Item = &'a LaneRecord>,
) -> Result<(), ReplicateError> {
    let now = now_ms();
    let asks: Vec<LaneChange> = lanes
        .into_iter()
        .map(|l| LaneChange::Touch { key: l.key.clone(), replica_table: l.replica_table.clone(), at: now })
        .collect();
    if !asks.is_empty() {
        ctx.store.apply_lane_changes(asks, Vec::new()).await?;
    }
    Ok(())
}

/// Whether the catalog said it does not take multi-table commits: `405`,
/// `406` (Java's `UnsupportedOperationException`), `501`, or a `404` that is
/// not about a missing table or namespace.
fn unsupported(e: &CatalogError) -> bool {
    match e {
        CatalogError::Status { status, error_type, .. } => match status.as_u16() {
            405 | 406 | 501 => true,
            404 => !error_type.as_deref().is_some_and(|t| t.starts_with("NoSuch")),
            _ => false,
        },
        _ => false,
    }
}

fn same_snapshots(a: &[i64], b: &[i64]) -> bool {
    a.iter().collect::<BTreeSet<_>>() == b.iter().collect::<BTreeSet<_>>()
}

/// Counts `tables` parts of multi-table transactions committed `result`
/// (`atomic` or `table_by_table`).
pub(super) fn count(ctx: &Context, destination: &Destination, result: &'static str, tables: u64) {
    let labels = TransactionLabels { destination: destination.name().to_owned(), result };
    ctx.metrics.transactions.get_or_create(&labels).inc_by(tables);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_the_source_does_not_show_yet_is_waited_for_and_one_it_expired_left_out() {
        let table = TableIdent::new(crate::catalog::Namespace::from_dotted("db"), "b");
        let recorded = 1_000_000;
        assert!(
            matches!(missing_from_source(&table, recorded, recorded + 30), Standing::Behind(why) if why.contains("yet"))
        );
        assert!(matches!(missing_from_source(&table, recorded, recorded + PUBLISHED_WITHIN_MS), Standing::LeftOut));
    }

    #[test]
    fn parts_are_compared_as_sets_of_snapshots() {
        assert!(same_snapshots(&[1, 2], &[2, 1]));
        assert!(!same_snapshots(&[1, 2], &[1]));
        assert!(!same_snapshots(&[], &[1]));
    }

    #[test]
    fn unsupported_means_the_endpoint_not_a_missing_table() {
        let status = |code: u16, kind: Option<&str>| CatalogError::Status {
            catalog: "c".into(),
            operation: "commitTransaction a.x, a.y".into(),
            status: http::StatusCode::from_u16(code).expect("code"),
            error_type: kind.map(str::to_owned),
            message: "m".into(),
        };
        assert!(unsupported(&status(404, None)));
        assert!(unsupported(&status(404, Some("NotFoundException"))));
        assert!(unsupported(&status(406, Some("UnsupportedOperationException"))));
        assert!(unsupported(&status(501, None)));
        assert!(!unsupported(&status(404, Some("NoSuchTableException"))));
        assert!(!unsupported(&status(400, None)));
        assert!(!unsupported(&status(403, None)));
    }
}
