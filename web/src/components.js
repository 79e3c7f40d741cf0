// Small shared pieces: badges, spinner, error boxes, progress bars, job cards, modal.
import { useEffect, useRef, useState } from 'preact/hooks';
import { api } from './api.js';
import { refreshAll } from './hooks.js';
import { html } from './html.js';
import {
  bootTone,
  fmtAgo,
  fmtDuration,
  fmtRpo,
  fmtTime,
  healthOf,
  isBusy,
  isJobActive,
  jobDrillVm,
  jobTone,
  jobVmName,
  pointLabel,
  stateTone,
} from './model.js';

export function Badge({ tone = 'idle', children, title, testid }) {
  return html`<span class=${'badge tone-' + tone} title=${title} data-testid=${testid}
    >${children}</span
  >`;
}

export function Spinner({ label = 'working' }) {
  return html`<span class="spinner" role="status" aria-label=${label}></span>`;
}

export function StateBadge({ state }) {
  return html`<${Badge} tone=${stateTone(state)} testid="state" title=${state}>
    ${isBusy(state) ? html`<${Spinner} label=${state} />` : null}${state}
  <//>`;
}

// Colour AND words: the level as the badge, the reason beside it.
export function HealthBadge({ health, compact = false }) {
  const h = healthOf(health);
  return html`<span class="health" data-testid="health" title=${health}>
    <${Badge} tone=${h.tone}>${h.tone === 'ok' ? '●' : h.tone === 'bad' ? '▲' : '◆'} ${h.label}<//>
    ${h.detail ? html`<span class=${'health-detail' + (compact ? ' clamp' : '')}>${h.detail}</span>` : null}
  </span>`;
}

export function Rpo({ seconds }) {
  const text = fmtRpo(seconds);
  if (text === null) {
    return html`<span class="muted" data-testid="rpo" title="nothing replicates in this state"
      >— (not replicating)</span
    >`;
  }
  const tone = seconds > 300 ? 'bad' : seconds > 60 ? 'warn' : 'ok';
  return html`<span class=${'rpo rpo-' + tone} data-testid="rpo" data-rpo=${seconds}>${text}</span>`;
}

export function PointText({ point, now }) {
  if (!point) return html`<span class="muted">none yet</span>`;
  return html`<span title=${point.time}>
    <span class=${'ptype ptype-' + point.type}>${point.type === 'app' ? 'app' : 'crash'}</span>
    #${point.id} · ${fmtTime(point.time)}
    ${now ? html`<span class="muted"> (${fmtAgo(point.time, now)})</span>` : null}
  </span>`;
}

export function ErrorBox({ error, title, children, testid = 'error' }) {
  if (!error && !children) return null;
  return html`<div class="error-box" role="alert" data-testid=${testid}>
    ${title ? html`<strong>${title} </strong>` : null}${error ? error.message || String(error) : null}
    ${children}
  </div>`;
}

export function Loading({ what = 'Loading' }) {
  return html`<div class="loading"><${Spinner} /> ${what}…</div>`;
}

export function Progress({ value, tone = 'busy' }) {
  const v = Math.max(0, Math.min(100, Number(value) || 0));
  return html`<div
    class=${'progress tone-' + tone}
    role="progressbar"
    aria-valuemin="0"
    aria-valuemax="100"
    aria-valuenow=${v}
    data-testid="progress"
  >
    <div class="progress-fill" style=${{ width: v + '%' }}></div>
    <span class="progress-text">${Math.round(v)}%</span>
  </div>`;
}

const kStepIcon = { Succeeded: '✓', Failed: '✗', Running: '…', Queued: '·', Skipped: '–', Cancelled: '⊘' };

export function Steps({ steps }) {
  if (!steps || steps.length === 0) return html`<div class="muted small">No steps yet.</div>`;
  return html`<ol class="steps" data-testid="steps">
    ${steps.map(
      (s) => html`<li class=${'step step-' + String(s.state).toLowerCase()} data-state=${s.state}>
        <span class=${'step-icon tone-' + jobTone(s.state)} aria-hidden="true"
          >${s.state === 'Running' ? html`<${Spinner} />` : kStepIcon[s.state] || '·'}</span
        >
        <span class="step-name">${s.name}</span>
        <span class="step-state">${s.state}</span>
        ${s.message ? html`<span class="step-message">${s.message}</span>` : null}
      </li>`,
    )}
  </ol>`;
}

// A drill VM's boot check: {health: Healthy|Unhealthy|NotChecked, reason, boot_ms?,
// console_tail?}. `brief`: the badge and the reason only.
export function BootResult({ vm, brief }) {
  if (!vm) return null;
  return html`<span class="boot-result" data-testid="boot-result" data-health=${vm.health}>
    <${Badge} tone=${bootTone(vm.health)} testid="boot-health">${vm.health}<//>
    ${vm.reason ? html` <span data-testid="boot-reason">${vm.reason}</span>` : null}
    ${vm.boot_ms !== undefined ? html` <span class="muted">(up after ${(vm.boot_ms / 1000).toFixed(1)} s)</span>` : null}
    ${!brief && vm.console_tail
      ? html`<details class="more" open=${vm.health === 'Unhealthy'}>
          <summary>The console's last lines at the check</summary>
          <pre class="console console-tail" data-testid="boot-console-tail" tabindex="0">${vm.console_tail}</pre>
        </details>`
      : null}
  </span>`;
}

// What a finished job produced, in words (only the fields a type has).
function JobResult({ job, brief }) {
  const rows = [];
  if (job.point) rows.push(['Recovery point', pointLabel(job.point)]);
  if (job.epoch !== undefined) rows.push(['Epoch', String(job.epoch)]);
  if (job.mode) rows.push(['Reprotect mode', job.mode + (job.found && job.found.why && !brief ? ': ' + job.found.why : '')]);
  if (job.source && job.target) rows.push(['Replication', `${job.source} → ${job.target}`]);
  if (job.bytes_shipped !== undefined) rows.push(['Shipped', `${job.bytes_shipped} bytes (${job.wire_bytes_sent ?? 0} on the wire)`]);
  if (job.notes) rows.push(['Notes', job.notes]);
  const drillVm = jobDrillVm(job);
  if (drillVm) rows.push(['Drill VM', html`<${BootResult} vm=${drillVm} brief=${brief} />`]);
  if (!brief && job.disks && job.disks.length) {
    rows.push(['Disks', html`${job.disks.map((d) => html`<div><code>${d.name}</code> <code class="uri">${d.uri}</code></div>`)}`]);
  }
  if (!rows.length) return null;
  return html`<dl class="kv small">
    ${rows.map(([k, v]) => html`<dt>${k}</dt><dd>${v}</dd>`)}
  </dl>`;
}

export function jobTitle(job) {
  const vm = jobVmName(job);
  return `Job ${job.id} · ${job.type}${vm ? ' · ' + vm : ''}`;
}

// Stops a queued or running job (operator role); the job's last step then says what it
// left behind.
function CancelJobButton({ job }) {
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState('');
  const cancel = async () => {
    if (!window.confirm(`Cancel job ${job.id} (${job.type} ${jobVmName(job)})? It stops at its next wait and says what it leaves behind.`)) return;
    setBusy(true);
    setError('');
    try {
      await api.cancelJob(job.id);
      refreshAll();
    } catch (e) {
      setError(e.message);
    } finally {
      setBusy(false);
    }
  };
  return html`<button class="small" data-testid="job-cancel" disabled=${busy} onClick=${cancel}
      title="Stop this job at its next wait">${busy ? 'Cancelling…' : 'Cancel'}</button
    >${error ? html`<span class="error-text small" role="alert">${error}</span>` : null}`;
}

// One job: state, progress, steps, error in words, result. `open` shows the steps.
export function JobCard({ job, open, onDismiss, highlight, now, compact }) {
  const [expanded, setExpanded] = useState(open ?? true);
  useEffect(() => {
    if (open !== undefined) setExpanded(open);
  }, [open]);
  const tone = jobTone(job.state);
  const took =
    job.created && job.updated
      ? (new Date(job.updated).getTime() - new Date(job.created).getTime()) / 1000
      : null;
  return html`<article
    class=${'job-card' + (highlight ? ' highlight' : '') + ' job-' + String(job.state).toLowerCase()}
    data-testid="job"
    data-job-id=${job.id}
    data-job-type=${job.type}
    data-job-state=${job.state}
    id=${'job-' + job.id}
  >
    <header class="job-head">
      <button class="linkish job-toggle" onClick=${() => setExpanded(!expanded)} aria-expanded=${expanded}>
        ${expanded ? '▾' : '▸'}
      </button>
      <span class="job-title">
        <a href=${'#/jobs?job=' + job.id}>Job ${job.id}</a>
        <strong> ${job.type}</strong>
        ${jobVmName(job) ? html` · <a href=${'#/items/' + encodeURIComponent(jobVmName(job))}>${jobVmName(job)}</a>` : null}
      </span>
      <${Badge} tone=${tone} testid="job-state">
        ${job.state === 'Running' ? html`<${Spinner} />` : null}${job.state}
      <//>
      <${Progress} value=${job.progress} tone=${tone} />
      <span class="muted small job-time" title=${`created ${job.created}, updated ${job.updated}`}>
        ${fmtTime(job.created)}${took !== null && !['Queued', 'Running'].includes(job.state) ? ` · took ${took < 1 ? took.toFixed(2) + ' s' : fmtDuration(took)}` : now ? ` · ${fmtAgo(job.created, now)}` : ''}
      </span>
      ${isJobActive(job) ? html`<${CancelJobButton} job=${job} />` : null}
      ${onDismiss
        ? html`<button class="linkish dismiss" title="Hide this job" aria-label="Hide this job" onClick=${onDismiss}>✕</button>`
        : null}
    </header>
    ${job.error
      ? html`<div class="error-box" role="alert" data-testid="job-error">
          <strong>${job.state === 'Cancelled' ? 'Cancelled: ' : 'The job failed: '}</strong>${job.error}
        </div>`
      : null}
    ${expanded
      ? html`<div class="job-body">
          <${Steps} steps=${job.steps} />
          <${JobResult} job=${job} brief=${compact} />
        </div>`
      : null}
  </article>`;
}

// A modal dialog: Escape and the backdrop close it; focus starts inside.
export function Modal({ title, onClose, children, footer, testid = 'dialog', wide }) {
  const ref = useRef(null);
  useEffect(() => {
    const onKey = (e) => {
      if (e.key === 'Escape') onClose();
    };
    document.addEventListener('keydown', onKey);
    const el = ref.current && ref.current.querySelector('input, select, textarea, button.primary');
    if (el) el.focus();
    return () => document.removeEventListener('keydown', onKey);
  }, []);
  return html`<div class="modal-backdrop" onMouseDown=${(e) => e.target === e.currentTarget && onClose()}>
    <div
      class=${'modal' + (wide ? ' wide' : '')}
      role="dialog"
      aria-modal="true"
      aria-label=${title}
      data-testid=${testid}
      ref=${ref}
    >
      <header class="modal-head">
        <h2>${title}</h2>
        <button class="linkish" aria-label="Close" onClick=${onClose}>✕</button>
      </header>
      <div class="modal-body">${children}</div>
      ${footer ? html`<footer class="modal-foot">${footer}</footer>` : null}
    </div>
  </div>`;
}
