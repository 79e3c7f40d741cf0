#include "store/version_index.h"

#include <algorithm>

#include "common/check.h"

namespace osr::store {

void VersionIndex::Add(const RecordRef& r) {
  OSR_CHECK(r.seq > last_seq_);
  last_seq_ = r.seq;
  if (r.length == 0) return;
  uint64_t first = r.offset / kChunkBytes, last = (r.offset + r.length - 1) / kChunkBytes;
  for (uint64_t c = first; c <= last; ++c) chunks_[c].push_back(r);
}

void VersionIndex::ForEach(
    uint64_t offset, uint64_t length, uint64_t from, uint64_t upto,
    const std::function<void(const RecordRef&, uint64_t, uint64_t)>& fn) const {
  if (length == 0) return;
  uint64_t end = offset + length;
  for (uint64_t c = offset / kChunkBytes; c * kChunkBytes < end; ++c) {
    auto it = chunks_.find(c);
    if (it == chunks_.end()) continue;
    uint64_t lo = std::max(offset, c * kChunkBytes);
    uint64_t hi = std::min(end, (c + 1) * kChunkBytes);
    const auto& v = it->second;
    // Records are in seq order: skip to the first with seq > from.
    auto rit = std::upper_bound(v.begin(), v.end(), from,
                                [](uint64_t s, const RecordRef& r) { return s < r.seq; });
    for (; rit != v.end() && rit->seq <= upto; ++rit) {
      uint64_t a = std::max(lo, rit->offset);
      uint64_t b = std::min(hi, rit->offset + rit->length);
      if (a < b) fn(*rit, a, b - a);
    }
  }
}

bool VersionIndex::Touched(uint64_t offset, uint64_t length, uint64_t from, uint64_t upto) const {
  bool touched = false;
  ForEach(offset, length, from, upto,
          [&](const RecordRef&, uint64_t, uint64_t) { touched = true; });
  return touched;
}

void VersionIndex::ChangedAfter(uint64_t from,
                                std::vector<std::pair<uint64_t, uint64_t>>* out) const {
  for (const auto& [chunk, records] : chunks_) {
    uint64_t lo = chunk * kChunkBytes, hi = lo + kChunkBytes;
    for (const RecordRef& r : records) {
      if (r.seq <= from) continue;
      uint64_t b = std::max(lo, r.offset), e = std::min(hi, r.offset + r.length);
      if (b < e) out->emplace_back(b, e - b);
    }
  }
}

void VersionIndex::DropUpTo(uint64_t seq) {
  for (auto it = chunks_.begin(); it != chunks_.end();) {
    auto& v = it->second;
    auto keep = std::upper_bound(v.begin(), v.end(), seq,
                                 [](uint64_t s, const RecordRef& r) { return s < r.seq; });
    v.erase(v.begin(), keep);
    if (v.empty()) {
      it = chunks_.erase(it);
    } else {
      ++it;
    }
  }
}

void VersionIndex::DropAfter(uint64_t seq) {
  for (auto it = chunks_.begin(); it != chunks_.end();) {
    auto& v = it->second;
    auto from = std::upper_bound(v.begin(), v.end(), seq,
                                 [](uint64_t s, const RecordRef& r) { return s < r.seq; });
    v.erase(from, v.end());
    if (v.empty()) {
      it = chunks_.erase(it);
    } else {
      ++it;
    }
  }
  last_seq_ = std::min(last_seq_, seq);
}

}  // namespace osr::store
