// Receiver: the recovery site's end of replication channels. Accepts senders, checks
// their HELLO against the group's recovery store, appends RECORDS frames to the store
// (durable before the ACK leaves), and refuses damaged or out-of-order records with an
// ERROR (the sender reconnects and resends from the durable point).
//
// Trust (DESIGN.md invariant 8): with TLS, the sender's certificate must come from the
// CA and, when the store names its source site, name that site (kNotAuthorized). The
// sender's epoch must equal the store's: below it is stale (the sender fences itself),
// above it is refused too (only the vault raises a store's epoch). Every frame is parsed
// without throwing (messages.h); a refusal is an ERROR frame with a typed code.
//
// Small writes (batching): the RECORDS frames that have arrived behind the one read go
// into one RecoveryStore::Append — one journal sync — up to kBatchBytesMax (plus the
// frame that passes it) and kBatchFramesMax frames, and one ACK of the durable seq answers
// them all (ACKs are cumulative, docs/formats.md). The batch is the store's: all of it is
// durable and acknowledged, or none of it (the session ends; the sender resends from the
// durable seq). Waiting is never added: a batch is what came while the last one synced.
// Memory per session: the read-ahead (FrameReader: 256 KiB, or one frame), the batch's
// frames and their concatenation — at most 2 x (kBatchBytesMax + one frame's records).
//
// Thread model: an acceptor thread and one thread per connection; each thread's entry
// point catches whatever escapes, logs it and keeps the daemon running. A group has at
// most one live connection: a new HELLO for it ends the older one first (a sender that
// reconnected after a cut must not race its own ghost). Stores are borrowed.
#pragma once

#include <atomic>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>

#include "common/socket.h"
#include "common/tls.h"
#include "replication/messages.h"
#include "replication/wire.h"
#include "store/recovery_store.h"

namespace osr::replication {

class Receiver {
 public:
  // Returns the group's store, or nullptr for an unknown group. Shared: a session keeps
  // the store alive until it ends, even if the site drops the store meanwhile.
  using StoreLookup =
      std::function<std::shared_ptr<store::RecoveryStore>(const std::string& group)>;

  // With `tls`, every sender must authenticate with a certificate of the CA. Without,
  // Listen takes only loopback addresses unless `plaintext_beyond_loopback`.
  explicit Receiver(StoreLookup lookup, std::shared_ptr<TlsContext> tls = nullptr,
                    bool plaintext_beyond_loopback = false)
      : lookup_(std::move(lookup)),
        tls_(std::move(tls)),
        plaintext_beyond_loopback_(plaintext_beyond_loopback) {}
  ~Receiver();

  // kPermissionDenied for an address that is not loopback (IsLoopback) when there is
  // no TLS and plain TCP beyond loopback was not allowed; the socket's errors.
  Result<ListenAddress> Listen(const ListenAddress& addr);
  void Start();
  void Stop();
  // Ends the group's connection, if any, and waits for it (before its store goes).
  void EndGroup(const std::string& group);

  // Bounds of one batch of RECORDS frames taken into one store append.
  static constexpr size_t kBatchBytesMax = 16 << 20;  // records' bytes, before the last frame
  static constexpr size_t kBatchFramesMax = 4096;

  // Counters since the receiver started, over all sessions.
  struct Stats {
    uint64_t records_frames = 0;  // RECORDS frames taken
    uint64_t appends = 0;         // store appends that succeeded (one journal sync each)
    uint64_t acks = 0;            // ACK frames sent (counted as each goes)
  };
  Stats stats() const;

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
  // A session's end: ok when the sender left; else the code its ERROR frame carries.
  struct End {
    ErrorCode code = ErrorCode::kInternal;
    Status status;
  };
  // What a HELLO admitted: the store, and the session's epoch and compression.
  struct Admitted {
    std::string group;
    std::shared_ptr<store::RecoveryStore> store;
    uint64_t epoch = 0;
    bool lz4 = false;
    // The sender's disks: a first copy or a history replaced starts from them.
    std::vector<store::StoreDisk> disks;
  };

  void AcceptLoop();
  void AcceptOne();
  void Serve(Conn* c);  // a connection thread's entry point: never throws
  End ServeConnection(Conn* c);
  // Reads and checks the HELLO; `peer` is null without TLS.
  Result<Admitted> Admit(Stream& s, const PeerIdentity* peer, ErrorCode* code);
  End ServeSession(Stream& s, const Admitted& a);
  // nullopt: the session goes on.
  std::optional<End> HandleFrame(Stream& s, const Admitted& a, const Frame& f);
  // A session's batching, for its end's log line.
  struct Tally {
    uint64_t records_frames = 0;
    uint64_t appends = 0;
  };
  // Appends `first` and the RECORDS frames that have arrived behind it (kBatchBytesMax,
  // kBatchFramesMax) as one batch, then ACKs the durable seq. A frame of another type
  // that came behind them is left in *next. `batch`: the session's buffer (reused).
  std::optional<End> AppendRecords(Stream& s, FrameReader& reader, const Admitted& a, Frame first,
                                   std::vector<uint8_t>& batch, std::optional<Frame>* next,
                                   Tally* tally);

  StoreLookup lookup_;
  std::shared_ptr<TlsContext> tls_;
  const bool plaintext_beyond_loopback_;
  std::unique_ptr<Listener> listener_;
  std::thread acceptor_;
  std::atomic<bool> stopping_{false};
  std::mutex mu_;
  std::list<std::unique_ptr<Conn>> conns_;                // guarded by mu_
  std::map<std::string, std::unique_ptr<Group>> groups_;  // guarded by mu_
  std::atomic<uint64_t> records_frames_{0};
  std::atomic<uint64_t> appends_{0};
  std::atomic<uint64_t> acks_{0};
};

}  // namespace osr::replication
