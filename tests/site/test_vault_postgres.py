"""`osrd vault --db postgresql://...`: the vault's catalog on a real PostgreSQL 15 server
(osrtest.PgServer: initdb into a temp dir, run as the postgres user, a free port of
127.0.0.1).

- The vault makes its schema, serves, and never prints the URL's password.
- The server stops under it: calls answer 503 naming the server (no crash, no hang); the
  server returns: the vault connects again by itself and serves the same rows.
"""

import json
import subprocess
import time
import urllib.error
import urllib.request

from conftest import OsrdProcess, make_certs
import osrtest

PASSWORD = "S3cret-not-to-be-logged"
CALL_TIMEOUT_S = 60  # above the vault's own 35 s answer deadline


class PgVault(OsrdProcess):
    label = "vault (PostgreSQL): osrd"

    def __init__(self, db_url, port, state_dir):
        super().__init__(state_dir / "vault.stderr")
        self.db_url, self.port, self.state_dir = db_url, port, state_dir

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def osrd_args(self):
        certs = make_certs(self.state_dir / "tls", "vault")
        cert, key = certs["vault"]
        return ["vault", "--db", self.db_url, "--listen", f"127.0.0.1:{self.port}",
                "--admin-token-file", str(self.state_dir / "admin.token"),
                "--site-ca", certs["ca"], "--site-cert", cert, "--site-key", key]


def call(vault, method, path, body=None):
    """(HTTP status, JSON answer) of one call with the first admin token."""
    token = (vault.state_dir / "admin.token").read_text().strip()
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(vault.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=CALL_TIMEOUT_S) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_vault_on_postgres_serves_and_survives_the_server_going_away(tmp_path):
    osrtest.require_osrd()
    with osrtest.PgServer() as pg:
        url = pg.create_database("osr_vault")
        # Trust authentication ignores the password; it is there to be kept out of logs.
        secret_url = url.replace("postgres@", f"postgres:{PASSWORD}@")
        vault = PgVault(secret_url, osrtest.free_port(), tmp_path)
        vault.start()
        try:
            status, policies = call(vault, "GET", "/api/v1/policies")
            assert status == 200, policies
            assert [p["name"] for p in policies] == ["default"]
            status, answer = call(vault, "POST", "/api/v1/policies",
                                  {"name": "gold", "retention_seconds": 3600})
            assert status in (200, 201), answer
            # The rows are in PostgreSQL, at the newest schema.
            db = url.rsplit("/", 1)[1]
            assert pg.sql(db, "SELECT value FROM meta WHERE key='schema_version'").strip() == "6"
            assert pg.sql(db, "SELECT name FROM policies ORDER BY name").split() == [
                "default", "gold"]

            pg.stop()
            t0 = time.monotonic()
            status, answer = call(vault, "GET", "/api/v1/policies")
            assert status == 503, answer
            message = answer["error"]["message"]
            assert f"PostgreSQL server 127.0.0.1:{pg.port} (database {db})" in message, message
            assert time.monotonic() - t0 < CALL_TIMEOUT_S
            assert vault.alive()

            pg.restart()
            # The next call connects again by itself.
            status, policies = call(vault, "GET", "/api/v1/policies")
            assert status == 200, policies
            assert [p["name"] for p in policies] == ["default", "gold"]
        finally:
            vault.stop_clean()
        logged = vault.stderr() + "\n".join(vault.stdout_lines)
        assert PASSWORD not in logged
        assert f"PostgreSQL server 127.0.0.1:{pg.port} (database {db})" in logged


def test_vault_refuses_to_start_on_an_unreachable_server(tmp_path):
    osrtest.require_osrd()
    port = osrtest.free_port()  # nobody listens there
    vault = PgVault(f"postgresql://osr:{PASSWORD}@127.0.0.1:{port}/osr", osrtest.free_port(),
                    tmp_path)
    cmd = [str(osrtest.osrd_path())] + [str(a) for a in vault.osrd_args()]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    out = p.stdout + p.stderr
    assert f"PostgreSQL server 127.0.0.1:{port} (database osr) cannot be reached" in out, out
    assert PASSWORD not in out
