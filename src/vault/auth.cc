#include "vault/auth.h"

#include <fmt/format.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include <charconv>
#include <regex>
#include <vector>

namespace osr::vault {

std::string_view RoleName(Role r) {
  switch (r) {
    case Role::kReader:
      return "reader";
    case Role::kOperator:
      return "operator";
    case Role::kAdmin:
      return "admin";
  }
  return "reader";
}

std::optional<Role> ParseRole(std::string_view s) {
  if (s == "reader") return Role::kReader;
  if (s == "operator") return Role::kOperator;
  if (s == "admin") return Role::kAdmin;
  return std::nullopt;
}

std::string FormatToken(int64_t id, std::string_view secret) {
  return fmt::format("osr_{}_{}", id, secret);
}

Result<TokenParts> ParseToken(std::string_view t) {
  auto bad = [] { return InvalidArgument("not an osr token (osr_<id>_<secret>)"); };
  if (t.size() > 256 || t.substr(0, 4) != "osr_") return bad();
  t.remove_prefix(4);
  auto us = t.find('_');
  if (us == std::string_view::npos || us == 0) return bad();
  TokenParts p;
  auto [ptr, ec] = std::from_chars(t.data(), t.data() + us, p.id);
  if (ec != std::errc() || ptr != t.data() + us || p.id <= 0) return bad();
  p.secret = std::string(t.substr(us + 1));
  if (p.secret.size() < 16) return bad();
  for (char c : p.secret) {
    bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '_';
    if (!ok) return bad();
  }
  return p;
}

std::string MaskTokens(std::string_view text) {
  if (text.find("osr_") == std::string_view::npos) return std::string(text);
  static const std::regex kToken("osr_([0-9]+)_[A-Za-z0-9_-]{16,}");
  return std::regex_replace(std::string(text), kToken, "osr_$1_(not logged)");
}

Result<std::string> RandomSecret(size_t bytes) {
  std::vector<unsigned char> raw(bytes);
  if (RAND_bytes(raw.data(), static_cast<int>(raw.size())) != 1) {
    return Internal("the system's random number generator failed");
  }
  static constexpr char kAlphabet[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  std::string out;
  uint32_t acc = 0;
  int bits = 0;
  for (unsigned char b : raw) {
    acc = (acc << 8) | b;
    bits += 8;
    while (bits >= 6) {
      bits -= 6;
      out.push_back(kAlphabet[(acc >> bits) & 63]);
    }
  }
  if (bits > 0) out.push_back(kAlphabet[(acc << (6 - bits)) & 63]);
  OPENSSL_cleanse(raw.data(), raw.size());
  return out;
}

std::string Sha256Hex(std::string_view s) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  EVP_Digest(s.data(), s.size(), md, &n, EVP_sha256(), nullptr);
  std::string out;
  out.reserve(n * 2);
  for (unsigned int i = 0; i < n; ++i) out += fmt::format("{:02x}", md[i]);
  return out;
}

bool DigestEquals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

}  // namespace osr::vault
