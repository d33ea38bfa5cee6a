"""How the outbox relay is woken: the pool's own workers wake its relay without
PostgreSQL; the workers of a pool whose relay stands by (another pool's is the
active one) NOTIFY it. The relay's poll is set to a minute here, so an event
that arrives within seconds was delivered by a wake-up. And where it claims
from: above a floor that moves past an id only once no transaction that could
still commit a row at or below it is in progress, so a commit that stalls
for seconds neither loses its rows nor lets a later event of its aggregate
overtake them."""
import json
import os
import select
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid

from harness import REDIS_URL, ROOT, TRANSPORT, Events, Pool, Publisher, check, db, envelope, eq, http_pool, query

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
        check("another relay is active; standing by" in standby.read_log(), "the second pool's relay stands by")
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
        # later rows are published past it for twice the floor's longest lag,
        # and at least 10 of them (however slow a loaded host makes each)
        until, deadline = time.time() + 2.5, time.time() + 60
        while time.time() < until or query("SELECT count(*) FROM outbox WHERE id > %s AND published_at IS NOT NULL",
                                           late_row)[0][0] < 10:
            check(time.time() < deadline, "rows after the stalled one were published meanwhile")
            create(pub, ev, "published past the stalled row")
            time.sleep(0.05)
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


def test_a_pool_stopped_under_load_leaves_nothing_unpublished():  # faults (Release only: the ASan chain, with the hosts run after it, is CI's longest)
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
            at_stop = query("SELECT count(*) FROM processed_commands WHERE id = ANY(%s::uuid[])", ids)[0][0]
            t_stop = time.time()
            rc, left = pool.stop()  # under load: the backlog is not done
            stop_s = time.time() - t_stop
            eq((rc, left), (0, []), "a clean stop")
            done = query("SELECT count(*) FROM processed_commands WHERE id = ANY(%s::uuid[])", ids)[0][0]
            print(f"FIGURES drain {TRANSPORT} round {round_}: SIGTERM to exit {stop_s:.2f} s, {done - at_stop} "
                  f"commands committed during the drain (about), {len(ids) - done} left waiting", flush=True)
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


class FreezableProxy:
    """A TCP proxy to (host, port) that can be frozen: while frozen it reads
    and forwards nothing, and accepts new connections without answering on
    them, so its peers see what a frozen server shows (connected, silent)."""

    def __init__(self, host, port):
        self.upstream = (host, port)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.frozen, self.stop, self.conns = False, False, []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        while self.frozen and not self.stop:
            time.sleep(0.05)
        try:
            u = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            c.close()
            return
        self.conns += [c, u]
        threading.Thread(target=self._pump, args=(c, u), daemon=True).start()
        threading.Thread(target=self._pump, args=(u, c), daemon=True).start()

    def _pump(self, src, dst):
        src.settimeout(0.05)
        while not self.stop:
            if self.frozen:
                time.sleep(0.05)
                continue
            try:
                data = src.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if not data:
                break
            while self.frozen and not self.stop:  # read as it froze: held, as a frozen server would
                time.sleep(0.05)
            try:
                dst.sendall(data)
            except OSError:
                break
        for x in (src, dst):
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.stop = True
        self.sock.close()
        for c in self.conns:
            c.close()


def get(url):
    """(status, body) of GET url."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_a_relay_whose_events_broker_is_silent_gives_up_its_lock_rabbitmq():
    """The events broker (Redis here, behind a proxy; commands on RabbitMQ)
    goes silent with its connections open: the relay's publish ends at
    broker.reply_timeout_ms (1 s here), it gives up the relay lock after twice
    that without a publish (so a healthy pool's relay can take over) and stands
    by; /readyz and the metrics name the stall; once the broker answers again
    the relay takes the lock back and publishes what waited. Before the bounds
    it waited for Redis's reply for 30 s, holding the lock."""
    redis_url = REDIS_URL
    hostport = redis_url.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    proxy = FreezableProxy(hostport.rsplit(":", 1)[0], int(hostport.rsplit(":", 1)[1]))
    try:
        env = {"CONVEYOR_EVENTS_TRANSPORT": "redis", "CONVEYOR_REDIS_URL": f"redis://127.0.0.1:{proxy.port}/0"}
        with http_pool(extra="broker: { reply_timeout_ms = 1000; };", env=env) as pool:
            url = f"http://127.0.0.1:{pool.port}"
            pub = Publisher()
            before = envelope("createProduct", {"name": "events broker answering", "price": "1.00"})
            pub.command(before)
            wait_published = lambda cid: query("SELECT count(*) FROM outbox WHERE payload->>'commandId' = %s "
                                               "AND published_at IS NOT NULL", cid)[0][0] > 0
            deadline = time.time() + 20
            while not wait_published(before["id"]) and time.time() < deadline:
                time.sleep(0.1)
            check(wait_published(before["id"]), "published while the broker answers")
            proxy.frozen = True
            time.sleep(0.2)  # every pump has seen it
            t0 = time.time()
            during = envelope("createProduct", {"name": "events broker silent", "price": "1.00"})
            pub.command(during)
            seen_ready = seen_metric = None
            while time.time() < t0 + 15 and not (seen_ready and seen_metric and
                                                 "giving up the relay lock" in pool.read_log()):
                status, body = get(url + "/readyz")
                if status == 503 and json.loads(body)["checks"].get("broker_stall", "ok").startswith("stalled: redis"):
                    seen_ready = seen_ready or time.time() - t0
                _, text = get(url + "/metrics")
                line = [x for x in text.splitlines() if x.startswith('conveyor_broker_stalled{transport="redis"}')]
                if line and float(line[0].split()[-1]) > 0:
                    seen_metric = seen_metric or time.time() - t0
                time.sleep(0.1)
            log = pool.read_log()
            check("giving up the relay lock" in log, f"the relay gave up its lock:\n{log[-3000:]}")
            check("the server is silent" in log, f"the silence was named:\n{log[-3000:]}")
            check(seen_ready is not None, "/readyz named the stalled broker")
            check(seen_metric is not None, "conveyor_broker_stalled showed it")
            check(not wait_published(during["id"]), "nothing published while the broker is silent")
            proxy.frozen = False
            deadline = time.time() + 20
            while not wait_published(during["id"]) and time.time() < deadline:
                time.sleep(0.1)
            check(wait_published(during["id"]), "published once the broker answers again")
            _, text = get(url + "/metrics")
            line = [x for x in text.splitlines() if x.startswith('conveyor_broker_silences_total{transport="redis"}')]
            check(line and float(line[0].split()[-1]) > 0, f"silences counted: {line}")
            pub.close()
            eq(pool.stop(), (0, []), "clean stop")
    finally:
        proxy.close()


def test_out_of_order_commits_thousands_of_times_lose_nothing_and_keep_aggregate_order():  # faults (Release only: the ASan chain, with the hosts run after it, is CI's longest)
    """The floor's argument, forced: LATE_THREADS connections run transactions
    that take an aggregate's lock (an advisory lock, so that the outbox INSERT
    is the transaction's first write and the id's default assigns its
    transaction id), insert 1 to 3 outbox rows, then stall a random time
    (mostly milliseconds, sometimes 100-400 ms) before COMMIT, for LATE_S
    seconds: later ids commit and are published before earlier ones thousands
    of times while the relay moves its floor. Some commit with
    synchronous_commit off, some insert under a savepoint (one in ten of those
    rolled back), some roll back whole, some NOTIFY the relay. Every committed
    row must arrive while the pool runs (nothing waits below the floor for the
    stopping relay's drain), none that rolled back, and each aggregate's events
    in its commit order; the relay's log must say its floor moved and found no
    row below it."""
    import random
    pool = Pool(workers={"users": 0, "catalog": 1, "orders": 0}, extra="relay: { poll_interval_ms = 50; };")
    pub, ev = Publisher(), Events()
    try:
        create(pub, ev, "template")
        template = ev.events[-1]
        aggs = [str(uuid.uuid4()) for _ in range(LATE_AGGREGATES)]
        next_n = [0] * len(aggs)  # per aggregate, the next commit's number (taken under its lock)
        expect, never = {}, set()  # event id -> (aggregate, n, k); event ids that rolled back
        stats = {"tx": 0, "rolled_back": 0, "rows": 0, "stalled_long": 0, "late": 0, "top": 0}
        mu = threading.Lock()
        stop = time.time() + LATE_S
        errors = []

        def run(seed):
            rnd = random.Random(seed)
            c = db()
            c.autocommit = False
            try:
                while time.time() < stop:
                    a = rnd.randrange(len(aggs))
                    rollback = rnd.random() < 0.03
                    with c.cursor() as cur:
                        cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LATE_LOCK_CLASS, a))
                        if rnd.random() < 0.3:
                            cur.execute("SET LOCAL synchronous_commit TO off")
                        savepoint = rnd.random() < 0.2
                        undo = savepoint and rnd.random() < 0.1
                        if savepoint:
                            cur.execute("SAVEPOINT s")
                        rows = []
                        for k in range(rnd.randint(1, 3)):
                            eid = str(uuid.uuid4())
                            e = dict(template, id=eid, aggregateId=aggs[a])
                            cur.execute("INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, "
                                        "payload) VALUES (%s, %s, %s, %s, %s) RETURNING id",
                                        (eid, e["aggregateType"], aggs[a], e["type"], json.dumps(e)))
                            first = min(first, cur.fetchone()[0]) if k else cur.fetchone()[0]
                            rows.append(eid)
                        if undo:
                            cur.execute("ROLLBACK TO SAVEPOINT s")
                        elif savepoint:
                            cur.execute("RELEASE SAVEPOINT s")
                        if rnd.random() < 0.5:
                            cur.execute("NOTIFY \"conveyor_outbox\"")
                    x = rnd.random()
                    stall = rnd.uniform(0.1, 0.4) if x < 0.03 else rnd.uniform(0.005, 0.04) if x < 0.3 \
                        else rnd.uniform(0, 0.005)
                    time.sleep(stall)
                    with mu:
                        stats["tx"] += 1
                        stats["stalled_long"] += stall >= 0.1
                        if rollback or undo:
                            never.update(rows)
                            stats["rolled_back"] += 1
                        else:
                            stats["late"] += first < stats["top"]  # a higher id committed before this one
                            n = next_n[a]
                            next_n[a] += 1
                            for k, eid in enumerate(rows):
                                expect[eid] = (a, n, k)
                            stats["rows"] += len(rows)
                    if rollback:
                        c.rollback()
                    else:
                        c.commit()
                        with mu:
                            stats["top"] = max(stats["top"], first)  # a lower bound of the highest committed
                    time.sleep(rnd.uniform(0, 0.01))
            except Exception as e:  # noqa: BLE001 - reported by the main thread
                errors.append(repr(e))
            finally:
                c.close()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(LATE_THREADS)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            ev.poll(timeout=0.05)
        for t in threads:
            t.join()
        check(not errors, f"the committing threads failed: {errors[:3]}")
        check(stats["tx"] >= 2000 and stats["late"] >= 500,
              f"thousands of transactions, hundreds committed after a higher id ({stats})")
        ev.wait(lambda s: all(e in s.arrived for e in expect), timeout=30,
                what=f"every committed row while the pool runs ({stats})")
        eq(query("SELECT count(*) FROM outbox WHERE published_at IS NULL AND event_id = ANY(%s::uuid[])",
                 list(expect))[0][0], 0, "committed rows left unpublished")
        ev.poll(timeout=0.5)
        eq(sorted(e for e in never if e in ev.arrived), [], "rows that rolled back were published")
        order = {}
        for e in ev.events:
            if e["id"] in expect:
                a, n, k = expect[e["id"]]
                order.setdefault(a, []).append((n, k))
        bad = [a for a, seq in order.items() if seq != sorted(seq)]
        eq(bad, [], "aggregates whose events arrived out of commit order")
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")
        log = pool.read_log()
        check("below its claim floor" not in log, f"rows were found below the floor:\n{log[-3000:]}")
        moved = [line for line in log.splitlines() if "its claim floor moved" in line]
        check(moved and "rows found below it: 0" in moved[-1], f"the relay's floor summary: {moved}")
        moves = int(moved[-1].split("moved ")[1].split(" times")[0])
        check(moves >= 20, f"the floor moved during the run ({moves} times)")
        print(f"{stats['tx']} transactions ({stats['rolled_back']} rolled back, {stats['stalled_long']} stalled "
              f">= 100 ms, {stats['late']} committed after a higher id), {stats['rows']} rows published, "
              f"the floor moved {moves} times")
    finally:
        if pool.proc.poll() is None:
            pool.stop()


def test_the_claims_sequence_read_never_runs_ahead():
    """The hole the floor once had (docs/decisions.md, "The cause, found"): a
    plain SELECT from a sequence reads its tuple without the buffer's lock and
    can catch a nextval writing its WAL record, while the tuple holds the value
    logged ahead (ids not handed out yet). The relay's claim must read the last
    id under the lock, with pg_sequence_last_value, and that read must never go
    back while three connections call nextval in a loop; the plain read's
    figure is printed beside it (it goes back, now and then: the cause)."""
    src = open(os.path.join(ROOT, "workers", "relay.c")).read()
    check("pg_sequence_last_value('outbox_id_seq'::regclass)" in src and "FROM outbox_id_seq" not in src,
          "relay.c's claim reads the outbox sequence's last id with pg_sequence_last_value, and only so")
    c = db()
    c.autocommit = True
    with c.cursor() as cur:  # as outbox_id_seq (sql/0004): CACHE 1
        cur.execute("DROP SEQUENCE IF EXISTS relay_read_race; CREATE SEQUENCE relay_read_race CACHE 1")
    stop = time.time() + 5.0
    went_back = {}

    def burn():
        w = db()
        w.autocommit = True
        with w.cursor() as cur:
            while time.time() < stop:
                cur.execute("SELECT nextval('relay_read_race') FROM generate_series(1, 50)")
        w.close()

    def read(name, sql):
        r = db()
        r.autocommit = True
        prev, back, n = 0, 0, 0
        with r.cursor() as cur:
            while time.time() < stop:
                cur.execute(sql)
                v = cur.fetchone()[0] or 0
                back += v < prev
                prev, n = max(prev, v), n + 1
        r.close()
        went_back[name] = (back, n)

    threads = [threading.Thread(target=burn) for _ in range(3)] + [
        threading.Thread(target=read, args=("locked", "SELECT pg_sequence_last_value('relay_read_race'::regclass)")),
        threading.Thread(target=read, args=("plain", "SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 "
                                                     "END FROM relay_read_race"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with c.cursor() as cur:
        cur.execute("DROP SEQUENCE relay_read_race")
    c.close()
    check(went_back["locked"][1] > 100 and went_back["plain"][1] > 100, f"both read in a loop: {went_back}")
    eq(went_back["locked"][0], 0, "times pg_sequence_last_value went back (it had read an id not handed out)")
    print(f"FIGURES sequence reads under nextval: pg_sequence_last_value went back 0 times in "
          f"{went_back['locked'][1]} reads; a plain SELECT from the sequence {went_back['plain'][0]} times in "
          f"{went_back['plain'][1]}")


LATE_S = 20.0
LATE_THREADS = 8
LATE_AGGREGATES = 24
LATE_LOCK_CLASS = 22007
