#!/usr/bin/env bash
# Churn soak (the "longer churn benchmark"): LOOPS connect/disconnect loops against one
# herald node for DURATION seconds next to SESSIONS steady sessions, ending sessions with a
# mix of clean closes, dropped sockets and TCP RSTs. herald-bench samples the node's RSS and
# the Redis key count under the prefix every SAMPLE_INTERVAL seconds, waits SETTLE seconds
# after the churn (presence TTL plus offline grace), and checks both are back near their
# baseline. Exit status: 0 PASS, 3 FAIL, anything else an error.
#
# Builds release binaries, starts a private redis-server (never on 6379) and one node with
# --presence-ttl $PRESENCE_TTL on free loopback ports; everything started here is stopped
# on exit.
#
# Knobs (environment):
#   DURATION=180  LOOPS=50  RATE=200 (most connects/s)  MAX_HOLD_MS=500
#   MIX="clean=1,drop=1,rst=1"  SESSIONS=1000 (steady)  CHURN_USERS=1000
#   PRESENCE_TTL=5  SAMPLE_INTERVAL=10  SETTLE=20
#   SOURCE_IPS=127.0.0.2-127.0.0.20
#   OUT_DIR=target/bench-churn/<utc time>
#   HERALD_*  any node setting, passed to the node as is; NODE_ENV="VAR=value ..." too
#
# Usage: scripts/bench-churn.sh        (DURATION=600 scripts/bench-churn.sh for a longer soak)
set -euo pipefail

cd "$(dirname "$0")/.."

DURATION=${DURATION:-180}
LOOPS=${LOOPS:-50}
RATE=${RATE:-200}
MAX_HOLD_MS=${MAX_HOLD_MS:-500}
MIX=${MIX:-clean=1,drop=1,rst=1}
SESSIONS=${SESSIONS:-1000}
CHURN_USERS=${CHURN_USERS:-1000}
PRESENCE_TTL=${PRESENCE_TTL:-5}
SAMPLE_INTERVAL=${SAMPLE_INTERVAL:-10}
SETTLE=${SETTLE:-20}
SOURCE_IPS=${SOURCE_IPS:-127.0.0.2-127.0.0.20}
OUT_DIR=${OUT_DIR:-target/bench-churn/$(date -u +%Y%m%dT%H%M%SZ)}
BENCH_NAME=bench-churn
PREFIX=herald


mkdir -p "$OUT_DIR"
# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh

new_secrets
build_release

start_redis
start_node node-1 --presence-ttl "$PRESENCE_TTL" --prefix "$PREFIX" \
    --max-connections $((SESSIONS + LOOPS + 1000))
wait_quiet

rc=0
"$BENCH" churn --target "ws://127.0.0.1:$NODE_PORT" --sessions "$SESSIONS" \
    --source-ips "$SOURCE_IPS" --concurrency 100 --pids "$NODE_PID" --redis-pid "$REDIS_PID" \
    --redis-url "$REDIS_URL" --prefix "$PREFIX" --loops "$LOOPS" --duration "$DURATION" \
    --rate "$RATE" --max-hold-ms "$MAX_HOLD_MS" --mix "$MIX" --churn-users "$CHURN_USERS" \
    --sample-interval "$SAMPLE_INTERVAL" --settle "$SETTLE" \
    --json "$OUT_DIR/churn.json" | tee "$OUT_DIR/churn.txt" || rc=$?

echo
machine_summary
echo "node:   --presence-ttl $PRESENCE_TTL, settings from the environment: $(env | grep '^HERALD_' | grep -v -e SECRET -e API_KEY -e BENCH | tr '\n' ' ')${NODE_ENV:-}"
echo "results: $OUT_DIR"
exit "$rc"
