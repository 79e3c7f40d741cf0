"""The site API answers only the vault (issue 9, docs/security.md): every route, tried
without a client certificate, with another site's certificate, with a certificate named
"vault" from another CA, and over plain HTTP, is refused before any handler runs; with
the vault's certificate each route answers (a 4xx for the made-up names here, never a
refusal of the caller). The route table here must equal what the site serves. Bodies
that used to crash a daemon get a 400 that names the problem, and the site lives on."""

import http.client
import json
import ssl
import subprocess

import pytest

from conftest import make_certs, site_certs, tls_client_context

# (method, pattern as the site registers it, an example path, a body).
ROUTES = [
    ("GET", "/api/v1/site", "/api/v1/site", None),
    ("GET", "/metrics", "/metrics", None),
    ("GET", "/api/v1/routes", "/api/v1/routes", None),
    ("GET", "/api/v1/groups", "/api/v1/groups", None),
    ("GET", "/api/v1/stores", "/api/v1/stores", None),
    ("PUT", "/api/v1/groups/([^/]+)", "/api/v1/groups/x", {"disks": []}),
    ("GET", "/api/v1/groups/([^/]+)", "/api/v1/groups/x", None),
    ("DELETE", "/api/v1/groups/([^/]+)", "/api/v1/groups/x", None),
    ("PUT", "/api/v1/groups/([^/]+)/disks/([^/]+)", "/api/v1/groups/x/disks/d",
     {"size_bytes": 1048576}),
    ("PUT", "/api/v1/groups/([^/]+)/replication", "/api/v1/groups/x/replication", {}),
    ("DELETE", "/api/v1/groups/([^/]+)/replication", "/api/v1/groups/x/replication", None),
    ("POST", "/api/v1/groups/([^/]+)/fence", "/api/v1/groups/x/fence", {}),
    ("POST", "/api/v1/groups/([^/]+)/failover", "/api/v1/groups/x/failover", {}),
    ("POST", "/api/v1/groups/([^/]+)/repair", "/api/v1/groups/x/repair", {}),
    ("POST", "/api/v1/stores/([^/]+)/repair", "/api/v1/stores/x/repair", None),
    ("POST", "/api/v1/groups/([^/]+)/materialise", "/api/v1/groups/x/materialise", {}),
    ("GET", "/api/v1/groups/([^/]+)/unreplicated", "/api/v1/groups/x/unreplicated", None),
    ("POST", "/api/v1/groups/([^/]+)/regions", "/api/v1/groups/x/regions", {}),
    ("GET", "/api/v1/groups/([^/]+)/hashes", "/api/v1/groups/x/hashes", None),
    ("POST", "/api/v1/groups/([^/]+)/compare", "/api/v1/groups/x/compare", {}),
    ("POST", "/api/v1/groups/([^/]+)/to-store", "/api/v1/groups/x/to-store", {}),
    ("POST", "/api/v1/groups/([^/]+)/vm/start", "/api/v1/groups/x/vm/start", {}),
    ("POST", "/api/v1/groups/([^/]+)/vm/freeze", "/api/v1/groups/x/vm/freeze", {}),
    ("POST", "/api/v1/groups/([^/]+)/vm/thaw", "/api/v1/groups/x/vm/thaw", {}),
    ("POST", "/api/v1/groups/([^/]+)/vm/stop", "/api/v1/groups/x/vm/stop", {}),
    ("PUT", "/api/v1/stores/([^/]+)", "/api/v1/stores/x", {}),
    ("GET", "/api/v1/stores/([^/]+)", "/api/v1/stores/x", None),
    ("DELETE", "/api/v1/stores/([^/]+)", "/api/v1/stores/x", None),
    ("POST", "/api/v1/stores/([^/]+)/fold", "/api/v1/stores/x/fold", {}),
    ("POST", "/api/v1/stores/([^/]+)/compact", "/api/v1/stores/x/compact", {}),
    ("POST", "/api/v1/stores/([^/]+)/views", "/api/v1/stores/x/views", {}),
    ("GET", "/api/v1/views/([^/]+)", "/api/v1/views/x", None),
    ("DELETE", "/api/v1/views/([^/]+)", "/api/v1/views/x", None),
    ("POST", "/api/v1/views/([^/]+)/vm/start", "/api/v1/views/x/vm/start", {}),
    ("POST", "/api/v1/views/([^/]+)/vm/stop", "/api/v1/views/x/vm/stop", {}),
    ("GET", "/api/v1/views/([^/]+)/console", "/api/v1/views/x/console", None),
    ("GET", "/api/v1/groups/([^/]+)/console", "/api/v1/groups/x/console", None),
    ("POST", "/api/v1/checks", "/api/v1/checks", {"vm": "x"}),
]

# Query forms of the routes above, refused and answered alike.
QUERY_FORMS = [
    ("GET", "/api/v1/stores?since=0", None),
]


def port_of(site):
    return int(site.api_url.split(":")[2].split("/")[0])


def call(site, method, path, body=None, ctx=None, plain=False, raw=None):
    if plain:
        conn = http.client.HTTPConnection("127.0.0.1", port_of(site), timeout=10)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port_of(site), timeout=10, context=ctx)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json"} if data is not None else {}
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        text = resp.read()
    finally:
        conn.close()
    return resp.status, text


@pytest.fixture
def site(site_factory):
    return site_factory("primary")


def test_route_table_equals_what_the_site_serves(site, tmp_path):
    certs = site_certs(tmp_path, "primary")
    status, text = call(site, "GET", "/api/v1/routes", ctx=tls_client_context(
        certs["ca"], *certs["vault"]))
    assert status == 200, text
    got = sorted((r["method"], r["pattern"]) for r in json.loads(text))
    want = sorted((m, p) for m, p, _, _ in ROUTES)
    assert got == want, (f"only served: {sorted(set(got) - set(want))}\n"
                         f"only here: {sorted(set(want) - set(got))}")


def test_only_the_vault_gets_in(site, tmp_path):
    certs = site_certs(tmp_path, "primary")
    other = make_certs(tmp_path / "tls", "recovery")["recovery"]
    foreign = make_certs(tmp_path / "other-ca", "vault")
    callers = {
        "no certificate": tls_client_context(certs["ca"]),
        "another site's certificate": tls_client_context(certs["ca"], *other),
        "a 'vault' certificate from another CA": tls_client_context(certs["ca"],
                                                                    *foreign["vault"]),
    }
    vault = tls_client_context(certs["ca"], *certs["vault"])
    for method, path, body in [(m, p, b) for m, _, p, b in ROUTES] + QUERY_FORMS:
        for who, ctx in callers.items():
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                status, text = call(site, method, path, body, ctx=ctx)
                pytest.fail(f"{method} {path} with {who}: answered {status} {text[:200]!r}")
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            status, text = call(site, method, path, body, plain=True)
            pytest.fail(f"{method} {path} over plain HTTP: answered {status} {text[:200]!r}")
        status, text = call(site, method, path, body, ctx=vault)
        assert status not in (401, 403), f"{method} {path} as the vault: {status} {text[:300]!r}"
        assert status < 500, f"{method} {path} as the vault: {status} {text[:300]!r}"
    assert site.alive()


def test_the_vault_checks_the_sites_name(site, tmp_path):
    """The site's own certificate is checked too: a TLS client that insists on the CN
    "recovery" does not accept this site (what the vault does with a registered name)."""
    certs = site_certs(tmp_path, "primary")
    ctx = tls_client_context(certs["ca"], *certs["vault"])
    conn = http.client.HTTPSConnection("127.0.0.1", port_of(site), timeout=10, context=ctx)
    conn.connect()
    cn = dict(x[0] for x in conn.sock.getpeercert()["subject"])["commonName"]
    conn.close()
    assert cn == "primary"


def test_bad_bodies_are_refused_with_a_reason(site, tmp_path):
    certs = site_certs(tmp_path, "primary")
    vault = tls_client_context(certs["ca"], *certs["vault"])
    deep = b'{"disks":' + b"[" * 100000 + b"]" * 100000 + b"}"
    status, text = call(site, "PUT", "/api/v1/groups/vm1", raw=deep, ctx=vault)
    assert status == 400 and b"nested deeper" in text, (status, text[:300])
    status, text = call(site, "PUT", "/api/v1/groups/vm1", raw=b"\xff", ctx=vault)
    assert status == 400, (status, text)
    status, text = call(site, "POST", "/api/v1/groups/vm1/vm/stop",
                        {"timeout_ms": "soon"}, ctx=vault)
    assert status in (400, 404), (status, text)
    status, text = call(site, "GET", "/api/v1/site", ctx=vault)
    assert status == 200
    assert site.alive()


def test_a_site_without_tls_refuses_to_start_off_loopback(tmp_path):
    from osrtest import require_osrd
    config = tmp_path / "s.toml"
    config.write_text(f'name = "s"\ndata_dir = "{tmp_path / "d"}"\n'
                      'nbd_listen = "127.0.0.1:0"\nreplication_listen = "127.0.0.1:0"\n'
                      'api_listen = "127.0.0.1:0"\n')
    p = subprocess.run([str(require_osrd()), "site", "--config", str(config)],
                       capture_output=True, text=True, timeout=20)
    assert p.returncode != 0 and "api_insecure" in p.stderr, p.stderr
    config.write_text(config.read_text().replace('api_listen = "127.0.0.1:0"',
                                                 'api_listen = "0.0.0.0:0"\napi_insecure = true'))
    p = subprocess.run([str(require_osrd()), "site", "--config", str(config)],
                       capture_output=True, text=True, timeout=20)
    assert p.returncode != 0 and "only on loopback" in p.stderr, p.stderr
