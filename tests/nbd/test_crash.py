"""kill -9 under load (invariant 3 of DESIGN.md: nothing silently lost).

After a crash, every write a client got an acknowledgement for is either in
the capture log or inside a region of the persistent dirty bitmap, and every
byte where "original image + replayed log" differs from the served image lies
in a dirty region.
"""

import random
import shutil
import threading
import time

import pytest

from conftest import (KIB, MIB, capture_dirty_json, capture_dump_json, capture_replay, close,
                      connect, first_difference, make_sparse_file, require_libnbd)

SIZE = 32 * MIB
KIND = {"write": "write", "trim": "trim", "zero": "zero"}


def covered(regions, off, length):
    """True when [off, off+length) lies inside the union of the merged regions."""
    pos, end = off, off + length
    for r_off, r_len in sorted(regions):
        if r_off <= pos < r_off + r_len:
            pos = r_off + r_len
            if pos >= end:
                return True
    return pos >= end


def differing_ranges(a, b, block=4096):
    """[(offset, length)] per 4K block: from the first to the last differing byte."""
    out = []
    for off in range(0, len(a), block):
        if a[off:off + block] != b[off:off + block]:
            lo = off
            while a[lo] == b[lo]:
                lo += 1
            hi = min(off + block, len(a)) - 1
            while a[hi] == b[hi]:
                hi -= 1
            out.append((lo, hi + 1 - lo))
    return out


def load_then_kill9(srv, issued, acked, seed, min_acked=600):
    """Six clients write, trim and zero until min_acked acks, then kill -9 the server.

    issued: set of (kind, offset, length) used so far (ops are unique across rounds);
    acked: list that receives the ops the server acknowledged.
    """
    nbd = require_libnbd()
    lock = threading.Lock()
    unexpected = []
    stop = threading.Event()
    start_count = len(acked)

    def worker(tid):
        rng = random.Random(seed * 100 + tid)
        h = connect(srv.tcp_uri if tid % 2 else srv.unix_uri)
        try:
            while not stop.is_set():
                kind = rng.choices(["write", "trim", "zero"], weights=[8, 1, 1])[0]
                length = rng.randrange(1, 256 * KIB)
                off = rng.randrange(0, SIZE - length)
                key = (KIND[kind], off, length)
                with lock:
                    if key in issued:
                        continue
                    issued.add(key)
                try:
                    if kind == "write":
                        h.pwrite(rng.randbytes(length), off)
                    elif kind == "trim":
                        h.trim(length, off)
                    else:
                        h.zero(length, off)
                except nbd.Error:
                    return                      # the server is gone
                with lock:
                    acked.append(key)
        except Exception as e:
            unexpected.append(f"thread {tid}: {e!r}")
        finally:
            close(h)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with lock:
            if len(acked) - start_count >= min_acked:
                break
        time.sleep(0.05)
    time.sleep(0.2)
    srv.kill9()
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "clients hung after kill -9"
    assert not unexpected, unexpected
    assert len(acked) - start_count >= 50, \
        f"only {len(acked) - start_count} writes acknowledged before the kill"


@pytest.mark.parametrize("crashes", [1, 2])
def test_kill9_under_load_loses_nothing_silently(osrd_factory, tmp_path, crashes):
    base = tmp_path / "base.img"
    make_sparse_file(base, SIZE, [(0, 4 * MIB), (20 * MIB, 2 * MIB)], seed=9)
    served = tmp_path / "served.img"
    shutil.copyfile(base, served)
    cap = tmp_path / "cap"
    issued = set()
    acked = []                        # (kind, offset, length) of acknowledged ops
    for round_ in range(crashes):
        # The second round crashes a daemon that itself recovered from a crash.
        srv = osrd_factory(served, capture=cap, socket=True)
        load_then_kill9(srv, issued, acked, seed=round_ + 1,
                        min_acked=600 if round_ == 0 else 300)

    # The daemon comes back on the same image and log, and serves.
    srv2 = osrd_factory(served, capture=cap)
    h = connect(srv2.tcp_uri)
    try:
        assert len(h.pread(1 * MIB, 0)) == 1 * MIB
        after_restart = (KIND["write"], 31 * MIB + 5, 4000)
        h.pwrite(b"\x7e" * 4000, 31 * MIB + 5)
        assert h.pread(4000, 31 * MIB + 5) == b"\x7e" * 4000
    finally:
        close(h)
    srv2.stop_clean()

    rc, doc = capture_dump_json(cap)
    assert rc == 0 and doc["errors"] == [], doc["errors"]
    recs = sorted(doc["records"], key=lambda r: r["seq"])
    seqs = [r["seq"] for r in recs]
    assert seqs == list(range(1, len(recs) + 1)), "sequence has a gap after the crash"
    logged = {(r["kind"], r["offset"], r["length"]) for r in recs}

    dirty = capture_dirty_json(cap)
    assert dirty["region_bytes"] == 64 * KIB
    regions = [(r["offset"], r["length"]) for r in dirty["regions"]]
    for off, length in regions:
        assert off % (64 * KIB) == 0 and length % (64 * KIB) == 0 and length > 0, regions
        assert off + length <= SIZE + 64 * KIB

    lost = [k for k in acked if k not in logged and not covered(regions, k[1], k[2])]
    assert not lost, (f"{len(lost)} acknowledged ops are neither in the log nor in a dirty "
                      f"region, e.g. {lost[:5]}; dirty regions: {regions[:10]}")

    assert (recs[-1]["kind"], recs[-1]["offset"], recs[-1]["length"]) == after_restart, \
        "the write after the restart did not get the next number"

    print(f"acked={len(acked)} logged={len(recs)} dirty_regions={regions}")
    out = tmp_path / "replay.img"
    n, first, last = capture_replay(cap, base, out)
    assert (n, first, last) == (len(recs), 1, len(recs))
    replayed = out.read_bytes()
    image = served.read_bytes()
    outside = [(o, n) for o, n in differing_ranges(replayed, image) if not covered(regions, o, n)]
    assert not outside, (f"replay differs from the image outside dirty regions at {outside[:5]}"
                         f"; dirty: {regions[:10]}; {first_difference(replayed, image)}")
