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

#include <chrono>
#include <filesystem>
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

}  // namespace
}  // namespace osr::nbd
