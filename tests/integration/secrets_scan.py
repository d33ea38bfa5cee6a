"""No secret leaves the process: after the whole suite, every log line, tool
output and table row it produced is searched for the passwords it published and
the password hashes in the database.

CTest runs `setup` before every integration test (it empties the log folder and
notes where PostgreSQL's server log stands) and `scan` after all of them
(tests/CMakeLists.txt: the fixture conveyor_suite). Searched: the pool logs and
tool outputs the harness kept (harness.LOG_DIR), PostgreSQL's server log since
setup, every column of every table but users.password_hash, the Redis event
stream's entries since setup and the reason and error of every Redis dead letter, and the headers of
every RabbitMQ dead letter. Not searched: a dead letter's message itself, which
is what the producer sent, kept untouched so that a retry can send it again.
"""
import glob
import json
import os
import re
import sys

import pika
import redis as redislib

from harness import AMQP_URL, LEDGER, LOG_DIR, REDIS_URL, ROOT, ROUTING, Failure, db

OFFSETS = os.path.join(LOG_DIR, "secrets.offsets")
HASH_MARK = re.compile(r"\$argon2(?:id|i|d)\$")
HASH_TAIL = re.compile(r"[A-Za-z0-9+/]{16,}\$[A-Za-z0-9+/]{32,}")  # an argon2 string's salt$hash
PASSWORD_LITERAL = re.compile(r'"(?:password|currentPassword|newPassword)"\s*:\s*"([^"\\]{8,128})"')


def pg_server_log():
    state = os.environ.get("CONVEYOR_STATE_DIR") or os.path.join(ROOT, ".state")
    return os.path.join(os.path.realpath(state), "pg", "server.log")


def setup():
    os.makedirs(LOG_DIR, exist_ok=True)
    for f in glob.glob(os.path.join(LOG_DIR, "*")):
        os.unlink(f)
    log = pg_server_log()
    if not os.path.exists(log):
        raise Failure(f"no PostgreSQL server log at {log} (scripts/servers.sh starts it with one)")
    # the event stream's last entry now: the scan reads only what the suite adds after it
    last = redislib.Redis.from_url(REDIS_URL).xrevrange("conveyor:events", count=1)
    with open(OFFSETS, "w") as f:
        json.dump({"pg_log": os.path.getsize(log), "stream_after": last[0][0].decode() if last else "0-0"}, f)


def passwords():
    """The passwords the suite published: its ledger, and every password literal
    in the tests, the poison corpus and the examples (published by other tools)."""
    found = set()
    if os.path.exists(LEDGER):
        with open(LEDGER) as f:
            found |= {json.loads(line) for line in f if line.strip()}
    sources = glob.glob(os.path.join(ROOT, "tests", "integration", "*.py")) + \
        glob.glob(os.path.join(ROOT, "tests", "poison", "*.jsonl")) + \
        glob.glob(os.path.join(ROOT, "examples", "*", "*.*"))
    for path in sources:
        with open(path, errors="replace") as f:
            text = f.read().replace('\\"', '"')
        found |= set(PASSWORD_LITERAL.findall(text))
    return {p for p in found if len(p) >= 8 and not p.startswith("$")}


def texts(conn):
    """(where, text) of everything the suite produced."""
    for path in sorted(glob.glob(os.path.join(LOG_DIR, "*"))):
        if os.path.basename(path).startswith("secrets.") or not os.path.isfile(path):
            continue
        with open(path, errors="replace") as f:
            yield path, f.read()
    with open(OFFSETS) as f:
        offsets = json.load(f)
    with open(pg_server_log(), errors="replace") as f:
        f.seek(offsets["pg_log"])
        yield "PostgreSQL server log", f.read()
    with conn.cursor() as cur:
        cur.execute("SELECT table_name, array_agg(quote_ident(column_name::text) ORDER BY ordinal_position) "
                    "FROM information_schema.columns WHERE table_schema = current_schema() "
                    "AND NOT (table_name = 'users' AND column_name = 'password_hash') GROUP BY table_name")
        for table, cols in cur.fetchall():
            cur.execute(f"SELECT concat_ws(' ', {', '.join(c + '::text' for c in cols)}) FROM {table}")
            yield f"table {table}", "\n".join(r[0] for r in cur.fetchall())
    r = redislib.Redis.from_url(REDIS_URL)
    after, rows = offsets.get("stream_after", "0-0"), []
    while True:  # the entries added since setup, in pages (the stream keeps up to a million)
        page = r.xrange("conveyor:events", min="(" + after, count=10000)
        if not page:
            break
        rows.extend(str(fields) for _, fields in page)
        after = page[-1][0].decode()
    yield "Redis stream conveyor:events (since setup)", "\n".join(rows)
    for key in r.scan_iter("conveyor:dead:*"):
        rows = []
        for raw in r.lrange(key, 0, -1):
            d = json.loads(raw)
            rows.append(f"{d.get('reason')} {d.get('error')}")
        yield f"Redis {key.decode()} (reason, error)", "\n".join(rows)
    conn_amqp = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    ch = conn_amqp.channel()
    for q in ROUTING:
        headers = []
        while True:  # read without acking: closing the channel puts them back
            method, props, _ = ch.basic_get(f"conveyor.{q}.dead", auto_ack=False)
            if method is None:
                break
            headers.append(str(props.headers))
        yield f"RabbitMQ conveyor.{q}.dead headers", "\n".join(headers)
    conn_amqp.close()


def scan():
    conn = db()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT password_hash FROM users")
            hashes = {h.rsplit("$", 2)[-2] + "$" + h.rsplit("$", 2)[-1] for (h,) in cur.fetchall()
                      if h.count("$") >= 2}
        secrets = passwords()
        if not secrets:
            raise Failure("no password found to look for: the ledger and the test sources hold none")
        words = re.compile("|".join(re.escape(p) for p in sorted(secrets, key=len, reverse=True)))
        problems, searched = [], 0
        for where, text in texts(conn):
            searched += len(text)
            for m in words.finditer(text):
                problems.append(f"{where}: a password ({m.group()[:2]}…): …{text[max(0, m.start() - 80):m.start()]}")
            for m in HASH_MARK.finditer(text):
                problems.append(f"{where}: a password hash: …{text[max(0, m.start() - 80):m.start() + 20]}")
            for m in HASH_TAIL.finditer(text):
                if m.group() in hashes:
                    problems.append(f"{where}: the salt and hash of a user: …{text[max(0, m.start() - 80):m.start()]}")
        if problems:
            raise Failure(f"{len(problems)} secrets found:\n" + "\n".join(problems[:40]))
        print(f"secrets scan: {len(secrets)} passwords and {len(hashes)} hashes, none in "
              f"{searched / 1e6:.1f} MB of logs, tool output and rows")
    finally:
        conn.close()


if __name__ == "__main__":
    {"setup": setup, "scan": scan}[sys.argv[1]]()
