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

void Vault::RunCommit(JobRow& job, ItemRow item, JobCancel& cancel) {
  Steps steps(catalog_.get(), &job, &cancel);
  auto dst = catalog_->Site(item.target);
  if (!dst) return steps.Fail(NotFound("site " + item.target + " is not registered"));
  item.state = ItemState::kCommitting;
  if (Status st = catalog_->PutItem(item); !st.ok()) return steps.Fail(st);  // nothing done yet
  auto back = [&](const Status& st) {
    item.state = ItemState::kFailedOver;  // commit again to go on from where it stopped
    steps.Fail(AlsoFailed(st, "recording the item as FailedOver", catalog_->PutItem(item)));
  };
  steps.Begin(
      fmt::format("Copy the rest of the point into the disks at {} (the VM runs on)", item.target));
  auto m = Client(*dst).Call("POST", "/groups/" + job.vm + "/materialise");
  if (!m.ok()) return back(m.status());
  auto stalled_since = std::chrono::steady_clock::now();
  uint64_t last_done = UINT64_MAX;
  for (;;) {
    if (Status c = steps.Check(); !c.ok()) {
      return back(c.code() == Code::kCancelled
                      ? steps.Cancelled(fmt::format(
                            "the VM runs on at {} on its point and {} may finish the copy by "
                            "itself; the item is FailedOver again: commit again to go on (it "
                            "resumes), or change the point",
                            item.target, item.target))
                      : c);
    }
    auto g = Client(*dst).Call("GET", "/groups/" + job.vm);
    if (!g.ok() && g.status().code() == Code::kUnavailable) {
      // The site is away for a moment (a restart): wait for it, as long as any stall.
      steps.Progress(job.progress,
                     fmt::format("waiting for {}: {}", item.target, g.status().message()));
      if (std::chrono::steady_clock::now() - stalled_since >
          std::chrono::milliseconds(cfg_.job_wait_ms_max)) {
        return back(g.status());
      }
      (void)steps.Sleep(std::chrono::milliseconds(500));
      continue;
    }
    if (!g.ok()) return back(g.status());
    json_in::Fields gf(*g, "site " + item.target + " group " + job.vm + ".");
    const json* mat = gf.Object("materialise");
    json none = json::object();
    json_in::Fields mf(mat != nullptr ? *mat : none,
                       "site " + item.target + " group " + job.vm + ".materialise.");
    std::string state = mf.String("state", "");
    uint64_t done = mf.U64("done_bytes", 0);
    uint64_t total = mf.U64("total_bytes", 0);
    std::string error = mf.String("error", "");
    if (!gf.ok() || !mf.ok()) return back(!gf.ok() ? gf.status() : mf.status());
    if (state == "done") {
      // The numbers of the answer that says it is done: the last ones (not those of the
      // poll before, which may be far behind).
      steps.Progress(80, total > 0 ? fmt::format("{} of {} bytes", done, total)
                                   : std::string("nothing left to copy"));
      break;
    }
    if (state == "failed") {
      return back(Internal("materialising failed: " + error));
    }
    if (state.empty()) {  // the site restarted: start it again (it resumes)
      m = Client(*dst).Call("POST", "/groups/" + job.vm + "/materialise");
      if (!m.ok()) return back(m.status());
    }
    if (done != last_done) {
      last_done = done;
      stalled_since = std::chrono::steady_clock::now();
    } else if (std::chrono::steady_clock::now() - stalled_since >
               std::chrono::milliseconds(cfg_.job_wait_ms_max)) {
      return back(Unavailable("materialising made no progress"));
    }
    if (total > 0) {
      steps.Progress(static_cast<int>(80 * done / total),
                     fmt::format("{} of {} bytes", done, total));
    }
    (void)steps.Sleep(std::chrono::milliseconds(100));  // a stop is seen at the loop's top
  }
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

}  // namespace osr::vault
