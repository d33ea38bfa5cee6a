-- What each pool's workers hold, per queue: taken from the broker and not yet
-- settled (the pool's scoreboard, summed by queue). RabbitMQ tells its unacked
-- messages only through its management plugin, so conveyor-admin stats, which
-- runs outside every pool, reads in flight here: the sum over the pools whose
-- row is fresh (updated in the last 5 s). Each pool's relay (active or standing
-- by) writes its rows at most once a second (workers/pool_load.c); a clean stop
-- deletes them; a killed pool's rows go stale and stop counting.
CREATE TABLE pool_in_flight (
    pool       text NOT NULL,            -- <host>-<supervisor pid>
    queue      text NOT NULL,
    in_flight  integer NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pool, queue)
);
