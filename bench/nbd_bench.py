#!/usr/bin/python3
"""Benchmark `osrd nbd-serve` against qemu-nbd and nbdkit, in one run.

Every server serves its own copy of the same fully allocated raw image, through
the host page cache (writeback), on 127.0.0.1, and runs the same workloads:

  fio (nbd engine, libnbd client, one connection):
    seq-write-1M    sequential 1 MiB writes, iodepth 4
    rand-write-4K   random 4 KiB writes, iodepth 16
    rand-read-4K    random 4 KiB reads, iodepth 16
    flush-write-4K  random 4 KiB writes, iodepth 1, an NBD FLUSH after each write
  qemu-img bench (qemu's NBD client, one connection):
    qemu-img-write-4K / qemu-img-read-4K: a fixed count of 4 KiB requests,
    iodepth 16, strided over the whole image (qemu-img bench has no random
    mode; the stride is coprime with the block count so every block is hit).

With TLS (issue 9): osrd-tls (nbd-serve with TLS required, x509 client
certificates) against qemu-nbd-tls (qemu-nbd --tls-creds, verify-peer: client
certificates too), both with certificates from one osr CA made for the run; the
clients are the same (fio over nbds:// with tls-certificates=DIR, qemu-img bench
with a tls-creds-x509 object).

It prints IOPS and MiB/s per workload and server, the ratios osrd-capture /
nbdkit, osrd-capture / qemu-nbd, osrd / qemu-nbd, osrd-capture / osrd and
osrd-tls / qemu-nbd-tls, and checks the bar for osrd with capture on:
  >= 1.0x nbdkit on rand-write-4K, >= 0.7x nbdkit on seq-write-1M,
  >= 1.0x qemu-nbd on each of the four fio workloads.

Servers run one at a time (a small machine: client and server share the CPUs).
Between workloads the image (and capture log) is synced so one workload's
dirty pages are not written back during the next; the sync is not measured.

Exit status: 0 when every measurement ran (bars print PASS/FAIL but do not fail
the run unless --strict), 1 when a server or workload failed (or a bar failed
with --strict), 2 on bad usage or a missing tool.

Why fsync=1 for the flush workload: fio's nbd engine (engines/nbd.c, fio 3.33)
sends DDIR_SYNC as nbd_aio_flush(), i.e. NBD_CMD_FLUSH; it has no case for
DDIR_DATASYNC, so fdatasync=1 would fail every sync with EINVAL. The script
checks fio's "sync" count against its write count after the run.

Run: /usr/bin/python3 bench/nbd_bench.py --osrd build/osrd [--quick] [--size 1G]
     [--servers qemu-nbd,nbdkit,osrd,osrd-capture,qemu-nbd-tls,osrd-tls] [--json FILE]
     [--strict]
"""

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import benchlib  # noqa: E402
from benchlib import (BenchError, free_bytes, log, parse_fio_json,  # noqa: E402
                      raise_interrupt, read_file_text, tail)

# ---------------------------------------------------------------------------
# Limits (every wait in this script is bounded by one of these).

SERVER_START_TIMEOUT_S = 30.0
SERVER_STOP_TERM_TIMEOUT_S = 15.0   # after SIGTERM, before SIGKILL
SERVER_STOP_KILL_TIMEOUT_S = 5.0    # after SIGKILL
CLIENT_SLACK_TIMEOUT_S = 90.0       # fio: ramp + runtime + this
QEMU_IMG_MIN_RATE_IOPS = 100        # qemu-img bench timeout = count / this + slack
SYNC_TIMEOUT_S = 300.0              # flushing up to --size of dirty data
COPY_TIMEOUT_S = 600.0
TOOL_PROBE_TIMEOUT_S = 20.0
PROBE_IO_TIMEOUT_S = 2.0
FREE_BYTES_MIN_DEFAULT = 4 << 30    # refuse to start a workload below this

ALL_SERVERS = ["qemu-nbd", "nbdkit", "osrd", "osrd-capture", "qemu-nbd-tls", "osrd-tls"]
TLS_CLIENT = "bench"  # the client certificate's name (CN), in osrd-tls's --tls-authz
NOBODY_UID = 65534

# name -> (title, fio options or None for qemu-img, rw direction key)
FIO_WORKLOADS = [
    ("seq-write-1M", "fio seq write 1M qd4",
     ["--rw=write", "--bs=1M", "--iodepth=4"], "write"),
    ("rand-write-4K", "fio rand write 4K qd16",
     ["--rw=randwrite", "--bs=4k", "--iodepth=16"], "write"),
    ("rand-read-4K", "fio rand read 4K qd16",
     ["--rw=randread", "--bs=4k", "--iodepth=16"], "read"),
    ("flush-write-4K", "fio rand write 4K qd1 +flush",
     ["--rw=randwrite", "--bs=4k", "--iodepth=1", "--fsync=1"], "write"),
]
QEMU_IMG_WORKLOADS = [
    ("qemu-img-write-4K", "qemu-img bench write 4K qd16", True),
    ("qemu-img-read-4K", "qemu-img bench read 4K qd16", False),
]
WORKLOAD_TITLES = {w[0]: w[1] for w in FIO_WORKLOADS}
WORKLOAD_TITLES.update({w[0]: w[1] for w in QEMU_IMG_WORKLOADS})
WORKLOAD_ORDER = [w[0] for w in FIO_WORKLOADS] + [w[0] for w in QEMU_IMG_WORKLOADS]

# (numerator server, denominator server, workload, minimum ratio)
BARS = [("osrd-capture", "nbdkit", "rand-write-4K", 1.0),
        ("osrd-capture", "nbdkit", "seq-write-1M", 0.7)]
BARS += [("osrd-capture", "qemu-nbd", w[0], 1.0) for w in FIO_WORKLOADS]

RATIO_COLUMNS = [("osrd-capture", "nbdkit"), ("osrd-capture", "qemu-nbd"),
                 ("osrd", "qemu-nbd"), ("osrd-capture", "osrd"), ("osrd-tls", "qemu-nbd-tls")]

NOTES = [
    "flush-write-4K uses fio fsync=1: fio's nbd engine sends DDIR_SYNC as "
    "NBD_CMD_FLUSH (nbd_aio_flush); fdatasync=1 is not supported by that "
    "engine (EINVAL). IOPS counts writes only; each write is followed by a "
    "flush, and fio waits for it before the next write.",
    "qemu-img bench (qemu 7.2) takes no --object, so it cannot be given TLS "
    "credentials: its rows are n/a for the -tls servers. fio runs as nobody for them "
    "(libnbd reads a root's certificates from /etc/pki/libnbd only).",
    "qemu-img bench has no random mode: its 4K rows are strided "
    "(step coprime with the block count), a fixed request count, no ramp.",
    "qemu-img bench against qemu-nbd 7.2 at depth 16 stalls about 40 ms per "
    "batch of requests: qemu-nbd leaves Nagle on for accepted sockets (no "
    "TCP_NODELAY, seen with strace) and meets the client's delayed ACK; fio's "
    "libnbd client does not trigger it. Those rows are real but not about I/O.",
    "osrd-tls / qemu-nbd-tls: TLS required, client certificates checked on both "
    "(osrd: OpenSSL; qemu-nbd: GnuTLS); the clients' TLS is GnuTLS (libnbd, qemu).",
    "All servers use the host page cache (qemu-nbd --cache=writeback "
    "--aio=threads, nbdkit file cache=default, osrd default). The image and "
    "capture log are synced between workloads, outside the measured time.",
]


def parse_size(text):
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 256M, 1G)")
    shift = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]
    return int(m.group(1)) << shift


def human_bytes(n):
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


# ---------------------------------------------------------------------------
# Bounded process handling.

def stop_process(proc, term_timeout_s=SERVER_STOP_TERM_TIMEOUT_S):
    return benchlib.stop_process(proc, term_timeout_s, SERVER_STOP_KILL_TIMEOUT_S)


def run_bounded(cmd, timeout_s, stdout_path=None, stderr_path=None, env=None):
    """Runs cmd in its own process group; kills that group on timeout.

    Returns (returncode, stdout text, stderr text). Raises BenchError on timeout.
    """
    out_f = open(stdout_path, "w+b") if stdout_path else tempfile.TemporaryFile()
    err_f = open(stderr_path, "w+b") if stderr_path else tempfile.TemporaryFile()
    with out_f, err_f:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out_f,
                                stderr=err_f, start_new_session=True, env=env)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=SERVER_STOP_KILL_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
            raise BenchError(f"timed out after {timeout_s:.0f} s: {' '.join(cmd)}")
        except BaseException:
            # Interrupted (Ctrl-C): do not leave the client running.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=SERVER_STOP_KILL_TIMEOUT_S)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            raise
        out_f.seek(0)
        err_f.seek(0)
        return (rc, out_f.read().decode(errors="replace"),
                err_f.read().decode(errors="replace"))


def process_cpu_s(pid):
    """User + system CPU seconds of pid (all threads), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


# ---------------------------------------------------------------------------
# Tools.

def find_tools(args, servers):
    needed = {"fio": "fio", "qemu-img": "qemu-utils"}
    if "qemu-nbd" in servers or "qemu-nbd-tls" in servers:
        needed["qemu-nbd"] = "qemu-utils"
    if "nbdkit" in servers:
        needed["nbdkit"] = "nbdkit"
    paths, missing = {}, []
    for tool, package in needed.items():
        path = shutil.which(tool)
        if path:
            paths[tool] = path
        else:
            missing.append(f"{tool} (Debian package {package})")
    if missing:
        raise BenchError("missing tool(s): " + ", ".join(missing) +
                         "; install them (scripts/bootstrap does) or choose "
                         "other --servers")
    rc, out, err = run_bounded([paths["fio"], "--enghelp=nbd"], TOOL_PROBE_TIMEOUT_S)
    if rc != 0 or "uri" not in out:
        raise BenchError("fio has no nbd engine (fio --enghelp=nbd failed): "
                         "install Debian's fio, which is built with libnbd")
    if "nbdkit" in servers:
        rc, out, err = run_bounded([paths["nbdkit"], "file", "--dump-plugin"],
                                   TOOL_PROBE_TIMEOUT_S)
        if rc != 0:
            raise BenchError("nbdkit has no file plugin (nbdkit file --dump-plugin "
                             f"failed: {tail(err, 3)})")
    if any(s.startswith("osrd") or s.endswith("-tls") for s in servers):  # -tls: certificates
        osrd = os.path.abspath(args.osrd)
        if not (os.path.isfile(osrd) and os.access(osrd, os.X_OK)):
            raise BenchError(f"osrd binary not found or not executable at {osrd}; "
                             "build it first (make), pass --osrd PATH, or run "
                             "only --servers qemu-nbd,nbdkit")
        paths["osrd"] = osrd
    return paths


def tool_versions(paths):
    versions = {}
    probes = {"fio": ["--version"], "qemu-img": ["--version"],
              "qemu-nbd": ["--version"], "nbdkit": ["--version"]}
    for tool, argv in probes.items():
        if tool not in paths:
            continue
        try:
            rc, out, _ = run_bounded([paths[tool]] + argv, TOOL_PROBE_TIMEOUT_S)
            versions[tool] = out.strip().splitlines()[0] if out.strip() else "?"
        except BenchError:
            versions[tool] = "?"
    if "osrd" in paths:
        versions["osrd"] = paths["osrd"]
    return versions


# ---------------------------------------------------------------------------
# Images.

def sync_paths(paths):
    """fdatasync each file, bounded in time (outside the measured window)."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            for root, _, names in os.walk(p):
                files.extend(os.path.join(root, n) for n in names)
        elif os.path.exists(p):
            files.append(p)
    # `sync -d` takes many files at once; chunk to keep argv short.
    for i in range(0, len(files), 200):
        rc, _, err = run_bounded(["sync", "-d", "--"] + files[i:i + 200],
                                 SYNC_TIMEOUT_S)
        if rc != 0:
            log(f"warning: sync -d failed: {tail(err, 3)}")


def create_master_image(path, size_bytes):
    """A fully allocated image filled with non-zero, non-repeating-per-MiB data."""
    chunk_bytes = 1 << 20
    seed_block = os.urandom(chunk_bytes)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.posix_fallocate(fd, 0, size_bytes)
        written = 0
        index = 0
        while written < size_bytes:
            n = min(chunk_bytes, size_bytes - written)
            # Stamp the chunk index so no two MiB are equal (defeats any dedup
            # or zero detection); the rest is random, never all zero.
            block = index.to_bytes(8, "little") + seed_block[8:n]
            os.pwrite(fd, block, written)
            written += n
            index += 1
        os.fdatasync(fd)
    finally:
        os.close(fd)
    st = os.stat(path)
    if st.st_size != size_bytes or st.st_blocks * 512 < size_bytes:
        raise BenchError(f"{path} is not fully allocated "
                         f"({st.st_blocks * 512} of {size_bytes} bytes)")


def copy_image(src, dst, size_bytes):
    rc, _, err = run_bounded(["cp", "--reflink=never", "--sparse=never", src, dst],
                             COPY_TIMEOUT_S)
    if rc != 0:
        raise BenchError(f"cp {src} {dst} failed: {tail(err, 3)}")
    sync_paths([dst])
    st = os.stat(dst)
    if st.st_size != size_bytes or st.st_blocks * 512 < size_bytes:
        raise BenchError(f"copy {dst} is not fully allocated")


def dir_bytes(path):
    total = 0
    for root, _, names in os.walk(path):
        for n in names:
            try:
                total += os.stat(os.path.join(root, n)).st_blocks * 512
            except OSError:
                pass
    return total


# ---------------------------------------------------------------------------
# Servers.

def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tls(paths, root):
    """Certificates from one osr CA for the TLS servers and their clients: returns
    {"ca": ..., "cert": ..., "key": ... (osrd's server files), "client": DIR (ca-cert.pem,
    client-cert.pem, client-key.pem), "server": DIR (qemu-nbd's ca-cert.pem,
    server-cert.pem, server-key.pem)}. Made by `osrd nbd-serve --tls-dir`, started and
    stopped at once."""
    ca = os.path.join(root, "tls")
    out = os.path.join(root, "mint.stdout")
    cmd = [paths["osrd"], "nbd-serve", "--image", os.path.join(root, "mint.img"),
           "--size", "1M", "--listen", "127.0.0.1:0", "--tls-dir", ca,
           "--tls-client", TLS_CLIENT]
    with open(out, "wb") as f:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while "osrd: ready" not in read_file_text(out):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"could not make TLS certificates: {' '.join(cmd)}")
            time.sleep(0.05)
    finally:
        stop_process(proc)
    server = os.path.join(root, "tls-server")
    os.mkdir(server, 0o700)
    for src, dst in (("ca.pem", "ca-cert.pem"), ("nbd-serve.pem", "server-cert.pem"),
                     ("nbd-serve.key", "server-key.pem")):
        shutil.copyfile(os.path.join(ca, src), os.path.join(server, dst))
    os.chmod(os.path.join(server, "server-key.pem"), 0o600)
    client = os.path.join(ca, "clients", TLS_CLIENT)
    # fio's nbd engine cannot pass tls-certificates= (libnbd refuses local file access
    # from URIs it did not allow): it finds them where libnbd looks by default,
    # $HOME/.pki/libnbd, which libnbd only reads for a user other than root (root's is
    # /etc/pki/libnbd, not ours to write). So fio runs as nobody with HOME there.
    fio_home = tempfile.mkdtemp(prefix="osrd-nbd-bench-fio.", dir="/tmp")
    pki = os.path.join(fio_home, ".pki", "libnbd")
    os.makedirs(pki, 0o700)
    for f in ("ca-cert.pem", "client-cert.pem", "client-key.pem"):
        shutil.copyfile(os.path.join(client, f), os.path.join(pki, f))
    os.chmod(os.path.join(pki, "client-key.pem"), 0o600)
    if os.geteuid() == 0:
        for d, _, files in os.walk(fio_home):
            os.chown(d, NOBODY_UID, NOBODY_UID)
            for f in files:
                os.chown(os.path.join(d, f), NOBODY_UID, NOBODY_UID)
    return {"ca": os.path.join(ca, "ca.pem"), "cert": os.path.join(ca, "nbd-serve.pem"),
            "key": os.path.join(ca, "nbd-serve.key"), "client": client, "server": server,
            "fio_home": fio_home}


def probe_nbd(port):
    """True when something on 127.0.0.1:port sends the NBD greeting."""
    try:
        with socket.create_connection(("127.0.0.1", port),
                                      timeout=PROBE_IO_TIMEOUT_S) as s:
            s.settimeout(PROBE_IO_TIMEOUT_S)
            got = b""
            while len(got) < 8:
                chunk = s.recv(8 - len(got))
                if not chunk:
                    return False
                got += chunk
            return got == b"NBDMAGIC"
    except OSError:
        return False


class Server:
    def __init__(self, name, paths, image, workdir, tls=None):
        self.name = name
        self.tls = tls if name.endswith("-tls") else None
        self.paths = paths
        self.image = image
        self.workdir = workdir
        self.capture_dir = None
        self.proc = None
        self.port = None
        self.stdout_path = os.path.join(workdir, f"{name}.stdout")
        self.stderr_path = os.path.join(workdir, f"{name}.stderr")
        self.exit_note = None

    def _command(self):
        if self.name in ("qemu-nbd", "qemu-nbd-tls"):
            self.port = free_port()
            tls = []
            if self.tls:
                tls = ["--object", "tls-creds-x509,id=tls0,endpoint=server,"
                       f"dir={self.tls['server']},verify-peer=on", "--tls-creds=tls0"]
            return [self.paths["qemu-nbd"], "--format=raw", "--cache=writeback",
                    "--aio=threads", "--bind=127.0.0.1", f"--port={self.port}",
                    "--persistent", "--shared=8", *tls, self.image]
        if self.name == "nbdkit":
            self.port = free_port()
            return [self.paths["nbdkit"], "--foreground", "--exit-with-parent",
                    "--port", str(self.port), "--ipaddr", "127.0.0.1",
                    "file", f"file={self.image}"]
        cmd = [self.paths["osrd"], "nbd-serve", "--image", self.image,
               "--listen", "127.0.0.1:0"]
        if self.name == "osrd-capture":
            self.capture_dir = os.path.join(self.workdir, "capture")
            os.mkdir(self.capture_dir)
            cmd += ["--capture", self.capture_dir]
        if self.tls:
            cmd += ["--tls-ca", self.tls["ca"], "--tls-cert", self.tls["cert"],
                    "--tls-key", self.tls["key"], "--tls-authz", TLS_CLIENT]
        return cmd

    def start(self):
        cmd = self._command()
        self.command = cmd
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, start_new_session=True)
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with status "
                                 f"{self.proc.returncode} while starting: "
                                 f"{' '.join(cmd)}\n{self.log_tail()}")
            if self.name.startswith("osrd"):
                if self._osrd_ready():
                    return
            elif probe_nbd(self.port):
                return
            time.sleep(0.05)
        raise BenchError(f"{self.name} not ready after {SERVER_START_TIMEOUT_S:.0f} s: "
                         f"{' '.join(cmd)}\n{self.log_tail()}")

    def _osrd_ready(self):
        text = read_file_text(self.stdout_path)
        m = re.search(r"^osrd: listening on nbds?://127\.0\.0\.1:(\d+)/", text, re.M)
        if m:
            self.port = int(m.group(1))
        return self.port is not None and re.search(r"^osrd: ready$", text, re.M)

    @property
    def uri(self):
        if self.tls:
            return f"nbds://127.0.0.1:{self.port}/?tls-certificates={self.tls['client']}"
        return f"nbd://127.0.0.1:{self.port}/"

    def qemu_img_target(self):
        """qemu-img arguments that open the export as raw."""
        if not self.tls:
            return ["-f", "raw", self.uri]
        return ["--object", "tls-creds-x509,id=tls0,endpoint=client,"
                f"dir={self.tls['client']}", "--image-opts",
                "driver=raw,file.driver=nbd,file.server.type=inet,"
                f"file.server.host=127.0.0.1,file.server.port={self.port},file.export=,"
                "file.tls-creds=tls0"]

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def cpu_s(self):
        return process_cpu_s(self.proc.pid) if self.alive() else None

    def stop(self):
        if self.proc is None:
            return None
        rc, how = stop_process(self.proc)
        self.exit_note = f"exit status {rc} ({how})"
        if self.name.startswith("osrd") and (rc != 0 or how != "SIGTERM"):
            log(f"warning: {self.name} did not exit 0 on SIGTERM: {self.exit_note}"
                f"\n{self.log_tail()}")
        return rc

    def log_tail(self):
        parts = []
        for label, path in (("stdout", self.stdout_path), ("stderr", self.stderr_path)):
            text = tail(read_file_text(path), 10)
            if text:
                parts.append(f"--- {self.name} {label} (last lines) ---\n{text}")
        return "\n".join(parts)


# ---------------------------------------------------------------------------
# Workloads.

def run_fio(server, name, options, direction, args, workdir):
    out_path = os.path.join(workdir, f"fio-{server.name}-{name}.json")
    uri, env, prefix, output = server.uri, None, [], [f"--output={out_path}"]
    if server.tls:  # see make_tls: certificates from $HOME/.pki/libnbd, as nobody
        uri = f"nbds://127.0.0.1:{server.port}/"
        env = dict(os.environ, HOME=server.tls["fio_home"])
        output = []  # JSON on stdout: nobody cannot write into the work dir
        if os.geteuid() == 0:
            prefix = ["setpriv", f"--reuid={NOBODY_UID}", f"--regid={NOBODY_UID}",
                      "--clear-groups", "--"]
    cmd = prefix + ["fio", f"--name={name}", "--ioengine=nbd", f"--uri={uri}",
                    "--time_based", f"--runtime={args.runtime}",
                    f"--ramp_time={args.ramp_time}",
                    # Same random sequence for every server; no random map to keep
                    # the client's CPU use low on a small machine.
                    "--randrepeat=1", "--norandommap", "--random_generator=tausworthe64",
                    "--output-format=json"] + output + options
    timeout_s = args.runtime + args.ramp_time + CLIENT_SLACK_TIMEOUT_S
    rc, out, err = run_bounded(cmd, timeout_s, env=env)
    text = read_file_text(out_path) or out
    if rc != 0:
        before_json = text[:text.find("{")] if "{" in text else text
        raise BenchError(f"fio exited {rc}: {' '.join(cmd)}\n"
                         f"{tail(err + before_json)}")
    job = parse_fio_json(text)["jobs"][0]
    if job.get("error"):
        raise BenchError(f"fio job error {job['error']}: {tail(err)}")
    d = job[direction]
    result = {
        "client": "fio",
        "iops": d["iops"],
        "bytes_per_s": d["bw_bytes"],
        "ios": d["total_ios"],
        "lat_mean_us": d["lat_ns"]["mean"] / 1000.0,
        "clat_p99_us": d.get("clat_ns", {}).get("percentile", {})
                        .get("99.000000", 0) / 1000.0,
        "runtime_ms": d["runtime"],
    }
    if "--fsync=1" in options:
        syncs = job.get("sync", {}).get("total_ios", 0)
        result["flushes"] = syncs
        result["flush_lat_mean_us"] = job.get("sync", {}).get("lat_ns", {}).get("mean", 0) / 1000.0
        # fio counts ios of the ramp separately, so allow a little slack.
        if syncs < 0.9 * d["total_ios"]:
            raise BenchError(f"fio issued {syncs} flushes for {d['total_ios']} writes; "
                             "fsync=1 did not reach the server as NBD FLUSH")
    return result


def qemu_img_step_bytes(size_bytes, block_bytes=4096):
    """A stride that is a multiple of 4 KiB and visits every block once per pass."""
    blocks = size_bytes // block_bytes
    k = max(1, int(blocks * 0.6180339887)) | 1
    while math.gcd(k, blocks) != 1:
        k += 2
    return k * block_bytes


def run_qemu_img(server, name, write, args):
    count = args.qemu_img_count
    step = qemu_img_step_bytes(args.size)
    cmd = ["qemu-img", "bench", "-t", "writeback", "-c", str(count),
           "-d", "16", "-s", "4096", "-S", str(step)]
    if write:
        cmd += ["-w", "--pattern=165"]  # 0xa5: never the all-zero buffer
    cmd += server.qemu_img_target()
    timeout_s = count / QEMU_IMG_MIN_RATE_IOPS + CLIENT_SLACK_TIMEOUT_S
    rc, out, err = run_bounded(cmd, timeout_s)
    if rc != 0:
        raise BenchError(f"qemu-img bench exited {rc}: {' '.join(cmd)}\n{tail(out + err)}")
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    if not m:
        raise BenchError(f"cannot parse qemu-img bench output:\n{tail(out + err)}")
    seconds = float(m.group(1))
    if seconds <= 0:
        raise BenchError(f"qemu-img bench reported {seconds} s")
    return {"client": "qemu-img", "iops": count / seconds,
            "bytes_per_s": count * 4096 / seconds, "ios": count,
            "runtime_ms": seconds * 1000.0, "step_bytes": step}


def bench_server(name, paths, master, args, root, tls=None):
    """Runs every workload against one server on its own copy of the image."""
    workdir = os.path.join(root, name)
    os.mkdir(workdir)
    image = os.path.join(workdir, "disk.img")
    results = {}
    server = None
    try:
        log(f"[{name}] copying image ({human_bytes(args.size)})")
        copy_image(master, image, args.size)
        server = Server(name, paths, image, workdir, tls)
        server.start()
        log(f"[{name}] serving {server.uri} (pid {server.proc.pid})")
        for wname, _, options, direction in FIO_WORKLOADS:
            results[wname] = run_one(server, wname, args, workdir, lambda: run_fio(
                server, wname, options, direction, args, workdir))
        for wname, _, write in QEMU_IMG_WORKLOADS:
            if server.tls:
                # qemu-img bench (7.2) takes no --object: no TLS credentials to give it.
                results[wname] = {"skipped": "qemu-img bench cannot use TLS credentials"}
                continue
            results[wname] = run_one(server, wname, args, workdir, lambda: run_qemu_img(
                server, wname, write, args))
    except BenchError as e:
        log(f"[{name}] error: {e}")
        for wname in WORKLOAD_ORDER:
            results.setdefault(wname, {"error": str(e)})
    finally:
        if server is not None:
            server.stop()
            log(f"[{name}] stopped: {server.exit_note}")
            if server.capture_dir and os.path.isdir(server.capture_dir):
                results["_capture_log_bytes"] = dir_bytes(server.capture_dir)
            results["_server_exit"] = server.exit_note
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return results


def run_one(server, wname, args, workdir, fn):
    if not server.alive():
        return {"error": f"{server.name} exited (status {server.proc.returncode}) "
                         f"before this workload\n{server.log_tail()}"}
    free = free_bytes(workdir)
    if free < args.free_min:
        return {"error": f"only {free >> 20} MiB free on {workdir} "
                         f"(need {args.free_min >> 20} MiB): not starting {wname}"}
    # Not measured: write back what the previous workload left dirty.
    sync_paths([server.image] + ([server.capture_dir] if server.capture_dir else []))
    cpu_before = server.cpu_s()
    log(f"[{server.name}] {wname} ...")
    try:
        result = fn()
    except (BenchError, KeyError, ValueError, TypeError) as e:
        log(f"[{server.name}] {wname} failed: {e!r}" if not isinstance(e, BenchError)
            else f"[{server.name}] {wname} failed: {e}")
        if not server.alive():
            e = BenchError(f"{e}\n{server.name} exited with status "
                           f"{server.proc.returncode} during {wname} (if 0: "
                           "stopped by a signal from outside this script?)\n"
                           f"{server.log_tail()}")
            log(str(e))
        return {"error": str(e)}
    cpu_after = server.cpu_s()
    if cpu_before is not None and cpu_after is not None and result.get("ios"):
        result["server_cpu_s"] = cpu_after - cpu_before
    if server.capture_dir:
        result["capture_log_bytes_after"] = dir_bytes(server.capture_dir)
    log(f"[{server.name}] {wname}: {result['iops']:.0f} IOPS, "
        f"{result['bytes_per_s'] / (1 << 20):.1f} MiB/s" +
        (f", capture log now {result['capture_log_bytes_after'] >> 20} MiB"
         if server.capture_dir else ""))
    return result


# ---------------------------------------------------------------------------
# Report.

def ratio(results, num, den, workload):
    a = results.get(num, {}).get(workload, {})
    b = results.get(den, {}).get(workload, {})
    if "iops" in a and "iops" in b and b["iops"] > 0:
        return a["iops"] / b["iops"]
    return None


def print_report(results, servers, args):
    w_title = max(len(t) for t in WORKLOAD_TITLES.values()) + 2
    col = 20
    print()
    print(f"osrd NBD benchmark: image {human_bytes(args.size)}, fio runtime "
          f"{args.runtime} s (+{args.ramp_time} s ramp), qemu-img bench "
          f"{args.qemu_img_count} requests, 127.0.0.1, one server at a time")
    print()
    header = "workload".ljust(w_title) + "".join(s.rjust(col) for s in servers)
    sub = "".ljust(w_title) + "".join("IOPS      MiB/s".rjust(col) for _ in servers)
    print(header)
    print(sub)
    for w in WORKLOAD_ORDER:
        row = WORKLOAD_TITLES[w].ljust(w_title)
        for s in servers:
            r = results.get(s, {}).get(w, {})
            if "iops" in r:
                cell = f"{r['iops']:>9.0f} {r['bytes_per_s'] / (1 << 20):>9.1f}"
            else:
                cell = "n/a" if "skipped" in r else "error"
            row += cell.rjust(col)
        print(row)

    cols = [(n, d) for n, d in RATIO_COLUMNS if n in servers and d in servers]
    if cols:
        print()
        rcol = 24
        print("ratio (IOPS)".ljust(w_title) +
              "".join(f"{n} / {d}".rjust(rcol) for n, d in cols))
        for w in WORKLOAD_ORDER:
            row = WORKLOAD_TITLES[w].ljust(w_title)
            for n, d in cols:
                r = ratio(results, n, d, w)
                row += (f"{r:.2f}x" if r is not None else "-").rjust(rcol)
            print(row)

    flush = {s: results.get(s, {}).get("flush-write-4K", {}) for s in servers}
    flush_cells = [f"{s} {r['flushes']} flushes / {r['ios']} writes"
                   for s, r in flush.items() if "flushes" in r]
    if flush_cells:
        print()
        print("flush-write-4K check: " + "; ".join(flush_cells))
    captured = [(s, results[s]["_capture_log_bytes"]) for s in servers
                if "_capture_log_bytes" in results.get(s, {})]
    for s, b in captured:
        print(f"{s}: capture log used {b / (1 << 20):.0f} MiB on disk")
    errors = [(s, w, results[s][w]["error"]) for s in servers for w in WORKLOAD_ORDER
              if "error" in results.get(s, {}).get(w, {})]
    if errors:
        print()
        for s, w, e in errors:
            print(f"ERROR {s} {w}: " + "\n    ".join(e.splitlines()[:4]))

    print()
    print("bar (osrd with capture on)".ljust(56) + "measured".rjust(10) +
          "need".rjust(9) + "  result")
    bars = []
    for num, den, w, need in BARS:
        label = f"{num} / {den}, {WORKLOAD_TITLES[w]}"
        if num not in servers or den not in servers:
            got, verdict = None, "N/A (server not run)"
        else:
            got = ratio(results, num, den, w)
            verdict = "FAIL (no result)" if got is None else (
                "PASS" if got >= need else "FAIL")
        bars.append({"numerator": num, "denominator": den, "workload": w,
                     "need": need, "measured": got, "result": verdict.split()[0]})
        got_s = f"{got:.2f}x" if got is not None else "-"
        print(label.ljust(56) + got_s.rjust(10) + f">={need:.2f}x".rjust(9) +
              f"  {verdict}")
    print()
    for n in NOTES:
        print(f"note: {n}")
    return bars, errors


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--osrd", default=os.environ.get(
        "OSRD", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                             "build", "osrd")),
        help="osrd binary (default $OSRD or <repo>/build/osrd)")
    p.add_argument("--servers", default=",".join(ALL_SERVERS),
                   help="comma-separated subset of " + ",".join(ALL_SERVERS))
    p.add_argument("--size", type=parse_size, default=1 << 30,
                   help="image size, e.g. 256M, 1G (default 1G)")
    p.add_argument("--dir", default="/var/tmp",
                   help="parent directory for the work dir (a mkdtemp inside it; "
                        "default /var/tmp); images and capture logs live there")
    p.add_argument("--runtime", type=int, default=None,
                   help="seconds per fio workload (default 10, 3 with --quick)")
    p.add_argument("--ramp-time", dest="ramp_time", type=int, default=None,
                   help="fio ramp seconds, not measured (default 2, 1 with --quick)")
    p.add_argument("--qemu-img-count", type=int, default=None,
                   help="requests per qemu-img bench run (default 5000 per "
                        "second of --runtime)")
    p.add_argument("--quick", action="store_true", help="3 s runs")
    p.add_argument("--json", help="write the results to this file")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when a bar fails")
    p.add_argument("--keep", action="store_true",
                   help="keep the work dir (images, logs) for inspection")
    p.add_argument("--free-min", type=parse_size, default=FREE_BYTES_MIN_DEFAULT,
                   help="do not start a workload with less free disk (default 4G)")
    args = p.parse_args()

    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = [s for s in servers if s not in ALL_SERVERS]
    if unknown or not servers or len(set(servers)) != len(servers):
        p.error(f"--servers: choose from {','.join(ALL_SERVERS)} (got {args.servers})")
    servers = [s for s in ALL_SERVERS if s in servers]  # fixed column order
    if args.runtime is None:
        args.runtime = 3 if args.quick else 10
    if args.ramp_time is None:
        args.ramp_time = 1 if args.quick else 2
    if args.qemu_img_count is None:
        args.qemu_img_count = 5000 * args.runtime
    if args.runtime < 1 or args.ramp_time < 0 or args.qemu_img_count < 1:
        p.error("--runtime, --ramp-time and --qemu-img-count must be positive")
    if args.size < (16 << 20) or args.size % 4096:
        p.error("--size must be a multiple of 4 KiB and at least 16M")

    try:
        paths = find_tools(args, servers)
        os.makedirs(args.dir, exist_ok=True)
        need = 2 * args.size + args.free_min
        if free_bytes(args.dir) < need:
            raise BenchError(f"{args.dir} has {free_bytes(args.dir) >> 20} MiB free; "
                             f"need at least {need >> 20} MiB (two images + --free-min)")
    except BenchError as e:
        log(f"nbd_bench: {e}")
        return 2

    root = tempfile.mkdtemp(prefix="osrd-nbd-bench.", dir=args.dir)
    # Turn SIGTERM into an exception so the finally blocks stop the servers.
    signal.signal(signal.SIGTERM, raise_interrupt)
    results = {}
    tls = None
    started = time.time()
    load_start = os.getloadavg()
    try:
        master = os.path.join(root, "master.img")
        log(f"nbd_bench: work dir {root}; creating {human_bytes(args.size)} image")
        create_master_image(master, args.size)
        if any(s.endswith("-tls") for s in servers):
            tls = make_tls(paths, root)
        for s in servers:
            results[s] = bench_server(s, paths, master, args, root, tls)
    except BenchError as e:
        log(f"nbd_bench: {e}")
        return 1
    except KeyboardInterrupt:
        log("nbd_bench: interrupted")
        return 1
    finally:
        if tls is not None:
            shutil.rmtree(tls["fio_home"], ignore_errors=True)
        if args.keep:
            log(f"nbd_bench: kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    bars, errors = print_report(results, servers, args)
    print(f"load average at start {load_start[0]:.2f}, at end "
          f"{os.getloadavg()[0]:.2f} (other work on the machine skews results)")
    if args.json:
        doc = {"started_unix": started, "size_bytes": args.size,
               "runtime_s": args.runtime, "ramp_time_s": args.ramp_time,
               "qemu_img_count": args.qemu_img_count, "servers": servers,
               "tools": tool_versions(paths), "loadavg_start": load_start,
               "loadavg_end": os.getloadavg(), "results": results,
               "ratios": {f"{n}/{d}": {w: ratio(results, n, d, w) for w in WORKLOAD_ORDER}
                          for n, d in RATIO_COLUMNS if n in servers and d in servers},
               "bars": bars, "notes": NOTES}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        log(f"nbd_bench: results written to {args.json}")
    if errors:
        return 1
    if args.strict and any(b["result"] == "FAIL" for b in bars):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
