// A byte range of a disk.
#pragma once

#include <cstdint>

namespace osr::capture {

struct Range {
  uint64_t offset;
  uint64_t length;
  bool operator==(const Range&) const = default;
};

}  // namespace osr::capture
