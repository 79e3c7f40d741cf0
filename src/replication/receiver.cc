#include "replication/receiver.h"

#include <fmt/format.h>
#include <poll.h>
#include <spdlog/spdlog.h>

#include <cstring>
#include <nlohmann/json.hpp>

#include "common/threads.h"
#include "replication/wire.h"

namespace osr::replication {

Receiver::~Receiver() {
  Stop();
}

Result<ListenAddress> Receiver::Listen(const ListenAddress& addr) {
  OSR_ASSIGN_OR_RETURN(Listener l, Listener::Listen(addr));
  listener_ = std::make_unique<Listener>(std::move(l));
  return listener_->address();
}

void Receiver::Start() {
  OSR_CHECK(listener_ != nullptr);
  acceptor_ = std::thread([this] { AcceptLoop(); });
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
    struct pollfd p = {listener_->fd(), POLLIN, 0};
    int rc = ::poll(&p, 1, 200);
    {
      std::lock_guard lock(mu_);
      JoinFinished(conns_);
    }
    if (rc <= 0 || stopping_) continue;
    auto fd = listener_->Accept();
    if (!fd.ok()) continue;
    auto c = std::make_unique<Conn>();
    if (tls_) {
      auto t = tls_->NewStream(std::move(*fd));
      if (!t.ok()) {
        spdlog::warn("replication receiver: {}", t.status().ToString());
        continue;
      }
      c->tls = t->get();
      c->stream = std::move(*t);
    } else {
      c->stream = std::make_unique<SocketStream>(std::move(*fd));
    }
    Conn* cp = c.get();
    std::lock_guard lock(mu_);
    conns_.push_back(std::move(c));
    cp->thread = std::thread([this, cp] { Serve(cp); });
  }
}

void Receiver::Serve(Conn* c) {
  Status st = c->tls ? c->tls->Handshake(10000) : Status::Ok();
  if (!st.ok()) {
    spdlog::warn("replication receiver: {}", st.ToString());
    c->stream->Shutdown();
    c->done = true;
    return;
  }
  st = ServeSession(*c->stream);
  if (!st.ok()) {
    spdlog::info("replication receiver: session ended: {}", st.ToString());
    (void)WriteFrame(
        *c->stream, FrameType::kError,
        nlohmann::json{{"code", std::string(CodeName(st.code()))}, {"message", st.message()}}
            .dump());
  }
  c->stream->Shutdown();
  c->done = true;
}

Status Receiver::ServeSession(Stream& s) {
  s.SetReadTimeoutMs(30000);  // the HELLO must come soon
  OSR_ASSIGN_OR_RETURN(Frame hello, ReadFrame(s));
  if (hello.type != FrameType::kHello) return InvalidArgument("expected HELLO");
  auto j = nlohmann::json::parse(hello.payload, nullptr, false);
  if (j.is_discarded() || !j.is_object() || j.value("version", 0u) != kProtocolVersion ||
      !j.contains("group") || !j["group"].is_string() || !j.contains("disks") ||
      !j["disks"].is_array()) {
    return InvalidArgument("malformed HELLO");
  }
  std::string group = j["group"].get<std::string>();
  std::shared_ptr<store::RecoveryStore> store = lookup_(group);
  if (store == nullptr) return NotFound(fmt::format("no recovery store for group '{}'", group));
  const auto& disks = store->disks();
  if (j["disks"].size() != disks.size()) {
    return InvalidArgument(fmt::format("group '{}' has {} disks here, the sender has {}", group,
                                       disks.size(), j["disks"].size()));
  }
  for (size_t i = 0; i < disks.size(); ++i) {
    const auto& d = j["disks"][i];
    if (!d.is_object() || d.value("size_bytes", uint64_t{0}) != disks[i].size_bytes) {
      return InvalidArgument(fmt::format("disk {} of group '{}' differs in size", i, group));
    }
  }
  const uint64_t epoch = j.value("epoch", uint64_t{1});
  OSR_RETURN_IF_ERROR(store->AcceptEpoch(epoch));
  // One connection per group: end the older one and wait for it.
  Group* g;
  {
    std::lock_guard lock(mu_);
    auto& slot = groups_[group];
    if (!slot) slot = std::make_unique<Group>();
    g = slot.get();
    if (g->current != nullptr) g->current->Shutdown();
  }
  std::unique_lock serving(g->serving);
  // Again, now that this session is the group's only one: a failover may have raised the
  // epoch while it waited (and cut the sessions that were there then).
  OSR_RETURN_IF_ERROR(store->AcceptEpoch(epoch));
  // And before each change: a failover during the session ends it (invariant 5).
  auto current = [&]() -> Status {
    if (uint64_t e = store->epoch(); e > epoch) {
      return Status(Code::kPermissionDenied,
                    fmt::format("stale epoch {}: the item is at epoch {} (failed over); this "
                                "source is fenced",
                                epoch, e));
    }
    return Status::Ok();
  };
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

  bool lz4 = false;
  if (j.contains("compress") && j["compress"].is_array()) {
    for (auto& c : j["compress"]) lz4 = lz4 || c == "lz4";
  }
  OSR_RETURN_IF_ERROR(WriteFrame(s, FrameType::kHelloOk,
                                 nlohmann::json{{"durable_seq", store->durable_seq()},
                                                {"base_seq", store->base_seq()},
                                                {"compress", lz4 ? "lz4" : "none"},
                                                {"initial_sync", store->initial_sync_pending()},
                                                {"differential", store->differential()}}
                                     .dump()));
  s.SetReadTimeoutMs(0);
  spdlog::info("replication receiver: group '{}' connected, durable seq {}", group,
               store->durable_seq());
  for (;;) {
    auto f = ReadFrame(s);
    if (!f.ok()) {
      if (f.status().code() == Code::kUnavailable) return Status::Ok();  // sender left
      return f.status();
    }
    switch (f->type) {
      case FrameType::kRecords: {
        OSR_RETURN_IF_ERROR(current());
        OSR_ASSIGN_OR_RETURN(uint64_t durable, store->Append(f->payload));
        OSR_RETURN_IF_ERROR(WriteFrame(s, FrameType::kAck, EncodeU64(durable)));
        break;
      }
      case FrameType::kResyncBegin: {
        auto b = nlohmann::json::parse(f->payload, nullptr, false);
        if (b.is_discarded() || !b.contains("from")) return InvalidArgument("bad RESYNC_BEGIN");
        OSR_RETURN_IF_ERROR(current());
        if (b.value("initial", false)) {
          OSR_RETURN_IF_ERROR(store->BeginInitialSync(b["from"].get<uint64_t>()));
        } else {
          OSR_RETURN_IF_ERROR(store->BeginResync(b["from"].get<uint64_t>()));
        }
        spdlog::info("replication receiver: group '{}' resynchronizing after seq {}", group,
                     b["from"].get<uint64_t>());
        break;
      }
      case FrameType::kResyncData: {
        if (f->payload.size() < 12) return InvalidArgument("bad RESYNC_DATA");
        uint32_t disk;
        uint64_t offset;
        std::memcpy(&disk, f->payload.data(), 4);
        std::memcpy(&offset, f->payload.data() + 4, 8);
        OSR_RETURN_IF_ERROR(
            store->ResyncWrite(disk, offset, std::span<const uint8_t>(f->payload).subspan(12)));
        break;
      }
      case FrameType::kResyncEnd: {
        auto b = nlohmann::json::parse(f->payload, nullptr, false);
        if (b.is_discarded() || !b.contains("consistent_seq")) {
          return InvalidArgument("bad RESYNC_END");
        }
        uint64_t consistent = b["consistent_seq"].get<uint64_t>();
        OSR_RETURN_IF_ERROR(current());
        OSR_RETURN_IF_ERROR(store->CommitResync(consistent));
        spdlog::info("replication receiver: group '{}' resynchronized; consistent from seq {}",
                     group, consistent);
        OSR_RETURN_IF_ERROR(WriteFrame(s, FrameType::kResyncDone,
                                       nlohmann::json{{"consistent_seq", consistent}}.dump()));
        break;
      }
      default:
        return InvalidArgument(fmt::format("unexpected frame type {}", static_cast<int>(f->type)));
    }
  }
}

}  // namespace osr::replication
