// Catalog: the vault's persistent state in SQLite — sites, policies, VMs, replicated
// items, recovery points and jobs (docs/formats.md, "Vault catalog").
//
// Thread model: thread-safe; one connection guarded by mu_ (the vault's write rate is
// low: jobs and points, not data).
#pragma once

#include <sqlite3.h>

#include <cstdint>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"
#include "vault/job_state.h"

namespace osr::vault {

struct SiteRow {
  std::string name;
  std::string api;          // http://HOST:PORT/api/v1
  std::string replication;  // HOST:PORT
};

struct PolicyRow {
  std::string name;
  int64_t retention_s = 24 * 3600;
  int64_t crash_interval_s = 5;
  int64_t app_interval_s = 3600;
  std::string compression = "lz4";         // lz4 | none
  int64_t bandwidth_bytes_per_second = 0;  // 0: no limit
};

struct VmRow {
  std::string name;
  std::string site;
  nlohmann::json disks;  // [{name, size_bytes}]
  // How it runs: {driver: none|process|qemu, command, qemu_args, memory_bytes, cpus,
  // hooks: {freeze, thaw, pre_failover, post_failover}, hook_timeout_ms}
  nlohmann::json spec = nlohmann::json::object();
};

struct ItemRow {
  std::string vm;
  std::string source;
  std::string target;
  std::string policy;
  std::string state;
  uint64_t epoch = 1;
  nlohmann::json drill;  // {view, seq, disks[{name, uri}]} while a drill runs, else null
  // From failover until reprotect: {point, epoch, from (the old primary), planned}.
  nlohmann::json failover;
};

struct PointRow {
  int64_t id = 0;
  std::string vm;
  uint64_t seq = 0;
  int64_t time_ns = 0;
  std::string type;  // crash | app
};

struct JobRow {
  int64_t id = 0;
  std::string type;
  std::string vm;
  JobState state = JobState::kQueued;
  int progress = 0;                                // percent
  nlohmann::json steps = nlohmann::json::array();  // [{name, state, message}]
  std::string error;
  nlohmann::json result;
  nlohmann::json args;
  int64_t created_ns = 0;
  int64_t updated_ns = 0;
};

// An API token (vault/auth.h). Only the SHA-256 of its secret is kept.
struct TokenRow {
  int64_t id = 0;
  std::string name;  // who or what holds it ("alice", "ci", "quickstart-admin")
  std::string role;  // reader | operator | admin
  std::string secret_sha256;
  int64_t created_ns = 0;
  int64_t expires_ns = 0;
  int64_t revoked_ns = 0;  // 0: not revoked
  int64_t last_used_ns = 0;
  std::string created_by;
};

// A web UI session, made from a token at login; it ends with the token.
struct SessionRow {
  std::string id_sha256;
  int64_t token_id = 0;
  std::string csrf;  // the CSRF token the page sends back in X-CSRF-Token
  int64_t created_ns = 0;
  int64_t expires_ns = 0;
};

// One mutating call (or refused attempt): who, what, when, result.
struct AuditRow {
  int64_t id = 0;
  int64_t time_ns = 0;
  std::string principal;  // "token:3 (alice)", or "anonymous"
  std::string role;
  std::string method;
  std::string path;
  int status = 0;  // the HTTP status answered
  std::string message;
  std::string remote;  // the client's address
};

inline constexpr int64_t kAuditRowsMax = 100000;

class Catalog {
 public:
  static Result<std::unique_ptr<Catalog>> Open(const std::string& path);
  ~Catalog();

  Status PutSite(const SiteRow& s);
  std::vector<SiteRow> Sites();
  std::optional<SiteRow> Site(const std::string& name);

  Status PutPolicy(const PolicyRow& p);  // kAlreadyExists if the name is taken
  std::vector<PolicyRow> Policies();
  std::optional<PolicyRow> Policy(const std::string& name);

  Status PutVm(const VmRow& v);
  Status UpdateVm(const VmRow& v);  // kAlreadyExists
  std::vector<VmRow> Vms();
  std::optional<VmRow> Vm(const std::string& name);
  Status DeleteVm(const std::string& name);

  Status PutItem(const ItemRow& i);  // insert or replace
  std::vector<ItemRow> Items();
  std::optional<ItemRow> Item(const std::string& vm);
  Status DeleteItem(const std::string& vm);
  // The RPO over time (the web UI's chart): a sample, dropping the item's samples older
  // than keep_after_ns; and the samples since since_ns, oldest first.
  Status AddRpoSample(const std::string& vm, int64_t time_ns, double rpo_s, int64_t keep_after_ns);
  std::vector<std::pair<int64_t, double>> RpoSamples(const std::string& vm, int64_t since_ns);

  Result<int64_t> AddPoint(const PointRow& p);
  std::vector<PointRow> Points(const std::string& vm);
  Status DeletePoints(const std::string& vm);  // every point of the VM
  Status DeletePoint(int64_t id);
  // One transaction: deletes the VM's points `prune` (ids; retention's choice) and adds
  // `p`; the new point's id. Either both happen or neither (kIoError).
  Result<int64_t> AddPointAndPrune(const PointRow& p, const std::vector<int64_t>& prune);
  // The meta table's other keys ("clock": the vault's ClockWatch state): the value, or
  // none when the key is not there.
  std::optional<std::string> Meta(const std::string& key);
  Status PutMeta(const std::string& key, const std::string& value);

  Result<int64_t> AddToken(const TokenRow& t);
  std::optional<TokenRow> Token(int64_t id);
  std::vector<TokenRow> Tokens();
  Status RevokeToken(int64_t id, int64_t now_ns);  // and ends its sessions
  Status TouchToken(int64_t id, int64_t now_ns);
  Status AddSession(const SessionRow& s);  // also drops expired sessions
  std::optional<SessionRow> Session(const std::string& id_sha256);
  Status DeleteSession(const std::string& id_sha256);
  // Keeps the newest kAuditRowsMax entries.
  Status AddAudit(const AuditRow& a);
  // At most `limit` entries from since_ns on, the newest ones, oldest first.
  std::vector<AuditRow> Audit(int64_t since_ns, size_t limit);

  Result<int64_t> AddJob(const JobRow& j);
  Status UpdateJob(const JobRow& j);
  // The jobs of `vm` ("": every VM) in `state` (nullopt: any), oldest first. A row whose
  // state this build does not know reads as Failed, saying so in its error.
  std::vector<JobRow> Jobs(const std::string& vm = "",
                           std::optional<JobState> state = std::nullopt);
  std::optional<JobRow> Job(int64_t id);

 private:
  Result<int64_t> InsertPointLocked(const PointRow& p);  // holds mu_
  Catalog() = default;
  Status Exec(const std::string& sql);

  std::mutex mu_;
  sqlite3* db_ = nullptr;  // guarded by mu_
};

int64_t NowNs();

}  // namespace osr::vault
