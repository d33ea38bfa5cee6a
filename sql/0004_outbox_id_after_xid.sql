-- An outbox row's id is taken only after its transaction has a transaction id.
-- The relay's claim floor depends on it (workers/relay.c, docs/decisions.md,
-- "The relay claims above a floor"): it moves the floor to an id L only once
-- every transaction that was running when L was handed out has ended, and it
-- can tell that only from transaction ids, so a transaction holding an outbox
-- id must already have one. CASE evaluates its condition before its result,
-- so the default assigns the transaction id (pg_current_xact_id()) before it
-- takes the next id, whatever the inserting transaction wrote before. The
-- condition is never false: the CASE never yields NULL.
ALTER TABLE outbox ALTER COLUMN id SET DEFAULT
    CASE WHEN pg_current_xact_id() IS NOT NULL THEN nextval('outbox_id_seq'::regclass) END;
-- One id at a time (the default, stated): a session caching a block of ids
-- would take them after the relay has read the sequence's last value.
ALTER SEQUENCE outbox_id_seq CACHE 1;
COMMENT ON COLUMN outbox.id IS
    'From outbox_id_seq, taken after the transaction id (sql/0004): rows must not set it explicitly';
