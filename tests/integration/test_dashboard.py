"""The dashboard (README, "Dashboard"): its reading API against what was
published, its history kept in PostgreSQL across a restart of the pool, its
actions (retry, purge, pause) done only with the token from the page's own
origin, each refusal with its status, bulk actions that touch only the keys
they name, a fuzz of the request parsing, and the page itself in Debian's
chromium (tests/browser/dashboard.mjs, playwright-core)."""
import http.client
import json
import os
import random
import socket
import subprocess
import tempfile
import time

from harness import (BIN, ROOT, TRANSPORT, Events, Failure, Publisher, check, drain_dead, envelope, eq,
                     http_pool, new_id, query, run_bin, write_config)
from test_recovery import FAST_RETRY, chaos_trigger, product, stock

TOKEN = "dashboard-test-token-" + "7" * 12
ARTIFACTS = os.path.join(ROOT, "tests", "artifacts")


def dash_pool(token=TOKEN, **kw):
    return http_pool(token=token, **kw)


def request(pool, method, path, body=None, headers=None):
    """(status, headers, parsed JSON or text) of one request."""
    c = http.client.HTTPConnection("127.0.0.1", pool.port, timeout=15)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        c.request(method, path, body=data, headers=headers or {})
        r = c.getresponse()
        raw = r.read().decode()
        h = dict(r.getheaders())
        try:
            return r.status, h, json.loads(raw) if h.get("Content-Type", "").startswith("application/json") else raw
        except ValueError:
            raise Failure(f"{method} {path}: not JSON: {raw[:200]!r}")
    finally:
        c.close()


def get(pool, path):
    status, _, body = request(pool, "GET", path)
    eq(status, 200, f"GET {path} ({body})")
    return body


def act(pool, path, body, token=TOKEN, origin=True, ctype="application/json", extra=None):
    headers = {"Content-Type": ctype}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if origin:
        headers["Origin"] = pool.origin
    headers.update(extra or {})
    return request(pool, "POST", path, body, headers)


def wait_for(what, fn, timeout=20):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = fn()
        except OSError as e:  # the HTTP child starts beside the workers: not listening yet
            last = e
        if last and not isinstance(last, OSError):
            return last
        time.sleep(0.1)
    raise Failure(f"timed out waiting for {what} (last: {last!r})")


def queue_of(overview, name):
    return next(q for q in overview["queues"] if q["name"] == name)


def wait_ready(pool):
    wait_for("the dashboard's first sample",
             lambda: request(pool, "GET", "/readyz")[0] == 200 and get(pool, "/api/overview")["dependencies"]["postgresql"])


# ---- reading ------------------------------------------------------------------------------

def test_reading_api_counts_what_was_published():
    with dash_pool() as pool:
        wait_ready(pool)
        pub, ev = Publisher(), Events()
        before = queue_of(get(pool, "/api/overview"), "catalog")["done"]
        cmds = [envelope("createProduct", {"name": f"Dash {i}", "price": "1.00", "stock": 1}) for i in range(12)]
        bad = envelope("updateStock", {"productId": new_id(), "quantityChange": 1})  # rejected: no such product
        for c in cmds + [bad]:
            pub.command(c)
        for c in cmds + [bad]:
            ev.wait_result(c["id"])
        ov = wait_for("the overview to count 13 more", lambda: (lambda o: o if queue_of(o, "catalog")["done"] - before == 13
                                                                else None)(get(pool, "/api/overview")), timeout=5)
        q = queue_of(ov, "catalog")
        check(q["ratePerSecond"] > 0, f"a rate: {q}")
        check(q["latencyP50Seconds"] is not None and 0 < q["latencyP50Seconds"] <= q["latencyP99Seconds"], f"latency {q}")
        eq(ov["actions"], {"enabled": True}, "actions enabled by the token")
        eq(ov["dependencies"]["postgresql"], True, "postgresql up")
        eq(ov["dependencies"][TRANSPORT], True, f"{TRANSPORT} up")
        check(ov["relay"]["active"] and ov["relay"]["pid"] > 0 and ov["relay"]["published"] >= 13, f"relay {ov['relay']}")
        workers = [w for w in ov["workers"] if w["queue"] == "catalog"]
        check(workers and all(w["pid"] > 0 and w["residentBytes"] > 1 << 20 for w in workers), f"workers {workers}")
        eq(sum(w["done"] for w in workers) >= 13, True, "workers' done counts")
        recent = wait_for("the recent commands", lambda: (lambda ids: ids if {c["id"] for c in cmds[-5:]} <= ids else None)(
            {r["id"] for r in get(pool, "/api/overview")["recent"]}), timeout=5)
        check(bad["id"] in recent, "the rejection is among the recent")
        # one command's page
        c = get(pool, f"/api/command?id={cmds[0]['id']}")
        eq((c["processed"]["type"], c["processed"]["outcome"]), ("createProduct", "applied"), "processed")
        eq([e["type"] for e in c["events"]], ["product.created"], "its events")
        eq(c["events"][0]["payload"]["commandId"], cmds[0]["id"], "the event's payload")
        eq(c["deadLetters"], [], "no dead letter")
        r = get(pool, f"/api/command?id={bad['id']}")
        eq((r["processed"]["outcome"], [e["type"] for e in r["events"]]), ("rejected", ["command.rejected"]), "rejection")
        status, _, body = request(pool, "GET", "/api/command?id=not-a-uuid")
        eq(status, 400, f"a bad id: {body}")
        # the history's running minute has them already
        h = get(pool, "/api/history?range=hour")
        eq((h["stepSeconds"], len(h["points"])), (60, 60), "an hour of minutes")
        check(sum(p["commands"] for p in h["points"][-2:]) >= 13, f"the last minutes count them: {h['points'][-2:]}")
        d = get(pool, "/api/history?range=day")
        eq((d["stepSeconds"], len(d["points"])), (300, 288), "a day of five minutes")
        eq(request(pool, "GET", "/api/history?range=week")[0], 400, "an unknown range")
        # the page's assets: embedded, typed, under the CSP
        for path, ctype in (("/", "text/html"), ("/app.js", "text/javascript"), ("/app.css", "text/css"),
                            ("/favicon.svg", "image/svg+xml")):
            status, headers, _ = request(pool, "GET", path)
            eq(status, 200, f"GET {path}")
            check(headers["Content-Type"].startswith(ctype), f"{path}: {headers['Content-Type']}")
            csp = headers["Content-Security-Policy"]
            check(csp.startswith("default-src 'none';") and "frame-ancestors 'none'" in csp and
                  ("script-src 'self'" in csp) == (path == "/") and "unsafe" not in csp, f"CSP of {path}: {csp}")
        eq(request(pool, "GET", "/api/nothing")[0], 404, "an unknown API path")
        # a DNS-rebound name (a hostile page's own host resolving to 127.0.0.1) reads nothing
        for path in ("/", "/api/overview", "/api/dead"):
            eq(request(pool, "GET", path, headers={"Host": f"rebound.example:{pool.port}"})[0], 421, f"{path}, foreign Host")
        eq(request(pool, "GET", "/api/overview", headers={"Host": f"localhost:{pool.port}"})[0], 200, "localhost")
        eq(request(pool, "GET", "/livez", headers={"Host": "probe.internal"})[0], 200, "probes answer any Host")
        eq(request(pool, "DELETE", "/api/dead")[0], 405, "an unknown method")
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")


def test_history_survives_a_restart_of_the_pool():
    def total(pool):
        return sum(p["commands"] for p in get(pool, "/api/history?range=day")["points"])

    with dash_pool() as pool:
        wait_ready(pool)
        base = total(pool)
        pub, ev = Publisher(), Events()
        cmds = [envelope("createProduct", {"name": f"Hist {i}", "price": "1.00"}) for i in range(9)]
        for c in cmds:
            pub.command(c)
        for c in cmds:
            ev.wait_result(c["id"])
        wait_for("the running minute to count 9", lambda: total(pool) - base == 9, timeout=5)
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")  # writes the minute so far
    with dash_pool() as pool:
        wait_ready(pool)
        eq(total(pool) - base, 9, "the history, from PostgreSQL after the restart")
        eq(pool.stop(), (0, []), "clean stop")


# ---- actions --------------------------------------------------------------------------------

def test_actions_need_token_origin_and_json():
    with dash_pool() as pool:
        wait_ready(pool)
        body = {"queue": "users", "paused": True}
        cases = (
            ("no origin at all", dict(origin=False), 403),
            ("another origin", dict(extra={"Origin": "http://evil.example"}), 403),
            ("a cross-site fetch", dict(extra={"Sec-Fetch-Site": "cross-site"}), 403),
            ("no token", dict(token=None), 401),
            ("a wrong token", dict(token=TOKEN[:-1] + "8"), 401),
            ("a form post", dict(ctype="application/x-www-form-urlencoded"), 415),
            ("text", dict(ctype="text/plain"), 415),
        )
        for what, kw, want in cases:
            status, _, resp = act(pool, "/api/queue/pause", body, **kw)
            eq(status, want, f"{what}: {resp}")
            check(isinstance(resp, dict) and resp.get("error"), f"{what}: a JSON error says why: {resp}")
        for what, raw, want in (("not JSON", b"{paused", 400), ("an array", b"[]", 400),
                                ("no queue", b'{"paused":true}', 400), ("unknown queue", b'{"queue":"nope","paused":true}', 404),
                                ("paused not a bool", b'{"queue":"users","paused":"yes"}', 400),
                                ("not UTF-8", b'{"queue":"\xff","paused":true}', 400),
                                ("over 64 KiB", b'{"queue":"' + b"u" * 70000 + b'"}', 413),
                                ("keys not a list", b'{"queue":"users","keys":"x"}', 400)):
            path = "/api/dead/purge" if b"keys" in raw else "/api/queue/pause"
            status, _, resp = act(pool, path, raw)
            eq(status, want, f"{what}: {resp}")
        eq(act(pool, "/api/elsewhere", body)[0], 404, "an unknown action")
        eq(query("SELECT count(*) FROM queue_state WHERE queue = 'users' AND paused"), [(0,)], "nothing was paused")
        # the right request: the queue pauses for the pool, shown in the overview and the metrics
        status, _, resp = act(pool, "/api/queue/pause", body, extra={"Sec-Fetch-Site": "same-origin"})
        eq((status, resp), (200, {"queue": "users", "paused": True}), "paused")
        wait_for("the overview shows it paused", lambda: queue_of(get(pool, "/api/overview"), "users")["paused"], 5)
        check('conveyor_queue_paused{queue="users"} 1' in request(pool, "GET", "/metrics")[2], "metrics show it")
        eq(query("SELECT updated_by FROM queue_state WHERE queue = 'users'"), [("dashboard@127.0.0.1",)], "who paused")
        status, _, resp = act(pool, "/api/queue/pause", {"queue": "users", "paused": False})
        eq((status, resp), (200, {"queue": "users", "paused": False}), "resumed")
        wait_for("the overview shows it running", lambda: not queue_of(get(pool, "/api/overview"), "users")["paused"], 5)
        log = pool.read_log()
        check("dashboard (127.0.0.1): paused users" in log and "dashboard (127.0.0.1): resumed users" in log,
              "the actions are logged")
        check(TOKEN not in log, "the token is never logged")
        eq(pool.stop(), (0, []), "clean stop")
    with dash_pool(token=None) as pool:  # no token configured: actions are off, reading works
        wait_ready(pool)
        eq(get(pool, "/api/overview")["actions"], {"enabled": False}, "actions off")
        status, _, resp = act(pool, "/api/queue/pause", {"queue": "users", "paused": True})
        eq(status, 403, f"actions off: {resp}")
        check("http.token" in resp["error"], f"says how to turn them on: {resp}")
        eq(pool.stop(), (0, []), "clean stop")


def test_the_token_setting_is_checked_and_never_printed():
    secret = "tok-" + new_id()
    with tempfile.NamedTemporaryFile("w", suffix=".token", delete=False) as f:
        f.write(secret + "\n")
    cases = (
        ('token = "short";', 2, "at least 16 characters"),
        (f'token = "{secret}"; token_file = "{f.name}";', 2, "both set"),
        ('token_file = "/nonexistent/conveyor.token";', 2, "cannot read '/nonexistent/conveyor.token'"),
        (f'token_file = "{f.name}";', 0, ""),
        (f'token = "{secret}";', 0, ""),
    )
    try:
        for setting, want, says in cases:
            config = write_config(extra=f'http: {{ listen = "127.0.0.1:9464"; {setting} }};')
            r = run_bin("conveyor-workers", "-c", config, "--check")
            os.unlink(config)
            eq(r.returncode, want, f"--check with http {{ {setting.replace(secret, '...')} }}: {r.stderr}")
            check(says in r.stderr, f"says why ({says!r}): {r.stderr}")
            check(secret not in r.stdout + r.stderr, "the token is never printed")
    finally:
        os.unlink(f.name)


def dead_letters(pool, queue):
    for q in get(pool, "/api/dead")["queues"]:
        if q["queue"] == queue:
            return [dict(letter, reason=g["reason"]) for g in q["groups"] for letter in g["letters"]]
    raise Failure(f"no queue {queue} in /api/dead")


def test_dead_letters_shown_retried_and_purged_by_key():
    drain_dead("catalog")
    with chaos_trigger(), dash_pool(extra=FAST_RETRY, queue_opts="max_attempts = 2;") as pool:
        wait_ready(pool)
        pub, ev = Publisher(), Events()
        pid = product("doomed")
        cmd = envelope("updateStock", {"productId": pid, "quantityChange": 5})
        pub.command(cmd)
        pub.raw("catalog", b"not json at all")
        letters = wait_for("two dead letters", lambda: (lambda d: d if len(d) == 2 else None)(dead_letters(pool, "catalog")))
        by_id = {d["commandId"]: d for d in letters}
        eq((by_id[cmd["id"]]["reason"], by_id[cmd["id"]]["attempts"], by_id[cmd["id"]]["key"]),
           ("retries_exhausted", 2, cmd["id"]), "the doomed command, keyed by its id")
        junk = by_id[None]
        check(junk["key"].startswith("body-") and len(junk["key"]) == 21, f"a letter without an id: a body key {junk}")
        shown = get(pool, f"/api/dead/letter?queue=catalog&key={cmd['id']}")
        eq(json.loads(shown["message"]), cmd, "show: the message")
        c = get(pool, f"/api/command?id={cmd['id']}")
        eq((len(c["deadLetters"]), c["processed"], c["attempts"]["count"] >= 2), (1, None, True), "the command's page")
        # a bulk purge acts only on the keys it names: a letter that came after is untouched
        late = envelope("frobnicate", {})  # a type catalog does not take: dead at once
        pub.raw("catalog", json.dumps(late).encode(), message_id=late["id"])
        wait_for("the late letter", lambda: len(dead_letters(pool, "catalog")) == 3)
        status, _, resp = act(pool, "/api/dead/purge", {"queue": "catalog", "keys": [junk["key"], "body-0000000000000000"]})
        eq((status, resp), (200, {"queue": "catalog", "asked": 2, "purged": 1, "missing": 1}), "purge by key")
        eq(sorted(d["commandId"] for d in dead_letters(pool, "catalog")), sorted([cmd["id"], late["id"]]), "the rest stay")
        # fixed, then retried from the dashboard: applied once, with a fresh attempt count
        query("DROP TRIGGER IF EXISTS test_chaos ON products")
        status, _, resp = act(pool, "/api/dead/retry", {"queue": "catalog", "keys": [cmd["id"]]})
        eq((status, resp), (200, {"queue": "catalog", "asked": 1, "requeued": 1, "missing": 0}), "retry by key")
        eq(ev.wait_result(cmd["id"], timeout=20)[0]["type"], "stock.updated", "applied after the retry")
        eq(stock(pid), 15, "applied once")
        eq([d["commandId"] for d in dead_letters(pool, "catalog")], [late["id"]], "only the late one is left")
        log = pool.read_log()
        check("dashboard (127.0.0.1): purged 1 dead letter of catalog (2 asked)" in log, "purge logged")
        check("dashboard (127.0.0.1): requeued 1 dead letter of catalog (1 asked)" in log, "retry logged")
        drain_dead("catalog")
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")


# ---- fuzz -----------------------------------------------------------------------------------

def raw_request(port, data, timeout=3):
    """Sends bytes, returns the status line's code (0: closed without one)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while len(got) < 64:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        parts = got.split(b" ", 2)
        return int(parts[1]) if len(parts) > 1 and parts[0].startswith(b"HTTP/") and parts[1].isdigit() else 0
    except OSError:  # reset, or closed before all was sent: the server refused to read on
        return 0
    finally:
        s.close()


def test_fuzzed_requests_get_4xx_and_never_crash_the_listener():
    rnd = random.Random(int(os.environ.get("CONVEYOR_FUZZ_SEED", "1515")))
    with dash_pool() as pool:
        wait_ready(pool)
        pids = {w for w in subprocess.run(["pgrep", "-f", f"conveyor-workers.*{os.path.basename(pool.config)}"],
                                          capture_output=True, text=True).stdout.split()}
        paths = ["/", "/api/overview", "/api/dead", "/api/dead/letter?queue=catalog&key=%00", "/api/command?id=%ff",
                 "/api/history?range=" + "h" * 5000, "/api/dead/retry", "/api/dead/purge", "/api/queue/pause",
                 "/metrics", "/%2e%2e/etc/passwd", "/api/../api/overview", "//", "/api/command?id=" + "a" * 100]
        statuses = {}
        for i in range(400):
            kind = rnd.randrange(6)
            path = rnd.choice(paths)
            if kind == 0:  # bytes
                data = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 300)))
            elif kind == 1:  # a request line of junk
                method = rnd.choice(["GET", "POST", "PUT", "G\x01T", "POST "])
                data = f"{method} {path} HTTP/1.{rnd.choice('019')}\r\n\r\n".encode()
            elif kind == 2:  # headers too big
                data = f"GET {path} HTTP/1.1\r\nHost: x\r\nX: {'a' * rnd.randrange(1000, 200000)}\r\n\r\n".encode()
            elif kind == 3:  # a POST whose Content-Length lies
                body = bytes(rnd.randrange(256) for _ in range(rnd.randrange(0, 200)))
                data = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{pool.port}\r\nOrigin: {pool.origin}\r\n"
                        f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {rnd.choice([0, len(body), len(body) + 50, 99999999])}\r\n\r\n").encode() + body
            else:  # well-formed actions with JSON bodies of every shape
                value = rnd.choice([None, True, 1, -1e308, "x" * rnd.randrange(0, 100), [], {}, ["k"] * 2000,
                                    [rnd.random()], "\u00e9\u0000", {"a": [[[[[[]]]]]]}])
                body = {rnd.choice(["queue", "keys", "paused", "zzz"]): value,
                        "queue": rnd.choice(["catalog", "users", "", "n\u00f6", None, 7])}
                data = (f"POST {rnd.choice(['/api/dead/retry', '/api/dead/purge', '/api/queue/pause'])} HTTP/1.1\r\n"
                        f"Host: 127.0.0.1:{pool.port}\r\nOrigin: {pool.origin}\r\nAuthorization: Bearer {TOKEN}\r\n"
                        f"Content-Type: application/json\r\nContent-Length: {len(json.dumps(body).encode())}\r\n\r\n"
                        ).encode() + json.dumps(body).encode()
            status = raw_request(pool.port, data)
            statuses[status] = statuses.get(status, 0) + 1
            check(status == 0 or status < 500 or status == 503, f"request {i} ({data[:120]!r}): status {status}")
            if i % 50 == 0:
                eq(request(pool, "GET", "/livez")[0], 200, f"alive after {i} requests")
        print(f"fuzz: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}")
        check(sum(n for s, n in statuses.items() if 400 <= s < 500) > 100, f"most are refused with a 4xx: {statuses}")
        eq(get(pool, "/api/overview")["actions"], {"enabled": True}, "still serving")
        after = {w for w in subprocess.run(["pgrep", "-f", f"conveyor-workers.*{os.path.basename(pool.config)}"],
                                           capture_output=True, text=True).stdout.split()}
        eq(after, pids, "no process of the pool (the HTTP child included) died or was restarted")
        for q in ("users", "catalog", "orders"):  # a fuzzed body may have been a valid pause
            eq(act(pool, "/api/queue/pause", {"queue": q, "paused": False})[0], 200, f"resume {q}")
        eq(query("SELECT count(*) FROM queue_state WHERE paused"), [(0,)], "nothing left paused")
        eq(pool.stop(), (0, []), "clean stop")


# ---- the page in a browser --------------------------------------------------------------------

class Browser:
    """tests/browser/dashboard.mjs in Debian's chromium, spoken to in JSON lines."""

    def __init__(self, pool, screenshot):
        script = os.path.join(ROOT, "tests", "browser", "dashboard.mjs")
        for need, how in ((os.path.join(ROOT, "tests", "browser", "node_modules", "playwright-core"),
                           "run scripts/test.sh (it runs npm ci in tests/browser)"),
                          ("/usr/bin/chromium", "apt-get install chromium (scripts/test.sh does)")):
            if not os.path.exists(need):
                raise Failure(f"the browser test needs {need}: {how}")
        env = dict(os.environ, DASHBOARD_URL=pool.origin, DASHBOARD_TOKEN=TOKEN, SCREENSHOT=screenshot)
        self.p = subprocess.Popen(["node", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                  cwd=os.path.dirname(script))

    def said(self, step, timeout=30):
        """The driver's next line, which must be step."""
        import select
        deadline = time.time() + timeout
        while time.time() < deadline:
            ready, _, _ = select.select([self.p.stdout], [], [], max(0.0, deadline - time.time()))
            if not ready:
                break
            line = self.p.stdout.readline()
            if not line:
                raise Failure(f"the browser driver ended (exit {self.p.wait()}) waiting for {step}")
            msg = json.loads(line)
            print(f"browser: {msg}")
            if msg.get("step") == "crashed":
                raise Failure(f"the browser driver crashed: {msg.get('error')}")
            eq(msg.get("step"), step, f"the browser driver's answer ({msg})")
            return msg
        raise Failure(f"the browser driver said nothing for {timeout} s (waiting for {step})")

    def ask(self, msg, step, timeout=30):
        self.p.stdin.write(json.dumps(msg) + "\n")
        self.p.stdin.flush()
        return self.said(step, timeout)

    def close(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


def test_the_page_in_a_browser():
    drain_dead("catalog")
    os.makedirs(ARTIFACTS, exist_ok=True)
    # one per build as well: scripts/test.sh runs the Release and the ASan suites at once
    build = os.path.basename(os.path.normpath(BIN))
    shot = os.path.join(ARTIFACTS, f"dashboard-{TRANSPORT}" + ("" if build == "build" else f"-{build}") + ".png")
    if os.path.exists(shot):
        os.unlink(shot)
    with chaos_trigger(), dash_pool(extra=FAST_RETRY, queue_opts="max_attempts = 2;") as pool:
        wait_ready(pool)
        pub, ev = Publisher(), Events()
        browser = Browser(pool, shot)
        try:
            browser.said("loaded", timeout=60)
            # a command published now shows on the page within 2 s of its commit
            cmd = envelope("createProduct", {"name": "Seen in the browser", "price": "2.50", "stock": 1})
            pub.command(cmd)
            ev.wait_result(cmd["id"])
            seen = browser.ask({"expect_command": cmd["id"]}, "seen", timeout=15)
            check(seen["ms"] <= 2000, f"on the page {seen['ms']} ms after its result event (want <= 2000)")
            # a dead letter, fixed, then retried from the page: applied
            pid = product("doomed")
            doomed = envelope("updateStock", {"productId": pid, "quantityChange": 4})
            pub.command(doomed)
            wait_for("the dead letter", lambda: any(d["commandId"] == doomed["id"] for d in dead_letters(pool, "catalog")))
            query("DROP TRIGGER IF EXISTS test_chaos ON products")
            retried = browser.ask({"retry_dead": doomed["id"]}, "retried", timeout=45)
            check("requeued 1" in retried["status"], f"the page says what it did: {retried}")
            eq(ev.wait_result(doomed["id"], timeout=20)[0]["type"], "stock.updated", "applied after the page's retry")
            eq(stock(pid), 14, "applied once")
            # refusals: no token from the page, another origin, a cross-site fetch, not JSON
            refused = browser.ask({"refusals": True}, "refused", timeout=30)
            eq(refused["statuses"], [401, 403, 403, 415], "refused POSTs")
            # a parked command (the test's own row, due tomorrow) cancelled from the page
            parked = envelope("createProduct", {"name": "cancelled in the browser", "price": 1})
            query("INSERT INTO parked_commands (id, queue, type, due_at, envelope, reason) "
                  "VALUES (%s, 'catalog', 'createProduct', now() + interval '1 day', %s, 'delayed')",
                  parked["id"], json.dumps(parked))
            cancelled = browser.ask({"cancel_parked": parked["id"]}, "cancelled", timeout=45)
            check("cancelled" in cancelled["status"], f"the page says what it did: {cancelled}")
            eq(ev.wait_result(parked["id"])[0]["data"]["code"], "CANCELLED", "its one result event")
            done = browser.ask({"finish": True}, "done", timeout=60)
            eq(done["errors"], [], "no console error, no failed request, no CSP violation")
        finally:
            browser.close()
            paused = query("SELECT queue FROM queue_state WHERE paused")
            query("UPDATE queue_state SET paused = false")  # a refusal that was obeyed must not stop later tests
        eq(paused, [], "the refused pauses (asking for the opposite of the state) changed nothing")
        check(os.path.getsize(shot) > 10000, f"the screenshot {shot}")
        print(f"screenshot: {shot}")
        log = pool.read_log()
        check("requeued 1 dead letter of catalog" in log, "the page's retry is logged")
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")
