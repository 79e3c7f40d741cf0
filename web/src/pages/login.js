// Sign in: an API token (osr token create, or the first admin token that osrd wrote to
// admin.token) becomes a session of this browser. The token is sent once, to
// POST /api/v1/login, and not kept by the page.
import { useState } from 'preact/hooks';
import { api } from '../api.js';
import { html } from '../html.js';

export function LoginPage({ onSignedIn, reason }) {
  const [token, setToken] = useState('');
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState('');
  const submit = async (e) => {
    e.preventDefault();
    setBusy(true);
    setError('');
    try {
      const who = await api.login(token.trim());
      setToken('');
      onSignedIn(who);
    } catch (err) {
      setError(err.message);
    } finally {
      setBusy(false);
    }
  };
  return html`<div class="page login">
    <form class="panel login-card" onSubmit=${submit} data-testid="login-form">
      <h1>Sign in to osr</h1>
      ${reason ? html`<p class="small" data-testid="login-reason">${reason}</p>` : null}
      <label for="login-token">API token</label>
      <input id="login-token" type="password" autocomplete="off" spellcheck="false" required
        placeholder="osr_…" value=${token} onInput=${(e) => setToken(e.target.value)} data-testid="login-token" />
      <p class="small">An administrator makes one with <code>osr token create NAME --role operator</code>.
        A quickstart's first admin token is in <code>osr-data/admin.token</code>.</p>
      ${error ? html`<div class="error-box" role="alert" data-testid="login-error">${error}</div>` : null}
      <button class="primary" type="submit" disabled=${busy || !token.trim()} data-testid="login-submit">
        ${busy ? 'Signing in…' : 'Sign in'}
      </button>
    </form>
  </div>`;
}
