"""The vault's trust boundary (issue 9, docs/security.md), tried the way an attacker would
against a real quickstart: every route without a credential (401), with a role too low
(403) and with the right one (its documented answer); the route table here must equal the
routes the vault serves; CSRF and DNS rebinding; tokens (hashed, revoked, expired);
sessions; the audit log; bodies that used to crash the vault; private state files."""

import http.client
import json
import socket
import os
import stat
import time

import pytest

from conftest import create_vm, make_certs

# (method, pattern as the vault registers it, an example path, the role it needs,
#  a body, the status the right role gets). None as role: no credential needed.
# Examples name things that do not exist where a real one would change state, so the
# documented answer is 404 (or 400 for a refused body); the status codes are docs/api.md's.
ROUTES = [
    ("POST", "/api/v1/login", "/api/v1/login", None, {"token": "osr_1_" + "x" * 43}, 401),
    ("POST", "/api/v1/logout", "/api/v1/logout", "reader", {}, 200),
    ("GET", "/api/v1/whoami", "/api/v1/whoami", "reader", None, 200),
    ("GET", "/api/v1/routes", "/api/v1/routes", "reader", None, 200),
    ("GET", "/api/v1/tokens", "/api/v1/tokens", "admin", None, 200),
    ("POST", "/api/v1/tokens", "/api/v1/tokens", "admin", {"name": "x", "role": "superuser"}, 400),
    ("DELETE", "/api/v1/tokens/([^/]+)", "/api/v1/tokens/999", "admin", None, 404),
    ("GET", "/api/v1/audit", "/api/v1/audit", "admin", None, 200),
    ("GET", "/api/v1/sites", "/api/v1/sites", "reader", None, 200),
    ("POST", "/api/v1/sites", "/api/v1/sites", "admin",
     {"name": "evil", "api": "http://10.9.9.9:1/api/v1", "replication": "10.9.9.9:1"}, 400),
    ("GET", "/api/v1/policies", "/api/v1/policies", "reader", None, 200),
    ("POST", "/api/v1/policies", "/api/v1/policies", "admin",
     {"name": "p", "retention_seconds": 17446744074}, 400),
    ("GET", "/api/v1/vms", "/api/v1/vms", "reader", None, 200),
    ("POST", "/api/v1/vms", "/api/v1/vms", "admin",
     {"name": "v", "site": "nowhere", "disks": [{"name": "os", "size_bytes": 1048576}]}, 404),
    ("GET", "/api/v1/vms/([^/]+)", "/api/v1/vms/nope", "reader", None, 404),
    ("POST", "/api/v1/vms/([^/]+)/start", "/api/v1/vms/nope/start", "operator", {}, 404),
    ("GET", "/api/v1/vms/([^/]+)/console", "/api/v1/vms/nope/console", "operator", None, 404),
    ("POST", "/api/v1/vms/([^/]+)/stop", "/api/v1/vms/nope/stop", "operator", {}, 404),
    ("POST", "/api/v1/vms/([^/]+)/disks", "/api/v1/vms/nope/disks", "admin",
     {"name": "data", "size_bytes": 1048576, "add": True}, 404),
    ("POST", "/api/v1/vms/([^/]+)/repair", "/api/v1/vms/nope/repair", "admin", {}, 404),
    ("POST", "/api/v1/vms/([^/]+)/protect", "/api/v1/vms/nope/protect", "admin",
     {"target": "recovery"}, 404),
    ("GET", "/api/v1/items", "/api/v1/items", "reader", None, 200),
    ("GET", "/api/v1/items/([^/]+)", "/api/v1/items/nope", "reader", None, 404),
    ("DELETE", "/api/v1/items/([^/]+)", "/api/v1/items/nope", "admin", None, 404),
    ("GET", "/api/v1/items/([^/]+)/rpo", "/api/v1/items/nope/rpo", "reader", None, 404),
    ("GET", "/api/v1/items/([^/]+)/points", "/api/v1/items/nope/points", "reader", None, 404),
    ("POST", "/api/v1/items/([^/]+)/points", "/api/v1/items/nope/points", "operator", {}, 404),
    ("POST", "/api/v1/items/([^/]+)/test-failover", "/api/v1/items/nope/test-failover",
     "operator", {}, 404),
    ("POST", "/api/v1/items/([^/]+)/test-failover-cleanup",
     "/api/v1/items/nope/test-failover-cleanup", "operator", {}, 404),
    ("POST", "/api/v1/items/([^/]+)/failover", "/api/v1/items/nope/failover", "operator", {},
     404),
    ("POST", "/api/v1/items/([^/]+)/change-point", "/api/v1/items/nope/change-point",
     "operator", {"point": "1"}, 404),
    ("POST", "/api/v1/items/([^/]+)/commit", "/api/v1/items/nope/commit", "operator", {}, 404),
    ("POST", "/api/v1/items/([^/]+)/reprotect", "/api/v1/items/nope/reprotect", "operator", {},
     404),
    ("GET", "/api/v1/vault", "/api/v1/vault", "reader", None, 200),
    ("GET", "/api/v1/states", "/api/v1/states", "reader", None, 200),
    ("GET", "/api/v1/clock", "/api/v1/clock", "reader", None, 200),
    ("POST", "/api/v1/clock/confirm", "/api/v1/clock/confirm", "operator", {}, 200),
    ("GET", "/api/v1/jobs", "/api/v1/jobs", "reader", None, 200),
    ("GET", "/api/v1/jobs/([^/]+)", "/api/v1/jobs/999999", "reader", None, 404),
    ("POST", "/api/v1/jobs/([^/]+)/cancel", "/api/v1/jobs/999999/cancel", "operator", {}, 404),
    ("GET", "/metrics", "/metrics", "reader", None, 200),
]

ROLES = ["reader", "operator", "admin"]


class Vault:
    """Raw HTTP to the quickstart's vault, so every header is the test's choice."""

    def __init__(self, qs):
        self.port = qs.port
        self.admin = (qs.data_dir / "admin.token").read_text().strip()

    def call(self, method, path, body=None, token=None, headers=None, raw=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        h = {"Host": f"127.0.0.1:{self.port}"}
        data = raw
        if body is not None and raw is None:
            data = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        if token:
            h["Authorization"] = f"Bearer {token}"
        h.update(headers or {})
        conn.request(method, path, body=data, headers=h)
        resp = conn.getresponse()
        text = resp.read()
        conn.close()
        try:
            doc = json.loads(text) if text else None
        except json.JSONDecodeError:
            doc = text
        return resp.status, doc, resp

    def token(self, name, role, ttl=3600):
        status, doc, _ = self.call("POST", "/api/v1/tokens",
                                   {"name": name, "role": role, "expires_in_seconds": ttl},
                                   token=self.admin)
        assert status == 201, doc
        return doc["token"]

    def alive(self):
        status, _, _ = self.call("GET", "/api/v1/whoami", token=self.admin)
        return status == 200


def error_message(doc):
    assert isinstance(doc, dict) and isinstance(doc.get("error"), dict), doc
    return doc["error"]["message"]


@pytest.fixture
def vault(env):
    return Vault(env.qs)


def test_route_table_equals_what_the_vault_serves(vault):
    status, served, _ = vault.call("GET", "/api/v1/routes", token=vault.admin)
    assert status == 200
    got = sorted((r["method"], r["pattern"], r["role"]) for r in served)
    want = sorted((m, p, role) for m, p, _, role, _, _ in ROUTES)
    assert got == want, ("the vault serves routes this table does not cover (or the other way "
                         f"round):\nonly served: {sorted(set(got) - set(want))}\n"
                         f"only here: {sorted(set(want) - set(got))}")


def test_every_route_needs_its_role(vault):
    tokens = {role: vault.token(f"t-{role}", role) for role in ROLES}
    for method, _, path, need, body, answer in ROUTES:
        what = f"{method} {path}"
        if need is None:
            status, doc, _ = vault.call(method, path, body)
            assert status == answer, f"{what} (public): {status} {doc}"
            continue
        status, doc, resp = vault.call(method, path, body)
        assert status == 401, f"{what} without a credential: {status} {doc}"
        assert "Bearer" in resp.getheader("WWW-Authenticate", ""), what
        status, doc, _ = vault.call(method, path, body, token="osr_1_" + "A" * 43)
        assert status == 401, f"{what} with a forged token: {status} {doc}"
        status, doc, _ = vault.call(method, path, body, headers={"Authorization": "Basic eDp5"})
        assert status == 401, f"{what} with Basic auth: {status} {doc}"
        for role in ROLES[:ROLES.index(need)]:
            status, doc, _ = vault.call(method, path, body, token=tokens[role])
            assert status == 403, f"{what} as {role} (needs {need}): {status} {doc}"
            assert need in error_message(doc), doc
        for role in ROLES[ROLES.index(need):]:
            status, doc, _ = vault.call(method, path, body, token=tokens[role])
            assert status == answer, f"{what} as {role}: {status} {doc} (documented: {answer})"


def test_csrf_and_dns_rebinding_are_refused(env, vault):
    create_vm(env.osr, "vm1", [("os", "1M", 1 << 20)])
    before = env.osr.ok("vm", "list")
    body = json.dumps({"name": "vm2", "site": "primary",
                       "disks": [{"name": "os", "size_bytes": 1048576}]}).encode()
    # A form or fetch() from another page can send text/plain without a preflight.
    status, doc, _ = vault.call("POST", "/api/v1/vms", raw=body, token=vault.admin,
                                headers={"Content-Type": "text/plain"})
    assert status == 415, doc
    status, doc, _ = vault.call("POST", "/api/v1/vms", raw=body, token=vault.admin,
                                headers={"Content-Type": "application/json",
                                         "Origin": "http://evil.example"})
    assert status == 403 and "cross-origin" in error_message(doc), doc
    # DNS rebinding: evil.example resolves to 127.0.0.1; the browser sends its own Host.
    status, doc, _ = vault.call("GET", "/api/v1/vms", token=vault.admin,
                                headers={"Host": "evil.example:80"})
    assert status == 403 and "evil.example" in error_message(doc), doc
    status, doc, _ = vault.call("POST", "/api/v1/vms", raw=body, token=vault.admin,
                                headers={"Content-Type": "application/json",
                                         "Sec-Fetch-Site": "cross-site"})
    assert status == 403, doc
    assert env.osr.ok("vm", "list") == before, "a refused call changed the VMs"
    # The same-origin page is fine.
    status, doc, _ = vault.call("GET", "/api/v1/vms", token=vault.admin,
                                headers={"Origin": f"http://127.0.0.1:{vault.port}"})
    assert status == 200, doc


def test_a_session_needs_its_csrf_token(vault):
    status, doc, resp = vault.call("POST", "/api/v1/login", {"token": vault.admin})
    assert status == 200, doc
    cookie = resp.getheader("Set-Cookie")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie, cookie
    session = cookie.split(";")[0]
    csrf = doc["csrf_token"]
    status, doc, _ = vault.call("GET", "/api/v1/whoami", headers={"Cookie": session})
    assert status == 200 and doc["via"] == "session", doc
    status, doc, _ = vault.call("POST", "/api/v1/policies", {"name": "p1"},
                                headers={"Cookie": session})
    assert status == 403 and "CSRF" in error_message(doc), doc
    status, doc, _ = vault.call("POST", "/api/v1/policies", {"name": "p1"},
                                headers={"Cookie": session, "X-CSRF-Token": "x" * 43})
    assert status == 403, doc
    status, doc, _ = vault.call("POST", "/api/v1/policies", {"name": "p1"},
                                headers={"Cookie": session, "X-CSRF-Token": csrf})
    assert status == 201, doc
    status, doc, _ = vault.call("POST", "/api/v1/logout", {},
                                headers={"Cookie": session, "X-CSRF-Token": csrf})
    assert status == 200, doc
    status, doc, _ = vault.call("GET", "/api/v1/whoami", headers={"Cookie": session})
    assert status == 401, f"a session still works after logout: {doc}"


def test_tokens_are_hashed_revocable_and_expire(env, vault):
    t = vault.token("alice", "operator")
    tid = int(t.split("_")[1])
    # The catalog, read and written behind the vault's back (SQLite or PostgreSQL).
    catalog = env.qs.catalog
    dump = catalog.dump()
    assert "alice" in dump, f"{catalog}: the dump lacks the token rows: {dump[-2000:]}"
    secret = t.split("_", 2)[2]
    assert secret not in dump, "the catalog holds a token's secret"
    assert vault.call("GET", "/api/v1/items", token=t)[0] == 200
    # A wrong secret for a real id: refused the same way as an unknown id.
    status, doc, _ = vault.call("GET", "/api/v1/items", token=f"osr_{tid}_{'B' * 43}")
    assert status == 401 and "unknown token" in error_message(doc), doc
    status, doc, _ = vault.call("DELETE", f"/api/v1/tokens/{tid}", token=vault.admin)
    assert status == 200 and doc["revoked"], doc
    status, doc, _ = vault.call("GET", "/api/v1/items", token=t)
    assert status == 401 and "revoked" in error_message(doc), doc
    t2 = vault.token("bob", "reader")
    tid2 = int(t2.split("_")[1])
    assert catalog.execute("UPDATE tokens SET expires_ns = ? WHERE id = ?",
                           time.time_ns() - 1, tid2) == 1
    status, doc, _ = vault.call("GET", "/api/v1/items", token=t2)
    assert status == 401 and "expired" in error_message(doc), doc
    # An operator cannot mint tokens, not even for itself.
    op = vault.token("carol", "operator")
    status, doc, _ = vault.call("POST", "/api/v1/tokens", {"name": "x", "role": "admin"},
                                token=op)
    assert status == 403, doc


def test_mutating_calls_are_audited(env, vault):
    op = vault.token("auditee", "operator")
    vault.call("POST", "/api/v1/policies", {"name": "nope"}, token=op)  # 403
    vault.call("POST", "/api/v1/policies", {"name": "audited"}, token=vault.admin)  # 201
    status, log, _ = vault.call("GET", "/api/v1/audit?limit=50", token=vault.admin)
    assert status == 200
    rows = [(e["principal"], e["method"], e["path"], e["status"]) for e in log]
    assert any("auditee" in p and m == "POST" and pa == "/api/v1/policies" and s == 403
               for p, m, pa, s in rows), rows
    assert any("first-admin" in p and pa == "/api/v1/policies" and s == 201
               for p, m, pa, s in rows), rows
    for e in log:
        assert e["time"] and e["remote"] == "127.0.0.1", e
    # A call that was done says what it asked; a login's token is never logged.
    done = [e for e in log if e["path"] == "/api/v1/policies" and e["status"] == 201]
    assert done and '"name":"audited"' in done[-1]["message"], done
    secret = vault.token("sess", "reader")
    assert vault.call("POST", "/api/v1/login", {"token": secret})[0] == 200
    _, log, _ = vault.call("GET", "/api/v1/audit?limit=50", token=vault.admin)
    logins = [e for e in log if e["path"] == "/api/v1/login"]
    assert logins and all(secret not in e["message"] for e in logins), logins
    assert '"token":"(not logged)"' in logins[-1]["message"], logins
    # A token pasted where a name goes (done, or refused with an error that echoes it),
    # in a field name, or in a path: its id stays, its secret is never in a row.
    pasted = vault.token("pasted", "reader")
    token_id = pasted.split("_")[1]
    vault.call("POST", "/api/v1/policies", {"name": pasted}, token=vault.admin)
    vault.call("POST", "/api/v1/policies", {"name": "p2", pasted: 1}, token=vault.admin)
    vault.call("POST", f"/api/v1/items/{pasted}/failover", {"point": pasted}, token=vault.admin)
    _, log, _ = vault.call("GET", "/api/v1/audit?limit=50", token=vault.admin)
    secret_part = pasted.split("_", 2)[2]
    leaked = [e for e in log if secret_part in e["message"] or secret_part in e["path"]]
    assert not leaked, leaked
    masked = [e for e in log if f"osr_{token_id}_(not logged)" in e["message"] + e["path"]]
    assert len(masked) >= 3, [(e["path"], e["message"]) for e in log[-6:]]
    # A literal command line (a lab's) may carry a password: not in the audit log either,
    # nor a hook given as a bare command string (its entry's name stays).
    env.osr.ok("vm", "create", "cmdvm", "--site", "primary", "--disk", "os:1M", "--driver",
               "process", "--command", "run-it --password=sekrit-4711")
    status, doc, _ = vault.call("POST", "/api/v1/vms", {
        "name": "hookvm", "site": "primary", "disks": [{"name": "os", "size_bytes": 1 << 20}],
        "spec": {"driver": "none", "hooks": {"pre_failover": "MYSQL_PWD=sekrit-4712 mysql"}}},
        token=vault.admin)
    assert status == 201, doc
    _, log, _ = vault.call("GET", "/api/v1/audit?limit=5", token=vault.admin)
    created = [e for e in log if e["path"] == "/api/v1/vms" and e["status"] == 201]
    assert len(created) == 2 and '"command":"(not logged)"' in created[0]["message"], log
    assert '"pre_failover":"(not logged)"' in created[1]["message"], log
    assert all("sekrit-471" not in e["message"] for e in log), log
    # A token named like a token is refused; a name shaped like one is no VM's name either.
    status, doc, _ = vault.call("POST", "/api/v1/tokens", {"name": pasted, "role": "reader"},
                                token=vault.admin)
    assert status == 400 and "holds an osr token" in error_message(doc), doc
    assert secret_part not in error_message(doc), doc
    status, doc, _ = vault.call("POST", "/api/v1/vms", {
        "name": pasted[:40], "site": "primary", "disks": [{"name": "os", "size_bytes": 1 << 20}]},
        token=vault.admin)
    assert status == 400, doc
    # The CLI shows the same.
    env.osr.ok("policy", "create", "after-pasted")
    shown = env.osr.ok("audit", "--limit", "5")
    assert shown and shown[-1]["path"] == "/api/v1/policies", shown
    assert all(secret_part not in json.dumps(e) for e in shown), shown
    # Readers do not read the audit log.
    reader = vault.token("r", "reader")
    assert vault.call("GET", "/api/v1/audit", token=reader)[0] == 403


def test_bodies_that_used_to_crash_the_vault(vault):
    deep = b'{"name":' + b"[" * 100000 + b"]" * 100000 + b"}"
    status, doc, _ = vault.call("POST", "/api/v1/policies", raw=deep, token=vault.admin,
                                headers={"Content-Type": "application/json"})
    assert status == 400 and "nested deeper" in error_message(doc), doc
    cases = [
        ("/api/v1/policies", {"name": 7}, "name: must be a string"),
        ("/api/v1/policies", {"name": "p", "retention_seconds": "1d"}, "retention_seconds"),
        ("/api/v1/policies", {"name": "p", "retention_seconds": 17446744074},
         "retention_seconds: 17446744074 is out of range"),
        ("/api/v1/policies", {"name": "p", "crash_interval_seconds": -1},
         "crash_interval_seconds"),
        ("/api/v1/vms", {"name": "v", "site": "primary", "disks": "os:1G"}, "disks"),
        ("/api/v1/vms", {"name": "v", "site": "primary", "disks": [{"name": "os"}],
                         "spec": "x"}, "spec"),
        ("/api/v1/vms/x/stop", {"timeout_ms": "soon"}, "timeout_ms"),
        ("/api/v1/items/x/failover", {"planned": "yes"}, "planned"),
        ("/api/v1/tokens", {"name": "n", "expires_in_seconds": 1.5}, "expires_in_seconds"),
    ]
    for path, body, says in cases:
        status, doc, _ = vault.call("POST", path, body, token=vault.admin)
        assert status == 400 and says in error_message(doc), f"{path} {body}: {status} {doc}"
    for raw in (b"[]", b"nul", b'"x"', b"\xff\xfe", b"{" * 10):
        status, doc, _ = vault.call("POST", "/api/v1/policies", raw=raw, token=vault.admin,
                                    headers={"Content-Type": "application/json"})
        assert status == 400, f"{raw!r}: {status} {doc}"
    for q in ("limit=-1", "limit=abc", "limit=99999999999999999999", "state=Done"):
        status, doc, _ = vault.call("GET", f"/api/v1/jobs?{q}", token=vault.admin)
        assert status == 400, f"{q}: {status} {doc}"
    status, doc, _ = vault.call("GET", "/api/v1/jobs/99999999999999999999999", token=vault.admin)
    assert status == 400, doc
    assert vault.alive()


def test_a_misspelt_field_or_a_path_that_is_not_utf8_is_refused(vault):
    # A typo must not run another operation than the one meant ("plannd": an unplanned
    # failover), nor make a weaker token or a longer retention than asked.
    for path, body, field in [
            ("/api/v1/items/x/failover", {"point": "latest", "plannd": True}, "plannd"),
            ("/api/v1/tokens", {"name": "t9", "rol": "admin"}, "rol"),
            ("/api/v1/policies", {"name": "p9", "retention": 60}, "retention"),
            ("/api/v1/sites", {"name": "s", "api": "http://127.0.0.1:1", "replication":
                               "127.0.0.1:2", "replce": True}, "replce")]:
        status, doc, _ = vault.call("POST", path, body, token=vault.admin)
        assert status == 400, f"{path} {body}: {status} {doc}"
        assert f"{field}: is not a field of this call" in error_message(doc), doc
    status, doc, _ = vault.call("GET", "/api/v1/policies", token=vault.admin)
    assert status == 200 and all(p["name"] != "p9" for p in doc), doc
    # Not UTF-8: refused before any catalog sees it (PostgreSQL would answer 500), and the
    # refusal is in the audit log with the bad bytes escaped.
    for path in ("/api/v1/items/%FF", "/api/v1/jobs?vm=%FF", "/api/v1/vms/%C0%AF"):
        status, doc, _ = vault.call("GET", path, token=vault.admin)
        assert status == 400 and "not UTF-8" in error_message(doc), f"{path}: {status} {doc}"
    status, doc, _ = vault.call("DELETE", "/api/v1/items/%FF", token=vault.admin)
    assert status == 400, doc
    status, doc, _ = vault.call("GET", "/api/v1/audit", token=vault.admin)
    assert status == 200 and any(a["path"] == "/api/v1/items/\\xff" and a["status"] == 400
                                 for a in doc), doc[-5:]
    # Two lengths for one body (request smuggling behind a proxy).
    with socket.create_connection(("127.0.0.1", vault.port), timeout=30) as sock:
        sock.sendall((f"POST /api/v1/policies HTTP/1.1\r\nHost: 127.0.0.1:{vault.port}\r\n"
                      f"Authorization: Bearer {vault.admin}\r\n"
                      "Content-Type: application/json\r\nContent-Length: 2\r\n"
                      "Content-Length: 30\r\nConnection: close\r\n\r\n{}").encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head = answer.split(b"\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 400"), answer[:300]
    assert b"more than one Content-Length" in answer, answer[:300]
    assert vault.alive()


def test_repair_body_is_checked(env, vault):
    """POST /api/v1/vms/{vm}/repair refuses a wrong type and an unknown field (a misspelt
    option is not ignored) with a 400 naming the field; a good body reaches the repair."""
    create_vm(env.osr, "vm1", [("os", "1M", 1 << 20)])
    cases = [
        ({"trim_image": "yes"}, "trim_image: must be true or false, not a string"),
        ({"site": 7}, "site: must be a string, not a number"),
        ({"trim-image": True},
         "trim-image: is not a field of this call (it takes site, trim_image, reset_history, "
         "accept_changes)"),
    ]
    for body, says in cases:
        status, doc, _ = vault.call("POST", "/api/v1/vms/vm1/repair", body, token=vault.admin)
        assert status == 400 and error_message(doc) == says, f"{body}: {status} {doc}"
    status, doc, _ = vault.call("POST", "/api/v1/vms/vm1/repair", {"trim_image": True},
                                token=vault.admin)
    assert status == 400 and "nothing of VM vm1 is quarantined" in error_message(doc), doc


def test_a_site_in_use_is_not_moved_silently(env, vault):
    create_vm(env.osr, "vm1", [("os", "1M", 1 << 20)])
    sites = {s["name"]: s for s in env.osr.ok("site", "list")}
    body = {"name": "primary", "api": "http://127.0.0.1:9/api/v1", "replication": "127.0.0.1:9"}
    status, doc, _ = vault.call("POST", "/api/v1/sites", body, token=vault.admin)
    assert status == 409 and "replace" in error_message(doc), doc
    assert {s["name"]: s["api"] for s in env.osr.ok("site", "list")}["primary"] == \
        sites["primary"]["api"]
    # Not to another host without TLS, replace or not.
    body2 = dict(body, api="http://192.0.2.1:7482/api/v1", replace=True)
    status, doc, _ = vault.call("POST", "/api/v1/sites", body2, token=vault.admin)
    assert status == 400 and "https" in error_message(doc), doc
    # No credentials, query, fragment or spaces in an address that is shown and called.
    for api, why in [("https://user:pw@127.0.0.1:9/api/v1", "password"),
                     ("https://127.0.0.1:9/api/v1?x=1", "query"),
                     ("https://127.0.0.1:9/api/v1#top", "fragment"),
                     ("https://127.0.0.1:9/api /v1", "spaces"),
                     ("https://127.0.0.1:9/" + "a" * 1000, "1000"),
                     # The vault calls PATH/groups/...: the site API's own path, nothing else.
                     ("https://127.0.0.1:9/", "the path is /api/v1"),
                     ("https://127.0.0.1:9/api/v2", "the path is /api/v1"),
                     ("https://127.0.0.1:9/api/v1/../../etc", "the path is /api/v1"),
                     ("https://127.0.0.1:9", "the path is /api/v1"),
                     ("https://127.0.0.1:0/api/v1", "port 0"),
                     ("https://127.0.0.1/api/v1", "no port"),
                     ("https://10.9.9.9:7482:7483/api/v1", "not a host name"),
                     ("https://::1:7482/api/v1", "not a host name"),
                     ("https://a_b.example:7482/api/v1", "not one"),
                     ("https://-bad-.example:7482/api/v1", "not a host name")]:
        status, doc, _ = vault.call("POST", "/api/v1/sites", dict(body, api=api, replace=True),
                                    token=vault.admin)
        assert status == 400 and why in error_message(doc), (api, doc)
    for replication, why in [("user:pw@10.9.9.9:7481", "no user or password"),
                             ("10.9.9.9", "no port"), ("10.9.9.9:0", "port 0"),
                             ("::1:7481", "not a host name"), (" 10.9.9.9:7481", "not one"),
                             ("https://10.9.9.9:7481", "not one"),
                             ("10.9.9.9:7481:7482", "not a host name")]:
        status, doc, _ = vault.call("POST", "/api/v1/sites",
                                    dict(body, replication=replication, replace=True),
                                    token=vault.admin)
        assert status == 400 and why in error_message(doc), (replication, doc)
        assert "pw" not in error_message(doc) or "password" in error_message(doc), doc
    status, doc, _ = vault.call("POST", "/api/v1/sites", dict(body, name="vault"),
                                token=vault.admin)
    assert status == 400 and "the sites know the vault by" in error_message(doc), doc
    assert {s["name"]: s["api"] for s in env.osr.ok("site", "list")}["primary"] == \
        sites["primary"]["api"]
    # With replace it moves, and the audit log says who did it. A trailing '/' goes.
    status, doc, _ = vault.call("POST", "/api/v1/sites",
                                dict(body, api=body["api"] + "/", replace=True),
                                token=vault.admin)
    assert status == 201 and doc["api"] == body["api"], doc
    _, log, _ = vault.call("GET", "/api/v1/audit?limit=5", token=vault.admin)
    assert log[-1]["path"] == "/api/v1/sites" and log[-1]["status"] == 201
    # What the "site" at the new address says is not echoed raw (nothing listens there).
    listed = {s["name"]: s for s in env.osr.ok("site", "list")}["primary"]
    assert listed["reachable"] is False and "unreachable" in listed["error"], listed


def test_state_files_are_private(env):
    create_vm(env.osr, "vm1", [("os", "1M", 1 << 20)])
    bad = []
    for root, dirs, files in os.walk(env.qs.data_dir):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if stat.S_ISSOCK(st.st_mode) or stat.S_ISLNK(st.st_mode):
                continue
            public_ok = name.endswith(".pem") and not name.endswith("key.pem")
            if st.st_mode & 0o077 and not public_ok:
                bad.append(f"{path} {stat.filemode(st.st_mode)}")
    assert not bad, "state readable by others:\n" + "\n".join(bad)
    assert stat.S_IMODE(os.stat(env.qs.data_dir / "admin.token").st_mode) == 0o600


class FakeSite:
    """A plain-HTTP "site" on 127.0.0.1 (the vault allows http:// to loopback) that
    answers every call with `status` and `body`: a misconfigured or hostile endpoint."""

    def __init__(self, answer):
        import http.server
        import threading
        self.calls = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self):
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(n)
                fake.calls.append((self.command, self.path))
                status, body = answer(self.command, self.path)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = _any

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_a_sites_raw_error_body_is_not_echoed(env, vault):
    secret = b"<html>internal admin page: db password hunter2</html>"
    fake = FakeSite(lambda method, path: (500, secret))
    try:
        body = {"name": "fake", "api": f"http://127.0.0.1:{fake.port}/api/v1",
                "replication": "127.0.0.1:9"}
        status, doc, _ = vault.call("POST", "/api/v1/sites", body, token=vault.admin)
        assert status == 201, doc
        status, sites, _ = vault.call("GET", "/api/v1/sites", token=vault.admin)
        assert status == 200
        row = {s["name"]: s for s in sites}["fake"]
        assert row["reachable"] is False and row["error"] == "site fake: HTTP 500", row
        assert b"hunter2" not in json.dumps(sites).encode()
    finally:
        fake.close()


def test_a_site_answering_the_wrong_types_does_not_stop_the_vault(env, vault):
    """A site whose store status says {"durable_seq": "x"} used to end the vault's point
    loop (std::terminate). Now that item gets no point, the vault and the others go on."""
    from conftest import protect
    create_vm(env.osr, "vm1", [("os", "1M", 1 << 20)])
    protect(env.osr, "vm1")
    create_vm(env.osr, "vm2", [("os", "1M", 1 << 20)])
    protect(env.osr, "vm2")
    before = env.osr.ok("point", "list", "vm2")

    bad_store = {"durable_seq": "x", "durable_time_ns": [1], "base_seq": {"a": 1}}

    def answer(method, path):
        if path.startswith("/api/v1/stores/"):
            return 200, json.dumps(bad_store).encode()
        if path == "/api/v1/stores":  # the point loop's one call for all stores
            return 200, json.dumps([dict(bad_store, name=vm) for vm in ("vm1", "vm2")]).encode()
        return 200, b'{"disks":"nope","groups":7}'
    fake = FakeSite(answer)
    try:
        sites = {s["name"]: s for s in env.osr.ok("site", "list")}
        rec = sites["recovery"]
        # The recovery site "moves" to the fake (an admin's mistake, audited).
        status, doc, _ = vault.call(
            "POST", "/api/v1/sites",
            {"name": "recovery", "api": f"http://127.0.0.1:{fake.port}/api/v1",
             "replication": "127.0.0.1:9", "replace": True}, token=vault.admin)
        assert status == 201, doc
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(p.startswith("/api/v1/stores")
                                                      for _, p in fake.calls):
            time.sleep(0.2)
        assert any(p.startswith("/api/v1/stores") for _, p in fake.calls), fake.calls
        time.sleep(2)  # more ticks of the point loop against the fake
        assert vault.alive(), "the vault stopped answering"
        assert env.qs.alive(), "the quickstart process ended"
        # The item says what is wrong with its recovery site, in words naming the field.
        shown = None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            shown = env.osr.ok("item", "show", "vm1")
            if shown["health"].startswith("Critical: site recovery store vm1.durable_seq"):
                break
            time.sleep(0.5)
        assert shown["health"].startswith("Critical: site recovery store vm1.durable_seq: must "
                                          "be a whole number"), shown
        # The list (one call per site for all items) says the same of each.
        listed = {i["name"]: i for i in env.osr.ok("item", "list")}
        for vm in ("vm1", "vm2"):
            assert listed[vm]["health"].startswith(
                f"Critical: site recovery store {vm}.durable_seq: must be a whole number"), listed
        assert vault.alive() and env.qs.alive()
        # Back to the real site: points resume.
        status, doc, _ = vault.call(
            "POST", "/api/v1/sites",
            {"name": "recovery", "api": rec["api"], "replication": rec["replication"],
             "replace": True}, token=vault.admin)
        assert status == 201, doc
    finally:
        fake.close()
    assert vault.alive()
    # The vault works with the real site again: its points and health come back.
    point = env.osr.ok("point", "create", "vm2")
    assert point["seq"] >= max(p["seq"] for p in before), point
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        shown = env.osr.ok("item", "show", "vm1")
        if shown["health"] == "Normal":
            break
        time.sleep(0.5)
    assert shown["health"] == "Normal", shown


def test_nbd_tls_with_the_quickstarts_client_certificates(env, tmp_path):
    """The quickstart's NBD listener takes STARTTLS with the client folder it writes
    (osr-data/tls/nbd-client): nbdinfo and qemu-img read a VM's disk over TLS; a client
    with a certificate of another CA is refused."""
    import re
    import subprocess
    from osrtest import require_tool
    vm = create_vm(env.osr, "vm1", [("os", "1M", 1 << 20)])
    uri = vm["disks"][0]["uri"]
    m = re.match(r"^nbd://(127\.0\.0\.1:\d+)/(vm/vm1/os)$", uri)
    assert m, uri
    client_dir = env.qs.data_dir / "tls" / "nbd-client"
    for f in ("ca-cert.pem", "client-cert.pem", "client-key.pem"):
        assert (client_dir / f).exists(), f
    tls_uri = f"nbds://{m.group(1)}/{m.group(2)}?tls-certificates={client_dir}"
    p = subprocess.run([require_tool("nbdinfo"), "--json", tls_uri], capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["TLS"] is True and info["exports"][0]["export-size"] == 1 << 20, info
    p = subprocess.run([require_tool("qemu-img"), "info", "--output=json",
                        "--image-opts",
                        f"driver=nbd,server.type=inet,server.host=127.0.0.1,"
                        f"server.port={m.group(1).split(':')[1]},export={m.group(2)},"
                        "tls-creds=tls0",
                        "--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={client_dir}"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["virtual-size"] == 1 << 20
    # Another CA's client certificate: the handshake fails, no size is shown.
    other = make_certs(tmp_path / "other-ca", "nbd-client")
    odir = tmp_path / "other-client"
    odir.mkdir()
    (odir / "ca-cert.pem").write_text((client_dir / "ca-cert.pem").read_text())
    (odir / "client-cert.pem").write_text(open(other["nbd-client"][0]).read())
    (odir / "client-key.pem").write_text(open(other["nbd-client"][1]).read())
    p = subprocess.run([require_tool("nbdinfo"), "--json",
                        f"nbds://{m.group(1)}/{m.group(2)}?tls-certificates={odir}"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "export-size" not in p.stdout, (p.stdout, p.stderr)
