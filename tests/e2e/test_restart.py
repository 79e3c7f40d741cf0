"""The quickstart stopped (SIGTERM, exit 0) and started again on the same --dir: the VMs,
the protected item, its points and jobs come back, replication resumes, and the points
(old and new) open with the right bytes."""

from conftest import (MIB, Drill, VmDisks, assert_disks, assert_point, create_vm, protect,
                      wait_for)


def vm_shape(vms):
    """VMs without their URIs (the sites' NBD ports are new after a restart)."""
    return [{"name": v.get("name"), "site": v.get("site"),
             "disks": [(d.get("name"), d.get("size_bytes")) for d in v.get("disks", [])]}
            for v in vms]


def drill_check(env, vm, rng, point, what):
    osr = env.osr
    job = osr.job_ok("test-failover", "vm1", "--point", point["id"], job_type="test-failover")
    assert job.get("point") == point, f"{what}: {job}"
    drill = env.track(Drill(job, vm, vm.at(point["seq"]), rng))
    drill.assert_matches(f"{what}: drill at point {point['id']} (seq {point['seq']})")
    drill.close()
    osr.job_ok("test-failover-cleanup", "vm1", job_type="test-failover-cleanup")
    assert osr.ok("item", "show", "vm1").get("state") == "Protected"


def test_quickstart_restart(env, rng):
    osr, qs = env.osr, env.qs
    vm = env.track(VmDisks(create_vm(osr, "vm1", [("os", "32M", 32 * MIB),
                                                  ("data", "8M", 8 * MIB)]), rng))
    create_vm(osr, "vm2", [("os", "4M", 4 * MIB)])
    vm.write(20)
    protect(osr, "vm1")
    vm.write(20)
    vm.flush()
    point = assert_point(osr.ok("point", "create", "vm1"), "point before the restart")
    assert point["seq"] == vm.seq, (point, vm.seq)

    vms_before = osr.ok("vm", "list")
    item_before = osr.ok("item", "show", "vm1")
    points_before = osr.ok("point", "list", "vm1")
    jobs_before = osr.ok("job", "list")
    assert item_before.get("state") == "Protected", item_before
    assert points_before[-1] == point, points_before

    vm.close()
    qs.stop_clean()
    qs.restart()

    assert vm_shape(osr.ok("vm", "list")) == vm_shape(vms_before), "vm list after the restart"
    vm1 = osr.ok("vm", "show", "vm1")
    for d in vm1["disks"]:
        assert isinstance(d.get("uri"), str) and d["uri"].startswith("nbd://127.0.0.1:"), vm1
    vm.set_uris(vm1)
    sites = {s["name"]: s for s in osr.ok("site", "list")}
    assert sites.get("primary", {}).get("reachable") is True, sites
    assert sites.get("recovery", {}).get("reachable") is True, sites

    item = osr.ok("item", "show", "vm1")
    for k in ("name", "state", "source", "target", "policy", "epoch", "latest_point"):
        assert item.get(k) == item_before.get(k), f"item {k} after the restart: {item}"
    assert osr.ok("point", "list", "vm1") == points_before, "point list after the restart"
    jobs_after = {j["id"]: j for j in osr.ok("job", "list")}
    for j in jobs_before:
        got = jobs_after.get(j["id"])
        assert got is not None and (got["type"], got["state"]) == (j["type"], j["state"]), \
            f"job {j['id']} after the restart: {got}"

    # The primary disks kept every write; the old point still opens with its bytes.
    assert_disks(vm.read_primary(), vm.at(), "primary disks after the restart")
    drill_check(env, vm, rng, point, "old point after the restart")

    # Replication resumes on its own.
    last = {}

    def normal():
        last["item"] = osr.ok("item", "show", "vm1")
        return last["item"].get("health") == "Normal"

    wait_for(normal, 15, "health Normal after the restart", detail=lambda: last.get("item"))

    # New writes replicate: a new point holds them all (the sequence goes on).
    vm.write(25)
    new = assert_point(osr.ok("point", "create", "vm1"), "point after the restart")
    assert new["seq"] == vm.seq and new["id"] > point["id"], (point, new, vm.seq)
    item = osr.ok("item", "show", "vm1")
    assert item.get("last_seq") == vm.seq and item.get("durable_seq") == vm.seq, item
    drill_check(env, vm, rng, new, "new point after the restart")
