//! Reading a body whole, under a bound, for the few places that must inspect one.

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};

use super::error::ProxyError;

/// Why a bounded read failed.
#[derive(Debug)]
pub enum BoundedReadError {
    /// The body is longer than the bound.
    TooLarge,
    /// The body stream failed (client or upstream went away).
    Failed(String),
}

/// The body length a request declares (`Content-Length`), if it does.
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
}

/// Reads `body` into memory, failing fast when `Content-Length` already
/// exceeds `limit` and otherwise stopping as soon as the bound is crossed.
pub async fn read_bounded(headers: &HeaderMap, body: Body, limit: u64) -> Result<Bytes, BoundedReadError> {
    if declared_length(headers).is_some_and(|len| len > limit) {
        return Err(BoundedReadError::TooLarge);
    }
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(BoundedReadError::TooLarge),
        Err(e) => Err(BoundedReadError::Failed(e.to_string())),
    }
}

/// Reads a client's request body under the bound, as a `ProxyError` on failure.
pub async fn read_request_body(
    headers: &HeaderMap,
    body: Body,
    limit: u64,
    operation: &'static str,
) -> Result<Bytes, ProxyError> {
    read_bounded(headers, body, limit).await.map_err(|e| match e {
        BoundedReadError::TooLarge => ProxyError::BodyTooLarge { limit, operation },
        BoundedReadError::Failed(cause) => ProxyError::ClientBody { cause },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[tokio::test]
    async fn bound_is_enforced_with_and_without_content_length() {
        let mut headers = HeaderMap::new();
        assert_eq!(read_bounded(&headers, Body::from("12345"), 5).await.ok(), Some(Bytes::from("12345")));
        assert!(matches!(read_bounded(&headers, Body::from("123456"), 5).await, Err(BoundedReadError::TooLarge)));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("100"));
        assert!(matches!(read_bounded(&headers, Body::from("1"), 5).await, Err(BoundedReadError::TooLarge)));
    }
}
