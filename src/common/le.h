// Little-endian loads and stores for osr's own on-disk and wire formats (NBD, which is
// big endian, has its own in nbd/protocol.h). memcpy keeps them free of alignment and
// aliasing trouble; osr runs on little-endian hosts only (checked here).
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>

namespace osr {

static_assert(std::endian::native == std::endian::little,
              "osr's formats are little endian, and so must be the host");

inline void Le16(uint8_t* p, uint16_t v) {
  std::memcpy(p, &v, 2);
}
inline void Le32(uint8_t* p, uint32_t v) {
  std::memcpy(p, &v, 4);
}
inline void Le64(uint8_t* p, uint64_t v) {
  std::memcpy(p, &v, 8);
}
inline uint16_t Ld16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
inline uint32_t Ld32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline uint64_t Ld64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

}  // namespace osr
