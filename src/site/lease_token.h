// LeaseTokenFence: the site's half of the vault's leader fence (vault/lease.h). The
// leading vault sends its lease term's token with every call it makes to a site (the
// X-Osr-Lease-Token header, common/https.h); the site keeps the highest token it has
// seen, durably, and refuses a state-changing call that carries a lower one. So a vault
// that lost the lease while paused (SIGSTOP, a long GC-like stall, a network partition)
// cannot change a site after the vault that took over has spoken to it, even with a
// call that was already on its way.
//
// The rules (docs/api.md, "Lease tokens"):
//   - A state-changing call (PUT, POST, DELETE) with a token below the highest seen is
//     refused (kFailedPrecondition, HTTP 409, naming both tokens); with a token above it,
//     the new token is written to disk first (a failure refuses the call: kIoError).
//   - A read (GET) is never refused; a higher token it carries is recorded too, so the
//     new leader's first look at a site already fences the old one.
//   - A call without a token (an operator's call through any vault's API, a site-local
//     tool) is neither refused nor recorded: only the leader's own work is fenced.
//   - A state-changing call holds the fence shared while it runs. The first state-changing
//     call of a higher token takes it exclusively first, so it waits for the calls of lower
//     tokens still under way: a call of token T runs only once no call of a lower token
//     runs any more, and none starts after. A read with a higher token does not wait: it
//     refuses the lower tokens' calls from then on, and the ones under way end.
//
// The file (data_dir/lease-token, 0600, docs/formats.md "Site lease token") is replaced
// atomically (temp file, fsync, rename, fsync of the folder). The token only rises: going
// back is the vault's side (osrd vault --lease-token-floor), never the site's.
//
// Thread model: thread-safe. mu_ (writer first) is held shared by running state-changing
// calls and exclusively by the first state-changing call of a higher token (drained_ is
// guarded by it); write_mu_ (taken after mu_ when both are) orders the file's writes and
// durable_'s stores; highest_ only rises (compare-and-swap).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <string_view>

#include "common/rw_lock.h"
#include "common/status.h"

namespace osr::site {

// The largest token (the vault's catalog keeps it in a signed 64-bit column).

// A header's value: 1-19 decimal digits, 1..kLeaseTokenMax, nothing else (no sign, no
// space). kInvalidArgument naming the header and the value (cut to 40 characters).
Result<uint64_t> ParseLeaseToken(std::string_view text);

class LeaseTokenFence {
 public:
  // The file's name in the site's data_dir.
  static constexpr char kFileName[] = "lease-token";

  // Reads the highest token seen from `path` (no file: 0, nothing seen yet). Errors:
  // kCorruption when the file is not one this code wrote (its message names the file
  // and what to do), the read's error (kIoError, kPermissionDenied) otherwise.
  static Result<std::unique_ptr<LeaseTokenFence>> Open(std::string path);

  // A state-changing call let through; while it lives, no state-changing call of a higher
  // token starts (it waits for this). Movable; the hold ends when it goes.
  class Admission {
   public:
    Admission() = default;
    explicit Admission(std::shared_lock<WriterFirstSharedMutex> hold) : hold_(std::move(hold)) {}

   private:
    std::shared_lock<WriterFirstSharedMutex> hold_;  // empty for a call without a token
  };

  // Whether a state-changing call carrying `token` (nullopt: none) may run, see the file
  // comment. Errors: kFailedPrecondition ("fenced: this site has seen lease token H; this
  // call carries T — ..."), kIoError when a higher token could not be recorded (the call
  // is refused, the higher token still fences lower ones from now on).
  // Must not be called by a thread that holds an Admission (the lock is not recursive).
  Result<Admission> AdmitChange(std::optional<uint64_t> token);
  // A read carrying `token`: never refused, never waits for calls under way; a higher
  // token is recorded (a failure to write it is logged, and the token still fences lower
  // ones in this process).
  void NoteRead(uint64_t token);

  // The highest token seen (0: none yet).
  uint64_t highest() const { return highest_.load(); }
  // The highest token on disk (below highest() only after a write failed).
  uint64_t durable() const { return durable_.load(); }
  const std::string& path() const { return path_; }

 private:
  LeaseTokenFence(std::string path, uint64_t token)
      : path_(std::move(path)), highest_(token), durable_(token) {}
  void RaiseHighest(uint64_t token);  // highest_ = max(highest_, token)
  // Writes max(token, highest_) if token is above what is on disk. The write's error.
  Status Persist(uint64_t token);
  Status Refuse(uint64_t token) const;

  const std::string path_;
  WriterFirstSharedMutex mu_;
  std::mutex write_mu_;
  std::atomic<uint64_t> highest_;  // what refuses: raised before the write is tried
  std::atomic<uint64_t> durable_;  // what the file holds
  // The highest token whose first state-changing call waited for every call admitted
  // before it (guarded by mu_: written exclusive, read shared). 0 at start: the first
  // call of a token after a restart drains too (there is nothing to wait for then).
  uint64_t drained_ = 0;
};

}  // namespace osr::site
