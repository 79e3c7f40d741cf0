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

TEST(Names, ValidNames) {
  EXPECT_TRUE(ValidName("vm1"));
  EXPECT_TRUE(ValidName("a.b_c-d"));
  EXPECT_TRUE(ValidName(std::string(64, 'x')));
  EXPECT_FALSE(ValidName(std::string(65, 'x')));
  EXPECT_FALSE(ValidName(""));
  EXPECT_FALSE(ValidName(".hidden"));
  EXPECT_FALSE(ValidName("-flag"));
  EXPECT_FALSE(ValidName("a/b"));
  EXPECT_FALSE(ValidName("a b"));
  EXPECT_FALSE(ValidName("\xc3\xa9"));
  // Shaped like a token (osr_<id>_...): a name is shown everywhere, a token must not be.
  EXPECT_FALSE(ValidName("osr_2_r18sdUxXiXneegnfIURCfMW7RDU2bx"));
  EXPECT_FALSE(ValidName("osr_12_x"));
  EXPECT_TRUE(ValidName("osr_vm"));
  EXPECT_TRUE(ValidName("osr_12"));
  EXPECT_TRUE(ValidName("osr__x"));
}

TEST(Status, HttpStatusTellsTheCallerWhatToDo) {
  EXPECT_EQ(HttpStatusFor(InvalidArgument("x")), 400);
  EXPECT_EQ(HttpStatusFor(NotFound("x")), 404);
  EXPECT_EQ(HttpStatusFor(Status(Code::kAlreadyExists, "x")), 409);
  EXPECT_EQ(HttpStatusFor(Status(Code::kFailedPrecondition, "x")), 409);
  EXPECT_EQ(HttpStatusFor(Unavailable("x")), 503);
  EXPECT_EQ(HttpStatusFor(Corruption("x")), 500);
}

}  // namespace
TEST(Status, CodeNamesRoundTrip) {
  for (int c = static_cast<int>(Code::kOk); c <= static_cast<int>(Code::kInternal); ++c) {
    auto code = static_cast<Code>(c);
    EXPECT_EQ(CodeFromName(CodeName(code)), code);
  }
  EXPECT_EQ(CodeFromName("no such code"), std::nullopt);
}

}  // namespace osr
