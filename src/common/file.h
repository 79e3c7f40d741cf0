// Files: the seam through which osr touches the disk. Every call returns a Status
// that names the file; short reads and writes are completed or reported, never
// returned half-done.
//
// Thread model: a File may be used from many threads at once (positional I/O only).
#pragma once

#include <sys/uio.h>

#include <cerrno>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "common/status.h"

namespace osr {

// Owns a file descriptor.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      Reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { Reset(); }

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  void Reset();

 private:
  int fd_ = -1;
};

class File {
 public:
  enum class Mode { kReadOnly, kReadWrite, kCreate, kCreateExclusive };

  // direct: O_DIRECT (falls back to buffered I/O where the file system refuses it); the
  // caller then writes 4 KiB-aligned buffers at 4 KiB-aligned offsets only.
  static Result<File> Open(const std::string& path, Mode mode, bool direct = false);
  bool direct() const { return direct_; }

  File() = default;
  File(File&&) = default;
  File& operator=(File&&) = default;

  const std::string& path() const { return path_; }
  int fd() const { return fd_.get(); }
  bool valid() const { return fd_.valid(); }

  Result<uint64_t> Size() const;
  // Reads exactly buf.size() bytes; reading past the end is kOutOfRange.
  Status PRead(uint64_t offset, std::span<uint8_t> buf) const;
  // Reads up to buf.size() bytes, fewer only at the end of the file.
  Result<size_t> PReadSome(uint64_t offset, std::span<uint8_t> buf) const;
  Status PWrite(uint64_t offset, std::span<const uint8_t> data);
  // Writes all of the iovecs (which this call may modify) at `offset`.
  Status PWriteV(uint64_t offset, struct iovec* iov, int iovcnt);
  Status Truncate(uint64_t size);
  Status DataSync();
  Status Sync();
  // Deallocates [offset, offset+length): reads return zeros afterwards.
  Status PunchHole(uint64_t offset, uint64_t length);
  // Zeroes [offset, offset+length) keeping it allocated (FALLOC_FL_ZERO_RANGE).
  Status ZeroRange(uint64_t offset, uint64_t length);
  // Writes zero bytes the slow way (for file systems without fallocate modes).
  Status WriteZeroes(uint64_t offset, uint64_t length);
  // lseek(SEEK_DATA / SEEK_HOLE). Returns `size` when there is no more data.
  Result<uint64_t> SeekData(uint64_t offset, uint64_t size) const;
  Result<uint64_t> SeekHole(uint64_t offset, uint64_t size) const;
  void Advise(uint64_t offset, uint64_t length, int advice) const;

 private:
  File(Fd fd, std::string path, bool direct)
      : fd_(std::move(fd)), path_(std::move(path)), direct_(direct) {}
  Fd fd_;
  std::string path_;
  bool direct_ = false;
};

// Fault injection for tests (FoundationDB's BUGGIFY, as a switch that only tests turn
// on): while a fault is set, writes (PWrite, PWriteV, WriteZeroes) to files whose path
// contains `path_part` succeed for `write_bytes_left` more bytes in all, then the write
// that passes them is cut short there (its first bytes do reach the file, as on a file
// system that fills up mid-write) and fails with `err`, as does every later one; with
// `fail_sync`, DataSync and Sync of those files fail with `err` too. An ENOSPC fault is a
// full file system to FileSystemSpace as well: for a path that contains `path_part` or
// lies above it, free_bytes is `write_bytes_left`. Production code never sets one; the
// check costs one relaxed atomic load per call.
struct FileFault {
  std::string path_part;
  int err = ENOSPC;
  uint64_t write_bytes_left = 0;
  bool fail_sync = false;
};
void SetFileFaultForTest(FileFault fault);
void ClearFileFaultForTest();

// The space of the file system that holds `path` (statvfs): bytes an unprivileged
// writer may still use, and the file system's size. The errno of statvfs as a Status.
struct SpaceInfo {
  uint64_t free_bytes = 0;
  uint64_t total_bytes = 0;
};
Result<SpaceInfo> FileSystemSpace(const std::string& path);

// The whole of a small file that osr wrote itself (a state or a record). kCorruption when
// it has more than `bytes_max` bytes; the errors of File::Open and PRead otherwise.
Result<std::string> ReadSmallFile(const std::string& path, uint64_t bytes_max);

// Who may read a file osr writes: kDefault 0644 less the umask; kOwnerOnly 0600 (state
// that only the daemon's user may read or change).
enum class FilePerms { kDefault, kOwnerOnly };
// Writes `data` to `path` atomically (temp file, fsync, rename, fsync dir), with `perms`.
Status WriteFileAtomic(const std::string& path, std::span<const uint8_t> data,
                       FilePerms perms = FilePerms::kDefault);
// fsync of a directory: its entries (files created, renamed or removed in it) are durable.
Status SyncDir(const std::string& dir);

// Changes to directories, through the seam so that the power-loss model below sees them.
// Each does what the std::filesystem function of the same job does with an error_code
// (same results, same errors in `ec`), so a caller keeps its error handling.
void RenamePath(const std::string& from, const std::string& to, std::error_code& ec);
bool RemovePath(const std::string& path, std::error_code& ec);
uint64_t RemoveAllPaths(const std::string& path, std::error_code& ec);
bool CreateDirectories(const std::string& path, std::error_code& ec);

// Power loss, for tests (leveldb's FaultInjectionTestEnv, FoundationDB's
// AsyncFileNonDurable): while a recorder is on for `root`, the seam keeps, for every file
// and directory under it, what a power loss would leave of it, and can write that out as
// an image of the tree (WritePowerLossImageForTest). The model:
//   - a file's content is what it held at its last DataSync/Sync; writes, truncations and
//     hole punches since then are lost; a file never synced since it was created is empty;
//   - a directory's entries are what it listed at its last SyncDir: a file created, renamed
//     or removed in it since then is absent, under its old name, or back (with the content
//     its inode had at its last sync); a directory never synced since it was created is
//     empty; what existed when the recorder started counts as synced;
//   - renames and removes take effect on the real files at once (reads see them); only
//     their durability waits for SyncDir, as on ext4 and XFS.
// Everything is tracked by inode, so a durable name keeps the content its inode last
// synced. Trees under `excluded` (relative to root; e.g. a RocksDB index, whose I/O does
// not come through the seam) are neither modelled nor written to images.
// Every DataSync, Sync and SyncDir under root is a "sync point": on_sync_point(k, path) is
// called (k = 1, 2, ... in order) before the sync takes effect, with no seam lock held, so
// it may write an image (power lost just before sync k) or do any other I/O. Production
// code never starts a recorder; the check costs the same relaxed atomic load as FileFault.
struct PowerLossOptions {
  std::string root;
  std::vector<std::string> excluded;
  std::function<void(uint64_t point, const std::string& path)> on_sync_point;
};
void StartPowerLossRecorderForTest(PowerLossOptions options);
void StopPowerLossRecorderForTest();
// Writes the tree a power loss now would leave under the recorder's root to `to` (created;
// it must not exist), excluded trees left out. With writeback_seed != 0, the other face
// of a power loss: besides what was synced, each 4 KiB block of a file that differs now
// from its synced content did or did not reach the disk (a seeded coin per block: a page
// cache writing back, a drive's cache reordering), so a file may hold a later block without
// an earlier one; names stay as synced. Writers under the root wait meanwhile.
// `writeback_if` (path relative to the root, as "/journal/x.log"), when given, picks the
// files this applies to. kFailedPrecondition without a recorder; the file system's errors.
Status WritePowerLossImageForTest(
    const std::string& to, uint64_t writeback_seed = 0,
    const std::function<bool(const std::string& path)>& writeback_if = {});
// The sync points the recorder has seen so far.
uint64_t PowerLossSyncPointsForTest();

// Raises this process's soft limit of open files (RLIMIT_NOFILE) to its hard limit: every
// recovery store keeps up to 64 journal or history files and 64 index tables open for
// reads, more than the 1024 a service gets by default (systemd on Debian 12 gives 1024
// soft, 524288 hard). Ok when it is there already; the errno of setrlimit otherwise.
Status RaiseOpenFileLimit();

}  // namespace osr
