// FileDisk: a raw image file served as a disk (page cache, like qemu-nbd's
// cache=writeback and nbdkit's file plugin by default).
#pragma once

#include <atomic>
#include <memory>
#include <string>

#include "common/file.h"
#include "nbd/disk.h"

namespace osr::nbd {

class FileDisk final : public Disk {
 public:
  // Opens `path`; with create_size > 0 a missing image is created sparse with that size,
  // and an existing one must have that size.
  static Result<std::unique_ptr<FileDisk>> Open(const std::string& path, bool read_only,
                                                uint64_t create_size);

  uint64_t size() const override { return size_.load(); }
  bool read_only() const override { return read_only_; }
  Status Read(uint64_t offset, std::span<uint8_t> buf) override;
  Status Write(uint64_t offset, std::span<const uint8_t> data) override;
  Status Zero(uint64_t offset, uint64_t length, ZeroMode mode, bool fast_only) override;
  Status Flush() override;
  Status Grow(uint64_t size) override;  // ftruncate, then fsync
  Status Cache(uint64_t offset, uint64_t length) override;
  Status BlockStatus(uint64_t offset, uint64_t length, size_t extents_max,
                     std::vector<Extent>* out) override;

  File& file() { return file_; }

 private:
  FileDisk(File file, uint64_t size, bool read_only)
      : file_(std::move(file)), size_(size), read_only_(read_only) {}
  File file_;
  std::atomic<uint64_t> size_;
  bool read_only_;
};

}  // namespace osr::nbd
