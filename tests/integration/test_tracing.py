"""Tracing across systems (docs/contract.md §1, "Tracing"): a command that carries a
W3C traceparent (the envelope field, or on RabbitMQ the AMQP header of that name)
gives every event it causes the same trace-id and trace-flags with a new span id
(on RabbitMQ also as the event's AMQP header), and every pool log line about it
carries traceId. An invalid traceparent is ignored, never a reason to reject the
command; a command without one gives events without the field."""
import json
import re

import pika

import contract
from harness import (AMQP_URL, PUBLISHED, QUEUE_OF, TRANSPORT, Events, Pool, Publisher, check, envelope, eq, new_id,
                     query, run_bin)
from test_recovery import FAST_RETRY, chaos_trigger, product

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"
W3C = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


class EventHeaders:
    """RabbitMQ: the AMQP headers of every event published from now on, by event id."""

    def __init__(self):
        self.conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        self.ch = self.conn.channel()
        self.ch.exchange_declare("conveyor.events", "topic", durable=True)
        self.queue = self.ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
        self.ch.queue_bind(self.queue, "conveyor.events", "#")

    def of(self, event_ids):
        """{event id: headers} for every id of event_ids (already published)."""
        got = {}
        for _ in range(200):
            method, props, body = self.ch.basic_get(self.queue, auto_ack=True)
            if method is None:
                if set(event_ids) <= set(got):
                    break
                self.conn.sleep(0.05)
                continue
            got[json.loads(body)["id"]] = props.headers or {}
        check(set(event_ids) <= set(got), f"the AMQP headers of events {sorted(set(event_ids) - set(got))}")
        return {i: got[i] for i in event_ids}

    def close(self):
        self.conn.close()


def publish(pub, env, body_only=False, header=None):
    """Publishes env as a producer would, routed by type; on RabbitMQ with the
    AMQP header traceparent when header is given. body_only: not noted as a
    command that keeps the schemas (PUBLISHED), for a traceparent the schema
    refuses but the workers ignore."""
    if not body_only:
        PUBLISHED[env["id"]] = (env, contract.command_errors(env))
    body = json.dumps(env).encode()
    if TRANSPORT == "rabbitmq":
        props = pika.BasicProperties(delivery_mode=2, content_type="application/json", message_id=env["id"],
                                     headers={"traceparent": header} if header else None)
        pub.ch.basic_publish("conveyor.commands", env["type"], body, props, mandatory=True)
    else:
        check(header is None, "Redis has no headers")
        pub.r.lpush(f"conveyor:queue:{QUEUE_OF[env['type']]}", body)
    return env


def log_lines(pool, command_id):
    """The pool's JSON log lines about command_id."""
    out = []
    for line in pool.read_log().splitlines():
        try:
            o = json.loads(line)
        except ValueError:
            continue
        if o.get("commandId") == command_id:
            out.append(o)
    return out


def check_traced(events, trace_id, parent_id, flags, pool, headers=None):
    """Every event has traceparent 00-<trace_id>-<a new span>-<flags> (spans
    distinct, none the command's parent id), on RabbitMQ also as its AMQP header;
    every log line about the command carries traceId."""
    spans = []
    for ev in events:
        m = W3C.match(ev.get("traceparent", ""))
        check(m, f"{ev['type']} has a W3C traceparent: {json.dumps(ev)}")
        eq((m.group(1), m.group(3)), (trace_id, flags), f"{ev['type']}'s trace-id and flags")
        check(m.group(2) != parent_id, f"{ev['type']} has a span id of its own, not the command's parent id")
        spans.append(m.group(2))
    eq(len(set(spans)), len(spans), "each event has a new span id")
    if headers is not None:
        for ev in events:
            eq(headers[ev["id"]].get("traceparent"), ev["traceparent"], f"{ev['type']}'s AMQP header traceparent")
    cid = events[0]["commandId"]
    lines = log_lines(pool, cid)
    check(lines, f"debug log lines about command {cid}")
    for line in lines:
        eq(line.get("traceId"), trace_id, f"traceId of the log line {json.dumps(line)}")


def check_untraced(events, pool, headers=None):
    for ev in events:
        check("traceparent" not in ev, f"{ev['type']} of an untraced command has no traceparent: {json.dumps(ev)}")
        if headers is not None:
            check("traceparent" not in headers[ev["id"]], f"{ev['type']} has no traceparent header")
    cid = events[0]["commandId"]
    lines = log_lines(pool, cid)
    check(lines, f"debug log lines about command {cid}")
    for line in lines:
        check("traceId" not in line, f"no traceId without a trace: {json.dumps(line)}")


def test_events_and_logs_carry_the_commands_trace():
    with Pool(workers={"catalog": 1}, env={"CONVEYOR_LOG_LEVEL": "debug"}) as pool:
        pub, ev = Publisher(), Events()
        hdrs = EventHeaders() if TRANSPORT == "rabbitmq" else None
        pid = new_id()
        create = envelope("createProduct", {"productId": pid, "name": "Traced", "price": "2.00", "stock": 20})
        create["traceparent"] = f"00-{TRACE}-{PARENT}-01"
        publish(pub, create)
        res = ev.wait_result(create["id"])
        eq([e["type"] for e in res], ["product.created"], "applied")
        check_traced(res, TRACE, PARENT, "01", pool, hdrs.of([e["id"] for e in res]) if hdrs else None)

        # one command, several events: stock 20 -> 5 gives stock.updated and stock.low
        trace2, parent2 = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        update = envelope("updateStock", {"productId": pid, "quantityChange": -15})
        update["traceparent"] = f"00-{trace2}-{parent2}-00"
        publish(pub, update)
        res = ev.wait_result(update["id"], count=2)
        eq(sorted(e["type"] for e in res), ["stock.low", "stock.updated"], "two events")
        check_traced(res, trace2, parent2, "00", pool, hdrs.of([e["id"] for e in res]) if hdrs else None)
        eq(query("SELECT stock FROM products WHERE id = %s", pid), [(5,)], "applied once")
        if hdrs:
            hdrs.close()
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")


def test_rabbitmq_header_gives_the_trace():
    """On RabbitMQ the AMQP header traceparent, when the body has none; the
    envelope field wins when both are valid. (Redis has no headers: there the
    field alone carries it, and a header-only command is the untraced case.)"""
    with Pool(workers={"catalog": 1}, env={"CONVEYOR_LOG_LEVEL": "debug"}) as pool:
        pub, ev = Publisher(), Events()
        pid = new_id()
        create = envelope("createProduct", {"productId": pid, "name": "Header", "price": 1, "stock": 12})
        if TRANSPORT == "rabbitmq":
            hdrs = EventHeaders()
            publish(pub, create, header=f"00-{TRACE}-{PARENT}-01")
            res = ev.wait_result(create["id"])
            check_traced(res, TRACE, PARENT, "01", pool, hdrs.of([e["id"] for e in res]))
            # both: the field's trace
            trace2, parent2 = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
            update = envelope("updateStock", {"productId": pid, "quantityChange": -3})
            update["traceparent"] = f"00-{trace2}-{parent2}-01"
            publish(pub, update, header=f"00-{TRACE}-{PARENT}-01")
            res = ev.wait_result(update["id"], count=2)
            eq(sorted(e["type"] for e in res), ["stock.low", "stock.updated"], "two events")
            check_traced(res, trace2, parent2, "01", pool, hdrs.of([e["id"] for e in res]))
            # an invalid field: the header's
            update = envelope("updateStock", {"productId": pid, "quantityChange": 1})
            update["traceparent"] = f"00-{trace2.upper()}-{parent2}-01"
            publish(pub, update, body_only=True, header=f"00-{TRACE}-{PARENT}-01")
            res = ev.wait_result(update["id"])
            check_traced(res, TRACE, PARENT, "01", pool, hdrs.of([e["id"] for e in res]))
            hdrs.close()
        else:
            publish(pub, create)
            res = ev.wait_result(create["id"])
            eq(res[0]["type"], "product.created", "applied")
            check_untraced(res, pool)
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")


def test_invalid_or_absent_traceparent_is_ignored():
    invalid = [
        f"00-{TRACE.upper()}-{PARENT}-01",       # upper case
        f"ff-{TRACE}-{PARENT}-01",               # version ff
        f"00-{'0' * 32}-{PARENT}-01",            # all-zero trace-id
        f"00-{TRACE}-{'0' * 16}-01",             # all-zero parent-id
        f"00-{TRACE}-{PARENT}-01-extra",         # version 00 is exactly 55 characters
        f"00-{TRACE}-{PARENT}",                  # no flags
        "",
        42,
        {"traceId": TRACE},
    ]
    with Pool(workers={"catalog": 1}, env={"CONVEYOR_LOG_LEVEL": "debug"}) as pool:
        pub, ev = Publisher(), Events()
        pid = new_id()
        plain = publish(pub, envelope("createProduct", {"productId": pid, "name": "Untraced", "price": 1, "stock": 20}))
        res = ev.wait_result(plain["id"])
        eq(res[0]["type"], "product.created", "applied")
        check_untraced(res, pool)
        plain = publish(pub, envelope("updateStock", {"productId": pid, "quantityChange": -15}))
        res = ev.wait_result(plain["id"], count=2)
        eq(sorted(e["type"] for e in res), ["stock.low", "stock.updated"], "applied")
        check_untraced(res, pool)
        sent = []
        for value in invalid:
            cmd = envelope("createProduct", {"name": "Badly traced", "price": 1, "stock": 50})
            cmd["traceparent"] = value
            # the schema states the W3C form; the workers ignore what breaks it
            errs = contract.command_errors(cmd)
            check(errs and all(e.startswith("command.schema.json: traceparent:") for e in errs),
                  f"only traceparent breaks the schema: {errs}")
            sent.append(publish(pub, cmd, body_only=True))
        hdrs = EventHeaders() if TRANSPORT == "rabbitmq" else None
        for cmd in sent:
            res = ev.wait_result(cmd["id"])
            eq(res[0]["type"], "product.created", f"applied despite traceparent {cmd['traceparent']!r}")
            eq(query("SELECT name FROM products WHERE id = %s", res[0]["aggregateId"]), [("Badly traced",)],
               "stored")
            check_untraced(res, pool)
            check(any("traceparent ignored (envelope field)" in line["msg"] for line in log_lines(pool, cmd["id"])),
                  f"a debug line says traceparent {cmd['traceparent']!r} was ignored")
        if hdrs:  # an invalid header, no field: untraced, and no header on the event
            cmd = publish(pub, envelope("createProduct", {"name": "Bad header", "price": 1, "stock": 50}),
                          header=f"ff-{TRACE}-{PARENT}-01")
            res = ev.wait_result(cmd["id"])
            eq(res[0]["type"], "product.created", "applied despite the header")
            check_untraced(res, pool, hdrs.of([e["id"] for e in res]))
            hdrs.close()
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")


def test_retried_command_keeps_its_trace():
    """A command that fails transiently twice keeps its trace through the delay
    (on RabbitMQ given by the header alone, which must go along with the message):
    its retry log lines and its event carry it."""
    with chaos_trigger(), Pool(extra=FAST_RETRY, env={"CONVEYOR_LOG_LEVEL": "debug"}) as pool:
        pub, ev = Publisher(), Events()
        hdrs = EventHeaders() if TRANSPORT == "rabbitmq" else None
        pid = product("flaky")
        cmd = envelope("updateStock", {"productId": pid, "quantityChange": -1})
        if hdrs:
            publish(pub, cmd, header=f"00-{TRACE}-{PARENT}-01")
        else:
            cmd["traceparent"] = f"00-{TRACE}-{PARENT}-01"
            publish(pub, cmd)
        res = ev.wait_result(cmd["id"], timeout=20)
        eq(res[0]["type"], "stock.updated", "applied on the third attempt")
        retries = [line for line in log_lines(pool, cmd["id"]) if "failed" in line["msg"]]
        eq(len(retries), 2, "two failed attempts logged")
        check_traced(res, TRACE, PARENT, "01", pool, hdrs.of([e["id"] for e in res]) if hdrs else None)
        if hdrs:
            hdrs.close()
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")


def test_conveyor_produce_sets_the_traceparent():
    with Pool(workers={"catalog": 1}) as pool:
        tp = f"00-{TRACE}-{PARENT}-01"
        payload = json.dumps({"name": "Produced", "price": 1, "stock": 40})
        r = run_bin("conveyor-produce", "-c", pool.config, "--wait", "--traceparent", tp, "--correlation-id", "c-7",
                    "createProduct", payload)
        eq(r.returncode, 0, f"published and applied (stderr: {r.stderr})")
        ev = json.loads(r.stdout.splitlines()[-1])
        eq((ev["type"], ev["correlationId"]), ("product.created", "c-7"), "the result event")
        m = W3C.match(ev.get("traceparent", ""))
        check(m and m.group(1) == TRACE and m.group(2) != PARENT and m.group(3) == "01",
              f"the event is a new span of the trace: {ev.get('traceparent')}")
        r = run_bin("conveyor-produce", "-c", pool.config, "--traceparent", tp.upper(), "createProduct", payload)
        eq(r.returncode, 2, "an invalid --traceparent is a usage error")
        check("--traceparent" in r.stderr and "hex" in r.stderr, f"it says why: {r.stderr}")
        eq(r.stdout, "", "nothing sent")
        eq(pool.stop(), (0, []), "clean stop")
