"""The poison corpus (tests/poison/corpus.jsonl), interleaved with valid
commands: each bad message is dead-lettered or rejected with the right reason,
strange-but-valid strings (SQL fragments) are stored verbatim, every valid
command is processed, and no worker restarts."""
import json
import os
import sys
import time

import contract
from harness import (QUEUE_OF, ROOT, Events, Pool, Publisher, check, drain_dead, envelope, eq, new_id, query,
                     schema_cannot_state)

sys.path.insert(0, os.path.join(ROOT, "tests", "poison"))
import corpus  # noqa: E402


def route(body):
    try:
        t = json.loads(body).get("type")
        return QUEUE_OF.get(t, "catalog") if isinstance(t, str) else "catalog"
    except Exception:
        return "catalog"


def test_poison_corpus_and_schemas_agree():
    """Every corpus message the workers reject as VALIDATION_FAILED breaks the
    published schemas (or a rule they cannot state), and every one they apply
    keeps them: the contract says what the workers do."""
    problems = []
    for e in corpus.load():
        if not e["expect"].startswith(("rejected:VALIDATION_FAILED", "applied")):
            continue
        env = json.loads(corpus.body_of(e).replace(b"$ID", new_id().encode()).replace(b"$PID", new_id().encode()))
        errs = contract.command_errors(env)
        if e["expect"].startswith("applied") and errs:
            problems.append(f"{e['name']}: applied, but the schemas refuse it: {errs}")
        if e["expect"].startswith("rejected") and not errs and not schema_cannot_state(env):
            problems.append(f"{e['name']}: rejected, but the schemas accept it")
    check(not problems, "\n".join(problems))


def test_poison_corpus():
    entries = corpus.load()
    check(sum(not e["expect"].startswith("applied") for e in entries) >= 200, "at least 200 bad messages")
    types = {json.loads(e["text"]).get("type") for e in entries if e["expect"].startswith("rejected") and "text" in e}
    check(types >= set(QUEUE_OF), f"the corpus covers every command; missing {set(QUEUE_OF) - types}")
    for q in ("users", "catalog", "orders"):
        drain_dead(q)
    pid = new_id()
    query("INSERT INTO products (id, name, price, stock) VALUES (%s, 'poison target', 1, 0)", pid)
    with Pool(workers={"users": 2, "catalog": 2, "orders": 1}) as pool:
        pub, ev = Publisher(), Events()
        sent, valid = [], []
        for i, e in enumerate(entries):
            cid = new_id()
            body = corpus.body_of(e).replace(b"$ID", cid.encode()).replace(b"$PID", pid.encode())
            pub.raw(route(body), body)
            sent.append((e, cid, body))
            if i % 4 == 0:
                valid.append(pub.command(envelope("updateStock", {"productId": pid, "quantityChange": 1})))
        want_events = {cid for e, cid, _ in sent if not e["expect"].startswith("dead")} | {v["id"] for v in valid}
        ev.wait(lambda s: want_events <= {x["commandId"] for x in s.events}, timeout=240, what="every result")
        dead_want = {body: e for e, _, body in sent if e["expect"].startswith("dead")}
        dead = []
        deadline = time.time() + 60
        while len(dead) < len(dead_want) and time.time() < deadline:
            for q in ("users", "catalog", "orders"):
                dead += drain_dead(q)
            time.sleep(0.2)
        eq(len(dead), len(dead_want), "dead letters")
        got = {d["body"]: d for d in dead}
        problems = []
        for body, e in dead_want.items():
            d = got.get(body)
            reason = e["expect"].split(":")[1]
            if d is None:
                problems.append(f"{e['name']}: no dead letter with the untouched body")
            elif d["reason"] != reason:
                problems.append(f"{e['name']}: reason {d['reason']}, want {reason}")
        results = {}
        for x in ev.events:
            results.setdefault(x["commandId"], x)
        for e, cid, body in sent:
            kind, _, rest = e["expect"].partition(":")
            if kind == "rejected":
                code, field = rest.split(":")
                r = results[cid]
                if r["type"] != "command.rejected" or r["data"]["code"] != code or field not in r["data"].get("fields", {}):
                    problems.append(f"{e['name']}: got {r['type']} {json.dumps(r['data'])[:150]}, want {code} on {field}")
            elif kind == "applied":
                r = results[cid]
                if r["type"] != rest:
                    problems.append(f"{e['name']}: got {r['type']} {json.dumps(r['data'])[:150]}, want {rest}")
                    continue
                payload = json.loads(body)["payload"]
                if rest == "product.created":
                    row = query("SELECT name, description, category FROM products WHERE id = %s",
                                r["data"]["productId"])[0]
                    if list(row) != [payload["name"], payload.get("description"), payload.get("category")]:
                        problems.append(f"{e['name']}: stored {row}, sent {payload}")
                elif query("SELECT name FROM users WHERE id = %s", r["data"]["userId"])[0][0] != payload["name"]:
                    problems.append(f"{e['name']}: name not stored verbatim")
        check(not problems, "\n".join(problems))
        eq(query("SELECT stock FROM products WHERE id = %s", pid)[0][0], len(valid), "every valid command applied")
        for t in ("users", "products", "outbox", "processed_commands"):
            query(f"SELECT 1 FROM {t} LIMIT 1")  # the SQL fragments dropped nothing
        print(f"{len(entries)} poison messages ({len(dead_want)} dead-lettered, "
              f"{len(want_events) - len(valid) - sum(e['expect'].startswith('applied') for e in entries)} rejected, "
              f"{sum(e['expect'].startswith('applied') for e in entries)} stored verbatim), {len(valid)} valid commands")
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop, no worker restarted")


def test_a_later_command_with_the_clean_id_is_applied():
    """An id or type holding \\u0000 is not a usable id or type: such a message is
    dead-lettered as invalid_envelope, and nothing is recorded under the id it
    would be cut to, so the real command with that id, published afterwards by
    another producer, is applied (before, it was dropped as a duplicate)."""
    drain_dead("catalog")
    pid = new_id()
    query("INSERT INTO products (id, name, price, stock) VALUES (%s, 'nul target', 1, 0)", pid)
    with Pool(workers={"catalog": 1}) as pool:
        pub, ev = Publisher(), Events()
        poisoned = []
        for e in corpus.load():
            if "\\u0000" in e["name"] and e["expect"] == "dead:invalid_envelope" and "text" in e:
                cid = new_id()
                body = e["text"].replace("$ID", cid).replace("$PID", pid).encode()
                pub.raw("catalog", body)
                poisoned.append((e["name"], cid, body))
        check(len(poisoned) >= 4, f"the corpus holds the \\u0000 id and type messages: {len(poisoned)}")
        dead = []
        deadline = time.time() + 30
        while len(dead) < len(poisoned) and time.time() < deadline:
            dead += drain_dead("catalog")
            time.sleep(0.1)
        eq(sorted(d["body"] for d in dead), sorted(b for _, _, b in poisoned), "each dead-lettered, untouched")
        check(all(d["reason"] == "invalid_envelope" for d in dead), f"reasons: {[d['reason'] for d in dead]}")
        for name, cid, _ in poisoned:
            eq(query("SELECT count(*) FROM processed_commands WHERE id = %s", cid)[0][0], 0,
               f"{name}: nothing recorded under the cut id")
            clean = pub.command(envelope("updateStock", {"productId": pid, "quantityChange": 1}, id_=cid))
            eq([x["type"] for x in ev.wait_result(clean["id"], timeout=20)], ["stock.updated"],
               f"{name}: the command with the clean id is applied")
        eq(query("SELECT stock FROM products WHERE id = %s", pid)[0][0], len(poisoned), "each applied once")
        pub.close()
        ev.close()
        eq(pool.stop(), (0, []), "clean stop")
