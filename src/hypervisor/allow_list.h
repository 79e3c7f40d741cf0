// Host-local allow-list files: what a host runs for VMs, written by that host's operator.
//
// The API names entries of these files; it does not send commands (DESIGN.md invariant 8).
// A site's commands file (site config `commands_file`) holds the process commands and the
// extra qemu arguments of its VMs; the vault's hooks file (`osrd vault --hooks FILE`)
// holds the hooks. Format (TOML, docs/formats.md "Allow-list files"):
//
//   version = 1                     # optional; the only version there is
//   [commands.appliance]            # [KIND.NAME]: NAME as VM names: [A-Za-z0-9._-]{1,64}
//   command = "/usr/local/bin/appliance --disks \"$OSR_DISKS\""
//   description = "..."             # optional
//   [qemu_args.linux-direct]
//   args = "-kernel /srv/vm/vmlinuz -append 'console=ttyS0'"
//
// The file decides what runs as the daemon's user, so it must be a regular file that
// only its owner may write, owned by root or by the daemon's user (as sshd's StrictModes);
// it is read once, at start (a restart reads it again).
//
// Thread model: none (loaded once, then read-only).
#pragma once

#include <map>
#include <string>
#include <vector>

#include "common/status.h"
#include "hypervisor/vm_spec.h"

namespace osr::hypervisor {

inline constexpr size_t kAllowListBytesMax = 1u << 20;
inline constexpr size_t kAllowListEntriesMax = 4096;

// One kind of entry a file may hold: tables [kind.NAME], each with the string `key`.
struct AllowListKind {
  std::string kind;  // "commands"
  std::string key;   // "command"
};

// kind -> entry name -> the entry's string.
using AllowListEntries = std::map<std::string, std::map<std::string, std::string>>;

// Reads and checks an allow-list file: kInvalidArgument (naming the file, and the entry or
// key) for a file that is not TOML, an unknown kind or key, a bad entry name, an empty
// or over-long string; kPermissionDenied for a file others may write or that another user
// owns; the open's errno otherwise. Every kind of `kinds` is in the answer (maybe empty).
Result<AllowListEntries> LoadAllowListFile(const std::string& path,
                                           const std::vector<AllowListKind>& kinds);

// A site's rules for what its VMs run (site config `commands_file`, `allow_api_commands`).
struct SiteCommands {
  std::string file;                 // "" when the config names none
  bool allow_api_commands = false;  // literal commands / qemu_args from the API run here
  std::map<std::string, std::string> commands;   // [commands.NAME] command
  std::map<std::string, std::string> qemu_args;  // [qemu_args.NAME] args (CheckQemuArgs passed)

  // What GET /api/v1/site shows and the vault checks a new VM's spec against.
  CommandPolicy Policy() const;
  // The shell command of a process VM, the extra arguments of a qemu VM ("" when none):
  // kInvalidArgument naming the spec field when this site does not run it.
  Result<std::string> ProcessCommand(const VmSpec& spec) const;
  Result<std::string> QemuArgs(const VmSpec& spec) const;
};

// Reads the site's commands file (`path` "" : no entries); every [qemu_args.NAME] entry
// must pass CheckQemuArgsText (else kInvalidArgument naming the entry).
Result<SiteCommands> LoadSiteCommands(const std::string& path, bool allow_api_commands);

}  // namespace osr::hypervisor
