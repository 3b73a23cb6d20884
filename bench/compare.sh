#!/usr/bin/env bash
# Side-by-side benchmark: herald vs Socket.IO 4 + @socket.io/redis-adapter vs Sockudo 5.2.0
# (a Pusher-protocol server in Rust, Redis adapter) vs the floor (bench/floor: the smallest
# server doing herald's observable job), same machine, same run, same topology, same load
# generator (herald-bench, --protocol herald|socketio|pusher).
#
# Topology (both systems): one private redis-server (never 6379), two server nodes on
# 127.0.0.1, 2 x SESSIONS_PER_NODE authenticated sessions (HS256 JWT, sub = bench-<i>) opened
# by herald-bench from source addresses $SOURCE_IPS and spread over both nodes.
#   herald:    target/release/herald x 2 (--redis-url --jwt-secret --api-key --prefix
#              --max-connections 20000); producer: herald-bench --producer redis.
#   floor:     target/release/herald-floor x 2 (one thread each, no presence, no pings);
#              the same herald-bench arguments and producer as herald.
#   socket.io: node bench/socketio-server.js x 2 (Redis adapter, websocket only);
#              producer: node bench/producer.js (@socket.io/redis-emitter), herald-bench
#              --producer external --expect-file.
#   sockudo:   sockudo 5.2.0 x 2 (adapter redis, cache redis, queue none, rate limiter off,
#              fallback_to_local off, activity_timeout 25 like herald's 25 s ping; one app;
#              every Redis setting on the bench's Redis, own key prefixes), each started with
#              a clean environment (env -i) in its own directory with its own config file
#              (OUT_DIR/sockudo-<i>/config/config.toml); clients: herald-bench --protocol
#              pusher (private-user-<uid> + broadcast); producer: herald-bench --producer
#              pusher-api (signed POST /apps/<id>/batch_events, 10 events per request).
#              Installed when missing (SOCKUDO_BIN unset and target/sockudo/bin/sockudo
#              absent): cargo install sockudo --version 5.2.0 --locked --no-default-features
#              --features redis,local --root target/sockudo (needs protoc: Debian's
#              protobuf-compiler).
#   herald-http: the herald nodes again, message phases only, published through herald's
#              POST /api/publish (herald-bench --producer http) instead of Redis: the
#              like-for-like row for Sockudo's HTTP producer. Added to SYSTEMS when both
#              herald and sockudo are in it (HERALD_HTTP_ROW=0: not).
#
# Phases, each run for herald then for socket.io before the next phase starts:
#   idle          fresh nodes, open all sessions, hold IDLE_HOLD s: node RSS per idle
#                 session = (mean RSS over the 2nd half of the hold - RSS before) / sessions;
#                 Socket.IO nodes get a full GC (POST /gc) before the baseline, and once more
#                 at the end of the hold for a second, after-GC figure
#   connect       open all sessions as fast as CONCURRENCY allows: handshakes per second
#   fanout-R      R msg/s for DURATION s, each to one random user (FANOUT_RATES)
#   broadcast-R   R msg/s for DURATION s to every session (BROADCAST_RATES)
# Every phase opens its own sessions and closes them at the end. Before a phase the script
# waits (up to QUIET_WAIT s) until processes not started here use less than QUIET_CPU of a
# core; a phase the bench reports as "noisy" is run again (NOISY_RETRIES times) and, if still
# noisy, reported flagged: no number of a noisy phase enters a ratio.
#
# Output: OUT_DIR/<phase>-<system>.json (raw herald-bench JSON), .meta.json (what this
# script measured itself: RSS and CPU (and kernel CPU) of every server pid from /proc over
# the whole phase, connect included; producer stats,
# attempts), logs, and OUT_DIR/table.md (also printed).
#
# Knobs (environment):
#   SESSIONS_PER_NODE=8000   sessions per node (2 nodes)
#   DURATION=20              seconds of publishing per message phase
#   IDLE_HOLD=30             seconds an idle phase holds its sessions (> 25 s ping interval)
#   FANOUT_RATES="2000 5000" BROADCAST_RATES="1 5"
#   PAYLOAD_BYTES=100        bytes of "x" in each payload's "pad" (herald-bench's meaning)
#   DRAIN=3                  seconds the bench keeps reading after the producer stopped;
#   BROADCAST_DRAIN=10       the same for broadcast phases (a backlog of 16,000 deliveries per
#                            message takes longer to flush); what has not arrived by then is lost
#   CONCURRENCY=100          handshakes in flight per bench process
#   SOURCE_IPS=127.0.0.2-127.0.0.20
#   PHASES="idle connect fanout broadcast"   SYSTEMS="herald socketio floor sockudo"
#   WARMUP=5 WARMUP_RATE=1000  unreported fanout warm-up of each system before the first
#                            message phase (WARMUP=0: none)
#   NOISY_RETRIES=2  QUIET_WAIT=180  QUIET_CPU=0.25
#   OUT_DIR=target/bench-compare/<utc time>
#   HERALD_BIN / BENCH_BIN   use these binaries instead of building target/release/*
#   SOCKUDO_BIN              use this sockudo binary instead of target/sockudo/bin/sockudo
#   SKIP_BUILD=1             do not run cargo build / npm ci / cargo install sockudo
#                            (binaries and node_modules exist)
#   HERALD_*                 any herald setting, e.g. HERALD_WORKER_THREADS=1, reaches both
#                            herald nodes (and is printed with the results)
#
# Usage: bench/compare.sh      (from anywhere inside the repository)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

SESSIONS_PER_NODE=${SESSIONS_PER_NODE:-8000}
DURATION=${DURATION:-20}
IDLE_HOLD=${IDLE_HOLD:-30}
FANOUT_RATES=${FANOUT_RATES:-2000 5000}
BROADCAST_RATES=${BROADCAST_RATES:-1 5}
PAYLOAD_BYTES=${PAYLOAD_BYTES:-100}
DRAIN=${DRAIN:-3}
BROADCAST_DRAIN=${BROADCAST_DRAIN:-10}
CONCURRENCY=${CONCURRENCY:-100}
SOURCE_IPS=${SOURCE_IPS:-127.0.0.2-127.0.0.20}
PHASES=${PHASES:-idle connect fanout broadcast}
SYSTEMS=${SYSTEMS:-herald socketio floor sockudo}
if [[ " $SYSTEMS " == *" herald "* ]] && [[ " $SYSTEMS " == *" sockudo "* ]] &&
    [[ " $SYSTEMS " != *" herald-http "* ]] && [ "${HERALD_HTTP_ROW:-1}" = 1 ]; then
    SYSTEMS+=" herald-http"
fi
SOCKUDO_VERSION=5.2.0
NOISY_RETRIES=${NOISY_RETRIES:-2}
QUIET_WAIT=${QUIET_WAIT:-180}
QUIET_CPU=${QUIET_CPU:-0.25}
OUT_DIR=${OUT_DIR:-target/bench-compare/$(date -u +%Y%m%dT%H%M%SZ)}
PER_PROCESS=${PER_PROCESS:-17000} # sessions per bench process (open-file hard limit 20,000)
NODES=2
SESSIONS=$((SESSIONS_PER_NODE * NODES))
HERALD_PREFIX=hbench
FLOOR_PREFIX=fbench
SIO_PREFIX=sio-bench
SOCKUDO_PREFIX=sockudo-bench
SOCKUDO_APP_ID=herald-bench
SOCKUDO_APP_KEY="bench-key-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
SOCKUDO_APP_SECRET="bench-app-secret-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
export HERALD_BENCH_PUSHER_SECRET="$SOCKUDO_APP_SECRET"

JWT_SECRET="bench-jwt-secret-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
API_KEY="bench-api-key-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
export HERALD_BENCH_SECRET="$JWT_SECRET" BENCH_JWT_SECRET="$JWT_SECRET" HERALD_BENCH_API_KEY="$API_KEY"

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PIDS=()

log() { printf '[compare %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

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
    wait "$1" 2>/dev/null || true
    forget_pid "$1"
}

# A free TCP port on 127.0.0.1 below the ephemeral range (the bench uses those as sources).
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

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
# utime + stime in clock ticks (USER_HZ = 100); the comm field may hold spaces.
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $12 + $13}' || echo 0; }
# System (kernel) time alone, in ticks: on loopback the sender's kernel time includes most of
# the receiving side's TCP work too.
sys_ticks() { sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $13}' || echo 0; }

# ---------------------------------------------------------------- build and install
for tool in redis-server redis-cli node npm curl jq ss; do
    command -v "$tool" >/dev/null || { log "missing $tool"; exit 2; }
done
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    log "npm ci in bench/"
    (cd bench && npm ci --no-audit --no-fund --loglevel=error >"$OUT_DIR/npm-ci.log" 2>&1) || {
        cat "$OUT_DIR/npm-ci.log" >&2
        exit 1
    }
    if [ -z "${HERALD_BIN:-}" ] || [ -z "${BENCH_BIN:-}" ]; then
        # One package at a time, so herald is built without the bench's dependency features
        # (see build_release in scripts/bench-lib.sh).
        log "cargo build --release --bins -p herald; the same for -p herald-bench, -p herald-floor"
        { cargo build --release --bins -p herald &&
            cargo build --release --bins -p herald-bench &&
            cargo build --release --bins -p herald-floor; } 2>"$OUT_DIR/cargo-build.log" || {
            tail -30 "$OUT_DIR/cargo-build.log" >&2
            exit 1
        }
    fi
fi
SOCKUDO=${SOCKUDO_BIN:-$ROOT/target/sockudo/bin/sockudo}
if [[ " $SYSTEMS " == *" sockudo "* ]] && [ ! -x "$SOCKUDO" ]; then
    if [ "${SKIP_BUILD:-0}" = 1 ] || [ -n "${SOCKUDO_BIN:-}" ]; then
        log "missing $SOCKUDO"
        exit 2
    fi
    command -v protoc >/dev/null || {
        log "installing sockudo needs protoc (Debian: apt-get install protobuf-compiler)"
        exit 2
    }
    # Its own target directory: the build is large and shares nothing with herald's.
    log "cargo install sockudo $SOCKUDO_VERSION into target/sockudo (a long build; log in $OUT_DIR/sockudo-install.log)"
    CARGO_TARGET_DIR="$ROOT/target/sockudo-build" cargo install sockudo --version "$SOCKUDO_VERSION" \
        --locked --no-default-features --features redis,local --root "$ROOT/target/sockudo" \
        >"$OUT_DIR/sockudo-install.log" 2>&1 || {
        tail -30 "$OUT_DIR/sockudo-install.log" >&2
        exit 1
    }
fi
# The herald tree measured: commit, and anything uncommitted in herald (src/) or the load
# generator (bench/herald-bench/) (another change in progress would be measured too).
{
    git rev-parse HEAD 2>/dev/null || echo "no git"
    git status --short -- src bench/herald-bench Cargo.toml Cargo.lock 2>/dev/null || true
} >"$OUT_DIR/tree-status.txt"
HERALD=${HERALD_BIN:-$ROOT/target/release/herald}
BENCH=${BENCH_BIN:-$ROOT/target/release/herald-bench}
FLOOR=${FLOOR_BIN:-$ROOT/target/release/herald-floor}
if [ ! -x "$HERALD" ] || [ ! -x "$BENCH" ]; then log "missing $HERALD or $BENCH"; exit 2; fi
if [[ " $SYSTEMS " == *" floor "* ]] && [ ! -x "$FLOOR" ]; then log "missing $FLOOR"; exit 2; fi
[ -d bench/node_modules/socket.io ] || { log "bench/node_modules missing (run without SKIP_BUILD)"; exit 2; }

# What the bench of this tree supports (it grows scenarios; check before relying on them).
BENCH_HELP=$("$BENCH" --help 2>&1 || true)
has_scenario() { grep -qE "^  $1 " <<<"$BENCH_HELP"; }
has_flag() { "$BENCH" "$1" --help 2>&1 | grep -q -- "$2"; }

# Both the servers and the bench hold one descriptor per session.
ulimit -n "$(ulimit -Hn)"

# ---------------------------------------------------------------- servers
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

wait_http() { # url pid logfile name
    for _ in $(seq 1 300); do
        curl -fsS "$1" >/dev/null 2>&1 && return 0
        if ! kill -0 "$2" 2>/dev/null; then
            log "$4 exited; log follows"
            cat "$3" >&2
            return 1
        fi
        sleep 0.1
    done
    log "$4 not ready (see $3)"
    return 1
}

H_PORTS=() H_PIDS=() S_PORTS=() S_PIDS=() F_PORTS=() F_PIDS=() K_PORTS=() K_PIDS=()
start_herald() {
    local i port pid
    H_PORTS=() H_PIDS=()
    for i in $(seq 1 $NODES); do
        port=$(free_port)
        env -u HERALD_REDIS_URL HERALD_LOG="${HERALD_LOG:-warn}" "$HERALD" \
            --listen "127.0.0.1:$port" --redis-url "$REDIS_URL" --jwt-secret "$JWT_SECRET" \
            --api-key "$API_KEY" --prefix "$HERALD_PREFIX" --max-connections 20000 \
            --node-id "herald-$i" --drain-grace 5 >"$OUT_DIR/herald-$i.log" 2>&1 &
        pid=$!
        PIDS+=("$pid")
        wait_http "http://127.0.0.1:$port/readyz" "$pid" "$OUT_DIR/herald-$i.log" "herald-$i"
        H_PORTS+=("$port") H_PIDS+=("$pid")
        log "herald-$i pid $pid port $port"
    done
}
start_socketio() {
    local i port pid
    S_PORTS=() S_PIDS=()
    for i in $(seq 1 $NODES); do
        port=$(free_port)
        node --expose-gc bench/socketio-server.js --port "$port" --redis-url "$REDIS_URL" \
            --prefix "$SIO_PREFIX" >"$OUT_DIR/socketio-$i.log" 2>&1 &
        pid=$!
        PIDS+=("$pid")
        wait_http "http://127.0.0.1:$port/healthz" "$pid" "$OUT_DIR/socketio-$i.log" "socketio-$i"
        S_PORTS+=("$port") S_PIDS+=("$pid")
        log "socketio-$i pid $pid port $port ($(head -1 "$OUT_DIR/socketio-$i.log"))"
    done
}
start_floor() {
    local i port pid
    F_PORTS=() F_PIDS=()
    for i in $(seq 1 $NODES); do
        port=$(free_port)
        HERALD_FLOOR_JWT_SECRET="$JWT_SECRET" "$FLOOR" --listen "127.0.0.1:$port" \
            --redis-url "$REDIS_URL" --prefix "$FLOOR_PREFIX" >"$OUT_DIR/floor-$i.log" 2>&1 &
        pid=$!
        PIDS+=("$pid")
        wait_http "http://127.0.0.1:$port/readyz" "$pid" "$OUT_DIR/floor-$i.log" "floor-$i"
        F_PORTS+=("$port") F_PIDS+=("$pid")
        log "floor-$i pid $pid port $port"
    done
}
# One Sockudo node: its own directory and config file, a clean environment (it reads
# ./config/ and many environment variables), every Redis setting pointed at the bench's
# Redis (its defaults point at 127.0.0.1:6379, which must never be used), the queue off,
# the rate limiter off (by default it allows 20 WebSocket connects and 100 API calls per IP
# per minute), fallback_to_local off (a node that misses Redis would silently run alone),
# a Redis cache (a clustered node with idempotency refuses a memory cache) and
# activity_timeout 25 (its default 120 s would ping far less often than herald's 25 s).
sockudo_config() { # port metrics_port node
    cat <<EOF
debug = false
host = "127.0.0.1"
port = $1
mode = "production"
shutdown_grace_period = 2
max_connections = 0
activity_timeout = 25

[instance]
process_id = "sockudo-bench-$3"

[logging]
colors_enabled = false
include_target = true

[adapter]
driver = "redis"
fallback_to_local = false

[adapter.redis]
prefix = "$SOCKUDO_PREFIX:adapter"

[cache]
driver = "redis"

[cache.redis]
prefix = "$SOCKUDO_PREFIX:cache"

[queue]
driver = "none"

[rate_limiter]
enabled = false
driver = "redis"

[rate_limiter.redis]
prefix = "$SOCKUDO_PREFIX:rl"

[metrics]
enabled = true
host = "127.0.0.1"
port = $2

[database.redis]
host = "127.0.0.1"
port = $REDIS_PORT
db = 0
key_prefix = "$SOCKUDO_PREFIX:"

[app_manager]
driver = "memory"

[[app_manager.array.apps]]
id = "$SOCKUDO_APP_ID"
key = "$SOCKUDO_APP_KEY"
secret = "$SOCKUDO_APP_SECRET"
enabled = true

[app_manager.array.apps.policy.limits]
max_connections = 100000
max_client_events_per_second = 1000
EOF
}
start_sockudo() {
    local i port mport pid dir
    K_PORTS=() K_PIDS=()
    for i in $(seq 1 $NODES); do
        port=$(free_port)
        mport=$(free_port)
        dir="$OUT_DIR/sockudo-$i"
        mkdir -p "$dir/config"
        sockudo_config "$port" "$mport" "$i" >"$dir/config/config.toml"
        (cd "$dir" && exec env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$dir" RUST_LOG=warn \
            "$SOCKUDO" --config config/config.toml) >"$OUT_DIR/sockudo-$i.log" 2>&1 &
        pid=$!
        PIDS+=("$pid")
        wait_http "http://127.0.0.1:$port/up/$SOCKUDO_APP_ID" "$pid" "$OUT_DIR/sockudo-$i.log" "sockudo-$i"
        K_PORTS+=("$port") K_PIDS+=("$pid")
        log "sockudo-$i pid $pid port $port"
    done
}
[[ " $SYSTEMS " == *" herald "* ]] && start_herald
[[ " $SYSTEMS " == *" socketio "* ]] && start_socketio
[[ " $SYSTEMS " == *" floor "* ]] && start_floor
[[ " $SYSTEMS " == *" sockudo "* ]] && start_sockudo
sleep 2

# Fresh server processes for a system (before an idle attempt: memory freed by earlier
# sessions would otherwise be reused and hide the per-session cost).
restart_system() {
    local p
    case $1 in
    herald)
        for p in "${H_PIDS[@]}"; do stop_pid "$p"; done
        start_herald
        ;;
    floor)
        for p in "${F_PIDS[@]}"; do stop_pid "$p"; done
        start_floor
        ;;
    sockudo)
        for p in "${K_PIDS[@]}"; do stop_pid "$p"; done
        start_sockudo
        ;;
    *)
        for p in "${S_PIDS[@]}"; do stop_pid "$p"; done
        start_socketio
        ;;
    esac
    sleep 2
}

# POST /gc to every Socket.IO node (full GC; node --expose-gc); prints their answers.
gc_socketio() {
    local port
    for port in "${S_PORTS[@]}"; do
        curl -fsS -XPOST "http://127.0.0.1:$port/gc" || echo '{"error":"gc failed"}'
        echo
    done
}

server_pids() {
    case $1 in
    herald | herald-http) echo "${H_PIDS[@]}" ;;
    floor) echo "${F_PIDS[@]}" ;;
    sockudo) echo "${K_PIDS[@]}" ;;
    *) echo "${S_PIDS[@]}" ;;
    esac
}
# The Redis key prefix of a system that speaks herald's protocol.
prefix_of() { if [ "$1" = floor ]; then echo "$FLOOR_PREFIX"; else echo "$HERALD_PREFIX"; fi; }
targets() {
    local p ports=() out=()
    case $1 in
    herald | herald-http) ports=("${H_PORTS[@]}") ;;
    floor) ports=("${F_PORTS[@]}") ;;
    sockudo) ports=("${K_PORTS[@]}") ;;
    *) ports=("${S_PORTS[@]}") ;;
    esac
    for p in "${ports[@]}"; do out+=(--target "ws://127.0.0.1:$p"); done
    echo "${out[@]}"
}
OUR_PIDS() { echo "$REDIS_PID ${H_PIDS[*]} ${S_PIDS[*]} ${F_PIDS[*]} ${K_PIDS[*]}"; }

# ---------------------------------------------------------------- quiet machine
# CPU (in cores) used over one second by everything except the processes started here.
foreign_cpu() {
    local t0 t1 o0=0 o1=0 p
    t0=$(awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat)
    for p in $(OUR_PIDS); do o0=$((o0 + $(cpu_ticks "$p"))); done
    sleep 1
    t1=$(awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat)
    for p in $(OUR_PIDS); do o1=$((o1 + $(cpu_ticks "$p"))); done
    awk -v a=$((t1 - t0)) -v b=$((o1 - o0)) 'BEGIN { v = (a - b) / 100; if (v < 0) v = 0; printf "%.2f", v }'
}
wait_quiet() {
    local waited=0 c
    while :; do
        c=$(foreign_cpu)
        if awk -v c="$c" -v m="$QUIET_CPU" 'BEGIN { exit !(c < m) }'; then return 0; fi
        if [ "$waited" -ge "$QUIET_WAIT" ]; then
            log "machine still busy (${c} cores used by other processes); running anyway"
            return 0
        fi
        [ $((waited % 15)) = 0 ] && log "waiting for a quiet machine (${c} cores used by other processes)"
        sleep 2
        waited=$((waited + 3))
    done
}

# ---------------------------------------------------------------- one phase
# run_phase <name> <system> <scenario> [<mode> <rate>]
#   scenario: idle | connect | fanout | broadcast
run_phase() {
    local name=$1 sys=$2 scenario=$3 rate=${4:-0}
    local json="$OUT_DIR/$name-$sys.json" meta="$OUT_DIR/$name-$sys.meta.json"
    local attempt=0 noisy
    if ! has_scenario "$scenario"; then
        log "herald-bench has no '$scenario' scenario: skipping $name for $sys"
        echo "{\"skipped\":\"herald-bench has no $scenario scenario\"}" >"$meta"
        return 0
    fi
    while :; do
        attempt=$((attempt + 1))
        [ "$scenario" = idle ] && restart_system "$sys"
        wait_quiet
        run_once "$name" "$sys" "$scenario" "$rate" "$attempt" || {
            log "$name/$sys attempt $attempt failed (see $OUT_DIR/$name-$sys.log)"
        }
        noisy=$(jq -r '[.. | objects | select(has("noisy")) | .noisy] | if length == 0 then "unknown" else any end' "$json" 2>/dev/null || echo missing)
        if [ "$noisy" = true ] && [ "$attempt" -le "$NOISY_RETRIES" ]; then
            log "$name/$sys was noisy (other work on the machine); again"
            mv "$json" "$OUT_DIR/$name-$sys.noisy-$attempt.json"
            sleep 5
            continue
        fi
        break
    done
    jq --argjson a "$attempt" '. + {attempts: $a}' "$meta" >"$meta.tmp" && mv "$meta.tmp" "$meta"
}

run_once() {
    local name=$1 sys=$2 scenario=$3 rate=$4 attempt=$5 dur=${PHASE_DURATION:-$DURATION}
    local json="$OUT_DIR/$name-$sys.json" meta="$OUT_DIR/$name-$sys.meta.json"
    local logf="$OUT_DIR/$name-$sys.log" ready="$OUT_DIR/$name-$sys.ready"
    local expect="$OUT_DIR/$name-$sys.expect.json" pstats="$OUT_DIR/$name-$sys.producer.json"
    local spids proto pidlist nproc k n first args=() bench_pids=() readies=() rc=0
    read -ra spids <<<"$(server_pids "$sys")"
    pidlist=$(IFS=,; echo "${spids[*]}")
    case $sys in
    socketio) proto=socketio ;;
    sockudo) proto=pusher ;;
    *) proto=herald ;;
    esac
    rm -f "$json" "$ready"* "$expect" "$pstats"

    read -ra args <<<"$(targets "$sys")"
    args+=(--protocol "$proto" --source-ips "$SOURCE_IPS" --pids "$pidlist" --redis-pid "$REDIS_PID")
    [ "$sys" = sockudo ] && args+=(--pusher-app-id "$SOCKUDO_APP_ID" --pusher-key "$SOCKUDO_APP_KEY")
    has_flag "$scenario" "--secret" && args+=(--secret "$JWT_SECRET")
    case $scenario in
    idle) args+=(--hold "$IDLE_HOLD") ;;
    connect) ;;
    fanout | broadcast)
        local drain=$DRAIN
        [ "$scenario" = broadcast ] && drain=$BROADCAST_DRAIN
        args+=(--duration "$dur" --payload-bytes "$PAYLOAD_BYTES" --drain "$drain")
        ;;
    esac
    # Producer arguments of bench process k (of nproc). Socket.IO: producer.js publishes for
    # every process (external). herald: herald-bench publishes. --hold 0: herald's measured
    # phase starts when the sessions are connected, as it does with an external producer, so
    # both include the same settling time. With several bench processes a herald fanout is
    # split (each process publishes rate/nproc to its own users), and a herald broadcast is
    # published by process 1 only; the others read its count from $expect (written here).
    producer_args() {
        local k=$1
        case $scenario in fanout | broadcast) ;; *) return 0 ;; esac
        if [ "$sys" = socketio ]; then
            echo --rate "$rate" --producer external --expect-file "$expect"
        elif [ "$scenario" = broadcast ] && [ "$k" -gt 1 ]; then
            echo --rate "$rate" --producer external --expect-file "$expect"
        else
            local r
            r=$(awk -v r="$rate" -v n="$([ "$scenario" = fanout ] && echo "$nproc" || echo 1)" \
                'BEGIN { print r / n }')
            case $sys in
            sockudo) echo --rate "$r" --hold 0 --producer pusher-api ;;
            herald-http) echo --rate "$r" --hold 0 --producer http ;;
            *) echo --rate "$r" --hold 0 --producer redis --redis-url "$REDIS_URL" --prefix "$(prefix_of "$sys")" ;;
            esac
        fi
    }

    # Socket.IO idle phase: a full GC first, so the baseline holds no start-up garbage.
    [ "$sys" = socketio ] && [ "$scenario" = idle ] && gc_socketio >"$OUT_DIR/$name-$sys.gc-before.json" && sleep 1
    # RSS and CPU of every server pid, measured here too (independent of the bench's JSON).
    local p rss0=() cpu0=() rss_conn=() rss1=() cpu1=() rss_stats=() t0 t1 tconn a mean min max
    local sys0=() sys1=()
    for p in "${spids[@]}"; do
        rss0+=("$(rss_kib "$p")") cpu0+=("$(cpu_ticks "$p")") sys0+=("$(sys_ticks "$p")")
    done
    local rcpu0 rcpu1
    rcpu0=$(cpu_ticks "$REDIS_PID")
    t0=$(date +%s.%N)

    nproc=$(((SESSIONS + PER_PROCESS - 1) / PER_PROCESS))
    local go="$OUT_DIR/.go-$name-$sys" pidsfile="$OUT_DIR/.pids-$name-$sys"
    local prod_go="$ready" prod_pid=""
    rm -f "$go" "$pidsfile"
    [ "$nproc" -gt 1 ] && prod_go="$OUT_DIR/.go-producer-$name-$sys" && rm -f "$prod_go"

    # Socket.IO phases with messages: the producer connects first and starts publishing
    # as soon as every session is connected (its --start-file appears).
    if [ "$sys" = socketio ] && { [ "$scenario" = fanout ] || [ "$scenario" = broadcast ]; }; then
        node bench/producer.js --redis-url "$REDIS_URL" --prefix "$SIO_PREFIX" --mode "$scenario" \
            --users "$SESSIONS" --rate "$rate" --duration "$dur" \
            --payload-bytes "$PAYLOAD_BYTES" --expect-file "$expect" --stats-file "$pstats" \
            --start-file "$prod_go" >>"$OUT_DIR/$name-$sys.producer.log" 2>&1 &
        prod_pid=$!
        PIDS+=("$prod_pid")
    fi

    # Each bench process waits for $go, then becomes herald-bench (exec keeps the pid), so
    # every one of them can be told the pids of the others and of the producer: their CPU
    # is the experiment's, not noise.
    first=0
    for k in $(seq 1 "$nproc"); do
        n=$(((SESSIONS - first + nproc - k) / (nproc - k + 1)))
        local jk=$json rk=$ready
        [ "$nproc" -gt 1 ] && jk="$OUT_DIR/$name-$sys.part$k.json" rk="$ready.$k"
        local pargs=()
        read -ra pargs <<<"$(producer_args "$k")"
        log "$name/$sys: herald-bench $scenario --sessions $n --first-user $first (attempt $attempt)"
        # shellcheck disable=SC2016 # expanded by the inner bash
        bash -c 'while [ ! -e "$1" ]; do sleep 0.05; done; k=$(cat "$2"); shift 2; exec "$@" --known-pids "$k"' \
            _ "$go" "$pidsfile" "$BENCH" "$scenario" "${args[@]}" "${pargs[@]}" --sessions "$n" --first-user "$first" \
            --concurrency "$CONCURRENCY" --ready-file "$rk" --json "$jk" >>"$logf" 2>&1 &
        bench_pids+=($!)
        PIDS+=($!)
        readies+=("$rk")
        first=$((first + n))
    done
    # The other systems' idle nodes belong to the experiment too.
    local others="" o
    for o in $SYSTEMS; do
        # herald-http measures the herald nodes: they are not "other" nodes of herald.
        [ "$o" = "$sys" ] || [ "$(server_pids "$o")" = "$(server_pids "$sys")" ] || others+="$(server_pids "$o") "
    done
    others=$(echo $others)
    (IFS=,; echo "${bench_pids[*]}${prod_pid:+,$prod_pid}${others:+,${others// /,}}") >"$pidsfile"
    touch "$go"

    # Wait until every bench process has connected its sessions (or died).
    local all f alive deadline=$((SECONDS + 300))
    while :; do
        all=1 alive=0
        for f in "${readies[@]}"; do [ -s "$f" ] || all=0; done
        for p in "${bench_pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ $all = 1 ] && break
        [ $alive = 0 ] && break
        [ $SECONDS -gt $deadline ] && { log "$name/$sys: sessions not connected after 300 s"; break; }
        sleep 0.05
    done
    tconn=$(date +%s.%N)
    for p in "${spids[@]}"; do rss_conn+=("$(rss_kib "$p")"); done
    if [ -n "$prod_pid" ]; then
        if [ $all = 1 ]; then
            [ "$nproc" -gt 1 ] && touch "$prod_go"
        else
            stop_pid "$prod_pid"
            prod_pid=""
        fi
    fi

    local rss_samples=()
    if [ "$scenario" = idle ] && [ $all = 1 ]; then
        # RSS once a second over the second half of the hold, while every session is still
        # open; the mean is the result (a garbage-collected heap goes up and down between
        # collections), min and max are kept in the meta file.
        local i s last=$((IDLE_HOLD > 4 ? IDLE_HOLD - 3 : 1)) samples
        for i in $(seq 1 "$last"); do
            sleep 1
            [ $((2 * i)) -ge "$IDLE_HOLD" ] || [ "$i" = "$last" ] || continue
            samples=""
            for p in "${spids[@]}"; do samples+="$(rss_kib "$p") "; done
            rss_samples+=("$samples")
        done
        for i in "${!spids[@]}"; do
            s=$(for samples in "${rss_samples[@]}"; do read -ra a <<<"$samples"; echo "${a[$i]}"; done |
                awk '{ n++; t += $1; if (min == "" || $1 < min) min = $1; if ($1 > max) max = $1 }
                     END { printf "%d %d %d %d", t / n, min, max, n }')
            read -r mean min max n <<<"$s"
            rss1+=("$mean")
            rss_stats+=("\"rss_hold_min_kib\":$min,\"rss_hold_max_kib\":$max,\"rss_hold_samples\":$n,")
        done
        if [ "$sys" = socketio ]; then
            # And after a full GC, still during the hold: the peer at its leanest.
            gc_socketio >"$OUT_DIR/$name-$sys.gc.json"
            sleep 1
            for i in "${!spids[@]}"; do
                rss_stats[i]+="\"rss_after_gc_kib\":$(rss_kib "${spids[$i]}"),"
            done
        fi
    fi
    if [ -n "$prod_pid" ]; then
        wait "$prod_pid" || { rc=$?; log "$name/$sys: producer exited with $rc"; }
        forget_pid "$prod_pid"
    fi
    for p in "${bench_pids[@]}"; do
        wait "$p" || { rc=$?; log "$name/$sys: herald-bench exited with $rc"; }
        forget_pid "$p"
        if [ "$sys" != socketio ] && [ "$scenario" = broadcast ] && [ "$nproc" -gt 1 ] && [ ! -e "$expect" ]; then
            # Process 1 published; tell the others how much.
            jq -c '{sent: (.result.produced.sent // 0)}' "$OUT_DIR/$name-$sys.part1.json" >"$expect.tmp" 2>/dev/null ||
                echo '{"sent":0}' >"$expect.tmp"
            mv "$expect.tmp" "$expect"
        fi
    done
    t1=$(date +%s.%N)
    [ "$scenario" = idle ] || for p in "${spids[@]}"; do rss1+=("$(rss_kib "$p")"); done
    for p in "${spids[@]}"; do cpu1+=("$(cpu_ticks "$p")") sys1+=("$(sys_ticks "$p")"); done
    rcpu1=$(cpu_ticks "$REDIS_PID")

    if [ "$nproc" -gt 1 ]; then
        jq -s '{parts: ., scenario: .[0].scenario, protocol: .[0].protocol,
                noisy: (map(.noisy == true) | any)}' "$OUT_DIR/$name-$sys".part*.json >"$json" || true
    fi

    {
        printf '{"system":"%s","phase":"%s","scenario":"%s","rate":%s,"sessions":%s,' \
            "$sys" "$name" "$scenario" "$rate" "$SESSIONS"
        printf '"t_start":%s,"t_connected":%s,"t_end":%s,"redis_cpu_s":%s,"servers":[' \
            "$t0" "$tconn" "$t1" "$(awk -v a="$rcpu0" -v b="$rcpu1" 'BEGIN{print (b-a)/100}')"
        local i sep=""
        for i in "${!spids[@]}"; do
            printf '%s{"pid":%s,"rss_before_kib":%s,"rss_connected_kib":%s,"rss_after_kib":%s,%s"cpu_s":%s,"cpu_sys_s":%s}' \
                "$sep" "${spids[$i]}" "${rss0[$i]}" "${rss_conn[$i]:-0}" "${rss1[$i]:-0}" "${rss_stats[$i]:-}" \
                "$(awk -v a="${cpu0[$i]}" -v b="${cpu1[$i]}" 'BEGIN{print (b-a)/100}')" \
                "$(awk -v a="${sys0[$i]}" -v b="${sys1[$i]}" 'BEGIN{print (b-a)/100}')"
            sep=","
        done
        printf '],"producer":%s,"exit":%s}\n' "$(cat "$pstats" 2>/dev/null || echo null)" "$rc"
    } >"$meta"
    return "$rc"
}

# ---------------------------------------------------------------- the run
log "sessions: $SESSIONS ($SESSIONS_PER_NODE per node), duration ${DURATION}s, output $OUT_DIR"
warmed=0
for phase in $PHASES; do
    # Before the first message phase: an unreported warm-up of every system (fanout at
    # WARMUP_RATE msg/s for WARMUP s), so that no measured phase pays for a JIT's first
    # compilations or a first large allocation: servers in production run warm.
    if [ "$warmed" = 0 ] && [ "${WARMUP:-5}" != 0 ] && { [ "$phase" = fanout ] || [ "$phase" = broadcast ]; }; then
        warmed=1
        for sys in $SYSTEMS; do
            [ "$sys" = herald-http ] && continue # the same nodes as herald, warmed with it
            PHASE_DURATION=${WARMUP:-5} run_once warmup "$sys" fanout "${WARMUP_RATE:-1000}" 1 ||
                log "warm-up of $sys failed (see $OUT_DIR/warmup-$sys.log)"
        done
    fi
    case $phase in
    idle | connect)
        # herald-http differs from herald only in its producer: no idle or connect phase.
        for sys in $SYSTEMS; do
            [ "$sys" = herald-http ] || run_phase "$phase" "$sys" "$phase"
        done
        ;;
    fanout)
        for r in $FANOUT_RATES; do
            for sys in $SYSTEMS; do run_phase "fanout-$r" "$sys" fanout "$r"; done
        done
        ;;
    broadcast)
        for r in $BROADCAST_RATES; do
            for sys in $SYSTEMS; do run_phase "broadcast-$r" "$sys" broadcast "$r"; done
        done
        ;;
    *)
        log "unknown phase $phase"
        exit 2
        ;;
    esac
done

{
    echo "machine: nproc $(nproc), $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo), $(uname -r), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "herald: $(git describe --always --dirty 2>/dev/null || echo unknown), node $(node --version), socket.io $(node -p 'require("./bench/node_modules/socket.io/package.json").version'), redis $(redis-server --version | sed 's/.* v=\([^ ]*\).*/\1/')"
    if [[ " $SYSTEMS " == *" sockudo "* ]]; then
        echo "sockudo: $("$SOCKUDO" --version 2>/dev/null | head -1 || echo "version unknown") ($SOCKUDO)"
    fi
    if [ "$(wc -l <"$OUT_DIR/tree-status.txt")" -gt 1 ]; then
        echo "note: uncommitted changes under src/ were built (see tree-status.txt)"
    fi
    # HERALD_BIN and HERALD_HTTP_ROW are this script's knobs, not herald settings.
    node_env=$(env | grep '^HERALD_' | grep -v -e SECRET -e API_KEY -e '^HERALD_BIN=' -e '^HERALD_HTTP_ROW=' | tr '\n' ' ' || true)
    script_env=$(env | grep -e '^HERALD_HTTP_ROW=' -e '^SKIP_BUILD=' -e '^PHASES=' -e '^FANOUT_RATES=' -e '^BROADCAST_RATES=' | tr '\n' ' ' || true)
    [ -z "$node_env" ] || echo "herald node settings from the environment: $node_env"
    echo "command: ${node_env}${script_env}SESSIONS_PER_NODE=$SESSIONS_PER_NODE DURATION=$DURATION IDLE_HOLD=$IDLE_HOLD CONCURRENCY=$CONCURRENCY PAYLOAD_BYTES=$PAYLOAD_BYTES DRAIN=$DRAIN BROADCAST_DRAIN=$BROADCAST_DRAIN WARMUP=${WARMUP:-5} NOISY_RETRIES=$NOISY_RETRIES QUIET_WAIT=$QUIET_WAIT SYSTEMS=\"$SYSTEMS\" bench/compare.sh"
    echo
    node bench/compare-report.js "$OUT_DIR" "$FANOUT_RATES" "$BROADCAST_RATES"
} | tee "$OUT_DIR/table.md"
log "results: $OUT_DIR"
