"""Delayed commands (issue 23): a command with `notBefore` is parked in
PostgreSQL when a worker takes it before its time (no delivery held, no
attempt spent), and the active timekeeper publishes it back to its queue once
that time has passed by the database's clock.

- it is never applied before its time, by the database's clock (processed_at
  is the applying transaction's now());
- 1,000 of them spread over 20 s, with two pools each killed -9 and started
  again in the middle: none early, none lost, none applied twice (their
  lateness is printed: a benchmark figure, not an assertion);
- one published twice with the same id is parked and applied once;
- a notBefore that is not an RFC 3339 date-time with an offset is rejected
  (VALIDATION_FAILED on notBefore); one already past runs at once;
- one parked for an hour survives a restart of every server, still parked,
  not applied;
- conveyor-produce --in parks it the same way.
"""
import calendar
import json
import os
import signal
import time

from harness import (TRANSPORT, Events, Pool, Publisher, check, envelope, eq, query, run_bin, ROOT, new_id)
from test_chaos import restart_broker, restart_postgres


def db_now():
    return query("SELECT extract(epoch FROM clock_timestamp())::float8")[0][0]


def iso(epoch):
    ms = int(round(epoch * 1000))
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + ".%03dZ" % (ms % 1000)


def create(not_before=None, id_=None):
    e = envelope("createProduct", {"productId": new_id(), "name": "later", "price": "1.00", "stock": 1}, id_=id_)
    if not_before is not None:
        e["notBefore"] = not_before
    return e


def applied_at(ids):
    """{id: (outcome, processed_at epoch)} of the ids processed."""
    rows = query("SELECT id::text, outcome, extract(epoch FROM processed_at)::float8 FROM processed_commands "
                 "WHERE id = ANY(%s::uuid[])", list(ids))
    return {i: (o, t) for i, o, t in rows}


def parked(ids):
    rows = query("SELECT id::text, extract(epoch FROM due_at)::float8 FROM parked_commands "
                 "WHERE id = ANY(%s::uuid[])", list(ids))
    return dict(rows)


def wait_for(pred, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_delayed_command_waits_parked_and_is_applied_after_its_time():
    with Pool():
        ev = Events()
        pub = Publisher()
        due = db_now() + 3
        cmd = pub.command(create(iso(due)))
        wait_for(lambda: parked([cmd["id"]]), 10, "the command to be parked")
        eq(applied_at([cmd["id"]]), {}, "applied before its time")
        ev.wait_result(cmd["id"], timeout=20)
        got = applied_at([cmd["id"]])
        eq(got[cmd["id"]][0], "applied", "outcome")
        check(got[cmd["id"]][1] >= due, f"applied at {got[cmd['id']][1]}, before its time {due}")
        eq(parked([cmd["id"]]), {}, "the parked row once published")
        time.sleep(1)
        eq(len(ev.for_command(cmd["id"])), 1, "result events of the command")
        pub.close()
        ev.close()


def test_a_delayed_command_published_twice_is_parked_and_applied_once():
    with Pool():
        ev = Events()
        pub = Publisher()
        cmd = create(iso(db_now() + 2))
        pub.command(cmd)
        pub.command(cmd)
        wait_for(lambda: parked([cmd["id"]]), 10, "the command to be parked")
        pub.command(cmd)  # a third copy while it is parked
        ev.wait_result(cmd["id"], timeout=20)
        time.sleep(2)
        eq(len(ev.for_command(cmd["id"])), 1, "result events (one: the copies are absorbed)")
        eq(query("SELECT count(*) FROM products WHERE id = %s", cmd["payload"]["productId"])[0][0], 1, "products")
        eq(parked([cmd["id"]]), {}, "nothing left parked")
        pub.close()
        ev.close()


def test_an_invalid_notbefore_is_rejected_and_a_past_one_runs_at_once():
    with Pool():
        ev = Events()
        pub = Publisher()
        bad = [pub.command(create(nb)) for nb in ("tomorrow", "2026-12-24T18:00:00", 1767225600, "2026-13-01T00:00:00Z",
                                                   "2027-02-29T00:00:00Z")]
        past = pub.command(create(iso(db_now() - 3600)))
        for b in bad:
            r = ev.wait_result(b["id"])[0]
            eq(r["type"], "command.rejected", f"result of notBefore {b['notBefore']!r}")
            eq(r["data"]["code"], "VALIDATION_FAILED", "code")
            check("notBefore" in r["data"].get("fields", {}), f"fields name notBefore: {r['data']}")
        eq(ev.wait_result(past["id"])[0]["type"], "product.created", "a notBefore in the past runs at once")
        eq(parked([c["id"] for c in bad + [past]]), {}, "none of them parked")
        pub.close()
        ev.close()


def kill_pool(pool):
    """kill -9 of the whole pool (supervisor and children), as a host that dies."""
    os.killpg(pool.proc.pid, signal.SIGKILL)
    pool.proc.wait()


def test_a_thousand_delayed_commands_across_kills_none_early_none_lost_none_twice():  # faults
    n, spread = 1000, 20.0
    pub = Publisher()
    start = db_now() + 3
    cmds = [create(iso(start + spread * i / n)) for i in range(n)]
    due = {c["id"]: start + spread * i / n for i, c in enumerate(cmds)}
    pools = [Pool(workers={"catalog": 2}, expect_restarts=True), Pool(workers={"catalog": 2}, expect_restarts=True)]
    try:
        for c in cmds:
            pub.command(c)
        # every pool killed -9 and started again, one after the other, while commands fall due
        for k in range(2):
            while db_now() < start + 5 + 6 * k:
                time.sleep(0.1)
            kill_pool(pools[k])
            pools[k] = Pool(workers={"catalog": 2}, expect_restarts=True)
        wait_for(lambda: len(applied_at(due)) == n, 120, "every delayed command to be applied")
        got = applied_at(due)
        early = [i for i, (_, t) in got.items() if t < due[i]]
        eq(early, [], "commands applied before their time (by the database's clock)")
        eq(sorted({o for o, _ in got.values()}), ["applied"], "outcomes")
        eq(query("SELECT count(*) FROM products WHERE id = ANY(%s::uuid[])",
                 [c["payload"]["productId"] for c in cmds])[0][0], n, "products created (none lost, none twice)")
        eq(parked(due), {}, "nothing left parked")
        late = sorted(t - due[i] for i, (_, t) in got.items())
        print(f"lateness over {n} delayed commands ({TRANSPORT}, two pools each killed -9 once): "
              f"p50 {late[n // 2] * 1000:.0f} ms, p99 {late[n * 99 // 100] * 1000:.0f} ms, "
              f"max {late[-1] * 1000:.0f} ms")
    finally:
        for p in pools:
            p.stop()
        pub.close()


def test_a_command_parked_for_an_hour_survives_a_restart_of_every_server():  # faults
    pub = Publisher()
    due = db_now() + 3600
    cmd = pub.command(create(iso(due)))
    pub.close()  # its connection would not survive the broker's restart
    with Pool():
        wait_for(lambda: parked([cmd["id"]]), 10, "the command to be parked")
    restart_postgres()
    restart_broker()
    with Pool():
        time.sleep(2)
        got = parked([cmd["id"]])
        check(cmd["id"] in got and abs(got[cmd["id"]] - due) < 0.01, f"still parked for its time: {got}")
        eq(applied_at([cmd["id"]]), {}, "applied")
    query("DELETE FROM parked_commands WHERE id = %s", cmd["id"])


def test_conveyor_produce_in_and_at_park_the_command():
    with Pool():
        ev = Events()
        pid = new_id()
        r = run_bin("conveyor-produce", "-c", os.path.join(ROOT, "queues.conf"), "--in", "2s", "createProduct",
                    json.dumps({"productId": pid, "name": "in two seconds", "price": "2.00"}))
        eq(r.returncode, 0, f"conveyor-produce --in: {r.stderr}")
        cid = r.stdout.strip()
        wait_for(lambda: parked([cid]), 10, "the command to be parked")
        eq(ev.wait_result(cid, timeout=20)[0]["type"], "product.created", "its result")
        r = run_bin("conveyor-produce", "-c", os.path.join(ROOT, "queues.conf"), "--at", "next tuesday",
                    "createProduct", "{}")
        eq(r.returncode, 2, "a bad --at is a usage error")
        check("--at" in r.stderr, f"the message names --at: {r.stderr}")
        ev.close()


def test_cancel_before_its_time_ends_it_in_one_cancelled_rejection_and_after_it_ran_is_refused():
    with Pool():
        ev = Events()
        pub = Publisher()
        later = pub.command(create(iso(db_now() + 3)))
        soon = pub.command(create(iso(db_now() + 1)))
        wait_for(lambda: len(parked([later["id"], soon["id"]])) == 2, 10, "both commands to be parked")
        r = run_bin("conveyor-admin", "-c", os.path.join(ROOT, "queues.conf"), "scheduled", "cancel", later["id"])
        eq(r.returncode, 0, f"cancel before its time ({r.stderr})")
        res = ev.wait_result(later["id"])[0]
        eq((res["type"], res["data"]["code"]), ("command.rejected", "CANCELLED"), "the cancelled command's result")
        eq(ev.wait_result(soon["id"], timeout=20)[0]["type"], "product.created", "the other one ran")
        while db_now() < due_of(later) + 1.5:
            time.sleep(0.2)
        time.sleep(1)
        eq(len(ev.for_command(later["id"])), 1, "result events of the cancelled command")
        eq(query("SELECT count(*) FROM products WHERE id = %s", later["payload"]["productId"])[0][0], 0,
           "the cancelled command never ran")
        r = run_bin("conveyor-admin", "-c", os.path.join(ROOT, "queues.conf"), "scheduled", "cancel", soon["id"])
        eq(r.returncode, 1, "cancel after it ran")
        check("already ran" in r.stderr or "already ran" in r.stdout, f"it says it already ran: {r.stderr}")
        pub.close()
        ev.close()


def due_of(cmd):
    return calendar.timegm(time.strptime(cmd["notBefore"][:19], "%Y-%m-%dT%H:%M:%S")) + int(cmd["notBefore"][20:23]) / 1000
