#include "vault/point_at_time.h"

#include <gtest/gtest.h>

#include "common/units.h"

namespace osr::vault {
namespace {

constexpr int64_t kS = 1'000'000'000;
constexpr int64_t kMin = 60 * kS;
constexpr int64_t k10h = 1'700'000'000 * kS;  // any wall time

// Points at the given wall times, in seq order (ids and seqs 1..n).
std::vector<PointRow> At(std::initializer_list<int64_t> times) {
  std::vector<PointRow> out;
  int64_t i = 0;
  for (int64_t t : times) {
    ++i;
    out.push_back({i, "vm", static_cast<uint64_t>(10 * i), t, "crash"});
  }
  return out;
}

int64_t IdAt(const std::vector<PointRow>& points, int64_t t) {
  auto p = PointAtTime(points, t, "vm", "T");
  EXPECT_TRUE(p.ok()) << p.status().ToString();
  return p.ok() ? p->id : -1;
}

TEST(PointAtTime, ASteadyClockGivesTheNewestPointAtOrBefore) {
  auto points = At({k10h, k10h + kMin, k10h + 2 * kMin});
  EXPECT_EQ(IdAt(points, k10h), 1);
  EXPECT_EQ(IdAt(points, k10h + kMin - 1), 1);
  EXPECT_EQ(IdAt(points, k10h + kMin), 2);
  EXPECT_EQ(IdAt(points, k10h + 90 * kMin), 3);
  auto none = PointAtTime(points, k10h - 1, "vm", "09:59");
  EXPECT_EQ(none.status().code(), Code::kNotFound);
  EXPECT_EQ(none.status().message(), "VM vm has no recovery point at or before 09:59");
}

// Issue 10, case 3: points at 10:00..10:30, then the clock steps back 20 minutes and
// points go on at 10:11 (real 10:31), 10:21 (real 10:41). 10:20 was read twice: before the
// step (point 3 at 10:20 stands for it) and after it (point 5 at 10:11). The old rule took
// point 5 by seq: made 21 real minutes after the 10:20 the operator may mean.
TEST(PointAtTime, ATimeReadTwiceAfterAStepBackIsRefusedNamingTheCandidates) {
  auto points = At({k10h, k10h + 10 * kMin, k10h + 20 * kMin, k10h + 30 * kMin,  // 1..4
                    k10h + 11 * kMin, k10h + 21 * kMin});                        // 5, 6
  auto p = PointAtTime(points, k10h + 20 * kMin, "vm1", "T");
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), Code::kInvalidArgument);
  std::string want =
      "T is ambiguous for VM vm1: the clock that dates its recovery points "
      "stepped back, so that time was read more than once, and each stretch of "
      "steady time has a point at or before it: point 3 (" +
      FormatTimeNs(k10h + 20 * kMin) + ", seq 30), point 5 (" + FormatTimeNs(k10h + 11 * kMin) +
      ", seq 50). Name the point by its id instead (--point ID; osr point list "
      "vm1)";
  EXPECT_EQ(p.status().message(), want);
  // Later than every point of the first era, but that era's clock may still have read it
  // before it stepped: ambiguous too (point 4 or point 6).
  auto later = PointAtTime(points, k10h + 40 * kMin, "vm1", "T");
  ASSERT_FALSE(later.ok());
  EXPECT_NE(later.status().message().find("point 4 ("), std::string::npos)
      << later.status().ToString();
  EXPECT_NE(later.status().message().find("point 6 ("), std::string::npos)
      << later.status().ToString();
  // Before the second era's first point: only the first era read it.
  EXPECT_EQ(IdAt(points, k10h + 10 * kMin), 2);
  EXPECT_EQ(IdAt(points, k10h + 11 * kMin - 1), 2);
}

TEST(PointAtTime, OnceTheOlderEraIsGoneTimesResolveAgain) {
  // Retention deleted points 1..4: one era left.
  auto points = At({k10h, k10h + 10 * kMin, k10h + 20 * kMin, k10h + 30 * kMin, k10h + 11 * kMin,
                    k10h + 21 * kMin});
  points.erase(points.begin(), points.begin() + 4);
  EXPECT_EQ(IdAt(points, k10h + 20 * kMin), 5);
  EXPECT_EQ(IdAt(points, k10h + 40 * kMin), 6);
}

TEST(PointAtTime, NtpSizedCorrectionsDoNotSplitEras) {
  // 2 s back: within kEraStepNsMin, one era; the plain rule.
  auto points = At({k10h, k10h + 10 * kS, k10h + 8 * kS, k10h + 20 * kS});
  EXPECT_EQ(IdAt(points, k10h + 9 * kS), 3);
  EXPECT_EQ(IdAt(points, k10h + 15 * kS), 3);
  // 6 s back: two eras, and a time both read is refused.
  auto stepped = At({k10h, k10h + 10 * kS, k10h + 4 * kS, k10h + 20 * kS});
  EXPECT_EQ(PointAtTime(stepped, k10h + 5 * kS, "vm", "T").status().code(), Code::kInvalidArgument);
  EXPECT_EQ(IdAt(stepped, k10h + 3 * kS), 1);
}

TEST(PointAtTime, AClockThatRanAheadAndCameBackIsTwoEras) {
  // A clock an hour ahead for two points, then corrected: the corrected points start a
  // new era. 10:05 may have been read before the clock jumped ahead (point 1 stands for
  // it) and after the correction (point 4): refused. 10:01 was read only before.
  auto points = At({k10h, k10h + 70 * kMin, k10h + 71 * kMin, k10h + 3 * kMin});
  auto p = PointAtTime(points, k10h + 5 * kMin, "vm", "T");
  ASSERT_EQ(p.status().code(), Code::kInvalidArgument);
  EXPECT_NE(p.status().message().find("point 1 ("), std::string::npos) << p.status().ToString();
  EXPECT_NE(p.status().message().find("point 4 ("), std::string::npos) << p.status().ToString();
  EXPECT_EQ(IdAt(points, k10h + 1 * kMin), 1);
}

TEST(PointAtTime, TheErrorNamesAtMostTheNewestEras) {
  std::vector<PointRow> points;
  for (int i = 0; i < 8; ++i) {  // eight eras, each a step of 10 minutes back
    points.push_back({i + 1, "vm", static_cast<uint64_t>(i + 1), k10h - i * 10 * kMin, "crash"});
  }
  auto p = PointAtTime(points, k10h + kMin, "vm", "T");
  ASSERT_FALSE(p.ok());
  const std::string& m = p.status().message();
  EXPECT_EQ(m.find("point 3 ("), std::string::npos) << m;
  EXPECT_NE(m.find("point 4 ("), std::string::npos) << m;
  EXPECT_NE(m.find("point 8 ("), std::string::npos) << m;
  EXPECT_NE(m.find(" and 3 older."), std::string::npos) << m;
}

}  // namespace
}  // namespace osr::vault
