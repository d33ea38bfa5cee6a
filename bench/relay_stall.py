#!/usr/bin/python3
"""What a stalled commit costs the outbox relay (docs/decisions.md, "The relay
claims above a floor"), on the servers of scripts/servers.sh.

    bench/relay_stall.py [--rate 100] [--seconds 3] [--rows 10000,100000]

1. Other aggregates' latency: a pool (catalog: 2 workers) on CONVEYOR_TRANSPORT;
   updateStock on 20 products at --rate commands a second for --seconds, from
   publish to the subscriber, first with nothing stalled, then while another
   session holds an outbox row uncommitted (a stalled commit: the relay's floor
   cannot pass it, its claims walk every row published meanwhile). The workers
   are all free: what differs is the relay. CONVEYOR_BIN_DIR picks the binaries.
2. The claim's cost with dead index entries: N rows inserted and marked
   published as the relay marks them, then the relay's claim (its exact SQL,
   EXPLAIN ANALYZE, BUFFERS) from below all of them (the floor held by a
   stall) and from above them (the floor where it moves when nothing stalls),
   while a transaction holds back the cleanup horizon (during the stall
   PostgreSQL cannot mark the entries dead) and after it ended. Runs with no pool;
   the rows are deleted afterwards.
"""
import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "integration"))
from harness import Events, Pool, Publisher, db, envelope, new_id, query  # noqa: E402

CLAIM = ("SELECT coalesce(pg_sequence_last_value('outbox_id_seq'::regclass), 0), "
         "pg_snapshot_xmin(pg_current_snapshot())::text, o.id, o.event_id::text, o.event_type, o.payload::text "
         "FROM (SELECT 1) one LEFT JOIN LATERAL (SELECT id, event_id, event_type, payload FROM outbox "
         "WHERE published_at IS NULL AND id > %s ORDER BY id LIMIT 500) o ON true ORDER BY o.id")


def pct(values, p):
    s = sorted(values)
    return 1000 * s[min(len(s) - 1, int(p * len(s)))]


def run_flow(pub, ev, products, rate, seconds):
    """updateStock at rate a second for seconds; the publish-to-arrival latencies in seconds."""
    sent = {}
    t_next = time.time()
    until = t_next + seconds
    k = 0
    while time.time() < until:
        cmd = envelope("updateStock", {"productId": products[k % len(products)], "quantityChange": 1})
        k += 1
        pub.command(cmd)
        sent[cmd["id"]] = time.time()
        t_next += 1.0 / rate
        while time.time() < t_next:
            ev.poll(timeout=0)
            time.sleep(0.0005)
    ev.wait(lambda s: all(s.for_command(c) for c in sent), timeout=30, what="the events")
    return [ev.arrived[ev.for_command(c)[0]["id"]] - t for c, t in sent.items()]


def latency(rate, seconds):
    out = {}
    with Pool(workers={"catalog": 2, "users": 0, "orders": 0}) as pool:
        pub, ev = Publisher(), Events()
        products = []
        for i in range(20):
            cmd = envelope("createProduct", {"name": f"bench {i}", "price": "1.00", "stock": 1000000})
            pub.command(cmd)
            products.append(ev.wait_result(cmd["id"])[0]["data"]["productId"])
        run_flow(pub, ev, products, rate, 1)  # warm up
        out["calm"] = run_flow(pub, ev, products, rate, seconds)
        stalled = db()
        stalled.autocommit = False
        with stalled.cursor() as cur:
            cur.execute("INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) "
                        "VALUES (%s, 'product', %s, 'bench.stalled', '{}')", (new_id(), new_id()))
        out["stalled"] = run_flow(pub, ev, products, rate, seconds)
        stalled.rollback()
        stalled.close()
        out["after"] = run_flow(pub, ev, products, rate, seconds)
        pub.close()
        ev.close()
        pool.stop()
    for k, v in out.items():
        print(f"{os.environ.get('CONVEYOR_TRANSPORT', 'rabbitmq')} {k:8} n={len(v)} latency ms: median {pct(v, 0.5):.1f} "
              f"p90 {pct(v, 0.9):.1f} p99 {pct(v, 0.99):.1f} max {1000 * max(v):.1f}")


def explain(cur, floor):
    cur.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + CLAIM, (floor,))
    plan = cur.fetchone()[0][0]
    text = json.dumps(plan)
    hits = sum(int(x) for x in re.findall(r'"Shared Hit Blocks": (\d+)', text)[:1])
    return plan["Execution Time"], hits


def claim_cost(n):
    c = db()
    cur = c.cursor()
    cur.execute("SET enable_seqscan TO off")
    cur.execute("SET jit TO off")
    holder = db()
    holder.autocommit = False
    hcur = holder.cursor()
    hcur.execute("SELECT pg_current_xact_id()")  # holds back the horizon, as a stalled commit does
    cur.execute("SELECT coalesce(pg_sequence_last_value('outbox_id_seq'::regclass), 0)")
    below = cur.fetchone()[0]
    cur.execute("INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) "
                "SELECT gen_random_uuid(), 'product', gen_random_uuid(), 'bench.dead', '{}' FROM generate_series(1, %s)",
                (n,))
    cur.execute("SELECT max(id) FROM outbox")
    top = cur.fetchone()[0]
    for lo in range(below, top, 500):  # marked as the relay marks them, 500 at a time
        cur.execute("UPDATE outbox SET published_at = now() WHERE id = ANY(%s::bigint[])",
                    (list(range(lo + 1, min(lo + 500, top) + 1)),))
    for label, floor in (("floor below them", below), ("floor above them", top)):
        runs = [explain(cur, floor) for _ in range(3)]
        print(f"{n} dead entries, horizon held, {label}: {runs[-1][0]:.3f} ms, {runs[-1][1]} buffers")
    holder.rollback()
    holder.close()
    runs = [explain(cur, below) for _ in range(3)]
    print(f"{n} dead entries, horizon free, floor below them: first {runs[0][0]:.3f} ms ({runs[0][1]} buffers), "
          f"then {runs[-1][0]:.3f} ms ({runs[-1][1]} buffers)")
    cur.execute("DELETE FROM outbox WHERE event_type = 'bench.dead'")
    c.close()
    query("VACUUM outbox")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=100)
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--rows", default="10000,100000")
    ap.add_argument("--skip-latency", action="store_true")
    a = ap.parse_args()
    if not a.skip_latency:
        latency(a.rate, a.seconds)
    for n in a.rows.split(","):
        if n:
            claim_cost(int(n))


if __name__ == "__main__":
    main()
