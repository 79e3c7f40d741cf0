// TLS for the replication channel and NBD (STARTTLS): mutual authentication against a
// private CA (the quickstart makes one; operators bring their own), over OpenSSL. The CA
// proves that a peer is one of the sites; the names in its certificate (PeerIdentity) say
// which one, and the replication ends check that name against the site they expect
// (DESIGN.md invariant 8).
//
// Thread model: a TlsStream may be read by one thread while another writes (the sender
// reads ACKs while it ships records). OpenSSL allows one call on an SSL at a time, so
// the socket is non-blocking and every SSL call runs under ssl_mu_; waiting for the
// socket (poll) happens outside the lock.
#pragma once

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/socket.h"

typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_st SSL;
typedef struct x509_st X509;
struct x509_store_ctx_st;

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

struct TlsOptions {
  // TLS 1.2 as well as 1.3 (the NBD spec requires 1.2 support; replication speaks 1.3 only).
  bool allow_tls12 = false;
  // A server accepts only peers whose certificate's common name (CN) is one of these; the
  // handshake fails otherwise (like qemu-nbd's --tls-authz). Empty: any certificate the
  // CA signed.
  std::vector<std::string> allowed_peer_names;
};

class TlsContext {
 public:
  // Loads the files; both ends require a certificate from the peer signed by the CA.
  // kInvalidArgument when a file cannot be loaded or the key does not match.
  static Result<std::shared_ptr<TlsContext>> Create(const TlsFiles& files, bool server,
                                                    TlsOptions options = {});
  ~TlsContext();
  // A TLS stream over a connected socket; call Handshake() before using it.
  Result<std::unique_ptr<class TlsStream>> NewStream(Fd fd);

 private:
  TlsContext() = default;
  static int VerifyPeer(int preverify_ok, struct x509_store_ctx_st* store);
  SSL_CTX* ctx_ = nullptr;
  bool server_ = false;
  std::vector<std::string> allowed_peer_names_;
};

class TlsStream final : public Stream {
 public:
  TlsStream(Fd fd, SSL* ssl, bool server) : fd_(std::move(fd)), ssl_(ssl), server_(server) {}
  ~TlsStream() override;
  // Runs the handshake; the peer must present a certificate signed by the CA (and, on a
  // server with allowed_peer_names, named by one of them). kPermissionDenied when it does
  // not; kUnavailable when the peer leaves or `timeout_ms` passes first.
  Status Handshake(int timeout_ms);
  // The peer certificate's names (after Handshake). kPermissionDenied when there is no
  // verified certificate.
  Result<PeerIdentity> Peer();
  // The common name (CN) of the peer's certificate, after the handshake ("" if none).
  std::string PeerName() const;
  Result<size_t> ReadSome(std::span<uint8_t> buf) override;
  Result<std::optional<size_t>> TryReadSome(std::span<uint8_t> buf) override;
  Status WriteAll(std::span<const struct iovec> iov) override;
  using Stream::WriteAll;
  void Shutdown() override;
  void ShutdownRead() override;
  void SetReadTimeoutMs(int ms) override { read_timeout_ms_ = ms; }

 private:
  Status Wait(bool for_write, int timeout_ms);
  // One SSL_read; nullopt when it would block (`wait_for` then says for what).
  Result<std::optional<size_t>> ReadOnce(std::span<uint8_t> buf, bool* wait_for_write);
  Fd fd_;
  SSL* ssl_;
  bool server_;
  mutable std::mutex ssl_mu_;  // one SSL call at a time
  int read_timeout_ms_ = 0;
};

// Makes a private CA (ca.pem, ca.key) in `dir` if it has none, and a certificate for
// `name` signed by it (NAME.pem, NAME.key). Returns the files for that name.
// Certificates carry what GnuTLS peers (QEMU, libnbd) check: key usage, extended key usage
// serverAuth + clientAuth, and subject alternative names DNS:NAME, DNS:localhost,
// IP:127.0.0.1 and IP:::1 (a client checks the host it dialled against them); the DNS
// name is also where replication peers look for the site's name (PeerIdentity::Names).
// A certificate made by an older osr without them is made again (same CA).
// The CN of a certificate's subject, as UTF-8; "" when it has none or when it holds a
// NUL (which would compare equal to a shorter name in C code).
std::string CertificateCommonName(X509* cert);

Result<TlsFiles> EnsureQuickstartCertificates(const std::string& dir, const std::string& name);

// The layout GnuTLS users read from one directory (QEMU's tls-creds-x509 dir=, libnbd's
// tls-certificates=, qemu-nbd --tls-creds): ca-cert.pem and either client-cert.pem +
// client-key.pem or server-cert.pem + server-key.pem.
enum class CertDirRole { kClient, kServer };
// Writes such a directory at `out_dir` (0700; the key 0600) for `name`, with a certificate
// from the CA in `ca_dir` (made as EnsureQuickstartCertificates does). Files already in
// `out_dir` are replaced. Returns out_dir.
Result<std::string> WriteCertificateDir(const std::string& ca_dir, const std::string& name,
                                        const std::string& out_dir, CertDirRole role);

}  // namespace osr
