"""The catalog's operations (docs/operations.md, "The catalog: backup, restore and a
standby"), as an operator runs them: a vault on SQLite or on a real PostgreSQL 15 server
(osrtest.PgServer), two site daemons, the disks read through libnbd.

- An online backup of the catalog, taken while the vault runs (SQLite: `sqlite3 FILE
  ".backup DEST"`; PostgreSQL: `pg_dump -Fc`), restored in place of the catalog (SQLite:
  the file, the vault stopped; PostgreSQL: `pg_restore` into a fresh database): the
  vault lists the same items and points, and a failover to a point of the backup gives
  the disks as they were at that point.
- A catalog older than the sites' state (a VM protected, another unprotected and a
  failover finished after the backup; the backup holds that failover's job Running): the
  vault comes up, says what is wrong, and removes nothing at the sites.
- A PostgreSQL streaming standby (pg_basebackup -R) of the catalog: the rows reach it; the
  primary is killed, the standby promoted, and a vault on it serves the items and fails a
  VM over.
"""

import contextlib
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import KIB, MIB, api, api_ok, require_libnbd, seed_for, wait_for
import osrtest
from test_vault_leader import LeaderVault

SIZE = 16 * MIB
TOOL_TIMEOUT_S = 60


# -- helpers ------------------------------------------------------------------------------


def write_random(uri, model, rng, n, max_len=256 * KIB):
    osrtest.write_random(uri, model, rng, n, max_len, "pytest-catalog")


def read_all(uri, size=SIZE):
    return osrtest.read_uri(uri, size, "pytest-catalog")


def run_tool(argv, what):
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                       timeout=TOOL_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"{what}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def pg_tool(pg, name):
    """PostgreSQL's `name` (pg_dump, pg_restore, pg_basebackup) from the server's bin dir;
    missing, the test fails."""
    tool = pg.bin / name
    if not os.access(tool, os.X_OK):
        pytest.fail(f"PostgreSQL's {name} is not in {pg.bin} (scripts/bootstrap installs "
                    "postgresql)", pytrace=False)
    return str(tool)


def register_sites(vault, *sites):
    for s in sites:
        vault.osr("site", "add", s.name, "--api", s.api_url, "--replication", s.replication)


def protect_new_vm(vault, name, model, rng, policy=None):
    """A VM with a disk of SIZE at primary, written at random, protected to recovery."""
    vault.osr("vm", "create", name, "--site", "primary", "--disk", f"os:{SIZE}")
    uri = vault.osr("vm", "show", name)["disks"][0]["uri"]
    write_random(uri, model, rng, 16)
    args = ["protect", name, "--target", "recovery", "--wait"]
    if policy:
        args += ["--policy", policy]
    vault.osr(*args)
    return uri


def catalog_view(vault):
    """What the backup must give back: each item's lasting fields and its points."""
    items = vault.ok("GET", "/items")
    items = items["items"] if isinstance(items, dict) else items
    out = {}
    for i in items:
        points = vault.ok("GET", f"/items/{i['name']}/points")
        points = points["points"] if isinstance(points, dict) else points
        out[i["name"]] = {"state": i["state"], "source": i["source"], "target": i["target"],
                          "epoch": i["epoch"],
                          "points": [(p["id"], p["seq"], p["type"]) for p in points]}
    return out


def assert_restored(vault, before):
    """The restored vault lists the backup's items and, for each, the backup's points
    first (the point loop may have added newer ones since it started)."""
    after = catalog_view(vault)
    assert sorted(after) == sorted(before), (after, before)
    for vm, was in before.items():
        now = after[vm]
        assert {k: now[k] for k in ("state", "source", "target", "epoch")} == \
               {k: was[k] for k in ("state", "source", "target", "epoch")}, (vm, now, was)
        assert now["points"][:len(was["points"])] == was["points"], (vm, now, was)


def make_point(vault, vm):
    """A recovery point now (everything written so far replicated); its id."""
    p = vault.osr("point", "create", vm)
    p = p.get("point", p) if isinstance(p, dict) else p
    assert isinstance(p, dict) and isinstance(p.get("id"), int), p
    return p["id"]


def failover_to(vault, vm, point_id):
    job = vault.osr("failover", vm, "--point", point_id, "--wait")
    assert job["state"] == "Succeeded", job
    return vault.osr("vm", "show", vm)["disks"][0]["uri"]


# -- backup and restore, per backend --------------------------------------------------------


class SqliteCatalog:
    """The vault's SQLite file; backups with the sqlite3 shell's .backup (SQLite's online
    backup API: a consistent copy while the vault writes, WAL included)."""

    def __init__(self, tmp_path):
        self.path = tmp_path / "catalog.db"
        self.sqlite3 = osrtest.require_tool("sqlite3")

    def db_arg(self):
        return str(self.path)

    def backup(self, dest):
        run_tool([self.sqlite3, self.path, ".timeout 10000", f".backup '{dest}'"],
                 "sqlite3 .backup")
        check = run_tool([self.sqlite3, dest, "PRAGMA integrity_check"], "integrity_check")
        assert check.strip() == "ok", check
        return dest

    def restore(self, backup):
        """The vault is stopped: the backup replaces the file (and its WAL and shared
        memory files, which belong to the old file). The --db to start on."""
        for leftover in (self.path.with_name(self.path.name + "-wal"),
                         self.path.with_name(self.path.name + "-shm")):
            leftover.unlink(missing_ok=True)
        shutil.copyfile(backup, self.path)
        return str(self.path)


class PostgresCatalog:
    """A database of a PgServer; backups with pg_dump -Fc, restored with pg_restore into
    a fresh database."""

    def __init__(self, pg):
        self.pg = pg
        self.url = pg.create_database("osr_catalog")
        self.db = self.url.rsplit("/", 1)[1]
        self.pg_dump = pg_tool(pg, "pg_dump")
        self.pg_restore = pg_tool(pg, "pg_restore")

    def db_arg(self):
        return self.url

    def backup(self, name):
        # In the server's directory: the tools run as the postgres user.
        dest = self.pg.dir / f"{name}.dump"
        self.pg._run([self.pg_dump, "-Fc", "-h", str(self.pg.dir), "-p", str(self.pg.port),
                      "-U", "postgres", "-d", self.db, "-f", str(dest)], "pg_dump -Fc")
        return dest

    def restore(self, backup):
        """Into a new database (the old one may be gone with its server); its URL."""
        url = self.pg.create_database("osr_restored")
        self.pg._run([self.pg_restore, "--exit-on-error", "--no-owner", "-h", str(self.pg.dir),
                      "-p", str(self.pg.port), "-U", "postgres", "-d", url.rsplit("/", 1)[1],
                      str(backup)], "pg_restore")
        return url


@contextlib.contextmanager
def catalog_of(backend, tmp_path):
    if backend == "sqlite":
        yield SqliteCatalog(tmp_path)
        return
    with osrtest.PgServer() as pg:
        yield PostgresCatalog(pg)


@pytest.fixture
def vaults():
    """Vaults the test starts; each still running at teardown must stop cleanly."""
    made = []
    yield made
    osrtest.stop_all_clean(made)


def start_vault(vaults, tmp_path, db, name="A"):
    v = LeaderVault(name, db, tmp_path)
    vaults.append(v)
    v.start()
    wait_for(lambda: v.role() == "leader", 15, f"vault {name} to lead")
    return v


# -- a) and b): an online backup, restored ----------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_an_online_backup_of_the_catalog_restores_items_points_and_failover(
        backend, sites, vaults, tmp_path, request):
    require_libnbd()
    primary, recovery = sites
    rng = random.Random(seed_for(request))
    with catalog_of(backend, tmp_path) as catalog:
        vault = start_vault(vaults, tmp_path, catalog.db_arg())
        register_sites(vault, primary, recovery)
        models = {"vm1": bytearray(SIZE), "vm2": bytearray(SIZE)}
        uri1 = protect_new_vm(vault, "vm1", models["vm1"], rng)
        protect_new_vm(vault, "vm2", models["vm2"], rng)
        write_random(uri1, models["vm1"], rng, 24)
        point = make_point(vault, "vm1")
        at_point = bytes(models["vm1"])

        # The backup, while the vault runs (its lease renewals write every 0.67 s).
        before = catalog_view(vault)
        backup = catalog.backup(tmp_path / "catalog-backup.db" if backend == "sqlite"
                                else "catalog-backup")
        assert any(p[0] == point for p in before["vm1"]["points"]), before
        # Life goes on after the backup: more writes, more points.
        write_random(uri1, models["vm1"], rng, 24)
        make_point(vault, "vm1")

        # The catalog is lost: the vault stops, the backup takes its place.
        vault.stop_clean()
        vault.db_url = catalog.restore(backup)
        vault.start()
        wait_for(lambda: vault.role() == "leader", 15, "the restored vault to lead")
        assert_restored(vault, before)
        # Replication went on at the sites meanwhile: the item is healthy again.
        wait_for(lambda: vault.ok("GET", "/items/vm2")["health"] == "Normal", 30,
                 "vm2 to be Normal on the restored catalog",
                 detail=lambda: vault.ok("GET", "/items/vm2"))

        # A failover to a point of the backup: the disks as they were at that point.
        new_uri = failover_to(vault, "vm1", point)
        osrtest.assert_same_bytes(read_all(new_uri), at_point,
                                  f"vm1 failed over to point {point} of the restored catalog")
        item = vault.ok("GET", "/items/vm1")
        assert item["state"] == "FailedOver" and item["epoch"] == 2, item
        vault.stop_clean()


# -- c): a catalog older than the sites --------------------------------------------------


def site_state(primary, recovery, vm):
    """(the primary's group, the recovery site's store, the recovery site's group) of vm:
    each the answer's JSON, or None for 404."""
    out = []
    for site, path in ((primary, f"/groups/{vm}"), (recovery, f"/stores/{vm}"),
                       (recovery, f"/groups/{vm}")):
        status, doc = api(site, "GET", path)
        assert status in (200, 404), (site.name, path, status, doc)
        out.append(doc if status == 200 else None)
    return tuple(out)


def test_a_catalog_older_than_the_sites(sites, vaults, tmp_path, request):
    """The catalog is restored from a backup taken before: a failover that was running
    then (and finished since), an unprotect and a protect since. The vault comes up,
    finishes the failover's job again without harm, says what does not match, and deletes
    nothing at the sites."""
    require_libnbd()
    primary, recovery = sites
    rng = random.Random(seed_for(request))
    catalog = SqliteCatalog(tmp_path)
    vault = start_vault(vaults, tmp_path, catalog.db_arg())
    register_sites(vault, primary, recovery)
    vault.osr("policy", "create", "slow", "--bandwidth", "1M")
    models = {vm: bytearray(SIZE) for vm in ("vm1", "vm2", "vm3", "vm4")}
    uris = {vm: protect_new_vm(vault, vm, models[vm], rng) for vm in ("vm1", "vm2")}
    uris["vm4"] = protect_new_vm(vault, "vm4", models["vm4"], rng, policy="slow")

    # vm4's failover waits for ~5 MiB still to replicate at 1 MB/s: the backup holds its
    # job Running (in "Resolve the recovery point"), the item still Protected at epoch 1.
    write_random(uris["vm4"], models["vm4"], rng, 40)
    job = vault.osr("failover", "vm4", "--point", "latest")["id"]

    def resolving():
        j = vault.ok("GET", f"/jobs/{job}")
        assert j["state"] in ("Queued", "Running"), f"the failover ended before the backup: {j}"
        return (j["state"] == "Running" and j["steps"]
                and j["steps"][-1]["name"] == "Resolve the recovery point")
    wait_for(resolving, 30, "vm4's failover to wait for replication")
    backup = catalog.backup(tmp_path / "old.db")
    held = osrtest.Catalog(sqlite_path=backup)
    assert held.query("SELECT state FROM jobs WHERE id=?", job) == [("Running",)]
    assert held.query("SELECT state, epoch FROM items WHERE vm='vm4'") == [("Protected", 1)]

    # After the backup: vm4's failover ends, vm2 is unprotected, vm3 made and protected.
    wait_for(lambda: vault.ok("GET", f"/jobs/{job}")["state"] not in ("Queued", "Running"),
             60, "vm4's failover to end")
    assert vault.ok("GET", f"/jobs/{job}")["state"] == "Succeeded"
    vm4_at_failover = bytes(models["vm4"])
    vault.osr("unprotect", "vm2")
    uris["vm3"] = protect_new_vm(vault, "vm3", models["vm3"], rng)
    sites_before = {vm: site_state(primary, recovery, vm) for vm in ("vm1", "vm3", "vm4")}

    vault.stop_clean()
    catalog.restore(backup)
    vault.start()
    wait_for(lambda: vault.role() == "leader", 15, "the restored vault to lead")

    # The failover the backup holds Running is resumed: its fence and its opening of the
    # disks meet a site that did them already, and the item says what the sites say.
    wait_for(lambda: vault.ok("GET", f"/jobs/{job}")["state"] not in ("Queued", "Running"),
             60, "vm4's resumed failover to end")
    done = vault.ok("GET", f"/jobs/{job}")
    assert done["state"] == "Succeeded", done
    assert "The vault restarted: resuming" in [s["name"] for s in done["steps"]], done
    vm4 = vault.ok("GET", "/items/vm4")
    assert vm4["state"] == "FailedOver" and vm4["epoch"] == 2, vm4
    assert vm4["health"].startswith("Warning: not protected: the VM runs at recovery"), vm4
    osrtest.assert_same_bytes(read_all(vault.osr("vm", "show", "vm4")["disks"][0]["uri"]),
                              vm4_at_failover, "vm4 at recovery after the resumed failover")

    # vm2, unprotected since the backup: listed Protected, its health names what is gone.
    # The vault does not restart the primary's replication of it (a recovery site without
    # its store would refuse it); unprotecting it again ends the item.
    def vm2_critical():
        h = vault.ok("GET", "/items/vm2")["health"]
        return h == "Critical: site recovery: no store for vm2 at this site" and h
    wait_for(vm2_critical, 20, "vm2's health to say its store is gone",
             detail=lambda: vault.ok("GET", "/items/vm2"))
    # vm1 is as it was.
    wait_for(lambda: vault.ok("GET", "/items/vm1")["health"] == "Normal", 20, "vm1 Normal",
             detail=lambda: vault.ok("GET", "/items/vm1"))
    # vm3, protected since the backup, is unknown to the catalog, and a new `osr vm create`
    # is refused by the site (nothing is replaced); the sites go on replicating it.
    assert "vm3" not in [i["name"] for i in vault.ok("GET", "/items")]
    refused = subprocess.run(
        [str(osrtest.require_osr()), "--vault", vault.url, "vm", "create", "vm3", "--site",
         "primary", "--disk", f"os:{SIZE}"], capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL, env=osrtest.token_env(vault.token_file))
    assert refused.returncode != 0, refused.stdout
    assert "site primary: VM vm3 exists at this site" in refused.stderr, refused.stderr
    write_random(uris["vm3"], models["vm3"], rng, 8)
    last = api_ok(primary, "GET", "/groups/vm3")["last_seq"]
    wait_for(lambda: api_ok(recovery, "GET", "/stores/vm3")["durable_seq"] >= last, 30,
             "vm3's new writes to reach recovery")
    # Nothing the sites hold was removed while the old catalog was in charge.
    for vm, (group, store, rgroup) in sites_before.items():
        now = site_state(primary, recovery, vm)
        assert [x is not None for x in now] == [x is not None for x in (group, store, rgroup)], \
            (vm, now, (group, store, rgroup))
        assert now[0]["replicate_to"] == group["replicate_to"], (vm, now[0], group)
        assert now[0]["fenced_epoch"] == group["fenced_epoch"], (vm, now[0], group)
    assert vault.alive(), vault.stderr()
    # Many point-loop ticks later, vm2's replication is still off at the primary.
    assert api_ok(primary, "GET", "/groups/vm2")["replicate_to"] == ""

    # What the operator does: unprotect vm2 again; its replication stops at the primary.
    vault.osr("unprotect", "vm2")
    assert api_ok(primary, "GET", "/groups/vm2")["replicate_to"] == ""
    assert sorted(i["name"] for i in vault.ok("GET", "/items")) == ["vm1", "vm4"]
    vault.stop_clean()


# -- d): a streaming standby of the catalog --------------------------------------------------


class PgStandby(osrtest.PgServer):
    """A hot standby of `primary`, made with pg_basebackup -R (it streams the primary's
    WAL from then on); start(), stop(), sql() as PgServer's, and promote()."""

    def __init__(self, primary):
        import tempfile

        # Not PgServer.__init__: its initdb would make a new cluster, not a copy.
        self.bin, self.as_user = primary.bin, primary.as_user
        self.dir = Path(tempfile.mkdtemp(prefix="osr-pg-standby-"))
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self.port, self.running, self._databases = 0, False, 0
        self._run([pg_tool(primary, "pg_basebackup"), "-h", "127.0.0.1", "-p",
                   str(primary.port), "-U", "postgres", "-D", str(self.dir / "data"), "-R",
                   "-X", "stream", "-c", "fast", "--no-sync"], "pg_basebackup -R")

    def replayed(self, db, query, want):
        """Whether `query` on the standby answers `want` yet. A relation the standby has not
        replayed yet (its CREATE is still on the way) is "not yet", not a failure."""
        r = self._run([str(self.bin / "psql"), "-X", "-At", "-v", "ON_ERROR_STOP=1", "-h",
                       str(self.dir), "-p", str(self.port), "-U", "postgres", "-d", db, "-c",
                       query], f"psql ({query[:60]})", check=False)
        if r.returncode != 0:
            assert "does not exist" in r.stderr, r.stderr
            return False
        return r.stdout.strip() == want

    def promote(self):
        self._run([str(self.bin / "pg_ctl"), "promote", "-w", "-t", "60", "-D",
                   str(self.dir / "data")], "pg_ctl promote")


def both_hosts(primary, standby, db):
    """The URL the vaults use: either server, whichever takes writes (libpq tries them in
    order and keeps the one that is not read-only)."""
    return (f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/{db}"
            "?target_session_attrs=read-write")


def test_a_promoted_standby_of_the_catalog_carries_on(sites, vaults, tmp_path, request):
    """Two vaults on a PostgreSQL primary with a streaming standby, both named in their
    URL. The primary's host is lost (PostgreSQL and vault A killed); the standby is
    promoted; vault B, on the same URL, reconnects, takes the lease, serves the items and
    fails a VM over to a point made before the loss."""
    require_libnbd()
    primary_site, recovery_site = sites
    rng = random.Random(seed_for(request))
    t_start = time.monotonic()
    with osrtest.PgServer() as pg:
        db = pg.create_database("osr_ha").rsplit("/", 1)[1]
        standby = PgStandby(pg)
        try:
            standby.start()
            assert standby.sql("postgres", "SELECT pg_is_in_recovery()").strip() == "t"
            url = both_hosts(pg, standby, db)
            a = start_vault(vaults, tmp_path, url, "A")
            b = LeaderVault("B", url, tmp_path)
            vaults.append(b)
            b.start()
            assert b.role() == "follower"
            register_sites(a, primary_site, recovery_site)
            model = bytearray(SIZE)
            uri = protect_new_vm(a, "vm1", model, rng)
            write_random(uri, model, rng, 24)
            point = make_point(a, "vm1")
            at_point = bytes(model)

            # The rows reach the standby (asynchronous streaming: within moments).
            wait_for(lambda: standby.replayed(db, f"SELECT count(*) FROM points WHERE id={point}",
                                              "1"), 30, f"point {point} to reach the standby")
            assert standby.sql(db, "SELECT state FROM items WHERE vm='vm1'").strip() == "Protected"

            # The primary's host is lost: its PostgreSQL and vault A.
            t_loss = time.monotonic()
            pg.stop(mode="immediate")
            a.kill9()
            status, _ = b.call("GET", "/items")
            assert status != 200, "a vault answered GET /items with no writable catalog"
            standby.promote()
            wait_for(lambda: b.call("GET", "/items")[0] == 200, 30,
                     "vault B to read the promoted standby", detail=lambda: b.stderr()[-2000:])
            wait_for(lambda: b.role() == "leader", 30, "vault B to lead",
                     detail=lambda: b.stderr()[-2000:])
            took_s = time.monotonic() - t_loss
            assert [i["name"] for i in b.ok("GET", "/items")] == ["vm1"]
            new_uri = failover_to(b, "vm1", point)
            osrtest.assert_same_bytes(read_all(new_uri), at_point,
                                      f"vm1 failed over to point {point} by vault B")
            assert b.ok("GET", "/items/vm1")["state"] == "FailedOver"
            print(f"vault B led on the promoted standby {took_s:.1f} s after the loss; "
                  f"the test took {time.monotonic() - t_start:.1f} s")
            b.stop_clean()
        finally:
            standby.close()


def test_a_catalog_from_before_a_failover_says_so(sites, tmp_path):
    """A catalog restored from a backup taken before a failover: the item reads Protected at
    the old epoch while its disks at the primary are fenced at the new one. Its health says
    so (before: "replication is not connected ()", no cause), and nothing at the sites moves."""
    require_libnbd()
    primary, recovery = sites
    rng = random.Random(seed_for("old catalog failover"))
    catalog = SqliteCatalog(tmp_path)
    vs = []
    try:
        vault = start_vault(vs, tmp_path, catalog.db_arg())
        register_sites(vault, primary, recovery)
        model = bytearray(SIZE)
        uri = protect_new_vm(vault, "vm1", model, rng)
        write_random(uri, model, rng, 8)
        point = make_point(vault, "vm1")
        backup = catalog.backup(tmp_path / "old.db")
        job = vault.osr("failover", "vm1", "--point", point, "--wait")
        assert job["state"] == "Succeeded", job
        fenced = api_ok(primary, "GET", "/groups/vm1")["fenced_epoch"]
        assert fenced == 2, fenced
        vault.stop_clean()
        catalog.restore(backup)
        vault.start()
        seen = {}

        def says_older():
            seen["item"] = vault.ok("GET", "/items/vm1")
            return seen["item"]["health"].startswith(
                "Critical: vm1's disks at primary are fenced at epoch 2, after the catalog's "
                "epoch 1: the catalog is older than the sites")
        wait_for(says_older, 30, "the item to say the catalog is older than the sites",
                 detail=lambda: seen.get("item"))
        listed = {i["name"]: i for i in vault.ok("GET", "/items")}
        assert listed["vm1"]["health"] == seen["item"]["health"], listed
        assert api_ok(primary, "GET", "/groups/vm1")["fenced_epoch"] == 2
    finally:
        osrtest.stop_all_clean(vs)
