#include "store/failover_disk.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <random>
#include <thread>

#include "store/test_records.h"

namespace osr::store {
namespace {

namespace fs = std::filesystem;

std::vector<uint8_t> Record(uint64_t seq, uint64_t off, const std::vector<uint8_t>& data) {
  return testing::WriteRecord(seq, off, data);
}

class FailoverDiskTest : public ::testing::Test {
 protected:
  static constexpr uint64_t kSize = 1 << 20;
  static constexpr uint64_t kRegion = 64 * 1024;
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("osr-fodisk-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    store_ = RecoveryStore::Create(dir_ + "/store", {{"d0", kSize}}, 0).value();
    // Point 1: 100 KiB of 1s from 10000; then seq 2 (after the point) overwrites part.
    ASSERT_TRUE(store_->Append(Record(1, 10000, std::vector<uint8_t>(100000, 1))).ok());
    ASSERT_TRUE(store_->Append(Record(2, 500000, std::vector<uint8_t>(5000, 2))).ok());
    model_.assign(kSize, 0);
    std::fill(model_.begin() + 10000, model_.begin() + 110000, 1);
  }
  void TearDown() override {
    store_.reset();
    fs::remove_all(dir_);
  }
  void ExpectModel(FailoverDisk& d) {
    std::vector<uint8_t> got(kSize);
    ASSERT_TRUE(d.Read(0, got).ok());
    for (uint64_t i = 0; i < kSize; ++i) {
      if (got[i] != model_[i]) {
        FAIL() << "byte " << i << " is " << int(got[i]) << ", expected " << int(model_[i]);
      }
    }
  }
  void Write(FailoverDisk& d, uint64_t off, size_t len, uint8_t v) {
    ASSERT_TRUE(d.Write(off, std::vector<uint8_t>(len, v)).ok());
    std::fill(model_.begin() + off, model_.begin() + off + len, v);
  }
  std::string dir_;
  std::shared_ptr<RecoveryStore> store_;
  std::vector<uint8_t> model_;
};

TEST_F(FailoverDiskTest, ReadsThePointAndKeepsWritesAcrossReopen) {
  std::string img = dir_ + "/d0.img";
  {
    auto d = FailoverDisk::Open(img, store_, 0, 1, kRegion).value();
    ExpectModel(*d);                     // the point, not seq 2
    Write(*d, 5, 3, 7);                  // partial region: the rest comes from the point
    Write(*d, kRegion, kRegion, 8);      // exactly one region
    Write(*d, 3 * kRegion - 10, 20, 9);  // across two regions
    Write(*d, kSize - 100, 100, 4);      // the last region
    ASSERT_TRUE(d->Zero(20000, 1000, nbd::ZeroMode::kZeroMayTrim, false).ok());
    std::fill(model_.begin() + 20000, model_.begin() + 21000, 0);
    ExpectModel(*d);
    EXPECT_EQ(d->held_bytes(), 5 * kRegion);
    ASSERT_TRUE(d->Flush().ok());
    // The point's pin holds folding back.
    EXPECT_EQ(store_->Fold(2).value(), 1u);
  }
  auto d = FailoverDisk::Open(img, store_, 0, 1, kRegion).value();
  ExpectModel(*d);
  // A map made for another seq is refused.
  d.reset();
  EXPECT_EQ(FailoverDisk::Open(img, store_, 0, 2, kRegion).status().code(), Code::kCorruption);
}

TEST_F(FailoverDiskTest, AnImageWithoutItsMapIsRefused) {
  std::string img = dir_ + "/d0.img";
  { auto d = FailoverDisk::Open(img, store_, 0, 1, kRegion).value(); }
  fs::remove(img + ".cow");
  EXPECT_EQ(FailoverDisk::Open(img, store_, 0, 1, kRegion).status().code(), Code::kCorruption);
}

TEST_F(FailoverDiskTest, MaterialiseWhileWritingLosesNothing) {
  std::string img = dir_ + "/d0.img";
  auto d = FailoverDisk::Open(img, store_, 0, 1, kRegion).value();
  std::atomic<bool> stop{false};
  std::mt19937_64 rng(42);
  std::vector<std::tuple<uint64_t, size_t, uint8_t>> ops;
  for (int i = 0; i < 300; ++i) {
    size_t len = 1 + rng() % (2 * kRegion);
    uint64_t off = rng() % (kSize - len);
    ops.emplace_back(off, len, static_cast<uint8_t>(10 + i % 200));
  }
  std::thread writer([&] {
    for (auto [off, len, v] : ops) ASSERT_TRUE(d->Write(off, std::vector<uint8_t>(len, v)).ok());
  });
  uint64_t last_done = 0;
  ASSERT_TRUE(d->Materialise([&](uint64_t done, uint64_t) { last_done = done; }, stop).ok());
  writer.join();
  for (auto [off, len, v] : ops) std::fill(model_.begin() + off, model_.begin() + off + len, v);
  EXPECT_EQ(last_done, kSize);
  EXPECT_TRUE(d->materialised());
  EXPECT_TRUE(fs::exists(img + ".cow"));  // all held; the site removes it when recorded
  std::vector<nbd::Extent> ext;
  ASSERT_TRUE(d->BlockStatus(0, kSize, 1000, &ext).ok());
  uint64_t covered = 0;
  for (auto& e : ext) covered += e.length;
  EXPECT_EQ(covered, kSize);
  ExpectModel(*d);
  // The point is released: the store folds past it; the image alone holds the disk.
  EXPECT_EQ(store_->Fold(2).value(), 2u);
  d.reset();
  std::vector<uint8_t> raw(kSize);
  auto f = File::Open(img, File::Mode::kReadWrite).value();
  ASSERT_TRUE(f.PRead(0, raw).ok());
  EXPECT_TRUE(raw == model_);
}

TEST_F(FailoverDiskTest, OutOfRangeIsRefused) {
  auto d = FailoverDisk::Open(dir_ + "/d0.img", store_, 0, 1, kRegion).value();
  std::vector<uint8_t> b(10);
  EXPECT_FALSE(d->Read(kSize - 5, b).ok());
  EXPECT_FALSE(d->Write(kSize - 5, b).ok());
  EXPECT_FALSE(d->Zero(kSize, 1, nbd::ZeroMode::kTrim, false).ok());
  EXPECT_EQ(FailoverDisk::Open(dir_ + "/x.img", store_, 3, 1, kRegion).status().code(),
            Code::kNotFound);  // no disk 3 (at that seq or at all)
}

}  // namespace
}  // namespace osr::store
