// Server: accepts NBD clients on TCP and unix sockets and runs a Session for each.
//
// Who gets in (see access.h for what each then sees):
//   - A listener is plain, TLS-optional or TLS-required (ListenerOptions::tls). Plain text
//     on TCP (plain or TLS-optional) is refused on an address that is not loopback unless
//     the listener says insecure_tcp.
//   - One client address cannot lock others out: TCP connections are capped per client
//     address (IPv4 address, or IPv6 /64) and in total; a connection over a cap is closed
//     at once, without a thread. A connection still in its handshake after
//     SessionLimits::handshake_timeout_ms is cut (from this server's watchdog, so a client
//     that neither sends nor reads cannot hold it). So 500 idle sockets from one address
//     hold at most connections_per_address_max threads, for at most the handshake
//     timeout, and never block a client from another address. (qemu-nbd bounds its
//     handshake at 10 s the same way; sshd's MaxStartups plays the per-source role.)
//   - Unix sockets are reached only by who the file system lets in (0600 sockets in
//     0700 directories); each unix listener has its own cap.
//
// Thread model: one acceptor thread for every listener (blocked in poll on all of them and
// an eventfd that says the set changed: a site has a unix listener per VM, and a thread
// each would only wait), one watchdog thread (reaps ended sessions, enforces handshake
// deadlines), one thread per connection (plus the session's sync thread). All public
// methods are thread-safe; AddListener and RemoveUnixListener may be called while the
// server runs. mu_ guards the connections and their counts, listeners_mu_ the listeners
// and the acceptor's generations.
//
// Ownership: the server owns its connections (Conn: the session, its thread, its TLS
// upgrader). A session shares its export with the ExportTable and lets go of it when it
// ends, on its own thread; its connection thread then wakes the watchdog, which joins and
// frees it at once (not on a timer). Whoever removes an export calls DisconnectExport
// with it, which returns once the caller holds the export's last reference: the export's
// disk (a view, a failover disk, a VM's disk) is then freed by the caller, at a known
// point, never by an NBD thread later.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/file.h"
#include "common/socket.h"
#include "common/tls.h"
#include "nbd/access.h"
#include "nbd/session.h"

namespace osr::nbd {

struct ServerLimits {
  size_t tcp_connections_max = 128;         // TCP connections at once, every address
  size_t connections_per_address_max = 16;  // TCP connections at once from one address
  size_t unix_connections_max = 256;        // per unix listener (a VM: one per disk)
};

struct ListenerOptions {
  TlsMode tls = TlsMode::kOff;
  std::shared_ptr<TlsContext> tls_context;  // required when tls != kOff (a server context)
  // A VM's own unix socket: its clients are that VM (Principal::kLocalVm) and see only
  // the exports whose Export::vm names it.
  std::string local_vm;
  // Allows plain text (kOff, kOptional) on a TCP address that is not loopback.
  bool insecure_tcp = false;
};

class Server {
 public:
  // `exports` and `authz` (may be nullptr: any certificate of the CA) are borrowed and
  // outlive the server.
  Server(const ExportTable* exports, SessionLimits limits, ServerLimits server_limits = {},
         const Authz* authz = nullptr);
  ~Server();

  // Binds a listener; returns the bound address (with the real port for port 0). A unix
  // socket is made 0600. kInvalidArgument for plain text on a TCP address that is not
  // loopback (without insecure_tcp), or TLS without a context. Accepts at once when the
  // server runs already.
  Result<ListenAddress> AddListener(const ListenAddress& addr, ListenerOptions options = {});
  // Stops accepting on the unix socket at `path` and removes it; waits for its acceptor.
  // Sessions that came in on it go on (end them with DisconnectExport). kNotFound if there
  // is no such listener.
  Status RemoveUnixListener(const std::string& path);
  Status Start();
  // Stops accepting, ends every session, waits for their threads.
  void Stop();

  size_t active_connections() const;
  // Ends the sessions that hold `removed` (an export the caller took out of the table,
  // ExportTable::Remove; nullptr: nothing to do) and waits until `removed` is the only
  // reference left, so that dropping it frees the export's disk on the caller's thread.
  // Sessions are stopped (requests in flight are answered), and cut (Abort) after
  // kDisconnectGraceMs if they have not ended. kUnavailable if something still holds the
  // export after kDisconnectWaitMs (a disk stuck in I/O): the export then lives on with
  // that holder, which frees it; the caller must keep alive what the disk borrows.
  Status DisconnectExport(const std::shared_ptr<const Export>& removed);
  static constexpr int kDisconnectGraceMs = 2000;
  static constexpr int kDisconnectWaitMs = 10000;

 private:
  struct ListenerEntry {
    std::unique_ptr<Listener> listener;
    ListenerOptions options;
    std::string key;  // per-address count key of a unix listener ("unix:PATH"), else ""
  };
  struct Conn {
    std::unique_ptr<TlsUpgrader> upgrader;  // before session: the session borrows it
    std::unique_ptr<Session> session;
    std::thread thread;
    std::string address_key;  // the per-address count this connection holds
    bool tcp = false;
    std::chrono::steady_clock::time_point handshake_deadline;
    bool aborted = false;  // guarded by mu_
    std::atomic<bool> done{false};
  };

  void AcceptLoop();
  // Accepts one connection on a listener that poll() found readable.
  void AcceptOn(ListenerEntry* entry);
  // Tells the acceptor that the listeners changed and, with `wait`, waits until it polls
  // the new set (it no longer touches a listener taken out before). Holds listeners_mu_.
  void ChangedListenersLocked(std::unique_lock<std::mutex>& lock, bool wait);
  void Admit(ListenerEntry* entry, Fd fd);
  // Whether one more connection under `key` fits; holds mu_.
  bool FitsLocked(const std::string& key, bool tcp) const;
  void WatchdogLoop();

  const ExportTable* exports_;
  const Authz* authz_;
  SessionLimits limits_;
  ServerLimits server_limits_;
  std::atomic<bool> stopping_{false};

  std::mutex listeners_mu_;
  std::list<std::unique_ptr<ListenerEntry>> listeners_;  // guarded by listeners_mu_
  bool started_ = false;                                 // guarded by listeners_mu_
  // The listener set's version, and the one the acceptor polls now (it takes a new set
  // only between polls, after it is done with the connections the last poll found).
  uint64_t listeners_generation_ = 0;    // guarded by listeners_mu_
  uint64_t acceptor_generation_ = 0;     // guarded by listeners_mu_
  std::condition_variable acceptor_cv_;  // with listeners_mu_: the acceptor took a new set
  bool acceptor_done_ = false;           // guarded by listeners_mu_: it returned
  Fd wake_event_;  // eventfd: readable when the set changed or the server stops
  std::thread acceptor_;

  mutable std::mutex mu_;
  std::condition_variable watchdog_cv_;                   // with mu_: wakes the watchdog
  std::list<std::shared_ptr<Conn>> conns_;                // guarded by mu_
  std::map<std::string, size_t> per_address_;             // guarded by mu_
  size_t tcp_active_ = 0;                                 // guarded by mu_
  uint64_t refused_ = 0;                                  // guarded by mu_; since the last log line
  std::chrono::steady_clock::time_point refused_logged_;  // guarded by mu_
  std::thread watchdog_;
};

}  // namespace osr::nbd
