//! icerelay's own proxy errors, and the one place they become responses.
//!
//! Upstream answers, error bodies included, never pass through here: they
//! reach the client byte for byte. This module covers only what icerelay
//! itself refuses or cannot do (upstream unreachable or too slow, a body over
//! the bound, a path outside the REST API). Each becomes an Iceberg REST
//! `ErrorModel` (`{"error": {"message", "type", "code"}}`) so engines show
//! the message the way they show any catalog error. The message says what
//! failed, where, and what to do; it never carries a credential.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, Request, StatusCode, header};
use serde::Serialize;
use tower::{Layer, Service};

/// Errors icerelay answers itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No connection to the primary could be made.
    #[error(
        "icerelay cannot reach the primary catalog at {upstream}: {cause}. Check that it is running and that [primary] uri (or --upstream) is right"
    )]
    UpstreamUnreachable {
        /// Upstream base URL (no credentials).
        upstream: String,
        /// Root cause, e.g. `Connection refused (os error 111)`.
        cause: String,
    },
    /// The primary did not start answering in time.
    #[error("the primary catalog at {upstream} did not answer within {}; raise [primary] request_timeout if it is just slow", humantime::format_duration(*.timeout))]
    UpstreamTimeout {
        /// Upstream base URL.
        upstream: String,
        /// The configured timeout.
        timeout: Duration,
    },
    /// The connection broke while sending the request or reading the answer's head.
    #[error("the exchange with the primary catalog at {upstream} failed: {cause}")]
    UpstreamFailed {
        /// Upstream base URL.
        upstream: String,
        /// Root cause.
        cause: String,
    },
    /// A body icerelay must inspect is larger than its bound.
    #[error(
        "the request body is larger than {limit} bytes, the limit for {operation} requests icerelay inspects; raise max_body_bytes in the configuration to allow it"
    )]
    BodyTooLarge {
        /// The bound.
        limit: u64,
        /// The operation, e.g. `commitTransaction`.
        operation: &'static str,
    },
    /// The primary's `/v1/config` answer is larger than the bound.
    #[error("the /v1/config answer of the primary catalog at {upstream} is larger than {limit} bytes (max_body_bytes)")]
    ConfigTooLarge {
        /// Upstream base URL.
        upstream: String,
        /// The bound.
        limit: u64,
    },
    /// The client's request body could not be read.
    #[error("the request body could not be read: {cause}")]
    ClientBody {
        /// Root cause.
        cause: String,
    },
    /// The path has `.` or `..` segments, which could reach outside the catalog's API.
    #[error(
        "the request path {path} has a `.` or `..` segment (raw or percent-encoded); icerelay refuses such paths \
         because the primary could resolve them to an address outside its REST API: send the path without them"
    )]
    DotSegment {
        /// The path as received.
        path: String,
    },
    /// icerelay could not sign a request it forwards (`engine_auth = "sigv4"`).
    #[error("icerelay cannot sign the request for the primary catalog: {cause}")]
    Signing {
        /// Why (names the signing name and key id, never the secret).
        cause: String,
    },
    /// The write names a read-only replica.
    #[error(
        "{table} is a read-only replica of {mark}: icerelay keeps it equal to its source and refuses writes that \
         would make it diverge (nothing was sent to the catalog). Write to the source instead; to make this table \
         writable (failover), promote it on the icerelay that replicates it: {}",
        crate::replicate::mark::promote_hint(.mark)
    )]
    ReadOnlyReplica {
        /// The table written to.
        table: String,
        /// Its read-only mark: what it replicates.
        mark: String,
    },
    /// Whether a written table is a read-only replica could not be checked.
    #[error(
        "icerelay could not check whether {table} is a read-only replica before forwarding the write, so it did not \
         forward it; the reason is in icerelay's log (its operator can fix [primary] auth, or set \
         read_only_replicas = false)"
    )]
    ReplicaCheck {
        /// The table written to.
        table: String,
    },
    /// A write's body does not say which tables it changes.
    #[error(
        "icerelay cannot read which tables this {operation} request changes (its body is not the JSON the REST \
         spec describes, or has duplicate keys), so it cannot check that none is a read-only replica: send a valid body"
    )]
    UnreadableWrite {
        /// The operation.
        operation: &'static str,
    },
    /// A write names more tables than icerelay checks for the read-only mark.
    #[error(
        "this {operation} request changes {tables} tables; icerelay checks at most {limit} tables of one request for \
         the read-only replica mark (read_only_replicas): split it into smaller transactions"
    )]
    TooManyTables {
        /// The operation.
        operation: &'static str,
        /// How many distinct tables it names.
        tables: usize,
        /// The most icerelay checks.
        limit: usize,
    },
    /// icerelay is shutting down: the request's work was cancelled.
    #[error("icerelay is shutting down and did not finish this request; send it again (to another instance)")]
    ShuttingDown,
    /// The path is not part of the Iceberg REST API.
    #[error(
        "{path} is not an Iceberg REST catalog path; icerelay serves the API under /v1/ (health and metrics are on the admin listener)"
    )]
    NotIceberg {
        /// The path as received.
        path: String,
    },
}

impl ProxyError {
    /// The HTTP status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::UpstreamUnreachable { .. }
            | Self::UpstreamFailed { .. }
            | Self::ConfigTooLarge { .. }
            | Self::Signing { .. } => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::ClientBody { .. }
            | Self::DotSegment { .. }
            | Self::UnreadableWrite { .. }
            | Self::TooManyTables { .. } => StatusCode::BAD_REQUEST,
            Self::NotIceberg { .. } => StatusCode::NOT_FOUND,
            Self::ReadOnlyReplica { .. } => StatusCode::FORBIDDEN,
            Self::ReplicaCheck { .. } | Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `type` of the `ErrorModel`, named like the Java exceptions engines know.
    fn error_type(&self) -> &'static str {
        match self {
            Self::UpstreamUnreachable { .. }
            | Self::UpstreamFailed { .. }
            | Self::ConfigTooLarge { .. }
            | Self::Signing { .. } => "BadGatewayException",
            Self::UpstreamTimeout { .. } => "GatewayTimeoutException",
            Self::BodyTooLarge { .. } => "RequestTooLargeException",
            Self::ClientBody { .. }
            | Self::DotSegment { .. }
            | Self::UnreadableWrite { .. }
            | Self::TooManyTables { .. } => "BadRequestException",
            Self::NotIceberg { .. } => "NotFoundException",
            Self::ReadOnlyReplica { .. } => "ForbiddenException",
            Self::ReplicaCheck { .. } | Self::ShuttingDown => "ServiceUnavailableException",
        }
    }

    /// Short name of the kind, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::UpstreamUnreachable { .. } => "unreachable",
            Self::UpstreamTimeout { .. } => "timeout",
            Self::UpstreamFailed { .. } => "failed",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::ConfigTooLarge { .. } => "config_too_large",
            Self::ClientBody { .. } => "client_body",
            Self::DotSegment { .. } => "dot_segment",
            Self::Signing { .. } => "signing",
            Self::NotIceberg { .. } => "not_iceberg",
            Self::ReadOnlyReplica { .. } => "read_only_replica",
            Self::ReplicaCheck { .. } => "replica_check",
            Self::UnreadableWrite { .. } => "unreadable_write",
            Self::TooManyTables { .. } => "too_many_tables",
            Self::ShuttingDown => "shutting_down",
        }
    }

    /// Whether the error concerns the primary (as opposed to the client's request).
    pub fn is_upstream(&self) -> bool {
        matches!(
            self,
            Self::UpstreamUnreachable { .. }
                | Self::UpstreamTimeout { .. }
                | Self::UpstreamFailed { .. }
                | Self::ConfigTooLarge { .. }
        )
    }
}

/// The Iceberg REST error body.
#[derive(Debug, Serialize)]
struct ErrorResponse<'a> {
    error: ErrorModel<'a>,
}

#[derive(Debug, Serialize)]
struct ErrorModel<'a> {
    message: &'a str,
    r#type: &'a str,
    code: u16,
}

/// Builds the `ErrorModel` response for an error; `request_id` is appended to
/// the message so a user can find the matching log line.
pub fn error_response(error: &ProxyError, request_id: Option<&str>) -> Response {
    let status = error.status();
    let mut message = error.to_string();
    if let Some(id) = request_id {
        message.push_str(&format!(" (request id {id})"));
    }
    let body =
        ErrorResponse { error: ErrorModel { message: &message, r#type: error.error_type(), code: status.as_u16() } };
    let json = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(Body::from(json));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        error_response(&self, None)
    }
}

// === impl RespondLayer ===

/// Turns a `ProxyError` from the inner stack into its response, logging it.
#[derive(Debug, Clone, Copy, Default)]
pub struct RespondLayer;

impl<S> Layer<S> for RespondLayer {
    type Service = Respond<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Respond { inner }
    }
}

/// The service built by [`RespondLayer`].
#[derive(Debug, Clone)]
pub struct Respond<S> {
    inner: S,
}

impl<S> Service<Request<Body>> for Respond<S>
where
    S: Service<Request<Body>, Response = Response, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Our inner services are always ready; an error here would be a bug,
        // and it is answered per request in `call` instead.
        let _ = self.inner.poll_ready(cx);
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let request_id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let future = self.inner.call(req);
        Box::pin(async move {
            match future.await {
                Ok(response) => Ok(response),
                Err(error) => {
                    let id = request_id.as_deref().unwrap_or("");
                    if error.is_upstream() {
                        tracing::warn!(request_id = id, error = %error, kind = error.kind(), "answering with an error of icerelay's own");
                    } else {
                        tracing::info!(request_id = id, error = %error, kind = error.kind(), "refusing request");
                    }
                    let mut response = error_response(&error, request_id.as_deref());
                    response.extensions_mut().insert(ProxyErrorKind(error.kind()));
                    Ok(response)
                }
            }
        })
    }
}

/// Marks a response icerelay generated itself, for the metrics layer.
#[derive(Debug, Clone, Copy)]
pub struct ProxyErrorKind(pub &'static str);

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn error_model_body() {
        let e = ProxyError::UpstreamTimeout { upstream: "http://h:1".into(), timeout: Duration::from_secs(3) };
        let response = error_response(&e, Some("abc"));
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(v["error"]["code"], 504);
        assert_eq!(v["error"]["type"], "GatewayTimeoutException");
        let message = v["error"]["message"].as_str().expect("message");
        assert!(message.contains("http://h:1") && message.contains("3s") && message.ends_with("(request id abc)"));
    }
}
