// Replicated items: every protected VM, its state, direction, health, RPO and latest
// point, with only the actions its state allows.
import { createContext } from 'preact';
import { useContext } from 'preact/hooks';
import { api } from '../api.js';
import { ActionBar, useActions } from '../actions.js';
import { ErrorBox, HealthBadge, Loading, PointText, Rpo, StateBadge } from '../components.js';
import { usePoll, useNow } from '../hooks.js';
import { html } from '../html.js';
import { jobVmName } from '../model.js';

// The queued and running jobs, polled once by the app (the nav's count) and read by the
// pages (the spinner's link of an item in a busy state).
export const ActiveJobs = createContext({ byVm: {}, count: 0, error: null });

// vm -> its newest active job.
export function useActiveJobs() {
  const poll = usePoll(async () => {
    const [running, queued] = await Promise.all([api.jobs({ state: 'Running' }), api.jobs({ state: 'Queued' })]);
    return [...queued, ...running];
  }, 'active-jobs');
  const byVm = {};
  for (const j of poll.data || []) {
    // Running before Queued: the running one is what the item waits for.
    const vm = jobVmName(j);
    if (!byVm[vm] || byVm[vm].state !== 'Running') byVm[vm] = j;
  }
  return { byVm, count: (poll.data || []).length, error: poll.error };
}

export function ItemsTable({ items, jobsByVm, now }) {
  return html`<div class="table-wrap">
    <table class="table" data-testid="items-table">
      <thead>
        <tr>
          <th>VM</th>
          <th>State</th>
          <th>Direction</th>
          <th>Health</th>
          <th class="num">RPO</th>
          <th>Latest recovery point</th>
          <th>Actions</th>
        </tr>
      </thead>
      <tbody>
        ${items.map(
          (it) => html`<tr data-testid="item-row" data-name=${it.name} data-state=${it.state}>
            <td><a href=${'#/items/' + encodeURIComponent(it.name)} class="strong" data-testid="item-link">${it.name}</a></td>
            <td><${StateBadge} state=${it.state} /></td>
            <td class="nowrap" data-testid="direction">${it.source} → ${it.target}</td>
            <td class="health-cell"><${HealthBadge} health=${it.health} compact /></td>
            <td class="num nowrap"><${Rpo} seconds=${it.rpo_seconds} /></td>
            <td class="nowrap" data-testid="latest-point"><${PointText} point=${it.latest_point} now=${now} /></td>
            <td><${ActionBar} name=${it.name} state=${it.state} job=${jobsByVm[it.name]} /></td>
          </tr>`,
        )}
      </tbody>
    </table>
  </div>`;
}

function UnprotectedVms({ vms }) {
  const { open } = useActions();
  if (!vms.length) return null;
  return html`<section class="panel" data-testid="unprotected">
    <h2>Not protected (${vms.length})</h2>
    <p class="small muted">These VMs have no replica: a disaster at their site loses them.</p>
    <ul class="inline-list">
      ${vms.map(
        (vm) => html`<li data-testid="unprotected-vm" data-name=${vm.name}>
          <strong>${vm.name}</strong> <span class="muted">at ${vm.running_site || vm.site}</span>
          <button class="small-btn" data-testid="action-protect" onClick=${() => open('protect', vm.name)}>Protect</button>
        </li>`,
      )}
    </ul>
  </section>`;
}

export function ItemsPage() {
  const now = useNow();
  const items = usePoll(() => api.items(), 'items');
  const vms = usePoll(() => api.vms(), 'vms');
  const active = useContext(ActiveJobs);
  const list = items.data || [];
  const unprotected = (vms.data || []).filter((v) => v.state === 'Unprotected');
  const counts = {};
  for (const it of list) counts[it.state] = (counts[it.state] || 0) + 1;
  return html`<div class="page" data-testid="items-page">
    <div class="page-head">
      <h1>Replicated items</h1>
      <span class="muted small">
        ${list.length} protected${Object.entries(counts).map(([s, n]) => ` · ${n} ${s}`).join('')}
      </span>
    </div>
    ${items.error ? html`<${ErrorBox} error=${items.error} title="Could not load the items:" />` : null}
    ${items.loading
      ? html`<${Loading} what="Loading the items" />`
      : list.length === 0
        ? html`<div class="empty" data-testid="no-items">
            No VM is protected yet. ${unprotected.length ? 'Protect one below, or on ' : 'Create a VM (osr vm create), then protect it on '}
            <a href="#/vms">the VMs page</a>.
          </div>`
        : html`<${ItemsTable} items=${list} jobsByVm=${active.byVm} now=${now} />`}
    <${UnprotectedVms} vms=${unprotected} />
  </div>`;
}
