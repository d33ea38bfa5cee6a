"""RabbitMQ's blind spots, on both transports: dead letters are read a page at a
time without being taken off their queue (RabbitMQ: from their index in
PostgreSQL, rebuilt from the queue when a foreign tool moved letters), and in
flight is what the pool's workers hold, in the metrics, the dashboard and
conveyor-admin stats."""
import json
import os
import re
import time

import pika
import psycopg2
import redis as redislib

from harness import (AMQP_URL, DB_URL, REDIS_URL, ROOT, TRANSPORT, Events, Publisher, check, drain_dead, envelope,
                     eq, http_pool, new_id, run_bin)
from test_dashboard import get, request
from test_recovery import product, stock


def admin(*args):
    return run_bin("conveyor-admin", "-c", os.path.join(ROOT, "queues.conf"), *args)


def admin_json(*args):
    r = admin("--json", *args)
    eq(r.returncode, 0, f"conveyor-admin {' '.join(args)} (stderr: {r.stderr})")
    return [json.loads(line) for line in r.stdout.splitlines()], r.stderr


def raw_dead_letters(queue):
    """The dead letters as the broker holds them, looked at without moving them
    where the broker allows (Redis); RabbitMQ: None (looking is taking there)."""
    if TRANSPORT == "redis":
        return redislib.Redis.from_url(REDIS_URL).lrange(f"conveyor:dead:{queue}", 0, -1)
    return None


def take_all_rabbitmq(queue):
    """Takes every dead letter of queue off RabbitMQ (a foreign tool): [(redelivered, headers, body)]."""
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    ch = conn.channel()
    out = []
    while True:
        m, props, body = ch.basic_get(f"conveyor.{queue}.dead", auto_ack=True)
        if m is None:
            break
        out.append((m.redelivered, props.headers or {}, body))
    conn.close()
    return out


def test_dead_letters_are_read_a_page_at_a_time_and_never_taken():
    drain_dead("orders")
    admin_json("dead", "list", "orders")  # RabbitMQ: the index meets the emptied queue (a walk of nothing)
    ids = [new_id() for _ in range(5)]
    with http_pool() as pool:
        pub = Publisher()
        for i in ids:  # a type no queue takes: dead-lettered at once, in this order, by the one orders worker
            pub.raw("orders", json.dumps({"id": i, "type": "noSuchCommand", "payload": {}}).encode())
        pub.close()
        deadline = time.time() + 15
        while pool.read_log().count("dead-lettered (unknown_command)") < 5 and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)
        before = raw_dead_letters("orders")

        # conveyor-admin: pages of 2, by the cursor each page gives
        seen, cursor, pages = [], None, 0
        while True:
            args = ["dead", "list", "orders", "--limit", "2"] + (["--cursor", cursor] if cursor else [])
            page, err = admin_json(*args)
            check("rebuilt" not in err, f"no rebuild of the index while nothing moved: {err}")
            pages += 1
            check(1 <= len(page) <= 2, f"a page of at most 2: {page}")
            for o in page:
                eq(o["total"], 5, "the total is the queue's")
            seen += [(o["index"], o["commandId"]) for o in page]
            cursor = page[-1].get("nextCursor")
            eq(cursor is None, len(seen) == 5, "a next cursor until the last page")
            if cursor:
                check("--cursor " + cursor in err, f"the next page is said on stderr: {err}")
            if not cursor:
                break
        eq(pages, 3, "5 letters in pages of 2")
        eq(seen, list(zip(range(1, 6), ids)), "numbered oldest first, each once, in the order they died")

        # the dashboard: the same pages, and the whole list twice
        body = get(pool, "/api/dead?queue=orders&limit=2")
        eq([q["queue"] for q in body["queues"]], ["orders"], "queue=Q: that queue only")
        q = body["queues"][0]
        eq((q["total"], q["shown"], q["offset"], q["limit"]), (5, 2, 0, 2), "the first page")
        nxt = q["nextCursor"]
        check(isinstance(nxt, str) and nxt, f"a next cursor: {q}")
        q2 = get(pool, f"/api/dead?queue=orders&limit=2&cursor={nxt}")["queues"][0]
        eq((q2["offset"], q2["shown"]), (2, 2), "the second page")
        eq([l["index"] for g in q2["groups"] for l in g["letters"]], [3, 4], "its letters' numbers")
        eq([l["commandId"] for g in q2["groups"] for l in g["letters"]], ids[2:4], "its letters")
        for _ in range(2):
            all_ = {x["queue"]: x for x in get(pool, "/api/dead")["queues"]}
            eq(all_["orders"]["total"], 5, "every queue, orders' total")
            eq(all_["orders"]["nextCursor"], None, "one page holds them (200 by default)")
        status, _, e = request(pool, "GET", "/api/dead?queue=orders&limit=0")
        eq(status, 400, f"limit 0 refused: {e}")
        status, _, e = request(pool, "GET", "/api/dead?queue=orders&cursor=zz")
        eq(status, 400, f"a cursor not given is refused: {e}")
        letter = get(pool, f"/api/dead/letter?queue=orders&key={ids[3]}")
        eq((letter["index"], letter["commandId"]), (4, ids[3]), "one letter by key, with its number")
        cmd = get(pool, f"/api/command?id={ids[1]}")
        eq([d["commandId"] for d in cmd["deadLetters"]], [ids[1]], "the command page finds its dead letter")
        r = admin("dead", "show", "orders", "#5")
        eq(r.returncode, 0, f"show #5 ({r.stderr})")
        eq(json.loads(r.stdout)["commandId"], ids[4], "#5 is the fifth")
        counts, _ = admin_json("dead", "counts")
        eq({o["queue"]: o["total"] for o in counts}["orders"], 5, "counts")

        # nothing was redelivered or moved by all that reading
        if TRANSPORT == "redis":
            eq(raw_dead_letters("orders"), before, "the list untouched")
            purged = ids[0]
        else:
            taken = take_all_rabbitmq("orders")  # a foreign tool takes them all
            eq(len(taken), 5, "5 letters on the queue")
            eq([t[0] for t in taken], [False] * 5, "none was ever redelivered: reading took none of them")
            for _, headers, _ in taken:
                check(re.fullmatch(r"[0-9a-f-]{36}", str(headers.get("x-conveyor-dead-id", ""))),
                      f"each carries its index key: {headers}")
            # the index now disagrees with the queue: the next reader rebuilds it
            page, err = admin_json("dead", "list", "orders")
            eq(page, [], "what a foreign tool took is not listed")
            check("rebuilt" in err, f"the drift was repaired by a rebuild: {err}")
            conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
            ch = conn.channel()
            for i in ids[:2]:
                ch.basic_publish("", "conveyor.orders.dead", b'{"id": "' + i.encode() + b'"}',
                                 pika.BasicProperties(delivery_mode=2, headers={"x-conveyor-reason": "foreign"}))
            conn.close()
            page, err = admin_json("dead", "list", "orders")
            eq([(o["commandId"], o["reason"]) for o in page], [(i, "foreign") for i in ids[:2]],
               "letters a foreign tool added")
            check("rebuilt" in err, f"found by a rebuild: {err}")
            ids = ids[:2]
            purged = ids[0]

        # purge one (RabbitMQ: still by taking from the queue): gone, and the index in step without a rebuild
        r = admin("dead", "purge", "orders", purged)
        eq(r.returncode, 0, f"purge ({r.stderr})")
        page, err = admin_json("dead", "list", "orders")
        check("rebuilt" not in err, f"the purge kept the index in step: {err}")
        eq([(o["index"], o["commandId"]) for o in page], list(zip(range(1, len(ids)), ids[1:])), "the rest, renumbered")
        drain_dead("orders")


def metric(pool, name, queue):
    text = get(pool, "/metrics")
    m = re.search(r'^%s\{queue="%s"\} (\d+)$' % (name, queue), text, re.M)
    check(m, f"{name} for {queue}")
    return int(m.group(1))


def test_in_flight_is_what_a_stalled_worker_holds():
    pid = product("inflight")
    lock = psycopg2.connect(DB_URL)
    cur = lock.cursor()
    cur.execute("SELECT stock FROM products WHERE id = %s FOR UPDATE", (pid,))  # the worker waits for it
    ev, pub = Events(), Publisher()
    with http_pool(env={"CONVEYOR_LOG_LEVEL": "debug"}, queue_opts="lock_timeout_ms = 25000;") as pool:
        try:
            mark = len(pool.read_log())
            cids = [pub.command(envelope("updateStock", {"productId": pid, "quantityChange": 1}))["id"] for _ in range(3)]
            deadline = time.time() + 15
            while metric(pool, "conveyor_queue_inflight", "catalog") == 0 and time.time() < deadline:
                time.sleep(0.1)
            time.sleep(1.5)  # stalled; each pool reports what it holds once a second
            took = [int(n) for n in re.findall(r'"took (\d+) messages?"', pool.read_log()[mark:])]
            eq(len(took), 1, f"one take, stalled on the lock: {took}")
            held = took[0]
            eq(metric(pool, "conveyor_queue_inflight", "catalog"), held, "the metric: what the worker took")
            overview = {q["name"]: q for q in get(pool, "/api/overview")["queues"]}
            eq(overview["catalog"]["inFlight"], held, "the dashboard's in flight")
            stats, _ = admin_json("stats", "catalog")
            eq(stats[0]["inFlight"], held, "conveyor-admin stats: a number on both transports")
            r = admin("stats", "catalog")
            row = next(line.split() for line in r.stdout.splitlines() if line.startswith("catalog "))
            eq(row[4], str(held), f"the table's IN-FLIGHT column: {r.stdout}")
        finally:
            lock.rollback()
            lock.close()
        for c in cids:
            eq(ev.wait_result(c)[0]["type"], "stock.updated", "applied once the lock went")
        eq(stock(pid), 13, "all three applied")
        time.sleep(1.5)
        eq(metric(pool, "conveyor_queue_inflight", "catalog"), 0, "nothing held after")
        eq(admin_json("stats", "catalog")[0][0]["inFlight"], 0, "stats: nothing held after")
    ev.close()
    pub.close()
    eq(admin_json("stats", "catalog")[0][0]["inFlight"], 0 if TRANSPORT == "redis" else 0,
       "a stopped pool's rows are gone")
