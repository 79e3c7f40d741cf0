"""libnbd's command line tools (nbdinfo, nbdcopy) against osrd nbd-serve."""

import json

from conftest import (BLOCK_SIZE_MAX, BLOCK_SIZE_MIN, BLOCK_SIZE_PREFERRED, KIB, MIB,
                      assert_same_bytes, close, connect, make_sparse_file, require_tool, run)


def nbdinfo_json(*args):
    exe = require_tool("nbdinfo")
    proc = run([exe, "--json", *args], timeout=30)
    return json.loads(proc.stdout)


def test_nbdinfo_json_reports_size_flags_and_contexts(server):
    for uri in (server.tcp_uri, server.unix_uri):
        doc = nbdinfo_json(uri)
        assert doc["protocol"] == "newstyle-fixed"
        assert doc["TLS"] is False
        assert doc["structured"] is True
        (export,) = doc["exports"]
        assert export["export-name"] == ""
        assert export["export-size"] == 32 * MIB
        for flag in ("can_trim", "can_zero", "can_fua", "can_multi_conn", "can_cache",
                     "can_df", "can_flush", "can_fast_zero"):
            assert export[flag] is True, f"{flag} is {export.get(flag)!r} over {uri}"
        assert export["is_read_only"] is False
        assert "base:allocation" in export["contexts"]
        assert export["block_size_minimum"] == BLOCK_SIZE_MIN
        assert export["block_size_preferred"] == BLOCK_SIZE_PREFERRED
        assert export["block_size_maximum"] == BLOCK_SIZE_MAX


def test_nbdinfo_read_only_export(osrd_factory, tmp_path):
    img = tmp_path / "ro.img"
    make_sparse_file(img, 16 * MIB, [(0, 64 * KIB)])
    srv = osrd_factory(img, read_only=True, export="ro")
    (export,) = nbdinfo_json(srv.tcp_uri)["exports"]
    assert export["export-name"] == "ro"
    assert export["is_read_only"] is True
    assert export["export-size"] == 16 * MIB


def test_nbdinfo_list_shows_the_named_export(osrd_factory, tmp_path):
    nbdinfo = require_tool("nbdinfo")
    srv = osrd_factory(tmp_path / "named.img", size="16M", export="disk0", socket=True)
    assert srv.tcp_uri.endswith("/disk0"), srv.tcp_uri
    assert srv.unix_uri.startswith("nbd+unix:///disk0?socket="), srv.unix_uri
    doc = nbdinfo_json("--list", srv.tcp_uri)
    names = [e["export-name"] for e in doc["exports"]]
    assert names == ["disk0"]
    assert doc["exports"][0]["export-size"] == 16 * MIB
    text = run([nbdinfo, "--list", srv.unix_uri], timeout=30).stdout
    assert 'export="disk0"' in text, text
    # An export that does not exist is refused.
    host, port = srv.tcp_address
    bad = run([nbdinfo, f"nbd://{host}:{port}/nosuch"], check=False, timeout=30)
    assert bad.returncode != 0, f"nbdinfo accepted an unknown export: {bad.stdout}"


def test_nbdcopy_round_trip_file_nbd_file(server, tmp_path):
    nbdcopy = require_tool("nbdcopy")
    size = 32 * MIB
    src = tmp_path / "src.img"
    src_bytes = make_sparse_file(src, size, [(0, 3 * MIB), (6 * MIB + 512, 1 * MIB),
                                             (17 * MIB, 5 * MIB), (size - 4096, 4096)], seed=11)
    # Garbage in the export where src has holes: nbdcopy must zero it.
    h = connect(server.tcp_uri)
    try:
        h.pwrite(b"\xff" * MIB, 12 * MIB)
        h.pwrite(b"\xff" * 4096, 3 * MIB)
    finally:
        close(h)

    run([nbdcopy, "--connections=4", "--requests=16", src, server.tcp_uri], timeout=120)
    out1 = tmp_path / "out1.img"
    run([nbdcopy, server.tcp_uri, out1], timeout=120)
    assert_same_bytes(out1.read_bytes(), src_bytes, "nbdcopy file -> nbd -> file over TCP")

    out2 = tmp_path / "out2.img"
    run([nbdcopy, "--connections=1", server.unix_uri, out2], timeout=120)
    assert_same_bytes(out2.read_bytes(), src_bytes, "nbdcopy out over the unix socket")

    # The other direction through the unix socket with a different source.
    src2 = tmp_path / "src2.img"
    src2_bytes = make_sparse_file(src2, size, [(1 * MIB, 2 * MIB), (30 * MIB, 100 * KIB)], seed=12)
    run([nbdcopy, src2, server.unix_uri], timeout=120)
    out3 = tmp_path / "out3.img"
    run([nbdcopy, server.tcp_uri, out3], timeout=120)
    assert_same_bytes(out3.read_bytes(), src2_bytes, "nbdcopy second round trip")

    server.stop_clean()
    assert_same_bytes((tmp_path / "disk.img").read_bytes(), src2_bytes, "image file after nbdcopy")
