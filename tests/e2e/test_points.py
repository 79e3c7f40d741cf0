"""Recovery points through the `osr` CLI: choosing a drill's point by spec (latest,
latest-processed, latest-app, an id, an RFC 3339 time), and the crash-consistent points a
policy makes on its own while writes arrive."""

import time

from conftest import (MIB, Drill, VmDisks, assert_point, create_vm, format_time_ns,
                      parse_time_ns, protect, wait_for)


def drill_at(env, vm, rng, name, spec, want_point=None):
    """test-failover --point spec: the job's point is want_point (or, if None, a new point
    holding every write), the drill disks hold the model at its seq; then cleanup.
    Returns the job's point."""
    osr = env.osr
    job = osr.job_ok("test-failover", name, "--point", spec, job_type="test-failover")
    point = assert_point(job.get("point"), f"--point {spec}: the job's point")
    if want_point is not None:
        assert point == want_point, f"--point {spec} resolved to {point}, expected {want_point}"
    else:
        assert point["seq"] == vm.seq, f"--point {spec}: seq {point['seq']}, expected {vm.seq}"
    item = osr.ok("item", "show", name)
    assert item.get("state") == "TestFailoverCompleted", item
    drill = env.track(Drill(job, vm, vm.at(point["seq"]), rng))
    drill.assert_matches(f"drill at --point {spec} (point {point['id']}, seq {point['seq']})")
    drill.close()
    osr.job_ok("test-failover-cleanup", name, "--notes", f"drill at {spec}",
               job_type="test-failover-cleanup")
    item = osr.ok("item", "show", name)
    assert item.get("state") == "Protected", item
    return point


def jobs(osr):
    return [(j["id"], j["type"], j["state"]) for j in osr.ok("job", "list")]


def test_points_by_spec(env, rng):
    osr = env.osr
    # Points only when asked for: a crash interval longer than the test.
    pol = osr.ok("policy", "create", "manual", "--crash-interval", "24h")
    assert pol.get("name") == "manual" and pol.get("crash_interval_seconds") == 86400, pol

    vm = env.track(VmDisks(create_vm(osr, "vm2", [("os", "16M", 16 * MIB),
                                                  ("data", "8M", 8 * MIB)]), rng))
    vm.write(10)
    protect(osr, "vm2", policy="manual")
    item = osr.ok("item", "show", "vm2")
    assert item.get("policy") == "manual" and item.get("state") == "Protected", item
    p0 = assert_point(item.get("latest_point"), "first point")
    assert p0["seq"] == vm.seq, (p0, vm.seq)

    # Three points with writes (and time) between them.
    pts = []
    for i in range(3):
        time.sleep(0.3)
        vm.write(15)
        p = assert_point(osr.ok("point", "create", "vm2"), f"point {i + 1}")
        assert p["type"] == "crash" and p["seq"] == vm.seq, (p, vm.seq)
        pts.append(p)
    times = [parse_time_ns(p["time"]) for p in [p0, *pts]]
    assert times == sorted(times) and len(set(times)) == 4, f"point times: {[p0, *pts]}"
    assert [p["id"] for p in [p0, *pts]] == sorted({p["id"] for p in [p0, *pts]}), pts
    assert [p["seq"] for p in [p0, *pts]] == sorted({p["seq"] for p in [p0, *pts]}), pts
    listed = osr.ok("point", "list", "vm2")
    assert listed == [p0, *pts], f"point list: {listed}"

    # latest-processed: the newest point.
    drill_at(env, vm, rng, "vm2", "latest-processed", pts[2])
    # A time between points 1 and 2: point 1 (the newest at or before it).
    t1, t2 = times[1], times[2]
    mid = (t1 + t2) // 2
    drill_at(env, vm, rng, "vm2", format_time_ns(mid), pts[0])
    # The same instant written at another offset.
    drill_at(env, vm, rng, "vm2", format_time_ns(mid, offset_minutes=-330), pts[0])
    # Exactly point 2's time ("at or before" includes it), written at +02:00.
    drill_at(env, vm, rng, "vm2", format_time_ns(t2, offset_minutes=120), pts[1])
    # By id.
    drill_at(env, vm, rng, "vm2", str(pts[1]["id"]), pts[1])

    # A time before every point, and latest-app with no app point: refused, nothing started.
    before_jobs = jobs(osr)
    msg = osr.fails("test-failover", "vm2", "--point", format_time_ns(times[0] - 10**9))
    assert "point" in msg, msg
    msg = osr.fails("test-failover", "vm2", "--point", "latest-app")
    assert "app" in msg, f"the message does not say what is missing: {msg!r}"
    assert jobs(osr) == before_jobs, "a refused drill left a job behind"
    item = osr.ok("item", "show", "vm2")
    assert item.get("state") == "Protected" and "drill" not in item, item
    assert osr.ok("point", "list", "vm2") == listed, "a refused drill changed the points"

    # An app-consistent point, then more writes and a crash point after it.
    vm.write(10)
    made = osr.ok("point", "create", "vm2", "--app")
    # A VM without a guest agent or a freeze hook: the point only marks the position.
    assert made.pop("quiesced_by", None) == "none", made
    app = assert_point(made, "app point")
    assert app["type"] == "app" and app["seq"] == vm.seq, (app, vm.seq)
    vm.write(10)
    after = assert_point(osr.ok("point", "create", "vm2"), "point after the app point")
    assert after["type"] == "crash" and after["seq"] == vm.seq > app["seq"], (app, after)
    drill_at(env, vm, rng, "vm2", "latest-app", app)
    drill_at(env, vm, rng, "vm2", "latest-processed", after)

    # latest: a new point holding everything written until now.
    vm.write(10)
    latest = drill_at(env, vm, rng, "vm2", "latest")
    assert latest["id"] > after["id"], (after, latest)
    assert osr.ok("point", "list", "vm2")[-1] == latest
    assert osr.ok("item", "show", "vm2").get("latest_point") == latest


def test_crash_points_appear(env, rng):
    osr = env.osr
    pol = osr.ok("policy", "create", "fast", "--crash-interval", "1s")
    assert pol.get("name") == "fast" and pol.get("crash_interval_seconds") == 1, pol
    listed = {p["name"]: p for p in osr.ok("policy", "list")}
    assert listed.get("fast") == pol, listed

    vm = env.track(VmDisks(create_vm(osr, "vm4", [("os", "16M", 16 * MIB),
                                                  ("data", "4M", 4 * MIB)]), rng))
    protect(osr, "vm4", policy="fast")
    item = osr.ok("item", "show", "vm4")
    assert item.get("policy") == "fast", item
    first = assert_point(item.get("latest_point"), "first point")
    assert first["seq"] == 0, first

    # Keep writing for ~4.5 s.
    start_ns = time.time_ns()
    deadline = time.monotonic() + 4.5
    while time.monotonic() < deadline:
        vm.write(3, max_len=64 * 1024)
        time.sleep(0.03)
    end_ns = time.time_ns()
    total = vm.seq

    points = osr.ok("point", "list", "vm4")
    for p in points:
        assert_point(p, "point list")
    assert points[0] == first, points
    made = [p for p in points if p["seq"] > first["seq"]]
    assert len(made) >= 3, (f"{len(made)} crash points in 4.5 s of writes with a 1 s "
                            f"interval: {points}")
    assert len(made) <= 4.5 / 1 + 2, f"more points than one a second: {points}"
    for p in made:
        assert p["type"] == "crash", p
        assert 0 < p["seq"] <= total, (p, total)
        t = parse_time_ns(p["time"])
        assert start_ns - 10**9 <= t <= end_ns + 2 * 10**9, \
            f"point {p} is outside the writing window"
    seqs = [p["seq"] for p in points]
    times = [parse_time_ns(p["time"]) for p in points]
    assert all(a < b for a, b in zip(seqs, seqs[1:])), f"seqs not increasing: {points}"
    assert all(a < b for a, b in zip(times, times[1:])), f"times not increasing: {points}"

    # Once the writes stop, one more point takes the rest, then no new points come.
    final = wait_for(lambda: (lambda ps: ps if ps[-1]["seq"] == total else None)(
        osr.ok("point", "list", "vm4")), 5, f"a point holding all {total} writes")
    time.sleep(1.6)
    assert osr.ok("point", "list", "vm4") == final, "points appeared without new writes"

    # A point the policy made holds exactly the writes up to its seq.
    mid = made[len(made) // 2]
    drill_at(env, vm, rng, "vm4", str(mid["id"]), mid)
