"""How the outbox relay is woken: the pool's own workers wake its relay without
PostgreSQL; the workers of a pool whose relay stands by (another pool's is the
active one) NOTIFY it. The relay's poll is set to a minute here, so an event
that arrives within seconds was delivered by a wake-up."""
import select
import time

from harness import Events, Pool, Publisher, check, db, envelope, eq

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
