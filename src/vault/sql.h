// SqlConnection: the vault catalog's one seam to its database. Two implementations:
// SQLite (a file, the default) and PostgreSQL (a server, through libpq). The catalog
// writes each query once, in the SQL both accept, with `?` placeholders; what differs
// between the two (placeholders, ids of new rows, column types, transactions, how a
// column is looked up) lives here and nowhere else.
//
// Thread model: a connection is not thread-safe; its owner (the Catalog) serialises
// every call under its own mutex.
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "common/status.h"

namespace osr::vault {

enum class SqlDialect { kSqlite, kPostgres };

// A bound parameter, or a cell read back (monostate: NULL).
using SqlValue = std::variant<std::monostate, int64_t, double, std::string>;

// A whole result, read before the call returns (catalog results are small: the largest
// is the audit page, bounded by its limit).
struct SqlResult {
  std::vector<std::string> columns;
  std::vector<std::vector<SqlValue>> rows;
};

// Reads one row of a result by type. A cell of another type than asked (text in an
// integer column, text that is not JSON, NULL) reads as a zero value and keeps the
// first such error, naming `what` (e.g. "items row 'vm1'") and the column; the caller
// checks status() once after reading the row.
class SqlRow {
 public:
  SqlRow(const SqlResult& result, size_t row, std::string what)
      : result_(result), row_(row), what_(std::move(what)) {}
  int64_t Int(size_t column);
  double Double(size_t column);  // an integer cell reads as its value
  std::string Text(size_t column);
  nlohmann::json Json(size_t column);  // a text cell holding JSON
  // kCorruption naming the row and its first bad column; Ok when every cell fit.
  const Status& status() const { return status_; }

 private:
  const SqlValue& Cell(size_t column);
  void Bad(size_t column, std::string_view wanted);

  const SqlResult& result_;
  size_t row_;
  std::string what_;
  Status status_;
};

// Errors of every call: kAlreadyExists (a unique key is taken), kUnavailable (the
// server cannot be reached or did not answer in time: the connection is dropped and the
// next call connects again; a statement timeout; a lock the database gave up waiting
// for), kIoError (anything else the database refused, with its message).
class SqlConnection {
 public:
  virtual ~SqlConnection() = default;
  virtual SqlDialect dialect() const = 0;
  // The database as messages name it, never with a password: "SQLite catalog PATH" or
  // "PostgreSQL server HOST:PORT (database DB)".
  virtual const std::string& name() const = 0;

  // One statement, `?` placeholders bound in order.
  virtual Result<SqlResult> Query(std::string_view sql, const std::vector<SqlValue>& params) = 0;
  // An INSERT into a table whose key is the column `id`: the new row's id.
  virtual Result<int64_t> Insert(std::string_view sql, const std::vector<SqlValue>& params) = 0;
  // Several statements separated by ';', without parameters (schema, upgrades).
  virtual Status Script(std::string_view sql) = 0;
  // Whether `table` has `column` (schema upgrades).
  virtual Result<bool> HasColumn(std::string_view table, std::string_view column) = 0;

  // A transaction: Begin, then Commit or Rollback. SQLite takes the write lock at Begin.
  // A connection lost inside a transaction fails every later call of it (kUnavailable)
  // until Rollback, which then succeeds: the server dropped the transaction. A Commit
  // that fails with kUnavailable may or may not have happened.
  virtual Status Begin() = 0;
  virtual Status Commit() = 0;
  virtual Status Rollback() = 0;

  // Status of a Query without rows to read back.
  Status Exec(std::string_view sql, const std::vector<SqlValue>& params = {}) {
    return Query(sql, params).status();
  }
};

// Opens (or creates) the SQLite database file at `path`, in WAL mode, synchronous=FULL,
// waiting up to 5 s for a lock. kIoError when the file cannot be opened.
Result<std::unique_ptr<SqlConnection>> OpenSqlite(const std::string& path);

struct PostgresOptions {
  int connect_timeout_s = 5;           // per connection attempt, TCP and authentication
  int statement_timeout_ms = 30000;    // the server ends a longer statement
  int answer_timeout_ms = 35000;       // the client gives up waiting for an answer
  int idle_in_transaction_ms = 60000;  // the server ends a transaction left open
};

// Connects to the PostgreSQL server of `url` (postgresql://USER@HOST:PORT/DB?..., the
// libpq URI form; the URL's own parameters win over the options'). A password belongs in
// a passfile (PGPASSFILE or `passfile=` in the URL), not in the URL; either works.
// kInvalidArgument for a URL libpq cannot parse, kUnavailable when the server does not
// answer (named, without the password).
Result<std::unique_ptr<SqlConnection>> OpenPostgres(const std::string& url,
                                                    const PostgresOptions& options = {});

// Whether `db` names a PostgreSQL database (postgresql:// or postgres://) rather than a
// SQLite file.
bool IsPostgresUrl(std::string_view db);

// The URL as logs may show it: the password (in the user part or a password= parameter)
// replaced by "***". A string libpq cannot parse comes back as "postgresql://(unparsable)".
std::string RedactPostgresUrl(const std::string& url);

// `sql` with each `?` outside quoted text replaced by $1, $2, ... (PostgreSQL's form).
std::string NumberPlaceholders(std::string_view sql);

}  // namespace osr::vault
