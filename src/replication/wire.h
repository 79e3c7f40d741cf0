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
#include <memory>
#include <optional>
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

// Whether LZ4 pays for the RECORDS frames of one sender, learnt as they go. Random data
// (most 4 KiB writes of a busy disk) does not compress, and trying costs the source site
// a CPU core at a few hundred MB/s: after a frame that did not shrink by 10%, the next
// skip_bytes() of records go as they are, without trying (1 MiB, doubling while it keeps
// not paying, up to kSkipBytesMax); a frame that pays brings it back to 0. One thread.
class RecordsCompression {
 public:
  static constexpr uint64_t kSkipBytesMin = 1 << 20;
  static constexpr uint64_t kSkipBytesMax = 64 << 20;
  // `enabled`: both ends agreed on LZ4 (HELLO / HELLO_OK).
  explicit RecordsCompression(bool enabled) : enabled_(enabled) {}
  // Whether to try to compress the next frame of `bytes` bytes (counts them when not).
  bool ShouldTry(size_t bytes);
  // The outcome of a try.
  void Tried(bool paid);
  uint64_t skip_bytes() const { return skip_left_bytes_; }
  uint64_t frames_tried() const { return frames_tried_; }

 private:
  bool enabled_;
  uint64_t skip_left_bytes_ = 0;  // records to send as they are before the next try
  uint64_t skip_next_bytes_ = kSkipBytesMin;
  uint64_t frames_tried_ = 0;
};
// As WriteRecordsFrame, trying LZ4 only when `compression` says so, and telling it how
// that went. Returns the bytes that went on the wire.
Result<size_t> WriteRecordsFrame(Stream& s, std::span<const uint8_t> payload,
                                 RecordsCompression& compression);

// Reads frames through a read-ahead buffer: a small frame and the header of the next come
// with one read, and the frames that have arrived already can be taken without waiting
// (TryRead) — the receiver takes those into one store append (one journal sync). Holds
// at most kReadAheadBytes, or one frame's bytes when a frame is larger (at most
// kFramePayloadMax + kFrameHeaderBytes). One thread; the stream is borrowed.
class FrameReader {
 public:
  static constexpr size_t kReadAheadBytes = 256 << 10;
  explicit FrameReader(Stream& s) : s_(s) {}
  // Waits for the next frame. Errors as ReadFrame.
  Result<Frame> Read();
  // The next frame when all of it has arrived (buffered, or readable without waiting);
  // nullopt when it has not (what came of it stays buffered for the next call). Errors as
  // ReadFrame (a peer that left reads as nullopt here, and as kUnavailable from Read).
  Result<std::optional<Frame>> TryRead();

 private:
  size_t buffered() const { return end_ - begin_; }
  // Makes room for `bytes` from begin_ on (moves what is buffered to the front, grows).
  void Reserve(size_t bytes);
  // One read into the free room: waits when `wait`; false when nothing came (no wait) or
  // the peer left (no wait: Read then sees it).
  Result<bool> Fill(bool wait);
  // The frame of the `total` bytes at begin_ (header included); consumes them.
  Result<Frame> Take(size_t total);

  Stream& s_;
  std::unique_ptr<uint8_t[]> buf_;  // not zero-filled: only [begin_, end_) is read
  size_t capacity_ = 0;
  size_t begin_ = 0;
  size_t end_ = 0;
};

std::vector<uint8_t> EncodeU64(uint64_t v);
Result<uint64_t> DecodeU64(std::span<const uint8_t> p);

}  // namespace osr::replication
