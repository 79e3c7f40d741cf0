"""A copy cut short goes on where it stopped (issue 10, case 10 d).

An initial copy of 32 MiB of random data under an 8 MiB/s policy limit (about 4 s) is cut
half-way — kill -9 of the recovery site, kill -9 of the source site, a recovery site out
of space — and must then go on from the recovery site's staged copy, not from byte 0:

- the sender says it went on (`replication.resyncs_resumed`, `resync_bytes_resumed`: the
  bytes it did not send again) and the bytes it sent in all stay well below two copies;
- the copy's progress reaches its total exactly (`resync_bytes_done` = `resync_bytes_total`);
- the recovery site's view at the newest seq equals the primary's disk, byte for byte
  (writes made during the copy, before and after the cut, included).
"""

import hashlib
import os
import random
import subprocess
import time

import pytest

from conftest import (MIB, SiteProcess, api, api_ok, close, close_view, connect, group_status,
                      open_view, read_all, require_libnbd, seed_for, stop_all_clean,
                      store_status, wait_for, write_config)
import osrtest

VM = "vm1"
DISK_BYTES = 64 * MIB
DATA_BYTES = 32 * MIB      # allocated before protection: what the initial copy sends
RATE = 8 * MIB             # bytes per second: the copy takes ~4 s
CHUNK = 1 * MIB
COPY_TIMEOUT_S = 60


def sha(b):
    return hashlib.sha256(b).hexdigest()


def start_site(tmp_path, name, sites, fixed_replication_port=False):
    """A site; with fixed_replication_port its replication address survives a restart, so
    the sender finds it again by itself."""
    config, data_dir = write_config(tmp_path, name)
    if fixed_replication_port:
        text = config.read_text()
        port = osrtest.free_port()
        text = text.replace('replication_listen = "127.0.0.1:0"',
                            f'replication_listen = "127.0.0.1:{port}"')
        config.write_text(text)
    s = SiteProcess(name, config, data_dir, tmp_path / f"{name}.stderr")
    sites.append(s)
    return s.start()


@pytest.fixture
def site_list():
    sites = []
    yield sites
    stop_all_clean(sites)


def protect_with_data(primary, recovery, rng):
    """A full-copy store, a group whose disk holds DATA_BYTES of random bytes, then
    replication under RATE. Returns the disk's NBD URI at the primary."""
    require_libnbd()
    spec = {"disks": [{"name": "d0", "size_bytes": DISK_BYTES}]}
    api_ok(recovery, "PUT", f"/stores/{VM}", {**spec, "start": "full"}, status=201)
    group = api_ok(primary, "PUT", f"/groups/{VM}", spec, status=201)
    uri = group["disks"][0]["uri"]
    h = connect(uri)
    try:
        for i in range(DATA_BYTES // CHUNK):
            h.pwrite(rng.randbytes(CHUNK), i * CHUNK)
        h.flush()
    finally:
        close(h)
    api_ok(primary, "PUT", f"/groups/{VM}/replication",
           {"target": recovery.replication, "bandwidth_bytes_per_second": RATE}, status=204)
    return uri


def write_some(uri, rng, n, where):
    """n writes of 64 KiB during the copy: records after its start (some where the copy
    has been, some where it has not, some where nothing was allocated)."""
    h = connect(uri)
    try:
        for _ in range(n):
            off = rng.randrange(0, DISK_BYTES - 65536, 4096) if where is None else where
            h.pwrite(rng.randbytes(65536), off)
        h.flush()
    finally:
        close(h)


def copied(primary, at_least):
    repl = group_status(primary, VM).get("replication", {})
    return repl.get("resync_bytes_done", 0) >= at_least and repl.get("resyncing", False)


def wait_staged(recovery, at_least):
    """Until the recovery store has at_least bytes durably staged; returns them."""
    def staged():
        st = store_status(recovery, VM)
        return st.get("staged", {}).get("bytes", 0) >= at_least and st["staged"]["bytes"]
    return wait_for(staged, 30, f"{at_least} bytes staged at the recovery site",
                    detail=lambda: store_status(recovery, VM))


def wait_replica(primary, recovery):
    """Until the store holds a consistent copy at the primary's last seq."""
    def done():
        g = group_status(primary, VM)
        st = store_status(recovery, VM)
        return (not st["initial_sync"] and not st["resyncing"]
                and st["durable_seq"] == g["last_seq"] and g["replication"]["connected"]
                and not g["replication"]["resyncing"]) and st
    return wait_for(done, COPY_TIMEOUT_S, "the copy to finish",
                    detail=lambda: f"{group_status(primary, VM)}\n{store_status(recovery, VM)}\n"
                                   f"{recovery.stderr()[-3000:]}")


def assert_replica_exact(primary, recovery, uri):
    seq = store_status(recovery, VM)["durable_seq"]
    want = read_all(uri, size=DISK_BYTES)
    view = open_view(recovery, VM, seq)
    try:
        got = read_all(view["disks"][0]["uri"], size=DISK_BYTES)
    finally:
        close_view(recovery, view["id"])
    assert sha(got) == sha(want), "the replica differs from the primary's disk"


def assert_copy_complete(repl):
    print(f"copy of {repl['resync_bytes_total']} bytes: {repl['resync_bytes_resumed']} resumed, "
          f"{repl['bytes_sent']} sent by this process, {repl['resyncs_resumed']} resume(s)")
    assert repl["resync_bytes_total"] >= DATA_BYTES, repl
    assert repl["resync_bytes_done"] == repl["resync_bytes_total"], repl
    assert repl["resyncs_completed"] >= 1, repl


def test_kill9_of_the_recovery_site_mid_copy_goes_on(tmp_path, site_list, request):
    rng = random.Random(seed_for(request))
    primary = start_site(tmp_path, "primary", site_list)
    recovery = start_site(tmp_path, "recovery", site_list, fixed_replication_port=True)
    uri = protect_with_data(primary, recovery, rng)
    wait_for(lambda: copied(primary, DATA_BYTES // 4), 30, "a quarter of the copy",
             detail=lambda: group_status(primary, VM))
    write_some(uri, rng, 8, None)  # records after the copy's start
    staged = wait_staged(recovery, DATA_BYTES * 3 // 8)
    recovery.kill9()
    recovery.restart()
    st = store_status(recovery, VM)
    assert st["initial_sync"] and st["staged"]["bytes"] >= staged, st
    assert "bytes staged" in recovery.stderr(), recovery.stderr()[-2000:]
    write_some(uri, rng, 8, None)
    wait_replica(primary, recovery)

    repl = group_status(primary, VM)["replication"]
    assert_copy_complete(repl)
    assert repl["resyncs_resumed"] == 1, repl
    assert repl["resync_bytes_resumed"] >= staged, repl
    # Well below two copies: what was in flight or not yet checkpointed at the kill
    # (at most ~1 s of the rate), and the records.
    assert repl["bytes_sent"] < repl["resync_bytes_total"] + 3 * RATE // 2, repl
    assert repl["bytes_sent"] < 2 * repl["resync_bytes_total"] * 3 // 4, repl
    assert_replica_exact(primary, recovery, uri)


def test_kill9_of_the_source_site_mid_copy_goes_on(tmp_path, site_list, request):
    rng = random.Random(seed_for(request))
    primary = start_site(tmp_path, "primary", site_list)
    recovery = start_site(tmp_path, "recovery", site_list)
    uri = protect_with_data(primary, recovery, rng)
    wait_for(lambda: copied(primary, DATA_BYTES // 3), 30, "a third of the copy",
             detail=lambda: group_status(primary, VM))
    write_some(uri, rng, 4, 0)  # where the copy has been: records, not marks
    write_some(uri, rng, 4, None)
    capture = primary.data_dir / "groups" / VM / "capture"
    assert (capture / "resync.json").exists(), sorted(os.listdir(capture))
    primary.kill9()
    # The receiver keeps what the session staged (its end is a checkpoint).
    staged = wait_staged(recovery, DATA_BYTES // 4)
    primary.restart()
    uri = group_status(primary, VM)["disks"][0]["uri"]  # a new NBD port
    write_some(uri, rng, 4, None)
    wait_replica(primary, recovery)

    repl = group_status(primary, VM)["replication"]  # this process's figures
    assert_copy_complete(repl)
    assert repl["resyncs_resumed"] == 1, repl
    assert repl["resync_bytes_resumed"] == staged, repl
    # Only the rest of the copy went (and the 12 records, 64 KiB and a 64-byte header
    # each: those the store had not acknowledged before the kill go again).
    rest = repl["resync_bytes_total"] - staged
    assert repl["bytes_sent"] <= rest + 12 * (65536 + 64), repl
    assert "going on with the initial copy" in primary.stderr(), primary.stderr()[-3000:]
    assert not (capture / "resync.json").exists(), "the plan outlived its commit"
    assert_replica_exact(primary, recovery, uri)


def run(*cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}: {r.returncode} {r.stderr}"


def test_a_copy_refused_for_no_space_goes_on_once_space_is_back(tmp_path, site_list, request):
    """The recovery site's data_dir on a 20 MiB tmpfs (this test mounts it; we run as
    root): the staging of a 32 MiB copy fills it; the store refuses with no_space; once
    the file system is bigger the copy goes on from what was staged."""
    rng = random.Random(seed_for(request))
    mnt = tmp_path / "recovery-data"  # write_config's data_dir for "recovery"
    mnt.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt))
    try:
        primary = start_site(tmp_path, "primary", site_list)
        recovery = start_site(tmp_path, "recovery", site_list)
        uri = protect_with_data(primary, recovery, rng)

        def refused():
            repl = group_status(primary, VM)["replication"]
            return repl["last_error_code"] == "no_space" and repl
        wait_for(refused, 30, "the copy to be refused for no_space",
                 detail=lambda: f"{group_status(primary, VM)}\n{store_status(recovery, VM)}")
        st = store_status(recovery, VM)
        assert st["write_error"]["code"] == "no_space", st
        assert st["write_error"]["what"] in ("resync write", "resync checkpoint"), st
        staged = wait_staged(recovery, 8 * MIB)
        assert staged < DATA_BYTES, st

        run("mount", "-o", "remount,size=256m", str(mnt))
        wait_replica(primary, recovery)
        repl = group_status(primary, VM)["replication"]
        assert_copy_complete(repl)
        assert repl["resyncs_resumed"] >= 1, repl
        assert repl["resync_bytes_resumed"] >= staged, repl
        # Each refused attempt resent at most a frame; nothing went twice beyond that.
        assert repl["bytes_sent"] < repl["resync_bytes_total"] + 8 * MIB, repl
        assert "write_error" not in store_status(recovery, VM)
        assert_replica_exact(primary, recovery, uri)
        stop_all_clean(site_list)
    finally:
        for s in site_list:
            if s.alive():
                s.stop()
        run("umount", str(mnt))
