"""`osrd nbd-serve` command line: sizes, image creation, listeners, signals."""

import os
import signal
import subprocess

import pytest

from conftest import (KIB, MIB, assert_same_bytes, close, connect, osrd_path, make_sparse_file)


@pytest.mark.parametrize("size,expected", [("16M", 16 * MIB), ("16MiB", 16 * MIB),
                                           ("16777216", 16 * MIB), ("1G", 1 << 30),
                                           ("20480K", 20 * MIB), ("20480KiB", 20 * MIB)])
def test_size_creates_a_sparse_image(osrd_factory, tmp_path, size, expected):
    img = tmp_path / "new.img"
    srv = osrd_factory(img, size=size)
    st = os.stat(img)
    assert st.st_size == expected
    assert st.st_blocks * 512 <= 1 * MIB, f"image is not sparse: {st.st_blocks} blocks"
    h = connect(srv.tcp_uri)
    try:
        assert h.get_size() == expected
        assert h.pread(4096, expected - 4096) == bytes(4096)
    finally:
        close(h)


def test_existing_image_keeps_its_size_and_data(osrd_factory, tmp_path):
    img = tmp_path / "old.img"
    content = make_sparse_file(img, 16 * MIB, [(0, 64 * KIB), (15 * MIB, 1 * MIB)], seed=3)
    for size in (None, "16M"):
        srv = osrd_factory(img, size=size)
        h = connect(srv.tcp_uri)
        try:
            assert h.get_size() == 16 * MIB
            assert h.pread(16 * MIB, 0) == content
        finally:
            close(h)
        srv.stop_clean()


def test_existing_image_with_another_size_is_refused(tmp_path):
    img = tmp_path / "old.img"
    make_sparse_file(img, 16 * MIB, [(0, 4096)])
    binary = osrd_path()
    if not binary.exists():
        pytest.fail(f"osrd binary not found at {binary}", pytrace=False)
    try:
        proc = subprocess.run([str(binary), "nbd-serve", "--image", str(img), "--size", "32M",
                               "--listen", "127.0.0.1:0"], capture_output=True, text=True,
                              timeout=10, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail("osrd kept running with an image of the wrong size")
    assert proc.returncode != 0
    assert "osrd: ready" not in proc.stdout
    assert proc.stderr.strip(), "no error message on stderr"
    assert os.stat(img).st_size == 16 * MIB


def test_missing_image_without_size_is_refused(tmp_path):
    binary = osrd_path()
    if not binary.exists():
        pytest.fail(f"osrd binary not found at {binary}", pytrace=False)
    try:
        proc = subprocess.run([str(binary), "nbd-serve", "--image", str(tmp_path / "none.img"),
                               "--listen", "127.0.0.1:0"], capture_output=True, text=True,
                              timeout=10, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail("osrd kept running without an image")
    assert proc.returncode != 0
    assert "osrd: ready" not in proc.stdout


def test_tcp_and_unix_listeners_serve_the_same_disk(osrd_factory, tmp_path):
    sock = tmp_path / "both.sock"
    srv = osrd_factory(tmp_path / "both.img", size="16M", socket=sock)
    assert len(srv.uris) == 2, srv.uris
    assert srv.tcp_uri.startswith("nbd://127.0.0.1:") and srv.tcp_uri.endswith("/")
    assert srv.unix_uri == f"nbd+unix:///?socket={sock}"
    a, b = connect(srv.tcp_uri), connect(srv.unix_uri)
    try:
        a.pwrite(b"over tcp", 1000)
        assert b.pread(8, 1000) == b"over tcp"
        b.pwrite(b"over unix", 5000)
        assert a.pread(9, 5000) == b"over unix"
    finally:
        close(a)
        close(b)


def test_unix_socket_only(osrd_factory, tmp_path):
    srv = osrd_factory(tmp_path / "u.img", size="16M", listen=False, socket=True)
    assert len(srv.uris) == 1 and srv.uris[0].startswith("nbd+unix:///?socket="), srv.uris
    h = connect(srv.uri)
    try:
        h.pwrite(b"u" * 512, 0)
        assert h.pread(512, 0) == b"u" * 512
    finally:
        close(h)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly_with_clients_connected(osrd_factory, tmp_path, sig):
    img = tmp_path / "s.img"
    srv = osrd_factory(img, size="16M", socket=True)
    idle = connect(srv.tcp_uri)
    busy = connect(srv.unix_uri)
    data = os.urandom(1 * MIB)
    try:
        busy.pwrite(data, 3 * MIB)             # acknowledged, never flushed by the client
        assert srv.stop(sig) == 0, f"exit status after {sig!r}\n{srv.stderr()}"
    finally:
        close(idle)
        close(busy)
    expected = bytearray(16 * MIB)
    expected[3 * MIB:4 * MIB] = data
    assert_same_bytes(img.read_bytes(), bytes(expected), "image after a signal stop")
