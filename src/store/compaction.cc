// RecoveryStore's history compaction (recovery_store.h, Compact; docs/formats.md,
// "Compacted history").
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <charconv>
#include <filesystem>
#include <random>
#include <set>
#include <tuple>

#include "capture/log_reader.h"
#include "common/crc32c.h"
#include "store/recovery_store.h"

namespace osr::store {

namespace fs = std::filesystem;
using capture::RecordHeader;
using capture::RecordKind;

namespace {

constexpr uint64_t kHistoryFileBytes = 64ull << 20;  // a history file rolls past this
constexpr uint32_t kHistoryRecordsMax = 0xFFFF;      // records per file (sub's low half)
constexpr uint64_t kPartBytesMax = 1 << 20;          // contiguous parts merge up to this
constexpr size_t kWriteBufferBytes = 4 << 20;
constexpr size_t kWindowParts = 1 << 18;   // parts sorted by their source at a time
constexpr size_t kChunkListMax = 1 << 20;  // chunk numbers gathered before a sort+unique

// The index's sub of the n-th record (from 1) of history file `id`: unique per extent
// (file ids are never reused within 2^48).
constexpr const char* kStopped = "stopped: the store is closing, or a fold waits for it";

uint64_t HistorySub(uint64_t id, uint32_t n) {
  return (id << 16) | n;
}

uint64_t FilesBytes(const std::string& dir, const char* ext) {
  uint64_t total = 0;
  std::error_code ec;
  for (auto& e : fs::directory_iterator(dir, ec)) {
    if (e.path().extension() != ext) continue;
    std::error_code size_ec;
    auto n = e.file_size(size_ec);
    if (!size_ec) total += n;
  }
  return total;
}

// Writes one kept point's extents, as capture-log records of seq `seq`, into history
// files of at most kHistoryFileBytes (docs/formats.md, "Compacted history").
class HistoryWriter {
 public:
  HistoryWriter(std::string dir, uint64_t seq, uint64_t epoch, uint64_t* next_id)
      : dir_(std::move(dir)), seq_(seq), epoch_(epoch), next_id_(next_id) {}

  // Adds an extent; its index entry goes to `refs`.
  Status Put(uint32_t disk, uint64_t offset, uint64_t length, RecordKind kind,
             std::span<const uint8_t> payload, std::vector<RecordRef>* refs) {
    if (!file_.valid() || pos_ + buf_.size() >= kHistoryFileBytes || n_ >= kHistoryRecordsMax) {
      OSR_RETURN_IF_ERROR(Roll());
    }
    RecordHeader h;
    h.seq = seq_;
    h.epoch = epoch_;
    h.offset = offset;
    h.length = length;
    h.payload_bytes = static_cast<uint32_t>(payload.size());
    h.disk = disk;
    h.kind = kind;
    size_t at = buf_.size();
    buf_.resize(at + RecordHeader::kSize + payload.size());
    h.Encode(buf_.data() + at, Crc32c(payload));
    std::copy(payload.begin(), payload.end(), buf_.begin() + at + RecordHeader::kSize);
    RecordRef r;
    r.seq = seq_;
    r.disk = disk;
    r.offset = offset;
    r.length = length;
    r.kind = kind;
    r.segment_first_seq = id_;
    r.payload_pos = pos_ + at + RecordHeader::kSize;
    r.sub = HistorySub(id_, ++n_);
    r.history = true;
    refs->push_back(r);
    if (buf_.size() >= kWriteBufferBytes) OSR_RETURN_IF_ERROR(Flush());
    return Status::Ok();
  }

  // Writes out and syncs the open file; the ids of every file written.
  Status Finish() { return Close(); }
  const std::vector<uint64_t>& ids() const { return ids_; }

 private:
  Status Roll() {
    OSR_RETURN_IF_ERROR(Close());
    id_ = (*next_id_)++;
    OSR_ASSIGN_OR_RETURN(file_, File::Open(HistoryPath(dir_, id_), File::Mode::kCreate));
    ids_.push_back(id_);
    capture::SegmentHeader sh;
    sh.first_seq = seq_;
    sh.disk_bytes = 0;
    buf_.assign(capture::SegmentHeader::kSize, 0);
    sh.Encode(buf_.data());
    pos_ = 0;
    n_ = 0;
    return Status::Ok();
  }
  Status Flush() {
    OSR_RETURN_IF_ERROR(file_.PWrite(pos_, buf_));
    pos_ += buf_.size();
    buf_.clear();
    return Status::Ok();
  }
  Status Close() {
    if (!file_.valid()) return Status::Ok();
    OSR_RETURN_IF_ERROR(Flush());
    OSR_RETURN_IF_ERROR(file_.DataSync());
    file_ = File();
    return Status::Ok();
  }

  std::string dir_;
  uint64_t seq_, epoch_;
  uint64_t* next_id_;
  File file_;
  uint64_t id_ = 0;
  uint64_t pos_ = 0;
  uint32_t n_ = 0;
  std::vector<uint8_t> buf_;
  std::vector<uint64_t> ids_;
};

}  // namespace

uint64_t RecoveryStore::compacted_through() const {
  std::lock_guard lock(mu_);
  return compacted_through_;
}

uint64_t RecoveryStore::history_id() const {
  std::lock_guard lock(mu_);
  return history_id_;
}

uint64_t RecoveryStore::history_bytes() const {
  return FilesBytes(dir_ + "/journal", ".log") + FilesBytes(dir_ + "/history", ".hist");
}

Result<std::optional<RecoveryStore::CompactionPlan>> RecoveryStore::PlanCompactionLocked(
    const std::vector<uint64_t>& keep, uint64_t through,
    const std::vector<uint64_t>& segment_ends) const {
  if (resyncing_ || initial_sync_ || differential_) {
    return Status(Code::kFailedPrecondition,
                  "a resynchronization is under way: history is compacted after it ends");
  }
  if (fold_target_ > base_seq_) {
    // Its step may end between points that would go: it is finished first.
    return Status(Code::kFailedPrecondition,
                  fmt::format("a fold up to seq {} did not finish; history is compacted "
                              "after the next fold (or start) finishes it",
                              fold_target_));
  }
  if (through > durable_seq_) {
    return InvalidArgument(
        fmt::format("through {} is beyond the store's durable seq {}", through, durable_seq_));
  }
  CompactionPlan plan;
  // Whole journal segments only: the last one wholly at or below `through`.
  plan.e = std::max(compacted_through_, base_seq_);
  for (uint64_t end : segment_ends) {
    if (end > through) break;
    plan.e = std::max(plan.e, end);
  }
  if (plan.e <= base_seq_) {  // nothing is held below a segment end
    return std::optional<CompactionPlan>();
  }
  for (uint64_t k : keep) {
    if (k > base_seq_ && k < plan.e && k >= consistent_from_) plan.kept.insert(k);
  }
  for (uint64_t k : plan.kept) {
    if (k < compacted_through_ && !kept_.contains(k)) {
      return InvalidArgument(fmt::format("seq {} was compacted away already", k));
    }
  }
  for (uint64_t p : pins_) {
    if (p > base_seq_ && p < plan.e && !plan.kept.contains(p)) {
      return Status(Code::kFailedPrecondition,
                    fmt::format("a view or failover disk at seq {} is open; compacting up to "
                                "seq {} would take it away (close it, or keep its point)",
                                p, plan.e));
    }
  }
  // Intervals whose bounds all stay (from the oldest on) are left as they are.
  std::set<uint64_t> old_bounds(kept_.upper_bound(base_seq_), kept_.end());
  if (compacted_through_ > base_seq_) old_bounds.insert(compacted_through_);
  plan.lo = base_seq_;
  for (uint64_t b : old_bounds) {
    if (b != plan.e && !plan.kept.contains(b)) break;
    plan.lo = b;
  }
  for (uint64_t k : plan.kept) {
    if (k > plan.lo) plan.bounds.push_back(k);
  }
  if (plan.lo < plan.e) plan.bounds.push_back(plan.e);
  return std::optional(std::move(plan));
}

Result<std::vector<uint64_t>> RecoveryStore::SegmentEnds() const {
  OSR_ASSIGN_OR_RETURN(auto segments, capture::ListSegments(dir_ + "/journal"));
  std::vector<uint64_t> ends;
  for (size_t i = 0; i + 1 < segments.size(); ++i) ends.push_back(segments[i + 1].first_seq - 1);
  return ends;
}

Status RecoveryStore::CheckCompaction(const std::vector<uint64_t>& keep, uint64_t through) const {
  if (maintenance_stopped_.load()) {
    return Status(Code::kCancelled, dir_ + ": the store is closing; no compaction starts");
  }
  OSR_ASSIGN_OR_RETURN(std::vector<uint64_t> ends, SegmentEnds());
  std::lock_guard lock(mu_);
  return PlanCompactionLocked(keep, through, ends).status();
}

Result<RecoveryStore::CompactResult> RecoveryStore::Compact(std::vector<uint64_t> keep,
                                                            uint64_t through) {
  std::lock_guard run(fold_run_mu_);  // no fold meanwhile
  if (CompactionMustStop()) {
    return Status(Code::kCancelled,
                  dir_ + ": the store is closing, or a fold waits for it; no compaction starts");
  }
  CompactResult out;
  out.bytes_before = history_bytes();
  OSR_ASSIGN_OR_RETURN(std::vector<uint64_t> ends, SegmentEnds());
  uint64_t lo, e, old_history_id, old_through;
  std::set<uint64_t> old_kept;
  std::vector<uint64_t> bounds;  // the kept seqs in (lo, e), then e
  {
    std::lock_guard lock(mu_);
    old_history_id = history_id_;
    old_through = compacted_through_;
    old_kept = kept_;
    OSR_ASSIGN_OR_RETURN(std::optional<CompactionPlan> plan,
                         PlanCompactionLocked(keep, through, ends));
    if (!plan) {
      out.compacted_through = std::max(compacted_through_, base_seq_);
      out.bytes_after = out.bytes_before;
      return out;
    }
    lo = plan->lo;
    e = plan->e;
    bounds = std::move(plan->bounds);
    // From here the seqs that go are neither readable nor pinnable.
    kept_ = std::move(plan->kept);
    compacted_through_ = e;
    out.compacted_through = e;
    out.kept_points = kept_.size() + 1;
  }
  if (bounds.empty()) {  // nothing changed
    OSR_RETURN_IF_ERROR(WriteMeta());
    out.bytes_after = history_bytes();
    return out;
  }
  {
    std::unique_lock drain(fold_mu_);  // reads that began before end first
  }
  auto step = [&](CompactionStep s) {
    if (compaction_step_hook_) compaction_step_hook_(s);
  };
  // The index names the compaction under way before anything is written: a crash from
  // here is undone or finished at open in (lo, e] alone (EndInterruptedCompaction). Its
  // files take ids from first_file on; the commit's history id is chosen now.
  VersionIndex::PendingCompaction pending{
      .old_history_id = old_history_id, .new_history_id = NewStoreId(), .lo = lo, .e = e};
  {
    std::lock_guard lock(mu_);
    pending.first_file = next_history_file_;
  }
  std::vector<HistoryFile> files;
  Status st = index_->SetPendingCompaction(pending);
  if (st.ok()) step(CompactionStep::kMarked);
  if (st.ok()) st = WriteHistory(lo, bounds, &files);
  if (st.ok()) st = SyncDir(dir_ + "/history");
  // The last moment to stop: after it the commit is a few small writes.
  if (st.ok() && CompactionMustStop()) st = Status(Code::kCancelled, kStopped);
  if (st.ok()) {
    // Synced with every entry of the new files: a commit found at open can be finished.
    pending.written = true;
    st = index_->SetPendingCompaction(pending);
  }
  if (st.ok()) step(CompactionStep::kWritten);
  if (!st.ok()) {
    // Nothing of it stays: the new entries and files go; the old history is whole, and
    // so are the seqs it could read.
    {
      std::lock_guard lock(mu_);
      kept_ = old_kept;
      compacted_through_ = old_through;
    }
    std::set<uint64_t> fresh;
    for (auto& f : files) fresh.insert(f.id);
    Status undo = index_->DropIf(lo, e, [&](const RecordRef& r) {
      return r.history && fresh.contains(r.segment_first_seq);
    });
    for (auto& f : files) {
      std::error_code ec;
      RemovePath(HistoryPath(dir_, f.id), ec);
    }
    // (Left in the index when the undo fails: the next open undoes it.)
    if (undo.ok()) undo = index_->EndPendingCompaction(old_history_id);
    if (!undo.ok()) spdlog::error("recovery store {}: {}", dir_, undo.ToString());
    // Damage found in a source, or a stop, is no failure to write (health shows those).
    if (st.code() == Code::kCorruption || st.code() == Code::kCancelled) {
      return Status(st.code(), fmt::format("compaction of {} undone: {}", dir_, st.message()));
    }
    return NoteWriteFailure("compaction", st, 0);
  }
  // The commit: store.json names the new files (and no old file of a changed interval).
  const uint64_t new_id = pending.new_history_id;
  {
    std::lock_guard lock(mu_);
    for (auto it = history_.begin(); it != history_.end();) {
      it = it->second > lo ? history_.erase(it) : std::next(it);
    }
    for (auto& f : files) history_[f.id] = f.seq;
    history_id_ = new_id;
  }
  OSR_RETURN_IF_ERROR(WriteMeta());
  step(CompactionStep::kCommitted);
  // The entries the new files replace go: journal records and old history of (lo, e].
  std::set<uint64_t> fresh;
  for (auto& f : files) fresh.insert(f.id);
  OSR_RETURN_IF_ERROR(index_->DropIf(lo, e, [&](const RecordRef& r) {
    return !(r.history && fresh.contains(r.segment_first_seq));
  }));
  step(CompactionStep::kDropped);
  OSR_RETURN_IF_ERROR(index_->EndPendingCompaction(new_id));
  step(CompactionStep::kIndexed);
  {
    std::unique_lock drain(fold_mu_);  // no read still holds an entry of a file that goes
  }
  RemoveCompactedFiles();
  out.bytes_after = history_bytes();
  spdlog::info(
      "recovery store {}: history compacted up to seq {} ({} kept point(s)): {} -> {} bytes", dir_,
      e, out.kept_points, out.bytes_before, out.bytes_after);
  return out;
}

Status RecoveryStore::WriteHistory(uint64_t lo, const std::vector<uint64_t>& bounds,
                                   std::vector<HistoryFile>* files) {
  std::error_code ec;
  CreateDirectories(dir_ + "/history", ec);
  if (ec) return Status::FromErrno(ec.value(), "create " + dir_ + "/history");
  uint64_t next_id, epoch;
  {
    std::lock_guard lock(mu_);
    next_id = next_history_file_;
    epoch = epoch_;
  }
  Status st;
  uint64_t prev = lo;
  std::vector<uint8_t> payload;
  std::vector<RecordRef> refs;
  for (uint64_t k : bounds) {
    // The chunks the interval's records touched, per disk.
    std::vector<std::vector<uint64_t>> chunks(DiskCount());
    std::vector<size_t> limits(DiskCount(), kChunkListMax);
    OSR_RETURN_IF_ERROR(index_->ForEachBySeq(prev, k, [&](const RecordRef& r) {
      if (r.disk >= chunks.size() || r.length == 0) return true;
      for (uint64_t c = r.offset / VersionIndex::kChunkBytes;
           c <= (r.offset + r.length - 1) / VersionIndex::kChunkBytes; ++c) {
        chunks[r.disk].push_back(c);
      }
      // Bounded by the disks' chunks, not the interval's records.
      if (chunks[r.disk].size() >= limits[r.disk]) {
        auto& cs = chunks[r.disk];
        std::sort(cs.begin(), cs.end());
        cs.erase(std::unique(cs.begin(), cs.end()), cs.end());
        limits[r.disk] = std::max(kChunkListMax, 2 * cs.size());
      }
      return true;
    }));
    HistoryWriter w(dir_, k, epoch, &next_id);
    for (uint32_t d = 0; d < DiskCount() && st.ok(); ++d) {
      auto& cs = chunks[d];
      std::sort(cs.begin(), cs.end());
      cs.erase(std::unique(cs.begin(), cs.end()), cs.end());
      std::vector<ReadPart> parts;
      // A window of parts at a time, taken in the order of their bytes in the journal (and
      // older history files): the sources are read nearly sequentially, not at random.
      // Their entries go in after the window: they lie in its chunks, at seq k, which no
      // later Collect (other chunks, or from k on) reads.
      auto flush = [&]() -> Status {
        auto source = [](const ReadPart& p) {
          bool zero = p.record.kind != RecordKind::kWrite;
          return std::tuple(zero, !zero && p.record.history, zero ? 0 : p.record.segment_first_seq,
                            zero ? p.offset : p.record.payload_pos + (p.offset - p.record.offset));
        };
        std::sort(parts.begin(), parts.end(),
                  [&](const ReadPart& a, const ReadPart& b) { return source(a) < source(b); });
        // A pending extent: parts that follow each other on the disk and in one record's
        // payload (a record split at chunk bounds), or zeros, merge up to kPartBytesMax.
        const ReadPart* first = nullptr;
        uint64_t p_len = 0;
        auto put = [&]() -> Status {
          if (first == nullptr) return Status::Ok();
          if (CompactionMustStop()) return Status(Code::kCancelled, kStopped);
          bool zero = first->record.kind != RecordKind::kWrite;
          payload.resize(zero ? 0 : p_len);
          if (!zero) OSR_RETURN_IF_ERROR(ReadPayload(first->record, first->offset, payload));
          OSR_RETURN_IF_ERROR(w.Put(d, first->offset, p_len,
                                    zero ? RecordKind::kZero : RecordKind::kWrite, payload, &refs));
          first = nullptr;
          p_len = 0;
          return Status::Ok();
        };
        for (const ReadPart& part : parts) {
          bool joins =
              first != nullptr && part.offset == first->offset + p_len &&
              p_len + part.length <= kPartBytesMax &&
              (first->record.kind != RecordKind::kWrite
                   ? part.record.kind != RecordKind::kWrite
                   : part.record.kind == RecordKind::kWrite &&
                         part.record.history == first->record.history &&
                         part.record.segment_first_seq == first->record.segment_first_seq &&
                         part.record.payload_pos == first->record.payload_pos);
          if (!joins) {
            OSR_RETURN_IF_ERROR(put());
            first = &part;
          }
          p_len += part.length;
        }
        OSR_RETURN_IF_ERROR(put());
        parts.clear();
        Status added = index_->Add(refs, /*advance=*/false);
        refs.clear();
        return added;
      };
      for (uint64_t c : cs) {
        if (CompactionMustStop()) {
          st = Status(Code::kCancelled, kStopped);
          break;
        }
        uint64_t off = c * VersionIndex::kChunkBytes;
        uint64_t len = std::min(VersionIndex::kChunkBytes, DiskBytes(d) - off);
        st = index_->Collect(d, off, len, prev, k, &parts);
        if (!st.ok()) break;
        if (parts.size() >= kWindowParts) {
          st = flush();
          if (!st.ok()) break;
        }
      }
      if (st.ok()) st = flush();
    }
    if (st.ok()) st = w.Finish();
    for (uint64_t id : w.ids()) files->push_back({id, k});
    if (!st.ok()) break;
    prev = k;
  }
  std::lock_guard lock(mu_);
  next_history_file_ = next_id;
  return st;
}

Result<bool> RecoveryStore::EndInterruptedCompaction(const VersionIndex::PendingCompaction& p) {
  if (index_->history_id() != p.old_history_id) return false;
  // The compaction's own entries: extents of its files (ids from first_file on), all in
  // (lo, e]; every older file has a smaller id.
  auto fresh = [&](const RecordRef& r) { return r.history && r.segment_first_seq >= p.first_file; };
  uint64_t history_id;
  {
    std::lock_guard lock(mu_);
    history_id = history_id_;
  }
  if (history_id == p.old_history_id) {
    // Not committed: what it added goes (its files, which store.json does not name, go
    // with RemoveCompactedFiles).
    spdlog::warn(
        "recovery store {}: a compaction of seqs {}..{} was cut short before its commit; "
        "undoing it",
        dir_, p.lo + 1, p.e);
    OSR_RETURN_IF_ERROR(index_->DropIf(p.lo, p.e, fresh));
    OSR_RETURN_IF_ERROR(index_->EndPendingCompaction(p.old_history_id));
    return true;
  }
  if (history_id == p.new_history_id && p.written) {
    // Committed: the entries its files replace go, as Compact would have done.
    spdlog::warn(
        "recovery store {}: a compaction of seqs {}..{} was cut short after its commit; "
        "finishing it",
        dir_, p.lo + 1, p.e);
    OSR_RETURN_IF_ERROR(index_->DropIf(p.lo, p.e, [&](const RecordRef& r) { return !fresh(r); }));
    OSR_RETURN_IF_ERROR(index_->EndPendingCompaction(p.new_history_id));
    return true;
  }
  return false;
}

Status RecoveryStore::IndexHistory() {
  std::map<uint64_t, uint64_t> files;
  {
    std::lock_guard lock(mu_);
    files = history_;
  }
  std::vector<RecordRef> refs;
  std::vector<uint8_t> hb(RecordHeader::kSize);
  for (auto [id, seq] : files) {
    const std::string path = HistoryPath(dir_, id);
    OSR_ASSIGN_OR_RETURN(File f, File::Open(path, File::Mode::kReadOnly));
    OSR_ASSIGN_OR_RETURN(uint64_t size, f.Size());
    uint8_t sh[capture::SegmentHeader::kSize];
    if (size < sizeof sh) return Corruption(path + ": shorter than its header");
    OSR_RETURN_IF_ERROR(f.PRead(0, sh));
    auto header = capture::SegmentHeader::Decode(sh);
    if (!header.ok() || header->first_seq != seq) {
      return Corruption(fmt::format("{}: not the history file of seq {}", path, seq));
    }
    uint64_t pos = sizeof sh;
    uint32_t n = 0;
    std::vector<uint8_t> payload;
    while (pos < size) {
      auto damaged = [&](const std::string& what) {
        return Corruption(
            fmt::format("history file {} is damaged at byte {}: {}", path, pos, what));
      };
      if (size - pos < RecordHeader::kSize) return damaged("truncated record header");
      OSR_RETURN_IF_ERROR(f.PRead(pos, hb));
      auto h = RecordHeader::Decode(hb);
      if (!h.ok()) return damaged(h.status().message());
      if (size - pos - RecordHeader::kSize < h->payload_bytes) return damaged("truncated record");
      payload.resize(h->payload_bytes);
      OSR_RETURN_IF_ERROR(f.PRead(pos + RecordHeader::kSize, payload));
      if (!RecordHeader::Verify(hb.data(), payload)) return damaged("CRC mismatch");
      if (h->seq != seq || h->disk >= DiskCount() || h->offset + h->length > DiskBytes(h->disk)) {
        return damaged(
            fmt::format("record of seq {}, disk {} does not belong here", h->seq, h->disk));
      }
      refs.push_back({seq, h->disk, h->offset, h->length, h->kind, id, pos + RecordHeader::kSize,
                      HistorySub(id, ++n), true});
      pos += RecordHeader::kSize + h->payload_bytes;
      if (refs.size() >= 4096) {
        OSR_RETURN_IF_ERROR(index_->Add(refs, /*advance=*/false));
        refs.clear();
      }
    }
  }
  return index_->Add(refs, /*advance=*/false);
}

void RecoveryStore::RemoveCompactedFiles() {
  uint64_t through;
  std::set<uint64_t> named;
  {
    std::lock_guard lock(mu_);
    through = compacted_through_;
    for (auto& [id, seq] : history_) named.insert(id);
  }
  std::error_code ec;
  auto segments = capture::ListSegments(dir_ + "/journal");
  if (segments.ok() && history_id() != 0) {
    for (size_t i = 0; i + 1 < segments->size(); ++i) {
      if ((*segments)[i + 1].first_seq - 1 > through) break;
      {
        std::lock_guard lock(mu_);
        segments_.erase((*segments)[i].first_seq);
        ForgetVerified();
      }
      RemovePath((*segments)[i].path, ec);
    }
  }
  for (auto& e : fs::directory_iterator(dir_ + "/history", ec)) {
    if (e.path().extension() != ".hist") continue;
    uint64_t id = 0;
    std::string stem = e.path().stem().string();
    auto [p, err] = std::from_chars(stem.data(), stem.data() + stem.size(), id);
    if (err == std::errc() && p == stem.data() + stem.size() && named.contains(id)) continue;
    {
      std::lock_guard lock(mu_);
      segments_.erase(id | kHistoryKeyBit);
      ForgetVerified();
    }
    std::error_code rm;
    RemovePath(e.path(), rm);
  }
}

Status RecoveryStore::ApplyFromIndex(uint64_t from, uint64_t target) {
  std::vector<uint8_t> buf;
  Status st;
  OSR_RETURN_IF_ERROR(index_->ForEachBySeq(from, target, [&](const RecordRef& r) {
    if (r.disk >= DiskCount() || r.length == 0) return true;
    File& f = slots_[r.disk].base;
    if (r.kind == RecordKind::kWrite) {
      buf.resize(r.length);
      st = ReadPayload(r, r.offset, buf);
      if (st.ok()) st = f.PWrite(r.offset, buf);
    } else {
      st = f.PunchHole(r.offset, r.length);
      if (!st.ok() && st.code() == Code::kNotSupported) st = f.WriteZeroes(r.offset, r.length);
    }
    return st.ok();
  }));
  return st;
}

}  // namespace osr::store
