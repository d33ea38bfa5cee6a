"""Rate limits counted on committed work (issue 24, part 1; README "Rate limits").

A limit's token is taken in the transaction that applies the command, so the
rate is a property of committed rows: these tests read the commit time of each
applying transaction (pg_xact_commit_timestamp of its dedup row; servers.sh
turns track_commit_timestamp on), never a clock of their own.

- 100/s with a burst of 100, two pools of four workers: within 5 % over 20 s
  of committed commands (label faults: a long run, Release only);
- one bucket per key: 1,000 products at 2/s each, none faster;
- a command that does no work gives its token back: its handler rejects it,
  or its pool is killed -9 between the debit and the COMMIT;
- over = "reject": command.rejected RATE_LIMITED with details.retryAfterMs;
- over = "wait": parked (reason rate_limited), applied later, no attempt spent;
  its counts in /metrics and conveyor-admin stats.
"""
import json
import os
import signal
import time

from harness import (ROOT, TRANSPORT, Events, Pool, Publisher, check, envelope, eq, http_pool, new_id, query,
                     run_bin, db)
from test_delayed import wait_for
from test_metrics import get, scrape, value


def limit_conf(*limits):
    """A rate_limits list of queues.conf from dicts (strings quoted, numbers as is)."""
    def entry(d):
        parts = []
        for k, v in d.items():
            if isinstance(v, list):
                parts.append(f'{k} = [{", ".join(json.dumps(x) for x in v)}];')
            elif isinstance(v, str):
                parts.append(f"{k} = {json.dumps(v)};")
            else:
                parts.append(f"{k} = {v};")
        return "{ " + " ".join(parts) + " }"
    return "rate_limits = (\n  " + ",\n  ".join(entry(d) for d in limits) + "\n);"


def fresh(name):
    """A limit name not used before (bucket rows are the database's, across tests)."""
    return f"{name}-{new_id()[:8]}"


def product(stock=0):
    return envelope("createProduct", {"productId": new_id(), "name": "limited", "price": "1.00", "stock": stock})


def commit_times(ids):
    """{id: (outcome, commit epoch)} of the processed commands among ids, by the database's commit timestamps."""
    check(query("SHOW track_commit_timestamp")[0][0] == "on",
          "track_commit_timestamp is off on the test database: scripts/servers.sh up turns it on")
    rows = query("SELECT id::text, outcome, extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8 "
                 "FROM processed_commands WHERE id = ANY(%s::uuid[])", list(ids))
    return {i: (o, t) for i, o, t in rows}


def attempts_of(ids):
    return query("SELECT count(*) FROM command_attempts WHERE id = ANY(%s::uuid[])", list(ids))[0][0]


def test_wait_parks_without_spending_an_attempt_and_counts_it():
    name = fresh("wait")
    conf = limit_conf({"name": name, "types": ["createProduct"], "rate": "10/s", "burst": 5, "over": "wait"})
    pub = Publisher()
    with http_pool(extra=conf, workers={"catalog": 2}) as pool:
        cmds = [pub.command(product()) for _ in range(40)]
        ids = [c["id"] for c in cmds]
        seen_parked = wait_for(lambda: query("SELECT count(*) FROM parked_commands WHERE reason = 'rate_limited' "
                                             "AND rate_limit = %s", name)[0][0], 20, "a command parked for a token")
        check(seen_parked > 0, "commands wait in parked_commands")
        done = wait_for(lambda: (lambda t: t if len(t) == 40 else None)(commit_times(ids)), 60, "all 40 applied")
        eq(sorted({o for o, _ in done.values()}), ["applied"], "outcomes")
        times = sorted(t for _, t in done.values())
        # 5 at once, then 10/s: the 40th no sooner than 3.5 s after the first (35 tokens to refill)
        check(times[-1] - times[0] >= 3.5 * 0.95,
              f"40 commands at 10/s with a burst of 5 took {times[-1] - times[0]:.2f} s")
        eq(attempts_of(ids), 0, "attempt rows of commands that waited")
        eq(query("SELECT count(*) FROM products WHERE id = ANY(%s::uuid[])",
                 [c["payload"]["productId"] for c in cmds])[0][0], 40, "products created")
        waited = query("SELECT coalesce(sum(waited), 0) FROM rate_limit_buckets WHERE limit_name = %s", name)[0][0]
        check(waited >= 35, f"at least 35 waits counted (a command may wait twice), got {waited}")

        def metric():
            samples, _ = scrape(pool)
            got = value(samples, "conveyor_limited_total", limit=name, over="wait")
            return samples if got == waited else None
        samples = wait_for(metric, 20, "conveyor_limited_total equal to the committed count")
        value(samples, "conveyor_limit_tokens", limit=name)
        status, _, body = get(pool, "/api/limits")
        eq(status, 200, "/api/limits status")
        shown = [l for l in json.loads(body)["limits"] if l["name"] == name]
        eq(len(shown), 1, "the limit on the dashboard's API")
        eq((shown[0]["rate"], shown[0]["over"], shown[0]["waited"]), ("10/s", "wait", waited), "the limit as shown")
        out = run_bin("conveyor-admin", "-c", pool.config, "stats")
        eq(out.returncode, 0, f"stats exit status ({out.stderr})")
        check(name in out.stdout and "10/s" in out.stdout, f"stats shows the limit:\n{out.stdout}")
    pub.close()


SHORT_HEARTBEAT = "redis: { heartbeat_interval = 1; heartbeat_ttl = 3; };"


def rejected_code(events, cid):
    got = [e for e in events.for_command(cid) if e["type"] == "command.rejected"]
    return got[0]["data"] if got else None


def stock_of(pid):
    rows = query("SELECT stock FROM products WHERE id = %s", pid)
    return rows[0][0] if rows else None


def create_products(pub, events, n):
    cmds = [pub.command(product()) for _ in range(n)]
    events.wait(lambda ev: all(any(e["type"] == "product.created" for e in ev.for_command(c["id"])) for c in cmds),
                timeout=60, what=f"{n} products created")
    return [c["payload"]["productId"] for c in cmds]


def test_reject_says_rate_limited_and_a_command_its_handler_rejects_gives_its_token_back():
    name = fresh("reject")
    conf = limit_conf({"name": name, "types": ["updateStock"], "rate": "1/h", "burst": 1, "over": "reject"})
    pub, events = Publisher(), Events()
    with Pool(extra=conf):
        (pid,) = create_products(pub, events, 1)
        # rejected by its handler (no such product): it did no work, so its token goes back
        ghost = pub.command(envelope("updateStock", {"productId": new_id(), "quantityChange": 1}))
        events.wait(lambda ev: rejected_code(ev, ghost["id"]), what="the unknown product's rejection")
        eq(rejected_code(events, ghost["id"])["code"], "NOT_FOUND", "an unknown product is rejected by its handler")
        first = pub.command(envelope("updateStock", {"productId": pid, "quantityChange": 5}))
        events.wait(lambda ev: ev.for_command(first["id"]), what="the first update's event")
        eq([e["type"] for e in events.for_command(first["id"])], ["stock.updated"],
           "the one token (given back by the rejected command) applies the first update")
        second = pub.command(envelope("updateStock", {"productId": pid, "quantityChange": 7}))
        events.wait(lambda ev: ev.for_command(second["id"]), what="the second update's event")
        data = rejected_code(events, second["id"])
        check(data is not None, f"the second update is rejected: {events.for_command(second['id'])}")
        eq(data["code"], "RATE_LIMITED", "code of a command over a limit with over = reject")
        eq(data["details"]["limit"], name, "details.limit")
        after = data["details"]["retryAfterMs"]
        check(isinstance(after, int) and 0 < after <= 3600 * 1000, f"retryAfterMs within the hour's refill: {after}")
        eq(stock_of(pid), 5, "stock: only the first update applied")
        eq(query("SELECT outcome FROM processed_commands WHERE id = %s", second["id"])[0][0], "rejected",
           "the limited command is recorded rejected")
        eq(query("SELECT sum(rejected) FROM rate_limit_buckets WHERE limit_name = %s", name)[0][0], 1,
           "rejections counted")
    pub.close()


def test_a_pool_killed_between_the_debit_and_the_commit_gives_the_token_back():
    name = fresh("killed")
    conf = limit_conf({"name": name, "types": ["updateStock"], "rate": "1/h", "burst": 1, "over": "reject"})
    conf += "\n" + SHORT_HEARTBEAT
    pub, events = Publisher(), Events()
    with Pool(extra=conf):
        (pid,) = create_products(pub, events, 1)
    holder = db()
    holder.autocommit = False
    cur = holder.cursor()
    cur.execute("SELECT 1 FROM products WHERE id = %s FOR UPDATE", (pid,))  # the update will wait for this
    pool = Pool(extra=conf, expect_restarts=True)
    try:
        cmd = pub.command(envelope("updateStock", {"productId": pid, "quantityChange": 3}))
        # its transaction took the limit's only token, then waits for the product's row
        wait_for(lambda: query("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                               "AND query ILIKE '%%products%%'")[0][0], 30, "the update waiting for the product's lock")
        os.killpg(pool.proc.pid, signal.SIGKILL)
        pool.proc.wait()
    finally:
        holder.rollback()
        holder.close()
    # the orphaned transaction ends when its backend finds its client gone: the token is back
    wait_for(lambda: query("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")[0][0] == 0
             and query("SELECT count(*) FROM processed_commands WHERE id = %s", cmd["id"])[0][0] == 0, 30,
             "the orphaned transaction rolled back")
    eq(stock_of(pid), 0, "nothing of the killed transaction committed")
    with Pool(extra=conf):
        events.wait(lambda ev: ev.for_command(cmd["id"]), timeout=40, what="the update applied after the restart")
        eq([e["type"] for e in events.for_command(cmd["id"])], ["stock.updated"],
           "the redelivered update finds the token the killed transaction held")
        again = pub.command(envelope("updateStock", {"productId": pid, "quantityChange": 4}))
        events.wait(lambda ev: ev.for_command(again["id"]), what="the next update's event")
        eq(rejected_code(events, again["id"])["code"], "RATE_LIMITED", "one token: the next update is limited")
        eq(stock_of(pid), 3, "stock: the update applied once")
    pool.check_log()
    pub.close()


def test_one_bucket_per_key_holds_each_key_to_its_rate():
    name = fresh("perkey")
    conf = limit_conf({"name": name, "types": ["updateStock"], "rate": "2/s", "burst": 2,
                       "key": "payload.productId", "over": "wait"})
    pub, events = Publisher(), Events()
    with Pool(extra=conf, workers={"catalog": 2}, queue_opts="batch_size = 50;"):
        pids = create_products(pub, events, 1000)
        cmds = {pid: [] for pid in pids}
        for pid in pids:  # a product's 4 updates one after another: without the limit, one batch applies them
            for _ in range(4):
                env = envelope("updateStock", {"productId": pid, "quantityChange": 1})
                pub.raw("catalog", json.dumps(env).encode(), message_id=env["id"])
                cmds[pid].append(env["id"])
        ids = [i for v in cmds.values() for i in v]
        done = wait_for(lambda: (lambda t: t if len(t) == len(ids) else None)(commit_times(ids)), 180,
                        "4,000 updates applied")
        eq(sorted({o for o, _ in done.values()}), ["applied"], "outcomes")
        spans = sorted(max(done[i][1] for i in v) - min(done[i][1] for i in v) for v in cmds.values())
        # a key's bucket holds 2 and refills 2/s: its 4th update is debited at least 1 s after its
        # 1st; commits come a transaction's length after their debits (allowed: 0.25 s)
        check(spans[0] >= 0.75, f"a key had its 4 updates committed within {spans[0]:.3f} s (2/s, burst 2)")
        print(f"FIGURES per-key 2/s: 1st-to-4th commit per key min {spans[0]:.3f} s, median "
              f"{spans[len(spans) // 2]:.3f} s, max {spans[-1]:.3f} s; whole run "
              f"{max(t for _, t in done.values()) - min(t for _, t in done.values()):.2f} s")
        eq(query("SELECT count(*) FROM products WHERE id = ANY(%s::uuid[]) AND stock = 4", pids)[0][0], 1000,
           "every product's stock: its 4 updates, each applied once")
        eq(attempts_of(ids), 0, "attempts spent by waiting")
    pub.close()


def test_a_limit_of_100_per_second_holds_across_two_pools_of_four_workers():  # faults
    name = fresh("global")
    conf = limit_conf({"name": name, "types": ["createProduct"], "rate": "100/s", "burst": 100, "over": "wait"})
    pub = Publisher()
    with Pool(extra=conf, workers={"catalog": 4}), Pool(extra=conf, workers={"catalog": 4}):
        ids = [pub.command(product())["id"] for _ in range(2600)]
        done = wait_for(lambda: (lambda t: t if len(t) == len(ids) else None)(commit_times(ids)), 120,
                        "2,600 commands applied")
    pub.close()
    times = sorted(t for _, t in done.values())
    start = times[300]  # past the burst of 100 and the first second: the limit is what holds them back
    in_window = sum(1 for t in times if start <= t < start + 20)
    rate = in_window / 20
    print(f"FIGURES rate limit 100/s, two pools of 4 workers: {rate:.1f}/s over 20 s of commits "
          f"({in_window} commands); whole run {times[-1] - times[0]:.1f} s")
    check(abs(rate - 100) <= 5, f"the limit held {rate:.1f}/s over 20 s of committed commands (100/s +- 5 %)")
    eq(sorted({o for o, _ in done.values()}), ["applied"], "outcomes")
    eq(attempts_of(ids), 0, "attempts spent by waiting")


def test_bad_limits_are_refused_naming_the_field():
    cases = [
        ({"name": "x", "types": ["updateStock"], "rate": "fast"}, "'rate' must be a number per second"),
        ({"name": "x", "types": ["noSuchType"], "rate": "1/s"}, "routed by no queue"),
        ({"name": "x", "types": ["updateStock"], "queue": "catalog", "rate": "1/s"},
         "'types' and 'queue' are both set"),
        ({"name": "x", "types": ["updateStock"], "rate": "1/s", "over": "drop"},
         "'over' must be \"wait\" or \"reject\""),
        ({"name": "x", "types": ["updateStock"], "rate": "1/s", "key": "customerId"}, "'key' must be a payload field"),
        ({"name": "x", "types": ["updateStock"], "rate": "10/s", "burst": 2, "shards": 4}, "must not be above 'burst'"),
    ]
    for limit, want in cases:
        path = os.path.join(ROOT, "build", f"bad-limit-{new_id()[:8]}.conf")
        with open(path, "w") as f:
            f.write(open(os.path.join(ROOT, "queues.conf")).read() + "\n" + limit_conf(limit) + "\n")
        try:
            r = run_bin("conveyor-workers", "-c", path, "--check")
        finally:
            os.unlink(path)
        eq(r.returncode, 2, f"exit status of a configuration with {limit} ({r.stderr})")
        check(want in r.stderr and "rate_limits" in r.stderr, f"the error names the field: {r.stderr!r}, want {want!r}")
    two = limit_conf({"name": "a", "types": ["updateStock"], "rate": "1/s"},
                     {"name": "b", "queue": "catalog", "rate": "1/s"})
    path = os.path.join(ROOT, "build", f"bad-limit-{new_id()[:8]}.conf")
    with open(path, "w") as f:
        f.write(open(os.path.join(ROOT, "queues.conf")).read() + "\n" + two + "\n")
    try:
        r = run_bin("conveyor-workers", "-c", path, "--check")
    finally:
        os.unlink(path)
    eq(r.returncode, 2, "a type in two limits")
    check("is counted by rate limit 'a' too" in r.stderr, r.stderr)
