"""The vault's `GET /metrics` (Prometheus text, version 0.0.4) with a real vault and two
site daemons: the numbers a scrape shows before anything is protected and after one VM
is protected (its enable-protection job, its state, health and RPO), read by a parser of
the format written here; no credential is 401; 503 while the PostgreSQL server is away;
with two vaults on one catalog, osr_vault_leader follows the lease.
"""

from datetime import datetime, timezone
import json
import re
import urllib.error
import urllib.request

import pytest

from conftest import require_libnbd, wait_for, write_config, SiteProcess
from test_dr_daemons import Osr, VaultProcess, register
from test_vault_leader import TAKEOVER_S, LeaderVault
from test_vault_postgres import PgVault
import osrtest

MIB = 1024 * 1024
SCRAPE_TIMEOUT_S = 30
RPO_SAMPLE_TIMEOUT_S = 30  # the point loop samples every 5 s


@pytest.fixture
def dr(tmp_path, new_catalog):
    require_libnbd()
    procs = []
    for name in ("primary", "recovery"):
        config, data_dir = write_config(tmp_path, name)
        procs.append(SiteProcess(name, config, data_dir, tmp_path / f"{name}.stderr").start())
    vault = VaultProcess(new_catalog(tmp_path / "vault.db"), tmp_path, osrtest.free_port(),
                         tmp_path / "vault.stderr")
    procs.append(vault)
    vault.start()
    osr = Osr(vault)
    for s in procs[:2]:
        register(osr, s)
    yield vault, osr
    osrtest.stop_all_clean(procs)


def scrape(vault, token=True):
    """(status, content type, body text) of GET /metrics."""
    headers = {}
    if token:
        token_file = getattr(vault, "token_file", None) or vault.state_dir / "admin.token"
        headers["Authorization"] = "Bearer " + token_file.read_text().strip()
    req = urllib.request.Request(vault.url + "/metrics", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=SCRAPE_TIMEOUT_S) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode()


def vault_api(vault, path):
    """GET path of the vault's REST API with the admin token: the parsed JSON."""
    token_file = getattr(vault, "token_file", None) or vault.state_dir / "admin.token"
    req = urllib.request.Request(vault.url + path, headers={
        "Authorization": "Bearer " + token_file.read_text().strip()})
    with urllib.request.urlopen(req, timeout=SCRAPE_TIMEOUT_S) as r:
        return json.loads(r.read().decode())


# -- a parser of the text exposition format 0.0.4 (enough to check ours strictly) --------

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = re.compile(r'(' + NAME + r')="((?:[^"\\\n]|\\\\|\\"|\\n)*)"')
SAMPLE = re.compile(r"^(" + NAME + r")(\{.*\})? (\S+)$")
UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def parse_labels(text):
    if not text:
        return ()
    body, labels, pos = text[1:-1], [], 0
    while pos < len(body):
        m = LABEL.match(body, pos)
        assert m, f"bad label at {body[pos:]!r}"
        value = re.sub(r'\\\\|\\"|\\n', lambda e: UNESCAPE[e.group(0)], m.group(2))
        labels.append((m.group(1), value))
        pos = m.end()
        if pos < len(body):
            assert body[pos] == ",", f"expected ',' at {body[pos:]!r}"
            pos += 1
    return tuple(labels)


def parse(text):
    """{family: {"type", "help", "samples": {(name, labels): value}}}; asserts the format:
    HELP then TYPE before a family's samples, each family once, samples of the family's
    names only, a histogram's buckets cumulative and ending in +Inf = _count."""
    assert text.endswith("\n"), "the exposition ends with a line feed"
    families, current = {}, None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert name not in families, f"family {name} twice"
            current = families[name] = {"help": help_text, "type": None, "samples": {}}
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert current is families.get(name), f"TYPE {name} without its HELP first"
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            current["type"] = kind
        else:
            m = SAMPLE.match(line)
            assert m and current is not None and current["type"], f"bad line {line!r}"
            name, family = m.group(1), [n for n, f in families.items() if f is current][0]
            allowed = ({family + s for s in ("_bucket", "_sum", "_count")}
                       if current["type"] == "histogram" else {family})
            assert name in allowed, f"{name} under family {family}"
            key = (name, parse_labels(m.group(2)))
            assert key not in current["samples"], f"{line!r} twice"
            current["samples"][key] = float(m.group(3))
    for family, f in families.items():
        if f["type"] == "histogram":
            check_histogram(family, f["samples"])
    return families


def check_histogram(family, samples):
    series = {}
    for (name, labels), value in samples.items():
        if name == family + "_bucket":
            rest = tuple(kv for kv in labels if kv[0] != "le")
            le = dict(labels)["le"]
            series.setdefault(rest, []).append((float(le), value))
    for rest, buckets in series.items():
        buckets.sort()
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), f"{family}{rest}: buckets not cumulative {buckets}"
        assert buckets[-1][0] == float("inf"), f"{family}{rest}: no +Inf bucket"
        assert samples[(family + "_count", rest)] == buckets[-1][1], f"{family}{rest}: count"
        assert (family + "_sum", rest) in samples, f"{family}{rest}: no sum"


def value(families, family, name=None, **labels):
    want = tuple(sorted(labels.items()))
    for (n, got), v in families[family]["samples"].items():
        if n == (name or family) and tuple(sorted(got)) == want:
            return v
    return None


def unix_s(rfc3339):
    """The vault's times (nanoseconds) to float seconds (microsecond precision)."""
    m = re.fullmatch(r"(.*T\d\d:\d\d:\d\d)\.(\d{9})Z", rfc3339)
    assert m, rfc3339
    t = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    return t.timestamp() + int(m.group(2)) / 1e9


def test_metrics_of_an_empty_vault_then_one_protected_vm(dr):
    vault, osr = dr
    status, _, body = scrape(vault, token=False)
    assert status == 401, body

    status, ctype, body = scrape(vault)
    assert status == 200, body
    assert ctype == "text/plain; version=0.0.4; charset=utf-8", ctype
    m = parse(body)
    backend = "sqlite" if vault.catalog.backend == "sqlite" else "postgresql"
    assert value(m, "osr_vault_catalog_up", backend=backend) == 1, body
    assert value(m, "osr_vault_leader") == 1, body
    # Every item state the vault knows (GET /api/v1/states), each 0: a gauge that goes
    # away would read as stale, not as none.
    states = [s["name"] for s in vault_api(vault, "/api/v1/states")["item_states"]
              if s["name"] != "Unprotected"]
    assert len(states) == 9, states
    for state in states:
        assert value(m, "osr_vault_items", state=state) == 0, body
    assert len(m["osr_vault_items"]["samples"]) == len(states), body
    for level in ("Normal", "Warning", "Critical", "Unknown"):
        assert value(m, "osr_vault_items_health", level=level) == 0, body
    assert m["osr_vault_jobs_total"]["samples"] == {}, body
    assert m["osr_vault_item_rpo_seconds"]["samples"] == {}, body
    assert m["osr_vault_job_duration_seconds"]["type"] == "histogram"

    osr.ok("vm", "create", "vm1", "--site", "primary", "--disk", f"os:{4 * MIB}")
    job = osr.ok("protect", "vm1", "--target", "recovery", "--wait")
    assert job["state"] == "Succeeded" and job["type"] == "enable-protection", job
    took_s = unix_s(job["updated"]) - unix_s(job["created"])

    def sampled():
        s, _, text = scrape(vault)
        assert s == 200, text
        got = parse(text)
        if (value(got, "osr_vault_item_rpo_seconds", vm="vm1") is not None
                and value(got, "osr_vault_items_health", level="Normal") == 1):
            return got
        return None

    m = wait_for(sampled, RPO_SAMPLE_TIMEOUT_S, "an RPO sample and a Normal health of vm1",
                 detail=lambda: scrape(vault)[2])
    assert value(m, "osr_vault_items", state="Protected") == 1
    assert value(m, "osr_vault_items", state="FailedOver") == 0
    assert value(m, "osr_vault_items_health", level="Unknown") == 0
    rpo = value(m, "osr_vault_item_rpo_seconds", vm="vm1")
    assert 0 <= rpo < 60, rpo  # nothing is written: caught up
    # The sample's time agrees with the vault's job times (same clock), within a minute.
    sampled_at = value(m, "osr_vault_item_rpo_sample_timestamp_seconds", vm="vm1")
    assert unix_s(job["updated"]) - 1 <= sampled_at <= unix_s(job["updated"]) + 60, sampled_at
    assert value(m, "osr_vault_jobs_total", type="enable-protection", state="Succeeded") == 1
    assert value(m, "osr_vault_jobs_total", type="enable-protection", state="Failed") is None
    h = "osr_vault_job_duration_seconds"
    assert value(m, h, h + "_count", type="enable-protection") == 1
    assert value(m, h, h + "_sum", type="enable-protection") == pytest.approx(took_s, abs=1e-3)
    # The one duration sits in the first bucket that holds it, and every one after.
    for le, count in ((b, value(m, h, h + "_bucket", type="enable-protection", le=b))
                      for b in ("1", "5", "15", "30", "60", "+Inf")):
        assert count == (1 if took_s <= float(le) else 0), (le, count, took_s)


def test_metrics_answer_503_while_the_catalog_server_is_away(tmp_path):
    osrtest.require_osrd()
    with osrtest.PgServer() as pg:
        vault = PgVault(pg.create_database("osr_vault"), osrtest.free_port(), tmp_path)
        vault.start()
        try:
            status, _, body = scrape(vault)
            assert status == 200 and "osr_vault_catalog_up{backend=\"postgresql\"} 1\n" in body
            pg.stop()
            status, ctype, body = scrape(vault)
            assert status == 503, body
            # A clear error (the credential check reads the catalog first), no partial numbers.
            assert "# TYPE" not in body and "osr_vault_leader" not in body, body
            assert f"PostgreSQL server 127.0.0.1:{pg.port}" in body, body
            pg.restart()
            status, _, body = scrape(vault)
            assert status == 200, body
            parse(body)
        finally:
            vault.stop_clean()


def test_the_leader_gauge_follows_the_lease(tmp_path):
    osrtest.require_osrd()
    with osrtest.PgServer() as pg:
        url = pg.create_database("osr_metrics_leader")
        a, b = LeaderVault("A", url, tmp_path), LeaderVault("B", url, tmp_path)
        a.start()
        b.start()
        try:
            def leader_gauge(vault):
                status, _, text = scrape(vault)
                assert status == 200, text
                return value(parse(text), "osr_vault_leader")

            assert a.role() == "leader" and b.role() == "follower"
            assert leader_gauge(a) == 1 and leader_gauge(b) == 0
            a.kill9()
            wait_for(lambda: leader_gauge(b) == 1, TAKEOVER_S, "vault B to lead",
                     detail=lambda: b.stderr()[-2000:])
            assert b.role() == "leader"
        finally:
            osrtest.stop_all_clean([a, b])
