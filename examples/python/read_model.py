#!/usr/bin/python3
"""A read model kept by a durable subscription: the stock of every product, in
the subscriber's OWN PostgreSQL, each event applied exactly once.

It runs `conveyor-subscribe --name NAME --acks 'product.*' 'stock.*'` and reads
one event per line. For each event, in ONE transaction of its own database, it
calls conveyor.consume(NAME, event id) (the inbox: true the first time, false
for a copy) and applies the event to public.stock_view only when that returned
true; it commits, and only then answers `ack ID` on the subscriber's stdin. A
failure rolls the transaction back and answers `nack ID REASON`: the subscription
hands the event out again later (after --max-attempts, to its dead letters), and
the later events of that product wait behind it. A crash anywhere loses nothing
(an event not acked is delivered again) and repeats nothing (the inbox drops the
copy of one already committed). Events of one product come in commit order.

What it keeps (docs/contract.md §2):
    product.created {productId, stock, ...}   a row with that stock
    stock.updated   {productId, stock, ...}   its stock (updateStock)
    stock.low       {productId, stock, ...}   its stock (updateStock, placeOrder)
    stock.depleted  {productId}               its stock is 0
    product.deleted {productId}               the row is removed
    product.updated                           nothing to change (consumed all the same)
An order changes stock too, announced by stock.* only when it crosses the low
threshold or reaches 0 (and cancelOrder gives it back with no stock event): a read
model that must follow orders subscribes to 'order.*' as well and keeps their items.

Before it runs, once (Debian: python3-psycopg2):
    conveyor-admin subscriber install --database "$READ_MODEL_DATABASE_URL"
The subscription is created by its first run (--from: where it starts, at creation
only; later runs go on where the last one stopped, whatever was published meanwhile).

    read_model.py [--config queues.conf] [--name stock-view] [--database URL]
                  [--from newest|oldest|TIME|EVENT_ID] [--bin conveyor-subscribe]
                  [--count N] [--idle-exit SECONDS]

--database defaults to $READ_MODEL_DATABASE_URL (the environment keeps a
password out of ps). --count N stops after N events
acked, --idle-exit after SECONDS with no event (for tests and demos). The last
line on stdout is a summary: {"handled", "applied", "duplicates", "nacked"}."""
import argparse
import json
import os
import select
import signal
import subprocess
import sys
import time

import psycopg2

SCHEMA = """CREATE TABLE IF NOT EXISTS public.stock_view (
    product_id    uuid PRIMARY KEY,
    stock         integer NOT NULL,
    last_event_id uuid NOT NULL,
    updated_at    timestamptz NOT NULL)"""
# the read model's own table, named with its schema: a role called conveyor would
# put an unqualified one in schema conveyor (search_path "$user", public)

UPSERT = """INSERT INTO public.stock_view (product_id, stock, last_event_id, updated_at)
VALUES (%s, %s, %s, %s)
ON CONFLICT (product_id) DO UPDATE SET stock = EXCLUDED.stock, last_event_id = EXCLUDED.last_event_id,
                                       updated_at = EXCLUDED.updated_at"""


def options():
    """The command line, parsed; exits 2 on a usage error (argparse)."""
    p = argparse.ArgumentParser(description="A stock read model kept by a durable Conveyor subscription.")
    p.add_argument("-c", "--config", default="queues.conf", help="Conveyor's queues.conf (default ./queues.conf)")
    p.add_argument("--name", default="stock-view", help="the subscription's name, and the inbox's (default stock-view)")
    p.add_argument("--database", default=os.environ.get("READ_MODEL_DATABASE_URL"),
                   help="the read model's PostgreSQL (default $READ_MODEL_DATABASE_URL)")
    p.add_argument("--from", dest="start", help="where a new subscription starts: newest, oldest, a time, an event id")
    p.add_argument("--bin", default="conveyor-subscribe", help="the conveyor-subscribe to run (default: on PATH)")
    p.add_argument("--count", type=int, help="stop after N events acked")
    p.add_argument("--idle-exit", type=float, help="stop after SECONDS with no event")
    o = p.parse_args()
    if not o.database:
        p.error("give --database URL or set READ_MODEL_DATABASE_URL")
    return o


def apply(cur, event):
    """Applies one event's effect to public.stock_view with cur (the caller's
    transaction). Returns nothing; raises KeyError on an event without the
    fields its type promises (the caller rolls back and nacks it)."""
    kind, data = event["type"], event["data"]
    if kind in ("product.created", "stock.updated", "stock.low", "stock.depleted"):
        stock = 0 if kind == "stock.depleted" else data["stock"]
        cur.execute(UPSERT, (data["productId"], stock, event["id"], event["occurredAt"]))
    elif kind == "product.deleted":
        cur.execute("DELETE FROM public.stock_view WHERE product_id = %s", (data["productId"],))
    # product.updated and other types: nothing in this read model changes


def handle(conn, name, event):
    """One event in one transaction of conn: the inbox's row and the effect
    commit together. Returns True when it was applied, False for a copy of an
    event already applied. Raises (after rolling back) when it could not be."""
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT conveyor.consume(%s, %s)", (name, event["id"]))
            first = cur.fetchone()[0]
            if first:
                apply(cur, event)
        conn.commit()
        return first
    except Exception:
        if not conn.closed:
            conn.rollback()
        raise


class Lines:
    """The lines a pipe's file descriptor gives, each as str without its newline."""

    def __init__(self, pipe):
        self.fd, self.buf, self.eof = pipe.fileno(), b"", False

    def next(self, timeout):
        """The next line; None at the end of the stream; "" after timeout seconds
        (None: no limit) with no whole line."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buf:
            if self.eof:
                return None
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.fd], [], [], left)[0]:
                return ""
            chunk = os.read(self.fd, 65536)
            self.eof = not chunk
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


def answer(proc, line):
    """Writes one answer (`ack ID`, `nack ID REASON`) to the subscriber's stdin.
    Returns False when the subscriber has gone (its stdin is closed)."""
    try:
        proc.stdin.write((line + "\n").encode())
        proc.stdin.flush()
        return True
    except (BrokenPipeError, OSError):
        return False


def stop(proc):
    """Ends the subscriber: closes its stdin (every answer is written by then) and
    waits for it; SIGTERM if it has not exited 10 s later. Returns its exit status."""
    try:
        proc.stdin.close()
    except OSError:
        pass
    try:
        return proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.terminate()
        return proc.wait(30)


def main():
    """Runs the subscriber and handles its events until --count, --idle-exit, a
    signal, or the subscriber's own exit. Returns the exit status: 0, or the
    subscriber's when it stopped by itself (2 usage or configuration, 3 a server
    unreachable), 2 when it cannot be run. Raises when the read model's database
    cannot be reached at the start."""
    o = options()
    conn = psycopg2.connect(o.database)
    with conn, conn.cursor() as cur:
        cur.execute(SCHEMA)
    cmd = [o.bin, "-c", o.config, "--name", o.name, "--acks"]
    if o.start:
        cmd += ["--from", o.start]
    cmd += ["product.*", "stock.*"]
    # its stderr is ours: its log lines, and why it stopped
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    except OSError as e:
        print(f"read_model: cannot run {o.bin}: {e.strerror} (give its path with --bin)", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):  # stop as after --count: the finally below
        signal.signal(sig, lambda *_: sys.exit(0))
    counts = {"handled": 0, "applied": 0, "duplicates": 0, "nacked": 0}
    lines, status = Lines(proc.stdout), 0  # status: the subscriber's, when it stopped by itself
    try:
        while o.count is None or counts["handled"] < o.count:
            line = lines.next(o.idle_exit)
            if line is None:  # the subscriber stopped by itself
                status = proc.wait()
                print(f"read_model: conveyor-subscribe exited {status}", file=sys.stderr)
                break
            if line == "":
                print(f"read_model: no event for {o.idle_exit:g} s; stopping", file=sys.stderr)
                break
            event = json.loads(line)
            try:
                if conn.closed:  # lost with the database: a new connection for this event
                    conn = psycopg2.connect(o.database)
                applied = handle(conn, o.name, event)
            except Exception as e:  # rolled back: the subscription hands it out again later
                reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
                print(f"read_model: {event['type']} {event['id']} failed: {reason}", file=sys.stderr)
                counts["nacked"] += 1
                if not answer(proc, f"nack {event['id']} {reason}"):
                    break
                continue
            if not answer(proc, f"ack {event['id']}"):  # committed: a copy would be a duplicate now
                break
            counts["handled"] += 1
            counts["applied" if applied else "duplicates"] += 1
            print(f"{event['type']} {event['id']} {'applied' if applied else 'duplicate'}", flush=True)
    finally:
        if proc.poll() is None:
            stop(proc)
        conn.close()
        print(json.dumps(counts), flush=True)
    # 0: stopped by --count, --idle-exit or a signal; else the status of a subscriber
    # that stopped by itself (2 usage or configuration, 3 unreachable)
    return status


if __name__ == "__main__":
    sys.exit(main())
