"""Issue 10, case 2, as the operator sees it: the recovery site runs out of space.

The quickstart's recovery site keeps its data in <dir>/recovery, here a 24 MiB tmpfs this
test mounts (we run as root). 40 MiB written to a protected VM do not fit: the item's
health must be Critical and say so with numbers, and not flap; once the file system is
made bigger, replication resumes by itself and health is Normal again.
"""

import os
import subprocess

import pytest

from conftest import (MIB, Env, Osr, Quickstart, close_handle, connect, create_vm, free_port,
                      protect, quickstart_catalog, require_libnbd, stop_all_clean, wait_for)

CHUNK = 1 * MIB


def run(*cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}: {r.returncode} {r.stderr}"


@pytest.fixture
def small_env(tmp_path, new_catalog):
    """A quickstart whose recovery site's data_dir is a 24 MiB tmpfs; (env, mount point).
    The quickstart stops (and must exit 0) before the file system is unmounted."""
    require_libnbd()
    mnt = tmp_path / "qs" / "recovery"
    mnt.mkdir(parents=True)
    run("mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt))
    qs = Quickstart(tmp_path / "qs", free_port(), tmp_path / "quickstart.stderr",
                    quickstart_catalog(new_catalog, tmp_path / "qs"))
    e = None
    try:
        qs.start()
        e = Env(qs, Osr(qs))
        yield e, mnt
        e.close_nbd()
        stop_all_clean([qs])
    finally:
        if qs.alive():
            qs.stop()
        run("umount", str(mnt))


def test_recovery_site_out_of_space_health(small_env):
    env, mnt = small_env
    osr = env.osr
    vm = create_vm(osr, "vm1", [("os", "64M", 64 * MIB)])
    protect(osr, "vm1")
    h = connect(vm["disks"][0]["uri"])
    try:
        for i in range(40):
            h.pwrite(os.urandom(CHUNK), i * CHUNK)
        h.flush()
    finally:
        close_handle(h)

    last = {}

    def critical():
        last["item"] = osr.ok("item", "show", "vm1")
        return last["item"].get("health", "").startswith(
            "Critical: the recovery site recovery is out of space for vm1: ")

    wait_for(critical, 30, "health to say the recovery site is out of space",
             detail=lambda: last.get("item"))
    health = last["item"]["health"]
    assert " free of " in health and " needed (journal append failed " in health, health
    assert "free space or grow the file system" in health, health
    assert "resumes by itself" in health, health
    # It stays Critical (no flapping to Normal or Warning between the sender's attempts).
    for _ in range(10):
        item = osr.ok("item", "show", "vm1")
        assert item["health"].startswith("Critical: the recovery site recovery is out of space"), \
            item
        assert item["durable_seq"] < item["last_seq"], item

    run("mount", "-o", "remount,size=256m", str(mnt))

    def normal():
        last["item"] = osr.ok("item", "show", "vm1")
        return last["item"].get("health") == "Normal" and \
            last["item"].get("durable_seq") == last["item"].get("last_seq")

    wait_for(normal, 30, "health Normal once space is back", detail=lambda: last.get("item"))
