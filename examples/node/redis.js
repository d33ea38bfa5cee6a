// Publish a createProduct command to Conveyor over Redis with ioredis, and wait
// for its result event on the stream. Exit 0 if it is product.created.
const Redis = require('ioredis');
const { randomUUID } = require('crypto');

async function main() {
  const redis = new Redis(process.env.CONVEYOR_REDIS_URL || 'redis://127.0.0.1:56379/0');
  const last = await redis.xrevrange('conveyor:events', '+', '-', 'COUNT', 1);
  let lastId = last.length ? last[0][0] : '0-0'; // read the stream from its current end

  const command = {
    id: randomUUID(), type: 'createProduct', correlationId: 'node-example',
    payload: { name: 'Node bowl', price: 1.25 },
  };
  await redis.lpush('conveyor:queue:catalog', JSON.stringify(command));

  const deadline = Date.now() + 10000;
  while (Date.now() < deadline) {
    const res = await redis.xread('COUNT', 100, 'BLOCK', 500, 'STREAMS', 'conveyor:events', lastId);
    for (const [, entries] of res || []) {
      for (const [id, fields] of entries) {
        lastId = id;
        const event = JSON.parse(fields[fields.indexOf('event') + 1]);
        if (event.commandId === command.id) { // the first event of a command is its result
          console.log(JSON.stringify(event));
          redis.disconnect();
          process.exit(event.type === 'product.created' ? 0 : 1);
        }
      }
    }
  }
  console.error('no result event within 10 s');
  process.exit(1);
}

main().catch((err) => { console.error(err.message); process.exit(1); });
