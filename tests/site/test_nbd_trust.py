"""Who may reach a site's disks over NBD (issue 9): TLS with client certificates and an
authz list per export prefix, the VM's own 0600 unix socket, export namespaces (a VM
named like a view cannot touch the view), and no plain TCP beyond loopback unless the
config says so."""

import os
import signal
import stat
import subprocess

import pytest

from conftest import (MIB, SiteProcess, api, api_ok, connect, close, open_view, osrtest,
                      protect, read_all, require_libnbd, wait_durable, write_config)


def require_tool(name):
    return osrtest.require_tool(name)


def mint_certificates(tmp_path, names):
    """Certificates from an osr CA (the one `osrd nbd-serve --tls-dir` makes): returns
    (ca_dir, {name: client dir}). The CA folder also holds nbd-serve.pem/.key, a server
    certificate for localhost / 127.0.0.1."""
    ca = tmp_path / "ca"
    args = [osrtest.require_osrd(), "nbd-serve", "--image", str(tmp_path / "mint.img"),
            "--size", "1M", "--listen", "127.0.0.1:0", "--tls-dir", str(ca)]
    for n in names:
        args += ["--tls-client", n]
    p = subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in p.stdout:  # bounded: osrd prints "ready" or exits
            lines.append(line)
            if line.startswith("osrd: ready"):
                break
        assert any(line.startswith("osrd: ready") for line in lines), \
            f"nbd-serve did not start: {lines} {p.stderr.read()}"
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)
    return ca, {n: ca / "clients" / n for n in names}


def start_site(tmp_path, name, extra=""):
    config, data_dir = write_config(tmp_path, name)
    if extra:
        config.write_text(config.read_text() + extra)
    s = SiteProcess(name, config, data_dir, tmp_path / f"{name}.stderr")
    return s.start()


def nbds(site, export, certs):
    return f"nbds://{site.nbd}/{export}?tls-certificates={certs}"


@pytest.fixture
def tls_site(tmp_path):
    require_libnbd()
    ca, clients = mint_certificates(tmp_path, ["alice", "ops", "mallory"])
    extra = (f'nbd_tls_ca = "{ca}/ca.pem"\n'
             f'nbd_tls_cert = "{ca}/nbd-serve.pem"\n'
             f'nbd_tls_key = "{ca}/nbd-serve.key"\n'
             'nbd_tls_authz = [{ identity = "alice", exports = ["vm/vm1/"] }, "ops"]\n')
    site = start_site(tmp_path, "primary", extra)
    yield site, clients
    assert site.stop() == 0


def test_tls_site_lists_and_opens_only_what_authz_allows(tls_site, tmp_path):
    require_tool("nbdinfo")
    require_tool("qemu-io")
    site, clients = tls_site
    for vm in ("vm1", "vm2"):
        g = api_ok(site, "PUT", f"/groups/{vm}",
                   {"disks": [{"name": "os", "size_bytes": 8 * MIB}]}, status=201)
        assert g["disks"][0]["uri"] == f"nbds://{site.nbd}/vm/{vm}/os", g
    listed = osrtest_run(["nbdinfo", "--list", nbds(site, "", clients["alice"])]).stdout
    assert 'export="vm/vm1/os"' in listed and "vm/vm2" not in listed, listed
    listed = osrtest_run(["nbdinfo", "--list", nbds(site, "", clients["ops"])]).stdout
    assert 'export="vm/vm1/os"' in listed and 'export="vm/vm2/os"' in listed, listed
    # alice cannot open vm2's disk (it reads as missing), ops can.
    bad = osrtest_run(["nbdinfo", nbds(site, "vm/vm2/os", clients["alice"])], check=False)
    assert bad.returncode != 0, bad.stdout
    host, port = site.nbd.split(":")

    def qemu(certs, export, *cmds, check=True):
        args = ["qemu-io", "--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={certs}",
                "--image-opts",
                f"driver=nbd,server.type=inet,server.host={host},server.port={port},"
                f"export={export},tls-creds=tls0"]
        for c in cmds:
            args += ["-c", c]
        return osrtest_run(args, check=check)

    qemu(clients["alice"], "vm/vm1/os", "write -P 0xa1 0 1M")
    qemu(clients["ops"], "vm/vm1/os", "read -P 0xa1 0 1M")
    assert qemu(clients["alice"], "vm/vm2/os", "write -P 0xee 0 1M", check=False).returncode != 0
    qemu(clients["ops"], "vm/vm2/os", "read -P 0 0 1M")  # alice's write never landed
    # A certificate of the same CA that authz does not name gets no TLS session at all.
    bad = osrtest_run(["nbdinfo", "--list", nbds(site, "", clients["mallory"])], check=False)
    assert bad.returncode != 0, bad.stdout
    # Plain text is refused on a TLS site: TLS required, nothing listed.
    lib = require_libnbd()
    h = lib.NBD()
    h.set_opt_mode(True)
    with pytest.raises(lib.Error):
        h.connect_uri(f"nbd://{site.nbd}/vm/vm1/os")
        h.opt_list(lambda name, desc: 0)


def osrtest_run(cmd, check=True, timeout=120):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, f"{cmd}: {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def test_a_vms_socket_is_private_and_serves_only_that_vm(tmp_path):
    require_libnbd()
    require_tool("nbdinfo")
    site = start_site(tmp_path, "primary")
    try:
        for vm in ("vm1", "vm2"):
            api_ok(site, "PUT", f"/groups/{vm}",
                   {"disks": [{"name": "os", "size_bytes": 4 * MIB},
                              {"name": "data", "size_bytes": 4 * MIB}]}, status=201)
        sock = site.data_dir / "groups" / "vm1" / "run" / "nbd.sock"
        st = os.lstat(sock)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
        assert stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(sock.parent.parent).st_mode) == 0o700
        listed = osrtest_run(["nbdinfo", "--list", f"nbd+unix:///?socket={sock}"]).stdout
        assert 'export="vm/vm1/os"' in listed and 'export="vm/vm1/data"' in listed, listed
        assert "vm2" not in listed, listed
        # Written over TCP, read over the socket: the same disk.
        h = connect(f"nbd://{site.nbd}/vm/vm1/os")
        h.pwrite(b"\x42" * 65536, 0)
        h.flush()
        close(h)
        got = read_all(f"nbd+unix:///vm/vm1/os?socket={sock}", 4 * MIB)
        assert got[:65536] == b"\x42" * 65536
        lib = require_libnbd()
        with pytest.raises(lib.Error):
            connect(f"nbd+unix:///vm/vm2/os?socket={sock}")
        api_ok(site, "DELETE", "/groups/vm1", status=204)
        assert not os.path.lexists(sock), "the socket outlived its VM"
    finally:
        assert site.stop() == 0


def test_a_vm_named_like_a_view_cannot_disturb_the_view(tmp_path):
    """Issue 9: a VM named `view-1` made a drill's cleanup remove the drill's export."""
    require_libnbd()
    primary = start_site(tmp_path, "primary")
    recovery = start_site(tmp_path, "recovery")
    try:
        group = protect(primary, recovery, "app", [("os", 4 * MIB)])
        h = connect(group["disks"][0]["uri"])
        h.pwrite(b"\x77" * 65536, 0)
        h.flush()
        close(h)
        seq = api_ok(primary, "GET", "/groups/app")["last_seq"]
        wait_durable(recovery, "app", seq)
        view = open_view(recovery, "app", seq, writable=True)
        assert view["id"] == "view-1", view
        uri = view["disks"][0]["uri"]
        assert read_all(uri, 4 * MIB)[:65536] == b"\x77" * 65536
        # A VM of that name, with a disk of that name, at the same site: both live.
        got, doc = api(recovery, "PUT", "/groups/view-1",
                       {"disks": [{"name": "os", "size_bytes": 4 * MIB}]})
        assert got == 201, doc
        assert doc["disks"][0]["uri"] != uri, doc
        assert read_all(uri, 4 * MIB)[:65536] == b"\x77" * 65536
        api_ok(recovery, "DELETE", "/groups/view-1", status=204)
        assert read_all(uri, 4 * MIB)[:65536] == b"\x77" * 65536, \
            "deleting the VM took the view's export"
        api_ok(recovery, "DELETE", f"/views/{view['id']}", status=204)
    finally:
        assert recovery.stop() == 0
        assert primary.stop() == 0


def test_plain_nbd_on_a_network_address_refuses_to_start(tmp_path):
    config, data_dir = write_config(tmp_path, "primary")
    # Refused before anything is bound: the test never listens beyond loopback.
    config.write_text(config.read_text().replace('nbd_listen = "127.0.0.1:0"',
                                                 'nbd_listen = "0.0.0.0:0"'))
    p = osrtest_run([osrtest.require_osrd(), "site", "--config", config], check=False,
                    timeout=60)
    assert p.returncode != 0, p.stdout
    for key in ("not a loopback address", "nbd_tls_ca", "nbd_tls_authz", "nbd_insecure_tcp"):
        assert key in p.stderr, p.stderr


def test_tls_without_authz_is_a_config_error(tmp_path):
    ca, _ = mint_certificates(tmp_path, ["alice"])
    config, _ = write_config(tmp_path, "primary")
    config.write_text(config.read_text() + f'nbd_tls_ca = "{ca}/ca.pem"\n'
                      f'nbd_tls_cert = "{ca}/nbd-serve.pem"\nnbd_tls_key = "{ca}/nbd-serve.key"\n')
    p = osrtest_run([osrtest.require_osrd(), "site", "--config", config], check=False,
                    timeout=60)
    assert p.returncode != 0
    assert "nbd_tls_authz" in p.stderr, p.stderr
