#include "vault/site_status.h"

#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

#include "common/json_in.h"

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

namespace osr::vault {
namespace {

json Store(const std::string& name, int durable_seq) {
  return json{{"name", name}, {"durable_seq", durable_seq}};
}

// A store lookup's durable_seq, or -1 (and a failure) when it failed.
int DurableSeq(const Result<json>& r) {
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  if (!r.ok()) return -1;
  json_in::Fields f(r.value());
  int64_t seq = f.I64("durable_seq", -1);
  return f.ok() ? static_cast<int>(seq) : -1;
}

json Changes(const std::string& generation, bool full, json stores, json removed) {
  return json{{"generation", generation}, {"full", full}, {"stores", stores}, {"removed", removed}};
}

// With a memory, a pass asks for what changed since the last one (one call per site), and
// answers every store: the changed ones as sent now, the others as remembered.
TEST(SiteStatusBoard, WithAMemoryAPassAsksOnlyForWhatChanged) {
  FakeSites sites;
  json all = json::array();
  for (int i = 0; i < 100; ++i) all.push_back(Store("vm" + std::to_string(i), i));
  sites.answers.emplace("recovery /stores?since=0", Changes("g-1", true, all, json::array()));
  sites.answers.emplace("recovery /stores?since=g-1",
                        Changes("g-2", false, json::array({Store("vm7", 70), Store("vm100", 1)}),
                                json::array({"vm3"})));
  sites.answers.emplace("recovery /stores?since=g-2",
                        Changes("g-2", false, json::array(), json::array()));
  StoreMemory memory;
  {
    SiteStatusBoard board(sites.fetch(), SiteStatusBoard::Mode::kBulk);
    board.Remember(&memory, /*refresh=*/false);
    for (int i = 0; i < 100; ++i) {
      auto s = board.Store(kRecovery, "vm" + std::to_string(i));
      ASSERT_TRUE(s.ok()) << s.status().ToString();
      EXPECT_EQ((*s)["durable_seq"], i);
    }
    EXPECT_EQ(board.calls(), 1);
  }
  {
    SiteStatusBoard board(sites.fetch(), SiteStatusBoard::Mode::kBulk);
    board.Remember(&memory, /*refresh=*/false);
    EXPECT_EQ(DurableSeq(board.Store(kRecovery, "vm7")), 70);   // changed
    EXPECT_EQ(DurableSeq(board.Store(kRecovery, "vm8")), 8);    // remembered
    EXPECT_EQ(DurableSeq(board.Store(kRecovery, "vm100")), 1);  // new
    auto gone = board.Store(kRecovery, "vm3");
    EXPECT_EQ(gone.status().code(), Code::kNotFound);
    EXPECT_EQ(gone.status().message(), "site recovery: no store for vm3 at this site");
    EXPECT_EQ(board.calls(), 1);
  }
  {
    SiteStatusBoard board(sites.fetch(), SiteStatusBoard::Mode::kBulk);
    board.Remember(&memory, /*refresh=*/false);
    EXPECT_EQ(DurableSeq(board.Store(kRecovery, "vm7")), 70);
    EXPECT_EQ(board.Store(kRecovery, "vm3").status().code(), Code::kNotFound);
  }
  // A refresh asks for everything again; a full answer replaces what was remembered.
  sites.answers.insert_or_assign(
      "recovery /stores?since=0",
      Changes("h-1", true, json::array({Store("vm1", 11)}), json::array()));
  {
    SiteStatusBoard board(sites.fetch(), SiteStatusBoard::Mode::kBulk);
    board.Remember(&memory, /*refresh=*/true);
    EXPECT_EQ(DurableSeq(board.Store(kRecovery, "vm1")), 11);
    EXPECT_EQ(board.Store(kRecovery, "vm7").status().code(), Code::kNotFound);
  }
  EXPECT_EQ(sites.asked,
            (std::vector<std::string>{"recovery /stores?since=0", "recovery /stores?since=g-1",
                                      "recovery /stores?since=g-2", "recovery /stores?since=0"}));
}

// A site that does not answer: one failure for the pass, and the memory is kept (the next
// pass asks since the same generation). An older site answering the plain array: read in
// full, nothing remembered. One answering 404: per VM.
TEST(SiteStatusBoard, WithAMemoryFailuresAndOlderSites) {
  FakeSites sites;
  sites.answers.emplace("recovery /stores?since=0",
                        Changes("g-1", true, json::array({Store("vm1", 1)}), json::array()));
  StoreMemory memory;
  {
    SiteStatusBoard board(sites.fetch(), SiteStatusBoard::Mode::kBulk);
    board.Remember(&memory, false);
    ASSERT_TRUE(board.Store(kRecovery, "vm1").ok());
  }
  sites.answers.emplace("recovery /stores?since=g-1",
                        Result<json>(Unavailable("site recovery (x) is unreachable")));
  {
    SiteStatusBoard board(sites.fetch(), SiteStatusBoard::Mode::kBulk);
    board.Remember(&memory, false);
    for (int i = 0; i < 10; ++i) {
      EXPECT_EQ(board.Store(kRecovery, "vm1").status().code(), Code::kUnavailable);
    }
    EXPECT_EQ(board.calls(), 1);
  }
  sites.answers.insert_or_assign("recovery /stores?since=g-1",
                                 json::array({Store("vm1", 5), Store("vm2", 6)}));
  {
    SiteStatusBoard board(sites.fetch(), SiteStatusBoard::Mode::kBulk);
    board.Remember(&memory, false);
    EXPECT_EQ(DurableSeq(board.Store(kRecovery, "vm1")), 5);
    EXPECT_EQ(DurableSeq(board.Store(kRecovery, "vm2")), 6);
  }
  // Nothing was remembered from the array: the next pass starts from 0; a 404 there
  // means per VM.
  sites.answers.erase("recovery /stores?since=0");
  sites.answers.emplace("recovery /stores/vm2", Store("vm2", 8));
  {
    SiteStatusBoard board(sites.fetch(), SiteStatusBoard::Mode::kBulk);
    board.Remember(&memory, false);
    EXPECT_EQ(DurableSeq(board.Store(kRecovery, "vm2")), 8);
  }
  EXPECT_EQ(sites.asked.at(3), "recovery /stores?since=0");
  EXPECT_EQ(sites.asked.back(), "recovery /stores/vm2");
}

// An answer of the wrong shape: an error for every store there, and nothing of it is
// remembered (the next pass starts from 0).
TEST(SiteStatusBoard, WithAMemoryABadAnswerIsAnErrorAndForgotten) {
  for (json bad : {json("x"), json::object(), Changes("g-2", false, json::object(), json::array()),
                   Changes("g-2", false, json::array(), json::array({7})),
                   Changes("g-2", false, json::array({{{"name", 3}}}), json::array()),
                   Changes("g-2&x=1", false, json::array(), json::array()),
                   Changes("", false, json::array(), json::array()),
                   Changes(std::string(100, 'a'), false, json::array(), json::array()),
                   json{{"generation", 5},
                        {"full", false},
                        {"stores", json::array()},
                        {"removed", json::array()}}}) {
    FakeSites sites;
    sites.answers.emplace("recovery /stores?since=0",
                          Changes("g-1", true, json::array({Store("vm1", 1)}), json::array()));
    sites.answers.emplace("recovery /stores?since=g-1", bad);
    StoreMemory memory;
    for (int pass = 0; pass < 3; ++pass) {
      SiteStatusBoard board(sites.fetch(), SiteStatusBoard::Mode::kBulk);
      board.Remember(&memory, false);
      auto s = board.Store(kRecovery, "vm1");
      if (pass == 1) {
        EXPECT_EQ(s.status().code(), Code::kCorruption) << bad.dump();
        EXPECT_NE(s.status().message().find("site recovery stores"), std::string::npos)
            << s.status().ToString();
      } else {
        EXPECT_TRUE(s.ok()) << bad.dump() << " " << s.status().ToString();
      }
    }
    EXPECT_EQ(sites.asked,
              (std::vector<std::string>{"recovery /stores?since=0", "recovery /stores?since=g-1",
                                        "recovery /stores?since=0"}))
        << bad.dump();
  }
}

}  // namespace
}  // namespace osr::vault
