#include "site/vm_runner.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <filesystem>

#include "common/file.h"
#include "common/threads.h"

namespace osr::site {

namespace fs = std::filesystem;
using hypervisor::Driver;

std::string_view VmRunner::StateName(State s) {
  switch (s) {
    case State::kStopped:
      return "stopped";
    case State::kStarting:
      return "starting";
    case State::kRunning:
      return "running";
    case State::kStopping:
      return "stopping";
  }
  return "unknown";
}

std::string_view BootStateName(BootState s) {
  switch (s) {
    case BootState::kNone:
      return "";
    case BootState::kChecking:
      return "checking";
    case BootState::kHealthy:
      return "healthy";
    case BootState::kUnhealthy:
      return "unhealthy";
  }
  return "unknown";
}

VmRunner::~VmRunner() {
  EndBootCheck();
  std::lock_guard op(op_mu_);
  if (process_ && process_->running()) (void)process_->Stop(hypervisor::kStopOnDestroyMs);
  if (qemu_ && qemu_->running()) (void)qemu_->Stop(hypervisor::kStopOnDestroyMs);
  DeleteTaps(taps_);
}

bool VmRunner::RunningLocked() {
  bool runs = (process_ && process_->running()) || (qemu_ && qemu_->running());
  if (!runs && !taps_.empty()) {
    DeleteTaps(taps_);
    taps_.clear();
  }
  return runs;
}

void VmRunner::SetBoot(BootState b, std::string reason, int64_t ms) {
  std::lock_guard lock(state_mu_);
  snap_.boot = b;
  snap_.boot_reason = std::move(reason);
  snap_.boot_ms = ms;
}

void VmRunner::SetState(State s) {
  std::lock_guard lock(state_mu_);
  snap_.state = s;
  if (s == State::kStopped) snap_.pid = 0;
}

Status VmRunner::Start(const VmLaunch& launch) {
  std::lock_guard op(op_mu_);
  if (RunningLocked()) return Status::Ok();
  SetState(State::kStarting);
  std::error_code ec;
  fs::create_directories(launch.run_dir, ec);
  if (Status made = MakeTaps(launch.network.taps); !made.ok()) {
    SetState(State::kStopped);
    return made;
  }
  std::unique_ptr<hypervisor::ProcessDriver> process;
  std::unique_ptr<hypervisor::QemuDriver> qemu;
  Status started;
  std::string console;
  // What the console held before this start (both drivers append to it): a boot check
  // reads only what came after. Taken before the guest runs.
  uint64_t console_from = 0;
  if (launch.spec.driver == Driver::kQemu) {
    console_from = fs::file_size(launch.run_dir + "/console.log", ec);
    // QemuDriver::Start moves a log past kConsoleLogBytesMax aside: the new one starts at 0.
    if (ec || console_from > hypervisor::kConsoleLogBytesMax) console_from = 0;
  } else if (launch.spec.driver == Driver::kProcess) {
    console_from = fs::file_size(launch.run_dir + "/vm.log", ec);
    if (ec) console_from = 0;
  }
  if (launch.spec.driver == Driver::kProcess) {
    hypervisor::ProcessSpec ps;
    ps.name = launch.name;
    ps.command = launch.command;
    ps.disks = launch.disks;
    ps.log_path = launch.run_dir + "/vm.log";
    console = ps.log_path;
    process = std::make_unique<hypervisor::ProcessDriver>();
    started = process->Start(ps);
  } else if (launch.spec.driver == Driver::kQemu) {
    hypervisor::QemuSpec qs;
    qs.name = launch.name;
    qs.disks = launch.disks;
    qs.memory_bytes = launch.spec.memory_bytes;
    qs.cpus = static_cast<int>(launch.spec.cpus);
    qs.extra_args = launch.command;
    qs.run_dir = launch.run_dir;
    qs.guest_agent = launch.spec.guest_agent;
    qs.accel = launch.spec.accel;
    qs.qemu_binary = launch.qemu_binary;
    for (auto& nic : launch.network.nics) {
      qs.device_args.insert(qs.device_args.end(), nic.args.begin(), nic.args.end());
    }
    console = launch.run_dir + "/console.log";
    qemu = std::make_unique<hypervisor::QemuDriver>();
    started = qemu->Start(qs);
  } else {
    started = InvalidArgument("VM " + launch.name + " has no driver to start it");
  }
  if (!started.ok()) {
    DeleteTaps(launch.network.taps);
    SetState(State::kStopped);
    return started;
  }
  pid_t pid = process ? process->pid() : qemu->pid();
  process_ = std::move(process);
  qemu_ = std::move(qemu);
  taps_ = launch.network.taps;
  console_from_ = console_from;
  SetRunning(pid, launch.spec.driver, console);
  return Status::Ok();
}

void VmRunner::SetRunning(pid_t pid, Driver driver, const std::string& console) {
  std::lock_guard lock(state_mu_);
  snap_ = Snapshot();
  snap_.state = State::kRunning;
  snap_.pid = pid;
  snap_.driver = driver;
  console_path_ = console;
}

Result<bool> VmRunner::Stop(int timeout_ms) {
  EndBootCheck();
  std::lock_guard op(op_mu_);
  bool clean = true;
  if (process_ && process_->running()) {
    SetState(State::kStopping);
    auto stopped = process_->Stop(timeout_ms);
    SetState(stopped.ok() ? State::kStopped : State::kRunning);
    OSR_ASSIGN_OR_RETURN(clean, std::move(stopped));
  } else if (qemu_ && qemu_->running()) {
    SetState(State::kStopping);
    auto stopped = qemu_->Stop(timeout_ms);
    SetState(stopped.ok() ? State::kStopped : State::kRunning);
    OSR_ASSIGN_OR_RETURN(clean, std::move(stopped));
  }
  (void)RunningLocked();  // deletes its TAP devices
  SetState(State::kStopped);
  return clean;
}

Status VmRunner::Freeze(int timeout_ms) {
  std::lock_guard op(op_mu_);
  if (!qemu_ || !qemu_->running()) {
    return Status(Code::kNotSupported, "it is not a running QEMU VM");
  }
  return qemu_->Freeze(timeout_ms);
}

Status VmRunner::Thaw() {
  std::lock_guard op(op_mu_);
  if (!qemu_ || !qemu_->running()) return Status::Ok();
  return qemu_->Thaw();
}

Status VmRunner::Adopt(pid_t pid, const VmLaunch& launch) {
  std::lock_guard op(op_mu_);
  std::string console;
  if (launch.spec.driver == Driver::kQemu) {
    hypervisor::QemuSpec qs;
    qs.name = launch.name;
    qs.disks = launch.disks;
    qs.run_dir = launch.run_dir;
    qs.guest_agent = launch.spec.guest_agent;
    auto q = std::make_unique<hypervisor::QemuDriver>();
    OSR_RETURN_IF_ERROR(q->Adopt(pid, qs));
    qemu_ = std::move(q);
    taps_ = launch.network.taps;
    console = launch.run_dir + "/console.log";
  } else {
    process_ = std::make_unique<hypervisor::ProcessDriver>();
    process_->Adopt(pid);
    console = launch.run_dir + "/vm.log";
  }
  SetRunning(pid, launch.spec.driver, console);
  return Status::Ok();
}

VmRunner::Snapshot VmRunner::Refresh() {
  std::unique_lock op(op_mu_, std::try_to_lock);
  if (op.owns_lock()) {
    bool runs = RunningLocked();
    std::lock_guard lock(state_mu_);
    if (!runs && snap_.state != State::kStopped) {
      snap_.state = State::kStopped;
      snap_.pid = 0;
    }
  }
  return snapshot();
}

VmRunner::Snapshot VmRunner::snapshot() const {
  std::lock_guard lock(state_mu_);
  return snap_;
}

Result<bool> VmRunner::BoundConsole(uint64_t bytes_max) {
  // Not while a start moves the log aside; not waiting for a stop (the watcher calls this).
  std::unique_lock op(op_mu_, std::try_to_lock);
  if (!op.owns_lock() || !RunningLocked()) return false;
  const std::string path = console_path();
  if (path.empty()) return false;
  auto f = File::Open(path, File::Mode::kReadWrite);
  if (!f.ok()) return f.status().code() == Code::kNotFound ? Result<bool>(false) : f.status();
  OSR_ASSIGN_OR_RETURN(uint64_t size, f->Size());
  if (size <= bytes_max) return false;
  std::error_code ec;
  fs::copy_file(path, path + ".1.tmp", fs::copy_options::overwrite_existing, ec);
  if (!ec) fs::rename(path + ".1.tmp", path + ".1", ec);
  if (ec) {
    fs::remove(path + ".1.tmp", ec);
    return IoError(fmt::format("copy {} to {}.1: {}", path, path, ec.message()));
  }
  // Counted before the cut: a reader reads the log, then the count (Site::GroupConsole), so
  // a read of the cut log always comes with the new count.
  {
    std::lock_guard lock(state_mu_);
    ++console_cuts_;
    console_cut_size_ = size;
  }
  OSR_RETURN_IF_ERROR(f->Truncate(0));
  console_from_ = 0;
  return true;
}

VmRunner::ConsoleCuts VmRunner::console_cuts() const {
  std::lock_guard lock(state_mu_);
  return {console_cuts_, console_cut_size_};
}

std::string VmRunner::console_path() const {
  std::lock_guard lock(state_mu_);
  return console_path_;
}

void VmRunner::EndBootCheck() {
  std::lock_guard lock(boot_mu_);
  boot_stop_ = true;
  if (boot_thread_.joinable()) boot_thread_.join();
}

void VmRunner::CheckBoot(const hypervisor::BootCheck& check) {
  std::lock_guard lock(boot_mu_);
  boot_stop_ = true;
  if (boot_thread_.joinable()) boot_thread_.join();
  boot_stop_ = false;
  uint64_t from;
  {
    std::lock_guard op(op_mu_);
    from = console_from_;
  }
  SetBoot(BootState::kChecking, check.console_line.empty()
                                    ? "waiting for the guest agent to answer guest-ping"
                                    : "waiting for '" + check.console_line + "' on the console");
  boot_thread_ = std::thread([this, check, from] {
    NameThisThread("osr-boot-check");
    BootCheckLoop(check, from);
  });
}

void VmRunner::BootCheckLoop(hypervisor::BootCheck check, uint64_t console_from) {
  using Clock = std::chrono::steady_clock;
  auto began = Clock::now();
  auto deadline = began + std::chrono::milliseconds(check.timeout_ms);
  auto elapsed_ms = [&] {
    return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - began).count();
  };
  // The console is read from where this start began, in pieces; `carry` keeps the end of
  // the last piece so that a line split across two reads is still found.
  uint64_t offset = console_from;
  std::string carry;
  std::string path = console_path();
  while (!boot_stop_) {
    bool runs;
    Status pinged = Unavailable("not asked");
    {
      std::lock_guard op(op_mu_);
      runs = RunningLocked();
      if (runs && check.console_line.empty() && qemu_) pinged = qemu_->Ping(2000);
    }
    if (!runs) {
      SetBoot(BootState::kUnhealthy, "the VM stopped before it came up");
      return;
    }
    if (check.console_line.empty()) {
      if (pinged.ok()) {
        SetBoot(BootState::kHealthy, "the guest agent answered guest-ping", elapsed_ms());
        return;
      }
    } else if (auto f = File::Open(path, File::Mode::kReadOnly); f.ok()) {
      // A log cut while the VM runs (BoundConsole) starts again at 0.
      if (auto size = f->Size(); size.ok() && *size < offset) offset = 0;
      std::string piece(1 << 20, '\0');
      auto n = f->PReadSome(offset, {reinterpret_cast<uint8_t*>(piece.data()), piece.size()});
      if (n.ok() && *n > 0) {
        piece.resize(*n);
        offset += *n;
        carry += piece;
        if (carry.find(check.console_line) != std::string::npos) {
          SetBoot(BootState::kHealthy, "the console showed '" + check.console_line + "'",
                  elapsed_ms());
          return;
        }
        if (carry.size() > check.console_line.size()) {
          carry.erase(0, carry.size() - check.console_line.size());
        }
        continue;  // more may be there already
      }
    }
    if (Clock::now() >= deadline) {
      SetBoot(
          BootState::kUnhealthy,
          fmt::format("no {} within {} ms",
                      check.console_line.empty() ? std::string("answer from the guest agent")
                                                 : "'" + check.console_line + "' on the console",
                      check.timeout_ms));
      return;
    }
    for (int i = 0; i < 5 && !boot_stop_; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
  SetBoot(BootState::kUnhealthy, "stopped before the check ended");
}

}  // namespace osr::site
