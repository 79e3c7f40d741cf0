// Pacer: the policy's bandwidth limit as a token bucket, for every byte a sender puts
// on the wire (records, initial copy, resync: one bucket per sender, so that a copy and
// the records that flow beside it share the rate, and a reconnect brings no new burst).
//
// The bucket holds at most burst_bytes and starts full: at any moment, the bytes taken
// since the start are at most burst_bytes + rate × elapsed (for takes of at most
// burst_bytes each; a single take above it waits for a full bucket and then goes, running
// the bucket into debt, which later takes repay; PacedStream never takes above it).
// BurstFor() picks the burst: one frame, or 100 ms at the rate, whichever is more — so
// the first writes after protection do not slip through at disk speed.
//
// The clock is the caller's (now_ns on a monotonic clock): tests drive it by hand.
//
// PacedStream puts the bucket on a stream's writes: a write goes in pieces of at most the
// burst, each once the bucket holds it, so that even one frame far above the burst (the
// record of a 16 MiB write) leaves at the rate. Whatever the frames, the bytes a
// PacedStream wrote by any moment are at most burst_bytes + rate × (that moment − the
// Pacer's start).
//
// Thread model: none; the sender's connection thread owns its Pacer (one per sender, kept
// across its sessions, so that a reconnect brings no fresh burst) and its PacedStream.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>

#include "common/socket.h"
#include "common/status.h"

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

class PacedStream final : public Stream {
 public:
  // wait(bytes): returns Ok once `pacer` lets `bytes` go (Delay 0 at now_ns()), or the
  // error that ends the write (the session broke, the sender stops). wrote(bytes): called
  // after each piece went (counting); may be empty. `inner` and `pacer` are borrowed and
  // must outlive this stream. Reads and shutdowns go to `inner` unpaced.
  PacedStream(Stream& inner, Pacer& pacer, std::function<Status(uint64_t)> wait,
              std::function<int64_t()> now_ns, std::function<void(uint64_t)> wrote = {})
      : inner_(inner),
        pacer_(pacer),
        wait_(std::move(wait)),
        now_ns_(std::move(now_ns)),
        wrote_(std::move(wrote)) {}

  Result<size_t> ReadSome(std::span<uint8_t> buf) override { return inner_.ReadSome(buf); }
  Result<std::optional<size_t>> TryReadSome(std::span<uint8_t> buf) override {
    return inner_.TryReadSome(buf);
  }
  // Every byte, in pieces of at most the pacer's burst; wait's error stops it part way
  // (the stream is then broken: the caller ends the session).
  Status WriteAll(std::span<const struct iovec> iov) override;
  using Stream::WriteAll;
  void Shutdown() override { inner_.Shutdown(); }
  void ShutdownRead() override { inner_.ShutdownRead(); }
  void SetReadTimeoutMs(int ms) override { inner_.SetReadTimeoutMs(ms); }

 private:
  Stream& inner_;
  Pacer& pacer_;
  std::function<Status(uint64_t)> wait_;
  std::function<int64_t()> now_ns_;
  std::function<void(uint64_t)> wrote_;
};

}  // namespace osr::replication
