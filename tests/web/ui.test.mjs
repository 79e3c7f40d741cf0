// Browser test of the web UI against a real `osrd quickstart`, driven by clicking in
// Debian's chromium (playwright-core; never a downloaded browser).
//
// It creates a VM with the osr CLI (a process VM: a shell loop that prints its disks' URIs,
// then a numbered line every second, as its console) and writes to it with qemu-io, then,
// all in the page: protects it, waits for recovery points in the timeline, runs a test
// failover that boots the drill VM and its cleanup (with notes), reads both consoles,
// meets the vault's refusal through a stale dialog, fails over to a custom point picked in
// the timeline, changes the point, commits and reprotects. The dialogs of protect, test
// failover, failover and reprotect show their plan first (the site's checks, what is
// created, used, deleted); a failed check (the vault's answer, altered in the browser)
// keeps the confirm button disabled. At each state it checks the state shown, the actions
// offered (and that no other is), the RPO, and the jobs' progress and steps. A reader
// cannot read a console, and is told so. A QEMU VM's drill boots the test guest (built in
// GUEST_DIR by tests/vm/build_guest.sh when it is missing; without qemu the test fails):
// its boot check passes (Healthy) and its console shows the guest's lines. Last it stops
// the vault and checks that the page says so. Screenshots of every page go to ARTIFACTS.
//
//   node tests/web/ui.test.mjs
//
// Env: OSRD, OSR (default <repo>/build/osrd, osr), WEB_DIST (default <repo>/web/dist),
// ARTIFACTS (default <repo>/build/web-artifacts), CHROMIUM (default /usr/bin/chromium),
// GUEST_DIR (default guest/ beside OSRD: vmlinuz, initramfs.cpio.gz).
// Exit status 0 when every check passed, 1 otherwise.

import { execFile, spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, createWriteStream } from 'node:fs';
import { createRequire } from 'node:module';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
const OSRD = process.env.OSRD || join(REPO, 'build/osrd');
const OSR = process.env.OSR || join(REPO, 'build/osr');
const WEB_DIST = process.env.WEB_DIST || join(REPO, 'web/dist');
const ARTIFACTS = process.env.ARTIFACTS || join(REPO, 'build/web-artifacts');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const GUEST_DIR = process.env.GUEST_DIR || join(dirname(OSRD), 'guest');

const kTestTimeoutMs = 250_000; // the whole test, whatever hangs (CTest gives it 300 s)
const kStepTimeoutMs = 20_000; // one UI wait
const kJobTimeoutMs = 45_000; // one job to finish
const kBootJobTimeoutMs = 120_000; // a drill that boots the QEMU guest (TCG: seconds to a minute)
const kStartTimeoutMs = 20_000; // the quickstart to say "ready"
const kStopGraceMs = 10_000; // SIGINT, then SIGKILL

const execFileP = promisify(execFile);
const t0 = Date.now();
const secs = () => ((Date.now() - t0) / 1000).toFixed(1).padStart(5);
const log = (...a) => console.log(`[${secs()}s]`, ...a);

let failures = 0;
function check(cond, what) {
  if (cond) {
    log('  ok:', what);
  } else {
    failures++;
    log('  FAIL:', what);
  }
  return cond;
}
class Fatal extends Error {}
function must(cond, what) {
  if (!check(cond, what)) throw new Fatal(what);
}

// ---- preconditions: a clear failure, never a silent skip ----------------------------
function preflight() {
  const missing = [];
  if (!existsSync(CHROMIUM)) {
    missing.push(`${CHROMIUM} is missing: install Debian's chromium (apt-get install -y --no-install-recommends chromium)`);
  }
  if (!existsSync(OSRD)) missing.push(`osrd not found at ${OSRD} (build it, or set OSRD)`);
  if (!existsSync(OSR)) missing.push(`osr not found at ${OSR} (build it, or set OSR)`);
  if (!existsSync(join(WEB_DIST, 'index.html'))) {
    missing.push(`${WEB_DIST}/index.html is missing: run npm ci --prefix web && npm run build --prefix web (or set WEB_DIST)`);
  }
  if (!onPath('qemu-io')) missing.push('qemu-io is missing: install qemu-utils');
  return missing;
}

function onPath(name) {
  return (process.env.PATH || '').split(':').some((dir) => dir && existsSync(join(dir, name)));
}

// What the QEMU drill needs: qemu-system-x86_64 (scripts/bootstrap installs it) and the
// test guest, built here when it is missing (tests/vm/build_guest.sh; the e2e tests keep it
// in build/guest too). Returns why it cannot run ('' when it can): the test then fails.
async function prepareGuest() {
  if (!onPath('qemu-system-x86_64')) return 'qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)';
  const missing = () => ['vmlinuz', 'initramfs.cpio.gz'].some((f) => !existsSync(join(GUEST_DIR, f)));
  if (missing()) {
    log(`building the test guest in ${GUEST_DIR}`);
    try {
      await execFileP('bash', [join(REPO, 'tests/vm/build_guest.sh'), GUEST_DIR], { timeout: 600000 });
    } catch (e) {
      return `tests/vm/build_guest.sh ${GUEST_DIR} failed: ${String(e.stderr || e.message).slice(-1000)}`;
    }
  }
  return missing() ? `the test guest is not in ${GUEST_DIR} after build_guest.sh` : '';
}

async function freePort() {
  return new Promise((res, rej) => {
    const s = createServer();
    s.on('error', rej);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => res(port));
    });
  });
}

// ---- the quickstart -----------------------------------------------------------------
let vault = null; // {proc, exited: Promise}

async function startQuickstart(dir, port) {
  const out = createWriteStream(join(ARTIFACTS, 'quickstart.log'));
  // OSR_WEB_TEST_DB: a postgresql:// catalog (tests/web/on_postgres.py); else SQLite.
  const db = process.env.OSR_WEB_TEST_DB ? ['--db', process.env.OSR_WEB_TEST_DB] : [];
  const proc = spawn(OSRD, ['quickstart', '--dir', join(dir, 'data'), '--vault-listen', `127.0.0.1:${port}`, '--web', WEB_DIST, ...db], {
    cwd: dir,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const exited = new Promise((res) => proc.on('exit', (code, signal) => res({ code, signal })));
  vault = { proc, exited, gone: false };
  exited.then(() => (vault.gone = true));
  let text = '';
  const ready = new Promise((res, rej) => {
    const timer = setTimeout(() => rej(new Fatal(`the quickstart did not say "osrd: ready" within ${kStartTimeoutMs / 1000} s:\n${text}`)), kStartTimeoutMs);
    const on = (d) => {
      text += d;
      out.write(d);
      if (text.includes('osrd: ready')) {
        clearTimeout(timer);
        res();
      }
    };
    proc.stdout.on('data', on);
    proc.stderr.on('data', on);
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      rej(new Fatal(`the quickstart exited (code ${code}, signal ${signal}) before it was ready:\n${text}`));
    });
  });
  await ready;
  return text;
}

async function stopQuickstart() {
  if (!vault || vault.gone) return;
  vault.proc.kill('SIGINT');
  const killed = await Promise.race([vault.exited.then(() => false), sleep(kStopGraceMs).then(() => true)]);
  if (killed && !vault.gone) {
    log('the quickstart did not stop within 10 s of SIGINT: SIGKILL');
    vault.proc.kill('SIGKILL');
    await Promise.race([vault.exited, sleep(5000)]);
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// The quickstart's first admin token (DIR/admin.token, 0600), for the CLI and direct calls.
let tokenFile = '';
const adminToken = () => readFileSync(tokenFile, 'utf8').trim();

async function osr(base, ...args) {
  const env = { ...process.env, OSR_TOKEN_FILE: tokenFile, OSR_CONFIG: tokenFile + '.cli.json' };
  delete env.OSR_TOKEN;
  const { stdout } = await execFileP(OSR, ['--vault', base, '--output', 'json', ...args], { timeout: 30_000, env });
  return stdout.trim() ? JSON.parse(stdout) : null;
}

async function qemuWrite(uri, pattern, offset) {
  await execFileP('qemu-io', ['-f', 'raw', '-c', `write -P ${pattern} ${offset} 1M`, uri], { timeout: 30_000 });
}

async function apiCall(base, method, path, body) {
  const res = await fetch(`${base}/api/v1${path}`, {
    method,
    body: body === undefined ? undefined : JSON.stringify(body),
    headers: {
      Authorization: `Bearer ${adminToken()}`,
      ...(body === undefined ? {} : { 'Content-Type': 'application/json' }),
    },
  });
  const data = await res.json();
  if (!res.ok) throw new Error(`${method} ${path}: HTTP ${res.status} ${JSON.stringify(data)}`);
  return data;
}

// ---- page helpers -------------------------------------------------------------------
async function waitUntil(fn, what, timeout = kStepTimeoutMs) {
  const end = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > end) throw new Fatal(`timed out after ${timeout / 1000} s waiting for ${what} (last: ${last instanceof Error ? last.message : JSON.stringify(last)})`);
    await sleep(200);
  }
}

async function shot(page, name, fullPage = false) {
  await page.screenshot({ path: join(ARTIFACTS, `${name}.png`), fullPage });
  log(`  screenshot ${name}.png`);
}

// The action buttons an ActionBar offers (data-action of each), inside `scope`.
async function actionsIn(scope) {
  const bar = scope.locator('[data-testid=actions]').first();
  await bar.waitFor({ state: 'attached', timeout: kStepTimeoutMs });
  return bar.locator('button[data-action]').evaluateAll((els) => els.map((e) => e.dataset.action).sort());
}

function sameSet(a, b) {
  return JSON.stringify([...a].sort()) === JSON.stringify([...b].sort());
}

async function goItem(page, base, name) {
  await page.goto(`${base}/#/items/${name}`);
  await page.locator(`[data-testid=item-page][data-name=${name}] .page-head`).waitFor({ timeout: kStepTimeoutMs });
}

const itemHead = (page) => page.locator('[data-testid=item-page] .page-head');

async function waitItemState(page, state, timeout = kJobTimeoutMs) {
  await waitUntil(
    async () => (await page.locator('[data-testid=item-page]').getAttribute('data-state')) === state,
    `the item page to show state ${state}`,
    timeout,
  );
  check((await itemHead(page).locator('[data-testid=state]').innerText()).includes(state), `the state badge says ${state}`);
}

// Waits for the newest tracked job of `type` (the panel of jobs started in this page) to
// end; checks its progress bar and its steps; returns the job card.
async function waitTrackedJob(page, type, timeout = kJobTimeoutMs) {
  const card = page.locator(`[data-testid=tracker] [data-testid=job][data-job-type=${type}]`).first();
  await card.waitFor({ timeout: kStepTimeoutMs });
  const id = await card.getAttribute('data-job-id');
  log(`  job ${id} (${type}) shown`);
  await waitUntil(
    async () => ['Succeeded', 'Failed'].includes(await card.getAttribute('data-job-state')),
    `job ${id} (${type}) to end`,
    timeout,
  );
  const state = await card.getAttribute('data-job-state');
  if (state === 'Failed') {
    const err = await card.locator('[data-testid=job-error]').innerText().catch(() => '(no error shown)');
    must(false, `job ${id} (${type}) succeeded — it failed: ${err}`);
  }
  check(state === 'Succeeded', `job ${id} (${type}) reached Succeeded`);
  check((await card.locator('[data-testid=job-state]').innerText()).includes('Succeeded'), `job ${id}'s badge says Succeeded`);
  check((await card.locator('[data-testid=progress]').getAttribute('aria-valuenow')) === '100', `job ${id}'s progress bar is at 100%`);
  const steps = await card.locator('[data-testid=steps] li').evaluateAll((els) =>
    els.map((e) => ({ state: e.dataset.state, name: e.querySelector('.step-name').textContent })),
  );
  check(steps.length > 0 && steps.every((s) => s.state === 'Succeeded'), `job ${id} shows its ${steps.length} steps, all Succeeded: ${steps.map((s) => s.name).join(' / ')}`);
  return card;
}

async function openDialog(page, buttonSelector, dialogTestid) {
  await page.locator(buttonSelector).first().click();
  const dlg = page.locator(`[data-testid=${dialogTestid}]`);
  await dlg.waitFor({ timeout: kStepTimeoutMs });
  return dlg;
}

async function confirmDialog(dlg) {
  const confirm = dlg.locator('[data-testid=confirm]');
  await waitUntil(async () => await confirm.isEnabled(), 'the confirm button to be enabled');
  await confirm.click();
  await dlg.waitFor({ state: 'detached', timeout: kStepTimeoutMs });
}

const kRpoText = /^\d+(\.\d+)? s\b/;

// What the test's process VM runs (/bin/sh -c at the site): its console says which disks
// it got, then counts, for 10 minutes at most.
const kVmCommand = 'echo "osr-web-vm up: disks $OSR_DISKS"; i=0; while [ $i -lt 600 ]; do i=$((i+1)); echo "osr-web-vm tick $i"; sleep 1; done';

// Checks that `locator`'s text matches every regex within a few seconds (dialogs load
// their data after they open); returns the text.
async function textMatches(locator, regexes, what, timeout = 5000) {
  let text = '';
  const ok = await waitUntil(async () => {
    text = await locator.innerText();
    return regexes.every((re) => re.test(text));
  }, what, timeout).then(() => true, () => false);
  const flat = text.trim().replace(/\s+/g, ' ');
  check(ok, `${what}: "${flat.length > 600 ? flat.slice(0, 300) + ' … ' + flat.slice(-300) : flat}"`);
  return text;
}

// The plan a dialog shows (its dry run), once loaded: {state: ok|refused, site, checks:
// [{name, result, message}], creates, uses, deletes}.
async function planIn(dlg) {
  const plan = dlg.locator('[data-testid=plan]');
  await waitUntil(async () => ['ok', 'refused'].includes(await plan.getAttribute('data-state')), 'the dialog to show its plan');
  const list = (testid) => plan.locator(`[data-testid=plan-${testid}-item]`).allInnerTexts();
  return {
    state: await plan.getAttribute('data-state'),
    head: await plan.locator('.plan-head').innerText(),
    checks: await plan.locator('[data-testid=plan-check]').evaluateAll((els) =>
      els.map((e) => ({ name: e.dataset.name, result: e.dataset.result, text: e.textContent })),
    ),
    creates: await list('creates'),
    uses: await list('uses'),
    deletes: await list('deletes'),
  };
}

// Checks that a dialog's plan passed at `site` with (at least) the checks `names`, all
// passed, and creates what each of `creates` matches (each marked new).
async function checkPlan(dlg, what, { site, names, creates = [], deletes = [] }) {
  const plan = await planIn(dlg);
  log(`  ${what} plan: ${plan.checks.map((c) => `${c.name}=${c.result}`).join(', ')}; creates: ${plan.creates.join(' | ')}; deletes: ${plan.deletes.join(' | ') || '-'}`);
  check(plan.state === 'ok' && new RegExp(`Checks at ${site}`).test(plan.head) && /all passed/.test(plan.head), `${what}: the plan's checks at ${site} all passed`);
  const shown = plan.checks.map((c) => c.name);
  check(names.every((n) => shown.includes(n)), `${what}: it lists the checks ${names.join(', ')} (shown: ${shown.join(', ')})`);
  check(plan.checks.every((c) => c.result === 'passed' && c.text.includes('passed')), `${what}: each check says passed, with its message`);
  for (const re of creates) {
    check(plan.creates.some((c) => re.test(c) && /^new\b/.test(c)), `${what}: it will create (marked new) ${re}`);
  }
  for (const re of deletes) check(plan.deletes.some((c) => re.test(c)), `${what}: it lists in deletes ${re}`);
  const confirm = dlg.locator('[data-testid=confirm]');
  check(await confirm.isEnabled(), `${what}: the confirm button is enabled`);
  return plan;
}

// The console panel's text (what the page keeps).
const consoleOf = (page) => page.locator('[data-testid=console-panel] [data-testid=console-text]');

// The numbered lines of the test VM's shell loop ("osr-web-vm tick N"): the last N.
function lastTick(text) {
  const all = [...text.matchAll(/osr-web-vm tick (\d+)/g)];
  return all.length ? Number(all[all.length - 1][1]) : 0;
}

// ---- the test -----------------------------------------------------------------------
async function run() {
  mkdirSync(ARTIFACTS, { recursive: true });
  const missing = preflight();
  if (missing.length) {
    for (const m of missing) log('FAIL:', m);
    failures += missing.length;
    return;
  }
  // playwright-core is a devDependency of web/ (npm ci --prefix web).
  let chromium;
  try {
    ({ chromium } = createRequire(join(REPO, 'web/package.json'))('playwright-core'));
  } catch (e) {
    failures++;
    log(`FAIL: playwright-core is not installed under web/ (run npm ci --prefix web): ${e.message}`);
    return;
  }

  const dir = mkdtempSync(join(tmpdir(), 'osr-web-test-'));
  const port = await freePort();
  const base = `http://127.0.0.1:${port}`;
  let browser = null;
  const pageErrors = [];
  try {
    log(`quickstart on ${base}, state in ${dir}`);
    const started = await startQuickstart(dir, port);
    tokenFile = join(dir, "data", "admin.token");
    if (process.env.OSR_WEB_TEST_DB) {
      check(/catalog in PostgreSQL server/.test(started), 'the vault keeps its catalog on PostgreSQL');
    }

    log('VM vm1 (a process VM) with the CLI, started, written with qemu-io');
    await osr(base, 'vm', 'create', 'vm1', '--site', 'primary', '--disk', 'os:64M', '--disk', 'data:16M', '--driver', 'process', '--command', kVmCommand);
    const vm = await osr(base, 'vm', 'start', 'vm1');
    check(vm.running === true && vm.driver === 'process', 'vm1 runs at primary (process driver)');
    const uri = vm.disks[0].uri;
    await qemuWrite(uri, '0x11', '0');

    browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: process.getuid && process.getuid() === 0 ? ['--no-sandbox', '--disable-dev-shm-usage'] : ['--disable-dev-shm-usage'],
      timeout: 30_000,
    });
    const page = await browser.newPage({ viewport: { width: 1366, height: 768 } });
    page.setDefaultTimeout(kStepTimeoutMs);
    page.on('pageerror', (e) => pageErrors.push(e.message));
    page.on('console', (m) => {
      if (m.type() === 'error' && !/Failed to load resource/.test(m.text())) pageErrors.push('console: ' + m.text());
    });

    // -- sign in ----------------------------------------------------------------------
    log('sign in through the login page');
    await page.goto(`${base}/#/vms`);
    const form = page.locator('[data-testid=login-form]');
    await form.waitFor();
    check((await page.locator('[data-testid=vm-row]').count()) === 0, 'nothing is shown before signing in');
    await shot(page, 'login');
    await page.fill('[data-testid=login-token]', 'osr_1_' + 'x'.repeat(43));
    await page.click('[data-testid=login-submit]');
    const loginError = await page.locator('[data-testid=login-error]').innerText();
    check(/unknown token/.test(loginError), `a wrong token is refused in words (${loginError})`);
    await page.fill('[data-testid=login-token]', adminToken());
    await page.click('[data-testid=login-submit]');
    await page.locator('[data-testid=whoami]').waitFor();
    const who = await page.locator('[data-testid=whoami]').innerText();
    check(/first-admin/.test(who) && /admin/.test(who), `the top bar says who is signed in (${who})`);
    await page.locator('[data-testid=leader]').waitFor();
    const leader = await page.locator('[data-testid=leader]').innerText();
    check(/leader: this vault/.test(leader), `the top bar says which vault leads (${leader})`);
    const cookies = await page.context().cookies();
    const sessionCookie = cookies.find((c) => c.name === 'osr_session');
    check(sessionCookie && sessionCookie.httpOnly && sessionCookie.sameSite === 'Strict', 'the session cookie is HttpOnly and SameSite=Strict');
    const noCsrf = await page.evaluate(async () => (await fetch('./api/v1/items/vm1/points', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: '{}' })).status);
    check(noCsrf === 403, `a call without the CSRF token is refused (HTTP ${noCsrf})`);

    // -- VMs page: protect ------------------------------------------------------------
    log('VMs page: protect vm1');
    const vmRow = page.locator('[data-testid=vm-row][data-name=vm1]');
    await vmRow.waitFor();
    check((await vmRow.getAttribute('data-state')) === 'Unprotected', 'vm1 is listed Unprotected');
    check((await vmRow.innerText()).includes('64.0 MiB'), 'its disk size is shown in human units');
    check((await vmRow.locator('button').count()) === 1 && (await vmRow.locator('[data-testid=action-protect]').count()) === 1, 'only Protect is offered to an unprotected VM');
    await shot(page, 'vms');

    log('the page of unprotected vm1: its console (the process VM\'s output at primary)');
    await vmRow.locator('[data-testid=vm-link]').click();
    await page.locator('[data-testid=item-page][data-name=vm1] [data-testid=console-panel]').waitFor();
    check(sameSet(await page.getByRole('tab').allInnerTexts(), ['VM']), 'the console panel offers the VM\'s console only (no drill)');
    await textMatches(consoleOf(page), [new RegExp(`osr-web-vm up: disks ${uri.replace(/[.?]/g, '\\$&')} `), /osr-web-vm tick \d+/], 'the console shows what vm1 printed at primary: its disks, then its lines', kStepTimeoutMs);
    check(/at primary/.test(await page.locator('[data-testid=console-status]').innerText()), 'the console says it is read at primary');
    const tick0 = lastTick(await consoleOf(page).innerText());
    await waitUntil(async () => lastTick(await consoleOf(page).innerText()) >= tick0 + 2, 'the console to follow (new lines)', 10_000);
    check(true, `the console follows: from line ${tick0} to ${lastTick(await consoleOf(page).innerText())}`);
    await page.click('[data-testid=nav-vms]');
    await vmRow.waitFor();

    const protect = await openDialog(page, '[data-testid=vm-row][data-name=vm1] [data-testid=action-protect]', 'protect-dialog');
    const target = await waitUntil(async () => await protect.locator('[data-testid=target]').inputValue(), 'the target sites to load').catch(() => '');
    check(target === 'recovery', `the target offered is the other site (${target})`);
    check((await protect.locator('[data-testid=policy]').inputValue()) === 'default', 'the default policy is chosen');
    await checkPlan(protect, 'protect', {
      site: 'recovery',
      names: ['site', 'names', 'space', 'commands'],
      creates: [/recovery store vm1/, /replication of vm1 from primary/],
    });
    const space = protect.locator('[data-testid=plan-check][data-name=space]');
    check(/has [\d.]+ \wiB free; this needs [\d.]+ \wiB now \([\d.]+ \w*B the disks hold \+ [\d.]+ \wiB journal headroom\), [\d.]+ \wiB at most/.test(await space.innerText()), `the space check says how much is free and needed, the disks' part and the journal's apart: "${(await space.innerText()).trim().replace(/\s+/g, ' ')}"`);
    check(/^free: \d+ bytes, needed now: \d+ bytes, at most: \d+ bytes$/.test(await space.locator('.check-message').getAttribute('title')), 'with the exact numbers in its title');
    check(/The 4 checks at recovery passed/.test(await protect.locator('[data-testid=plan-verdict-foot]').innerText()), 'beside the confirm button: the checks passed');
    await shot(page, 'dialog-protect-plan');
    await confirmDialog(protect);
    await waitTrackedJob(page, 'enable-protection');

    // -- items page -----------------------------------------------------------------
    log('Replicated items page');
    await page.click('[data-testid=nav-items]');
    const row = page.locator('[data-testid=item-row][data-name=vm1]');
    await waitUntil(async () => (await row.getAttribute('data-state')) === 'Protected', 'vm1 Protected in the items list');
    check(sameSet(await actionsIn(row), ['test-failover', 'failover', 'unprotect']), 'Protected offers Test failover, Failover, Unprotect and nothing else');
    check((await row.locator('[data-testid=direction]').innerText()).trim() === 'primary → recovery', 'direction primary → recovery');
    const health = await row.locator('[data-testid=health]').innerText();
    check(/Normal/.test(health) && (await row.locator('[data-testid=health] .badge.tone-ok').count()) === 1, `health is a green badge with words (${health.trim()})`);
    const rpoText = (await row.locator('[data-testid=rpo]').innerText()).trim();
    check(kRpoText.test(rpoText), `the RPO is shown as a number of seconds (${rpoText})`);
    check(/#\d+/.test(await row.locator('[data-testid=latest-point]').innerText()), 'the latest recovery point is shown');
    await shot(page, 'items');

    // -- points ------------------------------------------------------------------------
    log('more writes, so that points appear in the timeline');
    for (const [i, pattern] of ['0x22', '0x33', '0x44'].entries()) {
      await sleep(i === 0 ? 500 : 5600);
      await qemuWrite(uri, pattern, `${i + 1}M`);
    }
    await row.locator('[data-testid=item-link]').click();
    await page.locator('[data-testid=item-page][data-name=vm1]').waitFor();
    const markers = page.locator('[data-testid=points-panel] [data-testid=timeline] [data-testid=point]');
    await waitUntil(async () => (await markers.count()) >= 4, 'at least 4 points in the timeline', 30_000);
    check(true, `${await markers.count()} points in the timeline`);
    const types = await markers.evaluateAll((els) => els.map((e) => e.dataset.pointType));
    check(types.every((t) => t === 'crash' || t === 'app'), 'every marker is a crash or app point');
    const itemRpo = (await itemHead(page).locator('[data-testid=rpo]').innerText()).trim();
    check(kRpoText.test(itemRpo), `the item page shows the RPO as a number (${itemRpo})`);
    check((await page.locator('[data-testid=disks] [data-testid=disk-row]').count()) === 2, 'the item page lists both disks');
    check((await page.locator('[data-testid=disks]').innerText()).includes('nbd://'), 'with their NBD URIs');
    check((await page.locator('[data-testid=epoch]').innerText()).trim() === '1', 'epoch 1');
    check((await page.locator('[data-testid=running-site]').innerText()).startsWith('primary'), 'it runs at primary');
    await page.locator('[data-testid=rpo-chart] svg').waitFor();
    await waitUntil(async () => (await page.locator('[data-testid=rpo-line]').count()) === 1, 'the RPO chart to draw a line', 15_000);
    check(true, 'the RPO chart draws its line');
    await shot(page, 'item', true);

    // -- test failover and its cleanup -------------------------------------------------
    log('test failover (latest processed) from the item page, booting the drill VM');
    const tf = await openDialog(page, '[data-testid=item-page] .page-head [data-testid=action-test-failover]', 'test-failover-dialog');
    check(await tf.locator('[data-testid=choice-latest-processed]').isChecked(), 'test failover defaults to Latest processed');
    const boot = tf.getByRole('checkbox', { name: /Boot the VM in the drill network/ });
    check(await boot.isChecked(), 'the dialog boots the VM in the drill network by default');
    await textMatches(tf.locator('[data-testid=summary]'), [/open at recovery on point \d+/, /starts on them at recovery: its command runs on the site's host \(a process VM is not in a drill network and has no boot check\)/], 'its summary names the point it will use and says the (process) VM starts, not isolated');
    await checkPlan(tf, 'test failover', {
      site: 'recovery',
      names: ['site', 'space', 'commands'],
      creates: [/drill disks of vm1 at point \d+/, /drill VM vm1: its command, on the recovery site's host \(a process VM: not in a drill network, no boot check\)/],
    });
    await boot.uncheck();
    await textMatches(tf.locator('[data-testid=summary]'), [/No VM is started: the disks only/], 'unticked, the summary says only the disks open');
    const disksOnly = await planIn(tf);
    check(!disksOnly.creates.some((c) => /drill VM/.test(c)), `and the plan (asked again) creates no drill VM: ${disksOnly.creates.join(' | ')}`);
    await boot.check();
    await waitUntil(async () => (await planIn(tf)).creates.some((c) => /drill VM/.test(c)), 'the plan to create the drill VM again');
    await shot(page, 'dialog-test-failover-plan');
    await confirmDialog(tf);
    const tfJob = await waitTrackedJob(page, 'test-failover');
    await textMatches(tfJob, [/Drill VM\s+NotChecked/], 'the test-failover job shows the drill VM\'s result');
    await waitItemState(page, 'TestFailoverCompleted');
    check(sameSet(await actionsIn(itemHead(page)), ['cleanup', 'unprotect']), 'TestFailoverCompleted offers only Cleanup test failover and Unprotect');
    check(await page.locator('[data-testid=drill]').isVisible(), 'the drill and its disks are shown');
    // A process VM has no boot check: the drill says so (a QEMU VM's is below).
    const drillVm = page.locator('[data-testid=drill] [data-testid=drill-vm]');
    await waitUntil(async () => (await drillVm.getAttribute('data-health')) === 'NotChecked', 'the drill VM\'s result on the item page');
    await textMatches(drillVm, [/NotChecked/, /started; no boot check/], 'the item shows the drill VM\'s health and reason');
    const drillUri = await page.locator('[data-testid=drill] [data-testid=drill-disk]').first().innerText();
    const view = (/\/view\/([^/\s]+)\//.exec(drillUri) || [])[1];
    check(!!view, `the drill's disks are on view ${view} (${drillUri.trim()})`);

    log('the drill VM\'s console');
    const drillTab = page.getByRole('tab', { name: 'Drill VM', exact: true });
    await drillTab.click();
    check((await drillTab.getAttribute('aria-selected')) === 'true', 'the Drill VM tab is selected');
    await textMatches(consoleOf(page), [new RegExp(`osr-web-vm up: disks \\S*/view/${view}/os\\b`), /osr-web-vm tick \d+/], 'the drill console shows what the drill VM printed: the drill disks, then its lines', kStepTimeoutMs);
    check(/The drill VM of vm1 \(at recovery\)/.test(await page.locator('[data-testid=console-status]').innerText()), 'the console says it is the drill VM\'s, at recovery');
    check(!(await consoleOf(page).innerText()).includes(uri), 'the drill console is not the production VM\'s');
    const tick1 = lastTick(await consoleOf(page).innerText());
    await waitUntil(async () => lastTick(await consoleOf(page).innerText()) >= tick1 + 2, 'the drill console to follow', 10_000);
    check(true, `the drill console follows: from line ${tick1} to ${lastTick(await consoleOf(page).innerText())}`);
    await shot(page, 'item-drill', true);
    await page.getByRole('tab', { name: 'VM', exact: true }).click();
    await textMatches(consoleOf(page), [new RegExp(`osr-web-vm up: disks ${uri.replace(/[.?]/g, '\\$&')} `)], 'the VM tab shows the production VM\'s console again');
    await drillTab.click();

    log('cleanup, with notes');
    const cl = await openDialog(page, '[data-testid=item-page] .page-head [data-testid=action-cleanup]', 'cleanup-dialog');
    await textMatches(cl.locator('[data-testid=summary]'), [/drill disks of vm1 at recovery and every write made to them are deleted/], 'cleanup says the drill disks and their writes are deleted');
    await cl.locator('[data-testid=notes]').fill('drill ok: the disks held the writes');
    await confirmDialog(cl);
    const clJob = await waitTrackedJob(page, 'test-failover-cleanup');
    check((await clJob.innerText()).includes('drill ok: the disks held the writes'), 'the cleanup job shows the notes');
    await waitItemState(page, 'Protected');
    await waitUntil(async () => (await page.getByRole('tab').count()) === 1, 'the Drill VM tab to go with the drill');
    check((await page.locator('[data-testid=console-panel]').getAttribute('data-which')) === 'vm', 'the console panel is back on the VM');

    // -- a stale dialog: the vault's refusal is shown ---------------------------------
    log('a stale failover dialog: another operator starts a drill meanwhile');
    const stale = await openDialog(page, '[data-testid=item-page] .page-head [data-testid=action-failover]', 'failover-dialog');
    const behind = await apiCall(base, 'POST', '/items/vm1/test-failover', { point: 'latest-processed' });
    await waitUntil(async () => (await apiCall(base, 'GET', `/jobs/${behind.id}`)).state === 'Succeeded', 'the drill started behind the page');
    await stale.locator('[data-testid=confirm]').click();
    const refusal = stale.locator('[data-testid=dialog-error]');
    await refusal.waitFor();
    const refusalText = await refusal.innerText();
    check(/TestFailoverCompleted/.test(refusalText) && /failover needs Protected/.test(refusalText), `the vault's refusal is shown in words: "${refusalText.trim()}"`);
    check(/HTTP 400/.test(refusalText), 'with its status');
    await shot(page, 'dialog-refused');
    await stale.locator('[data-testid=cancel]').click();
    await waitItemState(page, 'TestFailoverCompleted');
    check(sameSet(await actionsIn(itemHead(page)), ['cleanup', 'unprotect']), 'the page caught up: only Cleanup and Unprotect are offered');
    const cl2 = await openDialog(page, '[data-testid=item-page] .page-head [data-testid=action-cleanup]', 'cleanup-dialog');
    await confirmDialog(cl2);
    await waitTrackedJob(page, 'test-failover-cleanup');
    await waitItemState(page, 'Protected');

    // -- failover to a custom point picked in the timeline ------------------------------
    log('failover to a custom point picked in the timeline');
    const ids = await markers.evaluateAll((els) => els.map((e) => Number(e.dataset.pointId)));
    const pick = ids[1]; // an older point, not the newest
    await page.locator(`[data-testid=points-panel] [data-testid=timeline] [data-testid=point][data-point-id="${pick}"]`).click();
    await page.locator(`[data-testid=selected-point][data-point-id="${pick}"]`).waitFor();
    check(true, `point ${pick} selected`);

    // A check that fails: the vault's real plan, with its names check failed in the browser.
    log('a failover whose plan has a failed check: refused before the click');
    await page.route(/\/api\/v1\/items\/vm1\/failover$/, async (route) => {
      const body = JSON.parse(route.request().postData() || '{}');
      if (!body.dry_run) return route.continue();
      const res = await route.fetch();
      const answer = await res.json();
      for (const c of answer.plan.checks) {
        if (c.name === 'names') Object.assign(c, { result: 'failed', message: 'site recovery already has VM disks named vm1' });
      }
      answer.plan.ok = false;
      await route.fulfill({ response: res, json: answer });
    });
    const bad = await openDialog(page, '[data-testid=selected-point] [data-testid=point-failover]', 'failover-dialog');
    const refused = await planIn(bad);
    check(refused.state === 'refused' && /refused/.test(refused.head), 'the plan says the failover is refused');
    const refusal0 = bad.getByRole('alert').filter({ hasText: 'Check “names”' });
    await textMatches(refusal0, [/Refused before anything is done/, /Check “names” failed at recovery: site recovery already has VM disks named vm1/, /nothing was changed/], 'the failed check is shown prominently, in an alert');
    check(await refusal0.isVisible() && (await bad.locator('footer').getByRole('alert').count()) === 1, 'beside the confirm button (in view whatever the dialog\'s length)');
    check((await bad.locator('[data-testid=plan-check][data-result=failed]').count()) === 1, 'and marked failed in the list of checks');
    check(await bad.locator('[data-testid=confirm]').isDisabled(), 'the confirm button is disabled while a check fails');
    await shot(page, 'dialog-failover-refused');
    await page.unroute(/\/api\/v1\/items\/vm1\/failover$/);
    await bad.getByRole('button', { name: 'Check again' }).click();
    await waitUntil(async () => (await bad.locator('[data-testid=plan]').getAttribute('data-state')) === 'ok', 'the plan asked again to pass');
    check(await bad.locator('[data-testid=confirm]').isEnabled(), 'asked again (the real answer), it passes and the confirm button is enabled');
    await bad.locator('[data-testid=cancel]').click();
    await bad.waitFor({ state: 'detached' });

    const fo = await openDialog(page, '[data-testid=selected-point] [data-testid=point-failover]', 'failover-dialog');
    check(await fo.locator('[data-testid=choice-custom]').isChecked(), 'the dialog opens on Custom');
    check((await fo.locator(`[data-testid=timeline] [data-testid=point][data-point-id="${pick}"]`).getAttribute('aria-pressed')) === 'true', 'with the picked point selected in its timeline');
    const shutdownLabel = await fo.locator('label', { has: page.locator('[data-testid=shutdown-source]') }).innerText();
    check(/Shut down the source VM before failover/.test(shutdownLabel) && /failover goes on/.test(shutdownLabel), 'the shutdown option says that failover goes on if the shutdown fails');
    await fo.locator('[data-testid=shutdown-source]').check();
    await textMatches(fo.locator('[data-testid=summary]'), [new RegExp(`at recovery on point ${pick} \\(`), /primary will be fenced \(epoch 2\)/, /shut down first/], 'the summary says what will happen, before the click');
    await fo.locator('[data-testid=planned]').check();
    check(await fo.locator('[data-testid=choice-custom]').isDisabled(), 'planned failover disables the point choice');
    await textMatches(fo.locator('[data-testid=summary]'), [/last write of primary/], 'and the summary says it fails over to the last write');
    await fo.locator('[data-testid=planned]').uncheck();
    check(await fo.locator('[data-testid=choice-custom]').isEnabled(), 'unticking it gives the point choice back');
    await waitUntil(async () => (await planIn(fo)).creates.some((c) => new RegExp(`over point ${pick} `).test(c)), `the plan to be the one of point ${pick}`);
    await checkPlan(fo, 'failover', {
      site: 'recovery',
      names: ['site', 'names', 'space', 'commands'],
      creates: [new RegExp(`disks of vm1 at recovery over point ${pick} `), /VM vm1 running at recovery/],
      deletes: [/the VM at primary is shut down/],
    });
    await shot(page, 'dialog');
    await confirmDialog(fo);
    await waitTrackedJob(page, 'failover');
    await waitItemState(page, 'FailedOver');
    check(sameSet(await actionsIn(itemHead(page)), ['change-point', 'commit']), 'FailedOver offers only Change recovery point and Commit');
    check((await page.locator('[data-testid=failover-point]').innerText()).includes(`point ${pick} `), `the failover record shows point ${pick}`);
    await waitUntil(async () => (await page.locator('[data-testid=running-site]').innerText()).startsWith('recovery'), 'the item to run at recovery');
    check(true, 'it runs at recovery now');
    check((await page.locator('[data-testid=epoch]').innerText()).trim() === '2', 'at epoch 2');
    check(/not replicating/.test(await itemHead(page).locator('[data-testid=rpo]').innerText()), 'no RPO while nothing replicates');

    // -- change the recovery point -------------------------------------------------------
    log('change the recovery point to the newest one');
    const newest = ids[ids.length - 1];
    await page.locator(`[data-testid=points-panel] [data-testid=timeline] [data-testid=point][data-point-id="${newest}"]`).click();
    const cp = await openDialog(page, '[data-testid=selected-point] [data-testid=point-change]', 'change-point-dialog');
    await textMatches(cp.locator('[data-testid=summary]'), [/every write made to its disks since the failover is discarded/, new RegExp(`reopen on point ${newest} `)], 'change point confirms that writes since failover are discarded');
    await confirmDialog(cp);
    await waitTrackedJob(page, 'change-point');
    await waitUntil(async () => (await page.locator('[data-testid=failover-point]').innerText()).includes(`point ${newest} `), `the failover record to show point ${newest}`);
    check(true, `the item is on point ${newest}`);

    // -- commit ---------------------------------------------------------------------------
    log('commit');
    const cm = await openDialog(page, '[data-testid=item-page] .page-head [data-testid=action-commit]', 'commit-dialog');
    await textMatches(cm.locator('[data-testid=summary]'), [/all \d+ recovery points and the recovery store at recovery are deleted/, /not reversible/], 'commit says the points are deleted and it is not reversible');
    await confirmDialog(cm);
    await waitTrackedJob(page, 'commit');
    await waitItemState(page, 'FailoverCommitted');
    check(sameSet(await actionsIn(itemHead(page)), ['reprotect', 'unprotect']), 'FailoverCommitted offers only Reprotect and Unprotect');
    await waitUntil(async () => (await markers.count()) === 0, 'the timeline to be empty after commit');
    check(true, 'no recovery points are left');

    // -- reprotect --------------------------------------------------------------------------
    log('reprotect');
    const rp = await openDialog(page, '[data-testid=item-page] .page-head [data-testid=action-reprotect]', 'reprotect-dialog');
    await textMatches(rp.locator('[data-testid=summary]'), [/Replication reverses: from recovery to primary/, /Only the differences are shipped/], 'reprotect says replication reverses from recovery to primary, shipping only the differences');
    await checkPlan(rp, 'reprotect', {
      site: 'primary',
      names: ['site', 'names', 'space', 'commands'],
      creates: [/replication of vm1 from recovery to primary/, /recovery store/],
    });
    await shot(page, 'dialog-reprotect-plan');
    await confirmDialog(rp);
    const rpJob = await waitTrackedJob(page, 'reprotect');
    check(/Reprotect mode/.test(await rpJob.innerText()), 'the reprotect job shows its mode');
    await waitItemState(page, 'Protected');
    check((await itemHead(page).locator('[data-testid=direction]').innerText()).trim() === 'recovery → primary', 'protected in the other direction: recovery → primary');
    check(sameSet(await actionsIn(itemHead(page)), ['test-failover', 'failover', 'unprotect']), 'Protected (reversed) offers Test failover, Failover, Unprotect');
    await waitUntil(async () => kRpoText.test((await itemHead(page).locator('[data-testid=rpo]').innerText()).trim()), 'a numeric RPO again');
    check(true, 'the RPO is a number again');

    // -- a reader: the console is refused, in words ----------------------------------------
    log('a reader opens the item: the console says the role cannot read it');
    const reader = await apiCall(base, 'POST', '/tokens', { name: 'web-reader', role: 'reader' });
    const readerCtx = await browser.newContext({ viewport: { width: 1366, height: 768 } });
    try {
      const rpage = await readerCtx.newPage();
      rpage.setDefaultTimeout(kStepTimeoutMs);
      let consoleCalls = 0;
      rpage.on('request', (r) => {
        if (/\/console\?/.test(r.url())) consoleCalls++;
      });
      await rpage.goto(`${base}/#/items/vm1`);
      await rpage.fill('[data-testid=login-token]', reader.token);
      await rpage.click('[data-testid=login-submit]');
      const cerr = rpage.locator('[data-testid=console-panel] [data-testid=console-error]');
      await cerr.waitFor();
      await textMatches(cerr, [/HTTP 403/, /needs the operator role/], 'the reader\'s console panel shows the refusal (403) and why');
      check((await cerr.getAttribute('role')) === 'alert', 'as an alert');
      const calls = consoleCalls;
      await sleep(4500);
      check(consoleCalls === calls, `and stops asking (${consoleCalls - calls} more calls in 4.5 s)`);
      await shot(rpage, 'console-reader');
    } finally {
      await readerCtx.close();
    }

    // -- a QEMU VM's drill: the guest boots, its boot check passes ----------------------------
    const noQemu = await prepareGuest();
    if (noQemu) {
      check(false, `the QEMU drill can run: ${noQemu}`);
    } else {
      log('a QEMU VM (the test guest) protected; its drill boots by clicking');
      const append = 'console=ttyS0 panic=-1 osr.mode=serve';
      await apiCall(base, 'POST', '/vms', {
        name: 'guest',
        site: 'primary',
        disks: [{ name: 'os', size_bytes: 16 * 1024 * 1024 }],
        spec: {
          driver: 'qemu',
          memory_bytes: 256 * 1024 * 1024,
          accel: 'tcg',
          guest_agent: false,
          qemu_args: `-kernel ${join(GUEST_DIR, 'vmlinuz')} -initrd ${join(GUEST_DIR, 'initramfs.cpio.gz')} -append '${append}' -no-reboot`,
          boot_check: { console_line: 'OSR-BOOTED', timeout_ms: 90_000 },
          shutdown_timeout_ms: 5000,
        },
      });
      const pj = await apiCall(base, 'POST', '/vms/guest/protect', { target: 'recovery' });
      await waitUntil(async () => (await apiCall(base, 'GET', `/jobs/${pj.id}`)).state === 'Succeeded', 'guest to be protected', kJobTimeoutMs);
      await goItem(page, base, 'guest');
      await waitItemState(page, 'Protected');
      await page.locator('[data-testid=console-panel] [data-testid=console-empty]').waitFor();
      check(/nothing on the console yet/i.test(await page.locator('[data-testid=console-empty]').innerText()), 'the guest does not run at primary: its console is empty, and says so');
      const gtf = await openDialog(page, '[data-testid=item-page] .page-head [data-testid=action-test-failover]', 'test-failover-dialog');
      check(await gtf.getByRole('checkbox', { name: /Boot the VM in the drill network/ }).isChecked(), 'the guest\'s drill boots it by default');
      await checkPlan(gtf, 'QEMU test failover', {
        site: 'recovery',
        names: ['site', 'space', 'hypervisor', 'commands'],
        creates: [/drill disks of guest/, /drill VM guest on the drill networks, with a boot check/],
      });
      await confirmDialog(gtf);
      const gVm = page.locator('[data-testid=drill] [data-testid=drill-vm]');
      await waitUntil(async () => ['booting', 'Healthy'].includes(await gVm.getAttribute('data-health')), 'the drill to show on the item page', kStepTimeoutMs);
      const seen = await gVm.getAttribute('data-health');
      check(seen === 'booting' && /starting; job \d+ waits for its boot check/.test(await gVm.innerText()), `while the guest boots (TCG: seconds), the item says the drill VM is starting and the job waits for its boot check (${seen})`);
      const gJob = await waitTrackedJob(page, 'test-failover', kBootJobTimeoutMs);
      check(/Boot check: 'OSR-BOOTED' on the console/.test(await gJob.innerText()), 'the job shows its boot check step');
      await waitUntil(async () => (await gVm.getAttribute('data-health')) === 'Healthy', 'the guest drill VM to show Healthy');
      await textMatches(gVm, [/Healthy/, /OSR-BOOTED/, /up after \d+\.\d s/], 'the item shows the drill VM Healthy: the reason and the boot time');
      check((await gVm.locator('.badge.tone-ok').count()) === 1, 'in a green badge');
      await page.getByRole('tab', { name: 'VM', exact: true }).focus();
      await page.keyboard.press('ArrowRight');
      check((await page.getByRole('tab', { name: 'Drill VM', exact: true }).getAttribute('aria-selected')) === 'true', 'the arrow key moves to the Drill VM tab');
      await textMatches(consoleOf(page), [/Linux version/, /OSR-BOOTED/, /OSR-(EMPTY|READ|NODATA)/], 'the drill console shows the guest\'s boot: the kernel\'s lines, then its init\'s', kStepTimeoutMs);
      await textMatches(consoleOf(page), [/OSR-ALIVE:\d+/], 'and then what it prints while it runs', kStepTimeoutMs);
      await shot(page, 'item-qemu-drill', true);
      const gcl = await openDialog(page, '[data-testid=item-page] .page-head [data-testid=action-cleanup]', 'cleanup-dialog');
      await confirmDialog(gcl);
      const gclJob = await waitTrackedJob(page, 'test-failover-cleanup');
      check(/Stop the drill VM/.test(await gclJob.innerText()), 'the cleanup stops the drill VM first');
      await waitItemState(page, 'Protected');
      check((await page.getByRole('tab').count()) === 1, 'the Drill VM tab went with the drill');
    }

    // -- jobs page ----------------------------------------------------------------------------
    log('Jobs page');
    await page.click('[data-testid=nav-jobs]');
    const jobsList = page.locator('[data-testid=jobs-page] [data-testid=job]');
    await waitUntil(async () => (await jobsList.count()) >= 9, 'the jobs list');
    const jobs = await jobsList.evaluateAll((els) => els.map((e) => ({ type: e.dataset.jobType, state: e.dataset.jobState })));
    for (const type of ['enable-protection', 'test-failover', 'test-failover-cleanup', 'failover', 'change-point', 'commit', 'reprotect']) {
      check(jobs.some((j) => j.type === type && j.state === 'Succeeded'), `the jobs page lists a Succeeded ${type} job`);
    }
    check((await page.locator('[data-testid=jobs-page] [data-testid=job] [data-testid=steps]').count()) >= 3, 'the newest jobs show their steps');
    await shot(page, 'jobs', true);
    await page.selectOption('[data-testid=filter-state]', 'Failed');
    await page.locator('[data-testid=no-jobs]').waitFor();
    check(page.url().includes('state=Failed'), 'the state filter shows no failed jobs and is kept in the address');
    await page.selectOption('[data-testid=filter-state]', 'Succeeded');
    await page.selectOption('[data-testid=filter-vm]', 'vm1');
    await waitUntil(async () => (await jobsList.count()) >= 9, 'jobs of vm1 that succeeded');
    check((await jobsList.evaluateAll((els) => els.every((e) => e.dataset.jobState === 'Succeeded'))), 'the filter by item and state shows only those');

    // -- sites page ---------------------------------------------------------------------------
    log('Sites page');
    await page.click('[data-testid=nav-sites]');
    const sites = page.locator('[data-testid=site]');
    await waitUntil(async () => (await sites.count()) === 2, 'two sites');
    for (const name of ['primary', 'recovery']) {
      const s = page.locator(`[data-testid=site][data-name=${name}]`);
      check((await s.getAttribute('data-reachable')) === 'true' && /Reachable/.test(await s.locator('[data-testid=reachable]').innerText()), `${name} is shown reachable`);
      check(/^\d+$/.test((await s.locator('[data-testid=disks-served]').innerText()).trim()), `${name} shows the disks it serves`);
      check(/free of .*(GiB|TiB|MiB)/.test(await s.locator('[data-testid=capacity]').innerText()), `${name} shows its file system in human units`);
    }
    check(/(KiB|MiB|GiB|B)$/.test((await page.locator('[data-testid=site][data-name=primary] [data-testid=store-bytes]').innerText()).trim()), 'the recovery store bytes are shown (primary holds vm1\'s store now)');
    await shot(page, 'sites');

    // -- states too short-lived to catch here: the vault's own answers, state replaced --------
    log('busy states and FailoverFailed (the real answers with the state replaced in the browser)');
    let fakeState = null;
    const fakeJob = { id: 999, type: 'failover', vm: 'vm1', state: 'Running', progress: 40, steps: [{ name: 'Fence primary', state: 'Running', message: '' }], error: null, created: new Date().toISOString(), updated: new Date().toISOString() };
    await page.route(/\/api\/v1\/items$/, async (route) => {
      const res = await route.fetch();
      const items = await res.json();
      for (const it of items) if (it.name === 'vm1' && fakeState) it.state = fakeState;
      await route.fulfill({ response: res, json: items });
    });
    await page.route(/\/api\/v1\/jobs\?state=Running$/, (route) => route.fulfill({ json: [fakeJob] }));
    await page.click('[data-testid=nav-items]');
    for (const [state, allowed] of [['EnablingProtection', []], ['FailingOver', []], ['Committing', []], ['Reprotecting', []], ['FailoverFailed', ['failover-retry']]]) {
      fakeState = state;
      await waitUntil(async () => (await row.getAttribute('data-state')) === state, `the row to show ${state}`);
      check(sameSet(await actionsIn(row), allowed), `${state} offers ${allowed.length ? allowed.join(', ') + ' only' : 'no action'}`);
      if (!allowed.length) {
        check((await row.locator('[data-testid=actions] .spinner').count()) === 1, `${state} shows a spinner`);
        check((await row.locator('[data-testid=job-link]').innerText()).includes('job 999 (40%)'), `${state} links to the running job`);
      }
    }
    await page.unroute(/\/api\/v1\/items$/);
    await page.unroute(/\/api\/v1\/jobs\?state=Running$/);
    log('a 500 from the vault is shown in words');
    await page.route(/\/api\/v1\/sites$/, (route) => route.fulfill({ status: 500, json: { error: { code: 'internal', message: 'catalog: database is locked' } } }));
    await page.click('[data-testid=nav-sites]');
    const siteErr = page.locator('[data-testid=sites-page] [data-testid=error]');
    await siteErr.waitFor();
    await textMatches(siteErr, [/database is locked/, /HTTP 500/], 'the sites page shows the vault\'s error');
    await page.unroute(/\/api\/v1\/sites$/);
    await page.locator('[data-testid=sites-page] [data-testid=error]').waitFor({ state: 'detached' });
    check(true, 'and drops it at the next good answer');

    // -- the vault stops: the page says so, and keeps what it knew --------------------------
    log('the vault stops');
    await page.click('[data-testid=nav-items]');
    await row.waitFor();
    await stopQuickstart();
    const banner = page.locator('[data-testid=banner]');
    await banner.waitFor({ timeout: 10_000 });
    check(/The vault does not answer/.test(await banner.innerText()), `a banner says the vault does not answer: "${(await banner.innerText()).trim()}"`);
    check(await row.isVisible(), 'the items list is still shown (not a blank page)');
    await shot(page, 'vault-down');
    check(pageErrors.length === 0, `no script errors in the page${pageErrors.length ? ': ' + pageErrors.join(' | ') : ''}`);
  } catch (e) {
    failures++;
    log('FAIL:', e instanceof Fatal ? e.message : e.stack || e);
    if (browser) {
      const pages = browser.contexts().flatMap((c) => c.pages());
      if (pages[0]) await pages[0].screenshot({ path: join(ARTIFACTS, 'failure.png') }).catch(() => {});
    }
  } finally {
    if (browser) await browser.close().catch(() => {});
    await stopQuickstart();
    rmSync(dir, { recursive: true, force: true });
  }
}

// The quickstart must not outlive the test: not when the test is interrupted (Ctrl-C, a
// CTest timeout's SIGTERM), nor when its output pipe closes.
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.on(sig, async () => {
    log(`FAIL: interrupted by ${sig}`);
    await stopQuickstart();
    process.exit(1);
  });
}
process.stdout.on('error', () => {});
process.on('exit', () => {
  if (vault && !vault.gone) vault.proc.kill('SIGKILL');
});

const watchdog = setTimeout(async () => {
  log(`FAIL: the test did not finish within ${kTestTimeoutMs / 1000} s`);
  if (vault && !vault.gone) {
    vault.proc.kill('SIGINT');
    await sleep(kStopGraceMs);
    if (!vault.gone) vault.proc.kill('SIGKILL');
  }
  process.exit(1);
}, kTestTimeoutMs);

await run();
clearTimeout(watchdog);
log(failures ? `${failures} check(s) FAILED; artifacts in ${ARTIFACTS}` : `all checks passed; screenshots in ${ARTIFACTS}`);
process.exit(failures ? 1 : 0);
