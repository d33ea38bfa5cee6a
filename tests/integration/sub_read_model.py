#!/usr/bin/python3
"""A read-model subscriber for test_subscriptions (not a test module): keeps the
stock per product in its own PostgreSQL with the inbox (docs/contract.md §12),
reading the durable subscription NAME through `conveyor-subscribe --name NAME
--acks 'stock.*'` (§13).

    sub_read_model.py NAME DATABASE_URL TAG

Per event, one transaction: conveyor.consume(NAME, event id); only when it is
true, the product's row in read_stock takes the event's data.stock and a row of
applied records the order (its seq, from a sequence, taken in that
transaction), the event id and TAG (which process applied it). The event is
acknowledged (`ack ID` on conveyor-subscribe's stdin) only after the commit: a
kill between the commit and the ack redelivers it, and consume's false keeps it
from being applied twice. The subscriber's database must have the inbox
(`conveyor-admin subscriber install`) and the tables of SCHEMA.

Exits with conveyor-subscribe's exit status once its stdout ends (SIGTERM is
passed on to it: the test stops the process group); 1 when an event cannot be
applied (its error on stderr)."""
import json
import os
import signal
import subprocess
import sys

import psycopg2

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("CONVEYOR_BIN_DIR", os.path.join(ROOT, "build"))

SCHEMA = """
CREATE TABLE public.read_stock (product_id uuid PRIMARY KEY, stock integer NOT NULL);
CREATE TABLE public.applied (seq bigserial PRIMARY KEY, product_id uuid NOT NULL, event_id uuid NOT NULL UNIQUE,
                             tag text NOT NULL);
"""


def apply(conn, name, ev, tag):
    """The event's effect and its dedup in one transaction; True when applied,
    False for a duplicate. Raises psycopg2's errors (the transaction rolled back)."""
    with conn:
        with conn.cursor() as cur:
            cur.execute("SELECT conveyor.consume(%s, %s)", (name, ev["id"]))
            if not cur.fetchone()[0]:
                return False
            if ev["type"] == "stock.updated":
                cur.execute("INSERT INTO public.read_stock VALUES (%s, %s) "
                            "ON CONFLICT (product_id) DO UPDATE SET stock = EXCLUDED.stock",
                            (ev["data"]["productId"], ev["data"]["stock"]))
            cur.execute("INSERT INTO public.applied (product_id, event_id, tag) VALUES (%s, %s, %s)",
                        (ev["aggregateId"], ev["id"], tag))
            return True


def main():
    if len(sys.argv) != 4:
        print("usage: sub_read_model.py NAME DATABASE_URL TAG", file=sys.stderr)
        return 2
    name, url, tag = sys.argv[1:]
    conn = psycopg2.connect(url)
    sub = subprocess.Popen([os.path.join(BIN, "conveyor-subscribe"), "-c", os.path.join(ROOT, "queues.conf"),
                            "--name", name, "--acks", "stock.*"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True, bufsize=1)
    signal.signal(signal.SIGTERM, lambda *_: sub.send_signal(signal.SIGTERM))
    for line in sub.stdout:
        ev = json.loads(line)
        try:
            apply(conn, name, ev, tag)
        except psycopg2.Error as e:
            print(f"sub_read_model: event {ev.get('id')}: {e}", file=sys.stderr)
            sub.kill()
            return 1
        try:
            sub.stdin.write(f"ack {ev['id']}\n")
            sub.stdin.flush()
        except BrokenPipeError:  # it stopped: what was not acknowledged comes again
            break
    return sub.wait()


if __name__ == "__main__":
    sys.exit(main())
