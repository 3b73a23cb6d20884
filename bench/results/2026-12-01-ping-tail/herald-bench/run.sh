#!/usr/bin/env bash
# herald-bench fanout 5,000/s against main's binary, with --cover-pings 0 (the old timing) and 25.
set -euo pipefail
cd /work/wt-pings
OUT=target/hb-cover; mkdir -p $OUT
SECRET="bench-jwt-secret-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
APIKEY="bench-api-key-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill -TERM $p 2>/dev/null || true; done; sleep 1; for p in "${PIDS[@]}"; do kill -KILL $p 2>/dev/null || true; done' EXIT
RP=$((20000 + RANDOM % 12000))
redis-server --port $RP --bind 127.0.0.1 --save '' --appendonly no --daemonize no --logfile $OUT/redis.log & PIDS+=($!)
for _ in $(seq 1 100); do redis-cli -p $RP ping >/dev/null 2>&1 && break; sleep 0.1; done
ulimit -n "$(ulimit -Hn)"
for cover in 0 25; do
  T=()
  NP=()
  for i in 1 2; do
    P=$((20000 + RANDOM % 12000))
    ${HERALD_BIN:-target/before/herald} --listen 127.0.0.1:$P --redis-url redis://127.0.0.1:$RP --jwt-secret $SECRET --api-key $APIKEY \
      --prefix hbench --max-connections 20000 --node-id hb-$cover-$i --drain-grace 5 > $OUT/herald-$cover-$i.log 2>&1 & PIDS+=($!); NP+=($!)
    for _ in $(seq 1 100); do curl -fsS http://127.0.0.1:$P/readyz >/dev/null 2>&1 && break; sleep 0.1; done
    T+=(--target ws://127.0.0.1:$P)
  done
  timeout 300 target/release/herald-bench fanout "${T[@]}" --protocol herald --secret $SECRET --sessions 16000 \
    --source-ips 127.0.0.2-127.0.0.20 --rate 5000 --duration 20 --producer redis --redis-url redis://127.0.0.1:$RP \
    --prefix hbench --hold 0 --cover-pings $cover --json $OUT/cover-$cover.json > $OUT/cover-$cover.log 2>&1 || true
  for p in "${NP[@]}"; do kill -TERM $p; done; sleep 2
  echo "cover-pings $cover: $(jq -c '{hold_s: .result.hold_s, lost, delivered, latency_ms, connect_s: .connect.duration_s}' $OUT/cover-$cover.json 2>/dev/null)"
done
