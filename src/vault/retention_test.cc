#include "vault/retention.h"

#include <gtest/gtest.h>

#include <algorithm>

namespace osr::vault {
namespace {

constexpr int64_t kS = 1'000'000'000;
constexpr int64_t kMin = 60 * kS;
constexpr int64_t kNow = 1'700'000'000 * kS;

// Points every `step_ns` from `first_ns`, ids and seqs 1..n.
std::vector<PointRow> Every(int64_t first_ns, int64_t step_ns, int n) {
  std::vector<PointRow> out;
  for (int i = 0; i < n; ++i) {
    out.push_back({i + 1, "vm", static_cast<uint64_t>(i + 1), first_ns + i * step_ns, "crash"});
  }
  return out;
}

std::vector<int64_t> Ids(int64_t from, int64_t to) {
  std::vector<int64_t> out;
  for (int64_t i = from; i <= to; ++i) out.push_back(i);
  return out;
}

TEST(PointsToPrune, RetentionDropsWhatIsOlderThanTheWindow) {
  // A point a minute for 10 minutes, retention 5 minutes.
  auto points = Every(kNow - 9 * kMin, kMin, 10);
  EXPECT_EQ(PointsToPrune(points, {}, kNow, 5 * kMin), Ids(1, 4));
}

TEST(PointsToPrune, TheNewestPointAndPointsInUseStay) {
  // Every 10 minutes: each older than the 5-minute window before the next.
  auto points = Every(kNow - 100 * kMin, 10 * kMin, 10);
  // The newest stays; point 3 is a drill's.
  EXPECT_EQ(PointsToPrune(points, {3}, kNow, 5 * kMin),
            (std::vector<int64_t>{1, 2, 4, 5, 6, 7, 8, 9}));
  // Age counts from the newest point when the vault's clock is later: no new point for
  // an hour deletes nothing more.
  EXPECT_EQ(PointsToPrune(points, {3}, kNow + 3600 * kS, 5 * kMin),
            (std::vector<int64_t>{1, 2, 4, 5, 6, 7, 8, 9}));
}

TEST(PointsToPrune, TheVaultClockAloneSteppedForwardDeletesNothing) {
  auto points = Every(kNow - 9 * kMin, kMin, 10);
  // The vault's clock says a day later; the newest point (the source's clock) does not.
  EXPECT_EQ(PointsToPrune(points, {}, kNow + 86400 * kS, 5 * kMin), Ids(1, 4));
}

TEST(PointsToPrune, TheSourceClockAloneSteppedForwardDeletesNothing) {
  auto points = Every(kNow - 9 * kMin, kMin, 10);
  points.push_back({11, "vm", 11, kNow + 86400 * kS, "crash"});  // dated a day ahead
  EXPECT_EQ(PointsToPrune(points, {}, kNow, 5 * kMin), Ids(1, 4));
}

TEST(PointsToPrune, APointDatedBeforeItsPredecessorsDeletesNothingNew) {
  // The source's clock stepped back an hour: the newest point is dated an hour ago.
  auto points = Every(kNow - 9 * kMin, kMin, 10);
  points.push_back({11, "vm", 11, kNow - 60 * kMin, "crash"});
  EXPECT_EQ(PointsToPrune(points, {}, kNow, 5 * kMin), std::vector<int64_t>{});
}

TEST(PointsToPrune, RetentionStopsAtAPointDatedInTheFuture) {
  // Point 3 was dated ahead (a clock that stepped forward and back): the points after it
  // are not deleted before it is.
  auto points = Every(kNow - 30 * kMin, kMin, 20);
  points[2].time_ns = kNow - 1 * kMin;
  EXPECT_EQ(PointsToPrune(points, {}, kNow, 5 * kMin), Ids(1, 2));
}

TEST(PointsToPrune, ThinningKeepsTheLastHourAndOnePointPerOlderHour) {
  int64_t now = 1000 * 60 * kMin;  // a whole number of hours
  std::vector<PointRow> points;
  int64_t id = 0;
  // Three hours of points every 5 minutes, an app point two hours ago among them.
  for (int64_t t = now - 180 * kMin; t <= now; t += 5 * kMin) {
    ++id;
    points.push_back({id, "vm", static_cast<uint64_t>(id), t, "crash"});
    if (t == now - 125 * kMin) {
      ++id;
      points.push_back({id, "vm", static_cast<uint64_t>(id), now - 121 * kMin, "app"});
    }
  }
  auto gone = PointsToPrune(points, {}, now, 24 * 60 * kMin);
  int recent = 0, old_crash = 0, app = 0;
  for (auto& p : points) {
    if (std::count(gone.begin(), gone.end(), p.id)) continue;
    if (p.type == "app") {
      ++app;
    } else if (p.time_ns >= now - 60 * kMin) {
      ++recent;
    } else {
      ++old_crash;
      EXPECT_EQ((p.time_ns + 5 * kMin) % (60 * kMin), 0) << "not the newest of its hour";
    }
  }
  EXPECT_EQ(recent, 13);    // every point of the last hour (both ends included)
  EXPECT_EQ(old_crash, 2);  // one per older hour
  EXPECT_EQ(app, 1);        // app points stay
}

TEST(PointsToPrune, ThinningFollowsSeqWhenTheClockSteppedBack) {
  int64_t now = 1000 * 60 * kMin;
  // Two points in an old hour, then a later one (by seq) whose clock stepped back into
  // that same hour: the later one is the hour's survivor, not the one dated last.
  std::vector<PointRow> points = {{1, "vm", 1, now - 190 * kMin, "crash"},
                                  {2, "vm", 2, now - 130 * kMin, "crash"},
                                  {3, "vm", 3, now - 150 * kMin, "crash"},
                                  {4, "vm", 4, now, "crash"}};
  auto gone = PointsToPrune(points, {}, now, 24 * 60 * kMin);
  std::sort(gone.begin(), gone.end());
  // 1 is the only point in its hour; 2 and 3 share the running maximum's hour: 3 stays.
  EXPECT_EQ(gone, std::vector<int64_t>{2});
}

TEST(PointOverdueText, WarnsOnlyWhenDataHasNoPointForTooLong) {
  PointRow newest{7, "vm", 100, 1'700'000'000 * kS, "crash"};
  // Nothing new: no warning, however long.
  EXPECT_EQ(PointOverdueText(3600 * kS, 100, newest, 5, 10 * kS, ""), "");
  // New data, within two intervals and the slack.
  EXPECT_EQ(PointOverdueText(20 * kS, 120, newest, 5, 10 * kS, ""), "");
  std::string w =
      PointOverdueText(21 * kS, 120, newest, 5, 10 * kS, "site recovery is unreachable");
  EXPECT_EQ(w,
            "Warning: no new recovery point for 21 s: the recovery site holds writes up to seq "
            "120, the newest point is at seq 100 (2023-11-14T22:13:20.000000000Z); the policy "
            "makes one every 5 s (last attempt: site recovery is unreachable)");
  EXPECT_NE(PointOverdueText(21 * kS, 120, newest, 5, 10 * kS, "").find("see the vault's log"),
            std::string::npos);
}

}  // namespace
}  // namespace osr::vault
