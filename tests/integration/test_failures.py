"""Invalid messages go to the dead letters with their reason while valid ones
are still processed; SIGTERM drains the pool and leaves no process behind."""
import json
import os
import time

import pika
import redis as redislib

from harness import (AMQP_URL, REDIS_URL, ROOT, TRANSPORT, Events, Pool, Publisher, check, drain_dead, envelope,
                     eq, new_id, query, run_bin)

ID = "5f0c6a8e-8a9b-4f0e-9d3c-1f2e3d4c5b6a"

BAD = [  # (body, reason, words in the error)
    (b"not json at all", "invalid_envelope", "not valid JSON"),
    (b"[1, 2, 3]", "invalid_envelope", "not a JSON object"),
    (b'{"type": "updateStock", "payload": {}}', "invalid_envelope", "'id' is missing"),
    (b'{"id": "123", "type": "updateStock", "payload": {}}', "invalid_envelope", "UUID"),
    (json.dumps({"id": new_id(), "payload": {}}).encode(), "invalid_envelope", "'type'"),
    (json.dumps({"id": new_id(), "type": "updateStock"}).encode(), "invalid_envelope", "'payload'"),
    (json.dumps({"id": new_id(), "type": "updateStock", "payload": "x"}).encode(), "invalid_envelope", "'payload'"),
    (b'{"id": "' + new_id().encode() + b'", "type": "updateStock", "payload": {"n": "\xff\xfe"}}',
     "invalid_envelope", "UTF-8"),
    (json.dumps({"id": new_id(), "type": "updateStock", "payload": {}}).encode() + b" {}",
     "invalid_envelope", "after the JSON"),
    (json.dumps({"id": new_id(), "type": "updateStock", "payload": {"pad": "x" * 70000}}).encode(),
     "invalid_envelope", "over the limit"),
    (b'{"id": "' + new_id().encode() + b'", "type": "updateStock", "payload": ' + b"[" * 10000 + b"]" * 10000 + b"}",
     "invalid_envelope", "JSON"),
    (json.dumps({"id": new_id(), "type": "launchRocket", "payload": {}}).encode(), "unknown_command", "launchRocket"),
]


def test_invalid_messages_are_dead_lettered():
    drain_dead("catalog")
    with Pool() as pool:
        pub, ev = Publisher(), Events()
        for body, _, _ in BAD:
            pub.raw("catalog", body)
        valid = envelope("createProduct", {"name": "After the bad ones", "price": 1})
        pub.command(valid)
        res = ev.wait_result(valid["id"])
        eq(res[0]["type"], "product.created", "the valid command after the bad ones")
        deadline = time.time() + 10
        dead = []
        while len(dead) < len(BAD) and time.time() < deadline:
            dead += drain_dead("catalog")
            time.sleep(0.1)
        eq(len(dead), len(BAD), "dead letters")
        by_body = {d["body"]: d for d in dead}
        for body, reason, words in BAD:
            d = by_body.get(body)
            check(d is not None, f"dead letter with the untouched body {body[:60]!r}")
            eq(d["reason"], reason, f"reason for {body[:60]!r}")
            check(words in d["error"], f"error {d['error']!r} mentions {words!r}")
            check(d["failedAt"] and d["failedAt"].endswith("Z"), "failedAt")
            eq(d["attempts"], 0, "a message no handler started has 0 attempts")
        log = pool.read_log()
        check("died of signal" not in log and "exited with status" not in log, "no worker restarted")
        pub.close()
        ev.close()
        rc, left = pool.stop()
        eq((rc, left), (0, []), "clean stop")


def test_dead_letter_keeps_non_utf8_body():
    drain_dead("users")
    with Pool() as pool:
        pub = Publisher()
        body = b"\x00\x01\xffbinary"
        pub.raw("users", body)
        deadline = time.time() + 10
        dead = []
        while not dead and time.time() < deadline:
            dead = drain_dead("users")
            time.sleep(0.1)
        eq(len(dead), 1, "one dead letter")
        eq(dead[0]["body"], body, "body untouched")
        eq(dead[0]["reason"], "invalid_envelope", "reason")
        if TRANSPORT == "redis":
            check("messageBase64" in dead[0] and "message" not in dead[0], "non-UTF-8 body kept as base64")
        pub.close()
        eq(pool.stop(), (0, []), "clean stop")


def test_message_id_stands_in_for_a_missing_id():
    with Pool() as pool:
        pub, ev = Publisher(), Events()
        cid = new_id()
        if TRANSPORT == "rabbitmq":
            pub.raw("catalog", json.dumps({"type": "createProduct", "payload": {"name": "m", "price": 1}}).encode(),
                    message_id=cid)
            eq(ev.wait_result(cid)[0]["type"], "product.created", "AMQP message_id used as the command id")
        else:
            drain_dead("catalog")
            pub.raw("catalog", json.dumps({"type": "createProduct", "payload": {"name": "m", "price": 1}}).encode())
            deadline = time.time() + 10
            dead = []
            while not dead and time.time() < deadline:
                dead = drain_dead("catalog")
                time.sleep(0.1)
            eq(dead[0]["reason"] if dead else None, "invalid_envelope", "Redis has no message_id: dead")
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")


def test_sigterm_drains_and_leaves_no_process():
    pool = Pool(workers={"users": 2, "catalog": 2, "orders": 1})
    pub = Publisher()
    ids = []
    for i in range(30):
        cmd = envelope("register", {"name": f"u{i}", "email": f"t{new_id()[:12]}@example.com",
                                    "password": "Secret123"})
        pub.command(cmd)
        ids.append(cmd["id"])
    time.sleep(0.5)  # some in flight (argon2id takes a while), some still queued
    t0 = time.time()
    rc, left = pool.stop()
    took = time.time() - t0
    eq(rc, 0, "exit status after SIGTERM")
    eq(left, [], "processes left behind")
    print(f"pool stopped {took:.2f} s after SIGTERM")
    done = {r[0] for r in query("SELECT id::text FROM processed_commands WHERE id = ANY(%s::uuid[])", ids)}
    # nothing lost: what was not processed is still queued, and a new pool finishes it
    with Pool() as pool2:
        ev = Events()
        deadline = time.time() + 30
        while time.time() < deadline:
            done = {r[0] for r in query("SELECT id::text FROM processed_commands WHERE id = ANY(%s::uuid[])", ids)}
            if len(done) == len(ids):
                break
            time.sleep(0.2)
        eq(len(done), len(ids), "every command processed across the restart")
        ev.close()
        eq(pool2.stop(), (0, []), "clean stop")
    pub.close()


def test_supervisor_restarts_a_killed_worker():
    import os
    import signal
    with Pool(expect_restarts=True) as pool:
        text = pool.read_log()
        pids = [json.loads(line)["pid"] for line in text.splitlines() if "consuming queue catalog" in line]
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.time() + 10
        while time.time() < deadline and pool.read_log().count("consuming queue catalog") < 2:
            time.sleep(0.1)
        check(pool.read_log().count("consuming queue catalog") >= 2, "the killed worker was restarted")
        pub, ev = Publisher(), Events()
        cmd = envelope("createProduct", {"name": "after kill", "price": 1})
        pub.command(cmd)
        eq(ev.wait_result(cmd["id"])[0]["type"], "product.created", "processing continues")
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")


def test_dead_letters_unreachable_nothing_lost():
    """When the dead letters refuse a message (the RabbitMQ dead queue deleted, the
    Redis key of the wrong type), the worker keeps trying with backoff and holds the
    message; nothing after it, in the same batch or later, acks it by accident.
    Once the dead letters are back, it lands there and the rest is processed."""
    drain_dead("catalog")
    garbage = b"garbage while the dead letters are away " + new_id().encode()
    r = redislib.Redis.from_url(REDIS_URL)

    def restore():
        if TRANSPORT == "redis":
            r.delete("conveyor:dead:catalog")
        else:
            eq(run_bin("conveyor-workers", "-c", os.path.join(ROOT, "queues.conf"), "--setup").returncode, 0,
               "the dead queue declared again")

    try:
        with Pool(queue_opts="batch_size = 10;") as pool:
            # after the pool started: it declares its topology
            if TRANSPORT == "redis":
                r.set("conveyor:dead:catalog", "not a list")
            else:
                c = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
                c.channel().queue_delete("conveyor.catalog.dead")
                c.close()
            pub, ev = Publisher(), Events()
            pub.raw("catalog", garbage)
            after = [envelope("createProduct", {"name": f"after the garbage {i}", "price": 1}) for i in range(5)]
            for e in after:
                pub.command(e)
            deadline = time.time() + 10
            while pool.read_log().count("cannot dead-letter yet") < 3 and time.time() < deadline:
                time.sleep(0.1)
            check(pool.read_log().count("cannot dead-letter yet") >= 3, "the refusal is logged, and tried again")
            restore()
            for e in after:
                eq(ev.wait_result(e["id"], timeout=20)[0]["type"], "product.created", "processed after it")
            dead = []
            deadline = time.time() + 10
            while not dead and time.time() < deadline:
                dead += drain_dead("catalog")
                time.sleep(0.1)
            eq([d["body"] for d in dead], [garbage], "the message is in the dead letters, not lost")
            eq(dead[0]["reason"], "invalid_envelope", "with its reason")
            pub.close()
            ev.close()
            eq(pool.stop(), (0, []), "clean stop")
    finally:
        restore()
