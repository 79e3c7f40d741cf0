"""Several vaults on one PostgreSQL catalog, one leader (docs/operations.md, "Several
vaults"): two `osrd vault` processes on one real PostgreSQL 15 server (osrtest.PgServer),
two site daemons, data checked through libnbd.

- The leader is killed (kill -9) in the middle of a failover, then of a commit, then of a
  reprotect: the other vault takes the lease within seconds, resumes the job from its
  recorded steps and finishes it; the disks are byte-exact, no fencing or opening step ran
  twice, and the surviving vault answers GET /items at every poll. Jobs are submitted
  through the follower as well as through the leader.
- A paused leader (SIGSTOP past its lease, then SIGCONT) writes nothing once the other took
  over: its job's writes are refused (fenced_writes in its GET /vault), the rows stay as
  the new leader left them, and it becomes a follower.
"""

import json
import os
import random
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import (KIB, MIB, OsrdProcess, SiteProcess, api_ok, make_certs,
                      require_libnbd, seed_for, wait_for, write_config)
import osrtest

LEASE_TTL_MS = 2000
TAKEOVER_S = 15  # the lease lapses in 2 s, a follower tries every 0.67 s: generous bound
CLI_TIMEOUT_S = 90 * float(os.environ.get("OSR_TEST_TIME_FACTOR", "1"))
HTTP_TIMEOUT_S = 10


class LeaderVault(OsrdProcess):
    def __init__(self, name, db_url, tmp_path):
        super().__init__(tmp_path / f"{name}.stderr")
        self.name, self.db_url, self.tmp_path = name, db_url, tmp_path
        self.port = osrtest.free_port()
        self.token_file = tmp_path / "admin.token"  # one catalog, one first token

    @property
    def label(self):
        return f"vault {self.name}: osrd"

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def osrd_args(self):
        certs = make_certs(self.tmp_path / "tls", "vault")
        cert, key = certs["vault"]
        return ["vault", "--db", self.db_url, "--listen", f"127.0.0.1:{self.port}",
                "--lease-ttl-ms", str(LEASE_TTL_MS), "--admin-token-file", str(self.token_file),
                "--site-ca", certs["ca"], "--site-cert", cert, "--site-key", key]

    def call(self, method, path, body=None, timeout=HTTP_TIMEOUT_S):
        """(HTTP status, JSON answer); (None, error text) when the vault does not answer."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.url + "/api/v1" + path, data=data, method=method,
            headers={"Content-Type": "application/json",
                     "Authorization": f"Bearer {self.token_file.read_text().strip()}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            return None, str(e)

    def ok(self, method, path, body=None):
        status, answer = self.call(method, path, body)
        assert status is not None and 200 <= status < 300, (
            f"{method} {path} at vault {self.name}: {status} {answer}\n{self.stderr()[-3000:]}")
        return answer

    def osr(self, *args, timeout=CLI_TIMEOUT_S):
        cmd = [str(osrtest.require_osr()), "--vault", self.url, "--output", "json",
               *[str(a) for a in args]]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL, env=osrtest.token_env(self.token_file))
        assert p.returncode == 0, (f"osr {' '.join(map(str, args))} at vault {self.name}: "
                                   f"{p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}\n"
                                   f"vault: {self.stderr()[-3000:]}")
        return json.loads(p.stdout) if p.stdout.strip() else None

    def role(self):
        return self.ok("GET", "/vault")["this"]["role"]

    def role_id(self):
        return self.ok("GET", "/vault")["this"]["id"]


@pytest.fixture
def cluster(tmp_path):
    """(pg, db name, vault A, vault B, primary, recovery): A leads, B follows."""
    require_libnbd()
    procs = []
    with osrtest.PgServer() as pg:
        url = pg.create_database("osr_leader")

        def site(name, extra=""):
            config, data_dir = write_config(tmp_path, name, extra=extra)
            s = SiteProcess(name, config, data_dir, tmp_path / f"{name}.stderr")
            procs.append(s)
            return s.start()

        primary = site("primary")
        recovery = site("recovery", 'materialise_rate = "16M"\n')
        a = LeaderVault("A", url, tmp_path)
        procs.append(a)
        a.start()
        b = LeaderVault("B", url, tmp_path)
        procs.append(b)
        b.start()
        try:
            assert a.role() == "leader" and b.role() == "follower"
            for s in (primary, recovery):
                a.osr("site", "add", s.name, "--api", s.api_url, "--replication", s.replication)
            yield pg, url.rsplit("/", 1)[1], a, b, primary, recovery
        finally:
            osrtest.stop_all_clean(procs)


def write_random(uri, model, rng, n, max_len=512 * KIB):
    osrtest.write_random(uri, model, rng, n, max_len, "pytest-leader")


def read_all(uri, size):
    return osrtest.read_uri(uri, size, "pytest-leader")


def wait_in_step(vault, job, step_prefix, need_progress=False):
    def in_step():
        j = vault.ok("GET", f"/jobs/{job}")
        assert j["state"] in ("Queued", "Running"), f"the job ended before the kill: {j}"
        s = j["steps"][-1] if j["steps"] else {}
        return (s.get("name", "").startswith(step_prefix) and s.get("state") == "Running"
                and (j["progress"] > 0 or not need_progress))
    wait_for(in_step, 60, f"job {job} to be in '{step_prefix}'", interval=0.05)


def kill_leader_mid(leader, survivor, job, step_prefix, need_progress=False):
    """kill -9 of `leader` while `job` runs the step; `survivor` takes over and finishes
    it, answering GET /items at every poll meanwhile. The finished job."""
    wait_in_step(survivor, job, step_prefix, need_progress)
    leader.kill9()
    t0 = time.monotonic()
    took_over = None
    deadline = t0 + 180
    polls = 0
    while True:
        status, items = survivor.call("GET", "/items")
        assert status == 200, f"vault {survivor.name} GET /items: {status} {items}"
        polls += 1
        if took_over is None and survivor.role() == "leader":
            took_over = time.monotonic() - t0
        j = survivor.ok("GET", f"/jobs/{job}")
        if j["state"] not in ("Queued", "Running"):
            break
        assert time.monotonic() < deadline, f"job {job} did not end: {j}"
        time.sleep(0.2)
    assert took_over is not None and took_over < TAKEOVER_S, took_over
    assert j["state"] == "Succeeded", j
    names = [s["name"] for s in j["steps"]]
    assert names.count("Another vault took over: resuming") == 1, j
    cut = [s for s in j["steps"] if s["message"].startswith("cut short: the vault stopped")]
    assert len(cut) == 1 and cut[0]["name"].startswith(step_prefix), j
    assert all(s["state"] != "Running" for s in j["steps"]), j
    print(f"takeover by vault {survivor.name} after {took_over:.2f} s; {polls} GET /items "
          f"polls answered")
    return j


def test_jobs_finish_when_the_leader_is_killed(cluster, request):
    pg, db, a, b, primary, recovery = cluster
    rng = random.Random(seed_for(request))
    size = 128 * MIB
    a.osr("policy", "create", "slow", "--bandwidth", "8M")
    a.osr("vm", "create", "vm1", "--site", "primary", "--disk", f"os:{size}")
    model = bytearray(size)
    uri = a.osr("vm", "show", "vm1")["disks"][0]["uri"]
    write_random(uri, model, rng, 20)
    a.osr("protect", "vm1", "--target", "recovery", "--policy", "slow", "--wait")

    # The follower's /metrics says the item's health as the leader saw it (from the
    # catalog), not Unknown.
    from test_vault_metrics import parse, scrape, value  # (it imports this module)

    def follower_health_known():
        status, _, text = scrape(b, token=True)
        assert status == 200, text
        return value(parse(text), "osr_vault_items_health", level="Unknown") == 0
    wait_for(follower_health_known, 30, "the follower to report the item's health")

    # Failover through the follower: ~32 MiB still to replicate at 8 MB/s, so "latest"
    # waits in its first step; the leader (A) runs it and dies there.
    write_random(uri, model, rng, 128)
    job = b.osr("failover", "vm1", "--point", "latest")["id"]
    done = kill_leader_mid(a, b, job, "Resolve the recovery point")
    names = [s["name"] for s in done["steps"]]
    # Fencing the source and opening the disks ran once, after the takeover.
    assert len([n for n in names if n.startswith("Fence")]) == 1, done
    assert len([n for n in names if n.startswith("Open the disks")]) == 1, done
    item = b.ok("GET", "/items/vm1")
    assert item["state"] == "FailedOver" and item["epoch"] == 2, item
    assert done["point"]["seq"] == api_ok(primary, "GET", "/groups/vm1")["last_seq"], done
    new_uri = b.osr("vm", "show", "vm1")["disks"][0]["uri"]
    osrtest.assert_same_bytes(read_all(new_uri, size), bytes(model), "failed-over disk")
    vault_b = b.ok("GET", "/vault")
    assert vault_b["leader"]["id"] == vault_b["this"]["id"] and vault_b["leader"]["token"] == 2

    # A comes back and follows; commit through it, B runs it and dies while it copies.
    a.start()
    assert a.role() == "follower"
    job = a.osr("commit", "vm1")["id"]
    kill_leader_mid(b, a, job, "Copy the rest of the point", need_progress=True)
    assert a.ok("GET", "/items/vm1")["state"] == "FailoverCommitted"
    osrtest.assert_same_bytes(read_all(new_uri, size), bytes(model), "after the resumed commit")

    # Reprotect through B (back, following); A runs it and dies while it replicates.
    b.start()
    assert b.role() == "follower"
    write_random(new_uri, model, rng, 96)
    job = b.osr("reprotect", "vm1")["id"]
    done = kill_leader_mid(a, b, job, "Replicate", need_progress=True)
    assert done["mode"] == "exact", done
    item = b.ok("GET", "/items/vm1")
    assert item["state"] == "Protected" and item["source"] == "recovery", item
    drill = b.osr("test-failover", "vm1", "--point", "latest", "--wait")
    osrtest.assert_same_bytes(read_all(drill["disks"][0]["uri"], size), bytes(model),
                              "the old primary after the resumed reprotect")
    b.osr("test-failover-cleanup", "vm1", "--wait")
    assert b.ok("GET", "/vault")["leader"]["token"] == 4
    # The CLI shows the same: `osr vault` as JSON, and as the table an operator reads.
    shown = b.osr("vault")
    assert shown["leader"]["token"] == 4 and shown["leader"]["id"] == b.role_id(), shown
    table = subprocess.run([str(osrtest.require_osr()), "--vault", b.url, "vault"],
                           capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
                           stdin=subprocess.DEVNULL, env=osrtest.token_env(b.token_file))
    assert table.returncode == 0, table.stderr
    assert "LEADS" in table.stdout and f'"token":4' in table.stdout, table.stdout
    assert b.role_id() in table.stdout, table.stdout


def job_row(pg, db, job):
    return pg.sql(db, f"SELECT state, progress, steps, error, updated_ns FROM jobs WHERE id={job}")


def test_a_paused_leader_writes_nothing_after_the_other_took_over(cluster, request):
    pg, db, a, b, primary, recovery = cluster
    rng = random.Random(seed_for(request))
    size = 64 * MIB
    a.osr("policy", "create", "slow", "--bandwidth", "2M")
    a.osr("vm", "create", "vm1", "--site", "primary", "--disk", f"os:{size}")
    model = bytearray(size)
    uri = a.osr("vm", "show", "vm1")["disks"][0]["uri"]
    write_random(uri, model, rng, 48)  # ~12 MiB: the first copy takes ~6 s at 2 MB/s
    token_a = a.ok("GET", "/vault")["leader"]["token"]
    job = a.osr("protect", "vm1", "--target", "recovery", "--policy", "slow")["id"]
    wait_in_step(a, job, "Initial replication", need_progress=True)

    a.proc.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: b.role() == "leader", TAKEOVER_S, "vault B to take the lease")
        assert b.ok("GET", "/vault")["leader"]["token"] == token_a + 1
        # B resumes the job and finishes it; A's view of it is older.
        wait_for(lambda: b.ok("GET", f"/jobs/{job}")["state"] not in ("Queued", "Running"),
                 120, f"job {job} to end at vault B")
        done = b.ok("GET", f"/jobs/{job}")
        assert done["state"] == "Succeeded", done
        assert "Another vault took over: resuming" in [s["name"] for s in done["steps"]], done
        row = job_row(pg, db, job)
        item = pg.sql(db, "SELECT state, epoch, drill, failover FROM items WHERE vm='vm1'")
        assert item.startswith("Protected|"), item
    finally:
        a.proc.send_signal(signal.SIGCONT)

    # A wakes inside its job: its next writes are refused, it stops leading.
    def a_fenced_and_following():
        this = a.ok("GET", "/vault")["this"]
        return this["role"] == "follower" and this["fenced_writes"] >= 1
    wait_for(a_fenced_and_following, 30, "vault A to find itself fenced and follow",
             detail=lambda: a.stderr()[-2000:])
    assert "stops leading" in a.stderr(), a.stderr()[-3000:]
    # Nothing of A's reached the catalog: the job and the item as B left them.
    assert job_row(pg, db, job) == row
    assert pg.sql(db, "SELECT state, epoch, drill, failover FROM items WHERE vm='vm1'") == item
    vault = a.ok("GET", "/vault")
    assert vault["leader"]["id"] == b.ok("GET", "/vault")["this"]["id"], vault
    assert len(vault["instances"]) == 2 and all(i["alive"] for i in vault["instances"]), vault
    assert sum(i["leader"] for i in vault["instances"]) == 1, vault
    # Both serve the API; the data replicated under B is the VM's.
    assert a.call("GET", "/items")[0] == 200 and b.call("GET", "/items")[0] == 200
    drill = a.osr("test-failover", "vm1", "--point", "latest", "--wait")
    osrtest.assert_same_bytes(read_all(drill["disks"][0]["uri"], size), bytes(model),
                              "the replica made by the vault that took over")
    a.osr("test-failover-cleanup", "vm1", "--wait")
