//! Watches successful commits and records a change hint for each table.
//!
//! The tap sees the request and the primary's answer and never changes
//! either: its error type is the inner service's, and the response it returns
//! is the one it received. When the primary answers 2xx to a table-changing
//! operation (updateTable, transactions/commit, createTable, registerTable,
//! renameTable, dropTable), the tap hands one [`CommitHint`] per table to the
//! [`HintSink`] before the answer goes back to the client.
//!
//! A hint says "this table changed", nothing more: replication compares the
//! source with each replica anyway, so a lost hint (a crash right after the
//! primary answered) is repaired by the periodic reconcile. If recording fails,
//! the tap logs, counts, and still returns the upstream answer: icerelay never
//! turns a success into a failure.
//!
//! Bodies are read only where the tables are named in them (create, register,
//! rename, transactions), and for updateTable, whose body says which
//! snapshots it adds, when its declared length is within the bound (else it
//! streams through untouched, as dropTable always does).
//!
//! A commit that adds snapshots to several tables, or several snapshots to
//! one table, is also handed over as a [`Transaction`], before it is
//! forwarded, so that replication commits them together on each replica:
//! the tables of a multi-table transaction in one `transactions/commit`,
//! and the snapshots one commit added to a branch other than `main` (which
//! no snapshot-log records) in one commit. The record is forgotten when the
//! primary refuses the commit (4xx), so a request it never authorized leaves
//! nothing behind, and one request records at most [`MAX_RECORDED_SNAPSHOTS`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::Request;
use serde::{Deserialize, Serialize};
use tower::{Layer, Service};

use super::body::{declared_length, read_request_body};
use super::error::ProxyError;
use super::router::{Classified, Operation};
use crate::catalog::{Namespace, TableIdent};
use crate::metrics::ProxyMetrics;

/// A hint that a table changed on the primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitHint {
    /// What happened.
    pub kind: HintKind,
    /// The table (after the change: a rename's destination).
    pub table: TableIdent,
    /// The REST `{prefix}` the request used, if any.
    pub prefix: Option<String>,
    /// The metadata location, when the request told it (registerTable).
    pub metadata_location: Option<String>,
}

/// The kinds of change a hint reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HintKind {
    /// New metadata: a commit, a create, a register.
    Commit,
    /// The table was dropped.
    Drop,
    /// The table was renamed from `from`.
    Rename {
        /// The old identifier.
        from: TableIdent,
    },
}

/// A commit the primary accepted that added snapshots to several tables (a
/// multi-table transaction), or several snapshots to one table: the
/// snapshots it added to each table. Replicas commit the same snapshots of
/// those tables in one commit, so that no reader sees one table (or one
/// branch) changed without the rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transaction {
    /// The tables it added snapshots to (at least two, or one with several).
    pub members: Vec<TransactionMember>,
}

/// One table of a [`Transaction`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransactionMember {
    /// The table.
    pub table: TableIdent,
    /// The snapshot ids the transaction added to it, in request order.
    pub snapshots: Vec<i64>,
}

/// A failure to record hints.
pub type HintError = Box<dyn std::error::Error + Send + Sync>;

/// Where hints go: the durable change log, or a log line in proxy-only mode.
pub trait HintSink: Send + Sync + 'static {
    /// Records the hints of one successful request.
    fn record(&self, hints: Vec<CommitHint>) -> Pin<Box<dyn Future<Output = Result<(), HintError>> + Send + '_>>;

    /// Records a multi-table transaction, before its hints; returns its id,
    /// if it was kept.
    fn record_transaction(
        &self,
        transaction: Transaction,
    ) -> Pin<Box<dyn Future<Output = Result<Option<i64>, HintError>> + Send + '_>> {
        tracing::debug!(tables = transaction.members.len(), "snapshots committed together on the primary");
        Box::pin(std::future::ready(Ok(None)))
    }

    /// Forgets the transaction recorded as `id`: the primary refused it.
    fn forget_transaction(&self, _id: i64) -> Pin<Box<dyn Future<Output = Result<(), HintError>> + Send + '_>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// A sink that only logs: used when no replication is configured.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogHints;

impl HintSink for LogHints {
    fn record(&self, hints: Vec<CommitHint>) -> Pin<Box<dyn Future<Output = Result<(), HintError>> + Send + '_>> {
        for hint in &hints {
            tracing::debug!(table = %hint.table, kind = ?hint.kind, "table changed on the primary");
        }
        Box::pin(std::future::ready(Ok(())))
    }
}

/// Builds [`CommitTap`] services.
#[derive(Clone)]
pub struct CommitTapLayer {
    sink: Arc<dyn HintSink>,
    metrics: Arc<ProxyMetrics>,
    limit: u64,
}

impl CommitTapLayer {
    /// Hints go to `sink`; inspected bodies are bounded by `limit` bytes.
    pub fn new(sink: Arc<dyn HintSink>, metrics: Arc<ProxyMetrics>, limit: u64) -> Self {
        Self { sink, metrics, limit }
    }
}

impl<S> Layer<S> for CommitTapLayer {
    type Service = CommitTap<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CommitTap { inner, settings: self.clone() }
    }
}

/// The service built by [`CommitTapLayer`].
#[derive(Clone)]
pub struct CommitTap<S> {
    inner: S,
    settings: CommitTapLayer,
}

/// What the tap needs to know about a request before forwarding it.
enum Watch {
    /// The table is in the path.
    Path(HintKind, TableIdent),
    /// The tables are in the body, which must be read first.
    Body(&'static str, Operation),
}

impl<S> Service<Request<Body>> for CommitTap<S>
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
        let prefix = classified.prefix.clone();
        let watch = match &classified.operation {
            op @ Operation::UpdateTable(_) if declared_within(req.headers(), self.settings.limit) => {
                Watch::Body("updateTable", op.clone())
            }
            Operation::UpdateTable(t) => Watch::Path(HintKind::Commit, t.clone()),
            Operation::DropTable(t) => Watch::Path(HintKind::Drop, t.clone()),
            op @ Operation::CreateTable(_) => Watch::Body("createTable", op.clone()),
            op @ Operation::RegisterTable(_) => Watch::Body("registerTable", op.clone()),
            op @ Operation::RenameTable => Watch::Body("renameTable", op.clone()),
            op @ Operation::CommitTransaction => Watch::Body("commitTransaction", op.clone()),
            _ => return Box::pin(self.inner.call(req)),
        };
        // Take the service that was driven to readiness; leave a fresh clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let settings = self.settings.clone();
        let forwarded = async move {
            let (Observed { hints, .. }, response) = match watch {
                Watch::Path(kind, table) => {
                    let response = inner.call(req).await?;
                    let hints = vec![CommitHint { kind, table, prefix, metadata_location: None }];
                    (Observed { hints, transaction: None }, response)
                }
                Watch::Body(name, operation) => {
                    let (parts, body) = req.into_parts();
                    let bytes = read_request_body(&parts.headers, body, settings.limit, name).await?;
                    let mut observed = observe_body(&operation, &bytes, prefix);
                    // Recorded before the primary applies it: from its answer on, a
                    // lane may see the new snapshots, and must know they go together.
                    let recorded = match observed.as_mut().and_then(|o| o.transaction.take()) {
                        Some(transaction) => record_transaction(settings.sink.as_ref(), transaction).await,
                        None => None,
                    };
                    let response = inner.call(Request::from_parts(parts, Body::from(bytes))).await?;
                    // A commit the primary refused (4xx: not applied, unlike a 5xx
                    // whose outcome is unknown) adds nothing: its record goes, so a
                    // request that was never authorized leaves nothing behind.
                    if let Some(id) = recorded
                        && response.status().is_client_error()
                        && let Err(error) = settings.sink.forget_transaction(id).await
                    {
                        tracing::warn!(error = %error, "could not forget a refused commit's record; it is pruned with the others");
                    }
                    (observed.unwrap_or_else(|| {
                        if response.status().is_success() {
                            tracing::warn!(operation = name, "could not read the tables from the request body; the periodic reconcile will pick up the change");
                        }
                        Observed::default()
                    }), response)
                }
            };
            if response.status().is_success() && !hints.is_empty() {
                let count = hints.len() as u64;
                match settings.sink.record(hints).await {
                    Ok(()) => {
                        settings.metrics.hints_recorded.inc_by(count);
                    }
                    Err(error) => {
                        settings.metrics.hints_failed.inc_by(count);
                        tracing::error!(error = %error, "could not record a change hint; the periodic reconcile will pick up the change");
                    }
                }
            }
            Ok(response)
        };
        // Apart from the connection: a client that hangs up (or times out)
        // while the primary applies its commit must not cancel the hint.
        let task = tokio::spawn(tracing::Instrument::in_current_span(forwarded));
        Box::pin(async move {
            match task.await {
                Ok(answer) => answer,
                Err(joined) if joined.is_panic() => std::panic::resume_unwind(joined.into_panic()),
                Err(_) => Err(ProxyError::ShuttingDown),
            }
        })
    }
}

#[derive(Deserialize)]
struct CreateTableBody {
    name: String,
    #[serde(rename = "stage-create", default)]
    stage_create: bool,
}

#[derive(Deserialize)]
struct RegisterTableBody {
    name: String,
    #[serde(rename = "metadata-location")]
    metadata_location: Option<String>,
}

#[derive(Deserialize)]
struct RenameTableBody {
    source: TableIdent,
    destination: TableIdent,
}

#[derive(Deserialize)]
struct UpdateTableBody {
    /// As in [`TableChange`].
    #[serde(default)]
    updates: AddedSnapshots,
}

#[derive(Deserialize)]
struct CommitTransactionBody {
    #[serde(rename = "table-changes")]
    table_changes: Vec<TableChange>,
}

#[derive(Deserialize)]
struct TableChange {
    identifier: Option<TableIdent>,
    /// Read only for the snapshots `add-snapshot` adds: whatever else is in
    /// them is the primary's business, and never costs the hints.
    #[serde(default)]
    updates: AddedSnapshots,
}

/// The most snapshots of one commit recorded as committed together: more
/// than any engine adds at once, and a bound on what one request (before
/// the primary has authorized it) writes to the state store.
pub const MAX_RECORDED_SNAPSHOTS: usize = 10_000;
/// The most bytes of table names one such record holds.
pub const MAX_RECORDED_NAME_BYTES: usize = 64 * 1024;

/// Records `transaction` through `sink`; its id, when it was kept.
async fn record_transaction(sink: &dyn HintSink, transaction: Transaction) -> Option<i64> {
    let snapshots: usize = transaction.members.iter().map(|m| m.snapshots.len()).sum();
    let name_bytes: usize = transaction
        .members
        .iter()
        .map(|m| m.table.name.len() + m.table.namespace.levels().iter().map(String::len).sum::<usize>())
        .sum();
    if snapshots > MAX_RECORDED_SNAPSHOTS || name_bytes > MAX_RECORDED_NAME_BYTES {
        tracing::warn!(
            snapshots,
            name_bytes,
            "a commit adds more snapshots, or to more tables, than icerelay records together; replicas will get them \
             one commit at a time"
        );
        return None;
    }
    match sink.record_transaction(transaction).await {
        Ok(id) => id,
        Err(error) => {
            tracing::error!(error = %error, "could not record which snapshots this commit added together; replicas will get them one commit at a time");
            None
        }
    }
}

/// What a request body tells the tap.
#[derive(Debug, Default)]
struct Observed {
    hints: Vec<CommitHint>,
    /// A transaction that added snapshots to several tables.
    transaction: Option<Transaction>,
}

/// What a successful request with this body changed; `None` when the body
/// does not parse (the primary decides whether it is valid, not icerelay).
fn observe_body(operation: &Operation, body: &Bytes, prefix: Option<String>) -> Option<Observed> {
    let hint = |kind, table, metadata_location| CommitHint { kind, table, prefix: prefix.clone(), metadata_location };
    let hints = match operation {
        Operation::CreateTable(ns) => {
            let b: CreateTableBody = serde_json::from_slice(body).ok()?;
            // A staged create is not a table until its commit, which is an
            // updateTable or a transaction and produces its own hint.
            if b.stage_create { Vec::new() } else { vec![hint(HintKind::Commit, table_in(ns, b.name), None)] }
        }
        Operation::RegisterTable(ns) => {
            let b: RegisterTableBody = serde_json::from_slice(body).ok()?;
            vec![hint(HintKind::Commit, table_in(ns, b.name), b.metadata_location)]
        }
        Operation::RenameTable => {
            let b: RenameTableBody = serde_json::from_slice(body).ok()?;
            vec![hint(HintKind::Rename { from: b.source }, b.destination, None)]
        }
        Operation::UpdateTable(table) => {
            // The path names the table: a body that does not parse costs only the grouping.
            let updates = serde_json::from_slice::<UpdateTableBody>(body).map(|b| b.updates).unwrap_or_default();
            let change = TableChange { identifier: Some(table.clone()), updates };
            return Some(Observed {
                hints: vec![hint(HintKind::Commit, table.clone(), None)],
                transaction: transaction_of(vec![change]),
            });
        }
        Operation::CommitTransaction => {
            let b: CommitTransactionBody = serde_json::from_slice(body).ok()?;
            let hints: Vec<CommitHint> = b
                .table_changes
                .iter()
                .map(|c| c.identifier.clone().map(|t| hint(HintKind::Commit, t, None)))
                .collect::<Option<_>>()?;
            return Some(Observed { hints, transaction: transaction_of(b.table_changes) });
        }
        _ => Vec::new(),
    };
    Some(Observed { hints, transaction: None })
}

/// What the changes committed together, if a replica must be told: snapshots
/// added to more than one table, or more than one snapshot added to a table.
/// (A commit of one snapshot to one table is one replica commit anyway.)
fn transaction_of(changes: Vec<TableChange>) -> Option<Transaction> {
    let members: Vec<TransactionMember> = changes
        .into_iter()
        .filter_map(|change| {
            let snapshots = change.updates.0;
            Some(TransactionMember { table: change.identifier?, snapshots }).filter(|m| !m.snapshots.is_empty())
        })
        .collect();
    let together = members.len() > 1 || members.first().is_some_and(|m| m.snapshots.len() > 1);
    together.then_some(Transaction { members })
}

/// The snapshot ids a list of updates adds (`add-snapshot`, in order), and
/// nothing else: the updates are walked, not kept, so a body of millions of
/// small values costs no memory beyond itself. Past
/// [`MAX_RECORDED_SNAPSHOTS`] ids no more are kept (the commit is then not
/// recorded at all). Whatever is not an `add-snapshot` with a numeric id is
/// skipped, never an error: the primary decides what is valid.
#[derive(Debug, Default)]
struct AddedSnapshots(Vec<i64>);

impl<'de> Deserialize<'de> for AddedSnapshots {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Updates;
        impl<'de> serde::de::Visitor<'de> for Updates {
            type Value = AddedSnapshots;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of table updates")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut updates: A) -> Result<AddedSnapshots, A::Error> {
                let mut ids = Vec::new();
                while let Some(update) = updates.next_element_seed(Skim(Part::Update))? {
                    if let Seen::Update { adds_snapshot: true, snapshot_id: Some(id) } = update
                        && ids.len() <= MAX_RECORDED_SNAPSHOTS
                    {
                        ids.push(id);
                    }
                }
                Ok(AddedSnapshots(ids))
            }
        }
        deserializer.deserialize_seq(Updates)
    }
}

/// Which part of an update a [`Skim`] reads.
#[derive(Clone, Copy)]
enum Part {
    /// An update: its `action` and its `snapshot`.
    Update,
    /// An update's `snapshot`: its `snapshot-id`.
    Snapshot,
    /// The value of `action` or `snapshot-id`.
    Value,
}

/// What [`Skim`] saw of a JSON value; everything else is skipped, not kept.
#[derive(PartialEq, Eq)]
enum Seen {
    /// The string `add-snapshot`.
    AddSnapshot,
    /// An integer.
    Long(i64),
    /// An update, or a snapshot (`adds_snapshot` false).
    Update { adds_snapshot: bool, snapshot_id: Option<i64> },
    /// Anything else.
    Other,
}

/// Reads the few fields [`Part`] names from any JSON value.
struct Skim(Part);

impl<'de> serde::de::DeserializeSeed<'de> for Skim {
    type Value = Seen;
    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Seen, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Skim {
    type Value = Seen;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Seen, A::Error> {
        let mut adds_snapshot = false;
        let mut snapshot_id = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match (self.0, key.as_ref()) {
                (Part::Update, "action") => {
                    adds_snapshot = map.next_value_seed(Skim(Part::Value))? == Seen::AddSnapshot
                }
                (Part::Update, "snapshot") => {
                    if let Seen::Update { snapshot_id: id, .. } = map.next_value_seed(Skim(Part::Snapshot))? {
                        snapshot_id = id;
                    }
                }
                (Part::Snapshot, "snapshot-id") => {
                    snapshot_id = match map.next_value_seed(Skim(Part::Value))? {
                        Seen::Long(id) => Some(id),
                        _ => None,
                    };
                }
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(match self.0 {
            Part::Value => Seen::Other,
            Part::Update | Part::Snapshot => Seen::Update { adds_snapshot, snapshot_id },
        })
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Seen, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(Seen::Other)
    }

    fn visit_str<E>(self, text: &str) -> Result<Seen, E> {
        Ok(if text == "add-snapshot" { Seen::AddSnapshot } else { Seen::Other })
    }

    fn visit_i64<E>(self, n: i64) -> Result<Seen, E> {
        Ok(Seen::Long(n))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Seen, E> {
        Ok(i64::try_from(n).map_or(Seen::Other, Seen::Long))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Seen, E> {
        Ok(Seen::Other)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Seen, E> {
        Ok(Seen::Other)
    }

    fn visit_unit<E>(self) -> Result<Seen, E> {
        Ok(Seen::Other)
    }
}

/// Whether a request declares a body length within `limit`. A body of
/// unknown or larger length is not read: it streams through.
fn declared_within(headers: &http::HeaderMap, limit: u64) -> bool {
    declared_length(headers).is_some_and(|len| len <= limit)
}

fn table_in(namespace: &Namespace, name: String) -> TableIdent {
    TableIdent::new(namespace.clone(), name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(s: &str) -> Namespace {
        Namespace::from_dotted(s)
    }

    #[test]
    fn hints_from_bodies() {
        let create = Operation::CreateTable(ns("db"));
        let hints = observe_body(&create, &Bytes::from(r#"{"name":"t","schema":{}}"#), None).expect("parses").hints;
        assert_eq!(
            hints,
            vec![CommitHint {
                kind: HintKind::Commit,
                table: TableIdent::new(ns("db"), "t"),
                prefix: None,
                metadata_location: None
            }]
        );
        let staged =
            observe_body(&create, &Bytes::from(r#"{"name":"t","stage-create":true}"#), None).expect("parses").hints;
        assert!(staged.is_empty());

        let tx = r#"{"table-changes":[{"identifier":{"namespace":["a"],"name":"x"},"requirements":[],"updates":[]},
                                      {"identifier":{"namespace":["b","c"],"name":"y"},"requirements":[],"updates":[]}]}"#;
        let observed = observe_body(&Operation::CommitTransaction, &Bytes::from(tx), Some("p".into())).expect("parses");
        let tables: Vec<String> = observed.hints.iter().map(|h| h.table.to_string()).collect();
        assert_eq!(tables, ["a.x", "b.c.y"]);
        assert!(observed.hints.iter().all(|h| h.prefix.as_deref() == Some("p")));
        assert_eq!(observed.transaction, None, "no snapshots were added");

        let rename = r#"{"source":{"namespace":["a"],"name":"x"},"destination":{"namespace":["a"],"name":"z"}}"#;
        let hints = observe_body(&Operation::RenameTable, &Bytes::from(rename), None).expect("parses").hints;
        assert_eq!(hints[0].kind, HintKind::Rename { from: TableIdent::new(ns("a"), "x") });
        assert_eq!(hints[0].table.to_string(), "a.z");

        let register = r#"{"name":"r","metadata-location":"s3://b/m.json"}"#;
        let hints =
            observe_body(&Operation::RegisterTable(ns("db")), &Bytes::from(register), None).expect("parses").hints;
        assert_eq!(hints[0].metadata_location.as_deref(), Some("s3://b/m.json"));
    }

    #[test]
    fn a_transaction_adding_snapshots_to_several_tables_is_observed_with_its_snapshots() {
        let snapshot =
            |id: i64| format!(r#"{{"action":"add-snapshot","snapshot":{{"snapshot-id":{id},"timestamp-ms":1}}}}"#);
        let set_ref = r#"{"action":"set-snapshot-ref","ref-name":"main","type":"branch","snapshot-id":2}"#;
        let tx = format!(
            r#"{{"table-changes":[
                {{"identifier":{{"namespace":["a"],"name":"x"}},"requirements":[],"updates":[{},{},{set_ref}]}},
                {{"identifier":{{"namespace":["a"],"name":"y"}},"requirements":[],"updates":[{{"action":"set-properties","updates":{{}}}}]}},
                {{"identifier":{{"namespace":["b"],"name":"z"}},"requirements":[],"updates":[{}]}}]}}"#,
            snapshot(1),
            snapshot(2),
            snapshot(7)
        );
        let observed = observe_body(&Operation::CommitTransaction, &Bytes::from(tx), None).expect("parses");
        assert_eq!(observed.hints.len(), 3, "every table changed gets its hint");
        let transaction = observed.transaction.expect("two tables got snapshots");
        let members: Vec<(String, Vec<i64>)> =
            transaction.members.iter().map(|m| (m.table.to_string(), m.snapshots.clone())).collect();
        assert_eq!(members, [("a.x".to_owned(), vec![1, 2]), ("b.z".to_owned(), vec![7])]);

        let one = format!(
            r#"{{"table-changes":[{{"identifier":{{"namespace":["a"],"name":"x"}},"requirements":[],"updates":[{}]}}]}}"#,
            snapshot(1)
        );
        let observed = observe_body(&Operation::CommitTransaction, &Bytes::from(one), None).expect("parses");
        assert_eq!(observed.transaction, None, "one snapshot of one table is one replica commit anyway");
    }

    #[test]
    fn a_commit_adding_several_snapshots_to_one_table_is_observed_with_them() {
        let snapshot =
            |id: i64| format!(r#"{{"action":"add-snapshot","snapshot":{{"snapshot-id":{id},"timestamp-ms":1}}}}"#);
        let set_ref = r#"{"action":"set-snapshot-ref","ref-name":"audit","type":"branch","snapshot-id":4}"#;
        let table = Operation::UpdateTable(TableIdent::new(ns("db"), "t"));
        let body = format!(r#"{{"requirements":[],"updates":[{},{},{set_ref}]}}"#, snapshot(3), snapshot(4));
        let observed = observe_body(&table, &Bytes::from(body), None).expect("parses");
        assert_eq!(observed.hints.len(), 1);
        assert_eq!(observed.hints[0].table.to_string(), "db.t");
        let members = observed.transaction.expect("two snapshots").members;
        assert_eq!(members.len(), 1);
        assert_eq!(members[0].snapshots, [3, 4], "in request order");

        let one = format!(r#"{{"updates":[{}]}}"#, snapshot(3));
        assert_eq!(observe_body(&table, &Bytes::from(one), None).expect("parses").transaction, None);
        // The path names the table: a body that does not parse still hints it.
        let observed = observe_body(&table, &Bytes::from("{"), None).expect("a hint");
        assert_eq!((observed.hints.len(), observed.transaction), (1, None));

        let mut headers = http::HeaderMap::new();
        assert!(!declared_within(&headers, 100), "a body of unknown length streams through");
        headers.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from_static("100"));
        assert!(declared_within(&headers, 100));
        assert!(!declared_within(&headers, 99));
    }

    /// What the tap asked of the state: transactions recorded and forgotten.
    #[derive(Default)]
    struct Recording {
        hints: std::sync::Mutex<Vec<CommitHint>>,
        recorded: std::sync::Mutex<Vec<Transaction>>,
        forgotten: std::sync::Mutex<Vec<i64>>,
    }

    impl HintSink for Recording {
        fn record(&self, hints: Vec<CommitHint>) -> Pin<Box<dyn Future<Output = Result<(), HintError>> + Send + '_>> {
            self.hints.lock().unwrap().extend(hints);
            Box::pin(std::future::ready(Ok(())))
        }

        fn record_transaction(
            &self,
            transaction: Transaction,
        ) -> Pin<Box<dyn Future<Output = Result<Option<i64>, HintError>> + Send + '_>> {
            let mut recorded = self.recorded.lock().unwrap();
            recorded.push(transaction);
            let id = recorded.len() as i64;
            Box::pin(std::future::ready(Ok(Some(id))))
        }

        fn forget_transaction(&self, id: i64) -> Pin<Box<dyn Future<Output = Result<(), HintError>> + Send + '_>> {
            self.forgotten.lock().unwrap().push(id);
            Box::pin(std::future::ready(Ok(())))
        }
    }

    /// A transactions/commit adding `snapshots` snapshots to each of two
    /// tables, sent through the tap to a primary that answers `status`.
    async fn commit_answered(status: http::StatusCode, snapshots: i64) -> Arc<Recording> {
        commit_named(status, snapshots, "y").await
    }

    /// [`commit_answered`], the second table named `name`.
    async fn commit_named(status: http::StatusCode, snapshots: i64, name: &str) -> Arc<Recording> {
        use tower::ServiceExt;
        let updates = |base: i64| -> String {
            (0..snapshots)
                .map(|i| {
                    format!(r#"{{"action":"add-snapshot","snapshot":{{"snapshot-id":{},"timestamp-ms":1}}}}"#, base + i)
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        let body = format!(
            r#"{{"table-changes":[{{"identifier":{{"namespace":["a"],"name":"x"}},"updates":[{}]}},
                                 {{"identifier":{{"namespace":["a"],"name":"{name}"}},"updates":[{}]}}]}}"#,
            updates(1),
            updates(1_000_000)
        );
        let sink = Arc::new(Recording::default());
        let primary = tower::service_fn(move |_: Request<Body>| async move {
            Ok::<_, ProxyError>(Response::builder().status(status).body(Body::empty()).unwrap())
        });
        let tap = CommitTapLayer::new(sink.clone(), Arc::new(ProxyMetrics::default()), 16 << 20).layer(primary);
        let mut request = Request::post("/v1/transactions/commit")
            .header(http::header::CONTENT_LENGTH, body.len())
            .body(Body::from(body))
            .unwrap();
        request.extensions_mut().insert(super::super::router::classify(&http::Method::POST, "/v1/transactions/commit"));
        assert_eq!(tap.oneshot(request).await.unwrap().status(), status, "the primary's answer, unchanged");
        sink
    }

    #[tokio::test]
    async fn a_commit_the_client_hangs_up_on_is_still_hinted_once_the_primary_applies_it() {
        use tower::ServiceExt;
        let sink = Arc::new(Recording::default());
        let applied = Arc::new(tokio::sync::Notify::new());
        let done = applied.clone();
        // The primary takes its time, and applies the commit all the same.
        let primary = tower::service_fn(move |_: Request<Body>| {
            let done = done.clone();
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                done.notify_one();
                Ok::<_, ProxyError>(Response::builder().status(200).body(Body::empty()).unwrap())
            }
        });
        let tap = CommitTapLayer::new(sink.clone(), Arc::new(ProxyMetrics::default()), 16 << 20).layer(primary);
        let path = "/v1/namespaces/db/tables/t";
        let mut request = Request::delete(path).body(Body::empty()).unwrap();
        request.extensions_mut().insert(super::super::router::classify(&http::Method::DELETE, path));
        // The client goes away before the answer: its future is dropped.
        let gone = tokio::time::timeout(std::time::Duration::from_millis(50), tap.oneshot(request)).await;
        assert!(gone.is_err(), "the client stopped waiting");
        let finished = tokio::time::timeout(std::time::Duration::from_secs(5), applied.notified()).await;
        assert!(finished.is_ok(), "the commit went on without the client");
        for _ in 0..100 {
            if !sink.hints.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let hints = sink.hints.lock().unwrap().clone();
        assert_eq!(hints.len(), 1, "{hints:?}");
        assert_eq!((hints[0].kind.clone(), hints[0].table.to_string()), (HintKind::Drop, "db.t".to_owned()));
    }

    #[tokio::test]
    async fn a_transaction_the_primary_refuses_leaves_no_record() {
        for (status, forgotten) in [
            (http::StatusCode::NO_CONTENT, false),
            (http::StatusCode::UNAUTHORIZED, true),
            (http::StatusCode::FORBIDDEN, true),
            (http::StatusCode::CONFLICT, true),
            // The outcome of a 5xx commit is unknown: it may have been applied.
            (http::StatusCode::INTERNAL_SERVER_ERROR, false),
            (http::StatusCode::GATEWAY_TIMEOUT, false),
        ] {
            let sink = commit_answered(status, 2).await;
            assert_eq!(sink.recorded.lock().unwrap().len(), 1, "{status}: recorded before it is forwarded");
            let expected: &[i64] = if forgotten { &[1] } else { &[] };
            assert_eq!(sink.forgotten.lock().unwrap().as_slice(), expected, "{status}");
        }
    }

    #[tokio::test]
    async fn a_commit_of_more_snapshots_or_names_than_the_bound_is_not_recorded() {
        let half = (MAX_RECORDED_SNAPSHOTS / 2) as i64;
        assert_eq!(commit_answered(http::StatusCode::NO_CONTENT, half).await.recorded.lock().unwrap().len(), 1);
        assert!(commit_answered(http::StatusCode::NO_CONTENT, half + 1).await.recorded.lock().unwrap().is_empty());
        let long = "n".repeat(MAX_RECORDED_NAME_BYTES);
        assert!(commit_named(http::StatusCode::NO_CONTENT, 2, &long).await.recorded.lock().unwrap().is_empty());
        let fits = "n".repeat(MAX_RECORDED_NAME_BYTES - 3);
        assert_eq!(commit_named(http::StatusCode::NO_CONTENT, 2, &fits).await.recorded.lock().unwrap().len(), 1);
    }

    #[test]
    fn updates_are_skimmed_for_added_snapshots_whatever_else_they_hold() {
        let table = Operation::UpdateTable(TableIdent::new(ns("db"), "t"));
        let zeros = vec!["0"; 1_000_000].join(",");
        let body = format!(
            r#"{{"updates":[{zeros},
                {{"action":"add-snapshot","snapshot":{{"snapshot-id":5,"summary":{{"a":[1,2,{{"b":null}}]}}}}}},
                {{"action":["add-snapshot"],"snapshot":{{"snapshot-id":6}}}},
                {{"snapshot":{{"snapshot-id":7}},"action":"add-snapshot"}},
                {{"action":"add-snapshot","snapshot":{{"snapshot-id":18446744073709551615}}}},
                {{"action":"add-snapshot","snapshot":[8]}},
                "add-snapshot", null, true, 1.5, [[{{"action":"add-snapshot"}}]],
                {{"action":"set-snapshot-ref","snapshot-id":9}}]}}"#
        );
        let observed = observe_body(&table, &Bytes::from(body), None).expect("parses");
        let members = observed.transaction.expect("two snapshots").members;
        assert_eq!(members[0].snapshots, [5, 7], "only add-snapshot updates with a numeric id, in order");

        // Past the bound, ids stop being kept (and the commit is not recorded).
        let many: Vec<String> = (0..MAX_RECORDED_SNAPSHOTS as i64 + 50)
            .map(|i| format!(r#"{{"action":"add-snapshot","snapshot":{{"snapshot-id":{i}}}}}"#))
            .collect();
        let body = format!(r#"{{"updates":[{}]}}"#, many.join(","));
        let members =
            observe_body(&table, &Bytes::from(body), None).expect("parses").transaction.expect("many").members;
        assert_eq!(members[0].snapshots.len(), MAX_RECORDED_SNAPSHOTS + 1);
    }

    #[test]
    fn unparsable_bodies_give_no_hints() {
        assert!(observe_body(&Operation::CommitTransaction, &Bytes::from("{"), None).is_none());
        assert!(observe_body(&Operation::CreateTable(ns("db")), &Bytes::from("[]"), None).is_none());
        let unnamed = r#"{"table-changes":[{"requirements":[],"updates":[]}]}"#;
        assert!(observe_body(&Operation::CommitTransaction, &Bytes::from(unnamed), None).is_none());
        // Updates icerelay does not understand never cost the hints.
        let odd = r#"{"table-changes":[{"identifier":{"namespace":["a"],"name":"x"},"updates":[{"action":"add-snapshot","snapshot":"?"}]},
                                      {"identifier":{"namespace":["a"],"name":"y"},"updates":[{"snapshot":{"snapshot-id":"7"}}]}]}"#;
        let observed = observe_body(&Operation::CommitTransaction, &Bytes::from(odd), None).expect("parses");
        assert_eq!(observed.hints.len(), 2);
        assert_eq!(observed.transaction, None);
    }
}
