"""The versioning rules of docs/versioning.md, one test each:
1. a producer may add fields anywhere in a command: workers ignore them;
2. a command type a worker does not take is dead-lettered as unknown_command,
   untouched, and is processed after an upgrade with `conveyor-admin dead retry`;
3. an event's data may grow: the published schemas allow new fields, and never
   lose one (every field a schema lists is required, so a worker that dropped
   one would fail every test that receives the event; the optional fields of
   docs/contract.md, command.rejected's fields and details, are the exception)."""
import json
import os
import time

import contract
from harness import (ROUTING, Events, Pool, Publisher, check, drain_dead, envelope, eq, new_id, query, run_bin)


def test_unknown_fields_are_ignored():
    with Pool() as pool:
        pub, ev = Publisher(), Events()
        pid = new_id()
        cmd = envelope("createProduct", {"productId": pid, "name": "Versioned", "price": "3.50", "stock": 4,
                                         "colour": "red", "dimensions": {"w": 1, "h": [2, 3]}})
        cmd.update({"version": 2, "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                    "meta": {"origin": "a newer producer"}})
        eq(contract.command_errors(cmd), [], "the schemas accept unknown fields")
        pub.command(cmd)
        res = ev.wait_result(cmd["id"])
        eq(res[0]["type"], "product.created", "applied")
        eq({k: res[0]["data"][k] for k in ("productId", "name", "price", "stock")},
           {"productId": pid, "name": "Versioned", "price": "3.50", "stock": 4}, "the known fields, as sent")
        check("colour" not in res[0]["data"] and "version" not in res[0], "unknown fields are not echoed")
        eq(query("SELECT name, price::text, stock FROM products WHERE id = %s", pid), [("Versioned", "3.50", 4)],
           "stored")
        # an unknown field inside an order item too
        uid = new_id()
        query("INSERT INTO users (id, name, email, password_hash) VALUES (%s, 'v', %s, 'x')", uid, f"{uid}@example.com")
        query("UPDATE products SET status = 'ACTIVE' WHERE id = %s", pid)
        order = envelope("placeOrder", {"userId": uid, "items": [{"productId": pid, "quantity": 1, "note": "gift"}],
                                        "coupon": "NEW"})
        pub.command(order)
        res = ev.wait_result(order["id"])
        eq(res[0]["type"], "order.placed", "applied")
        eq(res[0]["data"]["items"], [{"productId": pid, "quantity": 1, "unitPrice": "3.50"}], "items as known")
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")


def test_unknown_command_waits_for_an_upgrade():
    drain_dead("catalog")
    pid = new_id()
    query("INSERT INTO products (id, name, price, stock) VALUES (%s, 'old deployment', 1, 5)", pid)
    # an older deployment: its catalog workers do not take deleteProduct yet
    old = dict(ROUTING, catalog=[t for t in ROUTING["catalog"] if t != "deleteProduct"])
    delete = envelope("deleteProduct", {"productId": pid})
    future = envelope("archiveEverything", {"productId": pid})
    with Pool(routing=old) as pool:
        pub, ev = Publisher(), Events()
        for c in (delete, future):
            pub.raw("catalog", json.dumps(c).encode(), message_id=c["id"])
        admin = ["-c", pool.config, "--json"]
        rows = []
        for _ in range(100):
            rows = [json.loads(x) for x in run_bin("conveyor-admin", *admin, "dead", "list", "catalog").stdout.splitlines()]
            if len(rows) == 2:
                break
            time.sleep(0.1)
        eq(sorted((r["type"], r["reason"], r["commandId"]) for r in rows),
           sorted([("deleteProduct", "unknown_command", delete["id"]),
                   ("archiveEverything", "unknown_command", future["id"])]), "both dead-lettered as unknown_command")
        errors = {r["type"]: r["error"] for r in rows}
        check("does not take command type 'deleteProduct'" in errors["deleteProduct"], errors["deleteProduct"])
        check("no handler for command type 'archiveEverything'" in errors["archiveEverything"],
              errors["archiveEverything"])
        eq(query("SELECT deleted_at IS NULL FROM products WHERE id = %s", pid), [(True,)], "nothing applied")
        eq(ev.for_command(delete["id"]), [], "no event for a command waiting in the dead letters")
        eq(pool.stop(), (0, []), "clean stop")
    # the upgrade: workers that take deleteProduct; the operator retries its dead letters
    with Pool() as pool:
        r = run_bin("conveyor-admin", "-c", pool.config, "dead", "retry", "catalog", delete["id"])
        eq(r.returncode, 0, f"retry ({r.stderr})")
        res = ev.wait_result(delete["id"], timeout=20)
        eq([e["type"] for e in res], ["product.deleted"], "processed after the upgrade")
        eq(query("SELECT deleted_at IS NOT NULL FROM products WHERE id = %s", pid), [(True,)], "deleted once")
        rest = drain_dead("catalog")
        eq([json.loads(d["body"])["id"] for d in rest], [future["id"]], "the unknown type still waits, untouched")
        eq(json.loads(rest[0]["body"]), future, "its body untouched")
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")


def test_event_data_may_grow():
    folder = os.path.join(contract.SCHEMAS, "events")
    optional = {"command.rejected.schema.json": {"fields", "details"}}  # docs/contract.md: fields?, details?
    problems = []
    for name in sorted(os.listdir(folder)):
        schema = json.load(open(os.path.join(folder, name)))
        props, required = set(schema.get("properties", {})), set(schema.get("required", []))
        if schema.get("additionalProperties") is False or schema.get("unevaluatedProperties") is False:
            problems.append(f"{name}: forbids new fields")
        if props - required != optional.get(name, set()):
            problems.append(f"{name}: fields not required, so a worker could drop them: {sorted(props - required)}")
    envelope_schema = json.load(open(os.path.join(contract.SCHEMAS, "event.schema.json")))
    if envelope_schema.get("additionalProperties") is False:
        problems.append("event.schema.json: forbids new envelope fields")
    check(not problems, "\n".join(problems))
    # a real event, grown by a later version, still keeps the contract; shrunk, it does not
    with Pool() as pool:
        pub, ev = Publisher(), Events()
        cmd = pub.command(envelope("createProduct", {"name": "grows", "price": 1}))
        real = ev.wait_result(cmd["id"])[0]
        grown = dict(real, schemaVersion=2, data=dict(real["data"], weightGrams=250, tags=["new"]))
        eq(contract.event_errors(grown), [], "a grown event keeps the contract")
        for field in real["data"]:
            shrunk = dict(real, data={k: v for k, v in real["data"].items() if k != field})
            check(contract.event_errors(shrunk), f"an event without data.{field} breaks the contract")
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")
