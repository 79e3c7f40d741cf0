"""A site whose osrd lacks CAP_NET_ADMIN cannot make the TAPs and bridges a bridged NIC
needs: the networks check says so before anything starts (it used to pass, and the drill's
start then failed). The site runs under setpriv(1) with the capability dropped from its
bounding and inheritable sets (root keeps every other one)."""

import json
import subprocess
import time
import urllib.error
import urllib.request

import osrtest


def call(port, method, path, body):
    """(status, JSON) of a call to the site's API."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1{path}",
                                 data=json.dumps(body).encode(), method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_networks_check_fails_without_cap_net_admin(tmp_path):
    setpriv = osrtest.require_tool("setpriv")
    port = osrtest.free_port()
    config = tmp_path / "site.toml"
    config.write_text(f'name = "capsite"\ndata_dir = "{tmp_path / "data"}"\n'
                      'nbd_listen = "127.0.0.1:0"\nreplication_listen = "127.0.0.1:0"\n'
                      f'api_listen = "127.0.0.1:{port}"\napi_insecure = true\n'
                      '[networks.lab]\nbridge = "br-nocap"\ndrill_bridge = "br-nocapd"\n')
    log = open(tmp_path / "site.stderr", "w")
    proc = subprocess.Popen([setpriv, "--inh-caps=-net_admin", "--bounding-set=-net_admin", "--",
                             str(osrtest.require_osrd()), "site", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        with open(f"/proc/{proc.pid}/status") as f:
            caps = [line for line in f if line.startswith("CapEff:")]
        body = json.dumps({"vm": "v1", "role": "drill", "spec": {
            "driver": "qemu", "nics": [{"mac": "52:54:00:12:34:56", "network": "lab"}]}})
        deadline = time.monotonic() + 30 * osrtest.time_factor()
        while True:
            assert proc.poll() is None, (tmp_path / "site.stderr").read_text()
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/checks",
                                             data=body.encode(), method="POST",
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=10) as r:
                    plan = json.loads(r.read())
                break
            except OSError:
                assert time.monotonic() < deadline, "the site's API never answered"
                time.sleep(0.1)
        net = [c for c in plan["checks"] if c["name"] == "networks"]
        assert net and net[0]["result"] == "failed", (caps, plan)
        assert "CAP_NET_ADMIN" in net[0]["message"], plan
        # Nothing was made for the check.
        for dev in ("br-nocap", "br-nocapd"):
            assert subprocess.run(["ip", "link", "show", dev], capture_output=True).returncode != 0
        # A start without a check first (osr vm start) names the capability too, not the
        # kernel's "Operation not permitted".
        status, doc = call(port, "PUT", "/groups/v1",
                           {"disks": [{"name": "os", "size_bytes": 1 << 20}]})
        assert status == 201, doc
        status, doc = call(port, "POST", "/groups/v1/vm/start", json.loads(body)["spec"])
        assert status == 403, doc
        assert "CAP_NET_ADMIN" in doc["error"]["message"], doc
        for dev in ("br-nocap", "br-nocapd"):
            assert subprocess.run(["ip", "link", "show", dev], capture_output=True).returncode != 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
