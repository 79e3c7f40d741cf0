"""Drill VMs: a test failover's VM on a writable view of the recovery store, plugged into
the recovery site's drill networks (site config `[networks.NAME]`), with a boot check; and
the failed-over VM, which plugs into the production networks (docs/api.md, site API
`/views/{id}/vm/…`, `/groups/{vm}/vm/start`, the consoles).

Real guests (tests/vm, TCG), a real production bridge and a "production server" in a
network namespace that the test makes itself (unique names, always deleted):

- the drill VM comes up (boot check healthy), sees the replicated disk, and cannot reach
  the production server (its TAP is on the isolated drill bridge the site made), while the
  failed-over VM with the same spec, MAC and address does reach it (its TAP is on the
  production bridge); closing the view stops the drill VM and its TAP goes;
- a drill at a point whose disk was wiped: the boot check waits for a line that never
  comes and says unhealthy, naming the timeout; the console shows why (OSR-NODATA);
- refusals before anything is made: a NIC on a network the site does not map, a drill
  bridge with a foreign port plugged in, a read-only view.

Needs root (TAP devices, bridges, namespaces), `ip`, qemu-system-x86_64: a missing tool
FAILS the test. Run with Debian's /usr/bin/python3 (python3-libnbd).
"""

import json
import os
import random
import re
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (KIB, MIB, api, api_ok, close, connect, group_status, open_view,
                      protect, require_libnbd, wait_durable, wait_for)
import osrtest

DISK = 16 * MIB
MAC = "52:54:00:d7:11:01"
BOOT_TIMEOUT_S = 90          # TCG: OSR-BOOTED comes ~6 s after qemu starts
ISOLATION_WATCH_S = 20       # the drill must not reach production for this long
VM_STOP_HTTP_TIMEOUT_S = 60  # DELETE /views/ID stops the drill VM first (up to ~10 s + quit)
IP_TIMEOUT_S = 15


# -- tools, the guest -----------------------------------------------------------------


def ip_cmd(*args, check=True):
    """Runs `ip ARGS`; a failure (with check) fails the test, naming the command."""
    cmd = [osrtest.require_tool("ip"), *[str(a) for a in args]]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=IP_TIMEOUT_S,
                       stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        pytest.fail(f"{' '.join(cmd)}: exit {p.returncode}: {p.stderr.strip()}")
    return p


def links():
    """{ifname: entry of `ip -j link`} of the host's network namespace."""
    return {e["ifname"]: e for e in json.loads(ip_cmd("-j", "link").stdout)}


def ports_of(bridge):
    return sorted(name for name, e in links().items() if e.get("master") == bridge)


@pytest.fixture(scope="module")
def guest():
    """The test guest (tests/vm), built beside the osrd binary under test (build/guest)."""
    osrtest.require_tool("ip")
    return osrtest.build_test_guest()


def write_commands(tmp_path, guest_dir, entries):
    """The recovery site's commands file: one [qemu_args.NAME] entry per guest command line
    (osr.* words after the console settings). Returns its path (0600)."""
    text = ""
    for name, words in entries.items():
        append = f"console=ttyS0 quiet panic=-1 {words}"
        text += (f"[qemu_args.{name}]\n"
                 f"args = \"-kernel {guest_dir}/vmlinuz -initrd {guest_dir}/initramfs.cpio.gz "
                 f"-append '{append}' -no-reboot\"\n\n")
    path = tmp_path / "commands.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def qemu_spec(args_name, nics, boot_check):
    return {"driver": "qemu", "memory_bytes": 256 * MIB, "cpus": 1,
            "qemu_args_name": args_name, "nics": nics, "boot_check": boot_check}


# -- networks the test makes ------------------------------------------------------------


class NetLab:
    """Bridges, veth pairs and namespaces with names unique to this test (osrt + kind +
    4 hex digits, at most 11 characters); all deleted at the end, with any TAP device left
    on one of the bridges (a site that died before deleting its own)."""

    def __init__(self):
        self.tag = None
        for _ in range(20):
            tag = secrets.token_hex(2)
            if not any(n.endswith(tag) and n.startswith("osrt") for n in links()):
                self.tag = tag
                break
        assert self.tag, "no free tag for the test's interface names"
        self.bridges = []   # made by the test, or by the site for the test (drill bridges)
        self.links = []     # veth ends left in the host namespace
        self.namespaces = []

    def name(self, kind):
        return f"osrt{kind}{self.tag}"

    def bridge(self, kind):
        br = self.name(kind)
        self.bridges.append(br)
        ip_cmd("link", "add", br, "type", "bridge")
        ip_cmd("link", "set", br, "up")
        return br

    def owned_bridge(self, kind):
        """A bridge name the site is to make: deleted at the end like the test's own."""
        br = self.name(kind)
        assert br not in links(), f"{br} exists before the test"
        self.bridges.append(br)
        return br

    def veth_on(self, bridge, kind):
        """A veth pair whose end `kind`a is plugged into bridge; returns (plugged, other)."""
        a, b = self.name(kind) + "a", self.name(kind) + "b"
        self.links += [a, b]
        ip_cmd("link", "add", a, "type", "veth", "peer", "name", b)
        ip_cmd("link", "set", a, "master", bridge)
        ip_cmd("link", "set", a, "up")
        ip_cmd("link", "set", b, "up")
        return a, b

    def server(self, bridge, cidr):
        """A namespace holding the production server at `cidr` on a veth whose other end
        is plugged into `bridge` (the host has no address there). Returns (netns, port)."""
        ns = self.name("n")
        self.namespaces.append(ns)
        ip_cmd("netns", "add", ns)
        port, inside = self.veth_on(bridge, "v")
        ip_cmd("link", "set", inside, "netns", ns)
        ip_cmd("-n", ns, "addr", "add", cidr, "dev", inside)
        ip_cmd("-n", ns, "link", "set", inside, "up")
        ip_cmd("-n", ns, "link", "set", "lo", "up")
        return ns, port

    def cleanup(self):
        now = links()
        for br in self.bridges:
            for name, e in now.items():
                if e.get("master") == br and name not in self.links:
                    ip_cmd("link", "del", name, check=False)  # a TAP left behind
        for ns in self.namespaces:
            ip_cmd("netns", "del", ns, check=False)
        for name in self.links + self.bridges:
            if name in links():
                ip_cmd("link", "del", name, check=False)
        left = [n for n in self.links + self.bridges if n in links()]
        left += [ns for ns in self.namespaces
                 if ns in ip_cmd("netns", "list", check=False).stdout.split()]
        assert not left, f"the test's interfaces or namespaces are still there: {left}"


qemu_pids = osrtest.qemu_pids


@pytest.fixture
def lab(tmp_path):
    """A NetLab; at the end (after the sites stopped: request it before site_factory) any
    qemu of this test still running is killed (a failure) and the networks are deleted."""
    osrtest.require_tool("ip")
    osrtest.require_tool("qemu-system-x86_64")
    require_libnbd()
    net = NetLab()
    yield net
    stray = osrtest.kill_stray_qemus(tmp_path)
    net.cleanup()
    assert not stray, f"qemu processes of the test outlived its sites: {stray}"


# -- disks, VMs, consoles -------------------------------------------------------------------


archive = osrtest.guest_archive  # the guest's disk: a tar with hello.txt


def write_at_primary(primary, vm, data, offset=0):
    """Writes data to the VM's first disk through the primary's NBD; returns the seq."""
    h = connect(group_status(primary, vm)["disks"][0]["uri"])
    try:
        h.pwrite(data, offset)
        h.flush()
    finally:
        close(h)
    return group_status(primary, vm)["last_seq"]


def qemu_argv(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def tap_of(pid):
    """The TAP device qemu `pid` opened (its -netdev tap,...,ifname=NAME)."""
    argv = qemu_argv(pid)
    taps = [m.group(1) for a in argv for m in [re.search(r"\btap,.*\bifname=([^,]+)", a)] if m]
    assert len(taps) == 1, f"qemu {pid}: expected one TAP netdev: {argv}"
    return taps[0]


def gone(pid, tmp_path):
    """Whether process `pid` is no longer a qemu of this test."""
    argv = qemu_argv(pid)
    return not argv or not any(str(tmp_path) in a for a in argv)


def view_vm(site, view_id):
    return api_ok(site, "GET", f"/views/{view_id}")["drill_vm"]


class Console:
    """A VM's console read through the site API from offset 0 on, piece by piece."""

    def __init__(self, site, path):
        self.site, self.path, self.next, self.text = site, path, 0, ""

    def read(self):
        for _ in range(100):
            doc = api_ok(self.site, "GET", f"{self.path}?offset={self.next}&bytes=65536")
            assert set(doc) == {"offset", "next", "size", "text", "cuts", "cut_size"}, doc
            assert (doc["cuts"], doc["cut_size"]) == (0, 0), doc  # far below the bound
            assert doc["offset"] == self.next, f"{self.path}: read from {self.next}: {doc}"
            # `next` counts the log's bytes: the text lacks the serial console's CRs.
            assert "\r" not in doc["text"], doc
            assert doc["next"] - doc["offset"] >= len(doc["text"].encode()), doc
            assert doc["next"] <= doc["size"], doc
            self.text += doc["text"]
            self.next = doc["next"]
            if self.next >= doc["size"]:
                return self.text
        pytest.fail(f"{self.path}: the console grows faster than it is read")

    def wait(self, line, timeout, what):
        wait_for(lambda: line in self.read(), timeout, what, interval=0.5,
                 detail=lambda: self.text[-1500:])


def wait_boot(site, view_id, timeout):
    """Waits until the drill's boot check is no longer `checking`; returns the vm object."""
    seen = {}

    def ended():
        seen["vm"] = view_vm(site, view_id)
        return seen["vm"]["boot"]["state"] not in ("checking",)

    wait_for(ended, timeout, f"the boot check of view {view_id} to end", interval=0.5,
             detail=lambda: seen.get("vm"))
    return seen["vm"]


# -- the tests ---------------------------------------------------------------------------------


def test_drill_vm_is_isolated_and_the_failed_over_vm_reaches_production(
        lab, site_factory, guest, tmp_path):
    n = random.randrange(100, 250)
    server_ip = f"10.213.{n}.1"
    prod_br = lab.bridge("p")
    netns, server_port = lab.server(prod_br, f"{server_ip}/24")
    drill_br = lab.owned_bridge("d")  # the site makes it
    commands = write_commands(tmp_path, guest, {
        "serve-net": f"osr.mode=serve osr.ip=10.213.{n}.2/24 osr.peer={server_ip}"})
    primary = site_factory("primary")
    recovery = site_factory("recovery", extra=(
        f'commands_file = "{commands}"\n\n'
        f'[networks.prod]\nbridge = "{prod_br}"\ndrill_bridge = "{drill_br}"\n'))

    vm = "app"
    text = f"replicated{n}"
    protect(primary, recovery, vm, [("os", DISK)])
    seq = write_at_primary(primary, vm, archive(text))
    wait_durable(recovery, vm, seq, primary=primary)

    spec = qemu_spec("serve-net", [{"mac": MAC, "network": "prod"}],
                     {"console_line": "OSR-BOOTED", "timeout_ms": 120000})

    # (a) The drill VM: on the drill bridge, which the site made and nothing else is on.
    view = open_view(recovery, vm, seq, writable=True)
    vid = view["id"]
    api_ok(recovery, "POST", f"/views/{vid}/vm/start", spec, status=204)
    dvm = view_vm(recovery, vid)
    assert dvm["state"] == "running" and dvm["running"] is True, dvm
    assert dvm["driver"] == "qemu" and dvm["pid"] > 0, dvm
    assert dvm["boot"]["state"] in ("checking", "healthy"), dvm
    drill_pid = dvm["pid"]
    drill_tap = tap_of(drill_pid)
    assert Path(f"/sys/class/net/{drill_br}/bridge").is_dir(), \
        f"the site did not make the drill bridge {drill_br}: {sorted(links())}"
    now = links()
    assert now[drill_tap].get("master") == drill_br, now[drill_tap]
    assert ports_of(drill_br) == [drill_tap], ports_of(drill_br)
    assert ports_of(prod_br) == [server_port], \
        f"the drill VM's TAP is on the production bridge: {ports_of(prod_br)}"

    dvm = wait_boot(recovery, vid, BOOT_TIMEOUT_S)
    assert dvm["boot"]["state"] == "healthy", dvm
    assert "OSR-BOOTED" in dvm["boot"]["reason"] and dvm["boot"]["ms"] > 0, dvm
    drill_console = Console(recovery, f"/views/{vid}/console")
    drill_console.wait(f"OSR-PEER-FAIL:{server_ip}", BOOT_TIMEOUT_S,
                       "the drill VM to try the production server")
    first_fail = time.monotonic()
    assert f"OSR-READ:{text}" in drill_console.text, drill_console.text[-1500:]

    # (b) The failed-over VM, same spec, MAC and address, while the drill still runs: on the
    # production bridge, it reaches the production server.
    api_ok(primary, "DELETE", f"/groups/{vm}/replication", status=204)
    fo = api_ok(recovery, "POST", f"/groups/{vm}/failover", {"seq": seq, "epoch": 2},
                status=201)
    assert fo["seq"] == seq and fo["epoch"] == 2, fo
    api_ok(recovery, "POST", f"/groups/{vm}/vm/start", spec, status=204)
    g = group_status(recovery, vm)
    assert g["vm"]["running"] is True and g["vm"]["pid"] > 0, g["vm"]
    prod_pid = g["vm"]["pid"]
    prod_tap = tap_of(prod_pid)
    assert prod_tap != drill_tap, (prod_tap, drill_tap)
    assert links()[prod_tap].get("master") == prod_br, links()[prod_tap]
    assert ports_of(prod_br) == sorted([server_port, prod_tap]), ports_of(prod_br)
    assert ports_of(drill_br) == [drill_tap], ports_of(drill_br)
    prod_console = Console(recovery, f"/groups/{vm}/console")
    prod_console.wait(f"OSR-PEER-OK:{server_ip}", BOOT_TIMEOUT_S,
                      "the failed-over VM to reach the production server")
    assert f"OSR-READ:{text}" in prod_console.text, prod_console.text[-1500:]

    # The drill never reached it, before or while the failed-over VM did.
    while time.monotonic() < first_fail + ISOLATION_WATCH_S:
        assert "OSR-PEER-OK" not in drill_console.read(), \
            f"the drill VM reached production:\n{drill_console.text[-1500:]}"
        time.sleep(1)
    fails = drill_console.read().count(f"OSR-PEER-FAIL:{server_ip}")
    assert "OSR-PEER-OK" not in drill_console.text, drill_console.text[-1500:]
    assert fails >= 4, f"{fails} pings in {ISOLATION_WATCH_S} s:\n{drill_console.text[-1500:]}"
    assert view_vm(recovery, vid)["running"] is True, "the drill VM stopped by itself"

    # The drill ends: DELETE stops its VM and deletes its TAP; the failed-over VM goes on.
    got, doc = api(recovery, "DELETE", f"/views/{vid}", timeout=VM_STOP_HTTP_TIMEOUT_S)
    assert got == 204, f"DELETE /views/{vid}: {got} {doc}"
    assert api(recovery, "GET", f"/views/{vid}")[0] == 404
    assert gone(drill_pid, tmp_path), f"the drill VM still runs: {qemu_argv(drill_pid)}"
    assert drill_tap not in links(), f"the drill VM's TAP {drill_tap} outlived it"
    assert ports_of(drill_br) == [], ports_of(drill_br)
    assert ports_of(prod_br) == sorted([server_port, prod_tap]), ports_of(prod_br)
    oks = prod_console.read().count("OSR-PEER-OK")
    wait_for(lambda: prod_console.read().count("OSR-PEER-OK") > oks, 20,
             "the failed-over VM to go on reaching production after the drill ended")

    stop = api_ok(recovery, "POST", f"/groups/{vm}/vm/stop", {"timeout_ms": 1000})
    assert stop == {"clean": False}, stop  # the test guest ignores ACPI: a hard stop
    assert group_status(recovery, vm)["vm"]["running"] is False
    assert gone(prod_pid, tmp_path), f"the failed-over VM still runs: {qemu_argv(prod_pid)}"
    assert prod_tap not in links(), f"the failed-over VM's TAP {prod_tap} outlived it"
    assert ports_of(prod_br) == [server_port], ports_of(prod_br)
    assert netns in ip_cmd("netns", "list").stdout


def test_boot_check_fails_on_a_wiped_disk_and_the_console_says_why(
        lab, site_factory, guest, tmp_path):
    """The point's disk holds no archive (zeros written over it before the point): the
    guest never prints OSR-READ, the check says unhealthy naming what it waited for and
    its timeout, the console shows OSR-NODATA. The NIC's network has no drill_bridge: the
    drill gets user networking with restrict=on, no TAP."""
    commands = write_commands(tmp_path, guest, {"serve": "osr.mode=serve"})
    primary = site_factory("primary")
    recovery = site_factory("recovery", extra=(
        f'commands_file = "{commands}"\n\n[networks.lab]\nuser = true\n'))
    vm = "app"
    protect(primary, recovery, vm, [("os", DISK)])
    written = write_at_primary(primary, vm, archive("before-the-wipe"))
    wiped = write_at_primary(primary, vm, bytes(64 * KIB))
    assert wiped > written
    wait_durable(recovery, vm, wiped, primary=primary)

    before = set(links())
    view = open_view(recovery, vm, wiped, writable=True)
    vid = view["id"]
    timeout_ms = 30000
    spec = qemu_spec("serve", [{"mac": MAC, "network": "lab"}],
                     {"console_line": "OSR-READ:", "timeout_ms": timeout_ms})
    started = time.monotonic()
    api_ok(recovery, "POST", f"/views/{vid}/vm/start", spec, status=204)
    dvm = view_vm(recovery, vid)
    assert dvm["running"] is True and dvm["boot"]["state"] == "checking", dvm
    pid = dvm["pid"]
    argv = qemu_argv(pid)
    assert "user,id=osr-net0,restrict=on" in argv, argv
    assert not any("ifname=" in a for a in argv), argv
    assert set(links()) == before, f"a drill on user networking made devices: " \
                                   f"{set(links()) - before}"

    console = Console(recovery, f"/views/{vid}/console")
    console.wait("OSR-NODATA", BOOT_TIMEOUT_S, "the drill VM to find no data on its disk")
    assert view_vm(recovery, vid)["boot"]["state"] == "checking"
    dvm = wait_boot(recovery, vid, timeout_ms / 1000 + 30)
    elapsed = time.monotonic() - started
    boot = dvm["boot"]
    assert boot["state"] == "unhealthy", dvm
    assert "OSR-READ:" in boot["reason"] and f"{timeout_ms} ms" in boot["reason"], boot
    assert elapsed >= timeout_ms / 1000 - 1, f"unhealthy after {elapsed:.1f} s: {boot}"
    text = console.read()
    assert "OSR-BOOTED" in text and "OSR-NODATA" in text, text[-1500:]
    assert "OSR-READ:" not in text, text[-1500:]

    stop = api_ok(recovery, "POST", f"/views/{vid}/vm/stop", {"timeout_ms": 1000})
    assert stop == {"clean": False}, stop
    dvm = view_vm(recovery, vid)
    assert dvm["state"] == "stopped" and dvm["running"] is False and dvm["pid"] == 0, dvm
    assert dvm["boot"]["state"] == "unhealthy", dvm
    assert gone(pid, tmp_path), f"the drill VM still runs: {qemu_argv(pid)}"
    assert "OSR-NODATA" in Console(recovery, f"/views/{vid}/console").read(), \
        "the console of a stopped drill VM is gone"
    got, doc = api(recovery, "DELETE", f"/views/{vid}", timeout=VM_STOP_HTTP_TIMEOUT_S)
    assert got == 204, f"DELETE /views/{vid}: {got} {doc}"
    assert qemu_pids(tmp_path) == []


def refused(site, path, body):
    """The call fails with a 4xx and an error object; returns (status, message)."""
    got, doc = api(site, "POST", path, body)
    assert 400 <= got < 500, f"POST {path} {body}: {got} {doc}, expected a refusal (4xx)"
    assert isinstance(doc, dict) and isinstance(doc.get("error"), dict), (got, doc)
    assert isinstance(doc["error"].get("message"), str), doc
    return got, doc["error"]["message"]


def assert_nothing_ran(site, view_id, tmp_path, before, what):
    dvm = view_vm(site, view_id)
    assert dvm["running"] is False and dvm["state"] == "stopped" and dvm["pid"] == 0, \
        f"{what}: {dvm}"
    assert qemu_pids(tmp_path) == [], f"{what}: a qemu runs"
    made = set(links()) - before
    assert not made, f"{what}: network devices were made: {made}"


def test_drill_vm_refusals(lab, site_factory, guest, tmp_path):
    prod_br = lab.bridge("p")
    dirty_br = lab.bridge("d")
    foreign, _ = lab.veth_on(dirty_br, "f")
    commands = write_commands(tmp_path, guest, {"serve": "osr.mode=serve"})
    recovery = site_factory("recovery", extra=(
        f'commands_file = "{commands}"\n\n'
        f'[networks.prod]\nbridge = "{prod_br}"\ndrill_bridge = "{dirty_br}"\n'))
    vm = "app"
    api_ok(recovery, "PUT", f"/stores/{vm}",
           {"disks": [{"name": "os", "size_bytes": DISK}]}, status=201)
    view = open_view(recovery, vm, 0, writable=True)
    vid = view["id"]
    boot_check = {"console_line": "OSR-BOOTED", "timeout_ms": 60000}
    before = set(links())

    # A NIC on a network this site does not map.
    spec = qemu_spec("serve", [{"mac": MAC, "network": "backend"}], boot_check)
    got, msg = refused(recovery, f"/views/{vid}/vm/start", spec)
    assert "'backend'" in msg and "networks.backend" in msg, (got, msg)
    assert_nothing_ran(recovery, vid, tmp_path, before, "unmapped network")

    # The drill bridge has a port that is not a drill VM's.
    spec = qemu_spec("serve", [{"mac": MAC, "network": "prod"}], boot_check)
    got, msg = refused(recovery, f"/views/{vid}/vm/start", spec)
    assert foreign in msg and dirty_br in msg, (got, msg)
    assert_nothing_ran(recovery, vid, tmp_path, before, "drill bridge with a foreign port")
    assert ports_of(dirty_br) == [foreign], ports_of(dirty_br)
    assert ports_of(prod_br) == [], ports_of(prod_br)

    # A TAP whose name looks like osr's (another site's production VM, an admin's) is no
    # drill VM's either: only a TAP osr marked for a drill is.
    ip_cmd("link", "set", foreign, "nomaster")
    tap = "osr" + lab.tag + "tap"  # "osr" prefix, as osr's own TAPs are named
    lab.links.append(tap)
    ip_cmd("tuntap", "add", "dev", tap, "mode", "tap")
    ip_cmd("link", "set", tap, "master", dirty_br)
    before |= {tap}
    got, msg = refused(recovery, f"/views/{vid}/vm/start", spec)
    assert tap in msg and dirty_br in msg and "not isolated" in msg, (got, msg)
    assert_nothing_ran(recovery, vid, tmp_path, before, "drill bridge with an osr-named TAP")
    assert ports_of(dirty_br) == [tap], ports_of(dirty_br)

    # A read-only view: a drill VM writes to its disks.
    ro = open_view(recovery, vm, 0)
    got, msg = refused(recovery, f"/views/{ro['id']}/vm/start", spec)
    assert "read-only" in msg, (got, msg)
    assert_nothing_ran(recovery, ro["id"], tmp_path, before, "read-only view")

    for v in (vid, ro["id"]):
        got, doc = api(recovery, "DELETE", f"/views/{v}")
        assert got == 204, f"DELETE /views/{v}: {got} {doc}"
    assert recovery.alive(), recovery.stderr()[-3000:]
