#include "vault/catalog.h"

#include <gtest/gtest.h>
#include <sqlite3.h>
#include <unistd.h>

#include <filesystem>

namespace osr::vault {
namespace {

namespace fs = std::filesystem;

class CatalogTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = fs::temp_directory_path() /
            ("osr-catalog-" + std::to_string(::getpid()) + "-" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name() + ".db");
    fs::remove(path_);
  }
  void TearDown() override {
    fs::remove(path_);
    fs::remove(path_ + "-wal");
    fs::remove(path_ + "-shm");
  }
  std::string path_;
};

TEST_F(CatalogTest, RowsSurviveReopen) {
  {
    auto c = Catalog::Open(path_).value();
    ASSERT_TRUE(c->PutSite({"primary", "http://127.0.0.1:1/api/v1", "127.0.0.1:2"}).ok());
    ASSERT_TRUE(c->PutPolicy({"gold", 3600, 5, 60, "none", 1000}).ok());
    EXPECT_EQ(c->PutPolicy({"gold", 1, 1, 1}).code(), Code::kAlreadyExists);
    ASSERT_TRUE(c->PutVm({"vm1", "primary", nlohmann::json::array({{{"name", "d"}}})}).ok());
    ASSERT_TRUE(c->AddPoint({0, "vm1", 7, 100, "crash"}).ok());
  }
  auto c = Catalog::Open(path_).value();
  EXPECT_EQ(c->Site("primary")->replication, "127.0.0.1:2");
  auto p = c->Policy("gold").value();
  EXPECT_EQ(p.compression, "none");
  EXPECT_EQ(p.bandwidth_bytes_per_second, 1000);
  EXPECT_EQ(c->Vm("vm1")->site, "primary");
  ASSERT_EQ(c->Points("vm1").size(), 1u);
  EXPECT_EQ(c->Points("vm1")[0].seq, 7u);
}

TEST_F(CatalogTest, UpgradesAVersionOneCatalog) {
  {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
    const char* v1 =
        "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO meta VALUES('schema_version','1');"
        "CREATE TABLE policies(name TEXT PRIMARY KEY, retention_s INTEGER NOT NULL,"
        " crash_interval_s INTEGER NOT NULL, app_interval_s INTEGER NOT NULL);"
        "INSERT INTO policies VALUES('old', 10, 2, 3);";
    ASSERT_EQ(sqlite3_exec(db, v1, nullptr, nullptr, nullptr), SQLITE_OK);
    sqlite3_close(db);
  }
  auto c = Catalog::Open(path_);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  auto p = (*c)->Policy("old").value();
  EXPECT_EQ(p.retention_s, 10);
  EXPECT_EQ(p.compression, "lz4");  // the default of the new column
  EXPECT_EQ(p.bandwidth_bytes_per_second, 0);
}

TEST_F(CatalogTest, RefusesANewerSchema) {
  {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
    ASSERT_EQ(sqlite3_exec(db,
                           "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);"
                           "INSERT INTO meta VALUES('schema_version','99');",
                           nullptr, nullptr, nullptr),
              SQLITE_OK);
    sqlite3_close(db);
  }
  auto c = Catalog::Open(path_);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), Code::kCorruption);
}

TEST_F(CatalogTest, ANewPointAndWhatItPrunesAreOneTransaction) {
  auto c = Catalog::Open(path_).value();
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

TEST_F(CatalogTest, MetaKeysSurviveReopen) {
  {
    auto c = Catalog::Open(path_).value();
    EXPECT_FALSE(c->Meta("clock").has_value());
    ASSERT_TRUE(c->PutMeta("clock", R"({"version":1})").ok());
    ASSERT_TRUE(c->PutMeta("clock", R"({"version":2})").ok());
  }
  auto c = Catalog::Open(path_).value();
  EXPECT_EQ(c->Meta("clock").value_or(""), R"({"version":2})");
}

}  // namespace
}  // namespace osr::vault
