#!/usr/bin/env bash
# rustberg.sh: a real Iceberg REST catalog (rustberg 0.3.0) with a local file:// warehouse.
#
#   rustberg.sh start NAME DATA_DIR PORT   start (idempotent), wait until ready, print endpoints
#   rustberg.sh stop DATA_DIR              stop
#
# The warehouse is file://DATA_DIR/wh and must be passed verbatim as ?warehouse= (no trailing
# slash). No auth. WATCH_PID: stop the server once that process has exited.
# RUSTBERG: the binary (default $ICERELAY_TESTSTACK/rustberg/bin/rustberg, see setup-test-env.sh).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=watch.sh
. "$HERE/watch.sh"
TESTSTACK=${ICERELAY_TESTSTACK:-$(cd "$HERE/../.." && pwd)/.teststack}
RUSTBERG=${RUSTBERG:-$TESTSTACK/rustberg/bin/rustberg}
HOST=127.0.0.1

is_rustberg() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null && tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null | grep -q rustberg; }

start() {
  local name=$1 dir=$2 port=$3
  [ -x "$RUSTBERG" ] || { echo "no rustberg binary at $RUSTBERG; run scripts/setup-test-env.sh first" >&2; exit 1; }
  mkdir -p "$dir/wh"; dir=$(cd "$dir" && pwd)
  local wh=file://$dir/wh uri=http://$HOST:$port
  if is_rustberg "$(cat "$dir/rustberg.pid" 2>/dev/null || true)"; then
    echo "[$name] already running" >&2
  else
    setsid nohup "$RUSTBERG" --host $HOST --port "$port" --warehouse "$wh" \
      --catalog-url "file://$dir/catalog.redb" --no-auth --dev --insecure-http \
      </dev/null >>"$dir/rustberg.log" 2>&1 &
    local pid=$!
    echo "$pid" > "$dir/rustberg.pid"
    watch_server "$pid" "$dir/wh" 5
  fi
  local deadline=$(( $(date +%s) + ${STARTUP_TIMEOUT:-30} ))
  until [ "$(curl -s -o /dev/null -w '%{http_code}' "$uri/v1/config?warehouse=$wh" || true)" = 200 ]; do
    is_rustberg "$(cat "$dir/rustberg.pid")" && [ "$(date +%s)" -lt "$deadline" ] \
      || { echo "[$name] rustberg did not come up; log:" >&2; tail -n 20 "$dir/rustberg.log" >&2; exit 1; }
    sleep 0.2
  done
  cat > "$dir/endpoints.env" <<ENV
NAME=$name
CATALOG_URI=$uri
WAREHOUSE=$wh
WAREHOUSE_LOCATION=$wh
PID_FILE=$dir/rustberg.pid
LOG_FILE=$dir/rustberg.log
ENV
  cat "$dir/endpoints.env"
}

stop() {
  local dir=$1 pid
  pid=$(cat "$dir/rustberg.pid" 2>/dev/null || true)
  if is_rustberg "$pid"; then
    kill -TERM "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -f "$dir/rustberg.pid"
}

case "${1:-}" in
  start) [ $# -eq 4 ] || { echo "usage: $0 start NAME DATA_DIR PORT" >&2; exit 2; }; start "$2" "$3" "$4" ;;
  stop) [ $# -ge 2 ] || { echo "usage: $0 stop DATA_DIR" >&2; exit 2; }; stop "$2" ;;
  *) echo "usage: $0 start NAME DATA_DIR PORT | stop DATA_DIR" >&2; exit 2 ;;
esac
