// Steps: records a job's steps and progress in the job row and the catalog as they
// happen, so that `osr job show`, the web UI and a vault restarted after a crash all see
// how far a job came.
//
// JobCancel: a running job's cancellation token. `osr job cancel`, unprotect and the
// vault's Stop set it; every step that waits (for replication, a copy, a point) waits
// through it, so a wait ends within a poll interval of the request instead of running to
// its deadline. A call to a site already under way is not interrupted: it ends by its own
// timeout (SiteClient: 30 s at most), and the job stops at its next wait or step.
//
// Thread model: a JobCancel is shared by the job's thread (waits) and the threads that
// cancel (an HTTP handler, Stop, the lease keeper); its mutex guards the reason. Made on a
// job worker, it also reads that worker's lease fence. Steps belongs to the job's
// thread.
#pragma once

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>

#include "vault/catalog.h"

namespace osr::vault {

class JobCancel {
 public:
  enum class Reason {
    kNone,
    kCancelled,      // an operator asked (osr job cancel, osr unprotect)
    kVaultStopping,  // the vault stops: the job fails, saying so (as before cancelling existed)
    kLeaseLost,      // this vault no longer leads: it stops without writing (vault/lease.h);
                     // the vault that leads now resumes the job
  };
  // Sets the reason (the first one wins) and wakes every wait.
  void Cancel(Reason why) {
    {
      std::lock_guard lock(mu_);
      if (why_ == Reason::kNone) why_ = why;
    }
    cv_.notify_all();
  }
  // A job of a leader whose fence is lost (a write of it was refused, or the lease thread
  // saw the lease gone) reads as kLeaseLost at once, before anyone cancels it: it must
  // not go on, nor undo anything, with what it knew before.
  Reason reason() const {
    std::lock_guard lock(mu_);
    if (why_ == Reason::kNone && fence_ != nullptr && fence_->lost()) return Reason::kLeaseLost;
    return why_;
  }
  // Ok while nobody asked the job to stop; else kCancelled or kUnavailable (the vault
  // stops), saying so.
  Status Check() const { return StatusOf(reason()); }
  // Whether the vault stops the job (it stops, or lost the lease), not an operator: the
  // job leaves everything as it is, to be resumed.
  bool ByVault() const {
    Reason why = reason();
    return why == Reason::kVaultStopping || why == Reason::kLeaseLost;
  }
  // Waits `d`, or less when the job is asked to stop; then Check().
  Status Sleep(std::chrono::milliseconds d) {
    {
      std::unique_lock lock(mu_);
      cv_.wait_for(lock, d, [&] { return why_ != Reason::kNone; });
    }
    return Check();
  }

 private:
  static Status StatusOf(Reason why) {
    switch (why) {
      case Reason::kNone:
        return Status::Ok();
      case Reason::kCancelled:
        return Status(Code::kCancelled, "cancelled");
      case Reason::kVaultStopping:
        return Unavailable("the vault stopped");
      case Reason::kLeaseLost:
        return Unavailable("this vault no longer leads: the vault that leads resumes the job");
    }
    return Status::Ok();
  }
  mutable std::mutex mu_;
  std::condition_variable cv_;
  Reason why_ = Reason::kNone;  // guarded by mu_
  // The fence of the thread that made the token (a job worker's term; nullptr elsewhere),
  // borrowed: the term outlives its jobs.
  const LeaseFence* const fence_ = FenceScope::Current();
};

// `st`, saying that recording its outcome in the catalog failed too.
inline Status AlsoFailed(const Status& st, const std::string& what, const Status& also) {
  if (also.ok()) return st;
  return Status(st.code(),
                fmt::format("{}; and {} failed: {}", st.message(), what, also.message()));
}

class Steps {
 public:
  // `cancel` is borrowed and outlives the Steps (nullptr: the job cannot be cancelled).
  Steps(Catalog* c, JobRow* j, JobCancel* cancel = nullptr) : c_(c), j_(j), cancel_(cancel) {}
  void Begin(const std::string& name) {
    j_->steps.push_back(
        {{"name", name}, {"state", JobStateName(JobState::kRunning)}, {"message", ""}});
    SaveProgress();
  }
  void Done(int progress) {
    j_->steps.back()["state"] = JobStateName(JobState::kSucceeded);
    j_->progress = progress;
    SaveProgress();
  }
  void Progress(int progress, const std::string& message) {
    j_->progress = progress;
    j_->steps.back()["message"] = message;
    SaveProgress();
  }
  // The step failed but the job goes on (e.g. the source did not shut down in time).
  void Warn(int progress, const std::string& message) {
    j_->steps.back()["state"] = JobStateName(JobState::kFailed);
    j_->steps.back()["message"] = message;
    j_->progress = progress;
    SaveProgress();
  }
  // Ends the job Failed with `st` — or Cancelled when st is kCancelled: then `st`'s
  // message says what the job leaves behind (see Cancelled()).
  void Fail(const Status& st) {
    JobState state = st.code() == Code::kCancelled ? JobState::kCancelled : JobState::kFailed;
    if (!j_->steps.empty()) {
      j_->steps.back()["state"] = JobStateName(state);
      j_->steps.back()["message"] = st.message();
    }
    j_->state = state;
    j_->error = st.message();
  }
  // Whether the job was asked to stop (Ok: go on).
  Status Check() const { return cancel_ ? cancel_->Check() : Status::Ok(); }
  // A poll interval of a waiting step; ends early when the job is asked to stop.
  Status Sleep(std::chrono::milliseconds d) {
    if (cancel_ == nullptr) {
      std::this_thread::sleep_for(d);
      return Status::Ok();
    }
    return cancel_->Sleep(d);
  }
  JobCancel* cancel() const { return cancel_; }
  // The status a cancelled step ends the job with: "cancelled during STEP: LEFT" — what
  // the job leaves behind, and what the operator may do about it.
  Status Cancelled(const std::string& left_behind) const {
    std::string step = j_->steps.empty() ? std::string("the job")
                                         : j_->steps.back().value("name", std::string("a step"));
    return Status(Code::kCancelled, "cancelled during \"" + step + "\": " + left_behind);
  }
  // Records the job row now: a decision a resumed job must find (its args) is saved
  // before the step that acts on it, so the caller fails the job when this fails.
  [[nodiscard]] Status Save() {
    j_->updated_ns = NowNs();
    return c_->UpdateJob(*j_);
  }

 private:
  // A progress record (a step begun, done, its message). Losing one is harmless: the
  // next save writes the whole row again, decisions are saved through Save(), and the
  // job's end is recorded by the job loop, which logs when it cannot. Logged here.
  void SaveProgress() {
    if (Status st = Save(); !st.ok()) {
      spdlog::warn("vault: job {}: recording its progress: {}", j_->id, st.ToString());
    }
  }

  Catalog* c_;
  JobRow* j_;
  JobCancel* cancel_;
};

}  // namespace osr::vault
