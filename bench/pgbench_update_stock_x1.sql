-- The limit: exactly the SQL one updateStock command costs, one command per
-- transaction (the dedup row, the conditional stock update, the outbox row,
-- commit), as pgbench -M prepared runs it. Rows are tagged 'pgbench' and deleted
-- afterwards by bench/run.py. What Conveyor adds to this (bench/pgbench_conveyor_sql_x1.sql,
-- and the broker) is part of what the ratio measures.
\set p random(1, :products)
\set q random(0, 1) * 2 - 1
BEGIN;
INSERT INTO processed_commands (id, type, outcome) VALUES (gen_random_uuid(), 'pgbench', 'applied') ON CONFLICT (id) DO NOTHING;
UPDATE products SET stock = stock + :q::bigint, updated_at = now() WHERE id = ('00000000-0000-4000-8000-' || lpad(:p::text, 12, '0'))::uuid AND deleted_at IS NULL AND stock + :q::bigint BETWEEN 0 AND 2147483647 RETURNING stock;
INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) VALUES (gen_random_uuid(), 'product', ('00000000-0000-4000-8000-' || lpad(:p::text, 12, '0'))::uuid, 'pgbench', jsonb_build_object('type', 'stock.updated', 'data', jsonb_build_object('quantityChange', :q::int)));
COMMIT;
