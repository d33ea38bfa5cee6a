// dashboard.mjs - drives the dashboard in Debian's headless Chromium for the
// integration test (never downloads a browser). Env: DASHBOARD_URL,
// DASHBOARD_TOKEN, SCREENSHOT (a .png path).
//
// JSON lines. Printed on stdout (nothing else is; debug goes to stderr):
//   {"step":"loaded"}                          page up, a queue row shown, token typed
//   {"step":"seen","id":ID,"ms":N} | {"step":"not_seen","id":ID}
//   {"step":"retried","status":TEXT}           the status line after the Retry click
//   {"step":"refused","statuses":[a,b,c,d]}    401, 403, 403, 415 expected
//   {"step":"cancelled","status":TEXT}         the status line after Cancel, Confirm cancel
//   {"step":"done","errors":[...]}             console errors, CSP warnings, page errors,
//                                              failed requests, responses >= 400
//   {"step":"crashed","error":TEXT}            then exit 1
// Read on stdin, one at a time, in order:
//   {"expect_command":ID}  {"retry_dead":ID}  {"refusals":true}  {"cancel_parked":ID}  {"finish":true}
import { chromium } from 'playwright-core';
import readline from 'node:readline';

const BASE = (process.env.DASHBOARD_URL || '').replace(/\/+$/, '');
const TOKEN = process.env.DASHBOARD_TOKEN || '';
const SCREENSHOT = process.env.SCREENSHOT || '';

const say = (o) => process.stdout.write(JSON.stringify(o) + '\n');
const debug = (...a) => process.stderr.write('dashboard.mjs: ' + a.join(' ') + '\n');
const q = (v) => '"' + String(v).replace(/["\\]/g, '\\$&') + '"'; // a CSS attribute value

const errors = [];
let recording = true;
// Failures the test provokes on purpose (the 401 of refusals (a)): how many of each to let pass.
const provoked = { response: 0, console: 0 };
let browser = null;
let page = null;

function record(s) {
  if (!recording) return;
  debug('recorded:', s);
  errors.push(s);
}

const isProvokedUrl = (u) => {
  try {
    return new URL(u).pathname === '/api/dead/purge';
  } catch {
    return false;
  }
};

async function start() {
  if (!BASE) throw new Error('DASHBOARD_URL is not set');
  browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-default-apps',
      '--disable-sync',
      '--no-first-run',
      '--disable-features=Translate,MediaRouter,OptimizationHints',
    ],
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  page = await context.newPage();
  page.setDefaultTimeout(15000);

  page.on('console', (m) => {
    const type = m.type();
    const text = m.text();
    const csp = type === 'warning' && text.includes('Content Security Policy');
    if (type !== 'error' && !csp) return;
    const where = m.location() && m.location().url ? m.location().url : '';
    if (type === 'error' && provoked.console > 0 && text.includes('401') && (isProvokedUrl(where) || text.includes('/api/dead/purge'))) {
      provoked.console--;
      debug('let pass the provoked', text);
      return;
    }
    record(`console ${type}: ${text}${where ? ' (' + where + ')' : ''}`);
  });
  page.on('pageerror', (e) => record(`page error: ${e && e.message ? e.message : e}`));
  page.on('requestfailed', (r) => {
    const f = r.failure();
    record(`request failed: ${r.method()} ${r.url()}: ${f ? f.errorText : '?'}`);
  });
  page.on('response', (r) => {
    const s = r.status();
    if (s < 400) return;
    if (s === 401 && provoked.response > 0 && isProvokedUrl(r.url())) {
      provoked.response--;
      debug('let pass the provoked HTTP 401 of', r.url());
      return;
    }
    record(`HTTP ${s}: ${r.request().method()} ${r.url()}`);
  });

  await page.goto(BASE + '/', { waitUntil: 'load' });
  await page.locator('[data-test="queue-row"]').first().waitFor({ state: 'visible', timeout: 30000 });
  await page.locator('[data-test="token"]').fill(TOKEN);
  say({ step: 'loaded' });
}

async function expectCommand(id) {
  const t0 = performance.now();
  try {
    await page.locator(`[data-test="recent-row"][data-id=${q(id)}]`).first().waitFor({ state: 'visible', timeout: 5000 });
  } catch (e) {
    if (e && e.name === 'TimeoutError') return say({ step: 'not_seen', id });
    throw e;
  }
  say({ step: 'seen', id, ms: Math.round(performance.now() - t0) });
}

/* The status line's text once a message newer than seq shows, or why not. */
async function statusAfter(seq, what) {
  try {
    await page.waitForFunction(
      (seq) => {
        const s = document.querySelector('[data-test="status"]');
        return s && Number(s.getAttribute('data-seq') || 0) > seq;
      },
      seq,
      { timeout: 10000 }
    );
    return (await page.locator('[data-test="status"]').textContent()) || '';
  } catch (e) {
    if (!(e && e.name === 'TimeoutError')) throw e;
    return `no status shown within 10 s of ${what}`;
  }
}

async function retryDead(id) {
  const row = page.locator(`[data-test="dead-row"][data-command-id=${q(id)}]`).first();
  try {
    await row.waitFor({ state: 'visible', timeout: 20000 });
  } catch (e) {
    if (e && e.name === 'TimeoutError') throw new Error(`no dead letter row for command ${id} within 20 s (the page reads dead letters when the sampled counts change: every 5 s)`);
    throw e;
  }
  const key = await row.getAttribute('data-key');
  const show = row.locator('[data-test="dead-show"]');
  if ((await show.getAttribute('aria-expanded')) !== 'true') await show.click({ timeout: 10000 });
  await page.waitForFunction(
    ([key, id]) =>
      Array.from(document.querySelectorAll('[data-test="dead-message"]')).some(
        (p) => p.getAttribute('data-key') === key && p.textContent.includes(id)
      ),
    [key, id],
    { timeout: 5000 }
  );
  // Each message the status line shows bumps its data-seq: wait for the one of this click.
  const seq = Number((await page.locator('[data-test="status"]').getAttribute('data-seq')) || 0);
  await row.locator('[data-test="dead-retry"]').click({ timeout: 10000 });
  say({ step: 'retried', status: await statusAfter(seq, 'the Retry click') });
}

async function cancelParked(id) {
  const row = page.locator(`[data-test="parked-row"][data-id=${q(id)}]`).first();
  await row.waitFor({ state: 'visible', timeout: 20000 });
  const seq = Number((await page.locator('[data-test="status"]').getAttribute('data-seq')) || 0);
  const button = row.locator('[data-test="parked-cancel"]');
  await button.click({ timeout: 10000 }); // arms it: "Confirm cancel"
  await button.click({ timeout: 10000 });
  const status = await statusAfter(seq, 'the Cancel click');
  await row.waitFor({ state: 'detached', timeout: 10000 });
  say({ step: 'cancelled', status });
}

async function refusals() {
  const first = page.locator('[data-test="queue-row"]').first();
  const queue = await first.getAttribute('data-queue');
  // (b)-(d) ask for the opposite of the queue's state: one obeyed would change it (the Python side checks)
  const paused = (await first.getAttribute('data-paused')) === 'true';
  // (a) from the page, no Authorization: 401, provoked on purpose.
  provoked.response++;
  provoked.console++;
  const a = await page.evaluate(async (queue) => {
    const r = await fetch('/api/dead/purge', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ queue, keys: ['x'] }),
    });
    await r.text();
    return r.status;
  }, queue);
  // (b)-(d) from Node, not the page.
  const origin = new URL(BASE).origin;
  const body = JSON.stringify({ queue, paused: !paused });
  const post = async (headers) => {
    const r = await fetch(BASE + '/api/queue/pause', { method: 'POST', headers, body });
    await r.arrayBuffer();
    return r.status;
  };
  const auth = { Authorization: 'Bearer ' + TOKEN };
  const b = await post({ ...auth, 'Content-Type': 'application/json', Origin: 'http://evil.example' });
  const c = await post({ ...auth, 'Content-Type': 'application/json', Origin: origin, 'Sec-Fetch-Site': 'cross-site' });
  const d = await post({ ...auth, 'Content-Type': 'text/plain', Origin: origin });
  say({ step: 'refused', statuses: [a, b, c, d] });
}

async function finish() {
  if (SCREENSHOT) await page.screenshot({ path: SCREENSHOT, fullPage: true });
  recording = false;
  await browser.close();
  browser = null;
  say({ step: 'done', errors });
  process.exit(0);
}

async function handle(line) {
  const msg = JSON.parse(line);
  if (typeof msg.expect_command === 'string') return expectCommand(msg.expect_command);
  if (typeof msg.retry_dead === 'string') return retryDead(msg.retry_dead);
  if (msg.refusals) return refusals();
  if (typeof msg.cancel_parked === 'string') return cancelParked(msg.cancel_parked);
  if (msg.finish) return finish();
  throw new Error('unknown message: ' + line);
}

let crashed = false;
async function crash(e) {
  if (crashed) return;
  crashed = true;
  debug('crashed:', e && e.stack ? e.stack : e);
  // Playwright's messages carry a colored call log: plain text only.
  const text = String(e && e.message ? e.message : e).replace(/\x1b\[[0-9;]*m/g, '').trim();
  say({ step: 'crashed', error: text });
  recording = false;
  try {
    if (browser) await browser.close();
  } catch {
    /* going anyway */
  }
  process.exit(1);
}

// Messages are handled one after the other, in order, once the page is loaded.
let chain = start();
const rl = readline.createInterface({ input: process.stdin, terminal: false });
rl.on('line', (line) => {
  if (!line.trim()) return;
  chain = chain.then(() => handle(line));
  chain.catch(crash);
});
rl.on('close', () => {
  chain = chain.then(() => {
    throw new Error('stdin closed before {"finish":true}');
  });
  chain.catch(crash);
});
chain.catch(crash);
