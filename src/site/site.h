// Site: the site daemon's state and parts. A site serves its VMs' disks over NBD with
// capture (one consistency group per VM), ships each protected group to its recovery
// site (Sender), receives the groups it protects for others into recovery stores
// (Receiver), and serves point-in-time views of them over NBD. The vault drives it
// through the HTTP API (site_api.h).
//
//   data_dir/site.json             groups and stores (rewritten atomically on change)
//   data_dir/groups/<vm>/<disk>.img   the disks; data_dir/groups/<vm>/capture/ the log
//   data_dir/stores/<vm>/          recovery stores (store.json, base/, journal/)
//   data_dir/views/<id>-<disk>.overlay   overlays of writable views (removed with them)
//
// Exports: "<vm>/<disk>" for disks, "<view id>/<disk>" for views.
//
// Thread model: thread-safe; mu_ guards the maps. Parts run their own threads (NBD
// server, receiver, senders, capture log writers).
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "capture/capture_group.h"
#include "nbd/file_disk.h"
#include "common/socket.h"
#include "common/tls.h"
#include "nbd/export_table.h"
#include "nbd/server.h"
#include "replication/receiver.h"
#include "replication/sender.h"
#include "store/recovery_store.h"
#include "store/views.h"

namespace osr::site {

struct SiteConfig {
  std::string name;
  std::string data_dir;
  ListenAddress nbd_listen;          // disks and views
  ListenAddress replication_listen;  // the receiver
  ListenAddress api_listen;          // the HTTP API for the vault
  uint64_t region_bytes = 64 * 1024;
  uint64_t disk_bytes_max = 16ull << 40;
  size_t views_max = 64;
  size_t disks_per_vm_max = 64;
  uint64_t capture_log_bytes_max = 8ull << 30;  // per VM; past it: bitmap, then resync
  TlsFiles tls;  // replication between sites: mutual TLS when set (tls_ca, tls_cert, tls_key)

  // Reads a TOML file: name, data_dir, nbd_listen, replication_listen, api_listen, and
  // optionally tls_ca, tls_cert, tls_key (PEM files).
  static Result<SiteConfig> Load(const std::string& path);
};

struct DiskSpec {
  std::string name;
  uint64_t size_bytes;
};

class Site {
 public:
  static Result<std::unique_ptr<Site>> Start(const SiteConfig& cfg);
  ~Site();
  void Stop();

  const SiteConfig& config() const { return cfg_; }
  const ListenAddress& nbd_address() const { return nbd_bound_; }
  const ListenAddress& replication_address() const { return repl_bound_; }

  // Source role: a VM's disks, captured as one group.
  Result<nlohmann::json> CreateGroup(const std::string& vm, const std::vector<DiskSpec>& disks);
  Status DeleteGroup(const std::string& vm);
  Status StartReplication(const std::string& vm, const std::string& target, uint64_t epoch,
                          bool compress = true, uint64_t bandwidth_bytes_per_second = 0);
  Status StopReplication(const std::string& vm);
  // Fencing: the VM now runs elsewhere at `epoch`; this site refuses writes to its disks
  // and stops shipping them. Kept across restarts.
  Status FenceGroup(const std::string& vm, uint64_t epoch);
  Result<nlohmann::json> GroupStatus(const std::string& vm);

  // Recovery role: a store for another site's group.
  Status CreateStore(const std::string& vm, const std::vector<DiskSpec>& disks);
  Status DeleteStore(const std::string& vm);
  // Folds the store's history up to `seq` (not past an open view); returns the new base.
  Result<nlohmann::json> FoldStore(const std::string& vm, uint64_t seq);
  Result<nlohmann::json> StoreStatus(const std::string& vm);
  Result<nlohmann::json> OpenView(const std::string& vm, uint64_t seq, bool writable);
  Status CloseView(const std::string& id);

  nlohmann::json Describe();
  std::string Metrics();

 private:
  struct Group {
    std::vector<DiskSpec> disks;
    std::unique_ptr<capture::CaptureGroup> capture;
    std::string replicate_to;  // "" when not protected
    uint64_t epoch = 1;
    bool compress = true;
    uint64_t bandwidth_bytes_per_second = 0;  // 0: no limit
    uint64_t fenced_epoch = 0;                // 0: not fenced
    std::unique_ptr<replication::Sender> sender;
  };
  struct View {
    std::string vm;
    uint64_t seq;
    bool writable;
    std::vector<std::string> exports;
  };

  explicit Site(SiteConfig cfg) : cfg_(std::move(cfg)) {}
  Status Load();
  // Names valid and unique, sizes within limits.
  Status CheckDisks(const std::string& vm, const std::vector<DiskSpec>& disks) const;
  Status SaveLocked();  // holds mu_
  Status OpenGroupLocked(const std::string& vm, Group& g);
  Status StartSenderLocked(const std::string& vm, Group& g);
  std::string Uri(const std::string& export_name) const;

  const SiteConfig cfg_;
  nbd::ExportTable exports_;
  std::unique_ptr<nbd::Server> nbd_;
  std::unique_ptr<replication::Receiver> receiver_;
  std::shared_ptr<TlsContext> tls_client_;  // for senders; nullptr: plain TCP
  ListenAddress nbd_bound_;
  ListenAddress repl_bound_;

  std::mutex mu_;
  std::map<std::string, std::unique_ptr<Group>> groups_;                 // guarded by mu_
  std::map<std::string, std::shared_ptr<store::RecoveryStore>> stores_;  // guarded by mu_
  std::map<std::string, View> views_;                                    // guarded by mu_
  uint64_t next_view_ = 1;                                               // guarded by mu_
};

}  // namespace osr::site
