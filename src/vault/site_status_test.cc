#include "vault/site_status.h"

#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

namespace osr::vault {
namespace {

using nlohmann::json;

// Two sites as a fake API: what each path answers, and every path asked.
struct FakeSites {
  std::map<std::string, Result<json>> answers;  // "site path" -> answer
  std::vector<std::string> asked;

  SiteStatusBoard::Fetch fetch() {
    return [this](const SiteRow& site, const std::string& path) -> Result<json> {
      std::string key = site.name + " " + path;
      asked.push_back(key);
      auto it = answers.find(key);
      if (it == answers.end()) return NotFound("site " + site.name + ": HTTP 404");
      return it->second;
    };
  }
};

const SiteRow kPrimary{"primary", "http://127.0.0.1:1/api/v1", "127.0.0.1:2"};
const SiteRow kRecovery{"recovery", "http://127.0.0.1:3/api/v1", "127.0.0.1:4"};

json Groups(int n) {
  json a = json::array();
  for (int i = 0; i < n; ++i) a.push_back({{"name", "vm" + std::to_string(i)}, {"last_seq", i}});
  return a;
}

// A pass over 100 items asks each site once per kind, and answers each item what its
// own GET would have said.
TEST(SiteStatusBoard, APassOverManyItemsAsksEachSiteOnce) {
  FakeSites sites;
  sites.answers.emplace("primary /groups", Groups(100));
  json stores = json::array();
  for (int i = 0; i < 100; ++i) {
    stores.push_back({{"name", "vm" + std::to_string(i)}, {"durable_seq", 2 * i}});
  }
  sites.answers.emplace("recovery /stores", stores);
  SiteStatusBoard board(sites.fetch(), SiteStatusBoard::Mode::kBulk);
  for (int i = 0; i < 100; ++i) {
    std::string vm = "vm" + std::to_string(i);
    auto g = board.Group(kPrimary, vm);
    ASSERT_TRUE(g.ok()) << g.status().ToString();
    EXPECT_EQ((*g)["last_seq"], i);
    auto s = board.Store(kRecovery, vm);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    EXPECT_EQ((*s)["durable_seq"], 2 * i);
  }
  EXPECT_EQ(sites.asked, (std::vector<std::string>{"primary /groups", "recovery /stores"}));
  EXPECT_EQ(board.calls(), 2);

  // A VM the site did not list: NotFound in the site's own words.
  auto missing = board.Group(kPrimary, "vm100");
  EXPECT_EQ(missing.status().code(), Code::kNotFound);
  EXPECT_EQ(missing.status().message(), "site primary: no VM vm100 at this site");
  EXPECT_EQ(board.Store(kRecovery, "nope").status().message(),
            "site recovery: no store for nope at this site");
  EXPECT_EQ(board.calls(), 2);

  // Forget: the next lookup asks again.
  board.Forget("primary");
  ASSERT_TRUE(board.Group(kPrimary, "vm1").ok());
  EXPECT_EQ(board.calls(), 3);
}

// A site that does not answer costs the pass one failed call, which every item there
// reads (not one connect timeout per item).
TEST(SiteStatusBoard, ASiteThatDoesNotAnswerFailsOncePerPass) {
  FakeSites sites;
  sites.answers.emplace("primary /groups",
                        Result<json>(Unavailable("site primary (x) is unreachable: Connection")));
  SiteStatusBoard board(sites.fetch(), SiteStatusBoard::Mode::kBulk);
  for (int i = 0; i < 50; ++i) {
    auto g = board.Group(kPrimary, "vm" + std::to_string(i));
    EXPECT_EQ(g.status().code(), Code::kUnavailable);
    EXPECT_NE(g.status().message().find("unreachable"), std::string::npos);
  }
  EXPECT_EQ(board.calls(), 1);
}

// Answers of the wrong shape from a site (an untrusted peer): an error for every item
// there, never a throw and never a partial listing.
TEST(SiteStatusBoard, AnAnswerOfTheWrongShapeIsAnErrorForEveryItemThere) {
  for (json bad : {json::object(), json("groups"), json::array({{{"name", 7}}}),
                   json::array({{{"name", "vm0"}}, 3}), json::array({json::array()})}) {
    FakeSites sites;
    sites.answers.emplace("primary /groups", bad);
    SiteStatusBoard board(sites.fetch(), SiteStatusBoard::Mode::kBulk);
    auto g = board.Group(kPrimary, "vm0");
    EXPECT_EQ(g.status().code(), Code::kCorruption) << bad.dump();
    EXPECT_NE(g.status().message().find("site primary groups"), std::string::npos)
        << g.status().ToString();
  }
}

// A site without the bulk routes (an older osrd answers 404): asked per VM instead.
TEST(SiteStatusBoard, ASiteWithoutTheBulkRouteIsAskedPerVm) {
  FakeSites sites;
  sites.answers.emplace("primary /groups/vm1", json{{"name", "vm1"}, {"last_seq", 9}});
  SiteStatusBoard board(sites.fetch(), SiteStatusBoard::Mode::kBulk);
  auto g = board.Group(kPrimary, "vm1");
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  EXPECT_EQ((*g)["last_seq"], 9);
  EXPECT_EQ(board.Group(kPrimary, "vm2").status().code(), Code::kNotFound);
  EXPECT_EQ(sites.asked, (std::vector<std::string>{"primary /groups", "primary /groups/vm1",
                                                   "primary /groups/vm2"}));
}

// Per-VM mode (one item): one GET per lookup, never the whole listing.
TEST(SiteStatusBoard, PerVmModeAsksForTheOneVm) {
  FakeSites sites;
  sites.answers.emplace("recovery /stores/vm3", json{{"name", "vm3"}, {"durable_seq", 4}});
  SiteStatusBoard board(sites.fetch(), SiteStatusBoard::Mode::kPerVm);
  auto s = board.Store(kRecovery, "vm3");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ((*s)["durable_seq"], 4);
  EXPECT_EQ(sites.asked, (std::vector<std::string>{"recovery /stores/vm3"}));
}

}  // namespace
}  // namespace osr::vault

namespace osr::vault {
namespace {

// The registered sites are read once per board, whatever the number of lookups.
TEST(SiteStatusBoard, SitesAreReadOncePerPass) {
  int reads = 0;
  SiteStatusBoard board(
      [](const SiteRow&, const std::string&) -> Result<nlohmann::json> {
        return NotFound("unused");
      },
      SiteStatusBoard::Mode::kBulk,
      [&] {
        ++reads;
        return std::vector<SiteRow>{kPrimary, kRecovery};
      });
  for (int i = 0; i < 100; ++i) {
    ASSERT_EQ(board.Site("primary")->api, kPrimary.api);
    ASSERT_EQ(board.Site("recovery")->replication, kRecovery.replication);
    ASSERT_FALSE(board.Site("elsewhere").has_value());
  }
  EXPECT_EQ(reads, 1);
}

}  // namespace
}  // namespace osr::vault
