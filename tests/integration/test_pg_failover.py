"""PostgreSQL failover under load: a primary and a synchronous standby
(streaming replication, synchronous_standby_names), the pool connected with a
libpq multi-host URL (host a, then b, target_session_attrs=read-write). While
commands flow, the primary is stopped (immediate: a crash) and the standby
promoted; the pool reconnects to it and carries on. Because the standby
confirmed every commit, every command whose transaction committed is there
after the failover; nothing is applied twice (stocks exact, one result per
command).

Both servers run on 127.0.0.1 (ports CONVEYOR_PGHA_PORT_BASE, 57030, + 0/1, + 10
on the redis transport), under /var/tmp/conveyor-pgha-<transport>."""
import json
import os
import random
import shutil
import subprocess
import threading
import time

import psycopg2

from harness import TRANSPORT, Events, Failure, Pool, Publisher, check, envelope, eq, run_bin, write_config

PG_BIN = "/usr/lib/postgresql/15/bin"
BASE = int(os.environ.get("CONVEYOR_PGHA_PORT_BASE", "57030")) + (10 if TRANSPORT == "redis" else 0)
PRIMARY, STANDBY = BASE, BASE + 1
STATE = f"/var/tmp/conveyor-pgha-{TRANSPORT}"
URL = (f"postgresql://conveyor@127.0.0.1:{PRIMARY},127.0.0.1:{STANDBY}/conveyor"
       f"?target_session_attrs=read-write&connect_timeout=2")


def sh(*cmd, check_=True, timeout=120):
    cmd = ("su", "postgres", "-s", "/bin/sh", "-c", " ".join(f"'{c}'" for c in cmd))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check_ and r.returncode != 0:
        raise Failure(f"{cmd[-1]} exited {r.returncode}: {r.stderr}{r.stdout}")
    return r


def pg_ctl(d, *args, check_=True):
    return sh(f"{PG_BIN}/pg_ctl", "-w", "-t", "60", "-D", d, "-l", os.path.join(d, "server.log"), *args,
              check_=check_)


def teardown():
    for name in ("primary", "standby"):
        d = os.path.join(STATE, name)
        if os.path.exists(os.path.join(d, "postmaster.pid")):
            pg_ctl(d, "-m", "immediate", "stop", check_=False)
    shutil.rmtree(STATE, ignore_errors=True)


def start_pair():
    """The primary, its database, and a synchronous standby streaming from it."""
    os.makedirs(STATE)
    os.chmod(STATE, 0o755)
    subprocess.run(["chown", "postgres:postgres", STATE], check=True)
    p, s = os.path.join(STATE, "primary"), os.path.join(STATE, "standby")
    sh(f"{PG_BIN}/initdb", "-D", p, "-U", "conveyor", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8")
    with open(os.path.join(p, "postgresql.conf"), "a") as f:
        f.write(f"listen_addresses = '127.0.0.1'\nport = {PRIMARY}\nunix_socket_directories = '{p}'\n"
                "wal_level = replica\nmax_wal_senders = 4\nsynchronous_commit = on\nfsync = off\n")
    with open(os.path.join(p, "pg_hba.conf"), "w") as f:
        f.write("local all all trust\nhost all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n")
    pg_ctl(p, "start")
    c = psycopg2.connect(f"postgresql://conveyor@127.0.0.1:{PRIMARY}/postgres")
    c.autocommit = True
    c.cursor().execute("CREATE DATABASE conveyor")
    c.close()
    sh(f"{PG_BIN}/pg_basebackup", "-h", "127.0.0.1", "-p", str(PRIMARY), "-U", "conveyor", "-D", s, "-X", "stream", "-R", "-c", "fast")
    with open(os.path.join(s, "postgresql.conf"), "a") as f:
        f.write(f"port = {STANDBY}\nunix_socket_directories = '{s}'\n")
    with open(os.path.join(s, "postgresql.auto.conf"), "a") as f:
        f.write(f"primary_conninfo = 'host=127.0.0.1 port={PRIMARY} user=conveyor application_name=standby'\n")
    pg_ctl(s, "start")
    # synchronous from now on (set earlier, the CREATE DATABASE would wait for a standby not there yet)
    query(PRIMARY, "ALTER SYSTEM SET synchronous_standby_names = 'standby'")
    query(PRIMARY, "SELECT pg_reload_conf()")
    deadline = time.time() + 30
    while time.time() < deadline:
        if query(PRIMARY, "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby'") == [("sync",)]:
            return p, s
        time.sleep(0.2)
    raise Failure("the standby did not become synchronous")


def query(port, sql, *args):
    c = psycopg2.connect(f"postgresql://conveyor@127.0.0.1:{port}/conveyor", connect_timeout=5)
    try:
        c.autocommit = True
        cur = c.cursor()
        cur.execute(sql, args)
        return cur.fetchall() if cur.description else None
    finally:
        c.close()


def test_commands_survive_a_failover_to_the_synchronous_standby():
    t0 = time.time()

    def phase(what):
        print(f"{time.time() - t0:6.1f} s  {what}", flush=True)

    teardown()
    try:
        primary, standby = start_pair()
        phase("primary and synchronous standby up")
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

            def failover():
                # the primary crashes mid-stream; the standby is promoted
                time.sleep(0.8)
                pg_ctl(primary, "-m", "immediate", "stop")
                pg_ctl(standby, "promote")
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
            eq(query(STANDBY, "SELECT count(*) FROM processed_commands WHERE id = ANY(%s::uuid[])", ids), [(600,)],
               "every command is in the promoted standby")
            for pid in pids:
                want = 1000 - sum(1 for u in updates if u["payload"]["productId"] == pid)
                eq(query(STANDBY, "SELECT stock FROM products WHERE id = %s", pid), [(want,)], f"stock of {pid}")
            for u in updates:
                eq(len({e["id"] for e in ev.for_command(u["id"])}), 1, f"one result event for {u['id']}")
            log = pool.read_log()
            check("database connection lost" in log and "database is back" in log,
                  "the pool lost the primary while it worked, and found the promoted standby")
            pub.close()
            ev.close()
            rc, left = pool.stop()
            eq((rc, left), (0, []), "clean stop")
            print("failover: 600 commands across a primary crash and a standby promotion, all applied once")
    finally:
        teardown()
        phase("torn down")
