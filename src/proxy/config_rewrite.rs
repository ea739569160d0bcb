//! Rewrites `GET /v1/config` so a server-supplied `uri` cannot send clients
//! around the proxy.
//!
//! A catalog may return `uri` in `defaults` or `overrides`; clients then use
//! it for every later call and bypass icerelay (and replication with it).
//! This layer replaces that value with `public_url`, or removes the key when
//! no public URL is configured, so clients keep the `uri` they were given.
//! Everything else in the answer, and every other answer, is left untouched.
//! To read the body the request is sent without `Accept-Encoding`, so the
//! answer arrives uncompressed.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderValue, Request, header};
use reqwest::Url;
use serde_json::Value;
use tower::{Layer, Service};

use super::body::{BoundedReadError, read_bounded};
use super::error::ProxyError;
use super::router::{Classified, Operation};

/// Builds [`ConfigRewrite`] services.
#[derive(Debug, Clone)]
pub struct ConfigRewriteLayer {
    public_url: Option<String>,
    limit: u64,
    upstream: String,
}

impl ConfigRewriteLayer {
    /// `public_url` replaces a server-supplied `uri`; `limit` bounds the answer read.
    pub fn new(public_url: Option<&Url>, limit: u64, upstream: impl Into<String>) -> Self {
        // Clients append `/v1/...` to the uri; give them the URL without a trailing slash.
        let public_url = public_url.map(|u| u.as_str().trim_end_matches('/').to_owned());
        Self { public_url, limit, upstream: upstream.into() }
    }
}

impl<S> Layer<S> for ConfigRewriteLayer {
    type Service = ConfigRewrite<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConfigRewrite { inner, settings: self.clone() }
    }
}

/// The service built by [`ConfigRewriteLayer`].
#[derive(Debug, Clone)]
pub struct ConfigRewrite<S> {
    inner: S,
    settings: ConfigRewriteLayer,
}

impl<S> Service<Request<Body>> for ConfigRewrite<S>
where
    S: Service<Request<Body>, Response = Response, Error = ProxyError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<Response, ProxyError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let is_config = matches!(req.extensions().get::<Classified>(), Some(c) if c.operation == Operation::Config);
        if !is_config {
            return Box::pin(self.inner.call(req));
        }
        // Without the header any encoding is acceptable (RFC 9110): ask for
        // none, since icerelay reads this answer.
        req.headers_mut().insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        let future = self.inner.call(req);
        let settings = self.settings.clone();
        Box::pin(async move {
            let response = future.await?;
            let encoded = response
                .headers()
                .get(header::CONTENT_ENCODING)
                .is_some_and(|e| !e.as_bytes().eq_ignore_ascii_case(b"identity"));
            if encoded {
                tracing::warn!(upstream = %settings.upstream, "the primary compressed its /v1/config answer although asked not to; it is passed on unchanged, and a `uri` in it is not replaced");
            }
            if !response.status().is_success() || encoded {
                return Ok(response);
            }
            let (mut parts, body) = response.into_parts();
            let bytes = read_bounded(&parts.headers, body, settings.limit).await.map_err(|e| match e {
                BoundedReadError::TooLarge => {
                    ProxyError::ConfigTooLarge { upstream: settings.upstream.clone(), limit: settings.limit }
                }
                BoundedReadError::Failed(cause) => {
                    ProxyError::UpstreamFailed { upstream: settings.upstream.clone(), cause }
                }
            })?;
            let body = match rewrite_config(&bytes, settings.public_url.as_deref()) {
                Some(rewritten) => {
                    tracing::debug!("rewrote uri in the /v1/config answer");
                    parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(rewritten.len()));
                    // The entity changed, so a validator computed for the old one no longer applies.
                    parts.headers.remove(header::ETAG);
                    rewritten
                }
                None => bytes,
            };
            Ok(Response::from_parts(parts, Body::from(body)))
        })
    }
}

/// Returns the rewritten body when the answer is a JSON object with a `uri`
/// in `defaults` or `overrides`; `None` leaves the answer as it was.
pub fn rewrite_config(body: &[u8], public_url: Option<&str>) -> Option<Bytes> {
    let mut value: Value = serde_json::from_slice(body).ok()?;
    let mut changed = false;
    for section in ["defaults", "overrides"] {
        let Some(map) = value.get_mut(section).and_then(Value::as_object_mut) else { continue };
        if !map.contains_key("uri") {
            continue;
        }
        match public_url {
            Some(url) => {
                map.insert("uri".to_owned(), Value::String(url.to_owned()));
            }
            None => {
                map.remove("uri");
            }
        }
        changed = true;
    }
    if !changed {
        return None;
    }
    serde_json::to_vec(&value).ok().map(Bytes::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rewritten(body: Value, public: Option<&str>) -> Option<Value> {
        rewrite_config(&serde_json::to_vec(&body).expect("json"), public)
            .map(|b| serde_json::from_slice(&b).expect("json"))
    }

    #[test]
    fn replaces_or_removes_uri_and_keeps_everything_else() {
        let body = json!({"defaults": {"uri": "http://around:1", "warehouse": "s3://w"},
                          "overrides": {"uri": "http://around:2", "prefix": "p"}, "endpoints": ["GET /v1/config"]});
        let out = rewritten(body.clone(), Some("http://relay:9181")).expect("changed");
        assert_eq!(out["defaults"], json!({"uri": "http://relay:9181", "warehouse": "s3://w"}));
        assert_eq!(out["overrides"], json!({"uri": "http://relay:9181", "prefix": "p"}));
        assert_eq!(out["endpoints"], body["endpoints"]);
        let out = rewritten(body, None).expect("changed");
        assert_eq!(out["defaults"], json!({"warehouse": "s3://w"}));
        assert_eq!(out["overrides"], json!({"prefix": "p"}));
    }

    #[test]
    fn leaves_answers_without_uri_or_json_alone() {
        assert!(rewritten(json!({"defaults": {}, "overrides": {"prefix": "p"}}), Some("http://r")).is_none());
        assert!(rewrite_config(b"not json", Some("http://r")).is_none());
    }
}

#[cfg(test)]
mod layer_tests {
    use super::*;
    use tower::ServiceExt;

    /// Sends `GET /v1/config` through the layer to a primary that answers
    /// with a `uri` and `encoding`; the Accept-Encoding it was asked with, and
    /// the body the client gets.
    async fn config_through(encoding: Option<&'static str>) -> (Option<HeaderValue>, Value) {
        let asked = std::sync::Arc::new(std::sync::Mutex::new(None));
        let seen = asked.clone();
        let primary = tower::service_fn(move |request: Request<Body>| {
            let seen = seen.clone();
            async move {
                *seen.lock().unwrap() = request.headers().get(header::ACCEPT_ENCODING).cloned();
                let mut answer = Response::builder().status(200);
                if let Some(encoding) = encoding {
                    answer = answer.header(header::CONTENT_ENCODING, encoding);
                }
                Ok::<_, ProxyError>(answer.body(Body::from(r#"{"defaults":{"uri":"http://primary:8181"}}"#)).unwrap())
            }
        });
        let service = ConfigRewriteLayer::new(None, 1 << 20, "http://primary:8181").layer(primary);
        let mut request =
            Request::get("/v1/config").header(header::ACCEPT_ENCODING, "gzip, deflate").body(Body::empty()).unwrap();
        request.extensions_mut().insert(super::super::router::classify(&http::Method::GET, "/v1/config"));
        let response = service.oneshot(request).await.unwrap();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        let asked = asked.lock().unwrap().clone();
        (asked, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn the_config_answer_is_asked_uncompressed_and_an_identity_encoding_is_rewritten() {
        for encoding in [None, Some("identity")] {
            let (asked, body) = config_through(encoding).await;
            assert_eq!(asked, Some(HeaderValue::from_static("identity")), "{encoding:?}");
            assert_eq!(body, serde_json::json!({"defaults": {}}), "{encoding:?}: the primary's uri is gone");
        }
    }
}
