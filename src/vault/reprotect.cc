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

void Vault::RunReprotect(JobRow& job, ItemRow item, JobCancel& cancel) {
  Steps steps(catalog_.get(), &job, &cancel);
  // The VM runs at item.target now; the old primary (item.source) becomes its target.
  auto cur = catalog_->Site(item.target);
  auto old = catalog_->Site(item.source);
  auto vm = catalog_->Vm(job.vm);
  if (!cur || !old || !vm) return steps.Fail(NotFound("the VM or a site of it is not registered"));
  auto back = [&](const Status& st) {
    item.state =
        ItemState::kFailoverCommitted;  // reprotect again: it goes on from where it stopped
    steps.Fail(AlsoFailed(st, "recording the item as FailoverCommitted", catalog_->PutItem(item)));
  };
  const json job_args = job.args.is_object() ? job.args : json::object();
  json_in::Fields args(job_args, "job args.");
  bool swapped = args.Bool("swapped", false);
  bool compare_asked = args.Bool("compare", false);
  std::string mode = args.String("mode", "");
  const json* found_arg = args.Object("found");
  if (!args.ok()) return back(args.status());
  json found = found_arg != nullptr ? *found_arg : json::object();
  if (swapped) {
    // Resumed after the item was reversed: only the first point is left to make.
    steps.Begin("First recovery point");
    auto p = PointAtLatest(item, "crash", cfg_.job_wait_ms_max, 0, &cancel);
    if (!p.ok()) return steps.Fail(FirstPointFailed(steps, p.status()));
    steps.Done(100);
    job.state = JobState::kSucceeded;
    return;
  }
  steps.Begin(fmt::format("Check that {} answers", item.source));
  if (auto s = Client(*old).Call("GET", "/site"); !s.ok()) {
    return back(
        Unavailable(fmt::format("reprotect needs site {}: {}", item.source, s.status().message())));
  }
  steps.Done(5);
  item.state = ItemState::kReprotecting;
  if (Status st = catalog_->PutItem(item); !st.ok()) return back(st);

  steps.Begin(fmt::format("Find what differs between {} and {}", item.target, item.source));
  auto have_store = Client(*old).Call("GET", "/stores/" + job.vm);
  if (have_store.ok()) {
    // Done already (a resumed job): the old primary's disks are a store now.
    if (mode.empty()) mode = "exact";
  } else {
    auto g = Client(*old).Call("GET", "/groups/" + job.vm);
    if (!g.ok() && g.status().code() != Code::kNotFound) return back(g.status());
    const json group = g.ok() ? *g : json::object();
    json_in::Fields gf(group, "site " + old->name + " group " + job.vm + ".");
    const json* damage = gf.Object("damage");
    uint64_t fenced_epoch = gf.U64("fenced_epoch", 0);
    bool history_lost = gf.Bool("history_lost", false);
    if (!gf.ok()) return back(gf.status());
    if (g.ok() && damage != nullptr) {
      // Quarantined at the old primary. Missing disks are no disks: a full copy, as when
      // they were deleted through the API. Anything else waits for the operator.
      json_in::Fields df(*damage);
      std::string kind = df.String("kind", "");
      if (kind != "image_missing") {
        return back(Status(Code::kFailedPrecondition,
                           QuarantineHealth(job.vm + "'s disks at " + item.source, *damage)
                               .substr(std::string("Critical: ").size())));
      }
      steps.Progress(6, fmt::format("{}: its disks are missing ({}): they are deleted there and "
                                    "copied in full",
                                    item.source, df.String("reason", "")));
      auto d = Client(*old).Call("DELETE", "/groups/" + job.vm);
      if (!d.ok() && d.status().code() != Code::kNotFound) return back(d.status());
      g = NotFound("deleted");
    }
    if (!g.ok()) {
      mode = "full";
      job.args["mode"] = mode;
      if (Status saved = steps.Save(); !saved.ok()) return back(saved);
      auto r = Client(*old).Call("PUT", "/stores/" + job.vm,
                                 json{{"disks", vm->disks},
                                      {"start", "full"},
                                      {"epoch", item.epoch},
                                      {"source", cur->name}});
      if (!r.ok() && r.status().code() != Code::kAlreadyExists) return back(r.status());
      found = {{"why", "the old primary has no disk of this VM: a full (sparse) copy"}};
    } else {
      // Fenced, and its VM stopped, before its disks change role.
      if (fenced_epoch < item.epoch) {
        auto f =
            Client(*old).Call("POST", "/groups/" + job.vm + "/fence", json{{"epoch", item.epoch}});
        if (!f.ok()) return back(f.status());
      }
      auto s = Client(*old).Call("POST", "/groups/" + job.vm + "/vm/stop",
                                 json{{"timeout_ms", ShutdownTimeoutMs(*vm)}});
      if (!s.ok()) return back(s.status());
      auto diff = FindDifferences(item, *vm, *cur, *old, compare_asked, history_lost);
      if (!diff.ok()) return back(diff.status());
      mode = diff->mode;
      found = diff->found;
      job.args["mode"] = mode;  // kept before the old disks change role (a resumed job)
      job.args["found"] = found;
      if (Status saved = steps.Save(); !saved.ok()) return back(saved);
      auto cg = Client(*cur).Call("GET", "/groups/" + job.vm);
      if (!cg.ok()) return back(cg.status());
      json_in::Fields cf(*cg, "site " + cur->name + " group " + job.vm + ".");
      uint64_t base_seq = cf.U64("last_seq", 0);
      if (!cf.ok()) return back(cf.status());
      auto t = Client(*old).Call(
          "POST", "/groups/" + job.vm + "/to-store",
          json{{"base_seq", base_seq}, {"epoch", item.epoch}, {"source", cur->name}});
      if (!t.ok()) return back(t.status());
    }
    job.args["mode"] = mode;
    job.args["found"] = found;
    if (Status saved = steps.Save(); !saved.ok()) return back(saved);
  }
  std::string why = json_in::Fields(found).String("why", "");
  steps.Progress(20, fmt::format("{}: {}", mode, why));
  steps.Done(20);

  steps.Begin(fmt::format("Replicate {} to {} (only what differs)", item.target, item.source));
  auto r = StartReplication(item, *cur, *old);
  if (!r.ok()) return back(r.status());
  if (Status w = WaitForReplica(job.vm, *cur, *old, steps, 20, 95); !w.ok()) {
    return back(w.code() == Code::kCancelled
                    ? steps.Cancelled(fmt::format(
                          "replication {} -> {} keeps running; the item is FailoverCommitted "
                          "again: reprotect again to go on from where it stopped (osr reprotect "
                          "{})",
                          item.target, item.source, job.vm))
                    : w);
  }
  auto gs = Client(*cur).Call("GET", "/groups/" + job.vm);
  const json cur_group = gs.ok() ? *gs : json::object();
  json_in::Fields sf(cur_group, "site " + cur->name + " group " + job.vm + ".");
  const json* repl = sf.Object("replication");
  const json no_repl = json::object();
  json_in::Fields rf(repl != nullptr ? *repl : no_repl,
                     "site " + cur->name + " group " + job.vm + ".replication.");
  uint64_t shipped = rf.U64("resync_bytes_total", 0);
  uint64_t wire_bytes = rf.U64("wire_bytes_sent", 0);
  if (!sf.ok() || !rf.ok()) {
    // Only the job's figures: the replica is there (WaitForReplica said so).
    spdlog::warn("vault: reprotect {}: {}", job.vm,
                 (!sf.ok() ? sf.status() : rf.status()).ToString());
  }
  steps.Progress(95, fmt::format("{} bytes shipped", shipped));
  steps.Done(95);
  job.args["swapped"] = true;  // before the item says so: a resumed job knows
  if (Status saved = steps.Save(); !saved.ok()) return back(saved);
  item.source = cur->name;
  item.target = old->name;
  item.state = ItemState::kProtected;
  item.failover = nullptr;
  if (Status st = catalog_->PutItem(item); !st.ok()) {
    return steps.Fail(Status(st.code(),
                             "the replica is in place, but the item's new direction "
                             "could not be recorded (reprotect again to record it): " +
                                 st.message()));
  }
  job.result = {{"mode", mode},
                {"found", found},
                {"bytes_shipped", shipped},
                {"wire_bytes_sent", wire_bytes},
                {"source", item.source},
                {"target", item.target}};
  steps.Begin("First recovery point");
  auto p = PointAtLatest(item, "crash", cfg_.job_wait_ms_max, 0, &cancel);
  if (!p.ok()) return steps.Fail(FirstPointFailed(steps, p.status()));
  steps.Done(100);
  job.state = JobState::kSucceeded;
}

}  // namespace osr::vault
