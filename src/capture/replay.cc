#include "capture/replay.h"

#include <fmt/format.h>

#include "capture/log_reader.h"
#include "common/file.h"

namespace osr::capture {

namespace {

Status SparseCopy(File& from, File& to, uint64_t size) {
  OSR_RETURN_IF_ERROR(to.Truncate(0));
  OSR_RETURN_IF_ERROR(to.Truncate(size));
  std::vector<uint8_t> buf(4 << 20);
  uint64_t pos = 0;
  while (pos < size) {
    OSR_ASSIGN_OR_RETURN(uint64_t data, from.SeekData(pos, size));
    if (data >= size) break;
    OSR_ASSIGN_OR_RETURN(uint64_t hole, from.SeekHole(data, size));
    for (uint64_t p = data; p < hole;) {
      size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), hole - p));
      OSR_RETURN_IF_ERROR(from.PRead(p, {buf.data(), n}));
      OSR_RETURN_IF_ERROR(to.PWrite(p, {buf.data(), n}));
      p += n;
    }
    pos = hole;
  }
  return Status::Ok();
}

}  // namespace

Result<ReplayResult> Replay(const std::string& log_dir, const std::string& base,
                            const std::string& out, uint64_t upto, uint32_t disk) {
  OSR_ASSIGN_OR_RETURN(File from, File::Open(base, File::Mode::kReadOnly));
  OSR_ASSIGN_OR_RETURN(uint64_t size, from.Size());
  OSR_ASSIGN_OR_RETURN(File to, File::Open(out, File::Mode::kCreate));
  OSR_RETURN_IF_ERROR(SparseCopy(from, to, size));

  ReplayResult r;
  uint64_t last_seen = 0;  // of any disk
  Status apply_status;
  auto visit = [&](const RecordHeader& h, std::span<const uint8_t> payload) {
    if (h.seq > upto) return false;
    last_seen = h.seq;
    if (h.disk != disk) return true;
    if (h.kind == RecordKind::kDiskSize) {
      // The disk grew here (or was added, at its size): the base grows with it.
      if (h.offset > size) {
        if (Status st = to.Truncate(h.offset); !st.ok()) {
          apply_status = st;
          return false;
        }
        size = h.offset;
      }
      if (r.records == 0) r.first_seq = h.seq;
      r.last_seq = h.seq;
      ++r.records;
      return true;
    }
    if (h.offset + h.length > size) {
      apply_status = OutOfRange(fmt::format("record seq {} ({}+{}) lies outside the {}-byte base",
                                            h.seq, h.offset, h.length, size));
      return false;
    }
    Status st;
    if (h.length == 0) {
      // A mark (a resync's end): nothing to apply.
    } else if (h.kind == RecordKind::kWrite) {
      st = to.PWrite(h.offset, payload);
    } else {
      st = to.PunchHole(h.offset, h.length);
      if (!st.ok() && st.code() == Code::kNotSupported) st = to.WriteZeroes(h.offset, h.length);
    }
    if (!st.ok()) {
      apply_status = st;
      return false;
    }
    if (r.records == 0) r.first_seq = h.seq;
    r.last_seq = h.seq;
    ++r.records;
    return true;
  };
  OSR_ASSIGN_OR_RETURN(auto summary, LogReader::Scan(log_dir, visit));
  OSR_RETURN_IF_ERROR(apply_status);
  if (!summary.errors.empty() && (upto == UINT64_MAX || last_seen < upto)) {
    const LogError& e = summary.errors.front();
    return Corruption(fmt::format("{} at byte {}: {}", e.segment, e.position, e.message));
  }
  if (upto != UINT64_MAX && last_seen < upto) {
    return OutOfRange(fmt::format("the log ends at seq {}, before --upto {}", last_seen, upto));
  }
  OSR_RETURN_IF_ERROR(to.Sync());
  return r;
}

}  // namespace osr::capture
