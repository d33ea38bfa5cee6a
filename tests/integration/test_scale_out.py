"""Scale out across hosts (docs/scaling.md): pools on two test hosts against a
clustered broker and a PostgreSQL on hosts of their own (tests/hosts.sh,
cluster.py), with faults between machines.

  cvh1 cvh2 cvh3   the broker: three RabbitMQ nodes (quorum queues), or a Redis
                   primary (cvh1), its replica (cvh2) and Sentinels (cvh3-5)
  cvh4 cvh5        a pool each (HTTP listener on the host's address); on RabbitMQ
                   cvh5's link is slow and lossy (tests/hosts.sh throttle)
  cvh6             the producer (conveyor-produce, the nodes' URL list / Sentinel)
  cvh7             PostgreSQL

A test whose name ends in _rabbitmq runs on the rabbitmq transport only, one
ending in _redis on redis only (tests/CMakeLists.txt). Figures are printed, and
written to docs/scaling.md by hand; nothing here is timed against a limit
except "within a few seconds" of a takeover (a generous 30 s bound)."""
import json
import os
import random
import subprocess
import threading
import time

import pika
import redis as redislib

import cluster
from cluster import Postgres, RabbitCluster, RedisSentinel, addr, metric, on, wait_for
from harness import BIN, Failure, Pool, check, eq, log_file, run_bin, write_config

POOL_HOSTS = ("cvh4", "cvh5")
PRODUCER, PG_HOST = "cvh6", "cvh7"
HTTP_PORT = 9464
PRODUCTS, STOCK = 40, 100000
QUEUE_OPTS = 'batch_size = 20;'


def phase_clock():
    t0 = time.time()

    def phase(what):
        print(f"{time.time() - t0:6.1f} s  {what}", flush=True)
    return phase


def pools_config(h):
    return f'http: {{ listen = "{addr(h)}:{HTTP_PORT}"; }};'


def start_pools(env, queue_opts, extra=""):
    return {h: Pool(env=env, workers={"catalog": 2, "users": 0, "orders": 0}, queue_opts=queue_opts,
                    extra=pools_config(h) + extra, wrap=on(h)) for h in POOL_HOSTS}


def stop_cleanly(pools):
    """Stops every pool of pools ({host: Pool}), each with exit 0 and nothing left running."""
    for h, p in pools.items():
        code, left = p.stop()
        eq((code, left), (0, []), f"the pool on {h} stops cleanly")


def stop_anyway(pools):
    """Stops what is left of pools after a failure (said, not raised: the hosts go anyway)."""
    for p in pools.values():
        try:
            if p.proc.poll() is None:
                p.stop()
        except Exception as e:
            print(f"stopping a pool: {e}")


def relay_host(pools):
    """The pool host whose relay is active now (its last relay line says so)."""
    for h, p in pools.items():
        lines = [l for l in p.read_log().splitlines() if "relay active" in l or "another relay is active; standing by" in l]
        if lines and "relay active" in lines[-1]:
            return h
    return None


class Producer:
    """conveyor-produce on PRODUCER reading commands from its standard input,
    fed at `rate` lines a second (so that a fault falls in the middle); the ids
    it prints (each confirmed by the broker) are counted as they come."""

    def __init__(self, config, env, lines, rate=4000):
        e = dict(os.environ)
        e.update(env)
        self.err = log_file("conveyor-produce-")
        self.proc = subprocess.Popen([*on(PRODUCER), os.path.join(BIN, "conveyor-produce"), "-c", config],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True, env=e)
        self.confirmed = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.feeder = threading.Thread(target=self._feed, args=([json.dumps(l) for l in lines], rate), daemon=True)
        self.feeder.start()

    def _feed(self, lines, rate):
        step = max(1, rate // 20)
        for i in range(0, len(lines), step):
            self.proc.stdin.write("\n".join(lines[i:i + step]) + "\n")
            self.proc.stdin.flush()
            time.sleep(0.05)
        self.proc.stdin.close()

    def _read(self):
        for line in self.proc.stdout:
            self.confirmed.append(line.strip())

    def wait(self, timeout=300):
        self.feeder.join(timeout)
        rc = self.proc.wait(timeout)
        self.reader.join(10)
        with open(self.err.name) as f:
            return rc, f.read()


def commands(pids, n, seed):
    rnd = random.Random(seed)
    return [{"type": "updateStock", "payload": {"productId": rnd.choice(pids), "quantityChange": -1},
             "id": str(__import__("uuid").uuid4())} for _ in range(n)]


def largest_gap(times, t, window=15.0):
    """The longest time without an event arriving in [t, t + window] (what a
    fault at t cost the events' flow)."""
    ts = [t] + [x for x in times if t < x <= t + window]
    return max((b - a for a, b in zip(ts, ts[1:])), default=window)


def check_outcome(pg, updates, events, pids):
    """Every command applied once, stocks exact, a result for each, and each
    product's stock.updated events, in the order they first arrived, in commit
    order (each one's previousStock is the stock of the one before)."""
    ids = [u["id"] for u in updates]
    eq(pg.query("SELECT count(*) FROM processed_commands WHERE id = ANY(%s::uuid[]) AND outcome = 'applied'", ids),
       [(len(ids),)], "every command applied")
    for pid in pids:
        want = STOCK - sum(1 for u in updates if u["payload"]["productId"] == pid)
        eq(pg.query("SELECT stock FROM products WHERE id = %s", pid), [(want,)], f"stock of {pid}")
    seen, per_product, results = set(), {}, {}
    for ev in events:
        if ev["id"] in seen:
            continue  # a duplicate (sent again after a lost confirm): the contract's key drops it
        seen.add(ev["id"])
        if ev["type"] == "stock.updated":
            results.setdefault(ev["commandId"], []).append(ev["id"])
            per_product.setdefault(ev["data"]["productId"], []).append(ev["data"])
    missing = [i for i in ids if i not in results]
    eq(missing[:5], [], f"a result event for every command ({len(missing)} missing)")
    eq([c for c, e in results.items() if len(e) != 1][:5], [], "one result event (by id) per command")
    for pid, datas in per_product.items():
        for a, b in zip(datas, datas[1:]):
            if b["previousStock"] != a["stock"]:
                raise Failure(f"events of product {pid} out of commit order: stock {a['stock']} then "
                              f"previousStock {b['previousStock']}")
    return len(events) - len(seen)


class AmqpEvents:
    """Every event from the events exchange, through one node, consumed by a thread."""

    def __init__(self, url):
        self.events, self.times = [], []
        self.conn = pika.BlockingConnection(pika.URLParameters(url))
        ch = self.conn.channel()
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.queue_bind(q, "conveyor.events", "#")
        ch.basic_consume(q, self._on, auto_ack=True)
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _on(self, ch, method, props, body):
        self.events.append(json.loads(body))
        self.times.append(time.time())

    def _run(self):
        while not self.stop:
            self.conn.process_data_events(time_limit=0.2)

    def close(self):
        self.stop = True
        self.thread.join(5)
        self.conn.close()


class StreamEvents:
    """Every event of the conveyor:events stream, read from the primary the
    Sentinels name (again after a failover, from the last id read)."""

    def __init__(self, rs):
        self.rs, self.events, self.times = rs, [], []
        self.last, self.stop = b"0-0", False
        r = self._primary()
        top = r.xrevrange("conveyor:events", count=1)
        self.last = top[0][0] if top else b"0-0"
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _primary(self):
        a = wait_for("a primary named by Sentinel", self.rs.primary, timeout=30)
        return redislib.Redis(host=a[0], port=a[1], socket_timeout=3)

    def _run(self):
        r = self._primary()
        while not self.stop:
            try:
                for _, entries in r.xread({"conveyor:events": self.last}, count=1000, block=200) or []:
                    for eid, fields in entries:
                        self.last = eid
                        self.events.append(json.loads(fields[b"event"]))
                        self.times.append(time.time())
            except redislib.RedisError:
                time.sleep(0.2)
                try:
                    r = self._primary()
                except Failure:
                    pass

    def close(self):
        self.stop = True
        self.thread.join(5)


def await_takeover(pools, other, t, events, before, phase, what):
    """Waits for the relay of the pool on `other` to become active after a fault at
    t, and for an event it published; returns the seconds the takeover took."""
    wait_for(f"the relay on {other} to take over",
             lambda: "relay active" in pools[other].read_log(), timeout=30, every=0.05)
    takeover = time.time() - t
    # the relay it replaces can publish nothing more: later events are the new relay's
    wait_for("events from the new relay", lambda: any(x > t + takeover for x in events.times[before:]),
             timeout=30, every=0.05)
    phase(f"relay on {other} active {takeover:.1f} s after {what}")
    return takeover


def await_every_result(pg, prod, updates, events, phase):
    """The producer done with every command confirmed once, every command
    applied, and a result event for each. Returns the producer's stderr."""
    code, err = prod.wait(300)
    eq(code, 0, f"the producer got every command confirmed across the faults ({err[-2000:]})")
    eq(len(set(prod.confirmed)), len(updates), "every id printed once")
    phase(f"{len(updates):,} published and confirmed")
    wait_for("every command applied",
             lambda: pg.query("SELECT count(*) FROM processed_commands")[0][0] - PRODUCTS >= len(updates),
             timeout=300, every=0.5)
    ids = {u["id"] for u in updates}
    wait_for("every result event",
             lambda: ids <= {e["commandId"] for e in list(events.events) if e["type"] == "stock.updated"},
             timeout=120, every=0.5)
    phase("every command applied, every result received")
    return err


def check_took_part(took, phase):
    phase(f"commands settled per pool: {took}")
    for h, n in took.items():
        check(n > 0, f"the pool on {h} took part ({took})")


def seed_products(pg, config, env, phase):
    creates = [{"type": "createProduct", "payload": {"name": f"Host {i}", "price": "1.00", "stock": STOCK}}
               for i in range(PRODUCTS)]
    p = Producer(config, env, creates)
    rc, err = p.wait(120)
    eq(rc, 0, f"creates published ({err})")
    wait_for("the products", lambda: pg.query("SELECT count(*) FROM products") == [(PRODUCTS,)], timeout=60)
    phase(f"{PRODUCTS} products")
    return [r[0] for r in pg.query("SELECT id::text FROM products ORDER BY id")]


def test_cluster_node_loss_and_a_partitioned_pool_rabbitmq():
    phase = phase_clock()
    cluster.setup(7)
    pools = {}
    try:
        pg = Postgres(PG_HOST)
        rc = RabbitCluster(("cvh1", "cvh2", "cvh3"))
        phase("PostgreSQL and a three-node RabbitMQ cluster up")
        env = {"CONVEYOR_DATABASE_URL": pg.url, "CONVEYOR_RABBITMQ_URL": rc.urls(), "CONVEYOR_TRANSPORT": "rabbitmq"}
        queue_opts = QUEUE_OPTS + ' queue_type = "quorum";'
        config = write_config({"catalog": 2}, queue_opts=queue_opts)
        r = run_bin("conveyor-workers", "-c", config, "--setup", env=env, timeout=120)
        eq(r.returncode, 0, f"--setup on the cluster ({r.stderr})")
        leader = rc.leader("conveyor.catalog", via="cvh1")
        for h in rc.hosts:  # a quorum queue with a member on every node
            out = rc.ctl(h, "list_queues", "name", "type", "members", "--formatter", "json").stdout
            q = [q for q in json.loads(out) if q["name"] == "conveyor.catalog"][0]
            eq((q["type"], len(q["members"])), ("quorum", 3), f"conveyor.catalog as seen from {h}")
        # every process connects to the first node of its list: the leader's, so that all must move
        env["CONVEYOR_RABBITMQ_URL"] = ",".join(rc.url(h) for h in [leader] + [h for h in rc.hosts if h != leader])
        watcher = [h for h in rc.hosts if h != leader][0]
        events = AmqpEvents(rc.url(watcher))
        pools = start_pools(env, queue_opts)
        phase(f"pools on {', '.join(POOL_HOSTS)}; the queue's leader is on {leader}")
        pids = seed_products(pg, config, env, phase)

        # pool B's host on a slow, lossy link all along (tc tbf: 4 Mbit/s, a queue of 20 ms, the rest dropped)
        cluster.hosts("throttle", "cvh5", "4mbit")
        updates = commands(pids, 20000, seed=16)
        prod = Producer(config, env, updates, rate=1000)  # 20 s of commands
        wait_for("5,000 confirmed", lambda: len(prod.confirmed) >= 5000, timeout=120, every=0.02)
        conns = rc.ctl(leader, "list_connections", "name").stdout.split("\n")
        check(len([c for c in conns if c.strip()]) >= 10, f"the pools, the relay and the producer on {leader}: {conns}")
        rc.kill(leader)
        t_kill = time.time()
        phase(f"killed node {leader} (the queue's leader, {len(conns)} connections) with {len(prod.confirmed)} confirmed")
        done = lambda: pg.query("SELECT count(*) FROM processed_commands")[0][0] - PRODUCTS
        wait_for("10,000 confirmed", lambda: len(prod.confirmed) >= 10000, timeout=120, every=0.02)
        holder = wait_for("an active relay", lambda: relay_host(pools), timeout=30)
        other = [h for h in POOL_HOSTS if h != holder][0]
        before = len(events.events)
        cluster.hosts("partition", holder)
        t_part = time.time()
        phase(f"partitioned {holder} (its pool's relay is active) with {done()} applied")
        takeover = await_takeover(pools, other, t_part, events, before, phase, "the partition")
        time.sleep(max(0.0, 20 - (time.time() - t_part)))
        cluster.hosts("heal", holder)
        phase(f"healed {holder} after {time.time() - t_part:.1f} s")
        err = await_every_result(pg, prod, updates, events, phase)
        took = {h: metric(h, HTTP_PORT, "conveyor_commands_total", queue="catalog") for h in POOL_HOSTS}
        check_took_part(took, phase)
        events.close()
        dups = check_outcome(pg, updates, events.events, pids)
        stats = cluster.run_on("cvh5", "tc", "-s", "qdisc", "show", "dev", "eth0").stdout
        dropped = int(stats.split("dropped ")[1].split(",")[0]) if "dropped " in stats else -1
        phase(f"cvh5's throttled link dropped {dropped} packets")
        check(dropped > 0, f"the throttled link dropped packets: {stats}")
        for h, p in pools.items():
            check("trying node 2 of 3" in p.read_log(), f"the pool on {h} moved to the next node")
        stop_cleanly(pools)
        pools = {}
        check("trying node 2 of 3" in err, f"the producer moved to the next node: {err[-2000:]}")
        node_gap = largest_gap(events.times, t_kill, t_part - t_kill)  # up to the partition
        part_gap = largest_gap(events.times, t_part, 15)
        print(f"FIGURES rabbitmq-cluster: the leader node's loss stopped the events for {node_gap:.1f} s at most; "
              f"relay takeover {takeover:.1f} s after the partition, the events stopped for {part_gap:.1f} s; "
              f"{dups} duplicate deliveries; per pool {took}")
    finally:
        stop_anyway(pools)
        cluster.teardown()
        phase("torn down")


def test_sentinel_failover_and_a_killed_pool_redis():
    phase = phase_clock()
    cluster.setup(7)
    pools = {}
    try:
        pg = Postgres(PG_HOST)
        rs = RedisSentinel("cvh1", "cvh2", ("cvh3", "cvh4", "cvh5"))
        phase("PostgreSQL, a Redis primary, its replica and three Sentinels up")
        env = {"CONVEYOR_DATABASE_URL": pg.url, "CONVEYOR_REDIS_URL": rs.url(), "CONVEYOR_TRANSPORT": "redis"}
        wait = "redis: { wait_replicas = 1; wait_timeout_ms = 15000; };"
        config = write_config({"catalog": 2}, extra=wait, queue_opts=QUEUE_OPTS)
        r = run_bin("conveyor-workers", "-c", config, "--setup", env=env, timeout=120)
        eq(r.returncode, 0, f"--setup ({r.stderr})")
        events = StreamEvents(rs)
        pools = start_pools(env, QUEUE_OPTS, extra=wait)
        phase(f"pools on {', '.join(POOL_HOSTS)}")
        pids = seed_products(pg, config, env, phase)

        updates = commands(pids, 5000, seed=17)
        prod = Producer(config, env, updates, rate=250)  # 20 s of commands
        wait_for("1,500 confirmed", lambda: len(prod.confirmed) >= 1500, timeout=120, every=0.02)
        rs.kill("cvh1")
        t_kill = t_primary_kill = time.time()
        phase(f"killed the primary (cvh1) with {len(prod.confirmed)} confirmed")
        wait_for("the Sentinels to name the replica", lambda: rs.primary() == (addr("cvh2"), 6379), timeout=60)
        failover = time.time() - t_kill
        phase(f"the Sentinels name cvh2 {failover:.1f} s after the kill; cvh1 comes back (it will be a replica)")
        d = os.path.join(cluster.STATE, "redis-cvh1")
        rs.procs["cvh1"] = cluster.spawn("cvh1", "redis-server", "--bind", addr("cvh1"), "--port", "6379",
                                         "--protected-mode", "no", "--dir", d, "--appendonly", "yes",
                                         "--appendfsync", "everysec", name="redis-cvh1-again")
        wait_for("a replica again", lambda: rs.info("cvh2", "replication").get("connected_slaves", 0) >= 1, timeout=60)
        phase(f"cvh1 is cvh2's replica {time.time() - t_kill:.1f} s after the kill")
        wait_for("3,500 confirmed", lambda: len(prod.confirmed) >= 3500, timeout=120, every=0.02)
        done = lambda: pg.query("SELECT count(*) FROM processed_commands")[0][0] - PRODUCTS
        holder = wait_for("an active relay", lambda: relay_host(pools), timeout=30)
        other = [h for h in POOL_HOSTS if h != holder][0]
        took_before = metric(holder, HTTP_PORT, "conveyor_commands_total", queue="catalog")
        before = len(events.events)
        pools[holder].proc.kill()  # the supervisor; its children see it go
        os.killpg(pools[holder].proc.pid, 9)
        t_kill = time.time()
        phase(f"killed the pool on {holder} (its relay active, {took_before:.0f} commands settled) with {done()} applied")
        takeover = await_takeover(pools, other, t_kill, events, before, phase, "the kill")
        pools[holder].expect_restarts = True
        await_every_result(pg, prod, updates, events, phase)
        took = {holder: took_before, other: metric(other, HTTP_PORT, "conveyor_commands_total", queue="catalog")}
        check_took_part(took, phase)
        events.close()
        dups = check_outcome(pg, updates, events.events, pids)
        code, left = pools[other].stop()
        eq((code, left), (0, []), f"the pool on {other} stops cleanly")
        pools = {}
        print(f"FIGURES redis-sentinel: failover named in {failover:.1f} s, the events stopped for "
              f"{largest_gap(events.times, t_primary_kill, t_kill - t_primary_kill):.1f} s at most; relay takeover {takeover:.1f} s after a "
              f"pool kill, the events stopped for {largest_gap(events.times, t_kill, 10):.1f} s; {dups} duplicate "
              f"deliveries; per pool {took}")
    finally:
        stop_anyway(pools)
        cluster.teardown()
        phase("torn down")
