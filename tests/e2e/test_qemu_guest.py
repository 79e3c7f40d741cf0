"""A real QEMU guest fails over: a small Linux (Debian's kernel and busybox, made by
tests/vm/build_guest.sh) boots with its disk over NBD from the primary site, writes a
file, powers off; `osr failover --shutdown-source` starts it at the recovery site on the
recovery point's view, where it boots again and reads the file back.

TCG is slow (a boot takes seconds): this is the one QEMU test. It is skipped, with a
message saying so, only where qemu-system-x86_64 is absent (scripts/bootstrap installs
it)."""

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import protect

REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT_S = 120


def guest_files():
    """Builds (or reuses) the guest in build/guest; returns (vmlinuz, initramfs)."""
    out = REPO / "build" / "guest"
    try:
        p = subprocess.run(["bash", str(REPO / "tests/vm/build_guest.sh"), str(out)],
                           capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.fail("tests/vm/build_guest.sh took more than 600 s")
    assert p.returncode == 0, f"build_guest.sh failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    return out / "vmlinuz", out / "initramfs.cpio.gz"


def wait_console(path, want, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if want in text:
            return text
        if "OSR-ERROR:" in text:
            pytest.fail(f"the guest failed: {text[-2000:]}")
        time.sleep(0.25)
    text = path.read_text(errors="replace") if path.exists() else "(no console log)"
    pytest.fail(f"no {want!r} on the console within {timeout}s: {text[-3000:]}")


@pytest.mark.deadline(420)
def test_qemu_guest_file_survives_failover(env):
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is absent (apt-get install qemu-system-x86, or "
                    "scripts/bootstrap): the real-VM failover test cannot run")
    kernel, initrd = guest_files()
    osr = env.osr
    append = "console=ttyS0 quiet panic=-1 osr.mode=auto osr.text=written-at-primary"
    qemu_args = f"-kernel {kernel} -initrd {initrd} -append '{append}' -no-reboot"
    osr.ok("vm", "create", "guest", "--site", "primary", "--disk", "os:16M", "--driver", "qemu",
           "--memory", "256M", "--qemu-args", qemu_args, "--shutdown-timeout", "20")
    protect(osr, "guest")
    shown = osr.ok("vm", "start", "guest")
    assert shown["running"] is True and shown["site"] == "primary", shown
    primary_console = env.qs.data_dir / "primary" / "groups" / "guest" / "run" / "console.log"
    wait_console(primary_console, "OSR-WROTE", BOOT_TIMEOUT_S)
    # It powered itself off: qemu exits (-no-reboot).
    deadline = time.monotonic() + 30
    while osr.ok("vm", "show", "guest")["running"]:
        assert time.monotonic() < deadline, "the guest did not power off"
        time.sleep(0.2)
    point = osr.ok("point", "create", "guest")
    assert point["seq"] > 0, point

    job = osr.job_ok("failover", "guest", "--point", "latest", "--shutdown-source",
                     job_type="failover")
    assert [s for s in job["steps"] if s["name"].startswith("Start the VM at recovery")], job
    shown = osr.ok("vm", "show", "guest")
    assert shown["site"] == "recovery" and shown["epoch"] == 2, shown
    recovery_console = env.qs.data_dir / "recovery" / "groups" / "guest" / "run" / "console.log"
    text = wait_console(recovery_console, "OSR-READ:", BOOT_TIMEOUT_S)
    assert "OSR-READ:written-at-primary" in text, text[-2000:]
    # The log says which VM started, not its command line (a kernel command line or a
    # path may be a secret).
    log = env.qs.log_path.read_text(errors="replace")
    assert "VM guest: starting qemu" in log, log[-3000:]
    assert "osr.text=written-at-primary" not in log and str(kernel) not in log, log[-3000:]
