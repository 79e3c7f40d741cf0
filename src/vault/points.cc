// Recovery points: resolving a point spec, the point loop (crash points on the policy's
// interval, RPO samples, reconciliation of replication and fencing), retention and the
// points that jobs and drills hold.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <map>
#include <set>

#include "common/json_in.h"
#include "common/units.h"
#include "vault/api_json.h"
#include "vault/point_at_time.h"
#include "vault/retention.h"
#include "vault/vault.h"

namespace osr::vault {

using nlohmann::json;

Result<PointRow> Vault::PointAtLatest(const ItemRow& item, const std::string& type, int wait_ms,
                                      uint64_t want, JobCancel* cancel) {
  auto src = catalog_->Site(item.source);
  auto dst = catalog_->Site(item.target);
  if (!src || !dst) return NotFound("a site of the item is not registered");
  if (want == 0) {
    OSR_ASSIGN_OR_RETURN(json g, Client(*src).Call("GET", "/groups/" + item.vm));
    json_in::Fields gf(g, "site " + item.source + " group.");
    want = gf.U64("last_seq", 0);
    if (!gf.ok()) return gf.status();
  }
  // Process everything still pending: wait until the recovery site has it.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(wait_ms);
  for (;;) {
    if (stopping_) return Unavailable("the vault is stopping");
    if (cancel) OSR_RETURN_IF_ERROR(cancel->Check());
    OSR_ASSIGN_OR_RETURN(json st, Client(*dst).Call("GET", "/stores/" + item.vm));
    json_in::Fields sf(st, "site " + item.target + " store.");
    uint64_t durable = sf.U64("durable_seq", 0);
    int64_t durable_ns = sf.I64("durable_time_ns", 0);
    if (!sf.ok()) return sf.status();
    // A point needs a consistent state: not inside a resynchronization.
    if (durable >= want && StoreConsistentAt(st, want)) {
      // Nothing new since the newest point: that point is the latest (no twin).
      auto points = catalog_->Points(item.vm);
      if (!points.empty() && points.back().seq == want &&
          (type == "crash" || points.back().type == type)) {
        return points.back();
      }
      PointRow p{0, item.vm, want, durable == want && durable_ns != 0 ? durable_ns : NowNs(), type};
      if (p.time_ns == 0) p.time_ns = NowNs();
      OSR_ASSIGN_OR_RETURN(p.id, catalog_->AddPoint(p));
      return p;
    }
    if (std::chrono::steady_clock::now() > deadline) {
      return Unavailable(
          fmt::format("the recovery site has seq {} of {} after {} s{}{} (osr item "
                      "show {})",
                      durable, want, wait_ms / 1000,
                      StoreConsistentAt(st, durable) ? "" : " and is resynchronizing",
                      ReplicationTrouble(item, st), item.vm));
    }
    if (cancel) {
      OSR_RETURN_IF_ERROR(cancel->Sleep(std::chrono::milliseconds(100)));
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
}

Result<PointRow> Vault::ResolvePoint(const ItemRow& item, const std::string& spec,
                                     JobCancel* cancel) {
  auto points = catalog_->Points(item.vm);
  if (spec == "latest") return PointAtLatest(item, "crash", cfg_.job_wait_ms_max, 0, cancel);
  if (spec == "latest-processed") {
    if (points.empty()) return NotFound("VM " + item.vm + " has no recovery point yet");
    return points.back();
  }
  if (spec == "latest-app") {
    for (auto it = points.rbegin(); it != points.rend(); ++it) {
      if (it->type == "app") return *it;
    }
    return NotFound("VM " + item.vm + " has no app-consistent point (osr point create " + item.vm +
                    " --app)");
  }
  int64_t id = 0;
  auto [p, ec] = std::from_chars(spec.data(), spec.data() + spec.size(), id);
  if (ec == std::errc() && p == spec.data() + spec.size()) {
    for (auto& pt : points) {
      if (pt.id == id) return pt;
    }
    return NotFound(
        fmt::format("VM {} has no recovery point {} (osr point list {})", item.vm, id, item.vm));
  }
  if (LooksLikeTime(spec)) {
    OSR_ASSIGN_OR_RETURN(int64_t t, ParseTimeNs(spec));
    // Within one clock era: a time a stepped clock read twice is refused (point_at_time.h).
    return PointAtTime(points, t, item.vm, spec);
  }
  return InvalidArgument("'" + spec +
                         "' is not a point: latest, latest-processed, "
                         "latest-app, a point id, or an RFC 3339 time");
}

// ---- points -------------------------------------------------------------------------

Result<json> Vault::StartReplication(const ItemRow& item, const SiteRow& from, const SiteRow& to) {
  auto policy = catalog_->Policy(item.policy).value_or(PolicyRow{"default"});
  return Client(from).Call("PUT", "/groups/" + item.vm + "/replication",
                           json{{"target", to.replication},
                                {"target_site", to.name},
                                {"epoch", item.epoch},
                                {"compression", policy.compression},
                                {"bandwidth_bytes_per_second", policy.bandwidth_bytes_per_second}});
}

void Vault::ReconcileReplication(const ItemRow& item, SiteStatusBoard& board) {
  auto src = board.Site(item.source);
  auto dst = board.Site(item.target);
  if (!src || !dst) return;
  auto g = board.Group(*src, item.vm);
  if (!g.ok()) return;
  json_in::Fields gf(*g, "site " + item.source + " group " + item.vm + ".");
  std::string to = gf.String("replicate_to", "");
  // A quarantined group replicates nothing until it is repaired (its health says so).
  if (!gf.ok() || gf.Object("damage") != nullptr || to == dst->replication) return;
  if (to.empty() && board.Store(*dst, item.vm).status().code() == Code::kNotFound) {
    // Replication off and no store at the target: the catalog says more than the sites
    // (one restored from a backup after an unprotect). Its health says so; restarting
    // replication to a site that will refuse it helps nobody.
    return;
  }
  spdlog::info("vault: {}: pointing replication at {} ({})", item.vm, item.target,
               dst->replication);
  auto r = StartReplication(item, *src, *dst);
  if (!r.ok()) {
    // Once per cause, not once per tick.
    std::lock_guard lock(logged_mu_);
    std::string& last = reconcile_logged_[item.vm];
    if (last != r.status().ToString()) {
      last = r.status().ToString();
      spdlog::warn("vault: {}: {}", item.vm, last);
    }
  }
}

void Vault::PointLoop() {
  constexpr int64_t kRpoSampleNs = 5'000'000'000;  // the chart's resolution
  int64_t last_rpo_sample_mono_ns = INT64_MIN / 2;
  StoreMemory store_memory;  // the recovery sites' stores, from one tick to the next
  for (;;) {
    {
      std::unique_lock lock(mu_);
      if (cv_.wait_for(lock, std::chrono::milliseconds(cfg_.point_tick_ms),
                       [&] { return stop_ || leader_stop_; })) {
        return;
      }
    }
    ObserveClock();
    int64_t mono_ns = clock_.MonoNs();
    bool sample_rpo = mono_ns - last_rpo_sample_mono_ns >= kRpoSampleNs;
    if (sample_rpo) last_rpo_sample_mono_ns = mono_ns;
    int64_t tick_ns = clock_.WallNs();
    // Each site is asked once for all its groups and stores, not once per item; for its
    // stores, only what changed since the last tick (all on a sampling tick, for health).
    SiteStatusBoard board = StatusBoard(SiteStatusBoard::Mode::kBulk);
    board.Remember(&store_memory, /*refresh=*/sample_rpo);
    TickSamples samples;  // written after the items, one transaction each
    for (auto& item : catalog_->Items()) {
      // One item's trouble (a site answering nonsense, a bug) must not stop the points
      // and the RPO of the others.
      try {
        PointTick(item, tick_ns, sample_rpo ? &samples : nullptr, board);
      } catch (const std::exception& e) {
        spdlog::error("vault: points of {}: {}", item.vm, e.what());
      }
    }
    constexpr int64_t kRpoKeepNs = 3600'000'000'000;  // the chart's span
    LogIfFailed(catalog_->AddRpoSamples(samples.rpo, tick_ns - kRpoKeepNs), "RPO samples");
    LogIfFailed(catalog_->PutItemHealth(samples.health), "the items' health");
    point_tick_times_.Note(
        sample_rpo ? PointTickTimes::Kind::kPointsAndRpo : PointTickTimes::Kind::kPoints,
        clock_.MonoNs() - mono_ns);
  }
}

bool Vault::ForgetUnreadablePoints(const ItemRow& item, const std::string& site, uint64_t floor) {
  // A resync (after an overflow, a cut log, a store put back) folds the store's history:
  // points below its new floor cannot be opened. They go from the catalog, said once,
  // rather than stay listed and fail when chosen. Points in use stay (their pins keep a
  // resync from passing them).
  std::vector<int64_t> gone;
  bool cleared = true;
  {
    std::lock_guard lock(points_mu_);
    auto in_use = PointsInUseLocked(item);
    for (const auto& p : catalog_->Points(item.vm)) {
      if (p.seq >= floor) continue;
      if (in_use.count(p.id)) {
        cleared = false;
        continue;
      }
      if (Status st = catalog_->DeletePoint(p.id); !st.ok()) {
        spdlog::warn("vault: point {} of {}: {}", p.id, item.vm, st.ToString());
        cleared = false;
        continue;
      }
      gone.push_back(p.id);
    }
  }
  if (!gone.empty()) {
    spdlog::warn(
        "vault: {}: point(s) {} can no longer be read at {} (its history before seq {} was "
        "folded by a resynchronization): removed from the catalog",
        item.vm, fmt::join(gone, ", "), site, floor);
  }
  return cleared;
}

void Vault::PointTick(const ItemRow& item, int64_t tick_ns, TickSamples* tick,
                      SiteStatusBoard& board) {
  // What asks the sources (fencing a returning old primary, re-pointing replication, the
  // health and RPO) runs on the sampling ticks, every 5 s: the other ticks only make the
  // points that are due, from the recovery sites' stores. (A returning old primary's
  // records are refused by epoch meanwhile, invariant 5.)
  bool full = tick != nullptr;
  if (full && !item.failover.is_null() && item.state != ItemState::kFailingOver) {
    ReconcileFencing(item, board);
  }
  if (full && Info(item.state).replicating) {
    json shown = ItemJson(item, board);
    if (shown["health"].is_string()) {
      tick->health.push_back({item.vm, shown["health"].get<std::string>(), tick_ns});
    }
    if (shown["rpo_seconds"].is_number()) {
      tick->rpo.push_back({item.vm, tick_ns, shown["rpo_seconds"].get<double>()});
    }
  }
  if (!Info(item.state).replicating) return;
  if (full) ReconcileReplication(item, board);
  auto policy = catalog_->Policy(item.policy);
  auto dst = board.Site(item.target);
  if (!policy || !dst) return;
  std::optional<PointRow> latest = catalog_->LatestPoint(item.vm);
  if (!PointDue(item.vm, latest, policy->crash_interval_s)) return;
  auto st = board.Store(*dst, item.vm);
  if (!st.ok()) {  // no new point while the recovery site is away
    NotePointTrouble(item.vm, st.status().message());
    return;
  }
  json_in::Fields f(*st, "site " + dst->name + " store " + item.vm + ".");
  uint64_t durable = f.U64("durable_seq", 0);
  int64_t t = f.I64("durable_time_ns", 0);
  uint64_t base_seq = f.U64("base_seq", 0);
  uint64_t consistent_from = f.U64("consistent_from", 0);
  if (!f.ok()) {
    spdlog::warn("vault: no point for {}: {}", item.vm, f.status().message());
    NotePointTrouble(item.vm, f.status().message());
    return;
  }
  // The points are read only when the store's floor moved (an idle item's tick reads none).
  uint64_t floor = std::max(base_seq, consistent_from);
  bool floor_moved = false;
  {
    std::lock_guard lock(points_mu_);
    floor_moved = schedules_[item.vm].floor_cleared != floor;
  }
  if (floor_moved) {
    bool cleared = ForgetUnreadablePoints(item, dst->name, floor);
    latest = catalog_->LatestPoint(item.vm);
    std::lock_guard lock(points_mu_);
    if (cleared) schedules_[item.vm].floor_cleared = floor;
  }
  if (latest && durable <= latest->seq) {  // nothing new: nothing to cover
    std::lock_guard lock(points_mu_);
    schedules_[item.vm].covered_mono_ns = clock_.MonoNs();
    return;
  }
  // Points pause while a resynchronization runs: no state there is consistent.
  if (!StoreConsistentAt(*st, durable)) {
    NotePointTrouble(item.vm, "the recovery site holds no consistent state (resynchronizing)");
    return;
  }
  // The point's time is when its newest write was captured (the source's clock).
  PointRow p{0, item.vm, durable, t ? t : clock_.WallNs(), "crash"};
  auto pruned = AddPointWithRetention(item.vm, *policy, p);
  if (!pruned.ok()) {
    spdlog::error("vault: point of {} at seq {}: {}", item.vm, durable, pruned.status().ToString());
    NotePointTrouble(item.vm, pruned.status().message());
    return;
  }
  // The store may forget the history before the oldest point left (none while a clock
  // step holds pruning: the fold is what cannot be undone).
  if (PruningHeld()) return;
  auto left = catalog_->Points(item.vm);
  if (!left.empty() && left.front().seq > base_seq) {
    auto fold =
        Client(*dst).Call("POST", "/stores/" + item.vm + "/fold", json{{"seq", left.front().seq}});
    LogIfFailed(fold.status(), "fold of " + item.vm);
  }
  // Thinning removed points: the versions no kept point sees go too (history compaction,
  // RecoveryStore::Compact), up to the newest point that thinning has reached.
  if (*pruned) CompactThinnedHistory(item.vm, *dst, left);
}

void Vault::CompactThinnedHistory(const std::string& vm, const SiteRow& site,
                                  const std::vector<PointRow>& points) {
  if (points.empty()) return;
  int64_t newest_ns = 0;
  for (auto& p : points) newest_ns = std::max(newest_ns, p.time_ns);
  uint64_t through = 0;
  std::vector<uint64_t> keep;
  for (auto& p : points) {
    if (p.time_ns > newest_ns - kThinAfterNs) break;  // the last hour is not thinned
    through = p.seq;
    keep.push_back(p.seq);
  }
  if (through == 0 || through <= points.front().seq) return;
  auto r = Client(site).Call("POST", "/stores/" + vm + "/compact",
                             json{{"keep", keep}, {"through", through}});
  LogIfFailed(r.status(), "history compaction of " + vm);
}

bool Vault::PointDue(const std::string& vm, const std::optional<PointRow>& latest,
                     int64_t interval_s) {
  const int64_t interval_ns = interval_s * 1000000000;
  const int64_t mono_ns = clock_.MonoNs();
  std::lock_guard lock(points_mu_);
  PointSchedule& s = schedules_[vm];
  if (s.covered_mono_ns == 0) s.covered_mono_ns = mono_ns;  // first sight: a grace period
  if (!latest) return true;
  if (latest->id != s.last_point_id) {
    // A newer point (made here, by a job or on request) starts the interval again. At
    // the first sight after a start, the wall clock says how old it is — clamped to
    // [0, interval], so a stepped clock moves the next point by at most one interval.
    int64_t age_ns = 0;
    if (s.last_point_id == 0) {
      age_ns = std::clamp<int64_t>(clock_.WallNs() - latest->time_ns, 0, interval_ns);
    }
    s.last_point_id = latest->id;
    s.last_point_mono_ns = mono_ns - age_ns;
  }
  return mono_ns - s.last_point_mono_ns >= interval_ns;
}

void Vault::NotePointTrouble(const std::string& vm, const std::string& why) {
  std::lock_guard lock(points_mu_);
  schedules_[vm].last_error = why;
}

Result<bool> Vault::AddPointWithRetention(const std::string& vm, const PolicyRow& policy,
                                          const PointRow& p) {
  // Under points_mu_: a job pins its point under it too, and the item (its drill, its
  // failover) is read fresh here, so a point is pinned, or recorded as in use, or seen
  // deleted by the job — never deleted under a job that holds it.
  std::lock_guard lock(points_mu_);
  std::vector<int64_t> prune;
  if (!PruningHeld()) {
    auto item = catalog_->Item(vm);
    if (!item) return NotFound("VM " + vm + " is no longer protected");
    std::set<int64_t> keep;
    for (auto& [id, use] : PointsInUseLocked(*item)) keep.insert(id);
    auto points = catalog_->Points(vm);
    points.push_back(p);  // the new point is the newest: never pruned
    prune = PointsToPrune(points, keep, clock_.WallNs(), policy.retention_s * 1000000000);
  }
  OSR_ASSIGN_OR_RETURN(int64_t id, catalog_->AddPointAndPrune(p, prune));
  PointSchedule& s = schedules_[vm];
  s.last_point_id = id;
  s.last_point_mono_ns = s.covered_mono_ns = clock_.MonoNs();
  s.last_error.clear();
  return !prune.empty();
}

std::string Vault::PointOverdueWarning(const ItemRow& item, const std::optional<PointRow>& latest,
                                       uint64_t durable_seq) {
  // Room for a slow site call or a busy point thread beyond two intervals.
  constexpr int64_t kSlackNs = 10'000'000'000;
  if (!latest || durable_seq <= latest->seq) return "";  // nothing new, or no point yet
  if (!Info(item.state).replicating) return "";
  auto policy = catalog_->Policy(item.policy);
  if (!policy) return "";
  int64_t uncovered_ns = 0;
  std::string last_error;
  {
    std::lock_guard lock(points_mu_);
    auto it = schedules_.find(item.vm);
    if (it == schedules_.end() || it->second.covered_mono_ns == 0) return "";
    uncovered_ns = clock_.MonoNs() - it->second.covered_mono_ns;
    last_error = it->second.last_error;
  }
  return PointOverdueText(uncovered_ns, durable_seq, *latest, policy->crash_interval_s, kSlackNs,
                          last_error);
}

void Vault::ObserveClock() {
  std::lock_guard lock(clock_mu_);
  auto change = clock_watch_.Observe(clock_.WallNs(), clock_.MonoNs());
  switch (change) {
    case ClockWatch::Change::kNone:
      return;
    case ClockWatch::Change::kStepped:
      spdlog::warn("vault: {}", clock_watch_.HealthWarning());
      break;
    case ClockWatch::Change::kReturned:
      spdlog::info(
          "vault: the wall clock is back in step with the monotonic clock: pruning "
          "of recovery points resumes");
      break;
    case ClockWatch::Change::kSettled:
      spdlog::info(
          "vault: the wall clock kept time since its last step: pruning of recovery "
          "points resumes on the time it shows ({})",
          FormatTimeNs(clock_.WallNs()));
      break;
    case ClockWatch::Change::kAnchored:
    case ClockWatch::Change::kConfirmed:
      break;
  }
  // The state is saved so that a restarted vault keeps its hold and its anchor.
  LogIfFailed(catalog_->PutMeta("clock", clock_watch_.ToJson(boot_id_).dump()),
              "saving the clock's state");
}

bool Vault::PruningHeld() {
  std::lock_guard lock(clock_mu_);
  return clock_watch_.held();
}

Status Vault::PinPoint(const std::string& vm, int64_t id, const std::string& use,
                       std::optional<PointPin>& pin) {
  std::lock_guard lock(points_mu_);
  bool exists = false;
  for (auto& p : catalog_->Points(vm)) exists = exists || p.id == id;
  if (!exists) {
    return NotFound(
        fmt::format("recovery point {} of VM {} was deleted by retention as it was chosen; choose "
                    "another (osr point list {})",
                    id, vm, vm));
  }
  pins_[vm][id] = use;
  pin.emplace(this, vm, id);
  return Status::Ok();
}

Vault::PointPin::~PointPin() {
  std::lock_guard lock(v_->points_mu_);
  auto it = v_->pins_.find(vm_);
  if (it == v_->pins_.end()) return;
  it->second.erase(id_);
  if (it->second.empty()) v_->pins_.erase(it);
}

std::map<int64_t, std::string> Vault::PointsInUseLocked(const ItemRow& item) {
  std::map<int64_t, std::string> out;
  // The item's JSON columns are read back through the checked layer (a row is input).
  auto point_id = [](const json& holder) -> int64_t {
    if (!holder.is_object()) return 0;
    json_in::Fields f(holder);
    const json* point = f.Object("point");
    if (point == nullptr || !f.ok()) return 0;
    json_in::Fields pf(*point);
    int64_t id = pf.I64("id", 0);
    return pf.ok() ? id : 0;
  };
  if (int64_t id = point_id(item.drill); id != 0) out[id] = "test-failover";
  if (In(item.state, kUncommittedFailover)) {
    if (int64_t id = point_id(item.failover); id != 0) out[id] = "failover";
  }
  if (auto it = pins_.find(item.vm); it != pins_.end()) {
    for (auto& [id, use] : it->second) out.emplace(id, use);
  }
  return out;
}

json Vault::PointJsonFor(const PointRow& p, const std::map<int64_t, std::string>& in_use) {
  json out = PointJson(p);
  if (auto it = in_use.find(p.id); it != in_use.end()) out["in_use"] = it->second;
  return out;
}

}  // namespace osr::vault
