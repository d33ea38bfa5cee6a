"""Each command's result event exactly as docs/contract.md says, the rows behind it,
rejections, duplicates, and the concurrency rule of updateStock."""
import re
import time
from collections import Counter

from harness import Events, Pool, Publisher, check, envelope, eq, new_id, query

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
ENVELOPE_KEYS = {"id", "type", "occurredAt", "commandId", "commandType", "correlationId",
                 "aggregateType", "aggregateId", "data"}


class Env:
    """A running pool with a publisher and a subscriber; stop() checks a clean exit."""

    def __init__(self, workers=None):
        self.pool = Pool(workers)
        self.pub = Publisher()
        self.ev = Events()

    def run(self, cmd, count=1):
        self.pub.command(cmd)
        return self.ev.wait_result(cmd["id"], count=count)

    def stop(self):
        try:  # a connection the broker dropped (a long failed wait) must not leave the pool running
            self.pub.close()
            self.ev.close()
        except Exception as e:  # noqa: BLE001
            print(f"closing the test's connections: {e!r}")
        rc, left = self.pool.stop()
        eq(rc, 0, "conveyor-workers exit status after SIGTERM")
        eq(left, [], "processes left behind")


def scenario(workers=None):
    def deco(fn):
        def wrapper():
            env = Env(workers)
            try:
                fn(env)
            finally:
                env.stop()
        wrapper.__name__ = fn.__name__
        wrapper.__doc__ = fn.__doc__
        return wrapper
    return deco


def check_envelope(ev, cmd, type_, agg_type, agg_id):
    eq(set(ev.keys()), ENVELOPE_KEYS, "event envelope keys")
    check(UUID.match(ev["id"]), "event id is a UUID")
    eq(ev["type"], type_, "event type")
    check(TS.match(ev["occurredAt"]), f"occurredAt is RFC 3339 with ms: {ev['occurredAt']}")
    eq(ev["commandId"], cmd["id"], "commandId")
    eq(ev["commandType"], cmd["type"], "commandType")
    eq(ev["correlationId"], cmd.get("correlationId"), "correlationId")
    eq(ev["aggregateType"], agg_type, "aggregateType")
    eq(ev["aggregateId"], agg_id, "aggregateId")


def outcome(cid):
    rows = query("SELECT type, outcome FROM processed_commands WHERE id = %s", cid)
    eq(len(rows), 1, f"processed_commands rows for {cid}")
    return rows[0][1]


def create_product(env, stock=0, **kw):
    payload = {"name": "Widget", "price": "19.99", "stock": stock}
    payload.update(kw)
    res = env.run(envelope("createProduct", payload))
    eq(res[0]["type"], "product.created", "createProduct result")
    return res[0]["data"]["productId"]


def rejection(env, cmd):
    res = env.run(cmd)
    eq(len(res), 1, "one result event")
    ev = res[0]
    check_envelope(ev, cmd, "command.rejected", "command", cmd["id"])
    eq(outcome(cmd["id"]), "rejected", "processed_commands outcome")
    return ev["data"]


@scenario()
def test_register(env):
    uid = new_id()
    email = f"Ann.{uid[:8]}@Example.COM"
    cmd = envelope("register", {"name": "  Ann Smith ", "email": email, "password": "Secret123", "userId": uid},
                   correlation_id="signup-42")
    res = env.run(cmd)
    eq(len(res), 1, "events of register")
    ev = res[0]
    check_envelope(ev, cmd, "user.registered", "user", uid)
    d = ev["data"]
    eq(set(d.keys()), {"userId", "name", "email", "createdAt"}, "user.registered data keys")
    eq(d["userId"], uid, "userId")
    eq(d["name"], "Ann Smith", "name is trimmed")
    eq(d["email"], email.lower(), "email is lower-cased")
    check(TS.match(d["createdAt"]), "createdAt format")
    name, stored_email, hash_ = query("SELECT name, email, password_hash FROM users WHERE id = %s", uid)[0]
    eq((name, stored_email), ("Ann Smith", email.lower()), "users row")
    check(hash_.startswith("$argon2id$"), "password stored as an argon2id hash")
    check("Secret123" not in hash_, "password not stored in clear")
    check("Secret123" not in env.pool.read_log(), "password never logged")
    eq(outcome(cmd["id"]), "applied", "processed_commands outcome")


@scenario()
def test_register_upper_case_non_ascii_emails(env):
    """Emails are lower-cased with full Unicode semantics (PostgreSQL's lower(),
    the mapping of the users_email_check constraint): an upper-case non-ASCII
    email is a valid registration, stored and announced lower-cased, and the
    same address in another case is EMAIL_TAKEN."""
    tag = new_id()[:8]
    for email, want in [(f"ÉLODIE.{tag}@example.com", f"élodie.{tag}@example.com"),
                        (f"ÅSA.ØRN.{tag}@EXAMPLE.SE", f"åsa.ørn.{tag}@example.se"),
                        (f"ΣΩΚΡΆΤΗΣ.{tag}@example.gr", f"σωκράτησ.{tag}@example.gr"),
                        (f"ÐÖRÛ-ÇÃ.{tag}@Exämple.COM", f"ðörû-çã.{tag}@exämple.com")]:
        uid = new_id()
        res = env.run(envelope("register", {"name": "Elodie", "email": email, "password": "Analytical1",
                                            "userId": uid}))
        eq([e["type"] for e in res], ["user.registered"], f"register {email}")
        eq(res[0]["data"]["email"], want, "the email in the event")
        eq(query("SELECT email FROM users WHERE id = %s", uid)[0][0], want, "the email stored")
        d = rejection(env, envelope("register", {"name": "Elodie", "email": want.upper(), "password": "Analytical1"}))
        eq(d["code"], "EMAIL_TAKEN", f"the same address in upper case: {want.upper()}")
    check("Analytical1" not in env.pool.read_log(), "password never logged")
    check("$argon2id$" not in env.pool.read_log(), "no hash logged")


@scenario()
def test_register_rejections(env):
    uid = new_id()
    email = f"bob.{uid[:8]}@example.com"
    env.run(envelope("register", {"name": "Bob", "email": email, "password": "Secret123", "userId": uid}))
    d = rejection(env, envelope("register", {"name": "Bob2", "email": email.upper(), "password": "Secret123"}))
    eq(d["code"], "EMAIL_TAKEN", "same email, other case")
    d = rejection(env, envelope("register", {"name": "Bob3", "email": "x" + email, "password": "Secret123",
                                             "userId": uid}))
    eq(d["code"], "CONFLICT", "userId exists")
    d = rejection(env, envelope("register", {"name": " ", "email": "nope", "password": "short"}))
    eq(d["code"], "VALIDATION_FAILED", "bad payload")
    eq(set(d["fields"].keys()), {"name", "email", "password"}, "fields named")
    check(isinstance(d["message"], str) and d["message"], "message")
    eq(query("SELECT count(*) FROM users WHERE email = %s", email)[0][0], 1, "one user with the email")


@scenario()
def test_create_product(env):
    pid = new_id()
    cmd = envelope("createProduct", {"name": " Lamp ", "description": "A lamp", "price": 19.9, "stock": 7,
                                     "category": "home", "productId": pid})
    res = env.run(cmd)
    eq(len(res), 1, "events of createProduct")
    check_envelope(res[0], cmd, "product.created", "product", pid)
    d = res[0]["data"]
    eq(set(d.keys()), {"productId", "name", "description", "price", "stock", "category", "status", "createdAt"},
       "product.created data keys")
    eq((d["productId"], d["name"], d["description"], d["price"], d["stock"], d["category"], d["status"]),
       (pid, "Lamp", "A lamp", "19.90", 7, "home", "DRAFT"), "product.created data")
    check(TS.match(d["createdAt"]), "createdAt format")
    row = query("SELECT name, description, price::text, stock, category, status FROM products WHERE id = %s", pid)
    eq(row, [("Lamp", "A lamp", "19.90", 7, "home", "DRAFT")], "products row")
    # defaults: no stock, no description, no category; a generated id
    cmd = envelope("createProduct", {"name": "Bare", "price": "0"})
    d = env.run(cmd)[0]["data"]
    check(UUID.match(d["productId"]), "generated productId")
    eq((d["description"], d["price"], d["stock"], d["category"]), (None, "0.00", 0, None), "defaults")
    d = rejection(env, envelope("createProduct", {"name": "Dup", "price": 1, "productId": pid}))
    eq(d["code"], "CONFLICT", "productId exists")
    d = rejection(env, envelope("createProduct", {"name": "", "price": "1.234", "stock": -1}))
    eq(d["code"], "VALIDATION_FAILED", "bad product")
    eq(set(d["fields"].keys()), {"name", "price", "stock"}, "fields named")


@scenario()
def test_update_stock(env):
    pid = create_product(env, stock=12)
    cmd = envelope("updateStock", {"productId": pid, "quantityChange": 3}, correlation_id="order-7781")
    res = env.run(cmd)
    eq(len(res), 1, "no notification above the threshold")
    check_envelope(res[0], cmd, "stock.updated", "product", pid)
    eq(res[0]["data"], {"productId": pid, "previousStock": 12, "stock": 15, "quantityChange": 3}, "stock.updated")
    # 15 -> 10: at the threshold from above: stock.low
    cmd = envelope("updateStock", {"productId": pid, "quantityChange": -5})
    res = env.run(cmd, count=2)
    time.sleep(0.3)
    env.ev.poll()
    res = env.ev.for_command(cmd["id"])
    eq([e["type"] for e in res], ["stock.updated", "stock.low"], "events in order")
    check_envelope(res[1], cmd, "stock.low", "product", pid)
    eq(res[1]["data"], {"productId": pid, "stock": 10, "threshold": 10}, "stock.low data")
    # 10 -> 0: already low, so no second stock.low; depleted
    cmd = envelope("updateStock", {"productId": pid, "quantityChange": -10})
    env.run(cmd, count=2)
    time.sleep(0.3)
    env.ev.poll()
    res = env.ev.for_command(cmd["id"])
    eq([e["type"] for e in res], ["stock.updated", "stock.depleted"], "events at zero")
    eq(res[1]["data"], {"productId": pid}, "stock.depleted data")
    d = rejection(env, envelope("updateStock", {"productId": pid, "quantityChange": -1}))
    eq((d["code"], d["details"]), ("INSUFFICIENT_STOCK", {"available": 0, "requested": 1}), "insufficient")
    d = rejection(env, envelope("updateStock", {"productId": new_id(), "quantityChange": 1}))
    eq(d["code"], "NOT_FOUND", "unknown product")
    d = rejection(env, envelope("updateStock", {"productId": pid, "quantityChange": 0}))
    eq((d["code"], list(d["fields"])), ("VALIDATION_FAILED", ["quantityChange"]), "zero change")
    d = rejection(env, envelope("updateStock", {"productId": "p1", "quantityChange": 1000000001}))
    eq(set(d["fields"]), {"productId", "quantityChange"}, "both fields named")
    eq(query("SELECT stock FROM products WHERE id = %s", pid)[0][0], 0, "final stock")


@scenario()
def test_nul_character_is_rejected(env):
    cmd = envelope("createProduct", {"name": "bad\u0000name", "price": 1})
    d = rejection(env, cmd)
    eq(d["code"], "VALIDATION_FAILED", "a NUL in a string")


@scenario()
def test_envelope_rules_reject(env):
    cmd = envelope("createProduct", {"name": "ok", "price": 1}, correlation_id="c" * 201)
    ev = env.run(cmd)[0]
    eq((ev["type"], ev["data"]["code"]), ("command.rejected", "VALIDATION_FAILED"), "rejected")
    eq(list(ev["data"]["fields"]), ["correlationId"], "over-long correlationId named")
    eq(ev["correlationId"], None, "an invalid correlationId is not copied")
    cmd = envelope("createProduct", {"name": "ok", "price": 1}) | {"createdAt": "yesterday"}
    ev = env.run(cmd)[0]
    eq(list(ev["data"]["fields"]), ["createdAt"], "bad createdAt named")


@scenario()
def test_duplicate_id_is_noop(env):
    pid = create_product(env, stock=50)
    cmd = envelope("updateStock", {"productId": pid, "quantityChange": -5})
    env.run(cmd)
    for _ in range(3):
        env.pub.command(cmd)
    marker = envelope("updateStock", {"productId": pid, "quantityChange": -1})
    env.run(marker)  # processed after the duplicates (one worker per queue, FIFO)
    env.ev.poll(0.5)
    eq(len(env.ev.for_command(cmd["id"])), 1, "events for a command sent four times")
    eq(query("SELECT stock FROM products WHERE id = %s", pid)[0][0], 44, "applied once")
    eq(outcome(cmd["id"]), "applied", "one processed_commands row")
    eq(query("SELECT count(*) FROM outbox WHERE payload->>'commandId' = %s", cmd["id"])[0][0], 1, "one outbox row")


@scenario(workers={"catalog": 4})
def test_concurrent_update_stock(env):
    """4 workers, 400 x updateStock -1 on one product with stock 300."""
    pid = create_product(env, stock=300)
    cmds = [envelope("updateStock", {"productId": pid, "quantityChange": -1}) for _ in range(400)]
    for c in cmds:
        env.pub.command(c)
    ids = {c["id"] for c in cmds}

    def done(s):
        return len({e["commandId"] for e in s.events if e["commandId"] in ids}) == 400
    env.ev.wait(done, timeout=60, what="400 results")
    time.sleep(0.5)
    env.ev.poll()
    mine = [e for e in env.ev.events if e["commandId"] in ids]
    kinds = Counter(e["type"] if e["type"] != "command.rejected" else e["data"]["code"] for e in mine)
    eq(kinds["stock.updated"], 300, "stock.updated")
    eq(kinds["INSUFFICIENT_STOCK"], 100, "INSUFFICIENT_STOCK")
    eq(kinds["stock.depleted"], 1, "stock.depleted")
    eq(kinds["stock.low"], 1, "stock.low")
    eq(sum(kinds.values()), 402, "no other events")
    eq(query("SELECT stock FROM products WHERE id = %s", pid)[0][0], 0, "final stock")
    seen = sorted(e["data"]["stock"] for e in mine if e["type"] == "stock.updated")
    eq(seen, list(range(300)), "every stock level from 299 to 0 exactly once")


@scenario()
def test_events_follow_commit_within_a_second(env):
    pid = create_product(env, stock=1000)
    worst = 0.0
    for _ in range(20):
        cmd = envelope("updateStock", {"productId": pid, "quantityChange": -1})
        ev = env.run(cmd)[0]
        committed = query("SELECT extract(epoch FROM processed_at)::float8 FROM processed_commands WHERE id = %s",
                          cmd["id"])[0][0]
        worst = max(worst, env.ev.arrived[ev["id"]] - committed)
        time.sleep(0.05)
    print(f"worst commit-to-event delay: {worst * 1000:.1f} ms")
    check(worst < 1.0, f"events arrive within a second of their commit (worst {worst:.3f} s)")
