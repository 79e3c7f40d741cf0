#include "nbd/export_table.h"

namespace osr::nbd {

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
