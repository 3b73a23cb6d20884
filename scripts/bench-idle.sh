#!/usr/bin/env bash
# Idle-memory benchmark: RSS of one herald node per idle authenticated session, over
# WebSocket (GET /ws, the default) or SSE (TRANSPORT=sse: GET /sse streams held open and read,
# keep-alive comments counted).
#
# Builds release binaries, starts a private redis-server (never on 6379) and one herald node
# in cluster mode, opens $SESSIONS authenticated sessions with herald-bench from source
# addresses 127.0.0.2-127.0.0.20, holds them idle for $HOLD seconds (pings answered) and
# reports the node's RSS before/after, KiB per session and CPU at rest. Then the same against
# a standalone node (no Redis), unless MODES says otherwise. Everything started here is
# stopped on exit.
#
# Knobs (environment):
#   SESSIONS=10000          sessions to hold (above 18,000 several bench processes are used;
#                           one node's own open-file limit is 20,000)
#   HOLD=35                 seconds to hold after all connected (> the 25 s ping interval)
#   MODES="cluster standalone"
#   TRANSPORT=ws            ws or sse (results of sse runs are named idle-<mode>-sse.*)
#   SOURCE_IPS=127.0.0.2-127.0.0.20
#   CONCURRENCY=256         handshakes in flight
#   OUT_DIR=target/bench-idle/<utc time>   JSON results and logs
#   HERALD_*                any node setting, e.g. HERALD_WS_READ_BUFFER=1024 or
#                           HERALD_OUTBOX_MESSAGES=64, is passed to the node as is
#   NODE_ENV=""             extra VAR=value pairs for the node process only, e.g.
#                           "MALLOC_ARENA_MAX=2" or
#                           "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
#
# Usage: scripts/bench-idle.sh        (from anywhere inside the repository)
set -euo pipefail

cd "$(dirname "$0")/.."

SESSIONS=${SESSIONS:-10000}
HOLD=${HOLD:-35}
MODES=${MODES:-cluster standalone}
TRANSPORT=${TRANSPORT:-ws}
case $TRANSPORT in
ws) SUFFIX="" ;;
sse) SUFFIX="-sse" ;;
*)
    echo "TRANSPORT must be ws or sse" >&2
    exit 2
    ;;
esac
SOURCE_IPS=${SOURCE_IPS:-127.0.0.2-127.0.0.20}
CONCURRENCY=${CONCURRENCY:-256}
OUT_DIR=${OUT_DIR:-target/bench-idle/$(date -u +%Y%m%dT%H%M%SZ)}
PER_PROCESS=15000


mkdir -p "$OUT_DIR"
# log, free_port, rss_kib, cpu_ticks, stop_pid and the EXIT trap that stops every process
# started here come from the shared bench library.
BENCH_NAME=bench-idle
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh

new_secrets
build_release

REDIS_PID=""
REDIS_PORT=""
start_redis() {
    REDIS_PORT=$(free_port)
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        --maxclients 1000 --daemonize no --logfile "$OUT_DIR/redis.log" &
    REDIS_PID=$!
    PIDS+=("$REDIS_PID")
    for _ in $(seq 1 100); do
        if redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
            log "redis-server pid $REDIS_PID on port $REDIS_PORT"
            return 0
        fi
        sleep 0.1
    done
    log "redis-server did not start (see $OUT_DIR/redis.log)"
    return 1
}

NODE_PID=""
NODE_PORT=""
start_node() {
    local mode=$1
    NODE_PORT=$(free_port)
    local args=(--listen "127.0.0.1:$NODE_PORT" --jwt-secret "$JWT_SECRET" --api-key "$API_KEY"
        --max-connections $((SESSIONS + 1000)) --drain-grace 5)
    if [ "$mode" = cluster ]; then
        args+=(--redis-url "redis://127.0.0.1:$REDIS_PORT")
    fi
    # shellcheck disable=SC2086 # NODE_ENV is a list of VAR=value words
    env -u HERALD_REDIS_URL HERALD_LOG="${HERALD_LOG:-warn}" ${NODE_ENV:-} \
        "$HERALD" "${args[@]}" >"$OUT_DIR/herald-$mode.log" 2>&1 &
    NODE_PID=$!
    PIDS+=("$NODE_PID")
    for _ in $(seq 1 300); do
        if curl -fsS "http://127.0.0.1:$NODE_PORT/readyz" >/dev/null 2>&1; then
            log "herald ($mode) pid $NODE_PID on port $NODE_PORT is ready"
            return 0
        fi
        if ! kill -0 "$NODE_PID" 2>/dev/null; then
            log "herald exited; log follows"
            cat "$OUT_DIR/herald-$mode.log" >&2
            return 1
        fi
        sleep 0.1
    done
    log "herald did not become ready (see $OUT_DIR/herald-$mode.log)"
    return 1
}

# One bench process holding every session, measuring the node itself.
bench_single() {
    local mode=$1
    "$BENCH" idle --target "ws://127.0.0.1:$NODE_PORT" --sessions "$SESSIONS" \
        --source-ips "$SOURCE_IPS" --concurrency "$CONCURRENCY" --hold "$HOLD" \
        --transport "$TRANSPORT" --pids "$NODE_PID" --json "$OUT_DIR/idle-$mode$SUFFIX.json" |
        tee "$OUT_DIR/idle-$mode$SUFFIX.txt"
}

# Several bench processes (each <= $PER_PROCESS sessions, distinct users); this script
# samples the node once all are connected and again after $HOLD seconds.
bench_multi() {
    local mode=$1 procs remaining offset n k before connected_cpu after after_cpu
    procs=$(((SESSIONS + PER_PROCESS - 1) / PER_PROCESS))
    log "$SESSIONS sessions: $procs bench processes"
    before=$(rss_kib "$NODE_PID")
    local bench_pids=() ready=()
    remaining=$SESSIONS
    offset=0
    for k in $(seq 1 "$procs"); do
        n=$(((remaining + procs - k) / (procs - k + 1)))
        rm -f "$OUT_DIR/ready-$mode-$k.json"
        "$BENCH" idle --target "ws://127.0.0.1:$NODE_PORT" --sessions "$n" --first-user "$offset" \
            --source-ips "$SOURCE_IPS" --concurrency "$((CONCURRENCY / procs + 1))" \
            --transport "$TRANSPORT" --hold $((HOLD + 30)) --ready-file "$OUT_DIR/ready-$mode-$k.json" \
            --json "$OUT_DIR/idle-$mode-$k.json" >"$OUT_DIR/idle-$mode-$k.txt" 2>&1 &
        bench_pids+=($!)
        PIDS+=($!)
        ready+=("$OUT_DIR/ready-$mode-$k.json")
        offset=$((offset + n))
        remaining=$((remaining - n))
    done
    local f all
    while :; do
        all=1
        for f in "${ready[@]}"; do [ -s "$f" ] || all=0; done
        [ $all = 1 ] && break
        sleep 0.5
    done
    local total_connected=0
    for f in "${ready[@]}"; do
        total_connected=$((total_connected + $(sed 's/.*"connected":\([0-9]*\).*/\1/' "$f")))
    done
    connected_cpu=$(cpu_ticks "$NODE_PID")
    sleep "$HOLD"
    after=$(rss_kib "$NODE_PID")
    after_cpu=$(cpu_ticks "$NODE_PID")
    for k in "${bench_pids[@]}"; do stop_pid "$k"; done
    {
        echo "== herald-bench idle, $procs processes ($mode, $TRANSPORT) =="
        echo "sessions requested      $SESSIONS"
        echo "sessions connected      $total_connected"
        awk -v b="$before" -v a="$after" -v n="$total_connected" -v c0="$connected_cpu" \
            -v c1="$after_cpu" -v h="$HOLD" -v pid="$NODE_PID" 'BEGIN {
                printf "%8s %9s %12s %12s %12s %12s %10s %8s\n", "pid", "sessions", "rss_before",
                    "rss_after", "delta_KiB", "KiB/session", "cpu_hold_s", "cpu_%";
                printf "%8d %9d %12d %12d %12d %12.2f %10.2f %8.2f\n", pid, n, b, a, a - b,
                    (n > 0 ? (a - b) / n : 0), (c1 - c0) / 100, (c1 - c0) / h;
            }'
    } | tee "$OUT_DIR/idle-$mode$SUFFIX.txt"
}

for mode in $MODES; do
    case $mode in
    cluster) [ -n "$REDIS_PID" ] || start_redis ;;
    standalone) ;;
    *)
        log "unknown mode $mode (use cluster and/or standalone)"
        exit 2
        ;;
    esac
    start_node "$mode"
    sleep 1
    log "$mode node RSS baseline: $(rss_kib "$NODE_PID") KiB"
    if [ "$SESSIONS" -le "$PER_PROCESS" ]; then
        bench_single "$mode"
    else
        bench_multi "$mode"
    fi
    stop_pid "$NODE_PID"
done

echo
echo "== machine =="
echo "nproc:  $(nproc)"
echo "cpu:    $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
echo "kernel: $(uname -r)"
echo "date:   $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "node settings from the environment: $(env | grep '^HERALD_' | grep -v -e SECRET -e API_KEY | tr '\n' ' ')${NODE_ENV:-}"
if command -v jq >/dev/null; then
    echo
    echo "== summary (KiB of node RSS per idle $TRANSPORT session) =="
    for mode in $MODES; do
        f="$OUT_DIR/idle-$mode$SUFFIX.json"
        [ -f "$f" ] || continue
        jq -r --arg mode "$mode" '.result.nodes[] | "\($mode): \(.sessions) sessions, RSS \(.rss_before_kib) -> \(.rss_after_kib) KiB, \(.kib_per_session) KiB/session, CPU at rest \(.cpu_pct_hold)% of a core"' "$f"
    done
fi
echo "results: $OUT_DIR"
