-- Operations: a queue paused by `conveyor-admin queue pause`, and the dedup
-- table's pruning.
--
-- One row per queue whose state was ever set; a queue without a row is
-- running. Every pool reads the paused set (workers/queue_pause.c: at most
-- one query per pool every 400 ms) and stops taking from a paused queue.
CREATE TABLE queue_state (
    queue      text PRIMARY KEY,
    paused     boolean NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    updated_by text NOT NULL,          -- who paused or resumed it (user@host of conveyor-admin)
    note       text                    -- why, as given to conveyor-admin
);

-- processed_commands rows older than dedup.retention_days are pruned in small
-- batches (workers/dedup_prune.c), and conveyor-admin stats counts the rows
-- of the last minutes: both read by processed_at. Built without CONCURRENTLY
-- (a migration is one transaction): on a large table it holds back inserts,
-- that is the workers' commits, while it is built.
CREATE INDEX processed_commands_processed_at ON processed_commands (processed_at);
