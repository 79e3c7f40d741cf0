#include "site/materialiser.h"

#include <chrono>

#include "common/threads.h"

namespace osr::site {

std::string_view Materialiser::StateName(State s) {
  switch (s) {
    case State::kIdle:
      return "";
    case State::kRunning:
      return "running";
    case State::kDone:
      return "done";
    case State::kFailed:
      return "failed";
  }
  return "unknown";
}

void Materialiser::Start(std::vector<store::FailoverDisk*> disks, uint64_t bytes_per_second,
                         std::function<Status(Status)> finish) {
  {
    std::lock_guard lock(mu_);
    if (snap_.state == State::kRunning) return;
  }
  if (thread_.joinable()) thread_.join();  // a run that ended (failed, or stopped)
  uint64_t total = 0;
  for (auto* d : disks) total += d->size();
  {
    std::lock_guard lock(mu_);
    snap_ = {State::kRunning, 0, total, ""};
  }
  stop_ = false;
  thread_ = std::thread(
      [this, disks = std::move(disks), bytes_per_second, finish = std::move(finish)]() mutable {
        NameThisThread("osr-materialise");
        Run(std::move(disks), bytes_per_second, std::move(finish));
      });
}

void Materialiser::MarkDone() {
  std::lock_guard lock(mu_);
  snap_.state = State::kDone;
  snap_.done_bytes = snap_.total_bytes;
}

void Materialiser::Stop() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
}

Materialiser::Snapshot Materialiser::snapshot() const {
  std::lock_guard lock(mu_);
  return snap_;
}

void Materialiser::Pace(std::chrono::steady_clock::time_point began, uint64_t done,
                        uint64_t rate) const {
  if (rate == 0) return;
  auto due = began + std::chrono::duration_cast<std::chrono::nanoseconds>(
                         std::chrono::duration<double>(static_cast<double>(done) / rate));
  while (std::chrono::steady_clock::now() < due && !stop_) {
    std::this_thread::sleep_for(std::min<std::chrono::nanoseconds>(
        due - std::chrono::steady_clock::now(), std::chrono::milliseconds(50)));
  }
}

void Materialiser::Run(std::vector<store::FailoverDisk*> disks, uint64_t bytes_per_second,
                       std::function<Status(Status)> finish) {
  uint64_t before = 0;
  Status copied;
  auto began = std::chrono::steady_clock::now();
  for (auto* fd : disks) {
    copied = fd->Materialise(
        [&](uint64_t done, uint64_t) {
          {
            std::lock_guard lock(mu_);
            snap_.done_bytes = before + done;
          }
          Pace(began, before + done, bytes_per_second);
        },
        stop_);
    if (!copied.ok()) break;
    before += fd->size();
  }
  Status result = finish(copied);
  std::lock_guard lock(mu_);
  if (result.ok()) {
    snap_.state = State::kDone;
    snap_.done_bytes = snap_.total_bytes;
  } else {
    snap_.state = State::kFailed;
    snap_.error = result.message();
  }
}

}  // namespace osr::site
