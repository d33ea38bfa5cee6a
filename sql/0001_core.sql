-- Conveyor core schema: users, products, the dedup table and the outbox.
-- Migrations are applied in name order, once, by conveyor-workers at start.
-- Never edit a migration that has shipped: add the next number instead.

CREATE TABLE users (
    id            uuid PRIMARY KEY,
    name          text NOT NULL CHECK (char_length(name) BETWEEN 1 AND 255),
    email         text NOT NULL CHECK (char_length(email) BETWEEN 3 AND 254 AND email = lower(email)),
    password_hash text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email_key ON users (email);

CREATE TABLE products (
    id          uuid PRIMARY KEY,
    name        text NOT NULL CHECK (char_length(name) BETWEEN 1 AND 255),
    description text CHECK (char_length(description) <= 10000),
    price       numeric(12,2) NOT NULL CHECK (price >= 0),
    stock       integer NOT NULL DEFAULT 0 CHECK (stock >= 0),
    category    text CHECK (char_length(category) <= 100),
    status      text NOT NULL DEFAULT 'DRAFT'
                CHECK (status IN ('DRAFT', 'ACTIVE', 'INACTIVE', 'ARCHIVED')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per command id ever processed: the idempotency key. Inserted in the
-- same transaction as the command's effects and its outbox rows.
CREATE TABLE processed_commands (
    id           uuid PRIMARY KEY,
    type         text NOT NULL,
    outcome      text NOT NULL CHECK (outcome IN ('applied', 'rejected')),
    processed_at timestamptz NOT NULL DEFAULT now()
);

-- The transactional outbox: payload is the whole event envelope.
CREATE TABLE outbox (
    id             bigserial PRIMARY KEY,
    event_id       uuid NOT NULL UNIQUE,
    aggregate_type text NOT NULL,
    aggregate_id   uuid NOT NULL,
    event_type     text NOT NULL,
    payload        jsonb NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    published_at   timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
CREATE INDEX outbox_published ON outbox (published_at) WHERE published_at IS NOT NULL;
