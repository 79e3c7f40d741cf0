#include "capture/capture_log.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <thread>

#include "capture/log_reader.h"
#include "common/crc32c.h"
#include "common/file.h"

namespace osr::capture {
namespace {

namespace fs = std::filesystem;

class CaptureLogTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("osr-caplog-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::unique_ptr<CaptureLog> OpenLog(uint64_t segment_bytes = 64ull << 20) {
    CaptureLogOptions o;
    o.dir = dir_;
    o.disk_bytes = 1 << 20;
    o.segment_bytes_target = segment_bytes;
    auto log = CaptureLog::Open(o, [this](std::span<const CaptureLog::Written> records, bool ok) {
      std::lock_guard lock(mu_);
      for (auto& r : records) written_.push_back({r.offset, r.length, ok});
    });
    EXPECT_TRUE(log.ok()) << log.status().ToString();
    return log.ok() ? std::move(log).value() : nullptr;
  }

 public:
  uint64_t AppendWritePublic(CaptureLog& log, uint64_t off, std::vector<uint8_t> data) {
    return AppendWrite(log, off, std::move(data));
  }

 protected:
  uint64_t AppendWrite(CaptureLog& log, uint64_t off, std::vector<uint8_t> data) {
    auto seq = log.Append(RecordKind::kWrite, off, data.size(), data, Crc32c(data));
    EXPECT_TRUE(seq.has_value());
    return seq.value_or(0);
  }
  std::vector<uint64_t> ScanSeqs(LogReader::Summary* summary = nullptr) {
    std::vector<uint64_t> seqs;
    auto s = LogReader::Scan(dir_, [&](const RecordHeader& h, std::span<const uint8_t> p) {
      seqs.push_back(h.seq);
      EXPECT_EQ(p.size(), h.payload_bytes);
      return true;
    });
    EXPECT_TRUE(s.ok());
    if (summary && s.ok()) *summary = *s;
    return seqs;
  }

  struct Written {
    uint64_t off, len;
    bool ok;
  };
  std::string dir_;
  std::mutex mu_;
  std::vector<Written> written_;
};

TEST_F(CaptureLogTest, AppendSyncScanAndContinueAfterReopen) {
  {
    auto log = OpenLog();
    EXPECT_EQ(AppendWrite(*log, 0, {1, 2, 3}), 1u);
    EXPECT_EQ(AppendWrite(*log, 100, std::vector<uint8_t>(5000, 9)), 2u);
    EXPECT_EQ(*log->Append(RecordKind::kTrim, 4096, 4096, {}, 0), 3u);
    ASSERT_TRUE(log->Sync().ok());
    EXPECT_EQ(log->written_seq(), 3u);
  }
  EXPECT_EQ(ScanSeqs(), (std::vector<uint64_t>{1, 2, 3}));
  {
    std::lock_guard lock(mu_);
    ASSERT_EQ(written_.size(), 3u);  // every record reported written, with its range
    EXPECT_EQ(written_[1].off, 100u);
    EXPECT_EQ(written_[1].len, 5000u);
    EXPECT_TRUE(written_[2].ok);
  }
  auto log = OpenLog();
  EXPECT_EQ(log->last_seq(), 3u);
  EXPECT_EQ(AppendWrite(*log, 0, {4}), 4u);
  ASSERT_TRUE(log->Sync().ok());
  EXPECT_EQ(ScanSeqs(), (std::vector<uint64_t>{1, 2, 3, 4}));
}

TEST_F(CaptureLogTest, SegmentsRollAtRecordBoundaries) {
  {
    auto log = OpenLog(/*segment_bytes=*/16 * 1024);
    for (int i = 0; i < 40; ++i) {
      AppendWrite(*log, i * 1000, std::vector<uint8_t>(1000, i));
      if (i % 5 == 4) {
        ASSERT_TRUE(log->Sync().ok());  // a write-out every 5 records
      }
    }
    ASSERT_TRUE(log->Sync().ok());
  }
  auto segs = ListSegments(dir_);
  ASSERT_TRUE(segs.ok());
  EXPECT_GE(segs->size(), 3u);
  // A segment is closed once a write-out takes it past the target, and its zero
  // padding is cut off.
  for (size_t i = 0; i + 1 < segs->size(); ++i) {
    EXPECT_GE(fs::file_size((*segs)[i].path), 16u * 1024) << (*segs)[i].path;
    EXPECT_LT(fs::file_size((*segs)[i].path), 16u * 1024 + 5 * (64 + 1000)) << (*segs)[i].path;
  }
  std::vector<uint64_t> want(40);
  std::iota(want.begin(), want.end(), 1);
  EXPECT_EQ(ScanSeqs(), want);
}

// Five records synced; then the last one is damaged (a torn write, or bit rot since: the
// log cannot tell which). Returns the segment's path.
std::string WriteFiveAndDamageTheLast(CaptureLogTest* t, CaptureLog* log, const fs::path& dir) {
  for (int i = 0; i < 5; ++i) t->AppendWritePublic(*log, 0, std::vector<uint8_t>(512, i));
  EXPECT_TRUE(log->Sync().ok());
  auto segs = ListSegments(dir).value();
  EXPECT_EQ(segs.size(), 1u);
  return segs[0].path;
}

TEST_F(CaptureLogTest, ADamagedTailIsCutAndTheCutIsRecordedFirst) {
  std::string seg;
  {
    auto log = OpenLog();
    seg = WriteFiveAndDamageTheLast(this, log.get(), dir_);
  }
  uint64_t size = fs::file_size(seg);
  fs::resize_file(seg, size - 100);  // a crash in the middle of the last record
  LogReader::Summary s;
  ScanSeqs(&s);
  EXPECT_EQ(s.errors.size(), 1u);
  EXPECT_TRUE(s.tail_damaged);
  {
    auto log = OpenLog();
    ASSERT_NE(log, nullptr);
    EXPECT_EQ(log->last_seq(), 4u);
    auto cut = log->pending_cut();
    ASSERT_TRUE(cut.has_value());
    EXPECT_EQ(cut->after_seq, 4u);
    // The cut bytes (a 576-byte record less 100, plus padding) could hold 5..
    EXPECT_GE(cut->seq_bound, 5u);
    EXPECT_NE(cut->reason.find("byte"), std::string::npos) << cut->reason;
    EXPECT_TRUE(fs::exists(fs::path(dir_) / "cut.json"));
    // No record is taken until the recovery site says what it holds.
    EXPECT_TRUE(log->overflowed());
    EXPECT_FALSE(log->Append(RecordKind::kWrite, 0, 1, std::vector<uint8_t>{1},
                             Crc32c(std::vector<uint8_t>{1}))
                     .has_value());
  }
  // Still pending after another restart: the record says so, not the memory.
  auto log = OpenLog();
  ASSERT_TRUE(log->pending_cut().has_value());
  EXPECT_TRUE(log->overflowed());
}

TEST_F(CaptureLogTest, AfterACutNoSeqTheRecoverySiteHoldsIsHandedOutAgain) {
  std::string seg;
  {
    auto log = OpenLog();
    seg = WriteFiveAndDamageTheLast(this, log.get(), dir_);
  }
  // Record 5 was shipped and is durable at the recovery site; here it rots.
  {
    std::fstream f(seg, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(fs::file_size(seg) - 10));
    f.put('\x5a');
  }
  auto log = OpenLog();
  ASSERT_TRUE(log->pending_cut().has_value());
  EXPECT_EQ(log->last_seq(), 4u);
  ASSERT_TRUE(log->ResumeAfterCut(5).ok());
  EXPECT_FALSE(log->pending_cut().has_value());
  EXPECT_FALSE(fs::exists(fs::path(dir_) / "cut.json"));
  EXPECT_EQ(log->last_seq(), 5u);
  EXPECT_EQ(log->first_seq_held().value(), 6u);  // every record here is durable there
  EXPECT_TRUE(log->overflowed());                // a resync of every region ends it
  log->ResumeAfterOverflow();
  EXPECT_EQ(AppendWrite(*log, 0, {7}), 6u);
  ASSERT_TRUE(log->Sync().ok());
  log.reset();
  LogReader::Summary s;
  EXPECT_EQ(ScanSeqs(&s), (std::vector<uint64_t>{6}));
  EXPECT_TRUE(s.errors.empty());
  log = OpenLog();
  EXPECT_FALSE(log->pending_cut().has_value());
  EXPECT_EQ(log->last_seq(), 6u);
}

TEST_F(CaptureLogTest, ACutBeyondWhatTheRecoverySiteHoldsGoesOnAfterTheCut) {
  std::string seg;
  {
    auto log = OpenLog();
    seg = WriteFiveAndDamageTheLast(this, log.get(), dir_);
  }
  fs::resize_file(seg, fs::file_size(seg) - 100);
  auto log = OpenLog();
  // A peer that claims seqs this log never wrote is refused, and the cut stays.
  auto bound = log->pending_cut()->seq_bound;
  EXPECT_EQ(log->ResumeAfterCut(bound + 1).code(), Code::kCorruption);
  EXPECT_TRUE(log->pending_cut().has_value());
  ASSERT_TRUE(log->ResumeAfterCut(2).ok());  // the recovery site has 1..2: 3..4 are sent
  EXPECT_EQ(log->last_seq(), 4u);
  EXPECT_EQ(log->first_seq_held().value(), 1u);
  log->ResumeAfterOverflow();
  EXPECT_EQ(AppendWrite(*log, 0, {7}), 5u);
  ASSERT_TRUE(log->Sync().ok());
  EXPECT_EQ(ScanSeqs(), (std::vector<uint64_t>{1, 2, 3, 4, 5}));
}

TEST_F(CaptureLogTest, AResumeCutShortByACrashIsFinishedOnOpen) {
  {
    auto log = OpenLog();
    WriteFiveAndDamageTheLast(this, log.get(), dir_);
  }
  // As ResumeAfterCut(9) leaves it when the process dies after recording where it resumes.
  {
    std::ofstream f(fs::path(dir_) / "cut.json");
    f << R"({"version":1,"after_seq":5,"seq_bound":12,"time_ns":1,"reason":"test","resume_at":10})";
  }
  auto log = OpenLog();
  ASSERT_NE(log, nullptr);
  EXPECT_FALSE(log->pending_cut().has_value());
  EXPECT_FALSE(fs::exists(fs::path(dir_) / "cut.json"));
  EXPECT_EQ(log->last_seq(), 9u);
  EXPECT_EQ(AppendWrite(*log, 0, {7}), 10u);
}

TEST_F(CaptureLogTest, ADamagedCutRecordIsRefusedNotGuessed) {
  {
    auto log = OpenLog();
    WriteFiveAndDamageTheLast(this, log.get(), dir_);
  }
  for (const char* text :
       {"{", R"({"after_seq":"5","seq_bound":6})", R"({"after_seq":7,"seq_bound":6})",
        R"({"after_seq":5,"seq_bound":6,"resume_at":3})",
        R"({"after_seq":5,"seq_bound":6,"resume_at":9223372036854775000})"}) {
    {
      std::ofstream f(fs::path(dir_) / "cut.json");
      f << text;
    }
    CaptureLogOptions o;
    o.dir = dir_;
    o.disk_bytes = 1 << 20;
    auto log = CaptureLog::Open(o, nullptr);
    ASSERT_FALSE(log.ok()) << text;
    EXPECT_EQ(log.status().code(), Code::kCorruption) << text;
    EXPECT_NE(log.status().message().find("cut.json"), std::string::npos)
        << log.status().ToString();
  }
}

// Damage in the last segment with whole records after it: a power loss can leave that
// (a write-out's blocks reach the disk in any order), and osr cannot tell it from a synced
// record damaged later. Everything from the damage on is cut, and the cut is recorded
// first (as for a torn tail): nothing after it is mistaken for the log's.
TEST_F(CaptureLogTest, DamageInTheLastSegmentIsCutWithTheRecordsAfterIt) {
  {
    auto log = OpenLog();
    for (int i = 0; i < 5; ++i) AppendWrite(*log, 0, std::vector<uint8_t>(512, i));
    ASSERT_TRUE(log->Sync().ok());
  }
  auto path = ListSegments(dir_).value()[0].path;
  uint64_t size_before = fs::file_size(path);
  {
    auto f = File::Open(path, File::Mode::kReadWrite).value();
    uint8_t b;
    uint64_t at = SegmentHeader::kSize + (RecordHeader::kSize + 512) + RecordHeader::kSize + 10;
    ASSERT_TRUE(f.PRead(at, {&b, 1}).ok());
    b ^= 0x40;  // flip a bit in record 2's payload
    ASSERT_TRUE(f.PWrite(at, {&b, 1}).ok());
  }
  LogReader::Summary s;
  EXPECT_EQ(ScanSeqs(&s), (std::vector<uint64_t>{1}));
  ASSERT_EQ(s.errors.size(), 1u);
  EXPECT_NE(s.errors[0].message.find("CRC mismatch"), std::string::npos);
  EXPECT_EQ(s.errors[0].position, SegmentHeader::kSize + RecordHeader::kSize + 512);
  // An inspection tool reads on past the damage, and says where it resumed.
  std::vector<uint64_t> seen;
  auto r = LogReader::Scan(
      dir_,
      [&](const RecordHeader& h, std::span<const uint8_t>) {
        seen.push_back(h.seq);
        return true;
      },
      /*resync=*/true);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(seen, (std::vector<uint64_t>{1, 3, 4, 5}));
  ASSERT_GE(r->errors.size(), 2u);
  EXPECT_EQ(r->errors[1].position, SegmentHeader::kSize + 2 * (RecordHeader::kSize + 512));

  CaptureLogOptions o;
  o.dir = dir_;
  o.disk_bytes = 1 << 20;
  auto log = CaptureLog::Open(o, nullptr);
  ASSERT_TRUE(log.ok()) << log.status().ToString();
  auto cut = (*log)->pending_cut();
  ASSERT_TRUE(cut.has_value());
  EXPECT_EQ(cut->after_seq, 1u);
  EXPECT_GE(cut->seq_bound, 5u);  // no seq the cut bytes could hold is handed out again
  EXPECT_LT(fs::file_size(path), size_before);
}

TEST_F(CaptureLogTest, WrongDiskSizeIsRefused) {
  { auto log = OpenLog(); }  // a disk of 1 MiB
  CaptureLogOptions o;
  o.dir = dir_;
  o.disk_bytes = 512 << 10;  // smaller: another disk's log
  EXPECT_FALSE(CaptureLog::Open(o, nullptr).ok());
  o.disk_bytes = 2 << 20;  // grown (a disk-size record): the same disk's
  EXPECT_TRUE(CaptureLog::Open(o, nullptr).ok());
}

TEST_F(CaptureLogTest, ConcurrentAppendersGetAGapFreeSequence) {
  auto log = OpenLog(/*segment_bytes=*/256 * 1024);
  std::vector<std::thread> threads;
  std::mutex m;
  std::vector<uint64_t> got;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 500; ++i) {
        std::vector<uint8_t> d(100 + (i % 7) * 300, static_cast<uint8_t>(t));
        uint64_t s = AppendWrite(*log, t * 4096, d);
        std::lock_guard lock(m);
        got.push_back(s);
      }
    });
  }
  for (auto& th : threads) th.join();
  ASSERT_TRUE(log->Sync().ok());
  std::sort(got.begin(), got.end());
  std::vector<uint64_t> want(2000);
  std::iota(want.begin(), want.end(), 1);
  EXPECT_EQ(got, want);
  EXPECT_EQ(ScanSeqs(), want);
}

// The source's log on a full file system: the write-out fails, the unwritten records are
// dropped and reported not written (the bitmap keeps their regions), the sequence goes
// on after the last record written (no gap in the files), and the log takes no record
// until ResumeAfterOverflow (a resync ships the dropped regions).
TEST_F(CaptureLogTest, AFailedWriteOutDropsTheUnwrittenRecordsAndKeepsTheSequence) {
  auto log = OpenLog();
  for (int i = 0; i < 3; ++i) AppendWrite(*log, i * 4096, std::vector<uint8_t>(4096, 1 + i));
  ASSERT_TRUE(log->Sync().ok());
  uint64_t generation = log->overflow_generation();

  SetFileFaultForTest({.path_part = dir_, .err = ENOSPC, .write_bytes_left = 6000});
  size_t taken = 0;  // the writer thread may fail on the first before the others come
  for (int i = 0; i < 4; ++i) {
    std::vector<uint8_t> d(8192, 0x10 + i);
    taken += log->Append(RecordKind::kWrite, i * 8192, d.size(), d, Crc32c(d)).has_value();
  }
  ASSERT_GE(taken, 1u);
  Status st = log->Sync();
  ClearFileFaultForTest();
  EXPECT_EQ(st.code(), Code::kNoSpace) << st.ToString();
  EXPECT_EQ(log->write_error().code(), Code::kNoSpace);
  EXPECT_TRUE(log->overflowed());
  EXPECT_NE(log->overflow_generation(), generation);
  EXPECT_EQ(log->last_seq(), 3u);  // the next record is seq 4 again
  EXPECT_EQ(log->written_seq(), 3u);
  {
    std::lock_guard lock(mu_);
    ASSERT_EQ(written_.size(), 3 + taken);
    for (size_t i = 3; i < written_.size(); ++i) EXPECT_FALSE(written_[i].ok) << i;
  }
  // Refused while the failure holds; taken again after a resync begins.
  std::vector<uint8_t> data(512, 9);
  EXPECT_FALSE(log->Append(RecordKind::kWrite, 0, data.size(), data, Crc32c(data)).has_value());
  log->ResumeAfterOverflow();
  EXPECT_TRUE(log->write_error().ok());
  EXPECT_EQ(AppendWrite(*log, 0, std::vector<uint8_t>(512, 7)), 4u);
  ASSERT_TRUE(log->Sync().ok());
  log.reset();
  std::vector<uint64_t> seqs = ScanSeqs();
  EXPECT_EQ(seqs, (std::vector<uint64_t>{1, 2, 3, 4}));
}

// The recovery store's journal: MarkEnd, appends, a failure half-way through a segment
// roll, RollBack: the log is as it was, and the same records can be appended again.
TEST_F(CaptureLogTest, RollBackUndoesAppendsAcrossASegmentRoll) {
  auto log = OpenLog(/*segment_bytes=*/64 << 10);
  AppendWrite(*log, 0, std::vector<uint8_t>(1000, 1));
  ASSERT_TRUE(log->Sync().ok());
  auto end = log->MarkEnd();
  ASSERT_TRUE(end.ok());
  EXPECT_EQ(end->seq, 1u);
  size_t segments_before = ListSegments(dir_).value().size();
  // ~100 KiB: crosses the 64 KiB roll; the file system fills in the second segment.
  std::vector<std::vector<uint8_t>> records;
  for (int i = 0; i < 25; ++i) {
    std::vector<uint8_t> payload(4000, 0x40 + i);
    RecordHeader h;
    h.seq = 2 + i;
    h.offset = i * 4096;
    h.length = payload.size();
    h.payload_bytes = static_cast<uint32_t>(payload.size());
    std::vector<uint8_t> r(RecordHeader::kSize + payload.size());
    h.Encode(r.data(), Crc32c(payload));
    std::copy(payload.begin(), payload.end(), r.begin() + RecordHeader::kSize);
    records.push_back(std::move(r));
  }
  SetFileFaultForTest({.path_part = dir_, .err = ENOSPC, .write_bytes_left = 80 << 10});
  bool appended = true;
  for (auto& r : records) appended = appended && log->AppendEncoded(r);
  Status st = log->Sync();
  ClearFileFaultForTest();
  EXPECT_FALSE(st.ok() && appended);
  ASSERT_TRUE(log->RollBack(*end).ok());
  EXPECT_EQ(log->last_seq(), 1u);
  EXPECT_TRUE(log->write_error().ok());
  EXPECT_EQ(ListSegments(dir_).value().size(), segments_before);
  EXPECT_EQ(ScanSeqs(), (std::vector<uint64_t>{1}));
  // The same records again, with room.
  for (auto& r : records) ASSERT_TRUE(log->AppendEncoded(r));
  ASSERT_TRUE(log->Sync().ok());
  log.reset();
  std::vector<uint64_t> want(26);
  std::iota(want.begin(), want.end(), 1);
  EXPECT_EQ(ScanSeqs(), want);
}

}  // namespace
}  // namespace osr::capture

namespace osr::capture {
namespace {

// A reader that waits for records sleeps on a doorbell instead of polling: the log rings
// it when records are written out (by its writer thread or WriteOut) and when it
// overflows, and not once it is removed.
TEST_F(CaptureLogTest, RingsItsDoorbellsWhenRecordsAreWrittenOrItOverflows) {
  using namespace std::chrono_literals;
  auto log = OpenLog();
  ASSERT_NE(log, nullptr);
  Doorbell bell;
  log->AddDoorbell(&bell);
  EXPECT_FALSE(bell.Wait(0ns));  // nothing happened yet
  uint64_t seq = AppendWrite(*log, 0, std::vector<uint8_t>(4096, 1));
  // The writer thread writes it out by itself (writeout_delay_ms): the ring wakes us. The
  // bound only ends a test whose ring was lost.
  ASSERT_TRUE(bell.Wait(30s));
  EXPECT_GE(log->written_seq(), seq);
  // An explicit write-out rings too.
  uint64_t seq2 = AppendWrite(*log, 4096, std::vector<uint8_t>(4096, 2));
  ASSERT_TRUE(log->WriteOut(seq2).ok());
  EXPECT_TRUE(bell.Wait(30s));
  // Nothing new: no ring.
  EXPECT_FALSE(bell.Wait(0ns));
  log->EnterOverflow();
  EXPECT_TRUE(bell.Wait(0ns));
  log->ResumeAfterOverflow();
  EXPECT_TRUE(bell.Wait(0ns));
  log->RemoveDoorbell(&bell);
  uint64_t seq3 = AppendWrite(*log, 8192, std::vector<uint8_t>(4096, 3));
  ASSERT_TRUE(log->WriteOut(seq3).ok());
  EXPECT_FALSE(bell.Wait(0ns)) << "a removed doorbell was rung";
}

}  // namespace
}  // namespace osr::capture
