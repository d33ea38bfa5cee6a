"""The publishing examples of the docs (examples/), run against the real servers:
a shell (amqp-tools, redis-cli), Python (pika, redis-py) and Node (amqplib,
ioredis) each publish a command and read its result event."""
import json
import os
import subprocess

from harness import ROOT, TRANSPORT, Pool, check, eq

EX = os.path.join(ROOT, "examples")
RUN = {
    "rabbitmq": [["sh", "shell/rabbitmq.sh"], ["/usr/bin/python3", "python/rabbitmq_example.py"],
                 ["node", "node/rabbitmq.js"]],
    "redis": [["sh", "shell/redis.sh"], ["/usr/bin/python3", "python/redis_example.py"], ["node", "node/redis.js"]],
}


def test_examples_publish_and_read_results():
    with Pool() as pool:
        for cmd in RUN[TRANSPORT]:
            r = subprocess.run(cmd, cwd=EX, capture_output=True, text=True, timeout=60)
            eq(r.returncode, 0, f"{' '.join(cmd)} exit status (stderr: {r.stderr[-500:]})")
            event = json.loads(r.stdout.strip().splitlines()[0])
            eq(event["type"], "product.created", f"{cmd[-1]} result event")
            check(event["data"]["status"] == "DRAFT", "a whole product.created event")
        eq(pool.stop(), (0, []), "clean stop")
