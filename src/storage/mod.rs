//! Object storage: resolving file URLs to stores, and reading, writing and copying objects.
//!
//! - [`Storage`] resolves a file URL (`s3://bucket/key`, `file:///path`) to
//!   the store configured by the `[[storage]]` section with the longest
//!   matching prefix, and offers the few operations icerelay needs: head,
//!   bounded reads, writes.
//!
//! **Confinement.** Every URL icerelay reads or writes comes, in the end,
//! from table metadata that anyone with commit rights on a replicated table
//! can write. So a URL outside every configured prefix is refused before a
//! byte is read: local files (`file://`) included, which resolve only where a
//! `[[storage]]` prefix names their directory, and URLs with `.` or `..`
//! segments, which could climb out of a prefix. Java's `file:/path` is the
//! same URL as `file:///path`.
//! - [`copy`]: the copy engine, streaming, parallel, idempotent, verified and
//!   resumable through [`checkpoint`]s.
//!
//! - [`vended`]: credentials catalogs vend for a table's files, used where a
//!   `[[storage]]` entry has no keys of its own.
//!
//! S3 and local files go through the `object_store` crate; icerelay never
//! speaks S3 itself. Errors name the URL, never a credential.

pub mod checkpoint;
pub mod copy;
pub mod vended;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, AwsCredential};
use object_store::client::{HttpClient, HttpConnector};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, Attributes, BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions,
    PutPayload, RetryConfig,
};

use crate::catalog::sigv4::AwsCredentials;
use crate::config::{Sse, StorageConfig, StorageKind};
pub use crate::rewrite::path_map::normalize_file_url;
use vended::VendedCredentials;

/// Errors of storage operations.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// No `[[storage]]` section covers the URL: icerelay neither reads nor writes it.
    #[error("{url} is outside every [[storage]] prefix (configured: {}); icerelay reads and writes only under \
        configured prefixes: if this {} location is meant to be replicated, add a [[storage]] section whose prefix \
        it starts with",
        if known.is_empty() { "none".to_owned() } else { known.join(", ") },
        url.split(':').next().unwrap_or_default())]
    NoStore {
        /// The URL.
        url: String,
        /// The configured prefixes.
        known: Vec<String>,
    },
    /// The URL cannot be turned into an object location.
    #[error("{url} is not a usable file URL: {reason}")]
    InvalidUrl {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The object does not exist.
    #[error("{url} does not exist")]
    NotFound {
        /// The URL.
        url: String,
    },
    /// The object is larger than the caller allows to read whole.
    #[error("{url} is {size} bytes, more than the {limit} bytes icerelay reads into memory for this kind of file")]
    TooLarge {
        /// The URL.
        url: String,
        /// Its size.
        size: u64,
        /// The bound.
        limit: u64,
    },
    /// The store failed.
    #[error("{operation} {url} failed: {source}")]
    Store {
        /// `read`, `write`, `head`, `copy`.
        operation: &'static str,
        /// The URL.
        url: String,
        /// Cause (object_store never includes credentials in its errors).
        #[source]
        source: object_store::Error,
    },
    /// A written object does not match what was written.
    #[error("verification of {url} failed after writing: {detail}")]
    Verification {
        /// The URL.
        url: String,
        /// What differs.
        detail: String,
    },
}

impl StorageError {
    /// The URL of the object a read found missing, if that is what this is
    /// (a write into a missing bucket stays a [`StorageError::Store`]).
    pub fn missing_url(&self) -> Option<&str> {
        match self {
            Self::NotFound { url } => Some(url),
            _ => None,
        }
    }

    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Store { source, .. } => !matches!(
                source,
                object_store::Error::NotFound { .. }
                    | object_store::Error::InvalidPath { .. }
                    | object_store::Error::NotSupported { .. }
                    | object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
            ),
            Self::Verification { .. } => true,
            _ => false,
        }
    }

    fn store(operation: &'static str, url: &str, source: object_store::Error) -> Self {
        match source {
            object_store::Error::NotFound { .. } if matches!(operation, "read" | "head") => {
                Self::NotFound { url: url.to_owned() }
            }
            source => Self::Store { operation, url: url.to_owned(), source },
        }
    }
}

/// What a store says about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Size in bytes.
    pub size: u64,
    /// The store's entity tag, if any.
    pub e_tag: Option<String>,
}

/// An object: its store and its path in it.
#[derive(Debug, Clone)]
pub struct Location {
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// The path inside the store.
    pub path: ObjectPath,
    /// The URL, for messages.
    pub url: String,
    /// Attributes of every object written here (the storage class).
    pub attributes: Attributes,
}

impl Location {
    /// Options of a single-request write.
    pub fn put_options(&self) -> PutOptions {
        PutOptions { attributes: self.attributes.clone(), ..PutOptions::default() }
    }

    /// Options of a multipart write.
    pub fn multipart_options(&self) -> PutMultipartOptions {
        PutMultipartOptions { attributes: self.attributes.clone(), ..PutMultipartOptions::default() }
    }
}

/// The configured stores, resolved by longest URL prefix.
#[derive(Debug)]
pub struct Storage {
    configs: Vec<StorageConfig>,
    /// One store per (configured prefix, bucket, vended prefix), built on first use.
    stores: Mutex<HashMap<StoreKey, Arc<dyn ObjectStore>>>,
    /// One HTTP client (connection pool, trusted roots) per `[[storage]]`
    /// entry, shared by its stores: with vended credentials there is a store
    /// per table.
    clients: Mutex<HashMap<usize, reqwest::Client>>,
    local: Arc<dyn ObjectStore>,
    vended: Arc<VendedCredentials>,
}

/// A built store: its `[[storage]]` entry, bucket, and the prefix of the
/// vended credentials it signs with, if any.
type StoreKey = (usize, String, Option<String>);

impl Storage {
    /// Stores for `configs`; URLs under none of their prefixes are refused.
    pub fn new(configs: &[StorageConfig]) -> Self {
        let mut configs: Vec<StorageConfig> = configs
            .iter()
            .map(|c| StorageConfig { prefix: normalize_file_url(&c.prefix).into_owned(), kind: c.kind.clone() })
            .collect();
        configs.sort_by_key(|c| std::cmp::Reverse(c.prefix.len()));
        Self {
            configs,
            stores: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            local: Arc::new(LocalFileSystem::new()),
            vended: Arc::new(VendedCredentials::default()),
        }
    }

    /// The credentials catalogs vended, which keyless S3 entries use.
    pub fn vended(&self) -> &Arc<VendedCredentials> {
        &self.vended
    }

    /// Resolves a file URL, if it is under a configured prefix.
    pub fn resolve(&self, url: &str) -> Result<Location, StorageError> {
        let normalized = normalize_file_url(url);
        if has_dot_segment(&normalized) {
            return Err(StorageError::InvalidUrl {
                url: url.to_owned(),
                reason: "it has a `.` or `..` path segment, which could leave its [[storage]] prefix".into(),
            });
        }
        let (index, config) = self
            .configs
            .iter()
            .enumerate()
            .find(|(_, c)| is_under(&normalized, &c.prefix))
            .ok_or_else(|| StorageError::NoStore { url: url.to_owned(), known: self.prefixes() })?;
        if let StorageKind::Local = config.kind {
            let path = local_path(&normalized).ok_or_else(|| StorageError::InvalidUrl {
                url: url.to_owned(),
                reason: "expected file:///path".into(),
            })?;
            let path = ObjectPath::from_absolute_path(path)
                .map_err(|e| StorageError::InvalidUrl { url: url.to_owned(), reason: e.to_string() })?;
            return Ok(Location {
                store: self.local.clone(),
                path,
                url: url.to_owned(),
                attributes: Attributes::new(),
            });
        }
        let (bucket, key) = split_bucket(url).ok_or_else(|| StorageError::InvalidUrl {
            url: url.to_owned(),
            reason: "expected s3://bucket/key".into(),
        })?;
        if !is_bucket_name(bucket) {
            // The bucket becomes part of the request's host name: a path a
            // table names must not send icerelay's signed requests elsewhere.
            return Err(StorageError::InvalidUrl {
                url: url.to_owned(),
                reason: format!(
                    "{bucket:?} is not an S3 bucket name (letters, digits, `.`, `-` and `_`, starting and ending \
                     with a letter or digit, at most 255 characters)"
                ),
            });
        }
        let path = ObjectPath::parse(key)
            .map_err(|e| StorageError::InvalidUrl { url: url.to_owned(), reason: e.to_string() })?;
        let store = self.s3_store(index, config, bucket, url)?;
        let mut attributes = Attributes::new();
        if let StorageKind::S3 { storage_class: Some(class), .. } = &config.kind {
            attributes.insert(Attribute::StorageClass, class.clone().into());
        }
        Ok(Location { store, path, url: url.to_owned(), attributes })
    }

    fn prefixes(&self) -> Vec<String> {
        self.configs.iter().map(|c| c.prefix.clone()).collect()
    }

    fn s3_store(
        &self,
        index: usize,
        config: &StorageConfig,
        bucket: &str,
        url: &str,
    ) -> Result<Arc<dyn ObjectStore>, StorageError> {
        let StorageKind::S3 {
            endpoint,
            region,
            path_style,
            access_key_id,
            secret_access_key,
            session_token,
            sse,
            storage_class: _,
            ca_file,
        } = &config.kind
        else {
            return Err(StorageError::InvalidUrl { url: url.to_owned(), reason: "not an S3 store".into() });
        };
        // Configured keys win; without them, credentials a catalog vended for
        // this URL, else the AWS chain.
        let vended = if access_key_id.is_none() { self.vended.provider(url) } else { None };
        let key = (index, bucket.to_owned(), vended.as_ref().map(|v| v.prefix().to_owned()));
        let mut stores = self.stores.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(store) = stores.get(&key) {
            return Ok(store.clone());
        }
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(region)
            .with_virtual_hosted_style_request(!path_style)
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: 5,
                retry_timeout: Duration::from_secs(120),
            })
            .with_http_connector(NoRedirects { client: self.http_client(index, ca_file.as_deref(), url)? });
        if let Some(endpoint) = endpoint {
            let endpoint = endpoint.as_str().trim_end_matches('/');
            builder = builder.with_endpoint(endpoint).with_allow_http(endpoint.starts_with("http://"));
        }
        // object_store sends the encryption headers on every write (single
        // and multipart) once its builder knows the type.
        if let Some(sse) = sse {
            let kind = match sse {
                Sse::Aes256 => "AES256",
                Sse::Kms { .. } => "aws:kms",
            };
            // (object_store does not export the typed key; its name parses.)
            let key = "aws_server_side_encryption"
                .parse::<AmazonS3ConfigKey>()
                .map_err(|e| StorageError::store("configure", url, e))?;
            builder = builder.with_config(key, kind);
        }
        if let Some(Sse::Kms { key_id: Some(key) }) = sse {
            builder = builder.with_sse_kms_encryption(key);
        }
        if let (Some(id), Some(secret)) = (access_key_id, secret_access_key) {
            builder = builder.with_access_key_id(id).with_secret_access_key(secret.expose());
            if let Some(token) = session_token {
                builder = builder.with_token(token.expose());
            }
        } else if let Some(vended) = vended {
            builder = builder.with_credentials(Arc::new(vended));
        } else {
            // No keys: the standard AWS chain, as for catalogs.
            builder = builder.with_credentials(Arc::new(ChainCredentials(AwsCredentials::chain(), region.clone())));
        }
        let store: Arc<dyn ObjectStore> =
            Arc::new(builder.build().map_err(|e| StorageError::store("configure", url, e))?);
        stores.insert(key, store.clone());
        Ok(store)
    }

    /// The HTTP client of the `index`th `[[storage]]` entry, built on first use.
    fn http_client(&self, index: usize, ca_file: Option<&Path>, url: &str) -> Result<reqwest::Client, StorageError> {
        let mut clients = self.clients.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(client) = clients.get(&index) {
            return Ok(client.clone());
        }
        let configure = |reason: String| StorageError::InvalidUrl { url: url.to_owned(), reason };
        let roots = crate::tls::reqwest_roots(ca_file).map_err(|e| configure(format!("[[storage]] ca_file: {e}")))?;
        let client = reqwest::Client::builder()
            .tls_certs_merge(roots)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(300))
            .build()
            .map_err(|e| configure(format!("cannot build its HTTP client: {e}")))?;
        clients.insert(index, client.clone());
        Ok(client)
    }

    /// Size and entity tag of an object; `None` if it does not exist.
    pub async fn head(&self, url: &str) -> Result<Option<ObjectInfo>, StorageError> {
        let location = self.resolve(url)?;
        head(&location).await
    }

    /// Reads a whole object of at most `limit` bytes.
    pub async fn read(&self, url: &str, limit: u64) -> Result<Bytes, StorageError> {
        let location = self.resolve(url)?;
        let result = location.store.get(&location.path).await.map_err(|e| StorageError::store("read", url, e))?;
        let size = result.meta.size;
        if size > limit {
            return Err(StorageError::TooLarge { url: url.to_owned(), size, limit });
        }
        let bytes = result.bytes().await.map_err(|e| StorageError::store("read", url, e))?;
        if bytes.len() as u64 != size {
            return Err(StorageError::Verification {
                url: url.to_owned(),
                detail: format!("read {} bytes of a {size}-byte object", bytes.len()),
            });
        }
        Ok(bytes)
    }

    /// Writes an object whole, then checks its size (and MD5 entity tag where the store gives one).
    pub async fn write(&self, url: &str, bytes: Bytes) -> Result<ObjectInfo, StorageError> {
        let location = self.resolve(url)?;
        let md5 = copy::md5_hex(&bytes);
        let size = bytes.len() as u64;
        let result = location
            .store
            .put_opts(&location.path, PutPayload::from_bytes(bytes), location.put_options())
            .await
            .map_err(|e| StorageError::store("write", url, e))?;
        copy::verify_written(&location, size, result.e_tag.as_deref(), &copy::ExpectedTag::Single(md5)).await
    }
}

/// S3 credentials from the standard AWS chain (environment, profile, web
/// identity, ECS, EC2), cached and refreshed as for catalogs; the region
/// names the store in errors.
#[derive(Debug)]
struct ChainCredentials(AwsCredentials, String);

#[async_trait::async_trait]
impl object_store::CredentialProvider for ChainCredentials {
    type Credential = AwsCredential;

    async fn get_credential(&self) -> object_store::Result<Arc<AwsCredential>> {
        let c = self
            .0
            .get("s3", &self.1)
            .await
            .map_err(|e| object_store::Error::Generic { store: "S3", source: Box::new(e) })?;
        Ok(Arc::new(AwsCredential {
            key_id: c.access_key_id().to_owned(),
            secret_key: c.secret_access_key().to_owned(),
            token: c.session_token().map(str::to_owned),
        }))
    }
}

/// The HTTP client of the S3 stores: object_store's own follows redirects,
/// and a redirect to another host would carry the request's session token
/// (`x-amz-security-token`) there. A redirect is an error instead
/// ([`Storage::http_client`] builds the client: no redirects, the system's
/// roots and those of the store's `ca_file`).
#[derive(Debug, Clone)]
struct NoRedirects {
    client: reqwest::Client,
}

impl HttpConnector for NoRedirects {
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<HttpClient> {
        Ok(HttpClient::new(self.client.clone()))
    }
}

async fn head(location: &Location) -> Result<Option<ObjectInfo>, StorageError> {
    match location.store.head(&location.path).await {
        Ok(meta) => Ok(Some(ObjectInfo { size: meta.size, e_tag: meta.e_tag })),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(StorageError::store("head", &location.url, e)),
    }
}

/// The local path of a `file:///a/b` URL.
fn local_path(url: &str) -> Option<&str> {
    url.strip_prefix("file://").filter(|path| path.starts_with('/'))
}

/// Whether `url` is `prefix` or below it. A prefix without a trailing `/`
/// ends at a path segment: `s3://wh` covers `s3://wh/x`, not `s3://wh-other/x`.
pub(crate) fn is_under(url: &str, prefix: &str) -> bool {
    match url.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Whether a URL's path has a `.` or `..` segment, raw or percent-encoded.
fn has_dot_segment(url: &str) -> bool {
    let path = url.split_once("://").map_or(url, |(_, rest)| rest);
    crate::dot_segments::has_dot_segment(path)
}

/// `s3://bucket/key` (or `s3a://`, `s3n://`) into bucket and key.
fn split_bucket(url: &str) -> Option<(&str, &str)> {
    let (_, rest) = url.split_once("://")?;
    let (bucket, key) = rest.split_once('/')?;
    (!bucket.is_empty() && !key.is_empty()).then_some((bucket, key))
}

/// Whether `bucket` can be an S3 bucket name: today's rules (lower case, at
/// most 63 characters) and the legacy ones some buckets still have (upper case
/// and `_`, up to 255). Anything else (`?`, `#`, `@`, `:`, `%`, a space) could
/// change the host a virtual-hosted request goes to.
fn is_bucket_name(bucket: &str) -> bool {
    let edges_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    bucket.len() <= 255
        && edges_ok(bucket.chars().next())
        && edges_ok(bucket.chars().last())
        && bucket.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn s3(prefix: &str) -> StorageConfig {
        StorageConfig {
            prefix: prefix.into(),
            kind: StorageKind::S3 {
                endpoint: Some(reqwest::Url::parse("http://127.0.0.1:1").expect("url")),
                region: "us-east-1".into(),
                path_style: true,
                access_key_id: Some("id".into()),
                secret_access_key: Some(Secret::new("very-secret")),
                session_token: None,
                sse: None,
                storage_class: None,
                ca_file: None,
            },
        }
    }

    #[test]
    fn urls_resolve_by_longest_prefix_or_fail_with_advice() {
        let storage = Storage::new(&[s3("s3://"), s3("s3://warehouse/")]);
        let location = storage.resolve("s3://warehouse/db/t/data/a=1/x.parquet").expect("resolves");
        assert_eq!(location.path.as_ref(), "db/t/data/a=1/x.parquet");
        assert!(storage.resolve("s3://other/x").is_ok(), "the s3:// prefix covers other buckets");
        let storage = Storage::new(&[s3("s3://warehouse/")]);
        let e = storage.resolve("s3://other/x").expect_err("not covered");
        assert!(e.to_string().contains("s3://other/x") && e.to_string().contains("s3://warehouse/"), "{e}");
        assert!(!format!("{storage:?}").contains("very-secret"));
        assert!(storage.resolve("s3://warehouse-other/x").is_err(), "a prefix ends at a path segment");
    }

    #[test]
    fn a_bucket_that_would_change_the_request_host_is_refused() {
        let storage = Storage::new(&[s3("s3://")]);
        for url in [
            "s3://attacker.example?/x",
            "s3://attacker.example#/x",
            "s3://user@host/x",
            "s3://host:8080/x",
            "s3://a%2fb/x",
            "s3://.hidden/x",
            "s3://bucket-/x",
            "s3://has space/x",
        ] {
            let e = storage.resolve(url).expect_err("not a bucket name");
            assert!(e.to_string().contains("is not an S3 bucket name"), "{url}: {e}");
        }
        for url in ["s3://warehouse/x", "s3://my.bucket-2/x", "s3://Legacy_Bucket/x", "s3://abc--table-s3/x"] {
            assert!(storage.resolve(url).is_ok(), "{url} is a bucket name");
        }
    }

    fn local(prefix: &str) -> StorageConfig {
        StorageConfig { prefix: prefix.into(), kind: StorageKind::Local }
    }

    #[test]
    fn only_configured_prefixes_resolve_local_files_included() {
        let storage = Storage::new(&[s3("s3://warehouse/")]);
        for url in ["file:///etc/passwd", "file:/etc/passwd", "file:///tmp/wh/t/metadata/v1.json"] {
            let e = storage.resolve(url).expect_err("local files are not configured");
            assert!(matches!(e, StorageError::NoStore { .. }), "{url}: {e}");
            assert!(
                e.to_string().contains("outside every [[storage]] prefix") && e.to_string().contains("file"),
                "{e}"
            );
        }
        let storage = Storage::new(&[local("file:/tmp/wh/"), s3("s3://warehouse/")]);
        let at = storage.resolve("file:///tmp/wh/t/metadata/v1.json").expect("under the local prefix");
        assert_eq!(at.path.as_ref(), "tmp/wh/t/metadata/v1.json");
        assert!(storage.resolve("file:/tmp/wh/t/java-style").is_ok(), "Hadoop-style URLs are the same");
        let at = storage.resolve("file://localhost/tmp/wh/t/x").expect("localhost is this machine");
        assert_eq!(at.path.as_ref(), "tmp/wh/t/x");
        assert!(storage.resolve("file://otherhost/tmp/wh/t/x").is_err(), "another host is not");
        assert!(storage.resolve("file:///tmp/other/x").is_err());
        for climbing in [
            "file:///tmp/wh/../../etc/passwd",
            "file:///tmp/wh/%2e%2e/%2E%2E/etc/passwd",
            "file:/tmp/wh/./x",
            "s3://warehouse/a/../../other/x",
        ] {
            let e = storage.resolve(climbing).expect_err("dot segments");
            assert!(matches!(e, StorageError::InvalidUrl { .. }), "{climbing}: {e}");
        }
    }

    #[tokio::test]
    async fn a_local_file_outside_the_prefixes_is_never_read() {
        let dir = tempfile::tempdir().expect("dir");
        let secret = dir.path().join("key.pem");
        std::fs::write(&secret, "PRIVATE KEY").expect("write");
        let storage = Storage::new(&[local(&format!("file://{}/wh/", dir.path().display()))]);
        let e = storage.read(&format!("file://{}", secret.display()), 100).await.expect_err("outside");
        assert!(!e.to_string().contains("PRIVATE KEY"), "{e}");
        assert_eq!(storage.head(&format!("file:{}", secret.display())).await.ok(), None);
    }

    #[tokio::test]
    async fn local_write_read_head() {
        let dir = tempfile::tempdir().expect("dir");
        let storage = Storage::new(&[local(&format!("file://{}/", dir.path().display()))]);
        let url = format!("file://{}/a/b/c.json", dir.path().display());
        let info = storage.write(&url, Bytes::from_static(b"{\"x\":1}")).await.expect("write");
        assert_eq!(info.size, 7);
        assert_eq!(storage.read(&url, 100).await.expect("read"), Bytes::from_static(b"{\"x\":1}"));
        assert!(matches!(storage.read(&url, 3).await, Err(StorageError::TooLarge { .. })));
        assert_eq!(storage.head(&format!("{url}.missing")).await.expect("head"), None);
        assert!(matches!(storage.read(&format!("{url}.missing"), 9).await, Err(StorageError::NotFound { .. })));
    }
}
