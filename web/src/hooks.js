// Live data by polling: every 2 s while the tab is visible, paused while it is hidden
// and refreshed at once when it shows again. One request per poller in flight at a time.
import { useCallback, useEffect, useRef, useState } from 'preact/hooks';

export const POLL_INTERVAL_MS = 2000;

// Every live poller, so that an action can refresh all the pages' data at once.
const pollers = new Set();
export function refreshAll() {
  for (const tick of pollers) tick();
}

function pageVisible() {
  return typeof document === 'undefined' || document.visibilityState !== 'hidden';
}

// usePoll(fetcher, key): {data, error, loading, updatedAt, refresh}
// `key` (a string) restarts polling and forgets the data when it changes.
// `error` is the last call's failure; `data` keeps the last good answer, so a page keeps
// showing what it knew (with the error beside it) rather than going blank.
export function usePoll(fetcher, key, { interval = POLL_INTERVAL_MS, enabled = true } = {}) {
  const [state, setState] = useState({ data: undefined, error: null, updatedAt: null, key });
  const fetcherRef = useRef(fetcher);
  fetcherRef.current = fetcher;
  const tickRef = useRef(() => {});

  useEffect(() => {
    if (!enabled) return undefined;
    let stopped = false;
    let timer = null;
    let inFlight = false;
    setState((s) => (s.key === key ? s : { data: undefined, error: null, updatedAt: null, key }));

    const schedule = () => {
      clearTimeout(timer);
      if (!stopped && pageVisible()) timer = setTimeout(tick, interval);
    };
    async function tick() {
      if (stopped || inFlight) return;
      inFlight = true;
      try {
        const data = await fetcherRef.current();
        if (!stopped) setState({ data, error: null, updatedAt: new Date(), key });
      } catch (error) {
        if (!stopped) setState((s) => ({ ...s, error, key }));
      } finally {
        inFlight = false;
        schedule();
      }
    }
    tickRef.current = tick;
    pollers.add(tick);
    const onVisibility = () => {
      if (pageVisible()) tick();
      else clearTimeout(timer);
    };
    document.addEventListener('visibilitychange', onVisibility);
    tick();
    return () => {
      stopped = true;
      pollers.delete(tick);
      clearTimeout(timer);
      document.removeEventListener('visibilitychange', onVisibility);
    };
  }, [key, interval, enabled]);

  const refresh = useCallback(() => tickRef.current(), []);
  const fresh = state.key === key;
  return {
    data: fresh ? state.data : undefined,
    error: fresh ? state.error : null,
    loading: fresh ? state.data === undefined && !state.error : true,
    updatedAt: fresh ? state.updatedAt : null,
    refresh,
  };
}

// useLoad(fetcher, key): {data, error, loading, refresh} — one call per `key` (and per
// refresh), for answers that cost the vault work and go stale only when their input
// changes (a plan). With `enabled` false nothing is asked and nothing is known.
export function useLoad(fetcher, key, { enabled = true } = {}) {
  const [state, setState] = useState({ data: undefined, error: null, key: null, gen: 0 });
  const [gen, setGen] = useState(0);
  const fetcherRef = useRef(fetcher);
  fetcherRef.current = fetcher;
  useEffect(() => {
    if (!enabled) return undefined;
    let stopped = false;
    setState({ data: undefined, error: null, key: null, gen });
    fetcherRef.current().then(
      (data) => !stopped && setState({ data, error: null, key, gen }),
      (error) => !stopped && setState({ data: undefined, error, key, gen }),
    );
    return () => {
      stopped = true;
    };
  }, [key, enabled, gen]);
  const refresh = useCallback(() => setGen((g) => g + 1), []);
  const fresh = enabled && state.key === key && state.gen === gen;
  return {
    data: fresh ? state.data : undefined,
    error: fresh ? state.error : null,
    loading: enabled && !fresh,
    refresh,
  };
}

// The hash route: "#/items/vm1?x=y" -> {path: ["items", "vm1"], query: URLSearchParams}
export function parseHash(hash) {
  const h = (hash || '').replace(/^#\/?/, '');
  const [p, q = ''] = h.split('?');
  const path = p.split('/').filter(Boolean).map(decodeURIComponent);
  return { path, query: new URLSearchParams(q) };
}

export function useRoute() {
  const [hash, setHash] = useState(() => window.location.hash);
  useEffect(() => {
    const on = () => setHash(window.location.hash);
    window.addEventListener('hashchange', on);
    return () => window.removeEventListener('hashchange', on);
  }, []);
  return parseHash(hash);
}

export function navigate(hash) {
  if (window.location.hash !== hash) window.location.hash = hash;
}

// A clock that ticks every second (for "12 s ago"), paused with the page.
export function useNow(periodMs = 1000) {
  const [now, setNow] = useState(Date.now());
  useEffect(() => {
    const id = setInterval(() => {
      if (pageVisible()) setNow(Date.now());
    }, periodMs);
    return () => clearInterval(id);
  }, [periodMs]);
  return now;
}
