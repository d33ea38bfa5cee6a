#!/usr/bin/python3
"""Conveyor's benchmark: the limit, the brokers alone and Conveyor end to end, in one run.

    bench/run.py                      the whole benchmark (about 10 minutes)
    bench/run.py --smoke              a few seconds of each part (the test suite runs this)
    bench/run.py --commands 200000    twice as long (memory must not grow)
    bench/run.py --profile 10         also a system-wide perf profile of each full-speed run
    bench/run.py --http               only the cost of the HTTP listener: full-speed runs with
                                      http.listen off and on, alternating, /metrics scraped every second

    BENCH_DATABASE_URL=postgresql://.../other  runs against another database of the same
    server (two builds compared in one session, each on a database of its own);
    CONVEYOR_BIN_DIR=DIR  the binaries to measure (default: a Release build of this clone)

Measures, side by side on the project's local servers (scripts/servers.sh) with
the durability a user gets by default (synchronous_commit on, persistent
messages with publisher confirms, Redis AOF appendfsync always):

  1. the limit: pgbench -M prepared running exactly the SQL of one updateStock
     command (dedup insert, stock update, outbox insert, commit), at the pool's
     number of connections; and the same with 10 commands per transaction;
     and every statement a batch_size = 1 worker sends for a first delivery,
     in the forms it sends them, to show what they cost without a broker;
     pgbench x1 runs again before each full-speed Conveyor run (the disk's
     fsync latency drifts within minutes): the limit is the median of all,
     and each run is also compared with the one just before it;
  2. the brokers alone: conveyor-bench-broker publishes with confirms and
     consumes with acks, no database (RabbitMQ, Redis);
  3. Conveyor end to end, per transport and batch size: N updateStock commands
     over 1,000 products piped into conveyor-produce while the pool runs; time
     from the first publish to the last event marked published by the relay;
     latency from each command's createdAt to its event's publication; then
     the same at half that rate, for latency; and a mixed variant (updateStock,
     createProduct, register). Peak and end RSS of every Conveyor process.

Prints a table with the ratios and writes every figure as JSON (--json,
default bench/results.json). Exit 0 when the run completed (targets are
reported, not enforced), 1 when a part failed, 2 on bad arguments.
"""
import argparse
import json
import os
import random
import resource
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid

import pika
import psycopg2
import redis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "bench")
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
from harness import free_port  # noqa: E402  (the suite's: a local TCP port nothing listens on)
PRODUCT_PREFIX = "00000000-0000-4000-8000-"  # product n is PRODUCT_PREFIX + n as 12 digits
# pgbench of the server scripts/servers.sh runs (Debian's postgresql-15 ships it)
PGBENCH = "/usr/lib/postgresql/15/bin/pgbench" if os.path.exists("/usr/lib/postgresql/15/bin/pgbench") else "pgbench"
START_STOCK = 1_000_000_000  # no updateStock of +-1 is ever rejected or crosses the low threshold


def product_id(n):
    return f"{PRODUCT_PREFIX}{n:012d}"


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def sh(*cmd, env=None, check=True, capture=True, timeout=None):
    r = subprocess.run(cmd, env=env, capture_output=capture, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


# ---- set-up ------------------------------------------------------------------------

def servers_env():
    sh(os.path.join(ROOT, "scripts", "servers.sh"), "up", capture=False)
    out = sh(os.path.join(ROOT, "scripts", "servers.sh"), "env").stdout
    env = dict(os.environ)
    for m in re.finditer(r"^export (\w+)=(.*)$", out, flags=re.M):
        env[m.group(1)] = m.group(2).strip("'\"")
    for k in ("CONVEYOR_TRANSPORT", "CONVEYOR_EVENTS_TRANSPORT"):
        env.pop(k, None)
    if os.environ.get("BENCH_DATABASE_URL"):  # another database of the same server (a before/after run)
        env["CONVEYOR_DATABASE_URL"] = os.environ["BENCH_DATABASE_URL"]
    return env


def write_config(transport, workers, batch_size, prefetch=16, http_port=None):
    """A queues.conf for one run: the catalog pool is the one measured (with the
    HTTP listener on http_port when given)."""
    prefetch = max(prefetch, 2 * batch_size)
    batch = f"batch_size = {batch_size};" if batch_size != 1 else ""
    http = f'http: {{ listen = "127.0.0.1:{http_port}"; }};' if http_port else ""
    text = f"""prefix = "conveyor";
transport = "{transport}";
{http}
queues = (
  {{ name = "users";   commands = ["register", "changePassword"]; workers = 1; prefetch = {prefetch}; {batch} }},
  {{ name = "catalog"; commands = ["createProduct", "updateProduct", "updateStock", "deleteProduct"];
     workers = {workers}; prefetch = {prefetch}; {batch} }},
  {{ name = "orders";  commands = ["placeOrder", "cancelOrder"]; workers = 1; prefetch = {prefetch}; {batch} }},
  {{ name = "bench";   commands = ["benchNoop"]; workers = 0; }}
);
"""
    fd, path = tempfile.mkstemp(prefix="conveyor-bench-", suffix=".conf")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


class Bench:
    def __init__(self, args):
        self.args = args
        self.env = servers_env()
        # CONVEYOR_BIN_DIR: binaries already built (the test suite's); else a Release build
        self.bin = os.environ.get("CONVEYOR_BIN_DIR") or \
            sh(os.path.join(ROOT, "scripts", "build.sh"), "release").stdout.strip().splitlines()[-1]
        self.db_url = self.env["CONVEYOR_DATABASE_URL"]
        self.db = psycopg2.connect(self.db_url)
        self.db.autocommit = True
        conf = write_config("rabbitmq", 1, 1)
        sh(os.path.join(self.bin, "conveyor-workers"), "-c", conf, "--setup", env=self.env)
        os.unlink(conf)
        self.results = {"machine": machine(), "settings": self.settings(), "args": vars(args)}

    def q(self, sql, *a):
        with self.db.cursor() as c:
            c.execute(sql, a)
            return c.fetchall() if c.description else None

    def settings(self):
        s = dict(self.q("SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                        ["synchronous_commit", "fsync", "wal_sync_method", "shared_buffers", "max_wal_size"]))
        s["redis"] = "appendonly yes, appendfsync always"
        s["rabbitmq"] = "quorum queues, persistent messages, publisher confirms"
        return s

    def reset_products(self):
        n = self.args.products
        self.q("INSERT INTO products (id, name, price, stock, status) "
               "SELECT (%s || lpad(g::text, 12, '0'))::uuid, 'bench product ' || g, 9.99, %s, 'ACTIVE' "
               "FROM generate_series(1, %s) g ON CONFLICT (id) DO UPDATE SET stock = EXCLUDED.stock",
               PRODUCT_PREFIX, START_STOCK, n)
        self.q("VACUUM ANALYZE products")

    def checkpoints(self):
        """Checkpoints PostgreSQL has started so far (timed and requested): one
        during a run writes the dirty pages and makes the next writes of each page
        log it whole, which shows as a burst of slower commits."""
        return self.q("SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter")[0][0]

    def quiesce(self):
        """Dirty pages written and dead rows vacuumed: each part starts alike."""
        self.q("CHECKPOINT")
        for t in ("outbox", "processed_commands", "command_attempts", "products"):
            self.q(f"VACUUM {t}")

    # ---- 1. the limit: pgbench ---------------------------------------------------

    def pgbench(self, per_tx, name=None):
        script = os.path.join(HERE, name or f"pgbench_update_stock_x{per_tx}.sql")
        self.reset_products()
        self.quiesce()
        cpu0, t0 = cpu_seconds(), time.time()
        r = sh(PGBENCH, "-n", "-M", "prepared", "-c", str(self.args.workers), "-j", str(min(self.args.workers, 2)),
               "-T", str(self.args.pgbench_seconds), "-D", f"products={self.args.products}",
               "-f", script, self.db_url)
        tps = float(re.search(r"tps = ([0-9.]+) \(without initial connection time\)", r.stdout).group(1))
        lat = float(re.search(r"latency average = ([0-9.]+) ms", r.stdout).group(1))
        time.sleep(0.3)  # the backends exit and are reaped
        cpu = cpu_per_command(cpu0, cpu_seconds(), tps * per_tx * self.args.pgbench_seconds, time.time() - t0)
        self.q("DELETE FROM processed_commands WHERE type = 'pgbench'")
        self.q("DELETE FROM outbox WHERE event_type = 'pgbench'")
        res = {"connections": self.args.workers, "commandsPerTransaction": per_tx, "tps": tps,
               "commandsPerSecond": tps * per_tx, "latencyAvgMs": lat, "script": os.path.relpath(script, ROOT),
               "cpu": cpu}
        log(f"pgbench {os.path.basename(script)}: {tps * per_tx:.0f} commands/s ({tps:.0f} tps, "
            f"{self.args.workers} connections)")
        return res

    # ---- 2. the brokers alone ------------------------------------------------------

    def broker_alone(self, transport):
        conf = write_config(transport, 1, 1)
        try:
            self.purge(transport, "bench")
            r = sh(os.path.join(self.bin, "conveyor-bench-broker"), "-c", conf, "-q", "bench",
                   "-n", str(self.args.broker_messages), env=self.env, timeout=600)
            res = json.loads(r.stdout)
        finally:
            os.unlink(conf)
        log(f"{transport} alone: {res['perSecond']:.0f} messages/s (publish with confirms + consume with acks)")
        return res

    def purge(self, transport, queue):
        if transport == "redis":
            redis.Redis.from_url(self.env["CONVEYOR_REDIS_URL"]).delete(f"conveyor:queue:{queue}")
        else:
            c = pika.BlockingConnection(pika.URLParameters(self.env["CONVEYOR_RABBITMQ_URL"]))
            c.channel().queue_purge(f"conveyor.{queue}")  # declared by --setup in __init__
            c.close()

    # ---- 3. Conveyor end to end ---------------------------------------------------

    def conveyor(self, transport, batch_size, n, mixed=False, rate=None, http=False):
        """One end-to-end run: n commands into conveyor-produce at full speed (or
        `rate` per second), the pool running (with http, its HTTP listener on and
        scraped every second). Returns the figures."""
        http_port = free_port() if http else None
        conf = write_config(transport, self.args.workers, batch_size, self.args.prefetch, http_port)
        self.reset_products()
        self.quiesce()
        for q in ("users", "catalog", "orders"):
            self.purge(transport, q)
        env = dict(self.env)
        pool_log = tempfile.NamedTemporaryFile(prefix="conveyor-bench-pool-", suffix=".log", delete=False)
        pool = subprocess.Popen([os.path.join(self.bin, "conveyor-workers"), "-c", conf], stdout=pool_log,
                                stderr=pool_log, env=env, start_new_session=True)
        try:
            wait_ready(pool, pool_log.name, self.args.workers + 2)
            start_id = self.q("SELECT coalesce(max(id), 0) FROM outbox")[0][0]
            seen_until = self.q("SELECT now()")[0][0]
            mem = MemorySampler(pool.pid)
            mem.start()
            prof = Profile(self.args.profile) if self.args.profile and not rate else None
            ckpt0 = self.checkpoints()
            cpu0 = cpu_seconds()
            scraper = Scraper(http_port) if http else None
            created, t_first, t_last_write, producer = self.publish(conf, n, mixed, rate)
            # done when every command's result event is marked published
            deadline = time.time() + max(600, n / 50)
            half_rss, done = None, 0
            while True:
                # only what was marked since the last look: the relay marks in order, one
                # transaction at a time, so published_at only grows (a cheap poll)
                k, last = self.q("SELECT count(*) FILTER (WHERE payload->>'correlationId' = 'bench'), "
                                 "max(published_at) FROM outbox WHERE published_at > %s", seen_until)[0]
                done, seen_until = done + k, last or seen_until
                if half_rss is None and done >= n // 2:
                    half_rss = mem.current()
                if done >= n:
                    break
                if pool.poll() is not None:
                    raise RuntimeError(f"the pool exited {pool.returncode}; log {pool_log.name}")
                if time.time() > deadline:
                    raise RuntimeError(f"only {done} of {n} events published after {time.time() - t_first:.0f} s")
                time.sleep(0.2)
            if producer.wait(60) != 0:
                raise RuntimeError(f"conveyor-produce exited {producer.returncode}: {producer.stderr.read()}")
            cpu1, t_done = cpu_seconds(), time.time()
            scrapes = scraper.stop() if scraper else None
            ckpts = self.checkpoints() - ckpt0
            end_rss = mem.current()
            mem.stop()
            profile = prof.report() if prof else None
            rows = self.q("SELECT payload->>'commandId', extract(epoch FROM published_at), payload->>'type', "
                          "extract(epoch FROM created_at) FROM outbox WHERE id > %s AND payload->>'correlationId' = 'bench'", start_id)
            # every run starts from the same tables: the run's own rows go (VACUUM follows)
            self.q("DELETE FROM outbox WHERE id > %s AND payload->>'correlationId' = 'bench'", start_id)
            self.q("DELETE FROM processed_commands WHERE id = ANY(%s::uuid[])", list(created))
        finally:
            pool.terminate()
            try:
                pool.wait(60)
            except subprocess.TimeoutExpired:
                pool.kill()
            os.unlink(conf)
        rejected = sum(1 for r in rows if r[2] == "command.rejected")
        lat = sorted(1000 * (float(p) - created[c]) for c, p, _, _ in rows if c in created)
        # where the time went: outbox.created_at is the command's transaction's start
        # (now()), so a latency splits into before the transaction (the producer's
        # confirms, the broker, waiting in the worker) and after (the transaction,
        # its commit, the relay's claim, publish and mark)
        before_tx = sorted(1000 * (float(s) - created[c]) for c, _, _, s in rows if c in created)
        after_tx = sorted(1000 * (float(p) - float(s)) for c, p, _, s in rows if c in created)
        t_end = max(float(p) for _, p, _, _ in rows)
        secs = t_end - t_first
        res = {"transport": transport, "batchSize": batch_size, "workers": self.args.workers, "commands": n,
               "mixed": mixed, "targetRate": rate, "seconds": round(secs, 3),
               "publishSeconds": round(t_last_write - t_first, 3),
               "commandsPerSecond": round(n / secs, 1), "rejected": rejected,
               "latencyMs": {"p50": pct(lat, 50), "p99": pct(lat, 99), "max": round(lat[-1], 1)},
               "latencyStagesMs": {"beforeTransaction": {"p50": pct(before_tx, 50), "p99": pct(before_tx, 99)},
                                   "transactionToPublished": {"p50": pct(after_tx, 50), "p99": pct(after_tx, 99)}},
               "rss": mem.report(half_rss, end_rss), "poolLog": pool_log.name,
               "cpu": cpu_per_command(cpu0, cpu1, n, t_done - t_first), "checkpoints": ckpts}
        if scrapes:
            res["scrapes"] = scrapes
            if scrapes["failed"] or not scrapes["ok"]:
                raise RuntimeError(f"/metrics scrapes: {scrapes}; see {pool_log.name}")
        stages = res["latencyStagesMs"]
        if profile:
            res["profile"] = profile
            print_profile(f"{transport} batch {batch_size}", profile)
        log(f"conveyor {transport} batch {batch_size}{' mixed' if mixed else ''}"
            f"{f' at {rate:.0f}/s' if rate else ''}: {res['commandsPerSecond']:.0f} commands/s, "
            f"p50 {res['latencyMs']['p50']} ms, p99 {res['latencyMs']['p99']} ms, max {res['latencyMs']['max']} ms "
            f"(before the transaction p50/p99 {stages['beforeTransaction']['p50']}/{stages['beforeTransaction']['p99']}, "
            f"from its start to published {stages['transactionToPublished']['p50']}/"
            f"{stages['transactionToPublished']['p99']}); "
            f"worker RSS end {res['rss']['workerEndKB']} kB, peak {res['rss']['workerPeakKB']} kB; "
            f"{ckpts} PostgreSQL checkpoint{'s' if ckpts != 1 else ''} during the run")
        if rejected and not mixed:
            raise RuntimeError(f"{rejected} commands rejected; see {pool_log.name}")
        return res

    def publish(self, conf, n, mixed, rate):
        """Starts conveyor-produce and writes n commands to it, each stamped with
        createdAt as it is written (paced at rate per second when given)."""
        producer = subprocess.Popen([os.path.join(self.bin, "conveyor-produce"), "-c", conf],
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    env=self.env, text=True, bufsize=1 << 16)
        rnd = random.Random(42)
        created = {}
        # lines written at once: 200 at full speed; paced, about 5 ms worth
        chunk = max(1, min(50, int(rate / 200))) if rate else 200
        t_first = None
        sent = 0
        while sent < n:
            now = time.time()
            if t_first is None:
                t_first = now
            if rate:
                due = t_first + sent / rate
                if due > now:
                    time.sleep(due - now)
                    now = time.time()
            ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + ".%03dZ" % (int(now * 1000) % 1000)
            lines = []
            k = min(chunk, n - sent)
            for _ in range(k):
                cid = str(uuid.uuid4())
                created[cid] = now
                lines.append(json.dumps({"id": cid, **command(rnd, mixed, self.args.products),
                                         "correlationId": "bench", "createdAt": ts}))
            producer.stdin.write("\n".join(lines) + "\n")
            producer.stdin.flush()
            sent += k
        t_last = time.time()
        producer.stdin.close()
        return created, t_first, t_last, producer

    def run(self):
        a, R = self.args, self.results
        R["pgbench"] = {"x1": self.pgbench(1), "x10": self.pgbench(10),
                        "conveyorSqlX1": self.pgbench(1, "pgbench_conveyor_sql_x1.sql")}
        R["brokerAlone"] = {t: self.broker_alone(t) for t in a.transports}
        R["conveyor"] = {}
        for t in a.transports:
            for b in a.batch_sizes:
                # the limit again, just before: this machine's fsync latency drifts
                # within minutes, so each run is also compared with its neighbour
                limit = self.pgbench(1)
                R["pgbench"].setdefault("x1Again", []).append(limit)
                full = self.conveyor(t, b, a.commands)
                full["pgbenchX1Before"] = limit["commandsPerSecond"]
                half = self.conveyor(t, b, a.latency_commands or max(200, int(full["commandsPerSecond"] * 10)),
                                     rate=full["commandsPerSecond"] / 2)
                R["conveyor"][f"{t}/batch{b}"] = {"full": full, "halfRate": half}
            if a.mixed_commands:
                R["conveyor"][f"{t}/mixed"] = {"full": self.conveyor(t, a.batch_sizes[-1], a.mixed_commands,
                                                                     mixed=True)}
        self.ratios()
        return R

    def http_cost(self):
        """The HTTP listener's cost: per transport and batch size, full-speed runs
        with it off and on, alternating (off-on, then on-off, ...: the machine
        drifts within minutes), /metrics scraped every second while on."""
        a, R = self.args, self.results
        R["httpCost"] = {}
        for t in a.transports:
            for b in a.batch_sizes:
                runs, http_us = {"off": [], "on": []}, []
                for r in range(a.http_rounds):
                    for on in ((False, True) if r % 2 == 0 else (True, False)):
                        res = self.conveyor(t, b, a.commands, http=on)
                        runs["on" if on else "off"].append(res["commandsPerSecond"])
                        if on:
                            http_us.append(res["cpu"]["usPerCommand"].get("http", 0.0))
                off, on = statistics.median(runs["off"]), statistics.median(runs["on"])
                # the listener's own CPU per command, beside what the whole pipeline spends
                R["httpCost"][f"{t}/batch{b}"] = {"off": runs["off"], "on": runs["on"], "medianOff": off,
                                                  "medianOn": on, "costPercent": round(100 * (off - on) / off, 1),
                                                  "listenerCpuUsPerCommand": statistics.median(http_us),
                                                  "listenerCpuShareOfMachine": round(
                                                      statistics.median(http_us) * on / 1e6 / os.cpu_count(), 4)}
        print()
        print(f"{'HTTP listener on vs off':24} {'median off':>11} {'median on':>10} {'cost':>7} {'cv-http us/cmd':>15}"
              f" {'of the CPUs':>12}   runs (cmd/s)")
        for key, v in R["httpCost"].items():
            print(f"{key:24} {v['medianOff']:11.0f} {v['medianOn']:10.0f} {v['costPercent']:6.1f}% "
                  f"{v['listenerCpuUsPerCommand']:15.2f} {100 * v['listenerCpuShareOfMachine']:11.2f}%   off "
                  + ", ".join(f"{x:.0f}" for x in v["off"]) + "; on " + ", ".join(f"{x:.0f}" for x in v["on"]))
        print()
        return R

    def ratios(self):
        R = self.results
        runs = [R["pgbench"]["x1"]["commandsPerSecond"]] + [x["commandsPerSecond"] for x in R["pgbench"].get("x1Again", [])]
        limit1 = statistics.median(runs)
        R["pgbench"]["x1Limit"] = {"commandsPerSecond": limit1, "runs": runs,
                                   "note": "the median of every pgbench x1 run of this benchmark"}
        rows = []
        for key, v in R["conveyor"].items():
            full = v["full"]
            t = full["transport"]
            broker = R["brokerAlone"][t]["perSecond"]
            v["ratios"] = {"toPgbenchX1": round(full["commandsPerSecond"] / limit1, 2),
                           "toPgbenchX1Before": (round(full["commandsPerSecond"] / full["pgbenchX1Before"], 2)
                                                 if "pgbenchX1Before" in full else None),
                           "toPgbenchX10": round(full["commandsPerSecond"] / R["pgbench"]["x10"]["commandsPerSecond"], 2),
                           "toBrokerAlone": round(full["commandsPerSecond"] / broker, 2),
                           "toWorkerSqlAlone": round(full["commandsPerSecond"] /
                                                     R["pgbench"]["conveyorSqlX1"]["commandsPerSecond"], 2)}
            rows.append((key, full, v.get("halfRate"), v["ratios"]))
        R["targets"] = targets(R)
        print_table(R, rows)


def command(rnd, mixed, products):
    r = rnd.random() if mixed else 0
    if r < 0.90:
        return {"type": "updateStock", "payload": {"productId": product_id(rnd.randint(1, products)),
                                                   "quantityChange": rnd.choice((-1, 1))}}
    if r < 0.99:
        return {"type": "createProduct", "payload": {"name": f"bench {rnd.random()}", "price": "1.50", "stock": 5}}
    u = uuid.UUID(int=rnd.getrandbits(128), version=4)
    return {"type": "register", "payload": {"name": "Bench User", "email": f"{u}@bench.example",
                                            "password": "Bench1234"}}


def pct(sorted_values, p):
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, int(round(p / 100 * (len(sorted_values) - 1))))
    return round(sorted_values[i], 1)


class Scraper(threading.Thread):
    """GET /metrics every second (a Prometheus scrapes every 15 s or so: this is
    the heavy case), and what an open dashboard reads (its overview every
    second, the hour's history every 2 s, the dead letters every 3 s), counting
    the answers."""

    def __init__(self, port):
        super().__init__(daemon=True)
        base = f"http://127.0.0.1:{port}"
        self.urls = [[f"{base}/metrics", f"{base}/api/overview"], [f"{base}/api/history?range=hour"],
                     [f"{base}/api/dead"]]
        self.ok = self.failed = 0
        self.halt = threading.Event()
        self.start()

    def run(self):
        tick = 0
        while True:
            urls = self.urls[0] + (self.urls[1] if tick % 2 == 0 else []) + (self.urls[2] if tick % 3 == 0 else [])
            for url in urls:
                try:
                    with urllib.request.urlopen(url, timeout=5) as r:
                        r.read()
                        self.ok += 1
                except Exception:  # any failure is counted (the run then reports it), never ends the thread
                    self.failed += 1
            tick += 1
            if self.halt.wait(1.0):
                return

    def stop(self):
        self.halt.set()
        self.join()
        return {"ok": self.ok, "failed": self.failed}


def wait_ready(pool, log_path, consumers, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = open(log_path).read()
        if ("relay active" in text or "standing by" in text) and text.count("consuming queue") >= consumers:
            return
        if pool.poll() is not None:
            raise RuntimeError(f"conveyor-workers exited {pool.returncode}:\n{text}")
        time.sleep(0.05)
    raise RuntimeError("the pool did not become ready:\n" + open(log_path).read())


class MemorySampler(threading.Thread):
    """RSS of every process of the pool (its session), sampled every 100 ms, by
    process name (cv-worker-<queue>, cv-relay, cv-reaper, conveyor-workers);
    VmHWM (the kernel's peak) read at the end."""

    def __init__(self, sid):
        super().__init__(daemon=True)
        self.sid, self.stopped, self.peak = sid, False, {}

    def procs(self):
        out = {}
        for p in os.listdir("/proc"):
            if not p.isdigit():
                continue
            try:
                if os.getsid(int(p)) != self.sid:
                    continue
                st = dict(line.split(":", 1) for line in open(f"/proc/{p}/status").read().splitlines() if ":" in line)
                out[int(p)] = (st["Name"].strip(), int(st["VmRSS"].split()[0]), int(st["VmHWM"].split()[0]))
            except (OSError, KeyError, ValueError):
                pass
        return out

    def run(self):
        while not self.stopped:
            for pid, (name, rss, hwm) in self.procs().items():
                p = self.peak.setdefault(pid, [name, 0, 0])
                p[1], p[2] = max(p[1], rss), max(p[2], hwm)
            time.sleep(0.1)

    def current(self):
        return {pid: (name, rss) for pid, (name, rss, _) in self.procs().items()}

    def stop(self):
        for pid, (name, rss, hwm) in self.procs().items():
            p = self.peak.setdefault(pid, [name, 0, 0])
            p[2] = max(p[2], hwm)
        self.stopped = True
        self.join(2)

    def report(self, half, end):
        by_name = {}
        for pid, (name, sampled, hwm) in self.peak.items():
            by_name.setdefault(name, []).append({"pid": pid, "sampledPeakKB": sampled, "vmHWMKB": hwm,
                                                 "halfwayKB": (half or {}).get(pid, (0, None))[1],
                                                 "endKB": (end or {}).get(pid, (0, None))[1]})
        # the measured pool; a process name is cut to 15 bytes (cv-worker-catal)
        workers = [x for n, xs in by_name.items() if n.startswith("cv-worker-cat") for x in xs]
        return {"byProcess": by_name,
                "workerEndKB": max((x["endKB"] or 0 for x in workers), default=None),
                "workerHalfwayKB": max((x["halfwayKB"] or 0 for x in workers), default=None),
                "workerPeakKB": max((x["vmHWMKB"] for x in workers), default=None)}


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds():
    """CPU seconds used so far, by component: every process on the machine read
    from /proc (user + system), with what exited counted through its parent
    (a server's cutime / cstime holds its reaped children: PostgreSQL's
    finished backends, the pool's finished workers) and through this process
    (the producer and pgbench it ran, and its own Python)."""
    procs = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            text = open(f"/proc/{p}/stat").read()
        except OSError:
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        f = text[text.rindex(")") + 2:].split()
        procs[int(p)] = (comm, int(f[1]), int(f[11]) + int(f[12]), int(f[13]) + int(f[14]))
    out = {}
    for pid, (comm, ppid, own, children) in procs.items():
        parent = procs.get(ppid, ("",))[0]
        group = ("postgres" if comm == "postgres" else "rabbitmq" if comm == "beam.smp" or parent == "beam.smp"
                 else "redis" if comm == "redis-server" else "workers" if comm.startswith("cv-worker")
                 else "relay" if comm == "cv-relay" else "pool" if comm in ("conveyor-worker", "cv-reaper")
                 else "http" if comm == "cv-http"
                 else None)
        if group is None:
            continue
        # reaped children count through the top process of a group (the postmaster, not its backends)
        reaped = children if parent != comm else 0
        out[group] = out.get(group, 0) + (own + reaped) / TICK
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    out["bench"] = me.ru_utime + me.ru_stime
    out["clients"] = kids.ru_utime + kids.ru_stime  # pgbench, conveyor-produce, once they exited
    # the hypervisor's share: time this VM's CPUs were ready but ran another guest
    out["steal"] = int(open("/proc/stat").readline().split()[8]) / TICK
    return out


def cpu_per_command(before, after, n, seconds):
    """Microseconds of CPU per command by component between two cpu_seconds(),
    and the idle share of the machine's CPUs over seconds."""
    d = {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)}
    steal = d.pop("steal", 0)
    used = sum(d.values())
    return {"usPerCommand": {k: round(1e6 * v / n, 1) for k, v in sorted(d.items()) if v > 0},
            "idleShare": round(max(0.0, 1 - used / (seconds * os.cpu_count())), 3),
            "stealShare": round(steal / (seconds * os.cpu_count()), 3)}


class Profile:
    """A system-wide CPU profile (perf record -a, software clock, call graphs)
    for `seconds` from now: every process on the machine, idle included, so
    the shares say where the two cores went while Conveyor ran."""

    def __init__(self, seconds):
        self.data = tempfile.NamedTemporaryFile(prefix="conveyor-bench-", suffix=".perf", delete=False).name
        self.seconds = seconds
        self.proc = subprocess.Popen(["perf", "record", "-a", "-e", "cpu-clock", "-F", "499", "-g", "-q",
                                      "-o", self.data, "--", "sleep", str(seconds)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def report(self):
        if self.proc.wait(self.seconds + 60) != 0:
            raise RuntimeError(f"perf record failed: {self.proc.stderr.read()}")
        def shares(*sort, comm=None):
            cmd = ["perf", "report", "-i", self.data, "--stdio", "--no-children", "-g", "none",
                   "--percent-limit", "1", "--sort", ",".join(sort)]
            if comm:
                cmd += ["--comms", comm]
            out = sh(*cmd).stdout
            rows = []
            for line in out.splitlines():
                m = re.match(r"\s*([0-9.]+)%\s+(.*\S)", line)
                if m:
                    rows.append([float(m.group(1)), re.sub(r"\s{2,}", "  ", m.group(2))])
            return rows
        return {"data": self.data, "seconds": self.seconds,
                "byProcess": shares("comm"),
                "postgresBySymbol": shares("dso,sym", comm="postgres")[:15],
                "byProcessAndDso": shares("comm,dso")[:25]}


def print_profile(what, p):
    print(f"\nprofile of {what} ({p['seconds']} s, perf record -a; {p['data']}):", file=sys.stderr)
    for title, key in (("share of all CPU time, by process", "byProcess"),
                       ("by process and library", "byProcessAndDso"),
                       ("postgres backends, by function (share of postgres' time)", "postgresBySymbol")):
        print(f"  {title}:", file=sys.stderr)
        for pct_, name in p[key]:
            print(f"    {pct_:6.2f}%  {name}", file=sys.stderr)


def targets(R):
    out = []
    for key, v in R["conveyor"].items():
        full, half = v["full"], v.get("halfRate")
        if full["mixed"]:
            continue
        want = 0.8 if full["batchSize"] == 1 else 1.5
        out.append({"what": f"{key}: >= {want} x pgbench x1 (median)", "value": v["ratios"]["toPgbenchX1"],
                    "met": v["ratios"]["toPgbenchX1"] >= want})
        if half:
            out.append({"what": f"{key}: p99 at half rate < 50 ms", "value": half["latencyMs"]["p99"],
                        "met": half["latencyMs"]["p99"] is not None and half["latencyMs"]["p99"] < 50})
        out.append({"what": f"{key}: worker RSS < 10 MB", "value": full["rss"]["workerEndKB"],
                    "met": (full["rss"]["workerEndKB"] or 0) < 10 * 1024})
        grow = (full["rss"]["workerEndKB"] or 0) - (full["rss"]["workerHalfwayKB"] or 0)
        out.append({"what": f"{key}: worker RSS growth from half-way to end < 512 kB", "value": grow,
                    "met": grow < 512})
    return out


def print_table(R, rows):
    p1, p10 = R["pgbench"]["x1"], R["pgbench"]["x10"]
    print()
    print(f"machine: {R['machine']['cpus']} CPUs, {R['machine']['memGB']} GB; {R['machine']['kernel']}")
    print(f"{'what':34} {'cmd/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'RSS kB':>8}   ratios")
    lim = R["pgbench"]["x1Limit"]
    print(f"{'pgbench 1 cmd/tx (the limit)':34} {lim['commandsPerSecond']:8.0f}   median of "
          f"{len(lim['runs'])} runs: " + ", ".join(f"{x:.0f}" for x in lim["runs"]))
    print(f"{'pgbench 10 cmd/tx':34} {p10['commandsPerSecond']:8.0f}")
    pc = R["pgbench"]["conveyorSqlX1"]
    print(f"{'pgbench, all of a worker' + chr(39) + 's SQL':34} {pc['commandsPerSecond']:8.0f} "
          f"{'':35}   {pc['commandsPerSecond'] / lim['commandsPerSecond']:.2f} x pgbench1 (batch 1, no broker)")
    for t, b in R["brokerAlone"].items():
        print(f"{t + ' alone (confirms + acks)':34} {b['perSecond']:8.0f}")
    for key, full, half, ratios in rows:
        l = full["latencyMs"]
        print(f"{'conveyor ' + key:34} {full['commandsPerSecond']:8.0f} {l['p50']:8} {l['p99']:8} {l['max']:8} "
              f"{full['rss']['workerEndKB'] or 0:8}   {ratios['toPgbenchX1']:.2f} x pgbench1 "
              f"({ratios['toPgbenchX1Before'] or 0:.2f} x the run before it), "
              f"{ratios['toPgbenchX10']:.2f} x pgbench10, {ratios['toBrokerAlone']:.2f} x broker, "
              f"{ratios['toWorkerSqlAlone']:.2f} x worker SQL")
        if half:
            l = half["latencyMs"]
            print(f"{'  at half rate ' + str(int(half['targetRate'])) + '/s':34} {half['commandsPerSecond']:8.0f} "
                  f"{l['p50']:8} {l['p99']:8} {l['max']:8}")
    print()
    print("CPU per command, microseconds (all processes of each part; clients: pgbench or conveyor-produce;"
          " bench: this script;\n steal: the share of the machine's CPU time the hypervisor gave another guest)")
    groups = ("postgres", "rabbitmq", "redis", "workers", "relay", "pool", "clients", "bench")
    print(f"{'what':34} " + " ".join(f"{g:>8}" for g in groups) + f" {'idle':>6} {'steal':>6}")
    parts = [("pgbench 1 cmd/tx", p1), ("pgbench 10 cmd/tx", p10), ("pgbench, all of a worker's SQL", pc)]
    parts += [("conveyor " + key, full) for key, full, _, _ in rows]
    for name, part in parts:
        c = part["cpu"]
        print(f"{name:34} " + " ".join(f"{c['usPerCommand'].get(g, 0):8.0f}" for g in groups) +
              f" {100 * c['idleShare']:5.0f}% {100 * c.get('stealShare', 0):5.0f}%")
    print()
    for t in R["targets"]:
        print(f"  [{'met' if t['met'] else 'NOT MET'}] {t['what']}: {t['value']}")
    print()


def machine():
    mem = int(open("/proc/meminfo").readline().split()[1]) // (1024 * 1024)
    return {"cpus": os.cpu_count(), "memGB": mem, "kernel": os.uname().release,
            "cpuModel": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                              if line.startswith("model name")), "?")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--commands", type=int, default=100000, help="updateStock commands per full-speed run")
    ap.add_argument("--latency-commands", type=int, default=0,
                    help="commands of the half-rate run (default: 10 s worth)")
    ap.add_argument("--mixed-commands", type=int, default=20000,
                    help="commands of the mixed run, 0 to skip (90%% updateStock, 9%% createProduct, 1%% register)")
    ap.add_argument("--products", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=4, help="catalog workers; pgbench uses as many connections")
    ap.add_argument("--prefetch", type=int, default=16,
                    help="the pool's prefetch (raised to 2 x batch_size when that is more)")
    ap.add_argument("--batch-sizes", default="1,50", help="comma-separated batch_size values to run")
    ap.add_argument("--transports", default="rabbitmq,redis")
    ap.add_argument("--pgbench-seconds", type=int, default=15)
    ap.add_argument("--broker-messages", type=int, default=100000)
    ap.add_argument("--profile", type=int, default=0, metavar="SECONDS",
                    help="record a system-wide perf profile for SECONDS of each full-speed run, print where "
                         "the CPU went, keep the data for perf report")
    ap.add_argument("--smoke", action="store_true", help="tiny figures, to check that the benchmark works")
    ap.add_argument("--http", action="store_true",
                    help="only the HTTP listener's cost: --http-rounds pairs of full-speed runs, off and on")
    ap.add_argument("--http-rounds", type=int, default=3)
    ap.add_argument("--json", default=os.path.join(HERE, "results.json"), help="where the figures go")
    a = ap.parse_args()
    try:
        a.batch_sizes = [int(x) for x in a.batch_sizes.split(",")]
        a.transports = a.transports.split(",")
        assert all(t in ("rabbitmq", "redis") for t in a.transports) and all(b >= 1 for b in a.batch_sizes)
    except (ValueError, AssertionError):
        ap.error("--batch-sizes takes positive integers, --transports rabbitmq and/or redis")
    if a.smoke:
        a.commands, a.latency_commands, a.mixed_commands = 600, 200, 150
        a.pgbench_seconds, a.broker_messages = 2, 2000
    try:
        results = Bench(a).http_cost() if a.http else Bench(a).run()
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"bench: failed: {e}", file=sys.stderr)
        return 1
    with open(a.json, "w") as f:
        json.dump(results, f, indent=1)
    log(f"figures written to {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
