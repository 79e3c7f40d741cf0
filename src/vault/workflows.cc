// What the vault's workflows share: hooks, waiting for a replica, a point at what the
// recovery store holds, and reading a VM's stored spec. The workflows themselves:
// enable_protection.cc, failover.cc, commit.cc, reprotect.cc; drills in jobs.cc.
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

JobRun::JobRun(Vault& v, JobRow& job, ItemRow item, JobCancel& cancel)
    : v_(v),
      job_(job),
      item_(std::move(item)),
      cancel_(cancel),
      steps_(v.catalog_.get(), &job, &cancel) {}

std::string DrillView(const ItemRow& item) {
  if (!item.drill.is_object()) return "";
  json_in::Fields f(item.drill);
  std::string view = f.String("view", "");
  return f.ok() ? view : "";
}

// The first point of a reprotected item could not be made: it is protected anyway.
Status FirstPointFailed(const Steps& steps, const Status& st) {
  if (st.code() != Code::kCancelled) return st;
  return steps.Cancelled("the item is protected (reversed); points come by themselves");
}

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

Result<SiteRow> Vault::RegisteredSite(const std::string& name) {
  OSR_ASSIGN_OR_RETURN(std::optional<SiteRow> site, catalog_->FindSite(name));
  if (!site) return NotFound("site " + name + " is not registered");
  return *site;
}

Result<PointRow> Vault::PointAtStore(const ItemRow& item) {
  OSR_ASSIGN_OR_RETURN(SiteRow dst, RegisteredSite(item.target));
  OSR_ASSIGN_OR_RETURN(json st, Client(dst).Call("GET", "/stores/" + item.vm));
  json_in::Fields sf(st, "site " + item.target + " store " + item.vm + ".");
  uint64_t durable = sf.U64("durable_seq", 0);
  int64_t t = sf.I64("durable_time_ns", 0);
  if (!sf.ok()) return sf.status();
  OSR_ASSIGN_OR_RETURN(std::optional<PointRow> newest, catalog_->FindLatestPoint(item.vm));
  if (!StoreConsistentAt(st, durable)) {
    // The newest consistent state there is the last point.
    if (!newest) return Unavailable("the recovery site holds no consistent state yet");
    return *newest;
  }
  if (newest && newest->seq == durable) return *newest;
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

}  // namespace osr::vault
