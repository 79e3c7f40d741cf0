// Disk: what the NBD session serves. A plain image file (FileDisk), memory (MemDisk,
// for tests and fuzzing), or an image whose writes are captured (capture::CapturedDisk).
//
// Thread model: every method may be called from many sessions' threads at once.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "common/status.h"

namespace osr::nbd {

struct Extent {
  uint64_t length;
  uint32_t flags;  // kStateHole | kStateZero for base:allocation
};

enum class ZeroMode {
  kTrim,         // NBD_CMD_TRIM: the range may be deallocated; osr makes it read as zeros
  kZeroMayTrim,  // NBD_CMD_WRITE_ZEROES: zeros, deallocating is allowed
  kZeroNoHole,   // NBD_CMD_WRITE_ZEROES with NO_HOLE: zeros, stays allocated
};

class Disk {
 public:
  virtual ~Disk() = default;

  virtual uint64_t size() const = 0;
  virtual bool read_only() const = 0;

  // Reads [offset, offset + buf.size()); the caller has checked the range.
  virtual Status Read(uint64_t offset, std::span<uint8_t> buf) = 0;

  // When a write, trim or zero returns ok, the change is in the image (and, for a
  // capturing disk, captured), so the session may acknowledge it (invariant 2).
  virtual Status Write(uint64_t offset, std::span<const uint8_t> data) = 0;
  // fast_only: fail with kNotSupported rather than write zeros byte by byte.
  virtual Status Zero(uint64_t offset, uint64_t length, ZeroMode mode, bool fast_only) = 0;

  // Makes every change acknowledged before the call durable (FLUSH; FUA uses it too).
  virtual Status Flush() = 0;
  // Makes the disk `size` bytes (larger than now; the new bytes read as zeros) and durable
  // (capture's GrowDisk). kNotSupported for a disk that cannot grow.
  virtual Status Grow(uint64_t size) {
    return Status(Code::kNotSupported, "this disk cannot grow");
  }
  // Hint that [offset, offset+length) will be read soon (NBD_CMD_CACHE).
  virtual Status Cache(uint64_t offset, uint64_t length) { return Status::Ok(); }
  // base:allocation extents covering [offset, offset+length), at most `extents_max`;
  // they may end before offset+length.
  virtual Status BlockStatus(uint64_t offset, uint64_t length, size_t extents_max,
                             std::vector<Extent>* out) = 0;
};

}  // namespace osr::nbd
