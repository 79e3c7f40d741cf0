"""fio's nbd engine (libnbd underneath), several jobs, each on its own connection."""

import json

from conftest import KIB, MIB, close, connect, require_tool, run

JOBS = 4
JOB_BYTES = 4 * MIB


def fio_args(uri, *extra):
    fio = require_tool("fio")
    return [fio, "--name=osrd", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
            "--bsrange=4k-64k", "--bs_unaligned=0", f"--numjobs={JOBS}", f"--size={JOB_BYTES}",
            f"--offset_increment={JOB_BYTES}", "--iodepth=8", "--verify=crc32c",
            "--verify_fatal=1", "--randrepeat=1", "--randseed=1234", "--group_reporting",
            "--output-format=json", "--verify_state_save=0", *extra]


def fio_json(proc):
    text = proc.stdout
    start = text.find("{")
    assert start >= 0, f"fio printed no JSON: {text[:2000]}\n{proc.stderr[:2000]}"
    return json.loads(text[start:])


def test_fio_randwrite_verify_then_verify_again_after_restart(osrd_factory, tmp_path):
    img = tmp_path / "fio.img"
    srv = osrd_factory(img, size="32M")
    proc = run(fio_args(srv.tcp_uri, "--do_verify=1"), timeout=150, cwd=tmp_path)
    doc = fio_json(proc)
    (job,) = doc["jobs"]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == JOBS * JOB_BYTES, job["write"]["io_bytes"]
    assert job["read"]["io_bytes"] >= JOBS * JOB_BYTES, "the verify phase read nothing"
    srv.stop_clean()

    # The data is in the image: a new server on the same file verifies it again.
    srv = osrd_factory(img)
    proc = run(fio_args(srv.tcp_uri, "--verify_only"), timeout=150, cwd=tmp_path)
    (job,) = fio_json(proc)["jobs"]
    assert job["error"] == 0
    assert job["read"]["io_bytes"] >= JOBS * JOB_BYTES

    # The verify pass must be able to fail: trim a piece of job 2's range.
    h = connect(srv.tcp_uri)
    try:
        h.trim(1 * MIB, 2 * JOB_BYTES + 512 * KIB)
    finally:
        close(h)
    bad = run(fio_args(srv.tcp_uri, "--verify_only"), timeout=150, check=False, cwd=tmp_path)
    assert bad.returncode != 0, "fio verify passed over a trimmed range"
