// The berth web console: a single page, no framework, nothing loaded from elsewhere. Every call
// goes to this master's /api, which makes the same gRPC call the CLI makes as the logged-in
// identity. Views poll every 2 s; a task's log is a live Server-Sent Events stream.
'use strict';

const REFRESH_MS = 2000;
let me = null;          // the session: {identity, via, expires_ms, version}
let timer = null;       // the current view's refresh
let logSource = null;   // the current log stream
let view = 0;           // bumped on every navigation: stale answers are dropped

// ---- calls --------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  const headers = { 'X-Berth-Console': '1' };
  if (options.body !== undefined) headers['Content-Type'] = 'application/json';
  let r;
  try {
    r = await fetch('/api' + path, { credentials: 'same-origin', ...options, headers });
  } catch (e) {
    throw new ApiError(0, 'this master did not answer (' + e.message + '): is it up?');
  }
  let body = null;
  try { body = await r.json(); } catch (_) { /* not JSON */ }
  if (!r.ok) {
    if (r.status === 401 && me && path !== '/login') { me = null; show(); }
    throw new ApiError(r.status, (body && body.error) || (r.status + ' ' + r.statusText));
  }
  return body;
}

const post = (path, obj) => api(path, { method: 'POST', body: JSON.stringify(obj || {}) });

// ---- building the page (no innerHTML: names and messages from the cluster are text) --------

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k === 'testid') e.dataset.testid = v;
    else if (k === 'class') e.className = v;
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const k of kids.flat()) {
    if (k === undefined || k === null || k === false) continue;
    e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  }
  return e;
}

function table(headers, rows) {
  return el('table', {}, el('thead', {}, el('tr', {}, headers.map(h => el('th', {}, h)))), el('tbody', {}, rows));
}

function badge(text, kind) { return el('span', { class: 'badge ' + (kind || '') }, text); }

const STATE_KIND = {
  running: 'ok', ready: 'ok', completed: 'ok', active: 'ok', leader: 'info', healthy: 'ok',
  pending: 'warn', assigned: 'warn', preparing: 'warn', starting: 'warn', updating: 'info', paused: 'warn',
  pause: 'warn', drain: 'warn', 'rolling back': 'warn', degraded: 'warn', follower: '', learner: 'warn',
  failed: 'bad', down: 'bad', rejected: 'bad', unreachable: 'bad', 'rolled back': 'bad', 'no leader': 'bad',
};
function stateBadge(s) { return badge(s || 'unknown', STATE_KIND[s] || ''); }

function bytes(n) {
  if (!n) return '-';
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (n >= 10 || i === 0 ? n.toFixed(0) : n.toFixed(1)) + ' ' + u[i];
}
function cores(m) { return m ? (m / 1000).toFixed(m % 1000 ? 1 : 0) : '-'; }
function age(ms) {
  if (ms === undefined || ms === null || ms < 0) return '-';
  if (ms < 1000) return ms + ' ms';
  const s = Math.round(ms / 1000);
  if (s < 120) return s + ' s';
  if (s < 7200) return Math.round(s / 60) + ' min';
  return Math.round(s / 3600) + ' h';
}
function when(ms) { return ms ? new Date(ms).toLocaleTimeString() : '-'; }

let flashTimer = null;
function flash(text, isError) {
  const f = document.getElementById('flash');
  f.textContent = text;
  f.className = isError ? 'error' : '';
  f.hidden = false;
  clearTimeout(flashTimer);
  flashTimer = setTimeout(() => { f.hidden = true; }, isError ? 8000 : 4000);
}

// A button that acts, disabled while it does, and says how it went.
function action(label, testid, run, opts = {}) {
  const b = el('button', { class: opts.class, testid }, label);
  let armed = false;
  b.addEventListener('click', async () => {
    if (opts.confirm && !armed) {
      armed = true;
      b.textContent = opts.confirm;
      setTimeout(() => { armed = false; b.textContent = label; }, 4000);
      return;
    }
    armed = false;
    b.disabled = true;
    try {
      const msg = await run();
      if (msg) flash(msg);
      refresh();
    } catch (e) {
      flash(e.message, true);
    } finally {
      b.disabled = false;
      b.textContent = label;
    }
  });
  return b;
}

// ---- views --------------------------------------------------------------------------------

const main = () => document.getElementById('main');

function setMain(...kids) { main().replaceChildren(...kids); }

// Runs `load` now and every REFRESH_MS while this view is shown; `load` returns the nodes to
// put in `slot`.
function poll(slot, load) {
  const mine = view;
  const tick = async () => {
    try {
      const nodes = await load();
      if (mine !== view) return;
      slot.replaceChildren(...[nodes].flat());
    } catch (e) {
      if (mine !== view) return;
      slot.replaceChildren(el('p', { class: 'error', testid: 'view-error' }, e.message));
    }
  };
  currentRefresh = tick;
  tick();
  timer = setInterval(tick, REFRESH_MS);
}
let currentRefresh = null;
function refresh() { if (currentRefresh) currentRefresh(); }

function loginView() {
  const input = el('input', { type: 'password', id: 'token', testid: 'login-token', placeholder: 'BERTHC-1-…', autocomplete: 'off' });
  const err = el('p', { class: 'error', testid: 'login-error' });
  const submit = el('button', { class: 'primary', type: 'submit', testid: 'login-submit' }, 'Log in');
  const form = el('form', { class: 'panel login', testid: 'login-form' },
    el('h1', {}, 'Log in to berth'),
    el('label', { for: 'token' }, 'Console token'),
    input,
    submit,
    err,
    el('p', { class: 'muted' }, 'An admin issues tokens with ', el('code', {}, 'berth console token create --user NAME'),
      '. A browser that presents a client certificate from the cluster CA is logged in without one.'));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    submit.disabled = true;
    err.textContent = '';
    try {
      me = await post('/login', { token: input.value });
      location.hash = '#/';
      show();
    } catch (e) {
      err.textContent = e.message;
    } finally {
      submit.disabled = false;
    }
  });
  setMain(form);
  input.focus();
}

function health(c) {
  if (!c.leader) return 'no leader';
  return c.members.every(m => !m.error && m.role !== 'unreachable') ? 'healthy' : 'degraded';
}

function overviewView() {
  const slot = el('div');
  setMain(el('h1', {}, 'Cluster'), slot);
  poll(slot, async () => {
    const c = await api('/cluster');
    const h = health(c);
    const leader = c.members.find(m => m.id === c.leader);
    return [
      el('div', { class: 'cards' },
        el('div', { class: 'card' }, el('div', { class: 'k' }, 'Health'), el('div', { class: 'v', testid: 'health' }, stateBadge(h))),
        el('div', { class: 'card' }, el('div', { class: 'k' }, 'Leader'),
          el('div', { class: 'v', testid: 'leader' }, c.leader ? 'master ' + c.leader : 'none')),
        el('div', { class: 'card' }, el('div', { class: 'k' }, 'Term'), el('div', { class: 'v' }, c.term)),
        el('div', { class: 'card' }, el('div', { class: 'k' }, 'Revision'), el('div', { class: 'v' }, c.revision)),
        el('div', { class: 'card' }, el('div', { class: 'k' }, 'Masters'),
          el('div', { class: 'v', testid: 'member-count' }, c.members.length))),
      el('h2', {}, 'Members'),
      table(['ID', 'Endpoint', 'Role', 'Voter', 'Applied', 'Log', 'DB size', 'Version', ''],
        c.members.map(m => el('tr', { testid: 'member-row' },
          el('td', {}, m.id, m.id === c.served_by ? el('span', { class: 'muted' }, ' (this console)') : ''),
          el('td', { class: 'mono' }, m.endpoint),
          el('td', {}, stateBadge(m.role)),
          el('td', {}, m.voter ? 'yes' : 'no'),
          el('td', { class: 'num' }, m.applied_index),
          el('td', { class: 'num' }, m.last_log_index),
          el('td', { class: 'num' }, bytes(m.db_size_bytes)),
          el('td', {}, m.version || '-'),
          el('td', { class: 'error' }, m.error || '')))),
      leader ? el('p', { class: 'muted' }, 'The leader schedules tasks and checks node health; every master serves this console.') : '',
    ];
  });
}

function nodesView() {
  const slot = el('div');
  setMain(el('h1', {}, 'Nodes'), slot);
  poll(slot, async () => {
    const { nodes } = await api('/nodes');
    if (!nodes.length) return el('p', { class: 'muted' }, 'No nodes yet: join one with `berth agent --join TOKEN`.');
    return table(['Name', 'Status', 'Availability', 'CPU', 'Memory', 'Disk', 'Address', 'Version', 'Heartbeat', 'Labels', ''],
      nodes.map(n => el('tr', { testid: 'node-row', 'data-node': n.name },
        el('td', {}, el('div', {}, n.name), el('div', { class: 'muted mono' }, n.id.slice(0, 12))),
        el('td', { testid: 'node-status' }, stateBadge(n.status), n.status_message ? el('div', { class: 'muted' }, n.status_message) : ''),
        el('td', { testid: 'node-availability' }, stateBadge(n.availability)),
        el('td', { class: 'num' }, cores(n.cpu_millis)),
        el('td', { class: 'num' }, bytes(n.memory_bytes)),
        el('td', { class: 'num' }, bytes(n.disk_bytes)),
        el('td', { class: 'mono' }, n.address || '-'),
        el('td', {}, n.version || '-'),
        el('td', { class: 'num' }, n.connected ? age(n.heartbeat_age_ms) : 'not connected'),
        el('td', { class: 'mono' }, Object.entries(n.labels || {}).map(([k, v]) => k + '=' + v).join(' ')),
        el('td', {}, n.availability === 'drain'
          ? action('Activate', 'node-activate', async () => {
            await post('/nodes/' + encodeURIComponent(n.name) + '/availability', { availability: 'active' });
            return n.name + ' is active again';
          })
          : action('Drain', 'node-drain', async () => {
            await post('/nodes/' + encodeURIComponent(n.name) + '/availability', { availability: 'drain' });
            return n.name + ' is draining: its tasks move to other nodes';
          }, { class: 'danger', confirm: 'Drain ' + n.name + '?' })))));
  });
}

function serviceLink(s) {
  return el('a', { href: '#/services/' + encodeURIComponent(s.namespace) + '/' + encodeURIComponent(s.name) }, s.name);
}

function servicesView() {
  const slot = el('div');
  setMain(el('h1', {}, 'Services'), slot);
  poll(slot, async () => {
    const { services } = await api('/services');
    if (!services.length) return el('p', { class: 'muted' }, 'No services: create one with `berth apply -f service.yaml`.');
    return table(['Namespace', 'Name', 'Image or command', 'Tasks', 'Version', 'Rollout', 'Updated'],
      services.map(s => el('tr', { testid: 'service-row', 'data-service': s.namespace + '/' + s.name },
        el('td', {}, s.namespace),
        el('td', {}, serviceLink(s), s.deleting ? el('span', { class: 'muted' }, ' (deleting)') : ''),
        el('td', { class: 'mono' }, s.image || (s.command || []).join(' ') || '-'),
        el('td', { class: 'num' }, s.running + ' / ' + s.desired, s.pending ? el('span', { class: 'muted' }, ' (' + s.pending + ' pending)') : ''),
        el('td', { class: 'num' }, s.version),
        el('td', {}, s.rollout ? stateBadge(s.rollout.state) : '-'),
        el('td', {}, when(s.updated_at_ms)))));
  });
}

function eventRows(events) {
  return [...events].reverse().map(e => el('tr', { testid: 'event-row', 'data-type': e.type },
    el('td', { class: 'num' }, when(e.at_ms)),
    el('td', {}, badge(e.type, /Failed|Down|Fenced|RolledBack|Removed/.test(e.type) ? 'bad' : /Paused|RollingBack/.test(e.type) ? 'warn' : 'info')),
    el('td', {}, e.object + ' ' + (e.namespace ? e.namespace + '/' : '') + e.name),
    el('td', {}, e.message || '')));
}

function serviceView(ns, name) {
  const path = '/services/' + encodeURIComponent(ns) + '/' + encodeURIComponent(name);
  const summary = el('div');
  const replicas = el('input', { type: 'number', min: '0', max: '10000', testid: 'scale-input', 'aria-label': 'replicas' });
  const controls = el('div', { class: 'panel' },
    el('div', { class: 'row' },
      el('strong', {}, 'Scale to'), replicas,
      action('Scale', 'scale-submit', async () => {
        const n = Number(replicas.value);
        if (!Number.isInteger(n) || n < 0) throw new Error('replicas must be a whole number, 0 or more');
        await post(path + '/scale', { replicas: n });
        return name + ' scaled to ' + n;
      }, { class: 'primary' }),
      el('span', { class: 'spacer' }),
      el('strong', {}, 'Rollout'),
      action('Pause', 'rollout-pause', async () => { await post(path + '/rollout', { action: 'pause' }); return 'rollout paused'; }),
      action('Resume', 'rollout-resume', async () => { await post(path + '/rollout', { action: 'resume' }); return 'rollout resumed'; }),
      action('Undo', 'rollout-undo', async () => { await post(path + '/rollout', { action: 'undo' }); return 'rolling back to the previous spec'; },
        { class: 'danger', confirm: 'Undo the last change?' })));
  const slot = el('div');
  setMain(el('h1', {}, el('a', { href: '#/services' }, 'Services'), ' / ' + ns + ' / ' + name), summary, controls, slot);
  let filled = false;
  poll(slot, async () => {
    const d = await api(path);
    const s = d.service;
    if (!filled && s) { replicas.value = s.desired; filled = true; }
    summary.replaceChildren(el('div', { class: 'cards' },
      el('div', { class: 'card' }, el('div', { class: 'k' }, 'Desired'), el('div', { class: 'v', testid: 'svc-desired' }, s ? s.desired : '-')),
      el('div', { class: 'card' }, el('div', { class: 'k' }, 'Running'), el('div', { class: 'v', testid: 'svc-running' }, s ? s.running : '-')),
      el('div', { class: 'card' }, el('div', { class: 'k' }, 'Pending'), el('div', { class: 'v' }, s ? s.pending : '-')),
      el('div', { class: 'card' }, el('div', { class: 'k' }, 'Version'), el('div', { class: 'v' }, s ? s.version : '-')),
      el('div', { class: 'card' }, el('div', { class: 'k' }, 'Rollout'),
        el('div', { class: 'v', testid: 'rollout-state' }, s && s.rollout ? stateBadge(s.rollout.state) : '-'),
        s && s.rollout && s.rollout.message ? el('div', { class: 'muted' }, s.rollout.message) : ''),
      el('div', { class: 'card' }, el('div', { class: 'k' }, s && !s.image && s.command ? 'Command' : 'Image'),
        el('div', { class: 'mono' }, s ? s.image || (s.command || []).join(' ') || '-' : '-'))));
    return [
      el('h2', {}, 'Tasks'),
      d.tasks.length ? table(['Task', 'Slot', 'Node', 'State', 'Desired', 'Health', 'Version', 'Message', ''],
        d.tasks.map(t => el('tr', { testid: 'task-row', 'data-task': t.id },
          el('td', { class: 'mono' }, t.id),
          el('td', { class: 'num' }, t.slot || 'global'),
          el('td', { class: t.node ? '' : 'mono' }, t.node || (t.node_id ? t.node_id.slice(0, 12) : '-')),
          el('td', {}, stateBadge(t.state)),
          el('td', {}, t.desired),
          el('td', {}, t.health === 'unknown' ? '-' : t.health),
          el('td', { class: 'num' }, t.spec_version),
          el('td', {}, t.message || t.pending_reason || ''),
          el('td', {}, t.node_id ? el('a', { href: '#/logs/' + encodeURIComponent(t.id), testid: 'task-logs' }, 'Logs') : ''))))
        : el('p', { class: 'muted' }, 'No tasks.'),
      el('h2', {}, 'Events (last hour)'),
      d.events ? (d.events.length ? table(['Time', 'Type', 'Object', 'Message'], eventRows(d.events)) : el('p', { class: 'muted' }, 'None.'))
        : el('p', { class: 'muted' }, 'Events are not shown to this identity: ' + d.events_error),
    ];
  });
}

function eventsView() {
  const slot = el('div');
  setMain(el('h1', {}, 'Events'), slot);
  poll(slot, async () => {
    const { events } = await api('/events');
    if (!events.length) return el('p', { class: 'muted' }, 'No events kept (the last hour, at most 10,000).');
    return table(['Time', 'Type', 'Object', 'Message'], eventRows(events));
  });
}

function logsView(task) {
  const lines = el('pre', { class: 'log mono', testid: 'log-lines' });
  const status = el('span', { class: 'muted', testid: 'log-status' }, 'connecting…');
  setMain(el('h1', {}, 'Log of task ', el('span', { class: 'mono' }, task)), el('div', { class: 'row' }, status), lines);
  const mine = view;
  const open = () => {
    if (mine !== view) return;
    const src = new EventSource('/api/tasks/' + encodeURIComponent(task) + '/logs?tail=200');
    logSource = src;
    src.addEventListener('open', () => { status.textContent = 'live'; });
    src.addEventListener('log', (ev) => {
      const e = JSON.parse(ev.data);
      const atEnd = lines.scrollTop + lines.clientHeight >= lines.scrollHeight - 4;
      lines.append(el('span', { class: 'ts' }, new Date(e.ts_ms).toLocaleTimeString() + ' '),
        el('span', { class: e.stream === 'stderr' ? 'stderr' : '' }, e.line), '\n');
      while (lines.childNodes.length > 3 * 5000) lines.firstChild.remove();
      if (atEnd) lines.scrollTop = lines.scrollHeight;
    });
    const retry = (why) => {
      src.close();
      if (mine !== view) return;
      status.textContent = why + ' — reconnecting in 2 s';
      setTimeout(open, 2000);
    };
    src.addEventListener('error', (ev) => retry(ev.data ? 'the stream broke: ' + ev.data : 'the connection dropped'));
    src.addEventListener('end', () => retry('the stream ended'));
  };
  open();
}

// ---- navigation ---------------------------------------------------------------------------

function stop() {
  view++;
  clearInterval(timer);
  timer = null;
  currentRefresh = null;
  if (logSource) { logSource.close(); logSource = null; }
}

function route() {
  const parts = location.hash.replace(/^#\/?/, '').split('/').filter(Boolean).map(decodeURIComponent);
  document.querySelectorAll('#nav a').forEach(a => a.classList.toggle('active', a.dataset.view === (parts[0] || 'overview')));
  switch (parts[0]) {
    case undefined: return overviewView();
    case 'nodes': return nodesView();
    case 'services': return parts.length >= 3 ? serviceView(parts[1], parts[2]) : servicesView();
    case 'events': return eventsView();
    case 'logs': return logsView(parts[1] || '');
    default: setMain(el('p', { class: 'error' }, 'No such page: ' + location.hash));
  }
}

function show() {
  stop();
  const nav = document.getElementById('nav');
  const who = document.getElementById('who');
  const out = document.getElementById('logout');
  if (!me) {
    nav.hidden = true; out.hidden = true; who.textContent = '';
    return loginView();
  }
  nav.hidden = false;
  out.hidden = me.via !== 'token';
  who.textContent = me.identity + (me.via === 'certificate' ? ' (certificate)' : '') + ' · berth ' + me.version;
  route();
}

window.addEventListener('hashchange', () => { if (me) show(); });
window.addEventListener('DOMContentLoaded', async () => {
  document.getElementById('logout').addEventListener('click', async () => {
    try { await post('/logout'); } catch (_) { /* logged out either way */ }
    me = null;
    show();
  });
  try { me = await api('/whoami'); } catch (_) { me = null; }
  show();
});
