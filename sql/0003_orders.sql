-- Orders, and soft deletion of products: a deleted product keeps its row so
-- that the orders already placed keep their items (and their prices, copied
-- into order_items at the time of ordering).
ALTER TABLE products ADD COLUMN deleted_at timestamptz;

CREATE TABLE orders (
    id           uuid PRIMARY KEY,
    user_id      uuid NOT NULL REFERENCES users (id),
    status       text NOT NULL CHECK (status IN ('PLACED', 'CANCELLED')),
    total        numeric(30,2) NOT NULL CHECK (total >= 0),
    created_at   timestamptz NOT NULL DEFAULT now(),
    cancelled_at timestamptz
);
CREATE INDEX orders_user ON orders (user_id);

CREATE TABLE order_items (
    order_id   uuid NOT NULL REFERENCES orders (id),
    position   integer NOT NULL CHECK (position >= 0),
    product_id uuid NOT NULL REFERENCES products (id),
    quantity   integer NOT NULL CHECK (quantity >= 1),
    unit_price numeric(12,2) NOT NULL CHECK (unit_price >= 0),
    PRIMARY KEY (order_id, position),
    UNIQUE (order_id, product_id)
);
