"""Issue 10, case 1: one VM's damaged files never take a site down.

A quickstart with three VMs. One VM's image is changed outside osr while the quickstart
is stopped (grown, moved away, its capture history damaged): the quickstart starts, the
healthy VMs are served with their bytes, the damaged one is quarantined with its reason
and what to do (the item's health, `vm repair`), and the operator's action repairs it.
"""

import os
import shutil
import subprocess

from conftest import (MIB, Drill, VmDisks, assert_disks, create_vm, protect, wait_for)

DISK = 16 * MIB


def group_dir(env, site, vm):
    return env.qs.data_dir / site / "groups" / vm


def health(env, vm):
    return env.osr.ok("item", "show", vm).get("health", "")


def three_vms(env, rng):
    osr = env.osr
    vms = []
    for name in ("ok1", "bad", "ok2"):
        v = env.track(VmDisks(create_vm(osr, name, [("d", "16M", DISK)]), rng))
        v.name = name
        v.write(10)
        v.flush()
        vms.append(v)
    protect(osr, "bad")
    protect(osr, "ok1")
    return vms


def wait_for_mark(env, v):
    """Waits for the resync under way to end at its mark (no write came during it) and
    counts the mark's seq in the model."""
    def marked():
        return env.osr.ok("item", "show", v.name).get("durable_seq") == v.seq + 1
    wait_for(marked, 60, f"{v.name}'s resync to end at a mark",
             detail=lambda: env.osr.ok("item", "show", v.name))
    v.mark()


def assert_served(env, vms):
    for v in vms:
        assert_disks(v.read_primary(), v.at(), f"{v.name} after the restart")


def test_grown_image_is_quarantined_and_trimmed_back(env, rng):
    osr = env.osr
    ok1, bad, ok2 = three_vms(env, rng)
    for v in (ok1, bad, ok2):
        v.close()
    env.qs.stop_clean()
    img = group_dir(env, "primary", "bad") / "d.img"
    subprocess.run(["truncate", "-s", str(DISK + 32 * MIB), str(img)], check=True)
    env.qs.restart()
    for v in (ok1, ok2):
        v.set_uris(osr.ok("vm", "show", v.name))
    assert_served(env, [ok1, ok2])

    h = health(env, "bad")
    assert h.startswith("Critical: bad's disks at primary are quarantined"), h
    assert f"has {DISK + 32 * MIB} bytes, not the disk's {DISK}" in h, h
    assert "--trim-image" in h, h
    site = osr.ok("site", "list")
    assert any(s.get("name") == "primary" for s in site), site
    # The other items stay healthy.
    assert health(env, "ok1") in ("Normal",) or health(env, "ok1").startswith("Warning"), \
        health(env, "ok1")

    # A plain repair does not guess: the image is still the wrong size.
    msg = osr.fails("vm", "repair", "bad", "--site", "primary")
    assert "still quarantined" in msg and "not the disk's" in msg, msg
    # Data past the disk's end is never cut away.
    with open(img, "r+b") as f:
        f.seek(DISK + 5 * MIB)
        f.write(b"x")
    msg = osr.fails("vm", "repair", "bad", "--site", "primary", "--trim-image")
    assert f"holds data at byte {DISK + 5 * MIB}" in msg, msg
    assert os.path.getsize(img) == DISK + 32 * MIB
    with open(img, "r+b") as f:
        f.seek(DISK + 5 * MIB)
        f.write(b"\0")
    out = osr.ok("vm", "repair", "bad", "--site", "primary", "--trim-image")
    assert out["repaired"][0]["site"] == "primary", out
    assert os.path.getsize(img) == DISK
    bad.set_uris(osr.ok("vm", "show", "bad"))
    assert_disks(bad.read_primary(), bad.at(), "bad after its repair")
    wait_for(lambda: not health(env, "bad").startswith("Critical"), 30,
             "bad's health after the repair", detail=lambda: health(env, "bad"))
    # Its times changed outside osr: the disk is resent whole, and with no write during
    # that copy it ends at a mark (a seq of its own, docs/formats.md).
    wait_for_mark(env, bad)
    # And it replicates again: a new write reaches a new point.
    bad.write(5)
    bad.flush()
    p = osr.ok("point", "create", "bad")
    assert p["seq"] == bad.seq, (p, bad.seq)


def test_missing_image_and_damaged_history(env, rng):
    osr = env.osr
    ok1, bad, ok2 = three_vms(env, rng)
    for v in (ok1, bad, ok2):
        v.close()
    env.qs.stop_clean()
    gdir = group_dir(env, "primary", "ok2")
    shutil.move(gdir / "d.img", env.qs.data_dir / "ok2-d.img.moved")
    # The protected VM's capture history: a bitmap that is not one.
    bitmaps = list((group_dir(env, "primary", "bad") / "capture").glob("dirty-*.bitmap"))
    assert bitmaps, list((group_dir(env, "primary", "bad") / "capture").iterdir())
    bitmaps[0].write_bytes(b"not a bitmap")
    env.qs.restart()
    ok1.set_uris(osr.ok("vm", "show", "ok1"))
    assert_served(env, [ok1])

    h = health(env, "bad")
    assert h.startswith("Critical: bad's disks at primary are quarantined"), h
    assert "--reset-history" in h, h
    shown = osr.ok("vm", "show", "ok2")
    assert "quarantined" in shown.get("site_error", "") and "is missing" in shown["site_error"], \
        shown
    assert shown["disks"][0]["uri"] is None, shown

    # Put the image back: a plain repair serves it again, bytes intact.
    shutil.move(env.qs.data_dir / "ok2-d.img.moved", gdir / "d.img")
    osr.ok("vm", "repair", "ok2")
    ok2.set_uris(osr.ok("vm", "show", "ok2"))
    assert_disks(ok2.read_primary(), ok2.at(), "ok2 after its repair")

    # The history: set aside (kept), the disks resent whole; the points are right again.
    out = osr.ok("vm", "repair", "bad", "--reset-history")
    assert out["repaired"][0]["result"]["history_lost"] is True, out
    aside = [p.name for p in group_dir(env, "primary", "bad").iterdir()
             if p.name.startswith("damaged-")]
    assert aside, "the damaged history was not kept"
    bad.set_uris(osr.ok("vm", "show", "bad"))
    wait_for_mark(env, bad)
    bad.write(5)
    bad.flush()
    wait_for(lambda: health(env, "bad") == "Normal", 60, "bad resynchronised",
             detail=lambda: health(env, "bad"))
    p = osr.ok("point", "create", "bad")
    assert p["seq"] == bad.seq, (p, bad.seq)
    job = osr.job_ok("test-failover", "bad", "--point", p["id"], job_type="test-failover")
    drill = env.track(Drill(job, bad, bad.at(p["seq"]), rng))
    drill.assert_matches("drill after the history was reset")
    drill.close()
    osr.job_ok("test-failover-cleanup", "bad", job_type="test-failover-cleanup")


def test_a_failed_over_vm_with_a_damaged_map_says_so_and_change_point_recovers(env, rng):
    """The failed-over disks' region map (.img.cow) is damaged while the quickstart is
    stopped: the item's health is the quarantine (not "the VM runs at recovery"), and the
    action it names — opening the disks again at a point — works."""
    osr = env.osr
    v = env.track(VmDisks(create_vm(osr, "fo", [("d", "16M", DISK)]), rng))
    v.name = "fo"
    v.write(10)
    v.flush()
    protect(osr, "fo")
    p = osr.ok("point", "create", "fo")
    assert p["seq"] == v.seq, (p, v.seq)
    v.close()
    osr.job_ok("failover", "fo", "--point", p["id"], job_type="failover")
    env.qs.stop_clean()
    cows = list(group_dir(env, "recovery", "fo").glob("*.cow"))
    assert cows, list(group_dir(env, "recovery", "fo").iterdir())
    with open(cows[0], "r+b") as f:
        f.seek(40)
        f.write(b"ZZZZ")
    env.qs.restart()
    h = health(env, "fo")
    assert h.startswith("Critical: fo's disks at recovery are quarantined"), h
    assert "osr change-point fo --point POINT" in h, h
    osr.job_ok("change-point", "fo", "--point", p["id"], job_type="change-point")
    wait_for(lambda: not health(env, "fo").startswith("Critical"), 30,
             "fo's health after change-point", detail=lambda: health(env, "fo"))
    assert health(env, "fo").startswith("Warning: not protected"), health(env, "fo")
    v.set_uris(osr.ok("vm", "show", "fo"))
    assert_disks(v.read_primary(), v.at(p["seq"]), "fo's disks after change-point")
