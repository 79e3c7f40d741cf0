import { render } from 'preact';
import { App } from './app.js';
import { html } from './html.js';
import './style.css';

const root = document.getElementById('app');

// Never a blank screen: if the app itself cannot start, say so.
function fatal(message) {
  root.innerHTML = '';
  const box = document.createElement('div');
  box.className = 'error-box';
  box.setAttribute('role', 'alert');
  box.style.margin = '24px';
  box.textContent = `The osr console failed to start: ${message}. Reload the page; if it persists, check the vault's log.`;
  root.appendChild(box);
}

try {
  root.textContent = '';
  render(html`<${App} />`, root);
} catch (e) {
  fatal(e && e.message ? e.message : String(e));
}
window.addEventListener('error', (e) => {
  if (!root.firstElementChild) fatal(e.message);
});
