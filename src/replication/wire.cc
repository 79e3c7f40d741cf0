#include "replication/wire.h"

#include <fmt/format.h>
#include <lz4.h>

#include <algorithm>
#include <cstring>

#include "common/crc32c.h"

namespace osr::replication {

namespace {
constexpr size_t kHeaderBytes = 16;
}

Status WriteFrame(Stream& s, FrameType type, std::span<const uint8_t> payload, uint16_t flags) {
  OSR_CHECK(payload.size() <= kFramePayloadMax);
  uint8_t h[kHeaderBytes];
  uint32_t magic = kFrameMagic, length = static_cast<uint32_t>(payload.size());
  uint16_t t = static_cast<uint16_t>(type);
  std::memcpy(h, &magic, 4);
  std::memcpy(h + 4, &t, 2);
  std::memcpy(h + 6, &flags, 2);
  std::memcpy(h + 8, &length, 4);
  uint32_t crc = Crc32cExtend(Crc32c(h, 12), payload);
  std::memcpy(h + 12, &crc, 4);
  struct iovec iov[2] = {{h, kHeaderBytes}, {const_cast<uint8_t*>(payload.data()), payload.size()}};
  return s.WriteAll(std::span<const struct iovec>(iov, payload.empty() ? 1 : 2));
}

Result<size_t> WriteRecordsFrame(Stream& s, std::span<const uint8_t> payload, bool compress) {
  if (compress && payload.size() > 512) {
    thread_local std::vector<uint8_t> z;
    int bound = LZ4_compressBound(static_cast<int>(payload.size()));
    z.resize(4 + static_cast<size_t>(bound));
    uint32_t raw = static_cast<uint32_t>(payload.size());
    std::memcpy(z.data(), &raw, 4);
    int n = LZ4_compress_default(reinterpret_cast<const char*>(payload.data()),
                                 reinterpret_cast<char*>(z.data() + 4),
                                 static_cast<int>(payload.size()), bound);
    if (n > 0 && static_cast<size_t>(n) + 4 < payload.size() * 9 / 10) {
      OSR_RETURN_IF_ERROR(
          WriteFrame(s, FrameType::kRecords, {z.data(), static_cast<size_t>(n) + 4}, kFlagLz4));
      return static_cast<size_t>(n) + 4 + kHeaderBytes;
    }
  }
  OSR_RETURN_IF_ERROR(WriteFrame(s, FrameType::kRecords, payload));
  return payload.size() + kHeaderBytes;
}

Status WriteFrame(Stream& s, FrameType type, const std::string& payload) {
  return WriteFrame(s, type, {reinterpret_cast<const uint8_t*>(payload.data()), payload.size()});
}

namespace {

struct Header {
  uint16_t type = 0;
  uint16_t flags = 0;
  uint32_t length = 0;  // payload bytes
  uint32_t crc = 0;
};

// The header's fields; kCorruption on a bad magic or a length over kFramePayloadMax.
Result<Header> ParseHeader(const uint8_t* h) {
  Header out;
  uint32_t magic;
  std::memcpy(&magic, h, 4);
  std::memcpy(&out.type, h + 4, 2);
  std::memcpy(&out.flags, h + 6, 2);
  std::memcpy(&out.length, h + 8, 4);
  std::memcpy(&out.crc, h + 12, 4);
  if (magic != kFrameMagic) return Corruption(fmt::format("bad frame magic {:#x}", magic));
  if (out.length > kFramePayloadMax)
    return Corruption(fmt::format("frame of {} bytes", out.length));
  return out;
}

// Checks the CRC, type and flags of a frame whose payload has been read (`h`: its header
// bytes) and decompresses an LZ4 payload.
Result<Frame> FinishFrame(const uint8_t* h, const Header& hd, std::vector<uint8_t> payload) {
  if (Crc32cExtend(Crc32c(h, 12), payload) != hd.crc) {
    return Corruption(fmt::format("frame (type {}, {} bytes) fails its CRC", hd.type, hd.length));
  }
  Frame f;
  f.type = static_cast<FrameType>(hd.type);
  f.payload = std::move(payload);
  bool lz4 = hd.flags == kFlagLz4 && f.type == FrameType::kRecords;
  if (hd.type < 1 || hd.type > 9 || (hd.flags != 0 && !lz4)) {
    return Corruption(fmt::format("unknown frame type {} / flags {:#x}", hd.type, hd.flags));
  }
  if (lz4) {
    uint32_t raw = 0;
    if (f.payload.size() < 4) return Corruption("compressed frame too short");
    std::memcpy(&raw, f.payload.data(), 4);
    if (raw > kFramePayloadMax)
      return Corruption(fmt::format("compressed frame says {} bytes", raw));
    std::vector<uint8_t> out(raw);
    int n = LZ4_decompress_safe(reinterpret_cast<const char*>(f.payload.data() + 4),
                                reinterpret_cast<char*>(out.data()),
                                static_cast<int>(f.payload.size() - 4), static_cast<int>(raw));
    if (n < 0 || static_cast<uint32_t>(n) != raw) return Corruption("bad LZ4 block in a frame");
    f.payload = std::move(out);
  }
  return f;
}

}  // namespace

Result<Frame> ReadFrame(Stream& s) {
  uint8_t h[kHeaderBytes];
  OSR_RETURN_IF_ERROR(s.ReadFull(h));
  OSR_ASSIGN_OR_RETURN(Header hd, ParseHeader(h));
  std::vector<uint8_t> payload(hd.length);
  OSR_RETURN_IF_ERROR(s.ReadFull(payload));
  return FinishFrame(h, hd, std::move(payload));
}

bool RecordsCompression::ShouldTry(size_t bytes) {
  if (!enabled_) return false;
  if (skip_left_bytes_ == 0) return true;
  skip_left_bytes_ -= std::min<uint64_t>(skip_left_bytes_, bytes);
  return false;
}

void RecordsCompression::Tried(bool paid) {
  ++frames_tried_;
  if (paid) {
    skip_left_bytes_ = 0;
    skip_next_bytes_ = kSkipBytesMin;
    return;
  }
  skip_left_bytes_ = skip_next_bytes_;
  skip_next_bytes_ = std::min(skip_next_bytes_ * 2, kSkipBytesMax);
}

Result<size_t> WriteRecordsFrame(Stream& s, std::span<const uint8_t> payload,
                                 RecordsCompression& compression) {
  // A frame too small to try (WriteRecordsFrame's 512 bytes) teaches nothing.
  if (payload.size() <= 512 || !compression.ShouldTry(payload.size())) {
    return WriteRecordsFrame(s, payload, false);
  }
  OSR_ASSIGN_OR_RETURN(size_t wire, WriteRecordsFrame(s, payload, true));
  compression.Tried(wire < payload.size() + kHeaderBytes);
  return wire;
}

void FrameReader::Reserve(size_t bytes) {
  if (capacity_ - begin_ >= bytes) return;
  if (capacity_ >= bytes) {  // room enough once the buffered bytes move to the front
    std::memmove(buf_.get(), buf_.get() + begin_, buffered());
  } else {
    size_t cap = std::max(bytes, kReadAheadBytes);
    auto grown = std::make_unique_for_overwrite<uint8_t[]>(cap);
    if (buffered() > 0) std::memcpy(grown.get(), buf_.get() + begin_, buffered());
    buf_ = std::move(grown);
    capacity_ = cap;
  }
  end_ -= begin_;
  begin_ = 0;
}

Result<bool> FrameReader::Fill(bool wait) {
  OSR_CHECK(end_ < capacity_);  // callers Reserve what they wait for first
  std::span<uint8_t> room(buf_.get() + end_, capacity_ - end_);
  if (wait) {
    OSR_ASSIGN_OR_RETURN(size_t n, s_.ReadSome(room));
    if (n == 0) return Unavailable("connection closed by peer");
    end_ += n;
    return true;
  }
  OSR_ASSIGN_OR_RETURN(std::optional<size_t> n, s_.TryReadSome(room));
  if (!n || *n == 0) return false;  // nothing yet, or the peer left (Read reports it)
  end_ += *n;
  return true;
}

Result<Frame> FrameReader::Take(size_t total) {
  uint8_t h[kHeaderBytes];
  std::memcpy(h, buf_.get() + begin_, kHeaderBytes);
  OSR_ASSIGN_OR_RETURN(Header hd, ParseHeader(h));
  std::vector<uint8_t> payload(buf_.get() + begin_ + kHeaderBytes, buf_.get() + begin_ + total);
  begin_ += total;
  if (begin_ == end_) begin_ = end_ = 0;
  if (capacity_ > kReadAheadBytes && buffered() <= kReadAheadBytes) {
    // A large frame passed: back to the read-ahead size.
    auto small = std::make_unique_for_overwrite<uint8_t[]>(kReadAheadBytes);
    if (buffered() > 0) std::memcpy(small.get(), buf_.get() + begin_, buffered());
    buf_ = std::move(small);
    capacity_ = kReadAheadBytes;
    end_ -= begin_;
    begin_ = 0;
  }
  return FinishFrame(h, hd, std::move(payload));
}

Result<Frame> FrameReader::Read() {
  Reserve(kHeaderBytes);
  while (buffered() < kHeaderBytes) OSR_RETURN_IF_ERROR(Fill(/*wait=*/true).status());
  OSR_ASSIGN_OR_RETURN(Header hd, ParseHeader(buf_.get() + begin_));
  const size_t total = kHeaderBytes + hd.length;
  Reserve(total);
  while (buffered() < total) OSR_RETURN_IF_ERROR(Fill(/*wait=*/true).status());
  return Take(total);
}

Result<std::optional<Frame>> FrameReader::TryRead() {
  if (buffered() < kHeaderBytes) {
    Reserve(kHeaderBytes);
    OSR_RETURN_IF_ERROR(Fill(/*wait=*/false).status());
    if (buffered() < kHeaderBytes) return std::optional<Frame>();
  }
  OSR_ASSIGN_OR_RETURN(Header hd, ParseHeader(buf_.get() + begin_));
  const size_t total = kHeaderBytes + hd.length;
  Reserve(total);
  while (buffered() < total) {
    OSR_ASSIGN_OR_RETURN(bool more, Fill(/*wait=*/false));
    if (!more) return std::optional<Frame>();
  }
  OSR_ASSIGN_OR_RETURN(Frame f, Take(total));
  return std::optional<Frame>(std::move(f));
}

std::vector<uint8_t> EncodeU64(uint64_t v) {
  std::vector<uint8_t> b(8);
  std::memcpy(b.data(), &v, 8);
  return b;
}

Result<uint64_t> DecodeU64(std::span<const uint8_t> p) {
  if (p.size() != 8) return Corruption("expected an 8-byte value");
  uint64_t v;
  std::memcpy(&v, p.data(), 8);
  return v;
}

}  // namespace osr::replication
