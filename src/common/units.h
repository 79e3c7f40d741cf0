// Parsing and printing of byte sizes and durations given by people.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "common/status.h"

namespace osr {

// "4096", "64K", "64KiB", "1M", "10G", "2T" (binary multiples; "k"/"m"/"g" too).
Result<uint64_t> ParseSize(std::string_view text);
// 1536 -> "1.5 KiB".
std::string FormatSize(uint64_t bytes);
// Nanoseconds since the epoch -> "2026-11-26T06:01:38.123456789Z".
std::string FormatTimeNs(int64_t unix_ns);

}  // namespace osr
