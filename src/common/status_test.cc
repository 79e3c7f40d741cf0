#include "common/status.h"

#include <gtest/gtest.h>

namespace osr {
namespace {

Result<int> Half(int v) {
  if (v % 2 != 0) return InvalidArgument("odd");
  return v / 2;
}

Status UsesMacros(int v, int* out) {
  OSR_ASSIGN_OR_RETURN(int h, Half(v));
  OSR_ASSIGN_OR_RETURN(*out, Half(h));
  return Status::Ok();
}

TEST(Status, OkAndError) {
  EXPECT_TRUE(Status::Ok().ok());
  Status st = Corruption("bad crc");
  EXPECT_FALSE(st.ok());
  EXPECT_EQ(st.code(), Code::kCorruption);
  EXPECT_EQ(st.ToString(), "corruption: bad crc");
}

TEST(Status, FromErrnoMapsCodesAndNbdErrors) {
  EXPECT_EQ(Status::FromErrno(ENOSPC, "write x").code(), Code::kNoSpace);
  EXPECT_EQ(Status::FromErrno(ENOSPC, "write x").ToErrno(), ENOSPC);
  EXPECT_EQ(Status::FromErrno(EIO, "write x").ToErrno(), EIO);
  EXPECT_EQ(Status::FromErrno(EOPNOTSUPP, "x").ToErrno(), EOPNOTSUPP);
  EXPECT_NE(Status::FromErrno(ENOENT, "open f").message().find("open f"), std::string::npos);
}

TEST(Result, ValueAndPropagation) {
  int out = 0;
  EXPECT_TRUE(UsesMacros(8, &out).ok());
  EXPECT_EQ(out, 2);
  Status st = UsesMacros(6, &out);
  EXPECT_EQ(st.code(), Code::kInvalidArgument);
  EXPECT_EQ(Half(3).status().message(), "odd");
}

}  // namespace
}  // namespace osr
