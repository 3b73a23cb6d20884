#!/usr/bin/env bash
# Catch-up benchmark: how long one herald node takes to catch SESSIONS live sessions up on
# the durable messages stored while its Redis subscription was down (issue 10).
#
# Builds release binaries, starts a private redis-server (never on 6379; its ACL is changed
# by the bench, so it must be private) and one node, opens SESSIONS sessions (one user each)
# with herald-bench from 127.0.0.2-127.0.0.20, gives each one durable message live, then
# cuts the node's subscription (ACL: no SUBSCRIBE for the default user, and CLIENT KILL TYPE
# pubsub), stores MESSAGES_PER_USER durable messages per user with FCALL herald_notify,
# heals the cut after at least CUT seconds and measures, per session, the time until it had
# every missed message; missing and duplicated messages must be 0 (the bench exits 1
# otherwise). Everything started here is stopped on exit, by PID.
#
# Knobs (environment):
#   SESSIONS=10000  MESSAGES_PER_USER=3  CUT=2 (seconds, at least)  TIMEOUT=120
#   CONCURRENCY=256 (handshakes in flight)
#   OUT_DIR=target/bench-catchup/<utc time>
#   HERALD_*  any node setting, passed to the node as is; NODE_ENV="VAR=value ..." too
#
# Usage: scripts/bench-catchup.sh
set -euo pipefail

cd "$(dirname "$0")/.."

SESSIONS=${SESSIONS:-10000}
MESSAGES_PER_USER=${MESSAGES_PER_USER:-3}
CUT=${CUT:-2}
TIMEOUT=${TIMEOUT:-120}
CONCURRENCY=${CONCURRENCY:-256}
OUT_DIR=${OUT_DIR:-target/bench-catchup/$(date -u +%Y%m%dT%H%M%SZ)}
BENCH_NAME=bench-catchup

mkdir -p "$OUT_DIR"
# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh

new_secrets
build_release

start_redis
# HERALD_LOG=info keeps the node's own line per catch-up pass ("live sessions caught up").
HERALD_LOG=${HERALD_LOG:-info} start_node node-1 --max-connections $((SESSIONS + 1000))
# The node loads the herald_notify function with its first heartbeat.
for _ in $(seq 1 50); do
    redis-cli -p "$REDIS_PORT" FUNCTION LIST LIBRARYNAME herald 2>/dev/null | grep -q herald_notify && break
    sleep 0.1
done
wait_quiet

status=0
"$BENCH" catchup --target "ws://127.0.0.1:$NODE_PORT" --sessions "$SESSIONS" \
    --source-ips 127.0.0.2-127.0.0.20 --concurrency "$CONCURRENCY" --pids "$NODE_PID" \
    --redis-pid "$REDIS_PID" --redis-url "$REDIS_URL" --messages-per-user "$MESSAGES_PER_USER" \
    --cut "$CUT" --timeout "$TIMEOUT" --json "$OUT_DIR/catchup.json" |
    tee "$OUT_DIR/catchup.txt" || status=$?

echo
echo "== the node's own account =="
grep -E "caught up|pub/sub" "$OUT_DIR/herald-node-1.log" | sed 's/\x1b\[[0-9;]*m//g' | tail -n 5 || true
echo
machine_summary
echo "results: $OUT_DIR"
exit "$status"
