#include "nbd/file_disk.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>

#include "common/units.h"
#include "nbd/protocol.h"

namespace osr::nbd {

Result<std::unique_ptr<FileDisk>> FileDisk::Open(const std::string& path, bool read_only,
                                                 uint64_t create_size) {
  struct stat st {};
  bool exists = ::stat(path.c_str(), &st) == 0;
  if (!exists && create_size == 0) {
    return NotFound(fmt::format("image {} does not exist (give --size to create it)", path));
  }
  if (exists && !S_ISREG(st.st_mode)) {
    return InvalidArgument(fmt::format("image {} is not a regular file", path));
  }
  File::Mode mode = read_only ? File::Mode::kReadOnly
                    : exists  ? File::Mode::kReadWrite
                              : File::Mode::kCreateExclusive;
  if (read_only && !exists) {
    return InvalidArgument(fmt::format("cannot create {} read-only", path));
  }
  OSR_ASSIGN_OR_RETURN(File file, File::Open(path, mode));
  if (!exists) OSR_RETURN_IF_ERROR(file.Truncate(create_size));
  OSR_ASSIGN_OR_RETURN(uint64_t size, file.Size());
  if (create_size != 0 && size != create_size) {
    return InvalidArgument(fmt::format("image {} exists with size {} ({} bytes), not {}", path,
                                       FormatSize(size), size, create_size));
  }
  return std::unique_ptr<FileDisk>(new FileDisk(std::move(file), size, read_only));
}

Status FileDisk::Read(uint64_t offset, std::span<uint8_t> buf) {
  return file_.PRead(offset, buf);
}

Status FileDisk::Write(uint64_t offset, std::span<const uint8_t> data) {
  return file_.PWrite(offset, data);
}

Status FileDisk::Zero(uint64_t offset, uint64_t length, ZeroMode mode, bool fast_only) {
  Status st;
  if (mode == ZeroMode::kZeroNoHole) {
    st = file_.ZeroRange(offset, length);
  } else {
    st = file_.PunchHole(offset, length);
    if (!st.ok() && st.code() == Code::kNotSupported) st = file_.ZeroRange(offset, length);
  }
  if (!st.ok() && st.code() == Code::kNotSupported) {
    if (fast_only) return st;
    st = file_.WriteZeroes(offset, length);
  }
  return st;
}

Status FileDisk::Flush() {
  return file_.DataSync();
}

Status FileDisk::Cache(uint64_t offset, uint64_t length) {
  file_.Advise(offset, length, POSIX_FADV_WILLNEED);
  return Status::Ok();
}

Status FileDisk::Grow(uint64_t size) {
  if (read_only_) return Status(Code::kPermissionDenied, "the disk is read-only");
  if (size < size_.load()) return InvalidArgument("a disk only grows");
  OSR_RETURN_IF_ERROR(file_.Truncate(size));
  OSR_RETURN_IF_ERROR(file_.Sync());
  size_.store(size);
  return Status::Ok();
}

Status FileDisk::BlockStatus(uint64_t offset, uint64_t length, size_t extents_max,
                             std::vector<Extent>* out) {
  uint64_t end = offset + length;
  uint64_t pos = offset;
  while (pos < end && out->size() < extents_max) {
    OSR_ASSIGN_OR_RETURN(uint64_t data, file_.SeekData(pos, size_));
    if (data > pos) {  // a hole from pos to data
      uint64_t stop = std::min(data, end);
      out->push_back({stop - pos, kStateHole | kStateZero});
      pos = stop;
      continue;
    }
    OSR_ASSIGN_OR_RETURN(uint64_t hole, file_.SeekHole(pos, size_));
    uint64_t stop = std::min(hole, end);
    if (stop <= pos) stop = end;  // defensive: never loop without progress
    out->push_back({stop - pos, 0});
    pos = stop;
  }
  return Status::Ok();
}

}  // namespace osr::nbd
