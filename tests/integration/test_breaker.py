"""The database breaker (workers/breaker.c): PostgreSQL stopped under load
opens the pool's breaker; while it is open no attempt is spent and nothing is
dead-lettered for the database's sake; /readyz says why, the metric says
open then closed, each transition is logged once per pool; after PostgreSQL
comes back every command is applied exactly once."""
import json
import os
import subprocess
import threading
import time

from harness import (ROOT, Events, Publisher, check, drain_dead, envelope, eq, http_pool, query)
from test_metrics import get, scrape, wait_http

OUTAGE_S = 30
BREAKER = "breaker: { failures = 3; backoff_ms = 500; max_backoff_ms = 4000; };"
STATE = ("conveyor_breaker_state", frozenset({("dependency", "postgresql")}))


def servers(*args):
    subprocess.run([os.path.join(ROOT, "scripts", "servers.sh"), *args], check=True, capture_output=True, timeout=300)


class Load(threading.Thread):
    """Publishes createProduct commands, one every 20 ms, until stopped: before,
    during and after the outage. ids: every command published (the broker has it)."""

    def __init__(self, tag):
        super().__init__(daemon=True)
        self.tag, self.ids, self.stopping, self.error = tag, [], threading.Event(), None

    def run(self):
        pub = Publisher()
        try:
            while not self.stopping.is_set():
                cmd = envelope("createProduct", {"name": f"{self.tag}-{len(self.ids)}", "price": 1})
                pub.command(cmd)
                self.ids.append(cmd["id"])
                time.sleep(0.02)
        except Exception as e:  # reported by the test
            self.error = e
        finally:
            pub.close()

    def stop(self):
        self.stopping.set()
        self.join(30)


def breaker_check(pool):
    """(status, the breaker's check in /readyz)."""
    status, _, body = get(pool, "/readyz")
    return status, json.loads(body)["checks"].get("breaker")


def test_postgresql_stopped_under_load_spends_no_attempt():  # faults
    drain_dead("catalog")
    tag = f"breaker-{int(time.time() * 1000)}"
    with http_pool(workers={"catalog": 4}, extra=BREAKER, queue_opts="batch_size = 4;") as pool:
        wait_http(pool, "/readyz", 200)
        samples, _ = scrape(pool)
        eq(samples.get(STATE), 0.0, "the breaker is closed at start")
        ev = Events()
        load = Load(tag)
        load.start()
        while len(load.ids) < 50:  # the pool is busy when PostgreSQL goes
            time.sleep(0.05)
        servers("pg-stop")
        stopped = time.time()
        try:
            # while it is out: /readyz 503 naming the breaker, the metric open
            seen_open, readyz_open, dashboard_open = False, None, False
            while time.time() < stopped + OUTAGE_S:
                status, why = breaker_check(pool)
                if why and why.startswith("open:"):
                    readyz_open = (status, why)
                samples, _ = scrape(pool)
                seen_open |= samples.get(STATE) == 2.0
                overview = json.loads(get(pool, "/api/overview")[2])  # the dashboard's badge reads it
                dashboard_open |= overview["breaker"]["state"] == "open"
                time.sleep(0.2)
            check(readyz_open is not None, "/readyz named the open breaker during the outage")
            eq(readyz_open[0], 503, "/readyz is 503 while the breaker is open")
            check(readyz_open[1].startswith("open: the database failed ("),
                  f"the reason names the database's failure: {readyz_open[1]}")
            check(seen_open, "conveyor_breaker_state was 2 (open) during the outage")
            check(dashboard_open, "the dashboard's overview said the breaker was open")
            during = len(load.ids)
        finally:
            servers("up")
        wait_http(pool, "/readyz", 200, timeout=60)
        samples, _ = scrape(pool)
        eq(samples.get(STATE), 0.0, "the breaker is closed again")
        eq(json.loads(get(pool, "/api/overview")[2])["breaker"]["state"], "closed", "the dashboard says closed")
        eq(samples.get(("conveyor_breaker_opened_total", frozenset({("dependency", "postgresql")}))), 1.0,
           "it opened once")
        time.sleep(1)
        load.stop()
        check(load.error is None, f"publishing went on through the outage: {load.error}")
        ids = load.ids
        check(during > 50 + OUTAGE_S * 10, f"commands were published during the outage ({during})")
        for cid in ids:
            ev.wait_result(cid, timeout=60)
        ev.poll(1)
        for cid in ids:  # distinct ids: the relay, which lost the database too, may publish an event again
            eq(len({e["id"] for e in ev.for_command(cid)}), 1, f"one result event for {cid}")
        eq(query("SELECT count(*) FROM processed_commands WHERE id = ANY(%s::uuid[])", ids)[0][0], len(ids),
           "every command processed")
        eq(query("SELECT count(*), count(DISTINCT name) FROM products WHERE name LIKE %s", tag + "-%")[0],
           (len(ids), len(ids)), "every command applied exactly once")
        eq(query("SELECT count(*) FROM command_attempts WHERE id = ANY(%s::uuid[])", ids)[0][0], 0,
           "no attempt spent (no count written)")
        eq(drain_dead("catalog"), [], "no dead letter")
        samples, _ = scrape(pool)
        retried = sum(v for (name, labels), v in samples.items()
                      if name == "conveyor_commands_total" and ("outcome", "retried") in labels)
        eq(retried, 0.0, "no command retried")
        log = pool.read_log()
        opened = log.count("database breaker open:")
        half = log.count("database breaker half-open")
        again = log.count("database breaker open again")
        closed = log.count("database breaker closed")
        eq((opened, closed), (1, 1), f"opened and closed logged once each (the pool's, not each worker's):\n"
                                     f"{log[-4000:]}")
        eq(half, again + 1, "each probe logged once: the failed ones, then the one that closed it")
        check(log.index("database breaker open:") < log.rindex("database breaker half-open") <
              log.index("database breaker closed"), "open, then half-open, then closed")
        said = [json.loads(line)["msg"] for line in log.splitlines()
                if line.startswith("{") and ("database breaker open:" in line or "database breaker closed" in line)]
        print(f"FIGURES breaker: {len(ids)} commands, {during} published before PostgreSQL came back; "
              f"{half} probes; " + " / ".join(said) + f"; /readyz said: {readyz_open[1]}")
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")


def test_a_command_timeout_is_the_commands_not_the_breakers():
    """A statement_timeout is the command's own failure: retried as before,
    and the breaker stays closed."""
    from test_recovery import FAST_RETRY, chaos_trigger, product, stock
    with chaos_trigger(), http_pool(workers={"catalog": 1}, extra=FAST_RETRY + BREAKER.replace("3", "1", 1),
                                    queue_opts="statement_timeout_ms = 500;") as pool:
        pub, ev = Publisher(), Events()
        pid = product("slowonce")
        cmd = envelope("updateStock", {"productId": pid, "quantityChange": 1})
        pub.command(cmd)
        eq(ev.wait_result(cmd["id"], timeout=30)[0]["type"], "stock.updated", "applied on its second attempt")
        eq(stock(pid), 11, "applied once")
        samples, _ = scrape(pool)
        eq(samples.get(STATE), 0.0, "the breaker stayed closed")
        log = pool.read_log()
        check("attempt 1 of" in log, "the timeout spent an attempt (the command's own)")
        check("database breaker" not in log, "no breaker transition")
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")
