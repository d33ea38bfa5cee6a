"""Durable subscriptions (docs/contract.md §13, issue 27's tests), through the real
workers and relay and the real conveyor-subscribe: what is published while a
subscription's processes are all stopped (and the broker restarts) arrives, each
event once; a read model kept with the inbox (§12) by two processes killed -9 over
and over equals the products table and applied each product's events in commit
order; --exec retries, dead-letters, and a retry from conveyor-admin; --from
replays exactly the events after an event id or a time; the lag figures equal the
broker's own counts; two processes share the partitions and keep each
aggregate's order. Timing is stated as order (processes stopped, then events
published, then the broker restarted, then processes started), never as a
duration the test relies on."""
import contextlib
import datetime
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

import pika
import psycopg2
import redis as redislib

from harness import (AMQP_URL, BIN, DB_URL, REDIS_URL, ROOT, TRANSPORT, Events, Failure, Pool, Publisher, check, db,
                     envelope, eq, http_pool, log_file, new_id, query, run_bin)
from test_chaos import restart_broker

CONF = os.path.join(ROOT, "queues.conf")
CATALOG4 = {"catalog": 4}
HERE = os.path.dirname(os.path.abspath(__file__))


# ---- helpers -------------------------------------------------------------------------

def sub_name(what):
    """A subscription name of its own for this run (§13: 1-64 of A-Z a-z 0-9 _ -)."""
    return f"t{what}_{new_id()[:8]}"


def wait_for(pred, timeout, what):
    """pred()'s first true value, polled every 0.1 s; Failure naming what after timeout seconds."""
    deadline = time.time() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.time() > deadline:
            raise Failure(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def registry(name):
    """The subscription's registry row as a dict, or None."""
    c = db()
    try:
        with c.cursor() as cur:
            cur.execute("SELECT * FROM subscriptions WHERE name = %s", (name,))
            row = cur.fetchone()
            return dict(zip([d[0] for d in cur.description], row)) if row else None
    finally:
        c.close()


_seq = itertools.count()
_seq_lock = threading.Lock()


class Sub:
    """One conveyor-subscribe --name NAME process in its own session, its stdout
    read by a thread: every event it prints is noted in events as (order, tag,
    event), order being one counter shared by every Sub of the test (the order the
    test read them in). With acks, each event is acknowledged (`ack ID`) once
    noted; without, the process acks what it wrote itself. stderr goes to a log
    file (kept for the secrets scan)."""

    def __init__(self, name, *args, patterns=(), acks=False, tag="", env=None):
        self.name, self.tag, self.acks = name, tag or name, acks
        self.events = []
        self.log = log_file("conveyor-subscribe-")
        cmd = [os.path.join(BIN, "conveyor-subscribe"), "-c", CONF, "--name", name, *(["--acks"] if acks else []),
               *args, *patterns]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if acks else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1,
                                     env=dict(os.environ, **(env or {})), start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                self.events.append((-1, self.tag, {"unparsable": line}))
                continue
            with _seq_lock:
                self.events.append((next(_seq), self.tag, ev))
            if self.acks:
                try:
                    self.proc.stdin.write(f"ack {ev['id']}\n")
                    self.proc.stdin.flush()
                except (BrokenPipeError, ValueError, OSError):
                    return

    def stderr(self):
        with open(self.log.name) as f:
            return f.read()

    def ids(self):
        return [e["id"] for _, _, e in self.events if "id" in e]

    def stop(self, timeout=30):
        """SIGTERM; its exit status (0 expected: stopped by a signal) after its stdout was read."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise Failure(f"conveyor-subscribe --name {self.name} did not exit within {timeout} s of SIGTERM:\n"
                          f"{self.stderr()[-3000:]}")
        self.reader.join(10)
        return rc

    def stop_clean(self):
        eq(self.stop(), 0, f"conveyor-subscribe --name {self.name} stopped by SIGTERM: exit status "
                           f"(stderr: {self.stderr()[-2000:]})")

    def kill(self):
        """SIGKILL to its whole session; returns once it is gone."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.reader.join(10)

    def alive(self):
        if self.proc.poll() is not None:
            raise Failure(f"conveyor-subscribe --name {self.name} exited {self.proc.returncode}:\n"
                          f"{self.stderr()[-3000:]}")
        return True


def created(name, proc, timeout=30):
    """Waits until the subscription's registry row exists (written once its broker
    objects do, §13) while proc runs; returns the row."""
    return wait_for(lambda: proc.alive() and registry(name), timeout, f"subscription {name} registered")


def partition_owners(name):
    """{partition: backend pid} of the partitions' advisory locks held now (§13:
    (hashtext('conveyor.sub.' || name), i), i >= 0)."""
    rows = query("SELECT objid::bigint, pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2 "
                 "AND classid::bigint = (hashtext('conveyor.sub.' || %s)::bigint & 4294967295) "
                 "AND objid::bigint < 64", name)
    return dict(rows)


def products(pub, ev, n, stock=100000, prefix="sub"):
    """n new products (createProduct through the workers), their ids."""
    cmds = [pub.command(envelope("createProduct", {"name": f"{prefix} {i}", "price": "1.00", "stock": stock}))
            for i in range(n)]
    return [ev.wait_result(c["id"], timeout=30)[0]["data"]["productId"] for c in cmds]


def publish_stock(pub, pids, n, change=1):
    """n updateStock commands spread over pids (round robin), the i-th changing the
    stock by change (or change(i)); their ids."""
    return [pub.command(envelope("updateStock", {"productId": pids[i % len(pids)],
                                                 "quantityChange": change(i) if callable(change) else change}))["id"]
            for i in range(n)]


def outbox_events(pids, after_id=0, types=("stock.updated",)):
    """[(outbox id, event id, aggregate id, event type, occurredAt)] of pids' events
    of types above after_id, in outbox (commit) order: what the relay publishes."""
    return [(r[0], str(r[1]), str(r[2]), r[3], r[4]) for r in
            query("SELECT id, event_id, aggregate_id, event_type, payload->>'occurredAt' FROM outbox "
                  "WHERE aggregate_id = ANY(%s::uuid[]) AND id > %s AND event_type = ANY(%s) ORDER BY id",
                  list(pids), after_id, list(types))]


def max_outbox_id():
    return query("SELECT coalesce(max(id), 0) FROM outbox")[0][0]


def wait_published(pids, after_id, n, timeout=300, types=("stock.updated",)):
    """Waits until n events of pids (types, above after_id) are in the outbox and
    published; returns outbox_events()."""
    def done():
        r = query("SELECT count(*), count(published_at) FROM outbox WHERE aggregate_id = ANY(%s::uuid[]) "
                  "AND id > %s AND event_type = ANY(%s)", list(pids), after_id, list(types))[0]
        return r[0] >= n and r[1] == r[0]
    wait_for(done, timeout, f"{n} events in the outbox and published")
    rows = outbox_events(pids, after_id, types)
    eq(len(rows), n, "events in the outbox")
    return rows


def per_aggregate(seq):
    """{aggregate id: [event id, ...]} in the order of seq ((event id, aggregate id) pairs)."""
    out = {}
    for eid, agg in seq:
        out.setdefault(agg, []).append(eid)
    return out


def first_arrivals(subs):
    """Every event the subs printed, first copy only, in the order the test read them:
    [(event id, aggregate id, tag)]."""
    allev = sorted((o, tag, e) for s in subs for o, tag, e in s.events)
    seen, out = set(), []
    for _, tag, e in allev:
        check("unparsable" not in e, f"conveyor-subscribe printed a line that is not JSON: {e}")
        if e["id"] not in seen:
            seen.add(e["id"])
            out.append((e["id"], e["aggregateId"], tag))
    return out


def check_commit_order(arrived, outbox, what):
    """arrived: [(event id, aggregate id, ...)] as handled; each aggregate's events
    in the outbox's id order (commit order)."""
    want = per_aggregate([(r[1], r[2]) for r in outbox])
    got = per_aggregate([(a[0], a[1]) for a in arrived])
    for agg, ids in want.items():
        if got.get(agg) != ids:
            g = got.get(agg, [])
            first = next((i for i, (x, y) in enumerate(zip(g, ids)) if x != y), min(len(g), len(ids)))
            raise Failure(f"{what}: aggregate {agg}'s events out of commit order or missing: first difference at "
                          f"its event {first} of {len(ids)} (got {len(g)} events)")


def admin(*args, conf=CONF):
    return run_bin("conveyor-admin", "-c", conf, *args)


def not_built(r):
    """True when conveyor-admin answered that the command is not there yet: "not
    built yet", or its usage without a word of subscriptions."""
    text = r.stderr + r.stdout
    return "not built yet" in text or (text.startswith("usage:") and "subscriptions" not in text)


# ---- 1. a stop of every process and a broker restart in between ----------------------

def test_events_published_while_every_process_is_stopped_arrive_once_after_a_broker_restart():
    """A subscription's processes are all stopped; 5,000 updateStock go through the
    workers and the relay; then the broker restarts; then two processes start:
    every stock.updated of those commands arrives, each exactly once (by id)."""
    n = 5000
    name = sub_name("stop")
    with Pool(workers=CATALOG4, expect_restarts=True) as pool:
        pub, ev = Publisher(), Events()
        pids = products(pub, ev, 50, prefix="stopped")
        ev.close()
        first = Sub(name, "--partitions", "4", patterns=["stock.updated"], acks=True)
        created(name, first)
        first.stop_clean()
        eq(first.ids(), [], "nothing published yet")
        floor = max_outbox_id()
        publish_stock(pub, pids, n)
        pub.close()
        rows = wait_published(pids, floor, n)
        restart_broker()
        subs = [Sub(name, acks=True, tag=t) for t in ("a", "b")]
        want = {r[1] for r in rows}
        try:
            wait_for(lambda: all(s.alive() for s in subs) and want <= set(i for s in subs for i in s.ids()), 300,
                     f"the {n} events after the restart")
        finally:
            for s in subs:
                s.stop_clean()
        got = [i for s in subs for i in s.ids()]
        extra = set(got) - want
        eq(extra, set(), "events the subscription was not given (other products or types)")
        dups = len(got) - len(set(got))
        eq(dups, 0, "events received twice")
        eq(len(set(got)), n, "events received")
        # (which process got what is not the point here: the first to count itself may take every partition
        # and read the backlog before it hands half of them over)
        check_commit_order(first_arrivals(subs), rows, "after the restart")
        eq(pool.stop(), (0, []), "clean stop")


# ---- 2. a read model with the inbox, its processes killed -9 --------------------------

READ_DB = "subscriber_readmodel"


def read_url():
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(DB_URL)._replace(path="/" + READ_DB, query=""))


def read_query(sql, *args):
    with contextlib.closing(psycopg2.connect(read_url())) as c:
        c.autocommit = True
        cur = c.cursor()
        cur.execute(sql, args or None)
        return cur.fetchall() if cur.description else None


class ReadModel:
    """sub_read_model.py NAME URL TAG in its own session (with its conveyor-subscribe)."""

    def __init__(self, name, tag):
        self.name, self.tag = name, tag
        self.log = log_file(f"sub-read-model-{tag}-")
        self.proc = subprocess.Popen(["/usr/bin/python3", os.path.join(HERE, "sub_read_model.py"), name, read_url(),
                                      tag], stdout=self.log, stderr=self.log, start_new_session=True)

    def output(self):
        with open(self.log.name) as f:
            return f.read()

    def alive(self):
        if self.proc.poll() is not None:
            raise Failure(f"read model {self.tag} exited {self.proc.returncode}:\n{self.output()[-3000:]}")
        return True

    def kill(self):
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            rc = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise Failure(f"read model {self.tag} did not stop within 30 s of SIGTERM:\n{self.output()[-3000:]}")
        eq(rc, 0, f"read model {self.tag} stopped: exit status ({self.output()[-2000:]})")


def test_a_read_model_with_the_inbox_survives_kill_9_of_both_processes():  # faults
    """Two processes of one subscription keep stock per product in their own
    PostgreSQL with the inbox while 20,000 updateStock over 50 products flow; each
    process is killed -9 five times (killed, then started again, alternately, as
    the read model reaches 1/12, 2/12, ... 10/12 of the events): at the end the
    read model equals the products table's stock, the inbox holds one row per
    event, nothing was applied twice, and each product's events were applied in
    commit order (the applied table's seq against the outbox's ids)."""
    n, kills = 20000, 10
    name = sub_name("rm")
    with contextlib.closing(db()) as c, c.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {READ_DB} WITH (FORCE)")
        cur.execute(f"CREATE DATABASE {READ_DB}")
    r = run_bin("conveyor-admin", "subscriber", "install", "--database", read_url())
    eq(r.returncode, 0, f"subscriber install ({r.stderr})")
    sys.path.insert(0, HERE)
    import sub_read_model
    read_query(sub_read_model.SCHEMA)

    def consumed():
        return read_query("SELECT count(*) FROM conveyor.inbox WHERE subscription = %s", name)[0][0]

    with Pool(workers=CATALOG4) as pool:
        pub, ev = Publisher(), Events()
        pids = products(pub, ev, 50, prefix="read model")
        ev.close()
        pub.close()
        # the subscription exists (made by a plain process) before anything is published
        maker = Sub(name, "--partitions", "4", patterns=["stock.*"], acks=True)
        created(name, maker)
        maker.stop_clean()
        floor = max_outbox_id()
        procs = [ReadModel(name, "a"), ReadModel(name, "b")]
        sent = []

        def flow():
            p = Publisher()
            try:
                sent.extend(publish_stock(p, pids, n, change=lambda i: 1 if i % 3 else -1))
            finally:
                p.close()
        t = threading.Thread(target=flow)
        t.start()
        kill_counts = [0, 0]
        try:
            for k in range(kills):
                mark = (k + 1) * n // 12
                wait_for(lambda: all(p.alive() for p in procs) and consumed() >= mark, 300,
                         f"the read model at {mark} events (kill {k + 1})")
                i = k % 2
                procs[i].kill()
                kill_counts[i] += 1
                procs[i] = ReadModel(name, "ab"[i] + str(kill_counts[i]))
            t.join()
            eq(len(sent), n, "commands published")
            rows = wait_published(pids, floor, n, types=("stock.updated", "stock.low", "stock.depleted"))
            wait_for(lambda: all(p.alive() for p in procs) and consumed() >= n, 300, f"the read model at {n} events")
        finally:
            t.join()
            for p in procs:
                if p.proc.poll() is None:
                    p.stop()
        eq(kill_counts, [5, 5], "kills -9 per process")
        eq(consumed(), len(rows), "the inbox's rows: one per event")
        applied = read_query("SELECT event_id::text, product_id::text, tag FROM public.applied ORDER BY seq")
        eq(len(applied), len(rows), "events applied (none twice: event_id is unique in applied, and the inbox's count)")
        eq({a[0] for a in applied}, {r[1] for r in rows}, "the events applied are the outbox's")
        check_commit_order(applied, rows, "the read model")
        tags = {a[2][0] for a in applied}
        eq(tags, {"a", "b"}, "both processes applied events")
        model = dict(read_query("SELECT product_id::text, stock FROM public.read_stock"))
        truth = dict(query("SELECT id::text, stock FROM products WHERE id = ANY(%s::uuid[])", pids))
        eq(model, truth, "the read model's stock against the products table")
        eq(pool.stop(), (0, []), "clean stop")


# ---- 3. --exec: retries, dead letters, a retry from conveyor-admin --------------------

EXEC_SCRIPT = """#!/bin/sh
# per event: count the attempts; fail the first two; the third writes the event
d='{dir}'
f="$d/$CONVEYOR_EVENT_ID"
n=$(cat "$f.n" 2>/dev/null || echo 0)
n=$((n + 1))
echo $n > "$f.n"
echo "$CONVEYOR_ATTEMPT $(date +%s.%N) $CONVEYOR_SUBSCRIPTION $CONVEYOR_EVENT_TYPE" >> "$f.attempts"
[ $n -ge {ok_from} ] || exit 1
cat > "$f.event"
echo "$CONVEYOR_EVENT_ID" >> "$d/successes"
"""


def exec_script(d, ok_from):
    path = os.path.join(d, f"handler{ok_from}.sh")
    with open(path, "w") as f:
        f.write(EXEC_SCRIPT.format(dir=d, ok_from=ok_from))
    os.chmod(path, 0o755)
    return path


def attempts_of(d, eid):
    """[(CONVEYOR_ATTEMPT, time, subscription, type)] of the handler's runs for event eid."""
    try:
        with open(os.path.join(d, eid + ".attempts")) as f:
            return [(int(a), float(t), s, ty) for a, t, s, ty in (line.split() for line in f)]
    except FileNotFoundError:
        return []


def successes(d):
    try:
        with open(os.path.join(d, "successes")) as f:
            return f.read().split()
    except FileNotFoundError:
        return []


def test_exec_retries_with_backoff_dead_letters_and_a_retry_from_admin():
    """--exec with a command failing the first two times per event: each event
    handled once, attempts 1, 2, 3 spaced by at least the backoff (100 ms, then 200
    ms), each aggregate's events succeeded in commit order. A command that always
    fails: after --max-attempts 3 each event is in subscription_dead; then
    `conveyor-admin subscriptions retry NAME --all` with a command that now
    succeeds handles each once and the dead rows are gone."""
    name, dead_name = sub_name("exec"), sub_name("dead")
    with Pool() as pool, tempfile.TemporaryDirectory(prefix="conveyor-exec-") as d, \
            tempfile.TemporaryDirectory(prefix="conveyor-dead-") as d2:
        os.chmod(d, 0o755)
        pub, ev = Publisher(), Events()
        pids = products(pub, ev, 4, prefix="exec")
        ev.close()
        opts = ("--max-attempts", "5", "--retry-base-ms", "100")
        s = Sub(name, "--exec", exec_script(d, 3), *opts, patterns=["stock.updated"])
        created(name, s)
        floor = max_outbox_id()
        publish_stock(pub, pids, 20)
        rows = wait_published(pids, floor, 20)
        want = [r[1] for r in rows]
        try:
            wait_for(lambda: s.alive() and set(want) <= set(successes(d)), 60, "20 events handled by --exec")
        finally:
            s.stop_clean()
        eq(sorted(successes(d)), sorted(want), "each event handled once (the successes, by id)")
        for eid in want:
            a = attempts_of(d, eid)
            eq([x[0] for x in a], [1, 2, 3], f"CONVEYOR_ATTEMPT of event {eid}'s runs")
            eq({(x[2], x[3]) for x in a}, {(name, "stock.updated")}, "CONVEYOR_SUBSCRIPTION, CONVEYOR_EVENT_TYPE")
            check(a[1][1] - a[0][1] >= 0.09 and a[2][1] - a[1][1] >= 0.19,
                  f"event {eid}: retried after the backoff (100 ms, then 200 ms): runs at {[x[1] for x in a]}")
            with open(os.path.join(d, eid + ".event")) as f:
                eq(json.loads(f.read())["id"], eid, "the event JSON on stdin is the event of CONVEYOR_EVENT_ID")
        by_id = {r[1]: r[2] for r in rows}
        check_commit_order([(i, by_id[i]) for i in successes(d)], rows, "--exec's successes")

        # a command that always fails: dead letters after 3 attempts
        s = Sub(dead_name, "--exec", exec_script(d, 99), "--max-attempts", "3", "--retry-base-ms", "100",
                patterns=["stock.updated"])
        created(dead_name, s)
        floor = max_outbox_id()
        publish_stock(pub, pids[:3], 3)
        pub.close()
        dead_ids = sorted(r[1] for r in wait_published(pids[:3], floor, 3))
        try:
            dead = wait_for(lambda: s.alive() and (lambda r: r if len(r) == 3 else None)(
                query("SELECT event_id::text, attempts, event FROM subscription_dead WHERE subscription = %s "
                      "ORDER BY event_id", dead_name)), 60, "3 events in subscription_dead")
        finally:
            s.stop_clean()
        eq([x[0] for x in dead], dead_ids, "the dead letters are the 3 events")
        eq([x[1] for x in dead], [3, 3, 3], "attempts of each dead letter")
        eq([json.loads(x[2])["id"] for x in dead], dead_ids, "each dead letter keeps its event")
        for eid in dead_ids:
            eq([x[0] for x in attempts_of(d, eid)], [1, 2, 3], f"event {eid}: the runs of the command that fails")

        s = Sub(dead_name, "--exec", exec_script(d2, 1), "--max-attempts", "3", "--retry-base-ms", "100")
        try:
            wait_for(lambda: s.alive() and partition_owners(dead_name), 30, "the new process owns partitions")
            r = admin("subscriptions", "retry", dead_name, "--all")
            if r.returncode != 0 and not_built(r):
                print(f"conveyor-admin subscriptions retry is not there yet ({r.stderr.strip()}): "
                      "retry_requested_at set by SQL instead", file=sys.stderr)
                query("UPDATE subscription_dead SET retry_requested_at = now() WHERE subscription = %s", dead_name)
            else:
                eq(r.returncode, 0, f"conveyor-admin subscriptions retry {dead_name} --all ({r.stderr})")
            wait_for(lambda: s.alive() and set(dead_ids) <= set(successes(d2)), 30, "the retried events handled")
            wait_for(lambda: query("SELECT count(*) FROM subscription_dead WHERE subscription = %s",
                                   dead_name)[0][0] == 0, 30, "the dead rows deleted once handled")
        finally:
            s.stop_clean()
        eq(sorted(successes(d2)), dead_ids, "each retried event handled once")
        for eid in dead_ids:
            eq(len(attempts_of(d2, eid)), 1, f"event {eid}: one run of the command that succeeds")
        eq(pool.stop(), (0, []), "clean stop")


# ---- 4. replay: --from -----------------------------------------------------------------

def collect(subs_want, timeout=60):
    """{sub: set of event ids it must print}: waits until each printed them, then
    1.5 s more (a copy or an extra event would show), and stops each."""
    try:
        wait_for(lambda: all(s.alive() and want <= set(s.ids()) for s, want in subs_want.items()), timeout,
                 "the replayed events: " + ", ".join(f"{s.name} has {len(set(s.ids()) & w)}/{len(w)}"
                                                     for s, w in subs_want.items()))
        time.sleep(1.5)
    finally:
        for s in subs_want:
            s.stop_clean()


def test_from_an_event_id_a_time_and_oldest_replays_exactly_the_events_after_it():
    """Published events first (30 stock.updated over 3 products); then new
    subscriptions --from the 12th's event id, --from the 20th's occurredAt, --from
    oldest, and one with no --from; then 6 more. Each prints exactly the outbox's
    stock.updated after its start (id > the event's; occurredAt > the time; every
    one the outbox keeps; only the 6 later), each aggregate's in commit order.
    --from with another value for an existing subscription, a time older than 30
    days, an unknown event id: refused (exit 2)."""
    query("DELETE FROM outbox WHERE published_at IS NOT NULL")  # --from oldest: only this test's events
    with Pool() as pool:
        pub, ev = Publisher(), Events()
        pids = products(pub, ev, 3, prefix="replay")
        ev.close()
        publish_stock(pub, pids, 30)
        before = wait_published(pids, 0, 30)
        after_event = before[11]
        at_time = before[19][4]
        check(at_time and at_time.endswith("Z"), f"occurredAt is an RFC 3339 time: {at_time}")
        names = {k: sub_name(k) for k in ("id", "time", "oldest", "newest")}
        subs = {"id": Sub(names["id"], "--from", after_event[1], patterns=["stock.updated"]),
                "time": Sub(names["time"], "--from", at_time, patterns=["stock.updated"]),
                "oldest": Sub(names["oldest"], "--from", "oldest", patterns=["stock.updated"]),
                "newest": Sub(names["newest"], patterns=["stock.updated"])}
        for k, s in subs.items():
            created(names[k], s)
        floor = max_outbox_id()
        publish_stock(pub, pids, 6)
        pub.close()
        live = wait_published(pids, floor, 6)
        allrows = before + live
        want_rows = {"id": [r for r in allrows if r[0] > after_event[0]],
                     "time": [r for r in allrows if r[0] in {x[0] for x in query(
                         "SELECT id FROM outbox WHERE id = ANY(%s) AND (payload->>'occurredAt')::timestamptz > %s",
                         [r[0] for r in allrows], at_time)}],
                     "oldest": allrows, "newest": live}
        check(0 < len(want_rows["time"]) < len(allrows), f"the time {at_time} splits the events")
        collect({subs[k]: {r[1] for r in want_rows[k]} for k in subs})
        for k, s in subs.items():
            got = s.ids()
            eq(len(got) - len(set(got)), 0, f"--from {k}: events printed twice")
            eq(set(got) - {r[1] for r in want_rows[k]}, set(), f"--from {k}: events printed beyond the ones after it")
            eq(len(got), len(want_rows[k]), f"--from {k}: events printed")
            check_commit_order(first_arrivals([s]), want_rows[k], f"--from {k}")
        eq(registry(names["id"])["start_from"], after_event[1], "the registry keeps where it started")

        # --from given again: the same value is ignored, another refused (exit 2, naming the value it was created with)
        r = run_bin("conveyor-subscribe", "-c", CONF, "--name", names["id"], "--from", after_event[1], "-t", "1")
        eq(r.returncode, 4, f"--from with the value it was created with: ignored, then the timeout ({r.stderr})")
        r = run_bin("conveyor-subscribe", "-c", CONF, "--name", names["id"], "--from", "oldest", "-t", "5")
        eq(r.returncode, 2, f"--from oldest for a subscription created --from an event id: refused ({r.stderr})")
        check(after_event[1] in r.stderr, f"the refusal names the value it was created with: {r.stderr}")
        r = run_bin("conveyor-subscribe", "-c", CONF, "--name", names["newest"], "--from", at_time, "-t", "5")
        eq(r.returncode, 2, f"--from a time for a subscription created newest: refused ({r.stderr})")
        # older than the inbox's window (30 days), an event id the outbox does not hold: refused, nothing made
        old = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=31)).strftime(
            "%Y-%m-%dT%H:%M:%SZ")
        for what, value in (("a time 31 days ago", old), ("an unknown event id", new_id())):
            n = sub_name("refused")
            r = run_bin("conveyor-subscribe", "-c", CONF, "--name", n, "--from", value, "-t", "5", "stock.updated")
            eq(r.returncode, 2, f"--from {what}: refused ({r.stderr})")
            eq(registry(n), None, f"--from {what}: no subscription made")
        eq(pool.stop(), (0, []), "clean stop")


# ---- 5. lag ----------------------------------------------------------------------------

def broker_lag(name, partitions):
    """The broker's own count of what the subscription has not settled: RabbitMQ, the
    messages in its queues conveyor.sub.<name>.<i> (passive declares); Redis, the
    largest pending + entries after the last-delivered-id of its groups
    sub:<name>:<i> on conveyor:events: XINFO GROUPS' lag when Redis knows it, the
    entries counted with XRANGE when it says nil (§13: a group created at an id
    whose entries-read Redis does not know)."""
    if TRANSPORT == "rabbitmq":
        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        try:
            ch = conn.channel()
            return sum(ch.queue_declare(f"conveyor.sub.{name}.{i}", passive=True).method.message_count
                       for i in range(partitions))
        finally:
            conn.close()
    r = redislib.Redis.from_url(REDIS_URL)
    groups = {g["name"].decode(): g for g in r.xinfo_groups("conveyor:events")}
    want = [f"sub:{name}:{i}" for i in range(partitions)]
    check(set(want) <= set(groups), f"the consumer groups {want} exist: {sorted(groups)}")
    counts = []
    for g in want:
        lag = groups[g]["lag"]
        if lag is None:
            last = groups[g]["last-delivered-id"].decode()
            lag = len(r.xrange("conveyor:events", min="(" + last, max="+"))
        counts.append(lag + groups[g]["pending"])
    return max(counts)


def broker_pending(name, partitions):
    """Redis: the entries its groups sub:<name>:<i> were given and have not acknowledged."""
    r = redislib.Redis.from_url(REDIS_URL)
    return sum(r.xpending("conveyor:events", f"sub:{name}:{i}")["pending"] for i in range(partitions))


def admin_lag(name, conf):
    r = admin("--json", "subscriptions", conf=conf)
    eq(r.returncode, 0, f"conveyor-admin --json subscriptions ({r.stderr})")
    for line in r.stdout.splitlines():
        o = json.loads(line)
        if o.get("kind") == "subscription" and (o.get("name") or o.get("subscription")) == name:
            return o
    raise Failure(f"conveyor-admin --json subscriptions does not list {name}:\n{r.stdout[-2000:]}")


def metric_lag(pool, name):
    from test_metrics import scrape
    samples, _ = scrape(pool)
    return samples.get(("conveyor_subscription_lag", frozenset({("subscription", name)})))


def stopped_with_backlog(name, n, prefix):
    """Creates the subscription name (4 partitions, stock.updated), stops its
    process, then publishes n stock.updated over 10 new products through the
    running pool and waits until the relay has published them all: n events
    wait for name, no process of it runs."""
    pub, ev = Publisher(), Events()
    pids = products(pub, ev, 10, prefix=prefix)
    ev.close()
    s = Sub(name, "--partitions", "4", patterns=["stock.updated"])
    created(name, s)
    s.stop_clean()
    floor = max_outbox_id()
    publish_stock(pub, pids, n)
    pub.close()
    wait_published(pids, floor, n)


def test_lag_equals_the_brokers_count():
    """Processes stopped, then 300 stock.updated published: the lag from
    `conveyor-admin --json subscriptions` and conveyor_subscription_lag (once a
    pool's count ran) equal the broker's own count, which is 300; once a running
    process printed them all, all three are 0."""
    n = 300
    name = sub_name("lag")
    with http_pool(workers=CATALOG4) as pool:
        stopped_with_backlog(name, n, "lag")
        # the broker has them all (RabbitMQ routes on publish; the relay's publish is confirmed)
        counted = wait_for(lambda: (lambda c: c if c == n else None)(broker_lag(name, 4)), 10,
                           f"the broker's count at {n}")
        o = admin_lag(name, pool.config)
        eq(o.get("lag"), counted, f"conveyor-admin subscriptions' lag against the broker's count ({o})")
        check(o.get("oldestAgeSeconds", 0) > 0, f"an oldest age while {n} wait: {o}")
        wait_for(lambda: metric_lag(pool, name) == counted, 30,
                 f"conveyor_subscription_lag{{subscription=\"{name}\"}} {counted}")
        s = Sub(name)
        try:
            wait_for(lambda: s.alive() and len(set(s.ids())) >= n, 60, f"a process printed the {n} events")
            wait_for(lambda: broker_lag(name, 4) == 0, 30, "the broker's count at 0 once printed (and acked)")
            o = admin_lag(name, pool.config)
            eq((o.get("lag"), o.get("oldestAgeSeconds")), (0, 0), f"conveyor-admin subscriptions' lag and oldest "
               f"age once read ({o})")
            wait_for(lambda: metric_lag(pool, name) == 0, 30, "conveyor_subscription_lag 0 once read")
        finally:
            s.stop_clean()
        eq(len(s.ids()), n, "events printed")
        eq(pool.stop(), (0, []), "clean stop")


def test_an_exit_after_count_leaves_nothing_it_printed_unacknowledged():
    """Plain mode acknowledges each event once written (§13's CLI): 300 events
    waiting, `conveyor-subscribe --name N -n 300` prints them and exits 0; then the
    broker holds none of them, and a next run gets nothing again. (On RabbitMQ
    3.10 the last acks sent before the consume connection closes are sometimes
    dropped by the quorum queues, rabbitmq/rabbitmq-server#10327: the events come
    again; a process that closes at once after its acks shows it.)"""
    n = 300
    name = sub_name("count")
    with Pool(workers=CATALOG4) as pool:
        stopped_with_backlog(name, n, "count")
        wait_for(lambda: broker_lag(name, 4) == n, 10, f"the broker's count at {n}")
        s = Sub(name, "-n", str(n))
        eq(s.proc.wait(60), 0, f"-n {n}: exit status once {n} were printed ({s.stderr()[-2000:]})")
        s.reader.join(10)
        eq(len(set(s.ids())), n, "events printed")
        # what it received and did not acknowledge: RabbitMQ's messages left in the queues
        # (none may wait: the 300 were all it had); Redis's pending entries (the groups of the
        # partitions that were done may not have read the stream's other entries yet: that
        # is lag, not unacknowledged)
        left = broker_lag(name, 4) if TRANSPORT == "rabbitmq" else broker_pending(name, 4)
        again = run_bin("conveyor-subscribe", "-c", CONF, "--name", name, "-t", "3")
        eq(again.returncode, 4, f"the next run: nothing, then the timeout ({again.stderr})")
        printed_again = [json.loads(x)["id"] for x in again.stdout.splitlines()]
        eq((left, len(printed_again)), (0, 0), f"events printed and acknowledged before the exit of -n {n}, still "
           f"in the broker (and delivered again to the next run: {len(set(printed_again) & set(s.ids()))} of them "
           "printed before)")
        eq(pool.stop(), (0, []), "clean stop")


# ---- 6. two processes share the partitions, each aggregate in order -------------------

def test_two_processes_share_the_partitions_and_keep_each_aggregates_order():
    """Two processes of a subscription of 4 partitions: once each owns partitions
    (their advisory locks), 2,000 updateStock over 20 products: each process gets
    some, every event arrives, each aggregate's in commit order, and each
    aggregate is handled by one process."""
    n = 2000
    name = sub_name("share")
    with Pool(workers=CATALOG4) as pool:
        pub, ev = Publisher(), Events()
        pids = products(pub, ev, 20, prefix="share")
        ev.close()
        a = Sub(name, "--partitions", "4", patterns=["stock.updated"], acks=True, tag="a")
        created(name, a)
        b = Sub(name, acks=True, tag="b")
        subs = [a, b]
        try:
            owners = wait_for(lambda: all(s.alive() for s in subs) and (
                lambda o: o if len(o) == 4 and len(set(o.values())) == 2 else None)(partition_owners(name)), 30,
                "the 4 partitions owned by the two processes, two each")
            eq(sorted(list(owners.values()).count(p) for p in set(owners.values())), [2, 2],
               "each process owns ceil(4 / 2) = 2 partitions")
            floor = max_outbox_id()
            publish_stock(pub, pids, n)
            pub.close()
            rows = wait_published(pids, floor, n)
            want = {r[1] for r in rows}
            wait_for(lambda: all(s.alive() for s in subs) and want <= set(a.ids()) | set(b.ids()), 120,
                     f"the {n} events")
        finally:
            for s in subs:
                s.stop_clean()
        got = a.ids() + b.ids()
        eq(len(got) - len(set(got)), 0, "events received twice")
        eq(set(got), want, "the events received")
        check(a.ids() and b.ids(), f"both processes got events: {len(a.ids())}, {len(b.ids())}")
        arrived = first_arrivals(subs)
        check_commit_order(arrived, rows, "two processes")
        handlers = {}
        for _, agg, tag in arrived:
            handlers.setdefault(agg, set()).add(tag)
        eq({agg: len(t) for agg, t in handlers.items() if len(t) > 1}, {}, "aggregates handled by both processes")
        eq(pool.stop(), (0, []), "clean stop")
