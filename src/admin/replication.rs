//! The replication status API, and pause / resume / resync of a lane.
//!
//! Described in `openapi/admin.yaml`. Everything shown comes from the state
//! store and the destinations' probed capabilities; no credential or secret
//! is part of either, so nothing here can leak one.

use std::collections::BTreeMap;
use std::sync::Arc;

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Notify;

use super::AdminState;
use crate::audit::{Action, Event, Query as AuditQuery};
use crate::catalog::TableIdent;
use crate::replicate::Context;
use crate::state::{FailbackChoice, LaneKey, LaneRecord, LaneStatus, Millis, PromotionMode, now_ms, rfc3339};

/// What the replication endpoints read.
#[derive(Clone)]
pub struct ReplicationAdmin {
    /// The engine's shared context.
    pub context: Arc<Context>,
    /// Wakes the scheduler after an operator action.
    pub wake: Arc<Notify>,
}

impl std::fmt::Debug for ReplicationAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplicationAdmin")
    }
}

fn error(status: StatusCode, kind: &str, message: String) -> Response {
    (status, Json(json!({"error": {"message": message, "type": kind, "code": status.as_u16()}}))).into_response()
}

fn not_configured() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "NotConfigured",
        "replication is not configured: add [[destinations]] and [[rules]] to the configuration".into(),
    )
}

fn promotion_json(lane: &LaneRecord) -> Value {
    match &lane.promoted {
        Some(p) => json!({
            "promoted_at": rfc3339(p.at),
            "recovery_point": p.recovery_point.map(|id| json!({
                "snapshot_id": id,
                "timestamp": p.recovery_point_at.map(rfc3339),
            })),
            "missed_snapshots": p.missed_snapshots,
            "source_answered": p.source_answered,
            "replica_metadata_location": p.metadata_location,
        }),
        None => Value::Null,
    }
}

fn lane_json(lane: &LaneRecord, now: Millis) -> Value {
    json!({
        "promotion": promotion_json(lane),
        "adoption": lane.adoption.as_ref().map(|a| json!({
            "common_ancestor": a.common_ancestor,
            "unreplicated_snapshots": a.unreplicated,
            "kept_branch": a.kept_branch.as_ref().map(|(name, id)| json!({"name": name, "snapshot_id": id})),
            "sequence_shift": a.sequence_shift.map(|s| json!({"above": s.above, "by": s.by})),
        })),
        "failback_requested": lane.failback.is_some(),
        "snapshot_log_drift": lane.log_drift.map(|d| json!({"entries": d.entries, "max_ms": d.max_ms})),
        "promotion_requested": lane.promotion.map(|m| m.as_str()),
        "destination": lane.key.destination,
        "replica": {"namespace": lane.replica_table.namespace, "name": lane.replica_table.name},
        "status": lane.status().as_str(),
        "waiting_for": lane.waiting_for,
        "mode": lane.mode,
        "last_success_at": lane.last_success_at.map(rfc3339),
        "source_metadata_location": lane.source_metadata_location,
        "replica_metadata_location": lane.replica_metadata_location,
        "snapshots_behind": lane.snapshots_behind.unwrap_or(0),
        "seconds_behind": lane.seconds_behind(now),
        "source_dropped": lane.source_dropped,
        "last_error": lane.last_error.as_ref().map(|e| json!({
            "message": e.message, "at": rfc3339(e.at), "attempts": e.attempts, "waits_for_operator": e.parked,
        })),
    })
}

fn tables_json(lanes: &[LaneRecord]) -> Vec<Value> {
    let now = now_ms();
    let mut by_table: BTreeMap<&TableIdent, Vec<Value>> = BTreeMap::new();
    for lane in lanes {
        by_table.entry(&lane.key.table).or_default().push(lane_json(lane, now));
    }
    by_table
        .into_iter()
        .map(|(t, destinations)| json!({"namespace": t.namespace, "table": t.name, "destinations": destinations}))
        .collect()
}

/// `GET /v1/replication/status`: every replicated table and destination.
pub async fn status(State(state): State<AdminState>) -> Response {
    let Some(admin) = state.replication else { return not_configured() };
    let lanes = match admin.context.store.lanes().await {
        Ok(l) => l,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, "StateUnavailable", e.to_string()),
    };
    // Asked side by side: a destination that does not answer costs the answer one second, not one each.
    let destinations: Vec<Value> = futures::future::join_all(admin.context.destinations.values().map(|d| async {
        let caps = d.recorded_capabilities(&admin.context.store).await;
        json!({
            "name": d.name(),
            "uri": d.config.uri.as_str(),
            "mode": caps.as_ref().map(|c| c.mode()),
            "bootstrap": caps.as_ref().map(|c| c.bootstrap),
            "multi_table_commits": d.multi_table_commits_now().await.map(|m| m.to_string()),
        })
    }))
    .await;
    let count = |s: LaneStatus| lanes.iter().filter(|l| l.status() == s).count();
    Json(json!({
        "summary": {
            "tables": lanes.iter().map(|l| &l.key.table).collect::<std::collections::BTreeSet<_>>().len(),
            "lanes": lanes.len(),
            "pending": count(LaneStatus::Pending),
            "completed": count(LaneStatus::Completed),
            "failed": count(LaneStatus::Failed),
            "paused": count(LaneStatus::Paused),
            "promoted": count(LaneStatus::Promoted),
            "waiting": count(LaneStatus::Waiting),
        },
        "destinations": destinations,
        "tables": tables_json(&lanes),
    }))
    .into_response()
}

fn table_from_path(namespace: &str, table: &str) -> Option<TableIdent> {
    // The path's segments arrive percent-decoded; a namespace's levels are
    // joined by the unit separator (as in the REST spec) or by dots.
    let levels: Vec<String> = if namespace.contains('\u{1f}') {
        namespace.split('\u{1f}').map(str::to_owned).collect()
    } else {
        namespace.split('.').map(str::to_owned).collect()
    };
    (!levels.iter().any(String::is_empty) && !table.is_empty())
        .then(|| TableIdent::new(crate::catalog::Namespace::new(levels), table))
}

/// `GET /v1/replication/namespaces/{namespace}/tables/{table}`: one table, per destination.
pub async fn table(State(state): State<AdminState>, Path((namespace, name)): Path<(String, String)>) -> Response {
    let Some(admin) = state.replication else { return not_configured() };
    let Some(ident) = table_from_path(&namespace, &name) else {
        return error(StatusCode::BAD_REQUEST, "BadRequest", format!("{namespace:?}.{name:?} is not a table name"));
    };
    let lanes = match admin.context.store.lanes().await {
        Ok(l) => l,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, "StateUnavailable", e.to_string()),
    };
    let mine: Vec<LaneRecord> = lanes.into_iter().filter(|l| l.key.table == ident).collect();
    match tables_json(&mine).into_iter().next() {
        Some(t) => Json(t).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "NoSuchTableException",
            format!("{ident} is not replicated (no rule covers it, or it was not seen yet)"),
        ),
    }
}

/// `POST .../destinations/{destination}/{action}`: `pause`, `resume`, `resync` or `promote`.
pub async fn act(
    State(state): State<AdminState>,
    Path((namespace, name, destination, action)): Path<(String, String, String, String)>,
    body: Bytes,
) -> Response {
    let Some(admin) = state.replication else { return not_configured() };
    let Some(ident) = table_from_path(&namespace, &name) else {
        return error(StatusCode::BAD_REQUEST, "BadRequest", format!("{namespace:?}.{name:?} is not a table name"));
    };
    let key = LaneKey::new(ident, destination);
    let store = &admin.context.store;
    if let Ok(Some(lane)) = store.lane(&key).await
        && lane.promoted.is_some()
        && action != "promote"
    {
        return promoted_conflict(&key);
    }
    let (done, audited) = match action.as_str() {
        "pause" => (store.set_paused(&key, true).await, Action::Pause),
        "resume" => (store.set_paused(&key, false).await, Action::Resume),
        "resync" => (store.request_resync(&key).await, Action::Resync),
        "promote" => {
            let options = match PromoteOptions::parse(&body) {
                Ok(o) => o,
                Err(message) => return error(StatusCode::BAD_REQUEST, "BadRequest", message),
            };
            return promote_one(&admin, key, options).await;
        }
        "failback" => {
            let choice = match failback_choice(&body) {
                Ok(choice) => choice,
                Err(message) => return error(StatusCode::BAD_REQUEST, "BadRequest", message),
            };
            // A choice only answers a lane whose replica table existed before it.
            if let Ok(Some(lane)) = store.lane(&key).await
                && (lane.adoption.is_some() || lane.replica_metadata_location.is_some())
            {
                return error(
                    StatusCode::CONFLICT,
                    "FailbackNotApplicable",
                    format!(
                        "{key} does not wait for a failback choice: its replica is {} (icerelay status shows why a \
                         lane stopped)",
                        if lane.adoption.is_some() { "adopted already" } else { "one icerelay made or follows" }
                    ),
                );
            }
            (store.request_failback(&key, choice).await, Action::Failback)
        }
        other => {
            return error(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("unknown action {other:?}; expected pause, resume, resync, promote or failback"),
            );
        }
    };
    match done {
        Ok(true) => {
            admin.context.audit.record(Event::ok(audited, &key));
            admin.wake.notify_one();
            match store.lane(&key).await {
                Ok(Some(lane)) => Json(lane_json(&lane, now_ms())).into_response(),
                _ => StatusCode::NO_CONTENT.into_response(),
            }
        }
        // Promoted between the check above and the change (which leaves a
        // promoted lane alone), or no such lane.
        Ok(false) => match store.lane(&key).await {
            Ok(Some(lane)) if lane.promoted.is_some() => promoted_conflict(&key),
            _ => error(StatusCode::NOT_FOUND, "NoSuchTableException", format!("no lane {key}")),
        },
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "StateUnavailable", e.to_string()),
    }
}

fn promoted_conflict(key: &LaneKey) -> Response {
    error(
        StatusCode::CONFLICT,
        "PromotedException",
        format!("{key} was promoted: the replica is a table of its own and the lane does not run any more"),
    )
}

/// The options of a promotion request (its JSON body).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PromoteOptions {
    /// Promote the replica as it is, without replicating what the source still has.
    #[serde(default)]
    now: bool,
    /// How long to wait for the lane (draining included). Default 60.
    timeout_seconds: Option<u64>,
    /// Destination-wide requests only: just this namespace.
    namespace: Option<Vec<String>>,
}

impl PromoteOptions {
    fn parse(body: &[u8]) -> Result<Self, String> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self::default());
        }
        serde_json::from_slice(body).map_err(|e| {
            format!("the promote request body is not valid: {e}; expected {{\"now\": bool, \"timeout_seconds\": int}}")
        })
    }

    fn mode(&self) -> PromotionMode {
        if self.now { PromotionMode::Now } else { PromotionMode::Drain }
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_seconds.unwrap_or(60).clamp(1, 3600))
    }
}

/// How much longer a promotion the lane already began gets to finish.
const CLAIMED_GRACE: Duration = Duration::from_secs(30);

/// How a lane's promotion ended.
enum Promoted {
    Done(LaneRecord),
    TimedOut(Option<LaneRecord>),
    /// The lane withdrew the request itself (nothing to promote): why is its last error.
    Withdrawn(LaneRecord),
}

/// Asks each lane for promotion and waits for all of them (bounded); a lane
/// that did not promote in time has its request withdrawn.
async fn promote_lanes(
    admin: &ReplicationAdmin,
    keys: Vec<LaneKey>,
    options: &PromoteOptions,
) -> Result<Vec<(LaneKey, Promoted)>, Response> {
    let store = &admin.context.store;
    // The request expires with the wait: a promotion nobody waits for any
    // more (the operator pressed Ctrl-C, icerelay restarted) is not carried
    // out later by surprise.
    let expires = now_ms() + i64::try_from(options.timeout().as_millis()).unwrap_or(i64::MAX);
    for key in &keys {
        match store.request_promotion(key, options.mode(), expires).await {
            Ok(true) => {}
            Ok(false) => return Err(error(StatusCode::NOT_FOUND, "NoSuchTableException", format!("no lane {key}"))),
            Err(e) => return Err(error(StatusCode::SERVICE_UNAVAILABLE, "StateUnavailable", e.to_string())),
        }
    }
    admin.wake.notify_one();
    let deadline = tokio::time::Instant::now() + options.timeout();
    let mut waiting = keys;
    let mut outcomes = Vec::new();
    loop {
        let mut still = Vec::new();
        for key in waiting {
            match store.lane(&key).await {
                Ok(Some(lane)) if lane.promoted.is_some() => outcomes.push((key, Promoted::Done(lane))),
                // Gone before it expired: the lane withdrew it (nothing to
                // promote). A run also drops it once it expires, which is
                // the timeout below, not a refusal.
                Ok(Some(lane)) if lane.promotion.is_none() && now_ms() <= expires => {
                    outcomes.push((key, Promoted::Withdrawn(lane)));
                }
                Ok(_) => still.push(key),
                Err(e) => return Err(error(StatusCode::SERVICE_UNAVAILABLE, "StateUnavailable", e.to_string())),
            }
        }
        waiting = still;
        if waiting.is_empty() || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for key in waiting {
        // A claimed promotion is under way and cannot be withdrawn: give it a
        // little longer to finish.
        let claimed = !matches!(store.withdraw_promotion(&key).await, Ok(true));
        let finish_by = tokio::time::Instant::now() + if claimed { CLAIMED_GRACE } else { Duration::ZERO };
        let lane = loop {
            let lane = store.lane(&key).await.ok().flatten();
            if lane.as_ref().is_some_and(|l| l.promoted.is_some()) || tokio::time::Instant::now() >= finish_by {
                break lane;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        match lane {
            Some(lane) if lane.promoted.is_some() => outcomes.push((key, Promoted::Done(lane))),
            other => outcomes.push((key, Promoted::TimedOut(other))),
        }
    }
    admin.wake.notify_one();
    Ok(outcomes)
}

fn timed_out_message(key: &LaneKey, lane: Option<&LaneRecord>, options: &PromoteOptions) -> String {
    let cause = lane
        .and_then(|l| l.last_error.as_ref())
        .map_or_else(String::new, |e| format!(" (the lane's last error: {})", e.message));
    if lane.is_some_and(|l| l.promotion.is_some()) {
        format!(
            "{key}: the promotion began and has not finished yet{cause}; the lane carries it out (icerelay status \
             shows `promoted` when it is done)"
        )
    } else if options.now {
        format!(
            "{key} was not promoted within {}s{cause}; the request was withdrawn and the replica is still a replica",
            options.timeout().as_secs()
        )
    } else {
        format!(
            "{key} was not promoted: the lane did not finish replicating what the source serves within {}s{cause}. \
             If the source is gone, promote the replica as it is with now = true (icerelay promote --now)",
            options.timeout().as_secs()
        )
    }
}

fn withdrawn_message(key: &LaneKey, lane: &LaneRecord) -> String {
    let cause = lane.last_error.as_ref().map_or("no reason recorded", |e| e.message.as_str());
    format!("{key} was not promoted: {cause}")
}

async fn promote_one(admin: &ReplicationAdmin, key: LaneKey, options: PromoteOptions) -> Response {
    if options.namespace.is_some() {
        return error(StatusCode::BAD_REQUEST, "BadRequest", "`namespace` is for destination-wide promotions".into());
    }
    let outcomes = match promote_lanes(admin, vec![key], &options).await {
        Ok(o) => o,
        Err(response) => return response,
    };
    match outcomes.into_iter().next() {
        Some((_, Promoted::Done(lane))) => Json(lane_json(&lane, now_ms())).into_response(),
        Some((key, Promoted::TimedOut(lane))) => {
            error(StatusCode::GATEWAY_TIMEOUT, "PromotionTimeout", timed_out_message(&key, lane.as_ref(), &options))
        }
        Some((key, Promoted::Withdrawn(lane))) => {
            error(StatusCode::CONFLICT, "PromotionRefused", withdrawn_message(&key, &lane))
        }
        None => StatusCode::NO_CONTENT.into_response(),
    }
}

/// `POST /v1/replication/destinations/{destination}/promote`: every lane of a
/// destination (or of one namespace in it).
pub async fn promote_destination(
    State(state): State<AdminState>,
    Path(destination): Path<String>,
    body: Bytes,
) -> Response {
    let Some(admin) = state.replication else { return not_configured() };
    if !admin.context.destinations.contains_key(&destination) {
        return error(StatusCode::NOT_FOUND, "NotFound", format!("no destination {destination:?} is configured"));
    }
    let options = match PromoteOptions::parse(&body) {
        Ok(o) => o,
        Err(message) => return error(StatusCode::BAD_REQUEST, "BadRequest", message),
    };
    let lanes = match admin.context.store.lanes().await {
        Ok(l) => l,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, "StateUnavailable", e.to_string()),
    };
    let keys: Vec<LaneKey> = lanes
        .iter()
        .filter(|l| l.key.destination == destination && l.promoted.is_none())
        .filter(|l| options.namespace.as_ref().is_none_or(|ns| l.key.table.namespace.levels() == ns.as_slice()))
        .map(|l| l.key.clone())
        .collect();
    let outcomes = match promote_lanes(&admin, keys, &options).await {
        Ok(o) => o,
        Err(response) => return response,
    };
    let now = now_ms();
    let mut promoted = Vec::new();
    let mut failed = Vec::new();
    for (key, outcome) in outcomes {
        match outcome {
            Promoted::Done(lane) => promoted.push(json!({
                "namespace": key.table.namespace, "table": key.table.name, "lane": lane_json(&lane, now),
            })),
            Promoted::TimedOut(lane) => failed.push(json!({
                "namespace": key.table.namespace, "table": key.table.name,
                "message": timed_out_message(&key, lane.as_ref(), &options),
            })),
            Promoted::Withdrawn(lane) => failed.push(json!({
                "namespace": key.table.namespace, "table": key.table.name,
                "message": withdrawn_message(&key, &lane),
            })),
        }
    }
    let status = if failed.is_empty() { StatusCode::OK } else { StatusCode::GATEWAY_TIMEOUT };
    (status, Json(json!({"destination": destination, "promoted": promoted, "not_promoted": failed}))).into_response()
}

/// The query of `GET /v1/replication/audit`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    table: Option<String>,
    since: Option<String>,
    skip: Option<usize>,
    limit: Option<usize>,
}

/// `GET /v1/replication/audit?table=&since=&skip=&limit=`: audit lines, oldest first.
pub async fn audit(State(state): State<AdminState>, params: Result<Query<AuditParams>, QueryRejection>) -> Response {
    let Some(admin) = state.replication else { return not_configured() };
    let Query(params) = match params {
        Ok(params) => params,
        Err(rejected) => {
            return error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("{}; the parameters are table, since, skip and limit", rejected.body_text()),
            );
        }
    };
    let since = match params.since.as_deref() {
        None => None,
        Some(text) => match crate::audit::parse_time(text) {
            Some(at) => Some(at),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    format!("since={text:?} is not an RFC 3339 time (e.g. 2026-12-01T19:31:44.979Z)"),
                );
            }
        },
    };
    let query = AuditQuery {
        table: params.table,
        since,
        skip: params.skip.unwrap_or(0),
        limit: params.limit.unwrap_or(1000).clamp(1, 10_000),
    };
    let log = admin.context.audit.clone();
    match tokio::task::spawn_blocking(move || log.read(&query)).await {
        Ok(Ok(page)) => Json(json!({
            "entries": page.entries,
            "next_since": page.next_since,
            "next_skip": page.next_skip,
            "dropped": admin.context.audit.dropped(),
        }))
        .into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, "AuditUnavailable", e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "AuditUnavailable", e.to_string()),
    }
}

/// The body of a failback request: exactly one of the two choices.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FailbackBody {
    keep_unreplicated_as_branch: Option<String>,
    #[serde(default)]
    continue_from_common_ancestor: bool,
}

fn failback_choice(body: &[u8]) -> Result<FailbackChoice, String> {
    let expected = "expected {\"keep_unreplicated_as_branch\": \"NAME\"} or {\"continue_from_common_ancestor\": true}";
    let parsed: FailbackBody =
        serde_json::from_slice(body).map_err(|e| format!("the failback request body is not valid: {e}; {expected}"))?;
    match (parsed.keep_unreplicated_as_branch, parsed.continue_from_common_ancestor) {
        (Some(name), false) if !name.trim().is_empty() => Ok(FailbackChoice { keep_branch: Some(name) }),
        (None, true) => Ok(FailbackChoice { keep_branch: None }),
        _ => Err(format!("choose exactly one: {expected}")),
    }
}
