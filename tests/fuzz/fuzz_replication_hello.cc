// libFuzzer target: random bytes as the replication channel's control payloads, through
// the functions the receiver and the sender use (src/replication/messages.h) and the
// frame reader (wire.h). The first input byte picks what the rest is: a HELLO, HELLO_OK,
// RESYNC_BEGIN, RESYNC_END / RESYNC_DONE, RESYNC_DATA or ERROR payload, or a stream of
// whole frames, each dispatched by its type. Whatever the bytes: no crash, no throw (a
// throw ends the process here as in osrd), and what parses round-trips through its
// encoder unchanged.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/socket.h"
#include "common/status.h"
#include "replication/messages.h"
#include "replication/wire.h"

namespace {

using namespace osr;
using namespace osr::replication;

class FuzzStream final : public Stream {
 public:
  FuzzStream(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  Result<size_t> ReadSome(std::span<uint8_t> buf) override {
    size_t n = std::min({buf.size(), size_ - pos_, size_t{1} + (pos_ * 7919) % 4093});
    std::memcpy(buf.data(), data_ + pos_, n);
    pos_ += n;
    return n;
  }
  Status WriteAll(std::span<const struct iovec>) override { return Status::Ok(); }
  using Stream::WriteAll;

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

std::span<const uint8_t> Bytes(const std::string& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

void Check(bool ok) {
  if (!ok) __builtin_trap();
}

void FuzzHello(std::span<const uint8_t> p) {
  auto h = ParseHello(p);
  if (!h.ok()) {
    Check(h.status().code() == Code::kInvalidArgument && !h.status().message().empty());
    return;
  }
  Check(ValidName(h->group) && h->disks.size() <= kHelloDisksMax);
  auto again = ParseHello(Bytes(EncodeHello(*h)));
  Check(again.ok() && again->group == h->group && again->epoch == h->epoch &&
        again->version == h->version && again->lz4 == h->lz4 &&
        again->disks.size() == h->disks.size());
  for (size_t i = 0; i < h->disks.size(); ++i) {
    Check(again->disks[i].name == h->disks[i].name &&
          again->disks[i].size_bytes == h->disks[i].size_bytes);
  }
}

void FuzzHelloOk(std::span<const uint8_t> p) {
  auto h = ParseHelloOk(p);
  if (!h.ok()) return;
  auto again = ParseHelloOk(Bytes(EncodeHelloOk(*h)));
  Check(again.ok() && again->durable_seq == h->durable_seq && again->base_seq == h->base_seq &&
        again->lz4 == h->lz4 && again->initial_sync == h->initial_sync &&
        again->differential == h->differential &&
        again->staged.has_value() == h->staged.has_value());
  if (h->staged) {
    Check(again->staged->from == h->staged->from && again->staged->bytes == h->staged->bytes &&
          again->staged->initial == h->staged->initial &&
          again->staged->end_disk == h->staged->end_disk &&
          again->staged->end_offset == h->staged->end_offset);
  }
}

void FuzzResync(std::span<const uint8_t> p) {
  if (auto b = ParseResyncBegin(p); b.ok()) {
    auto again = ParseResyncBegin(Bytes(EncodeResyncBegin(*b)));
    Check(again.ok() && again->from == b->from && again->initial == b->initial &&
          again->resume_bytes == b->resume_bytes);
  }
  for (const char* what : {"RESYNC_END", "RESYNC_DONE"}) {
    if (auto e = ParseResyncEnd(p, what); e.ok()) {
      auto again = ParseResyncEnd(Bytes(EncodeResyncEnd(*e)), what);
      Check(again.ok() && again->consistent_seq == e->consistent_seq);
    }
  }
  if (auto d = ParseResyncData(p); d.ok()) Check(d->bytes.size() + 12 == p.size());
}

void FuzzError(std::span<const uint8_t> p) {
  PeerError e = ParseError(p);
  Check(ErrorCodeFromNumber(static_cast<uint16_t>(e.code)).has_value());
  Check(e.message.size() <= kErrorMessageBytesMax + 16);
  PeerError again = ParseError(Bytes(EncodeError(e)));
  Check(again.code == e.code);
}

void FuzzFrames(const uint8_t* data, size_t size) {
  FuzzStream s(data, size);
  for (int i = 0; i < 64; ++i) {
    auto f = ReadFrame(s);
    if (!f.ok()) return;
    switch (f->type) {
      case FrameType::kHello:
        FuzzHello(f->payload);
        break;
      case FrameType::kHelloOk:
        FuzzHelloOk(f->payload);
        break;
      case FrameType::kAck:
        (void)DecodeU64(f->payload);  // any value, or an error for a wrong length
        break;
      case FrameType::kError:
        FuzzError(f->payload);
        break;
      default:
        FuzzResync(f->payload);
        break;
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  std::span<const uint8_t> p(data + 1, size - 1);
  switch (data[0] % 6) {
    case 0:
      FuzzHello(p);
      break;
    case 1:
      FuzzHelloOk(p);
      break;
    case 2:
      FuzzResync(p);
      break;
    case 3:
      FuzzError(p);
      break;
    case 4:
      FuzzFrames(data + 1, size - 1);
      break;
    default:
      // The same payload through every parser.
      FuzzHello(p);
      FuzzHelloOk(p);
      FuzzResync(p);
      FuzzError(p);
      break;
  }
  return 0;
}
