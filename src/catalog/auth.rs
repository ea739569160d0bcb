//! icerelay's own credentials for a catalog: none, bearer, OAuth2, SigV4.
//!
//! Engines' credentials never come through here: the proxy forwards their
//! headers untouched. This module authorises the requests icerelay makes on
//! its own behalf (readiness probe, reading source metadata, writing replicas).
//! OAuth2 tokens are cached and refreshed before they expire, so a busy lane
//! does not fetch a token per request; a caller that gets `401` calls
//! [`Authenticator::invalidate`] and tries once more.

use std::time::{Duration, Instant};

use reqwest::Url;
use serde::Deserialize;
use tokio::sync::Mutex;

use super::sigv4::{SigV4Error, Signer};
use crate::config::{AuthConfig, Secret};

/// The largest token endpoint answer icerelay reads.
const TOKEN_ANSWER_LIMIT: usize = 1 << 20;
/// Lifetime assumed for a token whose response has no `expires_in`.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Refresh a token when less than this share of its lifetime is left...
const REFRESH_FRACTION: u32 = 10;
/// ...or less than this, whichever is larger.
const REFRESH_MARGIN: Duration = Duration::from_secs(30);

/// Why a request could not be authorised.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The token endpoint could not be reached.
    #[error("cannot reach the OAuth2 token endpoint {endpoint}: {}", crate::causes::transport(.source))]
    TokenUnreachable {
        /// The endpoint (never carries credentials).
        endpoint: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// The token endpoint refused the client credentials.
    #[error("the OAuth2 token endpoint {endpoint} answered {status}{detail}; check client_id and client_secret")]
    TokenRejected {
        /// The endpoint.
        endpoint: String,
        /// HTTP status.
        status: reqwest::StatusCode,
        /// `: error (description)` from the OAuth2 error body, if any.
        detail: String,
    },
    /// The token endpoint answered with a redirect; following it would post
    /// the client secret to wherever it points.
    #[error(
        "the OAuth2 token endpoint {endpoint} answered {status} redirecting to {location}; icerelay does not follow \
         redirects with credentials: set token_endpoint to the final address"
    )]
    TokenRedirect {
        /// The endpoint.
        endpoint: String,
        /// HTTP status.
        status: reqwest::StatusCode,
        /// Where it pointed.
        location: String,
    },
    /// The token endpoint answered 2xx without a usable token.
    #[error("the OAuth2 token endpoint {endpoint} answered without an access_token")]
    TokenMalformed {
        /// The endpoint.
        endpoint: String,
    },
    /// A SigV4 signature could not be made.
    #[error(transparent)]
    SigV4(#[from] SigV4Error),
}

/// Adds icerelay's credentials to outgoing catalog requests.
#[derive(Debug)]
pub struct Authenticator {
    method: Method,
}

#[derive(Debug)]
enum Method {
    None,
    Bearer(Secret),
    OAuth2(Box<OAuth2>),
    SigV4(Box<Signer>),
}

#[derive(Debug)]
struct OAuth2 {
    client_id: String,
    client_secret: Secret,
    endpoint: Url,
    scope: String,
    cached: Mutex<Option<CachedToken>>,
}

#[derive(Debug, Clone)]
struct CachedToken {
    token: Secret,
    refresh_at: Instant,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: Option<Secret>,
    expires_in: Option<u64>,
}

#[derive(Deserialize)]
struct OAuthErrorBody {
    error: Option<String>,
    error_description: Option<String>,
}

impl Authenticator {
    /// Builds an authenticator for a catalog whose base URI is `catalog_uri`.
    pub fn new(config: &AuthConfig, catalog_uri: &Url) -> Self {
        let method = match config {
            AuthConfig::None => Method::None,
            AuthConfig::Bearer { token } => Method::Bearer(token.clone()),
            AuthConfig::OAuth2 { client_id, client_secret, token_endpoint, scope } => {
                Method::OAuth2(Box::new(OAuth2 {
                    client_id: client_id.clone(),
                    client_secret: client_secret.clone(),
                    endpoint: token_endpoint.clone().unwrap_or_else(|| default_token_endpoint(catalog_uri)),
                    scope: scope.clone(),
                    cached: Mutex::new(None),
                }))
            }
            AuthConfig::SigV4(sigv4) => Method::SigV4(Box::new(Signer::new(sigv4))),
        };
        Self { method }
    }

    /// Adds the `Authorization` header (fetching a token if needed).
    pub async fn authorize(&self, http: &reqwest::Client, request: &mut reqwest::Request) -> Result<(), AuthError> {
        let token = match &self.method {
            Method::None => return Ok(()),
            Method::Bearer(token) => token.clone(),
            Method::OAuth2(oauth2) => oauth2.token(http).await?,
            Method::SigV4(signer) => {
                let (method, url) = (request.method().to_string(), request.url().to_string());
                let body = request.body().and_then(reqwest::Body::as_bytes).map(<[u8]>::to_vec).unwrap_or_default();
                signer.sign(&method, &url, request.headers_mut(), &body).await?;
                return Ok(());
            }
        };
        let value = format!("Bearer {}", token.expose());
        if let Ok(mut header) = reqwest::header::HeaderValue::from_str(&value) {
            header.set_sensitive(true);
            request.headers_mut().insert(reqwest::header::AUTHORIZATION, header);
        }
        Ok(())
    }

    /// Forgets cached credentials, after the catalog refused them
    /// (`401` to a token, `403` to a SigV4 signature).
    pub async fn invalidate(&self) {
        match &self.method {
            Method::OAuth2(oauth2) => *oauth2.cached.lock().await = None,
            Method::SigV4(signer) => signer.credentials().invalidate().await,
            Method::None | Method::Bearer(_) => {}
        }
    }

    /// The signer, when the method is SigV4.
    pub fn sigv4(&self) -> Option<&Signer> {
        match &self.method {
            Method::SigV4(signer) => Some(signer),
            _ => None,
        }
    }
}

impl OAuth2 {
    async fn token(&self, http: &reqwest::Client) -> Result<Secret, AuthError> {
        let Self { client_id, client_secret, endpoint, scope, cached } = self;
        // Holding the lock across the fetch makes concurrent callers wait for
        // one token request instead of each sending their own.
        let mut cached = cached.lock().await;
        if let Some(token) = cached.as_ref()
            && Instant::now() < token.refresh_at
        {
            return Ok(token.token.clone());
        }
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", client_id.as_str()),
            ("client_secret", client_secret.expose()),
            ("scope", scope.as_str()),
        ];
        let response = http.post(endpoint.clone()).form(&form).send().await.map_err(|source| {
            AuthError::TokenUnreachable { endpoint: endpoint.to_string(), source: source.without_url() }
        })?;
        let status = response.status();
        if status.is_redirection() {
            let location = super::client::location_of(&response);
            return Err(AuthError::TokenRedirect { endpoint: endpoint.to_string(), status, location });
        }
        // A token answer is a few hundred bytes.
        let body = super::client::body_within(response, TOKEN_ANSWER_LIMIT).await.ok().flatten();
        if !status.is_success() {
            let detail = body
                .and_then(|b| serde_json::from_slice::<OAuthErrorBody>(&b).ok())
                .and_then(|b| match (b.error, b.error_description) {
                    (Some(e), Some(d)) => Some(format!(": {e} ({d})")),
                    (Some(e), None) => Some(format!(": {e}")),
                    _ => None,
                })
                .unwrap_or_default();
            return Err(AuthError::TokenRejected { endpoint: endpoint.to_string(), status, detail });
        }
        let body: TokenResponse = body
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| AuthError::TokenMalformed { endpoint: endpoint.to_string() })?;
        let token = body.access_token.ok_or_else(|| AuthError::TokenMalformed { endpoint: endpoint.to_string() })?;
        let lifetime = body.expires_in.map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs);
        let margin = (lifetime / REFRESH_FRACTION).max(REFRESH_MARGIN).min(lifetime);
        *cached = Some(CachedToken { token: token.clone(), refresh_at: Instant::now() + (lifetime - margin) });
        Ok(token)
    }
}

/// `<catalog uri>/v1/oauth/tokens`, the spec's token endpoint.
fn default_token_endpoint(catalog_uri: &Url) -> Url {
    let mut url = catalog_uri.clone();
    let path = format!("{}/v1/oauth/tokens", catalog_uri.path().trim_end_matches('/'));
    url.set_path(&path);
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_token_endpoint_keeps_the_base_path() {
        let u = Url::parse("http://h:1/api/catalog/").expect("valid");
        assert_eq!(default_token_endpoint(&u).as_str(), "http://h:1/api/catalog/v1/oauth/tokens");
        let u = Url::parse("http://h:1").expect("valid");
        assert_eq!(default_token_endpoint(&u).as_str(), "http://h:1/v1/oauth/tokens");
    }

    #[test]
    fn debug_never_shows_secrets() {
        let auth = Authenticator::new(
            &AuthConfig::OAuth2 {
                client_id: "me".into(),
                client_secret: Secret::new("s3cr3t-value"),
                token_endpoint: None,
                scope: "catalog".into(),
            },
            &Url::parse("http://h:1").expect("valid"),
        );
        assert!(!format!("{auth:?}").contains("s3cr3t-value"));
    }
}
