#include "nbd/server.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <netinet/in.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include "common/threads.h"

namespace osr::nbd {

namespace {

constexpr auto kRefusedLogInterval = std::chrono::seconds(5);
constexpr auto kWatchdogIdle = std::chrono::milliseconds(1000);
constexpr auto kWatchdogHandshaking = std::chrono::milliseconds(100);

// The server side of STARTTLS over one accepted socket.
class ServerTlsUpgrader final : public TlsUpgrader {
 public:
  ServerTlsUpgrader(std::shared_ptr<TlsContext> ctx, int fd) : ctx_(std::move(ctx)), fd_(fd) {}

  Result<std::unique_ptr<Stream>> Wrap(std::unique_ptr<Stream> plain) override {
    // The plain stream owns the socket: keep the connection in a second descriptor, then
    // let the plain stream go.
    int dup = ::fcntl(fd_, F_DUPFD_CLOEXEC, 0);
    plain.reset();
    if (dup < 0) return Status::FromErrno(errno, "dup for TLS");
    OSR_ASSIGN_OR_RETURN(std::unique_ptr<TlsStream> tls, ctx_->NewStream(Fd(dup)));
    tls_ = tls.get();
    return std::unique_ptr<Stream>(std::move(tls));
  }

  Result<std::string> Handshake(Stream* s, int timeout_ms) override {
    OSR_CHECK(s == tls_);
    OSR_RETURN_IF_ERROR(tls_->Handshake(timeout_ms));
    std::string name = tls_->PeerName();
    if (name.empty()) {
      return Status(Code::kPermissionDenied, "the client certificate has no common name");
    }
    return name;
  }

 private:
  std::shared_ptr<TlsContext> ctx_;
  int fd_;                    // the accepted socket (owned by the plain stream until Wrap)
  TlsStream* tls_ = nullptr;  // what Wrap returned (owned by the session)
};

// What one client address counts as: the IPv4 address, or the /64 of an IPv6 address
// (one host usually owns a whole /64).
std::string AddressKey(int fd) {
  struct sockaddr_storage ss {};
  socklen_t len = sizeof ss;
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return "unknown";
  char text[INET6_ADDRSTRLEN] = {};
  if (ss.ss_family == AF_INET) {
    auto* a = reinterpret_cast<sockaddr_in*>(&ss);
    ::inet_ntop(AF_INET, &a->sin_addr, text, sizeof text);
    return text;
  }
  if (ss.ss_family == AF_INET6) {
    auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
    if (IN6_IS_ADDR_V4MAPPED(&a->sin6_addr)) {
      ::inet_ntop(AF_INET, &a->sin6_addr.s6_addr[12], text, sizeof text);
      return text;
    }
    struct in6_addr prefix = a->sin6_addr;
    std::memset(&prefix.s6_addr[8], 0, 8);
    ::inet_ntop(AF_INET6, &prefix, text, sizeof text);
    return std::string(text) + "/64";
  }
  return "unknown";
}

}  // namespace

Server::Server(const ExportTable* exports, SessionLimits limits, ServerLimits server_limits,
               const Authz* authz)
    : exports_(exports), authz_(authz), limits_(limits), server_limits_(server_limits) {}

Server::~Server() {
  Stop();
}

Result<ListenAddress> Server::AddListener(const ListenAddress& addr, ListenerOptions options) {
  bool tcp = addr.kind == ListenAddress::Kind::kTcp;
  if (options.tls != TlsMode::kOff && options.tls_context == nullptr) {
    return InvalidArgument("a TLS listener needs a TLS context");
  }
  if (tcp && options.tls != TlsMode::kRequired && !options.insecure_tcp &&
      !IsLoopbackHost(addr.host)) {
    return InvalidArgument(fmt::format(
        "NBD on {}:{} would serve disks in plain text to the network: {} is not a loopback "
        "address. Configure TLS (certificate, key, CA and the client names allowed), or allow "
        "plain TCP explicitly (insecure)",
        addr.host, addr.port, addr.host));
  }
  OSR_ASSIGN_OR_RETURN(Listener l, Listener::Listen(addr));
  auto entry = std::make_unique<ListenerEntry>();
  if (!tcp) {
    // Only the daemon's user may connect (the directory should be 0700 as well).
    if (::chmod(addr.path.c_str(), 0600) != 0) {
      return Status::FromErrno(errno, "chmod 0600 " + addr.path);
    }
    entry->key = "unix:" + addr.path;
  }
  entry->listener = std::make_unique<Listener>(std::move(l));
  entry->options = std::move(options);
  // Non-blocking: the one acceptor thread must never wait in accept() on one listener
  // while the others have clients (accepted sockets do not inherit the flag).
  int flags = ::fcntl(entry->listener->fd(), F_GETFL);
  if (flags < 0 || ::fcntl(entry->listener->fd(), F_SETFL, flags | O_NONBLOCK) != 0) {
    return Status::FromErrno(errno, "making the NBD listener non-blocking");
  }
  ListenAddress bound = entry->listener->address();
  std::unique_lock lock(listeners_mu_);
  listeners_.push_back(std::move(entry));
  // Not waited for: a connection that comes before the acceptor polls it waits in the
  // backlog.
  ChangedListenersLocked(lock, /*wait=*/false);
  return bound;
}

void Server::ChangedListenersLocked(std::unique_lock<std::mutex>& lock, bool wait) {
  uint64_t generation = ++listeners_generation_;
  if (!started_) return;
  uint64_t one = 1;
  (void)!::write(wake_event_.get(), &one, sizeof one);  // cannot fail short of a full counter
  if (!wait) return;
  acceptor_cv_.wait(lock, [&] { return acceptor_generation_ >= generation || acceptor_done_; });
}

Status Server::RemoveUnixListener(const std::string& path) {
  std::unique_ptr<ListenerEntry> entry;
  {
    std::lock_guard lock(listeners_mu_);
    for (auto it = listeners_.begin(); it != listeners_.end(); ++it) {
      const ListenAddress& a = (*it)->listener->address();
      if (a.kind == ListenAddress::Kind::kUnix && a.path == path) {
        entry = std::move(*it);
        listeners_.erase(it);
        break;
      }
    }
  }
  if (!entry) return NotFound("no NBD listener on " + path);
  {
    std::unique_lock lock(listeners_mu_);
    ChangedListenersLocked(lock, /*wait=*/true);  // the acceptor has let go of it
  }
  return Status::Ok();  // the Listener's destructor removes the socket file
}

Status Server::Start() {
  std::lock_guard lock(listeners_mu_);
  if (listeners_.empty()) return InvalidArgument("no listener configured");
  if (started_) return Status::Ok();
  started_ = true;
  wake_event_ = Fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  OSR_CHECK(wake_event_.valid());
  acceptor_ = std::thread([this] {
    NameThisThread("osr-nbd-accept");
    AcceptLoop();
  });
  watchdog_ = std::thread([this] {
    NameThisThread("osr-nbd-watch");
    WatchdogLoop();
  });
  return Status::Ok();
}

size_t Server::active_connections() const {
  std::lock_guard lock(mu_);
  size_t n = 0;
  for (auto& c : conns_) n += c->done ? 0 : 1;
  return n;
}

Status Server::DisconnectExport(const std::shared_ptr<const Export>& removed) {
  if (removed == nullptr) return Status::Ok();
  using Clock = std::chrono::steady_clock;
  const auto began = Clock::now();
  const auto grace = began + std::chrono::milliseconds(kDisconnectGraceMs);
  const auto deadline = began + std::chrono::milliseconds(kDisconnectWaitMs);
  // Sessions are looked for on every round: one still in its handshake may choose the
  // export after the first look (it found it in the table before the caller removed it).
  for (;;) {
    // Only the table could hand out new references, and the export has left it: once the
    // count is 1, it stays 1.
    if (removed.use_count() <= 1) return Status::Ok();
    auto now = Clock::now();
    if (now >= deadline) break;
    {
      std::lock_guard lock(mu_);
      for (auto& c : conns_) {
        if (c->done || !c->session->Holds(removed.get())) continue;
        if (now < grace) {
          c->session->Stop();
        } else {
          c->session->Abort();  // a client that does not read its replies holds the send
        }
      }
    }
    ::usleep(2 * 1000);
  }
  return Unavailable(fmt::format(
      "export {}: still in use {} ms after its sessions were told to end ({} reference(s) "
      "besides the caller's)",
      removed->name, kDisconnectWaitMs, removed.use_count() - 1));
}

void Server::WatchdogLoop() {
  std::unique_lock lock(mu_);
  while (!stopping_) {
    JoinFinished(conns_);
    auto now = std::chrono::steady_clock::now();
    bool handshaking = false;
    for (auto& c : conns_) {
      if (c->done || !c->session->in_handshake()) continue;
      if (now >= c->handshake_deadline && !c->aborted) {
        c->aborted = true;
        spdlog::info("nbd {}: handshake not done within {} ms: closing", c->session->peer(),
                     limits_.handshake_timeout_ms);
        c->session->Abort();
      }
      handshaking = handshaking || !c->aborted;
    }
    watchdog_cv_.wait_for(lock, handshaking ? kWatchdogHandshaking : kWatchdogIdle);
  }
}

bool Server::FitsLocked(const std::string& key, bool tcp) const {
  auto it = per_address_.find(key);
  size_t from_key = it == per_address_.end() ? 0 : it->second;
  if (!tcp) return from_key < server_limits_.unix_connections_max;
  return tcp_active_ < server_limits_.tcp_connections_max &&
         from_key < server_limits_.connections_per_address_max;
}

void Server::AcceptLoop() {
  std::vector<struct pollfd> fds;
  std::vector<ListenerEntry*> entries;  // entries[i] listens on fds[i + 1]
  auto done = [this] {
    std::lock_guard lock(listeners_mu_);
    acceptor_done_ = true;
    acceptor_cv_.notify_all();
  };
  for (;;) {
    {
      // A new set only here, between polls: a listener taken out of the set is not touched
      // once its remover saw acceptor_generation_ reach its change.
      std::lock_guard lock(listeners_mu_);
      fds.assign(1, pollfd{wake_event_.get(), POLLIN, 0});
      entries.clear();
      for (auto& l : listeners_) {
        fds.push_back(pollfd{l->listener->fd(), POLLIN, 0});
        entries.push_back(l.get());
      }
      acceptor_generation_ = listeners_generation_;
      acceptor_cv_.notify_all();
    }
    if (stopping_) return done();
    int rc = ::poll(fds.data(), fds.size(), -1);
    if (stopping_) return done();
    if (rc < 0) {
      if (errno == EINTR) continue;
      spdlog::error("nbd: poll on the listeners failed: {}", std::strerror(errno));
      return done();
    }
    if (fds[0].revents & POLLIN) {
      uint64_t n;
      (void)!::read(wake_event_.get(), &n, sizeof n);  // only clears it: the set is read again
      continue;
    }
    for (size_t i = 1; i < fds.size(); ++i) {
      if (fds[i].revents & POLLIN) AcceptOn(entries[i - 1]);
    }
  }
}

void Server::AcceptOn(ListenerEntry* entry) {
  auto fd = entry->listener->Accept();
  // The listener is non-blocking (one thread accepts for all): a client that left
  // between poll and accept leaves nothing to take.
  if (!fd.ok() && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
  if (!fd.ok()) {
    spdlog::warn("nbd: accept: {}", fd.status().ToString());
    if (errno == EMFILE || errno == ENFILE) ::usleep(100 * 1000);
    return;
  }
  Admit(entry, std::move(*fd));
}

void Server::Admit(ListenerEntry* entry, Fd fd) {
  bool tcp = entry->listener->address().kind == ListenAddress::Kind::kTcp;
  std::string key = tcp ? AddressKey(fd.get()) : entry->key;
  const ListenerOptions& o = entry->options;
  std::lock_guard lock(mu_);
  if (!FitsLocked(key, tcp)) {
    // Closing the socket refuses the client; nobody waits on it.
    ++refused_;
    auto now = std::chrono::steady_clock::now();
    if (now - refused_logged_ >= kRefusedLogInterval) {
      spdlog::warn(
          "nbd: refused {} connection(s) over the caps (latest from {}: {} TCP connections, at "
          "most {} in all and {} per address)",
          refused_, key, tcp_active_, server_limits_.tcp_connections_max,
          server_limits_.connections_per_address_max);
      refused_ = 0;
      refused_logged_ = now;
    }
    return;
  }
  static std::atomic<uint64_t> next_id{1};
  std::string peer = fmt::format("conn-{} ({})", next_id++, key);
  auto conn = std::make_shared<Conn>();
  conn->address_key = key;
  conn->tcp = tcp;
  conn->handshake_deadline =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(limits_.handshake_timeout_ms);
  SessionSecurity sec;
  sec.tls = o.tls;
  sec.authz = authz_;
  if (!o.local_vm.empty()) sec.principal = {Principal::Kind::kLocalVm, o.local_vm};
  if (o.tls != TlsMode::kOff) {
    conn->upgrader = std::make_unique<ServerTlsUpgrader>(o.tls_context, fd.get());
    sec.upgrader = conn->upgrader.get();
  }
  conn->session = std::make_unique<Session>(std::make_unique<SocketStream>(std::move(fd)), exports_,
                                            limits_, peer, std::move(sec));
  ++per_address_[key];
  if (tcp) ++tcp_active_;
  conns_.push_back(conn);
  Conn* c = conn.get();
  c->thread = std::thread([this, c] {
    NameThisThread("osr-nbd");
    spdlog::debug("nbd {}: connected", c->session->peer());
    Status st = c->session->Run();
    if (st.ok()) {
      spdlog::debug("nbd {}: disconnected", c->session->peer());
    } else {
      spdlog::info("nbd {} ({}): session ended: {}", c->session->peer(),
                   c->session->principal().Describe(), st.ToString());
    }
    // The session let go of its export in Run(). Done is set under mu_ and the watchdog
    // woken: it joins this thread at once (it checks done under mu_ before it waits, so
    // the wake-up cannot be missed).
    {
      std::lock_guard l(mu_);
      if (--per_address_[c->address_key] == 0) per_address_.erase(c->address_key);
      if (c->tcp) --tcp_active_;
      c->done = true;
    }
    watchdog_cv_.notify_all();
  });
  watchdog_cv_.notify_all();  // a new handshake to watch
}

void Server::Stop() {
  if (stopping_.exchange(true)) return;
  std::list<std::unique_ptr<ListenerEntry>> listeners;
  {
    std::lock_guard lock(listeners_mu_);
    listeners.swap(listeners_);
    if (started_) {
      uint64_t one = 1;
      (void)!::write(wake_event_.get(), &one, sizeof one);  // stopping_ is set: it returns
    }
  }
  if (acceptor_.joinable()) acceptor_.join();
  watchdog_cv_.notify_all();
  if (watchdog_.joinable()) watchdog_.join();
  std::list<std::shared_ptr<Conn>> conns;
  {
    std::lock_guard lock(mu_);
    conns.swap(conns_);
  }
  for (auto& c : conns) {
    // A client in its handshake may not even read: cut it rather than wait for it.
    if (c->session->in_handshake()) {
      c->session->Abort();
    } else {
      c->session->Stop();
    }
  }
  for (auto& c : conns) c->thread.join();
  listeners.clear();
}

}  // namespace osr::nbd
