// VmRunner: one VM that runs at this site, on a group's disks (the production VM, a
// failed-over VM) or on a view's disks (a drill VM). It owns the VM's driver (a process or
// a QEMU: hypervisor/process_driver.h, hypervisor/qemu_driver.h), knows where its console
// log is, and keeps what the site shows and saves about it (state, pid, driver).
//
// The site decides what runs (the spec, checked against its commands rules, and the disks'
// URIs); the runner only runs it.
//
// Thread model: thread-safe. Three mutexes:
//   - op_mu_ serialises every call that talks to the driver (Start, Stop, Freeze, Thaw,
//     Adopt, and Refresh's waitpid): a stop never runs beside a freeze or a start, and a
//     start after a stop starts a new VM (the order the calls came in). Each of them is
//     bounded in time (the drivers' own bounds, the timeouts given).
//   - state_mu_ guards what readers see (snapshot(), console_path(), console_cuts()). It is
//     a leaf: nothing else is taken while it is held.
//   - boot_mu_ guards the boot check's thread (CheckBoot, EndBootCheck); taken before
//     op_mu_, never under it.
// A caller holding the site's mu_ may call snapshot() and Refresh() only: neither waits for
// an operation under way (Refresh skips the driver then, and reports the state as it is).
// The other calls are made without the site's mu_ — but Adopt, at the site's start, before
// its API or any other thread could use the runner.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/status.h"
#include "hypervisor/process_driver.h"
#include "hypervisor/qemu_driver.h"
#include "hypervisor/vm_spec.h"
#include "site/networks.h"

namespace osr::site {

// What a VM runs with, decided by the site.
struct VmLaunch {
  std::string name;         // the VM's name (logs, QEMU's -name)
  hypervisor::VmSpec spec;  // parsed and checked (driver is kProcess or kQemu)
  // The process command (kProcess) or the extra QEMU arguments (kQemu), resolved from the
  // site's commands file (or a lab's API literal).
  std::string command;
  std::vector<std::pair<std::string, std::string>> disks;  // (disk name, NBD URI)
  std::string run_dir;  // created if missing: sockets, console.log, qemu.log / vm.log
  std::string qemu_binary = "qemu-system-x86_64";  // the site's qemu_binary
  NetworkPlan network;  // QEMU: its NICs, and the TAP devices made before and deleted after
};

// A drill's check that the VM came up (hypervisor::BootCheck): its state in the snapshot.
enum class BootState { kNone, kChecking, kHealthy, kUnhealthy };
std::string_view BootStateName(BootState s);  // "", "checking", "healthy", "unhealthy"

class VmRunner {
 public:
  enum class State {
    kStopped,   // nothing runs (never started, stopped, or it ended by itself)
    kStarting,  // Start is under way
    kRunning,
    kStopping,  // Stop is under way
  };
  static std::string_view StateName(State s);

  struct Snapshot {
    State state = State::kStopped;
    pid_t pid = 0;                                          // 0 unless kRunning or kStopping
    hypervisor::Driver driver = hypervisor::Driver::kNone;  // of the last start
    BootState boot = BootState::kNone;                      // of the last CheckBoot
    std::string boot_reason;  // kHealthy: what answered; kUnhealthy: why not
    int64_t boot_ms = 0;      // kHealthy: from the check's start
    bool running() const { return state != State::kStopped; }
  };

  VmRunner() = default;
  VmRunner(const VmRunner&) = delete;
  VmRunner& operator=(const VmRunner&) = delete;
  ~VmRunner();  // ends a boot check, stops a VM that still runs (the drivers' bounds)

  // Starts the VM. Ok at once if it runs already (whatever it was started with). The
  // driver's errors: kNotFound (binary missing), kInvalidArgument (a refused argument),
  // kInternal/kUnavailable with the tail of its log when it exits or does not answer.
  Status Start(const VmLaunch& launch);
  // Stops it: ACPI power-down (QEMU) or SIGTERM (process), then a hard stop after
  // `timeout_ms`. Returns whether it stopped by itself (true; also when nothing ran).
  Result<bool> Stop(int timeout_ms);
  // Guest agent fsfreeze / thaw (QemuDriver::Freeze/Thaw). kNotSupported when no QEMU runs.
  Status Freeze(int timeout_ms);
  // Ok when no QEMU runs (nothing is frozen then).
  Status Thaw();
  // Takes charge again of a VM a previous daemon started (pid from site.json): a QEMU is
  // checked to be that VM (QemuDriver::Adopt); a process is taken on trust of its pid.
  Status Adopt(pid_t pid, const VmLaunch& launch);

  // Checks on a thread of its own that the VM started last came up: the console shows
  // `check.console_line` (in what it printed since that start), or else the guest agent
  // answers guest-ping, within check.timeout_ms. The snapshot shows kChecking, then
  // kHealthy or kUnhealthy (the VM stopped, or the timeout passed: the reason says which).
  // A check under way is replaced. Stop ends it (kUnhealthy: "stopped before the check
  // ended").
  void CheckBoot(const hypervisor::BootCheck& check);
  // The most a console read returns at once (Site::GroupConsole).
  static constexpr size_t kConsoleTailBytesMax = 64 * 1024;

  // Whether it still runs: asks the driver when no operation is under way (a VM that
  // ended by itself becomes kStopped), else answers from the last state. Never waits.
  Snapshot Refresh();
  // The last state, without asking the driver.
  Snapshot snapshot() const;
  // The guest's serial console (QEMU: ttyS0) or the process's output; "" before a start.
  std::string console_path() const;
  // Keeps a running VM's console log within `bytes_max` (kConsoleLogBytesMax in use):
  // once past it, what it holds is copied to <log>.1 (replacing the older one) and the log
  // starts again at 0. Its writer appends (QEMU's chardev append=on, a process's O_APPEND),
  // so it goes on at the new end; what it printed between the copy and the cut is lost.
  // Readers past the new end read from 0 (Site::GroupConsole), as does the boot check.
  // Returns whether it cut the log; an I/O error leaves the log as it was. Never waits: while
  // an operation holds op_mu_ (a stop may take its whole timeout) it does nothing and
  // returns false (the site's watcher comes back a second later).
  Result<bool> BoundConsole(uint64_t bytes_max);
  // How often BoundConsole cut the log since this runner was made, and the log's size at
  // the last cut (what <log>.1 holds): a follower whose offset is from before a cut knows
  // to start again at 0, and how much it did not read.
  struct ConsoleCuts {
    uint64_t count = 0;
    uint64_t last_size = 0;  // bytes
  };
  ConsoleCuts console_cuts() const;

 private:
  void SetState(State s);
  // A start or an adoption took: the snapshot says so (boot check cleared).
  void SetRunning(pid_t pid, hypervisor::Driver driver, const std::string& console);
  void SetBoot(BootState b, std::string reason, int64_t ms = 0);
  // Ends the boot check under way (if any) and joins its thread; not under op_mu_.
  void EndBootCheck();
  void BootCheckLoop(hypervisor::BootCheck check, uint64_t console_from);
  // Whether a driver runs; op_mu_ held. Deletes the TAP devices of one that ended.
  bool RunningLocked();

  std::mutex op_mu_;  // serialises driver calls (see the file comment)
  std::unique_ptr<hypervisor::ProcessDriver> process_;  // guarded by op_mu_
  std::unique_ptr<hypervisor::QemuDriver> qemu_;        // guarded by op_mu_
  std::vector<TapPlan> taps_;                           // guarded by op_mu_: made for it
  uint64_t console_from_ = 0;  // guarded by op_mu_: the console's size at the last start

  std::mutex boot_mu_;  // guards boot_thread_ (taken before op_mu_, never under it)
  std::thread boot_thread_;
  std::atomic<bool> boot_stop_{false};

  mutable std::mutex state_mu_;
  Snapshot snap_;                  // guarded by state_mu_
  std::string console_path_;       // guarded by state_mu_
  uint64_t console_cuts_ = 0;      // guarded by state_mu_ (see console_cuts())
  uint64_t console_cut_size_ = 0;  // guarded by state_mu_
};

}  // namespace osr::site
