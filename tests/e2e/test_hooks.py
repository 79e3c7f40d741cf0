"""A VM's hooks: freeze/thaw around an app-consistent point, pre/post failover around a
failover, each with its environment; a failing freeze refuses the app point (and still
thaws); a hook past its timeout is killed and fails the failover before anything
changed."""

import json

from conftest import protect


def lines(path):
    return path.read_text().splitlines() if path.exists() else []


def test_hooks_run_in_order_with_their_environment(env, tmp_path):
    osr = env.osr
    log = tmp_path / "hooks.log"
    hook = f'echo "$OSR_HOOK $OSR_VM ${{OSR_SITE:-}}" >> {log}'
    osr.ok("vm", "create", "vm1", "--site", "primary", "--disk", "os:16M",
           "--hook", f"freeze={hook}", "--hook", f"thaw={hook}",
           "--hook", f"pre_failover={hook}", "--hook", f"post_failover={hook}")
    shown = osr.ok("vm", "show", "vm1")
    assert set(shown["spec"]["hooks"]) == {"freeze", "thaw", "pre_failover", "post_failover"}
    protect(osr, "vm1")

    point = osr.ok("point", "create", "vm1", "--app")
    assert point["type"] == "app" and point["quiesced_by"] == "hooks", point
    assert lines(log) == ["freeze vm1 ", "thaw vm1 "], lines(log)

    osr.job_ok("failover", "vm1", "--point", "latest-app", job_type="failover")
    assert lines(log)[2:] == ["pre_failover vm1 recovery", "post_failover vm1 recovery"], \
        lines(log)


def test_a_failing_freeze_refuses_the_app_point_and_thaws(env, tmp_path):
    osr = env.osr
    log = tmp_path / "hooks.log"
    osr.ok("vm", "create", "vm1", "--site", "primary", "--disk", "os:16M",
           "--hook", "freeze=exit 3", "--hook", f"thaw=echo thawed >> {log}")
    protect(osr, "vm1")
    before = osr.ok("point", "list", "vm1")
    msg = osr.fails("point", "create", "vm1", "--app")
    assert "freeze" in msg and "exit status 3" in msg, msg
    assert lines(log) == ["thawed"], lines(log)
    assert osr.ok("point", "list", "vm1") == before, "a refused app point was recorded"
    # A crash-consistent point does not quiesce.
    assert "quiesced_by" not in osr.ok("point", "create", "vm1")


def test_a_hook_past_its_timeout_fails_the_failover_before_any_change(env, tmp_path):
    osr = env.osr
    osr.ok("vm", "create", "vm1", "--site", "primary", "--disk", "os:16M",
           "--hook-timeout", "1", "--hook", "pre_failover=sleep 30")
    protect(osr, "vm1")
    item = osr.ok("item", "show", "vm1")
    proc = osr.run("failover", "vm1", "--point", "latest", "--wait")
    assert proc.returncode != 0, proc.stdout
    job = json.loads(proc.stdout)
    assert job["state"] == "Failed" and "did not finish in 1000 ms" in job["error"], job
    after = osr.ok("item", "show", "vm1")
    assert after["state"] == "Protected" and after["epoch"] == item["epoch"], after
    assert osr.ok("vm", "show", "vm1")["site"] == "primary"
