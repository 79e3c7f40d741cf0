// Session over a socketpair with a MemDisk: the handshake state machine and the
// transmission phase, byte for byte as a client sees them.
#include "nbd/session.h"

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "nbd/mem_disk.h"
#include "nbd/protocol.h"

namespace osr::nbd {
namespace {

class Client {
 public:
  explicit Client(int fd) : fd_(fd) {}
  void Send(const std::vector<uint8_t>& b) {
    ASSERT_EQ(::write(fd_, b.data(), b.size()), (ssize_t)b.size());
  }
  std::vector<uint8_t> Recv(size_t n) {
    std::vector<uint8_t> b(n);
    size_t got = 0;
    while (got < n) {
      ssize_t r = ::read(fd_, b.data() + got, n - got);
      if (r <= 0) {
        b.resize(got);
        return b;
      }
      got += static_cast<size_t>(r);
    }
    return b;
  }
  bool AtEof() {
    uint8_t c;
    return ::read(fd_, &c, 1) == 0;
  }
  void Option(uint32_t opt, const std::vector<uint8_t>& data) {
    std::vector<uint8_t> b(16 + data.size());
    Put64(b.data(), kIHaveOpt);
    Put32(b.data() + 8, opt);
    Put32(b.data() + 12, static_cast<uint32_t>(data.size()));
    if (!data.empty()) std::memcpy(b.data() + 16, data.data(), data.size());
    Send(b);
  }
  // Returns {reply type, data}.
  std::pair<uint32_t, std::vector<uint8_t>> OptionReply() {
    auto h = Recv(20);
    EXPECT_EQ(h.size(), 20u);
    if (h.size() < 20) return {0, {}};
    EXPECT_EQ(Get64(h.data()), kOptReplyMagic);
    return {Get32(h.data() + 12), Recv(Get32(h.data() + 16))};
  }
  void Request(uint16_t type, uint16_t flags, uint64_t cookie, uint64_t off, uint32_t len,
               const std::vector<uint8_t>& payload = {}) {
    std::vector<uint8_t> b(28);
    nbd::Request{kRequestMagic, flags, type, cookie, off, len}.Encode(b.data());
    b.insert(b.end(), payload.begin(), payload.end());
    Send(b);
  }
  // Simple reply: {error, cookie}.
  std::pair<uint32_t, uint64_t> SimpleReply() {
    auto h = Recv(16);
    EXPECT_EQ(h.size(), 16u);
    if (h.size() < 16) return {~0u, 0};
    EXPECT_EQ(Get32(h.data()), kSimpleReplyMagic);
    return {Get32(h.data() + 4), Get64(h.data() + 8)};
  }

 private:
  int fd_;
};

std::vector<uint8_t> GoData(const std::string& name, std::vector<uint16_t> infos = {}) {
  std::vector<uint8_t> d(4 + name.size() + 2 + 2 * infos.size());
  Put32(d.data(), static_cast<uint32_t>(name.size()));
  std::memcpy(d.data() + 4, name.data(), name.size());
  Put16(d.data() + 4 + name.size(), static_cast<uint16_t>(infos.size()));
  for (size_t i = 0; i < infos.size(); ++i) Put16(d.data() + 6 + name.size() + 2 * i, infos[i]);
  return d;
}

void AppendU32(std::vector<uint8_t>* d, uint32_t v) {
  uint8_t b[4];
  Put32(b, v);
  for (uint8_t x : b) d->push_back(x);
}

std::vector<uint8_t> MetaData(const std::string& name, std::vector<std::string> queries) {
  std::vector<uint8_t> d;
  AppendU32(&d, static_cast<uint32_t>(name.size()));
  for (char c : name) d.push_back(static_cast<uint8_t>(c));
  AppendU32(&d, static_cast<uint32_t>(queries.size()));
  for (auto& q : queries) {
    AppendU32(&d, static_cast<uint32_t>(q.size()));
    for (char c : q) d.push_back(static_cast<uint8_t>(c));
  }
  return d;
}

class SessionTest : public ::testing::Test {
 protected:
  void Start(bool read_only = false) {
    disk_ = std::make_shared<MemDisk>(1 << 20, read_only);
    exports_ = std::make_unique<ExportTable>();
    ASSERT_TRUE(exports_->Add({"disk0", "", disk_, ""}).ok());
    int sv[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    client_fd_ = sv[0];
    session_ = std::make_unique<Session>(std::make_unique<SocketStream>(Fd(sv[1])), exports_.get(),
                                         SessionLimits{}, "test");
    thread_ = std::thread([this] { result_ = session_->Run(); });
    client_ = std::make_unique<Client>(client_fd_);
    auto hello = client_->Recv(18);
    ASSERT_EQ(hello.size(), 18u);
    EXPECT_EQ(Get64(hello.data()), kNbdMagic);
    EXPECT_EQ(Get64(hello.data() + 8), kIHaveOpt);
    EXPECT_EQ(Get16(hello.data() + 16), kFlagFixedNewstyle | kFlagNoZeroes);
  }
  void SendClientFlags(uint32_t f = kClientFixedNewstyle | kClientNoZeroes) {
    std::vector<uint8_t> b(4);
    Put32(b.data(), f);
    client_->Send(b);
  }
  // Handshake to transmission with structured replies and base:allocation.
  void Negotiate(bool structured = true) {
    SendClientFlags();
    if (structured) {
      client_->Option(kOptStructuredReply, {});
      EXPECT_EQ(client_->OptionReply().first, kRepAck);
      client_->Option(kOptSetMetaContext, MetaData("disk0", {"base:allocation"}));
      auto [t, d] = client_->OptionReply();
      EXPECT_EQ(t, kRepMetaContext);
      EXPECT_EQ(client_->OptionReply().first, kRepAck);
    }
    client_->Option(kOptGo, GoData("disk0"));
    for (;;) {
      auto [t, d] = client_->OptionReply();
      if (t == kRepAck) break;
      ASSERT_EQ(t, kRepInfo);
    }
  }
  void Finish() {
    ::shutdown(client_fd_, SHUT_WR);
    thread_.join();
    ::close(client_fd_);
  }
  void TearDown() override {
    if (thread_.joinable()) Finish();
  }

  std::shared_ptr<MemDisk> disk_;
  std::unique_ptr<ExportTable> exports_;
  int client_fd_ = -1;
  std::unique_ptr<Session> session_;
  std::unique_ptr<Client> client_;
  std::thread thread_;
  Status result_;
};

TEST_F(SessionTest, ListAndUnknownOptionKeepTheConnectionUsable) {
  Start();
  SendClientFlags();
  client_->Option(kOptList, {});
  auto [t, d] = client_->OptionReply();
  EXPECT_EQ(t, kRepServer);
  ASSERT_EQ(d.size(), 4u + 5);
  EXPECT_EQ(std::string(d.begin() + 4, d.end()), "disk0");
  EXPECT_EQ(client_->OptionReply().first, kRepAck);
  client_->Option(999, {1, 2, 3});
  EXPECT_EQ(client_->OptionReply().first, kRepErrUnsup);
  client_->Option(kOptStartTls, {});
  EXPECT_EQ(client_->OptionReply().first, kRepErrUnsup);
  client_->Option(kOptList, {1});
  EXPECT_EQ(client_->OptionReply().first, kRepErrInvalid);
  client_->Option(kOptGo, GoData("nope"));
  EXPECT_EQ(client_->OptionReply().first, kRepErrUnknown);
  client_->Option(kOptSetMetaContext, MetaData("disk0", {"base:allocation"}));
  EXPECT_EQ(client_->OptionReply().first, kRepErrInvalid);  // no structured replies yet
  // Truncated INFO data.
  client_->Option(kOptInfo, {0, 0, 0, 9});
  EXPECT_EQ(client_->OptionReply().first, kRepErrInvalid);
  client_->Option(kOptInfo, GoData("disk0", {kInfoName, kInfoBlockSize}));
  bool saw_export = false, saw_bs = false, saw_name = false;
  for (;;) {
    auto [rt, rd] = client_->OptionReply();
    if (rt == kRepAck) break;
    ASSERT_EQ(rt, kRepInfo);
    uint16_t it = Get16(rd.data());
    if (it == kInfoExport) {
      saw_export = true;
      EXPECT_EQ(Get64(rd.data() + 2), 1u << 20);
    } else if (it == kInfoBlockSize) {
      saw_bs = true;
      EXPECT_EQ(Get32(rd.data() + 2), 1u);
      EXPECT_EQ(Get32(rd.data() + 6), 4096u);
      EXPECT_EQ(Get32(rd.data() + 10), 32u << 20);
    } else if (it == kInfoName) {
      saw_name = true;
    }
  }
  EXPECT_TRUE(saw_export && saw_bs && saw_name);
  client_->Option(kOptAbort, {});
  EXPECT_EQ(client_->OptionReply().first, kRepAck);
  EXPECT_TRUE(client_->AtEof());
  Finish();
  EXPECT_TRUE(result_.ok()) << result_.ToString();
}

TEST_F(SessionTest, UnknownClientFlagsEndTheSession) {
  Start();
  SendClientFlags(0x80);
  EXPECT_TRUE(client_->AtEof());
  Finish();
  EXPECT_FALSE(result_.ok());
}

TEST_F(SessionTest, OversizedOptionIsDrainedAndRefused) {
  Start();
  SendClientFlags();
  client_->Option(kOptGo, std::vector<uint8_t>(100 * 1024, 'x'));
  EXPECT_EQ(client_->OptionReply().first, kRepErrTooBig);
  client_->Option(kOptList, {});
  EXPECT_EQ(client_->OptionReply().first, kRepServer);
}

TEST_F(SessionTest, ExportNameWithNoZeroes) {
  Start();
  SendClientFlags();
  client_->Option(kOptExportName, {'d', 'i', 's', 'k', '0'});
  auto r = client_->Recv(10);
  ASSERT_EQ(r.size(), 10u);
  EXPECT_EQ(Get64(r.data()), 1u << 20);
  EXPECT_TRUE(Get16(r.data() + 8) & kTxCanMultiConn);
  client_->Request(kCmdWrite, 0, 1, 0, 4, {1, 2, 3, 4});
  EXPECT_EQ(client_->SimpleReply(), std::make_pair(0u, uint64_t{1}));
  client_->Request(kCmdRead, 0, 2, 0, 4);
  EXPECT_EQ(client_->SimpleReply(), std::make_pair(0u, uint64_t{2}));
  EXPECT_EQ(client_->Recv(4), (std::vector<uint8_t>{1, 2, 3, 4}));
}

TEST_F(SessionTest, SimpleRepliesReadWriteFlushTrimErrors) {
  Start();
  Negotiate(/*structured=*/false);
  std::vector<uint8_t> data(8192, 0x5a);
  client_->Request(kCmdWrite, 0, 10, 4096, 8192, data);
  EXPECT_EQ(client_->SimpleReply(), std::make_pair(0u, uint64_t{10}));
  client_->Request(kCmdWrite, kCmdFlagFua, 11, 0, 2, {7, 7});
  client_->Request(kCmdFlush, 0, 12, 0, 0);
  std::set<uint64_t> seen;
  for (int i = 0; i < 2; ++i) {
    auto [e, c] = client_->SimpleReply();
    EXPECT_EQ(e, 0u);
    seen.insert(c);
  }
  EXPECT_EQ(seen, (std::set<uint64_t>{11, 12}));
  EXPECT_GE(disk_->flush_count(), 1);
  client_->Request(kCmdTrim, 0, 13, 4096, 4096);
  EXPECT_EQ(client_->SimpleReply().first, 0u);
  client_->Request(kCmdRead, 0, 14, 4096, 8192);
  EXPECT_EQ(client_->SimpleReply(), std::make_pair(0u, uint64_t{14}));
  auto r = client_->Recv(8192);
  EXPECT_EQ(std::vector<uint8_t>(r.begin(), r.begin() + 4096), std::vector<uint8_t>(4096, 0));
  EXPECT_EQ(std::vector<uint8_t>(r.begin() + 4096, r.end()), std::vector<uint8_t>(4096, 0x5a));
  // Errors: out of range, past the end write, unknown command, unknown flag, DF without
  // structured replies, block status without a context, too large a read.
  client_->Request(kCmdRead, 0, 20, (1 << 20) - 1, 2);
  EXPECT_EQ(client_->SimpleReply(), std::make_pair(kEInval, uint64_t{20}));
  client_->Request(kCmdWrite, 0, 21, (1 << 20) - 1, 2, {1, 1});
  EXPECT_EQ(client_->SimpleReply(), std::make_pair(kENoSpc, uint64_t{21}));
  client_->Request(77, 0, 22, 0, 0);
  EXPECT_EQ(client_->SimpleReply(), std::make_pair(kEInval, uint64_t{22}));
  client_->Request(kCmdRead, 0x100, 23, 0, 16);
  EXPECT_EQ(client_->SimpleReply(), std::make_pair(kEInval, uint64_t{23}));
  client_->Request(kCmdRead, kCmdFlagDf, 24, 0, 16);
  EXPECT_EQ(client_->SimpleReply(), std::make_pair(kEInval, uint64_t{24}));
  client_->Request(kCmdBlockStatus, 0, 25, 0, 4096);
  EXPECT_EQ(client_->SimpleReply(), std::make_pair(kEInval, uint64_t{25}));
  client_->Request(kCmdRead, 0, 26, 0, (32 << 20) + 1);
  EXPECT_EQ(client_->SimpleReply(), std::make_pair(kEInval, uint64_t{26}));
  client_->Request(kCmdWriteZeroes, kCmdFlagReqOne, 27, 0, 16);
  EXPECT_EQ(client_->SimpleReply(), std::make_pair(kEInval, uint64_t{27}));
  // The connection still works; then DISC ends it cleanly.
  client_->Request(kCmdRead, 0, 28, 4096, 1);
  EXPECT_EQ(client_->SimpleReply(), std::make_pair(0u, uint64_t{28}));
  EXPECT_EQ(client_->Recv(1), std::vector<uint8_t>{0});
  client_->Request(kCmdDisc, 0, 29, 0, 0);
  EXPECT_TRUE(client_->AtEof());
  Finish();
  EXPECT_TRUE(result_.ok()) << result_.ToString();
}

TEST_F(SessionTest, StructuredReadHolesAndBlockStatus) {
  Start();
  Negotiate(/*structured=*/true);
  std::vector<uint8_t> data(4096, 0x11);
  client_->Request(kCmdWrite, 0, 1, 65536, 4096, data);
  EXPECT_EQ(client_->SimpleReply().first, 0u);
  // 128 KiB read over [0,64K) hole, [64K,68K) data, [68K,128K) hole.
  client_->Request(kCmdRead, 0, 2, 0, 131072);
  std::vector<uint8_t> image(131072, 0xee);
  bool done = false;
  while (!done) {
    auto h = client_->Recv(20);
    ASSERT_EQ(h.size(), 20u);
    ASSERT_EQ(Get32(h.data()), kStructuredReplyMagic);
    uint16_t flags = Get16(h.data() + 4), type = Get16(h.data() + 6);
    EXPECT_EQ(Get64(h.data() + 8), 2u);
    auto body = client_->Recv(Get32(h.data() + 16));
    if (type == kReplyTypeOffsetData) {
      uint64_t off = Get64(body.data());
      std::copy(body.begin() + 8, body.end(), image.begin() + off);
    } else if (type == kReplyTypeOffsetHole) {
      uint64_t off = Get64(body.data());
      uint32_t len = Get32(body.data() + 8);
      std::fill(image.begin() + off, image.begin() + off + len, 0);
    } else {
      FAIL() << "chunk type " << type;
    }
    done = flags & kReplyFlagDone;
  }
  std::vector<uint8_t> want(131072, 0);
  std::fill(want.begin() + 65536, want.begin() + 65536 + 4096, 0x11);
  EXPECT_EQ(image, want);

  client_->Request(kCmdBlockStatus, 0, 3, 0, 131072);
  auto h = client_->Recv(20);
  EXPECT_EQ(Get16(h.data() + 6), kReplyTypeBlockStatus);
  auto body = client_->Recv(Get32(h.data() + 16));
  ASSERT_EQ(body.size(), 4u + 3 * 8);
  EXPECT_EQ(Get32(body.data()), 1u);  // context id
  EXPECT_EQ(Get32(body.data() + 4), 65536u);
  EXPECT_EQ(Get32(body.data() + 8), kStateHole | kStateZero);
  EXPECT_EQ(Get32(body.data() + 12), 4096u);
  EXPECT_EQ(Get32(body.data() + 16), 0u);
  // REQ_ONE: one extent only.
  client_->Request(kCmdBlockStatus, kCmdFlagReqOne, 4, 0, 131072);
  h = client_->Recv(20);
  EXPECT_EQ(Get32(h.data() + 16), 4u + 8);
  client_->Recv(12);
  // A structured READ error is an error chunk.
  client_->Request(kCmdRead, 0, 5, 1 << 20, 1);
  h = client_->Recv(20);
  EXPECT_EQ(Get16(h.data() + 6), kReplyTypeError);
  body = client_->Recv(Get32(h.data() + 16));
  EXPECT_EQ(Get32(body.data()), kEInval);
}

TEST_F(SessionTest, StructuredErrorsCarryAMessageForEveryCommand) {
  Start();
  Negotiate(/*structured=*/true);
  client_->Request(kCmdWrite, 0, 7, (1 << 20) - 1, 2, {1, 1});
  auto h = client_->Recv(20);
  ASSERT_EQ(h.size(), 20u);
  EXPECT_EQ(Get32(h.data()), kStructuredReplyMagic);
  EXPECT_EQ(Get16(h.data() + 4), kReplyFlagDone);
  EXPECT_EQ(Get16(h.data() + 6), kReplyTypeError);
  EXPECT_EQ(Get64(h.data() + 8), 7u);
  auto body = client_->Recv(Get32(h.data() + 16));
  EXPECT_EQ(Get32(body.data()), kENoSpc);
  EXPECT_EQ(Get16(body.data() + 4), body.size() - 6);  // the message follows
  EXPECT_GT(body.size(), 6u);
  // Success stays a simple reply.
  client_->Request(kCmdCache, 0, 8, 0, 4096);
  EXPECT_EQ(client_->SimpleReply(), std::make_pair(0u, uint64_t{8}));
}

TEST_F(SessionTest, EmptyNameIsTheDefaultExport) {
  Start();
  SendClientFlags();
  client_->Option(kOptGo, GoData(""));
  uint32_t t = 0;
  while ((t = client_->OptionReply().first) == kRepInfo) {
  }
  EXPECT_EQ(t, kRepAck);
}

TEST_F(SessionTest, ReadOnlyExportRefusesWrites) {
  Start(/*read_only=*/true);
  Negotiate(false);
  client_->Request(kCmdWrite, 0, 1, 0, 3, {1, 2, 3});
  EXPECT_EQ(client_->SimpleReply(), std::make_pair(kEPerm, uint64_t{1}));
  client_->Request(kCmdTrim, 0, 2, 0, 4096);
  EXPECT_EQ(client_->SimpleReply(), std::make_pair(kEPerm, uint64_t{2}));
  client_->Request(kCmdRead, 0, 3, 0, 3);
  EXPECT_EQ(client_->SimpleReply().first, 0u);
  EXPECT_EQ(client_->Recv(3), (std::vector<uint8_t>{0, 0, 0}));
}

TEST_F(SessionTest, BadMagicClosesAndTruncatedWriteIsNotApplied) {
  Start();
  Negotiate(false);
  std::vector<uint8_t> b(28);
  Request{kRequestMagic, 0, kCmdWrite, 1, 0, 4096}.Encode(b.data());
  b.resize(28 + 100, 0x77);  // only 100 of 4096 payload bytes, then the client leaves
  client_->Send(b);
  Finish();
  EXPECT_FALSE(result_.ok());
  std::vector<uint8_t> got(100);
  ASSERT_TRUE(disk_->Read(0, got).ok());
  EXPECT_EQ(got, std::vector<uint8_t>(100, 0));

  TearDown();
  Start();
  Negotiate(false);
  std::vector<uint8_t> bad(28, 0);
  client_->Send(bad);
  EXPECT_TRUE(client_->AtEof());
  Finish();
  EXPECT_EQ(result_.code(), Code::kInvalidArgument);
}

TEST_F(SessionTest, OversizedWritePayloadIsSkippedThenRefused) {
  Start();
  Negotiate(false);
  std::vector<uint8_t> big((32 << 20) + 1, 0x33);
  std::thread sender(
      [&] { client_->Request(kCmdWrite, 0, 9, 0, static_cast<uint32_t>(big.size()), big); });
  EXPECT_EQ(client_->SimpleReply(), std::make_pair(kEInval, uint64_t{9}));
  sender.join();
  client_->Request(kCmdRead, 0, 10, 0, 1);
  EXPECT_EQ(client_->SimpleReply(), std::make_pair(0u, uint64_t{10}));
  EXPECT_EQ(client_->Recv(1), std::vector<uint8_t>{0});
}

// "TLS" for tests: the stream stays as it is; the client's identity is given.
class FakeTls final : public TlsUpgrader {
 public:
  explicit FakeTls(std::string identity, bool refuse = false)
      : identity_(std::move(identity)), refuse_(refuse) {}
  Result<std::unique_ptr<Stream>> Wrap(std::unique_ptr<Stream> plain) override {
    ++wraps;
    return plain;
  }
  Result<std::string> Handshake(Stream*, int) override {
    if (refuse_) return Status(Code::kPermissionDenied, "certificate refused");
    return identity_;
  }
  std::atomic<int> wraps{0};

 private:
  std::string identity_;
  bool refuse_;
};

// A session with three exports and the given security, over a socketpair.
class SecureSessionTest : public ::testing::Test {
 protected:
  void Start(SessionSecurity sec, SessionLimits limits = {}) {
    exports_ = std::make_unique<ExportTable>();
    ASSERT_TRUE(exports_->Add({"vm/a/os", "", std::make_shared<MemDisk>(1 << 16), "a"}).ok());
    ASSERT_TRUE(exports_->Add({"vm/b/os", "", std::make_shared<MemDisk>(1 << 16), "b"}).ok());
    ASSERT_TRUE(exports_->Add({"view/view-1/os", "", std::make_shared<MemDisk>(1 << 16), ""}).ok());
    int sv[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    client_fd_ = sv[0];
    session_ = std::make_unique<Session>(std::make_unique<SocketStream>(Fd(sv[1])), exports_.get(),
                                         limits, "test", std::move(sec));
    thread_ = std::thread([this] { result_ = session_->Run(); });
    client_ = std::make_unique<Client>(client_fd_);
    ASSERT_EQ(client_->Recv(18).size(), 18u);
    std::vector<uint8_t> b(4);
    Put32(b.data(), kClientFixedNewstyle | kClientNoZeroes);
    client_->Send(b);
  }
  std::vector<std::string> List() {
    client_->Option(kOptList, {});
    std::vector<std::string> names;
    for (;;) {
      auto [t, d] = client_->OptionReply();
      if (t != kRepServer) {
        EXPECT_EQ(t, kRepAck);
        return names;
      }
      names.emplace_back(d.begin() + 4, d.begin() + 4 + Get32(d.data()));
    }
  }
  uint32_t Go(const std::string& name) {
    client_->Option(kOptGo, GoData(name));
    for (;;) {
      auto [t, d] = client_->OptionReply();
      if (t != kRepInfo) return t;
    }
  }
  void TearDown() override {
    if (thread_.joinable()) {
      ::shutdown(client_fd_, SHUT_WR);
      thread_.join();
      ::close(client_fd_);
    }
  }

  std::unique_ptr<ExportTable> exports_;
  int client_fd_ = -1;
  std::unique_ptr<Session> session_;
  std::unique_ptr<Client> client_;
  std::thread thread_;
  Status result_;
};

TEST_F(SecureSessionTest, TlsRequiredRefusesEveryOptionButStartTlsAndAbortBeforeTls) {
  FakeTls tls("alice");
  Start({TlsMode::kRequired, &tls, nullptr, {}});
  client_->Option(kOptList, {});
  EXPECT_EQ(client_->OptionReply().first, kRepErrTlsReqd);
  client_->Option(kOptStructuredReply, {});
  EXPECT_EQ(client_->OptionReply().first, kRepErrTlsReqd);
  client_->Option(kOptGo, GoData("vm/a/os"));
  EXPECT_EQ(client_->OptionReply().first, kRepErrTlsReqd);
  client_->Option(kOptStartTls, {1});
  EXPECT_EQ(client_->OptionReply().first, kRepErrInvalid);  // STARTTLS takes no data
  EXPECT_EQ(tls.wraps, 0);
  client_->Option(kOptStartTls, {});
  EXPECT_EQ(client_->OptionReply().first, kRepAck);
  client_->Option(kOptStartTls, {});
  EXPECT_EQ(client_->OptionReply().first, kRepErrInvalid);  // TLS already on
  EXPECT_EQ(tls.wraps, 1);  // read after a later reply: the session wrapped after its ACK
  EXPECT_EQ(List(), (std::vector<std::string>{"view/view-1/os", "vm/a/os", "vm/b/os"}));
  EXPECT_EQ(Go("vm/a/os"), kRepAck);
  client_->Request(kCmdRead, 0, 1, 0, 4);
  EXPECT_EQ(client_->SimpleReply(), std::make_pair(0u, uint64_t{1}));
  EXPECT_EQ(client_->Recv(4).size(), 4u);
}

TEST_F(SecureSessionTest, ExportNameBeforeTlsEndsTheSessionWithoutData) {
  FakeTls tls("alice");
  Start({TlsMode::kRequired, &tls, nullptr, {}});
  client_->Option(kOptExportName, {'v', 'm', '/', 'a', '/', 'o', 's'});
  EXPECT_TRUE(client_->AtEof());
  thread_.join();
  ::close(client_fd_);
  EXPECT_EQ(result_.code(), Code::kPermissionDenied) << result_.ToString();
}

TEST_F(SecureSessionTest, ARefusedCertificateEndsTheSession) {
  FakeTls tls("mallory", /*refuse=*/true);
  Start({TlsMode::kRequired, &tls, nullptr, {}});
  client_->Option(kOptStartTls, {});
  EXPECT_EQ(client_->OptionReply().first, kRepAck);
  EXPECT_TRUE(client_->AtEof());
  thread_.join();
  ::close(client_fd_);
  EXPECT_EQ(result_.code(), Code::kPermissionDenied) << result_.ToString();
}

TEST_F(SecureSessionTest, AuthzLimitsWhatACertificateSeesAndOpens) {
  FakeTls tls("alice");
  Authz authz({{"alice", {"vm/a/"}}, {"ops", {}}});
  Start({TlsMode::kRequired, &tls, &authz, {}});
  client_->Option(kOptStructuredReply, {});
  EXPECT_EQ(client_->OptionReply().first, kRepErrTlsReqd);
  client_->Option(kOptStartTls, {});
  EXPECT_EQ(client_->OptionReply().first, kRepAck);
  EXPECT_EQ(List(), (std::vector<std::string>{"vm/a/os"}));
  // Another export reads as missing: the client does not learn that it exists.
  EXPECT_EQ(Go("vm/b/os"), kRepErrUnknown);
  EXPECT_EQ(Go("view/view-1/os"), kRepErrUnknown);
  EXPECT_EQ(Go(""), kRepAck);  // the only export it may open is its default
}

TEST_F(SecureSessionTest, StructuredRepliesNegotiatedBeforeTlsAreForgotten) {
  FakeTls tls("alice");
  Start({TlsMode::kOptional, &tls, nullptr, {}});
  client_->Option(kOptStructuredReply, {});
  EXPECT_EQ(client_->OptionReply().first, kRepAck);  // optional: plain options work
  client_->Option(kOptStartTls, {});
  EXPECT_EQ(client_->OptionReply().first, kRepAck);
  client_->Option(kOptStructuredReply, {});
  EXPECT_EQ(client_->OptionReply().first, kRepAck);  // not "already negotiated"
}

TEST_F(SecureSessionTest, AVmSocketSeesOnlyItsVmsDisks) {
  Start({TlsMode::kOff, nullptr, nullptr, {Principal::Kind::kLocalVm, "a"}});
  EXPECT_EQ(List(), (std::vector<std::string>{"vm/a/os"}));
  EXPECT_EQ(Go("vm/b/os"), kRepErrUnknown);
  EXPECT_EQ(Go("view/view-1/os"), kRepErrUnknown);
  client_->Option(kOptStartTls, {});
  EXPECT_EQ(client_->OptionReply().first, kRepErrUnsup);
  EXPECT_EQ(Go("vm/a/os"), kRepAck);
}

TEST_F(SecureSessionTest, TheHandshakeDeadlineEndsAClientThatSendsNothing) {
  SessionLimits limits;
  limits.handshake_timeout_ms = 200;
  Start({}, limits);  // sends its flags, then nothing
  EXPECT_TRUE(client_->AtEof());
  thread_.join();
  ::close(client_fd_);
  EXPECT_EQ(result_.code(), Code::kUnavailable) << result_.ToString();
  EXPECT_NE(result_.message().find("did not end within 200 ms"), std::string::npos)
      << result_.ToString();
}

}  // namespace
}  // namespace osr::nbd
