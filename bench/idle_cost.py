#!/usr/bin/python3
"""What idle protected VMs cost: CPU, threads, descriptors and memory of one `osrd
quickstart` (a vault and two sites in one process) with 0, 10, 50, 100 (and 500) VMs
that are protected and write nothing (issue 12: "cost that follows work, not the number
of VMs"; goal: 500 idle VMs below 10% of one core).

For each count N (VMs are added, never removed, so the counts build on each other):
VMs with one small disk (--disk, default 1 MiB) are created at `primary` and protected to
`recovery` (enable-protection jobs, all submitted, then waited for until every item is
Protected), the process settles for --settle seconds, then over --window seconds we read
from /proc (no perf): the CPU the process used (utime + stime of /proc/PID/stat, as % of
one core), its threads (/proc/PID/status Threads), descriptors (/proc/PID/fd) and RSS;
and the CPU of each thread, summed by thread name (/proc/PID/task/*/stat: osrd names its
site threads osr-send, osr-send-acks, osr-capture, osr-recv, osr-nbd-*, ...; threads it
does not name, the vault's among them, show as "osrd"), to see who spins.

Nothing polls the vault during a window (GET /items costs the vault site calls).

--mode sites: the site side alone, without a vault: two `osrd site` daemons (primary,
recovery; plain HTTP and replication on loopback, `api_insecure`), each VM a group at the
primary, a store at the recovery site and replication between them, made through the site
API as the vault would; each daemon measured on its own (rows "primary", "recovery").

Printed: one row per N, and per VM beyond N = 0 (the figure minus the one at 0, divided
by N). --json FILE writes every figure.

Run: /usr/bin/python3 bench/idle_cost.py --osrd build/osrd [--mode quickstart|sites]
     [--counts 0,10,50,100,500] [--window 20] [--settle 10] [--disk 1M] [--dir /var/tmp]
     [--json FILE] [--keep]
Exit status 0 when every count was measured, 1 when one failed (what ran is printed).
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from benchlib import free_port, parse_size  # noqa: E402

KIB, MIB = 1024, 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
HTTP_TIMEOUT_S = 60
START_TIMEOUT_S = 30
PROTECT_TIMEOUT_BASE_S = 120  # plus PROTECT_TIMEOUT_PER_VM_S for each VM being protected
PROTECT_TIMEOUT_PER_VM_S = 3
SUBMIT_RETRIES_MAX = 20  # a 503 (jobs paused, the sites not yet registered) is tried again


def log(msg):
    print(f"[idle_cost] {msg}", file=sys.stderr, flush=True)




class Vault:
    def __init__(self, url, token):
        self.url, self.token = url, token

    def call(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + "/api/v1" + path, data=data, method=method)
        req.add_header("Authorization", "Bearer " + self.token)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
                text = resp.read()
                return resp.status, json.loads(text) if text else None
        except urllib.error.HTTPError as e:
            text = e.read()
            try:
                return e.code, json.loads(text)
            except json.JSONDecodeError:
                return e.code, text.decode(errors="replace")


# -- /proc ------------------------------------------------------------------------------


def read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def stat_ticks(path):
    """(name, utime + stime in ticks) of a /proc .../stat file, or None when it is gone."""
    text = read_text(path)
    if not text:
        return None
    # comm is in parentheses and may hold spaces or parentheses: split at the last ')'.
    lp, rp = text.index("("), text.rindex(")")
    name = text[lp + 1:rp]
    rest = text[rp + 2:].split()
    # Fields after comm start at field 3 (state); utime is field 14, stime field 15.
    return name, int(rest[11]) + int(rest[12])


def status_field(pid, key):
    for line in read_text(f"/proc/{pid}/status").splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def snapshot(pid):
    """Process ticks, per-thread {tid: (name, ticks)}, threads, fds, rss KiB."""
    proc = stat_ticks(f"/proc/{pid}/stat")
    if proc is None:
        raise RuntimeError(f"process {pid} is gone")
    tasks = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        t = stat_ticks(f"/proc/{pid}/task/{tid}/stat")
        if t is not None:
            tasks[tid] = t
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = 0
    return {"ticks": proc[1], "tasks": tasks, "threads": status_field(pid, "Threads"),
            "fds": fds, "rss_kib": status_field(pid, "VmRSS")}


def measure(pid, window_s):
    a = snapshot(pid)
    t0 = time.monotonic()
    time.sleep(window_s)
    return measure_between(a, snapshot(pid), time.monotonic() - t0)


def measure_between(a, b, elapsed):
    cpu_pct = (b["ticks"] - a["ticks"]) / CLK_TCK / elapsed * 100
    by_name, count_by_name = {}, {}
    for tid, (name, ticks) in b["tasks"].items():
        before = a["tasks"].get(tid, (name, 0))[1]
        by_name[name] = by_name.get(name, 0) + (ticks - before)
        count_by_name[name] = count_by_name.get(name, 0) + 1
    threads_cpu = {n: round(t / CLK_TCK / elapsed * 100, 2) for n, t in by_name.items()}
    return {"cpu_pct": round(cpu_pct, 2), "threads": b["threads"], "fds": b["fds"],
            "rss_mib": round(b["rss_kib"] / 1024, 1), "window_s": round(elapsed, 1),
            "cpu_pct_by_thread_name": dict(sorted(threads_cpu.items(), key=lambda kv: -kv[1])),
            "threads_by_name": dict(sorted(count_by_name.items(), key=lambda kv: -kv[1]))}


# -- VMs --------------------------------------------------------------------------------


def submit(vault, method, path, body, ok_statuses):
    for _ in range(SUBMIT_RETRIES_MAX):
        status, doc = vault.call(method, path, body)
        if status in ok_statuses:
            return doc
        if status != 503:
            raise RuntimeError(f"{method} {path}: {status} {doc}")
        time.sleep(0.5)
    raise RuntimeError(f"{method} {path}: still 503 after {SUBMIT_RETRIES_MAX} tries")


def add_protected_vms(vault, first, last, disk_bytes):
    """Creates and protects VMs idle-FIRST .. idle-(LAST-1); returns once all are Protected."""
    names = [f"idle-{i:04d}" for i in range(first, last)]
    for n in names:
        submit(vault, "POST", "/vms", {"name": n, "site": "primary",
                                       "disks": [{"name": "d0", "size_bytes": disk_bytes}]},
               (201,))
    for n in names:
        submit(vault, "POST", f"/vms/{n}/protect", {"target": "recovery"}, (202,))
    deadline = time.monotonic() + PROTECT_TIMEOUT_BASE_S + PROTECT_TIMEOUT_PER_VM_S * len(names)
    want = set(names)
    while True:
        status, items = vault.call("GET", "/items")
        if status != 200:
            raise RuntimeError(f"GET /items: {status} {items}")
        states = {i["name"]: i["state"] for i in items if i["name"] in want}
        done = sum(1 for s in states.values() if s == "Protected")
        if done == len(names):
            return
        failed = [n for n, s in states.items() if s not in ("Protected", "EnablingProtection")]
        if failed:
            raise RuntimeError(f"items not protected: {[(n, states[n]) for n in failed[:5]]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {done} of {len(names)} items Protected in time")
        time.sleep(2)


# -- the site side alone -------------------------------------------------------------------


class SiteDaemon:
    """One `osrd site` (plain HTTP API and replication on loopback: a lab)."""

    def __init__(self, osrd, work, name):
        self.name = name
        data = work / f"{name}-data"
        config = work / f"{name}.toml"
        config.write_text(f'name = "{name}"\ndata_dir = "{data}"\n'
                          'nbd_listen = "127.0.0.1:0"\nreplication_listen = "127.0.0.1:0"\n'
                          'api_listen = "127.0.0.1:0"\napi_insecure = true\n')
        self.log = open(work / f"{name}.log", "w")
        self.proc = subprocess.Popen([osrd, "site", "--config", str(config)],
                                     stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.api = self.replication = None
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.api is None or self.replication is None:
            line = self.proc.stdout.readline()  # the daemon prints its addresses at start
            if not line or time.monotonic() > deadline:
                raise RuntimeError(f"site {name} did not start: "
                                   + (work / f"{name}.log").read_text()[-2000:])
            if m := re.match(r"^osrd: api on (http://127\.0\.0\.1:\d+/api/v1)$", line.strip()):
                self.api = m.group(1)
            if m := re.match(r"^osrd: replication on (127\.0\.0\.1:\d+)$", line.strip()):
                self.replication = m.group(1)
        # The rest of its stdout is read and dropped, so that it never blocks on a full pipe.
        threading.Thread(target=lambda: self.proc.stdout.read(), daemon=True).start()

    def call(self, method, path, body=None, ok=(200, 201, 204)):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.api + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
                status, text = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read()
        if status not in ok:
            raise RuntimeError(f"site {self.name}: {method} {path}: {status} {text[:300]!r}")
        return json.loads(text) if text else None

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


def add_replicated_groups(primary, recovery, first, last, disk_bytes):
    """Groups idle-FIRST .. at the primary, stores at the recovery site, replication on;
    returns once every sender is connected."""
    names = [f"idle-{i:04d}" for i in range(first, last)]
    disks = {"disks": [{"name": "d0", "size_bytes": disk_bytes}]}
    for n in names:
        recovery.call("PUT", f"/stores/{n}", disks)
        primary.call("PUT", f"/groups/{n}", disks)
        primary.call("PUT", f"/groups/{n}/replication", {"target": recovery.replication})
    deadline = time.monotonic() + PROTECT_TIMEOUT_BASE_S + PROTECT_TIMEOUT_PER_VM_S * len(names)
    for n in names:
        while not (primary.call("GET", f"/groups/{n}").get("replication") or {}).get("connected"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n}: replication did not connect in time")
            time.sleep(0.1)


def run_sites(osrd, work, counts, disk_bytes, settle_s, window_s):
    rows = {"primary": [], "recovery": []}
    primary = recovery = None
    try:
        primary = SiteDaemon(osrd, work, "primary")
        recovery = SiteDaemon(osrd, work, "recovery")
        have = 0
        for n in counts:
            if n > have:
                t0 = time.monotonic()
                add_replicated_groups(primary, recovery, have, n, disk_bytes)
                log(f"{n} VMs replicating ({n - have} new in {time.monotonic() - t0:.0f} s)")
                have = n
            time.sleep(settle_s)
            # Both at once, over the same window.
            a = {d.name: snapshot(d.proc.pid) for d in (primary, recovery)}
            t0 = time.monotonic()
            time.sleep(window_s)
            for d in (primary, recovery):
                r = measure_between(a[d.name], snapshot(d.proc.pid), time.monotonic() - t0)
                r["vms"] = n
                rows[d.name].append(r)
                log(f"{n} VMs, site {d.name}: {r['cpu_pct']:.2f}% of a core, {r['threads']} "
                    f"threads, {r['fds']} fds, {r['rss_mib']} MiB")
    finally:
        for d in (primary, recovery):
            if d is not None:
                d.stop()
    return rows


# -- main -------------------------------------------------------------------------------


def start_quickstart(osrd, work):
    port = free_port()
    qs_log = open(work / "quickstart.log", "w")
    qs = subprocess.Popen([osrd, "quickstart", "--dir", str(work / "data"), "--vault-listen",
                           f"127.0.0.1:{port}"], stdout=qs_log, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, start_new_session=True)
    token_path = work / "data" / "admin.token"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if qs.poll() is not None:
            raise RuntimeError("the quickstart exited: " +
                               (work / "quickstart.log").read_text()[-2000:])
        if token_path.exists() and token_path.read_text().strip():
            vault = Vault(f"http://127.0.0.1:{port}", token_path.read_text().split()[0])
            try:
                status, sites = vault.call("GET", "/sites")
                if status == 200 and len(sites) == 2:
                    return qs, qs_log, vault
            except (urllib.error.URLError, OSError):
                pass
        if time.monotonic() > deadline:
            raise RuntimeError("the quickstart did not start: " +
                               (work / "quickstart.log").read_text()[-2000:])
        time.sleep(0.2)


def stop_quickstart(qs, qs_log):
    qs.send_signal(signal.SIGINT)
    try:
        qs.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(qs.pid, signal.SIGKILL)
        qs.wait()
    qs_log.close()


def print_table(rows, title):
    print(f"\n== idle protected VMs: {title} ==")
    print(f"{'VMs':>5} {'CPU % core':>10} {'threads':>8} {'fds':>6} {'RSS MiB':>8}   "
          f"{'per VM: CPU %':>13} {'threads':>8} {'fds':>6} {'RSS KiB':>8}")
    base = rows[0] if rows and rows[0]["vms"] == 0 else None
    for r in rows:
        line = (f"{r['vms']:>5} {r['cpu_pct']:>10.2f} {r['threads']:>8} {r['fds']:>6} "
                f"{r['rss_mib']:>8.1f}")
        if base is not None and r["vms"] > 0:
            n = r["vms"]
            line += (f"   {(r['cpu_pct'] - base['cpu_pct']) / n:>13.3f} "
                     f"{(r['threads'] - base['threads']) / n:>8.2f} "
                     f"{(r['fds'] - base['fds']) / n:>6.2f} "
                     f"{(r['rss_mib'] - base['rss_mib']) * 1024 / n:>8.0f}")
        print(line)
    print("\nCPU % of one core by thread name (top 8), and threads by name:")
    for r in rows:
        top = list(r["cpu_pct_by_thread_name"].items())[:8]
        print(f"{r['vms']:>5}: " + ", ".join(f"{n} {c:.2f}" for n, c in top))
        print("       threads: " + ", ".join(f"{n} {c}" for n, c in r["threads_by_name"].items()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--osrd", default="build/osrd")
    ap.add_argument("--mode", choices=("quickstart", "sites"), default="quickstart")
    ap.add_argument("--counts", default="0,10,50,100")
    ap.add_argument("--window", type=float, default=20)
    ap.add_argument("--settle", type=float, default=10)
    ap.add_argument("--disk", default="1M")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    osrd = str(Path(args.osrd).resolve())
    if not os.access(osrd, os.X_OK):
        print(f"idle_cost: {osrd} is missing: make build", file=sys.stderr)
        return 2
    counts = sorted({int(c) for c in args.counts.split(",")})
    disk_bytes = parse_size(args.disk)
    work = Path(tempfile.mkdtemp(prefix="osr-idle-cost-", dir=args.dir))
    if args.mode == "sites":
        status, rows = 0, {}
        try:
            rows = run_sites(osrd, work, counts, disk_bytes, args.settle, args.window)
        except Exception as e:  # report what ran, then fail
            log(f"FAILED: {e}")
            status = 1
        for name, site_rows in rows.items():
            print_table(site_rows, f"osrd site {name} (no vault)")
        finish(args, work, disk_bytes, rows)
        return status
    rows, status = [], 0
    qs = qs_log = None
    try:
        qs, qs_log, vault = start_quickstart(osrd, work)
        have = 0
        for n in counts:
            if n > have:
                t0 = time.monotonic()
                add_protected_vms(vault, have, n, disk_bytes)
                log(f"{n} VMs protected ({n - have} new in {time.monotonic() - t0:.0f} s)")
                have = n
            time.sleep(args.settle)
            r = measure(qs.pid, args.window)
            r["vms"] = n
            rows.append(r)
            log(f"{n} VMs: {r['cpu_pct']:.2f}% of a core, {r['threads']} threads, "
                f"{r['fds']} fds, {r['rss_mib']} MiB")
    except Exception as e:  # report what ran, then fail
        log(f"FAILED: {e}")
        status = 1
    finally:
        if qs is not None:
            stop_quickstart(qs, qs_log)
    print_table(rows, "one osrd quickstart (vault + primary + recovery)")
    finish(args, work, disk_bytes, rows)
    return status


def finish(args, work, disk_bytes, rows):
    if args.json:
        Path(args.json).write_text(json.dumps({"mode": args.mode, "disk_bytes": disk_bytes,
                                               "rows": rows}, indent=1))
    if args.keep:
        log(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
