-- The producer's outbox (docs/contract.md §11), installed into the PRODUCER's
-- own PostgreSQL by `conveyor-admin producer install --database URL`, not into
-- Conveyor's database. A producer calls conveyor.enqueue() inside its own
-- business transaction: the command exists exactly when that transaction
-- commits. A forwarder (workers/forwarder.c) publishes the rows in id order.

CREATE TABLE conveyor.command_types (
    type  text PRIMARY KEY,  -- a command type queues.conf routes
    queue text NOT NULL      -- ... to this queue (shown in errors)
);
COMMENT ON TABLE conveyor.command_types IS
    'The types conveyor.enqueue accepts: written by conveyor-admin producer install and by each forwarder that becomes active';

CREATE TABLE conveyor.settings (
    name  text PRIMARY KEY,
    value bigint NOT NULL
);
-- limits.max_message_bytes of queues.conf (refreshed like command_types)
INSERT INTO conveyor.settings VALUES ('max_message_bytes', 65536);

-- One id at a time, taken after the transaction id (as Conveyor's outbox:
-- sql/0004): the forwarder's claim floor relies on it (workers/claim_floor.c).
CREATE SEQUENCE conveyor.outbound_id_seq CACHE 1;
CREATE TABLE conveyor.outbound (
    id             bigint PRIMARY KEY
                   DEFAULT CASE WHEN pg_current_xact_id() IS NOT NULL THEN nextval('conveyor.outbound_id_seq') END,
    command_id     uuid NOT NULL UNIQUE,
    type           text NOT NULL,
    payload        jsonb NOT NULL,
    correlation_id text,
    not_before     timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    state          text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'forwarded', 'failed')),
    forwarded_at   timestamptz,
    error          text
);
ALTER SEQUENCE conveyor.outbound_id_seq OWNED BY conveyor.outbound.id;
COMMENT ON COLUMN conveyor.outbound.id IS
    'From outbound_id_seq, taken after the transaction id: rows must not set it explicitly';
-- the forwarder's claim, and the counts of what waits
CREATE INDEX outbound_waiting ON conveyor.outbound (id) WHERE state = 'pending';
CREATE INDEX outbound_failed ON conveyor.outbound (id) WHERE state = 'failed';
-- the prune of forwarded rows
CREATE INDEX outbound_forwarded ON conveyor.outbound (forwarded_at) WHERE state = 'forwarded';

-- The command a row is: its envelope, as the forwarder sends it (the JSON
-- text of this jsonb). createdAt and notBefore in UTC with microseconds.
CREATE FUNCTION conveyor.envelope(o conveyor.outbound) RETURNS jsonb LANGUAGE sql STABLE AS $fn$
    SELECT jsonb_build_object('id', o.command_id, 'type', o.type, 'payload', o.payload,
                              'createdAt', to_char(o.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
        || CASE WHEN o.correlation_id IS NULL THEN '{}'::jsonb
                ELSE jsonb_build_object('correlationId', o.correlation_id) END
        || CASE WHEN o.not_before IS NULL THEN '{}'::jsonb
                ELSE jsonb_build_object('notBefore', to_char(o.not_before AT TIME ZONE 'UTC',
                                                             'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')) END
$fn$;

-- Enqueues one command in the caller's transaction and returns its id. Checks
-- what SQL can: a type some queue routes, a JSON object payload, an id, a
-- correlation id of at most 200 characters, a finite not_before in years 1 to
-- 9999, and the envelope's size (conveyor.envelope, as sent) under
-- limits.max_message_bytes. Everything else (the payload's fields) is checked
-- by the workers, as for any producer: a bad one ends in command.rejected.
-- Raises 22023 (invalid_parameter_value) naming the problem (23505 for an id
-- enqueued before); the caller's transaction is then aborted as with any error.
CREATE FUNCTION conveyor.enqueue(type text, payload jsonb, id uuid DEFAULT gen_random_uuid(),
                                 correlation_id text DEFAULT NULL, not_before timestamptz DEFAULT NULL)
RETURNS uuid LANGUAGE plpgsql AS $fn$
DECLARE
    r conveyor.outbound;
    size bigint;
    max_bytes bigint;
BEGIN
    IF $1 IS NULL OR NOT EXISTS (SELECT 1 FROM conveyor.command_types t WHERE t.type = $1) THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('conveyor.enqueue: unknown command type %L', $1),
            HINT = 'known types: ' || coalesce((SELECT string_agg(t.type, ', ' ORDER BY t.type) FROM conveyor.command_types t), 'none (run conveyor-admin producer install)');
    END IF;
    IF $2 IS NULL OR jsonb_typeof($2) <> 'object' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('conveyor.enqueue: the payload of %s must be a JSON object, not %s', $1, coalesce(jsonb_typeof($2), 'NULL'));
    END IF;
    IF $3 IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'conveyor.enqueue: the command id must not be NULL';
    END IF;
    IF $4 IS NOT NULL AND (length($4) < 1 OR length($4) > 200) THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('conveyor.enqueue: correlation_id must be 1 to 200 characters, not %s', length($4));
    END IF;
    IF $5 IS NOT NULL AND (NOT isfinite($5) OR $5 < '0001-01-01T00:00:00Z' OR $5 >= '10000-01-01T00:00:00Z') THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('conveyor.enqueue: not_before must be a time in the years 1 to 9999, not %s', $5);
    END IF;
    INSERT INTO conveyor.outbound (command_id, type, payload, correlation_id, not_before)
        VALUES ($3, $1, $2, $4, $5) RETURNING * INTO r;
    size := octet_length(conveyor.envelope(r)::text);
    SELECT s.value INTO max_bytes FROM conveyor.settings s WHERE s.name = 'max_message_bytes';
    IF size > coalesce(max_bytes, 65536) THEN  -- the row goes with the aborted transaction
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('conveyor.enqueue: the %s command is %s bytes, over limits.max_message_bytes (%s)', $1, size, max_bytes);
    END IF;
    PERFORM pg_notify('conveyor_outbound', '');
    RETURN $3;
END
$fn$;
