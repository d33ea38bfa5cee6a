#!/usr/bin/env bash
# Builds Conveyor into build/ (Release), or build-asan/ with: scripts/build.sh asan
# Installs the build dependencies first when they are missing (needs root then).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
"$ROOT/scripts/servers.sh" install
if [ "${1:-}" = asan ]; then
  dir="$ROOT/build-asan"; flags=(-DCMAKE_BUILD_TYPE=Debug -DCONVEYOR_SANITIZE=ON)
else
  dir="$ROOT/build"; flags=(-DCMAKE_BUILD_TYPE=Release)
fi
cmake -S "$ROOT" -B "$dir" "${flags[@]}" >/dev/null
cmake --build "$dir" -j "$(nproc)" >/dev/null
echo "$dir"
