#!/usr/bin/env bash
# The docker-compose.yml topology from local processes, without Docker:
#
#   redis-server  127.0.0.1:$REDIS_PORT        private, persists nothing (never 6379)
#   herald1..3    127.0.0.1:$PORT_BASE+1..+3   one Redis, one prefix
#   nginx         127.0.0.1:$PORT_BASE         deploy/nginx-local.conf.tmpl (clients)
#                 127.0.0.1:$PORT_BASE+4       the producer API (/api/), internal
#
# With --redis sentinel, the one redis-server becomes a Sentinel set:
#
#   redis master  127.0.0.1:$REDIS_PORT        named "herald" by the sentinels
#   redis replica 127.0.0.1:$REDIS_PORT+1
#   sentinel1..3  127.0.0.1:$REDIS_PORT+11..13 (down-after 2 s; `kill -9` the master's
#                                              pid from $RUN_DIR/pids/redis.pid to watch a
#                                              failover)
#
# and the nodes run with --redis-sentinel ... --redis-master-name herald.
#
# With --redis cluster, it becomes a Redis Cluster of three masters and three replicas:
#
#   redis, redis-c1..c5  127.0.0.1:$REDIS_PORT..+5 (cluster bus on each port + 10000, so
#                        REDIS_PORT must stay below 55530; node timeout 2 s: `kill -9` a
#                        master's pid from $RUN_DIR/pids/ to watch its replica take over)
#
# and the nodes run with --redis-cluster (every node a seed).
#
# Usage (--redis single|sentinel|cluster may come first; single is the default):
#   scripts/local-cluster.sh [run]     in the foreground (the default); Ctrl-C or SIGTERM
#                                      stops everything: the nodes first (they drain,
#                                      closing sessions with 1012 through nginx), then
#                                      nginx, then Redis
#   scripts/local-cluster.sh start     the same in the background (log: $RUN_DIR/cluster.log)
#   scripts/local-cluster.sh stop      stops a cluster started by `start` or `run`
#   scripts/local-cluster.sh status    processes, and /readyz of every node and of nginx
#   scripts/local-cluster.sh token USER [TOPIC...]
#                                      prints a client JWT signed with HERALD_JWT_SECRET
#
# Environment:
#   PORT_BASE=8080            nginx port; the nodes take the next three, the producer API
#                             the one after
#   REDIS_PORT=6390           the private redis-server (sentinel: the master; the replica
#                             and sentinels take the ports listed above; cluster: the
#                             first of six nodes)
#   REDIS_MODE=single         the same as --redis
#   RUN_DIR=target/local-cluster   configs, logs and pid files
#   HERALD_BIN=<path>         use this binary instead of building one
#   PROFILE=debug|release     which `cargo build` to run when HERALD_BIN is unset (debug)
#   HERALD_JWT_SECRET, HERALD_API_KEY   development defaults as in docker-compose.yml
#   DEV=1                     run the nodes with --dev (token = user id, API without key)
#   NODE_ARGS="--flag v ..."  extra herald flags for every node
#
# nginx and redis-server are installed with apt-get when missing (as root, or via sudo).
# Everything listens on 127.0.0.1 only. Every process is started by this script and
# stopped by it; nothing is left behind.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PORT_BASE=${PORT_BASE:-8080}
REDIS_PORT=${REDIS_PORT:-6390}
RUN_DIR=${RUN_DIR:-$ROOT/target/local-cluster}
PROFILE=${PROFILE:-debug}
DEV=${DEV:-0}
NODE_ARGS=${NODE_ARGS:-}
REDIS_MODE=${REDIS_MODE:-single}
if [[ ${1:-} == --redis ]]; then
    REDIS_MODE=${2:-}
    shift 2 || true
fi
[[ $REDIS_MODE == single || $REDIS_MODE == sentinel || $REDIS_MODE == cluster ]] ||
    { printf 'local-cluster: --redis takes single, sentinel or cluster, not %q\n' "$REDIS_MODE" >&2; exit 1; }
# `start` runs this script again in the background: the mode goes with it.
export REDIS_MODE
export HERALD_JWT_SECRET=${HERALD_JWT_SECRET:-change-me-please-0123456789abcdef}
export HERALD_API_KEY=${HERALD_API_KEY:-change-me-please-0123456789abcdef}
# herald's drain grace (default 30s) plus a margin, before a node is killed on stop.
STOP_WAIT=${STOP_WAIT:-35}

LB_PORT=$PORT_BASE
API_PORT=$((PORT_BASE + 4))
NODE_PORTS=("$((PORT_BASE + 1))" "$((PORT_BASE + 2))" "$((PORT_BASE + 3))")
REPLICA_PORT=$((REDIS_PORT + 1))
SENTINEL_PORTS=("$((REDIS_PORT + 11))" "$((REDIS_PORT + 12))" "$((REDIS_PORT + 13))")
# --redis cluster: `redis` on REDIS_PORT, then these five.
CLUSTER_PORTS=("$((REDIS_PORT + 1))" "$((REDIS_PORT + 2))" "$((REDIS_PORT + 3))" "$((REDIS_PORT + 4))" "$((REDIS_PORT + 5))")
MASTER_NAME=herald

say() { printf 'local-cluster: %s\n' "$*" >&2; }
die() {
    say "$*"
    exit 1
}

# ---------- small helpers ----------

# True while $1 is a live process (a zombie child that was not reaped yet counts as gone).
alive() {
    local pid=$1 stat
    [[ -n $pid && -r /proc/$pid/stat ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]]
}

# True if something accepts connections on 127.0.0.1:$1.
port_busy() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# HTTP status of GET 127.0.0.1:$1$2, or 000 (plain bash, no curl needed).
http_status() {
    (
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 0
        printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$2" >&3
        IFS=' ' read -r -t 5 _ code _ <&3 && printf '%s' "$code"
    ) 2>/dev/null || true
}

status_of() {
    local s
    s=$(http_status "$1" "$2")
    printf '%s' "${s:-000}"
}

# Waits up to $3 seconds for GET 127.0.0.1:$1$2 to answer 200.
wait_200() {
    local deadline=$((SECONDS + $3))
    while ((SECONDS < deadline)); do
        [[ $(status_of "$1" "$2") == 200 ]] && return 0
        sleep 0.2
    done
    return 1
}

find_bin() {
    local name=$1 p
    for p in "$(command -v "$name" 2>/dev/null || true)" "/usr/sbin/$name" "/usr/bin/$name"; do
        [[ -n $p && -x $p ]] && {
            printf '%s' "$p"
            return 0
        }
    done
    return 1
}

# Installs Debian package $2 for binary $1 when missing. The package may start its system
# service (nginx on port 80, redis on 6379); this script did not ask for that, so it stops
# a service that the installation just started.
ensure_installed() {
    local bin=$1 pkg=$2 service=$3 sudo=()
    find_bin "$bin" >/dev/null && return 0
    if ((EUID != 0)); then
        command -v sudo >/dev/null || die "$bin is missing: install it with: apt-get install -y $pkg"
        sudo=(sudo)
    fi
    command -v apt-get >/dev/null || die "$bin is missing and there is no apt-get: install $pkg"
    say "$bin is missing; installing $pkg with apt-get"
    "${sudo[@]}" apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "$pkg"
    if command -v service >/dev/null && "${sudo[@]}" service "$service" status >/dev/null 2>&1; then
        say "stopping the $service system service the package started"
        "${sudo[@]}" service "$service" stop || true
    fi
    find_bin "$bin" >/dev/null || die "$bin still missing after installing $pkg"
}

# ---------- token ----------

b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }

cmd_token() {
    local user=${1:-}
    [[ -n $user ]] || die "usage: $0 token USER [TOPIC...]"
    shift
    if [[ $DEV == 1 ]]; then
        printf '%s\n' "$user"
        return
    fi
    command -v openssl >/dev/null || die "token needs openssl (or run with DEV=1: the token is the user id)"
    local s topics="" header payload sig
    for s in "$user" "$@"; do
        [[ $s =~ ^[^[:space:]\"\\]+$ ]] || die "invalid name: $s"
    done
    for s in "$@"; do topics+="${topics:+,}\"$s\""; done
    header=$(printf '{"alg":"HS256","typ":"JWT"}' | b64url)
    payload=$(printf '{"sub":"%s","exp":%d,"topics":[%s]}' "$user" "$(($(date +%s) + 86400))" "$topics" | b64url)
    sig=$(printf '%s.%s' "$header" "$payload" | openssl dgst -sha256 -hmac "$HERALD_JWT_SECRET" -binary | b64url)
    printf '%s.%s.%s\n' "$header" "$payload" "$sig"
}

# ---------- run (foreground supervisor) ----------

NAMES=()
PIDS=()
SLEEPER=""
CLEANED=0

# Starts "$@" as a child in its own session (so a terminal's Ctrl-C reaches only this
# script, which then stops everything in order) and records its pid.
spawn() {
    local name=$1 log=$2
    shift 2
    if command -v setsid >/dev/null; then
        setsid "$@" >"$log" 2>&1 </dev/null &
    else
        "$@" >"$log" 2>&1 </dev/null &
    fi
    NAMES+=("$name")
    PIDS+=("$!")
    printf '%s\n' "$!" >"$RUN_DIR/pids/$name.pid"
}

# Sends $2 (unless it is "-") to the child named $1 and waits up to $3 seconds before
# SIGKILL.
stop_child() {
    local name=$1 sig=$2 wait=$3 i pid=""
    for i in "${!NAMES[@]}"; do [[ ${NAMES[$i]} == "$name" ]] && pid=${PIDS[$i]}; done
    [[ -n $pid ]] || return 0
    if [[ $sig != - ]] && alive "$pid"; then
        kill "-$sig" "$pid" 2>/dev/null || true
    fi
    local deadline=$((SECONDS + wait))
    while alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
    if alive "$pid"; then
        say "$name did not stop within ${wait}s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    rm -f "$RUN_DIR/pids/$name.pid"
}

cleanup() {
    ((CLEANED)) && return 0
    CLEANED=1
    # Stopping is bounded (STOP_WAIT per node at most): do not abandon it half-way.
    trap 'say "still stopping; nodes drain for up to ${STOP_WAIT}s"' INT TERM
    [[ -n $SLEEPER ]] && kill "$SLEEPER" 2>/dev/null
    ((${#PIDS[@]})) || return 0
    say "stopping: the nodes (draining), then nginx, then redis"
    local i
    # Drain every node at once, then wait for each.
    for i in "${!NAMES[@]}"; do
        if [[ ${NAMES[$i]} == herald* ]] && alive "${PIDS[$i]}"; then
            kill -TERM "${PIDS[$i]}" 2>/dev/null || true
        fi
    done
    for i in 1 2 3; do stop_child "herald$i" - "$STOP_WAIT"; done
    stop_child nginx TERM 5
    # The sentinels first, so they do not fail over while the data nodes stop.
    for i in 1 2 3; do stop_child "sentinel$i" TERM 5; done
    stop_child redis TERM 5
    stop_child redis-replica TERM 5
    for i in 1 2 3 4 5; do stop_child "redis-c$i" TERM 5; done
    rm -f "$RUN_DIR/cluster.pid"
    say "stopped"
}

check_free() {
    local port
    for port in "$@"; do
        ! port_busy "$port" || die "port $port is already in use (set PORT_BASE / REDIS_PORT)"
    done
}

cmd_run() {
    [[ $REDIS_PORT != 6379 ]] || die "REDIS_PORT=6379 is refused: this script never touches the system Redis"
    mkdir -p "$RUN_DIR/pids" "$RUN_DIR/nginx" "$RUN_DIR/redis"
    RUN_DIR=$(cd "$RUN_DIR" && pwd)
    if [[ -f $RUN_DIR/cluster.pid ]] && alive "$(cat "$RUN_DIR/cluster.pid")"; then
        die "already running (pid $(cat "$RUN_DIR/cluster.pid")); use: $0 stop"
    fi
    check_free "$LB_PORT" "${NODE_PORTS[@]}" "$REDIS_PORT"
    [[ $REDIS_MODE != sentinel ]] || check_free "$REPLICA_PORT" "${SENTINEL_PORTS[@]}"
    if [[ $REDIS_MODE == cluster ]]; then
        ((REDIS_PORT + 5 < 55535)) || die "REDIS_PORT must stay below 55530 (cluster bus ports are port + 10000)"
        check_free "${CLUSTER_PORTS[@]}"
        local p
        for p in "$REDIS_PORT" "${CLUSTER_PORTS[@]}"; do check_free "$((p + 10000))"; done
    fi

    ensure_installed redis-server redis-server redis-server
    ensure_installed nginx nginx nginx
    local redis_bin nginx_bin
    redis_bin=$(find_bin redis-server)
    nginx_bin=$(find_bin nginx)

    if [[ -z ${HERALD_BIN:-} ]]; then
        local flags=()
        [[ $PROFILE == release ]] && flags=(--release)
        say "building herald ($PROFILE)"
        (cd "$ROOT" && cargo build "${flags[@]}" --bin herald)
        HERALD_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE/herald
    fi
    [[ -x $HERALD_BIN ]] || die "no herald binary at $HERALD_BIN"

    printf '%s\n' "$$" >"$RUN_DIR/cluster.pid"
    trap 'cleanup; exit 130' INT
    trap 'cleanup; exit 143' TERM
    trap cleanup EXIT

    # With a replica, its first full sync starts at once (Redis waits 5 s by default for
    # more replicas to share a diskless sync).
    local cluster_args=()
    [[ $REDIS_MODE != cluster ]] || cluster_args=(--cluster-enabled yes
        --cluster-config-file "$RUN_DIR/redis/nodes.conf" --cluster-node-timeout 2000)
    spawn redis "$RUN_DIR/redis.log" "$redis_bin" --port "$REDIS_PORT" --bind 127.0.0.1 \
        --save "" --appendonly no --protected-mode no --dir "$RUN_DIR/redis" \
        --repl-diskless-sync-delay 0 "${cluster_args[@]}"
    local deadline=$((SECONDS + 10))
    until port_busy "$REDIS_PORT"; do
        ((SECONDS < deadline)) || die "redis-server did not start; see $RUN_DIR/redis.log"
        sleep 0.1
    done
    local redis_args=(--redis-url "redis://127.0.0.1:$REDIS_PORT/")
    if [[ $REDIS_MODE == sentinel ]]; then
        start_sentinel_set "$redis_bin"
        local addrs
        addrs=$(printf '127.0.0.1:%s,' "${SENTINEL_PORTS[@]}")
        redis_args=(--redis-sentinel "${addrs%,}" --redis-master-name "$MASTER_NAME")
    fi
    if [[ $REDIS_MODE == cluster ]]; then
        start_redis_cluster "$redis_bin"
        local addrs
        addrs=$(printf '127.0.0.1:%s,' "$REDIS_PORT" "${CLUSTER_PORTS[@]}")
        redis_args=(--redis-cluster "${addrs%,}")
    fi

    local i mode=()
    [[ $DEV == 1 ]] && mode=(--dev)
    local extra=()
    # Word splitting of NODE_ARGS is intended: it is a list of flags.
    # shellcheck disable=SC2206
    [[ -n $NODE_ARGS ]] && extra=($NODE_ARGS)
    for i in 1 2 3; do
        spawn "herald$i" "$RUN_DIR/herald$i.log" env HERALD_LOG="${HERALD_LOG:-info}" \
            "$HERALD_BIN" --listen "127.0.0.1:${NODE_PORTS[$((i - 1))]}" \
            "${redis_args[@]}" --node-id "herald$i" \
            "${mode[@]}" "${extra[@]}"
    done
    for i in 1 2 3; do
        wait_200 "${NODE_PORTS[$((i - 1))]}" /readyz 30 ||
            die "herald$i is not ready; see $RUN_DIR/herald$i.log"
    done

    sed -e "s/__LISTEN__/127.0.0.1:$LB_PORT/" \
        -e "s/__INTERNAL_LISTEN__/127.0.0.1:$API_PORT/" \
        -e "s/__HERALD1__/127.0.0.1:${NODE_PORTS[0]}/" \
        -e "s/__HERALD2__/127.0.0.1:${NODE_PORTS[1]}/" \
        -e "s/__HERALD3__/127.0.0.1:${NODE_PORTS[2]}/" \
        "$ROOT/deploy/nginx-local.conf.tmpl" >"$RUN_DIR/nginx/nginx.conf"
    spawn nginx "$RUN_DIR/nginx/stderr.log" "$nginx_bin" -p "$RUN_DIR/nginx/" -c "$RUN_DIR/nginx/nginx.conf"
    wait_200 "$LB_PORT" /readyz 15 ||
        die "nginx is not answering; see $RUN_DIR/nginx/stderr.log and $RUN_DIR/nginx/nginx-error.log"

    local key_hdr="-H 'Authorization: Bearer $HERALD_API_KEY' " token_expr="\$($0 token alice)"
    if [[ $DEV == 1 ]]; then
        key_hdr=""
        token_expr=alice
    fi
    cat <<EOF

herald local cluster is up ($([[ $DEV == 1 ]] && echo "--dev" || echo "JWT + API key"))
  load balancer  http://127.0.0.1:$LB_PORT      WebSocket: ws://127.0.0.1:$LB_PORT/ws?token=<token>
  producer API   http://127.0.0.1:$API_PORT/api/  (nginx's internal server; /api/ is 404 on $LB_PORT)
  nodes          http://127.0.0.1:${NODE_PORTS[0]} .. ${NODE_PORTS[2]}  (/readyz, /metrics per node)
  redis          $(redis_banner)
  files          $RUN_DIR  (herald*.log, redis.log, nginx/)

Smoke test without a WebSocket client (curl shows the raw frames; the welcome names the node):
  # terminal 1: a session for user alice
  curl -sN --http1.1 -H 'Connection: Upgrade' -H 'Upgrade: websocket' \\
       -H 'Sec-WebSocket-Version: 13' -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' \\
       "http://127.0.0.1:$LB_PORT/ws?token=$token_expr"
  # terminal 2: publish to alice, then to everyone
  curl -sS ${key_hdr}-d '{"user":"alice","data":{"hello":"world"}}' http://127.0.0.1:$API_PORT/api/publish
  curl -sS ${key_hdr}-d '{"broadcast":true,"data":"hi all"}' http://127.0.0.1:$API_PORT/api/publish
(curl never answers pings, so herald closes that session after its idle timeout, 60s.)

Ctrl-C stops everything.
EOF

    local reported=()
    while true; do
        for i in "${!NAMES[@]}"; do
            if [[ -z ${reported[$i]:-} ]] && ! alive "${PIDS[$i]}"; then
                reported[i]=1
                say "${NAMES[$i]} (pid ${PIDS[$i]}) exited; see its log in $RUN_DIR"
            fi
        done
        sleep 1 &
        SLEEPER=$!
        wait "$SLEEPER" 2>/dev/null || true
        SLEEPER=""
    done
}

# The replica and three sentinels of --redis sentinel (the master is `redis`, already up).
# Each sentinel gets its own config file, which it rewrites as it learns the topology.
start_sentinel_set() {
    local redis_bin=$1 i port dir
    mkdir -p "$RUN_DIR/redis-replica"
    spawn redis-replica "$RUN_DIR/redis-replica.log" "$redis_bin" --port "$REPLICA_PORT" \
        --bind 127.0.0.1 --save "" --appendonly no --protected-mode no \
        --dir "$RUN_DIR/redis-replica" --replicaof 127.0.0.1 "$REDIS_PORT"
    for i in 1 2 3; do
        port=${SENTINEL_PORTS[$((i - 1))]}
        dir=$RUN_DIR/sentinel$i
        mkdir -p "$dir"
        printf '%s\n' "port $port" "bind 127.0.0.1" "protected-mode no" "dir $dir" \
            "sentinel monitor $MASTER_NAME 127.0.0.1 $REDIS_PORT 2" \
            "sentinel down-after-milliseconds $MASTER_NAME 2000" \
            "sentinel failover-timeout $MASTER_NAME 5000" \
            "sentinel parallel-syncs $MASTER_NAME 1" >"$dir/sentinel.conf"
        # `redis-server --sentinel` is redis-sentinel (a Debian package of its own).
        spawn "sentinel$i" "$RUN_DIR/sentinel$i.log" "$redis_bin" "$dir/sentinel.conf" --sentinel
    done
    local deadline=$((SECONDS + 10))
    for port in "$REPLICA_PORT" "${SENTINEL_PORTS[@]}"; do
        until port_busy "$port"; do
            ((SECONDS < deadline)) || die "the Sentinel set did not start; see $RUN_DIR/sentinel*.log"
            sleep 0.1
        done
    done
    # Nodes start only once the replica holds a copy: a master killed before its replica's
    # first sync would be replaced by an empty one (the sentinels promote it all the same).
    until replica_in_sync "$REPLICA_PORT"; do
        ((SECONDS < deadline)) || die "the replica did not sync; see $RUN_DIR/redis-replica.log"
        sleep 0.1
    done
    # And once every sentinel knows the two others (hello messages, every 2 s): before
    # that a failover may need a second election, which waits twice the failover timeout.
    deadline=$((SECONDS + 15))
    for port in "${SENTINEL_PORTS[@]}"; do
        until sentinel_sees_peers "$port"; do
            ((SECONDS < deadline)) || die "the sentinels did not find each other; see $RUN_DIR/sentinel*.log"
            sleep 0.2
        done
    done
}

# The five other nodes of --redis cluster (the first is `redis`, already up), joined into
# three masters with one replica each by redis-cli (Debian's redis-tools, which
# redis-server depends on).
start_redis_cluster() {
    local redis_bin=$1 i port dir
    for i in 1 2 3 4 5; do
        port=${CLUSTER_PORTS[$((i - 1))]}
        dir=$RUN_DIR/redis-c$i
        mkdir -p "$dir"
        spawn "redis-c$i" "$RUN_DIR/redis-c$i.log" "$redis_bin" --port "$port" --bind 127.0.0.1 \
            --save "" --appendonly no --protected-mode no --dir "$dir" \
            --repl-diskless-sync-delay 0 --cluster-enabled yes \
            --cluster-config-file "$dir/nodes.conf" --cluster-node-timeout 2000
    done
    local deadline=$((SECONDS + 10))
    for port in "${CLUSTER_PORTS[@]}"; do
        until port_busy "$port"; do
            ((SECONDS < deadline)) || die "the cluster nodes did not start; see $RUN_DIR/redis-c*.log"
            sleep 0.1
        done
    done
    local cli
    cli=$(find_bin redis-cli) || die "redis-cli is missing: install redis-tools"
    local addrs=()
    for port in "$REDIS_PORT" "${CLUSTER_PORTS[@]}"; do addrs+=("127.0.0.1:$port"); done
    "$cli" --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes \
        >"$RUN_DIR/cluster-create.log" 2>&1 </dev/null ||
        die "redis-cli --cluster create failed; see $RUN_DIR/cluster-create.log"
    deadline=$((SECONDS + 20))
    for port in "$REDIS_PORT" "${CLUSTER_PORTS[@]}"; do
        until [[ $("$cli" -p "$port" CLUSTER INFO 2>/dev/null) == *cluster_state:ok* ]]; do
            ((SECONDS < deadline)) || die "the cluster is not ok; see $RUN_DIR/redis*.log"
            sleep 0.2
        done
    done
}

# True when the sentinel on 127.0.0.1:$1 knows two other sentinels for the master.
sentinel_sees_peers() {
    (
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf 'SENTINEL MASTER %s\r\n' "$MASTER_NAME" >&3
        local want=0
        while IFS= read -r -t 2 line <&3; do
            line=${line%$'\r'}
            if ((want)); then
                [[ $line == \$* ]] && continue
                [[ $line == 2 ]] && exit 0
                exit 1
            fi
            [[ $line == num-other-sentinels ]] && want=1
        done
        exit 1
    ) 2>/dev/null
}

# True when the Redis on 127.0.0.1:$1 reports master_link_status:up (plain bash, no
# redis-cli needed).
replica_in_sync() {
    (
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf 'INFO replication\r\n' >&3
        while IFS= read -r -t 2 line <&3; do
            [[ $line == master_link_status:up* ]] && exit 0
            [[ $line == $'\r' ]] && break
        done
        exit 1
    ) 2>/dev/null
}

redis_banner() {
    if [[ $REDIS_MODE == cluster ]]; then
        printf 'cluster of 3 masters + 3 replicas on 127.0.0.1:%s..%s' \
            "$REDIS_PORT" "${CLUSTER_PORTS[4]}"
    elif [[ $REDIS_MODE == sentinel ]]; then
        printf 'master 127.0.0.1:%s, replica :%s, sentinels :%s (master name %s)' \
            "$REDIS_PORT" "$REPLICA_PORT" "${SENTINEL_PORTS[*]}" "$MASTER_NAME"
    else
        printf 'redis://127.0.0.1:%s/' "$REDIS_PORT"
    fi
}

# ---------- start / stop / status ----------

cmd_start() {
    mkdir -p "$RUN_DIR"
    RUN_DIR=$(cd "$RUN_DIR" && pwd)
    export RUN_DIR
    if [[ -f $RUN_DIR/cluster.pid ]] && alive "$(cat "$RUN_DIR/cluster.pid")"; then
        die "already running (pid $(cat "$RUN_DIR/cluster.pid"))"
    fi
    rm -f "$RUN_DIR/cluster.pid"
    local log=$RUN_DIR/cluster.log
    if command -v setsid >/dev/null; then
        setsid "$0" run >"$log" 2>&1 </dev/null &
    else
        nohup "$0" run >"$log" 2>&1 </dev/null &
    fi
    local pid=$! deadline=$((SECONDS + 600))
    # The first start may build herald, so allow for a compile.
    until grep -q 'cluster is up' "$log" 2>/dev/null; do
        if ! alive "$pid"; then
            cat "$log" >&2
            die "the cluster did not start"
        fi
        ((SECONDS < deadline)) || die "the cluster did not come up; see $log"
        sleep 0.5
    done
    sed -n '/cluster is up/,$p' "$log"
    say "running in the background (pid $pid); stop it with: $0 stop"
}

cmd_stop() {
    local pidfile=$RUN_DIR/cluster.pid pid
    [[ -f $pidfile ]] || {
        say "not running (no $pidfile)"
        return 0
    }
    pid=$(cat "$pidfile")
    if alive "$pid"; then
        kill -TERM "$pid"
        local deadline=$((SECONDS + STOP_WAIT + 15))
        while alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
    fi
    if alive "$pid"; then
        say "supervisor $pid did not stop; killing it and its processes"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    local f p
    for f in "$RUN_DIR"/pids/*.pid; do
        [[ -f $f ]] || continue
        p=$(cat "$f")
        if alive "$p"; then
            say "killing leftover $(basename "$f" .pid) ($p)"
            kill -KILL "$p" 2>/dev/null || true
        fi
        rm -f "$f"
    done
    rm -f "$pidfile"
    say "stopped"
}

cmd_status() {
    local f name pid state
    if [[ -f $RUN_DIR/cluster.pid ]] && alive "$(cat "$RUN_DIR/cluster.pid")"; then
        echo "supervisor  pid $(cat "$RUN_DIR/cluster.pid")  running"
    else
        echo "supervisor  not running"
    fi
    for f in "$RUN_DIR"/pids/*.pid; do
        [[ -f $f ]] || continue
        name=$(basename "$f" .pid)
        pid=$(cat "$f")
        state=dead
        alive "$pid" && state=running
        printf '%-10s  pid %-7s %s\n' "$name" "$pid" "$state"
    done
    local i
    for i in 1 2 3; do
        printf 'herald%s     127.0.0.1:%s /readyz %s\n' "$i" "${NODE_PORTS[$((i - 1))]}" \
            "$(status_of "${NODE_PORTS[$((i - 1))]}" /readyz)"
    done
    printf 'nginx       127.0.0.1:%s /readyz %s\n' "$LB_PORT" "$(status_of "$LB_PORT" /readyz)"
}

case ${1:-run} in
run) cmd_run ;;
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
token)
    shift
    cmd_token "$@"
    ;;
-h | --help | help) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//' ;;
*) die "unknown command: $1 (run, start, stop, status, token, help)" ;;
esac
