//! AWS SigV4: signing icerelay's own calls to AWS-style catalogs (S3 Tables,
//! Glue) and, with `engine_auth = "sigv4"`, the requests it forwards.
//!
//! A [`Signer`] holds the signing name and region and where its credentials
//! come from: the configuration, or the standard AWS chain (environment
//! variables, a shared profile, a web identity token, ECS or EC2 instance
//! credentials) through `aws-config`. Credentials are cached: temporary ones
//! until five minutes before they expire, the chain's long-lived ones for
//! five minutes (so rotated keys in a profile file are picked up without a
//! restart). A caller whose signature was refused calls
//! [`Signer::invalidate`] and tries once more, which picks up rotated keys
//! at once. Errors name the signing name, the region and the key id, never
//! the secret.

use std::time::{Duration, Instant, SystemTime};

use aws_config::default_provider::credentials::DefaultCredentialsChain;
use aws_config::profile::ProfileFileCredentialsProvider;
use aws_credential_types::Credentials;
use aws_credential_types::provider::ProvideCredentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4::SigningParams;
use aws_smithy_runtime_api::client::identity::Identity;
use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::sync::Mutex;

use crate::config::{Secret, SigV4Config};

/// How long long-lived credentials from the AWS chain are used before they are read again.
const CHAIN_REFRESH: Duration = Duration::from_secs(300);
/// Temporary credentials are renewed this long before they expire, at most.
const EXPIRY_MARGIN: Duration = Duration::from_secs(300);

/// How long before their expiry credentials that live `life` are renewed:
/// five minutes, or half their life when that is shorter. Shared by AWS
/// credentials and the storage credentials catalogs vend.
pub fn renewal_margin(life: Duration) -> Duration {
    EXPIRY_MARGIN.min(life / 2)
}

/// Why a request could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum SigV4Error {
    /// No credentials could be found.
    #[error(
        "SigV4 (signing name {service}, region {region}) has no AWS credentials: {cause}; set access_key_id and \
         secret_access_key in auth, or provide them through the AWS environment (AWS_ACCESS_KEY_ID and \
         AWS_SECRET_ACCESS_KEY, AWS_PROFILE, a web identity token, ECS or EC2 instance credentials)"
    )]
    NoCredentials {
        /// Signing name.
        service: String,
        /// Signing region.
        region: String,
        /// What the chain said (never a secret).
        cause: String,
    },
    /// The request could not be signed (an unusable URL or header).
    #[error("SigV4 (signing name {service}, key id {key_id}) cannot sign the request: {cause}")]
    Sign {
        /// Signing name.
        service: String,
        /// Access key id.
        key_id: String,
        /// Why.
        cause: String,
    },
}

/// Signs requests for one signing name and region.
#[derive(Debug)]
pub struct Signer {
    service: String,
    region: String,
    credentials: AwsCredentials,
}

impl Signer {
    /// The signer of an `auth = { type = "sigv4" }` configuration.
    pub fn new(config: &SigV4Config) -> Self {
        let credentials = match (&config.access_key_id, &config.secret_access_key) {
            (Some(id), Some(secret)) => AwsCredentials::configured(id, secret, config.session_token.as_ref()),
            _ => config.profile.as_deref().map_or_else(AwsCredentials::chain, AwsCredentials::profile),
        };
        Self { service: config.service.clone(), region: config.region.clone(), credentials }
    }

    /// The signing name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The signing region.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// Where the signer's credentials come from.
    pub fn credentials(&self) -> &AwsCredentials {
        &self.credentials
    }

    /// Signs a request in place: sets `Authorization`, `X-Amz-Date` and,
    /// for temporary credentials, `X-Amz-Security-Token`. `url` must be the
    /// URL the request is sent to (its host is signed); `headers` are the
    /// ones that will be sent, without a signature already.
    pub async fn sign(&self, method: &str, url: &str, headers: &mut HeaderMap, body: &[u8]) -> Result<(), SigV4Error> {
        let credentials = self.credentials.get(&self.service, &self.region).await?;
        let key_id = credentials.access_key_id().to_owned();
        let failed = |cause: String| SigV4Error::Sign { service: self.service.clone(), key_id: key_id.clone(), cause };
        let identity = Identity::from(credentials);
        let params = SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name(&self.service)
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| failed(e.to_string()))?;
        let signed_headers = headers.iter().filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?)));
        let request = SignableRequest::new(method, url, signed_headers, SignableBody::Bytes(body))
            .map_err(|e| failed(e.to_string()))?;
        let (instructions, _signature) = sign(request, &params.into()).map_err(|e| failed(e.to_string()))?.into_parts();
        let (new_headers, _) = instructions.into_parts();
        for header in new_headers {
            let mut value = HeaderValue::from_str(header.value()).map_err(|e| failed(e.to_string()))?;
            value.set_sensitive(header.sensitive() || header.name() == "authorization");
            headers.insert(HeaderName::from_static(header.name()), value);
        }
        Ok(())
    }
}

/// AWS credentials from the configuration or the environment, cached.
#[derive(Debug)]
pub struct AwsCredentials {
    source: Source,
    cached: Mutex<Option<Cached>>,
    /// The key id last resolved, for messages (readable without waiting for a lookup).
    key_id: std::sync::Mutex<Option<String>>,
}

#[derive(Debug)]
enum Source {
    /// Keys from the configuration.
    Static(Credentials),
    /// The AWS chain. Built anew at each refresh: its providers keep what
    /// they read (a profile file, say), and rotated keys must be seen.
    Chain,
    /// One profile of the shared AWS files, and nothing else of the chain
    /// (environment keys meant for another catalog must not win).
    Profile(String),
}

#[derive(Debug, Clone)]
struct Cached {
    credentials: Credentials,
    refresh_at: Option<Instant>,
}

impl AwsCredentials {
    fn new(source: Source) -> Self {
        Self { source, cached: Mutex::new(None), key_id: std::sync::Mutex::new(None) }
    }

    /// Keys written in the configuration.
    pub fn configured(access_key_id: &str, secret_access_key: &Secret, session_token: Option<&Secret>) -> Self {
        let token = session_token.map(|t| t.expose().to_owned());
        let keys = Credentials::new(access_key_id, secret_access_key.expose(), token, None, "icerelay-configuration");
        Self::new(Source::Static(keys))
    }

    /// The standard AWS chain: environment, shared profile, web identity, ECS, EC2.
    pub fn chain() -> Self {
        Self::new(Source::Chain)
    }

    /// One profile of the shared AWS files.
    pub fn profile(name: &str) -> Self {
        Self::new(Source::Profile(name.to_owned()))
    }

    /// Whether the credentials come from the AWS environment (and so may be rotated under us).
    pub fn from_environment(&self) -> bool {
        !matches!(self.source, Source::Static(_))
    }

    /// The access key id in use, once credentials were found.
    pub fn key_id(&self) -> Option<String> {
        self.key_id.lock().ok().and_then(|k| k.clone())
    }

    /// Forgets cached credentials, after a signature was refused.
    pub async fn invalidate(&self) {
        *self.cached.lock().await = None;
    }

    /// Current credentials, from the cache or freshly resolved; `service`
    /// and `region` name what they are for in an error.
    pub async fn get(&self, service: &str, region: &str) -> Result<Credentials, SigV4Error> {
        // Holding the lock across resolution makes concurrent callers wait
        // for one lookup (which may be a network call to STS or IMDS).
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref()
            && c.refresh_at.is_none_or(|at| Instant::now() < at)
        {
            return Ok(c.credentials.clone());
        }
        let resolved = match &self.source {
            Source::Static(c) => Ok(c.clone()),
            Source::Chain => DefaultCredentialsChain::builder().build().await.provide_credentials().await,
            Source::Profile(name) => {
                ProfileFileCredentialsProvider::builder().profile_name(name).build().provide_credentials().await
            }
        };
        let credentials = resolved.map_err(|e| SigV4Error::NoCredentials {
            service: service.to_owned(),
            region: region.to_owned(),
            cause: crate::causes::chain(&e),
        })?;
        let refresh_at = match (&self.source, credentials.expiry()) {
            (Source::Static(_), _) => None,
            (_, Some(expiry)) => {
                let left = expiry.duration_since(SystemTime::now()).unwrap_or_default();
                Some(Instant::now() + left.saturating_sub(renewal_margin(left)))
            }
            (_, None) => Some(Instant::now() + CHAIN_REFRESH),
        };
        if let Ok(mut key_id) = self.key_id.lock() {
            *key_id = Some(credentials.access_key_id().to_owned());
        }
        *cached = Some(Cached { credentials: credentials.clone(), refresh_at });
        Ok(credentials)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(service: &str, region: &str, id: &str, secret: Secret, token: Option<Secret>) -> SigV4Config {
        SigV4Config {
            service: service.into(),
            region: region.into(),
            access_key_id: Some(id.into()),
            secret_access_key: Some(secret),
            session_token: token,
            profile: None,
        }
    }

    #[tokio::test]
    async fn signs_with_the_configured_keys_and_never_shows_the_secret() {
        let secret = Secret::new("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY");
        let signer = Signer::new(&keys("s3tables", "us-east-1", "AKIDEXAMPLE", secret, None));
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.insert("authorization", HeaderValue::from_static("Bearer engine"));
        signer.sign("POST", "http://127.0.0.1:8181/v1/wh/namespaces?x=1", &mut headers, b"{}").await.expect("signs");
        let authorization = headers["authorization"].to_str().expect("ascii");
        assert!(authorization.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"), "{authorization}");
        assert!(authorization.contains("/us-east-1/s3tables/aws4_request"), "{authorization}");
        assert!(authorization.contains("SignedHeaders=content-type;host;x-amz-date"), "{authorization}");
        assert!(headers.contains_key("x-amz-date"));
        assert!(!format!("{signer:?}{headers:?}").contains("wJalrXUtnFEMI"), "the secret never shows");
        assert_eq!(signer.credentials().key_id().as_deref(), Some("AKIDEXAMPLE"));
    }

    #[tokio::test]
    async fn temporary_credentials_carry_their_session_token() {
        let (secret, token) = (Secret::new("s"), Secret::new("session-token-1"));
        let signer = Signer::new(&keys("glue", "eu-west-1", "ASIA1", secret, Some(token)));
        let mut headers = HeaderMap::new();
        signer
            .sign("GET", "https://glue.eu-west-1.amazonaws.com/iceberg/v1/config", &mut headers, b"")
            .await
            .expect("signs");
        assert_eq!(headers["x-amz-security-token"], "session-token-1");
        assert!(headers["authorization"].to_str().expect("ascii").contains("x-amz-security-token"));
    }
}
