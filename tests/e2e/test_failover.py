"""Failover, change-point, commit, reprotect and failback through the `osr` CLI against a
real quickstart, with every byte checked through libnbd against a model of every write and
its capture sequence number (DESIGN.md invariants 5-7, "Item states").

The model: the bytes of a VM's disks are a base (all zeros, or what they held when a new
sequence began: after failover, or at reprotect, whose sequence starts again at 1 at the
new primary) plus the requests made since, in order: ops[i] got seq i+1 of the current
sequence, so at(point seq) is a point's bytes. The writes of the VM process itself (its
marker block at the end of each disk) are in the model too, where they happened.
"""

import errno
import json
import re
import shlex
import time

import pytest

from conftest import (KIB, MIB, Drill, apply_model, apply_op, assert_point, assert_same_bytes,
                      close_handle, connect, create_vm, protect, random_op, read_handle,
                      read_uri, require_libnbd, wait_for)

MARK = 4 * KIB            # the VM process's marker block: the last 4 KiB of each disk
MARK_AREA = 64 * KIB      # the tests' own writes stay below size - MARK_AREA
CHUNK = 4 * MIB

# The VM of test_full_cycle: a process (process driver) that, using libnbd, writes a marker
# block ('round N', its VM, disk and URI; N = the round it finds on the disk + 1) at the end
# of each disk it was given, flushes, logs a JSON line, and sleeps until SIGTERM.
VM_SCRIPT = r'''
import json, os, signal, sys, time
import nbd

LOG = sys.argv[1]
MARK = 4096


def note(**ev):
    ev["pid"] = os.getpid()
    with open(LOG, "a") as f:
        f.write(json.dumps(ev, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def marker(rnd, vm, disk, uri):
    text = f"osr-e2e-vm round={rnd} vm={vm} disk={disk} uri={uri}\n".encode()
    return text + bytes(MARK - len(text))


def on_term(signum, frame):
    note(event="stop")
    os._exit(0)


signal.signal(signal.SIGTERM, on_term)
vm = os.environ["OSR_VM"]
uris = os.environ["OSR_DISKS"].split()
disks = []
for uri in uris:
    name = uri.rsplit("/", 1)[1]
    disks.append((name, uri, os.environ.get("OSR_DISK_" + name.upper())))
note(event="start", vm=vm, disks=[[n, u] for n, u, _ in disks],
     env_disks={n: e for n, _, e in disks})
handles = []
rounds = {}
for name, uri, _ in disks:
    h = nbd.NBD()
    h.set_handle_name("osr-e2e-vm")
    h.connect_uri(uri)
    size = h.get_size()
    old = bytes(h.pread(MARK, size - MARK))
    m = old[:200].split(b"\n")[0].split()
    rnd = 1
    if len(m) > 1 and m[0] == b"osr-e2e-vm" and m[1].startswith(b"round="):
        rnd = int(m[1][len(b"round="):]) + 1
    h.pwrite(marker(rnd, vm, name, uri), size - MARK)
    h.flush()
    rounds[name] = rnd
    handles.append(h)
note(event="ready", vm=vm, disks=[[n, u] for n, u, _ in disks], rounds=rounds)
ppid = os.getppid()
deadline = time.monotonic() + 300
while os.getppid() == ppid and time.monotonic() < deadline:
    time.sleep(0.2)
note(event="orphaned")
'''


def vm_marker(rnd, vm, disk, uri):
    """The marker block VM_SCRIPT writes (same format)."""
    text = f"osr-e2e-vm round={rnd} vm={vm} disk={disk} uri={uri}\n".encode()
    return text + bytes(MARK - len(text))


# -- the model ------------------------------------------------------------------------------


class Model:
    """{disk: bytes} as a base plus the requests made since (ops[i] is seq i+1)."""

    def __init__(self, sizes, base=None):
        self.sizes = dict(sizes)
        self.names = list(sizes)
        self.base = None if base is None else {n: bytes(base[n]) for n in self.names}
        self.ops = []

    @property
    def seq(self):
        return len(self.ops)

    def add(self, name, kind, off, length, data):
        self.ops.append((name, kind, off, length, data))

    def at(self, seq=None):
        seq = self.seq if seq is None else seq
        assert 0 <= seq <= self.seq, f"seq {seq} is beyond the {self.seq} requests made"
        disks = {n: bytearray(self.base[n]) if self.base else bytearray(self.sizes[n])
                 for n in self.names}
        for name, kind, off, length, data in self.ops[:seq]:
            apply_model(disks[name], kind, off, length, data)
        return disks


class Vm:
    """A VM's disks where it runs now (URIs from `osr vm show`), written one request at a
    time through libnbd (each reply awaited before the next request), and its model."""

    def __init__(self, osr, name, rng):
        self.osr = osr
        self.name = name
        self.rng = rng
        shown = osr.ok("vm", "show", name)
        self.sizes = {d["name"]: d["size_bytes"] for d in shown["disks"]}
        self.names = list(self.sizes)
        self.model = Model(self.sizes)
        self.uris = {}
        self.handles = {}
        self.refresh()

    def refresh(self):
        """The URIs of `osr vm show` (where the VM runs now); returns the JSON."""
        shown = self.osr.ok("vm", "show", self.name)
        assert [(d["name"], d["size_bytes"]) for d in shown["disks"]] == list(self.sizes.items()), \
            f"vm show: the disks changed: {shown}"
        self.close()
        self.uris = {d["name"]: d["uri"] for d in shown["disks"]}
        return shown

    def handle(self, name):
        if name not in self.handles:
            self.handles[name] = connect(self.uris[name])
        return self.handles[name]

    def write(self, n, max_len=256 * KIB, weights=(8, 1, 1)):
        """n random requests (writes mostly, some zeroes and trims; the last a write) below
        the marker area; returns the seq after them."""
        for i in range(n):
            name = self.rng.choice(self.names)
            op = random_op(self.rng, self.sizes[name] - MARK_AREA, max_len=max_len,
                           weights=weights if i < n - 1 else (1, 0, 0))
            apply_op(self.handle(name), *op)
            self.model.add(name, *op)
        return self.model.seq

    def rebase(self, seq):
        """A new sequence starts from the bytes at seq of the current one."""
        self.model = Model(self.sizes, base=self.model.at(seq))

    def read(self):
        return {n: read_uri(self.uris[n], self.sizes[n]) for n in self.names}

    def assert_disks(self, want, what):
        got = self.read()
        for n in self.names:
            assert_same_bytes(got[n], bytes(want[n]), f"{what}: disk {n} ({self.uris[n]})")

    def close(self):
        for h in self.handles.values():
            close_handle(h)
        self.handles = {}


# -- the VM process's log -------------------------------------------------------------------


class VmLog:
    def __init__(self, path):
        self.path = path

    def events(self):
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def wait(self, event, count, what, timeout=20):
        """Waits until the log has count events of that kind; returns the last one."""
        def got():
            evs = [e for e in self.events() if e["event"] == event]
            return evs[count - 1] if len(evs) >= count else None
        return wait_for(got, timeout, f"{what}: VM event {event!r} #{count}",
                        detail=lambda: self.events())

    def count(self, event):
        return sum(1 for e in self.events() if e["event"] == event)


def account_marker(vm, ready, rnd, site_nbd):
    """A 'ready' event of the VM: it ran on the disks of vm.uris (at the site whose NBD
    address is site_nbd), found round rnd-1 and wrote round rnd; its writes go into the
    model (they are part of the sequence where it ran)."""
    assert ready["vm"] == vm.name, ready
    assert [n for n, _ in ready["disks"]] == vm.names, f"VM disks {ready}"
    for n, uri in ready["disks"]:
        assert uri == vm.uris[n], f"the VM ran on {uri}, but vm show says {vm.uris[n]}: {ready}"
        assert uri.startswith(f"nbd://{site_nbd}/"), f"the VM ran on {uri}, not at {site_nbd}"
    assert ready["rounds"] == {n: rnd for n in vm.names}, \
        f"the VM found the wrong round on its disks (expected to write {rnd}): {ready}"
    for n, uri in ready["disks"]:
        vm.model.add(n, "write", vm.sizes[n] - MARK, MARK, vm_marker(rnd, vm.name, n, uri))


# -- catalog helpers ------------------------------------------------------------------------


def item_show(osr, name, state, source, target, epoch, running_site=None):
    item = osr.ok("item", "show", name)
    assert item.get("name") == name, item
    assert item.get("state") == state, f"item state: {item}"
    assert item.get("source") == source and item.get("target") == target, f"direction: {item}"
    assert item.get("direction") == f"{source} -> {target}", item
    assert item.get("epoch") == epoch, f"epoch: {item}"
    assert item.get("running_site") == (running_site or source), f"running_site: {item}"
    return item


def vm_show(osr, name, site, epoch, running=None):
    shown = osr.ok("vm", "show", name)
    assert shown.get("site") == site, f"vm show: site {shown}"
    assert shown.get("running_site") == site, f"vm show: running_site {shown}"
    assert shown.get("epoch") == epoch, f"vm show: epoch {shown}"
    if running is not None:
        assert shown.get("running") is running, f"vm show: running {shown}"
    return shown


def site_nbd(osr):
    return {s["name"]: s["nbd"] for s in osr.ok("site", "list")}


def check_disks_at(job, vm, nbd_addr, what):
    """A failover job's disks are the VM's disks, at the site of nbd_addr, as vm show says."""
    disks = job.get("disks")
    assert isinstance(disks, list) and [d.get("name") for d in disks] == vm.names, \
        f"{what}: job disks {job}"
    for d in disks:
        assert d["uri"] == vm.uris[d["name"]], f"{what}: job disk {d} vs vm show {vm.uris}"
        assert d["uri"].startswith(f"nbd://{nbd_addr}/"), f"{what}: disk {d} not at {nbd_addr}"


def check_failover(item, epoch, src, point, planned, store_seq):
    fo = item.get("failover")
    assert isinstance(fo, dict), f"no failover object: {item}"
    assert fo.get("epoch") == epoch and fo.get("from") == src, f"failover: {fo}"
    assert fo.get("planned") is planned, f"failover planned: {fo}"
    assert fo.get("point") == point, f"failover point {fo.get('point')} != {point}"
    if store_seq is not None:
        assert fo.get("store_seq") == store_seq, f"failover store_seq: {fo} (want {store_seq})"
    return fo


def drill(env, vm, point, expected, nbd_addr, what):
    """test-failover at point, disks only (--no-start: a drill VM would write to them): the
    drill disks (at the site of nbd_addr) hold expected; then cleanup, back to Protected."""
    osr = env.osr
    job = osr.job_ok("test-failover", vm.name, "--point", point["id"], "--no-start",
                     job_type="test-failover")
    assert job.get("point") == point, f"{what}: drill point {job}"
    assert osr.ok("item", "show", vm.name).get("state") == "TestFailoverCompleted"
    d = env.track(Drill(job, vm, expected, vm.rng))
    for uri in d.uris.values():
        assert uri.startswith(f"nbd://{nbd_addr}/"), f"{what}: drill disk {uri} not at {nbd_addr}"
    d.assert_matches(what)
    d.close()
    osr.job_ok("test-failover-cleanup", vm.name, job_type="test-failover-cleanup")
    assert osr.ok("item", "show", vm.name).get("state") == "Protected"


def check_found_exact(job, store_seq):
    """An exact reprotect after a failover where the old primary had sent everything: it
    names the seq the store had, and no record the old primary never sent."""
    found = job.get("found")
    assert isinstance(found, dict), f"reprotect: no found object: {job}"
    assert found.get("known_at_recovery_site_upto") == store_seq, \
        f"reprotect found {found}, but the store had every record up to {store_seq}"
    assert found.get("unreplicated_records") == 0 and found.get("unreplicated_bytes") == 0, \
        f"reprotect found records the old primary never sent, but it sent all: {found}"
    assert isinstance(found.get("why"), str) and found["why"], found


def covered(ops):
    """The bytes of the disks that ops touch, each byte counted once."""
    total = 0
    for disk in {op[0] for op in ops}:
        ranges = sorted((off, off + length) for name, _k, off, length, _d in ops if name == disk)
        end = 0
        for a, b in ranges:
            if b > end:
                total += b - max(a, end)
                end = b
    return total


def expect_eperm(fn, what):
    nbd = require_libnbd()
    with pytest.raises(nbd.Error) as err:
        fn()
    # python3-libnbd: .errno is the name ('EPERM'), args[1] the number.
    code = err.value.args[1] if len(err.value.args) > 1 else None
    assert err.value.errno == "EPERM" or code == errno.EPERM, \
        f"{what}: failed with {err.value!r}, not EPERM"


# -- 1. the whole cycle ------------------------------------------------------------------------


def test_full_cycle(env, rng, tmp_path):
    """A VM with two disks, run by the process driver, through the whole cycle: failover to
    an older point (the VM starts at recovery on the point's bytes), change-point to a newer
    one (the writes since failover are gone), commit, reprotect (exact), a planned failback
    that loses nothing, commit, reprotect, and drills on both sides."""
    osr = env.osr
    nbd_of = site_nbd(osr)
    assert set(nbd_of) == {"primary", "recovery"} and nbd_of["primary"] != nbd_of["recovery"]
    osr.ok("policy", "create", "manual", "--crash-interval", "24h")

    script = tmp_path / "vm.py"
    script.write_text(VM_SCRIPT)
    log = VmLog(tmp_path / "vm.log")
    command = f"exec /usr/bin/python3 {shlex.quote(str(script))} {shlex.quote(str(log.path))}"
    created = osr.ok("vm", "create", "vmf", "--site", "primary", "--disk", "os:64M",
                     "--disk", "data:16M", "--driver", "process", "--command", command)
    assert created.get("driver") == "process", created
    shown = vm_show(osr, "vmf", "primary", 1, running=False)
    assert shown.get("driver") == "process", shown
    vm = env.track(Vm(osr, "vmf", rng))
    assert vm.names == ["os", "data"] and vm.sizes == {"os": 64 * MIB, "data": 16 * MIB}

    # The VM runs at the primary: round 1 on its disks there.
    started = osr.ok("vm", "start", "vmf")
    assert started.get("running") is True and started.get("site") == "primary", started
    ready = log.wait("ready", 1, "VM start at primary")
    start = log.wait("start", 1, "VM start at primary")
    assert start["env_disks"] == vm.uris, f"OSR_DISK_<NAME> {start} != {vm.uris}"
    account_marker(vm, ready, 1, nbd_of["primary"])
    pid1 = ready["pid"]
    vm_show(osr, "vmf", "primary", 1, running=True)

    vm.write(30)
    protect(osr, "vmf", policy="manual")
    item = item_show(osr, "vmf", "Protected", "primary", "recovery", 1)
    assert item["latest_point"]["seq"] == vm.model.seq, (item, vm.model.seq)

    points = []
    for _ in range(3):
        vm.write(25)
        p = assert_point(osr.ok("point", "create", "vmf"))
        assert p["seq"] == vm.model.seq, (p, vm.model.seq)
        points.append(p)
    pa, pb, pc = points
    seq1 = vm.model.seq
    model1 = vm.model                     # the primary's sequence, for change-point

    # -- failover to an older point (pa, not the latest) ------------------------------------
    job = osr.job_ok("failover", "vmf", "--point", pa["id"], "--shutdown-source",
                     job_type="failover")
    assert job.get("vm") == "vmf", job
    assert job.get("point") == pa, f"failover point {job.get('point')} != {pa}"
    assert job.get("epoch") == 2, job
    item = item_show(osr, "vmf", "FailedOver", "primary", "recovery", 2, running_site="recovery")
    check_failover(item, 2, "primary", pa, False, seq1)
    listed = osr.ok("point", "list", "vmf")[-3:]
    # The failover's point is shown in use (retention keeps it) until commit.
    assert [p.pop("in_use", None) for p in listed] == ["failover", None, None], listed
    assert listed == points, "the points are kept until commit"
    old_uris = dict(vm.uris)
    vm_show(osr, "vmf", "recovery", 2, running=True)
    vm.refresh()
    for n in vm.names:
        assert vm.uris[n] != old_uris[n], f"disk {n} did not move: {vm.uris}"
    check_disks_at(job, vm, nbd_of["recovery"], "failover")
    # --shutdown-source: the VM at the primary got SIGTERM; the one at recovery found round 1
    # (the point) and wrote round 2 there.
    stop = log.wait("stop", 1, "VM shut down at the primary")
    assert stop["pid"] == pid1, (stop, pid1)
    ready = log.wait("ready", 2, "VM start at recovery")
    assert ready["pid"] != pid1, ready
    vm.rebase(pa["seq"])
    account_marker(vm, ready, 2, nbd_of["recovery"])
    vm.assert_disks(vm.model.at(), f"recovery disks after failover to point {pa['id']}")
    # The old primary keeps every write it made (fenced, but readable).
    old_bytes = {n: read_uri(old_uris[n], vm.sizes[n]) for n in vm.names}
    want_old = model1.at()
    for n in vm.names:
        assert_same_bytes(old_bytes[n], bytes(want_old[n]), f"old primary disk {n}")

    # Writes at recovery (lost again by change-point).
    vm.write(20)
    vm.assert_disks(vm.model.at(), "recovery disks after writes there")
    pid2 = ready["pid"]

    # -- change-point to a newer point ------------------------------------------------------
    job = osr.job_ok("change-point", "vmf", "--point", pb["id"], job_type="change-point")
    assert job.get("point") == pb, f"change-point point {job.get('point')} != {pb}"
    item = item_show(osr, "vmf", "FailedOver", "primary", "recovery", 2, running_site="recovery")
    check_failover(item, 2, "primary", pb, False, seq1)
    stop = log.wait("stop", 2, "VM stopped by change-point")
    assert stop["pid"] == pid2, (stop, pid2)
    ready = log.wait("ready", 3, "VM restarted by change-point")
    vm_show(osr, "vmf", "recovery", 2, running=True)
    vm.refresh()
    check_disks_at(job, vm, nbd_of["recovery"], "change-point")
    vm.model = model1
    vm.rebase(pb["seq"])
    account_marker(vm, ready, 2, nbd_of["recovery"])
    vm.assert_disks(vm.model.at(), f"recovery disks after change-point to point {pb['id']}")
    vm.write(20)

    # -- commit ---------------------------------------------------------------------------------
    osr.job_ok("commit", "vmf", job_type="commit")
    item = item_show(osr, "vmf", "FailoverCommitted", "primary", "recovery", 2,
                     running_site="recovery")
    assert item.get("latest_point") is None, item
    assert osr.ok("point", "list", "vmf") == [], "points left after commit"
    vm_show(osr, "vmf", "recovery", 2, running=True)
    vm.assert_disks(vm.model.at(), "recovery disks after commit")

    # -- reprotect: recovery -> primary ----------------------------------------------------
    vm.close()
    job = osr.job_ok("reprotect", "vmf", job_type="reprotect")
    assert job.get("mode") == "exact", f"reprotect mode: {job}"
    assert job.get("source") == "recovery" and job.get("target") == "primary", job
    check_found_exact(job, seq1)
    # At least: what the store held after pb (undone at the primary) and what was written at
    # recovery since the change-point.
    must = covered(model1.ops[pb["seq"]:] + vm.model.ops)
    assert isinstance(job.get("bytes_shipped"), int) and job["bytes_shipped"] >= must, \
        f"reprotect shipped {job.get('bytes_shipped')} bytes; {must} bytes differ: {job}"
    item = item_show(osr, "vmf", "Protected", "recovery", "primary", 2)
    assert item.get("failover") is None, item
    first = assert_point(item.get("latest_point"), "first point after reprotect")
    assert first["seq"] == 0, f"the new sequence at recovery does not start at 0: {item}"
    vm.rebase(vm.model.seq)
    vm_show(osr, "vmf", "recovery", 2, running=True)

    # The old primary now holds the replica: a drill there at a new point.
    vm.write(25)
    p = assert_point(osr.ok("point", "create", "vmf"))
    assert p["seq"] == vm.model.seq, (p, vm.model.seq)
    drill(env, vm, p, vm.model.at(p["seq"]), nbd_of["primary"], "drill at primary after reprotect")
    vm.write(25)      # not in any point: the planned failback must not lose them
    vm.close()

    # -- failback, planned ------------------------------------------------------------------
    stops = log.count("stop")
    job = osr.job_ok("failover", "vmf", "--planned", job_type="failover")
    assert assert_point(job.get("point"))["seq"] == vm.model.seq, \
        f"planned failback is not at the last write (seq {vm.model.seq}): {job}"
    assert job.get("epoch") == 3, job
    item = item_show(osr, "vmf", "FailedOver", "recovery", "primary", 3, running_site="primary")
    check_failover(item, 3, "recovery", job["point"], True, vm.model.seq)
    fb_seq = vm.model.seq
    stop = log.wait("stop", stops + 1, "VM shut down at recovery by the planned failback")
    assert stop["pid"] == ready["pid"], (stop, ready)
    ready = log.wait("ready", 4, "VM start at primary after failback")
    rec_uris = dict(vm.uris)
    vm_show(osr, "vmf", "primary", 3, running=True)
    vm.refresh()
    check_disks_at(job, vm, nbd_of["primary"], "failback")
    vm.rebase(vm.model.seq)
    account_marker(vm, ready, 3, nbd_of["primary"])
    vm.assert_disks(vm.model.at(), "primary disks after the planned failback (nothing lost)")
    # The recovery side is fenced now.
    h = connect(rec_uris["os"])
    try:
        expect_eperm(lambda: h.pwrite(b"x" * 4096, 0), "a write at recovery after failback")
    finally:
        close_handle(h)

    # -- commit, reprotect: primary -> recovery again ----------------------------------------
    osr.job_ok("commit", "vmf", job_type="commit")
    item_show(osr, "vmf", "FailoverCommitted", "recovery", "primary", 3, running_site="primary")
    assert osr.ok("point", "list", "vmf") == []
    vm.close()
    job = osr.job_ok("reprotect", "vmf", job_type="reprotect")
    assert job.get("mode") == "exact", f"reprotect mode: {job}"
    assert job.get("source") == "primary" and job.get("target") == "recovery", job
    check_found_exact(job, fb_seq)
    must = covered(vm.model.ops)        # the VM's marker blocks, written since the failback
    assert isinstance(job.get("bytes_shipped"), int) and \
        must <= job["bytes_shipped"] <= 2 * must + MIB, \
        f"reprotect shipped {job.get('bytes_shipped')} bytes; {must} bytes differ: {job}"
    item = item_show(osr, "vmf", "Protected", "primary", "recovery", 3)
    assert item["latest_point"]["seq"] == 0, item
    vm.rebase(vm.model.seq)

    vm.write(30)
    p = assert_point(osr.ok("point", "create", "vmf"))
    assert p["seq"] == vm.model.seq, (p, vm.model.seq)
    drill(env, vm, p, vm.model.at(), nbd_of["recovery"], "drill at recovery at the end")
    vm.assert_disks(vm.model.at(), "primary disks at the end")
    item_show(osr, "vmf", "Protected", "primary", "recovery", 3)

    # The VM stops cleanly (it ran only where it should have: 4 starts in all).
    vm.close()
    stops = log.count("stop")
    stopped = osr.ok("vm", "stop", "vmf")
    assert stopped.get("running") is False, stopped
    log.wait("stop", stops + 1, "vm stop")
    assert log.count("ready") == 4 and log.count("orphaned") == 0, log.events()


# -- 2. reprotect ships only differences --------------------------------------------------------


GIB = 1024 * MIB
BLOCK = 64 * KIB


def assert_uri_matches(uri, want, what):
    """Every byte of the export at uri equals want (compared 4 MiB at a time)."""
    h = connect(uri)
    try:
        size = h.get_size()
        assert size == len(want), f"{what}: export size {size}, expected {len(want)}"
        view = memoryview(want)
        for off in range(0, size, CHUNK):
            n = min(CHUNK, size - off)
            got = h.pread(n, off)
            if got != view[off:off + n]:
                assert_same_bytes(bytes(got), bytes(view[off:off + n]),
                                  f"{what} (bytes {off}..{off + n}, offsets relative)")
    finally:
        close_handle(h)


def change_one_percent(h, model, rng, what):
    """About 1% of the disk (~10 MiB) rewritten with random bytes: half 64 KiB-aligned
    writes of 64-256 KiB, half unaligned writes of 128-384 KiB, each alone in its own
    1 MiB slot and off its edges (so no two share a 64 KiB block, and each one's blocks are
    at most twice its bytes). Returns the bytes changed."""
    size = len(model)
    slots = rng.sample(range(size // MIB), 48)
    changed = 0
    for i, slot in enumerate(slots):
        base = slot * MIB
        if i % 2 == 0:
            length = rng.randrange(1, 5) * BLOCK
            off = base + rng.randrange(1, (MIB - length) // BLOCK) * BLOCK
        else:
            length = rng.randrange(128 * KIB, 384 * KIB + 1)
            off = base + BLOCK + rng.randrange(0, MIB - 2 * BLOCK - length)
        data = rng.randbytes(length)
        h.pwrite(data, off)
        model[off:off + length] = data
        changed += length
    h.flush()
    assert 7 * MIB <= changed <= 13 * MIB, f"{what}: changed {changed} bytes"
    return changed


def check_commit_copied_all(job, what):
    """The commit's copy step reports the final numbers: N of N bytes (issue 10, case 10 b:
    it said "4194304 of 67108864 bytes" after the site had copied all of it)."""
    step = job["steps"][0]
    m = re.fullmatch(r"(\d+) of (\d+) bytes", step.get("message", ""))
    assert m and m.group(1) == m.group(2) and int(m.group(2)) > 0, \
        f"{what}: the copy step does not report it all copied: {step}"


def check_shipped(job, changed, mode, what):
    assert job.get("mode") == mode, f"{what}: reprotect mode {job.get('mode')!r} != {mode!r}: {job}"
    shipped = job.get("bytes_shipped")
    assert isinstance(shipped, int) and changed <= shipped <= 2 * changed + MIB, \
        (f"{what}: {shipped} bytes shipped for {changed} bytes changed "
         f"(expected {changed}..{2 * changed + MIB}): {job}")
    wire = job.get("wire_bytes_sent")
    # The changed bytes are random: they cannot shrink on the wire.
    assert isinstance(wire, int) and changed <= wire <= shipped + shipped // 10 + MIB, \
        (f"{what}: wire_bytes_sent {wire} for {shipped} bytes shipped "
         f"({changed} random bytes changed): {job}")


@pytest.mark.deadline(90)
def test_reprotect_ships_differences(env, rng):
    """A 1 GiB disk with 256 MiB of random data: after failover and commit, ~1% changed at
    the new primary; reprotect ships about that much (exact: from the history; then, after a
    failback, --compare: from block hashes), and both sides end up byte for byte equal."""
    osr = env.osr
    nbd_of = site_nbd(osr)
    osr.ok("policy", "create", "manual", "--crash-interval", "24h")
    shown = create_vm(osr, "big", [("os", "1G", GIB)])
    uri_p = shown["disks"][0]["uri"]
    model = bytearray(GIB)

    # 256 MiB of random data, 1 MiB in each 4 MiB slot of the disk, before protection.
    h = env.track(connect(uri_p))
    nwrites = 0
    for slot in range(GIB // (4 * MIB)):
        off = slot * 4 * MIB + rng.randrange(0, 3 * MIB)
        data = rng.randbytes(MIB)
        h.pwrite(data, off)
        model[off:off + MIB] = data
        nwrites += 1
    h.flush()
    protect(osr, "big", policy="manual")
    item = item_show(osr, "big", "Protected", "primary", "recovery", 1)
    assert item["latest_point"]["seq"] == nwrites, item

    # Failover at the latest point, commit, ~1% changed at recovery.
    job = osr.job_ok("failover", "big", "--point", "latest", job_type="failover")
    assert job["point"]["seq"] == nwrites and job.get("epoch") == 2, job
    item = item_show(osr, "big", "FailedOver", "primary", "recovery", 2, running_site="recovery")
    check_failover(item, 2, "primary", job["point"], False, nwrites)
    check_commit_copied_all(osr.job_ok("commit", "big", job_type="commit"), "commit at recovery")
    item_show(osr, "big", "FailoverCommitted", "primary", "recovery", 2, running_site="recovery")
    uri_r = vm_show(osr, "big", "recovery", 2)["disks"][0]["uri"]
    assert uri_r.startswith(f"nbd://{nbd_of['recovery']}/"), uri_r
    hr = env.track(connect(uri_r))
    changed = change_one_percent(hr, model, rng, "at recovery")
    close_handle(hr)

    # Reprotect, exact: only the changes travel back.
    job = osr.job_ok("reprotect", "big", job_type="reprotect")
    check_shipped(job, changed, "exact", "reprotect to primary")
    check_found_exact(job, nwrites)
    item = item_show(osr, "big", "Protected", "recovery", "primary", 2)
    point = assert_point(item.get("latest_point"))
    assert point["seq"] == 0, item

    # The old primary's store holds exactly the recovery disk: a drill there.
    drill_job = osr.job_ok("test-failover", "big", "--point", point["id"],
                           job_type="test-failover")
    d = drill_job["disks"][0]["uri"]
    assert d.startswith(f"nbd://{nbd_of['primary']}/"), drill_job
    assert_uri_matches(d, model, "drill at primary after the exact reprotect")
    osr.job_ok("test-failover-cleanup", "big", job_type="test-failover-cleanup")

    # Failback (planned), commit, ~1% changed at the primary, reprotect --compare.
    job = osr.job_ok("failover", "big", "--planned", job_type="failover")
    assert job["point"]["seq"] == 0 and job.get("epoch") == 3, job
    item = item_show(osr, "big", "FailedOver", "recovery", "primary", 3, running_site="primary")
    check_failover(item, 3, "recovery", job["point"], True, 0)
    check_commit_copied_all(osr.job_ok("commit", "big", job_type="commit"), "commit at primary")
    item_show(osr, "big", "FailoverCommitted", "recovery", "primary", 3, running_site="primary")
    uri_p2 = vm_show(osr, "big", "primary", 3)["disks"][0]["uri"]
    assert uri_p2.startswith(f"nbd://{nbd_of['primary']}/"), uri_p2
    hp = env.track(connect(uri_p2))
    changed = change_one_percent(hp, model, rng, "at primary")
    close_handle(hp)

    job = osr.job_ok("reprotect", "big", "--compare", job_type="reprotect")
    check_shipped(job, changed, "hash", "reprotect --compare to recovery")
    assert job.get("source") == "primary" and job.get("target") == "recovery", job
    found = job.get("found")
    assert isinstance(found, dict) and found.get("why"), job
    assert found.get("bytes") == job["bytes_shipped"], f"hash reprotect: found {found} vs {job}"
    assert isinstance(found.get("compared"), int) and found["compared"] > 0, found
    assert isinstance(found.get("regions"), int) and found["regions"] >= 1, found
    item = item_show(osr, "big", "Protected", "primary", "recovery", 3)
    point = assert_point(item.get("latest_point"))

    # Both sides hold the model: the primary's disk, and a drill at recovery.
    assert_uri_matches(uri_p2, model, "primary disk at the end")
    drill_job = osr.job_ok("test-failover", "big", "--point", point["id"],
                           job_type="test-failover")
    d = drill_job["disks"][0]["uri"]
    assert d.startswith(f"nbd://{nbd_of['recovery']}/"), drill_job
    assert_uri_matches(d, model, "drill at recovery after the hash reprotect")
    osr.job_ok("test-failover-cleanup", "big", job_type="test-failover-cleanup")
    item_show(osr, "big", "Protected", "primary", "recovery", 3)


# -- 3. refusals ------------------------------------------------------------------------------


def catalog_state(osr, name):
    """Everything a refused command must not change, as comparable JSON text."""
    item = osr.ok("item", "show", name)
    keep = ("name", "state", "source", "target", "direction", "policy", "epoch",
            "running_site", "latest_point", "failover", "drill", "last_seq", "durable_seq")
    shown = osr.ok("vm", "show", name)
    return json.dumps({
        "item": {k: item.get(k) for k in keep},
        "vm": {k: shown.get(k) for k in ("site", "running_site", "running", "epoch", "state",
                                          "disks")},
        "points": osr.ok("point", "list", name),
        "jobs": [(j["id"], j["type"], j["vm"], j["state"]) for j in osr.ok("job", "list")],
    }, sort_keys=True, indent=1)


def refused(osr, name, *args, says=()):
    """The command exits non-zero with 'osr: error: ...', changes nothing, and its message
    names each of says (case-insensitive)."""
    before = catalog_state(osr, name)
    msg = osr.fails(*args)
    shown = "osr " + " ".join(str(a) for a in args)
    for word in says:
        assert str(word).lower() in msg.lower(), f"{shown}: {msg!r} does not name {word!r}"
    after = catalog_state(osr, name)
    assert after == before, f"{shown} failed but changed things:\nbefore: {before}\nafter: {after}"
    return msg


def test_refusals(env, rng):
    """Each command out of turn, and each bad point, is refused with a clear message and
    changes nothing: not the item, the VM, the points, the jobs or the bytes."""
    osr = env.osr
    osr.ok("policy", "create", "manual", "--crash-interval", "24h")
    create_vm(osr, "ref", [("os", "16M", 16 * MIB)])
    vm = env.track(Vm(osr, "ref", rng))
    vm.write(10)
    protect(osr, "ref", policy="manual")
    vm.write(10)
    p1 = assert_point(osr.ok("point", "create", "ref"))
    vm.write(10)
    p2 = assert_point(osr.ok("point", "create", "ref"))
    assert p1["seq"] < p2["seq"] == vm.model.seq, (p1, p2)
    item_show(osr, "ref", "Protected", "primary", "recovery", 1)

    # Protected: no commit, reprotect or change-point; --planned only at 'latest'; no such point.
    for w in ("--wait", None):
        extra = [w] if w else []
        refused(osr, "ref", "commit", "ref", *extra, says=["ref", "Protected"])
        refused(osr, "ref", "reprotect", "ref", *extra, says=["ref", "Protected"])
    refused(osr, "ref", "change-point", "ref", "--point", p1["id"], "--wait",
            says=["ref", "Protected"])
    refused(osr, "ref", "failover", "ref", "--planned", "--point", p1["id"], "--wait",
            says=["planned", "--point"])
    refused(osr, "ref", "failover", "ref", "--planned", "--point", "latest-processed", "--wait",
            says=["planned", "--point"])
    refused(osr, "ref", "failover", "ref", "--point", 999, "--wait", says=["ref", "999"])
    refused(osr, "ref", "failover", "ref", "--point", "no-such-spec", "--wait",
            says=["no-such-spec"])
    refused(osr, "ref", "failover", "nosuchvm", "--wait", says=["nosuchvm"])
    item_show(osr, "ref", "Protected", "primary", "recovery", 1)

    # FailedOver.
    job = osr.job_ok("failover", "ref", "--point", p1["id"], job_type="failover")
    assert job["point"] == p1, job
    item_show(osr, "ref", "FailedOver", "primary", "recovery", 2, running_site="recovery")
    vm.refresh()
    refused(osr, "ref", "failover", "ref", "--wait", says=["ref", "FailedOver"])
    refused(osr, "ref", "failover", "ref", "--planned", "--wait", says=["ref", "FailedOver"])
    refused(osr, "ref", "test-failover", "ref", "--point", "latest", "--wait",
            says=["ref", "FailedOver"])
    refused(osr, "ref", "change-point", "ref", "--point", "latest", "--wait", says=["latest"])
    refused(osr, "ref", "change-point", "ref", "--point", 999, "--wait", says=["ref", "999"])
    refused(osr, "ref", "reprotect", "ref", "--wait", says=["ref", "FailedOver", "commit"])
    refused(osr, "ref", "unprotect", "ref", says=["ref", "FailedOver"])
    item = item_show(osr, "ref", "FailedOver", "primary", "recovery", 2, running_site="recovery")
    check_failover(item, 2, "primary", p1, False, p2["seq"])
    vm.rebase(p1["seq"])
    vm.assert_disks(vm.model.at(), "recovery disks after the refusals (FailedOver)")

    # FailoverCommitted.
    osr.job_ok("commit", "ref", job_type="commit")
    item_show(osr, "ref", "FailoverCommitted", "primary", "recovery", 2, running_site="recovery")
    refused(osr, "ref", "change-point", "ref", "--point", p2["id"], "--wait",
            says=["ref", "FailoverCommitted"])
    refused(osr, "ref", "change-point", "ref", "--point", "latest-processed", "--wait",
            says=["ref", "FailoverCommitted"])
    refused(osr, "ref", "commit", "ref", "--wait", says=["ref", "FailoverCommitted"])
    refused(osr, "ref", "failover", "ref", "--wait", says=["ref", "FailoverCommitted"])
    refused(osr, "ref", "test-failover", "ref", "--point", "latest", "--wait",
            says=["ref", "FailoverCommitted"])
    item_show(osr, "ref", "FailoverCommitted", "primary", "recovery", 2, running_site="recovery")
    vm.assert_disks(vm.model.at(), "recovery disks after the refusals (FailoverCommitted)")

    # Reprotect still works after all that.
    job = osr.job_ok("reprotect", "ref", job_type="reprotect")
    assert job.get("mode") == "exact", job
    item_show(osr, "ref", "Protected", "recovery", "primary", 2)
    refused(osr, "ref", "reprotect", "ref", "--wait", says=["ref", "Protected"])
    refused(osr, "ref", "commit", "ref", "--wait", says=["ref", "Protected"])
    vm.assert_disks(vm.model.at(), "disks at the end")


# -- 4. fencing of the old primary -------------------------------------------------------------


def test_fenced_old_primary(env, rng):
    """An unplanned failover while the primary still runs and still has records on their way
    (a 1 MB/s link): the old primary refuses writes (EPERM) but serves reads; the records it
    had not sent never reach the recovery side; reprotect finds exactly those records and
    undoes them at the old primary."""
    nbd = require_libnbd()
    osr = env.osr
    nbd_of = site_nbd(osr)
    osr.ok("policy", "create", "slow", "--crash-interval", "24h", "--bandwidth", "1M",
           "--compression", "none")
    create_vm(osr, "fen", [("os", "64M", 64 * MIB), ("data", "8M", 8 * MIB)])
    vm = env.track(Vm(osr, "fen", rng))
    vm.write(20)
    protect(osr, "fen", policy="slow")
    vm.write(5, max_len=64 * KIB)
    p1 = assert_point(osr.ok("point", "create", "fen"))
    assert p1["seq"] == vm.model.seq, p1
    # ~16 MiB of random writes: at 1 MB/s most of them are still at the primary when it is
    # fenced.
    vm.write(128, weights=(1, 0, 0))
    seq = vm.model.seq
    old_uris = dict(vm.uris)
    # Connections to the primary opened before the failover stay open across it.
    before = {n: env.track(connect(old_uris[n])) for n in vm.names}

    # Unplanned failover to the newest point the recovery site has processed; the primary
    # site still runs (its VM is not shut down).
    job = osr.job_ok("failover", "fen", "--point", "latest-processed", job_type="failover")
    assert job.get("point") == p1 and job.get("epoch") == 2, f"failover point, epoch: {job}"
    item = item_show(osr, "fen", "FailedOver", "primary", "recovery", 2, running_site="recovery")
    fo = check_failover(item, 2, "primary", p1, False, None)
    store_seq = fo.get("store_seq")
    assert isinstance(store_seq, int) and p1["seq"] <= store_seq < seq, \
        f"store_seq {store_seq}: expected records {p1['seq']}..{seq} still on their way: {fo}"
    want_old = vm.model.at()
    vm.close()

    # The old primary refuses every change, on old and new connections; reads still work
    # (and show every write it completed).
    after = {n: env.track(connect(old_uris[n])) for n in vm.names}
    for label, hs in (("a connection from before the failover", before),
                      ("a new connection", after)):
        for n, h in hs.items():
            expect_eperm(lambda: h.pwrite(rng.randbytes(8192), 4096),
                         f"write to the old primary's {n} ({label})")
            expect_eperm(lambda: h.zero(65536, 0),
                         f"write-zeroes at the old primary's {n} ({label})")
            expect_eperm(lambda: h.trim(65536, 65536), f"trim at the old primary's {n} ({label})")
            expect_eperm(lambda: h.pwrite(b"\xff" * 512, vm.sizes[n] - 512, nbd.CMD_FLAG_FUA),
                         f"FUA write to the old primary's {n} ({label})")
            got = read_handle(h, vm.sizes[n], f"old primary {n}")
            assert_same_bytes(got, bytes(want_old[n]), f"reading the old primary's {n} ({label})")

    # The recovery side is at p1, and stays there: nothing of the old primary arrives.
    vm.refresh()
    for n in vm.names:
        assert vm.uris[n].startswith(f"nbd://{nbd_of['recovery']}/"), vm.uris
    want = vm.model.at(p1["seq"])
    vm.assert_disks(want, "recovery disks after the failover")
    time.sleep(1.5)
    vm.assert_disks(want, "recovery disks 1.5 s later (the old primary's records refused)")
    item = item_show(osr, "fen", "FailedOver", "primary", "recovery", 2, running_site="recovery")
    assert item.get("failover") == fo, item

    # Writes at recovery; commit; reprotect finds exactly the records the old primary kept
    # back, and ships the differences.
    unsent = vm.model.ops[store_seq:seq]
    unsent_bytes = covered(unsent)
    model_old = vm.model
    vm.rebase(p1["seq"])
    vm.write(20)
    osr.job_ok("commit", "fen", job_type="commit")
    job = osr.job_ok("reprotect", "fen", job_type="reprotect")
    assert job.get("mode") == "exact", job
    found = job.get("found")
    assert isinstance(found, dict), job
    assert found.get("known_at_recovery_site_upto") == store_seq, (found, store_seq)
    assert found.get("unreplicated_records") == seq - store_seq, \
        f"reprotect found {found}; the old primary kept back records {store_seq + 1}..{seq}"
    assert found.get("unreplicated_bytes") == unsent_bytes, \
        f"reprotect found {found}; the records kept back cover {unsent_bytes} bytes"
    item_show(osr, "fen", "Protected", "recovery", "primary", 2)
    vm.rebase(vm.model.seq)
    vm.assert_disks(vm.model.at(), "recovery disks after reprotect")
    assert model_old.at() != vm.model.at(), "the old primary's lost writes changed nothing?"

    # The old primary's disks hold the replica now: still no writes through the old URIs.
    for n in vm.names:
        h = None
        with pytest.raises(nbd.Error):
            h = connect(old_uris[n])
            h.pwrite(b"z" * 4096, 0)
        if h is not None:
            close_handle(h)
    vm.write(10)
    p = assert_point(osr.ok("point", "create", "fen"))
    assert p["seq"] == vm.model.seq, p
    drill(env, vm, p, vm.model.at(), nbd_of["primary"], "drill at the old primary")
