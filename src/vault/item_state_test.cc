// The item state table: names, what each action and job type may start from, the
// refusals the API gives, and what the catalog does with a state it does not know.
#include "vault/item_state.h"

#include <gtest/gtest.h>

#include "vault/catalog.h"
#include "vault/catalog_backends_test.h"

namespace osr::vault {
namespace {

TEST(ItemStateTest, OneTableNamesEveryStateActionAndJobTypeOnce) {
  for (const auto& row : kItemStates) {
    EXPECT_EQ(ItemStateFromName(row.name), row.state) << row.name;
    EXPECT_EQ(ItemStateName(row.state), row.name);
  }
  for (const auto& row : kJobTypes) EXPECT_EQ(JobTypeFromName(row.name), row.type) << row.name;
  EXPECT_EQ(ItemStateFromName("protected"), std::nullopt);  // exactly as written
  EXPECT_EQ(JobTypeFromName("Failover"), std::nullopt);
  // A busy state offers no action but waiting (the job moves it on).
  for (const auto& row : kItemStates) {
    if (row.busy && row.state != ItemState::kEnablingProtection) {
      EXPECT_TRUE(ActionNames(row.state).empty()) << row.name;
    }
  }
  EXPECT_EQ(ActionNames(ItemState::kEnablingProtection), std::vector<std::string>{"unprotect"});
}

TEST(ItemStateTest, TheOperatorsCycleFollowsTheTable) {
  using S = ItemState;
  EXPECT_EQ(ActionNames(S::kUnprotected), std::vector<std::string>{"protect"});
  EXPECT_EQ(ActionNames(S::kProtected),
            (std::vector<std::string>{"unprotect", "create-point", "test-failover", "failover"}));
  EXPECT_EQ(ActionNames(S::kTestFailoverCompleted),
            (std::vector<std::string>{"unprotect", "create-point", "cleanup"}));
  EXPECT_EQ(ActionNames(S::kFailedOver), (std::vector<std::string>{"change-point", "commit"}));
  EXPECT_EQ(ActionNames(S::kFailoverCommitted),
            (std::vector<std::string>{"unprotect", "reprotect"}));
  EXPECT_EQ(ActionNames(S::kFailoverFailed), std::vector<std::string>{"failover"});
  EXPECT_TRUE(Info(S::kProtected).replicating);
  EXPECT_FALSE(Info(S::kFailedOver).replicating);
  EXPECT_TRUE(In(S::kCommitting, kUncommittedFailover));
  EXPECT_FALSE(In(S::kFailoverCommitted, kUncommittedFailover));
}

TEST(ItemStateTest, TheJobGateLetsAResumedJobGoOnOnlyWithItsProof) {
  using S = ItemState;
  // From the action's states, always.
  EXPECT_TRUE(JobMayRun(JobType::kFailover, S::kProtected, false));
  EXPECT_TRUE(JobMayRun(JobType::kFailover, S::kFailoverFailed, false));
  // From a state its own steps recorded: failover only for its own epoch.
  EXPECT_FALSE(JobMayRun(JobType::kFailover, S::kFailedOver, false));
  EXPECT_TRUE(JobMayRun(JobType::kFailover, S::kFailedOver, true));
  EXPECT_FALSE(JobMayRun(JobType::kFailover, S::kTestFailoverCompleted, true));
  EXPECT_TRUE(JobMayRun(JobType::kCommit, S::kCommitting, false));
  EXPECT_FALSE(JobMayRun(JobType::kCommit, S::kFailoverCommitted, true));
  // Reprotect: Reprotecting always; Protected only once it swapped the direction.
  EXPECT_TRUE(JobMayRun(JobType::kReprotect, S::kReprotecting, false));
  EXPECT_FALSE(JobMayRun(JobType::kReprotect, S::kProtected, false));
  EXPECT_TRUE(JobMayRun(JobType::kReprotect, S::kProtected, true));
  EXPECT_TRUE(JobMayRun(JobType::kEnableProtection, S::kEnablingProtection, false));
  EXPECT_FALSE(JobMayRun(JobType::kEnableProtection, S::kProtected, true));
  EXPECT_FALSE(JobMayRun(JobType::kTestFailover, S::kFailedOver, true));
  EXPECT_FALSE(JobMayRun(JobType::kTestFailoverCleanup, S::kProtected, true));
}

TEST(ItemStateTest, ARefusalNamesTheStateAndWhatToDo) {
  EXPECT_EQ(Refusal("vm1", ItemState::kTestFailoverCompleted, Action::kFailover),
            "VM vm1 is TestFailoverCompleted: failover needs Protected (clean up the drill first)");
  EXPECT_EQ(Refusal("vm1", ItemState::kFailedOver, Action::kUnprotect),
            "VM vm1 is FailedOver: commit the failover first, then unprotect");
  EXPECT_EQ(Refusal("vm1", ItemState::kCommitting, Action::kUnprotect),
            "VM vm1 is Committing: wait for its job to end");
  EXPECT_EQ(Refusal("vm1", ItemState::kProtected, Action::kCommit),
            "VM vm1 is Protected: commit needs FailedOver (osr failover first)");
}

TEST(ItemStateTest, StatesJsonIsTheTable) {
  nlohmann::json j = StatesJson();
  ASSERT_EQ(j["item_states"].size(), static_cast<size_t>(kItemStateCount));
  EXPECT_EQ(j["item_states"][2]["name"], "Protected");
  EXPECT_EQ(j["item_states"][2]["actions"],
            nlohmann::json({"unprotect", "create-point", "test-failover", "failover"}));
  EXPECT_EQ(j["item_states"][4]["busy"], true);  // FailingOver
  EXPECT_EQ(j["job_types"].size(), static_cast<size_t>(kJobTypeCount));
}

class ItemStateCatalogTest : public CatalogBackendTest {};

TEST_P(ItemStateCatalogTest, AStateTheCatalogDoesNotKnowIsCorruptionNamingTheRow) {
  auto c = Catalog::Open(db_).value();
  ASSERT_TRUE(c->PutItem({"vm1", "primary", "recovery", "gold", ItemState::kFailedOver, 2, nullptr,
                          nullptr})
                  .ok());
  auto back = c->FindItem("vm1");
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back.value()->state, ItemState::kFailedOver);
  ASSERT_TRUE(RawSql("UPDATE items SET state='Teleported' WHERE vm='vm1'").ok());
  auto bad = c->FindItem("vm1");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), Code::kCorruption);
  EXPECT_NE(bad.status().message().find("'vm1'"), std::string::npos) << bad.status().message();
  EXPECT_NE(bad.status().message().find("Teleported"), std::string::npos);
}

INSTANTIATE_TEST_SUITE_P(Backends, ItemStateCatalogTest,
                         ::testing::Values(Backend::kSqlite, Backend::kPostgres), BackendName);

}  // namespace
}  // namespace osr::vault
