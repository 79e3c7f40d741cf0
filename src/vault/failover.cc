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

void Vault::RunFailover(JobRow& job, ItemRow item, JobCancel& cancel) {
  Steps steps(catalog_.get(), &job, &cancel);
  auto src = catalog_->Site(item.source);
  auto dst = catalog_->Site(item.target);
  auto vm = catalog_->Vm(job.vm);
  if (!src || !dst || !vm) return steps.Fail(NotFound("the VM or a site of it is not registered"));
  bool planned = job.args.value("planned", false);
  bool shutdown = planned || job.args.value("shutdown_source", false);
  bool start = job.args.value("start", true);
  // What the item goes back to when the job fails before the source was fenced.
  // (Its name in the args; a name this vault does not know reads as the state now.)
  std::optional<ItemState> saved_before =
      ItemStateFromName(json_in::Fields(job.args).String("state_before", ""));
  ItemState before = saved_before.value_or(item.state);
  job.args["state_before"] = ItemStateName(before);
  auto fail = [&](const Status& st, ItemState item_state) {
    auto cur = catalog_->FindItem(job.vm);
    Status recorded = cur.status();
    if (cur.ok() && cur->has_value()) {
      (*cur)->state = item_state;
      recorded = catalog_->PutItem(**cur);
    }
    steps.Fail(AlsoFailed(st, "recording the item as " + std::string(ItemStateName(item_state)),
                          recorded));
  };

  if (planned && !job.args.contains("epoch")) {
    steps.Begin(fmt::format("Check that {} answers (a planned failover needs it)", item.source));
    auto g = Client(*src).Call("GET", "/groups/" + job.vm);
    if (!g.ok()) {
      return fail(Unavailable(fmt::format("a planned failover needs the source site: {}; nothing "
                                          "was changed (an unplanned failover does not need it)",
                                          g.status().message())),
                  before);
    }
    steps.Done(5);
  }
  if (!job.args.value("pre_hook_done", false)) {
    if (Status h = RunHook(*vm, "pre_failover", {{"OSR_SITE", item.target}}); !h.ok()) {
      steps.Begin("Pre-failover hook");
      return fail(h, before);
    }
    job.args["pre_hook_done"] = true;
    if (Status saved = steps.Save(); !saved.ok()) return fail(saved, before);
  }
  if (shutdown && !job.args.value("shutdown_done", false)) {
    steps.Begin(fmt::format("Shut down the VM at {}", item.source));
    if (Driver(*vm) == "none") {
      steps.Progress(10, "the VM has no driver: nothing to shut down");
      steps.Done(10);
    } else {
      auto r = Client(*src).Call("POST", "/groups/" + job.vm + "/vm/stop",
                                 json{{"timeout_ms", ShutdownTimeoutMs(*vm)}});
      if (!r.ok()) {
        steps.Warn(10, "could not shut it down (" + r.status().message() +
                           "); the failover goes on and fencing stops its writes");
      } else {
        steps.Progress(10, (*r).value("clean", true) ? "it shut down"
                                                     : "it did not shut down in time: stopped");
        steps.Done(10);
      }
    }
    job.args["shutdown_done"] = true;
    if (Status saved = steps.Save(); !saved.ok()) return fail(saved, before);
  }
  // The new epoch: decided once, kept in the job (a resumed job uses the same).
  if (!job.args.contains("epoch")) {
    job.args["epoch"] = item.state == ItemState::kFailoverFailed ? item.epoch : item.epoch + 1;
    if (Status saved = steps.Save(); !saved.ok()) return fail(saved, before);
  }
  uint64_t epoch = job.args["epoch"].get<uint64_t>();
  auto mark_failing = [&] {
    item.state = ItemState::kFailingOver;
    item.epoch = epoch;
    item.failover = {{"epoch", epoch}, {"from", item.source}, {"planned", planned}};
    return catalog_->PutItem(item);
  };

  PointRow point;
  // Retention keeps the chosen point while the job runs (and the item's failover names
  // it after that).
  std::optional<PointPin> pin;
  if (job.args.contains("point_seq")) {
    point.id = job.args["point"].value("id", int64_t{0});
    point.seq = job.args["point_seq"].get<uint64_t>();
    point.time_ns = job.args.value("point_time_ns", int64_t{0});
    point.type = job.args["point"].value("type", std::string("crash"));
  } else if (planned) {
    steps.Begin(fmt::format("Fence {} and send it all to {}", item.source, item.target));
    auto f = Client(*src).Call("POST", "/groups/" + job.vm + "/fence",
                               json{{"epoch", epoch}, {"keep_shipping", true}});
    if (!f.ok()) return fail(f.status(), before);
    // Fenced already: a failed record leaves the item FailoverFailed (run it again).
    if (Status marked = mark_failing(); !marked.ok())
      return fail(marked, ItemState::kFailoverFailed);
    auto p = PointAtLatest(item, "crash", cfg_.job_wait_ms_max, 0, &cancel);
    if (!p.ok() && p.status().code() == Code::kCancelled) {
      return fail(steps.Cancelled(fmt::format(
                      "{} is fenced at epoch {} (its disks refuse writes) and nothing was opened "
                      "at {}; the item is FailoverFailed: run the failover again to finish it "
                      "(osr failover {})",
                      item.source, epoch, item.target, job.vm)),
                  ItemState::kFailoverFailed);
    }
    if (!p.ok()) return fail(p.status(), ItemState::kFailoverFailed);
    point = *p;
    steps.Progress(40, fmt::format("everything is at {}: point {} (seq {})", item.target, point.id,
                                   point.seq));
    steps.Done(40);
  } else {
    steps.Begin("Resolve the recovery point");
    std::string spec = job.args.value("point", std::string("latest"));
    // "latest": everything still pending is processed first, if the source answers.
    Result<PointRow> p =
        spec == "latest"
            ? PointAtLatest(item, "crash", std::min(cfg_.job_wait_ms_max, 30000), 0, &cancel)
            : ResolvePoint(item, spec, &cancel);
    if (!p.ok() && p.status().code() == Code::kCancelled) {
      return fail(steps.Cancelled("nothing was changed: the item is " +
                                  std::string(ItemStateName(before)) + " again"),
                  before);
    }
    if (!p.ok() && spec == "latest") {
      steps.Progress(20, "the source cannot send what is pending (" + p.status().message() +
                             "): the latest is what the recovery site holds");
      p = PointAtStore(item);
    }
    if (!p.ok()) return fail(p.status(), before);
    point = *p;
    if (Status pinned = PinPoint(job.vm, point.id, "failover", pin); !pinned.ok()) {
      return fail(pinned, before);
    }
    steps.Progress(30, fmt::format("point {} (seq {}, {}, {})", point.id, point.seq, point.type,
                                   FormatTimeNs(point.time_ns)));
    steps.Done(30);
    steps.Begin(fmt::format("Fence {} (epoch {})", item.source, epoch));
    // Before the fence: the item says FailingOver before anything refuses writes.
    if (Status marked = mark_failing(); !marked.ok()) return fail(marked, before);
    auto f = Client(*src).Call("POST", "/groups/" + job.vm + "/fence", json{{"epoch", epoch}});
    if (!f.ok()) {
      steps.Warn(40, f.status().message() +
                         "; it will be fenced when it answers, and the recovery site refuses "
                         "its records from now on");
    } else {
      steps.Done(40);
    }
  }
  job.args["point_seq"] = point.seq;
  job.args["point_time_ns"] = point.time_ns;
  job.args["point"] = PointJson(point);
  if (Status saved = steps.Save(); !saved.ok()) return fail(saved, ItemState::kFailoverFailed);

  steps.Begin(fmt::format("Open the disks at {} on point {} (no copy)", item.target, point.id));
  auto fo = Client(*dst).Call("POST", "/groups/" + job.vm + "/failover",
                              json{{"seq", point.seq}, {"epoch", epoch}});
  if (!fo.ok()) return fail(fo.status(), ItemState::kFailoverFailed);
  steps.Done(70);
  if (planned) {
    // Drained: the old primary stops shipping now (fencing again at the same epoch).
    (void)Client(*src).Call("POST", "/groups/" + job.vm + "/fence", json{{"epoch", epoch}});
  }
  vm->site = item.target;
  item.state = ItemState::kFailedOver;
  item.epoch = epoch;
  item.failover = {{"epoch", epoch},
                   {"from", item.source},
                   {"planned", planned},
                   {"point", PointJson(point)},
                   {"store_seq", (*fo).value("store_durable_seq", uint64_t{0})},
                   {"time", FormatTimeNs(NowNs())}};
  // The VM's site and the item's state move together.
  if (Status st = catalog_->Transact([&]() -> Status {
        OSR_RETURN_IF_ERROR(catalog_->UpdateVm(*vm));
        return catalog_->PutItem(item);
      });
      !st.ok()) {
    return fail(Status(st.code(), fmt::format("the disks are open at {}, but the catalog did not "
                                              "record the failover (run the failover again): {}",
                                              item.target, st.message())),
                ItemState::kFailoverFailed);
  }
  job.result = {{"point", PointJson(point)}, {"epoch", epoch}, {"disks", (*fo)["disks"]}};
  if (start && Driver(*vm) != "none") {
    steps.Begin(fmt::format("Start the VM at {}", item.target));
    auto r = Client(*dst).Call("POST", "/groups/" + job.vm + "/vm/start", vm->spec);
    if (!r.ok()) {
      return steps.Fail(Status(r.status().code(),
                               "the VM failed over but did not start: " + r.status().message() +
                                   " (osr vm start " + job.vm + ")"));
    }
    steps.Done(95);
  }
  if (Status h = RunHook(*vm, "post_failover", {{"OSR_SITE", item.target}}); !h.ok()) {
    steps.Begin("Post-failover hook");
    steps.Warn(100, h.message());
  }
  job.progress = 100;
  job.state = JobState::kSucceeded;
}

void Vault::RunChangePoint(JobRow& job, ItemRow item, JobCancel& cancel) {
  Steps steps(catalog_.get(), &job, &cancel);
  auto dst = catalog_->Site(item.target);
  auto vm = catalog_->Vm(job.vm);
  if (!dst || !vm) return steps.Fail(NotFound("the VM or its site is not registered"));
  PointRow point;
  if (job.args.contains("point_seq")) {
    point.seq = job.args["point_seq"].get<uint64_t>();
    point.id = job.args["resolved"].value("id", int64_t{0});
  } else {
    steps.Begin("Resolve the recovery point");
    auto p = ResolvePoint(item, job.args.value("point", std::string()), &cancel);
    if (!p.ok()) return steps.Fail(p.status());
    point = *p;
    job.args["point_seq"] = point.seq;
    job.args["resolved"] = PointJson(point);
    steps.Done(10);
  }
  uint64_t epoch = item.epoch;
  // Resumed after the new disks were opened: the VM may have run (and written) on them
  // since; they are kept — only what is left is done.
  bool opened = job.args.value("failover_done", false);
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
  job.result = {{"point", job.args["resolved"]}, {"disks", (*fo)["disks"]}};
  if (Driver(*vm) != "none" && job.args.value("start", true)) {
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
