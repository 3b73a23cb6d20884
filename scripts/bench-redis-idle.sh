#!/usr/bin/env bash
# Redis cost at rest against the number of idle sessions on one node (issue 11.4): for each
# count in SESSIONS, a private redis-server, ONE herald node (release build, default
# --presence-ttl unless PRESENCE_TTL says otherwise) and herald-bench `idle` processes
# holding that many authenticated WebSocket sessions. Once every session is connected and
# one full presence TTL has passed (so every session has been through at least one
# heartbeat and the keys are in their steady state), it samples over WINDOW seconds:
#   - Redis CPU: utime + stime of the redis-server PID (/proc/<pid>/stat), in ms per s;
#   - Redis commands per second: the delta of INFO stats total_commands_processed (the
#     two INFO calls of the sampling itself are subtracted), and per command from INFO
#     commandstats (in the JSON), so a change in what the heartbeat sends shows by name;
#   - Redis RSS (and used_memory) and its key count;
#   - the node's CPU (% of one core) and RSS.
# Prints one table row per count and writes OUT_DIR/redis-idle-<sessions>.json and
# OUT_DIR/table.md. Everything started here is stopped on exit (by PID).
#
# One node holds at most about 19,200 sessions here: the open-file hard limit is 20,000
# per process, and the node fits --max-connections (sessions + 100 here),
# --max-pending-connections (512 here) and a reserve of 136 for Redis and listeners under it. So the large count is 19,000, not 20,000 (the issue's
# comparison point is 16,000). One herald-bench process holds at most PER_PROCESS
# sessions (it needs one descriptor per session too), so larger counts use several,
# with distinct users.
#
# Knobs (environment):
#   SESSIONS="2000 19000"   session counts, one run each (each on a fresh Redis and node)
#   WINDOW=30               seconds of sampling (> one heartbeat, a third of the TTL;
#                           at the default TTL of 30 s that is three heartbeats)
#   PRESENCE_TTL=""         passed as --presence-ttl when set (seconds); the wait after
#                           connecting is one TTL (30 s, the node's default, when unset)
#   SETTLE=""               seconds to wait after connecting instead of one TTL
#   PER_PROCESS=15000       most sessions per herald-bench process
#   CONCURRENCY=256         handshakes in flight (split over the bench processes)
#   SOURCE_IPS=127.0.0.2-127.0.0.40
#   OUT_DIR=target/bench-redis-idle/<utc time>
#   HERALD_BIN / BENCH_BIN  prebuilt binaries (default: cargo build --release, as the
#                           other bench scripts do)
#   QUIET_CPU=0.2 QUIET_WAIT=120   wait for a quiet machine before each window (bench-lib)
#
# Usage: scripts/bench-redis-idle.sh        (from anywhere inside the repository)
set -euo pipefail
cd "$(dirname "$0")/.."
# sort and join must agree on the order of command names.
export LC_ALL=C

SESSIONS=${SESSIONS:-2000 19000}
WINDOW=${WINDOW:-30}
PRESENCE_TTL=${PRESENCE_TTL:-}
SETTLE=${SETTLE:-}
PER_PROCESS=${PER_PROCESS:-15000}
CONCURRENCY=${CONCURRENCY:-256}
SOURCE_IPS=${SOURCE_IPS:-127.0.0.2-127.0.0.40}
OUT_DIR=${OUT_DIR:-target/bench-redis-idle/$(date -u +%Y%m%dT%H%M%SZ)}
BENCH_NAME=bench-redis-idle
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
# log, free_port, rss_kib, cpu_ticks, start_redis, stop_pid, wait_quiet and the EXIT trap
# that stops every process started here come from the shared bench library.
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh

for n in $SESSIONS; do
    if ! [[ $n =~ ^[0-9]+$ ]] || [ "$n" -lt 1 ] || [ "$n" -gt 19200 ]; then
        log "SESSIONS: $n is not a count between 1 and 19,200 (one node's open-file limit)"
        exit 2
    fi
done
command -v jq >/dev/null || {
    log "jq is needed to read herald-bench's ready files"
    exit 2
}

new_secrets
if [ -z "${HERALD_BIN:-}" ] || [ -z "${BENCH_BIN:-}" ]; then
    build_release
else
    BUILT_FROM=$(git describe --always --dirty 2>/dev/null || echo unknown)
    ulimit -n "$(ulimit -Hn)"
fi
HERALD=${HERALD_BIN:-target/release/herald}
BENCH=${BENCH_BIN:-target/release/herald-bench}
ttl_s=${PRESENCE_TTL:-30}
settle_s=${SETTLE:-$ttl_s}
node_flags=()
[ -n "$PRESENCE_TTL" ] && node_flags+=(--presence-ttl "$PRESENCE_TTL")

rcli() { redis-cli -p "$REDIS_PORT" "$@"; }
# One field of INFO (all sections), e.g. info_field total_commands_processed.
# awk reads to the end: leaving early would break the pipe, and pipefail would end the run.
info_field() { rcli info everything | tr -d '\r' | awk -F: -v k="$1" '$1 == k { v = $2 } END { print v }'; }
# "cmd calls" per line from INFO commandstats.
cmdstats() {
    rcli info commandstats | tr -d '\r' |
        sed -n 's/^cmdstat_\([^:]*\):calls=\([0-9]*\),.*/\1 \2/p' | sort
}
node_sessions() {
    curl -fsS "http://127.0.0.1:$NODE_PORT/metrics" 2>/dev/null |
        awk '/^herald_connections / { printf "%d", $2; found = 1 } END { if (!found) print 0 }'
}

# run_one <sessions>: a fresh Redis and node, the sessions, the wait, the window; writes
# OUT_DIR/redis-idle-<sessions>.json.
run_one() {
    local n=$1 procs k per offset remaining
    start_redis
    start_node "idle-$n" --max-connections $((n + 100)) --max-pending-connections 512 \
        "${node_flags[@]}"
    local redis_rss0 node_rss0 keys0
    redis_rss0=$(rss_kib "$REDIS_PID")
    node_rss0=$(rss_kib "$NODE_PID")
    keys0=$(rcli dbsize)

    procs=$(((n + PER_PROCESS - 1) / PER_PROCESS))
    # The bench holds its sessions long enough for the connect phase, the settle wait, a
    # quiet-machine wait and the window, with a margin; they are stopped as soon as the
    # window ends.
    local hold=$((settle_s + WINDOW + ${QUIET_WAIT:-120} + 120))
    local bench_pids=() ready=()
    remaining=$n
    offset=0
    log "$n sessions: $procs herald-bench process(es)"
    local t0=$SECONDS
    for k in $(seq 1 "$procs"); do
        per=$(((remaining + procs - k) / (procs - k + 1)))
        rm -f "$OUT_DIR/ready-$n-$k.json"
        "$BENCH" idle --target "ws://127.0.0.1:$NODE_PORT" --sessions "$per" \
            --first-user "$offset" --source-ips "$SOURCE_IPS" \
            --concurrency $((CONCURRENCY / procs + 1)) --hold "$hold" \
            --ready-file "$OUT_DIR/ready-$n-$k.json" \
            >"$OUT_DIR/bench-$n-$k.log" 2>&1 &
        bench_pids+=($!)
        PIDS+=($!)
        ready+=("$OUT_DIR/ready-$n-$k.json")
        offset=$((offset + per))
        remaining=$((remaining - per))
    done
    # Every bench process writes its ready file once each of its sessions has connected or
    # failed; a process that exits first has failed.
    local f all p
    while :; do
        all=1
        for f in "${ready[@]}"; do [ -s "$f" ] || all=0; done
        [ $all = 1 ] && break
        for p in "${bench_pids[@]}"; do
            if ! kill -0 "$p" 2>/dev/null; then
                log "a herald-bench process exited before connecting; its log follows"
                cat "$OUT_DIR"/bench-"$n"-*.log >&2
                return 1
            fi
        done
        if [ $((SECONDS - t0)) -gt 600 ]; then
            log "sessions not connected after 600 s"
            return 1
        fi
        sleep 0.5
    done
    local connect_s=$((SECONDS - t0)) connected=0 failed=0
    for f in "${ready[@]}"; do
        connected=$((connected + $(jq -r '.connected' "$f")))
        failed=$((failed + $(jq -r '.failed' "$f")))
    done
    log "$connected connected, $failed failed in ${connect_s} s; node reports $(node_sessions)"
    if [ "$connected" -ne "$n" ]; then
        log "only $connected of $n sessions connected (see $OUT_DIR/bench-$n-*.log); measuring anyway, the JSON says so"
    fi

    # One full TTL after the last connect: every session's presence has been written and
    # refreshed by at least one heartbeat, and nothing of the connect wave is left.
    log "waiting ${settle_s} s (one presence TTL) before sampling"
    sleep "$settle_s"
    local noisy=0 other
    wait_quiet
    other=$(foreign_cpu)
    awk -v c="$other" -v m="${QUIET_CPU:-0.2}" 'BEGIN { exit !(c >= m) }' && noisy=1

    # The window. Redis counts a command once it has run, so the second INFO's
    # total_commands_processed includes the first INFO but not itself: one command is
    # subtracted. The commandstats reads are taken just outside the window.
    local c0 c1 r0 r1 h0 h1 w0 w1 s0 s1 cs0 cs1
    cs0=$(cmdstats)
    w0=$(date +%s.%N)
    r0=$(cpu_ticks "$REDIS_PID")
    h0=$(cpu_ticks "$NODE_PID")
    c0=$(info_field total_commands_processed)
    s0=$(node_sessions)
    sleep "$WINDOW"
    c1=$(info_field total_commands_processed)
    r1=$(cpu_ticks "$REDIS_PID")
    h1=$(cpu_ticks "$NODE_PID")
    w1=$(date +%s.%N)
    s1=$(node_sessions)
    cs1=$(cmdstats)
    local redis_rss1 node_rss1 used keys1 other_after
    redis_rss1=$(rss_kib "$REDIS_PID")
    node_rss1=$(rss_kib "$NODE_PID")
    used=$(info_field used_memory)
    keys1=$(rcli dbsize)
    other_after=$(foreign_cpu)
    awk -v c="$other_after" -v m="${QUIET_CPU:-0.2}" 'BEGIN { exit !(c >= m) }' && noisy=1

    for p in "${bench_pids[@]}"; do stop_pid "$p"; done
    stop_pid "$NODE_PID"
    stop_pid "$REDIS_PID"
    REDIS_URL=""

    # Commands per second by name over the window (the per-name reads bracket the window
    # by a few milliseconds more than the total does).
    local per_cmd
    per_cmd=$(join -a2 -e 0 -o 0,1.2,2.2 <(echo "$cs0") <(echo "$cs1") |
        awk -v w="$WINDOW" '$3 - $2 > 0 { printf "%s\t%.2f\n", $1, ($3 - $2) / w }' |
        sort -t$'\t' -k2,2 -rn |
        jq -R -s 'split("\n") | map(select(length > 0) | split("\t") | {(.[0]): (.[1] | tonumber)}) | add // {}')

    jq -n --argjson sessions "$n" --argjson connected "$connected" --argjson failed "$failed" \
        --argjson s0 "$s0" --argjson s1 "$s1" --argjson connect_s "$connect_s" \
        --argjson settle "$settle_s" --argjson ttl "$ttl_s" \
        --arg w0 "$w0" --arg w1 "$w1" --argjson c0 "$c0" --argjson c1 "$c1" \
        --argjson r0 "$r0" --argjson r1 "$r1" --argjson h0 "$h0" --argjson h1 "$h1" \
        --argjson redis_rss0 "$redis_rss0" --argjson redis_rss1 "$redis_rss1" \
        --argjson node_rss0 "$node_rss0" --argjson node_rss1 "$node_rss1" \
        --argjson used "$used" --argjson keys0 "$keys0" --argjson keys1 "$keys1" \
        --argjson per_cmd "$per_cmd" --argjson noisy "$noisy" \
        --arg other "$other" --arg other_after "$other_after" --arg built "$BUILT_FROM" '
        (($w1 | tonumber) - ($w0 | tonumber)) as $w |
        {
          sessions: $sessions, connected: $connected, failed: $failed,
          node_sessions_at_window_start: $s0, node_sessions_at_window_end: $s1,
          connect_s: $connect_s, presence_ttl_s: $ttl, settle_s: $settle,
          window_s: ($w * 1000 | round / 1000),
          redis_cpu_ms_per_s: (($r1 - $r0) * 10 / $w * 100 | round / 100),
          redis_cpu_pct: (($r1 - $r0) / $w * 100 | round / 100),
          redis_commands_per_s: (($c1 - $c0 - 1) / $w * 100 | round / 100),
          redis_commands_per_s_by_name: $per_cmd,
          redis_rss_kib_before: $redis_rss0, redis_rss_kib: $redis_rss1,
          redis_used_memory_bytes: $used,
          redis_keys_before: $keys0, redis_keys: $keys1,
          node_cpu_pct: (($h1 - $h0) / $w * 100 | round / 100),
          node_rss_kib_before: $node_rss0, node_rss_kib: $node_rss1,
          other_cpu_cores_before: ($other | tonumber), other_cpu_cores_after: ($other_after | tonumber),
          noisy: ($noisy == 1), built_from: $built
        }' >"$OUT_DIR/redis-idle-$n.json"
    log "$n sessions: $(jq -c '{redis_cpu_ms_per_s, redis_commands_per_s, node_cpu_pct, noisy}' "$OUT_DIR/redis-idle-$n.json")"
}

for n in $SESSIONS; do
    run_one "$n"
done

{
    machine_summary
    echo "command: SESSIONS=\"$SESSIONS\" WINDOW=$WINDOW${PRESENCE_TTL:+ PRESENCE_TTL=$PRESENCE_TTL} scripts/bench-redis-idle.sh"
    echo
    echo "| sessions | connected | Redis CPU (ms per s) | Redis commands per s | Redis RSS (MiB) | Redis keys | node CPU (% of a core) | other load (cores) |"
    echo "|---|---|---|---|---|---|---|---|"
    for n in $SESSIONS; do
        jq -r '"| \(.sessions) | \(.connected) | \(.redis_cpu_ms_per_s) | \(.redis_commands_per_s) | \(.redis_rss_kib / 1024 | . * 10 | round / 10) | \(.redis_keys) | \(.node_cpu_pct) | \(.other_cpu_cores_before) / \(.other_cpu_cores_after)\(if .noisy then " (loaded)" else "" end) |"' \
            "$OUT_DIR/redis-idle-$n.json"
    done
    echo
    echo "Redis commands per second by name over the window:"
    for n in $SESSIONS; do
        echo "  $n sessions: $(jq -r '.redis_commands_per_s_by_name | to_entries | map("\(.key) \(.value)") | join(", ")' "$OUT_DIR/redis-idle-$n.json")"
    done
} | tee "$OUT_DIR/table.md"
log "results: $OUT_DIR"
