#!/usr/bin/python3
"""The producer's outbox (issue 26): how fast a pool's forwarder moves commands
from a producer's conveyor.outbound to the broker, and what it adds to the
time from the producer's commit to the command's result event, per transport,
on the servers of scripts/servers.sh (docs/performance.md, "The producer's
outbox").

    bench/forward.py [--transports rabbitmq,redis] [--rows 50000] [--latency-commands 400] [--rate 20]
                     [--workers 2] [--smoke]

The producer's database is conveyor_bench_shop on the same PostgreSQL server
(dropped and created again, the outbox installed with conveyor-admin producer
install). For each transport:

1. throughput: --rows updateStock rows enqueued (conveyor.enqueue, 5,000 per
   transaction) while no pool runs; then a pool with no workers (the commands
   wait in the catalog queue: the forwarder's work alone) starts, and the
   time from its start until no row is pending is measured (polling every
   100 ms), as well as the rate of the marks (forwarded_at, first to last:
   the forwarder's steady pace, its start left out). The queue must then hold
   --rows commands; it is emptied after.
2. latency: a pool with --workers catalog workers; --latency-commands
   updateStock at --rate per second, alternately (a) written one by one to a
   running conveyor-produce (publishes at once with confirms; the time taken
   when it prints the id, i.e. once the broker confirmed) and (b) enqueued in
   a transaction of the producer's database (the time taken when COMMIT
   returns); the latency of each is from that time to its result event's
   arrival at a subscriber. Printed: p50, p90, p99 and max in ms of both, and
   the difference of the medians (what the outbox adds: the NOTIFY, the
   forwarder's read, publish with confirm and mark).

Prints one line per figure, and a JSON summary last. --smoke: a few hundred
rows, to check that the benchmark works. The machine's other load shows in
every figure. CONVEYOR_BIN_DIR picks the binaries.
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid

import pika
import psycopg2
import redis

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "integration"))
from harness import AMQP_URL, BIN, REDIS_URL, ROUTING, Events, Pool, query, run_bin, setup, write_config  # noqa: E402
from test_forward import db_url, fresh_db, sql_at  # noqa: E402  (a database of its own on the same server)

SHOP_DB = "conveyor_bench_shop"
SHOP_URL = db_url(SHOP_DB)
PRODUCERS = f'producers = ( {{ name = "bench"; url = "{SHOP_URL}"; }} );'
CATALOG = {"catalog": ROUTING["catalog"]}
PRODUCT_PREFIX = "00000000-0000-4000-8000-"  # bench/run.py's products
PRODUCTS = 100
START_STOCK = 1_000_000_000


def log(msg):
    print(f"forward: {msg}", file=sys.stderr, flush=True)


def shop_sql(sql, *args):
    return sql_at(SHOP_URL, sql, *args)


def fresh_shop():
    """The producer's database, new, with the outbox installed."""
    fresh_db(SHOP_DB)
    conf = write_config(routing=CATALOG, extra=PRODUCERS)
    try:
        r = run_bin("conveyor-admin", "-c", conf, "producer", "install", "--database", SHOP_URL)
    finally:
        os.unlink(conf)
    if r.returncode != 0:
        raise SystemExit(f"producer install: {r.stderr}")


def reset_products():
    query("INSERT INTO products (id, name, price, stock, status) "
          "SELECT (%s || lpad(g::text, 12, '0'))::uuid, 'bench product ' || g, 9.99, %s, 'ACTIVE' "
          "FROM generate_series(1, %s) g ON CONFLICT (id) DO UPDATE SET stock = EXCLUDED.stock",
          PRODUCT_PREFIX, START_STOCK, PRODUCTS)


def update_stock(n):
    return {"productId": f"{PRODUCT_PREFIX}{1 + n % PRODUCTS:012d}", "quantityChange": 1}


def catalog_depth(transport, purge=False):
    """Commands waiting in the catalog queue (emptied when purge)."""
    if transport == "redis":
        r = redis.Redis.from_url(REDIS_URL)
        n = r.llen("conveyor:queue:catalog")
        if purge:
            r.delete("conveyor:queue:catalog")
        return n
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        ch = conn.channel()
        n = ch.queue_declare("conveyor.catalog", passive=True).method.message_count
        if purge:
            ch.queue_purge("conveyor.catalog")
        return n
    finally:
        conn.close()


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


def throughput(transport, rows):
    fresh_shop()
    catalog_depth(transport, purge=True)
    c = psycopg2.connect(SHOP_URL)
    for start in range(0, rows, 5000):
        with c, c.cursor() as cur:
            cur.execute("SELECT count(conveyor.enqueue('updateStock', jsonb_build_object('productId', "
                        "(%s || lpad((1 + g %% %s)::text, 12, '0')), 'quantityChange', 1))) "
                        "FROM generate_series(%s, %s) g", (PRODUCT_PREFIX, PRODUCTS, start, min(start + 5000, rows) - 1))
    c.close()
    shop_sql("VACUUM ANALYZE conveyor.outbound")
    query("CHECKPOINT")
    t0 = time.time()
    pool = Pool(workers={"users": 0, "catalog": 0, "orders": 0}, routing=CATALOG, extra=PRODUCERS,
                env={"CONVEYOR_TRANSPORT": transport})
    try:
        deadline = time.time() + max(600, rows / 50)
        while shop_sql("SELECT count(*) FROM conveyor.outbound WHERE state = 'pending'")[0][0]:
            if pool.proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the forwarder did not finish; pool log {pool.log.name}")
            time.sleep(0.1)
        wall = time.time() - t0
    finally:
        pool.stop()
    first, last, first_batch, failed = shop_sql(
        "SELECT extract(epoch FROM min(forwarded_at))::float8, extract(epoch FROM max(forwarded_at))::float8, "
        "count(*) FILTER (WHERE forwarded_at = (SELECT min(forwarded_at) FROM conveyor.outbound)), "
        "count(*) FILTER (WHERE state <> 'forwarded') FROM conveyor.outbound")[0]
    depth = catalog_depth(transport, purge=True)
    if failed or depth != rows:
        raise SystemExit(f"{failed} rows not forwarded; the queue held {depth} of {rows}")
    span = last - first
    res = {"rows": rows, "wallSeconds": round(wall, 2), "perSecondFromStart": round(rows / wall),
           "markSeconds": round(span, 2), "perSecondMarks": round((rows - first_batch) / span) if span > 0 else None}
    print(f"{transport:8} forwarder  {rows} rows: {res['perSecondFromStart']:6}/s from the pool's start "
          f"({res['wallSeconds']} s), {res['perSecondMarks'] or '-':>6}/s between its first and last mark "
          f"({res['markSeconds']} s)", flush=True)
    return res


class Arrivals(threading.Thread):
    """The arrival time of each command's first event, read by its own subscriber."""

    def __init__(self, transport):
        super().__init__(daemon=True)
        self.ev = Events(transport)
        self.first, self.stop = {}, False

    def run(self):
        while not self.stop:
            self.ev.poll(timeout=0.05)
            for e in self.ev.events:
                self.first.setdefault(e["commandId"], self.ev.arrived[e["id"]])
            self.ev.events.clear()

    def close(self):
        self.stop = True
        self.join(10)
        self.ev.close()


def latency(transport, n, rate, workers):
    fresh_shop()
    reset_products()
    catalog_depth(transport, purge=True)
    pool = Pool(workers={"catalog": workers}, routing=CATALOG, extra=PRODUCERS, env={"CONVEYOR_TRANSPORT": transport})
    conf = write_config(routing=CATALOG)
    arrivals = Arrivals(transport)
    arrivals.start()
    producer = subprocess.Popen([os.path.join(BIN, "conveyor-produce"), "-c", conf], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                env=dict(os.environ, CONVEYOR_TRANSPORT=transport))
    shop = psycopg2.connect(SHOP_URL)
    sent = {"direct": {}, "outbox": {}}
    try:
        t_next = time.time()
        for i in range(n):
            t_next += 1.0 / rate
            time.sleep(max(0.0, t_next - time.time()))
            cid = str(uuid.uuid4())
            if i % 2 == 0:
                producer.stdin.write(json.dumps({"id": cid, "type": "updateStock", "payload": update_stock(i)}) + "\n")
                producer.stdin.flush()
                got = producer.stdout.readline().strip()
                if got != cid:
                    raise SystemExit(f"conveyor-produce printed {got!r}: {producer.stderr.read()}")
                sent["direct"][cid] = time.time()
            else:
                with shop.cursor() as cur:
                    cur.execute("SELECT conveyor.enqueue('updateStock', %s::jsonb, %s::uuid)",
                                (json.dumps(update_stock(i)), cid))
                shop.commit()
                sent["outbox"][cid] = time.time()
        deadline = time.time() + 120
        every = set(sent["direct"]) | set(sent["outbox"])
        while not every <= set(arrivals.first):
            if time.time() > deadline:
                raise SystemExit(f"{len(every - set(arrivals.first))} results missing; pool log {pool.log.name}")
            time.sleep(0.1)
    finally:
        shop.close()
        producer.stdin.close()
        producer.wait(30)
        arrivals.close()
        os.unlink(conf)
        pool.stop()
    res = {}
    for path, times in sent.items():
        ms = [1000 * (arrivals.first[c] - t) for c, t in times.items()]
        res[path] = {"commands": len(ms), "p50": round(pct(ms, 0.5), 1), "p90": round(pct(ms, 0.9), 1),
                     "p99": round(pct(ms, 0.99), 1), "max": round(max(ms), 1)}
        print(f"{transport:8} {path:9}  to the result event, ms: p50 {res[path]['p50']:7} p90 {res[path]['p90']:7} "
              f"p99 {res[path]['p99']:7} max {res[path]['max']:7} ({len(ms)} at {rate / 2:g}/s)", flush=True)
    res["addedP50"] = round(res["outbox"]["p50"] - res["direct"]["p50"], 1)
    print(f"{transport:8} the outbox adds {res['addedP50']} ms at the median", flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transports", default="rabbitmq,redis")
    ap.add_argument("--rows", type=int, default=50000, help="rows the forwarder moves in the throughput run")
    ap.add_argument("--latency-commands", type=int, default=400, help="commands of the latency run (half each way); 0: no latency run")
    ap.add_argument("--rate", type=float, default=20, help="commands per second in the latency run")
    ap.add_argument("--workers", type=int, default=2, help="catalog workers in the latency run")
    ap.add_argument("--smoke", action="store_true", help="a few hundred rows: that the benchmark works")
    a = ap.parse_args()
    if a.smoke:
        a.rows, a.latency_commands = 500, 40
    setup()
    out = []
    for transport in a.transports.split(","):
        os.environ["CONVEYOR_TRANSPORT"] = transport
        out.append({"transport": transport, "throughput": throughput(transport, a.rows),
                    "latency": latency(transport, a.latency_commands, a.rate, a.workers)
                    if a.latency_commands > 0 else None})
    query(f"DROP DATABASE IF EXISTS {SHOP_DB} WITH (FORCE)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
