//! `RestCatalog`: the Iceberg REST operations icerelay performs itself.
//!
//! Used for the primary (reading metadata, listing tables for discovery) and
//! for every replica (creating, registering and committing). Each operation
//! interprets its status codes explicitly, as the REST spec defines them; in
//! particular a commit that times out or gets a 5xx is
//! [`CatalogError::CommitOutcomeUnknown`], never "failed", because the catalog
//! may have applied it. Metadata is returned as raw JSON: replication rewrites
//! it field by field and must not lose fields it does not know.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::OnceCell;

use super::auth::Authenticator;
use super::error::{CatalogError, SignerIdentity};
use super::ident::{Namespace, TableIdent};
use crate::config::AuthConfig;
use crate::storage::vended::{Renew, StorageCredential, VendedCredentials};

/// Connection settings for [`RestCatalog::new`].
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// TCP/TLS connect timeout.
    pub connect_timeout: Duration,
    /// Whole-request timeout.
    pub request_timeout: Duration,
    /// CA certificates trusted besides the system's roots (`ca_file`).
    pub ca_file: Option<PathBuf>,
}

/// One table's part of a multi-table commit.
#[derive(Debug, Clone, Copy)]
pub struct TableCommit<'a> {
    /// The table.
    pub table: &'a TableIdent,
    /// Its `requirements`.
    pub requirements: &'a [Value],
    /// Its `updates`.
    pub updates: &'a [Value],
}

/// A table as `loadTable`, `createTable`, `registerTable` and `updateTable` return it.
#[derive(Debug, Clone)]
pub struct LoadedTable {
    /// Where the catalog wrote the metadata (absent for a staged create).
    pub metadata_location: Option<String>,
    /// The table metadata, as raw JSON.
    pub metadata: Value,
    /// Storage credentials the catalog vended with the answer.
    pub credentials: Vec<StorageCredential>,
}

/// A catalog's answer: status, entity tag, body.
struct Answer {
    status: StatusCode,
    etag: Option<String>,
    body: bytes::Bytes,
}

/// What [`RestCatalog::check_table`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableCheck {
    /// Unchanged since the answer whose entity tag was given.
    Unchanged,
    /// The table as it is now, and the answer's entity tag (if the catalog gives one).
    Loaded {
        /// Where its metadata is.
        metadata_location: Option<String>,
        /// The answer's `ETag`.
        etag: Option<String>,
    },
    /// No such table.
    Missing,
}

/// What `GET /v1/config` told icerelay.
#[derive(Debug, Clone, Default)]
pub struct CatalogConfig {
    /// The `prefix` to put after `/v1/`, if the catalog uses one.
    pub prefix: Option<String>,
    /// `defaults` merged with `overrides` (overrides win).
    pub properties: serde_json::Map<String, Value>,
    /// Endpoints the catalog advertises (`"POST /v1/{prefix}/namespaces/{namespace}/register"`), if it does.
    pub endpoints: Option<Vec<String>>,
}

impl CatalogConfig {
    /// Whether the catalog advertises `method path` (true when it advertises nothing).
    pub fn supports(&self, method: &str, path: &str) -> bool {
        let wanted = format!("{method} {path}");
        self.endpoints.as_ref().is_none_or(|all| all.contains(&wanted))
    }
}

#[derive(Deserialize)]
struct ConfigResponse {
    #[serde(default)]
    defaults: serde_json::Map<String, Value>,
    #[serde(default)]
    overrides: serde_json::Map<String, Value>,
    endpoints: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: ErrorBody,
}

#[derive(Deserialize)]
struct ErrorBody {
    message: Option<String>,
    r#type: Option<String>,
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
    config: OnceCell<CatalogConfig>,
    vending: Option<Vending>,
    /// Sent as the replica-writer header (see [`crate::replicate::mark`]).
    writer: Option<reqwest::header::HeaderValue>,
}

/// Where a catalog that asks for vended credentials keeps them.
#[derive(Debug)]
struct Vending {
    credentials: Arc<VendedCredentials>,
    /// The catalog answered 403 to a request that asked for credentials and
    /// 2xx without: it is no longer asked.
    refused: AtomicBool,
    /// The catalog itself, for renewals (weak: the credentials outlive no catalog).
    catalog: Weak<RestCatalog>,
}

/// Renews the credentials of one table through the catalog that vended them.
#[derive(Debug)]
struct TableRenewal {
    catalog: Weak<RestCatalog>,
    table: TableIdent,
}

#[async_trait::async_trait]
impl Renew for TableRenewal {
    async fn renew(&self) -> Result<Vec<StorageCredential>, String> {
        let catalog = self.catalog.upgrade().ok_or("the catalog client is gone")?;
        catalog.load_credentials(&self.table).await.map_err(|e| e.to_string())
    }
}

/// The header that asks a catalog for vended credentials.
const ACCESS_DELEGATION: &str = "X-Iceberg-Access-Delegation";
/// The largest answer icerelay reads from a catalog: a loadTable carries
/// the table's metadata, which a table copy reads up to this size too.
const MAX_ANSWER_BYTES: usize = crate::table_copy::METADATA_LIMIT as usize;

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
        let roots = crate::tls::reqwest_roots(settings.ca_file.as_deref())
            .map_err(|source| CatalogError::Tls { catalog: name.clone(), source })?;
        let http = reqwest::Client::builder()
            .tls_certs_merge(roots)
            // A redirect is an error, never followed: reqwest would re-send
            // the request (a token post's client secret included) to any host.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.request_timeout)
            .build()
            .map_err(|source| CatalogError::Client { catalog: name.clone(), source })?;
        let auth = Authenticator::new(auth, &base);
        Ok(Self { name, base, warehouse, settings, http, auth, config: OnceCell::new(), vending: None, writer: None })
    }

    /// This catalog, with every request saying that icerelay writes replicas
    /// as `writer` ([`crate::replicate::mark::writer`]), so that an icerelay
    /// in front of it lets the replica commits through.
    pub fn writing_replicas_as(mut self, writer: &str) -> Self {
        match reqwest::header::HeaderValue::from_str(writer) {
            Ok(value) => self.writer = Some(value),
            Err(_) => tracing::warn!(catalog = %self.name, "cannot send the replica-writer header (not ASCII)"),
        }
        self
    }

    /// This catalog, asking for vended credentials on every table it loads,
    /// creates or registers, and keeping them in `credentials`.
    pub fn vending_into(self, credentials: Arc<VendedCredentials>) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            vending: Some(Vending { credentials, catalog: me.clone(), refused: AtomicBool::new(false) }),
            ..self
        })
    }

    /// The credentials the catalog vends now for `table`: from its credentials
    /// endpoint where it has one, else from a new loadTable.
    pub async fn load_credentials(&self, table: &TableIdent) -> Result<Vec<StorageCredential>, CatalogError> {
        let op = format!("loadCredentials {table}");
        let advertised =
            self.config().await?.supports("GET", "/v1/{prefix}/namespaces/{namespace}/tables/{table}/credentials");
        if advertised {
            let url = self
                .url(&[
                    "namespaces",
                    &table.namespace.to_path_segment(),
                    "tables",
                    &table.name_path_segment(),
                    "credentials",
                ])
                .await?;
            let (status, body) = self.send_delegating(&op, Method::GET, &url, None, true).await?;
            if status.is_success() {
                // `{"storage-credentials": [...]}`, as in a loadTable answer.
                let answer: Value = self.decode(&op, &body)?;
                return Ok(StorageCredential::from_answer(&answer));
            }
            // Catalogs that list every endpoint, or none, may still lack this one.
            if !matches!(status.as_u16(), 400 | 404 | 405 | 501) {
                return Err(self.status_error(&op, status, &body));
            }
        }
        let loaded = self.load_table(table).await?.ok_or_else(|| CatalogError::Status {
            catalog: self.name.clone(),
            operation: op,
            status: StatusCode::NOT_FOUND,
            error_type: Some("NoSuchTableException".into()),
            message: format!("{table} no longer exists, so its storage credentials cannot be renewed"),
        })?;
        Ok(loaded.credentials)
    }

    /// Keeps the credentials vended with `loaded`, renewed through this catalog.
    fn keep_credentials(&self, table: &TableIdent, loaded: &LoadedTable) {
        if let Some(vending) = &self.vending
            && !loaded.credentials.is_empty()
        {
            let renew: Arc<dyn Renew> =
                Arc::new(TableRenewal { catalog: vending.catalog.clone(), table: table.clone() });
            vending.credentials.remember(loaded.credentials.clone(), &renew);
        }
    }

    /// The catalog's name in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends `GET /v1/config` and returns the HTTP status, whatever it is.
    ///
    /// Any HTTP answer shows the catalog is reachable; the status tells the
    /// caller whether icerelay's credentials are accepted.
    pub async fn probe(&self) -> Result<StatusCode, CatalogError> {
        let (status, _) = self.send("getConfig", Method::GET, &self.config_url(), None).await?;
        Ok(status)
    }

    /// `GET /v1/config`, fetched once and cached.
    pub async fn config(&self) -> Result<&CatalogConfig, CatalogError> {
        self.config
            .get_or_try_init(|| async {
                let op = "getConfig";
                let (status, body) = self.send(op, Method::GET, &self.config_url(), None).await?;
                if !status.is_success() {
                    return Err(self.status_error(op, status, &body));
                }
                let parsed: ConfigResponse = self.decode(op, &body)?;
                let mut properties = parsed.defaults;
                properties.extend(parsed.overrides);
                let prefix = properties.get("prefix").and_then(Value::as_str).map(str::to_owned);
                Ok(CatalogConfig { prefix, properties, endpoints: parsed.endpoints })
            })
            .await
    }

    /// `GET .../namespaces/{ns}/tables/{table}`; `None` when the table does not exist.
    pub async fn load_table(&self, table: &TableIdent) -> Result<Option<LoadedTable>, CatalogError> {
        let op = format!("loadTable {table}");
        let url = self.table_url(table).await?;
        let (status, body) = self.send_delegating(&op, Method::GET, &url, None, true).await?;
        match status {
            s if s.is_success() => {
                let loaded = self.decode_table(&op, &body)?;
                self.keep_credentials(table, &loaded);
                Ok(Some(loaded))
            }
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(self.status_error(&op, s, &body)),
        }
    }

    /// The table's metadata location, unless it is unchanged since the answer
    /// that carried `etag` (catalogs that support conditional loads answer
    /// `304` then, without the metadata). Only refs are asked for
    /// (`snapshots=refs`): the location is all a check needs.
    pub async fn check_table(&self, table: &TableIdent, etag: Option<&str>) -> Result<TableCheck, CatalogError> {
        let op = format!("loadTable {table}");
        let mut url = self.table_url(table).await?;
        url.query_pairs_mut().append_pair("snapshots", "refs");
        let answer = self.exchange(&op, Method::GET, &url, None, false, etag).await?;
        match answer.status {
            StatusCode::NOT_MODIFIED => Ok(TableCheck::Unchanged),
            s if s.is_success() => {
                let loaded = self.decode_table(&op, &answer.body)?;
                Ok(TableCheck::Loaded { metadata_location: loaded.metadata_location, etag: answer.etag })
            }
            StatusCode::NOT_FOUND => Ok(TableCheck::Missing),
            s => Err(self.status_error(&op, s, &answer.body)),
        }
    }

    /// One property of a table, read where an engine's request found it:
    /// `prefix` is the `{prefix}` of that request's path (already encoded),
    /// not this client's. `Ok(None)` when the table or the property does not
    /// exist. Only refs are asked for (`snapshots=refs`), to keep the answer small.
    pub async fn table_property(
        &self,
        prefix: Option<&str>,
        table: &TableIdent,
        key: &str,
    ) -> Result<Option<String>, CatalogError> {
        let op = format!("loadTable {table}");
        let mut url = self
            .join(&["namespaces", &table.namespace.to_path_segment(), "tables", &table.name_path_segment()], prefix);
        url.query_pairs_mut().append_pair("snapshots", "refs");
        let (status, body) = self.send(&op, Method::GET, &url, None).await?;
        match status {
            s if s.is_success() => table_property_in(&body, key).map_err(|cause| CatalogError::Decode {
                catalog: self.name.clone(),
                operation: op,
                cause,
            }),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(self.status_error(&op, s, &body)),
        }
    }

    /// Lists the namespaces under `parent` (all pages).
    pub async fn list_namespaces(&self, parent: Option<&Namespace>) -> Result<Vec<Namespace>, CatalogError> {
        #[derive(Deserialize)]
        struct Page {
            namespaces: Vec<Namespace>,
            #[serde(rename = "next-page-token")]
            next_page_token: Option<String>,
        }
        let op = "listNamespaces";
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut url = self.url(&["namespaces"]).await?;
            if let Some(parent) = parent {
                url.query_pairs_mut().append_pair("parent", &parent.levels().join("\u{1f}"));
            }
            if let Some(t) = &token {
                url.query_pairs_mut().append_pair("pageToken", t);
            }
            let (status, body) = self.send(op, Method::GET, &url, None).await?;
            if !status.is_success() {
                return Err(self.status_error(op, status, &body));
            }
            let page: Page = self.decode(op, &body)?;
            all.extend(page.namespaces);
            match page.next_page_token.filter(|t| !t.is_empty()) {
                Some(t) if token.as_deref() != Some(&t) => token = Some(t),
                _ => return Ok(all),
            }
        }
    }

    /// Lists the tables of a namespace (all pages).
    pub async fn list_tables(&self, namespace: &Namespace) -> Result<Vec<TableIdent>, CatalogError> {
        #[derive(Deserialize)]
        struct Page {
            identifiers: Vec<TableIdent>,
            #[serde(rename = "next-page-token")]
            next_page_token: Option<String>,
        }
        let op = format!("listTables {namespace}");
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut url = self.url(&["namespaces", &namespace.to_path_segment(), "tables"]).await?;
            if let Some(t) = &token {
                url.query_pairs_mut().append_pair("pageToken", t);
            }
            let (status, body) = self.send(&op, Method::GET, &url, None).await?;
            if !status.is_success() {
                return Err(self.status_error(&op, status, &body));
            }
            let page: Page = self.decode(&op, &body)?;
            all.extend(page.identifiers);
            match page.next_page_token.filter(|t| !t.is_empty()) {
                Some(t) if token.as_deref() != Some(&t) => token = Some(t),
                _ => return Ok(all),
            }
        }
    }

    /// Loads a namespace's properties; `None` when it does not exist.
    pub async fn load_namespace(
        &self,
        namespace: &Namespace,
    ) -> Result<Option<serde_json::Map<String, Value>>, CatalogError> {
        #[derive(Deserialize)]
        struct Loaded {
            #[serde(default)]
            properties: serde_json::Map<String, Value>,
        }
        let op = format!("loadNamespace {namespace}");
        let url = self.url(&["namespaces", &namespace.to_path_segment()]).await?;
        let (status, body) = self.send(&op, Method::GET, &url, None).await?;
        match status {
            s if s.is_success() => Ok(Some(self.decode::<Loaded>(&op, &body)?.properties)),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(self.status_error(&op, s, &body)),
        }
    }

    /// Creates a namespace (and its parents); an existing one is fine.
    pub async fn ensure_namespace(&self, namespace: &Namespace) -> Result<(), CatalogError> {
        let levels = namespace.levels();
        for depth in 1..=levels.len() {
            let ns = Namespace::new(levels[..depth].to_vec());
            if self.load_namespace(&ns).await?.is_some() {
                continue;
            }
            let op = format!("createNamespace {ns}");
            let url = self.url(&["namespaces"]).await?;
            let body = json!({"namespace": ns, "properties": {}});
            let (status, answer) = self.send(&op, Method::POST, &url, Some(&body)).await?;
            if !(status.is_success() || status == StatusCode::CONFLICT) {
                return Err(self.status_error(&op, status, &answer));
            }
        }
        Ok(())
    }

    /// `DELETE .../namespaces/{ns}`; a missing namespace is fine.
    pub async fn drop_namespace(&self, namespace: &Namespace) -> Result<(), CatalogError> {
        let op = format!("dropNamespace {namespace}");
        let url = self.url(&["namespaces", &namespace.to_path_segment()]).await?;
        let (status, body) = self.send(&op, Method::DELETE, &url, None).await?;
        if status.is_success() || status == StatusCode::NOT_FOUND {
            Ok(())
        } else {
            Err(self.status_error(&op, status, &body))
        }
    }

    /// `POST .../namespaces/{ns}/tables` with a raw `CreateTableRequest`.
    pub async fn create_table(&self, namespace: &Namespace, request: &Value) -> Result<LoadedTable, CatalogError> {
        let name = request.get("name").and_then(Value::as_str).unwrap_or("?");
        let op = format!("createTable {namespace}.{name}");
        let url = self.url(&["namespaces", &namespace.to_path_segment(), "tables"]).await?;
        let (status, body) = self.send_delegating(&op, Method::POST, &url, Some(request), true).await?;
        if !status.is_success() {
            return Err(self.status_error(&op, status, &body));
        }
        let loaded = self.decode_table(&op, &body)?;
        self.keep_credentials(&TableIdent::new(namespace.clone(), name), &loaded);
        Ok(loaded)
    }

    /// `POST .../namespaces/{ns}/register`.
    pub async fn register_table(
        &self,
        table: &TableIdent,
        metadata_location: &str,
    ) -> Result<LoadedTable, CatalogError> {
        let op = format!("registerTable {table}");
        let url = self.url(&["namespaces", &table.namespace.to_path_segment(), "register"]).await?;
        let request = json!({"name": table.name, "metadata-location": metadata_location});
        let (status, body) = self.send_delegating(&op, Method::POST, &url, Some(&request), true).await?;
        if !status.is_success() {
            return Err(self.status_error(&op, status, &body));
        }
        // Some catalogs answer registerTable with an empty or partial body; load to be sure.
        match self.decode_table(&op, &body) {
            Ok(t) => {
                self.keep_credentials(table, &t);
                Ok(t)
            }
            Err(_) => self.load_table(table).await?.ok_or_else(|| CatalogError::Decode {
                catalog: self.name.clone(),
                operation: op,
                cause: "registerTable succeeded but the table cannot be loaded".into(),
            }),
        }
    }

    /// `POST .../namespaces/{ns}/tables/{table}`: one commit with raw requirements and updates.
    ///
    /// 409 is [`CatalogError::CommitConflict`]; a timeout or 500/502/503/504 is
    /// [`CatalogError::CommitOutcomeUnknown`].
    pub async fn update_table(
        &self,
        table: &TableIdent,
        requirements: &[Value],
        updates: &[Value],
    ) -> Result<LoadedTable, CatalogError> {
        let op = format!("updateTable {table}");
        let url = self.table_url(table).await?;
        let request = json!({"identifier": table, "requirements": requirements, "updates": updates});
        let body = self.commit(&op, &table.to_string(), &url, &request).await?;
        self.decode_table(&op, &body)
    }

    /// The commit of a create transaction (`assert-create`): makes `table`
    /// from `staged`, the metadata a staged create (`stage-create`) answered,
    /// with the table uuid `uuid`, and applies `updates` in the same commit.
    /// The table exists only once this commit lands.
    pub async fn commit_create(
        &self,
        table: &TableIdent,
        staged: &Value,
        uuid: &str,
        updates: &[Value],
    ) -> Result<LoadedTable, CatalogError> {
        let first = |list: &str| staged.pointer(&format!("/{list}/0")).cloned().unwrap_or(Value::Null);
        let mut all = vec![
            json!({"action": "assign-uuid", "uuid": uuid}),
            json!({"action": "upgrade-format-version", "format-version": staged.get("format-version")}),
            json!({"action": "add-schema", "schema": first("schemas"), "last-column-id": staged.get("last-column-id")}),
            json!({"action": "set-current-schema", "schema-id": -1}),
            json!({"action": "add-spec", "spec": first("partition-specs")}),
            json!({"action": "set-default-spec", "spec-id": -1}),
            json!({"action": "add-sort-order", "sort-order": first("sort-orders")}),
            json!({"action": "set-default-sort-order", "sort-order-id": -1}),
            json!({"action": "set-location", "location": staged.get("location")}),
            json!({"action": "set-properties", "updates": staged.get("properties").cloned().unwrap_or(json!({}))}),
        ];
        all.extend(updates.iter().cloned());
        self.update_table(table, &[json!({"type": "assert-create"})], &all).await
    }

    /// `POST .../transactions/commit`: several tables' commits, all applied
    /// or none. The catalog answers without the new metadata (load the tables).
    pub async fn commit_transaction(&self, changes: &[TableCommit<'_>]) -> Result<(), CatalogError> {
        let tables: Vec<String> = changes.iter().map(|c| c.table.to_string()).collect();
        let tables = tables.join(", ");
        let op = format!("commitTransaction {tables}");
        let url = self.url(&["transactions", "commit"]).await?;
        let changes: Vec<Value> = changes
            .iter()
            .map(|c| json!({"identifier": c.table, "requirements": c.requirements, "updates": c.updates}))
            .collect();
        self.commit(&op, &tables, &url, &json!({"table-changes": changes})).await.map(drop)
    }

    /// Sends a commit; an answer that leaves open whether it was applied
    /// (a timeout, a 5xx) is `CommitOutcomeUnknown`, a refused requirement
    /// `CommitConflict`.
    async fn commit(&self, op: &str, tables: &str, url: &Url, request: &Value) -> Result<bytes::Bytes, CatalogError> {
        let (status, body) = match self.send(op, Method::POST, url, Some(request)).await {
            Ok(answer) => answer,
            Err(CatalogError::Timeout { .. }) => {
                return Err(CatalogError::CommitOutcomeUnknown {
                    catalog: self.name.clone(),
                    table: tables.to_owned(),
                    cause: format!("no answer within {}", humantime::format_duration(self.settings.request_timeout)),
                });
            }
            Err(e) => return Err(e),
        };
        match status {
            s if s.is_success() => Ok(body),
            StatusCode::CONFLICT => Err(CatalogError::CommitConflict {
                catalog: self.name.clone(),
                table: tables.to_owned(),
                message: error_message(&body),
            }),
            StatusCode::INTERNAL_SERVER_ERROR
            | StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT => Err(CatalogError::CommitOutcomeUnknown {
                catalog: self.name.clone(),
                table: tables.to_owned(),
                cause: format!("{status}: {}", error_message(&body)),
            }),
            s => Err(self.status_error(op, s, &body)),
        }
    }

    /// `POST .../tables/rename`.
    pub async fn rename_table(&self, from: &TableIdent, to: &TableIdent) -> Result<(), CatalogError> {
        let op = format!("renameTable {from} -> {to}");
        let url = self.url(&["tables", "rename"]).await?;
        let request = json!({"source": from, "destination": to});
        let (status, body) = self.send(&op, Method::POST, &url, Some(&request)).await?;
        if status.is_success() { Ok(()) } else { Err(self.status_error(&op, status, &body)) }
    }

    /// `DELETE .../namespaces/{ns}/tables/{table}`; a missing table is fine.
    pub async fn drop_table(&self, table: &TableIdent, purge: bool) -> Result<(), CatalogError> {
        let op = format!("dropTable {table}");
        let mut url = self.table_url(table).await?;
        if purge {
            url.query_pairs_mut().append_pair("purgeRequested", "true");
        }
        let (status, body) = self.send(&op, Method::DELETE, &url, None).await?;
        if status.is_success() || status == StatusCode::NOT_FOUND {
            Ok(())
        } else {
            Err(self.status_error(&op, status, &body))
        }
    }

    // === requests ===

    fn config_url(&self) -> Url {
        let mut url = self.join(&["config"], None);
        if let Some(w) = &self.warehouse {
            url.query_pairs_mut().append_pair("warehouse", w);
        }
        url
    }

    async fn table_url(&self, table: &TableIdent) -> Result<Url, CatalogError> {
        self.url(&["namespaces", &table.namespace.to_path_segment(), "tables", &table.name_path_segment()]).await
    }

    /// `<base>/v1/[<prefix>/]<segments...>`, with segments already percent-encoded.
    async fn url(&self, segments: &[&str]) -> Result<Url, CatalogError> {
        let prefix = self.config().await?.prefix.clone();
        Ok(self.join(segments, prefix.as_deref()))
    }

    fn join(&self, segments: &[&str], prefix: Option<&str>) -> Url {
        let mut path = format!("{}/v1", self.base.path().trim_end_matches('/'));
        if let Some(p) = prefix {
            path.push('/');
            path.push_str(p);
        }
        for s in segments {
            path.push('/');
            path.push_str(s);
        }
        let mut url = self.base.clone();
        url.set_path(&path);
        url
    }

    /// Sends one request with icerelay's credentials; on `401` forgets the
    /// cached token and tries once more.
    async fn send(
        &self,
        operation: &str,
        method: Method,
        url: &Url,
        body: Option<&Value>,
    ) -> Result<(StatusCode, bytes::Bytes), CatalogError> {
        self.send_delegating(operation, method, url, body, false).await
    }

    /// [`Self::send`], asking for vended credentials when `delegate` and this
    /// catalog keeps them.
    async fn send_delegating(
        &self,
        operation: &str,
        method: Method,
        url: &Url,
        body: Option<&Value>,
        delegate: bool,
    ) -> Result<(StatusCode, bytes::Bytes), CatalogError> {
        let answer = self.exchange(operation, method, url, body, delegate, None).await?;
        Ok((answer.status, answer.body))
    }

    /// One call, with the retries every call gets (without the delegation
    /// header, with fresh credentials); `if_none_match` makes it conditional,
    /// and a `304 Not Modified` is then an answer, not a redirect.
    async fn exchange(
        &self,
        operation: &str,
        method: Method,
        url: &Url,
        body: Option<&Value>,
        delegate: bool,
        if_none_match: Option<&str>,
    ) -> Result<Answer, CatalogError> {
        let mut ask = delegate && self.vending.as_ref().is_some_and(|v| !v.refused.load(Ordering::Relaxed));
        let mut refused_with_header = false;
        let mut refreshed = false;
        // At most three rounds: once without the delegation header, once with fresh credentials.
        loop {
            let mut builder = self.http.request(method.clone(), url.clone());
            if ask {
                builder = builder.header(ACCESS_DELEGATION, "vended-credentials");
            }
            if let Some(writer) = &self.writer {
                builder = builder.header(crate::replicate::mark::WRITER_HEADER, writer.clone());
            }
            if let Some(b) = body {
                builder = builder.json(b);
            }
            if let Some(etag) = if_none_match {
                builder = builder.header(reqwest::header::IF_NONE_MATCH, etag);
            }
            let mut request =
                builder.build().map_err(|source| CatalogError::Client { catalog: self.name.clone(), source })?;
            self.auth
                .authorize(&self.http, &mut request)
                .await
                .map_err(|source| CatalogError::Auth { catalog: self.name.clone(), source })?;
            let response = self.http.execute(request).await.map_err(|e| self.transport_error(url, e))?;
            let status = response.status();
            if status.is_redirection() && !(if_none_match.is_some() && status == StatusCode::NOT_MODIFIED) {
                let mut shown = url.clone();
                shown.set_query(None);
                return Err(CatalogError::Redirect {
                    catalog: self.name.clone(),
                    operation: operation.to_owned(),
                    url: shown.to_string(),
                    status,
                    location: location_of(&response),
                });
            }
            let etag = response.headers().get(reqwest::header::ETAG).and_then(|v| v.to_str().ok()).map(str::to_owned);
            let bytes = self.read_answer(response, url, operation).await?;
            if ask && status == StatusCode::FORBIDDEN {
                // Some catalogs refuse the request itself when the caller may
                // not have credentials vended: ask once more without.
                ask = false;
                refused_with_header = true;
                continue;
            }
            if refused_with_header
                && status != StatusCode::FORBIDDEN
                && let Some(vending) = &self.vending
                && !vending.refused.swap(true, Ordering::Relaxed)
            {
                tracing::warn!(
                    catalog = %self.name,
                    "the catalog refuses requests that ask for vended storage credentials (403) and answers them \
                     without; icerelay stops asking it: give [[storage]] keys or AWS credentials, or grant the \
                     credential-vending privilege and restart"
                );
            }
            if self.credentials_refused(status, &bytes) && !refreshed {
                refreshed = true;
                self.auth.invalidate().await;
                continue;
            }
            tracing::debug!(catalog = %self.name, operation, status = status.as_u16(), "catalog call");
            return Ok(Answer { status, etag, body: bytes });
        }
    }

    /// Whether the catalog refused icerelay's credentials themselves (a
    /// stale token, a bad or expired signature), not what they may do: only
    /// then is fetching new credentials worth it.
    fn credentials_refused(&self, status: StatusCode, body: &[u8]) -> bool {
        match status {
            StatusCode::UNAUTHORIZED => true,
            StatusCode::FORBIDDEN if self.auth.sigv4().is_some() => {
                let text = String::from_utf8_lossy(body).to_ascii_lowercase();
                [
                    "signature",
                    "expiredtoken",
                    "security token",
                    "invalidclienttokenid",
                    "unrecognizedclient",
                    "access key",
                ]
                .iter()
                .any(|sign| text.contains(sign))
            }
            _ => false,
        }
    }

    fn decode<T: serde::de::DeserializeOwned>(&self, operation: &str, body: &[u8]) -> Result<T, CatalogError> {
        serde_json::from_slice(body).map_err(|e| CatalogError::Decode {
            catalog: self.name.clone(),
            operation: operation.to_owned(),
            cause: e.to_string(),
        })
    }

    fn decode_table(&self, operation: &str, body: &[u8]) -> Result<LoadedTable, CatalogError> {
        let mut answer: Value = self.decode(operation, body)?;
        let credentials = StorageCredential::from_answer(&answer);
        let metadata = answer.get_mut("metadata").map(Value::take).filter(Value::is_object).ok_or_else(|| {
            CatalogError::Decode {
                catalog: self.name.clone(),
                operation: operation.to_owned(),
                cause: "`metadata` is missing or not an object".into(),
            }
        })?;
        let metadata_location = answer.get("metadata-location").and_then(Value::as_str).map(str::to_owned);
        Ok(LoadedTable { metadata_location, metadata, credentials })
    }

    fn status_error(&self, operation: &str, status: StatusCode, body: &[u8]) -> CatalogError {
        if let Some(signer) = self.auth.sigv4()
            && self.credentials_refused(status, body)
        {
            return CatalogError::SigV4Refused {
                catalog: self.name.clone(),
                operation: operation.to_owned(),
                status,
                message: error_message(body),
                signer: Box::new(SignerIdentity {
                    service: signer.service().to_owned(),
                    region: signer.region().to_owned(),
                    key_id: signer.credentials().key_id().unwrap_or_else(|| "(none resolved)".to_owned()),
                    from_environment: signer.credentials().from_environment(),
                }),
            };
        }
        let parsed = serde_json::from_slice::<ErrorResponse>(body).ok();
        CatalogError::Status {
            catalog: self.name.clone(),
            operation: operation.to_owned(),
            status,
            error_type: parsed.as_ref().and_then(|p| p.error.r#type.clone()),
            message: error_message(body),
        }
    }

    /// The body of an answer, up to [`MAX_ANSWER_BYTES`]: a catalog that
    /// answers without end must not exhaust icerelay's memory.
    async fn read_answer(
        &self,
        response: reqwest::Response,
        url: &Url,
        operation: &str,
    ) -> Result<bytes::Bytes, CatalogError> {
        body_within(response, MAX_ANSWER_BYTES).await.map_err(|e| self.transport_error(url, e))?.ok_or_else(|| {
            CatalogError::Decode {
                catalog: self.name.clone(),
                operation: operation.to_owned(),
                cause: format!("the answer is larger than {MAX_ANSWER_BYTES} bytes, more than any table's metadata"),
            }
        })
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

/// The body of `response`, or `None` when it is larger than `limit` bytes
/// (as declared, or as it streams in): nothing beyond the limit is read.
pub(crate) async fn body_within(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Option<bytes::Bytes>, reqwest::Error> {
    if response.content_length().is_some_and(|declared| declared > limit as u64) {
        return Ok(None);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(bytes::Bytes::from(body)))
}

/// The `Location` header of a redirect, for messages (query removed: it may carry a token).
pub(crate) fn location_of(response: &reqwest::Response) -> String {
    let raw =
        response.headers().get(reqwest::header::LOCATION).map(|l| String::from_utf8_lossy(l.as_bytes()).into_owned());
    match raw {
        None => "(no Location header)".to_owned(),
        Some(l) => l.split(['?', '#']).next().unwrap_or_default().to_owned(),
    }
}

/// The `message` of an Iceberg `ErrorModel`, or the start of the body.
fn error_message(body: &[u8]) -> String {
    match serde_json::from_slice::<ErrorResponse>(body) {
        Ok(ErrorResponse { error: ErrorBody { message: Some(m), .. } }) => m,
        _ => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if text.is_empty() { "(empty body)".to_owned() } else { text.chars().take(300).collect() }
        }
    }
}

/// A table property in a loadTable answer; `None` when the table has no such
/// property. An answer that is not a loadTable answer (not JSON, compressed,
/// no `metadata`) is an error: the read-only check must not take a table it
/// could not read for one without the mark.
pub fn table_property_in(answer: &[u8], key: &str) -> Result<Option<String>, String> {
    let answer: Value = serde_json::from_slice(answer)
        .map_err(|e| format!("the loadTable answer is not JSON ({e}; {} bytes)", answer.len()))?;
    let metadata = answer
        .get("metadata")
        .and_then(Value::as_object)
        .ok_or_else(|| "the loadTable answer has no `metadata` object".to_owned())?;
    Ok(metadata.get("properties").and_then(|p| p.get(key)).and_then(Value::as_str).map(str::to_owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keep_encoded_segments_and_the_base_path() {
        let catalog = RestCatalog::new(
            "t",
            Url::parse("http://h:1/api/catalog/").expect("url"),
            None,
            &AuthConfig::None,
            ClientSettings {
                connect_timeout: Duration::from_secs(1),
                request_timeout: Duration::from_secs(1),
                ca_file: None,
            },
        )
        .expect("client");
        let ns = Namespace::new(vec!["a".into(), "b c".into()]);
        let url = catalog.join(&["namespaces", &ns.to_path_segment(), "tables"], Some("wh"));
        assert_eq!(url.as_str(), "http://h:1/api/catalog/v1/wh/namespaces/a%1Fb%20c/tables");
    }

    /// A server on loopback that answers every connection with `head`, then
    /// `body_mib` MiB of JSON whitespace, and keeps the connection open.
    async fn answering(head: &'static str, body_mib: usize) -> Url {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = vec![0u8; 64 * 1024];
                    let _ = socket.read(&mut request).await;
                    let _ = socket.write_all(head.as_bytes()).await;
                    let chunk = vec![b' '; 1 << 20];
                    for _ in 0..body_mib {
                        if socket.write_all(&chunk).await.is_err() {
                            return;
                        }
                    }
                    tokio::time::sleep(Duration::from_secs(30)).await;
                });
            }
        });
        Url::parse(&format!("http://{address}/")).expect("url")
    }

    async fn get(url: Url) -> reqwest::Response {
        reqwest::Client::new().get(url).send().await.expect("answer")
    }

    #[tokio::test]
    async fn answers_are_read_within_their_bound_declared_or_streamed() {
        let streamed = "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n";
        let url = answering(streamed, 3).await;
        assert!(body_within(get(url.clone()).await, 2 << 20).await.expect("read").is_none(), "3 MiB > 2 MiB");
        let declared = "HTTP/1.1 200 OK\r\nContent-Length: 3145728\r\n\r\n";
        let url = answering(declared, 3).await;
        assert_eq!(body_within(get(url).await, 3 << 20).await.expect("read").map(|b| b.len()), Some(3 << 20));

        // A catalog declaring more than any metadata: refused before a byte
        // of it is read (the server sends none).
        let huge =
            Box::leak(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", MAX_ANSWER_BYTES + 1).into_boxed_str());
        let settings = ClientSettings {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            ca_file: None,
        };
        let catalog =
            RestCatalog::new("huge", answering(huge, 0).await, None, &AuthConfig::None, settings).expect("client");
        let table = TableIdent::new(Namespace::from_dotted("db"), "t");
        let e = catalog.load_table(&table).await.expect_err("too large");
        assert!(matches!(e, CatalogError::Decode { .. }), "{e}");
        assert!(e.to_string().contains(&format!("larger than {MAX_ANSWER_BYTES} bytes")), "{e}");
    }

    #[test]
    fn error_messages_come_from_the_error_model() {
        assert_eq!(error_message(br#"{"error":{"message":"boom","type":"X","code":409}}"#), "boom");
        assert_eq!(error_message(b""), "(empty body)");
        assert_eq!(error_message(b"plain"), "plain");
    }
}
