"""Operations from the terminal: conveyor-admin stats and queue pause/resume
across two pools, and the dedup table's window (processed_commands pruned,
a replay after it applied again)."""
import json
import os
import time

import pika
import redis as redislib

from harness import (AMQP_URL, REDIS_URL, ROOT, TRANSPORT, Events, Pool, Publisher, check, envelope, eq, new_id,
                     query, run_bin)

QUEUE_FIELDS = {"kind", "queue", "transport", "paused", "stateChangedAt", "stateChangedBy", "note", "waiting",
                "inFlight", "retrying", "dead", "parked", "consumers", "processed1m", "processed5m", "ratePerSecond1m",
                "ratePerSecond5m", "maxLength"}


def admin(*args, env=None):
    return run_bin("conveyor-admin", "-c", os.path.join(ROOT, "queues.conf"), *args, env=env)


def stats(*queue):
    """conveyor-admin --json stats: ({queue: object}, the outbox object)."""
    r = admin("--json", "stats", *queue)
    eq(r.returncode, 0, f"stats exit status (stderr: {r.stderr})")
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    queues = {o["queue"]: o for o in lines if o["kind"] == "queue"}
    outbox = [o for o in lines if o["kind"] == "outbox"]
    eq(len(outbox), 1, f"one outbox line: {r.stdout}")
    eq(len(lines), len(queues) + 1, f"a line per queue and the outbox's: {r.stdout}")
    return queues, outbox[0]


def processed_counts():
    """The catalog commands processed in the last minute and the last 5 minutes, counted here."""
    types = ["createProduct", "updateProduct", "updateStock", "deleteProduct"]
    one, five = query("SELECT count(*) FILTER (WHERE processed_at > now() - interval '1 minute'), "
                      "count(*) FILTER (WHERE processed_at > now() - interval '5 minutes') "
                      "FROM processed_commands WHERE type = ANY(%s)", types)[0]
    return {"processed1m": one, "processed5m": five}


def resume_everything():
    query("DELETE FROM queue_state")


def test_pause_stops_every_pool_within_a_second_then_resume():
    resume_everything()
    try:
        with Pool() as a, Pool() as b:
            ev, pub = Events(), Publisher()
            r = admin("queue", "pause", "catalog", "before the migration")
            eq(r.returncode, 0, f"pause exit status (stderr: {r.stderr})")
            check("paused catalog" in r.stdout, f"says what it did: {r.stdout}")
            logged = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
            check(any(line["msg"].startswith("queue catalog paused by ") and line["msg"].endswith(": before the migration")
                      for line in logged), f"the pause is logged with who and why: {r.stderr}")
            time.sleep(1.0)  # every pool stops taking within a second
            before = stats("catalog")[0]["catalog"]["waiting"]
            ids = [pub.command(envelope("createProduct", {"name": f"paused {i}", "price": 1}))["id"] for i in range(5)]
            # a queue that is not paused goes on meanwhile
            other = pub.command(envelope("register", {"name": "Ops", "email": f"ops-{new_id()}@example.com",
                                                      "password": "Paused12345"}))["id"]
            eq(ev.wait_result(other)[0]["type"], "user.registered", "the users queue is not paused")
            deadline = time.time() + 2
            while time.time() < deadline:
                ev.poll(0.2)
            eq([e for i in ids for e in ev.for_command(i)], [], "no catalog command ran while paused")
            eq(query("SELECT count(*) FROM processed_commands WHERE id = ANY(%s::uuid[])", ids)[0][0], 0,
               "nothing recorded while paused")
            s = stats("catalog")[0]["catalog"]
            check(s["paused"], f"stats says paused: {s}")
            eq(s["note"], "before the migration", "the note")
            check(s["stateChangedBy"] and "@" in s["stateChangedBy"], f"who paused it: {s}")
            eq(s["waiting"], before + 5, "the commands wait on the queue")
            if TRANSPORT == "rabbitmq":
                eq(s["consumers"], 0, "no pool consumes a paused queue")
            else:
                eq(s["inFlight"], 0, "no pool holds a message of a paused queue")
            r = admin("stats", "catalog")
            check(" paused " in r.stdout and "catalog paused since" in r.stdout and "before the migration" in r.stdout,
                  f"the table says paused, since when, by whom and why: {r.stdout}")
            for p in (a, b):
                check("queue catalog is paused" in p.read_log(), "each pool's catalog worker stopped taking")
            r = admin("queue", "resume", "catalog")
            eq(r.returncode, 0, f"resume exit status (stderr: {r.stderr})")
            check("queue catalog resumed by " in r.stderr, f"the resume is logged: {r.stderr}")
            for i in ids:
                eq(ev.wait_result(i)[0]["type"], "product.created", "applied after the resume")
            time.sleep(0.5)
            ev.poll(0.2)
            eq(sorted(len(ev.for_command(i)) for i in ids), [1] * 5, "each applied once")
            eq(query("SELECT count(*) FROM processed_commands WHERE id = ANY(%s::uuid[])", ids)[0][0], 5, "recorded")
            check(not stats("catalog")[0]["catalog"]["paused"], "stats says running")
            for p in (a, b):
                check("queue catalog is resumed" in p.read_log(), "each pool's catalog worker takes again")
            ev.close()
            pub.close()
            eq(b.stop(), (0, []), "clean stop")
            eq(a.stop(), (0, []), "clean stop")
    finally:
        resume_everything()


def test_stats_counts_what_each_queue_holds():
    """No pool runs: what the test puts in each place is what stats counts."""
    resume_everything()
    queues, outbox = stats()
    eq(sorted(queues), ["catalog", "orders", "users"], "every queue of the configuration")
    for q, o in queues.items():
        eq(set(o), QUEUE_FIELDS, f"the fields of {q}")
        eq(o["transport"], TRANSPORT, "the transport")
        check(o["paused"] is False, "running")
        check(isinstance(o["inFlight"], int), f"in flight: a count on both transports (RabbitMQ: what the pools "
              f"report holding): {o}")
        eq(o["consumers"] is None, TRANSPORT == "redis", "consumers: null on Redis, a count on RabbitMQ")
    before = queues["catalog"]
    pub = Publisher()
    dead_id, retry_body = new_id(), json.dumps(envelope("createProduct", {"name": "retry later", "price": 1})).encode()
    inflight_key = f"conveyor:inflight:catalog:test-ops-{new_id()}"
    event_id = new_id()
    recent = [new_id() for _ in range(6)]
    older = [new_id() for _ in range(4)]
    try:
        for i in range(3):
            pub.command(envelope("createProduct", {"name": f"waiting {i}", "price": 1}))
        dead_body = json.dumps(envelope("createProduct", {"name": "dead", "price": 1}, id_=dead_id))
        if TRANSPORT == "rabbitmq":
            conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
            ch = conn.channel()
            ch.confirm_delivery()
            ch.basic_publish("", "conveyor.catalog.dead", dead_body.encode(),
                             pika.BasicProperties(delivery_mode=2, headers={"x-conveyor-reason": "handler_error"}))
            # the first delay queue of the default retry settings, as a worker declares it; the message
            # waits a minute there (the test removes it first)
            ch.queue_declare("conveyor.catalog.retry.1000", durable=True, arguments={
                "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "conveyor.catalog",
                "x-queue-type": "classic"})
            ch.basic_publish("", "conveyor.catalog.retry.1000", retry_body,
                             pika.BasicProperties(delivery_mode=2, expiration="60000"))
            conn.close()
        else:
            r = redislib.Redis.from_url(REDIS_URL)
            r.lpush("conveyor:dead:catalog", json.dumps({"reason": "handler_error", "error": "x", "attempts": 1,
                                                         "failedAt": "2026-01-01T00:00:00.000Z", "queue": "catalog",
                                                         "message": dead_body}))
            r.zadd("conveyor:retry:catalog", {retry_body: time.time() * 1000 + 3600_000})
            r.lpush(inflight_key, retry_body, retry_body)
        for i in recent:
            query("INSERT INTO processed_commands (id, type, outcome, processed_at) "
                  "VALUES (%s, 'updateStock', 'applied', now() - interval '5 seconds')", i)
        for i in older:
            query("INSERT INTO processed_commands (id, type, outcome, processed_at) "
                  "VALUES (%s, 'updateStock', 'rejected', now() - interval '3 minutes')", i)
        query("INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload, created_at) "
              "VALUES (%s, 'product', %s, 'test.ops', '{}', now() - interval '100 seconds')", event_id, new_id())
        # rows of earlier tests leave the windows as the test runs (no pool adds any): stats must
        # lie between the counts just before and just after it
        recent_before = processed_counts()
        queues, after_outbox = stats()
        recent_after = processed_counts()
        c = queues["catalog"]
        eq(c["waiting"], before["waiting"] + 3, "waiting")
        eq(c["dead"], before["dead"] + 1, "dead")
        eq(c["retrying"], before["retrying"] + 1, "retrying")
        if TRANSPORT == "redis":
            eq(c["inFlight"], before["inFlight"] + 2, "in flight")
        for key, n in (("processed1m", 6), ("processed5m", 10)):
            check(recent_after[key] <= c[key] <= recent_before[key], f"{key}: {c[key]}, counted "
                  f"{recent_before[key]} before and {recent_after[key]} after")
            check(c[key] >= n, f"{key} holds the test's own rows")
        check(abs(c["ratePerSecond1m"] - c["processed1m"] / 60) < 1e-9, "the rate of the last minute, per second")
        check(abs(c["ratePerSecond5m"] - c["processed5m"] / 300) < 1e-9, "the rate of the last 5 minutes")
        eq(after_outbox["unpublished"], outbox["unpublished"] + 1, "the outbox backlog")
        check(after_outbox["oldestSeconds"] >= 100, f"the oldest unpublished event's age: {after_outbox}")
        one, _ = stats("users")
        eq(list(one), ["users"], "stats QUEUE: that queue only")
        r = admin("stats")
        eq(r.returncode, 0, "the table's exit status")
        lines = r.stdout.splitlines()
        check(lines[0].split()[:4] == ["QUEUE", "TRANSPORT", "STATE", "WAITING"], f"a header: {r.stdout}")
        row = next(line.split() for line in lines if line.startswith("catalog "))
        eq(row[:3], ["catalog", TRANSPORT, "running"], "the catalog row")
        eq(int(row[3]), c["waiting"], "its waiting count")
        check(any(line.startswith("outbox: ") and "not yet published, the oldest " in line for line in lines),
              f"the outbox line: {r.stdout}")
    finally:
        pub.close()
        query("DELETE FROM processed_commands WHERE id = ANY(%s::uuid[])", recent + older)
        query("DELETE FROM outbox WHERE event_id = %s", event_id)
        if TRANSPORT == "rabbitmq":
            conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
            ch = conn.channel()
            ch.queue_purge("conveyor.catalog")
            ch.queue_purge("conveyor.catalog.retry.1000")
            conn.close()
        else:
            r = redislib.Redis.from_url(REDIS_URL)
            r.delete("conveyor:queue:catalog", inflight_key)
            r.zrem("conveyor:retry:catalog", retry_body)
        eq(admin("dead", "purge", "catalog", dead_id).returncode, 0, "the test's dead letter purged")


def test_admin_usage_errors():
    for args, why in ((["queue", "pause", "nosuch"], "an unknown queue"), (["queue", "resume", "nosuch"], "one more"),
                      (["stats", "nosuch"], "stats of an unknown queue")):
        r = admin(*args)
        eq(r.returncode, 2, f"{why}: exit status")
        check("nosuch" in r.stderr, f"{why}: named: {r.stderr}")
    for args in (["queue"], ["queue", "pause"], ["queue", "stop", "catalog"], ["queue", "resume", "catalog", "x"],
                 ["queue", "pause", "catalog", "a", "b"], ["stats", "catalog", "users"]):
        r = admin(*args)
        eq(r.returncode, 2, f"{args}: exit status")
        check("usage:" in r.stderr, f"{args}: the usage: {r.stderr}")
    r = admin("--help")
    check("stats [QUEUE]" in r.stdout and "queue pause QUEUE" in r.stdout, f"--help: {r.stdout}")
    no_db = {"CONVEYOR_DATABASE_URL": "postgresql://conveyor@127.0.0.1:1/conveyor?connect_timeout=2"}
    for args in (["queue", "pause", "catalog"], ["stats"]):
        r = admin(*args, env=no_db)
        eq(r.returncode, 3, f"{args} without the database: exit status ({r.stderr})")
        check("127.0.0.1:1" in r.stderr or "database" in r.stderr, f"says why: {r.stderr}")
    eq(query("SELECT count(*) FROM queue_state WHERE paused")[0][0], 0, "nothing paused by the failures")
    r = admin("stats", env={"CONVEYOR_RABBITMQ_URL": "amqp://guest:guest@127.0.0.1:1/",
                            "CONVEYOR_REDIS_URL": "redis://127.0.0.1:1/0"})
    eq(r.returncode, 3, f"stats without the broker: exit status ({r.stderr})")


def test_dedup_window_prunes_old_rows_and_a_replay_is_applied_again():
    old = [new_id() for _ in range(5)]
    kept = new_id()
    for i in old:
        query("INSERT INTO processed_commands (id, type, outcome, processed_at) "
              "VALUES (%s, 'createProduct', 'applied', now() - interval '31 days')", i)
    query("INSERT INTO processed_commands (id, type, outcome, processed_at) "
          "VALUES (%s, 'createProduct', 'applied', now() - interval '29 days')", kept)
    try:
        # batches of 2: the 5 old rows go in three statements of one pass
        with Pool(extra="dedup: { retention_days = 30; prune_batch = 2; };") as pool:
            deadline = time.time() + 15
            while query("SELECT count(*) FROM processed_commands WHERE id = ANY(%s::uuid[])", old)[0][0]:
                check(time.time() < deadline, "rows older than the window are pruned")
                time.sleep(0.2)
            eq(query("SELECT count(*) FROM processed_commands WHERE id = %s", kept)[0][0], 1,
               "a row within the window is kept")
            check("processed_commands row" in pool.read_log() and "older than 30 days" in pool.read_log(),
                  "the prune is logged")
            ev, pub = Events(), Publisher()
            pub.command(envelope("createProduct", {"name": "replayed after the window", "price": 1}, id_=old[0]))
            res = ev.wait_result(old[0])
            eq(res[0]["type"], "product.created", "a replay of a pruned id is applied again")
            rows = query("SELECT outcome, processed_at > now() - interval '1 minute' FROM processed_commands "
                         "WHERE id = %s", old[0])
            eq(rows, [("applied", True)], "recorded anew")
            pub.command(envelope("createProduct", {"name": "replayed within the window", "price": 1}, id_=kept))
            marker = pub.command(envelope("createProduct", {"name": "after it", "price": 1}))["id"]
            ev.wait_result(marker)
            time.sleep(0.5)
            ev.poll(0.2)
            eq(ev.for_command(kept), [], "a replay within the window is still a duplicate")
            ev.close()
            pub.close()
            eq(pool.stop(), (0, []), "clean stop")
    finally:
        query("DELETE FROM processed_commands WHERE id = ANY(%s::uuid[])", old + [kept])
