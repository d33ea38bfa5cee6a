#!/usr/bin/python3
"""What a page of dead letters costs at 100 and at 100,000 letters, per transport,
on the servers of scripts/servers.sh (docs/performance.md, "Dead letters").

    bench/dead_pages.py [--counts 100,100000] [--transports rabbitmq,redis] [--requests 30]

For each transport and count: fills queue `benchdead` with that many dead
letters as the workers write them (RabbitMQ: the dead-letter queue, and the
index rows in PostgreSQL; Redis: the list), starts a pool with its HTTP
listener (no worker), and times GET /api/dead?queue=benchdead&limit=100 for the
first page and for a page in the middle (by its cursor), --requests times
each: median and p90 in ms. Then the cost of a drift: the index's count made
wrong, the time of the request that rebuilds it from the queue (one walk).
Prints one line per figure, and a JSON summary last. Needs no pool running;
deletes what it made. CONVEYOR_BIN_DIR picks the binaries.
"""
import argparse
import http.client
import json
import os
import statistics
import sys
import time

import pika
import redis as redislib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "integration"))
from harness import AMQP_URL, REDIS_URL, Pool, free_port, new_id, query, setup  # noqa: E402

QUEUE = "benchdead"


def fill(transport, n):
    body = lambda i: json.dumps({"id": new_id(), "type": "noSuchCommand", "payload": {"i": i}})  # noqa: E731
    at = "2026-12-01T00:00:00.000Z"
    if transport == "redis":
        r = redislib.Redis.from_url(REDIS_URL)
        r.delete(f"conveyor:dead:{QUEUE}")
        p = r.pipeline(transaction=False)
        for i in range(n):
            p.lpush(f"conveyor:dead:{QUEUE}", json.dumps({"reason": "unknown_command", "error": "bench", "attempts": 0,
                                                        "failedAt": at, "queue": QUEUE, "message": body(i)}))
            if i % 5000 == 4999:
                p.execute()
        p.execute()
        return
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    ch = conn.channel()
    ch.queue_declare(f"conveyor.{QUEUE}.dead", durable=True, arguments={"x-queue-type": "quorum"})
    ch.queue_purge(f"conveyor.{QUEUE}.dead")
    query("DELETE FROM dead_letter_index WHERE queue = %s", QUEUE)
    rows = []
    for i in range(n):
        b, dead_id = body(i), new_id()
        ch.basic_publish("", f"conveyor.{QUEUE}.dead", b.encode(), pika.BasicProperties(delivery_mode=2, headers={
            "x-conveyor-reason": "unknown_command", "x-conveyor-error": "bench", "x-conveyor-attempts": 0,
            "x-conveyor-failed-at": at, "x-conveyor-dead-id": dead_id}))
        rows.append((dead_id, json.loads(b)["id"], b))
        if len(rows) == 5000 or i == n - 1:
            query("INSERT INTO dead_letter_index (queue, dead_id, key, reason, error, attempts, failed_at, body) "
                  "SELECT %s, d::uuid, k, 'unknown_command', 'bench', 0, %s, convert_to(b, 'UTF8') "
                  "FROM unnest(%s::text[], %s::text[], %s::text[]) AS u(d, k, b)",
                  QUEUE, at, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
            rows = []
    deadline = time.time() + 300
    while time.time() < deadline:  # published without confirms: wait until the queue has them all
        if ch.queue_declare(f"conveyor.{QUEUE}.dead", passive=True).method.message_count >= n:
            break
        time.sleep(0.2)
    conn.close()


def clear(transport):
    if transport == "redis":
        redislib.Redis.from_url(REDIS_URL).delete(f"conveyor:dead:{QUEUE}")
        return
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    conn.channel().queue_delete(f"conveyor.{QUEUE}.dead")
    conn.close()
    query("DELETE FROM dead_letter_index WHERE queue = %s", QUEUE)
    query("DELETE FROM dead_letter_index_count WHERE queue = %s", QUEUE)


def timed_get(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t = time.perf_counter()
    c.request("GET", path)
    r = c.getresponse()
    raw = r.read()
    ms = 1000 * (time.perf_counter() - t)
    c.close()
    if r.status != 200:
        raise SystemExit(f"GET {path}: {r.status} {raw[:300]!r}")
    return ms, json.loads(raw)


def figures(samples):
    s = sorted(samples)
    return round(statistics.median(s), 2), round(s[int(0.9 * (len(s) - 1))], 2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="100,100000")
    ap.add_argument("--transports", default="rabbitmq,redis")
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--rebuild-max", type=int, default=10000,
                    help="time a drift's rebuild only up to this many letters (a walk: about 2 ms a letter)")
    a = ap.parse_args()
    setup()
    out = []
    for transport in a.transports.split(","):
        for n in [int(x) for x in a.counts.split(",")]:
            t0 = time.time()
            fill(transport, n)
            fill_s = time.time() - t0
            port = free_port()
            env = {"CONVEYOR_TRANSPORT": transport}
            pool = Pool(workers={QUEUE: 0}, routing={QUEUE: ["noSuchCommand"]}, env=env,
                        extra=f'http: {{ listen = "127.0.0.1:{port}"; }};')
            try:
                path = f"/api/dead?queue={QUEUE}&limit=100"
                _, first = timed_get(port, path)  # the first request opens the connections
                q = first["queues"][0]
                assert q["total"] == n and q["shown"] == min(n, 100), q
                firsts = [timed_get(port, path)[0] for _ in range(a.requests)]
                mid = n // 2
                if transport == "redis":
                    cursor = str(mid)
                else:
                    rid = query("SELECT id FROM dead_letter_index WHERE queue = %s ORDER BY id OFFSET %s LIMIT 1",
                                QUEUE, mid - 1)[0][0]
                    cursor = f"{mid}.{rid}"
                _, page = timed_get(port, f"{path}&cursor={cursor}")
                eq_first = page["queues"][0]["groups"][0]["letters"][0]["index"]
                assert eq_first == mid + 1, eq_first
                middles = [timed_get(port, f"{path}&cursor={cursor}")[0] for _ in range(a.requests)]
                rebuild_ms = None
                if transport == "rabbitmq" and n <= a.rebuild_max:  # a drift: the next reader rebuilds the index from the queue
                    query("UPDATE dead_letter_index_count SET n = n + 1 WHERE queue = %s", QUEUE)
                    rebuild_ms, _ = timed_get(port, path)
                    rebuild_ms = round(rebuild_ms, 1)
                    after = [timed_get(port, path)[0] for _ in range(a.requests)]
                    check_after = figures(after)
                else:
                    check_after = None
            finally:
                pool.stop()
            row = {"transport": transport, "letters": n, "fill_s": round(fill_s, 1),
                   "first_page_ms": figures(firsts), "middle_page_ms": figures(middles),
                   "rebuild_ms": rebuild_ms, "first_page_after_rebuild_ms": check_after}
            print(f"{transport:8} {n:>7} letters: first page median/p90 {row['first_page_ms'][0]} / "
                  f"{row['first_page_ms'][1]} ms, middle page {row['middle_page_ms'][0]} / {row['middle_page_ms'][1]} ms"
                  + (f", a drift's rebuild {rebuild_ms} ms, then {check_after[0]} / {check_after[1]} ms"
                     if rebuild_ms is not None else "") + f" (filled in {row['fill_s']} s)", flush=True)
            out.append(row)
            clear(transport)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
