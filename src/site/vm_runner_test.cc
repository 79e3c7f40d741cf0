#include "site/vm_runner.h"

#include <gtest/gtest.h>
#include <signal.h>

#include <filesystem>
#include <thread>

namespace osr::site {
namespace {

namespace fs = std::filesystem;

VmLaunch SleepLaunch(const std::string& dir) {
  VmLaunch l;
  l.name = "vm1";
  l.spec.driver = hypervisor::Driver::kProcess;
  l.command = "exec sleep 60";
  l.run_dir = dir;
  return l;
}

std::string TempDir() {
  std::string d = fs::temp_directory_path() / ("osr-vm-runner-" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

// Start, stop and freeze from several threads at once: every call runs whole (one driver
// call at a time), and after the last stop nothing runs — no VM started by a start that
// raced a stop is left behind.
TEST(VmRunner, StartStopAndFreezeFromManyThreadsLeaveNoVmBehind) {
  std::string dir = TempDir();
  VmRunner r;
  std::vector<pid_t> seen;
  std::mutex seen_mu;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 10; ++i) {
        if ((i + t) % 3 == 0) {
          EXPECT_TRUE(r.Start(SleepLaunch(dir)).ok());
          std::lock_guard lock(seen_mu);
          seen.push_back(r.snapshot().pid);
        } else if ((i + t) % 3 == 1) {
          EXPECT_TRUE(r.Stop(1000).ok());
        } else {
          // A process VM has no guest agent: refused, never a crash or a hang.
          EXPECT_EQ(r.Freeze(100).code(), Code::kNotSupported);
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  ASSERT_TRUE(r.Stop(1000).ok());
  EXPECT_FALSE(r.Refresh().running());
  EXPECT_EQ(r.snapshot().pid, 0);
  for (pid_t pid : seen) {
    if (pid > 0) {
      EXPECT_NE(::kill(pid, 0), 0) << "pid " << pid << " still runs";
    }
  }
  fs::remove_all(dir);
}

TEST(VmRunner, AVmThatEndsByItselfReadsAsStopped) {
  std::string dir = TempDir();
  VmRunner r;
  VmLaunch l = SleepLaunch(dir);
  l.command = "exit 0";
  ASSERT_TRUE(r.Start(l).ok());
  bool stopped = false;
  for (int i = 0; i < 100 && !stopped; ++i) {
    stopped = !r.Refresh().running();
    if (!stopped) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_TRUE(stopped);
  fs::remove_all(dir);
}

TEST(VmRunner, BootCheckFailsWhenTheVmStops) {
  std::string dir = TempDir();
  VmRunner r;
  VmLaunch l = SleepLaunch(dir);
  ASSERT_TRUE(r.Start(l).ok());
  hypervisor::BootCheck check;
  check.console_line = "never printed";
  check.timeout_ms = 60000;
  r.CheckBoot(check);
  EXPECT_EQ(r.snapshot().boot, BootState::kChecking);
  ASSERT_TRUE(r.Stop(1000).ok());
  // Stop ends the check: not healthy.
  EXPECT_EQ(r.snapshot().boot, BootState::kUnhealthy);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace osr::site
