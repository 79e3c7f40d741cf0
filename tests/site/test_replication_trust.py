"""Trust on the replication channel (issue 9, DESIGN.md invariant 8), between real site
daemons and against raw frames:

- a HELLO with a field of the wrong type is refused with a typed ERROR naming the field,
  and the recovery site lives on; a HELLO_OK of the wrong type at the source likewise;
- epochs come from the vault: a HELLO above the store's epoch is refused (epoch_ahead)
  and changes nothing; one below it is refused (stale_epoch) and the source fences its
  disks, decided by the typed code;
- certificates name sites: the recovery site takes a group only from the source site the
  store names, the source ships only to the target site it was given;
- replication without TLS only on loopback.

Frames are written here as docs/formats.md ("Replication channel") describes them.
"""

import json
import socket
import struct
import subprocess
import threading
import time

import pytest

from conftest import (MIB, SiteProcess, api, api_ok, assert_error, connect, close,
                      group_status, require_libnbd, store_status, wait_durable, wait_for,
                      write_config)
import osrtest

VM = "vm1"
DISK = 1 * MIB
SPEC = {"disks": [{"name": "d0", "size_bytes": DISK}]}
HELLO, HELLO_OK, RECORDS, ACK, ERROR = 1, 2, 3, 4, 5
MAGIC = 0x5252534F
# ERROR codes (docs/formats.md): the numbers never change.
BAD_FRAME, STALE_EPOCH, EPOCH_AHEAD, NOT_AUTHORIZED = 2, 7, 8, 9
SOCKET_TIMEOUT_S = 10


# -- frames -------------------------------------------------------------------------------


def crc32c(data, crc=0):
    crc ^= 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def frame(ftype, payload):
    header = struct.pack("<IHHI", MAGIC, ftype, 0, len(payload))
    return header + struct.pack("<I", crc32c(header + payload)) + payload


def read_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"the peer closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def read_frame(sock):
    magic, ftype, flags, length, crc = struct.unpack("<IHHII", read_exact(sock, 16))
    assert magic == MAGIC, f"bad magic {magic:#x}"
    payload = read_exact(sock, length)
    assert crc32c(struct.pack("<IHHI", magic, ftype, flags, length) + payload) == crc
    return ftype, payload


def hello_exchange(address, payload):
    """Sends one HELLO (bytes) to a receiver; returns (type, payload) of its answer."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=SOCKET_TIMEOUT_S) as s:
        s.sendall(frame(HELLO, payload))
        try:
            return read_frame(s)
        except (EOFError, ConnectionError) as e:
            pytest.fail(f"the receiver at {address} answered no frame to {payload[:80]!r}: {e}")


def expect_error(answer, code, words):
    ftype, payload = answer
    assert ftype == ERROR, f"expected ERROR, got frame type {ftype}: {payload[:200]!r}"
    doc = json.loads(payload)
    assert doc.get("code") == code, f"ERROR {doc}, expected code {code}"
    assert words in doc.get("message", ""), f"ERROR {doc} does not say {words!r}"
    return doc


def hello(group=VM, epoch=1, disks=None, version=1):
    disks = disks if disks is not None else [{"name": "d0", "size_bytes": DISK}]
    return json.dumps({"version": version, "group": group, "epoch": epoch, "compress": [],
                       "disks": disks}).encode()


# -- helpers ------------------------------------------------------------------------------


def alive(site):
    assert site.proc.poll() is None, (f"site {site.name} died (exit {site.proc.returncode})\n"
                                      f"{site.stderr()[-3000:]}")
    api_ok(site, "GET", "/site")


def write_and_flush(primary, n=8):
    """n writes of 4 KiB to the primary's disk; returns the group's last seq."""
    uri = group_status(primary, VM)["disks"][0]["uri"]
    h = connect(uri)
    try:
        for i in range(n):
            h.pwrite(bytes([i + 1]) * 4096, i * 8192)
        h.flush()
    finally:
        close(h)
    return group_status(primary, VM)["last_seq"]


def replication_state(primary):
    return group_status(primary, VM).get("replication", {})


def wait_refusal(primary, code_name, timeout=15):
    """Waits until the primary's sender reports a refusal with that typed code."""
    return wait_for(lambda: replication_state(primary).get("last_error_code") == code_name,
                    timeout, f"the sender of {VM} at {primary.name} to report {code_name}",
                    detail=lambda: replication_state(primary))


def protect(primary, recovery, store_body=None, replication=None):
    api_ok(recovery, "PUT", f"/stores/{VM}", store_body or SPEC, status=201)
    api_ok(primary, "PUT", f"/groups/{VM}", SPEC, status=201)
    body = {"target": recovery.replication}
    body.update(replication or {})
    api_ok(primary, "PUT", f"/groups/{VM}/replication", body, status=204)


# -- parsing that cannot crash ------------------------------------------------------------


def test_a_malformed_hello_is_refused_and_the_site_lives(plain_sites):
    sites = plain_sites
    primary, recovery = sites
    api_ok(recovery, "PUT", f"/stores/{VM}", SPEC, status=201)
    cases = [
        (b'{"version":"1"}', "HELLO.version"),
        (b'{"version":1,"group":["vm1"],"epoch":1,"disks":[]}', "HELLO.group"),
        (b'{"version":1,"group":"vm1","epoch":"2","disks":[]}', "HELLO.epoch"),
        (b'{"version":1,"group":"vm1","epoch":1,"disks":[{"name":"d0","size_bytes":"1M"}]}',
         "HELLO.disks[0].size_bytes"),
        (b'{"version":1,"group":"vm1","epoch":1,"disks":[null]}', "HELLO.disks[0]"),
        (b"[" * 100000, "nested deeper"),
        (b"\xff\xfe", "not valid JSON"),
    ]
    for payload, words in cases:
        expect_error(hello_exchange(recovery.replication, payload), BAD_FRAME, words)
        alive(recovery)
    # The store is untouched and real replication works.
    assert store_status(recovery, VM)["epoch"] == 1
    api_ok(primary, "PUT", f"/groups/{VM}", SPEC, status=201)
    api_ok(primary, "PUT", f"/groups/{VM}/replication", {"target": recovery.replication},
           status=204)
    require_libnbd()
    wait_durable(recovery, VM, write_and_flush(primary), primary=primary)


class FakeReceiver:
    """Accepts replication connections on 127.0.0.1; answers each HELLO with one frame and
    keeps the frames the sender sends after it."""

    def __init__(self, answer_type, answer_payload):
        self.answer = frame(answer_type, answer_payload)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self.after = []
        self.stop = False
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    @property
    def address(self):
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def loop(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            with conn:
                conn.settimeout(SOCKET_TIMEOUT_S)
                try:
                    read_frame(conn)
                    conn.sendall(self.answer)
                    while True:
                        self.after.append(read_frame(conn))
                except (EOFError, OSError, AssertionError, struct.error):
                    pass

    def close(self):
        self.stop = True
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.mark.parametrize("answer", [b'{"durable_seq":"x"}', b'{"durable_seq":1,"base_seq":[]}',
                                    b"not json"])
def test_a_malformed_hello_ok_is_reported_at_the_source(site_factory, answer):
    primary = site_factory("primary", tls=False)
    fake = FakeReceiver(HELLO_OK, answer)
    try:
        api_ok(primary, "PUT", f"/groups/{VM}", SPEC, status=201)
        api_ok(primary, "PUT", f"/groups/{VM}/replication", {"target": fake.address},
               status=204)
        wait_refusal(primary, "bad_frame")
        assert "HELLO_OK" in replication_state(primary)["last_error"], replication_state(primary)
        if answer == b'{"durable_seq":"x"}':
            assert "HELLO_OK.durable_seq" in replication_state(primary)["last_error"]
        alive(primary)
        wait_for(lambda: any(t == ERROR for t, _ in fake.after), 10,
                 "the source's ERROR frame at the fake receiver")
        err = json.loads(next(p for t, p in fake.after if t == ERROR))
        assert err["code"] == BAD_FRAME and err["name"] == "bad_frame", err
    finally:
        fake.close()
    alive(primary)


# -- epochs come from the vault ------------------------------------------------------------


def test_a_hello_above_the_store_epoch_changes_nothing(plain_sites):
    sites = plain_sites
    primary, recovery = sites
    require_libnbd()
    api_ok(recovery, "PUT", f"/stores/{VM}", SPEC, status=201)
    doc = expect_error(hello_exchange(recovery.replication, hello(epoch=2**63 - 1)), EPOCH_AHEAD,
                       "only the vault raises")
    assert doc["name"] == "epoch_ahead", doc
    assert store_status(recovery, VM)["epoch"] == 1
    alive(recovery)
    # A source the vault (wrongly) gave a higher epoch: refused, not fenced, store unchanged.
    api_ok(primary, "PUT", f"/groups/{VM}", SPEC, status=201)
    api_ok(primary, "PUT", f"/groups/{VM}/replication",
           {"target": recovery.replication, "epoch": 5}, status=204)
    wait_refusal(primary, "epoch_ahead")
    g = group_status(primary, VM)
    assert g["capture_fenced_epoch"] == 0 and g["fenced_epoch"] == 0, g
    assert store_status(recovery, VM)["epoch"] == 1
    # The legitimate sender, at the store's epoch, replicates (a later failover could too).
    api_ok(primary, "PUT", f"/groups/{VM}/replication",
           {"target": recovery.replication, "epoch": 1}, status=204)
    wait_durable(recovery, VM, write_and_flush(primary), primary=primary)
    assert store_status(recovery, VM)["epoch"] == 1


def test_a_stale_source_is_refused_by_code_and_fences_itself(sites):
    primary, recovery = sites
    require_libnbd()
    # The vault made the store at epoch 3 (the item failed over twice); this source is at 2.
    protect(primary, recovery, store_body={**SPEC, "epoch": 3, "source": "primary"},
            replication={"epoch": 2})
    assert store_status(recovery, VM)["epoch"] == 3
    wait_refusal(primary, "stale_epoch")
    wait_for(lambda: group_status(primary, VM)["capture_fenced_epoch"] == 3, 10,
             "the source to fence its disks at epoch 3",
             detail=lambda: group_status(primary, VM))
    uri = group_status(primary, VM)["disks"][0]["uri"]
    h = connect(uri)
    try:
        with pytest.raises(Exception) as e:
            h.pwrite(b"x" * 4096, 0)
        assert "EPERM" in str(e.value) or "not permitted" in str(e.value), e.value
    finally:
        close(h)
    assert store_status(recovery, VM)["durable_seq"] == 0
    alive(primary)
    alive(recovery)


def test_store_epoch_and_source_at_the_site_api(sites):
    _, recovery = sites
    for body, status, words in [
        ({**SPEC, "epoch": "2"}, 400, "epoch"),
        ({**SPEC, "epoch": 0}, 400, "epoch"),
        ({**SPEC, "epoch": 2**60}, 400, "epoch"),
        ({**SPEC, "epoch": -1}, 400, "epoch"),
        ({**SPEC, "source": 7}, 400, "source"),
        ({**SPEC, "source": "../x"}, 400, "source"),
    ]:
        err = assert_error(recovery, "PUT", f"/stores/{VM}", body, status)
        assert words in err["message"], err
    assert api_ok(recovery, "GET", "/site")["stores"] == []
    api_ok(recovery, "PUT", f"/stores/{VM}", {**SPEC, "epoch": 4, "source": "primary"},
           status=201)
    st = store_status(recovery, VM)
    assert st["epoch"] == 4 and st["source"] == "primary", st
    # A failover at a lower epoch than the store's is refused; at a higher one it is raised.
    assert_error(recovery, "POST", f"/groups/{VM}/failover", {"seq": 0, "epoch": 3}, 403)
    assert store_status(recovery, VM)["epoch"] == 4


# -- certificates name sites ---------------------------------------------------------------


def make_certificates(d, names):
    """A private CA and one certificate per site name (CN and subjectAltName DNS)."""
    tool = osrtest.require_tool("openssl")
    d.mkdir()

    def run(*args):
        p = subprocess.run([str(tool), *args], cwd=d, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, f"openssl {' '.join(args)}: {p.stderr}"

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=keyCertSign")
    for n in names:
        (d / f"{n}.ext").write_text(f"subjectAltName=DNS:{n}\n"
                                    "extendedKeyUsage=serverAuth,clientAuth\n"
                                    "basicConstraints=critical,CA:FALSE\n")
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{n}.key", "-out", f"{n}.csr", "-subj", f"/CN={n}")
        run("x509", "-req", "-in", f"{n}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{n}.pem", "-days", "2", "-extfile", f"{n}.ext")


@pytest.fixture
def tls_sites(tmp_path):
    require_libnbd()
    certs = tmp_path / "certs"
    make_certificates(certs, ["primary", "recovery", "intruder"])
    procs = []

    def site(name):
        config, data_dir = write_config(tmp_path, name, tls=False)
        # Replication over TLS with this test's own CA; the API stays a loopback lab.
        config.write_text(config.read_text() + f'tls_ca = "{certs}/ca.pem"\n'
                          f'tls_cert = "{certs}/{name}.pem"\ntls_key = "{certs}/{name}.key"\n')
        s = SiteProcess(name, config, data_dir, tmp_path / f"{name}.stderr")
        procs.append(s)
        return s.start()

    yield site("primary"), site("recovery"), site("intruder")
    osrtest.stop_all_clean(procs)


def test_certificates_must_name_the_expected_sites(tls_sites):
    primary, recovery, intruder = tls_sites
    api_ok(recovery, "PUT", f"/stores/{VM}", {**SPEC, "source": "primary"}, status=201)
    # Another site of the same CA sends the group as if it were its source: refused.
    api_ok(intruder, "PUT", f"/groups/{VM}", SPEC, status=201)
    api_ok(intruder, "PUT", f"/groups/{VM}/replication",
           {"target": recovery.replication, "target_site": "recovery"}, status=204)
    wait_refusal(intruder, "not_authorized")
    assert "'primary'" in replication_state(intruder)["last_error"], replication_state(intruder)
    write_and_flush(intruder)
    time.sleep(0.5)  # a refused sender must not get a record in meanwhile
    assert store_status(recovery, VM)["durable_seq"] == 0
    api_ok(intruder, "DELETE", f"/groups/{VM}/replication", status=204)
    # The source, told its target is another site: it does not ship to this one.
    api_ok(primary, "PUT", f"/groups/{VM}", SPEC, status=201)
    api_ok(primary, "PUT", f"/groups/{VM}/replication",
           {"target": recovery.replication, "target_site": "elsewhere"}, status=204)
    wait_refusal(primary, "not_authorized")
    assert "'elsewhere'" in replication_state(primary)["last_error"], replication_state(primary)
    assert store_status(recovery, VM)["durable_seq"] == 0
    # The right names: it replicates.
    api_ok(primary, "PUT", f"/groups/{VM}/replication",
           {"target": recovery.replication, "target_site": "recovery"}, status=204)
    assert group_status(primary, VM)["target_site"] == "recovery"
    wait_durable(recovery, VM, write_and_flush(primary), primary=primary)
    for s in tls_sites:
        alive(s)


# -- replication without TLS only on loopback ------------------------------------------------


def run_site_once(tmp_path, name, extra, listen=None):
    """Runs `osrd site` with the usual test config plus `extra` (and replication_listen =
    `listen`); it must exit, not start. Returns its stderr."""
    config, _ = write_config(tmp_path, name, tls=False)
    text = config.read_text() + extra
    if listen:
        text = text.replace('replication_listen = "127.0.0.1:0"', f'replication_listen = "{listen}"')
    config.write_text(text)
    try:
        p = subprocess.run([str(osrtest.require_osrd()), "site", "--config", str(config)],
                           capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"osrd site with {extra!r} did not exit: it started ({e.stdout})")
    assert p.returncode != 0, f"osrd site started with {extra!r}: {p.stdout}"
    return p.stderr


def test_replication_without_tls_only_on_loopback(tmp_path, site_factory):
    # Listening beyond loopback without TLS: the site refuses to start (before it binds).
    err = run_site_once(tmp_path, "wide", "", listen="0.0.0.0:0")
    assert "replication_insecure" in err, err
    # The key must be a boolean.
    err = run_site_once(tmp_path, "typo", 'replication_insecure = "yes"\n')
    assert "replication_insecure" in err, err
    # Shipping to an address beyond loopback without TLS is refused at once (403).
    primary = site_factory("primary", tls=False)
    api_ok(primary, "PUT", f"/groups/{VM}", SPEC, status=201)
    e = assert_error(primary, "PUT", f"/groups/{VM}/replication", {"target": "192.0.2.1:7481"},
                     403)
    assert "replication_insecure" in e["message"], e
    assert group_status(primary, VM)["replicate_to"] == ""
