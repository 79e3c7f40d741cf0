// TLS for the replication channel: mutual authentication against a private CA (the
// quickstart makes one; operators bring their own), over OpenSSL.
//
// Thread model: a TlsStream may be read by one thread while another writes (the sender
// reads ACKs while it ships records). OpenSSL allows one call on an SSL at a time, so
// the socket is non-blocking and every SSL call runs under ssl_mu_; waiting for the
// socket (poll) happens outside the lock.
#pragma once

#include <memory>
#include <mutex>
#include <string>

#include "common/socket.h"

typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_st SSL;

namespace osr {

struct TlsFiles {
  std::string ca;    // PEM: the CA that signs every site's certificate
  std::string cert;  // PEM: this site's certificate
  std::string key;   // PEM: its private key
  bool enabled() const { return !ca.empty(); }
};

class TlsContext {
 public:
  // Loads the files; both ends require a certificate from the peer signed by the CA.
  static Result<std::shared_ptr<TlsContext>> Create(const TlsFiles& files, bool server);
  ~TlsContext();
  // A TLS stream over a connected socket; call Handshake() before using it.
  Result<std::unique_ptr<class TlsStream>> NewStream(Fd fd);

 private:
  TlsContext() = default;
  SSL_CTX* ctx_ = nullptr;
  bool server_ = false;
};

class TlsStream final : public Stream {
 public:
  TlsStream(Fd fd, SSL* ssl, bool server) : fd_(std::move(fd)), ssl_(ssl), server_(server) {}
  ~TlsStream() override;
  // Runs the handshake; the peer must present a certificate signed by the CA.
  // kPermissionDenied when it does not.
  Status Handshake(int timeout_ms);
  Result<size_t> ReadSome(std::span<uint8_t> buf) override;
  Status WriteAll(std::span<const struct iovec> iov) override;
  using Stream::WriteAll;
  void Shutdown() override;
  void ShutdownRead() override;
  void SetReadTimeoutMs(int ms) override { read_timeout_ms_ = ms; }

 private:
  Status Wait(bool for_write, int timeout_ms);
  Fd fd_;
  SSL* ssl_;
  bool server_;
  std::mutex ssl_mu_;  // one SSL call at a time
  int read_timeout_ms_ = 0;
};

// Makes a private CA (ca.pem, ca.key) in `dir` if it has none, and a certificate for
// `name` signed by it (NAME.pem, NAME.key). Returns the files for that name.
Result<TlsFiles> EnsureQuickstartCertificates(const std::string& dir, const std::string& name);

}  // namespace osr
