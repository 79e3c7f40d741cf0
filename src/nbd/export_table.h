// ExportTable: the exports a server offers, by name. Disks, and point-in-time views that
// come and go while the server runs.
//
// Thread model: thread-safe. An export is shared (shared_ptr) between the table and the
// sessions connected to it: a session keeps the export's disk alive until it ends, even
// after the export was removed (Server::DisconnectExport ends such sessions promptly).
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "nbd/access.h"
#include "nbd/disk.h"

namespace osr::nbd {

struct Export {
  std::string name;
  std::string description;
  std::shared_ptr<Disk> disk;
  std::string vm;  // the VM whose own unix socket may open it ("": no VM socket may)
};

// Whether `p` may see and open `e`. `authz` (for kCertificate) may be nullptr: no limit.
bool MayOpen(const Principal& p, const Export& e, const Authz* authz);

class ExportTable {
 public:
  // kAlreadyExists if the name is taken.
  Status Add(Export e);
  // Returns the removed export (nullptr if there was none).
  std::shared_ptr<const Export> Remove(const std::string& name);
  // The export of that name. The empty name is the default export: the one named "",
  // or the only export when there is exactly one.
  std::shared_ptr<const Export> Find(std::string_view name) const;
  // The same, among the exports `p` may open only (the default export is the only one it
  // may open, when there is exactly one). nullptr when there is none it may open.
  std::shared_ptr<const Export> FindFor(std::string_view name, const Principal& p,
                                        const Authz* authz) const;
  std::vector<std::shared_ptr<const Export>> List() const;
  std::vector<std::shared_ptr<const Export>> ListFor(const Principal& p, const Authz* authz) const;

 private:
  mutable std::mutex mu_;
  std::map<std::string, std::shared_ptr<const Export>, std::less<>> exports_;  // guarded by mu_
};

}  // namespace osr::nbd
