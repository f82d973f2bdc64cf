// The callgate console: plain JavaScript, no build step. Pages: Live, Calls, Call, Nodes.
// Everything shown is built with DOM calls and textContent: text from calls (numbers,
// transcripts) is never parsed as HTML. The session is an HttpOnly cookie; this script never
// sees or keeps the admin token after handing it to POST /api/session.
'use strict';
(function () {
  const WORDS = window.CALLGATE_I18N;
  const LIVE_LIMIT = 1000;
  const WAVEFORM_MAX_BYTES = 64 * 1024 * 1024;
  const state = { role: null, auth: true, lang: pickLang(), cleanup: [] };

  // ---- helpers -------------------------------------------------------------------------

  function pickLang() {
    const saved = localStorage.getItem('callgate.lang');
    if (saved === 'en' || saved === 'ko') return saved;
    for (const l of navigator.languages || [navigator.language || 'en']) {
      const p = String(l).toLowerCase().slice(0, 2);
      if (p === 'ko' || p === 'en') return p;
    }
    return 'en';
  }

  function t(key, vars) {
    let s = WORDS[state.lang][key] || WORDS.en[key] || key;
    if (vars) for (const k of Object.keys(vars)) s = s.replace('{' + k + '}', String(vars[k]));
    return s;
  }

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else if (k === 'text') el.textContent = v;
      else el.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  const locale = () => (state.lang === 'ko' ? 'ko-KR' : 'en-GB');
  const when = (s) => (s ? new Date(s).toLocaleString(locale()) : '');
  const reason = (r) => (r ? (WORDS[state.lang]['reason.' + r] ? t('reason.' + r) + ' (' + r + ')' : r) : '');

  function clock(ms) {
    const s = Math.max(0, Math.floor(ms / 1000));
    const hh = Math.floor(s / 3600), mm = Math.floor((s % 3600) / 60), ss = s % 60;
    const two = (n) => String(n).padStart(2, '0');
    return (hh ? hh + ':' + two(mm) : two(mm)) + ':' + two(ss);
  }

  function offset(ms) {
    const tenths = Math.floor(Math.max(0, ms) / 100) % 10;
    return clock(ms) + '.' + tenths;
  }

  class ApiError extends Error {
    constructor(status, code, message) { super(message); this.status = status; this.code = code; }
  }

  async function api(method, path, body, contentType) {
    const init = { method, credentials: 'same-origin', headers: {} };
    if (body !== undefined) {
      init.body = contentType ? body : JSON.stringify(body);
      init.headers['Content-Type'] = contentType || 'application/json';
    }
    const r = await fetch(path, init);
    let data = null;
    try { data = await r.json(); } catch (_) { data = null; }
    if (r.status === 401 && path !== '/api/session') signedOut();
    if (!r.ok) throw new ApiError(r.status, data && data.code, (data && data.error) || r.statusText);
    return data;
  }

  const isOperator = () => state.role === 'operator';

  function onCleanup(fn) { state.cleanup.push(fn); }

  function stopView() {
    for (const fn of state.cleanup.splice(0)) { try { fn(); } catch (_) { /* page left */ } }
  }

  // ---- the event stream ----------------------------------------------------------------

  const STREAM_TYPES = ['call.started', 'call.answered', 'call.dtmf', 'call.transcript', 'call.ended'];

  // Calls `onEvent({type, timestamp, data})` for each stream event and `onResync()` when the
  // stream (re)opens, so the page reloads what it may have missed. With no stream (404, or
  // an error before it ever opened) it falls back to calling `onResync` every half second.
  function subscribe(onEvent, onResync, onMode) {
    let source = null, poll = null, opened = false, stopped = false;
    const fallback = () => {
      if (poll || stopped) return;
      onMode('polling');
      poll = setInterval(onResync, 500);
    };
    if (typeof EventSource === 'function') {
      source = new EventSource('/api/stream');
      for (const type of STREAM_TYPES) {
        source.addEventListener(type, (ev) => {
          let body;
          try { body = JSON.parse(ev.data); } catch (_) { return; }
          onEvent(body);
        });
      }
      // The server no longer holds the events after our Last-Event-ID: re-read the state.
      source.addEventListener('reset', () => onResync());
      source.addEventListener('open', () => {
        if (poll) { clearInterval(poll); poll = null; }
        onMode('stream');
        // The browser resumes with Last-Event-ID itself; a resync covers what a server
        // that dropped us may not replay.
        if (opened) onResync();
        opened = true;
      });
      source.addEventListener('error', () => {
        if (!opened || source.readyState === EventSource.CLOSED) fallback();
      });
    } else {
      fallback();
    }
    onCleanup(() => {
      stopped = true;
      if (source) source.close();
      if (poll) clearInterval(poll);
    });
  }

  // ---- operator actions ----------------------------------------------------------------

  async function act(id, what, body, contentType, status) {
    status.textContent = '';
    try {
      await api('POST', '/api/calls/' + id + '/' + what, body, contentType);
      status.textContent = t('action.done', { what });
    } catch (e) {
      status.textContent = t('action.failed', { error: e.message });
    }
  }

  // The hang-up button, which asks for a confirmation in place.
  function hangupControl(id, status) {
    const box = h('span', { class: 'hangup' });
    const ask = () => {
      box.replaceChildren(
        h('button', { type: 'button', class: 'danger', 'data-action': 'confirm', onclick: () => act(id, 'hangup', undefined, undefined, status) }, t('action.confirm')),
        ' ',
        h('button', { type: 'button', 'data-action': 'cancel', onclick: reset }, t('action.cancel')));
    };
    const reset = () => {
      box.replaceChildren(h('button', { type: 'button', 'data-action': 'hangup', onclick: ask }, t('action.hangup')));
    };
    reset();
    return box;
  }

  function operatorPanel(id) {
    const status = h('span', { class: 'status', role: 'status' });
    const keys = '123456789*0#'.split('').map((d) =>
      h('button', { type: 'button', 'data-digit': d, onclick: () => act(id, 'dtmf', { digit: d }, undefined, status) }, d));
    const file = h('input', { type: 'file', accept: '.wav,audio/wav', 'data-input': 'wav' });
    const play = h('button', {
      type: 'button', 'data-action': 'play',
      onclick: () => { if (file.files && file.files[0]) act(id, 'play', file.files[0], 'audio/wav', status); },
    }, t('action.play'));
    const clear = h('button', { type: 'button', 'data-action': 'clear', onclick: () => act(id, 'clear', undefined, undefined, status) }, t('action.clear'));
    return h('div', { class: 'ops' }, hangupControl(id, status),
      h('span', { class: 'keypad', title: t('action.dtmf') }, t('action.dtmf'), ' ', keys),
      file, play, clear, status);
  }

  // ---- Live ----------------------------------------------------------------------------

  function viewLive(main) {
    const rows = new Map();
    const count = h('span', { class: 'count' });
    const mode = h('span', { class: 'count' });
    const tbody = h('tbody');
    const empty = h('p', { class: 'muted' }, t('live.empty'));
    const cols = ['col.started', 'col.protocol', 'col.caller', 'col.callee', 'col.route', 'col.duration', 'col.state', 'col.last', 'col.actions'];
    main.replaceChildren(
      h('h1', null, t('live.title'), count, mode),
      h('table', { class: 'calls live' }, h('thead', null, h('tr', null, cols.map((c) => h('th', null, t(c))))), tbody),
      empty);

    const counted = () => {
      count.textContent = t('live.count', { n: rows.size });
      empty.hidden = rows.size > 0;
    };

    function upsert(call) {
      const id = call.id;
      let row = rows.get(id);
      if (!row) {
        const status = h('span', { class: 'status' });
        row = {
          call: {}, start: Date.now(), added: performance.now(),
          el: h('tr', { 'data-call-id': id }),
          cells: {
            started: h('td', { class: 'num' }), protocol: h('td'), caller: h('td', { class: 'num' }),
            callee: h('td', { class: 'num' }), route: h('td'), dur: h('td', { class: 'dur' }),
            state: h('td'), last: h('td', { class: 'last' }),
            actions: h('td', { class: 'actions' }, h('a', { href: '#/call/' + id }, t('action.open')), ' ',
              isOperator() ? hangupControl(id, status) : null, status),
          },
        };
        row.el.append(...Object.values(row.cells));
        rows.set(id, row);
        tbody.prepend(row.el);
        counted();
      }
      Object.assign(row.call, call);
      const c = row.call;
      if (c.started_at) row.start = Date.parse(c.started_at);
      row.cells.started.textContent = c.started_at ? new Date(c.started_at).toLocaleTimeString(locale()) : '';
      row.cells.protocol.textContent = c.protocol || '';
      row.cells.caller.textContent = c.caller || '';
      row.cells.callee.textContent = c.callee || '';
      row.cells.route.textContent = [c.route, c.agent].filter(Boolean).join(' / ');
      const answered = Boolean(c.answered_at);
      row.cells.state.replaceChildren(h('span', { class: 'badge ' + (answered ? 'answered' : 'ringing') }, t(answered ? 'state.answered' : 'state.ringing')));
      row.cells.dur.textContent = clock(Date.now() - row.start);
      return row;
    }

    function remove(id) {
      const row = rows.get(id);
      if (!row) return;
      row.el.remove();
      rows.delete(id);
      counted();
    }

    // Calls the stream said ended: a list read before the end must not bring them back.
    const ended = new Set();
    let loading = null;
    async function resync() {
      if (loading) return loading;
      loading = (async () => {
        try {
          const asked = performance.now();
          const body = await api('GET', '/api/calls?live=true&limit=' + LIVE_LIMIT);
          const seen = new Set();
          // Newest first from the API: insert oldest first so the newest ends on top.
          for (const call of body.calls.slice().reverse()) {
            if (!ended.has(call.id)) upsert(call);
            seen.add(call.id);
          }
          // A row the stream added after the list was asked for is newer than the list.
          for (const [id, row] of [...rows]) if (!seen.has(id) && row.added < asked) remove(id);
          if (ended.size > 10000) ended.clear();
        } catch (e) {
          mode.textContent = t('error.load', { error: e.message });
        } finally {
          loading = null;
        }
      })();
      return loading;
    }

    function onEvent(ev) {
      const d = ev.data || {};
      const id = d.call_id;
      if (!id) return;
      switch (ev.type) {
        case 'call.started': {
          // The event's time is the record's start; a row the list already drew keeps its own.
          const start = rows.has(id) ? {} : { started_at: ev.timestamp };
          upsert(Object.assign(start, d, { id }));
          break;
        }
        case 'call.answered': {
          if (rows.has(id)) upsert({ id, answered_at: d.answered_at || ev.timestamp });
          break;
        }
        case 'call.transcript': {
          const row = rows.get(id);
          if (row && d.text) {
            row.cells.last.textContent = t('speaker.' + d.speaker) + ': ' + d.text;
            row.cells.last.title = d.text;
          }
          break;
        }
        case 'call.dtmf': {
          const row = rows.get(id);
          if (row && d.digit) row.cells.last.textContent = 'DTMF ' + d.digit;
          break;
        }
        case 'call.ended':
          ended.add(id);
          remove(id);
          break;
        default:
      }
    }

    const tick = setInterval(() => {
      const now = Date.now();
      for (const row of rows.values()) row.cells.dur.textContent = clock(now - row.start);
    }, 1000);
    onCleanup(() => clearInterval(tick));
    counted();
    resync();
    subscribe(onEvent, resync, (m) => {
      mode.textContent = '· ' + t(m === 'stream' ? 'live.stream' : 'live.polling');
      mode.setAttribute('data-live-mode', m);
    });
  }

  // ---- Calls ---------------------------------------------------------------------------

  const FILTERS = ['caller', 'callee', 'protocol', 'end_reason', 'route', 'agent', 'since', 'until', 'live', 'limit', 'before'];

  function viewCalls(main, query) {
    const q = new URLSearchParams(query);
    const input = (name, attrs) => h('input', Object.assign({ name, value: q.get(name) || '' }, attrs || {}));
    const local = (iso) => {
      if (!iso) return '';
      const d = new Date(iso);
      if (isNaN(d)) return '';
      const p = (n) => String(n).padStart(2, '0');
      return d.getFullYear() + '-' + p(d.getMonth() + 1) + '-' + p(d.getDate()) + 'T' + p(d.getHours()) + ':' + p(d.getMinutes());
    };
    const protocol = h('select', { name: 'protocol' },
      ['', 'callbridge', 'inbound', 'twilio'].map((p) => h('option', { value: p, selected: q.get('protocol') === p }, p || t('calls.any'))));
    const limit = h('select', { name: 'limit' },
      ['25', '50', '100', '200'].map((n) => h('option', { value: n, selected: (q.get('limit') || '50') === n }, n)));
    const live = h('input', { type: 'checkbox', name: 'live', checked: q.get('live') === 'true' });
    const since = h('input', { type: 'datetime-local', name: 'since', value: local(q.get('since')) });
    const until = h('input', { type: 'datetime-local', name: 'until', value: local(q.get('until')) });
    const field = (label, el) => h('label', null, label, el);
    const form = h('form', { class: 'filters', onsubmit: (e) => {
      e.preventDefault();
      const next = new URLSearchParams();
      for (const el of form.elements) {
        if (!el.name || el.name === 'before') continue;
        let v = el.type === 'checkbox' ? (el.checked ? 'true' : '') : el.value.trim();
        if ((el.name === 'since' || el.name === 'until') && v) v = new Date(v).toISOString();
        if (v) next.set(el.name, v);
      }
      location.hash = '#/calls' + (next.toString() ? '?' + next : '');
    } },
    field(t('col.caller'), input('caller', { placeholder: t('calls.prefix'), inputmode: 'tel' })),
    field(t('col.callee'), input('callee', { placeholder: t('calls.prefix'), inputmode: 'tel' })),
    field(t('col.protocol'), protocol),
    field(t('col.end_reason'), input('end_reason', { size: 14 })),
    field(t('field.route'), input('route', { size: 10 })),
    field(t('field.agent'), input('agent', { size: 10 })),
    field(t('filter.since'), since), field(t('filter.until'), until),
    field(t('calls.live_only'), live), field(t('calls.limit'), limit),
    h('button', { type: 'submit' }, t('calls.search')),
    h('button', { type: 'button', onclick: () => { location.hash = '#/calls'; } }, t('calls.reset')));
    const tbody = h('tbody');
    const status = h('p', { class: 'muted' });
    const pager = h('div', { class: 'pager' });
    const cols = ['col.call', 'col.protocol', 'col.caller', 'col.callee', 'col.route', 'col.duration', 'col.end_reason'];
    main.replaceChildren(h('h1', null, t('calls.title')), form,
      h('table', { class: 'calls' }, h('thead', null, h('tr', null, cols.map((c) => h('th', null, t(c))))), tbody),
      status, pager);
    const params = new URLSearchParams();
    for (const k of FILTERS) if (q.get(k)) params.set(k, q.get(k));
    api('GET', '/api/calls?' + params).then((body) => {
      for (const c of body.calls) {
        const ended = c.ended_at ? Date.parse(c.ended_at) : Date.now();
        tbody.append(h('tr', null,
          h('td', { class: 'num' }, h('a', { href: '#/call/' + c.id, 'data-call-link': c.id }, when(c.started_at))),
          h('td', null, c.protocol),
          h('td', { class: 'num' }, c.caller), h('td', { class: 'num' }, c.callee),
          h('td', null, [c.route, c.agent].filter(Boolean).join(' / ')),
          h('td', { class: 'dur' }, clock(ended - Date.parse(c.started_at))),
          h('td', null, c.ended_at ? reason(c.end_reason) : h('span', { class: 'badge live' }, t('call.live')))));
      }
      status.textContent = body.calls.length ? '' : t('calls.empty');
      if (q.get('before')) pager.append(h('button', { type: 'button', onclick: () => history.back() }, t('calls.newer')));
      if (body.next) {
        const older = new URLSearchParams(q);
        older.set('before', body.next);
        pager.append(h('button', { type: 'button', 'data-action': 'older', onclick: () => { location.hash = '#/calls?' + older; } }, t('calls.older')));
      }
    }, (e) => { status.textContent = t('error.load', { error: e.message }); });
  }

  // ---- Call ----------------------------------------------------------------------------

  async function allPages(path, key) {
    const out = [];
    let after = 0;
    for (let i = 0; i < 20; i++) {
      const body = await api('GET', path + '?limit=1000&after=' + after);
      out.push(...body[key]);
      if (body.next === null || body.next === undefined) break;
      after = body.next;
    }
    return out;
  }

  function viewCall(main, id) {
    main.replaceChildren(h('h1', null, t('call.title'), ' ', h('span', { class: 'count' }, id)));
    let audio = null;
    let rendering = false;
    async function render() {
      if (rendering) return;
      rendering = true;
      try {
        const call = await api('GET', '/api/calls/' + id);
        const [events, turns] = await Promise.all([
          allPages('/api/calls/' + id + '/events', 'events'),
          allPages('/api/calls/' + id + '/transcript', 'entries'),
        ]);
        draw(call, events, turns);
      } catch (e) {
        main.replaceChildren(h('h1', null, t('call.title')), h('p', { class: 'error' }, e.status === 404 ? t('call.not_found') : t('error.load', { error: e.message })));
      } finally {
        rendering = false;
      }
    }

    function draw(call, events, turns) {
      const live = !call.ended_at;
      const start = Date.parse(call.started_at);
      const head = h('h1', null, t('call.title'), ' ', h('span', { class: 'count' }, call.caller + ' → ' + call.callee),
        live ? h('span', { class: 'badge live' }, t('call.live')) : h('span', { class: 'badge' }, reason(call.end_reason)));
      const ended = call.ended_at ? Date.parse(call.ended_at) : Date.now();
      const fields = [
        ['id', call.id], ['external_id', call.external_id], ['protocol', call.protocol],
        ['caller', call.caller], ['callee', call.callee], ['route', call.route], ['agent', call.agent],
        ['node', call.node], ['key_name', call.key_name], ['started_at', when(call.started_at)],
        ['answered_at', when(call.answered_at)], ['ended_at', when(call.ended_at)],
        ['duration', clock(ended - start)], ['end_reason', reason(call.end_reason)],
        ['hangup_by', call.hangup_by], ['dtmf', call.dtmf],
        ['audio', call.frames_in + ' / ' + call.frames_out + ' frames, ' + call.bytes_in + ' / ' + call.bytes_out + ' B'],
        ['usage', call.usage ? JSON.stringify(call.usage) : ''],
      ];
      const record = h('dl', { class: 'record' }, fields.filter(([, v]) => v !== null && v !== undefined && v !== '')
        .map(([k, v]) => [h('dt', null, t('field.' + k)), h('dd', null, String(v))]));

      const recording = h('section', { class: 'recording' }, h('h2', null, t('call.recording')));
      audio = null;
      if (call.recording && !live) {
        audio = h('audio', { controls: true, preload: 'auto', src: '/api/calls/' + id + '/recording', 'data-recording': id });
        const canvas = h('canvas', { class: 'wave', 'data-waveform': id });
        recording.append(canvas, audio, h('p', { class: 'muted' }, t('call.channels') + ' · ' + t('call.jump')));
        waveform(canvas, audio, '/api/calls/' + id + '/recording', turns);
      } else {
        recording.append(h('p', { class: 'muted' }, call.recording ? t('call.live') : t('call.no_recording')));
      }

      const items = [];
      for (const e of events) {
        items.push({ at: Date.parse(e.at) - start, el: h('li', { class: 'event', 'data-event': e.kind },
          h('span', { class: 'at' }, offset(Date.parse(e.at) - start)), h('span', { class: 'who' }, e.kind),
          h('span', { class: 'detail' }, JSON.stringify(e.detail).slice(0, 300))) });
      }
      for (const turn of turns) {
        const li = h('li', { class: 'turn ' + turn.speaker, 'data-turn': turn.seq, 'data-start-ms': turn.start_ms, tabindex: 0 },
          h('span', { class: 'at' }, offset(turn.start_ms)),
          h('span', { class: 'who' }, t('speaker.' + turn.speaker) === 'speaker.' + turn.speaker ? turn.speaker : t('speaker.' + turn.speaker)),
          h('span', { class: 'text' }, turn.text, turn.interrupted ? ' ' + t('turn.interrupted') : ''));
        const jump = () => {
          if (!audio) return;
          audio.currentTime = turn.start_ms / 1000;
          audio.play().catch(() => {});
        };
        li.addEventListener('click', jump);
        li.addEventListener('keydown', (e) => { if (e.key === 'Enter') jump(); });
        items.push({ at: turn.start_ms, el: li });
      }
      items.sort((a, b) => a.at - b.at);
      const timeline = items.length
        ? h('ol', { class: 'timeline' }, items.map((i) => i.el))
        : h('p', { class: 'muted' }, t('call.timeline_empty'));

      const messages = [];
      for (const e of events) {
        // A flow's record step: its flow_step entry is flat (docs/events.md).
        const path = e.detail && e.detail.name === 'flow_step' && e.detail.path;
        if (typeof path === 'string' && path.startsWith('messages/')) {
          const file = path.split('/').pop();
          if (/^[A-Za-z0-9_-]+\.wav$/.test(file)) {
            messages.push(h('div', null, h('span', null, file), h('audio', { controls: true, preload: 'none', src: '/api/calls/' + id + '/messages/' + file })));
          }
        }
      }

      main.replaceChildren(...[head,
        live && isOperator() ? operatorPanel(id) : null,
        h('div', { class: 'columns' },
          h('section', null, h('h2', null, t('call.record')), record,
            h('h2', null, t('call.cdr')), call.cdr ? h('pre', { 'data-cdr': '' }, JSON.stringify(call.cdr, null, 2)) : h('p', { class: 'muted' }, t('call.no_cdr'))),
          h('section', null, recording, h('h2', null, t('call.timeline')), timeline,
            messages.length ? [h('h2', null, t('call.messages')), messages] : null))].filter(Boolean));
    }

    render();
    subscribe((ev) => { if (ev.data && ev.data.call_id === id) render(); }, () => {
      // Polling fallback: only a live call changes.
      const badge = main.querySelector('.badge.live');
      if (badge) render();
    }, () => {});
  }

  // The recording's waveform (peaks computed here from the WAV), the playhead, and the turns.
  async function waveform(canvas, audio, url, turns) {
    let peaks = null, seconds = 0;
    const paint = () => {
      const dpr = window.devicePixelRatio || 1;
      const w = Math.max(1, Math.floor(canvas.clientWidth * dpr));
      const hgt = Math.max(1, Math.floor(canvas.clientHeight * dpr));
      if (canvas.width !== w) canvas.width = w;
      if (canvas.height !== hgt) canvas.height = hgt;
      const g = canvas.getContext('2d');
      g.fillStyle = '#0d1117';
      g.fillRect(0, 0, w, hgt);
      if (!peaks) return;
      const lanes = peaks.length;
      const colours = ['#58a6ff', '#d2a8ff'];
      for (let c = 0; c < lanes; c++) {
        const mid = (hgt / lanes) * (c + 0.5), half = hgt / lanes / 2 - 2;
        g.fillStyle = colours[c % 2];
        const p = peaks[c], cols = p.length / 2;
        for (let x = 0; x < cols; x++) {
          const lo = p[2 * x], hi = p[2 * x + 1];
          g.fillRect(x * w / cols, mid - hi * half, Math.max(1, w / cols), Math.max(1, (hi - lo) * half));
        }
      }
      if (seconds > 0) {
        g.fillStyle = 'rgba(255,255,255,0.35)';
        for (const turn of turns) g.fillRect(turn.start_ms / 1000 / seconds * w, 0, 1, hgt);
        g.fillStyle = '#f85149';
        g.fillRect(audio.currentTime / seconds * w, 0, Math.max(1, dpr), hgt);
      }
    };
    canvas.addEventListener('click', (e) => {
      if (!seconds) return;
      const rect = canvas.getBoundingClientRect();
      audio.currentTime = Math.max(0, (e.clientX - rect.left) / rect.width) * seconds;
    });
    audio.addEventListener('timeupdate', paint);
    audio.addEventListener('seeked', paint);
    let frame = 0;
    const loop = () => { paint(); if (!audio.paused) frame = requestAnimationFrame(loop); };
    audio.addEventListener('play', () => { frame = requestAnimationFrame(loop); });
    onCleanup(() => cancelAnimationFrame(frame));
    paint();
    try {
      const r = await fetch(url, { credentials: 'same-origin' });
      if (!r.ok) return;
      if (Number(r.headers.get('content-length') || 0) > WAVEFORM_MAX_BYTES) {
        canvas.replaceWith(h('p', { class: 'muted' }, t('call.waveform_too_big')));
        return;
      }
      const wav = parseWav(await r.arrayBuffer());
      if (!wav) return;
      seconds = wav.frames / wav.rate;
      peaks = computePeaks(wav, Math.max(200, Math.min(2000, canvas.clientWidth || 800)));
      canvas.setAttribute('data-peaks', String(peaks[0].length / 2));
      paint();
    } catch (_) { /* the player still works without the picture */ }
  }

  // A 16-bit PCM WAV: {rate, channels, frames, samples: Int16Array (interleaved)}.
  function parseWav(buffer) {
    const v = new DataView(buffer);
    const tag = (o) => String.fromCharCode(v.getUint8(o), v.getUint8(o + 1), v.getUint8(o + 2), v.getUint8(o + 3));
    if (buffer.byteLength < 44 || tag(0) !== 'RIFF' || tag(8) !== 'WAVE') return null;
    let o = 12, fmt = null;
    while (o + 8 <= buffer.byteLength) {
      const id = tag(o), size = v.getUint32(o + 4, true);
      if (id === 'fmt ') {
        fmt = { format: v.getUint16(o + 8, true), channels: v.getUint16(o + 10, true), rate: v.getUint32(o + 12, true), bits: v.getUint16(o + 22, true) };
      } else if (id === 'data' && fmt && fmt.bits === 16 && fmt.channels > 0) {
        // A recording still being written may say 0 or too much: take what is there.
        const len = Math.min(size || Infinity, buffer.byteLength - o - 8) & ~1;
        const samples = new Int16Array(buffer.slice(o + 8, o + 8 + len));
        return { rate: fmt.rate, channels: fmt.channels, frames: Math.floor(samples.length / fmt.channels), samples };
      }
      o += 8 + size + (size & 1);
    }
    return null;
  }

  // Per channel, `cols` (min, max) pairs in -1..1.
  function computePeaks(wav, cols) {
    const out = [];
    const per = Math.max(1, Math.floor(wav.frames / cols));
    for (let c = 0; c < wav.channels; c++) {
      const p = new Float32Array(cols * 2);
      for (let x = 0; x < cols; x++) {
        let lo = 0, hi = 0;
        const from = x * per, to = Math.min(wav.frames, from + per);
        for (let f = from; f < to; f++) {
          const s = wav.samples[f * wav.channels + c] / 32768;
          if (s < lo) lo = s;
          if (s > hi) hi = s;
        }
        p[2 * x] = lo;
        p[2 * x + 1] = hi;
      }
      out.push(p);
    }
    return out;
  }

  // ---- Nodes ---------------------------------------------------------------------------

  function viewNodes(main) {
    const tbody = h('tbody');
    const status = h('p', { class: 'muted' });
    const cols = ['id', 'admin_url', 'version', 'state', 'live_calls', 'started_at', 'heartbeat_at'];
    main.replaceChildren(h('h1', null, t('nodes.title')),
      h('table', { class: 'nodes' }, h('thead', null, h('tr', null, cols.map((c) => h('th', null, t('node.' + c))))), tbody), status);
    const load = () => api('GET', '/api/nodes').then((body) => {
      tbody.replaceChildren(...body.nodes.map((n) => h('tr', { 'data-node-id': n.id },
        h('td', null, n.id), h('td', null, n.admin_url), h('td', null, n.version),
        h('td', null, h('span', { class: 'badge' + (n.state === 'serving' ? ' live' : '') }, n.state)),
        h('td', { class: 'num' }, n.live_calls), h('td', null, when(n.started_at)), h('td', null, when(n.heartbeat_at)))));
      status.textContent = body.nodes.length ? '' : t('nodes.empty');
    }, (e) => { status.textContent = t('error.load', { error: e.message }); });
    load();
    const timer = setInterval(load, 5000);
    onCleanup(() => clearInterval(timer));
  }

  // ---- the shell -----------------------------------------------------------------------

  function route() {
    stopView();
    const main = document.getElementById('main');
    if (!state.role) return;
    const hash = location.hash || '#/live';
    const [path, query] = hash.slice(1).split('?');
    const call = path.match(/^\/call\/([0-9a-fA-F-]{36})$/);
    const page = call ? 'calls' : (path.slice(1) || 'live');
    for (const a of document.querySelectorAll('a[data-nav]')) {
      if (a.dataset.nav === page) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
    }
    if (call) viewCall(main, call[1].toLowerCase());
    else if (page === 'calls') viewCalls(main, query || '');
    else if (page === 'nodes') viewNodes(main);
    else viewLive(main);
  }

  function translateStatic() {
    document.documentElement.lang = state.lang;
    for (const el of document.querySelectorAll('[data-i18n]')) el.textContent = t(el.dataset.i18n);
    const who = document.getElementById('who');
    if (!state.role) who.textContent = '';
    else if (!state.auth) who.textContent = t('open.api');
    else who.textContent = (state.name || '') + ' · ' + t('role.' + state.role);
  }

  function signedIn(body) {
    state.role = body.role;
    state.auth = body.auth;
    state.name = body.name;
    document.getElementById('signin').hidden = true;
    document.getElementById('nav').hidden = false;
    document.getElementById('signout').hidden = !body.auth;
    translateStatic();
    route();
  }

  function signedOut() {
    stopView();
    state.role = null;
    document.getElementById('main').replaceChildren();
    document.getElementById('nav').hidden = true;
    document.getElementById('signout').hidden = true;
    const form = document.getElementById('signin');
    form.hidden = false;
    translateStatic();
    form.elements.token.focus();
  }

  function init() {
    const form = document.getElementById('signin');
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      const error = document.getElementById('signin-error');
      error.textContent = '';
      const token = form.elements.token.value;
      form.elements.token.value = '';
      try {
        signedIn(await api('POST', '/api/session', { token }));
      } catch (err) {
        error.textContent = err.status === 401 ? t('signin.bad') : t('signin.failed', { error: err.message });
      }
    });
    document.querySelector('[data-action=lang]').addEventListener('click', () => {
      state.lang = state.lang === 'ko' ? 'en' : 'ko';
      localStorage.setItem('callgate.lang', state.lang);
      translateStatic();
      route();
    });
    document.getElementById('signout').addEventListener('click', async () => {
      try { await api('DELETE', '/api/session'); } catch (_) { /* signed out anyway */ }
      signedOut();
    });
    window.addEventListener('hashchange', route);
    translateStatic();
    api('GET', '/api/session').then(signedIn, () => signedOut());
  }

  init();
})();
