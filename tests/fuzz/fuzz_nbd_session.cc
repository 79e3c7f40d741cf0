// libFuzzer target: the fuzz input is everything a client sends — handshake options and
// then transmission requests — to a Session serving a small MemDisk. Whatever the bytes,
// the session must end with a Status (never crash, hang or touch memory it should not).
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

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static nbd::ExportTable* exports = [] {
    auto* t = new nbd::ExportTable();  // lives for the whole fuzzing run
    (void)t->Add({"", "fuzz", std::make_shared<nbd::MemDisk>(1 << 20)});
    (void)t->Add({"ro", "read-only", std::make_shared<nbd::MemDisk>(1 << 16, true)});
    return t;
  }();
  nbd::SessionLimits limits;
  limits.request_bytes_max = 1 << 20;  // keep allocations small under the fuzzer
  limits.payload_discard_bytes_max = 2 << 20;
  limits.option_discard_bytes_max = 1 << 20;
  nbd::Session session(std::make_unique<FuzzStream>(data, size), exports, limits, "fuzz");
  (void)session.Run();
  return 0;
}
