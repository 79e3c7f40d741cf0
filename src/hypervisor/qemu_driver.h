// QemuDriver: runs a VM as a qemu-system-x86_64 process whose disks are NBD exports
// (the capture front end at the protected site, a recovery view at the recovery site).
// It starts qemu in its own process group with a QMP socket and, optionally, a guest
// agent channel, and speaks JSON lines over both:
//   - QMP (run_dir/qmp.sock): status, ACPI power-down, quit.
//   - the guest agent (run_dir/qga.sock): fsfreeze around an application-consistent
//     recovery point. A guest without the agent makes Freeze fail with kUnavailable
//     within its timeout; the caller then takes a crash-consistent point instead.
// KVM is used when the CPU has hardware virtualization and /dev/kvm can create a VM,
// else TCG; QemuSpec::accel can force either. The choice is made before the start, not
// left to qemu's fallback, so the log says which one runs.
//
// Files in run_dir: qmp.sock, qga.sock, console.log (the guest's serial port, appended
// to across starts; moved to console.log.1 at a start once it passed kConsoleLogBytesMax)
// and qemu.log (qemu's stdout and stderr, truncated at each start; its tail goes into
// start errors).
//
// Thread model: not thread-safe. One owner calls every method, or the caller serialises
// them (e.g. a mutex per VM). Every call is bounded in time: socket reads and writes
// wait with poll() up to a deadline, process waits poll waitpid() up to a deadline.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/file.h"
#include "common/status.h"
#include "hypervisor/qemu_args.h"

namespace osr::hypervisor {

struct QemuSpec {
  std::string name;
  // (disk name, URI): nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH
  std::vector<std::pair<std::string, std::string>> disks;
  uint64_t memory_bytes = 512ull << 20;  // a whole number of MiB
  int cpus = 1;
  // Arguments the site made (NICs: -netdev, -device, -fw_cfg), taken as they are, before
  // extra_args.
  std::vector<std::string> device_args;
  std::string extra_args;  // appended to the command line, split as SplitArgs() does
  std::string run_dir;     // created if missing
  bool guest_agent = true;
  std::string qemu_binary = "qemu-system-x86_64";  // a path, or a name looked up in PATH
  std::string accel;  // "" = KVM when KvmUsable(), else TCG; or "kvm" / "tcg"
  // When a disk's NBD connection breaks (its site daemon restarted), qemu reconnects for
  // this long, holding the guest's I/O, before it fails it (0: fail at once).
  int nbd_reconnect_s = 60;
};

// Limits, in one place.
inline constexpr int kQmpReadyTimeoutMs = 15000;  // from exec until QMP answers
inline constexpr int kQmpCommandTimeoutMs = 5000;
inline constexpr int kQuitTimeoutMs = 2000;  // Stop: QMP quit before SIGKILL
inline constexpr int kThawTimeoutMs = 10000;
inline constexpr int kStopOnDestroyMs = 5000;
inline constexpr int kKillWaitMs = 5000;                // SIGKILL until reaped
inline constexpr size_t kJsonLineBytesMax = 16u << 20;  // query-qmp-schema is ~200 KiB
inline constexpr size_t kLogTailBytesMax = 2048;
inline constexpr uint64_t kConsoleLogBytesMax = 16ull << 20;

class QemuDriver {
 public:
  QemuDriver() = default;
  QemuDriver(const QemuDriver&) = delete;
  QemuDriver& operator=(const QemuDriver&) = delete;
  ~QemuDriver();  // Stop(kStopOnDestroyMs) if it still runs

  // Starts qemu and waits until QMP answers qmp_capabilities. kAlreadyExists if it
  // runs; kNotFound if the binary is missing; kInvalidArgument for a bad spec; on
  // qemu exiting or QMP not answering in kQmpReadyTimeoutMs the process group is
  // killed and the error carries the tail of qemu.log.
  Status Start(const QemuSpec& spec);
  // ACPI power-down (QMP system_powerdown) and waits `timeout_ms` for qemu to exit;
  // then QMP quit, then SIGKILL to the process group. Returns whether the guest
  // powered off by itself (true) or had to be ended (false).
  Result<bool> Stop(int timeout_ms);
  bool running();
  pid_t pid() const { return pid_; }
  // Takes charge again of a qemu a previous daemon started with `spec` (after the daemon
  // was killed; qemu runs in its own process group and outlives it): checks that `pid`
  // is that qemu (its command line names spec.run_dir's QMP socket) and connects QMP.
  // Its end is then seen with kill(pid, 0) (it is not our child).
  Status Adopt(pid_t pid, const QemuSpec& spec);
  // "kvm" or "tcg": what the last Start chose.
  const std::string& accel() const { return accel_; }

  // Guest agent guest-fsfreeze-freeze / -thaw (after guest-sync). kUnavailable when
  // the agent does not answer within the timeout; kNotSupported when the VM was
  // started without the agent channel. A freeze that times out after the agent
  // answered guest-sync is followed by a thaw attempt, so no guest stays frozen by us.
  Status Freeze(int timeout_ms);
  Status Thaw(int timeout_ms = kThawTimeoutMs);
  // Guest agent guest-ping (after guest-sync): whether the guest is up. Same errors.
  Status Ping(int timeout_ms);

  // One QMP command; returns its "return" value. QMP errors map to codes:
  // CommandNotFound → kNotSupported, DeviceNotFound → kNotFound, others → kInternal.
  Result<nlohmann::json> Qmp(const std::string& command,
                             const nlohmann::json& args = nlohmann::json());

 private:
  Status ConnectQmp(int timeout_ms);
  // guest-sync, then `command`, on a fresh connection to qga.sock; returns "return".
  // *synced (if given) tells whether the agent answered guest-sync.
  Result<nlohmann::json> Guest(const std::string& command, int timeout_ms, bool* synced);
  Result<nlohmann::json> QmpUntil(const std::string& command, const nlohmann::json& args,
                                  int timeout_ms);
  // SIGKILL to the process group and reap it.
  Status Kill();
  // Polls running() until qemu exits or `timeout_ms` passed; returns whether it exited.
  bool WaitExit(int timeout_ms);
  std::string LogTail() const;

  pid_t pid_ = -1;
  bool adopted_ = false;  // pid_ is not our child (Adopt)
  int exit_status_ = -1;  // waitpid status of the last qemu that exited; -1 unknown
  QemuSpec spec_;
  std::string accel_;
  Fd qmp_;                // connected and past qmp_capabilities while running
  std::string qmp_buf_;   // bytes read after the last complete line
  uint64_t next_id_ = 1;  // QMP and guest-sync ids: late answers are told apart
};

// The binary's path: `name` itself when it has a '/' (kNotFound unless it is an executable
// file), else the first executable match in PATH (kNotFound naming PATH).
Result<std::string> FindExecutable(const std::string& name);

// Whether KVM is worth using: the CPU has VT-x or AMD-V (/proc/cpuinfo flags vmx or
// svm), and /dev/kvm opens read-write, speaks API 12 and creates a VM.
bool KvmUsable();
bool CpuHasHardwareVirtualization();

}  // namespace osr::hypervisor
