-- 0012: order per key in a queue with lanes and `ordered = true` (issue 25;
-- docs/contract.md, section 10). A command of such a queue that fails and is
-- retried holds its ordering key: the later commands of that key wait parked
-- behind it (parked_commands, reason 'ordered', in order_seq order), and when
-- it is settled (applied, rejected, or dead-lettered once out of attempts) the
-- hold passes to the first of them, made due at once; the last one settled
-- drops the hold. Commands of other keys are never held.
-- Also here (the lanes' release, not yet shipped, rather than a migration of
-- its own): lane_oldest, the oldest command a pool's workers hold per lane.
CREATE TABLE key_holds (
    queue      text NOT NULL,
    order_key  text NOT NULL,
    command_id uuid NOT NULL,           -- the command that goes first: retrying, or released to run next
    since      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue, order_key)
);

ALTER TABLE parked_commands DROP CONSTRAINT parked_commands_reason_check;
ALTER TABLE parked_commands ADD CONSTRAINT parked_commands_reason_check
    CHECK (reason IN ('delayed', 'schedule', 'rate_limited', 'ordered'));
ALTER TABLE parked_commands ADD COLUMN order_key text;          -- reason 'ordered': the key it waits behind
CREATE SEQUENCE parked_commands_order_seq;
ALTER TABLE parked_commands ADD COLUMN order_seq bigint;        -- reason 'ordered': its place behind the key
CREATE INDEX parked_commands_order ON parked_commands (queue, order_key, order_seq) WHERE order_key IS NOT NULL;

-- Settles the keys of the commands ids[i] (keys[i]) of queue q: a key whose
-- hold is held by that command passes to the first command parked behind it
-- (made due now: the timekeeper publishes it) or, with none, is dropped.
-- Returns how many holds passed on.
CREATE FUNCTION conveyor_key_release(q text, keys text[], ids uuid[]) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    k text;
    i int;
    nxt uuid;
    passed int := 0;
BEGIN
    FOR i IN 1 .. coalesce(array_length(keys, 1), 0) LOOP
        k := keys[i];
        PERFORM 1 FROM key_holds h WHERE h.queue = q AND h.order_key = k AND h.command_id = ids[i] FOR UPDATE;
        CONTINUE WHEN NOT FOUND;
        SELECT p.id INTO nxt FROM parked_commands p
            WHERE p.queue = q AND p.order_key = k AND p.reason = 'ordered'
            ORDER BY p.order_seq LIMIT 1 FOR UPDATE;
        IF nxt IS NULL THEN
            DELETE FROM key_holds h WHERE h.queue = q AND h.order_key = k;
        ELSE
            UPDATE key_holds h SET command_id = nxt, since = now() WHERE h.queue = q AND h.order_key = k;
            UPDATE parked_commands SET due_at = now(), reason = 'delayed' WHERE id = nxt; -- order_key kept: a cancel passes it on
            passed := passed + 1;
        END IF;
    END LOOP;
    RETURN passed;
END $$;

-- The lanes' oldest age on RabbitMQ (docs/contract.md, section 10), which
-- cannot read a message without taking it: per pool, queue and lane
-- ("<class>.<i>"), the createdAt of the oldest command its workers hold of
-- that lane (buffered by the lane's consumer, or in a batch). Written by each
-- pool's relay once a second (workers/pool_load.c), rows only for lanes with
-- one; stale after 5 s like pool_in_flight; read by conveyor-admin stats and
-- the dashboard (the minimum over the fresh rows, aged by the database clock).
CREATE TABLE lane_oldest (
    pool       text NOT NULL,
    queue      text NOT NULL,
    lane       text NOT NULL,
    oldest_at  timestamptz NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pool, queue, lane)
);
