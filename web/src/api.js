// The vault's REST API (docs/api.md), on the origin that served this page.
//
// Every call resolves to the parsed JSON body or throws an ApiError whose `message` is
// meant for a person: the vault's own {error: {code, message}} when it sent one, or
// words for what went wrong on the way (no answer, not JSON, a timeout).

export const API_BASE = './api/v1';
const kTimeoutMs = 15000; // a call that takes longer is reported, not waited for

export class ApiError extends Error {
  constructor(message, { status = 0, code = '', path = '', unreachable = false } = {}) {
    super(message);
    this.name = 'ApiError';
    this.status = status; // HTTP status, 0 when there was no answer
    this.code = code; // the vault's error code ("invalid argument", "not found", ...)
    this.path = path;
    this.unreachable = unreachable; // true: the vault did not answer at all
  }
}

// What the caller should do, by HTTP status (the vault picks the status that way).
function statusWords(status) {
  if (status === 400) return 'the vault refused the request';
  if (status === 403) return 'not allowed';
  if (status === 404) return 'not found';
  // 409: the state does not allow it, or a check before acting failed (its message names
  // the check and its numbers); nothing was changed either way.
  if (status === 409) return 'not possible in the current state: nothing was changed';
  if (status === 501) return 'not supported';
  if (status === 503) return 'not possible right now, try again later';
  if (status >= 500) return 'the vault failed; an operator must look';
  return `HTTP ${status}`;
}

// The session (docs/security.md): the vault keeps it in an HttpOnly cookie this code
// never sees; calls that change something also send the session's CSRF token, which
// only a page of this origin can read (from /login or /whoami).
let csrfToken = '';
export function setCsrfToken(t) {
  csrfToken = t || '';
}

// Listeners told when the vault asks for a credential (401): the app shows the sign-in
// page.
const authListeners = new Set();
export function onSignedOut(fn) {
  authListeners.add(fn);
  return () => authListeners.delete(fn);
}

// Listeners told about every call's outcome: the app shows a banner while the vault
// does not answer and removes it at the next answer.
const listeners = new Set();
export function onConnectivity(fn) {
  listeners.add(fn);
  return () => listeners.delete(fn);
}
function tell(ok, err) {
  for (const fn of listeners) fn(ok, err);
}

export async function request(method, path, body) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), kTimeoutMs);
  let res;
  try {
    res = await fetch(API_BASE + path, {
      method,
      // The vault wants a body (with its length) on every POST, even an empty object.
      body: method === 'GET' ? undefined : JSON.stringify(body ?? {}),
      headers: method === 'GET' ? {} : { 'Content-Type': 'application/json', 'X-CSRF-Token': csrfToken },
      cache: 'no-store',
      credentials: 'same-origin',
      signal: controller.signal,
    });
  } catch (e) {
    const timedOut = e && e.name === 'AbortError';
    const err = new ApiError(
      timedOut
        ? `The vault did not answer within ${kTimeoutMs / 1000} s (${method} ${path}).`
        : `The vault does not answer (${method} ${path} got no answer): is osrd running and reachable from this browser?`,
      { path, unreachable: true },
    );
    tell(false, err);
    throw err;
  } finally {
    clearTimeout(timer);
  }
  const text = await res.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = undefined;
    }
  }
  if (!res.ok) {
    const e = data && data.error;
    const message =
      e && e.message
        ? `${e.message} (${statusWords(res.status)}, HTTP ${res.status})`
        : `${method} ${path}: ${statusWords(res.status)} (HTTP ${res.status})${
            text && data === undefined ? ': ' + text.slice(0, 200) : ''
          }`;
    const err = new ApiError(message, { status: res.status, code: e ? e.code : '', path });
    // An answer, even an error, means the vault is there.
    tell(true, null);
    if (res.status === 401 && path !== '/login') for (const fn of authListeners) fn(err);
    throw err;
  }
  if (data === undefined) {
    const err = new ApiError(`${method} ${path}: the answer is not JSON`, {
      status: res.status,
      path,
    });
    tell(true, null);
    throw err;
  }
  tell(true, null);
  return data;
}

const enc = encodeURIComponent;

export const api = {
  login: (token) => request('POST', '/login', { token }),
  logout: () => request('POST', '/logout', {}),
  whoami: () => request('GET', '/whoami'),
  vault: () => request('GET', '/vault'),
  states: () => request('GET', '/states'),
  sites: () => request('GET', '/sites'),
  policies: () => request('GET', '/policies'),
  vms: () => request('GET', '/vms'),
  vm: (name) => request('GET', `/vms/${enc(name)}`),
  items: () => request('GET', '/items'),
  item: (name) => request('GET', `/items/${enc(name)}`),
  points: (name) => request('GET', `/items/${enc(name)}/points`),
  rpo: (name) => request('GET', `/items/${enc(name)}/rpo`),
  jobs: ({ vm = '', state = '', limit = 0 } = {}) => {
    const q = new URLSearchParams();
    if (vm) q.set('vm', vm);
    if (state) q.set('state', state);
    if (limit) q.set('limit', String(limit));
    const s = q.toString();
    return request('GET', '/jobs' + (s ? '?' + s : ''));
  },
  job: (id) => request('GET', `/jobs/${enc(id)}`),
  // Stops a queued or running job at its next wait; answers the job (Cancelled, or still
  // Running with cancel_requested while a site call ends).
  cancelJob: (id) => request('POST', `/jobs/${enc(id)}/cancel`, {}),

  protect: (name, body) => request('POST', `/vms/${enc(name)}/protect`, body),
  unprotect: (name) => request('DELETE', `/items/${enc(name)}`),
  testFailover: (name, body) => request('POST', `/items/${enc(name)}/test-failover`, body),
  testFailoverCleanup: (name, body) =>
    request('POST', `/items/${enc(name)}/test-failover-cleanup`, body),
  failover: (name, body) => request('POST', `/items/${enc(name)}/failover`, body),
  changePoint: (name, body) => request('POST', `/items/${enc(name)}/change-point`, body),
  commit: (name) => request('POST', `/items/${enc(name)}/commit`, {}),
  reprotect: (name, body) => request('POST', `/items/${enc(name)}/reprotect`, body),

  // The plans of those actions (docs/api.md, "Checks before acting"): the same call with
  // dry_run, answered {plan: {action, vm, site, ok, checks, creates, uses, deletes}};
  // nothing changes.
  plan: (action, name, body) => {
    const path = {
      protect: `/vms/${enc(name)}/protect`,
      'test-failover': `/items/${enc(name)}/test-failover`,
      failover: `/items/${enc(name)}/failover`,
      reprotect: `/items/${enc(name)}/reprotect`,
    }[action];
    return request('POST', path, { ...body, dry_run: true });
  },

  // The serial console of the VM where it runs now (which 'vm') or of its drill VM
  // ('drill'): {site, which, offset, next, size, text}. Without `offset` its last `bytes`;
  // with it, from there (follow with offset = next). Operator role.
  console: (name, { which = 'vm', offset, bytes } = {}) => {
    const q = new URLSearchParams({ which });
    if (offset !== undefined && offset !== null) q.set('offset', String(offset));
    if (bytes) q.set('bytes', String(bytes));
    return request('GET', `/vms/${enc(name)}/console?${q}`);
  },
};
