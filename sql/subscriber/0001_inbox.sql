-- The subscriber's inbox (docs/contract.md §12), installed into a SUBSCRIBER's
-- own PostgreSQL by `conveyor-admin subscriber install --database URL`. A
-- subscriber calls conveyor.consume(subscription, event_id) inside the
-- transaction that applies the event's effect: the effect and the event's
-- dedup row commit or roll back together, so a redelivered event (delivery is
-- at least once) changes nothing the second time.

CREATE TABLE conveyor.inbox (
    subscription text NOT NULL,
    event_id     uuid NOT NULL,
    consumed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscription, event_id)
);
CREATE INDEX inbox_consumed_at ON conveyor.inbox (consumed_at);
COMMENT ON TABLE conveyor.inbox IS
    'One row per event a subscription applied; pruned after conveyor.inbox_window() (conveyor.inbox_prune)';

-- How long an event's row is kept: a copy delivered later than this after the
-- first is applied again. 30 days: longer than anything redelivers or replays
-- (the outbox keeps published events 7 days by default, relay.retention_seconds).
CREATE FUNCTION conveyor.inbox_window() RETURNS interval LANGUAGE sql IMMUTABLE AS $fn$ SELECT interval '30 days' $fn$;

-- Deletes up to max_rows rows older than the window; returns how many.
CREATE FUNCTION conveyor.inbox_prune(max_rows integer DEFAULT 1000) RETURNS integer LANGUAGE plpgsql AS $fn$
DECLARE
    n integer;
BEGIN
    DELETE FROM conveyor.inbox WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM conveyor.inbox WHERE consumed_at < now() - conveyor.inbox_window()
        ORDER BY consumed_at LIMIT max_rows));
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$fn$;

-- True the first time subscription consumes event_id (its row is written in
-- the caller's transaction), false for a duplicate: one already committed, or
-- one a concurrent transaction commits first (this call waits for it; if it
-- rolls back, this one is the first). Raises 22023 for a NULL or empty
-- subscription or a NULL event id. About one call in 1,000 also prunes up to
-- 100 rows past the window, so the table stays bounded without a job.
CREATE FUNCTION conveyor.consume(subscription text, event_id uuid) RETURNS boolean LANGUAGE plpgsql AS $fn$
BEGIN
    IF $1 IS NULL OR $1 = '' OR $2 IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'conveyor.consume: the subscription name and the event id must not be NULL or empty';
    END IF;
    INSERT INTO conveyor.inbox (subscription, event_id) VALUES ($1, $2) ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF random() < 0.001 THEN
        PERFORM conveyor.inbox_prune(100);
    END IF;
    RETURN true;
END
$fn$;
