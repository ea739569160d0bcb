//! `/healthz` (the process is up) and `/readyz` (the primary is reachable).

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
pub async fn readyz(State(state): State<AdminState>) -> (StatusCode, Json<serde_json::Value>) {
    match state.primary.probe().await {
        Ok(status) if !status.is_server_error() => (
            StatusCode::OK,
            Json(json!({"status": "ready", "primary": {"reachable": true, "config_status": status.as_u16()}})),
        ),
        Ok(status) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "primary": {"reachable": true, "config_status": status.as_u16(),
                "error": format!("the primary answered GET /v1/config with {status}")}})),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "primary": {"reachable": false, "error": e.to_string()}})),
        ),
    }
}
