"""Liveness and bounded transactions: a command that takes longer than the
Redis heartbeat's expiry is applied once, counted once and never handed to
another worker while its own still works on it (also when the supervisor is
killed -9 meanwhile); a statement past its queue's statement_timeout_ms, and a
lock wait past lock_timeout_ms, are transient failures: retried, then applied once."""
import os
import signal
import time

import psycopg2
import redis as redislib

from harness import (DB_URL, REDIS_URL, TRANSPORT, Events, Pool, Publisher, check, db, envelope, eq, new_id, query,
                     session_pids)
from test_recovery import ATTEMPT_LOG

TTL = 2
SHORT_HEARTBEAT = f"redis: {{ heartbeat_interval = 1; heartbeat_ttl = {TTL}; }};"
FAST_RETRY = "retry: { base_delay_ms = 100; max_delay_ms = 400; };"
SLOW_S = 3 * TTL  # how long the slow command's INSERT sleeps

# Test-only triggers. products, by the name the test gives: 'liveness-slow-' sleeps
# SLOW_S every time, 'liveness-once-' sleeps the first time only; each entry is
# counted in a sequence per product (nextval survives a rollback). With them
# test_recovery's ATTEMPT_LOG: every count written to command_attempts, in test_attempt_log.
TRIGGERS = f"""
CREATE OR REPLACE FUNCTION test_liveness() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE entries bigint;
BEGIN
  IF NEW.name LIKE 'liveness-%' THEN
    entries := nextval(('test_live_' || replace(NEW.id::text, '-', '_'))::regclass);
    IF NEW.name LIKE 'liveness-slow-%' OR (NEW.name LIKE 'liveness-once-%' AND entries = 1) THEN
      PERFORM pg_sleep({SLOW_S});
    END IF;
  END IF;
  RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS test_liveness ON products;
CREATE TRIGGER test_liveness BEFORE INSERT ON products FOR EACH ROW EXECUTE FUNCTION test_liveness();
"""


class triggers:
    def __enter__(self):
        query(TRIGGERS + ATTEMPT_LOG)
        return self

    def __exit__(self, *exc):
        query("DROP TRIGGER IF EXISTS test_liveness ON products; "
              "DROP TRIGGER IF EXISTS test_log_attempt ON command_attempts; DROP TABLE IF EXISTS test_attempt_log")


def create_product(kind):
    """A createProduct command for a product named for the trigger, with its entry counter."""
    pid = new_id()
    query(f"CREATE SEQUENCE IF NOT EXISTS test_live_{pid.replace('-', '_')}")
    return envelope("createProduct", {"productId": pid, "name": f"liveness-{kind}-{pid[:8]}", "price": 1})


def trigger_entries(pid):
    """How many times a transaction reached the product's INSERT."""
    last, called = query(f"SELECT last_value, is_called FROM test_live_{pid.replace('-', '_')}")[0]
    return last if called else 0


def product_rows(pid):
    return query("SELECT count(*) FROM products WHERE id = %s", pid)[0][0]


def counts_written(cid):
    return query("SELECT attempts FROM test_attempt_log WHERE id = %s", cid)


def watch_until_result(ev, cmd, timeout):
    """Waits for cmd's result; meanwhile, once a worker has taken it (its INSERT
    started), looks every 50 ms whether, on Redis, it went back to its queue or
    was marked returned. Returns (seconds since it was taken, what was seen)."""
    r = redislib.Redis.from_url(REDIS_URL) if TRANSPORT == "redis" else None
    body_has_id = cmd["id"].encode()
    seen = set()
    t0 = time.time()
    while not trigger_entries(cmd["payload"]["productId"]):
        check(time.time() - t0 < 20, f"no worker took {cmd['id']} within 20 s")
        time.sleep(0.02)
    t0 = time.time()
    while not ev.for_command(cmd["id"]):
        check(time.time() - t0 < timeout, f"no result for {cmd['id']} within {timeout} s")
        if r is not None:
            if any(body_has_id in m for m in r.smembers("conveyor:returned:catalog")):
                seen.add("marked returned")
            if any(body_has_id in m for m in r.lrange("conveyor:queue:catalog", 0, -1)):
                seen.add("back in the queue")
        ev.poll(0.05)
    return time.time() - t0, sorted(seen)


def check_applied_once_never_redelivered(ev, cmd, logs):
    pid = cmd["payload"]["productId"]
    ev.poll(2.0)  # a redelivered copy would be settled by now (as a duplicate)
    eq([e["type"] for e in ev.for_command(cmd["id"])], ["product.created"], "one result event")
    eq(product_rows(pid), 1, "the row once")
    eq(trigger_entries(pid), 1, "one transaction reached the INSERT")
    eq(counts_written(cmd["id"]), [], "no attempt count written: it was never redelivered")
    eq(query("SELECT count(*) FROM command_attempts WHERE id = %s", cmd["id"])[0][0], 0, "no attempts row")
    for log in logs:
        check("is gone (no heartbeat)" not in log and "in-flight message" not in log,
              f"nothing was returned to the queue:\n{log[-3000:]}")
    if TRANSPORT == "redis":
        r = redislib.Redis.from_url(REDIS_URL)
        check(not any(cmd["id"].encode() in m for m in r.smembers("conveyor:returned:catalog")), "not marked returned")


def test_command_three_times_the_heartbeat_ttl_is_applied_once():
    """The catalog has two workers and the pool a reaper: a worker whose heartbeat
    lapsed during the slow INSERT would have its message taken by the other."""
    with triggers(), Pool(workers={"catalog": 2}, extra=SHORT_HEARTBEAT,
                          queue_opts="statement_timeout_ms = 60000; idle_in_transaction_timeout_ms = 60000;") as pool:
        pub, ev = Publisher(), Events()
        cmd = create_product("slow")
        pub.command(cmd)
        took, seen = watch_until_result(ev, cmd, timeout=SLOW_S + 20)
        print(f"slow command applied after {took:.1f} s (heartbeat_ttl {TTL} s)")
        check(took >= SLOW_S - 0.5, f"the command really took {SLOW_S} s ({took:.1f} s)")
        eq(seen, [], "never back in the queue nor marked returned while it ran")
        check_applied_once_never_redelivered(ev, cmd, [pool.read_log()])
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")


def test_supervisor_killed_mid_command_its_worker_finishes_alone():
    """kill -9 of the supervisor: its worker is told to drain (it dies with its
    parent) and finishes the slow command while another pool's reaper runs; the
    command is not handed to that pool meanwhile."""
    with triggers():
        pools = [Pool(extra=SHORT_HEARTBEAT), Pool(extra=SHORT_HEARTBEAT, expect_restarts=True)]
        try:
            pub, ev = Publisher(), Events()
            cmd = create_product("slow")
            pub.command(cmd)
            deadline = time.time() + 20
            worker = None
            while worker is None and time.time() < deadline:  # the slow INSERT has started: in which pool?
                rows = query("SELECT application_name FROM pg_stat_activity WHERE wait_event = 'PgSleep' "
                             "AND application_name LIKE 'conveyor-worker-%'")
                worker = int(rows[0][0].rsplit("-", 1)[1]) if rows else None
                time.sleep(0.05)
            check(worker is not None, "a worker runs the slow command")
            owner = next(p for p in pools if worker in session_pids(p.proc.pid))
            os.kill(owner.proc.pid, signal.SIGKILL)
            owner.proc.wait(5)
            took, seen = watch_until_result(ev, cmd, timeout=SLOW_S + 20)
            eq(seen, [], "never back in the queue nor marked returned while it ran")
            check_applied_once_never_redelivered(ev, cmd, [p.read_log() for p in pools])
            deadline = time.time() + 15
            while session_pids(owner.proc.pid) and time.time() < deadline:
                time.sleep(0.1)
            eq(session_pids(owner.proc.pid), [], "the orphaned children exited")
            pub.close()
            ev.close()
        finally:
            for p in pools:
                if p.proc.poll() is None:
                    eq(p.stop(), (0, []), "clean stop")
                else:
                    for pid in session_pids(p.proc.pid):
                        os.kill(pid, signal.SIGKILL)
                    if os.path.exists(p.config):
                        os.unlink(p.config)


def test_statement_over_statement_timeout_is_retried():
    """statement_timeout_ms cancels the first, slow INSERT (SQLSTATE 57014): a
    transient failure, retried, then applied once."""
    with triggers(), Pool(extra=FAST_RETRY, queue_opts="statement_timeout_ms = 500;") as pool:
        pub, ev = Publisher(), Events()
        cmd = create_product("once")
        pub.command(cmd)
        took, _ = watch_until_result(ev, cmd, timeout=20)
        eq([e["type"] for e in ev.for_command(cmd["id"])], ["product.created"], "applied on the retry")
        check(took < SLOW_S, f"the slow statement was cut short ({took:.1f} s)")
        pid = cmd["payload"]["productId"]
        eq((product_rows(pid), trigger_entries(pid)), (1, 2), "two starts, one row")
        log = pool.read_log()
        check("attempt 1 of 10 failed" in log and "statement timeout" in log, f"the timeout is logged:\n{log[-3000:]}")
        eq(query("SELECT count(*) FROM command_attempts WHERE id = %s", cmd["id"])[0][0], 0, "attempts row gone")
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")


def test_lock_wait_over_lock_timeout_is_retried():
    """A row held by another transaction: lock_timeout_ms ends the wait (55P03), the
    command is retried and applied once the row is free."""
    pid = new_id()
    query("INSERT INTO products (id, name, price, stock) VALUES (%s, %s, 1, 10)", pid, f"locked-{pid[:8]}")
    holder = db()
    holder.autocommit = False
    with holder.cursor() as cur:
        cur.execute("SELECT 1 FROM products WHERE id = %s FOR UPDATE", (pid,))
    try:
        with Pool(extra=FAST_RETRY, queue_opts="lock_timeout_ms = 300;") as pool:
            pub, ev = Publisher(), Events()
            cmd = envelope("updateStock", {"productId": pid, "quantityChange": -1})
            pub.command(cmd)
            deadline = time.time() + 15
            while "lock timeout" not in pool.read_log() and time.time() < deadline:
                time.sleep(0.05)
            check("lock timeout" in pool.read_log(), "the lock wait was ended by lock_timeout_ms")
            holder.rollback()
            res = ev.wait_result(cmd["id"], timeout=20)
            eq([e["type"] for e in res], ["stock.updated"], "applied once the row is free")
            eq(query("SELECT stock FROM products WHERE id = %s", pid)[0][0], 9, "applied once")
            check("attempt 1 of 10 failed" in pool.read_log(), "the lock timeout is a transient failure")
            pub.close()
            ev.close()
            eq(pool.stop(), (0, []), "clean stop")
    finally:
        holder.close()


def test_worker_without_progress_is_no_longer_vouched_for():
    """A worker that makes no progress (here: waiting for a database that refuses
    connections) stops refreshing its heartbeat once it has gone longer without a
    database result or a broker reply than a working worker can, and starts again
    when it makes progress. (Redis: about 11 s plus the ttl; RabbitMQ has no heartbeat: the
    command is applied once the database is back.) The database breaker is set
    never to open here: open, it would close the worker's broker connection
    (test_breaker), and this is the worker that keeps waiting."""
    dbname = query("SELECT current_database()")[0][0]
    holder = psycopg2.connect(DB_URL, dbname="postgres")  # the test's own, kept while new ones are refused
    holder.autocommit = True
    refused = False
    try:
        # the limit: the longest of these two and a Redis command's bound (broker.reply_timeout_ms, 10 s, plus
        # the longest block: wait_timeout_ms, 1 s), plus heartbeat_ttl
        with Pool(extra=SHORT_HEARTBEAT + FAST_RETRY + "breaker: { failures = 1000; };",
                  queue_opts="statement_timeout_ms = 1000; idle_in_transaction_timeout_ms = 1000;") as pool:
            pub, ev = Publisher(), Events()
            first = envelope("createProduct", {"name": "liveness-before", "price": 1})
            pub.command(first)
            ev.wait_result(first["id"])  # the catalog worker has a database connection
            with holder.cursor() as cur:
                cur.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
                refused = True
                cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = ANY(%s)",
                            ([f"conveyor-worker-{p}" for p in session_pids(pool.proc.pid)],))
            second = envelope("createProduct", {"name": "liveness-after", "price": 1})
            pub.command(second)
            if TRANSPORT == "redis":
                r = redislib.Redis.from_url(REDIS_URL)
                key = next(iter(r.scan_iter(f"conveyor:worker:*-{pool.proc.pid}-catalog-0")), None)
                check(key is not None, "the catalog worker's heartbeat key exists")
                t0 = time.time()
                while "no progress for" not in pool.read_log() and time.time() < t0 + 60:
                    check(r.exists(key), "vouched for while within the limit")
                    time.sleep(0.2)
                check("no progress for" in pool.read_log(), f"the worker stops vouching:\n{pool.read_log()[-3000:]}")
                check(time.time() - t0 > 10, f"not before the limit ({time.time() - t0:.1f} s)")
                deadline = time.time() + TTL + 2
                while r.exists(key) and time.time() < deadline:
                    time.sleep(0.1)
                eq(r.exists(key), 0, "its heartbeat key expired while the worker lives")
            with holder.cursor() as cur:
                cur.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
            refused = False
            res = ev.wait_result(second["id"], timeout=30)
            eq([e["type"] for e in res], ["product.created"], "applied once the database is back")
            if TRANSPORT == "redis":
                deadline = time.time() + 5
                while not (r.exists(key) and "progress again" in pool.read_log()) and time.time() < deadline:
                    time.sleep(0.1)
                eq(r.exists(key), 1, "vouched for again")
                check("progress again" in pool.read_log(), "the thread vouches again, and says so")
            pub.close()
            ev.close()
            eq(pool.stop(), (0, []), "clean stop")
    finally:
        if refused:
            with holder.cursor() as cur:
                cur.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        holder.close()
