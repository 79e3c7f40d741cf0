"""A running VM's console log stays bounded (console_log_limit): past the limit it moves to
console.log.1 (here vm.log.1: a process VM's console is its output) and starts again at 0,
while the VM runs on; the VM's next output lands at the new start (its writer appends), and
a reader whose offset lies past the new end reads from 0."""

import os
import re
import signal
import subprocess
import threading

import pytest

from conftest import MIB, api_ok, group_status, require_libnbd, write_config, SiteProcess
import osrtest
from osrtest import wait_for
from test_dr_daemons import Osr, VaultProcess, register

VM = "vm1"
LIMIT = 64 * 1024
LINES = 400   # of 1000 bytes: 400 KB in all, six times the limit
TRIGGER = "go-on"


def test_a_running_vms_console_log_is_cut_at_its_limit(site_factory, tmp_path):
    require_libnbd()
    site = site_factory("primary",
                        extra=f'allow_api_commands = true\nconsole_log_limit = "{LIMIT}"\n')
    api_ok(site, "PUT", f"/groups/{VM}", {"disks": [{"name": "os", "size_bytes": 4 * MIB}]},
           status=201)
    trigger = tmp_path / TRIGGER
    # About 100 KB/s, then it waits for the test (bounded: at most 120 s) and prints once
    # more.
    command = (f'for i in $(seq 1 {LINES}); do printf "%0999d\\n" $i; '
               f'[ $((i % 10)) = 0 ] && sleep 0.1; done; echo OSR-PRINTED; '
               f'n=0; while [ ! -e {trigger} ] && [ $n -lt 1200 ]; do sleep 0.1; n=$((n+1)); done; '
               f'echo OSR-AFTER-CUT; exec sleep 600')
    api_ok(site, "POST", f"/groups/{VM}/vm/start", {"driver": "process", "command": command},
           status=204)
    pid = group_status(site, VM)["vm"]["pid"]
    run = site.data_dir / "groups" / VM / "run"
    log, older = run / "vm.log", run / "vm.log.1"
    try:
        # Everything is printed; the watcher (every second) cut the log since.
        def printed_and_cut():
            old = older.read_bytes() if older.exists() else b""
            return b"OSR-PRINTED" in old + log.read_bytes() and log.stat().st_size <= LIMIT
        wait_for(printed_and_cut, 60, "the console log to be cut below its limit",
                 detail=lambda: (log.stat().st_size, older.exists()))
        assert older.exists(), "nothing was moved to vm.log.1"
        assert LIMIT < older.stat().st_size <= LINES * 1000 + 100, older.stat().st_size
        # On disk: at most about twice the limit, not the 400 KB printed.
        assert log.stat().st_size + older.stat().st_size < LINES * 1000, "the log was not cut"
        assert group_status(site, VM)["vm"]["running"], "the VM stopped"
        os.kill(pid, 0)

        # A reader that followed the old log (its offset past the new end) reads from 0,
        # and is told the log was cut: how often, and its size then (what vm.log.1 holds).
        got = api_ok(site, "GET", f"/groups/{VM}/console?offset={10 ** 9}&bytes=65536")
        assert got["offset"] == 0, got
        assert got["cuts"] >= 1, got
        assert got["cut_size"] == older.stat().st_size, (got, older.stat().st_size)

        # The VM's next line lands at the start of the cut log, no hole before it.
        size_before = log.stat().st_size
        trigger.write_text("")
        wait_for(lambda: b"OSR-AFTER-CUT" in log.read_bytes(), 30,
                 "the VM's line after the cut", detail=lambda: log.read_bytes()[-200:])
        raw = log.read_bytes()
        assert b"\0" not in raw, "the writer wrote at its old offset: the log has a hole"
        assert len(raw) <= size_before + len(b"OSR-AFTER-CUT\n") + 2000, len(raw)
        got = api_ok(site, "GET", f"/groups/{VM}/console?bytes=65536")
        assert "OSR-AFTER-CUT" in got["text"], got
        assert got["size"] == len(raw), (got["size"], len(raw))
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("value", ['"100"', '"lots"', "-1"])
def test_a_console_limit_that_is_not_one_is_refused(tmp_path, value):
    """A config error names the key; the site does not start."""
    config, _ = write_config(tmp_path, "primary", extra=f"console_log_limit = {value}\n")
    p = subprocess.run([str(osrtest.require_osrd()), "site", "--config", str(config)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0, p.stdout
    assert "console_log_limit" in p.stderr, p.stderr


FOLLOW_LINES = 3000   # of 200 bytes: 600 KB, about ten times the limit, at about 100 KB/s


def test_a_follower_is_told_what_a_cut_kept_from_it(tmp_path, new_catalog):
    """`osr vm console VM -f` through a vault, while the VM prints ten times the limit: the
    lines it shows only ever go forward (never a line twice, never an old line after a new
    one), each gap in them comes with a notice on stderr that the site moved the log aside,
    and it reaches the live end (what the VM prints after the burst)."""
    require_libnbd()
    config, data_dir = write_config(
        tmp_path, "primary", extra=f'allow_api_commands = true\nconsole_log_limit = "{LIMIT}"\n')
    site = SiteProcess("primary", config, data_dir, tmp_path / "primary.stderr")
    vault = VaultProcess(new_catalog(tmp_path / "vault.db"), tmp_path, osrtest.free_port(),
                         tmp_path / "vault.stderr")
    procs = [site, vault]
    follower, pid = None, None
    try:
        site.start()
        vault.start()
        osr = Osr(vault, (site,))
        register(osr, site)
        # After the burst, OSR-DONE once a second (bounded): a cut may take what the follower
        # had not read yet, the burst's last lines included (announced), but the live end
        # reaches it.
        command = (f'for i in $(seq 1 {FOLLOW_LINES}); do printf "L%06d %0192d\\n" $i 0; '
                   f'[ $((i % 50)) = 0 ] && sleep 0.1; done; n=0; '
                   f'while [ $n -lt 600 ]; do echo OSR-DONE; sleep 1; n=$((n+1)); done; '
                   f'exec sleep 600')
        osr.ok("vm", "create", VM, "--site", "primary", "--disk", "os:4M", "--driver", "process",
               "--command", command)
        cmd = [str(osrtest.require_osr()), "--vault", vault.url, "vm", "console", VM, "-f"]
        follower = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=osrtest.token_env(vault.token_file))
        err = []
        threading.Thread(target=lambda: err.extend(follower.stderr), daemon=True).start()
        osr.ok("vm", "start", VM)
        pid = group_status(site, VM)["vm"]["pid"]
        # Bounded: a watchdog ends the follower (and so the loop) if OSR-DONE never shows.
        watchdog = threading.Timer(120 * osrtest.time_factor(), follower.kill)
        watchdog.start()
        shown = []
        for line in follower.stdout:
            shown.append(line.rstrip("\n"))
            if line.startswith("OSR-DONE"):
                break
        watchdog.cancel()
        assert shown and shown[-1] == "OSR-DONE", (shown[-3:], err, osr.logs())
        full = re.compile(r"^L(\d{6}) 0{192}$")
        numbers = [int(m.group(1)) for m in map(full.match, shown) if m]
        # A line a cut took the rest of (a read ended within it) ends there, on its own: a
        # prefix of a whole line, never two lines spliced.
        cut_short = [s for s in shown[:-1] if not full.match(s)]
        assert all(re.match(r"^L\d{0,6}( 0{0,192})?$", s) for s in cut_short), cut_short[:3]
        gaps = sum(1 for a, b in zip(numbers, numbers[1:]) if b != a + 1)
        backwards = [(a, b) for a, b in zip(numbers, numbers[1:]) if b <= a]
        assert not backwards, f"lines out of order or twice: {backwards[:5]}"
        notices = [e for e in err if "moved the console log aside" in e]
        assert gaps <= len(notices) and len(cut_short) <= len(notices), (gaps, cut_short, err)
        # The VM never restarted: no read of a cut log passed for the old one.
        assert not [e for e in err if "started again" in e], err
        assert site.data_dir.joinpath("groups", VM, "run", "vm.log.1").exists(), \
            "the log was never cut: the test showed nothing"
        # The burst's last line, unless a cut took it before the follower read it (a gap at
        # the end, announced like any other).
        assert numbers[-1] == FOLLOW_LINES or notices, (numbers[-3:], err)
    finally:
        if follower:
            follower.kill()
            follower.wait(timeout=30)
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        osrtest.stop_all_clean(procs)
