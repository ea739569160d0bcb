//! The replication status API, and pause / resume / resync of a lane.
//!
//! Described in `openapi/admin.yaml`. Everything shown comes from the state
//! store and the destinations' probed capabilities; no credential or secret
//! is part of either, so nothing here can leak one.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::Notify;

use super::AdminState;
use crate::catalog::TableIdent;
use crate::replicate::Context;
use crate::state::{LaneKey, LaneRecord, LaneStatus, Millis, now_ms, rfc3339};

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

fn lane_json(lane: &LaneRecord, now: Millis) -> Value {
    json!({
        "destination": lane.key.destination,
        "replica": {"namespace": lane.replica_table.namespace, "name": lane.replica_table.name},
        "status": lane.status().as_str(),
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
    let destinations: Vec<Value> = admin
        .context
        .destinations
        .values()
        .map(|d| {
            let caps = d.known_capabilities();
            json!({
                "name": d.name(),
                "uri": d.config.uri.as_str(),
                "mode": caps.map(|c| c.mode()),
                "bootstrap": caps.map(|c| c.bootstrap),
            })
        })
        .collect();
    let count = |s: LaneStatus| lanes.iter().filter(|l| l.status() == s).count();
    Json(json!({
        "summary": {
            "tables": lanes.iter().map(|l| &l.key.table).collect::<std::collections::BTreeSet<_>>().len(),
            "lanes": lanes.len(),
            "pending": count(LaneStatus::Pending),
            "completed": count(LaneStatus::Completed),
            "failed": count(LaneStatus::Failed),
            "paused": count(LaneStatus::Paused),
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

/// `POST .../destinations/{destination}/{action}`: `pause`, `resume` or `resync`.
pub async fn act(
    State(state): State<AdminState>,
    Path((namespace, name, destination, action)): Path<(String, String, String, String)>,
) -> Response {
    let Some(admin) = state.replication else { return not_configured() };
    let Some(ident) = table_from_path(&namespace, &name) else {
        return error(StatusCode::BAD_REQUEST, "BadRequest", format!("{namespace:?}.{name:?} is not a table name"));
    };
    let key = LaneKey::new(ident, destination);
    let store = &admin.context.store;
    let done = match action.as_str() {
        "pause" => store.set_paused(&key, true).await,
        "resume" => store.set_paused(&key, false).await,
        "resync" => store.request_resync(&key).await,
        other => {
            return error(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("unknown action {other:?}; expected pause, resume or resync"),
            );
        }
    };
    match done {
        Ok(true) => {
            admin.wake.notify_one();
            match store.lane(&key).await {
                Ok(Some(lane)) => Json(lane_json(&lane, now_ms())).into_response(),
                _ => StatusCode::NO_CONTENT.into_response(),
            }
        }
        Ok(false) => error(StatusCode::NOT_FOUND, "NoSuchTableException", format!("no lane {key}")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "StateUnavailable", e.to_string()),
    }
}
