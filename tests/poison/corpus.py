#!/usr/bin/python3
"""The poison corpus: bad messages and what Conveyor must do with each.

corpus.jsonl (beside this file, committed) is the corpus; this script wrote it
and can write it again (--write), or write every body as a file for the fuzzer
(--write-seeds DIR). Each line: {"name", "expect", and "text" | "base64" |
"repeat"}. In bodies, $ID stands for a fresh command id and $PID for an existing
product, filled in by the test. expect is "dead:<reason>", "rejected:<code>:<field>"
or "applied:<event type>" (a strange but valid value, stored verbatim).
"""
import base64
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus.jsonl")
UID = "7e9cf0a8-3b1d-4c5e-8f2a-9d0b1c2e3f40"

VALID = {
    "register": {"name": "Poison Tester", "email": "poison.$ID@example.com", "password": "Secret123"},
    "createProduct": {"name": "Poison product", "price": "1.00", "stock": 1, "description": "d", "category": "c"},
    "updateStock": {"productId": "$PID", "quantityChange": 1},
    "updateProduct": {"productId": "$PID", "name": "Renamed", "price": "2.00", "status": "ACTIVE"},
    "deleteProduct": {"productId": "$PID"},
    "placeOrder": {"userId": UID, "items": [{"productId": "$PID", "quantity": 1}]},
    "cancelOrder": {"orderId": UID},
    "changePassword": {"userId": UID, "currentPassword": "Secret123", "newPassword": "Secret456"},
}
SCHEMAS = os.path.join(os.path.dirname(os.path.dirname(HERE)), "schemas", "commands")


def _required(type_):
    with open(os.path.join(SCHEMAS, f"{type_}.schema.json")) as f:
        return json.load(f).get("required", [])


# the required fields of each payload, as its schema says
REQUIRED = {type_: _required(type_) for type_ in VALID}
# fields for which any string is the right type (a bad string is tested on its own)
STRING_FIELDS = ("name", "description", "category", "email", "password", "currentPassword")


def env(type_, payload, **extra):
    e = {"id": "$ID", "type": type_, "payload": payload}
    e.update(extra)
    return json.dumps(e)


def entries():
    out = []

    def add(name, expect, text=None, raw=None, repeat=None):
        e = {"name": name, "expect": expect}
        if raw is not None:
            e["base64"] = base64.b64encode(raw).decode()
        elif repeat is not None:
            e["repeat"] = repeat
        else:
            e["text"] = text
        out.append(e)

    dead = "dead:invalid_envelope"
    # broken JSON
    for i, t in enumerate(["", " ", "{", "}", "{\"id\":", "{\"id\": \"$ID\", \"type\": \"register\"", "nul", "tru",
                           "{'id': 1}", "{\"id\": \"$ID\",}", "{\"a\" 1}", "[1,2", "\"unterminated", "{\"id\":\"$ID\"]",
                           "{\"id\": \"$ID\", \"type\": \"register\", \"payload\": {}}}", "NaN", "{\"x\": 01}",
                           "{\"x\": .5}", "{\"x\": 1.}", "{\"x\": +1}", "{\"x\": \"\t\"", "/* c */ {}",
                           "{\"id\": \"$ID\" \"type\": \"register\"}", "[1,]", "{\"a\": 1,}", "-", "1e", "01",
                           "{\"id\": \"$ID\", \"type\": \"register\", \"payload\": {\"name\": \"a\tb\"}}",
                           "{\"id\": \"$ID\", \"type\": \"register\", \"payload\": {\"name\": \"a\nb\"}}",
                           "{\"id\": \"$ID\", \"type\": \"register\", \"payload\": {\"name\": \"\\ud800\"}}",
                           "{\"id\": \"$ID\", \"type\": \"register\", \"payload\": {\"name\": \"\\udc00x\"}}",
                           "{\"id\": \"$ID\", \"type\": \"register\", \"payload\": {\"name\": \"\\x41\"}}",
                           "{\"id\": \"$ID\", \"type\": \"register\", \"payload\": {\"n\": 1.}}",
                           "{\"id\": \"$ID\", \"type\": \"register\", \"payload\": {\"n\": 007}}"]):
        add(f"broken JSON {i}", dead, t)
    # JSON that is not one object
    for i, t in enumerate(["[]", "[{}]", "1", "-1.5e3", "true", "false", "null", "\"text\"",
                           "{} {}", env("register", VALID["register"]) + " " + env("register", VALID["register"]),
                           env("register", VALID["register"]) + "x", env("register", VALID["register"]) + "\x00"]):
        add(f"not one object {i}", dead, t)
    # nesting
    for depth in (1001, 5000, 10000):
        add(f"{depth}-deep arrays in payload", dead,
            "{\"id\": \"$ID\", \"type\": \"register\", \"payload\": " + "[" * depth + "]" * depth + "}")
        add(f"{depth}-deep objects", dead, "{\"a\":" * depth + "1" + "}" * depth)
    add("10 MB body", dead, repeat={"head": "{\"id\": \"$ID\", \"type\": \"register\", \"payload\": {\"name\": \"",
                                    "fill": "x", "count": 10 * 1024 * 1024, "tail": "\"}}"})
    add("just over 64 KiB", dead, repeat={"head": "{\"id\": \"$ID\", \"type\": \"register\", \"payload\": {\"name\": \"",
                                          "fill": "y", "count": 65536, "tail": "\"}}"})
    # envelope fields of the wrong type or missing
    for v in [None, 1, True, [], {}, "", "not-a-uuid", "5f0c6a8e8a9b4f0e9d3c1f2e3d4c5b6a", "$ID-1", " $ID"]:
        if v is None:
            add("id missing", dead, json.dumps({"type": "register", "payload": VALID["register"]}))
        else:
            add(f"id {json.dumps(v)}", dead, json.dumps({"id": v, "type": "register", "payload": VALID["register"]}))
    for v in [None, 1, True, [], {}, "", "x" * 64]:
        body = {"id": "$ID", "payload": {}}
        if v is not None:
            body["type"] = v
        add(f"type {json.dumps(v)[:20]}", dead, json.dumps(body))
    for v in [None, 1, True, [], "payload", "{}"]:
        body = {"id": "$ID", "type": "register"}
        if v is not None:
            body["payload"] = v
        add(f"payload {json.dumps(v)}", dead, json.dumps(body))
    # invalid UTF-8 and NUL bytes
    for i, b in enumerate([b"\xff", b"\xfe\xff", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                           b"\xc3", b"\x80", b"\xf8\x88\x80\x80\x80", b"abc\xe2\x82"]):
        raw = b'{"id": "' + UID.encode() + b'", "type": "register", "payload": {"name": "' + b + b'"}}'
        add(f"invalid UTF-8 {i}", dead, raw=raw)
    add("raw NUL in a string", dead, raw=b'{"id": "' + UID.encode() + b'", "type": "register", "payload": {"name": "a\x00b"}}')
    add("raw NUL alone", dead, raw=b"\x00")
    add("binary garbage", dead, raw=bytes(range(256)))
    # unknown commands
    for t in ["Register", "REGISTER", "register ", "launchRocket", "updateStocks", "drop table"]:
        add(f"unknown type {t!r}", "dead:unknown_command", env(t, {}))
    # wrong types in every payload field
    for type_, good in VALID.items():
        for field in good:
            for bad in [1, 1.5, True, [], {}, "x"]:
                if field in ("stock", "quantityChange") and bad == 1:
                    continue
                if field in ("price",) and bad in (1, 1.5):
                    continue  # a number price is fine (1.5 -> 1.50)
                p = dict(good)
                p[field] = bad
                if field in STRING_FIELDS and isinstance(bad, str):
                    continue  # strings are the right type for these
                add(f"{type_}.{field} = {json.dumps(bad)}", f"rejected:VALIDATION_FAILED:{field}", env(type_, p))
        for field in REQUIRED[type_]:
            p = dict(good)
            del p[field]
            add(f"{type_} without {field}", f"rejected:VALIDATION_FAILED:{field}", env(type_, p))
            p[field] = None
            add(f"{type_}.{field} = null", f"rejected:VALIDATION_FAILED:{field}", env(type_, p))
    # \u0000 inside strings
    for type_, field in [("register", "name"), ("createProduct", "description"), ("createProduct", "category")]:
        p = dict(VALID[type_])
        p[field] = "a\u0000b"
        add(f"{type_}.{field} with \\u0000", "rejected:VALIDATION_FAILED:payload", env(type_, p))
    # \u0000 in the id or the type: cut there, they would name another command (the
    # real one would then be dropped as a duplicate, or the wrong handler run)
    add("id with \\u0000 and more", dead, json.dumps({"id": "$ID\u0000junk", "type": "createProduct",
                                                      "payload": VALID["createProduct"]}))
    add("id that ends in \\u0000", dead, json.dumps({"id": "$ID\u0000", "type": "updateStock",
                                                     "payload": VALID["updateStock"]}))
    add("type with \\u0000 and more", dead, json.dumps({"id": "$ID", "type": "createProduct\u0000x",
                                                        "payload": VALID["createProduct"]}))
    add("key 'id' with \\u0000 beside the id", dead,
        '{"id\\u0000x": "' + UID + '", "id": "$ID", "type": "createProduct", "payload": '
        + json.dumps(VALID["createProduct"]) + '}')
    # numbers out of range
    for field, v in [("price", -0.01), ("price", 100000000), ("price", 1e308), ("price", "1e3"), ("price", 0.001),
                     ("stock", -1), ("stock", 2147483648), ("stock", 1e20), ("stock", 0.5)]:
        p = dict(VALID["createProduct"])
        p[field] = v
        add(f"createProduct.{field} = {v!r}", f"rejected:VALIDATION_FAILED:{field}", env("createProduct", p))
    for v in [0, 1000000001, -1000000001, 1e300, -1e300, 0.1]:
        p = dict(VALID["updateStock"])
        p["quantityChange"] = v
        add(f"updateStock.quantityChange = {v!r}", "rejected:VALIDATION_FAILED:quantityChange", env("updateStock", p))
    add("number 1e400 (overflows a double)", "rejected:VALIDATION_FAILED:quantityChange",
        env("updateStock", VALID["updateStock"]).replace("\"quantityChange\": 1", "\"quantityChange\": 1e400"))
    # overlong strings
    for type_, field, n in [("register", "name", 256), ("register", "password", 129), ("createProduct", "name", 256),
                            ("createProduct", "description", 10001), ("createProduct", "category", 101)]:
        p = dict(VALID[type_])
        p[field] = "A1a" + "x" * (n - 3)
        add(f"{type_}.{field} of {n}", f"rejected:VALIDATION_FAILED:{field}", env(type_, p))
    p = dict(VALID["register"])
    p["email"] = "a" * 64 + "@" + "b" * 186 + ".com"
    add("register.email of 255", "rejected:VALIDATION_FAILED:email", env("register", p))
    add("correlationId of 201", "rejected:VALIDATION_FAILED:correlationId",
        env("createProduct", VALID["createProduct"], correlationId="c" * 201))
    add("correlationId a number", "rejected:VALIDATION_FAILED:correlationId",
        env("createProduct", VALID["createProduct"], correlationId=7))
    add("createdAt not a time", "rejected:VALIDATION_FAILED:createdAt",
        env("createProduct", VALID["createProduct"], createdAt="2026-13-45"))
    # the order's items
    item = VALID["placeOrder"]["items"][0]
    other = dict(item, productId=UID)
    for name, items, field in [
            ("no items", [], "items"), ("101 items", [dict(item, productId=f"{i:08x}-0000-4000-8000-000000000000")
                                                      for i in range(101)], "items"),
            ("an item that is a number", [1], "items[0]"), ("an item that is null", [None], "items[0]"),
            ("an item without quantity", [{"productId": "$PID"}], "items[0].quantity"),
            ("an item without productId", [{"quantity": 1}], "items[0].productId"),
            ("quantity 0", [dict(item, quantity=0)], "items[0].quantity"),
            ("quantity -1", [dict(item, quantity=-1)], "items[0].quantity"),
            ("quantity 1000000001", [dict(item, quantity=1000000001)], "items[0].quantity"),
            ("quantity 1.5", [dict(item, quantity=1.5)], "items[0].quantity"),
            ("quantity \"1\"", [dict(item, quantity="1")], "items[0].quantity"),
            ("productId not a UUID", [dict(item, productId="42")], "items[0].productId"),
            ("a product twice", [item, other, item], "items[2].productId"),
            ("second item broken", [item, dict(other, quantity=None)], "items[1].quantity")]:
        add(f"placeOrder with {name}", f"rejected:VALIDATION_FAILED:{field}",
            env("placeOrder", dict(VALID["placeOrder"], items=items)))
    # the rules of updateProduct and changePassword
    for name, payload, field in [
            ("nothing to change", {"productId": "$PID"}, "payload"),
            ("only unknown fields", {"productId": "$PID", "colour": "red"}, "payload"),
            ("status lower-case", {"productId": "$PID", "status": "active"}, "status"),
            ("status DELETED", {"productId": "$PID", "status": "DELETED"}, "status"),
            ("blank name", {"productId": "$PID", "name": "   "}, "name"),
            ("name null", {"productId": "$PID", "name": None}, "name"),
            ("price with 3 decimals", {"productId": "$PID", "price": "1.234"}, "price"),
            ("negative price", {"productId": "$PID", "price": -1}, "price"),
            ("category of 101", {"productId": "$PID", "category": "c" * 101}, "category")]:
        add(f"updateProduct with {name}", f"rejected:VALIDATION_FAILED:{field}", env("updateProduct", payload))
    for name, new, field in [("no upper-case letter", "secret456", "newPassword"),
                             ("no lower-case letter", "SECRET456", "newPassword"),
                             ("no digit", "SecretSecret", "newPassword"), ("7 characters", "Secr456", "newPassword"),
                             ("129 characters", "Aa1" + "x" * 126, "newPassword")]:
        add(f"changePassword to one with {name}", f"rejected:VALIDATION_FAILED:{field}",
            env("changePassword", dict(VALID["changePassword"], newPassword=new)))
    add("changePassword with a current password of 129", "rejected:VALIDATION_FAILED:currentPassword",
        env("changePassword", dict(VALID["changePassword"], currentPassword="x" * 129)))
    # SQL fragments: a string that breaks no rule is stored verbatim; in an id field it is not a UUID
    sqls = ["'; DROP TABLE products; --", "\" OR 1=1 --", "Robert'); DROP TABLE users;--", "$$; SELECT pg_sleep(10); $$",
            "1; DELETE FROM processed_commands", "\\'; TRUNCATE outbox; --"]
    for i, s in enumerate(sqls):
        for field in ["name", "description", "category"]:
            p = dict(VALID["createProduct"])
            p[field] = s
            add(f"SQL in createProduct.{field} {i}", "applied:product.created", env("createProduct", p))
        p = dict(VALID["register"])
        p["name"] = s
        add(f"SQL in register.name {i}", "applied:user.registered", env("register", p))
        p = dict(VALID["register"])
        p["password"] = "Aa1" + s
        add(f"SQL in register.password {i}", "applied:user.registered", env("register", p))
        for type_, field in [("updateStock", "productId"), ("createProduct", "productId"), ("register", "userId"),
                             ("updateProduct", "productId"), ("deleteProduct", "productId"),
                             ("placeOrder", "userId"), ("cancelOrder", "orderId"), ("changePassword", "userId")]:
            p = dict(VALID[type_])
            p[field] = s
            add(f"SQL in {type_}.{field} {i}", f"rejected:VALIDATION_FAILED:{field}", env(type_, p))
        p = dict(VALID["register"])
        p["email"] = s
        add(f"SQL in register.email {i}", "rejected:VALIDATION_FAILED:email", env("register", p))
    return out


def body_of(entry):
    """The message bytes of an entry, with $ID and $PID left in."""
    if "base64" in entry:
        return base64.b64decode(entry["base64"])
    if "repeat" in entry:
        r = entry["repeat"]
        return (r["head"] + r["fill"] * r["count"] + r["tail"]).encode()
    return entry["text"].encode()


def load():
    with open(CORPUS) as f:
        return [json.loads(line) for line in f]


def main():
    if sys.argv[1:] == ["--write"]:
        es = entries()
        with open(CORPUS, "w") as f:
            for e in es:
                f.write(json.dumps(e) + "\n")
        print(f"wrote {len(es)} entries to {CORPUS}")
    elif len(sys.argv) == 3 and sys.argv[1] == "--write-seeds":
        os.makedirs(sys.argv[2], exist_ok=True)
        for i, e in enumerate(load()):
            b = body_of(e)
            if len(b) > 70000:
                continue
            b = b.replace(b"$ID", UID.encode()).replace(b"$PID", UID.encode())
            with open(os.path.join(sys.argv[2], f"poison-{i:03d}"), "wb") as f:
                f.write(b)
    else:
        print(__doc__)
        sys.exit(2)


if __name__ == "__main__":
    main()
