"""Protect a VM, make a recovery point, run a DR drill on it and clean it up — all through
the `osr` CLI against a real quickstart, with every byte checked through libnbd."""

import time

import pytest

from conftest import (MIB, Drill, VmDisks, assert_disks, assert_point, close_handle, connect,
                      create_vm, parse_time_ns, protect, read_handle, require_libnbd)


def item_show(osr, name):
    item = osr.ok("item", "show", name)
    assert item.get("name") == name, item
    return item


def test_protect_points_drill(env, rng):
    nbd = require_libnbd()
    osr = env.osr

    # A VM with two disks at the primary site.
    vm_json = create_vm(osr, "vm1", [("os", "64M", 64 * MIB), ("data", "16M", 16 * MIB)])
    listed = osr.ok("vm", "list")
    assert [v.get("name") for v in listed] == ["vm1"], listed
    assert listed[0].get("site") == "primary", listed
    vm = env.track(VmDisks(vm_json, rng))

    # Model A: written before protection; the initial replication must carry all of it.
    vm.write(40)
    vm.flush()
    seq_a = vm.seq
    assert osr.ok("item", "list") == [], "an item exists before protection"

    before = time.time_ns()
    protect(osr, "vm1")

    item = item_show(osr, "vm1")
    assert item.get("state") == "Protected", item
    assert item.get("source") == "primary", item
    assert item.get("target") == "recovery", item
    assert item.get("policy") == "default", item
    assert item.get("health") == "Normal", item
    rpo = item.get("rpo_seconds")
    assert isinstance(rpo, (int, float)) and not isinstance(rpo, bool) and rpo >= 0, item
    assert "drill" not in item, item
    first = assert_point(item.get("latest_point"), "latest_point after protect")
    assert first["seq"] == seq_a, \
        f"the first point holds seq {first['seq']}, but {seq_a} writes were made before protect"
    assert item.get("last_seq") == seq_a and item.get("durable_seq") == seq_a, item
    listed = osr.ok("item", "list")
    assert [i.get("name") for i in listed] == ["vm1"], listed
    assert listed[0].get("state") == "Protected", listed

    # Model B: more writes, then a point that must hold exactly all of them.
    vm.write(40)
    seq_b = vm.seq
    point = assert_point(osr.ok("point", "create", "vm1"), "point create")
    assert point["type"] == "crash", point
    assert point["seq"] == seq_b, \
        f"point create: seq {point['seq']}, but {seq_b} writes were acknowledged before it"
    assert point["id"] > first["id"], (first, point)
    t_point = parse_time_ns(point["time"])
    assert parse_time_ns(first["time"]) <= t_point, (first, point)
    assert abs(t_point - time.time_ns()) < 60 * 10**9 and t_point >= before - 60 * 10**9, \
        f"point time {point['time']} is far from now"
    points = osr.ok("point", "list", "vm1")
    assert isinstance(points, list) and points, points
    for p in points:
        assert_point(p, "point list")
    assert points[-1] == point, f"the new point is not the newest: {points}"
    assert points[0] == first, f"the first point changed: {points}"
    ids = [p["id"] for p in points]
    assert ids == sorted(set(ids)), f"point ids not increasing: {points}"
    seqs = [p["seq"] for p in points]
    assert seqs == sorted(seqs), f"point seqs not in order: {points}"
    item = item_show(osr, "vm1")
    assert item.get("latest_point") == point, item
    assert item.get("last_seq") == seq_b and item.get("durable_seq") == seq_b, item
    assert item.get("rpo_seconds") == 0, f"caught up, yet rpo_seconds is not 0: {item}"
    model_b = vm.at(seq_b)

    # The drill at that point: writable disks that hold exactly model B.
    job = osr.job_ok("test-failover", "vm1", "--point", point["id"], job_type="test-failover")
    assert job.get("vm") == "vm1", job
    assert job.get("point") == point, f"the drill is not at point {point['id']}: {job}"
    drill = env.track(Drill(job, vm, model_b, rng))
    item = item_show(osr, "vm1")
    assert item.get("state") == "TestFailoverCompleted", item
    drill.assert_matches("drill at the point")

    # Writes to the drill are allowed; new writes at the primary must not reach the drill.
    drill.write(25)
    vm.write(30)
    point2 = assert_point(osr.ok("point", "create", "vm1"), "point create during the drill")
    assert point2["seq"] == vm.seq, (point2, vm.seq)   # the recovery site has them all now
    drill.assert_matches("drill after drill and primary writes (its own connection)",
                         fresh=False)
    drill.assert_matches("drill after drill and primary writes (a new connection)")
    assert_disks(vm.read_primary(), vm.at(), "primary disks after the drill writes")
    item = item_show(osr, "vm1")
    assert item.get("state") == "TestFailoverCompleted", item

    # Cleanup: back to Protected; the drill disks are gone, with their writes.
    old_uris = dict(drill.uris)
    old_handle = drill.handle("os")
    cleanup = osr.job_ok("test-failover-cleanup", "vm1", "--notes", "x",
                         job_type="test-failover-cleanup")
    assert cleanup.get("vm") == "vm1", cleanup
    assert cleanup.get("notes") == "x", f"the cleanup job does not keep its notes: {cleanup}"
    item = item_show(osr, "vm1")
    assert item.get("state") == "Protected", item
    assert "drill" not in item or item["drill"] is None, item
    with pytest.raises(nbd.Error):
        read_handle(old_handle, 64 * MIB, "the removed drill disk os (connection from before)")
    drill.close()
    for name, uri in old_uris.items():
        h = None
        with pytest.raises(nbd.Error):
            h = connect(uri)
            h.pread(4096, 0)
        if h is not None:
            close_handle(h)

    # A second drill at the same point: model B again, without the first drill's writes.
    job = osr.job_ok("test-failover", "vm1", "--point", point["id"], job_type="test-failover")
    assert job.get("point") == point, job
    again = env.track(Drill(job, vm, model_b, rng))
    again.assert_matches("second drill at the same point")
    again.close()
    osr.job_ok("test-failover-cleanup", "vm1", "--notes", "second",
               job_type="test-failover-cleanup")
    assert item_show(osr, "vm1").get("state") == "Protected"

    # The primary kept every write.
    assert_disks(vm.read_primary(), vm.at(), "primary disks at the end")
