#include "capture/captured_disk.h"

#include <spdlog/spdlog.h>

#include <filesystem>

#include "common/crc32c.h"

namespace osr::capture {

Result<std::unique_ptr<CapturedDisk>> CapturedDisk::Open(std::unique_ptr<nbd::FileDisk> image,
                                                         const CaptureOptions& opts) {
  if (image->read_only()) return InvalidArgument("a read-only disk has nothing to capture");
  std::unique_ptr<CapturedDisk> d(new CapturedDisk());
  d->image_ = std::move(image);
  std::error_code ec;
  std::filesystem::create_directories(opts.dir, ec);
  if (ec) return Status::FromErrno(ec.value(), "create capture dir " + opts.dir);
  OSR_ASSIGN_OR_RETURN(d->bitmap_, DirtyBitmap::Open(opts.dir + "/dirty.bitmap", d->image_->size(),
                                                     opts.region_bytes));
  CaptureLogOptions lo;
  lo.dir = opts.dir;
  lo.disk_bytes = d->image_->size();
  lo.epoch = opts.epoch;
  lo.segment_bytes_target = opts.segment_bytes_target;
  DirtyBitmap* bm = d->bitmap_.get();
  OSR_ASSIGN_OR_RETURN(
      d->log_, CaptureLog::Open(lo, [bm](std::span<const CaptureLog::Written> records, bool ok) {
        thread_local std::vector<Range> ranges;  // one lock per batch
        ranges.clear();
        for (const auto& w : records) ranges.push_back({w.offset, w.length});
        bm->ReleaseAll(ranges, ok);
      }));
  auto dirty = d->bitmap_->DirtyRanges();
  if (!dirty.empty()) {
    uint64_t bytes = 0;
    for (auto& r : dirty) bytes += r.length;
    spdlog::warn("capture {}: {} bytes in {} range(s) are marked dirty (to be resent whole)",
                 opts.dir, bytes, dirty.size());
  }
  return d;
}

CapturedDisk::~CapturedDisk() {
  if (!closed_) {
    Status st = Close();
    if (!st.ok()) spdlog::error("capture: close failed: {}", st.ToString());
  }
}

void CapturedDisk::LockRange(uint64_t offset, uint64_t length) {
  std::unique_lock lock(range_mu_);
  range_cv_.wait(lock, [&] {
    for (auto& r : in_flight_) {
      if (offset < r.offset + r.length && r.offset < offset + length) return false;
    }
    return true;
  });
  in_flight_.push_back({offset, length});
}

void CapturedDisk::UnlockRange(uint64_t offset, uint64_t length) {
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

Status CapturedDisk::Read(uint64_t offset, std::span<uint8_t> buf) {
  return image_->Read(offset, buf);
}

void CapturedDisk::Record(RecordKind kind, uint64_t offset, uint64_t length,
                          std::span<const uint8_t> payload, uint32_t payload_crc) {
  if (!log_->Append(kind, offset, length, payload, payload_crc)) {
    // The log has failed: the bitmap keeps the region until a resync.
    bitmap_->Release(offset, length, /*logged=*/false);
  }
}

Status CapturedDisk::Write(uint64_t offset, std::span<const uint8_t> data) {
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

Status CapturedDisk::Zero(uint64_t offset, uint64_t length, nbd::ZeroMode mode, bool fast_only) {
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

Status CapturedDisk::Flush() {
  std::unique_lock lock(flush_mu_);
  uint64_t mine = ++flush_requested_;
  lock.unlock();
  // Group commit: whoever holds sync_ covers every request made before it started.
  std::lock_guard sync(sync_mu_);
  lock.lock();
  if (flush_done_ >= mine) return Status::Ok();
  uint64_t covering = flush_requested_;
  lock.unlock();
  Status ls = log_->Sync();
  Status is = image_->Flush();
  if (!ls.ok() && !log_->failed()) return ls;  // a failed log is covered by the bitmap
  OSR_RETURN_IF_ERROR(is);
  // The bitmap needs no msync here: it survives a process crash through the shared
  // mapping, and after a host crash every region counts as dirty (dirty_bitmap.h).
  lock.lock();
  flush_done_ = std::max(flush_done_, covering);
  return Status::Ok();
}

Status CapturedDisk::Cache(uint64_t offset, uint64_t length) {
  return image_->Cache(offset, length);
}

Status CapturedDisk::BlockStatus(uint64_t offset, uint64_t length, size_t extents_max,
                                 std::vector<nbd::Extent>* out) {
  return image_->BlockStatus(offset, length, extents_max, out);
}

Status CapturedDisk::Close() {
  closed_ = true;
  Status ls = log_->Sync();
  if (!ls.ok() && !log_->failed()) return ls;
  OSR_RETURN_IF_ERROR(image_->Flush());
  return bitmap_->CloseClean();
}

}  // namespace osr::capture
