"""Batching (batch_size): the messages already delivered run in one transaction,
each command in its own savepoint. A command that is rejected, fails and is
retried, or is a duplicate, is handled alone; the rest commit together; an idle
queue does not wait to fill a batch. (Crashes mid-batch: test_chaos runs with
batching on.)"""
import json
import re
import os
import signal
import time

from harness import (Events, Pool, Publisher, check, drain_dead, envelope, eq, new_id, query, unsettled)
from test_recovery import FAST_RETRY, chaos_trigger, product, stock, wait_dead


def test_batch_commits_together_and_fails_alone():
    drain_dead("catalog")
    with chaos_trigger():
        ok1, ok2, flaky, low = product("ok"), product("ok"), product("flaky"), product("low", stock=1)
        c1 = envelope("updateStock", {"productId": ok1, "quantityChange": 1})
        c2 = envelope("updateStock", {"productId": flaky, "quantityChange": 5})   # fails twice (40001)
        c3 = envelope("updateStock", {"productId": low, "quantityChange": -5})    # INSUFFICIENT_STOCK
        c5 = envelope("updateStock", {"productId": ok2, "quantityChange": 2})
        c7 = envelope("updateStock", {"productId": ok1, "quantityChange": 1})
        unknown = envelope("teleportStock", {"productId": ok1})
        pub, ev = Publisher(), Events()
        # all waiting before the pool starts, so that one worker takes them as one batch
        pub.command(c1)
        pub.command(c2)
        pub.command(c3)
        pub.raw("catalog", b"garbage")
        pub.command(c1)  # the same command again: a duplicate inside the batch
        pub.command(c5)
        pub.raw("catalog", json.dumps(unknown).encode())
        pub.command(c7)
        with Pool(workers={"catalog": 1}, extra=FAST_RETRY, queue_opts="batch_size = 50;") as pool:
            for c in (c1, c2, c3, c5, c7):
                ev.wait_result(c["id"], timeout=30)
            time.sleep(0.5)
            ev.poll()
            eq([e["type"] for e in ev.for_command(c1["id"])], ["stock.updated"], "c1 applied once")
            eq(ev.for_command(c3["id"])[0]["data"]["code"], "INSUFFICIENT_STOCK", "c3 rejected alone")
            eq((stock(ok1), stock(ok2), stock(flaky), stock(low)), (12, 12, 15, 1), "stocks")
            at = dict(query("SELECT id::text, processed_at FROM processed_commands WHERE id = ANY(%s::uuid[])",
                            [c["id"] for c in (c1, c2, c3, c5, c7)]))
            # a batch is what has arrived when the worker looks (it never waits to fill
            # one), so the deliveries may be split; some of them share a transaction
            together = {at[c1["id"]], at[c3["id"]], at[c5["id"]], at[c7["id"]]}
            check(len(together) < 4, f"c1, c3, c5, c7 committed in {len(together)} transactions, not batched")
            check(at[c2["id"]] > at[c1["id"]], f"the failing command was retried alone, later: {at}")
            log = pool.read_log()
            check(any(c2["id"] in line and "attempt 1 of" in line for line in log.splitlines()),
                  "c2's failure was logged as retried")
            dead = drain_dead("catalog")
            eq(sorted(d["reason"] for d in dead), ["invalid_envelope", "unknown_command"], "dead letters")
            # idle queue: a lone command does not wait for a batch to fill
            t0 = time.time()
            c8 = pub.command(envelope("updateStock", {"productId": ok2, "quantityChange": 1}))
            ev.wait_result(c8["id"], timeout=10)
            check(time.time() - t0 < 2, f"a lone command took {time.time() - t0:.2f} s with batch_size 50")
            pub.close()
            ev.close()
            eq(pool.stop(), (0, []), "clean stop")


def test_duplicate_first_in_a_batch_is_undone():
    """The first command of a batch runs before its dedup row is known to be new
    (the claim goes in the same round trip): when it turns out done before, what
    it did is rolled back to its savepoint, and the rest of the batch commits."""
    ps = sorted(product("dup") for _ in range(4))  # the batch runs in productId order: ps[0] first
    first = envelope("updateStock", {"productId": ps[0], "quantityChange": 3})
    others = [envelope("updateStock", {"productId": p, "quantityChange": 2}) for p in ps[1:]]
    pub, ev = Publisher(), Events()
    with Pool(workers={"catalog": 1}, queue_opts="batch_size = 50;") as pool:
        pub.command(first)
        ev.wait_result(first["id"], timeout=15)
        eq(pool.stop()[0], 0, "clean stop")
    for c in [first] + others:  # all waiting before the pool starts: one batch, the duplicate first
        pub.command(c)
    with Pool(workers={"catalog": 1}, queue_opts="batch_size = 50;") as pool:
        for c in others:
            ev.wait_result(c["id"], timeout=15)
        time.sleep(0.5)
        ev.poll()
        eq([stock(p) for p in ps], [13, 12, 12, 12], "the duplicate applied once, the others once each")
        eq([e["type"] for e in ev.for_command(first["id"])], ["stock.updated"], "no second event for the duplicate")
        at = {r[0] for r in query("SELECT processed_at FROM processed_commands WHERE id = ANY(%s::uuid[])",
                                  [c["id"] for c in others])}
        check(len(at) < 3, f"the others committed in {len(at)} transactions, not batched")
        eq(pool.stop(), (0, []), "clean stop")
    pub.close()
    ev.close()


def test_a_batch_runs_ahead_in_arrival_order():
    """updateStock commands of a batch send their statements together and finish
    in order with the results. One that is refused (it needs a second, locked
    read) is rolled back to its savepoint with the ones sent after it, runs
    alone, and they run again: the commands on one product apply in the order
    they arrived, and a duplicate in the middle is undone."""
    p = product("ahead", stock=5)
    others = sorted(product("ahead") for _ in range(3))
    seq = [envelope("updateStock", {"productId": p, "quantityChange": q}) for q in (-3, -4, 10, -4)]
    rest = [envelope("updateStock", {"productId": o, "quantityChange": 1}) for o in others]
    pub, ev = Publisher(), Events()
    for c in seq + rest[:2] + [rest[0]] + rest[2:]:  # all waiting before the pool starts; rest[0] twice
        pub.command(c)
    with Pool(workers={"catalog": 1}, queue_opts="batch_size = 50;") as pool:
        for c in seq + rest:
            ev.wait_result(c["id"], timeout=30)
        time.sleep(0.3)
        ev.poll()
        chain = [(e["type"], e["data"].get("previousStock"), e["data"].get("stock"), e["data"].get("code"))
                 for c in seq for e in ev.for_command(c["id"]) if e["type"] in ("stock.updated", "command.rejected")]
        eq(chain, [("stock.updated", 5, 2, None), ("command.rejected", None, None, "INSUFFICIENT_STOCK"),
                   ("stock.updated", 2, 12, None), ("stock.updated", 12, 8, None)], "one product's commands, in order")
        eq(stock(p), 8, "the product's stock")
        eq([stock(o) for o in others], [11, 11, 11], "the others applied once each (the duplicate undone)")
        eq(len(ev.for_command(rest[0]["id"])), 1, "one event for the duplicated command")
        xids = query("SELECT count(DISTINCT xmin::text) FROM processed_commands WHERE id = ANY(%s::uuid[])",
                     [c["id"] for c in seq + rest])[0][0]
        check(xids < len(seq + rest), f"{len(seq + rest)} commands in {xids} transactions: not batched")
        eq(pool.stop(), (0, []), "clean stop")
    pub.close()
    ev.close()


def test_delete_product_runs_ahead_and_a_missing_one_is_rejected_alone():
    """deleteProduct runs ahead too: in one batch, a product deleted, one that
    does not exist (rejected NOT_FOUND after its statement: rolled back to its
    savepoint and run alone) and stock changes after them all settle right."""
    doomed = product("del")
    missing = new_id()
    kept = sorted(product("kept") for _ in range(2))
    cmds = [envelope("deleteProduct", {"productId": doomed}), envelope("deleteProduct", {"productId": missing})]
    cmds += [envelope("updateStock", {"productId": k, "quantityChange": 4}) for k in kept]
    pub, ev = Publisher(), Events()
    for c in cmds:  # all waiting before the pool starts: one batch
        pub.command(c)
    with Pool(workers={"catalog": 1}, queue_opts="batch_size = 50;") as pool:
        for c in cmds:
            ev.wait_result(c["id"], timeout=30)
        eq([ev.for_command(c["id"])[0]["type"] for c in cmds],
           ["product.deleted", "command.rejected", "stock.updated", "stock.updated"], "result events")
        eq(ev.for_command(cmds[1]["id"])[0]["data"]["code"], "NOT_FOUND", "the missing product")
        eq(query("SELECT deleted_at IS NOT NULL FROM products WHERE id = %s", doomed)[0][0], True, "deleted")
        eq([stock(k) for k in kept], [14, 14], "the stock changes after them applied once")
        eq(pool.stop(), (0, []), "clean stop")
    pub.close()
    ev.close()


def test_held_acks_go_before_the_worker_waits():
    """The acks of one-command batches are held and sent together (RabbitMQ: one
    multiple ack for several; Redis: in the script that takes the next), but
    never kept while the worker waits for work: once it is idle, a crash of the
    whole pool hands nothing out again. And a crash while they are held loses
    nothing and doubles nothing (test_chaos)."""
    p = product("held", stock=1000)
    cmds = [envelope("updateStock", {"productId": p, "quantityChange": 1}) for _ in range(63)]  # not a multiple of the acks held
    pub, ev = Publisher(), Events()
    for c in cmds:
        pub.command(c)
    pool = Pool(workers={"catalog": 1}, expect_restarts=True)
    try:
        for c in cmds:
            ev.wait_result(c["id"], timeout=30)
        eq(stock(p), 1063, "every command applied once")
        time.sleep(1.5)  # idle now: waiting in basic.consume / BLMOVE
    finally:
        os.killpg(pool.proc.pid, signal.SIGKILL)
        pool.proc.wait()
        os.unlink(pool.config)
    eq(unsettled("catalog"), 0, "messages handed out again after the idle pool was killed (acks still held)")
    pub.close()
    ev.close()


def test_a_take_holds_up_to_prefetch_one_transaction_each():
    """A worker takes up to `prefetch` waiting messages at once (Redis: one take
    script, one AOF sync), and still runs each in a transaction of its own at
    batch_size 1: every dedup row has its own transaction id."""
    p = product("take", stock=0)
    cmds = [envelope("updateStock", {"productId": p, "quantityChange": 1}) for _ in range(40)]
    pub, ev = Publisher(), Events()
    for c in cmds:  # all waiting before the pool starts
        pub.command(c)
    with Pool(workers={"catalog": 1}, env={"CONVEYOR_LOG_LEVEL": "debug"}) as pool:  # prefetch = 8
        for c in cmds:
            ev.wait_result(c["id"], timeout=30)
        takes = [int(m) for m in re.findall(r'"took (\d+) messages?"', pool.read_log())]
    eq(stock(p), 40, "every command applied once")
    check(takes and max(takes) <= 8, f"no take above the prefetch: {takes}")
    check(max(takes) > 1, f"takes of one message each (the prefetch unused): {takes}")
    xids = query("SELECT count(DISTINCT xmin::text) FROM processed_commands WHERE id = ANY(%s::uuid[])",
                 [c["id"] for c in cmds])[0][0]
    eq(xids, 40, "transactions for 40 commands at batch_size 1")
    pub.close()
    ev.close()


def test_batch_refused_whole_runs_each_alone():
    """When the database refuses a batch as a whole (here: its one outbox insert,
    through a test trigger that refuses one product's events), each command runs
    again alone: only the one at fault fails (then is dead-lettered), the others
    apply once."""
    drain_dead("catalog")
    good = [product("ok") for _ in range(5)]
    bad = product("refused")
    query("""CREATE OR REPLACE FUNCTION test_outbox_refuses() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF NEW.aggregate_id = %s::uuid THEN RAISE EXCEPTION 'the outbox refuses this event'; END IF;
               RETURN NEW;
             END $$""", bad)
    query("CREATE TRIGGER test_outbox_refuses BEFORE INSERT ON outbox FOR EACH ROW "
          "EXECUTE FUNCTION test_outbox_refuses()")
    try:
        cmds = [envelope("updateStock", {"productId": p, "quantityChange": 1}) for p in good]
        refused = envelope("updateStock", {"productId": bad, "quantityChange": 1})
        cmds.insert(2, refused)
        pub, ev = Publisher(), Events()
        for c in cmds:  # all waiting before the pool starts: one worker takes them as one batch
            pub.command(c)
        with Pool(workers={"catalog": 1}, extra=FAST_RETRY, queue_opts="batch_size = 50; max_attempts = 2;") as pool:
            for c in cmds:
                if c is not refused:
                    ev.wait_result(c["id"], timeout=30)
            dead = wait_dead("catalog")
            eq([(d["reason"], json.loads(d["body"])["id"]) for d in dead], [("handler_error", refused["id"])],
               "only the refused command is dead-lettered, at once (an error nobody anticipated)")
            check("the outbox refuses this event" in dead[0]["error"], f"the error: {dead[0]['error']}")
            ev.poll()
            eq(ev.for_command(refused["id"]), [], "no event for the refused command")
            eq([stock(p) for p in good] + [stock(bad)], [11] * 5 + [10], "stocks: each good command applied once")
            check("running each command alone" in pool.read_log(), "the batch failed whole and was split")
            pub.close()
            ev.close()
            eq(pool.stop(), (0, []), "clean stop")
    finally:
        query("DROP TRIGGER IF EXISTS test_outbox_refuses ON outbox")
