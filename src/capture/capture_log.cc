#include "capture/capture_log.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>

#include <chrono>
#include <cstring>
#include <filesystem>

#include "capture/log_reader.h"
#include "common/crc32c.h"
#include "common/json_in.h"
#include "common/threads.h"

namespace osr::capture {

namespace {

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

constexpr uint64_t kCutFileBytesMax = 64u << 10;
// The most records the cut bytes of one segment can hold: a segment grows past its target
// by at most one record (≤ 64 MiB), and every record is at least 64 bytes.
constexpr uint64_t kCutSeqsMax = (uint64_t{1} << 30) / RecordHeader::kSize;
// Seqs stay far below 2^63 (a catalog's signed 64-bit integers).
constexpr uint64_t kSeqMax = uint64_t{1} << 62;

std::string CutPath(const std::string& dir) {
  return dir + "/cut.json";
}

Status RemoveCutFile(const std::string& dir) {
  std::error_code ec;
  RemovePath(CutPath(dir), ec);
  if (ec) return Status::FromErrno(ec.value(), "remove " + CutPath(dir));
  return SyncDir(dir);
}

// The smallest segment CaptureLog::Open makes to keep segments below a quarter of the limit.
constexpr uint64_t kSegmentBytesMin = 256 << 10;

}  // namespace

Result<std::unique_ptr<CaptureLog>> CaptureLog::Open(const CaptureLogOptions& opts,
                                                     RangeCallback on_written) {
  std::error_code ec;
  CreateDirectories(opts.dir, ec);
  if (ec) return Status::FromErrno(ec.value(), "create capture dir " + opts.dir);
  CaptureLogOptions o = opts;
  if (o.log_bytes_max != UINT64_MAX) {
    // Segments well below the limit: only whole segments are trimmed, and the one being
    // written never is; a segment near the limit would keep the log over it with records
    // the recovery site already has (then not even a resync's end mark fits).
    o.segment_bytes_target =
        std::min(o.segment_bytes_target, std::max<uint64_t>(kSegmentBytesMin, o.log_bytes_max / 4));
  }
  std::unique_ptr<CaptureLog> log(new CaptureLog(o, std::move(on_written)));
  OSR_RETURN_IF_ERROR(log->Recover());
  log->writer_ = std::thread([p = log.get()] {
    NameThisThread("osr-log-writer");
    p->WriterLoop();
  });
  return log;
}

CaptureLog::~CaptureLog() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  writer_cv_.notify_all();
  if (writer_.joinable()) writer_.join();
  if (!segment_.valid()) return;  // Open failed before the log was usable
  Status st = Sync();
  if (st.ok()) {
    std::lock_guard wl(write_mu_);
    st = segment_.Truncate(segment_bytes_);  // cut the zero padding of the last block
    if (st.ok()) st = segment_.DataSync();
  }
  if (!st.ok() && !failed() && write_error().ok()) {
    spdlog::error("capture log {}: final sync failed: {}", opts_.dir, st.ToString());
  }
}

Status CaptureLog::Recover() {
  OSR_RETURN_IF_ERROR(LoadCut());
  {
    // A crash while a segment was being created can leave its first block unwritten:
    // such a file holds no record and is removed.
    OSR_ASSIGN_OR_RETURN(auto segments, ListSegments(opts_.dir));
    if (!segments.empty()) {
      OSR_ASSIGN_OR_RETURN(File f, File::Open(segments.back().path, File::Mode::kReadOnly));
      OSR_ASSIGN_OR_RETURN(uint64_t fsize, f.Size());
      uint8_t hb[SegmentHeader::kSize] = {};
      bool header_ok = fsize >= sizeof hb && f.PRead(0, hb).ok() && SegmentHeader::Decode(hb).ok();
      if (!header_ok && fsize <= AlignedBuffer::kAlign) {
        spdlog::warn("capture log: removing {}, a segment whose creation did not finish",
                     segments.back().path);
        std::error_code ec;
        RemovePath(segments.back().path, ec);
        if (ec) return Status::FromErrno(ec.value(), "remove " + segments.back().path);
      }
    }
  }
  uint64_t scan_from = 0;
  if (!opts_.verify_all_on_open) {
    OSR_ASSIGN_OR_RETURN(auto segments, ListSegments(opts_.dir));
    if (!segments.empty()) scan_from = segments.back().first_seq;
  }
  OSR_ASSIGN_OR_RETURN(auto summary, LogReader::Scan(opts_.dir, nullptr, false, scan_from));
  recovered_time_ns_ = summary.last_time_ns;
  if (!summary.errors.empty()) {
    const LogError& e = summary.errors.front();
    bool torn_tail = summary.tail_damaged;
    if (torn_tail) {
      OSR_ASSIGN_OR_RETURN(File f, File::Open(e.segment, File::Mode::kReadWrite));
      OSR_ASSIGN_OR_RETURN(uint64_t fsize, f.Size());
      OSR_ASSIGN_OR_RETURN(uint64_t next_valid, FindNextRecord(f, e.position, fsize));
      // Valid records after the damage do not make it damage among written records: a
      // write-out's blocks may reach the disk in any order (O_DIRECT, a drive's volatile
      // cache), so a power loss can leave a torn record with later ones whole after it.
      // Everything from the damage on is cut (the cut record makes it safe either way).
      if (e.position < SegmentHeader::kSize) {
        torn_tail = false;
      } else {
        if (next_valid != 0) {
          spdlog::warn(
              "capture log: {}: valid records follow the damage at byte {} (from byte {}); "
              "they are cut with it",
              e.segment, e.position, next_valid);
        }
        OSR_ASSIGN_OR_RETURN(auto segments, ListSegments(opts_.dir));
        uint64_t after = summary.records > 0 ? summary.last_seq : segments.back().first_seq - 1;
        if (summary.records > 0 && summary.last_seq < segments.back().first_seq) {
          after = segments.back().first_seq - 1;  // the damaged segment holds no good record
        }
        spdlog::warn(
            "capture log: {} at byte {}: {}; cutting the log after seq {} ({} bytes; every "
            "seq up to the most they could hold is skipped, and the disks are resent whole)",
            e.segment, e.position, e.message, after, fsize - e.position);
        OSR_RETURN_IF_ERROR(
            CutTail(e.segment, e.position, after,
                    fmt::format("{} at byte {}: {}", e.segment, e.position, e.message)));
      }
    }
    if (!torn_tail) {
      return Corruption(fmt::format(
          "capture log {} is damaged: {} at byte {}: {} (see 'osrd capture dump --log {}')",
          opts_.dir, e.segment, e.position, e.message, opts_.dir));
    }
  }
  OSR_ASSIGN_OR_RETURN(auto segments, ListSegments(opts_.dir));
  for (auto& seg : segments) {
    std::error_code ec;
    held_bytes_ += std::filesystem::file_size(seg.path, ec);
  }
  if (!segments.empty()) {
    // Check the disk size against the newest segment.
    OSR_ASSIGN_OR_RETURN(File f, File::Open(segments.back().path, File::Mode::kReadOnly));
    uint8_t hb[SegmentHeader::kSize];
    OSR_RETURN_IF_ERROR(f.PRead(0, hb));
    OSR_ASSIGN_OR_RETURN(SegmentHeader sh, SegmentHeader::Decode(hb));
    // A disk only grows, and a group only gains disks (disk-size records): a log of a
    // smaller disk, or of one disk where there are now several, is this group's; a log of
    // a larger disk, or of a group where there is one disk, is not.
    bool fits = opts_.disk_bytes == 0 || (sh.disk_bytes != 0 && sh.disk_bytes <= opts_.disk_bytes);
    if (!fits) {
      return InvalidArgument(
          fmt::format("capture log {} belongs to a disk of {} bytes, this image has {}", opts_.dir,
                      sh.disk_bytes, opts_.disk_bytes));
    }
  }
  uint64_t last = summary.records > 0 ? summary.last_seq
                  : segments.empty()  ? empty_first_seq_ - 1
                                      : segments.back().first_seq - 1;
  next_seq_ = last + 1;
  written_seq_ = synced_seq_ = last;
  if (cut_ && last > cut_->after_seq) {
    // Records after the cut were taken (a journal's came again): the cut is over.
    OSR_RETURN_IF_ERROR(RemoveCutFile(opts_.dir));
    cut_.reset();
  } else if (cut_) {
    if (last < cut_->after_seq) {
      // The log ends before the cut it records: records went since (by hand), or the
      // record is not osr's. Neither is guessed at.
      return Corruption(fmt::format(
          "capture log {}: cut.json says the log was cut after seq {}, but it ends at seq {}",
          opts_.dir, cut_->after_seq, last));
    }
    overflowed_ = true;
    ++overflow_generation_;
    spdlog::warn(
        "capture log {}: cut after seq {} ({}); no record is taken until the recovery "
        "site says what it holds",
        opts_.dir, cut_->after_seq, cut_->reason);
  }
  std::lock_guard wl(write_mu_);
  if (!segments.empty()) {
    OSR_ASSIGN_OR_RETURN(segment_, File::Open(segments.back().path, File::Mode::kReadWrite,
                                              /*direct=*/true));
    segment_bytes_ = summary.last_segment_valid_bytes;
    segment_first_seq_ = segments.back().first_seq;
    OSR_ASSIGN_OR_RETURN(uint64_t fsize, segment_.Size());
    if (fsize != segment_bytes_) OSR_RETURN_IF_ERROR(segment_.Truncate(segment_bytes_));
    // The buffer starts with the last partial block, which the next write rewrites.
    uint64_t block = segment_bytes_ / AlignedBuffer::kAlign * AlignedBuffer::kAlign;
    OSR_ASSIGN_OR_RETURN(File reader, File::Open(segments.back().path, File::Mode::kReadOnly));
    std::lock_guard lock(mu_);
    buffer_.resize(segment_bytes_ - block);
    OSR_RETURN_IF_ERROR(reader.PRead(block, {buffer_.data(), buffer_.size()}));
    prefix_bytes_ = buffer_.size();
  } else {
    SegmentHeader h;
    h.first_seq = next_seq_;
    h.disk_bytes = opts_.disk_bytes;
    h.created_ns = NowNs();
    uint8_t hb[SegmentHeader::kSize];
    h.Encode(hb);
    OSR_RETURN_IF_ERROR(OpenSegment(next_seq_, hb));
  }
  spdlog::info("capture log {}: {} segment(s), next seq {}", opts_.dir,
               std::max<size_t>(segments.size(), 1), next_seq_);
  return Status::Ok();
}

Status CaptureLog::LoadCut() {
  const std::string path = CutPath(opts_.dir);
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return Status::Ok();
  OSR_ASSIGN_OR_RETURN(std::string text, ReadSmallFile(path, kCutFileBytesMax));
  auto j = json_in::ParseObject(text, path);
  if (!j.ok()) return Corruption(j.status().message());
  json_in::Fields f(*j, path + ": ");
  Cut cut;
  cut.after_seq = f.U64("after_seq");
  cut.seq_bound = f.U64("seq_bound");
  cut.time_ns = f.I64("time_ns", 0);
  cut.reason = f.String("reason", "");
  uint64_t resume_at = f.U64("resume_at", 0);
  if (f.ok() && cut.seq_bound < cut.after_seq) f.Fail("seq_bound", "is below after_seq");
  // One segment's cut bytes hold at most this many records (kCutSeqsMax): a bound beyond
  // it, or a seq no log reaches, was not written by osr.
  if (f.ok() && cut.seq_bound - cut.after_seq > kCutSeqsMax) {
    f.Fail("seq_bound", fmt::format("is more than {} after after_seq", kCutSeqsMax));
  }
  if (f.ok() && cut.seq_bound > kSeqMax) f.Fail("seq_bound", "is beyond any seq a log reaches");
  if (f.ok() && resume_at != 0 && (resume_at <= cut.after_seq || resume_at > cut.seq_bound + 1)) {
    f.Fail("resume_at", "is not between after_seq + 1 and seq_bound + 1");
  }
  if (!f.ok()) return Corruption(f.status().message());
  if (resume_at == 0) {
    cut_ = std::move(cut);
    return Status::Ok();
  }
  // ResumeAfterCut was cut short: every segment before resume_at is durable at the
  // recovery site (it said so); finish it.
  OSR_ASSIGN_OR_RETURN(auto segments, ListSegments(opts_.dir));
  for (const auto& seg : segments) {
    if (seg.first_seq < resume_at && seg.first_seq > cut.after_seq + 1) {
      return Corruption(
          fmt::format("{}: segment {} starts after the cut (seq {}) but before "
                      "resume_at ({}): this record was not written by osr",
                      path, seg.path, cut.after_seq, resume_at));
    }
  }
  for (const auto& seg : segments) {
    if (seg.first_seq >= resume_at) continue;
    RemovePath(seg.path, ec);
    if (ec) return Status::FromErrno(ec.value(), "remove " + seg.path);
  }
  empty_first_seq_ = resume_at;
  OSR_RETURN_IF_ERROR(SyncDir(opts_.dir));
  return RemoveCutFile(opts_.dir);
}

Status CaptureLog::WriteCut(const Cut& cut, uint64_t resume_at) {
  nlohmann::json j{{"version", 1},
                   {"after_seq", cut.after_seq},
                   {"seq_bound", cut.seq_bound},
                   {"time_ns", cut.time_ns},
                   {"reason", cut.reason}};
  if (resume_at != 0) j["resume_at"] = resume_at;
  std::string text = json_in::Dump(j);
  return WriteFileAtomic(CutPath(opts_.dir),
                         {reinterpret_cast<const uint8_t*>(text.data()), text.size()});
}

Status CaptureLog::CutTail(const std::string& segment, uint64_t tail_pos, uint64_t after_seq,
                           const std::string& reason) {
  OSR_ASSIGN_OR_RETURN(File f, File::Open(segment, File::Mode::kReadWrite));
  OSR_ASSIGN_OR_RETURN(uint64_t fsize, f.Size());
  // Every record is at least a header long: the cut bytes held at most this many.
  uint64_t most = (fsize - tail_pos + RecordHeader::kSize - 1) / RecordHeader::kSize;
  Cut cut{after_seq, after_seq + most, NowNs(), reason};
  if (cut_) {  // an earlier cut, not yet resumed: the union of both
    cut.after_seq = std::min(cut.after_seq, cut_->after_seq);
    cut.seq_bound = std::max(cut.seq_bound, cut_->seq_bound);
  }
  OSR_RETURN_IF_ERROR(WriteCut(cut, 0));  // durable before a byte is cut
  OSR_RETURN_IF_ERROR(f.Truncate(tail_pos));
  OSR_RETURN_IF_ERROR(f.Sync());
  cut_ = std::move(cut);
  return Status::Ok();
}

std::optional<CaptureLog::Cut> CaptureLog::pending_cut() const {
  std::lock_guard lock(mu_);
  return cut_;
}

Status CaptureLog::ResumeAfterCut(uint64_t durable) {
  std::lock_guard wl(write_mu_);
  Cut cut;
  uint64_t last;
  {
    std::lock_guard lock(mu_);
    if (!cut_) return Status::Ok();
    cut = *cut_;
    last = next_seq_ - 1;
    // Overflowed since the cut: nothing is buffered, no record was taken.
    if (pending_bytes() != 0 || last != cut.after_seq) {
      return Internal(fmt::format("capture log {}: cut after seq {} but the log ends at {}",
                                  opts_.dir, cut.after_seq, last));
    }
  }
  if (durable > cut.seq_bound) {
    // No record past seq_bound was ever written here: a peer that says it holds one is
    // not this log's recovery site (or its state is not what it says).
    return Corruption(fmt::format(
        "capture log {}: the recovery site says it holds seq {}, but this log never wrote past "
        "seq {} (cut after seq {}): refusing to go on",
        opts_.dir, durable, cut.seq_bound, cut.after_seq));
  }
  if (durable > last) {
    // The recovery site holds seqs this log lost: go on after them. Every segment here is
    // durable there. The cut record says where the log resumes before anything goes.
    OSR_RETURN_IF_ERROR(WriteCut(cut, durable + 1));
    OSR_ASSIGN_OR_RETURN(auto segments, ListSegments(opts_.dir));
    segment_ = File();
    for (const auto& seg : segments) {
      std::error_code ec;
      RemovePath(seg.path, ec);
      if (ec) return Status::FromErrno(ec.value(), "remove " + seg.path);
    }
    held_bytes_ = 0;
    {
      std::lock_guard lock(mu_);
      buffer_.clear();
      prefix_bytes_ = 0;
    }
    SegmentHeader h;
    h.first_seq = durable + 1;
    h.disk_bytes = opts_.disk_bytes;
    h.created_ns = NowNs();
    uint8_t hb[SegmentHeader::kSize];
    h.Encode(hb);
    OSR_RETURN_IF_ERROR(OpenSegment(durable + 1, hb));
    std::lock_guard lock(mu_);
    next_seq_ = durable + 1;
    written_seq_ = synced_seq_ = durable;
  }
  OSR_RETURN_IF_ERROR(RemoveCutFile(opts_.dir));
  spdlog::warn("capture log {}: the cut after seq {} is over; the log goes on after seq {}",
               opts_.dir, cut.after_seq, std::max(last, durable));
  std::lock_guard lock(mu_);
  cut_.reset();
  return Status::Ok();
}

Status CaptureLog::ClearCut() {
  {
    std::lock_guard lock(mu_);
    if (!cut_) return Status::Ok();
  }
  OSR_RETURN_IF_ERROR(RemoveCutFile(opts_.dir));
  std::lock_guard lock(mu_);
  cut_.reset();
  return Status::Ok();
}

Status CaptureLog::OpenSegment(uint64_t first_seq, const uint8_t* header) {
  std::string path = opts_.dir + "/" + SegmentFileName(first_seq);
  OSR_ASSIGN_OR_RETURN(File f, File::Open(path, File::Mode::kCreateExclusive, /*direct=*/true));
  AlignedBuffer block;
  block.resize(AlignedBuffer::kAlign);
  std::memset(block.data(), 0, block.size());
  std::memcpy(block.data(), header, SegmentHeader::kSize);
  Status st = f.PWrite(0, {block.data(), block.size()});
  if (st.ok()) st = f.DataSync();
  if (st.ok()) st = SyncDir(opts_.dir);
  if (!st.ok()) {
    // Nothing half-made stays behind (a full file system: the next try makes it again).
    std::error_code ec;
    RemovePath(path, ec);
    return st;
  }
  segment_ = std::move(f);
  segment_bytes_ = SegmentHeader::kSize;
  segment_first_seq_ = first_seq;
  held_bytes_ += SegmentHeader::kSize;
  std::lock_guard lock(mu_);
  if (buffer_.size() == prefix_bytes_) {  // at start-up; after a roll WriteOut set it already
    buffer_.clear();
    buffer_.append(header, SegmentHeader::kSize);
    prefix_bytes_ = SegmentHeader::kSize;
  }
  return Status::Ok();
}

std::optional<uint64_t> CaptureLog::Append(RecordKind kind, uint64_t offset, uint64_t length,
                                           std::span<const uint8_t> payload, uint32_t payload_crc,
                                           uint16_t flags, uint32_t disk) {
  OSR_CHECK(payload.size() <= kPayloadBytesMax);
  OSR_CHECK(kind == RecordKind::kWrite      ? payload.size() == length
            : kind == RecordKind::kDiskSize ? length == 0 && !payload.empty()
                                            : payload.empty());
  size_t need = RecordHeader::kSize + payload.size();
  std::unique_lock lock(mu_);
  WaitForRoom(lock, need);
  if (failed_ || overflowed_ || !write_error_.ok()) return std::nullopt;
  if (held_bytes_ + pending_bytes() + need > opts_.log_bytes_max) {
    overflowed_ = true;
    ++overflow_generation_;
    spdlog::warn(
        "capture log {}: over its limit of {} bytes: tracking changes in the dirty "
        "bitmap until a resynchronization",
        opts_.dir, opts_.log_bytes_max);
    RingDoorbells();  // the sender resynchronizes once it has caught up
    return std::nullopt;
  }
  RecordHeader h;
  h.seq = next_seq_++;
  h.epoch = opts_.epoch;
  h.offset = offset;
  h.length = length;
  h.time_ns = NowNs();
  h.payload_bytes = static_cast<uint32_t>(payload.size());
  h.kind = kind;
  h.flags = flags;
  h.disk = disk;
  captured_bytes_ += length;
  size_t at = buffer_.size();
  bool was_empty = pending_bytes() == 0;
  buffer_.resize(at + need);
  h.Encode(buffer_.data() + at, payload_crc);
  if (!payload.empty()) {
    std::memcpy(buffer_.data() + at + RecordHeader::kSize, payload.data(), payload.size());
  }
  // The first record wakes the writer's timer; a full batch wakes it at once.
  if (was_empty || pending_bytes() >= opts_.writeout_bytes_min) writer_cv_.notify_one();
  return h.seq;
}

void CaptureLog::WaitForRoom(std::unique_lock<std::mutex>& lock, size_t need) {
  if (!failed_ && pending_bytes() > 0 && pending_bytes() + need > opts_.buffer_bytes_max) {
    // Bounded memory: wait for the writer rather than grow the buffer.
    writer_cv_.notify_one();
    space_cv_.wait(lock, [&] {
      return failed_ || pending_bytes() == 0 || pending_bytes() + need <= opts_.buffer_bytes_max;
    });
  }
}

bool CaptureLog::AppendEncoded(std::span<const uint8_t> record) {
  OSR_CHECK(record.size() >= RecordHeader::kSize);
  uint64_t seq;
  std::memcpy(&seq, record.data() + 8, 8);
  std::unique_lock lock(mu_);
  WaitForRoom(lock, record.size());
  if (failed_ || !write_error_.ok()) return false;
  OSR_CHECK(seq == next_seq_);  // the caller checked the order
  ++next_seq_;
  bool was_empty = pending_bytes() == 0;
  buffer_.append(record.data(), record.size());
  if (was_empty || pending_bytes() >= opts_.writeout_bytes_min) writer_cv_.notify_one();
  return true;
}

void CaptureLog::WriterLoop() {
  std::unique_lock lock(mu_);
  for (;;) {
    writer_cv_.wait(lock, [&] { return stop_ || pending_bytes() > 0; });
    if (stop_) return;
    // Give the batch a moment to grow, unless it is large enough already.
    writer_cv_.wait_for(lock, std::chrono::milliseconds(opts_.writeout_delay_ms),
                        [&] { return stop_ || pending_bytes() >= opts_.writeout_bytes_min; });
    uint64_t upto = next_seq_ - 1;
    lock.unlock();
    (void)WriteOut(upto);  // a failure is logged and held (write_error); the bitmap keeps it
    lock.lock();
  }
}

void CaptureLog::ReportWritten(std::span<const uint8_t> buf, size_t from, uint64_t file_pos,
                               uint64_t segment_first_seq, bool ok) {
  if (!on_written_) return;
  written_.clear();
  for (size_t pos = from; pos + RecordHeader::kSize <= buf.size();) {
    const uint8_t* p = buf.data() + pos;
    Written w;
    uint16_t kind;
    uint32_t payload;
    std::memcpy(&w.seq, p + 8, 8);
    std::memcpy(&w.offset, p + 24, 8);
    std::memcpy(&w.length, p + 32, 8);
    std::memcpy(&payload, p + 48, 4);
    std::memcpy(&w.disk, p + 52, 4);
    std::memcpy(&kind, p + 56, 2);
    w.kind = static_cast<RecordKind>(kind);
    w.segment_first_seq = segment_first_seq;
    w.payload_pos = file_pos + pos + RecordHeader::kSize;
    written_.push_back(w);
    pos += RecordHeader::kSize + payload;
  }
  on_written_(written_, ok);
}

Status CaptureLog::WriteOut(uint64_t seq) {
  constexpr uint64_t kBlock = AlignedBuffer::kAlign;
  std::lock_guard wl(write_mu_);
  if (written_seq_ >= seq) return Status::Ok();
  uint64_t upto;
  size_t records_from;
  uint64_t end_after;
  bool roll;
  uint8_t next_header[SegmentHeader::kSize];
  {
    std::lock_guard lock(mu_);
    if (pending_bytes() == 0) return Status::Ok();
    buffer_.swap(spare_);  // spare_ = [last partial block][records]
    records_from = prefix_bytes_;
    upto = next_seq_ - 1;
    end_after = segment_bytes_ + (spare_.size() - records_from);
    roll = end_after >= opts_.segment_bytes_target;
    if (roll) {
      // The next records open a new segment: its header is their prefix.
      SegmentHeader h;
      h.first_seq = next_seq_;
      h.disk_bytes = opts_.disk_bytes;
      h.created_ns = NowNs();
      h.Encode(next_header);
      buffer_.append(next_header, sizeof next_header);
      prefix_bytes_ = sizeof next_header;
    } else {
      // spare_ covers [block start, end_after): its last end_after % kBlock bytes are the
      // new last partial block.
      size_t k = end_after % kBlock;
      buffer_.append(spare_.data() + spare_.size() - k, k);
      prefix_bytes_ = k;
    }
  }
  space_cv_.notify_all();
  size_t n = spare_.size();
  size_t padded = (n + kBlock - 1) / kBlock * kBlock;
  spare_.reserve(padded);
  std::memset(spare_.data() + n, 0, padded - n);
  uint64_t at = segment_bytes_ / kBlock * kBlock;
  uint64_t written_segment = segment_first_seq_;
  uint64_t segment_bytes_before = segment_bytes_;
  uint64_t held_before = held_bytes_;
  Status st = segment_.PWrite(at, {spare_.data(), padded});
  if (st.ok()) {
    held_bytes_ += end_after - segment_bytes_;
    segment_bytes_ = end_after;
    if (roll) {
      st = segment_.Truncate(end_after);
      if (st.ok()) st = segment_.DataSync();  // the old segment is complete
      if (st.ok()) st = OpenSegment(upto + 1, next_header);
    }
  }
  if (!st.ok()) return UndoWriteOut(st, segment_bytes_before, held_before, records_from);
  written_seq_ = upto;
  ReportWritten({spare_.data(), spare_.size()}, records_from, at, written_segment, true);
  RingDoorbells();  // readers tail only what is written out
  spare_.clear();
  spare_.trim(opts_.buffer_bytes_max);
  return st;
}

Status CaptureLog::UndoWriteOut(const Status& cause, uint64_t segment_bytes_before,
                                uint64_t held_before, size_t records_from) {
  // The segment as it was before the write: what the failed write left past its end (a
  // short write's bytes, the padding) is cut; its last partial block was rewritten with
  // the same bytes. A roll that failed half-way removed its new segment itself.
  // (Not synced here: the next Sync makes the cut durable; a crash before it leaves whole
  // records that recovery keeps or a torn one it cuts: either way a prefix of the order.)
  Status cut = segment_.Truncate(segment_bytes_before);
  segment_bytes_ = segment_bytes_before;
  held_bytes_ = held_before;
  std::vector<uint8_t> dropped;
  {
    std::lock_guard lock(mu_);
    // Records appended after the failed batch follow a gap now: they go too.
    dropped.assign(buffer_.data() + prefix_bytes_, buffer_.data() + buffer_.size());
    buffer_.clear();
    buffer_.append(spare_.data(), records_from);  // the old last partial block
    prefix_bytes_ = records_from;
    next_seq_ = written_seq_ + 1;
    write_error_ = cause;
    overflowed_ = true;  // the source's bitmap keeps the dropped regions: a resync ships them
    ++overflow_generation_;
    if (!cut.ok()) failed_ = true;
  }
  space_cv_.notify_all();
  spdlog::error(
      "capture log {}: write failed: {}; dropped the unwritten records after seq {} (their "
      "regions stay in the dirty-region bitmap){}",
      opts_.dir, cause.ToString(), written_seq_,
      cut.ok() ? ""
               : "; cutting the segment back failed too, the log has failed: " + cut.ToString());
  ReportWritten({spare_.data(), spare_.size()}, records_from, 0, segment_first_seq_, false);
  ReportWritten(dropped, 0, 0, segment_first_seq_, false);
  RingDoorbells();  // overflowed: the sender resynchronizes the dropped regions
  spare_.clear();
  spare_.trim(opts_.buffer_bytes_max);
  return cause;
}

Result<CaptureLog::End> CaptureLog::MarkEnd() {
  OSR_RETURN_IF_ERROR(WriteOut(last_seq()));
  std::lock_guard wl(write_mu_);
  std::lock_guard lock(mu_);
  if (!write_error_.ok()) return write_error_;
  if (failed_) return IoError("capture log " + opts_.dir + " has failed");
  return End{written_seq_, segment_first_seq_, segment_bytes_};
}

Status CaptureLog::RollBack(const End& end) {
  constexpr uint64_t kBlock = AlignedBuffer::kAlign;
  std::lock_guard wl(write_mu_);
  std::vector<uint8_t> dropped;
  {
    std::lock_guard lock(mu_);
    dropped.assign(buffer_.data() + prefix_bytes_, buffer_.data() + buffer_.size());
    buffer_.resize(prefix_bytes_);
  }
  ReportWritten(dropped, 0, 0, segment_first_seq_, false);
  Status st = [&]() -> Status {
    OSR_ASSIGN_OR_RETURN(auto segments, ListSegments(opts_.dir));
    for (auto& seg : segments) {  // segments begun after the end
      if (seg.first_seq <= end.segment_first_seq) continue;
      std::error_code ec;
      RemovePath(seg.path, ec);
      if (ec) return Status::FromErrno(ec.value(), "remove " + seg.path);
    }
    std::string path = opts_.dir + "/" + SegmentFileName(end.segment_first_seq);
    if (segment_first_seq_ != end.segment_first_seq || !segment_.valid()) {
      OSR_ASSIGN_OR_RETURN(segment_, File::Open(path, File::Mode::kReadWrite, /*direct=*/true));
      segment_first_seq_ = end.segment_first_seq;
    }
    OSR_RETURN_IF_ERROR(segment_.Truncate(end.segment_bytes));  // synced by the next Sync
    segment_bytes_ = end.segment_bytes;
    // The next write rewrites the last partial block: it becomes the buffer's prefix.
    uint64_t block = end.segment_bytes / kBlock * kBlock;
    OSR_ASSIGN_OR_RETURN(File reader, File::Open(path, File::Mode::kReadOnly));
    AlignedBuffer prefix;
    prefix.resize(end.segment_bytes - block);
    OSR_RETURN_IF_ERROR(reader.PRead(block, {prefix.data(), prefix.size()}));
    uint64_t held = 0;
    OSR_ASSIGN_OR_RETURN(segments, ListSegments(opts_.dir));
    for (auto& seg : segments) {
      std::error_code ec;
      held += std::filesystem::file_size(seg.path, ec);
    }
    held_bytes_ = held;
    std::lock_guard lock(mu_);
    buffer_.clear();
    buffer_.append(prefix.data(), prefix.size());
    prefix_bytes_ = prefix.size();
    next_seq_ = end.seq + 1;
    written_seq_ = synced_seq_ = end.seq;
    write_error_ = Status::Ok();
    overflowed_ = false;
    return Status::Ok();
  }();
  if (!st.ok()) {
    spdlog::error("capture log {}: rolling back to seq {} failed, the log has failed: {}",
                  opts_.dir, end.seq, st.ToString());
    std::lock_guard lock(mu_);
    failed_ = true;
  }
  space_cv_.notify_all();
  RingDoorbells();
  return st;
}

Status CaptureLog::write_error() const {
  std::lock_guard lock(mu_);
  return write_error_;
}

Status CaptureLog::Sync() {
  uint64_t upto;
  {
    std::lock_guard lock(mu_);
    upto = next_seq_ - 1;
    if (failed_) return IoError("capture log " + opts_.dir + " has failed");
  }
  // A failed write-out is held in write_error_ (below); what was written before it is
  // made durable all the same (the source's bitmap no longer covers it).
  (void)WriteOut(upto);
  std::lock_guard wl(write_mu_);
  if (synced_seq_ < written_seq_) {
    OSR_RETURN_IF_ERROR(segment_.DataSync());
    synced_seq_ = written_seq_;
  }
  std::lock_guard lock(mu_);
  // Records up to `upto` may have been dropped by this write-out or the writer thread's.
  if (!write_error_.ok()) return write_error_;
  if (written_seq_ < upto) {
    return Unavailable(
        fmt::format("capture log {}: records after seq {} were dropped", opts_.dir, written_seq_));
  }
  return Status::Ok();
}

Result<size_t> CaptureLog::TrimUpTo(uint64_t seq) {
  std::lock_guard wl(write_mu_);
  OSR_ASSIGN_OR_RETURN(auto segments, ListSegments(opts_.dir));
  size_t n = 0;
  for (size_t i = 0; i + 1 < segments.size(); ++i) {
    if (segments[i].first_seq == segment_first_seq_) break;
    if (segments[i + 1].first_seq - 1 > seq) break;
    std::error_code ec;
    uint64_t bytes = std::filesystem::file_size(segments[i].path, ec);
    RemovePath(segments[i].path, ec);
    if (ec) return Status::FromErrno(ec.value(), "remove " + segments[i].path);
    held_bytes_ -= std::min<uint64_t>(bytes, held_bytes_);
    ++n;
  }
  return n;
}

Result<uint64_t> CaptureLog::first_seq_held() const {
  OSR_ASSIGN_OR_RETURN(auto segments, ListSegments(opts_.dir));
  if (segments.empty()) return last_seq() + 1;
  return segments.front().first_seq;
}

uint64_t CaptureLog::last_seq() const {
  std::lock_guard lock(mu_);
  return next_seq_ - 1;
}

uint64_t CaptureLog::written_seq() const {
  std::lock_guard wl(write_mu_);
  return written_seq_;
}

bool CaptureLog::overflowed() const {
  std::lock_guard lock(mu_);
  return overflowed_;
}

void CaptureLog::EnterOverflow() {
  {
    std::lock_guard lock(mu_);
    if (overflowed_) return;
    overflowed_ = true;
    ++overflow_generation_;
  }
  RingDoorbells();
}

uint64_t CaptureLog::overflow_generation() const {
  std::lock_guard lock(mu_);
  return overflow_generation_;
}

std::pair<uint64_t, uint64_t> CaptureLog::ResumeAfterOverflow() {
  std::pair<uint64_t, uint64_t> resumed;
  {
    std::lock_guard lock(mu_);
    overflowed_ = false;
    write_error_ = Status::Ok();  // records are taken again; a new failure drops them again
    resumed = {next_seq_ - 1, overflow_generation_};
  }
  RingDoorbells();
  return resumed;
}

void CaptureLog::AddDoorbell(Doorbell* bell) {
  std::lock_guard lock(bells_mu_);
  bells_.push_back(bell);
}

void CaptureLog::RemoveDoorbell(Doorbell* bell) {
  std::lock_guard lock(bells_mu_);
  std::erase(bells_, bell);
}

void CaptureLog::RingDoorbells() {
  std::lock_guard lock(bells_mu_);
  for (Doorbell* b : bells_) b->Ring();
}

bool CaptureLog::failed() const {
  std::lock_guard lock(mu_);
  return failed_;
}

}  // namespace osr::capture
