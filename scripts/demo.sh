#!/usr/bin/env bash
# The main job, from a fresh Debian machine (as root): installs what is missing,
# starts PostgreSQL, Redis and RabbitMQ, builds Conveyor, runs the worker pool,
# and shows commands going in and events coming out, first on Redis, then on
# RabbitMQ, and a durable subscription catching up after a stop. It leaves a pool
# running on RabbitMQ for you to try by hand.
#
#   scripts/demo.sh        the demo (safe to run again: it replaces its pool)
#   scripts/demo.sh stop   stop the pool the demo left running
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
RUN="$ROOT/.state/demo"

stop_pool() {
  if [ -f "$RUN/workers.pid" ]; then
    pid=$(cat "$RUN/workers.pid")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid"
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
    rm -f "$RUN/workers.pid"
  fi
}

if [ "${1:-}" = stop ]; then stop_pool; echo "demo pool stopped"; exit 0; fi
if [ $# -gt 0 ]; then echo "usage: $0 [stop]" >&2; exit 2; fi

scripts/servers.sh up
BUILD=$(scripts/build.sh)
eval "$(scripts/servers.sh env)"
mkdir -p "$RUN"
stop_pool
export PATH="$BUILD:$PATH"

# the pool's configuration: queues.conf with the HTTP listener on (health,
# metrics, the dashboard) and a token for the dashboard's actions, kept 0600
HTTP=127.0.0.1:9464
TOKEN_FILE=$RUN/http-token
if [ ! -s "$TOKEN_FILE" ]; then
  (umask 077; openssl rand -hex 24 > "$TOKEN_FILE")
fi
# a shop's own database, with Conveyor's outbox installed in it (README: "Publishing without dual writes")
SHOP_URL="${CONVEYOR_DATABASE_URL%/*}/shop"
psql -Atq "$CONVEYOR_DATABASE_URL" -c "SELECT 1 FROM pg_database WHERE datname = 'shop'" | grep -q 1 ||
  psql -q "$CONVEYOR_DATABASE_URL" -c "CREATE DATABASE shop"
psql -q "$SHOP_URL" -c "CREATE TABLE IF NOT EXISTS public.shop_orders (id serial PRIMARY KEY, product uuid NOT NULL,
  quantity int NOT NULL, saved_at timestamptz NOT NULL DEFAULT now())"
conveyor-admin -c queues.conf producer install --database "$SHOP_URL"
# and one schedule: a "special of the day" product every 10 s (a cron with seconds, in Paris time)
{ cat queues.conf
  echo "producers = ( { name = \"shop\"; url = \"$SHOP_URL\"; } );"
  echo "http: { listen = \"$HTTP\"; token_file = \"$TOKEN_FILE\"; };"
  echo 'schedules = ( { name = "demo-special"; cron = "*/10 * * * * *"; timezone = "Europe/Paris";'
  echo '  type = "createProduct"; payload = "{\"name\": \"Special of {{slot}}\", \"price\": \"5.00\"}"; } );'
} > "$RUN/queues.conf"

start_pool() {  # transport
  CONVEYOR_TRANSPORT=$1 setsid conveyor-workers -c "$RUN/queues.conf" >>"$RUN/workers-$1.log" 2>&1 &
  echo $! > "$RUN/workers.pid"
  for _ in $(seq 100); do
    grep -q '"relay active' "$RUN/workers-$1.log" 2>/dev/null && return
    sleep 0.1
  done
  echo "the pool did not start; see $RUN/workers-$1.log" >&2; exit 1
}

demo() {  # transport
  local t=$1
  echo
  echo "=== $t: conveyor-workers running (log: $RUN/workers-$t.log)"
  : > "$RUN/workers-$t.log"
  start_pool "$t"
  export CONVEYOR_TRANSPORT=$t
  conveyor-subscribe -c queues.conf --timeout 6 '#' > "$RUN/events-$t.ndjson" &
  sub=$!
  sleep 0.5
  echo "--- publishing commands with conveyor-produce"
  pid=$(conveyor-produce -c queues.conf --wait createProduct \
        '{"name":"Espresso cup","price":"4.50","stock":12,"category":"kitchen"}' | tail -1 |
        sed -n 's/.*"productId": *"\([^"]*\)".*/\1/p')
  echo "createProduct -> product $pid"
  conveyor-produce -c queues.conf updateStock "{\"productId\":\"$pid\",\"quantityChange\":-3}" >/dev/null
  conveyor-produce -c queues.conf updateStock "{\"productId\":\"$pid\",\"quantityChange\":-20}" >/dev/null
  conveyor-produce -c queues.conf register \
    "{\"name\":\"Ada\",\"email\":\"ada.$RANDOM$RANDOM@example.com\",\"password\":\"Analytical1\"}" >/dev/null
  conveyor-produce -c queues.conf register '{"name":"","email":"nope","password":"short"}' >/dev/null
  echo "--- the shop saves an order and its updateStock -2 in ONE transaction of its own database (conveyor.enqueue);"
  echo "    a second order rolls back, and its command is never published"
  psql -Atq "$SHOP_URL" <<SQL
BEGIN;
INSERT INTO public.shop_orders (product, quantity) VALUES ('$pid', 2);
SELECT 'order ' || currval('public.shop_orders_id_seq') || ' saved with command ' ||
       conveyor.enqueue('updateStock', jsonb_build_object('productId', '$pid', 'quantityChange', -2),
                        correlation_id => 'shop-order-' || currval('public.shop_orders_id_seq'));
COMMIT;
BEGIN;
INSERT INTO public.shop_orders (product, quantity) VALUES ('$pid', 1000);
SELECT 'order ' || currval('public.shop_orders_id_seq') || ' rolled back with command ' ||
       conveyor.enqueue('updateStock', jsonb_build_object('productId', '$pid', 'quantityChange', -1000));
ROLLBACK;
SQL
  for _ in $(seq 50); do
    [ "$(psql -Atq "$SHOP_URL" -c "SELECT count(*) FROM conveyor.outbound WHERE state = 'pending'")" = 0 ] && break
    sleep 0.1
  done
  conveyor-admin -c "$RUN/queues.conf" producer status shop
  echo "--- a delayed command: updateStock +5 of that product, not before 3 s from now (conveyor-produce --in 3s)"
  conveyor-produce -c queues.conf --in 3s updateStock "{\"productId\":\"$pid\",\"quantityChange\":5}"
  sleep 0.5
  echo "parked until its time (conveyor-admin scheduled list):"
  conveyor-admin -c "$RUN/queues.conf" scheduled list || true
  echo "--- events as they arrived (conveyor-subscribe '#'):"
  wait "$sub" || true
  cat "$RUN/events-$t.ndjson"
  echo "--- the schedule demo-special (cron \"*/10 * * * * *\", Europe/Paris) fires within 10 s:"
  conveyor-subscribe -c queues.conf -n 1 --timeout 15 'product.created' || true
  conveyor-admin -c "$RUN/queues.conf" schedules || true
  durable "$t" "$pid"
  unset CONVEYOR_TRANSPORT
}

# A durable subscription (README: "Durable subscriptions") catches up after a
# stop: its first run creates it and takes what comes; stopped, it misses
# nothing: the commands published meanwhile are waiting for its second run.
durable() {  # transport product-id
  local t=$1 pid=$2 name="demo-view-$1" first
  echo "--- a durable subscription: conveyor-subscribe --name $name 'stock.*'"
  # start clean: an earlier demo's subscription would have kept stock events for it
  # since (harmless: the first run below takes them too)
  conveyor-admin -c "$RUN/queues.conf" subscriptions remove "$name" >/dev/null 2>&1 || true
  conveyor-subscribe -c queues.conf --name "$name" --timeout 3 'stock.*' > "$RUN/durable-$t-1.ndjson" &
  first=$!
  for _ in $(seq 100); do  # created once its row is in the registry (after its broker objects)
    [ "$(psql -Atq "$CONVEYOR_DATABASE_URL" -c "SELECT count(*) FROM subscriptions WHERE name = '$name'")" = 1 ] && break
    kill -0 "$first" 2>/dev/null || break
    sleep 0.1
  done
  conveyor-produce -c queues.conf --wait updateStock "{\"productId\":\"$pid\",\"quantityChange\":1}" >/dev/null
  wait "$first" || true  # exit 4: 3 s without an event
  echo "first run (stopped after 3 s without an event) received:"
  cat "$RUN/durable-$t-1.ndjson"
  echo "--- with no process of $name running, 3 updateStock +1 are applied:"
  for _ in 1 2 3; do
    ev=$(conveyor-produce -c queues.conf --wait updateStock "{\"productId\":\"$pid\",\"quantityChange\":1}" | tail -1)
    echo "  stock.updated: $(sed -n 's/.*"previousStock": *\([0-9]*\).*/\1/p' <<<"$ev") -> $(sed -n 's/.*"stock": *\([0-9]*\).*/\1/p' <<<"$ev")"
  done
  conveyor-admin -c "$RUN/queues.conf" subscriptions list 2>/dev/null || true
  echo "--- started again, $name receives what was published while it was stopped:"
  conveyor-subscribe -c queues.conf --name "$name" -n 3 --timeout 15 || echo "(it did not: exit status $?)"
}

demo redis
stop_pool
demo rabbitmq

echo "--- 2,000 more commands from stdin, for the dashboard's throughput chart"
for i in $(seq 2000); do
  printf '{"type":"createProduct","payload":{"name":"Demo item %d","price":"1.00","stock":5}}\n' "$i"
done | CONVEYOR_TRANSPORT=rabbitmq conveyor-produce -c queues.conf >/dev/null
echo "published 2,000 createProduct"

cat <<MSG

The pool is still running on RabbitMQ (pid $(cat "$RUN/workers.pid"), log $RUN/workers-rabbitmq.log).
The dashboard: http://$HTTP/  (its action token: $TOKEN_FILE)
Its health and metrics: http://$HTTP/readyz, http://$HTTP/livez, http://$HTTP/metrics
(readyz now: $(curl -s --max-time 3 "http://$HTTP/readyz" || echo "not answering"))
Try it by hand:
  eval "\$(scripts/servers.sh env)"; export PATH="$BUILD:\$PATH"
  conveyor-subscribe 'stock.*' &
  conveyor-produce --wait createProduct '{"name":"Mug","price":3,"stock":11}'
  conveyor-produce updateStock '{"productId":"$pid","quantityChange":-1}'
  conveyor-subscribe --name demo-view-rabbitmq -t 5   # the demo's durable subscription: the stock events since the demo
  curl -s http://$HTTP/metrics | grep '^conveyor_commands_total' 
  amqp-publish --url="\$CONVEYOR_RABBITMQ_URL" -e conveyor.commands -r createProduct -p \\
    -b '{"id":"'\$(cat /proc/sys/kernel/random/uuid)'","type":"createProduct","payload":{"name":"Bowl","price":"2.00"}}'
Stop it with: scripts/demo.sh stop
MSG
