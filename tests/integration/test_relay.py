"""How the outbox relay is woken: the pool's own workers wake its relay without
PostgreSQL; the workers of a pool whose relay stands by (another pool's is the
active one) NOTIFY it. The relay's poll is set to a minute here, so an event
that arrives within seconds was delivered by a wake-up. And where it claims
from: above a floor that moves past an id only once no transaction that could
still commit a row at or below it is in progress, so a commit that stalls
for seconds neither loses its rows nor lets a later event of its aggregate
overtake them."""
import json
import select
import time
import uuid

from harness import Events, Pool, Publisher, check, db, envelope, eq, query

SLOW_POLL = "relay: { poll_interval_ms = 60000; };"
NO_WORKERS = {"users": 0, "catalog": 0, "orders": 0}


def listen():
    """A connection listening on the relay's channel."""
    c = db()
    with c.cursor() as cur:
        cur.execute('LISTEN "conveyor_outbox"')
    return c


def notifies(c, wait=0.5):
    """How many NOTIFYs c received, waiting up to wait seconds for more."""
    deadline = time.time() + wait
    while time.time() < deadline:
        select.select([c], [], [], max(0.0, deadline - time.time()))
        c.poll()
    n = len(c.notifies)
    c.notifies.clear()
    return n


def create(pub, ev, name):
    cmd = envelope("createProduct", {"name": name, "price": "2.50"})
    pub.command(cmd)
    res = ev.wait_result(cmd["id"], timeout=10)
    eq(res[0]["type"], "product.created", f"{name}: relayed long before the relay's poll")


def test_pool_wakes_its_own_relay_without_notify():
    with Pool(extra=SLOW_POLL) as pool:
        check("relay active" in pool.read_log(), "this pool's relay is the active one")
        listener = listen()
        pub, ev = Publisher(), Events()
        for i in range(5):
            create(pub, ev, f"woken {i}")
        eq(notifies(listener), 0, "no NOTIFY: the workers woke their own relay")
        listener.close()
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")


def test_standby_pool_notifies_the_active_relay():
    active = Pool(workers=NO_WORKERS, extra=SLOW_POLL)  # a relay and nothing else
    standby = None
    try:
        check("relay active" in active.read_log(), "the first pool's relay is the active one")
        standby = Pool(extra=SLOW_POLL)
        check("standing by" in standby.read_log(), "the second pool's relay stands by")
        listener = listen()
        pub, ev = Publisher(), Events()
        for i in range(3):
            create(pub, ev, f"notified {i}")
        check(notifies(listener) >= 1, "the standby pool's workers NOTIFY the active relay")
        listener.close()
        pub.close()
        ev.close()
    finally:
        for p in (standby, active):
            if p and p.proc.poll() is None:
                eq(p.stop(), (0, []), "clean stop")


def test_a_row_committed_late_below_the_claims_floor_is_published():
    """A transaction takes its outbox id (by hand, not through a worker), then
    stalls for seconds before its commit, while later rows are published past
    it: the relay's floor must wait below the stalled row until it commits."""
    with Pool(extra="relay: { poll_interval_ms = 200; };") as pool:
        pub, ev = Publisher(), Events()
        create(pub, ev, "template")
        late = dict(ev.events[-1], id=str(uuid.uuid4()))  # a real event, a new id
        stalled = db()
        stalled.autocommit = False
        with stalled.cursor() as cur:
            cur.execute("INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) "
                        "VALUES (%s, %s, %s, %s, %s) RETURNING id",
                        (late["id"], late["aggregateType"], late["aggregateId"], late["type"], json.dumps(late)))
            late_row = cur.fetchone()[0]
        # later rows are published past it for twice the floor's longest lag
        until = time.time() + 2.5
        while time.time() < until:
            create(pub, ev, "published past the stalled row")
            time.sleep(0.05)
        check(query("SELECT count(*) FROM outbox WHERE id > %s AND published_at IS NOT NULL", late_row)[0][0] >= 10,
              "rows after the stalled one were published meanwhile")
        check(late["id"] not in ev.arrived, "nothing publishes a row before its commit")
        stalled.commit()
        stalled.close()
        ev.wait(lambda s: late["id"] in s.arrived, timeout=10, what="the row committed late")
        deadline = time.time() + 5
        while query("SELECT published_at IS NULL FROM outbox WHERE id = %s", late_row)[0][0]:
            check(time.time() < deadline, "the late row is marked published")
            time.sleep(0.1)
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")


def test_the_relay_uses_its_indexes_on_an_outbox_vacuumed_empty():
    """A plan made while the outbox's statistics say it is empty (a new
    database, or one vacuumed empty) would read the whole table on every claim
    and mark for as long as the connection keeps that plan: the relay's
    claims, marks and prunes must not scan the outbox sequentially."""
    query("DELETE FROM outbox WHERE published_at IS NOT NULL")
    query("VACUUM outbox")
    eq(query("SELECT count(*) FROM outbox")[0][0], 0, "the outbox is empty (nothing was left unpublished)")
    seq0 = query("SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'outbox'")[0][0]
    with Pool(extra="relay: { poll_interval_ms = 100; };") as pool:
        pub, ev = Publisher(), Events()
        for i in range(30):
            create(pub, ev, f"indexed {i}")
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")
    time.sleep(0.5)  # the backends' statistics reach the shared counters as they exit
    seq1 = query("SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'outbox'")[0][0]
    eq(seq1 - seq0, 0, "sequential scans of the outbox while the relay published 30 events")


STALL_S = 3.0


def stall_commit_of(cid):
    """Installs a deferred constraint trigger on the outbox that sleeps STALL_S
    at the COMMIT of the transaction that wrote the events of command cid:
    its outbox rows (and their ids) are written, its commit waits."""
    query("CREATE FUNCTION test_stall_commit() RETURNS trigger LANGUAGE plpgsql AS $f$ "
          "BEGIN IF NEW.payload->>'commandId' = '%s' THEN PERFORM pg_sleep(%s); END IF; RETURN NULL; END $f$"
          % (cid, STALL_S))
    query("CREATE CONSTRAINT TRIGGER test_stall_commit AFTER INSERT ON outbox "
          "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION test_stall_commit()")


def unstall():
    query("DROP TRIGGER IF EXISTS test_stall_commit ON outbox")
    query("DROP FUNCTION IF EXISTS test_stall_commit()")


def percentile(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))] if s else float("nan")


def test_a_stalled_commit_keeps_its_aggregates_order():
    """updateStock on product P takes its outbox ids, then its COMMIT stalls
    for 3 s; other products' commands flow meanwhile (their events are
    published past P's rows), then a second updateStock on P waits for the
    first's row lock and commits just after it. The subscriber must see P's
    two stock.updated in commit order, and the other products' events must not
    wait for the stalled commit."""
    unstall()
    with Pool(workers={"catalog": 4}, extra="relay: { poll_interval_ms = 1000; };") as pool:
        pub, ev = Publisher(), Events()
        products = []
        for i in range(7):
            cmd = envelope("createProduct", {"name": f"stall {i}", "price": "1.00", "stock": 100})
            pub.command(cmd)
            products.append(ev.wait_result(cmd["id"])[0]["data"]["productId"])
        p, others = products[0], products[1:]

        def flow(seconds, sent):
            """updateStock +1 on the other products, one every 20 ms, for seconds."""
            until = time.time() + seconds
            k = 0
            while time.time() < until:
                cmd = envelope("updateStock", {"productId": others[k % len(others)], "quantityChange": 1})
                k += 1
                pub.command(cmd)
                sent[cmd["id"]] = time.time()
                until_next = time.time() + 0.02
                while time.time() < until_next:  # arrivals noted within a millisecond
                    ev.poll(timeout=0)
                    time.sleep(0.001)

        def latencies(sent):
            ev.wait(lambda s: all(s.for_command(c) for c in sent), timeout=20, what="the other products' events")
            return [ev.arrived[ev.for_command(c)[0]["id"]] - t for c, t in sent.items()]

        calm = {}
        flow(1.5, calm)
        first = envelope("updateStock", {"productId": p, "quantityChange": 5})
        second = envelope("updateStock", {"productId": p, "quantityChange": 7})
        stalled = {}
        try:
            stall_commit_of(first["id"])
            t0 = time.time()
            pub.command(first)
            flow(STALL_S - 0.6, stalled)  # the others' events are published past the stalled rows
            check(not ev.for_command(first["id"]), "nothing publishes a row before its commit")
            pub.command(second)  # waits for the first's row lock, commits just after it
            flow(1.2, stalled)  # and on through both commits
            ev.wait(lambda s: s.for_command(first["id"]) and s.for_command(second["id"]), timeout=20,
                    what="both events of P")
            took = ev.arrived[ev.for_command(first["id"])[0]["id"]] - t0
        finally:
            unstall()
        a, b = ev.for_command(first["id"])[0], ev.for_command(second["id"])[0]
        eq((a["type"], a["data"]["previousStock"], a["data"]["stock"]), ("stock.updated", 100, 105), "the first")
        eq((b["type"], b["data"]["previousStock"], b["data"]["stock"]), ("stock.updated", 105, 112), "the second")
        check(took >= STALL_S - 0.2, f"the first command's commit was held ({took:.2f} s)")
        order = [e["id"] for e in ev.events]
        check(order.index(a["id"]) < order.index(b["id"]),
              "P's events arrive in commit order: stock 100->105 before 105->112 "
              f"(arrived {ev.arrived[a['id']] - t0:.3f} s and {ev.arrived[b['id']] - t0:.3f} s after the first was sent)")
        # the other products' events, before and during the stall
        calm_l, stalled_l = latencies(calm), latencies(stalled)
        before_first = [c for c in stalled if ev.arrived[ev.for_command(c)[0]["id"]] < ev.arrived[a["id"]]]
        check(len(before_first) >= 20, f"other products' events were published during the stall ({len(before_first)})")
        print(f"other products' latency, ms: calm median {1000 * percentile(calm_l, 0.5):.0f} "
              f"p90 {1000 * percentile(calm_l, 0.9):.0f} ({len(calm_l)}); during the stall median "
              f"{1000 * percentile(stalled_l, 0.5):.0f} p90 {1000 * percentile(stalled_l, 0.9):.0f} ({len(stalled_l)})")
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")


def test_a_pool_stopped_under_load_leaves_nothing_unpublished():
    """SIGTERM while the workers drain a backlog, three times: the relay stops
    after them and publishes what they committed meanwhile, so the outbox is
    empty when the pool has exited (a broker being up to take it)."""
    pub = Publisher()
    ids = []
    try:
        for round_ in range(3):
            for i in range(1500):
                ids.append(pub.command(envelope("createProduct", {"name": f"Drained {round_}.{i}", "price": "1.00",
                                                                  "stock": 1}))["id"])
            before = query("SELECT count(*) FROM processed_commands WHERE id = ANY(%s::uuid[])", ids)[0][0]
            pool = Pool(workers={"catalog": 2}, queue_opts="batch_size = 8;")
            deadline = time.time() + 30
            while query("SELECT count(*) FROM processed_commands WHERE id = ANY(%s::uuid[])", ids)[0][0] < before + 200:
                check(time.time() < deadline, "the pool applies the backlog")
                time.sleep(0.05)
            rc, left = pool.stop()  # under load: the backlog is not done
            eq((rc, left), (0, []), "a clean stop")
            done = query("SELECT count(*) FROM processed_commands WHERE id = ANY(%s::uuid[])", ids)[0][0]
            check(done < len(ids), f"round {round_}: stopped while commands were waiting ({done} of {len(ids)} done)")
            eq(query("SELECT count(*) FROM outbox WHERE published_at IS NULL")[0][0], 0,
               f"round {round_}: unpublished outbox rows after the pool stopped")
        with Pool(workers={"catalog": 2}, queue_opts="batch_size = 8;") as pool:  # the rest
            deadline = time.time() + 60
            while query("SELECT count(*) FROM processed_commands WHERE id = ANY(%s::uuid[])", ids)[0][0] < len(ids):
                check(time.time() < deadline, "the rest of the backlog is applied")
                time.sleep(0.1)
    finally:
        pub.close()
