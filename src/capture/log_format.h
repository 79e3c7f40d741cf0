// The capture log's on-disk format (docs/formats.md, "Capture log"). All integers are
// little endian. A log is a directory of segment files named by their first sequence
// number ("00000000000000000001.log"); each is a SegmentHeader followed by records.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "common/status.h"

namespace osr::capture {

inline constexpr char kSegmentMagic[8] = {'O', 'S', 'R', 'C', 'A', 'P', 'L', 'G'};
inline constexpr uint32_t kFormatVersion = 1;
inline constexpr uint32_t kRecordMagic = 0x52435253;  // "SRCR" read as little endian bytes

enum class RecordKind : uint16_t {
  kWrite = 1,  // payload = the bytes written
  kTrim = 2,   // no payload; the range reads as zeros afterwards
  kZero = 3,   // no payload; the range reads as zeros afterwards
  // A disk of the group is added or grows from this seq on (docs/formats.md, "Disk
  // changes"): `disk` its index (the next one for an added disk), `offset` its new size in
  // bytes, `length` 0, payload its name (1..kDiskNameBytesMax bytes). Touches no byte.
  kDiskSize = 4,
};
inline constexpr uint32_t kDiskNameBytesMax = 64;
std::string_view KindName(RecordKind kind);

// 64 bytes at the start of every segment.
struct SegmentHeader {
  static constexpr size_t kSize = 64;
  // 0   magic[8]      "OSRCAPLG"
  // 8   version u32   kFormatVersion
  // 12  header_bytes u32  = 64
  // 16  first_seq u64 sequence number of the first record in this segment
  // 24  disk_bytes u64 size of the captured disk
  // 32  created_ns i64 creation time, ns since the Unix epoch
  // 40  reserved[20]  zero
  // 60  crc u32       CRC32C of bytes 0..59
  uint64_t first_seq = 0;
  uint64_t disk_bytes = 0;
  int64_t created_ns = 0;

  void Encode(uint8_t* p) const;
  // Checks magic, version and CRC.
  static Result<SegmentHeader> Decode(std::span<const uint8_t> p);
};

// 64 bytes before every record's payload.
struct RecordHeader {
  static constexpr size_t kSize = 64;
  // 0   crc u32       CRC32C of the payload followed by bytes 4..63 of this header
  // 4   magic u32     kRecordMagic
  // 8   seq u64       position in the disk's (later: the group's) write order, from 1
  // 16  epoch u64     the item's epoch when the write was accepted
  // 24  offset u64    byte offset on the disk
  // 32  length u64    bytes affected on the disk
  // 40  time_ns i64   when the write was accepted, ns since the Unix epoch
  // 48  payload_bytes u32  bytes following this header (= length for kWrite, the name's
  //                   length for kDiskSize, else 0)
  // 52  disk u32      disk index within the consistency group (0 for nbd-serve)
  // 56  kind u16      RecordKind
  // 58  flags u16     bit 0: the client asked for FUA
  // 60  reserved u32  zero
  uint32_t crc = 0;
  uint64_t seq = 0;
  uint64_t epoch = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
  int64_t time_ns = 0;
  uint32_t payload_bytes = 0;
  uint32_t disk = 0;
  RecordKind kind = RecordKind::kWrite;
  uint16_t flags = 0;

  // Encodes with `crc` computed from payload_crc = Crc32c(payload).
  void Encode(uint8_t* p, uint32_t payload_crc);
  // Decodes without checking the CRC (that needs the payload): see Verify.
  static Result<RecordHeader> Decode(std::span<const uint8_t> p);
  // True when `crc` matches the encoded header bytes `p` and the payload.
  static bool Verify(const uint8_t* p, std::span<const uint8_t> payload);
};

inline constexpr uint32_t kPayloadBytesMax = 64u << 20;  // records larger than this are corrupt

std::string SegmentFileName(uint64_t first_seq);

}  // namespace osr::capture
