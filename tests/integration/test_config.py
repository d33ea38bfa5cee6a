"""A misconfiguration is a configuration error, not an outage: a bad URL, an
unknown scheme or credentials a server refuses stop conveyor-workers at start
with exit status 2 and one line naming the setting (the password masked); a
server that is merely unreachable is waited for, said once, and SIGTERM still
stops the wait."""
import contextlib
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse

import psycopg2
import redis as redislib

from harness import (AMQP_URL, BIN, DB_URL, REDIS_URL, TRANSPORT, Failure, Pool, check, db, eq, free_port,
                     query, run_bin, session_pids, write_config)

SECRET = "Sup3r-s3cret-pw"  # a password that must appear in no output


def with_password(url, user, password):
    """url with its user and password replaced."""
    u = urllib.parse.urlsplit(url)
    host = u.hostname + (f":{u.port}" if u.port else "")
    return urllib.parse.urlunsplit((u.scheme, f"{user}:{password}@{host}", u.path, u.query, u.fragment))


def port_of(url):
    return urllib.parse.urlsplit(url).port


def run_workers(env, timeout=20):
    """conveyor-workers with the test's queues (on TRANSPORT) and env; returns (status, stdout, stderr, seconds)."""
    config = write_config()
    try:
        t0 = time.time()
        r = run_bin("conveyor-workers", "-c", config, env=env, timeout=timeout)
        return r.returncode, r.stdout, r.stderr, time.time() - t0
    finally:
        os.unlink(config)


def expect_refused(env, setting, words, secret=SECRET):
    """conveyor-workers exits 2 within seconds, with exactly one line that names
    setting and holds words, and secret nowhere."""
    rc, out, err, took = run_workers(env)
    text = out + err
    eq(rc, 2, f"exit status with {setting} wrong; output:\n{text}")
    check(took < 10, f"a configuration error stops at once, not after retrying ({took:.1f}s)")
    lines = [line for line in err.splitlines() if setting in line]
    eq(len(lines), 1, f"lines naming {setting} in:\n{err}")
    check(re.search(words, lines[0], re.I), f"the line says why ({words!r}): {lines[0]}")
    check(secret not in text, f"the password appears in the output:\n{text}")
    return lines[0]


class PasswordRole:
    """A PostgreSQL role conveyor_pw with a password, and a pg_hba.conf line (at
    the top, taken out again on exit) that makes the server ask for it over TCP
    (the test servers trust everyone else)."""

    LINE = "host all conveyor_pw 127.0.0.1/32 scram-sha-256\n"

    def __enter__(self):
        c = db()
        with c.cursor() as cur:
            cur.execute("SHOW hba_file")
            self.hba = cur.fetchone()[0]
            cur.execute("DROP ROLE IF EXISTS conveyor_pw")
            cur.execute("SET password_encryption = 'scram-sha-256'")
            cur.execute(f"CREATE ROLE conveyor_pw LOGIN PASSWORD 'right-{SECRET}'")
        with open(self.hba) as f:
            self.original = f.read()
        with open(self.hba, "w") as f:
            f.write(self.LINE + self.original)
        self._reload(c)
        c.close()
        return self

    @staticmethod
    def _reload(c):
        with c.cursor() as cur:
            cur.execute("SELECT pg_reload_conf()")
        time.sleep(0.3)  # the postmaster rereads the file on SIGHUP

    def __exit__(self, *exc):
        with open(self.hba, "w") as f:
            f.write(self.original)
        c = db()
        self._reload(c)
        with c.cursor() as cur:
            cur.execute("DROP ROLE IF EXISTS conveyor_pw")
        c.close()


def test_wrong_database_password_stops_at_start():
    with PasswordRole():
        url = with_password(DB_URL, "conveyor_pw", SECRET)
        line = expect_refused({"CONVEYOR_DATABASE_URL": url}, "CONVEYOR_DATABASE_URL", "password authentication failed")
        check("conveyor_pw:***@" in line, f"the URL is shown with its password masked: {line}")
        # the same password from a file (container secrets): named by the _FILE variable
        with tempfile.NamedTemporaryFile("w", suffix=".url", delete=False) as f:
            f.write(url + "\n")
        try:
            expect_refused({"CONVEYOR_DATABASE_URL": "", "CONVEYOR_DATABASE_URL_FILE": f.name},
                           "CONVEYOR_DATABASE_URL_FILE", "password authentication failed")
        finally:
            os.unlink(f.name)
        # the server does ask for the password (so the refusal above is the password's):
        # the right one connects, the wrong one does not
        psycopg2.connect(with_password(DB_URL, "conveyor_pw", f"right-{SECRET}")).close()
        try:
            psycopg2.connect(url).close()
            raise Failure("the server accepted a wrong password: pg_hba.conf did not take")
        except psycopg2.OperationalError:
            pass


def test_wrong_broker_password_stops_at_start():
    if TRANSPORT == "rabbitmq":
        url = with_password(AMQP_URL, "guest", SECRET)
        line = expect_refused({"CONVEYOR_RABBITMQ_URL": url}, "CONVEYOR_RABBITMQ_URL", "ACCESS_REFUSED")
        check("guest:***@" in line and "'guest'" in line, f"the line names the user, masked URL: {line}")
        # a vhost that does not exist is a configuration error too
        expect_refused({"CONVEYOR_RABBITMQ_URL": AMQP_URL.rstrip("/") + "/no-such-vhost"}, "CONVEYOR_RABBITMQ_URL",
                       "NOT_ALLOWED|vhost", secret="guest:guest@")
        return
    # Redis has no password: AUTH with one is refused ...
    url = with_password(REDIS_URL, "", SECRET)
    expect_refused({"CONVEYOR_REDIS_URL": url}, "CONVEYOR_REDIS_URL", "AUTH refused")
    # ... and with requirepass set, a wrong one (WRONGPASS) and none at all (NOAUTH) are refused
    r = redislib.Redis.from_url(REDIS_URL)
    right = f"right-{SECRET}"
    r.config_set("requirepass", right)
    try:
        expect_refused({"CONVEYOR_REDIS_URL": url}, "CONVEYOR_REDIS_URL", "WRONGPASS|invalid")
        expect_refused({"CONVEYOR_REDIS_URL": REDIS_URL}, "CONVEYOR_REDIS_URL", "NOAUTH", secret=right)
    finally:
        redislib.Redis.from_url(with_password(REDIS_URL, "", right)).config_set("requirepass", "")
    # Sentinels that all answer and none names the master (here: not a Sentinel at all) are a misconfiguration
    url = f"redis-sentinel://:{SECRET}@127.0.0.1:{port_of(REDIS_URL)}/no-such-master"
    line = expect_refused({"CONVEYOR_REDIS_URL": url}, "CONVEYOR_REDIS_URL", "none names a primary of 'no-such-master'")
    check("redis-sentinel://:***@" in line, f"the line shows the URL masked: {line}")


def test_bad_urls_stop_at_start():
    broker_var = "CONVEYOR_RABBITMQ_URL" if TRANSPORT == "rabbitmq" else "CONVEYOR_REDIS_URL"
    broker_url = AMQP_URL if TRANSPORT == "rabbitmq" else REDIS_URL
    host = f"127.0.0.1:{port_of(broker_url)}"
    cases = [  # (variable, URL, words of the reason)
        ("CONVEYOR_DATABASE_URL", f"http://conveyor:{SECRET}@127.0.0.1/conveyor", "unknown scheme 'http'"),
        ("CONVEYOR_DATABASE_URL", f"postgresql://conveyor:{SECRET}@127.0.0.1:5x432/conveyor", "port"),
        ("CONVEYOR_DATABASE_URL", f"host=127.0.0.1 port=99999 password={SECRET}", "port"),
        (broker_var, f"http://guest:{SECRET}@{host}", "unknown scheme 'http'"),
        (broker_var, f"{broker_url.split('://')[0]}://guest:{SECRET}@127.0.0.1:notaport", "port"),
        (broker_var, f"{broker_url.split('://')[0]}://guest:{SECRET}@127.0.0.1:70000", "port"),
    ]
    for var, url, words in cases:
        expect_refused({var: url}, var, words)
        # --check finds the same, without connecting
        config = write_config()
        try:
            r = run_bin("conveyor-workers", "-c", config, "--check", env={var: url})
        finally:
            os.unlink(config)
        eq(r.returncode, 2, f"--check with {var}={url.replace(SECRET, '***')}: {r.stderr}")
        check(SECRET not in r.stdout + r.stderr and var in r.stderr, f"--check names {var}, masked: {r.stderr}")


def test_bad_schedules_stop_at_start():
    """A wrong schedule is a configuration error: --check and the start both exit
    2, with one line naming the file, the schedule and the field, and why."""
    cases = [  # (the schedule's settings, the field, words of the reason)
        ('cron = "0 25 * * *"; type = "register";', "cron", "hour: 25 is out of range 0-23"),
        ('cron = "0 3 * *"; type = "register";', "cron", "expected 5 or 6 fields, got 4"),
        ('cron = "0 3 * * *"; timezone = "Mars/Olympus"; type = "register";', "timezone",
         "Mars/Olympus.*not a time zone"),
        ('every = "1h"; type = "register"; payload = "[1, 2]";', "payload", "JSON object"),
        ('every = "1h"; type = "register"; payload = "{\\"a\\": }";', "payload", "JSON object"),
        ('every = "1h"; type = "launchRocket";', "type", "launchRocket.*routed by no queue"),
        ('cron = "0 3 * * *"; every = "1h"; type = "register";', "every", "both set"),
        ('every = "1h"; timezone = "Europe/Paris"; type = "register";', "timezone", "for a 'cron' schedule"),
    ]
    for settings, field, words in cases:
        config = write_config(extra=f'schedules = ( {{ name = "nightly-x"; {settings} }} );')
        try:
            for args in (("--check",), ()):
                r = run_bin("conveyor-workers", "-c", config, *args, timeout=20)
                what = f"conveyor-workers {' '.join(args)} with {settings}"
                eq(r.returncode, 2, f"{what}: exit status; output:\n{r.stdout}{r.stderr}")
                lines = [line for line in r.stderr.splitlines() if "nightly-x" in line]
                eq(len(lines), 1, f"{what}: lines naming the schedule in:\n{r.stderr}")
                check(config in lines[0] and f"'{field}'" in lines[0] and re.search(words, lines[0]),
                      f"{what}: the line names the file, the field '{field}' and says why ({words!r}): {lines[0]}")
        finally:
            os.unlink(config)


def test_bad_producers_stop_at_start():
    """A wrong entry of `producers` is a configuration error: --check and the
    start both exit 2, with one line naming the file, the entry and why, and
    never the URL's password."""
    secret_file = tempfile.NamedTemporaryFile("w", suffix=".url", delete=False)
    secret_file.write(f"shop:{SECRET}@127.0.0.1:1/shop\n")  # not a URL, nor key=value
    secret_file.close()
    empty_file = tempfile.NamedTemporaryFile("w", suffix=".url", delete=False)
    empty_file.close()
    cases = [  # (the producers setting, words of the reason)
        (f'producers = ( "postgresql://shop:{SECRET}@127.0.0.1:1/" );', r"producers.\[0\].*the name \"\" must be"),
        (f'producers = ( {{ name = "a b"; url = "postgresql://shop:{SECRET}@h/shop"; }} );', r"name \"a b\" must be"),
        ('producers = ( { name = "shop"; } );', r"producers.\[0\]' needs a url"),
        (f'producers = ( {{ url = "postgresql://h/shop"; url_file = "{secret_file.name}"; }} );', "both set"),
        (f'producers = ( {{ url_file = "{empty_file.name}"; }} );', r"url_file.*is empty"),
        ('producers = ( "postgresql://h/shop", { url = "postgresql://other/shop"; } );', r"\"shop\" is used twice"),
        ('producers = ( { name = "shop"; url = "postgresql://h/shop"; port = 5; } );', "unknown setting 'producers"),
        ('producers = "postgresql://h/shop";', "must be a list"),
        (f'producers = ( {{ name = "shop"; url_file = "{secret_file.name}"; }} );', r"producers.\[0\]': "),
    ]
    try:
        for setting, words in cases:
            config = write_config(extra=setting)
            try:
                for args in (("--check",), ()):
                    r = run_bin("conveyor-workers", "-c", config, *args, timeout=20)
                    what = f"conveyor-workers {' '.join(args)} with {setting}"
                    eq(r.returncode, 2, f"{what}: exit status; output:\n{r.stdout}{r.stderr}")
                    check(SECRET not in r.stdout + r.stderr, f"{what}: the password is printed:\n{r.stderr}")
                    lines = [line for line in r.stderr.splitlines() if "producers" in line]
                    eq(len(lines), 1, f"{what}: lines naming producers in:\n{r.stderr}")
                    check(config in lines[0] and re.search(words, lines[0]),
                          f"{what}: the line names the file and says why ({words!r}): {lines[0]}")
            finally:
                os.unlink(config)
    finally:
        os.unlink(secret_file.name)
        os.unlink(empty_file.name)


def test_check_prints_the_urls_masked():
    env = {"CONVEYOR_RABBITMQ_URL": with_password(AMQP_URL, "guest", SECRET),
           "CONVEYOR_REDIS_URL": with_password(REDIS_URL, "", SECRET),
           "CONVEYOR_DATABASE_URL": with_password(DB_URL, "conveyor", SECRET) + f"?password={SECRET}"}
    config = write_config()
    try:
        r = run_bin("conveyor-workers", "-c", config, "--check", env=env)
    finally:
        os.unlink(config)
    eq(r.returncode, 0, f"--check: {r.stderr}")
    check(SECRET not in r.stdout + r.stderr, f"--check shows no password:\n{r.stdout}")
    check("CONVEYOR_DATABASE_URL postgresql://conveyor:***@" in r.stdout and "password=***" in r.stdout,
          f"--check shows the database URL masked:\n{r.stdout}")
    var = "CONVEYOR_RABBITMQ_URL" if TRANSPORT == "rabbitmq" else "CONVEYOR_REDIS_URL"
    check(f"{var} " in r.stdout and ":***@" in r.stdout.split(var)[1], f"--check shows {var} masked:\n{r.stdout}")
    # the URL in a file, and both set
    with tempfile.NamedTemporaryFile("w", suffix=".url", delete=False) as f:
        f.write(with_password(DB_URL, "conveyor", SECRET) + "\n")
    config = write_config()
    try:
        r = run_bin("conveyor-workers", "-c", config, "--check",
                    env={"CONVEYOR_DATABASE_URL": "", "CONVEYOR_DATABASE_URL_FILE": f.name})
        eq(r.returncode, 0, f"--check with CONVEYOR_DATABASE_URL_FILE: {r.stderr}")
        check("CONVEYOR_DATABASE_URL_FILE postgresql://conveyor:***@" in r.stdout and SECRET not in r.stdout,
              f"the URL read from the file, masked:\n{r.stdout}")
        r = run_bin("conveyor-workers", "-c", config, "--check", env={"CONVEYOR_DATABASE_URL_FILE": f.name})
        eq(r.returncode, 2, "both CONVEYOR_DATABASE_URL and its _FILE set")
        check("both set" in r.stderr and SECRET not in r.stderr, r.stderr)
        r = run_bin("conveyor-workers", "-c", config, "--check",
                    env={"CONVEYOR_DATABASE_URL": "", "CONVEYOR_DATABASE_URL_FILE": f.name + ".missing"})
        eq(r.returncode, 2, "an unreadable CONVEYOR_DATABASE_URL_FILE")
        check("CONVEYOR_DATABASE_URL_FILE" in r.stderr and f.name + ".missing" in r.stderr, r.stderr)
    finally:
        os.unlink(config)
        os.unlink(f.name)


class Proxy:
    """A TCP forwarder from 127.0.0.1:port to upstream (host, port), started late:
    the server 'comes back' when it starts."""

    def __init__(self, port, upstream):
        self.port, self.upstream, self.socks, self.stopped = port, upstream, [], False

    def start(self):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped:
            try:
                a, _ = self.listener.accept()
                b = socket.create_connection(self.upstream)
            except OSError:
                return
            self.socks += [a, b]
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()
            threading.Thread(target=self._pump, args=(b, a), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self):
        self.stopped = True
        for s in [getattr(self, "listener", None)] + self.socks:
            if s:
                s.close()


def test_unreachable_server_is_waited_for():
    """A closed port is an outage, not a misconfiguration: still running after
    3 s, the wait said once (not once per attempt), its end said once when the
    server answers, and SIGTERM stops the pool."""
    def upstream(url):
        u = urllib.parse.urlsplit(url)
        return u.hostname, u.port

    if TRANSPORT == "rabbitmq":
        cases = [("CONVEYOR_DATABASE_URL", DB_URL, "database unreachable", "database is back"),
                 ("CONVEYOR_RABBITMQ_URL", AMQP_URL, "RabbitMQ unreachable", "RabbitMQ is back")]
    else:
        cases = [("CONVEYOR_REDIS_URL", REDIS_URL, "Redis unreachable", "Redis is back")]
    for var, real, said, back in cases:
        port = free_port()
        u = urllib.parse.urlsplit(real)
        # the real server's credentials, behind the proxy (PostgreSQL trusts the test user: any password will do)
        secret = f":{u.password}@"
        url = f"{u.scheme}://{u.username}:{u.password}@127.0.0.1:{port}{u.path}"
        if var == "CONVEYOR_REDIS_URL":
            secret, url = SECRET, f"redis://127.0.0.1:{port}{u.path}"
        if var == "CONVEYOR_DATABASE_URL":
            secret, url = SECRET, f"postgresql://{u.username}@127.0.0.1:{port}{u.path}?password={SECRET}"
        config = write_config()
        log = tempfile.NamedTemporaryFile(prefix="conveyor-config-", suffix=".log", delete=False)
        env = dict(os.environ)
        env[var] = url
        proxy = Proxy(port, upstream(real))
        p = subprocess.Popen([os.path.join(BIN, "conveyor-workers"), "-c", config], stdout=log, stderr=log, env=env,
                             start_new_session=True)
        try:
            time.sleep(3.5)
            check(p.poll() is None, f"conveyor-workers waits for an unreachable server ({var}), exited {p.returncode}")
            proxy.start()
            deadline = time.time() + 15
            while back not in open(log.name).read() and time.time() < deadline and p.poll() is None:
                time.sleep(0.1)
            time.sleep(0.5)
            p.send_signal(signal.SIGTERM)
            rc = p.wait(30)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            proxy.stop()
            os.unlink(config)
        text = open(log.name).read()
        os.unlink(log.name)
        eq(rc, 0, f"SIGTERM exits 0:\n{text}")
        start = [line for line in text.splitlines() if "supervisor" in line or not line.startswith("{")]
        eq(sum(1 for line in start if said in line), 1, f"'{said}' said once in:\n{text}")
        waits = [line for line in start if "unreachable" in line or "retrying" in line or "waiting" in line]
        eq(len(waits), 1, f"one line for the whole wait, not one per attempt:\n{text}")
        eq(sum(1 for line in start if back in line), 1, f"'{back}' said once in:\n{text}")
        check(secret not in text, f"the password appears in the log:\n{text}")


def kill_a_worker(pool, queue="users"):
    """SIGKILLs one worker of queue in the pool (found by its process name)."""
    for pid in session_pids(pool.proc.pid):
        try:
            comm = open(f"/proc/{pid}/comm").read().strip()
        except OSError:
            continue
        if comm == f"cv-worker-{queue}":
            os.kill(pid, signal.SIGKILL)
            return
    raise Failure(f"no worker of {queue} in the pool")


def test_a_child_refused_later_backs_off():
    """Credentials refused after the pool started (the password changed): the
    restarted worker says so and exits 2, the supervisor restarts it with growing
    backoff (not in a tight loop), and once the password is right again it is back."""
    right = f"right-{SECRET}"
    with contextlib.ExitStack() as stack:
        if TRANSPORT == "rabbitmq":  # the database's password changes
            stack.enter_context(PasswordRole())
            query("GRANT conveyor TO conveyor_pw")
            env = {"CONVEYOR_DATABASE_URL": with_password(DB_URL, "conveyor_pw", right)}
            change = lambda: query(f"ALTER ROLE conveyor_pw PASSWORD 'other-{SECRET}'")
            restore = lambda: query(f"ALTER ROLE conveyor_pw PASSWORD '{right}'")
            said = "password authentication failed"
        else:  # Redis starts asking for a password the URL does not have
            r = redislib.Redis.from_url(REDIS_URL)
            change = lambda: r.config_set("requirepass", right)
            restore = lambda: redislib.Redis.from_url(with_password(REDIS_URL, "", right)).config_set("requirepass", "")
            env, said = {}, "NOAUTH"
        with Pool(workers={"users": 1, "catalog": 1, "orders": 1}, env=env, expect_restarts=True) as pool:
            try:
                change()
                kill_a_worker(pool)
                time.sleep(8)
            finally:
                restore()
            log = pool.read_log()
            # the worker's restarts (the relay, when the change came before it opened its broker, is
            # refused and restarted with its own backoff: counted apart, it would double the figure)
            refused = [line for line in log.splitlines()
                       if "stopped on a configuration error" in line and '"msg":"worker ' in line]
            check(1 <= len(refused) <= 6, f"restarted with backoff, not in a tight loop ({len(refused)} in 8 s):\n{log}")
            check(any(said in line and '"worker"' in line for line in log.splitlines()),
                  f"the worker says why ({said}):\n{log}")
            check(pool.proc.poll() is None, "the pool keeps running")
            deadline = time.time() + 20
            before = log.count("consuming queue users")
            while pool.read_log().count("consuming queue users") <= before and time.time() < deadline:
                time.sleep(0.2)
            time.sleep(1)  # the restarted worker gets its database connection
            rc, left = pool.stop()
            eq(rc, 0, "SIGTERM exit status")
            eq(left, [], "processes left")
            log = pool.read_log()
            check(SECRET not in log, f"the password appears in the log:\n{log}")
            after = log.split("stopped on a configuration error")[-1]
            check("consuming queue users" in after, f"the worker is back once the password is right:\n{log}")
