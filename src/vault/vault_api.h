// The vault's REST API (docs/api.md) and the web UI's files, behind authentication
// (vault/auth.h, docs/security.md).
//
// Every route is one line of the route table (vault_api.cc, kRoutes): method, path
// pattern, the role it needs, and its named handler. Before a handler runs, the guard
//   1. refuses requests from foreign web pages: an Origin that is not this vault's, a
//      Host that is not one of its names (DNS rebinding), a body that is not
//      application/json (CSRF through simple forms);
//   2. authenticates the caller (Bearer token, or session cookie + X-CSRF-Token for
//      calls that change something): none or a bad one is 401;
//   3. checks the role: 403;
// and after it, every call that changes something (and every refused attempt) is written
// to the audit log. Bodies are parsed by json_in (size and depth limits, typed fields);
// nothing a client sends can end the process.
//
// Thread model: handlers run on cpp-httplib's thread pool; the API holds no state of its
// own besides the token-use cache (mu_).
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "common/socket.h"
#include "common/status.h"
#include "common/tls.h"
#include "vault/auth.h"

namespace httplib {
class Server;
struct Request;
struct Response;
}  // namespace httplib

namespace osr::vault {

class Vault;
class Catalog;

struct ApiConfig {
  ListenAddress listen;
  // HTTPS when cert and key are set (ca unused here).
  TlsFiles tls;
  // Plain HTTP on an address other than loopback; refused unless this is set.
  bool insecure_http = false;
  // Host names (without port) that clients may use besides the loopback names and the
  // listen address, e.g. "vault.example.com" (like Django's ALLOWED_HOSTS).
  std::vector<std::string> public_hosts;
  std::string web_dir;  // the web UI's built assets ("" or missing: none)
};

// Who is calling.
struct Principal {
  std::string name;  // "token 3 (alice)"
  Role role = Role::kReader;
  int64_t token_id = 0;
  bool via_session = false;
  std::string csrf;  // the session's CSRF token
};

// One line of the route table as the API lists it (GET /api/v1/routes).
struct RouteInfo {
  std::string method;
  std::string pattern;
  std::optional<Role> role;  // nullopt: no credential needed (login)
};

class VaultApi {
 public:
  // kInvalidArgument for a TLS file that does not load or plain HTTP on a non-loopback
  // address without insecure_http.
  static Result<std::unique_ptr<VaultApi>> Create(Vault* vault, const ApiConfig& cfg);
  ~VaultApi();
  // Binds (port 0: any free port); kUnavailable when the address is taken.
  Result<ListenAddress> Listen();
  void Start();
  void Stop();
  const ListenAddress& address() const { return bound_; }
  bool https() const { return !cfg_.tls.cert.empty(); }

  static const std::vector<RouteInfo>& Routes();

 private:
  struct Call;
  struct Reply {
    Reply(int status_in, nlohmann::json body_in) : status(status_in), body(std::move(body_in)) {}
    // A body that is not JSON (GET /metrics), sent as is.
    static Reply Text(int status, std::string content_type, std::string text) {
      Reply r(status, nullptr);
      r.content_type = std::move(content_type);
      r.text = std::move(text);
      return r;
    }
    int status = 200;
    nlohmann::json body;
    std::string content_type;  // "": the body is JSON
    std::string text;
  };
  using Handler = Result<Reply> (VaultApi::*)(Call&);
  struct Route {
    const char* method;
    const char* pattern;
    std::optional<Role> role;
    Handler handler;
  };
  static const std::vector<Route>& Table();

  VaultApi(Vault* vault, ApiConfig cfg);
  void Register(const Route& r);
  void Serve(const Route& r, const httplib::Request& req, httplib::Response& res);
  // The checks before authentication: Origin, Host, Content-Type. An error to answer
  // (403 or 415) or ok.
  Status CheckBrowserSafety(const httplib::Request& req) const;
  Result<Principal> Authenticate(const httplib::Request& req);
  void Audit(const httplib::Request& req, const Principal* who, int status,
             const std::string& message);
  // A call's JSON body for its audit row: one line, ASCII, every field whose name holds
  // token, password, secret or key replaced by "(not logged)", at any depth.
  static std::string AuditedBody(const nlohmann::json& body);

  // Handlers (one per route).
  Result<Reply> Login(Call& c);
  Result<Reply> Logout(Call& c);
  Result<Reply> WhoAmI(Call& c);
  Result<Reply> ListRoutes(Call& c);
  Result<Reply> ListTokens(Call& c);
  Result<Reply> CreateToken(Call& c);
  Result<Reply> RevokeToken(Call& c);
  Result<Reply> ListAudit(Call& c);
  Result<Reply> ListSites(Call& c);
  Result<Reply> RegisterSite(Call& c);
  Result<Reply> ListPolicies(Call& c);
  Result<Reply> CreatePolicy(Call& c);
  Result<Reply> ListVms(Call& c);
  Result<Reply> CreateVm(Call& c);
  Result<Reply> ShowVm(Call& c);
  Result<Reply> StartVm(Call& c);
  Result<Reply> ChangeVmDisk(Call& c);
  Result<Reply> VmConsole(Call& c);
  Result<Reply> StopVm(Call& c);
  Result<Reply> RepairVm(Call& c);
  Result<Reply> Protect(Call& c);
  Result<Reply> ListItems(Call& c);
  Result<Reply> ShowItem(Call& c);
  Result<Reply> Unprotect(Call& c);
  Result<Reply> ItemRpo(Call& c);
  Result<Reply> ListPoints(Call& c);
  Result<Reply> CreatePoint(Call& c);
  Result<Reply> TestFailover(Call& c);
  Result<Reply> TestFailoverCleanup(Call& c);
  Result<Reply> Failover(Call& c);
  Result<Reply> ChangePoint(Call& c);
  Result<Reply> Commit(Call& c);
  Result<Reply> Reprotect(Call& c);
  Result<Reply> ShowVault(Call& c);
  Result<Reply> ListStates(Call& c);
  Result<Reply> ShowClock(Call& c);
  Result<Reply> ConfirmClock(Call& c);
  Result<Reply> ListJobs(Call& c);
  Result<Reply> ShowJob(Call& c);
  Result<Reply> CancelJob(Call& c);
  Result<Reply> Metrics(Call& c);

  Vault* vault_;
  Catalog& catalog_;
  const ApiConfig cfg_;
  std::unique_ptr<httplib::Server> http_;
  ListenAddress bound_;
  std::thread thread_;
  std::mutex mu_;
  std::map<int64_t, int64_t> token_touched_ns_;        // guarded by mu_
  std::map<std::string, int64_t> anonymous_audit_ns_;  // guarded by mu_: by client address
};

// Makes a token for `name` with `role` that expires after ttl_s seconds; returns the
// token text (shown once; the catalog keeps its SHA-256). kInvalidArgument for a bad
// name or ttl.
Result<std::string> IssueToken(Catalog& catalog, const std::string& name, Role role, int64_t ttl_s,
                               const std::string& created_by);
// On a vault's first start: when the catalog has no usable admin token and `path` does
// not hold one, makes an admin token and writes it to `path` (0600). Returns whether it
// made one.
Result<bool> EnsureAdminToken(Catalog& catalog, const std::string& path);
// Checks a token against the catalog: the row when it is valid now; kPermissionDenied
// (unknown, wrong secret, revoked, expired) otherwise, with the reason.
Result<struct TokenRow> CheckToken(Catalog& catalog, const std::string& token, int64_t now_ns);

}  // namespace osr::vault
