"""Idle protected VMs cost (almost) nothing at the site daemons (issue 12, invariant 9):
the threads each VM has (its sender and the sender's ACK reader, its capture log's
writer at the primary; the receiver's session and the store's journal writer at the
recovery site) sleep until there is work. Measured by what does not depend on the
machine's speed: how often each of those threads woke (voluntary context switches in
/proc/PID/task/TID/status) over a window in which nothing is written. A sender that
polled its log every 2 ms woke ~500 times a second; a sleeping one wakes at most once a
second (its safety bound)."""

import time
from pathlib import Path

from conftest import KIB, MIB, api_ok, close, connect, protect, wait_durable

VMS = 3
WINDOW_S = 3.0
# Wake-ups a second allowed per thread: the sender's safety bound is one a second; the
# rest is slack for a trim after the last ACK and the window's edges.
WAKEUPS_PER_S_MAX = 4
PER_VM_THREADS = ("osr-send", "osr-send-acks", "osr-log-writer", "osr-recv")


def threads(pid):
    """{tid: (name, voluntary context switches)} of the process."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            switches = 0
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    switches = int(line.split()[1])
            out[task.name] = (name, switches)
        except OSError:
            pass  # the thread ended meanwhile
    return out


def test_idle_protected_vms_do_not_wake_their_threads(sites):
    primary, recovery = sites
    for i in range(VMS):
        vm = f"idle{i}"
        group = protect(primary, recovery, vm, [("d0", MIB)])
        h = connect(group["disks"][0]["uri"])
        try:
            h.pwrite(b"\x11" * (4 * KIB), 0)
            h.flush()
        finally:
            close(h)
        last = api_ok(primary, "GET", f"/groups/{vm}")["last_seq"]
        wait_durable(recovery, vm, last, primary=primary)
    time.sleep(0.5)  # the trims after the last ACKs

    before = {s.name: threads(s.pid) for s in (primary, recovery)}
    t0 = time.monotonic()
    time.sleep(WINDOW_S)
    elapsed = time.monotonic() - t0
    after = {s.name: threads(s.pid) for s in (primary, recovery)}

    seen = {}
    for site in (primary, recovery):
        for tid, (name, switches) in after[site.name].items():
            if name not in PER_VM_THREADS or tid not in before[site.name]:
                continue
            seen[(site.name, name)] = seen.get((site.name, name), 0) + 1
            woke = switches - before[site.name][tid][1]
            assert woke <= WAKEUPS_PER_S_MAX * elapsed, (
                f"site {site.name}: thread {name} ({tid}) woke {woke} times in {elapsed:.1f} s "
                f"with nothing written")
    # The threads the test is about exist, one set per VM (else it would prove nothing).
    for key in (("primary", "osr-send"), ("primary", "osr-send-acks"),
                ("primary", "osr-log-writer"), ("recovery", "osr-recv"),
                ("recovery", "osr-log-writer")):
        assert seen.get(key, 0) >= VMS, f"{key}: {seen.get(key, 0)} threads, expected {VMS}"
