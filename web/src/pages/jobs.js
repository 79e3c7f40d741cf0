// Jobs: every long operation, newest first, live progress and steps; filters by item
// and state (kept in the address, so a filtered view can be linked).
import { useEffect, useState } from 'preact/hooks';
import { api } from '../api.js';
import { ErrorBox, JobCard, Loading } from '../components.js';
import { navigate, usePoll, useNow } from '../hooks.js';
import { html } from '../html.js';
import { isJobActive, jobVmName } from '../model.js';

const kStates = ['Queued', 'Running', 'Succeeded', 'Failed', 'Cancelled'];
const kPage = 50;

export function JobsPage({ query }) {
  const now = useNow();
  const vm = query.get('vm') || '';
  const state = query.get('state') || '';
  const highlight = Number(query.get('job')) || null;
  const [limit, setLimit] = useState(kPage);
  const jobs = usePoll(() => api.jobs({ vm, state }), `jobs-${vm}-${state}`);
  const items = usePoll(() => api.vms(), 'vms', { interval: 10000 });

  const setFilter = (k, v) => {
    const q = new URLSearchParams();
    const next = { vm, state, [k]: v };
    if (next.vm) q.set('vm', next.vm);
    if (next.state) q.set('state', next.state);
    const s = q.toString();
    navigate('#/jobs' + (s ? '?' + s : ''));
  };

  useEffect(() => {
    if (!highlight || !jobs.data) return;
    const el = document.getElementById('job-' + highlight);
    if (el) el.scrollIntoView({ block: 'center' });
  }, [highlight, !!jobs.data]);

  const list = (jobs.data || []).slice().sort((a, b) => b.id - a.id);
  const names = [...new Set([...(items.data || []).map((v) => v.name), ...list.map(jobVmName), vm].filter(Boolean))].sort();
  const running = list.filter(isJobActive).length;
  const failed = list.filter((j) => j.state === 'Failed').length;
  let shown = list.slice(0, limit);
  if (highlight && !shown.some((j) => j.id === highlight)) {
    const h = list.find((j) => j.id === highlight);
    if (h) shown = [h, ...shown];
  }

  return html`<div class="page" data-testid="jobs-page">
    <div class="page-head">
      <h1>Jobs</h1>
      <span class="muted small">${list.length} shown by the filter · ${running} queued or running · ${failed} failed</span>
      <span class="grow"></span>
      <label class="inline-field">Item
        <select value=${vm} onChange=${(e) => setFilter('vm', e.target.value)} data-testid="filter-vm">
          <option value="">all</option>
          ${names.map((n) => html`<option value=${n}>${n}</option>`)}
        </select>
      </label>
      <label class="inline-field">State
        <select value=${state} onChange=${(e) => setFilter('state', e.target.value)} data-testid="filter-state">
          <option value="">all</option>
          ${kStates.map((s) => html`<option value=${s}>${s}</option>`)}
        </select>
      </label>
    </div>
    ${jobs.error ? html`<${ErrorBox} error=${jobs.error} title="Could not load the jobs:" />` : null}
    ${jobs.loading
      ? html`<${Loading} what="Loading the jobs" />`
      : list.length === 0
        ? html`<div class="empty" data-testid="no-jobs">No jobs${vm || state ? ' match the filter' : ' yet'}.</div>`
        : html`<div class="job-list">
            ${shown.map(
              (j, i) => html`<${JobCard}
                key=${j.id}
                job=${j}
                now=${now}
                highlight=${j.id === highlight}
                open=${j.id === highlight || isJobActive(j) || j.state === 'Failed' || i < 3}
              />`,
            )}
            ${list.length > limit
              ? html`<button onClick=${() => setLimit(limit + kPage)}>Show ${Math.min(kPage, list.length - limit)} more (${list.length - limit} older)</button>`
              : null}
          </div>`}
  </div>`;
}
