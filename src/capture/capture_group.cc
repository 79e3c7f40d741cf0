#include "capture/capture_group.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <xxhash.h>

#include <chrono>
#include <filesystem>
#include <thread>

#include "capture/log_reader.h"
#include "common/crc32c.h"
#include "common/file.h"
#include "common/json_in.h"
#include "nbd/protocol.h"

namespace osr::capture {

std::string BitmapPath(const std::string& capture_dir, size_t disk) {
  return fmt::format("{}/dirty-{}.bitmap", capture_dir, disk);
}

namespace {

constexpr uint64_t kFenceVersion = 1;
constexpr size_t kFenceBytesMax = 4096;

std::string FencePath(const std::string& capture_dir) {
  return capture_dir + "/fence";
}

// The epoch recorded in <dir>/fence; 0 when there is none. kCorruption for a file that
// is not one (the group is then quarantined: guessing either way could be wrong).
Result<uint64_t> ReadFence(const std::string& dir) {
  std::string path = FencePath(dir);
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return uint64_t{0};
  OSR_ASSIGN_OR_RETURN(std::string text, ReadSmallFile(path, kFenceBytesMax));
  auto j = json_in::ParseObject(text, path);
  if (!j.ok()) return Corruption(j.status().message());
  json_in::Fields fields(*j, path + ": ");
  uint64_t version = fields.U64("version");
  uint64_t epoch = fields.U64("fenced_epoch");
  if (!fields.ok()) return Corruption(fields.status().message());
  if (version != kFenceVersion) {
    return Corruption(fmt::format("{}: version {} is not {}", path, version, kFenceVersion));
  }
  return epoch;
}

}  // namespace

// Disk i of the group: an NBD disk whose changes are sequenced and logged.
class CaptureGroup::GroupDisk final : public nbd::Disk {
 public:
  GroupDisk(CaptureGroup* group, uint32_t index, std::unique_ptr<nbd::Disk> image,
            DirtyBitmap* bitmap)
      : group_(group),
        index_(index),
        image_(std::move(image)),
        bitmap_(bitmap),
        size_(image_->size()) {}

  // What clients see: the image's size until a grow's record is in the log (GrowDisk).
  uint64_t size() const override { return size_.load(); }
  void Publish(uint64_t size) { size_.store(size); }
  bool read_only() const override { return image_->read_only(); }
  Status Read(uint64_t offset, std::span<uint8_t> buf) override {
    return image_->Read(offset, buf);
  }
  Status Write(uint64_t offset, std::span<const uint8_t> data) override;
  Status Zero(uint64_t offset, uint64_t length, nbd::ZeroMode mode, bool fast_only) override;
  Status Flush() override { return group_->Flush(); }
  Status Cache(uint64_t offset, uint64_t length) override { return image_->Cache(offset, length); }
  Status BlockStatus(uint64_t offset, uint64_t length, size_t extents_max,
                     std::vector<nbd::Extent>* out) override {
    return image_->BlockStatus(offset, length, extents_max, out);
  }

  nbd::Disk& image() { return *image_; }

 private:
  void LockRange(uint64_t offset, uint64_t length);
  void UnlockRange(uint64_t offset, uint64_t length);
  // Logs a change already applied to the image.
  void Record(RecordKind kind, uint64_t offset, uint64_t length, std::span<const uint8_t> payload,
              uint32_t payload_crc);

  CaptureGroup* group_;
  const uint32_t index_;
  std::unique_ptr<nbd::Disk> image_;
  DirtyBitmap* bitmap_;
  std::atomic<uint64_t> size_;
  std::mutex range_mu_;
  std::condition_variable range_cv_;
  std::vector<Range> in_flight_;  // guarded by range_mu_
};

Result<std::unique_ptr<CaptureGroup>> CaptureGroup::Open(
    std::vector<std::unique_ptr<nbd::Disk>> images, const CaptureOptions& opts) {
  if (images.empty()) return InvalidArgument("a capture group needs at least one disk");
  std::unique_ptr<CaptureGroup> g(new CaptureGroup());
  std::error_code ec;
  std::filesystem::create_directories(opts.dir, ec);
  if (ec) return Status::FromErrno(ec.value(), "create capture dir " + opts.dir);
  g->dir_ = opts.dir;
  g->region_bytes_ = opts.region_bytes;
  if (!opts.image_paths.empty() && opts.image_paths.size() != images.size()) {
    return InvalidArgument("image_paths must name every disk's image, or none");
  }
  g->image_paths_ = opts.image_paths;
  g->fingerprints_ = !opts.image_paths.empty();
  if (images.size() > kDisksMax) {
    return InvalidArgument(fmt::format("a capture group takes at most {} disks", kDisksMax));
  }
  OSR_ASSIGN_OR_RETURN(uint64_t fenced, ReadFence(opts.dir));
  g->fenced_epoch_ = fenced;
  // A log with records and no bitmap (or an empty one): the marks of writes that may not
  // be in the log are lost; nothing here can say which regions to resend.
  auto segments = ListSegments(opts.dir);
  bool had_log = segments.ok() && !segments->empty();
  for (size_t i = 0; i < images.size(); ++i) {
    std::error_code ec;
    if (had_log && opts.disk_being_added != i &&
        !std::filesystem::exists(BitmapPath(opts.dir, i), ec)) {
      return Corruption(fmt::format("{} is missing (the regions it marked dirty are lost)",
                                    BitmapPath(opts.dir, i)));
    }
  }
  for (size_t i = 0; i < images.size(); ++i) {
    if (images[i]->read_only()) return InvalidArgument("a read-only disk has nothing to capture");
    OSR_ASSIGN_OR_RETURN(
        auto bm, DirtyBitmap::Open(BitmapPath(opts.dir, i), images[i]->size(), opts.region_bytes));
    g->bitmaps_[i] = std::move(bm);
  }
  CaptureLogOptions lo;
  lo.dir = opts.dir;
  // A one-disk log names its disk's size (and is refused for another); a group's says 0.
  lo.disk_bytes = images.size() == 1 ? images[0]->size() : 0;
  lo.epoch = opts.epoch;
  lo.segment_bytes_target = opts.segment_bytes_target;
  lo.log_bytes_max = opts.log_bytes_max;
  lo.first_seq = opts.first_seq;
  CaptureGroup* gp = g.get();
  OSR_ASSIGN_OR_RETURN(
      g->log_, CaptureLog::Open(lo, [gp](std::span<const CaptureLog::Written> records, bool ok) {
        // One bitmap lock per disk per batch.
        thread_local std::vector<std::vector<Range>> ranges;
        ranges.resize(gp->DiskCount());
        for (auto& r : ranges) r.clear();
        for (const auto& w : records) {
          // A mark (a zero record of no length: a resync's end) touched no region.
          if (w.length > 0) ranges[w.disk].push_back({w.offset, w.length});
        }
        for (size_t i = 0; i < ranges.size(); ++i) {
          if (!ranges[i].empty()) gp->bitmaps_[i]->ReleaseAll(ranges[i], ok);
        }
      }));
  if (opts.tracking_only) g->log_->EnterOverflow();
  if (auto cut = g->log_->pending_cut()) {
    // What the cut records changed is unknown, and the recovery site may hold some of
    // them: every region is resent whole (marked until the resync commits).
    for (size_t i = 0; i < images.size(); ++i) g->bitmaps_[i]->MarkSticky(0, images[i]->size());
    spdlog::warn("capture {}: the log was cut after seq {}: every region is resent whole", opts.dir,
                 cut->after_seq);
  }
  for (size_t i = 0; i < images.size(); ++i) {
    g->disks_[i] = std::make_shared<GroupDisk>(gp, static_cast<uint32_t>(i), std::move(images[i]),
                                               g->bitmaps_[i].get());
    g->disk_count_.store(static_cast<uint32_t>(i + 1), std::memory_order_release);
    auto dirty = g->bitmaps_[i]->DirtyRanges();
    if (!dirty.empty()) {
      uint64_t bytes = 0;
      for (auto& r : dirty) bytes += r.length;
      spdlog::warn(
          "capture {}: disk {}: {} bytes in {} range(s) are marked dirty (to be "
          "resent whole)",
          opts.dir, i, bytes, dirty.size());
    }
  }
  OSR_RETURN_IF_ERROR(g->CheckCloseFingerprint(opts.accept_outside_changes));
  g->opened_ = true;
  return g;
}

CaptureGroup::~CaptureGroup() {
  if (!closed_) {
    Status st = Close();
    if (!st.ok()) spdlog::error("capture: close failed: {}", st.ToString());
  }
}

std::shared_ptr<nbd::Disk> CaptureGroup::disk(size_t i) const {
  OSR_CHECK(i < DiskCount());
  return disks_[i];
}

namespace {
std::string ReplaceAll(std::string s, std::string_view from, std::string_view to) {
  for (size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size())) {
    s.replace(at, from.size(), to);
  }
  return s;
}
}  // namespace

std::vector<CaptureGroup::DiskRange> CaptureGroup::WholeDisks() const {
  std::vector<DiskRange> out;
  for (size_t i = 0; i < DiskCount(); ++i) {
    out.push_back({static_cast<uint32_t>(i), {0, disks_[i]->size()}});
  }
  return out;
}

std::vector<CaptureGroup::DiskRange> CaptureGroup::DirtyRegions() const {
  std::vector<DiskRange> out;
  for (size_t i = 0; i < DiskCount(); ++i) {
    for (const Range& r : bitmaps_[i]->DirtyRanges()) out.push_back({static_cast<uint32_t>(i), r});
  }
  return out;
}

Result<std::vector<CaptureGroup::DiskRange>> CaptureGroup::AllocatedRegions() const {
  std::vector<DiskRange> out;
  for (size_t i = 0; i < DiskCount(); ++i) {
    uint64_t size = disks_[i]->size(), pos = 0;
    while (pos < size) {
      std::vector<nbd::Extent> ext;
      OSR_RETURN_IF_ERROR(disks_[i]->image().BlockStatus(pos, size - pos, 1024, &ext));
      if (ext.empty()) break;
      for (auto& e : ext) {
        if (!(e.flags & nbd::kStateHole))
          out.push_back({static_cast<uint32_t>(i), {pos, e.length}});
        pos += e.length;
      }
    }
  }
  return out;
}

Status CaptureGroup::MarkRegions(const std::vector<DiskRange>& regions) {
  for (auto& r : regions) {
    if (r.disk >= DiskCount() || r.range.offset > disks_[r.disk]->size() ||
        r.range.length > disks_[r.disk]->size() - r.range.offset) {
      return InvalidArgument(
          fmt::format("region {}+{} is outside disk {}", r.range.offset, r.range.length, r.disk));
    }
  }
  for (auto& r : regions) {
    if (r.range.length > 0) bitmaps_[r.disk]->MarkSticky(r.range.offset, r.range.length);
  }
  if (!regions.empty()) log_->RingDoorbells();  // a sender that sleeps resynchronizes them
  return Status::Ok();
}

bool CaptureGroup::HasStickyRegions() const {
  for (uint32_t i = 0; i < DiskCount(); ++i) {
    if (bitmaps_[i]->has_sticky()) return true;
  }
  return false;
}

void CaptureGroup::CleanRegions(const std::vector<DiskRange>& regions) {
  for (auto& r : regions) bitmaps_[r.disk]->Clean(r.range.offset, r.range.length);
  if (!HasStickyRegions()) {
    std::lock_guard lock(changed_mu_);
    changed_outside_.clear();  // resent: the recovery site has what the images hold now
  }
}

Status CaptureGroup::ReadDisk(uint32_t disk, uint64_t offset, std::span<uint8_t> buf) {
  if (disk >= DiskCount()) return InvalidArgument("no such disk");
  return disks_[disk]->Read(offset, buf);
}

Result<uint64_t> CaptureGroup::RecordDiskSize(uint32_t disk, const std::string& name,
                                              uint64_t size_bytes) {
  if (name.empty() || name.size() > kDiskNameBytesMax) {
    return InvalidArgument(fmt::format("a disk name has 1..{} bytes", kDiskNameBytesMax));
  }
  if (fenced_epoch_.load() != 0) {
    return Status(Code::kPermissionDenied, "the disks are fenced: they change at the new primary");
  }
  std::span<const uint8_t> payload(reinterpret_cast<const uint8_t*>(name.data()), name.size());
  auto seq = log_->Append(RecordKind::kDiskSize, size_bytes, 0, payload, Crc32c(payload), 0, disk);
  if (!seq) {
    // Over its limit (or failed): the recovery site would never learn of the change.
    return Status(Code::kUnavailable,
                  "the capture log takes no record now (over its limit, or replication has "
                  "not resumed after a failover): change the disk after the next resync");
  }
  OSR_RETURN_IF_ERROR(log_->Sync());  // durable before any byte of the change is written
  return *seq;
}

Result<uint64_t> CaptureGroup::GrowDisk(uint32_t disk, const std::string& name,
                                        uint64_t size_bytes) {
  std::lock_guard layout(layout_mu_);
  if (disk >= DiskCount()) return InvalidArgument(fmt::format("no disk {}", disk));
  GroupDisk& d = *disks_[disk];
  uint64_t had = d.size();
  if (size_bytes <= had) {
    return InvalidArgument(
        fmt::format("disk {} has {} bytes: it grows only, not to {}", name, had, size_bytes));
  }
  // The image and the bitmap first: no client sees the new bytes until the record is in
  // the log, so every write to them comes after it in the capture order.
  OSR_RETURN_IF_ERROR(d.image().Grow(size_bytes));
  OSR_RETURN_IF_ERROR(bitmaps_[disk]->Grow(size_bytes));
  OSR_ASSIGN_OR_RETURN(uint64_t seq, RecordDiskSize(disk, name, size_bytes));
  d.Publish(size_bytes);
  spdlog::info("capture {}: disk {} ({}) grows from {} to {} bytes at seq {}", dir_, disk, name,
               had, size_bytes, seq);
  return seq;
}

Result<uint64_t> CaptureGroup::AddDisk(std::unique_ptr<nbd::Disk> image,
                                       const std::string& image_path, const std::string& name) {
  std::lock_guard layout(layout_mu_);
  const uint32_t disk = DiskCount();
  if (disk >= kDisksMax) {
    return InvalidArgument(fmt::format("a capture group takes at most {} disks", kDisksMax));
  }
  if (image->read_only()) return InvalidArgument("a read-only disk has nothing to capture");
  if (fingerprints_ && image_path.empty()) {
    return InvalidArgument("the image's path is needed for the group's fingerprints");
  }
  OSR_ASSIGN_OR_RETURN(auto bm,
                       DirtyBitmap::Open(BitmapPath(dir_, disk), image->size(), region_bytes_));
  const uint64_t size = image->size();
  // Not published yet: no client reaches the disk before its record is in the log.
  bitmaps_[disk] = std::move(bm);
  disks_[disk] = std::make_shared<GroupDisk>(this, disk, std::move(image), bitmaps_[disk].get());
  auto seq = RecordDiskSize(disk, name, size);
  if (!seq.ok()) {
    disks_[disk].reset();
    bitmaps_[disk].reset();
    std::error_code ec;
    std::filesystem::remove(BitmapPath(dir_, disk), ec);
    return seq.status();
  }
  if (fingerprints_) image_paths_.push_back(image_path);
  disk_count_.store(disk + 1, std::memory_order_release);
  spdlog::info("capture {}: disk {} ({}) of {} bytes added at seq {}", dir_, disk, name, size,
               *seq);
  return *seq;
}

void CaptureGroup::GroupDisk::LockRange(uint64_t offset, uint64_t length) {
  std::unique_lock lock(range_mu_);
  range_cv_.wait(lock, [&] {
    for (auto& r : in_flight_) {
      if (offset < r.offset + r.length && r.offset < offset + length) return false;
    }
    return true;
  });
  in_flight_.push_back({offset, length});
}

void CaptureGroup::GroupDisk::UnlockRange(uint64_t offset, uint64_t length) {
  {
    std::lock_guard lock(range_mu_);
    for (auto it = in_flight_.begin(); it != in_flight_.end(); ++it) {
      if (it->offset == offset && it->length == length) {
        in_flight_.erase(it);
        break;
      }
    }
  }
  range_cv_.notify_all();
}

void CaptureGroup::GroupDisk::Record(RecordKind kind, uint64_t offset, uint64_t length,
                                     std::span<const uint8_t> payload, uint32_t payload_crc) {
  if (!group_->log_->Append(kind, offset, length, payload, payload_crc, 0, index_)) {
    // The log has failed: the bitmap keeps the region until a resync.
    bitmap_->Release(offset, length, /*logged=*/false);
  }
}

Status CaptureGroup::Fence(uint64_t epoch, bool record_fingerprint) {
  std::lock_guard lock(fence_mu_);
  if (epoch == 0 || epoch <= fenced_epoch_) return Status::Ok();
  std::string text =
      nlohmann::json{{"version", kFenceVersion}, {"fenced_epoch", epoch}}.dump() + "\n";
  Status written = WriteFileAtomic(FencePath(dir_),
                                   {reinterpret_cast<const uint8_t*>(text.data()), text.size()});
  fenced_epoch_ = epoch;
  if (!written.ok()) {
    spdlog::error("capture {}: fenced at epoch {} in memory only: {}", dir_, epoch,
                  written.ToString());
  } else {
    spdlog::warn("capture {}: disks fenced at epoch {}: writes are refused", dir_, epoch);
  }
  DrainWrites();
  if (record_fingerprint) {
    // Not the fence's failure: without a fingerprint reprotect compares block hashes.
    if (Status fp = RecordFingerprintLocked(); !fp.ok()) {
      spdlog::error("capture {}: no fence fingerprint (reprotect will compare block hashes): {}",
                    dir_, fp.ToString());
    }
  }
  return written;
}

void CaptureGroup::DrainWrites() {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(kFenceDrainMsMax);
  while (writes_in_progress_.load() != 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      // A write stuck in the image: its change may come after the fingerprint, which then
      // disagrees (reprotect compares hashes: the safe side).
      spdlog::warn("capture {}: writes still in flight {} ms after the fence", dir_,
                   kFenceDrainMsMax);
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

FingerprintSources CaptureGroup::FingerprintSourcesNow() const {
  FingerprintSources src;
  {
    std::lock_guard lock(layout_mu_);
    src.image_paths = image_paths_;
  }
  for (uint32_t i = 0; i < DiskCount(); ++i) {
    src.disks.push_back(&disks_[i]->image());
    src.bitmaps.push_back(bitmaps_[i].get());
  }
  src.log_dir = log_->dir();
  src.log_last_seq = log_->last_seq();
  return src;
}

Status CaptureGroup::RecordFenceFingerprint() {
  std::lock_guard lock(fence_mu_);
  return RecordFingerprintLocked();
}

Status CaptureGroup::RecordFingerprintLocked() {
  Status st = [&]() -> Status {
    uint64_t epoch = fenced_epoch_;
    if (epoch == 0) return Status(Code::kFailedPrecondition, "the disks are not fenced");
    if (!fingerprints_) {
      return Status(Code::kFailedPrecondition, "the disks' image files are not known");
    }
    // What the log holds is final once written out (a failed log: the bitmaps hold it).
    Status synced = log_->Sync();
    if (!synced.ok() && !log_->failed()) return synced;
    int64_t now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                      std::chrono::system_clock::now().time_since_epoch())
                      .count();
    uint64_t seed_in[2] = {epoch, static_cast<uint64_t>(now)};
    uint64_t seed = XXH3_64bits(seed_in, sizeof seed_in);
    OSR_ASSIGN_OR_RETURN(FenceFingerprint fp,
                         TakeFingerprint(FingerprintSourcesNow(), epoch, seed, now));
    return WriteFingerprint(dir_, fp);
  }();
  if (!st.ok()) {
    // An older fingerprint must not vouch for this fence.
    if (Status rm = RemoveFingerprint(dir_); !rm.ok()) {
      spdlog::error("capture {}: {}", dir_, rm.ToString());
    }
    return st;
  }
  spdlog::info("capture {}: fence fingerprint recorded (epoch {}, log up to seq {})", dir_,
               fenced_epoch_.load(), log_->last_seq());
  return Status::Ok();
}

std::vector<FenceMismatch> CaptureGroup::CheckFenceFingerprint(
    uint64_t after, const std::vector<std::string>& disk_names) {
  std::lock_guard lock(fence_mu_);
  auto one = [](FenceCheck c, std::string reason) {
    std::vector<FenceMismatch> v;
    v.push_back(FenceMismatch{c, -1, std::move(reason)});
    return v;
  };
  uint64_t epoch = fenced_epoch_;
  if (epoch == 0) return one(FenceCheck::kNotRecorded, "disks are not fenced");
  auto recorded = ReadFingerprint(dir_);
  if (!recorded.ok()) {
    return one(FenceCheck::kUnreadable,
               "fence fingerprint cannot be read (" + recorded.status().message() + ")");
  }
  if (!recorded->has_value()) {
    return one(FenceCheck::kNotRecorded,
               "fence fingerprint is missing: nothing was recorded of its disks and history when "
               "they were fenced");
  }
  if (!fingerprints_) {
    return one(FenceCheck::kNotRecorded, "disks' image files are not known: no fingerprint");
  }
  const FenceFingerprint& then = **recorded;
  auto now = TakeFingerprint(FingerprintSourcesNow(), epoch, then.sample_seed, then.time_ns);
  if (!now.ok()) {
    return one(FenceCheck::kUnreadable,
               "disks cannot be fingerprinted now (" + now.status().message() + ")");
  }
  return CompareFingerprints(then, *now, after, disk_names);
}

// Counts a write or zero from before its fence check to its end (see writes_in_progress_).
class CaptureGroup::WriteInProgress {
 public:
  explicit WriteInProgress(CaptureGroup* g) : g_(g) { g_->writes_in_progress_.fetch_add(1); }
  ~WriteInProgress() { g_->writes_in_progress_.fetch_sub(1); }
  WriteInProgress(const WriteInProgress&) = delete;
  WriteInProgress& operator=(const WriteInProgress&) = delete;

 private:
  CaptureGroup* g_;
};

Status CaptureGroup::GroupDisk::Write(uint64_t offset, std::span<const uint8_t> data) {
  WriteInProgress busy(group_);
  if (uint64_t e = group_->fenced_epoch_; e != 0) {
    return Status(
        Code::kPermissionDenied,
        fmt::format("this disk was failed over (epoch {}): writes go to the new primary", e));
  }
  uint32_t crc = Crc32c(data);  // outside every lock
  LockRange(offset, data.size());
  bitmap_->Acquire(offset, data.size());
  Status st = image_->Write(offset, data);
  if (st.ok()) {
    Record(RecordKind::kWrite, offset, data.size(), data, crc);
  } else {
    bitmap_->Release(offset, data.size(), /*logged=*/false);  // may be half-written
  }
  UnlockRange(offset, data.size());
  return st;
}

Status CaptureGroup::GroupDisk::Zero(uint64_t offset, uint64_t length, nbd::ZeroMode mode,
                                     bool fast_only) {
  WriteInProgress busy(group_);
  if (uint64_t e = group_->fenced_epoch_; e != 0) {
    return Status(
        Code::kPermissionDenied,
        fmt::format("this disk was failed over (epoch {}): writes go to the new primary", e));
  }
  RecordKind kind = mode == nbd::ZeroMode::kTrim ? RecordKind::kTrim : RecordKind::kZero;
  LockRange(offset, length);
  bitmap_->Acquire(offset, length);
  Status st = image_->Zero(offset, length, mode, fast_only);
  if (st.ok()) {
    Record(kind, offset, length, {}, Crc32c(nullptr, 0));
  } else {
    // A FAST_ZERO refusal changed nothing; any other failure may have changed part.
    bool unchanged = fast_only && st.code() == Code::kNotSupported;
    bitmap_->Release(offset, length, /*logged=*/unchanged);
  }
  UnlockRange(offset, length);
  return st;
}

Status CaptureGroup::Flush() {
  std::unique_lock lock(flush_mu_);
  uint64_t mine = ++flush_requested_;
  lock.unlock();
  // Group commit: whoever holds sync_mu_ covers every request made before it started.
  std::lock_guard sync(sync_mu_);
  lock.lock();
  if (flush_done_ >= mine) return Status::Ok();
  uint64_t covering = flush_requested_;
  lock.unlock();
  uint64_t generation = log_->overflow_generation();
  Status ls = log_->Sync();
  // A failed log, or records it dropped (a full file system; the generation moves then),
  // are covered by the bitmaps: the VM's FLUSH does not fail for replication's sake.
  bool covered =
      log_->failed() || !log_->write_error().ok() || log_->overflow_generation() != generation;
  if (!ls.ok() && !covered) return ls;
  for (uint32_t i = 0; i < DiskCount(); ++i) OSR_RETURN_IF_ERROR(disks_[i]->image().Flush());
  // The bitmaps need no msync here: they survive a process crash through the shared
  // mapping, and after a host crash every region counts as dirty (dirty_bitmap.h).
  lock.lock();
  flush_done_ = std::max(flush_done_, covering);
  return Status::Ok();
}

Status CaptureGroup::Close() {
  closed_ = true;
  // An Open() that failed half-way: nothing was served, nothing is to be recorded (the
  // bitmaps keep their marks as they were).
  if (!log_) return Status::Ok();
  Status ls = log_->Sync();
  if (!ls.ok() && !log_->failed() && log_->write_error().ok()) return ls;
  for (uint32_t i = 0; i < DiskCount(); ++i) OSR_RETURN_IF_ERROR(disks_[i]->image().Flush());
  if (opened_ && !!fingerprints_ && fenced_epoch_ == 0) {
    // (Not after an Open that refused: its record of a change must stay.) What the images are now,
    // for the next Open to tell a change made outside osr (a fenced group has its fence fingerprint
    // for that). Best effort: without it the next Open checks nothing, as after a crash.
    int64_t now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                      std::chrono::system_clock::now().time_since_epoch())
                      .count();
    auto fp = TakeFingerprint(FingerprintSourcesNow(), 0, static_cast<uint64_t>(now), now);
    Status w = fp.ok() ? WriteFingerprint(dir_, *fp, kCloseFingerprintName) : fp.status();
    if (!w.ok()) spdlog::warn("capture {}: no close fingerprint: {}", dir_, w.ToString());
  }
  for (uint32_t i = 0; i < DiskCount(); ++i) OSR_RETURN_IF_ERROR(bitmaps_[i]->CloseClean());
  return Status::Ok();
}

Status CaptureGroup::CheckCloseFingerprint(bool accept) {
  auto recorded = ReadFingerprint(dir_, kCloseFingerprintName);
  if (recorded.ok() && !recorded->has_value()) return Status::Ok();  // a crash, or new
  std::vector<std::string> names;
  for (size_t i = 0; i < DiskCount(); ++i) names.push_back(std::to_string(i));
  std::vector<std::pair<int, std::string>> changed;  // disk (-1: all), why
  if (!recorded.ok()) {
    changed.emplace_back(
        -1, "the close fingerprint cannot be read (" + recorded.status().message() + ")");
  } else if (!!fingerprints_) {
    const FenceFingerprint& then = **recorded;
    auto now = TakeFingerprint(FingerprintSourcesNow(), 0, then.sample_seed, then.time_ns);
    if (!now.ok()) return now.status();
    for (const auto& m : CompareFingerprints(then, *now, UINT64_MAX, names)) {
      switch (m.check) {
        case FenceCheck::kImageChanged:
          // ctime alone: a rename, chmod or chown (an image moved away and back), not its
          // bytes (a write sets mtime; one whose mtime was set back shows in the samples).
          spdlog::info("capture {}: {} (metadata only: taken as it is)", dir_, m.reason);
          break;
        case FenceCheck::kDiskCount:
        case FenceCheck::kImageReplaced:
        case FenceCheck::kImageSize:
        case FenceCheck::kImageModified:
        case FenceCheck::kImageContent:
          changed.emplace_back(m.disk, ReplaceAll(ReplaceAll(m.reason, "after the fence",
                                                             "since the site last stopped"),
                                                  "at the fence", "when the site last stopped"));
          break;
        default:  // the log and bitmaps move at open by design (a cut, a resumed copy)
          break;
      }
    }
  }
  if (!changed.empty() && !accept) {
    std::string why;
    for (const auto& c : changed) why += (why.empty() ? "" : "; ") + c.second;
    return Status(Code::kFailedPrecondition,
                  fmt::format("{}: changed outside osr while the site was stopped: {}", dir_, why));
  }
  for (const auto& [disk, why] : changed) {
    for (size_t i = 0; i < DiskCount(); ++i) {
      if (disk >= 0 && static_cast<size_t>(disk) != i) continue;
      bitmaps_[i]->MarkSticky(0, disks_[i]->size());
    }
    spdlog::warn("capture {}: {}: changed outside osr, taken as it is: resent whole", dir_, why);
    std::lock_guard lock(changed_mu_);
    changed_outside_.push_back(why);
  }
  // It vouches for this start only: osr's own writes change the images from here on.
  OSR_RETURN_IF_ERROR(RemoveFingerprint(dir_, kCloseFingerprintName));
  return SyncDir(dir_);
}

std::vector<std::string> CaptureGroup::changed_outside() const {
  std::lock_guard lock(changed_mu_);
  return changed_outside_;
}

}  // namespace osr::capture
