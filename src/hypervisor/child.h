// What a VM's child process does between fork and exec, for every driver: its own
// process group (Stop signals the whole VM), stdin from /dev/null, stdout and stderr to
// its log, no other descriptor of the daemon (its listening sockets, images, keys: a
// descriptor opened without O_CLOEXEC by a library would otherwise reach the VM), no
// signal blocked (the daemon blocks its stop signals), SIGPIPE default.
// Only async-signal-safe calls: it runs in the child of a threaded daemon.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>

namespace osr::hypervisor {

// Whether process `pid` (not our child: a VM adopted after a restart of the daemon) still
// runs. A zombie does not: once reparented, it waits for a reaper that may never come (a
// container's init that does not reap), and kill(pid, 0) would call it alive forever.
inline bool AdoptedAlive(pid_t pid) {
  if (pid <= 0 || ::kill(pid, 0) != 0) return false;
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/stat", static_cast<int>(pid));
  FILE* f = std::fopen(path, "re");
  if (f == nullptr) return true;  // no /proc: kill(pid, 0) is all there is
  char buf[512];
  size_t n = std::fread(buf, 1, sizeof buf - 1, f);
  std::fclose(f);
  buf[n] = '\0';
  // "pid (comm) S ...": the state follows the last ')' (comm may hold one).
  const char* close = std::strrchr(buf, ')');
  return close == nullptr || close[1] != ' ' || close[2] != 'Z';
}

inline void PrepareVmChild(int log_fd) {
  ::setpgid(0, 0);
  int null_fd = ::open("/dev/null", O_RDONLY);
  if (null_fd >= 0) ::dup2(null_fd, 0);
  if (log_fd >= 0) {
    ::dup2(log_fd, 1);
    ::dup2(log_fd, 2);
  }
  ::close_range(3, ~0U, 0);
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);
  ::signal(SIGPIPE, SIG_DFL);
}

}  // namespace osr::hypervisor
