// CaptureGroup: the disks of one consistency group (a VM) whose every completed WRITE,
// TRIM and WRITE_ZEROES gets the next number of ONE sequence shared by all of them, and is
// recorded in one capture log (invariants 1-3). Each disk is served through disk(i).
//
// Per write: lock the byte range of that disk against overlapping writes in flight; mark
// its regions in the disk's dirty bitmap; write the image; append the record (this hands
// out the sequence number); unlock. Overlapping writes therefore reach the image in
// sequence order, and a write that arrives after another's reply — on any disk of the
// group — gets a higher number. The write may be acknowledged as soon as this returns:
// its record is in the log's buffer and its regions are marked in the bitmap (which
// survives a crash of the process) until the log's writer has put it in a segment file.
//
// Files in the capture directory: the log's segments, dirty-<i>.bitmap per disk, and once
// fenced: fence (the epoch) and fence-fingerprint (what the disks were then).
//
// Ownership: the site's group owns the capture group (unique_ptr), which owns its log,
// bitmaps and disks; each disk (GroupDisk) owns its image (a FileDisk, or a FailoverDisk
// at a failed-over VM) and is shared with the NBD exports that serve it (see disk()).
//
// Thread model: thread-safe. Each disk's range_mu_ guards its in-flight ranges; sync_mu_
// and flush_mu_ make concurrent FLUSHes share one sync (group commit). Log and images are
// synced one after the other: measured here, two fdatasyncs in parallel threads took no
// less device time than in sequence, and cost a thread hand-off.
#pragma once

#include <array>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "capture/capture_log.h"
#include "capture/dirty_bitmap.h"
#include "capture/fence_fingerprint.h"
#include "nbd/disk.h"

namespace osr::capture {

struct CaptureOptions {
  std::string dir;
  uint64_t region_bytes = 64 * 1024;
  uint64_t epoch = 1;
  uint64_t segment_bytes_target = 64ull << 20;
  uint64_t log_bytes_max = UINT64_MAX;  // the capture-log limit (then: bitmap, resync)
  // Track changes in the bitmaps only, from the start (the log takes no record until
  // ResumeAfterOverflow): a failed-over VM before reprotect.
  bool tracking_only = false;
  uint64_t first_seq = 1;  // of a new, empty log (a history reset continues above the store's)
  // The image files of the disks, in disk order: a fence records their fingerprint
  // (fence_fingerprint.h). Empty: no fingerprint is recorded, and reprotect cannot trust
  // the history.
  std::vector<std::string> image_paths;
  // Images that differ from the last clean close's fingerprint are taken as they are
  // (marked dirty whole, resent); without it Open refuses them with kFailedPrecondition
  // (the operator decides: osr vm repair --accept-changes).
  bool accept_outside_changes = false;
  // A disk whose add (AddDisk) a crash may have cut short: its bitmap may be missing (it is
  // made before its record, so no write to the disk can have been marked in a lost one).
  std::optional<uint32_t> disk_being_added;
};

class CaptureGroup {
 public:
  static constexpr int kFenceDrainMsMax = 10000;
  static Result<std::unique_ptr<CaptureGroup>> Open(std::vector<std::unique_ptr<nbd::Disk>> images,
                                                    const CaptureOptions& opts);
  ~CaptureGroup();

  static constexpr uint32_t kDisksMax = 64;
  size_t disk_count() const { return DiskCount(); }
  // Disk i as an NBD disk; shared so that an export can hold it. Lives as long as the
  // group and any holder, but borrows the group (its log, bitmaps, flush): the group must
  // outlive every holder that may still do I/O. The site frees a group only after
  // Server::DisconnectExport said every export of its disks drained (Site::FreeGroup).
  std::shared_ptr<nbd::Disk> disk(size_t i) const;

  // Log write-out + fdatasync, then every image's fdatasync.
  Status Flush();
  // Fencing (invariant 5): from now on writes and trims to the group's disks fail with
  // kPermissionDenied (the VM runs elsewhere at a higher epoch); reads still work.
  // Durable: the epoch is written to <dir>/fence (docs/formats.md, "Capture fence record") and
  // synced before the first write is refused, and Open() reads it back, so a fence holds
  // across restarts whoever applied it (the vault, or the sender on `stale_epoch`).
  // Only raises: an epoch at or below the one in force changes nothing. When the file
  // cannot be written the fence still holds in memory (refusing writes is the safe side)
  // and the error (kIoError, kNoSpace...) is returned for the caller to report.
  // Then, once the writes in flight have finished (at most kFenceDrainMsMax), and with
  // record_fingerprint, the disks' and history's fingerprint is recorded
  // (RecordFenceFingerprint). Re-applying a fence kept elsewhere (site.json, at start)
  // passes false: that is no witness of what the disks were when they were fenced.
  Status Fence(uint64_t epoch, bool record_fingerprint = true);
  uint64_t fenced_epoch() const { return fenced_epoch_; }  // 0: not fenced
  // Records <dir>/fence-fingerprint for the fence in force, from the files as they are
  // now (the log synced first). Called by Fence, and by the site when it stopped a sender
  // that shipped on after the fence (a planned failover: it trims the log and cleans
  // bitmap regions). A failure removes any older fingerprint and is returned: reprotect
  // then compares block hashes. kFailedPrecondition when not fenced.
  Status RecordFenceFingerprint();
  // What differs between the fingerprint recorded at the fence and the files now; empty
  // when they are the same. Records with seq <= `after` are known to the recovery site.
  // No fingerprint, a damaged one or one of another fence is a mismatch too (kNotRecorded,
  // kUnreadable, kOtherFence). disk_names name the disks in the reasons.
  std::vector<FenceMismatch> CheckFenceFingerprint(uint64_t after,
                                                   const std::vector<std::string>& disk_names);

  // Flushes everything and records a clean shutdown. No write may be in progress.
  Status Close();

  // For resynchronization: the regions marked in the disks' bitmaps (a snapshot), and
  // clearing them once the recovery site has their content.
  struct DiskRange {
    uint32_t disk;
    Range range;
  };
  std::vector<DiskRange> DirtyRegions() const;
  // Every byte of every disk, as one region per disk (to resend everything).
  std::vector<DiskRange> WholeDisks() const;
  bool HasStickyRegions() const;
  // What Open found changed in the images since the last clean Close (the close
  // fingerprint: another file, size, mtime, ctime or sampled bytes) and took as they are
  // (accept_outside_changes): those disks are resent whole. Kept until the next resync
  // commits (CleanRegions). Empty: nothing.
  std::vector<std::string> changed_outside() const;
  // Every allocated (non-hole) region of every disk: what an initial sync copies.
  Result<std::vector<DiskRange>> AllocatedRegions() const;
  void CleanRegions(const std::vector<DiskRange>& regions);
  // Marks regions to be resent whole by the next resync (reprotect: what differs from
  // the other site), kept until a resync covering them is committed.
  Status MarkRegions(const std::vector<DiskRange>& regions);
  Status ReadDisk(uint32_t disk, uint64_t offset, std::span<uint8_t> buf);

  // Disk changes while the group runs (docs/formats.md, "Disk changes"). Each appends a
  // disk-size record and syncs the log before any client can reach the new bytes, so the
  // capture order stays one; returns the record's seq. Clients connected before see the
  // new size on their next connection (NBD fixes a size per connection).
  // GrowDisk: disk `disk` (named `name`) grows to size_bytes (kInvalidArgument: not
  // larger; the image's Grow error, e.g. kNotSupported for a failover disk).
  // AddDisk: `image` becomes the next disk (its path for the fingerprints); its bytes
  // as they are now are the disk's first content at the recovery site only through a
  // resync, so add an empty (sparse) image.
  // Both: kUnavailable while the log takes no record (over its limit, tracking only),
  // kPermissionDenied once fenced; nothing changes then.
  Result<uint64_t> GrowDisk(uint32_t disk, const std::string& name, uint64_t size_bytes);
  Result<uint64_t> AddDisk(std::unique_ptr<nbd::Disk> image, const std::string& image_path,
                           const std::string& name);
  // Appends (and syncs) the disk-size record of disk `disk` as it is: a change begun before
  // a crash is recorded again when the group opens, before any client reaches it (a second
  // record of one change is nothing to the recovery site). kUnavailable, kPermissionDenied
  // as above.
  Result<uint64_t> RecordDiskSize(uint32_t disk, const std::string& name, uint64_t size_bytes);

  CaptureLog& log() { return *log_; }
  DirtyBitmap& bitmap(size_t i) { return *bitmaps_[i]; }

 private:
  class GroupDisk;
  class WriteInProgress;
  CaptureGroup() = default;
  // Waits until no write or zero that began before the fence is still running (bounded).
  void DrainWrites();
  Status RecordFingerprintLocked();  // holds fence_mu_
  // Open: compares the images with the close fingerprint. A change is refused
  // (kFailedPrecondition naming it; the fingerprint stays) unless `accept`: then the disks
  // that changed are marked whole. The fingerprint goes (it vouches for one start only).
  Status CheckCloseFingerprint(bool accept);
  FingerprintSources FingerprintSourcesNow() const;

  uint32_t DiskCount() const { return disk_count_.load(std::memory_order_acquire); }

  // Slots [0, disk_count_) are published (stored with release once filled): a published
  // slot never changes, so readers on any thread index it without a lock. AddDisk (under
  // layout_mu_) fills the next one.
  std::array<std::shared_ptr<GroupDisk>, kDisksMax> disks_;
  std::array<std::unique_ptr<DirtyBitmap>, kDisksMax> bitmaps_;
  std::atomic<uint32_t> disk_count_{0};
  mutable std::mutex layout_mu_;  // one disk change at a time; guards image_paths_
  uint64_t region_bytes_ = 0;
  bool fingerprints_ = false;  // image_paths were given: fingerprints are recorded
  std::unique_ptr<CaptureLog> log_;

  std::mutex sync_mu_;  // held while one flush runs; taken before flush_mu_
  std::mutex flush_mu_;
  uint64_t flush_requested_ = 0;  // guarded by flush_mu_
  uint64_t flush_done_ = 0;       // guarded by flush_mu_
  bool closed_ = false;
  std::string dir_;
  std::vector<std::string> image_paths_;
  std::mutex fence_mu_;  // one fence file write at a time
  std::atomic<uint64_t> fenced_epoch_{0};
  bool opened_ = false;  // Open finished: Close may record the close fingerprint
  mutable std::mutex changed_mu_;
  std::vector<std::string> changed_outside_;  // guarded by changed_mu_
  // Writes and zeroes past their fence check and not finished: counted before the check
  // (seq_cst), so a Fence that reads 0 after raising fenced_epoch_ has none to wait for.
  std::atomic<uint64_t> writes_in_progress_{0};
};

std::string BitmapPath(const std::string& capture_dir, size_t disk);

}  // namespace osr::capture
