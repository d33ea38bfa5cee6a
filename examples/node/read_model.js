// A read model kept by a durable subscription: the stock of every product, in
// the subscriber's OWN PostgreSQL, each event applied exactly once (the same
// program as examples/python/read_model.py, with the `pg` package).
//
// It runs `conveyor-subscribe --name NAME --acks 'product.*' 'stock.*'` and reads
// one event per line. For each event, in ONE transaction of its own database, it
// calls conveyor.consume(NAME, event id) (the inbox: true the first time, false
// for a copy) and applies the event to public.stock_view only when that returned
// true; it commits, and only then answers `ack ID` on the subscriber's stdin. A
// failure rolls back and answers `nack ID REASON`: the event is handed out again
// later (after --max-attempts, to the subscription's dead letters).
//
// product.created, stock.updated, stock.low: the row gets data.stock;
// stock.depleted: 0; product.deleted: the row is removed; product.updated: nothing.
//
// Once, before it runs:  conveyor-admin subscriber install --database "$READ_MODEL_DATABASE_URL"
//
//   node read_model.js [--config queues.conf] [--name stock-view] [--database URL]
//                      [--from newest|oldest|TIME|EVENT_ID] [--bin conveyor-subscribe]
//                      [--count N] [--idle-exit SECONDS]
//
// --database defaults to $READ_MODEL_DATABASE_URL (the environment keeps a
// password out of ps). The last line on stdout is a
// summary: {"handled", "applied", "duplicates", "nacked"}.
const { spawn } = require('child_process');
const { constants } = require('os');
const { parseArgs } = require('util');
const { Client } = require('pg');

const SCHEMA = `CREATE TABLE IF NOT EXISTS public.stock_view (
    product_id    uuid PRIMARY KEY,
    stock         integer NOT NULL,
    last_event_id uuid NOT NULL,
    updated_at    timestamptz NOT NULL)`;
const UPSERT = `INSERT INTO public.stock_view (product_id, stock, last_event_id, updated_at)
VALUES ($1, $2, $3, $4)
ON CONFLICT (product_id) DO UPDATE SET stock = EXCLUDED.stock, last_event_id = EXCLUDED.last_event_id,
                                       updated_at = EXCLUDED.updated_at`;

// The command line, parsed; exits 2 with a message on a usage error.
function options() {
  const usage = 'usage: node read_model.js [--config FILE] [--name NAME] [--database URL] [--from WHERE] '
    + '[--bin PATH] [--count N] [--idle-exit SECONDS]';
  let values;
  try {
    ({ values } = parseArgs({
      options: {
        config: { type: 'string', short: 'c', default: 'queues.conf' },
        name: { type: 'string', default: 'stock-view' },
        database: { type: 'string', default: process.env.READ_MODEL_DATABASE_URL },
        from: { type: 'string' },
        bin: { type: 'string', default: 'conveyor-subscribe' },
        count: { type: 'string' },
        'idle-exit': { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
    }));
  } catch (err) {
    console.error(`${err.message}\n${usage}`);
    process.exit(2);
  }
  if (values.help) { console.log(usage); process.exit(0); }
  const count = values.count === undefined ? null : Number(values.count);
  const idle = values['idle-exit'] === undefined ? null : Number(values['idle-exit']);
  if (!values.database || (count !== null && !(count >= 0)) || (idle !== null && !(idle > 0))) {
    console.error(`${values.database ? 'bad --count or --idle-exit' : 'give --database URL or set READ_MODEL_DATABASE_URL'}\n${usage}`);
    process.exit(2);
  }
  return { ...values, count, idle };
}

// Applies one event's effect to public.stock_view on db (inside the caller's
// transaction). Throws on an event without the fields its type promises.
async function apply(db, event) {
  const { type, data } = event;
  if (['product.created', 'stock.updated', 'stock.low', 'stock.depleted'].includes(type)) {
    const stock = type === 'stock.depleted' ? 0 : data.stock;
    if (!data.productId || !Number.isInteger(stock)) throw new Error(`${type} without productId or stock`);
    await db.query(UPSERT, [data.productId, stock, event.id, event.occurredAt]);
  } else if (type === 'product.deleted') {
    await db.query('DELETE FROM public.stock_view WHERE product_id = $1', [data.productId]);
  } // product.updated and other types: nothing in this read model changes
}

// One event in one transaction of db: the inbox's row and the effect commit
// together. Resolves true when applied, false for a copy of an event already
// applied; rejects (after rolling back) when it could not be.
async function handle(db, name, event) {
  await db.query('BEGIN');
  try {
    const { rows } = await db.query('SELECT conveyor.consume($1, $2) AS first', [name, event.id]);
    if (rows[0].first) await apply(db, event);
    await db.query('COMMIT');
    return rows[0].first;
  } catch (err) {
    await db.query('ROLLBACK').catch(() => {});
    throw err;
  }
}

// The lines of a readable stream: next(timeoutMs) resolves to the next line,
// null at the end of the stream (or after close()), '' after timeoutMs (null: no
// limit) without one.
function lineReader(stream) {
  let buf = '';
  let ended = false;
  let wake = null;
  const lines = [];
  const notify = () => { if (wake) { const w = wake; wake = null; w(); } };
  stream.setEncoding('utf8');
  stream.on('data', (chunk) => {
    buf += chunk;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) { lines.push(buf.slice(0, i)); buf = buf.slice(i + 1); }
    notify();
  });
  stream.on('end', () => { ended = true; notify(); });
  return {
    close() { ended = true; lines.length = 0; notify(); },
    async next(timeoutMs) {
      const deadline = timeoutMs === null ? null : Date.now() + timeoutMs;
      while (!lines.length && !ended) {
        const left = deadline === null ? null : deadline - Date.now();
        if (left !== null && left <= 0) return '';
        let timer = null;
        await new Promise((resolve) => {
          wake = resolve;
          if (left !== null) timer = setTimeout(resolve, left);
        });
        clearTimeout(timer);
        wake = null;
      }
      return lines.length ? lines.shift() : null;
    },
  };
}

// A connected client of url; its .broken is set once its connection failed
// (then it is ended and a new one made). Rejects when it cannot connect.
async function connect(url) {
  const db = new Client({ connectionString: url });
  db.on('error', () => { db.broken = true; }); // a lost connection, between queries too
  await db.connect();
  return db;
}

// Runs the subscriber and handles its events until --count, --idle-exit, a
// signal, or the subscriber's own exit; sets the exit status: 0, or the
// subscriber's when it stopped by itself (2 usage or configuration, 3 a server
// unreachable), 2 when it cannot be run. Rejects when the read model's database
// cannot be reached at the start.
async function main() {
  const o = options();
  let db = await connect(o.database);
  await db.query(SCHEMA);
  const args = ['-c', o.config, '--name', o.name, '--acks'];
  if (o.from) args.push('--from', o.from);
  args.push('product.*', 'stock.*');
  // its stderr is ours: its log lines, and why it stopped
  const sub = spawn(o.bin, args, { stdio: ['pipe', 'pipe', 'inherit'] });
  let exitStatus = null;
  let gone = false;
  sub.on('error', (err) => { // before 'close'
    console.error(`read_model: cannot run ${o.bin}: ${err.message} (give its path with --bin)`);
    gone = true;
  });
  const exited = new Promise((resolve) => sub.on('close', (code, signal) => {
    if (gone && code !== null && code < 0) exitStatus = 2; // it never ran
    else exitStatus = code === null ? 128 + constants.signals[signal] : code;
    resolve();
  }));
  sub.stdin.on('error', () => { gone = true; }); // the subscriber has stopped: EPIPE
  // writes one answer (`ack ID`, `nack ID REASON`) to the subscriber's stdin; false once it has gone
  const answer = (line) => { if (!gone) sub.stdin.write(`${line}\n`); return !gone; };

  let stopping = false;
  const reader = lineReader(sub.stdout);
  for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => { stopping = true; reader.close(); });
  const counts = { handled: 0, applied: 0, duplicates: 0, nacked: 0 };
  let status = 0; // the subscriber's, when it stopped by itself
  while (!stopping && (o.count === null || counts.handled < o.count)) {
    const line = await reader.next(o.idle === null ? null : o.idle * 1000);
    if (line === null) {
      if (stopping) break;
      await exited;
      status = exitStatus;
      console.error(`read_model: conveyor-subscribe exited ${status}`);
      break;
    }
    if (line === '') { console.error(`read_model: no event for ${o.idle} s; stopping`); break; }
    const event = JSON.parse(line);
    let applied;
    try {
      if (!db) db = await connect(o.database); // lost with the database: try again with this event
      applied = await handle(db, o.name, event);
    } catch (err) { // rolled back: the subscription hands it out again later
      const reason = `${err.name}: ${err.message}`.split(/\s+/).join(' ').slice(0, 200);
      console.error(`read_model: ${event.type} ${event.id} failed: ${reason}`);
      counts.nacked += 1;
      if (db && db.broken) { db.end().catch(() => {}); db = null; } // connect again for the next one
      if (!answer(`nack ${event.id} ${reason}`)) break;
      continue;
    }
    if (!answer(`ack ${event.id}`)) break; // committed: a copy would be a duplicate now
    counts.handled += 1;
    counts[applied ? 'applied' : 'duplicates'] += 1;
    console.log(`${event.type} ${event.id} ${applied ? 'applied' : 'duplicate'}`);
  }
  // stop the subscriber: close its stdin (every answer is written by then), SIGTERM 10 s later
  if (exitStatus === null) {
    sub.stdin.end();
    const term = setTimeout(() => sub.kill('SIGTERM'), 10000);
    await exited;
    clearTimeout(term);
  }
  if (db) await db.end().catch(() => {});
  console.log(JSON.stringify(counts));
  // 0: stopped by --count, --idle-exit or a signal; else the status of a subscriber
  // that stopped by itself (2 usage or configuration, 3 unreachable)
  process.exitCode = status;
}

main().catch((err) => { console.error(`read_model: ${err.message}`); process.exit(1); });
