/* Conveyor dashboard: plain ES2020, no library. The DOM is built with
 * createElement/textContent only (dead-letter text is untrusted), under a CSP
 * without inline script or style. Polls: overview 1 s, history 2 s (hour) or
 * 30 s (day), dead letters 3 s, parked commands, schedules and rate limits 3 s. Rows are kept by key between polls so buttons
 * keep their focus and state. */
'use strict';
(() => {
  const $ = (id) => document.getElementById(id);
  const SVGNS = 'http://www.w3.org/2000/svg';
  const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
  const TOKEN_KEY = 'conveyor.token';
  const CONFIRM_MS = 5000;

  let route = { name: 'overview' };
  let actionsEnabled = false;
  let serverNow = Date.now();

  /* ---------- small helpers ---------- */

  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v == null || v === false) continue;
      if (k === 'text') el.textContent = v;
      else if (k === 'class') el.className = v;
      else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? '' : String(v));
    }
    for (const kid of kids) if (kid != null) el.append(kid);
    return el;
  }

  function svg(tag, attrs, parent) {
    const el = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
    if (parent) parent.appendChild(el);
    return el;
  }

  function setText(el, t) {
    t = t == null ? '' : String(t);
    if (el.textContent !== t) el.textContent = t;
  }

  function setClass(el, c) {
    if (el.getAttribute('class') !== c) el.setAttribute('class', c);
  }

  /* Keeps parent's keyed children in the order of items: reuses the element of
   * a key, creates the missing ones, removes the others. Children without a
   * key (a thead) stay first. */
  function reconcile(parent, items, keyOf, create, update) {
    const old = new Map();
    for (const el of Array.from(parent.children)) if (el.__key !== undefined) old.set(el.__key, el);
    const els = [];
    for (const it of items) {
      const k = String(keyOf(it));
      let el = old.get(k);
      if (el) old.delete(k);
      else {
        el = create(it);
        el.__key = k;
      }
      update(el, it);
      els.push(el);
    }
    for (const el of old.values()) el.remove();
    let cur = parent.firstElementChild;
    while (cur && cur.__key === undefined) cur = cur.nextElementSibling;
    for (const el of els) {
      if (el === cur) cur = cur.nextElementSibling;
      else parent.insertBefore(el, cur);
    }
  }

  const pad = (n) => String(n).padStart(2, '0');
  const num = (v) => typeof v === 'number' && isFinite(v);

  function fmtInt(v) {
    return num(v) ? Math.round(v).toLocaleString('en-US') : '—';
  }
  function fmtMs(sec) {
    if (!num(sec)) return '—';
    const ms = sec * 1000;
    if (ms < 1) return ms.toFixed(2) + ' ms';
    if (ms < 10) return ms.toFixed(1) + ' ms';
    if (ms < 1000) return Math.round(ms) + ' ms';
    return (ms / 1000).toFixed(ms < 10000 ? 2 : 1) + ' s';
  }
  function fmtRate(r) {
    if (!num(r)) return '—';
    return r < 10 ? r.toFixed(1) : Math.round(r).toLocaleString('en-US');
  }
  function fmtAge(s) {
    if (!num(s) || s < 0) return '—';
    if (s < 60) return Math.round(s) + ' s';
    if (s < 3600) return Math.floor(s / 60) + ' min ' + pad(Math.floor(s % 60)) + ' s';
    if (s < 86400) return (s / 3600).toFixed(1) + ' h';
    return (s / 86400).toFixed(1) + ' d';
  }
  function fmtMiB(b) {
    return num(b) ? (b / 1048576).toFixed(1) : '—';
  }
  function parseTime(iso) {
    const t = typeof iso === 'string' ? Date.parse(iso) : NaN;
    return isNaN(t) ? null : new Date(t);
  }
  function fmtClock(d) {
    return pad(d.getHours()) + ':' + pad(d.getMinutes()) + ':' + pad(d.getSeconds());
  }
  function fmtTime(iso) {
    const d = parseTime(iso);
    return d ? fmtClock(d) : iso || '—';
  }
  function fmtDateTime(iso) {
    const d = parseTime(iso);
    if (!d) return iso || '—';
    return d.getFullYear() + '-' + pad(d.getMonth() + 1) + '-' + pad(d.getDate()) + ' ' + fmtClock(d);
  }
  const plural = (n, word) => n + ' ' + word + (n === 1 ? '' : 's');
  const shortId = (id) => (typeof id === 'string' && id.length > 13 ? id.slice(0, 8) + '…' : id || '');

  function prettyJson(v) {
    if (typeof v === 'string') {
      try {
        return JSON.stringify(JSON.parse(v), null, 2);
      } catch (e) {
        return v;
      }
    }
    try {
      return JSON.stringify(v, null, 2);
    } catch (e) {
      return String(v);
    }
  }

  function commandLink(id, short) {
    const a = h('a', { href: '#/command/' + encodeURIComponent(id), class: 'mono', title: id, text: short ? shortId(id) : id });
    return a;
  }

  /* ---------- HTTP ---------- */

  /* Never rejects: {ok, status, data} or {ok:false, status (0: no answer), error}. */
  async function api(path, opts) {
    let res, text;
    /* reading needs the token too when the listener is not on loopback: sent when typed */
    const tk = token();
    if (tk && /^[\x21-\x7e]+$/.test(tk) && !(opts && opts.headers)) {
      opts = Object.assign({}, opts, { headers: { Authorization: 'Bearer ' + tk } });
    }
    try {
      res = await fetch(path, Object.assign({ cache: 'no-store', credentials: 'same-origin' }, opts));
      text = await res.text();
    } catch (e) {
      return { ok: false, status: 0, error: 'disconnected' };
    }
    let body = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch (e) {
      body = null;
    }
    if (!res.ok) {
      const msg = body && typeof body.error === 'string' ? body.error : text.trim().slice(0, 200);
      return { ok: false, status: res.status, error: msg || 'HTTP ' + res.status };
    }
    if (body === null || typeof body !== 'object') return { ok: false, status: res.status, error: 'not a JSON object' };
    return { ok: true, status: res.status, data: body };
  }

  const problems = new Map(); /* poll source -> message */
  function note(source, r) {
    if (r.ok || (r.status >= 400 && r.status < 500 && r.status !== 401 && r.status !== 403)) problems.delete(source);
    else if (r.status === 401 || r.status === 403) problems.set(source, r.error + ' (enter the token above)');
    else problems.set(source, r.status === 0 ? 'disconnected — retrying' : 'server error: ' + r.error + ' — retrying');
    const banner = $('banner');
    banner.hidden = problems.size === 0;
    if (problems.size) setText(banner, problems.has('overview') ? problems.get('overview') : problems.values().next().value);
  }

  /* A poll: run() every interval() ms after the previous one ended; kick() runs it now. */
  function poller(run, interval) {
    let timer = 0,
      busy = false,
      again = false;
    async function tick() {
      clearTimeout(timer);
      if (busy) {
        again = true;
        return;
      }
      busy = true;
      try {
        await run();
      } catch (e) {
        console.error('conveyor dashboard:', e);
      }
      busy = false;
      timer = setTimeout(tick, again ? 0 : interval());
      again = false;
    }
    return { kick: tick };
  }

  /* ---------- status line and actions ---------- */

  let statusTimer = 0,
    statusSeq = 0;
  function status(msg, bad) {
    const el = $('status');
    el.textContent = msg;
    el.setAttribute('data-seq', String(++statusSeq));
    el.className = 'status show' + (bad ? ' bad' : '');
    clearTimeout(statusTimer);
    statusTimer = setTimeout(() => el.classList.remove('show'), 12000);
  }

  function token() {
    return $('token').value.trim();
  }

  async function post(path, body, what) {
    if (!actionsEnabled) {
      status('actions are off: set http.token or http.token_file in queues.conf', true);
      return null;
    }
    const t = token();
    if (!t) {
      status('enter the action token first', true);
      $('token').focus();
      return null;
    }
    if (!/^[\x21-\x7e]+$/.test(t)) {
      status('the action token has characters an HTTP header cannot carry', true);
      return null;
    }
    const r = await api(path, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Authorization: 'Bearer ' + t },
      body: JSON.stringify(body),
    });
    if (!r.ok) {
      status(what + ' failed: ' + (r.status ? r.error + ' (HTTP ' + r.status + ')' : 'no answer from the server'), true);
      return null;
    }
    return r.data;
  }

  /* Action buttons carry data-action; they are enabled when actions are on and none of theirs runs. */
  function refreshButton(b) {
    const off = !actionsEnabled || !!b.__busy;
    if (b.disabled !== off) b.disabled = off;
  }
  function refreshButtons() {
    for (const b of document.querySelectorAll('button[data-action]')) refreshButton(b);
  }
  function actionButton(label, test, onclick) {
    const b = h('button', { type: 'button', 'data-action': '', 'data-test': test, text: label });
    b.addEventListener('click', onclick);
    refreshButton(b);
    return b;
  }
  async function busyWhile(buttons, fn) {
    for (const b of buttons) {
      b.__busy = true;
      refreshButton(b);
    }
    try {
      return await fn();
    } finally {
      for (const b of buttons) {
        b.__busy = false;
        refreshButton(b);
      }
    }
  }

  /* First click arms the button (its text becomes the confirmation) for 5 s;
   * a second click within them fires. */
  function twoStep(btn, confirmText, fire) {
    if (btn.__armed) {
      disarm(btn);
      fire();
      return;
    }
    btn.__armed = setTimeout(() => disarm(btn), CONFIRM_MS);
    btn.classList.add('armed');
    btn.textContent = confirmText;
  }
  function disarm(btn) {
    clearTimeout(btn.__armed);
    btn.__armed = 0;
    btn.classList.remove('armed');
    btn.textContent = btn.__label;
  }
  function setLabel(btn, label) {
    btn.__label = label;
    if (!btn.__armed) setText(btn, label);
  }

  /* ---------- overview ---------- */

  function renderOverview(o) {
    deadSig = Array.isArray(o.queues) ? o.queues.map((q) => q.name + ':' + q.dead).join(',') : '';
    if (parseTime(o.now)) serverNow = parseTime(o.now).getTime();
    const pool = o.pool || {};
    setText($('pid'), num(pool.pid) ? pool.pid : '—');
    setText($('version'), o.version || '—');
    document.title = 'Conveyor' + (num(pool.pid) ? ' · pool ' + pool.pid : '');
    $('draining').hidden = !pool.draining;
    /* the database breaker: a badge while it is not closed, its reason as the title */
    const breaker = o.breaker || {};
    $('breaker').hidden = !breaker.state || breaker.state === 'closed';
    setText($('breaker'), 'database breaker ' + (breaker.state || ''));
    $('breaker').title = breaker.reason || '';

    reconcile(
      $('deps'),
      Object.entries(o.dependencies || {}),
      (e) => e[0],
      () => h('li'),
      (el, [name, v]) => {
        const st = v === true ? 'up' : v === false ? 'down' : 'unused';
        setText(el, name + ' ' + st);
        setClass(el, 'badge ' + (st === 'up' ? 'good' : st === 'down' ? 'bad' : 'dim'));
      }
    );

    const enabled = !!(o.actions && o.actions.enabled);
    if (enabled !== actionsEnabled) {
      actionsEnabled = enabled;
      refreshButtons();
    }
    $('actions-off').hidden = enabled;

    const queues = Array.isArray(o.queues) ? o.queues : [];
    reconcile($('queues'), queues, (q) => q.name, createQueueRow, updateQueueRow);
    $('queues-empty').hidden = queues.length > 0;

    const workers = Array.isArray(o.workers) ? o.workers : [];
    reconcile($('workers'), workers, (w) => w.slot, createWorkerRow, updateWorkerRow);
    $('workers-empty').hidden = workers.length > 0;

    const ob = o.outbox || {};
    const relay = o.relay || {};
    setText($('ob-pending'), fmtInt(ob.pending));
    setText($('ob-age'), fmtAge(ob.oldestAgeSeconds));
    setText($('relay-state'), relay.active ? 'active' : 'inactive');
    setClass($('relay-state'), 'badge ' + (relay.active ? 'good' : 'bad'));
    setText($('relay-pid'), num(relay.pid) && relay.pid > 0 ? 'pid ' + relay.pid : '');
    setText($('relay-published'), fmtInt(relay.published));

    const recent = Array.isArray(o.recent) ? o.recent : [];
    reconcile($('recent'), recent, (c) => c.id, createRecentRow, updateRecentRow);
    $('recent-empty').hidden = recent.length > 0;
  }

  function cells(tr, n, numeric) {
    const tds = [];
    for (let i = 0; i < n; i++) tds.push(tr.appendChild(h('td', { class: numeric.includes(i) ? 'num' : null })));
    return tds;
  }

  /* The Pause / Resume button (tr.__b) and state badge (tr.__state) of a row
   * whose item tr.__item ({name, paused}) is paused by a POST to path with
   * {[key]: name, paused}; what names its kind in messages ('' for a queue);
   * then update(tr, item) redraws the row and poll is kicked. */
  function pauseControls(tr, test, path, key, what, update, poll) {
    tr.__state = h('span', { class: 'badge' });
    const b = (tr.__b = actionButton('Pause', test, async () => {
      const cur = tr.__item;
      const want = !cur.paused;
      const r = await busyWhile([b], () => post(path, { [key]: cur.name, paused: want }, (want ? 'pause ' : 'resume ') + what + cur.name));
      if (r) {
        status(what + r[key] + ': ' + (r.paused ? 'paused' : 'resumed'));
        cur.paused = !!r.paused;
        update(tr, cur);
        poll().kick();
      }
    }));
    return [tr.__state, b];
  }
  /* Shows item's state (running: the word when not paused) on its row's badge and button. */
  function showPaused(tr, item, running) {
    tr.__item = item;
    setText(tr.__state, item.paused ? 'paused' : running);
    setClass(tr.__state, 'badge ' + (item.paused ? 'warn' : 'good'));
    tr.setAttribute('data-paused', item.paused ? 'true' : 'false');
    setText(tr.__b, item.paused ? 'Resume' : 'Pause');
    tr.__b.setAttribute('aria-label', (item.paused ? 'Resume ' : 'Pause ') + item.name);
  }

  function createQueueRow(q) {
    const tr = h('tr', { 'data-test': 'queue-row', 'data-queue': q.name });
    const c = cells(tr, 12, [2, 3, 4, 5, 6, 7, 8, 9]);
    c[0].className = 'name';
    const [state, b] = pauseControls(tr, 'queue-pause', '/api/queue/pause', 'queue', '', updateQueueRow, () => polls.overview);
    c[10].append(state);
    c[11].append(b);
    tr.__c = c;
    return tr;
  }
  function updateQueueRow(tr, q) {
    const c = tr.__c;
    setText(c[0], q.name);
    setText(c[1], q.transport || '—');
    setText(c[2], fmtInt(q.depth));
    setText(c[3], q.inFlight == null ? '—' : fmtInt(q.inFlight));
    setText(c[4], fmtInt(q.retrying));
    setText(c[5], fmtInt(q.dead));
    setClass(c[5], q.dead > 0 ? 'num hot' : 'num');
    setText(c[6], fmtRate(q.ratePerSecond));
    setText(c[7], fmtMs(q.latencyP50Seconds));
    setText(c[8], fmtMs(q.latencyP99Seconds));
    setText(c[9], fmtInt(q.done));
    showPaused(tr, q, 'running');
  }

  function createWorkerRow() {
    const tr = h('tr');
    const c = cells(tr, 7, [0, 1, 5, 6]);
    c[3].append((tr.__state = h('span', { class: 'badge' })));
    tr.__c = c;
    return tr;
  }
  function updateWorkerRow(tr, w) {
    const c = tr.__c;
    setText(c[0], w.slot);
    setText(c[1], num(w.pid) && w.pid > 0 ? w.pid : '—');
    setText(c[2], w.queue || '—');
    setText(tr.__state, w.state || '—');
    const kind = { idle: 'good', busy: 'info', starting: 'dim', down: 'bad', retired: 'dim' }[w.state] || 'dim';
    setClass(tr.__state, 'badge ' + kind);
    const cur = w.current && typeof w.current.id === 'string' ? w.current : null;
    const key = cur ? cur.id + '\n' + (cur.type || '') : '';
    if (c[4].__cur !== key) {
      c[4].__cur = key;
      c[4].replaceChildren();
      if (cur) c[4].append(commandLink(cur.id, true), ' ', h('span', { class: 'muted', text: cur.type || '' }));
      else c[4].append(h('span', { class: 'muted', text: '—' }));
    }
    setText(c[5], fmtInt(w.done));
    setText(c[6], fmtMiB(w.residentBytes));
  }

  function createRecentRow(r) {
    const tr = h('tr', { 'data-test': 'recent-row', 'data-id': r.id });
    const c = cells(tr, 4, []);
    c[0].append(commandLink(r.id, false));
    c[2].append((tr.__out = h('span', { class: 'badge' })));
    c[3].append((tr.__time = h('time')));
    tr.__c = c;
    return tr;
  }
  function updateRecentRow(tr, r) {
    setText(tr.__c[1], r.type || '—');
    setText(tr.__out, r.outcome || '—');
    setClass(tr.__out, 'badge ' + (r.outcome === 'applied' ? 'good' : r.outcome === 'rejected' ? 'warn' : 'dim'));
    setText(tr.__time, fmtTime(r.processedAt));
    if (r.processedAt) tr.__time.setAttribute('datetime', r.processedAt);
    const d = parseTime(r.processedAt);
    tr.__time.title = d ? fmtDateTime(r.processedAt) + ' (' + fmtAge(Math.max(0, (serverNow - d.getTime()) / 1000)) + ' ago)' : '';
  }

  /* ---------- dead letters ---------- */

  function renderDead(d) {
    const queues = Array.isArray(d.queues) ? d.queues : [];
    const full = queues.filter((q) => q.total > 0 || (Array.isArray(q.groups) && q.groups.length));
    const empty = queues.filter((q) => !full.includes(q)).map((q) => q.queue);
    let s;
    if (!queues.length) s = 'No queues.';
    else if (!full.length) s = 'No dead letters.';
    else s = empty.length ? 'No dead letters in ' + empty.join(', ') + '.' : '';
    setText($('dead-summary'), s);
    $('dead-summary').hidden = !s;
    reconcile($('dead-queues'), full, (q) => q.queue, createDeadQueue, updateDeadQueue);
  }

  function createDeadQueue(q) {
    const name = h('span', { text: q.queue });
    const meta = h('span', { class: 'muted small' });
    const groups = h('div', { class: 'groups' });
    const el = h('div', { class: 'dq' }, h('h3', null, name, ' ', meta), groups);
    el.__meta = meta;
    el.__groups = groups;
    return el;
  }
  function updateDeadQueue(el, q) {
    let m = (q.transport || '') + ' · ' + plural(num(q.total) ? q.total : 0, 'dead letter');
    if (num(q.shown) && q.shown < q.total) m += ', ' + q.shown + ' shown';
    setText(el.__meta, m);
    const groups = Array.isArray(q.groups) ? q.groups : [];
    reconcile(el.__groups, groups, (g) => g.reason, (g) => createDeadGroup(q.queue, g), updateDeadGroup);
  }

  function createDeadGroup(queue, g) {
    const el = h('div', { class: 'dg' });
    const count = h('span', { class: 'muted small' });
    const bulk = (verb) => {
      const b = actionButton('', 'dead-' + verb + '-all', () => {
        if (b.__armed) {
          twoStep(b, '', () => bulkAction(verb, queue, b.__keys, el));
          return;
        }
        b.__keys = (el.__g.letters || []).map((l) => l.key);
        if (!b.__keys.length) return;
        twoStep(b, 'Confirm: ' + verb + ' ' + plural(b.__keys.length, 'dead letter') + ' of ' + queue, null);
      });
      return b;
    };
    el.__retry = bulk('retry');
    el.__purge = bulk('purge');
    el.__count = count;
    const thead = h(
      'thead',
      null,
      h(
        'tr',
        null,
        ...['Command / key', 'Type', 'Error', 'Attempts', 'Age', 'Actions'].map((t, i) => h('th', { scope: 'col', class: i === 3 || i === 4 ? 'num' : null, text: t }))
      )
    );
    el.__table = h('table', { class: 'letters' }, thead);
    el.append(
      h('div', { class: 'dg-head' }, h('h4', { text: g.reason || '—' }), count, h('span', { class: 'spacer' }), el.__retry, el.__purge),
      h('div', { class: 'scroll' }, el.__table)
    );
    el.__queue = queue;
    return el;
  }
  function updateDeadGroup(el, g) {
    el.__g = g;
    const letters = Array.isArray(g.letters) ? g.letters : [];
    const n = num(g.count) ? g.count : letters.length;
    setText(el.__count, plural(n, 'letter') + (letters.length < n ? ', ' + letters.length + ' shown' : ''));
    setLabel(el.__retry, 'Retry ' + letters.length);
    setLabel(el.__purge, 'Purge ' + letters.length);
    el.__retry.hidden = el.__purge.hidden = letters.length === 0;
    reconcile(el.__table, letters, (l) => l.key, (l) => createLetter(el.__queue, l), updateLetter);
  }

  async function bulkAction(verb, queue, keys, groupEl) {
    if (!keys || !keys.length) return;
    const r = await busyWhile([groupEl.__retry, groupEl.__purge], () => post('/api/dead/' + verb, { queue, keys }, verb + ' of ' + plural(keys.length, 'dead letter') + ' of ' + queue));
    if (r) reportDead(verb, r);
  }
  function reportDead(verb, r) {
    const done = verb === 'retry' ? r.requeued : r.purged;
    let msg = r.queue + ': ' + (verb === 'retry' ? 'requeued ' : 'purged ') + done + ' of ' + r.asked;
    if (r.missing) msg += ' (' + r.missing + ' no longer there)';
    status(msg);
    deadDirty = true;
    polls.dead.kick();
    polls.overview.kick();
  }

  function createLetter(queue, l) {
    const tb = h('tbody', { class: 'letter' });
    const tr = h('tr', { 'data-test': 'dead-row', 'data-key': l.key, 'data-command-id': l.commandId || '' });
    const c = cells(tr, 6, [3, 4]);
    if (l.commandId) c[0].append(commandLink(l.commandId, false));
    else c[0].append(h('span', { class: 'mono muted', text: l.key }));
    c[2].className = 'err';
    const show = h('button', { type: 'button', 'data-test': 'dead-show', 'aria-expanded': 'false', text: 'Show' });
    show.addEventListener('click', () => toggleLetter(tb, queue, l.key));
    const retry = actionButton('Retry', 'dead-retry', async () => {
      const r = await busyWhile([retry, purge], () => post('/api/dead/retry', { queue, keys: [l.key] }, 'retry of ' + (l.commandId || l.key)));
      if (r) reportDead('retry', r);
    });
    const purge = actionButton('Purge', 'dead-purge', () =>
      twoStep(purge, 'Confirm purge', async () => {
        const r = await busyWhile([retry, purge], () => post('/api/dead/purge', { queue, keys: [l.key] }, 'purge of ' + (l.commandId || l.key)));
        if (r) reportDead('purge', r);
      })
    );
    purge.__label = 'Purge';
    c[5].className = 'actions';
    c[5].append(show, retry, purge);
    tb.append(tr);
    tb.__c = c;
    tb.__show = show;
    return tb;
  }
  function updateLetter(tb, l) {
    const c = tb.__c;
    setText(c[1], l.type || '—');
    setText(c[2], l.error || '');
    c[2].title = l.error || '';
    setText(c[3], fmtInt(l.attempts));
    setText(c[4], fmtAge(l.ageSeconds));
  }

  async function toggleLetter(tb, queue, key) {
    const show = tb.__show;
    if (tb.__detail) {
      tb.__detail.remove();
      tb.__detail = null;
      show.textContent = 'Show';
      show.setAttribute('aria-expanded', 'false');
      return;
    }
    const panel = h('div', { class: 'panel', 'data-test': 'dead-message', 'data-key': key }, h('p', { class: 'muted', text: 'Loading…' }));
    const row = h('tr', { class: 'detail' }, h('td', { colspan: '6' }, panel));
    tb.__detail = row;
    tb.append(row);
    show.textContent = 'Hide';
    show.setAttribute('aria-expanded', 'true');
    const r = await api('/api/dead/letter?queue=' + encodeURIComponent(queue) + '&key=' + encodeURIComponent(key));
    if (tb.__detail !== row) return;
    panel.replaceChildren();
    if (!r.ok) {
      panel.append(h('p', { class: r.status === 404 ? 'muted' : 'bad-text', text: r.status === 404 ? 'This letter is gone (retried or purged).' : 'Could not load it: ' + r.error }));
      return;
    }
    panel.append(letterView(r.data));
  }

  function dl(pairs) {
    const el = h('dl', { class: 'kv' });
    for (const [k, v] of pairs) if (v != null && v !== '') el.append(h('dt', { text: k }), h('dd', null, v));
    return el;
  }

  function letterView(d) {
    const frag = document.createDocumentFragment();
    frag.append(
      dl([
        ['Queue', d.queue],
        ['Command', d.commandId ? commandLink(d.commandId, false) : '—'],
        ['Type', d.type],
        ['Reason', d.reason],
        ['Error', d.error ? h('span', { class: 'err-full', text: d.error }) : null],
        ['Attempts', num(d.attempts) ? String(d.attempts) : null],
        ['Failed at', d.failedAt ? fmtDateTime(d.failedAt) + ' (' + fmtAge(d.ageSeconds) + ' ago)' : null],
      ]),
      h('p', { class: 'small muted', text: 'Message (secrets masked):' }),
      h('pre', { class: 'code', text: prettyJson(d.message == null ? '' : d.message) })
    );
    return frag;
  }

  /* ---------- parked commands and schedules ---------- */

  function fmtDue(iso) {
    const d = parseTime(iso);
    if (!d) return '—';
    const s = (d.getTime() - serverNow) / 1000;
    return fmtDateTime(iso) + (s > 0 ? ' (in ' + fmtAge(s) + ')' : ' (due)');
  }

  function renderScheduled(d) {
    const queues = Array.isArray(d.queues) ? d.queues : [];
    reconcile($('parked-queues'), queues, (q) => q.queue, createParkedQueue, updateParkedQueue);
    const rows = Array.isArray(d.rows) ? d.rows : [];
    reconcile($('parked-rows'), rows, (r) => r.id, createParkedRow, updateParkedRow);
    $('parked-empty').hidden = rows.length > 0;
  }
  function createParkedQueue(q) {
    const tr = h('tr', { 'data-test': 'parked-queue', 'data-queue': q.queue });
    tr.__c = cells(tr, 3, [1]);
    return tr;
  }
  function updateParkedQueue(tr, q) {
    setText(tr.__c[0], q.queue);
    setText(tr.__c[1], fmtInt(q.parked));
    setText(tr.__c[2], q.nextDueAt ? fmtDue(q.nextDueAt) : '—');
  }
  function createParkedRow(r) {
    const tr = h('tr', { 'data-test': 'parked-row', 'data-id': r.id });
    const c = cells(tr, 6, []);
    c[0].append(commandLink(r.id, false));
    const b = actionButton('Cancel', 'parked-cancel', () =>
      twoStep(b, 'Confirm cancel', async () => {
        const res = await busyWhile([b], () => post('/api/scheduled/cancel', { id: r.id }, 'cancel of ' + r.id));
        if (res) {
          status(res.id + ': cancelled (command.rejected CANCELLED)');
          polls.scheduled.kick();
        }
      })
    );
    b.__label = 'Cancel';
    c[5].className = 'actions';
    c[5].append(b);
    tr.__c = c;
    return tr;
  }
  function updateParkedRow(tr, r) {
    const c = tr.__c;
    setText(c[1], r.queue || '—');
    setText(c[2], r.type || '—');
    setText(c[3], (r.reason || '—') + (r.schedule ? ' · ' + r.schedule : ''));
    setText(c[4], fmtDue(r.dueAt));
  }

  function renderSchedules(d) {
    const list = Array.isArray(d.schedules) ? d.schedules : [];
    reconcile($('schedules'), list, (s) => s.name, createScheduleRow, updateScheduleRow);
    $('schedules-empty').hidden = list.length > 0;
  }
  function createScheduleRow(s) {
    const tr = h('tr', { 'data-test': 'schedule-row', 'data-name': s.name });
    const c = cells(tr, 10, [6, 7]);
    c[0].className = 'name';
    const [state, b] = pauseControls(tr, 'schedule-pause', '/api/schedules/pause', 'name', 'schedule ', updateScheduleRow, () => polls.schedules);
    c[8].append(state);
    c[9].append(b);
    tr.__c = c;
    return tr;
  }
  function updateScheduleRow(tr, s) {
    const c = tr.__c;
    setText(c[0], s.name);
    setText(c[1], s.type || '—');
    setText(c[2], s.kind === 'every' ? 'every ' + fmtInt(s.everySeconds) + ' s' : (s.cron || '—') + ' (' + (s.timezone || 'UTC') + ')');
    setText(c[3], s.nextSlotAt ? fmtDue(s.nextSlotAt) : '—');
    setText(c[4], s.lastSlot || '—');
    const key = (s.lastCommandId || '') + '\n' + (s.lastOutcome || '');
    if (c[5].__cur !== key) {
      c[5].__cur = key;
      c[5].replaceChildren();
      const kind = s.lastOutcome === 'applied' ? 'good' : s.lastOutcome === 'rejected' ? 'warn' : 'dim';
      if (s.lastOutcome) c[5].append(h('span', { class: 'badge ' + kind, text: s.lastOutcome }));
      if (s.lastCommandId) c[5].append(' ', commandLink(s.lastCommandId, true));
      if (!s.lastOutcome && !s.lastCommandId) c[5].append(h('span', { class: 'muted', text: '—' }));
    }
    setText(c[6], fmtInt(s.fired));
    setText(c[7], fmtInt(s.missed));
    showPaused(tr, s, 'active');
  }

  /* ---------- rate limits ---------- */

  function renderLimits(d) {
    const list = Array.isArray(d.limits) ? d.limits : [];
    reconcile($('limits'), list, (l) => l.name, createLimitRow, updateLimitRow);
    $('limits-empty').hidden = list.length > 0;
  }
  function createLimitRow(l) {
    const tr = h('tr', { 'data-test': 'limit-row', 'data-name': l.name });
    const c = cells(tr, 9, [3, 6, 7, 8]);
    c[0].className = 'name';
    tr.__c = c;
    return tr;
  }
  function updateLimitRow(tr, l) {
    const c = tr.__c;
    setText(c[0], l.name);
    setText(c[1], l.queue ? 'queue ' + l.queue : (l.types || []).join(', '));
    setText(c[2], l.rate);
    setText(c[3], fmtInt(l.burst));
    setText(c[4], l.over);
    setText(c[5], l.key || '—');
    setText(c[6], (Math.floor(l.tokens * 10) / 10).toFixed(1));
    setText(c[7], fmtInt(l.waited));
    setText(c[8], fmtInt(l.rejected));
  }

  /* ---------- lanes ---------- */

  function renderLanes(d) {
    const rows = [];
    for (const q of Array.isArray(d.queues) ? d.queues : [])
      for (const k of Array.isArray(q.classes) ? q.classes : []) rows.push({ q, k });
    reconcile($('lanes'), rows, (r) => r.q.queue + '/' + r.k.class, createLaneRow, updateLaneRow);
    $('lanes-empty').hidden = rows.length > 0;
  }
  function createLaneRow(r) {
    const tr = h('tr', { 'data-test': 'lane-row', 'data-queue': r.q.queue, 'data-class': r.k.class });
    const c = cells(tr, 6, [2, 3, 5]);
    c[0].className = 'name';
    tr.__c = c;
    return tr;
  }
  function updateLaneRow(tr, r) {
    const c = tr.__c;
    setText(c[0], r.q.queue + (r.q.ordered ? ' (ordered)' : ''));
    setText(c[1], r.k.class);
    setText(c[2], fmtInt(r.q.lanes));
    setText(c[3], fmtInt(r.k.waiting));
    setText(c[4], r.k.waiting > 0 ? r.k.deepestLane + ': ' + fmtInt(r.k.deepestDepth) : '—');
    setText(c[5], typeof r.k.oldestAgeSeconds === 'number' ? r.k.oldestAgeSeconds.toFixed(1) + ' s' : '—');
  }

  /* ---------- producers' outboxes ---------- */

  function renderProducers(d) {
    const rows = Array.isArray(d.producers) ? d.producers : [];
    reconcile($('producers'), rows, (p) => p.producer, createProducerRow, updateProducerRow);
    $('producers-empty').hidden = rows.length > 0;
  }
  function createProducerRow(p) {
    const tr = h('tr', { 'data-test': 'producer-row', 'data-producer': p.producer });
    const c = cells(tr, 5, [1, 2, 3, 4]);
    c[0].className = 'name';
    tr.__c = c;
    return tr;
  }
  function updateProducerRow(tr, p) {
    const c = tr.__c;
    const known = typeof p.pending === 'number';
    setText(c[0], p.producer);
    setText(c[1], known ? fmtInt(p.pending) : '—');
    setText(c[2], known && p.pending > 0 ? p.oldestAgeSeconds.toFixed(1) + ' s' : '—');
    setText(c[3], known ? fmtInt(p.failed) : '—');
    setText(c[4], typeof p.reportAgeSeconds === 'number' ? p.reportAgeSeconds.toFixed(0) + ' s ago' : 'not yet');
  }

  /* ---------- durable subscriptions ---------- */

  function renderSubscriptions(d) {
    const rows = Array.isArray(d) ? d : [];
    reconcile($('subscriptions'), rows, (s) => s.name, createSubscriptionRow, updateSubscriptionRow);
    $('subscriptions-empty').hidden = rows.length > 0;
  }
  function createSubscriptionRow(s) {
    const tr = h('tr', { 'data-test': 'subscription-row', 'data-subscription': s.name });
    const c = cells(tr, 8, [3, 4, 6, 7]);
    c[0].className = 'name';
    tr.__c = c;
    return tr;
  }
  function updateSubscriptionRow(tr, s) {
    const c = tr.__c;
    const known = typeof s.lag === 'number';
    setText(c[0], s.name);
    setText(c[1], s.transport + ', ' + fmtInt(s.partitions) + ' partitions');
    setText(c[2], Array.isArray(s.patterns) ? s.patterns.join(' ') : '');
    setText(c[3], known ? fmtInt(s.lag) : '—');
    setText(c[4], known && s.lag > 0 && typeof s.oldestAgeSeconds === 'number' ? fmtAge(s.oldestAgeSeconds) : '—');
    setText(c[5], s.gap ? 'yes' : 'no');
    c[5].title = s.gapNote || '';
    setText(c[6], fmtInt(s.dead));
    setText(c[7], typeof s.countedAgeSeconds === 'number' ? s.countedAgeSeconds.toFixed(0) + ' s ago' : 'not yet');
  }

  /* ---------- charts ---------- */

  const RANGES = { hour: { every: 2000, step: 60, tick: 600 }, day: { every: 30000, step: 300, tick: 10800 } };
  const history = { hour: { data: null, at: 0 }, day: { data: null, at: 0 } };
  const charts = [];

  function setupChart(id, draw) {
    const box = $(id);
    const ch = { range: 'hour', box, plot: box.querySelector('[data-role="plot"]'), summary: box.querySelector('[data-role="summary"]'), draw, width: 0 };
    for (const b of box.querySelectorAll('button[data-range]')) {
      b.addEventListener('click', () => {
        ch.range = b.getAttribute('data-range');
        for (const o of box.querySelectorAll('button[data-range]')) o.setAttribute('aria-pressed', String(o === b));
        renderChart(ch);
        polls.history.kick();
      });
    }
    charts.push(ch);
    return ch;
  }

  function renderChart(ch) {
    const d = history[ch.range].data;
    ch.width = ch.plot.clientWidth || 560;
    ch.plot.replaceChildren();
    const W = Math.max(280, Math.round(ch.width));
    const H = 220;
    const root = svg('svg', { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: 'img', class: 'chart-svg' });
    const title = svg('title', null, root);
    ch.plot.appendChild(root);
    const pts = d && Array.isArray(d.points) ? d.points.filter((p) => num(p.t)) : [];
    if (!pts.length) {
      title.textContent = 'no data yet';
      svg('text', { x: W / 2, y: H / 2, class: 'empty', 'text-anchor': 'middle' }, root).textContent = d ? 'no data yet' : 'loading…';
      setText(ch.summary, '');
      return;
    }
    const step = num(d.stepSeconds) && d.stepSeconds > 0 ? d.stepSeconds : RANGES[ch.range].step;
    const m = { l: 52, r: 10, t: 10, b: 24 };
    const t0 = pts[0].t;
    const t1 = pts[pts.length - 1].t + step;
    const g = {
      W,
      H,
      m,
      x: (t) => m.l + ((t - t0) / (t1 - t0 || 1)) * (W - m.l - m.r),
      root,
      title,
      step,
    };
    ch.draw(ch, g, pts);
    xAxis(g, t0, t1, RANGES[ch.range].tick);
  }

  function niceTicks(max, integer) {
    if (!(max > 0)) max = integer ? 4 : 1;
    const raw = max / 4;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const f = raw / mag;
    let step = (f <= 1 ? 1 : f <= 2 ? 2 : f <= 2.5 ? 2.5 : f <= 5 ? 5 : 10) * mag;
    if (integer) step = Math.max(1, Math.ceil(step));
    const top = Math.ceil(max / step - 1e-9) * step;
    const ticks = [];
    for (let i = 0; i * step <= top + step / 1e6; i++) ticks.push(i * step);
    return { top, ticks };
  }

  function yAxis(g, max, integer, fmt) {
    const { top, ticks } = niceTicks(max, integer);
    const y = (v) => g.H - g.m.b - (v / top) * (g.H - g.m.t - g.m.b);
    for (const v of ticks) {
      const yy = Math.round(y(v)) + 0.5;
      svg('line', { x1: g.m.l, x2: g.W - g.m.r, y1: yy, y2: yy, class: v === 0 ? 'axis' : 'grid' }, g.root);
      svg('text', { x: g.m.l - 6, y: yy + 4, 'text-anchor': 'end', class: 'tick' }, g.root).textContent = fmt(v);
    }
    return y;
  }

  function xAxis(g, t0, t1, tick) {
    const off = -new Date(t0 * 1000).getTimezoneOffset() * 60;
    let t = Math.ceil((t0 + off) / tick) * tick - off;
    for (; t <= t1; t += tick) {
      const xx = Math.round(g.x(t)) + 0.5;
      if (xx < g.m.l + 14 || xx > g.W - g.m.r - 14) continue;
      svg('line', { x1: xx, x2: xx, y1: g.H - g.m.b, y2: g.H - g.m.b + 4, class: 'axis' }, g.root);
      const d = new Date(t * 1000);
      svg('text', { x: xx, y: g.H - 6, 'text-anchor': 'middle', class: 'tick' }, g.root).textContent = pad(d.getHours()) + ':' + pad(d.getMinutes());
    }
  }

  function hhmm(t) {
    const d = new Date(t * 1000);
    return pad(d.getHours()) + ':' + pad(d.getMinutes());
  }

  function drawThroughput(ch, g, pts) {
    const n = (v) => (num(v) && v > 0 ? v : 0);
    let max = 0,
      total = 0,
      dead = 0;
    for (const p of pts) {
      max = Math.max(max, n(p.commands), n(p.applied) + n(p.rejected) + n(p.dead));
      total += n(p.commands);
      dead += n(p.dead);
    }
    const y = yAxis(g, max, true, (v) => fmtInt(v));
    const last = pts.length - 1;
    pts.forEach((p, i) => {
      const x0 = g.x(p.t);
      const w = Math.max(0.8, g.x(p.t + g.step) - x0 - (g.W / pts.length > 5 ? 1 : 0));
      let base = 0;
      const part = i === last ? ' partial' : '';
      for (const k of ['applied', 'rejected', 'dead']) {
        const v = n(p[k]);
        if (!v) continue;
        const yt = y(base + v);
        svg('rect', { x: x0.toFixed(1), y: yt.toFixed(1), width: w.toFixed(1), height: (y(base) - yt).toFixed(1), class: 'bar-' + k + part }, g.root);
        base += v;
      }
      const hit = svg('rect', { x: x0.toFixed(1), y: g.m.t, width: w.toFixed(1), height: g.H - g.m.t - g.m.b, class: 'hit' }, g.root);
      svg('title', null, hit).textContent =
        hhmm(p.t) + (i === last ? ' (so far)' : '') + ': ' + n(p.commands) + ' commands — ' + n(p.applied) + ' applied, ' + n(p.rejected) + ' rejected, ' + n(p.dead) + ' dead';
    });
    const d = pts.map((p, i) => (i ? 'L' : 'M') + g.x(p.t + g.step / 2).toFixed(1) + ' ' + y(n(p.commands)).toFixed(1)).join(' ');
    svg('path', { d, class: 'line-commands' }, g.root);
    const label = 'last ' + ch.range + ': ' + fmtInt(total) + ' commands, ' + fmtInt(dead) + ' dead';
    g.title.textContent = 'Throughput, commands per ' + g.step / 60 + ' min, ' + label;
    setText(ch.summary, fmtInt(total) + ' commands · ' + fmtInt(dead) + ' dead · per ' + g.step / 60 + ' min');
  }

  function drawLatency(ch, g, pts) {
    let max = 0;
    for (const p of pts) for (const k of ['p50', 'p99']) if (num(p[k])) max = Math.max(max, p[k] * 1000);
    const y = yAxis(g, max, false, (v) => (v >= 1000 ? +(v / 1000).toFixed(2) + ' s' : +v.toFixed(2) + ' ms'));
    for (const k of ['p99', 'p50']) {
      let d = '',
        prev = false;
      for (const p of pts) {
        if (!num(p[k])) {
          prev = false;
          continue;
        }
        const xy = g.x(p.t + g.step / 2).toFixed(1) + ' ' + y(p[k] * 1000).toFixed(1);
        d += prev ? ' L' + xy : ' M' + xy + ' h0';
        prev = true;
      }
      if (d) svg('path', { d: d.trim(), class: 'line-' + k }, g.root);
    }
    const lastWith = [...pts].reverse().find((p) => num(p.p99));
    g.title.textContent = 'Latency p50 and p99 in ms, last ' + ch.range;
    setText(ch.summary, lastWith ? 'latest p50 ' + fmtMs(lastWith.p50) + ' · p99 ' + fmtMs(lastWith.p99) : 'no commands');
  }

  async function pollHistory() {
    if (route.name !== 'overview') return;
    const due = new Set(charts.map((c) => c.range));
    for (const range of due) {
      const hs = history[range];
      if (hs.data && Date.now() - hs.at < RANGES[range].every - 100) continue;
      hs.at = Date.now();
      const r = await api('/api/history?range=' + range);
      note('history', r);
      if (!r.ok) {
        hs.at = Date.now() - RANGES[range].every + 2000; /* again in 2 s */
        continue;
      }
      hs.data = r.data;
      for (const ch of charts) if (ch.range === range) renderChart(ch);
    }
  }

  /* ---------- command page ---------- */

  let cmdShown = '';
  async function pollCommand() {
    if (route.name !== 'command') return;
    const id = route.id;
    setText($('cmd-id'), id);
    const body = $('cmd-body');
    if (!UUID.test(id)) {
      cmdShown = '';
      body.replaceChildren(h('p', { class: 'bad-text', text: 'This is not a command id: a UUID is expected.' }));
      return;
    }
    const r = await api('/api/command?id=' + encodeURIComponent(id));
    if (route.name !== 'command' || route.id !== id) return;
    note('command', r);
    if (!r.ok) {
      if (r.status) body.replaceChildren(h('p', { class: 'bad-text', text: 'Could not load it: ' + r.error }));
      cmdShown = '';
      return;
    }
    const sig = JSON.stringify(r.data);
    if (sig === cmdShown) return;
    cmdShown = sig;
    body.replaceChildren(commandView(r.data));
  }

  function commandView(c) {
    const frag = document.createDocumentFragment();
    const sect = (title, ...kids) => frag.append(h('section', { class: 'sub' }, h('h3', { text: title }), ...kids));
    const p = c.processed;
    sect(
      'Processed',
      p
        ? dl([
            ['Type', p.type],
            ['Outcome', h('span', { class: 'badge ' + (p.outcome === 'applied' ? 'good' : 'warn'), text: p.outcome || '—' })],
            ['Processed at', fmtDateTime(p.processedAt)],
          ])
        : h('p', { class: 'muted', text: 'Not processed (or not yet).' })
    );
    const a = c.attempts;
    sect(
      'Attempts',
      a
        ? dl([
            ['Failed attempts', fmtInt(a.count)],
            ['Last error', a.lastError ? h('span', { class: 'err-full', text: a.lastError }) : '—'],
            ['Updated at', a.updatedAt ? fmtDateTime(a.updatedAt) : null],
          ])
        : h('p', { class: 'muted', text: 'No failed attempt recorded.' })
    );
    const events = Array.isArray(c.events) ? c.events : [];
    sect(
      'Events (' + events.length + ')',
      events.length
        ? h(
            'ol',
            { class: 'items' },
            ...events.map((e) =>
              h(
                'li',
                null,
                h(
                  'p',
                  { class: 'item-head' },
                  h('b', { text: e.type || '—' }),
                  ' · occurred ' + fmtDateTime(e.occurredAt) + ' · ',
                  e.publishedAt ? 'published ' + fmtDateTime(e.publishedAt) : h('span', { class: 'badge warn', text: 'not published yet' }),
                  h('span', { class: 'muted mono small', text: '  ' + (e.id || '') })
                ),
                h('pre', { class: 'code', text: prettyJson(e.payload) })
              )
            )
          )
        : h('p', { class: 'muted', text: 'No events.' })
    );
    const dead = Array.isArray(c.deadLetters) ? c.deadLetters : [];
    sect('Dead letters (' + dead.length + ')', dead.length ? h('ol', { class: 'items' }, ...dead.map((d) => h('li', null, letterView(d)))) : h('p', { class: 'muted', text: 'None.' }));
    if (c.envelopeNote) frag.append(h('p', { class: 'note-inline', text: c.envelopeNote }));
    return frag;
  }

  /* ---------- routing, polls, start ---------- */

  function parseRoute() {
    const m = /^#\/command\/(.*)$/.exec(location.hash);
    if (!m) return { name: 'overview' };
    let id = m[1];
    try {
      id = decodeURIComponent(id);
    } catch (e) {
      /* keep it raw */
    }
    return { name: 'command', id: id.trim() };
  }

  function onRoute() {
    route = parseRoute();
    const cmd = route.name === 'command';
    $('overview').hidden = cmd;
    $('command').hidden = !cmd;
    if (cmd) {
      cmdShown = '';
      $('cmd-body').replaceChildren(h('p', { class: 'muted', text: 'Loading…' }));
      polls.command.kick();
      window.scrollTo(0, 0);
    } else {
      problems.delete('command');
      deadDirty = true;
      polls.dead.kick();
      polls.history.kick();
      polls.scheduled.kick();
      polls.schedules.kick();
      polls.limits.kick();
      polls.lanes.kick();
      polls.producers.kick();
      polls.subscriptions.kick();
    }
  }

  let deadSig = '',
    deadSigRead = null,
    deadDirty = true,
    deadReadAt = 0;
  const polls = {
    overview: poller(async () => {
      const r = await api('/api/overview');
      note('overview', r);
      if (r.ok) renderOverview(r.data);
    }, () => 500),
    dead: poller(async () => {
      if (route.name !== 'overview') return;
      /* reading dead letters walks them on the broker: only when the sampled
         counts changed, after an action, or every 30 s */
      if (deadSig === deadSigRead && !deadDirty && Date.now() - deadReadAt < 30000) return;
      deadSigRead = deadSig;
      deadDirty = false;
      deadReadAt = Date.now();
      const r = await api('/api/dead');
      note('dead', r);
      if (r.ok) renderDead(r.data);
      else if (r.status) setText($('dead-summary'), 'Could not load dead letters: ' + r.error);
    }, () => 1000),
    history: poller(pollHistory, () => 500),
    scheduled: poller(async () => {
      if (route.name !== 'overview') return;
      const r = await api('/api/scheduled');
      note('scheduled', r);
      if (r.ok) renderScheduled(r.data);
    }, () => 3000),
    schedules: poller(async () => {
      if (route.name !== 'overview') return;
      const r = await api('/api/schedules');
      note('schedules', r);
      if (r.ok) renderSchedules(r.data);
    }, () => 3000),
    limits: poller(async () => {
      if (route.name !== 'overview') return;
      const r = await api('/api/limits');
      note('limits', r);
      if (r.ok) renderLimits(r.data);
    }, () => 3000),
    lanes: poller(async () => {
      if (route.name !== 'overview') return;
      const r = await api('/api/lanes');
      note('lanes', r);
      if (r.ok) renderLanes(r.data);
    }, () => 3000),
    producers: poller(async () => {
      if (route.name !== 'overview') return;
      const r = await api('/api/producers');
      note('producers', r);
      if (r.ok) renderProducers(r.data);
    }, () => 3000),
    subscriptions: poller(async () => {
      if (route.name !== 'overview') return;
      const r = await api('/api/subscriptions');
      note('subscriptions', r);
      if (r.ok) renderSubscriptions(r.data);
    }, () => 3000),
    command: poller(pollCommand, () => 10000),
  };

  function start() {
    const tok = $('token');
    try {
      tok.value = sessionStorage.getItem(TOKEN_KEY) || '';
    } catch (e) {
      /* storage off: the token lives in the field only */
    }
    tok.addEventListener('input', () => {
      try {
        if (tok.value) sessionStorage.setItem(TOKEN_KEY, tok.value);
        else sessionStorage.removeItem(TOKEN_KEY);
      } catch (e) {
        /* ignored */
      }
    });
    $('token-form').addEventListener('submit', (e) => e.preventDefault());
    $('search-form').addEventListener('submit', (e) => {
      e.preventDefault();
      const id = $('search').value.trim();
      if (!UUID.test(id)) {
        status('not a command id: a UUID is expected', true);
        return;
      }
      $('search').value = '';
      location.hash = '#/command/' + id.toLowerCase();
    });

    setupChart('chart-throughput', drawThroughput);
    setupChart('chart-latency', drawLatency);
    for (const ch of charts) renderChart(ch);
    if (typeof ResizeObserver === 'function') {
      let pending = 0;
      const ro = new ResizeObserver(() => {
        if (pending) return;
        pending = setTimeout(() => {
          pending = 0;
          for (const ch of charts) if (ch.plot.clientWidth && Math.abs(ch.plot.clientWidth - ch.width) > 2) renderChart(ch);
        }, 100);
      });
      for (const ch of charts) ro.observe(ch.plot);
    }

    window.addEventListener('hashchange', onRoute);
    polls.overview.kick();
    onRoute();
  }

  start();
})();
