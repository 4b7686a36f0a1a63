#!/usr/bin/env bash
# A local Prefect server on 127.0.0.1 with a process worker running this project's deployments.
#
#   infra/prefect_local.sh up        start the server (background), create the work pool, deploy prefect.yaml
#   infra/prefect_local.sh worker    run a process worker in the foreground (extra args go to `prefect worker start`)
#   infra/prefect_local.sh down      stop the server started by `up`
#   infra/prefect_local.sh serve     up + worker; Ctrl-C stops both      (this is `make serve-prefect`)
#
# Then: PREFECT_API_URL=http://127.0.0.1:4200/api prefect deployment run retrain/weekly
# Settings (environment): PREFECT_PORT (4200), EASYANIMATE_WORK_POOL (easyanimate-process, the pool
# prefect.yaml names), EASYANIMATE_STATE_DIR (.easyanimate: server database, logs, pid file),
# PREFECT_SERVER_START_TIMEOUT (120 s). Nothing leaves the machine: analytics are off, no pull step
# fetches code (deployments run from this folder).
set -euo pipefail

cd "$(dirname "$0")/.."
PORT="${PREFECT_PORT:-4200}"
POOL="${EASYANIMATE_WORK_POOL:-easyanimate-process}"
STATE="$(mkdir -p "${EASYANIMATE_STATE_DIR:-.easyanimate}" && cd "${EASYANIMATE_STATE_DIR:-.easyanimate}" && pwd)"
START_TIMEOUT="${PREFECT_SERVER_START_TIMEOUT:-120}"
SERVER_HOME="$STATE/prefect-server"
PIDFILE="$STATE/prefect-server.pid"
URLFILE="$STATE/prefect-server.url"  # easyanimate commands in this workspace adopt the server it names
LOG="$STATE/logs/prefect-server.log"

export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export PREFECT_HOME="${PREFECT_HOME:-$STATE/prefect}"  # clients (deploy, worker): not the server's home
mkdir -p "$SERVER_HOME" "$PREFECT_HOME" "$(dirname "$LOG")"

healthy() {
  python - "$PREFECT_API_URL/health" <<'EOF'
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
EOF
}

up() {
  if healthy; then
    echo "a Prefect server already answers on $PREFECT_API_URL"
  else
    # Own session, so `down` stops the server and everything it spawned with one signal to the group.
    PREFECT_HOME="$SERVER_HOME" setsid prefect server start --host 127.0.0.1 --port "$PORT" --analytics-off \
      >"$LOG" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    for _ in $(seq "$START_TIMEOUT"); do
      healthy && break
      kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { echo "Prefect server exited; see $LOG" >&2; tail -20 "$LOG" >&2; exit 1; }
      sleep 1
    done
    healthy || { echo "Prefect server not healthy after ${START_TIMEOUT}s; see $LOG" >&2; exit 1; }
    echo "$PREFECT_API_URL" >"$URLFILE"
    echo "Prefect server on $PREFECT_API_URL (log: $LOG)"
  fi
  prefect work-pool inspect "$POOL" >/dev/null 2>&1 || prefect work-pool create "$POOL" --type process
  prefect --no-prompt deploy --all
  echo "export PREFECT_API_URL=$PREFECT_API_URL   # then: prefect deployment run retrain/weekly"
}

worker() {
  exec prefect worker start --pool "$POOL" "$@"
}

down() {
  if [[ -f "$PIDFILE" ]]; then
    kill -TERM -- "-$(cat "$PIDFILE")" 2>/dev/null || true
    rm -f "$PIDFILE" "$URLFILE"
    echo "stopped the Prefect server"
  fi
}

case "${1:-serve}" in
  up) up ;;
  worker) shift; worker "$@" ;;
  down) down ;;
  serve)
    up
    trap down EXIT INT TERM
    prefect worker start --pool "$POOL"
    ;;
  *) echo "usage: $0 up|worker [ARGS]|down|serve" >&2; exit 2 ;;
esac
