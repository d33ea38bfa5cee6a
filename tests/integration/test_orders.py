"""updateProduct, deleteProduct, placeOrder, cancelOrder, changePassword: events
field by field, rows, every rejection code; and the stock invariants under
concurrent orders, cancellations and stock changes."""
import random
import re
import time
from collections import defaultdict

from harness import check, envelope, eq, new_id, query
from test_commands import check_envelope, outcome, rejection, scenario


def user(env):
    uid = new_id()
    env.run(envelope("register", {"name": "Buyer", "email": f"buyer.{uid}@example.com", "password": "Secret123",
                                  "userId": uid}))
    return uid


def product(env, stock=10, price="19.99", status="ACTIVE"):
    pid = new_id()
    env.run(envelope("createProduct", {"name": "Thing", "price": price, "stock": stock, "productId": pid}))
    if status != "DRAFT":
        res = env.run(envelope("updateProduct", {"productId": pid, "status": status}))
        eq(res[0]["type"], "product.updated", "status set")
    return pid


def stock(pid):
    return query("SELECT stock FROM products WHERE id = %s", pid)[0][0]


@scenario()
def test_update_product(env):
    pid = product(env, status="DRAFT")
    cmd = envelope("updateProduct", {"productId": pid, "name": " Thing ", "price": "21.50", "description": "new",
                                     "status": "ACTIVE"})
    res = env.run(cmd)
    check_envelope(res[0], cmd, "product.updated", "product", pid)
    eq(res[0]["data"], {"productId": pid, "changed": {"price": "21.50", "description": "new", "status": "ACTIVE"}},
       "only the fields that really changed (the name did not)")
    row = query("SELECT name, price::text, description, status FROM products WHERE id = %s", pid)[0]
    eq(row, ("Thing", "21.50", "new", "ACTIVE"), "row")
    res = env.run(envelope("updateProduct", {"productId": pid, "description": None, "category": "kitchen"}))
    eq(res[0]["data"]["changed"], {"description": None, "category": "kitchen"}, "cleared and set")
    res = env.run(envelope("updateProduct", {"productId": pid, "price": 21.5}))
    eq(res[0]["data"]["changed"], {}, "the same price is no change")
    for s in ("INACTIVE", "DRAFT", "ACTIVE", "ARCHIVED"):
        eq(env.run(envelope("updateProduct", {"productId": pid, "status": s}))[0]["data"]["changed"], {"status": s},
           f"to {s}")
    d = rejection(env, envelope("updateProduct", {"productId": pid, "status": "ACTIVE"}))
    eq(d["code"], "CONFLICT", "ARCHIVED is final")
    d = rejection(env, envelope("updateProduct", {"productId": new_id(), "name": "x"}))
    eq(d["code"], "NOT_FOUND", "unknown product")
    d = rejection(env, envelope("updateProduct", {"productId": pid, "status": "SOLD", "price": -1}))
    eq((d["code"], set(d["fields"])), ("VALIDATION_FAILED", {"status", "price"}), "bad values")
    d = rejection(env, envelope("updateProduct", {"productId": pid}))
    eq(list(d["fields"]), ["payload"], "nothing to change")


@scenario()
def test_delete_product(env):
    pid = product(env, stock=5)
    cmd = envelope("deleteProduct", {"productId": pid})
    res = env.run(cmd)
    check_envelope(res[0], cmd, "product.deleted", "product", pid)
    eq(res[0]["data"], {"productId": pid}, "product.deleted data")
    check(query("SELECT deleted_at IS NOT NULL FROM products WHERE id = %s", pid)[0][0], "row marked deleted")
    eq(rejection(env, envelope("deleteProduct", {"productId": pid}))["code"], "NOT_FOUND", "deleted twice")
    eq(rejection(env, envelope("updateStock", {"productId": pid, "quantityChange": 1}))["code"], "NOT_FOUND",
       "no stock changes on a deleted product")
    eq(rejection(env, envelope("updateProduct", {"productId": pid, "name": "x"}))["code"], "NOT_FOUND", "no updates")
    eq(rejection(env, envelope("deleteProduct", {"productId": "x"}))["code"], "VALIDATION_FAILED", "bad id")


@scenario(workers={"users": 1, "catalog": 1, "orders": 1})
def test_place_and_cancel_order(env):
    uid = user(env)
    a, b = product(env, stock=13, price="19.99"), product(env, stock=2, price="0.10")
    cmd = envelope("placeOrder", {"userId": uid, "items": [{"productId": a, "quantity": 3},
                                                           {"productId": b, "quantity": 2}]}, correlation_id="cart-1")
    res = env.run(cmd, count=3)
    time.sleep(0.3)
    env.ev.poll()
    res = env.ev.for_command(cmd["id"])
    eq([e["type"] for e in res], ["order.placed", "stock.low", "stock.depleted"], "result first, then notifications")
    oid = res[0]["data"]["orderId"]
    check_envelope(res[0], cmd, "order.placed", "order", oid)
    eq(res[0]["data"], {"orderId": oid, "userId": uid, "total": "60.17",
                        "items": [{"productId": a, "quantity": 3, "unitPrice": "19.99"},
                                  {"productId": b, "quantity": 2, "unitPrice": "0.10"}]}, "order.placed data")
    eq((res[1]["aggregateId"], res[1]["data"]), (a, {"productId": a, "stock": 10, "threshold": 10}), "stock.low")
    eq(res[2]["data"], {"productId": b}, "stock.depleted")
    eq((stock(a), stock(b)), (10, 0), "stock taken")
    eq(query("SELECT user_id::text, status, total::text FROM orders WHERE id = %s", oid), [(uid, "PLACED", "60.17")],
       "orders row")
    eq(query("SELECT product_id::text, quantity, unit_price::text FROM order_items WHERE order_id = %s ORDER BY position",
             oid), [(a, 3, "19.99"), (b, 2, "0.10")], "order_items rows")
    # the price changes later; the order keeps its unit price
    env.run(envelope("updateProduct", {"productId": a, "price": "25.00"}))
    env.run(envelope("deleteProduct", {"productId": b}))
    eq(query("SELECT unit_price::text FROM order_items WHERE order_id = %s ORDER BY position", oid),
       [("19.99",), ("0.10",)], "items keep their prices after a price change and a delete")
    cmd = envelope("cancelOrder", {"orderId": oid})
    res = env.run(cmd)
    check_envelope(res[0], cmd, "order.cancelled", "order", oid)
    eq(res[0]["data"], {"orderId": oid}, "order.cancelled data")
    eq((stock(a), stock(b)), (13, 0), "stock back to the product that still exists")
    eq(query("SELECT status FROM orders WHERE id = %s", oid)[0][0], "CANCELLED", "status")
    eq(rejection(env, envelope("cancelOrder", {"orderId": oid}))["code"], "CONFLICT", "cancelled twice")
    eq(rejection(env, envelope("cancelOrder", {"orderId": new_id()}))["code"], "NOT_FOUND", "unknown order")


@scenario(workers={"users": 1, "catalog": 1, "orders": 1})
def test_place_order_rejections(env):
    uid = user(env)
    a, b = product(env, stock=5), product(env, stock=1)
    draft = product(env, stock=5, status="DRAFT")
    d = rejection(env, envelope("placeOrder", {"userId": new_id(), "items": [{"productId": a, "quantity": 1}]}))
    eq(d["code"], "NOT_FOUND", "unknown user")
    ghost = new_id()
    d = rejection(env, envelope("placeOrder", {"userId": uid, "items": [{"productId": a, "quantity": 1},
                                                                        {"productId": ghost, "quantity": 1}]}))
    eq((d["code"], d["details"]), ("NOT_FOUND", {"productId": ghost}), "unknown product")
    d = rejection(env, envelope("placeOrder", {"userId": uid, "items": [{"productId": draft, "quantity": 1}]}))
    eq((d["code"], d["details"]), ("PRODUCT_UNAVAILABLE", {"productId": draft, "status": "DRAFT"}), "not ACTIVE")
    d = rejection(env, envelope("placeOrder", {"userId": uid, "items": [{"productId": a, "quantity": 5},
                                                                        {"productId": b, "quantity": 2}]}))
    eq((d["code"], d["details"]), ("INSUFFICIENT_STOCK", {"productId": b, "available": 1, "requested": 2}),
       "the first item short")
    eq((stock(a), stock(b)), (5, 1), "all or nothing: no stock taken")
    d = rejection(env, envelope("placeOrder", {"userId": uid, "items": []}))
    eq(list(d["fields"]), ["items"], "no items")
    d = rejection(env, envelope("placeOrder", {"userId": uid, "items": [{"productId": new_id(), "quantity": 1}
                                                                        for _ in range(101)]}))
    eq(list(d["fields"]), ["items"], "101 items")
    d = rejection(env, envelope("placeOrder", {"userId": "u", "items": [
        {"productId": a, "quantity": 0}, {"productId": a, "quantity": 1.5}, "x", {"quantity": 1}]}))
    eq(set(d["fields"]), {"userId", "items[0].quantity", "items[1].productId", "items[1].quantity", "items[2]",
                          "items[3].productId"}, "every bad field named, inside the list too")


@scenario(workers={"users": 1, "catalog": 1, "orders": 1})
def test_change_password(env):
    uid = user(env)
    cmd = envelope("changePassword", {"userId": uid, "currentPassword": "Secret123", "newPassword": "Better456"})
    res = env.run(cmd)
    check_envelope(res[0], cmd, "user.passwordChanged", "user", uid)
    eq(res[0]["data"], {"userId": uid}, "user.passwordChanged data")
    d = rejection(env, envelope("changePassword", {"userId": uid, "currentPassword": "Secret123",
                                                   "newPassword": "Other789x"}))
    eq(d["code"], "INVALID_CREDENTIALS", "the old password no longer works")
    res = env.run(envelope("changePassword", {"userId": uid, "currentPassword": "Better456",
                                              "newPassword": "Third789x"}))
    eq(res[0]["type"], "user.passwordChanged", "the new one does")
    eq(rejection(env, envelope("changePassword", {"userId": new_id(), "currentPassword": "Secret123",
                                                  "newPassword": "Better456"}))["code"], "NOT_FOUND", "unknown user")
    d = rejection(env, envelope("changePassword", {"userId": uid, "currentPassword": 5, "newPassword": "weak"}))
    eq(set(d["fields"]), {"currentPassword", "newPassword"}, "fields named")
    log = env.pool.read_log()
    for secret in ("Secret123", "Better456", "Third789x", "$argon2id$"):
        check(secret not in log, "no password or hash in the log")
    for e in env.ev.events:
        check("Better456" not in str(e) and "argon2" not in str(e), "no password or hash in an event")


@scenario(workers={"users": 1, "catalog": 4, "orders": 4})
def test_stock_invariants_under_concurrency(env):  # faults (Release only: 2,000 orders, 70 s a transport under ASan; the ASan chain is CI's longer one)
    """8 workers, 2,000 random placeOrder / cancelOrder / updateStock over 20 products."""
    rng = random.Random(11)
    uid = user(env)
    pids = [product(env, stock=60) for _ in range(20)]
    start = {p: 60 for p in pids}
    cmds, cancels = [], []
    placed_seen = set()
    for i in range(1700):
        if rng.random() < 0.65:
            items = [{"productId": p, "quantity": rng.randint(1, 4)} for p in rng.sample(pids, rng.randint(1, 4))]
            c = envelope("placeOrder", {"userId": uid, "items": items})
        else:
            c = envelope("updateStock", {"productId": rng.choice(pids), "quantityChange": rng.choice([-3, -2, -1, 2, 5])})
        env.pub.command(c)
        cmds.append(c)
        if i % 50 == 0:
            env.ev.poll(0.01)
            for e in env.ev.events:
                if e["type"] == "order.placed" and e["aggregateId"] not in placed_seen and len(cancels) < 300:
                    placed_seen.add(e["aggregateId"])
                    if rng.random() < 0.6:
                        c = envelope("cancelOrder", {"orderId": e["aggregateId"]})
                        env.pub.command(c)
                        cancels.append(c)
    while len(cancels) < 300:
        env.ev.poll(0.2)
        for e in env.ev.events:
            if e["type"] == "order.placed" and e["aggregateId"] not in placed_seen and len(cancels) < 300:
                placed_seen.add(e["aggregateId"])
                c = envelope("cancelOrder", {"orderId": e["aggregateId"]})
                env.pub.command(c)
                cancels.append(c)
    ids = {c["id"] for c in cmds + cancels}
    env.ev.wait(lambda s: ids <= {e["commandId"] for e in s.events}, 180, "2,000 results")
    results = {}
    for e in env.ev.events:
        results.setdefault(e["commandId"], e)
    kinds = defaultdict(int)
    for cid in ids:
        r = results[cid]
        kinds[r["type"] if r["type"] != "command.rejected" else r["data"]["code"]] += 1
    expected = dict(start)
    for c in cmds:
        r = results[c["id"]]
        if r["type"] == "stock.updated":
            expected[r["aggregateId"]] += r["data"]["quantityChange"]
    still_placed = {r[0] for r in query("SELECT id::text FROM orders WHERE user_id = %s AND status = 'PLACED'", uid)}
    for c in cmds:
        r = results[c["id"]]
        if r["type"] == "order.placed" and r["aggregateId"] in still_placed:
            for it in r["data"]["items"]:
                expected[it["productId"]] -= it["quantity"]
    actual = dict(query("SELECT id::text, stock FROM products WHERE id = ANY(%s::uuid[])", pids))
    eq(actual, expected, "stock = start - quantities of orders still placed + accepted stock changes")
    check(min(actual.values()) >= 0, "no stock below zero")
    eq(sum(1 for cid in ids if outcome(cid) in ("applied", "rejected")), len(ids), "every command processed once")
    check(kinds["order.placed"] > 100 and kinds["order.cancelled"] > 50, f"a real mix: {dict(kinds)}")
    deadlocks = env.pool.read_log().count("40P01")
    print(f"invariants: {len(ids)} commands, {dict(kinds)}, deadlocks retried: {deadlocks}")



def test_batched_orders_never_deadlock():  # faults (Release only: 45 s a transport under ASan; the ASan chain is CI's longer one)
    """Batches of commands that each lock several products (placeOrder, cancelOrder)
    take every product of the batch first, in id order (the handlers state their
    lock keys): 4 workers at batch_size 8 run 2,000 orders and 200 cancellations
    over 20 products with no deadlock reported by PostgreSQL, each command applied
    once, and the stocks exact."""
    from harness import Events, Pool, Publisher
    rng = random.Random(7)
    uid = new_id()
    query("INSERT INTO users (id, name, email, password_hash) VALUES (%s, 'Buyer', %s, 'x')",
          uid, f"batch.{uid}@example.com")
    products = [new_id() for _ in range(20)]
    for p in products:
        query("INSERT INTO products (id, name, price, stock, status) VALUES (%s, 'lock test', 1, 100000, 'ACTIVE')", p)
    cancels, expect = [], defaultdict(int)
    for _ in range(200):  # placed orders to cancel, made directly
        oid = new_id()
        query("INSERT INTO orders (id, user_id, status, total) VALUES (%s, %s, 'PLACED', 1)", oid, uid)
        for pos, p in enumerate(rng.sample(products, rng.randint(1, 4))):
            query("INSERT INTO order_items (order_id, position, product_id, quantity, unit_price) "
                  "VALUES (%s, %s, %s, 1, 1)", oid, pos, p)
            expect[p] += 1
        cancels.append(envelope("cancelOrder", {"orderId": oid}))
    orders = []
    for _ in range(2000):
        items = [{"productId": p, "quantity": 1} for p in rng.sample(products, rng.randint(1, 4))]
        for it in items:
            expect[it["productId"]] -= 1
        orders.append(envelope("placeOrder", {"userId": uid, "items": items}))
    cmds = orders[:]
    for i, c in enumerate(cancels):
        cmds.insert(i * 10 + 5, c)
    deadlocks_before = query("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")[0][0]
    pub, ev = Publisher(), Events()
    for c in cmds[:400]:  # a backlog before the pool starts, so that batches form at once
        pub.command(c)
    with Pool(workers={"users": 1, "catalog": 1, "orders": 4}, queue_opts="batch_size = 8;",
              env={"CONVEYOR_LOG_LEVEL": "debug"}) as pool:
        for c in cmds[400:]:
            pub.command(c)
        ids = {c["id"] for c in cmds}
        ev.wait(lambda s: ids <= {e["commandId"] for e in s.events}, timeout=240, what="every result")
        results = {}
        for e in ev.events:
            if e["commandId"] in ids and not e["type"].startswith("stock."):
                results.setdefault(e["commandId"], []).append(e["type"])
        bad = {k: v for k, v in results.items() if v not in (["order.placed"], ["order.cancelled"])}
        check(not bad, f"each command applied once: {list(bad.items())[:5]}")
        takes = [int(m) for m in re.findall(r'"took (\d+) messages?"', pool.read_log())]
        check(sum(1 for n in takes if n >= 4) >= 20, f"batches of several orders formed: {takes[:40]}")
        time.sleep(1.5)  # PostgreSQL's statistics are flushed about once a second
        deadlocks = query("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")[0][0]
        eq(deadlocks - deadlocks_before, 0, "deadlocks reported by PostgreSQL")
        check("deadlock" not in pool.read_log(), "no deadlock in the log")
        for p in products:
            eq(stock(p), 100000 + expect[p], f"stock of {p}")
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")
