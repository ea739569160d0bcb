#!/usr/bin/env bash
# test.sh: runs every test icerelay has, from a fresh clone.
#
# 1. installs the test stack if it is missing (scripts/setup-test-env.sh: a Python venv with
#    SeaweedFS, PyIceberg and DuckDB; rustberg), idempotently;
# 2. runs the unit tests and the end-to-end tests, which start real catalogs and object stores
#    on 127.0.0.1 and stop them when they finish.
# Extra arguments go to `cargo test` (e.g. scripts/test.sh --test e2e proxy_clients).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-test-env.sh
cargo test --locked --all-targets "$@"
