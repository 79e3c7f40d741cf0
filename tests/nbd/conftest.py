"""Shared fixtures for the cross-process NBD tests of `osrd nbd-serve`.

Every test here drives a real `osrd` process with real clients (qemu-io,
qemu-img, nbdinfo, nbdcopy, fio, python libnbd, raw sockets). Run with
Debian's interpreter, which has python3-libnbd:

    /usr/bin/python3 -m pytest -q tests/nbd

Environment:
    OSRD   path of the osrd binary (default: <repo>/build/osrd)

A missing binary or tool makes a test FAIL with a message, never skip.
Servers listen only on 127.0.0.1 (port 0) and on unix sockets in tmp_path.
"""

import contextlib
import errno
import json
import os
import random
import re
import selectors
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

try:
    import nbd  # python3-libnbd
except ImportError:  # pragma: no cover - reported by the fixture below
    nbd = None

REPO_ROOT = Path(__file__).resolve().parents[2]
KIB = 1024
MIB = 1024 * 1024

READY_TIMEOUT_S = 10
STOP_TIMEOUT_S = 10
CMD_TIMEOUT_S = 120

# What the contract promises about limits.
BLOCK_SIZE_MIN = 1
BLOCK_SIZE_PREFERRED = 4096
BLOCK_SIZE_MAX = 32 * MIB


def osrd_path():
    return Path(os.environ.get("OSRD", str(REPO_ROOT / "build" / "osrd")))


def require_tool(name):
    """Returns the path of a tool; a missing tool fails the test loudly."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"required tool '{name}' is not installed (scripts/bootstrap installs it)",
                    pytrace=False)
    return path


def require_libnbd():
    if nbd is None:
        pytest.fail("python3-libnbd is missing: run the tests with Debian's /usr/bin/python3 "
                    "(apt-get install python3-libnbd)", pytrace=False)
    return nbd


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
    binary = osrd_path()
    if not binary.exists():
        pytest.fail(f"osrd binary not found at {binary} (build it, or set OSRD)", pytrace=False)
    return run([binary, *args], timeout=timeout, check=check)


class OsrdServer:
    """One `osrd nbd-serve` process, started and watched by the test."""

    def __init__(self, args, log_path):
        self.args = [str(a) for a in args]
        self.log_path = Path(log_path)
        self.uris = []
        self.stdout_lines = []
        self.proc = None
        self._drain = None
        self.exit_code = None

    # -- lifecycle -----------------------------------------------------------

    def start(self):
        binary = osrd_path()
        if not binary.exists():
            pytest.fail(f"osrd binary not found at {binary} (build it, or set OSRD)",
                        pytrace=False)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(binary), "nbd-serve", *self.args],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._log)
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + READY_TIMEOUT_S
        buf = b""
        ready = False
        while not ready:
            left = deadline - time.monotonic()
            if left <= 0:
                self._abort()
                pytest.fail(f"osrd did not print 'osrd: ready' within {READY_TIMEOUT_S}s\n"
                            f"stdout so far: {self.stdout_lines}\nstderr: {self.stderr()}")
            if not sel.select(timeout=left):
                continue
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
                pytest.fail(f"osrd exited with {self.proc.returncode} before ready\n"
                            f"stdout: {self.stdout_lines}\nstderr: {self.stderr()}")
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode(errors="replace").rstrip("\r")
                self.stdout_lines.append(text)
                m = re.match(r"^osrd: listening on (\S+)$", text)
                if m:
                    self.uris.append(m.group(1))
                if text == "osrd: ready":
                    ready = True
                    break
        sel.close()
        # Keep draining stdout so that a chatty server never blocks on a full pipe.
        self._drain = threading.Thread(target=self._drain_stdout, args=(buf,), daemon=True)
        self._drain.start()
        if not self.uris:
            self._abort()
            pytest.fail(f"osrd printed no 'osrd: listening on URI' line: {self.stdout_lines}")
        return self

    def _drain_stdout(self, rest):
        lines = rest.decode(errors="replace").splitlines()
        self.stdout_lines.extend(lines)
        for line in self.proc.stdout:
            self.stdout_lines.append(line.decode(errors="replace").rstrip("\n"))

    def _abort(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT_S)

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM):
        """Stops with SIGTERM (or sig); returns the exit code. kill -9 after 10 s."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT_S)
                self.exit_code = self.proc.returncode
                self._close()
                pytest.fail(f"osrd did not stop within {STOP_TIMEOUT_S}s of {sig!r}; "
                            f"killed with SIGKILL\nstderr: {self.stderr()}")
        self.exit_code = self.proc.returncode
        self._close()
        return self.exit_code

    def stop_clean(self):
        """SIGTERM and assert a clean exit (status 0)."""
        code = self.stop()
        assert code == 0, f"osrd exited with {code} after SIGTERM\nstderr: {self.stderr()}"

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=STOP_TIMEOUT_S)
        self.exit_code = self.proc.returncode
        self._close()

    def _close(self):
        if self._drain is not None:
            self._drain.join(timeout=5)
        with contextlib.suppress(Exception):
            self.proc.stdout.close()
        with contextlib.suppress(Exception):
            self._log.close()

    def stderr(self):
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    # -- addresses -----------------------------------------------------------

    @property
    def uri(self):
        return self.uris[0]

    @property
    def tcp_uri(self):
        for u in self.uris:
            if u.startswith("nbd://"):
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
        m = re.match(r"^nbd://([0-9.]+):(\d+)/", self.tcp_uri)
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

    problems = []
    for s in servers:
        if s.alive():
            code = s.stop()
            if code != 0:
                problems.append(f"osrd exited with {code} on SIGTERM at teardown\n{s.stderr()}")
    if problems:
        pytest.fail("\n".join(problems))


@pytest.fixture
def server(osrd_factory, tmp_path):
    """A 32 MiB sparse export named '' on TCP and a unix socket."""
    return osrd_factory(tmp_path / "disk.img", size="32M", socket=True)


# -- libnbd helpers -----------------------------------------------------------


def connect(uri, structured=True, strict=True, meta=True, opt_mode=False):
    """A libnbd handle connected to uri (strict=False lets bad requests reach the server)."""
    lib = require_libnbd()
    h = lib.NBD()
    h.set_handle_name("pytest")
    if not structured:
        h.set_request_structured_replies(False)
    if meta:
        h.add_meta_context(lib.CONTEXT_BASE_ALLOCATION)
    if not strict:
        h.set_strict_mode(0)
    if opt_mode:
        h.set_opt_mode(True)
    h.connect_uri(uri)
    return h


def close(h):
    with contextlib.suppress(Exception):
        h.shutdown()
    with contextlib.suppress(Exception):
        h.close()


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


def first_difference(a, b):
    if len(a) != len(b):
        return f"sizes differ: {len(a)} != {len(b)}"
    step = 64 * KIB
    for off in range(0, len(a), step):
        if a[off:off + step] != b[off:off + step]:
            for i in range(off, min(off + step, len(a))):
                if a[i] != b[i]:
                    return f"first difference at byte {i}: {a[i]:#04x} != {b[i]:#04x}"
    return None


def assert_same_bytes(a, b, what):
    diff = first_difference(a, b)
    assert diff is None, f"{what}: {diff}"


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
