"""A VM's hooks: freeze/thaw around an app-consistent point, pre/post failover around a
failover, each with its environment; a failing freeze refuses the app point (and still
thaws); a hook past its timeout is killed and fails the failover before anything
changed. The quickstart is a lab (--allow-api-hooks): hooks are command strings here
(--hook-command); a strict vault is tested in tests/site/test_commands.py.

A spec of the wrong type ("hook_timeout_ms": "soon") is refused at creation, and one
planted in the catalog fails the job that reads it, with a message naming the field: the
vault stays up, also across a restart."""

import json
import urllib.error
import urllib.request

from conftest import protect


def lines(path):
    return path.read_text().splitlines() if path.exists() else []


def test_hooks_run_in_order_with_their_environment(env, tmp_path):
    osr = env.osr
    log = tmp_path / "hooks.log"
    hook = f'echo "$OSR_HOOK $OSR_VM ${{OSR_SITE:-}}" >> {log}'
    osr.ok("vm", "create", "vm1", "--site", "primary", "--disk", "os:16M",
           "--hook-command", f"freeze={hook}", "--hook-command", f"thaw={hook}",
           "--hook-command", f"pre_failover={hook}",
           "--hook-command", f"post_failover={hook}")
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
           "--hook-command", "freeze=exit 3", "--hook-command", f"thaw=echo thawed >> {log}")
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
           "--hook-timeout", "1", "--hook-command", "pre_failover=sleep 30")
    protect(osr, "vm1")
    item = osr.ok("item", "show", "vm1")
    proc = osr.run("failover", "vm1", "--point", "latest", "--wait")
    assert proc.returncode != 0, proc.stdout
    job = json.loads(proc.stdout)
    assert job["state"] == "Failed" and "did not finish in 1000 ms" in job["error"], job
    after = osr.ok("item", "show", "vm1")
    assert after["state"] == "Protected" and after["epoch"] == item["epoch"], after
    assert osr.ok("vm", "show", "vm1")["site"] == "primary"


def post(url, body, token):
    """(HTTP status, JSON answer) of a POST to the vault."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def test_a_spec_of_the_wrong_type_is_refused_at_creation(env):
    url = env.qs.vault_url + "/api/v1/vms"
    for spec, field in [({"hook_timeout_ms": "soon"}, "spec.hook_timeout_ms"),
                        ({"shutdown_timeout_ms": -1}, "spec.shutdown_timeout_ms"),
                        ({"hooks": {"freeze": 3}}, "spec.hooks.freeze"),
                        ({"driver": "qemu", "cpus": 100000}, "spec.cpus"),
                        ({"driver": "qemu", "memory_bytes": "1G"}, "spec.memory_bytes"),
                        ({"driver": "process", "command": ["sh"]}, "spec.command")]:
        status, answer = post(url, {"name": "vm1", "site": "primary",
                                    "disks": [{"name": "os", "size_bytes": 16 << 20}],
                                    "spec": spec},
                              (env.qs.data_dir / "admin.token").read_text().strip())
        assert status == 400, (spec, status, answer)
        assert answer["error"]["message"].startswith(field + ":"), (spec, answer)
    assert env.osr.ok("vm", "list") == [], "a refused VM was created"


def plant_spec(catalog, vm, change):
    """Changes the stored spec of `vm` in the catalog (a row the vault did not check), on
    SQLite or PostgreSQL alike; reads it back."""
    rows = catalog.query("SELECT spec FROM vms WHERE name = ?", vm)
    assert len(rows) == 1, f"{catalog}: vm {vm}: {rows}"
    spec = json.loads(rows[0][0])
    spec.update(change)
    assert catalog.execute("UPDATE vms SET spec = ? WHERE name = ?", json.dumps(spec), vm) == 1
    assert json.loads(catalog.query("SELECT spec FROM vms WHERE name = ?", vm)[0][0]) == spec


def test_a_stored_spec_of_the_wrong_type_fails_the_job_and_the_vault_stays_up(env, tmp_path):
    """Once "hook_timeout_ms": "soon" killed the vault at failover, and at every restart
    (the job resumed)."""
    osr, qs = env.osr, env.qs
    log = tmp_path / "hooks.log"
    osr.ok("vm", "create", "vm1", "--site", "primary", "--disk", "os:16M",
           "--hook-command", f"pre_failover=echo pre >> {log}",
           "--hook-command", f"freeze=echo freeze >> {log}")
    protect(osr, "vm1")
    item = osr.ok("item", "show", "vm1")
    plant_spec(qs.catalog, "vm1", {"hook_timeout_ms": "soon"})

    def fails_cleanly():
        # The failover's checks read the spec first: refused before any job, naming the field.
        jobs_before = osr.ok("job", "list")
        proc = osr.run("failover", "vm1", "--point", "latest", "--wait")
        assert proc.returncode != 0, proc.stdout
        assert "spec.hook_timeout_ms" in proc.stderr, proc.stderr
        assert "check 'spec' failed" in proc.stderr, proc.stderr
        assert osr.ok("job", "list") == jobs_before, "a refused failover left a job"
        msg = osr.fails("point", "create", "vm1", "--app")
        assert "spec.hook_timeout_ms" in msg, msg
        assert qs.alive(), qs.stderr()[-3000:]
        after = osr.ok("item", "show", "vm1")
        assert after["state"] == "Protected" and after["epoch"] == item["epoch"], after
        assert not log.exists(), "a hook of a bad spec ran"

    fails_cleanly()
    qs.stop_clean()
    qs.restart()
    assert osr.ok("item", "show", "vm1")["state"] == "Protected"
    fails_cleanly()
    # Fixed in the catalog, the same failover goes through.
    plant_spec(qs.catalog, "vm1", {"hook_timeout_ms": 60000})
    osr.job_ok("failover", "vm1", "--point", "latest", job_type="failover")
    assert log.read_text().splitlines() == ["pre"], log.read_text()
