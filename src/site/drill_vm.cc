// Drill VMs: a test failover's VM, on a writable view's disks, in the drill networks
// (networks.h), with a boot check (vm_runner.h); and the consoles of every VM of the site.
#include <fmt/format.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>

#include <filesystem>

#include "common/file.h"
#include "common/json_in.h"
#include "site/site.h"

namespace osr::site {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// The console log in run folder `run_dir` of a VM last started with `spec` (normal form,
// hypervisor::VmSpecJson; null before a start): a process VM's output, else the serial port.
std::string ConsoleLogPath(const std::string& run_dir, const json& spec) {
  auto driver = spec.is_object() ? spec.find("driver") : spec.end();
  bool process = driver != spec.end() && *driver == "process";
  return run_dir + "/" + (process ? "vm.log" : "console.log");
}

// {offset, next, size, text} of the file at `path`.
Result<json> ReadConsoleBytes(const std::string& path, std::optional<uint64_t> offset,
                              size_t max_bytes) {
  max_bytes = std::min(max_bytes, VmRunner::kConsoleTailBytesMax);
  auto f = File::Open(path, File::Mode::kReadOnly);
  if (!f.ok()) {
    if (f.status().code() == Code::kNotFound) {
      return json{{"offset", 0}, {"next", 0}, {"size", 0}, {"text", ""}};
    }
    return f.status();
  }
  OSR_ASSIGN_OR_RETURN(uint64_t size, f->Size());
  uint64_t from = offset ? std::min(*offset, size) : (size > max_bytes ? size - max_bytes : 0);
  // A console log moved aside (console.log.1) starts again at 0: an offset past its end
  // reads from its start.
  if (offset && *offset > size) from = 0;
  std::string text(static_cast<size_t>(std::min<uint64_t>(max_bytes, size - from)), '\0');
  OSR_ASSIGN_OR_RETURN(size_t n,
                       f->PReadSome(from, {reinterpret_cast<uint8_t*>(text.data()), text.size()}));
  text.resize(n);
  // A serial console ends its lines with CR LF: the CR goes; other control bytes and
  // bytes past ASCII read as '?'.
  std::erase(text, '\r');
  for (auto& c : text) {
    auto u = static_cast<unsigned char>(c);
    if (u != '\n' && u != '\t' && (u < 0x20 || u >= 0x7f)) c = '?';
  }
  return json{{"offset", from}, {"next", from + n}, {"size", size}, {"text", text}};
}

// {offset, next, size, text, cuts, cut_size} of the console log at `path` that `runner`
// keeps bounded (see Site::GroupConsole).
Result<json> ReadConsoleFile(const std::string& path, const VmRunner& runner,
                             std::optional<uint64_t> offset, size_t max_bytes) {
  // The count after the bytes: BoundConsole counts a cut before it cuts, so bytes of a cut
  // log never come with the count from before the cut (the follower would take them for
  // the old log's).
  OSR_ASSIGN_OR_RETURN(json out, ReadConsoleBytes(path, offset, max_bytes));
  const VmRunner::ConsoleCuts cuts = runner.console_cuts();
  out["cuts"] = cuts.count;
  out["cut_size"] = cuts.last_size;
  return out;
}

}  // namespace

std::string Site::DrillRunDir(const std::string& id) const {
  return cfg_.data_dir + "/drills/" + id;
}

json Site::DrillVmJson(VmRunner& runner, const json& spec) {
  VmRunner::Snapshot s = runner.Refresh();
  return {
      {"state", VmRunner::StateName(s.state)},
      {"running", s.running()},
      {"pid", s.pid},
      {"driver", spec.is_object() ? spec.value("driver", "none") : "none"},
      {"boot", {{"state", BootStateName(s.boot)}, {"reason", s.boot_reason}, {"ms", s.boot_ms}}}};
}

std::string Site::OpenDrillSocketLocked(const std::string& id) {
  std::string run = DrillRunDir(id);
  std::error_code ec;
  fs::create_directories(run, ec);
  if (ec || ::chmod(run.c_str(), 0700) != 0 ||
      ::chmod(fs::path(run).parent_path().c_str(), 0700) != 0) {
    spdlog::warn("site {}: drill {}: cannot make {} private: no local NBD socket", cfg_.name, id,
                 run);
    return "";
  }
  nbd::ListenerOptions o;
  o.local_vm = DrillPrincipal(id);
  ListenAddress a;
  a.kind = ListenAddress::Kind::kUnix;
  a.path = run + "/nbd.sock";
  if (auto bound = nbd_->AddListener(a, o); !bound.ok()) {
    spdlog::warn("site {}: drill {}: no local NBD socket: {}", cfg_.name, id,
                 bound.status().ToString());
    return "";
  }
  return a.path;
}

Result<VmLaunch> Site::DrillLaunchLocked(const std::string& id, View& v,
                                         const hypervisor::VmSpec& spec, std::string command) {
  VmLaunch launch;
  launch.name = v.vm + "-drill";
  launch.spec = spec;
  launch.command = std::move(command);
  launch.run_dir = DrillRunDir(id);
  launch.qemu_binary = cfg_.qemu_binary;
  OSR_ASSIGN_OR_RETURN(launch.network, PlanNetworks(spec.nics, cfg_.networks, NetRole::kDrill,
                                                    cfg_.name, v.vm + "/" + id));
  if (v.nbd_socket.empty()) v.nbd_socket = OpenDrillSocketLocked(id);
  auto st = stores_.find(v.vm);
  for (size_t i = 0; i < v.exports.size(); ++i) {
    std::string disk = st != stores_.end() && i < st->second->disks().size()
                           ? st->second->disks()[i].name
                           : std::to_string(i);
    std::string uri = v.nbd_socket.empty()
                          ? Uri(v.exports[i])
                          : fmt::format("nbd+unix:///{}?socket={}", v.exports[i], v.nbd_socket);
    launch.disks.emplace_back(disk, uri);
  }
  return launch;
}

Status Site::StartViewVm(const std::string& id, const json& spec_json) {
  OSR_ASSIGN_OR_RETURN(auto checked, CheckedVmSpec("drill " + id, spec_json));
  const auto& [spec, what] = checked;
  std::shared_ptr<VmRunner> runner;
  VmLaunch launch;
  {
    std::lock_guard lock(mu_);
    auto it = views_.find(id);
    if (it == views_.end()) return NotFound("no view " + id);
    View& v = it->second;
    if (!v.lost.empty())
      return Status(Code::kFailedPrecondition, "view " + id + " is lost: " + v.lost);
    if (!v.writable) {
      return InvalidArgument("view " + id + " is read-only: a drill VM needs writable disks");
    }
    OSR_ASSIGN_OR_RETURN(launch, DrillLaunchLocked(id, v, spec, what));
    runner = v.runner;
  }
  if (Status started = runner->Start(launch); !started.ok()) {
    // Refused or failed: what the launch opened for it (its socket, its folder) goes too.
    std::lock_guard lock(mu_);
    auto it = views_.find(id);
    if (it != views_.end() && it->second.runner == runner && !runner->snapshot().running()) {
      if (!it->second.nbd_socket.empty()) (void)nbd_->RemoveUnixListener(it->second.nbd_socket);
      it->second.nbd_socket.clear();
      std::error_code ec;
      fs::remove_all(DrillRunDir(id), ec);
    }
    return started;
  }
  // The boot check starts outside mu_ (it waits for a check under way to end).
  if (spec.driver == hypervisor::Driver::kQemu &&
      (!spec.boot_check.console_line.empty() || spec.guest_agent)) {
    runner->CheckBoot(spec.boot_check);
  }
  std::lock_guard lock(mu_);
  auto it = views_.find(id);
  if (it == views_.end() || it->second.runner != runner) {
    (void)runner->Stop(kVmStopTimeoutMs);
    return NotFound("view " + id + " was closed while its VM started");
  }
  it->second.vm_spec = hypervisor::VmSpecJson(spec);
  std::string nets;
  for (auto& n : launch.network.nics)
    nets += (nets.empty() ? "" : ", ") + n.network + ": " + n.attach;
  spdlog::info("site {}: drill VM of {} runs on view {} (pid {}; networks: {})", cfg_.name,
               it->second.vm, id, runner->snapshot().pid, nets.empty() ? "none" : nets);
  return SaveLocked();
}

Result<bool> Site::StopViewVm(const std::string& id, int timeout_ms) {
  std::shared_ptr<VmRunner> runner;
  {
    std::lock_guard lock(mu_);
    auto it = views_.find(id);
    if (it == views_.end()) return NotFound("no view " + id);
    runner = it->second.runner;
  }
  bool was_running = runner->snapshot().running();
  OSR_ASSIGN_OR_RETURN(bool clean, runner->Stop(timeout_ms));
  if (!was_running) return clean;
  spdlog::info("site {}: drill VM on view {} stopped{}", cfg_.name, id,
               clean ? "" : " (hard stop)");
  std::lock_guard lock(mu_);
  OSR_RETURN_IF_ERROR(SaveLocked());
  return clean;
}

void Site::EndDrillVm(const std::string& id, View& v) {
  if (v.runner->snapshot().running()) {
    auto stopped = v.runner->Stop(kVmStopTimeoutMs);
    if (!stopped.ok()) {
      spdlog::error("site {}: drill VM on view {}: stop: {}", cfg_.name, id,
                    stopped.status().ToString());
    }
  }
  if (!v.nbd_socket.empty()) {
    if (Status st = nbd_->RemoveUnixListener(v.nbd_socket); !st.ok()) {
      spdlog::warn("site {}: drill {}: {}", cfg_.name, id, st.ToString());
    }
    v.nbd_socket.clear();
  }
  std::error_code ec;
  fs::remove_all(DrillRunDir(id), ec);
}

void Site::AdoptDrillVmLocked(const std::string& id, View& v, const json& entry) {
  json_in::Fields f(entry, "");
  auto pid = static_cast<pid_t>(f.I64("drill_vm_pid", 0));
  const json* spec_json = f.Object("drill_vm");
  if (!f.ok() || spec_json == nullptr) return;
  auto parsed = hypervisor::ParseVmSpec(*spec_json, hypervisor::SpecSource::kStored, "drill_vm.");
  if (!parsed.ok()) return;
  auto launch = DrillLaunchLocked(id, v, *parsed, "");
  if (!launch.ok()) return;
  if (pid <= 0 || ::kill(pid, 0) != 0) {
    DeleteTaps(launch->network.taps);  // it ended while the daemon was down
    return;
  }
  if (Status a = v.runner->Adopt(pid, *launch); !a.ok()) {
    spdlog::warn("site {}: drill VM on view {}: {}", cfg_.name, id, a.ToString());
    DeleteTaps(launch->network.taps);
    return;
  }
  v.vm_spec = hypervisor::VmSpecJson(*parsed);
  spdlog::info("site {}: drill VM on view {} still runs (pid {})", cfg_.name, id, pid);
}

Result<json> Site::GroupConsole(const std::string& vm, std::optional<uint64_t> offset,
                                size_t max_bytes) {
  std::string path;
  std::shared_ptr<VmRunner> runner;
  {
    std::lock_guard lock(mu_);
    auto it = groups_.find(vm);
    if (it == groups_.end()) return NotFound("no VM " + vm + " at this site");
    path = ConsoleLogPath(cfg_.data_dir + "/groups/" + vm + "/run", it->second->vm_spec);
    runner = it->second->vm;
  }
  return ReadConsoleFile(path, *runner, offset, max_bytes);
}

Result<json> Site::ViewConsole(const std::string& id, std::optional<uint64_t> offset,
                               size_t max_bytes) {
  std::string path;
  std::shared_ptr<VmRunner> runner;
  {
    std::lock_guard lock(mu_);
    auto it = views_.find(id);
    if (it == views_.end()) return NotFound("no view " + id);
    path = ConsoleLogPath(DrillRunDir(id), it->second.vm_spec);
    runner = it->second.runner;
  }
  return ReadConsoleFile(path, *runner, offset, max_bytes);
}

}  // namespace osr::site
