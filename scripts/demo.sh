#!/usr/bin/env bash
# demo.sh: icerelay in front of a real Iceberg REST catalog, on this machine, nothing to install
# by hand. Starts SeaweedFS (S3 + Iceberg REST catalog) on 127.0.0.1, icerelay in front of it,
# writes a table through icerelay with PyIceberg, reads it back with DuckDB through icerelay,
# shows icerelay's readiness and metrics, then keeps running until Ctrl-C so you can point
# your own engines at it.
#
# Environment: DEMO_BASE_PORT (default 18200) moves every port; DEMO_DIR (default .demo).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BASE=${DEMO_BASE_PORT:-18200}
DIR=${DEMO_DIR:-$ROOT/.demo}
LISTEN=127.0.0.1:$((BASE + 81))
ADMIN=127.0.0.1:$((BASE + 82))

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "Installing the local test stack (Python venv with SeaweedFS, PyIceberg, DuckDB) if needed"
ICERELAY_SKIP_RUSTBERG=1 scripts/setup-test-env.sh
PY=$ROOT/.teststack/venv/bin/python

say "Building icerelay (release)"
cargo build --release --locked
BIN=$ROOT/target/release/icerelay

mkdir -p "$DIR"
cleanup() {
  [ -n "${RELAY_PID:-}" ] && kill "$RELAY_PID" 2>/dev/null && wait "$RELAY_PID" 2>/dev/null
  scripts/teststack/seaweedfs.sh stop "$DIR/primary" || true
}
trap cleanup EXIT

say "Starting the primary catalog (SeaweedFS) on 127.0.0.1:$((BASE + 4)), S3 on :$((BASE + 3))"
scripts/teststack/seaweedfs.sh start primary "$DIR/primary" "$BASE" > /dev/null
# shellcheck disable=SC1091
. "$DIR/primary/endpoints.env"

cat > "$DIR/icerelay.toml" <<TOML
listen = "$LISTEN"
admin_listen = "$ADMIN"
public_url = "http://$LISTEN"

[primary]
uri = "$CATALOG_URI"
warehouse = "$WAREHOUSE"
auth = { type = "oauth2", client_id = "$ACCESS_KEY", client_secret = "\${PRIMARY_SECRET}" }
TOML
say "Starting icerelay on $LISTEN (admin $ADMIN), config $DIR/icerelay.toml"
PRIMARY_SECRET=$SECRET_KEY "$BIN" serve --config "$DIR/icerelay.toml" > "$DIR/icerelay.log" 2>&1 &
RELAY_PID=$!
for _ in $(seq 100); do curl -sf "http://$ADMIN/healthz" > /dev/null && break; sleep 0.1; done

CONN=$(printf '{"uri":"http://%s","warehouse":"%s","credential":"%s:%s","s3":{"endpoint":"%s","access_key_id":"%s","secret_access_key":"%s"}}' \
  "$LISTEN" "$WAREHOUSE" "$ACCESS_KEY" "$SECRET_KEY" "$S3_ENDPOINT" "$ACCESS_KEY" "$SECRET_KEY")
TABLE=events_$(date +%s)

say "PyIceberg, through icerelay: create demo.$TABLE and append three times"
(cd tests/clients && "$PY" make_table.py "$CONN" demo "$TABLE" 3)

say "DuckDB, through icerelay: read demo.$TABLE"
(cd tests/clients && "$PY" - "$CONN" "$ROOT/.teststack/venv/duckdb_extensions" "$TABLE" <<'PYEOF'
import json, sys
from common import duckdb_attach, duckdb_connect
conn, ext, table = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
con = duckdb_connect(ext)
duckdb_attach(con, conn, "relay")
print("rows:", con.execute(f"SELECT count(*) FROM relay.demo.{table}").fetchone()[0])
for row in con.execute(f"SELECT sequence_number, snapshot_id, timestamp_ms FROM iceberg_snapshots(relay.demo.{table}) ORDER BY 1").fetchall():
    print("snapshot", row)
PYEOF
)

say "icerelay's readiness (GET http://$ADMIN/readyz)"
curl -s "http://$ADMIN/readyz"; echo
say "icerelay's metrics (excerpt of GET http://$ADMIN/metrics)"
curl -s "http://$ADMIN/metrics" | grep -E '^icerelay_(proxy_requests_total|commit_hints_recorded_total)' | head -n 12

say "icerelay is running. Point an engine at it, e.g. PyIceberg:"
cat <<TXT
  load_catalog("demo", type="rest", uri="http://$LISTEN", warehouse="$WAREHOUSE",
               credential="$ACCESS_KEY:$SECRET_KEY", **{"s3.endpoint": "$S3_ENDPOINT",
               "s3.access-key-id": "$ACCESS_KEY", "s3.secret-access-key": "$SECRET_KEY",
               "s3.path-style-access": "true", "s3.region": "us-east-1"})
Logs: $DIR/icerelay.log. Press Ctrl-C to stop everything.
TXT
if [ -n "${DEMO_NO_WAIT:-}" ]; then exit 0; fi
wait "$RELAY_PID"
