#!/usr/bin/python3
"""What lanes cost and what they give (issue 25; docs/contract.md §10), on the
servers of scripts/servers.sh, per transport.

    bench/lanes.py [--transport rabbitmq] [--commands 30000] [--keys 1000] [--lanes 16]
                   [--workers 4] [--batch 1] [--smoke]

The same --commands updateStock commands, over --keys products whose shares
are of mixed sizes (Zipf: the largest key has about 1/7.5 of all commands with
1,000 keys, the smallest 4 or 5; --skew 0: all alike), shuffled, go three times through the queue
catalog of a pool with --workers workers (batch_size --batch):

1. no lanes (the queue as it always was);
2. --lanes lanes (fairness between keys: the lane key is the productId);
3. --lanes lanes, ordered (one consumer per lane at a time, order per product).

Each run publishes every command while the queue is paused (conveyor-admin
queue pause), so that all wait before the first is applied, then resumes it
and measures, by the database's commit timestamps of the applying
transactions (pg_xact_commit_timestamp):

- throughput: commands applied per second from the resume to the last commit;
- per-key wait: for each key, when its last command was applied, as a
  fraction of the whole drain (0: at once, 1: at the very end); printed as
  the median and 90th percentile over the small keys (the half of the keys
  with the fewest commands) and over the 10 largest keys. Without lanes every
  key waits for the whole shuffled backlog (about 1 for all); with lanes a
  small key is done long before a large one.

Prints one line per run, and a JSON summary last. --smoke: a few hundred
commands over 50 keys, to check that the benchmark works (not a test of the
suite: its figures mean nothing). The machine's other load shows in every
figure: compare the ratios within one run. CONVEYOR_BIN_DIR picks the binaries.
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import pika
import redis

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "integration"))
from harness import AMQP_URL, BIN, REDIS_URL, ROOT, ROUTING, Pool, query, run_bin, setup, write_config  # noqa: E402
from test_delayed import db_now  # noqa: E402  (the database's clock)

PRODUCT_PREFIX = "00000000-0000-4000-8000-"  # bench/run.py's products: product n is PRODUCT_PREFIX + n as 12 digits
START_STOCK = 1_000_000_000
CATALOG = {"catalog": ROUTING["catalog"]}


def log(msg):
    print(f"lanes: {msg}", file=sys.stderr, flush=True)


def product_id(n):
    return f"{PRODUCT_PREFIX}{n:012d}"


def reset_products(n):
    query("INSERT INTO products (id, name, price, stock, status) "
          "SELECT (%s || lpad(g::text, 12, '0'))::uuid, 'bench product ' || g, 9.99, %s, 'ACTIVE' "
          "FROM generate_series(1, %s) g ON CONFLICT (id) DO UPDATE SET stock = EXCLUDED.stock",
          PRODUCT_PREFIX, START_STOCK, n)


def workload(n, keys, skew=1.0, seed=25):
    """n updateStock envelopes over keys products, key k's share 1/(k+1)^skew (Zipf; 0: all alike),
    shuffled: (envelopes, key of each id)."""
    rnd = random.Random(seed)
    weights = [1 / (k + 1) ** skew for k in range(keys)]
    total = sum(weights)
    counts = [max(1, round(n * w / total)) for w in weights]
    cmds, key_of = [], {}
    for k, c in enumerate(counts):
        for _ in range(c):
            cid = str(uuid.uuid4())
            cmds.append({"id": cid, "type": "updateStock",
                         "payload": {"productId": product_id(k + 1), "quantityChange": rnd.choice((1, -1))}})
            key_of[cid] = k
    rnd.shuffle(cmds)
    return cmds, key_of


def drop_lanes(transport):
    """Nothing left in catalog's intake or lanes; RabbitMQ's lane queues and exchanges deleted (a
    lane queue is declared with x-single-active-consumer when ordered: the next run's differs)."""
    if transport == "redis":
        r = redis.Redis.from_url(REDIS_URL)
        keys = list(r.scan_iter("conveyor:queue:catalog*"))
        if keys:
            r.delete(*keys)
        return
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        ch = conn.channel()
        ch.queue_purge("conveyor.catalog")
        for c in ("high", "normal", "low"):
            ch.exchange_delete(f"conveyor.catalog.lanes.{c}")
            for i in range(64):
                ch.queue_delete(f"conveyor.catalog.lane.{c}.{i}")
    finally:
        conn.close()


def admin_pause(on):
    r = run_bin("conveyor-admin", "-c", os.path.join(ROOT, "queues.conf"), "queue", "pause" if on else "resume",
                "catalog")
    if r.returncode != 0:
        raise SystemExit(f"conveyor-admin queue pause: {r.stderr}")


def produce(conf, cmds, transport):
    f = tempfile.TemporaryFile()
    f.write(("\n".join(json.dumps(c) for c in cmds) + "\n").encode())
    f.seek(0)
    r = subprocess.run([os.path.join(BIN, "conveyor-produce"), "-c", conf], stdin=f, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, env=dict(os.environ, CONVEYOR_TRANSPORT=transport))
    if r.returncode != 0:
        raise SystemExit(f"conveyor-produce exited {r.returncode}: {r.stderr}")


def commits(ids):
    """{id: commit epoch} of the processed commands among ids."""
    return dict(query("SELECT id::text, extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8 "
                      "FROM processed_commands WHERE id = ANY(%s::uuid[])", ids))


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


def run(label, opts, a, cmds, key_of):
    ids = [c["id"] for c in cmds]
    drop_lanes(a.transport)
    conf = write_config(workers={"catalog": 0}, routing=CATALOG, queue_opts=opts)
    r = run_bin("conveyor-workers", "-c", conf, "--setup", env={"CONVEYOR_TRANSPORT": a.transport}, timeout=120)
    if r.returncode != 0:
        raise SystemExit(f"--setup: {r.stderr}")
    admin_pause(True)
    pool = Pool(workers={"catalog": a.workers}, routing=CATALOG, queue_opts=f"batch_size = {a.batch}; {opts}",
                env={"CONVEYOR_TRANSPORT": a.transport})
    try:
        produce(conf, cmds, a.transport)
        t0 = db_now()
        admin_pause(False)
        deadline = time.time() + max(600, len(ids) / 20)
        while query("SELECT count(*) FROM processed_commands WHERE id = ANY(%s::uuid[])", ids)[0][0] < len(ids):
            if pool.proc.poll() is not None:
                raise SystemExit(f"the pool exited; log {pool.log.name}")
            if time.time() > deadline:
                raise SystemExit(f"{label}: not all applied; pool log {pool.log.name}")
            time.sleep(0.25)
    finally:
        admin_pause(False)
        pool.stop()
        os.unlink(conf)
    done = commits(ids)
    end = max(done.values())
    drain = max(end - t0, 1e-9)
    last = {}
    for cid, t in done.items():
        k = key_of[cid]
        last[k] = max(last.get(k, 0.0), t)
    size = {}
    for k in key_of.values():
        size[k] = size.get(k, 0) + 1
    by_size = sorted(size, key=lambda k: size[k])
    small, large = by_size[:len(by_size) // 2], by_size[-10:]
    frac = {k: (last[k] - t0) / drain for k in last}
    res = {"run": label, "commands": len(ids), "seconds": round(drain, 2), "perSecond": round(len(ids) / drain),
           "smallKeysDone": {"p50": round(pct([frac[k] for k in small], 0.5), 3),
                             "p90": round(pct([frac[k] for k in small], 0.9), 3)},
           "largeKeysDone": {"p50": round(pct([frac[k] for k in large], 0.5), 3),
                             "p90": round(pct([frac[k] for k in large], 0.9), 3)},
           "keyDoneSpread": round(statistics.pstdev(frac.values()), 3)}
    print(f"{a.transport:8} {label:20} {res['perSecond']:6}/s ({res['seconds']} s); keys done at (fraction of "
          f"the drain) small p50 {res['smallKeysDone']['p50']} p90 {res['smallKeysDone']['p90']}, "
          f"10 largest p50 {res['largeKeysDone']['p50']} p90 {res['largeKeysDone']['p90']}", flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transport", default=os.environ.get("CONVEYOR_TRANSPORT", "rabbitmq"),
                    choices=("rabbitmq", "redis"))
    ap.add_argument("--commands", type=int, default=30000)
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--lanes", type=int, default=16)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--skew", type=float, default=1.0,
                    help="key k has a share 1/(k+1)^skew (1: Zipf, the default; 0: every key alike)")
    ap.add_argument("--smoke", action="store_true", help="a few hundred commands: that the benchmark works")
    a = ap.parse_args()
    if a.smoke:
        a.commands, a.keys = 600, 50
    os.environ["CONVEYOR_TRANSPORT"] = a.transport
    setup()
    reset_products(a.keys)
    cmds, key_of = workload(a.commands, a.keys, a.skew)
    log(f"{len(cmds)} updateStock over {a.keys} keys (largest {max(list(key_of.values()).count(0), 0)}), "
        f"skew {a.skew}, {a.workers} workers, batch_size {a.batch}, {a.transport}")
    out = []
    for label, opts in (("no lanes", ""), (f"{a.lanes} lanes", f"lanes = {a.lanes};"),
                        (f"{a.lanes} lanes, ordered", f"lanes = {a.lanes}; ordered = true;")):
        for c in cmds:  # fresh ids: the dedup table must not take a run's commands for the last one's
            new = str(uuid.uuid4())
            key_of[new] = key_of.pop(c["id"])
            c["id"] = new
        out.append(run(label, opts, a, cmds, key_of))
    drop_lanes(a.transport)
    base = out[0]["perSecond"]
    for r in out[1:]:
        r["ofNoLanes"] = round(r["perSecond"] / max(base, 1), 3)
    print(json.dumps({"transport": a.transport, "workers": a.workers, "batch": a.batch, "keys": a.keys,
                      "skew": a.skew,
                      "runs": out}))


if __name__ == "__main__":
    main()
