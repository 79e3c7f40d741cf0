// RecoveryStore: a consistency group's disks at the recovery site, readable as they were
// at any sequence number the store still holds (continuous data protection).
//
//   dir/store.json        the group's disks (name, size), base_seq, epoch and source
//   dir/base/<i>.img      disk i as of base_seq (sparse)
//   dir/journal/          received records with seq > base_seq, in the capture-log format
//                         (one order for all the group's disks; records carry their disk)
//   dir/index/            the version index (RocksDB): which record wrote which bytes
//
// Reading disk d as of seq S (base_seq <= S <= durable_seq): the base image, overlaid
// with the newest version of each byte among the journal records of d with base_seq <
// seq <= S (VersionIndex::Collect). Fold(S) applies the records up to S to the base
// images and forgets them, one journal segment per step, while reads of later seqs go on;
// views opened at an older seq hold Fold back (a view pins its seq). Opening a store costs
// its journal's last segment and the records the index lacks, not its history.
//
// Thread model: thread-safe. mu_ guards the seqs and pins; Append runs on the receiver's
// thread, reads on NBD sessions' threads, Fold on a maintenance thread.
//
// Ownership: shared (shared_ptr) by the site's table of stores, the receiver's session
// for the group, and every view and failover disk opened over it, because each of those
// lets go of it on its own thread (a view goes with the last NBD session that read it).
// The store is freed with its last holder, so a pin is never released into freed memory.
// The site deletes a store's files only once no view or failover disk pins it
// (WaitUnpinned; docs/architecture.md, "Who owns what across threads").
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <shared_mutex>
#include <string>
#include <vector>

#include "capture/capture_log.h"
#include "common/file.h"
#include "common/rw_lock.h"
#include "store/version_index.h"

namespace osr::store {

struct StoreDisk {
  std::string name;
  uint64_t size_bytes = 0;
};

// The largest epoch a store takes: 2^53 - 1, exact in any JSON reader's numbers, and
// far from the wrap of a u64 (a vault raises it by one per failover).
inline constexpr uint64_t kEpochMax = (uint64_t{1} << 53) - 1;

// Who may write a store, as the vault said when it made it (invariant 8: epochs and
// sources come from the vault, never from a sender).
// How a store runs (not persisted: given at every Create and Open).
struct StoreOptions {
  // The journal's segment size, bytes: the unit of a fold step and of trimming.
  uint64_t journal_segment_bytes = 64ull << 20;
};

struct StoreOrigin {
  uint64_t epoch = 1;  // 1..kEpochMax: a sender must present exactly this epoch
  std::string source;  // the sending site's name (its certificate must name it); "": any
                       // site the CA certified
};

// A random id for a journal or a compacted history (store.json journal_id, history_id):
// never 0 (none) nor UINT64_MAX (an index whose history is being rewritten).
uint64_t NewStoreId();

// history/<id>.hist: a compacted-history file of the store in `dir`.
std::string HistoryPath(const std::string& dir, uint64_t id);

class RecoveryStore {
 public:
  // How a new store begins.
  enum class Start {
    kEmpty,         // zero-filled sparse bases; a source with history sends an initial copy
    kFullCopy,      // zero-filled; the source must copy its allocated regions first (reprotect
                    // to a site that has no disk any more)
    kDifferential,  // the bases are `images` (moved in: the old primary's disks at
                    // reprotect); the source resyncs the regions that differ; nothing is
                    // readable until that resync commits
  };
  // Creates a store at base_seq (= durable_seq; the next record is base_seq + 1), at
  // origin.epoch, receiving from origin.source. kInvalidArgument for an epoch outside
  // 1..kEpochMax or a source that is not a valid name.
  static Result<std::unique_ptr<RecoveryStore>> Create(
      const std::string& dir, const std::vector<StoreDisk>& disks, uint64_t base_seq,
      Start start = Start::kEmpty, const std::vector<std::string>& images = {},
      const StoreOrigin& origin = {}, const StoreOptions& options = {});
  // Opens an existing store and rebuilds its index from the journal.
  static Result<std::unique_ptr<RecoveryStore>> Open(const std::string& dir,
                                                     const StoreOptions& options = {});
  ~RecoveryStore();

  // Appends encoded records (header + payload each, as on the wire and on disk), which
  // must continue the sequence; verifies each CRC and range. Durable when it returns.
  // Returns the durable sequence number. All or nothing: a refused or failed append
  // changes nothing (durable_seq, the index, the journal's end and the next seq expected
  // are as before it; the same records can be sent again). kCorruption for a damaged
  // record, kInvalidArgument for one out of order or outside its disk (nothing written);
  // the file system's error for a failed write (kNoSpace: the file system is full),
  // which write_failure() then reports until an append succeeds (after kNoSpace: one that
  // leaves the file system room for what failed).
  Result<uint64_t> Append(std::span<const uint8_t> records);

  // The last write that failed (journal append, resync write or commit, fold), for the
  // site's status: cleared by the next append or resync commit that succeeds, and for
  // kNoSpace only by one after which the file system has `bytes_needed` free: a smaller
  // write that fits while the file system stays full does not make the store look healthy.
  struct WriteFailure {
    std::string what;           // "journal append", "resync write", "resync commit", "fold"
    Status status;              // kNoSpace for a full file system
    uint64_t bytes_needed = 0;  // the bytes the failed write would have added
    int64_t since_ns = 0;       // the first failure since the last success (wall clock)
    uint64_t count = 0;         // failures since the last success
  };
  std::optional<WriteFailure> write_failure() const;

  // Writes straight into a base image (initial replication and resync of whole regions).
  Status WriteBase(uint32_t disk, uint64_t offset, std::span<const uint8_t> data);
  Status SyncBase();

  // Reads disk `disk` as it was at `seq` (base_seq <= seq <= durable_seq).
  Status ReadAt(uint32_t disk, uint64_t seq, uint64_t offset, std::span<uint8_t> buf);

  // Applies records up to min(seq, oldest pin) to the base images and drops them from
  // the index and the journal; returns the new base_seq. Works in steps of one journal
  // segment; reads of seqs above the step go on meanwhile (a step takes fold_mu_ alone only
  // to move base_seq). Crash safe: each step is named in store.json (folding_to) before the
  // base changes and finished at the next open; seqs below it are not readable meanwhile.
  // The file system's error (kNoSpace...) when a step cannot be applied: seqs below that
  // step stay unreadable until a later Fold (or open) applies it.
  Result<uint64_t> Fold(uint64_t seq);

  // Resynchronization (after the source's capture log overflowed): whole regions read
  // from the source disks go to a staging area while records keep coming; views and
  // points at seq <= `from` stay usable meanwhile. Commit folds up to `from`, copies the
  // staged regions into the base, and makes seqs before `consistent_seq` unusable: only
  // from there on does every region reflect the source.
  Status BeginResync(uint64_t from);
  // The first copy of a group into an empty store (protection of disks with a history):
  // the store starts at `from` (its base all zeros so far) and stages the disks' allocated
  // regions like a resync; records after `from` follow.
  Status BeginInitialSync(uint64_t from);
  // Replaces the store's history after its durable seq by a resync from `from` (beyond
  // durable_seq): the source no longer holds the records the store lacks (its journal lost
  // acknowledged records, or it was put back from an older copy). Folds every record into
  // the base, starts the journal over at from + 1 and reads no seq until the resync
  // commits (consistent_from = from + 1 meanwhile). Crash safe: store.json says so first.
  // kInvalidArgument when from <= durable_seq (nothing is missing: BeginResync);
  // kUnavailable while a view or failover disk is open on the store; the file system's.
  Status BeginResyncReplacingHistory(uint64_t from);
  // History compaction between kept points (docs/formats.md, "Compacted history"): once
  // thinning has removed the points between kept ones, the versions of a block that no kept
  // point can see are dropped. Every seq in (base_seq, e] except the kept ones and e itself
  // becomes unreadable (kOutOfRange naming the kept points), where e is the end of the last
  // journal segment wholly at or below `through`; for each kept interval (k_prev, k], the
  // bytes its records left visible at k are written once, as extents of seq k, to history
  // files (history/), and the journal segments up to e go. Reads of kept points, views and
  // later seqs go on meanwhile and read the same bytes. Crash safe: store.json names the
  // history files and the kept points (history_id); an index that does not match is made
  // again at open from the history files and the journal.
  // kInvalidArgument: through beyond durable_seq, or a kept seq that is gone already;
  // kFailedPrecondition: a view or failover disk is open at a seq that would go, or a
  // resync is under way; the file system's errors (nothing changes then).
  struct CompactResult {
    uint64_t compacted_through = 0;  // e
    uint64_t kept_points = 0;        // kept seqs in (base_seq, e), plus e
    uint64_t bytes_before = 0;       // journal + history files, before
    uint64_t bytes_after = 0;        // and after
  };
  Result<CompactResult> Compact(std::vector<uint64_t> keep, uint64_t through);
  // Compact's checks alone (its kInvalidArgument and kFailedPrecondition), changing
  // nothing: a caller that runs Compact later answers bad requests at once.
  Status CheckCompaction(const std::vector<uint64_t>& keep, uint64_t through) const;
  // Fold, but kUnavailable at once while a compaction (or another fold) runs on the store:
  // for callers that must not wait minutes for one (the site's fold route; the vault asks
  // again at its next point). Fold itself makes a compaction under way stop and waits.
  Result<uint64_t> TryFold(uint64_t seq);
  // Makes a compaction under way stop at its next chunk (kCancelled; nothing of it stays)
  // and every later one refuse at once: the store is being closed or deleted.
  void StopMaintenance() { maintenance_stopped_.store(true); }
  uint64_t history_id() const;
  // Seqs up to this one (besides base_seq and the kept ones) were compacted away (0: none).
  uint64_t compacted_through() const;
  // Bytes of the journal and history files.
  uint64_t history_bytes() const;
  // Records that failed their check when read (ReadPayload) since the store opened.
  uint64_t damaged_records() {
    std::lock_guard lock(verified_mu_);
    return damaged_records_;
  }

  // The journal's cut at open (capture::CaptureLog::Cut): records after `after_seq` were
  // lost here and may have been acknowledged; they come again from the source (or a
  // resync replaces them). Cleared by the first append past it.
  std::optional<capture::CaptureLog::Cut> journal_cut() const;
  // Stages a region; on failure nothing is staged (the sender goes on from the last
  // checkpoint, below). Every kStagedCheckpointBytes or kStagedCheckpointMs it checkpoints
  // (CheckpointResync); a failed checkpoint is returned (the region itself is staged).
  // kInvalidArgument when no resync is under way or the region lies outside its disk.
  Status ResyncWrite(uint32_t disk, uint64_t offset, std::span<const uint8_t> data);

  // Resumable resynchronization: the staged regions are kept across sessions and restarts
  // (staging/staged.list, docs/formats.md), so a resync or initial copy cut short (a
  // restart of either site, a cut, a full file system) goes on where it stopped.
  static constexpr uint64_t kStagedCheckpointBytes = 16 << 20;
  static constexpr int64_t kStagedCheckpointMs = 1000;
  // What the resync under way has staged durably.
  struct StagedProgress {
    uint64_t from = 0;        // the seq it started after (RESYNC_BEGIN.from)
    bool initial = false;     // an initial copy
    uint64_t bytes = 0;       // bytes staged durably, counted in the order they came
    uint32_t end_disk = 0;    // where the last of them ends: disk,
    uint64_t end_offset = 0;  // and byte offset after it
  };
  // nullopt when no resync is under way or none of its regions is durably staged (then a
  // sender can only start it over).
  std::optional<StagedProgress> staged_progress() const;
  // Makes every region staged so far durable: syncs the staging images, then appends the
  // regions to the staged list and syncs it. Ok when nothing is pending. The file system's
  // error (the regions stay staged in memory; the durable cursor stays where it was).
  Status CheckpointResync();
  // Goes on with the resync under way from what is durably staged (RESYNC_BEGIN with
  // `resume_bytes`): regions staged after the last checkpoint are forgotten (the sender
  // sends them again). kFailedPrecondition, changing nothing, unless a resync from `from`
  // of the same kind (`initial`) is under way with exactly `staged_bytes` durably staged.
  Status ResumeResync(uint64_t from, bool initial, uint64_t staged_bytes);
  // kNoSpace, changing nothing, when the file system lacks the staged bytes; a copy that
  // fails half-way leaves no seq readable until a resync commits (the base is mixed).
  Status CommitResync(uint64_t consistent_seq);
  bool resyncing() const;
  bool initial_sync_pending() const;
  // A differential store waiting for its first resync (Start::kDifferential).
  bool differential() const;
  // Regions changed by records after `seq` (reprotect: what the failed-over disks lack
  // of what this store received after the failover point), merged per disk.
  // The index's read error.
  Result<std::vector<std::vector<std::pair<uint64_t, uint64_t>>>> ChangedAfter(uint64_t seq) const;
  // Seqs before consistent_from cannot be read (a resync replaced regions of the base).
  uint64_t consistent_from() const;

  // A view at `seq` keeps Fold from passing it until Unpin. Whoever pins holds the store
  // (shared_ptr) at least until it unpins. Pin: the errors of a seq the store cannot read.
  Status Pin(uint64_t seq);
  void Unpin(uint64_t seq);
  // How many pins are held (views and failover disks not yet gone).
  size_t pin_count() const;
  // Waits until no pin is held, at most `wait_max`; returns whether none is.
  bool WaitUnpinned(std::chrono::milliseconds wait_max);

  // Fencing (invariant 5): a sender must present exactly the store's epoch (the
  // receiver compares; a sender never changes it). Only the vault raises it, through
  // the site (failover, reprotect): RaiseEpoch keeps the higher epoch across restarts;
  // the same epoch again changes nothing; a lower one is kPermissionDenied, one above
  // kEpochMax kInvalidArgument.
  Status RaiseEpoch(uint64_t epoch);
  uint64_t epoch() const;
  // The site that sends to this store ("" when the vault did not say).
  const std::string& source() const { return source_; }

  uint64_t base_seq() const;
  uint64_t durable_seq() const;
  // When the write at durable_seq was accepted at the source (ns since the epoch; 0 if
  // unknown, e.g. right after opening a store whose journal is empty).
  int64_t durable_time_ns() const;
  // The group's disks as they are after every record the store has taken (a disk added
  // or grown by a disk-size record, docs/formats.md "Disk changes"), in the group's order.
  std::vector<StoreDisk> disks() const;
  // The disks as they were at `seq`: a disk added after it is not there, one grown after
  // it has its old size. A view or failover at `seq` shows exactly these.
  std::vector<StoreDisk> DisksAt(uint64_t seq) const;
  // One disk at `seq`; kNotFound when it did not exist then (or at all).
  Result<StoreDisk> DiskAt(uint32_t disk, uint64_t seq) const;
  // A disk added or grown at `seq`: `was_bytes` 0 for an added disk. Sizes only grow.
  struct DiskChange {
    uint64_t seq = 0;
    uint32_t disk = 0;
    std::string name;
    uint64_t was_bytes = 0;
    uint64_t size_bytes = 0;
  };
  std::vector<DiskChange> disk_changes() const;
  // A first copy, or a history replaced, after seq `from`: the disks become `disks` (the
  // sender's, as its HELLO states them), as changes at `from` — the same disks in order,
  // none smaller, maybe more. Changes recorded after `from` go (the journal starts over
  // after it). kInvalidArgument for disks that are not such a layout; nothing changes.
  Status AdoptDisks(uint64_t from, const std::vector<StoreDisk>& disks);
  static constexpr uint32_t kDisksMax = 64;  // disks of one group, added ones included
  // The largest disk a change may ask for: 2^50 bytes (1 PiB), far inside every offset
  // computation's u64.
  static constexpr uint64_t kDiskBytesMax = uint64_t{1} << 50;
  const std::string& dir() const { return dir_; }

  // Tests: called by each fold step after its records are in the base (synced) and before
  // base_seq moves, on the folding thread; an error ends the step there, as a failed write
  // would (seqs below the step stay unreadable; the next fold or open finishes it).
  void SetFoldStepHookForTest(std::function<Status(uint64_t target)> hook) {
    fold_step_hook_ = std::move(hook);
  }
  // Tests: called by Compact on its thread after each of these steps (a copy of the store
  // made in the hook is what a kill at that instant leaves; with the power-loss recorder
  // on, its image is what a power loss leaves).
  enum class CompactionStep {
    kMarked,     // the index holds the compaction under way; no file is written yet
    kWritten,    // its files are written and synced, their entries in the index (synced)
    kCommitted,  // store.json names the new history
    kDropped,    // the index no longer holds the entries the new files replace
    kIndexed,    // the index describes the new history; old files not yet removed
  };
  void SetCompactionStepHookForTest(std::function<void(CompactionStep)> hook) {
    compaction_step_hook_ = std::move(hook);
  }

 private:
  RecoveryStore() = default;
  Status OpenParts();
  Status OpenIndex();
  // kCorruption when store.json's fold or compaction state cannot be true of this journal
  // and these history files (checked before any file is removed on its word).
  Status CheckHistoryState();
  // store.json from the fields (the disks: `layout`, or the slots when null).
  Status WriteMeta(const std::vector<StoreDisk>* layout = nullptr);
  // Fold: the next step's end (nullopt: nothing to fold), which it makes unreadable below
  // (fold_target_); then the step itself; FinishInterruptedFold at open.
  Result<std::optional<uint64_t>> PlanFoldStep(uint64_t seq);
  Status FoldStep(uint64_t target);
  Status FinishInterruptedFold();
  // Applies the index's entries in (from, target] to the base (compacted history).
  Status ApplyFromIndex(uint64_t from, uint64_t target);
  // Compaction's plan, made under mu_ from the journal's segment ends (SegmentEnds).
  struct CompactionPlan {
    uint64_t e = 0;                // compacted_through after it
    uint64_t lo = 0;               // intervals up to lo stay as they are
    std::set<uint64_t> kept;       // kept seqs in (base_seq, e)
    std::vector<uint64_t> bounds;  // kept seqs in (lo, e), then e
  };
  // nullopt: nothing is held below a segment end.
  Result<std::optional<CompactionPlan>> PlanCompactionLocked(
      const std::vector<uint64_t>& keep, uint64_t through,
      const std::vector<uint64_t>& segment_ends) const;
  // The last seq of each journal segment but the last.
  Result<std::vector<uint64_t>> SegmentEnds() const;
  // Compaction's parts: the history files of the bounds in (lo, e], written and indexed.
  struct HistoryFile {
    uint64_t id;
    uint64_t seq;  // the kept point its extents belong to
  };
  Status WriteHistory(uint64_t lo, const std::vector<uint64_t>& bounds,
                      std::vector<HistoryFile>* files);
  // Indexes the history files named by store.json (at open, when the index does not match).
  Status IndexHistory();
  // At open, a compaction the index says was under way: undone (store.json names the
  // history it started from) or finished (store.json names the one it made), touching
  // only the index entries of its range. false when `p` fits neither: the caller indexes
  // the history again. The index's error.
  Result<bool> EndInterruptedCompaction(const VersionIndex::PendingCompaction& p);
  // Removes journal segments wholly at or below compacted_through_ and history files
  // store.json does not name (after a compaction, or at open after one cut short).
  void RemoveCompactedFiles();
  // The journal segment starting at first_seq, opened for reading (kept open, at most
  // kOpenSegmentsMax at once).
  Result<std::shared_ptr<const File>> Segment(uint64_t first_seq, bool history = false);
  static constexpr uint64_t kHistoryKeyBit = uint64_t{1} << 63;  // segments_ keys of history
  void OnWritten(std::span<const capture::CaptureLog::Written> records, bool ok);
  // Bytes [offset, offset + out.size()) of r's payload. The first read of a record reads it
  // whole and checks its header (magic, seq, disk, range) and CRC (docs/formats.md, "Capture
  // log"); later reads of it read only their part (verified_, bounded). kCorruption naming
  // the file and record when the check fails (the bytes are never served); the file's
  // errors.
  Status ReadPayload(const RecordRef& r, uint64_t offset, std::span<uint8_t> out);
  // Checks the record r whole, reading it from `seg`; when Ok and `part` is set, copies
  // bytes [offset, offset + part->size()) of its payload there.
  Status VerifyRecord(const File& seg, const RecordRef& r, uint64_t offset,
                      std::span<uint8_t>* part);
  // A record's key in verified_ and damaged_: (segments_ key, payload_pos).
  static std::pair<uint64_t, uint64_t> VerifiedKey(const RecordRef& r);
  // Forgets which records were checked (their files went or may be written anew).
  void ForgetVerified();
  Status UsableLocked(uint64_t seq) const;  // holds mu_
  Status BeginResyncLocked(uint64_t from);  // takes mu_; holds staged_mu_
  // Reads back staging/staged.list of the resync under way (at Open); a list that is
  // missing, damaged or of another resync leaves nothing staged (it starts over).
  void LoadStaged();
  Status LoadStagedList();          // holds staged_mu_
  Status CheckpointResyncLocked();  // holds staged_mu_
  // Deletes the journal and opens a new, empty one whose first record is `first_seq`.
  // Holds append_mu_ (or is opening the store).
  Status StartJournalAt(uint64_t first_seq);
  // Checks an append's records against the sequence (expected first seq `expect`) and the
  // disks; fills `out` with each record's bytes. Returns the last record's time_ns.
  Result<int64_t> CheckRecords(std::span<const uint8_t> records, uint64_t expect,
                               std::vector<DiskChange>* changes,
                               std::vector<std::span<const uint8_t>>* out) const;
  // Undoes a failed append: the journal back to `end`, the index forgets what follows.
  Status RollBackAppend(const capture::CaptureLog::End& end);
  // Remembers a failed write for write_failure(); returns `st` with `what` in front.
  Status NoteWriteFailure(std::string what, const Status& st, uint64_t bytes_needed);
  // After a write that succeeded: forgets write_failure_ unless it was kNoSpace and the file
  // system still has less free than it needed (statvfs). Requires mu_.
  void ClearWriteFailureIfOver();

  std::string dir_;
  StoreOptions options_;
  std::function<Status(uint64_t)> fold_step_hook_;  // set before use, by tests only
  std::string source_;                              // persisted in store.json; set at creation only
  // Set before use, by tests only.
  std::function<void(CompactionStep)> compaction_step_hook_;
  // The disks: slots [0, disk_count_) are published (disk_count_ is stored with release
  // after a slot is filled, loaded with acquire): a published slot's name and base never
  // change, its size only grows (a disk-size record). Fixed capacity, so that readers on
  // any thread index it without a lock while Append (holding append_mu_) adds a disk.
  struct DiskSlot {
    std::string name;
    std::atomic<uint64_t> size_bytes{0};
    File base;  // the disk as of base_seq; positional I/O only
  };
  std::array<DiskSlot, kDisksMax> slots_;
  std::atomic<uint32_t> disk_count_{0};
  uint32_t DiskCount() const { return disk_count_.load(std::memory_order_acquire); }
  uint64_t DiskBytes(uint32_t d) const { return slots_[d].size_bytes.load(); }
  std::vector<DiskChange> disk_changes_;  // guarded by mu_; persisted (disk_changes), by seq
  // Takes the disk-size records of an append that passed CheckRecords before its journal
  // write: adds or grows the bases (synced) and records the changes in store.json. Holds
  // append_mu_. A change already recorded at the same seq (a resend) is taken again only
  // when identical.
  Status ApplyDiskChanges(uint64_t first_seq, const std::vector<DiskChange>& changes);
  void SetDisks(const std::vector<StoreDisk>& disks);             // at Create and Open only
  uint64_t DiskBytesAtLocked(uint32_t disk, uint64_t seq) const;  // holds mu_; 0: not there
  // The disks without the changes at first_seq or later (takes mu_).
  std::vector<StoreDisk> DisksBefore(uint64_t first_seq) const;
  // The change a disk-size record asks for, checked against `sizes` (the disks' sizes
  // before it, in order; updated).
  Status CheckDiskChange(const capture::RecordHeader& h, std::span<const uint8_t> name,
                         std::vector<std::pair<std::string, uint64_t>>* sizes,
                         std::vector<DiskChange>* out) const;
  std::unique_ptr<capture::CaptureLog> journal_;

  std::mutex append_mu_;  // one Append at a time

  // Readers hold fold_mu_ shared; a fold step holds it alone only to move base_seq_ (and
  // to let reads that began before it planned end); a resync commit while it copies.
  // Writer first, so that reads without pause cannot hold a fold or compaction off. Never
  // nested: ReadAt alone takes it shared, and calls nothing that takes it again.
  mutable WriterFirstSharedMutex fold_mu_;
  std::atomic<bool> maintenance_stopped_{false};  // StopMaintenance
  std::atomic<int> fold_waiters_{0};              // Folds waiting for fold_run_mu_
  // A compaction stops (kCancelled, nothing of it stays) when the store closes or a fold
  // (a resync's commit, retention) waits for it.
  bool CompactionMustStop() const {
    return maintenance_stopped_.load() || fold_waiters_.load() > 0;
  }
  std::mutex fold_run_mu_;  // one Fold at a time

  static constexpr size_t kIndexBatchRecords = 4096;  // records per index batch at open
  static constexpr size_t kOpenSegmentsMax = 64;      // journal segments kept open to read

  std::unique_ptr<VersionIndex> index_;  // thread-safe itself

  mutable std::mutex mu_;
  Status index_error_;        // guarded by mu_: OnWritten's failure
  uint64_t fold_target_ = 0;  // guarded by mu_; folding_to
  uint64_t journal_id_ = 0;   // guarded by mu_; persisted (journal_id): the journal's identity
  // Compacted history, all guarded by mu_ and persisted: seqs in (base_seq_,
  // compacted_through_) other than kept_ are gone; history_ the files (id -> seq).
  uint64_t compacted_through_ = 0;
  std::set<uint64_t> kept_;
  std::map<uint64_t, uint64_t> history_;
  uint64_t next_history_file_ = 1;
  uint64_t history_id_ = 0;                              // 0: no compacted history
  uint64_t base_seq_ = 0;                                // guarded by mu_
  uint64_t durable_seq_ = 0;                             // guarded by mu_
  int64_t durable_time_ns_ = 0;                          // guarded by mu_
  uint64_t consistent_from_ = 0;                         // guarded by mu_; persisted in store.json
  uint64_t epoch_ = 0;                                   // guarded by mu_; persisted in store.json
  bool resyncing_ = false;                               // guarded by mu_
  std::optional<capture::CaptureLog::Cut> journal_cut_;  // guarded by mu_
  bool initial_sync_ = false;  // guarded by mu_; an initial sync under way
  bool differential_ = false;  // guarded by mu_; persisted
  uint64_t resync_from_ = 0;   // guarded by mu_
  std::vector<File> staging_;  // per disk, while resyncing; guarded by mu_
  std::vector<std::vector<std::pair<uint64_t, uint64_t>>> staged_;  // guarded by mu_
  // The staged list (one writer: the group's receiver session; taken before fold_mu_ and
  // mu_). staged_ holds the durable regions, then the pending ones (staged since the last
  // checkpoint, in the order they came: the newest of each disk's entries in staged_).
  std::mutex staged_mu_;
  struct StagedRegion {
    uint32_t disk;
    uint64_t offset;
    uint64_t length;
  };
  File staged_list_;                              // guarded by staged_mu_; invalid: none
  uint64_t staged_list_bytes_ = 0;                // guarded by staged_mu_: its length
  int64_t staged_checkpoint_ns_ = 0;              // guarded by staged_mu_: steady clock
  std::vector<StagedRegion> staged_pending_;      // guarded by mu_
  uint64_t staged_pending_bytes_ = 0;             // guarded by mu_
  std::optional<StagedProgress> staged_durable_;  // guarded by mu_
  std::multiset<uint64_t> pins_;                  // guarded by mu_
  std::condition_variable unpinned_cv_;           // with mu_: signalled when pins_ becomes empty
  // first_seq -> open journal segment; guarded by mu_ (a reader holds its shared_ptr)
  std::map<uint64_t, std::shared_ptr<const File>> segments_;
  // Records whose CRC was checked, as (segments_ key, payload_pos): at most kVerifiedMax,
  // the oldest checked forgotten first (a 4 KiB-record churn's random reads hit it little;
  // what it saves is re-reading a large record whole for each of its 4 KiB parts).
  static constexpr size_t kVerifiedMax = 32768;
  static constexpr uint64_t kVerifyPieceBytes = 1 << 20;  // read and checked at a time
  std::mutex verified_mu_;
  std::set<std::pair<uint64_t, uint64_t>> verified_;
  std::deque<std::pair<uint64_t, uint64_t>> verified_order_;
  // Records that failed the check (guarded by verified_mu_): the first kDamagedKeptMax by
  // key, so that one read again and again counts once.
  static constexpr size_t kDamagedKeptMax = 4096;
  std::set<std::pair<uint64_t, uint64_t>> damaged_;
  uint64_t damaged_records_ = 0;
  std::optional<WriteFailure> write_failure_;  // guarded by mu_
};

}  // namespace osr::store
