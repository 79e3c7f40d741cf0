#include "hypervisor/allow_list.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

namespace osr::hypervisor {
namespace {

namespace fs = std::filesystem;

class AllowListTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("osr-allow-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string Write(const std::string& text, mode_t mode = 0600) {
    std::string path = dir_ + "/commands.toml";
    fs::remove(path);
    std::ofstream(path) << text;
    ::chmod(path.c_str(), mode);
    return path;
  }

  std::string dir_;
};

TEST_F(AllowListTest, ReadsNamedCommandsAndQemuArgs) {
  std::string path = Write(R"(
version = 1
[commands.appliance]
command = "/usr/local/bin/appliance --disks \"$OSR_DISKS\""
description = "the appliance"
[commands."db.v2"]
command = "exec /opt/db/run"
[qemu_args.tiny-linux]
args = "-kernel /srv/vm/vmlinuz -append 'console=ttyS0 quiet' -no-reboot"
)");
  auto c = LoadSiteCommands(path, false);
  ASSERT_TRUE(c.ok()) << c.status().message();
  EXPECT_EQ(c->commands.at("appliance"), "/usr/local/bin/appliance --disks \"$OSR_DISKS\"");
  EXPECT_EQ(c->commands.at("db.v2"), "exec /opt/db/run");
  EXPECT_EQ(c->qemu_args.size(), 1u);
  CommandPolicy p = c->Policy();
  EXPECT_FALSE(p.allow_literal);
  EXPECT_EQ(p.commands, (std::set<std::string>{"appliance", "db.v2"}));

  VmSpec named;
  named.driver = Driver::kProcess;
  named.command.name = "appliance";
  EXPECT_EQ(c->ProcessCommand(named).value(), c->commands.at("appliance"));
  VmSpec literal;
  literal.driver = Driver::kProcess;
  literal.command.literal = "id";
  auto refused = c->ProcessCommand(literal);
  EXPECT_EQ(refused.status().code(), Code::kInvalidArgument);
  EXPECT_NE(refused.status().message().find("spec.command"), std::string::npos);
  VmSpec qemu;
  qemu.driver = Driver::kQemu;
  EXPECT_EQ(c->QemuArgs(qemu).value(), "");
  qemu.qemu_args.name = "tiny-linux";
  EXPECT_EQ(c->QemuArgs(qemu).value(), c->qemu_args.at("tiny-linux"));
  qemu.qemu_args.name = "other";
  EXPECT_NE(c->QemuArgs(qemu).status().message().find("spec.qemu_args_name"), std::string::npos);

  auto lab = LoadSiteCommands(path, true);
  ASSERT_TRUE(lab.ok());
  EXPECT_EQ(lab->ProcessCommand(literal).value(), "id");
  // Literal qemu arguments pass the filter even in a lab.
  qemu.qemu_args = {"", "-monitor stdio"};
  EXPECT_NE(lab->QemuArgs(qemu).status().message().find("-monitor"), std::string::npos);

  auto none = LoadSiteCommands("", false);
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->commands.empty());
}

TEST_F(AllowListTest, RefusesABadFileNamingWhatIsWrong) {
  struct Case {
    std::string text;
    std::string says;
  };
  const Case cases[] = {
      {"[commands.x\ncommand = 1", "line"},
      {"version = 2", "'version' must be 1"},
      {"version = \"1\"", "'version' must be 1"},
      {"[hooks.x]\ncommand = \"y\"", "'hooks' is not a key"},
      {"commands = 3", "'commands' must be a table"},
      {"[commands]\nx = \"y\"", "[commands.x] must be a table"},
      {"[commands.\"a b\"]\ncommand = \"y\"", "[commands.a b]: the name"},
      {"[commands.x]\ncmd = \"y\"", "'cmd' is not a key here"},
      {"[commands.x]\ncommand = 3", "'command' must be a string"},
      {"[commands.x]\ncommand = \"\"", "'command' is missing or empty"},
      {"[commands.x]\ndescription = \"d\"", "'command' is missing or empty"},
      {"[qemu_args.x]\nargs = \"-monitor tcp:127.0.0.1:4444,server\"", "[qemu_args.x]: '-monitor'"},
      {"[qemu_args.x]\nargs = \"-chardev socket,id=c\"", "[qemu_args.x]: '-chardev'"},
  };
  for (const auto& c : cases) {
    std::string path = Write(c.text);
    auto r = LoadSiteCommands(path, false);
    ASSERT_FALSE(r.ok()) << c.text;
    EXPECT_EQ(r.status().code(), Code::kInvalidArgument) << c.text;
    EXPECT_NE(r.status().message().find(path), std::string::npos) << r.status().message();
    EXPECT_NE(r.status().message().find(c.says), std::string::npos)
        << c.text << " -> " << r.status().message();
  }
}

TEST_F(AllowListTest, RefusesAFileOthersMayWrite) {
  for (mode_t mode : {0620, 0602, 0666}) {
    std::string path = Write("[commands.x]\ncommand = \"y\"\n", mode);
    auto r = LoadSiteCommands(path, false);
    EXPECT_EQ(r.status().code(), Code::kPermissionDenied) << std::oct << mode;
    EXPECT_NE(r.status().message().find("chmod go-w"), std::string::npos) << r.status().message();
  }
  EXPECT_TRUE(LoadSiteCommands(Write("[commands.x]\ncommand = \"y\"\n", 0644), false).ok());
  EXPECT_EQ(LoadSiteCommands(dir_, false).status().code(), Code::kPermissionDenied);  // a folder
  EXPECT_EQ(LoadSiteCommands(dir_ + "/missing.toml", false).status().code(), Code::kNotFound);
}

}  // namespace
}  // namespace osr::hypervisor
