"""Commands come from the host, not the API (DESIGN.md invariant 8), with the parts as
separate daemons (`osrd vault`, `osrd site`) driven through the `osr` CLI and raw HTTP:

- A strict site (the default) runs only entries of its commands file: a command string
  from the API is refused when the VM is created (400 naming `spec.command`), by the site
  itself when the vault (or anyone) asks it to start one, and when it was stored in the
  catalog before the rule; a named entry runs. The same for qemu arguments.
- A lab site (`allow_api_commands = true`) runs a command string, but never a qemu
  argument outside the documented harmless list.
- A strict vault runs only hooks of its hooks file (`osrd vault --hooks FILE`).
- Nothing of a command reaches the daemons' logs.
"""

import json
import subprocess
import urllib.error
import urllib.request

import pytest

from conftest import MIB, SiteProcess, api, api_ok, assert_error, wait_for, write_config
from test_dr_daemons import Osr, VaultProcess, register
import osrtest

# Every option that reaches the host that we know of is refused by the unit test
# (src/hypervisor/qemu_driver_test.cc); these show the whole path, API to site.
FORBIDDEN_QEMU_ARGS = [
    ("-monitor tcp:127.0.0.1:4444,server,nowait", "-monitor"),
    ("-qmp unix:/tmp/osr-qmp,server=on,wait=off", "-qmp"),
    ("-chardev socket,id=c0,host=127.0.0.1,port=4444,server=on", "-chardev"),
    ("-device virtio-rng-pci,chardev=c0", "chardev"),
    ("-serial unix:/tmp/osr-serial,server", "-serial"),
    ("-netdev user,id=n0,hostfwd=tcp::2222-:22", "-netdev"),
    ("-object memory-backend-file,id=m0,mem-path=/etc,size=1M", "-object"),
    ("-drive file=/etc/shadow,format=raw", "-drive"),
    ("-initrd /proc/self/environ", "/proc/"),
    ("/etc/shadow", "not an option"),
]


class Vault(VaultProcess):
    def __init__(self, catalog, state_dir, port, log_path, extra):
        super().__init__(catalog, state_dir, port, log_path)
        self.extra = extra

    def osrd_args(self):
        return super().osrd_args() + self.extra


def post_vm(vault, name, spec, site="primary"):
    """POST /api/v1/vms: (status, answer)."""
    body = {"name": name, "site": site, "disks": [{"name": "os", "size_bytes": 16 * MIB}],
            "spec": spec}
    token = vault.token_file.read_text().strip()
    req = urllib.request.Request(vault.url + "/api/v1/vms", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json",
                                                         "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def refused(vault, name, spec, field, site="primary"):
    """The vault refuses the VM with 400 and a message that begins with `field`."""
    status, answer = post_vm(vault, name, spec, site)
    assert status == 400, (spec, status, answer)
    msg = answer["error"]["message"]
    assert msg.startswith(field + ":"), (spec, msg)
    return msg


def fails(osr, *args):
    p = osr.run(*args)
    assert p.returncode != 0, f"osr {args} succeeded: {p.stdout}"
    return p.stderr


def plant_spec(catalog, vm, spec):
    """A spec written into the catalog behind the vault's back (as one stored before the
    allow-lists existed), on SQLite or PostgreSQL alike."""
    assert catalog.execute("UPDATE vms SET spec = ? WHERE name = ?", json.dumps(spec), vm) == 1
    assert catalog.query("SELECT spec FROM vms WHERE name = ?", vm) == [(json.dumps(spec),)]


@pytest.fixture
def daemons(tmp_path, new_catalog):
    """start(sites={name: extra config}, vault_args=[...]) -> (vault, {name: site}, osr)."""
    procs = []

    def start(sites, vault_args=()):
        started = {}
        for name, extra in sites.items():
            config, data_dir = write_config(tmp_path, name)
            config.write_text(config.read_text() + extra)
            s = SiteProcess(name, config, data_dir, tmp_path / f"{name}.stderr")
            procs.append(s)
            started[name] = s.start()
        vault = Vault(new_catalog(tmp_path / "vault.db"), tmp_path, osrtest.free_port(),
                      tmp_path / "vault.stderr", list(vault_args))
        procs.append(vault)
        vault.start()
        osr = Osr(vault)
        for s in started.values():
            register(osr, s)
        return vault, started, osr

    yield start
    osrtest.stop_all_clean(procs)


def run_osrd(args):
    """osrd ARGS that must exit by itself (a refused config): the finished process."""
    return subprocess.run([str(osrtest.require_osrd()), *args], capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)


def write_private(path, text):
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_a_strict_site_runs_only_entries_of_its_commands_file(daemons, tmp_path):
    evil = tmp_path / "evil"
    ran = tmp_path / "ran"
    commands = write_private(tmp_path / "commands.toml", f"""
version = 1
[commands.marker]
command = "echo \\"$OSR_VM ran\\" > {ran}; exec sleep 60"
[qemu_args.direct]
args = "-no-reboot -display none"
""")
    vault, sites, osr = daemons({"primary": f'commands_file = "{commands}"\n'})
    primary = sites["primary"]

    # Only names go out: what an entry runs stays on the site.
    shown = api_ok(primary, "GET", "/site")["vm_commands"]
    assert shown == {"allow_api_commands": False, "commands": ["marker"],
                     "qemu_args": ["direct"]}, shown

    # At creation: a command string, an unknown entry, qemu arguments as a string.
    refused(vault, "vm1", {"driver": "process", "command": f"touch {evil}"}, "spec.command")
    refused(vault, "vm1", {"driver": "process", "command_name": "nosuch"}, "spec.command_name")
    refused(vault, "vm1", {"driver": "qemu", "qemu_args": "-no-reboot"}, "spec.qemu_args")
    refused(vault, "vm1", {"driver": "qemu", "qemu_args_name": "nosuch"}, "spec.qemu_args_name")
    assert "spec.command" in fails(osr, "vm", "create", "vm1", "--site", "primary", "--disk",
                                   "os:16M", "--driver", "process", "--command", f"touch {evil}")
    assert osr.ok("vm", "list") == []
    osr.ok("vm", "create", "q1", "--site", "primary", "--disk", "os:16M", "--driver", "qemu",
           "--qemu-args-name", "direct")

    # A named entry runs.
    created = osr.ok("vm", "create", "vm2", "--site", "primary", "--disk", "os:16M",
                     "--driver", "process", "--command-name", "marker")
    assert created["spec"]["command_name"] == "marker" and "command" not in created["spec"]
    osr.ok("vm", "start", "vm2")
    wait_for(lambda: ran.exists() and ran.read_text() == "vm2 ran\n", 20, "the entry to run")
    assert "entry marker" in primary.stderr(), primary.stderr()[-2000:]
    assert "exec sleep" not in primary.stderr() + vault.stderr(), "a command in a log"

    # The site refuses a command string itself (whoever asks), and so it refuses one that
    # was stored in the catalog before the rule.
    api_ok(primary, "PUT", "/groups/g1", {"disks": [{"name": "os", "size_bytes": MIB}]},
           status=201)
    err = assert_error(primary, "POST", "/groups/g1/vm/start",
                       {"driver": "process", "command": f"touch {evil}"}, 400)
    assert "spec.command:" in err["message"], err
    osr.ok("vm", "stop", "vm2", "--timeout", "5")
    plant_spec(vault.catalog, "vm2", {"driver": "process", "command": f"touch {evil}"})
    assert "spec.command:" in fails(osr, "vm", "start", "vm2")
    assert not evil.exists(), "a command string ran on a strict site"
    assert api_ok(primary, "GET", "/groups/vm2")["vm"]["running"] is False


def test_a_lab_site_runs_a_command_string_but_no_forbidden_qemu_argument(daemons, tmp_path):
    ran = tmp_path / "ran"
    vault, sites, osr = daemons({"primary": "allow_api_commands = true\n"})
    primary = sites["primary"]
    assert api_ok(primary, "GET", "/site")["vm_commands"]["allow_api_commands"] is True
    osr.ok("vm", "create", "vm1", "--site", "primary", "--disk", "os:16M", "--driver",
           "process", "--command", f"echo \"$OSR_VM ran\" > {ran}; exec sleep 60")
    osr.ok("vm", "start", "vm1")
    wait_for(lambda: ran.exists() and ran.read_text() == "vm1 ran\n", 20, "the command to run")
    assert "exec sleep" not in primary.stderr() + vault.stderr(), "a command in a log"

    api_ok(primary, "PUT", "/groups/g1", {"disks": [{"name": "os", "size_bytes": MIB}]},
           status=201)
    for args, named in FORBIDDEN_QEMU_ARGS:
        msg = refused(vault, "q1", {"driver": "qemu", "qemu_args": args}, "spec.qemu_args")
        assert named in msg, (args, msg)
        err = assert_error(primary, "POST", "/groups/g1/vm/start",
                           {"driver": "qemu", "qemu_args": args}, 400)
        assert "spec.qemu_args:" in err["message"] and named in err["message"], (args, err)
    assert api_ok(primary, "GET", "/groups/g1")["vm"]["running"] is False
    assert osr.ok("vm", "list")[0]["name"] == "vm1"


def test_protect_to_a_site_that_would_not_run_the_vm_fails_its_commands_check(daemons,
                                                                              tmp_path):
    """A lab primary takes a command string; a strict recovery site would not run it after
    a failover: protect's plan shows the failed `commands` check, and protect is refused
    (409, the check named), nothing changed."""
    commands = write_private(tmp_path / "commands.toml", 'version = 1\n[commands.marker]\n'
                             'command = "exec sleep 60"\n')
    vault, sites, osr = daemons({"primary": "allow_api_commands = true\n",
                                 "recovery": f'commands_file = "{commands}"\n'})
    osr.ok("vm", "create", "vm1", "--site", "primary", "--disk", "os:16M", "--driver",
           "process", "--command", "exec sleep 60")
    p = osr.run("protect", "vm1", "--target", "recovery", "--dry-run")
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    plan = json.loads(p.stdout)["plan"]
    assert plan["ok"] is False, plan
    check = [c for c in plan["checks"] if c["name"] == "commands"]
    assert check and check[0]["result"] == "failed", plan
    assert check[0]["message"].startswith("spec.command:"), check
    msg = fails(osr, "protect", "vm1", "--target", "recovery")
    assert "protect vm1: check 'commands' failed at site recovery: spec.command:" in msg, msg
    assert "nothing was changed" in msg, msg
    assert osr.ok("item", "list") == [], "a refused protect made an item"
    assert not (sites["recovery"].data_dir / "stores" / "vm1").exists(), "a store was made"


def test_a_strict_vault_runs_only_entries_of_its_hooks_file(daemons, tmp_path):
    evil = tmp_path / "evil"
    log = tmp_path / "hooks.log"
    hooks = write_private(tmp_path / "hooks.toml", f"""
[hooks.log-freeze]
command = "echo \\"$OSR_HOOK $OSR_VM\\" >> {log}"
description = "writes a line"
""")
    vault, sites, osr = daemons({"primary": "", "recovery": ""}, ["--hooks", str(hooks)])
    refused(vault, "vm1", {"hooks": {"freeze": {"command": f"touch {evil}"}}},
            "spec.hooks.freeze.command")
    refused(vault, "vm1", {"hooks": {"thaw": f"touch {evil}"}}, "spec.hooks.thaw.command")
    refused(vault, "vm1", {"hooks": {"freeze": {"name": "nosuch"}}}, "spec.hooks.freeze.name")
    assert "--allow-api-hooks" in fails(osr, "vm", "create", "vm1", "--site", "primary",
                                        "--disk", "os:16M", "--hook-command",
                                        f"freeze=touch {evil}")

    osr.ok("vm", "create", "vm1", "--site", "primary", "--disk", "os:16M",
           "--hook", "freeze=log-freeze", "--hook", "thaw=log-freeze")
    osr.ok("protect", "vm1", "--target", "recovery", "--wait")
    point = osr.ok("point", "create", "vm1", "--app")
    assert point["quiesced_by"] == "hooks", point
    assert log.read_text().splitlines() == ["freeze vm1", "thaw vm1"], log.read_text()

    # A spec stored before the allow-list (a bare command string) does not run either.
    plant_spec(vault.catalog, "vm1", {"driver": "none", "hooks": {"freeze": f"touch {evil}"}})
    msg = fails(osr, "point", "create", "vm1", "--app")
    assert "spec.hooks.freeze.command" in msg, msg
    assert not evil.exists(), "a hook command string ran on a strict vault"
    assert "echo" not in vault.stderr(), "a hook command in the vault's log"


def test_a_daemon_refuses_an_allow_list_others_may_write(tmp_path):
    commands = tmp_path / "commands.toml"
    commands.write_text('[commands.x]\ncommand = "true"\n')
    commands.chmod(0o666)
    config, data_dir = write_config(tmp_path, "primary")
    config.write_text(config.read_text() + f'commands_file = "{commands}"\n')
    p = run_osrd(["site", "--config", str(config)])
    assert p.returncode != 0 and "chmod go-w" in p.stderr, p.stderr
    p = run_osrd(["vault", "--db", str(tmp_path / "v.db"), "--listen",
                          f"127.0.0.1:{osrtest.free_port()}", "--hooks", str(commands)])
    assert p.returncode != 0 and "chmod go-w" in p.stderr, p.stderr
    commands.chmod(0o600)
    commands.write_text('[qemu_args.x]\nargs = "-monitor stdio"\n')
    p = run_osrd(["site", "--config", str(config)])
    assert p.returncode != 0 and "[qemu_args.x]" in p.stderr and "-monitor" in p.stderr, p.stderr
