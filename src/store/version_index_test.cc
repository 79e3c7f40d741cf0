#include "store/version_index.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <random>

namespace osr::store {
namespace {

namespace fs = std::filesystem;

class VersionIndexTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("osr-index-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string dir_;
};

constexpr uint64_t kDiskBytes = 1 << 20;  // 16 chunks

// The model: for every byte, the seq of the newest record with from < seq <= upto that
// wrote it (0: none), found by brute force over all records.
std::vector<uint64_t> Newest(const std::vector<RecordRef>& all, uint32_t disk, uint64_t off,
                             uint64_t len, uint64_t from, uint64_t upto) {
  std::vector<uint64_t> owner(len, 0);
  for (const RecordRef& r : all) {
    if (r.disk != disk || r.seq <= from || r.seq > upto || r.length == 0) continue;
    uint64_t a = std::max(off, r.offset), b = std::min(off + len, r.offset + r.length);
    for (uint64_t p = a; p < b; ++p) owner[p - off] = std::max(owner[p - off], r.seq);
  }
  return owner;
}

// What Collect says, in the same form; parts that overlap are a failure.
std::vector<uint64_t> Collected(const VersionIndex& ix, uint32_t disk, uint64_t off, uint64_t len,
                                uint64_t from, uint64_t upto) {
  std::vector<ReadPart> parts;
  Status st = ix.Collect(disk, off, len, from, upto, &parts);
  EXPECT_TRUE(st.ok()) << st.ToString();
  std::vector<uint64_t> owner(len, 0);
  for (const ReadPart& p : parts) {
    EXPECT_GE(p.offset, p.record.offset);
    EXPECT_LE(p.offset + p.length, p.record.offset + p.record.length);
    EXPECT_EQ(p.record.disk, disk);
    for (uint64_t b = p.offset; b < p.offset + p.length; ++b) {
      EXPECT_EQ(owner[b - off], 0u) << "two parts give byte " << b;
      owner[b - off] = p.record.seq;
    }
  }
  return owner;
}

std::vector<RecordRef> RandomHistory(std::mt19937* rng, uint64_t first_seq, int n) {
  std::vector<RecordRef> out;
  for (int i = 0; i < n; ++i) {
    RecordRef r;
    r.seq = first_seq + i;
    r.disk = (*rng)() % 2;
    // Mostly small writes, some spanning several chunks, some marks (length 0).
    int kind = static_cast<int>((*rng)() % 10);
    r.length = kind == 0 ? 0 : kind < 8 ? 512 + (*rng)() % 8192 : 1 + (*rng)() % 300000;
    r.offset = r.length == 0 ? 0 : (*rng)() % (kDiskBytes - r.length);
    r.kind = (*rng)() % 6 == 0 ? capture::RecordKind::kZero : capture::RecordKind::kWrite;
    r.segment_first_seq = first_seq;
    r.payload_pos = 64 + i * 100;
    out.push_back(r);
  }
  return out;
}

void CheckAgainstModel(const VersionIndex& ix, const std::vector<RecordRef>& all, uint64_t base,
                       uint64_t last, std::mt19937* rng, int probes) {
  for (int i = 0; i < probes; ++i) {
    uint32_t disk = (*rng)() % 2;
    uint64_t len = 1 + (*rng)() % 200000;
    uint64_t off = (*rng)() % (kDiskBytes - len);
    uint64_t upto = base + 1 + (*rng)() % (last - base);
    auto want = Newest(all, disk, off, len, base, upto);
    auto got = Collected(ix, disk, off, len, base, upto);
    ASSERT_EQ(got, want) << "disk " << disk << " [" << off << ", +" << len << ") at seq " << upto;
  }
}

// Every read of a random history gives each byte its newest version, as the model says,
// across drops at both ends and a reopen.
TEST_F(VersionIndexTest, EachByteGetsItsNewestVersionLikeTheModel) {
  std::mt19937 rng(11);
  auto all = RandomHistory(&rng, 1, 600);
  {
    auto ix = VersionIndex::Open(dir_);
    ASSERT_TRUE(ix.ok()) << ix.status().ToString();
    EXPECT_EQ((*ix)->indexed_through(), 0u);
    for (size_t i = 0; i < all.size(); i += 50) {
      size_t n = std::min<size_t>(50, all.size() - i);
      ASSERT_TRUE((*ix)->Add(std::span(all).subspan(i, n)).ok());
    }
    EXPECT_EQ((*ix)->indexed_through(), 600u);
    CheckAgainstModel(**ix, all, 0, 600, &rng, 150);
    // A read at one seq from a later base: nothing at or below the base.
    EXPECT_EQ(Collected(**ix, 0, 0, kDiskBytes, 300, 300), std::vector<uint64_t>(kDiskBytes, 0));
  }
  // Reopened: the same answers.
  auto ix = VersionIndex::Open(dir_).value();
  EXPECT_EQ(ix->indexed_through(), 600u);
  CheckAgainstModel(*ix, all, 0, 600, &rng, 50);

  // Folded up to 250: what is left reads the same from there on.
  ASSERT_TRUE(ix->DropUpTo(250).ok());
  std::vector<RecordRef> left;
  for (auto& r : all) {
    if (r.seq > 250) left.push_back(r);
  }
  CheckAgainstModel(*ix, left, 250, 600, &rng, 80);
  uint64_t seen = 0;
  ASSERT_TRUE(ix->ForEachBySeq(0, UINT64_MAX, [&](const RecordRef& r) {
                  EXPECT_GT(r.seq, 250u);
                  ++seen;
                  return true;
                }).ok());
  EXPECT_EQ(seen, std::count_if(left.begin(), left.end(),
                                [](const RecordRef& r) { return r.length != 0; }));

  // An append undone after 480: later records are gone, and others take their seqs.
  ASSERT_TRUE(ix->DropAfter(480).ok());
  EXPECT_EQ(ix->indexed_through(), 480u);
  left.erase(std::remove_if(left.begin(), left.end(), [](auto& r) { return r.seq > 480; }),
             left.end());
  auto again = RandomHistory(&rng, 481, 100);
  ASSERT_TRUE(ix->Add(again).ok());
  left.insert(left.end(), again.begin(), again.end());
  CheckAgainstModel(*ix, left, 250, 580, &rng, 80);

  // Cleared for a new journal: empty, and says so across a reopen.
  ASSERT_TRUE(ix->Clear(900, 77).ok());
  ix.reset();
  ix = VersionIndex::Open(dir_).value();
  EXPECT_EQ(ix->indexed_through(), 900u);
  EXPECT_EQ(ix->journal_id(), 77u);
  EXPECT_EQ(Collected(*ix, 1, 0, kDiskBytes, 0, 2000), std::vector<uint64_t>(kDiskBytes, 0));
}

// The process's index memory is the cache it was given, whatever the index holds.
// The compaction under way survives a reopen as written, ends with the history id it
// sets (one batch), and goes with a Clear.
TEST_F(VersionIndexTest, TheCompactionUnderWayIsKeptUntilItEnds) {
  const VersionIndex::PendingCompaction p{.old_history_id = 7,
                                          .new_history_id = 0xfedcba9876543210,
                                          .lo = 100,
                                          .e = 2000,
                                          .first_file = 42,
                                          .written = true};
  {
    auto ix = VersionIndex::Open(dir_).value();
    EXPECT_FALSE(ix->pending_compaction().has_value());
    ASSERT_TRUE(ix->SetHistoryId(7).ok());
    ASSERT_TRUE(ix->SetPendingCompaction(p).ok());
  }
  {
    auto ix = VersionIndex::Open(dir_).value();
    auto got = ix->pending_compaction();
    ASSERT_TRUE(got.has_value());
    EXPECT_EQ(got->old_history_id, 7u);
    EXPECT_EQ(got->new_history_id, 0xfedcba9876543210u);
    EXPECT_EQ(got->lo, 100u);
    EXPECT_EQ(got->e, 2000u);
    EXPECT_EQ(got->first_file, 42u);
    EXPECT_TRUE(got->written);
    EXPECT_EQ(ix->history_id(), 7u);
    ASSERT_TRUE(ix->EndPendingCompaction(p.new_history_id).ok());
    EXPECT_FALSE(ix->pending_compaction().has_value());
    EXPECT_EQ(ix->history_id(), p.new_history_id);
    ASSERT_TRUE(ix->SetPendingCompaction(p).ok());
  }
  {
    auto ix = VersionIndex::Open(dir_).value();
    EXPECT_TRUE(ix->pending_compaction().has_value());
    EXPECT_EQ(ix->history_id(), p.new_history_id);
    ASSERT_TRUE(ix->Clear(0, 5).ok());
    EXPECT_FALSE(ix->pending_compaction().has_value());
  }
  auto ix = VersionIndex::Open(dir_).value();
  EXPECT_FALSE(ix->pending_compaction().has_value());
  EXPECT_EQ(ix->history_id(), 0u);
}

TEST_F(VersionIndexTest, MemoryIsTheConfiguredCache) {
  VersionIndex::SetCacheBytes(16 << 20);
  auto ix = VersionIndex::Open(dir_).value();
  std::mt19937 rng(5);
  for (int b = 0; b < 40; ++b) {
    auto recs = RandomHistory(&rng, 1 + b * 5000, 5000);
    ASSERT_TRUE(ix->Add(recs).ok());
  }
  EXPECT_LE(VersionIndex::CacheUsageBytes(), uint64_t{16 << 20} + (1 << 20));
  VersionIndex::SetCacheBytes(VersionIndex::kCacheBytesDefault);
}

}  // namespace
}  // namespace osr::store
