"""Issue 10, case 5: a drill outlives a crash of the quickstart, or says it was lost.

kill -9 of the quickstart (vault and both sites) during a drill: after the restart the
drill's disks are served again (at the site's new port) with every write the drill
flushed, and cleanup ends it. When its overlay cannot be read back, the item says the
drill disks were lost (Critical), advertises none, and cleanup still ends it.
"""

from conftest import (MIB, Drill, VmDisks, create_vm, protect, wait_for)


def start_drill(env, rng):
    osr = env.osr
    vm = env.track(VmDisks(create_vm(osr, "vm1", [("os", "16M", 16 * MIB),
                                                  ("data", "4M", 4 * MIB)]), rng))
    vm.write(20)
    vm.flush()
    protect(osr, "vm1")
    vm.write(10)
    vm.flush()
    p = osr.ok("point", "create", "vm1")
    job = osr.job_ok("test-failover", "vm1", "--point", p["id"], job_type="test-failover")
    drill = env.track(Drill(job, vm, vm.at(p["seq"]), rng))
    drill.write(30)
    for h in drill.handles.values():
        h.flush()
    return vm, drill, p


def test_drill_survives_kill9(env, rng):
    osr, qs = env.osr, env.qs
    vm, drill, p = start_drill(env, rng)
    drill.assert_matches("the drill before the crash")
    before = osr.ok("item", "show", "vm1")["drill"]
    vm.close()
    drill.close()
    qs.kill9()
    qs.restart()

    item = osr.ok("item", "show", "vm1")
    assert item["state"] == "TestFailoverCompleted", item
    assert "lost" not in item["drill"], item
    assert not item["health"].startswith("Critical"), item
    assert item["drill"]["view"] == before["view"], (item, before)
    # The same exports, at the restarted site's port.
    uris = {d["name"]: d["uri"] for d in item["drill"]["disks"]}
    for d in before["disks"]:
        assert uris[d["name"]].split("/", 3)[3] == d["uri"].split("/", 3)[3], (uris, before)
    drill.uris = uris
    drill.assert_matches("the drill after kill -9 of the quickstart")
    # It goes on taking writes, and ends cleanly.
    drill.write(10)
    drill.assert_matches("the drill written after the restart", fresh=False)
    drill.close()
    osr.job_ok("test-failover-cleanup", "vm1", job_type="test-failover-cleanup")
    assert osr.ok("item", "show", "vm1")["state"] == "Protected"
    site = osr.ok("site", "list")
    assert site, site
    leftover = list((qs.data_dir / "recovery" / "views").iterdir())
    assert leftover == [], f"the drill's files outlived its cleanup: {leftover}"


def test_lost_drill_is_said_and_cleaned(env, rng):
    osr, qs = env.osr, env.qs
    vm, drill, p = start_drill(env, rng)
    vm.close()
    drill.close()
    qs.stop_clean()
    maps = list((qs.data_dir / "recovery" / "views").glob("*.map"))
    assert len(maps) == 2, maps
    maps[0].write_bytes(b"\0" * 64)
    qs.restart()

    item = osr.ok("item", "show", "vm1")
    assert item["state"] == "TestFailoverCompleted", item
    assert item["drill"]["disks"] == [], item
    assert "lost" in item["drill"], item
    assert item["health"].startswith("Critical: the drill disks of vm1 at recovery were lost"), \
        item["health"]
    assert "osr test-failover-cleanup vm1" in item["health"], item["health"]
    osr.job_ok("test-failover-cleanup", "vm1", job_type="test-failover-cleanup")
    item = osr.ok("item", "show", "vm1")
    assert item["state"] == "Protected" and "drill" not in item, item
    assert list((qs.data_dir / "recovery" / "views").iterdir()) == []
    # A new drill works.
    job = osr.job_ok("test-failover", "vm1", "--point", p["id"], job_type="test-failover")
    again = env.track(Drill(job, vm, vm.at(p["seq"]), rng))
    again.assert_matches("a new drill after the lost one")
    again.close()
    osr.job_ok("test-failover-cleanup", "vm1", job_type="test-failover-cleanup")
