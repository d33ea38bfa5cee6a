"""Servers on test hosts (tests/hosts.sh): network namespaces cvh1..cvhN on a
bridge in 10.77.0.0/24, each server or pool inside its host, so faults between
machines can be made: a host partitioned, a process killed.

Everything lives under /var/tmp/conveyor-hosts and is removed by teardown(),
which also removes the hosts (and every process still running in them)."""
import json
import os
import shutil
import signal
import subprocess
import time

import psycopg2

from harness import LOG_DIR, ROOT, Failure, log_file

HOSTS = os.path.join(ROOT, "tests", "hosts.sh")
STATE = "/var/tmp/conveyor-hosts"
PG_BIN = "/usr/lib/postgresql/15/bin"


def addr(host):
    return f"10.77.0.{10 + int(host[3:])}"


def hosts(*args, timeout=60):
    r = subprocess.run([HOSTS, *args], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise Failure(f"hosts.sh {' '.join(args)} exited {r.returncode}: {r.stderr}")
    return r


def on(host):
    """The argv prefix that runs a command inside host."""
    return (HOSTS, "exec", host)


def run_on(host, *cmd, timeout=120, check=True, env=None):
    e = dict(os.environ)
    e.update(env or {})
    r = subprocess.run([*on(host), *cmd], capture_output=True, text=True, timeout=timeout, env=e)
    if check and r.returncode != 0:
        raise Failure(f"{' '.join(cmd)} on {host} exited {r.returncode}: {r.stderr}{r.stdout}")
    return r


def spawn(host, *cmd, name, env=None):
    """A long-running process inside host, its output in a log file of LOG_DIR."""
    e = dict(os.environ)
    e.update(env or {})
    log = log_file(f"{name}-")
    return subprocess.Popen([*on(host), *cmd], stdout=log, stderr=log, env=e, start_new_session=True)


def setup(n):
    teardown()
    os.makedirs(STATE)
    os.chmod(STATE, 0o755)
    hosts("up", str(n))


def teardown():
    r = subprocess.run([HOSTS, "down"], capture_output=True, text=True, timeout=120)  # kills what runs inside
    if r.returncode != 0:  # said, not raised: teardown runs in finally blocks, after the real failure
        print(f"hosts.sh down exited {r.returncode}: {r.stderr}", flush=True)
    shutil.rmtree(STATE, ignore_errors=True)


def wait_for(what, fn, timeout=60, every=0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(every)
    raise Failure(f"timed out waiting for {what}")


# ---- PostgreSQL ---------------------------------------------------------------------

def as_postgres(*cmd, host=None, timeout=120):
    line = " ".join(f"'{c}'" for c in cmd)
    argv = ("su", "postgres", "-s", "/bin/sh", "-c", line)
    r = subprocess.run([*(on(host) if host else ()), *argv], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise Failure(f"{line} exited {r.returncode}: {r.stderr}{r.stdout}")
    return r


class Postgres:
    """A PostgreSQL server on host (port 5432), trusting the test network; with
    primary, a standby streaming from it (pg_basebackup), synchronous once
    make_synchronous() is called on the primary."""

    def __init__(self, host, primary=None):
        self.host, self.dir = host, os.path.join(STATE, f"pg-{host}")
        self.url = f"postgresql://conveyor@{addr(host)}:5432/conveyor"
        sock = self.dir + ".sock"  # not in the data folder: pg_basebackup would copy its lock file
        os.makedirs(self.dir, mode=0o700)
        os.makedirs(sock)
        subprocess.run(["chown", "postgres:postgres", self.dir, sock], check=True)
        if primary is None:
            as_postgres(f"{PG_BIN}/initdb", "-D", self.dir, "-U", "conveyor", "--auth=trust", "-E", "UTF8",
                        "--locale=C.UTF-8")
            with open(os.path.join(self.dir, "pg_hba.conf"), "w") as f:
                f.write("local all all trust\nhost all all 10.77.0.0/24 trust\n"
                        "host replication all 10.77.0.0/24 trust\n")
        else:
            as_postgres(f"{PG_BIN}/pg_basebackup", "-h", addr(primary.host), "-U", "conveyor", "-D", self.dir,
                        "-X", "stream", "-R", "-c", "fast", host=host)
            with open(os.path.join(self.dir, "postgresql.auto.conf"), "a") as f:
                f.write(f"primary_conninfo = 'host={addr(primary.host)} user=conveyor application_name={host}'\n")
        with open(os.path.join(self.dir, "postgresql.conf"), "a") as f:
            f.write(f"listen_addresses = '{addr(host)}'\nport = 5432\nunix_socket_directories = '{sock}'\n"
                    "wal_level = replica\nmax_wal_senders = 4\nfsync = off\nmax_connections = 200\n")
        self.pg_ctl("start")
        if primary is None:
            self.query("CREATE DATABASE conveyor", db="postgres")

    def pg_ctl(self, *args):
        return as_postgres(f"{PG_BIN}/pg_ctl", "-w", "-t", "60", "-D", self.dir, "-l",
                           os.path.join(self.dir, "server.log"), *args, host=self.host)

    def query(self, sql, *args, db="conveyor"):
        c = psycopg2.connect(f"postgresql://conveyor@{addr(self.host)}:5432/{db}", connect_timeout=5)
        try:
            c.autocommit = True
            cur = c.cursor()
            cur.execute(sql, args or None)
            return cur.fetchall() if cur.description else None
        finally:
            c.close()

    def make_synchronous(self, standby):
        self.query(f"ALTER SYSTEM SET synchronous_standby_names = '{standby.host}'")
        self.query("SELECT pg_reload_conf()")
        wait_for("a synchronous standby", lambda: self.query(
            "SELECT sync_state FROM pg_stat_replication WHERE application_name = %s", standby.host) == [("sync",)])


# ---- RabbitMQ ------------------------------------------------------------------------

class RabbitCluster:
    """RabbitMQ nodes conveyor@<host>, one per host (AMQP on 5672), clustered
    with the first."""

    def __init__(self, hosts_):
        self.hosts = list(hosts_)
        self.procs = {}
        for h in self.hosts:
            self.start(h)
        for h in self.hosts:
            self.ctl(h, "wait", self.env(h)["RABBITMQ_PID_FILE"], timeout=180)
        for h in self.hosts[1:]:
            self.ctl(h, "stop_app")
            self.ctl(h, "join_cluster", self.node(self.hosts[0]))
            self.ctl(h, "start_app", timeout=180)
        status = self.ctl(self.hosts[0], "cluster_status", "--formatter", "json").stdout
        running = json.loads(status).get("running_nodes", [])
        if sorted(running) != sorted(self.node(h) for h in self.hosts):
            raise Failure(f"the cluster did not form: {status}")

    @staticmethod
    def node(h):
        return f"conveyor@{h}"

    def url(self, h, user="guest", password="guest"):
        return f"amqp://{user}:{password}@{addr(h)}:5672"

    def urls(self):
        return ",".join(self.url(h) for h in self.hosts)

    def env(self, h):
        d = os.path.join(STATE, f"rabbit-{h}")
        return {"RABBITMQ_NODENAME": self.node(h), "RABBITMQ_NODE_PORT": "5672", "RABBITMQ_DIST_PORT": "25672",
                "RABBITMQ_MNESIA_BASE": f"{d}/mnesia", "RABBITMQ_LOG_BASE": f"{d}/log",
                "RABBITMQ_PID_FILE": f"{d}/rabbitmq.pid", "RABBITMQ_ENABLED_PLUGINS_FILE": f"{d}/enabled_plugins",
                "RABBITMQ_CONFIG_FILE": f"{d}/rabbitmq"}

    def start(self, h):
        e = self.env(h)
        d = os.path.dirname(e["RABBITMQ_PID_FILE"])
        os.makedirs(e["RABBITMQ_MNESIA_BASE"], exist_ok=True)
        os.makedirs(e["RABBITMQ_LOG_BASE"], exist_ok=True)
        with open(e["RABBITMQ_ENABLED_PLUGINS_FILE"], "w") as f:
            f.write("[].\n")
        with open(f"{d}/rabbitmq.conf", "w") as f:
            f.write(f"loopback_users = none\nlisteners.tcp.default = {addr(h)}:5672\n")
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", d], check=True)
        self.procs[h] = spawn(h, "rabbitmq-server", name=f"rabbitmq-{h}", env=e)

    def ctl(self, h, *args, timeout=120):
        return run_on(h, "rabbitmqctl", "-q", "-n", self.node(h), *args, timeout=timeout, env=self.env(h))

    def leader(self, queue, via):
        """The host whose node leads quorum queue `queue`."""
        out = self.ctl(via, "list_queues", "name", "leader", "--formatter", "json").stdout
        for q in json.loads(out):
            if q.get("name") == queue and q.get("leader"):
                return q["leader"].split("@", 1)[1]
        raise Failure(f"no leader for {queue}: {out}")

    def kill(self, h):
        with open(self.env(h)["RABBITMQ_PID_FILE"]) as f:
            os.kill(int(f.read().strip()), signal.SIGKILL)


# ---- Redis with Sentinel -----------------------------------------------------------

class RedisSentinel:
    """A Redis primary on primary_host, a replica on replica_host, and a Sentinel
    on each of sentinel_hosts watching master 'conveyor' (quorum 2)."""

    MASTER = "conveyor"

    def __init__(self, primary_host, replica_host, sentinel_hosts):
        self.procs = {}
        self.sentinel_hosts = list(sentinel_hosts)
        for h, extra in ((primary_host, ()), (replica_host, ("--replicaof", addr(primary_host), "6379"))):
            d = os.path.join(STATE, f"redis-{h}")
            os.makedirs(d)
            self.procs[h] = spawn(h, "redis-server", "--bind", addr(h), "--port", "6379", "--protected-mode", "no",
                                  "--dir", d, "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
                                  *extra, name=f"redis-{h}")
        for h in self.sentinel_hosts:
            d = os.path.join(STATE, f"sentinel-{h}")
            os.makedirs(d)
            conf = os.path.join(d, "sentinel.conf")
            with open(conf, "w") as f:
                f.write(f"port 26379\nbind {addr(h)}\nprotected-mode no\ndir {d}\n"
                        f"sentinel monitor {self.MASTER} {addr(primary_host)} 6379 2\n"
                        f"sentinel down-after-milliseconds {self.MASTER} 1000\n"
                        f"sentinel failover-timeout {self.MASTER} 10000\n")
            self.procs[f"sentinel-{h}"] = spawn(h, "redis-server", conf, "--sentinel", name=f"sentinel-{h}")
        wait_for("the replica in sync", lambda: self.info(replica_host, "replication").get("master_link_status") == "up")
        wait_for("every Sentinel to know the replica and the others",
                 lambda: all(self.sentinel_view(h) for h in self.sentinel_hosts), timeout=60)

    def url(self, password=None):
        auth = f":{password}@" if password else ""
        return "redis-sentinel://" + auth + ",".join(f"{addr(h)}:26379" for h in self.sentinel_hosts) + "/" + self.MASTER

    @staticmethod
    def info(h, section, port=6379):
        import redis
        try:
            return redis.Redis(host=addr(h), port=port, socket_timeout=2).info(section)
        except redis.RedisError:
            return {}

    def sentinel_view(self, h):
        """True once the Sentinel on h knows one replica and two other Sentinels."""
        import redis
        try:
            m = redis.Redis(host=addr(h), port=26379, socket_timeout=2).execute_command("SENTINEL", "MASTER", self.MASTER)
        except redis.RedisError:
            return False
        d = dict(zip(m[::2], m[1::2]))
        return int(d.get(b"num-slaves", 0)) >= 1 and int(d.get(b"num-other-sentinels", 0)) >= 2

    def primary(self):
        """The (address, port) the Sentinels name now."""
        import redis
        for h in self.sentinel_hosts:
            try:
                a = redis.Redis(host=addr(h), port=26379, socket_timeout=2).execute_command(
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.MASTER)
                if a:
                    return a[0].decode(), int(a[1])
            except redis.RedisError:
                pass
        return None

    def kill(self, h):
        self.procs[h].send_signal(signal.SIGKILL)
        self.procs[h].wait(10)


def metric(host, port, name, **labels):
    """The sum of metric `name` (with these labels) on the pool listening at host:port."""
    import urllib.request
    text = urllib.request.urlopen(f"http://{addr(host)}:{port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


__all__ = ["LOG_DIR", "Postgres", "RabbitCluster", "RedisSentinel", "addr", "hosts", "metric", "on", "run_on",
           "setup", "spawn", "teardown", "wait_for"]
