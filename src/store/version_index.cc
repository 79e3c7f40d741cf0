#include "store/version_index.h"

#include <fmt/format.h>
#include <rocksdb/cache.h>
#include <rocksdb/convenience.h>
#include <rocksdb/db.h>
#include <rocksdb/table.h>
#include <rocksdb/utilities/checkpoint.h>
#include <rocksdb/write_buffer_manager.h>

#include <algorithm>
#include <bit>
#include <filesystem>
#include <map>
#include <mutex>

#include "common/le.h"

namespace osr::store {

namespace {

constexpr char kChunkTag = 'C';
constexpr char kSeqTag = 'S';
const std::string kThroughKey = "M:indexed_through";
const std::string kJournalKey = "M:journal_id";
const std::string kHistoryKey = "M:history_id";
const std::string kCompactionKey = "M:compaction";
constexpr size_t kCompactionBytes = 6 * 8;  // PendingCompaction, 6 u64 LE

constexpr size_t kChunkKeyBytes = 1 + 4 + 8 + 8 + 8;
constexpr size_t kSeqKeyBytes = 1 + 8 + 8;
constexpr size_t kChunkSeqAt = 13;      // where a chunk key's seq is
constexpr uint8_t kHistoryFlag = 0x80;  // in the value's kind byte
// A record's value, the same under both tags: disk u32, offset u64, length u64, kind u8,
// segment_first_seq u64, payload_pos u64 (little endian, as osr's other formats).
constexpr size_t kValueBytes = 4 + 8 + 8 + 1 + 8 + 8;
// Records deleted per write batch when dropping.
constexpr size_t kDropBatchRecords = 4096;

void Be32(char* p, uint32_t v) {
  v = __builtin_bswap32(v);
  std::memcpy(p, &v, 4);
}
void Be64(char* p, uint64_t v) {
  v = __builtin_bswap64(v);
  std::memcpy(p, &v, 8);
}
uint64_t LdBe64(const char* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return __builtin_bswap64(v);
}

std::string ChunkKey(uint32_t disk, uint64_t chunk, uint64_t seq, uint64_t sub) {
  std::string k(kChunkKeyBytes, '\0');
  k[0] = kChunkTag;
  Be32(k.data() + 1, disk);
  Be64(k.data() + 5, chunk);
  Be64(k.data() + kChunkSeqAt, seq);
  Be64(k.data() + 21, sub);
  return k;
}

std::string SeqKey(uint64_t seq, uint64_t sub) {
  std::string k(kSeqKeyBytes, '\0');
  k[0] = kSeqTag;
  Be64(k.data() + 1, seq);
  Be64(k.data() + 9, sub);
  return k;
}

std::string U64Value(uint64_t v) {
  std::string out(8, '\0');
  Le64(reinterpret_cast<uint8_t*>(out.data()), v);
  return out;
}

std::string EncodeCompaction(const VersionIndex::PendingCompaction& p) {
  std::string v(kCompactionBytes, '\0');
  auto* b = reinterpret_cast<uint8_t*>(v.data());
  Le64(b, p.old_history_id);
  Le64(b + 8, p.new_history_id);
  Le64(b + 16, p.lo);
  Le64(b + 24, p.e);
  Le64(b + 32, p.first_file);
  Le64(b + 40, p.written ? 1 : 0);
  return v;
}

std::string EncodeValue(const RecordRef& r) {
  std::string v(kValueBytes, '\0');
  auto* p = reinterpret_cast<uint8_t*>(v.data());
  Le32(p, r.disk);
  Le64(p + 4, r.offset);
  Le64(p + 12, r.length);
  p[20] = static_cast<uint8_t>(static_cast<uint8_t>(r.kind) | (r.history ? kHistoryFlag : 0));
  Le64(p + 21, r.segment_first_seq);
  Le64(p + 29, r.payload_pos);
  return v;
}

Result<RecordRef> DecodeValue(uint64_t seq, uint64_t sub, const rocksdb::Slice& v) {
  if (v.size() != kValueBytes) {
    return Corruption(fmt::format("version index: entry of seq {} has {} bytes, not {}", seq,
                                  v.size(), kValueBytes));
  }
  const auto* p = reinterpret_cast<const uint8_t*>(v.data());
  RecordRef r;
  r.seq = seq;
  r.sub = sub;
  r.disk = Ld32(p);
  r.offset = Ld64(p + 4);
  r.length = Ld64(p + 12);
  r.kind = static_cast<capture::RecordKind>(p[20] & ~kHistoryFlag);
  r.history = (p[20] & kHistoryFlag) != 0;
  r.segment_first_seq = Ld64(p + 21);
  r.payload_pos = Ld64(p + 29);
  if (r.length == 0 || r.offset + r.length < r.offset) {
    return Corruption(fmt::format("version index: entry of seq {} has a bad range", seq));
  }
  return r;
}

Status FromRocks(const rocksdb::Status& s, const std::string& what) {
  if (s.ok()) return Status::Ok();
  std::string msg = "version index: " + what + ": " + s.ToString();
  if (s.IsCorruption()) return Corruption(msg);
  if (s.IsNoSpace()) return Status(Code::kNoSpace, msg);
  return IoError(msg);
}

// The process's shared index memory (SetCacheBytes).
struct SharedMemory {
  std::mutex mu;
  uint64_t bytes = VersionIndex::kCacheBytesDefault;
  std::shared_ptr<rocksdb::Cache> cache;
  std::shared_ptr<rocksdb::WriteBufferManager> buffers;

  // Memtables may use a quarter of the cache; blocks the rest (they are charged to the
  // same cache, so the sum stays within it).
  void Make() {
    if (cache) return;
    cache = rocksdb::NewLRUCache(bytes);
    buffers = std::make_shared<rocksdb::WriteBufferManager>(bytes / 4, cache);
  }
};

SharedMemory& Shared() {
  static auto* m = new SharedMemory();  // never destroyed: indexes may outlive statics
  return *m;
}

// The indexes open in this process, by their directory (CheckpointOpen). An index leaves
// it before it closes.
struct OpenIndexes {
  std::mutex mu;
  std::map<std::string, rocksdb::DB*> by_dir;  // guarded by mu
};

OpenIndexes& Opened() {
  static auto* o = new OpenIndexes();  // never destroyed: indexes may outlive statics
  return *o;
}

std::string NormalDir(const std::string& dir) {
  return std::filesystem::path(dir).lexically_normal().string();
}

rocksdb::WriteOptions WriteOpts() {
  rocksdb::WriteOptions w;
  w.sync = false;  // the journal is synced; the index follows it (header comment)
  return w;
}

}  // namespace

void VersionIndex::SetCacheBytes(uint64_t bytes) {
  auto& m = Shared();
  std::lock_guard lock(m.mu);
  m.bytes = std::max(bytes, kCacheBytesMin);
  if (m.cache) {
    m.cache->SetCapacity(m.bytes);
    m.buffers->SetBufferSize(m.bytes / 4);
  }
}

uint64_t VersionIndex::CacheUsageBytes() {
  auto& m = Shared();
  std::lock_guard lock(m.mu);
  return m.cache ? m.cache->GetUsage() : 0;
}

Result<std::unique_ptr<VersionIndex>> VersionIndex::Open(const std::string& dir) {
  rocksdb::Options o;
  {
    auto& m = Shared();
    std::lock_guard lock(m.mu);
    m.Make();
    rocksdb::BlockBasedTableOptions t;
    t.block_cache = m.cache;
    t.cache_index_and_filter_blocks = true;  // table indexes count in the cache too
    o.table_factory.reset(rocksdb::NewBlockBasedTableFactory(t));
    o.write_buffer_manager = m.buffers;
  }
  o.create_if_missing = true;
  o.write_buffer_size = 4 << 20;
  o.max_write_buffer_number = 2;
  o.max_open_files = 64;
  o.max_total_wal_size = 32 << 20;
  o.wal_recovery_mode = rocksdb::WALRecoveryMode::kPointInTimeRecovery;
  o.info_log_level = rocksdb::InfoLogLevel::WARN_LEVEL;
  o.keep_log_file_num = 2;
  o.max_log_file_size = 1 << 20;
  o.stats_dump_period_sec = 0;
  o.stats_persist_period_sec = 0;
  o.max_background_jobs = 2;
  o.level_compaction_dynamic_level_bytes = true;
  auto supported = rocksdb::GetSupportedCompressions();
  o.compression =
      std::find(supported.begin(), supported.end(), rocksdb::kLZ4Compression) != supported.end()
          ? rocksdb::kLZ4Compression
          : rocksdb::kNoCompression;
  rocksdb::DB* raw = nullptr;
  OSR_RETURN_IF_ERROR(FromRocks(rocksdb::DB::Open(o, dir, &raw), "open " + dir));
  std::unique_ptr<rocksdb::DB> db(raw);
  uint64_t meta[3] = {0, 0, 0};  // indexed_through, journal_id, history_id
  const std::string* keys[3] = {&kThroughKey, &kJournalKey, &kHistoryKey};
  for (int i = 0; i < 3; ++i) {
    std::string v;
    rocksdb::Status s = db->Get(rocksdb::ReadOptions(), *keys[i], &v);
    if (s.ok()) {
      if (v.size() != 8) return Corruption(dir + ": " + *keys[i] + " is not 8 bytes");
      meta[i] = Ld64(reinterpret_cast<const uint8_t*>(v.data()));
    } else if (!s.IsNotFound()) {
      return FromRocks(s, "read " + *keys[i]);
    }
  }
  std::optional<PendingCompaction> pending;
  {
    std::string v;
    rocksdb::Status s = db->Get(rocksdb::ReadOptions(), kCompactionKey, &v);
    if (s.ok()) {
      const auto* b = reinterpret_cast<const uint8_t*>(v.data());
      if (v.size() != kCompactionBytes || Ld64(b + 40) > 1) {
        return Corruption(dir + ": " + kCompactionKey + " is not a compaction under way");
      }
      pending = PendingCompaction{Ld64(b),      Ld64(b + 8),  Ld64(b + 16),
                                  Ld64(b + 24), Ld64(b + 32), Ld64(b + 40) == 1};
    } else if (!s.IsNotFound()) {
      return FromRocks(s, "read " + kCompactionKey);
    }
  }
  {
    auto& o = Opened();
    std::lock_guard lock(o.mu);
    o.by_dir[NormalDir(dir)] = db.get();
  }
  return std::unique_ptr<VersionIndex>(
      new VersionIndex(std::move(db), meta[0], meta[1], meta[2], pending));
}

Status VersionIndex::CheckpointOpen(const std::string& dir, const std::string& to) {
  auto& o = Opened();
  std::lock_guard lock(o.mu);  // the index stays open meanwhile (~VersionIndex waits)
  auto it = o.by_dir.find(NormalDir(dir));
  if (it == o.by_dir.end()) return NotFound("no version index is open in " + dir);
  rocksdb::Checkpoint* raw = nullptr;
  OSR_RETURN_IF_ERROR(FromRocks(rocksdb::Checkpoint::Create(it->second, &raw), "checkpoint"));
  std::unique_ptr<rocksdb::Checkpoint> checkpoint(raw);
  // A log size no index reaches: its logs are copied, never flushed into tables first (a
  // flush would change the index under test).
  return FromRocks(checkpoint->CreateCheckpoint(to, UINT64_MAX), "checkpoint to " + to);
}

VersionIndex::VersionIndex(std::unique_ptr<rocksdb::DB> db, uint64_t indexed_through,
                           uint64_t journal_id, uint64_t history_id,
                           std::optional<PendingCompaction> pending)
    : db_(std::move(db)),
      indexed_through_(indexed_through),
      journal_id_(journal_id),
      history_id_(history_id),
      pending_(pending) {}

uint64_t VersionIndex::history_id() const {
  return history_id_.load(std::memory_order_acquire);
}

Status VersionIndex::SetHistoryId(uint64_t id) {
  rocksdb::WriteOptions w;
  w.sync = true;
  OSR_RETURN_IF_ERROR(FromRocks(db_->Put(w, kHistoryKey, U64Value(id)), "set history_id"));
  history_id_.store(id, std::memory_order_release);
  return Status::Ok();
}

std::optional<VersionIndex::PendingCompaction> VersionIndex::pending_compaction() const {
  std::lock_guard lock(pending_mu_);
  return pending_;
}

Status VersionIndex::SetPendingCompaction(const PendingCompaction& p) {
  rocksdb::WriteOptions w;
  w.sync = true;
  OSR_RETURN_IF_ERROR(
      FromRocks(db_->Put(w, kCompactionKey, EncodeCompaction(p)), "set the compaction under way"));
  std::lock_guard lock(pending_mu_);
  pending_ = p;
  return Status::Ok();
}

Status VersionIndex::EndPendingCompaction(uint64_t history_id) {
  rocksdb::WriteBatch batch;
  OSR_RETURN_IF_ERROR(FromRocks(batch.Delete(kCompactionKey), "batch"));
  OSR_RETURN_IF_ERROR(FromRocks(batch.Put(kHistoryKey, U64Value(history_id)), "batch"));
  rocksdb::WriteOptions w;
  w.sync = true;
  OSR_RETURN_IF_ERROR(FromRocks(db_->Write(w, &batch), "end the compaction under way"));
  history_id_.store(history_id, std::memory_order_release);
  std::lock_guard lock(pending_mu_);
  pending_.reset();
  return Status::Ok();
}

uint64_t VersionIndex::journal_id() const {
  return journal_id_.load(std::memory_order_acquire);
}

VersionIndex::~VersionIndex() {
  {
    auto& o = Opened();
    std::lock_guard lock(o.mu);
    std::erase_if(o.by_dir, [&](const auto& e) { return e.second == db_.get(); });
  }
  if (db_) {
    rocksdb::Status s = db_->Close();
    (void)s;  // nothing to do about it: the WAL and the journal's tail rebuild what is lost
  }
}

uint64_t VersionIndex::indexed_through() const {
  return indexed_through_.load(std::memory_order_acquire);
}

Status VersionIndex::Add(std::span<const RecordRef> records, bool advance, bool sync) {
  if (records.empty()) return Status::Ok();
  rocksdb::WriteBatch batch;
  // A record over a large range (a trim of a whole disk) has a key per 64 KiB chunk: the
  // batch is written out every kBatchPutsMax keys, so its memory is bounded whatever the
  // record's length. Keys written before a crash and past indexed_through are written
  // again at open (the same keys and values).
  auto spill = [&]() -> Status {
    if (batch.Count() < kBatchPutsMax) return Status::Ok();
    OSR_RETURN_IF_ERROR(FromRocks(db_->Write(WriteOpts(), &batch), "add"));
    batch.Clear();
    return Status::Ok();
  };
  for (const RecordRef& r : records) {
    if (r.length == 0) continue;  // a mark: no bytes
    std::string value = EncodeValue(r);
    OSR_RETURN_IF_ERROR(FromRocks(batch.Put(SeqKey(r.seq, r.sub), value), "batch"));
    uint64_t first = r.offset / kChunkBytes, last = (r.offset + r.length - 1) / kChunkBytes;
    for (uint64_t c = first; c <= last; ++c) {
      OSR_RETURN_IF_ERROR(FromRocks(batch.Put(ChunkKey(r.disk, c, r.seq, r.sub), value), "batch"));
      OSR_RETURN_IF_ERROR(spill());
    }
  }
  if (advance) {
    OSR_RETURN_IF_ERROR(FromRocks(batch.Put(kThroughKey, U64Value(records.back().seq)), "batch"));
  }
  rocksdb::WriteOptions w = WriteOpts();
  w.sync = sync;
  OSR_RETURN_IF_ERROR(FromRocks(db_->Write(w, &batch), "add"));
  if (advance) indexed_through_.store(records.back().seq, std::memory_order_release);
  return Status::Ok();
}

Status VersionIndex::Collect(uint32_t disk, uint64_t offset, uint64_t length, uint64_t from,
                             uint64_t upto, std::vector<ReadPart>* out) const {
  if (length == 0 || upto <= from) return Status::Ok();
  const uint64_t end = offset + length;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
  std::vector<std::pair<uint64_t, uint64_t>> open, next;  // bytes no record covered yet
  for (uint64_t c = offset / kChunkBytes; c * kChunkBytes < end; ++c) {
    open.assign(1, {std::max(offset, c * kChunkBytes), std::min(end, (c + 1) * kChunkBytes)});
    const std::string prefix = ChunkKey(disk, c, 0, 0).substr(0, kChunkSeqAt);
    for (it->SeekForPrev(ChunkKey(disk, c, upto, UINT64_MAX)); it->Valid() && !open.empty();
         it->Prev()) {
      rocksdb::Slice k = it->key();
      if (k.size() != kChunkKeyBytes || !k.starts_with(prefix)) break;
      uint64_t seq = LdBe64(k.data() + kChunkSeqAt);
      if (seq <= from) break;
      OSR_ASSIGN_OR_RETURN(RecordRef r,
                           DecodeValue(seq, LdBe64(k.data() + kChunkSeqAt + 8), it->value()));
      uint64_t rb = r.offset, re = r.offset + r.length;
      next.clear();
      for (auto [a, b] : open) {
        uint64_t lo = std::max(a, rb), hi = std::min(b, re);
        if (lo >= hi) {
          next.emplace_back(a, b);
          continue;
        }
        out->push_back({r, lo, hi - lo});
        if (a < lo) next.emplace_back(a, lo);
        if (hi < b) next.emplace_back(hi, b);
      }
      open.swap(next);
    }
    OSR_RETURN_IF_ERROR(FromRocks(it->status(), "read"));
  }
  return Status::Ok();
}

Status VersionIndex::ForEachBySeq(uint64_t from, uint64_t upto,
                                  const std::function<bool(const RecordRef&)>& fn) const {
  if (upto <= from) return Status::Ok();
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
  for (it->Seek(SeqKey(from + 1, 0)); it->Valid(); it->Next()) {
    rocksdb::Slice k = it->key();
    if (k.size() != kSeqKeyBytes || k[0] != kSeqTag) break;
    uint64_t seq = LdBe64(k.data() + 1);
    if (seq > upto) break;
    OSR_ASSIGN_OR_RETURN(RecordRef r, DecodeValue(seq, LdBe64(k.data() + 9), it->value()));
    if (!fn(r)) return Status::Ok();
  }
  return FromRocks(it->status(), "read");
}

Status VersionIndex::DeleteRecords(const std::vector<RecordRef>& records, uint64_t new_through,
                                   bool set_through) {
  rocksdb::WriteBatch batch;
  for (const RecordRef& r : records) {
    OSR_RETURN_IF_ERROR(FromRocks(batch.Delete(SeqKey(r.seq, r.sub)), "batch"));
    uint64_t first = r.offset / kChunkBytes, last = (r.offset + r.length - 1) / kChunkBytes;
    for (uint64_t c = first; c <= last; ++c) {
      OSR_RETURN_IF_ERROR(FromRocks(batch.Delete(ChunkKey(r.disk, c, r.seq, r.sub)), "batch"));
    }
  }
  if (set_through) {
    uint8_t through[8];
    Le64(through, new_through);
    OSR_RETURN_IF_ERROR(
        FromRocks(batch.Put(kThroughKey, rocksdb::Slice(reinterpret_cast<const char*>(through), 8)),
                  "batch"));
  }
  return FromRocks(db_->Write(WriteOpts(), &batch), "drop");
}

Status VersionIndex::DropIf(uint64_t from, uint64_t upto,
                            const std::function<bool(const RecordRef&)>& drop) {
  // One iterator (a snapshot) over the range; deletes go in batches meanwhile.
  std::vector<RecordRef> batch;
  Status st;
  OSR_RETURN_IF_ERROR(ForEachBySeq(from, upto, [&](const RecordRef& r) {
    if (!drop(r)) return true;
    batch.push_back(r);
    if (batch.size() < kDropBatchRecords) return true;
    st = DeleteRecords(batch, 0, false);
    batch.clear();
    return st.ok();
  }));
  OSR_RETURN_IF_ERROR(st);
  if (batch.empty()) return Status::Ok();
  return DeleteRecords(batch, 0, false);
}

Status VersionIndex::DropUpTo(uint64_t seq) {
  // Oldest first: a crash in between leaves only records the store no longer reads (seq
  // <= its base), which the next fold drops.
  return DropIf(0, seq, [](const RecordRef&) { return true; });
}

Status VersionIndex::DropAfter(uint64_t seq) {
  // indexed_through first: a crash in between leaves records past it, which the store's
  // open drops again (they lie past the journal or are indexed again).
  uint64_t through = std::min(indexed_through(), seq);
  OSR_RETURN_IF_ERROR(DeleteRecords({}, through, true));
  indexed_through_.store(through, std::memory_order_release);
  return DropIf(seq, UINT64_MAX, [](const RecordRef&) { return true; });
}

Status VersionIndex::Clear(uint64_t through, uint64_t journal_id) {
  rocksdb::WriteBatch batch;
  auto* cf = db_->DefaultColumnFamily();
  OSR_RETURN_IF_ERROR(FromRocks(
      batch.DeleteRange(cf, std::string(1, kChunkTag), std::string(1, kChunkTag + 1)), "batch"));
  OSR_RETURN_IF_ERROR(FromRocks(
      batch.DeleteRange(cf, std::string(1, kSeqTag), std::string(1, kSeqTag + 1)), "batch"));
  OSR_RETURN_IF_ERROR(FromRocks(batch.Put(kThroughKey, U64Value(through)), "batch"));
  OSR_RETURN_IF_ERROR(FromRocks(batch.Put(kJournalKey, U64Value(journal_id)), "batch"));
  OSR_RETURN_IF_ERROR(FromRocks(batch.Put(kHistoryKey, U64Value(0)), "batch"));
  OSR_RETURN_IF_ERROR(FromRocks(batch.Delete(kCompactionKey), "batch"));
  OSR_RETURN_IF_ERROR(FromRocks(db_->Write(WriteOpts(), &batch), "clear"));
  indexed_through_.store(through, std::memory_order_release);
  journal_id_.store(journal_id, std::memory_order_release);
  history_id_.store(0, std::memory_order_release);
  {
    std::lock_guard lock(pending_mu_);
    pending_.reset();
  }
  return Status::Ok();
}

}  // namespace osr::store
