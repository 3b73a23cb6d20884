#!/usr/bin/env bash
# Durable-inbox benchmark against one herald node and a private redis-server:
#   (a) MESSAGES x PUBLISH <prefix>:user:{<u>} against MESSAGES x FCALL herald_notify (same
#       payloads, back to back or at RATE/s) to SESSIONS live users: per-call latency,
#       end-to-end latency, Redis and node CPU per 10k; with IDEMPOTENCY=1 (the default)
#       also MESSAGES x FCALL herald_notify ... idem <new key> and MESSAGES retries of those
#       calls (same key and payload: each must return the first id and deliver nothing);
#   (b) REPLAYS fresh users with REPLAY_MESSAGES pending durable messages each reconnect
#       with since=<id before the first> (REPLAY_FROM_CURSOR=1: without since): time from
#       connect start to the last replayed message.
# Builds release binaries, starts everything on free loopback ports (never 6379) and stops
# it on exit.
#
# Knobs (environment):
#   MESSAGES=20000  RATE=0 (back to back)  PAYLOAD_BYTES=100  SESSIONS=1000
#   REPLAYS=50  REPLAY_MESSAGES=100  REPLAY_FROM_CURSOR=0  IDEMPOTENCY=1
#   OUT_DIR=target/bench-durable/<utc time>
#   HERALD_*  any node setting, passed to the node as is; NODE_ENV="VAR=value ..." too
#
# Usage: scripts/bench-durable.sh
set -euo pipefail

cd "$(dirname "$0")/.."

MESSAGES=${MESSAGES:-20000}
RATE=${RATE:-0}
PAYLOAD_BYTES=${PAYLOAD_BYTES:-100}
SESSIONS=${SESSIONS:-1000}
REPLAYS=${REPLAYS:-50}
REPLAY_MESSAGES=${REPLAY_MESSAGES:-100}
REPLAY_FROM_CURSOR=${REPLAY_FROM_CURSOR:-0}
IDEMPOTENCY=${IDEMPOTENCY:-1}
OUT_DIR=${OUT_DIR:-target/bench-durable/$(date -u +%Y%m%dT%H%M%SZ)}
BENCH_NAME=bench-durable


mkdir -p "$OUT_DIR"
# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh

new_secrets
build_release

start_redis
start_node node-1 --max-connections $((SESSIONS + 1000))
# The node loads the herald_notify function with its first heartbeat.
for _ in $(seq 1 50); do
    redis-cli -p "$REDIS_PORT" FUNCTION LIST LIBRARYNAME herald 2>/dev/null | grep -q herald_notify && break
    sleep 0.1
done
wait_quiet

extra=()
[ "$REPLAY_FROM_CURSOR" = 1 ] && extra+=(--replay-from-cursor)
[ "$IDEMPOTENCY" = 1 ] && extra+=(--idempotency)
"$BENCH" durable --target "ws://127.0.0.1:$NODE_PORT" --sessions "$SESSIONS" \
    --source-ips 127.0.0.2-127.0.0.20 --concurrency 100 --pids "$NODE_PID" \
    --redis-pid "$REDIS_PID" --redis-url "$REDIS_URL" --messages "$MESSAGES" --rate "$RATE" \
    --payload-bytes "$PAYLOAD_BYTES" --replays "$REPLAYS" --replay-messages "$REPLAY_MESSAGES" \
    "${extra[@]}" --json "$OUT_DIR/durable.json" | tee "$OUT_DIR/durable.txt"

echo
machine_summary
echo "results: $OUT_DIR"
