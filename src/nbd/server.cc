#include "nbd/server.h"

#include <fmt/format.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "common/threads.h"

namespace osr::nbd {

Server::Server(const ExportTable* exports, SessionLimits limits, size_t connections_max)
    : exports_(exports), limits_(limits), connections_max_(connections_max) {
  stop_event_ = Fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  OSR_CHECK(stop_event_.valid());
}

Server::~Server() {
  Stop();
}

Result<ListenAddress> Server::AddListener(const ListenAddress& addr) {
  OSR_ASSIGN_OR_RETURN(Listener l, Listener::Listen(addr));
  listeners_.push_back(std::make_unique<Listener>(std::move(l)));
  return listeners_.back()->address();
}

Status Server::Start() {
  if (listeners_.empty()) return InvalidArgument("no listener configured");
  for (auto& l : listeners_) {
    acceptors_.emplace_back([this, lp = l.get()] { AcceptLoop(lp); });
  }
  return Status::Ok();
}

size_t Server::active_connections() const {
  std::lock_guard lock(mu_);
  size_t n = 0;
  for (auto& c : conns_) n += c->done ? 0 : 1;
  return n;
}

void Server::DisconnectExport(const std::string& name) {
  std::vector<Conn*> ending;
  {
    std::lock_guard lock(mu_);
    for (auto& c : conns_) {
      if (!c->done && c->session->export_name() == name) {
        c->session->Stop();
        ending.push_back(c.get());
      }
    }
  }
  // Wait (bounded) until they are gone: the caller frees the export's disk next. Conns
  // are only reaped by the acceptor after `done`, so the pointers stay valid here.
  for (int i = 0; i < 1000; ++i) {
    bool all = true;
    for (Conn* c : ending) all = all && c->done;
    if (all) return;
    ::usleep(10 * 1000);
  }
  spdlog::error("nbd: sessions of export {} did not end within 10 s", name);
}

void Server::ReapFinished() {
  JoinFinished(conns_);
}

void Server::AcceptLoop(Listener* listener) {
  for (;;) {
    struct pollfd fds[2] = {{listener->fd(), POLLIN, 0}, {stop_event_.get(), POLLIN, 0}};
    int rc = ::poll(fds, 2, 1000);
    if (stopping_) return;
    if (rc < 0 && errno != EINTR) {
      spdlog::error("nbd: poll on listener failed: {}", std::strerror(errno));
      return;
    }
    {
      std::lock_guard lock(mu_);
      ReapFinished();
    }
    if (rc <= 0 || !(fds[0].revents & POLLIN)) continue;
    auto fd = listener->Accept();
    if (!fd.ok()) {
      spdlog::warn("nbd: accept: {}", fd.status().ToString());
      if (errno == EMFILE || errno == ENFILE) ::usleep(100 * 1000);
      continue;
    }
    std::lock_guard lock(mu_);
    if (conns_.size() >= connections_max_) {
      spdlog::warn("nbd: refusing a connection: {} connections already", connections_max_);
      continue;  // closing the fd refuses the client
    }
    static std::atomic<uint64_t> next_id{1};
    std::string peer = fmt::format("conn-{}", next_id++);
    auto conn = std::make_unique<Conn>();
    conn->session = std::make_unique<Session>(std::make_unique<SocketStream>(std::move(*fd)),
                                              exports_, limits_, peer);
    Conn* c = conn.get();
    conns_.push_back(std::move(conn));
    c->thread = std::thread([c] {
      spdlog::debug("nbd {}: connected", c->session->peer());
      Status st = c->session->Run();
      if (st.ok()) {
        spdlog::debug("nbd {}: disconnected", c->session->peer());
      } else {
        spdlog::info("nbd {}: session ended: {}", c->session->peer(), st.ToString());
      }
      c->done = true;
    });
  }
}

void Server::Stop() {
  if (stopping_.exchange(true)) return;
  uint64_t one = 1;
  (void)!::write(stop_event_.get(), &one, sizeof one);
  for (auto& t : acceptors_) t.join();
  acceptors_.clear();
  std::list<std::unique_ptr<Conn>> conns;
  {
    std::lock_guard lock(mu_);
    conns.swap(conns_);
  }
  for (auto& c : conns) c->session->Stop();
  for (auto& c : conns) c->thread.join();
  listeners_.clear();
}

}  // namespace osr::nbd
