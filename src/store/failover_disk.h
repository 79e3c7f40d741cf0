// FailoverDisk: a failed-over VM's disk at the recovery site. It starts as the recovery
// point's view (no data copied: invariant 6) and takes the VM's writes into its own sparse
// image file, copy-on-write in whole regions; the file and a map of the regions it holds
// survive restarts, so the VM can run on it for as long as the operator needs.
// Materialise() (commit) copies every region it does not hold yet from the point, in the
// background while the VM runs; then the image stands alone, the point's pin is released
// and the recovery store may go.
//
//   <image>          the disk (sparse; only regions marked in the map are meaningful)
//   <image>.cow      the map: regions the image holds (format in docs/formats.md,
//                    "Failover disk region map"); all held once materialised (the site
//                    deletes it when it has recorded that the disk is a plain image)
//
// Crash safety: a region's bit is set only after its bytes are in the image, and the map
// is written (atomically, after an fdatasync of the image) by Flush. After a crash, a
// region first written since the last flush reads from the point again, as an unflushed
// write may; a flushed write is never lost.
//
// Thread model: thread-safe. Region bits are atomics (reads take no lock); mu_ serialises
// copy-on-write, materialising and map writes; base_mu_ keeps the store readable while a
// read of the point is in flight and Materialise() waits for it before letting go.
//
// Ownership: the capture group's disk (GroupDisk) that serves it owns it (unique_ptr), so
// it lives as long as that disk: the capture group and any NBD export still holding it.
// The site's Group keeps plain pointers to it, valid while its capture group lives. The
// disk shares its store (shared_ptr) until it is materialised: it pins its point, and the
// store must outlive the pin, whichever of the site or the disk lets go last.
// Materialise() unpins and drops the store.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <vector>

#include "common/file.h"
#include "nbd/disk.h"
#include "store/recovery_store.h"

namespace osr::store {

class FailoverDisk final : public nbd::Disk {
 public:
  static constexpr uint32_t kMapVersion = 1;

  // Opens (or creates, with an empty map) the disk at `image_path` over `store`'s disk
  // `disk` at `seq`, which it pins (sharing the store until materialised). A map written for
  // another seq, size or region size is kCorruption; a disk the store lacks or a bad region
  // size kInvalidArgument; Pin's errors for a seq the store cannot read.
  static Result<std::unique_ptr<FailoverDisk>> Open(const std::string& image_path,
                                                    std::shared_ptr<RecoveryStore> store,
                                                    uint32_t disk, uint64_t seq,
                                                    uint64_t region_bytes);
  ~FailoverDisk() override;

  uint64_t size() const override { return size_; }
  bool read_only() const override { return false; }
  Status Read(uint64_t offset, std::span<uint8_t> buf) override;
  Status Write(uint64_t offset, std::span<const uint8_t> data) override;
  Status Zero(uint64_t offset, uint64_t length, nbd::ZeroMode mode, bool fast_only) override;
  Status Flush() override;
  Status BlockStatus(uint64_t offset, uint64_t length, size_t extents_max,
                     std::vector<nbd::Extent>* out) override;

  // Copies every region not held yet (skipping ones that read as zeros: the image stays
  // sparse), then flushes (the map: all held) and releases the point. `progress(done, total)`
  // in bytes; `stop` ends it early (kUnavailable; what was copied stays).
  Status Materialise(const std::function<void(uint64_t, uint64_t)>& progress,
                     const std::atomic<bool>& stop);
  bool materialised() const { return materialised_; }
  uint64_t held_bytes() const;
  uint64_t seq() const { return seq_; }

 private:
  FailoverDisk(File image, std::string map_path, std::shared_ptr<RecoveryStore> store,
               uint32_t disk, uint64_t seq, uint64_t size, uint64_t region_bytes);
  bool Held(uint64_t region) const {
    return (bits_[region / 64].load(std::memory_order_acquire) >> (region % 64)) & 1;
  }
  void SetHeld(uint64_t region);
  // Copies the point's bytes of `region` into the image unless held; holds mu_.
  Status OwnLocked(uint64_t region);
  // Makes the regions that [offset, offset+length) covers only in part held (their other
  // bytes must come from the point); returns the regions it covers whole.
  Result<std::pair<uint64_t, uint64_t>> Prepare(uint64_t offset, uint64_t length);
  // Ends a write: the regions it covered whole are held if it succeeded.
  void Finish(std::pair<uint64_t, uint64_t> whole, bool ok);
  bool BeingWrittenLocked(uint64_t region) const;  // holds mu_
  Status WriteMapLocked();                         // holds mu_
  Status ReadPoint(uint64_t offset, std::span<uint8_t> buf);

  File image_;
  const std::string map_path_;
  const uint32_t disk_;
  const uint64_t seq_;
  const uint64_t size_;
  const uint64_t region_bytes_;
  const uint64_t regions_;

  std::shared_mutex base_mu_;
  // guarded by base_mu_; nullptr once materialised. Shared: see the file comment.
  std::shared_ptr<RecoveryStore> store_;
  bool pinned_ = false;  // the point is pinned (set once by Open)

  std::mutex mu_;
  std::vector<std::atomic<uint64_t>> bits_;
  std::vector<std::pair<uint64_t, uint64_t>> writing_;  // guarded by mu_: whole-region writes
  uint64_t map_generation_ = 0;                         // guarded by mu_: bumped by every SetHeld
  uint64_t map_written_ = 0;  // guarded by mu_: generation the map file has
  std::atomic<bool> materialised_{false};
};

}  // namespace osr::store
