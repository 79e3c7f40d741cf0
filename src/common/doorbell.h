// Doorbell: how a thread that has nothing to do sleeps until another says there may be
// something, without polling. Ring() sets a flag and wakes the waiter; Wait() returns at
// once if the bell rang since the last Wait() returned (a ring between the waiter's look
// at its work and its Wait() is never lost), else sleeps until a ring or the bound, and
// clears the flag. Spurious returns are allowed: the waiter looks at its work again.
//
// Thread model: thread-safe. mu_ is a leaf lock (nothing else is taken under it), so Ring()
// may be called while holding any other lock, e.g. from a capture log's write-out.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>

namespace osr {

class Doorbell {
 public:
  void Ring() {
    {
      std::lock_guard lock(mu_);
      rung_ = true;
    }
    cv_.notify_all();
  }

  // Sleeps until rung (returns true) or `wait_max` passed (false); clears the flag.
  bool Wait(std::chrono::nanoseconds wait_max) {
    std::unique_lock lock(mu_);
    bool rung = cv_.wait_for(lock, wait_max, [&] { return rung_; });
    rung_ = false;
    return rung;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool rung_ = false;  // guarded by mu_
};

}  // namespace osr
