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
from test_metrics import scrape, value


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


def wait_for(what, pred, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def attempts_of(ids):
    return query("SELECT count(*) FROM command_attempts WHERE id = ANY(%s::uuid[])", list(ids))[0][0]


def test_wait_parks_without_spending_an_attempt_and_counts_it():
    name = fresh("wait")
    conf = limit_conf({"name": name, "types": ["createProduct"], "rate": "10/s", "burst": 5, "over": "wait"})
    pub = Publisher()
    with http_pool(extra=conf, workers={"catalog": 2}) as pool:
        cmds = [pub.command(product()) for _ in range(40)]
        ids = [c["id"] for c in cmds]
        seen_parked = wait_for("a command parked for a token",
                               lambda: query("SELECT count(*) FROM parked_commands WHERE reason = 'rate_limited' "
                                             "AND rate_limit = %s", name)[0][0], 20)
        check(seen_parked > 0, "commands wait in parked_commands")
        done = wait_for("all 40 applied", lambda: (lambda t: t if len(t) == 40 else None)(commit_times(ids)), 60)
        eq(sorted({o for o, _ in done.values()}), ["applied"], "outcomes")
        times = sorted(t for _, t in done.values())
        # 5 at once, then 10/s: the 40th no sooner than 3.5 s after the first (35 tokens to refill)
        check(times[-1] - times[0] >= 3.5 * 0.95, f"40 commands at 10/s with a burst of 5 took {times[-1] - times[0]:.2f} s")
        eq(attempts_of(ids), 0, "attempt rows of commands that waited")
        eq(query("SELECT count(*) FROM products WHERE id = ANY(%s::uuid[])",
                 [c["payload"]["productId"] for c in cmds])[0][0], 40, "products created")
        waited = query("SELECT coalesce(sum(waited), 0) FROM rate_limit_buckets WHERE limit_name = %s", name)[0][0]
        check(waited >= 35, f"at least 35 waits counted (a command may wait twice), got {waited}")

        def metric():
            samples, _ = scrape(pool)
            got = value(samples, "conveyor_limited_total", limit=name, over="wait")
            return samples if got == waited else None
        samples = wait_for("conveyor_limited_total equal to the committed count", metric, 20)
        value(samples, "conveyor_limit_tokens", limit=name)
        out = run_bin("conveyor-admin", "-c", pool.config, "stats")
        eq(out.returncode, 0, f"stats exit status ({out.stderr})")
        check(name in out.stdout and "10/s" in out.stdout, f"stats shows the limit:\n{out.stdout}")
    pub.close()
