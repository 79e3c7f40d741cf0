// The vault's part in leading (vault/lease.h): what starts when this instance takes the
// lease (resumed jobs, the queue, the job workers, the point loop, the job poll), what
// stops when it loses it, the poll that takes in jobs and cancels other vaults received,
// and GET /vault.
#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <set>
#include <thread>

#include "common/json_in.h"
#include "common/units.h"
#include "vault/vault.h"

namespace osr::vault {

using nlohmann::json;

namespace {

constexpr int kJobPollMs = 300;  // how soon a job submitted through a follower starts

std::string HostName() {
  char name[256] = {};
  if (gethostname(name, sizeof(name) - 1) != 0) return "unknown";
  return name;
}

std::string TimeOfMs(int64_t ms) {
  return FormatTimeNs(ms * 1000000);
}

}  // namespace

Status Vault::StartLease() {
  LeaseConfig lc;
  lc.db = cfg_.db_path;
  lc.ttl_ms = cfg_.lease_ttl_ms;
  lc.token_floor = cfg_.lease_token_floor;
  lc.host = HostName();
  lc.api = fmt::format("{}:{}", api_->address().host, api_->address().port);
  LeaseKeeper::Callbacks callbacks;
  // Jobs resumed by the attempt of the vault's start say that the vault restarted; those
  // of a later term, that another vault took over. (The flag is set before the keeper's
  // thread starts, which makes it visible there.)
  callbacks.gained = [this](LeaseFence& fence) {
    return BecomeLeader(fence, !lease_thread_started_);
  };
  callbacks.lost = [this] { StopLeaderWork(); };
  OSR_ASSIGN_OR_RETURN(lease_, LeaseKeeper::Open(lc, callbacks));
  OSR_ASSIGN_OR_RETURN(bool led, lease_->TryLead());
  if (!led) spdlog::info("vault: another instance leads; this one serves the API and follows");
  lease_thread_started_ = true;
  lease_->Start();
  return Status::Ok();
}

void Vault::StopLease() {
  if (lease_) lease_->Stop();
}

Status Vault::BecomeLeader(LeaseFence& fence, bool at_start) {
  OSR_RETURN_IF_ERROR(ResumeRunningJobs(at_start));
  OSR_ASSIGN_OR_RETURN(std::vector<JobRow> queued, catalog_->ListJobs("", JobState::kQueued));
  {
    std::lock_guard lock(mu_);
    queue_.clear();
    for (auto& j : queued) {
      if (!j.cancel_requested) queue_.push_back({j.id, j.vm});  // the poll cancels the others
    }
    leading_ = true;
    leader_stop_ = false;
  }
  LeaseFence* f = &fence;  // borrowed: the threads end (StopLeaderWork) before the term does
  for (int i = 0; i < std::max(1, cfg_.job_workers); ++i) {
    job_threads_.emplace_back([this, f] {
      FenceScope fenced(f);
      JobLoop();
    });
  }
  point_thread_ = std::thread([this, f] {
    FenceScope fenced(f);
    PointLoop();
  });
  job_poll_thread_ = std::thread([this, f] {
    FenceScope fenced(f);
    JobPollLoop();
  });
  cv_.notify_all();
  return Status::Ok();
}

void Vault::StopLeaderWork() {
  {
    std::lock_guard lock(mu_);
    leading_ = false;
    leader_stop_ = true;
    // The running jobs end their waits now and write nothing (the fence is lost): they
    // stay Running in the catalog for the vault that leads to resume.
    for (auto& [id, cancel] : running_) cancel->Cancel(JobCancel::Reason::kLeaseLost);
    queue_.clear();
  }
  cv_.notify_all();
  for (auto& t : job_threads_) {
    if (t.joinable()) t.join();
  }
  job_threads_.clear();
  if (point_thread_.joinable()) point_thread_.join();
  if (job_poll_thread_.joinable()) job_poll_thread_.join();
  std::lock_guard lock(mu_);
  leader_stop_ = false;
}

Status Vault::ResumeRunningJobs(bool at_start) {
  static const std::set<std::string> kResumable = {"enable-protection", "failover", "change-point",
                                                   "commit", "reprotect"};
  OSR_ASSIGN_OR_RETURN(std::vector<JobRow> running, catalog_->ListJobs("", JobState::kRunning));
  for (auto& j : running) {
    j.updated_ns = NowNs();
    // The step under way when the vault stopped ends here, saying so (it is done again,
    // or the job ends, below); no step is left Running beside the ones that follow.
    for (auto& step : j.steps) {
      if (!step.is_object()) continue;
      json_in::Fields sf(step);  // a row read back is input: no throwing accessors
      std::string state = sf.String("state", ""), was = sf.String("message", "");
      if (!sf.ok() || state != "Running") continue;
      step["state"] = JobStateName(JobState::kFailed);
      step["message"] = "cut short: the vault stopped" + (was.empty() ? "" : " (at: " + was + ")");
    }
    if (kResumable.count(j.type)) {
      j.state = JobState::kQueued;
      j.steps.push_back({{"name", at_start ? "The vault restarted: resuming"
                                           : "Another vault took over: resuming"},
                         {"state", JobStateName(JobState::kSucceeded)},
                         {"message", at_start ? "" : "vault instance " + lease_->id()}});
      json_in::Fields af(j.args);
      j.args["resumed"] = af.I64("resumed", 0) + 1;
    } else {
      j.state = JobState::kFailed;
      j.error =
          "the vault stopped while this job ran; the item was left as the last finished "
          "step left it — run the operation again";
    }
    // Unrecorded, the job would stay Running and never be queued again: leading fails.
    if (Status st = catalog_->UpdateJob(j); !st.ok()) {
      return Status(st.code(),
                    fmt::format("job {}: recording its restart: {}", j.id, st.message()));
    }
  }
  return Status::Ok();
}

void Vault::JobPollLoop() {
  for (;;) {
    {
      std::unique_lock lock(mu_);
      if (cv_.wait_for(lock, std::chrono::milliseconds(kJobPollMs),
                       [&] { return stop_ || leader_stop_; })) {
        return;
      }
    }
    PollJobs();
  }
}

void Vault::PollJobs() {
  auto queued = catalog_->ListJobs("", JobState::kQueued);
  auto running = catalog_->ListJobs("", JobState::kRunning);
  if (!queued.ok() || !running.ok()) return;  // logged by the next read that fails again
  std::vector<int64_t> cancel_queued;
  bool added = false;
  {
    std::lock_guard lock(mu_);
    for (const JobRow& j : *queued) {
      auto in_queue = std::find_if(queue_.begin(), queue_.end(),
                                   [&](const QueuedJob& q) { return q.id == j.id; });
      if (j.cancel_requested) {
        if (in_queue != queue_.end()) queue_.erase(in_queue);
        if (!running_.count(j.id)) cancel_queued.push_back(j.id);
        continue;
      }
      if (in_queue != queue_.end() || running_.count(j.id)) continue;
      // In id order: one VM's jobs run in the order they were submitted.
      auto at = std::find_if(queue_.begin(), queue_.end(),
                             [&](const QueuedJob& q) { return q.id > j.id; });
      queue_.insert(at, {j.id, j.vm});
      added = true;
    }
    for (const JobRow& j : *running) {
      auto r = running_.find(j.id);
      if (j.cancel_requested && r != running_.end())
        r->second->Cancel(JobCancel::Reason::kCancelled);
    }
  }
  if (added) cv_.notify_all();
  for (int64_t id : cancel_queued) {
    LogIfFailed(
        catalog_->CancelQueuedJob(id, "cancelled before it started: nothing was changed", NowNs())
            .status(),
        fmt::format("job {}: recording its cancel", id));
  }
}

Result<bool> Vault::RequestCancelElsewhere(const JobRow& job) {
  if (JobEnded(job.state)) return false;
  OSR_ASSIGN_OR_RETURN(bool cancelled,
                       catalog_->CancelQueuedJob(
                           job.id, "cancelled before it started: nothing was changed", NowNs()));
  if (cancelled) return true;
  // Running at the vault that leads: the row asks it, and it stops at its next wait.
  return catalog_->RequestJobCancel(job.id);
}

bool Vault::WaitJobEndedInCatalog(int64_t id) {
  constexpr int kPollMs = 100;
  auto deadline =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(cfg_.job_cancel_wait_ms_max);
  for (;;) {
    auto j = catalog_->FindJob(id);
    if (j.ok() && (!j->has_value() || JobEnded((*j)->state))) return true;
    if (std::chrono::steady_clock::now() >= deadline || stopping_) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(kPollMs));
  }
}

Result<json> Vault::ShowVault() {
  OSR_ASSIGN_OR_RETURN(LeaseRow lease, catalog_->ReadLease());
  OSR_ASSIGN_OR_RETURN(std::vector<InstanceRow> instances, catalog_->ListInstances());
  bool held = !lease.holder.empty() && lease.expires_ms > lease.now_ms;
  json list = json::array();
  for (const auto& i : instances) {
    list.push_back({{"id", i.id},
                    {"host", i.host},
                    {"api", i.api},
                    {"started", TimeOfMs(i.started_ms)},
                    {"renewed", TimeOfMs(i.renewed_ms)},
                    // Renewed within two TTLs (of this instance's setting): it runs.
                    {"alive", i.renewed_ms >= lease.now_ms - 2 * int64_t{lease_->ttl_ms()}},
                    {"leader", held && i.id == lease.holder}});
  }
  json leader = nullptr;
  if (held) {
    leader = {{"id", lease.holder},
              {"token", lease.token},
              {"since", TimeOfMs(lease.since_ms)},
              {"expires", TimeOfMs(lease.expires_ms)}};
  }
  bool leading = false;
  {
    std::lock_guard lock(mu_);
    leading = leading_;
  }
  return json{{"instances", list},
              {"leader", leader},
              {"this",
               {{"id", lease_->id()},
                {"role", leading ? "leader" : "follower"},
                {"lease_ttl_ms", lease_->ttl_ms()},
                {"fenced_writes", catalog_->fenced_writes()}}}};
}

}  // namespace osr::vault
