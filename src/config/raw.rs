//! The configuration file as written: TOML, deserialised field by field.
//!
//! These types mirror the file exactly (`deny_unknown_fields`, so a typo is an
//! error rather than a silently ignored key). Nothing here is checked beyond
//! its TOML type; [`super::validate`] turns a `RawConfig` into a
//! [`super::Config`]. The doc comment of each field is the source of the
//! configuration reference in README.md.

use std::time::Duration;

use serde::Deserialize;

use super::secret::Secret;

/// Numbers and booleans that also accept their text, so an
/// `ICERELAY__SECTION__KEY` override (always a string) can set them.
mod lenient {
    use std::fmt;
    use std::marker::PhantomData;
    use std::str::FromStr;

    use serde::Deserializer;
    use serde::de::{Error, Visitor};

    /// An optional unsigned number written as a TOML integer or a string of digits.
    pub fn number<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: TryFrom<u64> + FromStr,
    {
        struct Number<T>(PhantomData<T>);
        impl<T: TryFrom<u64> + FromStr> Visitor<'_> for Number<T> {
            type Value = Option<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a non-negative integer")
            }
            fn visit_u64<E: Error>(self, v: u64) -> Result<Self::Value, E> {
                T::try_from(v).map(Some).map_err(|_| E::custom(format!("{v} is too large")))
            }
            fn visit_i64<E: Error>(self, v: i64) -> Result<Self::Value, E> {
                let v = u64::try_from(v).map_err(|_| E::custom(format!("{v} is negative; expected 0 or more")))?;
                self.visit_u64(v)
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<Self::Value, E> {
                v.trim().parse().map(Some).map_err(|_| E::custom(format!("{v:?} is not a non-negative integer")))
            }
        }
        deserializer.deserialize_any(Number(PhantomData))
    }

    /// An optional boolean written as a TOML boolean or as `"true"` / `"false"`.
    pub fn bool<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<bool>, D::Error> {
        struct Bool;
        impl Visitor<'_> for Bool {
            type Value = Option<bool>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true or false")
            }
            fn visit_bool<E: Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(Some(v))
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<Self::Value, E> {
                match v.trim() {
                    "true" => Ok(Some(true)),
                    "false" => Ok(Some(false)),
                    _ => Err(E::custom(format!("{v:?} is not a boolean; expected true or false"))),
                }
            }
        }
        deserializer.deserialize_any(Bool)
    }
}

/// The whole file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Address the catalog proxy listens on. Default `127.0.0.1:9181`.
    pub listen: Option<String>,
    /// Address of the admin listener (`/healthz`, `/readyz`, `/metrics`). Default `127.0.0.1:9182`.
    pub admin_listen: Option<String>,
    /// The URL clients use to reach icerelay. `GET /v1/config` answers that
    /// carry a `uri` get it replaced by this value; without it the `uri` key is removed.
    pub public_url: Option<String>,
    /// Largest request body icerelay buffers to inspect (commit, create,
    /// register, rename) and largest `/v1/config` answer it rewrites, in bytes.
    /// Default 16 MiB. Larger requests get `413`.
    #[serde(default, deserialize_with = "lenient::number")]
    pub max_body_bytes: Option<u64>,
    /// Threads serving the proxy, each with its own runtime and upstream
    /// connection pool. Default: one per CPU core.
    #[serde(default, deserialize_with = "lenient::number")]
    pub proxy_workers: Option<usize>,
    /// How long to wait for in-flight requests on shutdown. Default `30s`.
    #[serde(default, with = "humantime_serde")]
    pub shutdown_grace_period: Option<Duration>,
    /// The primary catalog every request is forwarded to.
    pub primary: Option<RawPrimary>,
    /// Object stores, matched by the longest prefix of a file URL.
    #[serde(default)]
    pub storage: Vec<RawStorage>,
    /// Replica catalogs.
    #[serde(default)]
    pub destinations: Vec<RawDestination>,
    /// Which tables replicate to which destinations.
    #[serde(default)]
    pub rules: Vec<RawRule>,
    /// Directory of replication's durable state (the SQLite database, and
    /// the audit log by default). Default `icerelay-state` in the working
    /// directory. Used only when rules are configured.
    pub state_dir: Option<String>,
    /// Where replication's state lives: `{ type = "sqlite" }` (the default,
    /// in `state_dir`, one instance) or `{ type = "postgres", url = "${ICERELAY_PG_URL}" }`
    /// (shared by several instances).
    pub state: Option<RawState>,
    /// How replication runs.
    pub replication: Option<RawReplication>,
    /// Bearer token the admin API requires (`Authorization: Bearer <token>`),
    /// e.g. `"${ICERELAY_ADMIN_TOKEN}"`. `/healthz` and `/readyz` never need it.
    pub admin_token: Option<Secret>,
    /// File holding the admin token (surrounding whitespace ignored), e.g. a
    /// mounted Kubernetes Secret. Exclusive with `admin_token`.
    pub admin_token_file: Option<String>,
    /// Lets `GET` status endpoints and `/metrics` answer without the token
    /// (state-changing requests still need it). Default `false`.
    #[serde(default, deserialize_with = "lenient::bool")]
    pub admin_open_reads: Option<bool>,
    /// Allows a non-loopback `admin_listen` without `admin_token`: anyone who
    /// reaches the address can then pause, resume and resync. Default `false`.
    #[serde(default, deserialize_with = "lenient::bool")]
    pub admin_allow_unauthenticated: Option<bool>,
    /// Time a client has to send a request's headers; a slower client is
    /// disconnected. Default `10s`.
    #[serde(default, with = "humantime_serde")]
    pub header_read_timeout: Option<Duration>,
    /// Time a keep-alive connection may sit idle between requests before it is
    /// closed. Default `60s`.
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// Open client connections each proxy worker serves at once; connections
    /// beyond it are closed at once, not queued. Default `10000`.
    #[serde(default, deserialize_with = "lenient::number")]
    pub max_connections_per_worker: Option<usize>,
    /// PEM certificate chain for TLS on `listen` (with `tls_key_file`);
    /// reloaded on SIGHUP or when the file changes. Default: plain HTTP.
    pub tls_cert_file: Option<String>,
    /// PEM private key for `tls_cert_file`.
    pub tls_key_file: Option<String>,
    /// PEM certificate chain for TLS on `admin_listen` (with
    /// `admin_tls_key_file`; may be the proxy's pair). Default: plain HTTP.
    pub admin_tls_cert_file: Option<String>,
    /// PEM private key for `admin_tls_cert_file`.
    pub admin_tls_key_file: Option<String>,
    /// How often the listeners' certificate files are checked for a change;
    /// `0s` reloads on SIGHUP only. Default `2s`.
    #[serde(default, with = "humantime_serde")]
    pub tls_reload_interval: Option<Duration>,
    /// Refuse engine writes to tables that are read-only replicas (they carry
    /// the `icerelay.replica-of` property). Default `true`.
    #[serde(default, deserialize_with = "lenient::bool")]
    pub read_only_replicas: Option<bool>,
    /// The audit log: one JSON line per replica commit, bootstrap, promotion,
    /// pause, resume, resync and divergence. Default `<state_dir>/audit.log`.
    pub audit_log: Option<String>,
    /// Size at which the audit log is rotated (`audit.log` becomes
    /// `audit.log.1`). Default 64 MiB.
    #[serde(default, deserialize_with = "lenient::number")]
    pub audit_log_max_bytes: Option<u64>,
    /// Rotated audit log files kept. Default 5.
    #[serde(default, deserialize_with = "lenient::number")]
    pub audit_log_keep: Option<usize>,
}

/// `[replication]`: pacing and limits of the replication engine.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReplication {
    /// How often every replicated table is compared with its replicas, and
    /// the primary is listed for tables new rules cover. Default `60s`.
    #[serde(default, with = "humantime_serde")]
    pub reconcile_interval: Option<Duration>,
    /// Lanes (table, destination) replicating at the same time. Default `4`.
    #[serde(default, deserialize_with = "lenient::number")]
    pub max_concurrent_lanes: Option<usize>,
    /// Files copied at the same time within one lane. Default `8`.
    #[serde(default, deserialize_with = "lenient::number")]
    pub copy_parallelism: Option<usize>,
    /// First wait before retrying a failed lane; doubles per attempt. Default `1s`.
    #[serde(default, with = "humantime_serde")]
    pub retry_initial_backoff: Option<Duration>,
    /// Longest wait between retries. Default `5m`.
    #[serde(default, with = "humantime_serde")]
    pub retry_max_backoff: Option<Duration>,
    /// Whether this instance runs lanes, fan-out and reconcile. `false` makes a
    /// sidecar that only records commit hints (and serves status) for the
    /// instances that do; it needs a shared (`postgres`) state. Default `true`.
    #[serde(default, deserialize_with = "lenient::bool")]
    pub replicate: Option<bool>,
    /// How long a lane stays claimed by an instance that stopped renewing it
    /// (crashed, paused, cut off from Postgres) before another takes over.
    /// Shared state only. Default `30s`.
    #[serde(default, with = "humantime_serde")]
    pub lease_ttl: Option<Duration>,
}

/// `state`: the state store.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    /// `sqlite` (default) or `postgres`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// PostgreSQL connection URL, `postgres://user:password@host:port/database?sslmode=require`;
    /// write it as `"${ICERELAY_PG_URL}"` to keep the password out of the file.
    pub url: Option<Secret>,
    /// Postgres schema of icerelay's tables (created if missing). Default `icerelay`.
    pub schema: Option<String>,
    /// PEM file of extra CA certificates for TLS to Postgres. Default: the system's roots.
    pub ca_file: Option<String>,
    /// Connections to Postgres per instance. Default `8`.
    #[serde(default, deserialize_with = "lenient::number")]
    pub max_connections: Option<usize>,
    /// How long a state call waits to connect before it fails. Default `5s`.
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
}

/// `[primary]`: the upstream catalog.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrimary {
    /// Base URI of the primary's Iceberg REST API, without the `/v1` suffix
    /// (for example `http://127.0.0.1:8181` or `https://host/api/catalog`).
    pub uri: Option<String>,
    /// Warehouse icerelay asks for when it talks to the primary itself. Optional.
    pub warehouse: Option<String>,
    /// icerelay's own credentials for the primary. Engine credentials always
    /// pass through untouched; these are used only for icerelay's own calls
    /// (readiness probe, reading metadata for replication).
    pub auth: Option<RawAuth>,
    /// Time allowed to open a TCP (and TLS) connection. Default `5s`.
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    /// Time allowed for the primary to start answering a request. Default `60s`.
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    /// How long an idle pooled connection is kept. Default `90s`.
    #[serde(default, with = "humantime_serde")]
    pub pool_idle_timeout: Option<Duration>,
    /// Longest pause allowed between two chunks of the primary's answer once
    /// it has started; a stalled answer is cut off and the client's connection
    /// reset. Default `60s`.
    #[serde(default, with = "humantime_serde")]
    pub body_idle_timeout: Option<Duration>,
    /// What happens to the engines' credentials: `passthrough` (default:
    /// forwarded untouched) or `sigv4` (dropped; icerelay signs every
    /// forwarded request with `auth`, which must be `sigv4`).
    pub engine_auth: Option<String>,
    /// With `engine_auth = "sigv4"`, allows a `listen` address other hosts
    /// can reach: they would all act with icerelay's identity. Default `false`.
    #[serde(default, deserialize_with = "lenient::bool")]
    pub allow_remote_engines: Option<bool>,
    /// Idle connections kept per upstream host. Default `256`.
    #[serde(default, deserialize_with = "lenient::number")]
    pub pool_max_idle_per_host: Option<usize>,
    /// PEM file of CA certificates trusted for an `https` uri, in addition
    /// to the system's roots (a private CA). Default: the system's roots only.
    pub ca_file: Option<String>,
    /// Asks for vended storage credentials (`X-Iceberg-Access-Delegation`)
    /// when icerelay loads source tables, and uses them for keyless
    /// `[[storage]]` entries. Default `true`.
    #[serde(default, deserialize_with = "lenient::bool")]
    pub vended_credentials: Option<bool>,
}

/// `auth = { type = ... }`: how icerelay authenticates its own calls to a catalog.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum RawAuth {
    /// No credentials.
    None,
    /// A fixed bearer token: `{ type = "bearer", token = "${TOKEN}" }`.
    Bearer {
        /// The token sent as `Authorization: Bearer ...`.
        token: Secret,
    },
    /// OAuth2 client credentials: `{ type = "oauth2", client_id, client_secret }`.
    /// The token is fetched from `token_endpoint` (default: the catalog's
    /// `/v1/oauth/tokens`), cached, and refreshed before it expires.
    Oauth2 {
        /// Client id.
        client_id: String,
        /// Client secret.
        client_secret: Secret,
        /// Token endpoint URL. Default `<uri>/v1/oauth/tokens`.
        token_endpoint: Option<String>,
        /// OAuth2 scope. Default `catalog`.
        scope: Option<String>,
    },
    /// AWS SigV4 request signing (Glue, S3 Tables REST endpoints).
    Sigv4 {
        /// Signing service name, e.g. `glue` or `s3tables`.
        service: String,
        /// Signing region.
        region: String,
        /// Access key id. Default: the AWS environment.
        access_key_id: Option<String>,
        /// Secret access key.
        secret_access_key: Option<Secret>,
        /// Session token, for temporary credentials.
        session_token: Option<Secret>,
        /// Profile of the shared AWS files to use when no keys are set. Default: `AWS_PROFILE`, else `default`.
        profile: Option<String>,
    },
}

/// `[[storage]]`: one object store.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStorage {
    /// URL prefix this store serves, e.g. `s3://warehouse/` or `file:///data/wh/`.
    pub prefix: Option<String>,
    /// S3 endpoint URL, for S3-compatible stores. Default: AWS.
    pub endpoint: Option<String>,
    /// S3 region. Default `us-east-1`.
    pub region: Option<String>,
    /// Path-style addressing (`http://endpoint/bucket/key`). Default `false`.
    #[serde(default, deserialize_with = "lenient::bool")]
    pub path_style: Option<bool>,
    /// S3 access key id.
    pub access_key_id: Option<String>,
    /// S3 secret access key.
    pub secret_access_key: Option<Secret>,
    /// S3 session token, for temporary credentials.
    pub session_token: Option<Secret>,
    /// Server-side encryption of the objects icerelay writes: `AES256`
    /// (SSE-S3) or `aws:kms` (SSE-KMS). Default: the bucket's own setting.
    pub sse: Option<String>,
    /// KMS key for `sse = "aws:kms"`. Default: the account's `aws/s3` key.
    pub sse_kms_key_id: Option<String>,
    /// Storage class of the objects icerelay writes (`STANDARD_IA`,
    /// `INTELLIGENT_TIERING`, ...). Default: the bucket's.
    pub storage_class: Option<String>,
    /// PEM file of CA certificates trusted for an `https` endpoint, in
    /// addition to the system's roots. Default: the system's roots only.
    pub ca_file: Option<String>,
}

/// `[[destinations]]`: one replica catalog.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDestination {
    /// Name used by rules, status and metrics.
    pub name: Option<String>,
    /// Base URI of the replica's Iceberg REST API.
    pub uri: Option<String>,
    /// Warehouse to ask the replica catalog for.
    pub warehouse: Option<String>,
    /// icerelay's credentials for the replica catalog.
    pub auth: Option<RawAuth>,
    /// How a replica table is first made: `auto` (probe the catalog:
    /// register with history where registerTable keeps it, else create),
    /// `register` or `create`. Default `auto`. Replicas then follow by replay.
    pub bootstrap: Option<String>,
    /// Base location of replica tables, e.g. `s3://replica`: a table
    /// `ns.t` is placed at `<location>/ns/t`. Default: where the replica
    /// catalog would put a new table (asked with a staged create).
    pub location: Option<String>,
    /// Properties set on every replica table of this destination (and kept
    /// as the replica's own, never overwritten by the source).
    #[serde(default)]
    pub properties: std::collections::BTreeMap<String, String>,
    /// Time allowed for the replica catalog to answer one request. Default `60s`.
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    /// PEM file of CA certificates trusted for an `https` uri, in addition
    /// to the system's roots. Default: the system's roots only.
    pub ca_file: Option<String>,
    /// Asks for vended storage credentials when icerelay creates, registers
    /// and loads replica tables, and uses them for keyless `[[storage]]`
    /// entries. Default `true`.
    #[serde(default, deserialize_with = "lenient::bool")]
    pub vended_credentials: Option<bool>,
}

/// `[[rules]]`: tables that replicate, and where to.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    /// Namespace (dotted for nested namespaces) or `*` for every namespace.
    pub namespace: Option<String>,
    /// A single table of that namespace. Default: every table.
    pub table: Option<String>,
    /// Names of the destinations the matching tables replicate to.
    #[serde(default)]
    pub destinations: Vec<String>,
    /// Namespace of the replicas (dotted). Default: the source's namespace.
    /// Fan-in: several sources replicate into one catalog under their own namespaces.
    pub target_namespace: Option<String>,
    /// What dropping the source table does to its replicas: `keep` (default)
    /// or `propagate` (drop them too).
    pub on_drop: Option<String>,
    /// URL prefixes every source path of the matching tables must be under
    /// (their location, data and metadata paths). Default: any `[[storage]]` prefix.
    pub source_prefixes: Option<Vec<String>>,
}
