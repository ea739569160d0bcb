#!/usr/bin/env bash
# postgres.sh: a throwaway PostgreSQL cluster on 127.0.0.1, from Debian's `postgresql` package.
#
#   postgres.sh start DIR PORT   initdb (first time) and start; wait until it accepts connections;
#                                print PG_URL=postgres://icerelay:<password>@127.0.0.1:PORT/postgres
#   postgres.sh stop DIR         stop at once (the data stays)
#
# initdb and pg_ctl refuse to run as root: run as root, they run as the `postgres` user, and
# DIR is made enterable for it. Password authentication (scram-sha-256) is on, so a leaked
# password would show in a test's output.
#
# Environment:
#   PG_BIN       directory of initdb/pg_ctl (default: the newest /usr/lib/postgresql/*/bin)
#   PG_PASSWORD  the `icerelay` role's password (default: icerelay-test)
#   WATCH_PID    if set, a watchdog stops the server once that process has exited
set -euo pipefail
BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
[ -n "$BIN" ] && [ -x "$BIN/initdb" ] || {
  echo "no PostgreSQL server binaries (initdb) found; install Debian's postgresql package (apt-get install postgresql)" >&2
  exit 1
}
PASSWORD=${PG_PASSWORD:-icerelay-test}

as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start() {
  local dir=$1 port=$2
  [[ $port =~ ^[0-9]+$ ]] || { echo "bad PORT $port" >&2; exit 2; }
  mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
  local data=$dir/data
  if [ "$(id -u)" = 0 ]; then
    # The postgres user must reach DIR through every parent (temp dirs are 0700).
    local d=$dir
    while [ "$d" != / ]; do chmod o+x "$d" 2>/dev/null || true; d=$(dirname "$d"); done
    chown postgres "$dir"
  fi
  if [ ! -f "$data/PG_VERSION" ]; then
    local pwfile=$dir/pwfile
    (umask 077; printf '%s\n' "$PASSWORD" > "$pwfile")
    [ "$(id -u)" = 0 ] && chown postgres "$pwfile"
    as_postgres "$BIN/initdb" -D "$data" -U icerelay --pwfile="$pwfile" -A scram-sha-256 --no-sync \
      >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
    rm -f "$pwfile"
  fi
  as_postgres "$BIN/pg_ctl" -D "$data" -l "$dir/postgres.log" -w -t 60 \
    -o "-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories='$dir' -c fsync=off -c max_connections=300" \
    start >/dev/null || { tail -n 30 "$dir/postgres.log" >&2; exit 1; }
  if [ -n "${WATCH_PID:-}" ]; then
    setsid nohup sh -c "while kill -0 $WATCH_PID 2>/dev/null; do sleep 1; done; \
      $(declare -f as_postgres); as_postgres '$BIN/pg_ctl' -D '$data' -m immediate stop" </dev/null >/dev/null 2>&1 &
  fi
  echo "PG_URL=postgres://icerelay:$PASSWORD@127.0.0.1:$port/postgres"
}

stop() {
  local dir=$1
  as_postgres "$BIN/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  *) echo "usage: $0 start DIR PORT | stop DIR" >&2; exit 2 ;;
esac
