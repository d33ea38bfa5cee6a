-- Commands that wait for their time, and the state of the schedules.
--
-- parked_commands is the one place where a command waits (docs/decisions.md,
-- "Where commands wait"): a command taken before its notBefore, a schedule's
-- slot, and (issue 24) a command held by a rate limit. The pool's timekeeper
-- (workers/timekeeper.c: one active across every pool, like the relay)
-- publishes each row to its queue once due_at has passed by this database's
-- clock, and deletes it after the broker confirmed it; a worker that takes the
-- command then applies it (a copy sent twice is absorbed by the dedup row).
CREATE TABLE parked_commands (
    id        uuid PRIMARY KEY,                 -- the command's id (the envelope's)
    queue     text NOT NULL,                    -- the queue it goes back to
    type      text NOT NULL,
    due_at    timestamptz NOT NULL,             -- not published before this
    envelope  text NOT NULL,                    -- the message as taken, byte for byte
    reason    text NOT NULL CHECK (reason IN ('delayed', 'schedule')),
    schedule  text,                             -- reason 'schedule': which one
    parked_at timestamptz NOT NULL DEFAULT now()
);
-- the timekeeper's look for due rows, and the count per queue
CREATE INDEX parked_commands_due ON parked_commands (due_at);
CREATE INDEX parked_commands_queue ON parked_commands (queue, due_at);

-- One row per schedule of queues.conf that ever fired or was paused. The slot
-- key is the slot's local wall time for a cron schedule ("2026-10-25T02:30:00",
-- so a wall time that happens twice is one slot), "@<unix seconds>" for an
-- `every` one; the command id of a slot is a UUIDv5 of the schedule's name and
-- that key (shared/schedule.c), so a slot fired twice is applied once.
CREATE TABLE schedules (
    name             text PRIMARY KEY,
    paused           boolean NOT NULL DEFAULT false,
    cursor           bigint,                    -- slots after this are not fired yet: the naive wall
                                                -- seconds of a cron slot, the unix seconds of an `every` one
    last_slot        text,                      -- the key of the last slot fired (or skipped by catch_up)
    last_slot_at     timestamptz,               -- that slot's instant
    last_command_id  uuid,                      -- the command the last fired slot sent
    next_slot_at     timestamptz,               -- the next slot's instant, as last computed
    fired            bigint NOT NULL DEFAULT 0, -- slots fired (manual runs not counted)
    missed           bigint NOT NULL DEFAULT 0, -- slots skipped by catch_up
    runs             bigint NOT NULL DEFAULT 0, -- manual runs (conveyor-admin schedules run)
    updated_at       timestamptz NOT NULL DEFAULT now(),
    updated_by       text                       -- who paused or resumed it last
);

-- The instant of a local wall time in a time zone (an IANA name, read from the
-- tz data PostgreSQL uses; never the session's TimeZone). A wall time that
-- happens twice (the clocks go back) is PostgreSQL's reading of it: the later
-- of its two instants, in standard time. A wall time that does not exist (the
-- clocks go forward) is the instant of the change: that of the first wall time
-- after it that exists (changes fall on whole minutes; looked for within a day).
CREATE FUNCTION conveyor_wall_instant(wall timestamp, zone text) RETURNS timestamptz
LANGUAGE sql STABLE STRICT AS $$
    SELECT CASE WHEN (wall AT TIME ZONE zone) AT TIME ZONE zone = wall THEN wall AT TIME ZONE zone
           ELSE coalesce((SELECT min(c.w) FROM (SELECT date_trunc('minute', wall) + make_interval(mins => k) AS w
                                                 FROM generate_series(1, 1440) AS k) AS c
                           WHERE (c.w AT TIME ZONE zone) AT TIME ZONE zone = c.w) AT TIME ZONE zone,
                         wall AT TIME ZONE zone)
           END
$$;
