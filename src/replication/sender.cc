#include "replication/sender.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <cstring>
#include <nlohmann/json.hpp>

#include "capture/log_tailer.h"
#include "replication/wire.h"

namespace osr::replication {

Sender::~Sender() {
  Stop();
}

void Sender::Start() {
  thread_ = std::thread([this] { Run(); });
}

void Sender::Stop() {
  if (stop_.exchange(true)) return;
  {
    std::lock_guard lock(mu_);
    if (stream_ != nullptr) stream_->Shutdown();
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
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
  int delay = opts_.reconnect_delay_ms_min;
  while (!stop_) {
    Status st = Session();
    if (stop_) break;
    bool was_connected;
    {
      std::lock_guard lock(mu_);
      was_connected = stats_.connected;
      stats_.connected = false;
      stats_.last_error = st.ToString();
      ++stats_.reconnects;
    }
    spdlog::info("replication sender '{}': {}; reconnecting in {} ms", opts_.group, st.ToString(),
                 delay);
    std::unique_lock lock(mu_);
    cv_.wait_for(lock, std::chrono::milliseconds(delay), [&] { return stop_.load(); });
    // Back off while the other side keeps failing; start over after a working session.
    delay = was_connected ? opts_.reconnect_delay_ms_min
                          : std::min(delay * 2, opts_.reconnect_delay_ms_max);
  }
}

void Sender::AckLoop(Stream* s) {
  for (;;) {
    auto f = ReadFrame(*s);
    Status st = f.status();
    if (f.ok() && f->type == FrameType::kAck) {
      auto d = DecodeU64(f->payload);
      if (d.ok()) {
        std::lock_guard lock(mu_);
        stats_.acked_seq = std::max(stats_.acked_seq, *d);
        while (!in_flight_.empty() && in_flight_.front().last_seq <= *d) {
          in_flight_bytes_ -= in_flight_.front().bytes;
          in_flight_.pop_front();
        }
        cv_.notify_all();
        continue;
      }
      st = d.status();
    } else if (f.ok() && f->type == FrameType::kResyncDone) {
      auto j = nlohmann::json::parse(f->payload, nullptr, false);
      std::lock_guard lock(mu_);
      if (pending_resync_ && !j.is_discarded() &&
          j.value("consistent_seq", uint64_t{0}) == pending_resync_->consistent_seq) {
        // The recovery site has the regions: unmark them, unless the log overflowed
        // again meanwhile (then they may hold changes the copy missed).
        if (log_->overflow_generation() == pending_resync_->generation) {
          opts_.capture_group->CleanRegions(pending_resync_->regions);
        }
        pending_resync_.reset();
        stats_.resyncing = false;
        ++stats_.resyncs_completed;
        spdlog::info("replication sender '{}': resynchronization committed", opts_.group);
      }
      continue;
    } else if (f.ok() && f->type == FrameType::kError) {
      st = Unavailable("receiver refused: " + std::string(f->payload.begin(), f->payload.end()));
    } else if (f.ok()) {
      st = Corruption("unexpected frame from the receiver");
    }
    std::lock_guard lock(mu_);
    session_broken_ = true;
    stats_.last_error = st.ToString();
    cv_.notify_all();
    return;
  }
}

Status Sender::Session() {
  OSR_ASSIGN_OR_RETURN(Fd fd, Connect(opts_.target));
  std::unique_ptr<Stream> owned;
  TlsStream* tls = nullptr;
  if (opts_.tls) {
    OSR_ASSIGN_OR_RETURN(auto t, opts_.tls->NewStream(std::move(fd)));
    tls = t.get();
    owned = std::move(t);
  } else {
    owned = std::make_unique<SocketStream>(std::move(fd));
  }
  Stream& s = *owned;
  {
    std::lock_guard lock(mu_);
    stream_ = &s;
    session_broken_ = false;
    pending_resync_.reset();  // an unfinished resync starts over in this session
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
  if (tls != nullptr) OSR_RETURN_IF_ERROR(tls->Handshake(10000));

  nlohmann::json disks = nlohmann::json::array();
  for (auto& d : opts_.disks) disks.push_back({{"name", d.name}, {"size_bytes", d.size_bytes}});
  OSR_RETURN_IF_ERROR(WriteFrame(
      s, FrameType::kHello,
      nlohmann::json{
          {"version", kProtocolVersion},
          {"group", opts_.group},
          {"epoch", opts_.epoch},
          {"compress", opts_.compress ? nlohmann::json::array({"lz4"}) : nlohmann::json::array()},
          {"disks", disks}}
          .dump()));
  s.SetReadTimeoutMs(30000);
  OSR_ASSIGN_OR_RETURN(Frame ok, ReadFrame(s));
  if (ok.type == FrameType::kError) {
    std::string why(ok.payload.begin(), ok.payload.end());
    if (why.find("stale epoch") != std::string::npos && opts_.on_stale_epoch) {
      opts_.on_stale_epoch();
    }
    return Unavailable("receiver refused: " + why);
  }
  if (ok.type != FrameType::kHelloOk) return Corruption("expected HELLO_OK");
  auto j = nlohmann::json::parse(ok.payload, nullptr, false);
  if (j.is_discarded() || !j.contains("durable_seq")) return Corruption("malformed HELLO_OK");
  uint64_t durable = j["durable_seq"].get<uint64_t>();
  bool compress = opts_.compress && j.value("compress", std::string()) == "lz4";
  s.SetReadTimeoutMs(0);
  // A store made to receive a first copy (or one whose first copy was cut short) gets the
  // disks' allocated regions, not the whole history of writes. Only when it says so: a
  // store that holds a consistent copy, even at seq 0, is never copied over.
  bool initial = opts_.capture_group != nullptr && j.value("initial_sync", false);
  std::optional<std::pair<uint64_t, uint64_t>> initial_from;
  if (initial) {
    initial_from = log_->ResumeAfterOverflow();
    durable = initial_from->first;  // the copy stands for every record up to here
  } else if (durable > log_->last_seq()) {
    return Corruption(fmt::format(
        "the recovery site has seq {} but this site's log ends at {}: refusing to go on", durable,
        log_->last_seq()));
  }
  OSR_ASSIGN_OR_RETURN(uint64_t first_held, log_->first_seq_held());
  if (!initial && durable + 1 < first_held) {
    std::lock_guard lock(mu_);
    stats_.resync_required = true;
    return NotFound(fmt::format("the recovery site needs seq {}, the log starts at {}", durable + 1,
                                first_held));
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

  std::thread acks([&] { AckLoop(&s); });
  struct JoinAcks {
    Stream& s;
    std::thread& t;
    ~JoinAcks() {
      s.Shutdown();
      t.join();
    }
  } join_acks{s, acks};

  capture::LogTailer tailer(log_, durable + 1);
  std::vector<uint8_t> frame;
  uint64_t trimmed_upto = durable;
  auto last_trim = std::chrono::steady_clock::now();
  auto pace_until = std::chrono::steady_clock::now();
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
      // Trim every 100 ms, or at once when the log nears its limit.
      bool pressed = log_->held_bytes() > log_->log_bytes_max() / 2;
      if (stats_.acked_seq > trimmed_upto &&
          (pressed || now - last_trim >= std::chrono::milliseconds(100))) {
        // Segments whose records are all durable at the recovery site go.
        trimmed_upto = stats_.acked_seq;
        last_trim = now;
        lock.unlock();
        auto t = log_->TrimUpTo(trimmed_upto);
        if (!t.ok()) spdlog::warn("replication sender: trim: {}", t.status().ToString());
      }
    }
    frame.clear();
    OSR_ASSIGN_OR_RETURN(size_t n, tailer.Read(opts_.frame_bytes_max, &frame));
    if (n == 0) return size_t{0};
    OSR_ASSIGN_OR_RETURN(size_t wire, WriteRecordsFrame(s, frame, compress));
    if (opts_.bandwidth_bytes_per_second > 0) {
      // Pace on the wire: each frame's bytes cost their time at the policy's rate.
      pace_until +=
          std::chrono::nanoseconds(wire * 1000000000ull / opts_.bandwidth_bytes_per_second);
      auto now = std::chrono::steady_clock::now();
      if (pace_until < now) pace_until = now;  // no credit saved up while idle
      std::unique_lock lock(mu_);
      cv_.wait_until(lock, pace_until, [&] { return stop_.load() || session_broken_; });
    }
    std::lock_guard lock(mu_);
    stats_.wire_bytes_sent += wire;
    uint64_t last = tailer.next_seq() - 1;
    int64_t first_time;
    std::memcpy(&first_time, frame.data() + 40, 8);  // the first record's time_ns
    in_flight_.push_back({last, frame.size(), first_time});
    in_flight_bytes_ += frame.size();
    stats_.sent_seq = last;
    stats_.bytes_sent += frame.size();
    return n;
  };
  auto idle = [&] {
    std::unique_lock lock(mu_);
    cv_.wait_for(lock, std::chrono::milliseconds(opts_.idle_poll_ms),
                 [&] { return stop_ || session_broken_; });
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
  if (initial_from) OSR_RETURN_IF_ERROR(Resync(s, ship_upto, initial_from));
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
      OSR_RETURN_IF_ERROR(Resync(s, ship_upto, std::nullopt));
      continue;
    }
    OSR_ASSIGN_OR_RETURN(size_t n, ship_once());
    if (n == 0) idle();
  }
  return Status::Ok();
}

Status Sender::Resync(Stream& s, const std::function<Status(uint64_t)>& ship_upto,
                      std::optional<std::pair<uint64_t, uint64_t>> initial) {
  bool is_initial = initial.has_value();
  auto [from, generation] = is_initial ? *initial : log_->ResumeAfterOverflow();
  OSR_RETURN_IF_ERROR(ship_upto(from));  // every record before the resync is sent first
  std::vector<capture::CaptureGroup::DiskRange> regions;
  if (is_initial) {
    OSR_ASSIGN_OR_RETURN(regions, opts_.capture_group->AllocatedRegions());
  } else {
    regions = opts_.capture_group->DirtyRegions();
  }
  uint64_t total = 0;
  for (auto& r : regions) total += r.range.length;
  spdlog::info("replication sender '{}': {} {} bytes in {} region(s) after seq {}", opts_.group,
               is_initial ? "initial copy of" : "resynchronizing", total, regions.size(), from);
  {
    std::lock_guard lock(mu_);
    stats_.resyncing = true;
    stats_.resync_bytes_total = total;
    stats_.resync_bytes_done = 0;
  }
  OSR_RETURN_IF_ERROR(WriteFrame(s, FrameType::kResyncBegin,
                                 nlohmann::json{{"from", from}, {"initial", is_initial}}.dump()));
  std::vector<uint8_t> buf;
  // The policy's bandwidth limit holds for copies too (initial, resync, reprotect).
  auto pace_until = std::chrono::steady_clock::now();
  for (auto& r : regions) {
    for (uint64_t off = r.range.offset; off < r.range.offset + r.range.length;) {
      if (stop_) return Status::Ok();
      size_t n = static_cast<size_t>(
          std::min<uint64_t>(opts_.resync_chunk_bytes, r.range.offset + r.range.length - off));
      buf.resize(12 + n);
      std::memcpy(buf.data(), &r.disk, 4);
      std::memcpy(buf.data() + 4, &off, 8);
      OSR_RETURN_IF_ERROR(opts_.capture_group->ReadDisk(r.disk, off, {buf.data() + 12, n}));
      OSR_RETURN_IF_ERROR(WriteFrame(s, FrameType::kResyncData, buf));
      off += n;
      {
        std::unique_lock lock(mu_);
        stats_.resync_bytes_done += n;
        stats_.wire_bytes_sent += buf.size() + kFrameHeaderBytes;
        if (session_broken_) return Unavailable(stats_.last_error);
        if (opts_.bandwidth_bytes_per_second > 0) {
          pace_until += std::chrono::nanoseconds((buf.size() + kFrameHeaderBytes) * 1000000000ull /
                                                 opts_.bandwidth_bytes_per_second);
          auto now = std::chrono::steady_clock::now();
          if (pace_until < now) pace_until = now;
          cv_.wait_until(lock, pace_until, [&] { return stop_.load() || session_broken_; });
          if (session_broken_) return Unavailable(stats_.last_error);
        }
      }
      // New writes keep flowing while the regions are copied.
      OSR_RETURN_IF_ERROR(ship_upto(log_->written_seq()));
    }
  }
  // Every region now holds at least what it had when it was read; the records up to
  // `consistent` bring each one to the same moment.
  uint64_t consistent = log_->last_seq();
  OSR_RETURN_IF_ERROR(ship_upto(consistent));
  if (log_->overflow_generation() != generation) {
    // The log passed its limit again while regions were copied: a copied region may hold
    // writes that no record up to `consistent` accounts for. Start over.
    return Unavailable("the capture log overflowed again during the resynchronization");
  }
  {
    std::lock_guard lock(mu_);
    pending_resync_ = PendingResync{std::move(regions), generation, consistent};
  }
  return WriteFrame(s, FrameType::kResyncEnd,
                    nlohmann::json{{"consistent_seq", consistent}}.dump());
}

}  // namespace osr::replication
