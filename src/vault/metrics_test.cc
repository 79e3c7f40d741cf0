// The vault's /metrics text: the exposition format (escaping, HELP/TYPE, histograms) and
// the numbers it reads from a catalog, on both backends.
#include "vault/metrics.h"

#include <gtest/gtest.h>

#include <string>

#include "vault/catalog.h"
#include "vault/catalog_backends_test.h"

namespace osr::vault {
namespace {

TEST(MetricsFormat, EscapesLabelValuesAndHelpPerTheSpec) {
  EXPECT_EQ(EscapeLabelValue("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
  EXPECT_EQ(EscapeLabelValue("plain é"), "plain é");
  // HELP escapes backslash and line feed only; a double quote stays.
  EXPECT_EQ(EscapeHelp("x\\y\n\"z\""), "x\\\\y\\n\"z\"");

  TextWriter w;
  w.Family("osr_vault_x", "gauge", "Line one\nline two.");
  w.Sample("osr_vault_x", {{"vm", "we\"ird\\vm\n"}, {"site", "a"}}, 2.5);
  w.Sample("osr_vault_x", {}, 3);
  EXPECT_EQ(w.text(),
            "# HELP osr_vault_x Line one\\nline two.\n"
            "# TYPE osr_vault_x gauge\n"
            "osr_vault_x{vm=\"we\\\"ird\\\\vm\\n\",site=\"a\"} 2.5\n"
            "osr_vault_x 3\n");
}

TEST(MetricsFormat, HistogramBucketsAreCumulativeWithInfSumAndCount) {
  Histogram h({1, 10, 100});
  for (double v : {0.5, 1.0, 7.0, 250.0, 99.5}) h.Observe(v);
  TextWriter w;
  w.Family("osr_vault_t_seconds", "histogram", "T.");
  h.Write(w, "osr_vault_t_seconds", {{"type", "failover"}});
  EXPECT_EQ(w.text(),
            "# HELP osr_vault_t_seconds T.\n"
            "# TYPE osr_vault_t_seconds histogram\n"
            "osr_vault_t_seconds_bucket{type=\"failover\",le=\"1\"} 2\n"  // 0.5 and 1 (le: <=)
            "osr_vault_t_seconds_bucket{type=\"failover\",le=\"10\"} 3\n"
            "osr_vault_t_seconds_bucket{type=\"failover\",le=\"100\"} 4\n"
            "osr_vault_t_seconds_bucket{type=\"failover\",le=\"+Inf\"} 5\n"
            "osr_vault_t_seconds_sum{type=\"failover\"} 358\n"
            "osr_vault_t_seconds_count{type=\"failover\"} 5\n");
}

TEST(MetricsFormat, HealthBoardKeepsTheLevelWordAndForgetsStaleOnes) {
  HealthBoard b;
  b.Note("a", "Warning: replication is not connected (x)", 100);
  b.Note("b", "Critical: site away", 200);
  b.Note("c", "Normal", 300);
  b.Note("d", "something else", 300);
  EXPECT_EQ(b.Level("a", 0), "Warning");
  EXPECT_EQ(b.Level("b", 0), "Critical");
  EXPECT_EQ(b.Level("c", 0), "Normal");
  EXPECT_EQ(b.Level("d", 0), "Unknown");
  EXPECT_EQ(b.Level("a", 150), "Unknown");  // not seen since 150
  EXPECT_EQ(b.Level("zz", 0), "Unknown");
}

TEST(MetricsFormat, PointTickTimesWriteAHistogramAndTheLastTickPerKind) {
  PointTickTimes t;
  TextWriter empty;
  t.Write(empty);  // nothing noted yet: the families, no samples
  EXPECT_EQ(empty.text().find("osr_vault_point_tick_seconds_count"), std::string::npos);

  t.Note(PointTickTimes::Kind::kPoints, 3'000'000);          // 3 ms
  t.Note(PointTickTimes::Kind::kPoints, 40'000'000);         // 40 ms
  t.Note(PointTickTimes::Kind::kPointsAndRpo, 700'000'000);  // 0.7 s
  t.Note(PointTickTimes::Kind::kPoints, -5);                 // a clock oddity counts as 0
  TextWriter w;
  t.Write(w);
  const std::string& text = w.text();
  for (const char* line : {
           "osr_vault_point_tick_seconds_bucket{kind=\"points\",le=\"0.001\"} 1\n",
           "osr_vault_point_tick_seconds_bucket{kind=\"points\",le=\"0.005\"} 2\n",
           "osr_vault_point_tick_seconds_bucket{kind=\"points\",le=\"0.05\"} 3\n",
           "osr_vault_point_tick_seconds_count{kind=\"points\"} 3\n",
           "osr_vault_point_tick_seconds_sum{kind=\"points\"} 0.043000000000000003\n",
           "osr_vault_point_tick_seconds_bucket{kind=\"points_and_rpo\",le=\"0.5\"} 0\n",
           "osr_vault_point_tick_seconds_bucket{kind=\"points_and_rpo\",le=\"1\"} 1\n",
           "osr_vault_point_tick_last_seconds{kind=\"points\"} 0\n",
           "osr_vault_point_tick_last_seconds{kind=\"points_and_rpo\"} 0.7\n",
       }) {
    EXPECT_NE(text.find(line), std::string::npos) << line << " not in\n" << text;
  }
}

using MetricsCatalogTest = CatalogBackendTest;

JobRow EndedJob(const std::string& type, JobState state, int64_t created_s, int64_t updated_s) {
  JobRow j;
  j.type = type;
  j.vm = "vm1";
  j.state = state;
  j.created_ns = created_s * 1'000'000'000;
  j.updated_ns = updated_s * 1'000'000'000;
  return j;
}

TEST_P(MetricsCatalogTest, TheScrapeCountsWhatTheCatalogHolds) {
  auto c = Catalog::Open(db_).value();
  ASSERT_TRUE(
      c->PutItem({"vm1", "primary", "recovery", "gold", ItemState::kProtected, 1, nullptr, nullptr})
          .ok());
  ASSERT_TRUE(c->PutItem({"vm2", "primary", "recovery", "gold", ItemState::kFailedOver, 2, nullptr,
                          nullptr})
                  .ok());
  ASSERT_TRUE(c->AddRpoSample("vm1", 10'000'000'000, 1.5, 0).ok());
  ASSERT_TRUE(c->AddRpoSample("vm1", 20'000'000'000, 2.25, 0).ok());
  ASSERT_TRUE(c->AddRpoSample("vm2", 20'000'000'000, 9, 0).ok());   // from before its failover
  ASSERT_TRUE(c->AddRpoSample("gone", 20'000'000'000, 9, 0).ok());  // unprotected since
  auto latest = c->ListLatestRpoSamples().value();
  ASSERT_EQ(latest.size(), 2u);  // not "gone": it is no item now
  EXPECT_EQ(latest[0].vm, "vm1");
  EXPECT_EQ(latest[0].time_ns, 20'000'000'000);
  EXPECT_DOUBLE_EQ(latest[0].rpo_s, 2.25);
  EXPECT_EQ(latest[1].vm, "vm2");

  ASSERT_TRUE(c->AddJob(EndedJob("failover", JobState::kSucceeded, 100, 103)).ok());
  ASSERT_TRUE(c->AddJob(EndedJob("failover", JobState::kFailed, 100, 200)).ok());
  ASSERT_TRUE(c->AddJob(EndedJob("commit", JobState::kSucceeded, 100, 100)).ok());
  ASSERT_TRUE(c->AddJob(EndedJob("reprotect", JobState::kRunning, 100, 150)).ok());

  // Health as the leader wrote it: any vault instance reads the same.
  ASSERT_TRUE(
      c->PutItemHealth({{"vm1", "Warning: resynchronizing (1 of 2 bytes)", 29'000'000'000}}).ok());
  auto text = VaultMetricsText(*c, {true, 30'000'000'000}).value();
  std::string backend = GetParam() == Backend::kSqlite ? "sqlite" : "postgresql";
  for (const std::string& line : {
           "osr_vault_catalog_up{backend=\"" + backend + "\"} 1",
           std::string("osr_vault_leader 1"),
           std::string("osr_vault_items{state=\"FailedOver\"} 1"),
           std::string("osr_vault_items{state=\"Protected\"} 1"),
           std::string("osr_vault_items_health{level=\"Warning\"} 1"),
           std::string("osr_vault_items_health{level=\"Unknown\"} 1"),  // vm2: not seen
           std::string("osr_vault_items_health{level=\"Critical\"} 0"),
           std::string("osr_vault_item_rpo_seconds{vm=\"vm1\"} 2.25"),
           std::string("osr_vault_item_rpo_sample_timestamp_seconds{vm=\"vm1\"} 20"),
           std::string("osr_vault_jobs_total{type=\"failover\",state=\"Succeeded\"} 1"),
           std::string("osr_vault_jobs_total{type=\"failover\",state=\"Failed\"} 1"),
           std::string("osr_vault_jobs_total{type=\"commit\",state=\"Succeeded\"} 1"),
           std::string("osr_vault_jobs_in_progress{type=\"reprotect\",state=\"Running\"} 1"),
           std::string("osr_vault_job_duration_seconds_bucket{type=\"failover\",le=\"5\"} 1"),
           std::string("osr_vault_job_duration_seconds_bucket{type=\"failover\",le=\"60\"} 1"),
           std::string("osr_vault_job_duration_seconds_bucket{type=\"failover\",le=\"120\"} 2"),
           std::string("osr_vault_job_duration_seconds_bucket{type=\"failover\",le=\"+Inf\"} 2"),
           std::string("osr_vault_job_duration_seconds_sum{type=\"failover\"} 103"),
           std::string("osr_vault_job_duration_seconds_count{type=\"failover\"} 2"),
           std::string("osr_vault_job_duration_seconds_count{type=\"commit\"} 1"),
       }) {
    EXPECT_NE(text.find(line + "\n"), std::string::npos) << line << "\n" << text;
  }
  // Only items that replicate have an RPO; a running job has no duration yet.
  EXPECT_EQ(text.find("rpo_seconds{vm=\"vm2\"}"), std::string::npos) << text;
  EXPECT_EQ(text.find("rpo_seconds{vm=\"gone\"}"), std::string::npos) << text;
  EXPECT_EQ(text.find("duration_seconds_count{type=\"reprotect\"}"), std::string::npos) << text;

  // A follower reads the same health (the leader's, from the catalog), until it is 60 s old.
  auto follower = VaultMetricsText(*c, {false, 30'000'000'000}).value();
  EXPECT_NE(follower.find("osr_vault_leader 0\n"), std::string::npos);
  EXPECT_NE(follower.find("osr_vault_items_health{level=\"Warning\"} 1\n"), std::string::npos)
      << follower;
  auto stale = VaultMetricsText(*c, {false, 90'000'000'000}).value();
  EXPECT_NE(stale.find("osr_vault_items_health{level=\"Unknown\"} 2\n"), std::string::npos)
      << stale;
  // The health of an item that is gone goes with the next write.
  ASSERT_TRUE(c->DeleteItem("vm2").ok());
  ASSERT_TRUE(c->PutItemHealth({{"vm2", "Normal", 1}, {"vm1", "Normal", 2}}).ok());
  auto rows = c->ListItemHealth().value();
  ASSERT_EQ(rows.size(), 1u);
  EXPECT_EQ(rows[0].vm, "vm1");
  EXPECT_EQ(rows[0].health, "Normal");
}

TEST_P(MetricsCatalogTest, AnUnreadableCatalogGivesAnErrorNotPartialNumbers) {
  auto c = Catalog::Open(db_).value();
  ASSERT_TRUE(
      c->PutItem({"vm1", "primary", "recovery", "gold", ItemState::kProtected, 1, nullptr, nullptr})
          .ok());
  ASSERT_TRUE(RawSql("DROP TABLE rpo_samples").ok());
  auto text = VaultMetricsText(*c, {true, 0});
  ASSERT_FALSE(text.ok());
  EXPECT_NE(text.status().message().find("rpo_samples"), std::string::npos)
      << text.status().ToString();
}

INSTANTIATE_TEST_SUITE_P(Backends, MetricsCatalogTest,
                         ::testing::Values(Backend::kSqlite, Backend::kPostgres), BackendName);

}  // namespace
}  // namespace osr::vault
