#include "replication/resync_plan.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

namespace osr::replication {
namespace {

namespace fs = std::filesystem;

const std::vector<store::StoreDisk> kDisks = {{"a", 8 << 20}, {"b", 1 << 20}};

ResyncPlan SomePlan() {
  // 3 regions: 64 KiB at 0 of a, 128 KiB at 1 MiB of a, 4 KiB at 0 of b.
  return NewResyncPlan("vm1", 2, 40, true, 0,
                       {{0, {0, 65536}}, {0, {1 << 20, 131072}}, {1, {0, 4096}}});
}

class ResyncPlanTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("osr-plan-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string dir_;
};

TEST_F(ResyncPlanTest, KeptAndReadBack) {
  ResyncPlan p = SomePlan();
  EXPECT_EQ(p.total_bytes, 65536u + 131072 + 4096);
  EXPECT_EQ(p.sent_bytes_max, p.total_bytes);  // less than kResyncSentAheadBytes
  EXPECT_EQ(LoadResyncPlan(dir_, kDisks).status().code(), Code::kNotFound);
  ASSERT_TRUE(SaveResyncPlan(dir_, &p, true).ok());
  auto q = LoadResyncPlan(dir_, kDisks);
  ASSERT_TRUE(q.ok()) << q.status().ToString();
  EXPECT_EQ(q->group, "vm1");
  EXPECT_EQ(q->epoch, 2u);
  EXPECT_EQ(q->from, 40u);
  EXPECT_TRUE(q->initial);
  EXPECT_TRUE(q->from_disk);
  ASSERT_EQ(q->regions.size(), 3u);
  EXPECT_EQ(q->regions[1].disk, 0u);
  EXPECT_EQ(q->regions[1].range, (capture::Range{1 << 20, 131072}));
  EXPECT_EQ(q->total_bytes, p.total_bytes);
  // The bound alone is rewritten as the copy goes on.
  p.sent_bytes_max = 70000;
  ASSERT_TRUE(SaveResyncPlan(dir_, &p, false).ok());
  EXPECT_EQ(LoadResyncPlan(dir_, kDisks)->sent_bytes_max, 70000u);
  ASSERT_TRUE(RemoveResyncPlan(dir_).ok());
  EXPECT_EQ(LoadResyncPlan(dir_, kDisks).status().code(), Code::kNotFound);
  EXPECT_TRUE(RemoveResyncPlan(dir_).ok());  // nothing there: fine
}

TEST_F(ResyncPlanTest, DamagedOrForeignPlansAreRefused) {
  ResyncPlan p = SomePlan();
  ASSERT_TRUE(SaveResyncPlan(dir_, &p, true).ok());
  {
    // A flipped byte in the regions: the CRC in resync.json says so.
    std::fstream f(dir_ + "/resync.regions", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(16 + 24 + 9);
    f.put('\x01');
  }
  EXPECT_EQ(LoadResyncPlan(dir_, kDisks).status().code(), Code::kCorruption);
  ASSERT_TRUE(SaveResyncPlan(dir_, &p, true).ok());
  // Regions outside the disks (another group's plan, say).
  EXPECT_EQ(LoadResyncPlan(dir_, {{"a", 8 << 20}}).status().code(), Code::kCorruption);
  EXPECT_EQ(LoadResyncPlan(dir_, {{"a", 1 << 20}, {"b", 1 << 20}}).status().code(),
            Code::kCorruption);
  // resync.json of the wrong shape, or not JSON.
  std::ofstream(dir_ + "/resync.json", std::ios::trunc) << R"({"version": 1, "from": "x"})";
  auto st = LoadResyncPlan(dir_, kDisks).status();
  EXPECT_EQ(st.code(), Code::kCorruption);
  std::ofstream(dir_ + "/resync.json", std::ios::trunc) << "{{{";
  EXPECT_EQ(LoadResyncPlan(dir_, kDisks).status().code(), Code::kCorruption);
  // A plan whose regions file is gone.
  ASSERT_TRUE(SaveResyncPlan(dir_, &p, true).ok());
  fs::remove(dir_ + "/resync.regions");
  EXPECT_EQ(LoadResyncPlan(dir_, kDisks).status().code(), Code::kCorruption);
}

TEST(CheckStagedTest, TakesOnlyAClaimThatFitsThePlan) {
  ResyncPlan p = SomePlan();
  // 65536 + 1000 bytes: 1000 bytes into the second region.
  HelloStaged ok{40, true, 65536 + 1000, 0, (1 << 20) + 1000};
  EXPECT_TRUE(CheckStaged(p, ok, kDisks).ok());
  // At a region's end.
  EXPECT_TRUE(CheckStaged(p, {40, true, 65536, 0, 65536}, kDisks).ok());
  EXPECT_TRUE(CheckStaged(p, {40, true, p.total_bytes, 1, 4096}, kDisks).ok());
  // Another copy: not the peer's fault.
  EXPECT_EQ(CheckStaged(p, {41, true, 65536, 0, 65536}, kDisks).code(), Code::kFailedPrecondition);
  EXPECT_EQ(CheckStaged(p, {40, false, 65536, 0, 65536}, kDisks).code(), Code::kFailedPrecondition);
  // Claims that cannot be true of this copy.
  EXPECT_EQ(CheckStaged(p, {40, true, p.total_bytes + 1, 1, 4097}, kDisks).code(),
            Code::kInvalidArgument);
  EXPECT_EQ(CheckStaged(p, {40, true, 65536 + 1000, 0, (1 << 20) + 1001}, kDisks).code(),
            Code::kInvalidArgument);
  EXPECT_EQ(CheckStaged(p, {40, true, 65536 + 1000, 1, (1 << 20) + 1000}, kDisks).code(),
            Code::kInvalidArgument);
  EXPECT_EQ(CheckStaged(p, {40, true, 1000, 7, 1000}, kDisks).code(), Code::kInvalidArgument);
  EXPECT_EQ(CheckStaged(p, {40, true, 1000, 0, uint64_t{1} << 62}, kDisks).code(),
            Code::kInvalidArgument);
  EXPECT_EQ(CheckStaged(p, {40, true, 0, 0, 0}, kDisks).code(), Code::kInvalidArgument);
  // More than this site can have sent.
  p.sent_bytes_max = 65536;
  EXPECT_EQ(CheckStaged(p, ok, kDisks).code(), Code::kInvalidArgument);
}

TEST(DirtyBeforeCursorTest, OnlyTheCopiedPartsThatAreMarked) {
  ResyncPlan p = SomePlan();
  std::vector<DiskRange> dirty = {
      {0, {32768, 65536}},              // half in the first region, half past it
      {0, {(1 << 20) + 65536, 65536}},  // in the second region, past a cursor inside it
      {1, {0, 65536}},                  // disk b: not copied yet
  };
  auto again = DirtyBeforeCursor(p, 65536 + 70000, dirty);
  ASSERT_EQ(again.size(), 2u);
  EXPECT_EQ(again[0].disk, 0u);
  EXPECT_EQ(again[0].range, (capture::Range{32768, 32768}));
  EXPECT_EQ(again[1].range, (capture::Range{(1 << 20) + 65536, 70000 - 65536}));
  EXPECT_TRUE(DirtyBeforeCursor(p, 0, dirty).empty());
  auto all = DirtyBeforeCursor(p, p.total_bytes, dirty);
  ASSERT_EQ(all.size(), 3u);
  EXPECT_EQ(all[2].disk, 1u);
  EXPECT_EQ(all[2].range, (capture::Range{0, 4096}));
}

}  // namespace
}  // namespace osr::replication
