// A VM's hooks, run by the vault on its own host: freeze/thaw around an app-consistent
// point, pre/post failover around a failover (docs/api.md, "A VM's spec").
//
// What a hook runs comes from the vault's hooks file (`osrd vault --hooks FILE`, entries
// [hooks.NAME] command = "...", hypervisor/allow_list.h); the spec names an entry
// ({"name": ENTRY}). A literal ({"command": "..."}) runs only on a vault started with
// --allow-api-hooks (the quickstart's lab): otherwise it is refused when the VM is created
// and again when the hook would run (a spec stored before the rule must not run either).
//
// Thread model: HookConfig is read-only after start; RunHookCommand may run on any
// thread (it forks; the child only calls async-signal-safe functions).
#pragma once

#include <map>
#include <string>
#include <vector>

#include "common/status.h"
#include "hypervisor/vm_spec.h"

namespace osr::vault {

struct HookConfig {
  std::string file;                          // "" when none
  bool allow_api_hooks = false;              // literal hook commands from the API run here
  std::map<std::string, std::string> hooks;  // [hooks.NAME] command
};

inline constexpr hypervisor::HostRules kVaultRules = {
    "the vault's hooks file (osrd vault --hooks FILE)", "--allow-api-hooks on the vault (a lab)"};

// Reads the hooks file (`path` "": no entries). Errors as LoadAllowListFile's.
Result<HookConfig> LoadHookConfig(const std::string& path, bool allow_api_hooks);

// Whether this vault runs every hook of `spec`: kInvalidArgument naming the field
// ("spec.hooks.freeze.command: ...") otherwise.
Status CheckHooks(const HookConfig& cfg, const hypervisor::VmSpec& spec);

// The command of hook `hook` of `spec` ("" when it has none); kInvalidArgument naming
// the field when this vault does not run it.
Result<std::string> HookCommand(const HookConfig& cfg, const hypervisor::VmSpec& spec,
                                const std::string& hook);

// Runs `command` with /bin/sh -c in its own process group, stdin from /dev/null, with the
// vault's environment plus `env` (NAME=VALUE strings). Ok on exit status 0;
// kUnavailable when it ran past `timeout_ms` (its process group is killed); kInternal on
// another exit status. Messages name the VM and the hook, never the command.
Status RunHookCommand(const std::string& vm, const std::string& hook, const std::string& command,
                      const std::vector<std::string>& env, uint64_t timeout_ms);

}  // namespace osr::vault
