// The site client carries the leader's lease token (vault/site_client.h): a call made under
// a term's fence sends the term's token, a call without a fence sends none, and a
// state-changing call of a term that has ended is refused here without being sent (its
// reads still go). A cpp-httplib server on 127.0.0.1 stands for the site.
#include "vault/site_client.h"

#include <gtest/gtest.h>
#include <httplib.h>

#include <chrono>
#include <mutex>
#include <thread>
#include <vector>

#include "common/https.h"
#include "vault/catalog.h"

namespace osr::vault {
namespace {

class FakeSite {
 public:
  FakeSite() {
    auto note = [this](const httplib::Request& req, httplib::Response& res) {
      std::lock_guard lock(mu_);
      seen_.push_back(
          req.method + " " + req.path + " token=" +
          (req.has_header(kLeaseTokenHeader) ? req.get_header_value(kLeaseTokenHeader) : "none"));
      res.set_content("{}", "application/json");
    };
    http_.Get("/api/v1/x", note);
    http_.Put("/api/v1/x", note);
    http_.Post("/api/v1/x", note);
    http_.Delete("/api/v1/x", note);
    port_ = http_.bind_to_any_port("127.0.0.1");
    thread_ = std::thread([this] { http_.listen_after_bind(); });
    // Bound and listening already: a call before the loop runs waits in the backlog.
  }
  ~FakeSite() {
    http_.stop();
    thread_.join();
  }
  SiteRow Row() const {
    return {"s1", "http://127.0.0.1:" + std::to_string(port_) + "/api/v1", "127.0.0.1:1"};
  }
  std::vector<std::string> Seen() {
    std::lock_guard lock(mu_);
    return seen_;
  }

 private:
  httplib::Server http_;
  int port_ = 0;
  std::thread thread_;
  std::mutex mu_;
  std::vector<std::string> seen_;  // guarded by mu_
};

TEST(SiteClientTest, CallsCarryTheTermsTokenAndAnEndedTermsChangesAreNotSent) {
  FakeSite site;
  SiteClient client(site.Row(), TlsFiles{});
  ASSERT_TRUE(client.Call("PUT", "/x", nlohmann::json::object()).ok());  // no fence: no token
  LeaseFence fence("a", 7, 6000);
  {
    FenceScope scope(&fence);
    ASSERT_TRUE(client.Call("GET", "/x").ok());
    ASSERT_TRUE(client.Call("POST", "/x", nlohmann::json::object()).ok());
    ASSERT_TRUE(client.CallRaw("POST", "/x", "raw").ok());
    fence.Lose();
    for (const char* method : {"PUT", "POST", "DELETE"}) {
      auto r = client.Call(method, "/x");
      ASSERT_FALSE(r.ok()) << method;
      EXPECT_EQ(r.status().code(), Code::kFailedPrecondition);
      EXPECT_NE(r.status().message().find("lease term (token 7) has ended"), std::string::npos)
          << r.status().message();
    }
    EXPECT_FALSE(client.CallRaw("POST", "/x", "raw").ok());
    ASSERT_TRUE(client.Call("GET", "/x").ok());  // reads are never refused
  }
  EXPECT_EQ(site.Seen(), (std::vector<std::string>{
                             "PUT /api/v1/x token=none",
                             "GET /api/v1/x token=7",
                             "POST /api/v1/x token=7",
                             "POST /api/v1/x token=7",
                             "GET /api/v1/x token=7",
                         }));
}

}  // namespace
}  // namespace osr::vault
