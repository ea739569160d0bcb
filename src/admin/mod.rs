//! The admin listener: health, readiness, metrics and replication status, on its own address.
//!
//! Kept apart from the proxy listener so that engines, which only know the
//! catalog URL, never reach it, and so that operators can bind it to an
//! internal interface.

mod guard;
mod health;
pub mod replication;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};

use crate::catalog::RestCatalog;
use crate::config::AdminAccess;
use crate::metrics::Metrics;

/// What the admin handlers read.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// The registry rendered at `/metrics`.
    pub metrics: Arc<Metrics>,
    /// The primary, probed by `/readyz`.
    pub primary: Arc<RestCatalog>,
    /// Replication, when configured.
    pub replication: Option<replication::ReplicationAdmin>,
}

/// The admin API, guarded by `access` (see [`guard`]).
pub fn router(state: AdminState, access: AdminAccess) -> Router {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(metrics))
        .route("/v1/replication/status", get(replication::status))
        .route("/v1/replication/namespaces/{namespace}/tables/{table}", get(replication::table))
        .route(
            "/v1/replication/namespaces/{namespace}/tables/{table}/destinations/{destination}/{action}",
            post(replication::act),
        )
        .route("/v1/replication/destinations/{destination}/promote", post(replication::promote_destination))
        .route("/v1/replication/audit", get(replication::audit))
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(access, guard::guard))
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.encode())
}
