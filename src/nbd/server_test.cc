// Server: who gets a connection (caps per address and in total, the handshake deadline,
// plain text only on loopback) and the unix sockets it makes. Over real sockets on
// 127.0.0.1 / 127.0.0.2 and in a temporary folder.
#include "nbd/server.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <iostream>
#include <thread>

#include "nbd/mem_disk.h"
#include "nbd/protocol.h"

namespace osr::nbd {
namespace {

// A TCP connection to 127.0.0.1:port from `source` (a loopback address).
Fd ConnectFrom(const char* source, uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  EXPECT_GE(fd, 0);
  struct sockaddr_in src {};
  src.sin_family = AF_INET;
  ::inet_pton(AF_INET, source, &src.sin_addr);
  EXPECT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&src), sizeof src), 0) << std::strerror(errno);
  struct sockaddr_in dst {};
  dst.sin_family = AF_INET;
  dst.sin_port = htons(port);
  ::inet_pton(AF_INET, "127.0.0.1", &dst.sin_addr);
  EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&dst), sizeof dst), 0)
      << std::strerror(errno);
  return Fd(fd);
}

// What the server sends first, within 10 s: the 18-byte greeting, or nothing (closed).
// Returns the bytes read before EOF.
size_t Greeting(int fd) {
  uint8_t buf[18];
  size_t got = 0;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (got < sizeof buf && std::chrono::steady_clock::now() < deadline) {
    struct pollfd p = {fd, POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;
    ssize_t n = ::recv(fd, buf + got, sizeof buf - got, 0);
    if (n <= 0) break;
    got += static_cast<size_t>(n);
  }
  return got;
}

// Waits (at most 10 s) for the server to close `fd`; true if it did.
bool ClosedByServer(int fd) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  uint8_t buf[64];
  while (std::chrono::steady_clock::now() < deadline) {
    struct pollfd p = {fd, POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;
    ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) return true;
  }
  return false;
}

class ServerTest : public ::testing::Test {
 protected:
  void Start(SessionLimits limits, ServerLimits server_limits) {
    ASSERT_TRUE(exports_.Add({"", "", std::make_shared<MemDisk>(1 << 16), ""}).ok());
    server_ = std::make_unique<Server>(&exports_, limits, server_limits);
    ListenAddress a;
    a.host = "127.0.0.1";
    auto b = server_->AddListener(a);
    ASSERT_TRUE(b.ok()) << b.status().ToString();
    port_ = b->port;
    ASSERT_TRUE(server_->Start().ok());
  }
  void TearDown() override {
    if (server_) server_->Stop();
  }
  ExportTable exports_;
  std::unique_ptr<Server> server_;
  uint16_t port_ = 0;
};

TEST_F(ServerTest, OneAddressOverItsCapIsRefusedAtOnceAndOthersStillGetIn) {
  ServerLimits sl;
  sl.connections_per_address_max = 2;
  Start({}, sl);
  Fd a = ConnectFrom("127.0.0.2", port_);
  Fd b = ConnectFrom("127.0.0.2", port_);
  EXPECT_EQ(Greeting(a.get()), 18u);
  EXPECT_EQ(Greeting(b.get()), 18u);
  std::vector<Fd> over;
  for (int i = 0; i < 20; ++i) over.push_back(ConnectFrom("127.0.0.2", port_));
  for (auto& fd : over) EXPECT_EQ(Greeting(fd.get()), 0u) << "a connection over the cap was served";
  Fd other = ConnectFrom("127.0.0.1", port_);
  EXPECT_EQ(Greeting(other.get()), 18u) << "another address was locked out";
  // A place comes free when one of the two leaves.
  a = Fd();
  for (int i = 0; i < 100; ++i) {  // the server sees the close on its own thread
    Fd again = ConnectFrom("127.0.0.2", port_);
    if (Greeting(again.get()) == 18u) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ADD_FAILURE() << "the address never got a place back";
}

TEST_F(ServerTest, TheTotalCapHoldsAcrossAddresses) {
  ServerLimits sl;
  sl.tcp_connections_max = 3;
  Start({}, sl);
  Fd a = ConnectFrom("127.0.0.2", port_);
  Fd b = ConnectFrom("127.0.0.3", port_);
  Fd c = ConnectFrom("127.0.0.4", port_);
  for (int fd : {a.get(), b.get(), c.get()}) EXPECT_EQ(Greeting(fd), 18u);
  Fd d = ConnectFrom("127.0.0.5", port_);
  EXPECT_EQ(Greeting(d.get()), 0u);
}

TEST_F(ServerTest, AClientThatDripsBytesIsCutAtTheHandshakeDeadline) {
  SessionLimits limits;
  limits.handshake_timeout_ms = 300;
  Start(limits, {});
  Fd fd = ConnectFrom("127.0.0.2", port_);
  ASSERT_EQ(Greeting(fd.get()), 18u);
  uint8_t flags[4];
  Put32(flags, kClientFixedNewstyle);
  ASSERT_EQ(::send(fd.get(), flags, 4, MSG_NOSIGNAL), 4);
  uint8_t opt[16];
  Put64(opt, kIHaveOpt);
  Put32(opt + 8, kOptList);
  Put32(opt + 12, 1000);  // data that never comes in full
  ASSERT_EQ(::send(fd.get(), opt, 16, MSG_NOSIGNAL), 16);
  bool cut = false;
  for (int i = 0; i < 200 && !cut; ++i) {  // one byte every 50 ms, for at most 10 s
    uint8_t x = 0;
    if (::send(fd.get(), &x, 1, MSG_NOSIGNAL) != 1) cut = true;
    struct pollfd p = {fd.get(), POLLIN, 0};
    if (::poll(&p, 1, 50) > 0) {
      uint8_t buf[64];
      if (::recv(fd.get(), buf, sizeof buf, 0) <= 0) cut = true;
    }
  }
  EXPECT_TRUE(cut) << "a client sending one byte at a time held its handshake past the deadline";
  EXPECT_EQ(server_->active_connections() <= 1, true);
}

TEST_F(ServerTest, AnIdleClientIsClosedAtTheDeadline) {
  SessionLimits limits;
  limits.handshake_timeout_ms = 200;
  Start(limits, {});
  Fd fd = ConnectFrom("127.0.0.2", port_);
  EXPECT_EQ(Greeting(fd.get()), 18u);
  EXPECT_TRUE(ClosedByServer(fd.get()));
}

TEST(ServerListeners, PlainTextOnANetworkAddressNeedsInsecureTcp) {
  ExportTable exports;
  Server server(&exports, {});
  ListenAddress any;
  any.host = "0.0.0.0";
  auto r = server.AddListener(any);  // refused before anything is bound
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
  EXPECT_NE(r.status().message().find("not a loopback address"), std::string::npos)
      << r.status().message();
  ListenerOptions tls;
  tls.tls = TlsMode::kRequired;  // but no context
  ListenAddress lo;
  lo.host = "127.0.0.1";
  EXPECT_EQ(server.AddListener(lo, tls).status().code(), Code::kInvalidArgument);
}

TEST(ServerListeners, LoopbackHosts) {
  for (const char* h : {"127.0.0.1", "127.9.8.7", "::1", "localhost", "::ffff:127.0.0.1"}) {
    EXPECT_TRUE(IsLoopbackHost(h)) << h;
  }
  for (const char* h :
       {"0.0.0.0", "::", "", "10.0.0.1", "::ffff:10.0.0.1", "example.com", "128.0.0.1"}) {
    EXPECT_FALSE(IsLoopbackHost(h)) << h;
  }
}

TEST(ServerListeners, AUnixSocketIs0600AndGoesWithItsListener) {
  auto dir = std::filesystem::temp_directory_path() / ("osr-nbd-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  ExportTable exports;
  Server server(&exports, {});
  ListenAddress u;
  u.kind = ListenAddress::Kind::kUnix;
  u.path = (dir / "vm.sock").string();
  ListenerOptions o;
  o.local_vm = "vm1";
  ASSERT_TRUE(server.AddListener(u, o).ok());
  ASSERT_TRUE(server.Start().ok());
  struct stat st {};
  ASSERT_EQ(::lstat(u.path.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_TRUE(server.RemoveUnixListener(u.path).ok());
  EXPECT_NE(::lstat(u.path.c_str(), &st), 0);
  EXPECT_EQ(server.RemoveUnixListener(u.path).code(), Code::kNotFound);
  server.Stop();
  std::filesystem::remove_all(dir);
}

// A disk that says on which thread it was freed (the export's last holder).
class TrackedDisk final : public Disk {
 public:
  TrackedDisk(uint64_t size, std::atomic<std::thread::id>* freed_on)
      : mem_(size), freed_on_(freed_on) {}
  ~TrackedDisk() override { *freed_on_ = std::this_thread::get_id(); }
  uint64_t size() const override { return mem_.size(); }
  bool read_only() const override { return false; }
  Status Read(uint64_t offset, std::span<uint8_t> buf) override { return mem_.Read(offset, buf); }
  Status Write(uint64_t offset, std::span<const uint8_t> data) override {
    return mem_.Write(offset, data);
  }
  Status Zero(uint64_t offset, uint64_t length, ZeroMode mode, bool fast_only) override {
    return mem_.Zero(offset, length, mode, fast_only);
  }
  Status Flush() override { return Status::Ok(); }
  Status BlockStatus(uint64_t offset, uint64_t length, size_t extents_max,
                     std::vector<Extent>* out) override {
    return mem_.BlockStatus(offset, length, extents_max, out);
  }

 private:
  MemDisk mem_;
  std::atomic<std::thread::id>* freed_on_;
};

// Opens `name` with NBD_OPT_EXPORT_NAME (no zeroes); the connection, or an invalid Fd when
// the server closed it.
Fd OpenExport(uint16_t port, const std::string& name, int rcvbuf = 0) {
  Fd fd = ConnectFrom("127.0.0.1", port);
  if (rcvbuf > 0) ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
  if (Greeting(fd.get()) != 18u) return Fd();
  uint8_t hello[20];
  Put32(hello, kClientFixedNewstyle | kClientNoZeroes);
  Put64(hello + 4, kIHaveOpt);
  Put32(hello + 12, kOptExportName);
  Put32(hello + 16, static_cast<uint32_t>(name.size()));
  EXPECT_EQ(::send(fd.get(), hello, sizeof hello, MSG_NOSIGNAL), 20);
  EXPECT_EQ(::send(fd.get(), name.data(), name.size(), MSG_NOSIGNAL),
            static_cast<ssize_t>(name.size()));
  uint8_t info[10];
  size_t got = 0;
  while (got < sizeof info) {
    struct pollfd p = {fd.get(), POLLIN, 0};
    if (::poll(&p, 1, 10000) <= 0) return Fd();
    ssize_t n = ::recv(fd.get(), info + got, sizeof info - got, 0);
    if (n <= 0) return Fd();
    got += static_cast<size_t>(n);
  }
  return fd;
}

// Sends a READ request of `length` bytes at `offset` (the reply is not read here).
void SendRead(int fd, uint64_t cookie, uint64_t offset, uint32_t length) {
  uint8_t req[28];
  Put32(req, kRequestMagic);
  Put16(req + 4, 0);
  Put16(req + 6, kCmdRead);
  Put64(req + 8, cookie);
  Put64(req + 16, offset);
  Put32(req + 24, length);
  ASSERT_EQ(::send(fd, req, sizeof req, MSG_NOSIGNAL), 28);
}

// Reads one simple reply with `length` bytes of data; whether it came whole and ok.
bool ReadReply(int fd, uint32_t length) {
  std::vector<uint8_t> buf(16 + length);
  size_t got = 0;
  while (got < buf.size()) {
    struct pollfd p = {fd, POLLIN, 0};
    if (::poll(&p, 1, 10000) <= 0) return false;
    ssize_t n = ::recv(fd, buf.data() + got, buf.size() - got, 0);
    if (n <= 0) return false;
    got += static_cast<size_t>(n);
  }
  return Get32(buf.data()) == kSimpleReplyMagic && Get32(buf.data() + 4) == 0;
}

// The sequence at the NBD layer: a client reads and leaves, another stays; the
// export is removed at once. DisconnectExport ends the one that stays, and returns when
// the remover holds the last reference: the disk is freed on the remover's thread, when
// it drops it, not later by a session the server has not reaped yet.
TEST_F(ServerTest, ARemovedExportIsFreedByItsRemoverOnceItsSessionsLetGo) {
  std::atomic<std::thread::id> freed_on{};
  ASSERT_TRUE(
      exports_.Add({"drill", "", std::make_shared<TrackedDisk>(1 << 20, &freed_on), ""}).ok());
  Start({}, {});
  for (int round = 0; round < 20; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    if (round > 0) {
      ASSERT_TRUE(
          exports_.Add({"drill", "", std::make_shared<TrackedDisk>(1 << 20, &freed_on), ""}).ok());
    }
    freed_on = std::thread::id();
    Fd leaves = OpenExport(port_, "drill");
    Fd stays = OpenExport(port_, "drill");
    ASSERT_TRUE(leaves.valid() && stays.valid());
    SendRead(leaves.get(), 1, 0, 4096);
    ASSERT_TRUE(ReadReply(leaves.get(), 4096));
    SendRead(stays.get(), 1, 0, 4096);
    ASSERT_TRUE(ReadReply(stays.get(), 4096));
    leaves = Fd();  // gone: its session ends on its own thread
    std::shared_ptr<const Export> e = exports_.Remove("drill");
    ASSERT_NE(e, nullptr);
    Status st = server_->DisconnectExport(e);
    ASSERT_TRUE(st.ok()) << st.ToString();
    EXPECT_EQ(e.use_count(), 1);
    EXPECT_EQ(freed_on.load(), std::thread::id()) << "freed before its remover let go";
    e.reset();
    EXPECT_EQ(freed_on.load(), std::this_thread::get_id()) << "not freed by its remover";
    EXPECT_TRUE(ClosedByServer(stays.get()));
  }
  // Nothing is left for the watchdog: ended sessions are reaped as they end.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (server_->active_connections() != 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ(server_->active_connections(), 0u);
}

// A client that sends reads and never reads the replies holds its session in a send:
// stopping it is not enough, so DisconnectExport cuts it after the grace period.
TEST_F(ServerTest, AClientThatDoesNotReadItsRepliesIsCutWhenItsExportGoes) {
  std::atomic<std::thread::id> freed_on{};
  ASSERT_TRUE(
      exports_.Add({"drill", "", std::make_shared<TrackedDisk>(1 << 20, &freed_on), ""}).ok());
  Start({}, {});
  Fd stuck = OpenExport(port_, "drill", /*rcvbuf=*/4096);
  ASSERT_TRUE(stuck.valid());
  for (uint64_t i = 0; i < 64; ++i) SendRead(stuck.get(), i + 1, 0, 1 << 20);  // 64 MiB
  // The replies have begun (so the session is sending, soon blocked: nobody reads).
  struct pollfd p = {stuck.get(), POLLIN, 0};
  ASSERT_EQ(::poll(&p, 1, 10000), 1);
  // Time for the session to fill the socket's buffers and block in its send (the test
  // holds either way; only then does it show the cut).
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  std::shared_ptr<const Export> e = exports_.Remove("drill");
  auto began = std::chrono::steady_clock::now();
  Status st = server_->DisconnectExport(e);
  ASSERT_TRUE(st.ok()) << st.ToString();
  auto took = std::chrono::steady_clock::now() - began;
  EXPECT_LT(took, std::chrono::milliseconds(Server::kDisconnectWaitMs));
  std::cout << "cut after " << std::chrono::duration_cast<std::chrono::milliseconds>(took).count()
            << " ms\n";
  e.reset();
  EXPECT_EQ(freed_on.load(), std::this_thread::get_id());
}

}  // namespace
}  // namespace osr::nbd
