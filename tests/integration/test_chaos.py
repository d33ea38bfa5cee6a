"""The chaos test: mixed commands published while workers are killed with
kill -9 every few hundred milliseconds; then the broker and PostgreSQL are each
restarted once while the backlog drains. Afterwards every command took effect
exactly once, stocks add up, a subscriber holds one result per command (after
dropping duplicate event ids) and each product's events in commit order, and
there are no dead letters.

Workers take batches (batch_size 16): a kill, a restart or a failed command
in the middle of a batch must lose and double nothing either.

CONVEYOR_CHAOS_COMMANDS sets the number of commands (default 20000)."""
import json
import os
import random
import signal
import subprocess
import threading
import time

import pika
import redis as redislib

import contract
from harness import (AMQP_URL, REDIS_URL, ROOT, TRANSPORT, Pool, Publisher, check, drain_dead, envelope, eq,
                     new_id, query, rabbitmqctl)

N = int(os.environ.get("CONVEYOR_CHAOS_COMMANDS", "20000"))
PRODUCTS = 100
START_STOCK = 1000
RESULTS = {"user.registered", "product.created", "stock.updated", "command.rejected"}
# cheap password hashing keeps the run bounded; the cost is a setting, not a code path
CHAOS_CONFIG = ("domain: { password_hash_opslimit = 1; password_hash_memlimit_mb = 1; };\n"
                "retry: { base_delay_ms = 200; max_delay_ms = 2000; };\n"
                "redis: { heartbeat_interval = 1; heartbeat_ttl = 3; };\n"
                "supervisor: { shutdown_timeout = 20; };")


class DurableSubscriber(threading.Thread):
    """Collects every event, surviving broker restarts (a durable queue / the stream)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.events, self.stop, self.reconnects = [], False, 0
        self.queue = "conveyor.test.chaos-" + new_id()[:8]
        if TRANSPORT == "rabbitmq":
            c = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
            ch = c.channel()
            ch.exchange_declare("conveyor.events", "topic", durable=True)
            ch.queue_declare(self.queue, durable=True)
            ch.queue_bind(self.queue, "conveyor.events", "#")
            c.close()
        else:
            last = redislib.Redis.from_url(REDIS_URL).xrevrange("conveyor:events", count=1)
            self.last = last[0][0] if last else b"0-0"

    def run(self):
        while not self.stop:
            try:
                self.consume()
            except Exception:
                self.reconnects += 1
                time.sleep(0.5)

    def consume(self):
        if TRANSPORT == "rabbitmq":
            c = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
            ch = c.channel()
            ch.basic_qos(prefetch_count=500)
            for method, _, body in ch.consume(self.queue, inactivity_timeout=0.5):
                if self.stop:
                    break
                if method is None:
                    continue
                self.events.append(json.loads(body))
                ch.basic_ack(method.delivery_tag)
            c.close()
        else:
            r = redislib.Redis.from_url(REDIS_URL, socket_timeout=5)
            while not self.stop:
                for _, entries in r.xread({"conveyor:events": self.last}, count=1000, block=500):
                    for eid, fields in entries:
                        self.events.append(json.loads(fields[b"event"]))
                        self.last = eid

    def close(self):
        self.stop = True
        self.join(10)
        if TRANSPORT == "rabbitmq":
            c = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
            c.channel().queue_delete(self.queue)
            c.close()


def worker_pids(supervisor):
    """The pool's worker processes (not the relay or the reaper)."""
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) != supervisor:
                    continue
        except OSError:
            continue
        pids.append(int(p))
    return pids


def restart_broker():
    if TRANSPORT == "rabbitmq":
        rabbitmqctl("stop_app")
        time.sleep(1)
        rabbitmqctl("start_app")
    else:
        pid = int(redislib.Redis.from_url(REDIS_URL).info("server")["process_id"])
        os.kill(pid, signal.SIGKILL)  # a crash: only the AOF (appendfsync always) keeps what was acknowledged
        time.sleep(1)
        subprocess.run([os.path.join(ROOT, "scripts", "servers.sh"), "up"], check=True, capture_output=True, timeout=300)


def restart_postgres():
    subprocess.run([os.path.join(ROOT, "scripts", "servers.sh"), "pg-restart"], check=True, capture_output=True,
                   timeout=120)


def test_chaos():
    for q in ("users", "catalog", "orders"):
        drain_dead(q)
    rng = random.Random(7)
    creates = [envelope("createProduct", {"name": f"chaos {i}", "price": "1.00", "stock": START_STOCK,
                                          "productId": new_id()}) for i in range(PRODUCTS)]
    pids = [c["payload"]["productId"] for c in creates]
    rest = []
    for i in range(N - PRODUCTS):
        if rng.random() < 0.3:
            rest.append(envelope("register", {"name": f"chaos {i}", "email": f"chaos.{new_id()}@example.com",
                                              "password": "Secret123"}))
        else:
            rest.append(envelope("updateStock", {"productId": rng.choice(pids), "quantityChange": rng.choice(
                [-5, -4, -3, -2, -1, 1, 2, 3])}))
    commands = creates + rest
    sub = DurableSubscriber()
    sub.start()
    t0 = time.time()
    kills = 0
    with Pool(workers={"users": 2, "catalog": 3, "orders": 1}, extra=CHAOS_CONFIG, expect_restarts=True,
              queue_opts="batch_size = 16;") as pool:
        pub = Publisher()
        for c in creates:
            pub.command(c)
        killing = True

        def killer():
            nonlocal kills
            while killing:
                time.sleep(rng.uniform(0.2, 0.5))
                ws = worker_pids(pool.proc.pid)
                # the relay and reaper are children too; they survive kills just the same
                if ws:
                    try:
                        os.kill(rng.choice(ws), signal.SIGKILL)
                        kills += 1
                    except ProcessLookupError:
                        pass
        k = threading.Thread(target=killer, daemon=True)
        k.start()
        for c in rest:
            pub.command(c)
        pub.close()
        published = time.time()
        time.sleep(2)
        killing = False
        k.join()
        restart_broker()
        time.sleep(2)
        restart_postgres()
        ids = [c["id"] for c in commands]
        deadline = time.time() + 600
        while time.time() < deadline:
            done = query("SELECT count(*) FROM processed_commands WHERE id = ANY(%s::uuid[])", ids)[0][0]
            if done == len(ids):
                break
            time.sleep(1)
        eq(done, len(ids), "commands processed")
        unpublished = None
        while time.time() < deadline:
            unpublished = query("SELECT count(*) FROM outbox WHERE published_at IS NULL")[0][0]
            seen = {e["commandId"] for e in sub.events}
            if unpublished == 0 and seen >= set(ids):
                break
            time.sleep(0.5)
        drained = time.time()
        time.sleep(1)
        sub.close()
        restarts = pool.read_log().count("died of signal")
        eq(pool.stop(), (0, []), "clean stop after the chaos")

    # exactly one result event per command, after dropping duplicate event ids
    unique, dups = {}, 0
    for e in sub.events:
        if e["id"] in unique:
            dups += 1
            continue
        unique[e["id"]] = e
    events = list(unique.values())
    broken = [(e, errs) for e in events for errs in [contract.event_errors(e)] if errs]
    eq(broken[:3], [], "events that break the contract (schemas/)")
    results = {}
    for e in events:
        if e["type"] in RESULTS and e["commandId"] in set(ids):
            results.setdefault(e["commandId"], []).append(e)
    multi = [k for k, v in results.items() if len(v) != 1]
    eq(len(results), len(ids), "commands with a result event")
    eq(multi, [], "commands with more than one result event")
    # stock adds up: start plus the accepted changes
    accepted = {}
    for e in events:
        if e["type"] == "stock.updated" and e["commandId"] in results:
            accepted[e["aggregateId"]] = accepted.get(e["aggregateId"], 0) + e["data"]["quantityChange"]
    rows = dict(query("SELECT id::text, stock FROM products WHERE id = ANY(%s::uuid[])", pids))
    bad = {p: (rows[p], START_STOCK + accepted.get(p, 0)) for p in pids if rows[p] != START_STOCK + accepted.get(p, 0)}
    eq(bad, {}, "products whose stock is not start + accepted changes")
    # per aggregate, events in commit order: each stock.updated starts where the previous ended
    last = {}
    for e in events:
        if e["type"] == "stock.updated":
            p = e["aggregateId"]
            check(last.get(p, START_STOCK) == e["data"]["previousStock"],
                  f"events of {p} out of order: {last.get(p)} then {e['data']}")
            last[p] = e["data"]["stock"]
    dead = [d for q in ("users", "catalog", "orders") for d in drain_dead(q)]
    eq([(d["reason"], d["error"], d["attempts"], d["body"][:200]) for d in dead], [], "dead letters")
    print(f"chaos ({TRANSPORT}): {len(ids)} commands, {kills} kills -9 ({restarts} children restarted), "
          f"1 broker restart, 1 PostgreSQL restart, {dups} duplicate events dropped, "
          f"{sub.reconnects} subscriber reconnects; published in {published - t0:.1f} s, "
          f"drained {drained - t0:.1f} s after the first publish")
