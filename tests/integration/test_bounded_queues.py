"""Bounded queues (issue 24, part 2): max_length refuses new commands from
Conveyor's clients (conveyor-produce exit 6, the C API's CONVEYOR_EFULL), a
foreign publisher with confirms gets a nack on RabbitMQ (on Redis its LPUSH is
taken, beyond the limit), nothing accepted is lost, and publishing works again
once the queue drains; a retry and a due parked command that meet a full queue
are kept, not dropped."""
import base64
import json
import os
import time
import urllib.error
import urllib.request

import pika
import redis as redislib

from harness import (AMQP_URL, REDIS_URL, TRANSPORT, Events, Pool, check, envelope, eq, http_pool, new_id, query,
                     run_bin, write_config)

MAX = 1000
CODE_EFULL = -5  # producer/conveyor.h
EXIT_FULL = 6    # conveyor-produce
MGMT_URL = os.environ.get("CONVEYOR_RABBITMQ_MANAGEMENT_URL", "")


def depth(queue="catalog"):
    if TRANSPORT == "rabbitmq":
        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        try:
            return conn.channel().queue_declare(f"conveyor.{queue}", passive=True).method.message_count
        finally:
            conn.close()
    return redislib.Redis.from_url(REDIS_URL).llen(f"conveyor:queue:{queue}")


def empty(queue="catalog"):
    if TRANSPORT == "rabbitmq":
        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        conn.channel().queue_purge(f"conveyor.{queue}")
        conn.close()
    else:
        redislib.Redis.from_url(REDIS_URL).delete(f"conveyor:queue:{queue}")


def bounded_config(max_length, extra=""):
    return write_config(workers={"users": 0, "catalog": 0, "orders": 0}, extra=extra,
                        queue_opts=f"max_length = {max_length};")


def setup_with(config):
    """conveyor-workers --setup with config: declares, and sets the policies."""
    r = run_bin("conveyor-workers", "-c", config, "--setup", timeout=120)
    eq(r.returncode, 0, f"--setup: {r.stderr}")


def management(method, path, body=None):
    """A request to RabbitMQ's management API (CONVEYOR_RABBITMQ_MANAGEMENT_URL); its JSON, or None."""
    auth = base64.b64encode(MGMT_URL.split("//", 1)[1].split("@", 1)[0].encode()).decode()
    base = "http://" + MGMT_URL.split("@", 1)[1]
    req = urllib.request.Request(f"{base}/api/{path}", method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"authorization": f"Basic {auth}", "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read()
        return json.loads(text) if text else None


def policy(name):
    return management("GET", f"policies/%2F/{name}")


def clear_policies():
    """Back to an unbounded catalog (the other tests' setup would delete it too)."""
    if TRANSPORT == "rabbitmq":
        try:
            management("DELETE", "policies/%2F/conveyor.catalog.max-length")
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise


def product_line(tag):
    return json.dumps({"type": "createProduct", "payload": {"name": f"bq-{tag}", "price": 1, "stock": 1}})


def produce(config, *args, input_=None):
    return run_bin("conveyor-produce", "-c", config, *args, input_=input_, timeout=120)


def wait_applied(ids, timeout=120):
    """Waits until every id has its processed_commands row; returns {outcome: count}."""
    deadline = time.time() + timeout
    while True:
        rows = query("SELECT outcome, count(*) FROM processed_commands WHERE id = ANY(%s::uuid[]) GROUP BY outcome",
                     list(ids))
        got = dict(rows)
        if sum(got.values()) == len(ids) or time.time() > deadline:
            return got
        time.sleep(0.2)


def foreign_publish(n_tries):
    """A foreign producer: pika with confirms (RabbitMQ), redis-py LPUSH (Redis).
    Returns (accepted ids, whether a nack came)."""
    accepted, nacked = [], False
    if TRANSPORT == "rabbitmq":
        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        ch = conn.channel()
        ch.confirm_delivery()
        for i in range(n_tries):
            env = envelope("createProduct", {"name": f"bq-foreign-{i}", "price": 1, "stock": 1})
            try:
                ch.basic_publish("conveyor.commands", "createProduct", json.dumps(env).encode(),
                                 pika.BasicProperties(delivery_mode=2, message_id=env["id"]), mandatory=True)
                accepted.append(env["id"])
            except pika.exceptions.NackError:
                nacked = True
                break
        conn.close()
    else:
        r = redislib.Redis.from_url(REDIS_URL)
        env = envelope("createProduct", {"name": "bq-foreign", "price": 1, "stock": 1})
        r.lpush("conveyor:queue:catalog", json.dumps(env))
        accepted.append(env["id"])
    return accepted, nacked


def test_a_full_queue_refuses_new_commands_and_loses_none():
    # the queue exists already, declared without a limit (the harness's setup, from queues.conf)
    empty()
    config = bounded_config(MAX)
    try:
        setup_with(config)  # the limit set on a queue declared before it
        if TRANSPORT == "rabbitmq":
            p = policy("conveyor.catalog.max-length")
            eq((p["pattern"], p["definition"]["max-length"], p["definition"]["overflow"]),
               ("^conveyor\\.catalog$", MAX, "reject-publish"), "the policy")
        r = produce(config, input_="\n".join(product_line(i) for i in range(MAX)) + "\n")
        eq(r.returncode, 0, f"{MAX} commands fit: {r.stderr}")
        accepted = r.stdout.split()
        eq(len(accepted), MAX, "their ids")
        eq(depth(), MAX, "the queue holds them")

        r = produce(config, "createProduct", json.dumps({"name": "bq-one-more", "price": 1, "stock": 1}))
        eq(r.returncode, EXIT_FULL, f"the {MAX + 1}st, from conveyor-produce: {r.stderr}")
        check("conveyor.catalog" in r.stderr or "conveyor:queue:catalog" in r.stderr, f"names the queue: {r.stderr}")
        check(f"max_length {MAX}" in r.stderr, f"says the limit: {r.stderr}")

        c = run_bin("conveyor-test-publish", config, "createProduct", json.dumps({"name": "bq-c", "price": 1, "stock": 1}))
        code, cid = c.stdout.split()
        eq(int(code), CODE_EFULL, f"the C API: {c.stderr}")

        r = produce(config, input_="\n".join(product_line(f"s{i}") for i in range(3)) + "\n")
        eq(r.returncode, EXIT_FULL, f"a batch on stdin: {r.stderr}")
        check("stdin lines 1-3 refused, not queued" in r.stderr, f"names the lines refused: {r.stderr}")
        eq(r.stdout.split(), [], "no id printed for a refused line")

        foreign, nacked = foreign_publish(3)
        if TRANSPORT == "rabbitmq":
            # a classic queue refuses the 1,001st; a quorum queue (the default) takes
            # one beyond and refuses the next (RabbitMQ's quorum queues: docs/decisions.md)
            check(nacked, "pika with confirms got a basic.nack")
            check(len(foreign) <= 1, f"at most one beyond the limit: {len(foreign)}")
        else:
            eq(depth(), MAX + 1, "a foreign LPUSH is taken, beyond the limit")
        accepted += foreign
        a = run_bin("conveyor-admin", "-c", config, "--json", "stats", "catalog")
        row = [json.loads(x) for x in a.stdout.splitlines() if '"queue"' in x][0]
        eq(row["maxLength"], MAX, "stats shows the limit")

        with http_pool(workers={"users": 0, "catalog": 2, "orders": 0}, queue_opts=f"max_length = {MAX};") as pool:
            metrics, deadline = "", time.time() + 20
            while not metrics and time.time() < deadline:  # the HTTP child listens soon after the pool is ready
                try:
                    with urllib.request.urlopen(f"{pool.origin}/metrics", timeout=10) as m:
                        metrics = m.read().decode()
                except OSError:
                    time.sleep(0.1)
            check(f'conveyor_queue_max_length{{queue="catalog"}} {MAX}' in metrics, "/metrics shows the limit")
            got = wait_applied(accepted)
            eq(got, {"applied": len(accepted)}, "every accepted command applied")
            eq(query("SELECT count(*) FROM processed_commands WHERE id = %s", cid)[0][0], 0, "the refused one is not")
            deadline = time.time() + 60
            while depth() > 0 and time.time() < deadline:
                time.sleep(0.2)
            r = produce(config, "createProduct", json.dumps({"name": "bq-after", "price": 1, "stock": 1}))
            eq(r.returncode, 0, f"publishing works again once the queue drained: {r.stderr}")
            eq(wait_applied(r.stdout.split()), {"applied": 1}, "and it is applied")
            eq(pool.stop(), (0, []), "clean stop")
        n = query("SELECT count(*) FROM products WHERE name LIKE 'bq-%%' AND name NOT LIKE 'bq-foreign%%'")[0][0]
        check(n >= MAX + 1, f"each accepted createProduct made its row ({n})")
    finally:
        clear_policies()
        os.unlink(config)


ONCE_TRIGGER = """
CREATE SEQUENCE IF NOT EXISTS test_bq_once;
CREATE OR REPLACE FUNCTION test_bq_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.name LIKE 'bqonce-%' AND nextval('test_bq_once') = 1 THEN
    RAISE EXCEPTION 'simulated serialization failure' USING ERRCODE = '40001';
  END IF;
  RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS test_bq_once ON products;
CREATE TRIGGER test_bq_once BEFORE UPDATE ON products FOR EACH ROW EXECUTE FUNCTION test_bq_once();
"""
SLOW_RETRY = "retry: { base_delay_ms = 12000; max_delay_ms = 12000; };"


def retry_count():
    """Messages waiting out a retry (stats' retrying)."""
    if TRANSPORT == "rabbitmq":
        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        try:
            return conn.channel().queue_declare("conveyor.catalog.delay.12000", passive=True).method.message_count
        finally:
            conn.close()
    return redislib.Redis.from_url(REDIS_URL).zcard("conveyor:retry:catalog")


def test_a_retry_that_meets_a_full_queue_is_not_lost():
    small = 20
    empty()
    query("DROP SEQUENCE IF EXISTS test_bq_once")
    query(ONCE_TRIGGER)
    pid = new_id()
    query("INSERT INTO products (id, name, price, stock) VALUES (%s, %s, 1, 10)", pid, f"bqonce-{pid[:8]}")
    config = bounded_config(small, SLOW_RETRY)
    try:
        setup_with(config)
        cmd = envelope("updateStock", {"productId": pid, "quantityChange": -1})
        with Pool(workers={"users": 0, "catalog": 1, "orders": 0}, extra=SLOW_RETRY,
                  queue_opts=f"max_length = {small};") as pool:
            r = produce(config, input_=json.dumps(cmd) + "\n")
            eq(r.returncode, 0, r.stderr)
            deadline = time.time() + 30
            while "attempt 1 of 10 failed" not in pool.read_log() and time.time() < deadline:
                time.sleep(0.05)
            check("attempt 1 of 10 failed" in pool.read_log(), "the first attempt failed: retried later")
            eq(pool.stop(), (0, []), "clean stop")
        r = produce(config, input_="\n".join(product_line(f"r{i}") for i in range(small)) + "\n")
        eq(r.returncode, 0, r.stderr)
        fill = r.stdout.split()
        eq(retry_count(), 1, "the queue filled while the retry still waited its delay")
        if TRANSPORT == "rabbitmq":
            # a quorum queue takes one beyond its max-length before it refuses: a
            # foreign publish brings it to where it refuses (a nack)
            foreign, nacked = foreign_publish(3)
            check(nacked, "the queue refuses now")
            fill += foreign
            # its delay runs out while the queue is full: RabbitMQ keeps it (at-least-once
            # dead-lettering of the delay queue), it neither enters the full queue nor is dropped
            deadline = time.time() + 60
            while retry_count() > 0 and time.time() < deadline:
                time.sleep(0.2)
            eq(retry_count(), 0, "the delay ran out")
            time.sleep(1)
            eq(depth(), small + len(foreign), "the full queue did not take it")
        else:
            # Redis: the reaper moves a due retry back over the limit (never refused: docs)
            with Pool(workers={"users": 0, "catalog": 0, "orders": 0}, extra=SLOW_RETRY,
                      queue_opts=f"max_length = {small};") as pool:
                deadline = time.time() + 60
                while retry_count() > 0 and time.time() < deadline:
                    time.sleep(0.2)
                eq(pool.stop(), (0, []), "clean stop")
            eq(depth(), small + 1, "the retry went back beyond the limit")
        ev = Events()
        with Pool(workers={"users": 0, "catalog": 1, "orders": 0}, extra=SLOW_RETRY,
                  queue_opts=f"max_length = {small};") as pool:
            res = ev.wait_result(cmd["id"], timeout=150)
            eq(res[0]["type"], "stock.updated", "the retried command was applied")
            eq(wait_applied(fill), {"applied": len(fill)}, "and every command that filled the queue")
            eq(pool.stop(), (0, []), "clean stop")
        ev.close()
        eq(query("SELECT stock FROM products WHERE id = %s", pid)[0][0], 9, "applied once")
    finally:
        query("DROP TRIGGER IF EXISTS test_bq_once ON products")
        clear_policies()
        os.unlink(config)


def test_a_due_parked_command_waits_while_its_queue_is_full():
    small = 10
    empty()
    config = bounded_config(small)
    try:
        setup_with(config)
        later = envelope("createProduct", {"name": "bq-parked", "price": 1, "stock": 1})
        later["notBefore"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 4))
        with Pool(workers={"users": 0, "catalog": 1, "orders": 0}, queue_opts=f"max_length = {small};") as pool:
            r = produce(config, input_=json.dumps(later) + "\n")
            eq(r.returncode, 0, r.stderr)
            deadline = time.time() + 30
            while not query("SELECT 1 FROM parked_commands WHERE id = %s", later["id"]) and time.time() < deadline:
                time.sleep(0.05)
            check(query("SELECT 1 FROM parked_commands WHERE id = %s", later["id"]), "parked")
            eq(pool.stop(), (0, []), "clean stop")
        r = produce(config, input_="\n".join(product_line(f"p{i}") for i in range(small)) + "\n")
        eq(r.returncode, 0, r.stderr)
        fill = r.stdout.split()
        # due now, its queue full: the timekeeper keeps it parked and says so
        with Pool(workers={"users": 0, "catalog": 0, "orders": 0}, queue_opts=f"max_length = {small};") as pool:
            deadline = time.time() + 30
            while "a full queue holds back due parked commands" not in pool.read_log() and time.time() < deadline:
                time.sleep(0.1)
            check("a full queue holds back due parked commands" in pool.read_log(), "the timekeeper says so")
            eq(len(query("SELECT 1 FROM parked_commands WHERE id = %s AND due_at <= now()", later["id"])), 1,
               "due, and still parked")
            eq(depth(), small, "the queue was not pushed beyond its limit")
            eq(pool.stop(), (0, []), "clean stop")
        with Pool(workers={"users": 0, "catalog": 1, "orders": 0}, queue_opts=f"max_length = {small};") as pool:
            eq(wait_applied(fill + [later["id"]]), {"applied": small + 1}, "all applied once the queue drained")
            eq(pool.stop(), (0, []), "clean stop")
    finally:
        clear_policies()
        os.unlink(config)


def test_a_bounded_rabbitmq_queue_needs_the_management_url_rabbitmq():
    config = bounded_config(5)
    try:
        r = run_bin("conveyor-workers", "-c", config, "--setup", env={"CONVEYOR_RABBITMQ_MANAGEMENT_URL": ""})
        eq(r.returncode, 2, f"a configuration error: {r.stderr}")
        check("rabbitmq.management_url" in r.stderr, f"names the setting: {r.stderr}")
    finally:
        clear_policies()
        os.unlink(config)


def test_an_operators_policy_on_the_queue_is_kept_rabbitmq():
    """RabbitMQ applies one policy per queue: Conveyor's takes the operator's keys and a priority above it."""
    management("PUT", "policies/%2F/test-operator", {"pattern": "^conveyor\\.", "apply-to": "queues", "priority": 7,
                                                      "definition": {"delivery-limit": 50}})
    config = bounded_config(MAX)
    try:
        setup_with(config)
        p = policy("conveyor.catalog.max-length")
        eq((p["priority"], p["definition"]), (8, {"delivery-limit": 50, "max-length": MAX, "overflow": "reject-publish"}),
           "the operator's definition kept, the limit added, above its priority")
        eq(policy("test-operator")["definition"], {"delivery-limit": 50}, "the operator's own policy untouched")
    finally:
        management("DELETE", "policies/%2F/test-operator")
        clear_policies()
        os.unlink(config)
