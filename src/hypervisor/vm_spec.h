// A VM's spec: how it runs (its driver and launch settings) and what runs around it (its
// hooks). The vault's API takes it (POST /api/v1/vms), the catalog stores it, the vault
// reads it back for hooks and timeouts, and the site daemon for starting the VM. Every
// one of them parses it here, with json_in (never nlohmann's throwing accessors), so a
// field of the wrong type or out of range is an error that names it
// ("spec.hook_timeout_ms: must be a whole number ≥ 0, not a string") wherever it is met:
// at creation (400), or when a stored spec is used (the job step fails).
//
// Commands come from the host, not the API (DESIGN.md invariant 8): a process command,
// the extra qemu arguments and each hook are a CommandRef, by default the name of an
// entry in the allow-list file of the host that runs it (the site's commands file, the
// vault's hooks file: allow_list.h). A literal string is only run by a host whose own
// config allows it (site: allow_api_commands; vault: --allow-api-hooks), and extra qemu
// arguments pass CheckQemuArgs (qemu_args.h) whatever their source.
//
// The JSON shape is documented in docs/api.md ("A VM's spec").
//
// Thread model: none (values and pure functions).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace osr::hypervisor {

enum class Driver { kNone, kProcess, kQemu };
std::string_view DriverName(Driver d);

// What a host runs: an entry of its allow-list file, or a literal (lab hosts only). At
// most one of the two is set; both empty: nothing given.
struct CommandRef {
  std::string name;     // an entry name of the host's allow-list file
  std::string literal;  // a shell command (or qemu arguments) given through the API
  bool empty() const { return name.empty() && literal.empty(); }
};

// Limits of a spec, in one place (docs/api.md repeats them).
inline constexpr uint64_t kMemoryBytesMin = 16ull << 20;
inline constexpr uint64_t kMemoryBytesMax = 1ull << 40;
inline constexpr uint64_t kCpusMax = 64;
inline constexpr uint64_t kShutdownTimeoutMsMax = 3600 * 1000;  // 0: a hard stop at once
inline constexpr uint64_t kHookTimeoutMsMin = 100;
inline constexpr uint64_t kHookTimeoutMsMax = 3600 * 1000;
inline constexpr size_t kCommandBytesMax = 16384;  // a literal command

// The hooks a VM may have (spec.hooks keys).
inline constexpr std::string_view kHookNames[] = {"freeze", "thaw", "pre_failover",
                                                  "post_failover"};

// A NIC of a QEMU VM. It names a logical network; each site maps that name to what its
// hosts have, for production and for drills (site config [networks.NAME]): the VM
// plugs into the mapping of the site it runs at, so the spec is the same at every site.
inline constexpr size_t kNicsMax = 8;
inline constexpr std::string_view kNicModels[] = {"virtio-net-pci", "e1000", "e1000e", "rtl8139"};
struct Nic {
  std::string mac;  // "52:54:00:xx:xx:xx": unicast, kept across failover
  std::string model = "virtio-net-pci";
  std::string network;  // a logical network name (ValidName)
  // The guest's address at each site (site name → "A.B.C.D/NN"), handed to the guest in
  // fw_cfg (opt/org.osr/nicN.ip): for guests that read it; others use DHCP.
  std::map<std::string, std::string> ip_by_site;
};

// How a drill knows the VM came up: a line the guest prints on its serial console
// (console_line), else the guest agent answering guest-ping.
inline constexpr uint64_t kBootCheckTimeoutMsMin = 1000;
inline constexpr uint64_t kBootCheckTimeoutMsMax = 3600 * 1000;
inline constexpr size_t kConsoleLineBytesMax = 256;
struct BootCheck {
  std::string console_line;  // "": the guest agent
  uint64_t timeout_ms = 300000;
};

struct VmSpec {
  Driver driver = Driver::kNone;
  CommandRef command;    // process: required
  CommandRef qemu_args;  // qemu: optional
  uint64_t memory_bytes = 512ull << 20;
  uint64_t cpus = 1;
  bool guest_agent = true;
  std::string accel;  // "", "kvm" or "tcg"
  uint64_t shutdown_timeout_ms = 30000;
  std::map<std::string, CommandRef> hooks;  // by name (kHookNames); none empty
  uint64_t hook_timeout_ms = 60000;
  std::vector<Nic> nics;  // qemu: in PCI order
  BootCheck boot_check;   // qemu
};

// Whether `mac` reads as six hex pairs separated by ':' and is a unicast address.
bool ValidMac(std::string_view mac);
// Whether `cidr` reads as an IPv4 address with a prefix length ("10.0.0.5/24").
bool ValidIpv4Cidr(std::string_view cidr);

// Where a spec comes from decides how strict its reading is.
enum class SpecSource {
  // A new spec (POST /vms): unknown fields, and fields of another driver, are refused.
  kNew,
  // A spec written earlier (read back from the catalog, or sent by the vault to a site):
  // unknown fields are ignored (a newer writer may add some), every known field is still
  // checked for its type and range.
  kStored,
};

// Parses and checks a whole spec (a JSON object; null reads as {}). kInvalidArgument
// naming the first bad field with `prefix` ("spec.command_name: ...").
Result<VmSpec> ParseVmSpec(const nlohmann::json& j, SpecSource source,
                           std::string_view prefix = "spec.");

// The spec in its normal form (defaults filled in, hooks as objects): what the catalog
// stores and the API shows.
nlohmann::json VmSpecJson(const VmSpec& spec);

// What a site lets the API ask it to run.
struct CommandPolicy {
  bool allow_literal = false;       // the site's allow_api_commands
  std::set<std::string> commands;   // entry names of [commands.NAME]
  std::set<std::string> qemu_args;  // entry names of [qemu_args.NAME]
};

// Checks the spec's process command and extra qemu arguments against a site's policy:
// a literal needs allow_literal (and literal qemu arguments must pass CheckQemuArgs), a
// name must be an entry. kInvalidArgument naming the field with `prefix`.
Status CheckCommands(const VmSpec& spec, const CommandPolicy& policy,
                     std::string_view prefix = "spec.");

// The fields a CommandRef is read from, for messages ("spec.command_name",
// "spec.command").
struct CommandFields {
  std::string name;
  std::string literal;
};
CommandFields ProcessCommandFields(std::string_view prefix = "spec.");
CommandFields QemuArgsFields(std::string_view prefix = "spec.");
CommandFields HookFields(std::string_view hook, std::string_view prefix = "spec.");

// Whether a host runs `ref`: a literal needs `allow_literal`, a name must satisfy
// `is_entry`. kInvalidArgument naming the field otherwise; `host` says whose file and
// setting it is ("this site's commands file", "allow_api_commands = true in its config").
struct HostRules {
  std::string_view file;           // e.g. "the site's commands file"
  std::string_view allow_setting;  // e.g. "allow_api_commands = true in the site's config"
};
Status CheckCommandRef(const CommandRef& ref, bool allow_literal,
                       const std::function<bool(const std::string&)>& is_entry,
                       const CommandFields& fields, const HostRules& host);

// The text to run for `ref`: its entry in `entries`, or its literal (after
// CheckCommandRef with the same rules).
Result<std::string> ResolveCommand(const CommandRef& ref,
                                   const std::map<std::string, std::string>& entries,
                                   bool allow_literal, const CommandFields& fields,
                                   const HostRules& host);

inline constexpr HostRules kSiteRules = {"the site's commands file (commands_file in its config)",
                                         "allow_api_commands = true in the site's config (a lab)"};

}  // namespace osr::hypervisor
