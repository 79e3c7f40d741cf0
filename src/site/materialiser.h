// Materialiser: commit's copy of a failed-over VM's point into its disks, in the
// background while the VM runs on them (store/failover_disk.h, Materialise). It copies the
// disks one after another at most at `bytes_per_second` (0: no limit), then calls the
// site's `finish` to record that the disks stand alone; its state says how far it is.
//
// Thread model: thread-safe. Start runs the copy on a thread of its own ("osr-materialise");
// mu_ guards the state and progress and is a leaf (snapshot() may be called under the
// site's mu_). `finish` runs on that thread with no lock of the materialiser held, and may
// take the site's mu_: so Stop (which joins the thread) must never be called under it.
// The disks are borrowed: the owner keeps them alive until Stop returned (the destructor
// stops too).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "common/status.h"
#include "store/failover_disk.h"

namespace osr::site {

class Materialiser {
 public:
  enum class State {
    kIdle,     // never asked
    kRunning,  // copying
    kDone,     // the disks stand alone (recorded by `finish`)
    kFailed,   // the copy or `finish` failed (error says why); Start again retries
  };
  static std::string_view StateName(State s);  // "", "running", "done", "failed"

  struct Snapshot {
    State state = State::kIdle;
    uint64_t done_bytes = 0;
    uint64_t total_bytes = 0;
    std::string error;
  };

  Materialiser() = default;
  Materialiser(const Materialiser&) = delete;
  Materialiser& operator=(const Materialiser&) = delete;
  ~Materialiser() { Stop(); }

  // Starts the copy of `disks` (their sizes add up to the total). Does nothing while one
  // runs. `finish(copy status)` records the outcome and returns the final status (e.g. a
  // failed save): kDone when it is ok, else kFailed with its message.
  void Start(std::vector<store::FailoverDisk*> disks, uint64_t bytes_per_second,
             std::function<Status(Status)> finish);
  // kDone without a copy (the disks are plain images already).
  void MarkDone();
  // Ends a copy under way (what was copied stays; the state becomes kFailed) and joins.
  void Stop();
  Snapshot snapshot() const;

 private:
  void Run(std::vector<store::FailoverDisk*> disks, uint64_t bytes_per_second,
           std::function<Status(Status)> finish);
  // Sleeps until `done` bytes are due at the rate (or Stop): the VM's I/O comes first.
  void Pace(std::chrono::steady_clock::time_point began, uint64_t done, uint64_t rate) const;

  mutable std::mutex mu_;
  Snapshot snap_;  // guarded by mu_
  std::atomic<bool> stop_{false};
  std::thread thread_;  // started and joined by the owner's calls (never concurrently)
};

}  // namespace osr::site
