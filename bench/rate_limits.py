#!/usr/bin/python3
"""What a rate limit costs and what it holds, per transport, on the servers of
scripts/servers.sh (docs/performance.md, "Rate limits").

    bench/rate_limits.py [--commands 30000] [--transports rabbitmq,redis] [--workers 4] [--batch 50]
                         [--rate 5000]

For each transport, a pool with --workers catalog workers (batch_size --batch)
applies --commands createProduct (written by conveyor-produce) five times:

1. none: no rate limit configured;
2. open: a limit far above what the pool can do (1,000,000/s; 8 shards):
   only the cost of taking a token in each transaction;
3. open, 1 shard: the same limit on one row: every transaction that applies
   a command waits for the one before it to commit (the hot-row cost that
   sharding removes);
4. limited: --rate per second, burst --rate, over = "wait" (8 shards): the
   queue's throughput under that limit;
5. held: --held per second (below what the pool can do), burst --held: the
   rate held, over the middle 80 % of the commits.

Each figure is a throughput from the database's commit timestamps of the
applying transactions (pg_xact_commit_timestamp), first to last commit.
Prints one line per run, and a JSON summary last. The machine's other load
shows in every figure: compare the ratios within one run.
CONVEYOR_BIN_DIR picks the binaries.
"""
import argparse
import json
import os
import sys
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "integration"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Pool, query, setup, write_config  # noqa: E402
from delayed import applied, commands, produce, quiet  # noqa: E402  (the same commands as bench/delayed.py)
from test_rate_limits import limit_conf  # noqa: E402


def commit_rates(ids):
    """(commands applied, first-to-last commit seconds, per second over all, per second over the middle 80 %)."""
    rows = query("SELECT extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8 FROM processed_commands "
                 "WHERE id = ANY(%s::uuid[]) AND outcome = 'applied' ORDER BY 1", ids)
    t = [r[0] for r in rows]
    n = len(t)
    lo, hi = t[n // 10], t[n - 1 - n // 10]
    mid = sum(1 for x in t if lo <= x <= hi)
    return n, t[-1] - t[0], n / max(t[-1] - t[0], 1e-9), mid / max(hi - lo, 1e-9)


def run(transport, workers, batch, n, extra):
    routing = {"catalog": ["createProduct", "updateProduct", "updateStock", "deleteProduct"]}
    conf = write_config(routing=routing)
    pool = Pool(workers={"catalog": workers}, routing=routing, extra=extra, queue_opts=f"batch_size = {batch};",
                env={"CONVEYOR_TRANSPORT": transport})
    try:
        quiet()
        text, ids, rng = commands(n)
        producer = produce(text, transport, conf)
        applied(pool, producer, rng, n, max(600, n / 20))
        got, seconds, per_s, mid_s = commit_rates(ids)
        if got != n:
            raise SystemExit(f"{got} of {n} applied")
        waited = query("SELECT coalesce(sum(waited), 0) FROM rate_limit_buckets WHERE limit_name LIKE 'bench-%%' "
                       "AND limit_name = ANY(%s)", [l for l in extra.split('"') if l.startswith("bench-")])[0][0]
        return {"seconds": round(seconds, 2), "perSecond": round(per_s), "middlePerSecond": round(mid_s),
                "waits": int(waited)}
    finally:
        pool.stop()
        os.unlink(conf)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commands", type=int, default=30000)
    ap.add_argument("--transports", default="rabbitmq,redis")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--rate", type=int, default=5000)
    ap.add_argument("--held", type=int, default=1000)
    a = ap.parse_args()
    setup()
    out = []

    def limit(rate, shards):
        name = f"bench-{uuid.uuid4().hex[:8]}"
        return limit_conf({"name": name, "types": ["createProduct"], "rate": f"{rate}/s", "burst": rate,
                           "over": "wait", "shards": shards})

    runs = [("none", ""), ("open, 8 shards", limit(1000000, 8)), ("open, 1 shard", limit(1000000, 1)),
            (f"limited {a.rate}/s, 8 shards", limit(a.rate, 8)), (f"held {a.held}/s, 8 shards", limit(a.held, 8))]
    for transport in a.transports.split(","):
        row = {"transport": transport, "workers": a.workers, "batch": a.batch, "commands": a.commands}
        for label, extra in runs:
            if extra:  # a fresh limit per transport: its buckets start full
                extra = extra.replace(extra.split('"')[1], f"bench-{uuid.uuid4().hex[:8]}")
            r = run(transport, a.workers, a.batch, a.commands, extra)
            row[label] = r
            print(f"{transport:8} {label:24} {r['perSecond']:6}/s first to last commit ({r['seconds']} s), "
                  f"{r['middlePerSecond']:6}/s over the middle 80 %, {r['waits']} waits", flush=True)
        out.append(row)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
