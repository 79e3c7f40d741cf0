// Jobs: the state table, cancellation tokens, the step that records a cancel, and what a
// step waiting for a replica shows.
#include <gtest/gtest.h>

#include <thread>

#include "vault/catalog.h"
#include "vault/catalog_backends_test.h"
#include "vault/job_state.h"
#include "vault/job_steps.h"
#include "vault/vault.h"

namespace osr::vault {
namespace {

using nlohmann::json;

TEST(JobStateTest, OneTableNamesEveryStateOnce) {
  for (const auto& row : kJobStates) {
    EXPECT_EQ(JobStateFromName(row.name), row.state) << row.name;
    EXPECT_EQ(JobStateName(row.state), row.name);
  }
  EXPECT_FALSE(JobEnded(JobState::kQueued));
  EXPECT_FALSE(JobEnded(JobState::kRunning));
  EXPECT_TRUE(JobEnded(JobState::kSucceeded));
  EXPECT_TRUE(JobEnded(JobState::kFailed));
  EXPECT_TRUE(JobEnded(JobState::kCancelled));
  EXPECT_EQ(JobStateFromName("cancelled"), std::nullopt);  // exactly as written
  EXPECT_EQ(JobStateFromName(""), std::nullopt);
}

TEST(JobCancelTest, AWaitEndsWhenCancelled) {
  JobCancel cancel;
  EXPECT_TRUE(cancel.Check().ok());
  std::thread t([&] { cancel.Cancel(JobCancel::Reason::kCancelled); });
  // Far longer than any machine needs to run the thread: the wait ends on the cancel.
  auto t0 = std::chrono::steady_clock::now();
  Status st = cancel.Sleep(std::chrono::minutes(10));
  t.join();
  EXPECT_EQ(st.code(), Code::kCancelled);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::minutes(10));
  // The first reason stays.
  cancel.Cancel(JobCancel::Reason::kVaultStopping);
  EXPECT_EQ(cancel.Check().code(), Code::kCancelled);
}

TEST(JobCancelTest, AStoppingVaultIsNotACancel) {
  JobCancel cancel;
  cancel.Cancel(JobCancel::Reason::kVaultStopping);
  EXPECT_EQ(cancel.Sleep(std::chrono::minutes(10)).code(), Code::kUnavailable);
}

// On both backends (catalog_backends_test.h).
class JobsCatalogTest : public CatalogBackendTest {
 protected:
  void SetUp() override {
    CatalogBackendTest::SetUp();
    if (HasFatalFailure()) return;
    auto c = Catalog::Open(db_);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    catalog_ = std::move(c).value();
  }
  void TearDown() override {
    catalog_.reset();
    CatalogBackendTest::TearDown();
  }
  std::unique_ptr<Catalog> catalog_;
};

TEST_P(JobsCatalogTest, ACancelledStepSaysWhatItLeftAndTheJobIsCancelled) {
  JobRow j;
  j.type = "enable-protection";
  j.vm = "vm1";
  j.state = JobState::kRunning;
  j.id = catalog_->AddJob(j).value();
  JobCancel cancel;
  Steps steps(catalog_.get(), &j, &cancel);
  steps.Begin("Initial replication");
  EXPECT_TRUE(steps.Check().ok());
  cancel.Cancel(JobCancel::Reason::kCancelled);
  Status st = steps.Sleep(std::chrono::minutes(10));
  ASSERT_EQ(st.code(), Code::kCancelled);
  steps.Fail(steps.Cancelled("the store at recovery was removed"));
  ASSERT_TRUE(steps.Save().ok());
  auto back = catalog_->Job(j.id).value();
  EXPECT_EQ(back.state, JobState::kCancelled);
  EXPECT_EQ(back.error,
            "cancelled during \"Initial replication\": the store at recovery was removed");
  EXPECT_EQ(back.steps.back()["state"], "Cancelled");
  EXPECT_EQ(back.steps.back()["message"], back.error);
  // Filtered by its typed state.
  ASSERT_EQ(catalog_->Jobs("vm1", JobState::kCancelled).size(), 1u);
  EXPECT_TRUE(catalog_->Jobs("vm1", JobState::kRunning).empty());
}

TEST_P(JobsCatalogTest, AnUnknownStateReadsAsFailedSayingSo) {
  JobRow j;
  j.type = "commit";
  j.vm = "vm1";
  j.id = catalog_->AddJob(j).value();
  catalog_.reset();
  ASSERT_TRUE(RawSql("UPDATE jobs SET state='Paused'").ok());
  catalog_ = Catalog::Open(db_).value();
  auto back = catalog_->Job(j.id).value();
  EXPECT_EQ(back.state, JobState::kFailed);
  EXPECT_NE(back.error.find("'Paused'"), std::string::npos) << back.error;
}

// A job step that changes the item and the job records both or neither.
TEST_P(JobsCatalogTest, AStepThatChangesTheItemAndTheJobIsOneTransaction) {
  ASSERT_TRUE(catalog_
                  ->PutItem({"vm1", "primary", "recovery", "gold", ItemState::kProtected, 1,
                             nullptr, nullptr})
                  .ok());
  JobRow j;
  j.type = "failover";
  j.vm = "vm1";
  j.state = JobState::kRunning;
  j.id = catalog_->AddJob(j).value();
  // The step's writes land, then it fails before its end: neither stays.
  ItemRow item = catalog_->FindItem("vm1").value().value();
  item.state = ItemState::kFailedOver;
  j.progress = 100;
  Status st = catalog_->Transact([&]() -> Status {
    OSR_RETURN_IF_ERROR(catalog_->PutItem(item));
    OSR_RETURN_IF_ERROR(catalog_->UpdateJob(j));
    return Status(Code::kUnavailable, "the step's last write failed");
  });
  EXPECT_EQ(st.code(), Code::kUnavailable);
  EXPECT_EQ(catalog_->FindItem("vm1").value()->state, ItemState::kProtected);
  EXPECT_EQ(catalog_->FindJob(j.id).value()->progress, 0);
}

INSTANTIATE_TEST_SUITE_P(Backends, JobsCatalogTest,
                         ::testing::Values(Backend::kSqlite, Backend::kPostgres), BackendName);

// Issue 10, case 10 (c): a reprotect whose source is down showed "707 of 0 writes
// replicated" — numbers from a call that failed.
TEST(ReplicaProgressTest, ASiteThatDoesNotAnswerIsNamedNotCounted) {
  json store = {{"durable_seq", 707}, {"differential", true}};
  auto shown = DescribeReplicaProgress(
      "recovery",
      Result<json>(
          Unavailable("site recovery (http://127.0.0.1:1/api/v1) is unreachable: Connection")),
      "primary", Result<json>(store), 0);
  EXPECT_EQ(shown.text,
            "waiting for recovery: site recovery (http://127.0.0.1:1/api/v1) is unreachable: "
            "Connection");
  EXPECT_EQ(shown.percent, -1);
  shown = DescribeReplicaProgress("recovery", Result<json>(json{{"last_seq", 0}}), "primary",
                                  Result<json>(Unavailable("site primary: down")), 0);
  EXPECT_EQ(shown.text, "waiting for primary: site primary: down");
}

TEST(ReplicaProgressTest, NoTotalOfZero) {
  // The source answers, nothing to copy reported yet, want 0: no "of 0".
  json group = {{"last_seq", 0}, {"replication", {{"connected", true}}}};
  json store = {{"durable_seq", 707}, {"differential", true}};
  auto shown =
      DescribeReplicaProgress("recovery", Result<json>(group), "primary", Result<json>(store), 0);
  EXPECT_EQ(shown.text.find("of 0"), std::string::npos) << shown.text;
  EXPECT_EQ(shown.percent, -1);
  // Not connected: the sender's last error is what the job waits for.
  group["replication"] = {{"connected", false}, {"last_error", "unavailable: refused"}};
  shown =
      DescribeReplicaProgress("recovery", Result<json>(group), "primary", Result<json>(store), 0);
  EXPECT_EQ(shown.text, "waiting for replication to primary: unavailable: refused");
}

TEST(ReplicaProgressTest, BytesOfACopyAndWritesOtherwise) {
  json group = {{"last_seq", 10},
                {"replication",
                 {{"connected", true}, {"resync_bytes_total", 4096}, {"resync_bytes_done", 1024}}}};
  json store = {{"durable_seq", 3}};
  auto shown =
      DescribeReplicaProgress("primary", Result<json>(group), "recovery", Result<json>(store), 10);
  EXPECT_EQ(shown.text, "1024 of 4096 bytes copied");
  EXPECT_EQ(shown.percent, 25);
  group["replication"] = {{"connected", true}};
  shown =
      DescribeReplicaProgress("primary", Result<json>(group), "recovery", Result<json>(store), 10);
  EXPECT_EQ(shown.text, "3 of 10 writes replicated");
  EXPECT_EQ(shown.percent, 30);
  // A site answering in a shape nobody expects: named, not counted.
  group["replication"] = {{"connected", true}, {"resync_bytes_total", "lots"}};
  shown =
      DescribeReplicaProgress("primary", Result<json>(group), "recovery", Result<json>(store), 10);
  EXPECT_NE(shown.text.find("resync_bytes_total"), std::string::npos) << shown.text;
  EXPECT_EQ(shown.percent, -1);
}

// Issue 10, case 10: the step ended at its last poll ("4194304 of 67108864 bytes"); once the
// replica is there it says the whole total, whatever the last poll saw.
TEST(ReplicaProgressTest, TheStepEndsAtItsTotal) {
  json group = {
      {"last_seq", 10},
      {"replication",
       {{"connected", true}, {"resync_bytes_total", 67108864}, {"resync_bytes_done", 4194304}}}};
  EXPECT_EQ(DescribeReplicaDone(Result<json>(group), 10, 12), "67108864 of 67108864 bytes copied");
  group["replication"] = {{"connected", true}};
  EXPECT_EQ(DescribeReplicaDone(Result<json>(group), 10, 12), "10 of 10 writes replicated");
  EXPECT_EQ(DescribeReplicaDone(Result<json>(Unavailable("down")), 10, 12),
            "10 of 10 writes replicated");
  EXPECT_EQ(DescribeReplicaDone(Result<json>(group), 0, 0), "the replica is consistent at seq 0");
}

}  // namespace
}  // namespace osr::vault
