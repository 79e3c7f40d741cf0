"""Shared fixtures for the end-to-end tests of the `osr` CLI against a real quickstart.

Each test starts its own `osrd quickstart --dir TMP --vault-listen 127.0.0.1:PORT` (a
vault and the sites `primary` and `recovery` in one process, every address on
127.0.0.1), drives it only through `osr --vault http://127.0.0.1:PORT --output json ...`
and the NBD URIs the CLI prints (python3-libnbd), and keeps a model of every byte it
wrote. Run with Debian's interpreter, which has python3-libnbd:

    /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/e2e

Environment:
    OSRD           path of the osrd binary (default: <repo>/build/osrd)
    OSR            path of the osr binary (default: <repo>/build/osr)
    OSR_TEST_SEED  the seed of the random data (default: random; failures name it)
    OSR_TEST_VAULT_DB  the vault's catalog, as --vault-db: sqlite (the default,
                   <dir>/vault.db) or postgresql (one PostgreSQL 15 server for the session,
                   a fresh database per quickstart: `osrd quickstart --db postgresql://...`)

A missing binary or tool makes a test FAIL with a message, never skip. Every wait is
bounded: CLI calls have a timeout, and a watchdog SIGKILLs the quickstart of a test
that runs past TEST_DEADLINE_S (which unblocks any NBD call) and fails it.

The helpers shared with the other suites (binaries, the osrd process, libnbd,
bytes) live in tests/lib/osrtest.py; this file re-exports what the tests use.
"""

import calendar
import contextlib
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
pytest.register_assert_rewrite("osrtest")

from osrtest import (KIB, MIB, OsrdProcess, apply_model, apply_op,  # noqa: E402,F401
                     assert_same_bytes, close_handle, free_port, random_op,
                     read_handle, require_libnbd, require_osr, seed_from_env, stop_all_clean)
from osrtest import make_certs, tls_client_context, token_env  # noqa: E402,F401
from osrtest import new_catalog, vault_pg_server  # noqa: E402,F401 (fixtures)
import osrtest  # noqa: E402

# The watchdogs below are stretched by OSR_TEST_TIME_FACTOR (3 on the ASan/UBSan build,
# whose daemons and CLI run about 3x slower; ctest sets it): they bound a hung test, they
# do not measure speed.
TIME_FACTOR = float(os.environ.get("OSR_TEST_TIME_FACTOR", "1"))
CLI_TIMEOUT_S = 60 * TIME_FACTOR    # one osr call (a --wait job included)
TEST_DEADLINE_S = 75                # a whole test, watchdog (times TIME_FACTOR)
NBD_HANDLE_NAME = "pytest-e2e"


# -- the quickstart process --------------------------------------------------------


class Quickstart(OsrdProcess):
    """One `osrd quickstart` process, started and watched by the test (see OsrdProcess)."""

    label = "quickstart"
    ready_timeout = 15

    def __init__(self, data_dir, port, log_path, catalog, extra_env=None):
        super().__init__(log_path)
        self.data_dir = Path(data_dir)
        self.port = port
        self.catalog = catalog  # an osrtest.Catalog: <data_dir>/vault.db or a PostgreSQL db
        self.extra_env = extra_env

    def osrd_env(self):
        if not self.extra_env:
            return None
        return {**os.environ, **self.extra_env}

    @property
    def vault_url(self):
        return f"http://127.0.0.1:{self.port}"

    def osrd_args(self):
        args = ["quickstart", "--dir", self.data_dir, "--vault-listen", f"127.0.0.1:{self.port}"]
        if self.catalog.backend != "sqlite":
            args += ["--db", self.catalog.db_arg]
        else:  # the default path, as a user gets it
            assert self.catalog.sqlite_path == self.data_dir / "vault.db", self.catalog
        return args

    def check_ready(self):
        want = f"  vault: {self.vault_url}/api/v1"
        if want not in self.stdout_lines:
            return f"quickstart did not announce {want.strip()!r}: {self.stdout_lines}"
        return self.catalog.check_in_use(self.data_dir / "vault.db")


# -- the CLI ----------------------------------------------------------------------------


class Osr:
    """Runs `osr --vault URL --output json ...` with a timeout."""

    def __init__(self, qs):
        self.qs = qs

    def run(self, *args, timeout=CLI_TIMEOUT_S, vault=None):
        binary = require_osr()
        cmd = [str(binary), "--vault", vault or self.qs.vault_url, "--output", "json",
               *[str(a) for a in args]]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL,
                                  env=token_env(self.qs.data_dir / "admin.token"))
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\nstdout: {e.stdout}\n"
                        f"stderr: {e.stderr}\nquickstart stderr: {self.qs.stderr()[-3000:]}")
        except OSError as e:
            pytest.fail(f"cannot run {binary}: {e} (is it being rebuilt? set OSR)",
                        pytrace=False)

    def ok(self, *args, timeout=CLI_TIMEOUT_S):
        """The command exits 0 and prints JSON on stdout; returns it."""
        proc = self.run(*args, timeout=timeout)
        shown = "osr " + " ".join(str(a) for a in args)
        if proc.returncode != 0:
            pytest.fail(f"{shown}: exit status {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}"
                        f"\nstderr:\n{proc.stderr[-3000:]}\n"
                        f"quickstart stderr:\n{self.qs.stderr()[-3000:]}")
        try:
            return json.loads(proc.stdout)
        except json.JSONDecodeError as e:
            pytest.fail(f"{shown} --output json printed no JSON ({e}): {proc.stdout[:2000]!r}")

    def fails(self, *args, timeout=CLI_TIMEOUT_S, vault=None):
        """The command exits non-zero with 'osr: error: ...' on stderr; returns the message."""
        proc = self.run(*args, timeout=timeout, vault=vault)
        shown = "osr " + " ".join(str(a) for a in args)
        assert proc.returncode != 0, (f"{shown} succeeded but must fail\n"
                                      f"stdout:\n{proc.stdout[-2000:]}")
        assert proc.stderr.startswith("osr: error: "), \
            f"{shown}: stderr does not start with 'osr: error: ': {proc.stderr[-2000:]!r}"
        first = proc.stderr.splitlines()[0][len("osr: error: "):].strip()
        assert first, f"{shown}: an empty error message"
        return first

    def job_ok(self, *args, job_type=None):
        """A --wait job command: exit 0, the job JSON, state Succeeded, all steps Succeeded."""
        job = self.ok(*args, "--wait")
        shown = "osr " + " ".join(str(a) for a in args)
        assert job.get("state") == "Succeeded", f"{shown}: job {job}"
        assert job.get("error") is None, f"{shown}: job has an error: {job}"
        assert job.get("progress") == 100, f"{shown}: job progress: {job}"
        if job_type is not None:
            assert job.get("type") == job_type, f"{shown}: job type: {job}"
        assert isinstance(job.get("id"), int) and job["id"] > 0, job
        steps = job.get("steps")
        assert isinstance(steps, list) and steps, f"{shown}: a job without steps: {job}"
        for s in steps:
            assert isinstance(s.get("name"), str) and s["name"], f"{shown}: step {s}"
            assert s.get("state") == "Succeeded", f"{shown}: step not Succeeded: {s}"
        # The job as stored says the same.
        stored = self.ok("job", "show", job["id"])
        assert stored["state"] == "Succeeded" and stored["type"] == job["type"], stored
        return job


@pytest.fixture
def seed():
    """OSR_TEST_SEED, or random; printed (pytest shows it with a failure)."""
    s = seed_from_env()
    print(f"OSR_TEST_SEED={s}")
    return s


@pytest.fixture
def rng(seed):
    return random.Random(seed)


FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


class FakeTime:
    """The wall clock of a quickstart run under libfaketime (Debian's libfaketime): the
    daemon reads its offset from a file at most once a second
    (FAKETIME_CACHE_DURATION=1); the monotonic clock is left alone
    (FAKETIME_DONT_FAKE_MONOTONIC=1). step(seconds) moves the wall clock as NTP or
    `date -s` would; the host's clock is never touched."""

    def __init__(self, path):
        self.path = Path(path)
        self.offset_s = 0
        self._write()

    def _write(self):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"{self.offset_s:+d}\n")
        os.replace(tmp, self.path)

    def step(self, seconds):
        self.offset_s += seconds
        self._write()

    def env(self):
        if not FAKETIME_LIB.exists():
            pytest.fail(f"{FAKETIME_LIB} is missing (Debian package libfaketime; "
                        "scripts/bootstrap installs it)", pytrace=False)
        env = {"LD_PRELOAD": str(FAKETIME_LIB),
               "FAKETIME_TIMESTAMP_FILE": str(self.path),
               "FAKETIME_CACHE_DURATION": "1",
               "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
        # An ASan build wants its runtime first among the libraries; libfaketime only
        # wraps the wall clock, so the order check is what must give way (ASan's own
        # interceptors stay in place).
        asan = os.environ.get("ASAN_OPTIONS", "")
        env["ASAN_OPTIONS"] = (asan + ":" if asan else "") + "verify_asan_link_order=0"
        return env


class Env:
    """What a test gets: the quickstart, the CLI, and the NBD handles to close."""

    def __init__(self, qs, osr, clock=None):
        self.qs = qs
        self.osr = osr
        self.clock = clock  # a FakeTime when the test is marked faketime
        self.closers = []

    def track(self, obj):
        self.closers.append(obj)
        return obj

    def close_nbd(self):
        while self.closers:
            with contextlib.suppress(Exception):
                self.closers.pop().close()


def pytest_addoption(parser):
    osrtest.add_vault_db_option(parser)


def pytest_report_header(config):
    return osrtest.vault_db_report_header(config)


def quickstart_catalog(new_catalog, data_dir):
    """The catalog of a quickstart on data_dir: its default <data_dir>/vault.db, or a fresh
    PostgreSQL database (--vault-db)."""
    return new_catalog(Path(data_dir) / "vault.db")


def pytest_configure(config):
    osrtest.vault_db_backend(config)  # a wrong OSR_TEST_VAULT_DB stops the run at once
    config.addinivalue_line(
        "markers", "deadline(seconds): the watchdog deadline of one test (default "
        f"TEST_DEADLINE_S = {TEST_DEADLINE_S})")
    config.addinivalue_line(
        "markers", "faketime: the quickstart runs under libfaketime; env.clock steps its "
        "wall clock")


@pytest.fixture
def small_recovery(tmp_path, new_catalog):
    """A quickstart whose recovery site's data_dir is a 24 MiB tmpfs the test mounts (it
    needs root): (env, mount point). The quickstart stops (and must exit 0) before the file
    system is unmounted."""
    require_libnbd()
    mnt = tmp_path / "qs" / "recovery"
    mnt.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"mount tmpfs on {mnt} (needs root): {r.stderr}"
    qs = Quickstart(tmp_path / "qs", free_port(), tmp_path / "quickstart.stderr",
                    quickstart_catalog(new_catalog, tmp_path / "qs"))
    try:
        qs.start()
        e = Env(qs, Osr(qs))
        yield e, mnt
        e.close_nbd()
        stop_all_clean([qs])
    finally:
        if qs.alive():
            qs.stop()
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)


@pytest.fixture
def env(tmp_path, request, new_catalog):
    """A running quickstart (state in tmp_path/qs) and its CLI.

    At teardown the NBD handles are closed and the quickstart must exit 0 on SIGTERM.
    A test running past TEST_DEADLINE_S (or its @pytest.mark.deadline(seconds)) has its
    quickstart SIGKILLed and fails."""
    marker = request.node.get_closest_marker("deadline")
    deadline_s = (marker.args[0] if marker is not None else TEST_DEADLINE_S) * TIME_FACTOR
    require_libnbd()
    clock = None
    if request.node.get_closest_marker("faketime") is not None:
        clock = FakeTime(tmp_path / "faketime.rc")
    qs = Quickstart(tmp_path / "qs", free_port(), tmp_path / "quickstart.stderr",
                    quickstart_catalog(new_catalog, tmp_path / "qs"),
                    extra_env=clock.env() if clock else None)
    qs.start()
    e = Env(qs, Osr(qs), clock)
    expired = threading.Event()

    def watchdog():
        expired.set()
        qs.kill9()

    timer = threading.Timer(deadline_s, watchdog)
    timer.daemon = True
    timer.start()
    try:
        yield e
    finally:
        timer.cancel()
        e.close_nbd()
        if expired.is_set():
            pytest.fail(f"the test ran past {deadline_s}s: its quickstart was killed\n"
                        f"stderr: {qs.stderr()}")
        stop_all_clean([qs])


# -- NBD and a model of the bytes ---------------------------------------------------------


def connect(uri):
    return osrtest.connect(uri, NBD_HANDLE_NAME)


def read_uri(uri, size):
    """The whole export at uri, over a fresh connection."""
    return osrtest.read_uri(uri, size, handle_name=NBD_HANDLE_NAME)


class VmDisks:
    """The disks of a VM at its site, written through libnbd one request at a time.

    Every completed WRITE, TRIM and WRITE_ZEROES of a VM's disks is one record of one
    gap-free sequence starting at 1 (docs/formats.md), and this client waits for each
    reply before sending the next request, so ops[i] is the write that got seq i+1 and
    at(seq) is the VM's disks as of any recovery point."""

    def __init__(self, vm_json, rng):
        self.rng = rng
        self.names = [d["name"] for d in vm_json["disks"]]
        self.sizes = {d["name"]: d["size_bytes"] for d in vm_json["disks"]}
        self.uris = {}
        self.handles = {}
        self.ops = []
        self.set_uris(vm_json)

    def set_uris(self, vm_json):
        """New URIs (the NBD ports of a restarted quickstart are new)."""
        self.close()
        assert [d["name"] for d in vm_json["disks"]] == self.names, vm_json
        for d in vm_json["disks"]:
            assert isinstance(d.get("uri"), str), f"disk without a URI: {vm_json}"
            self.uris[d["name"]] = d["uri"]

    def handle(self, name):
        if name not in self.handles:
            self.handles[name] = connect(self.uris[name])
        return self.handles[name]

    @property
    def seq(self):
        return len(self.ops)

    def write(self, n, max_len=256 * KIB, weights=(8, 1, 1)):
        """n random requests on random disks, the last one a WRITE of data (so that the
        bytes at any seq between batches differ from those one seq before); returns the
        seq after them."""
        for i in range(n):
            name = self.rng.choice(self.names)
            op = random_op(self.rng, self.sizes[name], max_len=max_len,
                           weights=weights if i < n - 1 else (1, 0, 0))
            apply_op(self.handle(name), *op)
            self.ops.append((name, *op))
        return self.seq

    def flush(self):
        for h in self.handles.values():
            h.flush()

    def mark(self):
        """A seq that changed nothing: the mark a resync with no write during it ends at
        (docs/formats.md, "Mark record")."""
        self.ops.append((self.names[0], "zero", 0, 0, None))
        return self.seq

    def at(self, seq=None):
        """{disk name: bytes} as of seq (default: everything written)."""
        seq = self.seq if seq is None else seq
        assert 0 <= seq <= len(self.ops), f"seq {seq} is beyond the {len(self.ops)} writes made"
        disks = {n: bytearray(self.sizes[n]) for n in self.names}
        for name, kind, off, length, data in self.ops[:seq]:
            apply_model(disks[name], kind, off, length, data)
        return disks

    def read_primary(self):
        """{disk name: bytes} read back over fresh connections."""
        return {n: read_uri(self.uris[n], self.sizes[n]) for n in self.names}

    def close(self):
        for h in self.handles.values():
            close_handle(h)
        self.handles = {}


class Drill:
    """The writable drill disks of a test failover, with their expected bytes."""

    def __init__(self, job, vm, expected, rng):
        disks = job.get("disks")
        assert isinstance(disks, list), f"test-failover job has no disks: {job}"
        assert [d.get("name") for d in disks] == vm.names, \
            f"drill disks {disks} are not the VM's disks {vm.names}"
        for d in disks:
            assert isinstance(d.get("uri"), str) and d["uri"].startswith("nbd://127.0.0.1:"), d
        self.uris = {d["name"]: d["uri"] for d in disks}
        self.sizes = dict(vm.sizes)
        self.names = list(vm.names)
        self.model = {n: bytearray(expected[n]) for n in self.names}
        self.rng = rng
        self.handles = {}

    def handle(self, name):
        if name not in self.handles:
            self.handles[name] = connect(self.uris[name])
        return self.handles[name]

    def write(self, n):
        for _ in range(n):
            name = self.rng.choice(self.names)
            op = random_op(self.rng, self.sizes[name])
            apply_op(self.handle(name), *op)
            apply_model(self.model[name], *op)

    def assert_matches(self, what, fresh=True):
        """Every byte of every drill disk equals the model (fresh connections by default)."""
        for n in self.names:
            if fresh:
                got = read_uri(self.uris[n], self.sizes[n])
            else:
                got = read_handle(self.handle(n), self.sizes[n], self.uris[n])
            assert_same_bytes(got, bytes(self.model[n]), f"{what}: drill disk {n}")

    def close(self):
        for h in self.handles.values():
            close_handle(h)
        self.handles = {}


def assert_disks(got, want, what):
    assert set(got) == set(want), f"{what}: disks {sorted(got)} != {sorted(want)}"
    for n in want:
        assert_same_bytes(bytes(got[n]), bytes(want[n]), f"{what}: disk {n}")


# -- times --------------------------------------------------------------------------------

_TIME_RE = re.compile(r"^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?"
                      r"(Z|[+-]\d\d:\d\d)$")


def parse_time_ns(text):
    """RFC 3339 to ns since the epoch; fails the test if text is not RFC 3339."""
    m = _TIME_RE.match(text) if isinstance(text, str) else None
    assert m, f"not an RFC 3339 time: {text!r}"
    y, mo, d, hh, mm, ss = (int(g) for g in m.groups()[:6])
    frac = (m.group(7) or "").ljust(9, "0")
    ns = (calendar.timegm((y, mo, d, hh, mm, ss)) * 1_000_000_000) + int(frac or 0)
    tz = m.group(8)
    if tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        ns -= sign * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60) * 1_000_000_000
    return ns


def format_time_ns(ns, offset_minutes=0):
    """ns since the epoch as RFC 3339 with nanoseconds, in UTC ('Z') or at an offset."""
    local = ns + offset_minutes * 60 * 1_000_000_000
    secs, frac = divmod(local, 1_000_000_000)
    t = time.gmtime(secs)
    base = time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{frac:09d}"
    if offset_minutes == 0:
        return base + "Z"
    sign = "+" if offset_minutes > 0 else "-"
    off = abs(offset_minutes)
    return base + f"{sign}{off // 60:02d}:{off % 60:02d}"


def assert_point(p, what="point"):
    """{id, time, seq, type} with the right types; returns p."""
    assert isinstance(p, dict), f"{what}: not an object: {p!r}"
    for k in ("id", "time", "seq", "type"):
        assert k in p, f"{what}: no {k!r}: {p}"
    assert isinstance(p["id"], int) and not isinstance(p["id"], bool) and p["id"] > 0, p
    assert isinstance(p["seq"], int) and not isinstance(p["seq"], bool) and p["seq"] >= 0, p
    assert p["type"] in ("crash", "app"), f"{what}: type {p['type']!r}"
    parse_time_ns(p["time"])
    return p


def wait_for(pred, timeout, what, interval=0.1, detail=None):
    """Polls pred() until it returns a truthy value; fails after timeout seconds
    (with detail(), if given, in the message)."""
    return osrtest.wait_for(pred, timeout, what, interval=interval, detail=detail)


def create_vm(osr, name, disks, site="primary"):
    """`osr vm create` with [(disk, size text, size_bytes)]; checks the answer and `vm show`.
    Returns the `vm show` JSON."""
    args = ["vm", "create", name, "--site", site]
    for d, text, _ in disks:
        args += ["--disk", f"{d}:{text}"]
    created = osr.ok(*args)
    shown = osr.ok("vm", "show", name)
    for doc, cmd in ((created, "vm create"), (shown, "vm show")):
        assert doc.get("name") == name, f"{cmd}: {doc}"
        assert doc.get("site") == site, f"{cmd}: {doc}"
        got = [(d.get("name"), d.get("size_bytes")) for d in doc.get("disks", [])]
        assert got == [(d, b) for d, _, b in disks], f"{cmd}: disks {got}"
        for d in doc["disks"]:
            uri = d.get("uri")
            assert isinstance(uri, str) and re.match(
                rf"^nbd://127\.0\.0\.1:\d+/vm/{re.escape(name)}/{re.escape(d['name'])}$", uri), \
                f"{cmd}: disk URI {uri!r}"
    assert created["disks"] == shown["disks"], f"vm create and vm show differ: {created} {shown}"
    return shown


def protect(osr, name, target="recovery", policy=None):
    args = ["protect", name, "--target", target]
    if policy is not None:
        args += ["--policy", policy]
    job = osr.job_ok(*args, job_type="enable-protection")
    assert job.get("vm") == name, job
    return job
