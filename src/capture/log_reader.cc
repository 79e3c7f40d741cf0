#include "capture/log_reader.h"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <cstring>
#include <filesystem>

namespace osr::capture {

namespace {

// True when every byte of f from pos to its end is zero: the padding after a segment's
// last record (segments are written in whole blocks), i.e. its clean end.
Result<bool> ZeroFrom(const File& f, uint64_t pos, uint64_t fsize) {
  std::vector<uint8_t> buf(64 * 1024);
  while (pos < fsize) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), fsize - pos));
    OSR_RETURN_IF_ERROR(f.PRead(pos, {buf.data(), n}));
    for (size_t i = 0; i < n; ++i) {
      if (buf[i] != 0) return false;
    }
    pos += n;
  }
  return true;
}

}  // namespace

Result<uint64_t> FindNextRecord(const File& f, uint64_t pos, uint64_t fsize) {
  constexpr size_t kWindow = 1 << 20;
  std::vector<uint8_t> win;
  std::vector<uint8_t> payload;
  for (uint64_t base = pos + 1; base + RecordHeader::kSize <= fsize; base += kWindow) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(kWindow + RecordHeader::kSize, fsize - base));
    win.resize(n);
    OSR_RETURN_IF_ERROR(f.PRead(base, win));
    for (size_t i = 0; i < kWindow && i + RecordHeader::kSize <= n; ++i) {
      uint32_t magic;
      std::memcpy(&magic, win.data() + i + 4, 4);
      if (magic != kRecordMagic) continue;
      auto h = RecordHeader::Decode({win.data() + i, RecordHeader::kSize});
      uint64_t p = base + i;
      if (!h.ok() || fsize - p - RecordHeader::kSize < h->payload_bytes) continue;
      payload.resize(h->payload_bytes);
      OSR_RETURN_IF_ERROR(f.PRead(p + RecordHeader::kSize, payload));
      if (RecordHeader::Verify(win.data() + i, payload)) return p;
    }
  }
  return uint64_t{0};
}

Result<std::vector<SegmentInfo>> ListSegments(const std::string& dir) {
  std::vector<SegmentInfo> out;
  std::error_code ec;
  for (auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    std::string name = entry.path().filename().string();
    if (name.size() != 24 || !name.ends_with(".log")) continue;
    uint64_t seq = 0;
    auto [p, e] = std::from_chars(name.data(), name.data() + 20, seq);
    if (e != std::errc() || p != name.data() + 20) continue;
    out.push_back({entry.path().string(), seq});
  }
  if (ec) return Status::FromErrno(ec.value(), "list " + dir);
  std::sort(out.begin(), out.end(),
            [](const SegmentInfo& a, const SegmentInfo& b) { return a.first_seq < b.first_seq; });
  return out;
}

Result<LogReader::Summary> LogReader::Scan(const std::string& dir, const Visitor& visit,
                                           bool resync, uint64_t from_seq) {
  PosVisitor pv;
  if (visit) {
    pv = [&](const RecordHeader& h, std::span<const uint8_t> p, const SegmentInfo&, uint64_t) {
      return visit(h, p);
    };
  }
  return ScanWithPositions(dir, pv, resync, from_seq);
}

Result<LogReader::Summary> LogReader::ScanWithPositions(const std::string& dir,
                                                        const PosVisitor& visit, bool resync,
                                                        uint64_t from_seq) {
  OSR_ASSIGN_OR_RETURN(auto segments, ListSegments(dir));
  // Segments wholly before from_seq are skipped (their successor starts at or before it).
  size_t skip = 0;
  while (skip + 1 < segments.size() && segments[skip + 1].first_seq <= from_seq) ++skip;
  segments.erase(segments.begin(), segments.begin() + static_cast<std::ptrdiff_t>(skip));
  Summary s;
  uint64_t expect = 0;  // next sequence number, once known
  std::vector<uint8_t> payload;
  for (size_t si = 0; si < segments.size(); ++si) {
    const auto& seg = segments[si];
    bool last_segment = si + 1 == segments.size();
    OSR_ASSIGN_OR_RETURN(File f, File::Open(seg.path, File::Mode::kReadOnly));
    OSR_ASSIGN_OR_RETURN(uint64_t fsize, f.Size());
    auto fail = [&](uint64_t pos, std::string msg) {
      s.errors.push_back({seg.path, pos, std::move(msg)});
      if (last_segment) {
        s.last_segment_valid_bytes = pos;
        s.tail_damaged = s.errors.size() == 1;
      }
    };
    if (last_segment) {
      s.last_segment = seg.path;
      s.last_segment_valid_bytes = fsize;
    }
    uint8_t hb[SegmentHeader::kSize];
    if (fsize < sizeof hb) {
      fail(0, "segment shorter than its header");
      continue;
    }
    OSR_RETURN_IF_ERROR(f.PRead(0, hb));
    auto sh = SegmentHeader::Decode(hb);
    if (!sh.ok()) {
      fail(0, sh.status().message());
      continue;
    }
    if (sh->first_seq != seg.first_seq) {
      fail(0, fmt::format("header says first seq {}, file name says {}", sh->first_seq,
                          seg.first_seq));
      continue;
    }
    if (expect != 0 && seg.first_seq != expect) {
      s.errors.push_back({seg.path, 0,
                          fmt::format("gap in the sequence: expected {}, segment starts at {}",
                                      expect, seg.first_seq)});
    }
    expect = seg.first_seq;
    uint64_t pos = SegmentHeader::kSize;
    bool stop = false;
    // On damage: stop reading this segment, or (resync) go on at the next valid record.
    auto damaged = [&](uint64_t at, std::string msg) -> Result<bool> {
      fail(at, std::move(msg));
      if (!resync) return false;
      OSR_ASSIGN_OR_RETURN(uint64_t next, FindNextRecord(f, at, fsize));
      if (next == 0) return false;
      s.errors.push_back(
          {seg.path, next, fmt::format("reading resumes here after {} damaged bytes", next - at)});
      pos = next;
      return true;
    };
    while (pos < fsize) {
      OSR_ASSIGN_OR_RETURN(bool padding,
                           ZeroFrom(f, pos, std::min(fsize, pos + RecordHeader::kSize)));
      if (padding) {
        OSR_ASSIGN_OR_RETURN(padding, ZeroFrom(f, pos, fsize));
      }
      if (padding) {  // the clean end of the segment
        if (last_segment) s.last_segment_valid_bytes = pos;
        break;
      }
      uint8_t rb[RecordHeader::kSize];
      if (fsize - pos < sizeof rb) {
        OSR_ASSIGN_OR_RETURN(bool go_on, damaged(pos, "truncated record header"));
        if (go_on) continue;
        break;
      }
      OSR_RETURN_IF_ERROR(f.PRead(pos, rb));
      auto rh = RecordHeader::Decode(rb);
      std::string problem;
      if (!rh.ok()) {
        problem = rh.status().message();
      } else if (fsize - pos - sizeof rb < rh->payload_bytes) {
        problem = fmt::format("record seq {} truncated", rh->seq);
      } else {
        payload.resize(rh->payload_bytes);
        OSR_RETURN_IF_ERROR(f.PRead(pos + sizeof rb, payload));
        if (!RecordHeader::Verify(rb, payload)) {
          problem = fmt::format("record seq {}: CRC mismatch", rh->seq);
        } else if (rh->seq != expect) {
          problem = fmt::format("record seq {} where {} was expected", rh->seq, expect);
          if (resync && rh->seq > expect) {
            // Records were lost before this one: report the gap and go on from here.
            s.errors.push_back({seg.path, pos, problem});
            expect = rh->seq;
            problem.clear();
          }
        }
      }
      if (!problem.empty()) {
        OSR_ASSIGN_OR_RETURN(bool go_on, damaged(pos, std::move(problem)));
        if (go_on) continue;
        break;
      }
      expect = rh->seq + 1;
      if (s.records == 0) s.first_seq = rh->seq;
      s.last_seq = rh->seq;
      s.last_time_ns = rh->time_ns;
      ++s.records;
      pos += sizeof rb + rh->payload_bytes;
      if (visit && !visit(*rh, payload, seg, pos - rh->payload_bytes)) {
        stop = true;
        break;
      }
    }
    if (stop) break;
  }
  return s;
}

}  // namespace osr::capture
