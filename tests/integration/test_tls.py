"""TLS end to end: a PostgreSQL that accepts only hostssl connections and (on the
rabbitmq transport) a RabbitMQ node with only a TLS listener that wants a client
certificate, both started here with a CA and certificates made with openssl.
Commands go over them through the real binaries; a certificate that does not name
the host, one from an unknown CA, a missing client certificate and a plain
connection are each refused with a readable error. A client certificate the
server does not trust (signed by another CA: a `hostssl ... cert` rule on
PostgreSQL, `cert_file` on RabbitMQ) is a configuration error too: every binary
exits 2 at once, naming the setting, with no key in its output.

The servers live under /var/tmp/conveyor-tls-<first port> (reachable by the
postgres and rabbitmq users) on 127.0.0.1 and 127.0.0.2: connecting to
127.0.0.2, a name the server's certificate does not bear, is the wrong-host case.
Ports: CONVEYOR_TLS_PORT_BASE (57000) + 0/1/2, + 10 on the redis transport, so
both transports, and the suites of two server sets (each with its own base:
scripts/test.sh runs two), can run at once: the folder and the RabbitMQ
node's name (conveyortls<first port>@localhost) follow the port.
scripts/servers.sh reserves them against the kernel's ephemeral ports (a client socket that took one as its local port
made PostgreSQL start without its 127.0.0.1 listener once)."""
import json
import os
import shutil
import socket
import subprocess
import time

import psycopg2

from harness import BIN, TRANSPORT, Failure, Pool, check, eq, run_bin, write_config

PG_BIN = "/usr/lib/postgresql/15/bin"
BASE = int(os.environ.get("CONVEYOR_TLS_PORT_BASE", "57000")) + (10 if TRANSPORT == "redis" else 0)
PG_PORT, AMQP_PORT, DIST_PORT = BASE, BASE + 1, BASE + 2
NODE = f"conveyortls{BASE}@localhost"
STATE = f"/var/tmp/conveyor-tls-{BASE}"
CERTS = os.path.join(STATE, "certs")


def sh(*cmd, check_=True, timeout=120, env=None, user=None):
    if user:  # as the server's own user, like scripts/servers.sh
        cmd = ("su", user, "-s", "/bin/sh", "-c", " ".join(f"'{c}'" for c in cmd))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check_ and r.returncode != 0:
        raise Failure(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr}{r.stdout}")
    return r


# ---- certificates ------------------------------------------------------------------

def make_certs():
    """A CA; a server certificate for localhost and 127.0.0.1 (not 127.0.0.2); a
    client certificate; a second CA that signed none of them, and a client
    certificate it signed (client-other: for user conveyor too, but no server
    trusts it). The address is a DNS name of the server certificate too:
    librabbitmq-c 0.11 compares only those (libpq takes the IP entry)."""
    os.makedirs(CERTS)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args):
        sh("openssl", *args)

    def path(name):
        return os.path.join(CERTS, name)

    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", *ec, "-keyout", path(f"{ca}.key"), "-out", path(f"{ca}.pem"), "-days", "2",
                "-subj", f"/CN=Conveyor test {ca}")
    for name, cn, ext, ca in (("server", "localhost",
                               "subjectAltName=DNS:localhost,DNS:127.0.0.1,IP:127.0.0.1\nextendedKeyUsage=serverAuth",
                               "ca"),
                              ("client", "conveyor", "extendedKeyUsage=clientAuth", "ca"),
                              ("client-other", "conveyor", "extendedKeyUsage=clientAuth", "other-ca")):
        with open(path(f"{name}.ext"), "w") as f:
            f.write(ext + "\n")
        openssl("req", *ec, "-keyout", path(f"{name}.key"), "-out", path(f"{name}.csr"), "-subj", f"/CN={cn}")
        openssl("x509", "-req", "-in", path(f"{name}.csr"), "-CA", path(f"{ca}.pem"), "-CAkey", path(f"{ca}.key"),
                "-CAcreateserial", "-days", "2", "-extfile", path(f"{name}.ext"), "-out", path(f"{name}.pem"))
    for f in os.listdir(CERTS):
        os.chmod(path(f), 0o600 if f.endswith(".key") else 0o644)


def server_copy(dest, owner):
    """The server's certificate, key and CA, copied into dest for owner (0600 key)."""
    os.makedirs(dest, exist_ok=True)
    for f in ("server.pem", "server.key", "ca.pem"):
        shutil.copy(os.path.join(CERTS, f), dest)
    os.chmod(os.path.join(dest, "server.key"), 0o600)
    sh("chown", "-R", f"{owner}:{owner}", dest)


# ---- the servers ---------------------------------------------------------------------

def pg_url(host="127.0.0.1", db="conveyor", ca="ca.pem", mode="verify-full", client=None):
    """client: "client" or "client-other", the client certificate and key to present."""
    url = (f"postgresql://conveyor@{host}:{PG_PORT}/{db}?sslmode={mode}"
           f"&sslrootcert={os.path.join(CERTS, ca)}&connect_timeout=5")
    if client:
        url += f"&sslcert={os.path.join(CERTS, client + '.pem')}&sslkey={os.path.join(CERTS, client + '.key')}"
    return url


def ports_free():
    """Fails, naming the holder, when a port of this test is taken on 127.0.0.1."""
    for port in (PG_PORT, AMQP_PORT, DIST_PORT):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no hold
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            held = sh("ss", "-tanp", f"( sport = :{port} )", check_=False).stdout
            raise Failure(f"port {port} of the TLS test is taken ({e}):\n{held}")
        finally:
            s.close()


def pg_start():
    d = os.path.join(STATE, "pg")
    server_copy(os.path.join(STATE, "pg-tls"), "postgres")
    os.makedirs(d)
    sh("chown", "postgres:postgres", d)
    os.chmod(d, 0o700)
    sh(f"{PG_BIN}/initdb", "-D", d, "-U", "conveyor", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8",
       user="postgres")
    tls = os.path.join(STATE, "pg-tls")
    with open(os.path.join(d, "postgresql.conf"), "a") as f:
        f.write(f"listen_addresses = '127.0.0.1,127.0.0.2'\nport = {PG_PORT}\nunix_socket_directories = '{d}'\n"
                f"ssl = on\nssl_cert_file = '{tls}/server.pem'\nssl_key_file = '{tls}/server.key'\n"
                f"ssl_ca_file = '{tls}/ca.pem'\nfsync = off\n")
    with open(os.path.join(d, "pg_hba.conf"), "w") as f:
        # TLS only: no host, no local lines; database certdb wants a client certificate of the CA
        f.write("hostssl certdb all 127.0.0.0/8 cert\nhostssl all all 127.0.0.0/8 trust\n")
    sh(f"{PG_BIN}/pg_ctl", "-w", "-t", "60", "-D", d, "-l", os.path.join(d, "server.log"), "start", user="postgres")
    c = psycopg2.connect(pg_url(db="postgres"))
    c.autocommit = True
    c.cursor().execute("CREATE DATABASE conveyor")
    c.cursor().execute("CREATE DATABASE certdb")
    c.close()


def pg_stop():
    d = os.path.join(STATE, "pg")
    if os.path.exists(os.path.join(d, "postmaster.pid")):
        sh(f"{PG_BIN}/pg_ctl", "-w", "-D", d, "-m", "immediate", "stop", user="postgres", check_=False)


def rabbit_env():
    r = os.path.join(STATE, "rabbitmq")
    return dict(os.environ, RABBITMQ_NODENAME=NODE, RABBITMQ_DIST_PORT=str(DIST_PORT),
                RABBITMQ_MNESIA_BASE=f"{r}/mnesia", RABBITMQ_LOG_BASE=f"{r}/log",
                RABBITMQ_PID_FILE=f"{r}/rabbitmq.pid", RABBITMQ_ENABLED_PLUGINS_FILE=f"{r}/enabled_plugins",
                RABBITMQ_CONFIG_FILE=f"{r}/rabbitmq")


def rabbit_start():
    r = os.path.join(STATE, "rabbitmq")
    os.makedirs(f"{r}/mnesia")
    os.makedirs(f"{r}/log")
    server_copy(f"{r}/tls", "rabbitmq")
    with open(f"{r}/enabled_plugins", "w") as f:
        f.write("[].\n")
    with open(f"{r}/rabbitmq.conf", "w") as f:
        f.write(f"""loopback_users.guest = true
listeners.tcp = none
listeners.ssl.1 = 127.0.0.1:{AMQP_PORT}
listeners.ssl.2 = 127.0.0.2:{AMQP_PORT}
ssl_options.cacertfile = {r}/tls/ca.pem
ssl_options.certfile = {r}/tls/server.pem
ssl_options.keyfile = {r}/tls/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
""")
    sh("chown", "-R", "rabbitmq:rabbitmq", r)
    env = rabbit_env()
    with open(f"{r}/log/console.log", "w") as log:
        subprocess.Popen(["rabbitmq-server"], env=env, stdout=log, stderr=log, start_new_session=True)
    deadline = time.time() + 60
    while not os.path.exists(env["RABBITMQ_PID_FILE"]):
        if time.time() > deadline:
            raise Failure(f"the TLS RabbitMQ did not start: {open(f'{r}/log/console.log').read()[-2000:]}")
        time.sleep(0.2)
    r2 = sh("rabbitmqctl", "-q", "-n", NODE, "wait", env["RABBITMQ_PID_FILE"], env=env, check_=False, timeout=120)
    if r2.returncode != 0:
        raise Failure(f"the TLS RabbitMQ did not start: {r2.stderr}\n{open(f'{r}/log/console.log').read()[-2000:]}")


def rabbit_stop():
    env = rabbit_env()
    pid_file = env["RABBITMQ_PID_FILE"]
    if not os.path.exists(pid_file):
        return
    pid = open(pid_file).read().strip()
    sh("rabbitmqctl", "-q", "-n", NODE, "stop", pid_file, env=env, check_=False, timeout=60)
    if pid.isdigit() and os.path.exists(f"/proc/{pid}"):
        os.kill(int(pid), 9)


def teardown():
    """Stops what an earlier (possibly killed) run or this one started, and deletes it."""
    if os.path.exists(STATE):
        try:
            pg_stop()
            rabbit_stop()
        finally:
            shutil.rmtree(STATE)


# ---- running the binaries --------------------------------------------------------------

def tls_config(ca="ca.pem", client_cert=True, client="client"):
    """Lines of queues.conf for the TLS RabbitMQ (client: the certificate and key presented)."""
    keys = f'ca_file = "{os.path.join(CERTS, ca)}";'
    if client_cert:
        keys += f' cert_file = "{os.path.join(CERTS, client + ".pem")}"; key_file = "{os.path.join(CERTS, client + ".key")}";'
    return f"rabbitmq: {{ {keys} }};"


def amqps_url(host="127.0.0.1"):
    return f"amqps://guest:guest@{host}:{AMQP_PORT}"


def conf(extra):
    """A queues.conf with extra, under STATE (deleted with it)."""
    path = os.path.join(STATE, f"conveyor-{len(os.listdir(STATE))}.conf")
    shutil.move(write_config(extra=extra), path)
    return path


def produce(config, env, *args):
    return run_bin("conveyor-produce", "-c", config, "--timeout", "30", *args, env=env, timeout=60)


def one_line(r, what):
    """A refusal: a non-zero exit and one readable line on stderr (no password)."""
    lines = r.stderr.strip().splitlines()
    print(f"refused, {what}: {r.stderr.strip()}")
    eq(len(lines), 1, f"{what}: one line on stderr (got {r.stderr!r})")
    check("guest:guest" not in r.stderr and ":guest@" not in r.stderr, f"{what}: no password in {r.stderr!r}")
    return lines[0]


def no_key(text, what):
    """No line of any private key of the test in text."""
    for f in os.listdir(CERTS):
        if f.endswith(".key"):
            body = [x for x in open(os.path.join(CERTS, f)).read().splitlines() if x and not x.startswith("-----")]
            check(not any(x in text for x in body) and "PRIVATE KEY" not in text, f"{what}: the key {f} is shown")


def pool_refuses(env, extra, setting, want, limit=10):
    """conveyor-workers itself (not --setup) with a certificate TLS refuses:
    exit 2 within limit seconds (not a wait for a server that will never take
    it), one line naming setting and saying why (want), no password or key."""
    config = conf(extra)
    started = time.time()
    try:
        r = run_bin("conveyor-workers", "-c", config, env=env, timeout=limit)
    except subprocess.TimeoutExpired:
        raise Failure(f"conveyor-workers with {want!r} still runs after {limit} s: it waits for a server that refuses it")
    took = time.time() - started
    print(f"conveyor-workers refused at start in {took:.2f} s: {r.stderr.strip()[-400:]}")
    eq(r.returncode, 2, f"conveyor-workers with a refused client certificate: exit status (stderr: {r.stderr})")
    said = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith("{")]
    eq(len(said), 1, f"conveyor-workers: one line says why (stderr: {r.stderr!r})")
    check(said[0].startswith(f"conveyor-workers: {setting} ") and want in said[0],
          f"the line names {setting} and says why ({want!r}): {said[0]!r}")
    check(":guest@" not in r.stderr, "no password")
    check("unreachable" not in r.stderr and "waiting for it" not in r.stderr, f"not taken for an outage: {r.stderr}")
    no_key(r.stdout + r.stderr, "conveyor-workers")
    return said[0]


def setup_refuses(config, env, want, timeout=30):
    """conveyor-workers --setup with a certificate TLS refuses: a configuration
    error, not an outage: exit 2 with one line that says why (want), no
    password; returns the line."""
    r = run_bin("conveyor-workers", "-c", config, "--setup", env=env, timeout=timeout)
    eq(r.returncode, 2, f"--setup with a refused certificate: exit status (stderr: {r.stderr})")
    said = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith("{")]  # besides the JSON log
    eq(len(said), 1, f"--setup: one line says why (stderr: {r.stderr!r})")
    check(want in said[0], f"--setup says why it cannot connect ({want!r}): {said[0]!r}")
    check(":guest@" not in r.stderr, "no password")
    return said[0]


# ---- the test --------------------------------------------------------------------------

def test_commands_over_tls_and_refusals():
    teardown()
    try:
        os.makedirs(STATE)
        os.chmod(STATE, 0o755)
        make_certs()
        ports_free()
        pg_start()
        if TRANSPORT == "rabbitmq":
            rabbit_start()
        check_postgres_refusals()
        if TRANSPORT == "rabbitmq":
            env = {"CONVEYOR_DATABASE_URL": pg_url(), "CONVEYOR_RABBITMQ_URL": amqps_url()}
            extra = tls_config()
            check_rabbitmq_refusals(env)
        else:  # commands over Redis (no TLS in hiredis: see the README), the database over TLS
            env = {"CONVEYOR_DATABASE_URL": pg_url()}
            extra = ""
        check_commands(conf(extra), extra, env)
    finally:
        teardown()


def check_postgres_refusals():
    # the server takes TLS only: a plain connection is refused by pg_hba.conf
    try:
        psycopg2.connect(pg_url(mode="disable")).close()
        raise Failure("a plain connection to the TLS-only PostgreSQL was accepted")
    except psycopg2.OperationalError as e:
        check("no encryption" in str(e), f"plain connection refused by pg_hba: {e}")
    # the binaries, with a certificate that does not name the host / from an unknown CA
    for host, ca, want in (("127.0.0.2", "ca.pem", "does not match host name"),
                           ("127.0.0.1", "other-ca.pem", "certificate verify failed")):
        url = pg_url(host=host, ca=ca)
        r = run_bin("conveyor-admin", "-c", conf(""), "dead", "retry", "users", "--all",
                    env={"CONVEYOR_DATABASE_URL": url}, timeout=60)
        eq(r.returncode, 2, f"conveyor-admin against PostgreSQL with {url}: a configuration error (stderr: {r.stderr})")
        line = one_line(r, "conveyor-admin")
        check(want in line and f'"{host}", port {PG_PORT}' in line,
              f"the refusal names the server and says why ({want!r}): {line!r}")
        line = setup_refuses(conf(""), {"CONVEYOR_DATABASE_URL": url}, want)
        check("CONVEYOR_DATABASE_URL" in line, f"the line names the setting: {line}")
    check_postgres_client_certificate()


def check_postgres_client_certificate():
    """A `hostssl certdb all ... cert` rule: the CA's client certificate gets in;
    one from another CA is refused in the handshake ("unknown ca"), and every
    binary takes that for a configuration error: exit 2 at once, the setting
    named, no key shown."""
    c = psycopg2.connect(pg_url(db="certdb", client="client"))
    c.close()
    try:
        psycopg2.connect(pg_url(db="certdb")).close()
        raise Failure("the cert rule let a connection without a client certificate in")
    except psycopg2.OperationalError:
        pass
    env = {"CONVEYOR_DATABASE_URL": pg_url(db="certdb", client="client-other")}
    want = "refused the client certificate"
    line = pool_refuses(env, "", "CONVEYOR_DATABASE_URL", want)
    check("unknown ca" in line and "sslcert" in line, f"the line says why, and which part of the URL: {line}")
    setup_refuses(conf(""), env, want)
    for tool, args in (("conveyor-admin", ("stats",)), ("conveyor-admin", ("--json", "stats")),
                       ("conveyor-admin", ("queue", "pause", "users"))):
        r = run_bin(tool, "-c", conf(""), *args, env=env, timeout=30)
        eq(r.returncode, 2, f"{tool} {' '.join(args)} with a refused client certificate (stderr: {r.stderr})")
        eq(r.stdout, "", f"{tool} {' '.join(args)}: nothing on stdout before the error")
        check(want in one_line(r, f"{tool} {' '.join(args)}"), f"{tool} says why: {r.stderr}")
        no_key(r.stderr, tool)


def check_rabbitmq_refusals(env):
    create = ("createProduct", '{"name":"refused","price":1}')
    cases = (  # a certificate refused either way is configuration (2); a plain port mismatch looks like an outage (3)
        ("the wrong host", tls_config(), amqps_url("127.0.0.2"), "certificate is not for host '127.0.0.2'", 2),
        ("an unknown CA", tls_config(ca="other-ca.pem"), amqps_url(), "certificate is not trusted", 2),
        ("no client certificate", tls_config(client_cert=False), amqps_url(),
         "wants a client certificate and none is set", 2),
        ("a client certificate of another CA", tls_config(client="client-other"), amqps_url(),
         "refused the client certificate of rabbitmq.cert_file", 2),
        ("plain AMQP", "", f"amqp://guest:guest@127.0.0.1:{AMQP_PORT}", "is the port TLS?", 3),
        ("a missing CA file", tls_config(ca="nonexistent.pem"), amqps_url(), "cannot read the CA certificates", 2),
    )
    for what, extra, url, want, status in cases:
        r = produce(conf(extra), dict(env, CONVEYOR_RABBITMQ_URL=url), *create)
        eq(r.returncode, status, f"conveyor-produce with {what}: exit status (stderr: {r.stderr})")
        line = one_line(r, what)
        server = url.split("@")[1] if "CA file" not in what else "rabbitmq.ca_file"  # this one is before connecting
        check(want in line and server in line, f"{what}: the refusal names {server} and says why ({want!r}): {line!r}")
        no_key(r.stderr, what)
    line = setup_refuses(conf(tls_config()), dict(env, CONVEYOR_RABBITMQ_URL=amqps_url("127.0.0.2")),
                         "certificate is not for host '127.0.0.2'")
    check("CONVEYOR_RABBITMQ_URL" in line, f"the line names the setting: {line}")
    # a client certificate the broker does not trust: the pool stops at start (it waited for ever)
    other = tls_config(client="client-other")
    line = pool_refuses(env, other, "CONVEYOR_RABBITMQ_URL", "refused the client certificate of rabbitmq.cert_file")
    check("unknown ca" in line, f"the line says why: {line}")
    pool_refuses(env, tls_config(client_cert=False), "CONVEYOR_RABBITMQ_URL", "wants a client certificate")
    # conveyor-admin and conveyor-subscribe: exit 2 too, nothing on stdout before the error (no table header)
    for what, extra, url in (("a client certificate of another CA", other, amqps_url()),
                             ("the wrong host", tls_config(), amqps_url("127.0.0.2"))):
        for tool, args in (("conveyor-admin", ("dead", "counts")), ("conveyor-admin", ("dead", "list", "catalog")),
                           ("conveyor-admin", ("stats",)), ("conveyor-admin", ("stats", "--json")),
                           ("conveyor-subscribe", ("-n", "1", "#"))):
            r = run_bin(tool, "-c", conf(extra), *args, env=dict(env, CONVEYOR_RABBITMQ_URL=url), timeout=30)
            eq(r.returncode, 2, f"{tool} {' '.join(args)} with {what}: exit status (stderr: {r.stderr})")
            eq(r.stdout, "", f"{tool} {' '.join(args)} with {what}: nothing on stdout before the error")
            one_line(r, f"{tool} {' '.join(args)} with {what}")
            no_key(r.stderr, tool)


def check_commands(config, extra, env):
    r = run_bin("conveyor-workers", "-c", config, "--setup", env=env, timeout=120)
    eq(r.returncode, 0, f"--setup over TLS (stderr: {r.stderr})")
    with Pool(extra=extra, env=env) as pool:
        r = produce(config, env, "--wait", "createProduct", '{"name":"Over TLS","price":"4.20","stock":3}')
        eq(r.returncode, 0, f"conveyor-produce --wait over TLS (stderr: {r.stderr})")
        ev = json.loads(r.stdout.strip().splitlines()[1])
        eq(ev["type"], "product.created", "result event")
        pid = ev["data"]["productId"]
        r = produce(config, env, "--wait", "updateStock", json.dumps({"productId": pid, "quantityChange": -5}))
        eq(r.returncode, 1, f"a rejection comes back over TLS too (stderr: {r.stderr})")
        eq(json.loads(r.stdout.strip().splitlines()[1])["data"]["code"], "INSUFFICIENT_STOCK", "rejection")
        c = psycopg2.connect(pg_url())
        cur = c.cursor()
        cur.execute("SELECT name, stock FROM products WHERE id = %s", (pid,))
        eq(cur.fetchall(), [("Over TLS", 3)], "the product, in the TLS PostgreSQL")
        cur.execute("SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a"
                    " USING (pid) WHERE a.application_name LIKE 'conveyor-%%'")
        n, tls = cur.fetchone()
        check(n >= 2 and tls == n, f"the pool's connections (workers, relay) use TLS: {tls} of {n}")
        c.close()
        eq(pool.stop(), (0, []), "clean stop")
