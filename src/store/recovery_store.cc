#include "store/recovery_store.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "capture/log_reader.h"
#include "common/json_in.h"

namespace osr::store {

namespace fs = std::filesystem;
using capture::RecordHeader;
using capture::RecordKind;

namespace {

constexpr int kMetaVersion = 1;

std::string BasePath(const std::string& dir, size_t i) {
  return fmt::format("{}/base/{}.img", dir, i);
}

}  // namespace

Result<std::unique_ptr<RecoveryStore>> RecoveryStore::Create(const std::string& dir,
                                                             const std::vector<StoreDisk>& disks,
                                                             uint64_t base_seq, Start start,
                                                             const std::vector<std::string>& images,
                                                             const StoreOrigin& origin) {
  if (disks.empty()) return InvalidArgument("a recovery store needs at least one disk");
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
  fs::create_directories(dir + "/base", ec);
  if (ec) return Status::FromErrno(ec.value(), "create " + dir);
  fs::create_directories(dir + "/journal", ec);
  if (ec) return Status::FromErrno(ec.value(), "create " + dir + "/journal");
  for (size_t i = 0; i < disks.size(); ++i) {
    if (disks[i].size_bytes == 0) return InvalidArgument("disk " + disks[i].name + " has size 0");
    if (start == Start::kDifferential) {
      // Same file system: a rename, O(1) in the disk's size. (Before store.json exists:
      // a crash in between leaves images in base/ without a store, which the site moves
      // back to its group when it starts.)
      fs::rename(images[i], BasePath(dir, i), ec);
      if (ec) {
        Status st = Status::FromErrno(ec.value(), "move " + images[i] + " into the store");
        for (size_t k = 0; k < i; ++k) {  // put back what moved: nothing half-done
          std::error_code back;
          fs::rename(BasePath(dir, k), images[k], back);
        }
        return st;
      }
      continue;
    }
    OSR_ASSIGN_OR_RETURN(File f, File::Open(BasePath(dir, i), File::Mode::kCreate));
    OSR_RETURN_IF_ERROR(f.Truncate(disks[i].size_bytes));
    OSR_RETURN_IF_ERROR(f.Sync());
  }
  std::unique_ptr<RecoveryStore> s(new RecoveryStore());
  s->dir_ = dir;
  s->disks_ = disks;
  s->base_seq_ = base_seq;
  s->epoch_ = origin.epoch;
  s->source_ = origin.source;
  s->initial_sync_ = start == Start::kFullCopy;
  if (start == Start::kDifferential) {
    s->differential_ = true;
    s->consistent_from_ = base_seq + 1;
  }
  Status st = s->WriteMeta();
  if (st.ok()) st = s->OpenParts();
  if (!st.ok() && start == Start::kDifferential) {
    // Nothing half-done: the images go back where they were, and no store is left.
    s.reset();
    fs::remove(dir + "/store.json", ec);
    for (size_t k = 0; k < images.size(); ++k) {
      std::error_code back;
      fs::rename(BasePath(dir, k), images[k], back);
    }
  }
  OSR_RETURN_IF_ERROR(st);
  return s;
}

Result<std::unique_ptr<RecoveryStore>> RecoveryStore::Open(const std::string& dir) {
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
  s->base_seq_ = f.U64("base_seq");
  s->consistent_from_ = f.U64("consistent_from", 0);
  // Stores made before epochs came from the vault may say 0 (never raised): the first
  // epoch an item has is 1.
  s->epoch_ = std::max<uint64_t>(f.U64("epoch", 1), 1);
  s->source_ = f.String("source", "");
  s->initial_sync_ = f.Bool("initial_sync", false);
  s->differential_ = f.Bool("differential", false);
  // A resync that was under way when the store closed must start again (its staged
  // regions are gone); until it ends, seqs after its start stay unusable.
  if (f.Has("resync_from")) {
    s->resyncing_ = true;
    s->resync_from_ = f.U64("resync_from");
  }
  if (f.ok() && version != kMetaVersion) f.Fail("version", "is not 1");
  if (f.ok() && !s->source_.empty() && !ValidName(s->source_)) f.Fail("source", "is not a name");
  if (!f.ok()) return Corruption(f.status().message());
  for (size_t i = 0; i < disks->size(); ++i) {
    json_in::Fields d((*disks)[i], fmt::format("{}/store.json: disks[{}].", dir, i));
    StoreDisk disk{d.String("name"), d.U64("size_bytes")};
    if (!d.ok()) return Corruption(d.status().message());
    s->disks_.push_back(std::move(disk));
  }
  if (s->disks_.empty()) return Corruption(dir + "/store.json: no disks");
  if (s->epoch_ > kEpochMax) {
    // Only an older osr, which took epochs from senders, can have written this.
    spdlog::warn(
        "{}: epoch {} is beyond any a vault gives ({}): it came from a sender; "
        "every source is refused as stale until the store is made again",
        dir, s->epoch_, kEpochMax);
  }
  OSR_RETURN_IF_ERROR(s->OpenParts());
  return s;
}

RecoveryStore::~RecoveryStore() = default;

Status RecoveryStore::WriteMeta() {
  nlohmann::json disks = nlohmann::json::array();
  for (auto& d : disks_) disks.push_back({{"name", d.name}, {"size_bytes", d.size_bytes}});
  uint64_t base, consistent, epoch;
  nlohmann::json resync;
  bool initial = false, differential = false;
  {
    std::lock_guard lock(mu_);
    epoch = epoch_;
    base = base_seq_;
    consistent = consistent_from_;
    if (resyncing_) resync = resync_from_;
    initial = initial_sync_;
    differential = differential_;
  }
  std::string text = nlohmann::json{{"version", kMetaVersion}, {"disks", disks},
                                    {"base_seq", base},        {"consistent_from", consistent},
                                    {"resync_from", resync},   {"initial_sync", initial},
                                    {"epoch", epoch},          {"differential", differential},
                                    {"source", source_}}
                         .dump(1);
  return WriteFileAtomic(dir_ + "/store.json",
                         {reinterpret_cast<const uint8_t*>(text.data()), text.size()});
}

Status RecoveryStore::OpenParts() {
  for (size_t i = 0; i < disks_.size(); ++i) {
    OSR_ASSIGN_OR_RETURN(File f, File::Open(BasePath(dir_, i), File::Mode::kReadWrite));
    OSR_ASSIGN_OR_RETURN(uint64_t size, f.Size());
    if (size != disks_[i].size_bytes) {
      return Corruption(fmt::format("{}: base of disk {} has {} bytes, not {}", dir_,
                                    disks_[i].name, size, disks_[i].size_bytes));
    }
    base_.push_back(std::move(f));
  }
  index_.resize(disks_.size());
  // Rebuild the index from the journal: records after base_seq, with their positions.
  uint64_t last = base_seq_;
  auto visit = [&](const RecordHeader& h, std::span<const uint8_t>, const capture::SegmentInfo& seg,
                   uint64_t payload_pos) {
    if (h.seq <= base_seq_) return true;
    if (h.disk >= disks_.size()) return true;  // refused at Append; cannot be here
    index_[h.disk].Add({h.seq, h.offset, h.length, h.kind, seg.first_seq, payload_pos});
    last = h.seq;
    durable_time_ns_ = h.time_ns;
    return true;
  };
  OSR_ASSIGN_OR_RETURN(auto summary,
                       capture::LogReader::ScanWithPositions(dir_ + "/journal", visit));
  if (!summary.errors.empty() && !summary.tail_damaged) {
    const auto& e = summary.errors.front();
    return Corruption(fmt::format("journal of {} is damaged: {} at byte {}: {}", dir_, e.segment,
                                  e.position, e.message));
  }
  capture::CaptureLogOptions lo;
  lo.dir = dir_ + "/journal";
  lo.disk_bytes = 0;  // a group journal: records name their disk
  lo.first_seq = base_seq_ + 1;
  OSR_ASSIGN_OR_RETURN(journal_, capture::CaptureLog::Open(
                                     lo, [this](std::span<const capture::CaptureLog::Written> w,
                                                bool ok) { OnWritten(w, ok); }));
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
  if (durable_seq_ < last) return Corruption(dir_ + ": journal shorter than its index");
  return Status::Ok();
}

void RecoveryStore::OnWritten(std::span<const capture::CaptureLog::Written> records, bool ok) {
  if (!ok) return;  // Append reports the failure
  std::lock_guard lock(mu_);
  for (const auto& w : records) {
    index_[w.disk].Add({w.seq, w.offset, w.length, w.kind, w.segment_first_seq, w.payload_pos});
  }
}

Result<int64_t> RecoveryStore::CheckRecords(std::span<const uint8_t> records, uint64_t expect,
                                            std::vector<std::span<const uint8_t>>* out) const {
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
    if (h.disk >= disks_.size() || h.offset + h.length > disks_[h.disk].size_bytes) {
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
  OSR_ASSIGN_OR_RETURN(int64_t last_time,
                       CheckRecords(records, journal_->last_seq() + 1, &checked));
  if (checked.empty()) return durable_seq();
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
  if (!st.ok()) {
    // All or nothing: the journal's end, its next seq and the index as they were.
    Status undo = RollBackAppend(*end);
    if (!undo.ok()) spdlog::error("recovery store {}: {}", dir_, undo.ToString());
    return NoteWriteFailure("journal append", st, records.size());
  }
  if (auto cut = journal_->pending_cut(); cut && journal_->last_seq() > cut->after_seq) {
    // What the journal lost came again: nothing is missing any more.
    if (Status c = journal_->ClearCut(); !c.ok()) {
      spdlog::warn("recovery store {}: {} (the cut record is cleared at the next start)", dir_,
                   c.ToString());
    }
  }
  std::lock_guard lock(mu_);
  journal_cut_ = journal_->pending_cut();
  durable_seq_ = journal_->last_seq();
  if (last_time != 0) durable_time_ns_ = last_time;
  write_failure_.reset();
  return durable_seq_;
}

Status RecoveryStore::RollBackAppend(const capture::CaptureLog::End& end) {
  Status st = journal_->RollBack(end);
  std::lock_guard lock(mu_);
  for (auto& ix : index_) ix.DropAfter(end.seq);
  // Segments begun by the failed append are gone (a later one may take the same name).
  segments_.erase(segments_.upper_bound(end.segment_first_seq), segments_.end());
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

std::optional<RecoveryStore::WriteFailure> RecoveryStore::write_failure() const {
  std::lock_guard lock(mu_);
  return write_failure_;
}

Status RecoveryStore::WriteBase(uint32_t disk, uint64_t offset, std::span<const uint8_t> data) {
  if (disk >= disks_.size() || offset + data.size() > disks_[disk].size_bytes) {
    return InvalidArgument(fmt::format("base write outside disk {}", disk));
  }
  return base_[disk].PWrite(offset, data);
}

Status RecoveryStore::SyncBase() {
  for (auto& f : base_) OSR_RETURN_IF_ERROR(f.DataSync());
  return Status::Ok();
}

Status RecoveryStore::ReadPayload(const RecordRef& r, uint64_t offset, std::span<uint8_t> out) {
  const File* seg = nullptr;
  {
    std::lock_guard lock(mu_);
    auto it = segments_.find(r.segment_first_seq);
    if (it == segments_.end()) {
      std::string path = dir_ + "/journal/" + capture::SegmentFileName(r.segment_first_seq);
      OSR_ASSIGN_OR_RETURN(File f, File::Open(path, File::Mode::kReadOnly));
      it = segments_.emplace(r.segment_first_seq, std::move(f)).first;
    }
    seg = &it->second;  // std::map nodes stay put; segments_ only grows until Fold
  }
  return seg->PRead(r.payload_pos + (offset - r.offset), out);
}

Status RecoveryStore::ReadAt(uint32_t disk, uint64_t seq, uint64_t offset, std::span<uint8_t> buf) {
  if (disk >= disks_.size() || offset + buf.size() > disks_[disk].size_bytes) {
    return InvalidArgument(fmt::format("read outside disk {}", disk));
  }
  std::shared_lock fold(fold_mu_);
  std::vector<std::tuple<RecordRef, uint64_t, uint64_t>> parts;
  {
    std::lock_guard lock(mu_);
    OSR_RETURN_IF_ERROR(UsableLocked(seq));
    index_[disk].ForEach(
        offset, buf.size(), base_seq_, seq,
        [&](const RecordRef& r, uint64_t o, uint64_t n) { parts.emplace_back(r, o, n); });
  }
  OSR_RETURN_IF_ERROR(base_[disk].PRead(offset, buf));
  // ForEach goes chunk by chunk, each in seq order; chunks do not overlap, so applying
  // the parts in this order gives every byte its newest version.
  for (auto& [r, o, n] : parts) {
    std::span<uint8_t> out = buf.subspan(o - offset, n);
    if (r.kind == RecordKind::kWrite) {
      OSR_RETURN_IF_ERROR(ReadPayload(r, o, out));
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
  OSR_RETURN_IF_ERROR(BeginResyncLocked(from));
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
    // Start the journal over at from + 1: no record up to `from` will come. (Not under
    // mu_: closing the log may call OnWritten.)
    OSR_RETURN_IF_ERROR(StartJournalAt(from + 1));
    std::lock_guard lock(mu_);
    base_seq_ = durable_seq_ = from;
    initial_sync_ = true;
    for (auto& ix : index_) ix = VersionIndex();
  }
  // An initial sync cut short starts over from scratch: the base is all zeros again.
  for (size_t i = 0; i < base_.size(); ++i) {
    OSR_RETURN_IF_ERROR(base_[i].Truncate(0));
    OSR_RETURN_IF_ERROR(base_[i].Truncate(disks_[i].size_bytes));
  }
  OSR_RETURN_IF_ERROR(WriteMeta());
  return BeginResync(from);
}

Status RecoveryStore::StartJournalAt(uint64_t first_seq) {
  journal_.reset();
  {
    std::lock_guard lock(mu_);
    segments_.clear();
    journal_cut_.reset();
  }
  std::error_code ec;
  std::filesystem::remove_all(dir_ + "/journal", ec);
  std::filesystem::create_directories(dir_ + "/journal", ec);
  if (ec) return Status::FromErrno(ec.value(), "recreate " + dir_ + "/journal");
  capture::CaptureLogOptions lo;
  lo.dir = dir_ + "/journal";
  lo.disk_bytes = 0;
  lo.first_seq = first_seq;
  OSR_ASSIGN_OR_RETURN(journal_, capture::CaptureLog::Open(
                                     lo, [this](std::span<const capture::CaptureLog::Written> w,
                                                bool ok) { OnWritten(w, ok); }));
  return Status::Ok();
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
    for (auto& ix : index_) ix = VersionIndex();
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
  staged_.assign(disks_.size(), {});
  std::error_code ec;
  std::filesystem::remove_all(dir_ + "/staging", ec);
  std::filesystem::create_directories(dir_ + "/staging", ec);
  if (ec) return Status::FromErrno(ec.value(), "create " + dir_ + "/staging");
  for (size_t i = 0; i < disks_.size(); ++i) {
    OSR_ASSIGN_OR_RETURN(
        File f, File::Open(fmt::format("{}/staging/{}.img", dir_, i), File::Mode::kCreate));
    OSR_RETURN_IF_ERROR(f.Truncate(disks_[i].size_bytes));
    staging_.push_back(std::move(f));
  }
  resyncing_ = true;
  resync_from_ = from;
  return Status::Ok();
}

Status RecoveryStore::ResyncWrite(uint32_t disk, uint64_t offset, std::span<const uint8_t> data) {
  Status st;
  {
    std::lock_guard lock(mu_);
    if (!resyncing_) return InvalidArgument("no resynchronization is under way");
    if (disk >= disks_.size() || offset + data.size() > disks_[disk].size_bytes) {
      return InvalidArgument(fmt::format("resync data outside disk {}", disk));
    }
    // On failure nothing is staged: a resync that could not stage every region never
    // commits (the sender starts it again from its first region).
    st = staging_[disk].PWrite(offset, data);
    if (st.ok()) staged_[disk].emplace_back(offset, data.size());
  }
  if (!st.ok()) return NoteWriteFailure("resync write", st, data.size());
  return Status::Ok();
}

Status RecoveryStore::CommitResync(uint64_t consistent_seq) {
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
    for (size_t d = 0; d < disks_.size(); ++d) {
      for (auto [off, len] : staged_[d]) {
        for (uint64_t p = off; p < off + len;) {
          size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), off + len - p));
          OSR_RETURN_IF_ERROR(staging_[d].PRead(p, {buf.data(), n}));
          OSR_RETURN_IF_ERROR(base_[d].PWrite(p, {buf.data(), n}));
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
    write_failure_.reset();
  }
  OSR_RETURN_IF_ERROR(WriteMeta());
  std::error_code ec;
  std::filesystem::remove_all(dir_ + "/staging", ec);
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

std::vector<std::vector<std::pair<uint64_t, uint64_t>>> RecoveryStore::ChangedAfter(
    uint64_t seq) const {
  std::lock_guard lock(mu_);
  std::vector<std::vector<std::pair<uint64_t, uint64_t>>> out(disks_.size());
  for (size_t d = 0; d < disks_.size(); ++d) {
    std::vector<std::pair<uint64_t, uint64_t>> r;
    index_[d].ChangedAfter(seq, &r);
    std::sort(r.begin(), r.end());
    for (auto [off, len] : r) {
      if (!out[d].empty() && off <= out[d].back().first + out[d].back().second) {
        auto& last = out[d].back();
        last.second = std::max(last.first + last.second, off + len) - last.first;
      } else {
        out[d].emplace_back(off, len);
      }
    }
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
  std::unique_lock fold(fold_mu_);
  uint64_t from, target;
  {
    std::lock_guard lock(mu_);
    from = base_seq_;
    target = std::min(seq, durable_seq_);
    if (!pins_.empty()) target = std::min(target, *pins_.begin());
    if (target <= from) return from;
  }
  // Apply (from, target] to the base images, in order.
  Status apply;
  auto visit = [&](const RecordHeader& h, std::span<const uint8_t> payload) {
    if (h.seq <= from) return true;
    if (h.seq > target) return false;
    File& f = base_[h.disk];
    Status st = h.kind == RecordKind::kWrite ? f.PWrite(h.offset, payload)
                                             : f.PunchHole(h.offset, h.length);
    if (!st.ok() && st.code() == Code::kNotSupported) st = f.WriteZeroes(h.offset, h.length);
    if (!st.ok()) {
      apply = st;
      return false;
    }
    return true;
  };
  auto summary = capture::LogReader::Scan(dir_ + "/journal", visit);
  if (apply.ok()) apply = summary.status();
  if (apply.ok()) apply = SyncBase();
  if (!apply.ok()) {
    // Some records up to `target` may be in the base now: seqs before `target` cannot be
    // read from it any more (later ones can: their records are applied again on top).
    {
      std::lock_guard lock(mu_);
      consistent_from_ = std::max(consistent_from_, target);
    }
    Status meta = WriteMeta();
    if (!meta.ok()) spdlog::error("recovery store {}: {}", dir_, meta.ToString());
    return NoteWriteFailure("fold", apply, 0);
  }
  {
    std::lock_guard lock(mu_);
    base_seq_ = target;
    for (auto& ix : index_) ix.DropUpTo(target);
  }
  OSR_RETURN_IF_ERROR(WriteMeta());
  // Segments wholly at or below the new base are no longer needed (never the newest).
  OSR_ASSIGN_OR_RETURN(auto segments, capture::ListSegments(dir_ + "/journal"));
  for (size_t i = 0; i + 1 < segments.size(); ++i) {
    if (segments[i + 1].first_seq - 1 > target) break;
    std::lock_guard lock(mu_);
    segments_.erase(segments[i].first_seq);
    std::error_code ec;
    fs::remove(segments[i].path, ec);
  }
  return target;
}

}  // namespace osr::store
