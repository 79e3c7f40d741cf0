// The job queue: submission (one job per VM in flight), the workers, cancellation, and the
// dispatch of a job to its workflow (RunJob). Jobs survive the vault (vault.h).
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

namespace {

// Whether job's args carry the proof its type needs to go on from a state its own steps
// recorded (item_state.h, ResumeProof).
bool JobHasProof(const JobRow& job, JobType type, const ItemRow& item) {
  json_in::Fields args(job.args, "job args.");
  switch (Info(type).proof) {
    case ResumeProof::kNone:
      return true;
    case ResumeProof::kSameEpoch:
      return job.args.contains("epoch") && args.U64("epoch", 0) == item.epoch && args.ok();
    case ResumeProof::kSwapped:
      return args.Bool("swapped", false) && args.ok();
  }
  return false;
}

}  // namespace

Result<json> Vault::ListJobs(const std::string& vm, const std::string& state) {
  std::optional<JobState> wanted;
  if (!state.empty()) {
    wanted = JobStateFromName(state);
    if (!wanted) {
      return InvalidArgument("state: '" + state +
                             "' is not a job state (Queued, Running, Succeeded, Failed, "
                             "Cancelled)");
    }
  }
  OSR_ASSIGN_OR_RETURN(std::vector<JobRow> jobs, catalog_->ListJobs(vm, wanted));
  json out = json::array();
  for (auto& j : jobs) out.push_back(JobJson(j));
  return out;
}

Result<json> Vault::ShowJob(int64_t id) {
  OSR_ASSIGN_OR_RETURN(auto j, catalog_->FindJob(id));
  if (!j) return NotFound(fmt::format("no job {}", id));
  return JobJson(*j);
}

// ---- jobs ---------------------------------------------------------------------------

Result<json> Vault::Submit(JobType type, const std::string& vm, const json& args) {
  // One operation on a VM at a time: a second one would be checked against a state the
  // first is about to change.
  std::lock_guard submitting(submit_mu_);
  for (JobState state : {JobState::kQueued, JobState::kRunning}) {
    OSR_ASSIGN_OR_RETURN(std::vector<JobRow> others, catalog_->ListJobs(vm, state));
    for (auto& other : others) {
      return Status(
          Code::kAlreadyExists,
          fmt::format("VM {} has job {} ({}) {}; wait for it (osr job wait {}) or "
                      "cancel it (osr job cancel {})",
                      vm, other.id, other.type, JobStateName(other.state), other.id, other.id));
    }
  }
  JobRow j;
  j.type = JobTypeName(type);
  j.vm = vm;
  j.state = JobState::kQueued;
  j.args = args;
  j.created_ns = j.updated_ns = NowNs();
  OSR_ASSIGN_OR_RETURN(j.id, catalog_->AddJob(j));
  {
    std::lock_guard lock(mu_);
    if (leading_) queue_.push_back({j.id, j.vm});  // else the leader's poll takes it
  }
  cv_.notify_all();
  return JobJson(j);
}

void Vault::JobLoop() {
  for (;;) {
    int64_t id;
    std::string vm;
    JobCancel cancel;  // in running_ from the pick until `release` ends
    {
      std::unique_lock lock(mu_);
      // The oldest queued job whose VM has no job running: one VM's jobs run in order,
      // different VMs' at the same time (a DR event fails many VMs over at once).
      auto pick = [&] {
        return std::find_if(queue_.begin(), queue_.end(),
                            [&](const QueuedJob& q) { return !busy_vms_.count(q.vm); });
      };
      cv_.wait(lock,
               [&] { return stop_ || leader_stop_ || (jobs_started_ && pick() != queue_.end()); });
      if (stop_ || leader_stop_) return;
      auto it = pick();
      id = it->id;
      vm = it->vm;
      queue_.erase(it);
      busy_vms_.insert(vm);
      running_[id] = &cancel;
    }
    // After the job's last row is written: whoever waits for it to stop (CancelJob,
    // Unprotect) then reads its final state.
    struct Release {
      Vault* v;
      std::string vm;
      int64_t id;
      ~Release() {
        {
          std::lock_guard lock(v->mu_);
          v->busy_vms_.erase(vm);
          v->running_.erase(id);
        }
        v->cv_.notify_all();
      }
    } release{this, vm, id};
    auto found = catalog_->FindJob(id);
    // A row that cannot be read stays Queued in the catalog: the leader's poll offers it
    // again (vault_leader.cc, PollJobs).
    LogIfFailed(found.status(), fmt::format("job {}: reading it to run it", id));
    if (!found.ok() || !found->has_value()) continue;
    std::optional<JobRow>& j = *found;
    // Taken in the catalog first: a job cancelled (or taken) meanwhile does not run.
    j->updated_ns = NowNs();
    Result<bool> claimed = catalog_->ClaimJob(id, j->updated_ns);
    LogIfFailed(claimed.status(), fmt::format("job {}: recording that it runs", id));
    if (!claimed.ok() || !*claimed) continue;
    j->state = JobState::kRunning;
    try {
      RunJob(*j, cancel);
    } catch (const std::exception& e) {
      // A bug, or a site's answer (or a stored spec) of a shape nobody expected: this
      // job fails with the reason, the vault and the other jobs go on.
      spdlog::error("job {} ({} {}): {}", j->id, j->type, j->vm, e.what());
      j->state = JobState::kFailed;
      j->error = std::string("the job stopped on unexpected data: ") + e.what();
    }
    // A job that returns without an end (a bug) must not stay Running for ever.
    if (!JobEnded(j->state)) {
      j->state = JobState::kFailed;
      if (j->error.empty()) j->error = "the job ended without a result";
    }
    j->updated_ns = NowNs();
    LogIfFailed(catalog_->UpdateJob(*j), fmt::format("job {}: recording its end", id));
    spdlog::info("job {} ({} {}): {}{}", j->id, j->type, j->vm, JobStateName(j->state),
                 j->error.empty() ? "" : ": " + j->error);
  }
}

// ---- cancelling jobs ------------------------------------------------------------------

Result<bool> Vault::RequestCancel(int64_t id) {
  {
    std::lock_guard lock(mu_);
    auto q =
        std::find_if(queue_.begin(), queue_.end(), [&](const QueuedJob& j) { return j.id == id; });
    if (q != queue_.end()) {
      queue_.erase(q);
    } else if (auto r = running_.find(id); r != running_.end()) {
      r->second->Cancel(JobCancel::Reason::kCancelled);
      return true;
    }
  }
  OSR_ASSIGN_OR_RETURN(auto j, catalog_->FindJob(id));
  if (!j) return NotFound(fmt::format("no job {}", id));
  // Taken off the queue before it ran (or queued or run by another vault).
  return RequestCancelElsewhere(*j);
}

bool Vault::WaitJobStopped(int64_t id) {
  std::unique_lock lock(mu_);
  if (!leading_ && !running_.count(id)) {
    lock.unlock();
    return WaitJobEndedInCatalog(id);  // the leader runs it
  }
  return cv_.wait_for(lock, std::chrono::milliseconds(cfg_.job_cancel_wait_ms_max),
                      [&] { return !running_.count(id); });
}

Result<json> Vault::CancelJob(int64_t id) {
  OSR_ASSIGN_OR_RETURN(bool asked, RequestCancel(id));
  if (!asked) {
    OSR_ASSIGN_OR_RETURN(auto j, catalog_->FindJob(id));
    if (!j) return NotFound(fmt::format("no job {}", id));
    // Not queued and not running here: it ended (or is being picked: say so).
    if (JobEnded(j->state)) {
      return Status(
          Code::kFailedPrecondition,
          fmt::format("job {} is {}: there is nothing to cancel", id, JobStateName(j->state)));
    }
    return Unavailable(
        fmt::format("job {} is {} and not running yet; try again", id, JobStateName(j->state)));
  }
  bool stopped = WaitJobStopped(id);
  OSR_ASSIGN_OR_RETURN(json out, ShowJob(id));
  if (!stopped) out["cancel_requested"] = true;
  return out;
}

Status Vault::CancelJobsOf(const std::string& vm) {
  std::vector<int64_t> ids;
  for (JobState state : {JobState::kQueued, JobState::kRunning}) {
    OSR_ASSIGN_OR_RETURN(std::vector<JobRow> jobs, catalog_->ListJobs(vm, state));
    for (auto& j : jobs) ids.push_back(j.id);
  }
  for (int64_t id : ids) {
    OSR_ASSIGN_OR_RETURN(bool asked, RequestCancel(id));
    if (asked && !WaitJobStopped(id)) {
      return Unavailable(fmt::format(
          "job {} of VM {} was asked to stop but is still running after {} s (a site call "
          "under way); nothing was removed: try again when it has stopped (osr job show {})",
          id, vm, cfg_.job_cancel_wait_ms_max / 1000, id));
    }
  }
  return Status::Ok();
}

void Vault::RunJob(JobRow& job, JobCancel& cancel) {
  Steps steps(catalog_.get(), &job, &cancel);
  std::optional<JobType> type = JobTypeFromName(job.type);
  if (!type) return steps.Fail(InvalidArgument("unknown job type " + job.type));
  auto found = catalog_->FindItem(job.vm);
  if (!found.ok()) return steps.Fail(found.status());  // a catalog that cannot be read
  std::optional<ItemRow>& item = *found;
  if (!item) return steps.Fail(NotFound("VM " + job.vm + " is no longer protected"));
  // The item may have moved on since the job was queued (or a resumed job finished its
  // part): a job runs only from a state it was made for (item_state.h), else it changes
  // nothing.
  if (!JobMayRun(*type, item->state, JobHasProof(job, *type, *item))) {
    return steps.Fail(InvalidArgument(
        fmt::format("VM {} is {} now: a {} job cannot run from there; nothing was changed", job.vm,
                    ItemStateName(item->state), job.type)));
  }
  switch (*type) {
    case JobType::kEnableProtection:
      return RunEnableProtection(job, *item, cancel);
    case JobType::kTestFailover:
      return RunTestFailover(job, *item, cancel);
    case JobType::kTestFailoverCleanup:
      return RunTestFailoverCleanup(job, *item, cancel);
    case JobType::kFailover:
      return RunFailover(job, *item, cancel);
    case JobType::kChangePoint:
      return RunChangePoint(job, *item, cancel);
    case JobType::kCommit:
      return RunCommit(job, *item, cancel);
    case JobType::kReprotect:
      return RunReprotect(job, *item, cancel);
  }
  steps.Fail(InvalidArgument("unknown job type " + job.type));
}

}  // namespace osr::vault
