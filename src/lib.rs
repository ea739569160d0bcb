//! icerelay: an Iceberg REST catalog proxy that replicates tables on commit.
//!
//! Engines point their catalog `uri` at icerelay; it forwards every request
//! to the primary catalog unchanged, watches the commits that succeed, and
//! replays them onto replica catalogs.
//!
//! # Layout
//!
//! - [`config`]: the TOML file, `${VAR}` expansion and env overrides, validation.
//! - [`proxy`]: the request path, as tower layers: classify, observe, respond
//!   to errors, rewrite `/v1/config`, refuse writes to replicas, tap commits,
//!   forward upstream.
//! - [`catalog`]: identifiers and the REST client for icerelay's own calls.
//! - [`causes`]: error texts that carry their causes (transport, TLS).
//! - [`admin`]: the admin listener (health, readiness, metrics, replication
//!   status, pause / resume / resync / promote, the audit log).
//! - [`audit`]: the audit log, one JSON line per change to a replica.
//! - [`metrics`]: the Prometheus registry.
//! - [`replicate`]: the replication engine: rules, destinations, planner, lanes.
//! - [`rewrite`]: path rewriting of metadata, manifests, delete files (pure).
//! - [`storage`]: object stores and the copy engine.
//! - [`state`]: the durable change log, lanes and copy checkpoints.
//! - [`table_copy`]: copying a table's files with every path rewritten.
//! - [`serve`]: binding, running and draining the services.
//! - [`logging`]: log output.
//! - [`dot_segments`]: refusing `.`/`..` in request paths and file URLs.
//! - [`tls`]: client roots (`ca_file`) and listener certificates, reloaded.

// Data from the network, files and configuration is handled as errors with
// context; outside tests nothing may unwrap it.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod audit;
pub mod catalog;
pub mod causes;
pub mod config;
pub mod dot_segments;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod replicate;
pub mod rewrite;
pub mod serve;
pub mod state;
pub mod storage;
pub mod table_copy;
pub mod tls;
