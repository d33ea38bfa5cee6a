-- Durable subscriptions (docs/contract.md §13): the registry of named
-- subscriptions, which AMQP cannot list, with where each started, its replay's
-- progress and the counts the pools keep; and each subscription's dead letters.
CREATE TABLE subscriptions (
    name            text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_-]{1,64}$'),
    transport       text NOT NULL CHECK (transport IN ('rabbitmq', 'redis')),
    patterns        text[] NOT NULL,
    partitions      integer NOT NULL CHECK (partitions BETWEEN 1 AND 64),
    start_from      text NOT NULL DEFAULT 'newest', -- as created: newest, oldest, an RFC 3339 time, an event id
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_seen_at    timestamptz,                    -- a process of it last reported
    -- a replay from the outbox (start_from other than newest): outbox rows with
    -- replay_after < id <= replay_end published before replay_published_before
    -- (and, for a time, occurred after replay_occurred_after) are replayed;
    -- replay_cursor is the last id settled; replay_done_at set once it ended
    replay_after            bigint,
    replay_end              bigint,
    replay_published_before timestamptz,
    replay_occurred_after   timestamptz,
    replay_cursor           bigint,
    replay_done_at          timestamptz,
    replay_xmax             xid8,                   -- transactions from this one on had not ended at creation:
                                                    -- the replay waits until none of them runs
    -- what the pools count (a few seconds old at most while a pool runs)
    lag                bigint,
    oldest_age_seconds double precision,
    counted_at         timestamptz,
    empty_seen_at      timestamptz,                 -- RabbitMQ: its queues were last seen empty
    gap                text                         -- Redis: entries trimmed before it read them (NULL: none)
);

CREATE TABLE subscription_dead (
    subscription       text NOT NULL REFERENCES subscriptions (name) ON DELETE CASCADE,
    event_id           uuid NOT NULL,
    event              text NOT NULL,               -- the event's JSON as delivered
    attempts           integer NOT NULL,
    error              text NOT NULL,
    dead_at            timestamptz NOT NULL DEFAULT now(),
    retry_requested_at timestamptz,                 -- conveyor-admin subscriptions retry
    claimed_until      timestamptz,                 -- a process is handling the retry until then
    PRIMARY KEY (subscription, event_id)
);
CREATE INDEX subscription_dead_retry ON subscription_dead (subscription, dead_at) WHERE retry_requested_at IS NOT NULL;
