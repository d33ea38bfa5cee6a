#!/bin/sh
# Publish a createProduct command to Conveyor over RabbitMQ from a shell, with
# Debian's amqp-tools, and print its result event. Exit 0 if it is product.created.
set -eu
URL=${CONVEYOR_RABBITMQ_URL:-amqp://guest:guest@127.0.0.1:55672}
ID=$(cat /proc/sys/kernel/random/uuid)
OUT=$(mktemp)
trap 'kill $SUB 2>/dev/null; rm -f "$OUT"' EXIT
# listen first: a temporary queue bound to every event (one JSON per line)
amqp-consume --url="$URL" -e conveyor.events -r '#' -x -A -- sh -c 'cat; echo' > "$OUT" &
SUB=$!
sleep 1
amqp-publish --url="$URL" -e conveyor.commands -r createProduct -p -C application/json \
  -b "{\"id\":\"$ID\",\"type\":\"createProduct\",\"payload\":{\"name\":\"Shell mug\",\"price\":\"3.50\",\"stock\":20}}"
for _ in $(seq 100); do
  if grep -q "$ID" "$OUT"; then
    EVENT=$(grep -m1 "$ID" "$OUT")
    echo "$EVENT"
    case "$EVENT" in *'"type": "product.created"'*|*'"type":"product.created"'*) exit 0 ;; *) exit 1 ;; esac
  fi
  sleep 0.1
done
echo "no result event for $ID within 10 s" >&2
exit 1
