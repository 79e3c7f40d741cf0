// Vault: the control plane. The catalog (SQLite), the REST API for the CLI and the web UI
// (docs/api.md), jobs for every long operation, and recovery points. It speaks to each
// site's HTTP API (docs/api.md, "Site API"); it holds no disk data.
//
// Item states (DESIGN.md): EnablingProtection -> Protected -test-failover->
// TestFailoverCompleted -cleanup-> Protected; Protected -failover-> (FailingOver) ->
// FailedOver -change-point-> FailedOver -commit-> (Committing) -> FailoverCommitted
// -reprotect-> Reprotecting -> Protected, in the other direction. A failover that stops
// after fencing leaves FailoverFailed, from which failover is retried.
//
// Jobs survive the vault: every step is safe to run again, and what a step decided
// (epoch, point, reprotect mode) is kept in the job's args; a job that was running when
// the vault stopped is resumed when it starts again.
//
// Recovery points are scheduled on the monotonic clock and ordered by seq; their times
// (wall clock, RFC 3339 in the API) are for people and for retention, which a step of the
// vault's wall clock holds (vault/clock_watch.h) and which never deletes the newest point
// or a point in use by a drill or an uncommitted failover (vault/retention.h).
//
// Thread model: HTTP handlers run on cpp-httplib's pool; jobs run on job_workers threads,
// one job per VM at a time, each VM's in submission order; the point thread makes crash-consistent
// points and applies retention. mu_ guards the job queue and the running jobs' cancellation
// tokens; points_mu_ the point schedules and the points jobs have chosen (and is held while
// retention decides and deletes); clock_mu_ the clock watch (taken after points_mu_ when
// both are); the catalog is thread-safe.
//
// Several vaults (vault/lease.h): every instance serves the API; the job workers, the point
// thread and the job poll run only while this instance holds the lease, each under the
// term's fence (vault/catalog.h, LeaseFence), and are joined when it is lost. A job
// submitted through a follower waits Queued in the catalog until the leader's poll takes
// it; a cancel asked through a follower is a flag in the job's row.
//
// Cancelling (CancelJob, and Unprotect for the item's jobs): a queued job ends Cancelled at
// once; a running one is asked through its JobCancel and stops at its next wait, its last
// step saying what it leaves behind; the caller waits for it, bounded by
// job_cancel_wait_ms_max.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <thread>
#include <utility>
#include <vector>

#include "common/clock.h"
#include "common/socket.h"
#include "common/tls.h"
#include "vault/catalog.h"
#include "vault/clock_watch.h"
#include "vault/hooks.h"
#include "vault/job_steps.h"
#include "vault/lease.h"
#include "vault/metrics.h"
#include "vault/site_client.h"
#include "vault/site_status.h"
#include "vault/vault_api.h"

namespace osr::vault {

struct VaultConfig {
  // The catalog: a SQLite file path, or a postgresql:// (postgres://) URL (vault/catalog.h).
  std::string db_path;
  ApiConfig api;  // the REST API's address, TLS, host names, web UI
  // The vault's client certificate for the sites' APIs (mutual TLS; its CN is what the
  // sites accept, "vault" by default) and the CA that signed the sites' certificates.
  TlsFiles site_tls;
  int point_tick_ms = 1000;
  int job_wait_ms_max = 120000;  // a job step waiting for replication gives up after this
  int call_wait_ms_max = 30000;  // an API call waiting for replication (below the CLI's 60 s)
  // How long cancel and unprotect wait for a running job to stop (it stops at its next
  // poll, ~100 ms, unless a site call is under way: those end within 30 s).
  int job_cancel_wait_ms_max = 35000;
  bool jobs_paused = false;  // jobs wait for StartJobs() (quickstart registers sites first)
  int job_workers = 4;       // jobs of different VMs run at the same time, this many
  HookConfig hooks;          // what VMs' hooks may run here (--hooks, --allow-api-hooks)
  // After a step of the wall clock, pruning resumes by itself once the clock has kept
  // time for this long (vault/clock_watch.h).
  int64_t clock_settle_ms = ClockWatch::kSettleNsDefault / 1000000;
  Clock* clock = nullptr;  // the clock seam (tests); nullptr: the real clock
  // Several vaults on one catalog: the lease's time to live (vault/lease.h); the leader
  // renews it every third of it, another instance takes over this long after its last
  // renewal. A restarted vault (same host and API address) takes its own lease back at once.
  int lease_ttl_ms = kLeaseTtlMsDefault;
  // 0, or the operator's reset of the lease token after the catalog was restored from a
  // backup (osrd vault --lease-token-floor; vault/lease.h LeaseConfig::token_floor).
  int64_t lease_token_floor = 0;
};

// The health line of a quarantined group or store (its site's "damage": kind, reason,
// action), e.g. "Critical: r1's disks at primary are quarantined: ... . <action>".
std::string QuarantineHealth(const std::string& what, const nlohmann::json& damage);

class Vault {
 public:
  static Result<std::unique_ptr<Vault>> Start(const VaultConfig& cfg);
  ~Vault();
  void Stop();
  const ListenAddress& address() const { return api_->address(); }
  bool https() const { return api_->https(); }
  // Lets queued (and resumed) jobs run, when the config paused them.
  void StartJobs();
  Catalog& catalog() { return *catalog_; }
  // GET /metrics (vault/metrics.h); the catalog's error when it cannot be read.
  Result<std::string> MetricsText();
  // Whether this instance holds the lease: it runs jobs, points, retention and
  // reconciliation (vault_leader.cc).
  bool leader();

  // The operations behind the REST API (also used by quickstart).
  // Registers a site (or, with `replace`, moves one: a site that VMs or items use keeps
  // its address unless replace is set). The API must be https:// (http:// only on
  // loopback); the vault checks that the site's certificate names it.
  Result<nlohmann::json> RegisterSite(const std::string& name, const std::string& api,
                                      const std::string& replication, bool replace = false);
  Result<nlohmann::json> ListSites();
  Result<nlohmann::json> CreatePolicy(const PolicyRow& p);
  Result<nlohmann::json> ListPolicies();
  Result<nlohmann::json> CreateVm(const std::string& name, const std::string& site,
                                  const nlohmann::json& disks,
                                  const nlohmann::json& spec = nlohmann::json::object());
  Result<nlohmann::json> StartVm(const std::string& name);
  // Adds (`add`: a disk the VM has not) or grows a disk of VM where it runs now, protected
  // or not (the site records the change in the capture order; Site::ChangeGroupDisk), and
  // keeps the catalog's disks. {"vm": ShowVm, "seq", "added", "restart_needed"}.
  // kNotFound (no VM; grow of a disk it has not), kAlreadyExists (add of a disk it has),
  // kInvalidArgument (a size that is not larger, a bad name), and the site's refusals.
  Result<nlohmann::json> ChangeVmDisk(const std::string& name, const std::string& disk,
                                      uint64_t size_bytes, bool add);
  Result<nlohmann::json> StopVm(const std::string& name, int timeout_ms);
  // Opens a VM's quarantined disks (group) and recovery store again at `site` ("": every
  // registered site), doing what the flags allow (site.h RepairOptions). Returns what was
  // repaired per site; kInvalidArgument when nothing of the VM is quarantined,
  // kFailedPrecondition (naming why) when something still is.
  Result<nlohmann::json> RepairVm(const std::string& name, const std::string& site, bool trim_image,
                                  bool reset_history, bool accept_changes = false);
  nlohmann::json DrillJson(const ItemRow& item, std::string* health);
  // The plan of `action` on `vm` at `site` (prechecks.cc): the site's checks of `needs`
  // (POST /api/v1/checks; an unreachable site is a failed check), what it creates (the
  // caller's `creates` and the site's), uses and `deletes`. With `vm_now` and a site that
  // answered the disks at the point (`needs.seq`), `deletes` also names each disk of the
  // VM now that the point lacks or has smaller: the VM runs without it, or smaller.
  nlohmann::json PlanAt(const SiteRow& site, const std::string& action, const std::string& vm,
                        nlohmann::json needs, const nlohmann::json& creates,
                        const nlohmann::json& deletes, const VmRow* vm_now = nullptr);
  Result<uint64_t> FirstSeqAfterStore(const std::string& vm, const std::string& site);
  // The VM's disks as a site's answer lists them ([{name, size_bytes, ...}]) become the
  // catalog's (names and sizes), in one transaction that re-reads the row: a site's disks
  // are the truth (a change it finished after a restart, a failover or change-point to a
  // point before a disk changed). kInvalidArgument for a list without names and sizes.
  Status RecordVmDisks(const std::string& vm, const nlohmann::json& site_disks);
  Result<nlohmann::json> ListVms();
  Result<nlohmann::json> ShowVm(const std::string& name);
  // The console of VM `name` (GET /api/v1/vms/NAME/console): of the VM where it runs now
  // (its site, or the recovery site once failed over), or with `drill` of its drill VM.
  // {site, which, offset, next, size, text, cuts, cut_size}: the site's console read
  // (offset: from there; none: the last `bytes`; cuts, cut_size: Site::GroupConsole).
  // kNotFound for no such VM, or no drill.
  Result<nlohmann::json> VmConsole(const std::string& name, bool drill,
                                   std::optional<uint64_t> offset, uint64_t bytes);
  // Each action below with `dry_run` returns {"plan": ...} (prechecks.cc) and changes
  // nothing; without it, a failed check of the plan refuses it (kFailedPrecondition naming
  // the check, the site and its numbers) before anything changed.
  Result<nlohmann::json> Protect(const std::string& vm, const std::string& target,
                                 const std::string& policy, bool dry_run = false);
  Result<nlohmann::json> Unprotect(const std::string& vm);
  Result<nlohmann::json> ListItems();
  Result<nlohmann::json> ShowItem(const std::string& vm);
  Result<nlohmann::json> ListPoints(const std::string& vm);
  Result<nlohmann::json> CreatePoint(const std::string& vm, bool app);
  // `start`: boot the VM on the drill disks in the drill networks, with a boot check
  // (when its spec has a driver); false: the disks only.
  Result<nlohmann::json> TestFailover(const std::string& vm, const std::string& spec,
                                      bool start = true, bool dry_run = false);
  Result<nlohmann::json> TestFailoverCleanup(const std::string& vm, const std::string& notes);
  Result<nlohmann::json> Failover(const std::string& vm, const std::string& spec,
                                  bool shutdown_source, bool planned, bool start,
                                  bool dry_run = false);
  Result<nlohmann::json> ChangePoint(const std::string& vm, const std::string& spec);
  Result<nlohmann::json> Commit(const std::string& vm);
  Result<nlohmann::json> Reprotect(const std::string& vm, bool compare, bool dry_run = false);
  // `state`: a JobState's name or "" (any); another word is kInvalidArgument.
  Result<nlohmann::json> ListJobs(const std::string& vm, const std::string& state);
  Result<nlohmann::json> ShowJob(int64_t id);
  // Cancels job `id` and waits (at most job_cancel_wait_ms_max) for it to stop; returns the
  // job as it is then (Cancelled, or still Running with "cancel_requested": true when a
  // site call keeps it longer). kNotFound: no such job; kAlreadyExists: it has ended
  // (its state in the message).
  Result<nlohmann::json> CancelJob(int64_t id);
  // The clock watch's state: {held, step_seconds, stepped_at, settles_at, message}.
  nlohmann::json ClockStatus();
  // The operator says the vault's wall clock is right: pruning held by a clock step
  // resumes. `who` is logged. An error only when the state cannot be saved (kIoError).
  Result<nlohmann::json> ConfirmClock(const std::string& who);
  // The vault instances on this catalog and which one leads (GET /vault): {instances:
  // [{id, host, api, started, renewed, leader}], leader: {id, token, since, expires} or
  // null, this: {id, role, lease_ttl_ms, fenced_writes}}. Errors: the catalog's.
  Result<nlohmann::json> ShowVault();

 private:
  friend class JobRun;        // workflow_steps.h
  friend class FailoverRun;   // failover.cc: one failover job's steps
  friend class ReprotectRun;  // reprotect.cc
  explicit Vault(VaultConfig cfg);
  SiteClient Client(const SiteRow& site) const;
  // The site named `name`; kNotFound ("site NAME is not registered") or the catalog's error.
  Result<SiteRow> RegisteredSite(const std::string& name);
  Result<nlohmann::json> Submit(JobType type, const std::string& vm, const nlohmann::json& args);
  void JobLoop();
  void RunJob(JobRow& job, JobCancel& cancel);
  // Asks job `id` to stop: a queued one ends Cancelled here; a running one through its
  // token. Ok(true) when it was queued or running, Ok(false) when it had ended.
  Result<bool> RequestCancel(int64_t id);
  // Waits until job `id` is not running (at most job_cancel_wait_ms_max); true if so.
  bool WaitJobStopped(int64_t id);
  // Cancels the VM's queued and running jobs and waits for them (Unprotect). kUnavailable
  // naming the job when one did not stop in time (it stops later by itself).
  Status CancelJobsOf(const std::string& vm);
  // The workflows, one file each (enable_protection.cc, drill.cc, failover.cc, commit.cc,
  // reprotect.cc); each ends the job Succeeded, Failed or Cancelled (then its last step
  // says what it left behind).
  void RunEnableProtection(JobRow& job, ItemRow item, JobCancel& cancel);
  // What an enable-protection job had made when a step failed (UndoEnableProtection).
  struct ProtectionMade {
    bool replication_started = false;
    bool store_made = false;
  };
  // Removes what it made (unless the vault itself stopped the job) and fails the job with
  // `st`, saying what was removed or what was left and how to remove it.
  void UndoEnableProtection(JobRow& job, Steps& steps, const SiteRow& src, const SiteRow& dst,
                            const Status& st, ProtectionMade made);
  void RunTestFailover(JobRow& job, ItemRow item, JobCancel& cancel);
  void RunTestFailoverCleanup(JobRow& job, ItemRow item, JobCancel& cancel);
  // A drill's VM: started on view `view_id` at `dst`, then its boot check waited for.
  // Returns {health: Healthy|Unhealthy, reason, boot_ms?, console_tail?}; its steps warn
  // (the job goes on) when it does not start or does not come up.
  // *cancelled: the job was asked to stop while it waited (the VM runs on).
  nlohmann::json BootDrillVm(Steps& steps, const SiteRow& dst, const ItemRow& item,
                             const std::string& view_id, bool* cancelled);
  void RunFailover(JobRow& job, ItemRow item, JobCancel& cancel);
  void RunChangePoint(JobRow& job, ItemRow item, JobCancel& cancel);
  void RunCommit(JobRow& job, ItemRow item, JobCancel& cancel);
  // Commit's copy of the rest of the point into the failover disks at `dst`: starts it
  // (again, after a site restart: it resumes) and waits until the site says done.
  // Errors: the site's; kUnavailable when nothing moved for job_wait_ms_max; kCancelled.
  Status Materialise(JobRow& job, const ItemRow& item, const SiteRow& dst, Steps& steps);
  void RunReprotect(JobRow& job, ItemRow item, JobCancel& cancel);
  // Reprotect's "find what differs" at a fenced, stopped old primary that has disks:
  // "exact" from its history when it vouches for it (the fence fingerprint matches; the
  // regions are marked at `cur`), else "hash" (CompareBlockHashes). `found` says which
  // regions and why. Errors: the sites' (a call that failed, an answer of the wrong shape).
  // How a reprotect of `vm` will make its replica at the old primary `old`, as its job will
  // decide it (ReprotectRun::FindWhatDiffers), for the plan: from the old disks, or a full
  // copy (no disks there, missing ones, or not the VM's now: those are deleted). Errors: the
  // old primary's (a call that failed, an answer of the wrong shape).
  struct ReprotectStart {
    bool store_there = false;  // an earlier reprotect's store: the job goes on with it
    bool full_copy = false;
    std::string why;                                   // of a full copy
    nlohmann::json deletes = nlohmann::json::array();  // what the job deletes there
    uint64_t allocated = 0;  // bytes the VM's disks hold where it runs now (full copy only)
  };
  Result<ReprotectStart> HowReprotectStarts(const ItemRow& item, const VmRow& vm,
                                            const SiteRow& old);
  struct Differences {
    std::string mode;  // "exact" or "hash"
    nlohmann::json found;
  };
  Result<Differences> FindDifferences(const ItemRow& item, const VmRow& row, const SiteRow& cur,
                                      const SiteRow& old, bool compare, bool history_lost);
  // Marks at `cur` every region whose block hash differs from `old`'s: {regions, bytes,
  // compared, region_bytes}. Errors: the sites'.
  Result<nlohmann::json> CompareBlockHashes(const std::string& vm, const VmRow& row,
                                            const SiteRow& cur, const SiteRow& old);
  // Waits until `dst` holds a consistent replica of everything `src` captured when the
  // wait began; progress from p0 to p1 %. Fails when nothing moved for job_wait_ms_max;
  // kCancelled (message "cancelled") when the job is cancelled.
  Status WaitForReplica(const std::string& vm, const SiteRow& src, const SiteRow& dst, Steps& steps,
                        int p0, int p1);
  // A point at what the recovery store holds (failover while the source is away).
  Result<PointRow> PointAtStore(const ItemRow& item);
  // An old primary that comes back after an unplanned failover is fenced (and its VM
  // stopped) as soon as it answers (`board`: what the sites said in this pass).
  void ReconcileFencing(const ItemRow& item, SiteStatusBoard& board);
  // Runs the VM's hook `name` (spec.hooks) on this host with a timeout; Ok when none.
  // The stored spec is parsed again first: a bad one (or a hook this vault does not run)
  // is kInvalidArgument naming the field, never a throw.
  Status RunHook(const VmRow& vm, const std::string& name, const nlohmann::json& env);
  void PointLoop();
  // ---- leading (vault_leader.cc): only the lease holder runs jobs and the point loop ----
  // Opens the lease keeper, tries once to lead (resuming as a restarted vault did), starts
  // its thread. Errors: the catalog's; a failed resumption at the first attempt.
  Status StartLease();
  void StopLease();  // hands over: leader work stops unwritten, the lease is given up
  // The keeper's callbacks: starts (resuming the jobs left Running, loading the queued
  // ones) or stops the leader's threads. `at_start`: this is the vault's start.
  Status BecomeLeader(LeaseFence& fence, bool at_start);
  void StopLeaderWork();
  // Jobs that were running when their vault stopped: the workflows resume (each step is
  // safe to run again and what they decided is in their args); drills do not. Errors: a
  // job whose new state cannot be recorded.
  Status ResumeRunningJobs(bool at_start);
  // The leader's poll of the catalog: queued jobs another vault took in, cancels asked
  // through another vault.
  void JobPollLoop();
  void PollJobs();
  // Cancel of a job this vault neither queues nor runs: a queued one ends Cancelled in the
  // catalog, a running one is asked through its row. Ok(false) when it had ended.
  Result<bool> RequestCancelElsewhere(const JobRow& job);
  // Waits (at most job_cancel_wait_ms_max) until the catalog says job `id` ended.
  bool WaitJobEndedInCatalog(int64_t id);
  // One item's turn of the point loop: fencing, RPO sample, a new crash point, retention.
  // `board`: the sites' groups and stores, asked once per site for the whole tick.
  // A sampling tick's RPO and health of every item, written to the catalog after it.
  struct TickSamples {
    std::vector<RpoSampleRow> rpo;
    std::vector<ItemHealthRow> health;
  };
  // `tick`: where this tick's samples go (nullptr: no sample this tick, and no
  // reconciliation: those ticks only make due points).
  void PointTick(const ItemRow& item, int64_t tick_ns, TickSamples* tick, SiteStatusBoard& board);
  // A point by its spec (latest, latest-processed, latest-app, an id, a time); "latest"
  // waits for the source's last write (`cancel`: the job's token, or nullptr).
  Result<PointRow> ResolvePoint(const ItemRow& item, const std::string& spec, JobCancel* cancel);
  // Waits (at most wait_ms, less if the vault stops or `cancel` is set) until the recovery
  // site has every write made so far, then records a point there.
  // `want`: the source's position to wait for (0: its last seq now). `cancel` (borrowed;
  // nullptr for API calls): the job's token; kCancelled when it is set.
  // Why replication does not reach the recovery site, as the sites say ("" or ": ...").
  // What the recovery store says of its history (GET /stores/VM): records that failed their
  // check when read (Critical), a history compaction that failed (Warning); "" when neither.
  std::string StoreHistoryWarning(const ItemRow& item, const nlohmann::json& store);
  std::string ReplicationTrouble(const ItemRow& item, const nlohmann::json& store);
  Result<PointRow> PointAtLatest(const ItemRow& item, const std::string& type, int wait_ms,
                                 uint64_t want = 0, JobCancel* cancel = nullptr);
  // Re-points a source site's replication at its target's current address (a site that
  // restarted may listen elsewhere now).
  void ReconcileReplication(const ItemRow& item, SiteStatusBoard& board);
  // PUT .../replication at `from`: ship the item's group to `to` under the item's policy.
  Result<nlohmann::json> StartReplication(const ItemRow& item, const SiteRow& from,
                                          const SiteRow& to);
  // An item as GET /items shows it, with health and RPO from what `board` reads at its
  // sites (one pass over many items shares one board: two calls per site, not per item).
  nlohmann::json ItemJson(const ItemRow& item, SiteStatusBoard& board);
  // The health of an item that does not replicate now (a failover, commit or reprotect
  // moved it): from its job's state or the target site.
  std::string NotReplicatingHealth(const ItemRow& item, SiteStatusBoard& board);
  // The health of a replicating item from what its two sites say; sets out's rpo_seconds,
  // last_seq and durable_seq, and adds what else it should know to `warnings` (an overdue
  // point, the store's history).
  std::string ReplicationHealth(const ItemRow& item, SiteStatusBoard& board,
                                const std::optional<PointRow>& latest, nlohmann::json& out,
                                std::vector<std::string>& warnings);
  // An item's rpo_seconds while a site does not answer (seconds, or null when unknown).
  static nlohmann::json RpoWithoutAnAnswer(const Result<nlohmann::json>& store,
                                           const std::optional<PointRow>& latest);
  // The health of an item whose VM failed over (FailedOver, Committing, FailoverCommitted):
  // the target site's disks quarantined, the VM not running there, or running.
  std::string FailedOverHealth(const ItemRow& item, SiteStatusBoard& board);
  // A board that asks the sites through this vault's clients (site_status.h).
  SiteStatusBoard StatusBoard(SiteStatusBoard::Mode mode) const;

  // ---- points: schedule, retention, points in use (vault.cc) ----
  // A job's hold on the point it chose, from choosing it until the item records it
  // (drill, failover): made by PinPoint, released when it goes out of scope.
  class PointPin {
   public:
    PointPin(Vault* v, std::string vm, int64_t id) : v_(v), vm_(std::move(vm)), id_(id) {}
    PointPin(const PointPin&) = delete;
    PointPin& operator=(const PointPin&) = delete;
    ~PointPin();

   private:
    Vault* v_;  // borrowed: the vault outlives its jobs
    std::string vm_;
    int64_t id_;
  };
  // Pins point `id` of `vm` for `use` ("test-failover", "failover"): retention keeps it
  // until `pin` (emplaced here) goes. kNotFound when retention deleted it before the pin
  // (choose another point).
  Status PinPoint(const std::string& vm, int64_t id, const std::string& use,
                  std::optional<PointPin>& pin);
  // id -> what uses it: the item's drill, its failover before commit, and jobs' pins.
  // Deletes the catalog's points of `item` below `floor` (the store's max(base_seq,
  // consistent_from) at `site`), except those in use. Takes points_mu_. Returns true when
  // no point is left below `floor` (none in use, no failed delete).
  bool ForgetUnreadablePoints(const ItemRow& item, const std::string& site, uint64_t floor);
  std::map<int64_t, std::string> PointsInUseLocked(const ItemRow& item);  // points_mu_ held
  nlohmann::json PointJsonFor(const PointRow& p, const std::map<int64_t, std::string>& in_use);
  // Whether a crash point is due for `vm` (policy interval on the monotonic clock).
  bool PointDue(const std::string& vm, const std::optional<PointRow>& latest, int64_t interval_s);
  // Adds a crash point and, unless a clock step holds pruning, deletes what retention
  // lets go, in one catalog transaction. Returns whether anything was deleted.
  // After thinning: asks the recovery site to compact vm's history up to the newest point
  // that thinning reached (an hour before the newest), keeping every point left there.
  // Failures are logged (the next thinning asks again).
  void CompactThinnedHistory(const std::string& vm, const SiteRow& site,
                             const std::vector<PointRow>& points);
  Result<bool> AddPointWithRetention(const std::string& vm, const PolicyRow& policy,
                                     const PointRow& p);
  // Records why the point thread could not make a due point (for the health warning).
  void NotePointTrouble(const std::string& vm, const std::string& why);
  // The health warning when the recovery site holds data newer than the newest point for
  // longer than the policy allows ("" otherwise).
  std::string PointOverdueWarning(const ItemRow& item, const std::optional<PointRow>& latest,
                                  uint64_t durable_seq);
  // One reading of the clocks (the point thread's tick); saves and logs a change.
  void ObserveClock();
  bool PruningHeld();

  const VaultConfig cfg_;
  Clock& clock_;
  std::unique_ptr<Catalog> catalog_;
  std::unique_ptr<VaultApi> api_;
  std::vector<std::thread> job_threads_;
  std::thread point_thread_;
  std::thread job_poll_thread_;         // the leader's (PollJobs)
  std::unique_ptr<LeaseKeeper> lease_;  // set at Start
  bool lease_thread_started_ = false;   // set before the keeper's thread starts

  std::mutex submit_mu_;  // a VM's check for jobs in flight and the new job's row
  std::mutex mu_;
  std::condition_variable cv_;
  struct QueuedJob {
    int64_t id;
    std::string vm;
  };
  std::deque<QueuedJob> queue_;     // guarded by mu_
  std::set<std::string> busy_vms_;  // guarded by mu_: VMs with a job running
  // guarded by mu_: the running jobs' tokens (each owned by its JobLoop frame, erased
  // before that frame ends)
  std::map<int64_t, JobCancel*> running_;
  bool stop_ = false;          // guarded by mu_
  bool jobs_started_ = false;  // guarded by mu_
  bool leading_ = false;       // guarded by mu_: this vault runs jobs and points
  bool leader_stop_ = false;   // guarded by mu_: the leader's threads end (lease lost)
  std::atomic<bool> stopping_{false};

  PointTickTimes point_tick_times_;  // how long the point loop's ticks take (/metrics)

  struct PointSchedule {
    int64_t last_point_id = 0;       // the newest point seen (0: none yet)
    int64_t last_point_mono_ns = 0;  // when it was seen (monotonic)
    // When the newest point last covered everything the recovery site held (monotonic).
    int64_t covered_mono_ns = 0;
    std::string last_error;  // why the last due point was not made
    // The store's floor (ForgetUnreadablePoints) below which no point is left: the points
    // are read again only when the floor moves (a resync folded the history).
    uint64_t floor_cleared = 0;
  };
  std::mutex points_mu_;
  std::mutex logged_mu_;
  std::map<std::string, std::string> reconcile_logged_;         // vm -> last logged; logged_mu_
  std::map<std::string, PointSchedule> schedules_;              // guarded by points_mu_
  std::map<std::string, std::map<int64_t, std::string>> pins_;  // guarded by points_mu_

  std::mutex clock_mu_;
  ClockWatch clock_watch_;  // guarded by clock_mu_
  std::string boot_id_;     // set before the point thread starts
};

// Whether a recovery store's status (GET /stores/{vm}) says the store holds a consistent
// state at `seq`: no resync or first copy under way, not waiting for a differential
// resync, and seq within what is usable (consistent_from..durable_seq).
// A status of the wrong shape is not consistent.
bool StoreConsistentAt(const nlohmann::json& store_status, uint64_t seq);

// What a step waiting for a replica shows (vault jobs): bytes of a copy when one runs,
// else writes; "waiting for SITE: ERROR" when a site does not answer (never numbers
// from a call that failed). `want`: the source's last seq when the wait began.
struct ReplicaProgress {
  std::string text;
  int percent = -1;  // 0..100 of this wait; -1: not known (keep what was shown)
};
// `src_group`: GET /groups/{vm} at the source; `dst_store`: GET /stores/{vm} at the target.
ReplicaProgress DescribeReplicaProgress(const std::string& src_name,
                                        const Result<nlohmann::json>& src_group,
                                        const std::string& dst_name,
                                        const Result<nlohmann::json>& dst_store, uint64_t want);
// What the step shows once the replica is there: the copy's total as done ("T of T bytes
// copied"), else every write (`want`) replicated — never the last poll's figure, which
// stops short of the total. `src_group` as above; a failed call shows the writes.
std::string DescribeReplicaDone(const Result<nlohmann::json>& src_group, uint64_t want,
                                uint64_t durable);

// Logs a failed best-effort step (a sample, a fold the next tick repeats) with `what`.
void LogIfFailed(const Status& st, const std::string& what);

}  // namespace osr::vault
