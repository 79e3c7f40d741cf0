"""Retention thinning, then history compaction, then every kept point byte-exact (issue 11,
"Tests"), through the `osr` CLI, with the vault doing what it does on its own.

The quickstart runs under libfaketime, so that hours of recovery points pass in a minute:
the wall clock steps forward an hour at a time, and each step is confirmed (`osr point
confirm-clock`), as an operator would after a real one. Eras of writes, each in its own
clock hour:

  era 0 (t0)       a little data, a few points;
  era 1 (t0 + 1h)  some 150 MiB of overwrites of a 16 MiB disk, many points: the journal
                   (64 MiB segments) gets whole segments in this era;
  era 2 (t0 + 2h)  a few points;
  era 3 (t0 + 2h5) a few points.

Once the newest point is more than an hour past era 1, thinning leaves one crash point per
older hour (the last of era 0 and of era 1), the vault folds up to the oldest point left
and asks the recovery site to compact the history between the kept points; the journal
shrinks to about the data the kept points can see. Then every point left is shown as a
drill and compared, byte for byte, with the writes replayed up to its seq.
"""

import json

import pytest

from conftest import (MIB, Drill, VmDisks, assert_point, create_vm, protect, wait_for)

NAME = "hc"
DISK = 16 * MIB
HOUR_S = 3600


def points_of(osr):
    return [assert_point(p, "point list") for p in osr.ok("point", "list", NAME)]


def covered(vm, osr, timeout=20):
    """Waits (no more writes) until the newest point holds every write made."""
    return wait_for(lambda: (lambda p: p if p and p[-1]["seq"] == vm.seq else None)(
        points_of(osr)), timeout, f"a point at seq {vm.seq}",
        detail=lambda: f"points: {points_of(osr)}\nitem: {osr.ok('item', 'show', NAME)}")


def era(vm, osr, batches, per_batch, max_len):
    """Writes in batches, each covered by a point before the next."""
    for _ in range(batches):
        vm.write(per_batch, max_len=max_len, weights=(8, 1, 1))
        covered(vm, osr)


def step_clock(env, osr, seconds):
    """Steps the wall clock and confirms it once the vault has seen the step."""
    env.clock.step(seconds)
    wait_for(lambda: osr.ok("point", "clock").get("held") is True, 15,
             f"the vault noticing a {seconds}s clock step")
    osr.ok("point", "confirm-clock")
    wait_for(lambda: osr.ok("point", "clock").get("held") is False, 10,
             "the hold ending after confirm-clock")


def store_json(env):
    path = env.qs.data_dir / "recovery" / "stores" / NAME / "store.json"
    return json.loads(path.read_text())


def journal_bytes(env):
    root = env.qs.data_dir / "recovery" / "stores" / NAME
    return sum(f.stat().st_size for d in ("journal", "history") if (root / d).is_dir()
               for f in (root / d).iterdir() if f.is_file())


@pytest.mark.faketime
@pytest.mark.deadline(300)
def test_thinning_then_compaction_keeps_every_kept_point_exact(env, rng):
    osr = env.osr
    osr.ok("policy", "create", "thin", "--crash-interval", "1s", "--retention", "24h")
    vm = env.track(VmDisks(create_vm(osr, NAME, [("d", "16M", DISK)]), rng))
    vm.write(4)
    protect(osr, NAME, policy="thin")
    era(vm, osr, batches=3, per_batch=4, max_len=256 * 1024)
    era0_last = points_of(osr)[-1]

    step_clock(env, osr, HOUR_S)
    era(vm, osr, batches=12, per_batch=30, max_len=MIB)  # about 150 MiB
    era1_last = points_of(osr)[-1]
    raw = journal_bytes(env)
    assert raw > 96 * MIB, f"era 1 wrote only {raw} bytes of journal: no whole segment"

    step_clock(env, osr, HOUR_S)
    era(vm, osr, batches=3, per_batch=4, max_len=256 * 1024)
    step_clock(env, osr, 5 * 60)
    era(vm, osr, batches=3, per_batch=4, max_len=256 * 1024)

    # Thinning: of eras 0 and 1 (over an hour older than the newest point), the last
    # crash point of each hour stays.
    pts = points_of(osr)
    old = [p for p in pts if p["seq"] <= era1_last["seq"]]
    assert [p["id"] for p in old] == [era0_last["id"], era1_last["id"]], \
        f"thinning left {old}, expected the last points of eras 0 and 1"

    # The vault asked for a compaction (the site runs it in the background): store.json
    # names its history once it is done, and the journal shrank.
    def compacted():
        c = store_json(env).get("compaction")
        return c if isinstance(c, dict) and c.get("through", 0) > 0 else None
    c = wait_for(compacted, 60, "the recovery store's history compacted",
                 detail=lambda: f"store.json: {store_json(env)}\n"
                                f"item: {osr.ok('item', 'show', NAME)}")
    # Through a point of era 1: an intermediate one when the vault asked while era 1 was
    # still partly within the hour, or its last one when it asked after (a slow machine).
    assert era0_last["seq"] < c["through"] <= era1_last["seq"], c
    after = journal_bytes(env)
    print(f"journal and history: {raw} bytes after era 1, {after} after compaction; {c}")
    assert after < raw / 2, f"the compaction left {after} of {raw} bytes"
    item = osr.ok("item", "show", NAME)
    assert item["health"] == "Normal", item

    # Every point left, as a drill, equals the writes replayed up to its seq.
    for p in points_of(osr):
        job = osr.job_ok("test-failover", NAME, "--point", str(p["id"]),
                         job_type="test-failover")
        got = assert_point(job.get("point"), "drill point")
        assert got["id"] == p["id"], (got, p)
        drill = env.track(Drill(job, vm, vm.at(p["seq"]), rng))
        drill.assert_matches(f"drill at point {p['id']} (seq {p['seq']}, after compaction "
                             f"through {c['through']})")
        drill.close()
        osr.job_ok("test-failover-cleanup", NAME, job_type="test-failover-cleanup")
