"""The subscriber's inbox (docs/contract.md §12): conveyor-admin subscriber
install puts conveyor.inbox and conveyor.consume into a subscriber's own
PostgreSQL; consume is true the first time an event is consumed and false for
a duplicate, and it commits or rolls back with the subscriber's effect."""
import threading
import time
import uuid

import psycopg2

from harness import DB_URL, check, eq, run_bin

SUBSCRIBER_DB = "subscriber_test"


def subscriber_url():
    return DB_URL.rsplit("/", 1)[0] + "/" + SUBSCRIBER_DB


def fresh_database():
    """An empty subscriber database with a read model of its own."""
    admin = psycopg2.connect(DB_URL)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {SUBSCRIBER_DB} WITH (FORCE)")
        cur.execute(f"CREATE DATABASE {SUBSCRIBER_DB}")
    admin.close()
    conn = psycopg2.connect(subscriber_url())
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE public.stock (product text PRIMARY KEY, quantity int NOT NULL)")
        cur.execute("INSERT INTO public.stock VALUES ('p1', 0)")
    return conn


def install():
    r = run_bin("conveyor-admin", "subscriber", "install", "--database", subscriber_url())
    eq(r.returncode, 0, f"subscriber install: exit status; stderr: {r.stderr}")
    return r


def apply(conn, subscription, event_id, change):
    """The subscriber's handler: its effect and the event's dedup in one
    transaction. Returns whether the effect was applied."""
    with conn:
        with conn.cursor() as cur:
            cur.execute("SELECT conveyor.consume(%s, %s)", (subscription, event_id))
            if not cur.fetchone()[0]:
                return False
            cur.execute("UPDATE public.stock SET quantity = quantity + %s WHERE product = 'p1'", (change,))
            return True


def stock(conn):
    with conn.cursor() as cur:
        cur.execute("SELECT quantity FROM public.stock WHERE product = 'p1'")
        return cur.fetchone()[0]


def test_install_is_idempotent_and_versioned():
    conn = fresh_database()
    try:
        first = install()
        check("installed (1 migration applied)" in first.stdout, f"first install says so: {first.stdout!r}")
        again = install()
        check("up to date (0 migrations applied)" in again.stdout, f"second install changes nothing: {again.stdout!r}")
        with conn.cursor() as cur:
            cur.execute("SELECT version FROM conveyor.schema_migrations ORDER BY version")
            eq([r[0] for r in cur.fetchall()], ["subscriber/0001_inbox.sql"], "the inbox's migrations, recorded")
        r = run_bin("conveyor-admin", "subscriber", "install")
        eq(r.returncode, 2, "subscriber install without --database: a usage error")
        check("--database URL" in r.stderr, f"the usage names --database: {r.stderr!r}")
    finally:
        conn.close()


def test_consume_is_true_once_and_goes_with_the_effect():
    conn = fresh_database()
    try:
        install()
        ev = str(uuid.uuid4())
        check(apply(conn, "read-model", ev, 5), "the first delivery is applied")
        check(not apply(conn, "read-model", ev, 5), "a redelivery is a duplicate")
        eq(stock(conn), 5, "the effect, once")
        check(apply(conn, "audit", ev, 1), "another subscription consumes the same event on its own")
        eq(stock(conn), 6, "each subscription's effect once")
        # a handler that fails after consume: the dedup row rolls back with the effect
        ev2 = str(uuid.uuid4())
        try:
            with conn:
                with conn.cursor() as cur:
                    cur.execute("SELECT conveyor.consume('read-model', %s)", (ev2,))
                    check(cur.fetchone()[0], "consumed inside the failing transaction")
                    cur.execute("UPDATE public.stock SET quantity = quantity + 100 WHERE product = 'p1'")
                    raise RuntimeError("the handler crashed")
        except RuntimeError:
            pass
        eq(stock(conn), 6, "the crashed handler's effect is gone")
        check(apply(conn, "read-model", ev2, 100), "the event redelivered after the crash is applied")
        eq(stock(conn), 106, "and applied once")
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM conveyor.inbox")
            eq(cur.fetchone()[0], 3, "inbox rows: two events of read-model, one of audit")
        for bad in (("", ev), (None, ev), ("read-model", None)):
            try:
                with conn:
                    with conn.cursor() as cur:
                        cur.execute("SELECT conveyor.consume(%s, %s)", bad)
                raise AssertionError(f"consume{bad} was accepted")
            except psycopg2.Error as e:
                eq(e.pgcode, "22023", f"consume{bad}: SQLSTATE")
                check("conveyor.consume" in e.pgerror, f"the message names the function: {e.pgerror}")
    finally:
        conn.close()


def test_two_handlers_of_one_event_apply_it_once():
    """Two processes handle copies of one event at once: the second waits on the
    first's row; it applies the event if the first rolls back, not if it commits."""
    conn = fresh_database()
    other = psycopg2.connect(subscriber_url())
    one = psycopg2.connect(subscriber_url())  # not autocommit: its transaction stays open
    try:
        install()
        for first_commits in (True, False):
            ev = str(uuid.uuid4())
            before = stock(conn)
            first = one.cursor()
            first.execute("SELECT conveyor.consume('read-model', %s)", (ev,))
            check(first.fetchone()[0], "the first handler consumes")
            first.execute("UPDATE public.stock SET quantity = quantity + 1 WHERE product = 'p1'")
            result = {}

            def second():
                result["applied"] = apply(other, "read-model", ev, 1)
            t = threading.Thread(target=second)
            t.start()
            time.sleep(0.5)
            check(t.is_alive(), "the second handler waits for the first's transaction")
            if first_commits:
                one.commit()
            else:
                one.rollback()
            t.join(30)
            check(not t.is_alive(), "the second handler went on once the first ended")
            eq(result.get("applied"), not first_commits,
               f"the second applies it only when the first rolled back (first commits: {first_commits})")
            eq(stock(conn), before + 1, f"the event's effect once (first commits: {first_commits})")
    finally:
        one.close()
        other.close()
        conn.close()


def test_rows_past_the_window_are_pruned():
    conn = fresh_database()
    try:
        install()
        with conn.cursor() as cur:
            cur.execute("SELECT conveyor.inbox_window()")
            eq(str(cur.fetchone()[0]), "30 days, 0:00:00", "the documented window")
            cur.execute("INSERT INTO conveyor.inbox (subscription, event_id, consumed_at) "
                        "SELECT 'old', gen_random_uuid(), now() - interval '31 days' FROM generate_series(1, 250)")
            cur.execute("INSERT INTO conveyor.inbox (subscription, event_id, consumed_at) "
                        "SELECT 'new', gen_random_uuid(), now() - interval '29 days' FROM generate_series(1, 10)")
            cur.execute("SELECT conveyor.inbox_prune(100)")
            eq(cur.fetchone()[0], 100, "a prune deletes at most max_rows")
            cur.execute("SELECT conveyor.inbox_prune()")
            eq(cur.fetchone()[0], 150, "then the rest past the window")
            cur.execute("SELECT subscription, count(*) FROM conveyor.inbox GROUP BY 1")
            eq(dict(cur.fetchall()), {"new": 10}, "rows inside the window stay")
        r = run_bin("conveyor-admin", "subscriber", "status", "--database", subscriber_url())
        eq(r.returncode, 0, f"subscriber status: {r.stderr}")
        check("subscription new: 10 events" in r.stdout, f"status counts per subscription: {r.stdout!r}")
    finally:
        conn.close()
