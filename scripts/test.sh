#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine (as root): installs what is
# missing, starts three sets of local servers, runs the static analysis
# (scripts/analyze.sh: a finding fails the suite), builds three trees (Release,
# ASan+UBSan, and Release again for the third run), then runs every unit and
# integration test against real PostgreSQL, Redis and RabbitMQ on both
# transports, in three runs side by side, each against its own server set:
#
#   1. the Release build's tests but those labelled hosts and faults (the
#      benchmark's smoke run, label bench, in this build only), on the caller's
#      set (CONVEYOR_PG_PORT, ...: scripts/servers.sh; the README's ports by default);
#   2. the ASan build's tests but hosts, faults and bench (the fuzzer, label
#      fuzz, in this build only), on a second set: CONVEYOR_ASAN_<NAME> for
#      each CONVEYOR_<NAME> of servers.sh (PG_PORT, REDIS_PORT, AMQP_PORT,
#      AMQP_DIST_PORT, AMQP_NODENAME, TLS_PORT_BASE, STATE_DIR), by default
#      55532, 56479, 55772, 55773, conveyor2@localhost, 57100 and the first
#      set's state folder with "-asan" after it;
#   3. with the Release binaries of build-hosts/ (its own ctest tree: two ctest
#      runs in one tree would share Testing/ and test-logs/), on a third set
#      (CONVEYOR_FAULTS_<NAME>, by default 55632, 56579, 55872, 55873,
#      conveyor3@localhost, 57200, the first state folder with "-faults"): the
#      long fault runs on local servers (label faults), then the tests labelled
#      hosts (network namespaces with fixed names and servers of their own: one
#      hosts run at a time on a machine).
#
# Each run's output goes to its own log (build/test-run-release.log,
# build-asan/test-run-asan.log, build-hosts/test-run-faults.log,
# build-hosts/test-run-hosts.log) and is printed, with
# the figures its tests printed, when the run ends. Exit status 0 when the
# analysis found nothing and every test passed, 1 otherwise. Safe to run again.
#
#   scripts/test.sh            everything
#   scripts/test.sh -R redis   extra arguments go to ctest, every run (select by
#                              name: -R, -E; a -L or -LE would combine with the
#                              runs' own); a selection without a hosts test skips
#                              the hosts run (-R test_commands holds one: test_pg_failover's
#                              test_commands_survive_a_failover..., so add -E failover)
#   CONVEYOR_SKIP_HOSTS=1 scripts/test.sh   no hosts run (another party's hosts run
#                              is on: the namespaces' names are the machine's)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if [ "$(id -u)" = 0 ] && ! command -v apt-get >/dev/null; then
  echo "test.sh: needs Debian (apt-get)" >&2; exit 1
fi

# The ASan run's server set, exported over the caller's (in a subshell).
use_asan_set() {
  local first_state; first_state=$(scripts/servers.sh state)
  export CONVEYOR_PG_PORT=${CONVEYOR_ASAN_PG_PORT:-55532}
  export CONVEYOR_REDIS_PORT=${CONVEYOR_ASAN_REDIS_PORT:-56479}
  export CONVEYOR_AMQP_PORT=${CONVEYOR_ASAN_AMQP_PORT:-55772}
  export CONVEYOR_AMQP_DIST_PORT=${CONVEYOR_ASAN_AMQP_DIST_PORT:-55773}
  export CONVEYOR_AMQP_NODENAME=${CONVEYOR_ASAN_AMQP_NODENAME:-conveyor2@localhost}
  export CONVEYOR_TLS_PORT_BASE=${CONVEYOR_ASAN_TLS_PORT_BASE:-57100}
  export CONVEYOR_STATE_DIR=${CONVEYOR_ASAN_STATE_DIR:-$first_state-asan}
}

# The third run's server set (the long fault runs, then the hosts tests), as use_asan_set.
use_faults_set() {
  local first_state; first_state=$(scripts/servers.sh state)
  export CONVEYOR_PG_PORT=${CONVEYOR_FAULTS_PG_PORT:-55632}
  export CONVEYOR_REDIS_PORT=${CONVEYOR_FAULTS_REDIS_PORT:-56579}
  export CONVEYOR_AMQP_PORT=${CONVEYOR_FAULTS_AMQP_PORT:-55872}
  export CONVEYOR_AMQP_DIST_PORT=${CONVEYOR_FAULTS_AMQP_DIST_PORT:-55873}
  export CONVEYOR_AMQP_NODENAME=${CONVEYOR_FAULTS_AMQP_NODENAME:-conveyor3@localhost}
  export CONVEYOR_TLS_PORT_BASE=${CONVEYOR_FAULTS_TLS_PORT_BASE:-57200}
  export CONVEYOR_STATE_DIR=${CONVEYOR_FAULTS_STATE_DIR:-$first_state-faults}
}

scripts/servers.sh up
(use_asan_set; mkdir -p "$CONVEYOR_STATE_DIR"; chmod 755 "$CONVEYOR_STATE_DIR"; scripts/servers.sh up)
(use_faults_set; mkdir -p "$CONVEYOR_STATE_DIR"; chmod 755 "$CONVEYOR_STATE_DIR"; scripts/servers.sh up)
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
unset CONVEYOR_TRANSPORT CONVEYOR_EVENTS_TRANSPORT
status=0

echo "=== static analysis"
scripts/analyze.sh || status=1
# both builds before any test starts: a build beside the tests would take their CPU
# (nor beside the analysis: on 2 cores that was no faster than one after the other)
echo "=== build: release"; release=$(scripts/build.sh release)
echo "=== build: asan"; asan=$(scripts/build.sh asan)
echo "=== build: hosts"; hosts=$(scripts/build.sh hosts)

# run_tests NAME DIR CTEST-ARGS...: ctest in DIR against the server set of the
# environment, its output into DIR/test-run-NAME.log and its LastTest.log kept
# beside it (DIR/test-run-NAME.LastTest.log: a later run in DIR writes over
# the first); then prints both (under a lock: the runs end in any order) and
# returns ctest's status.
run_tests() {
  local name=$1 dir=$2; shift 2
  local log="$dir/test-run-$name.log" rc=0
  eval "$(scripts/servers.sh env)"
  echo "=== tests: $name ($dir, PostgreSQL port ${CONVEYOR_PG_PORT:-55432}): started $(date -u +%T), log $log"
  ctest --test-dir "$dir" --output-on-failure --timeout 900 "$@" >"$log" 2>&1 || rc=$?
  cp "$dir/Testing/Temporary/LastTest.log" "$dir/test-run-$name.LastTest.log" 2>/dev/null || true
  {
    flock 9
    echo "=== tests: $name ended $(date -u +%T) (ctest status $rc)"
    cat "$log"
    echo "=== figures: $name"
    grep -hE '^(FIGURES|chaos \(|[0-9]+ poison messages|worst commit-to-event|standby relay published)' \
      "$dir/test-run-$name.LastTest.log" 2>/dev/null || true
  } 9>"$ROOT/build/test-run.lock"
  return $rc
}

hosts_tests=$(ctest --test-dir "$hosts" -N -L hosts "$@" | sed -n 's/^Total Tests: //p')
faults_tests=$(ctest --test-dir "$hosts" -N -L faults -LE hosts "$@" | sed -n 's/^Total Tests: //p')
# Three runs side by side (the tests mostly wait on servers; CI's 45 minutes is the
# longest of them): the Release build's tests but the long fault runs; the ASan build's;
# and, in build-hosts/ (Release binaries, a ctest tree of its own: two ctest runs never
# share Testing/ or test-logs/), the long fault runs, then the hosts tests.
# the chaos test's 20,000 commands, half in the Release run: the longest chain must stay within CI's time
(export CONVEYOR_CHAOS_COMMANDS=10000; run_tests release "$release" -LE 'hosts|fuzz|faults' "$@") &
release_run=$!
(use_asan_set
 export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
 export CONVEYOR_CHAOS_COMMANDS=5000 # the chaos test's 20,000 commands, a quarter under the sanitizers
 run_tests asan "$asan" -LE 'hosts|faults|bench' "$@") &
asan_run=$!
(use_faults_set
 rc=0
 if [ "${faults_tests:-0}" -gt 0 ]; then
   (export CONVEYOR_CHAOS_COMMANDS=10000; run_tests faults "$hosts" -L faults -LE hosts "$@") || rc=1
 else
   echo "=== tests: faults: none selected"
 fi
 if [ -n "${CONVEYOR_SKIP_HOSTS:-}" ] && [ "$CONVEYOR_SKIP_HOSTS" != 0 ]; then
   echo "=== tests: hosts: skipped (CONVEYOR_SKIP_HOSTS)"
 elif [ "${hosts_tests:-0}" -gt 0 ]; then
   (unset CONVEYOR_CHAOS_COMMANDS; run_tests hosts "$hosts" -L hosts "$@") || rc=1
 else
   echo "=== tests: hosts: none selected"
 fi
 exit $rc) &
faults_run=$!
wait $release_run || status=1
wait $asan_run || status=1
wait $faults_run || status=1
exit $status
