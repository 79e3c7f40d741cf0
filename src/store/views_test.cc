#include "store/views.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include "store/test_records.h"

namespace osr::store {
namespace {

namespace fs = std::filesystem;

std::vector<uint8_t> Record(uint64_t seq, uint64_t off, const std::vector<uint8_t>& data) {
  return testing::WriteRecord(seq, off, data);
}

class ViewsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("osr-views-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    store_ = RecoveryStore::Create(dir_ + "/store", {{"d0", kSize}}, 0).value();
    ASSERT_TRUE(store_->Append(Record(1, 0, std::vector<uint8_t>(10000, 1))).ok());
    ASSERT_TRUE(store_->Append(Record(2, 5000, std::vector<uint8_t>(10000, 2))).ok());
  }
  void TearDown() override {
    store_.reset();
    fs::remove_all(dir_);
  }
  static constexpr uint64_t kSize = 1 << 20;
  std::string dir_;
  std::shared_ptr<RecoveryStore> store_;
};

TEST_F(ViewsTest, PointViewShowsItsSeqAndRefusesWrites) {
  auto v1 = PointView::Open(store_, 0, 1).value();
  auto v2 = PointView::Open(store_, 0, 2).value();
  std::vector<uint8_t> a(16000), b(16000);
  ASSERT_TRUE(v1->Read(0, a).ok());
  ASSERT_TRUE(v2->Read(0, b).ok());
  EXPECT_EQ(a[6000], 1);
  EXPECT_EQ(b[6000], 2);
  EXPECT_EQ(a[12000], 0);
  EXPECT_EQ(b[12000], 2);
  EXPECT_TRUE(v1->read_only());
  EXPECT_EQ(v1->Write(0, a).code(), Code::kPermissionDenied);
  EXPECT_FALSE(PointView::Open(store_, 0, 3).ok());  // not durable yet
  // The pin holds folding back to seq 1.
  EXPECT_EQ(store_->Fold(2).value(), 1u);
  v1.reset();
  v2.reset();
  EXPECT_EQ(store_->Fold(2).value(), 2u);
}

TEST_F(ViewsTest, OverlayTakesWritesWithoutTouchingTheStore) {
  std::string path = dir_ + "/overlay.img";
  auto drill = OverlayView::Open(store_, 0, 2, path).value();
  EXPECT_TRUE(fs::exists(path));
  // Unaligned, crossing blocks: the bytes around it keep the point's content.
  ASSERT_TRUE(drill->Write(4090, std::vector<uint8_t>(20, 9)).ok());
  ASSERT_TRUE(drill->Zero(9000, 100, nbd::ZeroMode::kZeroMayTrim, false).ok());
  std::vector<uint8_t> got(16000);
  ASSERT_TRUE(drill->Read(0, got).ok());
  EXPECT_EQ(got[4089], 1);
  EXPECT_EQ(got[4090], 9);
  EXPECT_EQ(got[4109], 9);
  EXPECT_EQ(got[4110], 1);
  EXPECT_EQ(got[8999], 2);
  EXPECT_EQ(got[9000], 0);
  EXPECT_EQ(got[9100], 2);
  EXPECT_EQ(drill->overlay_bytes(), 3 * 4096u);
  // Replication goes on underneath: the drill disk does not change.
  ASSERT_TRUE(store_->Append(Record(3, 0, std::vector<uint8_t>(16000, 3))).ok());
  std::vector<uint8_t> again(16000);
  ASSERT_TRUE(drill->Read(0, again).ok());
  EXPECT_EQ(again, got);
  // The store's own point is untouched by the drill's writes.
  auto plain = PointView::Open(store_, 0, 2).value();
  ASSERT_TRUE(plain->Read(0, again).ok());
  EXPECT_EQ(again[4090], 1);
  EXPECT_EQ(again[9000], 2);
  drill->Discard();
  drill.reset();
  EXPECT_FALSE(fs::exists(path));  // cleanup removes the overlay and its map
  EXPECT_FALSE(fs::exists(path + ".map"));
}

// Issue 10 case 5: a drill's overlay outlives its site's restart with every flushed write;
// a map that is not one is refused, never taken as "nothing written".
TEST_F(ViewsTest, OverlayReopensWithItsFlushedWrites) {
  std::string path = dir_ + "/overlay.img";
  std::vector<uint8_t> want(16000);
  {
    auto drill = OverlayView::Open(store_, 0, 2, path).value();
    ASSERT_TRUE(drill->Write(4090, std::vector<uint8_t>(20, 9)).ok());
    ASSERT_TRUE(drill->Flush().ok());
    ASSERT_TRUE(drill->Read(0, want).ok());
  }  // not discarded: kept for a restart
  ASSERT_TRUE(fs::exists(path) && fs::exists(path + ".map"));
  {
    auto drill = OverlayView::Open(store_, 0, 2, path, /*reopen=*/true).value();
    std::vector<uint8_t> got(16000);
    ASSERT_TRUE(drill->Read(0, got).ok());
    EXPECT_EQ(got, want);
    EXPECT_EQ(drill->overlay_bytes(), 2 * 4096u);
  }
  // Another seq's map, or bytes that are not a map: refused.
  auto other = OverlayView::Open(store_, 0, 1, path, /*reopen=*/true);
  ASSERT_FALSE(other.ok());
  EXPECT_EQ(other.status().code(), Code::kCorruption);
  std::string map = path + ".map";
  std::vector<char> bytes(fs::file_size(map));
  {
    std::ifstream in(map, std::ios::binary);
    in.read(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  bytes[bytes.size() / 2] ^= 1;
  {
    std::ofstream out(map, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  auto damaged = OverlayView::Open(store_, 0, 2, path, /*reopen=*/true);
  ASSERT_FALSE(damaged.ok());
  EXPECT_EQ(damaged.status().code(), Code::kCorruption);
  EXPECT_TRUE(fs::exists(path));  // a failed reopen leaves the files to the operator
  // The pin of a failed reopen is released: the store folds past it.
  EXPECT_EQ(store_->Fold(2).value(), 2u);
}

// A view's last holder may be an NBD thread that lets go after the site dropped the store:
// the view keeps the store (and so its pin's home) until it goes itself; the store's pins
// are what the site waits on before it deletes the files.
TEST_F(ViewsTest, AViewKeepsItsStoreUntilItGoes) {
  std::weak_ptr<RecoveryStore> weak = store_;
  auto view = PointView::Open(store_, 0, 2).value();
  auto drill = OverlayView::Open(store_, 0, 1, dir_ + "/late.overlay").value();
  EXPECT_EQ(store_->pin_count(), 2u);
  EXPECT_FALSE(store_->WaitUnpinned(std::chrono::milliseconds(1)));
  std::shared_ptr<RecoveryStore> site_ref = std::move(store_);  // the site's reference
  std::thread closer([&] { drill.reset(); });                   // a session's thread
  closer.join();
  EXPECT_EQ(site_ref->pin_count(), 1u);
  site_ref.reset();  // the site lets go first
  ASSERT_FALSE(weak.expired());
  std::vector<uint8_t> got(16000);
  ASSERT_TRUE(view->Read(0, got).ok());
  EXPECT_EQ(got[6000], 2);
  view.reset();  // the last holder: unpins, then the store goes
  EXPECT_TRUE(weak.expired());
}

}  // namespace
}  // namespace osr::store
