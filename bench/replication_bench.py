#!/usr/bin/python3
"""Benchmark osrd continuous replication (two `osrd site` daemons), in one run.

Part 1, sustained replicated churn. Two sites on 127.0.0.1, `primary` and
`recovery`, in a temp dir. For every fio target rate (--rates, default
50m,100m,200m,300m,max):
  unprotected  a fresh group vm0 at the primary (capture on, no replication);
               fio writes to nbd://.../vm0/d0; its MB/s is the baseline.
  protected    a fresh store vm1 at the recovery site, a fresh group vm1 at the
               primary (same disk), PUT .../groups/vm1/replication to the
               recovery site's replication address; fio writes to vm1/d0.
               Every 100 ms while fio runs: GET primary /api/v1/groups/vm1
               (last_seq) and recovery /api/v1/stores/vm1 (durable_seq,
               durable_time_ns); RPO sample = 0 if durable_seq >= last_seq,
               else (now_ns - durable_time_ns) / 1e9. After fio exits: the
               drain time, until durable_seq reaches the final last_seq.
  fio: nbd engine (libnbd), rw=randwrite bs=1M iodepth=8, --rate=NNm (fio's m
  is MiB: 200m = 209.7 MB/s), time_based, 15 s runs + 2 s ramp. The `max`
  rate has no --rate; it is not time_based but ends at the runtime or at an
  --io_size cap, whichever comes first (the cap keeps the bytes written under
  --max-written; see below). Groups and stores are deleted after each run, so
  every run starts from empty disks, an empty capture log and an empty journal.
  Bar: the highest rate where fio achieved >= 200 MB/s (10^6 bytes) with RPO
  p99 <= 2 s; PASS when there is one.

Part 1 at small block sizes (--bs 4k, or --bs 1M,4k for both in one run). For every
fio write rate (--iops, default 5000,10000,25000,40000,max: fio --rate_iops, writes/s)
the same protected run as above with bs=4k, iodepth=16 (--small-iodepth), 10 s runs
(--small-runtime) + the ramp; the unprotected baseline runs once, at max (what capture
alone takes: the ceiling of every protected rate). Reported: fio's writes/s and MB/s,
RPO p50/p99/max, the drain time, and the write rate that became durable at the
recovery site while fio ran. Bar: the highest write rate with RPO p99 <= 2 s; PASS when
it is >= 25 000 writes/s (ten times Azure Site Recovery's high-churn limit at small
IOs). A rate-limited run counts at its target when fio reached 99% of it (fio's rate
limiting lands a hair under: 24 997/s for 25 000/s); max counts at what fio reached.

Part 2, time to open a view. Stores (and replicated groups) with one 1 GiB and
one 100 GiB sparse disk; a little data is written at the primary (4 KiB at
offset 0, 1 MiB at the end) and replicated (durable_seq >= 1). Then, 5 times,
alternating the sizes: POST /api/v1/stores/NAME/views {"seq": durable_seq}
until the answer (open), and until the first 4 KiB read of the view's disk
through NBD succeeds (open + read; python3-libnbd in this process, or qemu-io
when libnbd is missing, which then includes qemu-io's start-up); the bytes are
checked; DELETE the view. Medians per size and their ratio. Bar: the same time
regardless of disk size: median open+read of 100 GiB <= 1.5x that of 1 GiB,
or at most 2 ms apart (a millisecond-scale time on a shared 2-CPU machine).

Disk space: a protected run keeps everything fio wrote in the recovery journal
and, while replication lags, in the primary's capture log; an unprotected
group's capture log is never trimmed. Both are deleted after each run, so the
peak is about 2 x one run's bytes + the disk; the start checks free space for
that. --max-written bounds the sum over all runs of what fio writes: rate-limited
runs write rate x (runtime + ramp); a `max` run of a small block size is capped at
100 000 writes/s x (runtime + ramp) (4.9 GB at 4k, 12 s: never reached here); what is
left is split among the other `max` runs as their --io_size cap. Default: 40G plus
what the small block sizes' runs write (so adding --bs 4k leaves the 1M runs as they
were).

Replication runs over plain TCP unless --tls (then a throwaway CA and one
certificate per site are made with the openssl CLI, as the quickstart does).
fio writes its default random (incompressible) buffers unless --compress-pct;
--compression lz4|none is sent with PUT .../replication (default: not sent, so
the site's default applies).

Exit status: 0 when every measurement ran (bars print PASS/FAIL but do not fail
the run unless --strict), 1 when a measurement failed (or a bar failed with
--strict), 2 on bad usage, a missing tool or too little disk space.

Run: /usr/bin/python3 bench/replication_bench.py --osrd build/osrd [--quick]
     [--rates 50m,100m,200m,300m,max] [--bs 1M,4k] [--iops 5000,10000,25000,40000,max]
     [--small-iodepth 16] [--small-runtime 10] [--size 4G] [--dir /var/tmp] [--tls]
     [--compression lz4|none] [--compress-pct N] [--parts churn,views]
     [--json FILE] [--strict] [--keep]
"""

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import benchlib  # noqa: E402
from benchlib import (BenchError, free_bytes, log, parse_fio_json,  # noqa: E402
                      raise_interrupt, read_file_text, tail)

try:
    import nbd  # python3-libnbd (Debian's /usr/bin/python3)
except ImportError:
    nbd = None

# ---------------------------------------------------------------------------
# Limits (every wait in this script is bounded by one of these).

SITE_START_TIMEOUT_S = 30.0
SITE_STOP_TERM_TIMEOUT_S = 20.0     # after SIGTERM, before SIGKILL
SITE_STOP_KILL_TIMEOUT_S = 5.0      # after SIGKILL
HTTP_TIMEOUT_S = 10.0               # one API request
DELETE_TIMEOUT_S = 120.0            # DELETE of a group/store removes GBs of files
CONNECT_TIMEOUT_S = 30.0            # replication sender connected
CLIENT_SLACK_TIMEOUT_S = 90.0       # fio: ramp + runtime + this
DRAIN_TIMEOUT_DEFAULT_S = 300.0     # after fio, until durable_seq == last_seq
SMALL_WRITE_TIMEOUT_S = 60.0        # part 2: write + replicate a little data
NBD_IO_TIMEOUT_S = 10.0             # one libnbd connect or request
QEMU_IO_TIMEOUT_S = 30.0
SYNC_TIMEOUT_S = 300.0
TOOL_TIMEOUT_S = 30.0
SAMPLE_INTERVAL_S = 0.1
DRAIN_POLL_S = 0.02
FREE_MARGIN_BYTES = 2 << 30

MB = 1000 * 1000
MIB = 1 << 20
GIB = 1 << 30

BAR_MB_S = 200.0
BAR_RPO_P99_S = 2.0
BAR_VIEW_RATIO = 1.5
BAR_VIEW_SLACK_MS = 2.0
BAR_SMALL_WRITES_S = 25000.0        # replicated 4 KiB random writes per disk
SMALL_BS_LIMIT = 64 << 10           # below it, rates are writes/s (--iops)
SMALL_MAX_WRITES_S = 100000         # a small-block max run's io_size cap, per second
MAX_WRITTEN_DEFAULT_BYTES = 40 * 10**9

NOTES = [
    "fio --rate=NNm is MiB/s (200m = 209.7 MB/s); MB/s columns are 10^6 bytes/s "
    "over fio's measured time (after the ramp).",
    "'unprotected' is a group without replication: capture (image + capture log) "
    "is still on, so protected/unprotected is the cost of shipping, not of capture.",
    "RPO samples cover fio's whole lifetime (ramp included), every 100 ms; the API "
    "reads of primary and recovery are not atomic (last_seq is read first). While the "
    "store has no write yet (durable_time_ns 0) a lagging sample counts from fio's start.",
    "Each run starts on fresh sparse disks: fio's writes also allocate image blocks.",
    "repl MB/s 'in fio': durable at the recovery site by fio's end (records x bs) / "
    "fio's time; 'all': bytes shipped / (fio's time + drain); repl writes/s likewise in "
    "records. CPU p+r: primary + recovery daemon CPU seconds over the protected run and "
    "its drain.",
    "fio reuses its iodepth buffers: at 4k, records close together repeat and LZ4 finds "
    "them (see the wire/record ratio); --compress-pct 0 refills every buffer with random "
    "bytes (incompressible, and more fio CPU).",
]


def parse_size(text):
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 256M, 4G)")
    shift = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]
    return int(m.group(1)) << shift


def parse_rates(text):
    """'50m,100m,max' -> [(label, bytes per s or None, None)], in the given order."""
    rates = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part in ("max", "unlimited", "0"):
            rates.append(("max", None, None))
            continue
        m = re.fullmatch(r"(\d+)m?", part)
        if not m or int(m.group(1)) <= 0:
            raise argparse.ArgumentTypeError(
                f"bad rate {part!r}: give NNm (fio MiB/s) or max")
        rates.append((f"{int(m.group(1))}m", int(m.group(1)) * MIB, None))
    return check_rates(rates)


def parse_iops(text):
    """'5000,10k,max' -> [(label, None, writes per s or None)] (bytes/s follow from
    the block size: with_bs)."""
    rates = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part in ("max", "unlimited", "0"):
            rates.append(("max", None, None))
            continue
        m = re.fullmatch(r"(\d+)(k?)", part)
        if not m or int(m.group(1)) <= 0:
            raise argparse.ArgumentTypeError(
                f"bad rate {part!r}: give writes/s (5000, 25k) or max")
        n = int(m.group(1)) * (1000 if m.group(2) else 1)
        rates.append((f"{n}/s", None, n))
    return check_rates(rates)


def check_rates(rates):
    if not rates:
        raise argparse.ArgumentTypeError("no rates")
    labels = [r[0] for r in rates]
    if len(set(labels)) != len(labels):
        raise argparse.ArgumentTypeError("a rate is given twice")
    return rates


def parse_bs_list(text):
    """'1M,4k' -> [bytes, ...] (each a multiple of 512, 512 B .. 16 MiB, once)."""
    out = []
    for part in text.split(","):
        if not part.strip():
            continue
        n = parse_size(part)
        if n < 512 or n > 16 * MIB or n % 512:
            raise argparse.ArgumentTypeError(
                f"bad block size {part!r}: a multiple of 512 from 512 to 16M")
        if n in out:
            raise argparse.ArgumentTypeError(f"block size {part!r} is given twice")
        out.append(n)
    if not out:
        raise argparse.ArgumentTypeError("no block size")
    return out


def bs_label(bs):
    """4096 -> '4k', 1 MiB -> '1M' (fio's spelling)."""
    for unit, shift in (("G", 30), ("M", 20), ("k", 10)):
        if bs % (1 << shift) == 0:
            return f"{bs >> shift}{unit}"
    return str(bs)


def is_small(bs):
    """Block sizes whose rates are writes/s (--iops) and whose bar is a write rate."""
    return bs < SMALL_BS_LIMIT


def make_series(args):
    """One series of churn runs per block size: its rates, queue depth and times."""
    out = []
    for bs in args.bs:
        small = is_small(bs)
        rates = ([(label, iops * bs if iops else None, iops) for label, _, iops in args.iops]
                 if small else args.rates)
        out.append(argparse.Namespace(
            bs=bs, label=bs_label(bs), small=small, rates=rates,
            iodepth=args.small_iodepth if small else args.iodepth,
            runtime=args.small_runtime if small else args.runtime,
            ramp_time=args.small_ramp_time if small else args.ramp_time,
            # The unprotected baseline of a small block size runs at max only: what
            # capture alone can take, the ceiling of every protected rate.
            unprotected={r[0] for r in rates if args.unprotected and
                         (not small or r[2] is None)},
            key="churn" if bs == MIB else f"churn_{bs_label(bs)}"))
    return out


def human_bytes(n):
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.0f} {unit}" if n % (1 << shift) == 0 else f"{v:.1f} {unit}"
    return f"{n} B"


def percentile(values, q):
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))
    return s[k]


def process_cpu_s(pid):
    """User + system CPU seconds of pid (all threads), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


# ---------------------------------------------------------------------------
# Bounded process handling.

def stop_process(proc, term_timeout_s=SITE_STOP_TERM_TIMEOUT_S):
    return benchlib.stop_process(proc, term_timeout_s, SITE_STOP_KILL_TIMEOUT_S)


def run_bounded(cmd, timeout_s):
    """Runs cmd in its own process group; kills that group on timeout.

    Returns (returncode, stdout text, stderr text). Raises BenchError on timeout.
    """
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out_f,
                                stderr=err_f, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise BenchError(f"timed out after {timeout_s:.0f} s: {' '.join(cmd)}")
        except BaseException:
            _kill_group(proc)  # interrupted: do not leave the client running
            raise
        out_f.seek(0)
        err_f.seek(0)
        return (rc, out_f.read().decode(errors="replace"),
                err_f.read().decode(errors="replace"))


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=SITE_STOP_KILL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass


def sync_fs(path):
    """syncfs of the file system holding path (outside measured time)."""
    try:
        rc, _, err = run_bounded(["sync", "-f", path], SYNC_TIMEOUT_S)
        if rc != 0:
            log(f"warning: sync -f {path} failed: {tail(err, 3)}")
    except BenchError as e:
        log(f"warning: {e}")


# ---------------------------------------------------------------------------
# Site API.

class Api:
    """JSON over HTTP to one site; a fresh connection per request (no retries,
    so a POST is never sent twice)."""

    def __init__(self, host, port, label):
        self.host, self.port, self.label = host, port, label

    def call(self, method, path, body=None, expect=(200,), timeout=HTTP_TIMEOUT_S):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise BenchError(f"{self.label}: {method} {path}: {e!r}")
        finally:
            conn.close()
        if resp.status not in expect:
            raise BenchError(f"{self.label}: {method} {path} answered {resp.status}: "
                             f"{raw[:500].decode(errors='replace')}")
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise BenchError(f"{self.label}: {method} {path}: not JSON: {raw[:200]!r}")

    def get(self, path):
        return self.call("GET", path)


# ---------------------------------------------------------------------------
# Sites.

def make_certs(tls_dir):
    """A throwaway CA and a certificate per site (P-256, like the quickstart's)."""
    os.makedirs(tls_dir)
    ossl = shutil.which("openssl")
    if not ossl:
        raise BenchError("--tls needs the openssl command (Debian package openssl)")
    ext = os.path.join(tls_dir, "site.ext")
    with open(ext, "w") as f:
        f.write("basicConstraints=critical,CA:FALSE\n"
                "extendedKeyUsage=serverAuth,clientAuth\n")
    ca_key, ca_pem = os.path.join(tls_dir, "ca.key"), os.path.join(tls_dir, "ca.pem")
    steps = [[ossl, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
              "-out", ca_key],
             [ossl, "req", "-x509", "-new", "-key", ca_key, "-days", "2",
              "-subj", "/O=osr bench/CN=osr bench CA",
              "-addext", "basicConstraints=critical,CA:TRUE", "-out", ca_pem]]
    files = {}
    for name in ("primary", "recovery"):
        key, csr, pem = (os.path.join(tls_dir, f"{name}.{x}") for x in ("key", "csr", "pem"))
        steps += [[ossl, "genpkey", "-algorithm", "EC", "-pkeyopt",
                   "ec_paramgen_curve:P-256", "-out", key],
                  [ossl, "req", "-new", "-key", key, "-subj", f"/O=osr bench/CN={name}",
                   "-out", csr],
                  [ossl, "x509", "-req", "-in", csr, "-CA", ca_pem, "-CAkey", ca_key,
                   "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", pem]]
        files[name] = {"tls_ca": ca_pem, "tls_cert": pem, "tls_key": key}
    for cmd in steps:
        rc, out, err = run_bounded(cmd, TOOL_TIMEOUT_S)
        if rc != 0:
            raise BenchError(f"{' '.join(cmd)} failed: {tail(out + err, 5)}")
    return files


def toml_str(s):
    return json.dumps(s)  # a JSON string is a valid TOML basic string for these values


class Site:
    def __init__(self, osrd, name, root, tls_files=None):
        self.osrd, self.name = osrd, name
        self.dir = os.path.join(root, name)
        os.makedirs(self.dir)
        self.config = os.path.join(self.dir, "site.toml")
        self.stdout_path = os.path.join(self.dir, "stdout.log")
        self.stderr_path = os.path.join(self.dir, "stderr.log")
        lines = [f"name = {toml_str(name)}",
                 f"data_dir = {toml_str(os.path.join(self.dir, 'data'))}",
                 'nbd_listen = "127.0.0.1:0"',
                 'replication_listen = "127.0.0.1:0"',
                 'api_listen = "127.0.0.1:0"',
                 # The bench speaks plain HTTP to the site API (on loopback), also
                 # with --tls (which is for replication).
                 'api_insecure = true']
        for k, v in (tls_files or {}).items():
            lines.append(f"{k} = {toml_str(v)}")
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.proc = None
        self.api = None
        self.nbd = None
        self.replication = None
        self.exit_note = None

    def start(self):
        cmd = [self.osrd, "site", "--config", self.config]
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, start_new_session=True)
        deadline = time.monotonic() + SITE_START_TIMEOUT_S
        while time.monotonic() < deadline:
            text = read_file_text(self.stdout_path)
            if re.search(r"^osrd: ready$", text, re.M):
                api = re.search(r"^osrd: api on http://([0-9.]+):(\d+)/api/v1$", text, re.M)
                nbd_m = re.search(r"^osrd: nbd on ([0-9.]+:\d+)$", text, re.M)
                repl = re.search(r"^osrd: replication on ([0-9.]+:\d+)$", text, re.M)
                if not (api and nbd_m and repl):
                    raise BenchError(f"site {self.name}: ready, but its addresses are not "
                                     f"in its output:\n{tail(text)}")
                self.api = Api(api.group(1), int(api.group(2)), f"site {self.name}")
                self.nbd = nbd_m.group(1)
                self.replication = repl.group(1)
                return
            if self.proc.poll() is not None:
                raise BenchError(f"site {self.name} exited with status "
                                 f"{self.proc.returncode} while starting: {' '.join(cmd)}\n"
                                 f"{self.log_tail()}")
            time.sleep(0.05)
        raise BenchError(f"site {self.name} not ready after {SITE_START_TIMEOUT_S:.0f} s: "
                         f"{' '.join(cmd)}\n{self.log_tail()}")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self, what):
        if not self.alive():
            raise BenchError(f"site {self.name} exited with status {self.proc.returncode} "
                             f"({what})\n{self.log_tail()}")

    def cpu_s(self):
        return process_cpu_s(self.proc.pid) if self.alive() else None

    def stop(self):
        if self.proc is None:
            return
        rc, how = stop_process(self.proc)
        self.exit_note = f"exit status {rc} ({how})"
        if rc != 0 or how != "SIGTERM":
            log(f"warning: site {self.name} did not exit 0 on SIGTERM: {self.exit_note}\n"
                f"{self.log_tail()}")

    def log_tail(self):
        parts = []
        for label, path in (("stdout", self.stdout_path), ("stderr", self.stderr_path)):
            text = tail(read_file_text(path), 10)
            if text:
                parts.append(f"--- site {self.name} {label} (last lines) ---\n{text}")
        return "\n".join(parts)

    def log_mentions(self, pattern):
        return len(re.findall(pattern, read_file_text(self.stderr_path)))


def disks_body(size):
    return {"disks": [{"name": "d0", "size_bytes": size}]}


def create_group(site, vm, size):
    doc = site.api.call("PUT", f"/api/v1/groups/{vm}", disks_body(size), expect=(201,))
    return doc["disks"][0]["uri"]


def delete_group(site, vm):
    site.api.call("DELETE", f"/api/v1/groups/{vm}", expect=(204, 404),
                  timeout=DELETE_TIMEOUT_S)


def delete_store(site, vm):
    site.api.call("DELETE", f"/api/v1/stores/{vm}", expect=(204, 404),
                  timeout=DELETE_TIMEOUT_S)


def protect(primary, recovery, vm, size, compression="default"):
    """Store at recovery, group at primary, replication; waits until connected.
    compression: "default" leaves the site's default (lz4 when it pays)."""
    recovery.api.call("PUT", f"/api/v1/stores/{vm}", disks_body(size), expect=(201,))
    uri = create_group(primary, vm, size)
    primary.api.call("PUT", f"/api/v1/groups/{vm}/replication",
                     dict({"target": recovery.replication},
                          **({} if compression == "default" else {"compression": compression})),
                     expect=(204,))
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        g = primary.api.get(f"/api/v1/groups/{vm}")
        rep = g.get("replication") or {}
        if rep.get("connected"):
            return uri
        if time.monotonic() > deadline:
            raise BenchError(f"replication of {vm} not connected after "
                             f"{CONNECT_TIMEOUT_S:.0f} s: {rep}")
        time.sleep(0.05)


def unprotect(primary, recovery, vm):
    """Group first (stops its sender), then the store; both 404-tolerant."""
    errors = []
    for fn, site in ((delete_group, primary), (delete_store, recovery)):
        try:
            fn(site, vm)
        except BenchError as e:
            errors.append(str(e))
    if errors:
        raise BenchError("; ".join(errors))


# ---------------------------------------------------------------------------
# fio.

def fio_command(uri, series, rate, io_cap_bytes, args, out_path):
    _, rate_bytes, rate_iops = rate
    cmd = ["fio", "--name=churn", "--ioengine=nbd", f"--uri={uri}",
           f"--rw={args.rw}", f"--bs={series.bs}", f"--iodepth={series.iodepth}",
           f"--runtime={series.runtime}", f"--ramp_time={series.ramp_time}",
           "--randrepeat=1", "--norandommap", "--random_generator=tausworthe64",
           "--output-format=json", f"--output={out_path}"]
    if args.compress_pct is not None:
        # fio's default buffers are random (incompressible) and reused.
        cmd += [f"--buffer_compress_percentage={args.compress_pct}", "--refill_buffers"]
    if rate_iops is not None:
        cmd += ["--time_based", f"--rate_iops={rate_iops}"]
    elif rate_bytes is not None:
        cmd += ["--time_based", f"--rate={rate_bytes // MIB}m"]
    else:
        # Unlimited: ends at the runtime or after io_cap_bytes (ramp included).
        cmd += [f"--io_size={io_cap_bytes // MIB}m"]
    return cmd


def run_fio(uri, series, rate, io_cap_bytes, args, out_path):
    cmd = fio_command(uri, series, rate, io_cap_bytes, args, out_path)
    timeout_s = series.runtime + series.ramp_time + CLIENT_SLACK_TIMEOUT_S
    rc, out, err = run_bounded(cmd, timeout_s)
    text = read_file_text(out_path) or out
    if rc != 0:
        before_json = text[:text.find("{")] if "{" in text else text
        raise BenchError(f"fio exited {rc}: {' '.join(cmd)}\n{tail(err + before_json)}")
    job = parse_fio_json(text)["jobs"][0]
    if job.get("error"):
        raise BenchError(f"fio job error {job['error']}: {tail(err)}")
    w = job["write"]
    if w["runtime"] <= 0 or w["io_bytes"] <= 0:
        raise BenchError(f"fio wrote nothing measurable: {tail(err)}")
    return {"mb_s": w["bw_bytes"] / MB, "io_bytes": w["io_bytes"],
            "runtime_s": w["runtime"] / 1000.0, "iops": w["iops"],
            "clat_p99_ms": w.get("clat_ns", {}).get("percentile", {})
                           .get("99.000000", 0) / 1e6,
            "cmd": " ".join(cmd)}


# ---------------------------------------------------------------------------
# Part 1: sustained replicated churn.

class RpoSampler(threading.Thread):
    """Every SAMPLE_INTERVAL_S: last_seq at the primary, then durable_seq and
    durable_time_ns at the recovery site; the RPO sample from them."""

    def __init__(self, primary, recovery, vm, start_ns):
        super().__init__(daemon=True)
        self.p = Api(primary.api.host, primary.api.port, "primary (sampler)")
        self.r = Api(recovery.api.host, recovery.api.port, "recovery (sampler)")
        self.vm = vm
        self.start_ns = start_ns
        self.stop_event = threading.Event()
        self.samples = []   # (t since start s, last_seq, durable_seq, rpo_s)
        self.errors = []

    def run(self):
        next_t = time.monotonic()
        while not self.stop_event.is_set():
            try:
                last = self.p.get(f"/api/v1/groups/{self.vm}")["last_seq"]
                st = self.r.get(f"/api/v1/stores/{self.vm}")
                now_ns = time.time_ns()
                durable, dtime = st["durable_seq"], st["durable_time_ns"]
                if durable >= last:
                    rpo = 0.0
                else:
                    rpo = (now_ns - (dtime if dtime > 0 else self.start_ns)) / 1e9
                self.samples.append(((now_ns - self.start_ns) / 1e9, last, durable, rpo))
            except (BenchError, KeyError, TypeError) as e:
                if len(self.errors) < 5:
                    self.errors.append(str(e))
                elif len(self.errors) == 5:
                    self.errors.append("(more errors not shown)")
            next_t += SAMPLE_INTERVAL_S
            self.stop_event.wait(max(0.0, next_t - time.monotonic()))


def wait_drained(primary, recovery, vm, timeout_s):
    """Seconds until durable_seq >= the group's (final) last_seq, or None."""
    t0 = time.monotonic()
    last = primary.api.get(f"/api/v1/groups/{vm}")["last_seq"]
    while True:
        durable = recovery.api.get(f"/api/v1/stores/{vm}")["durable_seq"]
        if durable >= last:
            return time.monotonic() - t0, last
        if time.monotonic() - t0 > timeout_s:
            return None, last
        primary.check_alive("while draining")
        recovery.check_alive("while draining")
        time.sleep(DRAIN_POLL_S)


def check_space(workdir, need, what):
    free = free_bytes(workdir)
    if free < need:
        raise BenchError(f"only {human_bytes(free)} free on {workdir}, {what} needs about "
                         f"{human_bytes(need)}: not started (use a smaller --size/--runtime/"
                         "--rates, or another --dir)")


def run_bytes(series, rate, io_cap):
    """What fio may write in one run of this rate (the io_size cap for max)."""
    _, rate_bytes, _ = rate
    return io_cap if rate_bytes is None else rate_bytes * (series.runtime + series.ramp_time)


def run_unprotected(primary, series, rate, io_cap, args, workdir):
    label = f"{series.label} {rate[0]}"
    need = 2 * run_bytes(series, rate, io_cap)
    check_space(workdir, need + args.size + FREE_MARGIN_BYTES, f"{label} unprotected")
    sync_fs(workdir)
    uri = create_group(primary, "vm0", args.size)
    try:
        cpu0 = primary.cpu_s()
        log(f"[{label}] unprotected vm0: fio ...")
        res = run_fio(uri, series, rate, io_cap, args,
                      os.path.join(workdir, f"fio-{series.label}-{rate[0].replace('/', '')}-vm0.json"))
        cpu1 = primary.cpu_s()
        if cpu0 is not None and cpu1 is not None:
            res["primary_cpu_s"] = cpu1 - cpu0
        primary.check_alive("after the unprotected run")
    finally:
        delete_group(primary, "vm0")
    log(f"[{label}] unprotected: {res['mb_s']:.1f} MB/s, {res['iops']:.0f} writes/s")
    return res


def run_protected(primary, recovery, series, rate, io_cap, args, workdir):
    label = f"{series.label} {rate[0]}"
    need = 2 * run_bytes(series, rate, io_cap)
    check_space(workdir, need + args.size + FREE_MARGIN_BYTES, f"{label} protected")
    sync_fs(workdir)
    res = {}
    try:
        uri = protect(primary, recovery, "vm1", args.size, args.compression)
        cpu0 = (primary.cpu_s(), recovery.cpu_s())
        start_ns = time.time_ns()
        fio_start = time.monotonic()
        sampler = RpoSampler(primary, recovery, "vm1", start_ns)
        sampler.start()
        log(f"[{label}] protected vm1: fio ...")
        try:
            res.update(run_fio(uri, series, rate, io_cap, args,
                               os.path.join(workdir, f"fio-{series.label}-{rate[0].replace('/', '')}-vm1.json")))
        finally:
            sampler.stop_event.set()
            sampler.join(timeout=HTTP_TIMEOUT_S * 2 + 1)
        primary.check_alive("after fio")
        recovery.check_alive("after fio")
        drain_s, last_seq = wait_drained(primary, recovery, "vm1", args.drain_timeout)
        done = time.monotonic()
        cpu1 = (primary.cpu_s(), recovery.cpu_s())
        g = primary.api.get("/api/v1/groups/vm1")
        rep = g.get("replication") or {}
        rpos = [s[3] for s in sampler.samples]
        last = sampler.samples[-1] if sampler.samples else None
        res.update({
            "samples": len(rpos), "sampler_errors": sampler.errors,
            # [s since fio start, last_seq, durable_seq, rpo s] every 100 ms
            "series": [[round(t, 3), a, b, round(r, 4)] for t, a, b, r in sampler.samples],
            "rpo_p50_s": percentile(rpos, 50) if rpos else None,
            "rpo_p99_s": percentile(rpos, 99) if rpos else None,
            "rpo_max_s": max(rpos) if rpos else None,
            "lag_seqs_max": max((s[1] - s[2] for s in sampler.samples), default=None),
            "drain_s": drain_s, "last_seq": last_seq,
            "bytes_sent": rep.get("bytes_sent"), "reconnects": rep.get("reconnects"),
            "wire_bytes_sent": rep.get("wire_bytes_sent"),
            "last_error": rep.get("last_error"),
            # Shipping rate from fio's start until everything was durable.
            "repl_mb_s": (rep.get("bytes_sent", 0) / MB / (done - fio_start))
                         if drain_s is not None and rep.get("bytes_sent") else None,
            # What became durable while fio ran (one record per write of bs bytes).
            "repl_during_fio_mb_s": (last[2] * series.bs / MB / last[0])
                                    if last and last[0] > 0 else None,
            "repl_during_fio_writes_s": (last[2] / last[0]) if last and last[0] > 0 else None,
        })
        if cpu0[0] is not None and cpu1[0] is not None:
            res["primary_cpu_s"] = cpu1[0] - cpu0[0]
        if cpu0[1] is not None and cpu1[1] is not None:
            res["recovery_cpu_s"] = cpu1[1] - cpu0[1]
        res["journal_bytes"] = dir_bytes(os.path.join(recovery.dir, "data", "stores", "vm1"))
        if drain_s is None:
            res["error"] = (f"not drained within {args.drain_timeout:.0f} s after fio "
                            f"(durable_seq behind last_seq {last_seq}; {rep})")
    finally:
        unprotect(primary, recovery, "vm1")
    log(f"[{label}] protected: {res['mb_s']:.1f} MB/s, {res['iops']:.0f} writes/s, RPO p50 "
        f"{fmt_s(res['rpo_p50_s'])} p99 {fmt_s(res['rpo_p99_s'])} max "
        f"{fmt_s(res['rpo_max_s'])}, drain {fmt_s(res['drain_s'])}, {res['samples']} samples")
    return res


def dir_bytes(path):
    total = 0
    for root, _, names in os.walk(path):
        for n in names:
            try:
                total += os.stat(os.path.join(root, n)).st_blocks * 512
            except OSError:
                pass
    return total


def fmt_s(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def bench_churn(primary, recovery, series, args, plan, workdir):
    results = []
    for rate in series.rates:
        label, rate_bytes, rate_iops = rate
        io_cap = plan["max_cap_bytes_by_bs"].get(series.label) if rate_bytes is None else None
        row = {"rate": label, "bs": series.bs, "rate_bytes_per_s": rate_bytes,
               "rate_iops": rate_iops,
               "target_mb_s": rate_bytes / MB if rate_bytes else None}
        if label in series.unprotected:
            try:
                row["unprotected"] = run_unprotected(primary, series, rate, io_cap, args,
                                                     workdir)
            except BenchError as e:
                log(f"[{series.label} {label}] unprotected failed: {e}")
                row["unprotected"] = {"error": str(e)}
        try:
            row["protected"] = run_protected(primary, recovery, series, rate, io_cap, args,
                                             workdir)
        except BenchError as e:
            log(f"[{series.label} {label}] protected failed: {e}")
            row["protected"] = {"error": str(e)}
        results.append(row)
        if not (primary.alive() and recovery.alive()):
            log("a site has exited: no further rates")
            break
    return results


# ---------------------------------------------------------------------------
# Part 2: time to open a view.

def nbd_wait(h, done, deadline, what):
    while not done():
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"libnbd: {what} timed out")
        if h.aio_is_dead() or h.aio_is_closed():
            raise BenchError(f"libnbd: {what}: connection is dead: {nbd_error()}")
        h.poll(max(1, int(left * 1000)))


def nbd_error():
    try:
        return nbd.get_error() or "?"
    except Exception:  # noqa: BLE001 - best effort for a message
        return "?"


def nbd_connect(uri, deadline):
    h = nbd.NBD()
    try:
        h.aio_connect_uri(uri)
        nbd_wait(h, lambda: not h.aio_is_connecting(), deadline, f"connect {uri}")
        if not h.aio_is_ready():
            raise BenchError(f"libnbd: connect {uri} failed: {nbd_error()}")
    except nbd.Error as e:
        raise BenchError(f"libnbd: connect {uri}: {e}")
    return h


def nbd_cmd(h, start, deadline, what):
    try:
        cookie = start()
        nbd_wait(h, lambda: h.aio_command_completed(cookie), deadline, what)
    except nbd.Error as e:
        raise BenchError(f"libnbd: {what}: {e}")


def nbd_close(h):
    try:
        if h.aio_is_ready():
            h.aio_disconnect()
    except nbd.Error:
        pass
    del h  # closes the socket


def write_small(uri, size, blocks, deadline):
    """Writes the (offset, bytes) blocks through libnbd (or qemu-io) and flushes."""
    if nbd is not None:
        h = nbd_connect(uri, deadline)
        try:
            for off, data in blocks:
                buf = nbd.Buffer.from_bytearray(bytearray(data))
                nbd_cmd(h, lambda: h.aio_pwrite(buf, off), deadline, f"write at {off}")
            nbd_cmd(h, lambda: h.aio_flush(), deadline, "flush")
        finally:
            nbd_close(h)
        return
    for off, data in blocks:
        pattern = data[0]
        if data != bytes([pattern]) * len(data):
            raise BenchError("qemu-io fallback writes one-byte patterns only")
        cmd = ["qemu-io", "-f", "raw", "-c", f"write -P {pattern} {off} {len(data)}",
               "-c", "flush", uri]
        rc, out, err = run_bounded(cmd, QEMU_IO_TIMEOUT_S)
        if rc != 0 or "error" in (out + err).lower():
            raise BenchError(f"{' '.join(cmd)} failed: {tail(out + err, 5)}")


def read_first_block(uri, deadline):
    """Connects to uri and reads 4 KiB at 0; returns the bytes (libnbd) or None."""
    if nbd is not None:
        h = nbd_connect(uri, deadline)
        try:
            buf = nbd.Buffer(4096)
            nbd_cmd(h, lambda: h.aio_pread(buf, 0), deadline, "read 4 KiB at 0")
            return bytes(buf.to_bytearray())
        finally:
            nbd_close(h)
    cmd = ["qemu-io", "-f", "raw", "-r", "-c", f"read -P {VIEW_PATTERN} 0 4096", uri]
    rc, out, err = run_bounded(cmd, QEMU_IO_TIMEOUT_S)
    if rc != 0 or "pattern verification failed" in out + err or "error" in (out + err).lower():
        raise BenchError(f"{' '.join(cmd)} failed: {tail(out + err, 5)}")
    return None


VIEW_PATTERN = 0x5A


def setup_view_store(primary, recovery, name, size, args):
    uri = protect(primary, recovery, name, size, args.compression)
    deadline = time.monotonic() + SMALL_WRITE_TIMEOUT_S
    first = bytes([VIEW_PATTERN]) * 4096
    write_small(uri, size, [(0, first), (size - MIB, bytes([0xA5]) * MIB)], deadline)
    last = primary.api.get(f"/api/v1/groups/{name}")["last_seq"]
    if last < 1:
        raise BenchError(f"{name}: writes gave last_seq {last}")
    while True:
        st = recovery.api.get(f"/api/v1/stores/{name}")
        if st["durable_seq"] >= last:
            return st["durable_seq"], first
        if time.monotonic() > deadline:
            raise BenchError(f"{name}: durable_seq {st['durable_seq']} < last_seq {last} "
                             f"after {SMALL_WRITE_TIMEOUT_S:.0f} s")
        time.sleep(0.05)


def time_view(recovery, name, seq, expect_first):
    t0 = time.perf_counter()
    v = recovery.api.call("POST", f"/api/v1/stores/{name}/views", {"seq": seq},
                          expect=(201,))
    t1 = time.perf_counter()
    try:
        data = read_first_block(v["disks"][0]["uri"], time.monotonic() + NBD_IO_TIMEOUT_S)
        t2 = time.perf_counter()
        if data is not None and data != expect_first:
            raise BenchError(f"view {v['id']} of {name} at seq {seq}: the first 4 KiB "
                             "differ from what was written")
    finally:
        recovery.api.call("DELETE", f"/api/v1/views/{v['id']}", expect=(204,))
    return (t1 - t0) * 1000.0, (t2 - t0) * 1000.0


def bench_views(primary, recovery, args):
    out = {"sizes": {}, "client": "libnbd" if nbd is not None else "qemu-io"}
    names = {}
    for size in args.view_sizes:
        name = f"view{size >> 30}g" if size % GIB == 0 else f"view{size >> 20}m"
        try:
            seq, first = setup_view_store(primary, recovery, name, size, args)
            names[size] = (name, seq, first)
            out["sizes"][str(size)] = {"store": name, "seq": seq, "open_ms": [],
                                       "open_read_ms": []}
        except BenchError as e:
            log(f"[views] {human_bytes(size)}: setup failed: {e}")
            out["sizes"][str(size)] = {"store": name, "error": str(e)}
    try:
        for rep in range(args.view_reps):
            for size, (name, seq, first) in names.items():
                r = out["sizes"][str(size)]
                if "error" in r:
                    continue
                try:
                    o, orr = time_view(recovery, name, seq, first)
                    r["open_ms"].append(o)
                    r["open_read_ms"].append(orr)
                except BenchError as e:
                    log(f"[views] {human_bytes(size)} rep {rep + 1}: {e}")
                    r["error"] = str(e)
        for size, r in out["sizes"].items():
            if r.get("open_ms"):
                r["open_ms_median"] = statistics.median(r["open_ms"])
                r["open_read_ms_median"] = statistics.median(r["open_read_ms"])
                log(f"[views] {human_bytes(int(size))}: open {r['open_ms_median']:.2f} ms, "
                    f"open + first read {r['open_read_ms_median']:.2f} ms (median of "
                    f"{len(r['open_ms'])})")
    finally:
        for size, (name, _, _) in names.items():
            try:
                unprotect(primary, recovery, name)
            except BenchError as e:
                log(f"[views] cleanup of {name}: {e}")
    return out


# ---------------------------------------------------------------------------
# Report.

def churn_bar(rows):
    """The highest rate (by achieved MB/s) with >= BAR_MB_S and p99 <= BAR_RPO_P99_S."""
    best = None
    for row in rows:
        p = row.get("protected", {})
        if "mb_s" not in p or p.get("rpo_p99_s") is None or "error" in p:
            continue
        if p["mb_s"] >= BAR_MB_S and p["rpo_p99_s"] <= BAR_RPO_P99_S:
            if best is None or p["mb_s"] > best["protected"]["mb_s"]:
                best = row
    return best


def view_bar(views, sizes):
    if len(sizes) < 2:
        return None, None, "N/A (one view size)"
    small = views["sizes"].get(str(min(sizes)), {})
    big = views["sizes"].get(str(max(sizes)), {})
    a, b = small.get("open_read_ms_median"), big.get("open_read_ms_median")
    if a is None or b is None or "error" in small or "error" in big:
        return None, None, "FAIL (no result)"
    ratio = b / a if a > 0 else float("inf")
    ok = ratio <= BAR_VIEW_RATIO or (b - a) <= BAR_VIEW_SLACK_MS
    return ratio, b - a, "PASS" if ok else "FAIL"


def credited_writes_s(row):
    """A run's write rate for the bar: its target when fio reached 99% of it (fio's rate
    limit lands a hair under), else what fio reached."""
    p = row["protected"]
    target = row.get("rate_iops")
    return float(target) if target and p["iops"] >= 0.99 * target else p["iops"]


def small_bar(rows):
    """(row, credited writes/s) of the highest rate with RPO p99 <= BAR_RPO_P99_S, or None."""
    best = None
    for row in rows:
        p = row.get("protected", {})
        if "iops" not in p or p.get("rpo_p99_s") is None or "error" in p:
            continue
        if p["rpo_p99_s"] <= BAR_RPO_P99_S:
            w = credited_writes_s(row)
            if best is None or w > best[1]:
                best = (row, w)
    return best


def print_churn(series, rows, res, args, errors):
    """The table of one block size's runs (MB/s for 1M-class sizes, writes/s for small)."""
    print()
    print(f"fio {args.rw} bs={series.label} iodepth={series.iodepth}, {series.runtime} s "
          f"(+{series.ramp_time} s ramp) per run"
          + (", unprotected baseline at max only" if series.small else ""))
    unit = "writes/s" if series.small else "MB/s"
    print(f"{'':<20}{'fio ' + unit:^30}{'RPO s (every 100 ms)':^24}{'':>8}"
          f"{'repl ' + unit:^14}{'fio p99 ms':^14}")
    print(f"{'fio --rate' + ('_iops' if series.small else ''):<20}{'prot':>8}{'unprot':>8}"
          f"{'prot/unprot':>14}{'p50':>8}{'p99':>8}{'max':>8}{'drain s':>8}"
          f"{'in fio':>7}{'all':>7}{'prot':>7}{'unprot':>7}{'CPU p+r s':>11}"
          f"{'samples':>8}")
    key = "iops" if series.small else "mb_s"
    for row in rows:
        if row["rate_bytes_per_s"] is None:
            label = row["rate"]
        elif series.small:
            label = f"{row['rate']} ({row['target_mb_s']:.0f} MB/s)"
        else:
            label = f"{row['rate']} ({row['target_mb_s']:.1f} MB/s)"
        p, u = row.get("protected", {}), row.get("unprotected", {})
        ratio = (p[key] / u[key]) if key in p and u.get(key) else None
        cpu = (f"{p['primary_cpu_s']:.1f}+{p['recovery_cpu_s']:.1f}"
               if "primary_cpu_s" in p and "recovery_cpu_s" in p else "-")
        digits = 0 if series.small else 1
        if series.small:
            during = p.get("repl_during_fio_writes_s")
            repl_all = (p["repl_mb_s"] * MB / series.bs) if p.get("repl_mb_s") else None
        else:
            during, repl_all = p.get("repl_during_fio_mb_s"), p.get("repl_mb_s")
        print(f"{label:<20}"
              f"{fmt_s(p.get(key), digits):>8}{fmt_s(u.get(key), digits):>8}"
              f"{(f'{ratio:.2f}x' if ratio else '-'):>14}"
              f"{fmt_s(p.get('rpo_p50_s')):>8}{fmt_s(p.get('rpo_p99_s')):>8}"
              f"{fmt_s(p.get('rpo_max_s')):>8}{fmt_s(p.get('drain_s')):>8}"
              f"{fmt_s(during, 0):>7}{fmt_s(repl_all, 0):>7}"
              f"{fmt_s(p.get('clat_p99_ms'), 1):>7}{fmt_s(u.get('clat_p99_ms'), 1):>7}"
              f"{cpu:>11}{p.get('samples', '-'):>8}")
        if series.small and "mb_s" in p:
            print(f"{'':<20}{p['mb_s']:>8.1f} MB/s protected"
                  + (f", {u['mb_s']:.1f} MB/s unprotected" if u.get("mb_s") else ""))
        for side in ("protected", "unprotected"):
            if "error" in row.get(side, {}):
                errors.append(f"{series.label} {row['rate']} {side}: {row[side]['error']}")
        if p.get("sampler_errors"):
            errors.append(f"{series.label} {row['rate']} sampler: "
                          f"{'; '.join(p['sampler_errors'])}")
        if "runtime_s" in p and row["rate_bytes_per_s"] is None and \
                p["runtime_s"] < series.runtime - 0.5:
            print(f"{'':<20}(the max run stopped at its --io_size cap "
                  f"{human_bytes(res['plan']['max_cap_bytes_by_bs'][series.label])} after "
                  f"{p['runtime_s']:.1f} s)")
    extra = [(r["rate"], r["protected"]) for r in rows
             if r.get("protected", {}).get("reconnects")]
    for label, p in extra:
        print(f"{label}: replication reconnected {p['reconnects']} time(s); last error: "
              f"{p.get('last_error')}")
    wire = [f"{r['rate']} {r['protected']['wire_bytes_sent'] / r['protected']['bytes_sent']:.2f}"
            for r in rows if r.get("protected", {}).get("wire_bytes_sent")
            and r["protected"].get("bytes_sent")]
    if wire:
        print("wire bytes / record bytes shipped (compression): " + ", ".join(wire))


def print_report(res, args):
    bars, errors = [], []
    print()
    print(f"osrd replication benchmark: disk {human_bytes(args.size)}, fio {args.rw} bs="
          f"{','.join(bs_label(b) for b in args.bs)}, "
          f"{'' if args.compress_pct is None else f'{args.compress_pct}% compressible data, '}"
          f"replication over {'TLS' if args.tls else 'plain TCP'}"
          f"{'' if args.compression == 'default' else f' compression {args.compression}'}, "
          "127.0.0.1, "
          f"{os.cpu_count()} CPUs")
    for series in args.series:
        if series.key in res:
            print_churn(series, res[series.key], res, args, errors)
    if "views" in res:
        v = res["views"]
        print()
        print(f"{'view of a store (' + v['client'] + ')':<34}{'open ms':>10}"
              f"{'open+read ms':>14}   (median of {args.view_reps}; all open+read ms)")
        for size in args.view_sizes:
            r = v["sizes"].get(str(size), {})
            print(f"{'disk ' + human_bytes(size):<34}{fmt_s(r.get('open_ms_median')):>10}"
                  f"{fmt_s(r.get('open_read_ms_median')):>14}   "
                  + " ".join(f"{x:.2f}" for x in r.get("open_read_ms", [])))
            if "error" in r:
                errors.append(f"view {human_bytes(size)}: {r['error']}")
        if len(args.view_sizes) >= 2:
            ratio, diff, verdict = view_bar(v, args.view_sizes)
            if ratio is not None:
                o_small = v["sizes"][str(min(args.view_sizes))].get("open_ms_median")
                o_big = v["sizes"][str(max(args.view_sizes))].get("open_ms_median")
                print(f"{'ratio ' + human_bytes(max(args.view_sizes)) + ' / ' + human_bytes(min(args.view_sizes)):<34}"
                      f"{(f'{o_big / o_small:.2f}x' if o_small else '-'):>10}{ratio:>13.2f}x")

    print()
    print(f"{'bar':<58}{'measured':>32}{'need':>22}  result")
    for series in args.series:
        if not series.small or series.key not in res:
            continue
        found = small_bar(res[series.key])
        best, writes_s = found if found else (None, None)
        if best:
            p = best["protected"]
            got = f"{best['rate']}: fio {p['iops']:.0f}/s, p99 {p['rpo_p99_s']:.2f} s"
            verdict = "PASS" if writes_s >= BAR_SMALL_WRITES_S else "FAIL"
        else:
            got, verdict = "no rate", "FAIL"
        what = f"replicated {series.label} writes, 1 disk: highest rate, p99<=2 s"
        print(f"{what:<58}{got:>32}{f'>={BAR_SMALL_WRITES_S:.0f}/s':>22}  {verdict}")
        bars.append({"bar": f"replicated {series.label} random writes",
                     "need_writes_s": BAR_SMALL_WRITES_S, "need_rpo_p99_s": BAR_RPO_P99_S,
                     "measured": best and {"rate": best["rate"],
                                           "writes_s": writes_s,
                                           "fio_writes_s": best["protected"]["iops"],
                                           "mb_s": best["protected"]["mb_s"],
                                           "rpo_p99_s": best["protected"]["rpo_p99_s"]},
                     "result": verdict})
    if "churn" in res:
        best = churn_bar(res["churn"])
        if best:
            p = best["protected"]
            got = f"{best['rate']}: {p['mb_s']:.1f} MB/s, p99 {p['rpo_p99_s']:.2f} s"
            verdict = "PASS"
        else:
            got, verdict = "no rate", "FAIL"
        print(f"{'replicated churn, 1 disk: highest rate meeting the need':<58}"
              f"{got:>32}{'>=200 MB/s, p99<=2 s':>22}  {verdict}")
        bars.append({"bar": "replicated churn", "need_mb_s": BAR_MB_S,
                     "need_rpo_p99_s": BAR_RPO_P99_S,
                     "measured": best and {"rate": best["rate"],
                                           "mb_s": best["protected"]["mb_s"],
                                           "rpo_p99_s": best["protected"]["rpo_p99_s"]},
                     "result": verdict})
    if "views" in res and len(args.view_sizes) >= 2:
        ratio, diff, verdict = view_bar(res["views"], args.view_sizes)
        got = "-" if ratio is None else f"{ratio:.2f}x ({diff:+.2f} ms)"
        what = (f"view open + first read, {human_bytes(max(args.view_sizes))} / "
                f"{human_bytes(min(args.view_sizes))} (median)")
        print(f"{what:<58}{got:>32}"
              f"{f'<={BAR_VIEW_RATIO:.1f}x or <={BAR_VIEW_SLACK_MS:.0f} ms':>22}  {verdict}")
        bars.append({"bar": "view open time independent of disk size", "measured_ratio": ratio,
                     "measured_diff_ms": diff, "need_ratio": BAR_VIEW_RATIO,
                     "need_diff_ms": BAR_VIEW_SLACK_MS, "result": verdict.split()[0]})
    if errors:
        print()
        for e in errors:
            print("ERROR " + "\n    ".join(e.splitlines()[:6]))
    print()
    for n in NOTES:
        print(f"note: {n}")
    return bars, errors


# ---------------------------------------------------------------------------

def plan_bytes(args):
    """Bytes fio writes in all rate-limited runs, and the io_size cap of each max run
    (per block size: max_cap_bytes_by_bs; max_cap_bytes is the 1M series')."""
    limited, small, n_max = 0, 0, 0
    caps = {}
    for series in args.series:
        per_run = series.runtime + series.ramp_time
        for label, r, _ in series.rates:
            copies = 2 if label in series.unprotected else 1
            if r is not None:
                limited += r * per_run * copies
                small += r * per_run * copies if series.small else 0
            elif series.small:
                caps[series.label] = -(-SMALL_MAX_WRITES_S * series.bs * per_run // MIB) * MIB
                small += caps[series.label] * copies
            else:
                n_max += copies
    if args.max_written is None:
        big = any(not se.small for se in args.series)
        args.max_written = (MAX_WRITTEN_DEFAULT_BYTES if big else 0) + small
    plan = {"limited_bytes": limited, "max_runs": n_max, "max_cap_bytes": None,
            "max_cap_bytes_by_bs": caps, "budget_bytes": args.max_written}
    if "churn" not in args.parts:
        return plan
    fixed = limited + sum(caps[se.label] * (2 if "max" in se.unprotected else 1)
                          for se in args.series if se.label in caps)
    if fixed > args.max_written:
        raise BenchError(f"the rate-limited and small-block runs alone write up to "
                         f"{human_bytes(fixed)}, over --max-written "
                         f"{human_bytes(args.max_written)}: lower --rates, --iops or "
                         "--runtime, or raise --max-written")
    if n_max:
        cap = (args.max_written - fixed) // n_max // MIB * MIB
        if cap < 256 * MIB:
            raise BenchError(f"only {human_bytes(max(cap, 0))} left per max run under "
                             f"--max-written {human_bytes(args.max_written)}")
        for se in args.series:
            if not se.small:
                caps[se.label] = cap
        plan["max_cap_bytes"] = cap
    return plan


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--osrd", default=os.environ.get(
        "OSRD", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                             "build", "osrd")),
        help="osrd binary (default $OSRD or <repo>/build/osrd)")
    p.add_argument("--dir", default="/var/tmp",
                   help="parent of the work dir (a mkdtemp inside it; default /var/tmp)")
    p.add_argument("--size", type=parse_size, default=4 << 30,
                   help="disk size of the churn runs (default 4G)")
    p.add_argument("--rates", type=parse_rates, default=None,
                   help="fio target rates, NNm (MiB/s) or max (default "
                        "50m,100m,200m,300m,max; --quick 100m,200m,max)")
    p.add_argument("--runtime", type=int, default=None,
                   help="seconds per fio run (default 15, 5 with --quick)")
    p.add_argument("--ramp-time", dest="ramp_time", type=int, default=None,
                   help="fio ramp seconds (default 2, 1 with --quick)")
    p.add_argument("--iodepth", type=int, default=8, help="fio iodepth (default 8)")
    p.add_argument("--bs", type=parse_bs_list, default=[MIB],
                   help="fio block sizes, one series of runs each (default 1M; e.g. 4k or "
                        "1M,4k). Sizes under 64k use --iops, --small-iodepth and "
                        "--small-runtime")
    p.add_argument("--iops", type=parse_iops, default=None,
                   help="fio --rate_iops targets (writes/s) for block sizes under 64k "
                        "(default 5000,10000,25000,40000,max; --quick 10000,25000,max)")
    p.add_argument("--small-iodepth", dest="small_iodepth", type=int, default=16,
                   help="fio iodepth for block sizes under 64k (default 16)")
    p.add_argument("--small-runtime", dest="small_runtime", type=int, default=None,
                   help="seconds per fio run for block sizes under 64k (default 10, 5 with "
                        "--quick; ramp: --ramp-time)")
    p.add_argument("--rw", choices=("randwrite", "write"), default="randwrite",
                   help="fio rw (default randwrite)")
    p.add_argument("--no-unprotected", dest="unprotected", action="store_false",
                   help="skip the unprotected baseline runs")
    p.add_argument("--drain-timeout", type=float, default=DRAIN_TIMEOUT_DEFAULT_S,
                   help="seconds to wait for the recovery site to catch up after fio "
                        f"(default {DRAIN_TIMEOUT_DEFAULT_S:.0f})")
    p.add_argument("--max-written", type=parse_size, default=None,
                   help="bound on the sum of bytes fio writes over all runs "
                        "(default 40 GB + what the small block sizes' runs write)")
    p.add_argument("--view-sizes", type=lambda s: [parse_size(x) for x in s.split(",")],
                   default=[1 << 30, 100 << 30],
                   help="disk sizes for the view timing (default 1G,100G)")
    p.add_argument("--view-reps", type=int, default=5, help="views per size (default 5)")
    p.add_argument("--parts", default="churn,views",
                   help="comma-separated subset of churn,views (default both)")
    p.add_argument("--compression", choices=("default", "lz4", "none"), default="default",
                   help="'compression' of PUT .../replication (default: not sent, the "
                        "site's default)")
    p.add_argument("--compress-pct", type=int, default=None,
                   help="fio --buffer_compress_percentage (with --refill_buffers); "
                        "default: fio's random, incompressible buffers")
    p.add_argument("--tls", action="store_true",
                   help="replicate over mutual TLS (throwaway CA made with openssl)")
    p.add_argument("--quick", action="store_true", help="5 s runs, rates 100m,200m,max")
    p.add_argument("--json", help="write the results to this file")
    p.add_argument("--strict", action="store_true", help="exit 1 when a bar fails")
    p.add_argument("--keep", action="store_true",
                   help="keep the work dir (site data, logs, fio output)")
    args = p.parse_args()

    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if not args.parts or any(x not in ("churn", "views") for x in args.parts):
        p.error("--parts: choose from churn,views")
    if args.rates is None:
        args.rates = parse_rates("100m,200m,max" if args.quick else
                                 "50m,100m,200m,300m,max")
    if args.iops is None:
        args.iops = parse_iops("10000,25000,max" if args.quick else
                               "5000,10000,25000,40000,max")
    if args.runtime is None:
        args.runtime = 5 if args.quick else 15
    if args.small_runtime is None:
        args.small_runtime = 5 if args.quick else 10
    if args.ramp_time is None:
        args.ramp_time = 1 if args.quick else 2
    if args.compress_pct is not None and not 0 <= args.compress_pct <= 99:
        p.error("--compress-pct must be 0..99")
    if args.runtime < 1 or args.small_runtime < 1 or args.ramp_time < 0 or \
            not 1 <= args.iodepth <= 256 or not 1 <= args.small_iodepth <= 256:
        p.error("--runtime and --small-runtime must be >= 1, --ramp-time >= 0, --iodepth "
                "and --small-iodepth 1..256")
    args.small_ramp_time = args.ramp_time
    args.series = make_series(args)
    if args.size < (64 << 20) or args.size % MIB:
        p.error("--size must be a multiple of 1 MiB and at least 64M")
    if args.view_reps < 1 or any(s < 2 * MIB or s % MIB for s in args.view_sizes):
        p.error("--view-reps >= 1; --view-sizes multiples of 1 MiB, at least 2M")
    args.view_sizes = sorted(set(args.view_sizes))

    osrd = os.path.abspath(args.osrd)
    try:
        if not (os.path.isfile(osrd) and os.access(osrd, os.X_OK)):
            raise BenchError(f"osrd binary not found or not executable at {osrd}; build "
                             "it first (make) or pass --osrd PATH")
        if "churn" in args.parts:
            if not shutil.which("fio"):
                raise BenchError("fio is missing (Debian package fio)")
            rc, out, _ = run_bounded(["fio", "--enghelp=nbd"], TOOL_TIMEOUT_S)
            if rc != 0 or "uri" not in out:
                raise BenchError("fio has no nbd engine: install Debian's fio (libnbd)")
        if "views" in args.parts and nbd is None and not shutil.which("qemu-io"):
            raise BenchError("the view timing needs python3-libnbd (run with Debian's "
                             "/usr/bin/python3) or qemu-io (qemu-utils)")
        plan = plan_bytes(args)
        os.makedirs(args.dir, exist_ok=True)
        if "churn" in args.parts:
            biggest = max([run_bytes(se, r, plan["max_cap_bytes_by_bs"].get(se.label, 0))
                           for se in args.series for r in se.rates])
            need = 2 * biggest + args.size + FREE_MARGIN_BYTES
            if free_bytes(args.dir) < need:
                raise BenchError(f"{args.dir} has {human_bytes(free_bytes(args.dir))} free; "
                                 f"the biggest run needs about {human_bytes(need)} "
                                 "(journal + capture log + disk + margin)")
    except BenchError as e:
        log(f"replication_bench: {e}")
        return 2

    root = tempfile.mkdtemp(prefix="osrd-repl-bench.", dir=args.dir)
    signal.signal(signal.SIGTERM, raise_interrupt)
    res = {"plan": plan}
    sites = []
    failed = None
    started = time.time()
    load_start = os.getloadavg()
    try:
        log(f"replication_bench: work dir {root}; fio writes at most "
            f"{human_bytes(plan['budget_bytes'])}"
            f" in all")
        tls = make_certs(os.path.join(root, "tls")) if args.tls else {}
        primary = Site(osrd, "primary", root, tls.get("primary"))
        recovery = Site(osrd, "recovery", root, tls.get("recovery"))
        sites = [primary, recovery]
        for s in sites:
            s.start()
            log(f"site {s.name}: api {s.api.host}:{s.api.port}, nbd {s.nbd}, "
                f"replication {s.replication} (pid {s.proc.pid})")
            plain = s.log_mentions(r"replication runs unencrypted")
            if args.tls and plain:
                raise BenchError(f"site {s.name} says its replication is unencrypted "
                                 f"although --tls gave it certificates\n{s.log_tail()}")
        if "churn" in args.parts:
            for series in args.series:
                res[series.key] = bench_churn(primary, recovery, series, args, plan, root)
        if "views" in args.parts:
            res["views"] = bench_views(primary, recovery, args)
    except BenchError as e:
        log(f"replication_bench: {e}")
        failed = str(e)
    except KeyboardInterrupt:
        log("replication_bench: interrupted")
        failed = "interrupted"
    finally:
        for s in reversed(sites):
            s.stop()
            log(f"site {s.name} stopped: {s.exit_note}")
        if args.keep:
            log(f"replication_bench: kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    bars, errors = print_report(res, args)
    if failed:
        print(f"ERROR run: {failed.splitlines()[0]}")
        errors.append(failed)
    print(f"load average at start {load_start[0]:.2f}, at end {os.getloadavg()[0]:.2f} "
          "(other work on the machine skews results)")
    if args.json:
        doc = {"started_unix": started, "size_bytes": args.size, "runtime_s": args.runtime,
               "ramp_time_s": args.ramp_time, "iodepth": args.iodepth, "rw": args.rw,
               "tls": args.tls, "compression": args.compression,
               "compress_pct": args.compress_pct,
               "rates": [r[0] for r in args.rates], "osrd": osrd,
               "block_sizes": [bs_label(b) for b in args.bs],
               "iops_rates": [r[0] for r in args.iops],
               "small_iodepth": args.small_iodepth, "small_runtime_s": args.small_runtime,
               "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
               "results": res, "bars": bars, "errors": errors, "notes": NOTES}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        log(f"replication_bench: results written to {args.json}")
    if errors:
        return 1
    if args.strict and any(b["result"] != "PASS" for b in bars):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
