#include "capture/dirty_bitmap.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <fstream>

#include "common/crc32c.h"
#include "common/le.h"

namespace osr::capture {

namespace {

constexpr char kMagic[8] = {'O', 'S', 'R', 'D', 'I', 'R', 'T', 'Y'};
constexpr uint32_t kVersion = 1;
constexpr uint32_t kStateClean = 0;
constexpr uint32_t kStateOpen = 1;
// Header layout (little endian):
//   0 magic[8] "OSRDIRTY"   8 version u32   12 header_bytes u32 (4096)
//  16 region_bytes u64     24 disk_bytes u64  32 regions u64
//  40 state u32 (0 clean shutdown, 1 open)  44 reserved u32
//  48 boot_id[40] (NUL padded text of /proc/sys/kernel/random/boot_id)
//  88 crc u32: CRC32C of bytes 0..87
// Bits follow at byte 4096: region r is bit (r % 8) of byte (r / 8).
constexpr size_t kCrcAt = 88;

std::string BootId() {
  std::ifstream f("/proc/sys/kernel/random/boot_id");
  std::string id;
  std::getline(f, id);
  return id.substr(0, 39);
}

struct Header {
  uint64_t region_bytes, disk_bytes, regions;
  uint32_t state;
  std::string boot_id;
};

Result<Header> DecodeHeader(const uint8_t* p, const std::string& path) {
  if (std::memcmp(p, kMagic, 8) != 0) return Corruption(path + ": not a dirty-region bitmap");
  if (Ld32(p + kCrcAt) != Crc32c(p, kCrcAt)) return Corruption(path + ": header CRC mismatch");
  if (Ld32(p + 8) != kVersion) return Corruption(fmt::format("{}: version {}", path, Ld32(p + 8)));
  Header h{Ld64(p + 16), Ld64(p + 24), Ld64(p + 32), Ld32(p + 40),
           std::string(reinterpret_cast<const char*>(p + 48),
                       strnlen(reinterpret_cast<const char*>(p + 48), 40))};
  if (h.region_bytes == 0 || h.regions != (h.disk_bytes + h.region_bytes - 1) / h.region_bytes) {
    return Corruption(path + ": inconsistent header");
  }
  return h;
}

}  // namespace

void DirtyBitmap::WriteHeader(uint32_t state) {
  uint8_t* p = map_;
  std::memset(p, 0, kCrcAt + 4);
  std::memcpy(p, kMagic, 8);
  uint32_t v = kVersion, hb = kHeaderBytes;
  std::memcpy(p + 8, &v, 4);
  std::memcpy(p + 12, &hb, 4);
  std::memcpy(p + 16, &region_bytes_, 8);
  std::memcpy(p + 24, &disk_bytes_, 8);
  std::memcpy(p + 32, &regions_, 8);
  std::memcpy(p + 40, &state, 4);
  std::string id = BootId();
  std::memcpy(p + 48, id.data(), std::min<size_t>(id.size(), 39));
  uint32_t crc = Crc32c(p, kCrcAt);
  std::memcpy(p + kCrcAt, &crc, 4);
}

Result<std::unique_ptr<DirtyBitmap>> DirtyBitmap::Open(const std::string& path, uint64_t disk_bytes,
                                                       uint64_t region_bytes) {
  if (region_bytes < 4096 || (region_bytes & (region_bytes - 1)) != 0) {
    return InvalidArgument(
        fmt::format("region size {} must be a power of two >= 4096", region_bytes));
  }
  std::unique_ptr<DirtyBitmap> b(new DirtyBitmap());
  b->path_ = path;
  // Made here (O_EXCL) or found: a found file with no bytes lost its marks, it is not new.
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  bool fresh = fd >= 0;
  if (fd < 0 && errno == EEXIST) fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(errno, "open " + path);
  b->fd_ = Fd(fd);
  struct stat st {};
  if (::fstat(fd, &st) != 0) return Status::FromErrno(errno, "stat " + path);
  if (!fresh && st.st_size == 0) {
    return Corruption(path + ": empty (the regions it marked dirty are lost)");
  }
  Header old{};
  if (!fresh) {
    if (static_cast<uint64_t>(st.st_size) < kHeaderBytes) return Corruption(path + ": truncated");
    uint8_t hb[kHeaderBytes];
    if (::pread(fd, hb, sizeof hb, 0) != static_cast<ssize_t>(sizeof hb)) {
      return Status::FromErrno(errno, "read " + path);
    }
    OSR_ASSIGN_OR_RETURN(old, DecodeHeader(hb, path));
    // A disk only grows (a crash between a grow of the image and of its bitmap leaves
    // the bitmap smaller): the new regions start clean, their writes come after the grow.
    if (old.disk_bytes > disk_bytes) {
      return InvalidArgument(
          fmt::format("{} tracks a disk of {} bytes, not {}", path, old.disk_bytes, disk_bytes));
    }
    region_bytes = old.region_bytes;  // the file's granularity wins
  }
  b->disk_bytes_ = disk_bytes;
  b->region_bytes_ = region_bytes;
  b->regions_ = (disk_bytes + region_bytes - 1) / region_bytes;
  b->map_bytes_ = kHeaderBytes + (b->regions_ + 7) / 8;
  if (::ftruncate(fd, static_cast<off_t>(b->map_bytes_)) != 0) {
    return Status::FromErrno(errno, "size " + path);
  }
  void* m = ::mmap(nullptr, b->map_bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (m == MAP_FAILED) return Status::FromErrno(errno, "mmap " + path);
  b->map_ = static_cast<uint8_t*>(m);
  b->pending_.assign(b->regions_, 0);
  b->sticky_.assign(b->regions_, false);

  std::lock_guard lock(b->mu_);
  if (!fresh && old.state == kStateOpen && old.boot_id != BootId()) {
    // The host went down while we had the bitmap open: bits set only in the page cache
    // may be lost, so any region may differ. Everything is dirty.
    spdlog::warn(
        "dirty bitmap {}: the host crashed while the disk was open; marking the "
        "whole disk for resynchronization",
        path);
    b->host_crash_ = true;
    for (uint64_t r = 0; r < b->regions_; ++r) b->SetBit(r, true);
  }
  for (uint64_t r = 0; r < b->regions_; ++r) {
    b->sticky_[r] = b->GetBit(r);
    b->sticky_count_ += b->sticky_[r] ? 1 : 0;
  }
  b->WriteHeader(kStateOpen);
  if (::msync(b->map_, b->map_bytes_, MS_SYNC) != 0)
    return Status::FromErrno(errno, "msync " + path);
  return b;
}

Status DirtyBitmap::Grow(uint64_t disk_bytes) {
  std::lock_guard lock(mu_);
  if (disk_bytes < disk_bytes_) return InvalidArgument("a bitmap's disk only grows");
  if (disk_bytes == disk_bytes_) return Status::Ok();
  uint64_t regions = (disk_bytes + region_bytes_ - 1) / region_bytes_;
  size_t map_bytes = kHeaderBytes + (regions + 7) / 8;
  if (map_bytes != map_bytes_) {
    if (::ftruncate(fd_.get(), static_cast<off_t>(map_bytes)) != 0) {
      return Status::FromErrno(errno, "size " + path_);
    }
    void* m = ::mremap(map_, map_bytes_, map_bytes, MREMAP_MAYMOVE);
    if (m == MAP_FAILED) return Status::FromErrno(errno, "mremap " + path_);
    map_ = static_cast<uint8_t*>(m);
    map_bytes_ = map_bytes;
  }
  disk_bytes_ = disk_bytes;
  regions_ = regions;
  pending_.resize(regions, 0);
  sticky_.resize(regions, false);
  WriteHeader(kStateOpen);
  if (::msync(map_, map_bytes_, MS_SYNC) != 0) return Status::FromErrno(errno, "msync " + path_);
  return Status::Ok();
}

DirtyBitmap::~DirtyBitmap() {
  if (map_ != nullptr) ::munmap(map_, map_bytes_);
}

bool DirtyBitmap::GetBit(uint64_t r) const {
  return (map_[kHeaderBytes + r / 8] >> (r % 8)) & 1;
}

void DirtyBitmap::SetBit(uint64_t r, bool v) {
  uint8_t& byte = map_[kHeaderBytes + r / 8];
  uint8_t mask = static_cast<uint8_t>(1u << (r % 8));
  byte = v ? (byte | mask) : (byte & ~mask);
}

void DirtyBitmap::Acquire(uint64_t offset, uint64_t length) {
  if (length == 0) return;
  uint64_t first = offset / region_bytes_, last = (offset + length - 1) / region_bytes_;
  std::lock_guard lock(mu_);
  for (uint64_t r = first; r <= last; ++r) {
    if (pending_[r]++ == 0 && !sticky_[r]) SetBit(r, true);
  }
}

void DirtyBitmap::Release(uint64_t offset, uint64_t length, bool logged) {
  Range r{offset, length};
  ReleaseAll({&r, 1}, logged);
}

void DirtyBitmap::ReleaseAll(std::span<const Range> ranges, bool logged) {
  std::lock_guard lock(mu_);
  for (const Range& x : ranges) {
    if (x.length == 0) continue;
    uint64_t first = x.offset / region_bytes_, last = (x.offset + x.length - 1) / region_bytes_;
    for (uint64_t r = first; r <= last; ++r) {
      OSR_CHECK(pending_[r] > 0);
      if (!logged) SetStickyLocked(r, true);
      if (--pending_[r] == 0 && !sticky_[r]) SetBit(r, false);
    }
  }
}

void DirtyBitmap::MarkSticky(uint64_t offset, uint64_t length) {
  if (length == 0) return;
  uint64_t first = offset / region_bytes_, last = (offset + length - 1) / region_bytes_;
  std::lock_guard lock(mu_);
  for (uint64_t r = first; r <= last; ++r) {
    SetStickyLocked(r, true);
    SetBit(r, true);
  }
}

void DirtyBitmap::Clean(uint64_t offset, uint64_t length) {
  if (length == 0) return;
  uint64_t first = offset / region_bytes_, last = (offset + length - 1) / region_bytes_;
  std::lock_guard lock(mu_);
  for (uint64_t r = first; r <= last; ++r) {
    SetStickyLocked(r, false);
    if (pending_[r] == 0) SetBit(r, false);
  }
}

Status DirtyBitmap::Sync() {
  std::lock_guard lock(mu_);  // Grow may move the mapping
  if (::msync(map_, map_bytes_, MS_SYNC) != 0) return Status::FromErrno(errno, "msync " + path_);
  return Status::Ok();
}

Status DirtyBitmap::CloseClean() {
  {
    std::lock_guard lock(mu_);
    WriteHeader(kStateClean);
  }
  return Sync();
}

void DirtyBitmap::SetStickyLocked(uint64_t r, bool v) {
  if (sticky_[r] == v) return;
  sticky_[r] = v;
  if (v) {
    ++sticky_count_;
  } else {
    OSR_CHECK(sticky_count_ > 0);
    --sticky_count_;
  }
}

bool DirtyBitmap::has_sticky() const {
  // O(1): a sender asks on every pass of its loop, and a 1 TiB disk has 16 M regions.
  std::lock_guard lock(mu_);
  return sticky_count_ > 0;
}

std::vector<Range> DirtyBitmap::DirtyRanges() const {
  std::lock_guard lock(mu_);
  std::vector<Range> out;
  for (uint64_t r = 0; r < regions_; ++r) {
    if (!GetBit(r)) continue;
    uint64_t off = r * region_bytes_;
    uint64_t len = std::min(region_bytes_, disk_bytes_ - off);
    if (!out.empty() && out.back().offset + out.back().length == off) {
      out.back().length += len;
    } else {
      out.push_back({off, len});
    }
  }
  return out;
}

Result<std::vector<Range>> DirtyBitmap::ReadDirty(const std::string& path, uint64_t* region_bytes) {
  OSR_ASSIGN_OR_RETURN(File f, File::Open(path, File::Mode::kReadOnly));
  OSR_ASSIGN_OR_RETURN(uint64_t size, f.Size());
  if (size < kHeaderBytes) return Corruption(path + ": truncated");
  std::vector<uint8_t> buf(size);
  OSR_RETURN_IF_ERROR(f.PRead(0, buf));
  OSR_ASSIGN_OR_RETURN(Header h, DecodeHeader(buf.data(), path));
  if (size < kHeaderBytes + (h.regions + 7) / 8) return Corruption(path + ": truncated bits");
  if (region_bytes) *region_bytes = h.region_bytes;
  std::vector<Range> out;
  bool all = h.state == kStateOpen && h.boot_id != BootId();  // as Open() would decide
  for (uint64_t r = 0; r < h.regions; ++r) {
    bool bit = all || ((buf[kHeaderBytes + r / 8] >> (r % 8)) & 1);
    if (!bit) continue;
    uint64_t off = r * h.region_bytes;
    uint64_t len = std::min(h.region_bytes, h.disk_bytes - off);
    if (!out.empty() && out.back().offset + out.back().length == off) {
      out.back().length += len;
    } else {
      out.push_back({off, len});
    }
  }
  return out;
}

}  // namespace osr::capture
