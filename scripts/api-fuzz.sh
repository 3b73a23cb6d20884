#!/usr/bin/env bash
# Contract check of the HTTP API: validates docs/openapi.yaml as an OpenAPI document
# (openapi-spec-validator), then runs schemathesis (property-based API testing from PyPI)
# with it against a real herald node backed by a private redis-server, and fails on any
# 5xx, any answer the spec does not describe, valid input refused, invalid input accepted,
# or a node that dies or panics. What it runs: docs/openapi.yaml's examples, the coverage
# phase (boundary values, missing and wrong-typed parameters, undocumented methods), random
# valid and invalid data per operation (--mode all), and stateful sequences along the
# spec's links (publish -> inbox -> ack / withdraw), with every check schemathesis has.
#
#   scripts/api-fuzz.sh                 build herald if needed, run the check
#   HERALD_BIN=path scripts/api-fuzz.sh use that binary instead of target/debug/herald
#   API_FUZZ_SEED=N / API_FUZZ_EXAMPLES=N   another seed / more examples per operation
#
# schemathesis and its dependencies are pinned in scripts/api-fuzz/requirements.txt and
# installed into a venv under target/ (nothing system-wide); a second run reuses it. The
# redis-server runs on a free loopback port and is killed at the end; the system Redis is
# never touched.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

out="$root/target/api-fuzz"
venv="$out/venv"
req="$root/scripts/api-fuzz/requirements.txt"
config="$root/scripts/api-fuzz/schemathesis.toml"
spec="$root/docs/openapi.yaml"
report="$out/report"
seed="${API_FUZZ_SEED:-20261}"
examples="${API_FUZZ_EXAMPLES:-1000}"
bin="${HERALD_BIN:-$root/target/debug/herald}"
api_key="api-fuzz-key-0123456789abcdef"
mkdir -p "$out"

# --- schemathesis, pinned, in a venv under target/ ---
python=$(command -v python3 || true)
if [ -z "$python" ]; then
  echo "api-fuzz: python3 is required" >&2
  exit 1
fi
stamp="$venv/.requirements.sha256"
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ ! -x "$venv/bin/schemathesis" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "api-fuzz: installing schemathesis into $venv"
  if ! "$python" -m venv --clear "$venv" 2>/dev/null; then
    # Debian's python3 splits venv (and its pip) into a package of its own.
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends python3-venv
    "$python" -m venv --clear "$venv"
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input -r "$req"
  echo "$want" >"$stamp"
fi
"$venv/bin/schemathesis" --version

# --- the document itself: valid OpenAPI 3.0, so generators can read it ---
"$venv/bin/openapi-spec-validator" "$spec"

# --- herald and a private redis-server ---
if [ -z "${HERALD_BIN:-}" ]; then
  cargo build --locked -p herald --bin herald
fi
command -v redis-server >/dev/null 2>&1 || {
  echo "api-fuzz: redis-server is required (scripts/test.sh installs it)" >&2
  exit 1
}

free_port() {
  "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
  --protected-mode no --loglevel warning >"$out/redis.log" 2>&1 &
pids+=($!)

herald_port=$(free_port)
base="http://127.0.0.1:$herald_port"
HERALD_LOG="herald=info,warn" "$bin" --listen "127.0.0.1:$herald_port" \
  --redis-url "redis://127.0.0.1:$redis_port/" --prefix api-fuzz --node-id api-fuzz \
  --jwt-secret "api-fuzz-jwt-secret-0123456789abcdef" --api-key "$api_key" >"$out/herald.log" 2>&1 &
herald_pid=$!
pids+=("$herald_pid")

ready() {
  "$python" - "$base/readyz" <<'EOF'
import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=2).status == 200 else 1)
except Exception:
    sys.exit(1)
EOF
}
for _ in $(seq 1 200); do
  ready && break
  kill -0 "$herald_pid" 2>/dev/null || { cat "$out/herald.log" >&2; echo "api-fuzz: herald exited" >&2; exit 1; }
  sleep 0.1
done
ready || { echo "api-fuzz: herald not ready at $base" >&2; exit 1; }

# --- schemathesis ---
rm -rf "$report"
echo "api-fuzz: schemathesis against $base (seed $seed, $examples examples per operation)"
start=$(date +%s)
status=0
# The run is bounded by its example counts (not by --max-time, which would make the number
# of cases depend on the machine's speed); the outer timeout only guards against a hang.
# One worker: with several, CPython 3.11.7 (this machine's) fails inside hypothesis with
# "AST constructor recursion depth mismatch", and one is reproducible anyway.
timeout 600 "$venv/bin/schemathesis" --config-file "$config" run "$spec" \
  --url "$base" \
  --header "Authorization: Bearer $api_key" \
  --seed "$seed" \
  --max-examples "$examples" \
  --workers 1 \
  --request-timeout 10 \
  --no-color \
  --report junit,har \
  --report-junit-path "$report/junit.xml" \
  --report-har-path "$report/requests.har" || status=$?
echo "api-fuzz: schemathesis took $(($(date +%s) - start)) s"

# The node must have survived everything, and answered without panicking.
if ! kill -0 "$herald_pid" 2>/dev/null; then
  echo "api-fuzz: herald died during the run (log: $out/herald.log)" >&2
  status=1
elif ! ready; then
  echo "api-fuzz: herald is not ready after the run (log: $out/herald.log)" >&2
  status=1
fi
if grep -q "panicked" "$out/herald.log"; then
  grep -m5 "panicked" "$out/herald.log" >&2
  echo "api-fuzz: herald panicked (log: $out/herald.log)" >&2
  status=1
fi

echo "api-fuzz: report $report/junit.xml, every request and answer in $report/requests.har,"
echo "api-fuzz: node log $out/herald.log; replay a failure with the curl line above"
# One line in the "N passed, N failed" form: operations (and the stateful suite) checked.
"$python" - "$report/junit.xml" "$status" <<'EOF'
import sys, xml.etree.ElementTree as ET
try:
    suites = ET.parse(sys.argv[1]).getroot()
    tests = int(suites.get("tests", 0))
    bad = int(suites.get("failures", 0)) + int(suites.get("errors", 0))
except Exception:
    tests, bad = 0, 0
if sys.argv[2] != "0":
    bad = max(bad, 1)
print(f"api-fuzz: {max(tests - bad, 0)} passed, {bad} failed")
EOF
exit "$status"
