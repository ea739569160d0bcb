//! The Prometheus registry and the metric families components record into.
//!
//! One [`Metrics`] is built at start-up and passed down; there is no global
//! recorder, so tests that run several servers in one process keep their
//! numbers apart. The admin listener renders the registry at `/metrics`.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Latency buckets in seconds: 0.25 ms to 10 s.
const LATENCY_BUCKETS: [f64; 15] =
    [0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Labels of a proxied request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Route template, e.g. `/v1/{prefix}/namespaces/{namespace}/tables/{table}`.
    pub route: &'static str,
    /// HTTP method.
    pub method: &'static str,
    /// HTTP status sent to the client.
    pub status: u16,
}

/// Labels of a latency observation.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// Route template.
    pub route: &'static str,
    /// HTTP method.
    pub method: &'static str,
}

/// Labels of an error icerelay answered itself.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Error kind: `unreachable`, `timeout`, `failed`, `body_too_large`, ...
    pub kind: &'static str,
}

/// What the proxy records.
#[derive(Debug)]
pub struct ProxyMetrics {
    /// Requests by route, method and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Time from request to response head, by route and method.
    pub duration: Family<RouteLabels, Histogram>,
    /// Errors icerelay answered itself (502, 504, 413, ...), by kind.
    pub errors: Family<ErrorLabels, Counter>,
    /// Change hints recorded.
    pub hints_recorded: Counter,
    /// Change hints that could not be recorded.
    pub hints_failed: Counter,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS)),
            errors: Family::default(),
            hints_recorded: Counter::default(),
            hints_failed: Counter::default(),
        }
    }
}

/// Labels of a replication series: the destination (tables are too many to label).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationLabels {
    /// The destination's name.
    pub destination: String,
}

/// Labels of a lane-count series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    /// `pending`, `completed`, `failed` or `paused`.
    pub status: &'static str,
}

/// Labels of a reconcile check: how the primary answered.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    /// `loaded` (a full answer), `not_modified` (304 to the last entity tag) or `failed`.
    pub result: &'static str,
}

/// Labels of a replicated multi-table transaction.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransactionLabels {
    /// The destination.
    pub destination: String,
    /// `atomic` or `table_by_table`.
    pub result: &'static str,
}

/// What replication records.
#[derive(Debug, Default)]
pub struct ReplicationMetrics {
    /// Replica commits confirmed.
    pub commits: Family<DestinationLabels, Counter>,
    /// Lane runs that failed.
    pub failures: Family<DestinationLabels, Counter>,
    /// Files written to the destination's storage.
    pub files_copied: Family<DestinationLabels, Counter>,
    /// Bytes written to the destination's storage.
    pub bytes_copied: Family<DestinationLabels, Counter>,
    /// Seconds since the oldest change a replica does not have yet (max over the destination's lanes).
    pub lag_seconds: Family<DestinationLabels, Gauge>,
    /// Source snapshots the destination's replicas do not have yet (sum).
    pub snapshots_behind: Family<DestinationLabels, Gauge>,
    /// Lanes waiting for work to be done.
    pub queue_depth: Gauge,
    /// Lanes by status.
    pub lanes: Family<StatusLabels, Gauge>,
    /// Tables reconcile asked the primary about, by answer.
    pub reconcile_checks: Family<CheckLabels, Counter>,
    /// Reconcile passes this instance completed.
    pub reconcile_passes: Counter,
    /// Multi-table transactions of the primary committed to a destination,
    /// by how (`atomic`: one multi-table commit; `table_by_table`).
    pub transactions: Family<TransactionLabels, Counter>,
}

impl ReplicationMetrics {
    /// The labels of `destination`.
    pub fn labels(destination: &str) -> DestinationLabels {
        DestinationLabels { destination: destination.to_owned() }
    }
}

/// The registry and every family in it.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// The proxy's families.
    pub proxy: Arc<ProxyMetrics>,
    /// Replication's families.
    pub replication: Arc<ReplicationMetrics>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every family.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("icerelay");
        let proxy = ProxyMetrics::default();
        registry.register("proxy_requests", "Requests forwarded or answered by the proxy", proxy.requests.clone());
        registry.register(
            "proxy_request_duration_seconds",
            "Time from receiving a request to sending the response head",
            proxy.duration.clone(),
        );
        registry.register(
            "proxy_errors",
            "Errors icerelay answered itself (upstream unreachable or slow, body too large, ...)",
            proxy.errors.clone(),
        );
        registry.register(
            "commit_hints_recorded",
            "Change hints recorded after successful commits",
            proxy.hints_recorded.clone(),
        );
        registry.register("commit_hints_failed", "Change hints that could not be recorded", proxy.hints_failed.clone());
        let replication = ReplicationMetrics::default();
        registry.register("replication_commits", "Replica commits confirmed", replication.commits.clone());
        registry.register("replication_failures", "Lane runs that failed", replication.failures.clone());
        registry.register(
            "replication_files_copied",
            "Files written to destination storage",
            replication.files_copied.clone(),
        );
        registry.register(
            "replication_bytes_copied",
            "Bytes written to destination storage",
            replication.bytes_copied.clone(),
        );
        registry.register(
            "replication_lag_seconds",
            "Seconds since the oldest change a replica does not have yet (max over the destination's tables)",
            replication.lag_seconds.clone(),
        );
        registry.register(
            "replication_snapshots_behind",
            "Source snapshots the destination's replicas do not have yet",
            replication.snapshots_behind.clone(),
        );
        registry.register(
            "replication_queue_depth",
            "Lanes (table, destination) with work waiting",
            replication.queue_depth.clone(),
        );
        registry.register("replication_lanes", "Lanes by status", replication.lanes.clone());
        registry.register(
            "replication_reconcile_checks",
            "Source tables reconcile asked the primary about, by answer (loaded, not_modified, failed)",
            replication.reconcile_checks.clone(),
        );
        registry.register(
            "replication_transactions",
            "Multi-table transactions of the primary committed to a destination, by how (atomic, table_by_table)",
            replication.transactions.clone(),
        );
        registry.register(
            "replication_reconcile_passes",
            "Reconcile passes this instance completed (one instance per interval when the state is shared)",
            replication.reconcile_passes.clone(),
        );
        Self { registry, proxy: Arc::new(proxy), replication: Arc::new(replication) }
    }

    /// The registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
