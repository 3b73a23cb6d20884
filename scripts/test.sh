#!/usr/bin/env bash
# Runs every test from scratch on a fresh Debian machine: installs what the tests need
# (redis-server for the private test Redis instances, nginx for the load-balancer test,
# python3 for schemathesis) where it is missing, then builds and runs the whole suite, then
# the HTTP API contract check (scripts/api-fuzz.sh: schemathesis against a real node with
# docs/openapi.yaml). Arguments are passed to `cargo test`; with any, the contract check is
# skipped (run scripts/api-fuzz.sh on its own).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
# The TLS tests make a throwaway CA with the openssl command.
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# schemathesis (scripts/api-fuzz.sh) runs in a Python venv.
command -v python3 >/dev/null 2>&1 || need+=(python3 python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  echo "test.sh: installing ${need[*]}"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${need[@]}"
  # The packages may start their system services; the tests run private instances on free
  # ports, so a packaged nginx on :80 is stopped again. A system Redis is left alone.
  if printf '%s\n' "${need[@]}" | grep -qx nginx; then
    $sudo service nginx stop >/dev/null 2>&1 || $sudo nginx -s stop >/dev/null 2>&1 || true
  fi
fi
export PATH="$PATH:/usr/sbin"

cargo build --locked --workspace --all-targets
cargo test --locked --workspace --all-targets -- "$@"

# ---------- the HTTP API contract (docs/openapi.yaml, schemathesis) ----------
if [ $# -eq 0 ]; then
  HERALD_BIN=target/debug/herald ./scripts/api-fuzz.sh
else
  echo "test.sh: test filter given, HTTP API contract check skipped (scripts/api-fuzz.sh)"
fi

# ---------- clients/js: the browser client (docs/client.md) ----------
# Unit tests (node --test, fakes only) and browser tests (Debian's Chromium, installed by
# run.sh when missing, driven by playwright-core against real herald nodes). Node.js 20
# and npm come with the machine. About 1.5 min from scratch; HERALD_SKIP_JS=1 skips it.
if [[ ${HERALD_SKIP_JS:-0} != 1 ]]; then
  echo "test.sh: clients/js unit tests"
  (cd clients/js && npm ci --no-audit --no-fund && npm test)
  # examples/browser/herald/ is the committed copy of the build that npm test just made.
  if [[ -n $(git status --porcelain -- examples/browser/herald) ]]; then
    git status --short -- examples/browser/herald
    echo "test.sh: examples/browser/herald is stale: run 'npm run build' in clients/js and commit it" >&2
    exit 1
  fi
  echo "test.sh: clients/js browser tests"
  HERALD_BIN="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/debug/herald" clients/js/test/browser/run.sh
fi
