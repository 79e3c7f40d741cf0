"""Shared fixtures for the cross-process tests of the site daemon (`osrd site`).

Two real `osrd site --config FILE` processes, "primary" and "recovery", each with
its own data_dir under tmp_path, every address 127.0.0.1:0. The tests drive them
through their HTTP API (urllib) and their NBD exports (python3-libnbd), as the
vault and the VMs would. Run with Debian's interpreter, which has python3-libnbd:

    /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/site

Environment:
    OSRD           path of the osrd binary (default: <repo>/build/osrd)
    OSR_TEST_SEED  the seed of the random data (default: random; failures name it)
    OSR_TEST_VAULT_DB  the catalog of the vaults the tests start, as --vault-db: sqlite
                   (the default) or postgresql (one PostgreSQL 15 server for the session,
                   a fresh database per vault)

A missing binary or tool makes a test FAIL with a message, never skip. Every wait
is bounded in time.

The helpers shared with the other suites (binaries, the osrd process, libnbd,
bytes) live in tests/lib/osrtest.py; this file re-exports what the tests use.
"""

import json
import os
import re
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
pytest.register_assert_rewrite("osrtest")

from osrtest import (KIB, MIB, OsrdProcess, apply_model,  # noqa: E402,F401
                     apply_op, assert_same_bytes, close_handle, first_difference,
                     require_libnbd, seed_from_env, stop_all_clean, wait_for)
from osrtest import make_certs, tls_client_context, token_env  # noqa: E402,F401
from osrtest import new_catalog, vault_pg_server  # noqa: E402,F401 (fixtures)
import osrtest  # noqa: E402

HTTP_TIMEOUT_S = 10
CATCH_UP_TIMEOUT_S = 20
NBD_HANDLE_NAME = "pytest-site"


def pytest_addoption(parser):
    osrtest.add_vault_db_option(parser)


def pytest_configure(config):
    osrtest.vault_db_backend(config)  # a wrong OSR_TEST_VAULT_DB stops the run at once


def pytest_report_header(config):
    return osrtest.vault_db_report_header(config)


# -- one site process -------------------------------------------------------------


class SiteProcess(OsrdProcess):
    """One `osrd site --config FILE` process, started and watched by the test (see
    OsrdProcess)."""

    def __init__(self, name, config_path, data_dir, log_path):
        super().__init__(log_path)
        self.name = name
        self.config_path = Path(config_path)
        self.data_dir = Path(data_dir)
        self.api_url = None       # https://127.0.0.1:PORT/api/v1
        self.nbd = None           # 127.0.0.1:PORT
        self.replication = None   # 127.0.0.1:PORT

    @property
    def label(self):
        return f"site {self.name}: osrd"

    def osrd_args(self):
        return ["site", "--config", self.config_path]

    def start(self):
        self.api_url = self.nbd = self.replication = None
        return super().start()

    def on_stdout_line(self, text):
        m = re.match(r"^osrd: api on (https?://127\.0\.0\.1:(\d+)/api/v1)$", text)
        if m:
            self.api_url = m.group(1)
        m = re.match(r"^osrd: nbd on (127\.0\.0\.1:\d+)$", text)
        if m:
            self.nbd = m.group(1)
        m = re.match(r"^osrd: replication on (127\.0\.0\.1:\d+)$", text)
        if m:
            self.replication = m.group(1)

    def check_ready(self):
        missing = [what for what, v in (("api", self.api_url), ("nbd", self.nbd),
                                        ("replication", self.replication)) if v is None]
        if missing or f"osrd: site {self.name}" not in self.stdout_lines:
            return (f"site {self.name}: the startup lines lack {missing or 'the site name'}: "
                    f"{self.stdout_lines}")
        return None


def site_certs(tmp_path, name):
    """The test's CA (tmp_path/tls) with certificates for `name` and the vault."""
    return make_certs(tmp_path / "tls", name, "vault")


def write_config(tmp_path, name, extra="", tls=True):
    """A site config with mutual TLS (replication and the API) from the test's CA; with
    tls=False a lab on loopback: plain replication and `api_insecure = true` (the tests
    that speak raw replication frames need that)."""
    data_dir = tmp_path / f"{name}-data"
    config = tmp_path / f"{name}.toml"
    text = (f'name = "{name}"\n'
            f'data_dir = "{data_dir}"\n'
            'nbd_listen = "127.0.0.1:0"\n'
            'replication_listen = "127.0.0.1:0"\n'
            'api_listen = "127.0.0.1:0"\n')
    if tls:
        certs = site_certs(tmp_path, name)
        cert, key = certs[name]
        text += f'tls_ca = "{certs["ca"]}"\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
    else:
        text += "api_insecure = true\n"
    config.write_text(text + extra)
    return config, data_dir


@pytest.fixture
def site_factory(tmp_path):
    """start(name) -> SiteProcess. Sites still running at teardown get SIGTERM and must
    exit 0."""
    sites = []

    def start(name, tls=True, extra=""):
        config, data_dir = write_config(tmp_path, name, extra=extra, tls=tls)
        s = SiteProcess(name, config, data_dir, tmp_path / f"{name}.stderr")
        sites.append(s)
        return s.start()

    yield start

    stop_all_clean(sites)


@pytest.fixture
def sites(site_factory):
    """(primary, recovery): two running sites."""
    require_libnbd()
    return site_factory("primary"), site_factory("recovery")


@pytest.fixture
def plain_sites(site_factory):
    """(primary, recovery) without TLS, on loopback (a lab): for raw replication frames."""
    require_libnbd()
    return site_factory("primary", tls=False), site_factory("recovery", tls=False)


# -- HTTP API -----------------------------------------------------------------------


def api(site, method, path, body=None, raw=None, timeout=HTTP_TIMEOUT_S, headers=None):
    """Calls the site's API; path is relative to /api/v1 ("/groups/vm1") or absolute
    ("/metrics"); `headers`: more request headers (a vault's X-Osr-Lease-Token). Returns
    (status, decoded JSON or None for an empty body)."""
    root = site.api_url[:-len("/api/v1")]
    url = root + (path if path.startswith("/api/v1") or path == "/metrics" else "/api/v1" + path)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    ctx = None
    if url.startswith("https://"):
        # The vault's client certificate: the only one a site's API answers.
        certs = site_certs(site.config_path.parent, site.name)
        ctx = tls_client_context(certs["ca"], *certs["vault"])
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
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


def store_status(site, vm):
    return api_ok(site, "GET", f"/stores/{vm}")


def compact(site, vm, body, timeout=120):
    """POST /stores/VM/compact (answered 202 at once: it runs on the site's maintenance
    thread), then waits until the store's compaction is done or failed; returns it."""
    asked = api_ok(site, "POST", f"/stores/{vm}/compact", body, status=202)
    assert asked["compaction"]["state"] in ("queued", "running"), asked
    assert asked["compaction"]["through"] == body["through"], asked
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c = store_status(site, vm).get("compaction")
        assert isinstance(c, dict), f"store {vm}: no compaction shown after one was asked for"
        if c["state"] in ("done", "failed"):
            return c
        time.sleep(0.05)
    pytest.fail(f"store {vm}: the compaction did not end within {timeout}s: {c}")


def compact_ok(site, vm, body, timeout=120):
    """compact(), which must succeed; returns its result (compacted_through, kept_points,
    bytes_before, bytes_after)."""
    c = compact(site, vm, body, timeout)
    assert c["state"] == "done", f"store {vm}: compaction {body}: {c}"
    return c["result"]


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
        assert d["uri"] == f"nbd://{primary.nbd}/vm/{vm}/{d['name']}", group
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
        assert d["uri"] == f"nbd://{recovery.nbd}/view/{doc['id']}/{d['name']}", doc
    return doc


def close_view(recovery, view_id):
    got, doc = api(recovery, "DELETE", f"/views/{view_id}")
    assert got == 204, f"DELETE /views/{view_id}: {got} {doc}"


# -- NBD ------------------------------------------------------------------------------


def connect(uri):
    return osrtest.connect(uri, NBD_HANDLE_NAME)


close = close_handle


def read_all(uri, size=None):
    """The whole export at uri, read in 4 MiB requests over one connection."""
    return osrtest.read_uri(uri, size, handle_name=NBD_HANDLE_NAME)


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
            apply_model(disks[disk], kind, off, length, data)
        return [bytes(d) for d in disks]


def random_op(rng, sizes, disk, max_len=256 * KIB, weights=(8, 1, 1)):
    """(kind, offset, length, data) within the disk: unaligned offsets and lengths."""
    return osrtest.random_op(rng, sizes[disk], max_len=max_len, weights=weights)


def seed_for(request):
    """A per-test seed: OSR_TEST_SEED, or random (failure messages name it, so that
    OSR_TEST_SEED=N reproduces the run's data)."""
    return seed_from_env()
