"""The publishing examples of the docs (examples/), run against the real servers:
a shell (amqp-tools, redis-cli), Python (pika, redis-py) and Node (amqplib,
ioredis) each publish a command and read its result event; and Python
(psycopg2) saves an order with its command in one transaction, through the
producer's outbox (examples/python/outbox_example.py)."""
import json
import os
import subprocess

from harness import ROOT, TRANSPORT, Pool, check, eq

EX = os.path.join(ROOT, "examples")
RUN = {
    "rabbitmq": [["sh", "shell/rabbitmq.sh"], ["/usr/bin/python3", "python/rabbitmq_example.py"],
                 ["node", "node/rabbitmq.js"]],
    "redis": [["sh", "shell/redis.sh"], ["/usr/bin/python3", "python/redis_example.py"], ["node", "node/redis.js"]],
}


def test_examples_publish_and_read_results():
    with Pool() as pool:
        for cmd in RUN[TRANSPORT]:
            r = subprocess.run(cmd, cwd=EX, capture_output=True, text=True, timeout=60)
            eq(r.returncode, 0, f"{' '.join(cmd)} exit status (stderr: {r.stderr[-500:]})")
            event = json.loads(r.stdout.strip().splitlines()[0])
            eq(event["type"], "product.created", f"{cmd[-1]} result event")
            check(event["data"]["status"] == "DRAFT", "a whole product.created event")
        eq(pool.stop(), (0, []), "clean stop")


def test_outbox_example_saves_an_order_with_its_command():
    """examples/python/outbox_example.py: the shop's order and its updateStock in one transaction
    (conveyor.enqueue), forwarded by the pool's forwarder; it prints the result event."""
    from test_forward import PRODUCER_URL, PRODUCERS, outbound, producer, shop_query
    producer()
    with Pool(extra=PRODUCERS) as pool:
        cmd = ["/usr/bin/python3", "python/outbox_example.py"]
        r = subprocess.run(cmd, cwd=EX, capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, SHOP_DATABASE_URL=PRODUCER_URL, CONVEYOR_TRANSPORT=TRANSPORT))
        eq(r.returncode, 0, f"{' '.join(cmd)} exit status (stderr: {r.stderr[-500:]})")
        event = json.loads(r.stdout.strip().splitlines()[0])
        eq((event["type"], event["data"]["quantityChange"], event["data"]["stock"]), ("stock.updated", -3, 9),
           "the order's result event")
        orders = shop_query("SELECT id::text, command_id::text FROM public.example_orders")
        eq(len(orders), 1, "the shop saved its order")
        eq(event["commandId"], orders[0][1], "the event is its command's")
        eq(event["correlationId"], f"order-{orders[0][0]}", "with the order as correlation id")
        eq(outbound([orders[0][1]])[orders[0][1]]["state"], "forwarded", "the outbound row is marked forwarded")
        eq(pool.stop(), (0, []), "clean stop")
