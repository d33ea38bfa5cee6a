#!/usr/bin/env bash
# The write cost of an index for the dashboard's command page (sql/0006):
# pgbench runs the SQL of one updateStock (as bench/pgbench_update_stock_x1.sql,
# with a commandId in the event, as the workers write it) with no such index,
# with a btree on the event's commandId (the first design), and with the BRIN
# on created_at that sql/0006 makes, in rotating order, ROUNDS times each, and
# prints the tps of every run and the medians. It leaves the schema as
# sql/0006 makes it when it ends or is interrupted.
#
#   bench/outbox_index_cost.sh [ROUNDS] [SECONDS]      (default 5 rounds of 10 s)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${1:-5}
SECONDS_EACH=${2:-10}
eval "$("$ROOT/scripts/servers.sh" env)"
DB=$CONVEYOR_DATABASE_URL
export PGOPTIONS="-c client_min_messages=warning"
PRODUCTS=1000
SQL=$(mktemp --suffix=.sql)
BTREE="CREATE INDEX outbox_command_id ON outbox ((payload->>'commandId'))"
BRIN="CREATE INDEX outbox_created_at_brin ON outbox USING brin (created_at)"
drop_all() { psql -q "$DB" -c "DROP INDEX IF EXISTS outbox_command_id" -c "DROP INDEX IF EXISTS outbox_created_at_brin"; }
restore() {
  drop_all
  psql -q "$DB" -c "$BRIN"
  psql -q "$DB" -c "DELETE FROM processed_commands WHERE type = 'pgbench'" -c "DELETE FROM outbox WHERE event_type = 'pgbench'"
  rm -f "$SQL"
}
trap restore EXIT
cat > "$SQL" <<'PGB'
\set p random(1, :products)
\set q random(0, 1) * 2 - 1
BEGIN;
INSERT INTO processed_commands (id, type, outcome) VALUES (gen_random_uuid(), 'pgbench', 'applied') ON CONFLICT (id) DO NOTHING;
UPDATE products SET stock = stock + :q::bigint, updated_at = now() WHERE id = ('00000000-0000-4000-8000-' || lpad(:p::text, 12, '0'))::uuid AND deleted_at IS NULL AND stock + :q::bigint BETWEEN 0 AND 2147483647 RETURNING stock;
INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) VALUES (gen_random_uuid(), 'product', ('00000000-0000-4000-8000-' || lpad(:p::text, 12, '0'))::uuid, 'pgbench', jsonb_build_object('type', 'stock.updated', 'commandId', gen_random_uuid()::text, 'data', jsonb_build_object('quantityChange', :q::int)));
COMMIT;
PGB
psql -q "$DB" -c "INSERT INTO products (id, name, price, stock)
  SELECT ('00000000-0000-4000-8000-' || lpad(g::text, 12, '0'))::uuid, 'bench ' || g, 1, 1000000
  FROM generate_series(1, $PRODUCTS) g ON CONFLICT (id) DO NOTHING"
run() {  # one run's tps; a failed pgbench stops the script with its own words
  local out tps
  out=$(pgbench -n -M prepared -c 4 -j 2 -T "$SECONDS_EACH" -D products=$PRODUCTS -f "$SQL" "$DB" 2>&1) ||
    { echo "outbox_index_cost: pgbench failed: $out" >&2; exit 1; }
  tps=$(sed -n 's/^tps = \([0-9.]*\) (without.*/\1/p' <<<"$out")
  [ -n "$tps" ] || { echo "outbox_index_cost: no tps in pgbench's output: $out" >&2; exit 1; }
  echo "$tps"
}
declare -A tps=([none]="" [btree]="" [brin]="")
modes=(none btree brin)
for r in $(seq "$ROUNDS"); do
  for k in 0 1 2; do
    mode=${modes[$(( (r + k) % 3 ))]}
    drop_all
    case $mode in btree) psql -q "$DB" -c "$BTREE" ;; brin) psql -q "$DB" -c "$BRIN" ;; esac
    tps[$mode]="${tps[$mode]} $(run)"
  done
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for mode in none btree brin; do
  # shellcheck disable=SC2086
  echo "$mode: ${tps[$mode]} tps (median $(median ${tps[$mode]}))"
done
# shellcheck disable=SC2086
awk -v o="$(median ${tps[none]})" -v t="$(median ${tps[btree]})" -v b="$(median ${tps[brin]})" \
  'BEGIN { printf "cost against no index: btree on commandId %.1f %%, brin on created_at %.1f %%\n", 100 * (o - t) / o, 100 * (o - b) / o }'
