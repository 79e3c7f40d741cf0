// Sender: the source site's end of a group's replication channel. Ships the capture
// log's records in order to the recovery site's Receiver, keeps at most
// window_bytes_max unacknowledged, trims log segments once their records are durable
// there, and reconnects (with backoff) after any failure, resuming from the receiver's
// durable sequence number: nothing acknowledged is resent, nothing is skipped.
//
// Trust (DESIGN.md invariant 8): with TLS, the receiver's certificate must come from
// the CA and name the target site (when the vault gave its name). A refusal comes back
// as an ERROR frame with a typed code (messages.h): on kStaleEpoch the sender fences its
// disks (on_stale_epoch) and stops — no reconnect can succeed at its epoch; the vault
// starts a new Sender at a new epoch. A refusal only the vault or an operator can end
// (WaitsForSomeone: kEpochAhead, kNotAuthorized, kBadDisks, ...) is retried with a backoff
// up to refused_delay_ms_max; anything else (a cut, an absent site, a full disk) up to
// reconnect_delay_ms_max. A repeated identical failure is logged once per backoff step
// or once a minute. Without TLS it connects only to loopback addresses unless
// plaintext_beyond_loopback.
//
// Resumable copies: a resync or initial copy keeps its plan (resync_plan.h) in memory
// across sessions and in the capture folder across restarts. After a cut or a restart of
// either site it goes on where the recovery site's staged copy ends (HELLO_OK `staged`),
// but only when that is provably the same copy with nothing before the cursor changed
// unrecorded since (PlanResume); else it starts over from its first byte and logs why.
//
// Bandwidth (bandwidth_bytes_per_second): one token bucket (pacer.h) per sender, kept
// across reconnects, for every byte on the wire after the handshake — records, initial
// copy and resync — with a burst of one frame or 100 ms of the rate; writes go in pieces
// of at most the burst (PacedStream), so a record larger than that (one large write)
// leaves at the rate too. Under a limit, frames are about 100 ms of the rate (≥ 64 KiB).
//
// Thread model: Start() runs a connection thread; while connected an ACK-reader thread
// too. Both entry points catch whatever escapes, report it in the stats and go on (the
// connection thread reconnects). mu_ guards the stats and the window. With nothing to
// send the connection thread sleeps on bell_ (no polling: an idle VM costs no CPU), which
// the capture log rings when records are written out or an overflow begins
// (CaptureLog::AddDoorbell), the ACK reader when an ACK or RESYNC_DONE comes or the
// session breaks, and Stop().
//
// Ownership: the site's group owns the sender (unique_ptr). It borrows the capture log and
// the capture group (and on_stale_epoch captures the group): Stop(), also run by the
// destructor, joins both threads, so nothing of the sender runs once it is gone, and the
// site frees a group's sender before its capture group (docs/architecture.md, "Who owns
// what across threads").
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "capture/capture_group.h"
#include "capture/capture_log.h"
#include "common/doorbell.h"
#include "common/socket.h"
#include "common/tls.h"
#include "replication/messages.h"
#include "replication/pacer.h"
#include "replication/resync_plan.h"
#include "store/recovery_store.h"

namespace osr::replication {

struct SenderOptions {
  std::string group;
  ListenAddress target;
  // The recovery site's name: with TLS, its certificate must name it ("": not checked,
  // only the CA is).
  std::string target_site;
  // Plain TCP (no tls) to an address that is not loopback (IsLoopback): refused unless
  // the site's config allows it (replication_insecure).
  bool plaintext_beyond_loopback = false;
  uint64_t epoch = 1;
  std::vector<store::StoreDisk> disks;
  size_t frame_bytes_max = 4 << 20;    // records per RECORDS frame
  size_t window_bytes_max = 32 << 20;  // sent but not acknowledged
  int reconnect_delay_ms_min = 50;
  int reconnect_delay_ms_max = 5000;  // after a failure that passes by itself
  int refused_delay_ms_max = 60000;   // after a refusal that waits for someone
  // An idle sender sleeps until the capture log rings its doorbell (records written out, an
  // overflow, regions marked), an ACK comes or the session ends; this bounds the sleep,
  // should a wake-up ever be missed (it costs one look at the log per bound).
  int idle_wait_ms_max = 1000;
  std::shared_ptr<TlsContext> tls;  // client side; nullptr: plain TCP
  bool compress = true;             // LZ4 when the receiver agrees and it pays
  // The group whose bitmaps and disks a resynchronization reads (borrowed; nullptr: no
  // resync, the sender only reports that one is required).
  capture::CaptureGroup* capture_group = nullptr;
  // Called (on one of the sender's threads) when the recovery site refuses this source's
  // epoch as stale (ERROR code kStaleEpoch): the item failed over elsewhere. The site fences the
  // group's disks at once, even before the vault reaches it (invariant 5).
  std::function<void()> on_stale_epoch;
  size_t resync_chunk_bytes = 1 << 20;
  uint64_t bandwidth_bytes_per_second = 0;  // on the wire; 0: no limit
};

// Whether a refusal with this code needs the vault or an operator to change something
// (not_authorized, bad_disks, unsupported_version, epoch_ahead, bad_frame): then the
// sender backs off to refused_delay_ms_max instead of reconnect_delay_ms_max.
bool WaitsForSomeone(ErrorCode code);
// The wait before the next connection after one that ended: back to the minimum after a
// session that made progress, else doubled up to reconnect_delay_ms_max, or
// refused_delay_ms_max when `refused` (WaitsForSomeone).
int ReconnectDelayMs(int delay_ms, bool progressed, bool refused, const SenderOptions& o);

class Sender {
 public:
  struct Stats {
    bool connected = false;
    uint64_t acked_seq = 0;
    uint64_t sent_seq = 0;
    uint64_t bytes_sent = 0;       // bytes shipped: records and copied regions, before compression
    uint64_t wire_bytes_sent = 0;  // after compression, with frame headers; counted as it goes
    uint64_t reconnects = 0;
    // The receiver refused this sender's epoch as stale (the item failed over): it stopped
    // and does not reconnect (last_error says so).
    bool stopped = false;
    // The wait before the next reconnect: reconnect_delay_ms_min after a session that made
    // progress (an ACK that moved acked_seq, a committed resync), else doubled up to
    // reconnect_delay_ms_max — a receiver that keeps refusing (a full file system) is
    // asked at most every reconnect_delay_ms_max, not in a tight loop.
    uint64_t reconnect_delay_ms = 0;
    bool resync_required = false;  // the receiver needs records the log no longer has
    bool resyncing = false;        // regions are being copied
    uint64_t resync_bytes_total = 0;
    uint64_t resync_bytes_done = 0;
    // Of the copy under way (or the last one): the bytes the recovery site had staged when
    // this site went on with it (not sent again); 0 for a copy begun from its first byte.
    uint64_t resync_bytes_resumed = 0;
    uint64_t resyncs_completed = 0;
    uint64_t resyncs_resumed = 0;  // copies that went on from a staged copy
    uint64_t unacked_bytes = 0;    // shipped, not yet durable there
    double rpo_seconds = 0;        // age of the oldest write shipped but not yet durable there
    std::string last_error;
    // The typed code of the last session's end ("stale_epoch", "epoch_ahead", ...: an
    // ERROR of the receiver, or a refusal of this sender); "" for other failures.
    std::string last_error_code;
  };

  // `log` is borrowed and must outlive the Sender.
  Sender(SenderOptions opts, capture::CaptureLog* log) : opts_(std::move(opts)), log_(log) {}
  ~Sender();
  void Start();
  void Stop();
  Stats stats() const;
  // The group's disks as the next HELLO states them (a disk added or grown: the site sets
  // them before it appends the disk-size record, so a HELLO never states fewer or smaller
  // disks than a record the recovery site may hold).
  void SetDisks(std::vector<store::StoreDisk> disks);
  // Waits until every record up to `seq` is acknowledged, or the timeout passes.
  bool WaitAcked(uint64_t seq, int timeout_ms);

 private:
  void Run();
  // One connection: connect, HELLO, ship until it breaks. Throws nothing that Run does
  // not catch.
  Status Session();
  // Connects: TLS when configured (*tls then points into the stream; handshake not yet
  // done), else plain TCP, to loopback only unless plaintext_beyond_loopback.
  Result<std::unique_ptr<Stream>> Dial(TlsStream** tls);
  // The TLS handshake; then the receiver's certificate must name target_site.
  Status Authenticate(Stream& s, TlsStream& tls);
  // HELLO, and the receiver's HELLO_OK (or its refusal).
  Result<HelloOk> Greet(Stream& s);
  // Acts on a receiver's ERROR (fences on kStaleEpoch) and returns the status to end
  // the session with. Takes mu_.
  Status Refused(const PeerError& e);
  // Ends the session from this side: an ERROR to the receiver, the code in the stats.
  Status Refuse(Stream& s, ErrorCode code, Status st);
  // Copies the regions marked in the group's bitmaps to the recovery site while records
  // keep flowing; `ship` sends the records up to a seq.
  // With `initial` (from, overflow generation): the first copy into an empty store, of
  // the disks' allocated regions.
  // `s`: the session's paced stream (the bandwidth limit); `frame_bytes`: the most data
  // per frame.
  // `resume`: go on with the plan (plan_) from this cursor (PlanResume said so).
  // `replace_from`: the recovery site lacks records this log no longer holds; its history
  // after its durable seq is replaced (RESYNC_BEGIN replace_history) and records after
  // replace_from follow the BEGIN.
  Status Resync(Stream& s, const std::function<Status(uint64_t)>& ship,
                std::optional<std::pair<uint64_t, uint64_t>> initial, size_t frame_bytes,
                std::optional<uint64_t> resume,
                std::optional<uint64_t> replace_from = std::nullopt);
  // Whether the copy of plan_ goes on where the recovery site's staged copy ends (HELLO_OK
  // `staged`): the cursor to go on from, or nullopt to start over (the plan is dropped and
  // the reason logged). `initial`: the store waits for an initial copy. Reads the plan a
  // former Sender left in the capture folder first (once). Connection thread.
  std::optional<uint64_t> PlanResume(const HelloOk& ok, bool initial);
  // The copy to send: plan_ from *cursor = `resume` on when the log still allows it, else a
  // new plan (from `replace_from` when given; its records up to `from` shipped first;
  // *cursor = 0), kept in plan_.
  Result<ResyncPlan> ChoosePlan(const std::function<Status(uint64_t)>& ship,
                                std::optional<std::pair<uint64_t, uint64_t>> initial,
                                std::optional<uint64_t> resume,
                                std::optional<uint64_t> replace_from, uint64_t* cursor);
  // Sends the plan's regions from byte `cursor` of the copy on, records flowing between.
  Status SendRegions(Stream& s, const std::function<Status(uint64_t)>& ship, const ResyncPlan& plan,
                     uint64_t cursor, size_t frame_bytes);
  // Why the capture log cannot bring a copy of `plan` that goes on after the receiver's
  // `durable` seq to a consistent end ("" when it can). Holds plan_mu_.
  std::string LogBarsResume(const ResyncPlan& plan, uint64_t durable);
  // Reads the plan a former Sender left in the capture folder, the first time only (a plan
  // of another group or epoch, or a damaged one, is removed). Holds plan_mu_.
  void ReadPlanOnceLocked();
  // plan_ was read from disk: its parts before `cursor` marked in the dirty-region bitmap
  // since are appended to be copied again; false (plan dropped) when that is all of them.
  // Holds plan_mu_.
  bool RecopyMarkedLocked(uint64_t cursor);
  void DropPlanLocked(std::string_view why);  // forgets plan_ and its files; holds plan_mu_
  // Waits (bounded by the session: a broken one or Stop returns) until the recovery site
  // acknowledged every record up to `seq`, then removes the log segments it holds durably:
  // what an append that needs room (the resync's closing mark) waits for. Connection thread.
  Status TrimAcknowledged(uint64_t seq);
  void SavePlanLocked(bool with_regions);  // writes plan_ (failure: removes it); holds plan_mu_
  void ClearPlan(uint64_t from);           // the copy after `from` committed; takes plan_mu_
  // Records (durably) that the copy may send up to byte `after`, before it does.
  void RecordSentBound(uint64_t after);
  // Waits until the pacer lets `bytes` go. kUnavailable when the session broke or the
  // sender stops.
  Status WaitToSend(Pacer& pacer, uint64_t bytes);

  struct PendingResync {
    std::vector<capture::CaptureGroup::DiskRange> regions;
    uint64_t generation = 0;
    uint64_t consistent_seq = 0;
    uint64_t from = 0;
  };
  void AckLoop(Stream* s);  // the ACK reader's entry point: never throws
  Status ReadAcks(Stream* s);

  const SenderOptions opts_;
  capture::CaptureLog* log_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  // Wakes the idle connection thread (see the thread model). Registered with the log from
  // Start() until Stop() has joined the thread.
  Doorbell bell_;
  // The bandwidth limit's bucket: the connection thread's only, made at its first session
  // and kept across reconnects.
  std::optional<Pacer> pacer_;

  std::vector<store::StoreDisk> Disks() const;
  mutable std::mutex disks_mu_;          // a leaf
  std::vector<store::StoreDisk> disks_;  // guarded by disks_mu_; from opts_.disks, SetDisks
  mutable std::mutex mu_;
  std::condition_variable cv_;
  Stats stats_;  // guarded by mu_
  struct InFlight {
    uint64_t last_seq;
    size_t bytes;
    int64_t first_time_ns;  // when its first write was accepted
  };
  std::deque<InFlight> in_flight_;               // guarded by mu_
  size_t in_flight_bytes_ = 0;                   // guarded by mu_
  bool session_broken_ = false;                  // guarded by mu_
  Stream* stream_ = nullptr;                     // guarded by mu_
  std::optional<PendingResync> pending_resync_;  // guarded by mu_
  bool store_differential_ = false;        // the session's HELLO_OK said so; connection thread
  std::optional<ErrorCode> session_code_;  // guarded by mu_: how the session ended
  uint64_t progress_ = 0;  // guarded by mu_: ACKs that moved acked_seq, resyncs committed
  // guarded by mu_: the receiver's refusal that ended the session (its ERROR's words),
  // reported rather than what the connection thread then met (a write to a closed socket)
  std::optional<Status> session_refusal_;
  // The copy under way or cut short (resync_plan.h). plan_mu_ is never taken inside mu_.
  std::mutex plan_mu_;
  std::optional<ResyncPlan> plan_;  // guarded by plan_mu_
  bool plan_read_ = false;          // guarded by plan_mu_: the capture folder was read
  // Connection thread only: the (from, cursor) the last copy went on from, if it did.
  std::optional<std::pair<uint64_t, uint64_t>> last_resume_;
};

}  // namespace osr::replication
