#include "nbd/session.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>

#include "common/threads.h"
#include "nbd/protocol.h"

namespace osr::nbd {

namespace {

constexpr uint32_t kBaseAllocationId = 1;  // our only meta context's id
constexpr size_t kStringBytesMax = 4096;   // the spec's limit for strings (names, messages)
constexpr size_t kReadBufferBytes = 256 * 1024;
constexpr uint16_t kKnownCmdFlags =
    kCmdFlagFua | kCmdFlagNoHole | kCmdFlagDf | kCmdFlagReqOne | kCmdFlagFastZero;
// Structured READs at least this large report holes as OFFSET_HOLE chunks.
constexpr uint32_t kHoleScanBytesMin = 64 * 1024;

void AppendBytes(std::vector<uint8_t>* out, const void* p, size_t n) {
  auto* b = static_cast<const uint8_t*>(p);
  out->insert(out->end(), b, b + n);
}

// Grows `out` by n bytes and returns a pointer to them.
uint8_t* Grow(std::vector<uint8_t>* out, size_t n) {
  size_t at = out->size();
  out->resize(at + n);
  return out->data() + at;
}

}  // namespace

Session::Session(std::unique_ptr<Stream> stream, const ExportTable* exports, SessionLimits limits,
                 std::string peer, SessionSecurity security)
    : stream_(std::move(stream)),
      exports_(exports),
      limits_(limits),
      peer_(std::move(peer)),
      security_(std::move(security)) {
  OSR_CHECK(security_.tls == TlsMode::kOff || security_.upgrader != nullptr);
  handshake_deadline_ =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(limits_.handshake_timeout_ms);
}

std::shared_ptr<const Export> Session::FindExport(std::string_view name) const {
  return exports_->FindFor(name, security_.principal, security_.authz);
}

void Session::Choose(std::shared_ptr<const Export> e) {
  disk_ = e->disk.get();
  std::lock_guard lock(export_mu_);
  export_ = std::move(e);
}

std::string Session::export_name() const {
  std::lock_guard lock(export_mu_);
  return export_ ? export_->name : std::string();
}

bool Session::Holds(const Export* e) const {
  std::lock_guard lock(export_mu_);
  return export_ != nullptr && export_.get() == e;
}

void Session::ReleaseExport() {
  std::shared_ptr<const Export> last;  // dropped outside the lock: it may free a view
  disk_ = nullptr;
  std::lock_guard lock(export_mu_);
  last = std::move(export_);
}

Session::~Session() {
  {
    std::lock_guard lock(sync_mu_);
    sync_stop_ = true;
  }
  sync_cv_.notify_all();
  if (sync_thread_.joinable()) sync_thread_.join();
}

void Session::Stop() {
  // Stop reading; Run() still answers every request it has read (the spec asks a
  // stopping server to finish what is in flight), then closes.
  stopped_ = true;
  std::lock_guard lock(stream_mu_);
  if (stream_) stream_->ShutdownRead();
}

void Session::Abort() {
  stopped_ = true;
  std::lock_guard lock(stream_mu_);
  if (stream_) stream_->Shutdown();
}

Status Session::Send(std::span<const struct iovec> iov) {
  std::lock_guard lock(send_mu_);
  if (!send_status_.ok()) return send_status_;
  Status st = stream_->WriteAll(iov);
  if (!st.ok()) send_status_ = st;
  return st;
}

Status Session::Run() {
  Status st = RunInner();
  // The client sees the end at once, not when the server reaps this session.
  {
    std::lock_guard lock(stream_mu_);
    if (stream_) stream_->Shutdown();
  }
  // Nothing runs on the export any more (RunInner joined the sync thread): let it go now,
  // not when the server reaps this session, so that whoever removes the export next
  // (closing a view, deleting a store) is not left waiting on a session that is over.
  ReleaseExport();
  return st;
}

Status Session::RunInner() {
  auto hs = Handshake();
  in_handshake_ = false;
  if (!hs.ok()) return hs.status();
  if (*hs == HandshakeResult::kEnd) return Status::Ok();
  stream_->SetReadTimeoutMs(0);
  sync_thread_ = std::thread([this] {
    NameThisThread("osr-nbd-sync");
    SyncLoop();
  });
  Status st = Transmission();
  // Answer everything already accepted before the session ends (also when stopping).
  if (st.ok() || stopped_) {
    Status fin = FinishBatch();
    if (st.ok()) st = fin;
  }
  {
    std::lock_guard lock(sync_mu_);
    sync_stop_ = true;
  }
  sync_cv_.notify_all();
  sync_thread_.join();
  return st;
}

// ---- handshake ----------------------------------------------------------------------

Status Session::SendOptionReply(uint32_t option, uint32_t type, std::span<const uint8_t> data) {
  uint8_t hdr[OptionReplyHeader::kSize];
  OptionReplyHeader::Encode(hdr, option, type, static_cast<uint32_t>(data.size()));
  struct iovec iov[2] = {{hdr, sizeof hdr}, {const_cast<uint8_t*>(data.data()), data.size()}};
  return Send({iov, data.empty() ? 1u : 2u});
}

Status Session::SendOptionError(uint32_t option, uint32_t type, std::string_view message) {
  message = message.substr(0, kStringBytesMax);
  spdlog::debug("nbd {}: option {} refused: {}", peer_, OptionName(option), message);
  return SendOptionReply(option, type,
                         {reinterpret_cast<const uint8_t*>(message.data()), message.size()});
}

uint16_t Session::TransmissionFlags(const Disk& disk) const {
  uint16_t f = kTxHasFlags | kTxSendFlush | kTxSendFua | kTxSendCache | kTxCanMultiConn;
  if (disk.read_only()) {
    f |= kTxReadOnly;
  } else {
    f |= kTxSendTrim | kTxSendWriteZeroes | kTxSendFastZero;
  }
  if (structured_) f |= kTxSendDf;
  return f;
}

Status Session::SendExportNameReply() {
  uint8_t buf[8 + 2 + 124] = {};
  Put64(buf, disk_->size());
  Put16(buf + 8, TransmissionFlags(*disk_));
  return stream_->WriteAll(std::span<const uint8_t>(buf, no_zeroes_ ? 10 : sizeof buf));
}

int Session::HandshakeMsLeft() const {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
      handshake_deadline_ - std::chrono::steady_clock::now());
  return static_cast<int>(std::max<int64_t>(0, left.count()));
}

Status Session::ReadHandshake(std::span<uint8_t> buf) {
  auto late = [&] {
    return Unavailable(
        fmt::format("the handshake did not end within {} ms", limits_.handshake_timeout_ms));
  };
  size_t done = 0;
  while (done < buf.size()) {
    int left = HandshakeMsLeft();
    if (left <= 0 || stopped_) return late();
    stream_->SetReadTimeoutMs(left);
    auto n = stream_->ReadSome(buf.subspan(done));
    if (!n.ok()) return HandshakeMsLeft() <= 0 ? late() : n.status();
    if (*n == 0) {
      return stopped_ ? late() : Unavailable("connection closed by peer during the handshake");
    }
    done += *n;
  }
  return Status::Ok();
}

Result<Session::HandshakeResult> Session::Handshake() {
  uint8_t hello[18];
  Put64(hello, kNbdMagic);
  Put64(hello + 8, kIHaveOpt);
  Put16(hello + 16, kFlagFixedNewstyle | kFlagNoZeroes);
  OSR_RETURN_IF_ERROR(stream_->WriteAll(std::span<const uint8_t>(hello)));

  uint8_t cflags_buf[4];
  OSR_RETURN_IF_ERROR(ReadHandshake(cflags_buf));
  uint32_t cflags = Get32(cflags_buf);
  if (cflags & ~(kClientFixedNewstyle | kClientNoZeroes)) {
    return InvalidArgument(fmt::format("unknown client flags {:#x}", cflags));
  }
  bool fixed = cflags & kClientFixedNewstyle;
  no_zeroes_ = cflags & kClientNoZeroes;
  if (!fixed && security_.tls == TlsMode::kRequired) {
    // TLS needs fixed newstyle; such a client can only send EXPORT_NAME, which we must
    // refuse by closing.
    return Status(Code::kPermissionDenied, "a client without fixed newstyle cannot start TLS");
  }

  std::vector<uint8_t> data;
  for (uint32_t n = 0; n < limits_.options_max; ++n) {
    uint8_t hbuf[OptionHeader::kSize];
    OSR_RETURN_IF_ERROR(ReadHandshake(hbuf));
    OptionHeader h = OptionHeader::Decode(hbuf);
    if (h.magic != kIHaveOpt) return InvalidArgument("bad option magic");
    if (h.length > limits_.option_bytes_max) {
      if (!fixed || h.length > limits_.option_discard_bytes_max ||
          h.option == kOptExportName) {  // EXPORT_NAME gets no option reply: disconnect
        return InvalidArgument(
            fmt::format("option {} of {} bytes is too large", OptionName(h.option), h.length));
      }
      // Keep the stream in step: read and drop the data, then refuse.
      uint8_t sink[4096];
      for (uint32_t left = h.length; left > 0;) {
        uint32_t k = std::min<uint32_t>(left, sizeof sink);
        OSR_RETURN_IF_ERROR(ReadHandshake({sink, k}));
        left -= k;
      }
      OSR_RETURN_IF_ERROR(SendOptionError(h.option, kRepErrTooBig, "option data too large"));
      continue;
    }
    data.resize(h.length);
    OSR_RETURN_IF_ERROR(ReadHandshake(data));

    if (!fixed && h.option != kOptExportName) {
      return InvalidArgument("client without fixed newstyle sent an option other than EXPORT_NAME");
    }
    OSR_ASSIGN_OR_RETURN(std::optional<HandshakeResult> end, HandleOption(h.option, data));
    if (end.has_value()) return *end;
  }
  return InvalidArgument(fmt::format("more than {} options in one handshake", limits_.options_max));
}

Result<std::optional<Session::HandshakeResult>> Session::HandleOption(
    uint32_t option, std::span<const uint8_t> data) {
  using R = std::optional<HandshakeResult>;
  if (security_.tls == TlsMode::kRequired && !tls_active_ && option != kOptStartTls &&
      option != kOptAbort) {
    if (option == kOptExportName) {  // cannot be refused with a reply: end the session
      return Status(Code::kPermissionDenied, "EXPORT_NAME before STARTTLS on a TLS-only listener");
    }
    OSR_RETURN_IF_ERROR(SendOptionError(option, kRepErrTlsReqd, "TLS is required: send STARTTLS"));
    return R();
  }
  switch (option) {
    case kOptExportName: {
      std::string_view name(reinterpret_cast<const char*>(data.data()), data.size());
      auto e = FindExport(name);
      if (!e) return NotFound(fmt::format("client asked for unknown export '{}'", name));
      Choose(std::move(e));
      OSR_RETURN_IF_ERROR(SendExportNameReply());
      return R(HandshakeResult::kTransmission);
    }
    case kOptAbort:
      // The client may already have closed; a failed ACK does not matter.
      (void)SendOptionReply(option, kRepAck);
      return R(HandshakeResult::kEnd);
    case kOptList: {
      if (!data.empty()) {
        OSR_RETURN_IF_ERROR(SendOptionError(option, kRepErrInvalid, "LIST takes no data"));
        return R();
      }
      for (const auto& e : exports_->ListFor(security_.principal, security_.authz)) {
        std::vector<uint8_t> r(4);
        Put32(r.data(), static_cast<uint32_t>(e->name.size()));
        AppendBytes(&r, e->name.data(), e->name.size());
        AppendBytes(&r, e->description.data(), e->description.size());
        OSR_RETURN_IF_ERROR(SendOptionReply(option, kRepServer, r));
      }
      OSR_RETURN_IF_ERROR(SendOptionReply(option, kRepAck));
      return R();
    }
    case kOptStartTls:
      OSR_RETURN_IF_ERROR(StartTls(data));
      return R();
    case kOptInfo:
    case kOptGo: {
      bool go = false;
      OSR_RETURN_IF_ERROR(HandleInfoOrGo(option, data, &go));
      if (go) return R(HandshakeResult::kTransmission);
      return R();
    }
    case kOptStructuredReply:
      if (!data.empty()) {
        OSR_RETURN_IF_ERROR(
            SendOptionError(option, kRepErrInvalid, "STRUCTURED_REPLY takes no data"));
      } else if (structured_) {
        OSR_RETURN_IF_ERROR(
            SendOptionError(option, kRepErrInvalid, "structured replies already negotiated"));
      } else {
        structured_ = true;
        OSR_RETURN_IF_ERROR(SendOptionReply(option, kRepAck));
      }
      return R();
    case kOptListMetaContext:
    case kOptSetMetaContext:
      OSR_RETURN_IF_ERROR(HandleMetaContext(option, data));
      return R();
    default:
      OSR_RETURN_IF_ERROR(
          SendOptionError(option, kRepErrUnsup, fmt::format("option {} is not supported", option)));
      return R();
  }
}

Status Session::StartTls(std::span<const uint8_t> data) {
  if (security_.tls == TlsMode::kOff) {
    return SendOptionError(kOptStartTls, kRepErrUnsup, "TLS is not configured on this listener");
  }
  if (tls_active_) return SendOptionError(kOptStartTls, kRepErrInvalid, "TLS is already on");
  if (!data.empty()) return SendOptionError(kOptStartTls, kRepErrInvalid, "STARTTLS takes no data");
  OSR_RETURN_IF_ERROR(SendOptionReply(kOptStartTls, kRepAck));
  // From here on there is no way back to plain text: any failure ends the session.
  {
    std::lock_guard lock(stream_mu_);
    auto wrapped = security_.upgrader->Wrap(std::move(stream_));
    if (!wrapped.ok()) return wrapped.status();  // stream_ is gone: the connection closed
    stream_ = std::move(*wrapped);
  }
  if (stopped_) return Unavailable("session stopped during STARTTLS");
  int left = HandshakeMsLeft();
  if (left <= 0) return Unavailable("the handshake deadline passed before TLS started");
  OSR_ASSIGN_OR_RETURN(std::string identity, security_.upgrader->Handshake(stream_.get(), left));
  tls_active_ = true;
  security_.principal = {Principal::Kind::kCertificate, std::move(identity)};
  // Nothing negotiated in plain text carries over (it could have been tampered with).
  structured_ = false;
  base_allocation_ = false;
  spdlog::debug("nbd {}: TLS with {}", peer_, security_.principal.Describe());
  return Status::Ok();
}

Status Session::HandleInfoOrGo(uint32_t option, std::span<const uint8_t> d, bool* go) {
  // Data: name length (4), name, number of info requests (2), requests (2 each).
  if (d.size() < 6) return SendOptionError(option, kRepErrInvalid, "option data too short");
  uint32_t name_len = Get32(d.data());
  if (name_len > d.size() - 6) return SendOptionError(option, kRepErrInvalid, "bad name length");
  std::string_view name(reinterpret_cast<const char*>(d.data() + 4), name_len);
  uint16_t nreq = Get16(d.data() + 4 + name_len);
  if (d.size() != 6 + name_len + 2 * size_t{nreq}) {
    return SendOptionError(option, kRepErrInvalid, "option length does not match its requests");
  }
  auto exp = FindExport(name);
  if (!exp) {
    return SendOptionError(option, kRepErrUnknown,
                           fmt::format("no export named '{}'", name.substr(0, 256)));
  }
  const Disk& disk = *exp->disk;
  bool want_name = false;
  bool want_description = false;
  for (uint16_t i = 0; i < nreq; ++i) {
    uint16_t t = Get16(d.data() + 6 + name_len + 2 * i);
    if (t == kInfoName) want_name = true;
    if (t == kInfoDescription) want_description = true;
  }
  uint8_t info[12];
  Put16(info, kInfoExport);
  Put64(info + 2, disk.size());
  Put16(info + 10, TransmissionFlags(disk));
  OSR_RETURN_IF_ERROR(SendOptionReply(option, kRepInfo, info));
  uint8_t bs[14];
  Put16(bs, kInfoBlockSize);
  Put32(bs + 2, limits_.block_size_min);
  Put32(bs + 6, limits_.block_size_preferred);
  Put32(bs + 10, limits_.request_bytes_max);
  OSR_RETURN_IF_ERROR(SendOptionReply(option, kRepInfo, bs));
  if (want_name) {
    std::vector<uint8_t> r(2);
    Put16(r.data(), kInfoName);
    AppendBytes(&r, exp->name.data(), exp->name.size());
    OSR_RETURN_IF_ERROR(SendOptionReply(option, kRepInfo, r));
  }
  if (want_description && !exp->description.empty()) {
    std::vector<uint8_t> r(2);
    Put16(r.data(), kInfoDescription);
    AppendBytes(&r, exp->description.data(), exp->description.size());
    OSR_RETURN_IF_ERROR(SendOptionReply(option, kRepInfo, r));
  }
  OSR_RETURN_IF_ERROR(SendOptionReply(option, kRepAck));
  *go = option == kOptGo;
  if (*go) Choose(std::move(exp));
  return Status::Ok();
}

Status Session::HandleMetaContext(uint32_t option, std::span<const uint8_t> d) {
  // A SET replaces earlier selections, also when it fails.
  if (option == kOptSetMetaContext) base_allocation_ = false;
  if (!structured_) {
    return SendOptionError(option, kRepErrInvalid, "negotiate structured replies first");
  }
  // Data: export name length (4), name, number of queries (4), queries (length 4 + text).
  if (d.size() < 8) return SendOptionError(option, kRepErrInvalid, "option data too short");
  uint32_t name_len = Get32(d.data());
  if (name_len > d.size() - 8) return SendOptionError(option, kRepErrInvalid, "bad name length");
  std::string_view name(reinterpret_cast<const char*>(d.data() + 4), name_len);
  size_t pos = 4 + name_len;
  uint32_t nq = Get32(d.data() + pos);
  pos += 4;
  std::vector<std::string_view> queries;
  for (uint32_t i = 0; i < nq; ++i) {
    if (d.size() - pos < 4) return SendOptionError(option, kRepErrInvalid, "truncated query");
    uint32_t ql = Get32(d.data() + pos);
    pos += 4;
    if (ql > d.size() - pos) return SendOptionError(option, kRepErrInvalid, "bad query length");
    queries.emplace_back(reinterpret_cast<const char*>(d.data() + pos), ql);
    pos += ql;
  }
  if (pos != d.size()) return SendOptionError(option, kRepErrInvalid, "trailing option data");
  if (!FindExport(name)) {
    return SendOptionError(option, kRepErrUnknown,
                           fmt::format("no export named '{}'", name.substr(0, 256)));
  }
  bool match = false;
  if (option == kOptListMetaContext && queries.empty()) match = true;
  for (auto q : queries) {
    if (q == kMetaBaseAllocation) match = true;
    if (option == kOptListMetaContext && q == "base:") match = true;
  }
  if (option == kOptSetMetaContext) base_allocation_ = match;
  if (match) {
    std::vector<uint8_t> r(4);
    Put32(r.data(), option == kOptSetMetaContext ? kBaseAllocationId : 0);
    AppendBytes(&r, kMetaBaseAllocation.data(), kMetaBaseAllocation.size());
    OSR_RETURN_IF_ERROR(SendOptionReply(option, kRepMetaContext, r));
  }
  return SendOptionReply(option, kRepAck);
}

// ---- transmission -------------------------------------------------------------------

Result<bool> Session::Fill(size_t n) {
  if (rend_ - rpos_ >= n) return true;
  if (rpos_ > 0) {  // compact: keep the unread tail at the front
    std::memmove(rbuf_.data(), rbuf_.data() + rpos_, rend_ - rpos_);
    rend_ -= rpos_;
    rpos_ = 0;
  }
  OSR_CHECK(n <= rbuf_.size());
  while (rend_ < n) {
    std::span<uint8_t> room{rbuf_.data() + rend_, rbuf_.size() - rend_};
    // Take what has already arrived without waiting; before waiting, answer the batch:
    // the client may wait for those replies before it sends more.
    OSR_ASSIGN_OR_RETURN(std::optional<size_t> ready, stream_->TryReadSome(room));
    size_t got = 0;
    if (ready.has_value()) {
      got = *ready;
    } else {
      OSR_RETURN_IF_ERROR(FinishBatch());
      OSR_ASSIGN_OR_RETURN(got, stream_->ReadSome(room));
    }
    if (got == 0) {
      if (rend_ == 0) return false;
      return Unavailable("client closed the connection in the middle of a request");
    }
    rend_ += got;
  }
  return true;
}

Status Session::Transmission() {
  rbuf_.resize(kReadBufferBytes);
  for (;;) {
    if (stopped_) return Unavailable("server is stopping");
    OSR_ASSIGN_OR_RETURN(bool more, Fill(Request::kSize));
    if (!more) return Status::Ok();  // closed between requests (no DISC): fine
    Request req = Request::Decode(rbuf_.data() + rpos_);
    rpos_ += Request::kSize;
    if (req.magic != kRequestMagic) {
      return InvalidArgument(fmt::format("bad request magic {:#x}", req.magic));
    }
    if (req.type == kCmdDisc) return Status::Ok();

    std::span<const uint8_t> payload;
    if (req.type == kCmdWrite) {
      if (req.length > limits_.request_bytes_max) {
        if (req.length > limits_.payload_discard_bytes_max) {
          return InvalidArgument(fmt::format("WRITE of {} bytes: too large to skip", req.length));
        }
        for (uint32_t left = req.length; left > 0;) {  // skip the payload, then refuse
          OSR_ASSIGN_OR_RETURN(bool ok, Fill(1));
          if (!ok) return Unavailable("client closed in the middle of a WRITE payload");
          uint32_t k = static_cast<uint32_t>(std::min<size_t>(left, rend_ - rpos_));
          rpos_ += k;
          left -= k;
        }
        ReplyError(req, kEInval, "write larger than the maximum block size");
        continue;
      }
      if (rend_ - rpos_ >= req.length) {
        payload = {rbuf_.data() + rpos_, req.length};
        rpos_ += req.length;
      } else {
        // A large payload: read it straight into its own buffer.
        payload_.resize(req.length);
        size_t have = rend_ - rpos_;
        std::memcpy(payload_.data(), rbuf_.data() + rpos_, have);
        rpos_ = rend_ = 0;
        OSR_RETURN_IF_ERROR(FinishBatch());
        Status st = stream_->ReadFull({payload_.data() + have, req.length - have});
        if (!st.ok()) {
          return Unavailable("client closed in the middle of a WRITE payload: " + st.message());
        }
        payload = payload_;
      }
    }
    OSR_RETURN_IF_ERROR(Serve(req, payload));
    if (out_.size() >= limits_.batch_reply_bytes_max) OSR_RETURN_IF_ERROR(FinishBatch());
  }
}

void Session::ReplySimple(uint64_t cookie, uint32_t error) {
  SimpleReply::Encode(Grow(&out_, SimpleReply::kSize), error, cookie);
}

void Session::ReplyError(const Request& req, uint32_t error, std::string_view message) {
  OSR_CHECK(error != 0);
  spdlog::debug("nbd {}: {} {}+{}: error {}: {}", peer_, CommandName(req.type), req.offset,
                req.length, error, message);
  // With structured replies every error is an error chunk, so the message reaches the
  // client; without, a simple reply.
  if (structured_) {
    size_t n = std::min<size_t>(message.size(), kStringBytesMax);
    uint8_t* p = Grow(&out_, ChunkHeader::kSize + 6 + n);
    ChunkHeader::Encode(p, kReplyFlagDone, kReplyTypeError, req.cookie,
                        static_cast<uint32_t>(6 + n));
    Put32(p + ChunkHeader::kSize, error);
    Put16(p + ChunkHeader::kSize + 4, static_cast<uint16_t>(n));
    std::memcpy(p + ChunkHeader::kSize + 6, message.data(), n);
  } else {
    ReplySimple(req.cookie, error);
  }
}

void Session::Defer(uint64_t cookie, uint16_t type) {
  batch_deferred_.push_back({cookie, type});
}

Status Session::Serve(const Request& req, std::span<const uint8_t> payload) {
  if (req.flags & ~kKnownCmdFlags) {
    ReplyError(req, kEInval, fmt::format("unknown command flags {:#x}", req.flags));
    return Status::Ok();
  }
  bool fua = req.flags & kCmdFlagFua;
  uint64_t size = disk_->size();
  bool in_range = req.offset <= size && req.length <= size - req.offset;
  auto flags_only = [&](uint16_t allowed) {
    if (req.flags & ~(allowed | kCmdFlagFua)) {
      ReplyError(req, kEInval,
                 fmt::format("flags {:#x} not valid for {}", req.flags, CommandName(req.type)));
      return false;
    }
    return true;
  };
  bool writes = req.type == kCmdWrite || req.type == kCmdTrim || req.type == kCmdWriteZeroes;
  if (writes && disk_->read_only()) {
    ReplyError(req, kEPerm, "export is read-only");
    return Status::Ok();
  }

  switch (req.type) {
    case kCmdRead:
      if (!flags_only(kCmdFlagDf)) break;
      if ((req.flags & kCmdFlagDf) && !structured_) {
        ReplyError(req, kEInval, "DF needs structured replies");
      } else if (req.length > limits_.request_bytes_max) {
        ReplyError(req, kEInval, "read larger than the maximum block size");
      } else if (!in_range || req.length == 0) {
        ReplyError(req, kEInval, "read outside the export");
      } else {
        ServeRead(req);
      }
      break;

    case kCmdWrite: {
      if (!flags_only(0)) break;
      if (!in_range) {
        ReplyError(req, kENoSpc, "write past the end of the export");
        break;
      }
      if (req.length == 0) {
        ReplyError(req, kEInval, "zero-length write");
        break;
      }
      Status st = disk_->Write(req.offset, payload);
      if (!st.ok()) {
        spdlog::warn("nbd {}: WRITE {}+{} failed: {}", peer_, req.offset, req.length,
                     st.ToString());
        ReplyError(req, ErrnoToNbd(st.ToErrno()), st.message());
        break;
      }
      if (fua) {
        Defer(req.cookie, req.type);
      } else {
        ReplySimple(req.cookie, 0);
      }
      break;
    }

    case kCmdTrim:
    case kCmdWriteZeroes: {
      bool zeroes = req.type == kCmdWriteZeroes;
      if (!flags_only(zeroes ? (kCmdFlagNoHole | kCmdFlagFastZero) : 0)) break;
      if (!in_range || req.length == 0) {
        ReplyError(req, zeroes && !in_range ? kENoSpc : kEInval, "range outside the export");
        break;
      }
      ZeroMode mode = !zeroes                        ? ZeroMode::kTrim
                      : (req.flags & kCmdFlagNoHole) ? ZeroMode::kZeroNoHole
                                                     : ZeroMode::kZeroMayTrim;
      Status st = disk_->Zero(req.offset, req.length, mode, req.flags & kCmdFlagFastZero);
      if (!st.ok()) {
        uint32_t err = ErrnoToNbd(st.ToErrno());
        if ((req.flags & kCmdFlagFastZero) && st.code() == Code::kNotSupported) {
          err = kENotSup;
        } else {
          spdlog::warn("nbd {}: {} {}+{} failed: {}", peer_, CommandName(req.type), req.offset,
                       req.length, st.ToString());
        }
        ReplyError(req, err, st.message());
        break;
      }
      if (fua) {
        Defer(req.cookie, req.type);
      } else {
        ReplySimple(req.cookie, 0);
      }
      break;
    }

    case kCmdFlush:
      if (!flags_only(0)) break;
      Defer(req.cookie, req.type);
      break;

    case kCmdCache:
      if (!flags_only(0)) break;
      if (!in_range) {
        ReplyError(req, kEInval, "range outside the export");
        break;
      }
      {
        Status st = disk_->Cache(req.offset, req.length);
        if (st.ok()) {
          ReplySimple(req.cookie, 0);
        } else {
          ReplyError(req, ErrnoToNbd(st.ToErrno()), st.message());
        }
      }
      break;

    case kCmdBlockStatus:
      if (!flags_only(kCmdFlagReqOne)) break;
      if (!structured_ || !base_allocation_) {
        ReplyError(req, kEInval, "BLOCK_STATUS needs a negotiated meta context");
      } else if (!in_range || req.length == 0) {
        ReplyError(req, kEInval, "range outside the export");
      } else {
        ServeBlockStatus(req);
      }
      break;

    default:
      ReplyError(req, kEInval, fmt::format("unknown command {}", req.type));
      break;
  }
  return Status::Ok();
}

void Session::ServeRead(const Request& req) {
  if (!structured_) {
    size_t at = out_.size();
    Grow(&out_, SimpleReply::kSize + req.length);
    Status st = disk_->Read(req.offset, {out_.data() + at + SimpleReply::kSize, req.length});
    if (!st.ok()) {
      out_.resize(at);
      spdlog::warn("nbd {}: READ {}+{} failed: {}", peer_, req.offset, req.length, st.ToString());
      ReplySimple(req.cookie, ErrnoToNbd(st.ToErrno()));
      return;
    }
    SimpleReply::Encode(out_.data() + at, 0, req.cookie);
    return;
  }
  // Structured: data chunks, and hole chunks for large reads over sparse regions.
  std::vector<Extent> extents;
  if (req.length >= kHoleScanBytesMin && !(req.flags & kCmdFlagDf)) {
    if (!disk_->BlockStatus(req.offset, req.length, 64, &extents).ok()) extents.clear();
  }
  uint64_t covered = 0;
  for (auto& e : extents) covered += e.length;
  if (covered < req.length) extents.push_back({req.length - covered, 0});
  size_t at = out_.size();
  uint64_t pos = req.offset;
  for (size_t i = 0; i < extents.size(); ++i) {
    uint64_t len = std::min<uint64_t>(extents[i].length, req.offset + req.length - pos);
    if (len == 0) continue;
    bool last = pos + len == req.offset + req.length;
    uint16_t flags = last ? kReplyFlagDone : 0;
    if (extents[i].flags & kStateZero) {
      uint8_t* p = Grow(&out_, ChunkHeader::kSize + 12);
      ChunkHeader::Encode(p, flags, kReplyTypeOffsetHole, req.cookie, 12);
      Put64(p + ChunkHeader::kSize, pos);
      Put32(p + ChunkHeader::kSize + 8, static_cast<uint32_t>(len));
    } else {
      size_t hdr_at = out_.size();
      Grow(&out_, ChunkHeader::kSize + 8 + len);
      uint8_t* p = out_.data() + hdr_at;
      ChunkHeader::Encode(p, flags, kReplyTypeOffsetData, req.cookie,
                          static_cast<uint32_t>(8 + len));
      Put64(p + ChunkHeader::kSize, pos);
      Status st = disk_->Read(pos, {p + ChunkHeader::kSize + 8, len});
      if (!st.ok()) {
        out_.resize(at);
        spdlog::warn("nbd {}: READ {}+{} failed: {}", peer_, req.offset, req.length, st.ToString());
        ReplyError(req, ErrnoToNbd(st.ToErrno()), st.message());
        return;
      }
    }
    pos += len;
    if (last) break;
  }
}

void Session::ServeBlockStatus(const Request& req) {
  std::vector<Extent> extents;
  size_t max = (req.flags & kCmdFlagReqOne) ? 1 : limits_.extents_max;
  Status st = disk_->BlockStatus(req.offset, req.length, max, &extents);
  if (!st.ok() || extents.empty()) {
    ReplyError(req, st.ok() ? kEIo : ErrnoToNbd(st.ToErrno()),
               st.ok() ? "no extents" : st.message());
    return;
  }
  uint32_t len = static_cast<uint32_t>(4 + 8 * extents.size());
  uint8_t* p = Grow(&out_, ChunkHeader::kSize + len);
  ChunkHeader::Encode(p, kReplyFlagDone, kReplyTypeBlockStatus, req.cookie, len);
  p += ChunkHeader::kSize;
  Put32(p, kBaseAllocationId);
  p += 4;
  for (auto& e : extents) {
    Put32(p, static_cast<uint32_t>(e.length));
    Put32(p + 4, e.flags);
    p += 8;
  }
}

Status Session::FinishBatch() {
  if (!out_.empty()) {
    struct iovec v {
      out_.data(), out_.size()
    };
    Status st = Send({&v, 1});
    out_.clear();
    if (out_.capacity() > 2 * limits_.batch_reply_bytes_max) out_.shrink_to_fit();
    OSR_RETURN_IF_ERROR(st);
  }
  if (!batch_deferred_.empty()) {
    std::unique_lock lock(sync_mu_);
    // Bound the queue: a client that floods FLUSH waits for the earlier ones.
    sync_cv_.wait(lock, [&] { return sync_queue_.size() < limits_.sync_queue_max || sync_stop_; });
    for (auto& d : batch_deferred_) sync_queue_.push_back(d);
    batch_deferred_.clear();
    lock.unlock();
    sync_cv_.notify_all();
  }
  return Status::Ok();
}

void Session::SyncLoop() {
  std::unique_lock lock(sync_mu_);
  for (;;) {
    sync_cv_.wait(lock, [&] { return !sync_queue_.empty() || sync_stop_; });
    if (sync_queue_.empty()) return;  // stopping and drained
    std::deque<Deferred> work;
    work.swap(sync_queue_);
    lock.unlock();
    sync_cv_.notify_all();
    Status st = disk_->Flush();
    if (!st.ok()) spdlog::error("nbd {}: flush failed: {}", peer_, st.ToString());
    uint32_t err = st.ok() ? 0 : ErrnoToNbd(st.ToErrno());
    std::vector<uint8_t> replies;
    for (const Deferred& d : work) {
      if (err != 0 && structured_) {
        std::string_view msg = std::string_view(st.message()).substr(0, kStringBytesMax);
        size_t at = replies.size();
        replies.resize(at + ChunkHeader::kSize + 6 + msg.size());
        uint8_t* p = replies.data() + at;
        ChunkHeader::Encode(p, kReplyFlagDone, kReplyTypeError, d.cookie,
                            static_cast<uint32_t>(6 + msg.size()));
        Put32(p + ChunkHeader::kSize, err);
        Put16(p + ChunkHeader::kSize + 4, static_cast<uint16_t>(msg.size()));
        std::memcpy(p + ChunkHeader::kSize + 6, msg.data(), msg.size());
      } else {
        size_t at = replies.size();
        replies.resize(at + SimpleReply::kSize);
        SimpleReply::Encode(replies.data() + at, err, d.cookie);
      }
    }
    struct iovec v {
      replies.data(), replies.size()
    };
    (void)Send({&v, 1});  // a failed send ends the session through its reader
    lock.lock();
  }
}

}  // namespace osr::nbd
