// Catalog: the vault's persistent state — sites, policies, VMs, replicated items,
// recovery points and jobs (docs/formats.md, "Vault catalog") — in SQLite (a file, the
// default) or PostgreSQL (a server, for several vaults). Each query is written once
// (vault/sql.h keeps what differs between the two).
//
// Errors of every call: those of vault/sql.h — kAlreadyExists where a key is taken,
// kUnavailable when the PostgreSQL server cannot be reached or did not answer in time
// (named in the message; the next call connects again), kIoError for anything else the
// database refused; reads add kCorruption for a row whose field is not of its type.
//
// Thread model: thread-safe; one connection guarded by mu_ (the vault's write rate is
// low: jobs and points, not data). A Transact() body holds mu_ for its whole run.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"
#include "vault/job_state.h"
#include "vault/sql.h"

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
  // `db`: a SQLite file path, or a postgresql:// (postgres://) URL. Creates the schema
  // of a new catalog, upgrades an older one in place; kCorruption for a catalog of a
  // newer schema than this build knows.
  static Result<std::unique_ptr<Catalog>> Open(const std::string& db,
                                               const PostgresOptions& pg = {});
  // The same over an open connection (tests).
  static Result<std::unique_ptr<Catalog>> Open(std::unique_ptr<SqlConnection> conn);
  ~Catalog();

  SqlDialect dialect() const { return conn_->dialect(); }
  // The database as messages name it (no password).
  const std::string& name() const { return conn_->name(); }

  // Runs `body` as one transaction: every catalog write it makes happens, or none does
  // (body's first error is returned after the rollback). Calls of this catalog from
  // `body` join the transaction; other threads wait until it ends. A nested Transact
  // joins the outer one.
  Status Transact(const std::function<Status()>& body);

  // ---- writes -------------------------------------------------------------------------
  Status PutSite(const SiteRow& s);
  Status PutPolicy(const PolicyRow& p);  // kAlreadyExists if the name is taken
  Status PutVm(const VmRow& v);          // kAlreadyExists
  Status UpdateVm(const VmRow& v);
  Status DeleteVm(const std::string& name);
  Status PutItem(const ItemRow& i);  // insert or replace
  Status DeleteItem(const std::string& vm);
  // The item and its points, in one transaction (unprotect).
  Status DeleteItemAndPoints(const std::string& vm);
  // The RPO over time (the web UI's chart): a sample, dropping the item's samples older
  // than keep_after_ns (one transaction).
  Status AddRpoSample(const std::string& vm, int64_t time_ns, double rpo_s, int64_t keep_after_ns);
  Result<int64_t> AddPoint(const PointRow& p);
  Status DeletePoints(const std::string& vm);  // every point of the VM
  Status DeletePoint(int64_t id);
  // One transaction: deletes the VM's points `prune` (ids; retention's choice) and adds
  // `p`; the new point's id. Either both happen or neither.
  Result<int64_t> AddPointAndPrune(const PointRow& p, const std::vector<int64_t>& prune);
  // The meta table's other keys ("clock": the vault's ClockWatch state).
  Status PutMeta(const std::string& key, const std::string& value);
  Result<int64_t> AddToken(const TokenRow& t);
  Status RevokeToken(int64_t id, int64_t now_ns);  // and ends its sessions (one transaction)
  Status TouchToken(int64_t id, int64_t now_ns);
  Status AddSession(const SessionRow& s);  // also drops expired sessions (one transaction)
  Status DeleteSession(const std::string& id_sha256);
  // Keeps the newest kAuditRowsMax entries.
  Status AddAudit(const AuditRow& a);
  Result<int64_t> AddJob(const JobRow& j);
  Status UpdateJob(const JobRow& j);

  // ---- reads --------------------------------------------------------------------------
  // Find*: std::nullopt when there is no such row; List*: every row, in the order said.
  Result<std::vector<SiteRow>> ListSites();  // by name
  Result<std::optional<SiteRow>> FindSite(const std::string& name);
  Result<std::vector<PolicyRow>> ListPolicies();  // by name
  Result<std::optional<PolicyRow>> FindPolicy(const std::string& name);
  Result<std::vector<VmRow>> ListVms();  // by name
  Result<std::optional<VmRow>> FindVm(const std::string& name);
  Result<std::vector<ItemRow>> ListItems();  // by VM
  Result<std::optional<ItemRow>> FindItem(const std::string& vm);
  // The item's RPO samples since since_ns, oldest first: (time_ns, rpo_s).
  Result<std::vector<std::pair<int64_t, double>>> ListRpoSamples(const std::string& vm,
                                                                 int64_t since_ns);
  Result<std::vector<PointRow>> ListPoints(const std::string& vm);  // by seq, then id
  Result<std::optional<std::string>> FindMeta(const std::string& key);
  Result<std::optional<TokenRow>> FindToken(int64_t id);
  Result<std::vector<TokenRow>> ListTokens();  // by id
  Result<std::optional<SessionRow>> FindSession(const std::string& id_sha256);
  // At most `limit` entries from since_ns on, the newest ones, oldest first.
  Result<std::vector<AuditRow>> ListAudit(int64_t since_ns, size_t limit);
  // The jobs of `vm` ("": every VM) in `state` (nullopt: any), oldest first. A row whose
  // state this build does not know reads as Failed, saying so in its error.
  Result<std::vector<JobRow>> ListJobs(const std::string& vm = "",
                                       std::optional<JobState> state = std::nullopt);
  Result<std::optional<JobRow>> FindJob(int64_t id);

  // The short forms of the reads above, for the callers that do not handle a failed
  // read yet: a failure is logged (naming the database) and reads as no rows. New code
  // uses the Result forms; the vault's callers move to them as vault.cc is split.
  std::vector<SiteRow> Sites();
  std::optional<SiteRow> Site(const std::string& name);
  std::vector<PolicyRow> Policies();
  std::optional<PolicyRow> Policy(const std::string& name);
  std::vector<VmRow> Vms();
  std::optional<VmRow> Vm(const std::string& name);
  std::vector<ItemRow> Items();
  std::optional<ItemRow> Item(const std::string& vm);
  std::vector<std::pair<int64_t, double>> RpoSamples(const std::string& vm, int64_t since_ns);
  std::vector<PointRow> Points(const std::string& vm);
  std::optional<std::string> Meta(const std::string& key);
  std::optional<TokenRow> Token(int64_t id);
  std::vector<TokenRow> Tokens();
  std::optional<SessionRow> Session(const std::string& id_sha256);
  std::vector<AuditRow> Audit(int64_t since_ns, size_t limit);
  std::vector<JobRow> Jobs(const std::string& vm = "",
                           std::optional<JobState> state = std::nullopt);
  std::optional<JobRow> Job(int64_t id);

 private:
  explicit Catalog(std::unique_ptr<SqlConnection> conn) : conn_(std::move(conn)) {}
  Status CreateOrUpgradeSchema();
  Result<int64_t> InsertPointLocked(const PointRow& p);  // holds mu_
  Result<SqlResult> Query(std::string_view sql, const std::vector<SqlValue>& params = {});
  Status TransactLocked(const std::function<Status()>& body);  // holds mu_

  // Recursive: a Transact() body calls the public methods, which lock it again.
  std::recursive_mutex mu_;
  std::unique_ptr<SqlConnection> conn_;  // guarded by mu_
  int transaction_depth_ = 0;            // guarded by mu_
};

int64_t NowNs();

}  // namespace osr::vault
