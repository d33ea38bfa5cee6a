"""A hung broker node (issue 21, point 1): a node frozen with its connections
open (SIGSTOP of its process: the kernel still holds its sockets, nothing
answers) must not stall the events. Every broker operation has a bound that
fires while the peer is silent (broker.reply_timeout_ms, docs/scaling.md "What a
hang costs"); then the process moves on: to the next node of its URL list, or to
the primary the Sentinels name after their failover.

  cvh1 cvh2 cvh3   three RabbitMQ nodes (quorum queues), or a Redis primary
                   (cvh1), its replica (cvh2) and Sentinels (cvh3-5)
  cvh4 cvh5        a pool each (HTTP listener on the host's address)
  cvh6             the producer
  cvh7             PostgreSQL

Under load, the node every process reaches first (RabbitMQ: a member of the
queue that does not lead it, so that only the clients' bounds are measured;
Redis: the primary) is frozen for FREEZE_S. Checked: the events flow again
within HANG_BOUND_S of the freeze (the documented bound with the default
settings), /readyz and conveyor_broker_stalled show the stall while it lasts,
every command is applied once (stocks exact, one result each) and the producer
got every command confirmed. Figures are printed (FIGURES ...) for
docs/scaling.md."""
import json
import os
import signal
import time
import urllib.error
import urllib.request

import cluster
from cluster import Postgres, RabbitCluster, RedisSentinel, addr, metric, wait_for
from harness import Pool, check, eq, run_bin, write_config
from test_scale_out import (HTTP_PORT, POOL_HOSTS, QUEUE_OPTS, AmqpEvents, Producer, StreamEvents,
                            await_every_result, check_outcome, commands, largest_gap, phase_clock, pools_config,
                            relay_host, seed_products, start_pools, stop_anyway, stop_cleanly)

FREEZE_S = 60
HANG_BOUND_S = 15.0  # docs/scaling.md: events flow again within 15 s of a node freezing (default settings)


def secs(t):
    return "never" if t is None else f"{t:.1f} s"


def readyz(h):
    """The pool's /readyz: (status code, its checks)."""
    try:
        with urllib.request.urlopen(f"http://{addr(h)}:{HTTP_PORT}/readyz", timeout=3) as r:
            return r.status, json.loads(r.read())["checks"]
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["checks"]
    except OSError:
        return None, {}


def watch_stall(events, t, phase, until):
    """Polls both pools' /readyz and conveyor_broker_stalled while the node is
    frozen, and the events' flow. Returns (seconds after t when a pool first
    showed the stall in its metrics, in /readyz; the events' first arrival
    after the freeze's largest gap)."""
    seen_metric = seen_ready = None
    while time.time() < until:
        now = time.time() - t
        for h in POOL_HOSTS:
            try:
                if seen_metric is None and metric(h, HTTP_PORT, "conveyor_broker_stalled") > 0:
                    seen_metric = now
                    phase(f"conveyor_broker_stalled > 0 on {h} {now:.1f} s after the freeze")
            except OSError:
                pass
            if seen_ready is None:
                code, checks = readyz(h)
                if code == 503 and checks.get("broker_stall", "ok") != "ok":
                    seen_ready = now
                    phase(f"/readyz of {h} says {checks['broker_stall']!r} {now:.1f} s after the freeze")
        time.sleep(0.25)
    return seen_metric, seen_ready


def frozen_run(phase, events, prod, freeze, thaw, what):
    """Freezes with freeze() once 1,000 commands are confirmed, watches for
    FREEZE_S, thaws. Returns (t_freeze, events gap, metric seen, readyz seen)."""
    wait_for("1,000 confirmed", lambda: len(prod.confirmed) >= 1000, timeout=120, every=0.02)
    freeze()
    t = time.time()
    phase(f"froze {what} (SIGSTOP) with {len(prod.confirmed)} confirmed")
    seen_metric, seen_ready = watch_stall(events, t, phase, t + FREEZE_S)
    thaw()
    phase(f"thawed {what} after {time.time() - t:.1f} s")
    gap = largest_gap(events.times, t, FREEZE_S)
    phase(f"the events stopped for {gap:.1f} s at most after the freeze")
    return t, gap, seen_metric, seen_ready


def check_hang(gap, seen_metric, seen_ready, what):
    check(gap <= HANG_BOUND_S, f"the events flowed again within {HANG_BOUND_S:.0f} s of {what} freezing "
                               f"(they stopped for {gap:.1f} s)")
    check(seen_metric is not None and seen_metric <= HANG_BOUND_S,
          f"conveyor_broker_stalled showed the stall within {HANG_BOUND_S:.0f} s (at {seen_metric})")
    check(seen_ready is not None and seen_ready <= HANG_BOUND_S,
          f"/readyz named the stalled broker within {HANG_BOUND_S:.0f} s (at {seen_ready})")


def test_frozen_node_rabbitmq():
    phase = phase_clock()
    cluster.setup(7)
    pools, frozen_pid = {}, None
    try:
        pg = Postgres("cvh7")
        rc = RabbitCluster(("cvh1", "cvh2", "cvh3"))
        phase("PostgreSQL and a three-node RabbitMQ cluster up")
        env = {"CONVEYOR_DATABASE_URL": pg.url, "CONVEYOR_RABBITMQ_URL": rc.urls(), "CONVEYOR_TRANSPORT": "rabbitmq"}
        queue_opts = QUEUE_OPTS + ' queue_type = "quorum";'
        config = write_config({"catalog": 2}, queue_opts=queue_opts)
        r = run_bin("conveyor-workers", "-c", config, "--setup", env=env, timeout=120)
        eq(r.returncode, 0, f"--setup on the cluster ({r.stderr})")
        leader = rc.leader("conveyor.catalog", via="cvh1")
        followers = [h for h in rc.hosts if h != leader]
        frozen, watcher = followers
        # every process reaches the frozen node first; the events are watched through a third
        env["CONVEYOR_RABBITMQ_URL"] = ",".join(rc.url(h) for h in [frozen, leader, watcher])
        events = AmqpEvents(rc.url(watcher))
        pools = start_pools(env, queue_opts)
        phase(f"pools on {', '.join(POOL_HOSTS)}; every process on {frozen} (the queue's leader is {leader})")
        pids = seed_products(pg, config, env, phase)
        updates = commands(pids, 16000, seed=21)
        prod = Producer(config, env, updates, rate=200)  # 80 s of commands: the freeze falls inside
        with open(rc.env(frozen)["RABBITMQ_PID_FILE"]) as f:
            frozen_pid = int(f.read().strip())
        holder = wait_for("an active relay", lambda: relay_host(pools), timeout=30)
        conns = rc.ctl(frozen, "list_connections", "name").stdout
        check(len([c for c in conns.split("\n") if c.strip()]) >= 6, f"the pools and the producer on {frozen}: {conns}")

        def freeze():
            os.kill(frozen_pid, signal.SIGSTOP)

        def thaw():
            os.kill(frozen_pid, signal.SIGCONT)

        t, gap, seen_metric, seen_ready = frozen_run(phase, events, prod, freeze, thaw, f"node {frozen}")
        frozen_pid = None
        after = relay_host(pools)
        phase(f"relay active on {holder} before the freeze, on {after} after it")
        await_every_result(pg, prod, updates, events, phase)
        events.close()
        dups = check_outcome(pg, updates, events.events, pids)
        stop_cleanly(pools)
        pools = {}
        print(f"FIGURES rabbitmq-frozen-node: the events stopped for {gap:.1f} s at most after node {frozen} froze "
              f"for {FREEZE_S} s; conveyor_broker_stalled at {secs(seen_metric)}, /readyz at {secs(seen_ready)}; relay on "
              f"{holder} then {after}; {dups} duplicate deliveries", flush=True)
        check_hang(gap, seen_metric, seen_ready, "a RabbitMQ node")
    finally:
        if frozen_pid:
            os.kill(frozen_pid, signal.SIGCONT)
        stop_anyway(pools)
        cluster.teardown()
        phase("torn down")


def test_frozen_primary_redis():
    phase = phase_clock()
    cluster.setup(7)
    pools, rs = {}, None
    try:
        pg = Postgres("cvh7")
        rs = RedisSentinel("cvh1", "cvh2", ("cvh3", "cvh4", "cvh5"))
        # a second replica (cvh3), so that the promoted one has a replica while cvh1 is frozen (wait_replicas = 1)
        d = os.path.join(cluster.STATE, "redis-cvh3")
        os.makedirs(d)
        rs.procs["cvh3"] = cluster.spawn("cvh3", "redis-server", "--bind", addr("cvh3"), "--port", "6379",
                                         "--protected-mode", "no", "--dir", d, "--save", "", "--appendonly", "yes",
                                         "--appendfsync", "everysec", "--replicaof", addr("cvh1"), "6379",
                                         name="redis-cvh3")
        wait_for("the second replica in sync",
                 lambda: rs.info("cvh3", "replication").get("master_link_status") == "up", timeout=60)
        phase("PostgreSQL, a Redis primary, two replicas and three Sentinels up")
        env = {"CONVEYOR_DATABASE_URL": pg.url, "CONVEYOR_REDIS_URL": rs.url(), "CONVEYOR_TRANSPORT": "redis"}
        wait = "redis: { wait_replicas = 1; };"  # wait_timeout_ms: the default (1000), a blocking WAIT's time
        config = write_config({"catalog": 2}, extra=wait, queue_opts=QUEUE_OPTS)
        r = run_bin("conveyor-workers", "-c", config, "--setup", env=env, timeout=120)
        eq(r.returncode, 0, f"--setup ({r.stderr})")
        events = StreamEvents(rs)
        pools = start_pools(env, QUEUE_OPTS, extra=wait)
        phase(f"pools on {', '.join(POOL_HOSTS)}")
        pids = seed_products(pg, config, env, phase)
        updates = commands(pids, 12000, seed=22)
        prod = Producer(config, env, updates, rate=150)  # 80 s of commands
        holder = wait_for("an active relay", lambda: relay_host(pools), timeout=30)
        proc = rs.procs["cvh1"]

        def freeze():
            proc.send_signal(signal.SIGSTOP)

        def thaw():
            proc.send_signal(signal.SIGCONT)

        t, gap, seen_metric, seen_ready = frozen_run(phase, events, prod, freeze, thaw, "the primary (cvh1)")
        named = rs.primary()
        phase(f"the Sentinels name {named} after the thaw")
        check(named is not None and named[0] != addr("cvh1"), f"the Sentinels failed over to a replica ({named})")
        after = relay_host(pools)
        phase(f"relay active on {holder} before the freeze, on {after} after it")
        await_every_result(pg, prod, updates, events, phase)
        events.close()
        dups = check_outcome(pg, updates, events.events, pids)
        stop_cleanly(pools)
        pools = {}
        print(f"FIGURES redis-frozen-primary: the events stopped for {gap:.1f} s at most after the primary froze "
              f"for {FREEZE_S} s; conveyor_broker_stalled at {secs(seen_metric)}, /readyz at {secs(seen_ready)}; relay on "
              f"{holder} then {after}; {dups} duplicate deliveries", flush=True)
        check_hang(gap, seen_metric, seen_ready, "the Redis primary")
    finally:
        if rs and rs.procs.get("cvh1") and rs.procs["cvh1"].poll() is None:
            rs.procs["cvh1"].send_signal(signal.SIGCONT)
        stop_anyway(pools)
        cluster.teardown()
        phase("torn down")


# ---- a relay cut off from its broker, a healthy pool beside it (issue 21, point 1) ----------------------

def cut_from_broker(h, ports):
    """Drops every packet between host h and the broker's ports (iptables in h's
    namespace, both ways): its connections stay open and nothing answers, while
    its path to PostgreSQL and its HTTP listener work."""
    for p in ports:
        cluster.run_on(h, "iptables", "-A", "OUTPUT", "-p", "tcp", "--dport", str(p), "-j", "DROP")
        cluster.run_on(h, "iptables", "-A", "INPUT", "-p", "tcp", "--sport", str(p), "-j", "DROP")


def heal_from_broker(h):
    cluster.run_on(h, "iptables", "-F")


def relay_cut_off_run(env, config, pg, events, ports, what):
    """Two pools (cvh4, cvh5); under load, the host whose pool holds the relay
    lock is cut off from every broker node (cut_from_broker) while the other's
    path works. Checked: the other pool's relay becomes active (its log, its
    conveyor_relay_active gauge) and the cut-off one's says 0; while the cut
    lasts, every command is applied and its result event arrives; nothing lost or
    applied twice, per product in commit order. Returns the figures line."""
    phase = phase_clock()
    pools = {}
    try:
        pools = start_pools(env, QUEUE_OPTS)
        phase(f"pools on {', '.join(POOL_HOSTS)}")
        pids = seed_products(pg, config, env, phase)
        updates = commands(pids, 12000, seed=23)
        prod = Producer(config, env, updates, rate=200)  # 60 s of commands: the cut falls inside
        wait_for("1,000 confirmed", lambda: len(prod.confirmed) >= 1000, timeout=120, every=0.02)
        holder = wait_for("an active relay", lambda: relay_host(pools), timeout=30)
        other = [h for h in POOL_HOSTS if h != holder][0]
        eq(metric(holder, HTTP_PORT, "conveyor_relay_active"), 1.0, f"conveyor_relay_active on {holder}")
        eq(metric(other, HTTP_PORT, "conveyor_relay_active"), 0.0, f"conveyor_relay_active on {other}")
        before = len(events.events)
        cut_from_broker(holder, ports)
        t = time.time()
        phase(f"cut {holder} (its pool holds the relay lock) off from {what}, with {len(prod.confirmed)} confirmed")
        wait_for(f"the relay on {other} to take over", lambda: "relay active" in pools[other].read_log(),
                 timeout=120, every=0.05)
        takeover = time.time() - t
        phase(f"relay on {other} active {takeover:.1f} s after the cut")
        check("giving up the relay lock" in pools[holder].read_log(),
              f"the relay on {holder} says it gave up its lock:\n{pools[holder].read_log()[-3000:]}")
        wait_for("events from the new relay", lambda: any(x > t + takeover for x in events.times[before:]),
                 timeout=60, every=0.05)
        eq(metric(other, HTTP_PORT, "conveyor_relay_active"), 1.0, f"conveyor_relay_active on {other} after the cut")
        eq(metric(holder, HTTP_PORT, "conveyor_relay_active"), 0.0, f"conveyor_relay_active on {holder} after the cut")
        gap = largest_gap(events.times, t, time.time() - t)
        # still cut off: the healthy pool alone applies the rest and publishes every event
        await_every_result(pg, prod, updates, events, phase)
        check(holder != relay_host(pools), f"{holder} did not take the relay back while cut off")
        heal_from_broker(holder)
        phase(f"healed {holder} after {time.time() - t:.1f} s")
        events.close()
        dups = check_outcome(pg, updates, events.events, pids)
        stop_cleanly(pools)
        pools = {}
        return (f"relay on {holder} cut off from {what}: the relay on {other} active {takeover:.1f} s after the cut, "
                f"the events stopped for {gap:.1f} s at most; {dups} duplicate deliveries")
    finally:
        stop_anyway(pools)


def test_a_relay_cut_off_from_the_broker_hands_over_rabbitmq():
    cluster.setup(7)
    try:
        pg = Postgres("cvh7")
        rc = RabbitCluster(("cvh1",))
        env = {"CONVEYOR_DATABASE_URL": pg.url, "CONVEYOR_RABBITMQ_URL": rc.urls(), "CONVEYOR_TRANSPORT": "rabbitmq"}
        config = write_config({"catalog": 2}, queue_opts=QUEUE_OPTS)
        r = run_bin("conveyor-workers", "-c", config, "--setup", env=env, timeout=120)
        eq(r.returncode, 0, f"--setup ({r.stderr})")
        events = AmqpEvents(rc.url("cvh1"))
        figures = relay_cut_off_run(env, config, pg, events, [5672], "RabbitMQ (cvh1)")
        print(f"FIGURES rabbitmq-relay-cut-off: {figures}", flush=True)
    finally:
        cluster.teardown()


class OneRedis:
    """A Redis server on host, alone (no Sentinel): what StreamEvents reads."""

    def __init__(self, host):
        self.host = host
        d = os.path.join(cluster.STATE, f"redis-{host}")
        os.makedirs(d)
        cluster.spawn(host, "redis-server", "--bind", addr(host), "--port", "6379", "--protected-mode", "no",
                      "--dir", d, "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", name=f"redis-{host}")
        wait_for("Redis", lambda: RedisSentinel.info(host, "server"), timeout=30)

    def url(self):
        return f"redis://{addr(self.host)}:6379"

    def primary(self):
        return addr(self.host), 6379


def test_a_relay_cut_off_from_the_broker_hands_over_redis():
    cluster.setup(7)
    try:
        pg = Postgres("cvh7")
        rd = OneRedis("cvh1")
        env = {"CONVEYOR_DATABASE_URL": pg.url, "CONVEYOR_REDIS_URL": rd.url(), "CONVEYOR_TRANSPORT": "redis"}
        config = write_config({"catalog": 2}, queue_opts=QUEUE_OPTS)
        r = run_bin("conveyor-workers", "-c", config, "--setup", env=env, timeout=120)
        eq(r.returncode, 0, f"--setup ({r.stderr})")
        events = StreamEvents(rd)
        figures = relay_cut_off_run(env, config, pg, events, [6379], "Redis (cvh1)")
        print(f"FIGURES redis-relay-cut-off: {figures}", flush=True)
    finally:
        cluster.teardown()


# ---- a frozen Sentinel (issue 21, point 1: "Same for a Redis primary or Sentinel that hangs") ----------

def sentinel_cmd(h, *args):
    import redis
    return redis.Redis(host=addr(h), port=26379, socket_timeout=3).execute_command(*args)


def reconnects(pools):
    """How many reconnects each pool logged that asked the frozen Sentinel (cvh3) first."""
    want = f"Sentinel {addr('cvh3')}:26379"
    return {h: sum(1 for l in p.read_log().splitlines() if want in l and "named the primary" in l)
            for h, p in pools.items()}


def drop_pool_clients(rs, host):
    """Closes, on the Redis server on host, every connection of the pools' hosts
    (CLIENT KILL by id): their processes must connect again, through the Sentinels.
    The producer's and the test's own connections are kept. Returns how many."""
    import redis
    r = redis.Redis(host=addr(host), port=6379, socket_timeout=3)
    pool_addrs = tuple(addr(h) + ":" for h in POOL_HOSTS)
    ids = [c["id"] for c in r.client_list() if c["addr"].startswith(pool_addrs)]
    for i in ids:
        r.execute_command("CLIENT", "KILL", "ID", i)
    return len(ids)


def test_a_frozen_sentinel_redis():
    """The first Sentinel of the URL frozen (SIGSTOP, its socket open): running
    pools that must connect again (their connections on the primary dropped) and
    a pool started while it is frozen each pay its 1 s bound per ask and go on: the events flow again within HANG_BOUND_S of
    the drop, the fresh pool applies commands, every command is applied once
    with one result each."""
    phase = phase_clock()
    cluster.setup(7)
    pools, rs, frozen = {}, None, None
    try:
        pg = Postgres("cvh7")
        rs = RedisSentinel("cvh1", "cvh2", ("cvh3", "cvh4", "cvh5"))
        phase("PostgreSQL, a Redis primary, its replica and three Sentinels up")
        env = {"CONVEYOR_DATABASE_URL": pg.url, "CONVEYOR_REDIS_URL": rs.url(), "CONVEYOR_TRANSPORT": "redis"}
        config = write_config({"catalog": 2}, queue_opts=QUEUE_OPTS)
        r = run_bin("conveyor-workers", "-c", config, "--setup", env=env, timeout=120)
        eq(r.returncode, 0, f"--setup ({r.stderr})")
        events = StreamEvents(rs)
        pools = start_pools(env, QUEUE_OPTS)
        phase(f"pools on {', '.join(POOL_HOSTS)}; the URL lists the Sentinels of cvh3, cvh4, cvh5")
        pids = seed_products(pg, config, env, phase)
        updates = commands(pids, 10000, seed=24)
        prod = Producer(config, env, updates, rate=200)  # 50 s of commands
        wait_for("1,000 confirmed", lambda: len(prod.confirmed) >= 1000, timeout=120, every=0.02)
        frozen = rs.procs["sentinel-cvh3"]
        frozen.send_signal(signal.SIGSTOP)
        phase(f"froze the first Sentinel (cvh3) with {len(prod.confirmed)} confirmed")
        # every process of both pools connects again, asking cvh3 first (the Sentinel that answered last)
        n = drop_pool_clients(rs, "cvh1")
        t = time.time()
        phase(f"closed the pools' {n} connections on the primary")
        wait_for("every pool's reconnect through the frozen Sentinel", lambda: all(reconnects(pools).values()),
                 timeout=60)
        time.sleep(max(0.0, t + 10 - time.time()))
        gap = largest_gap(events.times, t, 10)
        phase(f"the events stopped for {gap:.1f} s at most after the drop; reconnects logged {reconnects(pools)}")
        # a pool started while the first Sentinel is frozen: each of its processes asks it first
        restarted = POOL_HOSTS[1]
        code, left = pools[restarted].stop()
        eq((code, left), (0, []), f"the pool on {restarted} stops cleanly")
        t_start = time.time()
        pools[restarted] = Pool(env=env, workers={"catalog": 2, "users": 0, "orders": 0}, queue_opts=QUEUE_OPTS,
                                extra=pools_config(restarted), wrap=cluster.on(restarted))
        ready = time.time() - t_start
        phase(f"a fresh pool on {restarted} ready {ready:.1f} s after its start, the first Sentinel frozen")
        check(f"Sentinel {addr('cvh3')}:26379" in pools[restarted].read_log(),
              f"the fresh pool asked the frozen Sentinel first:\n{pools[restarted].read_log()[-3000:]}")
        wait_for(f"the fresh pool on {restarted} to apply commands",
                 lambda: metric(restarted, HTTP_PORT, "conveyor_commands_total", queue="catalog") > 0, timeout=60)
        still = len(prod.confirmed) < len(updates)
        phase(f"the fresh pool applies commands ({'while' if still else 'after'} the producer runs)")
        await_every_result(pg, prod, updates, events, phase)
        frozen.send_signal(signal.SIGCONT)
        frozen = None
        events.close()
        dups = check_outcome(pg, updates, events.events, pids)
        stop_cleanly(pools)
        pools = {}
        print(f"FIGURES redis-frozen-sentinel: the first Sentinel frozen, the pools' connections dropped: the events "
              f"stopped for {gap:.1f} s at most; a fresh pool ready in {ready:.1f} s; {dups} duplicate deliveries",
              flush=True)
        check(gap <= HANG_BOUND_S, f"the events flowed again within {HANG_BOUND_S:.0f} s of the drop "
                                   f"(they stopped for {gap:.1f} s)")
    finally:
        if frozen is not None and frozen.poll() is None:
            frozen.send_signal(signal.SIGCONT)
        stop_anyway(pools)
        cluster.teardown()
        phase("torn down")
