// What the vault shows of a replicated item (GET /items, /items/VM): its state, health,
// RPO, drill and points, from the catalog and what its sites say (one SiteStatusBoard per
// pass). Health is one line: "Normal", "Warning: ...", "Critical: ..." (docs/api.md).
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <set>

#include "common/json_in.h"
#include "common/units.h"
#include "vault/api_json.h"
#include "vault/vault.h"

namespace osr::vault {

using nlohmann::json;

std::string QuarantineHealth(const std::string& what, const json& damage) {
  json_in::Fields f(damage);
  std::string reason = f.String("reason", "");
  std::string action = f.String("action", "");
  // A sentence starts with a capital, a command ("osr vm repair ...") stays as typed.
  if (!action.empty() && action.rfind("osr ", 0) != 0) {
    action[0] = static_cast<char>(std::toupper(action[0]));
  }
  bool one = what.find("'s recovery store") != std::string::npos;
  return fmt::format("Critical: {} {} quarantined: {}. {}", what, one ? "is" : "are",
                     reason.substr(0, 400), action.substr(0, 400));
}

namespace {

// " (1.2 MiB free of 24 MiB)" from a site's {"free_bytes", "total_bytes"}; "" without.
std::string SpaceText(const json* space, const std::string& what) {
  if (space == nullptr) return "";
  json_in::Fields f(*space, what + ".space.");
  uint64_t free_bytes = f.U64("free_bytes", 0);
  uint64_t total_bytes = f.U64("total_bytes", 0);
  if (!f.ok() || total_bytes == 0) return "";
  return fmt::format("{} free of {}", FormatSize(free_bytes), FormatSize(total_bytes));
}

// The health of a recovery store that could not write what it was sent ("" when it
// could): its `write_error` (GET /stores/{vm}), with the file system's space.
std::string StoreWriteHealth(const json& store, const ItemRow& item) {
  json_in::Fields sf(store, "site " + item.target + " store " + item.vm + ".");
  const json* err = sf.Object("write_error");
  if (err == nullptr || !sf.ok()) return "";
  json_in::Fields ef(*err, "site " + item.target + " store " + item.vm + ".write_error.");
  std::string code = ef.String("code", "io_error");
  std::string what = ef.String("what", "write");
  std::string message = ef.String("message", "");
  uint64_t needed = ef.U64("bytes_needed", 0);
  uint64_t count = ef.U64("count", 0);
  int64_t since_ns = ef.I64("since_ns", 0);
  std::string space = SpaceText(sf.Object("space"), "store");
  if (!ef.ok()) return "Critical: " + ef.status().message();
  std::string since = since_ns > 0 ? ", since " + FormatTimeNs(since_ns) : "";
  if (const json* sp = sf.Object("space"); code == "no_space" && sp != nullptr && !space.empty()) {
    // Rounded alike ("8.0 MiB free ..., 8.0 MiB needed") would hide the shortfall.
    uint64_t free_bytes = json_in::Fields(*sp).U64("free_bytes", 0);
    if (FormatSize(free_bytes) == FormatSize(needed)) {
      space = fmt::format("{} bytes free of {}", free_bytes,
                          FormatSize(json_in::Fields(*sp).U64("total_bytes", 0)));
      return fmt::format(
          "Critical: the recovery site {} is out of space for {}: {}, {} bytes needed ({} failed "
          "{} time(s){}); free space or grow the file system of its data_dir: replication "
          "resumes by itself. Meanwhile the source site keeps the changes (its capture log, then "
          "the dirty-region bitmap) and the RPO grows",
          item.target, item.vm, space, needed, what, count, since);
    }
  }
  if (code == "no_space") {
    return fmt::format(
        "Critical: the recovery site {} is out of space for {}: {}{} needed ({} failed {} "
        "time(s){}); free space or grow the file system of its data_dir: replication resumes "
        "by itself. Meanwhile the source site keeps the changes (its capture log, then the "
        "dirty-region bitmap) and the RPO grows",
        item.target, item.vm, space.empty() ? "" : space + ", ", FormatSize(needed), what, count,
        since);
  }
  return fmt::format(
      "Critical: the recovery site {} cannot write the store of {}: {} ({} failed {} time(s){}); "
      "look at that site's disk and log: replication retries by itself",
      item.target, item.vm, message, what, count, since);
}

// The health of a source whose capture log could not be written ("" when it could).
std::string CaptureWriteHealth(const json& group, const ItemRow& item) {
  json_in::Fields gf(group, "site " + item.source + " group " + item.vm + ".");
  const json* err = gf.Object("capture_write_error");
  if (err == nullptr || !gf.ok()) return "";
  json_in::Fields ef(*err, "site " + item.source + " group " + item.vm + ".capture_write_error.");
  std::string code = ef.String("code", "io_error");
  std::string message = ef.String("message", "");
  std::string space = SpaceText(ef.Object("space"), "capture");
  if (!ef.ok()) return "Critical: " + ef.status().message();
  return fmt::format(
      "Critical: the source site {} {} for the capture log of {}{}: changes are tracked in the "
      "dirty-region bitmap and sent whole by a resync that starts by itself once it can write "
      "again; free space there ({})",
      item.source, code == "no_space" ? "is out of space" : "cannot write", item.vm,
      space.empty() ? "" : " (" + space + ")", message);
}

}  // namespace

std::string Vault::FailedOverHealth(const ItemRow& item, SiteStatusBoard& board) {
  // The VM's disks are the target's failover disks now: what that site says of them.
  std::string next =
      item.state == ItemState::kFailoverCommitted ? "reprotect" : "commit, then reprotect";
  auto dst = board.Site(item.target);
  if (!dst) return "Critical: site " + item.target + " is not registered";
  auto g = board.Group(*dst, item.vm);
  if (!g.ok()) return "Critical: " + g.status().message();
  json_in::Fields f(*g, "site " + item.target + " group " + item.vm + ".");
  if (const json* damage = f.Object("damage"); damage != nullptr) {
    return QuarantineHealth(item.vm + "'s disks at " + item.target, *damage);
  }
  const json* vm = f.Object("vm");
  bool running = vm != nullptr && json_in::Fields(*vm).Bool("running", false);
  if (!f.ok()) return "Critical: " + f.status().message();
  auto row = catalog_->FindVm(item.vm);
  if (!row.ok()) return "Warning: " + row.status().message();
  auto spec = row->has_value()
                  ? hypervisor::ParseVmSpec((*row)->spec, hypervisor::SpecSource::kStored)
                  : Result<hypervisor::VmSpec>(NotFound("no VM"));
  if (!running && spec.ok() && spec->driver != hypervisor::Driver::kNone) {
    return "Warning: not protected: the VM's disks are at " + item.target +
           " but it is not running there (" + next + ")";
  }
  return "Warning: not protected: the VM runs at " + item.target + " (" + next + ")";
}

// The RPO of an item while one of its sites does not answer: at most the age of the newest
// write known to be at the recovery site (its store's answer, else the newest point), and
// growing until the site answers; null when nothing is known to be there. Never 0: that
// would say nothing is at risk while nobody can tell.
json Vault::RpoWithoutAnAnswer(const Result<json>& store, const std::optional<PointRow>& latest) {
  int64_t known_ns = latest ? latest->time_ns : 0;
  if (store.ok())
    known_ns = std::max(known_ns, json_in::Fields(store.value()).I64("durable_time_ns", 0));
  if (known_ns <= 0) return nullptr;
  return std::max(0.0, static_cast<double>(NowNs() - known_ns) / 1e9);
}

namespace {

// What the health of a replicating item reads of its source's group (GET /groups/VM) and
// its target's store (GET /stores/VM). The pointers are into those answers.
struct ReplicaFacts {
  uint64_t last_seq = 0;
  uint64_t durable_seq = 0;
  int64_t durable_time_ns = 0;
  bool overflowed = false;
  uint64_t fenced_epoch = 0;
  bool connected = false;
  bool resync_required = false;
  bool resyncing = false;
  uint64_t resync_done = 0;
  uint64_t resync_total = 0;
  std::string last_error;
  const json* group_damage = nullptr;
  const json* store_damage = nullptr;
  const json* journal_cut = nullptr;
  const json* capture_log_cut = nullptr;
  std::string changed_outside;  // the first thing changed outside osr, "" when none
  Status shape;                 // a field of a shape the vault does not know
};

ReplicaFacts ReadReplicaFacts(const ItemRow& item, const json& group, const json& store) {
  ReplicaFacts f;
  json_in::Fields gf(group, "site " + item.source + " group " + item.vm + ".");
  json_in::Fields sf(store, "site " + item.target + " store " + item.vm + ".");
  f.last_seq = gf.U64("last_seq", 0);
  f.overflowed = gf.Bool("capture_overflowed", false);
  f.fenced_epoch = gf.U64("fenced_epoch", 0);
  f.group_damage = gf.Object("damage");
  f.capture_log_cut = gf.Object("capture_log_cut");
  if (const json* changed = gf.Array("changed_outside");
      changed != nullptr && !changed->empty() && changed->front().is_string()) {
    f.changed_outside = changed->front().get<std::string>().substr(0, 300);
  }
  f.durable_seq = sf.U64("durable_seq", 0);
  f.durable_time_ns = sf.I64("durable_time_ns", 0);
  f.store_damage = sf.Object("damage");
  f.journal_cut = sf.Object("journal_cut");
  json empty = json::object();
  const json* repl = gf.Object("replication");
  json_in::Fields rf(repl ? *repl : empty, "site " + item.source + " replication.");
  f.resync_required = rf.Bool("resync_required", false);
  f.resyncing = rf.Bool("resyncing", false);
  f.resync_done = rf.U64("resync_bytes_done", 0);
  f.resync_total = rf.U64("resync_bytes_total", 0);
  f.connected = rf.Bool("connected", false);
  f.last_error = rf.String("last_error", "");
  f.shape = !gf.ok() ? gf.status() : !sf.ok() ? sf.status() : rf.status();
  return f;
}

// The health of a replicating item whose sites both answered: the first of quarantine, an
// answer of an unknown shape, a full file system, a cut journal or log, a resync, a fence
// newer than the catalog, a replication that is not connected; else "Normal".
std::string ReplicaHealth(const ItemRow& item, const ReplicaFacts& f, const json& group,
                          const json& store) {
  if (f.group_damage != nullptr) {
    return QuarantineHealth(item.vm + "'s disks at " + item.source, *f.group_damage);
  }
  if (f.store_damage != nullptr) {
    return QuarantineHealth(item.vm + "'s recovery store at " + item.target, *f.store_damage);
  }
  // A site that answers in shapes the vault does not know is not a healthy one.
  if (!f.shape.ok()) return "Critical: " + f.shape.message();
  if (std::string full = StoreWriteHealth(store, item); !full.empty()) return full;
  if (std::string full = CaptureWriteHealth(group, item); !full.empty()) return full;
  if (f.journal_cut != nullptr) {
    json_in::Fields cf(*f.journal_cut, "site " + item.target + " journal_cut.");
    return fmt::format(
        "Warning: {}'s recovery store at {} lost the records after seq {} (its journal was "
        "damaged at its end: {}); they come again from {}, or the disks are resent whole",
        item.vm, item.target, cf.U64("after_seq", 0), cf.String("reason", "?"), item.source);
  }
  if (!f.changed_outside.empty()) {
    return fmt::format(
        "Warning: {}'s disks at {} were changed outside osr while the site was stopped ({}) "
        "and taken as they are; they are resent whole to {}",
        item.vm, item.source, f.changed_outside, item.target);
  }
  if (f.capture_log_cut != nullptr) {
    json_in::Fields cf(*f.capture_log_cut, "site " + item.source + " capture_log_cut.");
    return fmt::format(
        "Critical: {}'s capture log at {} was damaged at its end and cut after seq {} ({}); "
        "its disks are resent whole once {} is reachable",
        item.vm, item.source, cf.U64("after_seq", 0), cf.String("reason", "?"), item.target);
  }
  if (f.resync_required || f.overflowed) {
    return "Critical: resynchronization required (the capture log passed its limit; it "
           "starts by itself when the recovery site is reachable)";
  }
  if (f.resyncing) {
    return fmt::format("Warning: resynchronizing ({} of {} bytes)", f.resync_done, f.resync_total);
  }
  if (f.fenced_epoch > item.epoch) {
    return fmt::format(
        "Critical: {}'s disks at {} are fenced at epoch {}, after the catalog's epoch {}: the "
        "catalog is older than the sites (restored from a backup?) and the VM failed over "
        "since; see docs/operations.md, \"The catalog: backup, restore and a standby\"",
        item.vm, item.source, f.fenced_epoch, item.epoch);
  }
  if (!f.connected && item.state != ItemState::kEnablingProtection) {
    return "Warning: replication is not connected" +
           (f.last_error.empty() ? std::string() : " (" + f.last_error + ")");
  }
  return "Normal";
}

// The most severe of `health` and `warnings`: a Critical warning (damaged records at the
// recovery site) over a Warning of the replication's own state; else that state, then the
// first warning.
std::string MostSevere(const std::string& health, const std::vector<std::string>& warnings) {
  for (const std::string& w : warnings) {
    if (w.starts_with("Critical") && !health.starts_with("Critical")) return w;
  }
  if (health == "Normal" && !warnings.empty()) return warnings.front();
  return health;
}

}  // namespace

std::string Vault::NotReplicatingHealth(const ItemRow& item, SiteStatusBoard& board) {
  if (item.state == ItemState::kFailoverFailed) {
    return "Critical: the failover stopped half-way; run it again (osr failover)";
  }
  if (item.state == ItemState::kReprotecting) {
    return "Warning: reprotecting " + item.target + " -> " + item.source + " (see its job)";
  }
  return FailedOverHealth(item, board);
}

std::string Vault::ReplicationHealth(const ItemRow& item, SiteStatusBoard& board,
                                     const std::optional<PointRow>& latest, json& out,
                                     std::vector<std::string>& warnings) {
  auto src = board.Site(item.source);
  auto dst = board.Site(item.target);
  auto g = src ? board.Group(*src, item.vm) : Result<json>(NotFound("x"));
  auto st = dst ? board.Store(*dst, item.vm) : Result<json>(NotFound("x"));
  if (!g.ok() || !st.ok()) {
    out["rpo_seconds"] = RpoWithoutAnAnswer(st, latest);
    return "Critical: " + (!g.ok() ? g.status().message() : st.status().message());
  }
  ReplicaFacts f = ReadReplicaFacts(item, *g, *st);
  std::string health = ReplicaHealth(item, f, *g, *st);
  bool answered = f.shape.ok() && f.group_damage == nullptr && f.store_damage == nullptr;
  if (!answered) {
    out["rpo_seconds"] = RpoWithoutAnAnswer(st, latest);
  } else if (f.last_seq > f.durable_seq && f.durable_time_ns > 0) {
    // The newest write at the recovery site is this old; newer ones are on their way.
    // (Two hosts' wall clocks: one that stepped must not show a negative RPO.)
    out["rpo_seconds"] = std::max(0.0, static_cast<double>(NowNs() - f.durable_time_ns) / 1e9);
  } else {
    out["rpo_seconds"] = 0.0;
  }
  out["last_seq"] = f.last_seq;
  out["durable_seq"] = f.durable_seq;
  if (f.shape.ok() && !f.resyncing && !f.resync_required && !f.overflowed) {
    if (auto w = PointOverdueWarning(item, latest, f.durable_seq); !w.empty())
      warnings.push_back(w);
  }
  if (f.shape.ok()) {
    if (auto w = StoreHistoryWarning(item, *st); !w.empty()) warnings.push_back(w);
  }
  return health;
}

json Vault::ItemJson(const ItemRow& item, SiteStatusBoard& board) {
  json out = {{"name", item.vm},       {"state", ItemStateName(item.state)},
              {"source", item.source}, {"target", item.target},
              {"policy", item.policy}, {"epoch", item.epoch}};
  // The newest point only (an item may keep thousands).
  auto latest_read = catalog_->FindLatestPoint(item.vm);
  std::optional<PointRow> latest = latest_read.ok() ? *latest_read : std::nullopt;
  out["latest_point"] = latest ? PointJson(*latest) : json();
  out["direction"] = item.source + " -> " + item.target;
  if (auto v = catalog_->FindVm(item.vm); v.ok() && v->has_value()) {
    out["running_site"] = (*v)->site;
  }
  if (!item.failover.is_null()) out["failover"] = item.failover;
  // Nothing replicates from the source while a failover, commit or reprotect moves the
  // item, or after it: the health comes from the job or the target.
  if (!Info(item.state).replicating && item.state != ItemState::kEnablingProtection) {
    out["health"] = NotReplicatingHealth(item, board);
    out["rpo_seconds"] = nullptr;
    return out;
  }
  std::vector<std::string> warnings;
  std::string health = ReplicationHealth(item, board, latest, out, warnings);
  if (!latest_read.ok()) warnings.push_back("Warning: " + latest_read.status().message());
  {
    std::lock_guard lock(clock_mu_);
    if (clock_watch_.held()) warnings.push_back(clock_watch_.HealthWarning());
  }
  health = MostSevere(health, warnings);
  if (!warnings.empty()) out["warnings"] = warnings;
  if (!item.drill.is_null()) out["drill"] = DrillJson(item, &health);
  out["health"] = health;
  return out;
}

// The item's drill as its recovery site has it now: the disks' URIs there (a restarted
// site serves the drill at new ports), or "lost" with the reason and no disks, and a
// Critical `health`: drill disks are never both advertised and missing.
json Vault::DrillJson(const ItemRow& item, std::string* health) {
  json drill = item.drill;
  if (!drill.is_object()) return drill;
  auto dst_row = catalog_->FindSite(item.target);
  json_in::Fields df(drill);
  std::string view = df.String("view", "");
  if (!dst_row.ok() || !dst_row->has_value() || view.empty()) return drill;
  const std::optional<SiteRow>& dst = *dst_row;
  auto v = Client(*dst).Call("GET", "/views/" + view);
  std::string lost;
  if (v.ok()) {
    json_in::Fields vf(*v, "site " + dst->name + " view " + view + ".");
    lost = vf.String("lost", "");
    const json* disks = vf.Array("disks");
    if (!vf.ok()) return drill;  // an answer it cannot read: keep what the item says
    if (lost.empty() && disks != nullptr) drill["disks"] = *disks;
  } else if (v.status().code() == Code::kNotFound) {
    lost = "site " + dst->name + " has no view " + view;
  } else {
    return drill;  // the site is away: the health says so already
  }
  if (!lost.empty()) {
    drill["lost"] = lost;
    drill["disks"] = json::array();
    *health = fmt::format(
        "Critical: the drill disks of {} at {} were lost ({}); end the drill "
        "(osr test-failover-cleanup {}) and start a new one",
        item.vm, item.target, lost.substr(0, 300), item.vm);
  }
  return drill;
}

Result<json> Vault::ListItems() {
  OSR_ASSIGN_OR_RETURN(std::vector<ItemRow> items, catalog_->ListItems());
  json out = json::array();
  SiteStatusBoard board = StatusBoard(SiteStatusBoard::Mode::kBulk);
  for (auto& i : items) out.push_back(ItemJson(i, board));
  return out;
}

Result<json> Vault::ShowItem(const std::string& vm) {
  OSR_ASSIGN_OR_RETURN(auto i, catalog_->FindItem(vm));
  if (!i) return NotFound("VM " + vm + " is not protected (osr protect " + vm + " --target SITE)");
  SiteStatusBoard board = StatusBoard(SiteStatusBoard::Mode::kPerVm);
  return ItemJson(*i, board);
}

Result<json> Vault::ListPoints(const std::string& vm) {
  OSR_ASSIGN_OR_RETURN(auto item, catalog_->FindItem(vm));
  if (!item) return NotFound("VM " + vm + " is not protected");
  std::map<int64_t, std::string> in_use;
  {
    std::lock_guard lock(points_mu_);
    in_use = PointsInUseLocked(*item);
  }
  json out = json::array();
  OSR_ASSIGN_OR_RETURN(std::vector<PointRow> points, catalog_->ListPoints(vm));
  for (auto& p : points) out.push_back(PointJsonFor(p, in_use));
  return out;
}

std::string Vault::StoreHistoryWarning(const ItemRow& item, const json& store) {
  json_in::Fields sf(store, "site " + item.target + " store " + item.vm + ".");
  uint64_t damaged = sf.U64("damaged_records", 0);
  if (damaged > 0) {
    return fmt::format(
        "Critical: {} record(s) of {}'s recovery store at {} failed their check when read "
        "(see that site's log): points that need them cannot be read, and the store does not "
        "fold or compact past them",
        damaged, item.vm, item.target);
  }
  if (const json* c = sf.Object("compaction"); c != nullptr) {
    json_in::Fields cf(*c, "site " + item.target + " store " + item.vm + ".compaction.");
    if (cf.String("state", "") == "failed") {
      return fmt::format(
          "Warning: history compaction of {}'s recovery store at {} failed ({}); the journal "
          "keeps versions no kept point needs until the next one, after the next thinning",
          item.vm, item.target, cf.String("error", "?").substr(0, 300));
    }
  }
  return "";
}

std::string Vault::ReplicationTrouble(const ItemRow& item, const json& store) {
  // What stops it, as the sites say: the store's last failed write, the sender's error.
  json_in::Fields sf(store);
  if (const json* we = sf.Object("write_error"); we != nullptr) {
    json_in::Fields wf(*we);
    return fmt::format(": the recovery store cannot write ({}: {})", wf.String("what", "?"),
                       wf.String("message", "?").substr(0, 300));
  }
  auto src_row = catalog_->FindSite(item.source);
  if (!src_row.ok()) return ": " + src_row.status().message();
  if (!src_row->has_value()) return "";
  const std::optional<SiteRow>& src = *src_row;
  auto g = Client(*src).Call("GET", "/groups/" + item.vm);
  if (!g.ok()) return ": " + g.status().message();
  json_in::Fields gf(*g);
  const json* repl = gf.Object("replication");
  if (repl == nullptr) return ": replication is not running at " + item.source;
  std::string err = json_in::Fields(*repl).String("last_error", "");
  if (!err.empty()) return ": replication from " + item.source + ": " + err.substr(0, 300);
  return "; is replication running?";
}

}  // namespace osr::vault
