-- What waits in each producer's outbox (docs/contract.md §11): written about
-- once a second by the forwarders of every pool (workers/forwarder.c), which
-- count it in the producer's own database; read by /metrics, /api/producers,
-- the dashboard and conveyor-admin stats. A view of the producer's counts,
-- as of updated_at: a producer database no pool reaches keeps its last row.
CREATE TABLE forward_state (
    producer     text PRIMARY KEY,          -- the name in queues.conf's producers
    pending      bigint NOT NULL,           -- rows not forwarded yet
    failed       bigint NOT NULL,           -- rows kept as failed (no queue routes them, not a valid command)
    oldest_age_s double precision NOT NULL, -- age of the oldest pending row (0: none)
    updated_at   timestamptz NOT NULL DEFAULT now()
);
