#include "vault/site_client.h"

#include <fmt/format.h>
#include <httplib.h>
#include <spdlog/spdlog.h>

#include "common/https.h"
#include "common/json_in.h"

namespace osr::vault {

using nlohmann::json;

namespace {

Code CodeFromHttp(int status) {
  switch (status) {
    case 400:
      return Code::kInvalidArgument;
    case 403:
      return Code::kPermissionDenied;
    case 404:
      return Code::kNotFound;
    case 409:
      return Code::kAlreadyExists;
    case 501:
      return Code::kNotSupported;
    case 503:
      return Code::kUnavailable;
    default:
      return Code::kInternal;
  }
}

// What a site said when it refused a call, fit to show to an operator: the message of
// its JSON error (one line, at most 300 characters), never its raw body, which a
// misconfigured or hostile endpoint could fill with anything.
// The code a site's error body names (its "error.code", CodeName), else the HTTP
// status's: 409 is both "already exists" and "failed precondition" (quarantined).
Code SiteErrorCode(int status, const std::string& body) {
  auto j = json_in::ParseObject(body, "answer", 64 << 10, 8);
  if (j.ok()) {
    json_in::Fields f(*j);
    if (const json* e = f.Object("error")) {
      std::string name = json_in::Fields(*e).String("code", "");
      if (auto code = CodeFromName(name); code && *code != Code::kOk) return *code;
    }
  }
  return CodeFromHttp(status);
}

std::string SiteErrorMessage(int status, const std::string& body) {
  auto j = json_in::ParseObject(body, "answer", 64 << 10, 8);
  std::string msg;
  if (j.ok()) {
    json_in::Fields f(*j);
    if (const json* e = f.Object("error")) msg = json_in::Fields(*e).String("message", "");
  }
  if (msg.empty()) return fmt::format("HTTP {}", status);
  for (char& c : msg) {
    if (static_cast<unsigned char>(c) < 0x20) c = ' ';
  }
  // Long enough for a quarantine's reason and action (docs/operations.md), bounded.
  if (msg.size() > 1000) msg = msg.substr(0, 1000) + "...";
  return msg;
}

}  // namespace

Result<int64_t> SiteClient::LeaseTokenOfCall(const std::string& method,
                                             const std::string& path) const {
  const LeaseFence* fence = FenceScope::Current();
  if (fence == nullptr) return int64_t{0};
  if (method != "GET" && fence->lost()) {
    return Status(Code::kFailedPrecondition,
                  fmt::format("fenced: this vault's lease term (token {}) has ended: {} {} was "
                              "not sent to site {} — another vault leads now",
                              fence->token(), method, path, site_.name));
  }
  return fence->token();
}

Result<std::pair<int, std::string>> SiteClient::Exchange(const std::string& method,
                                                         const std::string& path,
                                                         const std::string& body,
                                                         const char* content_type,
                                                         int read_timeout_s) {
  // api = https://HOST:PORT/api/v1 (http:// on loopback)
  std::string base = site_.api;
  std::string prefix;
  auto slash = base.find('/', base.find("://") + 3);
  if (slash != std::string::npos) {
    prefix = base.substr(slash);
    base = base.substr(0, slash);
  }
  std::unique_ptr<httplib::ClientImpl> cli;
  if (base.rfind("https://", 0) == 0) {
    auto addr = ParseHostPort(base.substr(8), 7482);
    if (!addr.ok()) return InvalidArgument("site " + site_.name + ": bad API address " + site_.api);
    std::unique_ptr<httplib::SSLClient> ssl;
    if (tls_.cert.empty()) {
      ssl = std::make_unique<httplib::SSLClient>(addr->host, addr->port);
    } else {
      ssl = std::make_unique<httplib::SSLClient>(addr->host, addr->port, tls_.cert, tls_.key);
    }
    // The chain and the site's name are checked by our own verifier (common/https.h):
    // the certificate must name the site registered at this address.
    ssl->enable_server_certificate_verification(false);
    if (tls_.ca.empty()) {
      return Status(Code::kPermissionDenied,
                    "site " + site_.name +
                        ": the vault has no CA to check the site's certificate "
                        "(osrd vault --site-ca)");
    }
    OSR_RETURN_IF_ERROR(ConfigureClientTls(ssl->ssl_context(), tls_, site_.name));
    cli = std::move(ssl);
  } else {
    auto addr = ParseHostPort(base.substr(base.find("://") + 3), 7482);
    if (!addr.ok() || !IsLoopbackHost(addr->host)) {
      return Status(Code::kPermissionDenied,
                    "site " + site_.name + ": plain http:// only to a site on this host");
    }
    cli = std::make_unique<httplib::ClientImpl>(addr->host, addr->port);
  }
  cli->set_connection_timeout(2);
  cli->set_read_timeout(read_timeout_s);
  cli->set_write_timeout(60);
  std::string url = prefix + path;
  httplib::Headers headers;
  if (auto token = LeaseTokenOfCall(method, path); !token.ok()) {
    return token.status();
  } else if (*token > 0) {
    headers.emplace(kLeaseTokenHeader, std::to_string(*token));
  }
  httplib::Result r = method == "GET"    ? cli->Get(url, headers)
                      : method == "PUT"  ? cli->Put(url, headers, body, content_type)
                      : method == "POST" ? cli->Post(url, headers, body, content_type)
                                         : cli->Delete(url, headers);
  if (!r) {
    return Unavailable(fmt::format("site {} ({}) is unreachable: {}", site_.name, site_.api,
                                   httplib::to_string(r.error())));
  }
  if (r->status >= 300) {
    Status refused(SiteErrorCode(r->status, r->body),
                   fmt::format("site {}: {}", site_.name, SiteErrorMessage(r->status, r->body)));
    if (r->status == 409 && r->has_header(kLeaseTokenSeenHeader)) {
      // Never acted on (raising this vault's token would undo the fence): said, loudly.
      spdlog::error(
          "vault: site {} refused {} {}: it has seen lease token {}, this call carried "
          "{}: {}",
          site_.name, method, path, r->get_header_value(kLeaseTokenSeenHeader).substr(0, 20),
          headers.count(kLeaseTokenHeader) ? headers.find(kLeaseTokenHeader)->second : "none",
          refused.message());
    }
    return refused;
  }
  return std::pair<int, std::string>{r->status, std::move(r->body)};
}

Result<json> SiteClient::Call(const std::string& method, const std::string& path,
                              const json& body) {
  OSR_ASSIGN_OR_RETURN(auto answer, Exchange(method, path, body.is_null() ? "" : body.dump(),
                                             "application/json", 30));
  if (answer.second.empty()) return json::object();
  auto j = json_in::Parse(answer.second, "site " + site_.name + "'s answer");
  if (!j.ok()) return Corruption(j.status().message());
  return std::move(*j);
}

Result<std::string> SiteClient::CallRaw(const std::string& method, const std::string& path,
                                        const std::string& body) {
  // Hashing a big disk takes its time.
  OSR_ASSIGN_OR_RETURN(auto answer, Exchange(method, path, body, "application/octet-stream", 600));
  return std::move(answer.second);
}

// ---- Vault --------------------------------------------------------------------------

}  // namespace osr::vault
