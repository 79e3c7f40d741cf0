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

namespace osr::hypervisor {

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
