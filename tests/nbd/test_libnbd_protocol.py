"""Handshake options and commands through python libnbd (nbdsh's library)."""

import errno
import os
import random

import pytest

from conftest import (KIB, MIB, close, connect, data_extents, make_sparse_file, nbd_errno,
                      require_libnbd)

SIZE = 32 * MIB


@pytest.fixture
def named(osrd_factory, tmp_path):
    return osrd_factory(tmp_path / "disk.img", size="32M", export="disk0", socket=True)


def test_opt_mode_list_info_and_go(named):
    nbd = require_libnbd()
    h = connect(named.tcp_uri, opt_mode=True)
    try:
        assert h.aio_is_negotiating()
        names = []
        count = h.opt_list(lambda name, description: names.append(name) or 0)
        assert names == ["disk0"] and count == 1

        h.set_export_name("disk0")
        h.opt_info()
        assert h.get_size() == SIZE
        assert not h.is_read_only()
        assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero()
        assert h.can_fast_zero() and h.can_cache() and h.can_multi_conn() and h.can_df()
        assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
        assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
        assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MIB

        h.set_export_name("wrong")
        with pytest.raises(nbd.Error):
            h.opt_info()
        with pytest.raises(nbd.Error):
            h.opt_go()
        assert h.aio_is_negotiating(), "a failed GO must leave the handshake open"

        h.set_export_name("disk0")
        h.opt_go()
        assert h.aio_is_ready()
        h.pwrite(b"opt-mode", 4096)
        assert h.pread(8, 4096) == b"opt-mode"
    finally:
        close(h)


def test_opt_abort(named):
    h = connect(named.tcp_uri, opt_mode=True)
    h.opt_abort()
    assert h.aio_is_closed()
    close(h)


def test_opt_list_meta_context(named):
    nbd = require_libnbd()
    h = connect(named.tcp_uri, opt_mode=True, meta=False)
    try:
        seen = []
        h.opt_list_meta_context(lambda name: seen.append(name) or 0)
        assert "base:allocation" in seen, seen

        seen.clear()
        h.add_meta_context("base:allocation")
        assert h.opt_list_meta_context(lambda name: seen.append(name) or 0) == 1
        assert seen == ["base:allocation"]

        seen.clear()
        h.clear_meta_contexts()
        h.add_meta_context("x-nosuch:thing")
        assert h.opt_list_meta_context(lambda name: seen.append(name) or 0) == 0
        assert seen == []

        h.clear_meta_contexts()
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.set_export_name("disk0")
        h.opt_go()
        assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    finally:
        close(h)


def test_structured_replies_off(named):
    nbd = require_libnbd()
    h = connect(named.tcp_uri, structured=False, strict=False)
    try:
        assert not h.get_structured_replies_negotiated()
        assert not h.can_df(), "SEND_DF must be clear without structured replies"
        assert not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        data = random.Random(5).randbytes(300 * KIB)
        h.pwrite(data, 1 * MIB + 3)
        assert h.pread(len(data), 1 * MIB + 3) == data
        h.zero(100 * KIB, 1 * MIB + 3)
        assert h.pread(len(data), 1 * MIB + 3) == bytes(100 * KIB) + data[100 * KIB:]
        # Errors come back as simple replies and the connection stays usable.
        assert nbd_errno(h.pread, 4096, SIZE - 1024) == errno.EINVAL
        assert h.pread(16, 1 * MIB + 200 * KIB + 3) == data[200 * KIB:200 * KIB + 16]
    finally:
        close(h)


def test_block_status_and_req_one(named):
    nbd = require_libnbd()
    h = connect(named.tcp_uri)
    try:
        h.pwrite(b"\x01" * (64 * KIB), 0)
        h.pwrite(b"\x02" * (128 * KIB), 1 * MIB)
        h.flush()

        def collect(offset, length, flags=0):
            got = []

            def cb(metacontext, off, entries, err):
                assert metacontext == nbd.CONTEXT_BASE_ALLOCATION
                got.append((off, list(entries)))
                return 0

            h.block_status(length, offset, cb, flags=flags)
            assert len(got) == 1, got
            off, entries = got[0]
            assert off == offset
            pairs = list(zip(entries[0::2], entries[1::2]))
            assert pairs and all(n > 0 for n, _ in pairs)
            assert sum(n for n, _ in pairs) <= length
            return pairs

        pairs = collect(0, 2 * MIB)
        hole = nbd.STATE_HOLE | nbd.STATE_ZERO
        # Merge equal neighbours, then compare with what was written.
        merged = []
        for n, f in pairs:
            if merged and merged[-1][1] == f:
                merged[-1] = (merged[-1][0] + n, f)
            else:
                merged.append((n, f))
        assert merged == [(64 * KIB, 0), (1 * MIB - 64 * KIB, hole), (128 * KIB, 0),
                          (1 * MIB - 128 * KIB, hole)]

        one = collect(0, 2 * MIB, flags=nbd.CMD_FLAG_REQ_ONE)
        assert len(one) == 1 and one[0][1] == 0 and one[0][0] <= 64 * KIB
        one = collect(64 * KIB, 2 * MIB, flags=nbd.CMD_FLAG_REQ_ONE)
        assert len(one) == 1 and one[0][1] == hole and one[0][0] <= 1 * MIB - 64 * KIB
        one = collect(1 * MIB + 4096, 4096, flags=nbd.CMD_FLAG_REQ_ONE)
        assert one == [(4096, 0)]
        # The end of the export, exactly.
        tail = collect(SIZE - 4096, 4096)
        assert tail == [(4096, hole)]

        h.trim(64 * KIB, 1 * MIB)
        one = collect(1 * MIB, 64 * KIB, flags=nbd.CMD_FLAG_REQ_ONE)
        assert one == [(64 * KIB, hole)]
    finally:
        close(h)


def test_pread_structured_chunks_cover_the_request(named):
    nbd = require_libnbd()
    h = connect(named.tcp_uri)
    try:
        data = random.Random(9).randbytes(64 * KIB)
        h.pwrite(data, 64 * KIB)
        expected = bytes(64 * KIB) + data + bytes(128 * KIB)
        hole_ranges = [(0, 64 * KIB), (128 * KIB, 256 * KIB)]

        for flags in (0, nbd.CMD_FLAG_DF):
            chunks = []

            def chunk(subbuf, offset, status, err):
                assert status in (nbd.READ_DATA, nbd.READ_HOLE), status
                chunks.append((offset, len(subbuf), status, bytes(subbuf)))
                return 0

            buf = h.pread_structured(256 * KIB, 0, chunk, flags=flags)
            assert bytes(buf) == expected
            chunks.sort()
            pos = 0
            for offset, n, status, content in chunks:
                assert offset == pos, f"chunks overlap or leave a gap at {pos}: {chunks[:4]}"
                pos += n
                if status == nbd.READ_HOLE:
                    assert any(a <= offset and offset + n <= b for a, b in hole_ranges), \
                        f"hole chunk [{offset}, {offset + n}) over written data"
                else:
                    assert content == expected[offset:offset + n]
            assert pos == 256 * KIB
            if flags & nbd.CMD_FLAG_DF:
                assert len(chunks) == 1, f"DF read came back in {len(chunks)} chunks"
    finally:
        close(h)


def test_zero_fast_zero_and_no_hole(named, tmp_path):
    nbd = require_libnbd()
    img = tmp_path / "disk.img"
    h = connect(named.tcp_uri)
    try:
        payload = random.Random(2).randbytes(1 * MIB)
        h.pwrite(payload, 4 * MIB)
        h.pwrite(payload, 8 * MIB)
        h.flush()
        allocated = os.stat(img).st_blocks

        h.zero(1 * MIB, 4 * MIB, flags=nbd.CMD_FLAG_FAST_ZERO)
        assert h.pread(1 * MIB, 4 * MIB) == bytes(1 * MIB)
        h.flush()
        after_punch = os.stat(img).st_blocks
        assert after_punch <= allocated - (1 * MIB) // 512 + 64, \
            f"WRITE_ZEROES without NO_HOLE did not punch a hole ({allocated} -> {after_punch})"
        assert all(o + n <= 4 * MIB or o >= 5 * MIB for o, n in data_extents(img))

        h.zero(1 * MIB, 8 * MIB, flags=nbd.CMD_FLAG_NO_HOLE)
        assert h.pread(1 * MIB, 8 * MIB) == bytes(1 * MIB)
        h.flush()
        after_no_hole = os.stat(img).st_blocks
        assert after_no_hole >= after_punch - 64, \
            f"WRITE_ZEROES with NO_HOLE freed blocks ({after_punch} -> {after_no_hole})"

        # FAST_ZERO with NO_HOLE: either done (reads zeros) or refused with ENOTSUP.
        h.pwrite(payload[:64 * KIB], 12 * MIB)
        try:
            h.zero(64 * KIB, 12 * MIB, flags=nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
            assert h.pread(64 * KIB, 12 * MIB) == bytes(64 * KIB)
        except nbd.Error as e:
            assert e.errnum == errno.ENOTSUP, e
    finally:
        close(h)


def test_cache_and_fua(named):
    nbd = require_libnbd()
    h = connect(named.tcp_uri)
    try:
        h.pwrite(b"F" * 4096, 0, flags=nbd.CMD_FLAG_FUA)
        h.trim(4096, 8192, flags=nbd.CMD_FLAG_FUA)
        h.zero(4096, 16384, flags=nbd.CMD_FLAG_FUA)
        h.cache(1 * MIB, 0)
        h.cache(4096, SIZE - 4096)
        assert h.pread(4096, 0) == b"F" * 4096
    finally:
        close(h)


def test_read_only_export_refuses_writes(osrd_factory, tmp_path):
    nbd = require_libnbd()
    img = tmp_path / "ro.img"
    content = make_sparse_file(img, 16 * MIB, [(0, 1 * MIB), (8 * MIB, 64 * KIB)], seed=4)
    srv = osrd_factory(img, read_only=True)
    h = connect(srv.tcp_uri, strict=False)   # let the requests reach the server
    try:
        assert h.is_read_only()
        assert nbd_errno(h.pwrite, b"x" * 4096, 0) == errno.EPERM
        assert nbd_errno(h.pwrite, b"x" * 4096, 0, flags=nbd.CMD_FLAG_FUA) == errno.EPERM
        assert nbd_errno(h.trim, 4096, 0) in (errno.EPERM, errno.EINVAL)
        assert nbd_errno(h.zero, 4096, 0) in (errno.EPERM, errno.EINVAL)
        assert h.pread(1 * MIB, 0) == content[:1 * MIB]
        h.flush()
    finally:
        close(h)
    srv.stop_clean()
    assert img.read_bytes() == content, "a read-only export changed its image"


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_out_of_range_requests(named, structured):
    h = connect(named.tcp_uri, strict=False, structured=structured)
    try:
        assert h.pread(1, SIZE - 1) == b"\0"
        cases = [
            ("read across the end", h.pread, (4096, SIZE - 1024), errno.EINVAL),
            ("read at the end", h.pread, (1, SIZE), errno.EINVAL),
            ("read at 2**63", h.pread, (512, 2 ** 63), errno.EINVAL),
            ("write across the end", h.pwrite, (b"y" * 4096, SIZE - 1024), errno.ENOSPC),
            ("write at the end", h.pwrite, (b"y", SIZE), errno.ENOSPC),
            ("trim across the end", h.trim, (8192, SIZE - 4096), errno.EINVAL),
            ("zero across the end", h.zero, (8192, SIZE - 4096), errno.ENOSPC),
            ("cache across the end", h.cache, (8192, SIZE - 4096), errno.EINVAL),
        ]
        if structured:
            cases.append(("block status across the end", h.block_status,
                          (8192, SIZE - 4096, lambda *a: 0), errno.EINVAL))
        got = [(what, nbd_errno(fn, *args), want) for what, fn, args, want in cases]
        wrong = [f"{what}: errno {g} ({errno.errorcode.get(g)}), want {errno.errorcode[w]}"
                 for what, g, w in got if g != w]
        assert not wrong, "\n".join(wrong)
        # Nothing was written, and the connection still works.
        assert h.pread(4096, SIZE - 4096) == bytes(4096)
        h.pwrite(b"ok", SIZE - 2)
        assert h.pread(2, SIZE - 2) == b"ok"
    finally:
        close(h)


def test_multi_conn_flush_on_another_connection(named):
    handles = [connect(named.tcp_uri), connect(named.unix_uri), connect(named.tcp_uri)]
    try:
        writer, flusher, reader = handles
        assert all(h.can_multi_conn() for h in handles)
        rng = random.Random(8)
        for i in range(20):
            off = rng.randrange(0, SIZE - 256 * KIB)
            data = rng.randbytes(rng.randrange(1, 256 * KIB))
            writer.pwrite(data, off)
            flusher.flush()
            assert reader.pread(len(data), off) == data, f"round {i}"
            writer.trim(len(data), off)
            flusher.flush()
            assert reader.pread(len(data), off) == bytes(len(data)), f"round {i} trim"
    finally:
        for h in handles:
            close(h)


def test_aio_many_requests_in_flight(named):
    """64 writes in flight on one connection, then 64 reads in flight."""
    nbd = require_libnbd()
    h = connect(named.tcp_uri)
    try:
        rng = random.Random(21)
        blocks = {i: rng.randbytes(32 * KIB) for i in range(64)}
        cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(d)), i * 64 * KIB)
                   for i, d in blocks.items()]
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for c in cookies:
            assert h.aio_command_completed(c)
        bufs = {i: nbd.Buffer(32 * KIB) for i in blocks}
        cookies = [h.aio_pread(bufs[i], i * 64 * KIB) for i in blocks]
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for c in cookies:
            assert h.aio_command_completed(c)
        for i, d in blocks.items():
            assert bufs[i].to_bytearray() == d, f"block {i}"
    finally:
        close(h)
