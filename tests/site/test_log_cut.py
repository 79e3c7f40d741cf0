"""A damaged end of a capture log or store journal, an image written outside osr (issue 10,
case 1; the reviews).

A log's recovery cannot tell a torn write that never left the host from a last record
that was synced, shipped and damaged since. Both are cut; what must hold is that nothing
is lost and no sequence number means two different writes:

- the primary's capture log loses its last record, which the recovery site holds: the
  primary never hands out that seq again (the new writes used to take it, and the recovery
  site skipped them as already held: silent loss), it resends its disks whole, and the
  recovery site ends byte for byte equal to the primary;
- the recovery store's journal loses its last record, which the primary still holds: the
  store says so (GET /stores/{vm} journal_cut) until the record comes again;
- the recovery store is put back from an older copy (or lost records the primary has
  trimmed since): replication does not stop at "resynchronization required" forever; the
  store's history is replaced by a resync of every region, and it ends equal to the
  primary.
"""

import os
import shutil

from conftest import (MIB, api, api_ok, close, close_view, connect, group_status, open_view,
                      protect, read_all, store_status, wait_durable, wait_for)

VM = "vm1"
DISK = 16 * MIB


def write_chunks(uri, chunks):
    """chunks: [(offset, bytes)], flushed."""
    h = connect(uri)
    try:
        for off, data in chunks:
            h.pwrite(data, off)
        h.flush()
    finally:
        close(h)


def damage_last_record(log_dir):
    """Flips a byte of the last record's payload in the newest segment (a log closed
    cleanly ends exactly at its last record)."""
    segs = sorted(log_dir.glob("*.log"))
    assert segs, f"no segment in {log_dir}"
    seg = segs[-1]
    size = seg.stat().st_size
    with open(seg, "r+b") as f:
        f.seek(size - 10)
        b = f.read(1)
        f.seek(size - 10)
        f.write(bytes([b[0] ^ 0x5A]))
    return seg


def retarget(primary, recovery):
    api_ok(primary, "PUT", f"/groups/{VM}/replication", {"target": recovery.replication},
           status=204)


def resynced(primary, count):
    return lambda: group_status(primary, VM).get("replication", {}).get(
        "resyncs_completed", 0) >= count


def assert_store_equals_primary(primary, recovery, uri, what):
    last = group_status(primary, VM)["last_seq"]
    st = wait_durable(recovery, VM, last, primary=primary)
    view = open_view(recovery, VM, st["durable_seq"])
    try:
        got = read_all(view["disks"][0]["uri"], DISK)
    finally:
        close_view(recovery, view["id"])
    want = read_all(uri, DISK)
    assert len(got) == len(want) == DISK
    if got != want:
        first = next(i for i in range(DISK) if got[i] != want[i])
        raise AssertionError(f"{what}: the store at seq {st['durable_seq']} differs from the "
                             f"primary at byte {first}")


def protected_with_data(primary, recovery, chunks):
    """VM protected, `chunks` [(offset, bytes)] written and durable at the recovery site.
    Returns (uri, last seq)."""
    group = protect(primary, recovery, VM, [("d0", DISK)])
    uri = group["disks"][0]["uri"]
    write_chunks(uri, chunks)
    last = group_status(primary, VM)["last_seq"]
    wait_durable(recovery, VM, last, primary=primary)
    return uri, last


def test_a_damaged_last_capture_record_is_never_reissued(sites):
    primary, recovery = sites
    uri, shipped = protected_with_data(
        primary, recovery, [(i * 256 * 1024, os.urandom(256 * 1024)) for i in range(4)])
    assert shipped >= 4

    primary.stop_clean()
    damage_last_record(primary.data_dir / "groups" / VM / "capture")
    primary.restart()
    # The cut is recorded at open; the sender may have ended it already (the recovery site
    # said it holds `shipped`), so the API shows it only for a moment.
    assert f"cutting the log after seq {shipped - 1}" in primary.stderr(), primary.stderr()
    g = group_status(primary, VM)
    uri = g["disks"][0]["uri"]  # new ports after a restart
    if "capture_log_cut" in g:
        cut = g["capture_log_cut"]
        assert cut["after_seq"] == shipped - 1 and cut["seq_bound"] >= shipped, g
        assert "CRC" in cut["reason"], g

    # New writes right away. They used to take seqs up to `shipped` again, which the
    # recovery site already held and skipped: lost there, with health Normal.
    new = [(4 * MIB + i * 64 * 1024, os.urandom(64 * 1024)) for i in range(3)]
    write_chunks(uri, new)
    wait_for(resynced(primary, 1), 30, "the disks to be resent whole after the cut",
             detail=lambda: f"{group_status(primary, VM)}\n{primary.stderr()[-3000:]}")
    g = group_status(primary, VM)
    assert "capture_log_cut" not in g, g
    assert g["last_seq"] >= shipped, g
    assert_store_equals_primary(primary, recovery, uri, "after a cut capture log")
    assert (primary.data_dir / "groups" / VM / "capture" / "cut.json").exists() is False

    # And on: records flow as usual, the store follows.
    write_chunks(uri, [(8 * MIB, os.urandom(4096))])
    assert_store_equals_primary(primary, recovery, uri, "after the resync")


def test_a_damaged_last_journal_record_comes_again(sites):
    primary, recovery = sites
    uri, last = protected_with_data(
        primary, recovery, [(i * 256 * 1024, os.urandom(256 * 1024)) for i in range(4)])

    recovery.stop_clean()
    damage_last_record(recovery.data_dir / "stores" / VM / "journal")
    recovery.restart()
    st = store_status(recovery, VM)
    assert st["durable_seq"] == last - 1, st
    assert st.get("journal_cut", {}).get("after_seq") == last - 1, st
    retarget(primary, recovery)
    wait_durable(recovery, VM, last, primary=primary)
    wait_for(lambda: "journal_cut" not in store_status(recovery, VM), 10,
             "the journal's cut to clear once its records came again",
             detail=lambda: store_status(recovery, VM))
    assert_store_equals_primary(primary, recovery, uri, "after a cut journal")


def test_a_store_behind_what_the_primary_holds_is_resynced_not_stuck(sites):
    primary, recovery = sites
    uri, old = protected_with_data(primary, recovery,
                                   [(i * MIB, os.urandom(MIB)) for i in range(4)])
    store_dir = recovery.data_dir / "stores" / VM
    backup = recovery.data_dir.parent / "store-backup"
    recovery.stop_clean()
    shutil.copytree(store_dir, backup)
    recovery.restart()
    retarget(primary, recovery)

    # More than a segment (64 MiB) of writes: the primary trims what the store acknowledged.
    cap = primary.data_dir / "groups" / VM / "capture"
    for round_ in range(6):
        write_chunks(uri, [((i % 16) * MIB, os.urandom(MIB)) for i in range(16)])
    last = group_status(primary, VM)["last_seq"]
    wait_durable(recovery, VM, last, primary=primary)

    def first_held():
        return min(int(p.name[:20]) for p in cap.glob("*.log"))
    wait_for(lambda: first_held() > old + 1, 10, "the primary to trim acknowledged segments",
             detail=lambda: sorted(p.name for p in cap.glob("*.log")))

    # The store is put back as it was at `old`: it lacks records the primary no longer has.
    recovery.stop_clean()
    shutil.rmtree(store_dir)
    shutil.copytree(backup, store_dir)
    recovery.restart()
    assert store_status(recovery, VM)["durable_seq"] == old
    retarget(primary, recovery)
    wait_for(resynced(primary, 1), 60, "a resync replacing the store's history",
             detail=lambda: f"{group_status(primary, VM)}\n{primary.stderr()[-3000:]}")
    assert f"the recovery site holds up to seq {old} but this log starts at" in \
        primary.stderr(), primary.stderr()[-3000:]
    g = group_status(primary, VM)
    assert not g["replication"]["resync_required"], g
    st = store_status(recovery, VM)
    assert st["consistent_from"] > old, st
    assert_store_equals_primary(primary, recovery, uri, "after the store's history was replaced")
    # The old points cannot be opened: their bytes are gone, and saying so beats guessing.
    got, doc = api(recovery, "POST", f"/stores/{VM}/views", {"seq": old})
    assert got in (400, 409), (got, doc)


def test_an_image_written_outside_osr_while_stopped_is_quarantined_then_taken(sites):
    """A clean stop records the images (capture/close-fingerprint). Bytes written into one
    with dd while the site is stopped are found at the next start: the VM is quarantined
    (image_changed) while the recovery site still holds the bytes from before; repair with
    accept_changes takes the image as it is and resends it, and the recovery site ends
    equal to the primary (it used to keep the old bytes silently)."""
    primary, recovery = sites
    before = os.urandom(MIB)
    uri, old = protected_with_data(primary, recovery, [(0, before)])
    primary.stop_clean()
    assert (primary.data_dir / "groups" / VM / "capture" / "close-fingerprint").exists()
    with open(primary.data_dir / "groups" / VM / "d0.img", "r+b") as f:
        f.seek(5 * MIB)
        f.write(b"written outside osr " * 200)
    primary.restart()
    g = group_status(primary, VM)
    assert g["damage"]["kind"] == "image_changed", g
    assert "changed outside osr" in g["damage"]["reason"], g
    assert "--accept-changes" in g["damage"]["action"], g
    # The recovery site still has the disk as it was.
    view = open_view(recovery, VM, old)
    try:
        assert read_all(view["disks"][0]["uri"], DISK)[:MIB] == before
    finally:
        close_view(recovery, view["id"])
    # Still refused after another restart (the record of the change stays).
    primary.stop_clean()
    primary.restart()
    assert group_status(primary, VM)["damage"]["kind"] == "image_changed"

    api_ok(primary, "POST", f"/groups/{VM}/repair", {"accept_changes": True})
    assert "taken as it is: resent whole" in primary.stderr(), primary.stderr()[-3000:]
    wait_for(resynced(primary, 1), 30, "the changed disk to be resent whole",
             detail=lambda: f"{group_status(primary, VM)}\n{primary.stderr()[-3000:]}")
    g = group_status(primary, VM)
    assert "changed_outside" not in g and "damage" not in g, g
    uri = g["disks"][0]["uri"]
    write_chunks(uri, [(9 * MIB, os.urandom(4096))])
    assert_store_equals_primary(primary, recovery, uri, "after a write outside osr")

    # An untouched stop and start resends nothing.
    primary.stop_clean()
    primary.restart()
    g = group_status(primary, VM)
    assert "damage" not in g and g["disks"][0]["dirty_bytes"] == 0, g


def test_a_resync_with_no_write_during_it_ends_at_a_new_seq(sites):
    """A point made at the seq a resync starts from must keep its bytes: the resync ends at
    a seq of its own (a mark), and the store reads nothing below it afterwards."""
    primary, recovery = sites
    before = os.urandom(MIB)
    uri, at = protected_with_data(primary, recovery, [(0, before)])
    primary.stop_clean()
    with open(primary.data_dir / "groups" / VM / "d0.img", "r+b") as f:
        f.write(b"changed" * 1000)
    primary.restart()
    api_ok(primary, "POST", f"/groups/{VM}/repair", {"accept_changes": True})
    wait_for(resynced(primary, 1), 30, "the resync",
             detail=lambda: f"{group_status(primary, VM)}\n{primary.stderr()[-3000:]}")
    st = store_status(recovery, VM)
    assert st["durable_seq"] == at + 1, (st, at)  # the mark
    assert st["consistent_from"] == at + 1, st
    got, doc = api(recovery, "POST", f"/stores/{VM}/views", {"seq": at})
    assert got in (400, 409), (got, doc)  # never the new bytes under the old seq
    assert_store_equals_primary(primary, recovery, group_status(primary, VM)["disks"][0]["uri"],
                                "after a resync with no write")
