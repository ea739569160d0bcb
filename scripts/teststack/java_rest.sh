#!/usr/bin/env bash
# java_rest.sh: Apache Iceberg 1.10.2's own Java catalog logic as a local REST catalog
# (java_rest/IcebergRestServer.java, a copy of ../shared/teststack/java-rest/: CatalogHandlers over a
# JdbcCatalog on embedded Derby), with a local file:// warehouse.
#
#   java_rest.sh start NAME DATA_DIR PORT   start, wait until ready, print endpoints
#   java_rest.sh stop DATA_DIR               stop it (its catalog and warehouse stay for a start)
#
# The warehouse is file://DATA_DIR/wh (its real path). No auth. WATCH_PID: stop the server once that
# process has exited. Needs $ICERELAY_TESTSTACK/java-rest/ (classes and classpath), which
# setup-test-env.sh builds.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=watch.sh
. "$HERE/watch.sh"
TESTSTACK=${ICERELAY_TESTSTACK:-$(cd "$HERE/../.." && pwd)/.teststack}
BUILT=$TESTSTACK/java-rest
HOST=127.0.0.1

start() {
  local name=$1 dir=$2 port=$3
  [ -s "$BUILT/classpath" ] && [ -d "$BUILT/classes" ] \
    || { echo "no Java REST catalog build in $BUILT; run scripts/setup-test-env.sh first" >&2; exit 1; }
  mkdir -p "$dir/wh" "$dir/data"; dir=$(cd "$dir" && pwd)
  local wh uri=http://$HOST:$port
  wh=file://$(cd "$dir/wh" && pwd -P)
  # shellcheck disable=SC2086
  setsid nohup java ${JAVA_OPTS:--Xmx512m -XX:+UseSerialGC -XX:TieredStopAtLevel=1} -Dlog4j2.level=WARN \
    -cp "$BUILT/classes:$(cat "$BUILT/classpath")" org.apache.iceberg.rest.IcebergRestServer \
    "$port" "$dir/wh" "$dir/data" </dev/null >>"$dir/java-rest.log" 2>&1 &
  local pid=$!
  echo "$pid" > "$dir/java-rest.pid"
  watch_server "$pid" "$dir/wh" 5
  local deadline=$(( $(date +%s) + ${STARTUP_TIMEOUT:-60} ))
  until [ "$(curl -s -o /dev/null -w '%{http_code}' "$uri/v1/config" || true)" = 200 ]; do
    kill -0 "$pid" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ] \
      || { echo "[$name] the Java REST catalog did not come up; log:" >&2; tail -n 30 "$dir/java-rest.log" >&2; exit 1; }
    sleep 0.2
  done
  cat > "$dir/endpoints.env" <<ENV
NAME=$name
CATALOG_URI=$uri
WAREHOUSE=$wh
PID_FILE=$dir/java-rest.pid
LOG_FILE=$dir/java-rest.log
ENV
  cat "$dir/endpoints.env"
}

stop() {
  local pid_file=$1/java-rest.pid pid
  [ -s "$pid_file" ] || return 0
  pid=$(cat "$pid_file")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$pid_file"
}

usage="usage: $0 start NAME DATA_DIR PORT | stop DATA_DIR"
case "${1:-}" in
  start) [ $# -eq 4 ] || { echo "$usage" >&2; exit 2; }; start "$2" "$3" "$4" ;;
  stop) [ $# -eq 2 ] || { echo "$usage" >&2; exit 2; }; stop "$2" ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
