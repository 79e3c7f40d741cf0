"""Failover with the parts as separate daemons: a vault (`osrd vault`) and two sites
(`osrd site`), driven through the `osr` CLI, data checked through libnbd.

- An unplanned failover while the primary site's daemon is dead (kill -9) with writes the
  recovery site never got; the primary comes back: it is fenced (its disks refuse writes,
  its records are refused), commit and reprotect put the new primary's data over the old
  primary's unreplicated writes, exactly.
- kill -9 of the vault in the middle of jobs (commit while it materialises, reprotect while
  it replicates): the restarted vault resumes them and they succeed, data intact.
"""

import json
from pathlib import Path
import os
import random
import re
import shutil
import subprocess

import pytest

from conftest import (KIB, MIB, OsrdProcess, api_ok, make_certs, require_libnbd,
                      seed_for, wait_for, write_config, SiteProcess)
import osrtest

DISK = 32 * MIB
# One osr call (a job wait included), stretched by OSR_TEST_TIME_FACTOR (3 on the ASan build).
CLI_TIMEOUT_S = 90 * float(os.environ.get("OSR_TEST_TIME_FACTOR", "1"))


class VaultProcess(OsrdProcess):
    """`osrd vault` on `catalog` (an osrtest.Catalog: a SQLite file or a PostgreSQL
    database), its TLS files and admin token in state_dir."""

    label = "vault: osrd"

    def __init__(self, catalog, state_dir, port, log_path):
        super().__init__(log_path)
        self.catalog, self.state_dir, self.port = catalog, Path(state_dir), port

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_file(self):
        return self.state_dir / "admin.token"

    def osrd_args(self):
        certs = make_certs(self.state_dir / "tls", "vault")
        cert, key = certs["vault"]
        args = ["vault", "--db", self.catalog.db_arg, "--listen", f"127.0.0.1:{self.port}",
               "--site-ca", certs["ca"], "--site-cert", cert, "--site-key", key]
        if self.catalog.backend != "sqlite":
            args += ["--admin-token-file", self.token_file]
        else:  # the default: admin.token beside the catalog
            assert self.catalog.sqlite_path.parent == self.state_dir, self.catalog
        return args

    def check_ready(self):
        return self.catalog.check_in_use(self.state_dir / "vault.db")


class Osr:
    def __init__(self, vault, sites=()):
        self.vault = vault
        self.sites = list(sites)

    def logs(self):
        """The tails of the vault's and the sites' logs, for a failure's message."""
        out = f"vault: {self.vault.stderr()[-3000:]}"
        for s in self.sites:
            out += f"\n{s.name}: {s.stderr()[-3000:]}"
        return out

    def run(self, *args, timeout=CLI_TIMEOUT_S):
        cmd = [str(osrtest.require_osr()), "--vault", self.vault.url, "--output", "json",
               *[str(a) for a in args]]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL,
                                  env=osrtest.token_env(self.vault.token_file))
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"timed out after {timeout} s: {' '.join(cmd)}: {e.stderr}\n"
                        f"{self.logs()}")

    def ok(self, *args, timeout=CLI_TIMEOUT_S):
        p = self.run(*args, timeout=timeout)
        assert p.returncode == 0, (f"osr {' '.join(map(str, args))}: {p.returncode}\n"
                                   f"{p.stdout[-2000:]}\n{p.stderr[-2000:]}\n{self.logs()}")
        return json.loads(p.stdout) if p.stdout.strip() else None


@pytest.fixture
def dr(tmp_path, new_catalog):
    """(vault, primary, recovery, osr) as separate processes; all stopped at the end."""
    require_libnbd()
    procs = []

    def site(name, extra=""):
        config, data_dir = write_config(tmp_path, name)
        if extra:
            config.write_text(config.read_text() + extra)
        s = SiteProcess(name, config, data_dir, tmp_path / f"{name}.stderr")
        procs.append(s)
        return s.start()

    primary = site("primary")
    recovery = site("recovery", 'materialise_rate = "24M"\n')
    vault = VaultProcess(new_catalog(tmp_path / "vault.db"), tmp_path, osrtest.free_port(),
                         tmp_path / "vault.stderr")
    procs.append(vault)
    vault.start()
    osr = Osr(vault, (primary, recovery))
    for s in (primary, recovery):
        register(osr, s)
    yield vault, primary, recovery, osr
    osrtest.stop_all_clean(procs)


def register(osr, s):
    # A restarted site listens on new ports: moving it is explicit (--replace).
    osr.ok("site", "add", s.name, "--api", s.api_url, "--replication", s.replication,
           "--replace")


def disk_uri(osr, vm):
    return osr.ok("vm", "show", vm)["disks"][0]["uri"]


def write_random(uri, model, rng, n, max_len=128 * KIB):
    osrtest.write_random(uri, model, rng, n, max_len, "pytest-dr")


def read_all(uri, size):
    return osrtest.read_uri(uri, size, "pytest-dr")


def wait_job(osr, job_id, timeout=CLI_TIMEOUT_S):
    job = osr.ok("job", "wait", job_id, timeout=timeout)
    assert job["state"] == "Succeeded", job
    return job


def test_unplanned_failover_with_the_primary_killed(dr, request):
    vault, primary, recovery, osr = dr
    rng = random.Random(seed_for(request))
    osr.ok("vm", "create", "vm1", "--site", "primary", "--disk", f"os:{DISK}")
    model = bytearray(DISK)
    uri = disk_uri(osr, "vm1")
    write_random(uri, model, rng, 30)
    osr.ok("protect", "vm1", "--target", "recovery", "--wait")
    write_random(uri, model, rng, 20)
    osr.ok("point", "create", "vm1")
    n_a = api_ok(primary, "GET", "/groups/vm1")["last_seq"]

    # Writes the recovery site never gets: it is down, then the primary dies too, then
    # the recovery site comes back (new ports) and is the one left.
    recovery.kill9()
    versions = [bytes(model)]  # the disk after each of the primary's later writes
    h = osrtest.connect(uri, "pytest-dr")
    for _ in range(25):
        length = rng.randrange(1, 64 * KIB)
        off = rng.randrange(0, DISK - length)
        data = rng.randbytes(length)
        h.pwrite(data, off)
        model[off:off + length] = data
        versions.append(bytes(model))
    h.flush()
    osrtest.close_handle(h)
    old_primary = bytes(model)
    # While the recovery site does not answer, the item says so, and its RPO is the age of
    # what is known to be there: a number that grows, never 0 (nothing at risk) meanwhile.
    seen = {}

    def shown():
        seen["item"] = osr.ok("item", "show", "vm1")
        return seen["item"]

    item = wait_for(lambda: shown()["health"].startswith("Critical") and seen["item"], 30,
                    "the item to say its recovery site does not answer",
                    detail=lambda: seen.get("item"))
    assert "unreachable" in item["health"], item
    first = item["rpo_seconds"]
    assert isinstance(first, (int, float)) and first > 0, item
    wait_for(lambda: shown()["rpo_seconds"] > first, 10, "the RPO to grow",
             detail=lambda: seen.get("item"))
    primary.kill9()
    recovery.start()
    register(osr, recovery)

    job = osr.ok("failover", "vm1", "--point", "latest", "--wait")
    assert job["state"] == "Succeeded", job
    fence = [s for s in job["steps"] if s["name"].startswith("Fence")]
    assert fence and fence[0]["state"] == "Failed" and "unreachable" in fence[0]["message"], job
    seq = job["point"]["seq"]
    assert seq == n_a, job  # what the recovery site holds: nothing after the kill
    item = osr.ok("item", "show", "vm1")
    assert item["state"] == "FailedOver" and item["epoch"] == 2, item
    # Exactly the prefix the recovery site had.
    new_uri = disk_uri(osr, "vm1")
    assert "127.0.0.1:" + recovery.nbd.split(":")[1] in new_uri, new_uri
    expected = bytearray(versions[seq - n_a])
    osrtest.assert_same_bytes(read_all(new_uri, DISK), bytes(expected), "failed-over disk")
    write_random(new_uri, expected, rng, 20)

    # The old primary comes back (new ports): fenced before anything of it is accepted.
    primary.start()
    register(osr, primary)
    wait_for(lambda: api_ok(primary, "GET", "/groups/vm1")["fenced_epoch"] >= 2, 20,
             "the returning primary to be fenced")
    nbd = require_libnbd()
    h = osrtest.connect(f"nbd://{primary.nbd}/vm/vm1/os", "pytest-dr")
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"x" * 4096, 0)
    assert e.value.errno in (1, "EPERM"), e.value
    assert bytes(h.pread(4096, 0)) == old_primary[:4096], "reads of the old disk still work"
    osrtest.close_handle(h)
    osrtest.assert_same_bytes(read_all(new_uri, DISK), bytes(expected),
                              "the new primary after the old one came back")

    osr.ok("commit", "vm1", "--wait")
    rep = osr.ok("reprotect", "vm1", "--wait")
    assert rep["state"] == "Succeeded" and rep["mode"] == "exact", rep
    # The old primary's writes the store never got are shipped over, whatever they were.
    assert rep["found"]["unreplicated_records"] == n_a + 25 - seq, rep
    item = osr.ok("item", "show", "vm1")
    assert item["state"] == "Protected" and item["source"] == "recovery", item
    assert item["target"] == "primary", item
    drill = osr.ok("test-failover", "vm1", "--point", "latest", "--wait")
    got = read_all(drill["disks"][0]["uri"], DISK)
    osrtest.assert_same_bytes(got, bytes(expected), "the old primary after reprotect (drill)")
    osr.ok("test-failover-cleanup", "vm1", "--wait")


def test_jobs_resume_after_the_vault_is_killed(dr, request):
    vault, primary, recovery, osr = dr
    rng = random.Random(seed_for(request))
    size = 256 * MIB
    osr.ok("policy", "create", "slow", "--bandwidth", "24M")
    osr.ok("vm", "create", "vm1", "--site", "primary", "--disk", f"os:{size}")
    model = bytearray(size)
    uri = disk_uri(osr, "vm1")
    write_random(uri, model, rng, 40, max_len=512 * KIB)
    osr.ok("protect", "vm1", "--target", "recovery", "--policy", "slow", "--wait")
    osr.ok("failover", "vm1", "--point", "latest", "--wait")

    def kill_mid(job, step_prefix):
        """Kills the vault while `job` runs the step; restarts it; the job resumes."""
        def in_step():
            j = osr.ok("job", "show", job)
            assert j["state"] in ("Queued", "Running"), f"the job ended before the kill: {j}"
            s = j["steps"][-1] if j["steps"] else {}
            return s.get("name", "").startswith(step_prefix) and j["progress"] > 0
        wait_for(in_step, 30, f"job {job} to be in '{step_prefix}'", interval=0.05)
        vault.kill9()
        vault.start()
        done = wait_job(osr, job)
        names = [s["name"] for s in done["steps"]]
        assert "The vault restarted: resuming" in names, done
        # The step the kill cut short says so; none is left Running in a finished job.
        cut = [s for s in done["steps"] if s["message"].startswith("cut short: the vault stopped")]
        assert len(cut) == 1 and cut[0]["name"].startswith(step_prefix), done
        assert all(s["state"] != "Running" for s in done["steps"]), done
        return done

    # Commit: materialising 256 MiB at 24 MB/s takes ~10 s.
    commit = osr.ok("commit", "vm1")["id"]
    kill_mid(commit, "Copy the rest of the point")
    assert osr.ok("item", "show", "vm1")["state"] == "FailoverCommitted"
    new_uri = disk_uri(osr, "vm1")
    osrtest.assert_same_bytes(read_all(new_uri, size), bytes(model), "after the resumed commit")

    # Reprotect: ~48 MiB differ, shipped at 24 MB/s.
    write_random(new_uri, model, rng, 200, max_len=512 * KIB)
    rep = osr.ok("reprotect", "vm1")["id"]
    done = kill_mid(rep, "Replicate")
    assert done["mode"] == "exact", done
    item = osr.ok("item", "show", "vm1")
    assert item["state"] == "Protected" and item["source"] == "recovery", item
    drill = osr.ok("test-failover", "vm1", "--point", "latest", "--wait")
    osrtest.assert_same_bytes(read_all(drill["disks"][0]["uri"], size), bytes(model),
                              "the old primary after the resumed reprotect")
    osr.ok("test-failover-cleanup", "vm1", "--wait")


@pytest.mark.parametrize("loss", ["history", "disk"])
def test_reprotect_when_the_old_primary_lost_its_history_or_its_disk(dr, request, loss):
    """The old primary's capture history is gone (hash compare), or its whole state is
    (a rebuilt site: full sparse copy); either way reprotect makes it exact."""
    vault, primary, recovery, osr = dr
    rng = random.Random(seed_for(request))
    osr.ok("vm", "create", "vm1", "--site", "primary", "--disk", f"os:{DISK}")
    model = bytearray(DISK)
    uri = disk_uri(osr, "vm1")
    write_random(uri, model, rng, 40)
    osr.ok("protect", "vm1", "--target", "recovery", "--wait")
    write_random(uri, model, rng, 10)
    osr.ok("failover", "vm1", "--point", "latest", "--wait")
    new_uri = disk_uri(osr, "vm1")
    osrtest.assert_same_bytes(read_all(new_uri, DISK), bytes(model), "after failover")
    write_random(new_uri, model, rng, 20)
    osr.ok("commit", "vm1", "--wait")

    primary.stop_clean()
    data = primary.data_dir
    if loss == "history":
        shutil.rmtree(data / "groups" / "vm1" / "capture")
    else:
        shutil.rmtree(data)
    primary.start()
    register(osr, primary)
    if loss == "history":
        g = api_ok(primary, "GET", "/groups/vm1")
        assert g["history_lost"] is True, g
    rep = osr.ok("reprotect", "vm1", "--wait")
    assert rep["state"] == "Succeeded", rep
    if loss == "history":
        assert rep["mode"] == "hash", rep
        # Only what differs: the 20 writes at the new primary (<= 128 KiB each, in 64 KiB
        # regions) and what the store held after the point (nothing: latest).
        assert 0 < rep["bytes_shipped"] <= 20 * 3 * 64 * KIB, rep
    else:
        assert rep["mode"] == "full", rep
        allocated = rep["bytes_shipped"]
        assert allocated <= DISK, rep
    drill = osr.ok("test-failover", "vm1", "--point", "latest", "--wait")
    osrtest.assert_same_bytes(read_all(drill["disks"][0]["uri"], DISK), bytes(model),
                              f"the old primary after reprotect ({loss} lost)")
    osr.ok("test-failover-cleanup", "vm1", "--wait")


def test_jobs_of_different_vms_run_at_the_same_time(dr, request):
    """A long commit of one VM does not hold back the failover of another."""
    vault, primary, recovery, osr = dr
    rng = random.Random(seed_for(request))
    size = 256 * MIB
    osr.ok("vm", "create", "big", "--site", "primary", "--disk", f"os:{size}")
    write_random(disk_uri(osr, "big"), bytearray(size), rng, 20, max_len=512 * KIB)
    osr.ok("protect", "big", "--target", "recovery", "--wait")
    osr.ok("vm", "create", "small", "--site", "primary", "--disk", f"os:{DISK}")
    osr.ok("protect", "small", "--target", "recovery", "--wait")
    osr.ok("failover", "big", "--point", "latest", "--wait")
    commit = osr.ok("commit", "big")["id"]  # ~10 s at the recovery site's 24 MB/s
    wait_for(lambda: osr.ok("job", "show", commit)["state"] == "Running", 10,
             "the commit of big to run")
    job = osr.ok("failover", "small", "--point", "latest", "--wait", timeout=30)
    assert job["state"] == "Succeeded", job
    assert osr.ok("job", "show", commit)["state"] == "Running", \
        "the commit of big ended before the failover of small: nothing was shown"
    wait_job(osr, commit)


def test_a_qemu_vm_survives_a_restart_of_its_site(tmp_path):
    """kill -9 of the site daemon under a running QEMU guest: the guest's disk I/O waits
    (qemu reconnects to the restarted daemon on the same NBD port), the restarted site
    takes charge of the VM again (stop works), and the disk holds what the guest wrote."""
    import io
    import tarfile
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is absent (apt-get install qemu-system-x86): "
                    "the real-VM restart test cannot run")
    require_libnbd()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    guest = os.path.join(root, "build", "guest")
    p = subprocess.run(["bash", os.path.join(root, "tests/vm/build_guest.sh"), guest],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    nbd_port = osrtest.free_port()
    # A strict site (the default): the guest's qemu arguments are an entry of its
    # commands file, named by the spec.
    append = "console=ttyS0 quiet panic=-1 osr.mode=count"
    commands = tmp_path / "commands.toml"
    commands.write_text("[qemu_args.count-guest]\n"
                        f"args = \"-kernel {guest}/vmlinuz -initrd {guest}/initramfs.cpio.gz "
                        f"-append '{append}' -no-reboot\"\n")
    commands.chmod(0o600)
    config, data = write_config(tmp_path, "primary", f'commands_file = "{commands}"\n')
    config.write_text(config.read_text().replace('nbd_listen = "127.0.0.1:0"',
                                                  f'nbd_listen = "127.0.0.1:{nbd_port}"'))
    site = SiteProcess("primary", config, data, tmp_path / "site.stderr")
    site.start()
    try:
        api_ok(site, "PUT", "/groups/vm1", {"disks": [{"name": "os", "size_bytes": 16 * MIB}]},
               status=201)
        api_ok(site, "POST", "/groups/vm1/vm/start",
               {"driver": "qemu", "memory_bytes": 256 * MIB, "cpus": 1,
                "qemu_args_name": "count-guest"},
               status=204)
        console = data / "groups" / "vm1" / "run" / "console.log"
        # QEMU reaches its disk over the VM's own socket (0600), not TCP.
        pid = api_ok(site, "GET", "/groups/vm1")["vm"]["pid"]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().decode(errors="replace")
        sock = data / "groups" / "vm1" / "run" / "nbd.sock"
        assert f"server.type=unix,server.path={sock},export=vm/vm1/os" in cmdline, cmdline

        def count():
            text = console.read_text(errors="replace") if console.exists() else ""
            assert "OSR-ERROR" not in text, text[-2000:]
            seen = [int(x) for x in re.findall(r"OSR-COUNT:(\d+)", text)]
            return max(seen) if seen else 0

        wait_for(lambda: count() >= 3, 120, "the guest to write 3 times")
        site.kill9()
        at_kill = count()
        site.start()  # same config: the same NBD port
        g = api_ok(site, "GET", "/groups/vm1")
        assert g["vm"]["running"] is True, g  # taken in charge again
        wait_for(lambda: count() >= at_kill + 5, 60, "the guest's writes to go on")
        text = console.read_text(errors="replace")
        assert "OSR-IOERROR" not in text, text[-2000:]
        stop = api_ok(site, "POST", "/groups/vm1/vm/stop", {"timeout_ms": 1000})
        assert stop["clean"] is False, stop  # the test guest ignores ACPI: a hard stop
        assert api_ok(site, "GET", "/groups/vm1")["vm"]["running"] is False
        last = count()
        raw = read_all(f"nbd://{site.nbd}/vm/vm1/os", 16 * MIB)
        with tarfile.open(fileobj=io.BytesIO(raw)) as t:
            value = int(t.extractfile("hello.txt").read())
        assert last <= value <= last + 1, (value, last)
    finally:
        site.stop()
