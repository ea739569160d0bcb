//! Errors of icerelay's own catalog calls, and what a caller should do about them.
//!
//! Every status code is interpreted once, here, per operation: callers match
//! on variants and on [`CatalogError::disposition`], never on message text.

use std::time::Duration;

use reqwest::StatusCode;

use super::auth::AuthError;
use super::sigv4::SigV4Error;

/// What a replication lane should do after an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// A transient failure: try the same step again after a backoff.
    Retry,
    /// The outcome of a commit is unknown, or a requirement failed: reload the
    /// replica and plan again from what is actually there.
    ReloadAndCheck,
    /// Retrying will not help until someone changes something: stop the lane
    /// and report the error.
    Park,
}

/// The identity behind a refused SigV4 signature, for messages: never a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignerIdentity {
    /// Signing name.
    pub service: String,
    /// Signing region.
    pub region: String,
    /// The access key id.
    pub key_id: String,
    /// Whether the credentials come from the AWS environment.
    pub from_environment: bool,
}

impl std::fmt::Display for SignerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "signing name {}, region {}, key id {}", self.service, self.region, self.key_id)
    }
}

/// Errors from icerelay's own catalog calls.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// No HTTP answer (connection refused, DNS, TLS, reset).
    #[error("catalog {catalog} at {url} is unreachable: {}", crate::causes::transport(.source))]
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
    #[error("catalog {catalog} at {url} did not answer within {}", humantime::format_duration(*.timeout))]
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
    /// The catalog's `ca_file` cannot be used.
    #[error("catalog {catalog}: ca_file: {source}")]
    Tls {
        /// Catalog name.
        catalog: String,
        /// Cause.
        #[source]
        source: crate::tls::TlsError,
    },
    /// A commit got no definite answer (timeout, 500, 502, 503, 504): it may or may not have been applied.
    #[error(
        "catalog {catalog}: the outcome of the commit to {table} is unknown ({cause}); icerelay reloads the table to find out"
    )]
    CommitOutcomeUnknown {
        /// Catalog name.
        catalog: String,
        /// The table.
        table: String,
        /// What happened.
        cause: String,
    },
    /// A commit's requirement failed (409): the table is not in the state the commit assumed.
    #[error("catalog {catalog}: commit to {table} refused because the table changed ({message})")]
    CommitConflict {
        /// Catalog name.
        catalog: String,
        /// The table.
        table: String,
        /// The catalog's message.
        message: String,
    },
    /// The catalog answered with an error status.
    #[error("catalog {catalog}: {operation} answered {status}{}: {message}", error_type.as_deref().map(|t| format!(" {t}")).unwrap_or_default())]
    Status {
        /// Catalog name.
        catalog: String,
        /// The REST operation, e.g. `loadTable db.events`.
        operation: String,
        /// HTTP status.
        status: StatusCode,
        /// `type` of the Iceberg `ErrorModel`, when the body was one.
        error_type: Option<String>,
        /// `message` of the `ErrorModel`, or the start of the body.
        message: String,
    },
    /// The catalog answered with a redirect, which icerelay never follows:
    /// its credentials would go wherever the redirect points.
    #[error(
        "catalog {catalog}: {operation} at {url} answered {status} redirecting to {location}; icerelay does not follow \
         redirects (they could carry its credentials to another host): set the catalog's uri to the final address"
    )]
    Redirect {
        /// Catalog name.
        catalog: String,
        /// The REST operation.
        operation: String,
        /// URL called, without query.
        url: String,
        /// HTTP status.
        status: StatusCode,
        /// The `Location` the catalog named.
        location: String,
    },
    /// The catalog refused icerelay's SigV4 signature.
    #[error(
        "catalog {catalog}: {operation} answered {status}: {message}; the SigV4 signature ({signer}) was refused: \
         check the secret access key, the region and the signing name"
    )]
    SigV4Refused {
        /// Catalog name.
        catalog: String,
        /// The REST operation.
        operation: String,
        /// HTTP status.
        status: StatusCode,
        /// The catalog's message.
        message: String,
        /// Who signed.
        signer: Box<SignerIdentity>,
    },
    /// A 2xx answer whose body is not what the spec says.
    #[error("catalog {catalog}: {operation} answered with a body icerelay cannot read: {cause}")]
    Decode {
        /// Catalog name.
        catalog: String,
        /// The REST operation.
        operation: String,
        /// Why.
        cause: String,
    },
}

impl CatalogError {
    /// What a lane should do next.
    pub fn disposition(&self) -> Disposition {
        match self {
            Self::Unreachable { .. } | Self::Timeout { .. } => Disposition::Retry,
            Self::Auth { source, .. } => match source {
                AuthError::TokenUnreachable { .. } => Disposition::Retry,
                // The AWS chain may be a network call (STS, instance metadata).
                AuthError::SigV4(SigV4Error::NoCredentials { .. }) => Disposition::Retry,
                _ => Disposition::Park,
            },
            // Credentials from the AWS environment can be rotated: retrying picks up new ones.
            Self::SigV4Refused { signer, .. } if signer.from_environment => Disposition::Retry,
            Self::Client { .. }
            | Self::Tls { .. }
            | Self::Decode { .. }
            | Self::Redirect { .. }
            | Self::SigV4Refused { .. } => Disposition::Park,
            Self::CommitOutcomeUnknown { .. } | Self::CommitConflict { .. } => Disposition::ReloadAndCheck,
            Self::Status { status, .. } => {
                if status.is_server_error()
                    || *status == StatusCode::TOO_MANY_REQUESTS
                    || *status == StatusCode::REQUEST_TIMEOUT
                {
                    Disposition::Retry
                } else {
                    Disposition::Park
                }
            }
        }
    }

    /// The HTTP status, when the catalog answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Status { status, .. } | Self::SigV4Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}
