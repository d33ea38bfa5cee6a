#!/usr/bin/python3
"""Publish a createProduct command to Conveyor over RabbitMQ with pika, and wait
for its result event. Exit 0 if it is product.created. (Debian: python3-pika)"""
import json
import os
import sys
import time
import uuid

import pika

url = os.environ.get("CONVEYOR_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:55672")
conn = pika.BlockingConnection(pika.URLParameters(url))
ch = conn.channel()

# subscribe before publishing: a private queue bound to every event
ch.exchange_declare("conveyor.events", "topic", durable=True)
events = ch.queue_declare("", exclusive=True).method.queue
ch.queue_bind(events, "conveyor.events", routing_key="#")

command = {"id": str(uuid.uuid4()), "type": "createProduct",
           "payload": {"name": "Python mug", "price": "4.20", "stock": 12},
           "correlationId": "python-example"}
ch.confirm_delivery()  # publisher confirms: basic_publish raises if the broker refuses
ch.basic_publish("conveyor.commands", routing_key=command["type"], body=json.dumps(command),
                 properties=pika.BasicProperties(delivery_mode=2, content_type="application/json",
                                                 message_id=command["id"]),
                 mandatory=True)

deadline = time.time() + 10
while time.time() < deadline:
    method, props, body = ch.basic_get(events, auto_ack=True)
    if method is None:
        conn.sleep(0.05)
        continue
    event = json.loads(body)
    if event["commandId"] == command["id"]:  # the first event of a command is its result
        print(json.dumps(event))
        sys.exit(0 if event["type"] == "product.created" else 1)
print("no result event within 10 s", file=sys.stderr)
sys.exit(1)
