//! `engine_auth = "sigv4"`: forwarded requests signed with icerelay's own identity.
//!
//! A SigV4 signature covers the `Host` header, so a request an engine signed
//! for icerelay's address can never be forwarded intact to the primary. In
//! this mode icerelay drops what the engine sent (`Authorization`, every
//! `X-Amz-*` header) and signs the request itself, for the primary's host,
//! with the credentials of `[primary] auth`: the sidecar pattern. Whoever can
//! reach the listener acts with icerelay's identity, which is why a
//! non-loopback `listen` in this mode must be allowed explicitly.
//!
//! The signature covers the body's SHA-256, so a body is read whole (under
//! `max_body_bytes`, beyond which the client gets `413`) before it is sent;
//! bodies are JSON requests of a few kilobytes, and `GET`s have none.

use axum::body::Body;
use http::request::Parts;
use http::{HeaderName, header};

use super::body::read_request_body;
use super::error::ProxyError;
use crate::catalog::sigv4::Signer;

/// Replaces the engine's credentials with icerelay's signature. `parts.uri`
/// must already be the upstream's URI.
pub async fn resign(parts: &mut Parts, body: Body, signer: &Signer, limit: u64) -> Result<Body, ProxyError> {
    let engine_credentials: Vec<HeaderName> = parts
        .headers
        .keys()
        .filter(|name| *name == header::AUTHORIZATION || name.as_str().starts_with("x-amz-"))
        .cloned()
        .collect();
    for name in engine_credentials {
        parts.headers.remove(name);
    }
    let bytes = read_request_body(&parts.headers, body, limit, "signed").await?;
    let url = parts.uri.to_string();
    signer
        .sign(parts.method.as_str(), &url, &mut parts.headers, &bytes)
        .await
        .map_err(|e| ProxyError::Signing { cause: e.to_string() })?;
    Ok(Body::from(bytes))
}
