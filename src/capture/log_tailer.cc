#include "capture/log_tailer.h"

#include <fmt/format.h>

#include "capture/log_reader.h"

namespace osr::capture {

Status LogTailer::Seek() {
  OSR_ASSIGN_OR_RETURN(auto segments, ListSegments(log_->dir()));
  const SegmentInfo* seg = nullptr;
  for (auto& s : segments) {
    if (s.first_seq <= next_seq_) seg = &s;
  }
  if (seg == nullptr) {
    return NotFound(
        fmt::format("seq {} is no longer in the capture log {}", next_seq_, log_->dir()));
  }
  OSR_ASSIGN_OR_RETURN(segment_, File::Open(seg->path, File::Mode::kReadOnly));
  segment_first_seq_ = seg->first_seq;
  pos_ = SegmentHeader::kSize;
  // Walk the headers up to next_seq_ (they are written: next_seq_ <= written_seq + 1).
  uint8_t hb[RecordHeader::kSize];
  for (uint64_t s = seg->first_seq; s < next_seq_; ++s) {
    OSR_RETURN_IF_ERROR(segment_.PRead(pos_, hb));
    OSR_ASSIGN_OR_RETURN(RecordHeader h, RecordHeader::Decode(hb));
    if (h.seq != s)
      return Corruption(fmt::format("{}: seq {} where {} was expected", seg->path, h.seq, s));
    pos_ += RecordHeader::kSize + h.payload_bytes;
  }
  positioned_ = true;
  return Status::Ok();
}

Result<size_t> LogTailer::Read(size_t bytes_max, std::vector<uint8_t>* out) {
  uint64_t written = log_->written_seq();
  if (next_seq_ > written) return size_t{0};
  if (!positioned_) OSR_RETURN_IF_ERROR(Seek());
  size_t n = 0;
  size_t start = out->size();
  while (next_seq_ <= written && out->size() - start < bytes_max) {
    uint8_t hb[RecordHeader::kSize];
    auto st = segment_.PRead(pos_, hb);
    RecordHeader h;
    bool ok = st.ok();
    if (ok) {
      auto d = RecordHeader::Decode(hb);
      ok = d.ok() && d->seq == next_seq_;
      if (ok) h = *d;
    }
    if (!ok) {
      // The end of this segment: the record is in the next one.
      OSR_RETURN_IF_ERROR(Seek());
      if (segment_first_seq_ != next_seq_) {
        return Corruption(
            fmt::format("capture log {}: record {} is missing", log_->dir(), next_seq_));
      }
      continue;
    }
    size_t at = out->size();
    out->resize(at + RecordHeader::kSize + h.payload_bytes);
    std::copy(hb, hb + RecordHeader::kSize, out->begin() + at);
    OSR_RETURN_IF_ERROR(segment_.PRead(pos_ + RecordHeader::kSize,
                                       {out->data() + at + RecordHeader::kSize, h.payload_bytes}));
    if (!RecordHeader::Verify(out->data() + at,
                              {out->data() + at + RecordHeader::kSize, h.payload_bytes})) {
      return Corruption(
          fmt::format("capture log {}: record {} fails its CRC", log_->dir(), next_seq_));
    }
    pos_ += RecordHeader::kSize + h.payload_bytes;
    ++next_seq_;
    ++n;
  }
  return n;
}

}  // namespace osr::capture
