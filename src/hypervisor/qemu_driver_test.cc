#include "hypervisor/qemu_driver.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>

namespace osr::hypervisor {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

class QemuDriverTest : public ::testing::Test {
 protected:
  void SetUp() override {
    run_dir_ = fs::temp_directory_path() /
               ("osr-qemu-" + std::to_string(::getpid()) + "-" +
                ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(run_dir_);
  }
  void TearDown() override { fs::remove_all(run_dir_); }

  QemuSpec Spec(const std::string& name) {
    QemuSpec spec;
    spec.name = name;
    spec.memory_bytes = 64 << 20;
    spec.run_dir = run_dir_;
    return spec;
  }

  static bool HaveQemu() {
    for (const char* dir : {"/usr/local/bin", "/usr/bin", "/bin"}) {
      if (::access((std::string(dir) + "/qemu-system-x86_64").c_str(), X_OK) == 0) return true;
    }
    return false;
  }

  static double SecondsSince(Clock::time_point t0) {
    return std::chrono::duration<double>(Clock::now() - t0).count();
  }

  std::string run_dir_;
};

TEST_F(QemuDriverTest, AMissingBinaryFailsClearly) {
  QemuDriver vm;
  QemuSpec spec = Spec("bogus");
  spec.qemu_binary = "osr-no-such-qemu-system-x86_64";
  Status st = vm.Start(spec);
  EXPECT_EQ(st.code(), Code::kNotFound);
  EXPECT_NE(st.message().find("osr-no-such-qemu-system-x86_64"), std::string::npos) << st.message();
  EXPECT_FALSE(vm.running());

  spec.qemu_binary = "/nonexistent/qemu";
  EXPECT_EQ(vm.Start(spec).code(), Code::kNotFound);
}

TEST_F(QemuDriverTest, ABinaryThatExitsAtOnceFailsWithItsExitStatus) {
  QemuDriver vm;
  QemuSpec spec = Spec("exits");
  spec.qemu_binary = "/bin/false";
  auto t0 = Clock::now();
  Status st = vm.Start(spec);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("exited with status 1"), std::string::npos) << st.message();
  EXPECT_LT(SecondsSince(t0), 5.0);
  EXPECT_FALSE(vm.running());
  EXPECT_EQ(vm.Qmp("query-status").status().code(), Code::kUnavailable);
  EXPECT_EQ(vm.Freeze(100).code(), Code::kUnavailable);
}

TEST_F(QemuDriverTest, RefusesABadSpec) {
  QemuDriver vm;
  QemuSpec spec = Spec("bad");
  spec.memory_bytes = (64 << 20) + 1;
  EXPECT_EQ(vm.Start(spec).code(), Code::kInvalidArgument);
  spec = Spec("bad");
  spec.run_dir = "";
  EXPECT_EQ(vm.Start(spec).code(), Code::kInvalidArgument);
  spec = Spec("bad");
  spec.disks = {{"os", ""}};
  EXPECT_EQ(vm.Start(spec).code(), Code::kInvalidArgument);
  spec = Spec("bad");
  spec.accel = "xen";
  EXPECT_EQ(vm.Start(spec).code(), Code::kInvalidArgument);
  spec = Spec("bad");
  spec.extra_args = "-append 'console=ttyS0";
  EXPECT_EQ(vm.Start(spec).code(), Code::kInvalidArgument);
  EXPECT_FALSE(vm.running());
}

TEST_F(QemuDriverTest, NbdDisksBecomeReconnectingNbdDrivesOverTcpOrTheVmsSocket) {
  // A "qemu" that writes its arguments down and exits.
  fs::create_directories(run_dir_);
  std::string fake = run_dir_ + "/fake-qemu", args = run_dir_ + "/args";
  {
    std::FILE* f = std::fopen(fake.c_str(), "w");
    ASSERT_NE(f, nullptr);
    std::fprintf(f, "#!/bin/sh\nprintf '%%s\\n' \"$@\" > %s\nexit 3\n", args.c_str());
    std::fclose(f);
    fs::permissions(fake, fs::perms::owner_all);
  }
  QemuDriver vm;
  QemuSpec spec = Spec("vm1");
  spec.qemu_binary = fake;
  spec.guest_agent = false;
  spec.disks = {{"os", "nbd+unix:///vm/vm1/os?socket=/srv/osr/groups/vm1/run/nbd.sock"},
                {"data", "nbd://127.0.0.1:10809/vm/vm1/data"}};
  EXPECT_FALSE(vm.Start(spec).ok());  // it exits at once
  std::FILE* f = std::fopen(args.c_str(), "r");
  ASSERT_NE(f, nullptr);
  std::string text(4096, '\0');
  text.resize(std::fread(text.data(), 1, text.size(), f));
  std::fclose(f);
  EXPECT_NE(text.find("driver=nbd,server.type=unix,server.path=/srv/osr/groups/vm1/run/nbd.sock,"
                      "export=vm/vm1/os,reconnect-delay=60,"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=10809,"
                      "export=vm/vm1/data,reconnect-delay=60,"),
            std::string::npos)
      << text;
}

TEST(SplitArgs, SplitsOnWhitespaceAndKeepsQuotedSpaces) {
  auto words = SplitArgs("  -kernel /g/vmlinuz\t-append 'console=ttyS0 quiet' -name \"a b\"c '' ");
  ASSERT_TRUE(words.ok());
  EXPECT_EQ(*words, (std::vector<std::string>{"-kernel", "/g/vmlinuz", "-append",
                                              "console=ttyS0 quiet", "-name", "a bc", ""}));
  EXPECT_TRUE(SplitArgs("")->empty());
  EXPECT_EQ(SplitArgs("-append \"x").status().code(), Code::kInvalidArgument);
}

TEST_F(QemuDriverTest, QemuRefusingItsArgumentsShowsTheLogTail) {
  if (!HaveQemu()) GTEST_SKIP() << "qemu-system-x86_64 is not installed (apt qemu-system-x86)";
  QemuDriver vm;
  QemuSpec spec = Spec("badargs");
  spec.extra_args = "-osr-no-such-option";
  Status st = vm.Start(spec);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("-osr-no-such-option"), std::string::npos) << st.message();
  EXPECT_FALSE(vm.running());
}

// A VM with no disk and no kernel sits in the firmware ("No bootable device"): QMP
// answers, the guest ignores ACPI power-down, and no guest agent answers.
TEST_F(QemuDriverTest, AFirmwareOnlyVmAnswersQmpIsKilledOnStopAndHasNoAgent) {
  if (!HaveQemu()) GTEST_SKIP() << "qemu-system-x86_64 is not installed (apt qemu-system-x86)";
  QemuDriver vm;
  QemuSpec spec = Spec("firmware");
  ASSERT_TRUE(vm.Start(spec).ok());
  EXPECT_TRUE(vm.running());
  EXPECT_GT(vm.pid(), 0);
  EXPECT_EQ(vm.accel(), KvmUsable() ? "kvm" : "tcg");
  EXPECT_EQ(vm.Start(spec).code(), Code::kAlreadyExists);
  EXPECT_TRUE(fs::exists(run_dir_ + "/qmp.sock"));
  EXPECT_TRUE(fs::exists(run_dir_ + "/qga.sock"));

  auto status = vm.Qmp("query-status");
  ASSERT_TRUE(status.ok()) << status.status().ToString();
  EXPECT_EQ((*status)["status"], "running") << status->dump();
  auto kvm = vm.Qmp("query-kvm");
  ASSERT_TRUE(kvm.ok()) << kvm.status().ToString();
  EXPECT_EQ((*kvm)["enabled"], vm.accel() == "kvm") << kvm->dump();
  EXPECT_EQ(vm.Qmp("osr-no-such-command").status().code(), Code::kNotSupported);
  auto type = vm.Qmp("qom-get", {{"path", "/machine"}, {"property", "type"}});
  ASSERT_TRUE(type.ok()) << type.status().ToString();
  EXPECT_TRUE(type->is_string()) << type->dump();
  auto chardevs = vm.Qmp("query-chardev");
  ASSERT_TRUE(chardevs.ok()) << chardevs.status().ToString();
  EXPECT_NE(chardevs->dump().find("osr-qga0"), std::string::npos) << chardevs->dump();

  auto t0 = Clock::now();
  Status frozen = vm.Freeze(800);
  double freeze_secs = SecondsSince(t0);
  EXPECT_EQ(frozen.code(), Code::kUnavailable) << frozen.ToString();
  EXPECT_NE(frozen.message().find("guest-sync"), std::string::npos) << frozen.message();
  EXPECT_GE(freeze_secs, 0.7);
  EXPECT_LT(freeze_secs, 3.0);

  t0 = Clock::now();
  auto stopped = vm.Stop(1500);
  double stop_secs = SecondsSince(t0);
  ASSERT_TRUE(stopped.ok()) << stopped.status().ToString();
  EXPECT_FALSE(*stopped);  // the firmware ignores ACPI power-down: ended by us
  EXPECT_GE(stop_secs, 1.4);
  EXPECT_LT(stop_secs, 6.0);
  EXPECT_FALSE(vm.running());
  EXPECT_EQ(vm.Qmp("query-status").status().code(), Code::kUnavailable);
}

TEST_F(QemuDriverTest, WithoutTheAgentChannelFreezeIsNotSupported) {
  if (!HaveQemu()) GTEST_SKIP() << "qemu-system-x86_64 is not installed (apt qemu-system-x86)";
  QemuDriver vm;
  QemuSpec spec = Spec("noagent");
  spec.guest_agent = false;
  spec.accel = "tcg";
  ASSERT_TRUE(vm.Start(spec).ok());
  EXPECT_EQ(vm.accel(), "tcg");
  auto kvm = vm.Qmp("query-kvm");
  ASSERT_TRUE(kvm.ok()) << kvm.status().ToString();
  EXPECT_EQ((*kvm)["enabled"], false) << kvm->dump();
  EXPECT_FALSE(fs::exists(run_dir_ + "/qga.sock"));
  EXPECT_EQ(vm.Freeze(500).code(), Code::kNotSupported);
  // A guest that is paused cannot answer ACPI either; quit ends it well before SIGKILL.
  ASSERT_TRUE(vm.Qmp("stop").ok());
  auto stopped = vm.Stop(200);
  ASSERT_TRUE(stopped.ok());
  EXPECT_FALSE(*stopped);
  EXPECT_FALSE(vm.running());
}

}  // namespace
}  // namespace osr::hypervisor
