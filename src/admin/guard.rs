//! Who may use the admin API: bearer tokens, and no cross-site requests.
//!
//! The admin API can pause replication, so it is guarded like any control
//! plane:
//!
//! - With `admin_token` set, every request but `/healthz` and `/readyz` needs
//!   `Authorization: Bearer <token>`; `admin_open_reads` exempts `GET` status
//!   endpoints and `/metrics` (Prometheus scrapers often cannot send a token).
//! - A state-changing request must say `Content-Type: application/json` and
//!   must not carry a foreign `Origin`. A web page can make a browser send a
//!   cross-site form post (`text/plain`, `application/x-www-form-urlencoded`)
//!   without asking anyone; a JSON post from another origin needs a CORS
//!   preflight, which this API never grants. So a page an operator happens to
//!   open cannot pause replication, token or not.
//!
//! Refusals are Iceberg-style `ErrorModel` bodies, like the rest of the API.

use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::config::AdminAccess;

/// Paths that are always open: liveness and readiness probes carry no token.
const ALWAYS_OPEN: &[&str] = &["/healthz", "/readyz"];

/// The guard, as an axum middleware over the admin router.
pub async fn guard(State(access): State<AdminAccess>, request: Request<Body>, next: Next) -> Response {
    if let Err(refusal) = check(&access, request.method(), request.uri().path(), request.headers()) {
        return refusal.into_response();
    }
    next.run(request).await
}

/// Why a request was refused.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// No token, or the wrong one.
    Unauthorized,
    /// A state-changing request that a browser could forge.
    CrossSite(String),
    /// A state-changing request without a JSON content type.
    NotJson,
    /// A request to a tokenless admin API addressed by a DNS name.
    ForeignHost(String),
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (status, kind, message) = match self {
            Self::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "NotAuthorizedException",
                "the admin API needs `Authorization: Bearer <admin_token>` (icerelay status --token, or \
                 ICERELAY_ADMIN_TOKEN)"
                    .to_owned(),
            ),
            Self::CrossSite(origin) => (
                StatusCode::FORBIDDEN,
                "ForbiddenException",
                format!(
                    "a request from origin {origin} may not change replication: the admin API refuses cross-site \
                     requests"
                ),
            ),
            Self::ForeignHost(host) => (
                StatusCode::FORBIDDEN,
                "ForbiddenException",
                format!(
                    "the admin API has no admin_token, so it answers only requests addressed to localhost or an IP \
                     address, not {host}: a web page that points a DNS name at 127.0.0.1 must not reach it. Set \
                     admin_token to use it by name"
                ),
            ),
            Self::NotJson => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                "state-changing admin requests must be sent with `Content-Type: application/json` (an empty \
                 body is fine)"
                    .to_owned(),
            ),
        };
        let mut response =
            (status, Json(json!({"error": {"message": message, "type": kind, "code": status.as_u16()}})))
                .into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        response
    }
}

fn check(access: &AdminAccess, method: &Method, path: &str, headers: &HeaderMap) -> Result<(), Refusal> {
    if ALWAYS_OPEN.contains(&path) {
        return Ok(());
    }
    if access.local_hosts_only
        && let Some(host) = dns_host(headers)
    {
        return Err(Refusal::ForeignHost(host));
    }
    let reads = matches!(*method, Method::GET | Method::HEAD);
    if !reads {
        if let Some(origin) = foreign_origin(headers) {
            return Err(Refusal::CrossSite(origin));
        }
        if !is_json(headers) {
            return Err(Refusal::NotJson);
        }
    }
    let Some(token) = &access.token else { return Ok(()) };
    if reads && access.open_reads {
        return Ok(());
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    match presented {
        Some(p) if constant_time_eq(p.as_bytes(), token.expose().as_bytes()) => Ok(()),
        _ => Err(Refusal::Unauthorized),
    }
}

/// The `Origin` header when it names another site than the one addressed.
///
/// Non-browser clients send no `Origin`; a browser on a page served by the
/// admin listener itself sends its own host, which is allowed.
fn foreign_origin(headers: &HeaderMap) -> Option<String> {
    let origin = headers.get(header::ORIGIN)?;
    let origin = String::from_utf8_lossy(origin.as_bytes()).into_owned();
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin.split_once("://").map(|(_, rest)| rest.trim_end_matches('/'));
    match (origin_host, host) {
        (Some(o), Some(h)) if o.eq_ignore_ascii_case(h) => None,
        _ => Some(origin),
    }
}

/// The `Host` header when it is a DNS name other than `localhost` (an IP
/// literal, with or without a port, cannot be rebound).
fn dns_host(headers: &HeaderMap) -> Option<String> {
    let host = String::from_utf8_lossy(headers.get(header::HOST)?.as_bytes()).into_owned();
    let name = match host.strip_prefix('[') {
        Some(v6) => return (v6.split(']').next()?.parse::<std::net::Ipv6Addr>().is_err()).then_some(host.clone()),
        None => host.rsplit_once(':').map_or(host.as_str(), |(name, _)| name),
    };
    let local = name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok();
    (!local).then_some(host)
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

/// Compares without returning early, so the time taken does not tell how
/// much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().expect("header value"));
        }
        h
    }

    const PAUSE: &str = "/v1/replication/namespaces/a/tables/t/destinations/dr/pause";

    #[test]
    fn tokens_guard_everything_but_the_probes() {
        let access = AdminAccess { token: Some(Secret::new("s3cret")), open_reads: false, local_hosts_only: false };
        let json = ("content-type", "application/json");
        assert_eq!(check(&access, &Method::GET, "/healthz", &HeaderMap::new()), Ok(()));
        assert_eq!(check(&access, &Method::GET, "/readyz", &HeaderMap::new()), Ok(()));
        assert_eq!(check(&access, &Method::GET, "/metrics", &HeaderMap::new()), Err(Refusal::Unauthorized));
        assert_eq!(check(&access, &Method::POST, PAUSE, &headers(&[json])), Err(Refusal::Unauthorized));
        let wrong = headers(&[json, ("authorization", "Bearer s3creT")]);
        assert_eq!(check(&access, &Method::POST, PAUSE, &wrong), Err(Refusal::Unauthorized));
        let right = headers(&[json, ("authorization", "Bearer s3cret")]);
        assert_eq!(check(&access, &Method::POST, PAUSE, &right), Ok(()));
        let open_reads = AdminAccess { open_reads: true, ..access };
        assert_eq!(check(&open_reads, &Method::GET, "/v1/replication/status", &HeaderMap::new()), Ok(()));
        assert_eq!(check(&open_reads, &Method::POST, PAUSE, &headers(&[json])), Err(Refusal::Unauthorized));
    }

    #[test]
    fn without_a_token_only_local_names_are_answered() {
        let local = AdminAccess { local_hosts_only: true, ..AdminAccess::default() };
        let get = |host: &str| check(&local, &Method::GET, "/v1/replication/status", &headers(&[("host", host)]));
        for host in ["127.0.0.1:9182", "localhost:9182", "LOCALHOST", "[::1]:9182", "10.0.0.7"] {
            assert_eq!(get(host), Ok(()), "{host}");
        }
        assert!(matches!(get("rebound.attacker.example:9182"), Err(Refusal::ForeignHost(_))));
        assert_eq!(check(&local, &Method::GET, "/healthz", &headers(&[("host", "any.name")])), Ok(()));
    }

    #[test]
    fn forged_cross_site_posts_are_refused_even_without_a_token() {
        let open = AdminAccess::default();
        let form = headers(&[("content-type", "text/plain"), ("origin", "https://evil.example"), ("host", "h:1")]);
        assert!(matches!(check(&open, &Method::POST, PAUSE, &form), Err(Refusal::CrossSite(_))));
        let json_foreign =
            headers(&[("content-type", "application/json"), ("origin", "https://evil.example"), ("host", "h:1")]);
        assert!(matches!(check(&open, &Method::POST, PAUSE, &json_foreign), Err(Refusal::CrossSite(_))));
        assert_eq!(
            check(&open, &Method::POST, PAUSE, &headers(&[("content-type", "text/plain")])),
            Err(Refusal::NotJson)
        );
        let same_site =
            headers(&[("content-type", "application/json; charset=utf-8"), ("origin", "http://h:1"), ("host", "h:1")]);
        assert_eq!(check(&open, &Method::POST, PAUSE, &same_site), Ok(()));
    }
}
