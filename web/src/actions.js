// The actions an item's state allows, the dialog that runs one, and the jobs the
// operator started in this page (followed live until dismissed).
import { createContext } from 'preact';
import { useContext, useEffect, useState } from 'preact/hooks';
import { api } from './api.js';
import { JobCard, Spinner } from './components.js';
import {
  ChangePointDialog,
  CleanupDialog,
  CommitDialog,
  FailoverDialog,
  ProtectDialog,
  ReprotectDialog,
  UnprotectDialog,
} from './dialogs.js';
import { refreshAll, usePoll, useNow } from './hooks.js';
import { html } from './html.js';
import { ACTION_LABELS, actionsFor, isBusy, isJobActive } from './model.js';

export const Actions = createContext({ open: () => {}, track: () => {}, notify: () => {} });
export const useActions = () => useContext(Actions);

const kKeepOpenMs = 20000; // a succeeded job's steps stay shown that long in the tracker
const kDanger = new Set(['failover', 'failover-retry', 'unprotect', 'commit']);

// The buttons of one item: only what its state allows. Busy states offer nothing but a
// spinner and the running job.
export function ActionBar({ name, state, job, pointId }) {
  const { open } = useActions();
  if (isBusy(state)) {
    return html`<span class="busy-note" data-testid="actions" data-state=${state}>
      <${Spinner} label=${state} /> ${state}…
      ${job ? html` <a href=${'#/jobs?job=' + job.id} data-testid="job-link">job ${job.id} (${job.progress ?? 0}%)</a>` : null}
    </span>`;
  }
  const ids = actionsFor(state);
  if (ids.length === 0) return html`<span class="muted" data-testid="actions" data-state=${state}>—</span>`;
  return html`<span class="actions" data-testid="actions" data-state=${state}>
    ${ids.map(
      (id) => html`<button
        class=${'small-btn' + (kDanger.has(id) ? ' danger-outline' : '')}
        data-testid=${'action-' + id}
        data-action=${id}
        onClick=${() => open(id, name, { pointId })}
      >${ACTION_LABELS[id]}</button>`,
    )}
  </span>`;
}

export function DialogHost({ dialog, close, track, notify }) {
  if (!dialog) return null;
  const { kind, name, opts = {} } = dialog;
  const onStarted = (answer) => {
    close();
    if (answer && answer.id !== undefined && answer.type) track(answer);
    else if (kind === 'unprotect') notify(`${name} is no longer protected.`);
    refreshAll();
  };
  const p = { name, onClose: close, onStarted };
  switch (kind) {
    case 'protect':
      return html`<${ProtectDialog} ...${p} />`;
    case 'test-failover':
      return html`<${FailoverDialog} ...${p} test initialPointId=${opts.pointId} />`;
    case 'failover':
      return html`<${FailoverDialog} ...${p} initialPointId=${opts.pointId} />`;
    case 'failover-retry':
      return html`<${FailoverDialog} ...${p} retry initialPointId=${opts.pointId} />`;
    case 'cleanup':
      return html`<${CleanupDialog} ...${p} />`;
    case 'change-point':
      return html`<${ChangePointDialog} ...${p} initialPointId=${opts.pointId} />`;
    case 'commit':
      return html`<${CommitDialog} ...${p} />`;
    case 'reprotect':
      return html`<${ReprotectDialog} ...${p} />`;
    case 'unprotect':
      return html`<${UnprotectDialog} ...${p} />`;
    default:
      return null;
  }
}

function TrackedJob({ initial, onDismiss, now, newest }) {
  const [active, setActive] = useState(isJobActive(initial));
  const poll = usePoll(() => api.job(initial.id), 'tracked-job-' + initial.id, { enabled: active });
  const job = poll.data || initial;
  const [endedAt, setEndedAt] = useState(isJobActive(initial) ? null : Date.now());
  const ended = active && !isJobActive(job);
  useEffect(() => {
    if (!ended) return;
    setActive(false);
    setEndedAt(Date.now());
    refreshAll(); // the item's state changed with the job's end
  }, [ended]);
  // Steps stay open while the job runs, when it failed, and for a while after the newest
  // one succeeded; then it folds to one line, so that the page stays in view.
  const recent = ended || (endedAt !== null && Date.now() - endedAt < kKeepOpenMs);
  const open = isJobActive(job) || job.state === 'Failed' || (newest && recent);
  return html`<${JobCard} job=${job} onDismiss=${onDismiss} now=${now} compact open=${open} />`;
}

// The jobs started from this page, newest first.
export function JobTracker({ jobs, dismiss }) {
  const now = useNow();
  if (!jobs.length) return null;
  return html`<section class="tracker" data-testid="tracker" aria-label="Jobs you started">
    ${jobs.map((j, i) => html`<${TrackedJob} key=${j.id} initial=${j} newest=${i === 0} onDismiss=${() => dismiss(j.id)} now=${now} />`)}
  </section>`;
}
