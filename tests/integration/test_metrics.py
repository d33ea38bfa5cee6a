"""The pool's HTTP listener (http.listen): /livez, /readyz and /metrics, the
latter read with a real Prometheus text parser (prometheus_client). Counters
move by exactly what was published, and keep counting across a kill -9 of a
worker (the scoreboard slot outlives the process)."""
import http.client
import json
import os
import signal
import socket
import time

from prometheus_client.parser import text_string_to_metric_families

from harness import (ROUTING, TRANSPORT, Events, Failure, Publisher, check, contract, drain_dead,
                     envelope, eq, http_pool, new_id, session_pids)

OUTCOMES = ("applied", "rejected", "duplicate", "retried", "dead")


def get(pool, path, method="GET"):
    c = http.client.HTTPConnection("127.0.0.1", pool.port, timeout=10)
    try:
        c.request(method, path)
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read().decode()
    finally:
        c.close()


def wait_http(pool, path, status, timeout=20, pred=lambda body: True):
    """The response to path once it has status and pred(body) holds (the listener
    starts beside the workers, and samples the servers once it runs)."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = get(pool, path)
            if last[0] == status and pred(last[2]):
                return last
        except OSError as e:
            last = e
        time.sleep(0.1)
    raise Failure(f"GET {path}: want {status}, last {last!r}")


def scrape(pool):
    """{(sample name, frozenset of labels): value}, parsed by prometheus_client; and the family types."""
    status, headers, body = get(pool, "/metrics")
    eq(status, 200, "/metrics status")
    check(headers.get("Content-Type", "").startswith("text/plain; version=0.0.4"), f"content type {headers}")
    samples, types = {}, {}
    for fam in text_string_to_metric_families(body):
        types[fam.name] = fam.type
        for s in fam.samples:
            key = (s.name, frozenset(s.labels.items()))
            check(key not in samples, f"sample {key} twice")
            samples[key] = s.value
    return samples, types


def value(samples, name, **labels):
    key = (name, frozenset(labels.items()))
    check(key in samples, f"no sample {name}{labels}")
    return samples[key]


def commands(samples, queue, type_, outcome):
    return value(samples, "conveyor_commands_total", queue=queue, type=type_, outcome=outcome)


def wait_metric(pool, pred, what, timeout=30):
    deadline = time.time() + timeout
    while True:
        samples, _ = scrape(pool)
        if pred(samples):
            return samples
        if time.time() > deadline:
            raise Failure(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_endpoints_and_every_label_set_from_the_start():
    with http_pool() as pool:
        status, headers, body = wait_http(pool, "/livez", 200)
        eq(body, "ok\n", "/livez body")
        eq(headers.get("Content-Security-Policy"), "default-src 'none'; frame-ancestors 'none'", "CSP of /livez")
        status, headers, body = wait_http(pool, "/readyz", 200)
        ready = json.loads(body)
        eq(ready["status"], "ready", "/readyz status")
        want = {"database", "migrations", "draining", "broker_stall", TRANSPORT} | {f"workers.{q}" for q in ROUTING}
        want |= {"breaker"}  # the database breaker (test_breaker)
        eq(set(ready["checks"]), want, "/readyz checks")
        check(all(v == "ok" for v in ready["checks"].values()), f"every check ok: {ready}")
        eq(headers.get("Content-Type"), "application/json", "/readyz content type")

        samples, types = scrape(pool)
        for q, ts in ROUTING.items():
            for t in ts:
                for o in OUTCOMES:
                    eq(commands(samples, q, t, o), 0.0, f"{q}/{t}/{o} at start")
                eq(value(samples, "conveyor_command_duration_seconds_count", queue=q, type=t), 0.0, "duration count")
                eq(value(samples, "conveyor_command_duration_seconds_bucket", queue=q, type=t, le="+Inf"), 0.0,
                   "duration +Inf bucket")
            eq(commands(samples, q, "unknown", "dead"), 0.0, "unknown dead at start")
            eq(value(samples, "conveyor_command_latency_seconds_bucket", queue=q, le="0.005"), 0.0, "latency 5 ms")
            eq(value(samples, "conveyor_command_latency_seconds_bucket", queue=q, le="3600"), 0.0, "latency 1 h")
            for g in ("conveyor_queue_depth", "conveyor_queue_inflight", "conveyor_retry_scheduled",
                      "conveyor_dead_letters"):
                value(samples, g, queue=q)
            for st in ("down", "starting", "idle", "busy"):
                value(samples, "conveyor_workers", queue=q, state=st)
            eq(value(samples, "conveyor_workers", queue=q, state="idle") +
               value(samples, "conveyor_workers", queue=q, state="busy"), 1.0, f"live workers of {q}")
            for r in ("signal", "exit", "config", "recycled"):
                eq(value(samples, "conveyor_worker_restarts_total", queue=q, reason=r), 0.0, "restarts at start")
            rss = [v for (n, l), v in samples.items()
                   if n == "conveyor_worker_resident_bytes" and dict(l)["queue"] == q]
            eq(len(rss), 1, f"resident bytes of {q}'s one worker")
            check(rss[0] > 1e6, f"a worker's resident size is plausible: {rss}")
        events = {f[:-len(".schema.json")] for f in os.listdir(os.path.join(contract.SCHEMAS, "events"))}
        for e in events | {"other"}:  # present (not 0: the relay may have published what an earlier test left)
            value(samples, "conveyor_events_published_total", type=e)
        for n in ("conveyor_outbox_pending", "conveyor_outbox_oldest_age_seconds"):
            value(samples, n)
        eq(value(samples, "conveyor_dependency_up", dependency="postgresql"), 1.0, "postgresql up")
        eq(value(samples, "conveyor_breaker_state", dependency="postgresql"), 0.0, "the database breaker closed")
        eq(value(samples, "conveyor_breaker_opened_total", dependency="postgresql"), 0.0, "it never opened")
        eq(value(samples, "conveyor_dependency_up", dependency=TRANSPORT), 1.0, f"{TRANSPORT} up")
        eq(value(samples, "conveyor_build_info", version="0.1.0"), 1.0, "build info")
        # a broker that answers: nothing stalled, no bound fired (test_hangs freezes one)
        eq(value(samples, "conveyor_broker_stalled", transport=TRANSPORT), 0.0, "no process stalled on its broker")
        eq(value(samples, "conveyor_broker_silences_total", transport=TRANSPORT), 0.0, "no silence")
        eq(ready["checks"]["broker_stall"], "ok", "the broker_stall check")
        wait_metric(pool, lambda s: value(s, "conveyor_relay_active") == 1.0, "the pool's relay active")
        eq(types["conveyor_commands"], "counter", "commands_total type")
        eq(types["conveyor_command_latency_seconds"], "histogram", "latency type")

        # bad requests: a clear 4xx, and the listener goes on
        status, headers, body = get(pool, "/nowhere")
        eq(status, 404, "unknown path")
        check("/metrics" in body, f"the 404 names the paths: {body!r}")
        eq(headers.get("Content-Security-Policy"), "default-src 'none'; frame-ancestors 'none'", "CSP of a 404")
        status, headers, _ = get(pool, "/metrics", method="POST")
        eq(status, 405, "POST /metrics")
        eq(headers.get("Allow"), "GET, HEAD", "Allow of a 405")
        eq(get(pool, "/readyz", method="DELETE")[0], 405, "DELETE /readyz")
        for raw in (b"\x00\xff garbage \r\n\r\n", b"GET " + b"a" * 70000 + b"\r\n",
                    b"GET /livez HTTP/1.1\r\nHost: x\r\nBad header line\r\n\r\n", b"GET /li"):
            s = socket.create_connection(("127.0.0.1", pool.port), timeout=5)
            try:
                s.sendall(raw)
                s.shutdown(socket.SHUT_WR)
                reply = s.recv(4096)
            except OSError:
                reply = b""
            finally:
                s.close()
            check(not reply or reply.startswith(b"HTTP/1.1 4") or reply.startswith(b"HTTP/1.0 4"),
                  f"a malformed request gets a 4xx or nothing: {raw[:40]!r} -> {reply[:80]!r}")
        s = socket.create_connection(("127.0.0.1", pool.port), timeout=5)
        s.sendall(b"GET /livez HTTP/9.9\r\n\r\n")
        check(s.recv(4096).startswith(b"HTTP/1.1 505"), "an HTTP version it does not speak: 505")
        s.close()
        eq(get(pool, "/livez")[0], 200, "the listener still answers after malformed requests")
        rc, left = pool.stop()
        eq(rc, 0, "exit status")
        eq(left, [], "processes left")


def catalog_worker_pids(pool):
    out = []
    for pid in session_pids(pool.proc.pid):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == "cv-worker-catal":
                    out.append(pid)
        except OSError:
            pass
    return out


def publish_round(pub, ev, applied, rejected, duplicates):
    """applied createProducts, rejected ones (no name), then duplicates of applied ones once those are done."""
    done = []
    for _ in range(applied):
        done.append(pub.command(envelope("createProduct", {"name": "Metric lamp", "price": "9.90", "stock": 3})))
    for _ in range(rejected):
        pub.command(envelope("createProduct", {"price": "1.00"}))
    for c in done:
        ev.wait_result(c["id"])
    for c in done[:duplicates]:
        pub.command(c)


def test_counters_move_by_exactly_what_was_published_across_a_kill():
    drain_dead("catalog")
    with http_pool(workers={"catalog": 1}, expect_restarts=True) as pool:
        pub, ev = Publisher(), Events()
        wait_http(pool, "/readyz", 200)
        before, _ = scrape(pool)

        def delta(samples, name, **labels):
            return value(samples, name, **labels) - value(before, name, **labels)

        def settled(s, applied, rejected, duplicate, dead):
            return (delta(s, "conveyor_commands_total", queue="catalog", type="createProduct", outcome="applied"),
                    delta(s, "conveyor_commands_total", queue="catalog", type="createProduct", outcome="rejected"),
                    delta(s, "conveyor_commands_total", queue="catalog", type="createProduct", outcome="duplicate"),
                    delta(s, "conveyor_commands_total", queue="catalog", type="unknown", outcome="dead"),
                    delta(s, "conveyor_events_published_total", type="product.created"),
                    delta(s, "conveyor_events_published_total", type="command.rejected")) == \
                (applied, rejected, duplicate, dead, applied, rejected)

        publish_round(pub, ev, 7, 3, 2)
        pub.raw("catalog", b"not json at all")
        s = wait_metric(pool, lambda s: settled(s, 7, 3, 2, 1), "the first round's counts")
        time.sleep(1)  # nothing more arrives
        s, _ = scrape(pool)
        check(settled(s, 7, 3, 2, 1), "the counts stay exact")
        eq(delta(s, "conveyor_command_duration_seconds_count", queue="catalog", type="createProduct"), 10.0,
           "durations: the applied and the rejected")
        eq(delta(s, "conveyor_command_latency_seconds_count", queue="catalog"), 10.0,
           "latencies: every command whose work committed (a duplicate's is not)")
        check(delta(s, "conveyor_command_latency_seconds_sum", queue="catalog") > 0, "latency sum moved")
        eq(delta(s, "conveyor_commands_total", queue="catalog", type="createProduct", outcome="dead"), 0.0, "no dead")
        wait_metric(pool, lambda s: value(s, "conveyor_dead_letters", queue="catalog") == 1.0,
                    "the sampled dead-letter count")

        # kill -9 the catalog worker: the supervisor restarts it in the same slot
        pids = catalog_worker_pids(pool)
        eq(len(pids), 1, "one catalog worker")
        os.kill(pids[0], signal.SIGKILL)
        wait_metric(pool, lambda s: value(s, "conveyor_worker_restarts_total", queue="catalog", reason="signal") == 1.0
                    and value(s, "conveyor_workers", queue="catalog", state="idle") +
                    value(s, "conveyor_workers", queue="catalog", state="busy") == 1.0, "the restarted worker")
        check(catalog_worker_pids(pool) not in ([], pids), "a new catalog worker runs")
        s, _ = scrape(pool)
        check(settled(s, 7, 3, 2, 1), "the counts of the killed worker stay")

        publish_round(pub, ev, 4, 2, 1)
        wait_metric(pool, lambda s: settled(s, 11, 5, 3, 1), "the second round's counts, added to the first")
        time.sleep(1)
        s, _ = scrape(pool)
        check(settled(s, 11, 5, 3, 1), "the counts stay exact after the kill")
        drain_dead("catalog")
        pub.close()
        ev.close()
        rc, left = pool.stop()
        eq(rc, 0, "exit status")


def test_readyz_names_a_queue_without_workers():
    with http_pool(workers={"orders": 0}) as pool:
        status, _, body = wait_http(pool, "/readyz", 503,
                                    pred=lambda b: json.loads(b)["checks"]["database"] != "not sampled yet")
        checks = json.loads(body)["checks"]
        eq(checks["workers.orders"], "no live worker", "the queue without workers")
        eq(checks["workers.catalog"], "ok", "a queue with a worker")
        eq(checks["database"], "ok", "the database")
        eq(json.loads(body)["status"], "not ready", "status")
        eq(get(pool, "/livez")[0], 200, "live all the same")


def test_readyz_says_draining_while_the_pool_stops():
    """SIGTERM with slow commands in hand (password hashes at a high cost): the
    listener stays until the workers are gone, and says 503 draining."""
    with http_pool(extra="domain: { password_hash_opslimit = 12; password_hash_memlimit_mb = 64; };") as pool:
        wait_http(pool, "/readyz", 200)
        pub, ev = Publisher(), Events()
        ids = []
        for i in range(6):
            ids.append(pub.command(envelope("register", {"email": f"drain{i}.{time.time()}@example.com",
                                                         "password": "Secret123", "name": "Drain",
                                                         "userId": new_id()}))["id"])
        ev.wait_result(ids[0], timeout=30)  # the worker is at it
        pool.proc.send_signal(signal.SIGTERM)
        status, _, body = wait_http(pool, "/readyz", 503, timeout=10)
        eq(json.loads(body)["checks"]["draining"], "draining", "the draining check")
        rc = pool.proc.wait(60)
        eq(rc, 0, "exit status after the drain")
        eq(session_pids(pool.proc.pid), [], "no child left")
        pool.check_log()  # stopped here, not by Pool.stop: its log is read here
        pub.close()
        ev.close()


def test_retried_and_dead_are_counted_and_the_retry_gauge_shows_them():
    """A serialization failure twice then success, and a deadlock every time
    (max_attempts 3): four retries, one applied, one dead; while they wait,
    conveyor_retry_scheduled shows them (the broker's delay queues / retry set)."""
    from test_recovery import chaos_trigger, product
    drain_dead("catalog")
    # retries longer than the broker gauges' sampling period (5 s), so a sample sees them wait
    with chaos_trigger(), http_pool(extra="retry: { base_delay_ms = 6000; max_delay_ms = 6000; };",
                                    queue_opts="max_attempts = 3;") as pool:
        wait_http(pool, "/readyz", 200)
        before, _ = scrape(pool)

        def delta(s, outcome):
            return (commands(s, "catalog", "updateStock", outcome) -
                    commands(before, "catalog", "updateStock", outcome))

        pub, ev = Publisher(), Events()
        flaky = pub.command(envelope("updateStock", {"productId": product("flaky"), "quantityChange": -1}))
        pub.command(envelope("updateStock", {"productId": product("doomed"), "quantityChange": 1}))
        wait_metric(pool, lambda s: value(s, "conveyor_retry_scheduled", queue="catalog") >= 1,
                    "a retry waiting, in the sampled gauge")
        ev.wait_result(flaky["id"], timeout=30)
        s = wait_metric(pool, lambda s: (delta(s, "retried"), delta(s, "applied"), delta(s, "dead")) == (4, 1, 1),
                        "four retries, one applied, one dead", timeout=30)
        eq(delta(s, "rejected"), 0.0, "none rejected")
        wait_metric(pool, lambda s: value(s, "conveyor_retry_scheduled", queue="catalog") == 0 and
                    value(s, "conveyor_dead_letters", queue="catalog") == 1, "no retry left, one dead letter")
        eq(len(drain_dead("catalog")), 1, "the dead letter")
        pub.close()
        ev.close()


def test_counts_go_on_across_a_reload():
    """SIGHUP: a new generation of children in fresh slots, a new listener on the
    same address; the counts of the old generation stay in the sums."""
    with http_pool(workers={"catalog": 1}) as pool:
        pub, ev = Publisher(), Events()
        wait_http(pool, "/readyz", 200)
        before, _ = scrape(pool)

        def applied(s):
            return (commands(s, "catalog", "createProduct", "applied") -
                    commands(before, "catalog", "createProduct", "applied"))

        publish_round(pub, ev, 3, 0, 0)
        wait_metric(pool, lambda s: applied(s) == 3, "three applied")
        pool.proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 20
        while pool.read_log().count("listening on http://") < 2 and time.time() < deadline:
            time.sleep(0.1)
        check(pool.read_log().count("listening on http://") == 2, "a second listener after the reload")
        wait_http(pool, "/readyz", 200)
        publish_round(pub, ev, 2, 0, 0)
        wait_metric(pool, lambda s: applied(s) == 5, "five applied over both generations")
        # once the old generation is gone (retired one by one), its slots are not counted as workers
        wait_metric(pool, lambda s: value(s, "conveyor_workers", queue="catalog", state="idle") +
                    value(s, "conveyor_workers", queue="catalog", state="busy") == 1.0, "one live catalog worker")
        time.sleep(0.5)
        s, _ = scrape(pool)
        eq(applied(s), 5.0, "five applied, still")
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")
