"""kill -9 under load (invariant 3 of DESIGN.md: nothing silently lost).

After a crash, every write a client got an acknowledgement for is either in
the capture log or inside a region of the persistent dirty bitmap, and every
byte where "original image + replayed log" differs from the served image lies
in a dirty region.
"""

import random
import shutil
import subprocess
import threading
import time

import pytest

from conftest import (KIB, MIB, capture_dirty_json, capture_dump_json, capture_replay, close,
                      connect, first_difference, make_sparse_file, require_libnbd, require_tool,
                      run)

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


def _log_bytes(cap):
    """Total size of the capture log's segment files."""
    total = 0
    for p in cap.glob("*.log"):
        try:
            total += p.stat().st_size
        except FileNotFoundError:       # a segment can be renamed or removed meanwhile
            pass
    return total


FIO_SIZE = 256 * MIB
FIO_MIN_LOG_BYTES = 16 * MIB           # log growth required before the kill
FIO_LOAD_S = 2.0                       # load time before the kill
FIO_LOAD_DEADLINE_S = 10.0             # ... extended up to this while the log is too small
FIO_EXIT_TIMEOUT_S = 15.0              # fio must give up this soon after the kill


def test_kill9_under_fio_load_dirty_regions_cover_replay_difference(osrd_factory, tmp_path):
    fio = require_tool("fio")
    probe = run([fio, "--enghelp=nbd"], check=False, timeout=30)
    assert probe.returncode == 0, \
        f"this fio has no nbd engine (fio --enghelp=nbd: {probe.stdout}{probe.stderr})"

    base = tmp_path / "base.img"
    make_sparse_file(base, FIO_SIZE, [(0, 4 * MIB), (17 * MIB, 3 * MIB), (40 * MIB, 8 * MIB)],
                     seed=21)
    served = tmp_path / "served.img"
    shutil.copyfile(base, served)
    cap = tmp_path / "cap"

    srv = osrd_factory(served, capture=cap)
    uri = srv.tcp_uri
    assert uri.startswith("nbd://127.0.0.1:"), f"fio must only talk to 127.0.0.1, got {uri}"
    log_before = _log_bytes(cap)

    # Global options first; each --name starts a job that inherits them.
    cmd = [fio, "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--iodepth=16",
           "--time_based", "--runtime=20", f"--size={FIO_SIZE}", "--group_reporting",
           "--randrepeat=0",
           "--name=small", "--bs=4k", "--numjobs=2",
           "--name=large", "--bsrange=64k-1m", "--numjobs=1"]
    fio_out = open(tmp_path / "fio.stdout", "wb")
    fio_err = open(tmp_path / "fio.stderr", "wb")
    fio_proc = subprocess.Popen(cmd, cwd=tmp_path, stdin=subprocess.DEVNULL,
                                stdout=fio_out, stderr=fio_err)

    def fio_output():
        fio_out.flush()
        fio_err.flush()
        return ((tmp_path / "fio.stdout").read_text(errors="replace")[-3000:] + "\n" +
                (tmp_path / "fio.stderr").read_text(errors="replace")[-3000:])

    try:
        t0 = time.monotonic()
        while True:
            elapsed = time.monotonic() - t0
            grown = _log_bytes(cap) - log_before
            if fio_proc.poll() is not None:
                pytest.fail(f"fio exited with {fio_proc.returncode} before the kill:\n"
                            f"{fio_output()}\nosrd stderr: {srv.stderr()}")
            if elapsed >= FIO_LOAD_S and grown >= FIO_MIN_LOG_BYTES:
                break
            if elapsed >= FIO_LOAD_DEADLINE_S:
                pytest.fail(f"capture log grew only {grown} bytes in {elapsed:.1f}s of fio "
                            f"load (need {FIO_MIN_LOG_BYTES})\n{fio_output()}")
            time.sleep(0.1)
        assert srv.alive(), f"osrd died under fio load: {srv.stderr()}"
        srv.kill9()
        grown_at_kill = _log_bytes(cap) - log_before

        # fio loses its connections and must give up (with an error) on its own.
        try:
            fio_rc = fio_proc.wait(timeout=FIO_EXIT_TIMEOUT_S)
            fio_hung = False
        except subprocess.TimeoutExpired:
            fio_proc.kill()
            fio_rc = fio_proc.wait(timeout=10)
            fio_hung = True
    finally:
        if fio_proc.poll() is None:
            fio_proc.kill()
            fio_proc.wait(timeout=10)
        fio_out.close()
        fio_err.close()
    t_fio = time.monotonic() - t0
    print(f"fio exit={fio_rc} hung={fio_hung} after {t_fio:.1f}s; "
          f"log grew {grown_at_kill / MIB:.1f} MiB before the kill")

    # The daemon comes back on the same image and log, and serves.
    srv2 = osrd_factory(served, capture=cap)
    h = connect(srv2.tcp_uri)
    try:
        assert h.get_size() == FIO_SIZE
        assert len(h.pread(1 * MIB, 0)) == 1 * MIB
        assert len(h.pread(1 * MIB, FIO_SIZE - 1 * MIB)) == 1 * MIB
    finally:
        close(h)
    srv2.stop_clean()

    rc, doc = capture_dump_json(cap)
    assert rc == 0 and doc["errors"] == [], doc["errors"][:10]
    recs = sorted(doc["records"], key=lambda r: r["seq"])
    seqs = [r["seq"] for r in recs]
    assert seqs == list(range(1, len(recs) + 1)), \
        f"sequence has a gap after the crash (first seqs {seqs[:5]}, {len(recs)} records)"
    assert len(recs) >= 1000, f"only {len(recs)} records logged under 2 s of fio load"
    for r in recs:
        assert r["offset"] + r["length"] <= FIO_SIZE, r

    dirty = capture_dirty_json(cap)
    assert dirty["region_bytes"] == 64 * KIB
    regions = [(r["offset"], r["length"]) for r in dirty["regions"]]
    for off, length in regions:
        assert off % (64 * KIB) == 0 and length % (64 * KIB) == 0 and length > 0, regions
        assert off + length <= FIO_SIZE + 64 * KIB, regions
    dirty_total = sum(length for _, length in regions)
    print(f"records={len(recs)} dirty: {len(regions)} regions, {dirty_total} bytes "
          f"({dirty_total / MIB:.2f} MiB of {FIO_SIZE // MIB} MiB)")
    assert dirty_total < FIO_SIZE, \
        f"the whole disk is dirty ({len(regions)} regions): the bitmap says nothing"

    out = tmp_path / "replay.img"
    n, first, last = capture_replay(cap, base, out)
    assert (n, first, last) == (len(recs), 1, len(recs))
    replayed = out.read_bytes()
    image = served.read_bytes()
    assert len(replayed) == len(image) == FIO_SIZE
    diffs = differing_ranges(replayed, image)
    outside = [(o, n) for o, n in diffs if not covered(regions, o, n)]
    print(f"{len(diffs)} 4K blocks differ between replay and image, all in dirty regions"
          if not outside else f"{len(outside)} differing blocks outside dirty regions")
    assert not outside, (f"replay differs from the image outside dirty regions at {outside[:5]}"
                         f"; dirty: {regions[:10]}; {first_difference(replayed, image)}")
    shutil.rmtree(cap)                 # > 1 GiB of log; kept only when the test fails
