"""The leader's fence reaches the sites (docs/api.md, "Lease tokens"; site/lease_token.h):
every call the leading vault's work makes to a site carries its lease term's token
(X-Osr-Lease-Token); a site keeps the highest token it has seen in data_dir/lease-token
and refuses a state-changing call of a lower one.

- Two vaults on a real PostgreSQL: the leader A is paused (SIGSTOP) past its lease, B takes
  over and looks at the sites; a state-changing call carrying A's token (the call A had on
  its way) is refused with 409 naming both tokens, and the site's state is as it was. A
  read with A's token is still answered. The site keeps the token across a restart.
- A catalog restored from a backup older than the sites' token: the restored vault's
  leader is refused (and does not raise its token by itself); started once with
  --lease-token-floor N, it leads above N and the same failover succeeds.
"""

import os
import random
import signal
import stat

from conftest import KIB, MIB, api, api_ok, require_libnbd, seed_for, wait_for
import osrtest
from test_catalog_backup import SqliteCatalog, register_sites
from test_vault_leader import TAKEOVER_S, LeaderVault, cluster  # noqa: F401 (fixture)

SIZE = 16 * MIB
HEADER = "X-Osr-Lease-Token"


def site_token(site):
    return api_ok(site, "GET", "/site")["lease_token"]


def wait_site_token(site, token, what):
    wait_for(lambda: site_token(site) == token, 30,
             f"site {site.name} to have seen lease token {token} ({what})",
             detail=lambda: api_ok(site, "GET", "/site"))


def assert_fenced(site, method, path, body, carried, seen):
    status, doc = api(site, method, path, body, headers={HEADER: str(carried)})
    assert status == 409, (method, path, status, doc)
    err = doc["error"]
    assert err["code"] == "failed precondition", doc
    assert err["message"].startswith(
        f"fenced: this site has seen lease token {seen}; this call carries {carried} — "
        "another vault leads now"), err["message"]
    assert f"--lease-token-floor {seen}" in err["message"], err["message"]


def test_a_paused_leaders_call_is_refused_by_the_site(cluster, request):  # noqa: F811
    pg, db, a, b, primary, recovery = cluster
    rng = random.Random(seed_for(request))
    a.osr("vm", "create", "vm1", "--site", "primary", "--disk", f"os:{SIZE}")
    model = bytearray(SIZE)
    uri = a.osr("vm", "show", "vm1")["disks"][0]["uri"]
    osrtest.write_random(uri, model, rng, 8, 256 * KIB, "pytest-fence")
    a.osr("protect", "vm1", "--target", "recovery", "--wait")
    token_a = a.ok("GET", "/vault")["leader"]["token"]
    # A's job and point loop told both sites its token.
    wait_site_token(primary, token_a, "vault A's calls")
    wait_site_token(recovery, token_a, "vault A's calls")
    group_before = api_ok(primary, "GET", "/groups/vm1")
    assert group_before["replicate_to"] == recovery.replication, group_before
    assert group_before["fenced_epoch"] == 0, group_before

    a.proc.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: b.role() == "leader", TAKEOVER_S, "vault B to take the lease")
        token_b = b.ok("GET", "/vault")["leader"]["token"]
        assert token_b == token_a + 1
        # B's point loop looks at both sites: from then on they fence A.
        wait_site_token(primary, token_b, "vault B's first look")
        wait_site_token(recovery, token_b, "vault B's first look")

        # The calls A had on their way when it was paused: each refused, naming both tokens.
        assert_fenced(primary, "POST", "/groups/vm1/fence", {"epoch": 2}, token_a, token_b)
        assert_fenced(primary, "PUT", "/groups/vm1/replication",
                      {"target": "127.0.0.1:9", "epoch": 1}, token_a, token_b)
        assert_fenced(primary, "POST", "/groups/vm1/vm/stop", {"timeout_ms": 1000}, token_a,
                      token_b)
        assert_fenced(recovery, "POST", "/stores/vm1/views", {"seq": 1}, token_a, token_b)
        assert_fenced(recovery, "DELETE", "/stores/vm1", None, token_a, token_b)
        assert_fenced(recovery, "POST", "/groups/vm1/failover", {"seq": 1, "epoch": 2}, token_a,
                      token_b)
        # Reads are never refused, an old token or not; a bad token is a 400.
        status, doc = api(primary, "GET", "/groups/vm1", headers={HEADER: str(token_a)})
        assert status == 200, doc
        status, doc = api(primary, "GET", "/groups/vm1", headers={HEADER: "seven"})
        assert status == 400 and HEADER in doc["error"]["message"], doc
        status, doc = api(primary, "POST", "/groups/vm1/fence", {"epoch": 2},
                          headers={HEADER: "-1"})
        assert status == 400, doc

        # The sites are as B left them: not fenced, still shipping to recovery, no view.
        group = api_ok(primary, "GET", "/groups/vm1")
        assert group["fenced_epoch"] == 0 and group["replicate_to"] == recovery.replication, group
        assert api(recovery, "GET", "/stores/vm1")[0] == 200
        assert api(recovery, "GET", "/groups/vm1")[0] == 404
    finally:
        a.proc.send_signal(signal.SIGCONT)

    wait_for(lambda: a.ok("GET", "/vault")["this"]["role"] == "follower", 30,
             "vault A to follow", detail=lambda: a.stderr()[-2000:])
    # Replication goes on under B: new writes reach the recovery store.
    osrtest.write_random(uri, model, rng, 8, 256 * KIB, "pytest-fence")
    last = api_ok(primary, "GET", "/groups/vm1")["last_seq"]
    wait_for(lambda: api_ok(recovery, "GET", "/stores/vm1")["durable_seq"] >= last, 30,
             "the writes made after the takeover to reach recovery")

    # The token is on disk (0600) and survives a restart of the site.
    path = primary.data_dir / "lease-token"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    primary.stop()
    primary.start()
    assert site_token(primary) == token_b
    assert_fenced(primary, "POST", "/groups/vm1/fence", {"epoch": 2}, token_a, token_b)
    assert api_ok(primary, "GET", "/groups/vm1")["fenced_epoch"] == 0


class FloorVault(LeaderVault):
    """A LeaderVault whose next start adds `extra` to its arguments."""

    extra = []

    def osrd_args(self):
        return super().osrd_args() + [str(x) for x in self.extra]


def make_point(vault, vm):
    p = vault.osr("point", "create", vm)
    p = p.get("point", p) if isinstance(p, dict) else p
    return p["id"]


def wait_job_end(vault, job):
    wait_for(lambda: vault.ok("GET", f"/jobs/{job}")["state"] not in ("Queued", "Running"), 120,
             f"job {job} to end")
    return vault.ok("GET", f"/jobs/{job}")


def restart(vault, extra=()):
    vault.stop_clean()
    vault.extra = list(extra)
    vault.start()
    wait_for(lambda: vault.role() == "leader", 15, f"vault {vault.name} to lead")
    return vault.ok("GET", "/vault")["leader"]["token"]


def test_a_restored_catalog_is_refused_until_the_operator_raises_its_token(
        sites, tmp_path, request):
    require_libnbd()
    primary, recovery = sites
    rng = random.Random(seed_for(request))
    catalog = SqliteCatalog(tmp_path)
    vault = FloorVault("A", catalog.db_arg(), tmp_path)
    try:
        vault.start()
        wait_for(lambda: vault.role() == "leader", 15, "vault A to lead")
        register_sites(vault, primary, recovery)
        vault.osr("vm", "create", "vm1", "--site", "primary", "--disk", f"os:{SIZE}")
        model = bytearray(SIZE)
        uri = vault.osr("vm", "show", "vm1")["disks"][0]["uri"]
        osrtest.write_random(uri, model, rng, 8, 256 * KIB, "pytest-fence")
        vault.osr("protect", "vm1", "--target", "recovery", "--wait")
        point = make_point(vault, "vm1")
        at_point = bytes(model)
        backup = catalog.backup(tmp_path / "catalog-backup.db")
        backed_up = vault.ok("GET", "/vault")["leader"]["token"]

        # Life goes on: two restarts, two more terms; the sites see the newest token.
        restart(vault)
        newest = restart(vault)
        assert newest == backed_up + 2
        wait_site_token(primary, newest, "the point loop's reads")
        wait_site_token(recovery, newest, "the point loop's reads")

        # The catalog is lost and restored: its token is older than the sites'.
        vault.stop_clean()
        catalog.restore(backup)
        vault.extra = []
        vault.start()
        wait_for(lambda: vault.role() == "leader", 15, "the restored vault to lead")
        restored = vault.ok("GET", "/vault")["leader"]["token"]
        assert restored == backed_up + 1 < newest
        job = vault.osr("failover", "vm1", "--point", point)["id"]
        done = wait_job_end(vault, job)
        assert done["state"] == "Failed", done
        assert (f"site recovery: fenced: this site has seen lease token {newest}; this call "
                f"carries {restored}") in done["error"], done
        assert f"--lease-token-floor {newest}" in done["error"], done
        assert (f"vault: site recovery refused POST /groups/vm1/failover: it has seen lease "
                f"token {newest}, this call carried {restored}") in vault.stderr(), \
            vault.stderr()[-3000:]
        # Nothing moved at the sites, and the vault did not raise its token by itself.
        group = api_ok(primary, "GET", "/groups/vm1")
        assert group["fenced_epoch"] == 0 and group["replicate_to"] == recovery.replication, group
        assert api(recovery, "GET", "/groups/vm1")[0] == 404
        assert vault.ok("GET", "/vault")["leader"]["token"] == restored
        assert site_token(primary) == newest and site_token(recovery) == newest

        # The operator's reset: one start with --lease-token-floor N (N from the message).
        floored = restart(vault, ["--lease-token-floor", newest])
        assert floored == newest + 1
        assert "--lease-token-floor" in vault.stderr() and \
            f"the lease token goes from {restored}" in vault.stderr(), vault.stderr()[-2000:]
        job = vault.osr("failover", "vm1", "--point", point)["id"]
        done = wait_job_end(vault, job)
        assert done["state"] == "Succeeded", done
        assert vault.ok("GET", "/items/vm1")["state"] == "FailedOver"
        osrtest.assert_same_bytes(
            osrtest.read_uri(vault.osr("vm", "show", "vm1")["disks"][0]["uri"], SIZE,
                             "pytest-fence"),
            at_point, f"vm1 failed over to point {point} after the reset")
        assert site_token(recovery) == floored
        # The flag left in place is harmless: the token is above it already.
        assert restart(vault, ["--lease-token-floor", newest]) == floored + 1
        vault.stop_clean()
    finally:
        osrtest.stop_all_clean([vault])
