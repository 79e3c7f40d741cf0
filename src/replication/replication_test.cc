// A capturing disk at the "primary", a recovery store at the "recovery" site, and the
// replication channel between them over TCP on 127.0.0.1 — through a proxy that can cut
// the connection or flip a bit in transit.
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <random>
#include <thread>

#include "capture/capture_group.h"
#include "capture/log_reader.h"
#include "common/tls.h"
#include "nbd/file_disk.h"
#include "replication/receiver.h"
#include "replication/sender.h"
#include "store/recovery_store.h"

namespace osr::replication {
namespace {

namespace fs = std::filesystem;

// Forwards one connection at a time to `target`; can cut it or flip a bit once.
class Proxy {
 public:
  explicit Proxy(ListenAddress target) : target_(target) {
    ListenAddress a;
    a.host = "127.0.0.1";
    listener_ = std::make_unique<Listener>(Listener::Listen(a).value());
    thread_ = std::thread([this] { Loop(); });
  }
  ~Proxy() {
    stop_ = true;
    thread_.join();
  }
  ListenAddress address() const { return listener_->address(); }
  // The next connection is cut after this many bytes from the sender.
  void CutAfter(uint64_t bytes) { cut_after_ = bytes; }
  // The byte at this position of the next connection's sender stream is flipped.
  void FlipAt(uint64_t pos) { flip_at_ = pos; }
  // Ends the current connection now.
  void DropNow() { drop_now_ = true; }
  // While set, connections are accepted and closed at once (the far site is down).
  void Refuse(bool on) { refuse_ = on; }
  int connections() const { return connections_; }

 private:
  void Loop() {
    while (!stop_) {
      struct pollfd p = {listener_->fd(), POLLIN, 0};
      if (::poll(&p, 1, 100) <= 0) continue;
      auto in = listener_->Accept();
      if (!in.ok()) continue;
      if (refuse_) continue;  // closing `in` refuses it
      auto out = Connect(target_);
      if (!out.ok()) continue;
      ++connections_;
      uint64_t cut = cut_after_.exchange(UINT64_MAX);
      uint64_t flip = flip_at_.exchange(UINT64_MAX);
      drop_now_ = false;
      Pump(in->get(), out->get(), cut, flip);
    }
  }
  // Copies both ways until either side closes or the cut comes.
  void Pump(int a, int b, uint64_t cut, uint64_t flip) {
    uint64_t forwarded = 0;
    uint8_t buf[65536];
    while (!stop_ && !drop_now_) {
      struct pollfd p[2] = {{a, POLLIN, 0}, {b, POLLIN, 0}};
      if (::poll(p, 2, 100) <= 0) continue;
      if (p[0].revents) {
        ssize_t n = ::recv(a, buf, sizeof buf, 0);
        if (n <= 0) break;
        if (flip >= forwarded && flip < forwarded + n) buf[flip - forwarded] ^= 0x10;
        if (forwarded + n > cut) break;  // cut: drop this piece and the connection
        forwarded += n;
        if (::send(b, buf, n, MSG_NOSIGNAL) != n) break;
      }
      if (p[1].revents) {
        ssize_t n = ::recv(b, buf, sizeof buf, 0);
        if (n <= 0) break;
        if (::send(a, buf, n, MSG_NOSIGNAL) != n) break;
      }
    }
    ::shutdown(a, SHUT_RDWR);
    ::shutdown(b, SHUT_RDWR);
  }

  ListenAddress target_;
  std::unique_ptr<Listener> listener_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> cut_after_{UINT64_MAX};
  std::atomic<uint64_t> flip_at_{UINT64_MAX};
  std::atomic<int> connections_{0};
  std::atomic<bool> drop_now_{false};
  std::atomic<bool> refuse_{false};
};

class ReplicationTest : public ::testing::Test {
 protected:
  static constexpr uint64_t kSize = 8 << 20;

  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("osr-repl-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    std::vector<std::unique_ptr<nbd::Disk>> images;
    images.push_back(nbd::FileDisk::Open(dir_ + "/src.img", false, kSize).value());
    capture::CaptureOptions co;
    co.dir = dir_ + "/cap";
    co.segment_bytes_target = 1 << 20;  // several segments, so trimming happens
    co.log_bytes_max = log_bytes_max_;
    group_ = capture::CaptureGroup::Open(std::move(images), co).value();
    disk_ = group_->disk(0);
    store_ = store::RecoveryStore::Create(dir_ + "/store", {{"d0", kSize}}, 0).value();
    receiver_ = std::make_unique<Receiver>([this](const std::string& g) {
      return g == "vm1" ? store_ : std::shared_ptr<store::RecoveryStore>();
    });
    ListenAddress a;
    a.host = "127.0.0.1";
    recv_addr_ = receiver_->Listen(a).value();
    receiver_->Start();
  }
  void TearDown() override {
    sender_.reset();
    receiver_.reset();
    store_.reset();
    disk_.reset();
    group_.reset();
    fs::remove_all(dir_);
  }
  // Restarts the receiver with TLS (certificates of a private CA in dir_/tls).
  void UseTls() {
    receiver_.reset();
    auto files = EnsureQuickstartCertificates(dir_ + "/tls", "recovery").value();
    auto server = TlsContext::Create(files, true).value();
    receiver_ = std::make_unique<Receiver>(
        [this](const std::string& g) {
          return g == "vm1" ? store_ : std::shared_ptr<store::RecoveryStore>();
        },
        server);
    ListenAddress a;
    a.host = "127.0.0.1";
    recv_addr_ = receiver_->Listen(a).value();
    receiver_->Start();
    client_tls_ =
        TlsContext::Create(EnsureQuickstartCertificates(dir_ + "/tls", "primary").value(), false)
            .value();
  }
  void StartSender(ListenAddress target, uint64_t bandwidth = 0) {
    SenderOptions o;
    o.tls = client_tls_;
    o.bandwidth_bytes_per_second = bandwidth;
    o.group = "vm1";
    o.target = target;
    o.disks = {{"d0", kSize}};
    o.frame_bytes_max = 256 << 10;  // many frames
    o.capture_group = group_.get();
    o.reconnect_delay_ms_max = 200;
    sender_ = std::make_unique<Sender>(o, &group_->log());
    sender_->Start();
    // Connected before the test writes, so that writes go as records (an empty store
    // would otherwise get an initial copy of the disk instead).
    for (int i = 0; i < 250 && !sender_->stats().connected; ++i) ::usleep(20000);
  }
  // Random bytes (incompressible) unless `compressible`.
  void Write(std::mt19937& rng, int n, bool compressible = false) {
    for (int i = 0; i < n; ++i) {
      uint64_t len = 1 + rng() % 100000;
      uint64_t off = rng() % (kSize - len);
      std::vector<uint8_t> d(len, static_cast<uint8_t>(rng()));
      if (!compressible) {
        for (auto& b : d) b = static_cast<uint8_t>(rng());
      }
      ASSERT_TRUE(disk_->Write(off, d).ok());
    }
  }
  // The oracle: the store at its durable seq equals the source image.
  void ExpectReplicaEqualsSource() {
    ASSERT_TRUE(disk_->Flush().ok());  // writes out the log for the tailer
    // Caught up: no overflow or marked region left to resync, every record acknowledged.
    uint64_t last = 0;
    for (int i = 0; i < 400; ++i) {
      last = group_->log().last_seq();
      auto st = sender_->stats();
      if (!group_->log().overflowed() && !group_->HasStickyRegions() && st.connected &&
          !st.resyncing && st.acked_seq >= last && !store_->resyncing()) {
        break;
      }
      ::usleep(50000);
    }
    ASSERT_TRUE(sender_->WaitAcked(last, 20000)) << sender_->stats().last_error;
    std::vector<uint8_t> src(kSize), dst(kSize);
    ASSERT_TRUE(disk_->Read(0, src).ok());
    ASSERT_TRUE(store_->ReadAt(0, last, 0, dst).ok());
    EXPECT_TRUE(src == dst);
  }

  uint64_t log_bytes_max_ = UINT64_MAX;
  std::string dir_;
  std::unique_ptr<capture::CaptureGroup> group_;
  std::shared_ptr<nbd::Disk> disk_;
  std::shared_ptr<store::RecoveryStore> store_;
  std::unique_ptr<Receiver> receiver_;
  ListenAddress recv_addr_;
  std::unique_ptr<Sender> sender_;
  std::shared_ptr<TlsContext> client_tls_;
};

TEST_F(ReplicationTest, ShipsEveryRecordInOrderAndTrimsTheLog) {
  StartSender(recv_addr_);
  std::mt19937 rng(1);
  Write(rng, 300);
  ExpectReplicaEqualsSource();
  Write(rng, 300);
  ExpectReplicaEqualsSource();
  auto segs = capture::ListSegments(dir_ + "/cap").value();
  auto first = group_->log().first_seq_held().value();
  EXPECT_GT(first, 1u) << "acknowledged segments were not trimmed (" << segs.size() << ")";
  EXPECT_EQ(sender_->stats().reconnects, 0u);
}

TEST_F(ReplicationTest, ResumesAfterCutsAndRefusesAFlippedBit) {
  Proxy proxy(recv_addr_);
  proxy.CutAfter(300 << 10);
  StartSender(proxy.address());
  std::mt19937 rng(2);
  Write(rng, 200);
  ExpectReplicaEqualsSource();
  EXPECT_GE(proxy.connections(), 2);  // the cut forced a reconnect
  int before = proxy.connections();
  // The next connection carries a flipped bit: the receiver refuses the frame (CRC),
  // the sender reconnects and resends.
  proxy.FlipAt(100 << 10);
  proxy.DropNow();
  Write(rng, 200);
  ExpectReplicaEqualsSource();
  EXPECT_GE(proxy.connections(), before + 2);  // the dropped one, the flipped one
  EXPECT_GE(sender_->stats().reconnects, 3u);
}

TEST_F(ReplicationTest, MutualTlsCarriesTheStreamAndRefusesStrangers) {
  UseTls();
  StartSender(recv_addr_);
  std::mt19937 rng(3);
  Write(rng, 100);
  ExpectReplicaEqualsSource();
  // A sender whose certificate comes from another CA is refused.
  SenderOptions o;
  o.group = "vm1";
  o.target = recv_addr_;
  o.disks = {{"d0", kSize}};
  o.tls = TlsContext::Create(EnsureQuickstartCertificates(dir_ + "/other-ca", "intruder").value(),
                             false)
              .value();
  Sender intruder(o, &group_->log());
  intruder.Start();
  for (int i = 0; i < 100 && intruder.stats().last_error.empty(); ++i) ::usleep(20000);
  EXPECT_NE(intruder.stats().last_error.find("TLS"), std::string::npos)
      << intruder.stats().last_error;
  EXPECT_FALSE(intruder.stats().connected);
  intruder.Stop();
  // A plain-TCP sender is refused too; the real one goes on.
  SenderOptions plain = o;
  plain.tls = nullptr;
  Sender cleartext(plain, &group_->log());
  cleartext.Start();
  for (int i = 0; i < 100 && cleartext.stats().last_error.empty(); ++i) ::usleep(20000);
  EXPECT_FALSE(cleartext.stats().connected);
  cleartext.Stop();
  Write(rng, 50);
  ExpectReplicaEqualsSource();
}

TEST_F(ReplicationTest, CompressesWhatCompresses) {
  StartSender(recv_addr_);
  std::mt19937 rng(4);
  Write(rng, 100, /*compressible=*/true);
  ExpectReplicaEqualsSource();
  auto st = sender_->stats();
  EXPECT_LT(st.wire_bytes_sent * 4, st.bytes_sent) << st.wire_bytes_sent << " of " << st.bytes_sent;
  uint64_t wire = st.wire_bytes_sent, raw = st.bytes_sent;
  Write(rng, 50);  // random: sent as it is
  ExpectReplicaEqualsSource();
  st = sender_->stats();
  EXPECT_GE(st.wire_bytes_sent - wire, st.bytes_sent - raw);
}

TEST_F(ReplicationTest, KeepsToTheBandwidthLimit) {
  constexpr uint64_t kRate = 4 << 20;  // bytes per second
  StartSender(recv_addr_, kRate);
  std::mt19937 rng(5);
  Write(rng, 120);  // about 6 MB of random bytes
  uint64_t bytes = 0;
  auto t0 = std::chrono::steady_clock::now();
  ExpectReplicaEqualsSource();
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  bytes = sender_->stats().wire_bytes_sent;
  // The first window of frames may go at once; the rest at the rate.
  EXPECT_GE(secs, 0.8 * static_cast<double>(bytes) / kRate - 0.2) << bytes << " bytes in " << secs;
  EXPECT_LE(static_cast<double>(bytes) / secs, 1.3 * kRate);
}

// Protecting disks that already hold data: the empty store gets the allocated regions
// (not the whole history of writes), while new writes keep flowing.
TEST_F(ReplicationTest, InitialCopyTakesAllocatedRegionsOnly) {
  std::mt19937 rng(7);
  for (int i = 0; i < 30; ++i) {  // the same 1 MiB area, many times over: history >> data
    std::vector<uint8_t> d(64 * 1024);
    for (auto& b : d) b = static_cast<uint8_t>(rng());
    ASSERT_TRUE(disk_->Write((rng() % 16) * 64 * 1024, d).ok());
  }
  ASSERT_TRUE(disk_->Flush().ok());
  // A store made for a first copy (as the vault's enable-protection makes it).
  store_.reset();
  std::filesystem::remove_all(dir_ + "/store");
  store_ = store::RecoveryStore::Create(dir_ + "/store", {{"d0", kSize}}, 0,
                                        store::RecoveryStore::Start::kFullCopy)
               .value();
  StartSender(recv_addr_);
  Write(rng, 10);  // meanwhile
  ExpectReplicaEqualsSource();
  auto st = sender_->stats();
  EXPECT_EQ(st.resyncs_completed, 1u);
  EXPECT_GT(st.resync_bytes_total, 0u);
  EXPECT_LT(st.resync_bytes_total, kSize);    // sparse: not the whole disk
  EXPECT_LT(st.bytes_sent, 30u * 64 * 1024);  // the 30 old writes were not shipped
}

// Invariant 4: the recovery site is away long enough for the capture log to pass its
// limit; tracking falls back to the bitmap, the last point stays readable, and when the
// site returns a resync brings the replica back to the source exactly.
class OverflowTest : public ReplicationTest {
 protected:
  void SetUp() override {
    log_bytes_max_ = 3 << 20;
    ReplicationTest::SetUp();
  }
};

TEST_F(OverflowTest, ResyncsAfterTheCaptureLogOverflows) {
  Proxy proxy(recv_addr_);
  StartSender(proxy.address());
  std::mt19937 rng(6);
  Write(rng, 20);
  ExpectReplicaEqualsSource();
  uint64_t before = store_->durable_seq();
  std::vector<uint8_t> at_before(kSize);
  ASSERT_TRUE(store_->ReadAt(0, before, 0, at_before).ok());

  proxy.Refuse(true);  // the recovery site goes away
  proxy.DropNow();
  Write(rng, 200);  // ~10 MB: well past the 3 MiB limit
  EXPECT_TRUE(group_->log().overflowed());
  EXPECT_TRUE(group_->HasStickyRegions());
  // The last point before the overflow is still there and unchanged.
  std::vector<uint8_t> again(kSize);
  ASSERT_TRUE(store_->ReadAt(0, before, 0, again).ok());
  EXPECT_TRUE(again == at_before);

  uint64_t resyncs_before = sender_->stats().resyncs_completed;  // an initial copy counts
  proxy.Refuse(false);                                           // it returns: resync by itself
  for (int i = 0; i < 400 && sender_->stats().resyncs_completed == resyncs_before; ++i) {
    ::usleep(50000);
  }
  auto st = sender_->stats();
  ASSERT_GT(st.resyncs_completed, resyncs_before) << st.last_error;
  EXPECT_GT(st.resync_bytes_total, 0u);
  EXPECT_FALSE(group_->log().overflowed());
  EXPECT_FALSE(group_->HasStickyRegions());
  ExpectReplicaEqualsSource();
  // Writes after the resync replicate as usual.
  Write(rng, 20);
  ExpectReplicaEqualsSource();
  // Seqs inside the resync are not offered as points.
  EXPECT_EQ(store_->ReadAt(0, before, 0, again).code(), Code::kOutOfRange);
}

// Invariant 5: once the item moved to a higher epoch, a source at the old epoch is
// refused, also after the recovery site restarts.
TEST_F(ReplicationTest, AStaleEpochIsFenced) {
  ASSERT_TRUE(store_->AcceptEpoch(2).ok());
  SenderOptions o;
  o.group = "vm1";
  o.target = recv_addr_;
  o.disks = {{"d0", kSize}};
  o.epoch = 1;
  Sender old_primary(o, &group_->log());
  old_primary.Start();
  std::mt19937 rng(8);
  Write(rng, 5);
  for (int i = 0; i < 100 && old_primary.stats().last_error.empty(); ++i) ::usleep(20000);
  EXPECT_NE(old_primary.stats().last_error.find("stale epoch 1"), std::string::npos)
      << old_primary.stats().last_error;
  EXPECT_FALSE(old_primary.stats().connected);
  old_primary.Stop();
  EXPECT_EQ(store_->durable_seq(), 0u);  // nothing of the old primary got in
  EXPECT_EQ(store_->AcceptEpoch(1).code(), Code::kPermissionDenied);
  EXPECT_TRUE(store_->AcceptEpoch(3).ok());
  EXPECT_EQ(store_->epoch(), 3u);
  // The epoch is kept across a restart of the store.
  auto dir = store_->dir();
  receiver_.reset();
  store_.reset();
  store_ = store::RecoveryStore::Open(dir).value();
  EXPECT_EQ(store_->epoch(), 3u);
}

TEST_F(ReplicationTest, UnknownGroupAndWrongDisksAreRefused) {
  SenderOptions o;
  o.group = "nope";
  o.target = recv_addr_;
  o.disks = {{"d0", kSize}};
  Sender s(o, &group_->log());
  s.Start();
  for (int i = 0; i < 100 && s.stats().last_error.empty(); ++i) ::usleep(20000);
  EXPECT_NE(s.stats().last_error.find("no recovery store"), std::string::npos)
      << s.stats().last_error;
  s.Stop();
  o.group = "vm1";
  o.disks = {{"d0", kSize * 2}};
  Sender s2(o, &group_->log());
  s2.Start();
  for (int i = 0; i < 100 && s2.stats().last_error.empty(); ++i) ::usleep(20000);
  EXPECT_NE(s2.stats().last_error.find("differs in size"), std::string::npos)
      << s2.stats().last_error;
}

}  // namespace
}  // namespace osr::replication
