-- The dashboard: its history, and a command's events found by the command.
--
-- One row per minute and queue, written by each pool's HTTP child
-- (workers/rollup.c) at the end of every minute: what its workers ended in
-- that minute. Pools add into the same row. latency holds the counts of the
-- latency histogram's buckets (createdAt to commit; bounds in
-- workers/scoreboard.c, sb_latency_bounds, and one above the last), so
-- percentiles can be taken over any span and any number of pools. Rows older
-- than 7 days are deleted by the same writer.
CREATE TABLE metrics_minute (
    minute   timestamptz NOT NULL,
    queue    text NOT NULL,
    applied  bigint NOT NULL DEFAULT 0,
    rejected bigint NOT NULL DEFAULT 0,
    retried  bigint NOT NULL DEFAULT 0,
    dead     bigint NOT NULL DEFAULT 0,
    latency  bigint[] NOT NULL,
    PRIMARY KEY (minute, queue)
);

-- The dashboard's page for one command lists its events: by the event's
-- commandId. One more index entry per event written (measured in
-- docs/performance.md).
CREATE INDEX outbox_command_id ON outbox ((payload->>'commandId'));
