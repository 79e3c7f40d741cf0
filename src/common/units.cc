#include "common/units.h"

#include <fmt/format.h>

#include <charconv>
#include <ctime>

namespace osr {

Result<uint64_t> ParseSize(std::string_view text) {
  uint64_t value = 0;
  const char* begin = text.data();
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(begin, end, value);
  if (ec != std::errc() || ptr == begin) {
    return InvalidArgument(fmt::format("'{}' is not a size (examples: 4096, 64K, 10G)", text));
  }
  std::string_view unit(ptr, static_cast<size_t>(end - ptr));
  int shift = 0;
  if (unit.empty() || unit == "B") {
    shift = 0;
  } else {
    char c = unit[0];
    std::string_view rest = unit.substr(1);
    if (rest != "" && rest != "B" && rest != "iB") {
      return InvalidArgument(fmt::format("'{}': unknown unit '{}'", text, unit));
    }
    switch (c) {
      case 'k':
      case 'K':
        shift = 10;
        break;
      case 'm':
      case 'M':
        shift = 20;
        break;
      case 'g':
      case 'G':
        shift = 30;
        break;
      case 't':
      case 'T':
        shift = 40;
        break;
      case 'p':
      case 'P':
        shift = 50;
        break;
      default:
        return InvalidArgument(fmt::format("'{}': unknown unit '{}'", text, unit));
    }
  }
  if (shift > 0 && value > (UINT64_MAX >> shift)) {
    return InvalidArgument(fmt::format("'{}' is too large", text));
  }
  return value << shift;
}

std::string FormatSize(uint64_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024.0 && u < 5) {
    v /= 1024.0;
    ++u;
  }
  if (u == 0) return fmt::format("{} B", bytes);
  return fmt::format("{:.1f} {}", v, kUnits[u]);
}

std::string FormatTimeNs(int64_t unix_ns) {
  time_t secs = static_cast<time_t>(unix_ns / 1000000000);
  int64_t frac = unix_ns % 1000000000;
  if (frac < 0) {
    frac += 1000000000;
    --secs;
  }
  struct tm tm {};
  gmtime_r(&secs, &tm);
  return fmt::format("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z", tm.tm_year + 1900, tm.tm_mon + 1,
                     tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, frac);
}

}  // namespace osr
