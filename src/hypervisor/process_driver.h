// ProcessDriver: runs a VM as an operator's command (appliances, tests): the disks' NBD
// URIs are in its environment (OSR_VM, OSR_DISKS, OSR_DISK_<NAME>); shutdown is SIGTERM
// to its process group, then SIGKILL after the timeout.
//
// Thread model: one owner calls Start/Stop; running() may be called from any thread.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <string>
#include <utility>
#include <vector>

#include "common/status.h"

namespace osr::hypervisor {

struct ProcessSpec {
  std::string name;
  std::string command;  // run with /bin/sh -c (from the site's allow-list, or a lab's API)
  std::vector<std::pair<std::string, std::string>> disks;  // (disk name, NBD URI)
  std::string log_path;                                    // the command's stdout and stderr
};

class ProcessDriver {
 public:
  ProcessDriver() = default;
  ProcessDriver(const ProcessDriver&) = delete;
  ProcessDriver& operator=(const ProcessDriver&) = delete;
  ~ProcessDriver();

  // kAlreadyExists if it runs already.
  Status Start(const ProcessSpec& spec);
  // SIGTERM, then SIGKILL once `timeout_ms` passed. Returns whether it stopped by itself
  // (true) or had to be killed (false).
  Result<bool> Stop(int timeout_ms);
  bool running();
  pid_t pid() const { return pid_; }
  // Takes charge of a VM this driver started before the daemon restarted (not our child
  // any more: its end is seen with kill(pid, 0)).
  void Adopt(pid_t pid);

 private:
  pid_t pid_ = -1;
  bool adopted_ = false;
};

// The environment variable name for a disk: OSR_DISK_ + the name upper-cased, with
// every character other than [A-Z0-9_] as '_'.
std::string DiskEnvName(const std::string& disk);

}  // namespace osr::hypervisor
