// LogReader: reads a capture log directory record by record, verifying every CRC.
//
// Thread model: single-threaded; reads files that no writer is appending to (or the
// closed part of a live log).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "capture/log_format.h"
#include "common/file.h"

namespace osr::capture {

struct LogError {
  std::string segment;  // file path
  uint64_t position;    // byte offset in that file
  std::string message;
};

struct SegmentInfo {
  std::string path;
  uint64_t first_seq;
};

// Segment files of `dir`, ordered by first sequence number.
Result<std::vector<SegmentInfo>> ListSegments(const std::string& dir);

// The position of the first record after `pos` in `f` whose CRC checks out, or 0 when
// there is none: after damage at `pos`, a valid record further on means the damage is
// corruption among written records, not a torn tail.
Result<uint64_t> FindNextRecord(const File& f, uint64_t pos, uint64_t fsize);

class LogReader {
 public:
  // Called for every valid record, in order; return false to stop early.
  using Visitor = std::function<bool(const RecordHeader&, std::span<const uint8_t> payload)>;
  // The same, also told where the record is: its segment and its payload's byte offset.
  using PosVisitor = std::function<bool(const RecordHeader&, std::span<const uint8_t> payload,
                                        const SegmentInfo& segment, uint64_t payload_pos)>;

  struct Summary {
    uint64_t records = 0;
    uint64_t first_seq = 0;  // 0 when there are no records
    uint64_t last_seq = 0;
    std::vector<LogError> errors;
    // Where the valid part of the last segment ends: before a torn tail or the zero
    // padding of its last block.
    std::string last_segment;
    uint64_t last_segment_valid_bytes = 0;
    bool tail_damaged = false;  // the only error is at the end of the last segment
    int64_t last_time_ns = 0;   // the last valid record's time_ns (0: none)
  };

  // Reads every segment of `dir`. A damaged record ends its segment's reading (its
  // length cannot be trusted) and is reported; the next segment is still read. Sequence
  // numbers must follow each other without a gap. Zero bytes from a record boundary to
  // the end of a segment are padding, not damage.
  // With resync (for inspection tools), reading goes on after a damaged record from the
  // next record whose CRC checks out; the skipped bytes are reported.
  // With from_seq, the segments wholly before it are not read (nor checked): reading
  // starts at the segment that holds from_seq (records before it in that segment are read
  // and checked, and visited too). The cost is then the log's tail, not its history.
  static Result<Summary> Scan(const std::string& dir, const Visitor& visit, bool resync = false,
                              uint64_t from_seq = 0);
  static Result<Summary> ScanWithPositions(const std::string& dir, const PosVisitor& visit,
                                           bool resync = false, uint64_t from_seq = 0);
};

}  // namespace osr::capture
