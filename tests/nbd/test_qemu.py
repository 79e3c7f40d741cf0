"""QEMU's own NBD client (qemu-io, qemu-img) against osrd nbd-serve."""

import json
import random

from conftest import (KIB, MIB, assert_same_bytes, close, connect, data_extents,
                      make_sparse_file, require_tool, run)


def qemu_io(uri, *commands, check=True):
    exe = require_tool("qemu-io")
    cmd = [exe, "-f", "raw", uri]
    for c in commands:
        cmd += ["-c", c]
    proc = run(cmd, check=False, timeout=60)
    out = proc.stdout + proc.stderr
    if check:
        assert proc.returncode == 0, f"qemu-io failed ({proc.returncode}): {commands}\n{out}"
        assert "Pattern verification failed" not in out, out
        assert "error" not in out.lower() and "failed" not in out.lower(), out
    return proc


def test_qemu_io_write_read_zero_discard_flush_fua(server, tmp_path):
    uri = server.tcp_uri
    qemu_io(uri,
            "write -P 0xab 0 64k",
            "write -f -P 0xcd 64k 64k",           # FUA
            "write -P 0x11 128k 64k",
            "write -z 128k 64k",                  # WRITE_ZEROES with NO_HOLE
            "write -P 0x22 192k 64k",
            "write -z -u 192k 64k",               # WRITE_ZEROES, may unmap
            "write -P 0x33 256k 128k",
            "discard 256k 64k",                   # TRIM
            "write -P 0x44 1000000 3000",         # unaligned
            "flush",
            "read -P 0xab 0 64k")
    # A second connection (over the unix socket) sees everything.
    qemu_io(server.unix_uri,
            "read -P 0xab 0 64k",
            "read -P 0xcd 64k 64k",
            "read -P 0 128k 64k",
            "read -P 0 192k 64k",
            "read -P 0 256k 64k",
            "read -P 0x33 320k 64k",
            "read -P 0 384k 606784",
            "read -P 0x44 1000000 3000",
            "read -P 0 1003000 1000")
    # The -P check must be able to fail.
    bad = qemu_io(uri, "read -P 0xab 64k 4k", check=False)
    assert bad.returncode != 0 or "Pattern verification failed" in bad.stdout

    server.stop_clean()
    image = (tmp_path / "disk.img").read_bytes()
    expected = bytearray(32 * MIB)
    expected[0:64 * KIB] = b"\xab" * (64 * KIB)
    expected[64 * KIB:128 * KIB] = b"\xcd" * (64 * KIB)
    expected[320 * KIB:384 * KIB] = b"\x33" * (64 * KIB)
    expected[1000000:1003000] = b"\x44" * 3000
    assert_same_bytes(image, expected, "image file after clean stop")
    # write -z -u and discard punched holes in the file: [192k, 320k) holds no data.
    for off, length in data_extents(tmp_path / "disk.img"):
        assert off + length <= 192 * KIB or off >= 320 * KIB, \
            f"unmap/discard left data at [{off}, {off + length}) in the image file"


def test_qemu_img_convert_into_and_out_of_export(server, tmp_path):
    qemu_img = require_tool("qemu-img")
    size = 32 * MIB
    src = tmp_path / "src.img"
    src_bytes = make_sparse_file(src, size, [(0, 1 * MIB), (3 * MIB + 4096, 200 * KIB),
                                             (9 * MIB, 4 * MIB), (size - 64 * KIB, 64 * KIB)],
                                 seed=7)
    # Put garbage where src has holes, so convert -n must zero it.
    h = connect(server.tcp_uri)
    try:
        h.pwrite(b"\xff" * (512 * KIB), 5 * MIB)
        h.pwrite(b"\xee" * 4096, 20 * MIB + 17)
    finally:
        close(h)

    run([qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", src, server.tcp_uri])
    run([qemu_img, "compare", "-f", "raw", "-F", "raw", src, server.tcp_uri])

    out = tmp_path / "out.img"
    run([qemu_img, "convert", "-f", "raw", "-O", "raw", server.unix_uri, out])
    run([qemu_img, "compare", "-f", "raw", "-F", "raw", src, out])
    assert_same_bytes(out.read_bytes(), src_bytes, "qemu-img convert out of the export")

    # compare must be able to fail: change one byte through NBD.
    h = connect(server.tcp_uri)
    try:
        h.pwrite(b"\x5a", 9 * MIB + 12345)
    finally:
        close(h)
    diff = run([qemu_img, "compare", "-f", "raw", "-F", "raw", src, server.tcp_uri], check=False)
    assert diff.returncode == 1, f"qemu-img compare did not see the changed byte: {diff.stdout}"

    server.stop_clean()
    image = bytearray((tmp_path / "disk.img").read_bytes())
    assert image[9 * MIB + 12345] == 0x5A
    image[9 * MIB + 12345] = src_bytes[9 * MIB + 12345]
    assert_same_bytes(bytes(image), src_bytes, "image file after convert")


def merge_map(entries):
    """qemu-img map JSON -> merged [(start, length, data)] with data a bool."""
    out = []
    for e in entries:
        item = (e["start"], e["length"], bool(e["data"]))
        if not e["data"]:
            assert e["zero"], f"a hole not reported as zero: {e}"
        if out and out[-1][2] == item[2] and out[-1][0] + out[-1][1] == item[0]:
            out[-1] = (out[-1][0], out[-1][1] + item[1], item[2])
        else:
            out.append(item)
    return out


def test_qemu_img_map_reports_known_sparse_layout(server):
    qemu_img = require_tool("qemu-img")
    size = 32 * MIB
    rng = random.Random(3)
    h = connect(server.tcp_uri)
    try:
        h.pwrite(rng.randbytes(256 * KIB), 1 * MIB)
        h.pwrite(rng.randbytes(64 * KIB), 4 * MIB)
        h.pwrite(rng.randbytes(2 * MIB), 8 * MIB)
        h.trim(512 * KIB, 9 * MIB)                       # a hole inside the data
        h.pwrite(rng.randbytes(128 * KIB), 16 * MIB)
        h.zero(128 * KIB, 16 * MIB)                      # zero without NO_HOLE punches
        h.pwrite(rng.randbytes(64 * KIB), size - 64 * KIB)
        h.flush()
    finally:
        close(h)
    proc = run([qemu_img, "map", "--output=json", "-f", "raw", server.tcp_uri])
    layout = merge_map(json.loads(proc.stdout))
    expected = [
        (0, 1 * MIB, False),
        (1 * MIB, 256 * KIB, True),
        (1 * MIB + 256 * KIB, 4 * MIB - (1 * MIB + 256 * KIB), False),
        (4 * MIB, 64 * KIB, True),
        (4 * MIB + 64 * KIB, 8 * MIB - (4 * MIB + 64 * KIB), False),
        (8 * MIB, 1 * MIB, True),
        (9 * MIB, 512 * KIB, False),
        (9 * MIB + 512 * KIB, 512 * KIB, True),
        (10 * MIB, size - 64 * KIB - 10 * MIB, False),
        (size - 64 * KIB, 64 * KIB, True),
    ]
    assert layout == expected
