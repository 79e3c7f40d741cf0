#include "vault/pg_test_server.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <grp.h>
#include <libpq-fe.h>
#include <netinet/in.h>
#include <pwd.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

#include "vault/sql.h"

namespace osr::vault {

namespace fs = std::filesystem;

namespace {

constexpr const char* kDefaultBin = "/usr/lib/postgresql/15/bin";
constexpr int kStartAttemptsMax = 5;  // a port taken between choosing and binding it
constexpr std::chrono::seconds kStartWait{60};
constexpr std::chrono::seconds kStopWait{60};

int FreePort() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return 0;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  int port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0) {
    port = ntohs(a.sin_port);
  }
  ::close(fd);
  return port;
}

// Runs argv as uid/gid (when we are root), its output appended to `log`; its exit status
// (-1: it did not run).
int Run(const std::vector<std::string>& argv, uid_t uid, gid_t gid, const std::string& log) {
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  bool switch_user = ::geteuid() == 0;
  pid_t pid = ::fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd >= 0) {
      ::dup2(fd, 1);
      ::dup2(fd, 2);
    }
    int null = ::open("/dev/null", O_RDONLY);
    if (null >= 0) ::dup2(null, 0);
    if (switch_user && (::setgroups(0, nullptr) != 0 || ::setgid(gid) != 0 || ::setuid(uid) != 0)) {
      _exit(126);
    }
    ::execv(args[0], args.data());
    _exit(127);
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) return -1;
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

}  // namespace

Result<std::unique_ptr<PgTestServer>> PgTestServer::Start() {
  std::unique_ptr<PgTestServer> s(new PgTestServer());
  const char* bin = std::getenv("OSR_PG_BIN");
  s->bin_ = bin != nullptr && *bin != '\0' ? bin : kDefaultBin;
  for (const char* tool : {"initdb", "postgres"}) {
    if (::access((s->bin_ + "/" + tool).c_str(), X_OK) != 0) {
      return NotFound(fmt::format(
          "PostgreSQL's {} is not in {} (install Debian's postgresql: scripts/bootstrap, or "
          "set OSR_PG_BIN)",
          tool, s->bin_));
    }
  }
  if (::geteuid() == 0) {
    passwd* pw = ::getpwnam("postgres");
    if (pw == nullptr) {
      return NotFound("no user postgres to run the test server as (install Debian's postgresql)");
    }
    s->uid_ = pw->pw_uid;
    s->gid_ = pw->pw_gid;
  } else {
    s->uid_ = ::geteuid();
    s->gid_ = ::getegid();
  }
  std::string tmpl = (fs::temp_directory_path() / "osr-pg-XXXXXX").string();
  if (::mkdtemp(tmpl.data()) == nullptr) return Status::FromErrno(errno, "mkdtemp " + tmpl);
  s->dir_ = tmpl;
  if (::chown(s->dir_.c_str(), s->uid_, s->gid_) != 0) {
    return Status::FromErrno(errno, "chown " + s->dir_);
  }
  int rc = Run({s->bin_ + "/initdb", "-D", s->dir_ + "/data", "-A", "trust", "-U", "postgres", "-E",
                "UTF8", "--no-sync", "--no-instructions"},
               s->uid_, s->gid_, s->dir_ + "/initdb.log");
  if (rc != 0) {
    std::ifstream in(s->dir_ + "/initdb.log");
    std::stringstream text;
    text << in.rdbuf();
    return IoError(fmt::format("initdb into {} exited with {}: {}", s->dir_, rc, text.str()));
  }
  for (int attempt = 0;; ++attempt) {
    s->port_ = FreePort();
    Status started = s->StartServer();
    if (started.ok()) break;
    if (attempt + 1 == kStartAttemptsMax) return started;
  }
  return s;
}

Status PgTestServer::StartServer() {
  std::string port = std::to_string(port_);
  std::vector<std::string> argv = {bin_ + "/postgres",
                                   "-D",
                                   dir_ + "/data",
                                   "-p",
                                   port,
                                   "-k",
                                   dir_,
                                   "-c",
                                   "listen_addresses=127.0.0.1",
                                   "-c",
                                   "fsync=off",
                                   "-c",
                                   "synchronous_commit=off",
                                   "-c",
                                   "full_page_writes=off",
                                   "-c",
                                   "max_connections=50",
                                   "-c",
                                   "shared_buffers=16MB"};
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  std::string log = dir_ + "/server.log";
  bool switch_user = ::geteuid() == 0;
  pid_t parent = ::getpid();
  pid_t pid = ::fork();
  if (pid < 0) return Status::FromErrno(errno, "fork");
  if (pid == 0) {
    int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd >= 0) {
      ::dup2(fd, 1);
      ::dup2(fd, 2);
    }
    if (switch_user &&
        (::setgroups(0, nullptr) != 0 || ::setgid(gid_) != 0 || ::setuid(uid_) != 0)) {
      _exit(126);
    }
    // The server dies with the test (an immediate shutdown), even when the test crashes;
    // set after setuid, which clears it.
    ::prctl(PR_SET_PDEATHSIG, SIGQUIT);
    if (::getppid() != parent) _exit(1);
    ::execv(args[0], args.data());
    _exit(127);
  }
  pid_ = pid;
  std::string ping =
      fmt::format("host=127.0.0.1 port={} dbname=postgres user=postgres connect_timeout=2", port_);
  auto deadline = std::chrono::steady_clock::now() + kStartWait;
  while (std::chrono::steady_clock::now() < deadline) {
    if (PQping(ping.c_str()) == PQPING_OK) {
      running_ = true;
      return Status::Ok();
    }
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = 0;
      return IoError(
          fmt::format("PostgreSQL on 127.0.0.1:{} exited at start: {}", port_, LogTail()));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EndServer(SIGQUIT);
  return IoError(fmt::format("PostgreSQL on 127.0.0.1:{} did not answer within {} s: {}", port_,
                             kStartWait.count(), LogTail()));
}

bool PgTestServer::EndServer(int signal) {
  if (pid_ == 0) return true;
  ::kill(pid_, signal);
  auto deadline = std::chrono::steady_clock::now() + kStopWait;
  int status = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    pid_t r = ::waitpid(pid_, &status, WNOHANG);
    if (r == pid_ || (r < 0 && errno == ECHILD)) {
      pid_ = 0;
      running_ = false;
      return true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ::kill(pid_, SIGKILL);
  ::waitpid(pid_, &status, 0);
  pid_ = 0;
  running_ = false;
  return false;
}

Status PgTestServer::Stop() {
  if (!running_) return Status::Ok();
  // Fast shutdown: sessions are cut, the data is written out.
  if (!EndServer(SIGINT)) {
    return IoError(fmt::format("PostgreSQL did not stop within {} s (killed): {}",
                               kStopWait.count(), LogTail()));
  }
  return Status::Ok();
}

Status PgTestServer::Restart() {
  if (running_) return Status::Ok();
  return StartServer();
}

PgTestServer::~PgTestServer() {
  EndServer(SIGQUIT);  // immediate: nothing of a test's data needs to survive
  if (!dir_.empty()) {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
}

std::string PgTestServer::LogTail() const {
  std::string out;
  for (const char* name : {"/server.log"}) {
    std::ifstream in(dir_ + name);
    std::stringstream text;
    text << in.rdbuf();
    std::string t = text.str();
    if (t.size() > 2000) t = t.substr(t.size() - 2000);
    out += fmt::format("[{}] {}", name + 1, t);
  }
  return out;
}

std::string PgTestServer::Url(const std::string& db) const {
  return fmt::format("postgresql://postgres@127.0.0.1:{}/{}", port_, db);
}

Result<std::string> PgTestServer::CreateDatabase(const std::string& prefix) {
  std::string name = fmt::format("{}_{}_{}", prefix, ::getpid(), ++databases_);
  OSR_RETURN_IF_ERROR(Sql("postgres", "CREATE DATABASE " + name));
  return Url(name);
}

Status PgTestServer::Sql(const std::string& db, const std::string& sql) {
  OSR_ASSIGN_OR_RETURN(auto conn, OpenPostgres(Url(db)));
  return conn->Script(sql);
}

Result<PgTestServer*> SharedPgTestServer() {
  static Result<std::unique_ptr<PgTestServer>> server = PgTestServer::Start();
  if (!server.ok()) return server.status();
  return server->get();
}

}  // namespace osr::vault
