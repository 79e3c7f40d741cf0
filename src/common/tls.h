// TLS for the replication channel: mutual authentication against a private CA (the
// quickstart makes one; operators bring their own), over OpenSSL. The CA proves that a
// peer is one of the sites; the names in its certificate (PeerIdentity) say which one,
// and the replication ends check that name against the site they expect (DESIGN.md
// invariant 8).
//
// Thread model: a TlsStream may be read by one thread while another writes (the sender
// reads ACKs while it ships records). OpenSSL allows one call on an SSL at a time, so
// the socket is non-blocking and every SSL call runs under ssl_mu_; waiting for the
// socket (poll) happens outside the lock.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

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

// The names in a verified peer certificate.
struct PeerIdentity {
  std::string common_name;             // the subject's CN ("" if it has none)
  std::vector<std::string> dns_names;  // subjectAltName DNS entries
  // Whether the certificate names `name`, as RFC 6125 section 6.4.4 has it: the DNS
  // names of its subjectAltName when it has any, else its CN. Exact comparison (site
  // names are [A-Za-z0-9._-]); no wildcards.
  bool Names(std::string_view name) const;
  // "CN=primary, DNS:primary", for messages (printable ASCII; other bytes as '?').
  std::string Describe() const;
};

// Whether plain TCP to or from `addr` stays on this host: a unix socket, "localhost",
// 127.0.0.0/8 or ::1 (also as ::ffff:127.x.y.z). Names are not resolved: any other
// name is not loopback. Replication without TLS is allowed only there unless a site's
// config says otherwise (replication_insecure).
bool IsLoopback(const ListenAddress& addr);

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
  // The peer certificate's names (after Handshake). kPermissionDenied when there is no
  // verified certificate.
  Result<PeerIdentity> Peer();
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
// `name` signed by it (NAME.pem, NAME.key; CN and subjectAltName DNS:name). Returns the
// files for that name.
Result<TlsFiles> EnsureQuickstartCertificates(const std::string& dir, const std::string& name);

}  // namespace osr
