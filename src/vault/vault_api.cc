#include "vault/vault_api.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <httplib.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <filesystem>
#include <fstream>

#include "common/https.h"
#include "common/json_in.h"
#include "common/units.h"
#include "vault/catalog.h"
#include "vault/item_state.h"
#include "vault/vault.h"

namespace osr::vault {

using nlohmann::json;

namespace {

constexpr size_t kBodyBytesMax = 1 << 20;
constexpr const char* kSessionCookie = "osr_session";
constexpr int64_t kNsPerS = 1000000000;
// A token's last use is written at most this often (a web UI polls every 2 s).
constexpr int64_t kTouchIntervalNs = 60 * kNsPerS;

bool Mutating(const std::string& method) {
  return method != "GET" && method != "HEAD" && method != "OPTIONS";
}

json ErrorBody(const Status& st) {
  return json{{"error", {{"code", std::string(CodeName(st.code()))}, {"message", st.message()}}}};
}

void Send(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(json_in::Dump(body), "application/json");
}

// "host:port", "[v6]:port" or "host" -> host.
std::string HostOnly(std::string_view host_header) {
  if (!host_header.empty() && host_header.front() == '[') {
    auto close = host_header.find(']');
    return std::string(host_header.substr(0, close == std::string_view::npos ? 0 : close + 1));
  }
  auto colon = host_header.rfind(':');
  return std::string(host_header.substr(0, colon));
}

std::string CookieValue(const httplib::Request& req, std::string_view name) {
  std::string cookies = req.get_header_value("Cookie");
  size_t pos = 0;
  while (pos < cookies.size()) {
    size_t end = cookies.find(';', pos);
    if (end == std::string::npos) end = cookies.size();
    std::string_view part(cookies.data() + pos, end - pos);
    while (!part.empty() && part.front() == ' ') part.remove_prefix(1);
    if (part.size() > name.size() && part.substr(0, name.size()) == name &&
        part[name.size()] == '=') {
      return std::string(part.substr(name.size() + 1));
    }
    pos = end + 1;
  }
  return {};
}

Result<int64_t> ParseId(const std::string& s, std::string_view what) {
  int64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p != s.data() + s.size() || v <= 0) {
    return InvalidArgument(fmt::format("'{}' is not a valid {}", s, what));
  }
  return v;
}

// A query parameter as a whole number in [lo, hi]; `def` when absent.
Result<int64_t> QueryInt(const httplib::Request& req, const char* name, int64_t def, int64_t lo,
                         int64_t hi) {
  if (!req.has_param(name)) return def;
  std::string s = req.get_param_value(name);
  int64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p != s.data() + s.size() || v < lo || v > hi) {
    return InvalidArgument(
        fmt::format("query '{}' must be a whole number in {}..{}", name, lo, hi));
  }
  return v;
}

// Removes every "console_tail" field, at any depth.
void WithoutConsole(json& j) {
  if (j.is_object()) {
    j.erase("console_tail");
    for (auto& [k, v] : j.items()) WithoutConsole(v);
  } else if (j.is_array()) {
    for (auto& v : j) WithoutConsole(v);
  }
}

json TokenJson(const TokenRow& t) {
  return json{{"id", t.id},
              {"name", t.name},
              {"role", t.role},
              {"created", FormatTimeNs(t.created_ns)},
              {"expires", FormatTimeNs(t.expires_ns)},
              {"revoked", t.revoked_ns ? json(FormatTimeNs(t.revoked_ns)) : json()},
              {"last_used", t.last_used_ns ? json(FormatTimeNs(t.last_used_ns)) : json()},
              {"created_by", t.created_by}};
}

}  // namespace

struct VaultApi::Call {
  const httplib::Request& req;
  httplib::Response& res;
  const Principal* who;                // nullptr on public routes
  json body;                           // an object (empty for GET)
  std::optional<Principal> signed_in;  // set by Login: who the audit log names
  std::string Match(size_t i) const { return req.matches[i]; }
};

// ---- Tokens ---------------------------------------------------------------------------

Result<std::string> IssueToken(Catalog& catalog, const std::string& name, Role role, int64_t ttl_s,
                               const std::string& created_by) {
  if (name.empty() || name.size() > 64 || !ValidName(name)) {
    return InvalidArgument("a token's name is 1-64 of [A-Za-z0-9._-]");
  }
  if (ttl_s < 60 || ttl_s > kTokenTtlSMax) {
    return InvalidArgument(fmt::format("a token expires after 60..{} seconds", kTokenTtlSMax));
  }
  OSR_ASSIGN_OR_RETURN(std::string secret, RandomSecret());
  TokenRow t;
  t.name = name;
  t.role = std::string(RoleName(role));
  t.secret_sha256 = Sha256Hex(secret);
  t.created_ns = NowNs();
  t.expires_ns = t.created_ns + ttl_s * kNsPerS;
  t.created_by = created_by;
  OSR_ASSIGN_OR_RETURN(int64_t id, catalog.AddToken(t));
  return FormatToken(id, secret);
}

namespace {
// A credential that cannot be checked because the catalog cannot be read: neither 401 nor
// 403 (the caller did nothing wrong) but 503, try again (see the route table's refuse).
Status CatalogUnreadable(const Status& st) {
  return Status(Code::kIoError, "the vault cannot check credentials now: " + st.message());
}
}  // namespace

Result<TokenRow> CheckToken(Catalog& catalog, const std::string& token, int64_t now_ns) {
  auto parts = ParseToken(token);
  if (!parts.ok()) return Status(Code::kPermissionDenied, parts.status().message());
  auto found = catalog.FindToken(parts->id);
  if (!found.ok()) return CatalogUnreadable(found.status());
  const std::optional<TokenRow>& row = *found;
  // The same answer for an unknown id and a wrong secret: nothing to learn from it.
  if (!row || !DigestEquals(row->secret_sha256, Sha256Hex(parts->secret))) {
    return Status(Code::kPermissionDenied, "unknown token");
  }
  if (row->revoked_ns != 0) return Status(Code::kPermissionDenied, "the token was revoked");
  if (row->expires_ns <= now_ns) return Status(Code::kPermissionDenied, "the token expired");
  if (!ParseRole(row->role)) return Status(Code::kPermissionDenied, "the token has no valid role");
  return *row;
}

Result<bool> EnsureAdminToken(Catalog& catalog, const std::string& path) {
  std::error_code ec;
  if (std::filesystem::exists(path, ec)) {
    std::ifstream in(path);
    std::string text;
    std::getline(in, text);
    auto checked = CheckToken(catalog, text, NowNs());
    if (checked.ok()) return false;
    if (checked.status().code() == Code::kIoError) return checked.status();
  }
  OSR_ASSIGN_OR_RETURN(std::vector<TokenRow> tokens, catalog.ListTokens());
  for (auto& t : tokens) {
    // Someone already administers this vault: do not mint another admin on the side.
    if (t.role == "admin" && t.revoked_ns == 0 && t.expires_ns > NowNs()) return false;
  }
  OSR_ASSIGN_OR_RETURN(std::string token,
                       IssueToken(catalog, "first-admin", Role::kAdmin, kTokenTtlSMax, "osrd"));
  std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return Status::FromErrno(errno, "create " + tmp);
  std::string line = token + "\n";
  bool ok = ::fchmod(fd, 0600) == 0 &&
            ::write(fd, line.data(), line.size()) == static_cast<ssize_t>(line.size()) &&
            ::fsync(fd) == 0;
  int err = errno;
  ::close(fd);
  if (!ok) return Status::FromErrno(err, "write " + tmp);
  if (::rename(tmp.c_str(), path.c_str()) != 0) return Status::FromErrno(errno, "rename " + tmp);
  return true;
}

// ---- The route table ------------------------------------------------------------------

const std::vector<VaultApi::Route>& VaultApi::Table() {
  constexpr auto R = Role::kReader;
  constexpr auto O = Role::kOperator;
  constexpr auto A = Role::kAdmin;
  static const std::vector<Route> kRoutes = {
      {"POST", "/api/v1/login", std::nullopt, &VaultApi::Login},
      {"POST", "/api/v1/logout", R, &VaultApi::Logout},
      {"GET", "/api/v1/whoami", R, &VaultApi::WhoAmI},
      {"GET", "/api/v1/routes", R, &VaultApi::ListRoutes},
      {"GET", "/api/v1/tokens", A, &VaultApi::ListTokens},
      {"POST", "/api/v1/tokens", A, &VaultApi::CreateToken},
      {"DELETE", R"(/api/v1/tokens/([^/]+))", A, &VaultApi::RevokeToken},
      {"GET", "/api/v1/audit", A, &VaultApi::ListAudit},
      {"GET", "/api/v1/sites", R, &VaultApi::ListSites},
      {"POST", "/api/v1/sites", A, &VaultApi::RegisterSite},
      {"GET", "/api/v1/policies", R, &VaultApi::ListPolicies},
      {"POST", "/api/v1/policies", A, &VaultApi::CreatePolicy},
      {"GET", "/api/v1/vms", R, &VaultApi::ListVms},
      {"POST", "/api/v1/vms", A, &VaultApi::CreateVm},
      {"GET", R"(/api/v1/vms/([^/]+))", R, &VaultApi::ShowVm},
      {"POST", R"(/api/v1/vms/([^/]+)/start)", O, &VaultApi::StartVm},
      {"GET", R"(/api/v1/vms/([^/]+)/console)", O, &VaultApi::VmConsole},
      {"POST", R"(/api/v1/vms/([^/]+)/stop)", O, &VaultApi::StopVm},
      {"POST", R"(/api/v1/vms/([^/]+)/disks)", A, &VaultApi::ChangeVmDisk},
      {"POST", R"(/api/v1/vms/([^/]+)/repair)", A, &VaultApi::RepairVm},
      {"POST", R"(/api/v1/vms/([^/]+)/protect)", A, &VaultApi::Protect},
      {"GET", "/api/v1/items", R, &VaultApi::ListItems},
      {"GET", R"(/api/v1/items/([^/]+))", R, &VaultApi::ShowItem},
      {"DELETE", R"(/api/v1/items/([^/]+))", A, &VaultApi::Unprotect},
      {"GET", R"(/api/v1/items/([^/]+)/rpo)", R, &VaultApi::ItemRpo},
      {"GET", R"(/api/v1/items/([^/]+)/points)", R, &VaultApi::ListPoints},
      {"POST", R"(/api/v1/items/([^/]+)/points)", O, &VaultApi::CreatePoint},
      {"POST", R"(/api/v1/items/([^/]+)/test-failover)", O, &VaultApi::TestFailover},
      {"POST", R"(/api/v1/items/([^/]+)/test-failover-cleanup)", O, &VaultApi::TestFailoverCleanup},
      {"POST", R"(/api/v1/items/([^/]+)/failover)", O, &VaultApi::Failover},
      {"POST", R"(/api/v1/items/([^/]+)/change-point)", O, &VaultApi::ChangePoint},
      {"POST", R"(/api/v1/items/([^/]+)/commit)", O, &VaultApi::Commit},
      {"POST", R"(/api/v1/items/([^/]+)/reprotect)", O, &VaultApi::Reprotect},
      {"GET", "/api/v1/vault", R, &VaultApi::ShowVault},
      {"GET", "/api/v1/states", R, &VaultApi::ListStates},
      {"GET", "/api/v1/clock", R, &VaultApi::ShowClock},
      {"POST", "/api/v1/clock/confirm", O, &VaultApi::ConfirmClock},
      {"GET", "/api/v1/jobs", R, &VaultApi::ListJobs},
      {"GET", R"(/api/v1/jobs/([^/]+))", R, &VaultApi::ShowJob},
      {"POST", R"(/api/v1/jobs/([^/]+)/cancel)", O, &VaultApi::CancelJob},
      {"GET", "/metrics", R, &VaultApi::Metrics},
  };
  return kRoutes;
}

const std::vector<RouteInfo>& VaultApi::Routes() {
  static const std::vector<RouteInfo> kInfo = [] {
    std::vector<RouteInfo> out;
    for (auto& r : Table()) out.push_back({r.method, r.pattern, r.role});
    return out;
  }();
  return kInfo;
}

// ---- Setup ----------------------------------------------------------------------------

VaultApi::VaultApi(Vault* vault, ApiConfig cfg)
    : vault_(vault), catalog_(vault->catalog()), cfg_(std::move(cfg)) {}

VaultApi::~VaultApi() {
  Stop();
}

Result<std::unique_ptr<VaultApi>> VaultApi::Create(Vault* vault, const ApiConfig& cfg) {
  std::unique_ptr<VaultApi> api(new VaultApi(vault, cfg));
  bool tls = !cfg.tls.cert.empty();
  if (!tls && !cfg.insecure_http && !IsLoopbackHost(cfg.listen.host)) {
    return InvalidArgument(fmt::format(
        "the vault would serve plain HTTP on {}, which is not loopback: give it a certificate "
        "(--tls-cert, --tls-key) or, on a network you trust, --insecure-http",
        cfg.listen.host));
  }
  if (tls) {
    Status setup;
    TlsFiles files{"", cfg.tls.cert, cfg.tls.key};
    auto server = std::make_unique<httplib::SSLServer>([&](SSL_CTX& ctx) {
      setup = ConfigureServerTls(&ctx, files);
      return setup.ok();
    });
    if (!setup.ok()) return setup;
    if (!server->is_valid()) return InvalidArgument("the vault's TLS setup failed");
    api->http_ = std::move(server);
  } else {
    api->http_ = std::make_unique<httplib::Server>();
  }
  auto& h = *api->http_;
  h.set_socket_options(ExclusiveListenerOptions);
  h.set_payload_max_length(kBodyBytesMax);
  for (auto& r : Table()) api->Register(r);
  // The web UI: static files from the same port (no CDN, no other server). They hold no
  // data: the page signs in and then calls the API.
  std::error_code ec;
  if (!cfg.web_dir.empty() && std::filesystem::exists(cfg.web_dir + "/index.html", ec) &&
      h.set_mount_point("/", cfg.web_dir)) {
    spdlog::info("vault: web UI from {}", cfg.web_dir);
  } else {
    std::string dir = cfg.web_dir;
    h.Get("/", [dir](const httplib::Request&, httplib::Response& res) {
      res.set_content(
          "<!doctype html><title>osr</title><p>The osr web UI is not built here. Run "
          "<code>make web</code> (or <code>make run</code>), then reload.",
          "text/html; charset=utf-8");
    });
  }
  h.set_post_routing_handler([](const httplib::Request&, httplib::Response& res) {
    // No page may frame the console or sniff types; answers with data are not cached.
    res.set_header("X-Frame-Options", "DENY");
    res.set_header("X-Content-Type-Options", "nosniff");
    res.set_header("Referrer-Policy", "no-referrer");
    res.set_header(
        "Content-Security-Policy",
        "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'");
    if (res.get_header_value("Content-Type").rfind("application/json", 0) == 0) {
      res.set_header("Cache-Control", "no-store");
    }
  });
  h.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    // What the HTTP layer refused before any handler ran, in words.
    std::string code = "invalid argument", message;
    switch (res.status) {
      case 404:
        code = "not found";
        message = "no such API path or method: " + req.method + " " + req.path;
        break;
      case 400:
        message = "malformed HTTP request (a POST needs a body, e.g. {}, with its length)";
        break;
      case 413:
        message = "the request body is too large";
        break;
      default:
        code = "internal";
        message = "HTTP " + std::to_string(res.status);
    }
    Send(res, res.status, json{{"error", {{"code", code}, {"message", message}}}});
  });
  return api;
}

void VaultApi::Register(const Route& r) {
  auto fn = [this, &r](const httplib::Request& req, httplib::Response& res) { Serve(r, req, res); };
  std::string m = r.method;
  if (m == "GET") {
    http_->Get(r.pattern, fn);
  } else if (m == "POST") {
    http_->Post(r.pattern, fn);
  } else if (m == "PUT") {
    http_->Put(r.pattern, fn);
  } else if (m == "DELETE") {
    http_->Delete(r.pattern, fn);
  } else {
    OSR_CHECK(false && "a route with an unknown method");
  }
}

Result<ListenAddress> VaultApi::Listen() {
  bound_ = cfg_.listen;
  if (cfg_.listen.port == 0) {
    int port = http_->bind_to_any_port(cfg_.listen.host);
    if (port < 0) return Unavailable("cannot bind the vault API to " + cfg_.listen.host);
    bound_.port = static_cast<uint16_t>(port);
  } else if (!http_->bind_to_port(cfg_.listen.host, cfg_.listen.port)) {
    return Unavailable(
        fmt::format("cannot bind the vault API to {}:{}", cfg_.listen.host, cfg_.listen.port));
  }
  return bound_;
}

void VaultApi::Start() {
  thread_ = std::thread([this] { http_->listen_after_bind(); });
}

void VaultApi::Stop() {
  if (thread_.joinable()) {
    http_->stop();
    thread_.join();
  }
}

// ---- The guard ------------------------------------------------------------------------

Status VaultApi::CheckBrowserSafety(const httplib::Request& req) const {
  auto forbidden = [](std::string m) { return Status(Code::kPermissionDenied, std::move(m)); };
  std::string host_header = req.get_header_value("Host");
  std::string host = HostOnly(host_header);
  bool host_ok = IsLoopbackHost(host) || host == cfg_.listen.host ||
                 (host.size() > 2 && host.front() == '[' &&
                  host.substr(1, host.size() - 2) == cfg_.listen.host);
  for (auto& h : cfg_.public_hosts) host_ok = host_ok || host == h;
  if (!host_ok) {
    return forbidden(fmt::format(
        "Host '{}' is not a name of this vault (osrd vault --public-host adds one)", host));
  }
  if (req.has_header("Origin")) {
    std::string want = fmt::format("{}://{}", https() ? "https" : "http", host_header);
    if (req.get_header_value("Origin") != want) {
      return forbidden("cross-origin request refused (Origin " + req.get_header_value("Origin") +
                       ")");
    }
  }
  if (req.get_header_value("Sec-Fetch-Site") == "cross-site") {
    return forbidden("cross-site request refused");
  }
  if (Mutating(req.method) && !req.body.empty()) {
    // The media type (RFC 9110 8.3.1: case-insensitive, parameters after ';').
    std::string type = req.get_header_value("Content-Type");
    type = type.substr(0, type.find(';'));
    while (!type.empty() && type.back() == ' ') type.pop_back();
    for (char& c : type) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (type != "application/json") {
      return Status(Code::kNotSupported, "the body must be sent as Content-Type: application/json");
    }
  }
  return Status::Ok();
}

Result<Principal> VaultApi::Authenticate(const httplib::Request& req) {
  auto unauthorized = [](std::string m) { return Status(Code::kUnavailable, std::move(m)); };
  int64_t now = NowNs();
  Principal p;
  TokenRow token;
  std::string auth = req.get_header_value("Authorization");
  if (!auth.empty()) {
    // The scheme is case-insensitive (RFC 9110 11.1).
    std::string scheme = auth.substr(0, 7);
    for (char& c : scheme) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (scheme != "bearer ") return unauthorized("Authorization must be 'Bearer TOKEN'");
    auto t = CheckToken(catalog_, auth.substr(7), now);
    if (!t.ok() && t.status().code() == Code::kIoError) return t.status();
    if (!t.ok()) return unauthorized(t.status().message());
    token = *t;
  } else if (std::string sid = CookieValue(req, kSessionCookie); !sid.empty()) {
    auto found = catalog_.FindSession(Sha256Hex(sid));
    if (!found.ok()) return CatalogUnreadable(found.status());
    const std::optional<SessionRow>& s = *found;
    if (!s || s->expires_ns <= now) return unauthorized("the session ended: sign in again");
    auto found_token = catalog_.FindToken(s->token_id);
    if (!found_token.ok()) return CatalogUnreadable(found_token.status());
    const std::optional<TokenRow>& t = *found_token;
    if (!t || t->revoked_ns != 0 || t->expires_ns <= now) {
      return unauthorized("the session's token is no longer valid: sign in again");
    }
    token = *t;
    p.via_session = true;
    p.csrf = s->csrf;
    if (Mutating(req.method) && !DigestEquals(req.get_header_value("X-CSRF-Token"), s->csrf)) {
      return Status(Code::kPermissionDenied, "missing or wrong X-CSRF-Token");
    }
  } else {
    return unauthorized("no credential: send 'Authorization: Bearer TOKEN' (osr login)");
  }
  p.name = fmt::format("token {} ({})", token.id, token.name);
  p.role = *ParseRole(token.role);
  p.token_id = token.id;
  bool touch = false;
  {
    std::lock_guard lock(mu_);
    int64_t& last = token_touched_ns_[token.id];
    if (now - last > kTouchIntervalNs) {
      last = now;
      touch = true;
    }
  }
  if (touch) {
    // Only a "last used" time: losing it costs nothing, so a failure is logged, not raised.
    if (Status st = catalog_.TouchToken(token.id, now); !st.ok()) {
      spdlog::warn("vault: token {}: {}", token.id, st.ToString());
    }
  }
  return p;
}

namespace {

// Whether a body field holds a credential (a login's token, a password) or a command line
// (a lab's literal command, QEMU arguments or hook command may carry one): never in the log.
// Names are compared in lower case.
bool SecretField(std::string key) {
  std::transform(key.begin(), key.end(), key.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (key == "command" || key == "qemu_args") return true;  // (command_name: a name, kept)
  for (std::string_view word : {"token", "password", "secret", "key"}) {
    if (key.find(word) != std::string::npos) return true;
  }
  return false;
}

// `v` as an audit row may keep it: secret fields "(not logged)", tokens masked. Under a
// spec's "hooks" every string is a command (a hook given as a bare string) but a hook's
// "name" (an entry of the vault's hooks file).
json WithoutSecrets(const json& v, bool in_hooks = false) {
  if (v.is_object()) {
    json out = json::object();
    for (auto& [k, x] : v.items()) {
      if (SecretField(k)) {
        out[MaskTokens(k)] = "(not logged)";
      } else if (in_hooks && x.is_string() && k != "name") {
        out[MaskTokens(k)] = "(not logged)";
      } else {
        out[MaskTokens(k)] = WithoutSecrets(x, in_hooks || k == "hooks");
      }
    }
    return out;
  }
  if (v.is_array()) {
    json out = json::array();
    for (auto& x : v) out.push_back(WithoutSecrets(x, in_hooks));
    return out;
  }
  // A token sent in a field not named for one (a name, a point, a note).
  if (v.is_string()) return MaskTokens(v.get_ref<const std::string&>());
  return v;
}

}  // namespace

std::string VaultApi::AuditedBody(const json& body) {
  return WithoutSecrets(body).dump(-1, ' ', /*ensure_ascii=*/true, json::error_handler_t::replace);
}

void VaultApi::Audit(const httplib::Request& req, const Principal* who, int status,
                     const std::string& message) {
  if (who == nullptr) {
    // Refusals of callers without a credential could push the real history out of the
    // bounded log: at most one row per client address a second.
    std::lock_guard lock(mu_);
    int64_t now = NowNs();
    if (anonymous_audit_ns_.size() > 10000) anonymous_audit_ns_.clear();
    int64_t& last = anonymous_audit_ns_[req.remote_addr];
    if (now - last < kNsPerS) return;
    last = now;
  }
  // Control bytes (a %00 in a path) would hide the rest of a row: shown escaped.
  auto printable = [](const std::string& in, size_t max) {
    std::string out;
    for (unsigned char c : in.substr(0, max)) {
      if (c < 0x20 || c >= 0x7f) {  // (bytes above ASCII: a path that is not UTF-8)
        out += fmt::format("\\x{:02x}", c);
      } else {
        out.push_back(static_cast<char>(c));
      }
    }
    return out;
  };
  AuditRow a;
  a.time_ns = NowNs();
  a.principal = who ? MaskTokens(who->name) : "anonymous";  // a token named like a token
  a.role = who ? std::string(RoleName(who->role)) : "";
  a.method = req.method;
  a.path = printable(MaskTokens(req.path), 1000);
  a.status = status;
  a.message = printable(MaskTokens(message), 1000);
  a.remote = req.remote_addr;
  if (Status st = catalog_.AddAudit(a); !st.ok()) {
    // The call itself is done; an operator must learn that the audit log missed it.
    spdlog::error("vault: audit log: {} (lost: {} {} {} by {})", st.ToString(), a.method, a.path,
                  a.status, a.principal);
  }
}

void VaultApi::Serve(const Route& r, const httplib::Request& req, httplib::Response& res) {
  const bool mutating = Mutating(req.method);
  std::optional<Principal> who;
  auto refuse = [&](int status, const Status& st) {
    Send(res, status, ErrorBody(st));
    if (mutating || status == 401 || status == 403) {
      Audit(req, who ? &*who : nullptr, status, st.message());
    }
  };
  if (Status st = CheckBrowserSafety(req); !st.ok()) {
    return refuse(st.code() == Code::kNotSupported ? 415 : 403, st);
  }
  // A path or parameter that is not UTF-8 names nothing here (PostgreSQL would refuse
  // it with an error of its own, and its audit row).
  bool utf8 = json_in::IsUtf8(req.path);
  for (const auto& [key, value] : req.params)
    utf8 = utf8 && json_in::IsUtf8(key) && json_in::IsUtf8(value);
  if (!utf8) return refuse(400, InvalidArgument("the path or a query parameter is not UTF-8"));
  // Two lengths for one body: which one a proxy in front used is unknown (smuggling).
  if (req.get_header_value_count("Content-Length") > 1) {
    return refuse(400, InvalidArgument("more than one Content-Length header"));
  }
  if (r.role) {
    auto p = Authenticate(req);
    if (!p.ok()) {
      if (p.status().code() == Code::kUnavailable) {
        res.set_header("WWW-Authenticate", "Bearer realm=\"osr\"");
        return refuse(401, Status(Code::kPermissionDenied, p.status().message()));
      }
      if (p.status().code() == Code::kIoError) return refuse(503, p.status());
      return refuse(403, p.status());
    }
    who = *p;
    if (!RoleAllows(who->role, *r.role)) {
      return refuse(403, Status(Code::kPermissionDenied,
                                fmt::format("{} needs the {} role; {} has {}", req.path,
                                            RoleName(*r.role), who->name, RoleName(who->role))));
    }
  }
  Call call{req, res, who ? &*who : nullptr, json::object(), std::nullopt};
  if (mutating && !req.body.empty()) {
    auto b = json_in::ParseObject(req.body, "the body", kBodyBytesMax);
    if (!b.ok()) return refuse(400, b.status());
    call.body = std::move(*b);
  }
  Result<Reply> out = Status(Code::kInternal, "no answer");
  try {
    out = (this->*r.handler)(call);
  } catch (const std::exception& e) {
    // A bug or a peer's answer of an unexpected shape: this call fails, the vault lives.
    spdlog::error("vault: {} {}: {}", req.method, req.path, e.what());
    out = Internal(std::string("the vault failed to handle this call: ") + e.what());
  } catch (...) {
    out = Internal("the vault failed to handle this call");
  }
  if (out.ok() && !out->content_type.empty()) {
    res.status = out->status;
    res.set_content(out->text, out->content_type);
  } else if (out.ok()) {
    // A guest's console output (a drill's console tail in a job or an item) is for
    // operators, as the console route is: a reader gets everything else.
    if (call.who != nullptr && !RoleAllows(call.who->role, Role::kOperator)) {
      WithoutConsole(out->body);
    }
    Send(res, out->status, out->body);
    if (mutating) {
      // What was asked (a disk's new size, a failover's point), its secrets left out.
      Audit(req, call.signed_in ? &*call.signed_in : call.who, out->status,
            call.body.empty() ? std::string() : "body " + AuditedBody(call.body));
    }
  } else {
    // A public route (login) refusing a credential: 401, like any other missing one.
    int status = !r.role && out.status().code() == Code::kPermissionDenied
                     ? 401
                     : HttpStatusFor(out.status());
    Send(res, status, ErrorBody(out.status()));
    if (mutating) Audit(req, call.who, status, out.status().message());
  }
}

// ---- Handlers: access -----------------------------------------------------------------

Result<VaultApi::Reply> VaultApi::Login(Call& c) {
  json_in::Fields f(c.body);
  std::string token = f.String("token");
  f.RefuseOthers();  // a misspelt field is refused, never ignored
  if (!f.ok()) return f.status();
  auto t = CheckToken(catalog_, token, NowNs());
  if (!t.ok()) return t.status();
  OSR_ASSIGN_OR_RETURN(std::string sid, RandomSecret());
  OSR_ASSIGN_OR_RETURN(std::string csrf, RandomSecret());
  SessionRow s{Sha256Hex(sid), t->id, csrf, NowNs(), NowNs() + kSessionTtlS * kNsPerS};
  s.expires_ns = std::min(s.expires_ns, t->expires_ns);
  OSR_RETURN_IF_ERROR(catalog_.AddSession(s));
  c.signed_in =
      Principal{fmt::format("token {} ({})", t->id, t->name), *ParseRole(t->role), t->id, true, ""};
  c.res.set_header(
      "Set-Cookie",
      fmt::format("{}={}; Path=/; Max-Age={}; HttpOnly; SameSite=Strict{}", kSessionCookie, sid,
                  (s.expires_ns - s.created_ns) / kNsPerS, https() ? "; Secure" : ""));
  return Reply{200, json{{"name", fmt::format("token {} ({})", t->id, t->name)},
                         {"role", t->role},
                         {"csrf_token", csrf},
                         {"expires", FormatTimeNs(s.expires_ns)}}};
}

Result<VaultApi::Reply> VaultApi::Logout(Call& c) {
  if (std::string sid = CookieValue(c.req, kSessionCookie); !sid.empty()) {
    OSR_RETURN_IF_ERROR(catalog_.DeleteSession(Sha256Hex(sid)));
  }
  c.res.set_header("Set-Cookie", fmt::format("{}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict",
                                             kSessionCookie));
  return Reply{200, json::object()};
}

Result<VaultApi::Reply> VaultApi::WhoAmI(Call& c) {
  json out = {{"name", c.who->name},
              {"role", RoleName(c.who->role)},
              {"token_id", c.who->token_id},
              {"via", c.who->via_session ? "session" : "token"}};
  if (c.who->via_session) out["csrf_token"] = c.who->csrf;
  return Reply{200, out};
}

Result<VaultApi::Reply> VaultApi::ListRoutes(Call&) {
  json out = json::array();
  for (auto& r : Routes()) {
    out.push_back({{"method", r.method},
                   {"pattern", r.pattern},
                   {"role", r.role ? json(RoleName(*r.role)) : json()}});
  }
  return Reply{200, out};
}

Result<VaultApi::Reply> VaultApi::ListTokens(Call&) {
  json out = json::array();
  for (auto& t : catalog_.Tokens()) out.push_back(TokenJson(t));
  return Reply{200, out};
}

Result<VaultApi::Reply> VaultApi::CreateToken(Call& c) {
  json_in::Fields f(c.body);
  std::string name = f.String("name");
  std::string role_name = f.String("role", "reader");
  int64_t ttl = f.I64("expires_in_seconds", kTokenTtlSDefault, {60, kTokenTtlSMax});
  f.RefuseOthers();  // a misspelt field is refused, never ignored
  if (!f.ok()) return f.status();
  auto role = ParseRole(role_name);
  if (!role) return InvalidArgument("role: reader, operator or admin");
  // A name is shown wherever the token acts (audit rows, whoami): never a token itself.
  if (MaskTokens(name) != name) {
    return InvalidArgument("name: it holds an osr token (osr_<id>_<secret>): revoke that token");
  }
  OSR_ASSIGN_OR_RETURN(std::string token, IssueToken(catalog_, name, *role, ttl, c.who->name));
  auto parts = ParseToken(token);
  OSR_CHECK(parts.ok());
  auto row = catalog_.Token(parts->id);
  if (!row) return Internal("the new token is not in the catalog");
  json out = TokenJson(*row);
  out["token"] = token;  // shown this once
  return Reply{201, out};
}

Result<VaultApi::Reply> VaultApi::RevokeToken(Call& c) {
  OSR_ASSIGN_OR_RETURN(int64_t id, ParseId(c.Match(1), "token id"));
  auto t = catalog_.Token(id);
  if (!t) return NotFound(fmt::format("no token {}", id));
  OSR_RETURN_IF_ERROR(catalog_.RevokeToken(id, NowNs()));
  return Reply{200, TokenJson(*catalog_.Token(id))};
}

Result<VaultApi::Reply> VaultApi::ListAudit(Call& c) {
  OSR_ASSIGN_OR_RETURN(int64_t limit, QueryInt(c.req, "limit", 200, 1, 10000));
  OSR_ASSIGN_OR_RETURN(int64_t seconds, QueryInt(c.req, "seconds", 0, 0, 400LL * 86400));
  int64_t since = seconds ? NowNs() - seconds * kNsPerS : 0;
  json out = json::array();
  for (auto& a : catalog_.Audit(since, static_cast<size_t>(limit))) {
    out.push_back({{"id", a.id},
                   {"time", FormatTimeNs(a.time_ns)},
                   {"principal", a.principal},
                   {"role", a.role},
                   {"method", a.method},
                   {"path", a.path},
                   {"status", a.status},
                   {"message", a.message},
                   {"remote", a.remote}});
  }
  return Reply{200, out};
}

// ---- Handlers: sites, policies, VMs ---------------------------------------------------

Result<VaultApi::Reply> VaultApi::ListSites(Call&) {
  OSR_ASSIGN_OR_RETURN(json out, vault_->ListSites());
  return Reply{200, out};
}

Result<VaultApi::Reply> VaultApi::RegisterSite(Call& c) {
  json_in::Fields f(c.body);
  std::string name = f.String("name");
  std::string api = f.String("api");
  std::string repl = f.String("replication");
  bool replace = f.Bool("replace", false);
  f.RefuseOthers();  // a misspelt field is refused, never ignored
  if (!f.ok()) return f.status();
  OSR_ASSIGN_OR_RETURN(json out, vault_->RegisterSite(name, api, repl, replace));
  return Reply{201, out};
}

Result<VaultApi::Reply> VaultApi::ListPolicies(Call&) {
  OSR_ASSIGN_OR_RETURN(json out, vault_->ListPolicies());
  return Reply{200, out};
}

Result<VaultApi::Reply> VaultApi::CreatePolicy(Call& c) {
  // Ten years of retention at the most: seconds * 1e9 stays far inside int64 nanoseconds.
  constexpr int64_t kSecondsMax = 10LL * 366 * 86400;
  json_in::Fields f(c.body);
  PolicyRow p;
  p.name = f.String("name");
  p.retention_s = f.I64("retention_seconds", p.retention_s, {60, kSecondsMax});
  p.crash_interval_s = f.I64("crash_interval_seconds", p.crash_interval_s, {1, 86400});
  p.app_interval_s = f.I64("app_interval_seconds", p.app_interval_s, {1, kSecondsMax});
  p.compression = f.String("compression", p.compression);
  p.bandwidth_bytes_per_second =
      f.I64("bandwidth_bytes_per_second", p.bandwidth_bytes_per_second, {0, 1LL << 40});
  f.RefuseOthers();  // a misspelt field is refused, never ignored
  if (!f.ok()) return f.status();
  OSR_ASSIGN_OR_RETURN(json out, vault_->CreatePolicy(p));
  return Reply{201, out};
}

Result<VaultApi::Reply> VaultApi::ListVms(Call&) {
  OSR_ASSIGN_OR_RETURN(json out, vault_->ListVms());
  return Reply{200, out};
}

Result<VaultApi::Reply> VaultApi::CreateVm(Call& c) {
  json_in::Fields f(c.body);
  std::string name = f.String("name");
  std::string site = f.String("site");
  const json* disks = f.Array("disks", /*optional=*/false);
  const json* spec = f.Object("spec");
  f.RefuseOthers();  // a misspelt field is refused, never ignored
  if (!f.ok()) return f.status();
  if (disks->empty()) return InvalidArgument("a VM needs at least one disk (--disk NAME:SIZE)");
  OSR_ASSIGN_OR_RETURN(json out,
                       vault_->CreateVm(name, site, *disks, spec ? *spec : json::object()));
  return Reply{201, out};
}

Result<VaultApi::Reply> VaultApi::ShowVm(Call& c) {
  OSR_ASSIGN_OR_RETURN(json out, vault_->ShowVm(c.Match(1)));
  return Reply{200, out};
}

Result<VaultApi::Reply> VaultApi::VmConsole(Call& c) {
  for (auto& [k, unused] : c.req.params) {
    if (k != "offset" && k != "bytes" && k != "which") {
      return InvalidArgument("query '" + k + "' is not one of which, offset, bytes");
    }
    if (c.req.get_param_value_count(k.c_str()) != 1) {
      return InvalidArgument("query '" + k + "' is given more than once");
    }
  }
  std::string which = c.req.has_param("which") ? c.req.get_param_value("which") : "vm";
  if (which != "vm" && which != "drill")
    return InvalidArgument("query 'which' must be vm or drill");
  std::optional<uint64_t> offset;
  if (c.req.has_param("offset")) {
    OSR_ASSIGN_OR_RETURN(int64_t o, QueryInt(c.req, "offset", 0, 0, int64_t{1} << 62));
    offset = static_cast<uint64_t>(o);
  }
  OSR_ASSIGN_OR_RETURN(int64_t bytes, QueryInt(c.req, "bytes", 16384, 1, 65536));
  OSR_ASSIGN_OR_RETURN(json out, vault_->VmConsole(c.Match(1), which == "drill", offset,
                                                   static_cast<uint64_t>(bytes)));
  return Reply{200, out};
}

// {"name": DISK, "size_bytes": N, "add": bool}: add (add true: the disk must be new) or
// grow (add false: it must exist) a disk of the VM where it runs.
Result<VaultApi::Reply> VaultApi::ChangeVmDisk(Call& c) {
  json_in::Fields f(c.body);
  std::string disk = f.String("name");
  uint64_t size = f.U64("size_bytes");
  bool add = f.Bool("add", false);
  f.RefuseOthers();
  if (!f.ok()) return f.status();
  OSR_ASSIGN_OR_RETURN(json out, vault_->ChangeVmDisk(c.Match(1), disk, size, add));
  return Reply{200, out};
}

Result<VaultApi::Reply> VaultApi::StartVm(Call& c) {
  OSR_ASSIGN_OR_RETURN(json out, vault_->StartVm(c.Match(1)));
  return Reply{200, out};
}

Result<VaultApi::Reply> VaultApi::StopVm(Call& c) {
  json_in::Fields f(c.body);
  int64_t timeout_ms = f.I64("timeout_ms", 30000, {0, 3600 * 1000});
  f.RefuseOthers();  // a misspelt field is refused, never ignored
  if (!f.ok()) return f.status();
  OSR_ASSIGN_OR_RETURN(json out, vault_->StopVm(c.Match(1), static_cast<int>(timeout_ms)));
  return Reply{200, out};
}

Result<VaultApi::Reply> VaultApi::RepairVm(Call& c) {
  json_in::Fields f(c.body);
  std::string site = f.String("site", "");
  bool trim_image = f.Bool("trim_image", false);
  bool reset_history = f.Bool("reset_history", false);
  bool accept_changes = f.Bool("accept_changes", false);
  f.RefuseOthers();
  if (!f.ok()) return f.status();
  if (!site.empty() && !ValidName(site))
    return InvalidArgument("'" + site + "' is not a site name");
  OSR_ASSIGN_OR_RETURN(
      json out, vault_->RepairVm(c.Match(1), site, trim_image, reset_history, accept_changes));
  return Reply{200, out};
}

Result<VaultApi::Reply> VaultApi::Protect(Call& c) {
  json_in::Fields f(c.body);
  std::string target = f.String("target");
  std::string policy = f.String("policy", "default");
  bool dry_run = f.Bool("dry_run", false);
  f.RefuseOthers();  // a misspelt field is refused, never ignored
  if (!f.ok()) return f.status();
  OSR_ASSIGN_OR_RETURN(json out, vault_->Protect(c.Match(1), target, policy, dry_run));
  return Reply{dry_run ? 200 : 202, out};
}

// ---- Handlers: replicated items, points, jobs -----------------------------------------

Result<VaultApi::Reply> VaultApi::ListItems(Call&) {
  OSR_ASSIGN_OR_RETURN(json out, vault_->ListItems());
  return Reply{200, out};
}

Result<VaultApi::Reply> VaultApi::ShowItem(Call& c) {
  OSR_ASSIGN_OR_RETURN(json out, vault_->ShowItem(c.Match(1)));
  return Reply{200, out};
}

Result<VaultApi::Reply> VaultApi::Unprotect(Call& c) {
  OSR_ASSIGN_OR_RETURN(json out, vault_->Unprotect(c.Match(1)));
  return Reply{200, out};
}

Result<VaultApi::Reply> VaultApi::ItemRpo(Call& c) {
  OSR_ASSIGN_OR_RETURN(int64_t seconds, QueryInt(c.req, "seconds", 3600, 1, 86400));
  std::string vm = c.Match(1);
  if (!catalog_.Item(vm)) return NotFound("VM " + vm + " is not protected");
  json out = json::array();
  for (auto& [t, r] : catalog_.RpoSamples(vm, NowNs() - seconds * kNsPerS)) {
    out.push_back({{"time", FormatTimeNs(t)}, {"rpo_seconds", r}});
  }
  return Reply{200, out};
}

Result<VaultApi::Reply> VaultApi::Metrics(Call&) {
  auto text = vault_->MetricsText();
  if (!text.ok()) {
    // Whatever the catalog's trouble, the scraper should try again later: 503.
    return Status(Code::kUnavailable,
                  "no metrics: the catalog cannot be read: " + text.status().message());
  }
  return Reply::Text(200, kMetricsContentType, std::move(*text));
}

Result<VaultApi::Reply> VaultApi::ListPoints(Call& c) {
  OSR_ASSIGN_OR_RETURN(json out, vault_->ListPoints(c.Match(1)));
  return Reply{200, out};
}

Result<VaultApi::Reply> VaultApi::CreatePoint(Call& c) {
  json_in::Fields f(c.body);
  bool app = f.Bool("app", false);
  f.RefuseOthers();  // a misspelt field is refused, never ignored
  if (!f.ok()) return f.status();
  OSR_ASSIGN_OR_RETURN(json out, vault_->CreatePoint(c.Match(1), app));
  return Reply{201, out};
}

Result<VaultApi::Reply> VaultApi::TestFailover(Call& c) {
  json_in::Fields f(c.body);
  std::string point = f.String("point", "latest");
  bool start = f.Bool("start", true);
  bool dry_run = f.Bool("dry_run", false);
  f.RefuseOthers();  // a misspelt field is refused, never ignored
  if (!f.ok()) return f.status();
  OSR_ASSIGN_OR_RETURN(json out, vault_->TestFailover(c.Match(1), point, start, dry_run));
  return Reply{dry_run ? 200 : 202, out};
}

Result<VaultApi::Reply> VaultApi::TestFailoverCleanup(Call& c) {
  json_in::Fields f(c.body);
  std::string notes = f.String("notes", "");
  f.RefuseOthers();  // a misspelt field is refused, never ignored
  if (!f.ok()) return f.status();
  if (notes.size() > 4096) return InvalidArgument("notes: at most 4096 bytes");
  OSR_ASSIGN_OR_RETURN(json out, vault_->TestFailoverCleanup(c.Match(1), notes));
  return Reply{202, out};
}

Result<VaultApi::Reply> VaultApi::Failover(Call& c) {
  json_in::Fields f(c.body);
  std::string point = f.String("point", "latest");
  bool shutdown_source = f.Bool("shutdown_source", false);
  bool planned = f.Bool("planned", false);
  bool start = f.Bool("start", true);
  bool dry_run = f.Bool("dry_run", false);
  f.RefuseOthers();  // a misspelt field is refused, never ignored
  if (!f.ok()) return f.status();
  OSR_ASSIGN_OR_RETURN(
      json out, vault_->Failover(c.Match(1), point, shutdown_source, planned, start, dry_run));
  return Reply{dry_run ? 200 : 202, out};
}

Result<VaultApi::Reply> VaultApi::ChangePoint(Call& c) {
  json_in::Fields f(c.body);
  std::string point = f.String("point");
  f.RefuseOthers();  // a misspelt field is refused, never ignored
  if (!f.ok()) return f.status();
  OSR_ASSIGN_OR_RETURN(json out, vault_->ChangePoint(c.Match(1), point));
  return Reply{202, out};
}

Result<VaultApi::Reply> VaultApi::Commit(Call& c) {
  OSR_ASSIGN_OR_RETURN(json out, vault_->Commit(c.Match(1)));
  return Reply{202, out};
}

Result<VaultApi::Reply> VaultApi::Reprotect(Call& c) {
  json_in::Fields f(c.body);
  bool compare = f.Bool("compare", false);
  bool dry_run = f.Bool("dry_run", false);
  f.RefuseOthers();  // a misspelt field is refused, never ignored
  if (!f.ok()) return f.status();
  OSR_ASSIGN_OR_RETURN(json out, vault_->Reprotect(c.Match(1), compare, dry_run));
  return Reply{dry_run ? 200 : 202, out};
}

Result<VaultApi::Reply> VaultApi::ShowVault(Call&) {
  OSR_ASSIGN_OR_RETURN(json out, vault_->ShowVault());
  return Reply{200, out};
}

Result<VaultApi::Reply> VaultApi::ListStates(Call&) {
  return Reply{200, StatesJson()};
}

Result<VaultApi::Reply> VaultApi::ShowClock(Call&) {
  return Reply{200, vault_->ClockStatus()};
}

Result<VaultApi::Reply> VaultApi::ConfirmClock(Call& c) {
  OSR_ASSIGN_OR_RETURN(json out, vault_->ConfirmClock(c.who->name));
  return Reply{200, out};
}

Result<VaultApi::Reply> VaultApi::ListJobs(Call& c) {
  OSR_ASSIGN_OR_RETURN(int64_t limit, QueryInt(c.req, "limit", 0, 0, 100000));
  OSR_ASSIGN_OR_RETURN(
      json jobs, vault_->ListJobs(c.req.get_param_value("vm"), c.req.get_param_value("state")));
  if (limit > 0 && jobs.size() > static_cast<size_t>(limit)) {  // the newest, oldest first
    jobs.erase(jobs.begin(), jobs.end() - limit);
  }
  return Reply{200, jobs};
}

Result<VaultApi::Reply> VaultApi::ShowJob(Call& c) {
  OSR_ASSIGN_OR_RETURN(int64_t id, ParseId(c.Match(1), "job id"));
  OSR_ASSIGN_OR_RETURN(json out, vault_->ShowJob(id));
  return Reply{200, out};
}

Result<VaultApi::Reply> VaultApi::CancelJob(Call& c) {
  OSR_ASSIGN_OR_RETURN(int64_t id, ParseId(c.Match(1), "job id"));
  OSR_ASSIGN_OR_RETURN(json out, vault_->CancelJob(id));
  // 200: it stopped (Cancelled); 202: asked, still stopping (cancel_requested).
  return Reply{out.contains("cancel_requested") ? 202 : 200, out};
}

}  // namespace osr::vault
