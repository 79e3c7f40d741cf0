#include "common/https.h"

#include <fmt/format.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include <algorithm>

namespace osr {

namespace {

std::string LastSslError() {
  unsigned long e = ERR_get_error();
  char buf[256] = "unknown";
  if (e != 0) ERR_error_string_n(e, buf, sizeof buf);
  ERR_clear_error();
  return buf;
}

// The names a context accepts as its peer, kept with the SSL_CTX (ex_data), freed with it.
int NamesIndex() {
  static int index = SSL_CTX_get_ex_new_index(
      0, nullptr, nullptr, nullptr, [](void*, void* ptr, CRYPTO_EX_DATA*, int, long, void*) {
        delete static_cast<std::vector<std::string>*>(ptr);
      });
  return index;
}

// At depth 0 (the peer's own certificate), once the chain verified: its CN must be one
// of the names kept with the context.
int VerifyPeerName(int preverify_ok, X509_STORE_CTX* store) {
  if (!preverify_ok) return 0;
  if (X509_STORE_CTX_get_error_depth(store) != 0) return 1;
  auto* ssl =
      static_cast<SSL*>(X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx()));
  if (ssl == nullptr) return 0;
  auto* names = static_cast<std::vector<std::string>*>(
      SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), NamesIndex()));
  if (names == nullptr || names->empty()) return 1;
  std::string cn = CertificateCommonName(X509_STORE_CTX_get_current_cert(store));
  if (std::find(names->begin(), names->end(), cn) != names->end()) return 1;
  X509_STORE_CTX_set_error(store, X509_V_ERR_APPLICATION_VERIFICATION);
  return 0;
}

Status LoadOwn(SSL_CTX* ctx, const TlsFiles& files) {
  SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
  if (SSL_CTX_use_certificate_chain_file(ctx, files.cert.c_str()) != 1) {
    return InvalidArgument(fmt::format("certificate {}: {}", files.cert, LastSslError()));
  }
  if (SSL_CTX_use_PrivateKey_file(ctx, files.key.c_str(), SSL_FILETYPE_PEM) != 1) {
    return InvalidArgument(fmt::format("key {}: {}", files.key, LastSslError()));
  }
  if (SSL_CTX_check_private_key(ctx) != 1) {
    return InvalidArgument(fmt::format("key {} does not match {}", files.key, files.cert));
  }
  return Status::Ok();
}

Status LoadPeerCheck(SSL_CTX* ctx, const TlsFiles& files, std::vector<std::string> names,
                     int mode) {
  if (SSL_CTX_load_verify_locations(ctx, files.ca.c_str(), nullptr) != 1) {
    return InvalidArgument(fmt::format("CA {}: {}", files.ca, LastSslError()));
  }
  SSL_CTX_set_ex_data(ctx, NamesIndex(), new std::vector<std::string>(std::move(names)));
  SSL_CTX_set_verify(ctx, mode, VerifyPeerName);
  return Status::Ok();
}

}  // namespace

Status ConfigureServerTls(SSL_CTX* ctx, const TlsFiles& files,
                          const std::vector<std::string>& peer_names) {
  OSR_RETURN_IF_ERROR(LoadOwn(ctx, files));
  if (files.ca.empty()) {
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, nullptr);
    return Status::Ok();
  }
  return LoadPeerCheck(ctx, files, peer_names, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT);
}

Status ConfigureClientTls(SSL_CTX* ctx, const TlsFiles& files,
                          const std::string& expected_peer_name) {
  if (!files.cert.empty()) OSR_RETURN_IF_ERROR(LoadOwn(ctx, files));
  SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
  std::vector<std::string> names;
  if (!expected_peer_name.empty()) names.push_back(expected_peer_name);
  return LoadPeerCheck(ctx, files, std::move(names), SSL_VERIFY_PEER);
}

std::string PeerCommonName(const SSL* ssl) {
  if (ssl == nullptr) return {};
  X509* cert = SSL_get1_peer_certificate(ssl);
  std::string cn = CertificateCommonName(cert);
  X509_free(cert);
  return cn;
}

}  // namespace osr
