"""Issue 10, case 2, as the operator sees it: the recovery site runs out of space.

The quickstart's recovery site keeps its data in <dir>/recovery, here a 24 MiB tmpfs this
test mounts (we run as root). 40 MiB written to a protected VM do not fit: the item's
health must be Critical and say so with numbers, and not flap; once the file system is
made bigger, replication resumes by itself and health is Normal again.
"""

import os
import subprocess

from conftest import MIB, close_handle, connect, create_vm, protect, wait_for

CHUNK = 1 * MIB


def run(*cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}: {r.returncode} {r.stderr}"


def test_recovery_site_out_of_space_health(small_recovery):
    env, mnt = small_recovery
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
