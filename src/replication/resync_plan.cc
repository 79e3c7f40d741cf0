#include "replication/resync_plan.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "common/crc32c.h"
#include "common/file.h"
#include "common/json_in.h"
#include "common/le.h"

namespace osr::replication {

namespace {

constexpr int kPlanVersion = 1;
constexpr uint8_t kRegionsMagic[8] = {'O', 'S', 'R', 'R', 'S', 'Y', 'N', 'C'};
constexpr uint32_t kRegionsVersion = 1;
constexpr size_t kRegionsHeaderBytes = 16;
constexpr size_t kRegionBytes = 24;
constexpr uint64_t kPlanJsonBytesMax = 64 << 10;

std::string JsonPath(const std::string& dir) {
  return dir + "/resync.json";
}
std::string RegionsPath(const std::string& dir) {
  return dir + "/resync.regions";
}

std::string EncodeRegions(const std::vector<DiskRange>& regions) {
  std::string out(kRegionsHeaderBytes + regions.size() * kRegionBytes, '\0');
  auto* p = reinterpret_cast<uint8_t*>(out.data());
  std::memcpy(p, kRegionsMagic, 8);
  Le32(p + 8, kRegionsVersion);
  p += kRegionsHeaderBytes;
  for (const auto& r : regions) {
    Le32(p, r.disk);
    Le64(p + 8, r.range.offset);
    Le64(p + 16, r.range.length);
    p += kRegionBytes;
  }
  return out;
}

// Where the plan's byte `pos` (0 < pos <= total) ends: the region holding byte pos - 1.
struct Position {
  uint32_t disk;
  uint64_t end_offset;  // the offset after that byte
};
Position PositionOf(const ResyncPlan& plan, uint64_t pos) {
  uint64_t before = 0;
  for (const auto& r : plan.regions) {
    if (pos <= before + r.range.length) return {r.disk, r.range.offset + (pos - before)};
    before += r.range.length;
  }
  return {0, 0};  // pos > total: the caller checked
}

}  // namespace

ResyncPlan NewResyncPlan(std::string group, uint64_t epoch, uint64_t from, bool initial,
                         uint64_t generation, std::vector<DiskRange> regions) {
  ResyncPlan p;
  p.group = std::move(group);
  p.epoch = epoch;
  p.from = from;
  p.initial = initial;
  p.generation = generation;
  p.regions = std::move(regions);
  for (const auto& r : p.regions) p.total_bytes += r.range.length;
  p.sent_bytes_max = std::min(p.total_bytes, kResyncSentAheadBytes);
  return p;
}

Status SaveResyncPlan(const std::string& dir, ResyncPlan* p, bool with_regions) {
  const ResyncPlan& plan = *p;
  if (plan.regions.size() > kResyncPlanRegionsMax) {
    return OutOfRange(fmt::format("{} regions, more than the {} a plan keeps on disk",
                                  plan.regions.size(), kResyncPlanRegionsMax));
  }
  if (with_regions) {
    std::string regions = EncodeRegions(plan.regions);
    OSR_RETURN_IF_ERROR(WriteFileAtomic(
        RegionsPath(dir), {reinterpret_cast<const uint8_t*>(regions.data()), regions.size()}));
    p->regions_crc = Crc32c(regions.data(), regions.size());
  }
  std::string text = json_in::Dump(nlohmann::json{
      {"version", kPlanVersion},
      {"group", plan.group},
      {"epoch", plan.epoch},
      {"from", plan.from},
      {"initial", plan.initial},
      {"regions", plan.regions.size()},
      {"regions_crc", plan.regions_crc},
      {"total_bytes", plan.total_bytes},
      {"sent_bytes_max", plan.sent_bytes_max},
  });
  return WriteFileAtomic(JsonPath(dir),
                         {reinterpret_cast<const uint8_t*>(text.data()), text.size()});
}

Result<ResyncPlan> LoadResyncPlan(const std::string& dir,
                                  const std::vector<store::StoreDisk>& disks) {
  std::error_code ec;
  if (!std::filesystem::exists(JsonPath(dir), ec)) return NotFound(JsonPath(dir) + " is missing");
  auto text = ReadSmallFile(JsonPath(dir), kPlanJsonBytesMax);
  if (!text.ok()) return Corruption(text.status().message());
  auto j = json_in::ParseObject(*text, JsonPath(dir));
  if (!j.ok()) return Corruption(j.status().message());
  json_in::Fields f(*j, JsonPath(dir) + ": ");
  ResyncPlan p;
  uint64_t version = f.U64("version");
  p.group = f.String("group");
  p.epoch = f.U64("epoch");
  p.from = f.U64("from");
  p.initial = f.Bool("initial", false);
  uint64_t count = f.U64("regions", 0, {.max = kResyncPlanRegionsMax});
  uint64_t crc = f.U64("regions_crc", 0, {.max = UINT32_MAX});
  p.total_bytes = f.U64("total_bytes");
  p.sent_bytes_max = f.U64("sent_bytes_max");
  if (f.ok() && version != kPlanVersion) f.Fail("version", "is not 1");
  if (f.ok() && p.sent_bytes_max > p.total_bytes) f.Fail("sent_bytes_max", "exceeds total_bytes");
  if (!f.ok()) return Corruption(f.status().message());

  const std::string rpath = RegionsPath(dir);
  auto raw = ReadSmallFile(rpath, kRegionsHeaderBytes + count * kRegionBytes);
  if (!raw.ok()) return Corruption(raw.status().message());
  if (raw->size() != kRegionsHeaderBytes + count * kRegionBytes ||
      Crc32c(raw->data(), raw->size()) != crc) {
    return Corruption(fmt::format("{}: {} bytes that do not match resync.json ({} regions, CRC {})",
                                  rpath, raw->size(), count, crc));
  }
  const auto* q = reinterpret_cast<const uint8_t*>(raw->data());
  if (std::memcmp(q, kRegionsMagic, 8) != 0 || Ld32(q + 8) != kRegionsVersion) {
    return Corruption(rpath + ": not a resync region list of version 1");
  }
  q += kRegionsHeaderBytes;
  uint64_t sum = 0;
  for (uint64_t i = 0; i < count; ++i, q += kRegionBytes) {
    DiskRange r{Ld32(q), {Ld64(q + 8), Ld64(q + 16)}};
    if (r.disk >= disks.size() || r.range.length == 0 ||
        r.range.offset > disks[r.disk].size_bytes ||
        r.range.length > disks[r.disk].size_bytes - r.range.offset) {
      return Corruption(
          fmt::format("{}: region {} ({} bytes at {} of disk {}) lies outside the "
                      "group's disks",
                      rpath, i, r.range.length, r.range.offset, r.disk));
    }
    sum += r.range.length;
    p.regions.push_back(r);
  }
  if (sum != p.total_bytes) {
    return Corruption(fmt::format("{}: the regions hold {} bytes, resync.json says {}", rpath, sum,
                                  p.total_bytes));
  }
  p.regions_crc = static_cast<uint32_t>(crc);
  p.from_disk = true;
  return p;
}

Status RemoveResyncPlan(const std::string& dir) {
  for (const std::string& path : {JsonPath(dir), RegionsPath(dir)}) {
    std::error_code ec;
    std::filesystem::remove(path, ec);
    if (ec) return Status::FromErrno(ec.value(), "remove " + path);
  }
  return Status::Ok();
}

Status CheckStaged(const ResyncPlan& plan, const HelloStaged& staged,
                   const std::vector<store::StoreDisk>& disks) {
  if (staged.from != plan.from || staged.initial != plan.initial) {
    return Status(Code::kFailedPrecondition,
                  fmt::format("the recovery site's staged copy is of the {} after seq {}, this "
                              "site's of the {} after seq {}",
                              staged.initial ? "initial copy" : "resync", staged.from,
                              plan.initial ? "initial copy" : "resync", plan.from));
  }
  if (staged.bytes == 0 || staged.bytes > plan.total_bytes) {
    return InvalidArgument(fmt::format("HELLO_OK.staged.bytes: {} bytes staged of a copy of {}",
                                       staged.bytes, plan.total_bytes));
  }
  if (staged.bytes > plan.sent_bytes_max) {
    return InvalidArgument(
        fmt::format("HELLO_OK.staged.bytes: {} bytes staged, but this site sent at most {}",
                    staged.bytes, plan.sent_bytes_max));
  }
  if (staged.end_disk >= disks.size() || staged.end_offset > disks[staged.end_disk].size_bytes) {
    return InvalidArgument(
        fmt::format("HELLO_OK.staged: it ends at byte {} of disk {}, beyond the "
                    "group's disks",
                    staged.end_offset, staged.end_disk));
  }
  Position at = PositionOf(plan, staged.bytes);
  if (at.disk != staged.end_disk || at.end_offset != staged.end_offset) {
    return InvalidArgument(
        fmt::format("HELLO_OK.staged: it ends at byte {} of disk {}, but byte "
                    "{} of this copy ends at byte {} of disk {}",
                    staged.end_offset, staged.end_disk, staged.bytes, at.end_offset, at.disk));
  }
  return Status::Ok();
}

std::vector<DiskRange> DirtyBeforeCursor(const ResyncPlan& plan, uint64_t cursor,
                                         const std::vector<DiskRange>& dirty) {
  // The copied part, per disk, sorted and merged.
  std::vector<DiskRange> done;
  uint64_t before = 0;
  for (const auto& r : plan.regions) {
    if (before >= cursor) break;
    uint64_t n = std::min(r.range.length, cursor - before);
    done.push_back({r.disk, {r.range.offset, n}});
    before += r.range.length;
  }
  auto by_place = [](const DiskRange& a, const DiskRange& b) {
    return a.disk != b.disk ? a.disk < b.disk : a.range.offset < b.range.offset;
  };
  auto merge = [&](std::vector<DiskRange> v) {
    std::sort(v.begin(), v.end(), by_place);
    std::vector<DiskRange> out;
    for (const auto& r : v) {
      if (!out.empty() && out.back().disk == r.disk &&
          r.range.offset <= out.back().range.offset + out.back().range.length) {
        uint64_t end = std::max(out.back().range.offset + out.back().range.length,
                                r.range.offset + r.range.length);
        out.back().range.length = end - out.back().range.offset;
      } else if (r.range.length > 0) {
        out.push_back(r);
      }
    }
    return out;
  };
  done = merge(std::move(done));
  std::vector<DiskRange> d = merge(dirty);
  // Both sorted: one pass.
  std::vector<DiskRange> out;
  size_t i = 0, k = 0;
  while (i < done.size() && k < d.size()) {
    const DiskRange& a = done[i];
    const DiskRange& b = d[k];
    if (a.disk != b.disk) {
      (a.disk < b.disk ? i : k)++;
      continue;
    }
    uint64_t lo = std::max(a.range.offset, b.range.offset);
    uint64_t a_end = a.range.offset + a.range.length, b_end = b.range.offset + b.range.length;
    uint64_t hi = std::min(a_end, b_end);
    if (lo < hi) out.push_back({a.disk, {lo, hi - lo}});
    (a_end < b_end ? i : k)++;
  }
  return out;
}

}  // namespace osr::replication
