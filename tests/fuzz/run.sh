#!/usr/bin/env bash
# Builds the libFuzzer target with clang (ASan + UBSan) and runs it for a
# bounded time over the seed corpus of tests/fuzz/seeds and the poison corpus.
#   tests/fuzz/run.sh [SECONDS]        (default 30)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SECS=${1:-30}
OUT=${CONVEYOR_FUZZ_DIR:-$ROOT/build-fuzz}
mkdir -p "$OUT/corpus"
# shellcheck disable=SC2046
clang -g -O1 -std=c11 -D_GNU_SOURCE -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -I "$ROOT/shared" -I "$ROOT/workers/domain" \
  "$ROOT/tests/fuzz/fuzz_command.c" \
  "$ROOT"/shared/{envelope,lane,json_check,event,id,clock,utf8,log,db,backoff,alloc,url,trace,json_out,db_fork}.c \
  "$ROOT"/workers/domain/validate.c "$ROOT"/workers/domain/handler*.c \
  $(pkg-config --cflags --libs libcjson libpq uuid libsodium librabbitmq) -lm -lpthread -o "$OUT/fuzz_command"
# seeds: one valid command of each type, and every message of the poison corpus
/usr/bin/python3 "$ROOT/tests/poison/corpus.py" --write-seeds "$OUT/corpus"
cp "$ROOT"/tests/fuzz/seeds/* "$OUT/corpus/" 2>/dev/null || true
"$OUT/fuzz_command" -max_total_time="$SECS" -max_len=70000 -timeout=10 -rss_limit_mb=2048 \
  -print_final_stats=1 "$OUT/corpus" 2>&1 | tail -25
