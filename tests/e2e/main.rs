//! End-to-end tests: real catalogs, real storage, real clients, icerelay in between.
//!
//! One binary for the whole tier keeps link time down; `harness` starts the
//! services. Run with `scripts/test.sh` (which installs the test stack first)
//! or `cargo test --test e2e` once `scripts/setup-test-env.sh` has run.

mod harness;

mod cli;
mod copy_table;
mod demo;
mod failover;
mod hardening;
mod java_catalog;
mod proxy_clients;
mod proxy_passthrough;
mod replication;
mod shared_state;
mod source_expiry;
mod spark;
mod tls;
mod transactions;
