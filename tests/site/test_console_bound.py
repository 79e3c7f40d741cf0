"""A running VM's console log stays bounded (console_log_limit): past the limit it moves to
console.log.1 (here vm.log.1: a process VM's console is its output) and starts again at 0,
while the VM runs on; the VM's next output lands at the new start (its writer appends), and
a reader whose offset lies past the new end reads from 0."""

import os
import signal
import subprocess

import pytest

from conftest import MIB, api_ok, group_status, require_libnbd, write_config
import osrtest
from osrtest import wait_for

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

        # A reader that followed the old log (its offset past the new end) reads from 0.
        got = api_ok(site, "GET", f"/groups/{VM}/console?offset={10 ** 9}&bytes=65536")
        assert got["offset"] == 0, got

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
