#include "vault/site_status.h"

#include <fmt/format.h>

#include "common/json_in.h"

namespace osr::vault {

using nlohmann::json;

Result<json> SiteStatusBoard::Group(const SiteRow& site, const std::string& vm) {
  return Lookup(Kind::kGroups, site, vm);
}

Result<json> SiteStatusBoard::Store(const SiteRow& site, const std::string& vm) {
  return Lookup(Kind::kStores, site, vm);
}

std::optional<SiteRow> SiteStatusBoard::Site(const std::string& name) {
  if (!sites_) {
    sites_.emplace();
    if (list_sites_) {
      for (SiteRow& r : list_sites_()) sites_->emplace(r.name, std::move(r));
    }
  }
  auto it = sites_->find(name);
  if (it == sites_->end()) return std::nullopt;
  return it->second;
}

void SiteStatusBoard::Forget(const std::string& site) {
  listings_.erase({site, Kind::kGroups});
  listings_.erase({site, Kind::kStores});
}

Result<json> SiteStatusBoard::Lookup(Kind kind, const SiteRow& site, const std::string& vm) {
  if (mode_ == Mode::kPerVm) return FetchOne(kind, site, vm);
  auto key = std::make_pair(site.name, kind);
  auto it = listings_.find(key);
  if (it == listings_.end()) it = listings_.emplace(key, Read(kind, site)).first;
  const Listing& l = it->second;
  if (l.per_vm) return FetchOne(kind, site, vm);
  if (!l.status.ok()) return l.status;
  auto found = l.by_name.find(vm);
  if (found == l.by_name.end()) {
    // As the site's per-VM route says it (src/site/site.cc), so health reads the same.
    return NotFound(kind == Kind::kGroups
                        ? fmt::format("site {}: no VM {} at this site", site.name, vm)
                        : fmt::format("site {}: no store for {} at this site", site.name, vm));
  }
  return found->second;
}

Result<json> SiteStatusBoard::FetchOne(Kind kind, const SiteRow& site, const std::string& vm) {
  ++calls_;
  return fetch_(site, (kind == Kind::kGroups ? "/groups/" : "/stores/") + vm);
}

SiteStatusBoard::Listing SiteStatusBoard::Read(Kind kind, const SiteRow& site) {
  Listing l;
  ++calls_;
  const char* what = kind == Kind::kGroups ? "groups" : "stores";
  auto answer = fetch_(site, std::string("/") + what);
  if (!answer.ok()) {
    // An osrd without the bulk route (older than this vault) answers 404: per VM then.
    if (answer.status().code() == Code::kNotFound) {
      l.per_vm = true;
    } else {
      l.status = answer.status();
    }
    return l;
  }
  std::string prefix = fmt::format("site {} {}", site.name, what);
  if (!answer->is_array()) {
    l.status = Corruption(prefix + ": not an array");
    return l;
  }
  for (size_t i = 0; i < answer->size(); ++i) {
    json& entry = (*answer)[i];
    json_in::Fields f(entry, fmt::format("{}[{}].", prefix, i));
    std::string name = f.String("name");
    if (!f.ok()) {
      // One entry the vault cannot read: the whole answer is suspect, as a per-VM answer
      // of the wrong shape is (the item's health says so).
      l.status = Corruption(f.status().message());
      l.by_name.clear();
      return l;
    }
    l.by_name[name] = std::move(entry);
  }
  return l;
}

}  // namespace osr::vault
