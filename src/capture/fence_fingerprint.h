// FenceFingerprint: what a group's disks and capture history were when it was fenced, so
// that reprotect can tell whether they are still exactly that before it trusts the
// history ("exact" mode ships only the records the recovery site never got and the
// regions marked dirty). An image written outside osr, restored from a backup or
// replaced, a capture log segment removed or cut, a bitmap replaced: each makes exact
// mode ship too little, and the two sites would silently differ. Then the vault
// compares block hashes instead.
//
// What is recorded (docs/formats.md, "Fence fingerprint"): the capture log's last seq and
// its segment files (first seq, inode); per disk the image file's device, inode, size,
// mtime and ctime, an XXH3-64 of kFingerprintSamples blocks at offsets drawn from the
// recorded seed (the first and last block among them), and an XXH3-64 of the regions its
// dirty bitmap marks. ctime cannot be set back by a user (utime sets it to now), so it
// catches a write whose mtime was restored; the inode catches a file replaced by a copy.
// Kept in <capture dir>/fence-fingerprint, next to the fence record.
//
// Thread model: none (values and files; the caller keeps the group still).
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "capture/dirty_bitmap.h"
#include "common/status.h"
#include "nbd/disk.h"

namespace osr::capture {

inline constexpr uint64_t kFingerprintVersion = 1;
inline constexpr size_t kFingerprintSamples = 64;  // blocks per disk (first and last included)
inline constexpr uint64_t kFingerprintBlockBytes = 4096;
inline constexpr size_t kFingerprintBytesMax = 4u << 20;  // the file; refused when larger

struct ImageStamp {
  uint64_t device = 0;
  uint64_t inode = 0;
  uint64_t size_bytes = 0;
  int64_t mtime_ns = 0;
  int64_t ctime_ns = 0;
  uint64_t sample_xxh3 = 0;  // of the sampled blocks, in the order drawn
  uint64_t dirty_bytes = 0;  // the regions the disk's dirty bitmap marks ...
  uint64_t dirty_xxh3 = 0;   // ... and an XXH3-64 of them (offset, length; little endian)
  bool operator==(const ImageStamp&) const = default;
};

struct SegmentStamp {
  uint64_t first_seq = 0;
  uint64_t inode = 0;
  bool operator==(const SegmentStamp&) const = default;
};

struct FenceFingerprint {
  uint64_t fenced_epoch = 0;
  int64_t time_ns = 0;  // wall clock when it was taken (shown to people only)
  uint64_t sample_seed = 0;
  uint64_t log_last_seq = 0;
  std::vector<SegmentStamp> segments;  // by first_seq
  std::vector<ImageStamp> disks;       // in the group's disk order
};

// What a fingerprint is taken from, borrowed for the call. One entry per disk in each of
// image_paths, disks and bitmaps.
struct FingerprintSources {
  std::vector<std::string> image_paths;  // stat()ed
  std::vector<nbd::Disk*> disks;         // sampled through Read
  std::vector<const DirtyBitmap*> bitmaps;
  std::string log_dir;
  uint64_t log_last_seq = 0;  // the log's last seq, written out and synced
};

// Takes a fingerprint now. Errors: the stat or read error of a file (its path named),
// kInvalidArgument when the sources' lists differ in length.
Result<FenceFingerprint> TakeFingerprint(const FingerprintSources& src, uint64_t fenced_epoch,
                                         uint64_t sample_seed, int64_t time_ns);

// Why a fingerprint does not vouch for a group now. Names only at the edge
// (FenceCheckName); what the operator reads is the mismatch's reason.
enum class FenceCheck {
  kNotRecorded,         // no fingerprint was recorded for this fence
  kUnreadable,          // the fingerprint file is not one
  kOtherFence,          // it was recorded at another epoch
  kDiskCount,           // it has another number of disks than the group
  kImageReplaced,       // another file (device or inode) than at the fence
  kImageSize,           // another size
  kImageModified,       // another mtime: written (or touched) after the fence
  kImageChanged,        // another ctime: written, or its metadata changed, after the fence
  kImageContent,        // the sampled blocks hold other bytes
  kBitmapChanged,       // the dirty bitmap marks other regions
  kLogEnd,              // the capture log ends at another seq
  kLogSegmentMissing,   // a segment that held records after `after` is gone
  kLogSegmentReplaced,  // ... is another file (inode)
  kLogSegmentAdded,     // a segment holding records that was not there
};
std::string_view FenceCheckName(FenceCheck check);

struct FenceMismatch {
  FenceCheck check;
  int disk = -1;       // the disk concerned, or -1
  std::string reason;  // a noun phrase that reads after "the old primary's ...": "disk os was
                       // changed after the fence (ctime ..., at the fence ...)"
  nlohmann::json Json(const std::vector<std::string>& disk_names) const;
};

// Compares a fingerprint recorded at the fence with one taken now (same seed). Records
// with seq <= `after` are held elsewhere (the recovery site had them): a segment holding
// only those may have been trimmed since. disk_names name the disks in reasons ("disk 0"
// when missing). Empty: nothing differs.
std::vector<FenceMismatch> CompareFingerprints(const FenceFingerprint& at_fence,
                                               const FenceFingerprint& now, uint64_t after,
                                               const std::vector<std::string>& disk_names);

// The file names a fingerprint is kept under in the capture folder: at a fence, and at a
// clean close (CaptureGroup::Close; checked and removed by the next Open).
inline constexpr std::string_view kFenceFingerprintName = "fence-fingerprint";
inline constexpr std::string_view kCloseFingerprintName = "close-fingerprint";
std::string FingerprintPath(const std::string& capture_dir,
                            std::string_view name = kFenceFingerprintName);
nlohmann::json FingerprintJson(const FenceFingerprint& fp);
// Parses a fingerprint's JSON (a file osr wrote, but read back as a peer's: json_in).
// kCorruption naming the field.
Result<FenceFingerprint> ParseFingerprint(const nlohmann::json& j);
// Writes <capture_dir>/fence-fingerprint atomically and durably.
Status WriteFingerprint(const std::string& capture_dir, const FenceFingerprint& fp,
                        std::string_view name = kFenceFingerprintName);
// nullopt when there is none; kCorruption when the file is not a fingerprint; the read
// error otherwise.
Result<std::optional<FenceFingerprint>> ReadFingerprint(
    const std::string& capture_dir, std::string_view name = kFenceFingerprintName);
// Removes it (a fence that cannot vouch for the disks). Errors: the unlink's.
Status RemoveFingerprint(const std::string& capture_dir,
                         std::string_view name = kFenceFingerprintName);

}  // namespace osr::capture
