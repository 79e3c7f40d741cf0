#!/usr/bin/python3
"""Benchmark the recovery store at scale: retained history, memory, restart, reads, compaction.

Issue 11 ("The recovery store at production scale"), section "What must show it". One run
starts two `osrd site` daemons on 127.0.0.1 in a temp dir, `primary` and `recovery`, as
separate processes (so the recovery site's memory is its own), protects one group `vm1`
with one disk (--disk, default 2 GiB) and keeps everything the recovery store receives:
there is no vault, nothing calls fold, nothing thins points.

Setup. The disk is first written whole through NBD (python3-libnbd, 1 MiB writes): every
4 KiB block starts with b"OSRFILL1" and its block number, the rest is random. Once that is
durable at the recovery site, its seq is `fill_seq`: the oldest point that holds data (the
store's own oldest seq, max(base_seq, consistent_from), is 0 here: the empty disk).

Churn steps. For each retained churn size (default 1G, 4G, 16G; --large adds 64G; --quick
64M, 256M, 1G) fio writes what is missing to reach it (cumulative, each step a new
randseed): nbd engine, rw=randwrite bs=4k iodepth=16 (--iodepth), norandommap, over the
whole disk, so the churn overwrites blocks again and again. While fio runs, the RPO is
sampled every 100 ms as replication_bench.py does (informative here; its bar is that
script's). After fio: wait until the recovery store's durable_seq reaches the primary's
last_seq (drained), then measure, at the recovery site:

  (a) memory: VmRSS, RssAnon and VmHWM of the recovery osrd (/proc/PID/status), MB
      (10^6 bytes). RSS counts mapped file pages too; RssAnon is the heap.
  (d) journal bytes: allocated bytes (st_blocks) under data/stores/vm1/journal, beside
      what was written into the disk (fill + fio's io_bytes): journal / written.
  (c) read latency: views (POST /api/v1/stores/vm1/views) at the newest seq (durable_seq)
      and at fill_seq; the same --reads (default 2000) random 4 KiB-aligned offsets are
      read through NBD from both, alternating newest/oldest, one request at a time
      (libnbd in this process: the time includes Python's ~20-50 us per request, the
      same for both). Every read at fill_seq is checked (its block's OSRFILL1 header); a
      mismatch fails the step. p50 and p99 in ms. The journal may sit in the page cache
      (no cache drop: the bench runs unprivileged), so these are warm reads.
  (b) restart to first read: SIGTERM the recovery osrd (the time it takes to exit is
      reported as "stop s"), start it again on the same ports, and from exec: until it
      prints "osrd: ready" (ready s), and until a view at the store's oldest seq (from
      GET /api/v1/stores/vm1: max(base_seq, consistent_from)) is open and a 4 KiB read at
      offset 0 through NBD has returned (first read s); POSTs that fail while the store
      opens are retried every 20 ms up to a deadline. The bytes must be zeros or the fill
      header of block 0. Then a view at fill_seq and one read there (its block checked),
      also timed from exec ("fill_seq s"): the oldest point whose reads need the history.
      RSS and VmHWM right after (the peak of the reopen).
      The primary's sender then reconnects before the next step. The recovery site is
      also restarted once after the fill, so every step's figures come from a process
      that reopened the store and then took churn only.

Compaction. After the last step: POST /api/v1/stores/vm1/compact {"keep": [fill_seq, the
seq after each step], "through": the newest seq} (drops the versions of blocks that no
kept seq <= through can see). Before it, 256 random blocks are hashed at every kept seq
through views; after it, again: every one must be the same. Reported: journal bytes
before and after, beside the raw churn (fill + fio bytes) and the distinct data per kept
point, which is what a compacted journal must hold: the fill (the whole disk, visible at
fill_seq) plus, for every step, the blocks it wrote at least once (the last version of
each is visible at the step's kept seq). fio's offsets are uniform (tausworthe64,
norandommap), so a step of n 4 KiB writes over N blocks touches N x (1 - (1 - 1/N)^n)
distinct blocks (the law of large numbers makes this exact to well under 1% at these
counts). Goal: after <= 1.1 x that (records carry a 48-byte header: 1.2% at 4 KiB).
The quick sizes overwrite little, so there the figure is close to the raw churn; at the
default sizes 18 GiB written come down to about 6.3 GiB of distinct data.
A site without the route (404) is reported as "compaction: not measured" and fails the
run: no figure is made up.

Replicated 4 KiB random writes (the highest rate with RPO p99 <= 2 s, goal >= 25 000
writes/s per disk) are measured by bench/replication_bench.py's 4 KiB part (--bs 4k), not
here; the report's fio IOPS and RPO columns are at an unlimited rate, for orientation.

Goals (PASS/FAIL; they do not fail the run unless --strict):
  RSS (VmRSS) after the largest churn <= 1.2 x RSS after the smallest, both in MB (the
  recovery site runs with store_index_cache_bytes = --index-cache, default 16M)
  (default run: 16 GiB vs 1 GiB); restart to first read <= 2 s at every size; at every
  size, the oldest point's read p50 and p99 <= 2 x the newest point's; the journal after
  compaction <= 1.1 x the distinct data per kept point.

Time and space: the journal keeps fill + all churn; the primary's capture log holds what
is not yet acknowledged, and the disk images are allocated at both sites. The start
checks for 2 x the largest churn + 3 x the disk + 2 GiB free under --dir and refuses (exit
2) otherwise; each step checks again. A full default run writes 16 GiB of 4 KiB random
writes (about 4.2 M records: some 3 minutes of fio at today's ~100 MB/s, plus the restarts,
which today re-read the whole journal) and needs about 40 GiB; --quick (about a minute)
while developing.

Exit status: 0 when every measurement ran, 1 when one failed (compaction not measured
included; a goal too with --strict), 2 on bad usage, a missing tool or too little space.

Run: /usr/bin/python3 bench/store_scale.py --osrd build/osrd [--quick | --large]
     [--sizes 1G,4G,16G] [--disk 2G] [--iodepth 16] [--reads 2000] [--dir /var/tmp]
     [--json FILE] [--strict] [--keep]
"""

import argparse
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

from benchlib import (BenchError, free_bytes, log, parse_fio_json,  # noqa: E402
                      raise_interrupt, read_file_text, tail)
import replication_bench as rb  # noqa: E402  (sites, API, libnbd helpers, RPO sampler)

nbd = rb.nbd  # python3-libnbd, or None

# ---------------------------------------------------------------------------
# Limits (every wait is bounded by one of these).

SITE_START_TIMEOUT_S = 30.0          # first start, empty data dir
RESTART_BASE_TIMEOUT_S = 120.0       # restart to first read: this + per GiB retained
RESTART_PER_GIB_S = 30.0
CONNECT_TIMEOUT_S = 60.0             # the primary's sender back after a restart
FIO_BASE_TIMEOUT_S = 300.0           # fio: this + bytes at FIO_SLOWEST_B_S
FIO_SLOWEST_B_S = 2 * 1000 * 1000
DRAIN_BASE_TIMEOUT_S = 300.0         # drain: this + bytes at DRAIN_SLOWEST_B_S
DRAIN_SLOWEST_B_S = 2 * 1000 * 1000
FILL_TIMEOUT_S = 1800.0
NBD_IO_TIMEOUT_S = 10.0              # one libnbd connect or request
COMPACT_TIMEOUT_S = 3600.0
VIEW_RETRY_S = 0.02
FREE_MARGIN_BYTES = 2 << 30

MB, MIB, GIB = rb.MB, rb.MIB, rb.GIB
BLOCK = 4096

GOAL_RSS_RATIO = 1.2
GOAL_RESTART_S = 2.0
GOAL_READ_RATIO = 2.0
GOAL_COMPACT_SLACK = 1.1
HASH_SAMPLES = 256

FILL_MAGIC = b"OSRFILL1"
VM = "vm1"

NOTES = [
    "churn is cumulative: each row holds all churn so far plus the fill; 'written' = fill + "
    "fio bytes; journal = allocated bytes of the store's journal/ and history/ folders (its "
    "version index, index/, not counted).",
    "RSS/anon/HWM: the recovery osrd's /proc/PID/status after the drain (MB = 10^6 bytes); "
    "the restart table's RSS/HWM are the new process's, right after its first reads.",
    "restart times count from the exec of the new process: 'ready' its 'osrd: ready' line, "
    "'1st read' a view at the store's oldest seq (max(base_seq, consistent_from)) and a "
    "4 KiB NBD read; 'fill_seq s' a view and a read at fill_seq after that.",
    "read latency: one 4 KiB request at a time from this Python process (libnbd), newest "
    "and fill_seq alternating at the same offsets; the page cache is warm.",
    "fio IOPS, MB/s and RPO are at an unlimited rate (QD16), for orientation: the "
    "replicated 4 KiB bar is replication_bench.py's 4 KiB part (--bs 4k).",
]

DEFAULT_SIZES = [1 << 30, 4 << 30, 16 << 30]
LARGE_SIZE = 64 << 30
QUICK_SIZES = [64 << 20, 256 << 20, 1 << 30]


def parse_size(text):
    return rb.parse_size(text)


def human_bytes(n):
    return rb.human_bytes(n)


def percentile(values, q):
    return rb.percentile(values, q)


def fmt(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def proc_status(pid):
    """{VmRSS, RssAnon, VmHWM} of pid in bytes (missing keys absent)."""
    out = {}
    text = read_file_text(f"/proc/{pid}/status")
    for key in ("VmRSS", "RssAnon", "VmHWM"):
        m = re.search(rf"^{key}:\s+(\d+)\s+kB$", text, re.M)
        if m:
            out[key] = int(m.group(1)) * 1024
    return out


def memory_mb(pid):
    st = proc_status(pid)
    if "VmRSS" not in st:
        raise BenchError(f"cannot read VmRSS of pid {pid} from /proc/{pid}/status")
    return {"rss_mb": st["VmRSS"] / MB, "rss_anon_mb": st.get("RssAnon", 0) / MB,
            "hwm_mb": st.get("VmHWM", 0) / MB}


def free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------------------
# The recovery site: fixed ports (so the primary's sender finds it again after a
# restart), a start that is timed from exec and may wait longer than the first one.

class BenchSite(rb.Site):
    """replication_bench's Site, with api_insecure (plain HTTP API on loopback, which a
    site without TLS now needs) and, with fixed_ports, its ports chosen once so the
    primary's sender finds it again after a restart."""

    def __init__(self, osrd, name, root, fixed_ports=False, index_cache=None):
        super().__init__(osrd, name, root)
        text = read_file_text(self.config)
        if index_cache:
            text += f"store_index_cache_bytes = {index_cache}\n"
        if fixed_ports:
            for key, port in zip(("nbd_listen", "replication_listen", "api_listen"),
                                 free_ports(3)):
                text = text.replace(f'{key} = "127.0.0.1:0"', f'{key} = "127.0.0.1:{port}"')
        if "api_insecure" not in text:
            text += "api_insecure = true\n"
        with open(self.config, "w") as f:
            f.write(text)
        self.starts = 0

    def start_timed(self, timeout_s):
        """Starts osrd; returns (monotonic time of exec, seconds until "osrd: ready")."""
        self.starts += 1
        if self.starts > 1:  # keep the earlier runs' output
            for path in (self.stdout_path, self.stderr_path):
                if os.path.exists(path):
                    os.replace(path, f"{path}.{self.starts - 1}")
        cmd = [self.osrd, "site", "--config", self.config]
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            t0 = time.monotonic()
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, start_new_session=True)
        deadline = t0 + timeout_s
        while time.monotonic() < deadline:
            text = read_file_text(self.stdout_path)
            if re.search(r"^osrd: ready$", text, re.M):
                ready_s = time.monotonic() - t0
                api = re.search(r"^osrd: api on http://([0-9.]+):(\d+)/api/v1$", text, re.M)
                nbd_m = re.search(r"^osrd: nbd on ([0-9.]+:\d+)$", text, re.M)
                repl = re.search(r"^osrd: replication on ([0-9.]+:\d+)$", text, re.M)
                if not (api and nbd_m and repl):
                    raise BenchError(f"site {self.name}: ready, but its addresses are not "
                                     f"in its output:\n{tail(text)}")
                self.api = rb.Api(api.group(1), int(api.group(2)), f"site {self.name}")
                self.nbd = nbd_m.group(1)
                self.replication = repl.group(1)
                return t0, ready_s
            if self.proc.poll() is not None:
                raise BenchError(f"site {self.name} exited with status "
                                 f"{self.proc.returncode} while starting: {' '.join(cmd)}\n"
                                 f"{self.log_tail()}")
            time.sleep(0.005)
        raise BenchError(f"site {self.name} not ready after {timeout_s:.0f} s: "
                         f"{' '.join(cmd)}\n{self.log_tail()}")


# ---------------------------------------------------------------------------
# NBD (libnbd in this process; every request bounded by NBD_IO_TIMEOUT_S).

def fill_block_header(block_no):
    return FILL_MAGIC + struct.pack("<Q", block_no)


def fill_disk(uri, disk_bytes):
    """Writes the whole disk in 1 MiB pieces: each 4 KiB block starts with its header."""
    h = rb.nbd_connect(uri, time.monotonic() + NBD_IO_TIMEOUT_S)
    t0 = time.monotonic()
    last_log = t0
    try:
        for off in range(0, disk_bytes, MIB):
            buf = bytearray(os.urandom(MIB))
            first = off // BLOCK
            for j in range(MIB // BLOCK):
                buf[j * BLOCK:j * BLOCK + 16] = fill_block_header(first + j)
            nb = nbd.Buffer.from_bytearray(buf)
            rb.nbd_cmd(h, lambda: h.aio_pwrite(nb, off),
                       time.monotonic() + NBD_IO_TIMEOUT_S, f"fill write at {off}")
            if time.monotonic() - last_log > 10:
                last_log = time.monotonic()
                log(f"[fill] {human_bytes(off + MIB)} of {human_bytes(disk_bytes)}")
            if time.monotonic() - t0 > FILL_TIMEOUT_S:
                raise BenchError(f"filling the disk took over {FILL_TIMEOUT_S:.0f} s")
        rb.nbd_cmd(h, lambda: h.aio_flush(), time.monotonic() + NBD_IO_TIMEOUT_S, "flush")
    finally:
        rb.nbd_close(h)
    return time.monotonic() - t0


class View:
    """A read-only view of the store at seq, and one libnbd connection to its disk."""

    def __init__(self, site, seq):
        self.site, self.seq = site, seq
        doc = site.api.call("POST", f"/api/v1/stores/{VM}/views", {"seq": seq},
                            expect=(201,))
        self.id = doc["id"]
        self.uri = doc["disks"][0]["uri"]
        self.h = None
        self.buf = nbd.Buffer(BLOCK)

    def connect(self):
        self.h = rb.nbd_connect(self.uri, time.monotonic() + NBD_IO_TIMEOUT_S)

    def read(self, off):
        rb.nbd_cmd(self.h, lambda: self.h.aio_pread(self.buf, off),
                   time.monotonic() + NBD_IO_TIMEOUT_S, f"read 4 KiB at {off} (seq {self.seq})")
        return bytes(self.buf.to_bytearray())

    def close(self):
        if self.h is not None:
            rb.nbd_close(self.h)
            self.h = None
        try:
            self.site.api.call("DELETE", f"/api/v1/views/{self.id}", expect=(204, 404))
        except BenchError as e:
            log(f"warning: closing view {self.id}: {e}")


def read_latencies(recovery, newest_seq, oldest_seq, offsets):
    """Alternating 4 KiB reads at the same offsets from views at both seqs (ms)."""
    views = {}
    try:
        views["newest"] = View(recovery, newest_seq)
        views["oldest"] = View(recovery, oldest_seq)
        for v in views.values():
            v.connect()
        times = {"newest": [], "oldest": []}
        bad = 0
        for i, off in enumerate(offsets):
            order = ("newest", "oldest") if i % 2 == 0 else ("oldest", "newest")
            for label in order:
                t0 = time.perf_counter()
                data = views[label].read(off)
                times[label].append((time.perf_counter() - t0) * 1000.0)
                if label == "oldest" and data[:16] != fill_block_header(off // BLOCK):
                    bad += 1
        if bad:
            raise BenchError(f"{bad} of {len(offsets)} reads at fill_seq {oldest_seq} did not "
                             "return the block the fill wrote there")
        out = {}
        for label, t in times.items():
            out[label] = {"seq": views[label].seq, "p50_ms": percentile(t, 50),
                          "p99_ms": percentile(t, 99), "max_ms": max(t), "reads": len(t)}
        return out
    finally:
        for v in views.values():
            v.close()


def hash_blocks(recovery, seq, offsets):
    v = View(recovery, seq)
    try:
        v.connect()
        return [hashlib.sha256(v.read(off)).hexdigest()[:16] for off in offsets]
    finally:
        v.close()


# ---------------------------------------------------------------------------
# Store state.

def store_status(recovery):
    return recovery.api.get(f"/api/v1/stores/{VM}")


def oldest_seq(st):
    return max(st.get("base_seq", 0), st.get("consistent_from", 0))


def journal_dir(recovery):
    return os.path.join(recovery.dir, "data", "stores", VM, "journal")


def journal_bytes(recovery):
    """The store's history on disk: its journal and its compacted history files
    (history/, made by compaction); the index is counted apart (index_bytes)."""
    path = journal_dir(recovery)
    if not os.path.isdir(path):
        raise BenchError(f"the store's journal is not at {path}")
    history = os.path.join(os.path.dirname(path), "history")
    return rb.dir_bytes(path) + (rb.dir_bytes(history) if os.path.isdir(history) else 0)


def index_bytes(recovery):
    path = os.path.join(os.path.dirname(journal_dir(recovery)), "index")
    return rb.dir_bytes(path) if os.path.isdir(path) else 0


def wait_connected(primary, timeout_s):
    deadline = time.monotonic() + timeout_s
    while True:
        rep = primary.api.get(f"/api/v1/groups/{VM}").get("replication") or {}
        if rep.get("connected"):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"the primary's sender is not connected {timeout_s:.0f} s after "
                             f"the recovery site restarted: {rep}")
        time.sleep(0.05)


def drain(primary, recovery, bytes_hint):
    timeout_s = DRAIN_BASE_TIMEOUT_S + bytes_hint / DRAIN_SLOWEST_B_S
    drain_s, last = rb.wait_drained(primary, recovery, VM, timeout_s)
    if drain_s is None:
        raise BenchError(f"not drained {timeout_s:.0f} s after the writes (last_seq {last}, "
                         f"store {store_status(recovery)})")
    return drain_s, last


# ---------------------------------------------------------------------------
# One churn step.

def run_fio(uri, io_bytes, seed, args, out_path):
    cmd = ["fio", "--name=churn", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
           "--bs=4k", f"--iodepth={args.iodepth}", f"--io_size={io_bytes}",
           "--norandommap", "--random_generator=tausworthe64", f"--randseed={seed}",
           "--output-format=json", f"--output={out_path}"]
    timeout_s = FIO_BASE_TIMEOUT_S + io_bytes / FIO_SLOWEST_B_S
    rc, out, err = rb.run_bounded(cmd, timeout_s)
    text = read_file_text(out_path) or out
    if rc != 0:
        raise BenchError(f"fio exited {rc}: {' '.join(cmd)}\n{tail(err + text[:2000])}")
    job = parse_fio_json(text)["jobs"][0]
    if job.get("error"):
        raise BenchError(f"fio job error {job['error']}: {tail(err)}")
    w = job["write"]
    if w["io_bytes"] <= 0 or w["runtime"] <= 0:
        raise BenchError(f"fio wrote nothing measurable: {tail(err)}")
    return {"io_bytes": w["io_bytes"], "runtime_s": w["runtime"] / 1000.0,
            "mb_s": w["bw_bytes"] / MB, "iops": w["iops"],
            "clat_p99_ms": w.get("clat_ns", {}).get("percentile", {})
                           .get("99.000000", 0) / 1e6,
            "cmd": " ".join(cmd)}


def restart_to_first_read(recovery, seq, fill_seq, disk_bytes, retained_bytes):
    """SIGTERM the recovery osrd, start it again, time until a read at seq succeeds."""
    out = {"seq": seq}
    t = time.monotonic()
    rc, how = rb.stop_process(recovery.proc)
    out["stop_s"] = time.monotonic() - t
    out["stop"] = f"exit status {rc} ({how})"
    if rc != 0 or how != "SIGTERM":
        raise BenchError(f"the recovery osrd did not exit 0 on SIGTERM: {out['stop']}\n"
                         f"{recovery.log_tail()}")
    timeout_s = RESTART_BASE_TIMEOUT_S + RESTART_PER_GIB_S * retained_bytes / GIB
    t0, out["ready_s"] = recovery.start_timed(timeout_s)
    deadline = t0 + timeout_s
    tries, last_err = 0, None
    while True:
        tries += 1
        v = None
        try:
            v = View(recovery, seq)
            v.connect()
            data = v.read(0)
            out["first_read_s"] = time.monotonic() - t0
            break
        except BenchError as e:
            last_err = str(e)
            recovery.check_alive("while its store opens after a restart")
            if time.monotonic() > deadline:
                raise BenchError(f"no read at seq {seq} {timeout_s:.0f} s after the restart "
                                 f"({tries} tries): {last_err}")
            time.sleep(VIEW_RETRY_S)
        finally:
            if v is not None:
                v.close()
    out["view_tries"] = tries
    if data != bytes(BLOCK) and data[:16] != fill_block_header(0):
        raise BenchError(f"the first read after the restart (seq {seq}, offset 0) returned "
                         "neither zeros nor the fill's block 0")
    # Then the oldest point that holds data (its reads need the history), from exec too.
    v = View(recovery, fill_seq)
    try:
        v.connect()
        off = (recovery.starts * 7919 % (disk_bytes // BLOCK)) * BLOCK
        data = v.read(off)
        out["fill_seq_read_s"] = time.monotonic() - t0
    finally:
        v.close()
    if data[:16] != fill_block_header(off // BLOCK):
        raise BenchError(f"after the restart, the read at fill_seq {fill_seq} offset {off} did "
                         "not return the block the fill wrote there")
    out.update({f"after_{k}": v for k, v in memory_mb(recovery.proc.pid).items()})
    return out


def run_step(i, size, prev_size, primary, recovery, uri, state, args, root):
    step = {"size_bytes": size}
    need = 2 * (size - prev_size) + FREE_MARGIN_BYTES
    if free_bytes(root) < need:
        raise BenchError(f"only {human_bytes(free_bytes(root))} free under {root}; the "
                         f"{human_bytes(size)} step needs about {human_bytes(need)}")
    rb.sync_fs(root)
    log(f"[{human_bytes(size)}] fio randwrite bs=4k iodepth={args.iodepth}: "
        f"{human_bytes(size - prev_size)} ...")
    sampler = rb.RpoSampler(primary, recovery, VM, time.time_ns())
    sampler.start()
    try:
        fio = run_fio(uri, size - prev_size, 1000 + i, args,
                      os.path.join(root, f"fio-step{i}.json"))
    finally:
        sampler.stop_event.set()
        sampler.join(timeout=rb.HTTP_TIMEOUT_S * 2 + 1)
    step["fio"] = fio
    rpos = [s[3] for s in sampler.samples]
    step["rpo_p99_s"] = percentile(rpos, 99) if rpos else None
    step["rpo_max_s"] = max(rpos) if rpos else None
    step["drain_s"], step["seq"] = drain(primary, recovery, fio["io_bytes"])
    state["fio_bytes"] += fio["io_bytes"]
    state["step_fio_bytes"].append(fio["io_bytes"])
    log(f"[{human_bytes(size)}] fio {fio['iops']:.0f} IOPS ({fio['mb_s']:.1f} MB/s), RPO p99 "
        f"{fmt(step['rpo_p99_s'])} s max {fmt(step['rpo_max_s'])} s, drained "
        f"{step['drain_s']:.1f} s after fio; seq {step['seq']}")

    st = store_status(recovery)
    step["durable_seq"] = st["durable_seq"]
    step["oldest_seq"] = oldest_seq(st)
    step["base_seq"] = st.get("base_seq")
    step["fio_bytes_total"] = state["fio_bytes"]
    step["written_bytes"] = state["fill_bytes"] + state["fio_bytes"]
    # (a) memory, then (d) the journal on disk.
    step.update(memory_mb(recovery.proc.pid))
    step["journal_bytes"] = journal_bytes(recovery)
    step["journal_per_written"] = step["journal_bytes"] / step["written_bytes"]
    log(f"[{human_bytes(size)}] recovery osrd RSS {step['rss_mb']:.1f} MB (anon "
        f"{step['rss_anon_mb']:.1f}, HWM {step['hwm_mb']:.1f}); journal "
        f"{human_bytes(step['journal_bytes'])} for {human_bytes(step['written_bytes'])} written")
    # (c) read latency at the newest point and at fill_seq.
    rng = random.Random(7)
    offsets = [rng.randrange(args.disk // BLOCK) * BLOCK for _ in range(args.reads)]
    try:
        step["reads"] = read_latencies(recovery, st["durable_seq"], state["fill_seq"],
                                       offsets)
        r = step["reads"]
        log(f"[{human_bytes(size)}] 4 KiB reads: newest p50 {r['newest']['p50_ms']:.3f} "
            f"p99 {r['newest']['p99_ms']:.3f} ms; oldest (fill_seq) p50 "
            f"{r['oldest']['p50_ms']:.3f} p99 {r['oldest']['p99_ms']:.3f} ms")
    except BenchError as e:
        step["reads_error"] = str(e)
        log(f"[{human_bytes(size)}] reads failed: {e}")
    # (b) restart to first read at the oldest seq.
    log(f"[{human_bytes(size)}] restarting the recovery site ...")
    try:
        step["restart"] = restart_to_first_read(recovery, step["oldest_seq"],
                                                state["fill_seq"], args.disk,
                                                step["written_bytes"])
        rs = step["restart"]
        log(f"[{human_bytes(size)}] restart: stop {rs['stop_s']:.2f} s; from exec: ready "
            f"{rs['ready_s']:.2f} s, first read at seq {rs['seq']} {rs['first_read_s']:.2f} s, "
            f"then at fill_seq {rs['fill_seq_read_s']:.2f} s; "
            f"RSS after {rs['after_rss_mb']:.1f} MB, HWM {rs['after_hwm_mb']:.1f} MB")
    except BenchError as e:
        step["restart_error"] = str(e)
        log(f"[{human_bytes(size)}] restart failed: {e}")
    if not recovery.alive():
        raise BenchError(f"the recovery site is down after the restart\n{recovery.log_tail()}")
    wait_connected(primary, CONNECT_TIMEOUT_S)
    return step


# ---------------------------------------------------------------------------
# Compaction.

def distinct_bytes(disk_bytes, step_bytes):
    """The fill plus, per step of uniform 4 KiB writes, the expected distinct blocks."""
    n_blocks = disk_bytes // BLOCK
    total = disk_bytes
    for b in step_bytes:
        n = b // BLOCK
        total += n_blocks * -math.expm1(n * math.log1p(-1.0 / n_blocks)) * BLOCK
    return int(total)


def has_compact_route(recovery):
    routes = recovery.api.get("/api/v1/routes") or []
    return any("/compact" in r.get("pattern", "") for r in routes if isinstance(r, dict))


def bench_compaction(recovery, keep, through, state, args):
    out = {"keep": keep, "through": through}
    out["journal_before_bytes"] = journal_bytes(recovery)
    out["raw_churn_bytes"] = state["fill_bytes"] + state["fio_bytes"]
    out["distinct_bytes"] = distinct_bytes(args.disk, state["step_fio_bytes"])
    body = {"keep": keep, "through": through}
    if not has_compact_route(recovery):
        # Ask all the same, so the report says what the site answered.
        try:
            recovery.api.call("POST", f"/api/v1/stores/{VM}/compact", body,
                              expect=(200, 202, 204))
        except BenchError as e:
            m = re.search(r"answered (\d+)", str(e))
            raise BenchError("not measured: the site has no compact route "
                             f"({m.group(1) if m else e})")
        raise BenchError("POST .../compact answered although /api/v1/routes does not list "
                         "it: not measured")
    rng = random.Random(11)
    offsets = [rng.randrange(args.disk // BLOCK) * BLOCK for _ in range(HASH_SAMPLES)]
    before = {seq: hash_blocks(recovery, seq, offsets) for seq in keep}
    log(f"[compaction] journal {human_bytes(out['journal_before_bytes'])}; POST compact keep "
        f"{keep} through {through} ...")
    t0 = time.monotonic()
    try:
        # Answered 202 at once: the site runs it on its maintenance thread; its state is
        # in GET /stores/VM ("compaction") until it is done or failed.
        recovery.api.call("POST", f"/api/v1/stores/{VM}/compact", body, expect=(202,))
    except BenchError as e:
        if "answered 404" in str(e):
            raise BenchError("not measured: the site has no compact route (404)")
        raise
    doc = None
    while time.monotonic() - t0 < COMPACT_TIMEOUT_S:
        doc = recovery.api.call("GET", f"/api/v1/stores/{VM}").get("compaction")
        if isinstance(doc, dict) and doc.get("state") in ("done", "failed"):
            break
        time.sleep(0.2)
    if not isinstance(doc, dict) or doc.get("state") != "done":
        raise BenchError(f"the compaction did not finish within {COMPACT_TIMEOUT_S} s: {doc}")
    out["compact_s"] = time.monotonic() - t0
    out["answer"] = doc
    rb.sync_fs(journal_dir(recovery))
    out["journal_after_bytes"] = journal_bytes(recovery)
    changed = []
    for seq in keep:
        after = hash_blocks(recovery, seq, offsets)
        diff = sum(1 for a, b in zip(before[seq], after) if a != b)
        if diff:
            changed.append(f"seq {seq}: {diff} of {len(offsets)} blocks differ")
    if changed:
        raise BenchError("compaction changed what kept points read: " + "; ".join(changed))
    out["checked_blocks"] = len(offsets) * len(keep)
    log(f"[compaction] {out['compact_s']:.1f} s: journal "
        f"{human_bytes(out['journal_before_bytes'])} -> {human_bytes(out['journal_after_bytes'])}"
        f" (raw churn {human_bytes(out['raw_churn_bytes'])}); kept points read the same")
    return out


# ---------------------------------------------------------------------------
# Report.

def goals(res, args):
    rows = []
    steps = [s for s in res.get("steps", []) if "rss_mb" in s]
    if steps:
        first, last = steps[0], max(steps, key=lambda s: s["size_bytes"])
        ratio = last["rss_mb"] / first["rss_mb"]
        ok = len(steps) >= 2 and ratio <= GOAL_RSS_RATIO
        rows.append((f"recovery RSS at {human_bytes(last['size_bytes'])} / at "
                     f"{human_bytes(first['size_bytes'])}",
                     f"{last['rss_mb']:.0f} / {first['rss_mb']:.0f} MB = {ratio:.2f}x",
                     f"<= {GOAL_RSS_RATIO}x", "PASS" if ok else "FAIL"))
    else:
        rows.append(("recovery RSS, largest / smallest churn", "no result",
                     f"<= {GOAL_RSS_RATIO}x", "FAIL"))
    rs = [(s["size_bytes"], s["restart"]["first_read_s"]) for s in res.get("steps", [])
          if "restart" in s]
    n_steps = len(args.sizes)
    worst = max((t for _, t in rs), default=None)
    ok = len(rs) == n_steps and worst is not None and worst <= GOAL_RESTART_S
    rows.append(("restart to first read at the oldest seq, every size",
                 "no result" if worst is None else
                 "max " + fmt(worst) + " s (" + ", ".join(fmt(t) for _, t in rs) + ")",
                 f"<= {GOAL_RESTART_S:.0f} s", "PASS" if ok else "FAIL"))
    ratios = []
    for s in res.get("steps", []):
        r = s.get("reads")
        if r:
            ratios.append((s["size_bytes"], r["oldest"]["p50_ms"] / r["newest"]["p50_ms"],
                           r["oldest"]["p99_ms"] / r["newest"]["p99_ms"]))
    worst = max((max(a, b) for _, a, b in ratios), default=None)
    ok = len(ratios) == n_steps and worst is not None and worst <= GOAL_READ_RATIO
    rows.append(("4 KiB read oldest / newest (p50, p99), every size",
                 "no result" if worst is None else
                 ", ".join(f"{a:.2f}x {b:.2f}x" for _, a, b in ratios),
                 f"<= {GOAL_READ_RATIO:.0f}x", "PASS" if ok else "FAIL"))
    c = res.get("compaction", {})
    if "journal_after_bytes" in c:
        ok = c["journal_after_bytes"] <= GOAL_COMPACT_SLACK * c["distinct_bytes"]
        rows.append(("journal after compaction / distinct data per kept point",
                     f"{human_bytes(c['journal_after_bytes'])} / "
                     f"{human_bytes(c['distinct_bytes'])} = "
                     f"{c['journal_after_bytes'] / c['distinct_bytes']:.2f}x",
                     f"<= {GOAL_COMPACT_SLACK}x", "PASS" if ok else "FAIL"))
    else:
        rows.append(("journal after compaction / distinct data per kept point",
                     "not measured", f"<= {GOAL_COMPACT_SLACK}x", "FAIL"))
    rows.append(("replicated 4 KiB random writes, RPO p99 <= 2 s",
                 "see replication_bench.py --bs 4k", ">= 25000 writes/s", "n/a"))
    return rows


def print_report(res, args, errors):
    print()
    print(f"osrd recovery store at scale: one {human_bytes(args.disk)} disk filled whole, then "
          f"fio randwrite bs=4k iodepth={args.iodepth} (cumulative churn "
          f"{', '.join(human_bytes(s) for s in args.sizes)}); no fold, no thinning; "
          f"127.0.0.1, {os.cpu_count()} CPUs")
    if "memory_at_start" in res:
        m = res["memory_at_start"]
        print(f"recovery osrd at start (no store): RSS {m['rss_mb']:.1f} MB, anon "
              f"{m['rss_anon_mb']:.1f} MB")
    if "fill" in res:
        f = res["fill"]
        print(f"fill: {human_bytes(f['bytes'])} in {f['write_s']:.1f} s, drained "
              f"{f['drain_s']:.1f} s later; fill_seq {f['seq']}; recovery RSS "
              f"{fmt(f.get('memory', {}).get('rss_mb'), 1)} MB; then a restart (so that "
              f"each step starts from a reopened store): first read "
              f"{fmt(f.get('restart', {}).get('first_read_s'))} s, RSS after "
              f"{fmt(f.get('restart', {}).get('after_rss_mb'), 1)} MB")
    steps = res.get("steps", [])
    if steps:
        print()
        print(f"{'churn':<10}{'fio IOPS':>9}{'MB/s':>7}{'RPO p99':>8}{'drain s':>8}"
              f"{'seq':>10}{'journal':>11}{'/written':>9}"
              f"{'RSS MB':>8}{'anon':>7}{'HWM':>7}")
        for s in steps:
            f = s["fio"]
            print(f"{human_bytes(s['size_bytes']):<10}{f['iops']:>9.0f}{f['mb_s']:>7.1f}"
                  f"{fmt(s['rpo_p99_s']):>8}{fmt(s['drain_s'], 1):>8}{s['durable_seq']:>10}"
                  f"{human_bytes(s['journal_bytes']):>11}{s['journal_per_written']:>9.2f}"
                  f"{s['rss_mb']:>8.1f}{s['rss_anon_mb']:>7.1f}{s['hwm_mb']:>7.1f}")
        print()
        print(f"{'churn':<10}{'restart: stop s':>16}{'ready s':>8}{'1st read s':>11}"
              f"{'at seq':>7}{'fill_seq s':>11}{'RSS MB':>8}{'HWM':>7}"
              f"{'newest p50/p99 ms':>19}{'oldest p50/p99 ms':>19}")
        for s in steps:
            r = s.get("restart", {})
            rd = s.get("reads", {})
            n, o = rd.get("newest", {}), rd.get("oldest", {})
            print(f"{human_bytes(s['size_bytes']):<10}{fmt(r.get('stop_s')):>16}"
                  f"{fmt(r.get('ready_s')):>8}{fmt(r.get('first_read_s')):>11}"
                  f"{str(r.get('seq', '-')):>7}{fmt(r.get('fill_seq_read_s')):>11}"
                  f"{fmt(r.get('after_rss_mb'), 1):>8}"
                  f"{fmt(r.get('after_hwm_mb'), 1):>7}"
                  f"{(fmt(n.get('p50_ms'), 3) + '/' + fmt(n.get('p99_ms'), 3)):>19}"
                  f"{(fmt(o.get('p50_ms'), 3) + '/' + fmt(o.get('p99_ms'), 3)):>19}")
    c = res.get("compaction")
    if c is not None:
        print()
        if "journal_after_bytes" in c:
            print(f"compaction (keep {c['keep']}, through {c['through']}): journal "
                  f"{human_bytes(c['journal_before_bytes'])} -> "
                  f"{human_bytes(c['journal_after_bytes'])} in {c['compact_s']:.1f} s; raw "
                  f"churn {human_bytes(c['raw_churn_bytes'])} (after / raw "
                  f"{c['journal_after_bytes'] / c['raw_churn_bytes']:.2f}), distinct data "
                  f"per kept point {human_bytes(c['distinct_bytes'])}; "
                  f"{c['checked_blocks']} block reads at kept points unchanged")
        else:
            print(f"compaction: {c.get('error', 'not measured')}")
    rows = goals(res, args)
    print()
    print(f"{'goal':<54}{'measured':>44}{'need':>20}  result")
    for what, got, need, verdict in rows:
        print(f"{what:<54}{got:>44}{need:>20}  {verdict}")
    if errors:
        print()
        for e in errors:
            print("ERROR " + "\n    ".join(e.splitlines()[:6]))
    print()
    for n in NOTES:
        print(f"note: {n}")
    return rows


# ---------------------------------------------------------------------------

def run(args, osrd, root, res, errors):
    primary = BenchSite(osrd, "primary", root)
    recovery = BenchSite(osrd, "recovery", root, fixed_ports=True,
                         index_cache=args.index_cache)
    log(f"recovery site: store_index_cache_bytes = {human_bytes(args.index_cache)}")
    sites = [primary, recovery]
    try:
        primary.start()
        recovery.start_timed(SITE_START_TIMEOUT_S)
        for s in sites:
            log(f"site {s.name}: api {s.api.host}:{s.api.port}, nbd {s.nbd}, "
                f"replication {s.replication} (pid {s.proc.pid})")
        res["memory_at_start"] = memory_mb(recovery.proc.pid)
        uri = rb.protect(primary, recovery, VM, args.disk)
        log(f"[fill] writing the whole {human_bytes(args.disk)} disk ...")
        fill_s = fill_disk(uri, args.disk)
        drain_s, fill_seq = drain(primary, recovery, args.disk)
        res["fill"] = {"bytes": args.disk, "write_s": fill_s, "drain_s": drain_s,
                       "seq": fill_seq}
        state = {"fill_seq": fill_seq, "fill_bytes": args.disk, "fio_bytes": 0,
                 "step_fio_bytes": []}
        log(f"[fill] done in {fill_s:.1f} s (+{drain_s:.1f} s drain): fill_seq {fill_seq}")
        # Restart once now, so that every step's figures are of a process that reopened
        # the store and then took only churn (not the fill's transient memory).
        res["fill"]["memory"] = memory_mb(recovery.proc.pid)
        res["fill"]["restart"] = restart_to_first_read(
            recovery, oldest_seq(store_status(recovery)), fill_seq, args.disk, args.disk)
        wait_connected(primary, CONNECT_TIMEOUT_S)
        log(f"[fill] RSS {res['fill']['memory']['rss_mb']:.1f} MB; restart to first read "
            f"{res['fill']['restart']['first_read_s']:.2f} s, RSS after "
            f"{res['fill']['restart']['after_rss_mb']:.1f} MB")
        res["steps"] = []
        prev = 0
        for i, size in enumerate(args.sizes):
            step = run_step(i, size, prev, primary, recovery, uri, state, args, root)
            res["steps"].append(step)
            for k in ("reads_error", "restart_error"):
                if k in step:
                    errors.append(f"{human_bytes(size)}: {step[k]}")
            prev = size
        keep = [fill_seq] + [s["durable_seq"] for s in res["steps"]]
        keep = sorted(set(keep))
        try:
            res["compaction"] = bench_compaction(recovery, keep, keep[-1], state, args)
        except BenchError as e:
            res["compaction"] = {"error": str(e)}
            errors.append(f"compaction: {e}")
            log(f"compaction: {e}")
    finally:
        for s in reversed(sites):
            if s.proc is not None:
                s.stop()
                log(f"site {s.name} stopped: {s.exit_note}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--osrd", default=os.environ.get(
        "OSRD", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                             "build", "osrd")),
        help="osrd binary (default $OSRD or <repo>/build/osrd)")
    p.add_argument("--dir", default="/var/tmp",
                   help="parent of the work dir (a mkdtemp inside it; default /var/tmp)")
    p.add_argument("--sizes", type=lambda s: [parse_size(x) for x in s.split(",") if x],
                   default=None, help="cumulative retained churn sizes (default 1G,4G,16G)")
    p.add_argument("--large", action="store_true", help="also 64G")
    p.add_argument("--quick", action="store_true", help="sizes 64M,256M,1G (development)")
    p.add_argument("--disk", type=parse_size, default=2 << 30,
                   help="size of the primary's disk (default 2G: the churn overwrites)")
    p.add_argument("--iodepth", type=int, default=16, help="fio iodepth (default 16)")
    p.add_argument("--index-cache", type=parse_size, default=16 << 20,
                   help="the recovery site's store_index_cache_bytes (default 16M: full "
                        "already at the smallest churn, so the RSS ratio compares like with "
                        "like)")
    p.add_argument("--reads", type=int, default=2000,
                   help="4 KiB reads per point for the latency figures (default 2000)")
    p.add_argument("--json", help="write the results to this file")
    p.add_argument("--strict", action="store_true", help="exit 1 when a goal fails")
    p.add_argument("--keep", action="store_true",
                   help="keep the work dir (site data, logs, fio output)")
    args = p.parse_args()

    if args.sizes is None:
        args.sizes = list(QUICK_SIZES if args.quick else DEFAULT_SIZES)
        if args.large:
            args.sizes.append(LARGE_SIZE)
    elif args.quick or args.large:
        p.error("--sizes replaces --quick and --large")
    args.sizes = sorted(set(args.sizes))
    if not args.sizes or any(s < 4 * MIB or s % BLOCK for s in args.sizes):
        p.error("--sizes: multiples of 4 KiB, at least 4M each")
    if args.disk < 64 * MIB or args.disk % MIB:
        p.error("--disk must be a multiple of 1 MiB and at least 64M")
    if not 1 <= args.iodepth <= 256 or not 10 <= args.reads <= 1000000:
        p.error("--iodepth 1..256, --reads 10..1000000")

    osrd = os.path.abspath(args.osrd)
    need = 2 * max(args.sizes) + 3 * args.disk + FREE_MARGIN_BYTES
    try:
        if not (os.path.isfile(osrd) and os.access(osrd, os.X_OK)):
            raise BenchError(f"osrd binary not found or not executable at {osrd}; build "
                             "it first (make) or pass --osrd PATH")
        if not shutil.which("fio"):
            raise BenchError("fio is missing (Debian package fio)")
        rc, out, _ = rb.run_bounded(["fio", "--enghelp=nbd"], rb.TOOL_TIMEOUT_S)
        if rc != 0 or "uri" not in out:
            raise BenchError("fio has no nbd engine: install Debian's fio (libnbd)")
        if nbd is None:
            raise BenchError("python3-libnbd is missing: run with Debian's /usr/bin/python3 "
                             "(scripts/bootstrap installs it)")
        os.makedirs(args.dir, exist_ok=True)
        if free_bytes(args.dir) < need:
            raise BenchError(f"{args.dir} has {human_bytes(free_bytes(args.dir))} free; this "
                             f"run needs about {human_bytes(need)} (2 x the largest churn "
                             f"{human_bytes(max(args.sizes))} + 3 x the disk + 2 GiB): use "
                             "smaller --sizes or another --dir")
    except BenchError as e:
        log(f"store_scale: {e}")
        return 2

    root = tempfile.mkdtemp(prefix="osrd-store-scale.", dir=args.dir)
    signal.signal(signal.SIGTERM, raise_interrupt)
    res, errors = {}, []
    failed = None
    started = time.time()
    load_start = os.getloadavg()
    try:
        log(f"store_scale: work dir {root}; churn {', '.join(human_bytes(s) for s in args.sizes)}"
            f" on a {human_bytes(args.disk)} disk; {human_bytes(free_bytes(args.dir))} free, "
            f"about {human_bytes(need)} needed")
        run(args, osrd, root, res, errors)
    except BenchError as e:
        log(f"store_scale: {e}")
        failed = str(e)
    except KeyboardInterrupt:
        log("store_scale: interrupted")
        failed = "interrupted"
    finally:
        if args.keep:
            log(f"store_scale: kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    if failed:
        errors.append(f"run: {failed}")
    rows = print_report(res, args, errors)
    print(f"load average at start {load_start[0]:.2f}, at end {os.getloadavg()[0]:.2f} "
          "(other work on the machine skews results)")
    if args.json:
        doc = {"started_unix": started, "osrd": osrd, "disk_bytes": args.disk,
               "sizes": args.sizes, "iodepth": args.iodepth, "reads": args.reads,
               "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
               "results": res,
               "goals": [{"goal": w, "measured": g, "need": n, "result": v}
                         for w, g, n, v in rows],
               "errors": errors, "notes": NOTES}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        log(f"store_scale: results written to {args.json}")
    if errors:
        return 1
    if args.strict and any(v == "FAIL" for _, _, _, v in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
