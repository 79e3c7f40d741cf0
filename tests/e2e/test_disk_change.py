"""Issue 13: a protected VM's disk grows and a disk is added while it is written. Each
change is one seq of the capture order (a disk-size record, docs/formats.md): recovery
points before it show the disks as they were (the old size; no added disk), points after
it the new ones, byte for byte against a model of every write; a failover at a point
before the change brings the VM up with its old disks."""

import json

from conftest import (MIB, VmDisks, assert_point, close_handle, connect, create_vm, protect,
                      read_uri)
from osrtest import apply_model, assert_same_bytes


class ChangingDisks(VmDisks):
    """VmDisks whose disks grow and are added: a change takes a seq as a write does."""

    def __init__(self, vm_json, rng):
        super().__init__(vm_json, rng)
        self.initial = dict(self.sizes)

    def change(self, name, size):
        if name in self.sizes:
            assert size > self.sizes[name]
        else:
            self.names.append(name)
        self.sizes[name] = size
        self.ops.append((name, "size", size, 0, None))
        return self.seq

    def at(self, seq=None):
        seq = self.seq if seq is None else seq
        disks = {n: bytearray(size) for n, size in self.initial.items()}
        for name, kind, off, length, data in self.ops[:seq]:
            if kind == "size":
                disks.setdefault(name, bytearray())
                disks[name] += bytes(off - len(disks[name]))
                continue
            apply_model(disks[name], kind, off, length, data)
        return disks


def sizes_of(disks_json):
    return {d["name"]: d["size_bytes"] for d in disks_json}


def assert_exports(disks_json, want, what):
    """Every disk of the job (name, URI) is an export of exactly the model's size and bytes."""
    got = {d["name"]: d["uri"] for d in disks_json}
    assert sorted(got) == sorted(want), f"{what}: disks {sorted(got)}, the model has {sorted(want)}"
    for name, data in want.items():
        h = connect(got[name])
        try:
            size = h.get_size()
        finally:
            close_handle(h)
        assert size == len(data), f"{what}: disk {name} has {size} bytes, the model {len(data)}"
        assert_same_bytes(read_uri(got[name], size), bytes(data), f"{what}: disk {name}")


def refused_change(osr, why):
    """A grow and an add of vm1 are refused (409, naming `why`), its disks unchanged."""
    before = osr.ok("vm", "show", "vm1")["disks"]
    for args in (("resize", "vm1", "os", "64M"), ("add", "vm1", "extra:1M")):
        proc = osr.run("vm", "disk", *args)
        assert proc.returncode != 0, f"osr vm disk {' '.join(args)} was taken: {proc.stdout}"
        assert "cannot change now" in proc.stderr and why in proc.stderr, (args, proc.stderr)
    assert osr.ok("vm", "show", "vm1")["disks"] == before, "a refused change changed the disks"


def test_disks_grow_and_are_added_while_protected(env, rng):
    osr = env.osr
    vm_json = create_vm(osr, "vm1", [("os", "8M", 8 * MIB)])
    vm = env.track(ChangingDisks(vm_json, rng))
    vm.write(20)
    protect(osr, "vm1")
    vm.write(20)
    before = assert_point(osr.ok("point", "create", "vm1"), "point before the changes")
    assert before["seq"] == vm.seq, (before, vm.seq)
    model_before = vm.at(before["seq"])

    # Grow os while protected: the answer names the record's seq, the next of the order.
    grown = osr.ok("vm", "disk", "resize", "vm1", "os", "12M")
    assert grown.get("seq") == vm.seq + 1, (grown, vm.seq)
    vm.change("os", 12 * MIB)
    assert sizes_of(grown["vm"]["disks"]) == {"os": 12 * MIB}, grown
    vm.close()  # a new connection sees the new size (NBD fixes it per connection)
    vm.write(20, max_len=512 * 1024)
    # Writes past the old end land (the model's random ops cover the whole new size).
    vm.write(1, max_len=4096)
    tail = bytes(rng.randbytes(4096))
    vm.handle("os").pwrite(tail, 12 * MIB - 4096)
    vm.ops.append(("os", "write", 12 * MIB - 4096, 4096, tail))

    # Add a disk: empty, replicated from its record on.
    added = osr.ok("vm", "disk", "add", "vm1", "data:4M")
    assert added.get("seq") == vm.seq + 1, (added, vm.seq)
    vm.change("data", 4 * MIB)
    assert sizes_of(added["vm"]["disks"]) == {"os": 12 * MIB, "data": 4 * MIB}, added
    vm.set_uris(added["vm"])
    vm.write(30)
    vm.flush()
    after = assert_point(osr.ok("point", "create", "vm1"), "point after the changes")
    assert after["seq"] == vm.seq, (after, vm.seq)

    # Refusals, nothing changed: shrink, same size, add of a name it has, grow of one it
    # has not, a size that is not one.
    for args, says in ((("resize", "vm1", "os", "4M"), "a disk only grows"),
                       (("resize", "vm1", "os", "12M"), "a disk only grows"),
                       (("add", "vm1", "os:16M"), "has a disk named os already"),
                       (("resize", "vm1", "nosuch", "16M"), "has no disk named nosuch"),
                       (("add", "vm1", "x:12Q"), None), (("add", "vm1", "b@d:1M"), None),
                       (("add", "nosuchvm", "d:1M"), "nosuchvm"),
                       # A name is only a name: it goes into the site's URL path.
                       (("add", "vm1", "data?:1M"), None), (("add", "vm1", "os#x:1M"), None),
                       (("add", "vm1", "a/b:1M"), None), (("add", "vm1", "..:1M"), None)):
        proc = osr.run("vm", "disk", *args)
        assert proc.returncode != 0, f"osr vm disk {' '.join(args)} was taken: {proc.stdout}"
        assert proc.stderr.strip(), f"osr vm disk {' '.join(args)}: no error message"
        if says:
            assert says in proc.stderr, (args, proc.stderr)
    assert sizes_of(osr.ok("vm", "show", "vm1")["disks"]) == {"os": 12 * MIB, "data": 4 * MIB}

    # Drills at each point: the disks as they were then.
    for point, what in ((before, "before"), (after, "after")):
        job = osr.job_ok("test-failover", "vm1", "--point", point["id"], "--no-start",
                         job_type="test-failover")
        assert_exports(job["disks"], vm.at(point["seq"]), f"drill at the point {what}")
        # Its console is refused: a drill of disks only runs no VM.
        proc = osr.run("vm", "console", "vm1", "--drill")
        assert proc.returncode != 0 and "runs no VM" in proc.stderr, (proc.stdout, proc.stderr)
        osr.job_ok("test-failover-cleanup", "vm1", job_type="test-failover-cleanup")

    # The primary kept everything.
    for name, data in vm.at().items():
        assert_same_bytes(read_uri(vm.uris[name], len(data)), bytes(data), f"primary {name}")
    vm.close()

    # Its plan says so first: the disks of that point are the whole the space check sizes,
    # and what the VM has now and the point lacks is listed.
    proc = osr.run("failover", "vm1", "--point", before["id"], "--dry-run")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    plan = json.loads(proc.stdout)["plan"]
    space = [c for c in plan["checks"] if c["name"] == "space"]
    assert space and space[0]["full_bytes"] == 8 * MIB, plan
    assert "disk data (4.0 MiB): not at that point (added after it); the VM runs without it " \
           "there" in plan["deletes"], plan
    assert "disk os: 8.0 MiB at that point, 12.0 MiB now (grown after it); the VM runs on the " \
           "smaller one there" in plan["deletes"], plan
    # At the point after them: nothing lost.
    plan = json.loads(osr.run("failover", "vm1", "--point", after["id"], "--dry-run").stdout)
    assert not [d for d in plan["plan"]["deletes"] if d.startswith("disk ")], plan

    # Failover to the point before the changes: the VM runs on its old disks. Change-point
    # to the one after them and back: the VM's disks follow the point each time.
    job = osr.job_ok("failover", "vm1", "--point", before["id"], job_type="failover")
    assert_exports(job["disks"], model_before, "failover at the point before the changes")
    shown = osr.ok("vm", "show", "vm1")
    assert shown.get("site") == "recovery", shown
    assert sizes_of(shown["disks"]) == {"os": 8 * MIB}, shown
    job = osr.job_ok("change-point", "vm1", "--point", after["id"], job_type="change-point")
    assert_exports(job["disks"], vm.at(after["seq"]), "change-point to the point after")
    assert sizes_of(osr.ok("vm", "show", "vm1")["disks"]) == {"os": 12 * MIB, "data": 4 * MIB}
    job = osr.job_ok("change-point", "vm1", "--point", before["id"], job_type="change-point")
    assert_exports(job["disks"], model_before, "change-point back to the point before")
    assert sizes_of(osr.ok("vm", "show", "vm1")["disks"]) == {"os": 8 * MIB}
    # On failover disks the disks do not change (commit first), nothing changed.
    refused_change(osr, "commit first")

    # Commit, then reprotect: the old primary's disks (grown, one more) are not the VM's
    # now, so they are copied in full; the replica there then holds the VM's disks.
    osr.job_ok("commit", "vm1", job_type="commit")
    # Committed, its changes tracked for reprotect: no disk change before reprotect.
    refused_change(osr, "reprotect first")
    # The plan says so first: a full copy, the old disks deleted, space for the disks.
    proc = osr.run("reprotect", "vm1", "--dry-run")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    plan = json.loads(proc.stdout)["plan"]
    assert plan["site"] == "primary" and plan["ok"], plan
    assert "a full (sparse) copy" in plan["creates"][0], plan
    assert "are not the VM's now" in plan["creates"][0], plan
    assert plan["deletes"] == ["disks of vm1 at primary: os (12.0 MiB), data (4.0 MiB)"], plan
    space = [c for c in plan["checks"] if c["name"] == "space"]
    assert space and space[0]["result"] == "passed", plan
    assert sizes_of(osr.ok("vm", "show", "vm1")["disks"]) == {"os": 8 * MIB}, "the plan changed"
    job = osr.job_ok("reprotect", "vm1", job_type="reprotect")
    assert job.get("mode") == "full", f"reprotect mode: {job}"
    item = osr.ok("item", "show", "vm1")
    assert item.get("state") == "Protected" and item.get("target") == "primary", item
    running = sizes_of(osr.ok("vm", "show", "vm1")["disks"])
    assert running == {"os": 8 * MIB}, running
    # Protected again, but the recovery site still serves the disks commit copied through
    # the failover layer until its daemon restarts (docs/api.md): refused, saying so.
    refused_change(osr, "until the site restarts")
    point = assert_point(osr.ok("point", "create", "vm1"), "point after reprotect")
    job = osr.job_ok("test-failover", "vm1", "--point", point["id"], "--no-start",
                     job_type="test-failover")
    assert_exports(job["disks"], model_before, "drill at the old primary after reprotect")
    osr.job_ok("test-failover-cleanup", "vm1", job_type="test-failover-cleanup")
