#include "common/crc32c.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace osr {
namespace {

TEST(Crc32c, KnownVectors) {
  std::string s = "123456789";
  EXPECT_EQ(Crc32c(s.data(), s.size()), 0xE3069283u);  // the CRC-32C check value
  std::vector<uint8_t> zeros(32, 0);
  EXPECT_EQ(Crc32c(zeros), 0x8A9136AAu);  // RFC 3720 B.4: 32 bytes of zeros
  std::vector<uint8_t> ones(32, 0xff);
  EXPECT_EQ(Crc32c(ones), 0x62A8AB43u);  // RFC 3720 B.4: 32 bytes of 0xff
  EXPECT_EQ(Crc32c(nullptr, 0), 0u);
}

TEST(Crc32c, ExtendEqualsWhole) {
  std::vector<uint8_t> data(10000);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(i * 7 + 3);
  uint32_t whole = Crc32c(data);
  for (size_t cut : {0ul, 1ul, 63ul, 4096ul, 9999ul, 10000ul}) {
    uint32_t a = Crc32c({data.data(), cut});
    EXPECT_EQ(Crc32cExtend(a, {data.data() + cut, data.size() - cut}), whole) << cut;
  }
  data[5000] ^= 1;
  EXPECT_NE(Crc32c(data), whole);
}

}  // namespace
}  // namespace osr
