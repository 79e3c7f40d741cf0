#include "common/socket.h"

#include <arpa/inet.h>
#include <fmt/format.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <charconv>
#include <cstring>

namespace osr {

Status Stream::ReadFull(std::span<uint8_t> buf) {
  size_t done = 0;
  while (done < buf.size()) {
    OSR_ASSIGN_OR_RETURN(size_t n, ReadSome(buf.subspan(done)));
    if (n == 0) return Unavailable("connection closed by peer");
    done += n;
  }
  return Status::Ok();
}

Result<size_t> SocketStream::ReadSome(std::span<uint8_t> buf) {
  for (;;) {
    ssize_t n = ::recv(fd_.get(), buf.data(), buf.size(), 0);
    if (n >= 0) return static_cast<size_t>(n);
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return Unavailable("read timed out");
    return Status::FromErrno(errno, "recv");
  }
}

Result<std::optional<size_t>> SocketStream::TryReadSome(std::span<uint8_t> buf) {
  for (;;) {
    ssize_t n = ::recv(fd_.get(), buf.data(), buf.size(), MSG_DONTWAIT);
    if (n >= 0) return std::optional<size_t>(static_cast<size_t>(n));
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return std::optional<size_t>();
    return Status::FromErrno(errno, "recv");
  }
}

Status SocketStream::WriteAll(std::span<const struct iovec> iov_in) {
  constexpr size_t kIovOnStack = 64;
  struct iovec stack[kIovOnStack];
  std::vector<struct iovec> heap;
  struct iovec* iov = stack;
  if (iov_in.size() > kIovOnStack) {
    heap.assign(iov_in.begin(), iov_in.end());
    iov = heap.data();
  } else {
    std::copy(iov_in.begin(), iov_in.end(), stack);
  }
  size_t cnt = iov_in.size();
  while (cnt > 0) {
    struct msghdr msg {};
    msg.msg_iov = iov;
    msg.msg_iovlen = std::min<size_t>(cnt, IOV_MAX);
    ssize_t n = ::sendmsg(fd_.get(), &msg, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "send");
    }
    size_t left = static_cast<size_t>(n);
    while (cnt > 0 && left >= iov->iov_len) {
      left -= iov->iov_len;
      ++iov;
      --cnt;
    }
    if (cnt > 0) {
      iov->iov_base = static_cast<char*>(iov->iov_base) + left;
      iov->iov_len -= left;
    }
  }
  return Status::Ok();
}

void SocketStream::ShutdownRead() {
  ::shutdown(fd_.get(), SHUT_RD);
}

void SocketStream::Shutdown() {
  ::shutdown(fd_.get(), SHUT_RDWR);
}

void SocketStream::SetReadTimeoutMs(int ms) {
  struct timeval tv {};
  tv.tv_sec = ms / 1000;
  tv.tv_usec = (ms % 1000) * 1000;
  ::setsockopt(fd_.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
}

bool IsLoopbackHost(std::string_view host) {
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  if (host == "localhost" || host == "localhost.") return true;
  std::string h(host);
  in_addr v4{};
  if (::inet_pton(AF_INET, h.c_str(), &v4) == 1) return (ntohl(v4.s_addr) >> 24) == 127;
  in6_addr v6{};
  if (::inet_pton(AF_INET6, h.c_str(), &v6) == 1) {
    if (IN6_IS_ADDR_LOOPBACK(&v6)) return true;
    return IN6_IS_ADDR_V4MAPPED(&v6) && v6.s6_addr[12] == 127;
  }
  return false;
}

Result<ListenAddress> ParseHostPort(const std::string& text, uint16_t default_port) {
  ListenAddress a;
  std::string host = text;
  std::string port;
  if (!text.empty() && text[0] == '[') {
    auto close = text.find(']');
    if (close == std::string::npos) return InvalidArgument("bad address '" + text + "'");
    host = text.substr(1, close - 1);
    if (close + 1 < text.size()) {
      if (text[close + 1] != ':') return InvalidArgument("bad address '" + text + "'");
      port = text.substr(close + 2);
    }
  } else if (auto colon = text.rfind(':'); colon != std::string::npos) {
    host = text.substr(0, colon);
    port = text.substr(colon + 1);
  }
  if (host.empty()) host = "127.0.0.1";
  a.host = host;
  a.port = default_port;
  if (!port.empty()) {
    unsigned v = 0;
    auto [p, ec] = std::from_chars(port.data(), port.data() + port.size(), v);
    if (ec != std::errc() || p != port.data() + port.size() || v > 65535) {
      return InvalidArgument("bad port in '" + text + "'");
    }
    a.port = static_cast<uint16_t>(v);
  }
  return a;
}

Listener::~Listener() {
  if (fd_.valid() && bound_.kind == ListenAddress::Kind::kUnix) ::unlink(bound_.path.c_str());
}

namespace {

Result<struct sockaddr_un> UnixAddr(const std::string& path) {
  struct sockaddr_un sun {};
  sun.sun_family = AF_UNIX;
  if (path.size() >= sizeof sun.sun_path) {
    return InvalidArgument(fmt::format("unix socket path too long ({} bytes, max {}): {}",
                                       path.size(), sizeof sun.sun_path - 1, path));
  }
  std::memcpy(sun.sun_path, path.c_str(), path.size() + 1);
  return sun;
}

Result<struct addrinfo*> Resolve(const ListenAddress& addr, bool passive) {
  struct addrinfo hints {};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = (passive ? AI_PASSIVE : 0) | AI_NUMERICSERV;
  struct addrinfo* res = nullptr;
  std::string port = std::to_string(addr.port);
  int rc = ::getaddrinfo(addr.host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0) {
    return InvalidArgument(fmt::format("cannot resolve '{}': {}", addr.host, gai_strerror(rc)));
  }
  return res;
}

void SetNoDelay(int fd) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

}  // namespace

Result<Listener> Listener::Listen(const ListenAddress& addr) {
  Listener l;
  l.bound_ = addr;
  if (addr.kind == ListenAddress::Kind::kUnix) {
    OSR_ASSIGN_OR_RETURN(struct sockaddr_un sun, UnixAddr(addr.path));
    struct stat st {};
    if (::lstat(addr.path.c_str(), &st) == 0) {
      if (!S_ISSOCK(st.st_mode)) {
        return InvalidArgument(addr.path + " exists and is not a socket; not replacing it");
      }
      ::unlink(addr.path.c_str());  // a stale socket of an earlier run
    }
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return Status::FromErrno(errno, "socket");
    l.fd_ = Fd(fd);
    if (::bind(fd, reinterpret_cast<sockaddr*>(&sun), sizeof sun) != 0) {
      return Status::FromErrno(errno, "bind " + addr.path);
    }
  } else {
    OSR_ASSIGN_OR_RETURN(struct addrinfo * res, Resolve(addr, true));
    Status last = InvalidArgument("no address for " + addr.host);
    for (auto* ai = res; ai != nullptr; ai = ai->ai_next) {
      int fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
      if (fd < 0) {
        last = Status::FromErrno(errno, "socket");
        continue;
      }
      Fd owner(fd);
      int one = 1;
      ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
      if (::bind(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
        last = Status::FromErrno(errno, fmt::format("bind {}:{}", addr.host, addr.port));
        continue;
      }
      l.fd_ = std::move(owner);
      break;
    }
    ::freeaddrinfo(res);
    if (!l.fd_.valid()) return last;
    struct sockaddr_storage ss {};
    socklen_t len = sizeof ss;
    ::getsockname(l.fd_.get(), reinterpret_cast<sockaddr*>(&ss), &len);
    if (ss.ss_family == AF_INET) {
      l.bound_.port = ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
    } else if (ss.ss_family == AF_INET6) {
      l.bound_.port = ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port);
    }
  }
  if (::listen(l.fd_.get(), 128) != 0) return Status::FromErrno(errno, "listen");
  return l;
}

Result<Fd> Listener::Accept() {
  int fd = ::accept4(fd_.get(), nullptr, nullptr, SOCK_CLOEXEC);
  if (fd < 0) return Status::FromErrno(errno, "accept");
  if (bound_.kind == ListenAddress::Kind::kTcp) SetNoDelay(fd);
  return Fd(fd);
}

Result<Fd> Connect(const ListenAddress& addr) {
  if (addr.kind == ListenAddress::Kind::kUnix) {
    OSR_ASSIGN_OR_RETURN(struct sockaddr_un sun, UnixAddr(addr.path));
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return Status::FromErrno(errno, "socket");
    Fd owner(fd);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&sun), sizeof sun) != 0) {
      return Status::FromErrno(errno, "connect " + addr.path);
    }
    return owner;
  }
  OSR_ASSIGN_OR_RETURN(struct addrinfo * res, Resolve(addr, false));
  Status last = InvalidArgument("no address for " + addr.host);
  for (auto* ai = res; ai != nullptr; ai = ai->ai_next) {
    int fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) continue;
    Fd owner(fd);
    if (::connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
      last = Status::FromErrno(errno, fmt::format("connect {}:{}", addr.host, addr.port));
      continue;
    }
    SetNoDelay(fd);
    ::freeaddrinfo(res);
    return owner;
  }
  ::freeaddrinfo(res);
  return last;
}

void ExclusiveListenerOptions(int fd) {
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
}

}  // namespace osr
