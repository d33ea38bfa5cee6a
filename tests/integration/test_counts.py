"""Counts that follow what PostgreSQL committed (issue 20).

- applied and rejected, summed over the pool's /metrics, equal the rows the
  database committed, across 20 and more kill -9 of workers in mid-batch (a
  worker killed between its COMMIT and its counting leaves the batch's outcomes
  armed in its scoreboard slot; the next process of the slot asks PostgreSQL
  whether that transaction committed);
- a duplicate (a redelivery or a replay the dedup row absorbs) is its own
  outcome in /metrics and in the dashboard's history, and moves no latency;
- the duration histogram's buckets reach the longest a command can take under
  the configured timeouts;
- the dashboard's reads after a PostgreSQL restart answer at once, and a read
  that fails answers with an error id, never with the server's own text; the
  same for a broker that cannot be reached (the dead-letter API).
"""
import os
import random
import signal
import subprocess
import threading
import time

from harness import (AMQP_URL, REDIS_URL, ROOT, TRANSPORT, Events, Failure, Publisher, check, drain_dead, envelope,
                     eq, http_pool, query)
from test_dashboard import request
from test_metrics import catalog_worker_pids, scrape, value, wait_http, wait_metric

KILLS = 24


def catalog_counts(samples, outcome):
    return value(samples, "conveyor_commands_total", queue="catalog", type="createProduct", outcome=outcome)


def database_counts(ids):
    rows = query("SELECT outcome, count(*) FROM processed_commands WHERE id = ANY(%s::uuid[]) GROUP BY outcome",
                 list(ids))
    got = {o: n for o, n in rows}
    return got.get("applied", 0), got.get("rejected", 0)


def wait_results(ev, ids, timeout):
    """Polls until every id in ids has a result event; returns the set of ids that have one."""
    have, seen = set(), 0
    deadline = time.time() + timeout
    while True:
        ev.poll(timeout=0.2)
        for e in ev.events[seen:]:
            if e.get("commandId") in ids:
                have.add(e["commandId"])
        seen = len(ev.events)
        if have >= ids:
            return have
        if time.time() > deadline:
            raise Failure(f"timed out: {len(have)} of {len(ids)} commands have their result event")


def test_applied_and_rejected_counts_equal_the_database_across_kills():  # faults (Release only: the ASan chain, with the hosts run after it, is CI's longest)
    drain_dead("catalog")
    # six workers: the kills spread over them, so that none crash-loops into a long restart delay
    with http_pool(workers={"catalog": 6}, queue_opts="batch_size = 8;", expect_restarts=True) as pool:
        wait_http(pool, "/readyz", 200)
        before, _ = scrape(pool)
        pub, ev = Publisher(), Events()
        ids, stop = set(), threading.Event()
        kills = [0]

        def killer():
            while kills[0] < KILLS and not stop.is_set():
                time.sleep(random.uniform(0.1, 0.3))
                pids = catalog_worker_pids(pool)
                if pids:
                    try:
                        os.kill(random.choice(pids), signal.SIGKILL)
                        kills[0] += 1
                    except ProcessLookupError:
                        pass

        t = threading.Thread(target=killer)
        t0 = time.time()
        t.start()
        try:
            i = 0
            # commands flow for as long as the kills go on: a third rejected (no name)
            while t.is_alive() or i < 2000:  # about 250 a second
                for _ in range(10):
                    payload = {"name": f"Counted {i}", "price": "1.00", "stock": 1} if i % 3 else {"price": "1.00"}
                    ids.add(pub.command(envelope("createProduct", payload))["id"])
                    i += 1
                ev.poll(timeout=0)
                time.sleep(0.04)
                check(i < 200000, "the kills did not end")
        finally:
            stop.set()
            t.join()
        check(kills[0] >= 20, f"at least 20 kills -9 of workers (got {kills[0]})")
        t1 = time.time()
        wait_results(ev, ids, timeout=240)
        t2 = time.time()
        applied, rejected = database_counts(ids)
        eq(applied + rejected, len(ids), "every command has its dedup row")
        check(rejected > 0 and applied > 0, "both outcomes committed")

        def counted(s):
            return (catalog_counts(s, "applied") - catalog_counts(before, "applied"),
                    catalog_counts(s, "rejected") - catalog_counts(before, "rejected"))

        try:  # the last killed worker's successor settles what it left
            s = wait_metric(pool, lambda s: counted(s) == (applied, rejected), "the counts to equal the database's",
                            timeout=30)
        except Failure:
            s, _ = scrape(pool)
            raise Failure(f"applied/rejected counted {counted(s)}, the database committed {(applied, rejected)}")
        time.sleep(1)
        s, _ = scrape(pool)
        eq(counted(s), (applied, rejected), "the counts stay equal to the database's")
        reconciled = pool.read_log().count("committed by a worker that did not count them")
        print(f"FIGURES counts across kills: {len(ids)} commands, {kills[0]} kills -9, "
              f"{reconciled} batches counted by reconciliation, applied {applied}, rejected {rejected}; "
              f"kills for {t1 - t0:.1f} s, the rest drained in {t2 - t1:.1f} s")
        pub.close()
        ev.close()
        drain_dead("catalog")


def test_a_duplicate_is_its_own_outcome_and_moves_no_latency():
    with http_pool(workers={"catalog": 1}) as pool:
        wait_http(pool, "/readyz", 200)
        pub, ev = Publisher(), Events()

        def history():
            _, _, body = request(pool, "GET", "/api/history?range=hour")
            pts = body["points"]
            return (sum(p["applied"] for p in pts), sum(p.get("duplicate", 0) for p in pts),
                    sum(p["commands"] for p in pts))

        base = history()
        cmds = [pub.command(envelope("createProduct", {"name": "Twice", "price": "2.00", "stock": 1}))
                for _ in range(10)]
        for c in cmds:
            ev.wait_result(c["id"])
        wait_metric(pool, lambda s: catalog_counts(s, "applied") == 10, "the first ten counted")
        h0 = None
        deadline = time.time() + 10
        while h0 is None or h0[0] - base[0] < 10:  # the running minute is read from memory every second
            check(time.time() < deadline, f"the history shows the first ten applied: {h0}")
            h0 = history()
            time.sleep(0.3)
        s0, _ = scrape(pool)
        lat0 = value(s0, "conveyor_command_latency_seconds_count", queue="catalog")
        # each sent twice more; one more copy is a replay whose createdAt is 30 minutes old
        for c in cmds + cmds:
            pub.command(c)
        old = dict(cmds[0], createdAt=time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() - 1800)))
        pub.command(old)
        s = wait_metric(pool, lambda s: catalog_counts(s, "duplicate") == 21, "21 duplicates counted")
        time.sleep(1.5)  # nothing else moves
        s, _ = scrape(pool)
        eq(catalog_counts(s, "applied"), 10.0, "applied: only the first ten")
        eq(catalog_counts(s, "duplicate"), 21.0, "duplicates")
        eq(value(s, "conveyor_command_latency_seconds_count", queue="catalog"), lat0,
           "a duplicate moves no latency")
        eq(value(s, "conveyor_command_latency_seconds_bucket", queue="catalog", le="3600"),
           value(s0, "conveyor_command_latency_seconds_bucket", queue="catalog", le="3600"),
           "the 30-minute-old replay lands in no latency bucket")
        deadline = time.time() + 10
        while True:
            h = history()
            if h[1] - h0[1] == 21 or time.time() > deadline:
                break
            time.sleep(0.3)
        eq((h[0] - h0[0], h[1] - h0[1], h[2] - h0[2]), (0, 21, 0),
           "the history: applied, duplicate and commands moved by")
        _, _, overview = request(pool, "GET", "/api/overview")
        cat = [q for q in overview["queues"] if q["name"] == "catalog"][0]
        eq(cat["done"], 10, "the overview's done counts no duplicate")
        pub.close()
        ev.close()


def duration_bounds(samples):
    return sorted(float(dict(k[1])["le"]) for k in samples
                  if k[0] == "conveyor_command_duration_seconds_bucket" and dict(k[1]).get("queue") == "catalog"
                  and dict(k[1]).get("type") == "createProduct" and dict(k[1])["le"] != "+Inf")


def test_duration_buckets_cover_the_configured_timeouts():
    with http_pool(workers={"catalog": 1}) as pool:  # the defaults: batch_size 1, statement_timeout_ms 30000
        wait_http(pool, "/readyz", 200)
        s, _ = scrape(pool)
        check(duration_bounds(s)[-1] >= 30, f"a bucket at or above the default 30 s timeout: {duration_bounds(s)}")
    with http_pool(workers={"catalog": 1}, queue_opts="batch_size = 20; statement_timeout_ms = 45000;") as pool:
        wait_http(pool, "/readyz", 200)
        s, _ = scrape(pool)
        bounds = duration_bounds(s)
        check(bounds[-1] >= 20 * 45, f"a bucket at or above batch_size x statement_timeout (900 s): {bounds}")
        check(bounds == sorted(set(bounds)) and bounds[0] == 0.0005, f"the bounds rise from 0.5 ms: {bounds}")


def servers(*args):
    subprocess.run([os.path.join(ROOT, "scripts", "servers.sh"), *args], check=True, capture_output=True, timeout=300)


LIBPQ_WORDS = ("terminating", "administrator", "connection", "server", "127.0.0.1", "55432", "FATAL", "refused",
               "socket", "postgres")


def test_dashboard_reads_after_a_postgresql_restart_answer_and_say_no_server_text():
    with http_pool(workers={"catalog": 1}) as pool:
        wait_http(pool, "/readyz", 200)
        cid = query("SELECT id::text FROM processed_commands LIMIT 1")
        path = f"/api/command?id={cid[0][0]}" if cid else "/api/history?range=day"
        for p in ("/api/history?range=hour", path):
            eq(request(pool, "GET", p)[0], 200, f"GET {p} before")
        servers("pg-stop")  # "terminating connection due to administrator command"
        try:
            status, _, body = request(pool, "GET", "/api/history?range=hour")
            eq(status, 503, "history while PostgreSQL is down")
            check(isinstance(body, dict) and len(body.get("errorId", "")) == 8, f"an error id: {body}")
            text = body["error"]
            for w in LIBPQ_WORDS:
                check(w.lower() not in text.lower(), f"the server's text ({w!r}) in the answer: {text!r}")
            check(f"error {body['errorId']}" in pool.read_log(), "the log holds the error under its id")
        finally:
            servers("up")
        wait_http(pool, "/readyz", 200, timeout=60)
        eq(request(pool, "GET", "/api/history?range=hour")[0], 200, "history after PostgreSQL came back")
        # a restart while the request connection is idle: the first read after it answers
        servers("pg-restart")
        wait_http(pool, "/readyz", 200, timeout=60)
        for p in ("/api/history?range=hour", path):
            status, _, body = request(pool, "GET", p)
            eq(status, 200, f"the first GET {p} after a restart ({body})")


def test_the_dead_letter_api_with_the_broker_unreachable_says_no_broker_text():
    """The pool's broker behind a TCP proxy that is closed once the pool runs:
    /api/dead answers 503 with an error id, the broker's text (its address,
    "connection refused", the client library's words) only in the pool's log."""
    from test_relay import FreezableProxy
    url = AMQP_URL if TRANSPORT == "rabbitmq" else REDIS_URL
    host, port = url.split("@")[-1].split("//")[-1].split("/")[0].split(":")
    proxy = FreezableProxy(host, int(port))
    prefix = url.rsplit(f"{host}:{port}", 1)[0]
    env = {"CONVEYOR_RABBITMQ_URL" if TRANSPORT == "rabbitmq" else "CONVEYOR_REDIS_URL":
           f"{prefix}127.0.0.1:{proxy.port}" + ("/0" if TRANSPORT == "redis" else "")}
    try:
        with http_pool(workers={"catalog": 1}, env=env) as pool:
            wait_http(pool, "/readyz", 200)
            eq(request(pool, "GET", "/api/dead?queue=catalog")[0], 200, "the dead letters while the broker is there")
            proxy.close()  # every connection closed, and the port refuses new ones
            for look in ("the first read (its connection broken)", "the next (a connect refused)"):
                status, _, body = request(pool, "GET", "/api/dead?queue=catalog")
                eq(status, 503, f"the dead letters with the broker unreachable, {look} ({body})")
                check(isinstance(body, dict) and len(body.get("errorId", "")) == 8, f"an error id: {body}")
                text = body["error"]
                for w in ("127.0.0.1", str(proxy.port), port, "refused", "rabbitmq", "redis", "amqp", "socket",
                          "connection", "reset", "closed", "errno"):
                    check(w.lower() not in text.lower(), f"the broker's text ({w!r}) in the answer, {look}: {text!r}")
                logged = [l for l in pool.read_log().splitlines() if f"error {body['errorId']}" in l]
                check(logged and ("rabbitmq" in logged[0] or "redis" in logged[0]),
                      f"the log holds the broker's text under the id, {look}: {logged}")
    finally:
        proxy.close()
