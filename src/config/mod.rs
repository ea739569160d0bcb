//! Configuration: the TOML file, environment, and command-line overrides.
//!
//! Loading happens in three steps, so that every mistake is reported before
//! anything connects anywhere:
//!
//! 1. [`parse`] reads the TOML text into a [`raw::RawConfig`]: `ICERELAY__SECTION__KEY`
//!    environment overrides are applied to the TOML tree, `${VAR}` references
//!    in string values are expanded, and unknown keys are rejected.
//! 2. [`validate`] checks the raw values (addresses, URLs, names that refer to
//!    each other) without any I/O and collects *every* problem with its key path.
//! 3. The caller builds clients and listeners from the resulting [`Config`].
//!
//! The configuration is passed down explicitly; there is no global.

mod env;
pub mod raw;
mod secret;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use env::{Env, MapEnv, ProcessEnv};
use raw::{RawAuth, RawConfig, RawDestination, RawPrimary, RawReplication, RawRule, RawState, RawStorage};
use reqwest::Url;
pub use secret::Secret;

use crate::catalog::Namespace;

/// Default address of the proxy listener.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9181";
/// Default address of the admin listener.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9182";
/// Default bound on bodies icerelay buffers.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 16 * 1024 * 1024;
/// Default time a client has to send a request's headers.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a keep-alive connection may stay idle.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default bound on open client connections per proxy worker.
pub const DEFAULT_MAX_CONNECTIONS_PER_WORKER: usize = 10_000;

/// Keys whose values are credentials: their values never appear in a configuration error.
const SECRET_KEYS: &[&str] = &["token", "client_secret", "secret_access_key", "session_token", "admin_token"];

const ENV_OVERRIDE_PREFIX: &str = "ICERELAY__";

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Proxy listener address.
    pub listen: SocketAddr,
    /// Admin listener address.
    pub admin_listen: SocketAddr,
    /// URL clients use to reach icerelay, if set.
    pub public_url: Option<Url>,
    /// Bound on buffered request bodies and rewritten config answers.
    pub max_body_bytes: u64,
    /// Time in-flight requests get to finish on shutdown.
    pub shutdown_grace_period: Duration,
    /// Proxy worker threads.
    pub proxy_workers: usize,
    /// Client connection limits and timeouts of the proxy listener.
    pub connections: ConnectionLimits,
    /// Who may use the admin API.
    pub admin: AdminAccess,
    /// The primary catalog.
    pub primary: PrimaryConfig,
    /// Object stores.
    pub storage: Vec<StorageConfig>,
    /// Replica catalogs.
    pub destinations: Vec<DestinationConfig>,
    /// Replication rules.
    pub rules: Vec<RuleConfig>,
    /// Directory of replication's durable state.
    pub state_dir: PathBuf,
    /// The state store.
    pub state: StateBackend,
    /// Pacing and limits of replication.
    pub replication: ReplicationConfig,
    /// TLS on the proxy listener, if configured.
    pub tls: Option<ListenerTls>,
    /// TLS on the admin listener, if configured.
    pub admin_tls: Option<ListenerTls>,
    /// How often listener certificate files are checked for a change; `None`: on SIGHUP only.
    pub tls_reload_interval: Option<Duration>,
    /// Whether engine writes to read-only replicas are refused.
    pub read_only_replicas: bool,
    /// Where and how the audit log is written.
    pub audit: AuditConfig,
}

/// Where replication's state lives.
#[derive(Debug, Clone)]
pub enum StateBackend {
    /// SQLite in `state_dir`: one instance.
    Sqlite,
    /// PostgreSQL, shared by several instances.
    Postgres(crate::state::postgres::PostgresSettings),
}

/// The audit log's file and rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// The current file; rotated files get `.1`, `.2`, ... appended.
    pub path: PathBuf,
    /// Size at which the file is rotated.
    pub max_bytes: u64,
    /// Rotated files kept.
    pub keep: usize,
}

/// A listener's TLS certificate and key files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTls {
    /// PEM certificate chain, the server's certificate first.
    pub cert_file: PathBuf,
    /// PEM private key of that certificate.
    pub key_file: PathBuf,
}

impl Config {
    /// Whether any table replicates anywhere.
    pub fn replicates(&self) -> bool {
        !self.rules.is_empty()
    }
}

/// Limits that keep one client from taking the proxy down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Time a client has to send a request's headers.
    pub header_read_timeout: Duration,
    /// Time a keep-alive connection may stay idle between requests.
    pub idle_timeout: Duration,
    /// Open client connections per proxy worker; the excess is closed at once.
    pub max_connections_per_worker: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections_per_worker: DEFAULT_MAX_CONNECTIONS_PER_WORKER,
        }
    }
}

/// Access to the admin API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminAccess {
    /// The bearer token every protected request must carry; `None` leaves the API open.
    pub token: Option<Secret>,
    /// Whether `GET` status endpoints and `/metrics` answer without the token.
    pub open_reads: bool,
    /// Whether only requests addressed to `localhost` or an IP address are
    /// answered (no token on a loopback listener: DNS rebinding protection).
    pub local_hosts_only: bool,
}

/// `[replication]`, with defaults resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationConfig {
    /// Interval of the reconcile pass.
    pub reconcile_interval: Duration,
    /// Lanes running at once.
    pub max_concurrent_lanes: usize,
    /// Files copied at once within a lane.
    pub copy_parallelism: usize,
    /// First retry delay.
    pub retry_initial_backoff: Duration,
    /// Longest retry delay.
    pub retry_max_backoff: Duration,
    /// Whether this instance runs lanes (else it only records hints).
    pub replicate: bool,
    /// How long an instance's claim on a lane outlives its last renewal.
    pub lease_ttl: Duration,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            reconcile_interval: Duration::from_secs(60),
            max_concurrent_lanes: 4,
            copy_parallelism: 8,
            retry_initial_backoff: Duration::from_secs(1),
            retry_max_backoff: Duration::from_secs(300),
            replicate: true,
            lease_ttl: Duration::from_secs(30),
        }
    }
}

/// The primary catalog and how to reach it.
#[derive(Debug, Clone)]
pub struct PrimaryConfig {
    /// Base URI, without `/v1`.
    pub uri: Url,
    /// Warehouse for icerelay's own calls.
    pub warehouse: Option<String>,
    /// icerelay's own credentials.
    pub auth: AuthConfig,
    /// TCP/TLS connect timeout.
    pub connect_timeout: Duration,
    /// Time until the primary's answer starts.
    pub request_timeout: Duration,
    /// Longest pause between two chunks of an answer once it has started.
    pub body_idle_timeout: Duration,
    /// Idle time before a pooled connection is closed.
    pub pool_idle_timeout: Duration,
    /// Idle connections kept per host.
    pub pool_max_idle_per_host: usize,
    /// What happens to the engines' credentials.
    pub engine_auth: EngineAuth,
    /// CA certificates trusted besides the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Whether icerelay asks for (and uses) vended storage credentials.
    pub vended_credentials: bool,
}

/// What the proxy does with the credentials engines send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineAuth {
    /// Forwarded untouched; the primary authenticates the engine.
    Passthrough,
    /// Dropped; icerelay signs each forwarded request with its own SigV4 credentials.
    SigV4,
}

/// How icerelay authenticates its own calls to a catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthConfig {
    /// No credentials.
    None,
    /// A fixed bearer token.
    Bearer {
        /// The token.
        token: Secret,
    },
    /// OAuth2 client credentials.
    OAuth2 {
        /// Client id.
        client_id: String,
        /// Client secret.
        client_secret: Secret,
        /// Token endpoint; `None` means the catalog's own `/v1/oauth/tokens`.
        token_endpoint: Option<Url>,
        /// Requested scope.
        scope: String,
    },
    /// AWS SigV4 signing.
    SigV4(SigV4Config),
}

/// `auth = { type = "sigv4" }`: who signs, for which service and region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigV4Config {
    /// Signing service name.
    pub service: String,
    /// Signing region.
    pub region: String,
    /// Access key id (else the AWS environment).
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<Secret>,
    /// Session token.
    pub session_token: Option<Secret>,
    /// Shared-profile name for the AWS chain, when no keys are set.
    pub profile: Option<String>,
}

/// One object store, chosen by the longest matching URL prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConfig {
    /// URL prefix served by this store, e.g. `s3://warehouse/`.
    pub prefix: String,
    /// What kind of store it is.
    pub kind: StorageKind,
}

impl StorageConfig {
    /// A local directory, as `[[storage]] prefix = "file:///dir/"` would configure it.
    pub fn local_dir(dir: &Path) -> Self {
        let dir = dir.display().to_string();
        Self { prefix: format!("file://{}/", dir.trim_end_matches('/')), kind: StorageKind::Local }
    }

    /// Whether credentials a catalog vends are used here: an S3 store without keys.
    pub fn takes_vended_credentials(&self) -> bool {
        matches!(self.kind, StorageKind::S3 { access_key_id: None, .. })
    }
}

/// The kinds of object store icerelay can read and write.
// A handful of these exist, built once at start: their size does not matter,
// and boxing would only make every match on them harder to read.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageKind {
    /// Amazon S3 or an S3-compatible store.
    S3 {
        /// Endpoint; `None` means AWS.
        endpoint: Option<Url>,
        /// Region.
        region: String,
        /// Path-style addressing.
        path_style: bool,
        /// Access key id.
        access_key_id: Option<String>,
        /// Secret access key.
        secret_access_key: Option<Secret>,
        /// Session token.
        session_token: Option<Secret>,
        /// Server-side encryption of written objects.
        sse: Option<Sse>,
        /// Storage class of written objects.
        storage_class: Option<String>,
        /// CA certificates trusted besides the system's roots.
        ca_file: Option<PathBuf>,
    },
    /// A local filesystem (`file://` prefixes).
    Local,
}

/// Server-side encryption of the objects icerelay writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sse {
    /// SSE-S3 (`AES256`).
    Aes256,
    /// SSE-KMS, with a key id or the account's default key.
    Kms {
        /// The KMS key; `None` for the default `aws/s3` key.
        key_id: Option<String>,
    },
}

/// A replica catalog.
#[derive(Debug, Clone)]
pub struct DestinationConfig {
    /// Unique name.
    pub name: String,
    /// Base URI, without `/v1`.
    pub uri: Url,
    /// Warehouse to ask for.
    pub warehouse: Option<String>,
    /// icerelay's credentials for it.
    pub auth: AuthConfig,
    /// How replica tables are first made.
    pub bootstrap: BootstrapMode,
    /// Base location of replica tables, if configured.
    pub location: Option<String>,
    /// Properties set on every replica table.
    pub properties: BTreeMap<String, String>,
    /// Time allowed for one request.
    pub request_timeout: Duration,
    /// CA certificates trusted besides the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Whether icerelay asks for (and uses) vended storage credentials.
    pub vended_credentials: bool,
}

/// How a destination's replica tables are first made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootstrapMode {
    /// Probe the catalog: register where registerTable keeps history, else a
    /// create transaction where that keeps it, else create.
    Auto,
    /// Write the replica's metadata.json with the full history and register it.
    Register,
    /// Create an empty table and replay every snapshot onto it.
    Create,
    /// Create the table in a create transaction that carries the source's
    /// first commit, then replay the rest.
    CreateTransaction,
}

/// What a source drop does to the replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnDrop {
    /// Replicas stay (protection against accidents).
    #[default]
    Keep,
    /// Replicas are dropped too.
    Propagate,
}

/// Which namespaces a rule covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamespacePattern {
    /// `*`: every namespace.
    Any,
    /// One namespace (all its levels).
    Exact(Namespace),
}

/// A replication rule.
#[derive(Debug, Clone)]
pub struct RuleConfig {
    /// Namespaces covered.
    pub namespace: NamespacePattern,
    /// A single table, if the rule is table-level.
    pub table: Option<String>,
    /// Destination names.
    pub destinations: Vec<String>,
    /// Namespace of the replicas, if not the source's.
    pub target_namespace: Option<Namespace>,
    /// What a source drop does to the replicas.
    pub on_drop: OnDrop,
    /// URL prefixes the source tables' paths must be under (empty: any
    /// `[[storage]]` prefix), normalized as storage prefixes are.
    pub source_prefixes: Vec<String>,
}

/// Values given on the command line, applied over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--admin-listen`.
    pub admin_listen: Option<String>,
    /// `--upstream`: the primary's URI.
    pub upstream: Option<String>,
    /// `--public-url`.
    pub public_url: Option<String>,
}

// === errors ===

/// One problem in the configuration, with the key it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted key path (`primary.auth.client_secret`, `destinations[1].uri`),
    /// or a file position for syntax errors.
    pub key: String,
    /// What is wrong and what is expected instead.
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self { key: key.into(), message: message.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() { f.write_str(&self.message) } else { write!(f, "{}: {}", self.key, self.message) }
    }
}

/// Every problem found, one per line when displayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        Self(vec![e])
    }
}

// === loading ===

/// Reads, overrides and validates the configuration.
///
/// `path` may be `None` when everything needed comes from `overrides`
/// (`icerelay serve --upstream URL`).
pub fn load(path: Option<&Path>, overrides: &Overrides, env: &dyn Env) -> Result<Config, ConfigErrors> {
    let text = match path {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| ConfigError::new("", format!("cannot read configuration file {}: {e}", p.display())))?,
        None => String::new(),
    };
    let mut raw = parse(&text, env)?;
    apply_overrides(&mut raw, overrides);
    read_admin_token_file(&mut raw)?;
    let config = validate(raw)?;
    check_tls_files(&config)?;
    Ok(config)
}

/// Reads every TLS file the configuration names, so that a missing file, a
/// file without a certificate or a key that does not match is reported by
/// `check-config` and at start, with the key that names it.
fn check_tls_files(config: &Config) -> Result<(), ConfigErrors> {
    let mut errors = Vec::new();
    for (key, tls) in [("tls_cert_file", &config.tls), ("admin_tls_cert_file", &config.admin_tls)] {
        if let Some(tls) = tls
            && let Err(e) = crate::tls::ServerCertificate::load(&tls.cert_file, &tls.key_file)
        {
            errors.push(ConfigError::new(key, e.to_string()));
        }
    }
    let mut ca_files = vec![("primary.ca_file".to_owned(), config.primary.ca_file.as_ref())];
    ca_files.extend(
        config.destinations.iter().enumerate().map(|(i, d)| (format!("destinations[{i}].ca_file"), d.ca_file.as_ref())),
    );
    ca_files.extend(config.storage.iter().enumerate().map(|(i, s)| {
        let file = match &s.kind {
            StorageKind::S3 { ca_file, .. } => ca_file.as_ref(),
            StorageKind::Local => None,
        };
        (format!("storage[{i}].ca_file"), file)
    }));
    for (key, file) in ca_files {
        if let Some(file) = file
            && let Err(e) = crate::tls::read_certificates(file)
        {
            errors.push(ConfigError::new(key, format!("{e}; it must hold the PEM certificate of the CA to trust")));
        }
    }
    if errors.is_empty() { Ok(()) } else { Err(ConfigErrors(errors)) }
}

/// Puts the content of `admin_token_file` into `admin_token`.
fn read_admin_token_file(raw: &mut RawConfig) -> Result<(), ConfigErrors> {
    let Some(path) = raw.admin_token_file.take() else { return Ok(()) };
    if raw.admin_token.is_some() {
        return Err(ConfigError::new("admin_token_file", "set either admin_token or admin_token_file, not both").into());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| {
        ConfigError::new("admin_token_file", format!("cannot read {path}: {e}; the file must hold the admin token"))
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(
            ConfigError::new("admin_token_file", format!("{path} is empty; it must hold the admin token")).into()
        );
    }
    raw.admin_token = Some(Secret::new(token));
    Ok(())
}

/// Parses TOML text into a raw configuration, applying `ICERELAY__` overrides
/// and expanding `${VAR}` references.
pub fn parse(text: &str, env: &dyn Env) -> Result<RawConfig, ConfigErrors> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| syntax_error(text, &e))?;
    let mut value = toml::Value::Table(table);
    apply_env_overrides(&mut value, env)?;
    let mut errors = Vec::new();
    expand_strings(&mut value, &mut String::new(), env, &mut errors);
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    serde_path_to_error::deserialize::<_, RawConfig>(value).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." { String::new() } else { key };
        let message = if is_secret_key(&key) {
            // serde's type errors quote the value they got: never a secret's.
            "must be a string (the value is not shown: this key holds a credential)".to_owned()
        } else if key == "auth" || key.ends_with(".auth") {
            // Errors inside a tagged `auth` table are reported at the table,
            // so a value serde quotes may be one of its secrets. Only the
            // messages that quote names (of fields, of the auth types) are shown.
            let message = deserialize_message(e.inner());
            if ["unknown field", "missing field", "unknown variant"].iter().any(|m| message.starts_with(m)) {
                message
            } else {
                "must be an auth table such as { type = \"oauth2\", client_id = \"...\", client_secret = \
                 \"${SECRET}\" } (the value is not shown: it may hold a credential)"
                    .to_owned()
            }
        } else {
            deserialize_message(e.inner())
        };
        ConfigError::new(key, message).into()
    })
}

fn syntax_error(text: &str, e: &toml::de::Error) -> ConfigErrors {
    let position = e.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        format!("line {line}, column {column}")
    });
    ConfigError::new(position.unwrap_or_default(), format!("invalid TOML: {}", e.message().trim())).into()
}

/// Whether the last segment of a dotted key path names a credential.
fn is_secret_key(key: &str) -> bool {
    let last = key.rsplit('.').next().unwrap_or(key);
    SECRET_KEYS.contains(&last)
}

fn deserialize_message(e: &toml::de::Error) -> String {
    let message = e.message().trim().to_owned();
    // serde names the variants of `auth`'s `type` tag in lowercase already;
    // add the hint a user needs most often.
    if message.starts_with("unknown variant") {
        format!("{message} (auth types: none, bearer, oauth2, sigv4)")
    } else {
        message
    }
}

/// Applies `ICERELAY__SECTION__KEY=value` variables to the TOML tree.
///
/// Segments are lower-cased; a numeric segment indexes an array
/// (`ICERELAY__DESTINATIONS__0__URI`). The value is a string (number and
/// boolean keys accept their text), except that a value starting with `{` or
/// `[` is read as a TOML inline table or array (`ICERELAY__PRIMARY__AUTH`).
/// Reading every value as TOML would turn a secret made of digits into an
/// integer, and a type error would then print it.
fn apply_env_overrides(root: &mut toml::Value, env: &dyn Env) -> Result<(), ConfigErrors> {
    let mut errors = Vec::new();
    for (name, value) in env.vars_with_prefix(ENV_OVERRIDE_PREFIX) {
        let path: Vec<String> = name[ENV_OVERRIDE_PREFIX.len()..].split("__").map(|s| s.to_ascii_lowercase()).collect();
        if path.iter().any(String::is_empty) {
            errors.push(ConfigError::new(name.clone(), "malformed override name; expected ICERELAY__SECTION__KEY"));
            continue;
        }
        let parsed = if value.trim_start().starts_with(['{', '[']) {
            format!("v = {value}").parse::<toml::Table>().ok().and_then(|mut t| t.remove("v"))
        } else {
            None
        }
        .unwrap_or(toml::Value::String(value));
        if let Err(message) = set_path(root, &path, parsed) {
            errors.push(ConfigError::new(name, message));
        }
    }
    if errors.is_empty() { Ok(()) } else { Err(ConfigErrors(errors)) }
}

fn set_path(value: &mut toml::Value, path: &[String], new: toml::Value) -> Result<(), String> {
    let Some((head, rest)) = path.split_first() else {
        *value = new;
        return Ok(());
    };
    match value {
        toml::Value::Table(t) if rest.is_empty() => {
            t.insert(head.clone(), new);
            Ok(())
        }
        toml::Value::Table(t) => {
            if !t.contains_key(head)
                && let Some(index) = rest.first().and_then(|s| s.parse::<usize>().ok())
            {
                return Err(format!("there is no [[{head}]] entry {index} in the file to override"));
            }
            let child = t.entry(head.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            set_path(child, rest, new)
        }
        toml::Value::Array(items) => {
            let index: usize = head.parse().map_err(|_| format!("expected an array index, found `{head}`"))?;
            let len = items.len();
            let item = items
                .get_mut(index)
                .ok_or_else(|| format!("index {index} is out of range (the file has {len} entries)"))?;
            set_path(item, rest, new)
        }
        _ => Err(format!("cannot set `{head}`: its parent is not a table")),
    }
}

fn expand_strings(value: &mut toml::Value, key: &mut String, env: &dyn Env, errors: &mut Vec<ConfigError>) {
    match value {
        toml::Value::String(s) => match env::expand(s, env) {
            Ok(expanded) => *s = expanded,
            Err(env::ExpandError::Unset(name)) => errors.push(ConfigError::new(
                key.clone(),
                format!("environment variable {name} is not set; export it or write the value directly"),
            )),
            Err(env::ExpandError::Malformed(_)) if is_secret_key(key) => errors.push(ConfigError::new(
                key.clone(),
                "has a `${` that is not a valid variable reference (the value is not shown: this key holds a \
                 credential); write `$${` for a literal `${`",
            )),
            Err(env::ExpandError::Malformed(m)) => errors.push(ConfigError::new(key.clone(), m)),
        },
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = key.len();
                key.push_str(&format!("[{i}]"));
                expand_strings(item, key, env, errors);
                key.truncate(len);
            }
        }
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                let len = key.len();
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(k);
                expand_strings(v, key, env, errors);
                key.truncate(len);
            }
        }
        _ => {}
    }
}

fn apply_overrides(raw: &mut RawConfig, overrides: &Overrides) {
    if let Some(v) = &overrides.listen {
        raw.listen = Some(v.clone());
    }
    if let Some(v) = &overrides.admin_listen {
        raw.admin_listen = Some(v.clone());
    }
    if let Some(v) = &overrides.public_url {
        raw.public_url = Some(v.clone());
    }
    if let Some(v) = &overrides.upstream {
        raw.primary.get_or_insert_with(RawPrimary::default).uri = Some(v.clone());
    }
}

// === validation ===

/// Checks a raw configuration and resolves defaults. Pure: no I/O.
pub fn validate(raw: RawConfig) -> Result<Config, ConfigErrors> {
    let mut v = Validator::default();
    let listen = v.socket_addr("listen", raw.listen.as_deref().unwrap_or(DEFAULT_LISTEN));
    let admin_listen = v.socket_addr("admin_listen", raw.admin_listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN));
    if let (Some(a), Some(b)) = (listen, admin_listen)
        && a == b
        && a.port() != 0
    {
        v.error("admin_listen", format!("must differ from listen (both are {a})"));
    }
    let public_url = raw.public_url.as_deref().and_then(|u| v.http_url("public_url", u));
    let max_body_bytes = raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
    if max_body_bytes == 0 {
        v.error("max_body_bytes", "must be greater than 0");
    }
    let shutdown_grace_period = raw.shutdown_grace_period.unwrap_or(Duration::from_secs(30));
    let proxy_workers = raw
        .proxy_workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get));
    if proxy_workers == 0 {
        v.error("proxy_workers", "must be at least 1");
    }
    let connections = ConnectionLimits {
        header_read_timeout: v.positive("header_read_timeout", raw.header_read_timeout, DEFAULT_HEADER_READ_TIMEOUT),
        idle_timeout: v.positive("idle_timeout", raw.idle_timeout, DEFAULT_IDLE_TIMEOUT),
        max_connections_per_worker: raw.max_connections_per_worker.unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_WORKER),
    };
    if connections.max_connections_per_worker == 0 {
        v.error("max_connections_per_worker", "must be at least 1");
    }
    let admin = v.admin(admin_listen, raw.admin_token, raw.admin_open_reads, raw.admin_allow_unauthenticated);
    let primary = v.primary(raw.primary, listen);
    let storage = raw.storage.into_iter().enumerate().filter_map(|(i, s)| v.storage(i, s)).collect::<Vec<_>>();
    v.unique("storage", "prefix", storage.iter().map(|s| s.prefix.as_str()));
    let destinations =
        raw.destinations.into_iter().enumerate().filter_map(|(i, d)| v.destination(i, d)).collect::<Vec<_>>();
    v.unique("destinations", "name", destinations.iter().map(|d| d.name.as_str()));
    if let Some(primary) = &primary {
        v.not_the_primary(primary, &destinations);
    }
    let names: Vec<&str> = destinations.iter().map(|d| d.name.as_str()).collect();
    let rules = raw.rules.into_iter().enumerate().filter_map(|(i, r)| v.rule(i, r, &names)).collect();
    let state_dir = PathBuf::from(raw.state_dir.unwrap_or_else(|| "icerelay-state".to_owned()));
    let replication = v.replication(raw.replication.unwrap_or_default());
    let state = v.state(raw.state, &replication);
    let tls = v.listener_tls("tls_cert_file", "tls_key_file", raw.tls_cert_file, raw.tls_key_file);
    let admin_tls =
        v.listener_tls("admin_tls_cert_file", "admin_tls_key_file", raw.admin_tls_cert_file, raw.admin_tls_key_file);
    let tls_reload_interval =
        Some(raw.tls_reload_interval.unwrap_or(crate::tls::DEFAULT_RELOAD_CHECK_INTERVAL)).filter(|d| !d.is_zero());
    let audit = AuditConfig {
        path: raw.audit_log.map_or_else(|| state_dir.join("audit.log"), PathBuf::from),
        max_bytes: raw.audit_log_max_bytes.unwrap_or(64 * 1024 * 1024),
        keep: raw.audit_log_keep.unwrap_or(5),
    };
    if audit.max_bytes < 4096 {
        v.error("audit_log_max_bytes", "must be at least 4096 (one line must fit)");
    }

    match (v.errors.is_empty(), listen, admin_listen, primary) {
        (true, Some(listen), Some(admin_listen), Some(primary)) => Ok(Config {
            listen,
            admin_listen,
            public_url,
            max_body_bytes,
            shutdown_grace_period,
            proxy_workers,
            connections,
            admin,
            primary,
            storage,
            destinations,
            rules,
            state_dir,
            state,
            replication,
            tls,
            admin_tls,
            tls_reload_interval,
            read_only_replicas: raw.read_only_replicas.unwrap_or(true),
            audit,
        }),
        _ => Err(ConfigErrors(v.errors)),
    }
}

#[derive(Default)]
struct Validator {
    errors: Vec<ConfigError>,
}

impl Validator {
    fn error(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError::new(key, message));
    }

    fn socket_addr(&mut self, key: &str, value: &str) -> Option<SocketAddr> {
        match value.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.error(key, format!("{value:?} is not an address; expected IP:PORT such as 127.0.0.1:9181"));
                None
            }
        }
    }

    fn http_url(&mut self, key: &str, value: &str) -> Option<Url> {
        // Messages show the URL without its query, which may carry a token.
        let shown = value.split(['?', '#']).next().unwrap_or(value);
        match Url::parse(value) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
                if !u.username().is_empty() || u.password().is_some() {
                    self.error(key, "must not contain credentials; put them in `auth` (they would end up in logs)");
                    return None;
                }
                if u.query().is_some() || u.fragment().is_some() {
                    self.error(key, format!("{shown:?} must not have a query or fragment"));
                    return None;
                }
                Some(u)
            }
            Ok(_) => {
                self.error(key, format!("{shown:?} is not an http(s) URL; expected e.g. http://127.0.0.1:8181"));
                None
            }
            Err(e) => {
                self.error(key, format!("{shown:?} is not a valid URL ({e}); expected e.g. http://127.0.0.1:8181"));
                None
            }
        }
    }

    fn non_empty(&mut self, key: &str, value: Option<String>) -> Option<String> {
        match value {
            Some(v) if !v.trim().is_empty() => Some(v),
            Some(_) => {
                self.error(key, "must not be empty");
                None
            }
            None => {
                self.error(key, "is required");
                None
            }
        }
    }

    fn positive(&mut self, key: &str, value: Option<Duration>, default: Duration) -> Duration {
        let d = value.unwrap_or(default);
        if d.is_zero() {
            self.error(key, "must be greater than zero (e.g. \"5s\")");
        }
        d
    }

    fn unique<'a>(&mut self, section: &str, field: &str, values: impl Iterator<Item = &'a str>) {
        let mut seen = std::collections::BTreeSet::new();
        for (i, value) in values.enumerate() {
            if !seen.insert(value) {
                self.error(
                    format!("{section}[{i}].{field}"),
                    format!("{value:?} is used twice; each {field} must be unique"),
                );
            }
        }
    }

    fn admin(
        &mut self,
        listen: Option<SocketAddr>,
        token: Option<Secret>,
        open_reads: Option<bool>,
        allow_unauthenticated: Option<bool>,
    ) -> AdminAccess {
        let token = match token {
            Some(t) if t.expose().trim().is_empty() => {
                self.error("admin_token", "must not be empty");
                None
            }
            other => other,
        };
        if let Some(addr) = listen
            && !addr.ip().is_loopback()
            && token.is_none()
            && allow_unauthenticated != Some(true)
        {
            self.error(
                "admin_listen",
                format!(
                    "{addr} is reachable from other hosts but admin_token is not set, so anyone who reaches it could \
                     pause, resume and resync replication; set admin_token (or admin_token_file), bind a loopback \
                     address, or set admin_allow_unauthenticated = true to accept that"
                ),
            );
        }
        let local_hosts_only = token.is_none() && listen.is_some_and(|a| a.ip().is_loopback());
        AdminAccess { token, open_reads: open_reads.unwrap_or(false), local_hosts_only }
    }

    /// A listener's certificate and key: both or neither.
    fn listener_tls(
        &mut self,
        cert_key: &str,
        key_key: &str,
        cert_file: Option<String>,
        key_file: Option<String>,
    ) -> Option<ListenerTls> {
        match (cert_file, key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) if !cert.trim().is_empty() && !key.trim().is_empty() => {
                Some(ListenerTls { cert_file: PathBuf::from(cert), key_file: PathBuf::from(key) })
            }
            (Some(_), Some(_)) => {
                self.error(cert_key, format!("{cert_key} and {key_key} must not be empty"));
                None
            }
            (Some(_), None) => {
                self.error(key_key, format!("is required with {cert_key}: the PEM private key of that certificate"));
                None
            }
            (None, Some(_)) => {
                self.error(cert_key, format!("is required with {key_key}: the PEM certificate chain of that key"));
                None
            }
        }
    }

    /// A `ca_file` applies only where icerelay speaks TLS.
    fn ca_file(&mut self, key: &str, ca_file: Option<String>, url: Option<&Url>) -> Option<PathBuf> {
        let file = ca_file?;
        if file.trim().is_empty() {
            self.error(key, "must not be empty; remove it to trust the system's roots only");
            return None;
        }
        if let Some(url) = url
            && url.scheme() != "https"
        {
            self.error(
                key,
                format!("applies only to https, and {url} is {}: use an https URL or remove ca_file", url.scheme()),
            );
        }
        Some(PathBuf::from(file))
    }

    /// A destination that is the primary itself would replicate tables onto themselves.
    fn not_the_primary(&mut self, primary: &PrimaryConfig, destinations: &[DestinationConfig]) {
        let same_uri = |a: &Url, b: &Url| {
            a.scheme() == b.scheme()
                && a.host_str().map(str::to_ascii_lowercase) == b.host_str().map(str::to_ascii_lowercase)
                && a.port_or_known_default() == b.port_or_known_default()
                && a.path().trim_end_matches('/') == b.path().trim_end_matches('/')
        };
        for (i, d) in destinations.iter().enumerate() {
            if same_uri(&primary.uri, &d.uri) && primary.warehouse == d.warehouse {
                self.error(
                    format!("destinations[{i}].uri"),
                    format!(
                        "destination {:?} is the primary itself ({} with warehouse {}); replicating onto it would \
                         write every table onto itself: point the destination at another catalog or warehouse",
                        d.name,
                        d.uri,
                        d.warehouse.as_deref().unwrap_or("(none)")
                    ),
                );
            }
        }
    }

    fn primary(&mut self, raw: Option<RawPrimary>, listen: Option<SocketAddr>) -> Option<PrimaryConfig> {
        let Some(raw) = raw else {
            self.error("primary.uri", "is required: set [primary] uri in the file or pass --upstream URL");
            return None;
        };
        let uri = match raw.uri.as_deref() {
            Some(u) => self.http_url("primary.uri", u),
            None => {
                self.error("primary.uri", "is required: set [primary] uri in the file or pass --upstream URL");
                None
            }
        };
        let auth = self.auth("primary.auth", raw.auth);
        let engine_auth = match raw.engine_auth.as_deref() {
            None | Some("passthrough") => EngineAuth::Passthrough,
            Some("sigv4") => {
                if !matches!(auth, Some(AuthConfig::SigV4(_))) {
                    self.error(
                        "primary.engine_auth",
                        "sigv4 signs forwarded requests with icerelay's own credentials: set [primary] auth = { type = \
                         \"sigv4\", service = \"s3tables\", region = \"...\" } too",
                    );
                }
                if let Some(addr) = listen
                    && !addr.ip().is_loopback()
                    && raw.allow_remote_engines != Some(true)
                {
                    self.error(
                        "listen",
                        format!(
                            "{addr} is reachable from other hosts, and with engine_auth = \"sigv4\" every client \
                             that reaches it acts with icerelay's AWS identity; bind a loopback address (the sidecar \
                             pattern) or set [primary] allow_remote_engines = true to accept that"
                        ),
                    );
                }
                EngineAuth::SigV4
            }
            Some(other) => {
                self.error("primary.engine_auth", format!("{other:?} is not valid; expected passthrough or sigv4"));
                EngineAuth::Passthrough
            }
        };
        let connect_timeout = self.positive("primary.connect_timeout", raw.connect_timeout, Duration::from_secs(5));
        let request_timeout = self.positive("primary.request_timeout", raw.request_timeout, Duration::from_secs(60));
        let body_idle_timeout =
            self.positive("primary.body_idle_timeout", raw.body_idle_timeout, Duration::from_secs(60));
        let pool_idle_timeout =
            self.positive("primary.pool_idle_timeout", raw.pool_idle_timeout, Duration::from_secs(90));
        let ca_file = self.ca_file("primary.ca_file", raw.ca_file, uri.as_ref());
        Some(PrimaryConfig {
            uri: uri?,
            warehouse: raw.warehouse,
            auth: auth?,
            connect_timeout,
            request_timeout,
            body_idle_timeout,
            pool_idle_timeout,
            pool_max_idle_per_host: raw.pool_max_idle_per_host.unwrap_or(256),
            engine_auth,
            ca_file,
            vended_credentials: raw.vended_credentials.unwrap_or(true),
        })
    }

    fn auth(&mut self, key: &str, raw: Option<RawAuth>) -> Option<AuthConfig> {
        Some(match raw {
            None | Some(RawAuth::None) => AuthConfig::None,
            Some(RawAuth::Bearer { token }) => {
                if token.is_empty() {
                    self.error(format!("{key}.token"), "must not be empty");
                }
                AuthConfig::Bearer { token }
            }
            Some(RawAuth::Oauth2 { client_id, client_secret, token_endpoint, scope }) => {
                if client_id.trim().is_empty() {
                    self.error(format!("{key}.client_id"), "must not be empty");
                }
                if client_secret.is_empty() {
                    self.error(format!("{key}.client_secret"), "must not be empty");
                }
                let token_endpoint = match token_endpoint {
                    Some(u) => Some(self.http_url(&format!("{key}.token_endpoint"), &u)?),
                    None => None,
                };
                AuthConfig::OAuth2 {
                    client_id,
                    client_secret,
                    token_endpoint,
                    scope: scope.unwrap_or_else(|| "catalog".to_owned()),
                }
            }
            Some(RawAuth::Sigv4 { service, region, access_key_id, secret_access_key, session_token, profile }) => {
                if service.trim().is_empty() {
                    self.error(format!("{key}.service"), "must not be empty (e.g. \"glue\" or \"s3tables\")");
                }
                if region.trim().is_empty() {
                    self.error(format!("{key}.region"), "must not be empty (e.g. \"us-east-1\")");
                }
                if access_key_id.is_some() != secret_access_key.is_some() {
                    self.error(key, "access_key_id and secret_access_key must be set together");
                }
                if profile.is_some() && access_key_id.is_some() {
                    self.error(format!("{key}.profile"), "is used only when access_key_id is not set; set one of them");
                }
                AuthConfig::SigV4(SigV4Config {
                    service,
                    region,
                    access_key_id,
                    secret_access_key,
                    session_token,
                    profile,
                })
            }
        })
    }

    fn storage(&mut self, i: usize, raw: RawStorage) -> Option<StorageConfig> {
        let key = format!("storage[{i}]");
        let prefix = self.non_empty(&format!("{key}.prefix"), raw.prefix)?;
        let prefix = crate::storage::normalize_file_url(&prefix).into_owned();
        let Some((scheme, rest)) = prefix.split_once("://") else {
            self.error(
                format!("{key}.prefix"),
                format!("{prefix:?} has no scheme; expected e.g. s3://bucket/ or file:///path/"),
            );
            return None;
        };
        let kind = match scheme {
            "s3" | "s3a" | "s3n" => {
                let endpoint = match raw.endpoint {
                    Some(e) => Some(self.http_url(&format!("{key}.endpoint"), &e)?),
                    None => None,
                };
                if raw.access_key_id.is_some() != raw.secret_access_key.is_some() {
                    self.error(&key, "access_key_id and secret_access_key must be set together");
                }
                let sse = match raw.sse.as_deref() {
                    None => None,
                    Some("AES256") => Some(Sse::Aes256),
                    Some("aws:kms") => Some(Sse::Kms { key_id: raw.sse_kms_key_id.clone() }),
                    Some(other) => {
                        self.error(format!("{key}.sse"), format!("{other:?} is not valid; expected AES256 or aws:kms"));
                        None
                    }
                };
                if raw.sse_kms_key_id.is_some() && !matches!(sse, Some(Sse::Kms { .. })) {
                    self.error(format!("{key}.sse_kms_key_id"), "applies only with sse = \"aws:kms\"");
                }
                if let Some(class) = &raw.storage_class
                    && (class.is_empty() || !class.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
                {
                    self.error(
                        format!("{key}.storage_class"),
                        format!(
                            "{class:?} is not an S3 storage class; expected e.g. STANDARD_IA or INTELLIGENT_TIERING"
                        ),
                    );
                }
                let ca_file = self.ca_file(&format!("{key}.ca_file"), raw.ca_file.clone(), endpoint.as_ref());
                StorageKind::S3 {
                    ca_file,
                    sse,
                    storage_class: raw.storage_class,
                    endpoint,
                    region: raw.region.unwrap_or_else(|| "us-east-1".to_owned()),
                    path_style: raw.path_style.unwrap_or(false),
                    access_key_id: raw.access_key_id,
                    secret_access_key: raw.secret_access_key,
                    session_token: raw.session_token,
                }
            }
            "file" => {
                if !rest.starts_with('/') {
                    self.error(
                        format!("{key}.prefix"),
                        format!("{prefix:?} is not an absolute local path; expected file:///path/"),
                    );
                }
                for (field, set) in [
                    ("endpoint", raw.endpoint.is_some()),
                    ("region", raw.region.is_some()),
                    ("access_key_id", raw.access_key_id.is_some()),
                    ("secret_access_key", raw.secret_access_key.is_some()),
                    ("sse", raw.sse.is_some()),
                    ("sse_kms_key_id", raw.sse_kms_key_id.is_some()),
                    ("storage_class", raw.storage_class.is_some()),
                    ("ca_file", raw.ca_file.is_some()),
                ] {
                    if set {
                        self.error(format!("{key}.{field}"), "applies only to s3:// prefixes");
                    }
                }
                StorageKind::Local
            }
            other => {
                self.error(
                    format!("{key}.prefix"),
                    format!("scheme {other:?} is not supported; expected s3:// or file://"),
                );
                return None;
            }
        };
        Some(StorageConfig { prefix, kind })
    }

    fn destination(&mut self, i: usize, raw: RawDestination) -> Option<DestinationConfig> {
        let key = format!("destinations[{i}]");
        let name = self.non_empty(&format!("{key}.name"), raw.name);
        if let Some(n) = &name
            && !n.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            self.error(format!("{key}.name"), format!("{n:?} may only contain letters, digits, '-', '_' and '.'"));
        }
        let uri = match raw.uri {
            Some(u) => self.http_url(&format!("{key}.uri"), &u),
            None => {
                self.error(format!("{key}.uri"), "is required");
                None
            }
        };
        let auth = self.auth(&format!("{key}.auth"), raw.auth);
        let bootstrap = match raw.bootstrap.as_deref() {
            None | Some("auto") => BootstrapMode::Auto,
            Some("register") => BootstrapMode::Register,
            Some("create") => BootstrapMode::Create,
            Some("create-transaction") => BootstrapMode::CreateTransaction,
            Some(other) => {
                self.error(
                    format!("{key}.bootstrap"),
                    format!("{other:?} is not a bootstrap mode; expected auto, register, create or create-transaction"),
                );
                BootstrapMode::Auto
            }
        };
        let location = raw.location.map(|l| crate::storage::normalize_file_url(l.trim_end_matches('/')).into_owned());
        if let Some(l) = &location
            && !l.contains("://")
        {
            self.error(
                format!("{key}.location"),
                format!("{l:?} is not a URL; expected e.g. s3://replica or file:///data/wh"),
            );
        }
        let request_timeout =
            self.positive(&format!("{key}.request_timeout"), raw.request_timeout, Duration::from_secs(60));
        let ca_file = self.ca_file(&format!("{key}.ca_file"), raw.ca_file, uri.as_ref());
        Some(DestinationConfig {
            name: name?,
            uri: uri?,
            warehouse: raw.warehouse,
            auth: auth?,
            bootstrap,
            location,
            properties: raw.properties,
            request_timeout,
            ca_file,
            vended_credentials: raw.vended_credentials.unwrap_or(true),
        })
    }

    fn replication(&mut self, raw: RawReplication) -> ReplicationConfig {
        let defaults = ReplicationConfig::default();
        let at_least_one = |v: &mut Self, key: &str, n: Option<usize>, default: usize| {
            let n = n.unwrap_or(default);
            if n == 0 {
                v.error(key, "must be at least 1");
            }
            n
        };
        let max_concurrent_lanes = at_least_one(
            self,
            "replication.max_concurrent_lanes",
            raw.max_concurrent_lanes,
            defaults.max_concurrent_lanes,
        );
        let copy_parallelism =
            at_least_one(self, "replication.copy_parallelism", raw.copy_parallelism, defaults.copy_parallelism);
        let retry_initial_backoff = self.positive(
            "replication.retry_initial_backoff",
            raw.retry_initial_backoff,
            defaults.retry_initial_backoff,
        );
        let retry_max_backoff =
            self.positive("replication.retry_max_backoff", raw.retry_max_backoff, defaults.retry_max_backoff);
        if retry_max_backoff < retry_initial_backoff {
            self.error("replication.retry_max_backoff", "must not be shorter than retry_initial_backoff");
        }
        ReplicationConfig {
            reconcile_interval: self.positive(
                "replication.reconcile_interval",
                raw.reconcile_interval,
                defaults.reconcile_interval,
            ),
            max_concurrent_lanes,
            copy_parallelism,
            retry_initial_backoff,
            retry_max_backoff,
            replicate: raw.replicate.unwrap_or(defaults.replicate),
            lease_ttl: self.positive("replication.lease_ttl", raw.lease_ttl, defaults.lease_ttl),
        }
    }

    fn state(&mut self, raw: Option<RawState>, replication: &ReplicationConfig) -> StateBackend {
        let raw = raw.unwrap_or_default();
        let backend = match raw.kind.as_deref().unwrap_or("sqlite") {
            "sqlite" => {
                for (key, set) in [
                    ("state.url", raw.url.is_some()),
                    ("state.schema", raw.schema.is_some()),
                    ("state.ca_file", raw.ca_file.is_some()),
                    ("state.max_connections", raw.max_connections.is_some()),
                ] {
                    if set {
                        self.error(key, "applies to type = \"postgres\" only; the sqlite store lives in state_dir");
                    }
                }
                StateBackend::Sqlite
            }
            "postgres" => {
                let url = match raw.url {
                    Some(url) if !url.is_empty() => {
                        // The parse error never quotes the URL, which holds the password.
                        if let Err(e) = crate::state::postgres::describe_url(url.expose()) {
                            self.error("state.url", format!("is not a PostgreSQL connection URL: {e}"));
                        }
                        url
                    }
                    _ => {
                        self.error(
                            "state.url",
                            "is required with type = \"postgres\" (postgres://user:password@host:5432/database), \
                             e.g. \"${ICERELAY_PG_URL}\"",
                        );
                        Secret::new("")
                    }
                };
                let schema = raw.schema.unwrap_or_else(|| "icerelay".to_owned());
                if !crate::state::postgres::valid_schema_name(&schema) {
                    self.error("state.schema", "must be a lower-case name (letters, digits, _), at most 63 bytes");
                }
                let max_connections = raw.max_connections.unwrap_or(8);
                if max_connections == 0 {
                    self.error("state.max_connections", "must be at least 1");
                }
                StateBackend::Postgres(crate::state::postgres::PostgresSettings {
                    url,
                    schema,
                    ca_file: raw.ca_file.map(PathBuf::from),
                    max_connections,
                    connect_timeout: self.positive(
                        "state.connect_timeout",
                        raw.connect_timeout,
                        Duration::from_secs(5),
                    ),
                })
            }
            other => {
                self.error("state.type", format!("{other:?} is not a state store; use \"sqlite\" or \"postgres\""));
                StateBackend::Sqlite
            }
        };
        if !replication.replicate && matches!(backend, StateBackend::Sqlite) {
            self.error(
                "replication.replicate",
                "false needs a shared state (state = { type = \"postgres\", ... }): with sqlite, hints recorded \
                 here would never be replicated by anyone",
            );
        }
        backend
    }

    fn rule(&mut self, i: usize, raw: RawRule, destinations: &[&str]) -> Option<RuleConfig> {
        let key = format!("rules[{i}]");
        let namespace = match raw.namespace.as_deref() {
            None => {
                self.error(
                    format!("{key}.namespace"),
                    "is required: a namespace such as \"sales\" or \"a.b\", or \"*\"",
                );
                None
            }
            Some("*") => Some(NamespacePattern::Any),
            Some(ns) if ns.split('.').any(str::is_empty) => {
                self.error(format!("{key}.namespace"), format!("{ns:?} has an empty level"));
                None
            }
            Some(ns) => Some(NamespacePattern::Exact(Namespace::from_dotted(ns))),
        };
        if raw.table.is_some() && namespace == Some(NamespacePattern::Any) {
            self.error(format!("{key}.table"), "a table rule needs a specific namespace, not \"*\"");
        }
        if raw.destinations.is_empty() {
            self.error(format!("{key}.destinations"), "must name at least one destination");
        }
        for (j, d) in raw.destinations.iter().enumerate() {
            if !destinations.contains(&d.as_str()) {
                let known =
                    if destinations.is_empty() { "none are defined".to_owned() } else { destinations.join(", ") };
                self.error(
                    format!("{key}.destinations[{j}]"),
                    format!("{d:?} is not a defined destination (defined: {known})"),
                );
            }
        }
        let target_namespace = match raw.target_namespace.as_deref() {
            None => None,
            Some(ns) if ns.is_empty() || ns.split('.').any(str::is_empty) => {
                self.error(format!("{key}.target_namespace"), format!("{ns:?} has an empty level"));
                None
            }
            Some(ns) => Some(Namespace::from_dotted(ns)),
        };
        let on_drop = match raw.on_drop.as_deref() {
            None | Some("keep") => OnDrop::Keep,
            Some("propagate") => OnDrop::Propagate,
            Some(other) => {
                self.error(format!("{key}.on_drop"), format!("{other:?} is not valid; expected keep or propagate"));
                OnDrop::Keep
            }
        };
        let mut source_prefixes = Vec::new();
        for (j, prefix) in raw.source_prefixes.unwrap_or_default().into_iter().enumerate() {
            let scheme_ok = ["s3://", "s3a://", "s3n://", "file:"].iter().any(|s| prefix.starts_with(s));
            let bucket_or_path = prefix.split_once("://").map_or(prefix.as_str(), |(_, rest)| rest);
            if !scheme_ok || bucket_or_path.trim_matches('/').is_empty() {
                self.error(
                    format!("{key}.source_prefixes[{j}]"),
                    format!("{prefix:?} is not a URL prefix with a bucket or a path (s3://bucket/path, file:///path)"),
                );
                continue;
            }
            source_prefixes.push(crate::storage::normalize_file_url(&prefix).into_owned());
        }
        Some(RuleConfig {
            namespace: namespace?,
            table: raw.table,
            destinations: raw.destinations,
            target_namespace,
            on_drop,
            source_prefixes,
        })
    }
}

#[cfg(test)]
mod tests;
