// Publish a createProduct command to Conveyor over RabbitMQ with amqplib, and
// wait for its result event. Exit 0 if it is product.created.
const amqp = require('amqplib');
const { randomUUID } = require('crypto');

async function main() {
  const url = process.env.CONVEYOR_RABBITMQ_URL || 'amqp://guest:guest@127.0.0.1:55672';
  const conn = await amqp.connect(url);
  const ch = await conn.createConfirmChannel(); // publisher confirms

  // subscribe before publishing: a private queue bound to every event
  await ch.assertExchange('conveyor.events', 'topic', { durable: true });
  const { queue } = await ch.assertQueue('', { exclusive: true });
  await ch.bindQueue(queue, 'conveyor.events', '#');

  const command = {
    id: randomUUID(), type: 'createProduct', correlationId: 'node-example',
    payload: { name: 'Node mug', price: '5.00', stock: 3 },
  };
  const result = new Promise((resolve) => {
    ch.consume(queue, (msg) => {
      const event = JSON.parse(msg.content.toString());
      if (event.commandId === command.id) resolve(event); // the first event of a command is its result
    }, { noAck: true });
  });
  ch.publish('conveyor.commands', command.type, Buffer.from(JSON.stringify(command)),
    { persistent: true, contentType: 'application/json', messageId: command.id, mandatory: true });
  await ch.waitForConfirms();

  const timeout = new Promise((_, reject) => setTimeout(() => reject(new Error('no result event within 10 s')), 10000));
  const event = await Promise.race([result, timeout]);
  console.log(JSON.stringify(event));
  await conn.close();
  process.exit(event.type === 'product.created' ? 0 : 1);
}

main().catch((err) => { console.error(err.message); process.exit(1); });
