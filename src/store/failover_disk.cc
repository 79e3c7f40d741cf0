#include "store/failover_disk.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <thread>

#include "common/crc32c.h"
#include "common/le.h"
#include "nbd/protocol.h"

namespace osr::store {

namespace {

constexpr char kMapMagic[8] = {'O', 'S', 'R', 'C', 'O', 'W', '0', '1'};
constexpr size_t kMapHeaderBytes = 48;

bool AllZero(std::span<const uint8_t> b) {
  static const uint8_t zeros[4096] = {};
  for (size_t p = 0; p < b.size(); p += sizeof(zeros)) {
    size_t n = std::min(sizeof(zeros), b.size() - p);
    if (std::memcmp(b.data() + p, zeros, n) != 0) return false;
  }
  return true;
}

}  // namespace

FailoverDisk::FailoverDisk(File image, std::string map_path, std::shared_ptr<RecoveryStore> store,
                           uint32_t disk, uint64_t seq, uint64_t size, uint64_t region_bytes)
    : image_(std::move(image)),
      map_path_(std::move(map_path)),
      disk_(disk),
      seq_(seq),
      size_(size),
      region_bytes_(region_bytes),
      regions_((size + region_bytes - 1) / region_bytes),
      store_(std::move(store)),
      bits_((regions_ + 63) / 64) {}

Result<std::unique_ptr<FailoverDisk>> FailoverDisk::Open(const std::string& image_path,
                                                         std::shared_ptr<RecoveryStore> store,
                                                         uint32_t disk, uint64_t seq,
                                                         uint64_t region_bytes) {
  OSR_ASSIGN_OR_RETURN(StoreDisk at, store->DiskAt(disk, seq));  // as it was at seq
  if (region_bytes == 0 || region_bytes % 4096 != 0) {
    return InvalidArgument("the region size must be a multiple of 4096");
  }
  uint64_t size = at.size_bytes;
  std::string map_path = image_path + ".cow";
  std::error_code ec;
  bool fresh = !std::filesystem::exists(map_path, ec);
  bool image = std::filesystem::exists(image_path, ec);
  if (fresh && image) {
    // An image without its map would be read as the point: refuse rather than guess.
    return Corruption(image_path + " exists but its region map " + map_path + " does not");
  }
  if (!fresh && !image) {
    return Corruption(map_path + " names regions of " + image_path + ", which is missing");
  }
  OSR_ASSIGN_OR_RETURN(File f, File::Open(image_path, File::Mode::kCreate));
  OSR_RETURN_IF_ERROR(f.Truncate(size));
  std::unique_ptr<FailoverDisk> d(
      new FailoverDisk(std::move(f), map_path, store, disk, seq, size, region_bytes));
  if (fresh) {
    std::lock_guard lock(d->mu_);
    OSR_RETURN_IF_ERROR(d->WriteMapLocked());
  } else {
    std::ifstream in(map_path, std::ios::binary);
    std::vector<uint8_t> m((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    size_t words = d->bits_.size();
    if (m.size() != kMapHeaderBytes + 8 * words + 4 ||
        Ld32(m.data() + m.size() - 4) != Crc32c(m.data(), m.size() - 4) ||
        std::memcmp(m.data(), kMapMagic, 8) != 0) {
      return Corruption(map_path + " is not a region map (bad size, magic or CRC)");
    }
    if (Ld32(m.data() + 8) != kMapVersion || Ld64(m.data() + 16) != size ||
        Ld64(m.data() + 24) != seq || Ld64(m.data() + 32) != region_bytes) {
      return Corruption(fmt::format(
          "{} was written for another disk (version {}, size {}, seq {}, region {})", map_path,
          Ld32(m.data() + 8), Ld64(m.data() + 16), Ld64(m.data() + 24), Ld64(m.data() + 32)));
    }
    for (size_t i = 0; i < words; ++i) d->bits_[i] = Ld64(m.data() + kMapHeaderBytes + 8 * i);
  }
  OSR_RETURN_IF_ERROR(store->Pin(seq));
  d->pinned_ = true;
  return d;
}

FailoverDisk::~FailoverDisk() {
  Status st = Flush();
  if (!st.ok()) spdlog::error("failover disk {}: {}", map_path_, st.ToString());
  std::unique_lock base(base_mu_);
  if (store_ != nullptr && pinned_) store_->Unpin(seq_);
}

void FailoverDisk::SetHeld(uint64_t region) {
  bits_[region / 64].fetch_or(uint64_t{1} << (region % 64), std::memory_order_release);
  ++map_generation_;
}

uint64_t FailoverDisk::held_bytes() const {
  uint64_t n = 0;
  for (auto& w : bits_) n += std::popcount(w.load());
  return std::min(n * region_bytes_, size_);
}

Status FailoverDisk::ReadPoint(uint64_t offset, std::span<uint8_t> buf) {
  std::shared_lock base(base_mu_);
  if (store_ == nullptr) {
    // Materialised meanwhile: every region is in the image now.
    return image_.PRead(offset, buf);
  }
  return store_->ReadAt(disk_, seq_, offset, buf);
}

Status FailoverDisk::OwnLocked(uint64_t region) {
  if (Held(region)) return Status::Ok();
  uint64_t off = region * region_bytes_;
  uint64_t len = std::min(region_bytes_, size_ - off);
  std::vector<uint8_t> buf(len);
  OSR_RETURN_IF_ERROR(ReadPoint(off, buf));
  // Zeros as a hole (sparse), never by skipping: the image may hold bytes of a write that
  // a crash left without its bit, which must not show through.
  if (AllZero(buf)) {
    OSR_RETURN_IF_ERROR(image_.PunchHole(off, len));
  } else {
    OSR_RETURN_IF_ERROR(image_.PWrite(off, buf));
  }
  SetHeld(region);
  return Status::Ok();
}

Result<std::pair<uint64_t, uint64_t>> FailoverDisk::Prepare(uint64_t offset, uint64_t length) {
  uint64_t first = offset / region_bytes_;
  uint64_t last = (offset + length - 1) / region_bytes_;
  auto whole = [&](uint64_t r) {
    uint64_t ro = r * region_bytes_;
    return offset <= ro && offset + length >= std::min(ro + region_bytes_, size_);
  };
  bool first_whole = whole(first), last_whole = whole(last);
  {
    std::lock_guard lock(mu_);
    if (!first_whole) OSR_RETURN_IF_ERROR(OwnLocked(first));
    if (!last_whole) OSR_RETURN_IF_ERROR(OwnLocked(last));
  }
  // The regions covered whole: [wf, wl]; wf > wl when there is none. They are being
  // written: Materialise must not copy the point over them meanwhile.
  uint64_t wf = first_whole ? first : first + 1;
  if (!last_whole && last == 0) return std::pair<uint64_t, uint64_t>{1, 0};
  uint64_t wl = last_whole ? last : last - 1;
  if (wf <= wl) {
    std::lock_guard lock(mu_);
    writing_.emplace_back(wf, wl);
  }
  return std::pair<uint64_t, uint64_t>{wf, wl};
}

void FailoverDisk::Finish(std::pair<uint64_t, uint64_t> whole, bool ok) {
  if (whole.first > whole.second) return;
  std::lock_guard lock(mu_);
  auto it = std::find(writing_.begin(), writing_.end(), whole);
  if (it != writing_.end()) writing_.erase(it);
  if (!ok) return;  // a failed write may have changed part: the next write of it copies again
  for (uint64_t r = whole.first; r <= whole.second; ++r) {
    if (!Held(r)) SetHeld(r);
  }
}

bool FailoverDisk::BeingWrittenLocked(uint64_t region) const {
  for (auto [f, l] : writing_) {
    if (f <= region && region <= l) return true;
  }
  return false;
}

Status FailoverDisk::Read(uint64_t offset, std::span<uint8_t> buf) {
  if (offset > size_ || buf.size() > size_ - offset) return InvalidArgument("read past the end");
  // Runs of held and not-held regions, each read from where it lives.
  uint64_t pos = offset, end = offset + buf.size();
  while (pos < end) {
    uint64_t r = pos / region_bytes_;
    bool held = Held(r);
    uint64_t run_end = std::min(end, (r + 1) * region_bytes_);
    while (run_end < end && Held(run_end / region_bytes_) == held) {
      run_end = std::min(end, run_end + region_bytes_);
    }
    auto part = buf.subspan(pos - offset, run_end - pos);
    OSR_RETURN_IF_ERROR(held ? image_.PRead(pos, part) : ReadPoint(pos, part));
    pos = run_end;
  }
  return Status::Ok();
}

Status FailoverDisk::Write(uint64_t offset, std::span<const uint8_t> data) {
  if (data.empty()) return Status::Ok();
  if (offset > size_ || data.size() > size_ - offset) return InvalidArgument("write past the end");
  OSR_ASSIGN_OR_RETURN(auto whole, Prepare(offset, data.size()));
  Status st = image_.PWrite(offset, data);
  // Regions the write covered whole are held once their new bytes are in the image.
  Finish(whole, st.ok());
  return st;
}

Status FailoverDisk::Zero(uint64_t offset, uint64_t length, nbd::ZeroMode mode, bool fast_only) {
  if (length == 0) return Status::Ok();
  if (offset > size_ || length > size_ - offset) return InvalidArgument("zero past the end");
  if (fast_only) return Status(Code::kNotSupported, "fast zeroing is not offered here");
  OSR_ASSIGN_OR_RETURN(auto whole, Prepare(offset, length));
  Status st = mode == nbd::ZeroMode::kZeroNoHole ? image_.ZeroRange(offset, length)
                                                 : image_.PunchHole(offset, length);
  Finish(whole, st.ok());
  return st;
}

Status FailoverDisk::WriteMapLocked() {
  std::vector<uint8_t> m(kMapHeaderBytes + 8 * bits_.size() + 4, 0);
  std::memcpy(m.data(), kMapMagic, 8);
  Le32(m.data() + 8, kMapVersion);
  Le64(m.data() + 16, size_);
  Le64(m.data() + 24, seq_);
  Le64(m.data() + 32, region_bytes_);
  Le64(m.data() + 40, regions_);
  for (size_t i = 0; i < bits_.size(); ++i) {
    Le64(m.data() + kMapHeaderBytes + 8 * i, bits_[i].load(std::memory_order_acquire));
  }
  Le32(m.data() + m.size() - 4, Crc32c(m.data(), m.size() - 4));
  return WriteFileAtomic(map_path_, m);
}

Status FailoverDisk::Flush() {
  if (materialised_) return image_.Sync();
  // Bits set before this point belong to bytes already in the image: sync those, then
  // write the map that names them. (A later bit waits for the next flush.)
  std::lock_guard lock(mu_);
  uint64_t gen = map_generation_;
  OSR_RETURN_IF_ERROR(image_.Sync());
  if (gen == map_written_) return Status::Ok();
  OSR_RETURN_IF_ERROR(WriteMapLocked());
  map_written_ = gen;
  return Status::Ok();
}

Status FailoverDisk::BlockStatus(uint64_t offset, uint64_t length, size_t extents_max,
                                 std::vector<nbd::Extent>* out) {
  // Regions the image holds: its own allocation (holes read as zeros). Regions still on
  // the point: data (allocation through the store is not tracked).
  uint64_t pos = offset, end = offset + length;
  while (pos < end && out->size() < extents_max) {
    uint64_t r = pos / region_bytes_;
    bool held = Held(r);
    uint64_t run_end = std::min(end, (r + 1) * region_bytes_);
    while (run_end < end && Held(run_end / region_bytes_) == held) {
      run_end = std::min(end, run_end + region_bytes_);
    }
    if (!held) {
      out->push_back({run_end - pos, 0});
      pos = run_end;
      continue;
    }
    while (pos < run_end && out->size() < extents_max) {
      OSR_ASSIGN_OR_RETURN(uint64_t data, image_.SeekData(pos, size_));
      if (data > pos) {
        uint64_t stop = std::min(data, run_end);
        out->push_back({stop - pos, nbd::kStateHole | nbd::kStateZero});
        pos = stop;
        continue;
      }
      OSR_ASSIGN_OR_RETURN(uint64_t hole, image_.SeekHole(pos, size_));
      uint64_t stop = std::min(hole, run_end);
      if (stop <= pos) stop = run_end;
      out->push_back({stop - pos, 0});
      pos = stop;
    }
  }
  return Status::Ok();
}

Status FailoverDisk::Materialise(const std::function<void(uint64_t, uint64_t)>& progress,
                                 const std::atomic<bool>& stop) {
  if (materialised_) return Status::Ok();
  std::vector<uint64_t> skipped;  // being written whole just now: they will be held
  for (uint64_t r = 0; r < regions_; ++r) {
    if (stop) return Unavailable("materialising stopped");
    if (!Held(r)) {
      std::lock_guard lock(mu_);
      if (BeingWrittenLocked(r)) {
        skipped.push_back(r);
      } else {
        OSR_RETURN_IF_ERROR(OwnLocked(r));
      }
    }
    if (progress && (r % 16 == 15 || r + 1 == regions_)) {
      progress(std::min(size_, (r + 1) * region_bytes_), size_);
    }
  }
  // A write in flight either completes (held) or fails (then copy the point).
  for (int pass = 0; !skipped.empty(); ++pass) {
    if (stop || pass > 6000) return Unavailable("materialising stopped");
    std::vector<uint64_t> again;
    for (uint64_t r : skipped) {
      std::lock_guard lock(mu_);
      if (Held(r)) continue;
      if (BeingWrittenLocked(r)) {
        again.push_back(r);
      } else {
        OSR_RETURN_IF_ERROR(OwnLocked(r));
      }
    }
    skipped.swap(again);
    if (!skipped.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  OSR_RETURN_IF_ERROR(Flush());
  {
    // No read of the point is in flight past this; later ones read the image.
    std::unique_lock base(base_mu_);
    if (store_ != nullptr && pinned_) store_->Unpin(seq_);
    store_ = nullptr;
  }
  // The map stays (every region held) until the site has recorded that the disks are
  // plain images: a restart in between opens them as failover disks again, all held.
  materialised_ = true;
  return Status::Ok();
}

}  // namespace osr::store
