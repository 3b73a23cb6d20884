#!/usr/bin/env bash
# Pre-authentication flood: node RSS during and after a flood of connections that each send
# an unfinished request head (issue 13).
#
# Builds release binaries, starts one standalone herald node (the flood never reaches
# authentication, so Redis plays no part), and for each head size in $HEADER_KIB runs
# `herald-bench flood`: $CONNECTIONS connections from 127.0.0.2-127.0.0.20 each send that
# many KiB of one header line without ever finishing the head, are held $HOLD s, then
# closed; the node's RSS is read before, at the peak (every 100 ms), at the end of the
# hold, 1 s after the close and $SETTLE s after it. A fresh node per head size, so each
# phase starts from the same baseline. Everything started here is stopped on exit.
#
# Knobs (environment):
#   CONNECTIONS=4000        flooding connections (the issue's figure)
#   HEADER_KIB="256 15"     head sizes: 256 KiB is over the default 16 KiB cap (431 at
#                           once); 15 KiB fits under it and is held until the 10 s header
#                           timeout, the most an unauthenticated connection can cost
#   HOLD=5                  seconds to hold the connections after all have sent
#   SETTLE=30               seconds after the close before the last reading
#   CONCURRENCY=256         connects in flight
#   SOURCE_IPS=127.0.0.2-127.0.0.20
#   HERALD_BIN=""           measure this herald binary instead of the one built here (e.g.
#                           a build of an older commit, for a before/after comparison)
#   NODE_ENV=""             extra VAR=value pairs for the node process only, e.g.
#                           "MALLOC_ARENA_MAX=2"
#   OUT_DIR=target/bench-flood/<utc time>
#   HERALD_*                any node setting, passed to the node as is
#
# Usage: scripts/bench-flood.sh        (from anywhere inside the repository)
set -euo pipefail

cd "$(dirname "$0")/.."

CONNECTIONS=${CONNECTIONS:-4000}
HEADER_KIB=${HEADER_KIB:-256 15}
HOLD=${HOLD:-5}
SETTLE=${SETTLE:-30}
CONCURRENCY=${CONCURRENCY:-256}
SOURCE_IPS=${SOURCE_IPS:-127.0.0.2-127.0.0.20}
OUT_DIR=${OUT_DIR:-target/bench-flood/$(date -u +%Y%m%dT%H%M%SZ)}

mkdir -p "$OUT_DIR"
BENCH_NAME=bench-flood
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh

new_secrets
build_release
if [ -n "${HERALD_BIN:-}" ]; then
    HERALD=$HERALD_BIN
    BUILT_FROM="$HERALD_BIN"
fi

for kib in $HEADER_KIB; do
    start_node "flood-$kib" --max-connections 10000
    sleep 1
    log "node RSS baseline: $(rss_kib "$NODE_PID") KiB; flooding with $CONNECTIONS x $kib KiB"
    "$BENCH" flood --target "127.0.0.1:$NODE_PORT" --connections "$CONNECTIONS" \
        --header-kib "$kib" --concurrency "$CONCURRENCY" --hold "$HOLD" --settle "$SETTLE" \
        --source-ips "$SOURCE_IPS" --pid "$NODE_PID" --json "$OUT_DIR/flood-$kib.json" |
        tee "$OUT_DIR/flood-$kib.txt"
    echo "node /healthz after the flood: $(curl -fsS "http://127.0.0.1:$NODE_PORT/healthz" || echo FAILED)"
    stop_pid "$NODE_PID"
done

echo
machine_summary
echo "node settings from the environment: $(env | grep '^HERALD_' | grep -v -e SECRET -e API_KEY | tr '\n' ' ')${NODE_ENV:-}"
if command -v jq >/dev/null; then
    echo
    echo "== summary (node RSS, MiB) =="
    for kib in $HEADER_KIB; do
        f="$OUT_DIR/flood-$kib.json"
        [ -f "$f" ] || continue
        jq -r '.result | "\(.connections) x \(.header_kib) KiB: before \(.rss_before_kib / 1024 | floor), peak \(.rss_peak_kib / 1024 | floor), held \(.rss_held_kib / 1024 | floor), 1 s after close \(.rss_after_close_kib / 1024 | floor), \(.settle_s) s after \(.rss_after_settle_kib / 1024 | floor); outcomes \(.outcomes)"' "$f"
    done
fi
echo "results: $OUT_DIR"
