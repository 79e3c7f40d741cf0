// Review of issue 11 (reviewer 11): reproductions of faults in history compaction.
// Each test states what should hold; a failing test is a finding (see the review report).
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "store/recovery_store.h"
#include "store/test_churn.h"
#include "store/test_records.h"
#include "store/version_index.h"

namespace osr::store {
namespace {

namespace fs = std::filesystem;

constexpr uint64_t kBlock = 4096;

using testing::Churn;

std::string TempDir(const char* name) {
  return fs::temp_directory_path() /
         (std::string("osr-review11-") + name + "-" + std::to_string(::getpid()));
}

nlohmann::json ReadJson(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

// F1. A compaction that fails while it writes its history files must change nothing
// ("the file system's errors (nothing changes then)"). It leaves kept_/compacted_through_
// changed in memory: seqs still in the journal are refused, and a retry (or any later
// WriteMeta) persists a compacted_through that no history file covers, so the next open
// deletes journal segments that kept points and the newest seqs still need.
TEST(Review11, AFailedCompactionChangesNothing) {
  const std::string dir = TempDir("failed");
  fs::remove_all(dir);
  StoreOptions small;
  small.journal_segment_bytes = 256 << 10;
  Churn h(1 << 20, 1200, {100, 200, 300, 600, 900});
  {
    auto store = RecoveryStore::Create(dir, {{"a", h.disk_bytes}}, 0, RecoveryStore::Start::kEmpty,
                                       {}, {}, small)
                     .value();
    for (auto& b : h.batches) ASSERT_TRUE(store->Append(b).ok());
    // A first compaction that works.
    auto r1 = store->Compact({100, 200, 300}, 400);
    ASSERT_TRUE(r1.ok()) << r1.status().ToString();
    EXPECT_EQ(h.Check(*store, 200), "");
    // The second one cannot write its history file (an I/O error, as ENOSPC would).
    uint64_t next = ReadJson(dir + "/store.json")["compaction"]["next_file"].get<uint64_t>();
    fs::create_directories(HistoryPath(dir, next));
    std::ofstream(HistoryPath(dir, next) + "/x") << "x";
    auto r2 = store->Compact({100, 600, 900}, 1100);
    ASSERT_FALSE(r2.ok());
    // Nothing changed: seq 200 (kept before) and seq 650 (still in the journal) read.
    EXPECT_EQ(h.Check(*store, 200), "") << "a failed compaction took away a kept point";
    // A retry of the same compaction (as the vault does after each thinning).
    fs::remove_all(HistoryPath(dir, next));
    auto r3 = store->Compact({100, 600, 900}, 1100);
    ASSERT_TRUE(r3.ok()) << r3.status().ToString();
    EXPECT_LT(r3->bytes_after, r3->bytes_before) << "the retry compacted nothing";
  }
  auto store = RecoveryStore::Open(dir, small);
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  for (uint64_t k : {100, 600, 900, 1200}) {
    EXPECT_EQ(h.Check(**store, k), "") << "after reopen";
  }
  store->reset();
  fs::remove_all(dir);
}

// F2. kill -9 during the FIRST compaction of a store (history_id 0 in both store.json and
// the index): the index keeps the history entries WriteHistory added, store.json names no
// history, so open neither re-indexes nor notices; it deletes the unnamed history files,
// and reads of every seq at or after the first kept point then fail (the newest too); the
// next compaction reuses the same file ids, and the stale entries then read the new files
// at the old positions: wrong bytes.
//
// The child (below, run only by this test) compacts; this process kills it with SIGKILL
// once the second history file exists, i.e. mid-compaction, before its commit.
TEST(Review11, DISABLED_CompactChild) {
  const char* dir = std::getenv("OSR_REVIEW11_DIR");
  ASSERT_NE(dir, nullptr);
  StoreOptions small;
  small.journal_segment_bytes = 1 << 20;
  auto store = RecoveryStore::Open(dir, small).value();
  std::vector<uint64_t> keep;
  for (uint64_t k = 100; k < 6000; k += 100) keep.push_back(k);
  auto r = store->Compact(keep, 6000);
  std::printf("child: compaction finished: %s\n", r.status().ToString().c_str());
}

TEST(Review11, KillDuringFirstCompactionThenOpenAndCompactAgain) {
  const std::string dir = TempDir("kill");
  fs::remove_all(dir);
  StoreOptions small;
  small.journal_segment_bytes = 1 << 20;
  Churn h(4 << 20, 6500, {150, 1000, 3000});
  {
    auto store = RecoveryStore::Create(dir, {{"a", h.disk_bytes}}, 0, RecoveryStore::Start::kEmpty,
                                       {}, {}, small)
                     .value();
    for (auto& b : h.batches) ASSERT_TRUE(store->Append(b).ok());
    ASSERT_EQ(h.Check(*store, h.last), "");
  }
  pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::setenv("OSR_REVIEW11_DIR", dir.c_str(), 1);
    execl("/proc/self/exe", "unit_tests", "--gtest_also_run_disabled_tests",
          "--gtest_filter=Review11.DISABLED_CompactChild", nullptr);
    _exit(127);
  }
  const std::string second = HistoryPath(dir, 3);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!fs::exists(second) && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  ::kill(child, SIGKILL);
  int ws = 0;
  ::waitpid(child, &ws, 0);
  ASSERT_TRUE(fs::exists(second)) << "the child never reached its third history file";
  ASSERT_TRUE(ReadJson(dir + "/store.json")["compaction"].is_null())
      << "killed after the commit: the test did not hit the window";
  {
    auto store = RecoveryStore::Open(dir, small);
    ASSERT_TRUE(store.ok()) << store.status().ToString();
    // Nothing was compacted: every seq of the journal reads as it did.
    EXPECT_EQ(h.Check(**store, h.last), "") << "the newest seq after a kill mid-compaction";
    EXPECT_EQ(h.Check(**store, 150), "") << "an old seq after a kill mid-compaction";
    // The next compaction (the vault's next thinning).
    auto r = (*store)->Compact({1000, 3000}, 6000);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(h.Check(**store, 3000), "") << "kept point after the second compaction";
    EXPECT_EQ(h.Check(**store, h.last), "") << "newest seq after the second compaction";
  }
  fs::remove_all(dir);
}

}  // namespace
}  // namespace osr::store

namespace osr::store {
namespace {

// A compacted store in `dir` (kept 100, 300; compacted through a segment end past 600).
struct Compacted {
  std::string dir;
  StoreOptions small;
  Churn h{1 << 20, 1200, {100, 300, 1000}};
  uint64_t e = 0;
  explicit Compacted(const char* name) : dir(TempDir(name)) {
    fs::remove_all(dir);
    small.journal_segment_bytes = 256 << 10;
    auto store = RecoveryStore::Create(dir, {{"a", h.disk_bytes}}, 0, RecoveryStore::Start::kEmpty,
                                       {}, {}, small)
                     .value();
    for (auto& b : h.batches) EXPECT_TRUE(store->Append(b).ok());
    e = store->Compact({100, 300}, 900).value().compacted_through;
  }
  ~Compacted() { fs::remove_all(dir); }
  // Opens; when it opens, every point it serves reads right (or is refused).
  std::string OpenAndCheck() {
    auto s = RecoveryStore::Open(dir, small);
    if (!s.ok()) return "open: " + s.status().ToString();
    std::string out;
    for (uint64_t k : {uint64_t{100}, uint64_t{300}, uint64_t{1000}, uint64_t{1200}}) {
      std::vector<uint8_t> got(h.disk_bytes);
      Status st = (*s)->ReadAt(0, k, 0, got);
      if (!st.ok()) {
        out += fmt::format("[{}: {}] ", k, st.ToString());
      } else if (got != h.states.at(k)) {
        out += fmt::format("[{}: WRONG BYTES] ", k);
      }
    }
    return out.empty() ? "ok" : out;
  }
  void EditMeta(const std::function<void(nlohmann::json&)>& fn) {
    auto j = ReadJson(dir + "/store.json");
    fn(j);
    std::ofstream(dir + "/store.json") << j.dump(1);
  }
};

TEST(Review11, HandEditedStoreJsonDamagedHistoryOrIndex) {
  {
    Compacted c("edit-files");
    c.EditMeta([](nlohmann::json& j) { j["compaction"]["files"] = {{999, 100}}; });
    std::string got = c.OpenAndCheck();
    std::printf("compaction.files names a file that does not exist: %s\n", got.c_str());
    EXPECT_EQ(got.find("WRONG"), std::string::npos);
    // A second open: the real history files are gone by now?
    std::printf("  history files left: %zu\n",
                static_cast<size_t>(std::distance(fs::directory_iterator(c.dir + "/history"),
                                                  fs::directory_iterator())));
  }
  {
    Compacted c("edit-through");
    c.EditMeta([](nlohmann::json& j) { j["compaction"]["through"] = 1199; });
    std::string got = c.OpenAndCheck();
    std::printf("compaction.through raised to 1199: %s\n", got.c_str());
    EXPECT_EQ(got.find("WRONG"), std::string::npos);
  }
  {
    Compacted c("edit-types");
    c.EditMeta([](nlohmann::json& j) { j["compaction"]["kept"] = "x"; });
    std::printf("compaction.kept a string: %s\n", c.OpenAndCheck().c_str());
    c.EditMeta([](nlohmann::json& j) { j["compaction"] = 5; });
    std::printf("compaction a number: %s\n", c.OpenAndCheck().c_str());
    c.EditMeta([](nlohmann::json& j) { j["folding_to"] = "x"; });
    std::printf("folding_to a string: %s\n", c.OpenAndCheck().c_str());
  }
  {
    Compacted c("edit-folding");
    c.EditMeta([](nlohmann::json& j) { j["folding_to"] = 5000; });
    std::string got = c.OpenAndCheck();
    std::printf("folding_to beyond the journal: %s\n", got.c_str());
    EXPECT_EQ(got.find("WRONG"), std::string::npos);
  }
  {
    Compacted c("edit-folding-mid");
    c.EditMeta([](nlohmann::json& j) { j["folding_to"] = 200; });
    std::string got = c.OpenAndCheck();
    std::printf("folding_to between kept points: %s\n", got.c_str());
    // Refused: a base labelled 200 would serve seq 200 (compacted away) as the state of 100.
    EXPECT_EQ(RecoveryStore::Open(c.dir, c.small).status().code(), Code::kCorruption);
  }
  {
    Compacted c("damaged-index");
    for (auto& f : fs::directory_iterator(c.dir + "/index")) {
      if (f.path().filename().string().rfind("MANIFEST", 0) == 0) {
        std::ofstream(f.path(), std::ios::trunc) << "junk";
      }
    }
    std::printf("index MANIFEST damaged: %s\n", c.OpenAndCheck().c_str());
  }
  {
    Compacted c("damaged-index2");
    std::ofstream(c.dir + "/index/CURRENT", std::ios::trunc) << "nonsense\n";
    std::printf("index CURRENT damaged: %s\n", c.OpenAndCheck().c_str());
    fs::remove_all(c.dir + "/index");
    std::ofstream(c.dir + "/index") << "a file";
    std::printf("index a regular file: %s\n", c.OpenAndCheck().c_str());
  }
}

// DISABLED, still missing: reads do not check a payload's CRC (history files, like the
// journal), so damaged bytes in a history file are served as data.
// Damaged bytes in a history file or in an older journal segment (neither is read whole at
// open) are refused when read, naming the file; never served as data, and a compaction
// that would copy them fails and changes nothing.
TEST(Review11, DamagedHistoryIsNotServedAsData) {
  Compacted c("damaged-hist");
  for (auto& f : fs::directory_iterator(c.dir + "/history")) {
    std::fstream io(f.path(), std::ios::in | std::ios::out | std::ios::binary);
    io.seekp(200);
    io.write("garbage!garbage!", 16);
  }
  std::string got = c.OpenAndCheck();
  EXPECT_EQ(got.find("WRONG"), std::string::npos) << "damaged history served as data: " << got;
  EXPECT_NE(got.find("history file"), std::string::npos) << got;
  EXPECT_NE(got.find("CRC"), std::string::npos) << got;
  // The index made again from the history files: open reads them whole and refuses.
  fs::remove_all(c.dir + "/index");
  got = c.OpenAndCheck();
  EXPECT_EQ(got.find("WRONG"), std::string::npos) << got;
}

TEST(Review11, ADamagedOlderJournalSegmentIsRefusedAndNotCompacted) {
  const std::string dir = TempDir("damaged-journal");
  fs::remove_all(dir);
  StoreOptions small;
  small.journal_segment_bytes = 256 << 10;
  Churn h{1 << 20, 1200, {100, 300, 1000}};
  {
    auto s = RecoveryStore::Create(dir, {{"a", h.disk_bytes}}, 0, RecoveryStore::Start::kEmpty, {},
                                   {}, small)
                 .value();
    for (auto& b : h.batches) ASSERT_TRUE(s->Append(b).ok());
  }
  // One payload byte of the first segment's 10th record (seq 10): headers stay valid.
  std::vector<fs::path> segs;
  for (auto& f : fs::directory_iterator(dir + "/journal")) segs.push_back(f.path());
  std::sort(segs.begin(), segs.end());
  ASSERT_GE(segs.size(), 3u);
  {
    std::fstream io(segs[0], std::ios::in | std::ios::out | std::ios::binary);
    const std::streamoff pos = 64 + 9 * (64 + kBlock) + 64 + 100;
    io.seekg(pos);
    char b = 0;
    io.read(&b, 1);
    b = static_cast<char>(b ^ 0x5a);
    io.seekp(pos);
    io.write(&b, 1);
  }
  auto s = RecoveryStore::Open(dir, small);
  ASSERT_TRUE(s.ok()) << s.status().ToString();  // open reads the last segment only
  // Seq 10's record is visible at seq 10..(its block's next write): refused there.
  std::string got = h.Check(**s, 100);
  std::vector<uint8_t> one(h.disk_bytes);
  Status st = (*s)->ReadAt(0, 10, 0, one);
  EXPECT_EQ(st.code(), Code::kCorruption) << st.ToString();
  EXPECT_NE(st.message().find("seq 10 in journal segment 1"), std::string::npos) << st.ToString();
  EXPECT_NE(st.message().find("CRC"), std::string::npos) << st.ToString();
  // Asked again (the record is not taken as checked): still refused, counted once.
  EXPECT_EQ((*s)->ReadAt(0, 10, 0, one).code(), Code::kCorruption);
  EXPECT_EQ((*s)->damaged_records(), 1u);
  // The newest state reads right wherever that record is overwritten; every read either
  // is right or is refused, never wrong bytes.
  for (uint64_t k : {uint64_t{100}, uint64_t{300}, uint64_t{1000}, uint64_t{1200}}) {
    got = h.Check(**s, k);
    EXPECT_EQ(got.find("WRONG"), std::string::npos) << got;
  }
  // A compaction reading the damaged record fails and changes nothing.
  auto r = (*s)->Compact({100, 300}, 900);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kCorruption) << r.status().ToString();
  EXPECT_EQ((*s)->compacted_through(), 0u);
  EXPECT_EQ(h.Check(**s, 1200), "");
  s->reset();
  fs::remove_all(dir);
}

}  // namespace
}  // namespace osr::store
