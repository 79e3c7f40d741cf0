#include "replication/sender.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <exception>

#include "capture/log_tailer.h"
#include "common/crc32c.h"
#include "common/threads.h"
#include "replication/pacer.h"
#include "replication/wire.h"

namespace osr::replication {

namespace {

// How often acknowledged log segments are trimmed while records flow (at once when the log
// nears its limit).
constexpr auto kTrimInterval = std::chrono::milliseconds(100);

int64_t SteadyNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Frames small enough that pacing is smooth at a low rate: about 100 ms of the rate, at
// least 64 KiB, at most the configured frame size.
size_t FrameBytesAt(uint64_t rate_bytes_per_s, size_t frame_bytes_max) {
  if (rate_bytes_per_s == 0) return frame_bytes_max;
  return static_cast<size_t>(
      std::clamp<uint64_t>(rate_bytes_per_s / 10, 64 << 10, std::max<size_t>(frame_bytes_max, 1)));
}

}  // namespace

bool WaitsForSomeone(ErrorCode code) {
  switch (code) {
    case ErrorCode::kBadFrame:
    case ErrorCode::kUnsupportedVersion:
    case ErrorCode::kBadDisks:
    case ErrorCode::kEpochAhead:
    case ErrorCode::kNotAuthorized:
      return true;
    default:  // passes by itself (a cut, a store that is not there yet, a full disk freed)
      return false;
  }
}

int ReconnectDelayMs(int delay_ms, bool progressed, bool refused, const SenderOptions& o) {
  if (progressed) return o.reconnect_delay_ms_min;
  int max = refused ? o.refused_delay_ms_max : o.reconnect_delay_ms_max;
  return std::min(std::max(delay_ms, o.reconnect_delay_ms_min) * 2, std::max(max, 1));
}

Sender::~Sender() {
  Stop();
  log_->RemoveDoorbell(&bell_);  // also when Stop ran before (it removes it too: no-op then)
}

void Sender::Start() {
  log_->AddDoorbell(&bell_);
  thread_ = std::thread([this] {
    NameThisThread("osr-send");
    Run();
  });
}

void Sender::Stop() {
  if (stop_.exchange(true)) return;
  {
    std::lock_guard lock(mu_);
    if (stream_ != nullptr) stream_->Shutdown();
  }
  cv_.notify_all();
  bell_.Ring();
  if (thread_.joinable()) thread_.join();
  log_->RemoveDoorbell(&bell_);
}

Sender::Stats Sender::stats() const {
  std::lock_guard lock(mu_);
  Stats s = stats_;
  s.unacked_bytes = in_flight_bytes_;
  if (!in_flight_.empty()) {
    int64_t now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                      std::chrono::system_clock::now().time_since_epoch())
                      .count();
    s.rpo_seconds =
        std::max<double>(0, static_cast<double>(now - in_flight_.front().first_time_ns) / 1e9);
  }
  return s;
}

bool Sender::WaitAcked(uint64_t seq, int timeout_ms) {
  std::unique_lock lock(mu_);
  return cv_.wait_for(lock, std::chrono::milliseconds(timeout_ms),
                      [&] { return stats_.acked_seq >= seq; });
}

void Sender::Run() {
  int delay = 0;         // none yet
  std::string logged;    // the last failure logged, and when: a repeat is logged once per
  int logged_delay = 0;  // backoff step or once a minute
  auto logged_at = std::chrono::steady_clock::now();
  while (!stop_) {
    // The connection thread's entry point: whatever escapes a session is reported and
    // the sender reconnects; the daemon goes on.
    uint64_t progress_before;
    {
      std::lock_guard lock(mu_);
      progress_before = progress_;
    }
    Status st;
    try {
      st = Session();
    } catch (const std::exception& e) {
      st = Internal(fmt::format("replication session failed: {}", e.what()));
    } catch (...) {
      st = Internal("replication session failed: unknown exception");
    }
    if (stop_) break;
    bool progressed;
    std::optional<ErrorCode> code;
    std::string message;
    {
      std::lock_guard lock(mu_);
      // A session that connected but had everything refused (a full file system at the
      // recovery site) counts as a failure: the backoff grows.
      progressed = progress_ != progress_before;
      code = session_code_;
      stats_.connected = false;
      stats_.last_error = session_refusal_ ? session_refusal_->ToString() : st.ToString();
      session_refusal_.reset();
      stats_.last_error_code = code ? std::string(ErrorCodeName(*code)) : std::string();
      session_code_.reset();
      message = stats_.last_error;
    }
    if (code == ErrorCode::kStaleEpoch) {
      // The item failed over elsewhere: no reconnect can succeed at this epoch. Stopped
      // until the vault restarts replication at a new epoch (a new Sender).
      std::unique_lock lock(mu_);
      stats_.stopped = true;
      stats_.last_error = fmt::format(
          "{}; stopped: the recovery site refuses epoch {} as stale (the item failed over); "
          "replication starts again only when the vault restarts it at a new epoch",
          message, opts_.epoch);
      spdlog::warn("replication sender '{}': {}", opts_.group, stats_.last_error);
      cv_.wait(lock, [&] { return stop_.load(); });
      break;
    }
    // Back off while the other side keeps failing (longer while it refuses what only the
    // vault or an operator can change); start over after a session that made progress.
    delay = delay == 0 ? opts_.reconnect_delay_ms_min
                       : ReconnectDelayMs(delay, progressed, code && WaitsForSomeone(*code), opts_);
    {
      std::lock_guard lock(mu_);
      ++stats_.reconnects;
      stats_.reconnect_delay_ms = static_cast<uint64_t>(delay);
    }
    auto now = std::chrono::steady_clock::now();
    if (message != logged || delay != logged_delay || now - logged_at >= std::chrono::minutes(1)) {
      spdlog::info("replication sender '{}': {}; reconnecting in {} ms", opts_.group, message,
                   delay);
      logged = message;
      logged_delay = delay;
      logged_at = now;
    }
    std::unique_lock lock(mu_);
    cv_.wait_for(lock, std::chrono::milliseconds(delay), [&] { return stop_.load(); });
  }
}

Status Sender::WaitToSend(Pacer& pacer, uint64_t bytes) {
  for (;;) {
    int64_t now = SteadyNs();
    int64_t wait_ns = pacer.Delay(bytes, now);
    std::unique_lock lock(mu_);
    if (session_broken_) return Unavailable(stats_.last_error);
    if (stop_) return Unavailable("the sender is stopping");
    if (wait_ns == 0) return Status::Ok();
    cv_.wait_for(lock, std::chrono::nanoseconds(wait_ns),
                 [&] { return stop_.load() || session_broken_; });
  }
}

void Sender::AckLoop(Stream* s) {
  Status st;
  try {
    st = ReadAcks(s);
  } catch (const std::exception& e) {
    st = Internal(fmt::format("reading acknowledgements failed: {}", e.what()));
  } catch (...) {
    st = Internal("reading acknowledgements failed: unknown exception");
  }
  std::lock_guard lock(mu_);
  session_broken_ = true;
  stats_.last_error = st.ToString();
  cv_.notify_all();
  bell_.Ring();
}

Status Sender::ReadAcks(Stream* s) {
  // Only reads: the connection thread is the only writer (frames must not interleave).
  for (;;) {
    OSR_ASSIGN_OR_RETURN(Frame f, ReadFrame(*s));
    switch (f.type) {
      case FrameType::kAck: {
        OSR_ASSIGN_OR_RETURN(uint64_t durable, DecodeU64(f.payload));
        std::lock_guard lock(mu_);
        if (durable > stats_.acked_seq) ++progress_;
        stats_.acked_seq = std::max(stats_.acked_seq, durable);
        while (!in_flight_.empty() && in_flight_.front().last_seq <= durable) {
          in_flight_bytes_ -= in_flight_.front().bytes;
          in_flight_.pop_front();
        }
        cv_.notify_all();
        bell_.Ring();  // an idle connection thread trims what is durable there now
        break;
      }
      case FrameType::kResyncDone: {
        auto done = ParseResyncEnd(f.payload, "RESYNC_DONE");
        std::optional<uint64_t> committed_from;
        {
          std::lock_guard lock(mu_);
          if (!done.ok()) {
            session_code_ = ErrorCode::kBadFrame;
            return done.status();
          }
          if (pending_resync_ && done->consistent_seq == pending_resync_->consistent_seq) {
            committed_from = pending_resync_->from;
          }
        }
        // The plan goes first: no new copy begins (and writes one) while pending_resync_ is set.
        if (committed_from) ClearPlan(*committed_from);
        std::lock_guard lock(mu_);
        if (committed_from && pending_resync_ &&
            done->consistent_seq == pending_resync_->consistent_seq) {
          // The recovery site has the regions: unmark them, unless the log overflowed
          // again meanwhile (then they may hold changes the copy missed).
          if (log_->overflow_generation() == pending_resync_->generation) {
            opts_.capture_group->CleanRegions(pending_resync_->regions);
          }
          pending_resync_.reset();
          stats_.resyncing = false;
          ++stats_.resyncs_completed;
          ++progress_;
          spdlog::info("replication sender '{}': resynchronization committed", opts_.group);
        }
        bell_.Ring();  // the next resync (regions marked since) may begin
        break;
      }
      case FrameType::kError:
        return Refused(ParseError(f.payload));
      default: {
        std::lock_guard lock(mu_);
        session_code_ = ErrorCode::kBadFrame;
        return Corruption(
            fmt::format("unexpected frame type {} from the receiver", static_cast<int>(f.type)));
      }
    }
  }
}

Status Sender::Refused(const PeerError& e) {
  if (e.code == ErrorCode::kStaleEpoch && opts_.on_stale_epoch) opts_.on_stale_epoch();
  {
    std::lock_guard lock(mu_);
    session_code_ = e.code;
  }
  // Stale and unauthorized need the vault or an operator; the rest may pass by itself.
  Code code = e.code == ErrorCode::kStaleEpoch || e.code == ErrorCode::kNotAuthorized
                  ? Code::kPermissionDenied
                  : Code::kUnavailable;
  Status st(code, fmt::format("receiver refused ({}): {}", ErrorCodeName(e.code), e.message));
  std::lock_guard lock(mu_);
  session_refusal_ = st;
  return st;
}

Status Sender::Refuse(Stream& s, ErrorCode code, Status st) {
  // Best effort: the connection ends either way.
  (void)WriteFrame(s, FrameType::kError, EncodeError({code, st.message()}));
  std::lock_guard lock(mu_);
  session_code_ = code;
  return st;
}

Result<std::unique_ptr<Stream>> Sender::Dial(TlsStream** tls) {
  if (!opts_.tls && !opts_.plaintext_beyond_loopback && !IsLoopback(opts_.target)) {
    return Status(Code::kPermissionDenied,
                  fmt::format("replication to '{}' would be plain TCP beyond this host: give "
                              "the site tls_ca, tls_cert and tls_key, or set "
                              "replication_insecure = true",
                              opts_.target.host));
  }
  OSR_ASSIGN_OR_RETURN(Fd fd, osr::Connect(opts_.target));
  if (!opts_.tls) return std::unique_ptr<Stream>(std::make_unique<SocketStream>(std::move(fd)));
  OSR_ASSIGN_OR_RETURN(auto t, opts_.tls->NewStream(std::move(fd)));
  *tls = t.get();
  return std::unique_ptr<Stream>(std::move(t));
}

Status Sender::Authenticate(Stream& s, TlsStream& tls) {
  OSR_RETURN_IF_ERROR(tls.Handshake(10000));
  if (opts_.target_site.empty()) return Status::Ok();
  OSR_ASSIGN_OR_RETURN(PeerIdentity peer, tls.Peer());
  if (!peer.Names(opts_.target_site)) {
    return Refuse(s, ErrorCode::kNotAuthorized,
                  Status(Code::kPermissionDenied,
                         fmt::format("the receiver's certificate ({}) does not name site '{}', "
                                     "the target of group '{}'",
                                     peer.Describe(), opts_.target_site, opts_.group)));
  }
  return Status::Ok();
}

void Sender::SetDisks(std::vector<store::StoreDisk> disks) {
  std::lock_guard lock(disks_mu_);
  disks_ = std::move(disks);
}

std::vector<store::StoreDisk> Sender::Disks() const {
  std::lock_guard lock(disks_mu_);
  return disks_.empty() ? opts_.disks : disks_;
}

Result<HelloOk> Sender::Greet(Stream& s) {
  Hello hello;
  hello.version = kProtocolVersion;
  hello.group = opts_.group;
  hello.epoch = opts_.epoch;
  hello.lz4 = opts_.compress;
  for (auto& d : Disks()) hello.disks.push_back({d.name, d.size_bytes});
  OSR_RETURN_IF_ERROR(WriteFrame(s, FrameType::kHello, EncodeHello(hello)));
  s.SetReadTimeoutMs(30000);
  OSR_ASSIGN_OR_RETURN(Frame f, ReadFrame(s));
  if (f.type == FrameType::kError) return Refused(ParseError(f.payload));
  if (f.type != FrameType::kHelloOk) {
    return Refuse(
        s, ErrorCode::kBadFrame,
        Corruption(fmt::format("expected HELLO_OK, got frame type {}", static_cast<int>(f.type))));
  }
  auto ok = ParseHelloOk(f.payload);
  if (!ok.ok()) return Refuse(s, ErrorCode::kBadFrame, ok.status());
  return *ok;
}

Status Sender::Session() {
  TlsStream* tls = nullptr;
  OSR_ASSIGN_OR_RETURN(std::unique_ptr<Stream> owned, Dial(&tls));
  Stream& s = *owned;
  {
    std::lock_guard lock(mu_);
    stream_ = &s;
    session_broken_ = false;
    // A copy that awaited its RESYNC_DONE is decided anew from the HELLO_OK (PlanResume).
    pending_resync_.reset();
    in_flight_.clear();
    in_flight_bytes_ = 0;
  }
  struct Detach {
    Sender* self;
    ~Detach() {
      std::lock_guard lock(self->mu_);
      self->stream_ = nullptr;
    }
  } detach{this};
  if (stop_) return Status::Ok();
  if (tls != nullptr) OSR_RETURN_IF_ERROR(Authenticate(s, *tls));
  OSR_ASSIGN_OR_RETURN(HelloOk hello_ok, Greet(s));
  uint64_t durable = hello_ok.durable_seq;
  store_differential_ = hello_ok.differential;
  // LZ4 when both ends agree, tried only while it pays (wire.h).
  RecordsCompression compression(opts_.compress && hello_ok.lz4);
  s.SetReadTimeoutMs(0);
  // A store made to receive a first copy (or one whose first copy was cut short) gets the
  // disks' allocated regions, not the whole history of writes. Only when it says so: a
  // store that holds a consistent copy, even at seq 0, is never copied over.
  bool initial = opts_.capture_group != nullptr && hello_ok.initial_sync;
  std::optional<std::pair<uint64_t, uint64_t>> initial_from;
  if (auto cut = log_->pending_cut()) {
    // This log lost its tail after cut->after_seq; the recovery site may hold some of it.
    // Go on after whatever it holds (never a seq twice); the regions go whole.
    spdlog::warn(
        "replication sender '{}': the capture log was cut after seq {}; the recovery site "
        "holds up to {}: going on after seq {} and resending the disks whole",
        opts_.group, cut->after_seq, durable, std::max(cut->after_seq, durable));
    OSR_RETURN_IF_ERROR(log_->ResumeAfterCut(initial ? 0 : durable));
  }
  // A copy cut short goes on where the recovery site's staged copy ends, when it is
  // provably the same one; else it starts over.
  std::optional<uint64_t> resume;
  if (opts_.capture_group != nullptr) resume = PlanResume(hello_ok, initial);
  if (initial && resume) {
    // The store holds the records after the copy's start up to `durable` already.
    std::lock_guard lock(plan_mu_);
    initial_from = {plan_->from, plan_->generation};
  } else if (initial) {
    initial_from = log_->ResumeAfterOverflow();
    durable = initial_from->first;  // the copy stands for every record up to here
  } else if (durable > log_->last_seq()) {
    return Corruption(fmt::format(
        "the recovery site has seq {} but this site's log ends at {}: refusing to go on", durable,
        log_->last_seq()));
  }
  OSR_ASSIGN_OR_RETURN(uint64_t first_held, log_->first_seq_held());
  std::optional<uint64_t> replace_from;
  if (!initial && durable + 1 < first_held && opts_.capture_group != nullptr) {
    // The recovery site lacks seqs this log no longer holds: they were acknowledged (so
    // trimmed here) and lost there since (its journal damaged), or it was put back from an
    // older copy. Its history after `durable` is replaced: every region goes whole.
    spdlog::warn(
        "replication sender '{}': the recovery site holds up to seq {} but this log starts at "
        "{}: replacing its history with a resynchronization of every region",
        opts_.group, durable, first_held);
    OSR_RETURN_IF_ERROR(opts_.capture_group->MarkRegions(opts_.capture_group->WholeDisks()));
    replace_from = first_held - 1;
    durable = *replace_from;
  } else if (!initial && durable + 1 < first_held) {
    std::lock_guard lock(mu_);
    stats_.resync_required = true;
    return NotFound(fmt::format("the recovery site needs seq {}, the log starts at {}", durable + 1,
                                first_held));
  }
  if (!initial && !replace_from && !resume && hello_ok.resyncing &&
      opts_.capture_group != nullptr && !log_->overflowed() &&
      !opts_.capture_group->HasStickyRegions()) {
    // The recovery site waits for a resync that this site has no mark of (its dirty-region
    // marks were lost): only every region, resent, ends it with the right bytes.
    spdlog::warn(
        "replication sender '{}': the recovery site waits for a resynchronization this site "
        "has no marks for: resending every region",
        opts_.group);
    OSR_RETURN_IF_ERROR(opts_.capture_group->MarkRegions(opts_.capture_group->WholeDisks()));
  }
  {
    std::lock_guard lock(mu_);
    stats_.connected = true;
    stats_.acked_seq = durable;
    if (initial_from) stats_.resyncing = true;  // nothing is consistent there until DONE
    stats_.sent_seq = durable;
    stats_.resync_required = false;
    cv_.notify_all();
  }
  spdlog::info("replication sender '{}': connected, resuming after seq {}", opts_.group, durable);

  std::thread acks([&] {
    NameThisThread("osr-send-acks");
    AckLoop(&s);
  });
  struct JoinAcks {
    Stream& s;
    std::thread& t;
    ~JoinAcks() {
      s.Shutdown();
      t.join();
    }
  } join_acks{s, acks};

  // The recovery site holds every record up to `durable`: the segments that hold only
  // those go now. A session that ended before its acknowledgements were acted on (or whose
  // last ones the connection lost) left them, and no later acknowledgement would trim them.
  if (auto t = log_->TrimUpTo(durable); !t.ok()) {
    spdlog::warn("replication sender '{}': trim: {}", opts_.group, t.status().ToString());
  }
  capture::LogTailer tailer(log_, durable + 1);
  std::vector<uint8_t> frame;
  uint64_t trimmed_upto = durable;
  auto last_trim = std::chrono::steady_clock::now();
  // The policy's bandwidth limit, for every byte after the handshake (records and
  // copies), in pieces of at most the burst however large a frame is. One bucket for the
  // sender's life: a new session starts with what the last one left, not a full burst.
  const size_t frame_bytes = FrameBytesAt(opts_.bandwidth_bytes_per_second, opts_.frame_bytes_max);
  if (!pacer_) {
    pacer_.emplace(
        opts_.bandwidth_bytes_per_second,
        Pacer::BurstFor(opts_.bandwidth_bytes_per_second, frame_bytes + 12 + kFrameHeaderBytes),
        SteadyNs());
  }
  PacedStream paced(
      s, *pacer_, [this](uint64_t bytes) { return WaitToSend(*pacer_, bytes); }, SteadyNs,
      [this](uint64_t bytes) {
        std::lock_guard lock(mu_);
        stats_.wire_bytes_sent += bytes;  // as it goes: a large frame shows its progress
      });
  // Sends one frame of records if any are written; returns how many records it sent.
  auto ship_once = [&]() -> Result<size_t> {
    {
      std::unique_lock lock(mu_);
      cv_.wait(lock, [&] {
        return stop_ || session_broken_ || in_flight_bytes_ < opts_.window_bytes_max;
      });
      if (session_broken_) return Unavailable(stats_.last_error);
      if (stop_) return size_t{0};
      auto now = std::chrono::steady_clock::now();
      // Trim every kTrimInterval, or at once when the log nears its limit.
      bool pressed = log_->held_bytes() > log_->log_bytes_max() / 2;
      if (stats_.acked_seq > trimmed_upto && (pressed || now - last_trim >= kTrimInterval)) {
        // Segments whose records are all durable at the recovery site go.
        trimmed_upto = stats_.acked_seq;
        last_trim = now;
        lock.unlock();
        auto t = log_->TrimUpTo(trimmed_upto);
        if (!t.ok()) spdlog::warn("replication sender: trim: {}", t.status().ToString());
      }
    }
    frame.clear();
    OSR_ASSIGN_OR_RETURN(size_t n, tailer.Read(frame_bytes, &frame));
    if (n == 0) return size_t{0};
    // Paced on the wire (what goes after compression; wire_bytes_sent counts it).
    OSR_RETURN_IF_ERROR(WriteRecordsFrame(paced, frame, compression).status());
    std::lock_guard lock(mu_);
    uint64_t last = tailer.next_seq() - 1;
    int64_t first_time;
    std::memcpy(&first_time, frame.data() + 40, 8);  // the first record's time_ns
    in_flight_.push_back({last, frame.size(), first_time});
    in_flight_bytes_ += frame.size();
    stats_.sent_seq = last;
    stats_.bytes_sent += frame.size();
    return n;
  };
  // Nothing to send: sleeps until the doorbell rings (records written out, an overflow,
  // regions marked, an ACK, the session's end, Stop), or until a trim of what was
  // acknowledged is due, at most idle_wait_ms_max. A ring since the last sleep returns at
  // once, so one that came while we looked is not lost.
  auto idle = [&] {
    auto wait = std::chrono::nanoseconds(std::chrono::milliseconds(opts_.idle_wait_ms_max));
    {
      std::lock_guard lock(mu_);
      if (stop_ || session_broken_) return;
      if (stats_.acked_seq > trimmed_upto) {
        auto due = last_trim + kTrimInterval - std::chrono::steady_clock::now();
        wait = std::clamp<std::chrono::nanoseconds>(due, std::chrono::nanoseconds(0), wait);
      }
    }
    bell_.Wait(wait);
  };
  // Sends every record up to `seq` (bounded by the session: a broken one returns).
  auto ship_upto = [&](uint64_t seq) -> Status {
    while (!stop_ && tailer.next_seq() <= seq) {
      (void)log_->WriteOut(seq);
      OSR_ASSIGN_OR_RETURN(size_t n, ship_once());
      if (n == 0) idle();
    }
    return Status::Ok();
  };
  if (initial_from) {
    OSR_RETURN_IF_ERROR(
        Resync(paced, ship_upto, initial_from, frame_bytes, std::exchange(resume, std::nullopt)));
  }
  if (replace_from) {
    OSR_RETURN_IF_ERROR(
        Resync(paced, ship_upto, std::nullopt, frame_bytes, std::nullopt, replace_from));
  }
  while (!stop_) {
    // Caught up with a log that overflowed, or with regions a crash left marked: copy
    // those regions (one resync at a time; the bitmap keeps them until it is committed).
    bool resync_pending;
    {
      std::lock_guard lock(mu_);
      resync_pending = pending_resync_.has_value();
    }
    if (opts_.capture_group != nullptr && !resync_pending && tailer.next_seq() > log_->last_seq() &&
        (log_->overflowed() || opts_.capture_group->HasStickyRegions())) {
      OSR_RETURN_IF_ERROR(
          Resync(paced, ship_upto, std::nullopt, frame_bytes, std::exchange(resume, std::nullopt)));
      continue;
    }
    OSR_ASSIGN_OR_RETURN(size_t n, ship_once());
    if (n == 0) idle();
  }
  return Status::Ok();
}

Status Sender::Resync(Stream& s, const std::function<Status(uint64_t)>& ship_upto,
                      std::optional<std::pair<uint64_t, uint64_t>> initial, size_t frame_bytes,
                      std::optional<uint64_t> resume, std::optional<uint64_t> replace_from) {
  bool is_initial = initial.has_value();
  uint64_t cursor = 0;
  OSR_ASSIGN_OR_RETURN(ResyncPlan plan,
                       ChoosePlan(ship_upto, initial, resume, replace_from, &cursor));
  const uint64_t from = plan.from, generation = plan.generation, total = plan.total_bytes;
  last_resume_.reset();
  if (cursor > 0) last_resume_ = {from, cursor};
  if (cursor > 0) {
    spdlog::info(
        "replication sender '{}': going on with the {} after seq {} at byte {} of {} ({} "
        "region(s)): the recovery site has the bytes before staged",
        opts_.group, is_initial ? "initial copy" : "resynchronization", from, cursor, total,
        plan.regions.size());
  } else {
    spdlog::info("replication sender '{}': {} {} bytes in {} region(s) after seq {}", opts_.group,
                 is_initial ? "initial copy of" : "resynchronizing", total, plan.regions.size(),
                 from);
  }
  {
    std::lock_guard lock(mu_);
    stats_.resyncing = true;
    stats_.resync_bytes_total = total;
    stats_.resync_bytes_done = cursor;
    stats_.resync_bytes_resumed = cursor;
    if (cursor > 0) ++stats_.resyncs_resumed;
  }
  OSR_RETURN_IF_ERROR(WriteFrame(
      s, FrameType::kResyncBegin,
      EncodeResyncBegin({from, is_initial, cursor == 0 && replace_from.has_value(), cursor})));
  OSR_RETURN_IF_ERROR(SendRegions(s, ship_upto, plan, cursor, frame_bytes));
  if (stop_) return Status::Ok();
  // Every region now holds at least what it had when it was read; the records up to
  // `consistent` bring each one to the same moment.
  uint64_t consistent = log_->last_seq();
  if (consistent == from && !is_initial && !replace_from && !store_differential_) {
    // No write came during the copy (into a store that may have points: not a first copy,
    // a replaced history or a reprotect's differential store, where nothing was readable). The
    // store's state at `from` changes with the commit, and a point made at `from` must never show
    // other bytes: the copy ends at a new seq, a mark (a zero record of no length, changing
    // nothing).
    // The mark needs room in the log: what the recovery site holds goes first.
    OSR_RETURN_IF_ERROR(TrimAcknowledged(from));
    if (stop_) return Status::Ok();
    static const uint8_t kNone = 0;
    auto mark = log_->Append(capture::RecordKind::kZero, 0, 0, std::span<const uint8_t>(&kNone, 0),
                             Crc32c(std::span<const uint8_t>(&kNone, 0)));
    if (!mark) return Unavailable("the capture log takes no record: the resync cannot end yet");
    consistent = *mark;
  }
  OSR_RETURN_IF_ERROR(ship_upto(consistent));
  if (log_->overflow_generation() != generation) {
    // The log passed its limit again while regions were copied: a copied region may hold
    // writes that no record up to `consistent` accounts for. Start over.
    std::lock_guard lock(plan_mu_);
    DropPlanLocked("the capture log passed its limit again during the copy");
    return Unavailable("the capture log overflowed again during the resynchronization");
  }
  {
    std::lock_guard lock(mu_);
    pending_resync_ = PendingResync{std::move(plan.regions), generation, consistent, from};
  }
  return WriteFrame(s, FrameType::kResyncEnd, EncodeResyncEnd({consistent}));
}

Result<ResyncPlan> Sender::ChoosePlan(const std::function<Status(uint64_t)>& ship_upto,
                                      std::optional<std::pair<uint64_t, uint64_t>> initial,
                                      std::optional<uint64_t> resume,
                                      std::optional<uint64_t> replace_from, uint64_t* cursor) {
  bool is_initial = initial.has_value();
  *cursor = 0;
  if (resume) {
    std::lock_guard lock(plan_mu_);
    // PlanResume checked the log at the session's start; records shipped since.
    if (plan_ && plan_->initial == is_initial && !log_->overflowed() &&
        log_->overflow_generation() == plan_->generation) {
      *cursor = *resume;
      return *plan_;
    }
    DropPlanLocked("the capture log passed its limit before the copy could go on");
  }
  // A new copy (an initial one whose resume fell through starts after the log's end too).
  auto [from, generation] = is_initial && !resume ? *initial : log_->ResumeAfterOverflow();
  if (replace_from) from = *replace_from;  // the records after it follow the BEGIN
  OSR_RETURN_IF_ERROR(ship_upto(from));    // every record before the resync is sent first
  std::vector<capture::CaptureGroup::DiskRange> regions;
  if (is_initial) {
    OSR_ASSIGN_OR_RETURN(regions, opts_.capture_group->AllocatedRegions());
  } else {
    regions = opts_.capture_group->DirtyRegions();
  }
  ResyncPlan plan =
      NewResyncPlan(opts_.group, opts_.epoch, from, is_initial, generation, std::move(regions));
  std::lock_guard lock(plan_mu_);
  plan_ = plan;
  SavePlanLocked(/*with_regions=*/true);
  return plan;
}

Status Sender::SendRegions(Stream& s, const std::function<Status(uint64_t)>& ship_upto,
                           const ResyncPlan& plan, uint64_t cursor, size_t frame_bytes) {
  std::vector<uint8_t> buf;
  // The policy's bandwidth limit holds for copies too (initial, resync, reprotect): `s`
  // is the session's paced stream, the same bucket as the records that flow meanwhile.
  const size_t chunk_bytes = std::min(opts_.resync_chunk_bytes, frame_bytes);
  uint64_t pos = 0;  // the copy's position at the start of region r
  for (const auto& r : plan.regions) {
    const uint64_t end = r.range.offset + r.range.length;
    if (pos + r.range.length <= cursor) {  // staged there already
      pos += r.range.length;
      continue;
    }
    for (uint64_t off = r.range.offset + (cursor > pos ? cursor - pos : 0); off < end;) {
      if (stop_) return Status::Ok();
      size_t n = static_cast<size_t>(std::min<uint64_t>(chunk_bytes, end - off));
      RecordSentBound(pos + (off - r.range.offset) + n);
      buf.resize(12 + n);
      std::memcpy(buf.data(), &r.disk, 4);
      std::memcpy(buf.data() + 4, &off, 8);
      OSR_RETURN_IF_ERROR(opts_.capture_group->ReadDisk(r.disk, off, {buf.data() + 12, n}));
      OSR_RETURN_IF_ERROR(WriteFrame(s, FrameType::kResyncData, buf));
      off += n;
      {
        std::unique_lock lock(mu_);
        stats_.resync_bytes_done += n;
        stats_.bytes_sent += n;
        if (session_broken_) return Unavailable(stats_.last_error);
      }
      // New writes keep flowing while the regions are copied.
      OSR_RETURN_IF_ERROR(ship_upto(log_->written_seq()));
    }
    pos += r.range.length;
  }
  return Status::Ok();
}

void Sender::RecordSentBound(uint64_t after) {
  std::lock_guard lock(plan_mu_);
  if (!plan_ || after <= plan_->sent_bytes_max) return;
  plan_->sent_bytes_max = std::min(plan_->total_bytes, after + kResyncSentAheadBytes);
  SavePlanLocked(/*with_regions=*/false);
}

void Sender::ReadPlanOnceLocked() {
  if (plan_read_) return;
  plan_read_ = true;
  auto loaded = LoadResyncPlan(log_->dir(), Disks());
  if (loaded.ok() && (loaded->group != opts_.group || loaded->epoch != opts_.epoch)) {
    plan_ = std::move(*loaded);
    DropPlanLocked(fmt::format("it is of group '{}' at epoch {}, not '{}' at epoch {}",
                               plan_->group, plan_->epoch, opts_.group, opts_.epoch));
  } else if (loaded.ok()) {
    plan_ = std::move(*loaded);
  } else if (loaded.status().code() != Code::kNotFound) {
    spdlog::warn(
        "replication sender '{}': the plan of a copy cut short cannot be used ({}): the copy "
        "starts over from its first byte",
        opts_.group, loaded.status().ToString());
    if (Status rm = RemoveResyncPlan(log_->dir()); !rm.ok()) {
      spdlog::warn("replication sender '{}': {}", opts_.group, rm.ToString());
    }
  }
}

std::optional<uint64_t> Sender::PlanResume(const HelloOk& ok, bool initial) {
  std::lock_guard lock(plan_mu_);
  ReadPlanOnceLocked();
  if (!plan_) {
    if (ok.staged) {
      spdlog::info(
          "replication sender '{}': the recovery site has {} bytes staged of a copy after seq {} "
          "that this site has no plan of: it starts over",
          opts_.group, ok.staged->bytes, ok.staged->from);
    }
    return std::nullopt;
  }
  ResyncPlan& p = *plan_;
  if (!ok.staged) {
    DropPlanLocked("the recovery site has nothing of it staged");
    return std::nullopt;
  }
  if (Status st = CheckStaged(p, *ok.staged, Disks()); !st.ok()) {
    if (st.code() == Code::kInvalidArgument) {
      // A peer's claim that cannot be true of this copy: never trusted.
      spdlog::warn("replication sender '{}': refusing the recovery site's staged copy: {}",
                   opts_.group, st.message());
    }
    DropPlanLocked(st.message());
    return std::nullopt;
  }
  bool refused_before;
  {
    std::lock_guard stats_lock(mu_);
    refused_before = stats_.last_error_code == ErrorCodeName(ErrorCode::kStoreFailed);
  }
  if (refused_before && last_resume_ == std::pair{ok.staged->from, ok.staged->bytes}) {
    // The last session went on from here and the store refused (a correct store does not:
    // it offered this very cursor): no loop, start over.
    DropPlanLocked(fmt::format("the recovery site refused to go on at byte {}", ok.staged->bytes));
    return std::nullopt;
  }
  if (p.initial != initial) {
    DropPlanLocked(initial ? "the recovery site waits for a new initial copy"
                           : "the recovery site does not wait for an initial copy");
    return std::nullopt;
  }
  if (std::string why = LogBarsResume(p, ok.durable_seq); !why.empty()) {
    DropPlanLocked(why);
    return std::nullopt;
  }
  const uint64_t cursor = ok.staged->bytes;
  if (p.from_disk && !RecopyMarkedLocked(cursor)) return std::nullopt;
  return cursor;
}

bool Sender::RecopyMarkedLocked(uint64_t cursor) {
  ResyncPlan& p = *plan_;
  // Written by another Sender (this site restarted, or replication was restarted): a
  // region copied before may have been written since without a record (a crash lost the
  // log's last writes, the log overflowed). Every such write is marked in the
  // dirty-region bitmap: those parts are copied again, at the end.
  auto again = DirtyBeforeCursor(p, cursor, opts_.capture_group->DirtyRegions());
  uint64_t again_bytes = 0;
  for (auto& r : again) again_bytes += r.range.length;
  if (again_bytes >= cursor) {
    DropPlanLocked(
        fmt::format("{} of the {} bytes copied before are marked in the dirty-region bitmap "
                    "(written since, maybe without a record)",
                    again_bytes, cursor));
    return false;
  }
  p.regions.insert(p.regions.end(), again.begin(), again.end());
  p.total_bytes += again_bytes;
  p.generation = log_->overflow_generation();
  p.from_disk = false;
  SavePlanLocked(/*with_regions=*/true);
  if (again_bytes > 0) {
    spdlog::info(
        "replication sender '{}': {} bytes in {} region(s) copied before were marked in the "
        "dirty-region bitmap since: they are copied again at the end",
        opts_.group, again_bytes, again.size());
  }
  return true;
}

Status Sender::TrimAcknowledged(uint64_t seq) {
  {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return stop_ || session_broken_ || stats_.acked_seq >= seq; });
    if (session_broken_) return Unavailable(stats_.last_error);
    if (stop_) return Status::Ok();
  }
  auto t = log_->TrimUpTo(seq);
  if (!t.ok())
    spdlog::warn("replication sender '{}': trim: {}", opts_.group, t.status().ToString());
  return Status::Ok();
}

std::string Sender::LogBarsResume(const ResyncPlan& plan, uint64_t durable) {
  if (durable < plan.from) {
    return fmt::format("the recovery site's durable seq {} lies before the copy's start {}",
                       durable, plan.from);
  }
  if (durable > log_->last_seq()) {
    return fmt::format("the recovery site has seq {}, beyond this site's log ({})", durable,
                       log_->last_seq());
  }
  auto first_held = log_->first_seq_held();
  if (!first_held.ok()) return "the capture log cannot be read: " + first_held.status().ToString();
  if (durable + 1 < *first_held) {
    return fmt::format("the capture log no longer holds seq {} (it starts at {})", durable + 1,
                       *first_held);
  }
  if (log_->overflowed() || log_->failed()) {
    return "the capture log is over its limit: writes are tracked in the bitmaps only";
  }
  if (!plan.from_disk && log_->overflow_generation() != plan.generation) {
    return "the capture log passed its limit since the copy began";
  }
  return "";
}

void Sender::DropPlanLocked(std::string_view why) {
  if (!plan_) return;
  // A copy still needed starts from its first byte ("initial copy of N bytes ..." follows).
  spdlog::warn("replication sender '{}': the {} after seq {} cannot go on where it stopped: {}",
               opts_.group, plan_->initial ? "initial copy" : "resynchronization", plan_->from,
               why);
  plan_.reset();
  if (Status rm = RemoveResyncPlan(log_->dir()); !rm.ok()) {
    spdlog::warn("replication sender '{}': {}", opts_.group, rm.ToString());
  }
}

void Sender::SavePlanLocked(bool with_regions) {
  Status st = SaveResyncPlan(log_->dir(), &*plan_, with_regions);
  if (st.ok()) return;
  // Resumable across sessions still (in memory), not across a restart of this site: a
  // plan on disk that is not this one must not stay.
  spdlog::warn(
      "replication sender '{}': the plan of the copy after seq {} could not be kept on disk "
      "(a restart of this site starts it over): {}",
      opts_.group, plan_->from, st.ToString());
  if (Status rm = RemoveResyncPlan(log_->dir()); !rm.ok()) {
    spdlog::warn("replication sender '{}': {}", opts_.group, rm.ToString());
  }
}

void Sender::ClearPlan(uint64_t from) {
  std::lock_guard lock(plan_mu_);
  if (!plan_ || plan_->from != from) return;
  plan_.reset();
  if (Status rm = RemoveResyncPlan(log_->dir()); !rm.ok()) {
    // A plan left behind is dropped at the next start: the store has nothing of it staged.
    spdlog::warn("replication sender '{}': {}", opts_.group, rm.ToString());
  }
}

}  // namespace osr::replication
