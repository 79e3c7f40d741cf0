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

// Every way of reaching the host through extra qemu arguments that we know of is refused,
// and the documented harmless options pass (qemu_args.h).
TEST(CheckQemuArgs, RefusesEveryOptionThatReachesTheHost) {
  const std::vector<std::string> refused[] = {
      // consoles and control channels
      {"-monitor", "tcp:127.0.0.1:4444,server,nowait"},
      {"-monitor", "stdio"},
      {"--monitor", "unix:/tmp/m,server"},
      {"-qmp", "tcp:127.0.0.1:4444,server"},
      {"-qmp-pretty", "unix:/tmp/q,server"},
      {"-mon", "chardev=c0"},
      {"-chardev", "socket,id=c0,host=127.0.0.1,port=4444,server=on"},
      {"-serial", "tcp:127.0.0.1:4444"},
      {"-serial", "unix:/tmp/s"},
      {"-serial", "pipe:/tmp/p"},
      {"-serial", "file:/etc/passwd"},
      {"-parallel", "tcp:127.0.0.1:4444"},
      {"-gdb", "tcp::1234"},
      {"-s"},
      {"-vnc", ":0"},
      {"-spice", "port=5900"},
      {"-display", "vnc=:0"},
      {"-display", "gtk"},
      {"-incoming", "tcp:0:4444"},
      {"-qtest", "unix:/tmp/t"},
      // devices wired to host channels, files or networks
      {"-device", "virtserialport,chardev=c0"},
      {"-device", "virtio-rng-pci,chardev=c0"},
      {"-device", "virtio-rng-pci,rng=r0"},
      {"-device", "isa-serial,chardev=c0"},
      {"-device", "e1000,netdev=n0"},
      {"-device", "virtio-blk-pci,drive=d0"},
      {"-device", "virtio-rng-pci,romfile=/etc/shadow"},
      {"-device", "driver=ivshmem-plain,memdev=m0"},
      {"-device", "virtio-rng-pci,,chardev=c0"},
      {"-global", "virtio-rng-pci.romfile=/etc/shadow"},
      {"-set", "device.x.chardev=c0"},
      {"-netdev", "user,id=n0,hostfwd=tcp::2222-:22"},
      {"-netdev", "user,id=n0,guestfwd=tcp:10.0.2.100:1234-cmd:/bin/sh"},
      {"-netdev", "user,id=n0,smb=/"},
      {"-netdev", "tap,id=n0,script=/tmp/evil"},
      {"-netdev", "bridge,id=n0,helper=/tmp/evil"},
      {"-netdev", "socket,id=n0,listen=:1234"},
      {"-nic", "user,hostfwd=tcp::2222-:22"},
      {"-net", "user"},
      {"-object", "memory-backend-file,id=m,mem-path=/etc,size=1M"},
      {"-object", "rng-random,id=r0,filename=/dev/urandom"},
      {"-object", "secret,id=s,file=/etc/shadow"},
      {"-object", "tls-creds-x509,id=t,dir=/etc/osr"},
      {"-object", "filter-dump,id=f,netdev=n0,file=/tmp/x"},
      // host files
      {"-drive", "file=/etc/shadow,format=raw"},
      {"-drive", "file=/dev/sda,if=virtio"},
      {"-blockdev", "driver=file,filename=/etc/shadow,node-name=f"},
      {"-hda", "/etc/shadow"},
      {"-cdrom", "/etc/shadow"},
      {"/etc/shadow"},
      {"-fsdev", "local,id=f,path=/,security_model=none"},
      {"-virtfs", "local,path=/,mount_tag=root,security_model=none"},
      {"-kernel", "relative/vmlinuz"},
      {"-kernel", "/dev/sda"},
      {"-initrd", "/proc/self/environ"},
      {"-initrd", "/sys/firmware/dmi/tables/DMI"},
      {"-initrd", "/srv/../etc/shadow"},
      {"-kernel", "/srv/vmlinuz,file=/etc/shadow"},
      {"-bios", "/etc/shadow"},
      {"-pflash", "/etc/shadow"},
      {"-L", "/tmp"},
      {"-mem-path", "/etc"},
      {"-machine", "dumpdtb=/tmp/x"},
      {"-machine", "pc,dtb=/etc/shadow"},
      {"-machine", "pc,memory-backend=m0"},
      {"-machine", "pc,firmware=/etc/shadow"},
      {"-machine", "pc,accel=kvm"},
      {"-boot", "splash=/etc/shadow"},
      {"-smbios", "file=/etc/shadow"},
      {"-fw_cfg", "name=opt/x,file=/etc/shadow"},
      {"-add-fd", "fd=3,set=1"},
      {"-readconfig", "/tmp/evil.cfg"},
      {"-writeconfig", "/tmp/out.cfg"},
      {"-loadvm", "snap"},
      // what writes host files or loads code
      {"-D", "/tmp/qemu.log"},
      {"-d", "in_asm"},
      {"-pidfile", "/tmp/pid"},
      {"-plugin", "/tmp/evil.so"},
      {"-trace", "file=/tmp/t"},
      {"-daemonize"},
      {"-runas", "nobody"},
      {"-chroot", "/"},
      {"-run-with", "user=nobody"},
      {"-semihosting"},
      {"-semihosting-config", "enable=on,target=native"},
      {"-icount", "shift=1,rr=record,rrfile=/tmp/x"},
      // what the spec says instead, or osr itself
      {"-m", "1T"},
      {"-smp", "1024"},
      {"-accel", "kvm"},
      {"-enable-kvm"},
      {"-name", "other"},
      // malformed
      {"-cpu"},
      {"-cpu", "host,vmx=on/x"},
      {"-append", "console=ttyS0\nfoo"},
      {"-vga", "qxl"},
      {"-sandbox", "off,spawn=allow,x=y"},
      {"-rtc", "base=utc,,clock=host"},
      {""},
  };
  for (const auto& args : refused) {
    std::string shown;
    for (auto& a : args) shown += a + " ";
    Status st = CheckQemuArgs(args);
    EXPECT_EQ(st.code(), Code::kInvalidArgument) << "accepted: " << shown;
  }
  // The refusal names the option, never a value (a kernel command line may be a secret).
  Status st = CheckQemuArgs({"-append", "root=/dev/vda password=hunter2", "-monitor", "stdio"});
  EXPECT_NE(st.message().find("-monitor"), std::string::npos) << st.message();
  EXPECT_EQ(st.message().find("hunter2"), std::string::npos) << st.message();
  EXPECT_EQ(CheckQemuArgs({"secret-disk.img"}).message().find("secret"), std::string::npos);
}

TEST(CheckQemuArgs, AcceptsTheDocumentedHarmlessOptions) {
  const std::vector<std::string> accepted[] = {
      {},
      {"-kernel", "/srv/guest/vmlinuz", "-initrd", "/srv/guest/initrd.gz", "-append",
       "console=ttyS0 quiet root=/dev/vda1 panic=-1", "-no-reboot"},
      {"--kernel", "/srv/guest/vmlinuz"},
      {"-nographic"},
      {"-display", "none"},
      {"-vga", "std"},
      {"-cpu", "host"},
      {"-cpu", "qemu64,+ssse3,-svm,vmx=on"},
      {"-machine", "q35"},
      {"-M", "pc"},
      {"-machine", "type=q35,usb=off,vmport=off,kernel-irqchip=on,smm=off"},
      {"-rtc", "base=utc,clock=host,driftfix=slew"},
      {"-rtc", "base=2006-06-17T16:01:21"},
      {"-boot", "order=cd,menu=off,reboot-timeout=5000,strict=on"},
      {"-boot", "c"},
      {"-watchdog-action", "poweroff"},
      {"-device", "i6300esb"},
      {"-device", "virtio-rng-pci,id=rng0,bus=pci.0,addr=0x7"},
      {"-device", "driver=virtio-balloon-pci,id=b0"},
      {"-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"},
      {"-msg", "timestamp=on"},
  };
  for (const auto& args : accepted) {
    std::string shown;
    for (auto& a : args) shown += a + " ";
    Status st = CheckQemuArgs(args);
    EXPECT_TRUE(st.ok()) << shown << ": " << st.message();
  }
  EXPECT_TRUE(CheckQemuArgsText("-kernel /g/vmlinuz -append 'console=ttyS0 quiet'").ok());
  EXPECT_EQ(CheckQemuArgsText("-append 'x").code(), Code::kInvalidArgument);
  EXPECT_EQ(CheckQemuArgsText(std::string(kQemuArgsBytesMax + 1, ' ')).code(),
            Code::kInvalidArgument);
}

TEST_F(QemuDriverTest, TheDriverRefusesAForbiddenArgumentBeforeItStartsQemu) {
  QemuDriver vm;
  QemuSpec spec = Spec("monitor");
  spec.qemu_binary = "/bin/false";  // never reached: the filter refuses first
  spec.extra_args = "-monitor tcp:127.0.0.1:4444,server,nowait";
  Status st = vm.Start(spec);
  EXPECT_EQ(st.code(), Code::kInvalidArgument) << st.message();
  EXPECT_NE(st.message().find("-monitor"), std::string::npos) << st.message();
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
  spec.extra_args = "-cpu osr-no-such-cpu";  // passes the filter; qemu refuses it
  Status st = vm.Start(spec);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("osr-no-such-cpu"), std::string::npos) << st.message();
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
