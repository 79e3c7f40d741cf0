"""Reprotect checks before it trusts (issue 10, case 7).

Exact-mode reprotect ships only what the old primary's capture history names (the records
the recovery site never got, the regions its bitmaps mark). That is right only while the
old primary's images and history are what they were when it was fenced. Here the old
primary's files are changed outside osr while the quickstart is stopped, after failover
and commit: an image written (with and without its mtime set back), the capture log's
segment cut short, the segments removed, the image put back from a backup taken before
the failover. Reprotect must notice (its fence fingerprint
disagrees), compare block hashes instead, say so in the job, and leave the old primary's
store byte for byte equal to the new primary's disk. Untouched, it stays exact, also
after a kill -9 of the quickstart (the files are then reopened without a clean close).

The VM's own writes stay below WRITE_LIMIT; the outside writes land at POKE_AT, a block
the VM never wrote (so exact mode would never ship it back).
"""

import os
import shutil

import pytest

from conftest import (KIB, MIB, apply_model, apply_op, assert_point, assert_same_bytes,
                      close_handle, connect, create_vm, protect, random_op, read_uri)

DISK = 16 * MIB
WRITE_LIMIT = 12 * MIB
POKE_AT = 14 * MIB + 4 * KIB
POKE = b"written outside osr after the fence " * 100


class Disk:
    """One VM disk ("os") where it runs now, written one request at a time, with a model of
    its bytes (a base plus the requests made since)."""

    def __init__(self, osr, rng):
        self.osr = osr
        self.rng = rng
        self.model = bytearray(DISK)
        self.h = None
        self.refresh()

    def refresh(self):
        self.close()
        shown = self.osr.ok("vm", "show", "rv")
        self.uri = shown["disks"][0]["uri"]
        self.site = shown["site"]

    def write(self, n, max_len=128 * KIB, weights=(8, 1, 1)):
        if self.h is None:
            self.h = connect(self.uri)
        for i in range(n):
            op = random_op(self.rng, WRITE_LIMIT, max_len=max_len,
                           weights=weights if i < n - 1 else (1, 0, 0))
            apply_op(self.h, *op)
            apply_model(self.model, *op)

    def read(self):
        self.close()
        return read_uri(self.uri, DISK)

    def close(self):
        if self.h is not None:
            close_handle(self.h)
            self.h = None


def step_message(job, name_start):
    for s in job.get("steps", []):
        if s.get("name", "").startswith(name_start):
            return s.get("message", "")
    pytest.fail(f"no step starting {name_start!r} in {job}")


def change_old_primary(capture, image, backup, fault):
    """Changes the old primary's files as `fault` says (the quickstart is stopped)."""
    segments = sorted(p for p in capture.iterdir() if p.suffix == ".log")
    assert segments, f"no capture log segment in {capture}: {list(capture.iterdir())}"
    if fault in ("image", "image-mtime-kept"):
        before = os.stat(image)
        with open(image, "r+b") as f:
            f.seek(POKE_AT)
            f.write(POKE)
            f.flush()
            os.fsync(f.fileno())
        if fault == "image-mtime-kept":
            os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
            assert os.stat(image).st_mtime_ns == before.st_mtime_ns
    elif fault == "log-truncated":
        # The newest segment that holds records (one past the log's end may be empty).
        held = [p for p in segments if p.stat().st_size > 8 * KIB]
        assert held, f"no segment with records to cut: {[(p, p.stat().st_size) for p in segments]}"
        tail = held[-1]
        for p in segments[segments.index(tail) + 1:]:
            p.unlink()  # else the cut one is not the tail: the log would be refused
        size = tail.stat().st_size
        os.truncate(tail, size // 2)
    elif fault == "log-removed":
        for s in segments:
            s.unlink()
    elif fault == "image-restored":
        # Put back as a restore would: a new file in its place, its times as they were.
        st = os.stat(image)
        os.utime(backup, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(backup, image)
    else:
        assert fault in ("none", "none-kill9"), fault


# fault -> (reprotect mode, the checks the old primary reports, words of found.why)
CASES = {
    "none": ("exact", set(), ["what the old primary never sent"]),
    "none-kill9": ("exact", set(), ["what the old primary never sent"]),
    "image-restored": ("hash", {"image_replaced"},
                       ["the old primary's disk os is another file than at the fence"]),
    "image": ("hash", {"image_modified"},
              ["the old primary's disk os was changed after the fence (mtime"]),
    "image-mtime-kept": ("hash", {"image_changed"},
                         ["the old primary's disk os was changed after the fence (ctime"]),
    "log-truncated": ("hash", {"log_end"},
                      ["the old primary's capture log ends at seq", "at the fence it ended"]),
    "log-removed": ("hash", {"log_end"}, ["the old primary's capture log ends at seq 0"]),
}


@pytest.mark.deadline(120)
@pytest.mark.parametrize("fault", list(CASES))
def test_reprotect_checks_the_old_primary(env, rng, fault):
    osr, qs = env.osr, env.qs
    want_mode, want_checks, want_why = CASES[fault]
    # A slow link: records are still at the primary when it is fenced, so its history
    # matters (exact mode would undo only the records it still names).
    osr.ok("policy", "create", "slow", "--crash-interval", "24h", "--bandwidth", "1M",
           "--compression", "none")
    create_vm(osr, "rv", [("os", "16M", DISK)])
    disk = Disk(osr, rng)
    disk.write(10)
    group = qs.data_dir / "primary" / "groups" / "rv"
    image, capture = group / "os.img", group / "capture"
    backup = qs.data_dir.parent / "os.img.backup"
    if fault == "image-restored":
        shutil.copyfile(image, backup)  # every write so far was answered: it is in the file
    protect(osr, "rv", policy="slow")
    disk.write(5)
    p1 = assert_point(osr.ok("point", "create", "rv"))
    at_p1 = bytes(disk.model)
    disk.write(24, weights=(1, 0, 0))
    old_model = bytes(disk.model)
    disk.close()

    job = osr.job_ok("failover", "rv", "--point", "latest-processed", job_type="failover")
    assert job.get("point") == p1 and job.get("epoch") == 2, job
    store_seq = osr.ok("item", "show", "rv")["failover"]["store_seq"]
    disk.model = bytearray(at_p1)
    disk.refresh()
    assert disk.site == "recovery", disk.site
    disk.write(10)
    osr.job_ok("commit", "rv", job_type="commit")

    # The old primary's files, changed while nothing runs.
    if fault == "none-kill9":
        qs.kill9()
    else:
        qs.stop_clean()
    assert image.exists() and capture.is_dir(), list(group.iterdir())
    assert (capture / "fence").exists() and (capture / "fence-fingerprint").exists(), \
        f"the fence left no fingerprint: {list(capture.iterdir())}"
    with open(image, "rb") as f:
        f.seek(POKE_AT)
        assert f.read(len(POKE)) == bytes(len(POKE)), "the VM wrote where the test pokes"
    change_old_primary(capture, image, backup, fault)
    qs.restart()
    disk.refresh()

    job = osr.job_ok("reprotect", "rv", job_type="reprotect")
    found = job.get("found")
    assert isinstance(found, dict), job
    assert job.get("mode") == want_mode, f"{fault}: reprotect mode {job.get('mode')}: {found}"
    why = found.get("why", "")
    for words in want_why:
        assert words in why, f"{fault}: found.why does not say {words!r}: {why!r}"
    message = step_message(job, "Find what differs")
    print(f"{fault}: step message: {message}")
    assert message == f"{want_mode}: {why}", f"{fault}: step message {message!r}"
    checks = found.get("checks", [])
    got = {c.get("check") for c in checks}
    assert want_checks <= got, f"{fault}: checks {checks}, expected {want_checks} among them"
    if want_mode == "exact":
        assert found.get("verified") is True, found
        assert found.get("known_at_recovery_site_upto") == store_seq, (found, store_seq)
    else:
        assert found.get("verified") is False, found
        assert found.get("bytes", 0) > 0 and found.get("compared") == DISK // (64 * KIB), found
        for c in checks[:3]:
            assert isinstance(c.get("reason"), str) and c["reason"] in why, \
                f"{fault}: check {c} not in why {why!r}"
        if fault.startswith("image"):
            assert all(c.get("disk") == "os" for c in checks), checks

    # The old primary's store (now the recovery side) holds the new primary's disk,
    # byte for byte, at the first point.
    item = osr.ok("item", "show", "rv")
    assert item["state"] == "Protected" and item["source"] == "recovery", item
    first = assert_point(item.get("latest_point"), "first point after reprotect")
    now = disk.read()
    assert_same_bytes(now, bytes(disk.model), f"{fault}: the new primary's disk")
    drill = osr.job_ok("test-failover", "rv", "--point", first["id"], job_type="test-failover")
    uri = drill["disks"][0]["uri"]
    nbd_of = {s["name"]: s["nbd"] for s in osr.ok("site", "list")}
    assert uri.startswith(f"nbd://{nbd_of['primary']}/view/"), (drill, nbd_of)
    assert_same_bytes(read_uri(uri, DISK), now,
                      f"{fault}: the old primary's store at the first point")
    osr.job_ok("test-failover-cleanup", "rv", job_type="test-failover-cleanup")
    # What the old primary held is gone from it (undone), outside bytes included.
    assert now != old_model
