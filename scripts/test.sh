#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine (as root): installs what is
# missing, starts the local servers, runs the static analysis (scripts/analyze.sh:
# a finding fails the suite), builds twice (Release, and ASan+UBSan) and
# runs every unit and integration test against real PostgreSQL, Redis and
# RabbitMQ on both transports, with each build (the fault runs on test hosts,
# labels hosts and faults, with the Release build only). Safe to run again.
#
#   scripts/test.sh            everything
#   scripts/test.sh -R redis   extra arguments go to ctest (both builds)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if [ "$(id -u)" = 0 ] && ! command -v apt-get >/dev/null; then
  echo "test.sh: needs Debian (apt-get)" >&2; exit 1
fi
scripts/servers.sh up
scripts/demo.sh stop >/dev/null 2>&1 || true  # a demo pool would take the tests' commands
# the Node examples of the docs run in the suite, and the dashboard's browser test
# drives Debian's chromium with playwright-core: Node, npm, chromium, their packages
missing=""
command -v node >/dev/null || missing="$missing nodejs"
command -v npm >/dev/null || missing="$missing npm"
[ -x /usr/bin/chromium ] || missing="$missing chromium"
if [ -n "$missing" ]; then  # only what is missing: a Node.js from elsewhere may conflict with Debian's npm
  apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi
(cd examples/node && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=warn >/dev/null)  # playwright-core 1.60: Node >= 18
eval "$(scripts/servers.sh env)"
unset CONVEYOR_TRANSPORT CONVEYOR_EVENTS_TRANSPORT
status=0
echo "=== static analysis"
scripts/analyze.sh || status=1
for variant in release asan; do
  echo "=== build: $variant"
  dir=$(scripts/build.sh "$([ $variant = asan ] && echo asan || echo release)")
  echo "=== tests: $variant ($dir)"
  export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
  # the chaos test runs 20,000 commands; a quarter of that under the sanitizers (several times slower)
  if [ $variant = asan ]; then export CONVEYOR_CHAOS_COMMANDS=5000; else unset CONVEYOR_CHAOS_COMMANDS; fi
  # the long fault runs (label hosts: minutes of frozen nodes and failovers on
  # test hosts; label faults: a minute of kills -9 or a stop of every pool on the
  # local servers) and the benchmark's smoke run (label bench) run in the Release
  # build only, the fuzzer (label fuzz) in the sanitizer build only, where it can
  # find what it is for: the suite stays within CI's time
  if [ $variant = asan ]; then only=(-LE 'hosts|faults|bench'); else only=(-LE fuzz); fi
  ctest --test-dir "$dir" --output-on-failure --timeout 900 "${only[@]}" "$@" || status=1
  echo "=== figures: $variant"
  grep -hE '^(FIGURES|chaos \(|[0-9]+ poison messages|worst commit-to-event|standby relay published)' \
    "$dir/Testing/Temporary/LastTest.log" || true
done
exit $status
