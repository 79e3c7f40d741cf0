#include "nbd/protocol.h"

#include <gtest/gtest.h>

#include <cerrno>

namespace osr::nbd {
namespace {

TEST(Protocol, BigEndianCodecs) {
  uint8_t b[8];
  Put64(b, 0x0102030405060708ull);
  EXPECT_EQ(b[0], 1);
  EXPECT_EQ(b[7], 8);
  EXPECT_EQ(Get64(b), 0x0102030405060708ull);
  Put32(b, 0xdeadbeef);
  EXPECT_EQ(Get32(b), 0xdeadbeefu);
  Put16(b, 0xabcd);
  EXPECT_EQ(b[0], 0xab);
  EXPECT_EQ(Get16(b), 0xabcd);
}

TEST(Protocol, RequestRoundTripAndLayout) {
  Request r{kRequestMagic, kCmdFlagFua, kCmdWrite, 0x1122334455667788ull, 4096, 512};
  uint8_t b[Request::kSize];
  r.Encode(b);
  // The magic leads, big endian, as the spec's example shows: 25 60 95 13.
  EXPECT_EQ(b[0], 0x25);
  EXPECT_EQ(b[3], 0x13);
  Request d = Request::Decode(b);
  EXPECT_EQ(d.magic, kRequestMagic);
  EXPECT_EQ(d.flags, kCmdFlagFua);
  EXPECT_EQ(d.type, kCmdWrite);
  EXPECT_EQ(d.cookie, 0x1122334455667788ull);
  EXPECT_EQ(d.offset, 4096u);
  EXPECT_EQ(d.length, 512u);
}

TEST(Protocol, RepliesHaveTheirMagic) {
  uint8_t b[ChunkHeader::kSize];
  SimpleReply::Encode(b, kEInval, 7);
  EXPECT_EQ(Get32(b), kSimpleReplyMagic);
  EXPECT_EQ(Get32(b + 4), kEInval);
  EXPECT_EQ(Get64(b + 8), 7u);
  ChunkHeader::Encode(b, kReplyFlagDone, kReplyTypeOffsetData, 9, 100);
  EXPECT_EQ(Get32(b), kStructuredReplyMagic);
  EXPECT_EQ(Get16(b + 4), kReplyFlagDone);
  EXPECT_EQ(Get16(b + 6), kReplyTypeOffsetData);
  EXPECT_EQ(Get32(b + 16), 100u);
}

TEST(Protocol, ErrnoMapping) {
  EXPECT_EQ(ErrnoToNbd(0), 0u);
  EXPECT_EQ(ErrnoToNbd(EROFS), kEPerm);
  EXPECT_EQ(ErrnoToNbd(EDQUOT), kENoSpc);
  EXPECT_EQ(ErrnoToNbd(EOPNOTSUPP), kENotSup);
  EXPECT_EQ(ErrnoToNbd(EBADF), kEIo);  // not in the spec's list: EIO
}

}  // namespace
}  // namespace osr::nbd
