"""PostgreSQL servers a test makes for itself on loopback: each on a free port
of 127.0.0.1, its data and socket under a temporary folder of its own (removed
by remove()), run as the postgres user (initdb, pg_basebackup, pg_ctl, as
cluster.Postgres does on the test hosts). No network namespace: for tests that
need a primary and a standby but no fault between machines."""
import os
import shutil
import subprocess
import tempfile

import psycopg2

from cluster import PG_BIN, as_postgres, wait_for
from harness import free_port


class LocalPostgres:
    """A primary (trusting loopback, replication allowed), or with primary a
    standby streaming from it (pg_basebackup -R, asynchronous)."""

    def __init__(self, primary=None, name="pg"):
        self.name, self.port = name, free_port()
        self.root = tempfile.mkdtemp(prefix=f"conveyor-{name}-", dir="/var/tmp")
        self.dir, sock = os.path.join(self.root, "data"), os.path.join(self.root, "sock")
        os.makedirs(self.dir, mode=0o700)
        os.makedirs(sock)
        subprocess.run(["chown", "-R", "postgres:postgres", self.root], check=True)
        self.url = f"postgresql://conveyor@127.0.0.1:{self.port}/conveyor"
        if primary is None:
            as_postgres(f"{PG_BIN}/initdb", "-D", self.dir, "-U", "conveyor", "--auth=trust", "-E", "UTF8",
                        "--locale=C.UTF-8")
            with open(os.path.join(self.dir, "pg_hba.conf"), "w") as f:
                f.write("local all all trust\nhost all all 127.0.0.1/32 trust\n"
                        "host replication all 127.0.0.1/32 trust\n")
        else:
            as_postgres(f"{PG_BIN}/pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port), "-U", "conveyor",
                        "-D", self.dir, "-X", "stream", "-R", "-c", "fast")
            with open(os.path.join(self.dir, "postgresql.auto.conf"), "a") as f:
                f.write(f"primary_conninfo = 'host=127.0.0.1 port={primary.port} user=conveyor "
                        f"application_name={name}'\n")
        with open(os.path.join(self.dir, "postgresql.conf"), "a") as f:
            f.write(f"listen_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = '{sock}'\n"
                    "wal_level = replica\nmax_wal_senders = 4\nfsync = off\nmax_connections = 100\n")
        self.pg_ctl("start")
        if primary is None:
            self.query("CREATE DATABASE conveyor", db="postgres")
        else:
            wait_for(f"{name} streaming from {primary.name}", lambda: primary.query(
                "SELECT state FROM pg_stat_replication WHERE application_name = %s", name) == [("streaming",)])

    def pg_ctl(self, *args):
        return as_postgres(f"{PG_BIN}/pg_ctl", "-w", "-t", "60", "-D", self.dir, "-l",
                           os.path.join(self.root, "server.log"), *args)

    def query(self, sql, *args, db="conveyor"):
        c = psycopg2.connect(f"postgresql://conveyor@127.0.0.1:{self.port}/{db}", connect_timeout=5)
        try:
            c.autocommit = True
            cur = c.cursor()
            cur.execute(sql, args or None)
            return cur.fetchall() if cur.description else None
        finally:
            c.close()

    def timeline(self):
        """The timeline its WAL is written on now (a primary), or replayed (a standby)."""
        return self.query("SELECT CASE WHEN pg_is_in_recovery() THEN (SELECT received_tli FROM pg_stat_wal_receiver)"
                          " ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END")[0][0]

    def writable(self):
        return self.query("SELECT NOT pg_is_in_recovery()") == [(True,)]

    def remove(self):
        """Stops the server (immediately) if it runs, and removes its folder."""
        subprocess.run(["su", "postgres", "-s", "/bin/sh", "-c",
                        f"{PG_BIN}/pg_ctl -D '{self.dir}' -m immediate stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)
