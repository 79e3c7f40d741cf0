// Receiver: the recovery site's end of replication channels. Accepts senders, checks
// their HELLO against the group's recovery store, appends RECORDS frames to the store
// (durable before the ACK leaves), and refuses damaged or out-of-order records with an
// ERROR (the sender reconnects and resends from the durable point).
//
// Thread model: an acceptor thread and one thread per connection. A group has at most
// one live connection: a new HELLO for it ends the older one first (a sender that
// reconnected after a cut must not race its own ghost). Stores are borrowed.
#pragma once

#include <atomic>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <thread>

#include "common/socket.h"
#include "common/tls.h"
#include "store/recovery_store.h"

namespace osr::replication {

class Receiver {
 public:
  // Returns the group's store, or nullptr for an unknown group. Shared: a session keeps
  // the store alive until it ends, even if the site drops the store meanwhile.
  using StoreLookup =
      std::function<std::shared_ptr<store::RecoveryStore>(const std::string& group)>;

  // With `tls`, every sender must authenticate with a certificate of the CA.
  explicit Receiver(StoreLookup lookup, std::shared_ptr<TlsContext> tls = nullptr)
      : lookup_(std::move(lookup)), tls_(std::move(tls)) {}
  ~Receiver();

  Result<ListenAddress> Listen(const ListenAddress& addr);
  void Start();
  void Stop();
  // Ends the group's connection, if any, and waits for it (before its store goes).
  void EndGroup(const std::string& group);

 private:
  struct Conn {
    std::unique_ptr<Stream> stream;
    TlsStream* tls = nullptr;  // stream, when TLS is on
    std::thread thread;
    std::atomic<bool> done{false};
  };
  struct Group {
    std::mutex serving;         // held by the connection serving the group
    Stream* current = nullptr;  // guarded by Receiver::mu_
  };
  void AcceptLoop();
  void Serve(Conn* c);
  Status ServeSession(Stream& s);

  StoreLookup lookup_;
  std::shared_ptr<TlsContext> tls_;
  std::unique_ptr<Listener> listener_;
  std::thread acceptor_;
  std::atomic<bool> stopping_{false};
  std::mutex mu_;
  std::list<std::unique_ptr<Conn>> conns_;                // guarded by mu_
  std::map<std::string, std::unique_ptr<Group>> groups_;  // guarded by mu_
};

}  // namespace osr::replication
