-- The limit: exactly the SQL one updateStock command costs a worker, one command
-- per transaction (the dedup row, the locked read and the update of the stock,
-- the outbox row, commit), as pgbench -M prepared runs it. Rows are tagged
-- 'pgbench' and deleted afterwards by bench/run.py.
\set p random(1, :products)
\set q random(0, 1) * 2 - 1
BEGIN;
INSERT INTO processed_commands (id, type, outcome) VALUES (gen_random_uuid(), 'pgbench', 'applied') ON CONFLICT (id) DO NOTHING;
SELECT stock FROM products WHERE id = ('00000000-0000-4000-8000-' || lpad(:p::text, 12, '0'))::uuid AND deleted_at IS NULL FOR UPDATE;
UPDATE products SET stock = stock + :q::int, updated_at = now() WHERE id = ('00000000-0000-4000-8000-' || lpad(:p::text, 12, '0'))::uuid;
INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) VALUES (gen_random_uuid(), 'product', ('00000000-0000-4000-8000-' || lpad(:p::text, 12, '0'))::uuid, 'pgbench', jsonb_build_object('type', 'stock.updated', 'data', jsonb_build_object('quantityChange', :q::int)));
COMMIT;
