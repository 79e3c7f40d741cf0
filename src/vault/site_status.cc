#include "vault/site_status.h"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>

#include "common/json_in.h"

namespace osr::vault {

using nlohmann::json;

namespace {
// The longest generation kept for ?since= (a site's is 37 bytes: site/store_changes.h).
constexpr size_t kGenerationBytesMax = 64;
}  // namespace

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
  const auto& by_name = l.remembered ? memory_->sites_.at(site.name).by_name : l.by_name;
  auto found = by_name.find(vm);
  if (found == by_name.end()) {
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
  if (kind == Kind::kStores && memory_ != nullptr) return ReadChanges(site);
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
  l.status = ByName(*answer, prefix, l.by_name);
  return l;
}

SiteStatusBoard::Listing SiteStatusBoard::ReadChanges(const SiteRow& site) {
  Listing l;
  ++calls_;
  auto known = memory_->sites_.find(site.name);
  bool from_start = refresh_ || known == memory_->sites_.end();
  auto answer =
      fetch_(site, "/stores?since=" + (from_start ? std::string("0") : known->second.generation));
  if (!answer.ok()) {
    if (answer.status().code() == Code::kNotFound) {
      l.per_vm = true;  // an osrd without the bulk route
      memory_->sites_.erase(site.name);
    } else {
      // The memory stays: the next pass asks since the same generation.
      l.status = answer.status();
    }
    return l;
  }
  std::string prefix = fmt::format("site {} stores", site.name);
  if (answer->is_array()) {
    // An osrd without ?since= answers every store, as GET /stores: nothing to remember.
    memory_->sites_.erase(site.name);
    l.status = ByName(*answer, prefix, l.by_name);
    return l;
  }
  if (!answer->is_object()) {
    memory_->sites_.erase(site.name);
    l.status = Corruption(prefix + ": neither an array nor an object");
    return l;
  }
  json_in::Fields f(*answer, prefix + ".");
  std::string generation = f.String("generation");
  bool full = f.Bool("full", false);
  const json* removed = f.Array("removed", /*optional=*/false);
  f.Array("stores", /*optional=*/false);
  Status bad = f.status();
  // It goes back into a URL: a token of a few plain characters, nothing else.
  if (bad.ok() && (generation.empty() || generation.size() > kGenerationBytesMax ||
                   !std::all_of(generation.begin(), generation.end(), [](char c) {
                     return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '.';
                   }))) {
    bad = Corruption(prefix + ".generation: not a generation this vault can send back");
  }
  std::vector<std::string> gone;
  for (size_t i = 0; bad.ok() && i < removed->size(); ++i) {
    if (!(*removed)[i].is_string()) {
      bad = Corruption(fmt::format("{}.removed[{}]: not a string", prefix, i));
    } else {
      gone.push_back((*removed)[i].get<std::string>());
    }
  }
  std::map<std::string, json> changed;
  if (bad.ok()) bad = ByName(*answer->find("stores"), prefix + ".stores", changed);
  if (!bad.ok()) {
    // An answer the vault cannot read: nothing of it is kept, and the next pass starts over.
    memory_->sites_.erase(site.name);
    l.status = Corruption(bad.message());
    return l;
  }
  StoreMemory::Site& mem = memory_->sites_[site.name];
  if (full || from_start) mem.by_name.clear();
  for (auto& name : gone) mem.by_name.erase(name);
  for (auto& [name, entry] : changed) mem.by_name[name] = std::move(entry);
  mem.generation = std::move(generation);
  l.remembered = true;
  return l;
}

Status SiteStatusBoard::ByName(json& answer, const std::string& prefix,
                               std::map<std::string, json>& by_name) {
  for (size_t i = 0; i < answer.size(); ++i) {
    json& entry = answer[i];
    json_in::Fields f(entry, fmt::format("{}[{}].", prefix, i));
    std::string name = f.String("name");
    if (!f.ok()) {
      // One entry the vault cannot read: the whole answer is suspect, as a per-VM answer
      // of the wrong shape is (the item's health says so).
      by_name.clear();
      return Corruption(f.status().message());
    }
    by_name[name] = std::move(entry);
  }
  return Status::Ok();
}

}  // namespace osr::vault
