"""GET /api/v1/groups and GET /api/v1/stores (issue 12): every group's and every
store's status in one answer — exactly what GET /groups/{vm} and GET /stores/{vm} say,
as an array in name order — so that the vault asks each site once per tick instead of
once per VM. Who may call them is checked with every other route in
test_site_security.py (only the vault's certificate gets in)."""

import time

from conftest import KIB, MIB, api_ok, close, connect, protect, wait_durable

BULK_TIMEOUT_S = 20


def same_as_per_vm(site, bulk_path, per_vm_path):
    """The bulk answer equals the per-VM answers, read around it. Counters of a sender can
    move between two calls: tried again (bounded) until one bulk answer falls between two
    equal rounds of per-VM answers. Returns the bulk answer."""
    deadline = time.monotonic() + BULK_TIMEOUT_S
    while True:
        bulk = api_ok(site, "GET", bulk_path)
        assert isinstance(bulk, list), f"GET {bulk_path}: not an array: {bulk}"
        names = [entry["name"] for entry in bulk]
        assert names == sorted(names), f"GET {bulk_path}: not in name order: {names}"
        per_vm = [api_ok(site, "GET", f"{per_vm_path}/{n}") for n in names]
        if bulk == per_vm:
            return bulk
        if time.monotonic() > deadline:
            for b, p in zip(bulk, per_vm):
                assert b == p, f"GET {bulk_path} says {b}, GET {per_vm_path}/{b['name']} {p}"
        time.sleep(0.1)


def test_bulk_status_is_what_the_per_vm_routes_say(sites):
    primary, recovery = sites
    # Nothing yet: empty arrays, not errors.
    for site in (primary, recovery):
        assert api_ok(site, "GET", "/groups") == []
        assert api_ok(site, "GET", "/stores") == []

    # vm-b replicates (a store at the recovery site), vm-a does not, vm-c has two disks.
    group_b = protect(primary, recovery, "vm-b", [("d0", MIB)])
    api_ok(primary, "PUT", "/groups/vm-a", {"disks": [{"name": "d0", "size_bytes": MIB}]},
           status=201)
    api_ok(primary, "PUT", "/groups/vm-c", {"disks": [{"name": "d0", "size_bytes": MIB},
                                                      {"name": "d1", "size_bytes": 2 * MIB}]},
           status=201)
    h = connect(group_b["disks"][0]["uri"])
    try:
        h.pwrite(b"\x5a" * (64 * KIB), 128 * KIB)
        h.flush()
    finally:
        close(h)
    last = api_ok(primary, "GET", "/groups/vm-b")["last_seq"]
    assert last >= 1
    wait_durable(recovery, "vm-b", last, primary=primary)

    groups = same_as_per_vm(primary, "/groups", "/groups")
    assert [g["name"] for g in groups] == ["vm-a", "vm-b", "vm-c"]
    by_name = {g["name"]: g for g in groups}
    assert by_name["vm-b"]["last_seq"] == last, by_name["vm-b"]
    assert by_name["vm-b"]["replication"]["acked_seq"] == last, by_name["vm-b"]
    assert "replication" not in by_name["vm-a"], by_name["vm-a"]
    assert [d["name"] for d in by_name["vm-c"]["disks"]] == ["d0", "d1"], by_name["vm-c"]

    stores = same_as_per_vm(recovery, "/stores", "/stores")
    assert [s["name"] for s in stores] == ["vm-b"]
    assert stores[0]["durable_seq"] == last, stores[0]
    # Each site answers for its own side only.
    assert api_ok(recovery, "GET", "/groups") == []
    assert api_ok(primary, "GET", "/stores") == []

    # A deleted group leaves the list.
    api_ok(primary, "DELETE", "/groups/vm-a", status=204)
    assert [g["name"] for g in api_ok(primary, "GET", "/groups")] == ["vm-b", "vm-c"]
