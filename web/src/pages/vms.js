// VMs: every VM the vault knows, where it runs, its disks; Protect for unprotected ones.
import { api } from '../api.js';
import { useActions } from '../actions.js';
import { Badge, ErrorBox, Loading, StateBadge } from '../components.js';
import { usePoll } from '../hooks.js';
import { html } from '../html.js';
import { fmtBytes } from '../model.js';

export function VmsPage() {
  const { open } = useActions();
  const vms = usePoll(() => api.vms(), 'vms');
  const list = vms.data || [];
  return html`<div class="page" data-testid="vms-page">
    <div class="page-head">
      <h1>VMs</h1>
      <span class="muted small">${list.length} VMs · ${list.filter((v) => v.state === 'Unprotected').length} not protected</span>
    </div>
    ${vms.error ? html`<${ErrorBox} error=${vms.error} title="Could not load the VMs:" />` : null}
    ${vms.loading
      ? html`<${Loading} what="Loading the VMs" />`
      : list.length === 0
        ? html`<div class="empty">No VMs yet. Create one with <code>osr vm create NAME --site SITE --disk os:1G</code>.</div>`
        : html`<div class="table-wrap"><table class="table" data-testid="vms-table">
            <thead>
              <tr><th>VM</th><th>Runs at</th><th>Driver</th><th>Running</th><th>Disks</th><th>Protection</th><th class="num">Epoch</th><th>Actions</th></tr>
            </thead>
            <tbody>
              ${list.map(
                (vm) => html`<tr data-testid="vm-row" data-name=${vm.name} data-state=${vm.state}>
                  <td>
                    <a class="strong" href=${'#/items/' + encodeURIComponent(vm.name)} data-testid="vm-link">${vm.name}</a>
                  </td>
                  <td>
                    ${vm.running_site || vm.site}
                    ${vm.site_error ? html`<div class="error-inline" title=${vm.site_error}>site does not answer: ${vm.site_error}</div>` : null}
                  </td>
                  <td>${vm.driver}</td>
                  <td>${vm.running ? html`<${Badge} tone="ok">running<//>` : html`<${Badge} tone="idle">stopped<//>`}</td>
                  <td class="small">
                    ${(vm.disks || []).map((d) => html`<div><code>${d.name}</code> ${fmtBytes(d.size_bytes)} <code class="uri muted">${d.uri}</code></div>`)}
                  </td>
                  <td><${StateBadge} state=${vm.state} /></td>
                  <td class="num">${vm.epoch}</td>
                  <td>
                    ${vm.state === 'Unprotected'
                      ? html`<button class="small-btn" data-testid="action-protect" onClick=${() => open('protect', vm.name)}>Protect</button>`
                      : html`<a href=${'#/items/' + encodeURIComponent(vm.name)}>open item</a>`}
                  </td>
                </tr>`,
              )}
            </tbody>
          </table></div>`}
  </div>`;
}
