// libFuzzer target: the fuzz input is everything a client sends — handshake options and
// then transmission requests — to a Session serving a small MemDisk. Whatever the bytes,
// the session must end with a Status (never crash, hang or touch memory it should not).
//
// An input that starts with 'T' (a byte no client flags start with) is sent, without
// that byte, to a TLS-required session whose "TLS" passes the bytes through: the
// STARTTLS path, option refusals before it, and the authz filter after it (the client
// is "fuzz", allowed the exports whose names start with "r"). Its second byte decides
// whether the certificate is refused (odd) or accepted.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>

#include "common/socket.h"
#include "nbd/mem_disk.h"
#include "nbd/session.h"

namespace {

using namespace osr;

class FuzzStream final : public Stream {
 public:
  FuzzStream(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  Result<size_t> ReadSome(std::span<uint8_t> buf) override {
    // Hand out the input in uneven pieces, as a network would.
    size_t n = std::min({buf.size(), size_ - pos_, size_t{1} + (pos_ * 7919) % 97});
    std::memcpy(buf.data(), data_ + pos_, n);
    pos_ += n;
    return n;
  }
  Status WriteAll(std::span<const struct iovec> iov) override {
    for (auto& v : iov) written_ += v.iov_len;  // replies are dropped
    if (written_ > (256u << 20)) return Unavailable("fuzz: too much output");
    return Status::Ok();
  }
  using Stream::WriteAll;

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
  std::atomic<size_t> written_{0};
};

class PassThroughTls final : public nbd::TlsUpgrader {
 public:
  explicit PassThroughTls(bool refuse) : refuse_(refuse) {}
  Result<std::unique_ptr<Stream>> Wrap(std::unique_ptr<Stream> plain) override { return plain; }
  Result<std::string> Handshake(Stream*, int) override {
    if (refuse_) return Status(Code::kPermissionDenied, "fuzz: certificate refused");
    return std::string("fuzz");
  }

 private:
  bool refuse_;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static nbd::ExportTable* exports = [] {
    auto* t = new nbd::ExportTable();  // lives for the whole fuzzing run
    (void)t->Add({"", "fuzz", std::make_shared<nbd::MemDisk>(1 << 20), ""});
    (void)t->Add({"ro", "read-only", std::make_shared<nbd::MemDisk>(1 << 16, true), ""});
    return t;
  }();
  nbd::SessionLimits limits;
  limits.request_bytes_max = 1 << 20;  // keep allocations small under the fuzzer
  limits.payload_discard_bytes_max = 2 << 20;
  limits.option_discard_bytes_max = 1 << 20;
  if (size >= 2 && data[0] == 'T') {
    static const nbd::Authz* authz = new nbd::Authz(std::vector<nbd::AuthzRule>{{"fuzz", {"r"}}});
    PassThroughTls tls(data[1] & 1);
    nbd::SessionSecurity sec{nbd::TlsMode::kRequired, &tls, authz, {}};
    nbd::Session session(std::make_unique<FuzzStream>(data + 2, size - 2), exports, limits, "fuzz",
                         sec);
    (void)session.Run();
    return 0;
  }
  nbd::Session session(std::make_unique<FuzzStream>(data, size), exports, limits, "fuzz");
  (void)session.Run();
  return 0;
}
