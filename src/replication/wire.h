// The replication channel's framing (docs/formats.md, "Replication channel"). A frame
// is a 16-byte little-endian header and a payload:
//
//   0 magic u32 "OSRR"   4 type u16   6 flags u16   8 length u32 (payload bytes)
//  12 crc u32: CRC32C of header bytes 0..11 followed by the payload
//
// Records inside a RECORDS frame carry their own CRC too (the capture-log format), so a
// record is checked end to end, from the source's log to the recovery store.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "common/socket.h"
#include "common/status.h"

namespace osr::replication {

inline constexpr uint32_t kFrameMagic = 0x5252534f;  // "OSRR" as little-endian bytes
inline constexpr uint32_t kProtocolVersion = 1;
inline constexpr uint32_t kFramePayloadMax = 64u << 20;
inline constexpr size_t kFrameHeaderBytes = 16;
// Frame flag: the payload is u32 uncompressed length + an LZ4 block (RECORDS only, when
// both ends said so in HELLO / HELLO_OK).
inline constexpr uint16_t kFlagLz4 = 1;

// The JSON payloads are read and written by messages.h.
enum class FrameType : uint16_t {
  kHello = 1,        // sender -> receiver: JSON {version, group, epoch, compress, disks}
  kHelloOk = 2,      // receiver -> sender: JSON {durable_seq, base_seq, compress, ...}
  kRecords = 3,      // sender -> receiver: encoded records, consecutive seqs
  kAck = 4,          // receiver -> sender: u64 durable seq
  kError = 5,        // either way: JSON {code (ErrorCode), name, message}; the connection ends
  kResyncBegin = 6,  // sender -> receiver: JSON {from}: records up to `from` are all sent
  kResyncData = 7,   // sender -> receiver: disk u32, offset u64, then the region's bytes
  kResyncEnd = 8,    // sender -> receiver: JSON {consistent_seq}
  kResyncDone = 9,   // receiver -> sender: JSON {consistent_seq}: the resync is committed
};

struct Frame {
  FrameType type;
  std::vector<uint8_t> payload;
};

Status WriteFrame(Stream& s, FrameType type, std::span<const uint8_t> payload, uint16_t flags = 0);
// Compresses `payload` with LZ4 into a frame when that saves at least 10%, else sends it
// as it is. Returns the bytes that went on the wire.
Result<size_t> WriteRecordsFrame(Stream& s, std::span<const uint8_t> payload, bool compress);
Status WriteFrame(Stream& s, FrameType type, const std::string& payload);
// Reads one frame (decompressing an LZ4 payload); kCorruption on a bad magic, CRC or
// compressed block, kUnavailable when the peer left.
Result<Frame> ReadFrame(Stream& s);

std::vector<uint8_t> EncodeU64(uint64_t v);
Result<uint64_t> DecodeU64(std::span<const uint8_t> p);

}  // namespace osr::replication
