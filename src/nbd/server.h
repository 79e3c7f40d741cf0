// Server: accepts NBD clients on TCP and unix sockets and runs a Session for each.
//
// Thread model: one acceptor thread per listener, one thread per connection (plus the
// session's sync thread). Start() and Stop() are called from the owning thread.
#pragma once

#include <atomic>
#include <list>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "common/file.h"
#include "common/socket.h"
#include "nbd/session.h"

namespace osr::nbd {

class Server {
 public:
  // `exports` is borrowed and outlives the server.
  Server(const ExportTable* exports, SessionLimits limits, size_t connections_max = 128);
  ~Server();

  // Binds a listener; returns the bound address (with the real port for port 0).
  Result<ListenAddress> AddListener(const ListenAddress& addr);
  Status Start();
  // Stops accepting, ends every session, waits for their threads.
  void Stop();

  size_t active_connections() const;
  // Ends the sessions connected to the export `name` (after it was removed) and waits
  // for them to finish.
  void DisconnectExport(const std::string& name);

 private:
  struct Conn {
    std::unique_ptr<Session> session;
    std::thread thread;
    std::atomic<bool> done{false};
  };
  void AcceptLoop(Listener* listener);
  void ReapFinished();  // joins the threads of ended sessions; holds mu_

  const ExportTable* exports_;
  SessionLimits limits_;
  size_t connections_max_;
  std::vector<std::unique_ptr<Listener>> listeners_;
  std::vector<std::thread> acceptors_;
  Fd stop_event_;  // eventfd: readable once Stop() was called
  std::atomic<bool> stopping_{false};

  mutable std::mutex mu_;
  std::list<std::unique_ptr<Conn>> conns_;  // guarded by mu_
};

}  // namespace osr::nbd
