// VersionIndex: which journal records changed which bytes of a recovery store's disks, so
// that a disk can be read as it was at any sequence number the journal still holds. It
// lives on disk, in RocksDB (dir/index/), so its memory is the process's index cache
// (SetCacheBytes), not the retained history (invariant 9).
//
// Keys (docs/formats.md, "Version index"), big-endian so that RocksDB's byte order is
// the numeric order:
//   'C' disk:u32 chunk:u64 seq:u64 sub:u64 -> the record's RecordRef (a record is listed
//                                     under every 64 KiB chunk of the disk it touches)
//   'S' seq:u64 sub:u64             -> the same RecordRef (the records in seq order: for
//                                     dropping, folding and ChangedAfter)
// `sub` is 0 for a journal record; compacted history (RecoveryStore::Compact) keeps several
// extents under one seq (a kept point), told apart by sub.
//   'M' "indexed_through"           -> seq:u64, written in the same batch as the records
//   'M' "journal_id"                -> u64: the journal this index describes (store.json's
//                                     journal_id; a journal started over gets a new one)
//   'M' "history_id"                -> u64: the compacted history it describes (store.json's
//                                     history_id; 0: none)
//   'M' "compaction"                -> PendingCompaction: a compaction under way, which
//                                     open undoes or finishes in its own range
//
// Reading [offset, offset+length) as of seq S walks each chunk's records newest first
// (from S down) and takes from each only the bytes no newer record covered, until every
// byte is covered or the walk reaches `from` (the base): the cost is the versions above
// the answer, not the whole history, so the oldest point reads as fast as the newest.
//
// Durability (docs/architecture.md, "The recovery store at scale"): the journal is the
// store's log; the index follows it. Its write-ahead log is written but not synced:
// after a power loss RocksDB recovers a prefix of the batches (point-in-time recovery),
// and `indexed_through()` says how far; the store indexes the journal's records after
// that again (Rebuild from the tail, never the whole journal). Records beyond the
// journal's end (indexed at write-out, before the journal's sync, then lost) are dropped
// with DropAfter.
//
// Thread model: thread-safe (RocksDB); the store orders Add/DropAfter/DropUpTo itself.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "capture/log_format.h"
#include "common/status.h"

namespace rocksdb {
class DB;
}

namespace osr::store {

// A record as the index knows it: where its bytes are on its disk and in the journal.
struct RecordRef {
  uint64_t seq = 0;
  uint32_t disk = 0;
  uint64_t offset = 0;  // on the disk, bytes
  uint64_t length = 0;  // bytes
  capture::RecordKind kind = capture::RecordKind::kWrite;
  uint64_t segment_first_seq = 0;  // the journal segment holding the payload (history: the
                                   // history file's id)
  uint64_t payload_pos = 0;        // byte offset of the payload in that segment
  uint64_t sub = 0;      // 0: a journal record; else one extent of compacted history (file, n)
  bool history = false;  // the payload is in a history file, not the journal
};

// The visible part of one record in a read: bytes [offset, offset+length) of the disk
// come from `record` (its payload, or zeros for a zero/trim record).
struct ReadPart {
  RecordRef record;
  uint64_t offset = 0;
  uint64_t length = 0;
};

class VersionIndex {
 public:
  static constexpr uint64_t kChunkBytes = 64 << 10;
  static constexpr uint32_t kBatchPutsMax = 65536;  // keys per RocksDB write (Add)

  // The memory every index of this process shares: RocksDB's block cache and, charged to
  // it, the memtables. Takes effect for indexes opened after the call (the site calls it
  // once at start, from store_index_cache_bytes). At least kCacheBytesMin.
  static constexpr uint64_t kCacheBytesMin = 8 << 20;
  static constexpr uint64_t kCacheBytesDefault = 64 << 20;
  static void SetCacheBytes(uint64_t bytes);
  // The bytes the shared cache holds now (blocks and memtables), for /stores and benches.
  static uint64_t CacheUsageBytes();

  // Opens (creating it if missing) the index in `dir`. kCorruption when RocksDB finds it
  // damaged (the caller may delete it and index the journal again), kIoError otherwise.
  static Result<std::unique_ptr<VersionIndex>> Open(const std::string& dir);
  ~VersionIndex();

  // Adds records (increasing seq; length-0 records only advance indexed_through) in one
  // batch, with indexed_through = the last one's seq (unless !advance: compacted history,
  // whose seqs lie below it). sync: the batch survives a power loss when this returns.
  // The write's error.
  Status Add(std::span<const RecordRef> records, bool advance = true, bool sync = false);
  // The seq up to which every record is in the index (0: none yet).
  uint64_t indexed_through() const;
  // The journal this index describes (0: none yet). An index of another journal (one put
  // back from an older copy, or left from before the journal started over) is cleared.
  uint64_t journal_id() const;

  // The parts of disk `disk`'s [offset, offset+length) that records with from < seq <=
  // upto wrote, each byte from the newest such record (so the parts do not overlap and
  // may be applied in any order); bytes no such record wrote come from the base. Appends
  // to `out`. The read error (kCorruption for a damaged index entry).
  Status Collect(uint32_t disk, uint64_t offset, uint64_t length, uint64_t from, uint64_t upto,
                 std::vector<ReadPart>* out) const;
  // Calls fn for every record with from < seq <= upto, in seq order (the 'S' keys:
  // disk, offset, length and seq only). fn returns false to stop.
  Status ForEachBySeq(uint64_t from, uint64_t upto,
                      const std::function<bool(const RecordRef&)>& fn) const;
  // Forgets every record with seq <= seq (folded into the base).
  Status DropUpTo(uint64_t seq);
  // Forgets every record with from < seq <= upto for which drop(record) says so, in
  // batches (one pass).
  Status DropIf(uint64_t from, uint64_t upto, const std::function<bool(const RecordRef&)>& drop);
  // The compacted history this index describes (0: none); Set is synced (survives a
  // power loss).
  uint64_t history_id() const;
  Status SetHistoryId(uint64_t id);

  // A compaction under way (RecoveryStore::Compact): set before it writes anything and
  // cleared when its index work is done, so that a store opened after it was cut short
  // undoes or finishes it in its own range of seqs instead of indexing all history again
  // (docs/formats.md, "Compacted history").
  struct PendingCompaction {
    uint64_t old_history_id = 0;  // store.json's history_id before it (0: none)
    uint64_t new_history_id = 0;  // the one its commit writes to store.json
    uint64_t lo = 0;              // it rewrites the entries of seqs (lo, e]
    uint64_t e = 0;
    uint64_t first_file = 0;  // its history files have ids >= first_file; older ones less
    bool written = false;     // every entry of its files is in the index (synced with it)
  };
  // The compaction under way, none when nullopt.
  std::optional<PendingCompaction> pending_compaction() const;
  // Records `p` (synced, together with every batch before it). The write's error.
  Status SetPendingCompaction(const PendingCompaction& p);
  // Forgets the compaction under way and sets history_id (one synced batch). The write's
  // error.
  Status EndPendingCompaction(uint64_t history_id);
  // Forgets every record with seq > seq (an append undone, a journal cut); indexed_through
  // becomes min(indexed_through, seq).
  Status DropAfter(uint64_t seq);
  // Forgets everything (a compaction under way too): the index now describes journal
  // `journal_id`, whose records come after `through` (indexed_through = through).
  Status Clear(uint64_t through, uint64_t journal_id);

  // Copies the index open in `dir` (by this process) to `to`, which must not exist, as it
  // is at this instant: a consistent state, the one a power loss now could leave at best
  // (RocksDB's Checkpoint: tables hard-linked, logs copied, nothing flushed). For the
  // power-loss tests (store/power_loss_test.cc) and backups. kNotFound when no index is
  // open in `dir`; RocksDB's error otherwise.
  static Status CheckpointOpen(const std::string& dir, const std::string& to);

 private:
  VersionIndex(std::unique_ptr<rocksdb::DB> db, uint64_t indexed_through, uint64_t journal_id,
               uint64_t history_id, std::optional<PendingCompaction> pending);
  Status DeleteRecords(const std::vector<RecordRef>& records, uint64_t new_through,
                       bool set_through);

  std::unique_ptr<rocksdb::DB> db_;
  std::atomic<uint64_t> indexed_through_{0};
  std::atomic<uint64_t> journal_id_{0};
  std::atomic<uint64_t> history_id_{0};
  mutable std::mutex pending_mu_;
  std::optional<PendingCompaction> pending_;  // guarded by pending_mu_
};

}  // namespace osr::store
