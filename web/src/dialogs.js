// The dialogs of the item actions. Each says what will happen (and what it deletes or
// reverses) before the confirm click, sends one request, and hands the job it answers
// with to `onStarted`. A refusal from the vault stays in the dialog, in words.
// Protect, test failover, failover and reprotect first ask the vault for their plan (the
// same call with dry_run: the site's checks, what it creates, uses, deletes); a failed
// check keeps the confirm button disabled.
import { useState } from 'preact/hooks';
import { api } from './api.js';
import { PointList, PointTimeline } from './charts.js';
import { Badge, ErrorBox, Modal, Spinner } from './components.js';
import { useLoad, usePoll } from './hooks.js';
import { html } from './html.js';
import { actionsFor, checkTone, fmtBytes, fmtTime, newestPoint, pointLabel } from './model.js';

// The plan of `action` for `body` (api.plan), asked again whenever the body changes.
function usePlan(action, name, body, enabled = true) {
  return useLoad(() => api.plan(action, name, body), `plan-${action}-${name}-${JSON.stringify(body)}`, { enabled });
}

// Whether a loaded plan keeps the confirm button disabled: while it is asked for, and
// when a check failed. A plan the vault could not make does not: the vault checks again
// at the confirm click, and says why it refuses.
function planBlocks(plan) {
  if (!plan) return false;
  if (plan.loading) return true;
  return !!(plan.data && plan.data.plan && !plan.data.plan.ok);
}

const kCheckIcon = { passed: '✓', warning: '!', failed: '✗' };

function PlanList({ title, items, testid, mark, empty }) {
  const id = 'plan-' + testid;
  return html`<div class="plan-list">
    <h4 id=${id}>${title}</h4>
    ${items.length
      ? html`<ul aria-labelledby=${id} data-testid=${'plan-' + testid}>
          ${items.map((t) => html`<li data-testid=${'plan-' + testid + '-item'}>${mark ? html`<${Badge} tone="busy">${mark}<//> ` : null}${t}</li>`)}
        </ul>`
      : html`<p class="muted small" data-testid=${'plan-' + testid}>${empty}</p>`}
  </div>`;
}

// A check's numbers (the space check's), exact, for a title: its message has them in
// words already.
function checkNumbers(check) {
  const parts = [];
  if (check.free_bytes !== undefined) parts.push(`free: ${check.free_bytes} bytes`);
  if (check.needed_bytes !== undefined) parts.push(`needed now: ${check.needed_bytes} bytes`);
  if (check.full_bytes !== undefined) parts.push(`at most: ${check.full_bytes} bytes`);
  return parts.length ? parts.join(', ') : undefined;
}

// The plan's verdict beside the confirm button, where it is seen whatever the dialog's
// length: the failed checks (why the button is disabled), or that the checks passed.
function PlanVerdict({ load }) {
  if (!load || (!load.loading && !(load.data && load.data.plan))) return null;
  if (load.loading) {
    return html`<div class="plan-verdict muted small" data-testid="plan-verdict-foot"><${Spinner} label="checking" /> Checking at the site…</div>`;
  }
  const plan = load.data.plan;
  const checks = Array.isArray(plan.checks) ? plan.checks : [];
  const failed = checks.filter((c) => c.result === 'failed');
  if (plan.ok) {
    const warned = checks.filter((c) => c.result === 'warning');
    return html`<div class="plan-verdict small" data-testid="plan-verdict-foot">
      <span class="tone-text-ok">✓</span> ${`The ${checks.length} checks at ${plan.site} passed${warned.length ? ` (${warned.length} with a warning)` : ''}; the plan is above.`}
    </div>
    ${warned.map((c) => html`<div class="warn-box small" data-testid="plan-warning" data-name=${c.name}>Check “${c.name}”: ${c.message}</div>`)}`;
  }
  return html`<div class="error-box" role="alert" data-testid="plan-refusal">
    <strong>Refused before anything is done. </strong>
    ${failed.map((c) => html`<div data-testid="plan-failed" data-name=${c.name} title=${checkNumbers(c)}>Check “${c.name}” failed at ${plan.site}: ${c.message}</div>`)}
    ${failed.length ? null : html`<div>The site refused the plan.</div>`}
    <div class="small">This cannot be done until the check passes; nothing was changed.</div>
  </div>`;
}

// The checks at the site the action acts on, and what it will create, use and delete.
export function PlanView({ load }) {
  if (!load) return null;
  if (load.loading) {
    return html`<section class="plan" data-testid="plan" data-state="loading" aria-label="Checks and plan">
      <${Spinner} label="checking" /> Checking at the site what this needs…
    </section>`;
  }
  if (load.error) {
    return html`<section class="plan" data-testid="plan" data-state="error" aria-label="Checks and plan">
      <div class="warn-box" data-testid="plan-error">
        <strong>The checks could not be run: </strong>${load.error.message}
        ${' The vault checks again when you confirm. '}
        <button class="small-btn" onClick=${load.refresh}>Check again</button>
      </div>
    </section>`;
  }
  const plan = load.data && load.data.plan;
  if (!plan) return null;
  const checks = Array.isArray(plan.checks) ? plan.checks : [];
  const warned = checks.filter((c) => c.result === 'warning');
  return html`<section class="plan" data-testid="plan" data-state=${plan.ok ? 'ok' : 'refused'} aria-label="Checks and plan">
    <div class="plan-head">
      <h3>Checks at ${plan.site}</h3>
      ${plan.ok
        ? html`<${Badge} tone=${warned.length ? 'warn' : 'ok'} testid="plan-verdict">${warned.length ? `passed, ${warned.length} warning${warned.length > 1 ? 's' : ''}` : 'all passed'}<//>`
        : html`<${Badge} tone="bad" testid="plan-verdict">refused<//>`}
      <span class="grow"></span>
      <button class="small-btn" onClick=${load.refresh} data-testid="plan-recheck">Check again</button>
    </div>
    <ul class="checks" aria-label=${`Checks at ${plan.site}`} data-testid="plan-checks">
      ${checks.map(
        (c) => html`<li class=${'check check-' + c.result} data-testid="plan-check" data-name=${c.name} data-result=${c.result}>
          <${Badge} tone=${checkTone(c.result)}><span aria-hidden="true">${kCheckIcon[c.result] || '?'}</span> ${c.result}<//>
          <strong class="check-name">${c.name}</strong>
          <span class="check-message" title=${checkNumbers(c)}>${c.message}</span>
        </li>`,
      )}
    </ul>
    <div class="plan-lists">
      <${PlanList} title="Will be created" items=${plan.creates || []} testid="creates" mark="new" empty="nothing" />
      <${PlanList} title="Will be used" items=${plan.uses || []} testid="uses" empty="nothing else" />
      <${PlanList} title="Will be deleted or stopped" items=${plan.deletes || []} testid="deletes" empty="nothing" />
    </div>
  </section>`;
}

// Shared frame: the plan, the confirm button, its busy state and the vault's answer.
function ActionDialog({ title, testid, onClose, confirmLabel, danger, canConfirm = true, run, onDone, children, wide, summary, plan }) {
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState(null);
  const confirm = async () => {
    setBusy(true);
    setError(null);
    try {
      const answer = await run();
      setBusy(false);
      onDone(answer);
    } catch (e) {
      setBusy(false);
      setError(e);
    }
  };
  return html`<${Modal}
    title=${title}
    testid=${testid}
    onClose=${onClose}
    wide=${wide}
    footer=${html`
      ${summary ? html`<${Summary}>${summary}<//>` : null}
      <${PlanVerdict} load=${plan} />
      ${error ? html`<${ErrorBox} error=${error} title="Not done:" testid="dialog-error" />` : null}
      <div class="buttons">
        <button onClick=${onClose} data-testid="cancel">Cancel</button>
        <button
          class=${'primary' + (danger ? ' danger' : '')}
          disabled=${busy || !canConfirm || planBlocks(plan)}
          title=${plan && plan.data && plan.data.plan && !plan.data.plan.ok ? 'A check failed: see the plan' : undefined}
          onClick=${confirm}
          data-testid="confirm"
        >
          ${busy ? html`<${Spinner} /> ` : null}${confirmLabel}
        </button>
      </div>
    `}
  >
    ${children}
    <${PlanView} load=${plan} />
  <//>`;
}

// The item the dialog acts on, live: a warning when its state moved on meanwhile.
function StaleWarning({ item, action }) {
  if (!item || actionsFor(item.state).includes(action)) return null;
  return html`<div class="warn-box" data-testid="stale-warning">
    The item is now <strong>${item.state}</strong>: this action is not offered in that state
    and the vault will probably refuse it.
  </div>`;
}

function Summary({ children }) {
  return html`<div class="summary" data-testid="summary"><strong>What will happen: </strong>${children}</div>`;
}

function PointPicker({ points, selectedId, onSelect, markId, markLabel }) {
  return html`<div class="picker">
    <${PointTimeline} points=${points} selectedId=${selectedId} onSelect=${onSelect} markId=${markId} markLabel=${markLabel} />
    <${PointList} points=${points} selectedId=${selectedId} onSelect=${onSelect} />
  </div>`;
}

const kChoices = [
  ['latest', 'Latest', 'first everything written until now reaches the recovery site, then a point there: lowest RPO (waits up to 30 s for the source)'],
  ['latest-processed', 'Latest processed', 'the newest point already at the recovery site: fastest'],
  ['latest-app', 'Latest app-consistent', 'the newest point taken with the VM quiesced'],
  ['custom', 'Custom', 'a point you pick in the timeline'],
];

// Failover (test = false) or test failover (test = true). `retry`: the item is
// FailoverFailed and the failover runs again at the same epoch.
export function FailoverDialog({ name, test, retry, initialPointId, onClose, onStarted }) {
  const item = usePoll(() => api.item(name), 'dlg-item-' + name);
  const points = usePoll(() => api.points(name), 'dlg-points-' + name);
  const vm = usePoll(() => api.vm(name), 'dlg-vm-' + name, { interval: 10000 });
  const [choice, setChoice] = useState(initialPointId ? 'custom' : test ? 'latest-processed' : 'latest');
  const [customId, setCustomId] = useState(initialPointId ?? null);
  const [shutdown, setShutdown] = useState(false);
  const [planned, setPlanned] = useState(false);
  const [start, setStart] = useState(true);

  const it = item.data;
  const pts = points.data || [];
  const source = it ? it.source : '…';
  const target = it ? it.target : '…';
  const driver = vm.data ? vm.data.driver : undefined;
  const effective = planned ? 'latest' : choice;

  let point = null; // the resolved point, when it is known now
  let pointWords = '';
  let problem = '';
  if (effective === 'latest') {
    pointWords = planned
      ? `the last write of ${source} (its VM is shut down and everything it wrote is sent first: no data loss)`
      : `the latest state: everything written until now, once it reaches ${target} (a new point; waits up to 30 s for ${source})`;
  } else if (effective === 'latest-processed') {
    point = newestPoint(pts);
    if (!point) problem = 'There is no recovery point yet.';
  } else if (effective === 'latest-app') {
    point = newestPoint(pts, 'app');
    if (!point) problem = 'There is no app-consistent point: choose another one.';
  } else {
    point = pts.find((p) => p.id === customId) || null;
    if (!point) problem = 'Pick a point in the timeline.';
  }
  if (point) pointWords = `point ${point.id} (${fmtTime(point.time)}, ${point.type === 'app' ? 'app-consistent' : 'crash-consistent'})`;

  const body = () => {
    const p = effective === 'custom' ? String(customId) : effective;
    if (test) return { point: p, start };
    return { point: p, shutdown_source: shutdown, planned, start };
  };
  const startsVm = start && driver !== 'none';
  const action = test ? 'test-failover' : retry ? 'failover-retry' : 'failover';
  const plan = usePlan(test ? 'test-failover' : 'failover', name, body(), !problem && !!it);
  const title = test ? `Test failover of ${name}` : retry ? `Failover of ${name} (retry)` : `Failover of ${name}`;

  const at = pointWords || '…';
  let summary;
  if (test) {
    const boots = !startsVm
      ? `No VM is started${driver === 'none' ? ' (driver none)' : ''}: the disks only. `
      : driver === 'process'
        ? `Then VM ${name} starts on them at ${target}: its command runs on the site's host (a process VM is not in a drill network and has no boot check). `
        : `Then VM ${name} boots on them at ${target}, in its drill networks (isolated from production), and the job waits for its boot check. `;
    summary = `Writable copies of the disks of ${name} open at ${target} on ${at}, at once (no copy). ${boots}` +
      `Replication ${source} → ${target} goes on; ${source} is not touched. Clean the drill up afterwards.`;
  } else {
    const first = shutdown || planned
      ? `The VM at ${source} is shut down first${planned ? '' : ' (if that fails, the failover goes on)'}. `
      : '';
    const opens = startsVm
      ? `VM ${name} will start at ${target} on ${at}`
      : `The disks of VM ${name} will open at ${target} on ${at}${driver === 'none' ? ' (driver none: no VM is started)' : ' (the VM is not started)'}`;
    const epoch = it ? ` (epoch ${retry ? it.epoch : it.epoch + 1})` : '';
    summary = `${first}${opens}; ${source} will be fenced${epoch}: its disks refuse writes from then on. ` +
      'Replication stops until you commit and reprotect.';
  }

  return html`<${ActionDialog}
    title=${title}
    testid=${test ? 'test-failover-dialog' : 'failover-dialog'}
    onClose=${onClose}
    wide
    confirmLabel=${test ? 'Start test failover' : retry ? 'Retry failover' : 'Fail over'}
    danger=${!test}
    canConfirm=${!problem && !!it}
    run=${() => (test ? api.testFailover(name, body()) : api.failover(name, body()))}
    onDone=${onStarted}
    summary=${html`${summary}`}
    plan=${plan}
  >
    <${StaleWarning} item=${it} action=${action} />
    ${item.error ? html`<${ErrorBox} error=${item.error} />` : null}
    <fieldset class="choices" disabled=${planned}>
      <legend>Recovery point</legend>
      ${kChoices.map(
        ([k, label, words]) => html`<label class="choice">
          <input type="radio" name="point" value=${k} checked=${choice === k} onChange=${() => setChoice(k)} data-testid=${'choice-' + k} />
          <span><strong>${label}</strong> <span class="muted">— ${words}</span></span>
        </label>`,
      )}
    </fieldset>
    ${choice === 'custom' && !planned
      ? html`<${PointPicker} points=${pts} selectedId=${customId} onSelect=${(p) => setCustomId(p.id)} />`
      : null}
    ${test
      ? html`<fieldset class="options">
          <legend>Options</legend>
          <label class="choice">
            <input type="checkbox" checked=${startsVm} disabled=${driver === 'none'} onChange=${(e) => setStart(e.target.checked)} data-testid="drill-boot" />
            <span><strong>Boot the VM in the drill network</strong>
              <span class="muted">${driver === 'none'
                ? ' — its driver is none: nothing to boot, the drill opens the disks only'
                : driver === 'process'
                  ? ` — at ${target}, its command on the site's host (a process VM: no drill network, no boot check); unticked, only the disks open`
                  : ` — at ${target}, plugged into the drill networks only (isolated from production), with a boot check; unticked, only the disks open`}</span></span>
          </label>
        </fieldset>`
      : html`<fieldset class="options">
          <legend>Options</legend>
          <label class="choice">
            <input type="checkbox" checked=${shutdown || planned} disabled=${planned} onChange=${(e) => setShutdown(e.target.checked)} data-testid="shutdown-source" />
            <span><strong>Shut down the source VM before failover</strong>
              <span class="muted"> — at ${source}; if the shutdown fails (the site is down, the VM does not stop), the failover goes on anyway.</span></span>
          </label>
          <label class="choice">
            <input type="checkbox" checked=${planned} onChange=${(e) => setPlanned(e.target.checked)} data-testid="planned" />
            <span><strong>Planned failover (no data loss; needs the source site)</strong>
              <span class="muted"> — shuts the VM down at ${source}, sends everything, fails over to the last write. The point choice does not apply; if ${source} does not answer, nothing changes.</span></span>
          </label>
          <label class="choice">
            <input type="checkbox" checked=${start} onChange=${(e) => setStart(e.target.checked)} data-testid="start-vm" />
            <span><strong>Start the VM at ${target}</strong>${driver === 'none' ? html`<span class="muted"> — its driver is none: nothing to start</span>` : null}</span>
          </label>
        </fieldset>`}
    ${problem ? html`<div class="warn-box" data-testid="point-problem">${problem}</div>` : null}
  <//>`;
}

export function ChangePointDialog({ name, initialPointId, onClose, onStarted }) {
  const item = usePoll(() => api.item(name), 'dlg-item-' + name);
  const points = usePoll(() => api.points(name), 'dlg-points-' + name);
  const [pointId, setPointId] = useState(initialPointId ?? null);
  const it = item.data;
  const pts = points.data || [];
  const current = it && it.failover ? it.failover.point : null;
  const point = pts.find((p) => p.id === pointId) || null;
  const where = it ? it.running_site : '…';
  return html`<${ActionDialog}
    title=${`Change the recovery point of ${name}`}
    testid="change-point-dialog"
    onClose=${onClose}
    wide
    danger
    confirmLabel="Change recovery point"
    canConfirm=${!!point && !!it}
    run=${() => api.changePoint(name, { point: String(pointId) })}
    onDone=${onStarted}
    summary=${html`
      ${point
        ? html`${`The VM ${name} at ${where} stops; `}<strong>every write made to its disks since the failover is discarded</strong>${`; the disks reopen on ${pointLabel(point)} (no copy) and the VM starts again.`}`
        : 'pick a point first.'}`}
  >
    <${StaleWarning} item=${it} action="change-point" />
    <p>Now on ${current ? pointLabel(current) : '…'}. Pick another point:</p>
    <${PointPicker} points=${pts} selectedId=${pointId} onSelect=${(p) => setPointId(p.id)} markId=${current ? current.id : null} markLabel="current point" />
  <//>`;
}

export function CommitDialog({ name, onClose, onStarted }) {
  const item = usePoll(() => api.item(name), 'dlg-item-' + name);
  const points = usePoll(() => api.points(name), 'dlg-points-' + name);
  const it = item.data;
  const n = points.data ? points.data.length : '…';
  return html`<${ActionDialog}
    title=${`Commit the failover of ${name}`}
    testid="commit-dialog"
    onClose=${onClose}
    canConfirm=${!!it}
    danger
    confirmLabel="Commit"
    run=${() => api.commit(name)}
    onDone=${onStarted}
    summary=${html`
      ${`${name} stays on ${it && it.failover ? pointLabel(it.failover.point) : '…'} at ${it ? it.running_site : '…'}: the rest of that point is copied into its disks while it runs, then `}
      <strong>all ${n} recovery points and the recovery store at ${it ? it.target : '…'} are deleted</strong>
      ${'. This is not reversible: afterwards the recovery point can no longer be changed. Reprotect comes next.'}`}
  >
    <${StaleWarning} item=${it} action="commit" />
    <p>Commit makes the failover final: ${name} stays where it runs now, on the point it runs on.</p>
  <//>`;
}

export function ReprotectDialog({ name, onClose, onStarted }) {
  const item = usePoll(() => api.item(name), 'dlg-item-' + name);
  const [compare, setCompare] = useState(false);
  const it = item.data;
  const plan = usePlan('reprotect', name, { compare }, !!it);
  const from = it ? it.running_site : '…';
  const to = it ? (it.failover && it.failover.from) || (it.running_site === it.target ? it.source : it.target) : '…';
  return html`<${ActionDialog}
    title=${`Reprotect ${name}`}
    testid="reprotect-dialog"
    onClose=${onClose}
    canConfirm=${!!it}
    confirmLabel="Reprotect"
    run=${() => api.reprotect(name, { compare })}
    onDone=${onStarted}
    plan=${plan}
    summary=${html`
      <span data-testid="reprotect-direction">Replication reverses: from <strong>${from}</strong> to <strong>${to}</strong>. </span>
      ${`Only the differences are shipped: what ${to} wrote that never reached ${from}, what the recovery store held after the point, and what was written at ${from} since the failover${compare ? ', found by comparing block hashes' : ''}. The old disks at ${to} become the base of the new recovery store; then ${name} is Protected, ${from} → ${to}.`}`}
  >
    <${StaleWarning} item=${it} action="reprotect" />
    <label class="choice">
      <input type="checkbox" checked=${compare} onChange=${(e) => setCompare(e.target.checked)} data-testid="compare" />
      <span><strong>Compare block hashes</strong>
        <span class="muted"> — read every disk at both sites and ship the regions that differ (slower; use it when unsure of ${to}'s history)</span></span>
    </label>
  <//>`;
}

export function CleanupDialog({ name, onClose, onStarted }) {
  const item = usePoll(() => api.item(name), 'dlg-item-' + name);
  const [notes, setNotes] = useState('');
  const it = item.data;
  const drill = it && it.drill;
  return html`<${ActionDialog}
    title=${`Clean up the test failover of ${name}`}
    testid="cleanup-dialog"
    onClose=${onClose}
    canConfirm=${!!it}
    danger
    confirmLabel="Clean up"
    run=${() => api.testFailoverCleanup(name, notes.trim() ? { notes: notes.trim() } : {})}
    onDone=${onStarted}
    summary=${html`
      <strong>The drill disks of ${name}${it ? ` at ${it.target}` : ''} and every write made to them are deleted</strong>
      ${`${drill && drill.point ? ` (they stood on ${pointLabel(drill.point)})` : ''}. Replication is not affected; the item is Protected again.`}`}
  >
    <${StaleWarning} item=${it} action="cleanup" />
    <label class="field">
      <span>Notes (what the drill showed; kept in the job)</span>
      <textarea rows="3" maxlength="2000" value=${notes} onInput=${(e) => setNotes(e.target.value)} data-testid="notes"></textarea>
    </label>
  <//>`;
}

export function UnprotectDialog({ name, onClose, onStarted }) {
  const item = usePoll(() => api.item(name), 'dlg-item-' + name);
  const points = usePoll(() => api.points(name), 'dlg-points-' + name);
  const it = item.data;
  return html`<${ActionDialog}
    title=${`Unprotect ${name}`}
    testid="unprotect-dialog"
    onClose=${onClose}
    canConfirm=${!!it}
    danger
    confirmLabel="Unprotect"
    run=${() => api.unprotect(name)}
    onDone=${onStarted}
    summary=${html`
      ${`Replication of ${name} stops; `}
      <strong>${`the recovery store at ${it ? it.target : '…'} and all ${points.data ? points.data.length : '…'} recovery points are deleted`}</strong>
      ${`. The VM keeps running at ${it ? it.running_site : '…'}, unprotected.`}`}
  >
    <${StaleWarning} item=${it} action="unprotect" />
    <p>Use this when ${name} no longer needs a replica.</p>
  <//>`;
}

export function ProtectDialog({ name, onClose, onStarted }) {
  const vm = usePoll(() => api.vm(name), 'dlg-vm-' + name, { interval: 10000 });
  const sites = usePoll(() => api.sites(), 'dlg-sites', { interval: 10000 });
  const policies = usePoll(() => api.policies(), 'dlg-policies', { interval: 10000 });
  const home = vm.data ? vm.data.site : null;
  const targets = (sites.data || []).filter((s) => s.name !== home);
  const [target, setTarget] = useState('');
  const [policy, setPolicy] = useState('default');
  const t = target || (targets[0] && targets[0].name) || '';
  const pol = (policies.data || []).find((p) => p.name === policy);
  const tSite = targets.find((s) => s.name === t);
  const plan = usePlan('protect', name, { target: t, policy }, !!t && !!policy);
  return html`<${ActionDialog}
    title=${`Protect ${name}`}
    testid="protect-dialog"
    onClose=${onClose}
    confirmLabel="Protect"
    canConfirm=${!!t && !!policy}
    run=${() => api.protect(name, { target: t, policy })}
    onDone=${onStarted}
    plan=${plan}
    summary=${html`
      ${`A recovery store for ${name} is created at ${t || '…'}; replication ${home || '…'} → ${t || '…'} starts with an initial copy of the written regions of its disks, then the first recovery point. The item is EnablingProtection, then Protected.`}`}
  >
    ${sites.error ? html`<${ErrorBox} error=${sites.error} />` : null}
    <div class="form-row">
      <label class="field">
        <span>Target site (where it can fail over to)</span>
        <select value=${t} onChange=${(e) => setTarget(e.target.value)} data-testid="target">
          ${targets.map((s) => html`<option value=${s.name}>${s.name}${s.reachable ? '' : ' (not reachable)'}</option>`)}
        </select>
      </label>
      <label class="field">
        <span>Replication policy</span>
        <select value=${policy} onChange=${(e) => setPolicy(e.target.value)} data-testid="policy">
          ${(policies.data || [{ name: 'default' }]).map((p) => html`<option value=${p.name}>${p.name}</option>`)}
        </select>
      </label>
    </div>
    ${pol
      ? html`<p class="small muted">
          Policy ${pol.name}: a crash-consistent point every ${pol.crash_interval_seconds} s while writes arrive,
          an app-consistent one every ${pol.app_interval_seconds} s, points kept ${Math.round(pol.retention_seconds / 3600)} h,
          compression ${pol.compression ?? 'lz4'}${pol.bandwidth_bytes_per_second ? `, at most ${fmtBytes(pol.bandwidth_bytes_per_second)}/s` : ''}.
        </p>`
      : null}
    ${tSite && !tSite.reachable ? html`<div class="warn-box">${t} does not answer: ${tSite.error || ''}</div>` : null}
  <//>`;
}
