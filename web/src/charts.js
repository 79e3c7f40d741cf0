// The RPO chart (inline SVG, no chart library) and the recovery-point timeline.
import { useState } from 'preact/hooks';
import { html } from './html.js';
import { fmtClock, fmtTime } from './model.js';

const kHourMs = 3600 * 1000;
const kGapMs = 30 * 1000; // samples further apart than this are not joined by the line

// 0..max -> a round upper bound with 4 ticks.
function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

// samples: [{time, rpo_seconds}], the last hour.
export function RpoChart({ samples, now = Date.now() }) {
  const W = 1100;
  const H = 200;
  const L = 46;
  const R = 12;
  const T = 12;
  const B = 26;
  const t1 = now;
  const t0 = now - kHourMs;
  const pts = (samples || [])
    .map((s) => ({ t: new Date(s.time).getTime(), v: Number(s.rpo_seconds) }))
    .filter((s) => !Number.isNaN(s.t) && Number.isFinite(s.v) && s.t >= t0 - 60000)
    .sort((a, b) => a.t - b.t);
  const vmax = niceMax(Math.max(1, ...pts.map((p) => p.v)));
  const x = (t) => L + ((Math.max(t0, Math.min(t1, t)) - t0) / (t1 - t0)) * (W - L - R);
  const y = (v) => T + (1 - v / vmax) * (H - T - B);

  // One path, lifted where the vault took no samples (the item did not replicate).
  let d = '';
  let prev = null;
  for (const p of pts) {
    d += `${prev === null || p.t - prev.t > kGapMs ? 'M' : 'L'}${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`;
    prev = p;
  }
  const yTicks = [0, 0.25, 0.5, 0.75, 1].map((f) => f * vmax);
  const xTicks = [];
  const first = Math.ceil(t0 / (10 * 60000)) * 10 * 60000;
  for (let t = first; t <= t1; t += 10 * 60000) xTicks.push(t);
  const last = pts.length ? pts[pts.length - 1] : null;
  const max = pts.length ? Math.max(...pts.map((p) => p.v)) : null;

  return html`<figure class="rpo-chart" data-testid="rpo-chart">
    <svg viewBox=${`0 0 ${W} ${H}`} role="img" aria-label="RPO in seconds over the last hour">
      ${yTicks.map(
        (v) => html`<g>
          <line x1=${L} x2=${W - R} y1=${y(v)} y2=${y(v)} class="grid" />
          <text x=${L - 6} y=${y(v) + 4} class="axis" text-anchor="end">${+v.toFixed(2)} s</text>
        </g>`,
      )}
      ${xTicks.map(
        (t) => html`<g>
          <line x1=${x(t)} x2=${x(t)} y1=${T} y2=${H - B} class="grid" />
          <text x=${x(t)} y=${H - 8} class="axis" text-anchor="middle">${fmtClock(new Date(t)).slice(0, 5)}</text>
        </g>`,
      )}
      <line x1=${L} x2=${W - R} y1=${H - B} y2=${H - B} class="axis-line" />
      ${d ? html`<path d=${d} class="line" data-testid="rpo-line" />` : null}
      ${last ? html`<circle cx=${x(last.t)} cy=${y(last.v)} r="3.5" class="dot" />` : null}
      ${pts.length === 0
        ? html`<text x=${(W + L) / 2} y=${H / 2} text-anchor="middle" class="axis empty"
            >No samples in the last hour (the vault samples every 5 s while the item replicates)</text
          >`
        : null}
    </svg>
    <figcaption class="small muted">
      RPO over the last hour, ${pts.length} samples${max !== null ? `; highest ${max.toFixed(1)} s, latest ${last.v.toFixed(1)} s at ${fmtClock(new Date(last.t))}` : ''}.
    </figcaption>
  </figure>`;
}

const kRanges = [
  ['15m', 'Last 15 min', 15 * 60000],
  ['1h', 'Last hour', kHourMs],
  ['all', 'All', Infinity],
];

// points: [{id, time, seq, type, in_use?}] oldest first. Crash points are blue dots, app points
// green diamonds; a click selects one. Points too close to tell apart are stacked.
export function PointTimeline({ points, selectedId, onSelect, markId, markLabel, now = Date.now() }) {
  const [chosen, setChosen] = useState(null);
  const all = points || [];
  // Unless chosen: everything while it spans less than two hours, else the last hour
  // (thinning keeps one point an hour before that; the last hour holds most of them).
  const oldest = all.length ? new Date(all[0].time).getTime() : now;
  const range = chosen || (now - oldest > 2 * kHourMs ? '1h' : 'all');
  const setRange = setChosen;
  const span = kRanges.find((r) => r[0] === range)[2];
  const shown = all.filter((p) => span === Infinity || new Date(p.time).getTime() >= now - span);
  if (all.length === 0) {
    return html`<div class="timeline-empty muted" data-testid="timeline">
      No recovery points yet. A crash-consistent point is taken every few seconds while new
      writes arrive.
    </div>`;
  }
  const times = shown.map((p) => new Date(p.time).getTime());
  const t1 = Math.max(now, ...(times.length ? times : [now]));
  let t0 = times.length ? Math.min(...times) : now - 60000;
  t0 -= (t1 - t0) * 0.05; // a margin before the oldest point
  if (span !== Infinity) t0 = now - span;
  if (t1 - t0 < 20000) t0 = t1 - 20000;
  const pct = (t) => 2 + ((t - t0) / (t1 - t0)) * 96;

  // Lanes: a marker goes to the first lane where it does not touch the previous one.
  const kMinGapPct = 1.6;
  const lanesEnd = [];
  const placed = shown.map((p) => {
    const left = pct(new Date(p.time).getTime());
    let lane = lanesEnd.findIndex((end) => left - end >= kMinGapPct);
    if (lane === -1) lane = lanesEnd.length < 4 ? lanesEnd.length : 3;
    lanesEnd[lane] = left;
    return { p, left, lane };
  });
  const lanes = Math.max(1, lanesEnd.length);
  const ticks = [];
  for (let i = 0; i <= 4; i++) ticks.push(t0 + ((t1 - t0) * i) / 4);

  return html`<div class="timeline-wrap">
    <div class="timeline-tools">
      <span class="legend"><span class="mk mk-crash"></span> crash-consistent</span>
      <span class="legend"><span class="mk mk-app"></span> app-consistent</span>
      ${markId ? html`<span class="legend"><span class="mk mk-mark"></span> ${markLabel}</span>` : null}
      <span class="grow"></span>
      ${kRanges.map(
        ([k, label]) => html`<button
          class=${'chip' + (range === k ? ' on' : '')}
          aria-pressed=${range === k}
          onClick=${() => setRange(k)}
        >${label}</button>`,
      )}
    </div>
    <div class="timeline" data-testid="timeline" style=${{ height: 26 + lanes * 22 + 'px' }}>
      <div class="timeline-axis"></div>
      ${ticks.map(
        (t, i) => html`<span class="timeline-tick" style=${{ left: pct(t) + '%' }}
          >${i === 4 && Math.abs(t - now) < 2000 ? 'now' : fmtClock(new Date(t))}</span
        >`,
      )}
      ${placed.map(
        ({ p, left, lane }) => html`<button
          class=${'point-mk mk-' + p.type + (p.id === selectedId ? ' selected' : '') + (p.id === markId ? ' marked' : '')}
          style=${{ left: `calc(${left}% - 7px)`, top: 4 + lane * 22 + 'px' }}
          title=${`Point ${p.id}: ${p.type === 'app' ? 'app-consistent' : 'crash-consistent'}, ${fmtTime(p.time)} (seq ${p.seq})${p.in_use ? `, in use (${p.in_use})` : ''}`}
          aria-label=${`Point ${p.id}, ${p.type}, ${fmtTime(p.time)}`}
          aria-pressed=${p.id === selectedId}
          data-testid="point"
          data-point-id=${p.id}
          data-point-type=${p.type}
          onClick=${() => onSelect && onSelect(p)}
        ></button>`,
      )}
    </div>
    <div class="small muted">
      ${`${shown.length} of ${all.length} points shown; oldest ${fmtTime(all[0].time)}, newest ${fmtTime(all[all.length - 1].time)}.`}
    </div>
  </div>`;
}

// The same points as a list, newest first (a keyboard-friendly way to pick one).
export function PointList({ points, selectedId, onSelect, limit = 200 }) {
  const rows = (points || []).slice(-limit).reverse();
  if (rows.length === 0) return null;
  return html`<div class="point-list" data-testid="point-list">
    <table class="table compact">
      <thead><tr><th>Point</th><th>Type</th><th>Time</th><th>Seq</th></tr></thead>
      <tbody>
        ${rows.map(
          (p) => html`<tr
            class=${'clickable' + (p.id === selectedId ? ' selected' : '')}
            onClick=${() => onSelect && onSelect(p)}
            data-testid="point-row"
            data-point-id=${p.id}
          >
            <td>#${p.id}</td>
            <td><span class=${'ptype ptype-' + p.type}>${p.type === 'app' ? 'app-consistent' : 'crash-consistent'}</span></td>
            <td title=${p.time}>${fmtTime(p.time)}</td>
            <td>${p.seq}</td>
          </tr>`,
        )}
      </tbody>
    </table>
  </div>`;
}
