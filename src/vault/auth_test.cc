#include "vault/auth.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace osr::vault {
namespace {

TEST(AuthTest, MaskTokensKeepsTheIdAndDropsEverySecret) {
  const std::string secret = "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789-_abcde";
  const std::string token = "osr_42_" + secret;
  ASSERT_TRUE(ParseToken(token).ok());
  EXPECT_EQ(MaskTokens("no such policy '" + token + "'"), "no such policy 'osr_42_(not logged)'");
  // Two in one text, one in a path, one next to other word characters.
  std::string two = "/api/v1/items/" + token + "/failover " + token + "x";
  std::string masked = MaskTokens(two);
  EXPECT_EQ(masked.find(secret.substr(0, 16)), std::string::npos) << masked;
  EXPECT_EQ(masked, "/api/v1/items/osr_42_(not logged)/failover osr_42_(not logged)");
  // What is not a token stays: too short a secret, no id, no prefix.
  for (const std::string& keep :
       std::vector<std::string>{"osr_1_short", "osr__" + secret, "osr_x_" + secret, "plain text"}) {
    EXPECT_EQ(MaskTokens(keep), keep);
  }
  EXPECT_EQ(MaskTokens(""), "");
}

}  // namespace
}  // namespace osr::vault
