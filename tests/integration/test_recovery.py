"""Failure handling: retries with backoff, retries_exhausted, workers killed
mid-command, the Redis reaper, recycling, and the dead-letter admin command."""
import json
import os
import signal
import time

import redis as redislib

from harness import (REDIS_URL, TRANSPORT, Events, Pool, Publisher, check, drain_dead, envelope, eq,
                     new_id, query, run_bin)

FAST_RETRY = "retry: { base_delay_ms = 100; max_delay_ms = 400; };"

# A test-only trigger on products: names choose the misbehaviour.
CHAOS_TRIGGER = """
CREATE OR REPLACE FUNCTION test_chaos() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.name LIKE 'flaky-%' AND nextval(('test_seq_' || replace(NEW.id::text, '-', '_'))::regclass) <= 2 THEN
    RAISE EXCEPTION 'simulated serialization failure' USING ERRCODE = '40001';
  END IF;
  IF NEW.name LIKE 'doomed-%' THEN
    RAISE EXCEPTION 'simulated deadlock' USING ERRCODE = '40P01';
  END IF;
  IF NEW.name LIKE 'slow-%' THEN
    PERFORM pg_sleep(60);
  END IF;
  IF NEW.name LIKE 'slowonce-%' AND nextval(('test_seq_' || replace(NEW.id::text, '-', '_'))::regclass) = 1 THEN
    PERFORM pg_sleep(60);
  END IF;
  RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS test_chaos ON products;
CREATE TRIGGER test_chaos BEFORE UPDATE ON products FOR EACH ROW EXECUTE FUNCTION test_chaos();
"""


class chaos_trigger:
    def __enter__(self):
        query(CHAOS_TRIGGER)
        return self

    def __exit__(self, *exc):
        query("DROP TRIGGER IF EXISTS test_chaos ON products")


def product(name_prefix, stock=10):
    """A product row made directly, with a sequence for the trigger's counters."""
    pid = new_id()
    query(f"CREATE SEQUENCE IF NOT EXISTS test_seq_{pid.replace('-', '_')}")
    query("INSERT INTO products (id, name, price, stock) VALUES (%s, %s, 1, %s)", pid, f"{name_prefix}-{pid[:8]}", stock)
    return pid


def stock(pid):
    return query("SELECT stock FROM products WHERE id = %s", pid)[0][0]


def wait_dead(queue, n=1, timeout=20):
    deadline = time.time() + timeout
    dead = []
    while len(dead) < n and time.time() < deadline:
        dead += drain_dead(queue)
        time.sleep(0.1)
    return dead


def kill_sleeping_worker(timeout=30):
    """Kills (-9) the worker whose database session sleeps in the trigger; returns its pid."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = query("SELECT pid, application_name FROM pg_stat_activity "
                     "WHERE application_name LIKE 'conveyor-worker-%' AND wait_event = 'PgSleep'")
        if rows:
            backend, app = rows[0]
            worker = int(app.rsplit("-", 1)[1])
            os.kill(worker, signal.SIGKILL)
            query("SELECT pg_terminate_backend(%s)", backend)  # it would hold the row lock until its sleep ends
            return worker
        time.sleep(0.05)
    raise AssertionError("no worker was handling the slow command")


def test_transient_failure_is_retried():
    with chaos_trigger(), Pool(extra=FAST_RETRY) as pool:
        pub, ev = Publisher(), Events()
        pid = product("flaky")
        cmd = envelope("updateStock", {"productId": pid, "quantityChange": -1})
        pub.command(cmd)
        res = ev.wait_result(cmd["id"], timeout=20)
        eq(res[0]["type"], "stock.updated", "applied on the third attempt")
        ev.poll(0.5)
        eq(len(ev.for_command(cmd["id"])), 1, "one result event")
        eq(stock(pid), 9, "applied once")
        eq(query("SELECT count(*) FROM command_attempts WHERE id = %s", cmd["id"])[0][0], 0, "attempts row gone")
        log = pool.read_log()
        check("attempt 1 of 10 failed" in log and "attempt 2 of 10 failed" in log, "two failed attempts logged")
        check("simulated serialization failure" in log, "the error is logged")
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")


def test_retries_exhausted_then_admin_retry():
    drain_dead("catalog")
    with chaos_trigger(), Pool(extra=FAST_RETRY, queue_opts="max_attempts = 3;") as pool:
        pub, ev = Publisher(), Events()
        pid = product("doomed")
        cmd = envelope("updateStock", {"productId": pid, "quantityChange": 2})
        body = json.dumps(cmd).encode()
        pub.raw("catalog", body)
        admin = ["-c", pool.config]
        deadline = time.time() + 20
        while time.time() < deadline:
            r = run_bin("conveyor-admin", *admin, "--json", "dead", "list", "catalog")
            rows = [json.loads(x) for x in r.stdout.splitlines()]
            if rows:
                break
            time.sleep(0.2)
        eq(len(rows), 1, "one dead letter listed")
        d = rows[0]
        eq((d["reason"], d["attempts"], d["commandId"], d["type"]), ("retries_exhausted", 3, cmd["id"], "updateStock"),
           "dead letter")
        check("simulated deadlock" in d["error"], f"last error kept: {d['error']}")
        r = run_bin("conveyor-admin", *admin, "dead", "show", "catalog", cmd["id"])
        eq(r.returncode, 0, "show")
        eq(json.loads(json.loads(r.stdout)["message"]), cmd, "the original message, untouched")
        r = run_bin("conveyor-admin", *admin, "dead", "counts")
        check(any(line.split()[:4] == ["catalog", TRANSPORT, "retries_exhausted", "1"] for line in r.stdout.splitlines()),
              f"counts per queue and reason:\n{r.stdout}")
        eq(stock(pid), 10, "nothing applied")
        # fix the cause, then retry from the dead letters: a fresh attempt count
        query("DROP TRIGGER IF EXISTS test_chaos ON products")
        r = run_bin("conveyor-admin", *admin, "dead", "retry", "catalog", "#1")
        eq(r.returncode, 0, f"retry ({r.stderr})")
        check("requeued 1 dead letter" in r.stdout, r.stdout)
        res = ev.wait_result(cmd["id"], timeout=20)
        eq(res[0]["type"], "stock.updated", "processed after the retry")
        eq(stock(pid), 12, "applied once")
        r = run_bin("conveyor-admin", *admin, "dead", "retry", "catalog", "#1")
        eq(r.returncode, 1, "nothing left to retry")
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")


def test_unanticipated_database_error_is_dead_lettered_at_once():
    """A database error the handler did not anticipate (here a check constraint
    the test adds) is a bug, not bad luck: the command is dead-lettered at once
    as handler_error naming the constraint, after one attempt, with no retry;
    in a batch the other commands apply. After the fix, conveyor-admin's retry
    applies it. The error text never holds the failing row (PostgreSQL's DETAIL)."""
    drain_dead("catalog")
    query("ALTER TABLE products DROP CONSTRAINT IF EXISTS test_no_forbidden_names")
    query("ALTER TABLE products ADD CONSTRAINT test_no_forbidden_names CHECK (name NOT LIKE 'forbidden-%') NOT VALID")
    try:
        tag = new_id()[:8]
        good = [envelope("createProduct", {"name": f"allowed-{tag}-{i}", "price": 1}) for i in range(4)]
        bad = envelope("createProduct", {"name": f"forbidden-{tag}-secretive", "price": 1, "stock": 5})
        batch = good[:2] + [bad] + good[2:]
        pub, ev = Publisher(), Events()
        for c in batch:  # waiting before the pool starts: one worker takes them as one batch
            pub.command(c)
        with Pool(workers={"catalog": 1}, extra=FAST_RETRY, queue_opts="batch_size = 50;") as pool:
            for c in good:
                eq(ev.wait_result(c["id"], timeout=30)[0]["type"], "product.created", "the others apply")
            # and alone (a batch of one, without savepoints)
            alone = envelope("createProduct", {"name": f"forbidden-{tag}-alone", "price": 1})
            pub.command(alone)
            dead = wait_dead("catalog", n=2)
            eq(sorted((d["reason"], json.loads(d["body"])["id"]) for d in dead),
               sorted([("handler_error", bad["id"]), ("handler_error", alone["id"])]), "dead-lettered at once")
            for d in dead:
                check("test_no_forbidden_names" in d["error"], f"the error names the constraint: {d['error']}")
                check("secretive" not in d["error"] and "Failing row" not in d["error"],
                      f"no row contents in the error: {d['error']}")
                eq(int(d["attempts"]), 1, "one attempt")
            ev.poll(0.5)
            eq(ev.for_command(bad["id"]) + ev.for_command(alone["id"]), [], "no event for them")
            log = pool.read_log()
            check("retrying in" not in log, "never retried")
            check("secretive" not in log and "Failing row" not in log, "no row contents in the log")
            eq(query("SELECT count(*) FROM processed_commands WHERE id = ANY(%s::uuid[])",
                     [bad["id"], alone["id"]])[0][0], 0, "not recorded as processed")
            # the fix, then the admin's retry
            query("ALTER TABLE products DROP CONSTRAINT test_no_forbidden_names")
            for d in dead:
                pub.raw("catalog", d["body"])
            for c in (bad, alone):
                eq(ev.wait_result(c["id"], timeout=30)[0]["type"], "product.created", "applied after the fix")
            pub.close()
            ev.close()
            eq(pool.stop(), (0, []), "clean stop")
    finally:
        query("ALTER TABLE products DROP CONSTRAINT IF EXISTS test_no_forbidden_names")


def test_database_lost_mid_take_hands_the_rest_back():
    """A worker that loses its database while it holds a take of several
    messages (prefetch 8, batch_size 1: several transactions per take) hands back
    the one whose transaction was lost and the rest (uncounted: the database's
    failure, not theirs; test_breaker) and reconnects: no crash (before, the
    next transaction of the take ran on no connection), each command applied once."""
    pub, ev = Publisher(), Events()
    slow = product("slowonce")
    others = [product("ok") for _ in range(6)]
    cmds = [envelope("updateStock", {"productId": p, "quantityChange": 1}) for p in [slow] + others]
    for c in cmds:  # all waiting before the pool starts: one take holds them all
        pub.command(c)
    with chaos_trigger(), Pool(workers={"catalog": 1}, extra=FAST_RETRY) as pool:
        deadline = time.time() + 30
        backend = None
        while backend is None and time.time() < deadline:
            rows = query("SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'conveyor-worker-%' "
                         "AND wait_event = 'PgSleep'")
            backend = rows[0][0] if rows else None
            time.sleep(0.05)
        check(backend is not None, "the worker sleeps in the first command's trigger")
        query("SELECT pg_terminate_backend(%s)", backend)  # its connection is gone, the take in hand
        for c in cmds:
            eq(ev.wait_result(c["id"], timeout=30)[0]["type"], "stock.updated", "applied")
        eq([stock(p) for p in [slow] + others], [11] * 7, "each applied once")
        check("attempt 1 of" not in pool.read_log(), "no attempt spent: the lost transaction was the database's")
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop, no worker crashed")


def test_admin_purge_and_list_both_kinds():
    drain_dead("users")
    with Pool() as pool:
        pub = Publisher()
        keep = envelope("launchRocket", {})
        pub.raw("users", json.dumps(keep).encode())
        pub.raw("users", b"garbage")
        admin = ["-c", pool.config]
        deadline = time.time() + 10
        rows = []
        while len(rows) < 2 and time.time() < deadline:
            r = run_bin("conveyor-admin", *admin, "--json", "dead", "list", "users")
            rows = [json.loads(x) for x in r.stdout.splitlines()]
            time.sleep(0.1)
        eq([x["reason"] for x in rows], ["unknown_command", "invalid_envelope"], "listed oldest first")
        r = run_bin("conveyor-admin", *admin, "dead", "list")
        check("unknown_command" in r.stdout and "invalid_envelope" in r.stdout, "table output")
        r = run_bin("conveyor-admin", *admin, "dead", "purge", "users", "#2")
        eq(r.returncode, 0, "purge #2")
        r = run_bin("conveyor-admin", *admin, "--json", "dead", "list", "users")
        eq([json.loads(x)["commandId"] for x in r.stdout.splitlines()], [keep["id"]], "the other one kept")
        r = run_bin("conveyor-admin", *admin, "dead", "purge", "users", "--all")
        check("purged 1" in r.stdout, r.stdout)
        r = run_bin("conveyor-admin", *admin, "dead", "show", "users", "#1")
        eq(r.returncode, 1, "nothing left")
        r = run_bin("conveyor-admin", *admin, "dead", "show", "nosuchqueue", "#1")
        eq(r.returncode, 2, "unknown queue")
        check("nosuchqueue" in r.stderr, "named")
        pub.close()
        eq(pool.stop(), (0, []), "clean stop")


def test_poison_message_is_dead_lettered_after_max_attempts():
    """A command that kills its worker every time is dead-lettered, not redelivered forever."""
    drain_dead("catalog")
    with chaos_trigger(), Pool(queue_opts="max_attempts = 3;", expect_restarts=True) as pool:
        pub = Publisher()
        pid = product("slow")
        cmd = envelope("updateStock", {"productId": pid, "quantityChange": -1})
        pub.command(cmd)
        kills = [kill_sleeping_worker() for _ in range(3)]
        dead = wait_dead("catalog", timeout=30)
        eq(len(dead), 1, f"dead-lettered after {len(kills)} kills")
        eq((dead[0]["reason"], dead[0]["attempts"]), ("retries_exhausted", 3), "reason and attempts")
        eq(json.loads(dead[0]["body"]), cmd, "body untouched")
        eq(stock(pid), 10, "never applied")
        print(f"killed workers {kills}; dead-lettered after 3 attempts")
        pub.close()
        eq(pool.stop(), (0, []), "clean stop")


def test_killed_worker_command_applied_once():
    with chaos_trigger(), Pool(expect_restarts=True) as pool:
        pub, ev = Publisher(), Events()
        pid = product("slowonce")
        cmd = envelope("updateStock", {"productId": pid, "quantityChange": -4})
        pub.command(cmd)
        kill_sleeping_worker()
        res = ev.wait_result(cmd["id"], timeout=30)
        ev.poll(1.0)
        eq([e["type"] for e in ev.for_command(cmd["id"])], ["stock.updated"], "one result event")
        eq(res[0]["data"]["previousStock"], 10, "applied on a clean row")
        eq(stock(pid), 6, "applied once")
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")


ATTEMPT_LOG = """
CREATE TABLE IF NOT EXISTS test_attempt_log (id uuid, attempts int, at timestamptz DEFAULT clock_timestamp());
CREATE OR REPLACE FUNCTION test_log_attempt() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO test_attempt_log (id, attempts) VALUES (NEW.id, NEW.attempts);
  RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS test_log_attempt ON command_attempts;
CREATE TRIGGER test_log_attempt AFTER INSERT OR UPDATE ON command_attempts FOR EACH ROW EXECUTE FUNCTION test_log_attempt();
"""


def test_only_redeliveries_are_counted():
    """A first delivery writes no attempt count (nothing can have started it before); a
    command that comes back after its worker died is counted as started twice."""
    query(ATTEMPT_LOG)
    try:
        with chaos_trigger(), Pool(expect_restarts=True) as pool:
            pub, ev = Publisher(), Events()
            plain = product("plain", stock=0)
            cmds = [envelope("updateStock", {"productId": plain, "quantityChange": 1}) for _ in range(20)]
            for c in cmds:
                pub.command(c)
            ids = [c["id"] for c in cmds]
            ev.wait(lambda s: set(ids) <= {e["commandId"] for e in s.events}, 20, "20 results")
            eq(stock(plain), 20, "each applied once")
            eq(query("SELECT count(*) FROM test_attempt_log WHERE id = ANY(%s::uuid[])", ids)[0][0], 0,
               "no attempt count written for first deliveries")
            pid = product("slowonce")
            cmd = envelope("updateStock", {"productId": pid, "quantityChange": -1})
            pub.command(cmd)
            kill_sleeping_worker()
            res = ev.wait_result(cmd["id"], timeout=30)
            eq(res[0]["type"], "stock.updated", "applied by the next worker")
            eq(query("SELECT attempts FROM test_attempt_log WHERE id = %s ORDER BY at", cmd["id"]), [(2,)],
               "the redelivery counted as the second start")
            eq(query("SELECT count(*) FROM command_attempts WHERE id = %s", cmd["id"])[0][0], 0,
               "the count dropped once it was applied")
            if TRANSPORT == "redis":
                eq(redislib.Redis.from_url(REDIS_URL).scard("conveyor:returned:catalog"), 0,
                   "the returned mark went with the message")
            pub.close()
            ev.close()
            eq(pool.stop(), (0, []), "clean stop")
    finally:
        query("DROP TRIGGER IF EXISTS test_log_attempt ON command_attempts; DROP TABLE IF EXISTS test_attempt_log")


def test_lost_consumer_work_comes_back():
    """A consumer that vanishes holding a message does not lose it. Redis: an
    in-flight list whose worker has no heartbeat is returned by the reaper.
    RabbitMQ: a consumer whose connection closes with the message unacked."""
    cmd = envelope("createProduct", {"name": "orphan", "price": 1})
    body = json.dumps(cmd).encode()
    ev = Events()  # subscribed before any pool runs
    if TRANSPORT == "rabbitmq":
        import pika
        from harness import AMQP_URL
        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        ch = conn.channel()
        ch.basic_publish("", "conveyor.catalog", body, pika.BasicProperties(delivery_mode=2))
        deadline = time.time() + 10
        method = None
        while method is None and time.time() < deadline:  # take it, and never ack it
            method, _, got = ch.basic_get("conveyor.catalog", auto_ack=False)
        check(method is not None and got == body, "the consumer holds the message")
        conn.close()  # gone with it unacked
    else:
        redislib.Redis.from_url(REDIS_URL).lpush("conveyor:inflight:catalog:ghost-host-1-catalog-0", body)
    with Pool(extra="redis: { heartbeat_interval = 1; heartbeat_ttl = 2; };") as pool:
        res = ev.wait_result(cmd["id"], timeout=20)
        eq(res[0]["type"], "product.created", "the orphaned command is processed")
        if TRANSPORT == "redis":
            check("ghost-host-1-catalog-0 is gone" in pool.read_log(), "the reaper says what it returned")
            eq(redislib.Redis.from_url(REDIS_URL).exists("conveyor:inflight:catalog:ghost-host-1-catalog-0"), 0,
               "in-flight list emptied")
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")


def test_max_jobs_recycles_without_loss():
    with Pool(extra="supervisor: { max_jobs = 5; };") as pool:
        pub, ev = Publisher(), Events()
        pid = product("plain", stock=100)
        cmds = [envelope("updateStock", {"productId": pid, "quantityChange": -1}) for _ in range(23)]
        for c in cmds:
            pub.command(c)
        ids = {c["id"] for c in cmds}
        ev.wait(lambda s: len({e["commandId"] for e in s.events if e["commandId"] in ids}) == 23, 30, "23 results")
        eq(stock(pid), 77, "each applied once")
        check(pool.read_log().count("recycled") >= 4, "the worker was recycled every 5 commands")
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")


def test_sighup_reloads_without_loss():
    with Pool() as pool:
        pub, ev = Publisher(), Events()
        pid = product("plain", stock=0)
        cmds = []
        for i in range(60):
            c = envelope("updateStock", {"productId": pid, "quantityChange": 1})
            pub.command(c)
            cmds.append(c)
            if i == 20:
                with open(pool.config) as f:
                    text = f.read()
                with open(pool.config, "w") as f:
                    f.write("this is not libconfig\n")
                pool.proc.send_signal(signal.SIGHUP)  # a broken file changes nothing
                time.sleep(0.5)
                with open(pool.config, "w") as f:
                    f.write(text.replace('name = "catalog"; commands = ["createProduct", "updateProduct", '
                                         '"updateStock", "deleteProduct"]; workers = 1;',
                                         'name = "catalog"; commands = ["createProduct", "updateProduct", '
                                         '"updateStock", "deleteProduct"]; workers = 3;'))
                pool.proc.send_signal(signal.SIGHUP)
            time.sleep(0.02)
        ids = {c["id"] for c in cmds}
        ev.wait(lambda s: ids <= {e["commandId"] for e in s.events}, 30, "60 results")
        eq(stock(pid), 60, "every command applied once across the reload")
        log = pool.read_log()
        check("keeping the running configuration" in log, "the broken file was refused")
        check("reloaded" in log, "the good file was loaded")
        deadline = time.time() + 10
        while time.time() < deadline and pool.read_log().count("consuming queue catalog") < 4:
            time.sleep(0.1)
        check(pool.read_log().count("consuming queue catalog") >= 4, "three new catalog workers")
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")


def test_standby_relay_takes_over_and_prunes():
    old_event = new_id()
    query("INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload, published_at) "
          "VALUES (%s, 'product', %s, 'test.old', '{}', now() - interval '2 days')", old_event, new_id())
    a = Pool(extra="relay: { retention_seconds = 86400; };")
    b = Pool(extra="relay: { retention_seconds = 86400; };")
    try:
        logs = a.read_log() + b.read_log()
        eq(logs.count("relay active"), 1, "one relay active")
        eq(logs.count("another relay is active; standing by"), 1, "the other stands by")
        active, standby = (a, b) if "relay active" in a.read_log() else (b, a)
        eq(query("SELECT count(*) FROM outbox WHERE event_id = %s", old_event)[0][0], 0,
           "a row published longer ago than the retention is pruned")
        ev, pub = Events(), Publisher()
        t0 = time.time()
        eq(active.stop(), (0, []), "the active pool stops cleanly")
        cmd = envelope("createProduct", {"name": "after the takeover", "price": 1})
        pub.command(cmd)
        res = ev.wait_result(cmd["id"], timeout=15)
        took = time.time() - t0
        eq(res[0]["type"], "product.created", "events flow through the standby")
        check("relay active" in standby.read_log(), "the standby took over")
        print(f"standby relay published {took:.2f} s after the active pool stopped")
        check(took < 5, f"takeover within a few seconds ({took:.2f} s)")
        ev.close()
        pub.close()
    finally:
        for p in (a, b):
            if p.proc.poll() is None:
                eq(p.stop(), (0, []), "clean stop")


def test_max_rss_recycles_without_loss():
    with Pool(extra="supervisor: { max_rss_mb = 1; };") as pool:
        pub, ev = Publisher(), Events()
        pid = product("plain", stock=0)
        cmds = [envelope("updateStock", {"productId": pid, "quantityChange": 1}) for _ in range(6)]
        for c in cmds:
            pub.command(c)
        ids = {c["id"] for c in cmds}
        ev.wait(lambda s: ids <= {e["commandId"] for e in s.events}, 30, "6 results")
        eq(stock(pid), 6, "each applied once")
        check("recycling at" in pool.read_log() and "(max_rss_mb 1)" in pool.read_log(), "recycled above max_rss_mb")
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")
