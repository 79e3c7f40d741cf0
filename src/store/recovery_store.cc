#include "store/recovery_store.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "capture/log_reader.h"
#include "common/crc32c.h"
#include "common/json_in.h"
#include "common/le.h"

namespace osr::store {

namespace fs = std::filesystem;
using capture::RecordHeader;
using capture::RecordKind;

namespace {

constexpr int kMetaVersion = 1;

}  // namespace

uint64_t NewStoreId() {
  std::random_device rd;
  uint64_t id = (uint64_t{rd()} << 32) | rd();
  return id == 0 || id == UINT64_MAX ? 1 : id;
}

std::string HistoryPath(const std::string& dir, uint64_t id) {
  return fmt::format("{}/history/{:020}.hist", dir, id);
}

namespace {

std::string BasePath(const std::string& dir, size_t i) {
  return fmt::format("{}/base/{}.img", dir, i);
}

// staging/staged.list: which regions of the staging images hold a resync's data, durably
// (docs/formats.md, "Staged-region list"). A 64-byte header, then 32-byte records.
constexpr uint8_t kStagedMagic[8] = {'O', 'S', 'R', 'S', 'T', 'A', 'G', 'E'};
constexpr uint32_t kStagedVersion = 1;
constexpr size_t kStagedHeaderBytes = 64;
constexpr size_t kStagedRecordBytes = 32;
constexpr size_t kStagedReadRecords = 4096;  // records read at a time at open

std::string StagedListPath(const std::string& dir) {
  return dir + "/staging/staged.list";
}

// store.json disk_changes, checked against the disks as they are now: by seq, each of a
// disk that exists, named as it is, growing (was_bytes 0: added) to no more than its size.
Result<std::vector<RecoveryStore::DiskChange>> ParseDiskChanges(const nlohmann::json& list,
                                                                const std::vector<StoreDisk>& disks,
                                                                const std::string& dir) {
  std::vector<RecoveryStore::DiskChange> out;
  for (size_t i = 0; i < list.size(); ++i) {
    std::string where = fmt::format("{}/store.json: disk_changes[{}].", dir, i);
    json_in::Fields f(list[i], where);
    RecoveryStore::DiskChange c;
    c.seq = f.U64("seq");
    uint64_t disk = f.U64("disk");
    c.name = f.String("name");
    c.was_bytes = f.U64("was_bytes");
    c.size_bytes = f.U64("size_bytes");
    if (!f.ok()) return Corruption(f.status().message());
    if (disk >= disks.size() || disks[disk].name != c.name || c.was_bytes >= c.size_bytes ||
        c.size_bytes > disks[disk].size_bytes ||
        (!out.empty() &&
         (c.seq < out.back().seq || (c.seq == out.back().seq && c.disk <= out.back().disk)))) {
      return Corruption(where + " does not fit the disks or the changes before it");
    }
    c.disk = static_cast<uint32_t>(disk);
    out.push_back(std::move(c));
  }
  return out;
}

std::array<uint8_t, kStagedHeaderBytes> EncodeStagedHeader(uint64_t from, bool initial,
                                                           uint32_t disks) {
  std::array<uint8_t, kStagedHeaderBytes> h{};
  std::memcpy(h.data(), kStagedMagic, 8);
  Le32(h.data() + 8, kStagedVersion);
  Le32(h.data() + 12, initial ? 1 : 0);  // flags: bit 0, an initial copy
  Le64(h.data() + 16, from);
  Le32(h.data() + 24, disks);
  Le32(h.data() + 60, Crc32c(h.data(), 60));
  return h;
}

void EncodeStagedRecord(uint8_t* p, uint32_t disk, uint64_t offset, uint64_t length) {
  std::memset(p, 0, kStagedRecordBytes);
  Le32(p, disk);
  Le64(p + 8, offset);
  Le64(p + 16, length);
  Le32(p + 28, Crc32c(p, 28));
}

int64_t SteadyNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

Result<std::unique_ptr<RecoveryStore>> RecoveryStore::Create(const std::string& dir,
                                                             const std::vector<StoreDisk>& disks,
                                                             uint64_t base_seq, Start start,
                                                             const std::vector<std::string>& images,
                                                             const StoreOrigin& origin,
                                                             const StoreOptions& options) {
  if (disks.empty()) return InvalidArgument("a recovery store needs at least one disk");
  if (disks.size() > kDisksMax) {
    return InvalidArgument(fmt::format("a recovery store takes at most {} disks", kDisksMax));
  }
  if (origin.epoch < 1 || origin.epoch > kEpochMax) {
    return InvalidArgument(
        fmt::format("epoch {} is out of range (1..{})", origin.epoch, kEpochMax));
  }
  if (!origin.source.empty() && !ValidName(origin.source)) {
    return InvalidArgument("source '" + origin.source + "' is not a site name");
  }
  std::error_code ec;
  if (fs::exists(dir + "/store.json", ec)) {
    return Status(Code::kAlreadyExists, "a recovery store already exists in " + dir);
  }
  if (start == Start::kDifferential) {
    if (images.size() != disks.size()) return InvalidArgument("one image per disk is needed");
    for (size_t i = 0; i < disks.size(); ++i) {
      auto size = fs::file_size(images[i], ec);
      if (ec || size != disks[i].size_bytes) {
        return InvalidArgument(fmt::format("{} is not a {}-byte image of disk {}", images[i],
                                           disks[i].size_bytes, disks[i].name));
      }
    }
  }
  CreateDirectories(dir + "/base", ec);
  if (ec) return Status::FromErrno(ec.value(), "create " + dir);
  CreateDirectories(dir + "/journal", ec);
  if (ec) return Status::FromErrno(ec.value(), "create " + dir + "/journal");
  for (size_t i = 0; i < disks.size(); ++i) {
    if (disks[i].size_bytes == 0) return InvalidArgument("disk " + disks[i].name + " has size 0");
    if (start == Start::kDifferential) {
      // Same file system: a rename, O(1) in the disk's size. (Before store.json exists:
      // a crash in between leaves images in base/ without a store, which the site moves
      // back to its group when it starts.)
      RenamePath(images[i], BasePath(dir, i), ec);
      if (ec) {
        Status st = Status::FromErrno(ec.value(), "move " + images[i] + " into the store");
        for (size_t k = 0; k < i; ++k) {  // put back what moved: nothing half-done
          std::error_code back;
          RenamePath(BasePath(dir, k), images[k], back);
        }
        return st;
      }
      continue;
    }
    OSR_ASSIGN_OR_RETURN(File f, File::Open(BasePath(dir, i), File::Mode::kCreate));
    OSR_RETURN_IF_ERROR(f.Truncate(disks[i].size_bytes));
    OSR_RETURN_IF_ERROR(f.Sync());
  }
  // The images' names are durable before store.json says there is a store (and, for a
  // differential store, their old folders no longer name them).
  OSR_RETURN_IF_ERROR(SyncDir(dir + "/base"));
  if (start == Start::kDifferential) {
    std::set<std::string> from;
    for (const auto& img : images) from.insert(fs::path(img).parent_path().string());
    for (const auto& d : from) OSR_RETURN_IF_ERROR(SyncDir(d.empty() ? "." : d));
  }
  std::unique_ptr<RecoveryStore> s(new RecoveryStore());
  s->dir_ = dir;
  s->options_ = options;
  s->SetDisks(disks);
  s->base_seq_ = base_seq;
  s->journal_id_ = NewStoreId();
  s->epoch_ = origin.epoch;
  s->source_ = origin.source;
  s->initial_sync_ = start == Start::kFullCopy;
  if (start == Start::kDifferential) {
    s->differential_ = true;
    s->consistent_from_ = base_seq + 1;
  }
  Status st = s->WriteMeta();
  if (st.ok()) {
    // The store's own folder is named durably in its parent once Create returns.
    fs::path p = fs::path(dir).lexically_normal();
    if (!p.has_filename()) p = p.parent_path();
    st = SyncDir(p.has_parent_path() ? p.parent_path().string() : ".");
  }
  if (st.ok()) st = s->OpenParts();
  if (!st.ok() && start == Start::kDifferential) {
    // Nothing half-done: the images go back where they were, and no store is left.
    s.reset();
    RemovePath(dir + "/store.json", ec);
    for (size_t k = 0; k < images.size(); ++k) {
      std::error_code back;
      RenamePath(BasePath(dir, k), images[k], back);
    }
  }
  OSR_RETURN_IF_ERROR(st);
  return s;
}

Result<std::unique_ptr<RecoveryStore>> RecoveryStore::Open(const std::string& dir,
                                                           const StoreOptions& options) {
  std::ifstream in(dir + "/store.json");
  if (!in) return NotFound("no recovery store in " + dir);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  // Read back through the typed layer: a damaged file is reported, never thrown.
  auto j = json_in::ParseObject(text, dir + "/store.json");
  if (!j.ok()) return Corruption(j.status().message());
  json_in::Fields f(*j, dir + "/store.json: ");
  uint64_t version = f.U64("version");
  const nlohmann::json* disks = f.Array("disks", /*optional=*/false);
  std::unique_ptr<RecoveryStore> s(new RecoveryStore());
  s->dir_ = dir;
  s->options_ = options;
  s->base_seq_ = f.U64("base_seq");
  s->journal_id_ = f.U64("journal_id", 0);
  s->consistent_from_ = f.U64("consistent_from", 0);
  // Stores made before epochs came from the vault may say 0 (never raised): the first
  // epoch an item has is 1.
  s->epoch_ = std::max<uint64_t>(f.U64("epoch", 1), 1);
  s->source_ = f.String("source", "");
  s->initial_sync_ = f.Bool("initial_sync", false);
  s->differential_ = f.Bool("differential", false);
  // A resync that was under way when the store closed goes on from the regions its staged
  // list says are there (LoadStaged), or starts over; until it ends, seqs after its start
  // stay unusable.
  // A fold step cut short (FoldStep): finished at open, seqs below it unreadable till then.
  if (f.Has("folding_to")) s->fold_target_ = f.U64("folding_to");
  if (const nlohmann::json* c = f.Object("compaction", /*optional=*/true); c && f.ok()) {
    json_in::Fields cf(*c, dir + "/store.json: compaction.");
    s->compacted_through_ = cf.U64("through");
    s->next_history_file_ = cf.U64("next_file");
    s->history_id_ = cf.U64("history_id");
    const nlohmann::json* kept = cf.Array("kept", false);
    const nlohmann::json* files = cf.Array("files", false);
    for (size_t i = 0; cf.ok() && i < kept->size(); ++i) {
      if (!(*kept)[i].is_number_unsigned()) {
        cf.Fail("kept", "holds a value that is not a seq");
        break;
      }
      s->kept_.insert((*kept)[i].get<uint64_t>());
    }
    for (size_t i = 0; cf.ok() && i < files->size(); ++i) {
      const auto& e = (*files)[i];
      if (!e.is_array() || e.size() != 2 || !e[0].is_number_unsigned() ||
          !e[1].is_number_unsigned()) {
        cf.Fail("files", "holds an entry that is not [id, seq]");
        break;
      }
      s->history_[e[0].get<uint64_t>()] = e[1].get<uint64_t>();
    }
    if (cf.ok() && s->history_id_ == 0) cf.Fail("history_id", "is 0");
    if (!cf.ok()) return Corruption(cf.status().message());
  }
  if (f.Has("resync_from")) {
    s->resyncing_ = true;
    s->resync_from_ = f.U64("resync_from");
  }
  if (f.ok() && version != kMetaVersion) f.Fail("version", "is not 1");
  if (f.ok() && !s->source_.empty() && !ValidName(s->source_)) f.Fail("source", "is not a name");
  if (!f.ok()) return Corruption(f.status().message());
  std::vector<StoreDisk> opened;
  for (size_t i = 0; i < disks->size(); ++i) {
    json_in::Fields d((*disks)[i], fmt::format("{}/store.json: disks[{}].", dir, i));
    StoreDisk disk{d.String("name"), d.U64("size_bytes")};
    if (!d.ok()) return Corruption(d.status().message());
    opened.push_back(std::move(disk));
  }
  if (opened.empty() || opened.size() > kDisksMax) {
    return Corruption(
        fmt::format("{}/store.json: {} disks (1..{})", dir, opened.size(), kDisksMax));
  }
  s->SetDisks(opened);
  if (const nlohmann::json* changes = f.Array("disk_changes", /*optional=*/true); changes) {
    OSR_ASSIGN_OR_RETURN(s->disk_changes_, ParseDiskChanges(*changes, opened, dir));
  }
  if (s->epoch_ > kEpochMax) {
    // Only an older osr, which took epochs from senders, can have written this.
    spdlog::warn(
        "{}: epoch {} is beyond any a vault gives ({}): it came from a sender; "
        "every source is refused as stale until the store is made again",
        dir, s->epoch_, kEpochMax);
  }
  OSR_RETURN_IF_ERROR(s->OpenParts());
  if (s->resyncing_) s->LoadStaged();
  return s;
}

RecoveryStore::~RecoveryStore() = default;

Status RecoveryStore::WriteMeta(const std::vector<StoreDisk>* layout) {
  nlohmann::json disks = nlohmann::json::array();
  for (const StoreDisk& d : layout ? *layout : this->disks()) {
    disks.push_back({{"name", d.name}, {"size_bytes", d.size_bytes}});
  }
  nlohmann::json changes = nlohmann::json::array();
  uint64_t base, consistent, epoch;
  nlohmann::json resync;
  bool initial = false, differential = false;
  nlohmann::json folding;
  uint64_t journal_id;
  nlohmann::json compaction;  // null: no compacted history
  {
    std::lock_guard lock(mu_);
    journal_id = journal_id_;
    for (const DiskChange& c : disk_changes_) {
      changes.push_back({{"seq", c.seq},
                         {"disk", c.disk},
                         {"name", c.name},
                         {"was_bytes", c.was_bytes},
                         {"size_bytes", c.size_bytes}});
    }
    if (history_id_ != 0) {
      nlohmann::json files = nlohmann::json::array();
      for (auto [id, seq] : history_) files.push_back({id, seq});
      compaction = {{"through", compacted_through_},
                    {"kept", nlohmann::json(std::vector<uint64_t>(kept_.begin(), kept_.end()))},
                    {"files", files},
                    {"next_file", next_history_file_},
                    {"history_id", history_id_}};
    }
    if (fold_target_ > base_seq_) folding = fold_target_;
    epoch = epoch_;
    base = base_seq_;
    consistent = consistent_from_;
    if (resyncing_) resync = resync_from_;
    initial = initial_sync_;
    differential = differential_;
  }
  std::string text = nlohmann::json{{"version", kMetaVersion},  {"disks", disks},
                                    {"base_seq", base},         {"consistent_from", consistent},
                                    {"resync_from", resync},    {"initial_sync", initial},
                                    {"epoch", epoch},           {"differential", differential},
                                    {"source", source_},        {"folding_to", folding},
                                    {"journal_id", journal_id}, {"compaction", compaction},
                                    {"disk_changes", changes}}
                         .dump(1);
  return WriteFileAtomic(dir_ + "/store.json",
                         {reinterpret_cast<const uint8_t*>(text.data()), text.size()});
}

void RecoveryStore::SetDisks(const std::vector<StoreDisk>& disks) {
  OSR_CHECK(disks.size() <= kDisksMax);
  for (size_t i = 0; i < disks.size(); ++i) {
    slots_[i].name = disks[i].name;
    slots_[i].size_bytes.store(disks[i].size_bytes);
  }
  disk_count_.store(static_cast<uint32_t>(disks.size()), std::memory_order_release);
}

Status RecoveryStore::OpenParts() {
  for (uint32_t i = 0; i < DiskCount(); ++i) {
    // A disk change is recorded in store.json before its base is made or grown
    // (ApplyDiskChanges): a crash between leaves the base short or missing, and the
    // change is finished here. Anything else that disagrees is damage.
    bool changed = false;
    for (const DiskChange& c : disk_changes_) changed = changed || c.disk == i;
    auto mode = changed ? File::Mode::kCreate : File::Mode::kReadWrite;
    OSR_ASSIGN_OR_RETURN(File f, File::Open(BasePath(dir_, i), mode));
    OSR_ASSIGN_OR_RETURN(uint64_t size, f.Size());
    if (size > DiskBytes(i) && size - DiskBytes(i) <= kDiskBytesMax) {
      // A grow undone (ApplyDiskChanges) after store.json said so and before its base was
      // cut back: nothing past a disk's size is readable at any seq.
      spdlog::warn(
          "recovery store {}: the base of disk {} has {} bytes, {} more than the disk: "
          "cut back (a disk change undone)",
          dir_, slots_[i].name, size, size - DiskBytes(i));
      OSR_RETURN_IF_ERROR(f.Truncate(DiskBytes(i)));
      size = DiskBytes(i);
    }
    if (changed && size < DiskBytes(i)) {
      OSR_RETURN_IF_ERROR(f.Truncate(DiskBytes(i)));
      OSR_RETURN_IF_ERROR(f.Sync());
      OSR_RETURN_IF_ERROR(SyncDir(dir_ + "/base"));
      spdlog::info("recovery store {}: disk {} made {} bytes, as its change says", dir_,
                   slots_[i].name, DiskBytes(i));
      size = DiskBytes(i);
    }
    if (size != DiskBytes(i)) {
      return Corruption(fmt::format("{}: base of disk {} has {} bytes, not {}", dir_,
                                    slots_[i].name, size, DiskBytes(i)));
    }
    slots_[i].base = std::move(f);
  }
  OSR_RETURN_IF_ERROR(OpenIndex());
  if (journal_id_ == 0) {  // a store made before journals had ids
    journal_id_ = NewStoreId();
    OSR_RETURN_IF_ERROR(WriteMeta());
  }
  if (index_->journal_id() != journal_id_) {
    // An index of another journal (none yet, an older copy, or one left from before the
    // journal started over): made again from this journal.
    if (index_->journal_id() != 0) {
      spdlog::warn("recovery store {}: its index describes another journal; indexing it again",
                   dir_);
    }
    OSR_RETURN_IF_ERROR(index_->Clear(base_seq_, journal_id_));
  }
  bool history_matches = index_->history_id() == history_id_;
  if (auto pending = index_->pending_compaction()) {
    // A compaction cut short: undone or finished in its own range.
    OSR_ASSIGN_OR_RETURN(history_matches, EndInterruptedCompaction(*pending));
  }
  if (!history_matches) {
    // An index of another history (or of a compaction cut short that does not fit it): the
    // history files store.json names, then every journal record after them.
    if (history_id_ != 0 || index_->history_id() != 0) {
      spdlog::warn(
          "recovery store {}: its index does not match its compacted history; "
          "indexing the history files and the journal again",
          dir_);
    }
    OSR_RETURN_IF_ERROR(index_->Clear(std::max(base_seq_, compacted_through_), journal_id_));
    OSR_RETURN_IF_ERROR(IndexHistory());
    OSR_RETURN_IF_ERROR(index_->SetHistoryId(history_id_));
  }
  // The records the index lacks: those after what it says it holds (a power loss keeps a
  // prefix of its batches), never the whole journal. Reading stops at a damaged tail.
  const uint64_t index_from = std::max(index_->indexed_through(), base_seq_);
  std::vector<RecordRef> pending;
  Status added;
  auto visit = [&](const RecordHeader& h, std::span<const uint8_t>, const capture::SegmentInfo& seg,
                   uint64_t payload_pos) {
    if (h.seq <= index_from || h.seq <= compacted_through_) return true;  // (history: above)
    if (h.disk >= DiskCount()) return true;  // refused at Append; cannot be here
    pending.push_back({h.seq, h.disk, h.offset, h.length, h.kind, seg.first_seq, payload_pos});
    if (pending.size() >= kIndexBatchRecords) {
      added = index_->Add(pending);
      pending.clear();
    }
    return added.ok();
  };
  OSR_ASSIGN_OR_RETURN(auto summary, capture::LogReader::ScanWithPositions(dir_ + "/journal", visit,
                                                                           false, index_from + 1));
  if (added.ok()) added = index_->Add(pending);
  OSR_RETURN_IF_ERROR(added);
  if (!summary.errors.empty() && !summary.tail_damaged) {
    const auto& e = summary.errors.front();
    return Corruption(fmt::format("journal of {} is damaged: {} at byte {}: {}", dir_, e.segment,
                                  e.position, e.message));
  }
  if (summary.records > 0 && summary.last_seq > index_from) {
    spdlog::info("recovery store {}: indexed the journal's {} record(s) after seq {}", dir_,
                 summary.last_seq - index_from, index_from);
  }
  capture::CaptureLogOptions lo;
  lo.dir = dir_ + "/journal";
  lo.disk_bytes = 0;  // a group journal: records name their disk
  lo.first_seq = base_seq_ + 1;
  lo.segment_bytes_target = options_.journal_segment_bytes;
  lo.verify_all_on_open = false;  // its tail only: opening costs no history
  OSR_ASSIGN_OR_RETURN(journal_, capture::CaptureLog::Open(
                                     lo, [this](std::span<const capture::CaptureLog::Written> w,
                                                bool ok) { OnWritten(w, ok); }));
  durable_time_ns_ = journal_->recovered_time_ns();
  if (index_->indexed_through() > journal_->last_seq()) {
    // Indexed at write-out, then lost from the journal (a crash before its sync, a cut).
    OSR_RETURN_IF_ERROR(index_->DropAfter(journal_->last_seq()));
  }
  if (journal_->last_seq() < base_seq_) {
    // Every record is in the base (a history replaced, BeginResyncReplacingHistory, cut
    // short before the journal started over): start it over now.
    OSR_RETURN_IF_ERROR(StartJournalAt(base_seq_ + 1));
  }
  // A torn tail was cut by the log's recovery; the index stops before it too.
  durable_seq_ = std::max(journal_->last_seq(), base_seq_);
  journal_cut_ = journal_->pending_cut();
  if (auto& cut = journal_cut_) {
    spdlog::warn(
        "recovery store {}: its journal was cut after seq {} ({}); the records after it "
        "must come again from the source",
        dir_, cut->after_seq, cut->reason);
  }
  OSR_RETURN_IF_ERROR(CheckHistoryState());
  RemoveCompactedFiles();
  return FinishInterruptedFold();
}

Status RecoveryStore::CheckHistoryState() {
  // store.json decides which files stay: what it says must hold before anything goes.
  std::lock_guard lock(mu_);
  const std::string meta = dir_ + "/store.json";
  if (fold_target_ > durable_seq_) {
    return Corruption(fmt::format("{}: folding_to {} is beyond the journal's end (seq {})", meta,
                                  fold_target_, durable_seq_));
  }
  if (fold_target_ > base_seq_ && fold_target_ < compacted_through_ &&
      !kept_.contains(fold_target_)) {
    return Corruption(fmt::format("{}: folding_to {} lies between kept points of compacted history",
                                  meta, fold_target_));
  }
  if (history_id_ == 0) return Status::Ok();
  if (compacted_through_ > durable_seq_) {
    return Corruption(fmt::format("{}: compaction.through {} is beyond the journal's end (seq {})",
                                  meta, compacted_through_, durable_seq_));
  }
  if (!kept_.empty() && *kept_.rbegin() >= compacted_through_) {
    return Corruption(fmt::format("{}: compaction.kept holds seq {}, not below its through {}",
                                  meta, *kept_.rbegin(), compacted_through_));
  }
  for (auto [id, seq] : history_) {
    std::error_code ec;
    if (!fs::exists(HistoryPath(dir_, id), ec)) {
      return Corruption(
          fmt::format("{} names history file {}, which is missing", meta, HistoryPath(dir_, id)));
    }
    if (seq > compacted_through_ ||
        (seq != compacted_through_ && !kept_.contains(seq) && seq > base_seq_)) {
      return Corruption(
          fmt::format("{}: history file {} is of seq {}, not a kept point", meta, id, seq));
    }
  }
  if (compacted_through_ > base_seq_) {
    // The compacted end is a journal segment's end: the next segment starts right after it.
    auto segments = capture::ListSegments(dir_ + "/journal");
    if (!segments.ok()) return segments.status();
    bool at_bound = durable_seq_ == compacted_through_;
    for (const auto& seg : *segments)
      at_bound = at_bound || seg.first_seq == compacted_through_ + 1;
    if (!at_bound) {
      return Corruption(fmt::format("{}: compaction.through {} is not where a journal segment ends",
                                    meta, compacted_through_));
    }
  }
  return Status::Ok();
}

Status RecoveryStore::OpenIndex() {
  const std::string dir = dir_ + "/index";
  auto ix = VersionIndex::Open(dir);
  if (!ix.ok() && ix.status().code() == Code::kCorruption) {
    // The index is derived from the journal: a damaged one is made again (from the whole
    // journal this once).
    spdlog::warn("recovery store {}: {}; indexing the journal again", dir_, ix.status().ToString());
    std::error_code ec;
    RemoveAllPaths(dir, ec);
    if (ec) return Status::FromErrno(ec.value(), "remove " + dir);
    ix = VersionIndex::Open(dir);
  }
  OSR_RETURN_IF_ERROR(ix.status());
  index_ = std::move(*ix);
  return Status::Ok();
}

void RecoveryStore::OnWritten(std::span<const capture::CaptureLog::Written> records, bool ok) {
  if (!ok) return;  // Append reports the failure
  std::vector<RecordRef> refs;
  refs.reserve(records.size());
  for (const auto& w : records) {
    refs.push_back({w.seq, w.disk, w.offset, w.length, w.kind, w.segment_first_seq, w.payload_pos});
  }
  Status st = index_->Add(refs);
  if (!st.ok()) {
    // The append that wrote these fails (Append checks index_error_ after its sync).
    std::lock_guard lock(mu_);
    if (index_error_.ok()) index_error_ = st;
  }
}

std::vector<StoreDisk> RecoveryStore::disks() const {
  std::vector<StoreDisk> out;
  for (uint32_t i = 0; i < DiskCount(); ++i) out.push_back({slots_[i].name, DiskBytes(i)});
  return out;
}

std::vector<StoreDisk> RecoveryStore::DisksBefore(uint64_t first_seq) const {
  std::vector<StoreDisk> out;
  std::lock_guard lock(mu_);
  for (uint32_t i = 0; i < DiskCount(); ++i) {
    uint64_t size = DiskBytes(i);
    for (auto c = disk_changes_.rbegin(); c != disk_changes_.rend() && c->seq >= first_seq; ++c) {
      if (c->disk == i) size = c->was_bytes;
    }
    if (size > 0) out.push_back({slots_[i].name, size});
  }
  return out;
}

std::vector<StoreDisk> RecoveryStore::DisksAt(uint64_t seq) const {
  std::vector<StoreDisk> out;
  for (uint32_t i = 0; i < DiskCount(); ++i) {
    auto d = DiskAt(i, seq);
    if (d.ok()) out.push_back(std::move(*d));
  }
  return out;
}

uint64_t RecoveryStore::DiskBytesAtLocked(uint32_t disk, uint64_t seq) const {
  uint64_t size = DiskBytes(disk);
  // Undo, newest first, every change of the disk after seq.
  for (auto c = disk_changes_.rbegin(); c != disk_changes_.rend() && c->seq > seq; ++c) {
    if (c->disk == disk) size = c->was_bytes;
  }
  return size;
}

Result<StoreDisk> RecoveryStore::DiskAt(uint32_t disk, uint64_t seq) const {
  if (disk >= DiskCount()) return NotFound(fmt::format("no disk {}", disk));
  std::lock_guard lock(mu_);
  uint64_t size = DiskBytesAtLocked(disk, seq);
  if (size == 0) {
    return NotFound(fmt::format("disk {} was added after seq {}", slots_[disk].name, seq));
  }
  return StoreDisk{slots_[disk].name, size};
}

std::vector<RecoveryStore::DiskChange> RecoveryStore::disk_changes() const {
  std::lock_guard lock(mu_);
  return disk_changes_;
}

Status RecoveryStore::CheckDiskChange(const RecordHeader& h, std::span<const uint8_t> payload,
                                      std::vector<std::pair<std::string, uint64_t>>* sizes,
                                      std::vector<DiskChange>* out) const {
  std::string name(payload.begin(), payload.end());
  auto refuse = [&](std::string_view why) {
    return InvalidArgument(fmt::format("record seq {} (disk {} '{}' to {} bytes): {}", h.seq,
                                       h.disk, name, h.offset, why));
  };
  if (!ValidName(name)) return refuse("not a disk name");
  if (h.offset > kDiskBytesMax) return refuse("larger than a disk may be");
  DiskChange c{h.seq, h.disk, name, 0, h.offset};
  if (h.disk < sizes->size()) {
    auto& [have, size] = (*sizes)[h.disk];
    if (have != name) return refuse(fmt::format("the disk is named '{}'", have));
    // The size it has already: a source that recorded the change again after a crash
    // (it cannot know the first one reached its log). Nothing changes.
    if (h.offset == size) return Status::Ok();
    if (h.offset < size) return refuse(fmt::format("it has {} bytes: disks only grow", size));
    c.was_bytes = size;
    size = h.offset;
  } else {
    if (h.disk != sizes->size()) return refuse(fmt::format("the next disk is {}", sizes->size()));
    if (h.disk >= kDisksMax) return refuse(fmt::format("a group has at most {} disks", kDisksMax));
    for (const auto& [have, size] : *sizes) {
      if (have == name) return refuse("another disk has that name");
    }
    sizes->push_back({name, h.offset});
  }
  out->push_back(std::move(c));
  return Status::Ok();
}

Status RecoveryStore::ApplyDiskChanges(uint64_t first_seq, const std::vector<DiskChange>& changes) {
  auto same = [](const DiskChange& a, const DiskChange& b) {
    return a.seq == b.seq && a.disk == b.disk && a.name == b.name && a.was_bytes == b.was_bytes &&
           a.size_bytes == b.size_bytes;
  };
  // The changes from now on: the durable ones, then this append's. Changes taken for seqs
  // this append sends again but that never became durable are replaced: the same record
  // again changes nothing; another record at their seq (a source that lost them and went
  // on) undoes them.
  std::vector<DiskChange> all, before;
  {
    std::lock_guard lock(mu_);
    // The common append (the data path): no change in it, none pending at its seqs.
    if (changes.empty() && (disk_changes_.empty() || disk_changes_.back().seq < first_seq)) {
      return Status::Ok();
    }
    before = disk_changes_;
  }
  for (const DiskChange& c : before) {
    if (c.seq < first_seq) all.push_back(c);
  }
  all.insert(all.end(), changes.begin(), changes.end());
  if (std::equal(all.begin(), all.end(), before.begin(), before.end(), same)) return Status::Ok();
  // The layout they make: the durable one, then this append's changes.
  std::vector<StoreDisk> layout = DisksBefore(first_seq);
  for (const DiskChange& c : changes) {
    if (c.disk < layout.size()) {
      layout[c.disk].size_bytes = c.size_bytes;
    } else {
      layout.push_back({c.name, c.size_bytes});
    }
  }
  // store.json first (OpenParts finishes a change whose base was not made or grown yet),
  // then the bases, then the sizes readers see.
  {
    std::lock_guard lock(mu_);
    disk_changes_ = all;
  }
  if (Status st = WriteMeta(&layout); !st.ok()) {
    std::lock_guard lock(mu_);
    disk_changes_ = before;
    return st;
  }
  const uint32_t had = DiskCount();
  const auto count = static_cast<uint32_t>(layout.size());
  if (count < had) disk_count_.store(count, std::memory_order_release);  // an add undone
  for (uint32_t i = 0; i < count; ++i) {
    const uint64_t want = layout[i].size_bytes;
    if (i >= had) {
      OSR_ASSIGN_OR_RETURN(File f, File::Open(BasePath(dir_, i), File::Mode::kCreate));
      OSR_RETURN_IF_ERROR(f.Truncate(0));  // a disk added, undone and added again: zeros
      OSR_RETURN_IF_ERROR(f.Truncate(want));
      OSR_RETURN_IF_ERROR(f.Sync());
      OSR_RETURN_IF_ERROR(SyncDir(dir_ + "/base"));
      slots_[i].name = layout[i].name;  // not published yet: no reader looks at it
      slots_[i].base = std::move(f);
      slots_[i].size_bytes.store(want);
    } else if (want != DiskBytes(i)) {
      // Grown, or a grow undone (nothing past a disk's size is readable at any seq).
      OSR_RETURN_IF_ERROR(slots_[i].base.Truncate(want));
      OSR_RETURN_IF_ERROR(slots_[i].base.Sync());
      std::lock_guard lock(mu_);
      slots_[i].size_bytes.store(want);
    }
    std::lock_guard lock(mu_);
    if (resyncing_ && !staging_.empty()) {
      // A resync under way stages the disk's new area too.
      if (i >= staging_.size()) {
        OSR_ASSIGN_OR_RETURN(
            File f, File::Open(fmt::format("{}/staging/{}.img", dir_, i), File::Mode::kCreate));
        staging_.push_back(std::move(f));
        staged_.resize(staging_.size());
      }
      OSR_RETURN_IF_ERROR(staging_[i].Truncate(want));
    }
  }
  if (count > had) disk_count_.store(count, std::memory_order_release);
  spdlog::info("recovery store {}: disks now {}", dir_, [&] {
    std::string out;
    for (const auto& d : layout)
      out += fmt::format("{}{}={}", out.empty() ? "" : " ", d.name, d.size_bytes);
    return out;
  }());
  return Status::Ok();
}

Status RecoveryStore::AdoptDisks(uint64_t from, const std::vector<StoreDisk>& disks) {
  std::lock_guard append(append_mu_);
  const std::vector<StoreDisk> had = DisksBefore(from);
  if (disks.size() < had.size() || disks.size() > kDisksMax) {
    return InvalidArgument(fmt::format("the sender has {} disks, the store {} (at most {})",
                                       disks.size(), had.size(), kDisksMax));
  }
  std::vector<DiskChange> changes;
  for (size_t i = 0; i < disks.size(); ++i) {
    const StoreDisk& d = disks[i];
    if (!ValidName(d.name) || d.size_bytes == 0 || d.size_bytes > kDiskBytesMax) {
      return InvalidArgument(fmt::format("the sender's disk {} is not a disk", i));
    }
    if (i < had.size()) {
      if (d.name != had[i].name || d.size_bytes < had[i].size_bytes) {
        return InvalidArgument(
            fmt::format("the sender's disk {} is {} of {} bytes, the store's {} of {}", i, d.name,
                        d.size_bytes, had[i].name, had[i].size_bytes));
      }
      if (d.size_bytes == had[i].size_bytes) continue;
      changes.push_back({from, static_cast<uint32_t>(i), d.name, had[i].size_bytes, d.size_bytes});
    } else {
      for (size_t k = 0; k < i; ++k) {
        if (disks[k].name == d.name) return InvalidArgument("the sender names two disks alike");
      }
      changes.push_back({from, static_cast<uint32_t>(i), d.name, 0, d.size_bytes});
    }
  }
  // Changes at one seq: the seq of the first copy's base.
  return ApplyDiskChanges(from, changes);
}

Result<int64_t> RecoveryStore::CheckRecords(std::span<const uint8_t> records, uint64_t expect,
                                            std::vector<DiskChange>* changes,
                                            std::vector<std::span<const uint8_t>>* out) const {
  // Each record is checked against the disks as they were just before it: the durable
  // layout, then the disk-size records of this append in their order.
  std::vector<std::pair<std::string, uint64_t>> sizes;
  for (const StoreDisk& d : DisksBefore(expect)) sizes.push_back({d.name, d.size_bytes});
  int64_t last_time = 0;
  size_t pos = 0;
  while (pos < records.size()) {
    if (records.size() - pos < RecordHeader::kSize) return Corruption("truncated record header");
    OSR_ASSIGN_OR_RETURN(RecordHeader h, RecordHeader::Decode(records.subspan(pos)));
    if (records.size() - pos - RecordHeader::kSize < h.payload_bytes) {
      return Corruption(fmt::format("record seq {} truncated", h.seq));
    }
    auto payload = records.subspan(pos + RecordHeader::kSize, h.payload_bytes);
    if (!RecordHeader::Verify(records.data() + pos, payload)) {
      return Corruption(fmt::format("record seq {}: CRC mismatch", h.seq));
    }
    if (h.seq != expect) {
      return InvalidArgument(fmt::format("record seq {} where {} was expected", h.seq, expect));
    }
    if (h.kind == RecordKind::kDiskSize) {
      OSR_RETURN_IF_ERROR(CheckDiskChange(h, payload, &sizes, changes));
    } else if (h.disk >= sizes.size() || h.offset + h.length > sizes[h.disk].second) {
      return InvalidArgument(fmt::format("record seq {} lies outside disk {}", h.seq, h.disk));
    }
    out->push_back(records.subspan(pos, RecordHeader::kSize + h.payload_bytes));
    ++expect;
    last_time = h.time_ns;
    pos += RecordHeader::kSize + h.payload_bytes;
  }
  return last_time;
}

Result<uint64_t> RecoveryStore::Append(std::span<const uint8_t> records) {
  std::lock_guard append(append_mu_);
  // Every record is checked before any is written: a bad one refuses the whole append.
  std::vector<std::span<const uint8_t>> checked;
  std::vector<DiskChange> changes;
  const uint64_t first = journal_->last_seq() + 1;
  OSR_ASSIGN_OR_RETURN(int64_t last_time, CheckRecords(records, first, &changes, &checked));
  if (checked.empty()) return durable_seq();
  // Disks added or grown before the records that may write them are in the journal.
  if (Status st = ApplyDiskChanges(first, changes); !st.ok()) {
    return NoteWriteFailure("disk change", st, 0);
  }
  auto end = journal_->MarkEnd();  // everything before was synced: a no-op write-out
  if (!end.ok()) return NoteWriteFailure("journal append", end.status(), records.size());
  Status st;
  for (auto r : checked) {
    if (!journal_->AppendEncoded(r)) {
      st = journal_->write_error();
      if (st.ok()) st = IoError("the journal of " + dir_ + " has failed");
      break;
    }
  }
  if (st.ok()) st = journal_->Sync();
  if (st.ok()) {
    std::lock_guard lock(mu_);
    st = std::exchange(index_error_, Status::Ok());
  }
  if (!st.ok()) {
    // All or nothing: the journal's end, its next seq and the index as they were.
    Status undo = RollBackAppend(*end);
    if (!undo.ok()) spdlog::error("recovery store {}: {}", dir_, undo.ToString());
    return NoteWriteFailure("journal append", st, records.size());
  }
  std::optional<uint64_t> cut_after;
  {
    std::lock_guard lock(mu_);
    if (journal_cut_) cut_after = journal_cut_->after_seq;
  }
  if (cut_after && journal_->last_seq() > *cut_after) {
    // What the journal lost came again: nothing is missing any more.
    if (Status c = journal_->ClearCut(); !c.ok()) {
      spdlog::warn("recovery store {}: {} (the cut record is cleared at the next start)", dir_,
                   c.ToString());
    }
  }
  std::lock_guard lock(mu_);
  if (cut_after) journal_cut_ = journal_->pending_cut();
  durable_seq_ = journal_->last_seq();
  if (last_time != 0) durable_time_ns_ = last_time;
  ClearWriteFailureIfOver();
  return durable_seq_;
}

Status RecoveryStore::RollBackAppend(const capture::CaptureLog::End& end) {
  Status st = journal_->RollBack(end);
  Status dropped = index_->DropAfter(end.seq);
  if (st.ok()) st = dropped;
  std::lock_guard lock(mu_);
  index_error_ = Status::Ok();
  // Segments begun by the failed append are gone (a later one may take the same name).
  segments_.erase(segments_.upper_bound(end.segment_first_seq), segments_.end());
  ForgetVerified();
  OSR_CHECK(!st.ok() || journal_->last_seq() == durable_seq_);
  return st;
}

Status RecoveryStore::NoteWriteFailure(std::string what, const Status& st, uint64_t bytes_needed) {
  Status out(st.code(), fmt::format("{} of {} bytes to {} failed: {}", what, bytes_needed, dir_,
                                    st.message()));
  spdlog::warn("recovery store: {}", out.ToString());
  std::lock_guard lock(mu_);
  if (!write_failure_) {
    write_failure_ = WriteFailure{};
    write_failure_->since_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count();
  }
  write_failure_->what = std::move(what);
  write_failure_->status = st;
  write_failure_->bytes_needed = bytes_needed;
  ++write_failure_->count;
  return out;
}

void RecoveryStore::ClearWriteFailureIfOver() {
  if (!write_failure_) return;
  if (write_failure_->status.code() == Code::kNoSpace) {
    // A smaller write that fits between bigger ones that do not is no recovery: the
    // failure stays until what failed would fit now (else the site's status would flap
    // between healthy and full while the file system stays full).
    auto space = FileSystemSpace(dir_);
    if (space.ok() && space->free_bytes < write_failure_->bytes_needed) return;
  }
  write_failure_.reset();
}

std::optional<RecoveryStore::WriteFailure> RecoveryStore::write_failure() const {
  std::lock_guard lock(mu_);
  return write_failure_;
}

Status RecoveryStore::WriteBase(uint32_t disk, uint64_t offset, std::span<const uint8_t> data) {
  if (disk >= DiskCount() || offset + data.size() > DiskBytes(disk)) {
    return InvalidArgument(fmt::format("base write outside disk {}", disk));
  }
  return slots_[disk].base.PWrite(offset, data);
}

Status RecoveryStore::SyncBase() {
  for (uint32_t i = 0; i < DiskCount(); ++i) OSR_RETURN_IF_ERROR(slots_[i].base.DataSync());
  return Status::Ok();
}

Result<std::shared_ptr<const File>> RecoveryStore::Segment(uint64_t first_seq, bool history) {
  const uint64_t key = history ? (first_seq | kHistoryKeyBit) : first_seq;
  {
    std::lock_guard lock(mu_);
    if (auto it = segments_.find(key); it != segments_.end()) return it->second;
  }
  std::string path = history ? HistoryPath(dir_, first_seq)
                             : dir_ + "/journal/" + capture::SegmentFileName(first_seq);
  OSR_ASSIGN_OR_RETURN(File f, File::Open(path, File::Mode::kReadOnly));
  auto shared = std::make_shared<const File>(std::move(f));
  std::lock_guard lock(mu_);
  // Bounded: the oldest segment goes first (reads of old points open it again); a reader
  // still holding it keeps its descriptor until done.
  if (segments_.size() >= kOpenSegmentsMax) segments_.erase(segments_.begin());
  return segments_.emplace(key, std::move(shared)).first->second;
}

std::pair<uint64_t, uint64_t> RecoveryStore::VerifiedKey(const RecordRef& r) {
  return {r.history ? (r.segment_first_seq | kHistoryKeyBit) : r.segment_first_seq, r.payload_pos};
}

Status RecoveryStore::ReadPayload(const RecordRef& r, uint64_t offset, std::span<uint8_t> out) {
  OSR_ASSIGN_OR_RETURN(std::shared_ptr<const File> seg, Segment(r.segment_first_seq, r.history));
  const std::pair<uint64_t, uint64_t> key = VerifiedKey(r);
  bool checked;
  {
    std::lock_guard lock(verified_mu_);
    checked = verified_.contains(key);
  }
  if (!checked) return VerifyRecord(*seg, r, offset, &out);
  return seg->PRead(r.payload_pos + (offset - r.offset), out);
}

Status RecoveryStore::VerifyRecord(const File& seg, const RecordRef& r, uint64_t offset,
                                   std::span<uint8_t>* part) {
  using capture::RecordHeader;
  const std::string where =
      fmt::format("recovery store {}: the record of seq {} in {} {} at byte {}", dir_, r.seq,
                  r.history ? "history file" : "journal segment", r.segment_first_seq,
                  r.payload_pos < RecordHeader::kSize ? 0 : r.payload_pos - RecordHeader::kSize);
  if (r.payload_pos < RecordHeader::kSize || r.length == 0 ||
      r.length > capture::kPayloadBytesMax) {
    return Status(Code::kCorruption, where + ": the index names no record there");
  }
  std::array<uint8_t, RecordHeader::kSize> header;
  OSR_RETURN_IF_ERROR(seg.PRead(r.payload_pos - RecordHeader::kSize, header));
  auto h = RecordHeader::Decode(header);
  std::string wrong;
  if (!h.ok()) {
    wrong = h.status().message();
  } else if (h->disk != r.disk || h->offset != r.offset || h->length != r.length ||
             h->payload_bytes != r.length || h->kind != capture::RecordKind::kWrite) {
    wrong = fmt::format("its header says disk {} bytes {}+{}, the index disk {} bytes {}+{}",
                        h->disk, h->offset, h->length, r.disk, r.offset, r.length);
  } else if (!r.history && h->seq != r.seq) {
    wrong = fmt::format("its header says seq {}", h->seq);
  }
  if (wrong.empty()) {
    // The payload in pieces of at most kVerifyPieceBytes (memory per check is bounded,
    // whatever the record's size); the part asked for is copied out on the way.
    std::vector<uint8_t> piece(std::min<uint64_t>(r.length, kVerifyPieceBytes));
    uint32_t crc = 0;
    for (uint64_t at = 0; at < r.length; at += piece.size()) {
      std::span<uint8_t> got(piece.data(), std::min<uint64_t>(piece.size(), r.length - at));
      OSR_RETURN_IF_ERROR(seg.PRead(r.payload_pos + at, got));
      crc = Crc32cExtend(crc, got);
      if (part != nullptr) {
        // Overlap of [r.offset + at, + got) with [offset, offset + part->size()).
        const uint64_t lo = std::max(r.offset + at, offset);
        const uint64_t hi = std::min(r.offset + at + got.size(), offset + part->size());
        if (lo < hi) {
          std::memcpy(part->data() + (lo - offset), got.data() + (lo - r.offset - at), hi - lo);
        }
      }
    }
    crc = Crc32cExtend(crc, {header.data() + 4, RecordHeader::kSize - 4});
    if (crc != h->crc) wrong = "its CRC does not match its bytes";
  }
  const std::pair<uint64_t, uint64_t> key = VerifiedKey(r);
  std::lock_guard lock(verified_mu_);
  if (!wrong.empty()) {
    // Counted (and logged) once per record; past kDamagedKeptMax, every failure counts.
    if (damaged_.size() >= kDamagedKeptMax || damaged_.insert(key).second) {
      ++damaged_records_;
      spdlog::error("{} is damaged: {}", where, wrong);
    }
    return Status(Code::kCorruption,
                  fmt::format("{} is damaged ({}): its bytes are not served", where, wrong));
  }
  if (verified_.insert(key).second) {
    verified_order_.push_back(key);
    if (verified_order_.size() > kVerifiedMax) {
      verified_.erase(verified_order_.front());
      verified_order_.pop_front();
    }
  }
  return Status::Ok();
}

void RecoveryStore::ForgetVerified() {
  std::lock_guard lock(verified_mu_);
  verified_.clear();
  verified_order_.clear();
}

Status RecoveryStore::ReadAt(uint32_t disk, uint64_t seq, uint64_t offset, std::span<uint8_t> buf) {
  if (disk >= DiskCount() || offset + buf.size() > DiskBytes(disk)) {
    return InvalidArgument(fmt::format("read outside disk {}", disk));
  }
  // Shared: a fold step takes it alone only to change base_seq (never while it copies).
  std::shared_lock fold(fold_mu_);
  uint64_t base;
  {
    std::lock_guard lock(mu_);
    OSR_RETURN_IF_ERROR(UsableLocked(seq));
    // The disk as it was at seq: added later, or the bytes a later grow added, are not.
    if (offset + buf.size() > DiskBytesAtLocked(disk, seq)) {
      return InvalidArgument(fmt::format("read outside disk {} as it was at seq {}", disk, seq));
    }
    base = base_seq_;
  }
  // The index first, then the base: bytes a fold is copying into the base now all lie
  // under records in (base, seq], so they are overlaid whatever the base shows yet.
  std::vector<ReadPart> parts;
  OSR_RETURN_IF_ERROR(index_->Collect(disk, offset, buf.size(), base, seq, &parts));
  OSR_RETURN_IF_ERROR(slots_[disk].base.PRead(offset, buf));
  // Each byte comes from its newest record alone: the parts do not overlap.
  for (const ReadPart& p : parts) {
    std::span<uint8_t> out = buf.subspan(p.offset - offset, p.length);
    if (p.record.kind == RecordKind::kWrite) {
      OSR_RETURN_IF_ERROR(ReadPayload(p.record, p.offset, out));
    } else {
      std::memset(out.data(), 0, out.size());
    }
  }
  return Status::Ok();
}

Status RecoveryStore::UsableLocked(uint64_t seq) const {
  if (seq < base_seq_ || seq > durable_seq_) {
    return OutOfRange(fmt::format("seq {} is no longer (or not yet) in the store ({}..{})", seq,
                                  base_seq_, durable_seq_));
  }
  if (seq < consistent_from_) {  // the base took whole regions from a later state
    return OutOfRange(
        fmt::format("seq {} lies before the end of a resynchronization; use {} "
                    "or later",
                    seq, consistent_from_));
  }
  if (seq > base_seq_ && seq < compacted_through_ && !kept_.contains(seq)) {
    std::string kept;
    for (auto it = kept_.upper_bound(base_seq_); it != kept_.end() && kept.size() < 200; ++it) {
      kept += (kept.empty() ? "" : ", ") + std::to_string(*it);
    }
    return OutOfRange(fmt::format(
        "seq {} lies in compacted history: before seq {} only the kept points ({}) and seq {} "
        "are readable",
        seq, compacted_through_, kept.empty() ? "none" : kept, base_seq_));
  }
  if (seq < fold_target_) {
    return OutOfRange(
        fmt::format("seq {} is being folded into the base (up to {})", seq, fold_target_));
  }
  if (initial_sync_) {
    return OutOfRange("the first copy of the disks is under way; no point is readable yet");
  }
  if (differential_) {
    return OutOfRange(
        "the store is waiting for the resync of what differs from the old primary; no point "
        "is readable yet");
  }
  if (resyncing_ && seq > resync_from_) {
    return OutOfRange(
        fmt::format("a resynchronization is under way; seq {} and earlier stay "
                    "usable until it ends",
                    resync_from_));
  }
  return Status::Ok();
}

Status RecoveryStore::Pin(uint64_t seq) {
  std::lock_guard lock(mu_);
  OSR_RETURN_IF_ERROR(UsableLocked(seq));
  pins_.insert(seq);
  return Status::Ok();
}

Status RecoveryStore::BeginResync(uint64_t from) {
  {
    std::lock_guard staged(staged_mu_);
    OSR_RETURN_IF_ERROR(BeginResyncLocked(from));
  }
  return WriteMeta();  // a restart mid-resync keeps the later seqs unusable
}

Status RecoveryStore::BeginInitialSync(uint64_t from) {
  {
    std::lock_guard append(append_mu_);
    {
      std::lock_guard lock(mu_);
      // Only a store made for it (Start::kFullCopy): one that holds a consistent copy is
      // never wiped for another.
      if (!initial_sync_) {
        return InvalidArgument(
            fmt::format("an initial sync needs a store waiting for its first copy; this one "
                        "holds seqs {}..{}",
                        base_seq_, durable_seq_));
      }
    }
    {
      std::lock_guard lock(mu_);
      base_seq_ = durable_seq_ = from;
      initial_sync_ = true;
    }
    // Start the journal over at from + 1: no record up to `from` will come. (Not under
    // mu_: closing the log may call OnWritten.)
    OSR_RETURN_IF_ERROR(StartJournalAt(from + 1));
  }
  // An initial sync cut short starts over from scratch: the base is all zeros again.
  for (size_t i = 0; i < DiskCount(); ++i) {
    OSR_RETURN_IF_ERROR(slots_[i].base.Truncate(0));
    OSR_RETURN_IF_ERROR(slots_[i].base.Truncate(DiskBytes(i)));
  }
  OSR_RETURN_IF_ERROR(WriteMeta());
  return BeginResync(from);
}

Status RecoveryStore::StartJournalAt(uint64_t first_seq) {
  journal_.reset();
  const uint64_t id = NewStoreId();
  {
    std::lock_guard lock(mu_);
    segments_.clear();
    ForgetVerified();
    journal_cut_.reset();
    journal_id_ = id;
  }
  // The index first: a crash from here leaves an index of a journal store.json does not
  // name (cleared at open), never one that looks like this journal's.
  OSR_RETURN_IF_ERROR(index_->Clear(first_seq - 1, id));
  std::error_code ec;
  RemoveAllPaths(dir_ + "/journal", ec);
  CreateDirectories(dir_ + "/journal", ec);
  if (ec) return Status::FromErrno(ec.value(), "recreate " + dir_ + "/journal");
  capture::CaptureLogOptions lo;
  lo.dir = dir_ + "/journal";
  lo.disk_bytes = 0;
  lo.first_seq = first_seq;
  lo.segment_bytes_target = options_.journal_segment_bytes;
  OSR_ASSIGN_OR_RETURN(journal_, capture::CaptureLog::Open(
                                     lo, [this](std::span<const capture::CaptureLog::Written> w,
                                                bool ok) { OnWritten(w, ok); }));
  return WriteMeta();  // names the new journal
}

Status RecoveryStore::BeginResyncReplacingHistory(uint64_t from) {
  uint64_t durable;
  {
    std::lock_guard lock(mu_);
    durable = durable_seq_;
    if (from <= durable) {
      return InvalidArgument(fmt::format(
          "the store holds seq {}: a resync from {} replaces no lost history", durable, from));
    }
    if (!pins_.empty()) {
      return Unavailable(fmt::format(
          "a view at seq {} is open on a store whose history must be replaced; close it",
          *pins_.begin()));
    }
  }
  OSR_ASSIGN_OR_RETURN(uint64_t base, Fold(durable));
  if (base != durable) return Unavailable("could not fold the store before replacing its history");
  std::lock_guard append(append_mu_);
  {
    std::lock_guard lock(mu_);
    base_seq_ = durable_seq_ = from;
    consistent_from_ = std::max(consistent_from_, from + 1);
  }
  OSR_RETURN_IF_ERROR(WriteMeta());  // a restart from here starts the journal over itself
  OSR_RETURN_IF_ERROR(StartJournalAt(from + 1));
  spdlog::warn(
      "recovery store {}: history after seq {} replaced: seqs up to {} are gone, a resync "
      "of every region follows",
      dir_, durable, from);
  return BeginResync(from);
}

std::optional<capture::CaptureLog::Cut> RecoveryStore::journal_cut() const {
  std::lock_guard lock(mu_);
  return journal_cut_;
}

Status RecoveryStore::BeginResyncLocked(uint64_t from) {
  std::lock_guard lock(mu_);
  if (from != durable_seq_) {
    return InvalidArgument(fmt::format("a resync from seq {} needs the store at {}, it is at {}",
                                       from, from, durable_seq_));
  }
  staging_.clear();
  staged_.assign(DiskCount(), {});
  staged_pending_.clear();
  staged_pending_bytes_ = 0;
  staged_durable_.reset();
  staged_list_ = File();
  std::error_code ec;
  RemoveAllPaths(dir_ + "/staging", ec);
  CreateDirectories(dir_ + "/staging", ec);
  if (ec) return Status::FromErrno(ec.value(), "create " + dir_ + "/staging");
  std::vector<File> staging;
  for (size_t i = 0; i < DiskCount(); ++i) {
    OSR_ASSIGN_OR_RETURN(
        File f, File::Open(fmt::format("{}/staging/{}.img", dir_, i), File::Mode::kCreate));
    OSR_RETURN_IF_ERROR(f.Truncate(DiskBytes(i)));
    staging.push_back(std::move(f));
  }
  // The staged list names this resync; its regions follow at each checkpoint.
  OSR_ASSIGN_OR_RETURN(File list, File::Open(StagedListPath(dir_), File::Mode::kCreate));
  auto header = EncodeStagedHeader(from, initial_sync_, static_cast<uint32_t>(DiskCount()));
  OSR_RETURN_IF_ERROR(list.PWrite(0, header));
  OSR_RETURN_IF_ERROR(list.DataSync());
  OSR_RETURN_IF_ERROR(SyncDir(dir_ + "/staging"));
  // Invariant: staging_ is not empty exactly when staged_list_ is open.
  staging_ = std::move(staging);
  staged_list_ = std::move(list);
  staged_list_bytes_ = kStagedHeaderBytes;
  staged_checkpoint_ns_ = SteadyNs();
  staged_durable_ = StagedProgress{from, initial_sync_, 0, 0, 0};
  resyncing_ = true;
  resync_from_ = from;
  return Status::Ok();
}

void RecoveryStore::LoadStaged() {
  std::lock_guard staged(staged_mu_);
  Status st = LoadStagedList();
  if (st.ok()) return;
  uint64_t from;
  {
    std::lock_guard lock(mu_);
    from = resync_from_;
    staging_.clear();
    staged_.clear();
    staged_durable_.reset();
  }
  staged_list_ = File();
  // Nothing is staged: the sender's next RESYNC_BEGIN starts the resync over (and wipes
  // staging/). Never a reason not to open the store.
  spdlog::warn(
      "recovery store {}: the regions staged by the resynchronization after seq {} cannot be "
      "used ({}); it starts over from its first byte",
      dir_, from, st.ToString());
}

Status RecoveryStore::LoadStagedList() {
  uint64_t from;
  bool initial;
  {
    std::lock_guard lock(mu_);
    from = resync_from_;
    initial = initial_sync_;
  }
  const std::string path = StagedListPath(dir_);
  std::error_code ec;
  if (!fs::exists(path, ec)) return NotFound(path + " is missing");
  OSR_ASSIGN_OR_RETURN(File list, File::Open(path, File::Mode::kReadWrite));
  OSR_ASSIGN_OR_RETURN(uint64_t size, list.Size());
  if (size < kStagedHeaderBytes) {
    return Corruption(fmt::format("{}: {} bytes, shorter than its header", path, size));
  }
  std::array<uint8_t, kStagedHeaderBytes> h{};
  OSR_RETURN_IF_ERROR(list.PRead(0, h));
  if (std::memcmp(h.data(), kStagedMagic, 8) != 0 || Ld32(h.data() + 60) != Crc32c(h.data(), 60)) {
    return Corruption(path + ": damaged header (magic or CRC)");
  }
  if (Ld32(h.data() + 8) != kStagedVersion) {
    return Corruption(
        fmt::format("{}: version {}, not {}", path, Ld32(h.data() + 8), kStagedVersion));
  }
  if (Ld64(h.data() + 16) != from || (Ld32(h.data() + 12) & 1) != (initial ? 1u : 0u) ||
      Ld32(h.data() + 24) != DiskCount()) {
    return Corruption(
        fmt::format("{}: it lists a resync after seq {} of {} disk(s), not this "
                    "store's after seq {} of {}",
                    path, Ld64(h.data() + 16), Ld32(h.data() + 24), from, DiskCount()));
  }
  // The records; a torn last one (a crash while it was appended) is cut off.
  std::vector<std::vector<std::pair<uint64_t, uint64_t>>> staged(DiskCount());
  StagedProgress progress{from, initial, 0, 0, 0};
  uint64_t records = (size - kStagedHeaderBytes) / kStagedRecordBytes;
  std::vector<uint8_t> buf(kStagedReadRecords * kStagedRecordBytes);
  for (uint64_t i = 0; i < records;) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(records - i, kStagedReadRecords));
    OSR_RETURN_IF_ERROR(list.PRead(kStagedHeaderBytes + i * kStagedRecordBytes,
                                   {buf.data(), n * kStagedRecordBytes}));
    for (size_t k = 0; k < n; ++k) {
      const uint8_t* r = buf.data() + k * kStagedRecordBytes;
      if (Ld32(r + 28) != Crc32c(r, 28)) {
        if (i + k + 1 == records) {  // the last one: torn
          records = i + k;
          break;
        }
        return Corruption(fmt::format("{}: record {} of {} fails its CRC", path, i + k, records));
      }
      uint32_t d = Ld32(r);
      uint64_t off = Ld64(r + 8), len = Ld64(r + 16);
      if (d >= DiskCount() || len == 0 || off > DiskBytes(d) || len > DiskBytes(d) - off) {
        return Corruption(
            fmt::format("{}: record {} ({} bytes at {} of disk {}) lies outside "
                        "the disks",
                        path, i + k, len, off, d));
      }
      staged[d].emplace_back(off, len);
      progress.bytes += len;
      progress.end_disk = d;
      progress.end_offset = off + len;
    }
    i += n;
  }
  uint64_t list_bytes = kStagedHeaderBytes + records * kStagedRecordBytes;
  if (list_bytes != size) OSR_RETURN_IF_ERROR(list.Truncate(list_bytes));
  std::vector<File> staging;
  for (size_t i = 0; i < DiskCount(); ++i) {
    OSR_ASSIGN_OR_RETURN(
        File f, File::Open(fmt::format("{}/staging/{}.img", dir_, i), File::Mode::kReadWrite));
    OSR_ASSIGN_OR_RETURN(uint64_t got, f.Size());
    if (got != DiskBytes(i)) {
      return Corruption(fmt::format("{}: staging image of disk {} has {} bytes, not {}", dir_, i,
                                    got, DiskBytes(i)));
    }
    staging.push_back(std::move(f));
  }
  staged_list_ = std::move(list);
  staged_list_bytes_ = list_bytes;
  staged_checkpoint_ns_ = SteadyNs();
  std::lock_guard lock(mu_);
  staging_ = std::move(staging);
  staged_ = std::move(staged);
  staged_pending_.clear();
  staged_pending_bytes_ = 0;
  staged_durable_ = progress;
  spdlog::info("recovery store {}: the resynchronization after seq {} has {} bytes staged", dir_,
               from, progress.bytes);
  return Status::Ok();
}

Status RecoveryStore::ResyncWrite(uint32_t disk, uint64_t offset, std::span<const uint8_t> data) {
  std::lock_guard staged(staged_mu_);
  Status st;
  bool due;
  {
    std::lock_guard lock(mu_);
    // Not after a restart that could not keep the staged regions: a RESYNC_BEGIN first.
    if (!resyncing_ || staging_.empty()) {
      return InvalidArgument("no resynchronization is under way");
    }
    if (disk >= DiskCount() || offset > DiskBytes(disk) || data.size() > DiskBytes(disk) - offset) {
      return InvalidArgument(fmt::format("resync data outside disk {}", disk));
    }
    // On failure nothing is staged: a resync that could not stage every region never
    // commits (the sender goes on from the last checkpoint).
    st = staging_[disk].PWrite(offset, data);
    if (st.ok() && !data.empty()) {
      staged_[disk].emplace_back(offset, data.size());
      staged_pending_.push_back({disk, offset, data.size()});
      staged_pending_bytes_ += data.size();
    }
    due = staged_pending_bytes_ >= kStagedCheckpointBytes;
  }
  if (!st.ok()) return NoteWriteFailure("resync write", st, data.size());
  due = due || SteadyNs() - staged_checkpoint_ns_ >= kStagedCheckpointMs * 1000000;
  if (due) {
    if (Status c = CheckpointResyncLocked(); !c.ok()) {
      return NoteWriteFailure("resync checkpoint", c, 0);
    }
  }
  return Status::Ok();
}

Status RecoveryStore::CheckpointResync() {
  std::lock_guard staged(staged_mu_);
  return CheckpointResyncLocked();
}

Status RecoveryStore::CheckpointResyncLocked() {
  staged_checkpoint_ns_ = SteadyNs();
  std::vector<StagedRegion> pending;
  {
    std::lock_guard lock(mu_);
    if (staged_pending_.empty()) return Status::Ok();
    pending = staged_pending_;
  }
  OSR_CHECK(staged_list_.valid());  // pending regions exist only while staging
  // The data first, then the list that says it is there. (staging_ changes only under
  // staged_mu_, which this holds.)
  std::vector<bool> touched(DiskCount(), false);
  for (auto& r : pending) touched[r.disk] = true;
  for (size_t d = 0; d < DiskCount(); ++d) {
    if (touched[d]) OSR_RETURN_IF_ERROR(staging_[d].DataSync());
  }
  // One record per run of regions that follow each other on a disk.
  std::vector<uint8_t> out;
  uint64_t bytes = 0;
  StagedRegion run = pending.front();
  auto put = [&](const StagedRegion& r) {
    out.resize(out.size() + kStagedRecordBytes);
    EncodeStagedRecord(out.data() + out.size() - kStagedRecordBytes, r.disk, r.offset, r.length);
  };
  for (size_t i = 0; i < pending.size(); ++i) {
    bytes += pending[i].length;
    if (i == 0) continue;
    if (pending[i].disk == run.disk && pending[i].offset == run.offset + run.length) {
      run.length += pending[i].length;
    } else {
      put(run);
      run = pending[i];
    }
  }
  put(run);
  Status st = staged_list_.PWrite(staged_list_bytes_, out);
  if (st.ok()) st = staged_list_.DataSync();
  if (!st.ok()) {
    // Whatever reached the file past the durable end goes (a later append writes there).
    Status cut = staged_list_.Truncate(staged_list_bytes_);
    if (!cut.ok()) spdlog::error("recovery store {}: {}", dir_, cut.ToString());
    return st;
  }
  staged_list_bytes_ += out.size();
  std::lock_guard lock(mu_);
  staged_pending_.clear();
  staged_pending_bytes_ = 0;
  staged_durable_->bytes += bytes;
  staged_durable_->end_disk = run.disk;
  staged_durable_->end_offset = run.offset + run.length;
  return Status::Ok();
}

std::optional<RecoveryStore::StagedProgress> RecoveryStore::staged_progress() const {
  std::lock_guard lock(mu_);
  if (!resyncing_ || staging_.empty() || !staged_durable_ || staged_durable_->bytes == 0) {
    return std::nullopt;
  }
  return staged_durable_;
}

Status RecoveryStore::ResumeResync(uint64_t from, bool initial, uint64_t staged_bytes) {
  std::lock_guard staged(staged_mu_);
  std::lock_guard lock(mu_);
  const auto& have = staged_durable_;
  if (!resyncing_ || staging_.empty() || !have || have->bytes == 0) {
    return Status(Code::kFailedPrecondition,
                  fmt::format("cannot resume the resync after seq {} at byte {}: nothing is "
                              "staged here",
                              from, staged_bytes));
  }
  if (have->from != from || have->initial != initial || initial_sync_ != initial ||
      have->bytes != staged_bytes) {
    return Status(Code::kFailedPrecondition,
                  fmt::format("cannot resume the {} after seq {} at byte {}: this store has "
                              "{} bytes staged of the {} after seq {}",
                              initial ? "initial copy" : "resync", from, staged_bytes, have->bytes,
                              have->initial ? "initial copy" : "resync", have->from));
  }
  // What was staged after the last checkpoint comes again (the newest of each disk's).
  for (auto it = staged_pending_.rbegin(); it != staged_pending_.rend(); ++it) {
    OSR_CHECK(!staged_[it->disk].empty());
    staged_[it->disk].pop_back();
  }
  staged_pending_.clear();
  staged_pending_bytes_ = 0;
  return Status::Ok();
}

Status RecoveryStore::CommitResync(uint64_t consistent_seq) {
  std::lock_guard staged(staged_mu_);
  uint64_t from;
  {
    std::lock_guard lock(mu_);
    if (!resyncing_) return InvalidArgument("no resynchronization is under way");
    if (consistent_seq > durable_seq_) {
      return InvalidArgument(
          fmt::format("resync ends at seq {} but the store has {}", consistent_seq, durable_seq_));
    }
    if (!pins_.empty() && *pins_.begin() <= resync_from_) {
      return Unavailable(
          fmt::format("a view at seq {} is open; close it to let the "
                      "resynchronization finish",
                      *pins_.begin()));
    }
    from = resync_from_;
  }
  OSR_ASSIGN_OR_RETURN(uint64_t base, Fold(from));
  if (base != from) return Unavailable("could not fold up to the resync point");
  uint64_t staged_bytes = 0;
  {
    std::lock_guard lock(mu_);
    for (auto& regions : staged_) {
      for (auto [off, len] : regions) staged_bytes += len;
    }
  }
  // Copying into sparse bases may allocate every staged byte: refuse, changing nothing,
  // when the file system has not that much room (a full one would stop the copy half-way).
  if (auto space = FileSystemSpace(dir_); space.ok() && space->free_bytes < staged_bytes) {
    return NoteWriteFailure("resync commit",
                            Status(Code::kNoSpace, fmt::format("{} bytes free, {} bytes staged",
                                                               space->free_bytes, staged_bytes)),
                            staged_bytes);
  }
  Status copied = [&]() -> Status {
    std::unique_lock fold(fold_mu_);
    std::vector<uint8_t> buf(1 << 20);
    std::lock_guard lock(mu_);
    for (size_t d = 0; d < DiskCount(); ++d) {
      for (auto [off, len] : staged_[d]) {
        for (uint64_t p = off; p < off + len;) {
          size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), off + len - p));
          OSR_RETURN_IF_ERROR(staging_[d].PRead(p, {buf.data(), n}));
          OSR_RETURN_IF_ERROR(slots_[d].base.PWrite(p, {buf.data(), n}));
          p += n;
        }
      }
    }
    return SyncBase();
  }();
  if (!copied.ok()) {
    // The base holds some regions as of the resync and others as of `from`: no seq is
    // readable until a resync commits (resyncing_ stays; consistent_from_ passes them all).
    {
      std::lock_guard lock(mu_);
      consistent_from_ = std::max(consistent_from_, consistent_seq);
    }
    Status meta = WriteMeta();
    if (!meta.ok()) spdlog::error("recovery store {}: {}", dir_, meta.ToString());
    return NoteWriteFailure("resync commit", copied, staged_bytes);
  }
  {
    std::lock_guard lock(mu_);
    consistent_from_ = consistent_seq;
    resyncing_ = false;
    initial_sync_ = false;
    differential_ = false;
    staging_.clear();
    staged_.clear();
    staged_pending_.clear();
    staged_pending_bytes_ = 0;
    staged_durable_.reset();
    ClearWriteFailureIfOver();
  }
  staged_list_ = File();
  OSR_RETURN_IF_ERROR(WriteMeta());
  std::error_code ec;
  RemoveAllPaths(dir_ + "/staging", ec);
  return Status::Ok();
}

Status RecoveryStore::RaiseEpoch(uint64_t epoch) {
  if (epoch > kEpochMax) {
    return InvalidArgument(fmt::format("epoch {} is out of range (1..{})", epoch, kEpochMax));
  }
  {
    std::lock_guard lock(mu_);
    if (epoch < epoch_) {
      return Status(Code::kPermissionDenied,
                    fmt::format("the store is at epoch {} already, above {}", epoch_, epoch));
    }
    if (epoch == epoch_) return Status::Ok();
    epoch_ = epoch;
  }
  return WriteMeta();
}

uint64_t RecoveryStore::epoch() const {
  std::lock_guard lock(mu_);
  return epoch_;
}

bool RecoveryStore::initial_sync_pending() const {
  std::lock_guard lock(mu_);
  return initial_sync_;
}

bool RecoveryStore::differential() const {
  std::lock_guard lock(mu_);
  return differential_;
}

Result<std::vector<std::vector<std::pair<uint64_t, uint64_t>>>> RecoveryStore::ChangedAfter(
    uint64_t seq) const {
  std::vector<std::vector<std::pair<uint64_t, uint64_t>>> out(DiskCount());
  OSR_RETURN_IF_ERROR(index_->ForEachBySeq(seq, UINT64_MAX, [&](const RecordRef& r) {
    if (r.disk < out.size()) out[r.disk].emplace_back(r.offset, r.length);
    return true;
  }));
  for (auto& regions : out) {
    std::sort(regions.begin(), regions.end());
    std::vector<std::pair<uint64_t, uint64_t>> merged;
    for (auto [off, len] : regions) {
      if (!merged.empty() && off <= merged.back().first + merged.back().second) {
        auto& last = merged.back();
        last.second = std::max(last.first + last.second, off + len) - last.first;
      } else {
        merged.emplace_back(off, len);
      }
    }
    regions = std::move(merged);
  }
  return out;
}

bool RecoveryStore::resyncing() const {
  std::lock_guard lock(mu_);
  return resyncing_;
}

uint64_t RecoveryStore::consistent_from() const {
  std::lock_guard lock(mu_);
  return consistent_from_;
}

void RecoveryStore::Unpin(uint64_t seq) {
  std::lock_guard lock(mu_);
  auto it = pins_.find(seq);
  OSR_CHECK(it != pins_.end());
  pins_.erase(it);
  if (pins_.empty()) unpinned_cv_.notify_all();
}

size_t RecoveryStore::pin_count() const {
  std::lock_guard lock(mu_);
  return pins_.size();
}

bool RecoveryStore::WaitUnpinned(std::chrono::milliseconds wait_max) {
  std::unique_lock lock(mu_);
  return unpinned_cv_.wait_for(lock, wait_max, [this] { return pins_.empty(); });
}

uint64_t RecoveryStore::base_seq() const {
  std::lock_guard lock(mu_);
  return base_seq_;
}

int64_t RecoveryStore::durable_time_ns() const {
  std::lock_guard lock(mu_);
  return durable_time_ns_;
}

uint64_t RecoveryStore::durable_seq() const {
  std::lock_guard lock(mu_);
  return durable_seq_;
}

Result<uint64_t> RecoveryStore::Fold(uint64_t seq) {
  fold_waiters_.fetch_add(1);  // a compaction under way gives way
  std::unique_lock run(fold_run_mu_);
  fold_waiters_.fetch_sub(1);
  for (;;) {
    OSR_ASSIGN_OR_RETURN(std::optional<uint64_t> step, PlanFoldStep(seq));
    if (!step) return base_seq();
    OSR_RETURN_IF_ERROR(FoldStep(*step));
  }
}

Result<uint64_t> RecoveryStore::TryFold(uint64_t seq) {
  std::unique_lock run(fold_run_mu_, std::try_to_lock);
  if (!run.owns_lock()) {
    return Unavailable(
        fmt::format("{}: a history compaction or another fold is under way; fold after it", dir_));
  }
  for (;;) {
    OSR_ASSIGN_OR_RETURN(std::optional<uint64_t> step, PlanFoldStep(seq));
    if (!step) return base_seq();
    OSR_RETURN_IF_ERROR(FoldStep(*step));
  }
}

Result<std::optional<uint64_t>> RecoveryStore::PlanFoldStep(uint64_t seq) {
  // One journal segment at a time: a step's cost is bounded whatever the history.
  OSR_ASSIGN_OR_RETURN(auto segments, capture::ListSegments(dir_ + "/journal"));
  std::lock_guard lock(mu_);
  uint64_t from = base_seq_;
  uint64_t target = std::min(seq, durable_seq_);
  if (!pins_.empty()) target = std::min(target, *pins_.begin());
  if (target <= from) return std::optional<uint64_t>();
  if (from < compacted_through_) {
    // Compacted history folds one kept interval at a time: only kept seqs are states.
    auto next = kept_.upper_bound(from);
    uint64_t step = next != kept_.end() && *next < compacted_through_ ? *next : compacted_through_;
    if (step > target) return std::optional<uint64_t>();
    fold_target_ = std::max(fold_target_, step);
    return std::optional<uint64_t>(fold_target_);
  }
  for (size_t i = 0; i + 1 < segments.size(); ++i) {
    if (segments[i + 1].first_seq > from + 1) {  // segment i holds from + 1
      target = std::min(target, segments[i + 1].first_seq - 1);
      break;
    }
  }
  // From here no seq below the step is readable or pinned (UsableLocked), so the base may
  // take its records while reads of later seqs go on.
  fold_target_ = std::max(fold_target_, target);
  return std::optional<uint64_t>(fold_target_);
}

Status RecoveryStore::FoldStep(uint64_t target) {
  // Intent first: a crash from here on finishes this step at the next open, so no read of
  // a seq below it ever meets a base that holds later records.
  OSR_RETURN_IF_ERROR(WriteMeta());
  {
    // Reads that found their seq usable before the step was planned end first.
    std::unique_lock drain(fold_mu_);
  }
  uint64_t from = base_seq();
  Status apply;
  bool compacted;
  {
    std::lock_guard lock(mu_);
    compacted = from < compacted_through_;
  }
  // Every record of (from, target] in order, each one checked: the scan's reader ends a
  // segment at a damaged record (or takes zeros where records were as its clean end) and
  // goes on with the next one, so a gap is damage that the fold must not step over.
  uint64_t next_seq = from + 1;
  auto visit = [&](const RecordHeader& h, std::span<const uint8_t> payload) {
    if (h.seq < next_seq) return true;
    if (h.seq > target) return false;
    if (h.seq != next_seq) {
      apply = Corruption(fmt::format(
          "{}: the journal lacks the records of seqs {}..{} (damaged or zeroed): the fold up "
          "to seq {} stops before them",
          dir_, next_seq, h.seq - 1, target));
      return false;
    }
    ++next_seq;
    if (h.length != 0 && h.disk < DiskCount()) {  // length 0: a mark (a resync's end)
      File& f = slots_[h.disk].base;
      Status st = h.kind == RecordKind::kWrite ? f.PWrite(h.offset, payload)
                                               : f.PunchHole(h.offset, h.length);
      if (!st.ok() && st.code() == Code::kNotSupported) st = f.WriteZeroes(h.offset, h.length);
      if (!st.ok()) {
        apply = st;
        return false;
      }
    }
    return h.seq < target;
  };
  if (compacted) {
    apply = ApplyFromIndex(from, target);
  } else if (auto summary = capture::LogReader::Scan(dir_ + "/journal", visit, false, from + 1);
             !summary.ok()) {
    apply = summary.status();
  } else if (apply.ok() && !summary->errors.empty()) {
    const capture::LogError& e = summary->errors.front();
    apply =
        Corruption(fmt::format("{}: the journal is damaged in {} at byte {} ({}): the fold up "
                               "to seq {} stops there",
                               dir_, e.segment, e.position, e.message, target));
  } else if (apply.ok() && summary->last_seq < target) {
    apply = Corruption(fmt::format("{}: the journal ends at seq {} before the fold's end {}", dir_,
                                   summary->last_seq, target));
  }
  if (apply.ok()) apply = SyncBase();
  if (apply.ok() && fold_step_hook_) apply = fold_step_hook_(target);
  if (!apply.ok()) {
    // Seqs below the step stay unreadable (fold_target_, and folding_to in store.json);
    // the next fold, or the next open, applies the step again from the start: applying a
    // record twice gives the same bytes. Bytes the step wrote into the base all lie under
    // records of (base_seq, target], which reads of later seqs overlay (and check).
    if (apply.code() == Code::kCorruption) {  // damage, not a failed write: counted once
      std::lock_guard lock(verified_mu_);
      if (damaged_.size() >= kDamagedKeptMax || damaged_.insert({UINT64_MAX, target}).second) {
        ++damaged_records_;
        spdlog::error("recovery store {}: {}", dir_, apply.message());
      }
      return apply;
    }
    return NoteWriteFailure("fold", apply, 0);
  }
  std::vector<uint64_t> history_gone;
  {
    std::unique_lock fold(fold_mu_);
    std::lock_guard lock(mu_);
    base_seq_ = target;
    kept_.erase(kept_.begin(), kept_.upper_bound(target));
    for (auto it = history_.begin(); it != history_.end();) {
      if (it->second > target) {
        ++it;
        continue;
      }
      history_gone.push_back(it->first);
      segments_.erase(it->first | kHistoryKeyBit);
      ForgetVerified();
      it = history_.erase(it);
    }
    if (history_.empty() && target >= compacted_through_) history_id_ = 0;
  }
  OSR_RETURN_IF_ERROR(WriteMeta());
  if (index_->history_id() != 0 && history_id() == 0) {
    OSR_RETURN_IF_ERROR(index_->SetHistoryId(0));  // all of it folded
  }
  for (uint64_t id : history_gone) {
    std::error_code ec;
    RemovePath(HistoryPath(dir_, id), ec);
  }
  // What the base holds now leaves the index and the journal (never the newest segment).
  OSR_RETURN_IF_ERROR(index_->DropUpTo(target));
  OSR_ASSIGN_OR_RETURN(auto segments, capture::ListSegments(dir_ + "/journal"));
  for (size_t i = 0; i + 1 < segments.size(); ++i) {
    if (segments[i + 1].first_seq - 1 > target) break;
    {
      std::lock_guard lock(mu_);
      segments_.erase(segments[i].first_seq);
      ForgetVerified();
    }
    std::error_code ec;
    RemovePath(segments[i].path, ec);
    if (ec) spdlog::warn("recovery store {}: remove {}: {}", dir_, segments[i].path, ec.message());
  }
  return Status::Ok();
}

Status RecoveryStore::FinishInterruptedFold() {
  uint64_t target;
  {
    std::lock_guard lock(mu_);
    if (fold_target_ <= base_seq_) return Status::Ok();
    target = fold_target_;
  }
  spdlog::info("recovery store {}: finishing a fold up to seq {} cut short", dir_, target);
  Status st = FoldStep(target);
  if (!st.ok()) {
    // The store still opens; seqs below the step stay unreadable until a fold succeeds.
    spdlog::warn("recovery store {}: {}", dir_, st.ToString());
  }
  return Status::Ok();
}

}  // namespace osr::store
