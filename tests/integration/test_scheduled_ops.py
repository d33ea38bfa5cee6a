"""What an operator sees and does with the commands that wait for their time
(issue 23, operations): conveyor-admin scheduled list (counts, next due,
pages, --json) and scheduled cancel (one command.rejected CANCELLED through
the outbox and the relay, the dedup row 'rejected'; a second cancel and an
unknown id refused with exit 1), conveyor-admin schedules (list, pause and
resume; an unknown name is exit 2, as an unknown queue is), stats' parked
column, the /metrics families and the dashboard's API. The parked rows are
the test's own, due a day from now: no timekeeper publishes them meanwhile."""
import json
import os

from harness import (ROOT, TRANSPORT, Events, Publisher, check, envelope, eq, http_pool, new_id, query,
                     run_bin)
from test_dashboard import TOKEN, act, get, request, wait_for
from test_metrics import scrape, value

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def admin(*args, env=None):
    return run_bin("conveyor-admin", "-c", os.path.join(ROOT, "queues.conf"), *args, env=env)


def park(queue, type_, payload, minutes, reason="delayed", schedule=None, correlation_id=None):
    """A parked row, due a day and `minutes` from now, whose message is a real envelope; its id."""
    env = envelope(type_, payload, correlation_id=correlation_id)
    env["traceparent"] = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
    query("INSERT INTO parked_commands (id, queue, type, due_at, envelope, reason, schedule) "
          "VALUES (%s, %s, %s, now() + interval '1 day' + make_interval(mins => %s), %s, %s, %s)",
          env["id"], queue, type_, minutes, json.dumps(env), reason, schedule)
    return env["id"]


def clean():
    query("DELETE FROM parked_commands")
    query("DELETE FROM schedules")


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_scheduled_list_counts_pages_and_json():
    clean()
    try:
        catalog = [park("catalog", "createProduct", {"name": f"later {i}", "price": 1}, i) for i in range(5)]
        nightly = park("orders", "cancelOrder", {"orderId": new_id()}, 30, reason="schedule", schedule="nightly")
        r = admin("--json", "scheduled", "list")
        eq(r.returncode, 0, f"scheduled list exit status ({r.stderr})")
        lines = json_lines(r.stdout)
        counts = {o["queue"]: o for o in lines if o["kind"] == "queue"}
        eq(sorted(counts), ["catalog", "orders", "users"], "a count for every queue of the configuration")
        eq({q: o["parked"] for q, o in counts.items()}, {"catalog": 5, "orders": 1, "users": 0}, "the counts")
        eq(counts["users"]["nextDueAt"], None, "no next due time without a parked command")
        rows = [o for o in lines if o["kind"] == "parked"]
        eq([o["id"] for o in rows], catalog + [nightly], "every row, by due time")
        eq(set(rows[0]), {"kind", "id", "queue", "type", "reason", "schedule", "dueAt", "parkedAt"}, "a row's fields")
        eq(counts["catalog"]["nextDueAt"], rows[0]["dueAt"], "the next due time is the first row's")
        eq((rows[-1]["reason"], rows[-1]["schedule"], rows[-1]["queue"]), ("schedule", "nightly", "orders"),
           "a schedule's row names it")
        check("nextCursor" not in rows[-1], "one page: no cursor")
        # a page at a time: every row once, in order, the cursor on stderr (and on the JSON's last row)
        seen, cursor = [], None
        for _ in range(5):
            args = ["--json", "scheduled", "list", "catalog", "--limit", "2"] + (["--cursor", cursor] if cursor else [])
            r = admin(*args)
            eq(r.returncode, 0, f"a page ({r.stderr})")
            lines = json_lines(r.stdout)
            eq([o["queue"] for o in lines if o["kind"] == "queue"], ["catalog"], "the one queue's count")
            page = [o for o in lines if o["kind"] == "parked"]
            seen += [o["id"] for o in page]
            cursor = page[-1].get("nextCursor") if page else None
            if not cursor:
                break
            check(f"--cursor {cursor}" in r.stderr, f"the next page's cursor on stderr: {r.stderr}")
        eq(seen, catalog, "the pages hold every catalog row once, in due order")
        r = admin("scheduled", "list")
        eq(r.returncode, 0, "the table")
        check("PARKED" in r.stdout and "NEXT DUE" in r.stdout and nightly in r.stdout and "nightly" in r.stdout,
              f"the table shows the counts and the rows: {r.stdout}")
        r = admin("stats", "--json")
        stats = {o["queue"]: o for o in json_lines(r.stdout) if o["kind"] == "queue"}
        eq({q: o["parked"] for q, o in stats.items()}, {"catalog": 5, "orders": 1, "users": 0}, "stats' parked")
        check(" PARKED " in admin("stats").stdout, "stats' table has the column")
        for args, why in ((["scheduled", "list", "nosuch"], "an unknown queue"),
                          (["scheduled", "list", "--limit", "0"], "a limit below 1"),
                          (["scheduled", "list", "--limit", "1001"], "a limit above 1000"),
                          (["scheduled", "list", "--cursor", "nonsense"], "a cursor it did not give"),
                          (["scheduled", "list", "catalog", "users"], "two queues")):
            r = admin(*args)
            eq(r.returncode, 2, f"{why}: exit status ({r.stderr})")
            eq(r.stdout, "", f"{why}: nothing on stdout")
    finally:
        clean()


def test_cancel_ends_in_one_cancelled_rejection_then_refuses():
    clean()
    with http_pool(token=TOKEN) as pool:
        ev, pub = Events(), Publisher()
        try:
            cid = park("catalog", "createProduct", {"name": "never", "price": 1}, 1, correlation_id="order-77")
            other = park("catalog", "createProduct", {"name": "stays", "price": 1}, 2)
            r = admin("scheduled", "cancel", cid.upper())
            eq(r.returncode, 0, f"cancel exit status ({r.stderr})")
            check(f"cancelled {cid}" in r.stdout, f"says what it did: {r.stdout}")
            check(any(json.loads(line)["msg"].startswith(f"parked command {cid} (createProduct, queue catalog) "
                                                         "cancelled by ")
                      for line in r.stderr.splitlines() if line.startswith("{")), f"logged with who: {r.stderr}")
            eq(query("SELECT count(*) FROM parked_commands WHERE id = %s", cid)[0][0], 0, "the row is gone")
            eq(query("SELECT count(*) FROM parked_commands WHERE id = %s", other)[0][0], 1, "the other row stays")
            eq(query("SELECT type, outcome FROM processed_commands WHERE id = %s", cid), [("createProduct", "rejected")],
               "the dedup row: rejected")
            got = ev.wait_result(cid)
            eq(got[0]["type"], "command.rejected", "the result event")
            eq(got[0]["data"], {"code": "CANCELLED", "message": "cancelled by an operator before its time"}, "its data")
            eq((got[0]["commandType"], got[0]["aggregateId"], got[0]["correlationId"]),
               ("createProduct", cid, "order-77"), "the command's type, id and correlationId")
            check(got[0].get("traceparent", "").startswith(f"00-{TRACE_ID}-"), f"the command's trace: {got[0]}")
            # a command published after the cancel: once its result is here, the relay went past the cancel's event
            later = pub.command(envelope("createProduct", {"name": "after the cancel", "price": 1}))["id"]
            ev.wait_result(later)
            eq(len(ev.for_command(cid)), 1, "exactly one event for the cancelled command")
            eq(query("SELECT count(*) FROM products WHERE name = 'never'")[0][0], 0, "it never ran")
            r = admin("scheduled", "cancel", cid)
            eq(r.returncode, 1, f"a second cancel: exit status ({r.stderr})")
            check("already ran (rejected at " in r.stderr and "nothing cancelled" in r.stderr, f"says why: {r.stderr}")
            r = admin("--json", "scheduled", "cancel", later)
            eq(r.returncode, 1, "a command that ran: exit status")
            o = json.loads(r.stdout)
            eq((o["outcome"], o["ranOutcome"], o["type"]), ("already ran", "applied", "createProduct"), "--json says so")
            check(o["processedAt"].endswith("Z"), f"and when: {o}")
            unknown = new_id()
            r = admin("scheduled", "cancel", unknown)
            eq(r.returncode, 1, "an unknown id: exit status")
            check(f"no parked command with id {unknown}" in r.stderr and "on its way in a queue" in r.stderr,
                  f"says it may be on its way: {r.stderr}")
            eq(query("SELECT count(*) FROM processed_commands WHERE id = %s", unknown)[0][0], 0, "nothing recorded")
            for args in (["scheduled", "cancel", "not-an-id"], ["scheduled", "cancel"], ["scheduled", "cancel", cid, "x"],
                         ["scheduled"], ["scheduled", "stop", cid]):
                eq(admin(*args).returncode, 2, f"{args}: exit status")
            # the dashboard's cancel: the token and the origin, then the same outcome
            status, _, body = act(pool, "/api/scheduled/cancel", {"id": other}, token=None)
            eq(status, 401, f"without the token ({body})")
            status, _, body = act(pool, "/api/scheduled/cancel", {"id": other})
            eq(status, 200, f"the dashboard's cancel ({body})")
            eq((body["outcome"], body["queue"]), ("cancelled", "catalog"), "its answer")
            eq(ev.wait_result(other)[0]["data"]["code"], "CANCELLED", "its event")
            status, _, body = act(pool, "/api/scheduled/cancel", {"id": other})
            eq(status, 404, "a second cancel from the dashboard")
            check("already ran" in body["error"], f"says why: {body}")
            status, _, body = act(pool, "/api/scheduled/cancel", {"id": "x"})
            eq(status, 400, f"not an id ({body})")
        finally:
            ev.close()
            pub.close()
            clean()
        eq(pool.stop(), (0, []), "clean stop")


def test_schedules_without_any_list_and_refuse_an_unknown_name():
    """The configuration has no schedules: the list is empty, a row the table
    holds for a schedule no longer configured is not shown, and pause or resume
    of a name the configuration lacks is exit 2 naming it (as `queue pause` of
    an unknown queue), the table untouched."""
    clean()
    try:
        query("INSERT INTO schedules (name, paused, fired) VALUES ('gone', true, 3)")
        for args in (["schedules"], ["schedules", "list"]):
            r = admin(*args)
            eq(r.returncode, 0, f"{args} exit status ({r.stderr})")
            check("SCHEDULE" in r.stdout and "no schedules in" in r.stdout and "gone" not in r.stdout,
                  f"{args}: the table, empty: {r.stdout}")
        r = admin("--json", "schedules")
        eq((r.returncode, r.stdout), (0, ""), "--json: no line")
        for verb in ("pause", "resume"):
            r = admin("schedules", verb, "nosuch")
            eq(r.returncode, 2, f"{verb} of an unknown name: exit status")
            check("no schedule 'nosuch'" in r.stderr, f"names it: {r.stderr}")
        eq(query("SELECT name, paused FROM schedules"), [("gone", True)], "the table untouched")
        for args in (["schedules", "pause"], ["schedules", "stop", "x"], ["schedules", "pause", "a", "b"],
                     ["schedules", "list", "x"], ["schedules", "--limit", "3"]):
            r = admin(*args)
            eq(r.returncode, 2, f"{args}: exit status")
            check("usage:" in r.stderr, f"{args}: the usage: {r.stderr}")
        r = admin("--help")
        for line in ("scheduled list [QUEUE] [--limit N] [--cursor C]", "scheduled cancel ID",
                     "schedules [list]", "schedules pause NAME", "schedules resume NAME"):
            check(line in r.stdout, f"--help lists '{line}': {r.stdout}")
    finally:
        clean()


def test_metrics_and_dashboard_show_what_is_parked():
    clean()
    with http_pool(token=TOKEN) as pool:
        try:
            wait_for("the listener", lambda: request(pool, "GET", "/readyz")[0] == 200)
            samples, types = scrape(pool)
            for q in ("users", "catalog", "orders"):  # every label set from the start
                eq(value(samples, "conveyor_scheduled_commands", queue=q), 0.0, f"nothing parked in {q}")
                eq(value(samples, "conveyor_scheduled_next_due_timestamp_seconds", queue=q), 0.0, "0 when none")
            eq(types["conveyor_scheduled_commands"], "gauge", "a gauge")
            for fam in ("conveyor_schedule_last_slot_timestamp_seconds", "conveyor_schedule_fired",
                        "conveyor_schedule_missed"):
                check(fam in types, f"the family {fam} is there (no schedule configured: no sample)")
            eq(types["conveyor_schedule_fired"], "counter", "fired: a counter")
            ids = [park("orders", "cancelOrder", {"orderId": new_id()}, i) for i in range(3)]
            first_due = query("SELECT extract(epoch FROM min(due_at))::float8 FROM parked_commands")[0][0]

            def counted():
                s, _ = scrape(pool)
                return value(s, "conveyor_scheduled_commands", queue="orders") == 3.0 and s

            samples = wait_for("the parked count in /metrics", counted, timeout=40)
            check(abs(value(samples, "conveyor_scheduled_next_due_timestamp_seconds", queue="orders") - first_due)
                  < 0.002, "the next due time is the first row's")
            eq(value(samples, "conveyor_scheduled_commands", queue="catalog"), 0.0, "the others stay 0")
            d = wait_for("the counts in /api/scheduled", lambda: (lambda b: {q["queue"]: q["parked"] for q in b["queues"]}
                                                                 ["orders"] == 3 and b)(get(pool, "/api/scheduled")),
                         timeout=40)
            eq(sorted(q["queue"] for q in d["queues"]), ["catalog", "orders", "users"], "every queue")
            eq([r["id"] for r in d["rows"]], ids, "the first rows, by due time")
            eq(d["nextCursor"], None, "one page")
            one = get(pool, "/api/scheduled?queue=orders&limit=1")
            eq(([r["id"] for r in one["rows"]], [q["queue"] for q in one["queues"]]), ([ids[0]], ["orders"]),
               "queue and limit")
            two = get(pool, "/api/scheduled?queue=orders&limit=5&cursor=" + one["nextCursor"])
            eq([r["id"] for r in two["rows"]], ids[1:], "the next page from the cursor")
            for path, status in (("/api/scheduled?queue=nosuch", 404), ("/api/scheduled?limit=0", 400),
                                 ("/api/scheduled?cursor=bad", 400)):
                eq(request(pool, "GET", path)[0], status, path)
            eq(get(pool, "/api/schedules"), {"schedules": []}, "no schedule configured")
            status, _, body = act(pool, "/api/schedules/pause", {"name": "nosuch", "paused": True})
            eq(status, 404, f"pause of an unknown schedule ({body})")
            status, _, body = act(pool, "/api/schedules/pause", {"name": "nosuch", "paused": "yes"})
            eq(status, 400, f"paused not a bool ({body})")
        finally:
            clean()
        eq(pool.stop(), (0, []), "clean stop")
