#include "store/recovery_store.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "capture/log_reader.h"
#include "common/crc32c.h"
#include "store/failover_disk.h"

namespace osr::store {
namespace {

namespace fs = std::filesystem;
using capture::RecordHeader;
using capture::RecordKind;

// Encodes records as the replication channel carries them.
class RecordMaker {
 public:
  explicit RecordMaker(uint64_t next_seq) : next_(next_seq) {}
  void Write(std::vector<uint8_t>* out, uint32_t disk, uint64_t off,
             const std::vector<uint8_t>& data) {
    Add(out, disk, off, data.size(), RecordKind::kWrite, data);
  }
  void Zero(std::vector<uint8_t>* out, uint32_t disk, uint64_t off, uint64_t len) {
    Add(out, disk, off, len, RecordKind::kZero, {});
  }
  // Disk `disk` is added (the next index) or grows to `size` bytes (docs/formats.md).
  void DiskSize(std::vector<uint8_t>* out, uint32_t disk, const std::string& name, uint64_t size) {
    Add(out, disk, size, 0, RecordKind::kDiskSize, std::vector<uint8_t>(name.begin(), name.end()));
  }
  uint64_t next() const { return next_; }

 private:
  void Add(std::vector<uint8_t>* out, uint32_t disk, uint64_t off, uint64_t len, RecordKind kind,
           const std::vector<uint8_t>& payload) {
    RecordHeader h;
    h.seq = next_++;
    h.epoch = 1;
    h.offset = off;
    h.length = len;
    h.time_ns = 1;
    h.payload_bytes = static_cast<uint32_t>(payload.size());
    h.disk = disk;
    h.kind = kind;
    size_t at = out->size();
    out->resize(at + RecordHeader::kSize + payload.size());
    h.Encode(out->data() + at, Crc32c(payload));
    std::copy(payload.begin(), payload.end(), out->begin() + at + RecordHeader::kSize);
  }
  uint64_t next_;
};

class RecoveryStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("osr-store-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string dir_;
};

constexpr uint64_t kDisk0 = 3 << 20;  // crosses chunk boundaries
constexpr uint64_t kDisk1 = 1 << 20;

// A disk grows and one is added in the middle of the order: every seq reads its disks as
// they were then (a grown disk at its old size before the change, an added one not there),
// byte for byte against a model, before and after a reopen and a fold past the changes.
TEST_F(RecoveryStoreTest, DisksAddedAndGrownReadAsTheyWereAtEachSeq) {
  StoreOptions opts;
  opts.journal_segment_bytes = 128 << 10;  // many segments: the fold below moves the base
  auto store = std::shared_ptr<RecoveryStore>(
      RecoveryStore::Create(dir_, {{"a", kDisk0}}, 0, RecoveryStore::Start::kEmpty, {}, {}, opts)
          .value()
          .release());
  // states[seq]: each disk's bytes then (a missing disk: absent).
  std::vector<std::vector<std::vector<uint8_t>>> states;
  std::vector<std::vector<uint8_t>> model = {std::vector<uint8_t>(kDisk0, 0)};
  std::vector<std::string> names = {"a"};
  states.push_back(model);
  std::mt19937 rng(13);
  RecordMaker mk(1);
  auto write = [&](std::vector<uint8_t>* wire, uint32_t d) {
    uint64_t len = 1 + rng() % 70000;
    uint64_t off = rng() % (model[d].size() - len);
    std::vector<uint8_t> data(len);
    for (auto& b : data) b = static_cast<uint8_t>(rng());
    mk.Write(wire, d, off, data);
    std::copy(data.begin(), data.end(), model[d].begin() + static_cast<long>(off));
    states.push_back(model);
  };
  for (int batch = 0; batch < 12; ++batch) {
    std::vector<uint8_t> wire;
    for (int i = 0; i < 5; ++i) write(&wire, static_cast<uint32_t>(rng() % model.size()));
    if (batch == 3) {  // disk a grows by 1 MiB, and is written past its old end at once
      mk.DiskSize(&wire, 0, "a", kDisk0 + (1 << 20));
      model[0].resize(kDisk0 + (1 << 20), 0);
      states.push_back(model);
      std::vector<uint8_t> tail(4096, 0xab);
      mk.Write(&wire, 0, kDisk0 + 4096, tail);
      std::copy(tail.begin(), tail.end(), model[0].begin() + kDisk0 + 4096);
      states.push_back(model);
    }
    if (batch == 6) {  // disk b is added
      mk.DiskSize(&wire, 1, "b", kDisk1);
      model.push_back(std::vector<uint8_t>(kDisk1, 0));
      names.push_back("b");
      states.push_back(model);
    }
    ASSERT_EQ(store->Append(wire).value(), mk.next() - 1) << "batch " << batch;
  }
  auto check_all = [&](uint64_t from) {
    for (uint64_t seq = from; seq < states.size(); ++seq) {
      const auto& want = states[seq];
      auto at = store->DisksAt(seq);
      ASSERT_EQ(at.size(), want.size()) << "seq " << seq;
      for (uint32_t d = 0; d < want.size(); ++d) {
        ASSERT_EQ(at[d].name, names[d]);
        ASSERT_EQ(at[d].size_bytes, want[d].size()) << "seq " << seq << " disk " << d;
        std::vector<uint8_t> got(want[d].size());
        ASSERT_TRUE(store->ReadAt(d, seq, 0, got).ok()) << "seq " << seq << " disk " << d;
        ASSERT_TRUE(got == want[d]) << "seq " << seq << " disk " << d;
        // Past the disk as it was then: refused, even where the disk is larger now.
        std::vector<uint8_t> one(1);
        EXPECT_FALSE(store->ReadAt(d, seq, want[d].size(), one).ok()) << "seq " << seq;
      }
      if (want.size() < store->disks().size()) {
        EXPECT_EQ(store->DiskAt(1, seq).status().code(), Code::kNotFound) << "seq " << seq;
        std::vector<uint8_t> one(1);
        EXPECT_FALSE(store->ReadAt(1, seq, 0, one).ok());
      }
    }
  };
  check_all(0);
  ASSERT_EQ(store->disk_changes().size(), 2u);
  // A record past a disk's size, or a shrink, or a second disk named alike: refused whole.
  for (int bad = 0; bad < 4; ++bad) {
    RecordMaker m2(mk.next());
    std::vector<uint8_t> wire;
    if (bad == 0) m2.Write(&wire, 1, kDisk1 - 10, std::vector<uint8_t>(20, 1));
    if (bad == 1) m2.DiskSize(&wire, 0, "a", kDisk0);  // smaller: disks only grow
    if (bad == 2) m2.DiskSize(&wire, 2, "b", kDisk1);  // a name twice
    if (bad == 3) m2.DiskSize(&wire, 3, "c", kDisk1);  // not the next index
    EXPECT_EQ(store->Append(wire).status().code(), Code::kInvalidArgument) << bad;
  }
  // The same batch sent twice after a refusal: the change is taken once.
  store.reset();
  store = std::shared_ptr<RecoveryStore>(RecoveryStore::Open(dir_, opts).value().release());
  check_all(0);
  ASSERT_EQ(store->disks().size(), 2u);
  auto folded = store->Fold(states.size() - 3);
  ASSERT_TRUE(folded.ok()) << folded.status().ToString();
  check_all(*folded);
  store.reset();
  store = std::shared_ptr<RecoveryStore>(RecoveryStore::Open(dir_, opts).value().release());
  check_all(*folded);
  EXPECT_GT(*folded, 20u);  // past the grow (seq ~21) at least
}

// Every position of the order can be read back exactly: the store against a model.
TEST_F(RecoveryStoreTest, ReadsEverySeqLikeTheModelThenFoldsAndReopens) {
  auto store = RecoveryStore::Create(dir_, {{"a", kDisk0}, {"b", kDisk1}}, 0).value();
  std::vector<std::vector<std::vector<uint8_t>>> states;  // states[seq][disk]
  std::vector<std::vector<uint8_t>> model = {std::vector<uint8_t>(kDisk0, 0),
                                             std::vector<uint8_t>(kDisk1, 0)};
  states.push_back(model);
  std::mt19937 rng(7);
  RecordMaker mk(1);
  for (int batch = 0; batch < 20; ++batch) {
    std::vector<uint8_t> wire;
    for (int i = 0; i < 10; ++i) {
      uint32_t d = rng() % 2;
      uint64_t size = d == 0 ? kDisk0 : kDisk1;
      uint64_t len = 1 + rng() % 300000;
      uint64_t off = rng() % (size - len);
      if (rng() % 5 == 0) {
        mk.Zero(&wire, d, off, len);
        std::fill(model[d].begin() + off, model[d].begin() + off + len, 0);
      } else {
        std::vector<uint8_t> data(len, static_cast<uint8_t>(rng()));
        data[0] = static_cast<uint8_t>(batch);
        mk.Write(&wire, d, off, data);
        std::copy(data.begin(), data.end(), model[d].begin() + off);
      }
      states.push_back(model);
    }
    auto durable = store->Append(wire);
    ASSERT_TRUE(durable.ok()) << durable.status().ToString();
    EXPECT_EQ(*durable, mk.next() - 1);
  }
  auto check = [&](RecoveryStore& s, uint64_t from) {
    for (uint64_t seq = from; seq < states.size(); seq += 7) {
      for (uint32_t d = 0; d < 2; ++d) {
        std::vector<uint8_t> got(states[seq][d].size());
        ASSERT_TRUE(s.ReadAt(d, seq, 0, got).ok());
        ASSERT_TRUE(got == states[seq][d]) << "disk " << d << " seq " << seq;
        // An unaligned piece too (across a 1 MiB chunk boundary on disk 0).
        uint64_t at = d == 0 ? (1 << 20) - 2500 : 500001;
        std::vector<uint8_t> piece(5000);
        ASSERT_TRUE(s.ReadAt(d, seq, at, piece).ok());
        ASSERT_TRUE(std::equal(piece.begin(), piece.end(), states[seq][d].begin() + at));
      }
    }
  };
  check(*store, 0);
  EXPECT_EQ(store->ReadAt(0, states.size(), 0, std::span<uint8_t>()).code(), Code::kOutOfRange);

  // A pinned view holds Fold back.
  ASSERT_TRUE(store->Pin(50).ok());
  EXPECT_EQ(store->Fold(120).value(), 50u);
  store->Unpin(50);
  EXPECT_EQ(store->Fold(120).value(), 120u);
  EXPECT_EQ(store->base_seq(), 120u);
  EXPECT_EQ(store->ReadAt(0, 100, 0, std::span<uint8_t>()).code(), Code::kOutOfRange);
  check(*store, 120);

  store.reset();
  auto reopened = RecoveryStore::Open(dir_);
  ASSERT_TRUE(reopened.ok()) << reopened.status().ToString();
  EXPECT_EQ((*reopened)->base_seq(), 120u);
  EXPECT_EQ((*reopened)->durable_seq(), states.size() - 1);
  check(**reopened, 120);
  // And it goes on from where it was.
  std::vector<uint8_t> wire;
  mk.Write(&wire, 1, 10, {9, 9, 9});
  EXPECT_EQ((*reopened)->Append(wire).value(), states.size());
}

TEST_F(RecoveryStoreTest, RefusesBadRecords) {
  auto store = RecoveryStore::Create(dir_, {{"a", kDisk1}}, 10).value();
  {
    std::vector<uint8_t> wire;
    RecordMaker(12).Write(&wire, 0, 0, {1});  // a gap: 11 is next
    EXPECT_EQ(store->Append(wire).status().code(), Code::kInvalidArgument);
  }
  {
    std::vector<uint8_t> wire;
    RecordMaker(11).Write(&wire, 0, kDisk1 - 1, {1, 2});  // past the end
    EXPECT_EQ(store->Append(wire).status().code(), Code::kInvalidArgument);
  }
  {
    std::vector<uint8_t> wire;
    RecordMaker(11).Write(&wire, 3, 0, {1});  // no such disk
    EXPECT_EQ(store->Append(wire).status().code(), Code::kInvalidArgument);
  }
  {
    std::vector<uint8_t> wire;
    RecordMaker(11).Write(&wire, 0, 0, {1, 2, 3});
    wire.back() ^= 1;  // a flipped bit in transit
    EXPECT_EQ(store->Append(wire).status().code(), Code::kCorruption);
    wire.back() ^= 1;
    wire.pop_back();  // truncated
    EXPECT_EQ(store->Append(wire).status().code(), Code::kCorruption);
  }
  EXPECT_EQ(store->durable_seq(), 10u);
  std::vector<uint8_t> wire;
  RecordMaker(11).Write(&wire, 0, 0, {1, 2, 3});
  EXPECT_EQ(store->Append(wire).value(), 11u);
}

TEST_F(RecoveryStoreTest, BaseWritesShowUnderLaterRecords) {
  auto store = RecoveryStore::Create(dir_, {{"a", kDisk1}}, 0).value();
  ASSERT_TRUE(store->WriteBase(0, 0, std::vector<uint8_t>(8192, 0x55)).ok());
  std::vector<uint8_t> wire;
  RecordMaker(1).Write(&wire, 0, 4096, std::vector<uint8_t>(10, 0x66));
  ASSERT_TRUE(store->Append(wire).ok());
  std::vector<uint8_t> got(8192);
  ASSERT_TRUE(store->ReadAt(0, 1, 0, got).ok());
  EXPECT_EQ(got[4095], 0x55);
  EXPECT_EQ(got[4096], 0x66);
  EXPECT_EQ(got[4106], 0x55);
  ASSERT_TRUE(store->ReadAt(0, 0, 0, got).ok());
  EXPECT_EQ(got[4096], 0x55);
}

TEST_F(RecoveryStoreTest, AConsistentStoreIsNeverWipedForAFirstCopy) {
  // In sync at seq 0 (nothing written yet): a sender must not take it for an empty store.
  auto store = RecoveryStore::Create(dir_, {{"a", kDisk1}}, 0).value();
  ASSERT_TRUE(store->WriteBase(0, 0, std::vector<uint8_t>(4096, 0x77)).ok());
  EXPECT_FALSE(store->initial_sync_pending());
  EXPECT_EQ(store->BeginInitialSync(5).code(), Code::kInvalidArgument);
  std::vector<uint8_t> got(4096);
  ASSERT_TRUE(store->ReadAt(0, 0, 0, got).ok());
  EXPECT_EQ(got[0], 0x77);
}

// The source no longer holds seqs 4..8 that the store lacks (a store put back from an older
// copy, or a journal that lost acknowledged records): the history is replaced by a resync.
TEST_F(RecoveryStoreTest, AHistoryIsReplacedOnlyWhenSomethingIsMissingAndCrashSafely) {
  {
    auto store = RecoveryStore::Create(dir_, {{"a", kDisk1}}, 0).value();
    std::vector<uint8_t> wire;
    RecordMaker rm(1);
    for (int i = 0; i < 3; ++i) rm.Write(&wire, 0, 4096 * i, std::vector<uint8_t>(4096, 0x30 + i));
    ASSERT_TRUE(store->Append(wire).ok());
    EXPECT_EQ(store->BeginResyncReplacingHistory(3).code(), Code::kInvalidArgument);
    EXPECT_EQ(store->BeginResyncReplacingHistory(2).code(), Code::kInvalidArgument);
    ASSERT_TRUE(store->Pin(2).ok());
    EXPECT_EQ(store->BeginResyncReplacingHistory(8).code(), Code::kUnavailable);
    store->Unpin(2);
    ASSERT_TRUE(store->BeginResyncReplacingHistory(8).ok());
    EXPECT_EQ(store->durable_seq(), 8u);
    std::vector<uint8_t> got(4096);
    for (uint64_t seq : {0, 3, 8}) EXPECT_FALSE(store->ReadAt(0, seq, 0, got).ok()) << seq;
  }
  // A restart in the middle keeps it so: the resync starts again, nothing is readable.
  auto store = RecoveryStore::Open(dir_).value();
  EXPECT_EQ(store->durable_seq(), 8u);
  EXPECT_TRUE(store->resyncing());
  std::vector<uint8_t> got(4096);
  EXPECT_FALSE(store->ReadAt(0, 8, 0, got).ok());
  ASSERT_TRUE(store->BeginResync(8).ok());
  std::vector<uint8_t> wire;
  RecordMaker(9).Write(&wire, 0, 0, std::vector<uint8_t>(4096, 0x99));
  ASSERT_TRUE(store->Append(wire).ok());
  ASSERT_TRUE(store->ResyncWrite(0, 4096, std::vector<uint8_t>(4096, 0x44)).ok());
  ASSERT_TRUE(store->CommitResync(9).ok());
  ASSERT_TRUE(store->ReadAt(0, 9, 0, got).ok());
  EXPECT_EQ(got[0], 0x99);
  ASSERT_TRUE(store->ReadAt(0, 9, 4096, got).ok());
  EXPECT_EQ(got[0], 0x44);
  ASSERT_TRUE(store->ReadAt(0, 9, 8192, got).ok());
  EXPECT_EQ(got[0], 0x32);  // not resent: as of the old history (the sender resends all)
}

// store.json says the history was replaced but the process died before the journal
// started over: the journal's records are all in the base; it starts over at open.
TEST_F(RecoveryStoreTest, AJournalBehindItsBaseStartsOverAtOpen) {
  {
    auto store = RecoveryStore::Create(dir_, {{"a", kDisk1}}, 0).value();
    std::vector<uint8_t> wire;
    RecordMaker(1).Write(&wire, 0, 0, std::vector<uint8_t>(4096, 0x31));
    ASSERT_TRUE(store->Append(wire).ok());
    ASSERT_EQ(store->Fold(1).value(), 1u);
  }
  std::string text;
  {
    std::ifstream in(dir_ + "/store.json");
    text.assign(std::istreambuf_iterator<char>(in), {});
  }
  auto at = text.find("\"base_seq\": 1");
  ASSERT_NE(at, std::string::npos) << text;
  text.replace(at, std::string("\"base_seq\": 1").size(), "\"base_seq\": 6");
  {
    std::ofstream out(dir_ + "/store.json");
    out << text;
  }
  auto store = RecoveryStore::Open(dir_);
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  EXPECT_EQ((*store)->durable_seq(), 6u);
  std::vector<uint8_t> wire;
  RecordMaker(7).Write(&wire, 0, 0, std::vector<uint8_t>(4096, 0x77));
  EXPECT_EQ((*store)->Append(wire).value(), 7u);
}

TEST_F(RecoveryStoreTest, ADifferentialStoreIsUnreadableUntilItsResyncCommits) {
  std::string img = dir_ + "-old.img";
  {
    auto f = File::Open(img, File::Mode::kCreate).value();
    ASSERT_TRUE(f.Truncate(kDisk1).ok());
    ASSERT_TRUE(f.PWrite(0, std::vector<uint8_t>(4096, 0x11)).ok());
  }
  auto store =
      RecoveryStore::Create(dir_, {{"a", kDisk1}}, 7, RecoveryStore::Start::kDifferential, {img})
          .value();
  EXPECT_FALSE(std::filesystem::exists(img));  // moved in, not copied
  EXPECT_TRUE(store->differential());
  std::vector<uint8_t> got(4096);
  EXPECT_FALSE(store->ReadAt(0, 7, 0, got).ok());
  // Records after the base arrive before the resync: still nothing readable.
  std::vector<uint8_t> wire;
  RecordMaker(8).Write(&wire, 0, 8192, {1, 2, 3});
  ASSERT_TRUE(store->Append(wire).ok());
  EXPECT_FALSE(store->ReadAt(0, 8, 0, got).ok());
  ASSERT_TRUE(store->BeginResync(8).ok());
  ASSERT_TRUE(store->ResyncWrite(0, 4096, std::vector<uint8_t>(4096, 0x22)).ok());
  ASSERT_TRUE(store->CommitResync(8).ok());
  EXPECT_FALSE(store->differential());
  ASSERT_TRUE(store->ReadAt(0, 8, 0, got).ok());
  EXPECT_EQ(got[0], 0x11);  // the old primary's bytes where nothing differed
  ASSERT_TRUE(store->ReadAt(0, 8, 4096, got).ok());
  EXPECT_EQ(got[0], 0x22);  // the resynced region
}

TEST_F(RecoveryStoreTest, ADifferentialStoreThatCannotBeMadeGivesItsImagesBack) {
  std::string img = dir_ + "-old.img";
  {
    auto f = File::Open(img, File::Mode::kCreate).value();
    ASSERT_TRUE(f.Truncate(kDisk1 / 2).ok());  // the wrong size: refused before any move
  }
  EXPECT_FALSE(
      RecoveryStore::Create(dir_, {{"a", kDisk1}}, 7, RecoveryStore::Start::kDifferential, {img})
          .ok());
  EXPECT_TRUE(std::filesystem::exists(img));
  std::filesystem::remove(img);
}

// Epochs and sources come from the vault: set at creation, kept in store.json, raised
// only by RaiseEpoch (never lowered); an older store.json without them opens at epoch 1.
TEST_F(RecoveryStoreTest, KeepsTheEpochAndSourceTheVaultGave) {
  {
    auto store = RecoveryStore::Create(dir_, {{"a", kDisk1}}, 0, RecoveryStore::Start::kEmpty, {},
                                       {.epoch = 4, .source = "primary"})
                     .value();
    EXPECT_EQ(store->epoch(), 4u);
    EXPECT_EQ(store->source(), "primary");
    EXPECT_EQ(store->RaiseEpoch(3).code(), Code::kPermissionDenied);
    EXPECT_TRUE(store->RaiseEpoch(4).ok());
    EXPECT_EQ(store->RaiseEpoch(kEpochMax + 1).code(), Code::kInvalidArgument);
    EXPECT_TRUE(store->RaiseEpoch(5).ok());
  }
  auto store = RecoveryStore::Open(dir_).value();
  EXPECT_EQ(store->epoch(), 5u);
  EXPECT_EQ(store->source(), "primary");
  store.reset();
  // Out of range or not a name: refused before anything is made.
  fs::remove_all(dir_);
  EXPECT_EQ(RecoveryStore::Create(dir_, {{"a", kDisk1}}, 0, RecoveryStore::Start::kEmpty, {},
                                  {.epoch = 0, .source = ""})
                .status()
                .code(),
            Code::kInvalidArgument);
  EXPECT_EQ(RecoveryStore::Create(dir_, {{"a", kDisk1}}, 0, RecoveryStore::Start::kEmpty, {},
                                  {.epoch = 1, .source = "../x"})
                .status()
                .code(),
            Code::kInvalidArgument);
  EXPECT_FALSE(fs::exists(dir_));
  // A store.json of before: no source, epoch 0 (never raised) -> epoch 1.
  ASSERT_TRUE(RecoveryStore::Create(dir_, {{"a", kDisk1}}, 0).ok());
  std::string old = R"({"version":1,"disks":[{"name":"a","size_bytes":1048576}],"base_seq":0,)"
                    R"("consistent_from":0,"resync_from":null,"initial_sync":false,"epoch":0})";
  ASSERT_TRUE(WriteFileAtomic(dir_ + "/store.json",
                              {reinterpret_cast<const uint8_t*>(old.data()), old.size()})
                  .ok());
  store = RecoveryStore::Open(dir_).value();
  EXPECT_EQ(store->epoch(), 1u);
  EXPECT_EQ(store->source(), "");
}

// store.json is read back through the typed layer: a field of the wrong type is
// reported (kCorruption, naming the field), never thrown.
TEST_F(RecoveryStoreTest, ADamagedStoreJsonIsReportedNotThrown) {
  ASSERT_TRUE(RecoveryStore::Create(dir_, {{"a", kDisk1}}, 0).ok());
  for (std::string text :
       {R"({"version":1,"disks":[{"name":"a","size_bytes":"x"}],"base_seq":0})",
        R"({"version":1,"disks":[{"name":"a","size_bytes":1048576}],"base_seq":"0"})",
        R"({"version":1,"disks":[{"name":"a","size_bytes":1048576}],"base_seq":0,"epoch":"2"})",
        R"({"version":"1","disks":[],"base_seq":0})", R"({"version":2,"disks":[],"base_seq":0})",
        R"([1])", "{"}) {
    ASSERT_TRUE(WriteFileAtomic(dir_ + "/store.json",
                                {reinterpret_cast<const uint8_t*>(text.data()), text.size()})
                    .ok());
    auto r = RecoveryStore::Open(dir_);
    ASSERT_FALSE(r.ok()) << text;
    EXPECT_EQ(r.status().code(), Code::kCorruption) << text << ": " << r.status().ToString();
  }
}

// A nearly full file system: after a big append failed for space, a small one that still
// fits does not make the store look healthy (the site's status would flap between full
// and Normal at each batch the receiver happens to make); the failure is over once what
// failed fits again.
TEST_F(RecoveryStoreTest, ASmallAppendThatFitsDoesNotEndANoSpaceFailure) {
  auto store = RecoveryStore::Create(dir_, {{"a", kDisk0}}, 0).value();
  std::vector<uint8_t> big;
  RecordMaker big_maker(1);
  for (int i = 0; i < 3; ++i) {
    big_maker.Write(&big, 0, i * 700000ull, std::vector<uint8_t>(700000, 0x31 + i));
  }
  SetFileFaultForTest({.path_part = dir_, .err = ENOSPC, .write_bytes_left = 256 << 10});
  ASSERT_EQ(store->Append(big).status().code(), Code::kNoSpace);
  ASSERT_TRUE(store->write_failure().has_value());
  EXPECT_EQ(FileSystemSpace(dir_).value().free_bytes, 0u);  // the big append used it all

  // 64 KiB of room, and a record of 8 KiB: it goes in; the store is still short of space.
  SetFileFaultForTest({.path_part = dir_, .err = ENOSPC, .write_bytes_left = 64 << 10});
  std::vector<uint8_t> small;
  RecordMaker small_maker(1);
  small_maker.Write(&small, 0, 0, std::vector<uint8_t>(8192, 0x41));
  auto fits = store->Append(small);
  ASSERT_TRUE(fits.ok()) << fits.status().ToString();
  EXPECT_EQ(*fits, 1u);
  auto f = store->write_failure();
  ASSERT_TRUE(f.has_value()) << "a small append that fits ended the no-space failure";
  EXPECT_EQ(f->status.code(), Code::kNoSpace);
  EXPECT_EQ(f->bytes_needed, big.size());
  EXPECT_EQ(f->count, 1u);

  // Room for what failed: the next append that succeeds ends it.
  ClearFileFaultForTest();
  std::vector<uint8_t> rest;
  RecordMaker rest_maker(2);
  for (int i = 0; i < 3; ++i) {
    rest_maker.Write(&rest, 0, i * 700000ull, std::vector<uint8_t>(700000, 0x51 + i));
  }
  ASSERT_EQ(store->Append(rest).value(), 4u);
  EXPECT_FALSE(store->write_failure().has_value());

  // A failure that is not for space (EIO) ends at the next success, small or not.
  SetFileFaultForTest({.path_part = dir_, .err = EIO, .write_bytes_left = 0});
  std::vector<uint8_t> more;
  RecordMaker more_maker(5);
  more_maker.Write(&more, 0, 0, std::vector<uint8_t>(8192, 0x61));
  ASSERT_EQ(store->Append(more).status().code(), Code::kIoError);
  ClearFileFaultForTest();
  ASSERT_TRUE(store->write_failure().has_value());
  ASSERT_EQ(store->Append(more).value(), 5u);
  EXPECT_FALSE(store->write_failure().has_value());
}

// A full file system: a failed append changes nothing (durable seq, next seq expected,
// index, journal); the store says why, with the bytes it needed; the same records are
// taken once there is room, and survive a reopen.
TEST_F(RecoveryStoreTest, AFailedAppendChangesNothingAndTheSameRecordsGoInLater) {
  auto store = RecoveryStore::Create(dir_, {{"a", kDisk0}}, 0).value();
  RecordMaker mk(1);
  std::vector<uint8_t> first;
  mk.Write(&first, 0, 0, std::vector<uint8_t>(8192, 0x11));
  ASSERT_EQ(store->Append(first).value(), 1u);
  std::vector<uint8_t> before(kDisk0);
  ASSERT_TRUE(store->ReadAt(0, 1, 0, before).ok());

  // Three records (2 MiB in all), on a file system with 100 KiB left: the first goes
  // partly to the file, then ENOSPC.
  std::vector<uint8_t> batch;
  for (int i = 0; i < 3; ++i) {
    mk.Write(&batch, 0, (1 + i) * 700000ull, std::vector<uint8_t>(700000, 0x21 + i));
  }
  const std::string journal = dir_ + "/journal";
  auto journal_bytes = [&] {
    uint64_t n = 0;
    for (auto& e : fs::directory_iterator(journal)) n += fs::file_size(e.path());
    return n;
  };
  uint64_t journal_before = journal_bytes();
  SetFileFaultForTest({.path_part = journal, .err = ENOSPC, .write_bytes_left = 100 << 10});
  auto failed = store->Append(batch);
  ClearFileFaultForTest();
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.status().code(), Code::kNoSpace) << failed.status().ToString();
  EXPECT_EQ(store->durable_seq(), 1u);
  // The partial bytes were cut back (to the logical end: the block padding goes too).
  EXPECT_LE(journal_bytes(), journal_before);
  auto f = store->write_failure();
  ASSERT_TRUE(f.has_value());
  EXPECT_EQ(f->status.code(), Code::kNoSpace);
  EXPECT_EQ(f->bytes_needed, batch.size());
  EXPECT_EQ(f->what, "journal append");
  EXPECT_EQ(f->count, 1u);
  // Nothing of the failed records is readable, and seq 2 does not exist yet.
  std::vector<uint8_t> now(kDisk0);
  ASSERT_TRUE(store->ReadAt(0, 1, 0, now).ok());
  EXPECT_EQ(now, before);
  EXPECT_FALSE(store->ReadAt(0, 2, 0, now).ok());
  EXPECT_TRUE(store->ChangedAfter(1).value()[0].empty());

  // A second failure in the same place: still nothing changes (no "seq 2 where 3").
  SetFileFaultForTest({.path_part = journal, .err = ENOSPC, .write_bytes_left = 0});
  EXPECT_EQ(store->Append(batch).status().code(), Code::kNoSpace);
  ClearFileFaultForTest();
  EXPECT_EQ(store->write_failure()->count, 2u);

  // Room again: the very same records go in.
  auto ok = store->Append(batch);
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  EXPECT_EQ(*ok, 4u);
  EXPECT_FALSE(store->write_failure().has_value());
  std::vector<uint8_t> chunk(700000);
  ASSERT_TRUE(store->ReadAt(0, 4, 2 * 700000, chunk).ok());
  EXPECT_EQ(chunk, std::vector<uint8_t>(700000, 0x22));

  // And they are what a reopened store holds.
  store.reset();
  auto reopened = RecoveryStore::Open(dir_).value();
  EXPECT_EQ(reopened->durable_seq(), 4u);
  ASSERT_TRUE(reopened->ReadAt(0, 4, 3 * 700000, chunk).ok());
  EXPECT_EQ(chunk, std::vector<uint8_t>(700000, 0x23));
  ASSERT_TRUE(reopened->ReadAt(0, 4, 0, chunk).ok());
  EXPECT_EQ(chunk[0], 0x11);
}

// A sync that fails (some file systems report ENOSPC there) is undone the same way.
TEST_F(RecoveryStoreTest, AFailedSyncUndoesTheAppend) {
  auto store = RecoveryStore::Create(dir_, {{"a", kDisk0}}, 0).value();
  RecordMaker mk(1);
  std::vector<uint8_t> batch;
  mk.Write(&batch, 0, 4096, std::vector<uint8_t>(4096, 0x31));
  mk.Zero(&batch, 0, 0, 4096);
  SetFileFaultForTest({.path_part = dir_ + "/journal",
                       .err = ENOSPC,
                       .write_bytes_left = UINT64_MAX,
                       .fail_sync = true});
  EXPECT_EQ(store->Append(batch).status().code(), Code::kNoSpace);
  ClearFileFaultForTest();
  EXPECT_EQ(store->durable_seq(), 0u);
  ASSERT_EQ(store->Append(batch).value(), 2u);
  std::vector<uint8_t> got(4096);
  ASSERT_TRUE(store->ReadAt(0, 2, 4096, got).ok());
  EXPECT_EQ(got, std::vector<uint8_t>(4096, 0x31));
}

// A damaged record in the middle of a batch: none of the batch is taken.
TEST_F(RecoveryStoreTest, ABadRecordRefusesTheWholeBatch) {
  auto store = RecoveryStore::Create(dir_, {{"a", kDisk0}}, 0).value();
  RecordMaker mk(1);
  std::vector<uint8_t> batch;
  mk.Write(&batch, 0, 0, std::vector<uint8_t>(4096, 0x41));
  size_t second = batch.size();
  mk.Write(&batch, 0, 4096, std::vector<uint8_t>(4096, 0x42));
  auto bad = batch;
  bad[second + RecordHeader::kSize + 10] ^= 1;
  EXPECT_EQ(store->Append(bad).status().code(), Code::kCorruption);
  EXPECT_EQ(store->durable_seq(), 0u);
  EXPECT_EQ(store->Append(batch).value(), 2u);  // not "record seq 1 where 2 was expected"
}

// ---- resumable resynchronization: the staged list --------------------------------------

// Bytes `v` repeated over `n`, for one staged region.
std::vector<uint8_t> Fill(size_t n, uint8_t v) {
  return std::vector<uint8_t>(n, v);
}

std::string StagedList(const std::string& dir) {
  return dir + "/staging/staged.list";
}

// An initial copy cut by a restart of the recovery site: what was checkpointed is staged
// still (and said so: bytes and where it ends), what came after is not; the copy goes on
// from there, records after its start stay, and the commit gives every byte.
TEST_F(RecoveryStoreTest, StagedRegionsSurviveAReopenAndTheCopyGoesOn) {
  {
    auto store = RecoveryStore::Create(dir_, {{"a", kDisk0}, {"b", kDisk1}}, 0,
                                       RecoveryStore::Start::kFullCopy)
                     .value();
    ASSERT_TRUE(store->BeginInitialSync(5).ok());
    EXPECT_FALSE(store->staged_progress().has_value());  // nothing durable yet
    ASSERT_TRUE(store->ResyncWrite(0, 0, Fill(65536, 0xa1)).ok());
    ASSERT_TRUE(store->ResyncWrite(0, 65536, Fill(65536, 0xa2)).ok());
    ASSERT_TRUE(store->ResyncWrite(1, 4096, Fill(8192, 0xb1)).ok());
    ASSERT_TRUE(store->CheckpointResync().ok());
    auto p = store->staged_progress();
    ASSERT_TRUE(p.has_value());
    EXPECT_EQ(p->from, 5u);
    EXPECT_TRUE(p->initial);
    EXPECT_EQ(p->bytes, 65536u * 2 + 8192);
    EXPECT_EQ(p->end_disk, 1u);
    EXPECT_EQ(p->end_offset, 4096u + 8192);
    // A record after the copy's start, then a region that is never checkpointed.
    std::vector<uint8_t> wire;
    RecordMaker(6).Write(&wire, 0, 100, {9, 9, 9});
    ASSERT_EQ(store->Append(wire).value(), 6u);
    ASSERT_TRUE(store->ResyncWrite(1, 65536, Fill(4096, 0xb2)).ok());
  }  // the daemon goes (nothing more is synced)
  auto store = RecoveryStore::Open(dir_).value();
  EXPECT_TRUE(store->initial_sync_pending());
  EXPECT_EQ(store->durable_seq(), 6u);
  auto p = store->staged_progress();
  ASSERT_TRUE(p.has_value());
  EXPECT_EQ(p->bytes, 65536u * 2 + 8192);
  EXPECT_EQ(p->end_disk, 1u);
  EXPECT_EQ(p->end_offset, 4096u + 8192);
  // Another copy's cursor is refused and changes nothing.
  EXPECT_EQ(store->ResumeResync(4, true, p->bytes).code(), Code::kFailedPrecondition);
  EXPECT_EQ(store->ResumeResync(5, false, p->bytes).code(), Code::kFailedPrecondition);
  EXPECT_EQ(store->ResumeResync(5, true, p->bytes + 1).code(), Code::kFailedPrecondition);
  ASSERT_TRUE(store->ResumeResync(5, true, p->bytes).ok());
  ASSERT_TRUE(store->ResyncWrite(1, 65536, Fill(4096, 0xb3)).ok());
  ASSERT_TRUE(store->CommitResync(6).ok());
  EXPECT_FALSE(store->initial_sync_pending());
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/staging"));
  std::vector<uint8_t> got(65536);
  ASSERT_TRUE(store->ReadAt(0, 6, 0, got).ok());
  EXPECT_EQ(got[0], 0xa1);
  EXPECT_EQ(got[99], 0xa1);
  EXPECT_EQ(got[100], 9);  // the record after the copy's start, on top
  EXPECT_EQ(got[103], 0xa1);
  ASSERT_TRUE(store->ReadAt(0, 6, 65536, got).ok());
  EXPECT_EQ(got, Fill(65536, 0xa2));
  std::vector<uint8_t> b(4096);
  ASSERT_TRUE(store->ReadAt(1, 6, 4096, b).ok());
  EXPECT_EQ(b, Fill(4096, 0xb1));
  ASSERT_TRUE(store->ReadAt(1, 6, 65536, b).ok());
  EXPECT_EQ(b, Fill(4096, 0xb3));  // sent again after the resume
}

// Within one process too (a cut, not a restart): a resume forgets what was not
// checkpointed, so the sender's cursor and the store agree.
TEST_F(RecoveryStoreTest, AResumeForgetsWhatWasNotCheckpointed) {
  auto store =
      RecoveryStore::Create(dir_, {{"a", kDisk1}}, 0, RecoveryStore::Start::kFullCopy).value();
  ASSERT_TRUE(store->BeginInitialSync(0).ok());
  ASSERT_TRUE(store->ResyncWrite(0, 0, Fill(4096, 1)).ok());
  ASSERT_TRUE(store->CheckpointResync().ok());
  ASSERT_TRUE(store->ResyncWrite(0, 8192, Fill(4096, 2)).ok());  // not checkpointed
  ASSERT_TRUE(store->ResumeResync(0, true, 4096).ok());
  ASSERT_TRUE(store->CheckpointResync().ok());  // nothing pending: the cursor stays
  EXPECT_EQ(store->staged_progress()->bytes, 4096u);
  ASSERT_TRUE(store->CommitResync(0).ok());
  std::vector<uint8_t> got(4096);
  ASSERT_TRUE(store->ReadAt(0, 0, 8192, got).ok());
  EXPECT_EQ(got, Fill(4096, 0));  // forgotten: never committed
}

// A damaged staged list is no reason not to open the store: the copy starts over.
TEST_F(RecoveryStoreTest, ADamagedStagedListMeansStartingOverNotFailing) {
  {
    auto store =
        RecoveryStore::Create(dir_, {{"a", kDisk1}}, 0, RecoveryStore::Start::kFullCopy).value();
    ASSERT_TRUE(store->BeginInitialSync(0).ok());
    for (int i = 0; i < 3; ++i) {
      // Regions apart from each other: one record each.
      ASSERT_TRUE(store->ResyncWrite(0, i * 65536, Fill(4096, 7)).ok());
      ASSERT_TRUE(store->CheckpointResync().ok());
    }
    EXPECT_EQ(store->staged_progress()->bytes, 3u * 4096);
  }
  auto size = std::filesystem::file_size(StagedList(dir_));
  ASSERT_EQ(size, 64u + 3 * 32);
  {
    // A torn last record (a crash while it was appended): cut off, the rest stands.
    std::fstream f(StagedList(dir_), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(64 + 2 * 32 + 8);
    f.put('\x55');
  }
  {
    auto store = RecoveryStore::Open(dir_).value();
    auto p = store->staged_progress();
    ASSERT_TRUE(p.has_value());
    EXPECT_EQ(p->bytes, 2u * 4096);
    EXPECT_EQ(p->end_offset, 65536u + 4096);
    EXPECT_EQ(std::filesystem::file_size(StagedList(dir_)), 64u + 2 * 32);
  }
  {
    // Damage before the last record: the list cannot be trusted at all.
    std::fstream f(StagedList(dir_), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(64 + 0 * 32 + 8);
    f.put('\x55');
  }
  {
    auto store = RecoveryStore::Open(dir_).value();
    EXPECT_TRUE(store->initial_sync_pending());
    EXPECT_FALSE(store->staged_progress().has_value());
    EXPECT_EQ(store->ResumeResync(0, true, 4096).code(), Code::kFailedPrecondition);
    // Data without a RESYNC_BEGIN is refused, not written through a missing staging image.
    EXPECT_EQ(store->ResyncWrite(0, 0, Fill(4096, 1)).code(), Code::kInvalidArgument);
    ASSERT_TRUE(store->BeginInitialSync(0).ok());  // starts over
    EXPECT_FALSE(store->staged_progress().has_value());
    ASSERT_TRUE(store->ResyncWrite(0, 0, Fill(4096, 3)).ok());
    ASSERT_TRUE(store->CommitResync(0).ok());
    std::vector<uint8_t> got(4096);
    ASSERT_TRUE(store->ReadAt(0, 0, 65536, got).ok());
    EXPECT_EQ(got, Fill(4096, 0));  // the old staged regions are gone
  }
  // A list of another resync (its header names another start), or garbage: starts over.
  for (auto [dir, from] : {std::pair{dir_ + "2", 3}, std::pair{dir_ + "3", 0}}) {
    auto store =
        RecoveryStore::Create(dir, {{"a", kDisk1}}, 0, RecoveryStore::Start::kFullCopy).value();
    ASSERT_TRUE(store->BeginInitialSync(from).ok());
    ASSERT_TRUE(store->ResyncWrite(0, 0, Fill(4096, 1)).ok());
    ASSERT_TRUE(store->CheckpointResync().ok());
  }
  const std::string other = dir_ + "3";
  ASSERT_TRUE(RecoveryStore::Open(other).value()->staged_progress().has_value());
  std::filesystem::copy_file(StagedList(dir_ + "2"), StagedList(other),
                             std::filesystem::copy_options::overwrite_existing);
  EXPECT_TRUE(RecoveryStore::Open(other).value()->initial_sync_pending());
  EXPECT_FALSE(RecoveryStore::Open(other).value()->staged_progress().has_value());
  std::ofstream(StagedList(other), std::ios::binary | std::ios::trunc) << "garbage";
  EXPECT_FALSE(RecoveryStore::Open(other).value()->staged_progress().has_value());
  std::filesystem::remove(StagedList(other));
  EXPECT_FALSE(RecoveryStore::Open(other).value()->staged_progress().has_value());
  std::filesystem::remove_all(dir_ + "3");
  std::filesystem::remove_all(dir_ + "2");
}

// A peer's offset near 2^64 must not wrap past the disk's end check.
TEST_F(RecoveryStoreTest, ResyncDataWhoseEndWrapsIsRefused) {
  auto store =
      RecoveryStore::Create(dir_, {{"a", kDisk1}}, 0, RecoveryStore::Start::kFullCopy).value();
  ASSERT_TRUE(store->BeginInitialSync(0).ok());
  EXPECT_EQ(store->ResyncWrite(0, UINT64_MAX - 10, Fill(4096, 1)).code(), Code::kInvalidArgument);
  EXPECT_EQ(store->ResyncWrite(0, kDisk1 - 100, Fill(4096, 1)).code(), Code::kInvalidArgument);
}

// Checkpoints come by themselves every kStagedCheckpointBytes.
TEST_F(RecoveryStoreTest, RegionsAreCheckpointedAsTheyCome) {
  constexpr uint64_t kBig = 40 << 20;
  auto store =
      RecoveryStore::Create(dir_, {{"a", kBig}}, 0, RecoveryStore::Start::kFullCopy).value();
  ASSERT_TRUE(store->BeginInitialSync(0).ok());
  std::vector<uint8_t> chunk(1 << 20, 5);
  for (uint64_t off = 0; off < RecoveryStore::kStagedCheckpointBytes; off += chunk.size()) {
    ASSERT_TRUE(store->ResyncWrite(0, off, chunk).ok());
  }
  // By bytes at the latest (by time too, on a slow machine): never none.
  auto p = store->staged_progress();
  ASSERT_TRUE(p.has_value());
  EXPECT_GT(p->bytes, 0u);
  EXPECT_EQ(p->bytes % chunk.size(), 0u);
  EXPECT_EQ(p->end_offset, p->bytes);
  // One record per checkpoint: the regions of each follow each other.
  auto list = std::filesystem::file_size(StagedList(dir_));
  EXPECT_EQ((list - 64) % 32, 0u);
  EXPECT_LE((list - 64) / 32, p->bytes / chunk.size());
}

}  // namespace
}  // namespace osr::store

namespace osr::store {
namespace {

namespace fs = std::filesystem;
using capture::RecordHeader;

// A history of small records over two small disks, and the model state after each seq.
struct SmallHistory {
  static constexpr uint64_t kBytes = 128 << 10;
  std::vector<std::vector<std::vector<uint8_t>>> states;  // states[seq][disk]
  std::vector<std::vector<uint8_t>> batches;              // encoded, ~10 records each

  explicit SmallHistory(int records, uint32_t seed = 3) {
    std::mt19937 rng(seed);
    std::vector<std::vector<uint8_t>> model(2, std::vector<uint8_t>(kBytes, 0));
    states.push_back(model);
    RecordMaker mk(1);
    std::vector<uint8_t> wire;
    for (int i = 0; i < records; ++i) {
      uint32_t d = rng() % 2;
      uint64_t len = 1 + rng() % 20000;
      uint64_t off = rng() % (kBytes - len);
      if (rng() % 6 == 0) {
        mk.Zero(&wire, d, off, len);
        std::fill(model[d].begin() + off, model[d].begin() + off + len, 0);
      } else {
        std::vector<uint8_t> data(len);
        for (auto& b : data) b = static_cast<uint8_t>(rng());
        mk.Write(&wire, d, off, data);
        std::copy(data.begin(), data.end(), model[d].begin() + off);
      }
      states.push_back(model);
      if (i % 10 == 9 || i + 1 == records) batches.push_back(std::exchange(wire, {}));
    }
  }
  uint64_t last() const { return states.size() - 1; }
  // "" when disk d at seq reads as the model says, else what differs.
  std::string Check(RecoveryStore& s, uint64_t seq, uint32_t d) const {
    std::vector<uint8_t> got(kBytes);
    Status st = s.ReadAt(d, seq, 0, got);
    if (!st.ok()) return "seq " + std::to_string(seq) + ": " + st.ToString();
    if (got != states[seq][d]) {
      return "seq " + std::to_string(seq) + " disk " + std::to_string(d) + " differs";
    }
    return "";
  }
};

size_t SegmentCount(const std::string& dir) {
  size_t n = 0;
  for (auto& e : fs::directory_iterator(dir + "/journal")) n += e.path().extension() == ".log";
  return n;
}

}  // namespace

// A fold goes one journal segment per step; reads of seqs above the step, a view and a
// failover disk's reads go on while a step is half done (its records in the base, base_seq
// not moved yet), and read what the model says.
TEST_F(RecoveryStoreTest, AFoldStepLetsReadsOfLaterSeqsGoOn) {
  SmallHistory h(300);
  StoreOptions small;
  small.journal_segment_bytes = 256 << 10;  // many segments: many steps
  auto store = std::shared_ptr<RecoveryStore>(
      RecoveryStore::Create(dir_, {{"a", h.kBytes}, {"b", h.kBytes}}, 0,
                            RecoveryStore::Start::kEmpty, {}, {}, small)
          .value());
  for (auto& b : h.batches) ASSERT_TRUE(store->Append(b).ok());
  size_t segments_before = SegmentCount(dir_);
  ASSERT_GT(segments_before, 4u);
  const uint64_t pin = 220;
  ASSERT_TRUE(store->Pin(pin).ok());
  // A failed-over VM's disk at a later point, written in one region, read in all.
  const uint64_t failover_seq = 260;
  auto disk = FailoverDisk::Open(dir_ + "-failover.img", store, 1, failover_seq, 4096).value();
  std::vector<uint8_t> own(4096, 0x5A);
  ASSERT_TRUE(disk->Write(8192, own).ok());
  std::vector<uint8_t> failover_model = h.states[failover_seq][1];
  std::copy(own.begin(), own.end(), failover_model.begin() + 8192);
  int steps = 0;
  std::string failures;
  store->SetFoldStepHookForTest([&](uint64_t target) {
    ++steps;
    EXPECT_LT(store->base_seq(), target);
    // Another thread reads while this step is half done: it must not wait for it.
    std::thread reader([&] {
      for (uint64_t seq : {target, (target + h.last()) / 2, pin, h.last()}) {
        for (uint32_t d = 0; d < 2; ++d) failures += h.Check(*store, seq, d);
      }
      std::vector<uint8_t> got(h.kBytes);
      Status st = disk->Read(0, got);
      if (!st.ok() || got != failover_model) failures += "the failover disk reads wrong; ";
      // Below the step: refused, never wrong.
      if (target > 1) {
        std::vector<uint8_t> got(16);
        Status st = store->ReadAt(0, target - 1, 0, got);
        if (st.code() != Code::kOutOfRange) failures += "seq below the step read: " + st.ToString();
      }
    });
    reader.join();
    return Status::Ok();
  });
  EXPECT_EQ(store->Fold(h.last()).value(), pin);  // the pin holds it back
  EXPECT_GT(steps, 2);
  EXPECT_EQ(failures, "");
  EXPECT_LT(SegmentCount(dir_), segments_before);
  for (uint64_t seq = pin; seq <= h.last(); seq += 9) {
    for (uint32_t d = 0; d < 2; ++d) EXPECT_EQ(h.Check(*store, seq, d), "");
  }
  store->Unpin(pin);
  disk.reset();
  fs::remove(dir_ + "-failover.img");
  fs::remove(dir_ + "-failover.img.cow");
}

// A fold step cut short after its records reached the base (a crash there, here a failing
// hook) leaves seqs below the step unreadable, never wrong; the next open finishes it.
TEST_F(RecoveryStoreTest, AFoldCutShortIsFinishedAtOpen) {
  SmallHistory h(120);
  {
    auto store = RecoveryStore::Create(dir_, {{"a", h.kBytes}, {"b", h.kBytes}}, 0).value();
    for (auto& b : h.batches) ASSERT_TRUE(store->Append(b).ok());
    store->SetFoldStepHookForTest([](uint64_t) { return IoError("power lost"); });
    auto folded = store->Fold(80);
    ASSERT_FALSE(folded.ok());
    EXPECT_EQ(store->base_seq(), 0u);
    std::vector<uint8_t> got(16);
    EXPECT_EQ(store->ReadAt(1, 40, 0, got).code(), Code::kOutOfRange);
    EXPECT_EQ(h.Check(*store, 80, 0), "");
    EXPECT_EQ(h.Check(*store, 100, 1), "");
  }
  auto store = RecoveryStore::Open(dir_).value();
  EXPECT_EQ(store->base_seq(), 80u);
  for (uint64_t seq = 80; seq <= h.last(); seq += 5) {
    for (uint32_t d = 0; d < 2; ++d) EXPECT_EQ(h.Check(*store, seq, d), "");
  }
}

// The index is derived from the journal: lost, of another journal, or ahead of the
// journal, it is made right at open and every seq reads as before.
TEST_F(RecoveryStoreTest, AnIndexLostOrOfAnotherJournalOrAheadIsMadeRightAtOpen) {
  SmallHistory h(150);
  {
    auto store = RecoveryStore::Create(dir_, {{"a", h.kBytes}, {"b", h.kBytes}}, 0).value();
    for (auto& b : h.batches) ASSERT_TRUE(store->Append(b).ok());
  }
  auto check_all = [&](RecoveryStore& s, uint64_t last) {
    for (uint64_t seq = 0; seq <= last; seq += 3) {
      for (uint32_t d = 0; d < 2; ++d) ASSERT_EQ(h.Check(s, seq, d), "");
    }
  };
  // Lost.
  fs::remove_all(dir_ + "/index");
  check_all(*RecoveryStore::Open(dir_).value(), h.last());
  // Of another journal (store.json names a different one).
  {
    std::ifstream in(dir_ + "/store.json");
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    auto pos = text.find("\"journal_id\"");
    ASSERT_NE(pos, std::string::npos);
    auto end = text.find_first_of(",\n}", pos + 13);
    text.replace(pos, end - pos, "\"journal_id\": 12345");
    std::ofstream(dir_ + "/store.json", std::ios::trunc) << text;
  }
  check_all(*RecoveryStore::Open(dir_).value(), h.last());
  // Ahead of the journal: its last records are lost (cut at a record boundary), and the
  // same seqs come again with other bytes.
  uint64_t keep = 0;
  {
    std::string seg;
    for (auto& e : fs::directory_iterator(dir_ + "/journal")) {
      if (e.path().extension() == ".log") seg = e.path();
    }
    // The record boundaries, from the journal itself.
    std::vector<std::pair<uint64_t, uint64_t>> ends;  // seq, byte after it
    auto summary = capture::LogReader::ScanWithPositions(
        dir_ + "/journal", [&](const RecordHeader& rh, std::span<const uint8_t>,
                               const capture::SegmentInfo&, uint64_t pos) {
          ends.emplace_back(rh.seq, pos + rh.payload_bytes);
          return true;
        });
    ASSERT_TRUE(summary.ok());
    ASSERT_GT(ends.size(), 20u);
    keep = ends[ends.size() - 11].first;
    fs::resize_file(seg, ends[ends.size() - 11].second);
  }
  auto store = RecoveryStore::Open(dir_).value();
  EXPECT_EQ(store->durable_seq(), keep);
  check_all(*store, keep);
  std::vector<uint8_t> wire;
  RecordMaker mk(keep + 1);
  mk.Write(&wire, 0, 0, std::vector<uint8_t>(h.kBytes, 0xEE));
  ASSERT_EQ(store->Append(wire).value(), keep + 1);
  std::vector<uint8_t> got(h.kBytes);
  ASSERT_TRUE(store->ReadAt(0, keep + 1, 0, got).ok());
  EXPECT_EQ(got, std::vector<uint8_t>(h.kBytes, 0xEE));
  EXPECT_EQ(h.Check(*store, keep, 1), "");
}

}  // namespace osr::store

namespace osr::store {
namespace {

// Thinning then compaction: the kept points (and every seq after the compacted part) read
// byte-exact against the model across reopen, a second thinning, a lost index and a fold
// through the compacted part; the seqs between kept points are refused, never wrong; the
// journal shrinks to about the distinct data per kept point.
TEST(RecoveryStoreCompactionTest, KeptPointsStayExactAndTheRestGoes) {
  std::string dir = fs::temp_directory_path() / ("osr-compact-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  // Overwrite-heavy: 600 records of 4-20 KiB over two 128 KiB disks.
  SmallHistory h(600, 9);
  StoreOptions small;
  small.journal_segment_bytes = 256 << 10;
  auto store = RecoveryStore::Create(dir, {{"a", h.kBytes}, {"b", h.kBytes}}, 0,
                                     RecoveryStore::Start::kEmpty, {}, {}, small)
                   .value();
  for (auto& b : h.batches) ASSERT_TRUE(store->Append(b).ok());
  std::vector<uint64_t> keep = {50, 120, 121, 300, 410};
  uint64_t before = store->history_bytes();
  ASSERT_TRUE(store->Pin(77).ok());  // a view at a seq that would go: refused
  auto refused = store->Compact(keep, 500);
  EXPECT_EQ(refused.status().code(), Code::kFailedPrecondition) << refused.status().ToString();
  store->Unpin(77);
  auto r = store->Compact(keep, 500);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  uint64_t e = r->compacted_through;
  EXPECT_LE(e, 500u);
  EXPECT_GT(e, 410u);
  EXPECT_LT(r->bytes_after, before / 2) << "before " << before << " after " << r->bytes_after;
  auto check = [&](RecoveryStore& s, std::vector<uint64_t> kept, uint64_t from) {
    for (uint64_t k : kept) {
      if (k <= from) continue;
      for (uint32_t d = 0; d < 2; ++d) ASSERT_EQ(h.Check(s, k, d), "") << "kept " << k;
    }
    for (uint64_t seq = e; seq <= h.last(); seq += 7) {
      for (uint32_t d = 0; d < 2; ++d) ASSERT_EQ(h.Check(s, seq, d), "");
    }
    for (uint64_t seq : {from + 1, uint64_t{51}, uint64_t{299}, e - 1}) {
      if (seq <= from || std::find(kept.begin(), kept.end(), seq) != kept.end()) continue;
      std::vector<uint8_t> got(16);
      Status st = s.ReadAt(0, seq, 0, got);
      ASSERT_EQ(st.code(), Code::kOutOfRange) << "seq " << seq << ": " << st.ToString();
      EXPECT_NE(st.message().find("compacted"), std::string::npos) << st.message();
    }
  };
  check(*store, keep, 0);
  // Appends go on after it.
  std::vector<uint8_t> wire;
  RecordMaker mk(h.last() + 1);
  mk.Write(&wire, 1, 100, {1, 2, 3});
  ASSERT_EQ(store->Append(wire).value(), h.last() + 1);
  // Reopened: the same.
  store.reset();
  store = RecoveryStore::Open(dir, small).value();
  EXPECT_EQ(store->compacted_through(), e);
  check(*store, keep, 0);
  // A second thinning: 121 and 300 go too; a seq already gone cannot come back.
  EXPECT_EQ(store->Compact({50, 60, 410}, 500).status().code(), Code::kInvalidArgument);
  keep = {50, 120, 410};
  ASSERT_TRUE(store->Compact(keep, 500).ok());
  check(*store, keep, 0);
  // The index lost: made again from the history files and the journal.
  store.reset();
  fs::remove_all(dir + "/index");
  store = RecoveryStore::Open(dir, small).value();
  check(*store, keep, 0);
  // Folding through the compacted part: one kept interval at a time, and a fold to a
  // seq between kept points stops at the kept one below it.
  EXPECT_EQ(store->Fold(130).value(), 120u);
  check(*store, keep, 120);
  EXPECT_EQ(store->Fold(e + 5).value(), e + 5);
  for (uint64_t seq = e + 5; seq <= h.last(); seq += 11) {
    for (uint32_t d = 0; d < 2; ++d) ASSERT_EQ(h.Check(*store, seq, d), "");
  }
  EXPECT_FALSE(fs::exists(dir + "/history") && !fs::is_empty(dir + "/history"));
  store.reset();
  fs::remove_all(dir);
}

}  // namespace
}  // namespace osr::store
