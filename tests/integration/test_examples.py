"""The publishing examples of the docs (examples/), run against the real servers:
a shell (amqp-tools, redis-cli), Python (pika, redis-py) and Node (amqplib,
ioredis) each publish a command and read its result event; and Python
(psycopg2) saves an order with its command in one transaction, through the
producer's outbox (examples/python/outbox_example.py); and the read model of
examples/python/read_model.py and examples/node/read_model.js, kept in its own
database through a durable subscription and the inbox, catches up after a stop."""
import json
import os
import signal
import subprocess
import uuid

import psycopg2

from harness import BIN, DB_URL, ROOT, TRANSPORT, Pool, check, db, eq, log_file, new_id, query, run_bin

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


# ---- a read model kept by a durable subscription (examples/*/read_model.*) -------

READ_MODEL_DB = "read_model_test"


def read_model_database():
    """A fresh subscriber database with Conveyor's inbox installed; returns its URL."""
    admin = db()
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {READ_MODEL_DB} WITH (FORCE)")
        cur.execute(f"CREATE DATABASE {READ_MODEL_DB}")
    admin.close()
    url = DB_URL.rsplit("/", 1)[0] + "/" + READ_MODEL_DB
    r = run_bin("conveyor-admin", "subscriber", "install", "--database", url)
    eq(r.returncode, 0, f"subscriber install: exit status; stderr: {r.stderr}")
    return url


def produce(config, commands, want_status=0):
    """Publishes commands (envelopes) with conveyor-produce --wait: each is applied
    (or rejected) when it returns."""
    r = run_bin("conveyor-produce", "-c", config, "--wait", input_="".join(json.dumps(c) + "\n" for c in commands),
                timeout=120)
    eq(r.returncode, want_status, f"conveyor-produce --wait: exit status (stderr: {r.stderr[-500:]})")


def summary(stdout, what):
    """The example's last line: {"handled", "applied", "duplicates", "nacked"}."""
    lines = stdout.strip().splitlines()
    check(lines, f"{what}: no output")
    return json.loads(lines[-1])


def read_model_runs(program, prefix):
    """program (examples/python/read_model.py or examples/node/read_model.js) keeps
    stock_view in its own database through a durable subscription it creates: a
    first run handles the events of creates and updateStock commands published
    while it runs; then, with no process of the subscription running, more
    commands (a stock change, an update, a delete, a create, a rejected
    updateStock); a second run catches up with exactly those, one of them (as
    if a run had crashed after its commit, before its ack) a duplicate the
    inbox drops. The read model then holds the products table's stock, and the
    inbox exactly the events of product.* and stock.* the commands caused, each
    once."""
    url = read_model_database()
    name = f"{prefix}-{TRANSPORT}-{uuid.uuid4().hex[:8]}"
    p1, p2, p3, p4 = (new_id() for _ in range(4))

    def cmd(type_, **payload):
        return {"id": new_id(), "type": type_, "payload": payload}

    creates = [cmd("createProduct", productId=p, name=f"Read model {i}", price="2.50", stock=s)
               for i, (p, s) in enumerate(((p1, 20), (p2, 30), (p3, 12)))]
    # 20 -> 15: stock.updated; 30 -> 5: and stock.low; 12 -> 0: and stock.low, stock.depleted
    updates = [cmd("updateStock", productId=p1, quantityChange=-5), cmd("updateStock", productId=p2, quantityChange=-25),
               cmd("updateStock", productId=p3, quantityChange=-12)]
    first_events = 3 + 1 + 2 + 3
    # while stopped: stock.updated, product.updated, product.deleted, product.created, and a
    # command.rejected (INSUFFICIENT_STOCK) its patterns do not match
    restock = cmd("updateStock", productId=p1, quantityChange=7)
    later = [restock, cmd("updateProduct", productId=p1, name="Read model 0, renamed"), cmd("deleteProduct", productId=p2),
             cmd("createProduct", productId=p4, name="Read model 3", price="1.00", stock=3)]
    rejected = cmd("updateStock", productId=p3, quantityChange=-1)
    later_events = 4
    run = [*program, "--name", name, "--bin", os.path.join(BIN, "conveyor-subscribe"),
           "--idle-exit", "60"]  # --idle-exit: a run that misses an event fails instead of hanging
    env = dict(os.environ, READ_MODEL_DATABASE_URL=url)  # the database: in the environment, as a password would be
    with Pool() as pool:
        run += ["-c", pool.config]
        err = log_file(f"read-model-{prefix}-")
        first = subprocess.Popen([*run, "--count", str(first_events)], cwd=EX, stdout=subprocess.PIPE, stderr=err,
                                 text=True, env=env)
        try:
            # the subscription exists (its registry row is written after its broker objects)
            # before anything is published: it starts with the newest events
            for _ in range(600):
                if query("SELECT 1 FROM subscriptions WHERE name = %s", name) or first.poll() is not None:
                    break
                subprocess.run(["sleep", "0.1"])
            check(first.poll() is None, f"the first run exited {first.returncode} before its subscription existed: "
                  f"{open(err.name).read()[-2000:]}")
            check(query("SELECT 1 FROM subscriptions WHERE name = %s", name), "the subscription was created")
            produce(pool.config, creates)
            produce(pool.config, updates)
            out, _ = first.communicate(timeout=180)
            eq(first.returncode, 0, f"the first run's exit status (stderr: {open(err.name).read()[-2000:]})")
            s1 = summary(out, "the first run")
            eq((s1["handled"], s1["nacked"]), (first_events, 0), f"the first run handled its events: {s1}")

            # no process of the subscription runs: its events are kept for it
            produce(pool.config, later)
            produce(pool.config, [rejected], want_status=1)
            # a run that crashed after committing the restock's stock.updated, before its ack
            # reached the broker: the effect and the inbox's row are in, the event comes again
            crashed = query("SELECT event_id::text FROM outbox WHERE payload->>'commandId' = %s "
                            "AND event_type = 'stock.updated'", restock["id"])[0][0]
            conn = psycopg2.connect(url)
            with conn, conn.cursor() as cur:
                cur.execute("SELECT conveyor.consume(%s, %s)", (name, crashed))
                cur.execute("UPDATE public.stock_view SET stock = 22, last_event_id = %s, updated_at = '2000-01-01Z' "
                            "WHERE product_id = %s", (crashed, p1))
            conn.close()
            second = subprocess.run([*run, "--count", str(later_events)], cwd=EX, stdout=subprocess.PIPE, stderr=err,
                                    text=True, env=env, timeout=180)
            eq(second.returncode, 0, f"the second run's exit status (stderr: {open(err.name).read()[-2000:]})")
            s2 = summary(second.stdout, "the second run")
            eq((s2["handled"], s2["nacked"], s2["duplicates"]), (later_events, 0, 1),
               f"the second run caught up, the crashed run's event a duplicate: {s2}")
            for line in second.stdout.strip().splitlines()[:-1]:
                check(line.split()[0] in ("stock.updated", "product.updated", "product.deleted", "product.created"),
                      f"the second run handled only what was published while it was stopped: {line}")
        finally:
            if first.poll() is None:
                first.send_signal(signal.SIGTERM)
                first.wait(30)
            r = run_bin("conveyor-admin", "-c", pool.config, "subscriptions", "remove", name)
            if r.returncode != 0:
                print(f"(the subscription {name} was not removed: {r.stderr.strip()[:300]})")
        eq(pool.stop(), (0, []), "clean stop")

    ids = [c["id"] for c in creates + updates + later + [rejected]]
    want = {r[0]: r[1] for r in query(
        "SELECT event_id::text, payload->>'commandId' FROM outbox WHERE payload->>'commandId' = ANY(%s) "
        "AND (event_type LIKE 'product.%%' OR event_type LIKE 'stock.%%')", ids)}
    eq(len(want), first_events + later_events, "the product.* and stock.* events the commands caused")
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT event_id::text FROM conveyor.inbox WHERE subscription = %s", (name,))
            inbox = {r[0] for r in cur.fetchall()}
            cur.execute("SELECT product_id::text, stock, last_event_id::text, updated_at = '2000-01-01Z' "
                        "FROM public.stock_view")
            view = {r[0]: (r[1], r[2], r[3]) for r in cur.fetchall()}
    finally:
        conn.close()
    eq(inbox, set(want), "the inbox holds each of those events, once")
    eq(s1["applied"] + s2["applied"] + 1, len(inbox), "the runs applied each event once (one by the crashed run)")
    products = {r[0]: r[1] for r in query("SELECT id::text, stock FROM products WHERE id::text = ANY(%s) "
                                          "AND deleted_at IS NULL", [p1, p2, p3, p4])}
    eq(products, {p1: 22, p3: 0, p4: 3}, "the products table (premise)")
    eq({p: v[0] for p, v in view.items()}, products, "the read model holds the products' stock")
    eq(view[p1][1:], (crashed, True), "p1's row was last set by the crashed run's commit, not again by its duplicate")


def test_python_read_model_catches_up():
    """examples/python/read_model.py, a durable subscription with the inbox (read_model_runs)."""
    read_model_runs(["/usr/bin/python3", "python/read_model.py"], "read-model-py")


def test_node_read_model_catches_up():
    """examples/node/read_model.js, the same in Node with pg (read_model_runs)."""
    read_model_runs(["node", "node/read_model.js"], "read-model-node")
