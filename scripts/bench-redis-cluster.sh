#!/usr/bin/env bash
# Per-user fanout through a 3-shard Redis Cluster: how the pub/sub work spreads over the
# shards. Starts a private cluster (three masters, three replicas, ports below 55535 with
# their bus ports), NODES herald nodes with --redis-cluster, and one herald-bench fanout
# (SESSIONS sessions, one per user, spread round-robin over the nodes; the producer posts
# to the nodes' API, which SPUBLISHes on the user's sharded channel). For each Redis node
# it reads the CPU ticks (/proc/<pid>/stat) and the SPUBLISH/PUBLISH call counts
# (INFO commandstats) before and after the run, and prints them per shard.
#
# A second phase (CLASSIC=1, the default) publishes the same rate with classic PUBLISH
# straight to one master, on the same user channels: under Redis Cluster nodes do not
# deliver it (they count it, docs/redis.md), and the cluster bus copies every message to
# every node; its per-node CPU is the cost sharding avoids.
#
# Knobs: PROFILE=release (debug: use debug binaries; the Redis-side figures stay valid)
#        NODES=2 SESSIONS=4000 RATE=2000 DURATION=20 DRAIN=3 PAYLOAD_BYTES=100 CLASSIC=1
#        CONCURRENCY=100 SOURCE_IPS=127.0.0.2-127.0.0.20
#        OUT_DIR=target/bench-redis-cluster/<utc time>
# Usage: scripts/bench-redis-cluster.sh        (from anywhere inside the repository)
set -euo pipefail

cd "$(dirname "$0")/.."

NODES=${NODES:-2}
SESSIONS=${SESSIONS:-4000}
RATE=${RATE:-2000}
DURATION=${DURATION:-20}
DRAIN=${DRAIN:-3}
PAYLOAD_BYTES=${PAYLOAD_BYTES:-100}
CLASSIC=${CLASSIC:-1}
CONCURRENCY=${CONCURRENCY:-100}
SOURCE_IPS=${SOURCE_IPS:-127.0.0.2-127.0.0.20}
OUT_DIR=${OUT_DIR:-target/bench-redis-cluster/$(date -u +%Y%m%dT%H%M%SZ)}
BENCH_NAME=bench-redis-cluster
PREFIX=herald

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh

new_secrets
export HERALD_BENCH_API_KEY="$API_KEY"
if [ "${PROFILE:-release}" = debug ]; then
    # What is measured here is the Redis side (each shard's CPU and command counts), which
    # does not depend on how herald was built; debug binaries save a release build on a
    # busy machine. Node CPU figures from such a run mean nothing.
    [ -x target/debug/herald ] && [ -x target/debug/herald-bench ] ||
        cargo build --workspace --bins
    BUILT_FROM="$(git describe --always --dirty 2>/dev/null || echo unknown) (debug build)"
    HERALD=target/debug/herald
    BENCH=target/debug/herald-bench
    ulimit -n "$(ulimit -Hn)"
else
    build_release
fi

# Six cluster nodes: data ports 20000-22767 with bus ports 30000-32767, both below the
# ephemeral range the bench's own connections use.
CPORTS=()
CPIDS=()
while [ "${#CPORTS[@]}" -lt 6 ]; do
    p=$((20000 + RANDOM % 2768))
    [ -z "$(ss -Htln "sport = :$p" 2>/dev/null)" ] || continue
    [ -z "$(ss -Htln "sport = :$((p + 10000))" 2>/dev/null)" ] || continue
    case " ${CPORTS[*]} " in *" $p "*) continue ;; esac
    mkdir -p "$OUT_DIR/redis-$p"
    redis-server --port "$p" --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
        --cluster-enabled yes --cluster-config-file "$OUT_DIR/redis-$p/nodes.conf" \
        --cluster-node-timeout 2000 --dir "$OUT_DIR/redis-$p" --maxclients 1000 \
        --logfile "$OUT_DIR/redis-$p/redis.log" &
    CPIDS+=("$!")
    PIDS+=("$!")
    CPORTS+=("$p")
done
for p in "${CPORTS[@]}"; do
    for _ in $(seq 1 100); do
        redis-cli -p "$p" ping >/dev/null 2>&1 && break
        sleep 0.1
    done
done
redis-cli --cluster create $(printf '127.0.0.1:%s ' "${CPORTS[@]}") --cluster-replicas 1 \
    --cluster-yes </dev/null >"$OUT_DIR/cluster-create.log" 2>&1
for p in "${CPORTS[@]}"; do
    for _ in $(seq 1 200); do
        redis-cli -p "$p" cluster info 2>/dev/null | grep -q cluster_state:ok && break
        sleep 0.1
    done
done
log "cluster up on ${CPORTS[*]}"
SEEDS=$(printf '127.0.0.1:%s,' "${CPORTS[@]}")
SEEDS=${SEEDS%,}

REDIS_URL=""
NODE_PIDS=()
TARGETS=()
for k in $(seq 1 "$NODES"); do
    start_node "node-$k" --redis-cluster "$SEEDS" --prefix "$PREFIX" \
        --max-connections $((SESSIONS + 1000))
    NODE_PIDS+=("$NODE_PID")
    TARGETS+=(--target "ws://127.0.0.1:$NODE_PORT")
done
PIDLIST=$(IFS=,; echo "${NODE_PIDS[*]}")

# role <port>: master or slave.
role() { redis-cli -p "$1" role 2>/dev/null | head -1; }
# calls <port> <command>: INFO commandstats calls of one command.
calls() {
    redis-cli -p "$1" info commandstats 2>/dev/null |
        awk -F'[=,:]' -v c="cmdstat_$2" '$1 == c { print $3; found = 1 } END { if (!found) print 0 }'
}
# master_of <port>: the port of the master of the shard this node belongs to.
master_of() {
    if [ "$(role "$1")" = master ]; then echo "$1"; else redis-cli -p "$1" role | sed -n 3p; fi
}

declare -A T0 S0 P0
snapshot() {
    local i
    for i in "${!CPORTS[@]}"; do
        T0[$i]=$(cpu_ticks "${CPIDS[$i]}")
        S0[$i]=$(calls "${CPORTS[$i]}" spublish)
        P0[$i]=$(calls "${CPORTS[$i]}" publish)
    done
}
report() {
    local title=$1 secs=$2 i t
    echo "== $title =="
    printf '%-7s %-6s %-6s %12s %12s %12s\n' port role shard "CPU % core" "SPUBLISH" "PUBLISH"
    for i in "${!CPORTS[@]}"; do
        t=$(($(cpu_ticks "${CPIDS[$i]}") - T0[$i]))
        printf '%-7s %-6s %-6s %12s %12s %12s\n' "${CPORTS[$i]}" "$(role "${CPORTS[$i]}")" \
            "$(master_of "${CPORTS[$i]}")" \
            "$(awk -v t="$t" -v s="$secs" 'BEGIN { printf "%.1f", t / s }')" \
            "$(($(calls "${CPORTS[$i]}" spublish) - S0[$i]))" \
            "$(($(calls "${CPORTS[$i]}" publish) - P0[$i]))"
    done
}

{
    machine_summary
    echo "cluster: 3 masters + 3 replicas, node timeout 2 s; $NODES herald nodes; $SESSIONS sessions (one per user); $RATE msg/s for ${DURATION}s, payload $PAYLOAD_BYTES B"
    echo "other processes at start: $(foreign_cpu) cores"
} | tee "$OUT_DIR/summary.txt"

wait_quiet
snapshot
start=$(date +%s.%N)
"$BENCH" fanout "${TARGETS[@]}" --sessions "$SESSIONS" --source-ips "$SOURCE_IPS" \
    --concurrency "$CONCURRENCY" --pids "$PIDLIST" --producer http --prefix "$PREFIX" \
    --rate "$RATE" --duration "$DURATION" --drain "$DRAIN" --payload-bytes "$PAYLOAD_BYTES" \
    --json "$OUT_DIR/fanout.json" 2>&1 | tee "$OUT_DIR/fanout.txt"
secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
report "sharded fanout (SPUBLISH through the nodes' API), whole run ${secs}s incl. connect" "$secs" |
    tee -a "$OUT_DIR/summary.txt"

if [ "$CLASSIC" = 1 ]; then
    # The same users' channels, classic PUBLISH on one master: not delivered (the bench
    # reports them missing), but every cluster node receives every message over the bus.
    wait_quiet
    snapshot
    start=$(date +%s.%N)
    "$BENCH" fanout "${TARGETS[@]}" --sessions "$SESSIONS" --source-ips "$SOURCE_IPS" \
        --concurrency "$CONCURRENCY" --pids "$PIDLIST" --producer redis \
        --redis-url "redis://127.0.0.1:${CPORTS[0]}" --prefix "$PREFIX" \
        --rate "$RATE" --duration "$DURATION" --drain "$DRAIN" --payload-bytes "$PAYLOAD_BYTES" \
        --json "$OUT_DIR/classic.json" >"$OUT_DIR/classic.txt" 2>&1 || true
    secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
    report "classic PUBLISH on one master (not delivered; copied over the bus), whole run ${secs}s incl. connect" "$secs" |
        tee -a "$OUT_DIR/summary.txt"
fi
log "results in $OUT_DIR"
