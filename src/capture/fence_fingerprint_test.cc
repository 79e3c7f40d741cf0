#include "capture/fence_fingerprint.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <thread>

#include "capture/capture_group.h"
#include "capture/log_reader.h"
#include "common/json_in.h"
#include "nbd/file_disk.h"

namespace osr::capture {
namespace {

namespace fs = std::filesystem;

constexpr uint64_t kSize = 4 << 20;

std::vector<FenceCheck> Checks(const std::vector<FenceMismatch>& m) {
  std::vector<FenceCheck> out;
  for (auto& x : m) out.push_back(x.check);
  return out;
}

std::string Reasons(const std::vector<FenceMismatch>& m) {
  std::string out;
  for (auto& x : m) out += std::string(FenceCheckName(x.check)) + ": " + x.reason + "\n";
  return out;
}

class FenceFingerprintTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("osr-fencefp-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string Image(int i) const { return dir_ + "/d" + std::to_string(i) + ".img"; }
  std::string Cap() const { return dir_ + "/cap"; }

  std::unique_ptr<CaptureGroup> Open(int disks = 2, bool paths = true, bool accept = false) {
    auto g = TryOpen(disks, paths, accept);
    EXPECT_TRUE(g.ok()) << g.status().ToString();
    return g.ok() ? std::move(g).value() : nullptr;
  }
  Result<std::unique_ptr<CaptureGroup>> TryOpen(int disks = 2, bool paths = true,
                                                bool accept = false) {
    std::vector<std::unique_ptr<nbd::Disk>> images;
    CaptureOptions o;
    o.accept_outside_changes = accept;
    for (int i = 0; i < disks; ++i) {
      auto img = nbd::FileDisk::Open(Image(i), false, kSize);
      EXPECT_TRUE(img.ok()) << img.status().ToString();
      images.push_back(std::move(img).value());
      if (paths) o.image_paths.push_back(Image(i));
    }
    o.dir = Cap();
    o.segment_bytes_target = 256 << 10;  // several segments
    return CaptureGroup::Open(std::move(images), o);
  }

  // n writes of 64 KiB with distinct bytes, spread over both disks, each flushed (so the
  // log rolls to a new segment every ~256 KiB, whatever the writer's batching).
  static void Write(CaptureGroup& g, int n, uint8_t tag) {
    for (int i = 0; i < n; ++i) {
      std::vector<uint8_t> data(64 << 10, static_cast<uint8_t>(tag + i));
      uint64_t off = (static_cast<uint64_t>(i) * 3 % 60) * (64 << 10);
      ASSERT_TRUE(g.disk(i % g.disk_count())->Write(off, data).ok());
      ASSERT_TRUE(g.Flush().ok());
    }
  }

  // Writes bytes into an image file behind osr's back.
  void Poke(int disk, uint64_t offset, const std::string& bytes) {
    int fd = ::open(Image(disk).c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    struct stat before {};
    ASSERT_EQ(::fstat(fd, &before), 0);
    // The kernel stamps mtime from a coarse clock (a few ms): write again, boundedly, until
    // the stamp moves, as any write a little later would.
    for (int i = 0; i < 100; ++i) {
      ASSERT_EQ(::pwrite(fd, bytes.data(), bytes.size(), static_cast<off_t>(offset)),
                static_cast<ssize_t>(bytes.size()));
      struct stat after {};
      ASSERT_EQ(::fstat(fd, &after), 0);
      if (after.st_mtim.tv_sec != before.st_mtim.tv_sec ||
          after.st_mtim.tv_nsec != before.st_mtim.tv_nsec)
        break;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    ::close(fd);
  }

  std::string dir_;
};

const std::vector<std::string> kNames = {"os", "data"};

TEST_F(FenceFingerprintTest, UntouchedAcrossACloseAndReopenVerifies) {
  {
    auto g = Open();
    Write(*g, 20, 1);
    ASSERT_TRUE(g->Fence(2).ok());
    EXPECT_TRUE(fs::exists(FingerprintPath(Cap())));
    auto m = g->CheckFenceFingerprint(0, kNames);
    EXPECT_TRUE(m.empty()) << Reasons(m);
    ASSERT_TRUE(g->Close().ok());
  }
  // Close cuts the segment's padding and marks the bitmaps clean: none of that counts.
  auto g = Open();
  EXPECT_EQ(g->fenced_epoch(), 2u);
  auto m = g->CheckFenceFingerprint(0, kNames);
  EXPECT_TRUE(m.empty()) << Reasons(m);
  // A fence re-applied at the same epoch (site.json) changes nothing.
  ASSERT_TRUE(g->Fence(2, /*record_fingerprint=*/false).ok());
  EXPECT_TRUE(g->CheckFenceFingerprint(0, kNames).empty());
}

TEST_F(FenceFingerprintTest, AnImageWrittenAfterTheFenceIsFound) {
  {
    auto g = Open();
    Write(*g, 10, 1);
    ASSERT_TRUE(g->Fence(2).ok());
    ASSERT_TRUE(g->Close().ok());
  }
  Poke(1, 3 << 20, "written outside osr");
  auto g = Open();
  auto m = g->CheckFenceFingerprint(0, kNames);
  ASSERT_FALSE(m.empty());
  EXPECT_EQ(m[0].check, FenceCheck::kImageModified) << Reasons(m);
  EXPECT_EQ(m[0].disk, 1);
  EXPECT_NE(m[0].reason.find("disk data was changed after the fence (mtime"), std::string::npos)
      << m[0].reason;
  EXPECT_EQ(m[0].Json(kNames)["disk"], "data");
  EXPECT_EQ(m[0].Json(kNames)["check"], "image_modified");
}

TEST_F(FenceFingerprintTest, AWriteWhoseMtimeWasSetBackIsFoundByItsCtime) {
  struct stat before {};
  {
    auto g = Open();
    Write(*g, 10, 1);
    ASSERT_TRUE(g->Fence(2).ok());
    ASSERT_TRUE(g->Close().ok());
  }
  ASSERT_EQ(::stat(Image(0).c_str(), &before), 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // a later ctime tick
  Poke(0, 1 << 20, "x");
  timespec times[2] = {before.st_atim, before.st_mtim};
  ASSERT_EQ(::utimensat(AT_FDCWD, Image(0).c_str(), times, 0), 0);
  auto g = Open();
  auto m = g->CheckFenceFingerprint(0, kNames);
  ASSERT_FALSE(m.empty());
  EXPECT_EQ(m[0].check, FenceCheck::kImageChanged) << Reasons(m);
  EXPECT_NE(m[0].reason.find("disk os was changed after the fence (ctime"), std::string::npos);
}

TEST_F(FenceFingerprintTest, AnImageRestoredFromACopyIsAnotherFile) {
  {
    auto g = Open();
    Write(*g, 10, 1);
    ASSERT_TRUE(g->Fence(2).ok());
    ASSERT_TRUE(g->Close().ok());
  }
  // Byte for byte the same, times kept: still not the file that was fenced.
  fs::copy_file(Image(0), dir_ + "/backup.img");
  struct stat st {};
  ASSERT_EQ(::stat(Image(0).c_str(), &st), 0);
  timespec times[2] = {st.st_atim, st.st_mtim};
  ASSERT_EQ(::utimensat(AT_FDCWD, (dir_ + "/backup.img").c_str(), times, 0), 0);
  fs::rename(dir_ + "/backup.img", Image(0));
  auto g = Open();
  auto m = g->CheckFenceFingerprint(0, kNames);
  EXPECT_EQ(Checks(m), std::vector<FenceCheck>{FenceCheck::kImageReplaced}) << Reasons(m);
}

TEST_F(FenceFingerprintTest, ChangedSampledBytesAreFoundWithoutTheirTimes) {
  // Only the comparison: a fingerprint whose sampled bytes differ (a change under the
  // file system, which keeps every time).
  auto g = Open();
  Write(*g, 5, 1);
  ASSERT_TRUE(g->Fence(2).ok());
  auto rec = ReadFingerprint(Cap());
  ASSERT_TRUE(rec.ok() && rec->has_value());
  FenceFingerprint then = **rec, now = **rec;
  now.disks[0].sample_xxh3 ^= 1;
  auto m = CompareFingerprints(then, now, 0, kNames);
  EXPECT_EQ(Checks(m), std::vector<FenceCheck>{FenceCheck::kImageContent}) << Reasons(m);
  now = then;
  now.disks[1].dirty_bytes += 65536;
  m = CompareFingerprints(then, now, 0, kNames);
  EXPECT_EQ(Checks(m), std::vector<FenceCheck>{FenceCheck::kBitmapChanged}) << Reasons(m);
  now = then;
  now.fenced_epoch = 3;
  m = CompareFingerprints(then, now, 0, kNames);
  EXPECT_EQ(Checks(m), std::vector<FenceCheck>{FenceCheck::kOtherFence}) << Reasons(m);
}

TEST_F(FenceFingerprintTest, ATruncatedOrRemovedLogSegmentIsFound) {
  uint64_t last = 0;
  {
    auto g = Open();
    Write(*g, 40, 1);  // ~2.5 MiB of records: several 256 KiB segments
    last = g->log().last_seq();
    ASSERT_TRUE(g->Fence(2).ok());
    ASSERT_TRUE(g->Close().ok());
  }
  auto segments = ListSegments(Cap());
  ASSERT_TRUE(segments.ok());
  ASSERT_GE(segments->size(), 3u);
  // The last segment with records cut in the middle of a record: the log ends earlier.
  // (A segment after it, starting past the log's end, holds none: removed, else the cut
  // one is not the tail and the log is refused as damaged.)
  {
    auto tail = segments->back();
    for (auto& seg : *segments) {
      if (seg.first_seq <= last) {
        tail = seg;
      } else {
        fs::remove(seg.path);
      }
    }
    fs::resize_file(tail.path, fs::file_size(tail.path) - 1000);
  }
  {
    auto g = Open();
    ASSERT_LT(g->log().last_seq(), last);
    auto m = g->CheckFenceFingerprint(0, kNames);
    // A cut log marks every region dirty too (capture_log.h, Cut): both are found.
    auto end = std::find_if(m.begin(), m.end(),
                            [](const auto& x) { return x.check == FenceCheck::kLogEnd; });
    ASSERT_NE(end, m.end()) << Reasons(m);
    EXPECT_NE(end->reason.find(fmt::format("at the fence it ended at seq {}", last)),
              std::string::npos)
        << end->reason;
    ASSERT_TRUE(g->Close().ok());
  }
  // Every segment removed (and the cut record with them): an empty log starts again.
  for (auto& s : *segments) fs::remove(s.path);
  fs::remove(Cap() + "/cut.json");
  auto g = Open();
  auto m = g->CheckFenceFingerprint(0, kNames);
  ASSERT_FALSE(m.empty());
  bool log_end = false;
  for (auto& x : m) log_end = log_end || x.check == FenceCheck::kLogEnd;
  EXPECT_TRUE(log_end) << Reasons(m);
  bool missing = false;
  for (auto& x : m) missing = missing || x.check == FenceCheck::kLogSegmentMissing;
  EXPECT_TRUE(missing) << Reasons(m);
}

TEST_F(FenceFingerprintTest, SegmentsOfRecordsTheRecoverySiteHadMayGo) {
  {
    auto g = Open();
    Write(*g, 40, 1);
    ASSERT_TRUE(g->Fence(2).ok());
    ASSERT_TRUE(g->Close().ok());
  }
  auto segments = ListSegments(Cap());
  ASSERT_TRUE(segments.ok());
  ASSERT_GE(segments->size(), 3u);
  // Trimmed: the first segment's records are all at the recovery site (after >= them).
  uint64_t after = (*segments)[1].first_seq - 1;
  fs::remove((*segments)[0].path);
  {
    auto g = Open();
    auto m = g->CheckFenceFingerprint(after, kNames);
    EXPECT_TRUE(m.empty()) << Reasons(m);
    // ... but not when the recovery site had fewer of them.
    m = g->CheckFenceFingerprint(after - 1, kNames);
    EXPECT_EQ(Checks(m), std::vector<FenceCheck>{FenceCheck::kLogSegmentMissing}) << Reasons(m);
    ASSERT_TRUE(g->Close().ok());
  }
  // A middle segment replaced by a copy of itself: another file.
  std::string mid = (*segments)[1].path;
  fs::copy_file(mid, mid + ".copy");
  fs::rename(mid + ".copy", mid);
  auto g = Open();
  auto m = g->CheckFenceFingerprint(after, kNames);
  EXPECT_EQ(Checks(m), std::vector<FenceCheck>{FenceCheck::kLogSegmentReplaced}) << Reasons(m);
}

TEST_F(FenceFingerprintTest, NoDamagedOrForeignFingerprintVouches) {
  {
    auto g = Open();
    Write(*g, 5, 1);
    // Re-applied from elsewhere: nothing is recorded.
    ASSERT_TRUE(g->Fence(2, /*record_fingerprint=*/false).ok());
    EXPECT_FALSE(fs::exists(FingerprintPath(Cap())));
    EXPECT_EQ(Checks(g->CheckFenceFingerprint(0, kNames)),
              std::vector<FenceCheck>{FenceCheck::kNotRecorded});
    ASSERT_TRUE(g->RecordFenceFingerprint().ok());
    EXPECT_TRUE(g->CheckFenceFingerprint(0, kNames).empty());
    ASSERT_TRUE(g->Close().ok());
  }
  std::ofstream(FingerprintPath(Cap())) << "{\"version\": 1, \"fenced_epoch\": \"two\"}";
  auto g = Open();
  auto m = g->CheckFenceFingerprint(0, kNames);
  ASSERT_EQ(Checks(m), std::vector<FenceCheck>{FenceCheck::kUnreadable});
  EXPECT_NE(m[0].reason.find("fenced_epoch"), std::string::npos) << m[0].reason;
  // A later fence replaces it.
  ASSERT_TRUE(g->Fence(3).ok());
  EXPECT_TRUE(g->CheckFenceFingerprint(0, kNames).empty());
}

TEST_F(FenceFingerprintTest, DisksWithoutImagePathsRecordNone) {
  auto g = Open(1, /*paths=*/false);
  ASSERT_TRUE(g->Fence(2).ok());
  EXPECT_FALSE(fs::exists(FingerprintPath(Cap())));
  EXPECT_EQ(Checks(g->CheckFenceFingerprint(0, kNames)),
            std::vector<FenceCheck>{FenceCheck::kNotRecorded});
}

// Writes racing the fence: every write that was not refused is in the fingerprint, so
// nothing differs afterwards.
TEST_F(FenceFingerprintTest, WritesInFlightFinishBeforeTheFingerprint) {
  auto g = Open(2);
  std::atomic<bool> go{true};
  std::atomic<int> refused{0};
  std::vector<std::thread> writers;
  for (int t = 0; t < 4; ++t) {
    writers.emplace_back([&, t] {
      std::vector<uint8_t> data(256 << 10, static_cast<uint8_t>(t));
      for (uint64_t i = 0; go; ++i) {
        uint64_t off = ((i * 7 + t) % 15) * data.size();
        if (!g->disk(t % 2)->Write(off, data).ok()) {
          ++refused;
          break;
        }
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  ASSERT_TRUE(g->Fence(2).ok());
  for (auto& w : writers) w.join();
  EXPECT_EQ(refused.load(), 4);
  auto m = g->CheckFenceFingerprint(0, kNames);
  EXPECT_TRUE(m.empty()) << Reasons(m);
}

TEST_F(FenceFingerprintTest, ParsesWhatItWritesAndRefusesWrongTypes) {
  FenceFingerprint fp;
  fp.fenced_epoch = 7;
  fp.time_ns = 1'700'000'000'000'000'000;
  fp.sample_seed = 0xfedcba9876543210ull;
  fp.log_last_seq = 99;
  fp.segments = {{1, 11}, {50, 12}};
  fp.disks = {{1, 2, kSize, 3, 4, 0xffffffffffffffffull, 65536, 5}};
  auto back = ParseFingerprint(FingerprintJson(fp));
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->fenced_epoch, 7u);
  EXPECT_EQ(back->sample_seed, fp.sample_seed);
  EXPECT_EQ(back->segments, fp.segments);
  EXPECT_EQ(back->disks, fp.disks);
  EXPECT_TRUE(CompareFingerprints(fp, *back, 0, {}).empty());

  auto bad = [&](auto edit) {
    nlohmann::json j = FingerprintJson(fp);
    edit(j);
    auto r = ParseFingerprint(j);
    EXPECT_FALSE(r.ok()) << j.dump();
    return r.ok() ? std::string() : r.status().message();
  };
  EXPECT_NE(bad([](auto& j) { j["version"] = 2; }).find("version 2"), std::string::npos);
  EXPECT_NE(bad([](auto& j) { j["disks"][0]["inode"] = "x"; }).find("disks[0].inode"),
            std::string::npos);
  EXPECT_NE(bad([](auto& j) { j["disks"][0]["sample_xxh3"] = "12"; }).find("sample_xxh3"),
            std::string::npos);
  EXPECT_NE(bad([](auto& j) { j["log"] = 5; }).find("log"), std::string::npos);
  EXPECT_NE(bad([](auto& j) { j["log"]["segments"][1] = nullptr; }).find("segments[1]"),
            std::string::npos);
}

// A group not fenced: a clean close records the images; the next open finds one written
// outside osr, marks that disk whole for a resync, and says so until the resync commits.
TEST_F(FenceFingerprintTest, AnImageWrittenWhileTheSiteWasStoppedIsResentWhole) {
  {
    auto g = Open();
    Write(*g, 10, 1);
    ASSERT_TRUE(g->Close().ok());
  }
  EXPECT_TRUE(fs::exists(FingerprintPath(Cap(), kCloseFingerprintName)));
  {
    auto g = Open();  // untouched: nothing to resend
    EXPECT_TRUE(g->changed_outside().empty());
    EXPECT_FALSE(g->HasStickyRegions());
    EXPECT_FALSE(fs::exists(FingerprintPath(Cap(), kCloseFingerprintName)));  // one start only
    ASSERT_TRUE(g->Close().ok());
  }
  Poke(1, 3 << 20, "written outside osr");
  // Refused until the operator says (the fingerprint stays, so it is refused again).
  for (int i = 0; i < 2; ++i) {
    auto refused = TryOpen();
    ASSERT_FALSE(refused.ok());
    EXPECT_EQ(refused.status().code(), Code::kFailedPrecondition);
    EXPECT_NE(refused.status().message().find("changed outside osr"), std::string::npos)
        << refused.status().ToString();
  }
  auto g = Open(2, true, /*accept=*/true);
  auto changed = g->changed_outside();
  // Its mtime always; its sampled bytes when the poke hit a sampled block (the samples are
  // seeded at random, so either way). Both name the site's stop, neither "the fence".
  ASSERT_GE(changed.size(), 1u);
  for (const auto& c : changed) {
    EXPECT_NE(c.find("disk 1 "), std::string::npos) << c;
    EXPECT_NE(c.find("the site last stopped"), std::string::npos) << c;
    EXPECT_EQ(c.find("fence"), std::string::npos) << c;
  }
  EXPECT_NE(changed[0].find("was changed since the site last stopped"), std::string::npos)
      << changed[0];
  auto dirty = g->DirtyRegions();
  ASSERT_EQ(dirty.size(), 1u);  // the disk that changed, whole; the other one not
  EXPECT_EQ(dirty[0].disk, 1u);
  EXPECT_EQ(dirty[0].range.offset, 0u);
  EXPECT_EQ(dirty[0].range.length, g->disk(1)->size());
  g->CleanRegions(dirty);  // the resync committed
  EXPECT_TRUE(g->changed_outside().empty());
}

// A close fingerprint that is not one vouches for nothing: every disk is resent.
TEST_F(FenceFingerprintTest, AGarbageCloseFingerprintCountsAsEveryDiskChanged) {
  {
    auto g = Open();
    Write(*g, 10, 1);
    ASSERT_TRUE(g->Close().ok());
  }
  std::ofstream(FingerprintPath(Cap(), kCloseFingerprintName)) << "garbage";
  EXPECT_EQ(TryOpen().status().code(), Code::kFailedPrecondition);
  // A rename (ctime only) is not a change of the bytes.
  {
    auto g = Open(2, true, /*accept=*/true);
    ASSERT_TRUE(g->Close().ok());
  }
  fs::rename(Image(0), Image(0) + ".away");
  fs::rename(Image(0) + ".away", Image(0));
  {
    auto g = Open();
    ASSERT_NE(g, nullptr);
    EXPECT_TRUE(g->changed_outside().empty());
    ASSERT_TRUE(g->Close().ok());
  }
  std::ofstream(FingerprintPath(Cap(), kCloseFingerprintName)) << "garbage";
  auto g = Open(2, true, /*accept=*/true);
  EXPECT_EQ(g->changed_outside().size(), 1u);
  EXPECT_EQ(g->DirtyRegions().size(), 2u);
}

}  // namespace
}  // namespace osr::capture
