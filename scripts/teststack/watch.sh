# watch.sh: sourced by the scripts that start servers for the tests (seaweedfs.sh, rustberg.sh,
# java_rest.sh), so that no server outlives the process that started it.
#
#   watch_server PID MARKER GRACE   once $WATCH_PID has exited, TERM the server PID, then KILL it
#                                   after GRACE seconds; only while PID's command line still holds
#                                   MARKER (the server's own directory), so that a watcher outliving
#                                   its server never signals a recycled pid. Without WATCH_PID,
#                                   nothing.
watch_server() {
  [ -n "${WATCH_PID:-}" ] || return 0
  local pid=$1 marker=$2 grace=$3
  local owns="tr '\\0' ' ' < /proc/$pid/cmdline 2>/dev/null | grep -qF -- '$marker'"
  setsid nohup sh -c "while kill -0 $WATCH_PID 2>/dev/null; do sleep 1; done; $owns && kill -TERM $pid 2>/dev/null; sleep $grace; $owns && kill -KILL $pid 2>/dev/null" \
    </dev/null >/dev/null 2>&1 &
}
