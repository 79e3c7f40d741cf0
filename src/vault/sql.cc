#include "vault/sql.h"

#include <fmt/format.h>
#include <libpq-fe.h>
#include <poll.h>
#include <sqlite3.h>

#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>

namespace osr::vault {

using nlohmann::json;

// ---- SqlRow ---------------------------------------------------------------------------

namespace {

const char* KindOf(const SqlValue& v) {
  switch (v.index()) {
    case 0:
      return "NULL";
    case 1:
      return "an integer";
    case 2:
      return "a real";
    default:
      return "text";
  }
}

// A cell as an error message shows it: at most 40 characters.
std::string Shown(const SqlValue& v) {
  if (const auto* s = std::get_if<std::string>(&v)) {
    std::string t = s->substr(0, 40);
    return "'" + t + (s->size() > 40 ? "...'" : "'");
  }
  if (const auto* i = std::get_if<int64_t>(&v)) return std::to_string(*i);
  if (const auto* d = std::get_if<double>(&v)) return fmt::format("{}", *d);
  return "NULL";
}

}  // namespace

const SqlValue& SqlRow::Cell(size_t column) {
  OSR_CHECK(row_ < result_.rows.size());
  const auto& row = result_.rows[row_];
  // A query asks for its columns by position: asking past them is a programmer error.
  OSR_CHECK(column < row.size());
  return row[column];
}

void SqlRow::Bad(size_t column, std::string_view wanted) {
  if (!status_.ok()) return;  // the first error is the one to fix
  const SqlValue& v = result_.rows[row_][column];
  std::string name =
      column < result_.columns.size() ? result_.columns[column] : fmt::format("#{}", column);
  status_ = Corruption(fmt::format("catalog {}: column {} holds {} {}, not {}", what_, name,
                                   KindOf(v), Shown(v), wanted));
}

int64_t SqlRow::Int(size_t column) {
  const SqlValue& v = Cell(column);
  if (const auto* i = std::get_if<int64_t>(&v)) return *i;
  Bad(column, "an integer");
  return 0;
}

double SqlRow::Double(size_t column) {
  const SqlValue& v = Cell(column);
  if (const auto* d = std::get_if<double>(&v)) return *d;
  if (const auto* i = std::get_if<int64_t>(&v)) return static_cast<double>(*i);
  Bad(column, "a number");
  return 0;
}

std::string SqlRow::Text(size_t column) {
  const SqlValue& v = Cell(column);
  if (const auto* s = std::get_if<std::string>(&v)) return *s;
  Bad(column, "text");
  return {};
}

json SqlRow::Json(size_t column) {
  const SqlValue& v = Cell(column);
  const auto* s = std::get_if<std::string>(&v);
  if (s == nullptr) {
    Bad(column, "JSON text");
    return json();
  }
  json j = json::parse(*s, nullptr, false);
  if (j.is_discarded()) {
    Bad(column, "JSON");
    return json();
  }
  return j;
}

// ---- placeholders and URLs ------------------------------------------------------------

std::string NumberPlaceholders(std::string_view sql) {
  std::string out;
  out.reserve(sql.size() + 16);
  int n = 0;
  char quote = 0;  // inside '...' or "..."
  for (char ch : sql) {
    if (quote != 0) {
      if (ch == quote) quote = 0;
      out += ch;
    } else if (ch == '\'' || ch == '"') {
      quote = ch;
      out += ch;
    } else if (ch == '?') {
      out += fmt::format("${}", ++n);
    } else {
      out += ch;
    }
  }
  return out;
}

bool IsPostgresUrl(std::string_view db) {
  return db.starts_with("postgresql://") || db.starts_with("postgres://");
}

namespace {

// The URL's parameters as libpq reads them (nullptr: not a URL libpq parses).
struct ConninfoOptions {
  PQconninfoOption* options = nullptr;
  explicit ConninfoOptions(const std::string& url) {
    char* err = nullptr;
    options = PQconninfoParse(url.c_str(), &err);
    if (err != nullptr) PQfreemem(err);
  }
  ~ConninfoOptions() {
    if (options != nullptr) PQconninfoFree(options);
  }
  std::string Get(std::string_view key) const {
    for (auto* o = options; o != nullptr && o->keyword != nullptr; ++o) {
      if (key == o->keyword && o->val != nullptr) return o->val;
    }
    return {};
  }
};

std::string EnvOr(const char* name, std::string fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::string(v) : fallback;
}

}  // namespace

std::string RedactPostgresUrl(const std::string& url) {
  ConninfoOptions parsed(url);
  if (parsed.options == nullptr) return "postgresql://(unparsable)";
  std::string out = url;
  // The user part: scheme://user:password@host
  size_t scheme = out.find("://");
  if (scheme != std::string::npos) {
    size_t start = scheme + 3;
    size_t at = out.find('@', start);
    size_t slash = out.find('/', start);
    if (at != std::string::npos && (slash == std::string::npos || at < slash)) {
      size_t colon = out.find(':', start);
      if (colon != std::string::npos && colon < at) out.replace(colon + 1, at - colon - 1, "***");
    }
  }
  // A password= parameter.
  for (size_t p = out.find("password="); p != std::string::npos; p = out.find("password=", p + 1)) {
    bool is_key = p > 0 && (out[p - 1] == '?' || out[p - 1] == '&');
    if (!is_key) continue;
    size_t end = out.find('&', p);
    out.replace(p + 9, (end == std::string::npos ? out.size() : end) - (p + 9), "***");
  }
  return out;
}

// ---- SQLite ---------------------------------------------------------------------------

namespace {

class SqliteConnection final : public SqlConnection {
 public:
  SqliteConnection(sqlite3* db, std::string path)
      : db_(db), name_("SQLite catalog " + std::move(path)) {}
  ~SqliteConnection() override {
    ForgetStatements();
    sqlite3_close(db_);
  }

  SqlDialect dialect() const override { return SqlDialect::kSqlite; }
  const std::string& name() const override { return name_; }

  Result<SqlResult> Query(std::string_view sql, const std::vector<SqlValue>& params) override {
    OSR_ASSIGN_OR_RETURN(sqlite3_stmt * stmt, Prepared(sql));
    // Reset for the next use however this one ends (its read lock goes with the reset).
    std::unique_ptr<sqlite3_stmt, void (*)(sqlite3_stmt*)> s(stmt, [](sqlite3_stmt* st) {
      sqlite3_reset(st);
      sqlite3_clear_bindings(st);
    });
    for (size_t i = 0; i < params.size(); ++i) Bind(s.get(), static_cast<int>(i + 1), params[i]);
    SqlResult out;
    int n = sqlite3_column_count(s.get());
    for (int c = 0; c < n; ++c) out.columns.emplace_back(sqlite3_column_name(s.get(), c));
    for (;;) {
      int rc = sqlite3_step(s.get());
      if (rc == SQLITE_DONE) return out;
      if (rc != SQLITE_ROW) return Error(sqlite3_extended_errcode(db_));
      auto& row = out.rows.emplace_back();
      row.reserve(static_cast<size_t>(n));
      for (int c = 0; c < n; ++c) row.push_back(Cell(s.get(), c));
    }
  }

  Result<int64_t> Insert(std::string_view sql, const std::vector<SqlValue>& params) override {
    OSR_RETURN_IF_ERROR(Query(sql, params).status());
    return static_cast<int64_t>(sqlite3_last_insert_rowid(db_));
  }

  Status Script(std::string_view sql) override {
    std::string text(sql);
    char* err = nullptr;
    if (sqlite3_exec(db_, text.c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
      std::string m = err != nullptr ? err : "unknown";
      sqlite3_free(err);
      return IoError(fmt::format("{}: {}", name_, m));
    }
    return Status::Ok();
  }

  Result<bool> HasColumn(std::string_view table, std::string_view column) override {
    OSR_ASSIGN_OR_RETURN(SqlResult r, Query("SELECT 1 FROM pragma_table_info(?) WHERE name=?",
                                            {std::string(table), std::string(column)}));
    return !r.rows.empty();
  }

  // IMMEDIATE: the write lock now, so a transaction never fails half-way for a lock.
  Status Begin() override { return Script("BEGIN IMMEDIATE"); }
  Status Commit() override { return Script("COMMIT"); }
  Status Rollback() override {
    if (sqlite3_get_autocommit(db_) != 0) return Status::Ok();  // nothing open any more
    return Script("ROLLBACK");
  }

 private:
  static void Bind(sqlite3_stmt* s, int i, const SqlValue& v) {
    if (const auto* t = std::get_if<std::string>(&v)) {
      sqlite3_bind_text(s, i, t->data(), static_cast<int>(t->size()), SQLITE_TRANSIENT);
    } else if (const auto* n = std::get_if<int64_t>(&v)) {
      sqlite3_bind_int64(s, i, *n);
    } else if (const auto* d = std::get_if<double>(&v)) {
      sqlite3_bind_double(s, i, *d);
    } else {
      sqlite3_bind_null(s, i);
    }
  }

  static SqlValue Cell(sqlite3_stmt* s, int c) {
    switch (sqlite3_column_type(s, c)) {
      case SQLITE_INTEGER:
        return int64_t{sqlite3_column_int64(s, c)};
      case SQLITE_FLOAT:
        return sqlite3_column_double(s, c);
      case SQLITE_NULL:
        return std::monostate{};
      default: {  // text, or a blob read as its bytes
        const auto* p = static_cast<const char*>(sqlite3_column_blob(s, c));
        return std::string(p != nullptr ? p : "", static_cast<size_t>(sqlite3_column_bytes(s, c)));
      }
    }
  }

  // The statement for `sql`, prepared once and kept (the catalog asks the same few dozen
  // queries over and over: each tick reads every item's site, policy and points). SQLite
  // prepares a kept statement again by itself after a schema change. Callers serialize
  // their use of the connection (Catalog's mutex), so one statement is never used twice
  // at once.
  Result<sqlite3_stmt*> Prepared(std::string_view sql) {
    auto it = statements_.find(sql);
    if (it != statements_.end()) return it->second;
    if (statements_.size() >= kStatementsMax) ForgetStatements();
    sqlite3_stmt* raw = nullptr;
    if (sqlite3_prepare_v3(db_, sql.data(), static_cast<int>(sql.size()), SQLITE_PREPARE_PERSISTENT,
                           &raw, nullptr) != SQLITE_OK) {
      return Error(sqlite3_extended_errcode(db_));
    }
    statements_.emplace(std::string(sql), raw);
    return raw;
  }

  void ForgetStatements() {
    for (auto& [sql, st] : statements_) sqlite3_finalize(st);
    statements_.clear();
  }

  Status Error(int rc) const {
    std::string m = fmt::format("{}: {}", name_, sqlite3_errmsg(db_));
    if (rc == SQLITE_CONSTRAINT_PRIMARYKEY || rc == SQLITE_CONSTRAINT_UNIQUE) {
      return Status(Code::kAlreadyExists, m);
    }
    if ((rc & 0xff) == SQLITE_BUSY || (rc & 0xff) == SQLITE_LOCKED) return Unavailable(m);
    return IoError(m);
  }

  // Queries are literals of the catalog's code, so this bounds nothing an input chooses;
  // it is a guard should that change.
  static constexpr size_t kStatementsMax = 512;

  sqlite3* db_;
  std::string name_;
  std::map<std::string, sqlite3_stmt*, std::less<>> statements_;
};

}  // namespace

Result<std::unique_ptr<SqlConnection>> OpenSqlite(const std::string& path) {
  sqlite3* db = nullptr;
  int rc = sqlite3_open(path.c_str(), &db);
  if (rc != SQLITE_OK) {
    std::string m = db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
    sqlite3_close(db);
    return IoError(fmt::format("open SQLite catalog {}: {}", path, m));
  }
  sqlite3_busy_timeout(db, 5000);
  auto c = std::make_unique<SqliteConnection>(db, path);
  OSR_RETURN_IF_ERROR(c->Script("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;"));
  return std::unique_ptr<SqlConnection>(std::move(c));
}

// ---- PostgreSQL -----------------------------------------------------------------------

namespace {

// Type oids of pg_type (fixed since PostgreSQL 7).
constexpr Oid kBoolOid = 16;
constexpr Oid kInt8Oid = 20;
constexpr Oid kInt2Oid = 21;
constexpr Oid kInt4Oid = 23;
constexpr Oid kTextOid = 25;
constexpr Oid kFloat4Oid = 700;
constexpr Oid kFloat8Oid = 701;
constexpr Oid kNumericOid = 1700;

struct ResultFree {
  void operator()(PGresult* r) const { PQclear(r); }
};
using PgResult = std::unique_ptr<PGresult, ResultFree>;

std::string OneLine(const char* message) {
  std::string m = message != nullptr ? message : "";
  while (!m.empty() && (m.back() == '\n' || m.back() == ' ')) m.pop_back();
  for (char& ch : m) {
    if (ch == '\n' || ch == '\t') ch = ' ';
  }
  return m;
}

SqlValue PgCell(const PGresult* r, int row, int c) {
  if (PQgetisnull(r, row, c)) return std::monostate{};
  const char* text = PQgetvalue(r, row, c);
  size_t size = static_cast<size_t>(PQgetlength(r, row, c));
  switch (PQftype(r, c)) {
    case kInt2Oid:
    case kInt4Oid:
    case kInt8Oid: {
      int64_t v = 0;
      auto [end, ec] = std::from_chars(text, text + size, v);
      if (ec == std::errc() && end == text + size) return v;
      break;
    }
    case kBoolOid:
      return int64_t{text[0] == 't' ? 1 : 0};
    case kFloat4Oid:
    case kFloat8Oid:
    case kNumericOid: {
      char* end = nullptr;
      double v = std::strtod(text, &end);
      if (end == text + size) return v;
      break;
    }
    default:
      break;
  }
  return std::string(text, size);
}

class PostgresConnection final : public SqlConnection {
 public:
  PostgresConnection(std::string url, PostgresOptions options)
      : url_(std::move(url)), options_(options) {
    ConninfoOptions parsed(url_);
    std::string host = parsed.Get("host");
    if (host.empty()) host = parsed.Get("hostaddr");
    if (host.empty()) host = EnvOr("PGHOST", "localhost");
    std::string port = parsed.Get("port");
    if (port.empty()) port = EnvOr("PGPORT", "5432");
    std::string db = parsed.Get("dbname");
    if (db.empty()) db = EnvOr("PGDATABASE", parsed.Get("user"));
    name_ = fmt::format("PostgreSQL server {}:{} (database {})", host, port, db);
  }
  ~PostgresConnection() override { Drop(); }

  SqlDialect dialect() const override { return SqlDialect::kPostgres; }
  const std::string& name() const override { return name_; }

  Status Connect() {
    std::string timeout = std::to_string(options_.connect_timeout_s);
    // Defaults first: the URL's own parameters, expanded from dbname, override them.
    const char* keys[] = {"connect_timeout",     "keepalives",       "keepalives_idle",
                          "keepalives_interval", "keepalives_count", "tcp_user_timeout",
                          "application_name",    "dbname",           nullptr};
    const char* values[] = {timeout.c_str(), "1",          "5",          "2",    "3",
                            "10000",         "osrd-vault", url_.c_str(), nullptr};
    PGconn* c = PQconnectdbParams(keys, values, 1);
    if (c == nullptr) return Unavailable(name_ + " cannot be reached: out of memory");
    if (PQstatus(c) != CONNECTION_OK) {
      std::string m = OneLine(PQerrorMessage(c));
      PQfinish(c);
      return Unavailable(fmt::format("{} cannot be reached: {}", name_, m));
    }
    // Notices ("relation already exists, skipping") are not errors: not to stderr.
    PQsetNoticeProcessor(
        c, [](void*, const char*) {}, nullptr);
    conn_ = c;
    Status set =
        Exchange(
            fmt::format("SET statement_timeout = {}; SET idle_in_transaction_session_timeout = {}",
                        options_.statement_timeout_ms, options_.idle_in_transaction_ms),
            nullptr)
            .status();
    if (!set.ok()) Drop();
    return set;
  }

  Result<SqlResult> Query(std::string_view sql, const std::vector<SqlValue>& params) override {
    OSR_RETURN_IF_ERROR(Ready());
    OSR_ASSIGN_OR_RETURN(PgResult r, Exchange(NumberPlaceholders(sql), &params));
    SqlResult out;
    int columns = PQnfields(r.get());
    int rows = PQntuples(r.get());
    for (int c = 0; c < columns; ++c) out.columns.emplace_back(PQfname(r.get(), c));
    out.rows.reserve(static_cast<size_t>(rows));
    for (int i = 0; i < rows; ++i) {
      auto& row = out.rows.emplace_back();
      row.reserve(static_cast<size_t>(columns));
      for (int c = 0; c < columns; ++c) row.push_back(PgCell(r.get(), i, c));
    }
    return out;
  }

  Result<int64_t> Insert(std::string_view sql, const std::vector<SqlValue>& params) override {
    OSR_ASSIGN_OR_RETURN(SqlResult r, Query(std::string(sql) + " RETURNING id", params));
    if (r.rows.size() != 1) return IoError(name_ + ": an insert returned no id");
    SqlRow row(r, 0, "new row");
    int64_t id = row.Int(0);
    OSR_RETURN_IF_ERROR(row.status());
    return id;
  }

  Status Script(std::string_view sql) override {
    OSR_RETURN_IF_ERROR(Ready());
    return Exchange(std::string(sql), nullptr).status();
  }

  Result<bool> HasColumn(std::string_view table, std::string_view column) override {
    OSR_ASSIGN_OR_RETURN(SqlResult r, Query("SELECT 1 FROM information_schema.columns WHERE "
                                            "table_schema = current_schema() AND "
                                            "table_name = ? AND column_name = ?",
                                            {std::string(table), std::string(column)}));
    return !r.rows.empty();
  }

  Status Begin() override {
    OSR_CHECK(!in_transaction_);  // the catalog does not nest transactions
    OSR_RETURN_IF_ERROR(Script("BEGIN"));
    in_transaction_ = true;
    return Status::Ok();
  }

  Status Commit() override {
    if (lost_in_transaction_) {
      EndTransaction();
      return Unavailable(name_ +
                         ": the connection was lost in the transaction; nothing of it "
                         "was committed");
    }
    OSR_RETURN_IF_ERROR(Ready());
    auto r = Exchange("COMMIT", nullptr);
    EndTransaction();
    OSR_RETURN_IF_ERROR(r.status());
    // COMMIT of a transaction that failed earlier answers ROLLBACK, not an error.
    if (std::strcmp(PQcmdStatus(r->get()), "ROLLBACK") == 0) {
      return IoError(name_ + ": the transaction was rolled back");
    }
    return Status::Ok();
  }

  Status Rollback() override {
    bool lost = lost_in_transaction_ || conn_ == nullptr;
    Status st = lost ? Status::Ok() : Exchange("ROLLBACK", nullptr).status();
    EndTransaction();
    // A connection lost now rolls the transaction back on the server just the same.
    if (!st.ok() && conn_ == nullptr) return Status::Ok();
    return st;
  }

 private:
  void EndTransaction() {
    in_transaction_ = false;
    lost_in_transaction_ = false;
  }

  void Drop() {
    if (conn_ != nullptr) PQfinish(conn_);
    conn_ = nullptr;
  }

  // A connection to use, made again when the last one was lost (never inside a
  // transaction: that transaction is gone with its connection).
  Status Ready() {
    if (lost_in_transaction_) {
      return Unavailable(name_ +
                         ": the connection was lost in the transaction; it was rolled "
                         "back");
    }
    if (conn_ != nullptr && PQstatus(conn_) == CONNECTION_OK) return Status::Ok();
    Drop();
    return Connect();
  }

  Status Lost(const std::string& why) {
    Drop();
    if (in_transaction_) lost_in_transaction_ = true;
    return Unavailable(fmt::format("{} is unreachable: {}", name_, why));
  }

  // Sends `sql` (with `params`: one statement; without: any number of them) and waits
  // for its answer, at most answer_timeout_ms: a server that stopped answering (paused,
  // or its host gone without a reset) fails the call instead of hanging it.
  Result<PgResult> Exchange(const std::string& sql, const std::vector<SqlValue>* params) {
    int sent = 0;
    if (params == nullptr) {
      sent = PQsendQuery(conn_, sql.c_str());
    } else {
      std::vector<std::string> texts(params->size());
      std::vector<const char*> values(params->size(), nullptr);
      std::vector<Oid> types(params->size(), 0);
      for (size_t i = 0; i < params->size(); ++i) {
        const SqlValue& v = (*params)[i];
        if (const auto* s = std::get_if<std::string>(&v)) {
          values[i] = s->c_str();
          types[i] = kTextOid;
        } else if (const auto* n = std::get_if<int64_t>(&v)) {
          texts[i] = std::to_string(*n);
          types[i] = kInt8Oid;
          values[i] = texts[i].c_str();
        } else if (const auto* d = std::get_if<double>(&v)) {
          texts[i] = std::isnan(*d)   ? "NaN"
                     : std::isinf(*d) ? (*d > 0 ? "Infinity" : "-Infinity")
                                      : fmt::format("{}", *d);
          types[i] = kFloat8Oid;
          values[i] = texts[i].c_str();
        }
      }
      sent = PQsendQueryParams(conn_, sql.c_str(), static_cast<int>(params->size()), types.data(),
                               values.data(), nullptr, nullptr, 0);
    }
    if (sent == 0) return Lost(OneLine(PQerrorMessage(conn_)));
    auto deadline =
        std::chrono::steady_clock::now() + std::chrono::milliseconds(options_.answer_timeout_ms);
    while (PQisBusy(conn_) != 0) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                      deadline - std::chrono::steady_clock::now())
                      .count();
      if (left <= 0) {
        return Lost(fmt::format("no answer within {} ms", options_.answer_timeout_ms));
      }
      pollfd p{PQsocket(conn_), POLLIN, 0};
      int rc = ::poll(&p, 1, static_cast<int>(left));
      if (rc < 0 && errno != EINTR) return Lost(std::strerror(errno));
      if (rc > 0 && PQconsumeInput(conn_) == 0) return Lost(OneLine(PQerrorMessage(conn_)));
    }
    // Every result of the call is read (a script has one per statement); the first
    // error is the answer, else the last result.
    PgResult answer;
    bool failed = false;
    while (PGresult* next = PQgetResult(conn_)) {
      PgResult r(next);
      ExecStatusType st = PQresultStatus(next);
      bool bad = st == PGRES_FATAL_ERROR || st == PGRES_BAD_RESPONSE || st == PGRES_NONFATAL_ERROR;
      if (!failed) {
        answer = std::move(r);
        failed = bad;
      }
    }
    if (PQstatus(conn_) == CONNECTION_BAD) {
      std::string why = answer ? OneLine(PQresultErrorMessage(answer.get())) : "";
      return Lost(why.empty() ? OneLine(PQerrorMessage(conn_)) : why);
    }
    if (!answer) return IoError(name_ + ": no answer to a statement");
    if (failed) return ErrorOf(answer.get());
    return answer;
  }

  Status ErrorOf(const PGresult* r) {
    const char* state = PQresultErrorField(r, PG_DIAG_SQLSTATE);
    std::string code = state != nullptr ? state : "";
    std::string m = fmt::format("{}: {}", name_, OneLine(PQresultErrorMessage(r)));
    if (code == "23505") return Status(Code::kAlreadyExists, m);  // unique_violation
    if (code.starts_with("08")) return Lost(OneLine(PQresultErrorMessage(r)));
    // Shutting down, statement timeout, serialization failure, deadlock, lock not
    // available, too many connections: the same call may work later.
    if (code.starts_with("57") || code == "40001" || code == "40P01" || code == "55P03" ||
        code == "53300") {
      return Unavailable(m);
    }
    return IoError(m);
  }

  std::string url_;  // may hold a password: never in a message
  PostgresOptions options_;
  std::string name_;
  PGconn* conn_ = nullptr;
  bool in_transaction_ = false;
  bool lost_in_transaction_ = false;
};

}  // namespace

Result<std::unique_ptr<SqlConnection>> OpenPostgres(const std::string& url,
                                                    const PostgresOptions& options) {
  {
    ConninfoOptions parsed(url);
    if (parsed.options == nullptr) {
      return InvalidArgument("not a PostgreSQL URL libpq can read: " + RedactPostgresUrl(url));
    }
  }
  auto c = std::make_unique<PostgresConnection>(url, options);
  OSR_RETURN_IF_ERROR(c->Connect());
  return std::unique_ptr<SqlConnection>(std::move(c));
}

}  // namespace osr::vault
