#include "capture/capture_group.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "capture/log_reader.h"
#include "capture/replay.h"
#include "nbd/file_disk.h"
#include "nbd/protocol.h"

namespace osr::capture {
namespace {

namespace fs = std::filesystem;

std::vector<uint8_t> ReadAll(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {});
}

class CaptureGroupTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("osr-capdisk-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::unique_ptr<CaptureGroup> Open(uint64_t size, int disks = 1) {
    std::vector<std::unique_ptr<nbd::Disk>> images;
    for (int i = 0; i < disks; ++i) {
      auto img = nbd::FileDisk::Open(
          dir_ + (i == 0 ? std::string("/disk.img") : "/disk" + std::to_string(i) + ".img"), false,
          size);
      EXPECT_TRUE(img.ok()) << img.status().ToString();
      images.push_back(std::move(img).value());
    }
    CaptureOptions o;
    o.dir = dir_ + "/cap";
    o.segment_bytes_target = 1 << 20;  // several segments
    auto g = CaptureGroup::Open(std::move(images), o);
    EXPECT_TRUE(g.ok()) << g.status().ToString();
    return std::move(g).value();
  }
  std::string dir_;
};

// Invariant 1: concurrent, overlapping writes, trims and zeroes from several threads;
// replaying the log onto the starting image gives the served image byte for byte.
TEST_F(CaptureGroupTest, ConcurrentOverlappingWritesReplayToTheImage) {
  constexpr uint64_t kSize = 4 << 20;
  {
    std::vector<uint8_t> base(kSize);
    std::mt19937 rng(1);
    for (auto& b : base) b = static_cast<uint8_t>(rng());
    std::ofstream(dir_ + "/base.img", std::ios::binary)
        .write(reinterpret_cast<char*>(base.data()), kSize);
    fs::copy_file(dir_ + "/base.img", dir_ + "/disk.img");
  }
  auto group = Open(kSize);
  auto disk = group->disk(0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(100 + t);
      for (int i = 0; i < 400; ++i) {
        // A small hot area makes overlaps frequent.
        uint64_t len = 1 + rng() % 20000;
        uint64_t off = rng() % (i % 3 == 0 ? 65536 : kSize - len);
        off = std::min(off, kSize - len);
        int op = rng() % 10;
        if (op < 8) {
          std::vector<uint8_t> d(len, static_cast<uint8_t>(t * 50 + i));
          ASSERT_TRUE(disk->Write(off, d).ok());
        } else {
          auto mode = op == 8 ? nbd::ZeroMode::kTrim : nbd::ZeroMode::kZeroNoHole;
          ASSERT_TRUE(disk->Zero(off, len, mode, false).ok());
        }
        if (i % 97 == 0) {
          ASSERT_TRUE(disk->Flush().ok());
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(group->log().last_seq(), 1600u);
  ASSERT_TRUE(group->Close().ok());
  EXPECT_TRUE(group->bitmap(0).DirtyRanges().empty());
  disk.reset();
  group.reset();

  auto r = Replay(dir_ + "/cap", dir_ + "/base.img", dir_ + "/replay.img", UINT64_MAX);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->records, 1600u);
  EXPECT_EQ(r->last_seq, 1600u);
  EXPECT_TRUE(ReadAll(dir_ + "/replay.img") == ReadAll(dir_ + "/disk.img"));
}

TEST_F(CaptureGroupTest, ReplayUptoGivesEachPrefix) {
  constexpr uint64_t kSize = 1 << 20;
  auto group = Open(kSize);
  auto disk = group->disk(0);
  std::ofstream(dir_ + "/base.img").close();
  fs::resize_file(dir_ + "/base.img", kSize);
  std::vector<std::vector<uint8_t>> states;
  std::vector<uint8_t> model(kSize, 0);
  states.push_back(model);
  for (int i = 0; i < 6; ++i) {
    std::vector<uint8_t> d(3000, static_cast<uint8_t>(i + 1));
    ASSERT_TRUE(disk->Write(i * 1000, d).ok());
    std::copy(d.begin(), d.end(), model.begin() + i * 1000);
    states.push_back(model);
  }
  ASSERT_TRUE(group->Close().ok());
  disk.reset();
  group.reset();
  for (uint64_t upto = 0; upto <= 6; ++upto) {
    auto out = dir_ + "/r" + std::to_string(upto) + ".img";
    auto r = Replay(dir_ + "/cap", dir_ + "/base.img", out, upto);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(ReadAll(out), states[upto]) << "upto " << upto;
  }
  auto r = Replay(dir_ + "/cap", dir_ + "/base.img", dir_ + "/r9.img", 9);
  EXPECT_EQ(r.status().code(), Code::kOutOfRange);  // the log ends at 6
}

TEST_F(CaptureGroupTest, ReopenContinuesTheSequence) {
  {
    auto group = Open(1 << 20);
    auto disk = group->disk(0);
    ASSERT_TRUE(disk->Write(0, std::vector<uint8_t>(10, 1)).ok());
  }  // destructor closes cleanly
  auto group = Open(1 << 20);
  auto disk = group->disk(0);
  ASSERT_TRUE(disk->Write(0, std::vector<uint8_t>(10, 2)).ok());
  ASSERT_TRUE(disk->Flush().ok());
  EXPECT_EQ(group->log().last_seq(), 2u);
}

// Invariant 5: a fenced group refuses writes (the VM runs elsewhere now) but reads.
TEST_F(CaptureGroupTest, FencedDisksRefuseWritesButRead) {
  auto group = Open(1 << 20);
  auto disk = group->disk(0);
  ASSERT_TRUE(disk->Write(0, std::vector<uint8_t>(10, 1)).ok());
  ASSERT_TRUE(group->Fence(2).ok());
  EXPECT_EQ(group->fenced_epoch(), 2u);
  EXPECT_EQ(disk->Write(0, std::vector<uint8_t>(10, 2)).code(), Code::kPermissionDenied);
  EXPECT_EQ(disk->Zero(0, 10, nbd::ZeroMode::kTrim, false).code(), Code::kPermissionDenied);
  std::vector<uint8_t> got(10);
  ASSERT_TRUE(disk->Read(0, got).ok());
  EXPECT_EQ(got, std::vector<uint8_t>(10, 1));
  EXPECT_EQ(group->log().last_seq(), 1u);  // the refused writes are not captured
}

// Issue 10 case 9: a fence, whoever applies it, holds across a restart; it only rises.
TEST_F(CaptureGroupTest, FenceIsDurableAcrossReopen) {
  {
    auto group = Open(1 << 20);
    ASSERT_TRUE(group->Fence(3).ok());
    ASSERT_TRUE(group->Fence(2).ok());  // lower: changes nothing
    EXPECT_EQ(group->fenced_epoch(), 3u);
  }
  auto group = Open(1 << 20);
  EXPECT_EQ(group->fenced_epoch(), 3u);
  EXPECT_EQ(group->disk(0)->Write(0, std::vector<uint8_t>(10, 2)).code(), Code::kPermissionDenied);
}

// A fence record that is not one stops the group from opening (it is quarantined by the
// site): neither "fenced" nor "not fenced" can be assumed.
TEST_F(CaptureGroupTest, DamagedFenceRecordIsRefused) {
  { auto group = Open(1 << 20); }
  for (const char* text : {"{\"version\": 1}", "garbage", "{\"version\": 9, \"fenced_epoch\": 2}",
                           "{\"version\": 1, \"fenced_epoch\": \"2\"}"}) {
    std::ofstream(dir_ + "/cap/fence") << text;
    std::vector<std::unique_ptr<nbd::Disk>> images;
    auto img = nbd::FileDisk::Open(dir_ + "/disk.img", false, 0);
    ASSERT_TRUE(img.ok());
    images.push_back(std::move(*img));
    CaptureOptions o;
    o.dir = dir_ + "/cap";
    auto g = CaptureGroup::Open(std::move(images), o);
    ASSERT_FALSE(g.ok()) << text;
    EXPECT_EQ(g.status().code(), Code::kCorruption) << text;
  }
}

// One order for all the disks of a group; each disk replays from its own records.
TEST_F(CaptureGroupTest, DisksOfAGroupShareOneSequence) {
  constexpr uint64_t kSize = 1 << 20;
  auto group = Open(kSize, 2);
  std::vector<std::thread> threads;
  for (int d = 0; d < 2; ++d) {
    threads.emplace_back([&, d] {
      std::mt19937 rng(d);
      for (int i = 0; i < 300; ++i) {
        std::vector<uint8_t> data(1 + rng() % 5000, static_cast<uint8_t>(rng()));
        ASSERT_TRUE(group->disk(d)->Write(rng() % (kSize - data.size()), data).ok());
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(group->log().last_seq(), 600u);
  ASSERT_TRUE(group->Close().ok());
  group.reset();
  std::ofstream(dir_ + "/zero.img").close();
  fs::resize_file(dir_ + "/zero.img", kSize);
  for (int d = 0; d < 2; ++d) {
    auto out = dir_ + "/r" + std::to_string(d) + ".img";
    auto r = Replay(dir_ + "/cap", dir_ + "/zero.img", out, UINT64_MAX, d);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(r->records, 300u);
    EXPECT_TRUE(ReadAll(out) == ReadAll(dir_ + (d == 0 ? std::string("/disk.img") : "/disk1.img")));
  }
}

// The source on a full file system. An image write that fails with ENOSPC fails the
// WRITE (kNoSpace: NBD_ENOSPC) and takes no seq; its region stays dirty (it may be
// half-written). A capture log that cannot be written drops its unwritten records, keeps
// their regions in the bitmap, and neither WRITE nor FLUSH fails for it; once a resync
// begins, records are taken again after the last one written.
TEST_F(CaptureGroupTest, AFullFileSystemFailsTheWriteOrFallsBackToTheBitmap) {
  constexpr uint64_t kSize = 1 << 20;
  auto group = Open(kSize);
  auto disk = group->disk(0);
  ASSERT_TRUE(disk->Write(0, std::vector<uint8_t>(4096, 1)).ok());
  ASSERT_TRUE(group->Flush().ok());
  EXPECT_EQ(group->log().last_seq(), 1u);

  SetFileFaultForTest({.path_part = dir_ + "/disk.img", .err = ENOSPC, .write_bytes_left = 0});
  Status st = disk->Write(128 << 10, std::vector<uint8_t>(8192, 2));
  ClearFileFaultForTest();
  EXPECT_EQ(st.code(), Code::kNoSpace) << st.ToString();
  EXPECT_EQ(nbd::ErrnoToNbd(st.ToErrno()), nbd::kENoSpc);
  EXPECT_EQ(group->log().last_seq(), 1u);  // no seq for a write that did not happen
  auto dirty = group->DirtyRegions();
  ASSERT_EQ(dirty.size(), 1u);
  EXPECT_EQ(dirty[0].range.offset, 128u << 10);

  SetFileFaultForTest({.path_part = dir_ + "/cap", .err = ENOSPC, .write_bytes_left = 0});
  EXPECT_TRUE(disk->Write(256 << 10, std::vector<uint8_t>(4096, 3)).ok());
  EXPECT_TRUE(group->Flush().ok());  // the bitmap covers what the log dropped
  EXPECT_TRUE(disk->Write(512 << 10, std::vector<uint8_t>(4096, 4)).ok());  // tracked only
  ClearFileFaultForTest();
  EXPECT_EQ(group->log().write_error().code(), Code::kNoSpace);
  EXPECT_TRUE(group->log().overflowed());
  EXPECT_EQ(group->log().last_seq(), 1u);
  uint64_t dirty_bytes = 0;
  for (auto& r : group->DirtyRegions()) dirty_bytes += r.range.length;
  EXPECT_EQ(group->DirtyRegions().size(), 3u);
  EXPECT_GE(dirty_bytes, 3 * 4096u);

  auto [from, generation] = group->log().ResumeAfterOverflow();  // a resync begins
  EXPECT_EQ(from, 1u);
  ASSERT_TRUE(disk->Write(0, std::vector<uint8_t>(4096, 5)).ok());
  ASSERT_TRUE(group->Flush().ok());
  EXPECT_EQ(group->log().last_seq(), 2u);
  group.reset();
  std::vector<uint64_t> seqs;
  ASSERT_TRUE(LogReader::Scan(dir_ + "/cap", [&](const RecordHeader& h, auto) {
                seqs.push_back(h.seq);
                return true;
              }).ok());
  EXPECT_EQ(seqs, (std::vector<uint64_t>{1, 2}));
}

}  // namespace
}  // namespace osr::capture
