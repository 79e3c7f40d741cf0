#include "replication/receiver.h"

#include <fmt/format.h>
#include <poll.h>
#include <spdlog/spdlog.h>

#include <exception>

#include "common/threads.h"
#include "common/units.h"

namespace osr::replication {

namespace {

// Invariant 5, with epochs from the vault only: a session's epoch must be the store's.
// Below it the item failed over elsewhere (the sender fences itself); above it the
// vault has not raised the store (yet): the sender waits, and the store keeps its epoch.
Status CheckEpoch(const store::RecoveryStore& st, uint64_t epoch, ErrorCode* code) {
  uint64_t have = st.epoch();
  if (epoch < have) {
    *code = ErrorCode::kStaleEpoch;
    return Status(Code::kPermissionDenied,
                  fmt::format("stale epoch {}: the item is at epoch {} (failed over); this "
                              "source is fenced",
                              epoch, have));
  }
  if (epoch > have) {
    *code = ErrorCode::kEpochAhead;
    return Unavailable(
        fmt::format("epoch {} is ahead of the store's {}: only the vault raises a store's "
                    "epoch (failover, reprotect); retry later",
                    epoch, have));
  }
  return Status::Ok();
}

// A store that refuses what a sender sent: damaged bytes, a full file system (nothing
// was taken: the sender backs off), or anything else it could not take (out of order, no
// resync under way, I/O).
ErrorCode StoreCode(const Status& st) {
  switch (st.code()) {
    case Code::kCorruption:
      return ErrorCode::kCorruptFrame;
    case Code::kNoSpace:
      return ErrorCode::kNoSpace;
    default:
      return ErrorCode::kStoreFailed;
  }
}

// A full file system's refusal says how full it is (for the sender's status and logs).
Status WithSpace(const store::RecoveryStore& store, const Status& st) {
  if (st.code() != Code::kNoSpace) return st;
  auto space = FileSystemSpace(store.dir());
  if (!space.ok()) return st;
  return Status(st.code(),
                fmt::format("{} ({} free of {} on the recovery site's file system)", st.message(),
                            FormatSize(space->free_bytes), FormatSize(space->total_bytes)));
}

}  // namespace

Receiver::~Receiver() {
  Stop();
}

Result<ListenAddress> Receiver::Listen(const ListenAddress& addr) {
  if (tls_ == nullptr && !plaintext_beyond_loopback_ && !IsLoopback(addr)) {
    return Status(Code::kPermissionDenied,
                  fmt::format("replication on '{}' would be plain TCP beyond this host: give "
                              "the site tls_ca, tls_cert and tls_key, or set "
                              "replication_insecure = true",
                              addr.host));
  }
  OSR_ASSIGN_OR_RETURN(Listener l, Listener::Listen(addr));
  listener_ = std::make_unique<Listener>(std::move(l));
  return listener_->address();
}

void Receiver::Start() {
  OSR_CHECK(listener_ != nullptr);
  acceptor_ = std::thread([this] {
    NameThisThread("osr-recv-accept");
    AcceptLoop();
  });
}

void Receiver::Stop() {
  if (stopping_.exchange(true)) return;
  if (acceptor_.joinable()) acceptor_.join();
  std::list<std::unique_ptr<Conn>> conns;
  {
    std::lock_guard lock(mu_);
    conns.swap(conns_);
  }
  for (auto& c : conns) c->stream->Shutdown();
  for (auto& c : conns) c->thread.join();
}

void Receiver::EndGroup(const std::string& group) {
  Group* g;
  {
    std::lock_guard lock(mu_);
    auto it = groups_.find(group);
    if (it == groups_.end()) return;
    g = it->second.get();
    if (g->current != nullptr) g->current->Shutdown();
  }
  std::lock_guard wait(g->serving);  // the session has ended once we hold it
}

void Receiver::AcceptLoop() {
  while (!stopping_) {
    // The acceptor's entry point: nothing that goes wrong with one connection stops it.
    try {
      AcceptOne();
    } catch (const std::exception& e) {
      spdlog::error("replication receiver: accepting a connection: {}", e.what());
    } catch (...) {
      spdlog::error("replication receiver: accepting a connection: unknown exception");
    }
  }
}

void Receiver::AcceptOne() {
  struct pollfd p = {listener_->fd(), POLLIN, 0};
  int rc = ::poll(&p, 1, 200);
  {
    std::lock_guard lock(mu_);
    JoinFinished(conns_);
  }
  if (rc <= 0 || stopping_) return;
  auto fd = listener_->Accept();
  if (!fd.ok()) return;
  auto c = std::make_unique<Conn>();
  if (tls_) {
    auto t = tls_->NewStream(std::move(*fd));
    if (!t.ok()) {
      spdlog::warn("replication receiver: {}", t.status().ToString());
      return;
    }
    c->tls = t->get();
    c->stream = std::move(*t);
  } else {
    c->stream = std::make_unique<SocketStream>(std::move(*fd));
  }
  Conn* cp = c.get();
  std::lock_guard lock(mu_);
  conns_.push_back(std::move(c));
  try {
    cp->thread = std::thread([this, cp] {
      NameThisThread("osr-recv");
      Serve(cp);
    });
  } catch (...) {
    conns_.pop_back();  // no thread: nothing would ever mark it done
    throw;
  }
}

void Receiver::Serve(Conn* c) {
  // A connection thread's entry point: a peer's bytes never end the daemon.
  try {
    End end = ServeConnection(c);
    if (!end.status.ok()) {
      spdlog::info("replication receiver: session ended ({}): {}", ErrorCodeName(end.code),
                   end.status.ToString());
      // Best effort: the connection ends either way, and a sender that misses the ERROR
      // sees the connection close and reconnects.
      (void)WriteFrame(*c->stream, FrameType::kError,
                       EncodeError({end.code, end.status.message()}));
    }
  } catch (const std::exception& e) {
    spdlog::error("replication receiver: a session failed: {}", e.what());
  } catch (...) {
    spdlog::error("replication receiver: a session failed: unknown exception");
  }
  c->stream->Shutdown();
  c->done = true;
}

Receiver::End Receiver::ServeConnection(Conn* c) {
  std::optional<PeerIdentity> peer;
  if (c->tls != nullptr) {
    Status st = c->tls->Handshake(10000);
    if (st.ok()) {
      auto p = c->tls->Peer();
      if (p.ok()) peer = std::move(*p);
      st = p.status();
    }
    if (!st.ok()) {
      // No channel to answer on: the refusal is the closed connection.
      spdlog::warn("replication receiver: {}", st.ToString());
      return {};
    }
  }
  ErrorCode code = ErrorCode::kInternal;
  auto admitted = Admit(*c->stream, peer ? &*peer : nullptr, &code);
  if (!admitted.ok()) return {code, admitted.status()};
  return ServeSession(*c->stream, *admitted);
}

Result<Receiver::Admitted> Receiver::Admit(Stream& s, const PeerIdentity* peer, ErrorCode* code) {
  s.SetReadTimeoutMs(30000);  // the HELLO must come soon
  auto frame = ReadFrame(s);
  if (!frame.ok()) {
    *code = ErrorCodeFor(frame.status());
    return frame.status();
  }
  if (frame->type != FrameType::kHello) {
    *code = ErrorCode::kBadFrame;
    return InvalidArgument(
        fmt::format("expected HELLO, got frame type {}", static_cast<int>(frame->type)));
  }
  auto hello = ParseHello(frame->payload);
  if (!hello.ok()) {
    *code = ErrorCode::kBadFrame;
    return hello.status();
  }
  if (hello->version != kProtocolVersion) {
    *code = ErrorCode::kUnsupportedVersion;
    return NotSupported(fmt::format("HELLO.version {}: this receiver speaks version {}",
                                    hello->version, kProtocolVersion));
  }
  const std::string& group = hello->group;
  std::shared_ptr<store::RecoveryStore> store = lookup_(group);
  if (store == nullptr) {
    *code = ErrorCode::kUnknownGroup;
    return NotFound(fmt::format("no recovery store for group '{}'", group));
  }
  // The CA says the peer is a site; its certificate must say it is the store's source.
  if (peer != nullptr && !store->source().empty() && !peer->Names(store->source())) {
    *code = ErrorCode::kNotAuthorized;
    return Status(Code::kPermissionDenied,
                  fmt::format("the sender's certificate ({}) does not name site '{}', the "
                              "source of group '{}'",
                              peer->Describe(), store->source(), group));
  }
  // The sender's disks are the store's as of its durable seq, or what disk-size records
  // after it make of them (docs/formats.md, "Disk changes"): the same disks in the same
  // order, none smaller, maybe more. Anything else is another group's layout.
  const std::vector<store::StoreDisk> disks = store->DisksAt(store->durable_seq());
  if (hello->disks.size() < disks.size()) {
    *code = ErrorCode::kBadDisks;
    return InvalidArgument(fmt::format("group '{}' has {} disks here, the sender has {}", group,
                                       disks.size(), hello->disks.size()));
  }
  for (size_t i = 0; i < disks.size(); ++i) {
    const HelloDisk& d = hello->disks[i];
    if (d.name != disks[i].name || d.size_bytes < disks[i].size_bytes) {
      *code = ErrorCode::kBadDisks;
      return InvalidArgument(fmt::format(
          "disk {} of group '{}' differs: {} of {} bytes here, {} of {} bytes at the sender", i,
          group, disks[i].name, disks[i].size_bytes, d.name, d.size_bytes));
    }
  }
  OSR_RETURN_IF_ERROR(CheckEpoch(*store, hello->epoch, code));
  std::vector<store::StoreDisk> sender_disks;
  for (const HelloDisk& d : hello->disks) sender_disks.push_back({d.name, d.size_bytes});
  return Admitted{group, std::move(store), hello->epoch, hello->lz4, std::move(sender_disks)};
}

Receiver::End Receiver::ServeSession(Stream& s, const Admitted& a) {
  // One connection per group: end the older one and wait for it.
  Group* g;
  {
    std::lock_guard lock(mu_);
    auto& slot = groups_[a.group];
    if (!slot) slot = std::make_unique<Group>();
    g = slot.get();
    if (g->current != nullptr) g->current->Shutdown();
  }
  std::unique_lock serving(g->serving);
  // Again, now that this session is the group's only one: a failover may have raised the
  // epoch while it waited (and cut the sessions that were there then).
  ErrorCode code = ErrorCode::kInternal;
  if (Status st = CheckEpoch(*a.store, a.epoch, &code); !st.ok()) return {code, st};
  {
    std::lock_guard lock(mu_);
    g->current = &s;
  }
  struct Release {
    Receiver* r;
    Group* g;
    Stream* s;
    ~Release() {
      std::lock_guard lock(r->mu_);
      if (g->current == s) g->current = nullptr;
    }
  } release{this, g, &s};

  HelloOk ok;
  ok.durable_seq = a.store->durable_seq();
  ok.base_seq = a.store->base_seq();
  ok.lz4 = a.lz4;
  ok.initial_sync = a.store->initial_sync_pending();
  ok.differential = a.store->differential();
  ok.resyncing = a.store->resyncing();
  if (auto p = a.store->staged_progress()) {
    ok.staged = HelloStaged{p->from, p->initial, p->bytes, p->end_disk, p->end_offset};
  }
  if (Status st = WriteFrame(s, FrameType::kHelloOk, EncodeHelloOk(ok)); !st.ok()) {
    return {ErrorCode::kInternal, st};
  }
  s.SetReadTimeoutMs(0);
  spdlog::info("replication receiver: group '{}' connected at epoch {}, durable seq {}{}", a.group,
               a.epoch, ok.durable_seq,
               ok.staged ? fmt::format(", {} bytes staged of the resync after seq {}",
                                       ok.staged->bytes, ok.staged->from)
                         : "");
  Tally tally;
  End end = [&]() -> End {
    FrameReader reader(s);
    std::vector<uint8_t> batch;
    std::optional<Frame> next;  // read behind a batch of records, not handled yet
    for (;;) {
      Frame f;
      if (next) {
        f = std::move(*std::exchange(next, std::nullopt));
      } else {
        auto r = reader.Read();
        if (!r.ok()) {
          if (r.status().code() == Code::kUnavailable) return {};  // sender left
          return {ErrorCodeFor(r.status()), r.status()};
        }
        f = std::move(*r);
      }
      auto e = f.type == FrameType::kRecords
                   ? AppendRecords(s, reader, a, std::move(f), batch, &next, &tally)
                   : HandleFrame(s, a, f);
      if (e) return *e;
    }
  }();
  if (tally.records_frames > 0) {
    spdlog::info(
        "replication receiver: group '{}' session ended: {} RECORDS frame(s) taken in {} "
        "store append(s) (one journal sync each)",
        a.group, tally.records_frames, tally.appends);
  }
  // What this session staged is kept for the next one (before it can say HELLO_OK: this
  // session still holds the group).
  if (Status st = a.store->CheckpointResync(); !st.ok()) {
    spdlog::warn(
        "replication receiver: group '{}': keeping the regions staged in this session failed "
        "(the next session sends them again): {}",
        a.group, st.ToString());
  }
  return end;
}

std::optional<Receiver::End> Receiver::AppendRecords(Stream& s, FrameReader& reader,
                                                     const Admitted& a, Frame first,
                                                     std::vector<uint8_t>& batch,
                                                     std::optional<Frame>* next, Tally* tally) {
  store::RecoveryStore& store = *a.store;
  // What has arrived behind `first`, without waiting for more.
  std::vector<Frame> more;
  size_t bytes = first.payload.size();
  // A damaged frame behind good ones: those are taken first (as if read one by one), then
  // the session ends on it.
  std::optional<Status> read_error;
  while (bytes < kBatchBytesMax && 1 + more.size() < kBatchFramesMax) {
    auto f = reader.TryRead();
    if (!f.ok()) {
      read_error = f.status();
      break;
    }
    if (!f->has_value()) break;
    if ((*f)->type != FrameType::kRecords) {
      *next = std::move(**f);
      break;
    }
    bytes += (*f)->payload.size();
    more.push_back(std::move(**f));
  }
  records_frames_ += 1 + more.size();
  tally->records_frames += 1 + more.size();
  // Before each change: a failover during the session ends it (invariant 5).
  ErrorCode code = ErrorCode::kInternal;
  if (Status st = CheckEpoch(store, a.epoch, &code); !st.ok()) return End{code, st};
  std::span<const uint8_t> records = first.payload;
  if (!more.empty()) {
    // One span for the store: the frames' records, in order (each frame holds whole ones).
    batch.clear();
    batch.reserve(bytes);
    batch.insert(batch.end(), first.payload.begin(), first.payload.end());
    for (auto& m : more) batch.insert(batch.end(), m.payload.begin(), m.payload.end());
    records = batch;
  }
  auto durable = store.Append(records);
  if (batch.capacity() > kBatchBytesMax) {
    batch = {};  // a batch of large frames: its buffer is not kept for the session
  }
  // All or nothing: a refused batch is acknowledged in no part.
  if (!durable.ok()) return End{StoreCode(durable.status()), WithSpace(store, durable.status())};
  ++appends_;
  ++tally->appends;
  // Counted before it goes: whoever reads the ACK then sees it in the stats.
  ++acks_;
  if (Status st = WriteFrame(s, FrameType::kAck, EncodeU64(*durable)); !st.ok()) {
    return End{ErrorCode::kInternal, st};
  }
  if (read_error) return End{ErrorCodeFor(*read_error), *read_error};
  return std::nullopt;
}

Receiver::Stats Receiver::stats() const {
  return Stats{records_frames_.load(), appends_.load(), acks_.load()};
}

std::optional<Receiver::End> Receiver::HandleFrame(Stream& s, const Admitted& a, const Frame& f) {
  store::RecoveryStore& store = *a.store;
  ErrorCode code = ErrorCode::kInternal;
  // Before each change: a failover during the session ends it (invariant 5). (Resync
  // data is staged only; its commit, RESYNC_END, is checked.)
  bool changes = f.type == FrameType::kResyncBegin || f.type == FrameType::kResyncEnd;
  if (changes) {
    if (Status st = CheckEpoch(store, a.epoch, &code); !st.ok()) return End{code, st};
  }
  switch (f.type) {
    case FrameType::kRecords:
      OSR_CHECK(false);  // AppendRecords takes them, in batches
      return End{};
    case FrameType::kResyncBegin: {
      auto b = ParseResyncBegin(f.payload);
      if (!b.ok()) return End{ErrorCode::kBadFrame, b.status()};
      Status st;
      if (b->resume_bytes == 0 && (b->initial || b->replace_history)) {
        // The copy is of the disks as they are at the source now (added or grown since
        // the store was made, their disk-size records maybe long gone from its log).
        st = store.AdoptDisks(b->from, a.disks);
      }
      if (st.ok()) {
        st = b->resume_bytes > 0  ? store.ResumeResync(b->from, b->initial, b->resume_bytes)
             : b->initial         ? store.BeginInitialSync(b->from)
             : b->replace_history ? store.BeginResyncReplacingHistory(b->from)
                                  : store.BeginResync(b->from);
      }
      if (!st.ok()) return End{StoreCode(st), st};
      if (b->resume_bytes > 0) {
        spdlog::info(
            "replication receiver: group '{}' resuming the {} after seq {} at byte {} (staged "
            "before)",
            a.group, b->initial ? "initial copy" : "resynchronization", b->from, b->resume_bytes);
      } else {
        spdlog::info("replication receiver: group '{}' {} after seq {}", a.group,
                     b->initial ? "starting the initial copy" : "resynchronizing", b->from);
      }
      return std::nullopt;
    }
    case FrameType::kResyncData: {
      auto d = ParseResyncData(f.payload);
      if (!d.ok()) return End{ErrorCode::kBadFrame, d.status()};
      Status st = store.ResyncWrite(d->disk, d->offset, d->bytes);
      if (!st.ok()) return End{StoreCode(st), WithSpace(store, st)};
      return std::nullopt;
    }
    case FrameType::kResyncEnd: {
      auto e = ParseResyncEnd(f.payload, "RESYNC_END");
      if (!e.ok()) return End{ErrorCode::kBadFrame, e.status()};
      if (Status st = store.CommitResync(e->consistent_seq); !st.ok()) {
        return End{StoreCode(st), WithSpace(store, st)};
      }
      spdlog::info("replication receiver: group '{}' resynchronized; consistent from seq {}",
                   a.group, e->consistent_seq);
      if (Status st = WriteFrame(s, FrameType::kResyncDone, EncodeResyncEnd(*e)); !st.ok()) {
        return End{ErrorCode::kInternal, st};
      }
      return std::nullopt;
    }
    case FrameType::kError: {
      PeerError pe = ParseError(f.payload);
      spdlog::info("replication receiver: group '{}': the sender ended the session ({}): {}",
                   a.group, ErrorCodeName(pe.code), pe.message);
      return End{};
    }
    default:
      return End{ErrorCode::kBadFrame,
                 InvalidArgument(fmt::format("unexpected frame type {} from a sender",
                                             static_cast<int>(f.type)))};
  }
}

}  // namespace osr::replication
