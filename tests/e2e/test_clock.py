"""Recovery points and the wall clock (issue 10, cases 3 and 4), through the `osr` CLI.

The quickstart runs under libfaketime (its wall clock only; the monotonic clock is the
host's): the tests step its wall clock back and forward and check that points keep being
made, that no step deletes a point, that health names the step, and that pruning resumes
once the clock is confirmed. And retention keeps the point an open drill stands on, so
the operator can fail over to the point just validated."""

import re

import pytest

from conftest import (MIB, Drill, VmDisks, assert_point, create_vm, format_time_ns,
                      parse_time_ns, protect, read_uri, assert_disks, wait_for)


def points_of(osr, name):
    return [assert_point(p, "point list") for p in osr.ok("point", "list", name)]


def write_until(vm, osr, name, pred, timeout, what):
    """Writes a few requests at a time until pred(points) holds (bounded by timeout)."""
    def step():
        vm.write(2, max_len=32 * 1024)
        pts = points_of(osr, name)
        return pts if pred(pts) else None
    return wait_for(step, timeout, what, interval=0.2,
                    detail=lambda: f"points: {points_of(osr, name)}\n"
                                   f"item: {osr.ok('item', 'show', name)}")


def covered(vm, osr, name, timeout=15):
    """Waits (no more writes) until the newest point holds every write made."""
    return wait_for(lambda: (lambda p: p if p and p[-1]["seq"] == vm.seq else None)(
        points_of(osr, name)), timeout, f"a point at seq {vm.seq}",
        detail=lambda: f"points: {points_of(osr, name)}")


def drill_latest_processed(env, vm, rng, name):
    """A drill at latest-processed holds the newest writes, byte for byte; then cleanup."""
    osr = env.osr
    job = osr.job_ok("test-failover", name, "--point", "latest-processed",
                     job_type="test-failover")
    point = assert_point(job.get("point"), "drill point")
    assert point["seq"] == vm.seq, f"the drill shows seq {point['seq']}, not the newest {vm.seq}"
    drill = env.track(Drill(job, vm, vm.at(point["seq"]), rng))
    drill.assert_matches(f"drill at latest-processed (point {point['id']})")
    drill.close()
    osr.job_ok("test-failover-cleanup", name, job_type="test-failover-cleanup")


@pytest.mark.faketime
@pytest.mark.deadline(120)
def test_a_clock_step_back_does_not_stop_points(env, rng):
    osr = env.osr
    osr.ok("policy", "create", "fast", "--crash-interval", "1s", "--retention", "1h")
    vm = env.track(VmDisks(create_vm(osr, "cb", [("d", "8M", 8 * MIB)]), rng))
    vm.write(4)
    protect(osr, "cb", policy="fast")
    write_until(vm, osr, "cb", lambda p: len(p) >= 3, 15, "points before the step")
    assert osr.ok("point", "clock").get("held") is False

    # Back 10 minutes: the old vault made no point until the clock caught up again.
    env.clock.step(-600)
    before = points_of(osr, "cb")
    grown = write_until(vm, osr, "cb",
                        lambda p: len([x for x in p if x["seq"] > before[-1]["seq"]]) >= 3,
                        20, "three new points after the clock stepped back")
    assert [p["id"] for p in grown[:len(before)]] == [p["id"] for p in before], \
        f"points went missing after a step back: {before} -> {grown}"
    # The points after the step are dated 10 minutes earlier: seq orders them, not time.
    assert [p["seq"] for p in grown] == sorted(p["seq"] for p in grown), grown
    assert parse_time_ns(grown[-1]["time"]) < parse_time_ns(before[-1]["time"]), grown

    # Health names the step; the clock route says the same.
    item = wait_for(lambda: (lambda i: i if "clock stepped back" in i["health"] else None)(
        osr.ok("item", "show", "cb")), 10, "health naming the step")
    assert re.search(r"the vault's clock stepped back by (9 min 5\d|10 min [0-9]) s", item["health"]), item
    assert "osr point confirm-clock" in item["health"], item
    clock = osr.ok("point", "clock")
    assert clock["held"] is True and -605 < clock["step_seconds"] < -595, clock

    # A drill at latest-processed shows the newest data (it showed data 10 minutes old).
    covered(vm, osr, "cb")
    drill_latest_processed(env, vm, rng, "cb")

    # The clock comes back: the hold ends by itself, health is Normal again.
    env.clock.step(+600)
    wait_for(lambda: osr.ok("point", "clock").get("held") is False, 10,
             "the hold ending when the clock came back")
    item = wait_for(lambda: (lambda i: i if i["health"] == "Normal" else None)(
        osr.ok("item", "show", "cb")), 10, "health Normal again")
    assert "warnings" not in item, item
    n = len(points_of(osr, "cb"))
    write_until(vm, osr, "cb", lambda p: len(p) >= n + 2, 15, "points after the clock came back")


@pytest.mark.faketime
@pytest.mark.deadline(120)
def test_a_time_the_clock_read_twice_is_refused_naming_the_points(env, rng):
    """After a step back, `--point TIME` is resolved within one clock era: a time read both
    before and after the step names no point (it named the newest point by seq, made after
    the moment the operator may mean); a time only one era read names that era's point."""
    osr = env.osr
    osr.ok("policy", "create", "fast", "--crash-interval", "1s", "--retention", "1h")
    vm = env.track(VmDisks(create_vm(osr, "ct", [("d", "8M", 8 * MIB)]), rng))
    vm.write(4)
    protect(osr, "ct", policy="fast")
    before = write_until(vm, osr, "ct", lambda p: len(p) >= 3, 15, "points before the step")

    env.clock.step(-600)

    # The step reaches osrd a moment later (libfaketime reads its file now and then), so
    # points made in between are still of the first era: the eras split where the points'
    # times go back, not at the step's call.
    def split(points):
        for i in range(1, len(points)):
            if parse_time_ns(points[i]["time"]) < parse_time_ns(points[i - 1]["time"]):
                return i
        return None

    after = write_until(vm, osr, "ct",
                        lambda p: split(p) is not None and len(p) - split(p) >= 3,
                        20, "three new points after the clock stepped back")
    covered(vm, osr, "ct")
    points = points_of(osr, "ct")
    cut = split(points)
    assert cut is not None and cut >= len(before), f"no point is dated back: {points}"
    era1, era2 = points[:cut], points[cut:]
    assert len(era2) >= 3 and era1, points
    last1 = era1[-1]
    assert all(parse_time_ns(p["time"]) < parse_time_ns(last1["time"]) - 500 * 10**9
               for p in era2), f"the points after the step are not dated 10 minutes back: {after}"

    # The time of the last point before the step: the clock read it again after the step,
    # and every point made since is dated before it.
    t = format_time_ns(parse_time_ns(last1["time"]))
    newest = era2[-1]
    for cmd in (["test-failover", "ct", "--point", t], ["failover", "ct", "--point", t]):
        msg = osr.fails(*cmd)
        assert msg.startswith(f"{t} is ambiguous for VM ct: the clock that dates its recovery "
                              "points stepped back"), msg
        assert f"point {last1['id']} ({last1['time']}, seq {last1['seq']})" in msg, msg
        assert f"point {newest['id']} ({newest['time']}, seq {newest['seq']})" in msg, msg
        assert "Name the point by its id instead (--point ID; osr point list ct)" in msg, msg
    # Refused before any job: the item stays as it was.
    assert osr.ok("item", "show", "ct")["state"] == "Protected"
    jobs = [j["type"] for j in osr.ok("job", "list", "--vm", "ct")]
    assert "test-failover" not in jobs and "failover" not in jobs, jobs

    # A time only the era after the step read (before any point of the first era): its
    # newest point at or before that time, byte for byte in a drill.
    second = era2[1]
    t2 = format_time_ns(parse_time_ns(second["time"]) + 1)
    job = osr.job_ok("test-failover", "ct", "--point", t2, job_type="test-failover")
    assert assert_point(job.get("point"), "drill point")["id"] == second["id"], job
    drill = env.track(Drill(job, vm, vm.at(second["seq"]), rng))
    drill.assert_matches(f"drill at {t2} (point {second['id']})")
    drill.close()
    osr.job_ok("test-failover-cleanup", "ct", job_type="test-failover-cleanup")


@pytest.mark.faketime
@pytest.mark.deadline(120)
def test_a_clock_step_forward_past_retention_deletes_nothing_until_confirmed(env, rng):
    osr = env.osr
    osr.ok("policy", "create", "short", "--crash-interval", "1s", "--retention", "60s")
    vm = env.track(VmDisks(create_vm(osr, "cf", [("d", "8M", 8 * MIB)]), rng))
    vm.write(4)
    protect(osr, "cf", policy="short")
    before = write_until(vm, osr, "cf", lambda p: len(p) >= 4, 15, "points before the step")

    # Two hours ahead: past the retention window and the thinning hour.
    env.clock.step(+7200)
    after = write_until(vm, osr, "cf",
                        lambda p: len([x for x in p if x["seq"] > before[-1]["seq"]]) >= 4,
                        20, "new points after the step")
    ids = [p["id"] for p in after]
    for p in before:
        assert p["id"] in ids, f"point {p} was deleted by a clock step: {after}"
    item = osr.ok("item", "show", "cf")
    assert "the vault's clock stepped forward by 2 h 0 min" in item["health"], item
    assert "retention and thinning are held" in item["health"], item
    assert item.get("warnings") == [item["health"]], item
    # The store kept its history too: a drill at the oldest point is still right.
    oldest = before[0]
    job = osr.job_ok("test-failover", "cf", "--point", oldest["id"], job_type="test-failover")
    drill = env.track(Drill(job, vm, vm.at(oldest["seq"]), rng))
    drill.assert_matches(f"drill at the oldest point {oldest['id']} after the step")
    drill.close()
    osr.job_ok("test-failover-cleanup", "cf", job_type="test-failover-cleanup")

    # (test_security checks that it takes the operator role.)
    confirmed = osr.ok("point", "confirm-clock")
    assert confirmed["was_held"] is True and confirmed["held"] is False, confirmed
    # Pruning resumes on the confirmed time: the points from before the step go.
    old_ids = {p["id"] for p in before}
    pruned = write_until(vm, osr, "cf", lambda p: not old_ids & {x["id"] for x in p}, 20,
                         "the points from before the step pruned after the confirmation")
    assert pruned, pruned
    item = wait_for(lambda: (lambda i: i if i["health"] == "Normal" else None)(
        osr.ok("item", "show", "cf")), 10, "health Normal after the confirmation")
    covered(vm, osr, "cf")
    drill_latest_processed(env, vm, rng, "cf")


@pytest.mark.faketime
@pytest.mark.deadline(120)
def test_retention_keeps_the_point_a_drill_stands_on(env, rng):
    osr = env.osr
    # The shortest retention a policy takes (60 s); the wall clock is stepped past it
    # (and confirmed) rather than waited for.
    osr.ok("policy", "create", "brief", "--crash-interval", "1s", "--retention", "60s")
    vm = env.track(VmDisks(create_vm(osr, "rd", [("os", "8M", 8 * MIB),
                                                 ("data", "4M", 4 * MIB)]), rng))
    vm.write(6)
    protect(osr, "rd", policy="brief")
    write_until(vm, osr, "rd", lambda p: len(p) >= 2, 15, "points before the drill")
    covered(vm, osr, "rd")
    earlier = points_of(osr, "rd")[:-1]
    assert earlier, "no point older than the drill's"

    job = osr.job_ok("test-failover", "rd", "--point", "latest-processed",
                     job_type="test-failover")
    point = assert_point(job.get("point"), "drill point")
    assert point["seq"] == vm.seq, point
    expected = vm.at(point["seq"])
    drill = env.track(Drill(job, vm, expected, rng))
    listed = points_of(osr, "rd")
    assert [p.get("in_use") for p in listed if p["id"] == point["id"]] == ["test-failover"], \
        listed

    # Two minutes pass (a step, confirmed: retention runs on it at once), writes go on:
    # the points before the drill's go, the drill's stays, shown in use.
    vm.write(2)
    env.clock.step(+120)
    wait_for(lambda: osr.ok("point", "clock").get("held"), 10, "the step noticed")
    assert osr.ok("point", "confirm-clock")["held"] is False
    earlier_ids = {p["id"] for p in earlier}
    listed = write_until(vm, osr, "rd", lambda p: not earlier_ids & {x["id"] for x in p}, 20,
                         "retention passing the drill's point")
    mine = [p for p in listed if p["id"] == point["id"]]
    assert mine, f"retention deleted point {point['id']}, which the open drill stands on: {listed}"
    assert mine[0].get("in_use") == "test-failover", mine
    assert all("in_use" not in p for p in listed if p["id"] != point["id"]), listed
    # Only the drill's point outlived the window: retention did run.
    newest = parse_time_ns(listed[-1]["time"])
    old = [p for p in listed if newest - parse_time_ns(p["time"]) > 60 * 10**9]
    assert [p["id"] for p in old] == [point["id"]], listed
    drill.assert_matches("the drill after retention passed its point")
    drill.close()

    # Writes stop; once the newest point holds them all, nothing more is pruned until
    # new data comes. Cleanup, then fail over to the point just validated.
    covered(vm, osr, "rd")
    osr.job_ok("test-failover-cleanup", "rd", "--notes", "validated",
               job_type="test-failover-cleanup")
    listed = points_of(osr, "rd")
    mine = [p for p in listed if p["id"] == point["id"]]
    assert mine and "in_use" not in mine[0], listed
    vm.close()
    job = osr.job_ok("failover", "rd", "--point", point["id"], job_type="failover")
    assert job.get("point", {}).get("id") == point["id"], job
    listed = points_of(osr, "rd")
    mine = [p for p in listed if p["id"] == point["id"]]
    assert mine and mine[0].get("in_use") == "failover", listed
    shown = osr.ok("vm", "show", "rd")
    assert shown.get("site") == "recovery", shown
    got = {d["name"]: read_uri(d["uri"], d["size_bytes"]) for d in shown["disks"]}
    assert_disks(got, expected, f"disks after failover to the drilled point {point['id']}")
