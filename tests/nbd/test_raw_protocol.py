"""Bad and odd input over raw sockets, byte layouts from the NBD spec (doc/proto.md).

After every test the fixture checks that the server process is alive and that a
fresh libnbd client can still write, read and trim: one client's bad input
never affects the others.
"""

import errno
import random
import socket
import struct
import time

import pytest

from conftest import (KIB, MIB, assert_serves, capture_dump_json, capture_replay, close,
                      connect)

SIZE = 48 * MIB                     # larger than the 32 MiB request limit

NBDMAGIC = 0x4E42444D41474943       # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054       # "IHAVEOPT"
REPLY_MAGIC = 0x0003E889045565A9    # option reply magic
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS = 1, 2, 3, 5
OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY = 6, 7, 8

REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP = 0x80000001
REP_ERR_BIT = 0x80000000
INFO_EXPORT = 0

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
TFLAG_HAS_FLAGS = 1

REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_FLAG_DONE = 1


class Raw:
    """A hand-driven NBD client on one TCP connection."""

    def __init__(self, address, timeout=10):
        self.sock = socket.create_connection(address, timeout=timeout)
        self.handle = 0

    def close(self):
        self.sock.close()

    def send(self, data):
        self.sock.sendall(data)

    def recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"server closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def expect_closed(self, timeout=5):
        """The server closes the connection within timeout (any bytes before EOF ignored)."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self.sock.recv(65536):
                    return
        except (ConnectionResetError, BrokenPipeError):
            return
        except socket.timeout:
            pass
        pytest.fail(f"server did not close the connection within {timeout}s")

    # -- handshake -----------------------------------------------------------

    def greeting(self):
        magic, opt_magic, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert magic == NBDMAGIC and opt_magic == IHAVEOPT, (hex(magic), hex(opt_magic))
        assert flags & FLAG_FIXED_NEWSTYLE
        return flags

    def start(self, client_flags=FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
        self.greeting()
        self.send(struct.pack(">I", client_flags))

    def option(self, opt, data=b""):
        self.send(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def reply(self):
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == REPLY_MAGIC, hex(magic)
        assert length <= 1 << 20, length
        return opt, rtype, self.recv_exact(length)

    def go(self, name=b"", opt=OPT_GO):
        self.option(opt, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        size = tflags = None
        while True:
            ropt, rtype, data = self.reply()
            assert ropt == opt
            assert not rtype & REP_ERR_BIT, f"GO refused: {rtype:#x} {data!r}"
            if rtype == REP_ACK:
                break
            assert rtype == REP_INFO, rtype
            (itype,) = struct.unpack_from(">H", data)
            if itype == INFO_EXPORT:
                _, size, tflags = struct.unpack(">HQH", data)
        assert size == SIZE and tflags is not None and tflags & TFLAG_HAS_FLAGS
        return size, tflags

    def structured(self):
        self.option(OPT_STRUCTURED_REPLY)
        assert self.reply() == (OPT_STRUCTURED_REPLY, REP_ACK, b"")

    # -- transmission ------------------------------------------------------------

    def request(self, cmd, offset=0, length=0, flags=0, payload=b"", magic=REQUEST_MAGIC):
        self.handle += 1
        self.send(struct.pack(">IHHQQI", magic, flags, cmd, self.handle, offset, length) + payload)
        return self.handle

    def simple_reply(self, handle, data_len=0):
        magic, err, got = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
        assert got == handle, (got, handle)
        data = self.recv_exact(data_len) if err == 0 and data_len else b""
        return err, data

    def structured_chunks(self, handle):
        """[(flags, type, payload)] up to the chunk with the DONE flag."""
        chunks = []
        while True:
            magic, flags, rtype, got, length = struct.unpack(">IHHQI", self.recv_exact(20))
            assert magic in (STRUCTURED_REPLY_MAGIC, SIMPLE_REPLY_MAGIC), hex(magic)
            assert magic == STRUCTURED_REPLY_MAGIC, "simple reply to a READ after structured"
            assert got == handle
            chunks.append((flags, rtype, self.recv_exact(length)))
            if flags & REPLY_FLAG_DONE:
                return chunks

    def structured_read(self, offset, length):
        """A READ after structured replies: data and hole chunks must tile the range."""
        h = self.request(CMD_READ, offset, length)
        buf = bytearray(length)
        covered = 0
        for flags, rtype, payload in self.structured_chunks(h):
            if rtype == REPLY_TYPE_OFFSET_DATA:
                (off,) = struct.unpack_from(">Q", payload)
                piece = payload[8:]
                assert offset <= off and off + len(piece) <= offset + length
                buf[off - offset:off - offset + len(piece)] = piece
                covered += len(piece)
            elif rtype == REPLY_TYPE_OFFSET_HOLE:
                off, n = struct.unpack(">QI", payload)
                assert offset <= off and off + n <= offset + length
                covered += n
            else:
                assert rtype == REPLY_TYPE_NONE, f"unexpected chunk type {rtype:#x}: {payload!r}"
        assert covered == length, f"chunks cover {covered} of {length} bytes"
        return bytes(buf)

    def write(self, offset, data):
        err, _ = self.simple_reply(self.request(CMD_WRITE, offset, len(data), payload=data))
        assert err == 0, err

    def read(self, offset, length):
        err, data = self.simple_reply(self.request(CMD_READ, offset, length), length)
        assert err == 0, err
        return data


@pytest.fixture
def raw_server(osrd_factory, tmp_path):
    srv = osrd_factory(tmp_path / "raw.img", size="48M")
    yield srv
    assert srv.alive(), f"osrd died\n{srv.stderr()}"
    assert_serves(srv.tcp_uri, SIZE, random.Random(99))


def ready(raw_server, structured=False):
    c = Raw(raw_server.tcp_address)
    c.start()
    if structured:
        c.structured()
    c.go()
    return c


def test_truncated_handshakes_then_close(raw_server):
    addr = raw_server.tcp_address
    socket.create_connection(addr, timeout=5).close()          # connect, close at once
    c = Raw(addr)
    c.recv_exact(5)                                             # half the greeting
    c.close()
    c = Raw(addr)
    c.greeting()
    c.send(b"\0\0")                                             # half the client flags
    c.close()
    c = Raw(addr)
    c.start()
    c.send(struct.pack(">QI", IHAVEOPT, OPT_GO))                # half an option header
    c.close()
    c = Raw(addr)
    c.start()
    c.send(struct.pack(">QII", IHAVEOPT, OPT_GO, 100) + b"\0\0\0")   # half an option
    c.close()
    # A stalled half handshake must not block other clients.
    stalled = Raw(addr)
    stalled.greeting()
    try:
        assert_serves(raw_server.tcp_uri, SIZE)
    finally:
        stalled.close()


def test_unknown_client_flags_close_the_connection(raw_server):
    c = Raw(raw_server.tcp_address)
    c.greeting()
    c.send(struct.pack(">I", FLAG_FIXED_NEWSTYLE | 0x100))
    c.expect_closed()
    c.close()


@pytest.mark.parametrize("opt", [OPT_GO, 0x4242], ids=["go", "unknown"])
def test_option_with_huge_length(raw_server, opt):
    c = Raw(raw_server.tcp_address)
    c.start()
    c.send(struct.pack(">QII", IHAVEOPT, opt, 0xFFFFFFF0) + b"\0" * 64)
    c.sock.settimeout(5)
    # Either an error reply or a closed connection, but quickly: never wait for 4 GiB.
    try:
        head = c.sock.recv(20)
    except (ConnectionResetError, BrokenPipeError):
        head = b""
    except socket.timeout:
        pytest.fail("server neither answered nor closed after an option of length 0xFFFFFFF0")
    if head:
        magic, ropt, rtype, _ = struct.unpack(">QIII", head + c.recv_exact(20 - len(head)))
        assert magic == REPLY_MAGIC and ropt == opt and rtype & REP_ERR_BIT, hex(rtype)
    c.close()


def test_bad_option_magic_closes(raw_server):
    c = Raw(raw_server.tcp_address)
    c.start()
    c.send(struct.pack(">QII", 0x1122334455667788, OPT_GO, 0))
    c.expect_closed()
    c.close()


def test_unknown_option_then_go_still_works(raw_server):
    c = Raw(raw_server.tcp_address)
    c.start()
    c.option(0x4242, b"abcd")
    opt, rtype, _ = c.reply()
    assert (opt, rtype) == (0x4242, REP_ERR_UNSUP)
    c.option(OPT_STARTTLS)
    opt, rtype, _ = c.reply()
    assert opt == OPT_STARTTLS and rtype & REP_ERR_BIT, f"STARTTLS answered {rtype:#x}"
    c.option(OPT_LIST, b"junk")                                  # LIST takes no data
    opt, rtype, _ = c.reply()
    assert opt == OPT_LIST and rtype & REP_ERR_BIT
    c.option(OPT_LIST)
    opt, rtype, data = c.reply()
    # NBD_REP_SERVER: name length, name (here ""), then an optional description.
    assert (opt, rtype) == (OPT_LIST, REP_SERVER) and data[:4] == struct.pack(">I", 0)
    assert c.reply() == (OPT_LIST, REP_ACK, b"")
    c.option(OPT_GO, struct.pack(">I", 6) + b"nosuch" + struct.pack(">H", 0))
    opt, rtype, _ = c.reply()
    assert opt == OPT_GO and rtype & REP_ERR_BIT, "GO to an unknown export succeeded"
    c.option(OPT_GO, b"\0\0\0")                                   # malformed GO
    opt, rtype, _ = c.reply()
    assert opt == OPT_GO and rtype & REP_ERR_BIT
    c.go()
    payload = random.Random(1).randbytes(8192)
    c.write(4096, payload)
    assert c.read(4096, 8192) == payload
    err, _ = c.simple_reply(c.request(CMD_FLUSH))
    assert err == 0
    c.request(CMD_DISC)
    c.expect_closed()
    c.close()


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_option(raw_server, no_zeroes):
    c = Raw(raw_server.tcp_address)
    c.start(FLAG_FIXED_NEWSTYLE | (FLAG_NO_ZEROES if no_zeroes else 0))
    c.option(OPT_EXPORT_NAME, b"")
    size, tflags = struct.unpack(">QH", c.recv_exact(10))
    assert size == SIZE and tflags & TFLAG_HAS_FLAGS
    if not no_zeroes:
        assert c.recv_exact(124) == bytes(124)
    assert c.read(SIZE - 512, 512) == bytes(512)
    c.close()


def test_abort_option(raw_server):
    c = Raw(raw_server.tcp_address)
    c.start()
    c.option(OPT_ABORT)
    try:
        opt, rtype, _ = c.reply()
        assert (opt, rtype) == (OPT_ABORT, REP_ACK)
    except EOFError:
        pass                                 # the spec lets servers just close
    c.expect_closed()
    c.close()


def test_bad_request_magic_closes(raw_server):
    c = ready(raw_server)
    c.request(CMD_READ, 0, 512, magic=0xDEADBEEF)
    c.expect_closed()
    c.close()


def test_unknown_command_type_is_einval(raw_server):
    c = ready(raw_server)
    err, _ = c.simple_reply(c.request(0x42, 0, 512))
    assert err == errno.EINVAL
    err, _ = c.simple_reply(c.request(0xFFFF, 0, 0))
    assert err == errno.EINVAL
    assert c.read(0, 512) == bytes(512)
    c.close()


def test_unknown_flags_are_einval(raw_server):
    c = ready(raw_server)
    # A WRITE with an unknown flag: EINVAL, its payload skipped, nothing written.
    h = c.request(CMD_WRITE, 0, 4096, flags=0x8000, payload=b"\xaa" * 4096)
    err, _ = c.simple_reply(h)
    assert err == errno.EINVAL
    assert c.read(0, 4096) == bytes(4096), "a WRITE with an unknown flag changed data"
    c.close()
    # Structured replies: a READ with an unknown flag gets an error chunk.
    c = ready(raw_server, structured=True)
    h = c.request(CMD_READ, 0, 4096, flags=0x4000)
    chunks = c.structured_chunks(h)
    errs = [p for f, t, p in chunks if t == REPLY_TYPE_ERROR]
    assert errs, f"no error chunk: {[(f, t) for f, t, _ in chunks]}"
    assert struct.unpack_from(">I", errs[0])[0] == errno.EINVAL
    # And the connection stays in step.
    c.write(8192, b"\x42" * 1000)    # a simple reply to WRITE is allowed
    assert c.structured_read(8192, 4096) == b"\x42" * 1000 + bytes(3096)
    c.close()


def test_oversized_read_is_einval(raw_server):
    c = ready(raw_server)
    err, _ = c.simple_reply(c.request(CMD_READ, 0, 32 * MIB + 1))
    assert err == errno.EINVAL
    data = c.read(32 * MIB, 4096)                   # exactly the maximum is fine
    assert data == bytes(4096)
    err, data = c.simple_reply(c.request(CMD_READ, 0, 32 * MIB), 32 * MIB)
    assert err == 0 and len(data) == 32 * MIB
    c.close()


def test_oversized_write_payload_is_skipped(raw_server):
    c = ready(raw_server)
    big = 32 * MIB + 4096
    h = c.request(CMD_WRITE, 0, big, payload=b"\x55" * big)
    err, _ = c.simple_reply(h)
    assert err == errno.EINVAL
    assert c.read(0, 4096) == bytes(4096), "an oversized WRITE was applied"
    assert c.read(32 * MIB, 4096) == bytes(4096)
    c.write(12345, b"still in step")
    assert c.read(12345, 13) == b"still in step"
    c.close()


def test_write_larger_than_64mib_closes(raw_server):
    c = ready(raw_server)
    c.request(CMD_WRITE, 0, 0xF0000000, payload=b"\x11" * 65536)
    c.expect_closed(timeout=10)
    c.close()


def test_disconnect_in_the_middle_of_a_write_payload(raw_server):
    for sent in (0, 1, 100 * KIB):
        c = ready(raw_server)
        c.request(CMD_WRITE, 2 * MIB, 1 * MIB, payload=b"\x66" * sent)
        c.close()
    # Same, with the client holding other requests in flight.
    c = ready(raw_server)
    h1 = c.request(CMD_READ, 0, 4096)
    c.request(CMD_WRITE, 4 * MIB, 256 * KIB, payload=b"\x77" * 1000)
    c.sock.shutdown(socket.SHUT_WR)
    try:
        c.simple_reply(h1, 4096)
    except (EOFError, ConnectionResetError):
        pass
    c.close()


def test_many_bad_clients_in_parallel_with_a_good_one(raw_server):
    """Bad clients connect while a good client keeps working on its own connection."""
    good = connect(raw_server.tcp_uri)
    try:
        rng = random.Random(4)
        for i in range(9):
            c = Raw(raw_server.tcp_address)
            if i % 3 == 0:
                c.close()
            elif i % 3 == 1:
                c.start(0xFFFFFFFF)
                c.expect_closed()
                c.close()
            else:
                c.start()
                c.go()
                c.request(CMD_READ, 0, 512, magic=0)
                c.expect_closed()
                c.close()
            data = rng.randbytes(64 * KIB)
            good.pwrite(data, i * 64 * KIB)
            assert good.pread(64 * KIB, i * 64 * KIB) == data
    finally:
        close(good)


def test_partial_write_payload_is_neither_applied_nor_logged(osrd_factory, tmp_path):
    """A WRITE whose payload never fully arrived must not reach the image or the log."""
    img = tmp_path / "cap.img"
    base = tmp_path / "base.img"
    with open(base, "wb") as f:
        f.truncate(SIZE)
    cap = tmp_path / "cap"
    srv = osrd_factory(img, size="48M", capture=cap)
    for sent in (1, 4096, 300 * KIB):
        c = Raw(srv.tcp_address)
        c.start()
        c.go()
        c.request(CMD_WRITE, 2 * MIB, 1 * MIB, payload=b"\x66" * sent)
        c.close()
    time.sleep(0.2)
    h = connect(srv.tcp_uri)
    try:
        assert h.pread(1 * MIB, 2 * MIB) == bytes(1 * MIB), "a partial WRITE reached the image"
        h.pwrite(b"\x01" * 4096, 0)
    finally:
        close(h)
    srv.stop_clean()
    rc, doc = capture_dump_json(cap)
    assert [(r["kind"], r["offset"], r["length"]) for r in doc["records"]] == \
        [("write", 0, 4096)], doc["records"]
    out = tmp_path / "replay.img"
    capture_replay(cap, base, out)
    assert out.read_bytes() == img.read_bytes()


def test_disconnect_closes_the_socket_promptly(raw_server):
    """After NBD_CMD_DISC (or a protocol violation) the socket closes at once, not later.

    Clients such as nbdinfo, qemu-img and libnbd's nbd_shutdown wait for that EOF,
    so each late close adds its delay to every client run.
    """
    latencies = {}
    for how in ("disc", "bad magic"):
        samples = []
        for _ in range(5):
            c = ready(raw_server)
            t0 = time.monotonic()
            if how == "disc":
                c.request(CMD_DISC)
            else:
                c.request(CMD_READ, 0, 512, magic=0x12345678)
            c.expect_closed(timeout=5)
            samples.append(time.monotonic() - t0)
            c.close()
        latencies[how] = sorted(samples)[len(samples) // 2]
    slow = {k: round(v, 3) for k, v in latencies.items() if v > 0.25}
    assert not slow, f"median seconds from the request to the server's close: {slow}"
