"""Issue 13: a disk change cut short by a crash is finished when the site starts again.

ChangeGroupDisk writes site.json first (the new disks and `disk_change`), then grows or
makes the image and appends the disk-size record. A site killed right after the first
step left exactly that: here the test writes it into a stopped site's state (the same
bytes the site would have written), starts it, and checks that the image is made or
grown, the record reaches the recovery store in the capture order, and writes to the new
bytes replicate — for a grow and for an add (whose bitmap is not there yet)."""

import json

from conftest import (MIB, api, api_ok, connect, close, group_status, protect, read_all,
                      store_status, wait_durable)


def entry_paths(site, vm):
    return [site.data_dir / "site.json", site.data_dir / "groups" / vm / "entry.json"]


def edit_entry(site, vm, edit):
    """Applies edit(entry) to the group's entry in site.json and in its entry.json."""
    for path in entry_paths(site, vm):
        if not path.exists():
            continue
        doc = json.loads(path.read_text())
        entry = doc["groups"][vm] if path.name == "site.json" else doc
        edit(entry)
        path.write_text(json.dumps(doc))


def test_a_change_cut_short_is_finished_at_start(sites):
    primary, recovery = sites
    protect(primary, recovery, "vm1", [("os", 4 * MIB)])
    group = group_status(primary, "vm1")
    h = connect(group["disks"][0]["uri"])
    try:
        h.pwrite(b"\x11" * 65536, 0)
        h.flush()
    finally:
        close(h)
    wait_durable(recovery, "vm1", group_status(primary, "vm1")["last_seq"])

    for change, want in ((("os", 6 * MIB, False), {"os": 6 * MIB}),
                         (("data", 2 * MIB, True), {"os": 6 * MIB, "data": 2 * MIB})):
        name, size, added = change
        primary.kill9()
        # What a kill right after site.json was written leaves (nothing else is done).
        def grow(entry):
            disks = entry["disks"]
            if added:
                disks.append({"name": name, "size_bytes": size})
            else:
                for d in disks:
                    if d["name"] == name:
                        d["size_bytes"] = size
            entry["disk_change"] = {"name": name, "size_bytes": size, "added": added}
        edit_entry(primary, "vm1", grow)
        primary.start()
        g = group_status(primary, "vm1")
        assert "damage" not in g, g
        assert {d["name"]: d["size_bytes"] for d in g["disks"]} == want, g
        img = primary.data_dir / "groups" / "vm1" / f"{name}.img"
        assert img.stat().st_size == size, (img, img.stat().st_size)
        # The change reached the store in the order; then a write to its new bytes.
        wait_durable(recovery, "vm1", g["last_seq"])
        st = store_status(recovery, "vm1")
        assert {d["name"]: d["size_bytes"] for d in st["disks"]} == want, st
        uri = next(d["uri"] for d in g["disks"] if d["name"] == name)
        h = connect(uri)
        try:
            assert h.get_size() == size
            h.pwrite(b"\x22" * 4096, size - 4096)
            h.flush()
        finally:
            close(h)
        last = group_status(primary, "vm1")["last_seq"]
        wait_durable(recovery, "vm1", last)
        # The store at the last seq equals the source, disk by disk.
        view = api_ok(recovery, "POST", "/stores/vm1/views", {"seq": last}, status=201)
        try:
            for d in view["disks"]:
                src = next(x for x in g["disks"] if x["name"] == d["name"])
                assert read_all(d["uri"]) == read_all(src["uri"]), d["name"]
        finally:
            got, _ = api(recovery, "DELETE", f"/views/{view['id']}")
            assert got == 204
        # Once finished, site.json says no change is under way.
        saved = json.loads((primary.data_dir / "site.json").read_text())
        assert saved["groups"]["vm1"].get("disk_change") is None, saved["groups"]["vm1"]
