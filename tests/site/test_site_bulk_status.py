"""GET /api/v1/groups and GET /api/v1/stores (issue 12): every group's and every
store's status in one answer — exactly what GET /groups/{vm} and GET /stores/{vm} say,
as an array in name order — so that the vault asks each site once per tick instead of
once per VM. Who may call them is checked with every other route in
test_site_security.py (only the vault's certificate gets in)."""

import time

from conftest import KIB, MIB, api_ok, assert_error, close, connect, protect, wait_durable

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



def write_and_wait(primary, recovery, vm, uri, byte, offset):
    """Writes 64 KiB of `byte` at `offset` of the disk at `uri` and waits until the recovery
    site holds it; the group's last seq."""
    h = connect(uri)
    try:
        h.pwrite(byte * (64 * KIB), offset)
        h.flush()
    finally:
        close(h)
    last = api_ok(primary, "GET", f"/groups/{vm}")["last_seq"]
    assert last >= 1
    wait_durable(recovery, vm, last, primary=primary)
    return last

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
    last = write_and_wait(primary, recovery, "vm-b", group_b["disks"][0]["uri"], b"\x5a",
                          128 * KIB)

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


# Only the figures that move on their own may differ between a store's answer and its
# per-VM GET read a moment apart.
USAGE_FIELDS = ("space", "history_bytes", "index_cache_bytes")


def without_usage(store):
    return {k: v for k, v in store.items() if k not in USAGE_FIELDS}


def test_stores_since_a_generation_answers_only_what_changed(sites):
    """GET /stores?since=GEN (the vault's point loop, every second): everything from 0,
    then only the stores that changed, and nothing while nothing does."""
    primary, recovery = sites
    first = api_ok(recovery, "GET", "/stores?since=0")
    assert first["full"] is True and first["stores"] == [] and first["removed"] == [], first
    groups = {}
    for vm in ("vm-a", "vm-b", "vm-c"):
        groups[vm] = protect(primary, recovery, vm, [("d0", MIB)])
    for vm in groups:
        wait_durable(recovery, vm, 0, primary=primary)

    start = api_ok(recovery, "GET", "/stores?since=0")
    assert start["full"] is True, start
    assert [s["name"] for s in start["stores"]] == ["vm-a", "vm-b", "vm-c"], start
    for s in start["stores"]:
        assert without_usage(s) == without_usage(api_ok(recovery, "GET", f"/stores/{s['name']}"))
        assert "space" in s and "history_bytes" in s, s  # the whole status, usage included

    # Idle: nothing changes, nothing is sent (bounded: a store still settling after its
    # initial copy may show once more).
    gen = start["generation"]
    deadline = time.monotonic() + BULK_TIMEOUT_S
    while True:
        idle = api_ok(recovery, "GET", f"/stores?since={gen}")
        assert idle["full"] is False, idle
        if idle["stores"] == [] and idle["removed"] == []:
            assert idle["generation"] == gen, idle
            break
        assert time.monotonic() < deadline, f"still changing: {idle}"
        gen = idle["generation"]
        time.sleep(0.2)

    # A write to vm-b: only vm-b, at its new durable seq.
    last = write_and_wait(primary, recovery, "vm-b", groups["vm-b"]["disks"][0]["uri"],
                          b"\xa5", 0)
    changed = api_ok(recovery, "GET", f"/stores?since={gen}")
    assert changed["full"] is False, changed
    assert [s["name"] for s in changed["stores"]] == ["vm-b"], changed
    assert changed["stores"][0]["durable_seq"] == last, changed
    assert changed["removed"] == [], changed
    assert changed["generation"] != gen, changed
    gen = changed["generation"]

    # A deleted store is listed as removed, once.
    api_ok(primary, "DELETE", "/groups/vm-c/replication", status=204)
    api_ok(recovery, "DELETE", "/stores/vm-c", status=204)
    gone = api_ok(recovery, "GET", f"/stores?since={gen}")
    assert gone["removed"] == ["vm-c"], gone
    assert "vm-c" not in [s["name"] for s in gone["stores"]], gone
    again = api_ok(recovery, "GET", f"/stores?since={gone['generation']}")
    assert again["removed"] == [], again

    # A generation of another run of the site (or one it never gave): everything again.
    other_run = "f" * 16 + "-1"
    assert not gen.startswith("f" * 16)
    full = api_ok(recovery, "GET", f"/stores?since={other_run}")
    assert full["full"] is True, full
    assert [s["name"] for s in full["stores"]] == ["vm-a", "vm-b"], full
    future = gen.split("-")[0] + "-" + str(10**12)
    assert api_ok(recovery, "GET", f"/stores?since={future}")["full"] is True
    assert recovery.alive()


def test_stores_since_refuses_a_bad_generation(sites):
    """A `since` that is not 0 nor a generation is a 400 naming it, never a crash; the
    plain listing is unchanged."""
    _, recovery = sites
    gen = api_ok(recovery, "GET", "/stores?since=0")["generation"]
    instance = gen.split("-")[0]
    bad = ["", "x", "-1", "00", "1", instance, instance + "-", instance.upper() + "-1",
           instance + "-1x", instance + "--1", instance + "-+1", instance + "-" + "9" * 20,
           instance + "-" + "1" * 200, "%00", "0" * 5000]
    for since in bad:
        err = assert_error(recovery, "GET", f"/stores?since={since}", None, 400)
        assert "since" in err["message"], (since, err)
    err = assert_error(recovery, "GET", "/stores?since=0&since=1", None, 400)
    assert "since" in err["message"], err
    assert api_ok(recovery, "GET", "/stores") == []
    assert recovery.alive()
