// Vault: the control plane. The catalog (SQLite), the REST API for the CLI and the web UI
// (docs/api.md), jobs for every long operation, and recovery points. It speaks to each
// site's HTTP API (docs/api.md, "Site API"); it holds no disk data.
//
// Item states (DESIGN.md): EnablingProtection -> Protected -test-failover->
// TestFailoverCompleted -cleanup-> Protected.
//
// Thread model: HTTP handlers run on cpp-httplib's pool; jobs run one at a time on the
// job thread, in submission order; the point thread makes crash-consistent points and
// applies retention. mu_ guards the job queue; the catalog is thread-safe.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "common/socket.h"
#include "vault/catalog.h"

namespace httplib {
class Server;
}

namespace osr::vault {

struct VaultConfig {
  std::string db_path;
  ListenAddress api_listen;
  int point_tick_ms = 1000;
  int job_wait_ms_max = 120000;  // a job step waiting for replication gives up after this
  int call_wait_ms_max = 30000;  // an API call waiting for replication (below the CLI's 60 s)
};

class Vault {
 public:
  static Result<std::unique_ptr<Vault>> Start(const VaultConfig& cfg);
  ~Vault();
  void Stop();
  const ListenAddress& address() const { return bound_; }
  Catalog& catalog() { return *catalog_; }

  // The operations behind the REST API (also used by quickstart).
  Result<nlohmann::json> RegisterSite(const std::string& name, const std::string& api,
                                      const std::string& replication);
  nlohmann::json ListSites();
  Result<nlohmann::json> CreatePolicy(const PolicyRow& p);
  nlohmann::json ListPolicies();
  Result<nlohmann::json> CreateVm(const std::string& name, const std::string& site,
                                  const nlohmann::json& disks);
  nlohmann::json ListVms();
  Result<nlohmann::json> ShowVm(const std::string& name);
  Result<nlohmann::json> Protect(const std::string& vm, const std::string& target,
                                 const std::string& policy);
  Result<nlohmann::json> Unprotect(const std::string& vm);
  nlohmann::json ListItems();
  Result<nlohmann::json> ShowItem(const std::string& vm);
  Result<nlohmann::json> ListPoints(const std::string& vm);
  Result<nlohmann::json> CreatePoint(const std::string& vm, bool app);
  Result<nlohmann::json> TestFailover(const std::string& vm, const std::string& spec);
  Result<nlohmann::json> TestFailoverCleanup(const std::string& vm, const std::string& notes);
  nlohmann::json ListJobs(const std::string& vm, const std::string& state);
  Result<nlohmann::json> ShowJob(int64_t id);

 private:
  explicit Vault(VaultConfig cfg);
  void SetupRoutes();
  Result<nlohmann::json> Submit(const std::string& type, const std::string& vm,
                                const nlohmann::json& args);
  void JobLoop();
  void RunJob(JobRow& job);
  void PointLoop();
  Result<PointRow> ResolvePoint(const ItemRow& item, const std::string& spec, JobRow* job);
  // Waits (at most wait_ms, less if the vault stops) until the recovery site has every
  // write made so far, then records a point there.
  Result<PointRow> PointAtLatest(const ItemRow& item, const std::string& type, int wait_ms);
  // Re-points a source site's replication at its target's current address (a site that
  // restarted may listen elsewhere now).
  void ReconcileReplication(const ItemRow& item);
  nlohmann::json ItemJson(const ItemRow& item);

  const VaultConfig cfg_;
  std::unique_ptr<Catalog> catalog_;
  std::unique_ptr<httplib::Server> http_;
  ListenAddress bound_;
  std::thread http_thread_;
  std::thread job_thread_;
  std::thread point_thread_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<int64_t> queue_;  // guarded by mu_
  bool stop_ = false;          // guarded by mu_
  std::atomic<bool> stopping_{false};
};

// A site's HTTP API. Every call has a timeout; an unreachable site is kUnavailable with
// a message naming the site.
class SiteClient {
 public:
  explicit SiteClient(SiteRow site) : site_(std::move(site)) {}
  Result<nlohmann::json> Call(const std::string& method, const std::string& path,
                              const nlohmann::json& body = nullptr);

 private:
  SiteRow site_;
};

}  // namespace osr::vault
