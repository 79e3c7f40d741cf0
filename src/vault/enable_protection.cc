// The enable-protection workflow: create the recovery store, start replication, wait for
// the first copy, make the first point. A step that fails leaves the VM unprotected.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <set>

#include "common/json_in.h"
#include "common/units.h"
#include "vault/api_json.h"
#include "vault/vault.h"

namespace osr::vault {

using nlohmann::json;

// A step that fails or is cancelled leaves nothing behind: replication stopped, the store
// removed, the item deleted — the VM is unprotected again and can be protected anew. The
// job says so, or names what could not be removed.
void Vault::UndoEnableProtection(JobRow& job, Steps& steps, const SiteRow& src, const SiteRow& dst,
                                 const Status& st, ProtectionMade made) {
  bool replication_started = made.replication_started;
  bool store_made = made.store_made;
  if (steps.cancel() && steps.cancel()->ByVault()) {
    // Not the operator's wish: everything stays as it is (unprotect, or protect again).
    return steps.Fail(st);
  }
  std::vector<std::string> left;
  if (replication_started) {
    auto r = Client(src).Call("DELETE", "/groups/" + job.vm + "/replication");
    if (!r.ok() && r.status().code() != Code::kNotFound) {
      left.push_back(fmt::format("replication from {} may still run ({}): osr unprotect {}",
                                 src.name, r.status().message(), job.vm));
    }
  }
  if (store_made) {
    auto r = Client(dst).Call("DELETE", "/stores/" + job.vm);
    if (!r.ok() && r.status().code() != Code::kNotFound) {
      left.push_back(fmt::format("the recovery store at {} was kept ({}): osr unprotect {}",
                                 dst.name, r.status().message(), job.vm));
    }
  }
  if (Status d = catalog_->DeleteItem(job.vm); !d.ok()) {
    left.push_back("the item stays in the catalog (" + d.message() + "): osr unprotect " + job.vm);
  }
  std::string what =
      left.empty()
          ? fmt::format(
                "{}{}the VM is unprotected again (osr protect {} --target {})",
                replication_started ? "replication from " + src.name + " was stopped, " : "",
                store_made ? "the store at " + dst.name + " was removed; " : "", job.vm, dst.name)
          : fmt::format("{}", fmt::join(left, "; "));
  if (st.code() == Code::kCancelled) return steps.Fail(steps.Cancelled(what));
  steps.Fail(Status(st.code(), st.message() + " (" + what + ")"));
}

void Vault::RunEnableProtection(JobRow& job, ItemRow item, JobCancel& cancel) {
  Steps steps(catalog_.get(), &job, &cancel);
  auto src_row = catalog_->FindSite(item.source);
  auto dst_row = catalog_->FindSite(item.target);
  if (!src_row.ok()) return steps.Fail(src_row.status());
  if (!dst_row.ok()) return steps.Fail(dst_row.status());
  if (!*src_row || !*dst_row) return steps.Fail(NotFound("a site of the item is not registered"));
  const SiteRow& src = **src_row;
  const SiteRow& dst = **dst_row;
  auto undo = [&](const Status& st, bool replication_started, bool store_made) {
    UndoEnableProtection(job, steps, src, dst, st, {replication_started, store_made});
  };
  // The source site's disks are the truth (a disk change it finished after a restart the
  // vault did not hear of): the catalog learns them before the store is made of them.
  if (auto g = Client(src).Call("GET", "/groups/" + job.vm);
      g.ok() && g->is_object() && g->contains("disks") && !g->contains("damage")) {
    if (Status st = RecordVmDisks(job.vm, (*g)["disks"]); !st.ok()) return undo(st, false, false);
  }
  auto v_row = catalog_->FindVm(job.vm);
  if (!v_row.ok()) return undo(v_row.status(), false, false);
  const std::optional<VmRow>& v = *v_row;
  if (!v) return undo(NotFound("VM " + job.vm + " is not registered"), false, false);
  if (Status c = steps.Check(); !c.ok()) return undo(c, false, false);
  steps.Begin(fmt::format("Create the recovery store at {}", item.target));
  // "full": the disks may hold data already; their allocated regions go first.
  auto r = Client(dst).Call(
      "PUT", "/stores/" + job.vm,
      json{{"disks", v->disks}, {"start", "full"}, {"epoch", item.epoch}, {"source", item.source}});
  if (!r.ok() && r.status().code() == Code::kAlreadyExists && job.args.contains("resumed")) {
    r = json::object();  // made before the vault restarted
  }
  if (!r.ok()) return undo(r.status(), false, false);
  steps.Done(10);
  if (Status c = steps.Check(); !c.ok()) return undo(c, false, true);
  steps.Begin(fmt::format("Start replication from {}", item.source));
  r = StartReplication(item, src, dst);
  if (!r.ok()) return undo(r.status(), true, true);
  steps.Done(20);
  steps.Begin("Initial replication");
  // No deadline while it moves (a big disk under a low bandwidth limit takes its time);
  // it fails when nothing moved for job_wait_ms_max, and stops when cancelled.
  if (Status w = WaitForReplica(job.vm, src, dst, steps, 20, 95); !w.ok()) {
    return undo(
        w.code() == Code::kCancelled ? w : Status(w.code(), "initial replication: " + w.message()),
        true, true);
  }
  steps.Done(95);
  item.state = ItemState::kProtected;
  if (Status p = catalog_->PutItem(item); !p.ok()) return steps.Fail(p);
  steps.Begin("First recovery point");
  auto p = PointAtLatest(item, "crash", cfg_.job_wait_ms_max, 0, steps.cancel());
  if (!p.ok()) {
    return steps.Fail(p.status().code() == Code::kCancelled
                          ? steps.Cancelled(fmt::format(
                                "the VM is protected; points come by themselves (under its "
                                "policy {})",
                                item.policy))
                          : p.status());
  }
  steps.Done(100);
  job.state = JobState::kSucceeded;
}

}  // namespace osr::vault
