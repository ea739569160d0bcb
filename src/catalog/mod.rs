//! The Iceberg REST catalog client icerelay uses for its own calls.
//!
//! One [`RestCatalog`] per catalog (the primary, each destination). It adds
//! icerelay's credentials ([`auth`]), and matches the status codes of each
//! operation explicitly, so that callers get typed errors rather than
//! strings. The proxy does not use this client: engine requests are
//! forwarded as they are by `proxy::upstream`.

pub mod auth;
mod ident;

use std::time::Duration;

pub use ident::{Namespace, TableIdent};
use reqwest::{StatusCode, Url};

use crate::config::AuthConfig;
use auth::{AuthError, Authenticator};

/// Errors from icerelay's own catalog calls.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// No HTTP answer (connection refused, DNS, TLS, reset).
    #[error("catalog {catalog} at {url} is unreachable: {source}")]
    Unreachable {
        /// Catalog name (`primary` or a destination).
        catalog: String,
        /// URL called, without query.
        url: String,
        /// Transport error.
        #[source]
        source: reqwest::Error,
    },
    /// No answer within the configured timeout.
    #[error("catalog {catalog} at {url} did not answer within {timeout:?}")]
    Timeout {
        /// Catalog name.
        catalog: String,
        /// URL called, without query.
        url: String,
        /// The timeout.
        timeout: Duration,
    },
    /// icerelay could not authorise its request.
    #[error("catalog {catalog}: {source}")]
    Auth {
        /// Catalog name.
        catalog: String,
        /// Cause.
        #[source]
        source: AuthError,
    },
    /// The client could not be built (TLS setup).
    #[error("catalog {catalog}: cannot build HTTP client: {source}")]
    Client {
        /// Catalog name.
        catalog: String,
        /// Cause.
        #[source]
        source: reqwest::Error,
    },
}

/// Connection settings for [`RestCatalog::new`].
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// TCP/TLS connect timeout.
    pub connect_timeout: Duration,
    /// Whole-request timeout.
    pub request_timeout: Duration,
}

/// A REST catalog, as seen by icerelay's own calls.
#[derive(Debug)]
pub struct RestCatalog {
    name: String,
    base: Url,
    warehouse: Option<String>,
    settings: ClientSettings,
    http: reqwest::Client,
    auth: Authenticator,
}

impl RestCatalog {
    /// A client for the catalog at `base` (the URI without `/v1`).
    pub fn new(
        name: impl Into<String>,
        base: Url,
        warehouse: Option<String>,
        auth: &AuthConfig,
        settings: ClientSettings,
    ) -> Result<Self, CatalogError> {
        let name = name.into();
        let http = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.request_timeout)
            .build()
            .map_err(|source| CatalogError::Client { catalog: name.clone(), source })?;
        let auth = Authenticator::new(auth, &base);
        Ok(Self { name, base, warehouse, settings, http, auth })
    }

    /// The catalog's name in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `<base>/v1/<path>`.
    fn url(&self, path: &str) -> Url {
        let mut url = self.base.clone();
        url.set_path(&format!("{}/v1/{}", self.base.path().trim_end_matches('/'), path));
        url
    }

    /// Sends `GET /v1/config` and returns the HTTP status, whatever it is.
    ///
    /// Any HTTP answer shows the catalog is reachable; the status tells the
    /// caller whether icerelay's credentials are accepted.
    pub async fn probe(&self) -> Result<StatusCode, CatalogError> {
        let mut url = self.url("config");
        if let Some(w) = &self.warehouse {
            url.query_pairs_mut().append_pair("warehouse", w);
        }
        let mut request = self
            .http
            .get(url.clone())
            .build()
            .map_err(|source| CatalogError::Client { catalog: self.name.clone(), source })?;
        self.auth
            .authorize(&self.http, &mut request)
            .await
            .map_err(|source| CatalogError::Auth { catalog: self.name.clone(), source })?;
        let response = self.http.execute(request).await.map_err(|e| self.transport_error(&url, e))?;
        Ok(response.status())
    }

    fn transport_error(&self, url: &Url, e: reqwest::Error) -> CatalogError {
        let mut shown = url.clone();
        shown.set_query(None);
        if e.is_timeout() {
            CatalogError::Timeout {
                catalog: self.name.clone(),
                url: shown.to_string(),
                timeout: self.settings.request_timeout,
            }
        } else {
            CatalogError::Unreachable { catalog: self.name.clone(), url: shown.to_string(), source: e.without_url() }
        }
    }
}
