// The clock seam: where code that schedules, measures or stamps time reads it.
//
// Two clocks, for two jobs. The wall clock (CLOCK_REALTIME) says what time it is for
// people: point times, job times, RFC 3339 in the API. It can step — NTP correcting a bad
// start, an operator's `date -s`, a VM resumed after a pause — backwards or forwards, by
// any amount. The monotonic clock (CLOCK_MONOTONIC) only moves forward at the rate of
// real time and has no meaning across boots: it is what intervals, deadlines and
// schedules are measured on. Code that decides something by elapsed time reads the
// monotonic clock; code that shows or stores a time reads the wall clock.
//
// Production code takes RealClock(); tests give a FakeClock whose wall clock they step.
//
// Thread model: RealClock is stateless and thread-safe. FakeClock is thread-safe (its
// readings are atomics); a test steps it from its own thread.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

namespace osr {

class Clock {
 public:
  virtual ~Clock() = default;
  // Nanoseconds since the Unix epoch, as the wall clock says now (may step).
  virtual int64_t WallNs() const = 0;
  // Nanoseconds since an arbitrary start (the boot), never going back.
  virtual int64_t MonoNs() const = 0;
};

class SystemClock final : public Clock {
 public:
  int64_t WallNs() const override {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
  }
  int64_t MonoNs() const override {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
};

// The process's real clock; lives for the whole process.
inline Clock& RealClock() {
  static SystemClock clock;
  return clock;
}

// A clock for tests: both clocks advance together with Advance(); StepWall() moves only
// the wall clock, as NTP or `date -s` would.
class FakeClock final : public Clock {
 public:
  FakeClock(int64_t wall_ns, int64_t mono_ns) : wall_ns_(wall_ns), mono_ns_(mono_ns) {}
  int64_t WallNs() const override { return wall_ns_.load(); }
  int64_t MonoNs() const override { return mono_ns_.load(); }
  void Advance(int64_t ns) {
    wall_ns_ += ns;
    mono_ns_ += ns;
  }
  void StepWall(int64_t ns) { wall_ns_ += ns; }

 private:
  std::atomic<int64_t> wall_ns_;
  std::atomic<int64_t> mono_ns_;
};

}  // namespace osr
