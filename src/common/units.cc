#include "common/units.h"

#include <fmt/format.h>

#include <charconv>
#include <ctime>
#include <limits>

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

namespace {

// Days from 1970-01-01 to y-m-d in the proleptic Gregorian calendar (H. Hinnant's
// days_from_civil).
int64_t DaysFromCivil(int64_t y, int64_t m, int64_t d) {
  y -= m <= 2;
  const int64_t era = (y >= 0 ? y : y - 399) / 400;
  const int64_t yoe = y - era * 400;
  const int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
  const int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  return era * 146097 + doe - 719468;
}

int DaysInMonth(int64_t y, int64_t m) {
  static constexpr int kDays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
  bool leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
  return m == 2 && leap ? 29 : kDays[m - 1];
}

// Reads exactly n decimal digits at text[*pos]; advances *pos.
bool Digits(std::string_view text, size_t* pos, size_t n, int64_t* out) {
  if (*pos + n > text.size()) return false;
  int64_t v = 0;
  for (size_t i = 0; i < n; ++i) {
    char c = text[*pos + i];
    if (c < '0' || c > '9') return false;
    v = v * 10 + (c - '0');
  }
  *pos += n;
  *out = v;
  return true;
}

bool Expect(std::string_view text, size_t* pos, char c) {
  if (*pos >= text.size() || text[*pos] != c) return false;
  ++*pos;
  return true;
}

}  // namespace

bool LooksLikeTime(std::string_view text) {
  size_t pos = 0;
  int64_t year = 0;
  return Digits(text, &pos, 4, &year) && Expect(text, &pos, '-');
}

Result<int64_t> ParseTimeNs(std::string_view text) {
  auto bad = [&](std::string_view why) {
    return InvalidArgument(
        fmt::format("'{}' is not an RFC 3339 time ({}); example: 2026-11-26T06:01:38Z", text, why));
  };
  size_t pos = 0;
  int64_t year, month, day, hour, minute, second;
  if (!Digits(text, &pos, 4, &year) || !Expect(text, &pos, '-') || !Digits(text, &pos, 2, &month) ||
      !Expect(text, &pos, '-') || !Digits(text, &pos, 2, &day)) {
    return bad("the date must be YYYY-MM-DD");
  }
  if (pos >= text.size() || (text[pos] != 'T' && text[pos] != 't' && text[pos] != ' ')) {
    return bad("'T' must separate the date from the time");
  }
  ++pos;
  if (!Digits(text, &pos, 2, &hour) || !Expect(text, &pos, ':') ||
      !Digits(text, &pos, 2, &minute) || !Expect(text, &pos, ':') ||
      !Digits(text, &pos, 2, &second)) {
    return bad("the time must be HH:MM:SS");
  }
  if (month < 1 || month > 12) return bad(fmt::format("month {} is not 01-12", month));
  if (day < 1 || day > DaysInMonth(year, month)) {
    return bad(fmt::format("day {} is not in month {} of {}", day, month, year));
  }
  if (hour > 23) return bad(fmt::format("hour {} is not 00-23", hour));
  if (minute > 59) return bad(fmt::format("minute {} is not 00-59", minute));
  if (second == 60) return bad("second 60: leap seconds are not supported");
  if (second > 59) return bad(fmt::format("second {} is not 00-59", second));
  int64_t frac_ns = 0;
  if (pos < text.size() && text[pos] == '.') {
    ++pos;
    size_t digits = 0;
    int64_t scale = 100000000;
    for (; pos < text.size() && text[pos] >= '0' && text[pos] <= '9'; ++pos, ++digits) {
      frac_ns += (text[pos] - '0') * scale;
      scale /= 10;  // 0 after the ninth digit: the rest adds nothing
    }
    if (digits == 0) return bad("a '.' must be followed by digits");
  }
  int64_t offset_s = 0;
  if (pos < text.size() && (text[pos] == 'Z' || text[pos] == 'z')) {
    ++pos;
  } else if (pos < text.size() && (text[pos] == '+' || text[pos] == '-')) {
    int64_t sign = text[pos] == '-' ? -1 : 1;
    ++pos;
    int64_t oh, om;
    if (!Digits(text, &pos, 2, &oh) || !Expect(text, &pos, ':') || !Digits(text, &pos, 2, &om)) {
      return bad("the offset must be Z or +HH:MM / -HH:MM");
    }
    if (oh > 23 || om > 59) return bad(fmt::format("offset {:02}:{:02} is out of range", oh, om));
    offset_s = sign * (oh * 3600 + om * 60);
  } else {
    return bad("it needs Z or an offset such as +02:00");
  }
  if (pos != text.size()) return bad("something follows the offset");
  int64_t secs =
      DaysFromCivil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second - offset_s;
  // Nanoseconds since 1970 in 64 bits reach from 1677-09-21 to 2262-04-11.
  constexpr int64_t kSecsMax = std::numeric_limits<int64_t>::max() / 1000000000 - 1;
  if (secs > kSecsMax || secs < -kSecsMax) {
    return bad("it is outside the times osr can hold (1677-09-22 to 2262-04-10)");
  }
  return secs * 1000000000 + frac_ns;
}

}  // namespace osr
