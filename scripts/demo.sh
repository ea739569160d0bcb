#!/usr/bin/env bash
# demo.sh: icerelay replicating between two real Iceberg REST catalogs on this machine, nothing
# to install by hand.
#
# Starts two SeaweedFS servers (each an S3 store with an Iceberg REST catalog) on 127.0.0.1, a
# primary and a replica, and icerelay in front of the primary with a rule that replicates the
# namespace `demo` to the replica. Then, through icerelay, PyIceberg creates a table, appends,
# evolves the schema, deletes and tags; the script waits for the replica, and shows source and
# replica side by side (snapshot ids, sequence numbers, timestamps, rows at every snapshot) and
# icerelay's replication status. It keeps running until Ctrl-C so you can point your own engines
# at it.
#
# Environment: DEMO_BASE_PORT (default 18200) moves every port; DEMO_DIR (default .demo);
# ICERELAY_BIN uses an icerelay binary instead of building one; DEMO_NO_WAIT=1 exits at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BASE=${DEMO_BASE_PORT:-18200}
REPLICA_BASE=$((BASE + 100))
DIR=${DEMO_DIR:-$ROOT/.demo}
LISTEN=127.0.0.1:$((BASE + 81))
ADMIN=127.0.0.1:$((BASE + 82))

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "Installing the local test stack (Python venv with SeaweedFS, PyIceberg, DuckDB) if needed"
ICERELAY_SKIP_RUSTBERG=1 ICERELAY_SKIP_SPARK=1 ICERELAY_SKIP_POSTGRES=1 scripts/setup-test-env.sh
PY=${ICERELAY_TESTSTACK:-$ROOT/.teststack}/venv/bin/python

if [ -n "${ICERELAY_BIN:-}" ]; then
  BIN=$ICERELAY_BIN
else
  say "Building icerelay"
  cargo build --locked --bin icerelay
  BIN=$ROOT/target/debug/icerelay
fi

rm -rf "$DIR"
mkdir -p "$DIR"
cleanup() {
  [ -n "${RELAY_PID:-}" ] && kill "$RELAY_PID" 2>/dev/null && wait "$RELAY_PID" 2>/dev/null
  scripts/teststack/seaweedfs.sh stop "$DIR/primary" 2>/dev/null || true
  scripts/teststack/seaweedfs.sh stop "$DIR/replica" 2>/dev/null || true
}
trap cleanup EXIT

say "Starting the primary catalog (SeaweedFS, warehouse 'warehouse') on 127.0.0.1:$((BASE + 4))"
scripts/teststack/seaweedfs.sh start primary "$DIR/primary" "$BASE" > /dev/null
say "Starting the replica catalog (SeaweedFS, warehouse 'replica') on 127.0.0.1:$((REPLICA_BASE + 4))"
WAREHOUSE=replica scripts/teststack/seaweedfs.sh start replica "$DIR/replica" "$REPLICA_BASE" > /dev/null
# shellcheck disable=SC1091
. "$DIR/primary/endpoints.env"
P_CATALOG=$CATALOG_URI P_S3=$S3_ENDPOINT P_WAREHOUSE=$WAREHOUSE
# shellcheck disable=SC1091
. "$DIR/replica/endpoints.env"
R_CATALOG=$CATALOG_URI R_S3=$S3_ENDPOINT R_WAREHOUSE=$WAREHOUSE

cat > "$DIR/icerelay.toml" <<TOML
listen = "$LISTEN"
admin_listen = "$ADMIN"
public_url = "http://$LISTEN"
state_dir = "$DIR/state"

[primary]
uri = "$P_CATALOG"
warehouse = "$P_WAREHOUSE"
auth = { type = "oauth2", client_id = "$ACCESS_KEY", client_secret = "\${CATALOG_SECRET}" }

[replication]
reconcile_interval = "10s"

[[storage]]
prefix = "s3://$P_WAREHOUSE/"
endpoint = "$P_S3"
path_style = true
access_key_id = "$ACCESS_KEY"
secret_access_key = "\${CATALOG_SECRET}"

[[storage]]
prefix = "s3://$R_WAREHOUSE/"
endpoint = "$R_S3"
path_style = true
access_key_id = "$ACCESS_KEY"
secret_access_key = "\${CATALOG_SECRET}"

[[destinations]]
name = "dr"
uri = "$R_CATALOG"
warehouse = "$R_WAREHOUSE"
auth = { type = "oauth2", client_id = "$ACCESS_KEY", client_secret = "\${CATALOG_SECRET}" }

[[rules]]
namespace = "demo"
destinations = ["dr"]
TOML
say "Starting icerelay on $LISTEN (admin $ADMIN), config $DIR/icerelay.toml"
CATALOG_SECRET=$SECRET_KEY "$BIN" serve --config "$DIR/icerelay.toml" > "$DIR/icerelay.log" 2>&1 &
RELAY_PID=$!
for _ in $(seq 200); do curl -sf "http://$ADMIN/healthz" > /dev/null && break; sleep 0.1; done

conn() {  # conn URI WAREHOUSE S3
  printf '{"uri":"%s","warehouse":"%s","credential":"%s:%s","s3":{"endpoint":"%s","access_key_id":"%s","secret_access_key":"%s"}}' \
    "$1" "$2" "$ACCESS_KEY" "$SECRET_KEY" "$3" "$ACCESS_KEY" "$SECRET_KEY"
}
THROUGH_RELAY=$(conn "http://$LISTEN" "$P_WAREHOUSE" "$P_S3")
PRIMARY=$(conn "$P_CATALOG" "$P_WAREHOUSE" "$P_S3")
REPLICA=$(conn "$R_CATALOG" "$R_WAREHOUSE" "$R_S3")
TABLE=demo.events

say "PyIceberg, through icerelay: create $TABLE, append three times, add a column, append, delete, tag"
(cd tests/clients && "$PY" writer.py "$THROUGH_RELAY" "$TABLE" '[
  {"op": "create"},
  {"op": "append", "start": 0, "rows": 5}, {"op": "append", "start": 5, "rows": 5},
  {"op": "append", "start": 10, "rows": 5},
  {"op": "add_column", "name": "note"}, {"op": "append", "start": 15, "rows": 3},
  {"op": "delete_below", "id": 3}, {"op": "tag", "name": "v1"}]' > "$DIR/written.json")
SOURCE_METADATA=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["metadata_location"])' "$DIR/written.json")

say "Waiting for the replica (GET http://$ADMIN/v1/replication/namespaces/demo/tables/events)"
for _ in $(seq 600); do
  STATUS=$(curl -s "http://$ADMIN/v1/replication/namespaces/demo/tables/events" || true)
  if printf '%s' "$STATUS" | "$PY" -c 'import json,sys; d=json.load(sys.stdin)["destinations"][0]; sys.exit(0 if d["status"]=="completed" and d["source_metadata_location"]==sys.argv[1] else 1)' "$SOURCE_METADATA" 2>/dev/null; then
    break
  fi
  sleep 0.2
  STATUS=
done
[ -n "$STATUS" ] || { echo "the replica did not catch up within 2 minutes; see $DIR/icerelay.log" >&2; curl -s "http://$ADMIN/v1/replication/status" >&2; exit 1; }
printf '%s' "$STATUS" | "$PY" -m json.tool

say "Source (primary) and replica, side by side"
(cd tests/clients && "$PY" - "$PRIMARY" "$REPLICA" "$TABLE" <<'PYEOF'
import json, sys
from common import pyiceberg_catalog
primary, replica = (pyiceberg_catalog(json.loads(c)).load_table(sys.argv[3]) for c in sys.argv[1:3])
print(f"{'':9}{'snapshot id':>21} {'seq':>4} {'timestamp-ms':>14} {'rows':>5}   location")
for name, t in (("primary", primary), ("replica", replica)):
    for s in t.snapshots():
        rows = t.scan(snapshot_id=s.snapshot_id).to_arrow().num_rows
        print(f"{name:9}{s.snapshot_id:>21} {s.sequence_number:>4} {s.timestamp_ms:>14} {rows:>5}   {s.manifest_list.rsplit('/', 3)[0]}/...")
    print(f"{name:9}refs {dict((k, r.snapshot_id) for k, r in t.metadata.refs.items())}, schema {[f.name for f in t.schema().fields]}")
PYEOF
)

say "Replication metrics (excerpt of GET http://$ADMIN/metrics)"
curl -s "http://$ADMIN/metrics" | grep -E '^icerelay_(replication_commits_total|replication_files_copied_total|replication_lanes|commit_hints_recorded_total)' | head -n 12

say "icerelay is running. Point an engine at it, e.g. PyIceberg:"
cat <<TXT
  load_catalog("demo", type="rest", uri="http://$LISTEN", warehouse="$P_WAREHOUSE",
               credential="$ACCESS_KEY:$SECRET_KEY", **{"s3.endpoint": "$P_S3",
               "s3.access-key-id": "$ACCESS_KEY", "s3.secret-access-key": "$SECRET_KEY",
               "s3.path-style-access": "true", "s3.region": "us-east-1"})
Every commit in namespace 'demo' is replayed onto the replica catalog at $R_CATALOG (warehouse
'$R_WAREHOUSE'). Status: curl http://$ADMIN/v1/replication/status
Logs: $DIR/icerelay.log. Press Ctrl-C to stop everything.
TXT
if [ -n "${DEMO_NO_WAIT:-}" ]; then exit 0; fi
wait "$RELAY_PID"
