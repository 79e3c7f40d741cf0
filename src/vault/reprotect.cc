// The reprotect workflow: replicate back from the failed-over site, shipping only what
// differs (from the old primary's history when it vouches for it, else by block hashes).
// docs/architecture.md, "Failover and reprotect".
#include <fcntl.h>
#include <fmt/format.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <optional>
#include <thread>

#include "common/json_in.h"
#include "common/units.h"
#include "hypervisor/vm_spec.h"
#include "vault/api_json.h"
#include "vault/job_steps.h"
#include "vault/vault.h"
#include "vault/workflow_steps.h"

namespace osr::vault {

using nlohmann::json;

namespace {

constexpr size_t kReasonsShownMax = 3;
constexpr size_t kReasonBytesMax = 300;  // of one reason a site gives

// The "why" of a reprotect that compared block hashes because the old primary could not
// vouch for its history: the site's reasons ("disk os was changed after the fence (...)").
std::string UnverifiedWhy(const json& checks) {
  std::vector<std::string> reasons;
  for (const json& c : checks) {
    json_in::Fields f(c);
    std::string reason = f.String("reason", "");
    if (f.ok() && !reason.empty()) reasons.push_back(reason.substr(0, kReasonBytesMax));
  }
  if (reasons.empty()) {
    return "the old primary could not vouch for its capture history: block hashes compared";
  }
  std::string out;
  for (size_t i = 0; i < reasons.size() && i < kReasonsShownMax; ++i) {
    out += (i ? "; the old primary's " : "the old primary's ") + reasons[i];
  }
  if (reasons.size() > kReasonsShownMax) {
    out += fmt::format("; and {} more", reasons.size() - kReasonsShownMax);
  }
  return out + ": block hashes compared";
}

}  // namespace

Result<json> Vault::CompareBlockHashes(const std::string& vm, const VmRow& row, const SiteRow& cur,
                                       const SiteRow& old) {
  // 64 KiB regions (the bitmaps'), larger for big disks: at most 4 Mi hashes (32 MiB)
  // cross the vault.
  uint64_t total = 0;
  for (auto& d : row.disks) total += json_in::Fields(d).U64("size_bytes", 0);
  uint64_t region = 64 * 1024;
  while (total / region > (4u << 20)) region *= 2;
  OSR_ASSIGN_OR_RETURN(
      std::string hashes,
      Client(old).CallRaw("GET", fmt::format("/groups/{}/hashes?region_bytes={}", vm, region)));
  OSR_ASSIGN_OR_RETURN(
      std::string compared,
      Client(cur).CallRaw("POST", fmt::format("/groups/{}/compare?region_bytes={}", vm, region),
                          hashes));
  OSR_ASSIGN_OR_RETURN(json c,
                       json_in::ParseObject(compared, "site " + cur.name + "'s comparison"));
  json_in::Fields f(c, "site " + cur.name + " compare.");
  json found = {{"regions", f.U64("regions", 0)},
                {"bytes", f.U64("bytes", 0)},
                {"compared", f.U64("compared", 0)},
                {"region_bytes", region}};
  if (!f.ok()) return f.status();
  return found;
}

Result<Vault::Differences> Vault::FindDifferences(const ItemRow& item, const VmRow& row,
                                                  const SiteRow& cur, const SiteRow& old,
                                                  bool compare, bool history_lost) {
  const std::string lost = "the old primary's capture history is lost: block hashes compared";
  std::string why = history_lost ? lost : compare ? "block hashes compared (asked for)" : "";
  json checks = json::array();
  if (why.empty()) {
    // Records up to what the store had when it was fenced are there already.
    const json failover = item.failover.is_object() ? item.failover : json::object();
    json_in::Fields ff(failover, "item failover.");
    uint64_t after = ff.U64("store_seq", 0);
    if (!ff.ok()) return ff.status();
    OSR_ASSIGN_OR_RETURN(
        json u,
        Client(old).Call("GET", fmt::format("/groups/{}/unreplicated?after={}", item.vm, after)));
    json_in::Fields uf(u, "site " + old.name + " unreplicated.");
    std::string history = uf.String("history", "exact");
    // A site that does not say has not checked.
    bool verified = uf.Bool("verified", false);
    const json* found_checks = uf.Array("checks");
    const json* regions = uf.Array("regions");
    uint64_t bytes = uf.U64("bytes", 0), records = uf.U64("records", 0);
    if (!uf.ok()) return uf.status();
    if (found_checks != nullptr) checks = *found_checks;
    if (history == "lost") {
      why = lost;
    } else if (!verified) {
      why = UnverifiedWhy(checks);
    } else {
      OSR_RETURN_IF_ERROR(Client(cur)
                              .Call("POST", "/groups/" + item.vm + "/regions",
                                    json{{"regions", regions ? *regions : json::array()}})
                              .status());
      return Differences{
          "exact",
          json{
              {"unreplicated_bytes", bytes},
              {"known_at_recovery_site_upto", after},
              {"unreplicated_records", records},
              {"verified", true},
              {"why",
               "what the store held after the point, what the old primary never sent, and what was "
               "written here since failover (its disks and history are as they were when it was "
               "fenced)"}}};
    }
  }
  OSR_ASSIGN_OR_RETURN(json found, CompareBlockHashes(item.vm, row, cur, old));
  found["why"] = why;
  found["verified"] = false;
  if (!checks.empty()) found["checks"] = checks;
  return Differences{"hash", found};
}

// One reprotect job: the VM runs at item.target now and the old primary (item.source)
// becomes its target. Each step is safe to run again; what it decided (mode, what differs,
// swapped) is in the job's args. A step that fails leaves the item FailoverCommitted:
// reprotect again goes on from where it stopped.
class ReprotectRun : public JobRun {
 public:
  using JobRun::JobRun;

  void Run() {
    // (Nothing is recorded when the job cannot even be read: the item stays as it is.)
    if (Status st = Load(); !st.ok()) return steps_.Fail(st);
    if (!swapped_) {
      if (Status st = ReplicateBack(); !st.ok()) return Back(st);
      if (Status st = Swap(); !st.ok()) return steps_.Fail(st);
    }
    // (Resumed after the item was reversed: only the first point is left to make.)
    steps_.Begin("First recovery point");
    auto p = v_.PointAtLatest(item_, "crash", v_.cfg_.job_wait_ms_max, 0, &cancel_);
    if (!p.ok()) return steps_.Fail(FirstPointFailed(steps_, p.status()));
    steps_.Done(100);
    job_.state = JobState::kSucceeded;
  }

 private:
  Status Load() {
    OSR_ASSIGN_OR_RETURN(auto cur, v_.catalog_->FindSite(item_.target));
    OSR_ASSIGN_OR_RETURN(auto old, v_.catalog_->FindSite(item_.source));
    OSR_ASSIGN_OR_RETURN(auto vm, v_.catalog_->FindVm(job_.vm));
    if (!cur || !old || !vm) return NotFound("the VM or a site of it is not registered");
    cur_ = *cur;
    old_ = *old;
    vm_ = *vm;
    const json job_args = job_.args.is_object() ? job_.args : json::object();
    json_in::Fields args(job_args, "job args.");
    swapped_ = args.Bool("swapped", false);
    compare_asked_ = args.Bool("compare", false);
    mode_ = args.String("mode", "");
    const json* found = args.Object("found");
    if (!args.ok()) return args.status();
    found_ = found != nullptr ? *found : json::object();
    return Status::Ok();
  }

  // Everything up to the replica at the old primary.
  Status ReplicateBack() {
    OSR_RETURN_IF_ERROR(CheckOldPrimary());
    item_.state = ItemState::kReprotecting;
    OSR_RETURN_IF_ERROR(v_.catalog_->PutItem(item_));
    steps_.Begin(fmt::format("Find what differs between {} and {}", item_.target, item_.source));
    OSR_RETURN_IF_ERROR(FindWhatDiffers());
    steps_.Progress(20, fmt::format("{}: {}", mode_, json_in::Fields(found_).String("why", "")));
    steps_.Done(20);
    steps_.Begin(fmt::format("Replicate {} to {} (only what differs)", item_.target, item_.source));
    OSR_RETURN_IF_ERROR(v_.StartReplication(item_, cur_, old_).status());
    if (Status w = v_.WaitForReplica(job_.vm, cur_, old_, steps_, 20, 95); !w.ok()) {
      if (w.code() != Code::kCancelled) return w;
      return steps_.Cancelled(fmt::format(
          "replication {} -> {} keeps running; the item is FailoverCommitted again: reprotect "
          "again to go on from where it stopped (osr reprotect {})",
          item_.target, item_.source, job_.vm));
    }
    ReadShippedFigures();
    steps_.Progress(95, fmt::format("{} bytes shipped", shipped_));
    steps_.Done(95);
    job_.args["swapped"] = true;  // before the item says so: a resumed job knows
    return steps_.Save();
  }

  Status CheckOldPrimary() {
    steps_.Begin(fmt::format("Check that {} answers", item_.source));
    if (auto s = v_.Client(old_).Call("GET", "/site"); !s.ok()) {
      return Unavailable(
          fmt::format("reprotect needs site {}: {}", item_.source, s.status().message()));
    }
    steps_.Done(5);
    return Status::Ok();
  }

  // Makes the old primary's disks a recovery store holding what is the same, and says in
  // mode_/found_ how what differs was found. Kept in the args before the disks change role.
  Status FindWhatDiffers() {
    if (v_.Client(old_).Call("GET", "/stores/" + job_.vm).ok()) {
      // Done already (a resumed job): the old primary's disks are a store now.
      if (mode_.empty()) mode_ = "exact";
      return Status::Ok();
    }
    auto g = v_.Client(old_).Call("GET", "/groups/" + job_.vm);
    if (!g.ok() && g.status().code() != Code::kNotFound) return g.status();
    const json group = g.ok() ? *g : json::object();
    json_in::Fields gf(group, "site " + old_.name + " group " + job_.vm + ".");
    const json* damage = gf.Object("damage");
    uint64_t fenced_epoch = gf.U64("fenced_epoch", 0);
    bool history_lost = gf.Bool("history_lost", false);
    if (!gf.ok()) return gf.status();
    bool has_disks = g.ok();
    if (has_disks && damage != nullptr) {
      OSR_RETURN_IF_ERROR(DeleteMissingDisks(*damage));
      has_disks = false;
    }
    if (has_disks) {
      OSR_ASSIGN_OR_RETURN(bool same, GroupHasTheVmsDisks(group, vm_, old_.name));
      if (!same) {
        // A disk was added or grown there after the point the VM failed over to: those
        // disks are not the VM's any more (what they hold beyond it is what failing over
        // to that point gave up), and a differential copy needs the same disks.
        steps_.Progress(6, fmt::format("{}: its disks are not the VM's now ({}): a disk was "
                                       "added or grown after the point it failed over to; they "
                                       "are deleted there and copied in full",
                                       item_.source, vm_.disks.dump()));
        auto d = v_.Client(old_).Call("DELETE", "/groups/" + job_.vm);
        if (!d.ok() && d.status().code() != Code::kNotFound) return d.status();
        has_disks = false;
      }
    }
    if (has_disks) {
      OSR_RETURN_IF_ERROR(FromTheOldDisks(fenced_epoch, history_lost));
    } else {
      OSR_RETURN_IF_ERROR(FullCopy());
    }
    job_.args["mode"] = mode_;
    job_.args["found"] = found_;
    return steps_.Save();
  }

  // Quarantined at the old primary. Missing disks are no disks: a full copy, as when they
  // were deleted through the API. Anything else waits for the operator.
  Status DeleteMissingDisks(const json& damage) {
    json_in::Fields df(damage);
    std::string kind = df.String("kind", "");
    if (kind != "image_missing") {
      return Status(Code::kFailedPrecondition,
                    QuarantineHealth(job_.vm + "'s disks at " + item_.source, damage)
                        .substr(std::string("Critical: ").size()));
    }
    steps_.Progress(6, fmt::format("{}: its disks are missing ({}): they are deleted there and "
                                   "copied in full",
                                   item_.source, df.String("reason", "")));
    auto d = v_.Client(old_).Call("DELETE", "/groups/" + job_.vm);
    if (!d.ok() && d.status().code() != Code::kNotFound) return d.status();
    return Status::Ok();
  }

  Status FullCopy() {
    mode_ = "full";
    job_.args["mode"] = mode_;
    OSR_RETURN_IF_ERROR(steps_.Save());
    auto r = v_.Client(old_).Call("PUT", "/stores/" + job_.vm,
                                  json{{"disks", vm_.disks},
                                       {"start", "full"},
                                       {"epoch", item_.epoch},
                                       {"source", cur_.name}});
    if (!r.ok() && r.status().code() != Code::kAlreadyExists) return r.status();
    found_ = {{"why", "the old primary has no disk of this VM: a full (sparse) copy"}};
    return Status::Ok();
  }

  // Fenced, and its VM stopped, before its disks change role; what differs from its
  // history or by block hashes; then its disks become a store at the current base.
  Status FromTheOldDisks(uint64_t fenced_epoch, bool history_lost) {
    if (fenced_epoch < item_.epoch) {
      OSR_RETURN_IF_ERROR(
          v_.Client(old_)
              .Call("POST", "/groups/" + job_.vm + "/fence", json{{"epoch", item_.epoch}})
              .status());
    }
    OSR_RETURN_IF_ERROR(v_.Client(old_)
                            .Call("POST", "/groups/" + job_.vm + "/vm/stop",
                                  json{{"timeout_ms", ShutdownTimeoutMs(vm_)}})
                            .status());
    OSR_ASSIGN_OR_RETURN(Vault::Differences diff,
                         v_.FindDifferences(item_, vm_, cur_, old_, compare_asked_, history_lost));
    mode_ = diff.mode;
    found_ = diff.found;
    job_.args["mode"] = mode_;  // kept before the old disks change role (a resumed job)
    job_.args["found"] = found_;
    OSR_RETURN_IF_ERROR(steps_.Save());
    OSR_ASSIGN_OR_RETURN(json cg, v_.Client(cur_).Call("GET", "/groups/" + job_.vm));
    json_in::Fields cf(cg, "site " + cur_.name + " group " + job_.vm + ".");
    uint64_t base_seq = cf.U64("last_seq", 0);
    if (!cf.ok()) return cf.status();
    return v_.Client(old_)
        .Call("POST", "/groups/" + job_.vm + "/to-store",
              json{{"base_seq", base_seq}, {"epoch", item_.epoch}, {"source", cur_.name}})
        .status();
  }

  // The copy's figures for the job's result (the replica is there: WaitForReplica said so;
  // an answer of the wrong shape only loses the figures).
  void ReadShippedFigures() {
    auto gs = v_.Client(cur_).Call("GET", "/groups/" + job_.vm);
    const json cur_group = gs.ok() ? *gs : json::object();
    json_in::Fields sf(cur_group, "site " + cur_.name + " group " + job_.vm + ".");
    const json* repl = sf.Object("replication");
    const json no_repl = json::object();
    json_in::Fields rf(repl != nullptr ? *repl : no_repl,
                       "site " + cur_.name + " group " + job_.vm + ".replication.");
    shipped_ = rf.U64("resync_bytes_total", 0);
    wire_bytes_ = rf.U64("wire_bytes_sent", 0);
    if (!sf.ok() || !rf.ok()) {
      spdlog::warn("vault: reprotect {}: {}", job_.vm,
                   (!sf.ok() ? sf.status() : rf.status()).ToString());
    }
  }

  // The item is Protected in the other direction.
  Status Swap() {
    item_.source = cur_.name;
    item_.target = old_.name;
    item_.state = ItemState::kProtected;
    item_.failover = nullptr;
    if (Status st = v_.catalog_->PutItem(item_); !st.ok()) {
      return Status(st.code(),
                    "the replica is in place, but the item's new direction could not be "
                    "recorded (reprotect again to record it): " +
                        st.message());
    }
    job_.result = {{"mode", mode_},
                   {"found", found_},
                   {"bytes_shipped", shipped_},
                   {"wire_bytes_sent", wire_bytes_},
                   {"source", item_.source},
                   {"target", item_.target}};
    return Status::Ok();
  }

  // Reprotect again goes on from where it stopped.
  void Back(const Status& st) {
    item_.state = ItemState::kFailoverCommitted;
    steps_.Fail(
        AlsoFailed(st, "recording the item as FailoverCommitted", v_.catalog_->PutItem(item_)));
  }

  SiteRow cur_, old_;  // the VM runs at cur_ (item.target); old_ becomes its target
  VmRow vm_;
  bool swapped_ = false;
  bool compare_asked_ = false;
  std::string mode_;
  json found_ = json::object();
  uint64_t shipped_ = 0;
  uint64_t wire_bytes_ = 0;
};

void Vault::RunReprotect(JobRow& job, ItemRow item, JobCancel& cancel) {
  ReprotectRun(*this, job, std::move(item), cancel).Run();
}

}  // namespace osr::vault
