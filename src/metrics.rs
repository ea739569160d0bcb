//! The Prometheus registry and the metric families components record into.
//!
//! One [`Metrics`] is built at start-up and passed down; there is no global
//! recorder, so tests that run several servers in one process keep their
//! numbers apart. The admin listener renders the registry at `/metrics`.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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

/// The registry and every family in it.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// The proxy's families.
    pub proxy: Arc<ProxyMetrics>,
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
        Self { registry, proxy: Arc::new(proxy) }
    }

    /// The registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
