#include "common/tls.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>

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
  if (addr.kind == ListenAddress::Kind::kUnix) return true;
  std::string host = addr.host;
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  if (host == "localhost" || host == "localhost.") return true;
  in_addr v4;
  if (::inet_pton(AF_INET, host.c_str(), &v4) == 1) {
    return (ntohl(v4.s_addr) >> 24) == 127;
  }
  in6_addr v6;
  if (::inet_pton(AF_INET6, host.c_str(), &v6) == 1) {
    if (IN6_IS_ADDR_LOOPBACK(&v6)) return true;
    return IN6_IS_ADDR_V4MAPPED(&v6) && v6.s6_addr[12] == 127;
  }
  return false;
}

Result<std::shared_ptr<TlsContext>> TlsContext::Create(const TlsFiles& files, bool server) {
  // OpenSSL writes to the socket with write(): a peer that went away would raise SIGPIPE
  // and kill the process. osr handles that as an error instead.
  ::signal(SIGPIPE, SIG_IGN);
  std::shared_ptr<TlsContext> c(new TlsContext());
  c->server_ = server;
  c->ctx_ = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
  if (c->ctx_ == nullptr) return Status(Code::kInternal, SslError("SSL_CTX_new"));
  SSL_CTX_set_min_proto_version(c->ctx_, TLS1_3_VERSION);
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
  SSL_CTX_set_verify(c->ctx_, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
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
      std::string why =
          verify != X509_V_OK ? X509_verify_cert_error_string(verify) : SslError("TLS handshake");
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

Result<size_t> TlsStream::ReadSome(std::span<uint8_t> buf) {
  for (;;) {
    int rc, err;
    {
      std::lock_guard lock(ssl_mu_);
      rc = SSL_read(ssl_, buf.data(), static_cast<int>(std::min<size_t>(buf.size(), 1 << 30)));
      err = rc > 0 ? SSL_ERROR_NONE : SSL_get_error(ssl_, rc);
    }
    if (rc > 0) return static_cast<size_t>(rc);
    if (err == SSL_ERROR_ZERO_RETURN) return size_t{0};
    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
      OSR_RETURN_IF_ERROR(Wait(err == SSL_ERROR_WANT_WRITE, read_timeout_ms_));
      continue;
    }
    if (err == SSL_ERROR_SYSCALL && ERR_peek_error() == 0) return size_t{0};  // peer left
    return Unavailable(SslError("TLS read"));
  }
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

Result<X509*> MakeCert(EVP_PKEY* key, const std::string& cn, X509* issuer, EVP_PKEY* issuer_key,
                       bool ca) {
  X509* x = X509_new();
  X509_set_version(x, 2);
  ASN1_INTEGER_set(X509_get_serialNumber(x),
                   static_cast<long>(std::time(nullptr)) ^ static_cast<long>(cn.size() << 20));
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
  const char* bc = ca ? "critical,CA:TRUE" : "critical,CA:FALSE";
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &v3, NID_basic_constraints, bc);
  if (ext) {
    X509_add_ext(x, ext, -1);
    X509_EXTENSION_free(ext);
  }
  if (!ca) {
    ext = X509V3_EXT_conf_nid(nullptr, &v3, NID_ext_key_usage, "serverAuth,clientAuth");
    if (ext) {
      X509_add_ext(x, ext, -1);
      X509_EXTENSION_free(ext);
    }
    // The site's name, where peers look for it (PeerIdentity::Names).
    std::string san = "DNS:" + cn;
    ext = X509V3_EXT_conf_nid(nullptr, &v3, NID_subject_alt_name, san.c_str());
    if (ext) {
      X509_add_ext(x, ext, -1);
      X509_EXTENSION_free(ext);
    }
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

}  // namespace osr
