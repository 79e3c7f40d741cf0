// CaptureLog: the append-only, segmented log of a disk's writes, in sequence order.
//
// Appends go to an in-memory buffer under mu_ (sequence numbers are handed out there,
// so the buffer is always in sequence order). WriteOut() moves the buffer to the
// current segment file with one write() — group commit: a session's WriteOut also
// writes every other session's records appended before it. Sync() adds fdatasync.
// After a process crash, everything written out is in the file (the page cache keeps
// it); records still in the buffer were not acknowledged, and their regions are
// still marked in the dirty-region bitmap by the caller.
//
// Thread model: every method is thread-safe. mu_ guards the append buffer and
// sequence counter; write_mu_ serialises writing out and segment files; it is taken
// before mu_ when both are held.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "capture/log_format.h"
#include "common/file.h"

namespace osr::capture {

struct CaptureLogOptions {
  std::string dir;
  uint64_t disk_bytes = 0;
  uint64_t epoch = 1;
  uint64_t segment_bytes_target = 64ull << 20;  // roll to a new segment past this
  size_t buffer_bytes_max = 32ull << 20;        // appenders write out beyond this
};

class CaptureLog {
 public:
  // Called after records are written out (ok) or failed to be (not ok), with each
  // record's range, outside mu_.
  using RangeCallback = std::function<void(uint64_t offset, uint64_t length, bool ok)>;

  // Opens (or creates) the log in opts.dir and recovers it: verifies every record,
  // truncates a torn tail left by a crash, refuses a log damaged anywhere else.
  static Result<std::unique_ptr<CaptureLog>> Open(const CaptureLogOptions& opts,
                                                  RangeCallback on_written);
  ~CaptureLog();

  // Appends a record; returns its sequence number, or nullopt when the log has failed
  // (it stays failed until restarted: the caller tracks such writes in its bitmap).
  // payload_crc = Crc32c(payload), computed by the caller outside any lock.
  std::optional<uint64_t> Append(RecordKind kind, uint64_t offset, uint64_t length,
                                 std::span<const uint8_t> payload, uint32_t payload_crc,
                                 uint16_t flags = 0);
  // Writes every record with seq <= `seq` to the segment file.
  Status WriteOut(uint64_t seq);
  // WriteOut of everything appended, then fdatasync.
  Status Sync();

  uint64_t last_seq() const;      // highest sequence number handed out (0: none)
  uint64_t written_seq() const;   // highest written out
  bool failed() const;
  const std::string& dir() const { return opts_.dir; }

 private:
  explicit CaptureLog(CaptureLogOptions opts, RangeCallback cb)
      : opts_(std::move(opts)), on_written_(std::move(cb)) {}
  Status Recover();
  Status OpenSegment(uint64_t first_seq);  // holds write_mu_
  Status WriteBuffer(std::vector<uint8_t>& buf);  // holds write_mu_
  void ForEachRange(const std::vector<uint8_t>& buf, bool ok);

  const CaptureLogOptions opts_;
  const RangeCallback on_written_;

  mutable std::mutex mu_;
  std::vector<uint8_t> buffer_;  // guarded by mu_
  uint64_t next_seq_ = 1;        // guarded by mu_
  bool failed_ = false;          // guarded by mu_

  mutable std::mutex write_mu_;
  std::vector<uint8_t> spare_;  // guarded by write_mu_
  File segment_;                // guarded by write_mu_
  uint64_t segment_bytes_ = 0;  // guarded by write_mu_
  uint64_t written_seq_ = 0;    // guarded by write_mu_ (read under either)
  uint64_t synced_seq_ = 0;     // guarded by write_mu_
};

}  // namespace osr::capture
