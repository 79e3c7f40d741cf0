#include "store/views.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <cstring>
#include <filesystem>

#include "common/crc32c.h"
#include "common/le.h"

namespace osr::store {

Result<std::shared_ptr<PointView>> PointView::Open(std::shared_ptr<RecoveryStore> store,
                                                   uint32_t disk, uint64_t seq) {
  // The disk as it was at seq (kNotFound: added after it).
  OSR_ASSIGN_OR_RETURN(StoreDisk at, store->DiskAt(disk, seq));
  OSR_RETURN_IF_ERROR(store->Pin(seq));
  uint64_t size = at.size_bytes;
  return std::shared_ptr<PointView>(new PointView(std::move(store), disk, seq, size));
}

PointView::~PointView() {
  store_->Unpin(seq_);
}

Status PointView::Read(uint64_t offset, std::span<uint8_t> buf) {
  return store_->ReadAt(disk_, seq_, offset, buf);
}

Status PointView::Write(uint64_t, std::span<const uint8_t>) {
  return Status(Code::kPermissionDenied, "a recovery point view is read-only");
}

Status PointView::Zero(uint64_t, uint64_t, nbd::ZeroMode, bool) {
  return Status(Code::kPermissionDenied, "a recovery point view is read-only");
}

Status PointView::BlockStatus(uint64_t offset, uint64_t length, size_t,
                              std::vector<nbd::Extent>* out) {
  // Allocation through base and journal is not tracked: everything reads as data.
  out->push_back({length, 0});
  (void)offset;
  return Status::Ok();
}

namespace {

constexpr char kMapMagic[8] = {'O', 'S', 'R', 'O', 'V', 'M', 'A', 'P'};
constexpr size_t kMapHeaderBytes = 8 + 4 + 4 + 8 + 8 + 8;  // magic .. held_blocks

std::string MapPath(const std::string& overlay_path) {
  return overlay_path + ".map";
}

}  // namespace

Result<std::shared_ptr<OverlayView>> OverlayView::Open(std::shared_ptr<RecoveryStore> store,
                                                       uint32_t disk, uint64_t seq,
                                                       const std::string& overlay_path,
                                                       bool reopen) {
  OSR_ASSIGN_OR_RETURN(StoreDisk at, store->DiskAt(disk, seq));  // as it was at seq
  uint64_t size = at.size_bytes;
  if (reopen) {
    OSR_ASSIGN_OR_RETURN(File f, File::Open(overlay_path, File::Mode::kReadWrite));
    OSR_ASSIGN_OR_RETURN(uint64_t have, f.Size());
    if (have != size) {
      return Corruption(
          fmt::format("{} has {} bytes, not the disk's {}", overlay_path, have, size));
    }
    OSR_RETURN_IF_ERROR(store->Pin(seq));
    std::shared_ptr<OverlayView> v(
        new OverlayView(store, disk, seq, size, std::move(f), overlay_path));
    if (Status loaded = v->LoadMap(MapPath(overlay_path)); !loaded.ok()) {
      v->Discard();  // not ours to delete either: the caller decides what a lost drill keeps
      v->discard_files_ = false;
      return loaded;
    }
    return v;
  }
  OSR_ASSIGN_OR_RETURN(File f, File::Open(overlay_path, File::Mode::kCreateExclusive));
  Status st = f.Truncate(size);
  if (st.ok()) st = store->Pin(seq);
  if (!st.ok()) {
    std::error_code ec;
    std::filesystem::remove(overlay_path, ec);
    return st;
  }
  std::shared_ptr<OverlayView> v(
      new OverlayView(std::move(store), disk, seq, size, std::move(f), overlay_path));
  // The map exists from the start: a restart before the first flush finds an empty one.
  if (Status flushed = v->Flush(); !flushed.ok()) {
    v->Discard();
    return flushed;
  }
  return v;
}

OverlayView::~OverlayView() {
  std::error_code ec;
  if (discard_) {
    if (discard_files_) {
      std::filesystem::remove(path_, ec);
      std::filesystem::remove(MapPath(path_), ec);
    }
    return;
  }
  // Kept for a restart of the site: every write so far, as a clean shutdown would.
  if (Status st = Flush(); !st.ok()) {
    spdlog::error("drill overlay {}: its last writes may be lost: {}", path_, st.ToString());
  }
}

std::vector<uint8_t> OverlayView::EncodeMapLocked() const {
  uint64_t blocks = held_.size();
  std::vector<uint8_t> out(kMapHeaderBytes + (blocks + 7) / 8 + 4, 0);
  uint8_t* p = out.data();
  std::memcpy(p, kMapMagic, 8);
  Le32(p + 8, kMapVersion);
  Le32(p + 12, static_cast<uint32_t>(kBlock));
  Le64(p + 16, seq_);
  Le64(p + 24, size_);
  Le64(p + 32, held_blocks_);
  for (uint64_t b = 0; b < blocks; ++b) {
    if (held_[b]) p[kMapHeaderBytes + b / 8] |= static_cast<uint8_t>(1u << (b % 8));
  }
  size_t body = out.size() - 4;
  Le32(p + body, Crc32c(p, body));
  return out;
}

Status OverlayView::LoadMap(const std::string& map_path) {
  OSR_ASSIGN_OR_RETURN(File f, File::Open(map_path, File::Mode::kReadOnly));
  OSR_ASSIGN_OR_RETURN(uint64_t bytes, f.Size());
  uint64_t blocks = held_.size();
  uint64_t want = kMapHeaderBytes + (blocks + 7) / 8 + 4;
  if (bytes != want) {
    return Corruption(fmt::format("{} has {} bytes, not {}", map_path, bytes, want));
  }
  std::vector<uint8_t> buf(want);
  OSR_RETURN_IF_ERROR(f.PRead(0, buf));
  const uint8_t* p = buf.data();
  if (std::memcmp(p, kMapMagic, 8) != 0) return Corruption(map_path + " is not an overlay map");
  if (Ld32(p + want - 4) != Crc32c(p, want - 4)) {
    return Corruption(map_path + ": checksum mismatch");
  }
  if (Ld32(p + 8) != kMapVersion || Ld32(p + 12) != kBlock || Ld64(p + 16) != seq_ ||
      Ld64(p + 24) != size_) {
    return Corruption(fmt::format("{} is a map of another overlay (version {}, seq {}, {} bytes)",
                                  map_path, Ld32(p + 8), Ld64(p + 16), Ld64(p + 24)));
  }
  std::lock_guard lock(mu_);
  held_blocks_ = 0;
  for (uint64_t b = 0; b < blocks; ++b) {
    held_[b] = (p[kMapHeaderBytes + b / 8] >> (b % 8)) & 1;
    held_blocks_ += held_[b] ? 1 : 0;
  }
  if (held_blocks_ != Ld64(p + 32)) {
    return Corruption(map_path + ": its count of blocks does not match its bits");
  }
  return Status::Ok();
}

uint64_t OverlayView::overlay_bytes() const {
  std::lock_guard lock(mu_);
  return held_blocks_ * kBlock;
}

Status OverlayView::Read(uint64_t offset, std::span<uint8_t> buf) {
  // Runs of blocks are read from where they are: the overlay or the point.
  uint64_t end = offset + buf.size();
  uint64_t pos = offset;
  while (pos < end) {
    uint64_t b = pos / kBlock;
    bool in_overlay;
    uint64_t run_end;
    {
      std::lock_guard lock(mu_);
      in_overlay = held_[b];
      run_end = std::min(end, (b + 1) * kBlock);
      while (run_end < end && held_[run_end / kBlock] == in_overlay) {
        run_end = std::min(end, run_end + kBlock);
      }
    }
    std::span<uint8_t> part = buf.subspan(pos - offset, run_end - pos);
    OSR_RETURN_IF_ERROR(in_overlay ? overlay_.PRead(pos, part) : PointView::Read(pos, part));
    pos = run_end;
  }
  return Status::Ok();
}

Status OverlayView::Own(uint64_t offset, uint64_t length) {
  std::vector<uint8_t> block(kBlock);
  for (uint64_t b = offset / kBlock; b * kBlock < offset + length; ++b) {
    if (held_[b]) continue;
    uint64_t start = b * kBlock;
    uint64_t n = std::min(kBlock, size_ - start);
    bool whole = offset <= start && start + n <= offset + length;
    if (!whole) {  // keep the bytes the write does not cover
      OSR_RETURN_IF_ERROR(PointView::Read(start, {block.data(), n}));
      OSR_RETURN_IF_ERROR(overlay_.PWrite(start, {block.data(), n}));
    }
    held_[b] = true;
    ++held_blocks_;
  }
  return Status::Ok();
}

Status OverlayView::Write(uint64_t offset, std::span<const uint8_t> data) {
  std::lock_guard lock(mu_);
  OSR_RETURN_IF_ERROR(Own(offset, data.size()));
  return overlay_.PWrite(offset, data);
}

Status OverlayView::Zero(uint64_t offset, uint64_t length, nbd::ZeroMode, bool) {
  std::lock_guard lock(mu_);
  OSR_RETURN_IF_ERROR(Own(offset, length));
  return overlay_.WriteZeroes(offset, length);
}

Status OverlayView::Flush() {
  // The map is taken first, then the data it names is synced, then the map is written: a
  // map never names a block whose bytes may not be on disk (a block is written under mu_
  // in the same critical section that marks it). One flush at a time, so that an older
  // map never replaces a newer one.
  std::lock_guard flush(flush_mu_);
  std::vector<uint8_t> map;
  {
    std::lock_guard lock(mu_);
    map = EncodeMapLocked();
  }
  OSR_RETURN_IF_ERROR(overlay_.DataSync());
  return WriteFileAtomic(MapPath(path_), map);
}

}  // namespace osr::store
