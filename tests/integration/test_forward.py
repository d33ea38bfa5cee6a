"""The producer's outbox (issue 26, part 1): `conveyor-admin producer install`
puts schema `conveyor` (table `conveyor.outbound`, function `conveyor.enqueue`)
into a producer's own PostgreSQL (here database producer_test on the same
server, dropped and created again by each test); every pool whose queues.conf
lists the producer (`producers = ( { name = "shop"; url = ...; } );`) runs a
forwarder, cv-forward, one active per producer database, which publishes the
committed rows in id order with confirms as conveyor-produce would and marks
them forwarded.

- a command enqueued in a transaction that commits is applied, with its id,
  correlationId and notBefore; one whose transaction rolls back is never
  published;
- enqueue refuses, naming the problem, an unknown type, a payload that is not
  a JSON object and one too large; install is idempotent;
- a row whose type no queue routes any more is kept, marked failed with its
  error, counted in stats and /metrics, and the rows after it go on;
- a row committed late, below rows already forwarded, is forwarded (the claim
  floor), and the order behind its row lock kept;
- kill -9 of the active forwarder: another takes over (the standby of a
  second pool, or the restarted child), commands keep flowing;
- while the broker is stopped the backlog shows in /metrics and producer
  status, and empties once it is back (stats too);
- two producers in one pool, the prune of forwarded rows, a PostgreSQL crash;
  a full bounded queue holds up only its own commands; a RabbitMQ binding
  removed behind the forwarder's back loses nothing;
- the fault run (Release only): 5,000 shop transactions (10 % rolled back),
  each saving an order and enqueueing updateProduct on one of 50 products,
  while the broker stops for 20 s and the forwarder is killed -9 twice (once
  with a standby, once with its whole pool): every committed command applied
  exactly once and in each product's commit order, no rolled-back one ever.
"""
import contextlib
import json
import os
import random
import signal
import subprocess
import threading
import time
import urllib.parse
import uuid

import psycopg2

from harness import (DB_URL, ROOT, ROUTING, TRANSPORT, Events, Failure, Pool, check, db, eq, http_pool, new_id, query,
                     run_bin, session_pids, write_config)
from test_delayed import wait_for
from test_lanes import SHORT_HEARTBEAT, clear_catalog, lanes_opts, setup_with
from test_metrics import scrape
from test_spool import start_broker, stop_broker


def db_url(name):
    """The URL of database name on Conveyor's PostgreSQL server."""
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(DB_URL)._replace(path="/" + name, query=""))


PRODUCER_DB = "producer_test"
PRODUCER_URL = db_url(PRODUCER_DB)
PRODUCER = "shop"
PRODUCERS = f'producers = ( {{ name = "{PRODUCER}"; url = "{PRODUCER_URL}"; }} );'
CATALOG = {"catalog": ROUTING["catalog"]}
FAST_RETRY = "retry: { base_delay_ms = 200; max_delay_ms = 2000; };"
SHOP_SCHEMA = """
CREATE TABLE public.shop_products (id uuid PRIMARY KEY, name text NOT NULL, seq int NOT NULL DEFAULT 0);
CREATE TABLE public.shop_orders (id bigserial PRIMARY KEY, product_id uuid NOT NULL REFERENCES public.shop_products,
                          seq int NOT NULL, command_id uuid NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
"""


# ---- the producer's database ------------------------------------------------------------

def fresh_db(name):
    """Database name dropped (whoever is connected) and created empty."""
    c = db()
    try:
        with c.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            cur.execute(f"CREATE DATABASE {name}")
    finally:
        c.close()


def sql_at(url, sql, *args):
    """One statement on its own connection (autocommit) to the database at url; its rows."""
    with contextlib.closing(psycopg2.connect(url)) as c:
        c.autocommit = True
        cur = c.cursor()
        cur.execute(sql, args or None)
        return cur.fetchall() if cur.description else None


def fresh_producer_db():
    """producer_test new, with the shop's own tables."""
    fresh_db(PRODUCER_DB)
    sql_at(PRODUCER_URL, SHOP_SCHEMA)


def shop():
    """A connection to the producer's database (not autocommit: the shop's transactions)."""
    return psycopg2.connect(PRODUCER_URL)


def shop_query(sql, *args):
    return sql_at(PRODUCER_URL, sql, *args)


def install(routing=None, extra="", expect=0):
    """conveyor-admin producer install into producer_test, with a queues.conf routing routing."""
    conf = write_config(extra=extra if "producers" in extra else PRODUCERS + "\n" + extra, routing=routing)
    try:
        r = run_bin("conveyor-admin", "-c", conf, "producer", "install", "--database", PRODUCER_URL)
    finally:
        os.unlink(conf)
    if expect is not None:
        eq(r.returncode, expect, f"producer install exit status (stdout {r.stdout!r}, stderr {r.stderr!r})")
    return r


def producer(routing=None, extra=""):
    """A fresh producer database with the outbox installed, and no count of it left from an
    earlier test in Conveyor's forward_state."""
    query("DELETE FROM forward_state WHERE producer = %s", PRODUCER)
    fresh_producer_db()
    install(routing, extra)


def enqueue(cur, type_, payload, id_=None, correlation_id=None, not_before_sql=None):
    """conveyor.enqueue in the caller's transaction; the command id it returns. not_before_sql: an SQL
    expression (the database's clock: "now() + interval '1 day'")."""
    nb = not_before_sql or "NULL"
    cur.execute(f"SELECT conveyor.enqueue(%s, %s::jsonb, COALESCE(%s::uuid, gen_random_uuid()), %s, {nb})",
                (type_, payload if isinstance(payload, str) else json.dumps(payload), id_, correlation_id))
    return str(cur.fetchone()[0])


def enqueue_one(type_, payload, **kw):
    """One command enqueued in a transaction of its own, committed; its id."""
    c = shop()
    try:
        with c, c.cursor() as cur:
            return enqueue(cur, type_, payload, **kw)
    finally:
        c.close()


def outbound(ids=None):
    """{command_id: row dict} of conveyor.outbound (the ids given, or all)."""
    cols = ("id", "command_id", "type", "payload", "correlation_id", "not_before", "created_at", "state",
            "forwarded_at", "error")
    rows = shop_query(f"SELECT {', '.join(cols)} FROM conveyor.outbound" +
                      (" WHERE command_id = ANY(%s::uuid[])" if ids is not None else "") + " ORDER BY id",
                      *([list(ids)] if ids is not None else []))
    return {str(r[1]): dict(zip(cols, r)) for r in rows}


def states():
    return dict(shop_query("SELECT state, count(*) FROM conveyor.outbound GROUP BY state"))


def applied(ids):
    """{id: outcome} of the ids Conveyor processed."""
    return dict(query("SELECT id::text, outcome FROM processed_commands WHERE id = ANY(%s::uuid[])", list(ids)))


def wait_applied(ids, timeout, what, pools=()):
    ids = list(ids)

    def done():
        for p in pools:
            check(p.proc.poll() is None, f"a pool exited {p.proc.returncode}:\n{p.read_log()[-3000:]}")
        return len(applied(ids)) == len(ids)
    try:
        wait_for(done, timeout, what)
    except AssertionError:
        raise Failure(f"{what}: {len(applied(ids))} of {len(ids)} applied; outbound {states()}")


def product_payload(name, pid=None):
    return {"productId": pid or new_id(), "name": name, "price": "3.00", "stock": 5}


# ---- forwarders: processes, the lock, the broker ---------------------------------------------

def comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def forwarder_pids(pool):
    """The cv-forward processes of pool (its session)."""
    return [p for p in session_pids(pool.proc.pid) if comm(p) == "cv-forward"]


def lock_holder_ports():
    """The client ports of the sessions holding an advisory lock in the producer's database."""
    rows = query("SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                 "WHERE l.locktype = 'advisory' AND l.granted "
                 "AND l.database = (SELECT oid FROM pg_database WHERE datname = %s)", PRODUCER_DB)
    return {r[0] for r in rows if r[0] is not None and r[0] > 0}


def socket_inodes(local_ports):
    """The inodes of this host's TCP sockets whose local port is one of local_ports."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if int(fields[1].rsplit(":", 1)[1], 16) in local_ports:
                        out.add(fields[9])
        except OSError:
            pass
    return out


def active_forwarder(pools):
    """The pid of the cv-forward (of pools) that holds the producer database's lock, or None: the
    lock's session in pg_locks, its client port, the socket of that port among the forwarders' fds."""
    inodes = socket_inodes(lock_holder_ports())
    if not inodes:
        return None
    for pool in pools:
        for pid in forwarder_pids(pool):
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return pid
    return None


def wait_active(pools, timeout=60, other_than=None):
    return wait_for(lambda: (lambda p: p if p and p != other_than else None)(active_forwarder(pools)), timeout,
                    "a forwarder holding the producer database's lock" +
                    (f" other than {other_than}" if other_than else ""))


def forward_stats(conf):
    """The "forward" lines of conveyor-admin --json stats (a view of forward_state, which the
    forwarders write about once a second)."""
    r = run_bin("conveyor-admin", "-c", conf, "--json", "stats")
    eq(r.returncode, 0, f"conveyor-admin stats exit status ({r.stderr})")
    rows = [json.loads(x) for x in r.stdout.splitlines() if x.strip().startswith("{")]
    return [o for o in rows if o.get("kind") == "forward"]


def wait_stats(conf, pred, what, timeout=30):
    """The forward lines of stats once pred(lines) holds."""
    return wait_for(lambda: (lambda s: s if pred(s) else None)(forward_stats(conf)), timeout,
                    f"stats: {what}")


def forward_metrics(pool, producer_name=PRODUCER):
    """{name: value} of the conveyor_forward_* samples of a producer on the pool's /metrics."""
    try:
        samples, _ = scrape(pool)
    except OSError:  # the HTTP child listens soon after the pool is ready
        return {}
    return {name: v for (name, labels), v in samples.items()
            if name.startswith("conveyor_forward_") and dict(labels).get("producer") == producer_name}


# ---- the small cases (both builds) ------------------------------------------------------------

def test_a_committed_command_is_forwarded_and_a_rolled_back_one_never():
    producer()
    with Pool(extra=PRODUCERS) as pool:
        ev = Events()
        c = shop()
        with c.cursor() as cur:  # the shop's order and its command, rolled back together
            cur.execute("INSERT INTO shop_products (id, name) VALUES (gen_random_uuid(), 'never')")
            rolled = enqueue(cur, "createProduct", product_payload("rolled back"), correlation_id="shop-rolled")
        c.rollback()
        pid = new_id()
        with c, c.cursor() as cur:  # and committed together
            cur.execute("INSERT INTO shop_products (id, name) VALUES (%s, 'forwarded')", (pid,))
            given = new_id()
            cid = enqueue(cur, "createProduct", product_payload("forwarded", pid), id_=given,
                          correlation_id="shop-order-1")
        c.close()
        eq(cid, given, "enqueue returns the id it was given")
        res = ev.wait_result(cid, timeout=30)
        eq(res[0]["type"], "product.created", "the result of the committed command")
        eq(res[0]["correlationId"], "shop-order-1", "the correlation id is carried into the result event")
        eq(res[0]["data"]["productId"], pid, "its payload")
        eq(applied([cid, rolled]), {cid: "applied"}, "the committed command applied, the rolled-back one not")
        row = wait_for(lambda: (lambda r: r if r and r["state"] == "forwarded" else None)(outbound([cid]).get(cid)),
                       30, "the row marked forwarded")
        eq((row["type"], row["correlation_id"], row["error"], row["payload"]["productId"]),
           ("createProduct", "shop-order-1", None, pid), "the outbound row")
        check(row["forwarded_at"] is not None and row["forwarded_at"] >= row["created_at"],
              f"forwarded_at set, after created_at: {row}")
        eq(list(outbound()), [cid], "the rolled-back command left no row")
        # a later command goes through: the forwarder had every chance to publish the rolled-back one
        later = enqueue_one("createProduct", product_payload("later"))
        ev.wait_result(later, timeout=30)
        eq(ev.for_command(rolled), [], "no event of the rolled-back command")
        eq(applied([rolled]), {}, "the rolled-back command never applied")
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")


def test_a_row_committed_late_below_later_rows_is_forwarded():
    """A shop transaction takes its outbound id, then stalls for seconds before its commit
    while later transactions commit and are forwarded past it: its row must still be
    forwarded once it commits (the claim floor waits below it), and a transaction that
    waited for its row lock is forwarded after it (commit order on one aggregate)."""
    producer()
    with Pool(extra=PRODUCERS) as pool:
        ev = Events()
        pid = new_id()
        c = shop()
        with c, c.cursor() as cur:
            cur.execute("INSERT INTO shop_products (id, name) VALUES (%s, 'stalled')", (pid,))
            created = enqueue(cur, "createProduct", product_payload("stalled", pid))
        ev.wait_result(created, timeout=30)
        stalled = c  # locks the product's row, enqueues, and does not commit yet
        with stalled.cursor() as cur:
            cur.execute("UPDATE shop_products SET seq = seq + 1 WHERE id = %s RETURNING seq", (pid,))
            first = enqueue(cur, "updateProduct", {"productId": pid, "description": "seq 1"})
        waiter_done = []

        def waiter():  # the next order of that product: waits for the row lock
            w = shop()
            with w, w.cursor() as cur:
                cur.execute("UPDATE shop_products SET seq = seq + 1 WHERE id = %s RETURNING seq", (pid,))
                seq = cur.fetchone()[0]
                waiter_done.append(enqueue(cur, "updateProduct", {"productId": pid, "description": f"seq {seq}"}))
            w.close()
        t = threading.Thread(target=waiter, daemon=True)
        t.start()
        later, until, deadline = [], time.time() + 2.5, time.time() + 60
        while time.time() < until or len(applied(later)) < 10:  # others forwarded past the stalled row
            check(time.time() < deadline, "later commands forwarded meanwhile")
            later.append(enqueue_one("createProduct", product_payload(f"past the stalled row {len(later)}")))
            time.sleep(0.05)
        check(not waiter_done, "the second order waits for the first's row lock")
        eq(applied([first]), {}, "nothing forwards a row before its commit")
        stalled.commit()
        stalled.close()
        t.join(30)
        eq(len(waiter_done), 1, "the second order committed after the first")
        second = waiter_done[0]
        wait_applied([first, second], 30, "the stalled row and the one behind it", [pool])
        ev.wait(lambda s: len([e for e in s.events if e["commandId"] in (first, second)]) == 2, 30, "both events")
        got = [e["data"]["changed"]["description"] for e in ev.events if e["commandId"] in (first, second)]
        eq(got, ["seq 1", "seq 2"], "the product's updates in commit order")
        eq(query("SELECT description FROM products WHERE id = %s", pid)[0][0], "seq 2", "the last one holds")
        eq(states(), {"forwarded": len(later) + 3}, "every row forwarded")
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")


def refused(sql_args, *words):
    """Runs enqueue with sql_args in a transaction that must fail; the error's message (checked to
    name one of words and to be a data exception or a raise)."""
    c = shop()
    try:
        with c.cursor() as cur:
            try:
                enqueue(cur, *sql_args)
            except psycopg2.Error as e:
                msg = (e.pgerror or str(e)).strip()
                check(e.pgcode is not None and (e.pgcode.startswith("22") or e.pgcode == "P0001"),
                      f"SQLSTATE class 22 or P0001, got {e.pgcode}: {msg}")
                check(any(w.lower() in msg.lower() for w in words), f"the error names the problem ({words}): {msg}")
                return msg
        raise Failure(f"enqueue{sql_args[:1]} was accepted")
    finally:
        c.rollback()
        c.close()


def test_enqueue_refuses_what_it_can_check():
    producer()
    refused(("shipParcel", {"parcel": 1}), "shipParcel")
    refused(("createProduct", [1, 2]), "object")
    refused(("createProduct", '"a string"'), "object")
    refused(("createProduct", "null"), "object")
    big = product_payload("big")
    # over limits.max_message_bytes (65,536 by default); not "x": PostgreSQL logs the refused statement, and
    # the secrets scan looks in its log for the passwords the suite published (one is a run of "x")
    big["description"] = "~" * 70000
    refused(("createProduct", big), "large", "size", "bytes", "65536")
    refused(("createProduct", product_payload("long correlation"), None, "c" * 201), "correlation")
    refused(("createProduct", product_payload("never"), None, None, "'infinity'::timestamptz"), "not_before")
    eq(outbound(), {}, "nothing was inserted")
    c = shop()  # a shop that catches the error in a savepoint and goes on: only the valid command stays
    with c, c.cursor() as cur:
        cur.execute("SAVEPOINT before_enqueue")
        try:
            enqueue(cur, "createProduct", big)
            raise Failure("a command over the limit was accepted")
        except psycopg2.Error:
            cur.execute("ROLLBACK TO SAVEPOINT before_enqueue")
        kept = enqueue(cur, "createProduct", product_payload("after the savepoint"))
    c.close()
    eq(list(outbound()), [kept], "the refused command left no row behind its savepoint")
    shop_query("DELETE FROM conveyor.outbound")
    ok = enqueue_one("createProduct", product_payload("fine"))
    eq(list(outbound()), [ok], "a valid command is")
    eq(outbound()[ok]["state"], "pending", "pending until a forwarder takes it")
    try:  # the same id again (a retried transaction): refused or absorbed, never a second row
        enqueue_one("createProduct", product_payload("fine again"), id_=ok)
    except psycopg2.Error:
        pass
    eq(list(outbound()), [ok], "one row per command id")


def test_install_is_idempotent():
    fresh_producer_db()
    install()
    cols = {r[0]: r[1] for r in shop_query(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'conveyor' AND table_name = 'outbound'")}
    for name in ("id", "command_id", "type", "payload", "correlation_id", "not_before", "created_at", "state",
                 "forwarded_at", "error"):
        check(name in cols, f"conveyor.outbound has column {name}: {cols}")
    eq((cols["id"], cols["command_id"], cols["payload"]), ("bigint", "uuid", "jsonb"), "column types")

    def definitions():
        fn = shop_query("SELECT pg_get_functiondef(p.oid) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                        "WHERE n.nspname = 'conveyor' AND p.proname = 'enqueue'")
        tables = shop_query("SELECT table_name, column_name, data_type, column_default FROM information_schema.columns "
                            "WHERE table_schema = 'conveyor' ORDER BY 1, 2")
        return fn, tables
    before = definitions()
    eq(len(before[0]), 1, "one conveyor.enqueue")
    check("type text" in before[0][0][0] and "RETURNS uuid" in before[0][0][0], f"its signature: {before[0][0][0]}")
    kept = enqueue_one("updateStock", {"productId": new_id(), "quantityChange": 1})
    install()
    eq(definitions(), before, "a second install changes nothing")
    eq(list(outbound()), [kept], "and keeps the rows")
    bad = run_bin("conveyor-admin", "-c", os.path.join(ROOT, "queues.conf"), "producer", "install", "--database",
                  "postgresql://conveyor:Hunter2secret@127.0.0.1:1/nowhere")
    check(bad.returncode != 0, "install into a database that cannot be reached fails")
    check(bad.stderr.strip() and "Hunter2secret" not in bad.stdout + bad.stderr,
          f"says why, without the password: {bad.stderr!r}")


def test_an_unroutable_row_is_kept_failed_and_the_rows_after_it_go_on():
    producer()  # installed with deleteProduct routed
    stale = enqueue_one("deleteProduct", {"productId": new_id()})
    bogus = new_id()  # a row written by hand, past enqueue's checks
    shop_query("INSERT INTO conveyor.outbound (command_id, type, payload) VALUES (%s, 'shipParcel', '{}')", bogus)
    after = enqueue_one("createProduct", product_payload("after the stale one"))
    routing = {"users": ROUTING["users"], "catalog": ["createProduct", "updateProduct", "updateStock"],
               "orders": ROUTING["orders"]}  # deleteProduct routed no more
    with http_pool(extra=PRODUCERS, routing=routing) as pool:
        wait_applied([after], 30, "the command after the unroutable one", [pool])
        rows = outbound([stale, bogus, after])
        eq(rows[after]["state"], "forwarded", "the routable row")
        eq(rows[bogus]["state"], "failed", "the row of an unknown type is kept, marked failed")
        check(rows[bogus]["error"] and "shipParcel" in rows[bogus]["error"], f"its error: {rows[bogus]['error']!r}")
        eq(rows[stale]["state"], "failed", "the unroutable row is kept, marked failed")
        check(rows[stale]["error"] and "deleteProduct" in rows[stale]["error"],
              f"its error names the type: {rows[stale]['error']!r}")
        check(rows[stale]["id"] < rows[after]["id"], "it came first")
        eq(applied([stale, bogus]), {}, "never applied")
        wait_stats(pool.config, lambda st: [(s["producer"], s["failed"], s["pending"]) for s in st] ==
                   [(PRODUCER, 2, 0)], "shop: 2 failed, none pending")
        r = run_bin("conveyor-admin", "-c", pool.config, "--json", "producer", "status", PRODUCER)
        eq(r.returncode, 0, f"producer status ({r.stderr})")
        lines = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
        eq([(o["commandId"], o["type"]) for o in lines if o["kind"] == "failed"],
           [(stale, "deleteProduct"), (bogus, "shipParcel")],
           f"producer status lists the failed row: {lines}")
        wait_for(lambda: forward_metrics(pool).get("conveyor_forward_failed") == 2, 30,
                 "conveyor_forward_failed{producer=\"shop\"} 2")
        eq(forward_metrics(pool).get("conveyor_forward_pending"), 0, "nothing pending")
        # forwarders only add types; install with the new routing prunes it: the shop can no longer enqueue it
        install(routing)
        refused(("deleteProduct", {"productId": new_id()}), "deleteProduct")
        again = enqueue_one("createProduct", product_payload("still flowing"))
        wait_applied([again], 30, "a later command", [pool])
        eq(outbound([stale])[stale]["state"], "failed", "the failed row stays")
        eq(pool.stop(), (0, []), "clean stop")
    # routed again: producer retry sends it (the same command id)
    with Pool(extra=PRODUCERS) as pool:
        r = run_bin("conveyor-admin", "-c", pool.config, "producer", "retry", stale, PRODUCER)
        eq(r.returncode, 0, f"producer retry ({r.stdout} {r.stderr})")
        r = run_bin("conveyor-admin", "-c", pool.config, "producer", "retry", "--all", PRODUCER)
        eq(r.returncode, 0, f"producer retry --all ({r.stdout} {r.stderr})")
        wait_applied([stale], 30, "the failed row sent again", [pool])
        eq(applied([stale]), {stale: "rejected"}, "applied once (rejected: no such product)")
        eq(outbound([stale])[stale]["state"], "forwarded", "and marked forwarded")
        wait_for(lambda: outbound([bogus])[bogus]["state"] == "failed", 30, "the unknown type failed again")
        eq(len(shop_query("SELECT 1 FROM conveyor.outbound WHERE command_id = %s", bogus)), 1, "kept once")
        eq(pool.stop(), (0, []), "clean stop")


def test_not_before_and_the_envelope_are_carried():
    producer()
    with Pool(extra=PRODUCERS) as pool:
        ev = Events()
        later = enqueue_one("createProduct", product_payload("tomorrow"), correlation_id="shop-later",
                            not_before_sql="now() + interval '1 day'")
        want = shop_query("SELECT extract(epoch FROM not_before)::float8 FROM conveyor.outbound WHERE command_id = %s",
                          later)[0][0]
        env = wait_for(lambda: query("SELECT envelope FROM parked_commands WHERE id = %s", later), 30,
                       "the command parked until its time")
        env = json.loads(env[0][0])
        eq((env["id"], env["type"], env["correlationId"], env["payload"]["name"]),
           (later, "createProduct", "shop-later", "tomorrow"), "the envelope a worker took")
        nb = query("SELECT extract(epoch FROM %s::timestamptz)::float8", env["notBefore"])[0][0]
        check(abs(nb - want) < 0.001, f"notBefore {env['notBefore']} is the row's not_before")
        check("createdAt" in env, "createdAt set")
        eq(applied([later]), {}, "not applied before its time")
        r = run_bin("conveyor-admin", "-c", pool.config, "scheduled", "cancel", later)
        eq(r.returncode, 0, f"cancelled ({r.stderr})")
        eq(ev.wait_result(later, timeout=30)[0]["data"]["code"], "CANCELLED", "its cancellation")
        soon = enqueue_one("createProduct", product_payload("soon"), not_before_sql="now() + interval '2 seconds'")
        due = shop_query("SELECT extract(epoch FROM not_before)::float8 FROM conveyor.outbound WHERE command_id = %s",
                         soon)[0][0]
        ev.wait_result(soon, timeout=60)
        at = query("SELECT extract(epoch FROM processed_at)::float8 FROM processed_commands WHERE id = %s", soon)[0][0]
        check(at >= due, f"applied after its not_before ({at} < {due})")
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")


def test_a_standby_forwarder_takes_over_from_a_killed_one():
    producer()
    first = Pool(extra=PRODUCERS, expect_restarts=True)
    second = None
    try:
        holder = wait_active([first])
        second = Pool(extra=PRODUCERS)
        # its supervisor starts it beside the workers: not yet there when the pool says it is up
        wait_for(lambda: forwarder_pids(second), 20, "the second pool runs a forwarder too")
        eq(active_forwarder([first, second]), holder, "the second pool's forwarder stands by")
        ids = [enqueue_one("createProduct", product_payload(f"before {i}")) for i in range(10)]
        wait_applied(ids, 30, "commands before the kill", [first, second])
        os.kill(holder, signal.SIGKILL)
        more = [enqueue_one("createProduct", product_payload(f"after {i}")) for i in range(10)]
        taker = wait_active([first, second], other_than=holder)
        wait_applied(more, 60, "commands after the kill", [first, second])
        check(taker in forwarder_pids(first) + forwarder_pids(second), "a forwarder of one of the pools took over")
        wait_for(lambda: [p for p in forwarder_pids(first) if p != holder], 30,
                 "the first pool's supervisor restarts its forwarder")
        eq(states(), {"forwarded": 20}, "every row forwarded")
        check("cv-forward" in first.read_log() or "forward" in first.read_log(), "the pool logged its forwarder")
    finally:
        for p in (second, first):
            if p and p.proc.poll() is None:
                eq(p.stop(), (0, []), "clean stop")


def test_the_backlog_shows_while_the_broker_is_stopped():  # faults (Release only: 16 s a transport of waiting)
    producer()
    with http_pool(extra=PRODUCERS, expect_restarts=True) as pool:
        wait_for(lambda: forward_metrics(pool).get("conveyor_forward_pending") == 0, 30,
                 "conveyor_forward_pending{producer=\"shop\"} 0 from the start")
        m = forward_metrics(pool)
        eq((m.get("conveyor_forward_oldest_age_seconds"), m.get("conveyor_forward_failed")), (0, 0),
           "no oldest age, nothing failed")
        stop_broker()
        try:
            ids = [enqueue_one("updateStock", {"productId": new_id(), "quantityChange": 1}) for _ in range(20)]
            m = wait_for(lambda: (lambda m: m if m.get("conveyor_forward_pending") == 20 and
                                  m.get("conveyor_forward_oldest_age_seconds", 0) > 0 else None)(
                forward_metrics(pool)), 60, "20 pending with an oldest age on /metrics")
            # stats needs the broker (it counts the queues first); producer status reads the producer's database
            r = run_bin("conveyor-admin", "-c", pool.config, "--json", "producer", "status", PRODUCER)
            eq(r.returncode, 0, f"producer status with the broker down ({r.stderr})")
            o = [json.loads(x) for x in r.stdout.splitlines() if '"outbound"' in x][0]
            eq((o["pending"], o["failed"]), (20, 0), f"producer status: {o}")
            check(o["oldest_age_seconds"] > 0, f"producer status: the oldest age {o}")
            eq(states(), {"pending": 20}, "kept pending while the broker is away")
        finally:
            start_broker()
        wait_applied(ids, 120, "the backlog after the broker came back", [pool])
        m = wait_for(lambda: (lambda m: m if m.get("conveyor_forward_pending") == 0 else None)(forward_metrics(pool)),
                     60, "pending back to 0")
        eq((m.get("conveyor_forward_oldest_age_seconds"), m.get("conveyor_forward_failed")), (0, 0),
           "no oldest age once drained, nothing failed")
        eq(states(), {"forwarded": 20}, "every row forwarded")
        wait_stats(pool.config, lambda st: [(s["pending"], s["failed"], s["oldestAgeSeconds"]) for s in st] ==
                   [(0, 0, 0)], "nothing pending once drained")
        r = run_bin("conveyor-admin", "-c", pool.config, "producer", "status", PRODUCER)
        eq(r.returncode, 0, f"producer status ({r.stderr})")
        check("0 pending" in r.stdout and "20 forwarded" in r.stdout, f"producer status: {r.stdout}")
        eq(pool.stop(), (0, []), "clean stop")


def test_a_producer_given_as_a_url_is_named_by_its_database():
    producer()
    query("DELETE FROM forward_state WHERE producer = %s", PRODUCER_DB)
    with http_pool(extra=f'producers = ( "{PRODUCER_URL}" );') as pool:
        cid = enqueue_one("createProduct", product_payload("by url"))
        wait_applied([cid], 30, "the command of a producer given as a URL", [pool])
        wait_for(lambda: forward_metrics(pool, PRODUCER_DB).get("conveyor_forward_pending") == 0, 30,
                 f'conveyor_forward_pending{{producer="{PRODUCER_DB}"}} 0: the producer named by its database')
        eq(pool.stop(), (0, []), "clean stop")
    query("DELETE FROM forward_state WHERE producer = %s", PRODUCER_DB)


def test_two_producers_a_postgres_restart_and_the_prune():  # faults (Release only: a PostgreSQL restart)
    """One pool, two producer databases (a forwarder each, counted apart); forwarded rows
    pruned after relay.retention_seconds (0 here); a crash and restart of PostgreSQL (both
    producers' and Conveyor's): the forwarders reconnect and go on."""
    producer()
    depot_db = PRODUCER_DB + "_depot"
    depot_url = db_url(depot_db)
    query("DELETE FROM forward_state WHERE producer = 'depot'")
    fresh_db(depot_db)
    r = run_bin("conveyor-admin", "-c", os.path.join(ROOT, "queues.conf"), "producer", "install", "--database",
                depot_url)
    eq(r.returncode, 0, f"install into the second producer ({r.stderr})")

    def depot_enqueue(n, name):
        d = psycopg2.connect(depot_url)
        with d, d.cursor() as cur:
            ids = [enqueue(cur, "createProduct", product_payload(f"{name} {i}")) for i in range(n)]
        d.close()
        return ids

    def depot_rows():
        return sql_at(depot_url, "SELECT count(*) FROM conveyor.outbound")[0][0]
    ids = [enqueue_one("createProduct", product_payload(f"shop {i}")) for i in range(5)] + depot_enqueue(5, "depot")
    both = (f'producers = ( {{ name = "{PRODUCER}"; url = "{PRODUCER_URL}"; }}, '
            f'{{ name = "depot"; url = "{depot_url}"; }} );\nrelay: {{ retention_seconds = 0; }};')
    try:
        with http_pool(extra=both, expect_restarts=True) as pool:
            eq(len([p for p in session_pids(pool.proc.pid) if comm(p) == "cv-forward"]), 2, "a forwarder each")
            wait_applied(ids, 30, "the commands of both producers", [pool])
            wait_for(lambda: not outbound() and depot_rows() == 0, 30, "forwarded rows pruned (retention 0)")
            wait_for(lambda: forward_metrics(pool).get("conveyor_forward_pending") == 0 and
                     forward_metrics(pool, "depot").get("conveyor_forward_pending") == 0, 30,
                     "each producer counted on /metrics")
            subprocess.run([os.path.join(ROOT, "scripts", "servers.sh"), "pg-restart"], check=True,
                           capture_output=True, timeout=120)
            more = wait_for(lambda: _try(lambda: [enqueue_one("createProduct", product_payload("after the restart"))]
                                         + depot_enqueue(1, "depot after the restart")), 60,
                            "the producers' database back")
            wait_applied(more, 120, "commands after PostgreSQL's restart", [pool])
            eq(pool.stop(), (0, []), "clean stop")
    finally:
        query(f"DROP DATABASE IF EXISTS {depot_db} WITH (FORCE)")
        query("DELETE FROM forward_state WHERE producer = 'depot'")


def _try(fn):
    """fn(), or None when the database is not back yet."""
    try:
        return fn()
    except psycopg2.OperationalError:
        return None


def test_a_full_queue_holds_up_only_its_own_commands():
    """catalog bounded (max_length 5) with no worker: the forwarder's createProducts beyond the
    bound are refused by the broker and stay pending (not failed), while a later command of
    another queue goes on; once catalog has a worker, the held ones follow."""
    from test_bounded_queues import depth, empty, management
    producer()
    routing = {"catalog": ROUTING["catalog"], "orders": ROUTING["orders"]}
    opts = "max_length = 5;"
    empty("catalog")
    conf = write_config(workers={"catalog": 0, "orders": 0}, routing=routing, queue_opts=opts, extra=PRODUCERS)
    setup_with(conf)  # the bound: RabbitMQ's policies
    os.unlink(conf)
    try:
        with Pool(workers={"catalog": 0, "orders": 1}, routing=routing, queue_opts=opts, extra=PRODUCERS) as pool:
            cat = [enqueue_one("createProduct", product_payload(f"bounded {i}")) for i in range(12)]
            held = wait_for(lambda: (lambda rows: rows if depth("catalog") >= 5 and len(rows) + depth("catalog") == 12
                                     else None)([c for c, r in outbound(cat).items() if r["state"] == "pending"]),
                            30, "catalog full, the rest of its commands held")
            other = enqueue_one("cancelOrder", {"orderId": new_id()})
            wait_applied([other], 30, "a command of another queue, enqueued after the held ones", [pool])
            eq(applied([other]), {other: "rejected"}, "applied (rejected: no such order)")
            check(all(outbound(held)[c]["state"] == "pending" for c in held),
                  "the held commands wait, pending (not failed)")
            eq(states().get("failed", 0), 0, "nothing failed")
            eq(pool.stop(), (0, []), "clean stop")
        with Pool(workers={"catalog": 1, "orders": 0}, routing=routing, queue_opts=opts, extra=PRODUCERS) as pool:
            wait_applied(cat, 60, "every catalog command once catalog drains", [pool])
            eq(set(applied(cat).values()), {"applied"}, "applied")
            wait_for(lambda: states() == {"forwarded": 13}, 30, "every row forwarded")
            eq(pool.stop(), (0, []), "clean stop")
    finally:
        if TRANSPORT == "rabbitmq":
            for q in routing:
                try:
                    management("DELETE", f"policies/%2F/conveyor.{q}.max-length")
                except OSError:
                    pass


def test_a_binding_removed_behind_the_forwarders_back_loses_nothing_rabbitmq():
    """A type queues.conf routes but RabbitMQ no longer does (its binding removed behind the
    pool's back): the mandatory publish comes back unroutable, nothing is marked forwarded
    for it; the forwarder's next connection declares the topology again (the binding
    back), and the command is delivered and applied once, the rows beside it too."""
    import pika
    from harness import AMQP_URL
    producer()
    with Pool(extra=PRODUCERS) as pool:
        first = enqueue_one("createProduct", product_payload("before the unbind"))
        wait_applied([first], 30, "a command before the binding goes", [pool])
        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        conn.channel().queue_unbind("conveyor.catalog", "conveyor.commands", "deleteProduct")
        conn.close()
        c = shop()
        with c, c.cursor() as cur:  # one batch: the unroutable row among others
            before = enqueue(cur, "createProduct", product_payload("beside it, before"))
            lost = enqueue(cur, "deleteProduct", {"productId": new_id()})
            after = enqueue(cur, "createProduct", product_payload("beside it, after"))
        c.close()
        wait_applied([before, lost, after], 30, "the unroutable command and the rows beside it", [pool])
        eq(applied([lost]), {lost: "rejected"}, "applied once (rejected: no such product)")
        check("no queue is bound for 'deleteProduct'" in pool.read_log(), "the return was seen and logged")
        wait_for(lambda: states() == {"forwarded": 4}, 30, "every row forwarded")
        eq(pool.stop(), (0, []), "clean stop")


# ---- the fault run (Release only) -----------------------------------------------------------

TRANSACTIONS = int(os.environ.get("CONVEYOR_FORWARD_TRANSACTIONS", "5000"))
PRODUCTS = 50
SHOP_THREADS = 4


class Shop:
    """The producer program: SHOP_THREADS connections running TRANSACTIONS transactions at about
    rate per second in all; each locks a product's counter row (its seq: commit order per product),
    saves an order and enqueues updateProduct {productId, description: "seq N"}; 10 % roll back."""

    def __init__(self, products, rate):
        self.products, self.rate = products, rate
        self.committed, self.rolled, self.errors = [], [], []
        self.done = 0
        self.lock = threading.Lock()
        self.next = 0
        self.t0 = time.time()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(SHOP_THREADS)]
        for t in self.threads:
            t.start()

    def take(self):
        with self.lock:
            if self.next >= TRANSACTIONS:
                return None
            self.next += 1
            return self.next

    def run(self, k):
        rng = random.Random(k)
        c = shop()
        try:
            while True:
                n = self.take()
                if n is None:
                    return
                wait = self.t0 + n / self.rate - time.time()
                if wait > 0:
                    time.sleep(wait)
                pid = rng.choice(self.products)
                cid = str(uuid.uuid4())
                with c.cursor() as cur:
                    cur.execute("UPDATE shop_products SET seq = seq + 1 WHERE id = %s RETURNING seq", (pid,))
                    seq = cur.fetchone()[0]
                    cur.execute("INSERT INTO shop_orders (product_id, seq, command_id) VALUES (%s, %s, %s)",
                                (pid, seq, cid))
                    enqueue(cur, "updateProduct", {"productId": pid, "description": f"seq {seq}"}, id_=cid)
                if rng.random() < 0.1:
                    c.rollback()
                    with self.lock:
                        self.rolled.append(cid)
                else:
                    c.commit()
                    with self.lock:
                        self.committed.append((pid, seq, cid))
                with self.lock:
                    self.done += 1
        except Exception as e:  # noqa: BLE001  (reported by the test)
            self.errors.append(repr(e))
        finally:
            c.close()

    def wait_progress(self, fraction, timeout=300):
        wait_for(lambda: self.done >= fraction * TRANSACTIONS or self.errors, timeout,
                 f"{fraction:.0%} of the shop's transactions")
        check(not self.errors, f"the shop failed: {self.errors}")

    def join(self):
        for t in self.threads:
            t.join(600)
        check(not self.errors, f"the shop failed: {self.errors}")
        eq(self.done, TRANSACTIONS, "the shop's transactions")


def kill_session(pool):
    """kill -9 of every process of the pool's session (supervisor, workers, relay, forwarder)."""
    for pid in session_pids(pool.proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    pool.proc.wait()
    pool.check_log()
    os.unlink(pool.config)


def test_committed_orders_commands_are_applied_once_in_commit_order_through_faults():  # faults
    clear_catalog()
    opts = lanes_opts(4, ordered=True)
    extra = "\n".join((PRODUCERS, SHORT_HEARTBEAT, FAST_RETRY))
    conf = write_config(workers={"catalog": 0}, routing=CATALOG, queue_opts=opts, extra=extra)
    setup_with(conf)
    os.unlink(conf)
    producer(CATALOG, extra)

    def pool():
        return Pool(workers={"catalog": 2}, routing=CATALOG, queue_opts=opts, extra=extra, expect_restarts=True)
    first = pool()
    pools = [first]
    try:
        # the 50 products, in the shop and through the outbox
        products = [str(uuid.uuid4()) for _ in range(PRODUCTS)]
        c = shop()
        with c, c.cursor() as cur:
            creates = []
            for i, pid in enumerate(products):
                cur.execute("INSERT INTO shop_products (id, name) VALUES (%s, %s)", (pid, f"forward {i}"))
                creates.append(enqueue(cur, "createProduct", {"productId": pid, "name": f"forward {i}",
                                                              "price": "1.00", "stock": 10}))
        c.close()
        wait_applied(creates, 120, "the 50 products created", pools)
        since = query("SELECT coalesce(max(id), 0) FROM outbox")[0][0]
        second = pool()
        pools.append(second)
        holder = wait_active(pools)
        check(holder in forwarder_pids(first), "the first pool's forwarder is the active one")

        shop_run = Shop(products, rate=max(30.0, TRANSACTIONS / 90))  # about 90 s: every fault falls inside it (a pool's clean stop may take 30 s)
        # 1. kill -9 of the active forwarder while a second pool's stands by
        shop_run.wait_progress(0.1)
        os.kill(holder, signal.SIGKILL)
        taker = wait_active(pools, other_than=holder)
        print(f"forwarder {holder} killed; {'the standby' if taker in forwarder_pids(second) else 'its restart'} "
              f"({taker}) took over", flush=True)
        # 2. the broker away for 20 s
        shop_run.wait_progress(0.25)
        stop_broker()
        try:
            time.sleep(20)
        finally:
            start_broker()
        # 3. one pool left, killed -9 as a whole (no forwarder at all for a while), then started again
        shop_run.wait_progress(0.55)
        eq(second.stop(), (0, []), "the second pool stops cleanly")
        pools.remove(second)
        wait_active(pools)
        kill_session(first)
        pools.remove(first)
        check(shop_run.done < TRANSACTIONS, f"the shop was still running through every fault ({shop_run.done})")
        time.sleep(2)
        third = pool()
        pools.append(third)
        wait_active(pools)
        print(f"pool killed -9 at {shop_run.done} transactions, started again", flush=True)
        shop_run.join()

        committed = {cid: (pid, seq) for pid, seq, cid in shop_run.committed}
        rolled = shop_run.rolled
        check(len(rolled) > TRANSACTIONS * 0.05, f"about 10 % rolled back ({len(rolled)})")
        wait_applied(committed, 600, "every committed command", pools)
        wait_for(lambda: states().get("pending", 0) == 0, 60, "no pending row left")
        st = states()
        check("failed" not in st, f"nothing failed: {st}")
        outcomes = applied(list(committed) + rolled)
        eq(sorted(set(outcomes.values())), ["applied"], "every committed command applied")
        eq(len(outcomes), len(committed), "the committed ones, and none of the rolled-back ones")

        # each product's events: once per committed command, in its commit order (seq)
        rows = query("SELECT payload FROM outbox WHERE id > %s AND event_type IN ('product.updated', "
                     "'command.rejected') AND payload->>'commandId' = ANY(%s) ORDER BY id",
                     since, list(committed) + rolled)
        by_product, seen = {}, set()
        for (ev,) in rows:
            check(ev["type"] == "product.updated", f"no command rejected: {ev}")
            check(ev["commandId"] in committed, f"an event of a rolled-back command: {ev}")
            check(ev["commandId"] not in seen, f"one event per command: {ev}")
            seen.add(ev["commandId"])
            pid, seq = committed[ev["commandId"]]
            eq(ev["data"]["changed"].get("description"), f"seq {seq}", "the event's change")
            by_product.setdefault(pid, []).append(seq)
        eq(len(seen), len(committed), "an event for every committed command")
        want = {}
        for pid, seq in committed.values():
            want.setdefault(pid, []).append(seq)
        for pid, seqs in want.items():
            eq(by_product.get(pid), sorted(seqs), f"product {pid}: its updates applied in commit order")
            eq(sorted(seqs), list(range(1, len(seqs) + 1)), f"product {pid}: the shop's seqs")
        final = dict(query("SELECT id::text, description FROM products WHERE id = ANY(%s::uuid[])", products))
        for pid in products:
            eq(final.get(pid), f"seq {len(want[pid])}" if pid in want else None,
               f"product {pid}: its last committed update holds")
        eq(shop_query("SELECT count(*) FROM shop_orders")[0][0], len(committed), "the shop's committed orders")
        print(f"{len(committed)} committed, {len(rolled)} rolled back; outbound {st}", flush=True)
        for p in list(pools):
            eq(p.stop(), (0, []), "clean stop")
            pools.remove(p)
    finally:
        for p in pools:
            if p.proc.poll() is None:
                p.stop()
