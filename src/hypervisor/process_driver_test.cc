#include "hypervisor/process_driver.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

namespace osr::hypervisor {
namespace {

namespace fs = std::filesystem;

std::string TempPath(const std::string& name) {
  return fs::temp_directory_path() / ("osr-vm-" + std::to_string(::getpid()) + "-" + name);
}

bool WaitForFile(const std::string& path) {
  for (int i = 0; i < 250; ++i) {
    if (fs::exists(path) && fs::file_size(path) > 0) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return false;
}

TEST(ProcessDriver, TheVmSeesItsDisksAndStopsOnSigterm) {
  std::string out = TempPath("env"), log = TempPath("log");
  fs::remove(out);
  ProcessDriver vm;
  ProcessSpec spec{
      "vm1",
      "echo \"$OSR_VM|$OSR_DISK_OS|$OSR_DISK_DATA_1|$OSR_DISKS\" > " + out + "; exec sleep 60",
      {{"os", "nbd://127.0.0.1:1/vm1/os"}, {"data-1", "nbd://127.0.0.1:1/vm1/data-1"}},
      log};
  ASSERT_TRUE(vm.Start(spec).ok());
  EXPECT_TRUE(vm.running());
  EXPECT_EQ(vm.Start(spec).code(), Code::kAlreadyExists);
  ASSERT_TRUE(WaitForFile(out));
  std::string line;
  std::getline(std::ifstream(out) >> std::ws, line);
  EXPECT_EQ(line,
            "vm1|nbd://127.0.0.1:1/vm1/os|nbd://127.0.0.1:1/vm1/data-1|"
            "nbd://127.0.0.1:1/vm1/os nbd://127.0.0.1:1/vm1/data-1");
  auto stopped = vm.Stop(5000);
  ASSERT_TRUE(stopped.ok());
  EXPECT_TRUE(*stopped);  // it went on SIGTERM
  EXPECT_FALSE(vm.running());
  fs::remove(out);
  fs::remove(log);
}

TEST(ProcessDriver, AVmThatIgnoresSigtermIsKilledAfterTheTimeout) {
  std::string ready = TempPath("ready");
  fs::remove(ready);
  ProcessDriver vm;
  ASSERT_TRUE(vm.Start({"stubborn",
                        "trap '' TERM; echo up > " + ready + "; while true; do sleep 0.1; done",
                        {},
                        ""})
                  .ok());
  ASSERT_TRUE(WaitForFile(ready));
  auto t0 = std::chrono::steady_clock::now();
  auto stopped = vm.Stop(300);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_TRUE(stopped.ok());
  EXPECT_FALSE(*stopped);  // killed
  EXPECT_GE(secs, 0.25);
  EXPECT_LT(secs, 5.0);
  EXPECT_FALSE(vm.running());
  fs::remove(ready);
}

TEST(ProcessDriver, RefusesAVmWithoutACommand) {
  ProcessDriver vm;
  EXPECT_EQ(vm.Start({"empty", "", {}, ""}).code(), Code::kInvalidArgument);
  EXPECT_EQ(DiskEnvName("data-1.x"), "OSR_DISK_DATA_1_X");
}

}  // namespace
}  // namespace osr::hypervisor
