#include "nbd/mem_disk.h"

#include <algorithm>
#include <cstring>

#include "nbd/protocol.h"

namespace osr::nbd {

MemDisk::MemDisk(uint64_t size, bool read_only)
    : data_(size, 0), allocated_((size + kPage - 1) / kPage, false), read_only_(read_only) {}

Status MemDisk::Read(uint64_t offset, std::span<uint8_t> buf) {
  std::lock_guard lock(mu_);
  OSR_CHECK(offset + buf.size() <= data_.size());
  std::memcpy(buf.data(), data_.data() + offset, buf.size());
  return Status::Ok();
}

Status MemDisk::Write(uint64_t offset, std::span<const uint8_t> data) {
  std::lock_guard lock(mu_);
  OSR_CHECK(offset + data.size() <= data_.size());
  std::memcpy(data_.data() + offset, data.data(), data.size());
  for (uint64_t p = offset / kPage; p * kPage < offset + data.size(); ++p) allocated_[p] = true;
  return Status::Ok();
}

Status MemDisk::Zero(uint64_t offset, uint64_t length, ZeroMode mode, bool) {
  std::lock_guard lock(mu_);
  OSR_CHECK(offset + length <= data_.size());
  std::memset(data_.data() + offset, 0, length);
  if (mode != ZeroMode::kZeroNoHole) {
    // Whole pages inside the range become holes.
    for (uint64_t p = (offset + kPage - 1) / kPage; (p + 1) * kPage <= offset + length; ++p) {
      allocated_[p] = false;
    }
  }
  return Status::Ok();
}

Status MemDisk::Flush() {
  std::lock_guard lock(mu_);
  ++flushes_;
  return Status::Ok();
}

int MemDisk::flush_count() const {
  std::lock_guard lock(mu_);
  return flushes_;
}

Status MemDisk::BlockStatus(uint64_t offset, uint64_t length, size_t extents_max,
                            std::vector<Extent>* out) {
  std::lock_guard lock(mu_);
  uint64_t end = std::min<uint64_t>(offset + length, data_.size());
  uint64_t pos = offset;
  while (pos < end && out->size() < extents_max) {
    bool alloc = allocated_[pos / kPage];
    uint64_t next = std::min((pos / kPage + 1) * kPage, end);
    while (next < end && allocated_[next / kPage] == alloc) {
      next = std::min(next + kPage, end);
    }
    out->push_back({next - pos, alloc ? 0u : (kStateHole | kStateZero)});
    pos = next;
  }
  return Status::Ok();
}

}  // namespace osr::nbd
