// PgTestServer: a real PostgreSQL server for tests (no mock database). It runs initdb
// into a fresh directory under /tmp, then the server from Debian's postgresql package
// (/usr/lib/postgresql/15/bin, or OSR_PG_BIN) on a free port of 127.0.0.1 with its unix
// socket in that directory; as the `postgres` user when the test runs as root (the
// server refuses root). The server is this process's child: it gets SIGQUIT (immediate
// shutdown) when the thread that started it ends, so a crashed test leaves no server
// running. The destructor stops it and removes the directory.
//
// A test whose PostgreSQL binaries are missing fails (Start returns kNotFound saying
// what to install); it never skips.
//
// Thread model: not thread-safe; one test thread drives a server.
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>

#include "common/status.h"

namespace osr::vault {

class PgTestServer {
 public:
  // initdb and start: kNotFound when a binary is missing, kIoError when initdb or the
  // server fails (the message holds the end of its log).
  static Result<std::unique_ptr<PgTestServer>> Start();
  ~PgTestServer();
  PgTestServer(const PgTestServer&) = delete;
  PgTestServer& operator=(const PgTestServer&) = delete;

  // Stops the server (fast shutdown: connections are cut) and keeps its data; kIoError
  // when it had to be killed.
  Status Stop();
  // Starts it again on the same port, with the same data.
  Status Restart();
  bool running() const { return running_; }

  int port() const { return port_; }
  const std::string& dir() const { return dir_; }
  // postgresql://postgres@127.0.0.1:PORT/DB
  std::string Url(const std::string& db = "postgres") const;
  // A new, empty database (its name made unique in this server); its URL.
  Result<std::string> CreateDatabase(const std::string& prefix = "osr_test");
  // Runs `sql` (any number of statements) in database `db`, as the superuser.
  Status Sql(const std::string& db, const std::string& sql);

 private:
  PgTestServer() = default;
  Status StartServer();
  // Sends `signal` and waits for the server to exit (SIGKILL after kStopWait: false).
  bool EndServer(int signal);
  std::string LogTail() const;

  std::string bin_;
  std::string dir_;  // the temporary directory: data/, the socket, server.log
  int port_ = 0;
  bool running_ = false;
  pid_t pid_ = 0;  // the postmaster, our child
  uid_t uid_ = 0;  // whom the server runs as (postgres when the test runs as root)
  gid_t gid_ = 0;
  int databases_ = 0;
};

// One server shared by the tests of this process, started on first use and stopped at
// exit; tests take a database of their own from it (CreateDatabase). The error of the
// first start is returned again to every later caller.
Result<PgTestServer*> SharedPgTestServer();

}  // namespace osr::vault
