//! Refuses engine writes to read-only replicas, before they reach the primary.
//!
//! A table carrying the read-only mark ([`crate::replicate::mark`]) is kept
//! by an icerelay as a copy of another table; a write to it would make it
//! diverge from its source and stop its replication. So before forwarding a
//! write (updateTable, dropTable, renameTable of it, a transactions/commit
//! naming it, registerTable with `overwrite`), this layer reads the table's
//! mark from the primary and answers 403 with an `ErrorModel` that says what
//! the table replicates and how to promote it. Nothing of a refused request
//! is forwarded. Reads are never checked.
//!
//! The icerelay that keeps a replica writes it with a header naming itself
//! as the mark does ([`crate::replicate::mark::WRITER_HEADER`]); those
//! writes pass, so replication works through an icerelay in front of the
//! replica catalog.
//!
//! Whose credentials read the mark:
//! - **icerelay's own** when `[primary] auth` gives it some. A check the
//!   primary refuses, or that gets no answer, refuses the write too (503): the
//!   read-only promise holds, and the message says what to fix.
//! - **the engine's** otherwise (a pure proxy, engines bring their own
//!   credentials): the check is a `loadTable` with the write's own headers,
//!   sent the way the write would be. If the primary refuses the engine that
//!   read (401/403), the write goes on and the primary answers it itself.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, Method, Request, StatusCode, header};
use serde::Deserialize;
use tower::{Layer, Service, ServiceExt};

use super::body::{read_bounded, read_request_body};
use super::error::ProxyError;
use super::router::{Classified, Operation, classify};
use crate::catalog::{RestCatalog, TableIdent, table_property_in};
use crate::replicate::mark::{REPLICA_OF, WRITER_HEADER, written_by};

/// The most tables of one write checked for the mark (a transaction naming
/// more is refused).
pub const MAX_CHECKED_TABLES: usize = 1000;

/// A boxed future of a mark lookup.
pub type MarkFuture<'a> = Pin<Box<dyn Future<Output = Result<Option<String>, String>> + Send + 'a>>;

/// Reads a table's read-only mark on the primary.
pub trait ReplicaMarks: Send + Sync + 'static {
    /// The mark of `table` under the request's `prefix`; `None` when the
    /// table is not a replica (or does not exist). `Err` says why the primary
    /// could not be asked.
    fn mark<'a>(&'a self, prefix: Option<&'a str>, table: &'a TableIdent) -> MarkFuture<'a>;
}

impl ReplicaMarks for RestCatalog {
    fn mark<'a>(&'a self, prefix: Option<&'a str>, table: &'a TableIdent) -> MarkFuture<'a> {
        Box::pin(async move { self.table_property(prefix, table, REPLICA_OF).await.map_err(|e| e.to_string()) })
    }
}

/// Builds [`ReadOnly`] services.
#[derive(Clone)]
pub struct ReadOnlyLayer {
    own: Option<Arc<dyn ReplicaMarks>>,
    limit: u64,
}

impl ReadOnlyLayer {
    /// Marks are read through `own` (icerelay's credentials), or with the
    /// engine's when `None`; inspected bodies are bounded by `limit` bytes.
    pub fn new(own: Option<Arc<dyn ReplicaMarks>>, limit: u64) -> Self {
        Self { own, limit }
    }
}

impl<S> Layer<S> for ReadOnlyLayer {
    type Service = ReadOnly<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ReadOnly { inner, settings: self.clone() }
    }
}

/// The service built by [`ReadOnlyLayer`].
#[derive(Clone)]
pub struct ReadOnly<S> {
    inner: S,
    settings: ReadOnlyLayer,
}

impl<S> Service<Request<Body>> for ReadOnly<S>
where
    S: Service<Request<Body>, Response = Response, Error = ProxyError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<Response, ProxyError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let Some(classified) = req.extensions().get::<Classified>() else {
            return Box::pin(self.inner.call(req));
        };
        // Refused further down, before anything is sent anywhere: the check
        // must not send such a path (its prefix) to the primary either.
        if crate::dot_segments::has_dot_segment(req.uri().path()) {
            return Box::pin(self.inner.call(req));
        }
        let writes = match &classified.operation {
            Operation::UpdateTable(t) | Operation::DropTable(t) => Writes::Path(t.clone()),
            Operation::RenameTable => Writes::Body("renameTable", Operation::RenameTable),
            Operation::CommitTransaction => Writes::Body("commitTransaction", Operation::CommitTransaction),
            op @ Operation::RegisterTable(_) => Writes::Body("registerTable", op.clone()),
            _ => return Box::pin(self.inner.call(req)),
        };
        let prefix = classified.prefix.clone();
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let settings = self.settings.clone();
        Box::pin(async move {
            let (req, tables) = match writes {
                Writes::Path(table) => (req, vec![table]),
                Writes::Body(name, operation) => {
                    let (parts, body) = req.into_parts();
                    let bytes = read_request_body(&parts.headers, body, settings.limit, name).await?;
                    // A write whose tables icerelay cannot read could name a replica.
                    let tables =
                        written_tables(&operation, &bytes).ok_or(ProxyError::UnreadableWrite { operation: name })?;
                    // Each table is a loadTable sent before the primary has
                    // authorized the write: a bound, so one request cannot
                    // turn into thousands of them.
                    if tables.len() > MAX_CHECKED_TABLES {
                        return Err(ProxyError::TooManyTables {
                            operation: name,
                            tables: tables.len(),
                            limit: MAX_CHECKED_TABLES,
                        });
                    }
                    (Request::from_parts(parts, Body::from(bytes)), tables)
                }
            };
            let writer = req.headers().get(WRITER_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
            for table in &tables {
                let mark = match &settings.own {
                    Some(own) => own.mark(prefix.as_deref(), table).await,
                    None => engine_mark(inner.clone(), req.headers(), prefix.as_deref(), table, settings.limit).await,
                };
                match mark {
                    Ok(None) => {}
                    // The icerelay that keeps this replica, writing it.
                    Ok(Some(mark)) if writer.as_deref().is_some_and(|w| written_by(&mark, w)) => {}
                    Ok(Some(mark)) => {
                        return Err(ProxyError::ReadOnlyReplica { table: table.to_string(), mark });
                    }
                    Err(cause) => {
                        // The cause is the operator's business (it can name
                        // icerelay's identity), not the engine's: logged only.
                        tracing::warn!(table = %table, cause = %cause, "cannot check whether a written table is a read-only replica; the write was refused");
                        return Err(ProxyError::ReplicaCheck { table: table.to_string() });
                    }
                }
            }
            inner.call(req).await
        })
    }
}

/// Reads `table`'s mark with the engine's credentials: a `loadTable` with
/// the write's headers, through the rest of the stack as the write would go.
async fn engine_mark<S>(
    inner: S,
    headers: &HeaderMap,
    prefix: Option<&str>,
    table: &TableIdent,
    limit: u64,
) -> Result<Option<String>, String>
where
    S: Service<Request<Body>, Response = Response, Error = ProxyError>,
{
    let mut path = String::from("/v1");
    if let Some(prefix) = prefix {
        path.push('/');
        path.push_str(prefix);
    }
    path.push_str(&format!("/namespaces/{}/tables/{}", table.namespace.to_path_segment(), table.name_path_segment()));
    let classified = classify(&Method::GET, &path);
    let mut load = Request::builder()
        .method(Method::GET)
        .uri(format!("{path}?snapshots=refs"))
        .body(Body::empty())
        .map_err(|e| format!("cannot build the check request: {e}"))?;
    for (name, value) in headers {
        if !BODY_HEADERS.contains(name) {
            load.headers_mut().append(name.clone(), value.clone());
        }
    }
    // The answer is read here, not by the engine: uncompressed.
    load.headers_mut().insert(header::ACCEPT_ENCODING, http::HeaderValue::from_static("identity"));
    load.extensions_mut().insert(classified);
    let response = inner.oneshot(load).await.map_err(|e| e.to_string())?;
    let status = response.status();
    match status {
        s if s.is_success() => {
            let (parts, body) = response.into_parts();
            let bytes = read_bounded(&parts.headers, body, limit)
                .await
                .map_err(|_| format!("the primary's loadTable answer is larger than {limit} bytes (max_body_bytes)"))?;
            table_property_in(&bytes, REPLICA_OF)
        }
        // Not there, or this engine may not read it: the primary decides the write.
        StatusCode::NOT_FOUND | StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Ok(None),
        s => Err(format!("the primary answered loadTable {table} with {s}")),
    }
}

/// Headers of the write's body, which the check (a GET) does not have.
const BODY_HEADERS: [HeaderName; 6] = [
    header::CONTENT_LENGTH,
    header::CONTENT_TYPE,
    header::CONTENT_ENCODING,
    header::TRANSFER_ENCODING,
    header::EXPECT,
    HeaderName::from_static("idempotency-key"),
];

/// Where a write names its tables.
enum Writes {
    /// In the path.
    Path(TableIdent),
    /// In the body, which must be read first.
    Body(&'static str, Operation),
}

#[derive(Deserialize)]
struct RenameBody {
    source: TableIdent,
}

#[derive(Deserialize)]
struct TransactionBody {
    #[serde(rename = "table-changes")]
    table_changes: Vec<TableChange>,
}

#[derive(Deserialize)]
struct TableChange {
    identifier: Option<TableIdent>,
}

#[derive(Deserialize)]
struct RegisterBody {
    name: String,
    #[serde(default)]
    overwrite: bool,
}

/// The existing tables a write body changes; `None` when the body does not
/// parse (a catalog may read it differently, duplicate keys say).
fn written_tables(operation: &Operation, body: &Bytes) -> Option<Vec<TableIdent>> {
    Some(match operation {
        Operation::RenameTable => vec![serde_json::from_slice::<RenameBody>(body).ok()?.source],
        Operation::CommitTransaction => {
            let mut seen = std::collections::HashSet::new();
            serde_json::from_slice::<TransactionBody>(body)
                .ok()?
                .table_changes
                .into_iter()
                .filter_map(|c| c.identifier)
                .filter(|table| seen.insert(table.clone()))
                .collect()
        }
        Operation::RegisterTable(namespace) => {
            let b = serde_json::from_slice::<RegisterBody>(body).ok()?;
            if b.overwrite { vec![TableIdent::new(namespace.clone(), b.name)] } else { Vec::new() }
        }
        _ => Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Namespace;

    #[test]
    fn writes_name_the_tables_they_change() {
        let tx = r#"{"table-changes":[{"identifier":{"namespace":["a"],"name":"x"},"requirements":[],"updates":[]},
                                      {"identifier":{"namespace":["b"],"name":"y"},"requirements":[],"updates":[]}]}"#;
        let names = |op: &Operation, body: &str| -> Vec<String> {
            written_tables(op, &Bytes::from(body.to_owned()))
                .unwrap_or_default()
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(names(&Operation::CommitTransaction, tx), ["a.x", "b.y"]);
        let rename = r#"{"source":{"namespace":["a"],"name":"x"},"destination":{"namespace":["a"],"name":"z"}}"#;
        assert_eq!(names(&Operation::RenameTable, rename), ["a.x"]);
        let ns = Operation::RegisterTable(Namespace::from_dotted("db"));
        assert_eq!(names(&ns, r#"{"name":"r","metadata-location":"s3://b/m.json","overwrite":true}"#), ["db.r"]);
        assert!(names(&ns, r#"{"name":"r","metadata-location":"s3://b/m.json"}"#).is_empty());
        assert!(written_tables(&Operation::CommitTransaction, &Bytes::from("{")).is_none());
        let twice = r#"{"table-changes":[{"identifier":{"namespace":["a"],"name":"x"},"identifier":{"namespace":["a"],"name":"replica"}}]}"#;
        assert!(written_tables(&Operation::CommitTransaction, &Bytes::from(twice)).is_none(), "duplicate keys");
    }

    /// Counts the marks it is asked for; no table is a replica.
    #[derive(Default)]
    struct CountingMarks(std::sync::atomic::AtomicUsize);

    impl ReplicaMarks for CountingMarks {
        fn mark<'a>(&'a self, _: Option<&'a str>, _: &'a TableIdent) -> MarkFuture<'a> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async { Ok(None) })
        }
    }

    fn transaction_of(tables: impl Iterator<Item = usize>) -> String {
        let changes: Vec<String> = tables
            .map(|i| format!(r#"{{"identifier":{{"namespace":["a"],"name":"t{i}"}},"requirements":[],"updates":[]}}"#))
            .collect();
        format!(r#"{{"table-changes":[{}]}}"#, changes.join(","))
    }

    /// Sends a transactions/commit with `body` through the layer; the
    /// primary's stand-in answers 204.
    async fn commit_through(marks: &Arc<CountingMarks>, body: String) -> Result<StatusCode, ProxyError> {
        let own: Arc<dyn ReplicaMarks> = marks.clone();
        let primary = tower::service_fn(|_: Request<Body>| async {
            Ok::<_, ProxyError>(Response::builder().status(StatusCode::NO_CONTENT).body(Body::empty()).unwrap())
        });
        let service = ReadOnlyLayer::new(Some(own), 16 << 20).layer(primary);
        let mut request = Request::post("/v1/transactions/commit")
            .header(header::CONTENT_LENGTH, body.len())
            .body(Body::from(body))
            .unwrap();
        request.extensions_mut().insert(classify(&Method::POST, "/v1/transactions/commit"));
        service.oneshot(request).await.map(|r| r.status())
    }

    #[tokio::test]
    async fn a_check_answer_that_is_not_a_load_table_answer_refuses_the_write() {
        // The check is sent with the engine's headers, so a primary that
        // compresses would answer it compressed: asked for identity, and an
        // unreadable answer is a failed check, never "no mark".
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let checks = seen.clone();
        let primary = tower::service_fn(move |request: Request<Body>| {
            let checks = checks.clone();
            async move {
                let encoding = request.headers().get(header::ACCEPT_ENCODING).cloned();
                checks.lock().unwrap().push((request.method().clone(), encoding));
                let gzip = Body::from(vec![0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00]);
                Ok::<_, ProxyError>(Response::builder().status(StatusCode::OK).body(gzip).unwrap())
            }
        });
        let service = ReadOnlyLayer::new(None, 16 << 20).layer(primary);
        let path = "/v1/namespaces/db/tables/t";
        let mut write = Request::post(path)
            .header(header::ACCEPT_ENCODING, "gzip, deflate")
            .header(header::CONTENT_LENGTH, 2)
            .body(Body::from("{}"))
            .unwrap();
        write.extensions_mut().insert(classify(&Method::POST, path));
        let refused = service.oneshot(write).await.expect_err("refused");
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE, "{refused}");
        let checks = seen.lock().unwrap().clone();
        assert_eq!(checks.len(), 1, "only the check reached the primary, not the write: {checks:?}");
        assert_eq!(checks[0], (Method::GET, Some(http::HeaderValue::from_static("identity"))));

        assert!(table_property_in(b"\x1f\x8b", REPLICA_OF).is_err());
        assert!(table_property_in(br#"{"config": {}}"#, REPLICA_OF).is_err(), "no metadata");
        assert_eq!(table_property_in(br#"{"metadata": {"properties": {}}}"#, REPLICA_OF), Ok(None));
        let marked = format!(r#"{{"metadata": {{"properties": {{"{REPLICA_OF}": "db.t at x"}}}}}}"#);
        assert_eq!(table_property_in(marked.as_bytes(), REPLICA_OF), Ok(Some("db.t at x".to_owned())));
    }

    #[tokio::test]
    async fn a_transaction_checks_each_table_once_and_at_most_the_bound() {
        let marks = Arc::new(CountingMarks::default());
        let repeated = transaction_of((0..50).map(|i| i % 5));
        assert_eq!(commit_through(&marks, repeated).await.unwrap(), StatusCode::NO_CONTENT);
        assert_eq!(marks.0.load(std::sync::atomic::Ordering::SeqCst), 5, "one check per distinct table");

        let marks = Arc::new(CountingMarks::default());
        let at_bound = transaction_of(0..MAX_CHECKED_TABLES);
        assert_eq!(commit_through(&marks, at_bound).await.unwrap(), StatusCode::NO_CONTENT);
        assert_eq!(marks.0.load(std::sync::atomic::Ordering::SeqCst), MAX_CHECKED_TABLES);

        let marks = Arc::new(CountingMarks::default());
        let beyond = transaction_of(0..=MAX_CHECKED_TABLES);
        let refused = commit_through(&marks, beyond).await.expect_err("refused");
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
        assert!(
            refused.to_string().contains("changes 1001 tables") && refused.to_string().contains("split"),
            "{refused}"
        );
        assert_eq!(marks.0.load(std::sync::atomic::Ordering::SeqCst), 0, "nothing asked of the primary");
    }
}
