#include "capture/captured_disk.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "capture/log_reader.h"
#include "capture/replay.h"

namespace osr::capture {
namespace {

namespace fs = std::filesystem;

std::vector<uint8_t> ReadAll(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {});
}

class CapturedDiskTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("osr-capdisk-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::unique_ptr<CapturedDisk> Open(uint64_t size) {
    auto img = nbd::FileDisk::Open(dir_ + "/disk.img", false, size);
    EXPECT_TRUE(img.ok()) << img.status().ToString();
    CaptureOptions o;
    o.dir = dir_ + "/cap";
    o.segment_bytes_target = 1 << 20;  // several segments
    auto d = CapturedDisk::Open(std::move(img).value(), o);
    EXPECT_TRUE(d.ok()) << d.status().ToString();
    return std::move(d).value();
  }
  std::string dir_;
};

// Invariant 1: concurrent, overlapping writes, trims and zeroes from several threads;
// replaying the log onto the starting image gives the served image byte for byte.
TEST_F(CapturedDiskTest, ConcurrentOverlappingWritesReplayToTheImage) {
  constexpr uint64_t kSize = 4 << 20;
  {
    std::vector<uint8_t> base(kSize);
    std::mt19937 rng(1);
    for (auto& b : base) b = static_cast<uint8_t>(rng());
    std::ofstream(dir_ + "/base.img", std::ios::binary)
        .write(reinterpret_cast<char*>(base.data()), kSize);
    fs::copy_file(dir_ + "/base.img", dir_ + "/disk.img");
  }
  auto disk = Open(kSize);
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
  EXPECT_EQ(disk->log().last_seq(), 1600u);
  ASSERT_TRUE(disk->Close().ok());
  EXPECT_TRUE(disk->bitmap().DirtyRanges().empty());
  disk.reset();

  auto r = Replay(dir_ + "/cap", dir_ + "/base.img", dir_ + "/replay.img", UINT64_MAX);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->records, 1600u);
  EXPECT_EQ(r->last_seq, 1600u);
  EXPECT_TRUE(ReadAll(dir_ + "/replay.img") == ReadAll(dir_ + "/disk.img"));
}

TEST_F(CapturedDiskTest, ReplayUptoGivesEachPrefix) {
  constexpr uint64_t kSize = 1 << 20;
  auto disk = Open(kSize);
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
  ASSERT_TRUE(disk->Close().ok());
  disk.reset();
  for (uint64_t upto = 0; upto <= 6; ++upto) {
    auto out = dir_ + "/r" + std::to_string(upto) + ".img";
    auto r = Replay(dir_ + "/cap", dir_ + "/base.img", out, upto);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(ReadAll(out), states[upto]) << "upto " << upto;
  }
  auto r = Replay(dir_ + "/cap", dir_ + "/base.img", dir_ + "/r9.img", 9);
  EXPECT_EQ(r.status().code(), Code::kOutOfRange);  // the log ends at 6
}

TEST_F(CapturedDiskTest, ReopenContinuesTheSequence) {
  {
    auto disk = Open(1 << 20);
    ASSERT_TRUE(disk->Write(0, std::vector<uint8_t>(10, 1)).ok());
  }  // destructor closes cleanly
  auto disk = Open(1 << 20);
  ASSERT_TRUE(disk->Write(0, std::vector<uint8_t>(10, 2)).ok());
  ASSERT_TRUE(disk->Flush().ok());
  EXPECT_EQ(disk->log().last_seq(), 2u);
}

}  // namespace
}  // namespace osr::capture
