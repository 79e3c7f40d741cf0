// Pre-checks: what a workflow needs of this site, asked before it changes anything
// (Site::CheckTarget; docs/api.md, "Checks before acting").
#include <fmt/format.h>

#include "common/file.h"
#include "common/units.h"
#include "site/site.h"

namespace osr::site {

using nlohmann::json;

namespace {

json Passed(std::string_view name, std::string message) {
  return {{"name", name}, {"result", "passed"}, {"message", std::move(message)}};
}
json Warning(std::string_view name, std::string message) {
  return {{"name", name}, {"result", "warning"}, {"message", std::move(message)}};
}
json Failed(std::string_view name, std::string message) {
  return {{"name", name}, {"result", "failed"}, {"message", std::move(message)}};
}

}  // namespace

json Site::CheckTarget(const TargetNeeds& needs) {
  json checks = json::array(), creates = json::array(), uses = json::array();
  checks.push_back(Passed("site", "site " + cfg_.name + " answers"));

  // Names free.
  if (needs.name_free != TargetNeeds::FreeName::kNone) {
    bool group = needs.name_free == TargetNeeds::FreeName::kGroup;
    bool taken;
    {
      std::lock_guard lock(mu_);
      taken = group ? groups_.count(needs.vm) != 0
                    : stores_.count(needs.vm) != 0 || damaged_stores_.count(needs.vm) != 0;
    }
    std::string what = group ? "VM disks" : "recovery store";
    checks.push_back(taken ? Failed("names", fmt::format("site {} already has {} named {}",
                                                         cfg_.name, what, needs.vm))
                           : Passed("names", fmt::format("no {} named {} at {} yet", what, needs.vm,
                                                         cfg_.name)));
    if (!taken) creates.push_back(fmt::format("{} {} (new)", what, needs.vm));
  }

  // The point's disks, from the store (a drill or failover there gets them, not today's).
  json point_disks;
  uint64_t bytes_full = needs.bytes_full;
  if (needs.seq) {
    std::shared_ptr<store::RecoveryStore> store;
    {
      std::lock_guard lock(mu_);
      if (auto it = stores_.find(needs.vm); it != stores_.end()) store = it->second;
    }
    if (store) {
      point_disks = json::array();
      bytes_full = 0;
      for (const store::StoreDisk& d : store->DisksAt(*needs.seq)) {
        point_disks.push_back({{"name", d.name}, {"size_bytes", d.size_bytes}});
        bytes_full += d.size_bytes;
      }
    }
  }

  // Space: what the workflow writes now, and the whole it may grow to.
  if (needs.bytes_needed > 0 || bytes_full > 0) {
    auto space = FileSystemSpace(cfg_.data_dir);
    if (!space.ok()) {
      checks.push_back(Failed("space", "cannot read the free space of " + cfg_.data_dir + ": " +
                                           space.status().message()));
    } else {
      uint64_t free = space->free_bytes;
      // What "now" is made of, when part of it is the journal's headroom (a rule of thumb).
      std::string parts = needs.bytes_headroom == 0
                              ? std::string()
                              : fmt::format(" ({} the disks hold + {} journal headroom)",
                                            FormatSize(needs.bytes_needed - needs.bytes_headroom),
                                            FormatSize(needs.bytes_headroom));
      json c;
      if (free < needs.bytes_needed) {
        c = Failed("space", fmt::format("{} has {} free; this needs {} now{}", cfg_.data_dir,
                                        FormatSize(free), FormatSize(needs.bytes_needed), parts));
      } else if (free < bytes_full) {
        c = Warning("space",
                    fmt::format("{} has {} free: enough for the {} needed now{}, not for "
                                "the disks' full size ({})",
                                cfg_.data_dir, FormatSize(free), FormatSize(needs.bytes_needed),
                                parts, FormatSize(bytes_full)));
      } else {
        c = Passed("space",
                   fmt::format("{} has {} free; this needs {} now{}, {} at most", cfg_.data_dir,
                               FormatSize(free), FormatSize(needs.bytes_needed), parts,
                               FormatSize(bytes_full)));
      }
      c["free_bytes"] = free;
      c["needed_bytes"] = needs.bytes_needed;
      c["full_bytes"] = bytes_full;
      checks.push_back(c);
    }
  }

  json out = {{"site", cfg_.name}};
  if (!point_disks.is_null()) out["point_disks"] = point_disks;
  auto answer = [&] {
    out["checks"] = checks;
    out["creates"] = creates;
    out["uses"] = uses;
    return out;
  };
  if (needs.spec.is_null()) return answer();
  auto parsed = hypervisor::ParseVmSpec(needs.spec, hypervisor::SpecSource::kStored);
  if (!parsed.ok()) {
    checks.push_back(Failed("spec", parsed.status().message()));
    return answer();
  }
  const hypervisor::VmSpec& spec = *parsed;

  // The hypervisor and what it runs.
  if (spec.driver == hypervisor::Driver::kQemu) {
    auto binary = hypervisor::FindExecutable(cfg_.qemu_binary);
    if (!binary.ok()) {
      checks.push_back(Failed("hypervisor", binary.status().message() + " (qemu_binary)"));
    } else if (spec.accel == "kvm" && !hypervisor::KvmUsable()) {
      checks.push_back(Failed("hypervisor", fmt::format("the VM asks for KVM (accel kvm) and {} "
                                                        "has none usable (/dev/kvm, VT-x/AMD-V)",
                                                        cfg_.name)));
    } else if (spec.accel.empty() && !hypervisor::KvmUsable()) {
      checks.push_back(Warning("hypervisor", fmt::format("{}; no KVM here: the VM runs under TCG "
                                                         "(emulation, much slower)",
                                                         *binary)));
    } else {
      checks.push_back(
          Passed("hypervisor", fmt::format("{} with {}", *binary,
                                           spec.accel.empty() ? std::string("kvm") : spec.accel)));
    }
  }
  if (spec.driver != hypervisor::Driver::kNone) {
    Result<std::string> what = spec.driver == hypervisor::Driver::kProcess
                                   ? cfg_.commands.ProcessCommand(spec)
                                   : cfg_.commands.QemuArgs(spec);
    checks.push_back(what.ok() ? Passed("commands", "what the VM runs is allowed here")
                               : Failed("commands", what.status().message()));
  }

  // Networks: every NIC's network mapped in `role`, its bridge there (or to be made).
  if (!spec.nics.empty()) {
    auto plan = PlanNetworks(spec.nics, cfg_.networks, needs.role, cfg_.name, needs.vm);
    if (!plan.ok()) {
      checks.push_back(Failed("networks", plan.status().message()));
    } else {
      std::string failed;
      if (!plan->taps.empty()) {
        if (Status cap = CheckNetAdmin(); !cap.ok()) failed = cap.message();
      }
      for (auto& tap : plan->taps) {
        if (!failed.empty()) break;
        auto ready = CheckBridge(tap);
        if (!ready.ok()) {
          failed = ready.status().message();
          break;
        }
        if (!*ready) creates.push_back("drill bridge " + tap.bridge + " (new, no uplink)");
        // A drill's TAP is named after its view, which does not exist yet.
        creates.push_back(needs.role == NetRole::kDrill
                              ? "a TAP on bridge " + tap.bridge + " (new)"
                              : "TAP " + tap.name + " on bridge " + tap.bridge + " (new)");
      }
      std::string attached;
      for (auto& n : plan->nics) {
        attached += (attached.empty() ? "" : "; ") + n.network + " → " + n.attach;
        uses.push_back(
            fmt::format("{} network {}: {}", NetRoleName(needs.role), n.network, n.attach));
      }
      checks.push_back(failed.empty() ? Passed("networks", attached) : Failed("networks", failed));
    }
  }
  return answer();
}

}  // namespace osr::site
