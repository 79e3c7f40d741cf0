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
// RFC 3339 date-time -> nanoseconds since the epoch: "2026-11-26T06:01:38Z",
// "2026-11-26t06:01:38.5+05:30" ('T'/'t' or a space between date and time, 'Z'/'z' or an
// offset; a fraction of any length, digits past the ninth ignored). Every field is range
// checked (the day against its month and leap year); second 60 is refused: leap seconds
// are not supported (POSIX time has none to map them to). kInvalidArgument naming what is
// wrong.
Result<int64_t> ParseTimeNs(std::string_view text);
// Whether text looks like it was meant as an RFC 3339 time (starts "DDDD-"), so that a
// caller can report ParseTimeNs's error rather than a generic one.
bool LooksLikeTime(std::string_view text);

}  // namespace osr
