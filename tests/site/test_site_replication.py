"""Replication between two site daemons, checked against a model of the disks.

The primary serves a VM's disks (one consistency group) and ships every write to the
recovery site's store; a view of the store at seq S must read exactly what the disks
held after the write numbered S. One sequential writer makes the numbering known: each
acknowledged WRITE / WRITE_ZEROES / TRIM of either disk takes the next seq.
"""

import os
import random
import signal
import threading
import time

from conftest import (KIB, MIB, GroupModel, api, api_ok, apply_op, assert_same_bytes,
                      close, close_view, connect, group_status, open_view, protect, random_op,
                      read_all, require_libnbd, seed_for, store_status, wait_durable, wait_for)

VM = "vm1"
DISKS = [("d0", 32 * MIB), ("d1", 16 * MIB)]
SIZES = [s for _, s in DISKS]


def write_ops(handles, model, rng, count, max_len=256 * KIB, weights=(8, 1, 1), pause=0.0):
    """count sequential requests alternating between the disks; each acknowledged one
    is the model's next seq."""
    for _ in range(count):
        disk = model.last_seq % 2
        kind, off, length, data = random_op(rng, SIZES, disk, max_len=max_len, weights=weights)
        apply_op(handles[disk], kind, off, length, data)
        model.record(disk, kind, off, length, data)
        if pause:
            time.sleep(pause)


def assert_view_matches(recovery, view, want, what):
    """Both disks of the view read exactly want[i]."""
    assert [d["name"] for d in view["disks"]] == [n for n, _ in DISKS], view
    for i, d in enumerate(view["disks"]):
        got = read_all(d["uri"], size=SIZES[i])
        assert_same_bytes(got, want[i], f"{what}: disk {d['name']} of view {view['id']} "
                                        f"(seq {view['seq']})")


def check_view_at(recovery, seq, want, what):
    view = open_view(recovery, VM, seq)
    try:
        assert_view_matches(recovery, view, want, what)
    finally:
        close_view(recovery, view["id"])


def primary_disks(primary):
    g = group_status(primary, VM)
    return [read_all(d["uri"], size=SIZES[i]) for i, d in enumerate(g["disks"])]


def connect_group(primary):
    g = group_status(primary, VM)
    for d in g["disks"]:
        assert d["uri"] == f"nbd://{primary.nbd}/vm/{VM}/{d['name']}", g
    return [connect(d["uri"]) for d in g["disks"]]


# -- 1 ---------------------------------------------------------------------------------------


def test_oracle_points(sites, request):
    """Views at seqs spread over 1..150 (and 0) equal the model at that seq, byte for byte."""
    primary, recovery = sites
    seed = seed_for(request)
    rng = random.Random(seed)
    group = protect(primary, recovery, VM, DISKS)
    model = GroupModel(SIZES)
    handles = [connect(d["uri"]) for d in group["disks"]]
    try:
        for i in range(150):
            write_ops(handles, model, rng, 1)
            if i % 25 == 0 or i == 149:
                # The seq is handed out before the reply: exactly one per acknowledged request.
                last = group_status(primary, VM)["last_seq"]
                assert last == model.last_seq, \
                    f"seed {seed}: after {model.last_seq} acknowledged requests last_seq={last}"
    finally:
        for h in handles:
            close(h)
    assert sum(1 for op in model.ops if op[1] != "write") > 0, "no zero/trim was generated"

    st = wait_durable(recovery, VM, 150, primary=primary)
    assert st["base_seq"] == 0 and st["name"] == VM, st
    assert [(d["name"], d["size_bytes"]) for d in st["disks"]] == DISKS, st

    g = group_status(primary, VM)
    assert g["replicate_to"] == recovery.replication, g
    wait_for(lambda: group_status(primary, VM)["replication"]["acked_seq"] == 150, 10,
             "the primary to see seq 150 acknowledged")

    # Seq 0 is the store's base_seq: the disks before any write, all zeros.
    view0 = open_view(recovery, VM, 0)
    try:
        assert_view_matches(recovery, view0, [bytes(s) for s in SIZES], f"seed {seed}: seq 0")
    finally:
        close_view(recovery, view0["id"])

    seqs = sorted({1, 2, 75, 149, 150} | set(rng.sample(range(3, 149), 8)))
    for seq in seqs:
        view = open_view(recovery, VM, seq)
        try:
            listed = api_ok(recovery, "GET", "/site")["views"]
            assert {"id": view["id"], "vm": VM, "seq": seq, "writable": False} in listed, listed
            h = connect(view["disks"][0]["uri"])
            try:
                assert h.is_read_only(), f"view {view['id']} is not read-only"
            finally:
                close(h)
            assert_view_matches(recovery, view, model.at(seq), f"seed {seed}: seq {seq}")
        finally:
            close_view(recovery, view["id"])
        listed = api_ok(recovery, "GET", "/site")["views"]
        assert all(v["id"] != view["id"] for v in listed), f"closed view still listed: {listed}"


# -- 2 ---------------------------------------------------------------------------------------


def test_drill_while_source_writes(sites, request):
    """A writable view takes drill writes in an overlay; the source's later writes do not
    reach it, replication goes on, and closing it drops the overlay and the export."""
    lib = require_libnbd()
    primary, recovery = sites
    seed = seed_for(request)
    rng = random.Random(seed)
    group = protect(primary, recovery, VM, DISKS)
    model = GroupModel(SIZES)
    handles = [connect(d["uri"]) for d in group["disks"]]
    drill_handles = []
    old_reader = None
    try:
        write_ops(handles, model, rng, 60)
        S = 40
        wait_durable(recovery, VM, 60, primary=primary)

        view = open_view(recovery, VM, S, writable=True)
        view_uris = [d["uri"] for d in view["disks"]]
        drill = [bytearray(b) for b in model.at(S)]
        drill_handles = [connect(u) for u in view_uris]
        assert not drill_handles[0].is_read_only(), "a writable view is served read-only"

        # Drill writes and source writes interleaved.
        for j in range(40):
            disk = j % 2
            kind, off, length, data = random_op(rng, SIZES, disk, weights=(6, 2, 1))
            apply_op(drill_handles[disk], kind, off, length, data)
            drill[disk][off:off + length] = data if kind == "write" else bytes(length)
            write_ops(handles, model, rng, 1)
        for h in drill_handles:
            h.flush()
        assert model.last_seq == 100
        assert group_status(primary, VM)["last_seq"] == 100

        # Replication is not disturbed by the drill.
        wait_durable(recovery, VM, 100, primary=primary)

        # The view: the model at S plus the drill writes, through the drill's connections
        # and through fresh ones.
        for i, h in enumerate(drill_handles):
            got = bytearray()
            for off in range(0, SIZES[i], 4 * MIB):
                got += h.pread(4 * MIB, off)
            assert_same_bytes(bytes(got), bytes(drill[i]),
                              f"seed {seed}: drill connection, disk {i}")
        assert_view_matches(recovery, view, [bytes(d) for d in drill],
                            f"seed {seed}: writable view at {S}")
        assert model.at(S) != [bytes(d) for d in drill], "the drill changed nothing"
        overlays = os.listdir(recovery.data_dir / "views")
        assert overlays, "a writable view with writes has no overlay file in data_dir/views"

        old_reader = connect(view_uris[1])
        assert old_reader.pread(4096, 0) == bytes(drill[1][:4096])

        got, doc = api(recovery, "DELETE", f"/views/{view['id']}")
        assert got == 204, f"DELETE /views/{view['id']}: {got} {doc}"

        # Its clients are disconnected, its export is gone, its overlay is deleted.
        def old_reader_fails():
            try:
                old_reader.pread(4096, 0)
                return False
            except lib.Error:
                return True
        wait_for(old_reader_fails, 5, "the client of the deleted view to be disconnected")
        for uri in view_uris:
            try:
                h = connect(uri)
            except lib.Error:
                continue
            try:
                h.pread(4096, 0)
                still = True
            except lib.Error:
                still = False
            finally:
                close(h)
            assert not still, f"{uri} still serves after DELETE of its view"
        wait_for(lambda: not os.listdir(recovery.data_dir / "views"), 5,
                 "the overlay of the deleted view to be removed")
        listed = api_ok(recovery, "GET", "/site")["views"]
        assert listed == [], f"views still listed after DELETE: {listed}"

        # A new read-only view at S: the source's disks at S, no drill write.
        check_view_at(recovery, S, model.at(S), f"seed {seed}: new view at {S}")
        check_view_at(recovery, 100, model.at(100), f"seed {seed}: view at 100")
    finally:
        for h in handles + drill_handles + ([old_reader] if old_reader else []):
            close(h)


# -- 3 ---------------------------------------------------------------------------------------


class Writer(threading.Thread):
    """One connection per disk, one request at a time, for `duration` seconds; every
    acknowledged request goes into the model (so the model's seqs are the group's)."""

    def __init__(self, uris, model, seed, duration, pause=0.004, max_len=64 * KIB):
        super().__init__(daemon=True)
        self.uris, self.model, self.duration, self.pause = uris, model, duration, pause
        self.max_len = max_len
        self.rng = random.Random(seed)
        self.error = None
        self.stop_event = threading.Event()

    def run(self):
        handles = []
        try:
            handles = [connect(u) for u in self.uris]
            deadline = time.monotonic() + self.duration
            while time.monotonic() < deadline and not self.stop_event.is_set():
                write_ops(handles, self.model, self.rng, 1, max_len=self.max_len)
                time.sleep(self.pause)
            for h in handles:
                h.flush()
        except Exception as e:  # reported by the test
            self.error = e
        finally:
            for h in handles:
                close(h)


def test_restart_recovery_site_under_load(sites, request):
    """kill -9 of the recovery site while the source writes; restarted (new ports), it is
    the target again and catches up: the view equals the primary's disks."""
    primary, recovery = sites
    seed = seed_for(request)
    group = protect(primary, recovery, VM, DISKS)
    model = GroupModel(SIZES)
    writer = Writer([d["uri"] for d in group["disks"]], model, seed, duration=6.0)
    writer.start()
    try:
        time.sleep(2.0)
        assert writer.is_alive(), f"the writer stopped early: {writer.error!r}"
        durable_before = store_status(recovery, VM)["durable_seq"]
        assert durable_before > 0, "nothing replicated in 2 s"
        old_replication = recovery.replication
        recovery.kill9()
        time.sleep(0.3)
        recovery.restart()
        st = store_status(recovery, VM)
        assert st["durable_seq"] >= durable_before, \
            f"durable_seq went back from {durable_before} to {st['durable_seq']} in a kill -9"
        assert api_ok(recovery, "GET", "/site")["stores"] == [VM]
        api_ok(primary, "PUT", f"/groups/{VM}/replication", {"target": recovery.replication},
               status=204)
        g = group_status(primary, VM)
        assert g["replicate_to"] == recovery.replication, (g, old_replication)
    finally:
        writer.join(timeout=20)
    assert not writer.is_alive(), "the writer did not finish"
    assert writer.error is None, f"seed {seed}: the writer failed: {writer.error!r}"
    assert model.last_seq > 200, f"only {model.last_seq} writes in 6 s"

    last = group_status(primary, VM)["last_seq"]
    assert last == model.last_seq, f"primary last_seq {last} != {model.last_seq} acknowledged"
    wait_durable(recovery, VM, last, primary=primary)

    disks = primary_disks(primary)
    want = model.at(last)
    for i in range(2):
        assert_same_bytes(disks[i], want[i], f"seed {seed}: primary disk {i} vs model")
    check_view_at(recovery, last, disks, f"seed {seed}: view at {last} vs primary")
    check_view_at(recovery, durable_before, model.at(durable_before),
                  f"seed {seed}: view at {durable_before} (durable before the kill)")
    mid = (durable_before + last) // 2
    check_view_at(recovery, mid, model.at(mid), f"seed {seed}: view at {mid}")


# -- 4 ---------------------------------------------------------------------------------------


def test_restart_primary_site(sites, request):
    """kill -9 of the primary with records sent but not yet acknowledged; restarted, it
    finds its group and target in site.json, resumes shipping, and the recovery site's
    view equals its disks."""
    primary, recovery = sites
    seed = seed_for(request)
    rng = random.Random(seed)
    group = protect(primary, recovery, VM, DISKS)
    model = GroupModel(SIZES)
    handles = [connect(d["uri"]) for d in group["disks"]]
    try:
        write_ops(handles, model, rng, 40)
        wait_durable(recovery, VM, 40, primary=primary)

        # Freeze the recovery site so that the next records stay unacknowledged.
        os.kill(recovery.proc.pid, signal.SIGSTOP)
        try:
            write_ops(handles, model, rng, 60, max_len=1 * MIB)
            for h in handles:
                h.flush()  # every acknowledged write is in the capture log
            g = group_status(primary, VM)
            assert g["last_seq"] == 100, g
            assert g["replication"]["acked_seq"] < 100, g
            for h in handles:
                close(h)
            handles = []
            primary.kill9()
        finally:
            os.kill(recovery.proc.pid, signal.SIGCONT)

        old_nbd = primary.nbd
        primary.restart()
        g = group_status(primary, VM)
        assert g["last_seq"] == 100, f"the group's log lost records in a kill -9: {g}"
        assert g["replicate_to"] == recovery.replication, f"target not restored: {g}"
        assert g["epoch"] == 1, g
        assert [(d["name"], d["size_bytes"]) for d in g["disks"]] == DISKS, g
        assert api_ok(primary, "GET", "/site")["groups"] == [VM]
        assert "replication" in g, f"no sender after restart: {g}"

        wait_durable(recovery, VM, 100, primary=primary)

        handles = connect_group(primary)
        write_ops(handles, model, rng, 40)
        for h in handles:
            h.flush()
        assert group_status(primary, VM)["last_seq"] == 140
        wait_durable(recovery, VM, 140, primary=primary)
    finally:
        for h in handles:
            close(h)

    disks = primary_disks(primary)
    for i in range(2):
        assert_same_bytes(disks[i], model.at(140)[i], f"seed {seed}: primary disk {i} vs model")
    check_view_at(recovery, 140, disks, f"seed {seed}: view at 140 vs primary (was {old_nbd})")
    check_view_at(recovery, 100, model.at(100), f"seed {seed}: view at 100")
    check_view_at(recovery, 70, model.at(70), f"seed {seed}: view at 70")

    # A clean stop and start keeps it all too.
    primary.stop_clean()
    primary.restart()
    g = group_status(primary, VM)
    assert g["last_seq"] == 140 and g["replicate_to"] == recovery.replication, g
    assert_same_bytes(primary_disks(primary)[0], disks[0], "primary disk 0 after a clean restart")


# -- the bandwidth limit (issue 10, case 10 a) -------------------------------------------


def test_the_first_copy_keeps_to_the_bandwidth_limit(sites, request):
    """Data written before protection, then replication under a 256 KiB/s limit: the
    first copy is paced like everything else (it went at disk speed, bytes_sent 0). A
    lower bound on the time taken, which load only makes easier to meet; and the copy
    counts in bytes_sent."""
    primary, recovery = sites
    rng = random.Random(seed_for(request))
    rate = 256 * KIB
    size = 16 * MIB
    spec = {"disks": [{"name": "os", "size_bytes": size}]}
    api_ok(recovery, "PUT", "/stores/slow", {**spec, "start": "full"}, status=201)
    group = api_ok(primary, "PUT", "/groups/slow", spec, status=201)
    h = connect(group["disks"][0]["uri"])
    try:
        for i in range(4):  # 1 MiB of random bytes before protection
            h.pwrite(rng.randbytes(256 * KIB), i * 4 * MIB)
        h.flush()
    finally:
        close(h)
    t0 = time.monotonic()
    api_ok(primary, "PUT", "/groups/slow/replication",
           {"target": recovery.replication, "bandwidth_bytes_per_second": rate}, status=204)

    def copied():
        st = store_status(recovery, "slow")
        return st if not st["initial_sync"] and not st["resyncing"] and st["durable_seq"] >= 4 \
            else None

    wait_for(copied, 30, "the first copy under 256 KiB/s")
    took = time.monotonic() - t0
    repl = group_status(primary, "slow")["replication"]
    assert repl["resync_bytes_total"] >= MIB, repl
    assert repl["bytes_sent"] >= repl["resync_bytes_total"], repl
    wire = repl["wire_bytes_sent"]
    assert wire >= MIB, repl
    # The bucket holds one frame (64 KiB of data and its headers: more than 100 ms of this
    # rate), so at most that much goes ahead of the rate.
    burst = 64 * KIB + 12 + 16
    assert took >= (wire - burst) / rate, f"{wire} bytes in {took:.2f} s under {rate} B/s"


def test_a_first_write_far_above_the_burst_keeps_to_the_bandwidth_limit(sites, request):
    """Issue 10, case 10: the first writes after protection went at disk speed (16 MiB in
    under a second under 64 KiB/s). One 2 MiB write right after replication starts, under
    512 KiB/s: at every poll the bytes on the wire are within one burst plus the rate
    since the write began (measured before it: only looser under load); without pacing
    the first poll already sees it all. Then it arrives whole and counts in bytes_sent."""
    primary, recovery = sites
    rng = random.Random(seed_for(request))
    rate = 512 * KIB
    spec = {"disks": [{"name": "os", "size_bytes": 8 * MIB}]}
    api_ok(recovery, "PUT", "/stores/burst", spec, status=201)
    group = api_ok(primary, "PUT", "/groups/burst", spec, status=201)
    api_ok(primary, "PUT", "/groups/burst/replication",
           {"target": recovery.replication, "bandwidth_bytes_per_second": rate}, status=204)
    wait_for(lambda: group_status(primary, "burst").get("replication", {}).get("connected"),
             10, "replication connected")
    data = rng.randbytes(2 * MIB)
    # The bucket holds one frame: 64 KiB of data (more than 100 ms of this rate) and its
    # headers.
    burst = 64 * KIB + 12 + 16
    wire0 = group_status(primary, "burst")["replication"]["wire_bytes_sent"]
    h = connect(group["disks"][0]["uri"])
    t0 = time.monotonic()
    try:
        h.pwrite(data, 0)  # one request: one record of 2 MiB
        h.flush()
    finally:
        close(h)
    deadline = t0 + 30
    while True:
        repl = group_status(primary, "burst")["replication"]
        took = time.monotonic() - t0  # after the reading: every byte counted went before
        wire = repl["wire_bytes_sent"] - wire0
        assert wire <= burst + rate * took, \
            f"{wire} bytes on the wire {took:.3f} s after a 2 MiB write under {rate} B/s"
        if store_status(recovery, "burst")["durable_seq"] >= 1:
            break
        assert time.monotonic() < deadline, f"not replicated in 30 s: {repl}"
        time.sleep(0.02)
    # Whatever the load: every byte sent went no faster than the rate (a 2 MiB record takes
    # about 4 s at 512 KiB/s; unpaced, it took well under one). Read after the wire count:
    # only looser. (How many polls fit meanwhile depends on the machine: not asserted.)
    wire = group_status(primary, "burst")["replication"]["wire_bytes_sent"] - wire0
    took = time.monotonic() - t0
    assert wire >= 2 * MIB, wire
    assert took >= (wire - burst) / rate, f"{wire} bytes in {took:.2f} s under {rate} B/s"
    # Counted once the frame is written (the recovery site may have it durable a moment
    # before the sender notes it).
    wait_for(lambda: group_status(primary, "burst")["replication"]["bytes_sent"] >= 2 * MIB, 10,
             "bytes_sent counting the 2 MiB write",
             detail=lambda: group_status(primary, "burst")["replication"])
    view = open_view(recovery, "burst", 1)
    try:
        assert read_all(view["disks"][0]["uri"], size=8 * MIB)[:2 * MIB] == data, \
            "the 2 MiB write did not arrive whole"
    finally:
        close_view(recovery, view["id"])
