"""NBD over TLS (NBD_OPT_STARTTLS) and the caps that keep one client from locking
others out, against `osrd nbd-serve` with certificates from osr's own CA
(`--tls-dir DIR --tls-client NAME` writes DIR/clients/NAME as QEMU and libnbd read it).

Real clients: qemu-img and qemu-io (tls-creds-x509), nbdinfo and nbdcopy (nbds:// with
tls-certificates=DIR), python libnbd, and raw sockets for what no client does on purpose.
"""

import random
import select
import socket
import struct
import time

from conftest import MIB, require_tool, run, run_osrd

EXPORT = "disk"
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
OPT_EXPORT_NAME, OPT_LIST, OPT_STARTTLS = 1, 3, 5
REP_ACK, REP_ERR_TLS_REQD = 1, 0x80000005


def tls_server(osrd_factory, tmp_path, clients=("alice", "mallory"), authz=("alice",),
               extra=(), name="ca"):
    """nbd-serve with TLS required; returns (server, ca_dir)."""
    ca = tmp_path / name
    args = ["--tls-dir", ca, "--export", EXPORT]
    for c in clients:
        args += ["--tls-client", c]
    for a in authz:
        args += ["--tls-authz", a]
    server = osrd_factory(tmp_path / f"{name}-disk.img", size="32M", extra=[*args, *extra])
    assert server.tcp_uri.startswith("nbds://127.0.0.1:"), server.uris
    return server, ca


def client_dir(ca, name):
    d = ca / "clients" / name
    for f in ("ca-cert.pem", "client-cert.pem", "client-key.pem"):
        assert (d / f).is_file(), f"{d / f} was not written"
    assert (d / "client-key.pem").stat().st_mode & 0o077 == 0, "the client key is not private"
    assert d.stat().st_mode & 0o777 == 0o700
    return d


def nbds_uri(server, certs):
    host, port = server.tcp_address
    return f"nbds://{host}:{port}/{EXPORT}?tls-certificates={certs}"


def qemu_args(server, certs):
    host, port = server.tcp_address
    return ["--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={certs}",
            "--image-opts",
            f"driver=nbd,server.type=inet,server.host={host},server.port={port},"
            f"export={EXPORT},tls-creds=tls0"]


def assert_refused(cmd, server, why):
    """cmd fails, and the server logged the refused handshake with `why`."""
    proc = run(cmd, check=False, timeout=60)
    assert proc.returncode != 0, f"{cmd[0]} was let in: {proc.stdout}{proc.stderr}"
    deadline = time.monotonic() + 10
    while why not in server.stderr() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert why in server.stderr(), f"server log lacks {why!r}:\n{server.stderr()[-2000:]}"
    return proc


def test_qemu_img_and_qemu_io_over_tls(osrd_factory, tmp_path):
    require_tool("qemu-img")
    require_tool("qemu-io")
    server, ca = tls_server(osrd_factory, tmp_path)
    alice = client_dir(ca, "alice")
    run(["qemu-io", *qemu_args(server, alice), "-c", "write -P 0xab 1M 2M",
         "-c", "read -P 0xab 1M 2M"])
    src = tmp_path / "src.raw"
    rng = random.Random(7)
    data = rng.randbytes(4 * MIB)
    src.write_bytes(data)
    target = qemu_args(server, alice)
    run(["qemu-img", "convert", "-n", "-f", "raw", target[0], target[1], "--target-image-opts",
         src, target[3]])
    out = tmp_path / "out.raw"
    run(["qemu-img", "convert", "-O", "raw", *qemu_args(server, alice), out])
    got = out.read_bytes()
    assert len(got) == 32 * MIB
    assert got[:4 * MIB] == data, "qemu-img read back other bytes than it wrote over TLS"
    info = run(["qemu-img", "info", *qemu_args(server, alice)]).stdout
    assert "32 MiB" in info, info


def test_nbdinfo_and_nbdcopy_over_tls(osrd_factory, tmp_path):
    require_tool("nbdinfo")
    require_tool("nbdcopy")
    server, ca = tls_server(osrd_factory, tmp_path)
    alice = client_dir(ca, "alice")
    uri = nbds_uri(server, alice)
    info = run(["nbdinfo", uri]).stdout
    assert "with TLS" in info, info
    listed = run(["nbdinfo", "--list", uri]).stdout
    assert f'export="{EXPORT}"' in listed, listed
    src = tmp_path / "src.raw"
    data = random.Random(8).randbytes(32 * MIB)
    src.write_bytes(data)
    run(["nbdcopy", src, uri])
    out = tmp_path / "out.raw"
    run(["nbdcopy", uri, out])
    assert out.read_bytes() == data, "nbdcopy read back other bytes than it wrote over TLS"


def test_a_client_without_a_certificate_is_refused(osrd_factory, tmp_path):
    require_tool("nbdinfo")
    require_tool("qemu-img")
    server, ca = tls_server(osrd_factory, tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "ca-cert.pem").write_bytes((ca / "ca.pem").read_bytes())
    assert_refused(["nbdinfo", nbds_uri(server, bare)], server,
                   "peer did not return a certificate")
    proc = assert_refused(["qemu-img", "info", *qemu_args(server, bare)], server,
                          "peer did not return a certificate")
    assert "32 MiB" not in proc.stdout


def test_a_certificate_from_another_ca_is_refused(osrd_factory, tmp_path):
    require_tool("nbdinfo")
    server, ca = tls_server(osrd_factory, tmp_path)
    # Another osr CA, with a client of the same name.
    other, other_ca = tls_server(osrd_factory, tmp_path, clients=("alice",), authz=("alice",),
                                 name="other")
    foreign = client_dir(other_ca, "alice")
    mixed = tmp_path / "mixed"  # trusts the right server, presents the foreign certificate
    mixed.mkdir()
    (mixed / "ca-cert.pem").write_bytes((ca / "ca.pem").read_bytes())
    for f in ("client-cert.pem", "client-key.pem"):
        (mixed / f).write_bytes((foreign / f).read_bytes())
        (mixed / f).chmod(0o600)
    assert_refused(["nbdinfo", nbds_uri(server, mixed)], server, "TLS handshake refused")


def test_a_certificate_not_in_authz_is_refused(osrd_factory, tmp_path):
    require_tool("nbdinfo")
    require_tool("qemu-io")
    server, ca = tls_server(osrd_factory, tmp_path)
    mallory = client_dir(ca, "mallory")  # signed by the same CA, not in --tls-authz
    assert_refused(["nbdinfo", nbds_uri(server, mallory)], server, "name is not allowed here")
    proc = assert_refused(["qemu-io", *qemu_args(server, mallory), "-c", "write -P 0xee 0 64k"],
                          server, "name is not allowed here")
    assert "wrote" not in proc.stdout
    # alice still gets in, and mallory's write never landed.
    run(["qemu-io", *qemu_args(server, client_dir(ca, "alice")), "-c", "read -P 0 0 64k"])


def raw_connect(server, source="127.0.0.1"):
    host, port = server.tcp_address
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    s.bind((source, 0))
    s.connect((host, port))
    return s


def recv_exact(s, n):
    b = b""
    while len(b) < n:
        chunk = s.recv(n - len(b))
        if not chunk:
            return b
        b += chunk
    return b


def option(s, opt, data=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)


def option_reply(s):
    h = recv_exact(s, 20)
    assert len(h) == 20, f"no option reply (got {h!r})"
    magic, opt, typ, length = struct.unpack(">QIII", h)
    assert magic == OPT_REPLY_MAGIC
    return opt, typ, recv_exact(s, length)


def test_plain_text_gets_tls_required_and_export_name_is_cut(osrd_factory, tmp_path):
    server, _ = tls_server(osrd_factory, tmp_path)
    s = raw_connect(server)
    hello = recv_exact(s, 18)
    assert hello[:16] == b"NBDMAGICIHAVEOPT"
    s.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
    option(s, OPT_LIST)
    opt, typ, msg = option_reply(s)
    assert (opt, typ) == (OPT_LIST, REP_ERR_TLS_REQD), (opt, hex(typ), msg)
    option(s, OPT_EXPORT_NAME, EXPORT.encode())
    assert recv_exact(s, 1) == b"", "EXPORT_NAME before STARTTLS got an answer"
    s.close()


def test_plain_tcp_on_a_network_address_refuses_to_start(tmp_path):
    # Refused before anything is bound: the test never listens beyond loopback.
    proc = run_osrd("nbd-serve", "--image", tmp_path / "d.img", "--size", "1M",
                    "--listen", "0.0.0.0:0", check=False, timeout=30)
    assert proc.returncode != 0
    assert "not a loopback address" in proc.stderr, proc.stderr


def idle_sockets(server, n, source):
    socks = []
    host, port = server.tcp_address
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(True)
        s.bind((source, 0))
        s.connect((host, port))
        socks.append(s)
    return socks


def closed_count(open_, timeout_s):
    """How many of the sockets in the set open_ the server closed (they leave the set),
    waiting up to timeout_s for all of them."""
    closed = 0
    deadline = time.monotonic() + timeout_s
    while open_ and time.monotonic() < deadline:
        ready, _, _ = select.select(list(open_)[:500], [], [], 0.2)
        for s in ready:
            try:
                data = s.recv(4096)
            except ConnectionResetError:
                data = b""
            if not data:
                open_.discard(s)
                closed += 1
    return closed


def test_500_idle_connections_from_one_address_do_not_stop_another_client(osrd_factory,
                                                                          tmp_path):
    """The attacker opens 500 TCP connections from 127.0.0.2 and sends nothing. Connections
    over the per-address cap (16) are closed at once; the 16 in their handshake are cut
    at the handshake deadline (8 s here, 10 s by default). Meanwhile a client from
    127.0.0.1 is served, and once the idle ones are gone 127.0.0.2 gets in again."""
    require_tool("qemu-io")
    server, ca = tls_server(osrd_factory, tmp_path, extra=["--handshake-timeout-ms", "8000"])
    alice = client_dir(ca, "alice")
    socks = idle_sockets(server, 500, "127.0.0.2")
    pending = set(socks)
    try:
        # Served while they hang on (over TLS, from another address).
        run(["qemu-io", *qemu_args(server, alice), "-c", "write -P 0x5c 0 1M",
             "-c", "read -P 0x5c 0 1M"], timeout=60)
        # Well before the deadline (the refused ones are closed as they are accepted).
        closed_early = closed_count(pending, 4.0)
        assert closed_early >= 500 - 16, \
            f"only {closed_early} of 500 idle connections were refused at once"
        closed_late = closed_count(pending, 30.0)
        assert closed_early + closed_late == 500, \
            f"{500 - closed_early - closed_late} idle connections outlived the handshake deadline"
    finally:
        for s in socks:
            s.close()
    # The address is welcome again: a fresh connection from it gets the greeting. (The
    # server closes a connection before it stops counting it: a connection right after the
    # last close may still find the address at its cap, so ask again for a few seconds.)
    greeting = b""
    deadline = time.monotonic() + 10.0
    while greeting[:8] != b"NBDMAGIC" and time.monotonic() < deadline:
        s = raw_connect(server, "127.0.0.2")
        greeting = recv_exact(s, 18)
        s.close()
        if greeting[:8] != b"NBDMAGIC":
            time.sleep(0.2)
    assert greeting[:8] == b"NBDMAGIC", "127.0.0.2 was still refused 10 s after its connections ended"
