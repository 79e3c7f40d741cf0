"""Drills that boot, as the operator sees them through the `osr` CLI: a real QEMU guest
(tests/vm, `osr.mode=serve`, TCG) protected from the quickstart's primary site to its
recovery site.

1. `osr test-failover VM --point latest --wait` starts the VM on the drill disks and waits
   for its boot check (spec `boot_check: {console_line: "OSR-READ:"}`): Healthy, the drill
   console (`osr vm console VM --drill`) shows the replicated file, cleanup stops the drill
   VM and keeps its result; the production VM runs and replicates throughout.
2. A drill at a point whose disk was wiped: Unhealthy, the reason names the timeout, the
   console tail says OSR-NODATA.
3. Checks before acting: `--dry-run` of test-failover and failover prints the plan and
   starts nothing; a NIC on a network the recovery site does not map, and a recovery site
   whose `qemu_binary` is missing, refuse test-failover and failover naming the check, and
   change nothing; protect is refused (check 'space', with the numbers) when the recovery
   site's data_dir is too small.
4. `osr point create VM --app` on a guest without qemu-guest-agent: the documented
   fallback (`quiesced_by: none`, a point labelled app), bounded, the VM untouched.
5. A qemu VM with `guest_agent: false` and no boot check: its stored spec reads back, and
   its drill boots with health NotChecked.

The quickstart takes no site config file (its sites are configured in osrd itself), so the
cases that need site config keys (`[networks.NAME]`, `qemu_binary`) run a vault and two
sites as separate daemons (`osrd vault`, `osrd site --config`) with configs the test writes.

Needs qemu-system-x86_64 and root (a tmpfs): a missing tool FAILS the test. The guest is
built beside the osrd under test (build/guest, tests/vm/build_guest.sh, idempotent).
About 70 s on a 2-core host without KVM (three TCG boots, a 15 s boot-check timeout, the
10 s guest-sync wait of an app point).
"""

import json
import os
import random
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import (KIB, MIB, Osr, OsrdProcess, close_handle, connect, create_vm, free_port,
                      make_certs, protect, require_libnbd, stop_all_clean, wait_for)
import osrtest

DISK = 16 * MIB
BOOT_TIMEOUT_S = 90   # TCG: OSR-BOOTED ~6 s after qemu starts, longer on a busy host
MAC = "52:54:00:d7:22:01"
SHUTDOWN_MS = 2000    # the test guest ignores ACPI: every stop is a hard stop after this


# -- the guest, qemu processes ------------------------------------------------------------


@pytest.fixture(scope="module")
def guest():
    """The test guest (tests/vm) beside the osrd binary under test (build/guest)."""
    return osrtest.build_test_guest()


qemu_pids = osrtest.qemu_pids


@pytest.fixture
def qemu_reaper(tmp_path):
    """Request it first: after the daemons stopped, no qemu of this test may be left (any
    is killed, and the test fails)."""
    osrtest.require_tool("qemu-system-x86_64")
    require_libnbd()
    yield
    stray = osrtest.kill_stray_qemus(tmp_path)
    assert not stray, f"qemu processes of the test outlived its daemons: {stray}"


def qemu_spec(guest_dir, words, boot_check=None, nics=None, **more):
    """A qemu VM spec booting the test guest with kernel command line words `words`."""
    append = f"console=ttyS0 quiet panic=-1 {words}"
    spec = {"driver": "qemu", "memory_bytes": 256 * MIB, "cpus": 1,
            "shutdown_timeout_ms": SHUTDOWN_MS,
            "qemu_args": (f"-kernel {guest_dir}/vmlinuz -initrd {guest_dir}/initramfs.cpio.gz "
                          f"-append '{append}' -no-reboot")}
    if boot_check is not None:
        spec["boot_check"] = boot_check
    if nics is not None:
        spec["nics"] = nics
    spec.update(more)
    return spec


# -- the vault's REST API (what the CLI has no flag for: nics, boot_check) ---------------


def vault_call(url, token_file, method, path, body=None):
    """(HTTP status, JSON answer) of one vault API call."""
    token = Path(token_file).read_text().strip()
    req = urllib.request.Request(
        url + "/api/v1" + path, method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def create_qemu_vm(vault_url, token_file, name, spec, size=DISK):
    """POST /api/v1/vms with `spec`; checks the stored spec keeps its NICs and boot check.
    Returns the VM."""
    status, vm = vault_call(vault_url, token_file, "POST", "/vms",
                            {"name": name, "site": "primary",
                             "disks": [{"name": "os", "size_bytes": size}], "spec": spec})
    assert status == 201, f"POST /vms {name}: {status} {vm}"
    assert vm["name"] == name and vm["site"] == "primary" and vm["driver"] == "qemu", vm
    stored = vm["spec"]
    if "boot_check" in spec:
        assert stored["boot_check"] == spec["boot_check"], stored
    for got, want in zip(stored.get("nics", []), spec.get("nics", [])):
        assert got["mac"] == want["mac"] and got["network"] == want["network"], stored
    assert len(stored.get("nics", [])) == len(spec.get("nics", [])), stored
    return vm


# -- disks ----------------------------------------------------------------------------------


archive = osrtest.guest_archive  # the guest's disk: a tar with hello.txt


def nbd_write(uri, data, offset=0):
    h = connect(uri)
    try:
        h.pwrite(data, offset)
        h.flush()
    finally:
        close_handle(h)


def wait_replicated(osr, vm, after_seq, timeout=30):
    """Waits until the item's recovery site holds every write (durable == last > after_seq)
    and its health is Normal; returns the item."""
    seen = {}

    def caught_up():
        seen["item"] = item = osr.ok("item", "show", vm)
        return (item.get("last_seq", 0) > after_seq
                and item.get("durable_seq") == item.get("last_seq")
                and item.get("health") == "Normal")

    wait_for(caught_up, timeout, f"{vm}'s writes after seq {after_seq} to replicate "
             "with health Normal", interval=0.25, detail=lambda: seen.get("item"))
    return seen["item"]


# -- consoles -------------------------------------------------------------------------------


def console(osr, vm, drill=False):
    """`osr vm console VM [--drill]` (its last 64 KiB) as JSON."""
    args = ["vm", "console", vm, "--bytes", "65536"] + (["--drill"] if drill else [])
    c = osr.ok(*args)
    assert set(c) == {"site", "which", "offset", "next", "size", "text", "cuts", "cut_size"}, c
    assert c["cuts"] == 0, c  # its logs stay far below the 16 MiB bound
    assert c["which"] == ("drill" if drill else "vm"), c
    # next and size count the console file's bytes; the text leaves out each line's CR.
    assert 0 <= c["offset"] <= c["next"] <= c["size"], c
    assert len(c["text"].encode()) <= c["next"] - c["offset"], c
    assert "\r" not in c["text"], c
    return c


def wait_console(osr, vm, want, timeout=BOOT_TIMEOUT_S, drill=False):
    seen = {}

    def shows():
        seen["c"] = console(osr, vm, drill)
        if "OSR-ERROR:" in seen["c"]["text"]:
            pytest.fail(f"the guest failed: {seen['c']['text'][-2000:]}")
        return want in seen["c"]["text"]

    wait_for(shows, timeout, f"{want!r} on the {'drill ' if drill else ''}console of {vm}",
             interval=0.5, detail=lambda: seen.get("c", {}).get("text", "")[-2000:])
    return seen["c"]["text"]


def jobs_of(osr, vm):
    return [j["id"] for j in osr.ok("job", "list", "--vm", vm)]


# -- test 1: a healthy drill beside the running production VM -------------------------------


@pytest.mark.deadline(300)
def test_drill_boots_healthy_while_production_runs_and_replicates(qemu_reaper, env, guest):
    osr = env.osr
    qs = env.qs
    vm = "app"
    text = f"replicated{random.randrange(10 ** 6)}"
    spec = qemu_spec(guest, "osr.mode=serve",
                     boot_check={"console_line": "OSR-READ:", "timeout_ms": 60000})
    shown = create_qemu_vm(qs.vault_url, qs.data_dir / "admin.token", vm, spec)
    uri = shown["disks"][0]["uri"]
    protect(osr, vm)
    nbd_write(uri, archive(text))
    started = osr.ok("vm", "start", vm)
    assert started["running"] is True and started["site"] == "primary", started
    prod_run = qs.data_dir / "primary" / "groups" / vm / "run"
    prod_pids = qemu_pids(prod_run)
    assert len(prod_pids) == 1, f"one production qemu expected: {prod_pids}"
    prod_text = wait_console(osr, vm, f"OSR-READ:{text}")
    assert "OSR-BOOTED" in prod_text, prod_text[-2000:]
    point = osr.ok("point", "create", vm)
    item = wait_replicated(osr, vm, 0)
    assert item["state"] == "Protected", item

    before = jobs_of(osr, vm)
    job = osr.job_ok("test-failover", vm, "--point", "latest", job_type="test-failover")
    assert jobs_of(osr, vm) == before + [job["id"]]
    names = [s["name"] for s in job["steps"]]
    assert "Start the drill VM at recovery on the drill networks" in names, names
    assert "Boot check: 'OSR-READ:' on the console" in names, names
    assert job["point"]["seq"] >= point["seq"], (job["point"], point)
    result = job["drill_vm"]
    print(f"drill VM: {result}")
    assert result["health"] == "Healthy", job
    assert result["reason"] == "the console showed 'OSR-READ:'", result
    assert isinstance(result["boot_ms"], int) and 0 < result["boot_ms"] <= 60000, result
    assert "console_tail" not in result, result
    assert [d["name"] for d in job["disks"]] == ["os"], job

    item = osr.ok("item", "show", vm)
    assert item["state"] == "TestFailoverCompleted", item
    drill = item["drill"]
    assert drill["vm"] == result, (drill, result)
    assert drill["point"]["id"] == job["point"]["id"], drill
    drill_run = qs.data_dir / "recovery" / "drills" / str(drill["view"])
    drill_pids = qemu_pids(drill_run)
    assert len(drill_pids) == 1, f"one drill qemu in {drill_run} expected: {drill_pids}"
    assert drill_pids != prod_pids

    dc = console(osr, vm, drill=True)
    assert dc["site"] == "recovery", dc
    lines = dc["text"].splitlines()
    assert "OSR-BOOTED" in lines and f"OSR-READ:{text}" in lines, dc["text"][-2000:]
    pc = console(osr, vm)
    assert pc["site"] == "primary", pc
    assert pc["text"] != dc["text"]

    # Production goes on beside the drill: the same qemu, its console, its replication.
    alive_before = console(osr, vm)["text"].count("OSR-ALIVE:")
    seq = item["last_seq"]
    nbd_write(uri, os.urandom(MIB), 8 * MIB)
    item = wait_replicated(osr, vm, seq)
    assert item["state"] == "TestFailoverCompleted", item
    assert osr.ok("vm", "show", vm)["running"] is True
    assert qemu_pids(prod_run) == prod_pids

    cleanup = osr.job_ok("test-failover-cleanup", vm, "--notes", "boot drill",
                         job_type="test-failover-cleanup")
    assert "Stop the drill VM" in [s["name"] for s in cleanup["steps"]], cleanup
    assert cleanup["drill_vm"] == result, cleanup
    assert cleanup["notes"] == "boot drill", cleanup
    assert qemu_pids(drill_run) == [], f"the drill VM still runs: {qemu_pids(drill_run)}"
    msg = osr.fails("vm", "console", vm, "--drill")
    assert "has no drill" in msg, msg

    item = osr.ok("item", "show", vm)
    assert item["state"] == "Protected" and "drill" not in item, item
    assert qemu_pids(prod_run) == prod_pids, "the production VM did not outlive the drill"
    assert osr.ok("vm", "show", vm)["running"] is True
    wait_for(lambda: console(osr, vm)["text"].count("OSR-ALIVE:") > alive_before, 20,
             "the production console to go on (OSR-ALIVE every 5 s)", interval=0.5)
    seq = item["last_seq"]
    nbd_write(uri, os.urandom(MIB), 10 * MIB)
    wait_replicated(osr, vm, seq)

    stopped = osr.ok("vm", "stop", vm, "--timeout", "2")
    assert stopped["running"] is False and stopped["stopped_cleanly"] is False, stopped
    assert qemu_pids(prod_run) == []


# -- test 2: a drill at a wiped point --------------------------------------------------------


@pytest.mark.deadline(240)
def test_drill_of_a_wiped_point_is_unhealthy_and_says_why(qemu_reaper, env, guest):
    osr = env.osr
    qs = env.qs
    vm = "app"
    timeout_ms = 15000
    spec = qemu_spec(guest, "osr.mode=serve",
                     boot_check={"console_line": "OSR-READ:", "timeout_ms": timeout_ms})
    shown = create_qemu_vm(qs.vault_url, qs.data_dir / "admin.token", vm, spec)
    uri = shown["disks"][0]["uri"]
    protect(osr, vm)
    nbd_write(uri, archive("before-the-wipe"))
    good = osr.ok("point", "create", vm)
    nbd_write(uri, bytes(64 * KIB))  # zeros over the archive
    wiped = osr.ok("point", "create", vm)
    assert wiped["seq"] > good["seq"], (good, wiped)

    t0 = time.monotonic()
    job = osr.ok("test-failover", vm, "--point", wiped["id"], "--wait")
    elapsed = time.monotonic() - t0
    print(f"test-failover --wait of the wiped point took {elapsed:.1f} s: {job['vm']}")
    # The drill's disks are there: the job succeeds; its boot-check step says Unhealthy.
    assert job["state"] == "Succeeded" and job["error"] is None, job
    assert job["point"]["id"] == wiped["id"], job
    result = job["drill_vm"]
    assert result["health"] == "Unhealthy", job
    assert result["reason"] == f"no 'OSR-READ:' on the console within {timeout_ms} ms", result
    assert "boot_ms" not in result, result
    tail = result["console_tail"]
    lines = tail.splitlines()
    assert "OSR-BOOTED" in lines and "OSR-NODATA" in lines, tail  # whole lines, no CR
    assert "OSR-READ:" not in tail, tail
    last = job["steps"][-1]
    assert last["name"] == "Boot check: 'OSR-READ:' on the console", job["steps"]
    assert last["state"] == "Failed" and last["message"] == "Unhealthy: " + result["reason"], last
    assert all(s["state"] == "Succeeded" for s in job["steps"][:-1]), job["steps"]
    assert elapsed >= timeout_ms / 1000 - 1, f"Unhealthy after {elapsed:.1f} s: {result}"

    item = osr.ok("item", "show", vm)
    assert item["state"] == "TestFailoverCompleted" and item["drill"]["vm"] == result, item
    drill_run = qs.data_dir / "recovery" / "drills" / str(item["drill"]["view"])
    assert len(qemu_pids(drill_run)) == 1, "the unhealthy drill VM stays up to be looked at"
    text = console(osr, vm, drill=True)["text"]
    assert "OSR-NODATA" in text and "OSR-READ:" not in text, text[-2000:]

    cleanup = osr.job_ok("test-failover-cleanup", vm, job_type="test-failover-cleanup")
    assert cleanup["drill_vm"] == result, cleanup
    assert qemu_pids(drill_run) == [], f"the drill VM still runs: {qemu_pids(drill_run)}"
    assert osr.ok("item", "show", vm)["state"] == "Protected"


# -- test 3: checks before acting -----------------------------------------------------------


class SiteDaemon(OsrdProcess):
    """`osrd site --config FILE`; the config is rewritten by write(extra) before a start."""

    def __init__(self, tmp_path, name, certs):
        super().__init__(tmp_path / f"{name}.stderr")
        self.name = name
        self.config = tmp_path / f"{name}.toml"
        self.data_dir = tmp_path / f"{name}-data"
        self.certs = certs
        self.api_url = self.nbd = self.replication = None

    @property
    def label(self):
        return f"site {self.name}: osrd"

    def write(self, extra=""):
        cert, key = self.certs[self.name]
        self.config.write_text(
            f'name = "{self.name}"\ndata_dir = "{self.data_dir}"\n'
            'nbd_listen = "127.0.0.1:0"\nreplication_listen = "127.0.0.1:0"\n'
            'api_listen = "127.0.0.1:0"\n'
            f'tls_ca = "{self.certs["ca"]}"\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
            "allow_api_commands = true\n" + extra)

    def osrd_args(self):
        return ["site", "--config", self.config]

    def start(self):
        self.api_url = self.nbd = self.replication = None
        return super().start()

    def on_stdout_line(self, text):
        for attr, pattern in (("api_url", r"^osrd: api on (https://127\.0\.0\.1:\d+/api/v1)$"),
                              ("nbd", r"^osrd: nbd on (127\.0\.0\.1:\d+)$"),
                              ("replication", r"^osrd: replication on (127\.0\.0\.1:\d+)$")):
            m = re.match(pattern, text)
            if m:
                setattr(self, attr, m.group(1))

    def check_ready(self):
        if None in (self.api_url, self.nbd, self.replication):
            return f"site {self.name}: no api/nbd/replication line: {self.stdout_lines}"
        return None


class VaultDaemon(OsrdProcess):
    """`osrd vault` with its catalog, TLS files and admin token in data_dir (what the
    conftest's Osr needs: vault_url, data_dir, stderr())."""

    label = "vault: osrd"

    def __init__(self, tmp_path, catalog, certs):
        super().__init__(tmp_path / "vault.stderr")
        self.data_dir = tmp_path / "vault"
        self.catalog, self.certs, self.port = catalog, certs, free_port()

    @property
    def vault_url(self):
        return f"http://127.0.0.1:{self.port}"

    def osrd_args(self):
        cert, key = self.certs["vault"]
        return ["vault", "--db", self.catalog.db_arg, "--listen", f"127.0.0.1:{self.port}",
                "--site-ca", self.certs["ca"], "--site-cert", cert, "--site-key", key,
                "--admin-token-file", self.data_dir / "admin.token"]

    def check_ready(self):
        return self.catalog.check_in_use(None)


LAB_NETWORK = '\n[networks.lab]\nuser = true\n'


@pytest.fixture
def dr(tmp_path, new_catalog):
    """A vault and the sites primary and recovery as separate daemons: (vault, primary,
    recovery, osr, restart_recovery(extra)). The recovery site maps network `lab` to QEMU
    user networking until the test restarts it with another config."""
    certs = make_certs(tmp_path / "tls", "primary", "recovery", "vault")
    (tmp_path / "vault").mkdir()
    primary = SiteDaemon(tmp_path, "primary", certs)
    recovery = SiteDaemon(tmp_path, "recovery", certs)
    vault = VaultDaemon(tmp_path, new_catalog(tmp_path / "vault" / "vault.db"), certs)
    procs = [primary, recovery, vault]
    try:
        primary.write()
        primary.start()
        recovery.write(LAB_NETWORK)
        recovery.start()
        vault.start()
        osr = Osr(vault)

        def register(s):
            osr.ok("site", "add", s.name, "--api", s.api_url, "--replication", s.replication,
                   "--replace")

        def restart_recovery(extra):
            recovery.stop_clean()
            recovery.write(extra)
            recovery.start()
            register(recovery)  # new ports

        register(primary)
        register(recovery)
        yield vault, primary, recovery, osr, restart_recovery
    finally:
        stop_all_clean(procs)


def plan_of(proc, what):
    """The plan JSON a --dry-run printed (exit 0 when its checks pass, 1 when one fails)."""
    try:
        doc = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"{what}: no JSON plan: {proc.returncode} {proc.stdout!r} {proc.stderr!r}")
    assert set(doc) == {"plan"}, f"{what}: {doc}"
    plan = doc["plan"]
    assert set(plan) == {"action", "vm", "site", "ok", "checks", "creates", "uses",
                         "deletes"}, plan
    assert proc.returncode == (0 if plan["ok"] else 1), (what, proc.returncode, plan)
    for c in plan["checks"]:
        assert c["result"] in ("passed", "warning", "failed") and c["message"], c
    return plan


def check(plan, name):
    found = [c for c in plan["checks"] if c["name"] == name]
    assert len(found) == 1, f"check {name!r}: {plan['checks']}"
    return found[0]


def assert_unchanged(osr, vm, jobs_before, what):
    assert jobs_of(osr, vm) == jobs_before, f"{what}: a job was started"
    item = osr.ok("item", "show", vm)
    assert item["state"] == "Protected" and item["epoch"] == 1 and "drill" not in item, \
        f"{what}: {item}"
    shown = osr.ok("vm", "show", vm)
    assert shown["site"] == "primary", f"{what}: {shown}"


def test_dry_runs_plan_and_failed_checks_refuse_before_anything_changes(qemu_reaper, dr, guest,
                                                                         tmp_path):
    vault, primary, recovery, osr, restart_recovery = dr
    vm = "app"
    spec = qemu_spec(guest, "osr.mode=serve",
                     boot_check={"console_line": "OSR-BOOTED", "timeout_ms": 60000},
                     nics=[{"mac": MAC, "network": "lab"}])
    create_qemu_vm(vault.vault_url, vault.data_dir / "admin.token", vm, spec)
    protect(osr, vm)
    jobs = jobs_of(osr, vm)

    # Dry runs: the plan, the checks at the recovery site, no job.
    p = plan_of(osr.run("test-failover", vm, "--point", "latest", "--dry-run"),
                "test-failover --dry-run")
    assert (p["action"], p["vm"], p["site"], p["ok"]) == ("test-failover", vm, "recovery",
                                                         True), p
    assert [c["name"] for c in p["checks"]] == ["site", "space", "hypervisor", "commands",
                                                "networks"], p
    assert check(p, "site")["result"] == "passed"
    # A drill writes into overlays: nothing needed now, the disks' full size at most.
    full = sum(d["size_bytes"] for d in osr.ok("vm", "show", vm)["disks"])
    space = check(p, "space")
    assert space["result"] == "passed", space
    assert (space["needed_bytes"], space["full_bytes"]) == (0, full), space
    assert check(p, "hypervisor")["result"] in ("passed", "warning"), p  # warning: TCG
    assert check(p, "commands")["result"] == "passed", p
    net = check(p, "networks")
    assert net["result"] == "passed", net
    assert net["message"] == "lab → user (restrict=on: no way out)", net
    assert p["creates"] == [
        f"drill disks of {vm} at the latest point (writable; new)",
        f"drill VM {vm} on the drill networks, with a boot check (new)"], p
    assert p["uses"] == ["drill network lab: user (restrict=on: no way out)"], p
    assert p["deletes"] == [], p

    p = plan_of(osr.run("failover", vm, "--point", "latest", "--shutdown-source", "--dry-run"),
                "failover --dry-run")
    assert (p["action"], p["vm"], p["site"], p["ok"]) == ("failover", vm, "recovery", True), p
    assert [c["name"] for c in p["checks"]] == ["site", "names", "space", "hypervisor",
                                                "commands", "networks"], p
    assert check(p, "names")["result"] == "passed", p
    # Commit copies the failover disks into images: up to their full size.
    assert (check(p, "space")["needed_bytes"], check(p, "space")["full_bytes"]) == (0, full), p
    assert check(p, "networks")["message"] == "lab → user", p
    assert p["creates"][0].startswith(f"disks of {vm} at recovery over the latest point"), p
    assert f"VM {vm} running at recovery on its production networks" in p["creates"], p
    assert p["uses"] == ["production network lab: user"], p
    assert p["deletes"] == ["the VM at primary is shut down (its disks stay, fenced)"], p

    # The same plan as text (--output table).
    text = subprocess.run(
        [str(osrtest.require_osr()), "--vault", vault.vault_url, "test-failover", vm, "--point",
         "latest", "--dry-run"], capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL, env=osrtest.token_env(vault.data_dir / "admin.token"))
    assert text.returncode == 0, (text.stdout, text.stderr)
    lines = text.stdout.splitlines()
    assert lines[0] == f"test-failover {vm} at site recovery: the checks pass", text.stdout
    assert re.search(r"^  ok +networks +lab → user \(restrict=on: no way out\)$", text.stdout,
                     re.M), text.stdout
    assert f"  drill VM {vm} on the drill networks, with a boot check (new)" in lines, text.stdout
    assert "deletes: nothing" in lines, text.stdout

    # A drill without its VM (--no-start) asks nothing of the hypervisor or the networks.
    p = plan_of(osr.run("test-failover", vm, "--point", "latest", "--no-start", "--dry-run"),
                "test-failover --no-start --dry-run")
    assert p["ok"] is True and [c["name"] for c in p["checks"]] == ["site", "space"], p
    assert len(p["creates"]) == 1, p
    assert_unchanged(osr, vm, jobs, "after the dry runs")

    # The recovery site no longer maps network 'lab': refused, nothing changes.
    restart_recovery("")
    for args in (("test-failover", vm, "--point", "latest"), ("failover", vm)):
        msg = osr.fails(*args)
        assert msg.startswith(f"{args[0]} {vm}: check 'networks' failed at site recovery: "), msg
        assert "network 'lab'" in msg and "[networks.lab]" in msg, msg
        assert "nothing was changed" in msg, msg
        assert_unchanged(osr, vm, jobs, f"osr {' '.join(args)}")
        p = plan_of(osr.run(*args, "--dry-run"), f"{args[0]} --dry-run")
        assert p["ok"] is False and check(p, "networks")["result"] == "failed", p
        assert "'lab'" in check(p, "networks")["message"], p
    # A drill without its VM still can: no network is asked for.
    p = plan_of(osr.run("test-failover", vm, "--point", "latest", "--no-start", "--dry-run"),
                "test-failover --no-start --dry-run, network unmapped")
    assert p["ok"] is True, p

    # The recovery site's qemu_binary is a file that is not there: refused, nothing changes.
    missing = tmp_path / "no-such-dir" / "qemu-system-x86_64"
    restart_recovery(f'qemu_binary = "{missing}"\n' + LAB_NETWORK)
    for args in (("failover", vm), ("test-failover", vm, "--point", "latest")):
        msg = osr.fails(*args)
        assert msg.startswith(f"{args[0]} {vm}: check 'hypervisor' failed at site recovery: "), \
            msg
        assert f"qemu binary {missing} does not exist or is not executable (qemu_binary)" in msg, \
            msg
        assert_unchanged(osr, vm, jobs, f"osr {' '.join(args)} with qemu_binary missing")
    assert qemu_pids(tmp_path) == []


def format_size(n):
    """As the site writes sizes (FormatSize): '6.4 MiB'."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    v, u = float(n), 0
    while v >= 1024.0 and u < 5:
        v /= 1024.0
        u += 1
    return f"{n} B" if u == 0 else f"{v:.1f} {units[u]}"


def test_protect_is_refused_when_the_recovery_site_lacks_space(small_recovery):
    env, mnt = small_recovery
    osr = env.osr
    size = 64 * MIB
    shown = create_vm(osr, "vm1", [("os", "64M", size)])
    # The journal's headroom for the default policy (24 h): a tenth of the disks per day.
    headroom = int(size * 0.1)

    # Empty (sparse) disks fit now, not at their full size: a warning, protect may go on.
    p = plan_of(osr.run("protect", "vm1", "--target", "recovery", "--dry-run"),
                "protect --dry-run")
    assert (p["action"], p["site"], p["ok"]) == ("protect", "recovery", True), p
    space = check(p, "space")
    assert space["result"] == "warning", space
    assert space["full_bytes"] == size + headroom, space
    assert headroom <= space["needed_bytes"] < headroom + MIB, space
    assert space["needed_bytes"] <= space["free_bytes"] <= 24 * MIB, space
    # "Now" is what the disks hold plus the journal's headroom, said apart.
    assert space["message"] == (
        f"{mnt} has {format_size(space['free_bytes'])} free: enough for the "
        f"{format_size(space['needed_bytes'])} needed now "
        f"({format_size(space['needed_bytes'] - headroom)} the disks hold + "
        f"{format_size(headroom)} journal headroom), not for the disks' full size "
        f"({format_size(space['full_bytes'])})"), space

    # 32 MiB written: what the disk holds plus the journal's headroom does not fit.
    h = connect(shown["disks"][0]["uri"])
    try:
        for i in range(32):
            h.pwrite(os.urandom(MIB), i * MIB)
        h.flush()
    finally:
        close_handle(h)
    p = plan_of(osr.run("protect", "vm1", "--target", "recovery", "--dry-run"),
                "protect --dry-run after 32 MiB")
    assert p["ok"] is False, p
    space = check(p, "space")
    assert space["result"] == "failed", space
    assert 32 * MIB + headroom <= space["needed_bytes"] < 33 * MIB + headroom, space
    assert space["free_bytes"] < space["needed_bytes"], space
    assert space["message"] == (f"{mnt} has {format_size(space['free_bytes'])} free; this "
                                f"needs {format_size(space['needed_bytes'])} now "
                                f"({format_size(space['needed_bytes'] - headroom)} the disks "
                                f"hold + {format_size(headroom)} journal headroom)"), space

    msg = osr.fails("protect", "vm1", "--target", "recovery")
    m = re.match(r"^protect vm1: check 'space' failed at site recovery: (.+) has (.+) free; "
                 r"this needs (.+) now \((.+) the disks hold \+ (.+) journal headroom\) "
                 r"\(nothing was changed; --dry-run shows every check\)$",
                 msg)
    assert m, msg
    assert m.group(1) == str(mnt) and m.group(3) == format_size(space["needed_bytes"]), msg
    assert osr.ok("item", "list") == [], "a refused protect made an item"
    assert jobs_of(osr, "vm1") == [], "a refused protect started a job"
    assert not (mnt / "stores" / "vm1").exists(), sorted(os.listdir(mnt / "stores"))
    sites = {s["name"]: s for s in osr.ok("site", "list")}
    assert sites["recovery"]["stores"] == [], sites["recovery"]


# -- test 4: an app-consistent point on a guest without an agent ----------------------------


@pytest.mark.deadline(240)
def test_app_point_on_a_guest_without_an_agent_falls_back_to_marking_the_position(
        qemu_reaper, env, guest):
    """The spec has the agent channel (guest_agent true, the default) but the test guest
    runs no qemu-guest-agent: the site's guest-sync waits its 10 s and answers 503; the
    vault has no freeze hook to try, so the point only marks the position
    (docs/architecture.md: quiesced_by none, "crash-consistent, labelled app"). With
    guest_agent false the site answers 501 at once, with the same result (that VM has a
    console boot check: a stored spec with neither is unreadable, see
    test_a_qemu_vm_without_agent_or_boot_check_is_usable)."""
    osr = env.osr
    qs = env.qs
    token = qs.data_dir / "admin.token"
    vms = {"agent": qemu_spec(guest, "osr.mode=serve"),
           "noagent": qemu_spec(guest, "osr.mode=serve", guest_agent=False,
                                boot_check={"console_line": "OSR-BOOTED", "timeout_ms": 60000})}
    uris = {}
    for name, spec in vms.items():
        shown = create_qemu_vm(qs.vault_url, token, name, spec)
        assert shown["spec"]["guest_agent"] is (name == "agent"), shown["spec"]
        protect(osr, name)
        uris[name] = shown["disks"][0]["uri"]
        nbd_write(uris[name], archive(f"text-of-{name}"))
        assert osr.ok("vm", "start", name)["running"] is True
    for name in vms:
        wait_console(osr, name, f"OSR-READ:text-of-{name}")
    agent_run = qs.data_dir / "primary" / "groups" / "agent" / "run"
    assert (agent_run / "qga.sock").exists(), sorted(os.listdir(agent_run))

    for name, bound_s in (("agent", 25), ("noagent", 8)):
        pids = qemu_pids(qs.data_dir / "primary" / "groups" / name / "run")
        last_seq = osr.ok("item", "show", name)["last_seq"]
        t0 = time.monotonic()
        p = osr.ok("point", "create", name, "--app", timeout=60)
        took = time.monotonic() - t0
        print(f"{name}: osr point create --app took {took:.1f} s: {p}")
        assert took < bound_s, f"{name}: point create --app took {took:.1f} s"
        assert p["type"] == "app" and p["quiesced_by"] == "none", p
        assert p["seq"] >= last_seq, (p, last_seq)
        listed = [q for q in osr.ok("point", "list", name) if q["id"] == p["id"]]
        assert listed and listed[0]["type"] == "app", listed
        # The VM is left as it was: the same qemu, its console going on.
        assert qemu_pids(qs.data_dir / "primary" / "groups" / name / "run") == pids
        assert osr.ok("vm", "show", name)["running"] is True
        n = console(osr, name)["text"].count("OSR-ALIVE:")
        wait_for(lambda: console(osr, name)["text"].count("OSR-ALIVE:") > n, 20,
                 f"{name}'s console to go on after the app point", interval=0.5)
        # Replication and crash points go on (a point at the same seq would be this one).
        nbd_write(uris[name], os.urandom(64 * KIB), 8 * MIB)
        crash = osr.ok("point", "create", name)
        assert crash["type"] == "crash" and "quiesced_by" not in crash, crash
        assert crash["seq"] > p["seq"], (crash, p)
    log = qs.log_path.read_text(errors="replace")
    # The vault logs why there was no freeze.
    assert re.search(r"vault: agent: guest agent freeze: .*did not answer guest-sync", log), \
        log[-3000:]
    assert re.search(r"vault: noagent: guest agent freeze: .*without a guest agent channel", log), \
        log[-3000:]
    for name in vms:
        assert osr.ok("vm", "stop", name, "--timeout", "2")["running"] is False


@pytest.mark.deadline(120)
def test_a_qemu_vm_without_agent_or_boot_check_drills_not_checked(qemu_reaper, env, guest):
    """`guest_agent: false` and no boot_check is a valid spec: it reads back as the same
    qemu VM (it did not: the stored boot_check {console_line: ""} was refused on reading
    when guest_agent is false, and the VM showed driver 'invalid'), can be protected, and
    its drill boots with nothing to check (health NotChecked, docs/api.md)."""
    qs = env.qs
    osr = env.osr
    spec = qemu_spec(guest, "osr.mode=serve", guest_agent=False)
    shown = create_qemu_vm(qs.vault_url, qs.data_dir / "admin.token", "vm1", spec)
    assert shown["spec"]["guest_agent"] is False, shown
    shown = osr.ok("vm", "show", "vm1")
    assert shown["driver"] == "qemu" and "spec_error" not in shown, shown
    p = plan_of(osr.run("protect", "vm1", "--target", "recovery", "--dry-run"),
                "protect --dry-run")
    assert p["ok"] is True, p
    protect(osr, "vm1")
    nbd_write(shown["disks"][0]["uri"], archive("unchecked"))

    job = osr.job_ok("test-failover", "vm1", "--point", "latest", job_type="test-failover")
    result = job["drill_vm"]
    assert result["health"] == "NotChecked" and "no boot check" in result["reason"], result
    assert not any(s["name"].startswith("Boot check") for s in job["steps"]), job["steps"]
    item = osr.ok("item", "show", "vm1")
    assert item["drill"]["vm"] == result, item
    drill_run = qs.data_dir / "recovery" / "drills" / str(item["drill"]["view"])
    assert len(qemu_pids(drill_run)) == 1, "the drill VM does not run"
    # Not checked, but up all the same: its console says what it read.
    wait_console(osr, "vm1", "OSR-READ:unchecked", drill=True)
    cleanup = osr.job_ok("test-failover-cleanup", "vm1", job_type="test-failover-cleanup")
    assert cleanup["drill_vm"] == result, cleanup
    assert qemu_pids(drill_run) == []
