"""conveyor-produce, conveyor-subscribe, and migrations under two pools at once."""
import json
import os
import subprocess
import time

import pika
import redis as redislib

from harness import (AMQP_URL, BIN, DB_URL, REDIS_URL, ROOT, TRANSPORT, Events, Pool, check, drain_dead, eq, new_id,
                     query, rabbitmqctl, run_bin)


def produce(*args, input_=None, env=None):
    return run_bin("conveyor-produce", "-c", os.path.join(ROOT, "queues.conf"), *args, input_=input_, env=env)


def test_produce_wait_success_and_rejection():
    with Pool() as pool:
        r = produce("--wait", "--timeout", "20", "--correlation-id", "cli-1", "createProduct",
                    '{"name":"From the CLI","price":"2.50","stock":3}')
        eq(r.returncode, 0, f"exit status (stderr: {r.stderr})")
        lines = r.stdout.strip().splitlines()
        eq(len(lines), 2, "the id, then the result event")
        ev = json.loads(lines[1])
        eq((ev["type"], ev["commandId"], ev["correlationId"]), ("product.created", lines[0], "cli-1"), "result")
        pid = ev["data"]["productId"]
        r = produce("--wait", "--timeout", "20", "updateStock", json.dumps({"productId": pid, "quantityChange": -5}))
        eq(r.returncode, 1, "rejected command exits 1")
        ev = json.loads(r.stdout.strip().splitlines()[1])
        eq((ev["type"], ev["data"]["code"]), ("command.rejected", "INSUFFICIENT_STOCK"), "rejection printed")
        eq(pool.stop(), (0, []), "clean stop")


def test_produce_stdin_many():
    with Pool() as pool:
        lines = [json.dumps({"type": "createProduct", "payload": {"name": f"p{i}", "price": i}}) for i in range(5)]
        own = new_id()
        lines.append(json.dumps({"id": own, "type": "createProduct", "payload": {"name": "own id", "price": 1},
                                 "correlationId": "batch"}))
        r = produce("--wait", "--timeout", "20", input_="\n".join(lines) + "\n")
        eq(r.returncode, 0, f"exit status (stderr: {r.stderr})")
        out = r.stdout.strip().splitlines()
        ids, events = out[:6], [json.loads(x) for x in out[6:]]
        eq(ids[5], own, "a given id is kept")
        eq([e["commandId"] for e in events], ids, "one result per command, in order")
        check(all(e["type"] == "product.created" for e in events), "all created")
        eq(pool.stop(), (0, []), "clean stop")


def test_produce_refuses_bad_input_clearly():
    r = produce("createProduct", "not json")
    eq(r.returncode, 5, "invalid payload exit status")
    check("not a JSON object" in r.stderr, f"message names the problem: {r.stderr}")
    r = produce("launchRocket", "{}")
    eq(r.returncode, 5, "unrouted type exit status")
    check("no queue" in r.stderr and "launchRocket" in r.stderr, f"message names the type: {r.stderr}")
    r = produce("--correlation-id", "x" * 201, "createProduct", "{}")
    eq(r.returncode, 5, "bad envelope exit status")
    r = produce("onlyone")
    eq(r.returncode, 2, "usage exit status")
    r = produce(input_='{"type":"createProduct","payload":{"name":"ok","price":1}}\nnot json\n')
    eq(r.returncode, 5, "a bad stdin line makes the exit non-zero")
    check("line 2" in r.stderr, f"the bad line is named: {r.stderr}")
    eq(len(r.stdout.strip().splitlines()), 1, "the good line was still sent")
    r = produce("createProduct", '{"name":"x","price":1}',
                env={"CONVEYOR_RABBITMQ_URL": "amqp://guest:guest@127.0.0.1:1/", "CONVEYOR_REDIS_URL": "redis://127.0.0.1:1/0"})
    eq(r.returncode, 3, f"unreachable broker exit status ({r.stderr})")
    check("127.0.0.1:1" in r.stderr, f"message names the broker: {r.stderr}")
    r = run_bin("conveyor-produce", "-c", "/nonexistent.conf", "createProduct", "{}")
    eq(r.returncode, 2, "missing config exit status")
    check("/nonexistent.conf" in r.stderr, "message names the file")
    for b in ("conveyor-produce", "conveyor-workers", "conveyor-subscribe"):
        r = run_bin(b, "--help")
        eq(r.returncode, 0, f"{b} --help")
        check("usage:" in r.stdout, f"{b} --help prints usage")


def test_subscribe_filters_by_pattern():
    with Pool() as pool:
        sub = subprocess.Popen([os.path.join(BIN, "conveyor-subscribe"), "-c", os.path.join(ROOT, "queues.conf"),
                                "-n", "2", "--timeout", "30", "stock.*"], stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)  # subscribed
        r = produce("--wait", "createProduct", '{"name":"sub","price":1,"stock":11}')
        pid = json.loads(r.stdout.splitlines()[1])["data"]["productId"]
        produce("updateStock", json.dumps({"productId": pid, "quantityChange": -1}))
        out, _ = sub.communicate(timeout=30)
        eq(sub.returncode, 0, "exit after 2 events")
        evs = [json.loads(x) for x in out.strip().splitlines()]
        eq([e["type"] for e in evs], ["stock.updated", "stock.low"], "only stock.* events, in order")
        eq(pool.stop(), (0, []), "clean stop")


def test_migrations_once_under_two_pools():
    name = "conveyor_mig_" + new_id()[:8]
    query(f"CREATE DATABASE {name}")
    try:
        url = DB_URL.rsplit("/", 1)[0] + "/" + name
        pools = [subprocess.Popen([os.path.join(BIN, "conveyor-workers"), "-c", os.path.join(ROOT, "queues.conf")],
                                  env=dict(os.environ, CONVEYOR_DATABASE_URL=url), stderr=subprocess.PIPE,
                                  text=True, start_new_session=True) for _ in range(2)]
        # both pools up past the migrations (one applies them, the other waits), then a moment
        # for the relays: one takes the lock and says so (3 s flat was short on a busy machine)
        files = sorted(f for f in os.listdir(os.path.join(ROOT, "sql")) if f.endswith(".sql"))
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                import psycopg2
                c = psycopg2.connect(url)
                try:
                    cur = c.cursor()
                    cur.execute("SELECT count(*) FROM schema_migrations")
                    if cur.fetchone()[0] >= len(files):
                        break
                finally:
                    c.close()
            except Exception:  # the table is not there yet
                pass
            time.sleep(0.2)
        time.sleep(2)
        for p in pools:
            p.terminate()
        logs = [p.communicate(timeout=40)[1] for p in pools]
        eq([p.returncode for p in pools], [0, 0], "both pools ran and stopped cleanly")
        check(not any("Sanitizer" in log or "runtime error:" in log for log in logs), "no sanitizer report")
        files = sorted(f for f in os.listdir(os.path.join(ROOT, "sql")) if f.endswith(".sql"))
        for f in files:
            eq(sum(log.count(f"applied migration {f}") for log in logs), 1, f"{f} applied by exactly one pool")
        import psycopg2
        c = psycopg2.connect(url)
        cur = c.cursor()
        cur.execute("SELECT version FROM schema_migrations")
        eq(sorted(r[0] for r in cur.fetchall()), files, "schema_migrations")
        c.close()
        check(sum("relay active" in log for log in logs) == 1, "one relay active, the other standing by")
    finally:
        time.sleep(0.5)
        query(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_shell_clients_publish():
    """The README's hand-publishing examples: amqp-publish and redis-cli."""
    from harness import TRANSPORT, AMQP_URL, REDIS_URL
    with Pool() as pool:
        ev = Events()
        cid = new_id()
        body = json.dumps({"id": cid, "type": "createProduct", "payload": {"name": "Shell", "price": "3.50"}})
        if TRANSPORT == "rabbitmq":
            r = subprocess.run(["amqp-publish", f"--url={AMQP_URL}", "-e", "conveyor.commands", "-r", "createProduct",
                                "-p", "-b", body], capture_output=True, text=True, timeout=30)
        else:
            # the port of the servers in use (a second set of servers has its own), 56379 in the README
            port = REDIS_URL.rsplit(":", 1)[1].split("/")[0]
            r = subprocess.run(["redis-cli", "-p", port, "LPUSH", "conveyor:queue:catalog", body],
                               capture_output=True, text=True, timeout=30)
        eq(r.returncode, 0, f"shell client exit status ({r.stderr})")
        res = ev.wait_result(cid)
        eq((res[0]["type"], res[0]["data"]["price"]), ("product.created", "3.50"), "result event")
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")


def admin(*args, env=None):
    return run_bin("conveyor-admin", *args, env=env)


def test_options_come_before_or_after_the_subcommand():
    """Every option of every tool may follow the subcommand and its arguments, as
    a CLI user expects: `conveyor-admin stats --json` is `--json stats`."""
    conf = os.path.join(ROOT, "queues.conf")
    subprocess.run([os.path.join(BIN, "conveyor-workers"), "-c", conf, "--setup"], capture_output=True, timeout=120,
                   cwd=ROOT, check=True)
    for before, after in ((("--json", "stats"), ("stats", "--json")),
                          (("--json", "stats", "catalog"), ("stats", "catalog", "--json")),
                          (("-c", conf, "--json", "dead", "counts"), ("dead", "counts", "--json", "-c", conf)),
                          (("--json", "dead", "list", "catalog"), ("dead", "list", "catalog", "--json")),
                          (("--config", conf, "dead", "list"), ("dead", "list", f"--config={conf}"))):
        a, b = admin(*before), admin(*after)
        eq(b.returncode, 0, f"conveyor-admin {' '.join(after)} (stderr: {b.stderr})")
        eq(a.returncode, 0, f"conveyor-admin {' '.join(before)} (stderr: {a.stderr})")
        if "--json" in after:
            rows = [json.loads(x) for x in b.stdout.splitlines()]
            eq([sorted(r) for r in rows], [sorted(r) for r in map(json.loads, a.stdout.splitlines())],
               f"{' '.join(after)} prints what {' '.join(before)} prints")
            check(rows or "dead" in after, f"{' '.join(after)}: JSON lines")
        else:
            eq(b.stdout.splitlines()[0], a.stdout.splitlines()[0], "the same table")
    # --all anywhere is the selector; an option after -- is a word (a NOTE)
    for args in (("dead", "purge", "orders", "--all"), ("--all", "dead", "purge", "orders"),
                 ("dead", "purge", "--all", "orders")):
        r = admin(*args)
        check(r.returncode in (0, 1) and "purged" in r.stdout, f"conveyor-admin {' '.join(args)}: {r.stderr}")
    r = admin("queue", "pause", "orders", "--", "--not-an-option")
    eq(r.returncode, 0, f"a NOTE after -- (stderr: {r.stderr})")
    r = admin("stats", "orders", "--json")
    row = json.loads(r.stdout.splitlines()[0])
    eq((row["paused"], row["note"]), (True, "--not-an-option"), "the note, as given")
    eq(admin("queue", "resume", "orders").returncode, 0, "resume")
    r = admin("stats", "--no-such-option")
    eq(r.returncode, 2, "an unknown option is a usage error")
    eq(r.stdout, "", "nothing on stdout")
    r = admin("stats", "no-such-queue", "--json")
    eq(r.returncode, 2, "an unknown queue")
    check("no queue 'no-such-queue'" in r.stderr, r.stderr)
    # conveyor-produce, conveyor-subscribe, conveyor-workers: options after the words too
    with Pool() as pool:
        r = produce("createProduct", '{"name":"options after","price":1}', "--wait", "--timeout", "20")
        eq(r.returncode, 0, f"conveyor-produce TYPE PAYLOAD --wait (stderr: {r.stderr})")
        eq(json.loads(r.stdout.splitlines()[1])["type"], "product.created", "the result, waited for")
        eq(pool.stop(), (0, []), "clean stop")
    r = run_bin("conveyor-subscribe", "no.such.event", "--timeout", "0.3", "-c", conf)
    eq(r.returncode, 4, f"conveyor-subscribe PATTERN --timeout (stderr: {r.stderr})")
    r = run_bin("conveyor-workers", "--check", "-c", conf)
    eq(r.returncode, 0, f"conveyor-workers --check -c FILE (stderr: {r.stderr})")


def limited_broker_user():
    """A broker user who may log in but not read a dead-letter queue (RabbitMQ: no
    permission on any resource; Redis: an ACL without the list reads). Returns
    (its URL, a function that removes it)."""
    if TRANSPORT == "rabbitmq":
        rabbitmqctl("add_user", "cv-limited", "limited-pw")
        rabbitmqctl("set_permissions", "-p", "/", "cv-limited", "^$", "^$", "^$")
        return (AMQP_URL.replace("guest:guest@", "cv-limited:limited-pw@"),
                lambda: rabbitmqctl("delete_user", "cv-limited"))
    r = redislib.Redis.from_url(REDIS_URL)
    r.execute_command("ACL", "SETUSER", "cv-limited", "on", ">limited-pw", "~*", "&*", "+@all", "-lrange", "-lmove",
                      "-rpoplpush", "-lrem", "-eval", "-evalsha", "-fcall")
    host = REDIS_URL.split("//", 1)[1]
    return f"redis://cv-limited:limited-pw@{host}", lambda: r.execute_command("ACL", "DELUSER", "cv-limited")


def test_admin_dead_exits_2_when_a_broker_refuses_and_3_when_unreachable():
    """conveyor-admin dead show, purge and retry follow the README's "Exit status":
    a broker that refuses the user (a permission: configuration) is 2, one that
    cannot be reached is 3 (they exited 3 for both)."""
    conf = os.path.join(ROOT, "queues.conf")
    eq(run_bin("conveyor-workers", "-c", conf, "--setup", timeout=120).returncode, 0, "--setup")
    setting = "CONVEYOR_RABBITMQ_URL" if TRANSPORT == "rabbitmq" else "CONVEYOR_REDIS_URL"
    drain_dead("catalog")
    if TRANSPORT == "rabbitmq":  # a letter the index does not have: show rebuilds it, which reads the queue
        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        conn.channel().basic_publish("", "conveyor.catalog.dead", b'{"type":"createProduct","payload":{}}')
        conn.close()
    url, remove = limited_broker_user()
    try:
        for args in (("dead", "show", "catalog", "#1"), ("dead", "purge", "catalog", "--all"),
                     ("dead", "retry", "catalog", "--all")):
            r = admin("-c", conf, *args, env={setting: url})
            eq(r.returncode, 2, f"conveyor-admin {' '.join(args)} refused by the broker (stderr: {r.stderr})")
            check("ACCESS_REFUSED" in r.stderr or "NOPERM" in r.stderr, f"it says why: {r.stderr}")
            check("limited-pw" not in r.stderr, f"no password: {r.stderr}")
            r = admin("-c", conf, *args, env={setting: "amqp://guest:guest@127.0.0.1:1" if TRANSPORT == "rabbitmq"
                                              else "redis://127.0.0.1:1/0"})
            eq(r.returncode, 3, f"conveyor-admin {' '.join(args)} with the broker unreachable (stderr: {r.stderr})")
            eq(r.stdout, "", f"conveyor-admin {' '.join(args)}: nothing on stdout before the error")
    finally:
        remove()
        drain_dead("catalog")
    eq(admin("-c", conf, "dead", "list", "catalog").returncode, 0, "the index agrees with the queue again")


def test_produce_prints_its_summary_however_short_the_run():
    """On a terminal, conveyor-produce reading stdin ends with a summary line,
    also when the run is shorter than its progress interval (0.5 s)."""
    import pty
    with Pool() as pool:
        lines = "".join(json.dumps({"type": "createProduct", "payload": {"name": f"s{i}", "price": 1}}) + "\n"
                        for i in range(3))
        master, slave = pty.openpty()
        try:
            started = time.time()
            p = subprocess.run([os.path.join(BIN, "conveyor-produce"), "-c", os.path.join(ROOT, "queues.conf")],
                               input=lines.encode(), stdout=subprocess.PIPE, stderr=slave, timeout=60, cwd=ROOT)
            took = time.time() - started
            os.close(slave)
            slave = None
            said = b""
            while True:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the terminal's other end is closed and drained
                    break
                if not chunk:
                    break
                said += chunk
        finally:
            if slave is not None:
                os.close(slave)
            os.close(master)
        text = said.decode(errors="replace")
        print(f"run of {took:.2f} s; stderr on the terminal: {text!r}")
        eq(p.returncode, 0, f"exit status (stderr: {text})")
        eq(len(p.stdout.decode().split()), 3, "three ids on stdout")
        check("conveyor-produce: 3 published in " in text and text.rstrip().endswith(" s"),
              f"the summary line on the terminal: {text!r}")
        # not a terminal: no progress, no summary (stderr stays for errors)
        r = produce(input_=lines)
        eq((r.returncode, r.stderr), (0, ""), "no summary when stderr is not a terminal")
        eq(pool.stop(), (0, []), "clean stop")
