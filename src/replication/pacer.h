// Pacer: the policy's bandwidth limit as a token bucket, for every byte a sender puts
// on the wire (records, initial copy, resync: one bucket per session, so that a copy and
// the records that flow beside it share the rate).
//
// The bucket holds at most burst_bytes and starts full: at any moment, the bytes taken
// since the start are at most burst_bytes + rate × elapsed (for takes of at most
// burst_bytes each; a single take above it waits for a full bucket and then goes, running
// the bucket into debt, which later takes repay). BurstFor() picks the burst: one frame,
// or 100 ms at the rate, whichever is more — so the first writes after protection do not
// slip through at disk speed.
//
// The clock is the caller's (now_ns on a monotonic clock): tests drive it by hand.
//
// Thread model: none; the sender's connection thread owns its Pacer.
#pragma once

#include <algorithm>
#include <cstdint>

namespace osr::replication {

class Pacer {
 public:
  static constexpr uint64_t kNsPerS = 1'000'000'000;

  // rate_bytes_per_s 0: no limit (Delay is always 0).
  Pacer(uint64_t rate_bytes_per_s, uint64_t burst_bytes, int64_t now_ns)
      : rate_(rate_bytes_per_s),
        burst_(std::max<uint64_t>(burst_bytes, 1)),
        tokens_(static_cast<double>(burst_)),
        at_ns_(now_ns) {}

  // The burst for frames of at most frame_bytes at this rate.
  static uint64_t BurstFor(uint64_t rate_bytes_per_s, uint64_t frame_bytes) {
    return std::max<uint64_t>(frame_bytes, rate_bytes_per_s / 10);
  }

  // How long (ns from now_ns) to wait before `bytes` may go; 0: now. Call again after
  // waiting (the answer is then 0, or what is left of the wait).
  int64_t Delay(uint64_t bytes, int64_t now_ns) {
    if (rate_ == 0) return 0;
    Refill(now_ns);
    double need = static_cast<double>(std::min(bytes, burst_));
    if (tokens_ >= need) return 0;
    double missing = need - tokens_;
    return static_cast<int64_t>(missing * kNsPerS / static_cast<double>(rate_)) + 1;
  }
  // `bytes` went (call once Delay said 0).
  void Take(uint64_t bytes, int64_t now_ns) {
    if (rate_ == 0) return;
    Refill(now_ns);
    tokens_ -= static_cast<double>(bytes);
  }
  uint64_t rate_bytes_per_s() const { return rate_; }
  uint64_t burst_bytes() const { return burst_; }

 private:
  void Refill(int64_t now_ns) {
    if (now_ns <= at_ns_) return;  // a clock that does not move forward adds nothing
    tokens_ =
        std::min(static_cast<double>(burst_), tokens_ + static_cast<double>(now_ns - at_ns_) *
                                                            static_cast<double>(rate_) / kNsPerS);
    at_ns_ = now_ns;
  }

  uint64_t rate_;
  uint64_t burst_;
  double tokens_;  // may go below 0 after a take above the burst
  int64_t at_ns_;
};

}  // namespace osr::replication
