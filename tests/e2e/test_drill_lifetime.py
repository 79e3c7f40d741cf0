"""A drill's last client cannot crash the site (issue 10, case 8), through the CLI.

`osr test-failover --wait`, a real NBD client (qemu-img info) that connects to the drill
disk and leaves, then at once `osr test-failover-cleanup --wait` and `osr unprotect`: the
quickstart (vault and both sites in one process) must stay up, and the item, its drill and
its recovery store must be gone. The same with cleanup, planned failover and commit (which
deletes the store) right after clients of the drill and of the failed-over disks left.
"""

import subprocess

import pytest

from conftest import MIB, create_vm, protect, wait_for
from osrtest import require_tool

CLIENT_TIMEOUT_S = 30


def qemu_img_info(uri, size):
    out = subprocess.run([require_tool("qemu-img"), "info", "--output=json", "-f", "raw", uri],
                         capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)
    assert out.returncode == 0, f"qemu-img info {uri}: {out.returncode} {out.stderr}"
    assert f'"virtual-size": {size}' in out.stdout, out.stdout


def store_dirs(qs, name):
    return [p for p in qs.data_dir.glob(f"**/stores/{name}") if p.is_dir()]


def assert_alive(env):
    assert env.qs.alive(), f"the quickstart died:\n{env.qs.stderr()[-4000:]}"


@pytest.mark.deadline(150)
def test_drill_cleanup_and_unprotect_right_after_the_last_client_left(env):
    osr = env.osr
    for rnd in range(3):
        name = f"r{rnd}"
        create_vm(osr, name, [("d", "16M", 16 * MIB)])
        protect(osr, name)
        job = osr.job_ok("test-failover", name, "--point", "latest", job_type="test-failover")
        uri = job["disks"][0]["uri"]
        assert store_dirs(env.qs, name), "no recovery store folder to watch"
        qemu_img_info(uri, 16 * MIB)
        osr.job_ok("test-failover-cleanup", name, job_type="test-failover-cleanup")
        osr.ok("unprotect", name)
        assert_alive(env)
        wait_for(lambda: name not in [i["name"] for i in osr.ok("item", "list")], 20,
                 f"item {name} to go after unprotect")
        wait_for(lambda: not store_dirs(env.qs, name), 20,
                 f"the recovery store of {name} to be deleted")
        assert_alive(env)
        assert osr.ok("vm", "show", name)["name"] == name  # the vault still answers


@pytest.mark.deadline(150)
def test_cleanup_planned_failover_and_commit_right_after_clients_left(env):
    osr = env.osr
    name = "r1"
    create_vm(osr, name, [("d", "16M", 16 * MIB)])
    protect(osr, name)
    job = osr.job_ok("test-failover", name, "--point", "latest", job_type="test-failover")
    assert store_dirs(env.qs, name), "no recovery store folder to watch"
    qemu_img_info(job["disks"][0]["uri"], 16 * MIB)
    osr.job_ok("test-failover-cleanup", name, job_type="test-failover-cleanup")
    osr.job_ok("failover", name, "--planned", job_type="failover")
    for d in osr.ok("vm", "show", name)["disks"]:
        qemu_img_info(d["uri"], 16 * MIB)  # the failed-over VM's disk, just used
    osr.job_ok("commit", name, job_type="commit")
    assert_alive(env)
    wait_for(lambda: not store_dirs(env.qs, name), 20,
             f"the recovery store of {name} to be deleted by commit")
    assert osr.ok("item", "show", name)["state"] == "FailoverCommitted"
    for d in osr.ok("vm", "show", name)["disks"]:
        qemu_img_info(d["uri"], 16 * MIB)  # served from its own image now
    assert_alive(env)
