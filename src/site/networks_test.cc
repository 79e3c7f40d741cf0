#include "site/networks.h"

#include <gtest/gtest.h>

#include <sstream>

namespace osr::site {
namespace {

Result<SiteNetworks> Load(const std::string& text) {
  std::istringstream in(text);
  toml::table t;
  try {
    t = toml::parse(in);
  } catch (const toml::parse_error& e) {
    ADD_FAILURE() << e.description();
    return InvalidArgument("parse");
  }
  return LoadNetworks(t, "site.toml");
}

std::string Refused(const std::string& text) {
  auto r = Load(text);
  EXPECT_FALSE(r.ok()) << text;
  return r.ok() ? "" : r.status().message();
}

TEST(Networks, ProductionAndDrillMappings) {
  auto n = Load(R"(
[networks.prod]
bridge = "br0"
drill_bridge = "osr-drill0"
[networks.lab]
user = true
)");
  ASSERT_TRUE(n.ok()) << n.status().message();
  const SiteNetwork& prod = n->at("prod");
  EXPECT_EQ(prod.production.kind, NetworkAttach::Kind::kBridge);
  EXPECT_EQ(prod.production.bridge, "br0");
  EXPECT_EQ(prod.drill.kind, NetworkAttach::Kind::kBridge);
  EXPECT_EQ(prod.drill.bridge, "osr-drill0");
  const SiteNetwork& lab = n->at("lab");
  EXPECT_EQ(lab.production.kind, NetworkAttach::Kind::kUser);
  EXPECT_FALSE(lab.production.restrict_out);
  // No drill_bridge: user networking with no way out.
  EXPECT_EQ(lab.drill.kind, NetworkAttach::Kind::kUser);
  EXPECT_TRUE(lab.drill.restrict_out);
}

TEST(Networks, ConfigMistakesAreRefusedNamingTheKey) {
  EXPECT_NE(Refused("[networks.prod]\n").find("networks.prod"), std::string::npos);
  EXPECT_NE(Refused("[networks.prod]\nbridge = \"br0\"\nuser = true\n").find("not both"),
            std::string::npos);
  EXPECT_NE(Refused("[networks.prod]\nbridge = \"a/b\"\n").find("networks.prod.bridge"),
            std::string::npos);
  EXPECT_NE(Refused("[networks.prod]\nbridge = \"a-name-longer-than-15\"\n").find("bridge"),
            std::string::npos);
  EXPECT_NE(Refused("[networks.prod]\nbridge = 5\n").find("bridge"), std::string::npos);
  EXPECT_NE(Refused("[networks.prod]\nuser = false\n").find("user"), std::string::npos);
  EXPECT_NE(Refused("[networks.prod]\nbridge = \"br0\"\nvlan = 5\n").find("vlan"),
            std::string::npos);
  EXPECT_NE(
      Refused("[networks.prod]\nbridge = \"br0\"\ndrill_bridge = \"br0\"\n").find("drill_bridge"),
      std::string::npos);
  // A drill bridge that is another network's production bridge is no isolation.
  EXPECT_NE(Refused("[networks.a]\nbridge = \"br0\"\n[networks.b]\nbridge = \"br1\"\n"
                    "drill_bridge = \"br0\"\n")
                .find("production bridge of networks.a"),
            std::string::npos);
  EXPECT_NE(Refused("networks = 5\n").find("networks"), std::string::npos);
  EXPECT_NE(Refused("[networks.\"bad name!\"]\nuser = true\n").find("network name"),
            std::string::npos);
}

TEST(Networks, PlansPlugEachNicIntoTheMappingOfTheRole) {
  auto n = Load("[networks.prod]\nbridge = \"br0\"\n[networks.lab]\nuser = true\n");
  ASSERT_TRUE(n.ok());
  std::vector<hypervisor::Nic> nics(2);
  nics[0].mac = "52:54:00:00:00:01";
  nics[0].network = "prod";
  nics[0].ip_by_site["recovery"] = "10.0.0.5/24";
  nics[1].mac = "52:54:00:00:00:02";
  nics[1].network = "lab";
  auto prod = PlanNetworks(nics, *n, NetRole::kProduction, "recovery", "vm1");
  ASSERT_TRUE(prod.ok()) << prod.status().message();
  ASSERT_EQ(prod->taps.size(), 1u);
  EXPECT_EQ(prod->taps[0].bridge, "br0");
  EXPECT_FALSE(prod->taps[0].drill);
  EXPECT_LT(prod->taps[0].name.size(), 16u);  // IFNAMSIZ
  ASSERT_EQ(prod->nics.size(), 2u);
  EXPECT_EQ(prod->nics[0].args[1].find("tap,id=osr-net0,ifname=" + prod->taps[0].name), 0u);
  EXPECT_EQ(prod->nics[0].args[3], "virtio-net-pci,netdev=osr-net0,mac=52:54:00:00:00:01");
  EXPECT_EQ(prod->nics[0].args[5], "name=opt/org.osr/nic0.ip,string=10.0.0.5/24");
  EXPECT_EQ(prod->nics[1].args[1], "user,id=osr-net1");

  auto drill = PlanNetworks(nics, *n, NetRole::kDrill, "recovery", "vm1/view-1");
  ASSERT_TRUE(drill.ok());
  EXPECT_TRUE(drill->taps.empty());  // no drill_bridge: user networking, restricted
  EXPECT_EQ(drill->nics[0].args[1], "user,id=osr-net0,restrict=on");
  EXPECT_EQ(drill->nics[1].args[1], "user,id=osr-net1,restrict=on");

  // TAP names differ per site, VM and role (two sites on one host share no device).
  auto other_site = PlanNetworks(nics, *n, NetRole::kProduction, "primary", "vm1");
  auto other_vm = PlanNetworks(nics, *n, NetRole::kProduction, "recovery", "vm2");
  ASSERT_TRUE(other_site.ok() && other_vm.ok());
  EXPECT_NE(other_site->taps[0].name, prod->taps[0].name);
  EXPECT_NE(other_vm->taps[0].name, prod->taps[0].name);

  nics[1].network = "storage";
  auto missing = PlanNetworks(nics, *n, NetRole::kProduction, "recovery", "vm1");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), Code::kFailedPrecondition);
  EXPECT_NE(missing.status().message().find("'storage'"), std::string::npos);
  EXPECT_NE(missing.status().message().find("networks.storage"), std::string::npos);
}

TEST(Networks, NetAdminIsReadFromTheEffectiveCapabilities) {
  // Root's full set, and one without bit 12 (CAP_NET_ADMIN) but with its neighbours.
  EXPECT_TRUE(
      HasNetAdmin("Name:\tosrd\nCapInh:\t0000000000000000\n"
                  "CapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\n"));
  EXPECT_FALSE(HasNetAdmin("CapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffefff\n"));
  EXPECT_TRUE(HasNetAdmin("CapEff:\t0000000000001000"));  // first line, no newline after
  // Only CapEff counts: a permitted but not effective capability cannot be used.
  EXPECT_FALSE(HasNetAdmin("CapPrm:\t0000000000001000\nCapEff:\t0000000000000000\n"));
  // Garbage: no capability.
  for (const char* bad : {"", "CapEff:", "CapEff:\tzz\n", "CapEff:\t11111111111111111111\n",
                          "XCapEff:\t0000000000001000\n"}) {
    EXPECT_FALSE(HasNetAdmin(bad)) << bad;
  }
}

}  // namespace
}  // namespace osr::site
