// MemDisk: a disk in memory, for unit tests and fuzzing. Zeroed ranges are tracked
// at 4 KiB granularity so that block status has holes to report.
#pragma once

#include <mutex>
#include <vector>

#include "nbd/disk.h"

namespace osr::nbd {

class MemDisk final : public Disk {
 public:
  explicit MemDisk(uint64_t size, bool read_only = false);

  uint64_t size() const override { return data_.size(); }
  bool read_only() const override { return read_only_; }
  Status Read(uint64_t offset, std::span<uint8_t> buf) override;
  Status Write(uint64_t offset, std::span<const uint8_t> data) override;
  Status Zero(uint64_t offset, uint64_t length, ZeroMode mode, bool fast_only) override;
  Status Flush() override;
  Status BlockStatus(uint64_t offset, uint64_t length, size_t extents_max,
                     std::vector<Extent>* out) override;

  int flush_count() const;

 private:
  static constexpr uint64_t kPage = 4096;
  mutable std::mutex mu_;
  std::vector<uint8_t> data_;    // guarded by mu_
  std::vector<bool> allocated_;  // one per kPage; guarded by mu_
  bool read_only_;
  int flushes_ = 0;  // guarded by mu_
};

}  // namespace osr::nbd
