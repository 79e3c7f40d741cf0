#include "common/tls.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>

namespace osr {

namespace {

std::string SslError(const std::string& what) {
  unsigned long e = ERR_get_error();
  char buf[256] = "unknown";
  if (e != 0) ERR_error_string_n(e, buf, sizeof buf);
  ERR_clear_error();
  return fmt::format("{}: {}", what, buf);
}

}  // namespace

std::string CertificateCommonName(X509* x) {
  if (x == nullptr) return {};
  X509_NAME* name = X509_get_subject_name(x);
  int i = X509_NAME_get_index_by_NID(name, NID_commonName, -1);
  if (i < 0) return {};
  unsigned char* utf8 = nullptr;
  int n = ASN1_STRING_to_UTF8(&utf8, X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, i)));
  if (n < 0) return {};
  std::string out(reinterpret_cast<char*>(utf8), static_cast<size_t>(n));
  OPENSSL_free(utf8);
  // A CN with a NUL inside would compare equal to a shorter allowed name in C code.
  if (out.find('\0') != std::string::npos) return {};
  return out;
}

bool PeerIdentity::Names(std::string_view name) const {
  if (name.empty()) return false;
  if (!dns_names.empty()) {
    for (auto& d : dns_names) {
      if (d == name) return true;
    }
    return false;
  }
  return common_name == name;
}

std::string PeerIdentity::Describe() const {
  // Printable ASCII only: the text goes into logs and JSON answers.
  auto printable = [](const std::string& s) {
    std::string out;
    for (char c : s.substr(0, 256)) out.push_back(c >= 0x20 && c < 0x7f ? c : '?');
    return out;
  };
  std::string out = "CN=" + printable(common_name);
  for (size_t i = 0; i < dns_names.size() && i < 16; ++i) out += ", DNS:" + printable(dns_names[i]);
  return out;
}

bool IsLoopback(const ListenAddress& addr) {
  return addr.kind == ListenAddress::Kind::kUnix || IsLoopbackHost(addr.host);
}

int TlsContext::VerifyPeer(int preverify_ok, X509_STORE_CTX* store) {
  if (preverify_ok != 1) return preverify_ok;                // the chain to the CA failed already
  if (X509_STORE_CTX_get_error_depth(store) != 0) return 1;  // only the peer's own certificate
  auto* ssl =
      static_cast<SSL*>(X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx()));
  auto* self = static_cast<TlsContext*>(SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl)));
  if (self == nullptr || self->allowed_peer_names_.empty()) return 1;
  std::string cn = CertificateCommonName(X509_STORE_CTX_get_current_cert(store));
  for (const auto& allowed : self->allowed_peer_names_) {
    if (!cn.empty() && cn == allowed) return 1;
  }
  X509_STORE_CTX_set_error(store, X509_V_ERR_APPLICATION_VERIFICATION);
  return 0;
}

Result<std::shared_ptr<TlsContext>> TlsContext::Create(const TlsFiles& files, bool server,
                                                       TlsOptions options) {
  // OpenSSL writes to the socket with write(): a peer that went away would raise SIGPIPE
  // and kill the process. osr handles that as an error instead.
  ::signal(SIGPIPE, SIG_IGN);
  std::shared_ptr<TlsContext> c(new TlsContext());
  c->server_ = server;
  c->ctx_ = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
  if (c->ctx_ == nullptr) return Status(Code::kInternal, SslError("SSL_CTX_new"));
  SSL_CTX_set_min_proto_version(c->ctx_, options.allow_tls12 ? TLS1_2_VERSION : TLS1_3_VERSION);
  // No session resumption: every connection proves its certificate again.
  SSL_CTX_set_session_cache_mode(c->ctx_, SSL_SESS_CACHE_OFF);
  SSL_CTX_set_num_tickets(c->ctx_, 0);
  c->allowed_peer_names_ = std::move(options.allowed_peer_names);
  SSL_CTX_set_app_data(c->ctx_, c.get());
  if (SSL_CTX_use_certificate_chain_file(c->ctx_, files.cert.c_str()) != 1) {
    return InvalidArgument(SslError("certificate " + files.cert));
  }
  if (SSL_CTX_use_PrivateKey_file(c->ctx_, files.key.c_str(), SSL_FILETYPE_PEM) != 1) {
    return InvalidArgument(SslError("key " + files.key));
  }
  if (SSL_CTX_check_private_key(c->ctx_) != 1) {
    return InvalidArgument(SslError("key " + files.key + " does not match " + files.cert));
  }
  if (SSL_CTX_load_verify_locations(c->ctx_, files.ca.c_str(), nullptr) != 1) {
    return InvalidArgument(SslError("CA " + files.ca));
  }
  // Mutual authentication: each side needs the other's certificate, signed by the CA.
  SSL_CTX_set_verify(c->ctx_, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT,
                     &TlsContext::VerifyPeer);
  return c;
}

TlsContext::~TlsContext() {
  SSL_CTX_free(ctx_);
}

Result<std::unique_ptr<TlsStream>> TlsContext::NewStream(Fd fd) {
  int flags = ::fcntl(fd.get(), F_GETFL);
  ::fcntl(fd.get(), F_SETFL, flags | O_NONBLOCK);
  SSL* ssl = SSL_new(ctx_);
  if (ssl == nullptr) return Status(Code::kInternal, SslError("SSL_new"));
  SSL_set_fd(ssl, fd.get());
  return std::make_unique<TlsStream>(std::move(fd), ssl, server_);
}

Status TlsStream::Handshake(int timeout_ms) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    int rc, err;
    {
      std::lock_guard lock(ssl_mu_);
      rc = server_ ? SSL_accept(ssl_) : SSL_connect(ssl_);
      err = rc == 1 ? SSL_ERROR_NONE : SSL_get_error(ssl_, rc);
    }
    if (rc == 1) return Status::Ok();
    if (err != SSL_ERROR_WANT_READ && err != SSL_ERROR_WANT_WRITE) {
      long verify = SSL_get_verify_result(ssl_);
      std::string why = verify == X509_V_ERR_APPLICATION_VERIFICATION
                            ? "the peer's certificate name is not allowed here"
                        : verify != X509_V_OK ? X509_verify_cert_error_string(verify)
                        : err == SSL_ERROR_SYSCALL && ERR_peek_error() == 0
                            ? "the peer closed the connection"
                            : SslError("TLS handshake");
      ERR_clear_error();
      return Status(Code::kPermissionDenied, "TLS handshake refused: " + why);
    }
    int left = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                    deadline - std::chrono::steady_clock::now())
                                    .count());
    if (left <= 0) return Unavailable("TLS handshake timed out");
    struct pollfd p = {fd_.get(), static_cast<short>(err == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT),
                       0};
    if (::poll(&p, 1, left) < 0 && errno != EINTR) return Status::FromErrno(errno, "poll");
    if (p.revents & (POLLHUP | POLLERR))
      return Unavailable("connection closed during TLS handshake");
  }
}

Result<PeerIdentity> TlsStream::Peer() {
  std::lock_guard lock(ssl_mu_);
  X509* x = SSL_get0_peer_certificate(ssl_);
  if (x == nullptr || SSL_get_verify_result(ssl_) != X509_V_OK) {
    return Status(Code::kPermissionDenied, "the peer has no verified certificate");
  }
  PeerIdentity id;
  X509_NAME* subject = X509_get_subject_name(x);
  // The last CN is the most specific one.
  for (int i = -1; (i = X509_NAME_get_index_by_NID(subject, NID_commonName, i)) >= 0;) {
    ASN1_STRING* data = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, i));
    unsigned char* utf8 = nullptr;
    int n = ASN1_STRING_to_UTF8(&utf8, data);
    if (n < 0) continue;
    std::string cn(reinterpret_cast<const char*>(utf8), static_cast<size_t>(n));
    OPENSSL_free(utf8);
    // A NUL inside a name would make it read as another, shorter one.
    id.common_name = cn.find('\0') == std::string::npos ? cn : std::string();
  }
  auto* names =
      static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(x, NID_subject_alt_name, nullptr, nullptr));
  if (names != nullptr) {
    for (int i = 0; i < sk_GENERAL_NAME_num(names); ++i) {
      const GENERAL_NAME* g = sk_GENERAL_NAME_value(names, i);
      if (g->type != GEN_DNS) continue;
      std::string dns(reinterpret_cast<const char*>(ASN1_STRING_get0_data(g->d.dNSName)),
                      static_cast<size_t>(ASN1_STRING_length(g->d.dNSName)));
      if (dns.find('\0') == std::string::npos) id.dns_names.push_back(std::move(dns));
    }
    GENERAL_NAMES_free(names);
  }
  return id;
}

TlsStream::~TlsStream() {
  SSL_free(ssl_);
}

Status TlsStream::Wait(bool for_write, int timeout_ms) {
  struct pollfd p = {fd_.get(), static_cast<short>(for_write ? POLLOUT : POLLIN), 0};
  int rc = ::poll(&p, 1, timeout_ms > 0 ? timeout_ms : -1);
  if (rc == 0) return Unavailable("read timed out");
  if (rc < 0 && errno != EINTR) return Status::FromErrno(errno, "poll");
  return Status::Ok();
}

std::string TlsStream::PeerName() const {
  std::lock_guard lock(ssl_mu_);
  X509* peer = SSL_get0_peer_certificate(ssl_);
  return CertificateCommonName(peer);
}

Result<std::optional<size_t>> TlsStream::ReadOnce(std::span<uint8_t> buf, bool* wait_for_write) {
  int rc, err;
  {
    std::lock_guard lock(ssl_mu_);
    rc = SSL_read(ssl_, buf.data(), static_cast<int>(std::min<size_t>(buf.size(), 1 << 30)));
    err = rc > 0 ? SSL_ERROR_NONE : SSL_get_error(ssl_, rc);
  }
  if (rc > 0) return std::optional<size_t>(static_cast<size_t>(rc));
  if (err == SSL_ERROR_ZERO_RETURN) return std::optional<size_t>(0);
  if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
    *wait_for_write = err == SSL_ERROR_WANT_WRITE;
    return std::optional<size_t>();
  }
  if (err == SSL_ERROR_SYSCALL && ERR_peek_error() == 0) {
    return std::optional<size_t>(0);  // peer left
  }
  return Unavailable(SslError("TLS read"));
}

Result<size_t> TlsStream::ReadSome(std::span<uint8_t> buf) {
  for (;;) {
    bool for_write = false;
    OSR_ASSIGN_OR_RETURN(std::optional<size_t> n, ReadOnce(buf, &for_write));
    if (n.has_value()) return *n;
    OSR_RETURN_IF_ERROR(Wait(for_write, read_timeout_ms_));
  }
}

Result<std::optional<size_t>> TlsStream::TryReadSome(std::span<uint8_t> buf) {
  bool for_write = false;
  return ReadOnce(buf, &for_write);  // the socket is non-blocking: never waits
}

Status TlsStream::WriteAll(std::span<const struct iovec> iov) {
  for (const auto& v : iov) {
    const uint8_t* p = static_cast<const uint8_t*>(v.iov_base);
    size_t left = v.iov_len;
    while (left > 0) {
      int rc, err;
      {
        std::lock_guard lock(ssl_mu_);
        rc = SSL_write(ssl_, p, static_cast<int>(std::min<size_t>(left, 1 << 30)));
        err = rc > 0 ? SSL_ERROR_NONE : SSL_get_error(ssl_, rc);
      }
      if (rc > 0) {
        p += rc;
        left -= static_cast<size_t>(rc);
        continue;
      }
      if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
        OSR_RETURN_IF_ERROR(Wait(err == SSL_ERROR_WANT_WRITE, 0));
        continue;
      }
      return Unavailable(SslError("TLS write"));
    }
  }
  return Status::Ok();
}

void TlsStream::Shutdown() {
  ::shutdown(fd_.get(), SHUT_RDWR);
}
void TlsStream::ShutdownRead() {
  ::shutdown(fd_.get(), SHUT_RD);
}

// ---- quickstart certificates ----------------------------------------------------------

namespace {

struct Pkey {
  EVP_PKEY* p = nullptr;
  ~Pkey() { EVP_PKEY_free(p); }
};
struct Cert {
  X509* x = nullptr;
  ~Cert() { X509_free(x); }
};

Status WritePem(const std::string& path, EVP_PKEY* key, X509* cert) {
  std::FILE* f = std::fopen(path.c_str(), "wx");
  if (f == nullptr) return Status::FromErrno(errno, "create " + path);
  ::fchmod(fileno(f), key ? 0600 : 0644);
  bool ok = key ? PEM_write_PrivateKey(f, key, nullptr, nullptr, 0, nullptr, nullptr) == 1
                : PEM_write_X509(f, cert) == 1;
  std::fclose(f);
  return ok ? Status::Ok() : IoError(SslError("write " + path));
}

void AddExt(X509* x, X509V3_CTX* v3, int nid, const std::string& value) {
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, v3, nid, value.c_str());
  if (ext) {
    X509_add_ext(x, ext, -1);
    X509_EXTENSION_free(ext);
  }
}

// The names a leaf certificate answers to: its own, and this host's loopback addresses.
std::string SubjectAltNames(const std::string& cn) {
  std::string san = "DNS:localhost,IP:127.0.0.1,IP:::1";
  bool dns_ok = !cn.empty() && cn.find_first_not_of(
                                   "abcdefghijklmnopqrstuvwxyz"
                                   "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.") == std::string::npos;
  if (dns_ok && cn != "localhost") san = "DNS:" + cn + "," + san;
  return san;
}

Result<X509*> MakeCert(EVP_PKEY* key, const std::string& cn, X509* issuer, EVP_PKEY* issuer_key,
                       bool ca) {
  X509* x = X509_new();
  X509_set_version(x, 2);
  // A random serial: two certificates of one CA never share one.
  unsigned char serial[16];
  if (RAND_bytes(serial, sizeof serial) != 1) {
    X509_free(x);
    return Status(Code::kInternal, SslError("random serial"));
  }
  serial[0] &= 0x7f;  // positive
  BIGNUM* bn = BN_bin2bn(serial, sizeof serial, nullptr);
  BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(x));
  BN_free(bn);
  X509_gmtime_adj(X509_getm_notBefore(x), -3600);
  X509_gmtime_adj(X509_getm_notAfter(x), 10L * 365 * 24 * 3600);
  X509_set_pubkey(x, key);
  X509_NAME* name = X509_get_subject_name(x);
  X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>("osr quickstart"), -1, -1, 0);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1, 0);
  X509_set_issuer_name(x, issuer ? X509_get_subject_name(issuer) : name);
  X509V3_CTX v3;
  X509V3_set_ctx(&v3, issuer ? issuer : x, x, nullptr, nullptr, 0);
  AddExt(x, &v3, NID_basic_constraints, ca ? "critical,CA:TRUE" : "critical,CA:FALSE");
  AddExt(x, &v3, NID_subject_key_identifier, "hash");
  if (ca) {
    AddExt(x, &v3, NID_key_usage, "critical,keyCertSign,cRLSign");
  } else {
    // GnuTLS (QEMU) wants digitalSignature and keyEncipherment on a leaf that has a key
    // usage at all; the extended usages let one certificate serve as client and server.
    AddExt(x, &v3, NID_authority_key_identifier, "keyid:always");
    AddExt(x, &v3, NID_key_usage, "critical,digitalSignature,keyEncipherment");
    AddExt(x, &v3, NID_ext_key_usage, "serverAuth,clientAuth");
    AddExt(x, &v3, NID_subject_alt_name, SubjectAltNames(cn));
  }
  if (X509_sign(x, issuer_key ? issuer_key : key, EVP_sha256()) == 0) {
    X509_free(x);
    return Status(Code::kInternal, SslError("sign certificate"));
  }
  return x;
}

Result<EVP_PKEY*> ReadKey(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "r");
  if (!f) return Status::FromErrno(errno, "open " + path);
  EVP_PKEY* k = PEM_read_PrivateKey(f, nullptr, nullptr, nullptr);
  std::fclose(f);
  if (!k) return Corruption(SslError("read " + path));
  return k;
}

Result<X509*> ReadCert(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "r");
  if (!f) return Status::FromErrno(errno, "open " + path);
  X509* x = PEM_read_X509(f, nullptr, nullptr, nullptr);
  std::fclose(f);
  if (!x) return Corruption(SslError("read " + path));
  return x;
}

}  // namespace

Result<TlsFiles> EnsureQuickstartCertificates(const std::string& dir, const std::string& name) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return Status::FromErrno(ec.value(), "create " + dir);
  std::string ca_pem = dir + "/ca.pem", ca_key = dir + "/ca.key";
  if (!std::filesystem::exists(ca_pem)) {
    Pkey k;
    k.p = EVP_EC_gen("P-256");
    if (!k.p) return Status(Code::kInternal, SslError("generate CA key"));
    OSR_ASSIGN_OR_RETURN(X509 * x, MakeCert(k.p, "osr quickstart CA", nullptr, nullptr, true));
    Cert c;
    c.x = x;
    OSR_RETURN_IF_ERROR(WritePem(ca_key, k.p, nullptr));
    OSR_RETURN_IF_ERROR(WritePem(ca_pem, nullptr, c.x));
  }
  TlsFiles f{ca_pem, dir + "/" + name + ".pem", dir + "/" + name + ".key"};
  if (std::filesystem::exists(f.cert)) {
    // Made by an older osr, without the names and usages GnuTLS peers check: make again.
    OSR_ASSIGN_OR_RETURN(X509 * old, ReadCert(f.cert));
    bool has_san = X509_get_ext_by_NID(old, NID_subject_alt_name, -1) >= 0;
    X509_free(old);
    if (!has_san) {
      std::filesystem::remove(f.cert, ec);
      std::filesystem::remove(f.key, ec);
    }
  }
  if (!std::filesystem::exists(f.cert)) {
    Pkey cak, k;
    Cert cac;
    OSR_ASSIGN_OR_RETURN(cak.p, ReadKey(ca_key));
    OSR_ASSIGN_OR_RETURN(cac.x, ReadCert(ca_pem));
    k.p = EVP_EC_gen("P-256");
    if (!k.p) return Status(Code::kInternal, SslError("generate key"));
    OSR_ASSIGN_OR_RETURN(X509 * x, MakeCert(k.p, name, cac.x, cak.p, false));
    Cert c;
    c.x = x;
    OSR_RETURN_IF_ERROR(WritePem(f.key, k.p, nullptr));
    OSR_RETURN_IF_ERROR(WritePem(f.cert, nullptr, c.x));
  }
  return f;
}

namespace {

// Copies `from` to `to` with `mode`, replacing `to` atomically.
Status CopyFileWithMode(const std::string& from, const std::string& to, mode_t mode) {
  std::FILE* in = std::fopen(from.c_str(), "r");
  if (in == nullptr) return Status::FromErrno(errno, "open " + from);
  std::string data;
  char buf[4096];
  for (size_t n; (n = std::fread(buf, 1, sizeof buf, in)) > 0;) data.append(buf, n);
  bool read_ok = !std::ferror(in);
  std::fclose(in);
  if (!read_ok) return IoError("read " + from);
  std::string tmp = to + ".tmp";
  std::filesystem::remove(tmp);
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
  if (fd < 0) return Status::FromErrno(errno, "create " + tmp);
  ::fchmod(fd, mode);
  bool ok = ::write(fd, data.data(), data.size()) == static_cast<ssize_t>(data.size());
  ok = ::fsync(fd) == 0 && ok;
  ::close(fd);
  if (!ok) return IoError("write " + tmp);
  if (::rename(tmp.c_str(), to.c_str()) != 0) return Status::FromErrno(errno, "rename " + tmp);
  return Status::Ok();
}

}  // namespace

Result<std::string> WriteCertificateDir(const std::string& ca_dir, const std::string& name,
                                        const std::string& out_dir, CertDirRole role) {
  OSR_ASSIGN_OR_RETURN(TlsFiles f, EnsureQuickstartCertificates(ca_dir, name));
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) return Status::FromErrno(ec.value(), "create " + out_dir);
  if (::chmod(out_dir.c_str(), 0700) != 0) return Status::FromErrno(errno, "chmod " + out_dir);
  std::string prefix = role == CertDirRole::kClient ? "client" : "server";
  OSR_RETURN_IF_ERROR(CopyFileWithMode(f.ca, out_dir + "/ca-cert.pem", 0644));
  OSR_RETURN_IF_ERROR(CopyFileWithMode(f.cert, out_dir + "/" + prefix + "-cert.pem", 0644));
  OSR_RETURN_IF_ERROR(CopyFileWithMode(f.key, out_dir + "/" + prefix + "-key.pem", 0600));
  return out_dir;
}

}  // namespace osr
