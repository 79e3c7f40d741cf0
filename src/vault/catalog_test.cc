// The catalog on both backends: SQLite and a real PostgreSQL server.
#include "vault/catalog.h"

#include <gtest/gtest.h>

#include "vault/catalog_backends_test.h"
#include "vault/pg_test_server.h"

namespace osr::vault {
namespace {

using CatalogTest = CatalogBackendTest;

TEST_P(CatalogTest, RowsSurviveReopen) {
  {
    auto c = Catalog::Open(db_).value();
    ASSERT_TRUE(c->PutSite({"primary", "http://127.0.0.1:1/api/v1", "127.0.0.1:2"}).ok());
    ASSERT_TRUE(c->PutSite({"primary", "http://127.0.0.1:1/api/v1", "127.0.0.1:3"}).ok());
    ASSERT_TRUE(c->PutPolicy({"gold", 3600, 5, 60, "none", 1000}).ok());
    EXPECT_EQ(c->PutPolicy({"gold", 1, 1, 1}).code(), Code::kAlreadyExists);
    ASSERT_TRUE(c->PutVm({"vm1", "primary", nlohmann::json::array({{{"name", "d"}}})}).ok());
    EXPECT_EQ(c->PutVm({"vm1", "primary", nlohmann::json::array()}).code(), Code::kAlreadyExists);
    ASSERT_TRUE(c->AddPoint({0, "vm1", 7, 100, "crash"}).ok());
    ASSERT_TRUE(c->PutItem({"vm1", "primary", "recovery", "gold", ItemState::kProtected, 3, nullptr,
                            nlohmann::json{{"epoch", 3}}})
                    .ok());
    ASSERT_TRUE(c->AddRpoSample("vm1", 10, 1.5, 0).ok());
    ASSERT_TRUE(c->AddRpoSample("vm1", 20, 2.25, 15).ok());  // drops the one at 10
  }
  auto c = Catalog::Open(db_).value();
  EXPECT_EQ(c->Site("primary")->replication, "127.0.0.1:3");
  EXPECT_EQ(c->Sites().size(), 1u);
  auto p = c->Policy("gold").value();
  EXPECT_EQ(p.compression, "none");
  EXPECT_EQ(p.bandwidth_bytes_per_second, 1000);
  EXPECT_EQ(c->Vm("vm1")->site, "primary");
  EXPECT_EQ(c->Vm("vm1")->disks[0]["name"], "d");
  ASSERT_EQ(c->Points("vm1").size(), 1u);
  EXPECT_EQ(c->Points("vm1")[0].seq, 7u);
  auto item = c->FindItem("vm1").value().value();
  EXPECT_EQ(item.epoch, 3u);
  EXPECT_EQ(item.failover["epoch"], 3);
  EXPECT_TRUE(item.drill.is_null());
  auto rpo = c->ListRpoSamples("vm1", 0).value();
  ASSERT_EQ(rpo.size(), 1u);
  EXPECT_EQ(rpo[0].first, 20);
  EXPECT_DOUBLE_EQ(rpo[0].second, 2.25);
  EXPECT_FALSE(c->FindItem("vm2").value().has_value());
}

TEST_P(CatalogTest, TokensSessionsAndAudit) {
  auto c = Catalog::Open(db_).value();
  TokenRow t{0, "alice", "operator", "aa", 1, 1000, 0, 0, "admin"};
  int64_t id = c->AddToken(t).value();
  ASSERT_TRUE(c->TouchToken(id, 5).ok());
  ASSERT_TRUE(c->AddSession({"s1", id, "csrf", 10, 100}).ok());
  EXPECT_EQ(c->Session("s1")->token_id, id);
  ASSERT_TRUE(c->RevokeToken(id, 50).ok());  // and its session ends
  EXPECT_EQ(c->Token(id)->revoked_ns, 50);
  EXPECT_EQ(c->Token(id)->last_used_ns, 5);
  EXPECT_FALSE(c->Session("s1").has_value());
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(c->AddAudit({0, 100 + i, "token:1", "admin", "POST", "/x", 200, "m", "r"}).ok());
  }
  auto audit = c->ListAudit(102, 2).value();  // the newest two, oldest first
  ASSERT_EQ(audit.size(), 2u);
  EXPECT_EQ(audit[0].time_ns, 103);
  EXPECT_EQ(audit[1].time_ns, 104);
}

// The schema of every older version, as its osrd made it ({id}, {int}, {real}: the
// backend's types), with a row in each table it had.
struct OldSchema {
  int version;
  const char* sql;
};

const OldSchema kOldSchemas[] = {
    {1, R"sql(
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES('schema_version','1');
CREATE TABLE sites(name TEXT PRIMARY KEY, api TEXT NOT NULL, replication TEXT NOT NULL);
CREATE TABLE policies(name TEXT PRIMARY KEY, retention_s {int} NOT NULL,
  crash_interval_s {int} NOT NULL, app_interval_s {int} NOT NULL);
CREATE TABLE vms(name TEXT PRIMARY KEY, site TEXT NOT NULL, disks TEXT NOT NULL);
CREATE TABLE items(vm TEXT PRIMARY KEY, source TEXT NOT NULL, target TEXT NOT NULL,
  policy TEXT NOT NULL, state TEXT NOT NULL, epoch {int} NOT NULL, drill TEXT NOT NULL);
CREATE TABLE points(id {id}, vm TEXT NOT NULL, seq {int} NOT NULL, time_ns {int} NOT NULL,
  type TEXT NOT NULL);
CREATE INDEX points_vm ON points(vm, seq);
CREATE TABLE jobs(id {id}, type TEXT NOT NULL, vm TEXT NOT NULL, state TEXT NOT NULL,
  progress {int} NOT NULL, steps TEXT NOT NULL, error TEXT NOT NULL, result TEXT NOT NULL,
  args TEXT NOT NULL, created_ns {int} NOT NULL, updated_ns {int} NOT NULL);
)sql"},
    {2, R"sql(
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES('schema_version','2');
CREATE TABLE sites(name TEXT PRIMARY KEY, api TEXT NOT NULL, replication TEXT NOT NULL);
CREATE TABLE policies(name TEXT PRIMARY KEY, retention_s {int} NOT NULL,
  crash_interval_s {int} NOT NULL, app_interval_s {int} NOT NULL,
  compression TEXT NOT NULL DEFAULT 'lz4', bandwidth_bytes_per_second {int} NOT NULL DEFAULT 0);
CREATE TABLE vms(name TEXT PRIMARY KEY, site TEXT NOT NULL, disks TEXT NOT NULL);
CREATE TABLE items(vm TEXT PRIMARY KEY, source TEXT NOT NULL, target TEXT NOT NULL,
  policy TEXT NOT NULL, state TEXT NOT NULL, epoch {int} NOT NULL, drill TEXT NOT NULL);
CREATE TABLE points(id {id}, vm TEXT NOT NULL, seq {int} NOT NULL, time_ns {int} NOT NULL,
  type TEXT NOT NULL);
CREATE INDEX points_vm ON points(vm, seq);
CREATE TABLE jobs(id {id}, type TEXT NOT NULL, vm TEXT NOT NULL, state TEXT NOT NULL,
  progress {int} NOT NULL, steps TEXT NOT NULL, error TEXT NOT NULL, result TEXT NOT NULL,
  args TEXT NOT NULL, created_ns {int} NOT NULL, updated_ns {int} NOT NULL);
)sql"},
    {3, R"sql(
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES('schema_version','3');
CREATE TABLE sites(name TEXT PRIMARY KEY, api TEXT NOT NULL, replication TEXT NOT NULL);
CREATE TABLE policies(name TEXT PRIMARY KEY, retention_s {int} NOT NULL,
  crash_interval_s {int} NOT NULL, app_interval_s {int} NOT NULL,
  compression TEXT NOT NULL DEFAULT 'lz4', bandwidth_bytes_per_second {int} NOT NULL DEFAULT 0);
CREATE TABLE vms(name TEXT PRIMARY KEY, site TEXT NOT NULL, disks TEXT NOT NULL,
  spec TEXT NOT NULL DEFAULT '{}');
CREATE TABLE items(vm TEXT PRIMARY KEY, source TEXT NOT NULL, target TEXT NOT NULL,
  policy TEXT NOT NULL, state TEXT NOT NULL, epoch {int} NOT NULL, drill TEXT NOT NULL,
  failover TEXT NOT NULL DEFAULT 'null');
CREATE TABLE points(id {id}, vm TEXT NOT NULL, seq {int} NOT NULL, time_ns {int} NOT NULL,
  type TEXT NOT NULL);
CREATE INDEX points_vm ON points(vm, seq);
CREATE TABLE jobs(id {id}, type TEXT NOT NULL, vm TEXT NOT NULL, state TEXT NOT NULL,
  progress {int} NOT NULL, steps TEXT NOT NULL, error TEXT NOT NULL, result TEXT NOT NULL,
  args TEXT NOT NULL, created_ns {int} NOT NULL, updated_ns {int} NOT NULL);
)sql"},
    {4, R"sql(
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES('schema_version','4');
CREATE TABLE sites(name TEXT PRIMARY KEY, api TEXT NOT NULL, replication TEXT NOT NULL);
CREATE TABLE policies(name TEXT PRIMARY KEY, retention_s {int} NOT NULL,
  crash_interval_s {int} NOT NULL, app_interval_s {int} NOT NULL,
  compression TEXT NOT NULL DEFAULT 'lz4', bandwidth_bytes_per_second {int} NOT NULL DEFAULT 0);
CREATE TABLE vms(name TEXT PRIMARY KEY, site TEXT NOT NULL, disks TEXT NOT NULL,
  spec TEXT NOT NULL DEFAULT '{}');
CREATE TABLE items(vm TEXT PRIMARY KEY, source TEXT NOT NULL, target TEXT NOT NULL,
  policy TEXT NOT NULL, state TEXT NOT NULL, epoch {int} NOT NULL, drill TEXT NOT NULL,
  failover TEXT NOT NULL DEFAULT 'null');
CREATE TABLE points(id {id}, vm TEXT NOT NULL, seq {int} NOT NULL, time_ns {int} NOT NULL,
  type TEXT NOT NULL);
CREATE INDEX points_vm ON points(vm, seq);
CREATE TABLE rpo_samples(vm TEXT NOT NULL, time_ns {int} NOT NULL, rpo_s {real} NOT NULL);
CREATE INDEX rpo_samples_vm ON rpo_samples(vm, time_ns);
CREATE TABLE jobs(id {id}, type TEXT NOT NULL, vm TEXT NOT NULL, state TEXT NOT NULL,
  progress {int} NOT NULL, steps TEXT NOT NULL, error TEXT NOT NULL, result TEXT NOT NULL,
  args TEXT NOT NULL, created_ns {int} NOT NULL, updated_ns {int} NOT NULL);
CREATE TABLE tokens(id {id}, name TEXT NOT NULL, role TEXT NOT NULL,
  secret_sha256 TEXT NOT NULL, created_ns {int} NOT NULL, expires_ns {int} NOT NULL,
  revoked_ns {int} NOT NULL DEFAULT 0, last_used_ns {int} NOT NULL DEFAULT 0,
  created_by TEXT NOT NULL DEFAULT '');
CREATE TABLE sessions(id_sha256 TEXT PRIMARY KEY, token_id {int} NOT NULL, csrf TEXT NOT NULL,
  created_ns {int} NOT NULL, expires_ns {int} NOT NULL);
CREATE TABLE audit(id {id}, time_ns {int} NOT NULL, principal TEXT NOT NULL,
  role TEXT NOT NULL, method TEXT NOT NULL, path TEXT NOT NULL, status {int} NOT NULL,
  message TEXT NOT NULL, remote TEXT NOT NULL);
)sql"},
};

constexpr const char* kOldRows = R"sql(
INSERT INTO sites VALUES('primary', 'http://127.0.0.1:1/api/v1', '127.0.0.1:2');
INSERT INTO policies(name, retention_s, crash_interval_s, app_interval_s)
  VALUES('old', 10, 2, 3);
INSERT INTO vms(name, site, disks) VALUES('vm1', 'primary', '[{"name":"d"}]');
INSERT INTO items(vm, source, target, policy, state, epoch, drill)
  VALUES('vm1', 'primary', 'recovery', 'old', 'Protected', 2, 'null');
INSERT INTO points(vm, seq, time_ns, type) VALUES('vm1', 9, 100, 'crash');
INSERT INTO jobs(type, vm, state, progress, steps, error, result, args, created_ns, updated_ns)
  VALUES('enable-protection', 'vm1', 'Succeeded', 100, '[]', '', 'null', '{}', 1, 2);
)sql";

TEST_P(CatalogTest, UpgradesEveryOlderSchema) {
  for (const auto& old : kOldSchemas) {
    SCOPED_TRACE(::testing::Message() << "from schema " << old.version);
    for (const char* t :
         {"meta", "sites", "policies", "vms", "items", "points", "jobs", "rpo_samples", "tokens",
          "sessions", "audit", "lease", "instances", "item_health"}) {
      ASSERT_TRUE(RawSql(std::string("DROP TABLE IF EXISTS ") + t).ok());
    }
    ASSERT_TRUE(RawSql(InBackend(old.sql)).ok());
    ASSERT_TRUE(RawSql(kOldRows).ok());
    {
      auto c = Catalog::Open(db_);
      ASSERT_TRUE(c.ok()) << c.status().ToString();
      auto p = (*c)->FindPolicy("old").value().value();
      EXPECT_EQ(p.retention_s, 10);
      if (old.version == 1) {
        EXPECT_EQ(p.compression, "lz4");  // the default of the new column
        EXPECT_EQ(p.bandwidth_bytes_per_second, 0);
      }
      auto vm = (*c)->FindVm("vm1").value().value();
      EXPECT_EQ(vm.disks[0]["name"], "d");
      EXPECT_TRUE(vm.spec.is_object());  // '{}' from v3 on
      auto item = (*c)->FindItem("vm1").value().value();
      EXPECT_EQ(item.epoch, 2u);
      EXPECT_TRUE(item.failover.is_null());
      EXPECT_EQ((*c)->ListPoints("vm1").value().at(0).seq, 9u);
      EXPECT_EQ((*c)->ListJobs().value().at(0).state, JobState::kSucceeded);
      // The tables of later versions are there and take rows.
      EXPECT_TRUE((*c)->AddToken({0, "t", "reader", "x", 1, 2, 0, 0, ""}).ok());
      EXPECT_TRUE((*c)->AddRpoSample("vm1", 1, 0.5, 0).ok());
      // New ids follow the old ones.
      EXPECT_GT((*c)->AddPoint({0, "vm1", 10, 200, "crash"}).value(),
                (*c)->ListPoints("vm1").value().at(0).id);
      EXPECT_EQ((*c)->FindMeta("schema_version").value().value_or(""), "6");
      // v5: the lease row (never held) and the jobs' cancel flag.
      EXPECT_EQ((*c)->ReadLease().value().token, 0);
      EXPECT_FALSE((*c)->ListJobs().value().at(0).cancel_requested);
      // v6: the items' health.
      EXPECT_TRUE((*c)->PutItemHealth({{"vm1", "Normal", 1}}).ok());
      EXPECT_EQ((*c)->ListItemHealth().value().at(0).health, "Normal");
    }
    // And it opens again as it is.
    EXPECT_TRUE(Catalog::Open(db_).ok());
  }
}

// A tick's RPO samples of every item go in at once, and the old ones of every item go.
// The same query many times with different values reads each time's values (the SQLite
// connection keeps its prepared statements).
TEST_P(CatalogTest, ATicksRpoSamplesGoInTogether) {
  auto c = Catalog::Open(db_).value();
  ASSERT_TRUE(c->AddRpoSample("vm1", 10, 1.0, 0).ok());
  ASSERT_TRUE(c->AddRpoSample("vm2", 10, 2.0, 0).ok());
  std::vector<RpoSampleRow> tick;
  for (int i = 0; i < 50; ++i) tick.push_back({"vm" + std::to_string(i), 20, 0.5 * i});
  ASSERT_TRUE(c->AddRpoSamples(tick, 15).ok());
  ASSERT_TRUE(c->AddRpoSamples({}, 1000).ok());  // nothing sampled: nothing pruned
  for (int i = 0; i < 50; ++i) {
    auto got = c->ListRpoSamples("vm" + std::to_string(i), 0).value();
    ASSERT_EQ(got.size(), 1u) << i;  // the ones at 10 went
    EXPECT_EQ(got[0].first, 20);
    EXPECT_EQ(got[0].second, 0.5 * i);
  }
}

// The newest point is the one with the highest seq (then id), as the end of ListPoints.
TEST_P(CatalogTest, TheLatestPointIsTheLastOfTheList) {
  auto c = Catalog::Open(db_).value();
  EXPECT_FALSE(c->FindLatestPoint("vm1").value().has_value());
  ASSERT_TRUE(c->AddPoint({0, "vm1", 9, 100, "crash"}).ok());
  ASSERT_TRUE(c->AddPoint({0, "vm1", 30, 300, "app"}).ok());
  ASSERT_TRUE(c->AddPoint({0, "vm1", 20, 400, "crash"}).ok());  // made later, older seq
  ASSERT_TRUE(c->AddPoint({0, "vm2", 99, 500, "crash"}).ok());
  auto latest = c->FindLatestPoint("vm1").value();
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(latest->seq, 30u);
  EXPECT_EQ(latest->type, "app");
  EXPECT_EQ(latest->id, c->ListPoints("vm1").value().back().id);
}

TEST_P(CatalogTest, RefusesANewerSchema) {
  ASSERT_TRUE(RawSql("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);"
                     "INSERT INTO meta VALUES('schema_version','99');")
                  .ok());
  auto c = Catalog::Open(db_);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), Code::kCorruption);
  EXPECT_NE(c.status().message().find("schema 99"), std::string::npos) << c.status().message();
}

TEST_P(CatalogTest, ANewPointAndWhatItPrunesAreOneTransaction) {
  auto c = Catalog::Open(db_).value();
  int64_t a = c->AddPoint({0, "vm1", 1, 100, "crash"}).value();
  int64_t b = c->AddPoint({0, "vm1", 2, 200, "crash"}).value();
  int64_t other = c->AddPoint({0, "vm2", 1, 100, "crash"}).value();
  // Another VM's id is not deleted through this VM's prune.
  int64_t d = c->AddPointAndPrune({0, "vm1", 3, 300, "crash"}, {a, other}).value();
  auto points = c->Points("vm1");
  ASSERT_EQ(points.size(), 2u);
  EXPECT_EQ(points[0].id, b);
  EXPECT_EQ(points[1].id, d);
  EXPECT_EQ(c->Points("vm2").size(), 1u);
  // The transaction ended: the catalog takes the next write.
  EXPECT_TRUE(c->AddPoint({0, "vm1", 4, 400, "crash"}).ok());
}

// The insert after the deletes fails (a trigger refuses it): the deletes are undone.
TEST_P(CatalogTest, APruneThatFailsHalfWayLeavesEveryPoint) {
  auto c = Catalog::Open(db_).value();
  int64_t a = c->AddPoint({0, "vm1", 1, 100, "crash"}).value();
  int64_t b = c->AddPoint({0, "vm1", 2, 200, "crash"}).value();
  if (GetParam() == Backend::kSqlite) {
    ASSERT_TRUE(RawSql("CREATE TRIGGER refuse BEFORE INSERT ON points WHEN NEW.seq = 666 "
                       "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;")
                    .ok());
  } else {
    ASSERT_TRUE(RawSql("CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN "
                       "IF NEW.seq = 666 THEN RAISE EXCEPTION 'refused by the test'; END IF; "
                       "RETURN NEW; END $$ LANGUAGE plpgsql;"
                       "CREATE TRIGGER refuse BEFORE INSERT ON points FOR EACH ROW "
                       "EXECUTE FUNCTION refuse();")
                    .ok());
  }
  auto r = c->AddPointAndPrune({0, "vm1", 666, 300, "crash"}, {a, b});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("refused by the test"), std::string::npos)
      << r.status().message();
  auto points = c->ListPoints("vm1").value();
  ASSERT_EQ(points.size(), 2u);
  EXPECT_EQ(points[0].id, a);
  EXPECT_EQ(points[1].id, b);
  // The catalog goes on.
  EXPECT_TRUE(c->AddPointAndPrune({0, "vm1", 3, 300, "crash"}, {a}).ok());
  EXPECT_EQ(c->ListPoints("vm1").value().size(), 2u);
}

TEST_P(CatalogTest, ATransactionIsWholeOrNothing) {
  auto c = Catalog::Open(db_).value();
  ASSERT_TRUE(c->PutPolicy({"gold"}).ok());
  Status st = c->Transact([&]() -> Status {
    OSR_RETURN_IF_ERROR(c->PutVm({"vm1", "primary", nlohmann::json::array()}));
    OSR_RETURN_IF_ERROR(c->PutItem(
        {"vm1", "primary", "recovery", "gold", ItemState::kProtected, 1, nullptr, nullptr}));
    return c->PutPolicy({"gold"});  // taken: the whole transaction fails
  });
  EXPECT_EQ(st.code(), Code::kAlreadyExists);
  EXPECT_FALSE(c->FindVm("vm1").value().has_value());
  EXPECT_FALSE(c->FindItem("vm1").value().has_value());
  // Nested: joins the outer one; both rows land on commit.
  st = c->Transact([&]() -> Status {
    OSR_RETURN_IF_ERROR(c->PutVm({"vm1", "primary", nlohmann::json::array()}));
    return c->Transact([&] {
      return c->PutItem(
          {"vm1", "primary", "recovery", "gold", ItemState::kProtected, 1, nullptr, nullptr});
    });
  });
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_TRUE(c->FindVm("vm1").value().has_value());
  EXPECT_TRUE(c->FindItem("vm1").value().has_value());
  // The item and its points go together.
  ASSERT_TRUE(c->AddPoint({0, "vm1", 1, 1, "crash"}).ok());
  ASSERT_TRUE(c->DeleteItemAndPoints("vm1").ok());
  EXPECT_FALSE(c->FindItem("vm1").value().has_value());
  EXPECT_TRUE(c->ListPoints("vm1").value().empty());
}

TEST_P(CatalogTest, AFieldOfTheWrongTypeIsAClearError) {
  auto c = Catalog::Open(db_).value();
  ASSERT_TRUE(c->PutVm({"vm1", "primary", nlohmann::json::array()}).ok());
  ASSERT_TRUE(
      c->PutItem({"vm1", "primary", "recovery", "gold", ItemState::kProtected, 1, nullptr, nullptr})
          .ok());
  // Text that is not JSON where JSON belongs.
  ASSERT_TRUE(RawSql("UPDATE vms SET disks='[{not json' WHERE name='vm1'").ok());
  auto vm = c->FindVm("vm1");
  ASSERT_FALSE(vm.ok());
  EXPECT_EQ(vm.status().code(), Code::kCorruption);
  EXPECT_NE(vm.status().message().find("vms row"), std::string::npos) << vm.status().message();
  EXPECT_NE(vm.status().message().find("column disks"), std::string::npos);
  EXPECT_FALSE(c->Vm("vm1").has_value());  // the short form: logged, no row
  // Text in an integer column (PostgreSQL checks its types: the column is changed first).
  if (GetParam() == Backend::kPostgres) {
    ASSERT_TRUE(RawSql("ALTER TABLE items ALTER COLUMN epoch TYPE TEXT").ok());
  }
  ASSERT_TRUE(RawSql("UPDATE items SET epoch='many' WHERE vm='vm1'").ok());
  auto items = c->ListItems();
  ASSERT_FALSE(items.ok());
  EXPECT_EQ(items.status().code(), Code::kCorruption);
  EXPECT_NE(items.status().message().find("column epoch holds text 'many', not an integer"),
            std::string::npos)
      << items.status().message();
  EXPECT_TRUE(c->Items().empty());
  // Mended by hand, it reads again.
  ASSERT_TRUE(RawSql("UPDATE items SET epoch='1' WHERE vm='vm1'").ok());
  if (GetParam() == Backend::kPostgres) {
    ASSERT_TRUE(
        RawSql("ALTER TABLE items ALTER COLUMN epoch TYPE BIGINT USING epoch::bigint").ok());
  }
  EXPECT_TRUE(c->FindItem("vm1").value().has_value());
}

TEST_P(CatalogTest, MetaKeysSurviveReopen) {
  {
    auto c = Catalog::Open(db_).value();
    EXPECT_FALSE(c->Meta("clock").has_value());
    ASSERT_TRUE(c->PutMeta("clock", R"({"version":1})").ok());
    ASSERT_TRUE(c->PutMeta("clock", R"({"version":2})").ok());
  }
  auto c = Catalog::Open(db_).value();
  EXPECT_EQ(c->Meta("clock").value_or(""), R"({"version":2})");
}

INSTANTIATE_TEST_SUITE_P(Backends, CatalogTest,
                         ::testing::Values(Backend::kSqlite, Backend::kPostgres), BackendName);

// ---- PostgreSQL only: the server goes away and comes back ------------------------------

TEST(CatalogPostgresTest, ARefusedConnectionNamesTheServer) {
  // A port nobody listens on: the shared server's port + a stopped server's would race;
  // a server started and stopped here leaves its port free.
  auto server = PgTestServer::Start();
  ASSERT_TRUE(server.ok()) << server.status().ToString();
  std::string url = (*server)->Url();
  int port = (*server)->port();
  ASSERT_TRUE((*server)->Stop().ok());
  auto c = Catalog::Open(url);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), Code::kUnavailable);
  EXPECT_NE(c.status().message().find("PostgreSQL server 127.0.0.1:" + std::to_string(port)),
            std::string::npos)
      << c.status().message();
}

TEST(CatalogPostgresTest, AServerStoppedMidRunIsUnavailableThenWorksAgain) {
  auto server = PgTestServer::Start();
  ASSERT_TRUE(server.ok()) << server.status().ToString();
  auto url = (*server)->CreateDatabase();
  ASSERT_TRUE(url.ok()) << url.status().ToString();
  auto c = Catalog::Open(*url).value();
  ASSERT_TRUE(c->PutSite({"primary", "http://127.0.0.1:1/api/v1", "127.0.0.1:2"}).ok());
  ASSERT_TRUE((*server)->Stop().ok());

  std::string named = "PostgreSQL server 127.0.0.1:" + std::to_string((*server)->port());
  Status put = c->PutSite({"recovery", "http://127.0.0.1:3/api/v1", "127.0.0.1:4"});
  EXPECT_EQ(put.code(), Code::kUnavailable);
  EXPECT_NE(put.message().find(named), std::string::npos) << put.message();
  auto sites = c->ListSites();
  ASSERT_FALSE(sites.ok());
  EXPECT_EQ(sites.status().code(), Code::kUnavailable);
  EXPECT_NE(sites.status().message().find(named), std::string::npos);
  // A transaction: nothing of it lands.
  Status tx = c->Transact([&]() -> Status {
    return c->PutItem(
        {"vm1", "primary", "recovery", "gold", ItemState::kProtected, 1, nullptr, nullptr});
  });
  EXPECT_EQ(tx.code(), Code::kUnavailable);
  EXPECT_TRUE(c->Sites().empty());  // the short form: logged, no rows

  ASSERT_TRUE((*server)->Restart().ok());
  // The next call connects again.
  ASSERT_TRUE(c->PutSite({"recovery", "http://127.0.0.1:3/api/v1", "127.0.0.1:4"}).ok());
  auto back = c->ListSites().value();
  ASSERT_EQ(back.size(), 2u);
  EXPECT_EQ(back[0].name, "primary");
  EXPECT_EQ(back[1].name, "recovery");
  EXPECT_FALSE(c->FindItem("vm1").value().has_value());
}

}  // namespace
}  // namespace osr::vault
