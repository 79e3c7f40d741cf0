// One replicated item: where it runs, its disks and policy, the recovery points (pick
// one to act on it), the RPO over the last hour, the failover record and its jobs.
import { useState } from 'preact/hooks';
import { api } from '../api.js';
import { ActionBar, useActions } from '../actions.js';
import { PointList, PointTimeline, RpoChart } from '../charts.js';
import { Badge, BootResult, ErrorBox, HealthBadge, JobCard, Loading, PointText, Rpo, Spinner, StateBadge } from '../components.js';
import { ConsolePanel } from '../console.js';
import { usePoll, useNow } from '../hooks.js';
import { html } from '../html.js';
import { actionsFor, fmtBytes, fmtDuration, fmtTime, isJobActive, pointLabel } from '../model.js';

function Kv({ rows }) {
  return html`<dl class="kv">
    ${rows.filter(Boolean).map(([k, v, testid]) => html`<dt>${k}</dt><dd data-testid=${testid}>${v}</dd>`)}
  </dl>`;
}

function Disks({ vm }) {
  if (!vm) return html`<${Loading} what="Loading the disks" />`;
  return html`<table class="table compact" data-testid="disks">
    <thead><tr><th>Disk</th><th class="num">Size</th><th>NBD URI (at ${vm.running_site})</th></tr></thead>
    <tbody>
      ${(vm.disks || []).map(
        (d) => html`<tr data-testid="disk-row">
          <td><code>${d.name}</code></td>
          <td class="num" title=${d.size_bytes + ' bytes'}>${fmtBytes(d.size_bytes)}</td>
          <td><code class="uri">${d.uri}</code></td>
        </tr>`,
      )}
    </tbody>
  </table>`;
}

function FailoverRecord({ fo }) {
  if (!fo) return null;
  return html`<section class="panel" data-testid="failover-record">
    <h2>Failover record</h2>
    <${Kv}
      rows=${[
        ['Failed over from', fo.from],
        ['When', html`<span title=${fo.time}>${fmtTime(fo.time)}</span>`],
        ['Kind', fo.planned ? 'planned (no data loss)' : 'unplanned'],
        ['Recovery point', pointLabel(fo.point), 'failover-point'],
        ['Epoch', String(fo.epoch)],
        ['Store seq then', String(fo.store_seq)],
      ]}
    />
  </section>`;
}

// The drill: its disks, and its VM's boot check once the test-failover job has it
// (`job`: that job while it still runs: the VM boots and the job waits for its check).
function Drill({ drill, job }) {
  if (!drill) return null;
  const vm = drill.vm && typeof drill.vm === 'object' ? drill.vm : null;
  return html`<section class="panel warn-panel" data-testid="drill">
    <h2>Test failover (drill) running</h2>
    <p>Writable copies on ${pointLabel(drill.point)}; clean them up when the drill is over.</p>
    ${drill.lost ? html`<div class="error-box" role="alert" data-testid="drill-lost">The drill disks were lost: ${drill.lost}</div>` : null}
    ${(drill.disks || []).map((d) => html`<div data-testid="drill-disk"><code>${d.name}</code> <code class="uri">${d.uri}</code></div>`)}
    <h3 class="drill-vm-title">Drill VM</h3>
    <div data-testid="drill-vm" data-health=${vm ? vm.health : job ? 'booting' : 'none'}>
      ${vm
        ? html`<${BootResult} vm=${vm} />`
        : job
          ? html`<span class="busy-note"><${Spinner} label="booting" /> The drill VM is starting; job ${job.id} waits for its boot check.</span>`
          : html`<span class="muted">No drill VM: the drill opened the disks only.</span>`}
    </div>
  </section>`;
}

// What can be done with the selected point, in the item's state.
function SelectedPoint({ name, state, point, current }) {
  const { open } = useActions();
  if (!point) return html`<p class="small muted">Click a point to select it.</p>`;
  const allowed = actionsFor(state);
  return html`<div class="selected-point" data-testid="selected-point" data-point-id=${point.id}>
    <span>Selected: <strong>${pointLabel(point)}</strong>, seq ${point.seq}${current && current.id === point.id ? ' (the current point)' : ''}${point.in_use ? ` — in use (${point.in_use}): kept until released` : ''}</span>
    ${allowed.includes('test-failover')
      ? html`<button class="small-btn" data-testid="point-test-failover" onClick=${() => open('test-failover', name, { pointId: point.id })}>Test failover to this point</button>`
      : null}
    ${allowed.includes('failover')
      ? html`<button class="small-btn danger-outline" data-testid="point-failover" onClick=${() => open('failover', name, { pointId: point.id })}>Failover to this point</button>`
      : null}
    ${allowed.includes('failover-retry')
      ? html`<button class="small-btn danger-outline" data-testid="point-failover" onClick=${() => open('failover-retry', name, { pointId: point.id })}>Retry failover to this point</button>`
      : null}
    ${allowed.includes('change-point') && !(current && current.id === point.id)
      ? html`<button class="small-btn danger-outline" data-testid="point-change" onClick=${() => open('change-point', name, { pointId: point.id })}>Change to this point</button>`
      : null}
  </div>`;
}

function NotProtected({ name }) {
  const { open } = useActions();
  const vm = usePoll(() => api.vm(name), 'vm-' + name);
  return html`<div class="page" data-testid="item-page" data-name=${name}>
    <div class="page-head"><h1>${name}</h1><${StateBadge} state="Unprotected" /></div>
    ${vm.error ? html`<${ErrorBox} error=${vm.error} />` : null}
    ${vm.data
      ? html`<section class="panel">
          <p>${name} is not protected: it runs at ${vm.data.running_site} with no replica.</p>
          <button class="primary" data-testid="action-protect" onClick=${() => open('protect', name)}>Protect…</button>
          <h2>Disks</h2>
          <${Disks} vm=${vm.data} />
        </section>
        <${ConsolePanel} name=${name} driver=${vm.data.driver} />`
      : null}
  </div>`;
}

export function ItemPage({ name }) {
  const now = useNow();
  const item = usePoll(() => api.item(name), 'item-' + name);
  const vm = usePoll(() => api.vm(name), 'vm-' + name);
  const points = usePoll(() => api.points(name), 'points-' + name);
  const rpo = usePoll(() => api.rpo(name), 'rpo-' + name, { interval: 5000 });
  const jobs = usePoll(() => api.jobs({ vm: name, limit: 20 }), 'jobs-' + name);
  const policies = usePoll(() => api.policies(), 'policies', { interval: 30000 });
  const [selectedId, setSelectedId] = useState(null);

  if (item.error && item.error.status === 404 && !item.data) return html`<${NotProtected} name=${name} />`;
  const it = item.data;
  if (!it) {
    return html`<div class="page" data-testid="item-page" data-name=${name}>
      <div class="page-head"><h1>${name}</h1></div>
      ${item.error ? html`<${ErrorBox} error=${item.error} title="Could not load the item:" />` : html`<${Loading} />`}
    </div>`;
  }
  const pts = points.data || [];
  const selected = pts.find((p) => p.id === selectedId) || null;
  const pol = (policies.data || []).find((p) => p.name === it.policy);
  const jobList = (jobs.data || []).slice().sort((a, b) => b.id - a.id);
  const activeJob = jobList.find(isJobActive);
  const current = it.failover ? it.failover.point : null;
  const v = vm.data;

  return html`<div class="page" data-testid="item-page" data-name=${name} data-state=${it.state}>
    <div class="page-head">
      <h1>${name}</h1>
      <${StateBadge} state=${it.state} />
      <span class="nowrap" data-testid="direction">${it.source} → ${it.target}</span>
      <${HealthBadge} health=${it.health} />
      <span class="grow"></span>
      <span class="nowrap">RPO <${Rpo} seconds=${it.rpo_seconds} /></span>
      <${ActionBar} name=${name} state=${it.state} job=${activeJob} pointId=${selected ? selected.id : undefined} />
    </div>
    ${item.error ? html`<${ErrorBox} error=${item.error} title="Could not refresh the item:" />` : null}
    <div class="grid2">
      <section class="panel">
        <h2>Overview</h2>
        <${Kv}
          rows=${[
            ['Replication', `${it.source} → ${it.target}`],
            ['Runs at', html`${it.running_site}${v ? html` · ${v.running ? html`<${Badge} tone="ok">running<//>` : html`<${Badge} tone="idle">not running<//>`} · driver ${v.driver}` : null}`, 'running-site'],
            ['Epoch', String(it.epoch), 'epoch'],
            ['Latest point', html`<${PointText} point=${it.latest_point} now=${now} />`],
            it.last_seq !== undefined && ['Writes (seq)', `${it.last_seq} at the source, ${it.durable_seq} durable at ${it.target} (${Math.max(0, it.last_seq - it.durable_seq)} on their way)`],
            ['Policy', pol
              ? `${pol.name}: crash point every ${pol.crash_interval_seconds} s, app point every ${fmtDuration(pol.app_interval_seconds)}, kept ${fmtDuration(pol.retention_seconds)}, ${pol.compression ?? 'lz4'}`
              : it.policy, 'policy'],
            v && v.site_error && ['Site error', html`<span class="error-inline">${v.site_error}</span>`],
          ]}
        />
      </section>
      <section class="panel">
        <h2>Disks</h2>
        ${vm.error ? html`<${ErrorBox} error=${vm.error} />` : null}
        <${Disks} vm=${v} />
      </section>
    </div>
    <${Drill} drill=${it.drill} job=${jobList.find((j) => j.type === 'test-failover' && isJobActive(j))} />
    <${FailoverRecord} fo=${it.failover} />
    <section class="panel" data-testid="points-panel">
      <h2>Recovery points <span class="muted small">(${pts.length})</span></h2>
      ${points.error ? html`<${ErrorBox} error=${points.error} />` : null}
      <${PointTimeline}
        points=${pts}
        selectedId=${selectedId}
        onSelect=${(p) => setSelectedId(p.id)}
        markId=${current ? current.id : null}
        markLabel="failed over to"
        now=${now}
      />
      <${SelectedPoint} name=${name} state=${it.state} point=${selected} current=${current} />
      <details class="more">
        <summary>All points as a list</summary>
        <${PointList} points=${pts} selectedId=${selectedId} onSelect=${(p) => setSelectedId(p.id)} />
      </details>
    </section>
    <section class="panel">
      <h2>RPO, last hour</h2>
      ${rpo.error ? html`<${ErrorBox} error=${rpo.error} />` : null}
      <${RpoChart} samples=${rpo.data} now=${now} />
    </section>
    <${ConsolePanel} name=${name} drill=${it.drill} driver=${v ? v.driver : undefined} />
    <section class="panel" data-testid="item-jobs">
      <h2>Recent jobs <a class="small" href=${'#/jobs?vm=' + encodeURIComponent(name)}>all jobs of ${name}</a></h2>
      ${jobs.error ? html`<${ErrorBox} error=${jobs.error} />` : null}
      ${jobList.length === 0 ? html`<p class="muted">No jobs yet.</p>` : null}
      ${jobList.slice(0, 8).map((j) => html`<${JobCard} key=${j.id} job=${j} open=${isJobActive(j) || j.state === 'Failed'} now=${now} />`)}
    </section>
  </div>`;
}
