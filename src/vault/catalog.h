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

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"
#include "vault/item_state.h"
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
  ItemState state = ItemState::kEnablingProtection;  // stored by name (item_state.h)
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
  // An operator asked a vault that does not run the job to cancel it: the leader acts on
  // it (jobs.cancel_requested; never written by UpdateJob).
  bool cancel_requested = false;
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

// ---- The lease: which vault instance leads (docs/formats.md, "lease", "instances") ------
//
// One row says which instance holds the lease, under which fencing token, until when.
// Every time is the database's clock in ms since 1970 (PostgreSQL's clock_timestamp(),
// SQLite's julianday('now')): expiry is judged by one clock, never by comparing hosts'.

struct LeaseRow {
  std::string holder;      // the instance id; "" when nobody holds it
  int64_t token = 0;       // grows by one with every new holder (0: never held)
  int64_t since_ms = 0;    // when the holder took it
  int64_t expires_ms = 0;  // when it lapses unless renewed
  int64_t now_ms = 0;      // the database's clock when this was read
};

// One `osrd vault` process on this catalog.
struct InstanceRow {
  std::string id;  // random, new at each start
  std::string host;
  std::string api;  // HOST:PORT it serves the REST API on
  int64_t started_ms = 0;
  int64_t renewed_ms = 0;  // the last time it said it lives (its lease thread)
};

// The fence of one leadership term: the holder and token the lease was taken with.
//
// The mechanism: a thread that does leader work (the job workers, the point loop, the job
// poll, the lease thread while it resumes jobs) runs under a FenceScope naming the term's
// fence. Every catalog write made on such a thread runs in a transaction whose first
// statement checks that the lease row still names this holder and token (PostgreSQL:
// SELECT ... FOR SHARE, so a takeover's UPDATE waits for the write to end; SQLite: its
// write lock, taken at BEGIN). A lease taken over since (a paused old leader) fails the
// write with kFailedPrecondition ("fenced: ..."), writes nothing and marks the fence lost:
// every later write of the term fails at once without asking the database. Writes of
// threads without a scope (API handlers: a queued job, a site, a token) are not fenced.
//
// Thread model: thread-safe (atomics); owned by the lease keeper (vault/lease.h), borrowed
// by the term's threads, which end before it goes.
class LeaseFence {
 public:
  LeaseFence(std::string holder, int64_t token, int ttl_ms)
      : holder_(std::move(holder)), token_(token), ttl_ms_(ttl_ms) {}
  const std::string& holder() const { return holder_; }
  int64_t token() const { return token_; }
  int ttl_ms() const { return ttl_ms_; }
  bool lost() const { return lost_.load(); }
  // Marks the term over; true for the call that did (the first).
  bool Lose() { return !lost_.exchange(true); }

 private:
  const std::string holder_;
  const int64_t token_;
  const int ttl_ms_;  // a fenced PostgreSQL transaction left open is ended after this
  std::atomic<bool> lost_{false};
};

// Fences the calling thread's catalog writes with `fence` (borrowed; nullptr: unfenced)
// while it lives. Scopes nest; the innermost one counts.
class FenceScope {
 public:
  explicit FenceScope(LeaseFence* fence);
  ~FenceScope();
  // The calling thread's fence (nullptr: its writes are not fenced).
  static LeaseFence* Current();
  FenceScope(const FenceScope&) = delete;
  FenceScope& operator=(const FenceScope&) = delete;

 private:
  LeaseFence* outer_;
};

// An item's RPO as the point loop sampled it (rpo_samples).
struct RpoSampleRow {
  std::string vm;
  int64_t time_ns = 0;  // when it was sampled (the vault's wall clock)
  double rpo_s = 0;
};

// An item's health as the leader's point loop last saw it (every 5 s), for every vault's
// /metrics: followers do not ask the sites.
struct ItemHealthRow {
  std::string vm;
  std::string health;   // "Normal", "Warning: ...", "Critical: ..."
  int64_t time_ns = 0;  // when it was seen (the leader's wall clock)
};

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
  // A tick's samples of every item in one transaction (one sync, not one per item), and
  // every item's samples older than `keep_after_ns` (ns, wall clock) go. Errors: the
  // database's (nothing is written then).
  Status AddRpoSamples(const std::vector<RpoSampleRow>& samples, int64_t keep_after_ns);
  // A tick's health of every item it saw, in one transaction (rows of items no longer in
  // the catalog go too). Errors: the database's (nothing is written then).
  Status PutItemHealth(const std::vector<ItemHealthRow>& rows);
  // Every item's last health, by VM name. Errors: the database's, kCorruption for a row
  // of the wrong type.
  Result<std::vector<ItemHealthRow>> ListItemHealth();
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
  // Queued -> Running, only if it is still Queued and nobody asked to cancel it: whether it
  // was (false: another vault took it, it ended or a cancel is asked).
  Result<bool> ClaimJob(int64_t id, int64_t now_ns);
  // Queued -> Cancelled with `error`, only if it is still Queued: whether it was.
  Result<bool> CancelQueuedJob(int64_t id, const std::string& error, int64_t now_ns);
  // Sets the job's cancel_requested (for the vault that runs it): whether the job was
  // Queued or Running (false: it had ended, or there is no such job).
  Result<bool> RequestJobCancel(int64_t id);

  // ---- the lease (see LeaseRow) -------------------------------------------------------
  // Says that instance `i` lives: inserts it (started now) or renews it (renewed now), and
  // drops instances not renewed for a day.
  Status PutInstance(const InstanceRow& i);
  Status DeleteInstance(const std::string& id);
  // Takes the lease for `holder` for ttl_ms, in one statement, when nobody holds it, it
  // lapsed, or its holder is an earlier life of this one (an instance of the same host and
  // API address: that address is ours now, so that process is gone). The new lease, with
  // a token one above the last; nullopt when another instance holds it. kUnavailable when
  // the database cannot be reached or the lease row is locked by a write under way.
  Result<std::optional<LeaseRow>> AcquireLease(const InstanceRow& holder, int64_t ttl_ms);
  // Extends the lease by ttl_ms from now if `holder` still holds it under `token` (and
  // renews the instance), in one transaction: whether it did (false: lost).
  Result<bool> RenewLease(const std::string& holder, int64_t token, int64_t ttl_ms);
  // Gives the lease up (holder ""), if `holder` holds it under `token`.
  Status ReleaseLease(const std::string& holder, int64_t token);
  // The operator's reset after a restore (osrd vault --lease-token-floor): sets the lease's
  // token to `floor` when it is lower, so that the next term's token is above every token
  // the sites have seen. A holder under a lower token loses the lease (its next renewal or
  // fenced write finds another token). Returns the token before (unchanged when it was
  // at or above floor). kInvalidArgument for a floor below 1; the catalog's errors.
  Result<int64_t> RaiseLeaseToken(int64_t floor);
  Result<LeaseRow> ReadLease();
  Result<std::vector<InstanceRow>> ListInstances();  // by start, oldest first
  // Catalog writes this process refused because its fence was lost (see LeaseFence).
  int64_t fenced_writes() const { return fenced_writes_.load(); }

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
  // The newest RPO sample of every item that has one, by VM (one query: /metrics).
  Result<std::vector<RpoSampleRow>> ListLatestRpoSamples();
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
  // Every job, oldest first, with only id, type, state, created_ns and updated_ns read
  // (the rest left empty): /metrics, without parsing every job's steps.
  Result<std::vector<JobRow>> ListJobTimes();

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
  // The VM's newest point (highest seq, then id), nullopt when it has none or the catalog
  // cannot be read (logged, as Points). One row, whatever the number of points.
  std::optional<PointRow> LatestPoint(const std::string& vm);
  Result<std::optional<PointRow>> FindLatestPoint(const std::string& vm);
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
  // A write: joins a transaction under way; on a fenced thread, in its own transaction
  // that checks the fence first; else as one statement.
  Status Write(const std::function<Status()>& body);
  Status CheckFenceLocked(LeaseFence& fence);  // holds mu_, in a transaction
  Status Fenced(const LeaseFence& fence);
  // The query's rows: whether it returned any (UPDATE ... RETURNING).
  Result<bool> Changed(std::string_view sql, const std::vector<SqlValue>& params);
  std::string NowMs() const;  // SQL for the database's clock in ms since 1970

  // Recursive: a Transact() body calls the public methods, which lock it again.
  std::recursive_mutex mu_;
  std::unique_ptr<SqlConnection> conn_;  // guarded by mu_
  int transaction_depth_ = 0;            // guarded by mu_
  std::atomic<int64_t> fenced_writes_{0};
};

int64_t NowNs();

}  // namespace osr::vault
