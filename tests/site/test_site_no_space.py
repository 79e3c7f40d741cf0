"""The recovery site runs out of space (issue 10, case 2), and gets it back.

The recovery site's data_dir is a small tmpfs this test mounts itself (we run as root).
More new data is written at the primary (over NBD) than the store can hold: the store's
journal append fails with ENOSPC. What must hold:

- the failed append changes nothing: durable_seq stops and never goes backwards, and the
  receiver never asks for a seq it already moved past ("record seq 3 where 4 was
  expected" was the old symptom);
- GET /stores/{vm} says why, with numbers (write_error: no_space, bytes needed; space:
  free and total bytes of the file system);
- the sender is told `no_space` and backs off (bounded, exponential): a few attempts in
  a window, not four a second;
- the primary keeps every unacknowledged record meanwhile (its capture log is below its
  limit: no overflow, no resync afterwards);
- once space is back (remount bigger) replication resumes by itself, without a restart,
  and the store at the newest seq equals the primary's disk byte for byte.
"""

import hashlib
import os
import re
import subprocess
import time

import pytest

from conftest import (MIB, api, close, close_view, connect, group_status, open_view,
                      read_all, require_libnbd, stop_all_clean, store_status, wait_for)

VM = "vm1"
DISK_BYTES = 64 * MIB
SMALL_FS = "24m"
BIG_FS = "256m"
WRITE_BYTES = 40 * MIB  # more than the small file system holds
CHUNK = 1 * MIB


def run(*cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}: {r.returncode} {r.stderr}"


@pytest.fixture
def small_recovery(tmp_path, site_factory):
    """(primary, recovery, mount point): the recovery site's data_dir on a 24 MiB tmpfs.
    The sites stop (and must exit 0) before the file system is unmounted."""
    require_libnbd()
    mnt = tmp_path / "recovery-data"  # write_config's data_dir for "recovery"
    mnt.mkdir()
    run("mount", "-t", "tmpfs", "-o", f"size={SMALL_FS}", "tmpfs", str(mnt))
    started = []
    try:
        started.append(site_factory("primary"))
        started.append(site_factory("recovery"))
        yield started[0], started[1], mnt
        stop_all_clean(started)
    finally:
        for s in started:
            if s.alive():
                s.stop()
        run("umount", str(mnt))


def sha(b):
    return hashlib.sha256(b).hexdigest()


def test_recovery_site_out_of_space_then_resumes(small_recovery):
    primary, recovery, mnt = small_recovery
    spec = {"disks": [{"name": "d0", "size_bytes": DISK_BYTES}]}
    got, doc = api(recovery, "PUT", f"/stores/{VM}", spec)
    assert got == 201, f"PUT /stores/{VM}: {got} {doc}"
    got, group = api(primary, "PUT", f"/groups/{VM}", spec)
    assert got == 201, f"PUT /groups/{VM}: {got} {group}"
    got, doc = api(primary, "PUT", f"/groups/{VM}/replication", {"target": recovery.replication})
    assert got == 204, f"PUT /groups/{VM}/replication: {got} {doc}"

    # 40 MiB of incompressible data at the primary, 1 MiB per WRITE.
    uri = group["disks"][0]["uri"]
    h = connect(uri)
    try:
        for i in range(WRITE_BYTES // CHUNK):
            h.pwrite(os.urandom(CHUNK), i * CHUNK)
        h.flush()
    finally:
        close(h)
    last_seq = group_status(primary, VM)["last_seq"]
    assert last_seq >= WRITE_BYTES // CHUNK, last_seq  # one record per write (or more)

    # The store says it is out of space, with numbers.
    def out_of_space():
        return "write_error" in store_status(recovery, VM)
    wait_for(out_of_space, 30, "the store to report a write error",
             detail=lambda: f"{store_status(recovery, VM)}\n{recovery.stderr()[-3000:]}")
    st = store_status(recovery, VM)
    err, space = st["write_error"], st["space"]
    assert err["code"] == "no_space", st
    assert err["what"] == "journal append", st
    assert err["bytes_needed"] > 0 and err["count"] >= 1 and err["since_ns"] > 0, st
    assert "No space left on device" in err["message"], st
    assert 20 * MIB <= space["total_bytes"] <= 25 * MIB, st
    assert space["free_bytes"] < err["bytes_needed"], st
    durable_at_error = st["durable_seq"]
    assert durable_at_error < last_seq, st

    # The sender is told no_space and backs off; durable_seq holds still (never back).
    wait_for(lambda: group_status(primary, VM)["replication"]["last_error_code"] == "no_space",
             20, "the sender to be told no_space",
             detail=lambda: group_status(primary, VM)["replication"])
    # Let the backoff build up (50 ms doubling to 5 s), then count attempts over a window.
    wait_for(lambda: group_status(primary, VM)["replication"]["reconnect_delay_ms"] >= 3200,
             30, "the reconnect delay to grow",
             detail=lambda: group_status(primary, VM)["replication"])
    before = group_status(primary, VM)["replication"]["reconnects"]
    window_s = 10.0
    seen = []
    t_end = time.monotonic() + window_s
    while time.monotonic() < t_end:
        seen.append(store_status(recovery, VM)["durable_seq"])
        time.sleep(0.25)
    after = group_status(primary, VM)["replication"]
    attempts = after["reconnects"] - before
    assert attempts <= 4, (f"{attempts} reconnects in {window_s} s with the store full "
                           f"(backoff should allow ~2): {after}")
    assert all(b >= a for a, b in zip(seen, seen[1:])), f"durable_seq went backwards: {seen}"
    # An append is all or nothing: a batch that does not fit is refused whole, and a
    # smaller one sent after a reconnect may still fit (the sender batches what it has
    # read). So durable_seq may step on while space lasts, never past what the file system
    # holds: the store is still short of space and the writes are not all there.
    assert seen[0] >= durable_at_error, f"durable_seq went back from the error: {seen}"
    st = store_status(recovery, VM)
    assert "write_error" in st and st["write_error"]["code"] == "no_space", st
    assert seen[-1] < last_seq and (seen[-1] - 1) * CHUNK <= 25 * MIB, \
        f"more was taken than the file system holds: {seen} (last_seq {last_seq})"
    assert after["last_error_code"] == "no_space", after
    assert "free of" in after["last_error"], after  # the receiver's numbers reach the sender
    # Still reported, not flapping away between attempts.
    assert store_status(recovery, VM)["write_error"]["count"] >= 2

    # The old symptom: the receiver expecting a seq its failed append had consumed.
    log = recovery.stderr()
    assert not re.search(r"record seq \d+ where \d+ was expected", log), log[-3000:]
    # The primary kept every unacknowledged record: no overflow, nothing dropped.
    g = group_status(primary, VM)
    assert not g["capture_overflowed"], g
    assert "capture_write_error" not in g, g
    assert g["replication"]["acked_seq"] <= seen[-1], g
    assert g["last_seq"] == last_seq, g

    # Space is back: replication resumes by itself (no restart), within the backoff.
    run("mount", "-o", f"remount,size={BIG_FS}", str(mnt))
    wait_for(lambda: store_status(recovery, VM)["durable_seq"] == last_seq, 30,
             f"replication to resume up to seq {last_seq} once space is back",
             detail=lambda: f"{store_status(recovery, VM)}\n{group_status(primary, VM)}")
    st = store_status(recovery, VM)
    assert "write_error" not in st, st
    g = group_status(primary, VM)
    assert g["replication"]["resyncs_completed"] == 0, g  # the records were kept, not resent whole
    assert not g["capture_overflowed"], g
    assert recovery.proc.poll() is None and primary.proc.poll() is None

    # The store at the newest seq equals the primary's disk, byte for byte.
    want = read_all(uri, size=DISK_BYTES)
    view = open_view(recovery, VM, last_seq)
    try:
        got = read_all(view["disks"][0]["uri"], size=DISK_BYTES)
    finally:
        close_view(recovery, view["id"])
    assert sha(got) == sha(want), "the store at the newest seq differs from the primary's disk"
