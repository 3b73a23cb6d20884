#!/usr/bin/env bash
# Delivery benchmarks: connect, fanout, broadcast, topic and slow-consumer scenarios against
# NODES herald nodes sharing one private redis-server, with herald-bench.
#
# Builds release binaries, starts a private redis-server (never on 6379) and $NODES nodes
# on free loopback ports, then runs each phase in $PHASES with one herald-bench process
# holding NODES x SESSIONS_PER_NODE sessions (spread round-robin over the nodes, from source
# addresses $SOURCE_IPS). Before each phase it waits for a quiet machine; a phase the bench
# flags as noisy (other work on the machine) is run again, up to NOISY_RETRIES times.
# Everything started here is stopped on exit.
#
# Knobs (environment):
#   NODES=2  SESSIONS_PER_NODE=4000
#   PHASES="connect fanout broadcast topic slow"
#   FANOUT_RATES="2000 5000"  BROADCAST_RATES="1"  TOPIC_RATES="1000"  TOPICS=50
#   SLOW_RATE=1000 (healthy fanout rate during slow)  SLOW_SHARE=0.1  SLOW_FLOOD_RATE=2000
#   DURATION=20  DRAIN=3  PAYLOAD_BYTES=100  PRODUCER=redis (or http)
#   CONCURRENCY=100  SOURCE_IPS=127.0.0.2-127.0.0.20  NOISY_RETRIES=2
#   OUT_DIR=target/bench-fanout/<utc time>   JSON results, tables and logs
#   HERALD_*  any node setting, passed to every node as is; NODE_ENV="VAR=value ..." too
#
# Usage: scripts/bench-fanout.sh        (from anywhere inside the repository)
set -euo pipefail

cd "$(dirname "$0")/.."

NODES=${NODES:-2}
SESSIONS_PER_NODE=${SESSIONS_PER_NODE:-4000}
PHASES=${PHASES:-connect fanout broadcast topic slow}
FANOUT_RATES=${FANOUT_RATES:-2000 5000}
BROADCAST_RATES=${BROADCAST_RATES:-1}
TOPIC_RATES=${TOPIC_RATES:-1000}
TOPICS=${TOPICS:-50}
SLOW_RATE=${SLOW_RATE:-1000}
SLOW_SHARE=${SLOW_SHARE:-0.1}
SLOW_FLOOD_RATE=${SLOW_FLOOD_RATE:-2000}
DURATION=${DURATION:-20}
DRAIN=${DRAIN:-3}
PAYLOAD_BYTES=${PAYLOAD_BYTES:-100}
PRODUCER=${PRODUCER:-redis}
CONCURRENCY=${CONCURRENCY:-100}
SOURCE_IPS=${SOURCE_IPS:-127.0.0.2-127.0.0.20}
NOISY_RETRIES=${NOISY_RETRIES:-2}
OUT_DIR=${OUT_DIR:-target/bench-fanout/$(date -u +%Y%m%dT%H%M%SZ)}
BENCH_NAME=bench-fanout
SESSIONS=$((NODES * SESSIONS_PER_NODE))


mkdir -p "$OUT_DIR"
# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh

if [ "$SESSIONS" -gt 18000 ]; then
    log "$SESSIONS sessions do not fit in one bench process (18,000); lower SESSIONS_PER_NODE"
    exit 2
fi

new_secrets
export HERALD_BENCH_API_KEY="$API_KEY"
build_release

start_redis
NODE_PIDS=()
TARGETS=()
METRICS=()
for k in $(seq 1 "$NODES"); do
    start_node "node-$k" --max-connections $((SESSIONS_PER_NODE * 2 + 1000))
    NODE_PIDS+=("$NODE_PID")
    TARGETS+=(--target "ws://127.0.0.1:$NODE_PORT")
    METRICS+=("http://127.0.0.1:$NODE_PORT/metrics")
done
PIDLIST=$(IFS=,; echo "${NODE_PIDS[*]}")
METRICLIST=$(IFS=,; echo "${METRICS[*]}")

COMMON=("${TARGETS[@]}" --sessions "$SESSIONS" --source-ips "$SOURCE_IPS"
    --concurrency "$CONCURRENCY" --pids "$PIDLIST" --redis-pid "$REDIS_PID")
PRODUCE=(--producer "$PRODUCER" --redis-url "$REDIS_URL" --duration "$DURATION"
    --drain "$DRAIN" --payload-bytes "$PAYLOAD_BYTES")

# run_phase <name> <herald-bench args...>: runs until not noisy (or out of retries).
run_phase() {
    local name=$1 attempt=0 noisy
    shift
    while :; do
        attempt=$((attempt + 1))
        wait_quiet
        log "$name (attempt $attempt): herald-bench $*"
        echo "herald-bench $*" >"$OUT_DIR/$name.cmd"
        "$BENCH" "$@" --json "$OUT_DIR/$name.json" >"$OUT_DIR/$name.txt" 2>"$OUT_DIR/$name.log" ||
            log "$name: herald-bench exited with $? (see $OUT_DIR/$name.log)"
        cat "$OUT_DIR/$name.txt"
        noisy=$(jq -r '.noisy' "$OUT_DIR/$name.json" 2>/dev/null || echo missing)
        if [ "$noisy" = true ] && [ "$attempt" -le "$NOISY_RETRIES" ]; then
            log "$name was noisy (other work on the machine); again"
            mv "$OUT_DIR/$name.json" "$OUT_DIR/$name.noisy-$attempt.json"
            mv "$OUT_DIR/$name.txt" "$OUT_DIR/$name.noisy-$attempt.txt"
            continue
        fi
        break
    done
    # Let the nodes close the sessions and drop their subscriptions before the next phase.
    sleep 3
}

for phase in $PHASES; do
    case $phase in
    connect)
        run_phase connect connect "${COMMON[@]}"
        ;;
    fanout)
        for r in $FANOUT_RATES; do
            run_phase "fanout-$r" fanout "${COMMON[@]}" "${PRODUCE[@]}" --rate "$r"
        done
        ;;
    broadcast)
        for r in $BROADCAST_RATES; do
            run_phase "broadcast-$r" broadcast "${COMMON[@]}" "${PRODUCE[@]}" --rate "$r"
        done
        ;;
    topic)
        for r in $TOPIC_RATES; do
            run_phase "topic-$r" topic "${COMMON[@]}" "${PRODUCE[@]}" --rate "$r" --topics "$TOPICS"
        done
        ;;
    slow)
        run_phase "slow-$SLOW_RATE" slow "${COMMON[@]}" "${PRODUCE[@]}" --rate "$SLOW_RATE" \
            --slow-share "$SLOW_SHARE" --slow-rate "$SLOW_FLOOD_RATE" --metrics-url "$METRICLIST"
        ;;
    *)
        log "unknown phase $phase (connect fanout broadcast topic slow)"
        exit 2
        ;;
    esac
done

echo
machine_summary
echo "nodes:  $NODES x $SESSIONS_PER_NODE sessions, one redis-server; node settings from the environment: $(env | grep '^HERALD_' | grep -v -e SECRET -e API_KEY -e BENCH | tr '\n' ' ')${NODE_ENV:-}"
echo
echo "== summary =="
printf '%-16s %9s %9s %9s %6s %5s %5s %10s %24s %10s %10s %7s\n' phase connected delivered expected lost dup ooo deliv/s "latency ms p50/p99/max" "srv s/100k" "rds s/100k" noisy
for f in "$OUT_DIR"/*.json; do
    case $f in *noisy-*) continue ;; esac
    jq -r --arg n "$(basename "$f" .json)" '[$n, .connected, .delivered, .expected, .lost, .duplicated,
        .out_of_order, (.delivered_per_s | floor),
        "\(.latency_ms.p50)/\(.latency_ms.p99)/\(.latency_ms.max)",
        (.cpu_per_100k_delivered_server // "-"), (.cpu_per_100k_delivered_redis // "-"), .noisy] | @tsv' "$f" |
        awk -F'\t' '{printf "%-16s %9s %9s %9s %6s %5s %5s %10s %24s %10s %10s %7s\n", $1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12}'
done
echo "results: $OUT_DIR"
