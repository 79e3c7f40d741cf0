// Sites: reachability, the disks they serve, what their recovery stores take and the
// room left on their file system.
import { api } from '../api.js';
import { Badge, ErrorBox, Loading } from '../components.js';
import { usePoll } from '../hooks.js';
import { html } from '../html.js';
import { fmtBytes } from '../model.js';

function Capacity({ fs, stores }) {
  if (!fs) return html`<span class="muted">unknown</span>`;
  const used = Math.max(0, fs.total_bytes - fs.free_bytes);
  const pctUsed = fs.total_bytes ? (used / fs.total_bytes) * 100 : 0;
  const pctStores = fs.total_bytes ? (stores / fs.total_bytes) * 100 : 0;
  const tone = pctUsed > 90 ? 'bad' : pctUsed > 75 ? 'warn' : 'ok';
  return html`<div class="capacity" data-testid="capacity">
    <div class=${'cap-bar tone-' + tone} title=${`${pctUsed.toFixed(1)}% used`}>
      <div class="cap-used" style=${{ width: pctUsed + '%' }}></div>
      <div class="cap-stores" style=${{ width: Math.max(pctStores, stores ? 0.5 : 0) + '%' }}></div>
    </div>
    <div class="small">
      ${fmtBytes(fs.free_bytes)} free of ${fmtBytes(fs.total_bytes)} (${pctUsed.toFixed(0)}% used; recovery stores ${fmtBytes(stores)})
    </div>
  </div>`;
}

export function SitesPage() {
  const sites = usePoll(() => api.sites(), 'sites');
  const list = sites.data || [];
  return html`<div class="page" data-testid="sites-page">
    <div class="page-head">
      <h1>Sites</h1>
      <span class="muted small">${list.length} sites · ${list.filter((s) => !s.reachable).length} not reachable</span>
    </div>
    ${sites.error ? html`<${ErrorBox} error=${sites.error} title="Could not load the sites:" />` : null}
    ${sites.loading
      ? html`<${Loading} what="Loading the sites" />`
      : list.length === 0
        ? html`<div class="empty">No sites registered (osr site add).</div>`
        : html`<div class="site-grid">
            ${list.map(
              (s) => html`<section class="panel site" data-testid="site" data-name=${s.name} data-reachable=${String(!!s.reachable)}>
                <header class="site-head">
                  <h2>${s.name}</h2>
                  ${s.reachable
                    ? html`<${Badge} tone="ok" testid="reachable">● Reachable<//>`
                    : html`<${Badge} tone="bad" testid="reachable">▲ Not reachable<//>`}
                </header>
                ${s.error ? html`<div class="error-box" role="alert">${s.error}</div>` : null}
                <dl class="kv">
                  <dt>API</dt><dd><code>${s.api}</code></dd>
                  ${s.nbd ? html`<dt>NBD</dt><dd><code>${s.nbd}</code></dd>` : null}
                  <dt>Disks served</dt><dd data-testid="disks-served">${s.disks_served ?? '—'}</dd>
                  <dt>VMs</dt><dd>${(s.vms || []).length ? (s.vms || []).join(', ') : html`<span class="muted">none</span>`}</dd>
                  <dt>Recovery stores</dt>
                  <dd>
                    ${(s.stores || []).length
                      ? html`${(s.stores || []).map((vm) => html`<div>${vm} <span class="muted">${s.store_bytes && s.store_bytes[vm] !== undefined ? fmtBytes(s.store_bytes[vm]) : ''}</span></div>`)}`
                      : html`<span class="muted">none</span>`}
                  </dd>
                  <dt>Store bytes</dt><dd data-testid="store-bytes">${s.reachable ? fmtBytes(s.store_bytes_total ?? 0) : '—'}</dd>
                  <dt>File system</dt><dd>${s.reachable ? html`<${Capacity} fs=${s.filesystem} stores=${s.store_bytes_total || 0} />` : '—'}</dd>
                </dl>
              </section>`,
            )}
          </div>`}
  </div>`;
}
