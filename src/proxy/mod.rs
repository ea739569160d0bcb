//! The catalog proxy: every request under `/v1/` goes to the primary.
//!
//! The request path is a stack of small layers, outermost first:
//!
//! 1. [`router::ClassifyLayer`]: names the REST operation once.
//! 2. request id: sets `X-Request-Id` when absent (it is forwarded upstream
//!    and echoed to the client) and opens the request's tracing span.
//! 3. [`observe::ObserveLayer`]: request counts and latency by route template.
//! 4. [`error::RespondLayer`]: the one place icerelay's own errors become
//!    `ErrorModel` responses (502, 504, 413, 404, 400).
//! 5. [`config_rewrite::ConfigRewriteLayer`]: keeps `GET /v1/config` from
//!    sending clients around the proxy.
//! 6. [`read_only::ReadOnlyLayer`]: refuses writes to read-only replicas
//!    (`read_only_replicas`, on by default).
//! 7. [`commit_tap::CommitTapLayer`]: after a successful commit, records a
//!    change hint per table; never alters the answer.
//! 8. [`upstream::Upstream`]: forwards and streams; refuses dot-segment
//!    paths; with `engine_auth = "sigv4"` re-signs ([`resign`]); cuts off a
//!    stalled answer ([`idle`]).
//!
//! Below the stack, [`conn`] accepts connections (one loop per
//! [`workers`] thread) under a cap and with header and idle timeouts.

pub mod body;
pub mod commit_tap;
pub mod config_rewrite;
pub mod conn;
pub mod error;
pub mod idle;
pub mod observe;
pub mod read_only;
pub mod resign;
pub mod router;
pub mod upstream;
pub mod workers;

use std::sync::Arc;

use axum::Router;
use http::{HeaderName, Request, header};
use reqwest::Url;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, MakeSpan, TraceLayer};
use tracing::{Level, Span};

use crate::metrics::ProxyMetrics;
use commit_tap::{CommitTapLayer, HintSink};
use config_rewrite::ConfigRewriteLayer;
use error::RespondLayer;
use observe::ObserveLayer;
use read_only::{ReadOnlyLayer, ReplicaMarks};
use router::{Classified, ClassifyLayer};
use upstream::Upstream;

/// Settings of the proxy stack that are not the upstream's.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Replaces a server-supplied `uri` in `/v1/config`.
    pub public_url: Option<Url>,
    /// Bound on inspected bodies.
    pub max_body_bytes: u64,
}

/// What the proxy stack is built from besides its settings.
pub struct StackParts {
    /// Where requests go.
    pub upstream: Upstream,
    /// Where commit hints go.
    pub hints: Arc<dyn HintSink>,
    /// Whether writes to read-only replicas are refused, and with whose
    /// credentials marks are read (`Some(None)`: the engine's).
    pub read_only: Option<Option<Arc<dyn ReplicaMarks>>>,
    /// The proxy's metrics.
    pub metrics: Arc<ProxyMetrics>,
}

/// Builds the proxy as an axum router (every path goes to the stack).
pub fn stack(settings: &ProxySettings, parts: StackParts) -> Router {
    let StackParts { upstream, hints, read_only, metrics } = parts;
    let request_id = HeaderName::from_static("x-request-id");
    let service = ServiceBuilder::new()
        .layer(ClassifyLayer)
        .layer(SetRequestIdLayer::new(request_id.clone(), MakeRequestUuid))
        .layer(SetSensitiveRequestHeadersLayer::new([header::AUTHORIZATION, header::COOKIE]))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(RequestSpan)
                .on_request(())
                .on_response(DefaultOnResponse::new().level(Level::DEBUG))
                .on_failure(DefaultOnFailure::new().level(Level::DEBUG)),
        )
        .layer(PropagateRequestIdLayer::new(request_id))
        .layer(ObserveLayer::new(metrics.clone()))
        .layer(RespondLayer)
        .layer(ConfigRewriteLayer::new(settings.public_url.as_ref(), settings.max_body_bytes, upstream.display()))
        .option_layer(read_only.map(|own| ReadOnlyLayer::new(own, settings.max_body_bytes)))
        .layer(CommitTapLayer::new(hints, metrics, settings.max_body_bytes))
        .service(upstream);
    Router::new().fallback_service(service)
}

/// Opens the `request` span: request id, method, operation, and table when
/// the path names one. Headers (and so credentials) are never recorded.
///
/// The span is at DEBUG so that, at the default INFO level, the request path
/// pays nothing for it; the few INFO and WARN events on the request path carry
/// the request id themselves.
#[derive(Debug, Clone, Copy)]
struct RequestSpan;

impl<B> MakeSpan<B> for RequestSpan {
    fn make_span(&mut self, req: &Request<B>) -> Span {
        let request_id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("");
        let classified = req.extensions().get::<Classified>();
        let route = classified.map_or("", |c| c.route);
        let span = tracing::debug_span!(
            "request",
            request_id,
            method = %req.method(),
            operation = route,
            table = tracing::field::Empty
        );
        if let Some(table) = classified.and_then(|c| c.operation.table()) {
            span.record("table", tracing::field::display(table));
        }
        span
    }
}
