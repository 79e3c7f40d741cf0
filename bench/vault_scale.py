#!/usr/bin/python3
"""Benchmark the control plane at scale: N protected VMs that write, SQLite beside PostgreSQL.

Issue 12 ("A control plane that survives the disaster"), "What must show it", the second
benchmark: 200 protected VMs (1 MiB disks, a write each second) on two site daemons:
latency of GET /items and of a failover job, the point loop's tick time, and the site
daemons' threads and RSS, on SQLite and on PostgreSQL side by side.

One run does the same twice, first with the vault's catalog on SQLite (a file), then on
PostgreSQL (a real PostgreSQL 15 server: initdb into a temp dir, run as the postgres user
when the bench runs as root, on a free port of 127.0.0.1, as tests/lib/osrtest.py's
PgServer does for the tests). Each time, from nothing:

  setup    two `osrd site` daemons, `primary` and `recovery` (mutual TLS, certificates
           from `osrd certs`), and one `osrd vault` (point tick 1 s, the default policy:
           a crash point every 5 s, 24 h retention), all on 127.0.0.1 in a temp dir.
           POST /sites twice; POST /vms for --vms VMs (default 200) at `primary`, each with
           one 1 MiB disk d0 (driver none); POST /vms/NAME/protect {target: recovery} for
           all of them, then GET /jobs every 0.5 s until every enable-protection job has
           ended. Timed: creating the VMs (per call and in all), protecting them (until
           the last job ended; each job's time from its created/updated), and which step
           the running jobs were in at each poll (so a slow step shows).
  writers  one libnbd connection per VM, kept open, on the VM's own NBD socket at the
           primary (data_dir/groups/VM/run/nbd.sock, what a VM on the site's host uses);
           --writer-threads threads (default 4) write --write-size random bytes (default
           4 KiB, 4 KiB-aligned) into each VM's disk once a second, paced (VM i at
           i/N of each second): N writes a second in all. A slot missed by more than a
           second is counted as missed, not caught up.
  window   after --warmup s (default 5) of writing, for --seconds s (default 60), while
           the writers go on:
           - GET /api/v1/items, one call at a time, a new one every --items-interval s
             (default 0.5; right after the last when it took longer): calls, p50/p99/max.
             Each answer must list N items; the last one's rpo_seconds give the RPO
             (p50 and max over the items).
           - GET /metrics every second: osr_vault_point_tick_seconds (histogram) and
             osr_vault_point_tick_last_seconds (gauge) by kind: `points` (a tick that only
             makes points) and `points_and_rpo` (every 5 s: it also samples each item's
             RPO and health from the sites). A tick's time is taken from the gauge when the
             count rose by exactly one since the last scrape (else it is only in the
             histogram's count and sum: "seen" says how many of the ticks were read);
             mean = histogram sum / count over the window.
           - every second, from /proc: each daemon's threads, RSS (VmRSS), open
             descriptors; CPU % of one core over the window (utime + stime). On
             PostgreSQL also the server's processes' CPU (postmaster and its children);
             and this script's own CPU (writers, probes), which shares the cores.
           - at its end: the crash points the point loop made in the window for 5 VMs
             spread over the list (GET /items/NAME/points), per item and minute: the
             default policy asks for one every 5 s (12 a minute).
  failover after the window, with the writers still writing to the other VMs: for
           --failovers VMs (default 3), one at a time, the VM's writer stops and closes its
           connection, POST /items/NAME/failover {point: --failover-point, default
           latest}; GET /jobs/ID every 50 ms until it ends. Timed from the submission
           until the poll that saw it Succeeded (and the job's own updated - created).
  stop     everything: writers, vault, sites, PostgreSQL; the temp dir goes (--keep keeps it).

Output: one table, SQLite and PostgreSQL side by side with the ratio PostgreSQL / SQLite,
then the setup figures; --json FILE writes everything measured. There is no bar: the
issue asks for the figures (docs/operations.md states what one vault and one site carry).

Every wait is bounded (the limits below, and --setup-timeout for protecting the VMs). A
missing tool or module (osrd, python3-libnbd, python3-pytest, PostgreSQL's binaries) is an
error that names it, exit 2. Ctrl-C or SIGTERM stops every process started and removes the
temp dir. Exit status: 0 when both backends were measured, 1 when a measurement failed.

Run: /usr/bin/python3 bench/vault_scale.py --osrd build/osrd [--vms 200] [--seconds 60]
     [--backends sqlite,postgresql] [--failovers 3] [--failover-point latest]
     [--write-size 4096] [--writer-threads 4] [--items-interval 0.5] [--warmup 5]
     [--setup-timeout 1200] [--dir /var/tmp] [--json FILE] [--keep]
"""

import argparse
import contextlib
import datetime
import json
import os
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import benchlib
from benchlib import BenchError, raise_interrupt

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests" / "lib"))

try:
    import pytest  # osrtest reports its failures through pytest.fail
    import osrtest
except ImportError as e:
    print(f"vault_scale: {e}: python3-pytest is missing (scripts/bootstrap installs it)",
          file=sys.stderr)
    sys.exit(2)

try:
    import nbd  # python3-libnbd (Debian's /usr/bin/python3)
except ImportError:
    nbd = None

# ---------------------------------------------------------------------------
# Limits (every wait in this script is bounded by one of these).

DAEMON_READY_TIMEOUT_S = 60       # 'osrd: ready' (a site reopening N groups takes a while)
DAEMON_STOP_TIMEOUT_S = 60        # after SIGTERM, before SIGKILL (N groups to close)
HTTP_TIMEOUT_S = 30               # one API call
ITEMS_TIMEOUT_S = 120             # one GET /items (it asks the sites about every item)
SETUP_WORKERS = 8                 # POST /vms and /protect calls in flight at once
JOB_POLL_S = 0.5                  # protect: GET /jobs every this
FAILOVER_POLL_S = 0.05            # failover: GET /jobs/ID every this
FAILOVER_TIMEOUT_S = 180          # one failover job, submission to end
METRICS_INTERVAL_S = 1.0
PROC_INTERVAL_S = 1.0
WRITER_JOIN_TIMEOUT_S = 30        # a writer thread ends after its current write
MISSED_AFTER_S = 1.0              # a write this late is missed, not sent
TOKEN_WAIT_S = 10
POINT_SAMPLE_VMS = 5              # VMs whose points made in the window are counted

MIB = 1 << 20
DISK_BYTES = MIB


def log(msg):
    benchlib.log(f"vault_scale: {msg}")


@contextlib.contextmanager
def bench_errors(what):
    """osrtest reports with pytest.fail (an exception outside pytest): a BenchError here."""
    try:
        yield
    except pytest.fail.Exception as e:
        raise BenchError(f"{what}: {e}") from None


def percentile(values, q):
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))
    return s[k]


def summary(values):
    """{n, p50, p99, max, mean} of a list of numbers (None for each when empty)."""
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None, "mean": None}
    return {"n": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99),
            "max": max(values), "mean": statistics.fmean(values)}


def parse_time_ns(text):
    """'2026-01-02T03:04:05.123456789Z' (the vault's FormatTimeNs) -> ns since the epoch."""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{9})Z", text or "")
    if not m:
        return None
    t = datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").replace(
        tzinfo=datetime.timezone.utc)
    return int(t.timestamp()) * 1_000_000_000 + int(m.group(2))


def job_seconds(job):
    """The job's own time, updated - created (the vault's clock), or None."""
    a, b = parse_time_ns(job.get("created")), parse_time_ns(job.get("updated"))
    return (b - a) / 1e9 if a is not None and b is not None else None


# ---------------------------------------------------------------------------
# Processes.


class Site(osrtest.OsrdProcess):
    """One `osrd site --config FILE` with mutual TLS, every address 127.0.0.1:0."""

    ready_timeout = DAEMON_READY_TIMEOUT_S
    stop_timeout = DAEMON_STOP_TIMEOUT_S

    def __init__(self, name, work, certs):
        super().__init__(work / f"{name}.stderr")
        self.name = name
        self.data_dir = work / f"{name}-data"
        self.config = work / f"{name}.toml"
        cert, key = certs[name]
        self.config.write_text(
            f'name = "{name}"\ndata_dir = "{self.data_dir}"\n'
            'nbd_listen = "127.0.0.1:0"\nreplication_listen = "127.0.0.1:0"\n'
            'api_listen = "127.0.0.1:0"\n'
            f'tls_ca = "{certs["ca"]}"\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
        self.api_url = self.replication = None

    @property
    def label(self):
        return f"site {self.name}: osrd"

    def osrd_args(self):
        return ["site", "--config", self.config]

    def on_stdout_line(self, text):
        m = re.match(r"^osrd: api on (https://127\.0\.0\.1:\d+/api/v1)$", text)
        if m:
            self.api_url = m.group(1)
        m = re.match(r"^osrd: replication on (127\.0\.0\.1:\d+)$", text)
        if m:
            self.replication = m.group(1)

    def check_ready(self):
        if self.api_url is None or self.replication is None:
            return f"site {self.name}: no api or replication address in {self.stdout_lines}"
        return None

    def disk_socket(self, vm):
        """The VM's own NBD socket (docs/api.md): what a VM on the site's host uses."""
        return self.data_dir / "groups" / vm / "run" / "nbd.sock"


class Vault(osrtest.OsrdProcess):
    """One `osrd vault` on a SQLite file or a PostgreSQL URL, with the sites' CA."""

    ready_timeout = DAEMON_READY_TIMEOUT_S
    stop_timeout = DAEMON_STOP_TIMEOUT_S
    label = "vault: osrd"

    def __init__(self, work, db, certs):
        super().__init__(work / "vault.stderr")
        self.db, self.certs = db, certs
        self.port = osrtest.free_port()
        self.token_file = work / "admin.token"
        self.token = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def osrd_args(self):
        cert, key = self.certs["vault"]
        return ["vault", "--db", self.db, "--listen", f"127.0.0.1:{self.port}",
                "--admin-token-file", self.token_file, "--site-ca", self.certs["ca"],
                "--site-cert", cert, "--site-key", key]

    def read_token(self):
        deadline = time.monotonic() + TOKEN_WAIT_S
        while not (self.token_file.exists() and self.token_file.read_text().strip()):
            if time.monotonic() > deadline:
                raise BenchError(f"the vault wrote no admin token to {self.token_file}")
            time.sleep(0.05)
        self.token = self.token_file.read_text().strip()

    def call(self, method, path, body=None, timeout=HTTP_TIMEOUT_S):
        """(HTTP status, decoded answer); (None, error text) when the vault does not answer.
        path: under /api/v1, or /metrics (then the answer is text)."""
        url = self.url + (path if path == "/metrics" else "/api/v1" + path)
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method, headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, text = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read()
        except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out
            return None, str(e)
        if path == "/metrics":
            return status, text.decode(errors="replace")
        try:
            return status, json.loads(text) if text else None
        except json.JSONDecodeError:
            return status, text[:300].decode(errors="replace")

    def ok(self, method, path, body=None, timeout=HTTP_TIMEOUT_S):
        status, doc = self.call(method, path, body, timeout)
        if status is None or not 200 <= status < 300:
            raise BenchError(f"{method} {path}: {status} {str(doc)[:500]}\n"
                             f"vault stderr: {self.stderr()[-1500:]}")
        return doc


def stop_daemon(p, problems):
    """SIGTERM (SIGKILL after stop_timeout); a daemon that did not exit 0 is noted."""
    if p is None or p.proc is None or not p.alive():
        return
    try:
        code = p.stop()
    except pytest.fail.Exception as e:
        problems.append(f"{p.label}: {str(e).splitlines()[0]}")
        return
    if code != 0:
        problems.append(f"{p.label} exited with {code} on SIGTERM: {p.stderr()[-800:]}")


# ---------------------------------------------------------------------------
# /proc.


def proc_stat(pid):
    """(cpu seconds, threads, rss bytes) of pid, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return ((int(fields[11]) + int(fields[12])) / tick, int(fields[17]),
            int(fields[21]) * os.sysconf("SC_PAGE_SIZE"))


def proc_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def children_of(ppid):
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == ppid:
                    out.append(int(name))
        except (OSError, IndexError, ValueError):
            continue
    return out


class ProcSampler(threading.Thread):
    """Every PROC_INTERVAL_S: threads, RSS, descriptors of each daemon; CPU over the run.
    `group_of`: optional name -> root pid whose children's CPU is summed (PostgreSQL)."""

    def __init__(self, pids, stop, group_root=None):
        super().__init__(daemon=True)
        self.pids, self.stop_event, self.group_root = pids, stop, group_root
        self.samples = {name: [] for name in pids}
        self.cpu0, self.cpu1 = {}, {}
        self.group_cpu0 = self.group_cpu1 = None
        self.t0 = self.t1 = None

    def group_cpu(self):
        """{pid: cpu s} of the group's root and its children (PostgreSQL's backends)."""
        if self.group_root is None:
            return None
        out = {}
        for pid in [self.group_root, *children_of(self.group_root)]:
            s = proc_stat(pid)
            if s is not None:
                out[pid] = s[0]
        return out

    def run(self):
        self.t0 = time.monotonic()
        self.group_cpu0 = self.group_cpu()
        for name, pid in self.pids.items():
            s = proc_stat(pid)
            self.cpu0[name] = s[0] if s else None
        while True:
            for name, pid in self.pids.items():
                s = proc_stat(pid)
                if s is not None:
                    self.samples[name].append({"threads": s[1], "rss_bytes": s[2],
                                               "fds": proc_fds(pid)})
            if self.stop_event.wait(PROC_INTERVAL_S):
                break
        self.t1 = time.monotonic()
        self.group_cpu1 = self.group_cpu()
        for name, pid in self.pids.items():
            s = proc_stat(pid)
            self.cpu1[name] = s[0] if s else None

    def result(self):
        wall = (self.t1 or time.monotonic()) - self.t0
        out = {}
        for name, samples in self.samples.items():
            c0, c1 = self.cpu0.get(name), self.cpu1.get(name)
            out[name] = {
                "cpu_pct": 100 * (c1 - c0) / wall if c0 is not None and c1 is not None else None,
                "threads_max": max((s["threads"] for s in samples), default=None),
                "rss_mb_max": max((s["rss_bytes"] for s in samples), default=0) / 1e6 or None,
                "rss_mb_end": samples[-1]["rss_bytes"] / 1e6 if samples else None,
                "fds_max": max((s["fds"] for s in samples if s["fds"] is not None),
                               default=None),
                "samples": len(samples)}
        if self.group_cpu0 is not None and self.group_cpu1 is not None:
            used = sum(c1 - self.group_cpu0.get(pid, 0.0) for pid, c1 in self.group_cpu1.items())
            out["postgresql"] = {"cpu_pct": 100 * used / wall,
                                 "processes": len(self.group_cpu1)}
        return out


# ---------------------------------------------------------------------------
# The NBD writers.


class Writers:
    """One libnbd connection per VM, kept open; threads that write into each disk once a
    second, paced. retire(vm) stops a VM's writes and closes its connection."""

    def __init__(self, site, vms, write_size, threads, seed):
        self.site, self.vms, self.write_size = site, list(vms), write_size
        self.handles = {}
        self.lock = threading.Lock()  # guards handles, retired, the counters
        self.retired = set()
        self.busy = {}                # vm -> writing now (retire waits for it)
        self.stop_event = threading.Event()
        self.n_threads = max(1, min(threads, len(self.vms)))
        self.threads = []
        self.seed = seed
        self.latencies_s = []
        self.written = 0
        self.missed = 0
        self.errors = []
        self.counting = False         # latencies and counts kept only in the window
        self.window = {"written": 0, "missed": 0}

    def connect_all(self):
        t0 = time.monotonic()
        for vm in self.vms:
            h = nbd.NBD()
            h.set_handle_name("vault-scale")
            uri = f"nbd+unix:///vm/{vm}/d0?socket={self.site.disk_socket(vm)}"
            try:
                h.connect_uri(uri)
            except nbd.Error as e:
                raise BenchError(f"cannot connect to {uri}: {e}") from None
            if h.get_size() != DISK_BYTES:
                raise BenchError(f"{uri}: size {h.get_size()}, expected {DISK_BYTES}")
            self.handles[vm] = h
        return time.monotonic() - t0

    def start(self):
        t0 = time.monotonic() + 0.2
        for j in range(self.n_threads):
            mine = [(i, vm) for i, vm in enumerate(self.vms) if i % self.n_threads == j]
            t = threading.Thread(target=self._run, args=(mine, t0, j), daemon=True)
            t.start()
            self.threads.append(t)

    def _run(self, mine, t0, j):
        rng = random.Random(self.seed * 1000 + j)
        n = len(self.vms)
        blocks = DISK_BYTES // 4096
        second = 0
        while not self.stop_event.is_set():
            for i, vm in mine:
                due = t0 + second + i / n
                wait = due - time.monotonic()
                if wait > 0 and self.stop_event.wait(wait):
                    return
                with self.lock:
                    h = None if vm in self.retired else self.handles.get(vm)
                    if h is not None:
                        self.busy[vm] = True
                if h is None:
                    continue
                try:
                    if time.monotonic() - due > MISSED_AFTER_S:
                        with self.lock:
                            self.missed += 1
                            self.window["missed"] += self.counting
                        continue
                    data = rng.randbytes(self.write_size)
                    off = rng.randrange(blocks - (self.write_size - 1) // 4096) * 4096
                    w0 = time.monotonic()
                    try:
                        h.pwrite(data, off)
                    except nbd.Error as e:
                        with self.lock:
                            self.errors.append(f"{vm}: {e}")
                            self.retired.add(vm)  # a broken connection writes no more
                        continue
                    took = time.monotonic() - w0
                    with self.lock:
                        self.written += 1
                        if self.counting:
                            self.window["written"] += 1
                            self.latencies_s.append(took)
                finally:
                    with self.lock:
                        self.busy.pop(vm, None)
            second += 1

    def begin_window(self):
        with self.lock:
            self.counting = True
            self.latencies_s = []
            self.window = {"written": 0, "missed": 0}

    def end_window(self):
        with self.lock:
            self.counting = False
            return dict(self.window), list(self.latencies_s), list(self.errors)

    def retire(self, vm):
        """Stops the VM's writes (after the one in flight) and closes its connection."""
        deadline = time.monotonic() + WRITER_JOIN_TIMEOUT_S
        with self.lock:
            self.retired.add(vm)
        while True:
            with self.lock:
                if vm not in self.busy:
                    h = self.handles.pop(vm, None)
                    break
            if time.monotonic() > deadline:
                raise BenchError(f"{vm}: a write did not return within "
                                 f"{WRITER_JOIN_TIMEOUT_S} s")
            time.sleep(0.01)
        if h is not None:
            osrtest.close_handle(h)

    def stop(self):
        """Ends the threads (bounded) and closes every connection. Returns the threads
        still stuck in a write (left behind as daemon threads; stopping the site ends
        them)."""
        self.stop_event.set()
        deadline = time.monotonic() + WRITER_JOIN_TIMEOUT_S
        stuck = 0
        for t in self.threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
            stuck += t.is_alive()
        if not stuck:
            for h in self.handles.values():
                osrtest.close_handle(h)
            self.handles.clear()
        return stuck


# ---------------------------------------------------------------------------
# The window's probes.


class ItemsProbe(threading.Thread):
    """GET /items, one at a time, a new one every `interval` s (or right after a slow one)."""

    def __init__(self, vault, n_items, interval, stop):
        super().__init__(daemon=True)
        self.vault, self.n_items, self.interval, self.stop_event = vault, n_items, interval, stop
        self.latencies_s = []
        self.errors = []
        self.last = None  # the newest good answer

    def run(self):
        while not self.stop_event.is_set():
            t0 = time.monotonic()
            status, doc = self.vault.call("GET", "/items", timeout=ITEMS_TIMEOUT_S)
            took = time.monotonic() - t0
            if status == 200 and isinstance(doc, list) and len(doc) == self.n_items:
                self.latencies_s.append(took)
                self.last = doc
            else:
                got = len(doc) if isinstance(doc, list) else str(doc)[:200]
                self.errors.append(f"GET /items: {status} ({got})")
            self.stop_event.wait(max(0.0, t0 + self.interval - time.monotonic()))


METRIC_LINE = re.compile(r'^(osr_vault_point_tick_(?:seconds_(?:count|sum|bucket)|last_seconds))'
                         r'\{kind="([a-z_]+)"(?:,le="([^"]+)")?\} (\S+)$')


def parse_tick_metrics(text):
    """{kind: {count, sum, last, buckets: {le: cumulative}}} from a /metrics text."""
    out = {}
    for line in text.splitlines():
        m = METRIC_LINE.match(line)
        if not m:
            continue
        name, kind, le, value = m.group(1), m.group(2), m.group(3), float(m.group(4))
        k = out.setdefault(kind, {"count": 0, "sum": 0.0, "last": None, "buckets": {}})
        if name.endswith("_count"):
            k["count"] = int(value)
        elif name.endswith("_sum"):
            k["sum"] = value
        elif name.endswith("_bucket"):
            k["buckets"][le] = value
        else:
            k["last"] = value
    return out


class TickProbe(threading.Thread):
    """GET /metrics every second: the point loop's tick times (see the module's doc)."""

    def __init__(self, vault, stop):
        super().__init__(daemon=True)
        self.vault, self.stop_event = vault, stop
        self.first = self.last = None
        self.seen = {}     # kind -> [tick seconds read from the gauge]
        self.errors = []
        self.exposed = None

    def scrape(self):
        status, text = self.vault.call("GET", "/metrics")
        if status != 200:
            self.errors.append(f"GET /metrics: {status} {str(text)[:200]}")
            return None
        self.exposed = "osr_vault_point_tick_seconds" in text
        return parse_tick_metrics(text)

    def run(self):
        prev = self.first = self.scrape()
        while not self.stop_event.wait(METRICS_INTERVAL_S):
            cur = self.scrape()
            if cur is None:
                continue
            for kind, k in cur.items():
                before = (prev or {}).get(kind, {"count": 0})["count"]
                if k["count"] == before + 1 and k["last"] is not None:
                    self.seen.setdefault(kind, []).append(k["last"])
            prev = self.last = cur

    def result(self):
        out = {}
        first, last = self.first or {}, self.last or {}
        for kind, k in last.items():
            k0 = first.get(kind, {"count": 0, "sum": 0.0, "buckets": {}})
            ticks = k["count"] - k0["count"]
            seen = self.seen.get(kind, [])
            s = summary(seen)
            out[kind] = {"ticks": ticks, "seen": len(seen),
                         "mean_s": (k["sum"] - k0["sum"]) / ticks if ticks else None,
                         "p50_s": s["p50"], "p99_s": s["p99"], "max_s": s["max"],
                         "bucket_counts": {le: v - k0["buckets"].get(le, 0)
                                           for le, v in k["buckets"].items()}}
        return out


# ---------------------------------------------------------------------------
# One backend, from nothing to stopped.


def vm_names(n):
    width = len(str(n - 1))
    return [f"vm{i:0{width}d}" for i in range(n)]


def create_vms(vault, names):
    latencies = []

    def one(name):
        t0 = time.monotonic()
        vault.ok("POST", "/vms", {"name": name, "site": "primary",
                                  "disks": [{"name": "d0", "size_bytes": DISK_BYTES}]})
        return time.monotonic() - t0

    t0 = time.monotonic()
    with ThreadPoolExecutor(SETUP_WORKERS) as pool:
        latencies = list(pool.map(one, names))
    return {"total_s": time.monotonic() - t0, "call_s": summary(latencies)}


def running_step(job):
    for step in job.get("steps") or []:
        if isinstance(step, dict) and step.get("state") == "Running":
            return step.get("name", "?")
    return "(between steps)" if job.get("state") == "Running" else job.get("state", "?")


def protect_vms(vault, names, timeout_s):
    """Submits every protect, then polls GET /jobs until each job ended (bounded)."""
    submit = []

    def one(name):
        t0 = time.monotonic()
        job = vault.ok("POST", f"/vms/{name}/protect", {"target": "recovery"})
        return job["id"], time.monotonic() - t0

    t0 = time.monotonic()
    with ThreadPoolExecutor(SETUP_WORKERS) as pool:
        submit = list(pool.map(one, names))
    submitted_s = time.monotonic() - t0
    ids = {job_id for job_id, _ in submit}
    step_seen_s = {}      # step name -> job-seconds seen in it (poll interval x jobs)
    ended = {}
    first_done_s = None
    deadline = t0 + timeout_s
    last_log = 0.0
    while True:
        jobs = vault.ok("GET", "/jobs", timeout=ITEMS_TIMEOUT_S)
        now = time.monotonic()
        states = {}
        for job in jobs:
            if job.get("id") not in ids:
                continue
            states[job["state"]] = states.get(job["state"], 0) + 1
            if job["state"] in ("Succeeded", "Failed", "Cancelled"):
                if job["id"] not in ended:
                    ended[job["id"]] = job
                    if first_done_s is None:
                        first_done_s = now - t0
            elif job["state"] == "Running":
                step = running_step(job)
                step_seen_s[step] = step_seen_s.get(step, 0.0) + JOB_POLL_S
        if len(ended) == len(ids):
            break
        if now - last_log > 15:
            log(f"  protect: {now - t0:.0f} s, jobs {states}")
            last_log = now
        if now > deadline:
            running = [j for j in jobs if j.get("id") in ids and j["state"] == "Running"]
            raise BenchError(
                f"protecting {len(names)} VMs did not end within {timeout_s} s: jobs {states}; "
                f"time seen per step (job-seconds): {step_seen_s}; a running job: "
                f"{json.dumps(running[:1])[:1500]}")
        time.sleep(JOB_POLL_S)
    failed = [j for j in ended.values() if j["state"] != "Succeeded"]
    if failed:
        raise BenchError(f"{len(failed)} protect job(s) did not succeed, e.g. "
                         f"{json.dumps(failed[0])[:1500]}")
    durations = [job_seconds(j) for j in ended.values()]
    return {"total_s": time.monotonic() - t0, "submit_s": submitted_s,
            "submit_call_s": summary([s for _, s in submit]),
            "first_done_s": first_done_s,
            "job_s": summary([d for d in durations if d is not None]),
            "step_job_seconds": dict(sorted(step_seen_s.items(), key=lambda kv: -kv[1]))}


def rpo_summary(items):
    """{p50, max, n} of the items' rpo_seconds in one GET /items answer."""
    rpo = [i["rpo_seconds"] for i in items or [] if isinstance(i.get("rpo_seconds"), (int, float))]
    s = summary(rpo)
    return {"n": s["n"], "p50": s["p50"], "max": s["max"]}



def points_made(vault, names, t0_ns, t1_ns):
    """Crash points the point loop made in [t0, t1] for a few VMs spread over the list, per
    item and minute (the default policy asks for one every 5 s: 12 a minute)."""
    step = max(1, len(names) // POINT_SAMPLE_VMS)
    chosen = names[::step][:POINT_SAMPLE_VMS]
    counts = []
    for vm in chosen:
        pts = vault.ok("GET", f"/items/{vm}/points")
        times = [parse_time_ns(p.get("time")) for p in pts]
        counts.append(sum(1 for t in times if t is not None and t0_ns <= t <= t1_ns))
    minutes = (t1_ns - t0_ns) / 60e9
    return {"vms": chosen, "in_window": counts,
            "per_item_per_min": statistics.fmean(counts) / minutes if counts else None}


def failover_one(vault, writers, vm, point):
    writers.retire(vm)
    t0 = time.monotonic()
    job = vault.ok("POST", f"/items/{vm}/failover", {"point": point})
    while True:
        status, job = vault.call("GET", f"/jobs/{job['id']}")
        if status == 200 and job["state"] in ("Succeeded", "Failed", "Cancelled"):
            break
        if time.monotonic() - t0 > FAILOVER_TIMEOUT_S:
            raise BenchError(f"failover of {vm} did not end within {FAILOVER_TIMEOUT_S} s: "
                             f"{json.dumps(job)[:1000]}")
        time.sleep(FAILOVER_POLL_S)
    took = time.monotonic() - t0
    if job["state"] != "Succeeded":
        raise BenchError(f"failover of {vm}: {job['state']}: {json.dumps(job)[:1500]}")
    return took, job_seconds(job)


def run_backend(backend, args, root, certs):
    """Everything measured on one catalog backend (a dict); raises BenchError."""
    work = root / backend
    work.mkdir()
    res = {"backend": backend, "vms": args.vms}
    pg = vault = writers = None
    sites = []
    problems = []
    stop = threading.Event()
    probes = []
    try:
        if backend == "postgresql":
            with bench_errors("PostgreSQL"):
                pg = osrtest.PgServer()
                pg.start()
                db = pg.create_database("osr_vault_scale")
        else:
            db = str(work / "vault.db")
        with bench_errors("starting the daemons"):
            primary = Site("primary", work, certs)
            sites.append(primary)
            primary.start()
            recovery = Site("recovery", work, certs)
            sites.append(recovery)
            recovery.start()
            vault = Vault(work, db, certs)
            vault.start()
        vault.read_token()
        for s in sites:
            vault.ok("POST", "/sites", {"name": s.name, "api": s.api_url,
                                        "replication": s.replication})
        names = vm_names(args.vms)
        log(f"[{backend}] creating {args.vms} VMs")
        res["create"] = create_vms(vault, names)
        log(f"[{backend}] created in {res['create']['total_s']:.1f} s; protecting")
        res["protect"] = protect_vms(vault, names, args.setup_timeout)
        log(f"[{backend}] protected in {res['protect']['total_s']:.1f} s")
        res["procs_after_setup"] = {s.name: proc_fds(s.pid) for s in sites}

        writers = Writers(primary, names, args.write_size, args.writer_threads, args.seed)
        res["nbd_connect_s"] = writers.connect_all()
        writers.start()
        stop.wait(args.warmup)
        pids = {"primary": primary.pid, "recovery": recovery.pid, "vault": vault.pid,
                "bench": os.getpid()}
        pg_root = None
        if pg is not None:
            pid_file = pg.dir / "data" / "postmaster.pid"
            pg_root = int(pid_file.read_text().split()[0]) if pid_file.exists() else None
        sampler = ProcSampler(pids, stop, pg_root)
        items = ItemsProbe(vault, args.vms, args.items_interval, stop)
        ticks = TickProbe(vault, stop)
        probes = [sampler, items, ticks]
        log(f"[{backend}] measuring for {args.seconds} s")
        writers.begin_window()
        t0 = time.monotonic()
        wall0_ns = time.time_ns()
        for p in probes:
            p.start()
        stop.wait(args.seconds)
        stop.set()
        for p in probes:
            p.join(timeout=ITEMS_TIMEOUT_S + 5)
        window_s = time.monotonic() - t0
        if any(p.is_alive() for p in probes):
            raise BenchError("a probe did not end within its bound")
        counts, write_lat, write_errors = writers.end_window()
        res["window_s"] = window_s
        res["writes"] = {"target_per_s": args.vms, "written": counts["written"],
                         "per_s": counts["written"] / window_s, "missed": counts["missed"],
                         "latency_s": summary(write_lat), "errors": write_errors[:5],
                         "error_count": len(write_errors)}
        res["items"] = {"latency_s": summary(items.latencies_s), "errors": items.errors[:5],
                        "error_count": len(items.errors)}
        res["ticks"] = ticks.result()
        res["tick_metric_exposed"] = ticks.exposed
        res["tick_errors"] = ticks.errors[:5]
        res["procs"] = sampler.result()
        res["rpo_s"] = rpo_summary(items.last)
        res["points"] = points_made(vault, names, wall0_ns, time.time_ns())

        chosen = names[-args.failovers:] if args.failovers else []
        fo = []
        for vm in chosen:
            took, server_s = failover_one(vault, writers, vm, args.failover_point)
            log(f"[{backend}] failover {vm}: {took:.2f} s")
            fo.append({"vm": vm, "client_s": took, "job_s": server_s})
        res["failover"] = {"point": args.failover_point, "runs": fo,
                           "client_s": summary([f["client_s"] for f in fo]),
                           "job_s": summary([f["job_s"] for f in fo if f["job_s"] is not None])}
        return res
    finally:
        stop.set()
        if writers is not None:
            stuck = writers.stop()
            if stuck:
                problems.append(f"{stuck} writer thread(s) still in a write at the end")
        stop_daemon(vault, problems)
        for s in reversed(sites):
            stop_daemon(s, problems)
        if pg is not None:
            with contextlib.suppress(Exception, pytest.fail.Exception):
                pg.close()
        res["stop_problems"] = problems
        for p in problems:
            log(f"[{backend}] warning: {p}")


# ---------------------------------------------------------------------------
# The report.


def ms(v):
    return "-" if v is None else f"{v * 1000:.1f}"


def num(v, fmt="{:.1f}"):
    return "-" if v is None else fmt.format(v)


def get(d, *path):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


ROWS = [
    # (label, path into a backend's result, formatter: value -> text, numeric for ratio)
    ("GET /items calls", ("items", "latency_s", "n"), lambda v: num(v, "{:.0f}")),
    ("GET /items p50 ms", ("items", "latency_s", "p50"), ms),
    ("GET /items p99 ms", ("items", "latency_s", "p99"), ms),
    ("GET /items max ms", ("items", "latency_s", "max"), ms),
    ("point tick (points): ticks", ("ticks", "points", "ticks"), lambda v: num(v, "{:.0f}")),
    ("point tick (points): mean ms", ("ticks", "points", "mean_s"), ms),
    ("point tick (points): p50 ms", ("ticks", "points", "p50_s"), ms),
    ("point tick (points): p99 ms", ("ticks", "points", "p99_s"), ms),
    ("point tick (points): max ms", ("ticks", "points", "max_s"), ms),
    ("point tick (+RPO sample): ticks", ("ticks", "points_and_rpo", "ticks"),
     lambda v: num(v, "{:.0f}")),
    ("point tick (+RPO sample): mean ms", ("ticks", "points_and_rpo", "mean_s"), ms),
    ("point tick (+RPO sample): max ms", ("ticks", "points_and_rpo", "max_s"), ms),
    ("failover job p50 s (submit->Succeeded)", ("failover", "client_s", "p50"),
     lambda v: num(v, "{:.2f}")),
    ("failover job max s", ("failover", "client_s", "max"), lambda v: num(v, "{:.2f}")),
    ("crash points per item a minute (policy: 12)", ("points", "per_item_per_min"), num),
    ("RPO p50 s (last GET /items)", ("rpo_s", "p50"), lambda v: num(v, "{:.2f}")),
    ("RPO max s (last GET /items)", ("rpo_s", "max"), lambda v: num(v, "{:.2f}")),
    ("writes/s done (target = VMs)", ("writes", "per_s"), num),
    ("writes missed (>1 s late)", ("writes", "missed"), lambda v: num(v, "{:.0f}")),
    ("NBD write p99 ms", ("writes", "latency_s", "p99"), ms),
    ("primary: CPU % of a core", ("procs", "primary", "cpu_pct"), num),
    ("primary: threads", ("procs", "primary", "threads_max"), lambda v: num(v, "{:.0f}")),
    ("primary: RSS MB (max)", ("procs", "primary", "rss_mb_max"), num),
    ("primary: open fds", ("procs", "primary", "fds_max"), lambda v: num(v, "{:.0f}")),
    ("recovery: CPU % of a core", ("procs", "recovery", "cpu_pct"), num),
    ("recovery: threads", ("procs", "recovery", "threads_max"), lambda v: num(v, "{:.0f}")),
    ("recovery: RSS MB (max)", ("procs", "recovery", "rss_mb_max"), num),
    ("recovery: open fds", ("procs", "recovery", "fds_max"), lambda v: num(v, "{:.0f}")),
    ("vault: CPU % of a core", ("procs", "vault", "cpu_pct"), num),
    ("vault: threads", ("procs", "vault", "threads_max"), lambda v: num(v, "{:.0f}")),
    ("vault: RSS MB (max)", ("procs", "vault", "rss_mb_max"), num),
    ("PostgreSQL server: CPU % of a core", ("procs", "postgresql", "cpu_pct"), num),
    ("this bench (writers, probes): CPU %", ("procs", "bench", "cpu_pct"), num),
    ("create VMs: all, s", ("create", "total_s"), num),
    ("create VMs: per call p99 ms", ("create", "call_s", "p99"), ms),
    ("protect VMs: until all Protected, s", ("protect", "total_s"), num),
    ("protect: one job p50 s (queue incl.)", ("protect", "job_s", "p50"),
     lambda v: num(v, "{:.2f}")),
    ("protect: one job max s (queue incl.)", ("protect", "job_s", "max"),
     lambda v: num(v, "{:.2f}")),
]


def print_report(results, args):
    backends = [b for b in args.backends if b in results]
    print(f"\n== vault_scale: {args.vms} protected VMs (1 MiB disks, {args.write_size} B "
          f"written into each once a second) on two site daemons; {args.seconds} s window ==")
    head = f"{'':42}" + "".join(f"{b:>14}" for b in backends)
    both = "sqlite" in backends and "postgresql" in backends
    print(head + (f"{'pg/sqlite':>11}" if both else ""))
    for label, path, fmt in ROWS:
        vals = [get(results[b], *path) for b in backends]
        if all(v is None for v in vals):
            continue
        line = f"{label:42}" + "".join(f"{fmt(v):>14}" for v in vals)
        if both:
            a, b = get(results["sqlite"], *path), get(results["postgresql"], *path)
            ratio = (f"{b / a:.2f}x" if isinstance(a, (int, float)) and
                     isinstance(b, (int, float)) and a else "-")
            line += f"{ratio:>11}"
        print(line)
    for b in backends:
        r = results[b]
        steps = get(r, "protect", "step_job_seconds") or {}
        if steps:
            top = ", ".join(f"{k} {v:.0f}" for k, v in list(steps.items())[:4])
            print(f"{b}: protect jobs were seen Running in (job-seconds): {top}")
        ticks = r.get("ticks") or {}
        if get(ticks, "points_and_rpo", "ticks") and not get(ticks, "points", "ticks"):
            print(f"{b}: every tick of the point loop took longer than the 5 s between RPO "
                  "samples, so each one sampled the RPO too (no points-only tick)")
        for kind, k in ticks.items():
            if k["ticks"] and k["seen"] < k["ticks"]:
                print(f"{b}: point tick {kind}: {k['seen']} of {k['ticks']} ticks read one by "
                      "one (p50/p99/max from those; mean from all)")
        if r.get("tick_metric_exposed") is False:
            print(f"{b}: the vault exposes no osr_vault_point_tick_seconds: tick times not "
                  "measured")
        for what in ("items", "writes"):
            n = get(r, what, "error_count")
            if n:
                print(f"{b}: {n} {what} error(s), e.g. {get(r, what, 'errors')[0]}")
    print("notes: latencies are wall time seen by this script on the same 127.0.0.1 host; "
          "CPU % is of one core over the window (the bench's own writers and probes run on "
          "the same cores); 'point tick' is one turn of the leader's point loop over every "
          "item (then it waits 1 s); +RPO sample: the ticks every 5 s that also ask the "
          "sites for each item's RPO and health.")


# ---------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--osrd", default=os.environ.get("OSRD", str(REPO_ROOT / "build" / "osrd")),
                   help="osrd binary (default $OSRD or <repo>/build/osrd)")
    p.add_argument("--vms", type=int, default=200, help="protected VMs (default 200)")
    p.add_argument("--seconds", type=int, default=60, help="measured window (default 60)")
    p.add_argument("--warmup", type=float, default=5.0,
                   help="seconds of writing before the window (default 5)")
    p.add_argument("--backends", default="sqlite,postgresql",
                   help="catalog backends, in order (default sqlite,postgresql)")
    p.add_argument("--failovers", type=int, default=3,
                   help="failover jobs timed after the window (default 3)")
    p.add_argument("--failover-point", default="latest",
                   help="the failovers' point (default latest; latest-processed, ...)")
    p.add_argument("--write-size", type=int, default=4096,
                   help="bytes written into each disk once a second (default 4096)")
    p.add_argument("--writer-threads", type=int, default=4, help="NBD writer threads (4)")
    p.add_argument("--items-interval", type=float, default=0.5,
                   help="seconds between GET /items calls (default 0.5)")
    p.add_argument("--setup-timeout", type=float, default=1200,
                   help="bound on protecting the VMs, seconds (default 1200)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--dir", default="/var/tmp", help="parent of the temp dir (/var/tmp)")
    p.add_argument("--json", help="write the results to this file")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data)")
    args = p.parse_args()
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not args.backends or any(b not in ("sqlite", "postgresql") for b in args.backends):
        p.error("--backends: sqlite and/or postgresql")
    if args.vms < 1 or args.seconds < 1 or args.warmup < 0 or args.items_interval < 0:
        p.error("--vms and --seconds >= 1; --warmup, --items-interval >= 0")
    if not 0 <= args.failovers <= args.vms:
        p.error("--failovers: 0..--vms")
    if not 1 <= args.write_size <= DISK_BYTES or args.writer_threads < 1:
        p.error("--write-size 1..1 MiB; --writer-threads >= 1")

    osrd = Path(args.osrd).resolve()
    if not (osrd.is_file() and os.access(osrd, os.X_OK)):
        log(f"osrd not found or not executable at {osrd}: build it (ninja -C build osrd) "
            "or pass --osrd")
        return 2
    if nbd is None:
        log("python3-libnbd is missing: run with Debian's /usr/bin/python3 "
            "(apt-get install python3-libnbd)")
        return 2
    if "postgresql" in args.backends:
        pg_bin = Path(os.environ.get("OSR_PG_BIN", osrtest.PG_BIN_DEFAULT))
        missing = [t for t in ("initdb", "pg_ctl", "postgres", "psql")
                   if not os.access(pg_bin / t, os.X_OK)]
        if missing:
            log(f"PostgreSQL's {', '.join(missing)} not in {pg_bin}: install Debian's "
                "postgresql (scripts/bootstrap) or set OSR_PG_BIN")
            return 2
        if os.geteuid() == 0 and not shutil.which("runuser"):
            log("runuser is missing (util-linux): PostgreSQL must run as the postgres user")
            return 2
    os.environ["OSRD"] = str(osrd)  # osrtest.OsrdProcess and make_certs run this binary

    os.makedirs(args.dir, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="osr-vault-scale.", dir=args.dir))
    signal.signal(signal.SIGTERM, raise_interrupt)
    results, errors = {}, []
    started = time.time()
    t_start = time.monotonic()
    load_start = os.getloadavg()
    try:
        log(f"work dir {root}")
        with bench_errors("osrd certs"):
            certs = osrtest.make_certs(root / "tls", "primary", "recovery", "vault")
        for backend in args.backends:
            t0 = time.monotonic()
            try:
                results[backend] = run_backend(backend, args, root, certs)
                results[backend]["run_s"] = time.monotonic() - t0
            except BenchError as e:
                log(f"[{backend}] FAILED: {e}")
                errors.append(f"{backend}: {e}")
    except KeyboardInterrupt:
        log("interrupted")
        errors.append("interrupted")
    except BenchError as e:
        log(f"FAILED: {e}")
        errors.append(str(e))
    finally:
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print_report(results, args)
    total_s = time.monotonic() - t_start
    print(f"run took {total_s:.0f} s; load average at start {load_start[0]:.2f}, at end "
          f"{os.getloadavg()[0]:.2f} (other work on the machine skews results)")
    for e in errors:
        print("ERROR " + "\n    ".join(e.splitlines()[:8]))
    if args.json:
        doc = {"started_unix": started, "run_s": total_s, "osrd": str(osrd), "vms": args.vms,
               "seconds": args.seconds, "warmup_s": args.warmup,
               "write_size_bytes": args.write_size, "items_interval_s": args.items_interval,
               "failover_point": args.failover_point, "loadavg_start": load_start,
               "loadavg_end": os.getloadavg(), "results": results, "errors": errors}
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
        log(f"results written to {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
