#!/usr/bin/env bash
# The ping-burst latency tail (issue 14), measured with a second, independent client:
# bench/ws-latency.js (Node.js + the `ws` library, which answers pings by itself).
#
# Topology: one private redis-server (never 6379), two herald nodes on 127.0.0.1,
# CLIENTS node processes of SESSIONS_PER_CLIENT sessions each (user bench-<i>, HS256 JWT),
# every client spread over both nodes and over SOURCE_IPS. A producer (ws-latency.js
# producer) publishes per-user messages on Redis (PUBLISH hbench:user:{bench-<u>}, u random)
# with a CLOCK_MONOTONIC timestamp in the payload, at each of RATES msg/s for DURATION s
# (GAP s between rates), starting HOLD s after every session is open. The same run is made
# twice on fresh nodes:
#   pings     herald's defaults (--ping-interval 25 --idle-timeout 60)
#   no-pings  --ping-interval 600 --idle-timeout 1200: no ping during the run
# With 25 s pings and HOLD=8, each 20 s phase contains the moment the sessions' first (or
# second) ping falls due, whatever the node does with it.
# It prints, per rate, p50/p99/p99.9 with and without pings, the p99 ratio, and the pings
# the clients saw (in total and the most in any 100 ms), and writes OUT_DIR/summary.json.
#
# Knobs (environment):
#   SESSIONS_PER_CLIENT=8000 CLIENTS=2   (the open-file limit is 20,000 per process)
#   RATES="2000 5000" DURATION=20 GAP=2 HOLD=8 DRAIN=3
#   CONCURRENCY=100      handshakes in flight per client process
#   SOURCE_IPS=127.0.0.2-127.0.0.9
#   CONFIGS="pings no-pings"
#   HERALD_BIN=target/release/herald (built with cargo build --release -p herald unless set)
#   OUT_DIR=target/ping-tail/<utc time>
#   HERALD_* reach both nodes (e.g. HERALD_WORKER_THREADS=1)
#
# Usage: bench/ping-tail.sh     (about 3 minutes with the defaults)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

SESSIONS_PER_CLIENT=${SESSIONS_PER_CLIENT:-8000}
CLIENTS=${CLIENTS:-2}
RATES=${RATES:-2000 5000}
DURATION=${DURATION:-20}
GAP=${GAP:-2}
HOLD=${HOLD:-8}
DRAIN=${DRAIN:-3}
CONCURRENCY=${CONCURRENCY:-100}
SOURCE_IPS=${SOURCE_IPS:-127.0.0.2-127.0.0.9}
CONFIGS=${CONFIGS:-pings no-pings}
OUT_DIR=${OUT_DIR:-target/ping-tail/$(date -u +%Y%m%dT%H%M%SZ)}
PREFIX=hbench
NODES=2
SESSIONS=$((SESSIONS_PER_CLIENT * CLIENTS))

if [ "$SESSIONS_PER_CLIENT" -gt 18000 ]; then
    echo "SESSIONS_PER_CLIENT above 18,000 would pass the open-file limit (20,000)" >&2
    exit 2
fi
if [ "$DURATION" -gt 120 ] || [ "$HOLD" -gt 120 ]; then
    echo "DURATION and HOLD are capped at 120 s" >&2
    exit 2
fi

JWT_SECRET="bench-jwt-secret-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
API_KEY="bench-api-key-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
export BENCH_JWT_SECRET="$JWT_SECRET"

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PIDS=()

log() { printf '[ping-tail %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

forget_pid() {
    local pid=$1 keep=() p
    for p in "${PIDS[@]}"; do [ "$p" = "$pid" ] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}
stop_pid() {
    kill -TERM "$1" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    forget_pid "$1"
}

# A free TCP port on 127.0.0.1 below the ephemeral range (the clients use those as sources).
free_port() {
    local p
    for _ in $(seq 1 200); do
        p=$((20000 + RANDOM % 12000))
        [ "$p" = 6379 ] && continue
        if [ -z "$(ss -Htln "sport = :$p" 2>/dev/null)" ]; then
            echo "$p"
            return 0
        fi
    done
    log "no free port found"
    return 1
}

wait_file() { # file seconds pid
    local i
    for i in $(seq 1 $(($2 * 10))); do
        [ -e "$1" ] && return 0
        kill -0 "$3" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

for tool in redis-server redis-cli node curl ss; do
    command -v "$tool" >/dev/null || { log "missing $tool"; exit 2; }
done
[ -d bench/node_modules/ws ] && [ -d bench/node_modules/redis ] || {
    log "npm ci in bench/"
    (cd bench && npm ci --no-audit --no-fund --loglevel=error) >"$OUT_DIR/npm-ci.log" 2>&1
}
if [ -z "${HERALD_BIN:-}" ]; then
    log "cargo build --release -p herald"
    cargo build --release --bins -p herald 2>"$OUT_DIR/cargo-build.log" || {
        tail -30 "$OUT_DIR/cargo-build.log" >&2
        exit 1
    }
fi
HERALD=${HERALD_BIN:-$ROOT/target/release/herald}
[ -x "$HERALD" ] || { log "missing $HERALD"; exit 2; }
{
    echo "herald: $HERALD"
    git rev-parse HEAD 2>/dev/null || echo "no git"
    git status --short -- src Cargo.toml Cargo.lock 2>/dev/null || true
    echo "sessions: $CLIENTS x $SESSIONS_PER_CLIENT, rates: $RATES, duration $DURATION s, hold $HOLD s"
    env | grep '^HERALD_' | grep -v -e SECRET -e KEY || true
} >"$OUT_DIR/run.txt"
ulimit -n "$(ulimit -Hn)"

REDIS_PORT=$(free_port)
REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --maxclients 1000 --daemonize no --logfile "$OUT_DIR/redis.log" &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
for _ in $(seq 1 100); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
    sleep 0.1
done
redis-cli -p "$REDIS_PORT" ping >/dev/null || { log "redis-server did not start"; exit 1; }
log "redis-server pid $REDIS_PID port $REDIS_PORT"

run_config() { # name, herald flags...
    local name=$1 i port pid
    shift
    local ports=() hpids=() cpids=() targets=()
    for i in $(seq 1 $NODES); do
        port=$(free_port)
        env -u HERALD_REDIS_URL HERALD_LOG="${HERALD_LOG:-warn}" "$HERALD" \
            --listen "127.0.0.1:$port" --redis-url "$REDIS_URL" --jwt-secret "$JWT_SECRET" \
            --api-key "$API_KEY" --prefix "$PREFIX" --max-connections 20000 \
            --node-id "herald-$name-$i" --drain-grace 5 "$@" >"$OUT_DIR/$name-herald-$i.log" 2>&1 &
        pid=$!
        PIDS+=("$pid")
        for _ in $(seq 1 300); do
            curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
            kill -0 "$pid" 2>/dev/null || { cat "$OUT_DIR/$name-herald-$i.log" >&2; exit 1; }
            sleep 0.1
        done
        ports+=("$port") hpids+=("$pid") targets+=(--target "ws://127.0.0.1:$port/ws")
        log "$name: herald-$i pid $pid port $port ($*)"
    done
    rm -f "$OUT_DIR/$name.stop"
    for i in $(seq 0 $((CLIENTS - 1))); do
        node bench/ws-latency.js client "${targets[@]}" --sessions "$SESSIONS_PER_CLIENT" \
            --first-user $((i * SESSIONS_PER_CLIENT)) --source-ips "$SOURCE_IPS" \
            --concurrency "$CONCURRENCY" --ready-file "$OUT_DIR/$name-client-$i.ready" \
            --stop-file "$OUT_DIR/$name.stop" --out "$OUT_DIR/$name-client-$i.json" \
            --max-seconds 600 >"$OUT_DIR/$name-client-$i.log" 2>&1 &
        pid=$!
        PIDS+=("$pid") cpids+=("$pid")
    done
    for i in $(seq 0 $((CLIENTS - 1))); do
        wait_file "$OUT_DIR/$name-client-$i.ready" 300 "${cpids[$i]}" || {
            log "$name: client $i did not get ready"
            cat "$OUT_DIR/$name-client-$i.log" >&2
            exit 1
        }
        log "$name: client $i $(cat "$OUT_DIR/$name-client-$i.ready")"
    done
    log "$name: all sessions open; holding $HOLD s"
    sleep "$HOLD"
    local phases="" r
    for r in $RATES; do phases+="${phases:+,}$r:$DURATION"; done
    log "$name: producer $phases"
    node bench/ws-latency.js producer --redis-url "$REDIS_URL" --prefix "$PREFIX" \
        --users "$SESSIONS" --phases "$phases" --gap "$GAP" \
        --out "$OUT_DIR/$name-producer.json" 2>"$OUT_DIR/$name-producer.log"
    sleep "$DRAIN"
    touch "$OUT_DIR/$name.stop"
    for i in $(seq 0 $((CLIENTS - 1))); do
        wait_file "$OUT_DIR/$name-client-$i.json" 120 "${cpids[$i]}" || true
        stop_pid "${cpids[$i]}"
    done
    for i in $(seq 1 $NODES); do
        curl -fsS "http://127.0.0.1:${ports[$((i - 1))]}/metrics" >"$OUT_DIR/$name-metrics-$i.txt" 2>/dev/null || true
        stop_pid "${hpids[$((i - 1))]}"
    done
}

for c in $CONFIGS; do
    case $c in
        pings) run_config pings ;;
        no-pings) run_config no-pings --ping-interval 600 --idle-timeout 1200 ;;
        *) log "unknown config $c"; exit 2 ;;
    esac
done

node bench/ws-latency.js report --dir "$OUT_DIR" --configs "${CONFIGS// /,}" --clients "$CLIENTS" \
    --sessions "$SESSIONS"
log "results in $OUT_DIR"
