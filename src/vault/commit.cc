// The commit workflow: the failover becomes final; the old primary's disks are kept for
// reprotect. docs/architecture.md, "Failover and reprotect".
#include <fcntl.h>
#include <fmt/format.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <optional>
#include <thread>

#include "common/json_in.h"
#include "common/units.h"
#include "hypervisor/vm_spec.h"
#include "vault/api_json.h"
#include "vault/job_steps.h"
#include "vault/vault.h"
#include "vault/workflow_steps.h"

namespace osr::vault {

using nlohmann::json;

namespace {

// The "materialise" object of a site's GET /groups/VM: {state: ""|running|done|failed,
// done_bytes, total_bytes, error}.
struct MaterialiseStatus {
  std::string state;
  uint64_t done = 0;
  uint64_t total = 0;
  std::string error;
};

Result<MaterialiseStatus> ReadMaterialise(const json& group, const std::string& site,
                                          const std::string& vm) {
  json_in::Fields gf(group, "site " + site + " group " + vm + ".");
  const json* mat = gf.Object("materialise");
  json none = json::object();
  json_in::Fields mf(mat != nullptr ? *mat : none,
                     "site " + site + " group " + vm + ".materialise.");
  MaterialiseStatus m;
  m.state = mf.String("state", "");
  m.done = mf.U64("done_bytes", 0);
  m.total = mf.U64("total_bytes", 0);
  m.error = mf.String("error", "");
  if (!gf.ok()) return gf.status();
  if (!mf.ok()) return mf.status();
  return m;
}

}  // namespace

void Vault::RunCommit(JobRow& job, ItemRow item, JobCancel& cancel) {
  Steps steps(catalog_.get(), &job, &cancel);
  auto dst = RegisteredSite(item.target);
  if (!dst.ok()) return steps.Fail(dst.status());
  item.state = ItemState::kCommitting;
  if (Status st = catalog_->PutItem(item); !st.ok()) return steps.Fail(st);  // nothing done yet
  auto back = [&](const Status& st) {
    item.state = ItemState::kFailedOver;  // commit again to go on from where it stopped
    steps.Fail(AlsoFailed(st, "recording the item as FailedOver", catalog_->PutItem(item)));
  };
  steps.Begin(
      fmt::format("Copy the rest of the point into the disks at {} (the VM runs on)", item.target));
  if (Status m = Materialise(job, item, *dst, steps); !m.ok()) return back(m);
  steps.Done(80);
  steps.Begin("Delete the recovery points and the recovery store");
  auto d = Client(*dst).Call("DELETE", "/stores/" + job.vm);
  if (!d.ok() && d.status().code() != Code::kNotFound) return back(d.status());
  if (Status st = catalog_->DeletePoints(job.vm); !st.ok()) {
    // The store is gone; the points would name data that is not there. Commit again
    // deletes them (the store's DELETE then answers 404, which is taken as done).
    return back(Status(st.code(),
                       "the recovery store is deleted, but its points stay in the "
                       "catalog (commit again to delete them): " +
                           st.message()));
  }
  steps.Done(100);
  item.state = ItemState::kFailoverCommitted;
  if (Status st = catalog_->PutItem(item); !st.ok()) {
    return steps.Fail(Status(st.code(),
                             "committed, but the item's state could not be recorded "
                             "(commit again to record it): " +
                                 st.message()));
  }
  job.state = JobState::kSucceeded;
}

Status Vault::Materialise(JobRow& job, const ItemRow& item, const SiteRow& dst, Steps& steps) {
  OSR_RETURN_IF_ERROR(Client(dst).Call("POST", "/groups/" + job.vm + "/materialise").status());
  auto stalled_since = std::chrono::steady_clock::now();
  auto stalled = [&] {
    return std::chrono::steady_clock::now() - stalled_since >
           std::chrono::milliseconds(cfg_.job_wait_ms_max);
  };
  uint64_t last_done = UINT64_MAX;
  for (;;) {
    if (Status c = steps.Check(); !c.ok()) {
      if (c.code() != Code::kCancelled) return c;
      return steps.Cancelled(fmt::format(
          "the VM runs on at {} on its point and {} may finish the copy by itself; the item is "
          "FailedOver again: commit again to go on (it resumes), or change the point",
          item.target, item.target));
    }
    auto g = Client(dst).Call("GET", "/groups/" + job.vm);
    if (!g.ok() && g.status().code() == Code::kUnavailable) {
      // The site is away for a moment (a restart): wait for it, as long as any stall.
      steps.Progress(job.progress,
                     fmt::format("waiting for {}: {}", item.target, g.status().message()));
      if (stalled()) return g.status();
      // A stop or cancel ends the sleep early; the loop's top reports it.
      Status slept = steps.Sleep(std::chrono::milliseconds(500));
      (void)slept;  // a stop or cancel ends the sleep early; the loop's top reports it
      continue;
    }
    if (!g.ok()) return g.status();
    OSR_ASSIGN_OR_RETURN(MaterialiseStatus m, ReadMaterialise(*g, item.target, job.vm));
    if (m.state == "done") {
      // The numbers of the answer that says it is done: the last ones (not those of the
      // poll before, which may be far behind).
      steps.Progress(80, m.total > 0 ? fmt::format("{} of {} bytes", m.done, m.total)
                                     : std::string("nothing left to copy"));
      return Status::Ok();
    }
    if (m.state == "failed") return Internal("materialising failed: " + m.error);
    if (m.state.empty()) {  // the site restarted: start it again (it resumes)
      OSR_RETURN_IF_ERROR(Client(dst).Call("POST", "/groups/" + job.vm + "/materialise").status());
    }
    if (m.done != last_done) {
      last_done = m.done;
      stalled_since = std::chrono::steady_clock::now();
    } else if (stalled()) {
      return Unavailable("materialising made no progress");
    }
    if (m.total > 0) {
      steps.Progress(static_cast<int>(80 * m.done / m.total),
                     fmt::format("{} of {} bytes", m.done, m.total));
    }
    Status slept = steps.Sleep(std::chrono::milliseconds(100));
    (void)slept;  // a stop or cancel ends the sleep early; the loop's top reports it
  }
}

}  // namespace osr::vault
