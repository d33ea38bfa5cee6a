"""Lanes (issue 25; docs/contract.md §10): priorities, fairness between keys and
order per key, on the queue catalog split into lanes.

Every assertion is about ORDER, read from the database: the order in which
commands were applied is the order of their events' outbox ids (each command
here emits exactly one event, inserted by the transaction that applies it);
never a clock of the test's. Commands are published fast with conveyor-produce
(batches under confirms) and, where a backlog is the premise, while the queue
is paused (conveyor-admin queue pause: no worker takes from it) so that the
whole backlog waits before the first one is applied.

- order: 200 products x 50 updateProduct through 16 ordered lanes, 4 workers
  in 2 pools, kill -9 twice of the pool holding the lanes (restarted after the
  first): each product's last update is its row, its product.updated events
  come in publish order, each command applied once (label faults: a kill -9
  run of about 45 s per transport, Release only);
- fairness: a key that floods (10,000 commands, not the issue's 100,000: the
  order is the same, and the run without lanes must apply 90 % of them) does
  not hold back three other keys (100 each) published after it: all 300 are
  applied before the last 90 % of the flood; without lanes, FIFO. The keys
  are picked in distinct lanes (asked of the broker on RabbitMQ, the take
  script's rule on Redis) and the lanes' depths confirm it;
- priority: a high command published behind 20,000 normal ones (not the
  issue's 50,000: the order is the same) is applied before 99 % of them; low
  ones published behind 6,000 highs are all applied before half of the highs
  (the guard against starvation);
- an ordered queue's retrying command holds back only its own key (the lead's
  hold in PostgreSQL: key_holds), and its dead letter releases the next of its
  key;
- a queue moved from no lanes to lanes keeps the commands already waiting in
  its old queue (the lanes' intake);
- the lanes in conveyor-admin stats (--json and text) and in /metrics; a lane's
  oldest age, by its command's createdAt, also on RabbitMQ (the oldest its
  workers hold, reported through PostgreSQL): a command created 30 s ago and
  held by its worker, blocked on a row lock, shows at least 30 s.

RabbitMQ's sorter moves a paused queue's commands into their lanes: there the
tests wait until all are sorted before resuming. Redis sorts in the take
script (up to 1,000 a take), which a paused queue does not run.
"""
import hashlib
import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.request

import pika
import redis as redislib

from harness import (AMQP_URL, BIN, REDIS_URL, ROOT, ROUTING, TRANSPORT, Pool, check, db, drain_dead, eq, http_pool,
                     new_id, now_iso, query, run_bin, write_config)
from test_delayed import wait_for
from test_metrics import scrape, value

CATALOG = {"catalog": ROUTING["catalog"]}
CLASSES = ("high", "normal", "low")
SHORT_HEARTBEAT = "redis: { heartbeat_interval = 1; heartbeat_ttl = 3; };"


# ---- configuration and the broker's view -------------------------------------------

def lanes_opts(lanes, ordered=False, more=""):
    """queue_opts of a laned catalog (lanes = 1: none)."""
    return (f"lanes = {lanes}; " if lanes > 1 else "") + ("ordered = true; " if ordered else "") + more


def config_of(opts, extra=""):
    """A queues.conf with catalog only (workers 0: for the tools), queue_opts opts."""
    return write_config(workers={"catalog": 0}, routing=CATALOG, queue_opts=opts, extra=extra)


def setup_with(config):
    """conveyor-workers --setup: migrations and the topology of config (its lanes)."""
    r = run_bin("conveyor-workers", "-c", config, "--setup", timeout=120)
    eq(r.returncode, 0, f"--setup: {r.stderr}")


def pool(lanes, ordered=False, workers=2, more="", extra="", **kw):
    """A pool serving catalog only, split into lanes."""
    return Pool(workers={"catalog": workers}, routing=CATALOG, queue_opts=lanes_opts(lanes, ordered, more),
                extra=extra, **kw)


def lane_name(cls, i):
    if TRANSPORT == "rabbitmq":
        return f"conveyor.catalog.lane.{cls}.{i}"
    return f"conveyor:queue:catalog:lane:{cls}:{i}"


def amqp():
    return pika.BlockingConnection(pika.URLParameters(AMQP_URL))


def depth_of(name):
    """Messages ready in a queue (RabbitMQ; 0 when it does not exist) or a list (Redis)."""
    if TRANSPORT == "redis":
        return redislib.Redis.from_url(REDIS_URL).llen(name)
    conn = amqp()
    try:
        return conn.channel().queue_declare(name, passive=True).method.message_count
    except pika.exceptions.ChannelClosedByBroker:
        return 0
    finally:
        if conn.is_open:
            conn.close()


def intake():
    return depth_of("conveyor.catalog" if TRANSPORT == "rabbitmq" else "conveyor:queue:catalog")


def lane_depths(lanes, cls="normal"):
    return [depth_of(lane_name(cls, i)) for i in range(lanes)]


def clear_catalog():
    """Nothing waiting in catalog, its lanes (any count up to 64) or its dead letters: what an
    earlier test left does not count in this one's order. On RabbitMQ the lane queues and
    exchanges are deleted: a test's lanes differ from the last one's (their count: a lane queue
    still bound would take its share of the ring; ordered or not: x-single-active-consumer)."""
    if TRANSPORT == "redis":
        r = redislib.Redis.from_url(REDIS_URL)
        keys = list(r.scan_iter("conveyor:queue:catalog*")) + [b"conveyor:dead:catalog", b"conveyor:retry:catalog"]
        if keys:
            r.delete(*keys)
        return
    conn = amqp()
    try:
        ch = conn.channel()
        for name in ("conveyor.catalog", "conveyor.catalog.dead"):
            ch.queue_purge(name)
        for c in CLASSES:
            ch.exchange_delete(f"conveyor.catalog.lanes.{c}")
            for i in range(64):
                ch.queue_delete(lane_name(c, i))  # no such queue: fine (RabbitMQ 3.x and later)
    finally:
        conn.close()


def pause(on):
    r = run_bin("conveyor-admin", "-c", os.path.join(ROOT, "queues.conf"), "queue", "pause" if on else "resume",
                "catalog")
    eq(r.returncode, 0, f"queue {'pause' if on else 'resume'}: {r.stderr}")


def lanes_of(keys, lanes, config):
    """{key: the lane of class normal a command with that lane key goes to}. Redis: the take
    script's rule (first 8 hex digits of SHA-1 % lanes); RabbitMQ: asked of the broker, a probe per
    key published to the class's consistent-hash exchange and found in its lane queue (the ring is
    the broker's: fixed for fixed queue names). The lanes must be empty and unconsumed."""
    if TRANSPORT == "redis":
        return {k: int(hashlib.sha1(k.encode()).hexdigest()[:8], 16) % lanes for k in keys}
    setup_with(config)
    conn = amqp()
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        for k in keys:
            ch.basic_publish("conveyor.catalog.lanes.normal", k, k.encode(), mandatory=True)
        found = {}
        for i in range(lanes):  # consumed, not got: basic.get is refused on a single-active-consumer queue
            for method, _, body in ch.consume(lane_name("normal", i), auto_ack=True, inactivity_timeout=0.2):
                if method is None:
                    break
                found[body.decode()] = i
            ch.cancel()
    finally:
        conn.close()
    eq(sorted(found), sorted(keys), "each probe found in one lane")
    return found


def keys_in_distinct_lanes(candidates, n, lanes, config):
    """The first n of candidates whose lanes differ from each other's."""
    where = lanes_of(candidates, lanes, config)
    chosen, used = [], set()
    for k in candidates:
        if where[k] not in used:
            chosen.append(k)
            used.add(where[k])
        if len(chosen) == n:
            return chosen, where
    raise AssertionError(f"no {n} of {candidates} in distinct lanes: {where}")


# ---- publishing and the order of application --------------------------------------

def product_cmd(pid=None, **fields):
    """A createProduct envelope (fields: envelope fields such as fairnessKey, priority)."""
    e = {"id": new_id(), "type": "createProduct",
         "payload": {"productId": pid or new_id(), "name": "laned", "price": "1.00", "stock": 1}}
    e.update(fields)
    return e


def update_cmd(pid, description, **fields):
    e = {"id": new_id(), "type": "updateProduct", "payload": {"productId": pid, "description": description}}
    e.update(fields)
    return e


class Producer:
    """conveyor-produce on a list of envelopes, in the background (batches under confirms)."""

    def __init__(self, config, cmds):
        self.ids = [c["id"] for c in cmds]
        f = tempfile.TemporaryFile()
        f.write(("\n".join(json.dumps(c) for c in cmds) + "\n").encode())
        f.seek(0)
        self.proc = subprocess.Popen([os.path.join(BIN, "conveyor-produce"), "-c", config], stdin=f,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait(self, timeout=300):
        rc = self.proc.wait(timeout)
        eq(rc, 0, f"conveyor-produce exit status: {self.proc.stderr.read()}")
        return self.ids


def produce(config, cmds):
    return Producer(config, cmds).wait()


def outbox_top():
    return query("SELECT coalesce(max(id), 0) FROM outbox")[0][0]


def processed(ids):
    return query("SELECT count(*) FROM processed_commands WHERE id = ANY(%s::uuid[])", list(ids))[0][0]


def wait_processed(ids, timeout, what, pools=()):
    def done():
        for p in pools:
            check(p.proc.poll() is None, f"a pool exited {p.proc.returncode}:\n{p.read_log()[-3000:]}")
        return processed(ids) == len(ids)
    wait_for(done, timeout, f"{what}: {len(ids)} processed")


def applied_order(since, ids):
    """The command ids among ids in the order they were applied: their events' outbox ids."""
    rows = query("SELECT payload->>'commandId' FROM outbox WHERE id > %s AND payload->>'commandId' = ANY(%s) "
                 "ORDER BY id", since, list(ids))
    return [r[0] for r in rows]


def settle_into_lanes(total, lanes, timeout=120):
    """While the queue is paused, waits until the intake has been sorted into the lanes
    (RabbitMQ's sorter moves a paused queue's commands; Redis sorts in the take script, so
    there they wait in the intake). Returns the normal lanes' depths."""
    if TRANSPORT == "rabbitmq":
        seen = []

        def sorted_all():
            seen[:] = [intake()] + [sum(lane_depths(lanes, c)) for c in CLASSES]
            return seen[0] == 0 and sum(seen[1:]) == total
        try:
            wait_for(sorted_all, timeout, f"{total} commands sorted into the lanes")
        except AssertionError:
            raise AssertionError(f"{total} commands not sorted into the lanes of a paused queue: the intake holds "
                                 f"{seen[0]}, the lanes (high, normal, low) {seen[1:]}")
    return lane_depths(lanes)


# ---- order per key -------------------------------------------------------------------

def in_flight(p):
    """Redis: the commands the workers of pool p hold (their in-flight lists; worker ids
    vm-<pool pid>-<queue>-<i>)."""
    r = redislib.Redis.from_url(REDIS_URL)
    return sum(r.llen(k) for k in r.scan_iter(f"conveyor:inflight:catalog:vm-{p.proc.pid}-catalog-*"))


def kill9(p):
    """kill -9 of pool p's session, while it holds commands: on Redis once its workers' in-flight
    lists hold some; on RabbitMQ p must be the lanes' single active consumer (the oldest pool)."""
    if TRANSPORT == "redis":
        wait_for(lambda: in_flight(p), 60, "the pool to be killed holding commands")
    os.killpg(p.proc.pid, signal.SIGKILL)
    p.proc.wait()
    p.check_log()
    os.unlink(p.config)


def test_each_key_is_applied_in_publish_order_through_kills():  # faults
    clear_catalog()
    products, updates = 200, 50
    config = config_of(lanes_opts(16, True), SHORT_HEARTBEAT)
    setup_with(config)
    pids = [new_id() for _ in range(products)]
    # the kills hit the older pool each time: on RabbitMQ the single active consumer of a lane is
    # its oldest (the younger pool's workers wait as standbys), so killing a pool restarted after
    # the first kill would interrupt nothing; the first pool is restarted after its kill
    pools = [pool(16, True, workers=2, extra=SHORT_HEARTBEAT, expect_restarts=True) for _ in range(2)]
    try:
        wait_processed(produce(config, [product_cmd(p) for p in pids]), 120, "the products created", pools)
        since = outbox_top()
        # interleaved: update s of every product, then update s + 1 of every product
        cmds = [update_cmd(p, f"seq {s:02d}") for s in range(updates) for p in pids]
        seq_of = {c["id"]: s for s in range(updates) for c in cmds[s * products:(s + 1) * products]}
        producer = Producer(config, cmds)
        ids = producer.ids
        wait_for(lambda: processed(ids) >= len(ids) // 5, 300, "a fifth applied")
        kill9(pools.pop(0))
        pools.append(pool(16, True, workers=2, extra=SHORT_HEARTBEAT, expect_restarts=True))
        first = processed(ids)
        wait_for(lambda: processed(ids) >= first + len(ids) // 5, 300, "another fifth applied")
        kill9(pools.pop(0))
        producer.wait()
        wait_processed(ids, 600, "every update", pools)
        eq(pools[0].stop(), (0, []), "clean stop")
    finally:
        for p in pools:
            if p.proc.poll() is None:
                p.stop()
        os.unlink(config)
    eq(query("SELECT outcome, count(*) FROM processed_commands WHERE id = ANY(%s::uuid[]) GROUP BY 1", ids),
       [("applied", len(ids))], "every update applied")
    finals = dict(query("SELECT id::text, description FROM products WHERE id = ANY(%s::uuid[])", pids))
    wrong = {p: d for p, d in finals.items() if d != f"seq {updates - 1:02d}"}
    eq(len(finals), products, "the products")
    eq(wrong, {}, "products whose row is not their last published update")
    rows = query("SELECT aggregate_id::text, payload->>'commandId' FROM outbox WHERE id > %s "
                 "AND event_type = 'product.updated' AND aggregate_id = ANY(%s::uuid[]) ORDER BY id", since, pids)
    per = {p: [] for p in pids}
    for p, cid in rows:
        per[p].append(seq_of[cid])
    bad = {p: s for p, s in per.items() if s != list(range(updates))}
    eq(len(rows), len(ids), "one product.updated per update (none applied twice)")
    check(not bad, f"{len(bad)} products whose events are not in publish order, e.g. {next(iter(bad.items()), None)}")


# ---- fairness --------------------------------------------------------------------------

FLOOD = 10000   # the 100,000 would take minutes here; the order is the same with 10,000
OTHERS = 100


def fairness_run(lanes, keys, until):
    """Key keys[0] publishes FLOOD commands, then each other key OTHERS, all waiting in a paused
    catalog; then the queue resumes, until until(ids of the others) holds. Returns (the order of
    application so far as keys, the normal lanes' depths before the resume). Leaves the rest."""
    clear_catalog()
    config = config_of(lanes_opts(lanes))
    pause(True)
    try:
        with pool(lanes, workers=2) as p:
            since = outbox_top()
            cmds = [product_cmd(fairnessKey=keys[0]) for _ in range(FLOOD)]
            for k in keys[1:]:
                cmds += [product_cmd(fairnessKey=k) for _ in range(OTHERS)]
            key_of = {c["id"]: c["fairnessKey"] for c in cmds}
            ids = produce(config, cmds)
            depths = settle_into_lanes(len(ids), lanes) if lanes > 1 else None
            pause(False)
            others = ids[FLOOD:]
            wait_for(lambda: check(p.proc.poll() is None, "the pool exited") or until(others), 600,
                     "the other keys' commands")
            order = [key_of[c] for c in applied_order(since, ids)]
            eq(p.stop(), (0, []), "clean stop")
            left = lane_depths(lanes) if lanes > 1 else None
    finally:
        pause(False)
        clear_catalog()
        os.unlink(config)
    return order, depths, left


def test_a_flooding_key_does_not_hold_back_the_others():
    lanes = 16
    config = config_of(lanes_opts(lanes))
    clear_catalog()
    try:
        keys, where = keys_in_distinct_lanes(["A", "B", "C", "D", "E", "F", "G", "H"], 4, lanes, config)
    finally:
        os.unlink(config)
    order, depths, left = fairness_run(lanes, keys, lambda others: processed(others) == len(others))
    # the premise, as the broker holds it: each key in a lane of its own
    if TRANSPORT == "rabbitmq":  # sorted before the first is applied
        want = [0] * lanes
        want[where[keys[0]]] = FLOOD
        for k in keys[1:]:
            want[where[k]] = OTHERS
        eq(depths, want, f"the normal lanes' depths (keys {keys} in lanes {[where[k] for k in keys]})")
    else:  # sorted by the takes: what is left of the flood waits in its lane alone
        eq([i for i, d in enumerate(left) if d], [where[keys[0]]], f"the lanes holding commands at the end: {left}")
    last_other = max(i for i, k in enumerate(order) if k != keys[0])
    eq(sum(1 for k in order if k != keys[0]), 3 * OTHERS, "the other keys' commands applied")
    flood_before = sum(1 for k in order[:last_other] if k == keys[0])
    print(f"lanes of {keys}: {[where[k] for k in keys]}; {flood_before} of {keys[0]}'s {FLOOD} applied before "
          f"the last of the others'")
    check(flood_before <= FLOOD // 10,
          f"all {3 * OTHERS} commands of {keys[1:]} applied before the last 90 % of {keys[0]}'s: "
          f"{flood_before} of {FLOOD} were applied before the last of them")


def test_without_lanes_a_flooding_key_goes_first():  # faults (Release only: no lane code runs, and the ASan chain is the longer one in CI)
    keys = ["A", "B", "C", "D"]
    order, _, _ = fairness_run(1, keys, lambda others: processed(others) > 0)
    first_other = min(i for i, k in enumerate(order) if k != keys[0])
    print(f"without lanes: {first_other} of {keys[0]}'s {FLOOD} applied before the first other key's")
    check(first_other >= FLOOD * 9 // 10,
          f"without lanes, FIFO: only {first_other} of {keys[0]}'s {FLOOD} applied before the first other key's")


# ---- priority ----------------------------------------------------------------------------

NORMALS = 20000  # the 50,000 take longer to publish here; the order is the same


def test_a_high_command_overtakes_the_normal_backlog():
    lanes = 8
    clear_catalog()
    config = config_of(lanes_opts(lanes))
    pause(True)
    try:
        with pool(lanes, workers=2) as p:
            since = outbox_top()
            normals = produce(config, [product_cmd() for _ in range(NORMALS)])
            (high,) = produce(config, [product_cmd(priority="high")])
            settle_into_lanes(NORMALS + 1, lanes)
            if TRANSPORT == "rabbitmq":
                eq(sum(lane_depths(lanes, "high")), 1, "the high command waits in a high lane")
            pause(False)
            wait_processed([high], 300, "the high command", (p,))
            order = applied_order(since, normals + [high])
            before = order.index(high)
            print(f"{before} of {NORMALS} normal commands applied before the high one")
            check(before <= NORMALS // 100,
                  f"the high command applied before 99 % of the {NORMALS} normal ones published before it: "
                  f"{before} were applied first")
            eq(p.stop(), (0, []), "clean stop")  # the rest of the backlog is not this test's
    finally:
        pause(False)
        clear_catalog()
        os.unlink(config)


def test_low_commands_progress_under_a_high_load():
    lanes, highs, lows = 8, 6000, 20
    clear_catalog()
    config = config_of(lanes_opts(lanes))
    pause(True)
    try:
        with pool(lanes, workers=2) as p:
            since = outbox_top()
            hi = produce(config, [product_cmd(priority="high") for _ in range(highs)])
            lo = produce(config, [product_cmd(priority="low") for _ in range(lows)])
            settle_into_lanes(highs + lows, lanes)
            pause(False)
            wait_processed(lo, 300, "the low commands", (p,))
            order = applied_order(since, hi + lo)
            eq(p.stop(), (0, []), "clean stop")  # the highs left are not this test's
    finally:
        pause(False)
        clear_catalog()
        os.unlink(config)
    low = set(lo)
    last_low = max(i for i, c in enumerate(order) if c in low)
    highs_before = sum(1 for c in order[:last_low] if c not in low)
    print(f"{highs_before} of {highs} high commands applied before the last of {lows} low ones")
    check(highs_before <= highs // 2,
          f"the {lows} low commands (published after {highs} high ones) applied while the highs still wait: "
          f"{highs_before} highs were applied before the last low")


# ---- a retrying command holds its key only ---------------------------------------------

HOLD_RETRY = "retry: { base_delay_ms = 100; max_delay_ms = 400; };"


def same_lane_products(n, lanes, config):
    """A product id, and n others whose commands go to its lane (their lane key: the productId)."""
    cands = [new_id() for _ in range(40 * lanes)]
    where = lanes_of(cands, lanes, config)
    target = cands[0]
    others = [c for c in cands[1:] if where[c] == where[target]][:n]
    eq(len(others), n, "products found in one lane")
    return target, others


def test_a_retrying_command_holds_back_only_its_own_key():
    lanes = 8
    opts = lanes_opts(lanes, True, "lock_timeout_ms = 500; max_attempts = 100;")
    clear_catalog()
    config = config_of(opts, HOLD_RETRY)
    holder = None
    try:
        pid, others = same_lane_products(5, lanes, config)
        with pool(lanes, True, workers=2, more="lock_timeout_ms = 500; max_attempts = 100;", extra=HOLD_RETRY) as p:
            wait_processed(produce(config, [product_cmd(x) for x in [pid] + others]), 60, "the products", (p,))
            since = outbox_top()
            holder = db()
            holder.autocommit = False
            holder.cursor().execute("SELECT 1 FROM products WHERE id = %s FOR UPDATE", (pid,))
            p1, p2 = produce(config, [update_cmd(pid, "p one"), update_cmd(pid, "p two")])
            rest = produce(config, [update_cmd(o, "other") for o in others])
            wait_for(lambda: query("SELECT attempts FROM command_attempts WHERE id = %s", p1), 60,
                     "the first update of the locked product failing its first attempt")
            wait_processed(rest, 120, "the other products' updates in its lane", (p,))
            eq(processed([p1, p2]), 0, "the locked product's updates wait while the others are applied")
            eq(query("SELECT count(*) FROM command_attempts WHERE id = %s", p2)[0][0], 0,
               "the second update waits behind the first without an attempt of its own (not failing on the lock)")
            holder.rollback()
            holder.close()
            holder = None
            wait_processed([p1, p2], 120, "the locked product's updates once its lock is gone", (p,))
            eq(p.stop(), (0, []), "clean stop")
    finally:
        if holder is not None:
            holder.rollback()
            holder.close()
        os.unlink(config)
    eq(applied_order(since, [p1, p2]), [p1, p2], "the held update first, then the one behind it")
    eq(query("SELECT description FROM products WHERE id = %s", pid)[0][0], "p two", "the row: the last update")


POISON = """
CREATE OR REPLACE FUNCTION test_lane_poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.description LIKE 'lane-poison%' THEN
    RAISE EXCEPTION 'simulated serialization failure' USING ERRCODE = '40001';
  END IF;
  RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS test_lane_poison ON products;
CREATE TRIGGER test_lane_poison BEFORE UPDATE ON products FOR EACH ROW EXECUTE FUNCTION test_lane_poison();
"""


def test_a_dead_lettered_command_releases_the_next_of_its_key():
    lanes = 4
    opts = lanes_opts(lanes, True, "max_attempts = 3;")
    clear_catalog()
    config = config_of(opts, HOLD_RETRY)
    query(POISON)
    try:
        with pool(lanes, True, workers=2, more="max_attempts = 3;", extra=HOLD_RETRY) as p:
            pid = new_id()
            wait_processed(produce(config, [product_cmd(pid)]), 60, "the product", (p,))
            since = outbox_top()
            bad, good = produce(config, [update_cmd(pid, "lane-poison"), update_cmd(pid, "after the poison")])
            wait_processed([good], 120, "the update behind the dead-lettered one", (p,))
            eq(processed([bad]), 0, "the poisoned update was not applied")
            dead = [json.loads(d["body"]).get("id") for d in drain_dead("catalog")]
            eq(dead, [bad], "the poisoned update dead-lettered")
            eq(query("SELECT attempts FROM command_attempts WHERE id = %s", bad), [(3,)],
               "it spent its 3 attempts (then dead-lettered) before the next of its key ran")
            last_try = query("SELECT updated_at FROM command_attempts WHERE id = %s", bad)[0][0]
            applied_at = query("SELECT processed_at FROM processed_commands WHERE id = %s", good)[0][0]
            check(applied_at >= last_try, f"the next update applied after the last attempt ({applied_at} < {last_try})")
            eq(p.stop(), (0, []), "clean stop")
    finally:
        query("DROP TRIGGER IF EXISTS test_lane_poison ON products")
        os.unlink(config)
    eq(applied_order(since, [bad, good]), [good], "only the good update has an event")
    eq(query("SELECT description FROM products WHERE id = %s", pid)[0][0], "after the poison", "the row")


# ---- compatibility -----------------------------------------------------------------------

def test_commands_waiting_before_lanes_are_applied_after_the_change():
    clear_catalog()
    plain = config_of("")
    laned = config_of(lanes_opts(8, True))
    try:
        setup_with(plain)
        waiting = produce(plain, [product_cmd() for _ in range(200)])
        eq(intake(), 200, "published to the queue without lanes, nothing running")
        with pool(8, True, workers=2) as p:
            wait_processed(waiting, 120, "the commands published before the lanes", (p,))
            late = produce(laned, [product_cmd() for _ in range(50)])
            wait_processed(late, 120, "commands published after", (p,))
            eq(p.stop(), (0, []), "clean stop")
        eq(intake(), 0, "the intake drained")
        eq(sum(sum(lane_depths(8, c)) for c in CLASSES), 0, "the lanes drained")
    finally:
        os.unlink(plain)
        os.unlink(laned)


# ---- what an operator sees -----------------------------------------------------------------

def lanes_stats(config):
    """conveyor-admin --json stats catalog: its "lanes" line."""
    r = run_bin("conveyor-admin", "-c", config, "--json", "stats", "catalog")
    eq(r.returncode, 0, f"stats exit status (stderr: {r.stderr})")
    got = [o for o in map(json.loads, r.stdout.splitlines()) if o.get("kind") == "lanes"]
    eq(len(got), 1, f"one lanes line: {r.stdout}")
    return got[0]


def test_lanes_are_seen_in_stats_and_metrics():
    lanes = 4
    clear_catalog()
    config = config_of(lanes_opts(lanes))
    pause(True)
    try:
        (k1, k2), where = keys_in_distinct_lanes(["A", "B", "C", "D", "E", "F"], 2, lanes, config)
        with http_pool(workers={"catalog": 1}, routing=CATALOG, queue_opts=lanes_opts(lanes)) as p:
            cmds = [product_cmd(fairnessKey=k1) for _ in range(30)] + \
                   [product_cmd(fairnessKey=k2, priority="high") for _ in range(10)]
            if TRANSPORT == "rabbitmq":  # the sorter moves a paused queue's commands into their lanes
                produce(config, cmds)
                settle_into_lanes(40, lanes)
            else:  # Redis sorts in the take script, which a paused queue does not run: as if sorted
                r = redislib.Redis.from_url(REDIS_URL)
                for c in cmds:
                    cls = c.get("priority", "normal")
                    r.lpush(lane_name(cls, where[c["fairnessKey"]]), json.dumps(dict(c, createdAt=now_iso())))
            normal, high = f"normal.{where[k1]}", f"high.{where[k2]}"
            o = lanes_stats(p.config)
            eq((o["queue"], o["lanes"], o["ordered"]), ("catalog", lanes, False), "the queue's lanes")
            depth = {x["lane"]: x["depth"] for x in o["lane"]}
            eq(len(depth), 3 * lanes, f"a row per lane of each class: {sorted(depth)}")
            eq({k: v for k, v in depth.items() if v}, {normal: 30, high: 10}, "the lanes' depths")
            classes = {c["class"]: c for c in o["classes"]}
            eq([(classes[c]["waiting"]) for c in CLASSES], [10, 30, 0], "waiting per class")
            eq(classes["normal"]["deepestLane"], normal, "the deepest normal lane")
            age = classes["normal"]["oldestAgeSeconds"]
            if TRANSPORT == "redis":
                check(isinstance(age, (int, float)) and age >= 0, f"the oldest's age: {age}")
            r = run_bin("conveyor-admin", "-c", p.config, "stats", "catalog")
            check(f"catalog: {lanes} lanes per class" in r.stdout and f"deepest {normal}: 30" in r.stdout,
                  f"the text form says the lanes:\n{r.stdout}")

            def sampled():
                samples, _ = scrape(p)
                return samples if value(samples, "conveyor_lane_depth", queue="catalog", lane=normal) == 30 else None
            samples = wait_for(sampled, 30, "conveyor_lane_depth sampled")
            eq(value(samples, "conveyor_lane_depth", queue="catalog", lane=high), 10, "the high lane's depth")
            eq(value(samples, "conveyor_lane_depth", queue="catalog", lane="low.0"), 0, "an empty lane")
            # the dashboard's reading API: the same sample
            with urllib.request.urlopen(p.origin + "/api/lanes", timeout=10) as resp:
                api = json.load(resp)
            eq([q["queue"] for q in api["queues"]], ["catalog"], "/api/lanes: the queue with lanes")
            got = {x["lane"]: x["depth"] for x in api["queues"][0]["lane"] if x["depth"]}
            eq(got, {normal: 30, high: 10}, "/api/lanes: the lanes' depths")
            pause(False)
            wait_processed([c["id"] for c in cmds], 60, "the commands once resumed", (p,))
            eq(p.stop(), (0, []), "clean stop")
    finally:
        pause(False)
        clear_catalog()
        os.unlink(config)


def test_a_lane_shows_its_oldest_age():
    """A command created 30 s ago waits in its lane (Redis: pushed into the lane, behind one its
    worker holds; RabbitMQ: held by its worker, blocked on a row lock the test holds): the lane's
    oldest age is at least 30 s in stats --json, the text form and /metrics; no other lane has one,
    and once the lock goes and all is applied, the lane has none."""
    lanes = 2
    opts = lanes_opts(lanes, more="lock_timeout_ms = 25000;")
    clear_catalog()
    config = config_of(opts)
    past = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 30))
    holder = None
    try:
        key = "aged"
        lane = f"normal.{lanes_of([key], lanes, config)[key]}"
        pid = new_id()
        with http_pool(workers={"catalog": 1}, routing=CATALOG, queue_opts=opts) as p:
            wait_processed(produce(config, [product_cmd(pid)]), 60, "the product", (p,))
            holder = db()
            holder.autocommit = False
            holder.cursor().execute("SELECT 1 FROM products WHERE id = %s FOR UPDATE", (pid,))
            cmds = [update_cmd(pid, "aged one", fairnessKey=key, createdAt=past)]
            produce(config, cmds)
            wait_for(lambda: query("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")[0][0], 60,
                     "the worker blocked on the row lock")
            if TRANSPORT == "redis":  # the taken one left its lane: one behind it, as if sorted
                cmds.append(update_cmd(pid, "aged two", fairnessKey=key, createdAt=past))
                redislib.Redis.from_url(REDIS_URL).lpush(lane_name("normal", int(lane[-1])), json.dumps(cmds[-1]))

            def ages():
                return {x["lane"]: x["oldestAgeSeconds"] for x in lanes_stats(p.config)["lane"]}

            def aged():
                a = ages()
                return a if isinstance(a[lane], (int, float)) and a[lane] >= 30 else None
            got = wait_for(aged, 30, f"stats: lane {lane} at least 30 s old")
            eq({k: v for k, v in got.items() if v is not None and k != lane}, {}, "no other lane has an age")
            r = run_bin("conveyor-admin", "-c", p.config, "stats", "catalog")
            line = next((x for x in r.stdout.splitlines() if "catalog: 2 lanes per class" in x), "")
            check(", oldest " in line.split(" normal ")[-1].split(";")[0], f"the text form says the age:\n{r.stdout}")

            def sampled():
                samples, _ = scrape(p)
                key = ("conveyor_lane_oldest_age_seconds", frozenset({"queue": "catalog", "lane": lane}.items()))
                return samples if samples.get(key, 0) >= 30 else None
            wait_for(sampled, 30, "conveyor_lane_oldest_age_seconds at least 30 s")
            holder.rollback()
            holder.close()
            holder = None
            wait_processed([c["id"] for c in cmds], 60, "the aged commands once the lock is gone", (p,))
            wait_for(lambda: ages()[lane] is None, 30, "no age once the lane is empty and nothing held")
            eq(p.stop(), (0, []), "clean stop")
    finally:
        if holder is not None:
            holder.rollback()
            holder.close()
        clear_catalog()
        os.unlink(config)
