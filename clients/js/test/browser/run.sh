#!/usr/bin/env bash
# Browser tests for the herald JS client, from scratch on a fresh Debian machine:
#   - Debian's Chromium (apt-get) when /usr/bin/chromium is missing; no browser download
#   - npm ci in clients/js (typescript + playwright-core), then the client build
#   - cargo build -p herald (a no-op when scripts/test.sh built the workspace already)
#   - node --test on each test file, one after the other
# Every process a test starts (herald, the static server, nginx/redis of the cluster,
# Chromium) is stopped by PID when it ends. Screenshots: $SCREENSHOT_DIR (printed).
#
# Usage: clients/js/test/browser/run.sh [test file ...]
#        (default: sse-tokens.test.mjs, standalone.test.mjs, cluster.test.mjs)
# Environment: HERALD_BIN (skip the cargo build), CHROMIUM (default /usr/bin/chromium),
#              SCREENSHOT_DIR (default target/browser-tests/screenshots)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
pkg=$(cd "$here/../.." && pwd)
root=$(cd "$pkg/../.." && pwd)
t0=$SECONDS

say() { printf 'browser-tests: %s\n' "$*" >&2; }

export CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
if [[ ! -x $CHROMIUM ]]; then
    sudo=()
    ((EUID == 0)) || sudo=(sudo)
    say "installing Debian's chromium (no browser download)"
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium
fi
"$CHROMIUM" --version 2>/dev/null >&2 || true   # (Debian's wrapper script prints a harmless warning on stderr)

cd "$pkg"
if [[ ! -d node_modules || package-lock.json -nt node_modules/.package-lock.json ]]; then
    npm ci --no-audit --no-fund
fi
npm run build --silent

if [[ -z ${HERALD_BIN:-} ]]; then
    (cd "$root" && cargo build --locked -p herald --bin herald)
    export HERALD_BIN=${CARGO_TARGET_DIR:-$root/target}/debug/herald
fi

export SCREENSHOT_DIR=${SCREENSHOT_DIR:-$root/target/browser-tests/screenshots}
export BROWSER_RUN_DIR=${BROWSER_RUN_DIR:-$root/target/browser-tests}
rm -rf "$SCREENSHOT_DIR"
mkdir -p "$SCREENSHOT_DIR"
say "screenshots: $SCREENSHOT_DIR"
say "logs: $BROWSER_RUN_DIR"

files=("$@")
((${#files[@]})) || files=("$here/sse-tokens.test.mjs" "$here/standalone.test.mjs" "$here/cluster.test.mjs")
status=0
passed=0 failed=0 skipped=0
tap=$(mktemp -d)
trap 'rm -rf "$tap"' EXIT
for f in "${files[@]}"; do
    name=$(basename "$f" .test.mjs)
    say "== $name"
    # Each test has its own timeout; this bounds a file that hangs in setup (SIGTERM lets
    # the harness stop what it started). Spec output for people, TAP for the totals.
    timeout --kill-after=30 600 node --test --test-reporter=spec --test-reporter-destination=stdout \
        --test-reporter=tap --test-reporter-destination="$tap/$name.tap" "$f" || status=1
    count() {
        local v
        v=$(sed -n "s/^# $1 \([0-9]*\)$/\1/p" "$tap/$name.tap" 2>/dev/null | tail -1)
        echo "${v:-0}"
    }
    passed=$((passed + $(count pass)))
    failed=$((failed + $(count fail) + $(count cancelled)))
    skipped=$((skipped + $(count skipped)))
done
say "screenshots: $SCREENSHOT_DIR"
say "done in $((SECONDS - t0)) s"
((status == 0 || failed > 0)) || failed=1
echo "browser-tests: $passed passed, $failed failed, $skipped skipped"
exit $status
