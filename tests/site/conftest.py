"""Shared fixtures for the cross-process tests of the site daemon (`osrd site`).

Two real `osrd site --config FILE` processes, "primary" and "recovery", each with
its own data_dir under tmp_path, every address 127.0.0.1:0. The tests drive them
through their HTTP API (urllib) and their NBD exports (python3-libnbd), as the
vault and the VMs would. Run with Debian's interpreter, which has python3-libnbd:

    /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/site

Environment:
    OSRD           path of the osrd binary (default: <repo>/build/osrd)
    OSR_TEST_SEED  the seed of the random data (default: random; failures name it)

A missing binary or tool makes a test FAIL with a message, never skip. Every wait
is bounded in time.
"""

import contextlib
import json
import os
import random
import re
import selectors
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

try:
    import nbd  # python3-libnbd
except ImportError:  # pragma: no cover - reported by require_libnbd()
    nbd = None

REPO_ROOT = Path(__file__).resolve().parents[2]
KIB = 1024
MIB = 1024 * 1024

READY_TIMEOUT_S = 10
STOP_TIMEOUT_S = 10
HTTP_TIMEOUT_S = 10
CATCH_UP_TIMEOUT_S = 20
READ_CHUNK = 4 * MIB


def osrd_path():
    return Path(os.environ.get("OSRD", str(REPO_ROOT / "build" / "osrd")))


def require_libnbd():
    if nbd is None:
        pytest.fail("python3-libnbd is missing: run the tests with Debian's /usr/bin/python3 "
                    "(apt-get install python3-libnbd)", pytrace=False)
    return nbd


# -- one site process -------------------------------------------------------------


class SiteProcess:
    """One `osrd site --config FILE` process, started and watched by the test."""

    def __init__(self, name, config_path, data_dir, log_path):
        self.name = name
        self.config_path = Path(config_path)
        self.data_dir = Path(data_dir)
        self.log_path = Path(log_path)
        self.proc = None
        self.stdout_lines = []
        self.api_url = None       # http://127.0.0.1:PORT/api/v1
        self.nbd = None           # 127.0.0.1:PORT
        self.replication = None   # 127.0.0.1:PORT
        self.exit_code = None
        self._drain = None
        self._log = None

    def start(self):
        binary = osrd_path()
        if not binary.exists():
            pytest.fail(f"osrd binary not found at {binary} (build it, or set OSRD)",
                        pytrace=False)
        self.stdout_lines = []
        self.api_url = self.nbd = self.replication = None
        self.exit_code = None
        self._log = open(self.log_path, "ab")
        self._log.write(f"---- start {time.strftime('%H:%M:%S')}\n".encode())
        self._log.flush()
        try:
            self.proc = subprocess.Popen(
                [str(binary), "site", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log)
        except OSError as e:
            self._log.close()
            pytest.fail(f"cannot run {binary}: {e} (is it being rebuilt? set OSRD)",
                        pytrace=False)
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + READY_TIMEOUT_S
        buf = b""
        ready = False
        try:
            while not ready:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._abort()
                    pytest.fail(f"site {self.name}: no 'osrd: ready' within {READY_TIMEOUT_S}s\n"
                                f"stdout so far: {self.stdout_lines}\nstderr: {self.stderr()}")
                if not sel.select(timeout=left):
                    continue
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    self.proc.wait(timeout=STOP_TIMEOUT_S)
                    pytest.fail(f"site {self.name}: osrd exited with {self.proc.returncode} "
                                f"before ready\nstdout: {self.stdout_lines}\n"
                                f"stderr: {self.stderr()}")
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    text = line.decode(errors="replace").rstrip("\r")
                    self.stdout_lines.append(text)
                    self._parse(text)
                    if text == "osrd: ready":
                        ready = True
                        break
        finally:
            sel.close()
        # Keep draining stdout so that a chatty daemon never blocks on a full pipe.
        self._drain = threading.Thread(target=self._drain_stdout, args=(buf,), daemon=True)
        self._drain.start()
        missing = [what for what, v in (("api", self.api_url), ("nbd", self.nbd),
                                        ("replication", self.replication)) if v is None]
        if missing or f"osrd: site {self.name}" not in self.stdout_lines:
            self._abort()
            pytest.fail(f"site {self.name}: the startup lines lack {missing or 'the site name'}: "
                        f"{self.stdout_lines}")
        return self

    def _parse(self, text):
        m = re.match(r"^osrd: api on (http://127\.0\.0\.1:(\d+)/api/v1)$", text)
        if m:
            self.api_url = m.group(1)
        m = re.match(r"^osrd: nbd on (127\.0\.0\.1:\d+)$", text)
        if m:
            self.nbd = m.group(1)
        m = re.match(r"^osrd: replication on (127\.0\.0\.1:\d+)$", text)
        if m:
            self.replication = m.group(1)

    def _drain_stdout(self, rest):
        self.stdout_lines.extend(rest.decode(errors="replace").splitlines())
        for line in self.proc.stdout:
            self.stdout_lines.append(line.decode(errors="replace").rstrip("\n"))

    def _abort(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        self._close()

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM):
        """Stops with SIGTERM (or sig); returns the exit code. SIGKILL after 10 s (a failure)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)  # in case a test left it stopped
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT_S)
                self.exit_code = self.proc.returncode
                self._close()
                pytest.fail(f"site {self.name}: osrd did not stop within {STOP_TIMEOUT_S}s of "
                            f"{sig!r}; killed with SIGKILL\nstderr: {self.stderr()}")
        self.exit_code = self.proc.returncode
        self._close()
        return self.exit_code

    def stop_clean(self):
        code = self.stop()
        assert code == 0, (f"site {self.name}: osrd exited with {code} after SIGTERM\n"
                           f"stderr: {self.stderr()}")

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=STOP_TIMEOUT_S)
        self.exit_code = self.proc.returncode
        self._close()

    def restart(self):
        """Starts the same config (same data_dir) again; the ports are new (port 0)."""
        assert not self.alive(), f"site {self.name} is still running"
        return self.start()

    def _close(self):
        if self._drain is not None:
            self._drain.join(timeout=5)
            self._drain = None
        with contextlib.suppress(Exception):
            self.proc.stdout.close()
        with contextlib.suppress(Exception):
            self._log.close()

    def stderr(self):
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""


def write_config(tmp_path, name):
    data_dir = tmp_path / f"{name}-data"
    config = tmp_path / f"{name}.toml"
    config.write_text(
        f'name = "{name}"\n'
        f'data_dir = "{data_dir}"\n'
        'nbd_listen = "127.0.0.1:0"\n'
        'replication_listen = "127.0.0.1:0"\n'
        'api_listen = "127.0.0.1:0"\n')
    return config, data_dir


@pytest.fixture
def site_factory(tmp_path):
    """start(name) -> SiteProcess. Sites still running at teardown get SIGTERM and must
    exit 0."""
    sites = []

    def start(name):
        config, data_dir = write_config(tmp_path, name)
        s = SiteProcess(name, config, data_dir, tmp_path / f"{name}.stderr")
        sites.append(s)
        return s.start()

    yield start

    problems = []
    for s in sites:
        if s.alive():
            code = s.stop()
            if code != 0:
                problems.append(f"site {s.name}: osrd exited with {code} on SIGTERM at "
                                f"teardown\n{s.stderr()}")
    if problems:
        pytest.fail("\n".join(problems))


@pytest.fixture
def sites(site_factory):
    """(primary, recovery): two running sites."""
    require_libnbd()
    return site_factory("primary"), site_factory("recovery")


# -- HTTP API -----------------------------------------------------------------------


def api(site, method, path, body=None, raw=None, timeout=HTTP_TIMEOUT_S):
    """Calls the site's API; path is relative to /api/v1 ("/groups/vm1") or absolute
    ("/metrics"). Returns (status, decoded JSON or None for an empty body)."""
    root = site.api_url[:-len("/api/v1")]
    url = root + (path if path.startswith("/api/v1") or path == "/metrics" else "/api/v1" + path)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, text = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        pytest.fail(f"{method} {url} to site {site.name} failed: {e}\nstderr: {site.stderr()}")
    if not text:
        return status, None
    if path == "/metrics":
        return status, text.decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        pytest.fail(f"{method} {url}: status {status} with a body that is not JSON: {text[:500]!r}")


def api_ok(site, method, path, body=None, status=200):
    got, doc = api(site, method, path, body)
    assert got == status, f"{method} {path} at {site.name}: {got} {doc} (expected {status})"
    return doc


def assert_error(site, method, path, body, status, raw=None):
    """The call fails with `status` and an {"error": {code, message}} body."""
    got, doc = api(site, method, path, body, raw=raw)
    assert got == status, (f"{method} {path} {body if raw is None else raw!r} at {site.name}: "
                           f"status {got} {doc}, expected {status}")
    assert isinstance(doc, dict) and isinstance(doc.get("error"), dict), \
        f"{method} {path}: status {got} without an error object: {doc!r}"
    err = doc["error"]
    assert isinstance(err.get("code"), str) and err["code"], f"error without a code: {doc}"
    assert isinstance(err.get("message"), str) and err["message"], \
        f"error without a message: {doc}"
    return err


def wait_for(pred, timeout, what, interval=0.05):
    """Polls pred() until it returns a truthy value; fails after timeout seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = pred()
        if last:
            return last
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def store_status(site, vm):
    return api_ok(site, "GET", f"/stores/{vm}")


def group_status(site, vm):
    return api_ok(site, "GET", f"/groups/{vm}")


def wait_durable(recovery, vm, seq, timeout=CATCH_UP_TIMEOUT_S, primary=None):
    """Waits until the store's durable_seq reaches seq; it must never pass it."""
    deadline = time.monotonic() + timeout
    doc = None
    while time.monotonic() < deadline:
        doc = store_status(recovery, vm)
        assert doc["durable_seq"] <= seq, \
            f"store {vm}: durable_seq {doc['durable_seq']} is beyond the source's {seq}"
        if doc["durable_seq"] == seq:
            return doc
        time.sleep(0.05)
    extra = ""
    if primary is not None:
        extra = f"\nprimary group: {api(primary, 'GET', f'/groups/{vm}')[1]}"
    pytest.fail(f"store {vm}: durable_seq is {doc and doc['durable_seq']} after {timeout}s, "
                f"expected {seq}{extra}\nrecovery stderr: {recovery.stderr()[-2000:]}")


def protect(primary, recovery, vm, disks):
    """A store for vm at the recovery site, group vm at the primary, replication on.
    disks: [(name, size_bytes)]. Returns the primary's PUT-group answer."""
    spec = {"disks": [{"name": n, "size_bytes": s} for n, s in disks]}
    got, doc = api(recovery, "PUT", f"/stores/{vm}", spec)
    assert got == 201, f"PUT /stores/{vm} at recovery: {got} {doc}"
    got, group = api(primary, "PUT", f"/groups/{vm}", spec)
    assert got == 201, f"PUT /groups/{vm} at primary: {got} {group}"
    assert group["name"] == vm
    assert [(d["name"], d["size_bytes"]) for d in group["disks"]] == list(disks), group
    for d in group["disks"]:
        assert d["uri"] == f"nbd://{primary.nbd}/{vm}/{d['name']}", group
    got, doc = api(primary, "PUT", f"/groups/{vm}/replication",
                   {"target": recovery.replication})
    assert got == 204, f"PUT /groups/{vm}/replication: {got} {doc}"
    return group


def open_view(recovery, vm, seq, writable=None):
    body = {"seq": seq}
    if writable is not None:
        body["writable"] = writable
    got, doc = api(recovery, "POST", f"/stores/{vm}/views", body)
    assert got == 201, f"POST /stores/{vm}/views {body}: {got} {doc}"
    assert doc["vm"] == vm and doc["seq"] == seq and doc["writable"] == bool(writable), doc
    assert isinstance(doc["id"], str) and doc["id"], doc
    for d in doc["disks"]:
        assert d["uri"] == f"nbd://{recovery.nbd}/{doc['id']}/{d['name']}", doc
    return doc


def close_view(recovery, view_id):
    got, doc = api(recovery, "DELETE", f"/views/{view_id}")
    assert got == 204, f"DELETE /views/{view_id}: {got} {doc}"


# -- NBD ------------------------------------------------------------------------------


def connect(uri):
    lib = require_libnbd()
    h = lib.NBD()
    h.set_handle_name("pytest-site")
    h.connect_uri(uri)
    return h


def close(h):
    with contextlib.suppress(Exception):
        h.shutdown()
    with contextlib.suppress(Exception):
        h.close()


def read_all(uri, size=None):
    """The whole export at uri, read in 4 MiB requests over one connection."""
    h = connect(uri)
    try:
        total = h.get_size()
        if size is not None:
            assert total == size, f"{uri}: size {total}, expected {size}"
        out = bytearray()
        for off in range(0, total, READ_CHUNK):
            out += h.pread(min(READ_CHUNK, total - off), off)
        return bytes(out)
    finally:
        close(h)


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


def assert_same_bytes(got, want, what):
    if got == want:
        return
    diff = first_difference(got, want)
    assert diff is None, f"{what}: {diff}"


# -- a model of a group's disks ---------------------------------------------------------


class GroupModel:
    """The bytes of a group's disks after every sequence number.

    ops[i] is the operation that got seq i+1: (disk, kind, offset, length, data) with
    kind 'write', 'zero' or 'trim' (both of the latter read as zeros afterwards)."""

    def __init__(self, sizes):
        self.sizes = list(sizes)
        self.ops = []

    @property
    def last_seq(self):
        return len(self.ops)

    def record(self, disk, kind, offset, length, data=None):
        self.ops.append((disk, kind, offset, length, data))
        return len(self.ops)

    def at(self, seq):
        """[bytes of disk i] as of seq."""
        assert 0 <= seq <= len(self.ops)
        disks = [bytearray(s) for s in self.sizes]
        for disk, kind, off, length, data in self.ops[:seq]:
            if kind == "write":
                disks[disk][off:off + length] = data
            else:
                disks[disk][off:off + length] = bytes(length)
        return [bytes(d) for d in disks]


def random_op(rng, sizes, disk, max_len=256 * KIB, weights=(8, 1, 1)):
    """(kind, offset, length, data) within the disk: unaligned offsets and lengths."""
    kind = rng.choices(["write", "zero", "trim"], weights=weights)[0]
    size = sizes[disk]
    if rng.random() < 0.3:  # aligned, 4 KiB multiples
        length = rng.randrange(1, max_len // 4096 + 1) * 4096
        offset = rng.randrange(0, (size - length) // 4096 + 1) * 4096
    else:
        length = rng.randrange(1, max_len + 1)
        offset = rng.randrange(0, size - length + 1)
    data = rng.randbytes(length) if kind == "write" else None
    return kind, offset, length, data


def apply_op(h, kind, offset, length, data):
    """Sends one request over libnbd handle h and waits for its reply."""
    if kind == "write":
        h.pwrite(data, offset)
    elif kind == "zero":
        h.zero(length, offset)
    elif kind == "trim":
        h.trim(length, offset)
    else:
        raise AssertionError(kind)


def seed_for(request):
    """A per-test seed: OSR_TEST_SEED, or random (failure messages name it, so that
    OSR_TEST_SEED=N reproduces the run's data)."""
    env = os.environ.get("OSR_TEST_SEED")
    return int(env) if env else random.randrange(1 << 30)
