#!/bin/sh
# Publish a createProduct command to Conveyor over Redis from a shell, with
# redis-cli, and print its result event. Exit 0 if it is product.created.
set -eu
# the server: CONVEYOR_REDIS_URL when set (as the other examples), else REDIS_HOST:REDIS_PORT
HOST=${REDIS_HOST:-127.0.0.1}
PORT=${REDIS_PORT:-56379}
rcli() {
  if [ -n "${CONVEYOR_REDIS_URL:-}" ]; then redis-cli -u "$CONVEYOR_REDIS_URL" "$@"; else redis-cli -h "$HOST" -p "$PORT" "$@"; fi
}
ID=$(cat /proc/sys/kernel/random/uuid)
# remember where the event stream ends now
START=$(rcli --raw XREVRANGE conveyor:events + - COUNT 1 | head -1)
[ -n "$START" ] || START=0-0
rcli LPUSH conveyor:queue:catalog \
  "{\"id\":\"$ID\",\"type\":\"createProduct\",\"payload\":{\"name\":\"Shell bowl\",\"price\":\"2.00\",\"stock\":5}}" >/dev/null
for _ in $(seq 100); do
  # --raw prints each entry as lines: id, "type", <type>, "event", <json>; the first
  # event that names the command is its result
  EVENT=$(rcli --raw XRANGE conveyor:events "($START" + COUNT 100000 |
          grep '^{' | grep -m1 "\"$ID\"" || true)
  if [ -n "$EVENT" ]; then
    echo "$EVENT"
    case "$EVENT" in *'"type": "product.created"'*) exit 0 ;; *) exit 1 ;; esac
  fi
  sleep 0.1
done
echo "no result event for $ID within 10 s" >&2
exit 1
