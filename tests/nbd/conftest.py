"""Shared fixtures for the cross-process NBD tests of `osrd nbd-serve`.

Every test here drives a real `osrd` process with real clients (qemu-io,
qemu-img, nbdinfo, nbdcopy, fio, python libnbd, raw sockets). Run with
Debian's interpreter, which has python3-libnbd:

    /usr/bin/python3 -m pytest -q tests/nbd

Environment:
    OSRD   path of the osrd binary (default: <repo>/build/osrd)

A missing binary or tool makes a test FAIL with a message, never skip.
Servers listen only on 127.0.0.1 (port 0) and on unix sockets in tmp_path.

The helpers shared with the other suites (binaries, the osrd process, libnbd,
bytes) live in tests/lib/osrtest.py; this file re-exports what the tests use.
"""

import errno
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
pytest.register_assert_rewrite("osrtest")

from osrtest import (KIB, MIB, OsrdProcess, assert_same_bytes,  # noqa: E402,F401
                     close_handle, first_difference, osrd_path, require_libnbd, require_osrd,
                     require_tool, stop_all_clean)
import osrtest  # noqa: E402

CMD_TIMEOUT_S = 120

# What the contract promises about limits.
BLOCK_SIZE_MIN = 1
BLOCK_SIZE_PREFERRED = 4096
BLOCK_SIZE_MAX = 32 * MIB


def run(cmd, timeout=CMD_TIMEOUT_S, check=True, **kwargs):
    """Runs a command with a timeout; on failure the message shows its output."""
    cmd = [str(c) for c in cmd]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\nstdout: {e.stdout}\n"
                    f"stderr: {e.stderr}")
    if check and proc.returncode != 0:
        pytest.fail(f"exit status {proc.returncode}: {' '.join(cmd)}\n"
                    f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def run_osrd(*args, timeout=CMD_TIMEOUT_S, check=True):
    return run([require_osrd(), *args], timeout=timeout, check=check)


class OsrdServer(OsrdProcess):
    """One `osrd nbd-serve` process, started and watched by the test (see OsrdProcess)."""

    label = "osrd"

    def __init__(self, args, log_path):
        super().__init__(log_path)
        self.args = [str(a) for a in args]
        self.uris = []

    def osrd_args(self):
        return ["nbd-serve", *self.args]

    def start(self):
        self.uris = []
        return super().start()

    def on_stdout_line(self, text):
        m = re.match(r"^osrd: listening on (\S+)$", text)
        if m:
            self.uris.append(m.group(1))

    def check_ready(self):
        if not self.uris:
            return f"osrd printed no 'osrd: listening on URI' line: {self.stdout_lines}"
        return None

    # -- addresses -----------------------------------------------------------

    @property
    def uri(self):
        return self.uris[0]

    @property
    def tcp_uri(self):
        for u in self.uris:
            if u.startswith("nbd://") or u.startswith("nbds://"):
                return u
        pytest.fail(f"no TCP URI printed: {self.uris}")

    @property
    def unix_uri(self):
        for u in self.uris:
            if u.startswith("nbd+unix://"):
                return u
        pytest.fail(f"no unix URI printed: {self.uris}")

    @property
    def tcp_address(self):
        m = re.match(r"^nbds?://([0-9.]+):(\d+)/", self.tcp_uri)
        assert m, f"cannot parse TCP URI {self.tcp_uri}"
        return m.group(1), int(m.group(2))


@pytest.fixture
def osrd_factory(tmp_path):
    """start(image, size=None, capture=None, read_only=False, export=None,
    listen=True, socket=False, region_size=None, extra=()) -> OsrdServer.

    Servers still running at teardown are stopped with SIGTERM and must exit 0.
    """
    servers = []
    counter = [0]

    def start(image, size=None, capture=None, read_only=False, export=None, listen=True,
              socket=False, region_size=None, extra=()):
        counter[0] += 1
        args = ["--image", image]
        if size is not None:
            args += ["--size", size]
        if listen:
            args += ["--listen", "127.0.0.1:0"]
        if socket:
            sock = socket if isinstance(socket, (str, Path)) else tmp_path / f"osrd{counter[0]}.sock"
            args += ["--socket", sock]
        if export is not None:
            args += ["--export", export]
        if capture is not None:
            args += ["--capture", capture]
        if read_only:
            args += ["--read-only"]
        if region_size is not None:
            args += ["--region-size", region_size]
        args += list(extra)
        server = OsrdServer(args, tmp_path / f"osrd{counter[0]}.stderr")
        servers.append(server)
        return server.start()

    yield start

    stop_all_clean(servers)


@pytest.fixture
def server(osrd_factory, tmp_path):
    """A 32 MiB sparse export named '' on TCP and a unix socket."""
    return osrd_factory(tmp_path / "disk.img", size="32M", socket=True)


# -- libnbd helpers -----------------------------------------------------------


def connect(uri, structured=True, strict=True, meta=True, opt_mode=False):
    """A libnbd handle connected to uri (strict=False lets bad requests reach the server)."""
    return osrtest.connect(uri, "pytest", structured=structured, strict=strict, meta=meta,
                           opt_mode=opt_mode)


close = close_handle


def nbd_errno(fn, *args, **kwargs):
    """Calls fn and returns the errno of the nbd.Error it must raise."""
    lib = require_libnbd()
    try:
        fn(*args, **kwargs)
    except lib.Error as e:
        return e.errnum
    pytest.fail(f"{getattr(fn, '__name__', fn)}{args} succeeded but an error was expected")


def assert_serves(uri, size, rng=None):
    """A fresh client can write, read back, trim and read zeros."""
    rng = rng or random.Random()
    h = connect(uri)
    try:
        off = rng.randrange(0, size - 256 * KIB) // 4096 * 4096
        data = rng.randbytes(128 * KIB)
        h.pwrite(data, off)
        assert h.pread(len(data), off) == data, "server returned other data than written"
        h.trim(64 * KIB, off)
        assert h.pread(64 * KIB, off) == bytes(64 * KIB), "trimmed range does not read zeros"
        assert h.pread(64 * KIB, off + 64 * KIB) == data[64 * KIB:]
        h.flush()
    finally:
        close(h)


# -- files ------------------------------------------------------------------------


def make_sparse_file(path, size, extents, seed=1):
    """Creates a sparse file of size bytes with random data in [(offset, length)]."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, length in extents:
            f.seek(off)
            f.write(rng.randbytes(length))
    return Path(path).read_bytes()


def data_extents(path):
    """[(offset, length)] of the data (non-hole) ranges of a file, via SEEK_DATA/SEEK_HOLE."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                d = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            h = os.lseek(fd, d, os.SEEK_HOLE)
            out.append((d, h - d))
            pos = h
    finally:
        os.close(fd)
    return out


# -- capture CLI ----------------------------------------------------------------


def capture_dump_json(log_dir, check=True):
    proc = run_osrd("capture", "dump", "--log", log_dir, "--output", "json", check=False)
    if check and proc.returncode != 0:
        pytest.fail(f"osrd capture dump exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}")
    try:
        doc = json.loads(proc.stdout)
    except json.JSONDecodeError as e:
        pytest.fail(f"capture dump --output json printed no JSON ({e}): {proc.stdout[:2000]!r}")
    return proc.returncode, doc


def capture_dirty_json(log_dir):
    proc = run_osrd("capture", "dirty", "--log", log_dir, "--output", "json")
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as e:
        pytest.fail(f"capture dirty --output json printed no JSON ({e}): {proc.stdout[:2000]!r}")


def capture_replay(log_dir, base, out, upto=None):
    """Runs replay, checks its summary line; returns (count, first_seq, last_seq)."""
    args = ["capture", "replay", "--log", log_dir, "--base", base, "--out", out]
    if upto is not None:
        args += ["--upto", str(upto)]
    proc = run_osrd(*args)
    m = re.search(r"osrd: replayed (\d+) records \(seq (\d+)\.\.(\d+)\) onto (\S+)", proc.stdout)
    assert m, f"replay printed no summary line: {proc.stdout!r}"
    assert m.group(4) == str(out), f"replay summary names {m.group(4)}, not {out}"
    return int(m.group(1)), int(m.group(2)), int(m.group(3))
