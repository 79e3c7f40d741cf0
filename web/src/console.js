// The serial console of a VM (GET /vms/NAME/console; a process VM's: its output): of the
// VM where it runs now, or of its drill VM while a drill is open. It follows: the last
// 64 KiB first, then what comes (offset = next) every 2 s while the page is visible; the
// page keeps the last 256 KiB of it.
import { useEffect, useRef, useState } from 'preact/hooks';
import { api } from './api.js';
import { ErrorBox } from './components.js';
import { usePoll } from './hooks.js';
import { html } from './html.js';
import { appendConsole, fmtBytes, fmtClock } from './model.js';

const kReadBytes = 65536; // one read (the vault's most)

// The words for a console read the vault refused.
function consoleHint(error, which) {
  if (!error) return '';
  if (error.status === 403) return 'Reading a console needs the operator role; this session’s role cannot.';
  if (error.status === 404) {
    return which === 'drill' ? 'There is no drill VM now (no drill is open).' : 'The vault knows no such VM.';
  }
  return '';
}

// Follows one console; {data: {text, next, cut, size, site}, error, updatedAt, stopped, retry}.
// A 403 (the role cannot read consoles) stops the following until `retry`.
function useConsole(name, which, follow) {
  const [generation, setGeneration] = useState(0);
  const key = `console-${name}-${which}-${generation}`;
  const kept = useRef({ key: null });
  const [forbidden, setForbidden] = useState(null); // the key a 403 stopped
  const stopped = forbidden === key;
  const poll = usePoll(
    async () => {
      if (kept.current.key !== key) kept.current = { key, text: '', next: null, cut: false, size: 0, site: '', cuts: 0 };
      const k = kept.current;
      let answer;
      try {
        answer = await api.console(name, { which, offset: k.next, bytes: kReadBytes });
      } catch (e) {
        if (e.status === 403) setForbidden(key);
        throw e;
      }
      if (kept.current !== k) throw new Error('superseded'); // another console was chosen meanwhile
      Object.assign(k, appendConsole(k, answer));
      return { text: k.text, next: k.next, cut: k.cut, size: k.size, site: k.site };
    },
    key,
    { enabled: follow && !stopped },
  );
  return { ...poll, stopped, retry: () => setGeneration((g) => g + 1) };
}

// The console text: stays at its end while it is scrolled there (a reader scrolling up
// keeps their place).
function ConsoleText({ text, label }) {
  const ref = useRef(null);
  const atEnd = useRef(true);
  useEffect(() => {
    const el = ref.current;
    if (el && atEnd.current) el.scrollTop = el.scrollHeight;
  }, [text]);
  const onScroll = () => {
    const el = ref.current;
    if (el) atEnd.current = el.scrollTop + el.clientHeight >= el.scrollHeight - 8;
  };
  return html`<pre class="console" ref=${ref} onScroll=${onScroll} role="log" aria-live="off" aria-label=${label} tabindex="0" data-testid="console-text">${text}</pre>`;
}

// The console panel of the item page: the VM's console and, while a drill is open, a tab
// for the drill VM's. `driver`: the VM's driver (none: osr runs no VM, so no console).
export function ConsolePanel({ name, drill, driver }) {
  const [which, setWhich] = useState('vm');
  const [follow, setFollow] = useState(true);
  const noVm = driver === 'none'; // osr runs no VM for it: nothing to read, nor to ask for
  const hasDrill = !!drill && !noVm;
  const shown = which === 'drill' && !hasDrill ? 'vm' : which; // the drill ended: back to the VM
  useEffect(() => {
    if (which === 'drill' && !hasDrill) setWhich('vm');
  }, [which, hasDrill]);
  const c = useConsole(name, shown, follow && !noVm);
  const d = c.data;
  const hint = consoleHint(c.error, shown);
  const tabs = hasDrill ? ['vm', 'drill'] : ['vm'];
  // Arrow keys move between the tabs (the WAI-ARIA tabs pattern).
  const onTabKey = (e) => {
    if (e.key !== 'ArrowLeft' && e.key !== 'ArrowRight') return;
    const i = tabs.indexOf(shown);
    const next = tabs[(i + (e.key === 'ArrowRight' ? 1 : tabs.length - 1)) % tabs.length];
    setWhich(next);
    const el = document.getElementById('console-tab-' + next);
    if (el) el.focus();
  };
  const tab = (id, label) => html`<button
    role="tab"
    id=${'console-tab-' + id}
    class=${'tab' + (shown === id ? ' on' : '')}
    aria-selected=${shown === id ? 'true' : 'false'}
    tabindex=${shown === id ? '0' : '-1'}
    aria-controls="console-tabpanel"
    data-testid=${'console-tab-' + id}
    onClick=${() => setWhich(id)}
  >${label}</button>`;
  let empty = null;
  if (noVm) {
    empty = `Its driver is none: osr runs no VM for ${name}, so there is no console.`;
  } else if (d && !d.text) {
    empty =
      shown === 'drill'
        ? 'Nothing on the drill VM’s console yet (a drill of the disks only has none).'
        : 'Nothing on the console yet (the VM has not written to it, or does not run).';
  }
  return html`<section class="panel console-panel" data-testid="console-panel" data-which=${shown} aria-labelledby="console-title">
    <div class="console-head">
      <h2 id="console-title">Console</h2>
      <div role="tablist" aria-label="Which console" class="console-tabs" onKeyDown=${onTabKey}>
        ${tab('vm', 'VM')}
        ${hasDrill ? tab('drill', 'Drill VM') : null}
      </div>
      <span class="grow"></span>
      <label class="inline-field">
        <input type="checkbox" checked=${follow} onChange=${(e) => setFollow(e.target.checked)} data-testid="console-follow" />
        Follow (every 2 s)
      </label>
    </div>
    <div role="tabpanel" id="console-tabpanel" aria-labelledby=${'console-tab-' + shown}>
      <p class="small muted" data-testid="console-status">
        ${shown === 'drill' ? `The drill VM of ${name}` : `VM ${name} where it runs now`}${d && d.site ? ` (at ${d.site})` : ''}
        ${d ? ` · the last ${fmtBytes(d.text.length)}${d.cut ? ' (earlier output not shown)' : ''} of ${fmtBytes(d.size)}` : ''}
        ${c.updatedAt ? ` · read at ${fmtClock(c.updatedAt)}` : ''}
        ${!follow ? ' · paused' : c.stopped ? ' · stopped' : ''}
      </p>
      ${c.error
        ? html`<${ErrorBox} error=${c.error} title="Could not read the console:" testid="console-error">
            ${hint ? html`<div data-testid="console-hint">${hint}</div>` : null}
            ${c.stopped ? html`<button class="small-btn" onClick=${c.retry}>Try again</button>` : null}
          <//>`
        : null}
      ${d === undefined && !c.error && !noVm ? html`<div class="loading small">Reading the console…</div>` : null}
      ${d && d.text ? html`<${ConsoleText} text=${d.text} label=${shown === 'drill' ? `Console of the drill VM of ${name}` : `Console of VM ${name}`} />` : null}
      ${empty ? html`<p class="muted" data-testid="console-empty">${empty}</p>` : null}
    </div>
  </section>`;
}
