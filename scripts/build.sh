#!/usr/bin/env bash
# Builds Conveyor into build/ (Release), build-asan/ with: scripts/build.sh asan, or build-hosts/
# (Release again: the hosts tests run from it beside the Release run) with: scripts/build.sh hosts
# Installs the build dependencies first when they are missing (needs root then).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
"$ROOT/scripts/servers.sh" install
if [ "${1:-}" = asan ]; then
  dir="$ROOT/build-asan"; flags=(-DCMAKE_BUILD_TYPE=Debug -DCONVEYOR_SANITIZE=ON)
elif [ "${1:-}" = hosts ]; then  # a second Release tree, for the hosts tests' run beside the Release run (test.sh)
  dir="$ROOT/build-hosts"; flags=(-DCMAKE_BUILD_TYPE=Release)
else
  dir="$ROOT/build"; flags=(-DCMAKE_BUILD_TYPE=Release)
fi
cmake -S "$ROOT" -B "$dir" "${flags[@]}" >/dev/null
cmake --build "$dir" -j "$(nproc)" >/dev/null
echo "$dir"
