#include "hypervisor/vm_spec.h"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <vector>

#include "common/json_in.h"
#include "hypervisor/qemu_args.h"

namespace osr::hypervisor {

using nlohmann::json;

namespace {

// The driver-independent fields, then each driver's own.
const std::vector<std::string_view> kCommonKeys = {"driver", "shutdown_timeout_ms", "hooks",
                                                   "hook_timeout_ms"};
const std::vector<std::string_view> kProcessKeys = {"command", "command_name"};
const std::vector<std::string_view> kQemuKeys = {"qemu_args", "qemu_args_name", "memory_bytes",
                                                 "cpus",      "guest_agent",    "accel",
                                                 "nics",      "boot_check"};

bool In(const std::vector<std::string_view>& keys, std::string_view k) {
  return std::find(keys.begin(), keys.end(), k) != keys.end();
}

bool IsHook(std::string_view k) {
  return std::find(std::begin(kHookNames), std::end(kHookNames), k) != std::end(kHookNames);
}

// A literal command: no NUL (it would cut the command short), bounded.
void CheckLiteral(json_in::Fields& f, std::string_view key, const std::string& text) {
  if (text.size() > kCommandBytesMax) {
    f.Fail(key, fmt::format("{} bytes, more than the {} allowed", text.size(), kCommandBytesMax));
  } else if (text.find('\0') != std::string::npos) {
    f.Fail(key, "has a NUL character");
  }
}

void CheckEntryName(json_in::Fields& f, std::string_view key, const std::string& name) {
  if (!name.empty() && !ValidName(name)) {
    f.Fail(key,
           "is not an entry name (1-64 characters of [A-Za-z0-9._-], not starting with . or -)");
  }
}

// A CommandRef from two fields of one object: `name_key` (an entry) or `literal_key`.
CommandRef ReadRef(json_in::Fields& f, std::string_view name_key, std::string_view literal_key) {
  CommandRef r;
  r.name = f.String(name_key, "");
  r.literal = f.String(literal_key, "");
  CheckEntryName(f, name_key, r.name);
  CheckLiteral(f, literal_key, r.literal);
  if (!r.name.empty() && !r.literal.empty()) {
    f.Fail(name_key, fmt::format("give {} or {}, not both", name_key, literal_key));
  }
  return r;
}

// spec.hooks: {HOOK: {"name": ENTRY} | {"command": "..."} | "..."}; a bare string is the
// shape specs had before allow-lists (a literal command).
Status ReadHooks(const json& hooks, SpecSource source, const std::string& prefix, VmSpec& spec) {
  for (auto& [hook, v] : hooks.items()) {
    std::string key = prefix + "hooks." + hook;
    if (!IsHook(hook)) {
      if (source == SpecSource::kStored) continue;
      return InvalidArgument(key + ": is not a hook (freeze, thaw, pre_failover, post_failover)");
    }
    json as_object = v.is_string() ? json{{"command", v}} : v.is_null() ? json::object() : v;
    if (!as_object.is_object()) {
      return InvalidArgument(key + R"(: must be {"name": ENTRY} or {"command": "..."})");
    }
    json_in::Fields hf(as_object, key + ".");
    if (source == SpecSource::kNew) {
      for (auto& [k, unused] : as_object.items()) {
        if (k != "name" && k != "command") hf.Fail(k, "is not a field of a hook (name, command)");
      }
    }
    CommandRef r = ReadRef(hf, "name", "command");
    if (!hf.ok()) return hf.status();
    if (!r.empty()) spec.hooks[hook] = std::move(r);
  }
  return Status::Ok();
}

// spec.nics: [{mac, model?, network, ip?: {SITE: CIDR}}].
Status ReadNics(const json& nics, SpecSource source, const std::string& prefix, VmSpec& spec) {
  if (nics.size() > kNicsMax) {
    return InvalidArgument(
        fmt::format("{}nics: {} NICs, at most {}", prefix, nics.size(), kNicsMax));
  }
  for (size_t i = 0; i < nics.size(); ++i) {
    std::string key = fmt::format("{}nics[{}]", prefix, i);
    if (!nics[i].is_object()) return InvalidArgument(key + ": must be an object");
    json_in::Fields nf(nics[i], key + ".");
    Nic nic;
    nic.mac = nf.String("mac");
    nic.model = nf.String("model", nic.model);
    nic.network = nf.String("network");
    const json* ip = nf.Object("ip");
    if (source == SpecSource::kNew) nf.RefuseOthers();
    if (!nf.ok()) return nf.status();
    if (!ValidMac(nic.mac)) {
      return InvalidArgument(key + ".mac: must be a unicast MAC address like 52:54:00:12:34:56");
    }
    for (auto& c : nic.mac) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (std::find(std::begin(kNicModels), std::end(kNicModels), nic.model) ==
        std::end(kNicModels)) {
      return InvalidArgument(key + ".model: must be virtio-net-pci, e1000, e1000e or rtl8139");
    }
    if (!ValidName(nic.network)) {
      return InvalidArgument(key +
                             ".network: is not a network name (1-64 characters of "
                             "[A-Za-z0-9._-], not starting with . or -)");
    }
    for (size_t j = 0; j < spec.nics.size(); ++j) {
      if (spec.nics[j].mac == nic.mac) {
        return InvalidArgument(fmt::format("{}.mac: {} is also nics[{}].mac", key, nic.mac, j));
      }
    }
    if (ip != nullptr) {
      for (auto& [site, v] : ip->items()) {
        if (!ValidName(site))
          return InvalidArgument(key + ".ip: '" + site + "' is not a site name");
        if (!v.is_string() || !ValidIpv4Cidr(v.get_ref<const std::string&>())) {
          return InvalidArgument(key + ".ip." + site +
                                 ": must be an IPv4 address/prefix like 10.0.0.5/24");
        }
        nic.ip_by_site[site] = v.get<std::string>();
      }
    }
    spec.nics.push_back(std::move(nic));
  }
  return Status::Ok();
}

Status ReadBootCheck(const json& bc, SpecSource source, const std::string& prefix, VmSpec& spec) {
  json_in::Fields bf(bc, prefix + "boot_check.");
  spec.boot_check.console_line = bf.String("console_line", "");
  spec.boot_check.timeout_ms =
      bf.U64("timeout_ms", spec.boot_check.timeout_ms,
             {.min = kBootCheckTimeoutMsMin, .max = kBootCheckTimeoutMsMax});
  if (source == SpecSource::kNew) bf.RefuseOthers();
  if (!bf.ok()) return bf.status();
  const std::string& line = spec.boot_check.console_line;
  if (line.size() > kConsoleLineBytesMax) {
    return InvalidArgument(fmt::format("{}boot_check.console_line: {} bytes, at most {}", prefix,
                                       line.size(), kConsoleLineBytesMax));
  }
  if (std::any_of(line.begin(), line.end(),
                  [](char c) { return c == '\n' || c == '\r' || c == '\0'; })) {
    return InvalidArgument(prefix + "boot_check.console_line: must be one line");
  }
  // Without a console line and without the guest agent nothing can answer: a drill then
  // reports NotChecked (docs/api.md).
  return Status::Ok();
}

}  // namespace

bool ValidMac(std::string_view mac) {
  if (mac.size() != 17) return false;
  for (size_t i = 0; i < 17; ++i) {
    if (i % 3 == 2) {
      if (mac[i] != ':') return false;
    } else if (!std::isxdigit(static_cast<unsigned char>(mac[i]))) {
      return false;
    }
  }
  int first = std::stoi(std::string(mac.substr(0, 2)), nullptr, 16);
  return (first & 1) == 0 && mac != "00:00:00:00:00:00";
}

bool ValidIpv4Cidr(std::string_view cidr) {
  auto slash = cidr.find('/');
  if (slash == std::string_view::npos || slash + 1 >= cidr.size() || cidr.size() - slash > 3) {
    return false;
  }
  int parts = 0;
  size_t i = 0;
  while (i < slash) {
    size_t j = i;
    int v = 0;
    while (j < slash && j - i < 4 && std::isdigit(static_cast<unsigned char>(cidr[j]))) {
      v = v * 10 + (cidr[j] - '0');
      ++j;
    }
    if (j == i || j - i > 3 || v > 255 || (j - i > 1 && cidr[i] == '0')) return false;
    ++parts;
    if (j < slash) {
      if (cidr[j] != '.') return false;
      ++j;
    }
    i = j;
  }
  if (parts != 4 || cidr[slash - 1] == '.') return false;
  int prefix = 0;
  for (size_t k = slash + 1; k < cidr.size(); ++k) {
    if (!std::isdigit(static_cast<unsigned char>(cidr[k]))) return false;
    prefix = prefix * 10 + (cidr[k] - '0');
  }
  return prefix >= 1 && prefix <= 32;
}

std::string_view DriverName(Driver d) {
  switch (d) {
    case Driver::kNone:
      return "none";
    case Driver::kProcess:
      return "process";
    case Driver::kQemu:
      return "qemu";
  }
  return "none";
}

Result<VmSpec> ParseVmSpec(const json& j, SpecSource source, std::string_view prefix_in) {
  static const json kEmpty = json::object();
  const json& obj = j.is_null() ? kEmpty : j;
  std::string prefix(prefix_in);
  json_in::Fields f(obj, prefix);
  VmSpec spec;
  std::string driver = f.String("driver", "none");
  if (driver == "process") {
    spec.driver = Driver::kProcess;
  } else if (driver == "qemu") {
    spec.driver = Driver::kQemu;
  } else if (driver != "none") {
    f.Fail("driver", "must be qemu, process or none");
  }
  if (!f.ok()) return f.status();
  if (source == SpecSource::kNew) {
    for (auto& [k, unused] : obj.items()) {
      bool mine = In(kCommonKeys, k) || (spec.driver == Driver::kProcess && In(kProcessKeys, k)) ||
                  (spec.driver == Driver::kQemu && In(kQemuKeys, k));
      if (mine) continue;
      if (In(kProcessKeys, k)) {
        f.Fail(k, "is only for driver process");
      } else if (In(kQemuKeys, k)) {
        f.Fail(k, "is only for driver qemu");
      } else {
        f.Fail(k, "is not a field of a VM spec (docs/api.md)");
      }
    }
  }
  spec.shutdown_timeout_ms =
      f.U64("shutdown_timeout_ms", spec.shutdown_timeout_ms, {.max = kShutdownTimeoutMsMax});
  spec.hook_timeout_ms = f.U64("hook_timeout_ms", spec.hook_timeout_ms,
                               {.min = kHookTimeoutMsMin, .max = kHookTimeoutMsMax});
  const json* hooks = f.Object("hooks");
  const json* nics = nullptr;
  const json* boot_check = nullptr;
  if (spec.driver == Driver::kProcess) {
    spec.command = ReadRef(f, "command_name", "command");
    if (f.ok() && spec.command.empty()) {
      f.Fail("command_name",
             "is missing: a process VM runs an entry of its site's commands file (or, on a lab "
             "site, spec.command)");
    }
  } else if (spec.driver == Driver::kQemu) {
    spec.qemu_args = ReadRef(f, "qemu_args_name", "qemu_args");
    if (f.ok() && !spec.qemu_args.literal.empty()) {
      if (Status st = CheckQemuArgsText(spec.qemu_args.literal); !st.ok()) {
        f.Fail("qemu_args", st.message());
      }
    }
    spec.memory_bytes =
        f.U64("memory_bytes", spec.memory_bytes, {.min = kMemoryBytesMin, .max = kMemoryBytesMax});
    if (f.ok() && spec.memory_bytes % (1u << 20) != 0) {
      f.Fail("memory_bytes", "must be a whole number of MiB");
    }
    spec.cpus = f.U64("cpus", spec.cpus, {.min = 1, .max = kCpusMax});
    spec.guest_agent = f.Bool("guest_agent", spec.guest_agent);
    spec.accel = f.String("accel", "");
    if (f.ok() && !spec.accel.empty() && spec.accel != "kvm" && spec.accel != "tcg") {
      f.Fail("accel", "must be kvm or tcg (or missing: KVM when usable)");
    }
    nics = f.Array("nics");
    boot_check = f.Object("boot_check");
  }
  if (!f.ok()) return f.status();
  if (hooks != nullptr) OSR_RETURN_IF_ERROR(ReadHooks(*hooks, source, prefix, spec));
  if (nics != nullptr) OSR_RETURN_IF_ERROR(ReadNics(*nics, source, prefix, spec));
  if (boot_check != nullptr) {
    OSR_RETURN_IF_ERROR(ReadBootCheck(*boot_check, source, prefix, spec));
  }
  return spec;
}

namespace {

void PutRef(json& out, const CommandRef& r, std::string_view name_key,
            std::string_view literal_key) {
  if (!r.name.empty()) out[std::string(name_key)] = r.name;
  if (!r.literal.empty()) out[std::string(literal_key)] = r.literal;
}

}  // namespace

json VmSpecJson(const VmSpec& spec) {
  json out = {{"driver", DriverName(spec.driver)},
              {"shutdown_timeout_ms", spec.shutdown_timeout_ms},
              {"hook_timeout_ms", spec.hook_timeout_ms}};
  if (spec.driver == Driver::kProcess) PutRef(out, spec.command, "command_name", "command");
  if (spec.driver == Driver::kQemu) {
    PutRef(out, spec.qemu_args, "qemu_args_name", "qemu_args");
    out["memory_bytes"] = spec.memory_bytes;
    out["cpus"] = spec.cpus;
    out["guest_agent"] = spec.guest_agent;
    if (!spec.accel.empty()) out["accel"] = spec.accel;
    if (!spec.nics.empty()) {
      json nics = json::array();
      for (auto& n : spec.nics) {
        json nic = {{"mac", n.mac}, {"model", n.model}, {"network", n.network}};
        if (!n.ip_by_site.empty()) nic["ip"] = n.ip_by_site;
        nics.push_back(nic);
      }
      out["nics"] = nics;
    }
    out["boot_check"] = {{"console_line", spec.boot_check.console_line},
                         {"timeout_ms", spec.boot_check.timeout_ms}};
  }
  if (!spec.hooks.empty()) {
    json hooks = json::object();
    for (auto& [hook, r] : spec.hooks) {
      json h = json::object();
      PutRef(h, r, "name", "command");
      hooks[hook] = h;
    }
    out["hooks"] = hooks;
  }
  return out;
}

CommandFields ProcessCommandFields(std::string_view prefix) {
  return {fmt::format("{}command_name", prefix), fmt::format("{}command", prefix)};
}

CommandFields QemuArgsFields(std::string_view prefix) {
  return {fmt::format("{}qemu_args_name", prefix), fmt::format("{}qemu_args", prefix)};
}

CommandFields HookFields(std::string_view hook, std::string_view prefix) {
  return {fmt::format("{}hooks.{}.name", prefix, hook),
          fmt::format("{}hooks.{}.command", prefix, hook)};
}

Status CheckCommandRef(const CommandRef& ref, bool allow_literal,
                       const std::function<bool(const std::string&)>& is_entry,
                       const CommandFields& fields, const HostRules& host) {
  if (!ref.literal.empty() && !allow_literal) {
    return InvalidArgument(fmt::format(
        "{}: a command string from the API is not run here: name an entry of {} with {} (or set "
        "{})",
        fields.literal, host.file, fields.name, host.allow_setting));
  }
  if (!ref.name.empty() && !is_entry(ref.name)) {
    return InvalidArgument(
        fmt::format("{}: '{}' is not an entry of {}", fields.name, ref.name, host.file));
  }
  return Status::Ok();
}

Result<std::string> ResolveCommand(const CommandRef& ref,
                                   const std::map<std::string, std::string>& entries,
                                   bool allow_literal, const CommandFields& fields,
                                   const HostRules& host) {
  OSR_RETURN_IF_ERROR(CheckCommandRef(
      ref, allow_literal, [&](const std::string& n) { return entries.count(n) != 0; }, fields,
      host));
  if (!ref.name.empty()) return entries.at(ref.name);
  return ref.literal;
}

Status CheckCommands(const VmSpec& spec, const CommandPolicy& policy, std::string_view prefix) {
  if (spec.driver == Driver::kProcess) {
    OSR_RETURN_IF_ERROR(CheckCommandRef(
        spec.command, policy.allow_literal,
        [&](const std::string& n) { return policy.commands.count(n) != 0; },
        ProcessCommandFields(prefix), kSiteRules));
  }
  if (spec.driver == Driver::kQemu) {
    CommandFields fields = QemuArgsFields(prefix);
    OSR_RETURN_IF_ERROR(CheckCommandRef(
        spec.qemu_args, policy.allow_literal,
        [&](const std::string& n) { return policy.qemu_args.count(n) != 0; }, fields, kSiteRules));
    if (!spec.qemu_args.literal.empty()) {
      if (Status st = CheckQemuArgsText(spec.qemu_args.literal); !st.ok()) {
        return InvalidArgument(fmt::format("{}: {}", fields.literal, st.message()));
      }
    }
  }
  return Status::Ok();
}

}  // namespace osr::hypervisor
