// Who may call the vault (DESIGN.md invariant 8; docs/security.md).
//
// Principals authenticate with an API token (`Authorization: Bearer osr_<id>_<secret>`)
// or, in the web UI, with a session made from a token at POST /api/v1/login (cookie
// `osr_session`, HttpOnly, SameSite=Strict, plus a CSRF token the page sends back in
// `X-CSRF-Token`). The catalog keeps only SHA-256 digests of token secrets and session
// ids, so a copy of vault.db does not let anyone in.
//
// Roles follow Azure Site Recovery's built-in roles: reader (Site Recovery Reader: GET
// only), operator (Site Recovery Operator: drills, failover, change point, commit,
// reprotect, recovery points, VM start/stop) and admin (Site Recovery Contributor plus
// access management: sites, policies, VMs and their specs, protection, tokens, audit).
// Each role may do what the ones below it may.
//
// Thread model: values and pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "common/status.h"

namespace osr::vault {

enum class Role : int { kReader = 0, kOperator = 1, kAdmin = 2 };

std::string_view RoleName(Role r);
std::optional<Role> ParseRole(std::string_view s);
// Whether a principal with role `have` may call a route that needs `need`.
inline bool RoleAllows(Role have, Role need) {
  return static_cast<int>(have) >= static_cast<int>(need);
}

// A token as the user sees it once, when it is created: "osr_<id>_<secret>", where id is
// the catalog row and secret 43 characters of base64url (256 random bits).
struct TokenParts {
  int64_t id = 0;
  std::string secret;
};
std::string FormatToken(int64_t id, std::string_view secret);
// kInvalidArgument when `token` does not have that shape.
Result<TokenParts> ParseToken(std::string_view token);

// `text` with the secret of every token in it ("osr_<id>_<secret>", the secret 16 or more
// base64url characters) replaced by "(not logged)": what an audit row or a log line may keep
// of a value a caller sent (a token pasted in a wrong field, a path, an error that echoes
// it). The id stays, so an operator can tell which token leaked and revoke it.
std::string MaskTokens(std::string_view text);

// `bytes` random bytes from OpenSSL's CSPRNG as base64url without padding.
// kInternal when the CSPRNG fails (the caller must not go on with a weak secret).
Result<std::string> RandomSecret(size_t bytes = 32);
// Lower-case hex SHA-256 of `s`: what the catalog keeps of secrets.
std::string Sha256Hex(std::string_view s);
// Compares two digests in time that does not depend on where they differ.
bool DigestEquals(std::string_view a, std::string_view b);

// Token lifetimes: what `osr token create --expires` accepts, in seconds.
inline constexpr int64_t kTokenTtlSMax = 3 * 366 * 86400;
inline constexpr int64_t kTokenTtlSDefault = 90 * 86400;
inline constexpr int64_t kSessionTtlS = 12 * 3600;

}  // namespace osr::vault
