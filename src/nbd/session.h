// Session: one NBD client connection, from the fixed-newstyle handshake through the
// transmission phase, over any Stream.
//
// Thread model: Run() executes on the connection's own thread. It reads requests and
// serves READ, WRITE, TRIM, WRITE_ZEROES, BLOCK_STATUS and CACHE inline, in batches:
// it serves every request already received, then sends all the batch's replies in one
// system call. FLUSH and FUA requests go to
// the session's sync thread, which runs Disk::Flush() (one flush covers every request
// queued behind it) and replies; so replies may leave out of order, as NBD allows.
// send_mu_ serialises the two threads' writes to the stream. Stop() and Abort() may be
// called from any thread.
//
// Lifetime: the session shares its export (ExportTable, shared_ptr) from NBD_OPT_GO on and
// lets go of it when Run() returns, on its own thread: a finished session holds no export,
// no disk, nothing of a view or a store, even before the server reaps it (export_table.h,
// "Who owns what across threads" in docs/architecture.md).
//
// Security (access.h): a session starts with the principal of its listener. With TLS
// (NBD_OPT_STARTTLS, doc/proto.md "TLS support") the listener is FORCEDTLS (kRequired:
// before STARTTLS every option but STARTTLS and ABORT gets NBD_REP_ERR_TLS_REQD, and
// NBD_OPT_EXPORT_NAME ends the session) or SELECTIVETLS with no TLS-only export
// (kOptional). After STARTTLS's ACK the stream becomes TLS (TlsUpgrader), the principal
// is the client certificate's name, and what was negotiated before is forgotten (the
// client negotiates again under TLS, as nbdkit and qemu-nbd require).
// The whole handshake, TLS included, must end within handshake_timeout_ms of the
// session's start; the server also ends it from outside then (Abort), so a client that
// stops reading cannot hold it either.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "common/socket.h"
#include "common/status.h"
#include "nbd/access.h"
#include "nbd/disk.h"
#include "nbd/export_table.h"

namespace osr::nbd {

struct SessionLimits {
  uint32_t option_bytes_max = 64 * 1024;          // option data we parse
  uint32_t option_discard_bytes_max = 16 << 20;   // larger options: disconnect
  uint32_t options_max = 256;                     // options per handshake
  uint32_t request_bytes_max = 32 << 20;          // NBD_INFO_BLOCK_SIZE maximum
  uint32_t payload_discard_bytes_max = 64 << 20;  // larger bad WRITEs: disconnect
  size_t batch_reply_bytes_max = 4 << 20;         // replies held before a send
  size_t sync_queue_max = 1024;                   // FLUSH/FUA requests waiting
  size_t extents_max = 4096;                      // per BLOCK_STATUS reply
  int handshake_timeout_ms = 10000;               // the whole handshake, TLS included (as qemu-nbd)
  uint32_t block_size_min = 1;
  uint32_t block_size_preferred = 4096;
};

enum class TlsMode {
  kOff,       // NOTLS: STARTTLS answered NBD_REP_ERR_UNSUP
  kOptional,  // SELECTIVETLS with no TLS-only export: plain clients may go on
  kRequired,  // FORCEDTLS
};

// Turns a session's connection into TLS after NBD_OPT_STARTTLS (the server's side; tests
// and fuzzing bring their own).
class TlsUpgrader {
 public:
  virtual ~TlsUpgrader() = default;
  // Takes over the plain stream and returns the TLS stream over the same connection,
  // before its handshake.
  virtual Result<std::unique_ptr<Stream>> Wrap(std::unique_ptr<Stream> plain) = 0;
  // Runs the TLS server handshake on a stream Wrap returned, within `timeout_ms`; returns
  // the client's identity (its certificate's common name). kPermissionDenied when the
  // client's certificate is refused, kUnavailable when it left or the time ran out.
  virtual Result<std::string> Handshake(Stream* tls, int timeout_ms) = 0;
};

struct SessionSecurity {
  TlsMode tls = TlsMode::kOff;
  TlsUpgrader* upgrader = nullptr;  // borrowed; set when tls != kOff; outlives the session
  const Authz* authz = nullptr;     // borrowed; what certificates may open (nullptr: all)
  Principal principal;              // before TLS: the listener's
};

class Session {
 public:
  // `exports` is borrowed and outlives the session.
  Session(std::unique_ptr<Stream> stream, const ExportTable* exports, SessionLimits limits,
          std::string peer, SessionSecurity security = {});
  ~Session();

  // Serves the connection until the client leaves or Stop(). Returns why it ended:
  // ok for a clean end (NBD_CMD_DISC, ABORT, or a close between requests). The export is
  // released before it returns (its sync thread has ended by then too).
  Status Run();
  // Ends the session from another thread: the stream is shut down, Run() returns.
  void Stop();
  // Cuts the connection both ways at once (a handshake past its deadline: a client that
  // neither sends nor reads must not hold its thread).
  void Abort();
  // Whether the handshake is still under way (false once transmission started or ended).
  bool in_handshake() const { return in_handshake_; }
  // Who the client is (changes once, at STARTTLS; read it from the session's thread or
  // after Run() returned).
  const Principal& principal() const { return security_.principal; }

  const std::string& peer() const { return peer_; }
  // The export the client chose (empty before the handshake ends and after Run()).
  std::string export_name() const;
  // Whether the session holds `e` now (chosen at GO, not yet released by Run()).
  bool Holds(const Export* e) const;

 private:
  enum class HandshakeResult { kTransmission, kEnd };
  struct Deferred {  // a request answered by the sync thread
    uint64_t cookie;
    uint16_t type;
  };

  Status RunInner();
  Result<HandshakeResult> Handshake();
  // Handles one option; returns a result when the handshake ends with it.
  Result<std::optional<HandshakeResult>> HandleOption(uint32_t option,
                                                      std::span<const uint8_t> data);
  Status StartTls(std::span<const uint8_t> data);
  // Reads exactly buf.size() bytes before the handshake deadline.
  Status ReadHandshake(std::span<uint8_t> buf);
  int HandshakeMsLeft() const;
  std::shared_ptr<const Export> FindExport(std::string_view name) const;
  Status SendOptionReply(uint32_t option, uint32_t type, std::span<const uint8_t> data = {});
  Status SendOptionError(uint32_t option, uint32_t type, std::string_view message);
  Status HandleInfoOrGo(uint32_t option, std::span<const uint8_t> data, bool* go);
  Status HandleMetaContext(uint32_t option, std::span<const uint8_t> data);
  Status SendExportNameReply();
  uint16_t TransmissionFlags(const Disk& disk) const;
  void Choose(std::shared_ptr<const Export> e);
  // Lets go of the export (and its disk): the end of Run().
  void ReleaseExport();

  Status Transmission();
  // Makes at least `n` unread bytes available in rbuf_; ok(false) if the client closed
  // cleanly before sending any of them.
  Result<bool> Fill(size_t n);
  Status Serve(const struct Request& req, std::span<const uint8_t> payload);
  void ReplySimple(uint64_t cookie, uint32_t error);
  void ReplyError(const struct Request& req, uint32_t error, std::string_view message);
  void ServeRead(const struct Request& req);
  void ServeBlockStatus(const struct Request& req);
  void Defer(uint64_t cookie, uint16_t type);
  // Sends the batch's replies, hands its deferred requests to the sync thread.
  Status FinishBatch();
  void SyncLoop();
  Status Send(std::span<const struct iovec> iov);

  std::mutex stream_mu_;  // guards replacing stream_ (STARTTLS) against Stop()/Abort()
  std::unique_ptr<Stream> stream_;
  const ExportTable* exports_;
  mutable std::mutex export_mu_;
  // guarded by export_mu_; set once, at GO; reset when Run() ends
  std::shared_ptr<const Export> export_;
  Disk* disk_ = nullptr;  // export_'s disk, borrowed while export_ is held; connection thread only
  SessionLimits limits_;
  std::string peer_;
  SessionSecurity security_;
  std::chrono::steady_clock::time_point handshake_deadline_;
  std::atomic<bool> in_handshake_{true};
  bool tls_active_ = false;

  // Negotiated in the handshake.
  bool no_zeroes_ = false;
  bool structured_ = false;
  bool base_allocation_ = false;  // meta context id kBaseAllocationId selected

  // Reader state (connection thread only).
  std::vector<uint8_t> rbuf_;
  size_t rpos_ = 0;
  size_t rend_ = 0;
  std::vector<uint8_t> payload_;  // WRITE payloads that do not fit rbuf_
  std::vector<uint8_t> out_;      // the batch's replies
  std::vector<Deferred> batch_deferred_;

  std::mutex send_mu_;  // serialises writes to stream_
  Status send_status_;  // guarded by send_mu_; the first send error

  std::mutex sync_mu_;
  std::condition_variable sync_cv_;
  std::deque<Deferred> sync_queue_;  // guarded by sync_mu_
  bool sync_stop_ = false;           // guarded by sync_mu_
  std::thread sync_thread_;
  std::atomic<bool> stopped_{false};
};

}  // namespace osr::nbd
