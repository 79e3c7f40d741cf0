"""What the benchmark scripts share: errors, logging, files, fio's JSON, signals."""

import json
import os
import re
import signal
import socket
import subprocess
import sys


class BenchError(Exception):
    """An operating error a person can act on (message says what to do)."""


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def tail(text, lines=15):
    return "\n".join(text.strip().splitlines()[-lines:])


def read_file_text(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def free_port():
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_size(text):
    """Bytes of "64", "4K", "1M", "2G" (binary units)."""
    units = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}
    t = text.strip().upper()
    return int(t[:-1]) * units[t[-1]] if t[-1] in units else int(t)


def free_bytes(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def parse_fio_json(text):
    # The nbd engine prints "fio: connected to NBD server" into the same
    # output as the JSON, so skip to the first line that opens an object.
    m = re.search(r"^\{", text, re.M)
    if not m:
        raise BenchError("fio printed no JSON")
    return json.loads(text[m.start():])


def stop_process(proc, term_timeout_s, kill_timeout_s):
    """SIGTERM, wait, then SIGKILL, wait. Returns (exit code or None, how)."""
    if proc.poll() is not None:
        return proc.returncode, "already exited"
    try:
        proc.send_signal(signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        return proc.wait(timeout=term_timeout_s), "SIGTERM"
    except subprocess.TimeoutExpired:
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass
    try:
        return proc.wait(timeout=kill_timeout_s), "SIGKILL"
    except subprocess.TimeoutExpired:
        return None, f"still running after SIGKILL (pid {proc.pid})"
