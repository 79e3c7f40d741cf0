#include "hypervisor/qemu_driver.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <linux/kvm.h>
#include <poll.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "common/socket.h"
#include "hypervisor/child.h"
namespace osr::hypervisor {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

constexpr int kPollStepMs = 20;  // process exits and socket appearance are polled
constexpr int kCpuinfoLinesMax = 100000;

Clock::time_point DeadlineIn(int ms) {
  return Clock::now() + std::chrono::milliseconds(std::max(ms, 0));
}

int MsLeft(Clock::time_point deadline) {
  auto left =
      std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return static_cast<int>(std::clamp<int64_t>(left, 0, INT_MAX));
}

// Waits until `fd` is ready for `events` (or has hung up: the next call reports it).
Status WaitFd(int fd, short events, Clock::time_point deadline, const std::string& what) {
  for (;;) {
    struct pollfd p {
      fd, events, 0
    };
    int r = ::poll(&p, 1, MsLeft(deadline));
    if (r > 0) return Status::Ok();
    if (r == 0) return Unavailable(what + ": timed out");
    if (errno != EINTR) return Status::FromErrno(errno, "poll for " + what);
  }
}

Status SendLine(int fd, const json& msg, Clock::time_point deadline, const std::string& what) {
  std::string line = msg.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
  size_t done = 0;
  while (done < line.size()) {
    ssize_t n = ::send(fd, line.data() + done, line.size() - done, MSG_NOSIGNAL);
    if (n > 0) {
      done += static_cast<size_t>(n);
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      OSR_RETURN_IF_ERROR(WaitFd(fd, POLLOUT, deadline, what));
    } else if (n < 0 && errno != EINTR) {
      return Status::FromErrno(errno, "send " + what);
    }
  }
  return Status::Ok();
}

// The next JSON object from a line-oriented stream; lines that are not JSON objects
// (a guest agent's leftovers, 0xff sync bytes) are skipped.
Result<json> ReadObject(int fd, std::string& buf, Clock::time_point deadline,
                        const std::string& what) {
  char chunk[64 * 1024];
  for (;;) {
    size_t nl;
    while ((nl = buf.find('\n')) != std::string::npos) {
      json j = json::parse(buf.begin(), buf.begin() + static_cast<std::ptrdiff_t>(nl), nullptr,
                           /*allow_exceptions=*/false);
      buf.erase(0, nl + 1);
      if (j.is_object()) return j;
    }
    if (buf.size() > kJsonLineBytesMax) {
      return Corruption(fmt::format("{}: a line longer than {} bytes", what, kJsonLineBytesMax));
    }
    OSR_RETURN_IF_ERROR(WaitFd(fd, POLLIN, deadline, what));
    ssize_t n = ::recv(fd, chunk, sizeof chunk, 0);
    if (n == 0) return Unavailable(what + ": the connection closed");
    if (n > 0) {
      buf.append(chunk, static_cast<size_t>(n));
    } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
      return Status::FromErrno(errno, "recv " + what);
    }
  }
}

// Sends `request` (which carries "id": id) and returns the response to it: the first
// object with "return" or "error" whose id is `id` or absent. Events and answers to
// earlier, timed-out requests are skipped.
Result<json> Exchange(int fd, std::string& buf, const json& request, uint64_t id,
                      Clock::time_point deadline, const std::string& what) {
  OSR_RETURN_IF_ERROR(SendLine(fd, request, deadline, what));
  for (;;) {
    OSR_ASSIGN_OR_RETURN(json rsp, ReadObject(fd, buf, deadline, what));
    if (!rsp.contains("return") && !rsp.contains("error")) continue;  // event, greeting
    if (rsp.contains("id") && rsp["id"] != json(id)) continue;
    return rsp;
  }
}

// The status for a QMP/QGA {"error": {"class": ..., "desc": ...}} response.
Status ErrorFromResponse(const json& rsp, const std::string& what) {
  std::string cls = "unknown", desc;
  const json& e = rsp["error"];
  if (e.is_object()) {
    if (e.contains("class") && e["class"].is_string()) cls = e["class"].get<std::string>();
    if (e.contains("desc") && e["desc"].is_string()) desc = e["desc"].get<std::string>();
  }
  std::string msg = fmt::format("{}: {}: {}", what, cls, desc);
  if (cls == "CommandNotFound") return NotSupported(msg);
  if (cls == "DeviceNotFound") return NotFound(msg);
  return Status(Code::kInternal, msg);
}

Result<Fd> ConnectUnix(const std::string& path) {
  ListenAddress addr;
  addr.kind = ListenAddress::Kind::kUnix;
  addr.path = path;
  OSR_ASSIGN_OR_RETURN(Fd fd, Connect(addr));
  int flags = ::fcntl(fd.get(), F_GETFL);
  if (flags < 0 || ::fcntl(fd.get(), F_SETFL, flags | O_NONBLOCK) < 0) {
    return Status::FromErrno(errno, "fcntl O_NONBLOCK " + path);
  }
  return fd;
}

// A value inside a qemu option list: commas are doubled.
std::string OptEscape(const std::string& s) {
  std::string out;
  for (char c : s) {
    out += c;
    if (c == ',') out += ',';
  }
  return out;
}

std::string DescribeExit(int status) {
  if (status < 0) return "exited";
  if (WIFEXITED(status)) return fmt::format("exited with status {}", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return fmt::format("was killed by signal {}", WTERMSIG(status));
  return "stopped";
}

}  // namespace

Result<std::string> FindExecutable(const std::string& name) {
  auto usable = [](const std::string& p) {
    struct stat st;
    return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(p.c_str(), X_OK) == 0;
  };
  if (name.empty()) return InvalidArgument("no qemu binary given");
  if (name.find('/') != std::string::npos) {
    if (usable(name)) return name;
    return NotFound(fmt::format("qemu binary {} does not exist or is not executable", name));
  }
  const char* env = ::getenv("PATH");
  std::string path = env != nullptr ? env : "/usr/local/bin:/usr/bin:/bin";
  std::stringstream dirs(path);
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    std::string p = (dir.empty() ? "." : dir) + "/" + name;
    if (usable(p)) return p;
  }
  return NotFound(
      fmt::format("qemu binary '{}' is not in PATH ({}); install qemu-system-x86", name, path));
}

bool CpuHasHardwareVirtualization() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  for (int i = 0; i < kCpuinfoLinesMax && std::getline(cpuinfo, line); ++i) {
    if (line.rfind("flags", 0) != 0) continue;
    std::istringstream words(line.substr(line.find(':') + 1));
    std::string flag;
    while (words >> flag) {
      if (flag == "vmx" || flag == "svm") return true;
    }
    return false;
  }
  return false;
}

bool KvmUsable() {
  // A /dev/kvm without VT-x/AMD-V under it (e.g. kvm_pvm, a software KVM for nested
  // sandboxes) creates VMs and runs firmware, but emulates a stock kernel so slowly
  // that TCG is far faster.
  if (!CpuHasHardwareVirtualization()) return false;
  int kvm = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (kvm < 0) return false;
  bool ok = false;
  if (::ioctl(kvm, KVM_GET_API_VERSION, 0) == KVM_API_VERSION) {
    int vm = ::ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm >= 0) {
      ::close(vm);
      ok = true;
    }
  }
  ::close(kvm);
  return ok;
}

// The -drive options of an NBD disk, as the nbd driver's own options so that qemu
// reconnects when the connection breaks (spec.nbd_reconnect_s; the site daemon restarted):
//   nbd://HOST:PORT/EXPORT                  server.type=inet
//   nbd+unix:///EXPORT?socket=PATH          server.type=unix (the VM's own socket)
// any other URI as file=URI.
static std::string NbdDriveOptions(const std::string& uri, const QemuSpec& spec) {
  static const std::string kScheme = "nbd://";
  static const std::string kUnixScheme = "nbd+unix:///";
  static const std::string kSocket = "?socket=";
  int reconnect_s = std::max(0, spec.nbd_reconnect_s);
  if (uri.rfind(kUnixScheme, 0) == 0) {
    std::string rest = uri.substr(kUnixScheme.size());
    auto q = rest.find(kSocket);
    if (q != std::string::npos && rest.find('&', q) == std::string::npos) {
      return fmt::format("driver=nbd,server.type=unix,server.path={},export={},reconnect-delay={}",
                         OptEscape(rest.substr(q + kSocket.size())), OptEscape(rest.substr(0, q)),
                         reconnect_s);
    }
  }
  if (uri.rfind(kScheme, 0) == 0) {
    std::string rest = uri.substr(kScheme.size());
    auto slash = rest.find('/');
    std::string hostport = rest.substr(0, slash);
    std::string exp = slash == std::string::npos ? "" : rest.substr(slash + 1);
    auto colon = hostport.rfind(':');
    if (colon != std::string::npos && hostport.find('[') == std::string::npos) {
      return fmt::format(
          "driver=nbd,server.type=inet,server.host={},server.port={},export={},"
          "reconnect-delay={}",
          OptEscape(hostport.substr(0, colon)), OptEscape(hostport.substr(colon + 1)),
          OptEscape(exp), reconnect_s);
    }
  }
  return fmt::format("file={},format=raw", OptEscape(uri));
}

QemuDriver::~QemuDriver() {
  if (pid_ > 0) (void)Stop(kStopOnDestroyMs);
}

std::string QemuDriver::LogTail() const {
  std::string path = spec_.run_dir + "/qemu.log";
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return "(no qemu.log)";
  std::string tail;
  off_t size = ::lseek(fd, 0, SEEK_END);
  if (size > 0) {
    off_t from = std::max<off_t>(0, size - static_cast<off_t>(kLogTailBytesMax));
    tail.resize(static_cast<size_t>(size - from));
    ssize_t n = ::pread(fd, tail.data(), tail.size(), from);
    tail.resize(n > 0 ? static_cast<size_t>(n) : 0);
    if (from > 0) {
      size_t nl = tail.find('\n');
      tail.erase(0, nl == std::string::npos ? 0 : nl + 1);  // drop a partial first line
    }
  }
  ::close(fd);
  while (!tail.empty() && std::isspace(static_cast<unsigned char>(tail.back()))) tail.pop_back();
  return tail.empty() ? "(qemu.log is empty)" : tail;
}

Status QemuDriver::Start(const QemuSpec& spec) {
  if (running()) return Status(Code::kAlreadyExists, "VM " + spec.name + " is running");
  if (!ValidName(spec.name)) return InvalidArgument("bad VM name '" + spec.name + "'");
  if (spec.run_dir.empty()) return InvalidArgument("VM " + spec.name + " has no run_dir");
  if (spec.run_dir.find(',') != std::string::npos) {
    return InvalidArgument("run_dir " + spec.run_dir + " has a comma (qemu option syntax)");
  }
  if (spec.memory_bytes == 0 || spec.memory_bytes % (1u << 20) != 0) {
    return InvalidArgument(fmt::format("VM {}: memory_bytes {} is not a whole number of MiB",
                                       spec.name, spec.memory_bytes));
  }
  if (spec.cpus < 1 || spec.cpus > 255) {
    return InvalidArgument(fmt::format("VM {}: {} cpus", spec.name, spec.cpus));
  }
  if (!spec.accel.empty() && spec.accel != "kvm" && spec.accel != "tcg") {
    return InvalidArgument("VM " + spec.name + ": accel is '" + spec.accel + "', not kvm or tcg");
  }
  for (auto& [disk, uri] : spec.disks) {
    if (!ValidName(disk)) return InvalidArgument("VM " + spec.name + ": bad disk name " + disk);
    if (uri.empty()) return InvalidArgument("VM " + spec.name + ": disk " + disk + " has no URI");
  }
  std::string qmp_path = spec.run_dir + "/qmp.sock", qga_path = spec.run_dir + "/qga.sock";
  if (qga_path.size() >= sizeof(sockaddr_un::sun_path)) {
    return InvalidArgument(fmt::format("run_dir {} is too long for a unix socket path ({} bytes)",
                                       spec.run_dir, sizeof(sockaddr_un::sun_path) - 1));
  }
  // Extra arguments pass the deny-by-default filter here too, whoever checked them
  // before (qemu_args.h): this is the last place before exec.
  auto extra = SplitArgs(spec.extra_args);
  Status allowed = extra.ok() ? CheckQemuArgs(*extra) : extra.status();
  if (!allowed.ok()) {
    return InvalidArgument(fmt::format("VM {}: qemu_args: {}", spec.name, allowed.message()));
  }
  OSR_ASSIGN_OR_RETURN(std::string binary, FindExecutable(spec.qemu_binary));
  std::error_code ec;
  fs::create_directories(spec.run_dir, ec);
  if (ec) return IoError("create " + spec.run_dir + ": " + ec.message());
  fs::remove(qmp_path, ec);
  fs::remove(qga_path, ec);

  // The console log is kept across starts (a drill's boot, the boot before a failover),
  // bounded: one older generation.
  std::string console_path = spec.run_dir + "/console.log";
  if (fs::file_size(console_path, ec) > kConsoleLogBytesMax && !ec) {
    fs::rename(console_path, console_path + ".1", ec);
  }
  spec_ = spec;
  accel_ = !spec.accel.empty() ? spec.accel : KvmUsable() ? "kvm" : "tcg";
  // clang-format off
  std::vector<std::string> args = {
      binary,
      "-name", spec.name,
      "-machine", "accel=" + accel_,
      "-m", fmt::format("{}M", spec.memory_bytes >> 20),
      "-smp", std::to_string(spec.cpus),
      // Only the devices listed here (and in extra_args): no default NIC, VGA, CD-ROM.
      "-nodefaults", "-no-user-config",
      "-display", "none",
      "-chardev", "file,id=osr-console0,append=on,path=" + console_path,
      "-serial", "chardev:osr-console0",
      "-qmp", "unix:" + qmp_path + ",server=on,wait=off",
  };
  // clang-format on
  for (size_t i = 0; i < spec.disks.size(); ++i) {
    auto& [disk, uri] = spec.disks[i];
    // The disk's name as its serial (virtio-blk keeps 20 bytes): the guest finds it as
    // /dev/disk/by-id/virtio-<name>, whatever the PCI order.
    args.push_back("-drive");
    args.push_back(fmt::format("{},if=none,id=disk{},cache=none", NbdDriveOptions(uri, spec), i));
    args.push_back("-device");
    args.push_back(fmt::format("virtio-blk-pci,drive=disk{},serial={}", i, disk.substr(0, 20)));
  }
  if (spec.guest_agent) {
    args.insert(args.end(),
                {"-chardev", "socket,id=osr-qga0,path=" + qga_path + ",server=on,wait=off",
                 "-device", "virtio-serial-pci,id=osr-vser0", "-device",
                 "virtserialport,bus=osr-vser0.0,chardev=osr-qga0,name=org.qemu.guest_agent.0"});
  }
  args.insert(args.end(), spec.device_args.begin(), spec.device_args.end());
  args.insert(args.end(), extra->begin(), extra->end());
  // Not the command line: a kernel command line or a path may be a secret.
  spdlog::info("VM {}: starting qemu ({}, {} disk(s), {} extra argument(s))", spec.name, accel_,
               spec.disks.size(), extra->size());

  // Everything the child needs is prepared before fork (no allocation after it).
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::string log_path = spec.run_dir + "/qemu.log";
  int log_fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (log_fd < 0) return Status::FromErrno(errno, "open " + log_path);
  pid_t pid = ::fork();
  if (pid < 0) {
    ::close(log_fd);
    return Status::FromErrno(errno, "fork");
  }
  if (pid == 0) {
    PrepareVmChild(log_fd);
    ::execv(argv[0], argv.data());
    static const char kExecFailed[] = "osr: exec of the qemu binary failed\n";
    (void)!::write(2, kExecFailed, sizeof kExecFailed - 1);
    ::_exit(127);
  }
  ::close(log_fd);
  ::setpgid(pid, pid);  // also here: no race with the child's own call
  pid_ = pid;
  exit_status_ = -1;

  Status st = ConnectQmp(kQmpReadyTimeoutMs);
  if (!st.ok()) {
    Status killed = running() ? Kill() : Status::Ok();
    return Status(st.code(),
                  fmt::format("VM {}: {}{}; qemu.log ends with:\n{}", spec.name, st.message(),
                              killed.ok() ? "" : " (and " + killed.message() + ")", LogTail()));
  }
  spdlog::info("VM {}: qemu pid {} answers QMP", spec.name, pid_);
  return Status::Ok();
}

Status QemuDriver::ConnectQmp(int timeout_ms) {
  std::string path = spec_.run_dir + "/qmp.sock";
  auto deadline = DeadlineIn(timeout_ms);
  Status last = Unavailable("no QMP socket yet");
  for (;;) {
    if (!running()) {
      return Status(Code::kInternal,
                    fmt::format("qemu {} before QMP answered", DescribeExit(exit_status_)));
    }
    if (Clock::now() >= deadline) {
      return Unavailable(fmt::format("QMP on {} did not answer within {} ms ({}); killed qemu",
                                     path, timeout_ms, last.message()));
    }
    auto fd = ConnectUnix(path);
    if (fd.ok()) {
      std::string buf;
      uint64_t id = next_id_++;
      auto rsp = Exchange(fd->get(), buf, {{"execute", "qmp_capabilities"}, {"id", id}}, id,
                          deadline, "QMP qmp_capabilities");
      if (rsp.ok() && rsp->contains("return")) {
        qmp_ = std::move(*fd);
        qmp_buf_ = std::move(buf);
        return Status::Ok();
      }
      last = rsp.ok() ? ErrorFromResponse(*rsp, "QMP qmp_capabilities") : rsp.status();
      if (rsp.ok()) return last;  // qemu answered, and refused: waiting will not help
    } else {
      last = fd.status();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(kPollStepMs));
  }
}

Status QemuDriver::Adopt(pid_t pid, const QemuSpec& spec) {
  if (running()) return Status(Code::kAlreadyExists, "VM " + spec.name + " is running");
  // The pid may have been reused since: it must be the qemu of this run dir.
  std::string cmdline;
  {
    int fd = ::open(fmt::format("/proc/{}/cmdline", pid).c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return NotFound(fmt::format("no process {}", pid));
    char buf[4096];
    ssize_t n;
    while ((n = ::read(fd, buf, sizeof buf)) > 0) cmdline.append(buf, static_cast<size_t>(n));
    ::close(fd);
  }
  if (cmdline.find(spec.run_dir + "/qmp.sock") == std::string::npos) {
    return NotFound(fmt::format("process {} is not the qemu of {}", pid, spec.name));
  }
  spec_ = spec;
  pid_ = pid;
  adopted_ = true;
  Status qmp = ConnectQmp(kQmpCommandTimeoutMs);
  if (!qmp.ok()) {
    // Still ours to stop: without QMP, Stop ends it with SIGKILL.
    spdlog::warn("VM {}: adopted qemu pid {} without QMP: {}", spec.name, pid, qmp.ToString());
  }
  spdlog::info("VM {}: qemu pid {} adopted", spec.name, pid);
  return Status::Ok();
}

bool QemuDriver::running() {
  if (pid_ <= 0) return false;
  if (adopted_) {
    if (AdoptedAlive(pid_)) return true;
    pid_ = -1;
    adopted_ = false;
    exit_status_ = -1;
    qmp_.Reset();
    qmp_buf_.clear();
    return false;
  }
  int status = 0;
  pid_t r = ::waitpid(pid_, &status, WNOHANG);
  if (r == pid_ || (r < 0 && errno == ECHILD)) {
    exit_status_ = r == pid_ ? status : -1;
    pid_ = -1;
    qmp_.Reset();
    qmp_buf_.clear();
    return false;
  }
  return true;
}

bool QemuDriver::WaitExit(int timeout_ms) {
  auto deadline = DeadlineIn(timeout_ms);
  for (;;) {
    if (!running()) return true;
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(
        std::chrono::milliseconds(std::min(kPollStepMs, std::max(1, MsLeft(deadline)))));
  }
}

Status QemuDriver::Kill() {
  if (pid_ <= 0) return Status::Ok();
  ::kill(-pid_, SIGKILL);
  if (WaitExit(kKillWaitMs)) return Status::Ok();
  return IoError(
      fmt::format("qemu pid {} did not exit within {} ms of SIGKILL", pid_, kKillWaitMs));
}

Result<bool> QemuDriver::Stop(int timeout_ms) {
  if (!running()) return true;
  auto powerdown = QmpUntil("system_powerdown", json(), std::min(timeout_ms, kQmpCommandTimeoutMs));
  if (!powerdown.ok()) {
    spdlog::warn("VM {}: {}", spec_.name, powerdown.status().ToString());
  }
  if (WaitExit(timeout_ms)) {
    spdlog::info("VM {}: powered off", spec_.name);
    return true;
  }
  auto quit = QmpUntil("quit", json(), kQuitTimeoutMs);
  if (!quit.ok() || !WaitExit(kQuitTimeoutMs)) {
    spdlog::warn("VM {}: quit did not end qemu ({}); SIGKILL", spec_.name,
                 quit.ok() ? "still running" : quit.status().ToString());
    OSR_RETURN_IF_ERROR(Kill());
  }
  spdlog::info("VM {}: did not power off within {} ms; ended qemu", spec_.name, timeout_ms);
  return false;
}

Result<json> QemuDriver::Qmp(const std::string& command, const json& args) {
  return QmpUntil(command, args, kQmpCommandTimeoutMs);
}

Result<json> QemuDriver::QmpUntil(const std::string& command, const json& args, int timeout_ms) {
  std::string what = "QMP " + command;
  if (!running() || !qmp_.valid()) return Unavailable(what + ": VM is not running");
  uint64_t id = next_id_++;
  json request = {{"execute", command}, {"id", id}};
  if (!args.is_null()) request["arguments"] = args;
  auto rsp = Exchange(qmp_.get(), qmp_buf_, request, id, DeadlineIn(timeout_ms), what);
  if (!rsp.ok()) return rsp.status();
  if (rsp->contains("error")) return ErrorFromResponse(*rsp, what);
  return std::move((*rsp)["return"]);
}

Result<json> QemuDriver::Guest(const std::string& command, int timeout_ms, bool* synced) {
  std::string path = spec_.run_dir + "/qga.sock";
  if (!running()) return Unavailable("guest agent: VM is not running");
  if (!spec_.guest_agent) {
    return NotSupported("VM " + spec_.name + " was started without a guest agent channel");
  }
  auto deadline = DeadlineIn(timeout_ms);
  OSR_ASSIGN_OR_RETURN(Fd fd, ConnectUnix(path));
  std::string buf;
  // guest-sync: the agent answers with our id once everything sent before (by us or an
  // earlier client) has been answered, so what follows is in step.
  uint64_t sync_id = next_id_++;
  json sync = {{"execute", "guest-sync"}, {"arguments", {{"id", sync_id}}}};
  Status st = SendLine(fd.get(), sync, deadline, "guest-sync");
  while (st.ok()) {
    auto rsp = ReadObject(fd.get(), buf, deadline, "guest-sync");
    if (!rsp.ok()) {
      st = rsp.status();
    } else if (rsp->contains("return") && (*rsp)["return"] == json(sync_id)) {
      break;
    }
  }
  if (!st.ok()) {
    return Unavailable(
        fmt::format("VM {}: the guest agent did not answer guest-sync on {} within {} ms ({}); is "
                    "qemu-guest-agent running in the guest?",
                    spec_.name, path, timeout_ms, st.message()));
  }
  if (synced != nullptr) *synced = true;
  uint64_t id = next_id_++;
  std::string what = "guest agent " + command;
  OSR_ASSIGN_OR_RETURN(
      json rsp, Exchange(fd.get(), buf, {{"execute", command}, {"id", id}}, id, deadline, what));
  if (rsp.contains("error")) return ErrorFromResponse(rsp, what);
  return std::move(rsp["return"]);
}

Status QemuDriver::Freeze(int timeout_ms) {
  auto t0 = Clock::now();
  bool synced = false;
  auto frozen = Guest("guest-fsfreeze-freeze", timeout_ms, &synced);
  if (frozen.ok()) {
    spdlog::info("VM {}: froze {} file systems in {} ms", spec_.name, frozen->dump(),
                 std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t0).count());
    return Status::Ok();
  }
  const Status& st = frozen.status();
  // The agent answered guest-sync but not the freeze in time: it may still freeze the
  // guest after we gave up. Thaw, so that no guest stays frozen by us.
  if (synced && st.code() == Code::kUnavailable) {
    Status thawed = Thaw(kThawTimeoutMs);
    return Unavailable(
        fmt::format("VM {}: {}; thaw after it: {}", spec_.name, st.message(), thawed.ToString()));
  }
  return st;
}

Status QemuDriver::Ping(int timeout_ms) {
  return Guest("guest-ping", timeout_ms, nullptr).status();
}

Status QemuDriver::Thaw(int timeout_ms) {
  auto thawed = Guest("guest-fsfreeze-thaw", timeout_ms, nullptr);
  if (!thawed.ok()) return thawed.status();
  spdlog::info("VM {}: thawed {} file systems", spec_.name, thawed->dump());
  return Status::Ok();
}

}  // namespace osr::hypervisor
