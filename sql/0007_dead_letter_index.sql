-- The dead-letter index: RabbitMQ's dead letters, readable a page at a time.
--
-- RabbitMQ cannot show a queue's messages without taking them (a basic.get
-- and a requeue: a redelivery per look, and a cost that grows with the queue),
-- so each RabbitMQ dead letter also gets a row here, written by the worker
-- right after the broker confirmed the letter (workers/worker.c, settle_dead;
-- workers/dead_index.c). The queue conveyor.<queue>.dead stays the truth:
-- foreign tools read and take from it. The index is a copy that its readers
-- check against the queue's message count (one passive declare) before every
-- page, and rebuild from the queue when the two differ (docs/contract.md, §5,
-- "The dead-letter index"). Redis lists are paged with LRANGE: no rows here.
CREATE TABLE dead_letter_index (
    id         bigserial PRIMARY KEY,    -- the order letters came in: a page is a keyset query
    queue      text NOT NULL,
    dead_id    uuid UNIQUE,              -- the letter's x-conveyor-dead-id header (NULL: a letter without one)
    key        text NOT NULL,            -- what names it while it waits (dead_letter_key: the command id)
    message_id text,
    reason     text NOT NULL,
    error      text NOT NULL,
    attempts   integer NOT NULL,
    failed_at  text NOT NULL,
    body       bytea NOT NULL            -- the message, untouched
);
CREATE INDEX dead_letter_index_page ON dead_letter_index (queue, id);
CREATE INDEX dead_letter_index_key ON dead_letter_index (queue, key);

-- The rows per queue, kept by the triggers below, so that the check before a
-- page is one row read, not a count of the whole index. A rebuild sets
-- conveyor.dead_index_rebuild to on in its transaction and writes its queue's
-- count itself at the end.
CREATE TABLE dead_letter_index_count (
    queue text PRIMARY KEY,
    n     bigint NOT NULL
);

CREATE FUNCTION dead_letter_index_counted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('conveyor.dead_index_rebuild', true) = 'on' THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        INSERT INTO dead_letter_index_count (queue, n)
            SELECT queue, count(*) FROM added GROUP BY queue
            ON CONFLICT (queue) DO UPDATE SET n = dead_letter_index_count.n + EXCLUDED.n;
    ELSE
        UPDATE dead_letter_index_count c SET n = c.n - g.k
            FROM (SELECT queue, count(*) AS k FROM removed GROUP BY queue) g WHERE c.queue = g.queue;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER dead_letter_index_added AFTER INSERT ON dead_letter_index
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION dead_letter_index_counted();
CREATE TRIGGER dead_letter_index_removed AFTER DELETE ON dead_letter_index
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION dead_letter_index_counted();
