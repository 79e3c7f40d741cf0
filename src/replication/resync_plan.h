// ResyncPlan: what a resynchronization (or initial copy) copies, in which order, and how
// far it may have gone, kept by the source site so that a copy cut short (a restart of
// either site, a network cut, a full recovery site) goes on where the recovery site's
// staged copy ends instead of from its first byte.
//
// The regions are sent in the plan's order; a position in the copy is a byte count in
// that order (the "cursor"). The recovery store counts the bytes it has staged durably
// the same way and says so in HELLO_OK `staged`; the sender checks that claim against
// its plan (CheckStaged) before it trusts it (STYLE.md habit 15: peers are untrusted).
//
// On disk, in the group's capture folder (docs/formats.md, "Resync plan"):
//   resync.json     the plan's identity and bounds (small; rewritten as the copy goes on)
//   resync.regions  the regions, binary, CRC in resync.json
//
// Thread model: none (values and functions); the Sender serialises their use.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "capture/capture_group.h"
#include "common/status.h"
#include "replication/messages.h"
#include "store/recovery_store.h"

namespace osr::replication {

using DiskRange = capture::CaptureGroup::DiskRange;

// How far ahead of what it sent the sender records its bound (sent_bytes_max), so that
// resync.json is rewritten about once per this many bytes.
inline constexpr uint64_t kResyncSentAheadBytes = 64ull << 20;
// The most regions a plan keeps on disk (a plan with more is kept in memory only: it
// resumes across sessions, not across restarts of the source site).
inline constexpr uint64_t kResyncPlanRegionsMax = 1ull << 22;

struct ResyncPlan {
  std::string group;
  uint64_t epoch = 0;
  uint64_t from = 0;     // RESYNC_BEGIN.from: every record up to it was sent before
  bool initial = false;  // an initial copy (the allocated regions)
  // The capture log's overflow generation the copy holds for: one that changed means
  // writes were tracked only in the bitmaps meanwhile (in this process; not on disk).
  uint64_t generation = 0;
  std::vector<DiskRange> regions;  // in the order they are sent
  uint64_t total_bytes = 0;        // their sum
  // No byte of the copy past this position was sent: recorded (durably, when the plan is
  // on disk) before one is.
  uint64_t sent_bytes_max = 0;
  uint32_t regions_crc = 0;  // of resync.regions as last written (SaveResyncPlan)
  // Read back from the capture folder (a restart, or another Sender of the group): the
  // generation above is of another log instance and says nothing.
  bool from_disk = false;
};

// The plan of a new copy: the regions in order, their total, and a first bound.
ResyncPlan NewResyncPlan(std::string group, uint64_t epoch, uint64_t from, bool initial,
                         uint64_t generation, std::vector<DiskRange> regions);

// Writes the plan to `dir` (the capture folder): resync.regions first when `with_regions`
// (then plan->regions_crc is its CRC), then resync.json, each atomically. kOutOfRange for a
// plan of more than kResyncPlanRegionsMax regions; the file system's errors.
Status SaveResyncPlan(const std::string& dir, ResyncPlan* plan, bool with_regions);
// Reads the plan back; `disks` are the group's disks (every region must lie inside one).
// kNotFound when there is none; kCorruption naming the file and field for a damaged or
// inconsistent one (the caller removes it and starts over).
Result<ResyncPlan> LoadResyncPlan(const std::string& dir,
                                  const std::vector<store::StoreDisk>& disks);
// Removes both files (a missing one is fine); the file system's error otherwise.
Status RemoveResyncPlan(const std::string& dir);

// Whether the recovery site's claim (HELLO_OK `staged`) can be the plan's copy cut short
// at `staged.bytes`: the same `from` and kind, no more bytes than the plan has or this
// site can have sent, and the last staged byte exactly where the plan puts that position.
// kFailedPrecondition for another copy (not an error of the peer: start over);
// kInvalidArgument for a claim that cannot be true of this plan (the peer is wrong).
Status CheckStaged(const ResyncPlan& plan, const HelloStaged& staged,
                   const std::vector<store::StoreDisk>& disks);

// The parts of `dirty` that lie in the plan's first `cursor` bytes, merged per disk and
// in disk, offset order: what was copied before and may have changed since without a
// record.
std::vector<DiskRange> DirtyBeforeCursor(const ResyncPlan& plan, uint64_t cursor,
                                         const std::vector<DiskRange>& dirty);

}  // namespace osr::replication
