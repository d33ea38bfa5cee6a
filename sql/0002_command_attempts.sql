-- Durable attempt counts: one row per command whose handler has started and not
-- yet finished. A worker increments it just before running the handler, so a
-- message that kills its worker every time is dead-lettered after max_attempts
-- instead of being redelivered forever. The row is deleted in the transaction
-- that commits the command.
CREATE TABLE command_attempts (
    id         uuid PRIMARY KEY,
    attempts   integer NOT NULL CHECK (attempts > 0),
    last_error text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
