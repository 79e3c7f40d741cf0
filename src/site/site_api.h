// The site daemon's HTTP API (for the vault) and Prometheus metrics, on cpp-httplib.
// JSON in and out; errors are {"error": {"code", "message"}} with an HTTP status chosen
// by what the caller should do (docs/api.md, "Site API").
//
// Thread model: cpp-httplib's thread pool calls the handlers; Site is thread-safe.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/socket.h"
#include "site/lease_token.h"
#include "site/site.h"

namespace httplib {
class Server;
struct Request;
struct Response;
}  // namespace httplib

namespace osr::site {

class SiteApi {
 public:
  // `site` is borrowed and outlives the API. Its config decides the transport: mutual TLS
  // with the site's certificate, answering only a certificate that names the vault
  // (api_vault_name); or, with api_insecure, plain HTTP on loopback (a lab).
  explicit SiteApi(Site* site);
  ~SiteApi();
  // kInvalidArgument for the TLS setup or plain HTTP off loopback; kUnavailable when the
  // address is taken.
  Result<ListenAddress> Listen(const ListenAddress& addr);
  void Start();
  void Stop();

 private:
  // Registers a route and keeps it in routes_ (GET /api/v1/routes lists them). Every
  // route is behind the lease-token fence (site/lease_token.h): a bad X-Osr-Lease-Token
  // is a 400; a state-changing route (not GET) with a token below the highest seen is
  // refused (409) and runs holding the fence; a GET records a higher token.
  void Add(const std::string& method, const std::string& pattern,
           std::function<void(const httplib::Request&, httplib::Response&)> handler);

  Site* site_;
  // The highest vault lease token seen (data_dir/lease-token); null only when it could
  // not be read, and then setup_ says why and the API does not listen.
  std::unique_ptr<LeaseTokenFence> lease_tokens_;
  std::vector<std::pair<std::string, std::string>> routes_;  // (method, pattern)
  Status setup_;  // a TLS file that did not load, or no TLS and no api_insecure
  std::unique_ptr<httplib::Server> http_;
  std::thread thread_;
  ListenAddress bound_;
};

}  // namespace osr::site
