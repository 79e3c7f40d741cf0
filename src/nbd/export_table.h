// ExportTable: the exports a server offers, by name. Disks, and point-in-time views that
// come and go while the server runs.
//
// Thread model: thread-safe; mu_ guards the map.
//
// Ownership (docs/architecture.md, "Who owns what across threads"): an export, and so its
// disk, is shared (shared_ptr) between the table and the sessions that chose it, because
// they let go of it on different threads (an NBD connection thread, the remover's). That
// sharing ends in one known place: whoever removes an export (Remove) holds the removed
// reference, passes it to Server::DisconnectExport, which ends the sessions that hold it
// and returns once the remover's reference is the last, and then drops it: the disk is
// freed there, on the remover's thread, before the remover frees what the disk borrows
// (a capture group) or reports a view closed. A session releases its export as soon as
// it ends, not when the server reaps it.
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
  // Returns the removed export (nullptr if there was none); the caller holds it until
  // Server::DisconnectExport says it is the last holder (see the file comment).
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
