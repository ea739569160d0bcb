//! Forwards a request to the primary catalog and streams its answer back.
//!
//! This is the innermost service of the proxy stack. The request goes out
//! with its method, path and query exactly as received (percent-encoded
//! namespace separators such as `%1F` stay encoded), its headers minus the
//! hop-by-hop ones (RFC 9110 §7.6.1), and its body streamed, not buffered.
//! The answer comes back the same way: status, headers and body unchanged.
//! Connections to the primary are pooled and kept alive.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures::{FutureExt, StreamExt};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderName, Request, Uri, Version, header};
use http_body::Frame;
use http_body_util::{BodyExt, BodyStream, StreamBody};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use reqwest::Url;
use tower::Service;

use super::error::ProxyError;
use super::idle::{IdleTimeout, Stalled};
use super::router::{Classified, Operation};
use crate::catalog::sigv4::Signer;

/// Connection settings for the primary.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// Base URI of the primary, without `/v1`.
    pub uri: Url,
    /// TCP/TLS connect timeout.
    pub connect_timeout: Duration,
    /// Time until the answer's head arrives.
    pub request_timeout: Duration,
    /// Longest pause between two chunks of a streamed answer.
    pub body_idle_timeout: Duration,
    /// Idle time before a pooled connection is closed.
    pub pool_idle_timeout: Duration,
    /// Idle connections kept per host.
    pub pool_max_idle_per_host: usize,
    /// With `engine_auth = "sigv4"`: the signer (icerelay's credentials)
    /// that replaces the engine's credentials on every forwarded request,
    /// shared by all workers.
    pub resign: Option<Arc<Signer>>,
    /// Bound on the bodies read whole to be signed.
    pub max_body_bytes: u64,
    /// TLS for an `https` primary: the roots it trusts (see [`crate::tls::client_config`]).
    pub tls: Arc<rustls::ClientConfig>,
}

/// Why an [`Upstream`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The URI cannot be used for requests.
    #[error("the primary's uri {uri} cannot be used: {reason}")]
    InvalidUri {
        /// The URI.
        uri: String,
        /// Why.
        reason: String,
    },
}

/// The primary catalog, as a `tower::Service`.
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client<HttpsConnector<HttpConnector>, Body>,
    scheme: Scheme,
    authority: Authority,
    /// Base path of the primary's URI without a trailing slash (often empty).
    base_path: String,
    /// `scheme://host:port/base` for messages.
    display: String,
    request_timeout: Duration,
    body_idle_timeout: Duration,
    signer: Option<Arc<Signer>>,
    max_body_bytes: u64,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").field("uri", &self.inner.display).finish()
    }
}

impl Upstream {
    /// Builds the pooled client for the primary.
    pub fn new(settings: &UpstreamSettings) -> Result<Self, UpstreamError> {
        let invalid =
            |reason: &str| UpstreamError::InvalidUri { uri: settings.uri.to_string(), reason: reason.to_owned() };
        let scheme = match settings.uri.scheme() {
            "http" => Scheme::HTTP,
            "https" => Scheme::HTTPS,
            _ => return Err(invalid("only http and https are supported")),
        };
        let host = settings.uri.host_str().ok_or_else(|| invalid("it has no host"))?;
        let authority: Authority = match settings.uri.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        }
        .parse()
        .map_err(|_| invalid("its host is not a valid authority"))?;
        let base_path = settings.uri.path().trim_end_matches('/').to_owned();

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(settings.connect_timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*settings.tls).clone())
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(settings.pool_idle_timeout)
            .pool_max_idle_per_host(settings.pool_max_idle_per_host)
            .build(connector);
        let display = format!("{scheme}://{authority}{base_path}");
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                scheme,
                authority,
                base_path,
                display,
                request_timeout: settings.request_timeout,
                body_idle_timeout: settings.body_idle_timeout,
                signer: settings.resign.clone(),
                max_body_bytes: settings.max_body_bytes,
            }),
        })
    }

    /// `scheme://host:port/base` of the primary, for messages.
    pub fn display(&self) -> &str {
        &self.inner.display
    }
}

impl Service<Request<Body>> for Upstream {
    type Response = Response;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<Response, ProxyError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move { inner.forward(req).await })
    }
}

impl Inner {
    async fn forward(&self, req: Request<Body>) -> Result<Response, ProxyError> {
        let (mut parts, body) = req.into_parts();
        if crate::dot_segments::has_dot_segment(parts.uri.path()) {
            return Err(ProxyError::DotSegment { path: parts.uri.path().to_owned() });
        }
        if matches!(parts.extensions.get::<Classified>(), Some(c) if c.operation == Operation::NotIceberg) {
            return Err(ProxyError::NotIceberg { path: parts.uri.path().to_owned() });
        }
        parts.uri = self.upstream_uri(&parts.uri)?;
        // The client picks the version per connection (HTTP/1.1, or HTTP/2 by ALPN).
        parts.version = Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        // The client sets Host from the upstream URI, as reverse proxies do.
        parts.headers.remove(header::HOST);
        let body = match &self.signer {
            Some(signer) => super::resign::resign(&mut parts, body, signer, self.max_body_bytes).await?,
            None => body,
        };

        let response =
            tokio::time::timeout(self.request_timeout, self.client.request(Request::from_parts(parts, body)))
                .await
                .map_err(|_| ProxyError::UpstreamTimeout {
                    upstream: self.display.clone(),
                    timeout: self.request_timeout,
                })?
                .map_err(|e| self.transport_error(&e))?;
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, read_ahead(body, self.body_idle_timeout).await))
    }

    fn upstream_uri(&self, incoming: &Uri) -> Result<Uri, ProxyError> {
        let path_and_query = incoming.path_and_query().map_or("/", PathAndQuery::as_str);
        let joined = if self.base_path.is_empty() {
            PathAndQuery::try_from(path_and_query)
        } else {
            PathAndQuery::try_from(format!("{}{}", self.base_path, path_and_query))
        };
        let path_and_query =
            joined.map_err(|e| ProxyError::ClientBody { cause: format!("invalid request target: {e}") })?;
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|e| ProxyError::ClientBody { cause: format!("invalid request target: {e}") })
    }

    fn transport_error(&self, e: &hyper_util::client::legacy::Error) -> ProxyError {
        let cause = crate::causes::transport(e);
        if e.is_connect() {
            ProxyError::UpstreamUnreachable { upstream: self.display.clone(), cause }
        } else {
            ProxyError::UpstreamFailed { upstream: self.display.clone(), cause }
        }
    }
}

/// Most bytes [`read_ahead`] holds before it starts streaming.
const READ_AHEAD_LIMIT: usize = 64 * 1024;
/// Scheduler rounds [`read_ahead`] waits for the next frame before it starts streaming.
const READ_AHEAD_ROUNDS: usize = 3;

/// Collects what the primary has already sent of a body, then streams the rest.
///
/// hyper's client hands a body over one frame per round between the
/// connection task and the reader, so a chunked answer that arrived in one
/// TCP segment would otherwise be written to the client in two writes (the
/// data, then the end-of-body marker), each waking the client. Reading ahead
/// for a few scheduler rounds, up to [`READ_AHEAD_LIMIT`] bytes, lets a small
/// answer go out in one write with a `Content-Length`. A body still arriving
/// after that is streamed as it comes, so memory stays bounded and slow
/// streams are not held back.
async fn read_ahead(mut body: Incoming, idle_timeout: Duration) -> Body {
    let mut prefix: Vec<Frame<Bytes>> = Vec::new();
    let mut held = 0;
    let mut idle_rounds = 0;
    loop {
        match body.frame().now_or_never() {
            Some(Some(Ok(frame))) => {
                let is_data = frame.is_data();
                held += frame.data_ref().map_or(0, Bytes::len);
                prefix.push(frame);
                idle_rounds = 0;
                // Trailers end the read-ahead; they are passed on in order.
                if held >= READ_AHEAD_LIMIT || !is_data {
                    break;
                }
            }
            // The whole body is here (data only, as trailers stop the loop): send it at once.
            Some(None) => return Body::from(concat(prefix.into_iter().filter_map(|f| f.into_data().ok()))),
            // A failed body: the client sees the failure as it would directly.
            Some(Some(Err(e))) => {
                let frames =
                    futures::stream::iter(prefix.into_iter().map(Ok)).chain(futures::stream::once(async { Err(e) }));
                return Body::new(StreamBody::new(frames));
            }
            None if idle_rounds < READ_AHEAD_ROUNDS => {
                idle_rounds += 1;
                tokio::task::yield_now().await;
            }
            None => break,
        }
    }
    let rest = IdleTimeout::new(body, idle_timeout, Stalled::Primary);
    if prefix.is_empty() {
        return Body::new(rest);
    }
    let frames = futures::stream::iter(prefix.into_iter().map(Ok)).chain(BodyStream::new(rest));
    Body::new(StreamBody::new(frames))
}

fn concat(chunks: impl Iterator<Item = Bytes>) -> Bytes {
    let mut chunks: Vec<Bytes> = chunks.collect();
    if chunks.len() == 1 {
        return chunks.pop().unwrap_or_default();
    }
    let mut all = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
    for chunk in chunks {
        all.extend_from_slice(&chunk);
    }
    all.freeze()
}

/// The error's causes below the top level, joined with `: `
/// (e.g. `tcp connect error: Connection refused (os error 111)`).
/// Removes connection-specific header fields (RFC 9110 §7.6.1): those named in
/// `Connection` and the fixed set that only concerns one hop.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn hop_by_hop_fields_are_removed_and_end_to_end_kept() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-hop"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        h.insert("idempotency-key", HeaderValue::from_static("k"));
        strip_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["authorization", "idempotency-key"]);
    }

    #[test]
    fn upstream_uri_keeps_the_raw_path_and_joins_the_base() {
        let settings = |uri: &str| UpstreamSettings {
            uri: Url::parse(uri).expect("valid"),
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            body_idle_timeout: Duration::from_secs(1),
            resign: None,
            max_body_bytes: 1024,
            pool_idle_timeout: Duration::from_secs(1),
            pool_max_idle_per_host: 1,
            tls: Arc::new(crate::tls::client_config(None).expect("system roots")),
        };
        let up = Upstream::new(&settings("http://127.0.0.1:8181/api/catalog/")).expect("builds");
        let incoming: Uri = "/v1/wh/namespaces/a%1Fb/tables/t?x=1%202".parse().expect("valid");
        let out = up.inner.upstream_uri(&incoming).expect("maps");
        assert_eq!(out.to_string(), "http://127.0.0.1:8181/api/catalog/v1/wh/namespaces/a%1Fb/tables/t?x=1%202");
        let up = Upstream::new(&settings("http://127.0.0.1:8181")).expect("builds");
        assert_eq!(up.inner.upstream_uri(&incoming).expect("maps").path(), "/v1/wh/namespaces/a%1Fb/tables/t");
    }
}
