#include "capture/log_format.h"

#include <fmt/format.h>

#include <cstring>

#include "common/crc32c.h"
#include "common/le.h"

namespace osr::capture {

std::string_view KindName(RecordKind kind) {
  switch (kind) {
    case RecordKind::kWrite:
      return "write";
    case RecordKind::kTrim:
      return "trim";
    case RecordKind::kZero:
      return "zero";
    case RecordKind::kDiskSize:
      return "disk-size";
  }
  return "unknown";
}

std::string SegmentFileName(uint64_t first_seq) {
  return fmt::format("{:020}.log", first_seq);
}

void SegmentHeader::Encode(uint8_t* p) const {
  std::memset(p, 0, kSize);
  std::memcpy(p, kSegmentMagic, 8);
  Le32(p + 8, kFormatVersion);
  Le32(p + 12, kSize);
  Le64(p + 16, first_seq);
  Le64(p + 24, disk_bytes);
  Le64(p + 32, static_cast<uint64_t>(created_ns));
  Le32(p + 60, Crc32c(p, 60));
}

Result<SegmentHeader> SegmentHeader::Decode(std::span<const uint8_t> p) {
  if (p.size() < kSize) return Corruption("segment header truncated");
  if (std::memcmp(p.data(), kSegmentMagic, 8) != 0) return Corruption("bad segment magic");
  if (Ld32(p.data() + 60) != Crc32c(p.data(), 60)) return Corruption("segment header CRC mismatch");
  uint32_t version = Ld32(p.data() + 8);
  if (version != kFormatVersion) {
    return Corruption(
        fmt::format("segment format version {} (this osrd reads {})", version, kFormatVersion));
  }
  SegmentHeader h;
  h.first_seq = Ld64(p.data() + 16);
  h.disk_bytes = Ld64(p.data() + 24);
  h.created_ns = static_cast<int64_t>(Ld64(p.data() + 32));
  return h;
}

void RecordHeader::Encode(uint8_t* p, uint32_t payload_crc) {
  Le32(p + 4, kRecordMagic);
  Le64(p + 8, seq);
  Le64(p + 16, epoch);
  Le64(p + 24, offset);
  Le64(p + 32, length);
  Le64(p + 40, static_cast<uint64_t>(time_ns));
  Le32(p + 48, payload_bytes);
  Le32(p + 52, disk);
  Le16(p + 56, static_cast<uint16_t>(kind));
  Le16(p + 58, flags);
  Le32(p + 60, 0);
  crc = Crc32cExtend(payload_crc, {p + 4, kSize - 4});
  Le32(p, crc);
}

Result<RecordHeader> RecordHeader::Decode(std::span<const uint8_t> p) {
  if (p.size() < kSize) return Corruption("record header truncated");
  if (Ld32(p.data() + 4) != kRecordMagic) return Corruption("bad record magic");
  RecordHeader h;
  h.crc = Ld32(p.data());
  h.seq = Ld64(p.data() + 8);
  h.epoch = Ld64(p.data() + 16);
  h.offset = Ld64(p.data() + 24);
  h.length = Ld64(p.data() + 32);
  h.time_ns = static_cast<int64_t>(Ld64(p.data() + 40));
  h.payload_bytes = Ld32(p.data() + 48);
  h.disk = Ld32(p.data() + 52);
  uint16_t kind = Ld16(p.data() + 56);
  h.flags = Ld16(p.data() + 58);
  if (kind < 1 || kind > 4) return Corruption(fmt::format("unknown record kind {}", kind));
  h.kind = static_cast<RecordKind>(kind);
  if (h.payload_bytes > kPayloadBytesMax) {
    return Corruption(fmt::format("record payload of {} bytes", h.payload_bytes));
  }
  if (h.kind == RecordKind::kDiskSize) {
    if (h.length != 0 || h.payload_bytes == 0 || h.payload_bytes > kDiskNameBytesMax ||
        h.offset == 0) {
      return Corruption("a disk-size record needs a new size, no length and a name of 1..64 bytes");
    }
  } else if (h.kind == RecordKind::kWrite ? h.payload_bytes != h.length : h.payload_bytes != 0) {
    return Corruption("record payload size does not match its kind and length");
  }
  if (h.offset + h.length < h.offset) return Corruption("record range overflows");
  return h;
}

bool RecordHeader::Verify(const uint8_t* p, std::span<const uint8_t> payload) {
  uint32_t crc = Crc32cExtend(Crc32c(payload), {p + 4, kSize - 4});
  return crc == Ld32(p);
}

}  // namespace osr::capture
