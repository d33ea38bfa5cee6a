#!/usr/bin/python3
"""A shop saves an order in its own PostgreSQL and, in the same transaction,
the command for it (conveyor.enqueue): both commit, or neither does. Conveyor's
forwarder publishes the command once the transaction has committed; this
program then waits for the command's result event and prints it. Exit 0 if it
is stock.updated. (Debian: python3-psycopg2, and python3-pika or python3-redis)

Before it runs, once:
    conveyor-admin -c queues.conf producer install --database "$SHOP_DATABASE_URL"
and a pool whose queues.conf lists the shop's database:
    producers = ( { name = "shop"; url = "postgresql://.../shop"; } );

Environment: SHOP_DATABASE_URL (the shop's database), CONVEYOR_TRANSPORT
(rabbitmq or redis), CONVEYOR_RABBITMQ_URL or CONVEYOR_REDIS_URL (to read the
result event)."""
import json
import os
import sys
import time
import uuid

import psycopg2

SHOP_URL = os.environ.get("SHOP_DATABASE_URL", "postgresql://conveyor@127.0.0.1:55432/shop")
TRANSPORT = os.environ.get("CONVEYOR_TRANSPORT", "rabbitmq")


class ResultEvents:
    """Every event from now on; result(command_id) waits for a command's first event."""

    def __init__(self):
        if TRANSPORT == "rabbitmq":
            import pika
            url = os.environ.get("CONVEYOR_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:55672")
            self.conn = pika.BlockingConnection(pika.URLParameters(url))
            self.ch = self.conn.channel()
            self.ch.exchange_declare("conveyor.events", "topic", durable=True)
            self.queue = self.ch.queue_declare("", exclusive=True).method.queue
            self.ch.queue_bind(self.queue, "conveyor.events", routing_key="#")
        else:
            import redis
            self.r = redis.Redis.from_url(os.environ.get("CONVEYOR_REDIS_URL", "redis://127.0.0.1:56379/0"))
            last = self.r.xrevrange("conveyor:events", count=1)
            self.last = last[0][0] if last else b"0-0"

    def next_events(self):
        if TRANSPORT == "rabbitmq":
            method, _, body = self.ch.basic_get(self.queue, auto_ack=True)
            if method is None:
                self.conn.sleep(0.05)
                return []
            return [json.loads(body)]
        out = []
        for _, entries in self.r.xread({"conveyor:events": self.last}, count=100, block=200):
            for eid, fields in entries:
                self.last = eid
                out.append(json.loads(fields[b"event"]))
        return out

    def result(self, command_id, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for event in self.next_events():
                if event["commandId"] == command_id:  # a command's first event is its result
                    return event
        sys.exit(f"no result event for {command_id} within {timeout} s")


events = ResultEvents()  # subscribed before anything is sent
shop = psycopg2.connect(SHOP_URL)
# the shop's own tables, in schema public (named: a role called conveyor would put
# unqualified ones in schema conveyor, PostgreSQL's search_path being "$user", public)
with shop, shop.cursor() as cur:
    cur.execute("CREATE TABLE IF NOT EXISTS public.example_products (id uuid PRIMARY KEY, name text NOT NULL)")
    cur.execute("CREATE TABLE IF NOT EXISTS public.example_orders (id uuid PRIMARY KEY, product_id uuid NOT NULL, "
                "quantity int NOT NULL, command_id uuid NOT NULL, created_at timestamptz NOT NULL DEFAULT now())")

# The shop adds a product to its catalog, and tells Conveyor in the same transaction.
product_id = str(uuid.uuid4())
with shop, shop.cursor() as cur:
    cur.execute("INSERT INTO public.example_products (id, name) VALUES (%s, %s)", (product_id, "Outbox mug"))
    cur.execute("SELECT conveyor.enqueue('createProduct', %s::jsonb)",
                (json.dumps({"productId": product_id, "name": "Outbox mug", "price": "4.20", "stock": 12}),))
    created = str(cur.fetchone()[0])
# `with shop` committed: from here the forwarder publishes the command
if events.result(created)["type"] != "product.created":
    sys.exit("the product was not created")

# An order: saved with its updateStock command in one transaction. A crash
# before the commit loses both; after it, the command is sent (once) anyway.
order_id = str(uuid.uuid4())
with shop, shop.cursor() as cur:
    command_id = str(uuid.uuid4())
    cur.execute("INSERT INTO public.example_orders (id, product_id, quantity, command_id) VALUES (%s, %s, %s, %s)",
                (order_id, product_id, 3, command_id))
    cur.execute("SELECT conveyor.enqueue('updateStock', %s::jsonb, %s::uuid, %s)",
                (json.dumps({"productId": product_id, "quantityChange": -3}), command_id, f"order-{order_id}"))
shop.close()

event = events.result(command_id)
print(json.dumps(event))
sys.exit(0 if event["type"] == "stock.updated" else 1)
