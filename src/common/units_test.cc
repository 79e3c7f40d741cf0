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

}  // namespace
}  // namespace osr
