#include "site/lease_token.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <cerrno>
#include <span>

#include "common/file.h"
#include "common/https.h"
#include "common/json_in.h"

namespace osr::site {

using nlohmann::json;

namespace {

constexpr uint64_t kFileBytesMax = 4096;
constexpr uint64_t kFileVersion = 1;
constexpr size_t kShownValueMax = 40;  // of a bad header value, in a message

std::string Shown(std::string_view text) {
  std::string out(text.substr(0, kShownValueMax));
  for (char& c : out) {
    if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) > 0x7e) c = '?';
  }
  return text.size() > kShownValueMax ? out + "..." : out;
}

}  // namespace

Result<uint64_t> ParseLeaseToken(std::string_view text) {
  auto bad = [&](std::string_view why) {
    return InvalidArgument(fmt::format("header {}: '{}' {}", kLeaseTokenHeader, Shown(text), why));
  };
  if (text.empty() || text.size() > 19) return bad("is not a lease token (1-19 digits)");
  uint64_t v = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return bad("is not a lease token (decimal digits only)");
    v = v * 10 + static_cast<uint64_t>(c - '0');  // 19 digits fit in 64 bits
  }
  if (v == 0 || v > kLeaseTokenMax)
    return bad(fmt::format("is out of range (1..{})", kLeaseTokenMax));
  return v;
}

Result<std::unique_ptr<LeaseTokenFence>> LeaseTokenFence::Open(std::string path) {
  auto damaged = [&](const std::string& why) {
    return Corruption(fmt::format(
        "{} is damaged ({}): the highest vault lease token this site has seen is unknown. "
        "Put it back from a backup, or remove it: the site then takes the next token the "
        "leading vault sends, and a paused old vault's calls are not fenced until then",
        path, why));
  };
  auto text = ReadSmallFile(path, kFileBytesMax);
  if (!text.ok()) {
    if (text.status().code() == Code::kNotFound) {
      return std::unique_ptr<LeaseTokenFence>(new LeaseTokenFence(std::move(path), 0));
    }
    if (text.status().code() == Code::kCorruption) return damaged(text.status().message());
    return Status(text.status().code(),
                  fmt::format("the site's lease token ({}): {}", path, text.status().message()));
  }
  auto j = json_in::ParseObject(*text, "the lease token file", kFileBytesMax, 4);
  if (!j.ok()) return damaged(j.status().message());
  json_in::Fields f(*j);
  uint64_t version = f.U64("version");
  uint64_t token = f.U64("lease_token");
  if (f.ok() && token > kLeaseTokenMax) f.Fail("lease_token", "is above 2^63-1");
  f.RefuseOthers();
  if (!f.ok()) return damaged(f.status().message());
  if (version != kFileVersion) return damaged(fmt::format("version {} is not 1", version));
  return std::unique_ptr<LeaseTokenFence>(new LeaseTokenFence(std::move(path), token));
}

Status LeaseTokenFence::Refuse(uint64_t token) const {
  uint64_t h = highest_.load();
  if (h >= kLeaseTokenMax) {
    // No vault's token can pass it (only someone holding the vault's certificate can have
    // sent it): the site's record is reset by hand.
    return Status(Code::kFailedPrecondition,
                  fmt::format("fenced: this site has seen lease token {}, the highest there is; "
                              "this call carries {}. No vault can lead here again until the "
                              "site is stopped and its {} removed (docs/operations.md)",
                              h, token, path_));
  }
  return Status(Code::kFailedPrecondition,
                fmt::format("fenced: this site has seen lease token {}; this call carries {} — "
                            "another vault leads now. If this vault's catalog was restored from "
                            "a backup, start it once with --lease-token-floor {} "
                            "(docs/operations.md)",
                            h, token, h));
}

void LeaseTokenFence::RaiseHighest(uint64_t token) {
  uint64_t seen = highest_.load();
  while (seen < token && !highest_.compare_exchange_weak(seen, token)) {
  }
}

Status LeaseTokenFence::Persist(uint64_t token) {
  std::lock_guard hold(write_mu_);
  if (token <= durable_.load()) return Status::Ok();
  uint64_t to = std::max(token, highest_.load());
  std::string text = json{{"version", kFileVersion}, {"lease_token", to}}.dump() + "\n";
  Status st =
      WriteFileAtomic(path_, std::span(reinterpret_cast<const uint8_t*>(text.data()), text.size()),
                      FilePerms::kOwnerOnly);
  if (!st.ok()) {
    return Status(st.code(),
                  fmt::format("cannot record lease token {} in {}: {}", to, path_, st.message()));
  }
  durable_.store(to);
  return Status::Ok();
}

Result<LeaseTokenFence::Admission> LeaseTokenFence::AdmitChange(std::optional<uint64_t> token) {
  if (!token) return Admission();
  {
    std::shared_lock hold(mu_);
    if (*token < highest_.load()) return Refuse(*token);
    if (*token <= drained_ && *token <= durable_.load()) return Admission(std::move(hold));
  }
  {
    // Exclusive: every call admitted before (all of lower or equal tokens) has ended.
    std::unique_lock hold(mu_);
    RaiseHighest(*token);  // fence first: lower tokens are refused, written or not
    OSR_RETURN_IF_ERROR(Persist(*token));
    drained_ = std::max(drained_, *token);
  }
  // A higher token may have come between the two holds: it wins.
  std::shared_lock hold(mu_);
  if (*token < highest_.load()) return Refuse(*token);
  return Admission(std::move(hold));
}

void LeaseTokenFence::NoteRead(uint64_t token) {
  if (token <= durable_.load() && token <= highest_.load()) return;
  RaiseHighest(token);  // no wait for the calls under way: a read changes nothing
  if (Status st = Persist(token); !st.ok()) {
    spdlog::error(
        "site: {} (the read goes on; lower tokens are refused until this process ends, and "
        "the write is tried again at the next call with a token above the file's)",
        st.message());
  }
}

}  // namespace osr::site
