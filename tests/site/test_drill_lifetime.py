"""A drill's last client cannot crash the site (issue 10, case 8).

The operator's sequence: a drill (a view of the recovery store), a real NBD client that
connects to the drill disk and leaves (qemu-img info), and at once the drill's cleanup and
unprotect: the view is closed and the store deleted within milliseconds of the client's
disconnect. Before the fix the finished session still held the view until the server
reaped it (up to a second later), and its destructor unpinned a freed store: the recovery
site's daemon died. The same for failover disks: a client of the failed-over VM's disk
leaves, then the commit materialises the disks and deletes the store, or the VM is
unprotected before commit (the group and then the store deleted).

Each test asserts: the daemon is alive and answers, the store is gone (404, its folder
removed), the drill read the replicated bytes, and the failed-over VM's disk keeps its
bytes after the store is gone.
"""

import subprocess

from conftest import (MIB, api, api_ok, assert_same_bytes, close, close_view, connect,
                      group_status, open_view, protect, read_all, wait_durable, wait_for)
import osrtest

DISK = 4 * MIB
ROUNDS = 6
CLIENT_TIMEOUT_S = 30


def qemu_img_info(uri):
    """A real client connects to the export, reads its size and leaves."""
    qemu_img = osrtest.require_tool("qemu-img")
    out = subprocess.run([qemu_img, "info", "--output=json", "-f", "raw", uri],
                         capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)
    assert out.returncode == 0, f"qemu-img info {uri}: {out.returncode} {out.stderr}"
    assert f'"virtual-size": {DISK}' in out.stdout, out.stdout


def write_pattern(primary, vm, byte):
    """Fills the VM's disk's first MiB with `byte` through the primary; returns the seq."""
    g = group_status(primary, vm)
    h = connect(g["disks"][0]["uri"])
    try:
        h.pwrite(bytes([byte]) * MIB, 0)
        h.flush()
    finally:
        close(h)
    return group_status(primary, vm)["last_seq"]


def assert_alive_and_store_gone(recovery, vm):
    assert recovery.alive(), f"the recovery site died:\n{recovery.stderr()[-4000:]}"
    site = api_ok(recovery, "GET", "/site")
    assert vm not in site["stores"], site
    assert site["views"] == [], site
    got, doc = api(recovery, "GET", f"/stores/{vm}")
    assert got == 404, f"GET /stores/{vm} after its deletion: {got} {doc}"
    assert not (recovery.data_dir / "stores" / vm).exists(), "the store's folder is still there"


def delete_store(recovery, vm):
    """DELETE /stores/vm: 204, or (only while a closing view still pins it) a clear 503 and
    then 204 once it is released."""
    got, doc = api(recovery, "DELETE", f"/stores/{vm}")
    if got == 503:
        assert "pinned" in doc["error"]["message"], doc
        wait_for(lambda: api(recovery, "DELETE", f"/stores/{vm}")[0] == 204, 15,
                 f"the store of {vm} to be deletable once released")
        return
    assert got == 204, f"DELETE /stores/{vm}: {got} {doc}"


def test_drill_cleanup_and_unprotect_right_after_the_last_client_left(sites):
    """test-failover, qemu-img info on the drill disk, then at once cleanup (close the view)
    and unprotect (delete the store and the group): the recovery site stays up."""
    primary, recovery = sites
    for rnd in range(ROUNDS):
        vm = f"drill{rnd}"
        protect(primary, recovery, vm, [("d", DISK)])
        seq = write_pattern(primary, vm, 0x40 + rnd)
        wait_durable(recovery, vm, seq, primary=primary)
        view = open_view(recovery, vm, seq, writable=rnd % 2 == 0)
        uri = view["disks"][0]["uri"]
        got = read_all(uri, size=DISK)
        assert_same_bytes(got[:MIB], bytes([0x40 + rnd]) * MIB, f"drill of {vm} at seq {seq}")
        qemu_img_info(uri)
        # Within milliseconds of the client's disconnect: cleanup, then unprotect.
        close_view(recovery, view["id"])
        delete_store(recovery, vm)
        assert api(primary, "DELETE", f"/groups/{vm}")[0] == 204
        assert_alive_and_store_gone(recovery, vm)
        # A closed drill's disk is refused, not served from freed memory.
        out = subprocess.run([osrtest.require_tool("qemu-img"), "info", "-f", "raw", uri],
                             capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)
        assert out.returncode != 0, f"a closed view still answered: {out.stdout}"


def test_several_clients_leave_as_the_drill_is_cleaned_up(sites):
    """Clients that are connected (libnbd) and ones that just left (qemu-img) when the view
    is closed: the connected ones are cut, nothing outlives the store."""
    primary, recovery = sites
    vm = "busy"
    protect(primary, recovery, vm, [("d", DISK)])
    seq = write_pattern(primary, vm, 0x5a)
    wait_durable(recovery, vm, seq, primary=primary)
    for rnd in range(ROUNDS):
        view = open_view(recovery, vm, seq, writable=True)
        uri = view["disks"][0]["uri"]
        staying = [connect(uri) for _ in range(3)]
        for h in staying:
            assert h.pread(4096, 0) == bytes([0x5a]) * 4096
        qemu_img_info(uri)
        close_view(recovery, view["id"])
        for h in staying:
            close(h)  # cut by the server already; closing our end must not hang
        assert recovery.alive(), recovery.stderr()[-4000:]
    delete_store(recovery, vm)
    assert_alive_and_store_gone(recovery, vm)


def wait_materialised(recovery, vm):
    def done():
        g = group_status(recovery, vm)
        m = g.get("materialise", {})
        assert m.get("state") != "failed", g
        return m.get("state") == "done"
    wait_for(done, 30, f"the failover disks of {vm} to be materialised")


def test_failover_disks_commit_and_unprotect_right_after_a_client_left(sites):
    """Failover to a point, a client reads the failed-over disk and leaves, then at once:
    commit (materialise, delete the store) in one round, unprotect before commit (delete
    the group, then the store) in the other. The site stays up; after commit the VM's disk
    still holds the point's bytes, read from its own image."""
    primary, recovery = sites
    for rnd, commit in enumerate([True, False, True, False]):
        vm = f"fo{rnd}"
        protect(primary, recovery, vm, [("d", DISK)])
        byte = 0x60 + rnd
        seq = write_pattern(primary, vm, byte)
        wait_durable(recovery, vm, seq, primary=primary)
        assert api(primary, "DELETE", f"/groups/{vm}")[0] == 204  # the primary is gone
        fo = api_ok(recovery, "POST", f"/groups/{vm}/failover", {"seq": seq, "epoch": 2},
                    status=201)
        uri = fo["disks"][0]["uri"]
        drill = open_view(recovery, vm, seq)  # a drill's view beside it, also just used
        qemu_img_info(drill["disks"][0]["uri"])
        qemu_img_info(uri)
        close_view(recovery, drill["id"])
        if commit:
            got, doc = api(recovery, "POST", f"/groups/{vm}/materialise")
            assert got == 202, f"materialise: {got} {doc}"
            wait_materialised(recovery, vm)
            qemu_img_info(uri)
            delete_store(recovery, vm)
            assert_alive_and_store_gone(recovery, vm)
            got = read_all(uri, size=DISK)
            assert_same_bytes(got[:MIB], bytes([byte]) * MIB, f"{vm} after commit")
            assert api(recovery, "DELETE", f"/groups/{vm}")[0] == 204
        else:
            got, doc = api(recovery, "DELETE", f"/stores/{vm}")
            assert got == 409 and "failover disks" in doc["error"]["message"], (got, doc)
            assert api(recovery, "DELETE", f"/groups/{vm}")[0] == 204
            delete_store(recovery, vm)
            assert_alive_and_store_gone(recovery, vm)
    assert recovery.alive() and primary.alive()
