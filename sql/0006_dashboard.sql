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

-- The dashboard's page for one command lists its events. A command's events
-- are written in the transaction that writes its processed_commands row, and
-- both take created_at / processed_at from now(), the transaction's start: so
-- its events are the outbox rows with created_at = its processed_at. A BRIN
-- index (one summary per 128 pages; the outbox is written in created_at order)
-- finds them at little cost to a commit (a btree on the event's commandId cost
-- twice as much: docs/decisions.md, bench/outbox_index_cost.sh).
CREATE INDEX outbox_created_at_brin ON outbox USING brin (created_at);
