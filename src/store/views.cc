#include "store/views.h"

#include <fmt/format.h>

#include <filesystem>

namespace osr::store {

Result<std::shared_ptr<PointView>> PointView::Open(std::shared_ptr<RecoveryStore> store,
                                                   uint32_t disk, uint64_t seq) {
  if (disk >= store->disks().size()) return InvalidArgument(fmt::format("no disk {}", disk));
  OSR_RETURN_IF_ERROR(store->Pin(seq));
  uint64_t size = store->disks()[disk].size_bytes;
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

Result<std::shared_ptr<OverlayView>> OverlayView::Open(std::shared_ptr<RecoveryStore> store,
                                                       uint32_t disk, uint64_t seq,
                                                       const std::string& overlay_path) {
  if (disk >= store->disks().size()) return InvalidArgument(fmt::format("no disk {}", disk));
  uint64_t size = store->disks()[disk].size_bytes;
  OSR_ASSIGN_OR_RETURN(File f, File::Open(overlay_path, File::Mode::kCreateExclusive));
  Status st = f.Truncate(size);
  if (st.ok()) st = store->Pin(seq);
  if (!st.ok()) {
    std::error_code ec;
    std::filesystem::remove(overlay_path, ec);
    return st;
  }
  return std::shared_ptr<OverlayView>(
      new OverlayView(std::move(store), disk, seq, size, std::move(f), overlay_path));
}

OverlayView::~OverlayView() {
  std::error_code ec;
  std::filesystem::remove(path_, ec);
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
  return overlay_.DataSync();
}

}  // namespace osr::store
