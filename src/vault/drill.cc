// The drill (test failover) workflows: open writable disks at a recovery point on the
// recovery site, beside replication, which goes on; and clean them up. docs/api.md,
// "Test failover".
#include <fmt/format.h>

#include <chrono>

#include "common/json_in.h"
#include "common/units.h"
#include "hypervisor/vm_spec.h"
#include "vault/api_json.h"
#include "vault/item_state.h"
#include "vault/job_steps.h"
#include "vault/vault.h"
#include "vault/workflow_steps.h"

namespace osr::vault {

using nlohmann::json;

void Vault::RunTestFailover(JobRow& job, ItemRow item, JobCancel& cancel) {
  Steps steps(catalog_.get(), &job, &cancel);
  auto dst = RegisteredSite(item.target);
  if (!dst.ok()) return steps.Fail(dst.status());
  steps.Begin("Resolve the recovery point");
  auto p = ResolvePoint(item, json_in::Fields(job.args).String("point", "latest"), &cancel);
  if (!p.ok() && p.status().code() == Code::kCancelled) {
    return steps.Fail(steps.Cancelled("no drill disk was opened; the item stays Protected"));
  }
  if (!p.ok()) return steps.Fail(p.status());
  // Retention keeps the point from now on: until the item records the drill, by this
  // pin; then because the drill stands on it.
  std::optional<PointPin> pin;
  if (Status pinned = PinPoint(job.vm, p->id, "test-failover", pin); !pinned.ok()) {
    return steps.Fail(pinned);
  }
  steps.Progress(30, fmt::format("point {} (seq {}, {})", p->id, p->seq, FormatTimeNs(p->time_ns)));
  steps.Done(40);
  steps.Begin(fmt::format("Open the drill disks at {}", item.target));
  auto v = Client(*dst).Call("POST", "/stores/" + job.vm + "/views",
                             json{{"seq", p->seq}, {"writable", true}});
  if (!v.ok()) return steps.Fail(v.status());
  json_in::Fields vf(*v, "site " + item.target + " view.");
  std::string view_id = vf.String("id");
  const json* disks_in = vf.Array("disks", false);
  if (!vf.ok()) return steps.Fail(vf.status());
  json disks = *disks_in;
  steps.Done(100);
  item.state = ItemState::kTestFailoverCompleted;
  const bool start = json_in::Fields(job.args).Bool("start", false);
  item.drill = {
      {"view", view_id}, {"point", PointJson(*p)}, {"disks", disks}, {"vm_started", start}};
  if (Status st = catalog_->PutItem(item); !st.ok()) {
    // Unrecorded, nothing would name the drill disks: they are closed again.
    auto closed = Client(*dst).Call("DELETE", "/views/" + DrillView(item));
    return steps.Fail(AlsoFailed(Status(st.code(),
                                        "the drill disks were opened but could not be "
                                        "recorded, so they are closed again: " +
                                            st.message()),
                                 "closing them", closed.status()));
  }
  job.result = {{"disks", disks}, {"point", PointJson(*p)}};
  if (start) {
    bool cancelled = false;
    json vm = BootDrillVm(steps, *dst, item, view_id, &cancelled);
    job.result["drill_vm"] = vm;
    item.drill["vm"] = vm;
    if (Status st = catalog_->PutItem(item); !st.ok()) {
      steps.Warn(100, "the drill's boot result could not be recorded: " + st.message());
    }
    if (cancelled) {
      return steps.Fail(steps.Cancelled(
          "the drill is open (TestFailoverCompleted) and its VM runs on the drill disks; end it "
          "with osr test-failover-cleanup " +
          item.vm));
    }
  }
  job.state = JobState::kSucceeded;
}

Result<json> Vault::VmConsole(const std::string& name, bool drill, std::optional<uint64_t> offset,
                              uint64_t bytes) {
  OSR_ASSIGN_OR_RETURN(auto vm, catalog_->FindVm(name));
  if (!vm) return NotFound("no VM named '" + name + "' (osr vm list)");
  OSR_ASSIGN_OR_RETURN(auto item, catalog_->FindItem(name));
  std::string site = vm->site, path;
  std::string query = fmt::format("bytes={}", bytes);
  if (offset) query += fmt::format("&offset={}", *offset);
  if (drill) {
    std::string view = item ? DrillView(*item) : "";
    if (view.empty()) return NotFound("VM " + name + " has no drill (osr test-failover)");
    // (A drill recorded before vm_started existed: its view is asked.)
    if (item->drill.is_object() && item->drill.value("vm_started", json(true)) == json(false)) {
      return NotFound("the drill of VM " + name +
                      " runs no VM (osr test-failover --no-start, or driver none): it has disks "
                      "only");
    }
    site = item->target;
    path = "/views/" + view + "/console?" + query;
  } else {
    if (item && Info(item->state).failed_over) site = item->target;
    path = "/groups/" + name + "/console?" + query;
  }
  OSR_ASSIGN_OR_RETURN(auto row, catalog_->FindSite(site));
  if (!row) return NotFound("site " + site + " is not registered");
  OSR_ASSIGN_OR_RETURN(json c, Client(*row).Call("GET", path));
  json_in::Fields f(c, "site " + site + " console.");
  json out = {{"site", site},
              {"which", drill ? "drill" : "vm"},
              {"offset", f.U64("offset", 0)},
              {"next", f.U64("next", 0)},
              {"size", f.U64("size", 0)},
              {"text", f.String("text", "")},
              {"cuts", f.U64("cuts", 0)},
              {"cut_size", f.U64("cut_size", 0)}};
  if (!f.ok()) return f.status();
  return out;
}

json Vault::BootDrillVm(Steps& steps, const SiteRow& dst, const ItemRow& item,
                        const std::string& view_id, bool* cancelled) {
  auto vm = catalog_->FindVm(item.vm);
  bool process = vm.ok() && vm->has_value() && Driver(**vm) == "process";
  steps.Begin(process
                  ? fmt::format("Start the drill VM at {} (a process: no drill network)", dst.name)
                  : fmt::format("Start the drill VM at {} on the drill networks", dst.name));
  if (!vm.ok() || !vm->has_value()) {
    std::string why = vm.ok() ? "the VM is not in the catalog" : vm.status().message();
    steps.Warn(100, why);
    return {{"health", "Unhealthy"}, {"reason", "not started: " + why}};
  }
  auto started = Client(dst).Call("POST", "/views/" + view_id + "/vm/start", (*vm)->spec);
  if (!started.ok()) {
    steps.Warn(100, started.status().message());
    return {{"health", "Unhealthy"}, {"reason", "not started: " + started.status().message()}};
  }
  steps.Done(70);
  // The site runs the boot check (the console line of the spec, or the guest agent); the
  // job waits for its answer, a little longer than the check's own timeout.
  auto spec = StoredSpec(**vm);
  if (!spec.ok() || spec->driver != hypervisor::Driver::kQemu ||
      (spec->boot_check.console_line.empty() && !spec->guest_agent)) {
    // Nothing to ask: a process VM, or a QEMU VM with neither a console line nor an agent.
    steps.Progress(100,
                   "no boot check: the VM's spec names no console line and has no guest agent");
    return {{"health", "NotChecked"},
            {"reason",
             "started; no boot check (a qemu VM with boot_check.console_line or the "
             "guest agent has one)"}};
  }
  uint64_t timeout_ms = spec->boot_check.timeout_ms;
  steps.Begin(!spec->boot_check.console_line.empty()
                  ? fmt::format("Boot check: '{}' on the console", spec->boot_check.console_line)
                  : std::string("Boot check: the guest agent answers"));
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms + 30000);
  std::string state = "checking", reason;
  int64_t ms = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    if (Status s = steps.Sleep(std::chrono::milliseconds(1000)); !s.ok()) {
      *cancelled = true;
      return {{"health", "NotChecked"}, {"reason", "the job was cancelled before the check ended"}};
    }
    auto v = Client(dst).Call("GET", "/views/" + view_id);
    if (!v.ok()) continue;  // the site is away for a moment: ask again
    json_in::Fields vf(*v, "site " + dst.name + " view " + view_id + ".");
    const json* vmj = vf.Object("drill_vm");
    if (!vf.ok() || vmj == nullptr) continue;
    json_in::Fields mf(*vmj, "drill_vm.");
    const json* boot = mf.Object("boot");
    if (!mf.ok() || boot == nullptr) continue;
    json_in::Fields bf(*boot, "drill_vm.boot.");
    state = bf.String("state", "");
    reason = bf.String("reason", "");
    ms = bf.I64("ms", 0);
    if (!bf.ok()) continue;
    if (state == "healthy" || state == "unhealthy") break;
  }
  if (state != "healthy" && state != "unhealthy") {
    state = "unhealthy";
    if (reason.empty()) reason = "the site gave no answer of its boot check in time";
  }
  json out = {{"health", state == "healthy" ? "Healthy" : "Unhealthy"}, {"reason", reason}};
  if (state == "healthy") {
    out["boot_ms"] = ms;
    steps.Progress(100, fmt::format("Healthy: {} after {} ms", reason, ms));
    steps.Done(100);
    return out;
  }
  // What the console said last: the operator's first clue.
  if (auto c = Client(dst).Call("GET", "/views/" + view_id + "/console?bytes=2048"); c.ok()) {
    out["console_tail"] = json_in::Fields(*c).String("text", "");
  }
  steps.Warn(100, "Unhealthy: " + reason);
  return out;
}

void Vault::RunTestFailoverCleanup(JobRow& job, ItemRow item, JobCancel& cancel) {
  Steps steps(catalog_.get(), &job, &cancel);
  auto dst = RegisteredSite(item.target);
  if (!dst.ok()) return steps.Fail(dst.status());
  if (json_in::Fields(item.drill).Object("vm") != nullptr) {
    steps.Begin("Stop the drill VM");
    int timeout_ms = 30000;
    if (auto vm = catalog_->FindVm(item.vm); vm.ok() && vm->has_value()) {
      timeout_ms = ShutdownTimeoutMs(**vm);
    }
    auto stopped = Client(*dst).Call("POST", "/views/" + DrillView(item) + "/vm/stop",
                                     json{{"timeout_ms", timeout_ms}});
    if (!stopped.ok() && stopped.status().code() != Code::kNotFound) {
      return steps.Fail(stopped.status());
    }
    steps.Done(30);
  }
  steps.Begin("Remove the drill disks and their writes");
  auto r = Client(*dst).Call("DELETE", "/views/" + DrillView(item));
  if (!r.ok() && r.status().code() != Code::kNotFound) return steps.Fail(r.status());
  steps.Done(100);
  json drill_was = item.drill;
  item.state = ItemState::kProtected;
  item.drill = nullptr;
  if (Status st = catalog_->PutItem(item); !st.ok()) {
    return steps.Fail(Status(st.code(),
                             "the drill disks are removed, but the item still says "
                             "TestFailoverCompleted (clean up again to record it): " +
                                 st.message()));
  }
  job.result = {{"notes", json_in::Fields(job.args).String("notes", "")}};
  if (const json* vm = json_in::Fields(drill_was).Object("vm"); vm != nullptr) {
    job.result["drill_vm"] = *vm;  // the drill VM's result goes with the notes
  }
  job.state = JobState::kSucceeded;
}

}  // namespace osr::vault
