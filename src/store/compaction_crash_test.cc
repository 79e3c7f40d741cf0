// A compaction cut short (kill -9 or power loss) at each of its steps and at each of its
// sync points (issue 11: "restart in O(1) of retained history"; review 11b, finding 2):
// the store opens by undoing or finishing it in its own range of seqs, so what the open
// reads is a small part of the history kept before it, never all of it; afterwards every
// point it keeps reads byte-exact, and the next compaction works.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "common/file.h"
#include "store/recovery_store.h"
#include "store/test_churn.h"
#include "store/test_records.h"
#include "store/version_index.h"

namespace osr::store {
namespace {

namespace fs = std::filesystem;
using Step = RecoveryStore::CompactionStep;

constexpr uint64_t kBlock = 4096;

// 4 KiB writes at random 4 KiB-aligned offsets of one disk, and the disk at any seq.
struct Churn {
  uint64_t disk_bytes;
  uint64_t last;
  std::vector<uint64_t> offsets;            // offsets[seq - 1]
  std::vector<std::vector<uint8_t>> datas;  // datas[seq - 1]

  Churn(uint64_t disk, uint64_t records, uint32_t seed) : disk_bytes(disk), last(records) {
    std::mt19937 rng(seed);
    for (uint64_t seq = 1; seq <= records; ++seq) {
      offsets.push_back((rng() % (disk / kBlock)) * kBlock);
      std::vector<uint8_t> data(kBlock);
      for (auto& b : data) b = static_cast<uint8_t>(rng());
      datas.push_back(std::move(data));
    }
  }
  std::vector<uint8_t> Wire(uint64_t first, uint64_t end) const {  // seqs [first, end]
    std::vector<uint8_t> wire;
    for (uint64_t seq = first; seq <= end; ++seq) {
      auto r = testing::WriteRecord(seq, offsets[seq - 1], datas[seq - 1]);
      wire.insert(wire.end(), r.begin(), r.end());
    }
    return wire;
  }
  std::vector<uint8_t> State(uint64_t seq) const {
    std::vector<uint8_t> disk(disk_bytes, 0);
    for (uint64_t s = 1; s <= seq; ++s) {
      std::copy(datas[s - 1].begin(), datas[s - 1].end(), disk.begin() + offsets[s - 1]);
    }
    return disk;
  }
};

const char* StepName(Step s) {
  switch (s) {
    case Step::kMarked:
      return "marked";
    case Step::kWritten:
      return "written";
    case Step::kCommitted:
      return "committed";
    case Step::kDropped:
      return "dropped";
    case Step::kIndexed:
      return "indexed";
  }
  return "?";
}

class CompactionCrashTest : public ::testing::Test {
 protected:
  void SetUp() override {
    top_ = fs::temp_directory_path() / ("osr-compaction-crash-" + std::to_string(::getpid()));
    fs::remove_all(top_);
    fs::create_directories(top_);
    dir_ = top_ + "/store";
    options_.journal_segment_bytes = 256 << 10;  // ~62 records a segment
  }
  void TearDown() override {
    StopPowerLossRecorderForTest();
    fs::remove_all(top_);
  }

  // What one image opened as.
  struct Seen {
    std::string what;
    uint64_t compacted_through = 0;
    uint64_t history_bytes = 0;
    uint64_t read_bytes = 0;
  };

  // The store in `image` (its index copied in already), opened and checked; then compacted
  // again as the second compaction asked.
  void Verify(const std::string& image, const std::string& what) {
    const uint64_t before = testing::ReadCharBytes("/proc/thread-self/io");
    auto opened = RecoveryStore::Open(image, options_);
    const uint64_t read = testing::ReadCharBytes("/proc/thread-self/io") - before;
    ASSERT_TRUE(opened.ok()) << what << ": " << opened.status().ToString();
    auto& s = *opened;
    Seen seen{what, s->compacted_through(), testing::HistoryFilesBytes(image), read};
    seen_.push_back(seen);
    EXPECT_LT(read, clean_read_ + old_history_ / 4)
        << what << ": opening read " << read << " bytes, the history before the compaction is "
        << old_history_ << " bytes (a clean open reads " << clean_read_ << ")";
    const bool committed = seen.compacted_through != first_through_;
    // Every point the store keeps reads as the model says; points compacted away are
    // refused, never read wrong.
    std::set<uint64_t> points(kept_.begin(), kept_.end());
    points.insert(first_through_);
    for (uint64_t k : second_keep_) points.insert(k);
    for (uint64_t k : {uint64_t{10123}, uint64_t{11777}, h_.last - 1, h_.last}) points.insert(k);
    if (committed) points.insert(seen.compacted_through);
    std::vector<uint8_t> got(h_.disk_bytes);
    for (uint64_t k : points) {
      Status st = s->ReadAt(0, k, 0, got);
      const bool kept = k <= first_through_ || !committed || k >= seen.compacted_through ||
                        std::count(second_keep_.begin(), second_keep_.end(), k) != 0;
      if (!kept) {
        EXPECT_EQ(st.code(), Code::kOutOfRange) << what << ": seq " << k << ": " << st.ToString();
        continue;
      }
      ASSERT_TRUE(st.ok()) << what << ": seq " << k << ": " << st.ToString();
      EXPECT_TRUE(got == h_.State(k)) << what << ": seq " << k << " reads wrong bytes";
    }
    // The vault's next thinning: the same compaction again (ids of files undone are taken
    // again), then its points read right.
    auto again = s->Compact(second_keep_, h_.last);
    ASSERT_TRUE(again.ok()) << what << ": compacting again: " << again.status().ToString();
    for (uint64_t k : {second_keep_.back(), h_.last}) {
      ASSERT_TRUE(s->ReadAt(0, k, 0, got).ok());
      EXPECT_TRUE(got == h_.State(k)) << what << ": seq " << k << " after compacting again";
    }
  }

  // A kill now: the files as they are, the index as it is.
  void KillImage(const std::string& what) {
    const std::string image = fmt::format("{}/image-{}", top_, images_++);
    fs::create_directories(image);
    for (auto& e : fs::directory_iterator(dir_)) {
      if (e.path().filename() == "index") continue;
      fs::copy(e.path(), image / e.path().filename(), fs::copy_options::recursive);
    }
    ASSERT_TRUE(VersionIndex::CheckpointOpen(dir_ + "/index", image + "/index").ok());
    Verify(image, "kill at " + what);
    fs::remove_all(image);
  }

  // A power loss now: the files as last synced, the index as it is (RocksDB syncs its own
  // log: the compaction's index writes that matter are synced before the next step).
  void PowerLossImage(const std::string& what) {
    const std::string image = fmt::format("{}/image-{}", top_, images_++);
    ASSERT_TRUE(WritePowerLossImageForTest(image).ok());
    ASSERT_TRUE(VersionIndex::CheckpointOpen(dir_ + "/index", image + "/index").ok());
    Verify(image, "power loss at " + what);
    fs::remove_all(image);
  }

  std::string top_, dir_;
  StoreOptions options_;
  Churn h_{4 << 20, 12000, 17};
  std::vector<uint64_t> kept_;  // the first compaction's
  uint64_t first_through_ = 0;
  std::vector<uint64_t> second_keep_;
  uint64_t old_history_ = 0;  // history bytes before the second compaction
  uint64_t clean_read_ = 0;   // what opening after a clean stop reads
  std::vector<Seen> seen_;
  int images_ = 0;
};

TEST_F(CompactionCrashTest, ACompactionCutShortAtAnyStepOpensInItsOwnRangeAndReadsRight) {
  {
    auto s = RecoveryStore::Create(dir_, {{"a", h_.disk_bytes}}, 0, RecoveryStore::Start::kEmpty,
                                   {}, {}, options_);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    for (uint64_t first = 1; first <= h_.last; first += 256) {
      ASSERT_TRUE((*s)->Append(h_.Wire(first, std::min(first + 255, h_.last))).ok());
    }
    for (uint64_t k = 500; k < 10000; k += 500) kept_.push_back(k);
    auto r = (*s)->Compact(kept_, 10000);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    first_through_ = r->compacted_through;
  }
  old_history_ = testing::HistoryFilesBytes(dir_);
  ASSERT_GT(old_history_, uint64_t{16} << 20);
  {
    const uint64_t before = testing::ReadCharBytes("/proc/thread-self/io");
    auto s = RecoveryStore::Open(dir_, options_);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    clean_read_ = testing::ReadCharBytes("/proc/thread-self/io") - before;
  }
  // The second compaction: what the first kept stays, its end too; (E1, E2] is its range.
  second_keep_ = kept_;
  second_keep_.push_back(first_through_);
  for (uint64_t k : {10500, 11000, 11500}) second_keep_.push_back(k);

  auto s = RecoveryStore::Open(dir_, options_);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  std::vector<std::string> sync_points;
  StartPowerLossRecorderForTest({.root = dir_,
                                 .excluded = {"index"},
                                 .on_sync_point = [&](uint64_t k, const std::string& path) {
                                   PowerLossImage(fmt::format("sync point {} ({})", k, path));
                                 }});
  std::vector<Step> steps;
  (*s)->SetCompactionStepHookForTest([&](Step step) {
    steps.push_back(step);
    KillImage(StepName(step));
    PowerLossImage(StepName(step));
  });
  auto r = (*s)->Compact(second_keep_, h_.last);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  const uint64_t second_through = r->compacted_through;
  StopPowerLossRecorderForTest();  // before the close, whose syncs are no compaction's
  s->reset();
  EXPECT_EQ(steps, (std::vector<Step>{Step::kMarked, Step::kWritten, Step::kCommitted,
                                      Step::kDropped, Step::kIndexed}));
  ASSERT_GT(second_through, 11500u);

  // Every image opened either before the commit (the first compaction's history, whole:
  // the second one's files gone) or after it (the second one's end).
  bool seen_committed = false, seen_undone = false;
  for (const Seen& seen : seen_) {
    std::printf("%-60s opened with history through %llu, %llu history bytes, read %llu bytes\n",
                seen.what.c_str(), static_cast<unsigned long long>(seen.compacted_through),
                static_cast<unsigned long long>(seen.history_bytes),
                static_cast<unsigned long long>(seen.read_bytes));
    const bool after_commit = seen.what.ends_with(" committed") ||
                              seen.what.ends_with(" dropped") || seen.what.ends_with(" indexed");
    if (after_commit) {
      seen_committed = true;
      EXPECT_EQ(seen.compacted_through, second_through) << seen.what;
    } else {
      seen_undone = true;
      EXPECT_EQ(seen.compacted_through, first_through_) << seen.what;
      EXPECT_EQ(seen.history_bytes, old_history_) << seen.what << ": files of the undone one";
    }
  }
  EXPECT_TRUE(seen_committed && seen_undone);
  EXPECT_GE(seen_.size(), 10u + 3u);  // both images of 5 steps, a sync point per file and more
  std::printf("history before the second compaction: %llu bytes; a clean open reads %llu\n",
              static_cast<unsigned long long>(old_history_),
              static_cast<unsigned long long>(clean_read_));
}

}  // namespace
}  // namespace osr::store
