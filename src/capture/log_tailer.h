// LogTailer: reads a live capture log's records in order, from a given sequence number,
// as its writer puts them in the segment files. Only records the log reports written
// (CaptureLog::written_seq) are read, so a record being written is never seen half-done.
//
// Thread model: one thread uses a LogTailer; the CaptureLog it reads is thread-safe.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "capture/capture_log.h"
#include "capture/log_format.h"
#include "common/file.h"

namespace osr::capture {

class LogTailer {
 public:
  // `log` is borrowed and must outlive the tailer. Reading starts at `from_seq`.
  LogTailer(CaptureLog* log, uint64_t from_seq) : log_(log), next_seq_(from_seq) {}

  // Appends whole encoded records (header + payload), in order, to `out` until about
  // `bytes_max` are there or no written record is left. Returns how many it appended.
  // kNotFound: from_seq is no longer in the log (trimmed) — a resync is needed.
  Result<size_t> Read(size_t bytes_max, std::vector<uint8_t>* out);

  uint64_t next_seq() const { return next_seq_; }

 private:
  Status Seek();  // finds next_seq_ in the segment files

  CaptureLog* log_;
  uint64_t next_seq_;
  bool positioned_ = false;
  File segment_;
  uint64_t segment_first_seq_ = 0;
  uint64_t pos_ = 0;  // byte offset of next_seq_'s record in segment_
};

}  // namespace osr::capture
