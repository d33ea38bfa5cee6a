#!/usr/bin/python3
"""What parking costs: delayed commands against the same commands published
plainly, and the timekeeper's look for due rows with a million parked, per
transport, on the servers of scripts/servers.sh (docs/performance.md, "Delayed
commands and schedules").

    bench/delayed.py [--commands 100000] [--transports rabbitmq,redis] [--workers 4]
                     [--parked 1000000] [--idle-seconds 30] [--park-margin 1.5]

For each transport:

1. plain: --commands createProduct (fresh product ids) written to
   conveyor-produce (batches of 500 under confirms) while a pool runs; the
   time from the first publish until all are applied (the last processed_at);
2. delayed: the same number with notBefore = one instant T, chosen
   --park-margin times the plain run's duration ahead (so that all are
   published and parked first: the bench fails when they are not); the
   parking throughput (commands parked per second from the first publish to
   the last parked_at), the time from T until all are applied, and its ratio
   to the plain run's; the time from T until the timekeeper released them all
   (published and unparked), and its CPU and its backend's meanwhile; checks
   that all were applied and none before T (by the database's clock), and
   shows the plan of the timekeeper's claim at T (all due at once);
3. idle: the CPU seconds per second of the timekeeper (comm cv-timekeeper)
   and of the PostgreSQL backend serving it (its application_name), over
   --idle-seconds with no parked row, then with --parked rows due in a year
   (inserted by SQL); the sizes of the table and its indexes, EXPLAIN
   (ANALYZE, BUFFERS) of the claim, and the time of the count per queue a
   metrics scrape would run. Deletes the rows after.

Prints one line per figure, and a JSON summary last. Starts its own pool
(catalog workers only); the machine's other load shows in every figure:
compare the ratios within one run. CONVEYOR_BIN_DIR picks the binaries.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "integration"))
from harness import BIN, Pool, db, query, session_pids, setup, write_config  # noqa: E402
from test_delayed import db_now, iso  # noqa: E402  (the database's clock; notBefore text)

# The timekeeper's claim, as workers/parking.c parking_release sends it ($1: RELEASE_BATCH).
CLAIM = ("SELECT id::text, queue, type, envelope FROM parked_commands WHERE due_at <= {now} "
         "ORDER BY due_at LIMIT 500 FOR UPDATE SKIP LOCKED")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def commands(n, not_before=None):
    """n createProduct envelopes with fresh product ids that share a prefix
    (so that their rows are counted by a range of the primary key): the
    NDJSON text, the command ids and the range."""
    tag = uuid.uuid4().hex[:8]
    ids, lines = [], []
    for i in range(n):
        cid = str(uuid.uuid4())
        e = {"id": cid, "type": "createProduct",
             "payload": {"productId": f"{tag}-0000-4000-8000-{i:012d}", "name": f"bench {i}", "price": "1.00",
                         "stock": 1}}
        if not_before:
            e["notBefore"] = not_before
        ids.append(cid)
        lines.append(json.dumps(e))
    return "\n".join(lines) + "\n", ids, (f"{tag}-0000-4000-8000-000000000000", f"{tag}-0000-4000-8000-999999999999")


def produce(text, transport, conf):
    """Starts conveyor-produce on text (NDJSON); returns the process."""
    f = tempfile.TemporaryFile()
    f.write(text.encode())
    f.seek(0)
    env = dict(os.environ, CONVEYOR_TRANSPORT=transport)
    return subprocess.Popen([os.path.join(BIN, "conveyor-produce"), "-c", conf], stdin=f, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env, text=True)


def wait_count(sql, args, n, pool, producer, what, timeout):
    deadline = time.time() + timeout
    while True:
        got = query(sql, *args)[0][0]
        if got >= n:
            return
        if pool.proc.poll() is not None:
            raise SystemExit(f"the pool exited; log {pool.log.name}")
        if producer and producer.poll() not in (None, 0):
            raise SystemExit(f"conveyor-produce exited {producer.returncode}: {producer.stderr.read()}")
        if time.time() > deadline:
            raise SystemExit(f"only {got} of {n} {what} after {timeout} s; pool log {pool.log.name}")
        time.sleep(0.25)


def applied(pool, producer, rng, n, timeout):
    wait_count("SELECT count(*) FROM products WHERE id BETWEEN %s AND %s", rng, n, pool, producer,
               "commands applied", timeout)
    if producer.wait(60) != 0:
        raise SystemExit(f"conveyor-produce exited {producer.returncode}: {producer.stderr.read()}")


def outcomes(ids):
    """(count applied, min processed_at, max processed_at) of ids, epoch seconds."""
    return query("SELECT count(*) FILTER (WHERE outcome = 'applied'), extract(epoch FROM min(processed_at))::float8, "
                 "extract(epoch FROM max(processed_at))::float8 FROM processed_commands WHERE id = ANY(%s::uuid[])",
                 ids)[0]


def quiet():
    """Every event of the run before relayed, dirty pages written: the next part starts alike."""
    deadline = time.time() + 600
    while query("SELECT count(*) FROM outbox WHERE published_at IS NULL")[0][0] and time.time() < deadline:
        time.sleep(0.5)
    query("CHECKPOINT")


def plain(pool, transport, conf, n):
    text, ids, rng = commands(n)
    t0 = db_now()
    producer = produce(text, transport, conf)
    applied(pool, producer, rng, n, max(600, n / 20))
    ok, _, last = outcomes(ids)
    if ok != n:
        raise SystemExit(f"plain: {ok} of {n} applied")
    return {"commands": n, "seconds": round(last - t0, 2), "perSecond": round(n / (last - t0))}


def explain(now_sql):
    """EXPLAIN (ANALYZE, BUFFERS) of the claim, rolled back: its lines, and the
    buffers its top node read."""
    c = db()
    try:
        with c.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + CLAIM.format(now=now_sql))
            plan = [r[0] for r in cur.fetchall()]
            cur.execute("ROLLBACK")
    finally:
        c.close()
    buffers = 0
    for line in plan:
        if "Buffers:" in line:
            buffers = sum(int(x.split("=")[1]) for x in line.split("Buffers:")[1].replace(",", " ").split()
                          if "=" in x)
            break
    return plan, buffers


def delayed(pool, transport, conf, n, plain_seconds, margin):
    t0 = db_now()
    due = t0 + max(10.0, margin * plain_seconds)
    text, ids, rng = commands(n, iso(due))
    due = round(due, 3)
    producer = produce(text, transport, conf)
    wait_count("SELECT count(*) FROM parked_commands", (), n, pool, producer,
               "commands parked", max(600, n / 20))
    parked_last, published = query("SELECT extract(epoch FROM max(parked_at))::float8, "
                                    "(SELECT count(*) FROM products WHERE id BETWEEN %s AND %s) "
                                    "FROM parked_commands WHERE id = ANY(%s::uuid[])", *rng, ids)[0]
    if published or db_now() >= due:
        raise SystemExit(f"delayed: parking ran past T ({published} applied already): raise --park-margin")
    plan, buffers = explain(f"'{iso(due + 1)}'::timestamptz")  # the claim at T: every row due at once
    tk, backend = timekeeper(pool)
    cpu0 = cpu(tk) + cpu(backend)
    deadline = time.time() + max(600, n / 20) + due - t0
    while True:  # released: the timekeeper published and deleted every row (within a poll)
        left, released = query("SELECT count(*), extract(epoch FROM clock_timestamp())::float8 FROM parked_commands")[0]
        if not left:
            break
        if time.time() > deadline:
            raise SystemExit(f"delayed: {left} still parked; pool log {pool.log.name}")
        time.sleep(0.25)
    applied(pool, producer, rng, n, max(600, n / 20) + due - t0)
    cpu1 = cpu(tk) + cpu(backend)
    ok, first, last = outcomes(ids)
    if ok != n or first < due:
        raise SystemExit(f"delayed: {ok} of {n} applied, the first at {first}, T {due}")
    return {"commands": n, "parkSeconds": round(parked_last - t0, 2), "parkedPerSecond": round(n / (parked_last - t0)),
            "marginSeconds": round(due - parked_last, 1), "seconds": round(last - due, 2),
            "perSecond": round(n / (last - due)), "releasedSeconds": round(max(released - due, 0.001), 2),
            "firstAfterTMs": round(1000 * (first - due), 1),
            "timekeeperAndBackendCpuSeconds": round(cpu1 - cpu0, 2),
            "claimAtT": {"buffers": buffers, "plan": plan}}


def timekeeper(pool):
    """(pid of the pool's cv-timekeeper, pid of its PostgreSQL backend), once it is active."""
    deadline = time.time() + 30
    while "timekeeper active" not in pool.read_log():
        if time.time() > deadline:
            raise SystemExit(f"the pool's timekeeper is not active; log {pool.log.name}")
        time.sleep(0.1)
    for pid in session_pids(pool.proc.pid):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == "cv-timekeeper":
                    rows = query("SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                                 f"conveyor-timekeeper-{pid}")
                    if rows:
                        return pid, rows[0][0]
        except OSError:
            pass
    raise SystemExit(f"no cv-timekeeper with a database connection in the pool; log {pool.log.name}")


def cpu(pid):
    """utime + stime of a process, seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def idle_cpu(pool, seconds):
    tk, backend = timekeeper(pool)
    a, b, t = cpu(tk), cpu(backend), time.time()
    time.sleep(seconds)
    a2, b2, t2 = cpu(tk), cpu(backend), time.time()
    return {"timekeeper": round((a2 - a) / (t2 - t), 5), "backend": round((b2 - b) / (t2 - t), 5)}


def idle(pool, parked, seconds):
    out = {"parked": parked, "none": idle_cpu(pool, seconds)}
    t = time.time()
    query("INSERT INTO parked_commands (id, queue, type, due_at, envelope, reason) "
          "SELECT gen_random_uuid(), 'catalog', 'createProduct', now() + interval '365 days' + g * interval '1 ms', "
          "'{\"type\":\"createProduct\",\"payload\":{}}', 'delayed' FROM generate_series(1, %s) g", parked)
    query("VACUUM ANALYZE parked_commands")
    out["insertSeconds"] = round(time.time() - t, 1)
    out["many"] = idle_cpu(pool, seconds)
    out["sizesMB"] = {r[0]: round(r[1] / 2**20, 1) for r in query(
        "SELECT c, pg_relation_size(c) FROM unnest(ARRAY['parked_commands', 'parked_commands_due', "
        "'parked_commands_queue']) AS c")}
    out["claimPlan"], out["claimBuffers"] = explain("now()")
    times = []
    for _ in range(5):
        t = time.perf_counter()
        query("SELECT queue, count(*) FROM parked_commands GROUP BY queue")
        times.append(1000 * (time.perf_counter() - t))
    out["countPerQueueMs"] = round(sorted(times)[2], 1)
    query("DELETE FROM parked_commands WHERE due_at > now() + interval '364 days'")
    query("VACUUM parked_commands")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commands", type=int, default=100000)
    ap.add_argument("--transports", default="rabbitmq,redis")
    ap.add_argument("--workers", type=int, default=4, help="catalog workers (batch_size 1)")
    ap.add_argument("--parked", type=int, default=1000000, help="rows parked for the idle part; 0 skips it")
    ap.add_argument("--idle-seconds", type=float, default=30)
    ap.add_argument("--park-margin", type=float, default=1.5,
                    help="T is this many times the plain run's duration after the first delayed publish")
    a = ap.parse_args()
    setup()
    out = []
    routing = {"catalog": ["createProduct", "updateProduct", "updateStock", "deleteProduct"]}
    conf = write_config(routing=routing)
    for transport in a.transports.split(","):
        pool = Pool(workers={"catalog": a.workers}, routing=routing, env={"CONVEYOR_TRANSPORT": transport})
        try:
            row = {"transport": transport, "workers": a.workers}
            quiet()
            row["plain"] = p = plain(pool, transport, conf, a.commands)
            print(f"{transport:8} plain:   {p['commands']} createProduct applied in {p['seconds']} s from the first "
                  f"publish ({p['perSecond']}/s)", flush=True)
            quiet()
            row["delayed"] = d = delayed(pool, transport, conf, a.commands, p["seconds"], a.park_margin)
            print(f"{transport:8} parking: {d['commands']} parked in {d['parkSeconds']} s from the first publish "
                  f"({d['parkedPerSecond']}/s; {d['marginSeconds']} s before T)", flush=True)
            print(f"{transport:8} delayed: all applied {d['seconds']} s after T ({d['perSecond']}/s), the first "
                  f"{d['firstAfterTMs']} ms after T, none before; ratio to plain {d['seconds'] / p['seconds']:.2f}; "
                  f"all released (published and unparked) {d['releasedSeconds']} s after T "
                  f"({round(d['commands'] / d['releasedSeconds'])}/s); "
                  f"timekeeper + its backend {d['timekeeperAndBackendCpuSeconds']} CPU s", flush=True)
            print(f"{transport:8} the claim at T ({a.commands} due at once): {d['claimAtT']['buffers']} buffers:\n    "
                  + "\n    ".join(d["claimAtT"]["plan"]), flush=True)
            row["ratio"] = round(d["seconds"] / p["seconds"], 2)
            if a.parked:
                quiet()
                row["idle"] = i = idle(pool, a.parked, a.idle_seconds)
                for k, label in (("none", "0 parked"), ("many", f"{a.parked} parked")):
                    print(f"{transport:8} idle, {label}: timekeeper {i[k]['timekeeper']:.5f}, its backend "
                          f"{i[k]['backend']:.5f} CPU s/s over {a.idle_seconds:.0f} s", flush=True)
                print(f"{transport:8} {a.parked} parked (inserted in {i['insertSeconds']} s): sizes MB {i['sizesMB']}; "
                      f"count per queue {i['countPerQueueMs']} ms; the claim: {i['claimBuffers']} buffers:\n    "
                      + "\n    ".join(i["claimPlan"]), flush=True)
        finally:
            pool.stop()
        out.append(row)
    os.unlink(conf)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
