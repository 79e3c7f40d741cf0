// The failover workflow (and change recovery point, and fencing an old primary that comes
// back). docs/architecture.md, "Failover and reprotect", explains the order of the steps.
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

// What a failover job keeps in its args: what the API asked, and what its steps decided
// (a resumed job reads them back and goes on from there).
struct FailoverArgs {
  bool planned = false;
  bool shutdown = false;  // shut the source VM down first (always when planned)
  bool start = true;      // start the VM at the recovery site
  std::string point_spec = "latest";
  std::optional<ItemState> state_before;  // what the item was when the job began
  bool pre_hook_done = false;
  bool shutdown_done = false;
  std::optional<uint64_t> epoch;  // the new epoch, once decided
  std::optional<PointRow> point;  // the point, once chosen (point_seq is kept)
};

Result<FailoverArgs> ReadFailoverArgs(const json& args) {
  json_in::Fields f(args, "failover job args.");
  FailoverArgs a;
  a.planned = f.Bool("planned", false);
  a.shutdown = a.planned || f.Bool("shutdown_source", false);
  a.start = f.Bool("start", true);
  a.pre_hook_done = f.Bool("pre_hook_done", false);
  a.shutdown_done = f.Bool("shutdown_done", false);
  // A state name this vault does not know reads as none (the item's state now).
  a.state_before = ItemStateFromName(f.String("state_before", ""));
  if (f.Has("epoch")) a.epoch = f.U64("epoch");
  if (f.Has("point_seq")) {
    PointRow p;
    p.seq = f.U64("point_seq");
    p.time_ns = f.I64("point_time_ns", 0);
    if (const json* chosen = f.Object("point")) {
      json_in::Fields pf(*chosen, "failover job args.point.");
      p.id = pf.I64("id", 0);
      p.type = pf.String("type", "crash");
      if (!pf.ok()) return pf.status();
    }
    a.point = p;
  } else {
    a.point_spec = f.String("point", "latest");
  }
  if (!f.ok()) return f.status();
  return a;
}

}  // namespace

// One failover job: its steps in order, each safe to run again (docs/architecture.md,
// "Failover and reprotect"). A step that fails records the item as `leave_`: the state it
// had before while nothing was fenced, FailoverFailed once the source may refuse writes.
class FailoverRun : public JobRun {
 public:
  using JobRun::JobRun;

  void Run() {
    if (Status st = ToTheRecoverySite(); !st.ok()) return Fail(st);
    if (Status st = StartVm(); !st.ok()) return steps_.Fail(st);  // failed over: it stays so
    PostHook();
    job_.progress = 100;
    job_.state = JobState::kSucceeded;
  }

 private:
  Status ToTheRecoverySite() {
    OSR_RETURN_IF_ERROR(Load());
    OSR_RETURN_IF_ERROR(CheckSource());
    OSR_RETURN_IF_ERROR(PreHook());
    OSR_RETURN_IF_ERROR(ShutDownSource());
    OSR_RETURN_IF_ERROR(DecideEpoch());
    OSR_RETURN_IF_ERROR(ChoosePoint());
    leave_ = ItemState::kFailoverFailed;  // fenced from here on
    OSR_RETURN_IF_ERROR(SaveChosenPoint());
    OSR_RETURN_IF_ERROR(OpenDisks());
    return Record();
  }

  // The sites, the VM and the job's args.
  Status Load() {
    leave_ = item_.state;
    OSR_ASSIGN_OR_RETURN(args_, ReadFailoverArgs(job_.args));
    before_ = args_.state_before.value_or(item_.state);
    leave_ = before_;
    job_.args["state_before"] = ItemStateName(before_);
    OSR_ASSIGN_OR_RETURN(auto src, v_.catalog_->FindSite(item_.source));
    OSR_ASSIGN_OR_RETURN(auto dst, v_.catalog_->FindSite(item_.target));
    OSR_ASSIGN_OR_RETURN(auto vm, v_.catalog_->FindVm(job_.vm));
    if (!src || !dst || !vm) return NotFound("the VM or a site of it is not registered");
    src_ = *src;
    dst_ = *dst;
    vm_ = *vm;
    return Status::Ok();
  }

  Status CheckSource() {
    if (!args_.planned || args_.epoch) return Status::Ok();
    steps_.Begin(fmt::format("Check that {} answers (a planned failover needs it)", src_.name));
    auto g = v_.Client(src_).Call("GET", "/groups/" + job_.vm);
    if (!g.ok()) {
      return Unavailable(
          fmt::format("a planned failover needs the source site: {}; nothing "
                      "was changed (an unplanned failover does not need it)",
                      g.status().message()));
    }
    steps_.Done(5);
    return Status::Ok();
  }

  Status PreHook() {
    if (args_.pre_hook_done) return Status::Ok();
    if (Status h = v_.RunHook(vm_, "pre_failover", {{"OSR_SITE", item_.target}}); !h.ok()) {
      steps_.Begin("Pre-failover hook");
      return h;
    }
    job_.args["pre_hook_done"] = true;
    return steps_.Save();
  }

  Status ShutDownSource() {
    if (!args_.shutdown || args_.shutdown_done) return Status::Ok();
    steps_.Begin(fmt::format("Shut down the VM at {}", item_.source));
    if (Driver(vm_) == "none") {
      steps_.Progress(10, "the VM has no driver: nothing to shut down");
      steps_.Done(10);
    } else {
      auto r = v_.Client(src_).Call("POST", "/groups/" + job_.vm + "/vm/stop",
                                    json{{"timeout_ms", ShutdownTimeoutMs(vm_)}});
      if (!r.ok()) {
        steps_.Warn(10, "could not shut it down (" + r.status().message() +
                            "); the failover goes on and fencing stops its writes");
      } else {
        bool clean = json_in::Fields(*r).Bool("clean", true);
        steps_.Progress(10, clean ? "it shut down" : "it did not shut down in time: stopped");
        steps_.Done(10);
      }
    }
    job_.args["shutdown_done"] = true;
    return steps_.Save();
  }

  // The new epoch: decided once, kept in the job (a resumed job uses the same).
  Status DecideEpoch() {
    if (args_.epoch) {
      epoch_ = *args_.epoch;
      return Status::Ok();
    }
    epoch_ = item_.state == ItemState::kFailoverFailed ? item_.epoch : item_.epoch + 1;
    job_.args["epoch"] = epoch_;
    return steps_.Save();
  }

  Status ChoosePoint() {
    if (args_.point) {  // chosen before the vault stopped
      point_ = *args_.point;
      return Status::Ok();
    }
    return args_.planned ? DrainToThePoint() : ResolveAndFence();
  }

  // Planned: fence the source with keep_shipping, wait until the recovery site has every
  // write, and fail over to that point: nothing is lost.
  Status DrainToThePoint() {
    steps_.Begin(fmt::format("Fence {} and send it all to {}", item_.source, item_.target));
    auto f = v_.Client(src_).Call("POST", "/groups/" + job_.vm + "/fence",
                                  json{{"epoch", epoch_}, {"keep_shipping", true}});
    if (!f.ok()) return f.status();
    leave_ = ItemState::kFailoverFailed;  // fenced already: run the failover again
    OSR_RETURN_IF_ERROR(MarkFailingOver());
    auto p = v_.PointAtLatest(item_, "crash", v_.cfg_.job_wait_ms_max, 0, &cancel_);
    if (!p.ok() && p.status().code() == Code::kCancelled) {
      return steps_.Cancelled(fmt::format(
          "{} is fenced at epoch {} (its disks refuse writes) and nothing was opened at {}; "
          "the item is FailoverFailed: run the failover again to finish it (osr failover {})",
          item_.source, epoch_, item_.target, job_.vm));
    }
    if (!p.ok()) return p.status();
    point_ = *p;
    steps_.Progress(40, fmt::format("everything is at {}: point {} (seq {})", item_.target,
                                    point_.id, point_.seq));
    steps_.Done(40);
    return Status::Ok();
  }

  // Unplanned: the point first (the latest waits for what is pending, if the source
  // answers), then the item says FailingOver, then the source is fenced if it answers (it
  // is fenced when it comes back otherwise; the recovery site refuses its records now).
  Status ResolveAndFence() {
    steps_.Begin("Resolve the recovery point");
    OSR_ASSIGN_OR_RETURN(point_, ResolvePoint());
    // Retention keeps the point while the job runs (the item's failover names it after).
    OSR_RETURN_IF_ERROR(v_.PinPoint(job_.vm, point_.id, "failover", pin_));
    steps_.Progress(30, fmt::format("point {} (seq {}, {}, {})", point_.id, point_.seq, point_.type,
                                    FormatTimeNs(point_.time_ns)));
    steps_.Done(30);
    steps_.Begin(fmt::format("Fence {} (epoch {})", item_.source, epoch_));
    // Before the fence: the item says FailingOver before anything refuses writes.
    OSR_RETURN_IF_ERROR(MarkFailingOver());
    leave_ = ItemState::kFailoverFailed;
    auto f = v_.Client(src_).Call("POST", "/groups/" + job_.vm + "/fence", json{{"epoch", epoch_}});
    if (!f.ok()) {
      steps_.Warn(40, f.status().message() +
                          "; it will be fenced when it answers, and the recovery site refuses "
                          "its records from now on");
    } else {
      steps_.Done(40);
    }
    return Status::Ok();
  }

  Result<PointRow> ResolvePoint() {
    bool latest = args_.point_spec == "latest";
    Result<PointRow> p =
        latest ? v_.PointAtLatest(item_, "crash", std::min(v_.cfg_.job_wait_ms_max, 30000), 0,
                                  &cancel_)
               : v_.ResolvePoint(item_, args_.point_spec, &cancel_);
    if (!p.ok() && p.status().code() == Code::kCancelled) {
      return steps_.Cancelled("nothing was changed: the item is " +
                              std::string(ItemStateName(before_)) + " again");
    }
    if (!p.ok() && latest) {
      steps_.Progress(20, "the source cannot send what is pending (" + p.status().message() +
                              "): the latest is what the recovery site holds");
      p = v_.PointAtStore(item_);
    }
    return p;
  }

  Status MarkFailingOver() {
    item_.state = ItemState::kFailingOver;
    item_.epoch = epoch_;
    item_.failover = {{"epoch", epoch_}, {"from", item_.source}, {"planned", args_.planned}};
    return v_.catalog_->PutItem(item_);
  }

  Status SaveChosenPoint() {
    job_.args["point_seq"] = point_.seq;
    job_.args["point_time_ns"] = point_.time_ns;
    job_.args["point"] = PointJson(point_);
    return steps_.Save();
  }

  Status OpenDisks() {
    steps_.Begin(
        fmt::format("Open the disks at {} on point {} (no copy)", item_.target, point_.id));
    OSR_ASSIGN_OR_RETURN(json fo,
                         v_.Client(dst_).Call("POST", "/groups/" + job_.vm + "/failover",
                                              json{{"seq", point_.seq}, {"epoch", epoch_}}));
    json_in::Fields ff(fo, "site " + dst_.name + " failover.");
    store_seq_ = ff.U64("store_durable_seq", 0);
    const json* disks = ff.Array("disks");
    if (!ff.ok()) return ff.status();
    disks_ = disks != nullptr ? *disks : json::array();
    steps_.Done(70);
    if (args_.planned) {
      // Drained: the old primary stops shipping now (fencing again at the same epoch).
      auto again =
          v_.Client(src_).Call("POST", "/groups/" + job_.vm + "/fence", json{{"epoch", epoch_}});
      LogIfFailed(again.status(), job_.vm + ": the fence that stops the drained source");
    }
    return Status::Ok();
  }

  // The VM's site and the item's state move together, in one transaction.
  Status Record() {
    vm_.site = item_.target;
    // The disks as they were at the point (a disk added or grown after it is not, or
    // smaller): what runs now, and what a reprotect replicates back.
    json at_point = json::array();
    for (const json& d : disks_) {
      json_in::Fields df(d, "site " + dst_.name + " failover.disks[].");
      std::string name = df.String("name");
      uint64_t size = df.U64("size_bytes", 0);
      if (df.ok() && size > 0) at_point.push_back({{"name", name}, {"size_bytes", size}});
    }
    if (!at_point.empty() && at_point.size() == disks_.size()) vm_.disks = at_point;
    item_.state = ItemState::kFailedOver;
    item_.epoch = epoch_;
    item_.failover = {{"epoch", epoch_},          {"from", item_.source},
                      {"planned", args_.planned}, {"point", PointJson(point_)},
                      {"store_seq", store_seq_},  {"time", FormatTimeNs(NowNs())}};
    Status st = v_.catalog_->Transact([&]() -> Status {
      OSR_RETURN_IF_ERROR(v_.catalog_->UpdateVm(vm_));
      return v_.catalog_->PutItem(item_);
    });
    if (!st.ok()) {
      return Status(st.code(), fmt::format("the disks are open at {}, but the catalog did not "
                                           "record the failover (run the failover again): {}",
                                           item_.target, st.message()));
    }
    job_.result = {{"point", PointJson(point_)}, {"epoch", epoch_}, {"disks", disks_}};
    return Status::Ok();
  }

  Status StartVm() {
    if (!args_.start || Driver(vm_) == "none") return Status::Ok();
    steps_.Begin(fmt::format("Start the VM at {}", item_.target));
    auto r = v_.Client(dst_).Call("POST", "/groups/" + job_.vm + "/vm/start", vm_.spec);
    if (!r.ok()) {
      return Status(r.status().code(),
                    "the VM failed over but did not start: " + r.status().message() +
                        " (osr vm start " + job_.vm + ")");
    }
    steps_.Done(95);
    return Status::Ok();
  }

  void PostHook() {
    if (Status h = v_.RunHook(vm_, "post_failover", {{"OSR_SITE", item_.target}}); !h.ok()) {
      steps_.Begin("Post-failover hook");
      steps_.Warn(100, h.message());
    }
  }

  // Records the item as leave_ and ends the job with `st` (and the recording's error).
  void Fail(const Status& st) {
    auto cur = v_.catalog_->FindItem(job_.vm);
    Status recorded = cur.status();
    if (cur.ok() && cur->has_value()) {
      (*cur)->state = leave_;
      recorded = v_.catalog_->PutItem(**cur);
    }
    steps_.Fail(
        AlsoFailed(st, "recording the item as " + std::string(ItemStateName(leave_)), recorded));
  }

  FailoverArgs args_;
  SiteRow src_, dst_;
  VmRow vm_;
  ItemState before_ = ItemState::kProtected;
  ItemState leave_ = ItemState::kProtected;  // what a failed step records the item as
  uint64_t epoch_ = 0;
  PointRow point_;
  std::optional<Vault::PointPin> pin_;
  json disks_ = json::array();
  uint64_t store_seq_ = 0;
};

void Vault::RunFailover(JobRow& job, ItemRow item, JobCancel& cancel) {
  FailoverRun(*this, job, std::move(item), cancel).Run();
}

void Vault::RunChangePoint(JobRow& job, ItemRow item, JobCancel& cancel) {
  Steps steps(catalog_.get(), &job, &cancel);
  auto dst_row = catalog_->FindSite(item.target);
  auto vm_row = catalog_->FindVm(job.vm);
  if (!dst_row.ok()) return steps.Fail(dst_row.status());
  if (!vm_row.ok()) return steps.Fail(vm_row.status());
  if (!*dst_row || !*vm_row) return steps.Fail(NotFound("the VM or its site is not registered"));
  const std::optional<SiteRow>& dst = *dst_row;
  const std::optional<VmRow>& vm = *vm_row;
  PointRow point;
  json_in::Fields args(job.args, "change-point job args.");
  if (args.Has("point_seq")) {
    point.seq = args.U64("point_seq");
    if (const json* resolved = args.Object("resolved")) {
      point.id = json_in::Fields(*resolved).I64("id", 0);
    }
    if (!args.ok()) return steps.Fail(args.status());
  } else {
    steps.Begin("Resolve the recovery point");
    auto p = ResolvePoint(item, args.String("point", ""), &cancel);
    if (!p.ok()) return steps.Fail(p.status());
    point = *p;
    job.args["point_seq"] = point.seq;
    job.args["resolved"] = PointJson(point);
    steps.Done(10);
  }
  uint64_t epoch = item.epoch;
  // Resumed after the new disks were opened: the VM may have run (and written) on them
  // since; they are kept — only what is left is done.
  bool opened = args.Bool("failover_done", false);
  bool start = args.Bool("start", true);
  if (!args.ok()) return steps.Fail(args.status());
  if (!opened && Driver(*vm) != "none") {
    steps.Begin(fmt::format("Stop the VM at {}", item.target));
    auto r = Client(*dst).Call("POST", "/groups/" + job.vm + "/vm/stop",
                               json{{"timeout_ms", ShutdownTimeoutMs(*vm)}});
    if (!r.ok() && r.status().code() != Code::kNotFound) return steps.Fail(r.status());
    steps.Done(20);
  }
  if (!opened) {
    steps.Begin("Discard the writes made since failover");
    auto d = Client(*dst).Call("DELETE", "/groups/" + job.vm);
    if (!d.ok() && d.status().code() != Code::kNotFound) return steps.Fail(d.status());
    steps.Done(40);
  }
  steps.Begin(fmt::format("Open the disks on point {} (no copy)", point.id));
  // (Done already when resumed: the site answers with the same disks.)
  auto fo = Client(*dst).Call("POST", "/groups/" + job.vm + "/failover",
                              json{{"seq", point.seq}, {"epoch", epoch}});
  if (!fo.ok()) return steps.Fail(fo.status());
  job.args["failover_done"] = true;
  if (Status saved = steps.Save(); !saved.ok()) return steps.Fail(saved);
  steps.Done(70);
  item.failover["point"] = job.args["resolved"];
  if (Status st = catalog_->PutItem(item); !st.ok()) {
    return steps.Fail(Status(st.code(), fmt::format("the disks are open on point {}, but the "
                                                    "item does not say so yet: {}",
                                                    point.id, st.message())));
  }
  const json* disks = json_in::Fields(*fo).Array("disks");
  job.result = {{"point", job.args["resolved"]}, {"disks", disks ? *disks : json::array()}};
  if (disks != nullptr) {
    // The disks as they were at this point (a disk changed between the points differs).
    if (Status st = RecordVmDisks(job.vm, *disks); !st.ok()) {
      return steps.Fail(Status(st.code(), fmt::format("the disks are open on point {}, but the "
                                                      "catalog does not list them: {}",
                                                      point.id, st.message())));
    }
  }
  if (Driver(*vm) != "none" && start) {
    steps.Begin(fmt::format("Start the VM at {}", item.target));
    auto r = Client(*dst).Call("POST", "/groups/" + job.vm + "/vm/start", vm->spec);
    if (!r.ok()) return steps.Fail(r.status());
    steps.Done(95);
  }
  job.progress = 100;
  job.state = JobState::kSucceeded;
}

void Vault::ReconcileFencing(const ItemRow& item, SiteStatusBoard& board) {
  if (item.failover.is_null()) return;
  json_in::Fields fo(item.failover, "item " + item.vm + " failover.");
  std::string from = fo.String("from", "");
  uint64_t epoch = fo.U64("epoch", item.epoch);
  if (!fo.ok()) {
    spdlog::warn("vault: cannot check the old primary's fence: {}", fo.status().ToString());
    return;
  }
  if (from.empty()) return;
  auto old = board.Site(from);
  if (!old) return;
  auto g = board.Group(*old, item.vm);
  if (!g.ok()) return;  // away, or its disks are a store already
  // The old primary's answer: read typed; a field of the wrong type is reported and the
  // fence is sent anyway (fencing twice is harmless, not fencing is not).
  std::string prefix = "site " + old->name + " group " + item.vm + ".";
  json_in::Fields gf(*g, prefix);
  uint64_t fenced_epoch = gf.U64("fenced_epoch", 0);
  const json* vm = gf.Object("vm");
  Status answer = gf.status();
  bool running = false;
  if (vm != nullptr) {
    json_in::Fields vf(*vm, prefix + "vm.");
    running = vf.Bool("running", false);
    if (answer.ok()) answer = vf.status();
  }
  if (!answer.ok()) {
    spdlog::warn("vault: {}: {}", item.vm, answer.ToString());
  } else if (fenced_epoch >= epoch && !running) {
    return;
  }
  spdlog::warn("vault: {}: site {} answers again with the VM's old disks: fencing them (epoch {})",
               item.vm, old->name, epoch);
  auto f = Client(*old).Call("POST", "/groups/" + item.vm + "/fence", json{{"epoch", epoch}});
  if (!f.ok()) spdlog::warn("vault: fence {} at {}: {}", item.vm, old->name, f.status().ToString());
  if (running) {
    auto s =
        Client(*old).Call("POST", "/groups/" + item.vm + "/vm/stop", json{{"timeout_ms", 10000}});
    if (!s.ok())
      spdlog::warn("vault: stop {} at {}: {}", item.vm, old->name, s.status().ToString());
  }
}

}  // namespace osr::vault
