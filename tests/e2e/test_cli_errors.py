"""Refused `osr` commands: each exits non-zero with 'osr: error: ...' on stderr and leaves
the vault's catalog (VMs, items, points, jobs, policies) and the sites as they were."""

import json

from conftest import MIB, VmDisks, create_vm, free_port, protect


def state(osr):
    """Everything a refused command must not change, as comparable JSON text."""
    sites = []
    for s in osr.ok("site", "list"):
        sites.append({"name": s.get("name"), "reachable": s.get("reachable"),
                      "vms": s.get("vms"), "stores": s.get("stores")})
    items = []
    for i in osr.ok("item", "list"):
        items.append({k: i.get(k) for k in ("name", "state", "source", "target", "policy",
                                            "epoch", "latest_point", "drill")})
    points = {i["name"]: osr.ok("point", "list", i["name"]) for i in items}
    return json.dumps({
        "vms": osr.ok("vm", "list"),
        "items": items,
        "points": points,
        "jobs": [(j["id"], j["type"], j["vm"], j["state"]) for j in osr.ok("job", "list")],
        "policies": osr.ok("policy", "list"),
        "sites": sites,
    }, sort_keys=True, indent=1)


def refused(osr, *args, says=()):
    """The command fails cleanly and changes nothing; its message names each of says."""
    before = state(osr)
    msg = osr.fails(*args)
    for word in says:
        assert word.lower() in msg.lower(), f"osr {' '.join(args)}: {msg!r} does not name {word!r}"
    after = state(osr)
    assert after == before, (f"osr {' '.join(args)} failed but changed the vault:\n"
                             f"before: {before}\nafter: {after}")
    return msg


def test_cli_errors(env, rng):
    osr = env.osr
    vm1 = create_vm(osr, "vm1", [("os", "16M", 16 * MIB)])
    disks = env.track(VmDisks(vm1, rng))
    disks.write(5)
    protect(osr, "vm1")
    create_vm(osr, "vm2", [("os", "8M", 8 * MIB), ("data", "4M", 4 * MIB)])
    osr.ok("policy", "create", "p1", "--crash-interval", "10s")

    # protect
    refused(osr, "protect", "nosuchvm", "--target", "recovery", says=["nosuchvm"])
    refused(osr, "protect", "nosuchvm", "--target", "recovery", "--wait", says=["nosuchvm"])
    refused(osr, "protect", "vm2", "--target", "nosuchsite", says=["nosuchsite"])
    refused(osr, "protect", "vm2", "--target", "primary")            # its own site
    refused(osr, "protect", "vm2", "--target", "recovery", "--policy", "nosuchpolicy",
            says=["nosuchpolicy"])
    refused(osr, "protect", "vm1", "--target", "recovery", says=["vm1"])  # protected already

    # drills and points of a VM that is not protected, or at no such point
    refused(osr, "test-failover", "vm2", "--point", "latest", says=["vm2"])
    refused(osr, "test-failover", "vm2", "--point", "latest", "--wait", says=["vm2"])
    refused(osr, "test-failover", "nosuchvm", "--point", "latest")
    refused(osr, "test-failover", "vm1", "--point", "999999", says=["999999"])
    refused(osr, "test-failover", "vm1", "--point", "garbage", says=["garbage"])
    refused(osr, "test-failover", "vm1", "--point", "2026-13-45T99:00:00Z")
    refused(osr, "test-failover-cleanup", "vm1", says=["vm1"])      # no drill to clean up
    refused(osr, "test-failover-cleanup", "vm2")
    refused(osr, "item", "show", "vm2", says=["vm2"])
    refused(osr, "point", "list", "vm2", says=["vm2"])
    refused(osr, "point", "create", "vm2", says=["vm2"])
    refused(osr, "unprotect", "vm2", says=["vm2"])

    # vm create
    refused(osr, "vm", "create", "vm3", "--site", "nosuchsite", "--disk", "os:16M",
            says=["nosuchsite"])
    refused(osr, "vm", "create", "vm3", "--site", "primary", "--disk", "os:12Q")
    refused(osr, "vm", "create", "vm3", "--site", "primary", "--disk", "os:16M",
            "--disk", "data:12Q")
    refused(osr, "vm", "create", "vm3", "--site", "primary", "--disk", "os")
    refused(osr, "vm", "create", "vm3", "--site", "primary", "--disk", "b@d:16M")
    refused(osr, "vm", "create", "vm3", "--site", "primary", "--disk", "os:16M",
            "--disk", "os:8M")                                       # one name twice
    refused(osr, "vm", "create", "vm3", "--site", "primary", "--disk", "os:16M",
            "--disk", "../x:8M")
    for bad in ("bad name", "bad/name", ".hidden", "x" * 65, "b@d"):
        refused(osr, "vm", "create", bad, "--site", "primary", "--disk", "os:16M")
    # A VM that exists: refused, and its disks (and their data) are untouched.
    refused(osr, "vm", "create", "vm1", "--site", "primary", "--disk", "os:8M", says=["vm1"])
    refused(osr, "vm", "create", "vm2", "--site", "recovery", "--disk", "os:8M", says=["vm2"])
    # (Its protection state changed meanwhile; its definition and disks did not.)
    unchanging = ("name", "site", "disks", "driver", "spec")
    shown = osr.ok("vm", "show", "vm1")
    assert {k: shown.get(k) for k in unchanging} == {k: vm1.get(k) for k in unchanging}
    disks.close()
    got = disks.read_primary()["os"]
    assert got == bytes(disks.at()["os"]), "vm create of an existing name changed its disk"

    # policies
    refused(osr, "policy", "create", "p1", "--crash-interval", "20s", says=["p1"])
    refused(osr, "policy", "create", "default", says=["default"])
    refused(osr, "policy", "create", "p2", "--crash-interval", "0s")
    refused(osr, "policy", "create", "p2", "--retention", "abc")
    refused(osr, "policy", "create", "bad name")
    p1 = [p for p in osr.ok("policy", "list") if p["name"] == "p1"]
    assert len(p1) == 1 and p1[0]["crash_interval_seconds"] == 10, p1

    # jobs
    refused(osr, "job", "show", "999999", says=["999999"])
    refused(osr, "job", "wait", "999999", says=["999999"])

    # A vault that does not answer.
    msg = osr.fails("site", "list", vault=f"http://127.0.0.1:{free_port()}")
    assert "unreachable" in msg, msg

    # After all that, vm1 is still protected and healthy.
    item = osr.ok("item", "show", "vm1")
    assert item.get("state") == "Protected" and item.get("health") == "Normal", item
    assert [v["name"] for v in osr.ok("vm", "list")] == ["vm1", "vm2"]


def test_a_second_quickstart_on_the_vault_port_is_refused(env, tmp_path, new_catalog):
    """Two vaults must never share a port (the kernel would split requests between two
    catalogs): the second one exits with a clear error; the first goes on."""
    import subprocess
    import osrtest
    second = tmp_path / "second"
    catalog = new_catalog(second / "vault.db")
    db = ["--db", catalog.db_arg] if catalog.backend != "sqlite" else []
    proc = subprocess.run([str(osrtest.require_osrd()), "quickstart", "--dir", str(second),
                           "--vault-listen", f"127.0.0.1:{env.qs.port}", *db],
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0, proc.stdout
    assert "cannot bind the vault API" in proc.stderr, proc.stderr
    assert env.osr.ok("site", "list")[0]["name"] == "primary"
