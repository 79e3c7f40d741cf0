// Checks and a plan before acting (docs/api.md, "Checks before acting"): protect, test
// failover, failover (and failback) and reprotect first ask the site they act on whether
// it can take what they will put there (POST /api/v1/checks), and say what they will
// create and delete. A failed check refuses the action before anything changed; a dry run
// returns the plan.
#include <fmt/format.h>

#include <algorithm>
#include <map>

#include "common/json_in.h"
#include "common/units.h"
#include "vault/vault.h"
#include "vault/workflow_steps.h"

namespace osr::vault {

using nlohmann::json;

namespace {

// One check as the site sent it, read as an untrusted peer's: the known fields only.
json ReadCheck(const json& in, const std::string& site, size_t i) {
  json_in::Fields f(in, fmt::format("site {} checks[{}].", site, i));
  std::string name = f.String("name");
  std::string result = f.String("result");
  std::string message = f.String("message", "");
  if (f.ok() && result != "passed" && result != "warning" && result != "failed") {
    f.Fail("result", "must be passed, warning or failed");
  }
  if (!f.ok()) {
    return {{"name", "site"}, {"result", "failed"}, {"message", f.status().message()}};
  }
  json out = {{"name", name}, {"result", result}, {"message", message.substr(0, 2000)}};
  for (const char* k : {"free_bytes", "needed_bytes", "full_bytes"}) {
    if (f.Has(k)) out[k] = f.U64(k, 0);
  }
  return out;
}

// A list of strings the site sent (creates, uses), bounded.
json ReadStrings(const json& in, const char* key) {
  json out = json::array();
  auto it = in.find(key);
  if (it == in.end() || !it->is_array()) return out;
  for (auto& s : *it) {
    if (s.is_string() && out.size() < 64) {
      out.push_back(s.get_ref<const std::string&>().substr(0, 500));
    }
  }
  return out;
}

// What the VM loses by running on the disks of the point the site sized ("point_disks", read
// as an untrusted peer's; none: nothing): each disk it has now that the point lacks (added
// after it) or has smaller (grown after it).
json DisksThePointLacks(const json& answer, const VmRow& vm, const std::string& site) {
  json out = json::array();
  auto it = answer.find("point_disks");
  if (it == answer.end() || !it->is_array() || !vm.disks.is_array()) return out;
  std::map<std::string, uint64_t> at_point;
  for (auto& d : *it) {
    json_in::Fields f(d, "site " + site + " point_disks[].");
    std::string name = f.String("name");
    uint64_t size = f.U64("size_bytes");
    if (f.ok() && at_point.size() < 256) at_point[name] = size;
  }
  for (auto& d : vm.disks) {
    json_in::Fields f(d);
    std::string name = f.String("name");
    uint64_t size = f.U64("size_bytes");
    if (!f.ok()) continue;
    auto p = at_point.find(name);
    if (p == at_point.end()) {
      out.push_back(
          fmt::format("disk {} ({}): not at that point (added after it); the VM runs "
                      "without it there",
                      name, FormatSize(size)));
    } else if (p->second < size) {
      out.push_back(
          fmt::format("disk {}: {} at that point, {} now (grown after it); the VM "
                      "runs on the smaller one there",
                      name, FormatSize(p->second), FormatSize(size)));
    }
  }
  return out;
}

}  // namespace

uint64_t JournalHeadroomBytes(const PolicyRow& policy, uint64_t full_bytes) {
  // The journal keeps `retention_s` of writes. Without the VM's write rate, osr sizes it at
  // a tenth of the disks per day of retention (a rule of thumb; docs/api.md), at least
  // 4 MiB, at most the disks' size twice over.
  double days = std::max<double>(static_cast<double>(policy.retention_s) / 86400.0, 1.0 / 24);
  auto bytes = static_cast<uint64_t>(static_cast<double>(full_bytes) * 0.1 * days);
  return std::clamp<uint64_t>(bytes, 4ull << 20, std::max<uint64_t>(2 * full_bytes, 4ull << 20));
}

uint64_t DisksFullBytes(const VmRow& vm) {
  uint64_t full = 0;
  if (!vm.disks.is_array()) return 0;
  for (auto& d : vm.disks) full += json_in::Fields(d).U64("size_bytes", 0);
  return full;
}

json Vault::PlanAt(const SiteRow& site, const std::string& action, const std::string& vm,
                   json needs, const json& creates, const json& deletes, const VmRow* vm_now) {
  needs["vm"] = vm;
  json checks = json::array(), made = creates, uses = json::array(), dropped = deletes;
  auto r = Client(site).Call("POST", "/checks", needs);
  if (!r.ok()) {
    checks.push_back(
        {{"name", "site"},
         {"result", "failed"},
         {"message", fmt::format("site {} does not answer: {}", site.name, r.status().message())}});
  } else if (auto c = r->find("checks"); !r->is_object() || c == r->end() || !c->is_array()) {
    checks.push_back({{"name", "site"},
                      {"result", "failed"},
                      {"message", "site " + site.name + " sent no list of checks"}});
  } else {
    for (size_t i = 0; i < c->size() && i < 64; ++i)
      checks.push_back(ReadCheck((*c)[i], site.name, i));
    for (auto& s : ReadStrings(*r, "creates")) made.push_back(s);
    uses = ReadStrings(*r, "uses");
    if (vm_now != nullptr) {
      for (auto& s : DisksThePointLacks(*r, *vm_now, site.name)) dropped.push_back(s);
    }
  }
  bool ok = std::none_of(checks.begin(), checks.end(),
                         [](const json& c) { return c.value("result", "") == "failed"; });
  return {{"action", action}, {"vm", vm},        {"site", site.name}, {"ok", ok},
          {"checks", checks}, {"creates", made}, {"uses", uses},      {"deletes", dropped}};
}

Status PlanRefusal(const json& plan) {
  for (auto& c : plan.value("checks", json::array())) {
    if (c.value("result", "") != "failed") continue;
    return Status(Code::kFailedPrecondition,
                  fmt::format("{} {}: check '{}' failed at site {}: {} (nothing was changed; "
                              "--dry-run shows every check)",
                              plan.value("action", ""), plan.value("vm", ""), c.value("name", ""),
                              plan.value("site", ""), c.value("message", "")));
  }
  return Status::Ok();
}

Result<bool> GroupHasTheVmsDisks(const json& group, const VmRow& vm, const std::string& site) {
  json_in::Fields gf(group, "site " + site + " group " + vm.name + ".");
  const json* disks = gf.Array("disks");
  if (!gf.ok()) return gf.status();
  if (disks == nullptr || !vm.disks.is_array() || disks->size() != vm.disks.size()) return false;
  for (size_t i = 0; i < disks->size(); ++i) {
    json_in::Fields a((*disks)[i], "site " + site + " group disks[].");
    json_in::Fields b(vm.disks[i], "vm disks[].");
    std::string an = a.String("name"), bn = b.String("name");
    uint64_t as = a.U64("size_bytes"), bs = b.U64("size_bytes");
    if (!a.ok()) return a.status();
    if (!b.ok()) return b.status();
    if (an != bn || as != bs) return false;
  }
  return true;
}

}  // namespace osr::vault
