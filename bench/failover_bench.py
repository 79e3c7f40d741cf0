#!/usr/bin/python3
"""Benchmark failover and reprotect, through a real `osrd quickstart` and the `osr` CLI.

Part 1, time to fail over. For each disk size (1 GiB and 100 GiB, sparse), --reps VMs
(driver none) are created at `primary`, protected, written a little (4 KiB at 0, 1 MiB at
the end) and given a point. Then `osr failover VM --point latest-processed --wait` runs;
we time (a) until the CLI returns (the job is done) and (b) until the first 4 KiB of the
disk, read through NBD at the recovery site, shows the bytes written (served). Invariant 6
says both are independent of the disk size: the bar is median(100 GiB) <= 1.5 x
median(1 GiB), or at most 100 ms apart.

Part 2, reprotect ships differences. A 1 GiB disk gets --data (default 256 MiB) of random
data in 1 MiB pieces at random places, then `osr protect --wait` (the initial copy of the
allocated regions: the full sparse copy we compare with; its time and bytes). Failover
(latest), commit, change --change-pct (default 1%) of the disk at the new primary in
64 KiB pieces, `osr reprotect --wait` (exact path): its time and bytes shipped. Then a
planned failback, commit, the same change at the old site, `osr reprotect --compare`
(hash path). Reported: bytes shipped / bytes changed (bar: <= 2 x + 1 MiB) and the time
beside the full copy.

Run: /usr/bin/python3 bench/failover_bench.py --osrd build/osrd [--osr build/osr]
     [--reps 3] [--data 256M] [--change-pct 1] [--dir /var/tmp] [--json FILE] [--keep]
Exit status 0 when every measurement ran (bars print PASS/FAIL), 1 when one failed.
"""

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from benchlib import free_port, parse_size  # noqa: E402

try:
    import nbd  # python3-libnbd
except ImportError:
    print("failover_bench: python3-libnbd is missing (scripts/bootstrap installs it)",
          file=sys.stderr)
    sys.exit(2)

KIB, MIB, GIB = 1024, 1024 * 1024, 1024 * 1024 * 1024


def log(msg):
    print(f"[failover_bench] {msg}", file=sys.stderr, flush=True)




class Cli:
    def __init__(self, osr, vault):
        self.osr, self.vault = osr, vault

    def __call__(self, *args, timeout=1800):
        cmd = [self.osr, "--vault", self.vault, "--output", "json", *[str(a) for a in args]]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[5:])}: {p.stderr.strip()[-500:]}")
        return json.loads(p.stdout) if p.stdout.strip() else None


def connect(uri):
    h = nbd.NBD()
    h.set_handle_name("failover-bench")
    h.connect_uri(uri)
    return h


def disk_uri(cli, vm, disk="d0"):
    for d in cli("vm", "show", vm)["disks"]:
        if d["name"] == disk:
            return d["uri"]
    raise RuntimeError(f"{vm} has no disk {disk}")


def write_pieces(uri, pieces):
    """pieces: [(offset, bytes)]; flushed."""
    h = connect(uri)
    try:
        for off, data in pieces:
            h.pwrite(data, off)
        h.flush()
    finally:
        h.shutdown()


def bench_failover_time(cli, sizes, reps):
    rows = {}
    for size in sizes:
        job_s, served_s = [], []
        for r in range(reps):
            vm = f"f{size // GIB}g{r}"
            cli("vm", "create", vm, "--site", "primary", "--disk", f"d0:{size}")
            cli("protect", vm, "--target", "recovery", "--wait")
            head = random.randbytes(4 * KIB)
            write_pieces(disk_uri(cli, vm), [(0, head), (size - MIB, random.randbytes(MIB))])
            cli("point", "create", vm)
            t0 = time.monotonic()
            cli("failover", vm, "--point", "latest-processed", "--wait")
            t1 = time.monotonic()
            h = connect(disk_uri(cli, vm))
            got = h.pread(4 * KIB, 0)
            t2 = time.monotonic()
            h.shutdown()
            if got != head:
                raise RuntimeError(f"{vm}: the failed-over disk does not show the point")
            job_s.append(t1 - t0)
            served_s.append(t2 - t0)
            log(f"{vm}: job {t1 - t0:.3f} s, served {t2 - t0:.3f} s")
        rows[size] = {"job_s": job_s, "served_s": served_s,
                      "job_median_s": statistics.median(job_s),
                      "served_median_s": statistics.median(served_s)}
    return rows


def random_change(size, pct, rng):
    """~pct % of the disk in 64 KiB pieces (some unaligned), distinct places."""
    want = size * pct // 100
    pieces, done, used = [], 0, set()
    while done < want:
        block = rng.randrange(size // (64 * KIB) - 1)
        if block in used:
            continue
        used.add(block)
        off = block * 64 * KIB + (rng.randrange(4096) if rng.random() < 0.3 else 0)
        n = min(64 * KIB, want - done)
        pieces.append((off, rng.randbytes(n)))
        done += n
    return pieces, done


def job_shipped(job):
    return job.get("bytes_shipped", 0)


def bench_reprotect(cli, data_bytes, pct, rng):
    size = GIB
    vm = "r1"
    cli("vm", "create", vm, "--site", "primary", "--disk", f"d0:{size}")
    pieces = [(rng.randrange(size // MIB) * MIB, rng.randbytes(MIB))
              for _ in range(data_bytes // MIB)]
    write_pieces(disk_uri(cli, vm), pieces)
    t0 = time.monotonic()
    cli("protect", vm, "--target", "recovery", "--wait")
    full_s = time.monotonic() - t0
    # The bytes of the initial copy: the allocated regions (the site reports them).
    allocated = len({off for off, _ in pieces}) * MIB
    out = {"full_copy_s": full_s, "full_copy_bytes": allocated}
    log(f"protect (full sparse copy of {allocated} bytes): {full_s:.2f} s")

    for path, compare in (("exact", False), ("hash", True)):
        planned = path == "hash"
        cli("failover", vm, *(["--planned"] if planned else ["--point", "latest"]), "--wait")
        cli("commit", vm, "--wait")
        change, changed = random_change(size, pct, rng)
        write_pieces(disk_uri(cli, vm), change)
        t0 = time.monotonic()
        job = cli("reprotect", vm, *(["--compare"] if compare else []), "--wait")
        took = time.monotonic() - t0
        shipped = job_shipped(job)
        out[path] = {"mode": job.get("mode"), "changed_bytes": changed, "shipped_bytes": shipped,
                     "seconds": took, "ratio": shipped / changed if changed else None}
        log(f"reprotect {path}: mode {job.get('mode')}, changed {changed}, shipped {shipped}, "
            f"{took:.2f} s")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--osrd", default="build/osrd")
    ap.add_argument("--osr", default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--data", default="256M")
    ap.add_argument("--change-pct", type=int, default=1)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    osrd = str(Path(args.osrd).resolve())
    osr = str(Path(args.osr).resolve()) if args.osr else str(Path(osrd).parent / "osr")
    for b in (osrd, osr):
        if not os.access(b, os.X_OK):
            print(f"failover_bench: {b} is missing: make build", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="osr-failover-bench-", dir=args.dir))
    port = free_port()
    qs_log = open(work / "quickstart.log", "w")
    qs = subprocess.Popen([osrd, "quickstart", "--dir", str(work / "data"), "--vault-listen",
                           f"127.0.0.1:{port}"], stdout=qs_log, stderr=subprocess.STDOUT,
                          start_new_session=True)
    cli = Cli(osr, f"http://127.0.0.1:{port}")
    rng = random.Random(7)
    random.seed(7)
    status = 0
    res = {}
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                cli("site", "list", timeout=5)
                break
            except Exception:
                if time.monotonic() > deadline or qs.poll() is not None:
                    raise RuntimeError("the quickstart did not start: " +
                                       (work / "quickstart.log").read_text()[-2000:])
                time.sleep(0.2)
        res["failover"] = bench_failover_time(cli, [GIB, 100 * GIB], args.reps)
        res["reprotect"] = bench_reprotect(cli, parse_size(args.data), args.change_pct, rng)
    except Exception as e:  # report what ran, then fail
        log(f"FAILED: {e}")
        status = 1
    finally:
        qs.send_signal(signal.SIGINT)
        try:
            qs.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(qs.pid, signal.SIGKILL)
            qs.wait()
        qs_log.close()

    print("\n== failover: time from `osr failover` to the disk served at the recovery site ==")
    f = res.get("failover", {})
    for size, row in f.items():
        print(f"  {size // GIB:>4} GiB: job median {row['job_median_s'] * 1000:8.1f} ms, "
              f"served median {row['served_median_s'] * 1000:8.1f} ms  "
              f"(runs: {', '.join(f'{x * 1000:.0f}' for x in row['served_s'])} ms)")
    if GIB in f and 100 * GIB in f:
        a, b = f[GIB]["served_median_s"], f[100 * GIB]["served_median_s"]
        ok = b <= 1.5 * a or b - a <= 0.1
        print(f"  100 GiB / 1 GiB = {b / a:.2f}x -> bar (<= 1.5x or <= 100 ms apart): "
              f"{'PASS' if ok else 'FAIL'}")
    r = res.get("reprotect")
    if r:
        print("\n== reprotect: bytes shipped / bytes changed, time beside a full copy ==")
        print(f"  full sparse copy (initial protection): {r['full_copy_bytes']} bytes in "
              f"{r['full_copy_s']:.2f} s")
        for path in ("exact", "hash"):
            if path not in r:
                continue
            p = r[path]
            ok = p["changed_bytes"] <= p["shipped_bytes"] <= 2 * p["changed_bytes"] + MIB
            print(f"  {path:5} (mode {p['mode']}): changed {p['changed_bytes']}, shipped "
                  f"{p['shipped_bytes']} = {p['ratio']:.2f}x, {p['seconds']:.2f} s "
                  f"({p['seconds'] / r['full_copy_s']:.2f}x the full copy's time) -> bar "
                  f"(changed <= shipped <= 2x + 1 MiB): {'PASS' if ok else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        log(f"kept {work}")
    return status


if __name__ == "__main__":
    sys.exit(main())
