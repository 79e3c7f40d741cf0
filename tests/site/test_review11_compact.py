"""Review of issue 11 (reviewer 11): the compact route and compacted history across
restarts, driven as the vault would, with real sites. Failing assertions are findings.

Journal segments are 64 MiB (not configurable at a site), and compaction goes by whole
segments: each test writes a few hundred MiB of 1 MiB writes over a 16 MiB disk.
"""

import json
import random
import signal
import threading
import time

import pytest

from conftest import (MIB, api, api_ok, assert_error, close, close_view, compact, compact_ok,
                      connect, open_view, protect, read_all, store_status, wait_durable,
                      wait_for)

VM = "vm1"
SLOTS = 16
DISK = SLOTS * MIB


def data_of(seq):
    return random.Random(seq).randbytes(MIB)


class Slots:
    """Write seq s puts data_of(s) into slot slot_of[s] (1 MiB each)."""

    def __init__(self):
        self.slot_of = {}

    def at(self, seq):
        last = {}
        for s in range(1, seq + 1):
            last[self.slot_of[s]] = s
        out = bytearray(DISK)
        for slot, s in last.items():
            out[slot * MIB:(slot + 1) * MIB] = data_of(s)
        return bytes(out)


def write_n(h, model, n, rng):
    for _ in range(n):
        seq = len(model.slot_of) + 1
        slot = rng.randrange(SLOTS)
        h.pwrite(data_of(seq), slot * MIB)
        model.slot_of[seq] = slot


def view_bytes(site, seq):
    v = open_view(site, VM, seq)
    try:
        return read_all(v["disks"][0]["uri"], size=DISK)
    finally:
        close_view(site, v["id"])


def check(site, model, seqs, what):
    for s in seqs:
        got = view_bytes(site, s)
        assert got == model.at(s), f"{what}: view at seq {s} differs from what was written"


def start_pair(site_factory, writes, seed=11):
    primary = site_factory("primary", tls=False)
    recovery = site_factory("recovery", tls=False)
    group = protect(primary, recovery, VM, [("d0", DISK)])
    model = Slots()
    h = connect(group["disks"][0]["uri"])
    try:
        write_n(h, model, writes, random.Random(seed))
    finally:
        close(h)
    wait_durable(recovery, VM, writes, timeout=120, primary=primary)
    return primary, recovery, model


def test_hostile_bodies_on_the_compact_route(site_factory):
    primary, recovery, model = start_pair(site_factory, 20)
    bad = [
        {}, {"keep": []}, {"through": 5}, {"keep": [], "through": -1},
        {"keep": [1.5], "through": 10}, {"keep": ["1"], "through": 10},
        {"keep": [-1], "through": 10}, {"keep": [1e30], "through": 10},
        {"keep": None, "through": 5}, {"keep": {}, "through": 5}, {"keep": [], "through": "5"},
        {"keep": [], "through": 5.0}, {"keep": [], "through": 5, "x": 1},
        {"keep": [[1]], "through": 5}, {"keep": [True], "through": 5},
        {"keep": [], "through": 2 ** 64 - 1}, {"keep": [], "through": 2 ** 64},
        {"keep": list(range(10 ** 6)), "through": 5},
    ]
    for body in bad:
        err = assert_error(recovery, "POST", f"/stores/{VM}/compact", body, 400)
        print(json.dumps(body)[:60], "->", err["code"], err["message"][:150])
    for raw in [b"[", b"null", b"[]", b"\"x\"", b"{" * 100000, b"{\"keep\":[" + b"1," * 10 + b"]}"]:
        got, doc = api(recovery, "POST", f"/stores/{VM}/compact", raw=raw)
        print(raw[:30], "->", got, str(doc)[:150])
        assert got == 400, (raw[:40], got, doc)
    assert_error(recovery, "POST", "/stores/nosuch/compact", {"keep": [], "through": 1}, 404)
    # Many kept seqs, duplicates and out-of-range ones: accepted, and the store still reads.
    r = compact_ok(recovery, VM,
                   {"keep": [0, 5, 5, 3, 2 ** 64 - 1] + list(range(100, 100000)), "through": 20})
    print("100k keep ->", r)
    check(recovery, model, [0, 5, 20], "after a compaction that took nothing")
    assert recovery.alive()


def test_compact_views_restart_and_kill(site_factory):
    primary, recovery, model = start_pair(site_factory, 300)
    durable = store_status(recovery, VM)["durable_seq"]
    keep = [40, 41, 150, 220]
    # A view at a seq that would go: refused, naming the view.
    v = open_view(recovery, VM, 100)
    try:
        err = assert_error(recovery, "POST", f"/stores/{VM}/compact",
                           {"keep": keep, "through": durable}, 409)
        print("pinned ->", err)
    finally:
        close_view(recovery, v["id"])
    # A view at a kept point stays open across the compaction and reads the same bytes.
    v = open_view(recovery, VM, 150)
    hv = connect(v["disks"][0]["uri"])
    try:
        r = compact_ok(recovery, VM, {"keep": keep, "through": durable})
        print("compact ->", r)
        e = r["compacted_through"]
        assert e > 220 and r["bytes_after"] < r["bytes_before"], r
        assert hv.pread(DISK, 0) == model.at(150), "an open view changed under a compaction"
    finally:
        close(hv)
        close_view(recovery, v["id"])
    st = store_status(recovery, VM)
    print("status ->", {k: st.get(k) for k in ("compacted_through", "history_bytes",
                                                "index_cache_bytes", "base_seq")})
    points = [k for k in keep if k < e] + [e, durable]
    check(recovery, model, points, "after compaction")
    got, doc = api(recovery, "POST", f"/stores/{VM}/views", {"seq": 100})
    print("view at a compacted seq ->", got, doc)
    assert got in (400, 404, 409, 416, 412) and "compacted" in json.dumps(doc), doc
    # Restarts: SIGTERM, then kill -9.
    recovery.stop()
    recovery.restart()
    check(recovery, model, points, "after a SIGTERM restart")
    recovery.kill9()
    recovery.restart()
    check(recovery, model, points, "after kill -9")
    # A second thinning: 41 and 150 go.
    keep2 = [40, 220]
    r = compact_ok(recovery, VM, {"keep": keep2, "through": durable})
    print("compact 2 ->", r)
    err = assert_error(recovery, "POST", f"/stores/{VM}/compact",
                       {"keep": [40, 150, 220], "through": durable}, 400)
    print("kept seq gone ->", err)
    check(recovery, model, [40, 220, e, durable], "after a second compaction")
    # Fold through the compacted part.
    r = api_ok(recovery, "POST", f"/stores/{VM}/fold", {"seq": 100})
    print("fold 100 ->", r)
    assert r["base_seq"] == 40, r
    check(recovery, model, [40, 220, durable], "after a fold to a kept point")


@pytest.mark.parametrize("delay", [0.05, 0.3, 1.0])
def test_kill9_during_compaction(site_factory, delay):
    primary, recovery, model = start_pair(site_factory, 400, seed=int(delay * 100))
    durable = store_status(recovery, VM)["durable_seq"]
    keep = list(range(10, 390, 10))
    result = {}

    asked = api_ok(recovery, "POST", f"/stores/{VM}/compact",
                   {"keep": keep, "through": durable}, status=202)
    time.sleep(delay)
    result["state"] = store_status(recovery, VM).get("compaction", {}).get("state")
    recovery.kill9()
    print("asked:", asked, "; killed while", result["state"])
    recovery.restart()
    st = store_status(recovery, VM)
    print("after restart:", {k: st.get(k) for k in ("compacted_through", "history_bytes",
                                                     "base_seq", "durable_seq")})
    assert st["durable_seq"] == durable
    check(recovery, model, [10, 200, 380, durable], f"kill -9 {delay}s into a compaction")
    # The next compaction works and leaves the same bytes.
    r = compact_ok(recovery, VM, {"keep": [10, 200, 380], "through": durable})
    print("compact again ->", r)
    check(recovery, model, [10, 200, 380, durable], "the compaction after the kill")


@pytest.mark.parametrize("what", ["second-compaction", "fold"])
def test_kill9_during_second_compaction_or_fold(site_factory, what):
    primary, recovery, model = start_pair(site_factory, 400, seed=7)
    durable = store_status(recovery, VM)["durable_seq"]
    r = compact_ok(recovery, VM, {"keep": list(range(10, 390, 10)), "through": 200})
    print("first compaction ->", r)
    if what == "fold":
        call = ("/fold", {"seq": 380})
    else:
        call = ("/compact", {"keep": [10, 200, 380], "through": durable})

    def run():
        try:  # the site is killed under it: the call fails, as it should
            api(recovery, "POST", f"/stores/{VM}" + call[0], call[1], timeout=120)
        except (OSError, pytest.fail.Exception):
            pass

    if what == "fold":  # answered when it is done
        t = threading.Thread(target=run, daemon=True)
        t.start()
        time.sleep(0.15)
        recovery.kill9()
        t.join(30)
    else:  # answered at once (202), run on the site's maintenance thread
        api_ok(recovery, "POST", f"/stores/{VM}" + call[0], call[1], status=202)
        time.sleep(0.15)
        recovery.kill9()
    recovery.restart()
    st = store_status(recovery, VM)
    print("after restart:", {k: st.get(k) for k in ("compacted_through", "history_bytes",
                                                     "base_seq", "durable_seq")})
    base = st["base_seq"]
    for s in [10, 200, 380, durable]:
        got, doc = api(recovery, "POST", f"/stores/{VM}/views", {"seq": s})
        if got != 201:
            print(f"seq {s}: refused: {doc}")
            assert s < max(base, st["compacted_through"]) or s < 380, doc
            continue
        try:
            b = read_all(doc["disks"][0]["uri"], size=DISK)
        finally:
            close_view(recovery, doc["id"])
        assert b == model.at(s), f"{what}: seq {s} differs after kill -9"
        print(f"seq {s}: exact")


def test_a_stop_ends_a_compaction_under_way_and_loses_nothing(site_factory):
    """The site's maintenance thread: SIGTERM while a compaction writes its history makes it
    stop at its next chunk (the daemon exits within its stop timeout, not after the whole
    compaction), nothing of it stays, and it is asked for again after the restart."""
    primary, recovery, model = start_pair(site_factory, 400, seed=3)
    durable = store_status(recovery, VM)["durable_seq"]
    body = {"keep": list(range(10, 390, 10)), "through": durable}
    asked = api_ok(recovery, "POST", f"/stores/{VM}/compact", body, status=202)
    print("asked ->", asked)
    wait_for(lambda: store_status(recovery, VM)["compaction"]["state"] == "running", 10,
             "the compaction running")
    t0 = time.monotonic()
    recovery.stop()  # SIGTERM; fails the test if the daemon does not exit in time
    log = recovery.stderr()
    print(f"stopped {time.monotonic() - t0:.2f}s after SIGTERM; log tail:", log[-600:])
    # 400 MiB of history take seconds to compact: the stop came first and undid it.
    assert "history compacted up to" not in log, "the compaction ran to its end: stop too late"
    assert "undone: stopped: the store is closing" in log, log[-2000:]
    recovery.restart()
    st = store_status(recovery, VM)
    assert "compaction" not in st, st  # the request went with the process
    assert st["compacted_through"] == 0, st
    check(recovery, model, [10, 200, 380, durable], "after a stop during a compaction")
    r = compact_ok(recovery, VM, body)
    assert r["bytes_after"] < r["bytes_before"], r
    check(recovery, model, [10, 200, 380, durable], "after the compaction asked for again")


def test_a_request_while_one_runs_is_queued_after_it(site_factory):
    primary, recovery, model = start_pair(site_factory, 400, seed=4)
    durable = store_status(recovery, VM)["durable_seq"]
    first = {"keep": list(range(10, 390, 10)), "through": 200}
    second = {"keep": [10, 200, 380], "through": durable}
    api_ok(recovery, "POST", f"/stores/{VM}/compact", first, status=202)
    c = wait_for(lambda: (lambda c: c if c["state"] != "queued" else None)(
        store_status(recovery, VM)["compaction"]), 10, "the first compaction starting")
    got = api_ok(recovery, "POST", f"/stores/{VM}/compact", second, status=202)
    print("first ->", c, "; second asked ->", got)
    if c["state"] == "running" and got["compaction"]["state"] == "running":
        assert got["compaction"]["next_through"] == durable, got
    # Whichever way the race went, the second one runs to the end.
    end = wait_for(lambda: (lambda c: c if c["state"] in ("done", "failed") and
                            c["through"] == durable else None)(
        store_status(recovery, VM)["compaction"]), 120, "the second compaction ending")
    assert end["state"] == "done", end
    check(recovery, model, [10, 200, 380, durable], "after two compactions asked at once")
    # A store deleted while nothing runs: its compaction state goes with it.
    api_ok(recovery, "DELETE", f"/stores/{VM}", status=204)
    assert_error(recovery, "GET", f"/stores/{VM}", None, 404)


def test_a_damaged_journal_record_is_refused_counted_and_never_compacted(site_factory):
    """A byte of an older journal segment changes on disk (the medium, or a hand): open
    does not read that segment, so the first read of the record finds it. The read is
    refused (an NBD error), the store counts it, the site's log names the file and seq,
    and a compaction that would copy it fails and changes nothing."""
    primary, recovery, model = start_pair(site_factory, 400, seed=5)
    durable = store_status(recovery, VM)["durable_seq"]
    recovery.stop()
    journal = recovery.data_dir / "stores" / VM / "journal"
    segments = sorted(journal.iterdir())
    assert len(segments) >= 3, segments
    with open(segments[0], "r+b") as f:  # seq 1's payload: segment header, record header
        f.seek(64 + 64 + 1000)
        b = f.read(1)
        f.seek(64 + 64 + 1000)
        f.write(bytes([b[0] ^ 0x5A]))
    recovery.restart()
    assert store_status(recovery, VM)["damaged_records"] == 0
    v = open_view(recovery, VM, 1)
    try:
        h = connect(v["disks"][0]["uri"])
        try:
            slot = model.slot_of[1]
            with pytest.raises(Exception) as e:
                h.pread(MIB, slot * MIB)
            print("read of the damaged record ->", e.value)
            # The other slots read right at seq 1 (zeros: nothing else was written yet).
            other = (slot + 1) % SLOTS
            assert h.pread(MIB, other * MIB) == model.at(1)[other * MIB:(other + 1) * MIB]
        finally:
            close(h)
    finally:
        close_view(recovery, v["id"])
    st = store_status(recovery, VM)
    assert st["damaged_records"] == 1, st
    log = recovery.stderr()
    assert "the record of seq 1 in journal segment 1 at byte 64 is damaged" in log, log[-2000:]
    c = compact(recovery, VM, {"keep": [1, 200], "through": durable})  # (0, 1] reads seq 1
    print("compaction over the damaged record ->", c)
    assert c["state"] == "failed" and "CRC" in c["error"], c
    st = store_status(recovery, VM)
    assert st["compacted_through"] == 0 and "write_error" not in st, st
    check(recovery, model, [durable], "the newest state after a refused compaction")
