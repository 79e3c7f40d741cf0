#include "hypervisor/process_driver.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <chrono>
#include <thread>

#include "hypervisor/child.h"

namespace osr::hypervisor {

std::string DiskEnvName(const std::string& disk) {
  std::string out = "OSR_DISK_";
  for (char c : disk) {
    unsigned char u = static_cast<unsigned char>(c);
    out += std::isalnum(u) ? static_cast<char>(std::toupper(u)) : '_';
  }
  return out;
}

ProcessDriver::~ProcessDriver() {
  if (pid_ > 0) (void)Stop(5000);
}

Status ProcessDriver::Start(const ProcessSpec& spec) {
  if (running()) return Status(Code::kAlreadyExists, "VM " + spec.name + " is running");
  if (spec.command.empty()) return InvalidArgument("VM " + spec.name + " has no command");
  // Everything the child needs is prepared before fork (no allocation after it).
  std::vector<std::string> env_strings;
  for (char** e = environ; *e != nullptr; ++e) env_strings.emplace_back(*e);
  env_strings.push_back("OSR_VM=" + spec.name);
  std::string all;
  for (auto& [name, uri] : spec.disks) {
    env_strings.push_back(DiskEnvName(name) + "=" + uri);
    all += (all.empty() ? "" : " ") + uri;
  }
  env_strings.push_back("OSR_DISKS=" + all);
  std::vector<char*> envp;
  for (auto& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::string cmd = spec.command;
  const char* argv[] = {"/bin/sh", "-c", cmd.c_str(), nullptr};
  int log_fd = -1;
  if (!spec.log_path.empty()) {
    log_fd = ::open(spec.log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (log_fd < 0) return Status::FromErrno(errno, "open " + spec.log_path);
  }
  pid_t pid = ::fork();
  if (pid < 0) {
    if (log_fd >= 0) ::close(log_fd);
    return Status::FromErrno(errno, "fork");
  }
  if (pid == 0) {
    PrepareVmChild(log_fd);
    ::execve("/bin/sh", const_cast<char* const*>(argv), envp.data());
    ::_exit(127);
  }
  if (log_fd >= 0) ::close(log_fd);
  ::setpgid(pid, pid);  // also here: no race with the child's own call
  pid_ = pid;
  adopted_ = false;
  return Status::Ok();
}

void ProcessDriver::Adopt(pid_t pid) {
  pid_ = pid;
  adopted_ = true;
}

bool ProcessDriver::running() {
  if (pid_ <= 0) return false;
  if (adopted_) {
    if (AdoptedAlive(pid_)) return true;
    pid_ = -1;
    adopted_ = false;
    return false;
  }
  int status = 0;
  pid_t r = ::waitpid(pid_, &status, WNOHANG);
  if (r == pid_ || (r < 0 && errno == ECHILD)) {
    pid_ = -1;
    return false;
  }
  return true;
}

Result<bool> ProcessDriver::Stop(int timeout_ms) {
  if (!running()) return true;
  ::kill(-pid_, SIGTERM);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (std::chrono::steady_clock::now() < deadline) {
    if (!running()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ::kill(-pid_, SIGKILL);
  int status = 0;
  if (::waitpid(pid_, &status, 0) < 0 && errno != ECHILD) {
    return Status::FromErrno(errno, fmt::format("wait for VM process {}", pid_));
  }
  pid_ = -1;
  return false;
}

}  // namespace osr::hypervisor
