"""Lanes on Redis, what only its mechanism has (docs/contract.md §10, "Redis"):
a dead worker's in-flight commands go back to the heads of their lanes, in
order, and the lane owner keys it held are freed (only those still its); a
worker killed with -9 mid-batch costs no order per key."""
import hashlib
import json
import os
import signal
import time

import redis as redislib

from harness import REDIS_URL, ROUTING, Pool, check, eq, new_id, query

LANES = 4
CATALOG = {"catalog": ROUTING["catalog"]}
OPTS = f"lanes = {LANES}; ordered = true;"


def lane_of(key):
    """The lane the take script puts a lane key in (SHA-1's first 8 hex digits, modulo N)."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % LANES


def lane_key(cls, i):
    return f"conveyor:queue:catalog:lane:{cls}:{i}"


def owner_key(cls, i):
    return f"conveyor:laneowner:catalog:{cls}:{i}"


def clean(r):
    for pattern in ("conveyor:queue:catalog*", "conveyor:laneowner:catalog:*", "conveyor:laneowned:catalog:*",
                    "conveyor:inflight:catalog:*"):
        for k in r.scan_iter(pattern):
            r.delete(k)


def update(pid, name):
    return json.dumps({"id": new_id(), "type": "updateProduct", "payload": {"productId": pid, "name": name}})


def products_in_different_lanes(n):
    pids, lanes = [], set()
    while len(pids) < n:
        pid = new_id()
        if lane_of(pid) not in lanes:
            lanes.add(lane_of(pid))
            pids.append(pid)
    return pids


def test_dead_worker_returns_to_lane_heads_and_frees_its_lanes_redis():
    r = redislib.Redis.from_url(REDIS_URL)
    clean(r)
    ghost = f"ghost-{new_id()[:8]}-catalog-0"
    a, b = products_in_different_lanes(2)
    la, lb = lane_of(a), lane_of(b)
    a1, b1, a2, a3 = update(a, "a1"), update(b, "b1"), update(a, "a2"), update(a, "a3")
    # the ghost took a1, b1, a2 in that order (in flight: newest on the left), owns their
    # lanes; a3 came later and waits in a's lane; a third lane's key names another worker
    for m in (a1, b1, a2):
        r.lpush(f"conveyor:inflight:catalog:{ghost}", m)
    r.lpush(lane_key("normal", la), a3)
    other = next(i for i in range(LANES) if i not in (la, lb))
    r.set(owner_key("normal", la), ghost)
    r.set(owner_key("normal", lb), ghost)
    r.set(owner_key("normal", other), "someone-else")
    r.sadd(f"conveyor:laneowned:catalog:{ghost}", owner_key("normal", la), owner_key("normal", lb),
           owner_key("normal", other))
    r.set(f"conveyor:worker:{ghost}", "1", px=1500)  # alive for 1.5 s more
    try:
        # no worker of catalog: the pool's reaper alone moves things
        with Pool(workers={"catalog": 0}, routing=CATALOG, queue_opts=OPTS):
            time.sleep(0.8)
            eq(r.llen(f"conveyor:inflight:catalog:{ghost}"), 3, "a live worker's flight stays")
            eq(r.get(owner_key("normal", la)), ghost.encode(), "and its lanes stay its")
            deadline = time.time() + 10
            while r.exists(f"conveyor:inflight:catalog:{ghost}") and time.time() < deadline:
                time.sleep(0.1)
            eq(r.exists(f"conveyor:inflight:catalog:{ghost}"), 0, "the dead worker's flight went back")
            got = [m.decode() for m in r.lrange(lane_key("normal", la), 0, -1)]
            eq(got, [a3, a2, a1], "at the head of its lane, in order (the oldest taken first), before a3")
            eq([m.decode() for m in r.lrange(lane_key("normal", lb), 0, -1)], [b1], "b1 in its own lane")
            eq(r.exists(owner_key("normal", la), owner_key("normal", lb)), 0, "its lanes freed")
            eq(r.get(owner_key("normal", other)), b"someone-else", "a lane no longer its untouched")
            eq(r.exists(f"conveyor:laneowned:catalog:{ghost}"), 0, "its owned set gone")
            check(all(r.sismember("conveyor:returned:catalog", m) for m in (a1, b1, a2)),
                  "marked returned: taken again, they count as redelivered")
    finally:
        clean(r)
        r.delete("conveyor:returned:catalog", f"conveyor:worker:{ghost}")


def test_kill_9_mid_batch_keeps_the_order_per_key_redis():
    r = redislib.Redis.from_url(REDIS_URL)
    clean(r)
    pids = [new_id() for _ in range(4)]
    for p in pids:
        query("INSERT INTO products (id, name, price, stock) VALUES (%s, 'lane-test', 1, 0)", p)
    last = r.xrevrange("conveyor:events", count=1)
    cursor = last[0][0] if last else b"0-0"
    n = 2000
    with Pool(workers={"catalog": 2}, routing=CATALOG, queue_opts=OPTS, expect_restarts=True) as pool:
        ids = {}
        pipe = r.pipeline(transaction=False)
        for k in range(n):
            body = update(pids[k % 4], "seq-%06d" % k)
            ids[json.loads(body)["id"]] = k
            pipe.lpush("conveyor:queue:catalog", body)
        pipe.execute()
        # a worker of this pool (<host>-<supervisor pid>-catalog-<i>) with a batch in flight, killed
        victim, deadline = None, time.time() + 20
        while victim is None and time.time() < deadline:
            for key in r.scan_iter(f"conveyor:inflight:catalog:*-{pool.proc.pid}-catalog-*"):
                if r.llen(key) > 0:
                    hb = r.get("conveyor:worker:" + key.decode().split(":", 3)[3])
                    if hb:
                        victim = int(hb)
                        break
            time.sleep(0.01)
        check(victim is not None, "a worker had commands in flight")
        os.kill(victim, signal.SIGKILL)
        per, seen, eids = {p: [] for p in pids}, set(), set()
        deadline = time.time() + 60
        while len(seen) < n and time.time() < deadline:
            for _, entries in r.xread({"conveyor:events": cursor}, count=1000, block=500) or []:
                for eid, f in entries:
                    cursor = eid
                    e = json.loads(f[b"event"])
                    if e["id"] in eids or e.get("commandId") not in ids:
                        continue
                    eids.add(e["id"])
                    seen.add(e["commandId"])
                    per[e["aggregateId"]].append(ids[e["commandId"]])
        eq(len(seen), n, "every command applied")
        for p in pids:
            swaps = [(x, y) for x, y in zip(per[p], per[p][1:]) if x > y]
            eq(swaps[:3], [], f"product {p}: applied in the order published (the first swaps)")
        check("died of signal 9" in pool.read_log(), "the worker was killed")
        deadline = time.time() + 5
        while list(r.scan_iter("conveyor:laneowner:catalog:*")) and time.time() < deadline:
            time.sleep(0.1)
        eq(list(r.scan_iter("conveyor:laneowner:catalog:*")), [], "no lane owned once all is done")
    clean(r)


def test_lanes_a_queue_no_longer_has_are_emptied_into_its_intake_redis():
    """Commands left in lanes 2 and 3 when catalog goes from 4 lanes to 2 are applied, in order."""
    r = redislib.Redis.from_url(REDIS_URL)
    clean(r)
    pid = new_id()
    query("INSERT INTO products (id, name, price, stock) VALUES (%s, 'lane-sweep', 1, 0)", pid)
    first, second, other = update(pid, "first"), update(pid, "second"), update(new_id(), "nobody")
    r.lpush(lane_key("normal", 3), first, second)  # first is the older: rightmost
    r.lpush(lane_key("high", 2), other)
    ids = [json.loads(m)["id"] for m in (first, second)]
    try:
        with Pool(workers={"catalog": 1}, routing=CATALOG, queue_opts="lanes = 2; ordered = true;"):
            deadline = time.time() + 20
            while time.time() < deadline and query(
                    "SELECT count(*) FROM processed_commands WHERE id = ANY(%s::uuid[])", ids)[0][0] < 2:
                time.sleep(0.1)
            eq(query("SELECT name FROM products WHERE id = %s", pid)[0][0], "second", "both applied, in order")
            eq(r.exists(lane_key("normal", 3), lane_key("high", 2)), 0, "the lanes it no longer has are empty")
    finally:
        clean(r)
