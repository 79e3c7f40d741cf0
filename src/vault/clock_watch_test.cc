#include "vault/clock_watch.h"

#include <gtest/gtest.h>

#include "common/clock.h"

namespace osr::vault {
namespace {

constexpr int64_t kS = 1'000'000'000;
constexpr int64_t kStart = 1'700'000'000 * kS;

using Change = ClockWatch::Change;

// A watch that has seen the clock once, and a clock ticking a second at a time.
struct Fixture {
  FakeClock clock{kStart, 1000 * kS};
  ClockWatch watch{3600 * kS};
  Fixture() { EXPECT_EQ(Observe(), Change::kAnchored); }
  Change Observe() { return watch.Observe(clock.WallNs(), clock.MonoNs()); }
  // Ticks `seconds` times, one second each; returns the first change seen.
  Change Tick(int seconds) {
    Change first = Change::kNone;
    for (int i = 0; i < seconds; ++i) {
      clock.Advance(kS);
      Change c = Observe();
      if (first == Change::kNone) first = c;
    }
    return first;
  }
};

TEST(ClockWatch, AClockThatKeepsTimeHoldsNothing) {
  Fixture f;
  EXPECT_EQ(f.Tick(100), Change::kNone);
  // NTP's small corrections are taken silently.
  f.clock.StepWall(2 * kS);
  EXPECT_EQ(f.Tick(1), Change::kNone);
  f.clock.StepWall(-3 * kS);
  EXPECT_EQ(f.Tick(1), Change::kNone);
  EXPECT_FALSE(f.watch.held());
  EXPECT_EQ(f.watch.HealthWarning(), "");
}

TEST(ClockWatch, AStepForwardHoldsUntilConfirmed) {
  Fixture f;
  f.Tick(10);
  f.clock.StepWall(2 * 86400 * kS);
  EXPECT_EQ(f.Tick(1), Change::kStepped);
  ASSERT_TRUE(f.watch.held());
  EXPECT_EQ(f.watch.hold()->step_ns, 2 * 86400 * kS);
  std::string w = f.watch.HealthWarning();
  EXPECT_NE(w.find("Warning: the vault's clock stepped forward by 2 days 0 h at 2023-11-16T22:13:"),
            std::string::npos)
      << w;
  EXPECT_NE(w.find("osr point confirm-clock"), std::string::npos) << w;
  // It stays held while the clock keeps its new time (short of the settle time).
  EXPECT_EQ(f.Tick(600), Change::kNone);
  EXPECT_TRUE(f.watch.held());
  EXPECT_EQ(f.watch.Confirm(f.clock.WallNs(), f.clock.MonoNs()), Change::kConfirmed);
  EXPECT_FALSE(f.watch.held());
  // The confirmed time is the new anchor: no step from here.
  EXPECT_EQ(f.Tick(10), Change::kNone);
  EXPECT_FALSE(f.watch.held());
}

TEST(ClockWatch, AStepBackThatIsUndoneEndsTheHoldByItself) {
  Fixture f;
  f.clock.StepWall(-120 * kS);
  EXPECT_EQ(f.Tick(1), Change::kStepped);
  EXPECT_NE(f.watch.HealthWarning().find("stepped back by 2 min 0 s"), std::string::npos)
      << f.watch.HealthWarning();
  f.Tick(30);
  EXPECT_TRUE(f.watch.held());
  f.clock.StepWall(+120 * kS);
  EXPECT_EQ(f.Tick(1), Change::kReturned);
  EXPECT_FALSE(f.watch.held());
}

TEST(ClockWatch, ASecondStepRestartsTheSteadyTimeAndNamesTheWholeDistance) {
  Fixture f;
  f.clock.StepWall(600 * kS);
  EXPECT_EQ(f.Tick(1), Change::kStepped);
  f.Tick(3000);
  f.clock.StepWall(600 * kS);
  EXPECT_EQ(f.Tick(1), Change::kStepped);
  EXPECT_EQ(f.watch.hold()->step_ns, 1200 * kS);
  // 3000 s after the second step: not yet settled (an hour counts from the last step).
  EXPECT_EQ(f.Tick(3000), Change::kNone);
  EXPECT_TRUE(f.watch.held());
}

TEST(ClockWatch, AClockThatKeepsTimeAfterAStepSettles) {
  Fixture f;
  f.clock.StepWall(7200 * kS);
  EXPECT_EQ(f.Tick(1), Change::kStepped);
  int64_t settles_at = f.watch.SettlesAtWallNs();
  EXPECT_EQ(settles_at, f.clock.WallNs() + 3600 * kS);
  EXPECT_EQ(f.Tick(3599), Change::kNone);
  EXPECT_TRUE(f.watch.held());
  EXPECT_EQ(f.Tick(1), Change::kSettled);
  EXPECT_FALSE(f.watch.held());
  EXPECT_GE(f.clock.WallNs(), settles_at);
}

TEST(ClockWatch, TheAnchorIsSavedNowAndThen) {
  Fixture f;
  EXPECT_EQ(f.Tick(599), Change::kNone);
  EXPECT_EQ(f.Tick(1), Change::kAnchored);
}

TEST(ClockWatch, ARestartInTheSameBootNoticesAStepMadeWhileDown) {
  Fixture f;
  f.Tick(5);
  nlohmann::json saved = f.watch.ToJson("boot-1");
  // Down for 100 s, during which the clock stepped forward an hour.
  f.clock.Advance(100 * kS);
  f.clock.StepWall(3600 * kS);
  ClockWatch again(3600 * kS);
  EXPECT_EQ(again.Restore(saved, "boot-1", f.clock.WallNs(), f.clock.MonoNs()), Change::kNone);
  EXPECT_EQ(again.Observe(f.clock.WallNs(), f.clock.MonoNs()), Change::kStepped);
  EXPECT_EQ(again.hold()->step_ns, 3600 * kS);
}

TEST(ClockWatch, AHoldSurvivesARestartAndAReboot) {
  Fixture f;
  f.clock.StepWall(-600 * kS);
  EXPECT_EQ(f.Tick(1), Change::kStepped);
  nlohmann::json saved = f.watch.ToJson("boot-1");
  {
    ClockWatch same(3600 * kS);
    same.Restore(saved, "boot-1", f.clock.WallNs(), f.clock.MonoNs());
    EXPECT_TRUE(same.held());
    EXPECT_EQ(same.Observe(f.clock.WallNs(), f.clock.MonoNs()), Change::kNone);
    EXPECT_TRUE(same.held());
  }
  // Another boot: the monotonic clock starts again from near zero.
  FakeClock rebooted(f.clock.WallNs() + 30 * kS, 5 * kS);
  ClockWatch other(3600 * kS);
  EXPECT_EQ(other.Restore(saved, "boot-2", rebooted.WallNs(), rebooted.MonoNs()), Change::kStepped);
  EXPECT_TRUE(other.held());
  EXPECT_EQ(other.hold()->step_ns, -600 * kS);
  rebooted.Advance(kS);
  EXPECT_EQ(other.Observe(rebooted.WallNs(), rebooted.MonoNs()), Change::kNone);
  EXPECT_TRUE(other.held());
  // The clock coming back (600 s forward) still ends it.
  rebooted.StepWall(600 * kS);
  rebooted.Advance(kS);
  EXPECT_EQ(other.Observe(rebooted.WallNs(), rebooted.MonoNs()), Change::kReturned);
}

TEST(ClockWatch, AfterARebootAClockBehindTheLastTrustedTimeIsAStepBack) {
  Fixture f;
  nlohmann::json saved = f.watch.ToJson("boot-1");
  FakeClock rebooted(f.clock.WallNs() - 86400 * kS, 5 * kS);
  ClockWatch w(3600 * kS);
  EXPECT_EQ(w.Restore(saved, "boot-2", rebooted.WallNs(), rebooted.MonoNs()), Change::kStepped);
  EXPECT_EQ(w.hold()->step_ns, -86400 * kS);
  // A reboot with the clock ahead (a long downtime looks the same): no hold.
  FakeClock later(f.clock.WallNs() + 86400 * kS, 5 * kS);
  ClockWatch w2(3600 * kS);
  EXPECT_EQ(w2.Restore(saved, "boot-2", later.WallNs(), later.MonoNs()), Change::kAnchored);
  EXPECT_FALSE(w2.held());
}

TEST(ClockWatch, ASavedStateOfTheWrongShapeIsIgnored) {
  for (const char* text : {R"({"version":1,"anchor_wall_ns":"x"})", R"({"version":9})", R"([])",
                           R"({"version":1,"anchor_wall_ns":5,"hold":{"step_ns":"no"}})"}) {
    ClockWatch w(3600 * kS);
    EXPECT_EQ(w.Restore(nlohmann::json::parse(text), "b", kStart, kS), Change::kNone) << text;
    EXPECT_FALSE(w.held()) << text;
    EXPECT_EQ(w.Observe(kStart, kS), Change::kAnchored) << text;
  }
}

}  // namespace
}  // namespace osr::vault
