#include "common/units.h"

#include <gtest/gtest.h>

namespace osr {
namespace {

TEST(ParseSize, AcceptsPlainAndBinarySuffixes) {
  EXPECT_EQ(ParseSize("4096").value(), 4096u);
  EXPECT_EQ(ParseSize("64K").value(), 65536u);
  EXPECT_EQ(ParseSize("64KiB").value(), 65536u);
  EXPECT_EQ(ParseSize("1M").value(), 1u << 20);
  EXPECT_EQ(ParseSize("10G").value(), 10ull << 30);
  EXPECT_EQ(ParseSize("2T").value(), 2ull << 40);
  EXPECT_EQ(ParseSize("3g").value(), 3ull << 30);
}

TEST(ParseSize, RejectsGarbageAndOverflow) {
  EXPECT_FALSE(ParseSize("").ok());
  EXPECT_FALSE(ParseSize("abc").ok());
  EXPECT_FALSE(ParseSize("12Q").ok());
  EXPECT_FALSE(ParseSize("1KB2").ok());
  EXPECT_FALSE(ParseSize("-1").ok());
  EXPECT_FALSE(ParseSize("20000000P").ok());
}

TEST(FormatSize, HumanUnits) {
  EXPECT_EQ(FormatSize(512), "512 B");
  EXPECT_EQ(FormatSize(1536), "1.5 KiB");
  EXPECT_EQ(FormatSize(1ull << 30), "1.0 GiB");
}

TEST(FormatTimeNs, Rfc3339) {
  EXPECT_EQ(FormatTimeNs(0), "1970-01-01T00:00:00.000000000Z");
  EXPECT_EQ(FormatTimeNs(1'700'000'000'123'456'789), "2023-11-14T22:13:20.123456789Z");
}

TEST(ParseTimeNs, AcceptsRfc3339) {
  EXPECT_EQ(ParseTimeNs("1970-01-01T00:00:00Z").value(), 0);
  // Beyond what 64-bit nanoseconds hold: refused, never wrapped.
  for (const char* t : {"9999-12-31T23:59:59Z", "2262-04-12T00:00:00Z", "0001-01-01T00:00:00Z"}) {
    auto r = ParseTimeNs(t);
    ASSERT_FALSE(r.ok()) << t;
    EXPECT_NE(r.status().message().find("outside the times"), std::string::npos) << t;
  }
  EXPECT_TRUE(ParseTimeNs("2262-04-10T00:00:00Z").ok());
  EXPECT_EQ(ParseTimeNs("2023-11-14T22:13:20.123456789Z").value(), 1'700'000'000'123'456'789);
  // Lowercase separators (RFC 3339 5.6: "T" and "Z" may be lowercase), and a space.
  EXPECT_EQ(ParseTimeNs("2023-11-14t22:13:20z").value(), 1'700'000'000'000'000'000);
  EXPECT_EQ(ParseTimeNs("2023-11-14 22:13:20Z").value(), 1'700'000'000'000'000'000);
  // Offsets: the same instant.
  EXPECT_EQ(ParseTimeNs("2023-11-15T03:43:20+05:30").value(), 1'700'000'000'000'000'000);
  EXPECT_EQ(ParseTimeNs("2023-11-14T17:13:20-05:00").value(), 1'700'000'000'000'000'000);
  EXPECT_EQ(ParseTimeNs("2023-11-14T22:13:20-00:00").value(), 1'700'000'000'000'000'000);
  // Short and over-long fractions.
  EXPECT_EQ(ParseTimeNs("1970-01-01T00:00:00.5Z").value(), 500'000'000);
  EXPECT_EQ(ParseTimeNs("1970-01-01T00:00:00.1234567891234Z").value(), 123'456'789);
  // Leap days, before the epoch, and what FormatTimeNs writes.
  EXPECT_EQ(ParseTimeNs("2024-02-29T00:00:00Z").value(), 1'709'164'800'000'000'000);
  EXPECT_EQ(ParseTimeNs("2000-02-29T00:00:00Z").value(), 951'782'400'000'000'000);
  EXPECT_EQ(ParseTimeNs("1969-12-31T23:59:59Z").value(), -1'000'000'000);
  for (int64_t ns : {int64_t{0}, int64_t{1'700'000'000'123'456'789}, int64_t{-1}}) {
    EXPECT_EQ(ParseTimeNs(FormatTimeNs(ns)).value(), ns);
  }
}

TEST(ParseTimeNs, RefusesWhatIsOutOfRangeOrMalformed) {
  auto message = [](const char* text) {
    auto r = ParseTimeNs(text);
    EXPECT_FALSE(r.ok()) << text;
    return r.ok() ? std::string() : r.status().message();
  };
  EXPECT_NE(message("2016-12-31T23:59:60Z").find("leap seconds are not supported"),
            std::string::npos);
  EXPECT_NE(message("2023-13-01T00:00:00Z").find("month 13"), std::string::npos);
  EXPECT_NE(message("2023-00-01T00:00:00Z").find("month 0"), std::string::npos);
  EXPECT_NE(message("2023-02-29T00:00:00Z").find("day 29"), std::string::npos);
  EXPECT_NE(message("1900-02-29T00:00:00Z").find("day 29"), std::string::npos);
  EXPECT_NE(message("2023-04-31T00:00:00Z").find("day 31"), std::string::npos);
  EXPECT_NE(message("2023-04-00T00:00:00Z").find("day 0"), std::string::npos);
  EXPECT_NE(message("2023-04-01T24:00:00Z").find("hour 24"), std::string::npos);
  EXPECT_NE(message("2023-04-01T00:60:00Z").find("minute 60"), std::string::npos);
  EXPECT_NE(message("2023-04-01T00:00:61Z").find("second 61"), std::string::npos);
  EXPECT_NE(message("2023-04-01T00:00:00+24:00").find("offset"), std::string::npos);
  EXPECT_NE(message("2023-04-01T00:00:00+05:60").find("offset"), std::string::npos);
  EXPECT_NE(message("2023-04-01T00:00:00").find("Z or an offset"), std::string::npos);
  EXPECT_NE(message("2023-04-01T00:00:00.Z").find("digits"), std::string::npos);
  EXPECT_NE(message("2023-04-01T00:00:00Zjunk").find("follows"), std::string::npos);
  EXPECT_NE(message("2023-04-01X00:00:00Z").find("'T'"), std::string::npos);
  message("2023-4-01T00:00:00Z");
  message("2023-04-01T0:00:00Z");
  message("2023-04-01T00:00:00+0500");
  message("");
  message("yesterday");
  EXPECT_TRUE(LooksLikeTime("2023-13-01T00:00:00Z"));
  EXPECT_FALSE(LooksLikeTime("42"));
  EXPECT_FALSE(LooksLikeTime("latest"));
}

}  // namespace
}  // namespace osr
