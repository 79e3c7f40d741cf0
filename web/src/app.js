// The shell: navigation, the vault-unreachable banner, the jobs started here, the
// action dialogs, and the page of the current hash route.
import { useEffect, useErrorBoundary, useMemo, useState } from 'preact/hooks';
import { api, onConnectivity, onSignedOut, setCsrfToken } from './api.js';
import { Actions, DialogHost, JobTracker } from './actions.js';
import { ActiveJobs, useActiveJobs } from './pages/items.js';
import { html } from './html.js';
import { fmtClock, setStates } from './model.js';
import { usePoll, useRoute } from './hooks.js';
import { ItemPage } from './pages/item.js';
import { ItemsPage } from './pages/items.js';
import { JobsPage } from './pages/jobs.js';
import { LoginPage } from './pages/login.js';
import { SitesPage } from './pages/sites.js';
import { VmsPage } from './pages/vms.js';

const kMaxTracked = 3;

function useConnectivity() {
  const [state, setState] = useState({ down: null, lastOk: null });
  useEffect(
    () =>
      onConnectivity((ok, err) => {
        setState((s) => {
          if (ok) return s.down === null && s.lastOk && Date.now() - s.lastOk < 1000 ? s : { down: null, lastOk: Date.now() };
          if (err && err.unreachable) return { ...s, down: err };
          return s;
        });
      }),
    [],
  );
  return state;
}

// Who is signed in: null while asking, {signedIn: false, reason} or {signedIn: true, who}.
function useSession() {
  const [session, setSession] = useState(null);
  useEffect(() => {
    let live = true;
    api
      .whoami()
      .then(async (who) => {
        setCsrfToken(who.csrf_token);
        setStates(await api.states());
        if (live) setSession({ signedIn: true, who });
      })
      .catch((e) => {
        if (live) setSession({ signedIn: false, reason: e.status === 401 ? '' : e.message });
      });
    const off = onSignedOut((e) => {
      setCsrfToken('');
      setSession({ signedIn: false, reason: e.message });
    });
    return () => {
      live = false;
      off();
    };
  }, []);
  const signedIn = async (who) => {
    setCsrfToken(who.csrf_token);
    try {
      setStates(await api.states());
      setSession({ signedIn: true, who });
    } catch (e) {
      setSession({ signedIn: false, reason: e.message });
    }
  };
  const signOut = async () => {
    try {
      await api.logout();
    } finally {
      setCsrfToken('');
      setSession({ signedIn: false, reason: 'Signed out.' });
    }
  };
  return { session, signedIn, signOut };
}

function useVisible() {
  const [visible, setVisible] = useState(document.visibilityState !== 'hidden');
  useEffect(() => {
    const on = () => setVisible(document.visibilityState !== 'hidden');
    document.addEventListener('visibilitychange', on);
    return () => document.removeEventListener('visibilitychange', on);
  }, []);
  return visible;
}

// Which vault process leads (holds the lease: runs jobs, points, retention) and whether
// it is the one this page talks to; several vaults can serve one catalog.
export function leaderText(v) {
  if (!v || !v.this) return null;
  const leader = v.leader;
  if (!leader) return { text: 'no vault leads now', title: 'No vault holds the lease: jobs wait until one does', warn: true };
  const inst = (v.instances || []).find((i) => i.id === leader.id);
  const where = inst ? inst.host + ' ' + inst.api : leader.id;
  const self = v.this.role === 'leader';
  return {
    text: self ? 'leader: this vault' : 'leader: ' + where,
    title: `Lease token ${leader.token}, leading since ${leader.since}${self ? '' : '; this vault (' + v.this.id + ') follows'}`,
    warn: false,
  };
}

function LeaderBadge() {
  const vault = usePoll(() => api.vault(), 'vault', { interval: 5000 });
  const shown = leaderText(vault.data);
  if (!shown) return null;
  return html`<span class=${'live small' + (shown.warn ? ' down' : '')} data-testid="leader" title=${shown.title}>${shown.text}</span>`;
}

function Nav({ page, activeJobs }) {
  const tabs = [
    ['items', 'Replicated items'],
    ['vms', 'VMs'],
    ['jobs', 'Jobs'],
    ['sites', 'Sites'],
  ];
  return html`<nav class="tabs" aria-label="Pages">
    ${tabs.map(
      ([k, label]) => html`<a href=${'#/' + k} class=${page === k ? 'on' : ''} aria-current=${page === k ? 'page' : undefined} data-testid=${'nav-' + k}>
        ${label}${k === 'jobs' && activeJobs ? html` <span class="count" title="queued or running">${activeJobs}</span>` : null}
      </a>`,
    )}
  </nav>`;
}

function PageError({ error, reset }) {
  return html`<div class="page">
    <div class="error-box" role="alert" data-testid="render-error">
      <strong>This page failed to show: </strong>${String(error && error.message ? error.message : error)}.
      <button class="small-btn" onClick=${reset}>Try again</button>
    </div>
  </div>`;
}

function Page({ route }) {
  const [error, reset] = useErrorBoundary();
  if (error) return html`<${PageError} error=${error} reset=${reset} />`;
  const [page, name] = route.path;
  if (page === 'items' && name) return html`<${ItemPage} key=${name} name=${name} />`;
  if (page === 'jobs') return html`<${JobsPage} query=${route.query} />`;
  if (page === 'sites') return html`<${SitesPage} />`;
  if (page === 'vms') return html`<${VmsPage} />`;
  if (!page || page === 'items') return html`<${ItemsPage} />`;
  return html`<div class="page"><div class="empty">No page “${route.path.join('/')}”. <a href="#/items">Replicated items</a></div></div>`;
}

export function App() {
  const { session, signedIn, signOut } = useSession();
  if (session === null) return html`<div class="loading">Connecting to the vault…</div>`;
  if (!session.signedIn) {
    return html`<header class="topbar"><span class="brand">osr</span></header>
      <main><${LoginPage} onSignedIn=${signedIn} reason=${session.reason} /></main>`;
  }
  return html`<${Console} who=${session.who} signOut=${signOut} />`;
}

function Console({ who, signOut }) {
  const route = useRoute();
  const conn = useConnectivity();
  const visible = useVisible();
  const active = useActiveJobs();
  const [dialog, setDialog] = useState(null);
  const [tracked, setTracked] = useState([]);
  const [notice, setNotice] = useState(null);

  const actions = useMemo(
    () => ({
      open: (kind, name, opts) => setDialog({ kind, name, opts }),
      track: (job) => setTracked((t) => [job, ...t.filter((j) => j.id !== job.id)].slice(0, kMaxTracked)),
      notify: (text) => setNotice({ text, at: Date.now() }),
    }),
    [],
  );
  const page = route.path[0] || 'items';
  const where = route.path.join('/');
  useEffect(() => window.scrollTo(0, 0), [where]);

  return html`<${Actions.Provider} value=${actions}>
    <header class="topbar">
      <a class="brand" href="#/items" title="Open Site Recovery">osr</a>
      <${Nav} page=${page} activeJobs=${active.count} />
      <span class="grow"></span>
      <span class=${'live small' + (conn.down ? ' down' : '')} data-testid="live">
        ${conn.down ? '● vault not answering' : visible ? '● live' : '○ paused (tab hidden)'}
        ${conn.lastOk ? html` · ${fmtClock(new Date(conn.lastOk))}` : null}
      </span>
      <${LeaderBadge} />
      <span class="live small who" data-testid="whoami" title=${who.name}>${who.name} · ${who.role}</span>
      <button class="small-btn" onClick=${signOut} data-testid="sign-out">Sign out</button>
    </header>
    ${conn.down
      ? html`<div class="banner" role="alert" data-testid="banner">
          <strong>The vault does not answer.</strong>
          ${` Is osrd running and reachable from this browser? ${conn.lastOk ? `The page shows what it knew at ${fmtClock(new Date(conn.lastOk))} and` : 'The page'} retries every 2 s. `}
          <span class="small">(${conn.down.path ? `last call: ${conn.down.path}` : conn.down.message})</span>
        </div>`
      : null}
    ${notice
      ? html`<div class="notice" role="status" data-testid="notice">
          ${notice.text} <button class="linkish" aria-label="Hide" onClick=${() => setNotice(null)}>✕</button>
        </div>`
      : null}
    <main class=${conn.down ? 'stale' : ''} title=${conn.down ? 'The vault does not answer: this is what it said last' : undefined}>
      ${page === 'jobs'
        ? null /* the jobs page lists them all */
        : html`<${JobTracker} jobs=${tracked} dismiss=${(id) => setTracked((t) => t.filter((j) => j.id !== id))} />`}
      <${ActiveJobs.Provider} value=${active}><${Page} route=${route} /><//>
    </main>
    <${DialogHost} dialog=${dialog} close=${() => setDialog(null)} track=${actions.track} notify=${actions.notify} />
  <//>`;
}
