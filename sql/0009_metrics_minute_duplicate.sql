-- The dashboard's history counts a duplicate apart: a delivery the dedup row
-- absorbed (a redelivery after a crash, a producer's replay) did no work, so it
-- is neither applied nor in the latency histogram (workers/rollup.c).
ALTER TABLE metrics_minute ADD COLUMN IF NOT EXISTS duplicate bigint NOT NULL DEFAULT 0;
