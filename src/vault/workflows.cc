// Failover, change recovery point, commit and reprotect: the vault's side (the order of
// the steps and what each site is asked). docs/architecture.md, "Failover and reprotect",
// explains why the order is what it is.
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
#include "vault/job_steps.h"
#include "vault/vault.h"

namespace osr::vault {

using nlohmann::json;

namespace {

json PointJsonOf(const PointRow& p) {
  return json{{"id", p.id}, {"time", FormatTimeNs(p.time_ns)}, {"seq", p.seq}, {"type", p.type}};
}

// The stored spec, read back through the one checked parser (a row is a peer's input).
Result<hypervisor::VmSpec> StoredSpec(const VmRow& vm) {
  return hypervisor::ParseVmSpec(vm.spec, hypervisor::SpecSource::kStored);
}

// "none", "process" or "qemu"; "invalid" for a spec that does not parse: the site is then
// asked to start it and refuses it with a message naming the field.
std::string Driver(const VmRow& vm) {
  auto spec = StoredSpec(vm);
  return spec.ok() ? std::string(hypervisor::DriverName(spec->driver)) : "invalid";
}

int ShutdownTimeoutMs(const VmRow& vm) {
  auto spec = StoredSpec(vm);
  return spec.ok() ? static_cast<int>(spec->shutdown_timeout_ms) : 30000;
}

// The first point of a reprotected item could not be made: it is protected anyway.
Status FirstPointFailed(const Steps& steps, const Status& st) {
  if (st.code() != Code::kCancelled) return st;
  return steps.Cancelled("the item is protected (reversed); points come by themselves");
}

}  // namespace

Status Vault::RunHook(const VmRow& vm, const std::string& name, const json& env) {
  auto spec = StoredSpec(vm);
  if (!spec.ok()) {
    return Status(spec.status().code(),
                  fmt::format("the stored spec of VM {}: {}", vm.name, spec.status().message()));
  }
  OSR_ASSIGN_OR_RETURN(std::string command, HookCommand(cfg_.hooks, *spec, name));
  if (command.empty()) return Status::Ok();
  std::vector<std::string> env_strings = {"OSR_VM=" + vm.name, "OSR_HOOK=" + name};
  json_in::Fields f(env);
  for (auto& [k, v] : env.items()) env_strings.push_back(k + "=" + f.String(k, ""));
  OSR_RETURN_IF_ERROR(f.status());
  return RunHookCommand(vm.name, name, command, env_strings, spec->hook_timeout_ms);
}

Result<PointRow> Vault::PointAtStore(const ItemRow& item) {
  auto dst = catalog_->Site(item.target);
  if (!dst) return NotFound("site " + item.target + " is not registered");
  OSR_ASSIGN_OR_RETURN(json st, Client(*dst).Call("GET", "/stores/" + item.vm));
  uint64_t durable = st.value("durable_seq", uint64_t{0});
  if (!StoreConsistentAt(st, durable)) {
    // The newest consistent state there is the last point.
    auto points = catalog_->Points(item.vm);
    if (points.empty()) return Unavailable("the recovery site holds no consistent state yet");
    return points.back();
  }
  auto points = catalog_->Points(item.vm);
  if (!points.empty() && points.back().seq == durable) return points.back();
  int64_t t = st.value("durable_time_ns", int64_t{0});
  PointRow p{0, item.vm, durable, t ? t : NowNs(), "crash"};
  OSR_ASSIGN_OR_RETURN(p.id, catalog_->AddPoint(p));
  return p;
}

ReplicaProgress DescribeReplicaProgress(const std::string& src_name, const Result<json>& src_group,
                                        const std::string& dst_name, const Result<json>& dst_store,
                                        uint64_t want) {
  // A call that failed has no numbers: say whom the job waits for, and why.
  if (!src_group.ok())
    return {fmt::format("waiting for {}: {}", src_name, src_group.status().message()), -1};
  if (!dst_store.ok())
    return {fmt::format("waiting for {}: {}", dst_name, dst_store.status().message()), -1};
  json_in::Fields sf(dst_store.value(), "site " + dst_name + " store.");
  uint64_t durable = sf.U64("durable_seq", 0);
  json_in::Fields gf(src_group.value(), "site " + src_name + " group.");
  const json* repl = gf.Object("replication");
  json empty = json::object();
  json_in::Fields rf(repl ? *repl : empty, "site " + src_name + " replication.");
  uint64_t total = rf.U64("resync_bytes_total", 0);
  uint64_t done = rf.U64("resync_bytes_done", 0);
  std::string last_error = rf.String("last_error", "");
  bool connected = rf.Bool("connected", false);
  for (const json_in::Fields* f : {&sf, &gf, &rf}) {
    if (!f->ok()) return {fmt::format("waiting: {}", f->status().message()), -1};
  }
  if (total > 0) {
    done = std::min(done, total);
    return {fmt::format("{} of {} bytes copied", done, total),
            static_cast<int>(100 * done / total)};
  }
  if (!connected && !last_error.empty()) {
    return {fmt::format("waiting for replication to {}: {}", dst_name, last_error), -1};
  }
  if (want == 0 || durable >= want) {
    // Every write is there, but not yet consistent: the copy of whole regions is to come.
    return {fmt::format("waiting for the copy of what differs to start ({} has seq {})", dst_name,
                        durable),
            -1};
  }
  return {fmt::format("{} of {} writes replicated", durable, want),
          static_cast<int>(100 * durable / want)};
}

std::string DescribeReplicaDone(const Result<json>& src_group, uint64_t want, uint64_t durable) {
  uint64_t total = 0;
  if (src_group.ok()) {
    json_in::Fields gf(src_group.value());
    const json* repl = gf.Object("replication");
    if (repl != nullptr) total = json_in::Fields(*repl).U64("resync_bytes_total", 0);
  }
  if (total > 0) return fmt::format("{} of {} bytes copied", total, total);
  if (want > 0) return fmt::format("{} of {} writes replicated", want, want);
  return fmt::format("the replica is consistent at seq {}", durable);
}

Status Vault::WaitForReplica(const std::string& vm, const SiteRow& src, const SiteRow& dst,
                             Steps& steps, int p0, int p1) {
  auto g = Client(src).Call("GET", "/groups/" + vm);
  if (!g.ok()) return g.status();
  json_in::Fields gf(*g, "site " + src.name + " group " + vm + ".");
  uint64_t want = gf.U64("last_seq", 0);
  if (!gf.ok()) return gf.status();
  // No deadline while it moves: a big copy takes its time. It fails when nothing moved
  // for job_wait_ms_max.
  auto stalled_since = std::chrono::steady_clock::now();
  uint64_t last_progress = UINT64_MAX;
  int percent = p0;
  for (;;) {
    OSR_RETURN_IF_ERROR(steps.Check());
    auto st = Client(dst).Call("GET", "/stores/" + vm);
    uint64_t durable = st.ok() ? json_in::Fields(*st).U64("durable_seq", 0) : 0;
    if (st.ok() && durable >= want && StoreConsistentAt(*st, durable)) {
      steps.Progress(p1,
                     DescribeReplicaDone(Client(src).Call("GET", "/groups/" + vm), want, durable));
      return Status::Ok();
    }
    auto gs = Client(src).Call("GET", "/groups/" + vm);
    ReplicaProgress shown = DescribeReplicaProgress(src.name, gs, dst.name, st, want);
    uint64_t done = 0;
    if (gs.ok()) {
      const json* repl = json_in::Fields(*gs).Object("replication");
      if (repl != nullptr) done = json_in::Fields(*repl).U64("resync_bytes_done", 0);
    }
    uint64_t progress = done + durable;
    if (progress != last_progress) {
      last_progress = progress;
      stalled_since = std::chrono::steady_clock::now();
    } else if (std::chrono::steady_clock::now() - stalled_since >
               std::chrono::milliseconds(cfg_.job_wait_ms_max)) {
      return Unavailable(
          fmt::format("replication to {} made no progress for {} s (seq {} of {}; {})", dst.name,
                      cfg_.job_wait_ms_max / 1000, durable, want, shown.text));
    }
    if (shown.percent >= 0) percent = p0 + (p1 - p0) * shown.percent / 100;
    steps.Progress(percent, shown.text);
    OSR_RETURN_IF_ERROR(steps.Sleep(std::chrono::milliseconds(100)));
  }
}

// ---- failover -----------------------------------------------------------------------

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
  std::string before = job.args.value("state_before", item.state);
  job.args["state_before"] = before;
  auto fail = [&](const Status& st, const std::string& item_state) {
    auto cur = catalog_->FindItem(job.vm);
    Status recorded = cur.status();
    if (cur.ok() && cur->has_value()) {
      (*cur)->state = item_state;
      recorded = catalog_->PutItem(**cur);
    }
    steps.Fail(AlsoFailed(st, "recording the item as " + item_state, recorded));
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
    job.args["epoch"] = item.state == "FailoverFailed" ? item.epoch : item.epoch + 1;
    if (Status saved = steps.Save(); !saved.ok()) return fail(saved, before);
  }
  uint64_t epoch = job.args["epoch"].get<uint64_t>();
  auto mark_failing = [&] {
    item.state = "FailingOver";
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
    if (Status marked = mark_failing(); !marked.ok()) return fail(marked, "FailoverFailed");
    auto p = PointAtLatest(item, "crash", cfg_.job_wait_ms_max, 0, &cancel);
    if (!p.ok() && p.status().code() == Code::kCancelled) {
      return fail(steps.Cancelled(fmt::format(
                      "{} is fenced at epoch {} (its disks refuse writes) and nothing was opened "
                      "at {}; the item is FailoverFailed: run the failover again to finish it "
                      "(osr failover {})",
                      item.source, epoch, item.target, job.vm)),
                  "FailoverFailed");
    }
    if (!p.ok()) return fail(p.status(), "FailoverFailed");
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
      return fail(steps.Cancelled("nothing was changed: the item is " + before + " again"), before);
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
  job.args["point"] = PointJsonOf(point);
  if (Status saved = steps.Save(); !saved.ok()) return fail(saved, "FailoverFailed");

  steps.Begin(fmt::format("Open the disks at {} on point {} (no copy)", item.target, point.id));
  auto fo = Client(*dst).Call("POST", "/groups/" + job.vm + "/failover",
                              json{{"seq", point.seq}, {"epoch", epoch}});
  if (!fo.ok()) return fail(fo.status(), "FailoverFailed");
  steps.Done(70);
  if (planned) {
    // Drained: the old primary stops shipping now (fencing again at the same epoch).
    (void)Client(*src).Call("POST", "/groups/" + job.vm + "/fence", json{{"epoch", epoch}});
  }
  vm->site = item.target;
  item.state = "FailedOver";
  item.epoch = epoch;
  item.failover = {{"epoch", epoch},
                   {"from", item.source},
                   {"planned", planned},
                   {"point", PointJsonOf(point)},
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
                "FailoverFailed");
  }
  job.result = {{"point", PointJsonOf(point)}, {"epoch", epoch}, {"disks", (*fo)["disks"]}};
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

// ---- change recovery point -----------------------------------------------------------

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
    job.args["resolved"] = PointJsonOf(point);
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

// ---- commit -------------------------------------------------------------------------

void Vault::RunCommit(JobRow& job, ItemRow item, JobCancel& cancel) {
  Steps steps(catalog_.get(), &job, &cancel);
  auto dst = catalog_->Site(item.target);
  if (!dst) return steps.Fail(NotFound("site " + item.target + " is not registered"));
  item.state = "Committing";
  if (Status st = catalog_->PutItem(item); !st.ok()) return steps.Fail(st);  // nothing done yet
  auto back = [&](const Status& st) {
    item.state = "FailedOver";  // commit again to go on from where it stopped
    steps.Fail(AlsoFailed(st, "recording the item as FailedOver", catalog_->PutItem(item)));
  };
  steps.Begin(
      fmt::format("Copy the rest of the point into the disks at {} (the VM runs on)", item.target));
  auto m = Client(*dst).Call("POST", "/groups/" + job.vm + "/materialise");
  if (!m.ok()) return back(m.status());
  auto stalled_since = std::chrono::steady_clock::now();
  uint64_t last_done = UINT64_MAX;
  for (;;) {
    if (Status c = steps.Check(); !c.ok()) {
      return back(c.code() == Code::kCancelled
                      ? steps.Cancelled(fmt::format(
                            "the VM runs on at {} on its point and {} may finish the copy by "
                            "itself; the item is FailedOver again: commit again to go on (it "
                            "resumes), or change the point",
                            item.target, item.target))
                      : c);
    }
    auto g = Client(*dst).Call("GET", "/groups/" + job.vm);
    if (!g.ok() && g.status().code() == Code::kUnavailable) {
      // The site is away for a moment (a restart): wait for it, as long as any stall.
      steps.Progress(job.progress,
                     fmt::format("waiting for {}: {}", item.target, g.status().message()));
      if (std::chrono::steady_clock::now() - stalled_since >
          std::chrono::milliseconds(cfg_.job_wait_ms_max)) {
        return back(g.status());
      }
      (void)steps.Sleep(std::chrono::milliseconds(500));
      continue;
    }
    if (!g.ok()) return back(g.status());
    json_in::Fields gf(*g, "site " + item.target + " group " + job.vm + ".");
    const json* mat = gf.Object("materialise");
    json none = json::object();
    json_in::Fields mf(mat != nullptr ? *mat : none,
                       "site " + item.target + " group " + job.vm + ".materialise.");
    std::string state = mf.String("state", "");
    uint64_t done = mf.U64("done_bytes", 0);
    uint64_t total = mf.U64("total_bytes", 0);
    std::string error = mf.String("error", "");
    if (!gf.ok() || !mf.ok()) return back(!gf.ok() ? gf.status() : mf.status());
    if (state == "done") {
      // The numbers of the answer that says it is done: the last ones (not those of the
      // poll before, which may be far behind).
      steps.Progress(80, total > 0 ? fmt::format("{} of {} bytes", done, total)
                                   : std::string("nothing left to copy"));
      break;
    }
    if (state == "failed") {
      return back(Internal("materialising failed: " + error));
    }
    if (state.empty()) {  // the site restarted: start it again (it resumes)
      m = Client(*dst).Call("POST", "/groups/" + job.vm + "/materialise");
      if (!m.ok()) return back(m.status());
    }
    if (done != last_done) {
      last_done = done;
      stalled_since = std::chrono::steady_clock::now();
    } else if (std::chrono::steady_clock::now() - stalled_since >
               std::chrono::milliseconds(cfg_.job_wait_ms_max)) {
      return back(Unavailable("materialising made no progress"));
    }
    if (total > 0) {
      steps.Progress(static_cast<int>(80 * done / total),
                     fmt::format("{} of {} bytes", done, total));
    }
    (void)steps.Sleep(std::chrono::milliseconds(100));  // a stop is seen at the loop's top
  }
  steps.Done(80);
  steps.Begin("Delete the recovery points and the recovery store");
  auto d = Client(*dst).Call("DELETE", "/stores/" + job.vm);
  if (!d.ok() && d.status().code() != Code::kNotFound) return back(d.status());
  if (Status st = catalog_->DeletePoints(job.vm); !st.ok()) {
    // The store is gone; the points would name data that is not there. Commit again
    // deletes them (the store's DELETE then answers 404, which is taken as done).
    return back(Status(st.code(),
                       "the recovery store is deleted, but its points stay in the "
                       "catalog (commit again to delete them): " +
                           st.message()));
  }
  steps.Done(100);
  item.state = "FailoverCommitted";
  if (Status st = catalog_->PutItem(item); !st.ok()) {
    return steps.Fail(Status(st.code(),
                             "committed, but the item's state could not be recorded "
                             "(commit again to record it): " +
                                 st.message()));
  }
  job.state = JobState::kSucceeded;
}

// ---- reprotect ----------------------------------------------------------------------

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
    item.state = "FailoverCommitted";  // reprotect again: it goes on from where it stopped
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
  item.state = "Reprotecting";
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
  item.state = "Protected";
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

// ---- fencing a returning old primary --------------------------------------------------

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
