//! `/healthz` (the process is up) and `/readyz` (the primary is reachable,
//! and whether the replication state store answers).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::json;

use super::AdminState;

/// Always 200 while the process serves requests.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// 200 when the primary answers HTTP (any status below 500), else 503 with the reason.
///
/// A 401 or 403 still means reachable: engines bring their own credentials.
/// The status is reported so an operator can see that icerelay's own
/// credentials are refused.
///
/// With replication on, the body also says whether the state store answers
/// (`state.reachable`). It does not change the status: without the store
/// the proxy still serves every request (hints are counted as failed and
/// reconcile heals them), so taking the instance out of service would turn
/// a replication delay into an outage for engines.
pub async fn readyz(State(state): State<AdminState>) -> (StatusCode, Json<serde_json::Value>) {
    let (status, mut body) = primary_readiness(&state).await;
    if let (Some(replication), Some(fields)) = (&state.replication, body.as_object_mut()) {
        let store = &replication.context.store;
        let reachable = store.ping().await;
        let mut report = json!({"store": store.describe(), "reachable": reachable.is_ok()});
        if let (Err(e), Some(r)) = (reachable, report.as_object_mut()) {
            r.insert("error".into(), json!(e.to_string()));
        }
        fields.insert("state".into(), report);
    }
    (status, Json(body))
}

async fn primary_readiness(state: &AdminState) -> (StatusCode, serde_json::Value) {
    match state.primary.probe().await {
        Ok(status) if !status.is_server_error() => (
            StatusCode::OK,
            json!({"status": "ready", "primary": {"reachable": true, "config_status": status.as_u16()}}),
        ),
        Ok(status) => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "not ready", "primary": {"reachable": true, "config_status": status.as_u16(),
                "error": format!("the primary answered GET /v1/config with {status}")}}),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "not ready", "primary": {"reachable": false, "error": e.to_string()}}),
        ),
    }
}
