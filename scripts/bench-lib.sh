# shellcheck shell=bash
# Shared by the scripts/bench-*.sh scripts (source it; it does nothing by itself).
#
# Provides: log, new_secrets, build_release, free_port, rss_kib, cpu_ticks, start_redis,
# start_node, stop_pid, wait_quiet, machine_summary, and an EXIT trap that stops every process started through
# these helpers (and only those: each is stopped by its own PID).
#
# Expects OUT_DIR and BENCH_NAME to be set by the caller.

PIDS=()

bench_cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}
trap bench_cleanup EXIT
trap 'exit 130' INT TERM

log() { printf '[%s] %s\n' "${BENCH_NAME:-bench}" "$*" >&2; }

# A free TCP port on 127.0.0.1 below the ephemeral range (the bench uses those as sources);
# never 6379.
# Fresh credentials for this run: JWT_SECRET (also exported as HERALD_BENCH_SECRET, so
# herald-bench mints tokens with it) and API_KEY. start_node passes both to every node.
new_secrets() {
    JWT_SECRET="bench-jwt-secret-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
    API_KEY="bench-api-key-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
    export HERALD_BENCH_SECRET="$JWT_SECRET"
}

# Builds the release binaries of both workspace crates (herald, and herald-bench from
# bench/herald-bench); sets HERALD, BENCH and BUILT_FROM, and raises the open-file limit to
# the hard limit (the node and the bench hold one descriptor per session).
# Two cargo runs on purpose: built together, Cargo would unify the features of shared
# dependencies and compile the bench's HTTP client features (hyper "client", hyper-util
# "client-legacy") into the measured herald. Built alone, target/release/herald is the
# binary a herald-only build (Dockerfile, local-cluster.sh) gives.
build_release() {
    log "building release binaries (herald, then herald-bench)"
    cargo build --release --bins -p herald
    cargo build --release --bins -p herald-bench
    BUILT_FROM=$(git describe --always --dirty 2>/dev/null || echo unknown)
    HERALD=target/release/herald
    BENCH=target/release/herald-bench
    ulimit -n "$(ulimit -Hn)"
}

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

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
# utime + stime in clock ticks (USER_HZ = 100); the comm field may hold spaces.
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }

# Stops one process started here and forgets it, so cleanup never signals a reused PID.
stop_pid() {
    local pid=$1 keep=() p
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for p in "${PIDS[@]}"; do [ "$p" = "$pid" ] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

# start_redis: a private redis-server on a free loopback port. Sets REDIS_PID, REDIS_PORT,
# REDIS_URL.
REDIS_PID=""
REDIS_PORT=""
REDIS_URL=""
start_redis() {
    REDIS_PORT=$(free_port)
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        --maxclients 1000 --daemonize no --logfile "$OUT_DIR/redis.log" &
    REDIS_PID=$!
    PIDS+=("$REDIS_PID")
    for _ in $(seq 1 100); do
        if redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
            REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
            log "redis-server pid $REDIS_PID on port $REDIS_PORT"
            return 0
        fi
        sleep 0.1
    done
    log "redis-server did not start (see $OUT_DIR/redis.log)"
    return 1
}

# start_node <name> [herald flags...]: one release herald node on a free loopback port,
# with JWT_SECRET and API_KEY, against REDIS_URL when set. Sets NODE_PID and NODE_PORT and
# waits for /readyz.
NODE_PID=""
NODE_PORT=""
start_node() {
    local name=$1
    shift
    NODE_PORT=$(free_port)
    local args=(--listen "127.0.0.1:$NODE_PORT" --jwt-secret "$JWT_SECRET" --api-key "$API_KEY"
        --drain-grace 5 --node-id "$name")
    [ -n "$REDIS_URL" ] && args+=(--redis-url "$REDIS_URL")
    # shellcheck disable=SC2086 # NODE_ENV is a list of VAR=value words
    env -u HERALD_REDIS_URL HERALD_LOG="${HERALD_LOG:-warn}" ${NODE_ENV:-} \
        "$HERALD" "${args[@]}" "$@" >"$OUT_DIR/herald-$name.log" 2>&1 &
    NODE_PID=$!
    PIDS+=("$NODE_PID")
    for _ in $(seq 1 300); do
        if curl -fsS "http://127.0.0.1:$NODE_PORT/readyz" >/dev/null 2>&1; then
            log "herald $name pid $NODE_PID on port $NODE_PORT is ready"
            return 0
        fi
        if ! kill -0 "$NODE_PID" 2>/dev/null; then
            log "herald $name exited; log follows"
            cat "$OUT_DIR/herald-$name.log" >&2
            return 1
        fi
        sleep 0.1
    done
    log "herald $name did not become ready (see $OUT_DIR/herald-$name.log)"
    return 1
}

# Cores used over 3 s by processes other than the ones started here (and this shell).
foreign_cpu() {
    local t0 t1 o0=0 o1=0 p
    t0=$(awk '/^cpu / {print $2 + $3 + $4}' /proc/stat)
    for p in "${PIDS[@]}"; do o0=$((o0 + $(cpu_ticks "$p" 2>/dev/null || echo 0))); done
    sleep 3
    t1=$(awk '/^cpu / {print $2 + $3 + $4}' /proc/stat)
    for p in "${PIDS[@]}"; do o1=$((o1 + $(cpu_ticks "$p" 2>/dev/null || echo 0))); done
    awk -v a=$((t1 - t0)) -v b=$((o1 - o0)) 'BEGIN { v = (a - b) / 300; if (v < 0) v = 0; printf "%.2f", v }'
}

# wait_quiet: waits (up to QUIET_WAIT s, default 120) until other processes use less than
# QUIET_CPU cores (default 0.2), so measurements are not shared with unrelated work.
wait_quiet() {
    local waited=0 c
    while :; do
        c=$(foreign_cpu)
        if awk -v c="$c" -v m="${QUIET_CPU:-0.2}" 'BEGIN { exit !(c < m) }'; then return 0; fi
        if [ "$waited" -ge "${QUIET_WAIT:-120}" ]; then
            log "machine still busy (${c} cores used by other processes); running anyway (the report will say noisy)"
            return 0
        fi
        log "waiting for a quiet machine (${c} cores used by other processes)"
        sleep 2
        waited=$((waited + 5))
    done
}

machine_summary() {
    echo "== machine =="
    echo "nproc:  $(nproc)"
    echo "cpu:    $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
    echo "kernel: $(uname -r)"
    echo "date:   $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "herald: built from ${BUILT_FROM:-unknown} (tree now: $(git describe --always --dirty 2>/dev/null || echo unknown))"
    echo "redis:  $(redis-server --version | sed 's/.* v=\([^ ]*\).*/\1/')"
}
