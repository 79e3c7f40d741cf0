"""Issue 10, case 9: a fence the old primary puts on itself survives restarts.

An unplanned failover with the primary down and no vault to tell it: the restarted
primary learns from the recovery site that it failed over (stale_epoch) and fences its
disks by itself. That fence must be durable before the first write is refused, hold
across a restart that cannot reach the recovery site or a vault, show in the site's API
(`fenced_epoch`), and stop the VM the primary runs on those disks.
"""

import os
import signal

import pytest

from conftest import (MIB, api, api_ok, group_status, protect, require_libnbd, wait_durable,
                      wait_for)
import osrtest

VM = "vm1"
SIZE = 8 * MIB


def connect(uri):
    return osrtest.connect(uri, "pytest-self-fence")


def write_refused(uri):
    """Whether a write to the disk at uri is refused with EPERM (a fenced disk)."""
    import nbd
    h = connect(uri)
    try:
        h.pwrite(b"\x55" * 4096, 0)
        h.flush()
        return False
    except nbd.Error as e:
        assert e.errno == 1 or "EPERM" in str(e) or "not permitted" in str(e), e
        return True
    finally:
        osrtest.close_handle(h)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


def test_self_fence_is_durable_and_stops_the_vm(site_factory):
    require_libnbd()
    recovery = site_factory("recovery")
    primary = site_factory("primary", extra="allow_api_commands = true\n")
    vm_pid = None
    try:
        group = protect(primary, recovery, VM, [("d", SIZE)])
        h = connect(group["disks"][0]["uri"])
        for i in range(5):
            h.pwrite(bytes([i + 1]) * 65536, i * 65536)
        h.flush()
        osrtest.close_handle(h)
        wait_durable(recovery, VM, 5, primary=primary)
        api_ok(primary, "POST", f"/groups/{VM}/vm/start",
               {"driver": "process", "command": "exec sleep 600"}, status=204)
        vm_pid = group_status(primary, VM)["vm"]["pid"]
        assert vm_pid > 0 and alive(vm_pid)

        # The primary dies; the recovery site fails the VM over (epoch 2) with no vault
        # left to fence the primary.
        primary.kill9()
        assert alive(vm_pid), "the VM should outlive its site daemon"
        api_ok(recovery, "POST", f"/groups/{VM}/failover", {"seq": 5, "epoch": 2}, status=201)

        # The primary comes back: the recovery site refuses its epoch, it fences itself,
        # records it, and stops the VM it still runs on those disks.
        primary.start()
        wait_for(lambda: group_status(primary, VM)["fenced_epoch"] == 2, 30,
                 "the primary to record its own fence",
                 detail=lambda: group_status(primary, VM))
        uri = group_status(primary, VM)["disks"][0]["uri"]
        assert write_refused(uri), "a write to the self-fenced disk was taken"
        wait_for(lambda: not alive(vm_pid), 30, "the VM on the fenced disks to stop")
        assert group_status(primary, VM)["vm"]["running"] is False

        # Restarted again, with neither the recovery site nor a vault to ask: still fenced.
        recovery.stop()
        primary.kill9()
        primary.start()
        g = group_status(primary, VM)
        assert g["fenced_epoch"] == 2 and g["capture_fenced_epoch"] == 2, g
        assert write_refused(g["disks"][0]["uri"]), "the fence did not survive the restart"
        # And the VM does not start on fenced disks.
        got, doc = api(primary, "POST", f"/groups/{VM}/vm/start",
                       {"driver": "process", "command": "exec sleep 600"})
        assert got >= 400, (got, doc)
    finally:
        if vm_pid is not None and alive(vm_pid):
            os.kill(vm_pid, signal.SIGKILL)



def groups_a_fenced_and_b(site):
    """Groups a (fenced at epoch 2) and b at `site`."""
    for vm in ("a", "b"):
        api_ok(site, "PUT", f"/groups/{vm}", {"disks": [{"name": "d", "size_bytes": SIZE}]},
               status=201)
    api_ok(site, "POST", "/groups/a/fence", {"epoch": 2}, status=204)

@pytest.mark.parametrize("text", ["garbage", '{"version": 1}'])
def test_damaged_fence_record_quarantines_only_that_vm(site_factory, text):
    """A fence record that is not one: that VM is quarantined (its disks are not served:
    neither 'fenced' nor 'not fenced' can be assumed); the site starts and serves others."""
    require_libnbd()
    site = site_factory("primary")
    data = site.data_dir
    groups_a_fenced_and_b(site)
    site.stop()
    (data / "groups" / "a" / "capture" / "fence").write_text(text)
    site.start()
    a = group_status(site, "a")
    assert a["damage"]["kind"] == "capture_history", a
    assert "fence" in a["damage"]["reason"], a
    assert a["fenced_epoch"] == 2, a
    b = group_status(site, "b")
    assert "damage" not in b and b["fenced_epoch"] == 0, b
    h = connect(b["disks"][0]["uri"])
    h.pwrite(b"\x01" * 512, 0)
    h.flush()
    osrtest.close_handle(h)
    listed = api_ok(site, "GET", "/site")["quarantined"]
    assert [q.get("group") for q in listed] == ["a"], listed


def test_damaged_site_json_starts_from_the_previous_state(site_factory):
    """site.json replaced by garbage: the site starts from site.json.prev (the state before
    the last change), sets the damaged file aside, and every VM is served; a fence made in
    that last change still holds (the capture's fence record). Both damaged (or both
    missing): it still starts, every VM found under groups/ is quarantined saying so, and
    site.json put back from a backup serves them again."""
    require_libnbd()
    site = site_factory("primary")
    data = site.data_dir
    groups_a_fenced_and_b(site)
    site.stop()
    backup = (data / "site.json").read_bytes()
    (data / "site.json").write_text('{"groups": ')
    site.start()
    assert list(data.glob("site.json.damaged-*")), list(data.iterdir())
    a, b = group_status(site, "a"), group_status(site, "b")
    assert a["fenced_epoch"] == 2 and "damage" not in a, a
    assert "damage" not in b, b
    h = connect(b["disks"][0]["uri"])
    h.pwrite(b"\x02" * 512, 0)
    h.flush()
    osrtest.close_handle(h)

    for how in ("damaged", "missing"):
        # Both copies of site.json lost: each VM's own entry.json rebuilds it, fence and all.
        site.stop()
        if how == "damaged":
            (data / "site.json").write_text("garbage")
            (data / "site.json.prev").write_text("garbage")
        else:
            (data / "site.json").unlink()
            (data / "site.json.prev").unlink()
        site.start()
        a, b = group_status(site, "a"), group_status(site, "b")
        assert "damage" not in a and "damage" not in b, (a, b)
        assert a["fenced_epoch"] == 2 and b["fenced_epoch"] == 0, (a, b)
        h = connect(b["disks"][0]["uri"])
        assert h.pread(512, 0) == b"\x02" * 512
        osrtest.close_handle(h)
        if how == "damaged":
            assert len(list(data.glob("site.json.prev.damaged-*"))) >= 1, list(data.iterdir())

    # And without entry.json too: quarantined, saying what to put back; putting it back
    # and a repair serve the VM again.
    entry = (data / "groups" / "b" / "entry.json").read_bytes()
    site.stop()
    (data / "site.json").unlink()
    (data / "site.json.prev").unlink()
    (data / "groups" / "b" / "entry.json").unlink()
    site.start()
    b = group_status(site, "b")
    assert b["damage"]["kind"] == "state_entry", b
    assert "no entry.json" in b["damage"]["reason"], b
    assert "entry.json" in b["damage"]["action"], b
    assert "damage" not in group_status(site, "a")
    listed = api_ok(site, "GET", "/site")["quarantined"]
    assert [q.get("group") for q in listed] == ["b"], listed
    (data / "groups" / "b" / "entry.json").write_bytes(entry)
    api_ok(site, "POST", "/groups/b/repair", {})
    b = group_status(site, "b")
    assert "damage" not in b, b
    h = connect(b["disks"][0]["uri"])
    assert h.pread(512, 0) == b"\x02" * 512
    osrtest.close_handle(h)


def test_a_vm_site_json_does_not_name_is_not_dropped(site_factory):
    """site.json put back from a backup older than a VM: the VM's folder is not ignored
    (it was: the VM was simply gone); its own entry.json brings it back."""
    require_libnbd()
    site = site_factory("primary")
    data = site.data_dir
    groups_a_fenced_and_b(site)
    site.stop()
    older = (data / "site.json").read_text()
    site.start()
    api_ok(site, "PUT", "/groups/c", {"disks": [{"name": "d", "size_bytes": SIZE}]}, status=201)
    h = connect(group_status(site, "c")["disks"][0]["uri"])
    h.pwrite(b"\x07" * 512, 0)
    h.flush()
    osrtest.close_handle(h)
    site.stop()
    (data / "site.json").write_text(older)  # the older backup
    site.start()
    c = group_status(site, "c")
    assert "damage" not in c, c
    h = connect(c["disks"][0]["uri"])
    assert h.pread(512, 0) == b"\x07" * 512
    osrtest.close_handle(h)
    assert "site.json does not name this VM" in site.stderr(), site.stderr()[-2000:]
