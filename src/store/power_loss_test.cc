// Power loss at every sync point of a recovery store's life (issue 11): a scripted, seeded
// history (appends of write and zero records over two disks, folds, a reopen, a pinned
// view) runs with the file seam's power-loss recorder on (common/file.h). At each chosen
// sync point k the test writes the image a power loss at that instant would leave (what
// was synced; the RocksDB index as one of: lost, an earlier consistent prefix, or as it is
// now), opens a store from it and checks it against a model: it opens, keeps every
// acknowledged record, reads every seq it holds byte-exact, and takes the next records.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <functional>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "common/crc32c.h"
#include "common/file.h"
#include "store/recovery_store.h"
#include "store/version_index.h"

namespace osr::store {
namespace {

namespace fs = std::filesystem;
using capture::RecordHeader;
using capture::RecordKind;

// Two small disks (several 64 KiB index chunks each), so that a full read of every held
// seq of every image stays cheap.
const std::vector<StoreDisk> kDisks = {{"a", 160 << 10}, {"b", 96 << 10}};
// Records the run never appends, for the appends after each recovery.
constexpr uint64_t kSpareRecords = 3;

struct Record {
  uint32_t disk = 0;
  RecordKind kind = RecordKind::kWrite;
  uint64_t offset = 0;
  uint64_t length = 0;
  std::vector<uint8_t> payload;  // kWrite only
};

// Small journal segments: folds go in several steps, compaction has segments to drop.
const StoreOptions kOptions{.journal_segment_bytes = 128 << 10};

enum class StepKind { kAppend, kFold, kReopen, kPin, kUnpin, kCompact };
struct Step {
  StepKind kind;
  uint64_t first = 0;  // kAppend: records first..last (seqs); kFold, kPin: the seq;
  uint64_t last = 0;   // kCompact: through `first`, keeping `keep` (those above the base)
  std::vector<uint64_t> keep = {};
};

// A seeded history and its model: records[s - 1] has seq s; states[s][d] is disk d after
// every record up to s (a plain replay).
struct Script {
  std::vector<Record> records;
  std::vector<Step> steps;
  std::vector<std::vector<std::vector<uint8_t>>> states;
  uint64_t appended = 0;  // the run appends records 1..appended
};

Script MakeScript(uint32_t seed, int appends, bool compact = false) {
  Script s;
  std::mt19937_64 rng(seed);
  auto pick = [&](uint64_t lo, uint64_t hi) {  // [lo, hi]
    return std::uniform_int_distribution<uint64_t>(lo, hi)(rng);
  };
  uint64_t seq = 0;
  uint64_t pinned = 0;
  const int reopen_at = appends / 2;
  for (int a = 0; a < appends; ++a) {
    uint64_t n = pick(1, 4);
    s.steps.push_back({StepKind::kAppend, seq + 1, seq + n});
    seq += n;
    if (a == reopen_at) s.steps.push_back({StepKind::kReopen});
    if (pick(0, 6) == 0) s.steps.push_back({StepKind::kFold, pick(1, seq)});
    if (pick(0, 7) == 0 && compact) {
      Step c{StepKind::kCompact, seq};
      for (int i = 0; i < 3; ++i) c.keep.push_back(pick(1, seq));
      s.steps.push_back(c);
    }
    if (pinned == 0 && pick(0, 12) == 0) {
      pinned = pick(1, seq);
      s.steps.push_back({StepKind::kPin, pinned});
    } else if (pinned != 0 && pick(0, 8) == 0) {
      s.steps.push_back({StepKind::kUnpin, pinned});
      pinned = 0;
    }
  }
  s.steps.push_back({StepKind::kFold, seq});  // a last fold, up to the pin if one is held
  s.appended = seq;
  std::vector<std::vector<uint8_t>> disks;
  for (const auto& d : kDisks) disks.emplace_back(d.size_bytes, 0);
  s.states.push_back(disks);
  for (uint64_t i = 0; i < seq + kSpareRecords; ++i) {
    Record r;
    r.disk = static_cast<uint32_t>(pick(0, 1));
    uint64_t size = kDisks[r.disk].size_bytes;
    r.kind = pick(0, 5) == 0 ? RecordKind::kZero : RecordKind::kWrite;
    r.length = pick(1, 24 << 10);
    r.offset = pick(0, size - r.length);
    if (r.kind == RecordKind::kWrite) {
      r.payload.resize(r.length);
      for (auto& b : r.payload) b = static_cast<uint8_t>(rng());
      std::copy(r.payload.begin(), r.payload.end(), disks[r.disk].begin() + r.offset);
    } else {
      std::fill_n(disks[r.disk].begin() + r.offset, r.length, 0);
    }
    s.records.push_back(std::move(r));
    s.states.push_back(disks);
  }
  return s;
}

// Records first..last as the replication channel carries them.
std::vector<uint8_t> Encode(const Script& s, uint64_t first, uint64_t last) {
  std::vector<uint8_t> out;
  for (uint64_t seq = first; seq <= last; ++seq) {
    const Record& r = s.records[seq - 1];
    RecordHeader h;
    h.seq = seq;
    h.epoch = 1;
    h.offset = r.offset;
    h.length = r.length;
    h.time_ns = static_cast<int64_t>(seq);
    h.payload_bytes = static_cast<uint32_t>(r.payload.size());
    h.disk = r.disk;
    h.kind = r.kind;
    size_t at = out.size();
    out.resize(at + RecordHeader::kSize + r.payload.size());
    h.Encode(out.data() + at, Crc32c(r.payload));
    std::copy(r.payload.begin(), r.payload.end(), out.begin() + at + RecordHeader::kSize);
  }
  return out;
}

// What the run had promised when a sync point came.
struct Promised {
  uint64_t acked = 0;            // the last seq an Append returned
  uint64_t handed = 0;           // the last seq handed to Append (at most this may be there)
  uint64_t pinned = 0;           // a view's seq, 0: none (no fold may have passed it)
  uint64_t folded = 0;           // the base_seq the last Fold returned
  std::set<uint64_t> kept;       // seqs a compaction was told to keep (while above the base)
  uint64_t compact_through = 0;  // the highest `through` a compaction was given
  std::string step = "start";
};

class PowerLossTest : public ::testing::Test {
 protected:
  void SetUp() override {
    top_ = fs::temp_directory_path() /
           ("osr-powerloss-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(top_);
    fs::create_directories(top_);
    dir_ = top_ + "/store";
  }
  void TearDown() override {
    StopPowerLossRecorderForTest();
    fs::remove_all(top_);
  }

  // Runs the script with the recorder on; calls check(k) at each sync point k in `points`
  // (all of them when empty). Returns the number of sync points.
  uint64_t Run(const Script& s, const std::set<uint64_t>& points, bool check_all) {
    {
      auto made =
          RecoveryStore::Create(dir_, kDisks, 0, RecoveryStore::Start::kEmpty, {}, {}, kOptions);
      EXPECT_TRUE(made.ok()) << made.status().ToString();
      if (!made.ok()) return 0;
    }
    StartPowerLossRecorderForTest(
        {.root = dir_, .excluded = {"index"}, .on_sync_point = [&](uint64_t k, const std::string&) {
           // One at a time: a journal segment's roll syncs on the log's writer thread.
           std::lock_guard one(sync_point_mu_);
           SaveIndex(k);
           if (check_all || points.count(k) != 0) CheckImage(s, k);
         }});
    auto store = RecoveryStore::Open(dir_, kOptions);
    EXPECT_TRUE(store.ok()) << store.status().ToString();
    if (!store.ok()) return 0;
    for (const Step& step : s.steps) {
      if (HasFatalFailure() || failures_ >= kFailuresMax) break;
      switch (step.kind) {
        case StepKind::kAppend: {
          Note([&](Promised& p) {
            p.handed = step.last;
            p.step = fmt::format("append {}..{}", step.first, step.last);
          });
          auto wire = Encode(s, step.first, step.last);
          auto got = (*store)->Append(wire);
          EXPECT_TRUE(got.ok() && *got == step.last) << got.status().ToString();
          Note([&](Promised& p) { p.acked = step.last; });
          break;
        }
        case StepKind::kFold: {
          Note([&](Promised& p) { p.step = fmt::format("fold to {}", step.first); });
          auto got = (*store)->Fold(step.first);
          EXPECT_TRUE(got.ok()) << got.status().ToString();
          if (got.ok()) Note([&](Promised& p) { p.folded = *got; });
          break;
        }
        case StepKind::kReopen: {
          Note([&](Promised& p) { p.step = "close"; });
          store->reset();
          Note([&](Promised& p) { p.step = "reopen"; });
          store = RecoveryStore::Open(dir_, kOptions);
          EXPECT_TRUE(store.ok()) << store.status().ToString();
          if (!store.ok()) return 0;
          uint64_t pinned = Snapshot().pinned;
          if (pinned != 0) {
            EXPECT_TRUE((*store)->Pin(pinned).ok());  // the view opens again
          }
          break;
        }
        case StepKind::kPin: {
          Status st = (*store)->Pin(step.first);
          // A fold may have passed it: then there is no view.
          if (st.ok()) Note([&](Promised& p) { p.pinned = step.first; });
          break;
        }
        case StepKind::kCompact: {
          Promised p = Snapshot();
          uint64_t base = (*store)->base_seq();
          std::set<uint64_t> keep;  // what was kept before stays kept (a vault keeps its points)
          for (uint64_t k : p.kept) keep.insert(k);
          for (uint64_t k : step.keep) {
            if (k > (*store)->compacted_through()) keep.insert(k);  // not gone already
          }
          if (p.pinned != 0) keep.insert(p.pinned);
          std::erase_if(keep, [&](uint64_t k) { return k <= base || k > step.first; });
          Note([&](Promised& q) {
            q.kept.insert(keep.begin(), keep.end());
            q.compact_through = std::max(q.compact_through, step.first);
            q.step = fmt::format("compact through {} keeping {}", step.first, fmt::join(keep, ","));
          });
          auto got = (*store)->Compact({keep.begin(), keep.end()}, step.first);
          EXPECT_TRUE(got.ok()) << got.status().ToString();
          break;
        }
        case StepKind::kUnpin: {
          uint64_t pinned = Snapshot().pinned;
          if (pinned != 0) (*store)->Unpin(pinned);
          Note([&](Promised& p) { p.pinned = 0; });
          break;
        }
      }
    }
    Note([&](Promised& p) {
      p.pinned = 0;  // a clean close keeps everything; pins end with the process
      p.step = "final close";
    });
    store->reset();
    uint64_t n = PowerLossSyncPointsForTest();
    StopPowerLossRecorderForTest();
    // After the run: everything it acknowledged is there (a clean power loss).
    Status image = WriteCopy(dir_, top_ + "/after");
    EXPECT_TRUE(image.ok()) << image.ToString();
    if (image.ok()) Verify(s, n + 1, top_ + "/after", Snapshot());
    fs::remove_all(top_ + "/after");
    return n;
  }

  template <typename F>
  void Note(F f) {
    std::lock_guard lock(mu_);
    f(promised_);
  }
  Promised Snapshot() {
    std::lock_guard lock(mu_);
    return promised_;
  }

  // Every few sync points, a checkpoint of the live index: the "earlier prefixes" images
  // may take.
  void SaveIndex(uint64_t k) {
    if (k % 3 != 0) return;
    std::string to = fmt::format("{}/index-at-{}", top_, k);
    if (VersionIndex::CheckpointOpen(dir_ + "/index", to).ok()) saved_.push_back(to);
  }

  // The index an image gets, varied over k: none (lost), an earlier prefix, or as it is now.
  void PlaceIndex(uint64_t k, const std::string& image, std::string* how) {
    std::mt19937_64 rng(k);
    const std::string to = image + "/index";
    switch (k % 3) {
      case 0:
        *how = "index lost";
        return;
      case 1:
        if (!saved_.empty()) {
          const std::string& from = saved_[rng() % saved_.size()];
          *how = "index from " + from.substr(top_.size() + 1);
          fs::copy(from, to, fs::copy_options::recursive);
          return;
        }
        [[fallthrough]];
      default: {
        *how = "index as now";
        Status st = VersionIndex::CheckpointOpen(dir_ + "/index", to);
        if (st.code() == Code::kNotFound && fs::exists(dir_ + "/index")) {
          // Closed (between close and reopen): its files are consistent as they are.
          fs::copy(dir_ + "/index", to, fs::copy_options::recursive);
        } else if (!st.ok() && st.code() != Code::kNotFound) {
          ADD_FAILURE() << "sync point " << k << ": " << st.ToString();
        }
        return;
      }
    }
  }

  Status WriteCopy(const std::string& from, const std::string& to) {
    std::error_code ec;
    fs::copy(from, to, fs::copy_options::recursive, ec);
    if (ec) return Status::FromErrno(ec.value(), "copy " + from);
    return Status::Ok();
  }

  void CheckImage(const Script& s, uint64_t k) {
    if (failures_ >= kFailuresMax) return;
    Promised p = Snapshot();
    const std::string image = fmt::format("{}/image-{}", top_, k);
    Status st = WritePowerLossImageForTest(image, writeback_ == 0 ? 0 : writeback_ * 100003 + k,
                                           writeback_if_);
    if (!st.ok()) {
      Fail(k, p, "image: " + st.ToString());
      return;
    }
    std::string how;
    PlaceIndex(k, image, &how);
    p.step += ", " + how;
    Verify(s, k, image, p);
    fs::remove_all(image);
    ++checked_;
  }

  void Fail(uint64_t k, const Promised& p, const std::string& what) {
    ++failures_;
    ADD_FAILURE() << "power loss at sync point " << k << " (" << p.step << "; acknowledged "
                  << p.acked << "): " << what;
  }

  // Opens the store in `image` and checks it against the model.
  void Verify(const Script& s, uint64_t k, const std::string& image, const Promised& p) {
    auto opened = RecoveryStore::Open(image, kOptions);
    if (!opened.ok()) {
      Fail(k, p, "open: " + opened.status().ToString());
      return;
    }
    auto& store = *opened;
    const uint64_t durable = store->durable_seq();
    const uint64_t base = store->base_seq();
    if (durable < p.acked) {
      Fail(k, p, fmt::format("durable_seq {} lost acknowledged records", durable));
    }
    if (durable > p.handed) Fail(k, p, fmt::format("durable_seq {} was never sent", durable));
    if (p.pinned != 0 && base > p.pinned) {
      Fail(k, p, fmt::format("base_seq {} passed the view at seq {}", base, p.pinned));
    }
    if (base > durable) Fail(k, p, fmt::format("base_seq {} > durable_seq {}", base, durable));
    if (durable > p.handed) return;
    std::vector<uint8_t> buf;
    auto read_matches = [&](uint64_t seq) {
      for (uint32_t d = 0; d < kDisks.size(); ++d) {
        buf.assign(kDisks[d].size_bytes, 0xee);
        Status st = store->ReadAt(d, seq, 0, buf);
        if (st.code() == Code::kOutOfRange && seq <= p.compact_through && p.kept.count(seq) == 0 &&
            seq <= store->compacted_through()) {
          return true;  // compacted away: refused, never wrong
        }
        if (!st.ok()) {
          Fail(k, p, fmt::format("read seq {} of disk {}: {}", seq, d, st.ToString()));
          return false;
        }
        const auto& want = s.states[seq][d];
        auto diff = std::mismatch(buf.begin(), buf.end(), want.begin());
        if (diff.first != buf.end()) {
          uint64_t at = static_cast<uint64_t>(diff.first - buf.begin());
          Fail(k, p,
               fmt::format("seq {} (store holds {}..{}) disk {} byte {}: read {:#04x}, the "
                           "model says {:#04x}",
                           seq, base, durable, d, at, *diff.first, *diff.second));
          return false;
        }
      }
      return true;
    };
    for (uint64_t seq = std::max(base, store->consistent_from()); seq <= durable; ++seq) {
      if (!read_matches(seq)) return;
    }
    // The sender goes on after what the store holds.
    uint64_t next = durable + 1, last = durable + kSpareRecords;
    auto got = store->Append(Encode(s, next, last));
    if (!got.ok() || *got != last) {
      Fail(k, p,
           fmt::format("append {}..{} after recovery: {}", next, last,
                       got.ok() ? std::to_string(*got) : got.status().ToString()));
      return;
    }
    read_matches(last);
  }

  static constexpr int kFailuresMax = 5;
  std::string top_;
  std::string dir_;
  std::mutex mu_;
  Promised promised_;         // guarded by mu_
  std::mutex sync_point_mu_;  // held by the sync-point hook, which guards what follows
  std::vector<std::string> saved_;
  int failures_ = 0;
  uint64_t writeback_ = 0;  // not 0: unsynced blocks may arrive too (seeded)
  std::function<bool(const std::string&)> writeback_if_;  // of these files (all: empty)
  uint64_t checked_ = 0;
};

// Every sync point of a short history: appends, folds (each fold cut at each of its sync
// points), a reopen and a pinned view.
TEST_F(PowerLossTest, EverySyncPointOfAShortHistoryRecovers) {
  Script s = MakeScript(11, 40);
  auto start = std::chrono::steady_clock::now();
  uint64_t n = Run(s, {}, /*check_all=*/true);
  auto secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_GT(n, 60u);
  EXPECT_EQ(checked_, n);
  std::printf("power loss: %llu sync points, %llu records, every one checked in %.1f s\n",
              static_cast<unsigned long long>(n), static_cast<unsigned long long>(s.appended),
              secs);
}

// The same with the other face of a power loss: blocks written but not synced may have
// reached the disk, any of them (a base half folded, a store.json.tmp half written).
TEST_F(PowerLossTest, EverySyncPointRecoversWhenUnsyncedBlocksArrivePartly) {
  writeback_ = 1;
  writeback_if_ = [](const std::string& path) { return !path.starts_with("/journal/"); };
  Script s = MakeScript(13, 32);
  uint64_t n = Run(s, {}, /*check_all=*/true);
  EXPECT_GT(n, 60u);
  EXPECT_EQ(checked_, n);
}

// ... and of the journal: a write-out's blocks reach the disk in any order (O_DIRECT, a
// drive's volatile cache), so a torn record can have whole records after it.
TEST_F(PowerLossTest, EverySyncPointRecoversWhenUnsyncedJournalBlocksArrivePartly) {
  writeback_ = 2;
  Script s = MakeScript(13, 48);
  uint64_t n = Run(s, {}, /*check_all=*/true);
  EXPECT_GT(n, 60u);
  EXPECT_EQ(checked_, n);
}

// With history compaction (through random seqs, keeping random points and every point kept
// before) among the steps.
TEST_F(PowerLossTest, EverySyncPointOfACompactingHistoryRecovers) {
  Script s = MakeScript(11, 48, /*compact=*/true);
  uint64_t n = Run(s, {}, /*check_all=*/true);
  EXPECT_GT(n, 100u);
  EXPECT_EQ(checked_, n);
}

// A longer history (more folds, the index past several batches): a seeded sample of its
// sync points, counted on a first run, checked on a second, identical one.
TEST_F(PowerLossTest, ASampleOfSyncPointsOfALongHistoryRecovers) {
  Script s = MakeScript(23, 200);
  uint64_t n = Run(s, {}, /*check_all=*/false);
  ASSERT_GT(n, 200u);
  fs::remove_all(top_);
  fs::create_directories(top_);
  saved_.clear();
  promised_ = Promised{};
  std::set<uint64_t> points;
  std::mt19937_64 rng(5);
  while (points.size() < 40) points.insert(1 + rng() % n);
  auto start = std::chrono::steady_clock::now();
  uint64_t again = Run(s, points, /*check_all=*/false);
  auto secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(again, n) << "the run is not deterministic: its sync points differ";
  EXPECT_EQ(checked_, points.size());
  std::printf("power loss: %llu sync points, %llu records, %zu checked in %.1f s\n",
              static_cast<unsigned long long>(n), static_cast<unsigned long long>(s.appended),
              points.size(), secs);
}

// A store is there once Create returns, whatever a power loss takes after that; before,
// there is none or one that opens.
TEST_F(PowerLossTest, AStoreIsThereOnceCreateReturns) {
  bool created = false;
  int checked = 0;
  StartPowerLossRecorderForTest(
      {.root = top_,
       .excluded = {"store/index"},
       .on_sync_point = [&](uint64_t k, const std::string& path) {
         const std::string image = fmt::format("{}-image-{}", top_, k);
         ASSERT_TRUE(WritePowerLossImageForTest(image).ok());
         auto opened = RecoveryStore::Open(image + "/store");
         if (created || opened.ok() || opened.status().code() != Code::kNotFound) {
           EXPECT_TRUE(opened.ok()) << "power loss at sync point " << k << " (" << path
                                    << (created ? ", after Create returned" : ", in Create")
                                    << "): " << opened.status().ToString();
         }
         if (opened.ok()) {
           std::vector<uint8_t> buf(kDisks[0].size_bytes, 0xee);
           EXPECT_TRUE((*opened)->ReadAt(0, 0, 0, buf).ok());
           EXPECT_EQ(std::count(buf.begin(), buf.end(), 0), static_cast<ptrdiff_t>(buf.size()));
         }
         if (opened.ok()) opened->reset();  // closed before its files go
         fs::remove_all(image);
         ++checked;
       }});
  auto store = RecoveryStore::Create(dir_, kDisks, 0);
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  created = true;
  Script s = MakeScript(3, 2);
  ASSERT_TRUE((*store)->Append(Encode(s, 1, 1)).ok());
  store->reset();
  StopPowerLossRecorderForTest();
  EXPECT_GT(checked, 3);
}

}  // namespace
}  // namespace osr::store
