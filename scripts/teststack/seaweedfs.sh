#!/usr/bin/env bash
# seaweedfs.sh: a real S3 store + Iceberg REST catalog (SeaweedFS `weed mini`) on loopback.
#
#   seaweedfs.sh start NAME DATA_DIR BASE_PORT   start (idempotent), wait until ready, print endpoints
#   seaweedfs.sh stop DATA_DIR [--wipe]          stop (SIGTERM, SIGKILL after 20 s)
#
# Ports, all on 127.0.0.1, derived from BASE_PORT (B):
#   B master, B+1 volume, B+2 filer, B+3 S3, B+4 Iceberg REST, B+6 admin; gRPC at B+10..B+13, B+16.
# Credentials: admin / adminsecret are both the S3 keys and the OAuth2 client credentials.
#
# Environment:
#   WEED         the weed binary (default: $ICERELAY_TESTSTACK/venv/bin/weed, see setup-test-env.sh)
#   WAREHOUSE    table bucket = warehouse name (default warehouse)
#   WATCH_PID    if set, a watchdog stops the server once that process has exited
#                (the test harness passes its own pid so no server outlives a test run)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=watch.sh
. "$HERE/watch.sh"
TESTSTACK=${ICERELAY_TESTSTACK:-$(cd "$HERE/../.." && pwd)/.teststack}
WEED=${WEED:-$TESTSTACK/venv/bin/weed}
HOST=127.0.0.1
AK=admin
SK=adminsecret

is_weed() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null && tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null | grep -q 'weed.* mini '; }
# A process just started may not have exec'd weed yet (its command line is still this
# script's), so the wait below only asks whether it is alive and not a zombie.
is_alive() { [ -n "${1:-}" ] && [ -r "/proc/$1/stat" ] && [ "$(sed 's/.*) //' "/proc/$1/stat" | cut -d' ' -f1)" != Z ]; }

start() {
  local name=$1 dir=$2 base=$3
  [[ $base =~ ^[0-9]+$ ]] && [ "$base" -ge 1024 ] && [ "$((base + 16))" -le 65535 ] || { echo "bad BASE_PORT $base" >&2; exit 2; }
  [ -x "$WEED" ] || { echo "no weed binary at $WEED; run scripts/setup-test-env.sh first" >&2; exit 1; }
  local warehouse=${WAREHOUSE:-warehouse}
  mkdir -p "$dir/data"; dir=$(cd "$dir" && pwd)
  local pid_file=$dir/weed.pid log=$dir/weed.log s3=http://$HOST:$((base + 3)) cat=http://$HOST:$((base + 4))
  if is_weed "$(cat "$pid_file" 2>/dev/null || true)"; then
    echo "[$name] already running" >&2
  else
    # Without credentials in its environment the server runs anonymous; with them,
    # they become the admin identity for S3 and the catalog's OAuth2 endpoint.
    AWS_ACCESS_KEY_ID=$AK AWS_SECRET_ACCESS_KEY=$SK setsid nohup "$WEED" mini -dir="$dir/data" \
      -ip=$HOST -ip.bind=$HOST -admin.ui=false -webdav=false -master.telemetry=false \
      -master.port="$base" -master.port.grpc=$((base + 10)) \
      -volume.port=$((base + 1)) -volume.port.grpc=$((base + 11)) \
      -filer.port=$((base + 2)) -filer.port.grpc=$((base + 12)) \
      -s3.port=$((base + 3)) -s3.port.grpc=$((base + 13)) \
      -s3.port.iceberg=$((base + 4)) -s3.port.lance=0 -debug.port=$((base + 5)) -webdav.port=$((base + 7)) \
      -admin.port=$((base + 6)) -admin.port.grpc=$((base + 16)) -tableBucket="$warehouse" \
      </dev/null >>"$log" 2>&1 &
    local pid=$!
    echo "$pid" > "$pid_file"
    watch_server "$pid" "$dir/data" 10
  fi
  local deadline=$(( $(date +%s) + ${STARTUP_TIMEOUT:-60} )) token prefix=""
  while :; do
    is_alive "$(cat "$pid_file")" || { echo "[$name] weed exited; log:" >&2; tail -n 30 "$log" >&2; exit 1; }
    token=$(curl -s -X POST "$cat/v1/oauth/tokens" -d grant_type=client_credentials -d client_id=$AK -d client_secret=$SK \
      | sed -n 's/.*"access_token":"\([^"]*\)".*/\1/p' || true)
    if [ -n "$token" ] && curl -s -o /dev/null "$s3/"; then
      prefix=$(curl -s -H "Authorization: Bearer $token" "$cat/v1/config?warehouse=$warehouse" | sed -n 's/.*"prefix":"\([^"]*\)".*/\1/p' || true)
      if [ -n "$prefix" ] && [ "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $token" "$cat/v1/$prefix/namespaces")" = 200 ]; then
        break
      fi
    fi
    [ "$(date +%s)" -lt "$deadline" ] || { echo "[$name] not ready in time; log:" >&2; tail -n 30 "$log" >&2; exit 1; }
    sleep 0.3
  done
  cat > "$dir/endpoints.env" <<ENV
NAME=$name
S3_ENDPOINT=$s3
S3_REGION=us-east-1
CATALOG_URI=$cat
OAUTH2_SERVER_URI=$cat/v1/oauth/tokens
WAREHOUSE=$warehouse
CATALOG_PREFIX=$prefix
WAREHOUSE_LOCATION=s3://$warehouse
ACCESS_KEY=$AK
SECRET_KEY=$SK
PID_FILE=$pid_file
LOG_FILE=$log
ENV
  cat "$dir/endpoints.env"
}

stop() {
  local dir=$1 wipe=${2:-} pid
  pid=$(cat "$dir/weed.pid" 2>/dev/null || true)
  if is_weed "$pid"; then
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    echo "stopped weed $pid" >&2
  fi
  rm -f "$dir/weed.pid"
  if [ "$wipe" = --wipe ]; then rm -rf "$dir"; fi
}

case "${1:-}" in
  start) [ $# -eq 4 ] || { echo "usage: $0 start NAME DATA_DIR BASE_PORT" >&2; exit 2; }; start "$2" "$3" "$4" ;;
  stop) [ $# -ge 2 ] || { echo "usage: $0 stop DATA_DIR [--wipe]" >&2; exit 2; }; stop "$2" "${3:-}" ;;
  *) echo "usage: $0 start NAME DATA_DIR BASE_PORT | stop DATA_DIR [--wipe]" >&2; exit 2 ;;
esac
