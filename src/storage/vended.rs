//! Storage credentials vended by catalogs (Iceberg REST access delegation).
//!
//! Asked with `X-Iceberg-Access-Delegation: vended-credentials`, a catalog may
//! answer loadTable (and createTable, registerTable, a staged create) with
//! short-lived credentials for the table's files: `storage-credentials`
//! (`[{prefix, config}]`) or, from older catalogs, S3 keys in the answer's
//! `config`. [`VendedCredentials`] keeps them by prefix. [`super::Storage`]
//! uses them for a URL under their prefix when its `[[storage]]` entry has no
//! keys of its own (configured keys win), and before they expire renews them
//! through [`Renew`]: the table's credentials endpoint, or a new loadTable.
//!
//! A prefix keeps one entry: a fresh answer for the same prefix replaces its
//! credentials in place, so the stores built on it see the new keys at once.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use object_store::aws::AwsCredential;
use serde_json::{Map, Value};

use super::is_under;
use crate::catalog::sigv4::renewal_margin;
use crate::config::Secret;

/// After a failed renewal, how long still-valid credentials serve before the next try.
const RENEW_RETRY: Duration = Duration::from_secs(10);

/// S3 credentials a catalog vended for the files under `prefix`.
#[derive(Clone, PartialEq, Eq)]
pub struct StorageCredential {
    /// The URL prefix they are valid for (`s3://bucket/path`).
    pub prefix: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: Secret,
    /// Session token.
    pub session_token: Option<Secret>,
    /// When they expire, if the catalog said.
    pub expires_at: Option<SystemTime>,
}

impl fmt::Debug for StorageCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StorageCredential")
            .field("prefix", &self.prefix)
            .field("access_key_id", &self.access_key_id)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl StorageCredential {
    /// S3 credentials from a `config` map of the REST spec (`s3.access-key-id`,
    /// `s3.secret-access-key`, `s3.session-token`, and the expiry as
    /// `s3.session-token-expires-at-ms` or `expiration-time`); `None` without keys.
    pub fn from_config(prefix: &str, config: &Map<String, Value>) -> Option<Self> {
        let text = |key: &str| config.get(key).and_then(Value::as_str).filter(|v| !v.is_empty());
        let millis = |key: &str| {
            config.get(key).and_then(|v| v.as_u64().or_else(|| v.as_str().and_then(|s| s.trim().parse().ok())))
        };
        Some(Self {
            prefix: prefix.trim_end_matches('/').to_owned(),
            access_key_id: text("s3.access-key-id")?.to_owned(),
            secret_access_key: Secret::new(text("s3.secret-access-key")?),
            session_token: text("s3.session-token").map(Secret::new),
            expires_at: millis("s3.session-token-expires-at-ms")
                .or_else(|| millis("expiration-time"))
                .map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
        })
    }

    /// Every S3 credential of a loadTable-shaped answer: its
    /// `storage-credentials`, else keys in its `config` (valid under the
    /// table's `location`).
    pub fn from_answer(answer: &Value) -> Vec<Self> {
        let listed: Vec<Self> = answer
            .get("storage-credentials")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|c| Self::from_config(c.get("prefix")?.as_str()?, c.get("config")?.as_object()?))
            .collect();
        if !listed.is_empty() {
            return listed;
        }
        let location = answer.pointer("/metadata/location").and_then(Value::as_str);
        match (location, answer.get("config").and_then(Value::as_object)) {
            (Some(location), Some(config)) => Self::from_config(location, config).into_iter().collect(),
            _ => Vec::new(),
        }
    }

    fn as_aws(&self) -> AwsCredential {
        AwsCredential {
            key_id: self.access_key_id.clone(),
            secret_key: self.secret_access_key.expose().to_owned(),
            token: self.session_token.as_ref().map(|t| t.expose().to_owned()),
        }
    }
}

/// Asks the catalog that vended credentials for fresh ones.
#[async_trait::async_trait]
pub trait Renew: Send + Sync + fmt::Debug {
    /// The credentials the catalog vends now for the table.
    async fn renew(&self) -> Result<Vec<StorageCredential>, String>;
}

/// The vended credentials icerelay holds, by prefix.
#[derive(Debug, Default)]
pub struct VendedCredentials {
    entries: RwLock<BTreeMap<String, Arc<Entry>>>,
}

#[derive(Debug)]
struct Entry {
    prefix: String,
    current: Mutex<Held>,
    /// One renewal at a time; the others wait for its result.
    renewing: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
struct Held {
    credential: StorageCredential,
    /// When icerelay got them, to renew at half their life when that is short.
    received: SystemTime,
    renew: Arc<dyn Renew>,
    /// After a failed renewal: serve these (still valid) until then, then try again.
    retry_after: Option<SystemTime>,
}

impl VendedCredentials {
    /// Keeps `credentials`, renewed through `renew`; replaces those of the same prefix.
    pub fn remember(&self, credentials: Vec<StorageCredential>, renew: &Arc<dyn Renew>) {
        let mut entries = self.entries.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        for credential in credentials {
            let held = Held { credential, received: SystemTime::now(), renew: renew.clone(), retry_after: None };
            match entries.get(&held.credential.prefix) {
                Some(entry) => *entry.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = held,
                None => {
                    let prefix = held.credential.prefix.clone();
                    entries.insert(
                        prefix.clone(),
                        Arc::new(Entry { prefix, current: Mutex::new(held), renewing: tokio::sync::Mutex::new(()) }),
                    );
                }
            }
        }
    }

    /// The credentials for `url` (longest covering prefix), as an `object_store` provider.
    pub fn provider(self: &Arc<Self>, url: &str) -> Option<VendedProvider> {
        let entries = self.entries.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = entries.values().filter(|e| is_under(url, &e.prefix)).max_by_key(|e| e.prefix.len())?;
        Some(VendedProvider { entry: entry.clone(), all: self.clone() })
    }
}

/// Credentials for one prefix, renewed before they expire.
#[derive(Debug)]
pub struct VendedProvider {
    entry: Arc<Entry>,
    all: Arc<VendedCredentials>,
}

impl VendedProvider {
    /// The prefix whose credentials this provides (a store is built per prefix).
    pub fn prefix(&self) -> &str {
        &self.entry.prefix
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.entry.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The credentials, unless they are due for renewal.
    fn fresh(&self) -> Option<AwsCredential> {
        let held = self.held();
        let Some(expires_at) = held.credential.expires_at else { return Some(held.credential.as_aws()) };
        let now = SystemTime::now();
        if held.retry_after.is_some_and(|at| now < at) && now < expires_at {
            return Some(held.credential.as_aws());
        }
        let life = expires_at.duration_since(held.received).unwrap_or_default();
        let renew_at = expires_at.checked_sub(renewal_margin(life)).unwrap_or(expires_at);
        (now < renew_at).then(|| held.credential.as_aws())
    }

    async fn renewed(&self) -> Result<AwsCredential, String> {
        let _one = self.entry.renewing.lock().await;
        if let Some(fresh) = self.fresh() {
            return Ok(fresh); // renewed while this call waited
        }
        let renew = self.held().renew.clone();
        let outcome = renew.renew().await.and_then(|credentials| {
            // The answer's credential for this prefix: the same prefix, or the
            // narrowest one that covers it.
            let best = credentials
                .iter()
                .filter(|c| is_under(&self.entry.prefix, &c.prefix))
                .max_by_key(|c| c.prefix.len())
                .cloned()
                .filter(|c| c.expires_at.is_none_or(|at| at > SystemTime::now()));
            let key_ids: Vec<String> = credentials.iter().map(|c| c.access_key_id.clone()).collect();
            self.all.remember(credentials, &renew);
            best.ok_or_else(|| {
                format!(
                    "the catalog renewed credentials (key ids {key_ids:?}) but none for {} that have not expired",
                    self.entry.prefix
                )
            })
        });
        let mut held = self.held();
        match outcome {
            Ok(credential) => {
                tracing::debug!(prefix = %self.entry.prefix, key_id = %credential.access_key_id, "vended storage credentials renewed");
                *held = Held { credential, received: SystemTime::now(), renew, retry_after: None };
                Ok(held.credential.as_aws())
            }
            // Credentials that have not expired yet still serve; the next
            // renewal is tried after a pause, not on every request.
            Err(message) if held.credential.expires_at.is_some_and(|at| at > SystemTime::now()) => {
                tracing::warn!(prefix = %self.entry.prefix, error = %message, "cannot renew vended storage credentials; using them until they expire");
                held.retry_after = Some(SystemTime::now() + RENEW_RETRY);
                Ok(held.credential.as_aws())
            }
            Err(message) => Err(message),
        }
    }
}

#[async_trait::async_trait]
impl object_store::CredentialProvider for VendedProvider {
    type Credential = AwsCredential;

    async fn get_credential(&self) -> object_store::Result<Arc<AwsCredential>> {
        if let Some(fresh) = self.fresh() {
            return Ok(Arc::new(fresh));
        }
        self.renewed().await.map(Arc::new).map_err(|message| object_store::Error::Generic {
            store: "S3",
            source: format!("vended credentials for {}: {message}", self.entry.prefix).into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::CredentialProvider;
    use serde_json::json;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Debug, Default)]
    struct Counting(AtomicUsize);

    #[async_trait::async_trait]
    impl Renew for Counting {
        async fn renew(&self) -> Result<Vec<StorageCredential>, String> {
            let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
            let expires = SystemTime::now() + Duration::from_secs(3600);
            Ok(vec![credential("s3://bucket/wh", &format!("renewed-{n}"), Some(expires))])
        }
    }

    fn credential(prefix: &str, key: &str, expires_at: Option<SystemTime>) -> StorageCredential {
        StorageCredential {
            prefix: prefix.into(),
            access_key_id: key.into(),
            secret_access_key: Secret::new("secret"),
            session_token: None,
            expires_at,
        }
    }

    #[derive(Debug)]
    struct Failing(AtomicUsize);

    #[async_trait::async_trait]
    impl Renew for Failing {
        async fn renew(&self) -> Result<Vec<StorageCredential>, String> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Err("catalog unreachable".into())
        }
    }

    #[tokio::test]
    async fn a_failed_renewal_keeps_valid_credentials_and_waits_before_trying_again() {
        let all = Arc::new(VendedCredentials::default());
        let failing = Arc::new(Failing(AtomicUsize::new(0)));
        let renew: Arc<dyn Renew> = failing.clone();
        // Due for renewal (half of a 4 s life is over) but valid for about a second more.
        let expires = SystemTime::now() + Duration::from_millis(1200);
        all.remember(vec![credential("s3://bucket/wh", "due", Some(expires))], &renew);
        all.entries.read().expect("lock")["s3://bucket/wh"].current.lock().expect("lock").received =
            SystemTime::now() - Duration::from_millis(2800);
        let provider = all.provider("s3://bucket/wh/x").expect("covered");
        assert_eq!(provider.get_credential().await.expect("still valid").key_id, "due");
        assert_eq!(provider.get_credential().await.expect("still valid").key_id, "due");
        assert_eq!(failing.0.load(Ordering::SeqCst), 1, "one try, then a pause");
        let expired = SystemTime::now() - Duration::from_secs(1);
        all.remember(vec![credential("s3://bucket/wh", "gone", Some(expired))], &renew);
        let e = provider.get_credential().await.expect_err("expired and not renewable");
        assert!(e.to_string().contains("catalog unreachable"), "{e}");
    }

    #[test]
    fn answers_give_storage_credentials_or_config_keys_under_the_location() {
        let answer = json!({
            "metadata": {"location": "s3://bucket/wh/t"},
            "config": {"s3.access-key-id": "from-config", "s3.secret-access-key": "s"},
            "storage-credentials": [
                {"prefix": "s3://bucket/wh/", "config": {"s3.access-key-id": "listed", "s3.secret-access-key": "s",
                 "s3.session-token": "t", "s3.session-token-expires-at-ms": "1700000000000"}},
                {"prefix": "gs://other", "config": {"gcs.oauth2.token": "x"}}]
        });
        let listed = StorageCredential::from_answer(&answer);
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].prefix.as_str(), listed[0].access_key_id.as_str()), ("s3://bucket/wh", "listed"));
        assert_eq!(listed[0].expires_at, Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_000)));
        let mut older = answer.clone();
        older.as_object_mut().expect("object").remove("storage-credentials");
        let from_config = StorageCredential::from_answer(&older);
        assert_eq!(
            (from_config[0].prefix.as_str(), from_config[0].access_key_id.as_str()),
            ("s3://bucket/wh/t", "from-config")
        );
        assert!(!format!("{from_config:?}").contains("\"s\""), "Debug never shows the secret");
    }

    #[tokio::test]
    async fn the_longest_prefix_serves_and_expired_credentials_are_renewed_once() {
        let all = Arc::new(VendedCredentials::default());
        let renew = Arc::new(Counting::default());
        let as_renew: Arc<dyn Renew> = renew.clone();
        let past = SystemTime::now() - Duration::from_secs(1);
        all.remember(
            vec![credential("s3://bucket", "wide", None), credential("s3://bucket/wh", "expired", Some(past))],
            &as_renew,
        );
        assert!(all.provider("s3://elsewhere/x").is_none());
        assert!(all.provider("s3://bucket-2/x").is_none(), "a prefix ends at a segment");
        let wide = all.provider("s3://bucket/other/x").expect("covered");
        assert_eq!(wide.get_credential().await.expect("credential").key_id, "wide");

        let table = all.provider("s3://bucket/wh/data/f.parquet").expect("covered");
        assert_eq!(table.prefix(), "s3://bucket/wh");
        let (a, b) = tokio::join!(table.get_credential(), table.get_credential());
        assert_eq!(a.expect("renewed").key_id, "renewed-1");
        assert_eq!(b.expect("renewed").key_id, "renewed-1");
        assert_eq!(renew.0.load(Ordering::SeqCst), 1, "one renewal for concurrent callers");
        assert_eq!(table.get_credential().await.expect("fresh").key_id, "renewed-1");
    }

    #[tokio::test]
    async fn short_lived_credentials_are_renewed_at_half_their_life() {
        let all = Arc::new(VendedCredentials::default());
        let renew: Arc<dyn Renew> = Arc::new(Counting::default());
        // Fresh for 1.5 s (half of 3 s), renewed after.
        let soon = SystemTime::now() + Duration::from_secs(3);
        all.remember(vec![credential("s3://bucket/wh", "short", Some(soon))], &renew);
        let provider = all.provider("s3://bucket/wh/x").expect("covered");
        assert_eq!(provider.get_credential().await.expect("fresh").key_id, "short");
        tokio::time::sleep(Duration::from_millis(1600)).await;
        assert_eq!(provider.get_credential().await.expect("renewed").key_id, "renewed-1");
    }
}
