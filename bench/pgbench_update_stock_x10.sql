-- The limit with batching: the SQL of ten updateStock commands in one transaction
-- (see pgbench_update_stock_x1.sql), each in its own savepoint as a batching worker
-- runs them, on products in ascending id order as a worker sorts its batch (so that
-- concurrent transactions never deadlock). Product i is drawn from the i-th tenth.
\set tenth :products / 10
\set p0 random(0 * :tenth + 1, 1 * :tenth)
\set p1 random(1 * :tenth + 1, 2 * :tenth)
\set p2 random(2 * :tenth + 1, 3 * :tenth)
\set p3 random(3 * :tenth + 1, 4 * :tenth)
\set p4 random(4 * :tenth + 1, 5 * :tenth)
\set p5 random(5 * :tenth + 1, 6 * :tenth)
\set p6 random(6 * :tenth + 1, 7 * :tenth)
\set p7 random(7 * :tenth + 1, 8 * :tenth)
\set p8 random(8 * :tenth + 1, 9 * :tenth)
\set p9 random(9 * :tenth + 1, 10 * :tenth)
\set q random(0, 1) * 2 - 1
BEGIN;
SAVEPOINT command;
INSERT INTO processed_commands (id, type, outcome) VALUES (gen_random_uuid(), 'pgbench', 'applied') ON CONFLICT (id) DO NOTHING;
UPDATE products SET stock = stock + :q::bigint, updated_at = now() WHERE id = ('00000000-0000-4000-8000-' || lpad(:p0::text, 12, '0'))::uuid AND deleted_at IS NULL AND stock + :q::bigint BETWEEN 0 AND 2147483647 RETURNING stock;
INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) VALUES (gen_random_uuid(), 'product', ('00000000-0000-4000-8000-' || lpad(:p0::text, 12, '0'))::uuid, 'pgbench', jsonb_build_object('type', 'stock.updated', 'data', jsonb_build_object('quantityChange', :q::int)));
SAVEPOINT command;
INSERT INTO processed_commands (id, type, outcome) VALUES (gen_random_uuid(), 'pgbench', 'applied') ON CONFLICT (id) DO NOTHING;
UPDATE products SET stock = stock + :q::bigint, updated_at = now() WHERE id = ('00000000-0000-4000-8000-' || lpad(:p1::text, 12, '0'))::uuid AND deleted_at IS NULL AND stock + :q::bigint BETWEEN 0 AND 2147483647 RETURNING stock;
INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) VALUES (gen_random_uuid(), 'product', ('00000000-0000-4000-8000-' || lpad(:p1::text, 12, '0'))::uuid, 'pgbench', jsonb_build_object('type', 'stock.updated', 'data', jsonb_build_object('quantityChange', :q::int)));
SAVEPOINT command;
INSERT INTO processed_commands (id, type, outcome) VALUES (gen_random_uuid(), 'pgbench', 'applied') ON CONFLICT (id) DO NOTHING;
UPDATE products SET stock = stock + :q::bigint, updated_at = now() WHERE id = ('00000000-0000-4000-8000-' || lpad(:p2::text, 12, '0'))::uuid AND deleted_at IS NULL AND stock + :q::bigint BETWEEN 0 AND 2147483647 RETURNING stock;
INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) VALUES (gen_random_uuid(), 'product', ('00000000-0000-4000-8000-' || lpad(:p2::text, 12, '0'))::uuid, 'pgbench', jsonb_build_object('type', 'stock.updated', 'data', jsonb_build_object('quantityChange', :q::int)));
SAVEPOINT command;
INSERT INTO processed_commands (id, type, outcome) VALUES (gen_random_uuid(), 'pgbench', 'applied') ON CONFLICT (id) DO NOTHING;
UPDATE products SET stock = stock + :q::bigint, updated_at = now() WHERE id = ('00000000-0000-4000-8000-' || lpad(:p3::text, 12, '0'))::uuid AND deleted_at IS NULL AND stock + :q::bigint BETWEEN 0 AND 2147483647 RETURNING stock;
INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) VALUES (gen_random_uuid(), 'product', ('00000000-0000-4000-8000-' || lpad(:p3::text, 12, '0'))::uuid, 'pgbench', jsonb_build_object('type', 'stock.updated', 'data', jsonb_build_object('quantityChange', :q::int)));
SAVEPOINT command;
INSERT INTO processed_commands (id, type, outcome) VALUES (gen_random_uuid(), 'pgbench', 'applied') ON CONFLICT (id) DO NOTHING;
UPDATE products SET stock = stock + :q::bigint, updated_at = now() WHERE id = ('00000000-0000-4000-8000-' || lpad(:p4::text, 12, '0'))::uuid AND deleted_at IS NULL AND stock + :q::bigint BETWEEN 0 AND 2147483647 RETURNING stock;
INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) VALUES (gen_random_uuid(), 'product', ('00000000-0000-4000-8000-' || lpad(:p4::text, 12, '0'))::uuid, 'pgbench', jsonb_build_object('type', 'stock.updated', 'data', jsonb_build_object('quantityChange', :q::int)));
SAVEPOINT command;
INSERT INTO processed_commands (id, type, outcome) VALUES (gen_random_uuid(), 'pgbench', 'applied') ON CONFLICT (id) DO NOTHING;
UPDATE products SET stock = stock + :q::bigint, updated_at = now() WHERE id = ('00000000-0000-4000-8000-' || lpad(:p5::text, 12, '0'))::uuid AND deleted_at IS NULL AND stock + :q::bigint BETWEEN 0 AND 2147483647 RETURNING stock;
INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) VALUES (gen_random_uuid(), 'product', ('00000000-0000-4000-8000-' || lpad(:p5::text, 12, '0'))::uuid, 'pgbench', jsonb_build_object('type', 'stock.updated', 'data', jsonb_build_object('quantityChange', :q::int)));
SAVEPOINT command;
INSERT INTO processed_commands (id, type, outcome) VALUES (gen_random_uuid(), 'pgbench', 'applied') ON CONFLICT (id) DO NOTHING;
UPDATE products SET stock = stock + :q::bigint, updated_at = now() WHERE id = ('00000000-0000-4000-8000-' || lpad(:p6::text, 12, '0'))::uuid AND deleted_at IS NULL AND stock + :q::bigint BETWEEN 0 AND 2147483647 RETURNING stock;
INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) VALUES (gen_random_uuid(), 'product', ('00000000-0000-4000-8000-' || lpad(:p6::text, 12, '0'))::uuid, 'pgbench', jsonb_build_object('type', 'stock.updated', 'data', jsonb_build_object('quantityChange', :q::int)));
SAVEPOINT command;
INSERT INTO processed_commands (id, type, outcome) VALUES (gen_random_uuid(), 'pgbench', 'applied') ON CONFLICT (id) DO NOTHING;
UPDATE products SET stock = stock + :q::bigint, updated_at = now() WHERE id = ('00000000-0000-4000-8000-' || lpad(:p7::text, 12, '0'))::uuid AND deleted_at IS NULL AND stock + :q::bigint BETWEEN 0 AND 2147483647 RETURNING stock;
INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) VALUES (gen_random_uuid(), 'product', ('00000000-0000-4000-8000-' || lpad(:p7::text, 12, '0'))::uuid, 'pgbench', jsonb_build_object('type', 'stock.updated', 'data', jsonb_build_object('quantityChange', :q::int)));
SAVEPOINT command;
INSERT INTO processed_commands (id, type, outcome) VALUES (gen_random_uuid(), 'pgbench', 'applied') ON CONFLICT (id) DO NOTHING;
UPDATE products SET stock = stock + :q::bigint, updated_at = now() WHERE id = ('00000000-0000-4000-8000-' || lpad(:p8::text, 12, '0'))::uuid AND deleted_at IS NULL AND stock + :q::bigint BETWEEN 0 AND 2147483647 RETURNING stock;
INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) VALUES (gen_random_uuid(), 'product', ('00000000-0000-4000-8000-' || lpad(:p8::text, 12, '0'))::uuid, 'pgbench', jsonb_build_object('type', 'stock.updated', 'data', jsonb_build_object('quantityChange', :q::int)));
SAVEPOINT command;
INSERT INTO processed_commands (id, type, outcome) VALUES (gen_random_uuid(), 'pgbench', 'applied') ON CONFLICT (id) DO NOTHING;
UPDATE products SET stock = stock + :q::bigint, updated_at = now() WHERE id = ('00000000-0000-4000-8000-' || lpad(:p9::text, 12, '0'))::uuid AND deleted_at IS NULL AND stock + :q::bigint BETWEEN 0 AND 2147483647 RETURNING stock;
INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) VALUES (gen_random_uuid(), 'product', ('00000000-0000-4000-8000-' || lpad(:p9::text, 12, '0'))::uuid, 'pgbench', jsonb_build_object('type', 'stock.updated', 'data', jsonb_build_object('quantityChange', :q::int)));
COMMIT;
