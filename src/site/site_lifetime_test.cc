// Lifetimes across threads at a site (issue 10, case 8): views, failover disks and stores
// are closed and deleted while NBD clients connect, read, write and leave, on the site's
// real NBD server over 127.0.0.1. Nothing may be freed while something still refers to it
// (the ASan build turns a use after free into a failure), a view's overlay (and its pin)
// is gone when CloseView returns, and a store is deleted, not refused, right after its last
// view was closed. Bounded: a fixed number of rounds, each with a deadline.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <thread>
#include <vector>

#include "nbd/protocol.h"
#include "site/site.h"

namespace osr::site {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr uint64_t kDiskBytes = 1 << 20;
constexpr uint32_t kBlock = 4096;
constexpr int kClients = 3;
constexpr int kRounds = 12;
constexpr auto kRoundTime = std::chrono::seconds(20);  // each round's waits, at most

// A small NBD client over TCP: fixed newstyle, NBD_OPT_EXPORT_NAME, simple replies.
// Every socket call is bounded by a 5 s timeout.
class Client {
 public:
  // false: the server refused or closed (the export is gone, or going).
  bool Connect(uint16_t port, const std::string& export_name) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return false;
    fd_ = fd;
    struct timeval tv = {5, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    struct sockaddr_in a {};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    ::inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) return false;
    uint8_t greeting[18];
    if (!RecvAll(greeting, sizeof greeting) || nbd::Get64(greeting) != nbd::kNbdMagic) return false;
    uint8_t hello[4 + 16];
    nbd::Put32(hello, nbd::kClientFixedNewstyle | nbd::kClientNoZeroes);
    nbd::Put64(hello + 4, nbd::kIHaveOpt);
    nbd::Put32(hello + 12, nbd::kOptExportName);
    nbd::Put32(hello + 16, static_cast<uint32_t>(export_name.size()));
    if (!SendAll(hello, sizeof hello) || !SendAll(export_name.data(), export_name.size())) {
      return false;
    }
    uint8_t info[10];
    if (!RecvAll(info, sizeof info)) return false;
    size_ = nbd::Get64(info);
    return true;
  }

  // An NBD error code (0: done), or -1 when the connection broke.
  int Read(uint64_t offset, std::span<uint8_t> out) {
    if (!Request(nbd::kCmdRead, offset, static_cast<uint32_t>(out.size()), {})) return -1;
    int err = Reply();
    if (err == 0 && !RecvAll(out.data(), out.size())) return -1;
    return err;
  }
  int Write(uint64_t offset, std::span<const uint8_t> data) {
    if (!Request(nbd::kCmdWrite, offset, static_cast<uint32_t>(data.size()), data)) return -1;
    return Reply();
  }
  // clean: NBD_CMD_DISC first; else the socket is just closed.
  void Disconnect(bool clean) {
    if (clean && fd_ >= 0) (void)Request(nbd::kCmdDisc, 0, 0, {});  // a broken link ends it too
    Close();
  }
  ~Client() { Close(); }
  uint64_t size() const { return size_; }

 private:
  void Close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  bool SendAll(const void* p, size_t n) {
    auto* b = static_cast<const uint8_t*>(p);
    while (n > 0) {
      ssize_t w = ::send(fd_, b, n, MSG_NOSIGNAL);
      if (w <= 0) return false;
      b += w;
      n -= static_cast<size_t>(w);
    }
    return true;
  }
  bool RecvAll(void* p, size_t n) {
    auto* b = static_cast<uint8_t*>(p);
    while (n > 0) {
      ssize_t r = ::recv(fd_, b, n, 0);
      if (r <= 0) return false;
      b += r;
      n -= static_cast<size_t>(r);
    }
    return true;
  }
  bool Request(uint16_t type, uint64_t offset, uint32_t length, std::span<const uint8_t> data) {
    uint8_t req[28];
    nbd::Put32(req, nbd::kRequestMagic);
    nbd::Put16(req + 4, 0);
    nbd::Put16(req + 6, type);
    nbd::Put64(req + 8, ++cookie_);
    nbd::Put64(req + 16, offset);
    nbd::Put32(req + 24, length);
    return SendAll(req, sizeof req) && (data.empty() || SendAll(data.data(), data.size()));
  }
  int Reply() {
    uint8_t rep[16];
    if (!RecvAll(rep, sizeof rep) || nbd::Get32(rep) != nbd::kSimpleReplyMagic ||
        nbd::Get64(rep + 8) != cookie_) {
      return -1;
    }
    return static_cast<int>(nbd::Get32(rep + 4));
  }

  int fd_ = -1;
  uint64_t size_ = 0;
  uint64_t cookie_ = 0;
};

// Clients that connect to one export again and again until told to stop: each connection
// writes its own block (when the disk is writable), reads it back, reads a block nobody
// writes, and leaves (cleanly or by closing the socket). Errors and refusals while the
// export goes away are expected; wrong bytes are not.
class ClientLoop {
 public:
  ClientLoop(uint16_t port, std::string export_name, bool writable)
      : port_(port), export_(std::move(export_name)), writable_(writable) {
    for (int i = 0; i < kClients; ++i) threads_.emplace_back([this, i] { Run(i); });
  }
  ~ClientLoop() { Stop(); }
  void Stop() {
    stop_ = true;
    for (auto& t : threads_) {
      if (t.joinable()) t.join();
    }
  }
  // Connections that went through all their I/O and left.
  int finished() const { return finished_; }
  int wrong_bytes() const { return wrong_bytes_; }

 private:
  void Run(int id) {
    std::vector<uint8_t> mine(kBlock), got(kBlock), zeros(kBlock, 0);
    const uint64_t my_offset = uint64_t{kBlock} * (1 + 2 * id);
    const uint64_t untouched = kDiskBytes - kBlock;
    for (uint32_t round = 1; !stop_; ++round) {
      Client c;
      if (!c.Connect(port_, export_)) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        continue;
      }
      bool ok = true;
      if (writable_) {
        std::memset(mine.data(), static_cast<int>((id * 64 + round) % 251 + 1), kBlock);
        ok = c.Write(my_offset, mine) == 0;
        if (ok && c.Read(my_offset, got) == 0 && got != mine) ++wrong_bytes_;
      }
      if (ok && c.Read(untouched, got) == 0 && got != zeros) ++wrong_bytes_;
      c.Disconnect(/*clean=*/round % 2 == 0);
      if (ok) ++finished_;
    }
  }

  const uint16_t port_;
  const std::string export_;
  const bool writable_;
  std::atomic<bool> stop_{false};
  std::atomic<int> finished_{0};
  std::atomic<int> wrong_bytes_{0};
  std::vector<std::thread> threads_;
};

class SiteLifetimeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/osr-site-lifetime-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    SiteConfig cfg;
    cfg.name = "recovery";
    cfg.data_dir = dir_ + "/data";
    cfg.nbd_listen.host = "127.0.0.1";
    cfg.replication_listen.host = "127.0.0.1";
    cfg.api_listen.host = "127.0.0.1";
    auto s = Site::Start(cfg);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    site_ = std::move(*s);
    port_ = site_->nbd_address().port;
  }
  void TearDown() override {
    site_.reset();
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  // Waits (bounded) until the clients have been through `n` more whole connections.
  void WaitForConnections(const ClientLoop& clients, int n) {
    int want = clients.finished() + n;
    auto deadline = Clock::now() + kRoundTime;
    while (clients.finished() < want && Clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    ASSERT_GE(clients.finished(), want) << "the clients did not get through to the disk";
  }

  std::string ExportOf(const nlohmann::json& doc) {
    std::string uri = doc["disks"][0]["uri"].get<std::string>();
    return uri.substr(uri.find('/', uri.find("://") + 3) + 1);
  }

  size_t OverlayFiles() {
    size_t n = 0;
    std::error_code ec;
    for (auto& e : fs::directory_iterator(dir_ + "/data/views", ec))
      n += e.is_regular_file() ? 1 : 0;
    return n;
  }

  void ExpectStoreGone(const std::string& vm) {
    EXPECT_EQ(site_->StoreStatus(vm).status().code(), Code::kNotFound);
    EXPECT_FALSE(fs::exists(dir_ + "/data/stores/" + vm));
  }

  std::string dir_;
  std::unique_ptr<Site> site_;
  uint16_t port_ = 0;
};

// A drill's clients connect and leave; the view is closed and the store deleted right
// after one of them left (the sequence), again and again.
TEST_F(SiteLifetimeTest, ViewsAndStoresGoWhileClientsComeAndLeave) {
  for (int round = 0; round < kRounds; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    const bool writable = round % 2 == 0;
    ASSERT_TRUE(site_->CreateStore("vm1", {{"d", kDiskBytes}}).ok());
    auto view = site_->OpenView("vm1", 0, writable);
    ASSERT_TRUE(view.ok()) << view.status().ToString();
    std::string id = (*view)["id"].get<std::string>();
    {
      ClientLoop clients(port_, ExportOf(*view), writable);
      WaitForConnections(clients, 2 * kClients);
      ASSERT_TRUE(site_->CloseView(id).ok());
      // Released before CloseView returned: the overlay went with the view.
      EXPECT_EQ(OverlayFiles(), 0u) << "the view outlived CloseView";
      Status deleted = site_->DeleteStore("vm1");
      ASSERT_TRUE(deleted.ok()) << deleted.ToString();
      ExpectStoreGone("vm1");
      // The clients keep trying the gone export for a moment: refused, no crash.
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      clients.Stop();
      EXPECT_EQ(clients.wrong_bytes(), 0);
    }
    EXPECT_TRUE(site_->Describe()["views"].empty());
  }
}

// Two views over one store, each closed under its clients, the store deleted while the
// clients of the second are still knocking.
TEST_F(SiteLifetimeTest, TwoViewsOfOneStoreCloseUnderTheirClients) {
  for (int round = 0; round < kRounds / 2; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    ASSERT_TRUE(site_->CreateStore("vm2", {{"d", kDiskBytes}}).ok());
    auto a = site_->OpenView("vm2", 0, true);
    auto b = site_->OpenView("vm2", 0, false);
    ASSERT_TRUE(a.ok() && b.ok());
    ClientLoop ca(port_, ExportOf(*a), true);
    ClientLoop cb(port_, ExportOf(*b), false);
    WaitForConnections(ca, kClients);
    WaitForConnections(cb, kClients);
    ASSERT_TRUE(site_->CloseView((*a)["id"].get<std::string>()).ok());
    // One view is still open: the store stays, and says why.
    EXPECT_EQ(site_->DeleteStore("vm2").code(), Code::kAlreadyExists);
    ASSERT_TRUE(site_->CloseView((*b)["id"].get<std::string>()).ok());
    Status deleted = site_->DeleteStore("vm2");
    ASSERT_TRUE(deleted.ok()) << deleted.ToString();
    ExpectStoreGone("vm2");
    ca.Stop();
    cb.Stop();
    EXPECT_EQ(ca.wrong_bytes() + cb.wrong_bytes(), 0);
  }
}

// Failover disks over a store: the VM's disks are used by clients, then the group is
// deleted (unprotect before commit) and the store with it, or materialised (commit) and
// the store deleted while the clients go on with the VM's disks.
TEST_F(SiteLifetimeTest, FailoverDisksAndTheirStoreGoWhileClientsComeAndLeave) {
  for (int round = 0; round < kRounds / 2; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    const bool commit = round % 2 == 1;
    ASSERT_TRUE(site_->CreateStore("vm3", {{"d", kDiskBytes}}).ok());
    auto fo = site_->FailoverGroup("vm3", 0, 2);
    ASSERT_TRUE(fo.ok()) << fo.status().ToString();
    auto view = site_->OpenView("vm3", 0, false);  // a drill's view beside the failover
    ASSERT_TRUE(view.ok()) << view.status().ToString();
    ClientLoop disk_clients(port_, ExportOf(*fo), true);
    ClientLoop view_clients(port_, ExportOf(*view), false);
    WaitForConnections(disk_clients, 2 * kClients);
    WaitForConnections(view_clients, kClients);
    ASSERT_TRUE(site_->CloseView((*view)["id"].get<std::string>()).ok());
    if (commit) {
      ASSERT_TRUE(site_->MaterialiseGroup("vm3").ok());
      auto deadline = Clock::now() + kRoundTime;
      std::string state;
      while (Clock::now() < deadline) {
        auto g = site_->GroupStatus("vm3");
        ASSERT_TRUE(g.ok());
        state = (*g)["materialise"]["state"].get<std::string>();
        if (state != "running") break;
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
      ASSERT_EQ(state, "done");
      Status deleted = site_->DeleteStore("vm3");  // the VM's clients go on meanwhile
      ASSERT_TRUE(deleted.ok()) << deleted.ToString();
      WaitForConnections(disk_clients, kClients);  // still served, from the image alone
      ASSERT_TRUE(site_->DeleteGroup("vm3").ok());
    } else {
      EXPECT_EQ(site_->DeleteStore("vm3").code(), Code::kAlreadyExists);  // disks over it
      ASSERT_TRUE(site_->DeleteGroup("vm3").ok());
      Status deleted = site_->DeleteStore("vm3");
      ASSERT_TRUE(deleted.ok()) << deleted.ToString();
    }
    ExpectStoreGone("vm3");
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    disk_clients.Stop();
    view_clients.Stop();
    EXPECT_EQ(disk_clients.wrong_bytes() + view_clients.wrong_bytes(), 0);
  }
}

}  // namespace
}  // namespace osr::site
