#include "common/file.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <mutex>
#include <vector>

namespace osr {

namespace {

// The test-only fault (SetFileFaultForTest). fault_on is read without the lock on every
// write: false in production, so the lock is never taken there.
std::atomic<bool> fault_on{false};
std::mutex fault_mu;
FileFault fault;  // guarded by fault_mu

// How many of `bytes` to `path` may be written before the fault's error (all of them:
// no fault applies). Sets *err when the write must fail after those.
size_t FaultAllows(const std::string& path, size_t bytes, int* err) {
  if (!fault_on.load(std::memory_order_relaxed)) return bytes;
  std::lock_guard lock(fault_mu);
  if (fault.path_part.empty() || path.find(fault.path_part) == std::string::npos) return bytes;
  if (bytes <= fault.write_bytes_left) {
    fault.write_bytes_left -= bytes;
    return bytes;
  }
  size_t allowed = static_cast<size_t>(fault.write_bytes_left);
  fault.write_bytes_left = 0;
  *err = fault.err;
  return allowed;
}

// The fault's errno for a sync of `path`, or 0.
int FaultOnSync(const std::string& path) {
  if (!fault_on.load(std::memory_order_relaxed)) return 0;
  std::lock_guard lock(fault_mu);
  if (!fault.fail_sync || path.find(fault.path_part) == std::string::npos) return 0;
  return fault.err;
}

}  // namespace

void SetFileFaultForTest(FileFault f) {
  std::lock_guard lock(fault_mu);
  fault = std::move(f);
  fault_on = true;
}

void ClearFileFaultForTest() {
  std::lock_guard lock(fault_mu);
  fault_on = false;
  fault = FileFault{};
}

Result<SpaceInfo> FileSystemSpace(const std::string& path) {
  struct statvfs v {};
  if (::statvfs(path.c_str(), &v) != 0) return Status::FromErrno(errno, "statvfs " + path);
  return SpaceInfo{static_cast<uint64_t>(v.f_bavail) * v.f_frsize,
                   static_cast<uint64_t>(v.f_blocks) * v.f_frsize};
}

void Fd::Reset() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

Result<File> File::Open(const std::string& path, Mode mode, bool direct) {
  int flags = O_CLOEXEC;
  switch (mode) {
    case Mode::kReadOnly:
      flags |= O_RDONLY;
      break;
    case Mode::kReadWrite:
      flags |= O_RDWR;
      break;
    case Mode::kCreate:
      flags |= O_RDWR | O_CREAT;
      break;
    case Mode::kCreateExclusive:
      flags |= O_RDWR | O_CREAT | O_EXCL;
      break;
  }
  int fd = direct ? ::open(path.c_str(), flags | O_DIRECT, 0644) : -1;
  if (fd < 0 && direct && errno != EINVAL) {
    return Status::FromErrno(errno, fmt::format("open {}", path));
  }
  bool is_direct = fd >= 0;
  if (fd < 0) fd = ::open(path.c_str(), flags, 0644);  // tmpfs and the like: no O_DIRECT
  if (fd < 0) return Status::FromErrno(errno, fmt::format("open {}", path));
  return File(Fd(fd), path, is_direct);
}

Result<uint64_t> File::Size() const {
  struct stat st {};
  if (::fstat(fd_.get(), &st) != 0) return Status::FromErrno(errno, "fstat " + path_);
  return static_cast<uint64_t>(st.st_size);
}

Result<size_t> File::PReadSome(uint64_t offset, std::span<uint8_t> buf) const {
  size_t done = 0;
  while (done < buf.size()) {
    ssize_t n =
        ::pread(fd_.get(), buf.data() + done, buf.size() - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, fmt::format("read {} at {}", path_, offset + done));
    }
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  return done;
}

Status File::PRead(uint64_t offset, std::span<uint8_t> buf) const {
  OSR_ASSIGN_OR_RETURN(size_t n, PReadSome(offset, buf));
  if (n != buf.size()) {
    return OutOfRange(
        fmt::format("read {}: {} bytes at {} pass the end of the file", path_, buf.size(), offset));
  }
  return Status::Ok();
}

namespace {

Status RawPWrite(int fd, const std::string& path, uint64_t offset, std::span<const uint8_t> data) {
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n =
        ::pwrite(fd, data.data() + done, data.size() - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, fmt::format("write {} at {}", path, offset + done));
    }
    done += static_cast<size_t>(n);
  }
  return Status::Ok();
}

}  // namespace

Status File::PWrite(uint64_t offset, std::span<const uint8_t> data) {
  int fault_err = 0;
  size_t allowed = FaultAllows(path_, data.size(), &fault_err);
  if (fault_err != 0) {
    // The fault's short write: the bytes before the "full" point do reach the file (in
    // whole 4 KiB blocks with O_DIRECT, which takes nothing else).
    if (direct_) allowed = allowed / 4096 * 4096;
    OSR_RETURN_IF_ERROR(RawPWrite(fd_.get(), path_, offset, data.first(allowed)));
    return Status::FromErrno(fault_err, fmt::format("write {} at {}", path_, offset + allowed));
  }
  return RawPWrite(fd_.get(), path_, offset, data);
}

Status File::PWriteV(uint64_t offset, struct iovec* iov, int iovcnt) {
  if (fault_on.load(std::memory_order_relaxed)) {
    // Under a test fault: one PWrite per iovec, so that the fault cuts where it should.
    for (int i = 0; i < iovcnt; ++i) {
      OSR_RETURN_IF_ERROR(
          PWrite(offset, {static_cast<const uint8_t*>(iov[i].iov_base), iov[i].iov_len}));
      offset += iov[i].iov_len;
    }
    return Status::Ok();
  }
  while (iovcnt > 0) {
    ssize_t n = ::pwritev(fd_.get(), iov, std::min(iovcnt, IOV_MAX), static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, fmt::format("write {} at {}", path_, offset));
    }
    offset += static_cast<uint64_t>(n);
    size_t left = static_cast<size_t>(n);
    while (iovcnt > 0 && left >= iov->iov_len) {
      left -= iov->iov_len;
      ++iov;
      --iovcnt;
    }
    if (iovcnt > 0) {
      iov->iov_base = static_cast<char*>(iov->iov_base) + left;
      iov->iov_len -= left;
    }
  }
  return Status::Ok();
}

Status File::Truncate(uint64_t size) {
  if (::ftruncate(fd_.get(), static_cast<off_t>(size)) != 0) {
    return Status::FromErrno(errno, "truncate " + path_);
  }
  return Status::Ok();
}

Status File::DataSync() {
  if (int err = FaultOnSync(path_); err != 0) return Status::FromErrno(err, "fdatasync " + path_);
  if (::fdatasync(fd_.get()) != 0) return Status::FromErrno(errno, "fdatasync " + path_);
  return Status::Ok();
}

Status File::Sync() {
  if (int err = FaultOnSync(path_); err != 0) return Status::FromErrno(err, "fsync " + path_);
  if (::fsync(fd_.get()) != 0) return Status::FromErrno(errno, "fsync " + path_);
  return Status::Ok();
}

Status File::PunchHole(uint64_t offset, uint64_t length) {
  if (::fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                  static_cast<off_t>(length)) != 0) {
    return Status::FromErrno(errno, fmt::format("punch hole {} at {}+{}", path_, offset, length));
  }
  return Status::Ok();
}

Status File::ZeroRange(uint64_t offset, uint64_t length) {
  if (::fallocate(fd_.get(), FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                  static_cast<off_t>(length)) != 0) {
    return Status::FromErrno(errno, fmt::format("zero range {} at {}+{}", path_, offset, length));
  }
  return Status::Ok();
}

Status File::WriteZeroes(uint64_t offset, uint64_t length) {
  static const std::vector<uint8_t> kZeros(1 << 20, 0);
  while (length > 0) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(length, kZeros.size()));
    OSR_RETURN_IF_ERROR(PWrite(offset, {kZeros.data(), n}));
    offset += n;
    length -= n;
  }
  return Status::Ok();
}

Result<uint64_t> File::SeekData(uint64_t offset, uint64_t size) const {
  off_t r = ::lseek(fd_.get(), static_cast<off_t>(offset), SEEK_DATA);
  if (r < 0) {
    if (errno == ENXIO) return size;
    return Status::FromErrno(errno, "seek data " + path_);
  }
  return std::min<uint64_t>(static_cast<uint64_t>(r), size);
}

Result<uint64_t> File::SeekHole(uint64_t offset, uint64_t size) const {
  off_t r = ::lseek(fd_.get(), static_cast<off_t>(offset), SEEK_HOLE);
  if (r < 0) {
    if (errno == ENXIO) return size;
    return Status::FromErrno(errno, "seek hole " + path_);
  }
  return std::min<uint64_t>(static_cast<uint64_t>(r), size);
}

void File::Advise(uint64_t offset, uint64_t length, int advice) const {
  (void)::posix_fadvise(fd_.get(), static_cast<off_t>(offset), static_cast<off_t>(length), advice);
}

Status SyncDir(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(errno, "open dir " + dir);
  Fd owner(fd);
  if (::fsync(fd) != 0) return Status::FromErrno(errno, "fsync dir " + dir);
  return Status::Ok();
}

Result<std::string> ReadSmallFile(const std::string& path, uint64_t bytes_max) {
  OSR_ASSIGN_OR_RETURN(File f, File::Open(path, File::Mode::kReadOnly));
  OSR_ASSIGN_OR_RETURN(uint64_t size, f.Size());
  if (size > bytes_max) {
    return Corruption(
        fmt::format("{} has {} bytes, more than such a file may have ({})", path, size, bytes_max));
  }
  std::string text(size, '\0');
  OSR_RETURN_IF_ERROR(f.PRead(0, {reinterpret_cast<uint8_t*>(text.data()), text.size()}));
  return text;
}

Status WriteFileAtomic(const std::string& path, std::span<const uint8_t> data) {
  std::string tmp = path + ".tmp";
  Status written = [&]() -> Status {
    OSR_ASSIGN_OR_RETURN(File f, File::Open(tmp, File::Mode::kCreate));
    OSR_RETURN_IF_ERROR(f.Truncate(0));
    OSR_RETURN_IF_ERROR(f.PWrite(0, data));
    OSR_RETURN_IF_ERROR(f.Sync());
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
      return Status::FromErrno(errno, fmt::format("rename {} to {}", tmp, path));
    }
    return Status::Ok();
  }();
  if (!written.ok()) {
    // Nothing half-written stays behind (a full file system: the space comes back too).
    ::unlink(tmp.c_str());
    return written;
  }
  std::string dir = std::filesystem::path(path).parent_path().string();
  return SyncDir(dir.empty() ? "." : dir);
}

}  // namespace osr
