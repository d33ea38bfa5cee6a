#!/usr/bin/env bash
# The write cost of the dashboard's outbox_command_id index (sql/0006): pgbench
# runs the SQL of one updateStock (as bench/pgbench_update_stock_x1.sql, with a
# commandId in the event, as the workers write it) with the index and without
# it, alternating, ROUNDS times each, and prints the tps of every run and the
# medians. The index is dropped and created again around the "without" runs;
# the script puts it back when it ends or is interrupted.
#
#   bench/outbox_index_cost.sh [ROUNDS] [SECONDS]      (default 5 rounds of 10 s)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${1:-5}
SECONDS_EACH=${2:-10}
eval "$("$ROOT/scripts/servers.sh" env)"
DB=$CONVEYOR_DATABASE_URL
PRODUCTS=1000
SQL=$(mktemp --suffix=.sql)
restore() {
  psql -q "$DB" -c "CREATE INDEX IF NOT EXISTS outbox_command_id ON outbox ((payload->>'commandId'))"
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
run() {
  pgbench -n -M prepared -c 4 -j 2 -T "$SECONDS_EACH" -D products=$PRODUCTS -f "$SQL" "$DB" 2>/dev/null |
    sed -n 's/^tps = \([0-9.]*\) (without.*/\1/p'
}
with=() without=()
for r in $(seq "$ROUNDS"); do
  for mode in $([ $((r % 2)) = 1 ] && echo "with without" || echo "without with"); do
    if [ "$mode" = with ]; then
      psql -q "$DB" -c "CREATE INDEX IF NOT EXISTS outbox_command_id ON outbox ((payload->>'commandId'))"
      with+=("$(run)")
    else
      psql -q "$DB" -c "DROP INDEX IF EXISTS outbox_command_id"
      without+=("$(run)")
    fi
  done
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mw=$(median "${with[@]}"); mo=$(median "${without[@]}")
echo "with the index:    ${with[*]} tps (median $mw)"
echo "without the index: ${without[*]} tps (median $mo)"
awk -v w="$mw" -v o="$mo" 'BEGIN { printf "cost of the index: %.1f %% of tps\n", 100 * (o - w) / o }'
