//! A catalog that vends storage credentials: a stand-in for Polaris,
//! Lakekeeper or S3 Tables in front of a real SeaweedFS catalog, since no
//! catalog available here vends.
//!
//! Every request is forwarded to SeaweedFS unchanged. A loadTable-shaped
//! answer (anything with a `metadata` object) to a request that asked with
//! `X-Iceberg-Access-Delegation: vended-credentials` gets `storage-credentials`
//! for the warehouse bucket. PyIceberg (which asks by default, and ignores
//! expiry) gets working keys. Any other client gets credentials that
//! **expired a second ago and carry a wrong secret**: used without renewal,
//! SeaweedFS refuses them. The table credentials endpoint (advertised in
//! `/v1/config`) answers the real keys with a short life, so such a client
//! must renew through it, and keep renewing; [`Counts`] says how often it did. It also counts requests that arrive without a
//! SigV4 signature (SeaweedFS would refuse them; the count says who sent them).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::Response;
use http_body_util::BodyExt;
use serde_json::{Value, json};

use super::SeaweedFs;

/// The credentials endpoint, as `/v1/config` lists endpoints.
const CREDENTIALS_ENDPOINT: &str = "GET /v1/{prefix}/namespaces/{namespace}/tables/{table}/credentials";

/// The secret of the credentials that expired at issue: SeaweedFS refuses it.
pub const EXPIRED_SECRET: &str = "expired-vended-secret-5521";

/// What the stand-in saw.
#[derive(Debug, Default)]
pub struct Counts {
    /// Answers that got (expired) credentials added.
    pub vended: AtomicUsize,
    /// Calls to the credentials endpoint.
    pub renewals: AtomicUsize,
    /// Requests without a SigV4 `Authorization` header.
    pub unsigned: AtomicUsize,
}

/// A running stand-in.
pub struct VendingCatalog {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// What it saw.
    pub counts: Arc<Counts>,
    _served: super::Served,
}

struct Upstream {
    uri: String,
    prefix: String,
    key_id: String,
    secret: String,
    lifetime: Duration,
    http: reqwest::Client,
    counts: Arc<Counts>,
}

impl VendingCatalog {
    /// Starts one in front of `seaweed`'s catalog; renewed credentials live `lifetime`.
    pub async fn start(seaweed: &SeaweedFs, lifetime: Duration) -> Self {
        let (key_id, secret) = seaweed.keys();
        let counts = Arc::new(Counts::default());
        let upstream = Arc::new(Upstream {
            uri: seaweed.catalog_uri().trim_end_matches('/').to_owned(),
            prefix: format!("s3://{}", seaweed.warehouse()),
            key_id: key_id.to_owned(),
            secret: secret.to_owned(),
            lifetime,
            http: reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client"),
            counts: counts.clone(),
        });
        let app = Router::new().fallback(move |request: Request| {
            let upstream = upstream.clone();
            async move { upstream.answer(request).await }
        });
        let served = super::serve(app).await;
        Self { url: served.url.clone(), counts, _served: served }
    }
}

fn epoch_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Upstream {
    async fn answer(&self, request: Request) -> Response {
        let (parts, body) = request.into_parts();
        let path = parts.uri.path().to_owned();
        let signed = parts
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("AWS4-HMAC-SHA256 "));
        if !signed {
            self.counts.unsigned.fetch_add(1, Ordering::SeqCst);
        }
        if parts.method == http::Method::GET && path.ends_with("/credentials") {
            self.counts.renewals.fetch_add(1, Ordering::SeqCst);
            let expires = epoch_ms(SystemTime::now() + self.lifetime);
            return json_response(
                StatusCode::OK,
                &json!({"storage-credentials": [{"prefix": self.prefix, "config": {
                "s3.access-key-id": self.key_id, "s3.secret-access-key": self.secret,
                "s3.session-token-expires-at-ms": expires.to_string()}}]}),
            );
        }
        let engine =
            parts.headers.get("user-agent").and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("PyIceberg/"));
        let delegated = parts
            .headers
            .get("x-iceberg-access-delegation")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("vended-credentials"));
        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let target = parts.uri.path_and_query().map_or(path.clone(), |p| p.as_str().to_owned());
        let mut forwarded = self.http.request(parts.method.clone(), format!("{}{target}", self.uri)).body(body);
        // Host goes along as it came: a SigV4 signature covers it.
        for (name, value) in &parts.headers {
            if !matches!(name.as_str(), "content-length" | "connection" | "transfer-encoding") {
                forwarded = forwarded.header(name, value);
            }
        }
        let Ok(answer) = forwarded.send().await else {
            return json_response(StatusCode::BAD_GATEWAY, &json!({"error": {"message": "seaweedfs unreachable"}}));
        };
        let status = answer.status();
        let bytes = answer.bytes().await.unwrap_or_default();
        let Ok(mut value) = serde_json::from_slice::<Value>(&bytes) else {
            return Response::builder().status(status).body(Body::from(bytes)).expect("response");
        };
        if path.ends_with("/v1/config")
            && let Some(endpoints) = value.get_mut("endpoints").and_then(Value::as_array_mut)
        {
            endpoints.push(json!(CREDENTIALS_ENDPOINT));
        }
        if delegated && status.is_success() && value.get("metadata").is_some_and(Value::is_object) {
            self.counts.vended.fetch_add(1, Ordering::SeqCst);
            let expired = epoch_ms(SystemTime::now() - Duration::from_secs(1));
            let secret = if engine { self.secret.as_str() } else { EXPIRED_SECRET };
            value["storage-credentials"] = json!([{"prefix": self.prefix, "config": {
                "s3.access-key-id": self.key_id, "s3.secret-access-key": secret,
                "s3.session-token-expires-at-ms": expired.to_string()}}]);
        }
        json_response(status, &value)
    }
}

fn json_response(status: StatusCode, value: &Value) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(value.to_string()))
        .expect("response")
}
