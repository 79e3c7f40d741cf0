// VersionIndex: which journal records changed which bytes of one disk, so that the disk
// can be read as it was at any sequence number the journal still holds.
//
// The disk is cut into fixed chunks; each chunk lists the records that touch it, in
// sequence order. Reading [offset, offset+length) as of seq S starts from the base image
// and applies, chunk by chunk, every listed record with seq <= S, oldest first, clipped
// to the chunk. The cost of a read is bounded by the records that touched its chunks
// within the retention window.
//
// Thread model: not thread-safe; the recovery store guards it with its own lock.
#pragma once

#include <cstdint>
#include <functional>
#include <unordered_map>
#include <vector>

#include "capture/log_format.h"

namespace osr::store {

// A record as the index knows it: where its bytes are on the disk and in the journal.
struct RecordRef {
  uint64_t seq = 0;
  uint64_t offset = 0;  // on the disk
  uint64_t length = 0;
  capture::RecordKind kind = capture::RecordKind::kWrite;
  uint64_t segment_first_seq = 0;  // the journal segment holding the payload
  uint64_t payload_pos = 0;        // byte offset of the payload in that segment
};

class VersionIndex {
 public:
  static constexpr uint64_t kChunkBytes = 1 << 20;

  // Records must be added in increasing seq order.
  void Add(const RecordRef& r);
  // Calls fn(record, clip_offset, clip_length) for every record with from < seq <= upto
  // that overlaps [offset, offset+length), clipped to that range and to one chunk at a
  // time; within a chunk in seq order.
  void ForEach(uint64_t offset, uint64_t length, uint64_t from, uint64_t upto,
               const std::function<void(const RecordRef&, uint64_t, uint64_t)>& fn) const;
  // Appends [offset, offset+length) of every record with seq > from, clipped to chunks
  // (unsorted, may overlap): what changed after `from`.
  void ChangedAfter(uint64_t from, std::vector<std::pair<uint64_t, uint64_t>>* out) const;
  // Forgets every record with seq <= seq (they were folded into the base).
  void DropUpTo(uint64_t seq);
  // Forgets every record with seq > seq (an append that failed is undone); records may
  // then be added again from seq + 1.
  void DropAfter(uint64_t seq);
  // True when some record with from < seq <= upto overlaps the range.
  bool Touched(uint64_t offset, uint64_t length, uint64_t from, uint64_t upto) const;

 private:
  std::unordered_map<uint64_t, std::vector<RecordRef>> chunks_;  // chunk index -> records
  uint64_t last_seq_ = 0;
};

}  // namespace osr::store
