#include "hypervisor/vm_spec.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

namespace osr::hypervisor {
namespace {

using nlohmann::json;

// The message of a refused spec, which must name `field`.
std::string Refused(const json& j, SpecSource source = SpecSource::kNew) {
  auto r = ParseVmSpec(j, source);
  EXPECT_FALSE(r.ok()) << j.dump();
  if (r.ok()) return {};
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
  return r.status().message();
}

TEST(VmSpec, DefaultsAndNormalForm) {
  auto none = ParseVmSpec(json(), SpecSource::kNew);
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(none->driver, Driver::kNone);
  EXPECT_EQ(VmSpecJson(*none),
            (json{{"driver", "none"}, {"shutdown_timeout_ms", 30000}, {"hook_timeout_ms", 60000}}));

  auto q = ParseVmSpec(json{{"driver", "qemu"},
                            {"qemu_args_name", "tiny"},
                            {"cpus", 2},
                            {"hooks", {{"freeze", {{"name", "db-freeze"}}}, {"thaw", "x"}}}},
                       SpecSource::kNew);
  ASSERT_TRUE(q.ok()) << q.status().message();
  json n = VmSpecJson(*q);
  EXPECT_EQ(n["qemu_args_name"], "tiny");
  EXPECT_EQ(n["memory_bytes"], 512u << 20);
  EXPECT_EQ(n["cpus"], 2);
  EXPECT_EQ(n["guest_agent"], true);
  EXPECT_EQ(n["hooks"]["freeze"], (json{{"name", "db-freeze"}}));
  // The bare-string shape of older specs reads as a literal command.
  EXPECT_EQ(n["hooks"]["thaw"], (json{{"command", "x"}}));
  // The normal form reads back to itself.
  auto again = ParseVmSpec(n, SpecSource::kNew);
  ASSERT_TRUE(again.ok()) << again.status().message();
  EXPECT_EQ(VmSpecJson(*again), n);
}

TEST(VmSpec, NicsAndBootCheckReadBackToThemselves) {
  json in = {{"driver", "qemu"},
             {"nics",
              {{{"mac", "52:54:00:AB:cd:01"}, {"network", "prod"}},
               {{"mac", "52:54:00:00:00:02"},
                {"model", "e1000"},
                {"network", "backend"},
                {"ip", {{"recovery", "10.1.2.3/24"}}}}}},
             {"boot_check", {{"console_line", "login:"}, {"timeout_ms", 60000}}}};
  auto s = ParseVmSpec(in, SpecSource::kNew);
  ASSERT_TRUE(s.ok()) << s.status().message();
  ASSERT_EQ(s->nics.size(), 2u);
  EXPECT_EQ(s->nics[0].mac, "52:54:00:ab:cd:01");  // kept, in lower case
  EXPECT_EQ(s->nics[0].model, "virtio-net-pci");
  EXPECT_EQ(s->nics[1].ip_by_site.at("recovery"), "10.1.2.3/24");
  EXPECT_EQ(s->boot_check.console_line, "login:");
  json n = VmSpecJson(*s);
  auto again = ParseVmSpec(n, SpecSource::kNew);
  ASSERT_TRUE(again.ok()) << again.status().message();
  EXPECT_EQ(VmSpecJson(*again), n);
}

TEST(VmSpec, BadNicsAndBootChecksAreRefusedNamingTheField) {
  auto nic = [](json n) { return json{{"driver", "qemu"}, {"nics", json::array({n})}}; };
  json good = {{"mac", "52:54:00:12:34:56"}, {"network", "prod"}};
  auto with = [&](const char* k, json v) {
    json n = good;
    n[k] = v;
    return nic(n);
  };
  EXPECT_NE(Refused(with("mac", "01:00:5e:00:00:01")).find("nics[0].mac"), std::string::npos)
      << "a multicast MAC";
  EXPECT_NE(Refused(with("mac", "52:54:00:12:34")).find("nics[0].mac"), std::string::npos);
  EXPECT_NE(Refused(with("mac", "52-54-00-12-34-56")).find("nics[0].mac"), std::string::npos);
  EXPECT_NE(Refused(with("mac", "00:00:00:00:00:00")).find("nics[0].mac"), std::string::npos);
  EXPECT_NE(Refused(with("mac", 5)).find("nics[0].mac"), std::string::npos);
  EXPECT_NE(Refused(with("model", "virtio-net-pci,netdev=x")).find("nics[0].model"),
            std::string::npos);
  EXPECT_NE(Refused(with("network", "../etc")).find("nics[0].network"), std::string::npos);
  EXPECT_NE(Refused(with("network", "")).find("nics[0].network"), std::string::npos);
  EXPECT_NE(Refused(with("bridge", "br0")).find("nics[0].bridge"), std::string::npos)
      << "a site's bridge is its config's, not the spec's";
  for (const char* ip : {"10.0.0.1", "10.0.0.256/24", "10.0.0.1/33", "10.0.0/24", "1.2.3.4/0",
                         "01.2.3.4/8", "a.b.c.d/8", "10.0.0.1/24,x"}) {
    EXPECT_NE(Refused(with("ip", {{"recovery", ip}})).find("nics[0].ip.recovery"),
              std::string::npos)
        << ip;
  }
  EXPECT_NE(Refused(with("ip", {{"bad site!", "10.0.0.1/24"}})).find("nics[0].ip"),
            std::string::npos);
  json two = {{"driver", "qemu"}, {"nics", {good, good}}};
  EXPECT_NE(Refused(two).find("nics[1].mac"), std::string::npos) << "one MAC twice";
  json many = {{"driver", "qemu"}, {"nics", json::array()}};
  for (int i = 0; i < 9; ++i) {
    json n = good;
    n["mac"] = fmt::format("52:54:00:00:00:{:02x}", i);
    many["nics"].push_back(n);
  }
  EXPECT_NE(Refused(many).find("at most 8"), std::string::npos);
  EXPECT_NE(Refused(json{{"driver", "process"}, {"command", "x"}, {"nics", json::array()}})
                .find("only for driver qemu"),
            std::string::npos);

  auto boot = [](json b) { return json{{"driver", "qemu"}, {"boot_check", b}}; };
  EXPECT_NE(Refused(boot({{"console_line", "a\nb"}})).find("boot_check.console_line"),
            std::string::npos);
  EXPECT_NE(Refused(boot({{"console_line", std::string(300, 'x')}})).find("boot_check"),
            std::string::npos);
  EXPECT_NE(Refused(boot({{"timeout_ms", 10}})).find("boot_check.timeout_ms"), std::string::npos);
  EXPECT_NE(Refused(boot({{"timeout_ms", "soon"}})).find("boot_check.timeout_ms"),
            std::string::npos);
  // Nothing to answer a boot check: taken (a drill reports NotChecked), and its normal form
  // reads back (it once did not: the VM could never start again).
  auto quiet = ParseVmSpec(json{{"driver", "qemu"}, {"guest_agent", false}}, SpecSource::kNew);
  ASSERT_TRUE(quiet.ok()) << quiet.status().message();
  auto back = ParseVmSpec(VmSpecJson(*quiet), SpecSource::kStored);
  EXPECT_TRUE(back.ok()) << back.status().message();
}

TEST(VmSpec, EveryFieldIsTypedAndInRangeAndTheErrorNamesIt) {
  struct Case {
    json spec;
    std::string field;
  };
  const Case cases[] = {
      {json::array(), "spec"},
      {{{"driver", 1}}, "spec.driver"},
      {{{"driver", "xen"}}, "spec.driver"},
      {{{"hook_timeout_ms", "soon"}}, "spec.hook_timeout_ms"},
      {{{"hook_timeout_ms", 0}}, "spec.hook_timeout_ms"},
      {{{"hook_timeout_ms", kHookTimeoutMsMax + 1}}, "spec.hook_timeout_ms"},
      {{{"hook_timeout_ms", -5}}, "spec.hook_timeout_ms"},
      {{{"hook_timeout_ms", 1.5}}, "spec.hook_timeout_ms"},
      {{{"shutdown_timeout_ms", "30s"}}, "spec.shutdown_timeout_ms"},
      {{{"shutdown_timeout_ms", 17446744074709551615ull}}, "spec.shutdown_timeout_ms"},
      {{{"hooks", "x"}}, "spec.hooks"},
      {{{"hooks", {{"freeze", 3}}}}, "spec.hooks.freeze"},
      {{{"hooks", {{"unfreeze", "x"}}}}, "spec.hooks.unfreeze"},
      {{{"hooks", {{"freeze", {{"name", "a b"}}}}}}, "spec.hooks.freeze.name"},
      {{{"hooks", {{"freeze", {{"name", "a"}, {"command", "b"}}}}}}, "spec.hooks.freeze.name"},
      {{{"hooks", {{"freeze", {{"name", 7}}}}}}, "spec.hooks.freeze.name"},
      {{{"hooks", {{"freeze", {{"cmd", "x"}}}}}}, "spec.hooks.freeze.cmd"},
      {{{"hooks", {{"freeze", {{"command", std::string("a\0b", 3)}}}}}},
       "spec.hooks.freeze.command"},
      {{{"driver", "process"}}, "spec.command_name"},
      {{{"driver", "process"}, {"command", 5}}, "spec.command"},
      {{{"driver", "process"}, {"command", std::string(kCommandBytesMax + 1, 'x')}},
       "spec.command"},
      {{{"driver", "process"}, {"command_name", "../x"}}, "spec.command_name"},
      {{{"driver", "process"}, {"command_name", "a"}, {"command", "b"}}, "spec.command_name"},
      {{{"driver", "process"}, {"command", "x"}, {"cpus", 2}}, "spec.cpus"},
      {{{"driver", "qemu"}, {"command", "x"}}, "spec.command"},
      {{{"driver", "qemu"}, {"memory_bytes", "1G"}}, "spec.memory_bytes"},
      {{{"driver", "qemu"}, {"memory_bytes", 1}}, "spec.memory_bytes"},
      {{{"driver", "qemu"}, {"memory_bytes", kMemoryBytesMax + (1 << 20)}}, "spec.memory_bytes"},
      {{{"driver", "qemu"}, {"memory_bytes", (64 << 20) + 1}}, "spec.memory_bytes"},
      {{{"driver", "qemu"}, {"cpus", 0}}, "spec.cpus"},
      {{{"driver", "qemu"}, {"cpus", kCpusMax + 1}}, "spec.cpus"},
      {{{"driver", "qemu"}, {"cpus", "2"}}, "spec.cpus"},
      {{{"driver", "qemu"}, {"guest_agent", "yes"}}, "spec.guest_agent"},
      {{{"driver", "qemu"}, {"accel", "xen"}}, "spec.accel"},
      {{{"driver", "qemu"}, {"qemu_args", "-monitor stdio"}}, "spec.qemu_args"},
      {{{"driver", "qemu"}, {"qemu_args", "-append 'x"}}, "spec.qemu_args"},
      {{{"driver", "qemu"}, {"qemu_args_name", ""}, {"qemu_args", 3}}, "spec.qemu_args"},
      {{{"comand", "x"}}, "spec.comand"},
  };
  for (const auto& c : cases) {
    std::string msg = Refused(c.spec);
    EXPECT_EQ(msg.rfind(c.field + ":", 0) == 0 || msg.rfind(c.field + " ", 0) == 0, true)
        << c.spec.dump() << " -> " << msg << " (want " << c.field << ")";
  }
}

TEST(VmSpec, AStoredSpecMayHaveUnknownFieldsButNotBadTypes) {
  json stored = {{"driver", "process"}, {"command", "x"}, {"from_a_newer_vault", 1}, {"cpus", 9}};
  EXPECT_FALSE(ParseVmSpec(stored, SpecSource::kNew).ok());
  EXPECT_TRUE(ParseVmSpec(stored, SpecSource::kStored).ok());
  stored["hook_timeout_ms"] = "soon";
  EXPECT_NE(Refused(stored, SpecSource::kStored).find("spec.hook_timeout_ms"), std::string::npos);
}

TEST(VmSpec, ASiteRunsLiteralsOnlyWhenItsConfigSaysSo) {
  CommandPolicy strict;
  strict.commands = {"appliance"};
  strict.qemu_args = {"tiny"};
  CommandPolicy lab = strict;
  lab.allow_literal = true;
  auto literal = ParseVmSpec({{"driver", "process"}, {"command", "id"}}, SpecSource::kNew).value();
  Status st = CheckCommands(literal, strict);
  EXPECT_EQ(st.code(), Code::kInvalidArgument);
  EXPECT_EQ(st.message().rfind("spec.command:", 0), 0u) << st.message();
  EXPECT_TRUE(CheckCommands(literal, lab).ok());

  auto named =
      ParseVmSpec({{"driver", "process"}, {"command_name", "appliance"}}, SpecSource::kNew).value();
  EXPECT_TRUE(CheckCommands(named, strict).ok());
  auto unknown =
      ParseVmSpec({{"driver", "process"}, {"command_name", "other"}}, SpecSource::kNew).value();
  st = CheckCommands(unknown, lab);
  EXPECT_EQ(st.message().rfind("spec.command_name:", 0), 0u) << st.message();

  auto args =
      ParseVmSpec({{"driver", "qemu"}, {"qemu_args", "-no-reboot"}}, SpecSource::kNew).value();
  st = CheckCommands(args, strict);
  EXPECT_EQ(st.message().rfind("spec.qemu_args:", 0), 0u) << st.message();
  EXPECT_TRUE(CheckCommands(args, lab).ok());
  auto qnamed =
      ParseVmSpec({{"driver", "qemu"}, {"qemu_args_name", "tiny"}}, SpecSource::kNew).value();
  EXPECT_TRUE(CheckCommands(qnamed, strict).ok());
  auto plain = ParseVmSpec({{"driver", "qemu"}}, SpecSource::kNew).value();
  EXPECT_TRUE(CheckCommands(plain, strict).ok());

  // ResolveCommand gives the entry's text, or the literal where allowed.
  std::map<std::string, std::string> entries = {{"appliance", "/usr/bin/appliance"}};
  EXPECT_EQ(
      ResolveCommand(named.command, entries, false, ProcessCommandFields(), kSiteRules).value(),
      "/usr/bin/appliance");
  EXPECT_EQ(
      ResolveCommand(literal.command, entries, true, ProcessCommandFields(), kSiteRules).value(),
      "id");
  EXPECT_FALSE(
      ResolveCommand(literal.command, entries, false, ProcessCommandFields(), kSiteRules).ok());
}

}  // namespace
}  // namespace osr::hypervisor
