"""The site API's refusals: status codes and {"error": {code, message}} bodies
(docs/api.md, "Site API")."""

from conftest import MIB, api, api_ok, assert_error, close_view, open_view

GOOD_DISKS = {"disks": [{"name": "d0", "size_bytes": 1 * MIB}]}

BAD_VM_NAMES = [".hidden", "-x", "a" * 65, "bad$name", "bad%20name", "b%C3%A9"]
BAD_DISK_NAMES = ["", ".d", "-d", "a" * 65, "d 0", "d/0", "d$", "é"]
BAD_BODIES = [
    {},                                                         # no disks
    {"disks": []},                                              # no disk at all
    {"disks": "d0"},                                            # not a list
    {"disks": [{"name": "d0"}]},                                # no size
    {"disks": [{"size_bytes": MIB}]},                           # no name
    {"disks": [{"name": "d0", "size_bytes": 0}]},               # zero size
    {"disks": [{"name": "d0", "size_bytes": -1}]},              # negative size
    {"disks": [{"name": "d0", "size_bytes": "1M"}]},            # size not a number
    {"disks": [{"name": "d0", "size_bytes": MIB}, {"name": "d1", "size_bytes": 0}]},
    {"disks": [{"name": "d0", "size_bytes": 1 << 60}]},         # beyond the site's maximum
]
DUPLICATE_DISKS = {"disks": [{"name": "d0", "size_bytes": MIB}, {"name": "d0", "size_bytes": MIB}]}


def test_api_errors(sites):
    primary, recovery = sites

    # -- groups: invalid requests are 400 and leave nothing behind -----------------------
    for vm in BAD_VM_NAMES:
        assert_error(primary, "PUT", f"/groups/{vm}", GOOD_DISKS, 400)
    for name in BAD_DISK_NAMES:
        assert_error(primary, "PUT", "/groups/vm1",
                     {"disks": [{"name": name, "size_bytes": MIB}]}, 400)
    for body in BAD_BODIES:
        assert_error(primary, "PUT", "/groups/vm1", body, 400)
    assert_error(primary, "PUT", "/groups/vm1", None, 400, raw=b"not json")
    assert_error(primary, "PUT", "/groups/vm1", None, 400, raw=b'[{"name": "d0"}]')
    site = api_ok(primary, "GET", "/site")
    assert site["groups"] == [], f"a refused PUT left a group behind: {site}"
    assert sorted(p.name for p in (primary.data_dir / "groups").iterdir()) == [], \
        "a refused PUT left files behind in data_dir/groups"

    # The limits themselves are valid.
    longest = "A" + "z-9._" * 12 + "abc"
    assert len(longest) == 64
    got, doc = api(primary, "PUT", f"/groups/{longest}",
                   {"disks": [{"name": longest, "size_bytes": 1}]})
    assert got == 201, f"PUT a group with 64-character names: {got} {doc}"
    api_ok(primary, "DELETE", f"/groups/{longest}", status=204)

    # -- unknown and existing -------------------------------------------------------------
    err = assert_error(primary, "GET", "/groups/vm9", None, 404)
    assert "vm9" in err["message"], err
    assert_error(primary, "DELETE", "/groups/vm9", None, 404)
    api_ok(primary, "PUT", "/groups/vm1", GOOD_DISKS, status=201)
    assert_error(primary, "PUT", "/groups/vm1",
                 {"disks": [{"name": "other", "size_bytes": 2 * MIB}]}, 409)
    g = api_ok(primary, "GET", "/groups/vm1")
    assert [(d["name"], d["size_bytes"]) for d in g["disks"]] == [("d0", MIB)], \
        f"a refused PUT changed the group: {g}"

    # -- replication ------------------------------------------------------------------------
    assert_error(primary, "PUT", "/groups/vm9/replication", {"target": recovery.replication}, 404)
    assert_error(primary, "DELETE", "/groups/vm9/replication", None, 404)
    assert_error(primary, "PUT", "/groups/vm1/replication", {}, 400)
    assert_error(primary, "PUT", "/groups/vm1/replication", {"target": "no port here:x"}, 400)
    g = api_ok(primary, "GET", "/groups/vm1")
    assert g["replicate_to"] == "" and "replication" not in g, \
        f"a refused replication PUT changed the group: {g}"

    # -- stores and views -------------------------------------------------------------------
    assert_error(recovery, "GET", "/stores/vm9", None, 404)
    assert_error(recovery, "DELETE", "/stores/vm9", None, 404)
    assert_error(recovery, "POST", "/stores/vm9/views", {"seq": 0}, 404)
    api_ok(recovery, "PUT", "/stores/vm1", GOOD_DISKS, status=201)
    assert_error(recovery, "PUT", "/stores/vm1", GOOD_DISKS, 409)
    st = api_ok(recovery, "GET", "/stores/vm1")
    assert st["durable_seq"] == 0 and st["base_seq"] == 0, st

    assert_error(recovery, "POST", "/stores/vm1/views", {"seq": 1}, 400)      # beyond durable
    assert_error(recovery, "POST", "/stores/vm1/views", {"seq": 1 << 40}, 400)
    assert_error(recovery, "POST", "/stores/vm1/views", {}, 400)
    assert_error(recovery, "POST", "/stores/vm1/views", {"seq": -1}, 400)
    assert_error(recovery, "POST", "/stores/vm1/views", {"seq": "0"}, 400)
    assert api_ok(recovery, "GET", "/site")["views"] == [], "a refused view is listed"

    assert_error(recovery, "DELETE", "/views/view-999", None, 404)
    assert_error(recovery, "DELETE", "/views/nonsense", None, 404)

    view = open_view(recovery, "vm1", 0)
    assert_error(recovery, "DELETE", "/stores/vm1", None, 409)
    assert api_ok(recovery, "GET", "/stores/vm1")["name"] == "vm1", "store gone after a 409"
    close_view(recovery, view["id"])
    assert_error(recovery, "DELETE", f"/views/{view['id']}", None, 404)  # already closed
    api_ok(recovery, "DELETE", "/stores/vm1", status=204)
    assert_error(recovery, "GET", "/stores/vm1", None, 404)

    # -- no such path ----------------------------------------------------------------------------
    assert_error(primary, "GET", "/nothing-here", None, 404)


def test_store_api_errors(sites):
    """A store is a group's replica: the same name rules and the same disk checks."""
    _, recovery = sites
    for vm in BAD_VM_NAMES:
        assert_error(recovery, "PUT", f"/stores/{vm}", GOOD_DISKS, 400)
    for name in BAD_DISK_NAMES:
        assert_error(recovery, "PUT", "/stores/vm1",
                     {"disks": [{"name": name, "size_bytes": MIB}]}, 400)
    for body in BAD_BODIES:
        assert_error(recovery, "PUT", "/stores/vm1", body, 400)
    site = api_ok(recovery, "GET", "/site")
    assert site["stores"] == [], f"a refused PUT left a store behind: {site}"
    assert sorted(p.name for p in (recovery.data_dir / "stores").iterdir()) == [], \
        "a refused PUT left files behind in data_dir/stores"


def test_duplicate_disk_names(sites):
    """Two disks of one VM with the same name: the request is wrong (400), for a group and
    for a store alike, and nothing is left behind."""
    primary, recovery = sites
    assert_error(primary, "PUT", "/groups/vm1", DUPLICATE_DISKS, 400)
    assert_error(primary, "GET", "/groups/vm1", None, 404)
    assert_error(recovery, "PUT", "/stores/vm1", DUPLICATE_DISKS, 400)
    assert_error(recovery, "GET", "/stores/vm1", None, 404)


def test_repair_bodies_are_checked(sites):
    """POST /groups/{vm}/repair and /stores/{vm}/repair refuse a field of the wrong type and
    a field they do not know (a misspelt option must not be ignored), with a 400 naming the
    field; a good body reaches the repair (which then says there is nothing to repair)."""
    primary, recovery = sites
    api_ok(primary, "PUT", "/groups/vm1", GOOD_DISKS, status=201)
    api_ok(recovery, "PUT", "/stores/vm1", GOOD_DISKS, status=201)

    err = assert_error(primary, "POST", "/groups/vm1/repair", {"trim_image": "yes"}, 400)
    assert err["message"] == "trim_image: must be true or false, not a string", err
    err = assert_error(primary, "POST", "/groups/vm1/repair", {"first_seq": -1}, 400)
    assert err["message"].startswith("first_seq: must be a whole number"), err
    err = assert_error(primary, "POST", "/groups/vm1/repair",
                       {"trim_image": True, "resset_history": True}, 400)
    assert err["message"] == ("resset_history: is not a field of this call (it takes "
                              "trim_image, reset_history, accept_changes, first_seq)"), err
    assert_error(primary, "POST", "/groups/vm1/repair", None, 400, raw=b"[true]")
    # A good body reaches the repair: the group is healthy, so there is nothing to repair.
    err = assert_error(primary, "POST", "/groups/vm1/repair", {"trim_image": True}, 400)
    assert "not quarantined" in err["message"], err

    err = assert_error(recovery, "POST", "/stores/vm1/repair", {"reset_history": True}, 400)
    assert err["message"] == "reset_history: is not a field of this call (it takes none)", err
    assert_error(recovery, "POST", "/stores/vm1/repair", None, 400, raw=b"not json")
    for body in ({}, None):
        err = assert_error(recovery, "POST", "/stores/vm1/repair", body, 400)
        assert "not quarantined" in err["message"], err
