// The frame reader (read-ahead, frames taken without waiting) and the LZ4 probe of RECORDS
// frames, against an in-memory stream whose bytes arrive in pieces the test chooses.
#include "replication/wire.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <random>

namespace osr::replication {
namespace {

// Writes append to `written`; reads take from `arrived`, which the test feeds. A read
// that would wait on an empty stream fails (kUnavailable): the tests never wait.
class MemoryStream final : public Stream {
 public:
  Result<size_t> ReadSome(std::span<uint8_t> buf) override {
    if (arrived.empty()) return closed ? size_t{0} : Result<size_t>(Unavailable("would wait"));
    return Take(buf);
  }
  Result<std::optional<size_t>> TryReadSome(std::span<uint8_t> buf) override {
    if (arrived.empty()) return closed ? std::optional<size_t>(0) : std::optional<size_t>();
    ++try_reads;
    return std::optional<size_t>(Take(buf));
  }
  Status WriteAll(std::span<const struct iovec> iov) override {
    for (const auto& v : iov) {
      auto* p = static_cast<const uint8_t*>(v.iov_base);
      written.insert(written.end(), p, p + v.iov_len);
    }
    return Status::Ok();
  }
  using Stream::WriteAll;
  // Makes `n` more of `written` arrive at the reading end.
  void Deliver(size_t n) {
    n = std::min(n, written.size() - delivered);
    arrived.insert(arrived.end(), written.begin() + delivered, written.begin() + delivered + n);
    delivered += n;
  }

  std::vector<uint8_t> written;
  size_t delivered = 0;
  std::deque<uint8_t> arrived;
  bool closed = false;
  int try_reads = 0;

 private:
  size_t Take(std::span<uint8_t> buf) {
    size_t n = std::min(buf.size(), arrived.size());
    std::copy_n(arrived.begin(), n, buf.begin());
    arrived.erase(arrived.begin(), arrived.begin() + n);
    return n;
  }
};

std::vector<uint8_t> Bytes(size_t n, uint32_t seed, bool compressible = false) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> b(n);
  for (auto& x : b) x = compressible ? static_cast<uint8_t>(seed) : static_cast<uint8_t>(rng());
  return b;
}

TEST(FrameReaderTest, TakesOnlyFramesThatHaveWhollyArrived) {
  MemoryStream s;
  auto a = Bytes(100, 1), b = Bytes(300 << 10, 2), c = Bytes(10, 3);  // b: above read-ahead
  ASSERT_TRUE(WriteFrame(s, FrameType::kRecords, a).ok());
  ASSERT_TRUE(WriteFrame(s, FrameType::kRecords, b).ok());
  ASSERT_TRUE(WriteFrame(s, FrameType::kAck, c).ok());
  FrameReader r(s);
  // Nothing yet, then half a header, then a whole frame and part of the next.
  auto f = r.TryRead();
  ASSERT_TRUE(f.ok());
  EXPECT_FALSE(f->has_value());
  s.Deliver(8);
  f = r.TryRead();
  ASSERT_TRUE(f.ok());
  EXPECT_FALSE(f->has_value());
  s.Deliver(kFrameHeaderBytes - 8 + a.size() + 1000);
  f = r.TryRead();
  ASSERT_TRUE(f.ok() && f->has_value());
  EXPECT_EQ((*f)->type, FrameType::kRecords);
  EXPECT_EQ((*f)->payload, a);
  // The large frame arrives in pieces: nullopt until its last byte is here.
  const size_t b_total = kFrameHeaderBytes + b.size();
  for (size_t b_arrived = 1000; b_arrived < b_total;) {
    f = r.TryRead();
    ASSERT_TRUE(f.ok());
    EXPECT_FALSE(f->has_value()) << b_arrived;
    size_t n = std::min<size_t>(64 << 10, b_total - b_arrived);
    s.Deliver(n);
    b_arrived += n;
  }
  f = r.TryRead();
  ASSERT_TRUE(f.ok() && f->has_value());
  EXPECT_EQ((*f)->payload, b);
  s.Deliver(kFrameHeaderBytes + c.size());
  auto g = r.Read();
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  EXPECT_EQ(g->type, FrameType::kAck);
  EXPECT_EQ(g->payload, c);
  // The peer left: TryRead says nothing has come, Read says it left.
  s.closed = true;
  f = r.TryRead();
  ASSERT_TRUE(f.ok());
  EXPECT_FALSE(f->has_value());
  EXPECT_EQ(r.Read().status().code(), Code::kUnavailable);
}

TEST(FrameReaderTest, ReadsWhatReadFrameReadsAndRefusesWhatItRefuses) {
  MemoryStream s;
  auto z = Bytes(200 << 10, 4, /*compressible=*/true);
  ASSERT_TRUE(WriteRecordsFrame(s, z, true).ok());  // LZ4
  size_t first = s.written.size();
  EXPECT_LT(first, z.size() / 4);
  ASSERT_TRUE(WriteFrame(s, FrameType::kRecords, Bytes(5000, 5)).ok());
  s.written[first + kFrameHeaderBytes + 17] ^= 0x10;  // the second frame fails its CRC
  s.Deliver(s.written.size());
  FrameReader r(s);
  auto f = r.Read();
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->payload, z);
  auto bad = r.TryRead();
  EXPECT_EQ(bad.status().code(), Code::kCorruption) << bad.status().ToString();

  MemoryStream m;  // a bad magic
  ASSERT_TRUE(WriteFrame(m, FrameType::kAck, Bytes(8, 6)).ok());
  m.written[0] ^= 1;
  m.Deliver(m.written.size());
  FrameReader rm(m);
  EXPECT_EQ(rm.Read().status().code(), Code::kCorruption);
}

// Random records are tried rarely (the probe backs off to one try per 64 MiB); records
// that compress are compressed again soon after they come back.
TEST(RecordsCompressionTest, StopsTryingWhatDoesNotPayAndComesBack) {
  MemoryStream s;
  RecordsCompression c(true);
  constexpr size_t kFrame = 256 << 10;
  uint64_t raw = 0;
  for (int i = 0; i < 256; ++i) {  // 64 MiB of random records
    auto p = Bytes(kFrame, 100 + i);
    auto wire = WriteRecordsFrame(s, p, c);
    ASSERT_TRUE(wire.ok());
    EXPECT_EQ(*wire, p.size() + kFrameHeaderBytes);  // sent as it is
    raw += p.size();
  }
  // 1, 2, 4, 8, 16, 32 MiB skipped after each try: 7 tries reach past 64 MiB.
  EXPECT_LE(c.frames_tried(), 7u);
  EXPECT_GE(c.frames_tried(), 2u);
  // Compressible records: compressed again after at most kSkipBytesMax of them.
  uint64_t skipped = 0;
  bool compressed = false;
  for (int i = 0; i < 512 && !compressed; ++i) {
    auto p = Bytes(kFrame, 7, /*compressible=*/true);
    auto wire = WriteRecordsFrame(s, p, c);
    ASSERT_TRUE(wire.ok());
    compressed = *wire < p.size() / 4;
    if (!compressed) skipped += p.size();
  }
  EXPECT_TRUE(compressed);
  EXPECT_LE(skipped, RecordsCompression::kSkipBytesMax);
  // And every following one is compressed.
  auto wire = WriteRecordsFrame(s, Bytes(kFrame, 8, true), c);
  ASSERT_TRUE(wire.ok());
  EXPECT_LT(*wire, kFrame / 4);
  // Not agreed with the receiver: never tried.
  RecordsCompression off(false);
  auto plain = WriteRecordsFrame(s, Bytes(kFrame, 9, true), off);
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(*plain, kFrame + kFrameHeaderBytes);
  EXPECT_EQ(off.frames_tried(), 0u);
}

}  // namespace
}  // namespace osr::replication
