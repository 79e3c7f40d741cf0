// The SQL connection layer: placeholders, URLs without passwords, and a PostgreSQL
// server that stops answering.
#include "vault/sql.h"

#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>

#include "vault/pg_test_server.h"

namespace osr::vault {
namespace {

TEST(SqlTest, PlaceholdersAreNumberedOutsideQuotedText) {
  EXPECT_EQ(NumberPlaceholders("SELECT a FROM t WHERE b=? AND c='?' AND d=?"),
            "SELECT a FROM t WHERE b=$1 AND c='?' AND d=$2");
  EXPECT_EQ(NumberPlaceholders("INSERT INTO \"t?\"(x) VALUES(?)"),
            "INSERT INTO \"t?\"(x) VALUES($1)");
  EXPECT_EQ(NumberPlaceholders("SELECT 'it''s ?', ?"), "SELECT 'it''s ?', $1");
}

TEST(SqlTest, UrlsAreLoggedWithoutTheirPassword) {
  EXPECT_TRUE(IsPostgresUrl("postgresql://h/db"));
  EXPECT_TRUE(IsPostgresUrl("postgres://h/db"));
  EXPECT_FALSE(IsPostgresUrl("/var/lib/osr/vault.db"));
  EXPECT_FALSE(IsPostgresUrl("postgresql.db"));
  EXPECT_EQ(RedactPostgresUrl("postgresql://osr:s3cret@db1:5432/osr"),
            "postgresql://osr:***@db1:5432/osr");
  EXPECT_EQ(RedactPostgresUrl("postgresql://osr@db1/osr?password=s3cret&sslmode=require"),
            "postgresql://osr@db1/osr?password=***&sslmode=require");
  EXPECT_EQ(RedactPostgresUrl("postgresql://osr@db1/osr?passfile=/etc/osr/pgpass"),
            "postgresql://osr@db1/osr?passfile=/etc/osr/pgpass");
  EXPECT_EQ(RedactPostgresUrl("postgresql://osr:s3cret@db1:notaport/osr%"),
            "postgresql://(unparsable)");
}

TEST(SqlTest, AnUnparsableUrlIsRefusedWithoutItsPassword) {
  auto c = OpenPostgres("postgresql://osr:s3cret@db1/osr?nosuchkey=1");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), Code::kInvalidArgument);
  EXPECT_EQ(c.status().message().find("s3cret"), std::string::npos) << c.status().message();
}

// A backend that stops answering (SIGSTOP: the TCP connection stays up, so only the
// client's own deadline can end the wait) fails the call within the deadline, named;
// the next call, once it answers again, connects again.
TEST(SqlTest, AServerThatStopsAnsweringFailsTheCallInTime) {
  auto server = SharedPgTestServer();
  ASSERT_TRUE(server.ok()) << server.status().ToString();
  PostgresOptions options;
  options.answer_timeout_ms = 1000;
  auto conn = OpenPostgres((*server)->Url(), options);
  ASSERT_TRUE(conn.ok()) << conn.status().ToString();
  auto pid_rows = (*conn)->Query("SELECT pg_backend_pid()", {});
  ASSERT_TRUE(pid_rows.ok()) << pid_rows.status().ToString();
  SqlRow row(*pid_rows, 0, "pid");
  auto pid = static_cast<pid_t>(row.Int(0));
  ASSERT_TRUE(row.status().ok()) << row.status().ToString();
  ASSERT_EQ(::kill(pid, SIGSTOP), 0);
  auto t0 = std::chrono::steady_clock::now();
  auto r = (*conn)->Query("SELECT 1", {});
  auto waited = std::chrono::steady_clock::now() - t0;
  ::kill(pid, SIGCONT);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kUnavailable);
  EXPECT_NE(r.status().message().find("no answer within 1000 ms"), std::string::npos)
      << r.status().message();
  EXPECT_NE(r.status().message().find("PostgreSQL server 127.0.0.1:"), std::string::npos);
  EXPECT_LT(waited, std::chrono::seconds(10));
  auto again = (*conn)->Query("SELECT 2", {});
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  SqlRow two(*again, 0, "two");
  EXPECT_EQ(two.Int(0), 2);
}

// Both backends read the same values back in the same types.
TEST(SqlTest, TypedCellsOnPostgres) {
  auto server = SharedPgTestServer();
  ASSERT_TRUE(server.ok()) << server.status().ToString();
  auto conn = OpenPostgres((*server)->Url());
  ASSERT_TRUE(conn.ok()) << conn.status().ToString();
  auto r = (*conn)->Query("SELECT CAST(? AS BIGINT), CAST(? AS DOUBLE PRECISION), ?, NULL",
                          {int64_t{-7}, 0.25, std::string("x'y")});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  SqlRow row(*r, 0, "test row");
  EXPECT_EQ(row.Int(0), -7);
  EXPECT_DOUBLE_EQ(row.Double(1), 0.25);
  EXPECT_EQ(row.Text(2), "x'y");
  EXPECT_TRUE(row.status().ok());
  EXPECT_EQ(row.Text(3), "");
  EXPECT_EQ(row.status().code(), Code::kCorruption);
  EXPECT_NE(row.status().message().find("holds NULL"), std::string::npos) << row.status().message();
}

}  // namespace
}  // namespace osr::vault
