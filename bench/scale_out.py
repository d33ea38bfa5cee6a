#!/usr/bin/python3
"""How many pools one database takes: 1, 2 and 4 pools on test hosts
(tests/hosts.sh) draining the same backlog, with the CPU each part used.

  bench/scale_out.py [--transport rabbitmq|redis] [--commands 20000] [--pools 1,2,4] [--rounds 1]

Hosts: the broker on cvh1-3 (three RabbitMQ nodes with quorum queues, or a
Redis primary, a replica and three Sentinels with wait_replicas = 1), PostgreSQL
on cvh7, the producer on cvh6, pools on cvh8.. (two catalog workers each,
batch_size 50). For each pool count: the backlog is published with no pool
running, then the pools start and the time until every command is applied is
taken; throughput = commands / that time. The CPU seconds of each part (the
processes of its hosts) during the drain say where the limit is; on a machine
with few cores every part shares them, so the figure that matters is which
part's share grows. Needs root and the build (CONVEYOR_BIN_DIR, default build/).
Prints a table; docs/scaling.md holds a run's figures."""
import argparse
import json
import os
import subprocess
import sys
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
os.environ.setdefault("CONVEYOR_TEST_LOG_DIR", "/tmp/conveyor-bench-logs")

import cluster  # noqa: E402
from cluster import Postgres, RabbitCluster, RedisSentinel, addr, on, wait_for  # noqa: E402
from harness import BIN, Pool, write_config  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_of_host(h):
    """CPU seconds used so far by the processes running in host h."""
    r = subprocess.run(["ip", "netns", "pids", h], capture_output=True, text=True)
    total = 0
    for pid in r.stdout.split():
        try:
            f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])  # utime, stime
        except (OSError, IndexError):
            pass
    return total / TICK


def produce(config, env, lines):
    e = dict(os.environ, **env)
    r = subprocess.run([*on("cvh6"), os.path.join(BIN, "conveyor-produce"), "-c", config],
                       input="\n".join(json.dumps(l) for l in lines) + "\n", capture_output=True, text=True, env=e,
                       timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"conveyor-produce failed: {r.stderr[-2000:]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transport", choices=("rabbitmq", "redis"), default="rabbitmq")
    ap.add_argument("--commands", type=int, default=20000)
    ap.add_argument("--pools", default="1,2,4")
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args()
    counts = [int(x) for x in a.pools.split(",")]
    pool_hosts = [f"cvh{8 + i}" for i in range(max(counts))]
    cluster.setup(7 + max(counts))
    try:
        pg = Postgres("cvh7")
        if a.transport == "rabbitmq":
            broker = RabbitCluster(("cvh1", "cvh2", "cvh3"))
            env = {"CONVEYOR_RABBITMQ_URL": broker.urls()}
            extra = ""
        else:
            broker = RedisSentinel("cvh1", "cvh2", ("cvh3", "cvh4", "cvh5"))
            env = {"CONVEYOR_REDIS_URL": broker.url()}
            extra = "redis: { wait_replicas = 1; };"
        env.update({"CONVEYOR_DATABASE_URL": pg.url, "CONVEYOR_TRANSPORT": a.transport})
        opts = "batch_size = 50;"
        config = write_config({"catalog": 2}, extra=extra, queue_opts=opts)
        r = subprocess.run([os.path.join(BIN, "conveyor-workers"), "-c", config, "--setup"], env=dict(os.environ, **env),
                           capture_output=True, text=True, timeout=120)
        if r.returncode:
            raise SystemExit(f"--setup failed: {r.stderr}")
        produce(config, env, [{"type": "createProduct", "payload": {"name": f"P{i}", "price": "1.00", "stock": 10**8}}
                              for i in range(100)])
        with Pool(env=env, workers={"catalog": 1, "users": 0, "orders": 0}, extra=extra, queue_opts=opts,
                  wrap=on(pool_hosts[0])):
            wait_for("the products", lambda: pg.query("SELECT count(*) FROM products") == [(100,)], timeout=120)
        pids = [r[0] for r in pg.query("SELECT id::text FROM products")]
        parts = {"PostgreSQL": ["cvh7"], "broker": ["cvh1", "cvh2", "cvh3"] + (["cvh4", "cvh5"] if a.transport == "redis" else [])}
        rows = []
        for rnd in range(a.rounds):
            for n in counts:
                lines = [{"type": "updateStock", "payload": {"productId": pids[i % len(pids)], "quantityChange": -1},
                          "id": str(uuid.uuid4())} for i in range(a.commands)]
                before = pg.query("SELECT count(*) FROM processed_commands")[0][0]
                produce(config, env, lines)  # the backlog, no pool running
                hosts = pool_hosts[:n]
                cpu0 = {k: sum(cpu_of_host(h) for h in v) for k, v in parts.items()}
                t0 = time.time()
                pools = [Pool(env=env, workers={"catalog": 2, "users": 0, "orders": 0}, extra=extra, queue_opts=opts,
                              wrap=on(h)) for h in hosts]
                wait_for("the backlog applied",
                         lambda: pg.query("SELECT count(*) FROM processed_commands")[0][0] >= before + a.commands,
                         timeout=900, every=0.05)
                secs = time.time() - t0
                cpu = {k: sum(cpu_of_host(h) for h in v) - cpu0[k] for k, v in parts.items()}
                cpu["pools"] = sum(cpu_of_host(h) for h in hosts)
                for p in pools:
                    p.stop()
                rows.append((n, a.commands / secs, secs, cpu))
                print(f"round {rnd + 1}: {n} pool(s): {a.commands / secs:7.0f} commands/s ({secs:.1f} s); CPU s: "
                      + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()), flush=True)
        print(f"\n{a.transport}, {a.commands} commands per drain, two catalog workers per pool, batch_size 50, "
              f"{os.cpu_count()} cores")
        print("| pools | commands/s | CPU s per 1,000 commands: PostgreSQL | broker | pools |")
        print("|---|---|---|---|---|")
        for n, rate, secs, cpu in rows:
            k = a.commands / 1000
            print(f"| {n} | {rate:,.0f} | {cpu['PostgreSQL'] / k:.2f} | {cpu['broker'] / k:.2f} | {cpu['pools'] / k:.2f} |")
        os.unlink(config)
    finally:
        cluster.teardown()


if __name__ == "__main__":
    main()
