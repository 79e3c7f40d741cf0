#include "nbd/access.h"

#include <fmt/format.h>

namespace osr::nbd {

std::string Principal::Describe() const {
  switch (kind) {
    case Kind::kAnonymous:
      return "anonymous";
    case Kind::kLocalVm:
      return fmt::format("VM {} (its own socket)", name);
    case Kind::kCertificate:
      return fmt::format("certificate '{}'", name);
  }
  return "unknown";
}

std::vector<std::string> Authz::Identities() const {
  std::vector<std::string> out;
  for (const auto& r : rules_) out.push_back(r.identity);
  return out;
}

bool Authz::Allows(std::string_view identity, std::string_view export_name) const {
  if (rules_.empty()) return true;
  for (const auto& r : rules_) {
    if (r.identity != identity) continue;
    if (r.export_prefixes.empty()) return true;
    for (const auto& p : r.export_prefixes) {
      if (export_name.substr(0, p.size()) == p) return true;
    }
  }
  return false;
}

}  // namespace osr::nbd
