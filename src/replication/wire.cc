#include "replication/wire.h"

#include <fmt/format.h>
#include <lz4.h>

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

Result<Frame> ReadFrame(Stream& s) {
  uint8_t h[kHeaderBytes];
  OSR_RETURN_IF_ERROR(s.ReadFull(h));
  uint32_t magic, length, crc;
  uint16_t type, flags;
  std::memcpy(&magic, h, 4);
  std::memcpy(&type, h + 4, 2);
  std::memcpy(&flags, h + 6, 2);
  std::memcpy(&length, h + 8, 4);
  std::memcpy(&crc, h + 12, 4);
  if (magic != kFrameMagic) return Corruption(fmt::format("bad frame magic {:#x}", magic));
  if (length > kFramePayloadMax) return Corruption(fmt::format("frame of {} bytes", length));
  Frame f;
  f.type = static_cast<FrameType>(type);
  f.payload.resize(length);
  OSR_RETURN_IF_ERROR(s.ReadFull(f.payload));
  if (Crc32cExtend(Crc32c(h, 12), f.payload) != crc) {
    return Corruption(fmt::format("frame (type {}, {} bytes) fails its CRC", type, length));
  }
  bool lz4 = flags == kFlagLz4 && f.type == FrameType::kRecords;
  if (type < 1 || type > 9 || (flags != 0 && !lz4)) {
    return Corruption(fmt::format("unknown frame type {} / flags {:#x}", type, flags));
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
