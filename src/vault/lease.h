// LeaseKeeper: which of the vault instances on one catalog leads. Every instance serves
// the REST API and the web UI; only the holder of the catalog's lease (vault/catalog.h,
// LeaseRow) runs jobs, the point loop (points, retention, reconciliation) and resumes the
// jobs a vault left running.
//
// The lease is a row with a holder, a fencing token and an expiry on the database's clock.
// The keeper's thread renews it every ttl/3 while it leads, and tries to take it every
// ttl/3 while it follows (it lapses ttl after its holder's last renewal, or at once when
// the holder stops cleanly and gives it up). On taking it, `gained` runs under the new
// term's fence (LeaseFence): it resumes and starts the leader's work. When the lease is
// lost — another instance holds it, a fenced write found it taken, or renewals failed for
// ttl - ttl/3 since the last one that worked, so that this instance stops before the lease
// can lapse for the others — the fence is marked lost first (every later write of the
// term fails without reaching the database), then `lost` runs: it stops the leader's work
// without writing (the next leader resumes the jobs).
//
// The keeper uses its own connection to the catalog, with answers bounded by ttl/3, so that
// a slow API query never delays a renewal.
//
// Thread model: one thread (Start..Stop) runs every attempt, renewal and callback; the
// callbacks never run at the same time. mu_ guards the term (leading_, fence_, since_ms_).
#pragma once

#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "common/status.h"
#include "vault/catalog.h"

namespace osr::vault {

inline constexpr int kLeaseTtlMsDefault = 6000;
inline constexpr int kLeaseTtlMsMin = 300;  // below this a renewal cannot keep up

struct LeaseConfig {
  std::string db;  // the catalog (vault/catalog.h Catalog::Open)
  int ttl_ms = kLeaseTtlMsDefault;
  std::string host;  // this host's name (shown; with api, how a restart finds its seat)
  std::string api;   // HOST:PORT of this instance's REST API
  // 0, or the operator's reset after a catalog restore (--lease-token-floor): at Open the
  // lease's token is raised to this when lower (Catalog::RaiseLeaseToken), so the next
  // term's token is above it. Never set by the vault itself: a site's refusal must not
  // move it, or the sites' fence would fence nothing.
  int64_t token_floor = 0;
};

class LeaseKeeper {
 public:
  struct Callbacks {
    // Runs on the keeper's thread (or Start's caller, the first time) under the term's
    // fence: resumes and starts the leader's work. An error ends the term: `lost` runs,
    // the lease is given up and taken again later.
    std::function<Status(LeaseFence& fence)> gained;
    // Stops the leader's work and returns when it has stopped. Writes are fenced already.
    std::function<void()> lost;
  };

  // Opens the keeper's connection, raises the lease token to cfg.token_floor if asked,
  // and registers this instance (a new random id). Errors: the catalog's (kUnavailable:
  // the database cannot be reached).
  static Result<std::unique_ptr<LeaseKeeper>> Open(const LeaseConfig& cfg, Callbacks callbacks);
  ~LeaseKeeper();

  // One attempt to lead, now, on the caller's thread (the vault's start): Ok(true) when this
  // instance leads now. The error of `gained` when it failed (the lease is given up).
  Result<bool> TryLead();
  // Starts the thread (renewals, attempts).
  void Start();
  // Ends the thread; a leader stops its work (`lost`), then gives the lease up so another
  // instance takes over at once, and removes its instance row.
  void Stop();

  const std::string& id() const { return id_; }
  int ttl_ms() const { return cfg_.ttl_ms; }
  bool leading() const;

 private:
  LeaseKeeper(LeaseConfig cfg, Callbacks callbacks, std::unique_ptr<Catalog> catalog,
              std::string id);
  void Run();
  void Renew();
  // Ends the term: the fence first, then the work; logs `why`.
  void EndTerm(const std::string& why);

  const LeaseConfig cfg_;
  const Callbacks callbacks_;
  std::unique_ptr<Catalog> catalog_;  // the keeper's own connection
  const std::string id_;
  std::thread thread_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;                  // guarded by mu_
  bool stopped_ = false;               // guarded by mu_: Stop ran
  bool leading_ = false;               // guarded by mu_
  std::unique_ptr<LeaseFence> fence_;  // guarded by mu_: the current (or last) term's
  int64_t last_renewed_mono_ns_ = 0;   // keeper thread only: when the last renewal was sent
  std::string last_error_;             // keeper thread only: logged once per cause
};

}  // namespace osr::vault
