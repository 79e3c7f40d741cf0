"""Review of issue 11 (reviewer 11b): the recovery store's damage handling and maintenance,
driven through a site's API as the vault would. Failing assertions are findings (see the
review report); production code is not changed here.

Journal segments are 64 MiB at a site: 1 MiB writes over a 16 MiB disk (the model of
test_review11_compact.py), one record per write.
"""

import time


from conftest import MIB, api, close_view, read_all, store_status
from test_review11_compact import DISK, VM, start_pair


def flip_payload_byte(recovery, seq, at=1000):
    """Flips one payload byte of seq's record in the first journal segment (the site is
    stopped): 1 MiB records from seq 1, each a 64-byte header and its payload."""
    journal = recovery.data_dir / "stores" / VM / "journal"
    segments = sorted(journal.iterdir())
    assert len(segments) >= 3, segments
    pos = 64 + (seq - 1) * (64 + MIB) + 64 + at
    with open(segments[0], "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x5A]))


def view_or_refusal(site, seq):
    """The disk at seq through a view, or None when the site refuses the view."""
    got, doc = api(site, "POST", f"/stores/{VM}/views", {"seq": seq})
    if got != 201:
        print(f"view at {seq} refused: {got} {doc}")
        return None
    try:
        return read_all(doc["disks"][0]["uri"], size=DISK)
    finally:
        close_view(site, doc["id"])


def test_a_fold_over_a_damaged_journal_record_fails_and_changes_nothing(site_factory):
    """docs/operations.md: damaged records "are refused ... rather than served, and no fold
    or compaction copies them". The vault's retention fold (POST /stores/VM/fold) over an
    older segment whose record of seq 5 is damaged: the fold must fail and leave base_seq
    where it was. It answers 200 instead: FoldStep reads the segment with LogReader::Scan,
    which ends that segment's reading at the damage and goes on with the next segment, and
    the step only checks that the scan got past its target. Records 5..40 never reach the
    base, and every point from then on reads old bytes for their slots, with no error, no
    damaged_records, and a vault health that stays Normal."""
    primary, recovery, model = start_pair(site_factory, 200, seed=9)
    recovery.stop()
    flip_payload_byte(recovery, 5)
    recovery.restart()
    got, doc = api(recovery, "POST", f"/stores/{VM}/fold", {"seq": 40})
    print("fold over the damaged record ->", got, doc)
    st = store_status(recovery, VM)
    print("after:", {k: st.get(k) for k in ("base_seq", "damaged_records", "durable_seq")})
    wrong = []
    for s in (40, 100, 200):
        b = view_or_refusal(recovery, s)
        if b is not None and b != model.at(s):
            slots = [i for i in range(DISK // MIB)
                     if b[i * MIB:(i + 1) * MIB] != model.at(s)[i * MIB:(i + 1) * MIB]]
            wrong.append((s, slots))
    assert not wrong, f"points read wrong bytes after the fold (seq, slots): {wrong}"
    assert got != 200, f"the fold over a damaged record answered {got} {doc}"
    assert st["base_seq"] == 0, st


def test_a_fold_asked_while_a_compaction_runs_is_answered_at_once(site_factory):
    """docs/architecture.md: compactions run on a maintenance thread because one takes
    "minutes for tens of GiB, which neither the vault's tick nor an HTTP timeout should wait
    for". The vault's retention fold (POST /stores/VM/fold: synchronous, from the vault's one
    point thread for every VM, 30 s read timeout) asked while a compaction runs waits for
    the whole compaction (RecoveryStore::Fold and Compact share fold_run_mu_). It should be
    answered while the compaction still runs (done, or refused as busy)."""
    primary, recovery, model = start_pair(site_factory, 400, seed=2)
    durable = store_status(recovery, VM)["durable_seq"]
    body = {"keep": list(range(10, 390, 10)), "through": durable}
    api(recovery, "POST", f"/stores/{VM}/compact", body)
    deadline = time.monotonic() + 20
    while store_status(recovery, VM)["compaction"]["state"] == "queued":
        assert time.monotonic() < deadline, "the compaction did not start"
        time.sleep(0.01)
    assert store_status(recovery, VM)["compaction"]["state"] == "running", \
        "the compaction ended before the fold could be asked (too little history)"
    t0 = time.monotonic()
    got, doc = api(recovery, "POST", f"/stores/{VM}/fold", {"seq": 10}, timeout=120)
    took = time.monotonic() - t0
    after = store_status(recovery, VM)["compaction"]
    print(f"fold -> {got} {doc} after {took:.2f}s; compaction then: {after}")
    assert after["state"] == "running" or took < 0.5, \
        f"the fold was answered {took:.2f}s later, after the compaction ended: {after}"
