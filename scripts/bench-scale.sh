#!/usr/bin/env bash
# Many sessions on one box (issue 14.5): NODES herald nodes on one private redis-server,
# PROCS herald-bench processes of PER_PROC sessions each (the open-file limit is 20,000 per
# process, so a process holds at most ~19,000), spread over every node and over SOURCE_IPS.
# Each bench process opens its sessions, holds them HOLD s (the idle measurement is taken
# here, once every process has connected), then publishes per-user messages to its own
# users at RATE/PROCS msg/s for DURATION s on Redis (total RATE msg/s), and reports
# latency and loss. Then every process opens its sessions again (herald-bench broadcast)
# and, once all of them are connected, BROADCASTS messages go to <prefix>:broadcast,
# BROADCAST_INTERVAL s apart (published by process 0; the others learn the count from a
# file this script writes): each process times the receipt of every broadcast by each of
# its sessions. Prints: sessions, node RSS (sum and per session), Redis RSS, node and
# Redis CPU at rest, the fanout percentiles of every process, and the broadcast's
# (latency from the PUBLISH to each session's receipt; its max is the time until the last
# of all sessions had it; loss; node CPU).
#
# Knobs (environment):
#   NODES=8 PROCS=10 PER_PROC=15000 (150,000 sessions; herald-bench takes at most 18,000)  RATE=2000 DURATION=20 HOLD=45
#   IDLE_WINDOW=10 (s of CPU sampling at rest)  CONCURRENCY=200 (handshakes in flight per process)
#   BROADCASTS=3 BROADCAST_INTERVAL=10 BROADCAST_DRAIN=15 (s each process keeps reading
#   after the last broadcast; what has not arrived then is lost)  BROADCASTS=0: no broadcast
#   SOURCE_IPS=127.0.0.2-127.0.0.40  OUT_DIR=target/bench-scale/<utc time>
#   HERALD_BIN / BENCH_BIN  (default: cargo build --release)
#
# Usage: scripts/bench-scale.sh
set -euo pipefail
cd "$(dirname "$0")/.."

NODES=${NODES:-8}
PROCS=${PROCS:-10}
PER_PROC=${PER_PROC:-15000}
RATE=${RATE:-2000}
DURATION=${DURATION:-20}
HOLD=${HOLD:-45}
IDLE_WINDOW=${IDLE_WINDOW:-10}
CONCURRENCY=${CONCURRENCY:-200}
BROADCASTS=${BROADCASTS:-3}
BROADCAST_INTERVAL=${BROADCAST_INTERVAL:-10}
BROADCAST_DRAIN=${BROADCAST_DRAIN:-15}
SOURCE_IPS=${SOURCE_IPS:-127.0.0.2-127.0.0.40}
OUT_DIR=${OUT_DIR:-target/bench-scale/$(date -u +%Y%m%dT%H%M%SZ)}
# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh
PREFIX=hscale
BENCH_NAME=bench-scale
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)

if [ -z "${HERALD_BIN:-}" ] || [ -z "${BENCH_BIN:-}" ]; then
    cargo build --release --bins -p herald >&2
    cargo build --release --bins -p herald-bench >&2
fi
HERALD=${HERALD_BIN:-target/release/herald}
BENCH=${BENCH_BIN:-target/release/herald-bench}
new_secrets
SECRET=$JWT_SECRET

# Sums over several processes of bench-lib.sh's rss_kib and cpu_ticks.
sum_ticks() { local t=0 p; for p in "$@"; do t=$((t + $(cpu_ticks "$p"))); done; echo "$t"; }
sum_rss() { local t=0 p; for p in "$@"; do t=$((t + $(rss_kib "$p"))); done; echo "$t"; }

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --maxclients 20000 >"$OUT_DIR/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
for _ in $(seq 1 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
REDIS_URL="redis://127.0.0.1:$REDIS_PORT"

NODE_PIDS=() TARGETS=()
for i in $(seq 1 "$NODES"); do
    port=$(free_port)
    HERALD_LOG=warn "$HERALD" --listen "127.0.0.1:$port" --redis-url "$REDIS_URL" \
        --jwt-secret "$SECRET" --api-key "$API_KEY" --prefix "$PREFIX" --node-id "scale-$i" \
        --max-connections 19000 --max-pending-connections 512 >"$OUT_DIR/herald-$i.log" 2>&1 &
    NODE_PIDS+=("$!")
    PIDS+=("$!")
    TARGETS+=("ws://127.0.0.1:$port")
    for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
done
log "redis pid $REDIS_PID, $NODES nodes: ${NODE_PIDS[*]}"
rss_nodes0=$(sum_rss "${NODE_PIDS[@]}")
rss_redis0=$(rss_kib "$REDIS_PID")

targets=$(IFS=,; echo "${TARGETS[*]}")
per_rate=$(awk -v r="$RATE" -v n="$PROCS" 'BEGIN { print r / n }')
BENCH_PIDS=()
for k in $(seq 0 $((PROCS - 1))); do
    "$BENCH" fanout --target "$targets" --secret "$SECRET" --sessions "$PER_PROC" \
        --first-user $((k * PER_PROC)) --source-ips "$SOURCE_IPS" --concurrency "$CONCURRENCY" \
        --producer redis --redis-url "$REDIS_URL" --prefix "$PREFIX" --rate "$per_rate" \
        --duration "$DURATION" --hold "$HOLD" --cover-pings 0 --payload-bytes 100 \
        --ready-file "$OUT_DIR/ready-$k" --json "$OUT_DIR/fanout-$k.json" \
        >"$OUT_DIR/bench-$k.log" 2>&1 &
    BENCH_PIDS+=("$!")
    PIDS+=("$!")
done
t0=$SECONDS
while :; do
    n=0
    for k in $(seq 0 $((PROCS - 1))); do [ -e "$OUT_DIR/ready-$k" ] && n=$((n + 1)); done
    [ "$n" = "$PROCS" ] && break
    [ $((SECONDS - t0)) -gt "$((HOLD - IDLE_WINDOW - 2))" ] && { log "not every process connected within the hold"; break; }
    sleep 0.5
done
connect_s=$((SECONDS - t0))
sleep 2
# At rest: every session open, nothing published yet (each process holds HOLD s).
a_nodes=$(sum_ticks "${NODE_PIDS[@]}") a_redis=$(cpu_ticks "$REDIS_PID")
sleep "$IDLE_WINDOW"
b_nodes=$(sum_ticks "${NODE_PIDS[@]}") b_redis=$(cpu_ticks "$REDIS_PID")
rss_nodes1=$(sum_rss "${NODE_PIDS[@]}")
rss_redis1=$(rss_kib "$REDIS_PID")
sessions=0
for t in "${TARGETS[@]}"; do
    port=${t##*:}
    s=$(curl -fsS "http://127.0.0.1:$port/metrics" | awk '/^herald_connections / {print $2}')
    sessions=$((sessions + ${s%.*}))
done
log "connected in ${connect_s} s; measuring fanout"
for p in "${BENCH_PIDS[@]}"; do wait "$p" || log "a bench process exited with $?"; done

# One broadcast to everyone: every process reconnects its users, and the broadcasts start
# only when all of them are connected (the start file), so every session can receive each.
bsessions=0 bconnect_s=0 bcpu_nodes=0 bcpu_redis=0 bwindow=0
if [ "$BROADCASTS" -gt 0 ]; then
    bdur=$((BROADCASTS * BROADCAST_INTERVAL))
    brate=$(awk -v i="$BROADCAST_INTERVAL" 'BEGIN { print 1 / i }')
    rm -f "$OUT_DIR"/bready-* "$OUT_DIR/bstart" "$OUT_DIR/bexpect.json"
    B_PIDS=()
    for k in $(seq 0 $((PROCS - 1))); do
        if [ "$k" = 0 ]; then
            # Messages are due at 0, INTERVAL, 2 x INTERVAL ... s after the start.
            prod=(--producer redis --redis-url "$REDIS_URL" --prefix "$PREFIX" --rate "$brate" --hold 0)
        else
            prod=(--producer external --expect-file "$OUT_DIR/bexpect.json"
                --expect-timeout $((bdur + BROADCAST_DRAIN + 120)))
        fi
        "$BENCH" broadcast --target "$targets" --secret "$SECRET" --sessions "$PER_PROC" \
            --first-user $((k * PER_PROC)) --source-ips "$SOURCE_IPS" --concurrency "$CONCURRENCY" \
            --duration "$bdur" --drain "$BROADCAST_DRAIN" --cover-pings 0 --payload-bytes 100 \
            --ready-file "$OUT_DIR/bready-$k" --start-file "$OUT_DIR/bstart" \
            --json "$OUT_DIR/broadcast-$k.json" "${prod[@]}" >"$OUT_DIR/bench-broadcast-$k.log" 2>&1 &
        B_PIDS+=("$!")
        PIDS+=("$!")
    done
    t0=$SECONDS
    while :; do
        n=0
        for k in $(seq 0 $((PROCS - 1))); do [ -e "$OUT_DIR/bready-$k" ] && n=$((n + 1)); done
        [ "$n" = "$PROCS" ] && break
        [ $((SECONDS - t0)) -gt 300 ] && { log "broadcast: not every process connected within 300 s"; break; }
        sleep 0.5
    done
    bconnect_s=$((SECONDS - t0))
    for t in "${TARGETS[@]}"; do
        s=$(curl -fsS "http://127.0.0.1:${t##*:}/metrics" | awk '/^herald_connections / {print $2}')
        bsessions=$((bsessions + ${s%.*}))
    done
    sleep 2
    log "broadcast: $bsessions sessions connected in ${bconnect_s} s; $BROADCASTS broadcasts ${BROADCAST_INTERVAL} s apart"
    ba_nodes=$(sum_ticks "${NODE_PIDS[@]}") ba_redis=$(cpu_ticks "$REDIS_PID") ta=$(date +%s.%N)
    touch "$OUT_DIR/bstart"
    # Process 0 published; the others read how much from bexpect.json.
    wait "${B_PIDS[0]}" || log "broadcast process 0 exited with $?"
    bb_nodes=$(sum_ticks "${NODE_PIDS[@]}") bb_redis=$(cpu_ticks "$REDIS_PID") tb=$(date +%s.%N)
    jq -c '{sent: (.result.produced.sent // 0)}' "$OUT_DIR/broadcast-0.json" >"$OUT_DIR/bexpect.tmp" 2>/dev/null ||
        echo '{"sent":0}' >"$OUT_DIR/bexpect.tmp"
    mv "$OUT_DIR/bexpect.tmp" "$OUT_DIR/bexpect.json"
    for p in "${B_PIDS[@]:1}"; do wait "$p" || log "a broadcast process exited with $?"; done
    bcpu_nodes=$((bb_nodes - ba_nodes)) bcpu_redis=$((bb_redis - ba_redis))
    bwindow=$(awk -v a="$ta" -v b="$tb" 'BEGIN { printf "%.1f", b - a }')
fi

{
    echo "machine: nproc $(nproc), $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo), $(uname -r), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "herald: $(git rev-parse --short HEAD), redis $(redis-server --version | sed 's/.* v=\([^ ]*\).*/\1/')"
    echo "command: NODES=$NODES PROCS=$PROCS PER_PROC=$PER_PROC RATE=$RATE DURATION=$DURATION HOLD=$HOLD BROADCASTS=$BROADCASTS BROADCAST_INTERVAL=$BROADCAST_INTERVAL BROADCAST_DRAIN=$BROADCAST_DRAIN scripts/bench-scale.sh"
    echo
    echo "| figure | value |"
    echo "|---|---|"
    echo "| sessions open (sum of herald_connections) | $sessions |"
    echo "| time to open them all (s, $PROCS processes, $CONCURRENCY handshakes in flight each) | $connect_s |"
    awk -v a="$rss_nodes0" -v b="$rss_nodes1" -v n="$sessions" -v k="$NODES" 'BEGIN {
        printf "| node RSS, sum of %d nodes (MiB): before / with every session | %.0f / %.0f |\n", k, a / 1024, b / 1024
        if (n > 0) printf "| node RSS per session (KiB) | %.2f |\n", (b - a) / n }'
    awk -v a="$rss_redis0" -v b="$rss_redis1" -v n="$sessions" 'BEGIN {
        printf "| Redis RSS (MiB): before / with every session | %.0f / %.0f |\n", a / 1024, b / 1024
        if (n > 0) printf "| Redis RSS per session (bytes) | %.0f |\n", (b - a) * 1024 / n }'
    awk -v a="$a_nodes" -v b="$b_nodes" -v c="$a_redis" -v d="$b_redis" -v w="$IDLE_WINDOW" 'BEGIN {
        printf "| CPU at rest over %d s, all nodes / Redis (%% of one core) | %.1f / %.1f |\n", w, (b - a) / w, (d - c) / w }'
    echo
    echo "Fanout at $RATE msg/s in total ($per_rate per process, each to its own users):"
    echo
    echo "| process | delivered / expected | lost | p50 | p90 | p99 | p99.9 | max (ms) |"
    echo "|---|---|---|---|---|---|---|---|"
    for k in $(seq 0 $((PROCS - 1))); do
        jq -r --arg k "$k" '[$k, "\(.delivered) / \(.expected)", .lost,
            .latency_ms.p50, .latency_ms.p90, .latency_ms.p99, .latency_ms.p999, .latency_ms.max]
            | "| " + (map(tostring) | join(" | ")) + " |"' "$OUT_DIR/fanout-$k.json" 2>/dev/null ||
            echo "| $k | no result (see bench-$k.log) |"
    done
    if [ "$BROADCASTS" -gt 0 ]; then
        echo
        echo "Broadcast to everyone: $BROADCASTS messages on $PREFIX:broadcast, $BROADCAST_INTERVAL s apart, to $bsessions sessions (reconnected in $bconnect_s s)."
        echo "Latency is from the PUBLISH to each session's receipt; max is when the last session had it."
        echo
        echo "| process | delivered / expected | lost | p50 | p90 | p99 | p99.9 | max (ms) |"
        echo "|---|---|---|---|---|---|---|---|"
        for k in $(seq 0 $((PROCS - 1))); do
            jq -r --arg k "$k" '[$k, "\(.delivered) / \(.expected)", .lost,
                .latency_ms.p50, .latency_ms.p90, .latency_ms.p99, .latency_ms.p999, .latency_ms.max]
                | "| " + (map(tostring) | join(" | ")) + " |"' "$OUT_DIR/broadcast-$k.json" 2>/dev/null ||
                echo "| $k | no result (see bench-broadcast-$k.log) |"
        done
        jq -rs '"| all | \(map(.delivered) | add) / \(map(.expected) | add) | \(map(.lost) | add) | " +
            "\(map(.latency_ms.p50) | add / length | . * 1000 | round / 1000) (mean) | " +
            "\(map(.latency_ms.p90) | max) (worst) | \(map(.latency_ms.p99) | max) (worst) | " +
            "\(map(.latency_ms.p999) | max) (worst) | \(map(.latency_ms.max) | max) |"' \
            "$OUT_DIR"/broadcast-*.json 2>/dev/null || true
        echo
        awk -v n="$bcpu_nodes" -v r="$bcpu_redis" -v w="$bwindow" 'BEGIN {
            printf "Node CPU from the first broadcast to the end of process 0 (%s s, drain included): %.2f s (all nodes), Redis %.2f s.\n", w, n / 100, r / 100 }'
    fi
} | tee "$OUT_DIR/table.md"
log "results: $OUT_DIR"
