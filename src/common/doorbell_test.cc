#include "common/doorbell.h"

#include <gtest/gtest.h>

#include <chrono>
#include <thread>

namespace osr {
namespace {

using namespace std::chrono_literals;

TEST(DoorbellTest, ARingBeforeTheWaitIsNotLost) {
  Doorbell bell;
  bell.Ring();
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_TRUE(bell.Wait(10s));
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
}

TEST(DoorbellTest, AWaitClearsTheRing) {
  Doorbell bell;
  bell.Ring();
  bell.Ring();  // two rings before one wait are one
  EXPECT_TRUE(bell.Wait(10s));
  EXPECT_FALSE(bell.Wait(1ms));
}

TEST(DoorbellTest, WaitEndsAtItsBoundWithoutARing) {
  Doorbell bell;
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_FALSE(bell.Wait(20ms));
  EXPECT_GE(std::chrono::steady_clock::now() - t0, 20ms);
}

TEST(DoorbellTest, ARingFromAnotherThreadWakesTheWaiter) {
  Doorbell bell;
  std::thread ringer([&] {
    std::this_thread::sleep_for(10ms);
    bell.Ring();
  });
  // Bounded: a lost wake-up fails the test at the bound instead of hanging.
  EXPECT_TRUE(bell.Wait(30s));
  ringer.join();
}

}  // namespace
}  // namespace osr
