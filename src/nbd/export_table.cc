#include "nbd/export_table.h"

namespace osr::nbd {

bool MayOpen(const Principal& p, const Export& e, const Authz* authz) {
  switch (p.kind) {
    case Principal::Kind::kAnonymous:
      return true;
    case Principal::Kind::kLocalVm:
      return !e.vm.empty() && e.vm == p.name;
    case Principal::Kind::kCertificate:
      return authz == nullptr || authz->Allows(p.name, e.name);
  }
  return false;
}

Status ExportTable::Add(Export e) {
  OSR_CHECK(e.disk != nullptr);
  std::lock_guard lock(mu_);
  if (exports_.count(e.name)) {
    return Status(Code::kAlreadyExists, "an export named '" + e.name + "' exists already");
  }
  std::string name = e.name;
  exports_.emplace(name, std::make_shared<const Export>(std::move(e)));
  return Status::Ok();
}

std::shared_ptr<const Export> ExportTable::Remove(const std::string& name) {
  std::lock_guard lock(mu_);
  auto it = exports_.find(name);
  if (it == exports_.end()) return nullptr;
  auto e = it->second;
  exports_.erase(it);
  return e;
}

std::shared_ptr<const Export> ExportTable::Find(std::string_view name) const {
  std::lock_guard lock(mu_);
  auto it = exports_.find(name);
  if (it != exports_.end()) return it->second;
  if (name.empty() && exports_.size() == 1) return exports_.begin()->second;
  return nullptr;
}

std::vector<std::shared_ptr<const Export>> ExportTable::List() const {
  std::lock_guard lock(mu_);
  std::vector<std::shared_ptr<const Export>> out;
  for (auto& [n, e] : exports_) out.push_back(e);
  return out;
}

}  // namespace osr::nbd

namespace osr::nbd {

std::shared_ptr<const Export> ExportTable::FindFor(std::string_view name, const Principal& p,
                                                   const Authz* authz) const {
  std::lock_guard lock(mu_);
  auto it = exports_.find(name);
  if (it != exports_.end()) return MayOpen(p, *it->second, authz) ? it->second : nullptr;
  if (!name.empty()) return nullptr;
  std::shared_ptr<const Export> only;
  for (auto& [n, e] : exports_) {
    if (!MayOpen(p, *e, authz)) continue;
    if (only) return nullptr;  // more than one: no default
    only = e;
  }
  return only;
}

std::vector<std::shared_ptr<const Export>> ExportTable::ListFor(const Principal& p,
                                                                const Authz* authz) const {
  std::lock_guard lock(mu_);
  std::vector<std::shared_ptr<const Export>> out;
  for (auto& [n, e] : exports_) {
    if (MayOpen(p, *e, authz)) out.push_back(e);
  }
  return out;
}

}  // namespace osr::nbd
