"""A promoted standby and a returning primary (issue 21, point 3), on loopback:
a primary A and a standby B on ports of 127.0.0.1 (pg_local.py), the pool on a
multi-host URL that lists A first (target_session_attrs=read-write). A is
stopped and B promoted (a failover): the pool goes on with B. Then A is started
again, unfenced: it takes writes on the old timeline, while B is on the new one,
so A has forked; libpq alone would choose A (the first writable host of the
list). Neither the running pool (made to reconnect) nor a fresh pool on the same
URL (nor --setup, with A listed first or last) writes anything to A: every
command lands on B, A's tables gain no row, and the logs say which host was
skipped and why. Last, B goes away for a while:
a pool that wrote on B's timeline waits for it rather than write to A.

The transport does not matter (the check is in the database connection): the
case runs on RabbitMQ only."""
import os
import time

from cluster import wait_for
from harness import Events, Pool, Publisher, check, envelope, eq, run_bin, write_config
from pg_local import LocalPostgres


def rows(pg, ids=None):
    """processed_commands rows on pg (of ids, or all)."""
    if ids is None:
        return pg.query("SELECT count(*) FROM processed_commands")[0][0]
    return pg.query("SELECT count(*) FROM processed_commands WHERE id = ANY(%s::uuid[])", list(ids))[0][0]


def kick(pg):
    """Ends every session of the pools on pg, so that each process connects again."""
    pg.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE 'conveyor-%%'")


def test_a_returning_old_primary_is_never_written_to_rabbitmq():
    t0 = time.time()

    def phase(what):
        print(f"{time.time() - t0:6.1f} s  {what}", flush=True)

    a = b = None
    pub = ev = None
    try:
        a = LocalPostgres(name="pgA")
        b = LocalPostgres(primary=a, name="pgB")
        url = (f"postgresql://conveyor@127.0.0.1:{a.port},127.0.0.1:{b.port}/conveyor"
               f"?target_session_attrs=read-write&connect_timeout=2")
        env = {"CONVEYOR_DATABASE_URL": url}
        phase(f"primary A (:{a.port}) and standby B (:{b.port}) up")
        config = write_config()
        r = run_bin("conveyor-workers", "-c", config, "--setup", env=env, timeout=120)
        os.unlink(config)
        eq(r.returncode, 0, f"--setup through the multi-host URL ({r.stderr})")
        pub, ev = Publisher(), Events()
        done = []  # every command published, in order

        def run(cmds, timeout=60):
            for c in cmds:
                pub.command(c)
            for c in cmds:
                ev.wait_result(c["id"], timeout=timeout)
            done.extend(cmds)

        def updates(n):
            return [envelope("updateStock", {"productId": pids[i % len(pids)], "quantityChange": -1})
                    for i in range(n)]

        with Pool(env=env, workers={"catalog": 2}) as pool:
            creates = [envelope("createProduct", {"name": f"Fork {i}", "price": "1.00", "stock": 1000})
                       for i in range(4)]
            for c in creates:
                pub.command(c)
            pids = [ev.wait_result(c["id"])[0]["data"]["productId"] for c in creates]
            done.extend(creates)
            run(updates(10))
            eq(rows(a, [c["id"] for c in done]), len(done), "before the failover the commands are on A")
            phase("the pool writes to A")

            # the failover: A stops, B is promoted; the pool goes on with B
            lsn = a.query("SELECT pg_current_wal_lsn()::text")[0][0]
            wait_for("B to replay A's WAL", lambda: b.query(
                "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", lsn) == [(True,)])
            a.pg_ctl("-m", "fast", "stop")
            b.pg_ctl("promote")
            wait_for("B promoted", b.writable)
            run(updates(10))
            phase(f"failed over: the pool writes to B (timeline {b.timeline()})")

            # A comes back, unfenced: writable, on the old timeline
            a.pg_ctl("start")
            check(a.writable(), "A is back as a primary")
            eq((a.timeline(), b.timeline()), (1, 2), "A's and B's timelines")
            on_a = rows(a)
            phase(f"A is back, writable on timeline 1 ({on_a} processed_commands rows)")

            # the running pool connects again (every process): libpq alone would pick A
            kick(b)
            batch = updates(20)
            run(batch)
            eq(rows(a), on_a, "the running pool wrote nothing to A after it came back")
            eq(rows(b, [c["id"] for c in batch]), len(batch), "the running pool's commands are on B")
            log = pool.read_log()
            check(f"skipped host 127.0.0.1:{a.port}, which has forked" in log,
                  f"the running pool says why it skipped A:\n{log[-3000:]}")
            phase("the running pool, reconnected, wrote to B only")
            rc, left = pool.stop()
            eq((rc, left), (0, []), "clean stop")

        # a fresh pool on the same URL
        with Pool(env=env, workers={"catalog": 2}) as fresh:
            batch = updates(20)
            run(batch)
            eq(rows(a), on_a, "the fresh pool wrote nothing to A")
            eq(rows(b, [c["id"] for c in batch]), len(batch), "the fresh pool's commands are on B")
            log = fresh.read_log()
            check(f"skipped host 127.0.0.1:{a.port}, which has forked" in log,
                  f"the fresh pool says why it skipped A:\n{log[-3000:]}")
            phase("a fresh pool wrote to B only")

            # --setup (migrations: writes) on the URL, A first and A last: B is used, A named
            b_first = (f"postgresql://conveyor@127.0.0.1:{b.port},127.0.0.1:{a.port}/conveyor"
                       f"?target_session_attrs=read-write&connect_timeout=2")
            for u, said in ((url, f"skipped host 127.0.0.1:{a.port}, which has forked"),
                            (b_first, f"host 127.0.0.1:{a.port} has forked")):
                config = write_config()
                r = run_bin("conveyor-workers", "-c", config, "--setup", env={"CONVEYOR_DATABASE_URL": u},
                            timeout=120)
                os.unlink(config)
                eq(r.returncode, 0, f"--setup on {u} ({r.stderr})")
                check(said in r.stderr, f"--setup on {u} says A has forked: {r.stderr}")
            eq(rows(a), on_a, "--setup wrote nothing to A")

            # B goes away for a while: the pool, which wrote on timeline 2, waits rather than write to A
            b.pg_ctl("-m", "fast", "stop")
            held = updates(5)
            for c in held:
                pub.command(c)
            time.sleep(4)
            eq(rows(a), on_a, "with B away, nothing was written to A")
            log = fresh.read_log()
            check("this process wrote on timeline 2" in log,
                  f"the pool says why it does not write to A while B is away:\n{log[-3000:]}")
            b.pg_ctl("start")
            for c in held:
                ev.wait_result(c["id"], timeout=60)
            done.extend(held)
            phase("B back: the held commands went to B")
            eq(rows(a), on_a, "nothing was written to A at all")
            rc, left = fresh.stop()
            eq((rc, left), (0, []), "clean stop")

        # B holds every command once after the failover, and the stocks they imply
        after = [c for c in done if c["type"] == "updateStock"][10:]
        eq(rows(b, [c["id"] for c in done]), len(done), "every command is on B")
        for pid in pids:
            want = 1000 - sum(1 for c in done if c["type"] == "updateStock" and c["payload"]["productId"] == pid)
            eq(b.query("SELECT stock FROM products WHERE id = %s", pid), [(want,)], f"stock of {pid} on B")
        for c in after:
            eq(len({e["id"] for e in ev.for_command(c["id"])}), 1, f"one result event for {c['id']}")
        print(f"forked primary: {len(done)} commands, none written to the returning primary A")
    finally:
        for x in (pub, ev):
            if x:
                x.close()
        for pg in (a, b):
            if pg:
                pg.remove()
        phase("removed")

