// Test helper: one capture-log record (header + payload), as a sender ships it and
// RecoveryStore::Append takes it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "capture/log_format.h"
#include "common/crc32c.h"

namespace osr::store::testing {

inline std::vector<uint8_t> WriteRecord(uint64_t seq, uint64_t offset,
                                        const std::vector<uint8_t>& data, uint32_t disk = 0) {
  capture::RecordHeader h;
  h.seq = seq;
  h.offset = offset;
  h.length = data.size();
  h.payload_bytes = static_cast<uint32_t>(data.size());
  h.disk = disk;
  std::vector<uint8_t> out(capture::RecordHeader::kSize + data.size());
  h.Encode(out.data(), Crc32c(data));
  std::copy(data.begin(), data.end(), out.begin() + capture::RecordHeader::kSize);
  return out;
}

}  // namespace osr::store::testing
