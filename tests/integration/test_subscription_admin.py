"""The operator's side of durable subscriptions (docs/contract.md §13):
conveyor-admin subscriptions [list] | remove | dead | retry, the pools' count
into the registry, /metrics' conveyor_subscription_* and GET /api/subscriptions.

The test makes a subscription's broker objects itself, by §13's names
(RabbitMQ: the hash exchange conveyor.sub.NAME bound to conveyor.events and
its partition queues conveyor.sub.NAME.i; Redis: the groups sub:NAME:i on
conveyor:events) and its registry row by SQL, so that it depends on nothing
but the contract; events come through the real relay (commands a pool
applies). Every figure is held to the broker's own count of the same objects
(RabbitMQ: passive declares through pika; Redis: XINFO GROUPS)."""
import http.client
import json
import os
import uuid

import pika
import psycopg2
import redis as redislib

from harness import (AMQP_URL, DB_URL, REDIS_URL, ROOT, TRANSPORT, Events, Publisher, check, envelope,
                     eq, http_pool, query, run_bin)

from prometheus_client.parser import text_string_to_metric_families
from test_delayed import wait_for as delayed_wait_for

PARTITIONS = 3
CONFIG = os.path.join(ROOT, "queues.conf")


def admin(*args):
    return run_bin("conveyor-admin", "-c", CONFIG, *args)


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def wait_for(what, fn, timeout=40):
    """fn()'s value once it is truthy (the pools count every 5 s): test_delayed's wait_for."""
    return delayed_wait_for(fn, timeout, what)


# ---- a subscription made by §13's names --------------------------------------------

def amqp():
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    return conn, conn.channel()


def rds():
    return redislib.Redis.from_url(REDIS_URL)


def make_subscription(name, patterns=("#",), partitions=PARTITIONS):
    """Its broker objects, then its registry row (as the process that creates one does)."""
    if TRANSPORT == "rabbitmq":
        conn, ch = amqp()
        ch.exchange_declare("conveyor.events", "topic", durable=True)
        ex = f"conveyor.sub.{name}"
        ch.exchange_declare(ex, "x-consistent-hash", durable=True, arguments={"hash-header": "x-conveyor-aggregate"})
        for p in patterns:
            ch.exchange_bind(ex, "conveyor.events", p)
        for i in range(partitions):
            q = f"conveyor.sub.{name}.{i}"
            ch.queue_declare(q, durable=True, arguments={"x-queue-type": "quorum", "x-single-active-consumer": True})
            ch.queue_bind(q, ex, "1")
        conn.close()
    else:
        r = rds()
        for i in range(partitions):
            r.xgroup_create("conveyor:events", f"sub:{name}:{i}", id="$", mkstream=True)
    query("INSERT INTO subscriptions (name, transport, patterns, partitions) VALUES (%s, %s, %s, %s)",
          name, TRANSPORT, list(patterns), partitions)


def broker_lag(name, partitions=PARTITIONS):
    """The broker's own count: RabbitMQ, the ready messages of the partition
    queues (passive declares); Redis, the largest lag + pending of the groups."""
    if TRANSPORT == "rabbitmq":
        conn, ch = amqp()
        try:
            return sum(ch.queue_declare(f"conveyor.sub.{name}.{i}", passive=True).method.message_count
                       for i in range(partitions))
        finally:
            conn.close()
    r = rds()
    groups = {g["name"].decode(): g for g in r.xinfo_groups("conveyor:events")}

    def unread(g):  # lag is nil while Redis 7.0 does not know the group's entries-read: counted then
        if g["lag"] is not None:
            return g["lag"]
        return len(r.xrange("conveyor:events", min="(" + g["last-delivered-id"].decode(), max="+"))
    return max(unread(groups[f"sub:{name}:{i}"]) + groups[f"sub:{name}:{i}"]["pending"] for i in range(partitions))


def broker_objects(name, partitions=PARTITIONS):
    """Which of its broker objects exist: (queues or groups, the exchange on RabbitMQ)."""
    if TRANSPORT == "rabbitmq":
        found = []
        for n in [f"conveyor.sub.{name}.{i}" for i in range(partitions)] + [f"conveyor.sub.{name}"]:
            conn, ch = amqp()
            try:
                if n.rsplit(".", 1)[1].isdigit():
                    ch.queue_declare(n, passive=True)
                else:
                    ch.exchange_declare(n, passive=True)
                found.append(n)
            except pika.exceptions.ChannelClosedByBroker as e:
                check(e.reply_code == 404, f"passive declare of {n}: {e}")
            finally:
                if conn.is_open:
                    conn.close()
        return found
    return [g["name"].decode() for g in rds().xinfo_groups("conveyor:events")
            if g["name"].decode().startswith(f"sub:{name}:")]


def publish_products(n):
    """n createProducts applied by the pool; returns once their events are published."""
    pub, ev = Publisher(), Events()
    try:
        ids = [pub.command(envelope("createProduct", {"name": f"Sub lamp {k}", "price": "1.00", "stock": 1}))["id"]
               for k in range(n)]
        for cid in ids:
            ev.wait_result(cid, timeout=30)
    finally:
        pub.close()
        ev.close()


def remove_quietly(name):
    query("DELETE FROM subscriptions WHERE name = %s", name)
    if TRANSPORT == "rabbitmq":
        conn, ch = amqp()
        for i in range(PARTITIONS):
            ch.queue_delete(f"conveyor.sub.{name}.{i}")
        ch.exchange_delete(f"conveyor.sub.{name}")
        conn.close()
    else:
        r = rds()
        for i in range(PARTITIONS):
            try:
                r.xgroup_destroy("conveyor:events", f"sub:{name}:{i}")
            except redislib.ResponseError:
                pass


def fresh_name(what):
    return f"{what}-{TRANSPORT[:2]}-{uuid.uuid4().hex[:8]}"


# ---- the HTTP side -------------------------------------------------------------------

def get(pool, path):
    c = http.client.HTTPConnection("127.0.0.1", pool.port, timeout=10)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read().decode()
    finally:
        c.close()


def sub_metrics(pool, name):
    """{metric: value} of conveyor_subscription_*{subscription=name} in /metrics."""
    status, body = get(pool, "/metrics")
    eq(status, 200, "/metrics status")
    out = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            if s.name.startswith("conveyor_subscription_") and s.labels.get("subscription") == name:
                out[s.name] = s.value
    return out


def listed(name):
    r = admin("subscriptions", "--json")
    eq(r.returncode, 0, f"subscriptions --json: exit status; stderr: {r.stderr}")
    rows = [o for o in json_lines(r.stdout) if o.get("name") == name]
    eq(len(rows), 1, f"subscription {name} listed once")
    eq(rows[0]["kind"], "subscription", "kind")
    return rows[0]


# ---- the cases ---------------------------------------------------------------------------

def test_list_counts_on_the_broker_and_the_pools_count_into_metrics():
    name = fresh_name("lag")
    make_subscription(name, patterns=("product.#",))
    try:
        with http_pool() as pool:
            publish_products(5)
            want = before = broker_lag(name)
            check(want >= 5, f"the broker holds the 5 product.created events for {name}: {want}")
            if TRANSPORT == "redis":
                # partition 0 reads two entries and settles none (pending), partitions 1 and 2 settle
                # one each: the largest lag + pending is partition 0's, and only with its pending
                r = rds()
                got = r.xreadgroup(f"sub:{name}:0", f"{name}:0", {"conveyor:events": ">"}, count=2)
                eq(len(got[0][1]), 2, "two entries read by partition 0")
                for i in (1, 2):
                    got = r.xreadgroup(f"sub:{name}:{i}", f"{name}:{i}", {"conveyor:events": ">"}, count=1)
                    r.xack("conveyor:events", f"sub:{name}:{i}", got[0][1][0][0])
                want = broker_lag(name)
                eq(want, before, "partition 0's lag + pending is what was published")
                oldest_id = r.xpending("conveyor:events", f"sub:{name}:0")["min"].decode()
                t0 = r.time()
            row = listed(name)
            if TRANSPORT == "redis":
                t1 = rds().time()
            eq(row["lag"], want, "lag: the broker's own count")
            eq(row["countedFrom"], "broker", "counted at once")
            eq(row["transport"], TRANSPORT, "transport")
            eq(row["patterns"], ["product.#"], "patterns")
            eq(row["partitions"], PARTITIONS, "partitions")
            eq(row["from"], "newest", "from")
            eq(row["dead"], 0, "no dead letter")
            eq(row["gap"], False, "no gap")
            if TRANSPORT == "redis":
                ms = int(oldest_id.split("-")[0])
                lo, hi = (t0[0] * 1000 + t0[1] // 1000 - ms) / 1000, (t1[0] * 1000 + t1[1] // 1000 - ms) / 1000
                check(lo - 0.001 <= row["oldestAgeSeconds"] <= hi + 0.001,
                      f"the oldest unsettled entry's age {row['oldestAgeSeconds']} between {lo} and {hi}")
            else:
                eq(row["consumers"], 0, "no consumer of its queues")
                (age,) = query("SELECT extract(epoch FROM now() - created_at)::float FROM subscriptions "
                               "WHERE name = %s", name)[0]
                check(0 < row["oldestAgeSeconds"] <= age,
                      f"never seen empty: the oldest is at most the subscription's age ({row['oldestAgeSeconds']}, {age})")
            text = admin("subscriptions")
            eq(text.returncode, 0, f"subscriptions: exit status; stderr: {text.stderr}")
            check(f"subscription {name}: {TRANSPORT}, {PARTITIONS} partitions, patterns product.#" in text.stdout and
                  f"lag {want} events (counted now)" in text.stdout, f"the text list:\n{text.stdout}")

            # the pool counts it into the registry, /metrics and /api/subscriptions read that
            m = wait_for("the pool's count in /metrics",
                         lambda: (lambda m: m if m.get("conveyor_subscription_lag") == want else None)(
                             sub_metrics(pool, name)))
            eq(m.get("conveyor_subscription_gap"), 0, "conveyor_subscription_gap")
            eq(m.get("conveyor_subscription_dead"), 0, "conveyor_subscription_dead")
            check(m.get("conveyor_subscription_oldest_age_seconds", 0) > 0, f"an oldest age: {m}")
            (lag, counted) = query("SELECT lag, counted_at IS NOT NULL FROM subscriptions WHERE name = %s", name)[0]
            eq((lag, counted), (want, True), "the registry's lag and counted_at")
            status, body = get(pool, "/api/subscriptions")
            eq(status, 200, "/api/subscriptions status")
            rows = [s for s in json.loads(body) if s["name"] == name]
            eq(len(rows), 1, "/api/subscriptions lists it")
            eq(rows[0]["lag"], want, "/api/subscriptions lag")
            check(isinstance(rows[0]["countedAgeSeconds"], (int, float)), f"countedAgeSeconds: {rows[0]}")

            if TRANSPORT == "rabbitmq":
                # emptied: the next count notes empty_seen_at and the oldest age is 0; then a new event's
                # oldest age counts from that moment, not from the creation
                conn, ch = amqp()
                for i in range(PARTITIONS):
                    ch.queue_purge(f"conveyor.sub.{name}.{i}")
                conn.close()
                wait_for("the pool's count of the empty queues", lambda: query(
                    "SELECT 1 FROM subscriptions WHERE name = %s AND lag = 0 AND empty_seen_at IS NOT NULL "
                    "AND oldest_age_seconds = 0", name))
                m = wait_for("lag 0 in /metrics", lambda: (lambda m: m if m.get("conveyor_subscription_lag") == 0
                                                           else None)(sub_metrics(pool, name)))
                eq(m.get("conveyor_subscription_oldest_age_seconds"), 0, "no event: oldest age 0")
                publish_products(1)
                row = listed(name)
                eq(row["lag"], broker_lag(name), "lag after one more event")
                (since_empty, since_created) = query(
                    "SELECT extract(epoch FROM now() - empty_seen_at)::float, "
                    "extract(epoch FROM now() - created_at)::float FROM subscriptions WHERE name = %s", name)[0]
                check(row["oldestAgeSeconds"] <= since_empty < since_created,
                      f"the oldest age counts from when the queues were seen empty: {row['oldestAgeSeconds']} "
                      f"<= {since_empty} < {since_created}")
    finally:
        remove_quietly(name)


def test_gap_when_the_stream_was_trimmed_past_unread_entries_redis():
    """Redis only: RabbitMQ keeps a subscription's events in its queues (no gap, §13).
    It trims conveyor:events: no other test may read the stream meanwhile."""
    name = fresh_name("gap")
    make_subscription(name)
    try:
        with http_pool() as pool:
            # partition 0 reads up to the stream's newest entry and settles it (as a running process
            # does), so Redis knows how many entries it read; then three more come
            r = rds()
            r.xadd("conveyor:events", {"type": "test.marker", "event": "{}"})
            got = r.xreadgroup(f"sub:{name}:0", f"{name}:0", {"conveyor:events": ">"}, count=100000)
            r.xack("conveyor:events", f"sub:{name}:0", *[eid for eid, _ in got[0][1]])
            publish_products(3)
            eq(listed(name)["gap"], False, "no gap before the trim")
            before = broker_lag(name)
            r.xtrim("conveyor:events", maxlen=1, approximate=False)  # exact: entries the groups had not read are gone
            row = listed(name)
            eq(row["gap"], True, "a gap once the stream was trimmed past unread entries")
            eq(row["lag"], 1, f"the lag is what the stream still holds after the groups' position (was {before})")
            wait_for("conveyor_subscription_gap 1", lambda: sub_metrics(pool, name).get("conveyor_subscription_gap")
                     == 1)
            (gap,) = query("SELECT gap FROM subscriptions WHERE name = %s", name)[0]
            check(gap and "trimmed" in gap, f"the registry notes the gap: {gap!r}")
            eq(listed(name)["gapNote"], gap, "the list shows the registry's note")
    finally:
        remove_quietly(name)


def test_dead_and_retry():
    name = fresh_name("dead")
    make_subscription(name)
    try:
        a, b = str(uuid.uuid4()), str(uuid.uuid4())
        for eid, claimed in ((a, "now() + interval '1 minute'"), (b, "NULL")):
            event = json.dumps({"id": eid, "type": "product.created", "data": {}})
            query(f"INSERT INTO subscription_dead (subscription, event_id, event, attempts, error, claimed_until) "
                  f"VALUES (%s, %s, %s, 5, 'exit status 1', {claimed})", name, eid, event)
        r = admin("subscriptions", "dead", name, "--json")
        eq(r.returncode, 0, f"dead --json: exit status; stderr: {r.stderr}")
        rows = json_lines(r.stdout)
        eq(sorted(o["eventId"] for o in rows), sorted([a, b]), "its dead letters")
        for o in rows:
            eq((o["kind"], o["subscription"], o["attempts"], o["error"], o["type"], o["retryRequestedAt"]),
               ("subscription_dead", name, 5, "exit status 1", "product.created", None), "a dead letter's fields")
            eq(o["event"]["id"], o["eventId"], "the event as delivered")
        r = admin("subscriptions", "dead", name)
        check(r.returncode == 0 and a in r.stdout and "5 attempts" in r.stdout, f"dead (text):\n{r.stdout}{r.stderr}")
        eq(listed(name)["dead"], 2, "the list counts its dead letters")

        r = admin("subscriptions", "retry", name, a)
        eq(r.returncode, 0, f"retry ID: exit status; stderr: {r.stderr}")
        check("1 dead letter to be handed out again" in r.stdout, f"retry says how many: {r.stdout}")
        rows = dict(query("SELECT event_id::text, (retry_requested_at IS NOT NULL AND claimed_until IS NULL) "
                          "FROM subscription_dead WHERE subscription = %s", name))
        eq(rows, {a: True, b: False}, "retry ID asks for that one, its claim cleared")
        r = admin("subscriptions", "retry", name, "--all")
        eq(r.returncode, 0, f"retry --all: exit status; stderr: {r.stderr}")
        check("2 dead letters to be handed out again" in r.stdout, f"retry --all says how many: {r.stdout}")
        eq(query("SELECT count(*) FROM subscription_dead WHERE subscription = %s AND retry_requested_at IS NULL",
                 name)[0][0], 0, "every one asked for")
        r = admin("subscriptions", "dead", name, "--json")
        check(all(o["retryRequestedAt"] for o in json_lines(r.stdout)), f"dead shows the request: {r.stdout}")

        r = admin("subscriptions", "retry", name, str(uuid.uuid4()))
        eq(r.returncode, 1, f"retry of an event that is not dead: exit 1; {r.stdout}{r.stderr}")
        r = admin("subscriptions", "retry", name, "not-an-id")
        eq(r.returncode, 2, f"retry of a word that is no event id: exit 2; {r.stderr}")
        check("not an event id" in r.stderr, f"says why: {r.stderr}")
    finally:
        remove_quietly(name)


def test_unknown_names_are_refused():
    name = fresh_name("nosuch")
    for args in (("remove", name), ("dead", name), ("retry", name, "--all"), ("retry", name, str(uuid.uuid4()))):
        r = admin("subscriptions", *args)
        eq(r.returncode, 2, f"subscriptions {' '.join(args)}: exit status; {r.stdout}{r.stderr}")
        check(f"no subscription '{name}'" in r.stderr, f"it names the subscription: {r.stderr}")
        eq(r.stdout, "", "nothing on stdout")
    r = admin("subscriptions", "frobnicate")
    eq(r.returncode, 2, "an unknown verb: exit 2")
    check("usage: conveyor-admin subscriptions" in r.stderr, f"the usage: {r.stderr}")
    r = run_bin("conveyor-admin", "--help")
    check("subscriptions [list]" in r.stdout and "subscriptions retry NAME EVENT_ID|--all" in r.stdout,
          f"--help lists the subscriptions subcommands:\n{r.stdout}")


def test_remove_deletes_the_broker_objects_and_the_row():
    name = fresh_name("rm")
    make_subscription(name)
    try:
        with http_pool():
            publish_products(2)  # its queues or groups hold something: removed with them
        query("INSERT INTO subscription_dead (subscription, event_id, event, attempts, error) "
              "VALUES (%s, %s, '{}', 5, 'x')", name, str(uuid.uuid4()))
        want = [f"conveyor.sub.{name}.{i}" for i in range(PARTITIONS)] + [f"conveyor.sub.{name}"] \
            if TRANSPORT == "rabbitmq" else [f"sub:{name}:{i}" for i in range(PARTITIONS)]
        eq(sorted(broker_objects(name)), sorted(want), "its broker objects, as made")

        # a running process of it (its shared advisory lock, §13): refused, nothing removed
        holder = psycopg2.connect(DB_URL)
        holder.autocommit = True
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock_shared(hashtext('conveyor.sub.' || %s), 65535)", (name,))
        try:
            r = admin("subscriptions", "remove", name)
            eq(r.returncode, 2, f"remove while a process runs: exit 2; {r.stdout}{r.stderr}")
            check("1 running process" in r.stderr, f"says why: {r.stderr}")
            eq(sorted(broker_objects(name)), sorted(want), "nothing removed")
        finally:
            holder.close()

        r = admin("subscriptions", "remove", name)
        eq(r.returncode, 0, f"remove: exit status; {r.stdout}{r.stderr}")
        check(f"removed subscription {name}" in r.stdout and "1 dead letter" in r.stdout, f"says what: {r.stdout}")
        eq(broker_objects(name), [], "its queues and exchange (RabbitMQ) or groups (Redis) are gone")
        eq(query("SELECT count(*) FROM subscriptions WHERE name = %s", name)[0][0], 0, "its row is gone")
        eq(query("SELECT count(*) FROM subscription_dead WHERE subscription = %s", name)[0][0], 0,
           "its dead letters are gone")
        r = admin("subscriptions", "remove", name)
        eq(r.returncode, 2, "removed: unknown now")
    finally:
        remove_quietly(name)
