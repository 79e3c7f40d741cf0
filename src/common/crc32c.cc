#include "common/crc32c.h"

#include <isa-l/crc.h>

namespace osr {

// isa-l's crc32_iscsi takes and returns the raw register (no final inversion), so the
// standard CRC32C is ~crc32_iscsi(data, n, ~0); extending keeps the same convention.
uint32_t Crc32cExtend(uint32_t crc, std::span<const uint8_t> data) {
  constexpr size_t kChunkBytesMax = size_t{1} << 30;  // crc32_iscsi takes an int length
  uint32_t reg = ~crc;
  auto* p = const_cast<unsigned char*>(data.data());
  size_t left = data.size();
  while (left > 0) {
    size_t n = left < kChunkBytesMax ? left : kChunkBytesMax;
    reg = crc32_iscsi(p, static_cast<int>(n), reg);
    p += n;
    left -= n;
  }
  return ~reg;
}

}  // namespace osr
