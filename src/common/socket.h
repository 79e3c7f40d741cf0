// Sockets: listening, accepting and byte streams over TCP and unix sockets.
//
// Thread model: a Stream may be read by one thread while other threads write to it,
// as long as writers serialise among themselves (the NBD session holds a send mutex).
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/file.h"
#include "common/status.h"

namespace osr {

// A byte stream: a connected socket in production, memory in tests and fuzzing.
class Stream {
 public:
  virtual ~Stream() = default;
  // Reads between 1 and buf.size() bytes; returns 0 once the peer has closed.
  virtual Result<size_t> ReadSome(std::span<uint8_t> buf) = 0;
  // Like ReadSome, but returns nullopt at once when no byte is ready.
  virtual Result<std::optional<size_t>> TryReadSome(std::span<uint8_t> buf) {
    OSR_ASSIGN_OR_RETURN(size_t n, ReadSome(buf));
    return std::optional<size_t>(n);
  }
  // Writes every byte of every iovec.
  virtual Status WriteAll(std::span<const struct iovec> iov) = 0;
  // Reads exactly buf.size() bytes; kUnavailable if the peer closes first.
  Status ReadFull(std::span<uint8_t> buf);
  Status WriteAll(std::span<const uint8_t> data) {
    struct iovec v {
      const_cast<uint8_t*>(data.data()), data.size()
    };
    return WriteAll(std::span<const struct iovec>(&v, 1));
  }
  // Ends the stream both ways: the peer sees the end at once.
  virtual void Shutdown() {}
  // Makes blocked and future reads see the end; writes still work (a stopping server
  // answers what it has read).
  virtual void ShutdownRead() {}
  // A read that waits longer than this fails with kUnavailable; 0 = wait forever.
  virtual void SetReadTimeoutMs(int ms) {}
};

class SocketStream final : public Stream {
 public:
  explicit SocketStream(Fd fd) : fd_(std::move(fd)) {}
  Result<size_t> ReadSome(std::span<uint8_t> buf) override;
  Result<std::optional<size_t>> TryReadSome(std::span<uint8_t> buf) override;
  Status WriteAll(std::span<const struct iovec> iov) override;
  using Stream::WriteAll;
  void Shutdown() override;
  void ShutdownRead() override;
  void SetReadTimeoutMs(int ms) override;
  int fd() const { return fd_.get(); }

 private:
  Fd fd_;
};

struct ListenAddress {
  enum class Kind { kTcp, kUnix } kind = Kind::kTcp;
  std::string host;   // kTcp
  uint16_t port = 0;  // kTcp; 0 = any free port
  std::string path;   // kUnix
};

// Whether `host` (an address literal, IPv6 with or without brackets, or "localhost") is
// this machine's loopback: 127.0.0.0/8, ::1, ::ffff:127.0.0.0/104. Names are not
// resolved: any name but localhost is not loopback. Plain-text listeners and peers of
// osr are allowed only there unless a config says otherwise (docs/security.md).
bool IsLoopbackHost(std::string_view host);

// "HOST:PORT", "[::1]:PORT" or ":PORT".
Result<ListenAddress> ParseHostPort(const std::string& text, uint16_t default_port);

class Listener {
 public:
  static Result<Listener> Listen(const ListenAddress& addr);
  Listener(Listener&&) = default;
  Listener& operator=(Listener&&) = default;
  ~Listener();

  int fd() const { return fd_.get(); }
  const ListenAddress& address() const { return bound_; }  // with the real port
  // Accepts one connection (TCP_NODELAY set on TCP); kUnavailable on a transient failure.
  Result<Fd> Accept();

 private:
  Listener() = default;
  Fd fd_;
  ListenAddress bound_;
};

// Connects to a TCP address or a unix socket (for tools and tests).
Result<Fd> Connect(const ListenAddress& addr);

// Socket options for an HTTP listener (cpp-httplib's set_socket_options): SO_REUSEADDR
// only. cpp-httplib's default adds SO_REUSEPORT, with which a second daemon started on the
// same port binds too and the kernel splits the requests between them.
void ExclusiveListenerOptions(int fd);

}  // namespace osr
