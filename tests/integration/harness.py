"""Integration-test harness: real PostgreSQL, Redis and RabbitMQ, the real binaries.

Publishes and subscribes the way another system would (pika, redis-py), written
from docs/contract.md alone; reads the database with psycopg2. A missing server is a
failure, never a skip.
"""
import base64
import calendar
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import uuid

import pika
import psycopg2
import redis as redislib

import contract

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("CONVEYOR_BIN_DIR", os.path.join(ROOT, "build"))
TRANSPORT = os.environ.get("CONVEYOR_TRANSPORT", "rabbitmq")
DB_URL = os.environ.get("CONVEYOR_DATABASE_URL", "postgresql://conveyor@127.0.0.1:55432/conveyor")
AMQP_URL = os.environ.get("CONVEYOR_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:55672")
REDIS_URL = os.environ.get("CONVEYOR_REDIS_URL", "redis://127.0.0.1:56379/0")

# Every pool log and tool output of the suite goes here, and every password the
# tests publish is noted in its ledger, so that secrets_scan.py can look for
# them in everything the suite produced (CTest sets it; a bare run uses /tmp).
LOG_DIR = os.environ.get("CONVEYOR_TEST_LOG_DIR") or tempfile.gettempdir()
LEDGER = os.path.join(LOG_DIR, "secrets.ledger")
SECRET_KEY = ("password", "currentPassword", "newPassword")


def note_secrets(body):
    """Adds the passwords in a command (a dict, or JSON bytes/str) to the ledger."""
    try:
        env = json.loads(body) if isinstance(body, (bytes, str)) else body
    except (ValueError, UnicodeDecodeError, RecursionError):  # not a command: nothing to note
        return
    p = env.get("payload") if isinstance(env, dict) else None
    if not isinstance(p, dict):
        return
    found = [p[k] for k in SECRET_KEY if isinstance(p.get(k), str) and len(p[k]) >= 8]
    if found:
        with open(LEDGER, "a") as f:
            for v in found:
                f.write(json.dumps(v) + "\n")


def log_file(prefix):
    """A new file in LOG_DIR for a process's output (kept for secrets_scan.py)."""
    os.makedirs(LOG_DIR, exist_ok=True)
    return tempfile.NamedTemporaryFile(prefix=prefix, suffix=".log", dir=LOG_DIR, delete=False)


ROUTING = {
    "users": ["register", "changePassword"],
    "catalog": ["createProduct", "updateProduct", "updateStock", "deleteProduct"],
    "orders": ["placeOrder", "cancelOrder"],
}
QUEUE_OF = {t: q for q, ts in ROUTING.items() for t in ts}


class Failure(AssertionError):
    pass


def check(cond, msg):
    if not cond:
        raise Failure(msg)


def eq(got, want, what):
    if got != want:
        raise Failure(f"{what}: got {got!r}, want {want!r}")


def new_id():
    return str(uuid.uuid4())


def now_iso():
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % (int(t * 1000) % 1000)


def envelope(type_, payload, id_=None, correlation_id=None):
    e = {"id": id_ or new_id(), "type": type_, "payload": payload, "createdAt": now_iso()}
    if correlation_id is not None:
        e["correlationId"] = correlation_id
    return e


# ---- configuration ---------------------------------------------------------

def write_config(workers=None, extra="", queue_opts="", routing=None):
    """A queues.conf like the repository's, with per-queue worker counts (and
    routing: {queue: [types]}, ROUTING by default)."""
    workers = workers or {}
    lines = ['prefix = "conveyor";', 'transport = "rabbitmq";', extra, "queues = ("]
    qs = []
    for q, types in (routing or ROUTING).items():
        cmds = ", ".join(f'"{t}"' for t in types)
        qs.append(f'  {{ name = "{q}"; commands = [{cmds}]; workers = {workers.get(q, 1)}; prefetch = 8; {queue_opts} }}')
    lines.append(",\n".join(qs))
    lines.append(");")
    fd, path = tempfile.mkstemp(prefix="conveyor-test-", suffix=".conf")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


# ---- the pool ----------------------------------------------------------------

def session_pids(sid):
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            if os.getsid(int(p)) == sid:
                pids.append(int(p))
        except OSError:
            pass
    return pids


class Pool:
    """conveyor-workers in its own session, logging to a file."""

    def __init__(self, workers=None, extra="", env=None, expect_restarts=False, queue_opts="", routing=None,
                 wrap=()):
        """wrap: a command the pool runs under, e.g. (hosts.sh, "exec", "cvh4"): on a test host."""
        self.expect_restarts = expect_restarts
        self.config = write_config(workers, extra, queue_opts, routing)
        self.log = log_file("conveyor-pool-")
        e = dict(os.environ)
        e.update(env or {})
        self.proc = subprocess.Popen([*wrap, os.path.join(BIN, "conveyor-workers"), "-c", self.config],
                                     stdout=self.log, stderr=self.log, env=e, start_new_session=True)
        self.wait_ready()

    def wait_ready(self, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            text = self.read_log()
            if "relay active" in text or "another relay is active; standing by" in text:
                n = sum(1 for line in text.splitlines() if "consuming queue" in line)
                want = sum(1 for line in open(self.config) if "workers =" in line and "workers = 0;" not in line)
                if n >= want:
                    return
            if self.proc.poll() is not None:
                raise Failure(f"conveyor-workers exited {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        raise Failure("conveyor-workers did not become ready:\n" + self.read_log())

    def read_log(self):
        with open(self.log.name) as f:
            return f.read()

    def stop(self, timeout=40):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise Failure("conveyor-workers did not exit within %ds of SIGTERM" % timeout)
        left = session_pids(self.proc.pid)
        os.unlink(self.config)
        self.check_log()
        return rc, left

    def check_log(self):
        """No sanitizer report, no row the relay found below its claim floor (a hole in the floor's
        argument: docs/decisions.md, "No belt"), and no crashed child unless the test caused it."""
        text = self.read_log()
        check("below its claim floor" not in text, f"the relay found rows below its claim floor:\n{text[-4000:]}")
        for marker in ("AddressSanitizer", "LeakSanitizer", "runtime error:", "UndefinedBehaviorSanitizer"):
            check(marker not in text, f"sanitizer report in the pool log:\n{text[-4000:]}")
        if not self.expect_restarts:
            check("died of signal" not in text and "exited with status" not in text,
                  f"a child of the pool crashed:\n{text[-4000:]}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.stop()
        elif os.path.exists(self.config):
            os.unlink(self.config)


def free_port():
    """A local TCP port nothing listens on now."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def http_pool(token=None, extra="", **kw):
    """A Pool with its HTTP listener on a free loopback port (pool.port,
    pool.origin), the dashboard's action token when given, and extra
    configuration lines."""
    port = free_port()
    lines = f'listen = "127.0.0.1:{port}";' + (f' token = "{token}";' if token else "")
    pool = Pool(extra=f"http: {{ {lines} }};\n{extra}", **kw)
    pool.port = port
    pool.origin = f"http://127.0.0.1:{port}"
    return pool


_setup_done = False


def setup():
    """Migrations and the RabbitMQ topology, as a deploy would make them before any pool runs."""
    global _setup_done
    if not _setup_done:
        r = subprocess.run([os.path.join(BIN, "conveyor-workers"), "-c", os.path.join(ROOT, "queues.conf"), "--setup"],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise Failure(f"conveyor-workers --setup failed: {r.stderr}")
        _setup_done = True


# ---- publishing -----------------------------------------------------------------

# Every command the tests publish with Publisher.command, by id: (envelope, its
# contract errors, [] when it keeps schemas/). Events._add holds each
# command's result to them: a command that breaks the schema must end in
# VALIDATION_FAILED, and one the worker rejects as VALIDATION_FAILED must break
# the schema or a rule of schema_cannot_state (so the schemas are neither looser nor stricter than the workers).
PUBLISHED = {}


def schema_cannot_state(env):
    """The rules the workers apply that JSON Schema cannot state (each is written
    in the schema's "description"): a password's limit counts UTF-8 bytes where
    maxLength counts characters; a name's length counts after trimming; an
    order names each product once; a price given as a number has at most two
    decimals (binary floating point defeats multipleOf); a createdAt or notBefore
    names a day its month has. True when env breaks one of them."""
    for k in ("createdAt", "notBefore"):  # a day its month does not have (2026-02-31): the pattern allows 01-31
        m = re.match(r"^(\d{4})-(\d\d)-(\d\d)T", env.get(k) or "") if isinstance(env, dict) and \
            isinstance(env.get(k), str) else None
        if m and 1 <= int(m.group(2)) <= 12 and int(m.group(3)) > calendar.monthrange(int(m.group(1)),
                                                                                      int(m.group(2)))[1]:
            return True
    p = env.get("payload") if isinstance(env, dict) else None
    if not isinstance(p, dict):
        return False
    for k in ("password", "currentPassword", "newPassword"):
        if isinstance(p.get(k), str) and len(p[k].encode()) != len(p[k]):
            return True
    for k in ("name",):
        if isinstance(p.get(k), str) and p[k] != p[k].strip():
            return True
    price = p.get("price")
    if isinstance(price, (int, float)) and not isinstance(price, bool) and abs(round(price, 2) - price) > 1e-9:
        return True
    items = p.get("items")
    if isinstance(items, list):
        ids = [i.get("productId") for i in items if isinstance(i, dict)]
        if len(ids) != len(set(map(str, ids))):
            return True
    return False


class Publisher:
    def __init__(self, transport=TRANSPORT):
        self.transport = transport
        if transport == "rabbitmq":
            self.conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
            self.ch = self.conn.channel()
            self.ch.confirm_delivery()
        else:
            self.r = redislib.Redis.from_url(REDIS_URL)

    def command(self, env):
        """Publishes an envelope dict, routed by its type, and notes whether it keeps
        the contract (PUBLISHED)."""
        if isinstance(env.get("id"), str):
            PUBLISHED[env["id"]] = (env, contract.command_errors(env))
        note_secrets(env)
        body = json.dumps(env).encode()
        if self.transport == "rabbitmq":
            self.ch.basic_publish("conveyor.commands", env["type"], body,
                                  pika.BasicProperties(delivery_mode=2, content_type="application/json",
                                                       message_id=env.get("id")), mandatory=True)
        else:
            self.r.lpush(f"conveyor:queue:{QUEUE_OF[env['type']]}", body)
        return env

    def raw(self, queue, body, message_id=None):
        """Publishes bytes straight to a queue (default exchange / the list)."""
        note_secrets(body)
        if self.transport == "rabbitmq":
            props = pika.BasicProperties(delivery_mode=2, message_id=message_id)
            self.ch.basic_publish("", f"conveyor.{queue}", body, props, mandatory=True)
        else:
            self.r.lpush(f"conveyor:queue:{queue}", body)

    def close(self):
        if self.transport == "rabbitmq":
            self.conn.close()


# ---- subscribing ------------------------------------------------------------------

class Events:
    """Every event published from now on, from the events transport."""

    def __init__(self, transport=TRANSPORT, url=None):
        self.transport = transport
        self.events = []
        self.arrived = {}  # event id -> arrival time
        if transport == "rabbitmq":
            self.conn = pika.BlockingConnection(pika.URLParameters(url or AMQP_URL))
            self.ch = self.conn.channel()
            self.ch.exchange_declare("conveyor.events", "topic", durable=True)
            q = self.ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
            self.ch.queue_bind(q, "conveyor.events", "#")
            self.queue = q
        else:
            self.r = redislib.Redis.from_url(url or REDIS_URL)
            last = self.r.xrevrange("conveyor:events", count=1)
            self.last = last[0][0] if last else b"0-0"

    def poll(self, timeout=0.2):
        if self.transport == "rabbitmq":
            deadline = time.time() + timeout
            while True:
                method, props, body = self.ch.basic_get(self.queue, auto_ack=True)
                if method is None:
                    if time.time() >= deadline:
                        return
                    self.conn.sleep(0.02)
                    continue
                ev = json.loads(body)
                check(props.message_id == ev["id"], "AMQP message_id is the event id")
                check(props.type == ev["type"], "AMQP type is the event type")
                check(props.content_type == "application/json", "content_type application/json")
                check(props.delivery_mode == 2, "events are persistent")
                check(method.routing_key == ev["type"], "routing key is the event type")
                self._add(ev)
        else:
            # block=0 would wait for ever: timeout 0 takes only what is there
            res = self.r.xread({"conveyor:events": self.last}, count=1000,
                               block=int(timeout * 1000) if timeout > 0 else None)
            for _, entries in res:
                for eid, fields in entries:
                    self.last = eid
                    ev = json.loads(fields[b"event"])
                    check(fields[b"type"].decode() == ev["type"], "stream field type is the event type")
                    self._add(ev)

    def _add(self, ev):
        errs = contract.event_errors(ev)
        check(not errs, f"event breaks the contract: {errs}: {json.dumps(ev)}")
        cmd, cmd_errs = PUBLISHED.get(ev.get("commandId"), (None, None))
        if cmd_errs:
            check(ev["type"] == "command.rejected" and ev["data"].get("code") == "VALIDATION_FAILED",
                  f"a command that breaks the schema ({cmd_errs}) must be rejected as VALIDATION_FAILED: {json.dumps(ev)}")
        elif cmd is not None and ev["type"] == "command.rejected" and ev["data"].get("code") == "VALIDATION_FAILED":
            check(schema_cannot_state(cmd),
                  f"the workers reject a command the schemas accept: {json.dumps(cmd)} -> {json.dumps(ev['data'])}")
        self.events.append(ev)
        self.arrived[ev["id"]] = time.time()

    def for_command(self, cid):
        return [e for e in self.events if e["commandId"] == cid]

    def wait(self, pred, timeout=15, what="events"):
        deadline = time.time() + timeout
        while True:
            self.poll(timeout=0)  # what has arrived, without waiting
            if pred(self):
                return
            if time.time() > deadline:
                raise Failure(f"timed out waiting for {what}; have {len(self.events)} events")
            self.poll()

    def wait_result(self, cid, timeout=15, count=1):
        self.wait(lambda s: len(s.for_command(cid)) >= count, timeout, f"the events of command {cid}")
        return self.for_command(cid)

    def close(self):
        if self.transport == "rabbitmq":
            self.conn.close()


# ---- dead letters and the database ---------------------------------------------------

def drain_dead(queue, transport=TRANSPORT):
    """Removes and returns the dead letters of queue as dicts:
    {reason, error, attempts, failedAt, body(bytes)}."""
    out = []
    if transport == "rabbitmq":
        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        ch = conn.channel()
        while True:
            method, props, body = ch.basic_get(f"conveyor.{queue}.dead", auto_ack=True)
            if method is None:
                break
            h = props.headers or {}
            out.append({"reason": h.get("x-conveyor-reason"), "error": h.get("x-conveyor-error"),
                        "attempts": h.get("x-conveyor-attempts"), "failedAt": h.get("x-conveyor-failed-at"),
                        "body": body})
        conn.close()
    else:
        r = redislib.Redis.from_url(REDIS_URL)
        while True:
            raw = r.rpop(f"conveyor:dead:{queue}")
            if raw is None:
                break
            d = json.loads(raw)
            d["body"] = d["message"].encode() if "message" in d else base64.b64decode(d["messageBase64"])
            check(d.get("queue") == queue, "the dead letter names its queue")
            out.append(d)
    return out


def unsettled(queue, transport=TRANSPORT):
    """Messages of queue that the broker would hand out (again) if every consumer
    died now: RabbitMQ's ready count once it has no consumers (it waits up to
    10 s for them to go); Redis: the queue and every worker's in-flight list."""
    if transport == "rabbitmq":
        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        deadline = time.time() + 10
        while True:
            m = conn.channel().queue_declare(f"conveyor.{queue}", passive=True).method
            if m.consumer_count == 0 or time.time() > deadline:
                break
            time.sleep(0.1)
        conn.close()
        check(m.consumer_count == 0, f"conveyor.{queue} still has {m.consumer_count} consumers")
        return m.message_count
    r = redislib.Redis.from_url(REDIS_URL)
    return r.llen(f"conveyor:queue:{queue}") + sum(r.llen(k) for k in r.scan_iter(f"conveyor:inflight:{queue}:*"))


def db():
    c = psycopg2.connect(DB_URL)
    c.autocommit = True
    return c


def query(sql, *args):
    c = db()
    try:
        with c.cursor() as cur:
            cur.execute(sql, args or None)
            return cur.fetchall() if cur.description else None
    finally:
        c.close()


def run_bin(name, *args, env=None, input_=None, timeout=60):
    """Runs one of the binaries; its output is returned, and kept in LOG_DIR."""
    e = dict(os.environ)
    e.update(env or {})
    if input_:
        for line in (input_ if isinstance(input_, str) else input_.decode(errors="replace")).splitlines():
            note_secrets(line)
    r = subprocess.run([os.path.join(BIN, name), *args], input=input_, capture_output=True, text=True,
                       env=e, timeout=timeout, cwd=ROOT)
    with log_file(f"{name}-") as f:
        # its output only: the arguments are the test's own input (a payload with a password)
        f.write(f"$ {name}\n{r.stdout}\n{r.stderr}".encode(errors="replace"))
    return r


def rabbitmqctl(*args, timeout=120):
    """rabbitmqctl against this server set's RabbitMQ node (scripts/servers.sh
    rabbit-env); raises when it fails."""
    env = dict(os.environ)
    for line in subprocess.run([os.path.join(ROOT, "scripts", "servers.sh"), "rabbit-env"], capture_output=True,
                               text=True, check=True).stdout.splitlines():
        k, _, v = line.partition("=")
        env[k] = v
    return subprocess.run(["rabbitmqctl", "-q", "-n", env["RABBITMQ_NODENAME"], *args], env=env, check=True,
                          capture_output=True, timeout=timeout)
