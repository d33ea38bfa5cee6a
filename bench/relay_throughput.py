#!/usr/bin/python3
"""The outbox relay's throughput, two builds alternated in one session (issue 27:
the relay reads aggregate_id and sends the AMQP header x-conveyor-aggregate).

    eval "$(scripts/servers.sh env)"
    git worktree add /tmp/old cd5d9fb && cmake -S /tmp/old -B /tmp/old/build -DCMAKE_BUILD_TYPE=Release \\
        && cmake --build /tmp/old/build -j2
    bench/relay_throughput.py --old /tmp/old/build --new build [--rows 200000] [--rounds 3]
                              [--transports rabbitmq,redis] [--redis-rounds 1]

Each run: no pool runs; --rows stock.updated events (valid event envelopes over
1,000 products, as updateStock's worker writes them) are inserted into the
outbox by SQL in one transaction; then a pool of the build under test starts
with no workers (only its relay) and the run ends when every row has its
published_at. Events/s = rows published after the first relay batch divided by
the time from the first batch's published_at to the last one's (PostgreSQL's
clock: the pool's start-up is not counted); the wall time from the pool's start
is printed too. The rows are then deleted and the outbox vacuumed, so that each
run starts alike.

On RabbitMQ a durable quorum queue (bench.relay_throughput, bound with '#') is
bound to conveyor.events, as a durable subscription's partition is, so that
the events are routed and stored, not dropped; it is purged after each run
(--no-queue: no queue, the exchange drops them). On Redis the relay appends to
the stream conveyor:events (unchanged by issue 27: one round as a check).

Builds alternate per transport: old then new in odd rounds, new then old in
even ones (so that neither always runs first after the fill). A run whose pool
got a SIGTERM from elsewhere (a shared machine) is made again. Prints a table of the
runs and the ratio new/old of the medians (and of each adjacent pair), which is
what to compare: the machine's speed drifts, so absolute seconds from another
session mean little. Needs CONVEYOR_DATABASE_URL, CONVEYOR_RABBITMQ_URL and
CONVEYOR_REDIS_URL (scripts/servers.sh env). Exit 0 when every run completed,
1 when one failed, 2 on bad arguments.
"""
import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import pika
import psycopg2
import redis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUEUE = "bench.relay_throughput"
PRODUCT_PREFIX = "00000000-0000-4000-8000-"

# One stock.updated event per row, its envelope as event_new (shared/event.c) writes it.
INSERT = """
INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload)
SELECT e.id, 'product', e.pid, 'stock.updated',
       jsonb_build_object('id', e.id, 'type', 'stock.updated', 'occurredAt', to_char(now() AT TIME ZONE 'UTC',
                          'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'), 'commandId', gen_random_uuid(),
                          'commandType', 'updateStock', 'correlationId', NULL, 'aggregateType', 'product',
                          'aggregateId', e.pid,
                          'data', jsonb_build_object('productId', e.pid, 'previousStock', 1000 + e.g,
                                                     'stock', 1001 + e.g, 'quantityChange', 1))
FROM (SELECT gen_random_uuid() AS id, g,
             (%s || lpad((g %% 1000 + 1)::text, 12, '0'))::uuid AS pid
      FROM generate_series(1, %s) g) e
ORDER BY e.g
"""


class Disturbed(RuntimeError):
    """The pool was stopped by someone else (a shared machine): the run is made again."""


def log(msg):
    print(f"relay_throughput: {msg}", file=sys.stderr, flush=True)


def env_or_die(name):
    v = os.environ.get(name)
    if not v:
        sys.exit(f'relay_throughput: {name} is not set (run: eval "$(scripts/servers.sh env)")')
    return v


class Bench:
    def __init__(self, args):
        self.args = args
        self.db = psycopg2.connect(env_or_die("CONVEYOR_DATABASE_URL"))
        self.db.autocommit = True
        self.amqp_url = env_or_die("CONVEYOR_RABBITMQ_URL")
        self.redis_url = env_or_die("CONVEYOR_REDIS_URL")

    def q(self, sql, *a):
        with self.db.cursor() as c:
            c.execute(sql, a)
            return c.fetchall() if c.description else None

    def config(self, transport):
        text = f"""prefix = "conveyor";
transport = "{transport}";
queues = (
  {{ name = "users";   commands = ["register", "changePassword"]; workers = 0; }},
  {{ name = "catalog"; commands = ["createProduct", "updateProduct", "updateStock", "deleteProduct"]; workers = 0; }},
  {{ name = "orders";  commands = ["placeOrder", "cancelOrder"]; workers = 0; }}
);
"""
        fd, path = tempfile.mkstemp(prefix="conveyor-relay-bench-", suffix=".conf")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path

    def setup(self, bin_dir, transport):
        conf = self.config(transport)
        try:
            r = subprocess.run([os.path.join(bin_dir, "conveyor-workers"), "-c", conf, "--setup"],
                               capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                raise RuntimeError(f"conveyor-workers --setup ({bin_dir}) exited {r.returncode}: {r.stderr}")
        finally:
            os.unlink(conf)

    def amqp_queue(self, declare):
        conn = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        ch = conn.channel()
        if declare:
            ch.queue_declare(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
            ch.queue_bind(QUEUE, "conveyor.events", routing_key="#")
        else:
            ch.queue_delete(QUEUE)
        conn.close()

    def amqp_purge(self):
        """(messages the bound queue held, whether its first carries x-conveyor-aggregate); purges it."""
        conn = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        ch = conn.channel()
        n = ch.queue_declare(QUEUE, passive=True).method.message_count
        _, props, _ = ch.basic_get(QUEUE, auto_ack=True)
        header = bool(props and props.headers and props.headers.get("x-conveyor-aggregate"))
        ch.queue_purge(QUEUE)
        conn.close()
        return n, header

    def fill(self):
        left = self.q("SELECT count(*) FROM outbox WHERE published_at IS NULL")[0][0]
        if left:
            raise RuntimeError(f"{left} outbox rows are unpublished before the run: is a pool running on these servers?")
        self.q(INSERT, PRODUCT_PREFIX, self.args.rows)
        self.q("VACUUM ANALYZE outbox")
        return self.q("SELECT min(id), max(id) FROM outbox WHERE published_at IS NULL")[0]

    def cleanup(self, transport, lo, hi):
        """The run's rows deleted, the outbox vacuumed, the stream emptied: the next run starts alike."""
        if transport == "rabbitmq" and not self.args.no_queue:
            conn = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
            conn.channel().queue_purge(QUEUE)
            conn.close()
        if transport == "redis":
            r = redis.Redis.from_url(self.redis_url)
            r.delete("conveyor:events")
            r.close()
        self.q("DELETE FROM outbox WHERE id BETWEEN %s AND %s", lo, hi)
        self.q("VACUUM outbox")
        self.q("CHECKPOINT")

    def run(self, build, bin_dir, transport):
        lo, hi = self.fill()
        n = hi - lo + 1
        conf = self.config(transport)
        out = tempfile.NamedTemporaryFile(prefix="conveyor-relay-bench-", suffix=".log", delete=False)
        t0 = time.time()
        proc = subprocess.Popen([os.path.join(bin_dir, "conveyor-workers"), "-c", conf], stdout=out, stderr=out,
                                start_new_session=True)
        try:
            deadline = t0 + self.args.timeout
            while True:
                left = self.q("SELECT count(*) FROM outbox WHERE published_at IS NULL AND id BETWEEN %s AND %s",
                              lo, hi)[0][0]
                if not left:
                    break
                if proc.poll() is not None:
                    self.cleanup(transport, lo, hi)
                    if "SIGTERM: draining the pool" in open(out.name).read():
                        raise Disturbed(f"conveyor-workers got a SIGTERM it was not sent by this script: see {out.name}")
                    raise RuntimeError(f"conveyor-workers exited {proc.returncode}: see {out.name}")
                if time.time() > deadline:
                    raise RuntimeError(f"{left} of {n} rows still unpublished after {self.args.timeout} s: see {out.name}")
                time.sleep(0.05)
            wall = time.time() - t0
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            os.unlink(conf)
        # the first batch's rows share one published_at: rows after it over the time after it
        first, last, after_first = self.q(
            "WITH r AS (SELECT published_at FROM outbox WHERE id BETWEEN %s AND %s) "
            "SELECT min(published_at), max(published_at), "
            "count(*) FILTER (WHERE published_at > (SELECT min(published_at) FROM r)) FROM r", lo, hi)[0]
        span = (last - first).total_seconds()
        routed, header = self.amqp_purge() if transport == "rabbitmq" and not self.args.no_queue else (None, None)
        if routed is not None and routed < n:
            raise RuntimeError(f"the bound queue holds {routed} messages, fewer than the {n} events published")
        self.cleanup(transport, lo, hi)
        with open(out.name) as f:
            text = f.read()
        if "died of signal" in text or "exited with status" in text:
            raise RuntimeError(f"a child of the pool crashed: see {out.name}")
        os.unlink(out.name)
        rate = after_first / span if span > 0 else float("nan")
        return {"build": build, "transport": transport, "rows": n, "span": span, "wall": wall, "rate": rate,
                "header": {None: "-", True: "yes", False: "no"}[header]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="the build directory before the change (its conveyor-workers)")
    ap.add_argument("--new", required=True, help="the build directory after the change")
    ap.add_argument("--rows", type=int, default=200000, help="outbox rows per run (200000)")
    ap.add_argument("--rounds", type=int, default=3, help="old/new pairs on RabbitMQ (3)")
    ap.add_argument("--redis-rounds", type=int, default=1, help="old/new pairs on Redis (1)")
    ap.add_argument("--transports", default="rabbitmq,redis", help="rabbitmq,redis (both)")
    ap.add_argument("--no-queue", action="store_true", help="RabbitMQ: no queue bound to conveyor.events")
    ap.add_argument("--timeout", type=float, default=600, help="seconds a run may take (600)")
    a = ap.parse_args()
    for d in (a.old, a.new):
        if not os.access(os.path.join(d, "conveyor-workers"), os.X_OK):
            ap.error(f"{d}/conveyor-workers is not an executable")
    transports = [t for t in a.transports.split(",") if t]
    if any(t not in ("rabbitmq", "redis") for t in transports):
        ap.error("--transports: rabbitmq and/or redis")
    b = Bench(a)
    b.setup(a.new, "rabbitmq")  # the newer migrations first: the old build ignores tables it does not know
    runs = []
    try:
        if "rabbitmq" in transports:
            b.amqp_queue(declare=not a.no_queue)
        for t in transports:
            rounds = a.rounds if t == "rabbitmq" else a.redis_rounds
            for i in range(rounds):
                order = (("old", a.old), ("new", a.new))
                for build, d in (order if i % 2 == 0 else order[::-1]):  # old new, new old, ...: no order effect
                    for attempt in range(3):
                        try:
                            r = b.run(build, d, t)
                            break
                        except Disturbed as e:
                            log(f"{t} round {i + 1} {build}: {e}; made again")
                    else:
                        raise RuntimeError("three runs in a row were stopped by someone else")
                    log(f"{t} round {i + 1} {build}: {r['rate']:.0f} events/s ({r['rows']} rows, "
                        f"{r['span']:.2f} s publishing, {r['wall']:.2f} s from the pool's start)")
                    runs.append(r)
    except (RuntimeError, psycopg2.Error, pika.exceptions.AMQPError, redis.RedisError) as e:
        log(f"failed: {e}")
        return 1
    finally:
        if "rabbitmq" in transports and not a.no_queue:
            try:
                b.amqp_queue(declare=False)
            except pika.exceptions.AMQPError:
                pass
    print(f"{'transport':<9} {'round':>5} {'build':<5} {'rows':>7} {'publishing s':>12} {'wall s':>7} {'events/s':>9} {'header':>6}")
    for t in transports:
        rs = [r for r in runs if r["transport"] == t]
        for k, r in enumerate(rs):
            print(f"{t:<9} {k // 2 + 1:>5} {r['build']:<5} {r['rows']:>7} {r['span']:>12.2f} {r['wall']:>7.2f} "
                  f"{r['rate']:>9.0f} {r['header']:>6}")
    print()
    print(f"{'transport':<9} {'old median':>10} {'new median':>10} {'new/old':>8}  per pair")
    for t in transports:
        old = [r["rate"] for r in runs if r["transport"] == t and r["build"] == "old"]
        new = [r["rate"] for r in runs if r["transport"] == t and r["build"] == "new"]
        if not old or not new:
            continue
        pairs = " ".join(f"{n / o:.3f}" for o, n in zip(old, new))  # each round's pair
        mo, mn = statistics.median(old), statistics.median(new)
        print(f"{t:<9} {mo:>10.0f} {mn:>10.0f} {mn / mo:>8.3f}  {pairs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
