// The lease (vault/catalog.h LeaseRow, LeaseFence; vault/lease.h) on both backends:
// SQLite and a real PostgreSQL server.
#include "vault/lease.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "vault/catalog.h"
#include "vault/catalog_backends_test.h"
#include "vault/job_steps.h"

namespace osr::vault {
namespace {

using LeaseTest = CatalogBackendTest;

const InstanceRow kA{"a", "host1", "127.0.0.1:1", 0, 0};
const InstanceRow kB{"b", "host2", "127.0.0.1:2", 0, 0};

TEST_P(LeaseTest, OneHolderUntilItLapsesAndTheTokenGrows) {
  auto ca = Catalog::Open(db_).value();
  auto cb = Catalog::Open(db_).value();
  ASSERT_TRUE(ca->PutInstance(kA).ok());
  ASSERT_TRUE(cb->PutInstance(kB).ok());

  auto a = ca->AcquireLease(kA, 60000);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ASSERT_TRUE(a->has_value());
  EXPECT_EQ((*a)->holder, "a");
  EXPECT_EQ((*a)->token, 1);
  EXPECT_GE((*a)->expires_ms - (*a)->now_ms, 59000);
  // Held: the other instance cannot take it, nor renew it.
  auto b = cb->AcquireLease(kB, 60000);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_FALSE(b->has_value());
  EXPECT_FALSE(cb->RenewLease("b", 1, 60000).value());
  EXPECT_TRUE(ca->RenewLease("a", 1, 60000).value());
  // A renewal under a wrong token is no renewal.
  EXPECT_FALSE(ca->RenewLease("a", 2, 60000).value());

  // It lapses (renewed to end in the past: the database's clock decides): B takes it.
  ASSERT_TRUE(ca->RenewLease("a", 1, -1000).value());
  b = cb->AcquireLease(kB, 60000);
  ASSERT_TRUE(b.ok() && b->has_value()) << b.status().ToString();
  EXPECT_EQ((*b)->token, 2);
  EXPECT_FALSE(ca->RenewLease("a", 1, 60000).value());  // A learns it lost it
  auto seen = ca->ReadLease().value();
  EXPECT_EQ(seen.holder, "b");
  EXPECT_EQ(seen.token, 2);
  EXPECT_GT(seen.expires_ms, seen.now_ms);

  // Given up: taken at once, with the next token.
  ASSERT_TRUE(cb->ReleaseLease("b", 2).ok());
  a = ca->AcquireLease(kA, 60000);
  ASSERT_TRUE(a.ok() && a->has_value());
  EXPECT_EQ((*a)->token, 3);
  // A release under an old token changes nothing.
  ASSERT_TRUE(cb->ReleaseLease("b", 2).ok());
  EXPECT_EQ(ca->ReadLease().value().holder, "a");

  auto instances = ca->ListInstances().value();
  ASSERT_EQ(instances.size(), 2u);
  EXPECT_EQ(instances[0].id, "a");
  EXPECT_GT(instances[0].started_ms, 0);
}

TEST_P(LeaseTest, ARestartOnTheSameAddressTakesItsLeaseBackAtOnce) {
  auto c = Catalog::Open(db_).value();
  ASSERT_TRUE(c->PutInstance(kA).ok());
  ASSERT_TRUE(c->AcquireLease(kA, 60000).value().has_value());
  // Another host's instance waits; the same host and address (a new id) does not.
  InstanceRow again = kA;
  again.id = "a2";
  ASSERT_TRUE(c->PutInstance(again).ok());
  EXPECT_FALSE(c->AcquireLease(kB, 60000).value().has_value());
  auto got = c->AcquireLease(again, 60000);
  ASSERT_TRUE(got.ok() && got->has_value()) << got.status().ToString();
  EXPECT_EQ((*got)->holder, "a2");
  EXPECT_EQ((*got)->token, 2);
}

TEST_P(LeaseTest, AWriteUnderAnOldTokenFailsAndWritesNothing) {
  auto ca = Catalog::Open(db_).value();
  auto cb = Catalog::Open(db_).value();
  ASSERT_TRUE(ca->PutInstance(kA).ok());
  ASSERT_TRUE(cb->PutInstance(kB).ok());
  ASSERT_TRUE(ca->AcquireLease(kA, 60000).value().has_value());
  LeaseFence fa("a", 1, 6000);
  ItemRow item{"vm1", "p", "r", "default", ItemState::kProtected, 1, nullptr, nullptr};
  {
    FenceScope scope(&fa);  // the current holder writes
    ASSERT_TRUE(ca->PutItem(item).ok());
    ASSERT_TRUE(ca->AddPoint({0, "vm1", 5, 1, "crash"}).ok());
  }
  EXPECT_FALSE(fa.lost());
  // B takes over after A lapsed.
  ASSERT_TRUE(ca->RenewLease("a", 1, -1000).value());
  ASSERT_TRUE(cb->AcquireLease(kB, 60000).value().has_value());

  item.state = ItemState::kFailedOver;
  {
    FenceScope scope(&fa);
    Status st = ca->PutItem(item);
    EXPECT_EQ(st.code(), Code::kFailedPrecondition) << st.ToString();
    EXPECT_NE(st.message().find("fenced"), std::string::npos) << st.message();
    EXPECT_TRUE(fa.lost());
    // A transaction of several writes, and an insert: nothing of them either.
    auto p = ca->AddPointAndPrune({0, "vm1", 9, 2, "crash"}, {1});
    EXPECT_EQ(p.status().code(), Code::kFailedPrecondition);
    EXPECT_EQ(ca->AddJob({}).status().code(), Code::kFailedPrecondition);
    EXPECT_EQ(ca->Transact([&] { return ca->DeleteItem("vm1"); }).code(),
              Code::kFailedPrecondition);
  }
  EXPECT_EQ(ca->fenced_writes(), 4);
  EXPECT_EQ(ca->FindItem("vm1").value()->state, ItemState::kProtected);
  auto points = ca->ListPoints("vm1").value();
  ASSERT_EQ(points.size(), 1u);
  EXPECT_EQ(points[0].seq, 5u);
  EXPECT_TRUE(ca->ListJobs().value().empty());
  // Writes outside a fenced scope (the API's) are not fenced; the new holder's are fine.
  EXPECT_TRUE(ca->PutItem(item).ok());
  LeaseFence fb("b", 2, 6000);
  FenceScope scope(&fb);
  EXPECT_TRUE(cb->AddPoint({0, "vm1", 6, 3, "crash"}).ok());
  EXPECT_FALSE(fb.lost());
}

TEST_P(LeaseTest, JobsAreClaimedOnceAndCancelledThroughTheirRow) {
  auto c = Catalog::Open(db_).value();
  JobRow j;
  j.type = "failover";
  j.vm = "vm1";
  int64_t id = c->AddJob(j).value();
  int64_t other = c->AddJob(j).value();
  EXPECT_TRUE(c->ClaimJob(id, 5).value());
  EXPECT_FALSE(c->ClaimJob(id, 6).value());  // taken already
  EXPECT_EQ(c->FindJob(id).value()->state, JobState::kRunning);
  EXPECT_FALSE(c->CancelQueuedJob(id, "x", 7).value());  // running: not a queued cancel
  EXPECT_TRUE(c->RequestJobCancel(id).value());
  EXPECT_TRUE(c->FindJob(id).value()->cancel_requested);
  // A job asked to stop before it ran is never claimed, and its cancel is recorded.
  EXPECT_TRUE(c->RequestJobCancel(other).value());
  EXPECT_FALSE(c->ClaimJob(other, 8).value());
  EXPECT_TRUE(c->CancelQueuedJob(other, "cancelled before it started", 9).value());
  auto row = c->FindJob(other).value().value();
  EXPECT_EQ(row.state, JobState::kCancelled);
  EXPECT_EQ(row.error, "cancelled before it started");
  EXPECT_FALSE(c->RequestJobCancel(other).value());  // ended
  // UpdateJob keeps the flag (only the API sets it).
  auto running = c->FindJob(id).value().value();
  running.progress = 50;
  ASSERT_TRUE(c->UpdateJob(running).ok());
  EXPECT_TRUE(c->FindJob(id).value()->cancel_requested);
}

TEST_P(LeaseTest, KeepersHandOverWhenTheLeaderStops) {
  std::atomic<int> gained_a{0}, lost_a{0}, gained_b{0};
  auto callbacks = [](std::atomic<int>& gained, std::atomic<int>* lost) {
    LeaseKeeper::Callbacks cb;
    cb.gained = [&gained](LeaseFence&) {
      ++gained;
      return Status::Ok();
    };
    cb.lost = [lost] {
      if (lost != nullptr) ++*lost;
    };
    return cb;
  };
  auto a = LeaseKeeper::Open({db_, 600, "host", "127.0.0.1:1"}, callbacks(gained_a, &lost_a));
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  auto b = LeaseKeeper::Open({db_, 600, "host", "127.0.0.1:2"}, callbacks(gained_b, nullptr));
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_TRUE((*a)->TryLead().value());
  EXPECT_FALSE((*b)->TryLead().value());
  (*a)->Start();
  (*b)->Start();
  // A renews: B stays a follower across several TTLs.
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  EXPECT_TRUE((*a)->leading());
  EXPECT_FALSE((*b)->leading());
  EXPECT_EQ(gained_b.load(), 0);
  (*a)->Stop();  // gives the lease up
  EXPECT_EQ(lost_a.load(), 1);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!(*b)->leading() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_TRUE((*b)->leading());
  EXPECT_EQ(gained_b.load(), 1);
  (*b)->Stop();
}

// The operator's reset after a catalog restore (osrd vault --lease-token-floor): the token
// only rises, the next term's token is above the floor, and a holder under the old token
// has lost the lease.
TEST_P(LeaseTest, ATokenFloorRaisesTheNextTermsTokenOnlyUpward) {
  auto c = Catalog::Open(db_).value();
  ASSERT_TRUE(c->PutInstance(kA).ok());
  ASSERT_TRUE(c->PutInstance(kB).ok());
  auto a = c->AcquireLease(kA, 60000);
  ASSERT_TRUE(a.ok() && a->has_value()) << a.status().ToString();
  ASSERT_EQ((*a)->token, 1);

  auto before = c->RaiseLeaseToken(7);
  ASSERT_TRUE(before.ok()) << before.status().ToString();
  EXPECT_EQ(*before, 1);
  EXPECT_EQ(c->ReadLease().value().token, 7);
  EXPECT_FALSE(c->RenewLease("a", 1, 60000).value());  // A's term is over
  ASSERT_TRUE(c->RenewLease("a", 7, -1000).ok());      // (the row still names A: let it lapse)
  auto b = c->AcquireLease(kB, 60000);
  ASSERT_TRUE(b.ok() && b->has_value()) << b.status().ToString();
  EXPECT_EQ((*b)->token, 8);

  // A floor at or below the token changes nothing: B keeps its term.
  EXPECT_EQ(c->RaiseLeaseToken(8).value(), 8);
  EXPECT_EQ(c->RaiseLeaseToken(3).value(), 8);
  EXPECT_TRUE(c->RenewLease("b", 8, 60000).value());
  EXPECT_EQ(c->RaiseLeaseToken(0).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(c->ReadLease().value().token, 8);

  // Through the keeper's config: the instance that starts with it leads above the floor.
  std::atomic<int64_t> token{0};
  LeaseKeeper::Callbacks cb;
  cb.gained = [&token](LeaseFence& f) {
    token = f.token();
    return Status::Ok();
  };
  cb.lost = [] {};
  ASSERT_TRUE(c->ReleaseLease("b", 8).ok());
  LeaseConfig lc{db_, 600, "host", "127.0.0.1:3"};
  lc.token_floor = 20;
  auto k = LeaseKeeper::Open(lc, cb);
  ASSERT_TRUE(k.ok()) << k.status().ToString();
  EXPECT_TRUE((*k)->TryLead().value());
  EXPECT_EQ(token.load(), 21);
  (*k)->Stop();
}

TEST(LeaseFenceTest, AJobOfALostTermStopsWithoutBeingCancelled) {
  LeaseFence fence("a", 1, 6000);
  FenceScope scope(&fence);
  JobCancel cancel;  // made on a fenced thread: a job worker's
  EXPECT_TRUE(cancel.Check().ok());
  EXPECT_FALSE(cancel.ByVault());
  fence.Lose();
  EXPECT_EQ(cancel.reason(), JobCancel::Reason::kLeaseLost);
  EXPECT_TRUE(cancel.ByVault());  // nothing is undone
  EXPECT_EQ(cancel.Sleep(std::chrono::milliseconds(1)).code(), Code::kUnavailable);
}

INSTANTIATE_TEST_SUITE_P(Backends, LeaseTest,
                         ::testing::Values(Backend::kSqlite, Backend::kPostgres), BackendName);

// PostgreSQL only: a takeover waits for a fenced write under way (FOR SHARE), and the
// write, once it ends, is ordered before the new token.
class LeasePostgresTest : public CatalogBackendTest {};

TEST_P(LeasePostgresTest, ATakeoverWaitsForAFencedWriteUnderWay) {
  auto ca = Catalog::Open(db_).value();
  auto cb = Catalog::Open(db_).value();
  ASSERT_TRUE(ca->AcquireLease(kA, 60000).value().has_value());
  ASSERT_TRUE(ca->RenewLease("a", 1, -1000).value());  // lapsed, not taken yet
  LeaseFence fa("a", 1, 6000);
  std::atomic<bool> inside{false}, release{false};
  std::thread writer([&] {
    FenceScope scope(&fa);
    Status st = ca->Transact([&]() -> Status {
      OSR_RETURN_IF_ERROR(
          ca->PutItem({"vm1", "p", "r", "default", ItemState::kProtected, 1, nullptr, nullptr}));
      inside = true;
      while (!release) std::this_thread::sleep_for(std::chrono::milliseconds(10));
      return Status::Ok();
    });
    EXPECT_TRUE(st.ok()) << st.ToString();
  });
  while (!inside) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  // The row is locked by the write: the takeover gives up after its lock timeout.
  auto b = cb->AcquireLease(kB, 60000);
  EXPECT_EQ(b.status().code(), Code::kUnavailable) << b.status().ToString();
  release = true;
  writer.join();
  b = cb->AcquireLease(kB, 60000);
  ASSERT_TRUE(b.ok() && b->has_value()) << b.status().ToString();
  EXPECT_EQ((*b)->token, 2);
  EXPECT_EQ(cb->FindItem("vm1").value()->state, ItemState::kProtected);
}

INSTANTIATE_TEST_SUITE_P(Postgres, LeasePostgresTest, ::testing::Values(Backend::kPostgres),
                         BackendName);

}  // namespace
}  // namespace osr::vault
