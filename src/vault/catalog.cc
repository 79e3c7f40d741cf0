#include "vault/catalog.h"

#include <fmt/format.h>

#include <chrono>

namespace osr::vault {

using nlohmann::json;

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

namespace {

constexpr int kSchemaVersion = 4;

const char* kSchema = R"sql(
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sites(name TEXT PRIMARY KEY, api TEXT NOT NULL,
  replication TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS policies(name TEXT PRIMARY KEY, retention_s INTEGER NOT NULL,
  crash_interval_s INTEGER NOT NULL, app_interval_s INTEGER NOT NULL,
  compression TEXT NOT NULL DEFAULT 'lz4', bandwidth_bytes_per_second INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS vms(name TEXT PRIMARY KEY, site TEXT NOT NULL, disks TEXT NOT NULL,
  spec TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS items(vm TEXT PRIMARY KEY, source TEXT NOT NULL,
  target TEXT NOT NULL, policy TEXT NOT NULL, state TEXT NOT NULL, epoch INTEGER NOT NULL,
  drill TEXT NOT NULL, failover TEXT NOT NULL DEFAULT 'null');
CREATE TABLE IF NOT EXISTS points(id INTEGER PRIMARY KEY AUTOINCREMENT, vm TEXT NOT NULL,
  seq INTEGER NOT NULL, time_ns INTEGER NOT NULL, type TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS points_vm ON points(vm, seq);
CREATE TABLE IF NOT EXISTS rpo_samples(vm TEXT NOT NULL, time_ns INTEGER NOT NULL,
  rpo_s REAL NOT NULL);
CREATE INDEX IF NOT EXISTS rpo_samples_vm ON rpo_samples(vm, time_ns);
CREATE TABLE IF NOT EXISTS jobs(id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT NOT NULL,
  vm TEXT NOT NULL, state TEXT NOT NULL, progress INTEGER NOT NULL, steps TEXT NOT NULL,
  error TEXT NOT NULL, result TEXT NOT NULL, args TEXT NOT NULL, created_ns INTEGER NOT NULL,
  updated_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tokens(id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL,
  role TEXT NOT NULL, secret_sha256 TEXT NOT NULL, created_ns INTEGER NOT NULL,
  expires_ns INTEGER NOT NULL, revoked_ns INTEGER NOT NULL DEFAULT 0,
  last_used_ns INTEGER NOT NULL DEFAULT 0, created_by TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS sessions(id_sha256 TEXT PRIMARY KEY, token_id INTEGER NOT NULL,
  csrf TEXT NOT NULL, created_ns INTEGER NOT NULL, expires_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS audit(id INTEGER PRIMARY KEY AUTOINCREMENT, time_ns INTEGER NOT NULL,
  principal TEXT NOT NULL, role TEXT NOT NULL, method TEXT NOT NULL, path TEXT NOT NULL,
  status INTEGER NOT NULL, message TEXT NOT NULL, remote TEXT NOT NULL);
)sql";

// A prepared statement with positional binds; finalised on scope exit.
class Stmt {
 public:
  Stmt(sqlite3* db, const char* sql) : db_(db) {
    rc_ = sqlite3_prepare_v2(db, sql, -1, &s_, nullptr);
  }
  ~Stmt() { sqlite3_finalize(s_); }
  Stmt& Bind(const std::string& v) {
    sqlite3_bind_text(s_, ++n_, v.c_str(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
    return *this;
  }
  Stmt& Bind(int64_t v) {
    sqlite3_bind_int64(s_, ++n_, v);
    return *this;
  }
  Stmt& Bind(double v) {
    sqlite3_bind_double(s_, ++n_, v);
    return *this;
  }
  // SQLITE_ROW, SQLITE_DONE or an error code.
  int Step() { return rc_ == SQLITE_OK ? sqlite3_step(s_) : rc_; }
  Status Run() {
    int rc = Step();
    if (rc == SQLITE_DONE || rc == SQLITE_ROW) return Status::Ok();
    if (rc == SQLITE_CONSTRAINT) return Status(Code::kAlreadyExists, sqlite3_errmsg(db_));
    return IoError(fmt::format("sqlite: {}", sqlite3_errmsg(db_)));
  }
  std::string Text(int i) {
    auto* p = sqlite3_column_text(s_, i);
    return p ? reinterpret_cast<const char*>(p) : "";
  }
  int64_t Int(int i) { return sqlite3_column_int64(s_, i); }
  double Double(int i) { return sqlite3_column_double(s_, i); }
  json Json(int i) {
    json j = json::parse(Text(i), nullptr, false);
    return j.is_discarded() ? json() : j;
  }

 private:
  sqlite3* db_;
  sqlite3_stmt* s_ = nullptr;
  int rc_;
  int n_ = 0;
};

}  // namespace

Result<std::unique_ptr<Catalog>> Catalog::Open(const std::string& path) {
  std::unique_ptr<Catalog> c(new Catalog());
  if (sqlite3_open(path.c_str(), &c->db_) != SQLITE_OK) {
    return IoError(fmt::format("open catalog {}: {}", path, sqlite3_errmsg(c->db_)));
  }
  sqlite3_busy_timeout(c->db_, 5000);
  OSR_RETURN_IF_ERROR(c->Exec("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;"));
  OSR_RETURN_IF_ERROR(c->Exec(kSchema));
  int64_t version = 0;  // 0: a new catalog
  {
    Stmt s(c->db_, "SELECT CAST(value AS INTEGER) FROM meta WHERE key='schema_version'");
    if (s.Step() == SQLITE_ROW) version = s.Int(0);
  }
  if (version == 1) {  // v2 added the policy's compression and bandwidth limit
    OSR_RETURN_IF_ERROR(c->Exec(
        "BEGIN; ALTER TABLE policies ADD COLUMN compression TEXT NOT NULL DEFAULT 'lz4'; "
        "ALTER TABLE policies ADD COLUMN bandwidth_bytes_per_second INTEGER NOT NULL DEFAULT 0; "
        "UPDATE meta SET value='2' WHERE key='schema_version'; COMMIT;"));
    version = 2;
  }
  if (version == 2) {  // v3 added the VM's driver spec and the item's failover record
    // (Tables that did not exist yet were just made with them.)
    auto has = [&](const char* table, const char* column) {
      std::string q =
          fmt::format("SELECT 1 FROM pragma_table_info('{}') WHERE name='{}'", table, column);
      Stmt st(c->db_, q.c_str());
      return st.Step() == SQLITE_ROW;
    };
    std::string sql = "BEGIN; ";
    if (!has("vms", "spec")) sql += "ALTER TABLE vms ADD COLUMN spec TEXT NOT NULL DEFAULT '{}'; ";
    if (!has("items", "failover")) {
      sql += "ALTER TABLE items ADD COLUMN failover TEXT NOT NULL DEFAULT 'null'; ";
    }
    sql += "UPDATE meta SET value='3' WHERE key='schema_version'; COMMIT;";
    OSR_RETURN_IF_ERROR(c->Exec(sql));
    version = 3;
  }
  if (version == 3) {  // v4 added tokens, sessions and the audit log (new tables only)
    OSR_RETURN_IF_ERROR(c->Exec("UPDATE meta SET value='4' WHERE key='schema_version'"));
    version = 4;
  }
  if (version != 0 && version != kSchemaVersion) {
    return Corruption(
        fmt::format("catalog {} has schema {}, this osrd knows {}", path, version, kSchemaVersion));
  }
  OSR_RETURN_IF_ERROR(c->Exec(fmt::format(
      "INSERT OR IGNORE INTO meta(key, value) VALUES('schema_version', '{}')", kSchemaVersion)));
  return c;
}

Catalog::~Catalog() {
  sqlite3_close(db_);
}

Status Catalog::Exec(const std::string& sql) {
  char* err = nullptr;
  if (sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
    std::string m = err ? err : "unknown";
    sqlite3_free(err);
    return IoError("sqlite: " + m);
  }
  return Status::Ok();
}

// ---- Tokens, sessions, audit ----------------------------------------------------------

namespace {
TokenRow TokenFrom(Stmt& s) {
  TokenRow t;
  t.id = s.Int(0);
  t.name = s.Text(1);
  t.role = s.Text(2);
  t.secret_sha256 = s.Text(3);
  t.created_ns = s.Int(4);
  t.expires_ns = s.Int(5);
  t.revoked_ns = s.Int(6);
  t.last_used_ns = s.Int(7);
  t.created_by = s.Text(8);
  return t;
}
constexpr const char* kTokenColumns =
    "id, name, role, secret_sha256, created_ns, expires_ns, revoked_ns, last_used_ns, "
    "created_by";
}  // namespace

Result<int64_t> Catalog::AddToken(const TokenRow& t) {
  std::lock_guard lock(mu_);
  OSR_RETURN_IF_ERROR(Stmt(db_,
                           "INSERT INTO tokens(name, role, secret_sha256, created_ns, "
                           "expires_ns, created_by) VALUES(?,?,?,?,?,?)")
                          .Bind(t.name)
                          .Bind(t.role)
                          .Bind(t.secret_sha256)
                          .Bind(t.created_ns)
                          .Bind(t.expires_ns)
                          .Bind(t.created_by)
                          .Run());
  return static_cast<int64_t>(sqlite3_last_insert_rowid(db_));
}

std::optional<TokenRow> Catalog::Token(int64_t id) {
  std::lock_guard lock(mu_);
  std::string q = fmt::format("SELECT {} FROM tokens WHERE id=?", kTokenColumns);
  Stmt s(db_, q.c_str());
  s.Bind(id);
  if (s.Step() != SQLITE_ROW) return std::nullopt;
  return TokenFrom(s);
}

std::vector<TokenRow> Catalog::Tokens() {
  std::lock_guard lock(mu_);
  std::string q = fmt::format("SELECT {} FROM tokens ORDER BY id", kTokenColumns);
  Stmt s(db_, q.c_str());
  std::vector<TokenRow> out;
  while (s.Step() == SQLITE_ROW) out.push_back(TokenFrom(s));
  return out;
}

Status Catalog::RevokeToken(int64_t id, int64_t now_ns) {
  std::lock_guard lock(mu_);
  OSR_RETURN_IF_ERROR(Stmt(db_, "UPDATE tokens SET revoked_ns=? WHERE id=? AND revoked_ns=0")
                          .Bind(now_ns)
                          .Bind(id)
                          .Run());
  // Its sessions end with it.
  return Stmt(db_, "DELETE FROM sessions WHERE token_id=?").Bind(id).Run();
}

Status Catalog::TouchToken(int64_t id, int64_t now_ns) {
  std::lock_guard lock(mu_);
  return Stmt(db_, "UPDATE tokens SET last_used_ns=? WHERE id=?").Bind(now_ns).Bind(id).Run();
}

Status Catalog::AddSession(const SessionRow& r) {
  std::lock_guard lock(mu_);
  // Expired sessions go whenever a new one is made: the table stays small.
  OSR_RETURN_IF_ERROR(
      Stmt(db_, "DELETE FROM sessions WHERE expires_ns < ?").Bind(r.created_ns).Run());
  return Stmt(db_,
              "INSERT INTO sessions(id_sha256, token_id, csrf, created_ns, expires_ns) "
              "VALUES(?,?,?,?,?)")
      .Bind(r.id_sha256)
      .Bind(r.token_id)
      .Bind(r.csrf)
      .Bind(r.created_ns)
      .Bind(r.expires_ns)
      .Run();
}

std::optional<SessionRow> Catalog::Session(const std::string& id_sha256) {
  std::lock_guard lock(mu_);
  Stmt s(db_,
         "SELECT id_sha256, token_id, csrf, created_ns, expires_ns FROM sessions "
         "WHERE id_sha256=?");
  s.Bind(id_sha256);
  if (s.Step() != SQLITE_ROW) return std::nullopt;
  return SessionRow{s.Text(0), s.Int(1), s.Text(2), s.Int(3), s.Int(4)};
}

Status Catalog::DeleteSession(const std::string& id_sha256) {
  std::lock_guard lock(mu_);
  return Stmt(db_, "DELETE FROM sessions WHERE id_sha256=?").Bind(id_sha256).Run();
}

Status Catalog::AddAudit(const AuditRow& a) {
  std::lock_guard lock(mu_);
  OSR_RETURN_IF_ERROR(Stmt(db_,
                           "INSERT INTO audit(time_ns, principal, role, method, path, status, "
                           "message, remote) VALUES(?,?,?,?,?,?,?,?)")
                          .Bind(a.time_ns)
                          .Bind(a.principal)
                          .Bind(a.role)
                          .Bind(a.method)
                          .Bind(a.path)
                          .Bind(int64_t{a.status})
                          .Bind(a.message)
                          .Bind(a.remote)
                          .Run());
  // Bounded: the newest kAuditRowsMax entries stay.
  int64_t id = static_cast<int64_t>(sqlite3_last_insert_rowid(db_));
  if (id % 1024 == 0) {
    return Stmt(db_, "DELETE FROM audit WHERE id <= ?").Bind(id - kAuditRowsMax).Run();
  }
  return Status::Ok();
}

std::vector<AuditRow> Catalog::Audit(int64_t since_ns, size_t limit) {
  std::lock_guard lock(mu_);
  Stmt s(db_,
         "SELECT id, time_ns, principal, role, method, path, status, message, remote FROM "
         "(SELECT * FROM audit WHERE time_ns >= ? ORDER BY id DESC LIMIT ?) ORDER BY id");
  s.Bind(since_ns).Bind(static_cast<int64_t>(limit));
  std::vector<AuditRow> out;
  while (s.Step() == SQLITE_ROW) {
    out.push_back({s.Int(0), s.Int(1), s.Text(2), s.Text(3), s.Text(4), s.Text(5),
                   static_cast<int>(s.Int(6)), s.Text(7), s.Text(8)});
  }
  return out;
}

Status Catalog::PutSite(const SiteRow& s) {
  std::lock_guard lock(mu_);
  return Stmt(db_, "INSERT OR REPLACE INTO sites(name, api, replication) VALUES(?,?,?)")
      .Bind(s.name)
      .Bind(s.api)
      .Bind(s.replication)
      .Run();
}

std::vector<SiteRow> Catalog::Sites() {
  std::lock_guard lock(mu_);
  std::vector<SiteRow> out;
  Stmt s(db_, "SELECT name, api, replication FROM sites ORDER BY name");
  while (s.Step() == SQLITE_ROW) out.push_back({s.Text(0), s.Text(1), s.Text(2)});
  return out;
}

std::optional<SiteRow> Catalog::Site(const std::string& name) {
  for (auto& s : Sites()) {
    if (s.name == name) return s;
  }
  return std::nullopt;
}

Status Catalog::PutPolicy(const PolicyRow& p) {
  std::lock_guard lock(mu_);
  return Stmt(db_,
              "INSERT INTO policies(name, retention_s, crash_interval_s, app_interval_s, "
              "compression, bandwidth_bytes_per_second) VALUES(?,?,?,?,?,?)")
      .Bind(p.name)
      .Bind(p.retention_s)
      .Bind(p.crash_interval_s)
      .Bind(p.app_interval_s)
      .Bind(p.compression)
      .Bind(p.bandwidth_bytes_per_second)
      .Run();
}

std::vector<PolicyRow> Catalog::Policies() {
  std::lock_guard lock(mu_);
  std::vector<PolicyRow> out;
  Stmt s(db_,
         "SELECT name, retention_s, crash_interval_s, app_interval_s, compression, "
         "bandwidth_bytes_per_second FROM policies ORDER BY name");
  while (s.Step() == SQLITE_ROW) {
    out.push_back({s.Text(0), s.Int(1), s.Int(2), s.Int(3), s.Text(4), s.Int(5)});
  }
  return out;
}

std::optional<PolicyRow> Catalog::Policy(const std::string& name) {
  for (auto& p : Policies()) {
    if (p.name == name) return p;
  }
  return std::nullopt;
}

Status Catalog::PutVm(const VmRow& v) {
  std::lock_guard lock(mu_);
  return Stmt(db_, "INSERT INTO vms(name, site, disks, spec) VALUES(?,?,?,?)")
      .Bind(v.name)
      .Bind(v.site)
      .Bind(v.disks.dump())
      .Bind(v.spec.is_object() ? v.spec.dump() : std::string("{}"))
      .Run();
}

Status Catalog::UpdateVm(const VmRow& v) {
  std::lock_guard lock(mu_);
  return Stmt(db_, "UPDATE vms SET site=?, disks=?, spec=? WHERE name=?")
      .Bind(v.site)
      .Bind(v.disks.dump())
      .Bind(v.spec.is_object() ? v.spec.dump() : std::string("{}"))
      .Bind(v.name)
      .Run();
}

std::vector<VmRow> Catalog::Vms() {
  std::lock_guard lock(mu_);
  std::vector<VmRow> out;
  Stmt s(db_, "SELECT name, site, disks, spec FROM vms ORDER BY name");
  while (s.Step() == SQLITE_ROW) out.push_back({s.Text(0), s.Text(1), s.Json(2), s.Json(3)});
  return out;
}

std::optional<VmRow> Catalog::Vm(const std::string& name) {
  std::lock_guard lock(mu_);
  Stmt s(db_, "SELECT name, site, disks, spec FROM vms WHERE name=?");
  s.Bind(name);
  if (s.Step() != SQLITE_ROW) return std::nullopt;
  return VmRow{s.Text(0), s.Text(1), s.Json(2), s.Json(3)};
}

Status Catalog::DeleteVm(const std::string& name) {
  std::lock_guard lock(mu_);
  return Stmt(db_, "DELETE FROM vms WHERE name=?").Bind(name).Run();
}

Status Catalog::PutItem(const ItemRow& i) {
  std::lock_guard lock(mu_);
  return Stmt(db_,
              "INSERT OR REPLACE INTO items(vm, source, target, policy, state, epoch, "
              "drill, failover) VALUES(?,?,?,?,?,?,?,?)")
      .Bind(i.vm)
      .Bind(i.source)
      .Bind(i.target)
      .Bind(i.policy)
      .Bind(i.state)
      .Bind(static_cast<int64_t>(i.epoch))
      .Bind(i.drill.dump())
      .Bind(i.failover.dump())
      .Run();
}

std::vector<ItemRow> Catalog::Items() {
  std::lock_guard lock(mu_);
  std::vector<ItemRow> out;
  Stmt s(db_,
         "SELECT vm, source, target, policy, state, epoch, drill, failover FROM items ORDER BY "
         "vm");
  while (s.Step() == SQLITE_ROW) {
    out.push_back({s.Text(0), s.Text(1), s.Text(2), s.Text(3), s.Text(4),
                   static_cast<uint64_t>(s.Int(5)), s.Json(6), s.Json(7)});
  }
  return out;
}

std::optional<ItemRow> Catalog::Item(const std::string& vm) {
  for (auto& i : Items()) {
    if (i.vm == vm) return i;
  }
  return std::nullopt;
}

Status Catalog::AddRpoSample(const std::string& vm, int64_t time_ns, double rpo_s,
                             int64_t keep_after_ns) {
  std::lock_guard lock(mu_);
  OSR_RETURN_IF_ERROR(Stmt(db_, "INSERT INTO rpo_samples(vm, time_ns, rpo_s) VALUES(?,?,?)")
                          .Bind(vm)
                          .Bind(time_ns)
                          .Bind(rpo_s)
                          .Run());
  return Stmt(db_, "DELETE FROM rpo_samples WHERE vm=? AND time_ns<?")
      .Bind(vm)
      .Bind(keep_after_ns)
      .Run();
}

std::vector<std::pair<int64_t, double>> Catalog::RpoSamples(const std::string& vm,
                                                            int64_t since_ns) {
  std::lock_guard lock(mu_);
  std::vector<std::pair<int64_t, double>> out;
  Stmt s(db_, "SELECT time_ns, rpo_s FROM rpo_samples WHERE vm=? AND time_ns>=? ORDER BY time_ns");
  s.Bind(vm).Bind(since_ns);
  while (s.Step() == SQLITE_ROW) out.emplace_back(s.Int(0), s.Double(1));
  return out;
}

Status Catalog::DeleteItem(const std::string& vm) {
  std::lock_guard lock(mu_);
  return Stmt(db_, "DELETE FROM items WHERE vm=?").Bind(vm).Run();
}

Result<int64_t> Catalog::InsertPointLocked(const PointRow& p) {
  OSR_RETURN_IF_ERROR(Stmt(db_, "INSERT INTO points(vm, seq, time_ns, type) VALUES(?,?,?,?)")
                          .Bind(p.vm)
                          .Bind(static_cast<int64_t>(p.seq))
                          .Bind(p.time_ns)
                          .Bind(p.type)
                          .Run());
  return static_cast<int64_t>(sqlite3_last_insert_rowid(db_));
}

Result<int64_t> Catalog::AddPoint(const PointRow& p) {
  std::lock_guard lock(mu_);
  return InsertPointLocked(p);
}

std::vector<PointRow> Catalog::Points(const std::string& vm) {
  std::lock_guard lock(mu_);
  std::vector<PointRow> out;
  Stmt s(db_, "SELECT id, vm, seq, time_ns, type FROM points WHERE vm=? ORDER BY seq, id");
  s.Bind(vm);
  while (s.Step() == SQLITE_ROW) {
    out.push_back({s.Int(0), s.Text(1), static_cast<uint64_t>(s.Int(2)), s.Int(3), s.Text(4)});
  }
  return out;
}

Status Catalog::DeletePoints(const std::string& vm) {
  std::lock_guard lock(mu_);
  return Stmt(db_, "DELETE FROM points WHERE vm=?").Bind(vm).Run();
}

Result<int64_t> Catalog::AddPointAndPrune(const PointRow& p, const std::vector<int64_t>& prune) {
  std::lock_guard lock(mu_);
  OSR_RETURN_IF_ERROR(Exec("BEGIN IMMEDIATE"));
  auto body = [&]() -> Result<int64_t> {
    for (int64_t id : prune) {
      OSR_RETURN_IF_ERROR(
          Stmt(db_, "DELETE FROM points WHERE id=? AND vm=?").Bind(id).Bind(p.vm).Run());
    }
    return InsertPointLocked(p);
  };
  Result<int64_t> id = body();
  if (!id.ok()) {
    // The transaction's first error is what the caller hears; a failed rollback leaves
    // SQLite rolling back by itself when the connection's next statement begins.
    Status rolled_back = Exec("ROLLBACK");
    if (!rolled_back.ok()) return IoError(id.status().message() + "; " + rolled_back.message());
    return id.status();
  }
  OSR_RETURN_IF_ERROR(Exec("COMMIT"));
  return id;
}

std::optional<std::string> Catalog::Meta(const std::string& key) {
  std::lock_guard lock(mu_);
  Stmt s(db_, "SELECT value FROM meta WHERE key=?");
  s.Bind(key);
  if (s.Step() != SQLITE_ROW) return std::nullopt;
  return s.Text(0);
}

Status Catalog::PutMeta(const std::string& key, const std::string& value) {
  std::lock_guard lock(mu_);
  return Stmt(db_, "INSERT OR REPLACE INTO meta(key, value) VALUES(?,?)")
      .Bind(key)
      .Bind(value)
      .Run();
}

Status Catalog::DeletePoint(int64_t id) {
  std::lock_guard lock(mu_);
  return Stmt(db_, "DELETE FROM points WHERE id=?").Bind(id).Run();
}

Result<int64_t> Catalog::AddJob(const JobRow& j) {
  std::lock_guard lock(mu_);
  OSR_RETURN_IF_ERROR(
      Stmt(db_,
           "INSERT INTO jobs(type, vm, state, progress, steps, error, result, args, "
           "created_ns, updated_ns) VALUES(?,?,?,?,?,?,?,?,?,?)")
          .Bind(j.type)
          .Bind(j.vm)
          .Bind(std::string(JobStateName(j.state)))
          .Bind(int64_t{j.progress})
          .Bind(j.steps.dump())
          .Bind(j.error)
          .Bind(j.result.dump())
          .Bind(j.args.dump())
          .Bind(j.created_ns)
          .Bind(j.updated_ns)
          .Run());
  return static_cast<int64_t>(sqlite3_last_insert_rowid(db_));
}

Status Catalog::UpdateJob(const JobRow& j) {
  std::lock_guard lock(mu_);
  return Stmt(db_,
              "UPDATE jobs SET state=?, progress=?, steps=?, error=?, result=?, args=?, "
              "updated_ns=? WHERE id=?")
      .Bind(std::string(JobStateName(j.state)))
      .Bind(int64_t{j.progress})
      .Bind(j.steps.dump())
      .Bind(j.error)
      .Bind(j.result.dump())
      .Bind(j.args.dump())
      .Bind(j.updated_ns)
      .Bind(j.id)
      .Run();
}

std::vector<JobRow> Catalog::Jobs(const std::string& vm, std::optional<JobState> state_in) {
  std::string state = state_in ? std::string(JobStateName(*state_in)) : std::string();
  std::lock_guard lock(mu_);
  std::vector<JobRow> out;
  Stmt s(db_,
         "SELECT id, type, vm, state, progress, steps, error, result, args, created_ns, "
         "updated_ns FROM jobs WHERE (?='' OR vm=?) AND (?='' OR state=?) ORDER BY id");
  s.Bind(vm).Bind(vm).Bind(state).Bind(state);
  while (s.Step() == SQLITE_ROW) {
    JobRow j;
    j.id = s.Int(0);
    j.type = s.Text(1);
    j.vm = s.Text(2);
    std::string state_name = s.Text(3);
    j.state = JobStateFromName(state_name).value_or(JobState::kFailed);
    j.progress = static_cast<int>(s.Int(4));
    j.steps = s.Json(5);
    j.error = s.Text(6);
    j.result = s.Json(7);
    j.args = s.Json(8);
    j.created_ns = s.Int(9);
    j.updated_ns = s.Int(10);
    if (!JobStateFromName(state_name)) {
      j.error = "the catalog holds job state '" + state_name + "', which this vault does not know";
    }
    out.push_back(std::move(j));
  }
  return out;
}

std::optional<JobRow> Catalog::Job(int64_t id) {
  for (auto& j : Jobs()) {
    if (j.id == id) return j;
  }
  return std::nullopt;
}

}  // namespace osr::vault
