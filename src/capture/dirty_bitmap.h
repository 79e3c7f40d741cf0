// DirtyRegionBitmap: a persistent bitmap of the disk's regions whose content may differ
// from what the capture log holds, so that replication must resend them whole.
//
// A bit is set (in a MAP_SHARED mapping of the file, so it survives the process being
// killed) before a write touches the image, and cleared once that write's record is in
// the log file — unless the region is sticky: a region that was dirty when the daemon
// started (a crash left it so), or whose write could not be logged, stays set until
// Clean() (replication's resync will call it). After a host crash (the boot id changed
// while the bitmap was open) every region is dirty: unsynced bits may have been lost.
//
// Thread model: thread-safe; mu_ guards the counters, the sticky set and the mapping.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "capture/range.h"
#include "common/file.h"
#include "common/status.h"

namespace osr::capture {

class DirtyBitmap {
 public:
  static constexpr uint64_t kHeaderBytes = 4096;

  // Opens or creates the bitmap file for a disk of `disk_bytes`.
  static Result<std::unique_ptr<DirtyBitmap>> Open(const std::string& path, uint64_t disk_bytes,
                                                   uint64_t region_bytes);
  // Reads the dirty regions of a bitmap file without opening it for writing.
  static Result<std::vector<Range>> ReadDirty(const std::string& path, uint64_t* region_bytes);
  ~DirtyBitmap();

  // A write to [offset, offset+length) begins / has been logged (or failed to be: then
  // the regions become sticky).
  void Acquire(uint64_t offset, uint64_t length);
  void Release(uint64_t offset, uint64_t length, bool logged);
  // Release for many writes under one lock (the log writer's batches).
  void ReleaseAll(std::span<const Range> ranges, bool logged);
  // Marks regions dirty until Clean().
  void MarkSticky(uint64_t offset, uint64_t length);
  // Clears sticky marks (regions with writes in progress stay set).
  void Clean(uint64_t offset, uint64_t length);
  // The disk grew to disk_bytes: its new regions start clean (durable: msync).
  // kInvalidArgument for a smaller size.
  Status Grow(uint64_t disk_bytes);
  // Makes the bitmap durable (msync).
  Status Sync();
  // Records a clean shutdown; call once no write is in progress.
  Status CloseClean();

  std::vector<Range> DirtyRanges() const;
  bool has_sticky() const;
  uint64_t region_bytes() const { return region_bytes_; }
  bool opened_after_host_crash() const { return host_crash_; }

 private:
  DirtyBitmap() = default;
  void SetBit(uint64_t r, bool v);           // holds mu_
  void SetStickyLocked(uint64_t r, bool v);  // sticky_[r] = v, counted; holds mu_
  bool GetBit(uint64_t r) const;             // holds mu_
  void WriteHeader(uint32_t state);

  std::string path_;
  uint64_t disk_bytes_ = 0;
  uint64_t region_bytes_ = 0;
  uint64_t regions_ = 0;
  uint8_t* map_ = nullptr;
  size_t map_bytes_ = 0;
  Fd fd_;
  bool host_crash_ = false;

  mutable std::mutex mu_;
  std::vector<uint32_t> pending_;  // writes in progress per region; guarded by mu_
  std::vector<bool> sticky_;       // guarded by mu_
  uint64_t sticky_count_ = 0;      // guarded by mu_: how many of sticky_ are set
};

}  // namespace osr::capture
