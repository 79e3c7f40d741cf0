// Views of a recovery store's disk as it was at one sequence number, served over NBD.
//
// PointView is read-only and costs nothing to open: no data is copied (invariant 6), the
// store's index answers each read. It pins its seq so that the store does not fold
// past it. OverlayView adds a copy-on-write overlay (a sparse file plus a map of the
// 4 KiB blocks it holds) for the writes of a drill or failed-over VM; the view's seq
// itself never changes.
//
// Thread model: thread-safe. PointView has no state of its own besides its pin; each
// OverlayView serialises its writes under mu_ (reads of blocks not in the overlay go
// to the store without it).
//
// Ownership: a view is an NBD disk, shared by its export and the sessions reading it; it
// goes (and unpins) on whichever thread drops it last: normally the site's, in CloseView,
// after Server::DisconnectExport. A view shares its store (shared_ptr) because that last
// drop may come from an NBD thread after the site has let go of the store: the store
// must still be there to take the unpin.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/file.h"
#include "nbd/disk.h"
#include "store/recovery_store.h"

namespace osr::store {

class PointView : public nbd::Disk {
 public:
  // Pins `seq` in `store` (shared with the view: see the file comment). Errors: kInvalidArgument
  // for a disk the store does not have; Pin's for a seq it cannot read.
  static Result<std::shared_ptr<PointView>> Open(std::shared_ptr<RecoveryStore> store,
                                                 uint32_t disk, uint64_t seq);
  ~PointView() override;

  uint64_t size() const override { return size_; }
  bool read_only() const override { return true; }
  Status Read(uint64_t offset, std::span<uint8_t> buf) override;
  Status Write(uint64_t, std::span<const uint8_t>) override;
  Status Zero(uint64_t, uint64_t, nbd::ZeroMode, bool) override;
  Status Flush() override { return Status::Ok(); }
  Status BlockStatus(uint64_t offset, uint64_t length, size_t extents_max,
                     std::vector<nbd::Extent>* out) override;

  uint64_t seq() const { return seq_; }

 protected:
  PointView(std::shared_ptr<RecoveryStore> store, uint32_t disk, uint64_t seq, uint64_t size)
      : store_(std::move(store)), disk_(disk), seq_(seq), size_(size) {}
  const std::shared_ptr<RecoveryStore> store_;  // shared: see the file comment
  const uint32_t disk_;
  const uint64_t seq_;
  const uint64_t size_;
};

class OverlayView final : public PointView {
 public:
  static constexpr uint64_t kBlock = 4096;
  static constexpr uint32_t kMapVersion = 1;
  // The overlay lives in `overlay_path`, the map of the blocks it holds in
  // `overlay_path`.map (docs/formats.md, "Drill overlay map"), written by Flush after an
  // fdatasync of the overlay: a drill survives a restart of its site with every write
  // it flushed. `reopen`: open an existing overlay and its map (kCorruption when the map
  // is not one for this seq and size, kNotFound when a file is missing); else create it
  // (kAlreadyExists when it is there).
  // It shares `store` (see Ownership above).
  static Result<std::shared_ptr<OverlayView>> Open(std::shared_ptr<RecoveryStore> store,
                                                   uint32_t disk, uint64_t seq,
                                                   const std::string& overlay_path,
                                                   bool reopen = false);
  // The view's files go with it (the drill ends); otherwise they stay for a restart.
  void Discard() { discard_ = true; }
  // The overlay's files are kept (and its map written) unless Discard() was called.
  ~OverlayView() override;

  bool read_only() const override { return false; }
  Status Read(uint64_t offset, std::span<uint8_t> buf) override;
  Status Write(uint64_t offset, std::span<const uint8_t> data) override;
  Status Zero(uint64_t offset, uint64_t length, nbd::ZeroMode mode, bool fast_only) override;
  Status Flush() override;

  uint64_t overlay_bytes() const;

 private:
  OverlayView(std::shared_ptr<RecoveryStore> store, uint32_t disk, uint64_t seq, uint64_t size,
              File overlay, std::string path)
      : PointView(std::move(store), disk, seq, size),
        overlay_(std::move(overlay)),
        path_(std::move(path)),
        held_((size + kBlock - 1) / kBlock, false) {}
  // Brings the blocks of [offset, offset+length) into the overlay (copying the view's
  // bytes for blocks only partly covered); holds mu_.
  Status Own(uint64_t offset, uint64_t length);
  std::vector<uint8_t> EncodeMapLocked() const;  // holds mu_
  Status LoadMap(const std::string& map_path);

  File overlay_;
  std::string path_;
  mutable std::mutex mu_;
  std::vector<bool> held_;    // guarded by mu_
  uint64_t held_blocks_ = 0;  // guarded by mu_
  std::atomic<bool> discard_{false};
  bool discard_files_ = true;  // false: a reopen failed; the files are left as they are
  std::mutex flush_mu_;        // one map write at a time
};

}  // namespace osr::store
