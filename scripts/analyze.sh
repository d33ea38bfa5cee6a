#!/usr/bin/env bash
# Static analysis: cppcheck over the C sources, a build with gcc's -fanalyzer
# (build-analyzer/), and a gcc pass for ignored results of the calls glibc
# marks. Exits non-zero on any finding of any of them.
# Installs cppcheck when it is missing (needs root then). scripts/test.sh runs it.
#
#   scripts/analyze.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
"$ROOT/scripts/servers.sh" install  # gcc, cmake and the libraries' headers
if ! command -v cppcheck >/dev/null; then
  [ "$(id -u)" = 0 ] || { echo "analyze: cppcheck is missing and installing it needs root" >&2; exit 1; }
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cppcheck >/dev/null
fi
status=0

echo "analyze: cppcheck" >&2
# warning, performance, portability and style; --library=posix knows the POSIX
# calls. Left out of style, for the whole tree:
#   variableScope   "could be declared in an inner scope": taste, not a defect
#   constParameter  "could point to const": a PGconn, a broker or a stop flag
#                   is passed as the object it is, whatever this function does
#   usleepCalled    obsolescent in POSIX; Conveyor is Linux-only (eventfd,
#                   prctl) and glibc keeps it
# Anything else is wrong in the code or suppressed on its line
# (// cppcheck-suppress id ; why).
cppcheck --quiet --error-exitcode=1 --std=c11 -D_GNU_SOURCE --library=posix --inline-suppr \
  --enable=warning,performance,portability,style \
  --suppress=variableScope --suppress=constParameter --suppress=usleepCalled \
  --template='{file}:{line}: {severity} ({id}): {message}' \
  -I shared -I workers -I workers/domain -I workers/http -I producer -I tests/unit \
  shared workers producer bench/*.c tests/unit tests/fuzz || status=1

echo "analyze: gcc -fanalyzer (build-analyzer)" >&2
dir="$ROOT/build-analyzer"
cmake -S "$ROOT" -B "$dir" -DCMAKE_BUILD_TYPE=Debug -DCMAKE_C_FLAGS=-fanalyzer >/dev/null
# -Werror is on: a finding fails the file, which leaves no object and so is
# analysed again next time; -k reports every file's findings at once
if ! cmake --build "$dir" -j "$(nproc)" -- -k >"$dir/analyzer.log" 2>&1; then
  grep -E 'error:|warning:' "$dir/analyzer.log" >&2 || tail -20 "$dir/analyzer.log" >&2
  echo "analyze: the -fanalyzer build failed; the paths that lead to each finding are in $dir/analyzer.log" >&2
  status=1
fi

echo "analyze: ignored results (gcc -O1 -D_FORTIFY_SOURCE=2)" >&2
# glibc marks read, write, fscanf, asprintf, ... warn_unused_result only under
# _FORTIFY_SOURCE, which needs optimisation; and -fanalyzer loses sight of a
# NULL passed to sprintf once fortify turns it into __sprintf_chk. So this is
# a pass of its own, over what the build above compiles.
cflags=$(pkg-config --cflags librabbitmq hiredis libpq libcjson uuid libconfig libsodium)
for f in shared/*.c workers/*.c workers/domain/*.c workers/http/*.c producer/*.c bench/*.c tests/unit/*.c; do
  # shellcheck disable=SC2086
  gcc -std=c11 -D_GNU_SOURCE -O1 -D_FORTIFY_SOURCE=2 -Werror=unused-result -c -o /dev/null \
    $cflags -I shared -I workers -I workers/domain -I workers/http -I producer -I tests/unit "$f" || status=1
done

[ $status = 0 ] && echo "analyze: no findings" >&2
exit $status
