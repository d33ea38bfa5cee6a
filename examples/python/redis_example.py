#!/usr/bin/python3
"""Publish a createProduct command to Conveyor over Redis with redis-py, and wait
for its result event on the stream. Exit 0 if it is product.created. (Debian: python3-redis)"""
import json
import os
import sys
import time
import uuid

import redis

r = redis.Redis.from_url(os.environ.get("CONVEYOR_REDIS_URL", "redis://127.0.0.1:56379/0"))
last = r.xrevrange("conveyor:events", count=1)
last_id = last[0][0] if last else b"0-0"  # read the stream from its current end

command = {"id": str(uuid.uuid4()), "type": "createProduct",
           "payload": {"name": "Python bowl", "price": 2.5}, "correlationId": "python-example"}
r.lpush("conveyor:queue:catalog", json.dumps(command))  # returns once Redis has it

deadline = time.time() + 10
while time.time() < deadline:
    for _, entries in r.xread({"conveyor:events": last_id}, count=100, block=500):
        for entry_id, fields in entries:
            last_id = entry_id
            event = json.loads(fields[b"event"])
            if event["commandId"] == command["id"]:  # the first event of a command is its result
                print(json.dumps(event))
                sys.exit(0 if event["type"] == "product.created" else 1)
print("no result event within 10 s", file=sys.stderr)
sys.exit(1)
