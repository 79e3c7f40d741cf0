// CRC32C (Castagnoli), as used by iSCSI; isa-l's crc32_iscsi does the work.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace osr {

// Extends `crc` (the value returned for the bytes before) over `data`.
// Crc32c(data) == Crc32cExtend(0, data); chaining two calls equals one over both.
uint32_t Crc32cExtend(uint32_t crc, std::span<const uint8_t> data);
inline uint32_t Crc32c(std::span<const uint8_t> data) {
  return Crc32cExtend(0, data);
}
inline uint32_t Crc32c(const void* p, size_t n) {
  return Crc32c({static_cast<const uint8_t*>(p), n});
}

}  // namespace osr
