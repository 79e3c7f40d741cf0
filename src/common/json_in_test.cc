#include "common/json_in.h"

#include <gtest/gtest.h>

namespace osr::json_in {
namespace {

using nlohmann::json;

TEST(JsonIn, RefusesDeepNestingBeforeParsing) {
  std::string deep(100000, '[');
  auto r = Parse(deep, "body");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("nested deeper than 64"), std::string::npos);
  std::string ok = std::string(64, '[') + std::string(64, ']');
  EXPECT_TRUE(Parse(ok, "body").ok());
  // Brackets inside strings do not count.
  EXPECT_TRUE(
      Parse(R"({"a":"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\"]]"})",
            "body", kBytesMax, 4)
          .ok());
}

TEST(JsonIn, RefusesLargeAndMalformedBodies) {
  EXPECT_FALSE(Parse(std::string(100, ' ') + "1", "body", 50).ok());
  EXPECT_FALSE(Parse("{", "body").ok());
  EXPECT_FALSE(Parse("\"\xff\"", "body").ok());  // not UTF-8
  auto r = ParseObject("[1]", "HELLO");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().message(), "HELLO: must be a JSON object, not an array");
}

TEST(JsonIn, WrongTypesNameTheField) {
  json j = json::parse(R"({"version":"1","n":-3,"big":18446744073709551615,"b":1})");
  Fields f(j, "HELLO.");
  EXPECT_EQ(f.U64("version", 7), 7u);
  EXPECT_FALSE(f.ok());
  EXPECT_EQ(f.status().message(), "HELLO.version: must be a whole number ≥ 0, not a string");
  // Later reads give their defaults and keep the first error.
  EXPECT_EQ(f.I64("n", 5), 5);
  EXPECT_EQ(f.status().message(), "HELLO.version: must be a whole number ≥ 0, not a string");

  Fields g(j);
  EXPECT_EQ(g.I64("n", 0), -3);
  EXPECT_EQ(g.I64("big", 0), 0);
  EXPECT_NE(g.status().message().find("big: must be a whole number"), std::string::npos);

  Fields h(j);
  EXPECT_FALSE(h.Bool("b", false));
  EXPECT_EQ(h.status().message(), "b: must be true or false, not a number");
}

TEST(JsonIn, RefuseOthersNamesTheFirstUnknownFieldAndTheKnownOnes) {
  json j = json::parse(R"({"trim_image":true,"resset_history":true})");
  Fields f(j, "the body.");
  EXPECT_TRUE(f.Bool("trim_image", false));
  EXPECT_FALSE(f.Bool("reset_history", false));
  EXPECT_TRUE(f.ok());
  f.RefuseOthers();
  EXPECT_FALSE(f.ok());
  EXPECT_EQ(f.status().message(),
            "the body.resset_history: is not a field of this call (it takes trim_image, "
            "reset_history)");

  // Fields the reads asked for, present or not, pass; nothing else is there.
  json k = json::parse(R"({"trim_image":false})");
  Fields g(k);
  g.Bool("trim_image", true);
  g.Bool("reset_history", false);
  g.RefuseOthers();
  EXPECT_TRUE(g.ok()) << g.status().ToString();

  // A call that takes no field.
  json e = json::parse(R"({"x":1})");
  Fields h(e);
  h.RefuseOthers();
  EXPECT_EQ(h.status().message(), "x: is not a field of this call (it takes none)");

  // A wrong type is reported first, as it was met first.
  json w = json::parse(R"({"trim_image":"yes","other":1})");
  Fields v(w);
  v.Bool("trim_image", false);
  v.RefuseOthers();
  EXPECT_EQ(v.status().message(), "trim_image: must be true or false, not a string");
}

TEST(JsonIn, RangesMissingAndRequired) {
  json j = json::parse(R"({"retention_seconds":17446744074,"name":"x"})");
  Fields f(j);
  EXPECT_EQ(f.U64("retention_seconds", 86400, {.min = 60, .max = 10ull * 366 * 86400}), 86400u);
  EXPECT_EQ(f.status().message(), "retention_seconds: 17446744074 is out of range (60..316224000)");
  Fields g(j);
  EXPECT_EQ(g.String("name"), "x");
  EXPECT_EQ(g.String("missing", "d"), "d");
  EXPECT_TRUE(g.ok());
  EXPECT_EQ(g.String("site"), "");
  EXPECT_EQ(g.status().message(), "site: is missing");
  Fields n(json(nullptr), "spec.");
  EXPECT_EQ(n.status().message(), "spec must be a JSON object, not null");
}

TEST(JsonIn, IsUtf8FollowsRfc3629) {
  EXPECT_TRUE(IsUtf8(""));
  EXPECT_TRUE(IsUtf8("vm1/ok"));
  EXPECT_TRUE(IsUtf8("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"));  // é € U+1F600
  EXPECT_FALSE(IsUtf8("\xff"));
  EXPECT_FALSE(IsUtf8("a\xc3"));             // cut short
  EXPECT_FALSE(IsUtf8("\xc0\xaf"));          // overlong '/'
  EXPECT_FALSE(IsUtf8("\xed\xa0\x80"));      // a surrogate
  EXPECT_FALSE(IsUtf8("\xf4\x90\x80\x80"));  // above U+10FFFF
  EXPECT_FALSE(IsUtf8("\xe2\x28\xa1"));      // a bad continuation
}

TEST(JsonIn, DumpReplacesBadUtf8) {
  json j = std::string("a\xff");
  EXPECT_EQ(Dump(j), "\"a\xEF\xBF\xBD\"");
}

}  // namespace
}  // namespace osr::json_in
