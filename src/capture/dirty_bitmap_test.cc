#include "capture/dirty_bitmap.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>

namespace osr::capture {
namespace {

namespace fs = std::filesystem;

class DirtyBitmapTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = fs::temp_directory_path() /
            ("osr-bitmap-" + std::to_string(::getpid()) + "-" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove(path_);
  }
  void TearDown() override { fs::remove(path_); }
  std::string path_;
};

constexpr uint64_t kDisk = 10 * 65536 + 100;  // the last region is short

TEST_F(DirtyBitmapTest, PendingWritesMarkRegionsUntilReleased) {
  auto b = DirtyBitmap::Open(path_, kDisk, 65536).value();
  EXPECT_TRUE(b->DirtyRanges().empty());
  b->Acquire(65536 + 10, 65536);  // regions 1 and 2
  EXPECT_EQ(b->DirtyRanges(), (std::vector<Range>{{65536, 2 * 65536}}));
  b->Acquire(2 * 65536, 1);  // region 2 again
  b->Release(65536 + 10, 65536, true);
  EXPECT_EQ(b->DirtyRanges(), (std::vector<Range>{{2 * 65536, 65536}}));
  b->Release(2 * 65536, 1, true);
  EXPECT_TRUE(b->DirtyRanges().empty());
  b->Acquire(kDisk - 1, 1);
  EXPECT_EQ(b->DirtyRanges(), (std::vector<Range>{{10 * 65536, 100}}));
}

TEST_F(DirtyBitmapTest, WhatAProcessCrashLeavesIsStickyAfterReopen) {
  {
    auto b = DirtyBitmap::Open(path_, kDisk, 65536).value();
    b->Acquire(0, 1);  // in flight when the process "dies"
    b->Acquire(5 * 65536, 1);
    b->Release(5 * 65536, 1, true);
    // No CloseClean: the destructor only unmaps, as a killed process would.
  }
  uint64_t region = 0;
  auto on_disk = DirtyBitmap::ReadDirty(path_, &region).value();
  EXPECT_EQ(region, 65536u);
  EXPECT_EQ(on_disk, (std::vector<Range>{{0, 65536}}));
  auto b = DirtyBitmap::Open(path_, kDisk, 65536).value();
  EXPECT_FALSE(b->opened_after_host_crash());  // same boot
  EXPECT_EQ(b->DirtyRanges(), (std::vector<Range>{{0, 65536}}));
  b->Acquire(0, 10);
  b->Release(0, 10, true);  // a later logged write does not clear a crash's mark
  EXPECT_EQ(b->DirtyRanges(), (std::vector<Range>{{0, 65536}}));
  b->Clean(0, 65536);
  EXPECT_TRUE(b->DirtyRanges().empty());
}

TEST_F(DirtyBitmapTest, UnloggedWritesStaySticky) {
  auto b = DirtyBitmap::Open(path_, kDisk, 65536).value();
  b->Acquire(3 * 65536, 10);
  b->Release(3 * 65536, 10, /*logged=*/false);
  EXPECT_EQ(b->DirtyRanges(), (std::vector<Range>{{3 * 65536, 65536}}));
  ASSERT_TRUE(b->CloseClean().ok());
  b.reset();
  EXPECT_EQ(DirtyBitmap::ReadDirty(path_, nullptr).value(),
            (std::vector<Range>{{3 * 65536, 65536}}));
}

// A disk that grows (issue 13): its marks stay, its new regions start clean, and the file
// opens again at the new size (and, after a crash between the image's grow and the
// bitmap's, at a larger size than it names).
TEST_F(DirtyBitmapTest, GrowsKeepingItsMarks) {
  {
    auto b = DirtyBitmap::Open(path_, kDisk, 65536).value();
    b->MarkSticky(65536, 1);
    ASSERT_TRUE(b->Grow(kDisk * 4).ok());
    EXPECT_FALSE(b->Grow(kDisk).ok());
    b->MarkSticky(kDisk * 3, 4096);
    auto dirty = b->DirtyRanges();
    ASSERT_EQ(dirty.size(), 2u);
    EXPECT_EQ(dirty[0].offset, 65536u);
    EXPECT_EQ(dirty[1].offset, kDisk * 3 / 65536 * 65536);  // its region
  }
  {
    auto b = DirtyBitmap::Open(path_, kDisk * 4, 65536).value();
    EXPECT_EQ(b->DirtyRanges().size(), 2u);
  }
  auto b = DirtyBitmap::Open(path_, kDisk * 8, 65536).value();
  EXPECT_EQ(b->DirtyRanges().size(), 2u);
}

TEST_F(DirtyBitmapTest, RefusesWrongDiskSizeBadRegionSizeAndGarbage) {
  { auto b = DirtyBitmap::Open(path_, kDisk, 65536).value(); }
  EXPECT_FALSE(DirtyBitmap::Open(path_, kDisk / 2, 65536).ok());  // a disk never shrinks
  EXPECT_FALSE(DirtyBitmap::Open(path_ + ".x", kDisk, 1000).ok());
  {
    std::FILE* f = std::fopen(path_.c_str(), "r+b");
    std::fputc('X', f);  // break the magic
    std::fclose(f);
  }
  auto b = DirtyBitmap::Open(path_, kDisk, 65536);
  EXPECT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), Code::kCorruption);
}

}  // namespace
}  // namespace osr::capture
