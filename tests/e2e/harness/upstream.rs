//! Stand-in upstreams for the tests that need to see exactly what icerelay
//! sends (headers, raw paths, bodies) or to misbehave on purpose (slow,
//! streaming). Real-catalog behaviour is tested against SeaweedFS instead.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use futures::StreamExt;
use http_body_util::BodyExt;
use serde_json::json;

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Method.
    pub method: String,
    /// Request target as sent (raw path and query).
    pub target: String,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

/// A running stub upstream.
pub struct Stub {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Every request received.
    pub seen: Arc<Mutex<Vec<Seen>>>,
    _served: super::Served,
}

impl Stub {
    /// Requests received so far.
    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// How the stub answers.
#[derive(Clone)]
pub enum Behaviour {
    /// Echo the request as JSON, status from `x-test-status`, with `etag` and
    /// `x-upstream` headers set.
    Echo,
    /// Wait, then answer 200.
    Slow(Duration),
    /// Answer this JSON body to every request.
    Fixed(serde_json::Value),
    /// Answer a chunked body of this many bytes, without `Content-Length`.
    Stream(usize),
    /// Answer the head and one chunk, then send nothing more, ever.
    Stall,
    /// Answer every request with this redirect status to this URL.
    Redirect(u16, String),
}

/// Starts a stub on an ephemeral port.
pub async fn start(behaviour: Behaviour) -> Stub {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let recorder = seen.clone();
    let app = Router::new().fallback(move |req: Request| {
        let recorder = recorder.clone();
        let behaviour = behaviour.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let seen = Seen {
                method: parts.method.to_string(),
                target: parts.uri.to_string(),
                headers: parts.headers.clone(),
                body: body.clone(),
            };
            if let Ok(mut all) = recorder.lock() {
                all.push(seen);
            }
            answer(&behaviour, &parts.headers, &parts.method, &parts.uri.to_string(), body.len()).await
        }
    });
    let served = super::serve(app).await;
    Stub { url: served.url.clone(), seen, _served: served }
}

async fn answer(
    behaviour: &Behaviour,
    headers: &HeaderMap,
    method: &axum::http::Method,
    target: &str,
    body_len: usize,
) -> Response {
    match behaviour {
        Behaviour::Echo => {
            let status = headers
                .get("x-test-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u16>().ok())
                .and_then(|s| StatusCode::from_u16(s).ok())
                .unwrap_or(StatusCode::OK);
            let echoed: serde_json::Map<String, serde_json::Value> =
                headers.iter().map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or("<binary>")))).collect();
            let body = json!({"method": method.as_str(), "target": target, "headers": echoed, "body_len": body_len});
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .header("etag", "\"v1\"")
                .header("x-upstream", "echo")
                .header(
                    "x-request-id",
                    headers.get("x-request-id").cloned().unwrap_or_else(|| "none".parse().expect("valid")),
                )
                .body(Body::from(body.to_string()))
                .expect("response")
        }
        Behaviour::Slow(delay) => {
            tokio::time::sleep(*delay).await;
            Response::new(Body::from("late"))
        }
        Behaviour::Fixed(value) => Response::builder()
            .header("content-type", "application/json")
            .body(Body::from(value.to_string()))
            .expect("response"),
        Behaviour::Redirect(status, to) => {
            Response::builder().status(*status).header("location", to.as_str()).body(Body::empty()).expect("response")
        }
        Behaviour::Stall => {
            let first = futures::stream::once(async { Ok::<_, std::io::Error>(Bytes::from_static(b"{\"partial\":")) });
            Response::new(Body::from_stream(first.chain(futures::stream::pending())))
        }
        Behaviour::Stream(total) => {
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let chunks = total.div_ceil(chunk.len());
            let last = total - (chunks.saturating_sub(1)) * chunk.len();
            let stream = futures::stream::iter((0..chunks).map(move |i| {
                Ok::<_, std::io::Error>(if i + 1 == chunks { chunk.slice(..last) } else { chunk.clone() })
            }));
            Response::new(Body::from_stream(stream))
        }
    }
}
