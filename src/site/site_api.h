// The site daemon's HTTP API (for the vault) and Prometheus metrics, on cpp-httplib.
// JSON in and out; errors are {"error": {"code", "message"}} with an HTTP status chosen
// by what the caller should do (docs/api.md, "Site API").
//
// Thread model: cpp-httplib's thread pool calls the handlers; Site is thread-safe.
#pragma once

#include <memory>
#include <thread>

#include "common/socket.h"
#include "site/site.h"

namespace httplib {
class Server;
}

namespace osr::site {

class SiteApi {
 public:
  explicit SiteApi(Site* site);  // borrowed; outlives the API
  ~SiteApi();
  Result<ListenAddress> Listen(const ListenAddress& addr);
  void Start();
  void Stop();

 private:
  Site* site_;
  std::unique_ptr<httplib::Server> http_;
  std::thread thread_;
  ListenAddress bound_;
};

}  // namespace osr::site
