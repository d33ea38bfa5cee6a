"""PostgreSQL failover under load: a primary and a synchronous standby on two
test hosts (cvh1, cvh2: tests/hosts.sh, cluster.py), streaming replication with
synchronous_standby_names, the pool connected with a libpq multi-host URL (host
a, then b, target_session_attrs=read-write). While commands flow, the primary is
stopped (immediate: a crash) and the standby promoted; the pool reconnects to
it and carries on. Because the standby confirmed every commit, every command
whose transaction committed is there after the failover; nothing is applied
twice (stocks exact, one result per command).

The pool runs on this machine (the test hosts reach it through the bridge, and
it reaches them), against the suite's brokers."""
import datetime
import json
import os
import random
import threading
import time

import cluster
from cluster import Postgres, addr
from harness import Events, Pool, Publisher, check, envelope, eq, run_bin, write_config

URL = (f"postgresql://conveyor@{addr('cvh1')}:5432,{addr('cvh2')}:5432/conveyor"
       f"?target_session_attrs=read-write&connect_timeout=2")


def test_commands_survive_a_failover_to_the_synchronous_standby():
    t0 = time.time()

    def phase(what):
        print(f"{time.time() - t0:6.1f} s  {what}", flush=True)

    cluster.setup(2)
    try:
        primary = Postgres("cvh1")
        standby = Postgres("cvh2", primary=primary)
        primary.make_synchronous(standby)
        phase("primary (cvh1) and synchronous standby (cvh2) up")
        env = {"CONVEYOR_DATABASE_URL": URL}
        config = write_config()
        r = run_bin("conveyor-workers", "-c", config, "--setup", env=env, timeout=120)
        os.unlink(config)
        eq(r.returncode, 0, f"--setup through the multi-host URL ({r.stderr})")
        phase("--setup done")
        with Pool(env=env, workers={"catalog": 2}) as pool:
            phase("pool ready")
            pub, ev = Publisher(), Events()
            creates = [envelope("createProduct", {"name": f"HA {i}", "price": "1.00", "stock": 1000}) for i in range(8)]
            for c in creates:
                pub.command(c)
            pids = [ev.wait_result(c["id"])[0]["data"]["productId"] for c in creates]
            rnd = random.Random(16)
            updates = [envelope("updateStock", {"productId": rnd.choice(pids), "quantityChange": -1}) for _ in range(600)]
            failed_over = threading.Event()
            crashed, promoted = [], []

            def failover():
                # the primary crashes mid-stream; the standby is promoted
                time.sleep(0.8)
                primary.pg_ctl("-m", "immediate", "stop")
                crashed.append(time.time())
                standby.pg_ctl("promote")
                promoted.append(time.time())
                failed_over.set()

            t = threading.Thread(target=failover)
            t.start()
            for u in updates:  # about 2 s of commands, across the failover
                pub.command(u)
                time.sleep(0.003)
            t.join()
            check(failed_over.is_set(), "the failover ran")
            phase("published, failed over")
            for u in updates:
                res = ev.wait_result(u["id"], timeout=60)
                eq(res[0]["type"], "stock.updated", f"result of {u['id']}")
            phase("every result event received")
            ev.poll(1.0)
            # the promoted standby holds every command once, and the stocks they imply
            ids = [u["id"] for u in updates]
            eq(standby.query("SELECT count(*) FROM processed_commands WHERE id = ANY(%s::uuid[])", ids), [(600,)],
               "every command is in the promoted standby")
            for pid in pids:
                want = 1000 - sum(1 for u in updates if u["payload"]["productId"] == pid)
                eq(standby.query("SELECT stock FROM products WHERE id = %s", pid), [(want,)], f"stock of {pid}")
            for u in updates:
                eq(len({e["id"] for e in ev.for_command(u["id"])}), 1, f"one result event for {u['id']}")
            log = pool.read_log()
            check("database connection lost" in log and "database is back" in log,
                  "the pool lost the primary while it worked, and found the promoted standby")
            # how long the pool's workers were without a database: the first loss to the last return
            ts = lambda word: [datetime.datetime.fromisoformat(json.loads(l)["ts"].replace("Z", "+00:00")).timestamp()
                               for l in log.splitlines() if word in l and l.startswith("{")]
            lost, back = min(ts("database connection lost")), max(ts("database is back"))
            print(f"FIGURES pg-failover: the pool's workers were without a database for {back - lost:.1f} s "
                  f"(the crash, the promotion {promoted[0] - crashed[0]:.1f} s later, the reconnection)")
            pub.close()
            ev.close()
            rc, left = pool.stop()
            eq((rc, left), (0, []), "clean stop")
            print("failover: 600 commands across a primary crash and a standby promotion, all applied once")
    finally:
        cluster.teardown()
        phase("torn down")
