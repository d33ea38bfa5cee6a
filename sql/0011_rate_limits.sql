-- Rate limits counted on committed work (issue 24; docs/decisions.md "Rate limits").
--
-- A limit of queues.conf's rate_limits is a token bucket per value of its key
-- (bucket '' when it has none), split into `shards` rows so that concurrent
-- transactions do not queue on one row. A worker's transaction takes its
-- commands' tokens with conveyor_rate_take before their handlers run, holding
-- the rows it debited until it commits: a rollback (a crash, a lost
-- connection, a batch that failed as a whole) returns them by itself, and the
-- batch gives back, in the same transaction, the tokens of commands that did
-- no work (rejected by their handler, or failed and retried). Each row holds
-- burst/shards tokens at most and refills at rate/shards per second, by the
-- database's clock (clock_timestamp()). The active timekeeper deletes the
-- buckets of a keyed limit that have been full for a minute (a missing bucket
-- is a full one), adding their counts to the limit's totals row (shard -1).
CREATE TABLE rate_limit_buckets (
    limit_name  text NOT NULL,                 -- the limit's name in queues.conf
    bucket      text NOT NULL,                 -- the key's value ('' without a key, and for the totals row)
    shard       int NOT NULL,                  -- 0 .. shards-1; -1: the limit's totals row (the counts of
                                               -- pruned buckets); -2: a bucket's waiting line when shards > 1
    tokens      double precision NOT NULL,     -- as of refilled_at
    refilled_at timestamptz NOT NULL,
    line_until  timestamptz,                   -- over = wait: when the last command parked for this bucket is
                                               -- due (shard 0 with one shard, else the row of shard -2)
    waited      bigint NOT NULL DEFAULT 0,     -- commands parked for a token (over = wait), committed
    rejected    bigint NOT NULL DEFAULT 0,     -- commands rejected RATE_LIMITED (over = reject), committed
    PRIMARY KEY (limit_name, bucket, shard)
);

-- A command held by a rate limit waits where delayed commands wait.
ALTER TABLE parked_commands DROP CONSTRAINT parked_commands_reason_check;
ALTER TABLE parked_commands ADD CONSTRAINT parked_commands_reason_check
    CHECK (reason IN ('delayed', 'schedule', 'rate_limited'));
ALTER TABLE parked_commands ADD COLUMN rate_limit text; -- reason 'rate_limited': which limit

-- Makes the missing rows of a bucket, full.
CREATE FUNCTION conveyor_rate_rows(p_limit text, p_bucket text, p_shards int, p_burst_s double precision)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO rate_limit_buckets (limit_name, bucket, shard, tokens, refilled_at)
    SELECT p_limit, p_bucket, s, p_burst_s, clock_timestamp() FROM generate_series(0, p_shards - 1) AS s
    ON CONFLICT DO NOTHING
$$;

-- Takes up to p_need tokens of bucket p_bucket of limit p_limit for the
-- calling transaction (the rows it debits stay locked until it ends), trying
-- its shards from p_first on without waiting for one another transaction
-- holds (SKIP LOCKED), and waiting for shard p_first only when every shard is
-- held. granted: the shard of each token taken (the caller gives one back to
-- the same shard). later_ms, one per command left without a token: with
-- p_over 'wait', in how many ms it is due (the bucket's waiting line: spaced
-- by its rate, after the last one parked, and not before a token is due in a
-- shard it holds), counted in waited; with
-- 'reject', in how many ms a token is expected (retryAfterMs), counted in
-- rejected. Rows are created full on first use.
CREATE FUNCTION conveyor_rate_take(p_limit text, p_bucket text, p_shards int, p_first int, p_rate double precision,
                                   p_burst double precision, p_need int, p_over text,
                                   OUT granted int[], OUT later_ms bigint[])
LANGUAGE plpgsql AS $$
DECLARE
    rate_s  double precision := p_rate / p_shards;
    burst_s double precision := p_burst / p_shards;
    now_ts  timestamptz := clock_timestamp();
    need    int := p_need;
    r       record;
    t       double precision;
    g       int;
    line_shard int;
    line_end timestamptz;
    soonest double precision;
    slot    timestamptz;
BEGIN
    granted := '{}';
    later_ms := '{}';
    IF (SELECT count(*) FROM rate_limit_buckets b
        WHERE b.limit_name = p_limit AND b.bucket = p_bucket AND b.shard BETWEEN 0 AND p_shards - 1) < p_shards THEN
        PERFORM conveyor_rate_rows(p_limit, p_bucket, p_shards, burst_s);
    END IF;
    FOR i IN 0 .. p_shards LOOP
        EXIT WHEN need = 0;
        IF i < p_shards THEN
            SELECT b.shard, b.tokens, b.refilled_at, b.line_until INTO r FROM rate_limit_buckets b
            WHERE b.limit_name = p_limit AND b.bucket = p_bucket AND b.shard = (p_first + i) % p_shards
            FOR UPDATE SKIP LOCKED;
        ELSIF line_shard IS NULL THEN -- every shard held by another transaction: wait for the first one
            SELECT b.shard, b.tokens, b.refilled_at, b.line_until INTO r FROM rate_limit_buckets b
            WHERE b.limit_name = p_limit AND b.bucket = p_bucket AND b.shard = p_first % p_shards
            FOR UPDATE;
            IF NOT FOUND THEN -- pruned meanwhile (an idle bucket is a full one): made again
                PERFORM conveyor_rate_rows(p_limit, p_bucket, p_shards, burst_s);
                SELECT b.shard, b.tokens, b.refilled_at, b.line_until INTO r FROM rate_limit_buckets b
                WHERE b.limit_name = p_limit AND b.bucket = p_bucket AND b.shard = p_first % p_shards
                FOR UPDATE;
            END IF;
        ELSE
            EXIT;
        END IF;
        CONTINUE WHEN NOT FOUND;
        -- refilled up to the time the row is held (a wait for its lock is not refilled twice)
        now_ts := greatest(clock_timestamp(), r.refilled_at);
        t := least(burst_s, r.tokens + rate_s * extract(epoch FROM now_ts - r.refilled_at));
        g := least(floor(t)::int, need);
        IF g > 0 THEN
            granted := granted || array_fill(r.shard, ARRAY[g]);
            t := t - g;
            need := need - g;
        END IF;
        UPDATE rate_limit_buckets SET tokens = t, refilled_at = now_ts
        WHERE limit_name = p_limit AND bucket = p_bucket AND shard = r.shard;
        IF line_shard IS NULL THEN
            line_shard := r.shard;
            line_end := r.line_until;
        END IF;
        soonest := least(coalesce(soonest, 'infinity'), (1 - t) / rate_s);
    END LOOP;
    IF need = 0 OR line_shard IS NULL THEN
        RETURN;
    END IF;
    now_ts := clock_timestamp();
    IF p_over = 'wait' THEN
        -- one waiting line per bucket, spaced by the bucket's rate: with several
        -- shards it is a row of its own (shard -2), locked after the shards
        IF p_shards > 1 THEN
            line_shard := -2;
            INSERT INTO rate_limit_buckets (limit_name, bucket, shard, tokens, refilled_at)
            VALUES (p_limit, p_bucket, -2, 0, now_ts) ON CONFLICT DO NOTHING;
            SELECT b.line_until INTO line_end FROM rate_limit_buckets b
            WHERE b.limit_name = p_limit AND b.bucket = p_bucket AND b.shard = -2 FOR UPDATE;
        END IF;
        slot := greatest(now_ts + make_interval(secs => greatest(0, soonest)),
                         coalesce(line_end + make_interval(secs => 1 / p_rate), now_ts));
        FOR k IN 1 .. need LOOP
            later_ms := later_ms || ceil(extract(epoch FROM slot - now_ts) * 1000)::bigint;
            IF k < need THEN
                slot := slot + make_interval(secs => 1 / p_rate);
            END IF;
        END LOOP;
        UPDATE rate_limit_buckets SET line_until = slot, waited = waited + need
        WHERE limit_name = p_limit AND bucket = p_bucket AND shard = line_shard;
    ELSE
        FOR k IN 1 .. need LOOP
            later_ms := later_ms || ceil((greatest(0, soonest) + (k - 1) / p_rate) * 1000)::bigint;
        END LOOP;
        UPDATE rate_limit_buckets SET rejected = rejected + need
        WHERE limit_name = p_limit AND bucket = p_bucket AND shard = line_shard;
    END IF;
END
$$;

-- Gives n tokens back to one row the calling transaction took them from (its
-- lock is held), never above the row's size.
CREATE FUNCTION conveyor_rate_refund(p_limit text, p_bucket text, p_shard int, p_burst_s double precision, n int)
RETURNS void LANGUAGE sql AS $$
    UPDATE rate_limit_buckets SET tokens = least(p_burst_s, tokens + n)
    WHERE limit_name = p_limit AND bucket = p_bucket AND shard = p_shard
$$;
