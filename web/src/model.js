// What the operator may do in each item state, and how the numbers are written. The
// states, whether each is busy and the actions each allows come from the vault's one
// table (GET /api/v1/states, src/vault/item_state.h), loaded once at sign-in: the pages
// offer an action only when it allows it, and the vault checks again (its refusal is
// shown when a page was stale).

// action id -> label (the vault's action names; 'failover-retry' is failover from a state
// that does not replicate: a failover that stopped half-way). Actions without a label
// here (create-point) have no button.
export const ACTION_LABELS = {
  protect: 'Protect',
  'test-failover': 'Test failover',
  failover: 'Failover',
  'failover-retry': 'Failover (retry)',
  unprotect: 'Unprotect',
  cleanup: 'Cleanup test failover',
  'change-point': 'Change recovery point',
  commit: 'Commit',
  reprotect: 'Reprotect',
};

// name -> {name, busy, replicating, failed_over, actions}
let kStates = new Map();

// The vault's table (GET /api/v1/states). A state it does not name offers nothing.
export function setStates(table) {
  const rows = table && Array.isArray(table.item_states) ? table.item_states : [];
  kStates = new Map(rows.filter((r) => r && typeof r.name === 'string').map((r) => [r.name, r]));
}

export function actionsFor(state) {
  const row = kStates.get(state);
  if (!row || !Array.isArray(row.actions)) return [];
  return row.actions
    .map((a) => (a === 'failover' && !row.replicating ? 'failover-retry' : a))
    .filter((a) => a in ACTION_LABELS);
}

export function isBusy(state) {
  const row = kStates.get(state);
  return !!(row && row.busy);
}

// A state's colour class: ok (green), warn (amber), bad (red), busy (blue), idle (grey).
export function stateTone(state) {
  if (state === 'Protected') return 'ok';
  if (isBusy(state)) return 'busy';
  if (state === 'FailoverFailed') return 'bad';
  if (state === 'Unprotected') return 'idle';
  return 'warn'; // TestFailoverCompleted, FailedOver, FailoverCommitted: a step is pending
}

// health: "Normal", "Warning: ...", "Critical: ..." -> {tone, label, detail}
export function healthOf(health) {
  const h = String(health ?? '');
  if (!h) return { tone: 'idle', label: 'Unknown', detail: '' };
  const m = /^(Normal|Warning|Critical)\s*:?\s*(.*)$/s.exec(h);
  if (!m) return { tone: 'warn', label: 'Warning', detail: h };
  const tone = m[1] === 'Normal' ? 'ok' : m[1] === 'Warning' ? 'warn' : 'bad';
  return { tone, label: m[1], detail: m[2] };
}

export function jobTone(state) {
  if (state === 'Succeeded') return 'ok';
  if (state === 'Failed') return 'bad';
  if (state === 'Running') return 'busy';
  if (state === 'Cancelled') return 'warn';
  return 'idle'; // Queued
}

export function isJobActive(job) {
  return job && (job.state === 'Queued' || job.state === 'Running');
}

// A check of a plan (docs/api.md, "Checks before acting"): passed, warning, failed.
export function checkTone(result) {
  if (result === 'passed') return 'ok';
  if (result === 'warning') return 'warn';
  return 'bad'; // failed, or a word this page does not know
}

// The boot check of a drill's VM: Healthy, Unhealthy, NotChecked (no check to run).
export function bootTone(health) {
  if (health === 'Healthy') return 'ok';
  if (health === 'Unhealthy') return 'bad';
  return 'idle';
}

// A job's VM name. A job's result fields are merged into it, and a drill's result has its
// own `vm` (the drill VM's boot result, an object): that one is not a name.
export function jobVmName(job) {
  return job && typeof job.vm === 'string' ? job.vm : '';
}

// The drill VM's boot result a test-failover or its cleanup reports, or null.
export function jobDrillVm(job) {
  if (!job) return null;
  const v = job.drill_vm ?? job.vm;
  return v && typeof v === 'object' && typeof v.health === 'string' ? v : null;
}

const kUnits = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
export function fmtBytes(n) {
  if (n === null || n === undefined || Number.isNaN(Number(n))) return '—';
  let v = Number(n);
  let i = 0;
  while (Math.abs(v) >= 1024 && i < kUnits.length - 1) {
    v /= 1024;
    i++;
  }
  const digits = i === 0 || v >= 100 ? 0 : v >= 10 ? 1 : 2;
  return `${v.toFixed(digits)} ${kUnits[i]}`;
}

export function fmtRpo(seconds) {
  if (seconds === null || seconds === undefined) return null;
  const s = Number(seconds);
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 600) return `${Math.round(s)} s`;
  return `${Math.round(s)} s (${fmtDuration(s)})`;
}

export function fmtDuration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

const pad = (n) => String(n).padStart(2, '0');

// "2026-11-26 09:27:02" in the browser's time zone (the full RFC 3339 time is in a title).
export function fmtTime(iso) {
  if (!iso) return '—';
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(
    d.getHours(),
  )}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

export function fmtClock(iso) {
  const d = iso instanceof Date ? iso : new Date(iso);
  if (Number.isNaN(d.getTime())) return '—';
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

export function fmtAgo(iso, now = Date.now()) {
  if (!iso) return '';
  const t = new Date(iso).getTime();
  if (Number.isNaN(t)) return '';
  const s = (now - t) / 1000;
  if (s < 1) return 'just now';
  return `${fmtDuration(s)} ago`;
}

export function pointLabel(p) {
  if (!p) return '—';
  return `point ${p.id} (${fmtTime(p.time)}, ${p.type === 'app' ? 'app-consistent' : 'crash-consistent'})`;
}

// The newest point of a list (oldest first, as the API gives them), optionally of a type.
export function newestPoint(points, type) {
  if (!points) return null;
  for (let i = points.length - 1; i >= 0; i--) {
    if (!type || points[i].type === type) return points[i];
  }
  return null;
}

// -- consoles -----------------------------------------------------------------------------

export const CONSOLE_KEEP_CHARS = 256 * 1024; // what the page keeps of a console

// What the page keeps after one more read (console.js): `kept` {text, next, cut, site, cuts}
// (next: null before the first read), `answer` the vault's {site, offset, next, size, text,
// cuts, cut_size} (docs/api.md, GET /vms/{name}/console). When the site moved the log aside
// since the last read (`cuts` grew) or the VM runs at another site now, what came back was
// read at an offset of the old log: it is dropped, a line says what happened (and how many
// bytes were not shown), and the next read starts the new log at 0. Pure, for the tests.
export function appendConsole(kept, answer, keep = CONSOLE_KEEP_CHARS) {
  let text = kept.text;
  let cut = kept.cut;
  let next = answer.next;
  const cuts = Number(answer.cuts) || 0;
  const line = (words) => (text && !text.endsWith('\n') ? '\n' : '') + `[${words}]\n`;
  if (kept.next === null) {
    cut = answer.offset > 0; // the tail: what came before is not shown
    text += answer.text || '';
  } else if (answer.site !== kept.site) {
    text += line(`the VM runs at ${answer.site} now: its console there, from the start`);
    next = 0;
  } else if (cuts > (kept.cuts || 0)) {
    const skipped = cuts === (kept.cuts || 0) + 1 && answer.cut_size >= kept.next ? answer.cut_size - kept.next : null;
    text += line(
      skipped === null
        ? 'the console log was moved aside at the site; some of it is not shown'
        : `the console log was moved aside at the site; ${fmtBytes(skipped)} of it not shown`,
    );
    next = 0;
  } else {
    // The site read from 0 (the log was moved aside at a start): a new one began.
    if (answer.offset < kept.next) text += line('the console log started again');
    text += answer.text || '';
  }
  if (text.length > keep) {
    const from = text.length - keep;
    const nl = text.indexOf('\n', from);
    text = text.slice(nl >= 0 && nl - from < 4096 ? nl + 1 : from);
    cut = true;
  }
  return { text, next, cut, size: answer.size, site: answer.site, cuts };
}
