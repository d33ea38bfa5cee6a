#!/usr/bin/python3
"""Durable subscriptions' throughput (issue 27; docs/performance.md, "Durable
subscriptions"): how fast processes of one subscription drain a backlog through
the C API (bench/subscription_bench.c, conveyor-bench-subscription), handling
each event as docs/contract.md section 12 tells a subscriber to, on the
servers of scripts/servers.sh.

    eval "$(scripts/servers.sh env)"
    bench/subscription.py [--events 20000] [--transports rabbitmq,redis] [--rounds 1]
                          [--partitions 4] [--smoke]

The subscriber's database is conveyor_bench_subscriber on the same PostgreSQL
server (dropped and created again, the inbox installed with conveyor-admin
subscriber install --database URL), with a read model bench_stock (one row per
subscription and product). Per transport and round:

1. four subscriptions are created (--from newest, --partitions, patterns '#',
   a fresh name each: <transport>-<case>-<time>), no process of theirs running;
2. a pool (2 catalog workers) applies --events updateStock (+1) over 100
   products, piped into conveyor-produce; the pool stops once the relay has
   published every event: each subscription now holds the same backlog;
3. each subscription is drained in turn, alternating the two handlers:
     inbox x1, plain x1, inbox x2, plain x2
   where "inbox" = per event, one transaction of the subscriber's database:
   SELECT conveyor.consume(name, id), the read model's UPDATE when it returned
   true, COMMIT, then conveyor_subscription_ack; "plain" = the ack alone (no
   database: what the inbox costs is the difference); x1 = one process, x2 =
   two processes of the same subscription started together. A process stops
   after 5 s without an event; events/s = events handled / (the last ack - the
   processes' start, before conveyor_subscription_open: connecting and taking
   the partitions count), over all the processes of the run (wall clock);
   before each inbox drain, --sql-events of the inbox's transactions alone
   (psycopg2, one connection, no broker: "sql" in the table) show what the
   database allows one process at that moment (its commits wait for the disk,
   whose speed drifts with the machine's other load);
4. checked: every event handled exactly once (the sum of the processes'
   counts; inbox: the inbox's rows and the read model's events), none of an
   aggregate out of order (the read model's previousStock check), no broker
   error; then the subscriptions are removed (their queues and exchange, or
   consumer groups, and their registry rows).

Prints one line per run and a table. The machine's other load shows in every
figure: compare the rows of one session, not seconds across sessions.
CONVEYOR_BIN_DIR picks the binaries (default build/; needs CONVEYOR_BENCH=ON
for conveyor-bench-subscription). Exit 0 when every run completed and checked,
1 otherwise.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

import pika
import psycopg2
import redis

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "integration"))
from harness import AMQP_URL, BIN, REDIS_URL, query, run_bin  # noqa: E402
from test_forward import db_url, fresh_db, sql_at  # noqa: E402  (a database of its own on the same server)

SUB_DB = "conveyor_bench_subscriber"
SUB_URL = db_url(SUB_DB)
PRODUCT_PREFIX = "00000000-0000-4000-8000-"  # bench/run.py's products
PRODUCTS = 100
START_STOCK = 1_000_000_000
CASES = (("inbox", 1), ("plain", 1), ("inbox", 2), ("plain", 2))
READ_MODEL = """
CREATE TABLE IF NOT EXISTS bench_stock (
    subscription text NOT NULL,
    product_id   uuid NOT NULL,
    stock        bigint NOT NULL,
    events       bigint NOT NULL DEFAULT 0,
    reordered    bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (subscription, product_id)
)"""


def log(msg):
    print(f"subscription: {msg}", file=sys.stderr, flush=True)


def config(transport, workers):
    text = f"""prefix = "conveyor";
transport = "{transport}";
queues = (
  {{ name = "users";   commands = ["register", "changePassword"]; workers = 0; }},
  {{ name = "catalog"; commands = ["createProduct", "updateProduct", "updateStock", "deleteProduct"];
     workers = {workers}; prefetch = 16; }},
  {{ name = "orders";  commands = ["placeOrder", "cancelOrder"]; workers = 0; }}
);
"""
    fd, path = tempfile.mkstemp(prefix="conveyor-sub-bench-", suffix=".conf")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def sub_sql(sqltext, *args):
    return sql_at(SUB_URL, sqltext, *args)


def fresh_subscriber(conf):
    fresh_db(SUB_DB)
    r = run_bin("conveyor-admin", "-c", conf, "subscriber", "install", "--database", SUB_URL)
    if r.returncode != 0:
        raise SystemExit(f"subscriber install: {r.stderr}")
    sub_sql(READ_MODEL)


def bench_bin(*args):
    return [os.path.join(BIN, "conveyor-bench-subscription"), *args]


def create(conf, transport, name, partitions):
    r = subprocess.run(bench_bin("-c", conf, "--name", name, "--create", "--transport", transport,
                                 "--partitions", str(partitions)), capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"creating {name}: {r.stderr}")


def remove(transport, name, partitions):
    """The subscription's broker objects and registry rows (what `conveyor-admin
    subscriptions remove` does, docs/contract.md section 13)."""
    if transport == "rabbitmq":
        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        ch = conn.channel()
        for i in range(partitions):
            ch.queue_delete(f"conveyor.sub.{name}.{i}")
        ch.exchange_delete(f"conveyor.sub.{name}")
        conn.close()
    else:
        r = redis.Redis.from_url(REDIS_URL)
        for i in range(partitions):
            try:
                r.xgroup_destroy("conveyor:events", f"sub:{name}:{i}")
            except redis.ResponseError:
                pass
        r.close()
    query("DELETE FROM subscription_dead WHERE subscription = %s", name)
    query("DELETE FROM subscriptions WHERE name = %s", name)


def fill(transport, n):
    """n updateStock through a pool; returns once the relay published them all."""
    query("INSERT INTO products (id, name, price, stock, status) "
          "SELECT (%s || lpad(g::text, 12, '0'))::uuid, 'bench product ' || g, 9.99, %s, 'ACTIVE' "
          "FROM generate_series(1, %s) g ON CONFLICT (id) DO UPDATE SET stock = EXCLUDED.stock",
          PRODUCT_PREFIX, START_STOCK, PRODUCTS)
    top = query("SELECT coalesce(max(id), 0) FROM outbox")[0][0]
    conf = config(transport, 2)
    pool_log = tempfile.NamedTemporaryFile(prefix="conveyor-sub-bench-pool-", suffix=".log", delete=False)
    pool = subprocess.Popen([os.path.join(BIN, "conveyor-workers"), "-c", conf], stdout=pool_log, stderr=pool_log,
                            start_new_session=True)
    try:
        lines = "".join(json.dumps({"type": "updateStock", "payload": {
            "productId": f"{PRODUCT_PREFIX}{k % PRODUCTS + 1:012d}", "quantityChange": 1}}) + "\n" for k in range(n))
        r = subprocess.run([os.path.join(BIN, "conveyor-produce"), "-c", conf], input=lines, capture_output=True,
                           text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"conveyor-produce exited {r.returncode}: {r.stderr}")
        deadline = time.time() + 600
        while True:
            done, left = query("SELECT count(*) FILTER (WHERE published_at IS NOT NULL), "
                               "count(*) FILTER (WHERE published_at IS NULL) FROM outbox WHERE id > %s", top)[0]
            if done >= n and not left:
                break
            if pool.poll() is not None:
                raise RuntimeError(f"conveyor-workers exited {pool.returncode}: see {pool_log.name}")
            if time.time() > deadline:
                raise RuntimeError(f"{done} of {n} events published after 600 s: see {pool_log.name}")
            time.sleep(0.2)
    finally:
        pool.terminate()
        pool.wait(60)
        os.unlink(conf)
    os.unlink(pool_log.name)
    if done != n:
        raise RuntimeError(f"{done} events published, {n} expected (was another pool running?)")


def drain(conf, transport, name, handler, procs, n):
    if handler == "inbox":
        sub_sql("INSERT INTO bench_stock (subscription, product_id, stock) "
                "SELECT %s, (%s || lpad(g::text, 12, '0'))::uuid, %s FROM generate_series(1, %s) g",
                name, PRODUCT_PREFIX, START_STOCK, PRODUCTS)
    extra = ["--database", SUB_URL] if handler == "inbox" else ["--no-inbox"]
    ps = [subprocess.Popen(bench_bin("-c", conf, "--name", name, "--transport", transport, "--idle-ms", "5000",
                                     *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for _ in range(procs)]
    outs = []
    for p in ps:
        out, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"{name}: conveyor-bench-subscription exited {p.returncode}: {err}")
        outs.append(json.loads(out))
    active = [o for o in outs if o["events"]]
    t0 = min(o["startMs"] for o in outs)
    total = sum(o["events"] for o in outs)
    span = (max(o["lastMs"] for o in active) - min(o["startMs"] for o in outs)) / 1000.0 if active else 0
    first = (min(o["firstMs"] for o in active) - min(o["startMs"] for o in outs)) / 1000.0 if active else 0
    res = {"transport": transport, "handler": handler, "processes": procs, "events": total, "seconds": span,
           "toFirstEvent": first, "rate": total / span if span else 0, "perProcess": [o["events"] for o in outs],
           # each process's first event and last ack, in s from the run's start: whether they overlapped
           "spans": [[round((o["firstMs"] - t0) / 1000.0, 2), round((o["lastMs"] - t0) / 1000.0, 2)] for o in active],
           "brokerErrors": sum(o["brokerErrors"] for o in outs), "duplicates": sum(o["duplicates"] for o in outs)}
    problems = []
    if total != n:
        problems.append(f"{total} events handled, {n} published")
    if res["brokerErrors"]:
        problems.append(f"{res['brokerErrors']} broker errors")
    if handler == "inbox":
        inbox = sub_sql("SELECT count(*) FROM conveyor.inbox WHERE subscription = %s", name)[0][0]
        applied, reordered = sub_sql("SELECT sum(events), sum(reordered) FROM bench_stock WHERE subscription = %s",
                                     name)[0]
        res.update(inbox=inbox, applied=int(applied), reordered=int(reordered))
        if inbox != n or applied != n:
            problems.append(f"the inbox holds {inbox} rows, the read model applied {applied}, {n} published")
        if reordered:
            problems.append(f"{reordered} events applied out of their aggregate's order")
    res["problems"] = problems
    return res


def sql_alone(n):
    """The inbox's transaction without a broker: n times, on one connection of the
    subscriber's database, BEGIN, conveyor.consume, the read model's UPDATE,
    COMMIT (what bench/subscription_bench.c's handle() sends, with psycopg2):
    the database's own limit for one process, measured just before the drains.
    Returns events/s."""
    name = f"bench-sql-{time.strftime('%H%M%S')}"
    sub_sql("INSERT INTO bench_stock (subscription, product_id, stock) "
            "SELECT %s, (%s || lpad(g::text, 12, '0'))::uuid, %s FROM generate_series(1, %s) g",
            name, PRODUCT_PREFIX, START_STOCK, PRODUCTS)
    conn = psycopg2.connect(SUB_URL)
    cur = conn.cursor()
    events = []
    for k in range(n):
        pid = f"{PRODUCT_PREFIX}{k % PRODUCTS + 1:012d}"
        prev = START_STOCK + k // PRODUCTS
        events.append((str(uuid.uuid4()), pid, json.dumps({"type": "stock.updated", "aggregateId": pid, "data": {
            "productId": pid, "previousStock": prev, "stock": prev + 1, "quantityChange": 1}})))
    t0 = time.time()
    for eid, pid, doc in events:
        cur.execute("SELECT conveyor.consume(%s, %s::uuid)", (name, eid))
        if cur.fetchone()[0]:
            cur.execute("UPDATE bench_stock SET stock = (%s::jsonb->'data'->>'stock')::bigint, events = events + 1, "
                        "reordered = reordered + (stock IS DISTINCT FROM (%s::jsonb->'data'->>'previousStock')::bigint)::int "
                        "WHERE subscription = %s AND product_id = %s::uuid", (doc, doc, name, pid))
        conn.commit()
    rate = n / (time.time() - t0)
    conn.close()
    sub_sql("DELETE FROM bench_stock WHERE subscription = %s", name)
    sub_sql("DELETE FROM conveyor.inbox WHERE subscription = %s", name)
    return rate


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20000, help="the backlog: updateStock commands (20000)")
    ap.add_argument("--transports", default="rabbitmq,redis")
    ap.add_argument("--rounds", type=int, default=1, help="backlogs per transport, each drained by the four cases (1)")
    ap.add_argument("--partitions", type=int, default=4, help="each subscription's partitions (4)")
    ap.add_argument("--sql-events", type=int, default=3000,
                    help="before each inbox drain, this many of the inbox's transactions alone (3000; 0: none)")
    ap.add_argument("--smoke", action="store_true", help="500 events, to check that the benchmark works")
    a = ap.parse_args()
    if a.smoke:
        a.events, a.sql_events = 500, 200
    transports = [t for t in a.transports.split(",") if t]
    if any(t not in ("rabbitmq", "redis") for t in transports):
        ap.error("--transports: rabbitmq and/or redis")
    if not os.access(bench_bin()[0], os.X_OK):
        ap.error(f"{bench_bin()[0]} is missing: build with -DCONVEYOR_BENCH=ON")
    if query("SELECT count(*) FROM outbox WHERE published_at IS NULL")[0][0]:
        raise SystemExit("subscription: the outbox has unpublished rows: is a pool running on these servers?")
    conf0 = config("rabbitmq", 0)
    try:
        r = run_bin("conveyor-workers", "-c", conf0, "--setup")
        if r.returncode != 0:
            raise SystemExit(f"conveyor-workers --setup: {r.stderr}")
        fresh_subscriber(conf0)
    finally:
        os.unlink(conf0)
    runs, failed = [], False
    for t in transports:
        for rnd in range(a.rounds):
            stamp = time.strftime("%H%M%S")
            names = {c: f"bench-{t}-{c[0]}{c[1]}-{stamp}" for c in CASES}
            conf = config(t, 0)
            try:
                for c in CASES:
                    create(conf, t, names[c], a.partitions)
                t0 = time.time()
                fill(t, a.events)
                log(f"{t} round {rnd + 1}: backlog of {a.events} events in each of {len(CASES)} subscriptions "
                    f"({time.time() - t0:.1f} s)")
                for c in CASES:
                    if c[0] == "inbox" and a.sql_events:
                        sql_rate = sql_alone(a.sql_events)
                        log(f"{t} round {rnd + 1}: the inbox's transaction alone (one connection, no broker): "
                            f"{sql_rate:.0f}/s")
                        runs.append({"transport": t, "round": rnd + 1, "handler": "sql", "processes": 1,
                                     "events": a.sql_events, "seconds": a.sql_events / sql_rate, "toFirstEvent": 0,
                                     "rate": sql_rate, "perProcess": [a.sql_events], "problems": []})
                    res = drain(conf, t, names[c], c[0], c[1], a.events)
                    res["round"] = rnd + 1
                    runs.append(res)
                    log(f"{t} round {rnd + 1} {c[0]} x{c[1]}: {res['rate']:.0f} events/s ({res['events']} in "
                        f"{res['seconds']:.2f} s; per process {res['perProcess']}, first event to last ack {res['spans']})"
                        + (f" PROBLEMS: {'; '.join(res['problems'])}" if res["problems"] else ""))
                    failed |= bool(res["problems"])
            except (RuntimeError, subprocess.TimeoutExpired, psycopg2.Error, pika.exceptions.AMQPError,
                    redis.RedisError) as e:
                log(f"{t} round {rnd + 1} failed: {e}")
                failed = True
            finally:
                for c in CASES:
                    try:
                        remove(t, names[c], a.partitions)
                    except (psycopg2.Error, pika.exceptions.AMQPError, redis.RedisError) as e:
                        log(f"removing {names[c]}: {e}")
                os.unlink(conf)
    print(f"{'transport':<9} {'round':>5} {'handler':<7} {'procs':>5} {'events':>7} {'seconds':>8} {'to first':>9} {'events/s':>9} "
          f"{'per process':<14} checks")
    for r in runs:
        print(f"{r['transport']:<9} {r['round']:>5} {r['handler']:<7} {r['processes']:>5} {r['events']:>7} "
              f"{r['seconds']:>8.2f} {r['toFirstEvent']:>9.3f} {r['rate']:>9.0f} {'/'.join(map(str, r['perProcess'])):<14} "
              f"{'; '.join(r['problems']) or 'ok'}")
    print(json.dumps({"events": a.events, "partitions": a.partitions, "runs": runs}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
