#include "capture/fence_fingerprint.h"

#include <fmt/format.h>
#include <sys/stat.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <filesystem>
#include <tuple>

#include "capture/log_reader.h"
#include "common/file.h"
#include "common/json_in.h"
#include "common/le.h"
#include "common/units.h"

namespace osr::capture {

namespace {

using nlohmann::json;

struct FileStat {
  uint64_t device, inode, size_bytes;
  int64_t mtime_ns, ctime_ns;
};

Result<FileStat> StatFile(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return Status::FromErrno(errno, "stat " + path);
  auto ns = [](const timespec& t) { return int64_t{t.tv_sec} * 1'000'000'000 + t.tv_nsec; };
  return FileStat{static_cast<uint64_t>(st.st_dev), static_cast<uint64_t>(st.st_ino),
                  static_cast<uint64_t>(st.st_size), ns(st.st_mtim), ns(st.st_ctim)};
}

// splitmix64: the sample offsets, reproducible from the recorded seed.
uint64_t NextRandom(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// XXH3-64 of kFingerprintSamples blocks of `disk`: the first, the last, and the rest at
// offsets drawn from seed (per disk). A disk of fewer blocks is hashed whole.
Result<uint64_t> SampleHash(nbd::Disk& disk, uint64_t seed, size_t index) {
  const uint64_t size = disk.size();
  const uint64_t blocks = (size + kFingerprintBlockBytes - 1) / kFingerprintBlockBytes;
  std::vector<uint64_t> picks;
  if (blocks <= kFingerprintSamples) {
    for (uint64_t b = 0; b < blocks; ++b) picks.push_back(b);
  } else {
    picks = {0, blocks - 1};
    uint64_t state = seed ^ (0xD1B54A32D192ED03ull * (index + 1));
    while (picks.size() < kFingerprintSamples) picks.push_back(NextRandom(state) % blocks);
  }
  XXH3_state_t* st = XXH3_createState();
  if (st == nullptr) return Status(Code::kInternal, "XXH3_createState failed");
  XXH3_64bits_reset(st);
  std::vector<uint8_t> buf(kFingerprintBlockBytes);
  Status read;
  for (uint64_t b : picks) {
    uint64_t off = b * kFingerprintBlockBytes;
    size_t n = static_cast<size_t>(std::min(kFingerprintBlockBytes, size - off));
    read = disk.Read(off, {buf.data(), n});
    if (!read.ok()) break;
    XXH3_64bits_update(st, buf.data(), n);
  }
  uint64_t h = XXH3_64bits_digest(st);
  XXH3_freeState(st);
  if (!read.ok()) return read;
  return h;
}

std::pair<uint64_t, uint64_t> DirtyStamp(const DirtyBitmap& bitmap) {
  std::vector<uint8_t> bytes;
  uint64_t total = 0;
  for (const Range& r : bitmap.DirtyRanges()) {
    uint8_t le[16];
    Le64(le, r.offset);
    Le64(le + 8, r.length);
    bytes.insert(bytes.end(), le, le + 16);
    total += r.length;
  }
  return {total, XXH3_64bits(bytes.data(), bytes.size())};
}

std::string Hex(uint64_t v) {
  return fmt::format("{:016x}", v);
}

uint64_t ParseHex(json_in::Fields& f, std::string_view key) {
  std::string s = f.String(key);
  uint64_t v = 0;
  auto [p, e] = std::from_chars(s.data(), s.data() + s.size(), v, 16);
  if (f.ok() && (s.size() != 16 || e != std::errc() || p != s.data() + s.size())) {
    f.Fail(key, "must be 16 hex digits");
  }
  return v;
}

std::string DiskName(const std::vector<std::string>& names, size_t i) {
  return i < names.size() ? names[i] : std::to_string(i);
}

void CompareDisk(const ImageStamp& then, const ImageStamp& now, size_t i, const std::string& name,
                 std::vector<FenceMismatch>* out) {
  int d = static_cast<int>(i);
  if (then.device != now.device || then.inode != now.inode) {
    out->push_back({FenceCheck::kImageReplaced, d,
                    fmt::format("disk {} is another file than at the fence (inode {}, at the "
                                "fence {}): replaced or restored from a copy",
                                name, now.inode, then.inode)});
    return;  // the rest follows from it
  }
  if (then.size_bytes != now.size_bytes) {
    out->push_back({FenceCheck::kImageSize, d,
                    fmt::format("disk {} has {} bytes, at the fence it had {}", name,
                                now.size_bytes, then.size_bytes)});
  }
  if (then.mtime_ns != now.mtime_ns) {
    out->push_back({FenceCheck::kImageModified, d,
                    fmt::format("disk {} was changed after the fence (mtime {}, at the fence {})",
                                name, FormatTimeNs(now.mtime_ns), FormatTimeNs(then.mtime_ns))});
  } else if (then.ctime_ns != now.ctime_ns) {
    out->push_back({FenceCheck::kImageChanged, d,
                    fmt::format("disk {} was changed after the fence (ctime {}, at the fence {}; "
                                "its mtime was set back)",
                                name, FormatTimeNs(now.ctime_ns), FormatTimeNs(then.ctime_ns))});
  }
  if (then.sample_xxh3 != now.sample_xxh3) {
    out->push_back(
        {FenceCheck::kImageContent, d,
         fmt::format("disk {} holds other bytes than at the fence (sampled blocks differ)", name)});
  }
  if (then.dirty_bytes != now.dirty_bytes || then.dirty_xxh3 != now.dirty_xxh3) {
    out->push_back({FenceCheck::kBitmapChanged, d,
                    fmt::format("dirty-region bitmap of disk {} marks other regions than at the "
                                "fence ({} bytes, at the fence {})",
                                name, now.dirty_bytes, then.dirty_bytes)});
  }
}

void CompareLog(const FenceFingerprint& then, const FenceFingerprint& now, uint64_t after,
                std::vector<FenceMismatch>* out) {
  if (then.log_last_seq != now.log_last_seq) {
    out->push_back({FenceCheck::kLogEnd, -1,
                    fmt::format("capture log ends at seq {}, at the fence it ended at seq {}",
                                now.log_last_seq, then.log_last_seq)});
  }
  auto find = [&](uint64_t first_seq) -> const SegmentStamp* {
    for (auto& s : now.segments) {
      if (s.first_seq == first_seq) return &s;
    }
    return nullptr;
  };
  for (size_t i = 0; i < then.segments.size(); ++i) {
    const SegmentStamp& s = then.segments[i];
    // Its records run up to the next segment's first seq - 1 (or the log's end).
    uint64_t last =
        i + 1 < then.segments.size() ? then.segments[i + 1].first_seq - 1 : then.log_last_seq;
    if (last <= after || s.first_seq > then.log_last_seq) continue;  // not needed
    const SegmentStamp* cur = find(s.first_seq);
    if (cur == nullptr) {
      out->push_back({FenceCheck::kLogSegmentMissing, -1,
                      fmt::format("capture log segment of seqs {}..{} is gone (records after seq "
                                  "{} the recovery site never had were in it)",
                                  s.first_seq, last, after)});
    } else if (cur->inode != s.inode) {
      out->push_back({FenceCheck::kLogSegmentReplaced, -1,
                      fmt::format("capture log segment of seqs {}..{} is another file than at "
                                  "the fence (inode {}, at the fence {})",
                                  s.first_seq, last, cur->inode, s.inode)});
    }
  }
  for (auto& s : now.segments) {
    bool known = std::any_of(then.segments.begin(), then.segments.end(),
                             [&](const SegmentStamp& t) { return t.first_seq == s.first_seq; });
    // A segment starting past the log's end holds no record (a fresh one at open).
    if (!known && s.first_seq <= std::max(now.log_last_seq, then.log_last_seq)) {
      out->push_back(
          {FenceCheck::kLogSegmentAdded, -1,
           fmt::format("capture log segment from seq {} was not there at the fence", s.first_seq)});
    }
  }
}

}  // namespace

std::string_view FenceCheckName(FenceCheck check) {
  switch (check) {
    case FenceCheck::kNotRecorded:
      return "not_recorded";
    case FenceCheck::kUnreadable:
      return "unreadable";
    case FenceCheck::kOtherFence:
      return "other_fence";
    case FenceCheck::kDiskCount:
      return "disk_count";
    case FenceCheck::kImageReplaced:
      return "image_replaced";
    case FenceCheck::kImageSize:
      return "image_size";
    case FenceCheck::kImageModified:
      return "image_modified";
    case FenceCheck::kImageChanged:
      return "image_changed";
    case FenceCheck::kImageContent:
      return "image_content";
    case FenceCheck::kBitmapChanged:
      return "bitmap_changed";
    case FenceCheck::kLogEnd:
      return "log_end";
    case FenceCheck::kLogSegmentMissing:
      return "log_segment_missing";
    case FenceCheck::kLogSegmentReplaced:
      return "log_segment_replaced";
    case FenceCheck::kLogSegmentAdded:
      return "log_segment_added";
  }
  return "unknown";
}

json FenceMismatch::Json(const std::vector<std::string>& disk_names) const {
  json j = {{"check", FenceCheckName(check)}, {"reason", reason}};
  if (disk >= 0) j["disk"] = DiskName(disk_names, static_cast<size_t>(disk));
  return j;
}

Result<FenceFingerprint> TakeFingerprint(const FingerprintSources& src, uint64_t fenced_epoch,
                                         uint64_t sample_seed, int64_t time_ns) {
  if (src.image_paths.size() != src.disks.size() || src.bitmaps.size() != src.disks.size()) {
    return InvalidArgument("a fingerprint needs a path, a disk and a bitmap per disk");
  }
  FenceFingerprint fp;
  fp.fenced_epoch = fenced_epoch;
  fp.time_ns = time_ns;
  fp.sample_seed = sample_seed;
  fp.log_last_seq = src.log_last_seq;
  OSR_ASSIGN_OR_RETURN(auto segments, ListSegments(src.log_dir));
  for (auto& s : segments) {
    OSR_ASSIGN_OR_RETURN(FileStat st, StatFile(s.path));
    fp.segments.push_back({s.first_seq, st.inode});
  }
  for (size_t i = 0; i < src.disks.size(); ++i) {
    OSR_ASSIGN_OR_RETURN(FileStat st, StatFile(src.image_paths[i]));
    ImageStamp im;
    im.device = st.device;
    im.inode = st.inode;
    im.size_bytes = st.size_bytes;
    im.mtime_ns = st.mtime_ns;
    im.ctime_ns = st.ctime_ns;
    OSR_ASSIGN_OR_RETURN(im.sample_xxh3, SampleHash(*src.disks[i], sample_seed, i));
    std::tie(im.dirty_bytes, im.dirty_xxh3) = DirtyStamp(*src.bitmaps[i]);
    fp.disks.push_back(im);
  }
  return fp;
}

std::vector<FenceMismatch> CompareFingerprints(const FenceFingerprint& at_fence,
                                               const FenceFingerprint& now, uint64_t after,
                                               const std::vector<std::string>& disk_names) {
  std::vector<FenceMismatch> out;
  if (at_fence.fenced_epoch != now.fenced_epoch) {
    out.push_back({FenceCheck::kOtherFence, -1,
                   fmt::format("fence fingerprint is of the fence at epoch {}, not of the one at "
                               "epoch {}",
                               at_fence.fenced_epoch, now.fenced_epoch)});
    return out;
  }
  if (at_fence.disks.size() != now.disks.size()) {
    out.push_back({FenceCheck::kDiskCount, -1,
                   fmt::format("fence fingerprint has {} disks, the group {}",
                               at_fence.disks.size(), now.disks.size())});
    return out;
  }
  for (size_t i = 0; i < now.disks.size(); ++i) {
    CompareDisk(at_fence.disks[i], now.disks[i], i, DiskName(disk_names, i), &out);
  }
  CompareLog(at_fence, now, after, &out);
  return out;
}

std::string FingerprintPath(const std::string& capture_dir, std::string_view name) {
  return capture_dir + "/" + std::string(name);
}

json FingerprintJson(const FenceFingerprint& fp) {
  json segments = json::array();
  for (auto& s : fp.segments) segments.push_back({{"first_seq", s.first_seq}, {"inode", s.inode}});
  json disks = json::array();
  for (auto& d : fp.disks) {
    disks.push_back({{"device", d.device},
                     {"inode", d.inode},
                     {"size_bytes", d.size_bytes},
                     {"mtime_ns", d.mtime_ns},
                     {"ctime_ns", d.ctime_ns},
                     {"sample_xxh3", Hex(d.sample_xxh3)},
                     {"dirty_bytes", d.dirty_bytes},
                     {"dirty_xxh3", Hex(d.dirty_xxh3)}});
  }
  return json{{"version", kFingerprintVersion},
              {"fenced_epoch", fp.fenced_epoch},
              {"time", FormatTimeNs(fp.time_ns)},
              {"time_ns", fp.time_ns},
              {"sample_seed", Hex(fp.sample_seed)},
              {"log", {{"last_seq", fp.log_last_seq}, {"segments", segments}}},
              {"disks", disks}};
}

Result<FenceFingerprint> ParseFingerprint(const json& j) {
  json_in::Fields f(j, "fence-fingerprint.");
  FenceFingerprint fp;
  uint64_t version = f.U64("version");
  fp.fenced_epoch = f.U64("fenced_epoch");
  fp.time_ns = f.I64("time_ns", 0);
  fp.sample_seed = ParseHex(f, "sample_seed");
  const json* log = f.Object("log", /*optional=*/false);
  const json* disks = f.Array("disks", /*optional=*/false);
  if (!f.ok()) return Corruption(f.status().message());
  if (version != kFingerprintVersion) {
    return Corruption(
        fmt::format("fence-fingerprint: version {} is not {}", version, kFingerprintVersion));
  }
  json_in::Fields lf(*log, "fence-fingerprint.log.");
  fp.log_last_seq = lf.U64("last_seq");
  const json* segments = lf.Array("segments", /*optional=*/false);
  if (!lf.ok()) return Corruption(lf.status().message());
  size_t i = 0;
  for (const json& e : *segments) {
    json_in::Fields sf(e, fmt::format("fence-fingerprint.log.segments[{}].", i++));
    SegmentStamp s{sf.U64("first_seq"), sf.U64("inode")};
    if (!sf.ok()) return Corruption(sf.status().message());
    fp.segments.push_back(s);
  }
  i = 0;
  for (const json& e : *disks) {
    json_in::Fields df(e, fmt::format("fence-fingerprint.disks[{}].", i++));
    ImageStamp d;
    d.device = df.U64("device");
    d.inode = df.U64("inode");
    d.size_bytes = df.U64("size_bytes");
    d.mtime_ns = df.I64("mtime_ns", 0);
    d.ctime_ns = df.I64("ctime_ns", 0);
    d.sample_xxh3 = ParseHex(df, "sample_xxh3");
    d.dirty_bytes = df.U64("dirty_bytes");
    d.dirty_xxh3 = ParseHex(df, "dirty_xxh3");
    if (!df.ok()) return Corruption(df.status().message());
    fp.disks.push_back(d);
  }
  return fp;
}

Status WriteFingerprint(const std::string& capture_dir, const FenceFingerprint& fp,
                        std::string_view name) {
  std::string text = json_in::Dump(FingerprintJson(fp)) + "\n";
  return WriteFileAtomic(FingerprintPath(capture_dir, name),
                         {reinterpret_cast<const uint8_t*>(text.data()), text.size()});
}

Result<std::optional<FenceFingerprint>> ReadFingerprint(const std::string& capture_dir,
                                                        std::string_view name) {
  std::string path = FingerprintPath(capture_dir, name);
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return std::optional<FenceFingerprint>();
  OSR_ASSIGN_OR_RETURN(std::string text, ReadSmallFile(path, kFingerprintBytesMax));
  auto j = json_in::ParseObject(text, path, kFingerprintBytesMax);
  if (!j.ok()) return Corruption(j.status().message());
  auto fp = ParseFingerprint(*j);
  if (!fp.ok()) return Corruption(path + ": " + fp.status().message());
  return std::optional<FenceFingerprint>(std::move(*fp));
}

Status RemoveFingerprint(const std::string& capture_dir, std::string_view name) {
  std::string path = FingerprintPath(capture_dir, name);
  std::error_code ec;
  std::filesystem::remove(path, ec);
  if (ec) return Status::FromErrno(ec.value(), "remove " + path);
  return Status::Ok();
}

}  // namespace osr::capture
