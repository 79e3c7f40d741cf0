// CaptureLog: the append-only, segmented log of a disk's writes, in sequence order.
//
// Appends go to an in-memory buffer under mu_ (sequence numbers are handed out there,
// so the buffer is always in sequence order). The log's writer thread moves the buffer
// to the current segment file in large writes: once writeout_bytes_min have gathered,
// or writeout_delay_ms after the first record, whichever is first. Segments are written
// with O_DIRECT, in whole 4 KiB blocks: the buffer starts with the bytes of the segment's
// last partial block (its "prefix"), and the write is padded with zeros to a block
// boundary; the next write rewrites that block. (Measured here: copying into the page
// cache cost 2.2 s of CPU per GiB, O_DIRECT 0.07 s.) A segment's zero padding after its
// last record is its clean end; it is cut off when the segment is closed. Sync() writes out
// and fdatasyncs (FLUSH). Records still in the buffer when the process dies are lost
// from the log, but their regions stay marked in the caller's dirty-region bitmap until
// the writer reports them written (RangeCallback), so nothing is silently lost.
// Appenders wait when buffer_bytes_max are pending: memory stays bounded.
//
// A write-out that fails (a full file system: ENOSPC; or any other error) changes nothing
// in the log: the segment is cut back to where it ended, the records of the failed batch
// and every record appended after them are dropped and reported not written (their
// regions stay in the bitmap), and the sequence continues after the last record written
// (Invariant: next seq = written seq + 1 after a failure; a seq is never skipped in the
// files). The log then holds the failure (write_error()) and takes no record until
// ResumeAfterOverflow() (the source: it counts as an overflow, so a resync ships the
// dropped regions) or RollBack() (the recovery store's journal, whose records come again
// from the sender). Only when the cut-back itself fails does the log fail for good
// (failed(), until a restart recovers it).
//
// Readers that wait for records (a replication sender) do not poll: they give the log a
// Doorbell (AddDoorbell), which it rings whenever what they look at changes — records
// written out, an overflow or a write error begun, an overflow ended, a roll back — so an
// idle protected VM costs no CPU.
//
// Thread model: every method is thread-safe. mu_ guards the append buffer, sequence
// counter and writer signalling; write_mu_ serialises writing out and the segment
// files; write_mu_ is taken before mu_ when both are held; bells_mu_ after either (the
// doorbells' own locks are leaves).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "capture/log_format.h"
#include "capture/range.h"
#include "common/aligned_buffer.h"
#include "common/doorbell.h"
#include "common/file.h"

namespace osr::capture {

struct CaptureLogOptions {
  std::string dir;
  uint64_t disk_bytes = 0;
  uint64_t epoch = 1;
  // Roll to a new segment past this (at most a quarter of log_bytes_max, at least 256 KiB:
  // Open clamps it).
  uint64_t segment_bytes_target = 64ull << 20;
  size_t buffer_bytes_max = 16ull << 20;   // appenders wait beyond this
  size_t writeout_bytes_min = 1ull << 20;  // the writer wakes at this much
  uint64_t first_seq = 1;                  // of a new, empty log
  // The capture-log limit: past it the log stops taking records ("overflow") and the
  // caller's dirty-region bitmap keeps track instead, until ResumeAfterOverflow().
  uint64_t log_bytes_max = UINT64_MAX;
  int writeout_delay_ms = 5;  // ... or this long after a record
  // At open, read and check every segment (a capture log, bounded by log_bytes_max), or
  // only the last one, which the log goes on writing (a recovery store's journal, which
  // holds days: opening it must not cost its history). Damage in an older segment is then
  // found by whoever reads that record (its CRC), not at open.
  bool verify_all_on_open = true;
};

class CaptureLog {
 public:
  // A record as written out: what it changed and where it now is.
  struct Written {
    uint64_t seq;
    uint32_t disk;
    RecordKind kind;
    uint64_t offset;
    uint64_t length;
    uint64_t segment_first_seq;  // the segment file holding it
    uint64_t payload_pos;        // byte offset of its payload in that file
  };
  // Called after records are written out (ok) or failed to be (not ok), in seq order,
  // outside mu_.
  using RangeCallback = std::function<void(std::span<const Written> records, bool ok)>;

  // Opens (or creates) the log in opts.dir and recovers it: verifies every record,
  // truncates a damaged tail (a crash's torn write, or a last record damaged since) and
  // records that cut durably first (Cut, below), refuses a log damaged anywhere else.
  static Result<std::unique_ptr<CaptureLog>> Open(const CaptureLogOptions& opts,
                                                  RangeCallback on_written);
  ~CaptureLog();

  // Appends a record; returns its sequence number, or nullopt when the log has failed
  // (it stays failed until restarted: the caller tracks such writes in its bitmap).
  // payload_crc = Crc32c(payload), computed by the caller outside any lock.
  std::optional<uint64_t> Append(RecordKind kind, uint64_t offset, uint64_t length,
                                 std::span<const uint8_t> payload, uint32_t payload_crc,
                                 uint16_t flags = 0, uint32_t disk = 0);
  // Appends a record received from elsewhere (replication), already encoded with its own
  // sequence number, which must be the next one. Returns false when the log has failed
  // or holds a write error (then the caller rolls back: RollBack).
  bool AppendEncoded(std::span<const uint8_t> record);
  // Writes every record with seq <= `seq` to the segment file. The write's error (its
  // records are dropped, see above).
  Status WriteOut(uint64_t seq);
  // WriteOut of everything appended, then fdatasync. The log's write error (kNoSpace for
  // a full file system) when any record appended before the call was dropped.
  Status Sync();

  // Where the log ends: its last record and the byte after it in its segment.
  struct End {
    uint64_t seq = 0;
    uint64_t segment_first_seq = 0;
    uint64_t segment_bytes = 0;
  };
  // Writes out everything appended and returns where the log ends, for RollBack. The
  // write's error, if it fails.
  Result<End> MarkEnd();
  // Undoes every append after `end` (MarkEnd's answer on this log; what was appended since
  // may be in memory or in the files, written or not): drops the records still in memory (reported
  // not written), cuts the segment back to end.segment_bytes, deletes segments begun since, and
  // takes records again from end.seq + 1; a write error ends. Records already reported written stay
  // reported: the caller forgets them itself (the recovery store's index). For a log whose
  // records come from elsewhere and will be sent again (the recovery store's journal).
  // The file system's error when the cut fails (the log has then failed for good).
  Status RollBack(const End& end);
  // The error of the last failed write-out, until ResumeAfterOverflow or RollBack; Ok.
  Status write_error() const;

  // Deletes the segment files whose records all have seq <= `seq` (the recovery site
  // has them durably); never the segment being written. Returns how many it deleted.
  Result<size_t> TrimUpTo(uint64_t seq);
  // The lowest sequence number still held (last_seq + 1 when the log holds none).
  Result<uint64_t> first_seq_held() const;

  uint64_t last_seq() const;  // highest sequence number handed out (0: none)
  // The time_ns of the last record found at open (0 when the log was empty then).
  int64_t recovered_time_ns() const { return recovered_time_ns_; }
  uint64_t written_seq() const;  // highest written out
  bool failed() const;
  // True while the log is over its limit and records are not being taken.
  bool overflowed() const;
  // Ends an overflow: records are taken again. Returns the last seq before the gap and
  // a generation number that changes with every overflow.
  std::pair<uint64_t, uint64_t> ResumeAfterOverflow();
  // A tail cut at start-up (docs/formats.md "Capture log cut record"). Recovery cannot
  // tell a torn, never-shipped tail from a last record that was shipped and damaged
  // since, so a cut counts as unknown history: records after `after_seq` were lost here,
  // and seqs up to `seq_bound` (the most the cut bytes could hold) may have been written
  // and shipped. Kept in <dir>/cut.json, written and synced before the cut, until
  // ResumeAfterCut or ClearCut. While a cut is pending the log is overflowed (takes no
  // record); a source's capture group marks every region dirty (resent whole).
  struct Cut {
    uint64_t after_seq = 0;
    uint64_t seq_bound = 0;
    int64_t time_ns = 0;  // when it was cut, ns since the Unix epoch
    std::string reason;   // what recovery found, for people
  };
  std::optional<Cut> pending_cut() const;
  // Ends a cut once the recovery site has said it holds every seq up to `durable`: the log
  // goes on after max(after_seq, durable), never reusing a seq the recovery site may hold.
  // When `durable` is beyond what the log kept, every segment (all durable there) goes and
  // a new one starts at durable + 1. The log stays overflowed (a resync ends it). Crash
  // safe: the cut record names the seq it resumes at before any segment is deleted.
  // The file system's error when a step fails (the cut stays pending).
  Status ResumeAfterCut(uint64_t durable);
  // Drops the cut record without moving the sequence (the recovery store's journal, once
  // the records after the cut came again from the source). Ok when none is pending.
  Status ClearCut();

  // Starts an overflow now (tracking only: a failed-over VM's disks until reprotect, whose
  // changes are shipped as whole regions from the bitmap, not as records).
  void EnterOverflow();
  uint64_t overflow_generation() const;
  // Readers' doorbells (see the file comment). `bell` is borrowed: RemoveDoorbell before it
  // goes; after RemoveDoorbell returns, the log does not touch it.
  void AddDoorbell(Doorbell* bell);
  void RemoveDoorbell(Doorbell* bell);
  // Rings every doorbell: for a change outside the log that its readers act on too (the
  // capture group's regions marked for a resync).
  void RingDoorbells();

  uint64_t held_bytes() const { return held_bytes_; }
  uint64_t captured_bytes_total() const { return captured_bytes_; }  // payload, since start
  uint64_t log_bytes_max() const { return opts_.log_bytes_max; }
  const std::string& dir() const { return opts_.dir; }

 private:
  explicit CaptureLog(CaptureLogOptions opts, RangeCallback cb)
      : opts_(std::move(opts)), on_written_(std::move(cb)), empty_first_seq_(opts_.first_seq) {}
  Status Recover();
  // The cut part of Recover: a cut record left by an earlier start, and the cut of a
  // damaged tail (`tail_pos` in `segment`, after seq `after_seq`).
  Status LoadCut();
  Status CutTail(const std::string& segment, uint64_t tail_pos, uint64_t after_seq,
                 const std::string& reason);
  Status WriteCut(const Cut& cut, uint64_t resume_at);
  // Creates the next segment with `header` (64 bytes) as its first block; holds write_mu_.
  Status OpenSegment(uint64_t first_seq, const uint8_t* header);
  // Reports the records in buf[from..] (at file_pos + from in their segment) to on_written_;
  // holds write_mu_.
  void ReportWritten(std::span<const uint8_t> buf, size_t from, uint64_t file_pos,
                     uint64_t segment_first_seq, bool ok);
  // After a write-out of spare_ failed: cuts the segment back to `segment_bytes_before`,
  // drops the batch and what was appended since, and holds `cause`. Holds write_mu_.
  Status UndoWriteOut(const Status& cause, uint64_t segment_bytes_before, uint64_t held_before,
                      size_t records_from);
  void WaitForRoom(std::unique_lock<std::mutex>& lock, size_t need);       // holds mu_
  size_t pending_bytes() const { return buffer_.size() - prefix_bytes_; }  // holds mu_

  void WriterLoop();

  const CaptureLogOptions opts_;
  const RangeCallback on_written_;

  mutable std::mutex mu_;
  std::condition_variable writer_cv_;        // wakes the writer
  std::condition_variable space_cv_;         // wakes appenders waiting for room
  AlignedBuffer buffer_;                     // guarded by mu_: prefix, then records
  size_t prefix_bytes_ = 0;                  // guarded by mu_
  uint64_t next_seq_ = 1;                    // guarded by mu_
  bool failed_ = false;                      // guarded by mu_
  Status write_error_;                       // guarded by mu_; see write_error()
  bool overflowed_ = false;                  // guarded by mu_
  std::optional<Cut> cut_;                   // guarded by mu_
  uint64_t empty_first_seq_ = 0;             // a log with no segment starts here (Recover)
  int64_t recovered_time_ns_ = 0;            // set by Recover
  uint64_t overflow_generation_ = 0;         // guarded by mu_
  std::atomic<uint64_t> held_bytes_{0};      // bytes in segment files
  std::atomic<uint64_t> captured_bytes_{0};  // bytes the records changed (churn)
  bool stop_ = false;                        // guarded by mu_
  std::thread writer_;

  std::mutex bells_mu_;
  std::vector<Doorbell*> bells_;  // guarded by bells_mu_

  mutable std::mutex write_mu_;
  AlignedBuffer spare_;             // guarded by write_mu_
  std::vector<Written> written_;    // guarded by write_mu_; scratch for on_written_
  uint64_t segment_first_seq_ = 0;  // guarded by write_mu_
  File segment_;                    // guarded by write_mu_
  uint64_t segment_bytes_ = 0;      // guarded by write_mu_: the segment's logical end
  uint64_t written_seq_ = 0;        // guarded by write_mu_ (read under either)
  uint64_t synced_seq_ = 0;         // guarded by write_mu_
};

}  // namespace osr::capture
