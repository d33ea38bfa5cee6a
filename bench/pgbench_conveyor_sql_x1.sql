-- What Conveyor's own SQL costs the database, without a broker: every
-- statement a worker with batch_size = 1 sends for one updateStock that is
-- delivered for the first time (the usual case), in order
-- (bench/pgbench_update_stock_x1.sql is the same command in its plainest SQL):
--   BEGIN and the dedup row (unnest, as for a batch); the conditional update;
--   the outbox row (from a jsonb array, as for a batch); COMMIT.
-- No attempt count (only a redelivered command has one), no settling (only a
-- rejected or failed command needs it), no NOTIFY (the pool's own relay is
-- woken without PostgreSQL).
-- A worker sends these in 2 round trips (libpq pipeline); pgbench sends each
-- alone. Rows are tagged 'pgbench' and deleted afterwards by bench/run.py.
\set p random(1, :products)
\set q random(0, 1) * 2 - 1
\set r random(1, 9000000000000000000)
BEGIN;
INSERT INTO processed_commands (id, type, outcome) SELECT DISTINCT ON (id) id, type, 'applied' FROM unnest(ARRAY[md5(:r::text)::uuid], ARRAY['pgbench']) AS c(id, type) ORDER BY id ON CONFLICT (id) DO NOTHING RETURNING id::text;
UPDATE products SET stock = stock + :q::bigint, updated_at = now() WHERE id = ('00000000-0000-4000-8000-' || lpad(:p::text, 12, '0'))::uuid AND deleted_at IS NULL AND stock + :q::bigint BETWEEN 0 AND 2147483647 RETURNING stock;
INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) SELECT (e->>'id')::uuid, e->>'aggregateType', (e->>'aggregateId')::uuid, e->>'type', e FROM jsonb_array_elements(jsonb_build_array(jsonb_build_object('id', gen_random_uuid(), 'aggregateType', 'product', 'aggregateId', ('00000000-0000-4000-8000-' || lpad(:p::text, 12, '0'))::uuid, 'type', 'pgbench', 'data', jsonb_build_object('quantityChange', :q::int)))) WITH ORDINALITY AS t(e, n) ORDER BY n;
COMMIT;
