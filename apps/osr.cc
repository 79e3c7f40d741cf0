// osr: the command line of Open Site Recovery. It speaks only to the vault's REST API.
// Every command has --output json; --wait follows a job with a progress bar and exits
// non-zero if the job fails.
#include <fcntl.h>
#include <fmt/format.h>
#include <httplib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <tuple>

#include "common/https.h"
#include "common/json_in.h"
#include "common/units.h"

namespace {

using nlohmann::json;

struct Ctx {
  std::string vault = "http://127.0.0.1:7480";
  std::string output = "table";
  std::string token;  // the credential (see FindToken)
  std::string ca;     // the CA that signed an https:// vault's certificate
  bool json_out() const { return output == "json"; }
};

// The CLI's own file: the vault and token `osr login` saved ($OSR_CONFIG, else
// $XDG_CONFIG_HOME/osr/config.json, else ~/.config/osr/config.json), 0600.
std::string ConfigPath() {
  if (const char* p = std::getenv("OSR_CONFIG")) return p;
  if (const char* x = std::getenv("XDG_CONFIG_HOME"); x && *x) {
    return std::string(x) + "/osr/config.json";
  }
  const char* home = std::getenv("HOME");
  return std::string(home ? home : ".") + "/.config/osr/config.json";
}

nlohmann::json ReadConfig() {
  std::ifstream in(ConfigPath());
  if (!in) return json::object();
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto j = osr::json_in::ParseObject(text, ConfigPath(), 1 << 20);
  return j.ok() ? *j : json::object();
}

std::string ReadFirstLine(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  if (in) std::getline(in, line);
  while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
  return line;
}

bool LoopbackVault(const std::string& url) {
  std::string rest = url.substr(url.find("://") == std::string::npos ? 0 : url.find("://") + 3);
  rest = rest.substr(0, rest.find('/'));
  auto a = osr::ParseHostPort(rest, 7480);
  return a.ok() && osr::IsLoopbackHost(a->host);
}

// The token, from the first of: --token, $OSR_TOKEN, $OSR_TOKEN_FILE, the config file
// (when it names this vault), and for a vault on this machine the quickstart's
// admin.token in $OSR_DATA or ./osr-data.
std::string FindToken(const Ctx& c, const json& config) {
  if (!c.token.empty()) return c.token;
  if (const char* t = std::getenv("OSR_TOKEN"); t && *t) return t;
  if (const char* f = std::getenv("OSR_TOKEN_FILE"); f && *f) return ReadFirstLine(f);
  osr::json_in::Fields f(config);
  if (f.String("vault", "") == c.vault) {
    std::string t = f.String("token", "");
    if (!t.empty()) return t;
  }
  if (LoopbackVault(c.vault)) {
    const char* data = std::getenv("OSR_DATA");
    std::string t = ReadFirstLine(std::string(data && *data ? data : "osr-data") + "/admin.token");
    if (!t.empty()) return t;
  }
  return {};
}

std::string ErrorMessage(int status, const std::string& body) {
  auto j = osr::json_in::ParseObject(body, "the vault's answer", 16 << 20);
  std::string msg;
  if (j.ok()) {
    osr::json_in::Fields f(*j);
    if (const json* e = f.Object("error")) msg = osr::json_in::Fields(*e).String("message", "");
  }
  if (msg.empty()) msg = fmt::format("HTTP {}", status);
  if (status == 401) {
    msg += " — sign in: osr login (or --token, $OSR_TOKEN, $OSR_TOKEN_FILE)";
  }
  return msg;
}

struct Answer {
  int status = 0;  // 0: unreachable
  json body;
  std::string error;
};

Answer Call(const Ctx& c, const std::string& method, const std::string& path,
            const json& body = nullptr) {
  httplib::Client cli(c.vault);
  if (c.vault.rfind("https://", 0) == 0) {
    if (!c.ca.empty()) cli.set_ca_cert_path(c.ca.c_str());
    cli.enable_server_certificate_verification(true);
  }
  if (!c.token.empty()) cli.set_bearer_token_auth(c.token.c_str());
  cli.set_connection_timeout(3);
  cli.set_read_timeout(60);
  std::string url = "/api/v1" + path;
  std::string b = body.is_null() ? "" : body.dump();
  httplib::Result r = method == "GET"    ? cli.Get(url)
                      : method == "POST" ? cli.Post(url, b, "application/json")
                      : method == "PUT"  ? cli.Put(url, b, "application/json")
                                         : cli.Delete(url);
  Answer a;
  if (!r) {
    a.error = fmt::format("the vault at {} is unreachable ({}); is it running? (make run)", c.vault,
                          httplib::to_string(r.error()));
    return a;
  }
  a.status = r->status;
  if (r->status >= 300) {
    a.error = ErrorMessage(r->status, r->body);
    return a;
  }
  auto j = osr::json_in::Parse(r->body, "the vault's answer", 256 << 20);
  if (!j.ok()) {
    a.error = j.status().message();
  } else {
    a.body = std::move(*j);
  }
  return a;
}

int Fail(const std::string& message) {
  std::fprintf(stderr, "osr: error: %s\n", message.c_str());
  return 1;
}

std::string Str(const json& v) {
  if (v.is_null()) return "-";
  if (v.is_string()) return v.get<std::string>();
  return v.dump();
}

void Table(const json& rows, const std::vector<std::pair<std::string, std::string>>& cols) {
  std::vector<size_t> width;
  for (auto& [key, title] : cols) width.push_back(title.size());
  std::vector<std::vector<std::string>> cells;
  for (auto& r : rows) {
    std::vector<std::string> line;
    for (size_t i = 0; i < cols.size(); ++i) {
      json v = r;
      for (size_t at = 0, next; at != std::string::npos; at = next) {  // "a.b" paths
        next = cols[i].first.find('.', at);
        std::string k = cols[i].first.substr(at, next == std::string::npos ? next : next - at);
        v = v.is_object() && v.contains(k) ? v[k] : json();
        if (next != std::string::npos) ++next;
      }
      line.push_back(Str(v));
      width[i] = std::max(width[i], line.back().size());
    }
    cells.push_back(line);
  }
  for (size_t i = 0; i < cols.size(); ++i)
    std::printf("%-*s  ", static_cast<int>(width[i]), cols[i].second.c_str());
  std::printf("\n");
  for (auto& line : cells) {
    for (size_t i = 0; i < line.size(); ++i)
      std::printf("%-*s  ", static_cast<int>(width[i]), line[i].c_str());
    std::printf("\n");
  }
}

void Show(const json& obj) {
  for (auto& [k, v] : obj.items()) {
    if (v.is_array() || v.is_object()) {
      std::printf("%-14s %s\n", (k + ":").c_str(), v.dump().c_str());
    } else {
      std::printf("%-14s %s\n", (k + ":").c_str(), Str(v).c_str());
    }
  }
}

// A plan (--dry-run): the checks at the site, then what would be created, used, deleted.
void ShowPlan(const json& body) {
  const json& plan = body.contains("plan") ? body["plan"] : body;
  std::printf("%s %s at site %s: %s\n", Str(plan.value("action", json())).c_str(),
              Str(plan.value("vm", json())).c_str(), Str(plan.value("site", json())).c_str(),
              plan.value("ok", false) ? "the checks pass" : "REFUSED: a check failed");
  std::printf("\nchecks:\n");
  for (auto& ch : plan.value("checks", json::array())) {
    std::string result = Str(ch.value("result", json()));
    std::printf("  %-8s %-11s %s\n", result == "passed" ? "ok" : result.c_str(),
                Str(ch.value("name", json())).c_str(), Str(ch.value("message", json())).c_str());
  }
  for (const char* part : {"creates", "uses", "deletes"}) {
    const json list = plan.value(part, json::array());
    std::printf("\n%s:%s\n", part, list.empty() ? " nothing" : "");
    for (auto& item : list) std::printf("  %s\n", Str(item).c_str());
  }
}

// Prints the answer (json or table); returns the exit status.
int Print(const Ctx& c, const Answer& a, const std::function<void(const json&)>& table) {
  if (!a.error.empty()) return Fail(a.error);
  if (c.json_out()) {
    std::cout << a.body.dump(2) << "\n";
  } else {
    table(a.body);
  }
  return 0;
}

// Prints a VM's console (osr vm console): its last `bytes`, then, with `follow`, what comes:
// at once while full reads come back, else once a second (until Ctrl-C or an error). When
// the site moved the log aside (its `cuts` changed, or it answered from 0), or the VM runs
// at another site now, it says so on stderr and goes on from the new log's start.
int Console(const Ctx& c, const std::string& vm, bool drill, bool follow, int64_t bytes) {
  constexpr uint64_t kChunk = 65536;  // the most one read returns
  std::string base = "/vms/" + vm + "/console?which=" + (drill ? "drill" : "vm");
  Answer a = Call(c, "GET", fmt::format("{}&bytes={}", base, bytes));
  if (!a.error.empty()) return Fail(a.error);
  if (c.json_out() && !follow) {
    std::cout << a.body.dump(2) << "\n";
    return 0;
  }
  std::string text = a.body.value("text", "");
  std::fputs(text.c_str(), stdout);
  std::fflush(stdout);
  // Whether the console text printed so far ends a line. A line cut short (a read ends
  // within a line, and the rest went with a cut) is ended on stdout before the notice: the
  // next line of the new log starts a line of its own, and the notice (on stderr, often the
  // same terminal) too.
  bool line_start = text.empty() || text.back() == '\n';
  auto notice = [&](const std::string& words) {
    if (!line_start) {
      std::fputc('\n', stdout);
      std::fflush(stdout);
      line_start = true;
    }
    std::fprintf(stderr, "[osr: %s]\n", words.c_str());
  };
  uint64_t next = a.body.value("next", uint64_t{0});
  uint64_t cuts = a.body.value("cuts", uint64_t{0});
  std::string site = a.body.value("site", "");
  bool full = false;
  while (follow) {
    if (!full) std::this_thread::sleep_for(std::chrono::seconds(1));
    a = Call(c, "GET", fmt::format("{}&offset={}&bytes={}", base, next, kChunk));
    if (!a.error.empty()) return Fail(a.error);
    const uint64_t now_cuts = a.body.value("cuts", uint64_t{0});
    const std::string now_site = a.body.value("site", "");
    const uint64_t from = a.body.value("offset", next);
    if (now_site != site) {
      notice(
          fmt::format("{} runs at site {} now: its console there, from the start", vm, now_site));
    } else if (now_cuts > cuts) {
      const uint64_t cut_size = a.body.value("cut_size", uint64_t{0});
      if (now_cuts == cuts + 1 && cut_size >= next) {
        notice(
            fmt::format("the site moved the console log aside (console.log.1 there); {} "
                        "byte(s) written before that are not shown",
                        cut_size - next));
      } else {
        notice(
            fmt::format("the site moved the console log aside {} times since the last read; "
                        "what was written before the last time is not shown",
                        now_cuts - cuts));
      }
    } else if (from < next) {
      notice("the console log started again at the site (the VM restarted, or the site did)");
    }
    if (now_site != site || now_cuts > cuts) {
      // What came back was read at an offset of the old log: read the new one from 0.
      site = now_site;
      cuts = now_cuts;
      next = 0;
      full = true;
      continue;
    }
    cuts = now_cuts;  // fewer: the site's daemon restarted (its count starts again)
    text = a.body.value("text", "");
    std::fputs(text.c_str(), stdout);
    std::fflush(stdout);
    if (!text.empty()) line_start = text.back() == '\n';
    next = a.body.value("next", next);
    full = next - from >= kChunk;
  }
  return 0;
}

// Follows a job until it ends; a progress bar on stderr when it is a terminal.
int Wait(const Ctx& c, int64_t id, const std::function<void(const json&)>& done_table) {
  bool tty = isatty(STDERR_FILENO);
  for (int i = 0;; ++i) {
    Answer a = Call(c, "GET", fmt::format("/jobs/{}", id));
    if (!a.error.empty()) return Fail(a.error);
    const json& j = a.body;
    std::string state = j.value("state", "");
    int progress = j.value("progress", 0);
    std::string step = j["steps"].empty() ? "" : j["steps"].back().value("name", "");
    if (tty) {
      int filled = progress / 5;
      std::fprintf(stderr, "\r[%s%s] %3d%% %-50.50s", std::string(filled, '#').c_str(),
                   std::string(20 - filled, ' ').c_str(), progress, step.c_str());
    } else if (i % 50 == 0) {
      std::fprintf(stderr, "job %lld: %s %d%% %s\n", static_cast<long long>(id), state.c_str(),
                   progress, step.c_str());
    }
    if (state == "Succeeded" || state == "Failed" || state == "Cancelled") {
      if (tty) std::fprintf(stderr, "\n");
      if (c.json_out()) {
        std::cout << j.dump(2) << "\n";
      } else {
        done_table(j);
      }
      if (state == "Failed") return Fail(fmt::format("job {} failed: {}", id, Str(j["error"])));
      if (state == "Cancelled") {
        return Fail(fmt::format("job {} was cancelled: {}", id, Str(j["error"])));
      }
      return 0;
    }
    // Quick jobs (a failover is O(1)) end within the first polls.
    std::this_thread::sleep_for(std::chrono::milliseconds(i < 40 ? 25 : 200));
  }
}

// Writes the CLI's config file: private (0600 in a 0700 folder), replaced atomically.
int WriteConfig(const json& config) {
  std::string path = ConfigPath();
  std::error_code ec;
  auto dir = std::filesystem::path(path).parent_path();
  if (!dir.empty()) {
    std::filesystem::create_directories(dir, ec);
    ::chmod(dir.c_str(), 0700);
  }
  std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return Fail(fmt::format("cannot write {}: {}", tmp, std::strerror(errno)));
  std::string text = config.dump(2) + "\n";
  bool ok = ::fchmod(fd, 0600) == 0 &&
            ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  ::close(fd);
  if (!ok || ::rename(tmp.c_str(), path.c_str()) != 0) {
    return Fail(fmt::format("cannot write {}: {}", path, std::strerror(errno)));
  }
  return 0;
}

int Login(Ctx& c, std::string token) {
  if (token.empty()) {
    if (isatty(STDIN_FILENO)) std::fprintf(stderr, "token: ");
    std::getline(std::cin, token);
  }
  while (!token.empty() && (token.back() == '\n' || token.back() == '\r' || token.back() == ' ')) {
    token.pop_back();
  }
  if (token.empty()) return Fail("no token given (osr login --with-token TOKEN, or on stdin)");
  c.token = token;
  Answer a = Call(c, "GET", "/whoami");
  if (!a.error.empty()) return Fail(a.error);
  json config = ReadConfig();
  config["vault"] = c.vault;
  config["token"] = token;
  if (!c.ca.empty()) config["ca"] = c.ca;
  if (int rc = WriteConfig(config); rc != 0) return rc;
  osr::json_in::Fields f(a.body);
  std::printf("signed in to %s as %s (%s); token kept in %s\n", c.vault.c_str(),
              f.String("name", "?").c_str(), f.String("role", "?").c_str(), ConfigPath().c_str());
  return 0;
}

int Logout(const Ctx&) {
  json config = ReadConfig();
  if (!config.contains("token")) {
    std::printf("no token kept in %s\n", ConfigPath().c_str());
    return 0;
  }
  config.erase("token");
  if (int rc = WriteConfig(config); rc != 0) return rc;
  std::printf("token removed from %s\n", ConfigPath().c_str());
  return 0;
}

osr::Result<int64_t> ParseDuration(const std::string& s) {
  if (s.empty()) return osr::InvalidArgument("empty duration");
  char unit = s.back();
  int64_t mult = unit == 's' ? 1 : unit == 'm' ? 60 : unit == 'h' ? 3600 : unit == 'd' ? 86400 : 0;
  std::string num = mult ? s.substr(0, s.size() - 1) : s;
  if (!mult) mult = 1;
  try {
    size_t used = 0;
    long long v = std::stoll(num, &used);
    if (used != num.size() || v <= 0 || v > INT64_MAX / mult / 1000000000) {
      throw std::invalid_argument(s);
    }
    return v * mult;
  } catch (...) {
    return osr::InvalidArgument("'" + s + "' is not a duration (examples: 5s, 30m, 24h, 7d)");
  }
}

}  // namespace

int main(int argc, char** argv) {
  Ctx c;
  if (const char* v = std::getenv("OSR_VAULT")) c.vault = v;
  CLI::App app{"osr: Open Site Recovery"};
  app.require_subcommand(1);
  // --output, --vault, --token and --ca also after the subcommand (osr item show vm1
  // --output json).
  app.fallthrough();
  auto* vault_opt =
      app.add_option("--vault", c.vault,
                     "vault URL (default $OSR_VAULT, osr login's vault, or http://127.0.0.1:7480)");
  app.add_option("--output", c.output, "table or json")->check(CLI::IsMember({"table", "json"}));
  app.add_option("--token", c.token,
                 "API token (default: $OSR_TOKEN, $OSR_TOKEN_FILE, osr login's config, or a "
                 "local quickstart's osr-data/admin.token)");
  app.add_option("--ca", c.ca, "CA certificate of an https:// vault (default $OSR_CA)");

  auto* login = app.add_subcommand(
      "login", "check a token and keep it (with --vault) in the CLI's config file (0600)");
  std::string login_token;
  login->add_option("--with-token", login_token,
                    "the token (default: read from standard input, so it stays out of shell "
                    "history)");
  auto* logout = app.add_subcommand("logout", "forget the token kept by osr login");
  auto* whoami = app.add_subcommand("whoami", "who the vault takes you for, and your role");
  auto* vaults = app.add_subcommand(
      "vault",
      "the vault processes on this catalog: which one leads (holds the lease), since when");

  auto* token = app.add_subcommand("token", "API tokens (admin)");
  token->require_subcommand(1);
  std::string tname, trole = "reader", texpires = "90d";
  int64_t tid = 0;
  auto* tcreate = token->add_subcommand("create", "make a token; it is shown once");
  tcreate->add_option("name", tname, "who or what holds it")->required();
  tcreate->add_option("--role", trole, "reader, operator or admin (default reader)")
      ->check(CLI::IsMember({"reader", "operator", "admin"}));
  tcreate->add_option("--expires", texpires, "lifetime, e.g. 12h, 30d (default 90d)");
  auto* tlist = token->add_subcommand("list", "tokens (never their secrets)");
  auto* trevoke = token->add_subcommand("revoke", "revoke a token and end its sessions");
  trevoke->add_option("id", tid)->required();

  auto* audit = app.add_subcommand("audit", "the audit log: who changed what, when (admin)");
  int64_t alimit = 50;
  std::string asince;
  audit->add_option("--limit", alimit, "the newest N entries (default 50)");
  audit->add_option("--since", asince, "only the last DURATION, e.g. 1h");

  auto* site = app.add_subcommand("site", "sites");
  site->require_subcommand(1);
  auto* site_list = site->add_subcommand("list", "sites, and whether they answer");
  std::string sname, sapi, srepl;
  auto* site_add = site->add_subcommand("add", "register a site (osrd site) with the vault");
  site_add->add_option("name", sname)->required();
  site_add->add_option("--api", sapi, "its API, https://HOST:PORT/api/v1")->required();
  site_add->add_option("--replication", srepl, "its replication listener, HOST:PORT")->required();
  bool sreplace = false;
  site_add->add_flag("--replace", sreplace,
                     "move a registered site that VMs use to this address (audited)");

  auto* policy = app.add_subcommand("policy", "replication policies");
  policy->require_subcommand(1);
  std::string pname, retention = "24h", crash = "5s", appi = "1h", compression = "lz4",
                     bandwidth = "0";
  auto* pcreate = policy->add_subcommand("create", "create a policy");
  pcreate->add_option("name", pname)->required();
  pcreate->add_option("--retention", retention, "how long points are kept (24h)");
  pcreate->add_option("--crash-interval", crash, "crash-consistent point every (5s)");
  pcreate->add_option("--app-interval", appi, "app-consistent point every (1h)");
  pcreate->add_option("--compression", compression, "lz4 or none (lz4)")
      ->check(CLI::IsMember({"lz4", "none"}));
  pcreate->add_option("--bandwidth", bandwidth,
                      "bytes per second on the wire, e.g. 100M (0: no limit)");
  auto* plist = policy->add_subcommand("list", "list policies");

  auto* vm = app.add_subcommand("vm", "virtual machines");
  vm->require_subcommand(1);
  std::string vname, vsite;
  std::vector<std::string> vdisks;
  auto* vcreate = vm->add_subcommand("create", "create a VM's disks at a site");
  vcreate->add_option("name", vname)->required();
  vcreate->add_option("--site", vsite)->required();
  vcreate->add_option("--disk", vdisks, "NAME:SIZE, e.g. os:10G (repeat for more)")->required();
  std::string vdriver = "none", vcommand, vcommand_name, vqemu_args, vqemu_args_name,
              vmemory = "512M";
  int vcpus = 1, vstop_timeout = 30;
  std::vector<std::string> vhooks, vhook_commands;
  vcreate->add_option("--driver", vdriver, "how the VM runs: qemu, process or none")
      ->check(CLI::IsMember({"qemu", "process", "none"}));
  vcreate->add_option("--command-name", vcommand_name,
                      "process driver: an entry of the site's commands file (its disks' NBD "
                      "URIs are in $OSR_DISKS and $OSR_DISK_<NAME>)");
  vcreate->add_option("--command", vcommand,
                      "process driver: a command string (only sites with allow_api_commands, "
                      "e.g. the quickstart)");
  vcreate->add_option("--qemu-args-name", vqemu_args_name,
                      "qemu driver: an entry of the site's commands file ([qemu_args.NAME])");
  vcreate->add_option("--qemu-args", vqemu_args,
                      "qemu driver: more qemu-system arguments as a string (only sites with "
                      "allow_api_commands; only the options docs/api.md lists)");
  vcreate->add_option("--memory", vmemory, "qemu driver: memory (default 512M)");
  vcreate->add_option("--cpus", vcpus, "qemu driver: CPUs (default 1)");
  std::vector<std::string> vnics;
  std::string vboot_line;
  int vboot_timeout = 0;
  bool vno_agent = false;
  vcreate->add_option("--nic", vnics,
                      "qemu driver: MAC,NETWORK[,MODEL]: a NIC on a logical network each site "
                      "maps in its config ([networks.NETWORK]); repeat");
  vcreate->add_option("--boot-check-line", vboot_line,
                      "qemu driver: a drill's VM is Healthy once this text is on its console "
                      "(default: once the guest agent answers)");
  vcreate
      ->add_option("--boot-check-timeout", vboot_timeout,
                   "qemu driver: seconds the boot check waits (default 300)")
      ->check(CLI::Range(1, 3600));
  vcreate->add_flag("--no-guest-agent", vno_agent,
                    "qemu driver: no guest agent channel (app-consistent points then use hooks)");
  vcreate->add_option("--shutdown-timeout", vstop_timeout,
                      "seconds a shutdown may take before a hard stop (default 30)");
  int vhook_timeout = 60;
  vcreate->add_option("--hook-timeout", vhook_timeout,
                      "seconds a hook may run before it is killed (default 60)");
  vcreate->add_option("--hook", vhooks,
                      "HOOK=ENTRY: freeze, thaw, pre_failover or post_failover runs ENTRY of "
                      "the vault's hooks file (repeat)");
  vcreate->add_option("--hook-command", vhook_commands,
                      "HOOK=COMMAND: the hook runs a command string (only a vault started with "
                      "--allow-api-hooks, e.g. the quickstart; repeat)");
  auto* vlist = vm->add_subcommand("list", "list VMs");
  auto* vshow = vm->add_subcommand("show", "a VM: disks, where it runs, running, epoch");
  vshow->add_option("name", vname)->required();
  auto* vstart = vm->add_subcommand("start", "start the VM where it runs now");
  vstart->add_option("name", vname)->required();
  bool vconsole_drill = false, vconsole_follow = false;
  int64_t vconsole_bytes = 16384;
  auto* vconsole = vm->add_subcommand(
      "console", "the VM's serial console: where it runs now, or its drill VM (--drill)");
  vconsole->add_option("name", vname)->required();
  vconsole->add_flag("--drill", vconsole_drill, "the console of its drill VM");
  vconsole->add_flag("-f,--follow", vconsole_follow, "keep printing what comes (Ctrl-C ends)");
  vconsole->add_option("--bytes", vconsole_bytes, "how much of its end to show first")
      ->check(CLI::Range(1, 65536));
  auto* vstop = vm->add_subcommand("stop", "shut the VM down (hard stop after the timeout)");
  vstop->add_option("name", vname)->required();
  vstop->add_option("--timeout", vstop_timeout, "seconds (default 30)");
  auto* vdisk = vm->add_subcommand("disk", "add or grow a disk of a VM, protected or not");
  vdisk->require_subcommand(1);
  std::string vdisk_spec, vdisk_name, vdisk_size;
  auto* vdisk_add = vdisk->add_subcommand(
      "add",
      "add an empty disk (protected: replicated from now on; a running VM sees it "
      "after a restart)");
  vdisk_add->add_option("name", vname)->required();
  vdisk_add->add_option("disk", vdisk_spec, "NAME:SIZE, e.g. data:10G")->required();
  auto* vdisk_resize = vdisk->add_subcommand(
      "resize",
      "grow a disk (recovery points before it keep the old size; a running VM sees "
      "it after a restart)");
  vdisk_resize->add_option("name", vname)->required();
  vdisk_resize->add_option("disk", vdisk_name, "the disk's name")->required();
  vdisk_resize->add_option("size", vdisk_size, "its new size, larger than now, e.g. 20G")
      ->required();
  std::string vrepair_site;
  bool vrepair_trim = false, vrepair_reset = false, vrepair_accept = false;
  auto* vrepair = vm->add_subcommand(
      "repair", "open a VM's quarantined disks or store again (see the item's health)");
  vrepair->add_option("name", vname)->required();
  vrepair->add_option("--site", vrepair_site, "only at this site (default: every site)");
  vrepair->add_flag("--trim-image", vrepair_trim,
                    "cut an image that grew outside osr back to the disk's size, if what it "
                    "gained is zeros");
  vrepair->add_flag("--reset-history", vrepair_reset,
                    "set an unreadable capture history aside and resend the disks whole");
  vrepair->add_flag("--accept-changes", vrepair_accept,
                    "take images changed outside osr as they are and resend them whole");

  std::string target, ppolicy = "default", spec, notes;
  bool wait = false, appflag = false;
  auto* protect = app.add_subcommand("protect", "replicate a VM to a recovery site");
  protect->add_option("name", vname)->required();
  protect->add_option("--target", target)->required();
  protect->add_option("--policy", ppolicy);
  protect->add_flag("--wait", wait, "follow the job");
  bool dry_run = false;
  protect->add_flag("--dry-run", dry_run, "show the checks and the plan; change nothing");
  auto* unprotect = app.add_subcommand("unprotect", "stop protecting a VM (deletes its points)");
  unprotect->add_option("name", vname)->required();

  auto* item = app.add_subcommand("item", "replicated items");
  item->require_subcommand(1);
  auto* ilist = item->add_subcommand("list", "all replicated items");
  auto* ishow = item->add_subcommand("show", "one item: state, health, RPO, latest point");
  ishow->add_option("name", vname)->required();

  auto* point = app.add_subcommand("point", "recovery points");
  point->require_subcommand(1);
  auto* ptlist = point->add_subcommand("list", "an item's recovery points");
  ptlist->add_option("name", vname)->required();
  auto* ptcreate = point->add_subcommand("create", "make a recovery point now");
  ptcreate->add_option("name", vname)->required();
  ptcreate->add_flag("--app", appflag,
                     "app-consistent: quiesced by the guest agent (qemu) or the VM's freeze/thaw "
                     "hooks");
  auto* ptclock = point->add_subcommand(
      "clock", "the vault's clock: whether a step of it holds the pruning of points");
  auto* ptconfirm = point->add_subcommand(
      "confirm-clock",
      "the vault's wall clock is right now: pruning held by a clock step resumes on it");

  auto* tf = app.add_subcommand(
      "test-failover", "a DR drill: the VM's disks at a point, writable, beside replication");
  tf->add_option("name", vname)->required();
  tf->add_option("--point", spec, "latest | latest-processed | latest-app | ID | RFC 3339 time")
      ->required();
  tf->add_flag("--wait", wait, "follow the job");
  bool tf_no_start = false;
  tf->add_flag("--no-start", tf_no_start,
               "open the drill disks only: no VM boots (by default it boots on the drill networks, "
               "with a boot check)");
  tf->add_flag("--dry-run", dry_run, "show the checks and the plan; change nothing");
  auto* tfc =
      app.add_subcommand("test-failover-cleanup", "end a drill: its disks and writes are deleted");
  tfc->add_option("name", vname)->required();
  tfc->add_option("--notes", notes);
  tfc->add_flag("--wait", wait, "follow the job");

  bool shutdown_source = false, planned = false, no_start = false, compare = false;
  auto* fo = app.add_subcommand("failover", "run the VM at its recovery site, on a point");
  fo->add_option("name", vname)->required();
  fo->add_option("--point", spec, "latest | latest-processed | latest-app | ID | RFC 3339 time")
      ->default_val("latest");
  fo->add_flag("--shutdown-source", shutdown_source,
               "try to shut the source VM down first (the failover goes on if that fails)");
  fo->add_flag("--planned", planned,
               "shut down, send everything, fail over to the last write: no data loss (needs "
               "the source site)");
  fo->add_flag("--no-start", no_start, "open the disks but do not start the VM");
  fo->add_flag("--wait", wait, "follow the job");
  fo->add_flag("--dry-run", dry_run, "show the checks and the plan; change nothing");
  auto* cp = app.add_subcommand("change-point",
                                "after failover, before commit: restart the VM on another point "
                                "(its writes since failover are discarded)");
  cp->add_option("name", vname)->required();
  cp->add_option("--point", spec, "latest-processed | latest-app | ID | RFC 3339 time")->required();
  cp->add_flag("--wait", wait, "follow the job");
  auto* commit = app.add_subcommand(
      "commit", "keep the failover: the disks become plain disks there; the points are deleted");
  commit->add_option("name", vname)->required();
  commit->add_flag("--wait", wait, "follow the job");
  auto* reprotect = app.add_subcommand(
      "reprotect", "after commit: replicate back to the old primary, only what differs");
  reprotect->add_option("name", vname)->required();
  reprotect->add_flag("--compare", compare,
                      "compare block hashes instead of trusting the old primary's history");
  reprotect->add_flag("--wait", wait, "follow the job");
  reprotect->add_flag("--dry-run", dry_run, "show the checks and the plan; change nothing");

  auto* job = app.add_subcommand("job", "jobs");
  job->require_subcommand(1);
  std::string jvm, jstate;
  int64_t jid = 0;
  auto* jlist = job->add_subcommand("list", "jobs, newest last");
  jlist->add_option("--vm", jvm);
  jlist->add_option("--state", jstate, "Queued | Running | Succeeded | Failed | Cancelled");
  auto* jshow = job->add_subcommand("show", "one job with its steps");
  jshow->add_option("id", jid)->required();
  auto* jwait = job->add_subcommand("wait", "follow a job until it ends");
  jwait->add_option("id", jid)->required();
  auto* jcancel = job->add_subcommand(
      "cancel", "stop a job at its next wait; its last step says what it leaves behind");
  jcancel->add_option("id", jid)->required();

  CLI11_PARSE(app, argc, argv);
  json config = ReadConfig();
  osr::json_in::Fields saved(config);
  if (vault_opt->count() == 0 && std::getenv("OSR_VAULT") == nullptr) {
    c.vault = saved.String("vault", c.vault);
  }
  if (c.ca.empty()) {
    const char* ca = std::getenv("OSR_CA");
    c.ca = ca ? ca : saved.String("vault", "") == c.vault ? saved.String("ca", "") : "";
  }
  if (!login->parsed()) c.token = FindToken(c, config);

  auto job_table = [](const json& j) {
    std::printf("job %s: %s %s (%s%%)\n", Str(j["id"]).c_str(), Str(j["type"]).c_str(),
                Str(j["state"]).c_str(), Str(j["progress"]).c_str());
    for (auto& s : j.value("steps", json::array())) {
      std::printf("  [%s] %s%s\n", Str(s["state"]).c_str(), Str(s["name"]).c_str(),
                  s.value("message", "").empty() ? "" : (" — " + s.value("message", "")).c_str());
    }
    if (!j["error"].is_null()) std::printf("  error: %s\n", Str(j["error"]).c_str());
    if (j.contains("disks")) {
      for (auto& d : j["disks"])
        std::printf("  disk %s: %s\n", Str(d["name"]).c_str(), Str(d["uri"]).c_str());
    }
  };
  auto submitted = [&](const Answer& a) {
    if (!a.error.empty()) return Fail(a.error);
    int64_t id = a.body.value("id", int64_t{0});
    if (wait) return Wait(c, id, job_table);
    return Print(c, a, [&](const json& j) {
      std::printf("job %lld started (osr job wait %lld)\n", static_cast<long long>(id),
                  static_cast<long long>(id));
      (void)j;
    });
  };

  if (site_list->parsed()) {
    return Print(c, Call(c, "GET", "/sites"), [](const json& b) {
      Table(b, {{"name", "NAME"},
                {"reachable", "REACHABLE"},
                {"nbd", "NBD"},
                {"vms", "VMS"},
                {"stores", "STORES"},
                {"error", "ERROR"}});
    });
  }
  if (site_add->parsed()) {
    return Print(
        c,
        Call(c, "POST", "/sites",
             json{{"name", sname}, {"api", sapi}, {"replication", srepl}, {"replace", sreplace}}),
        Show);
  }
  if (login->parsed()) return Login(c, login_token);
  if (logout->parsed()) return Logout(c);
  if (whoami->parsed()) return Print(c, Call(c, "GET", "/whoami"), Show);
  if (vaults->parsed()) {
    return Print(c, Call(c, "GET", "/vault"), [](const json& b) {
      static const json kNone;
      auto field = [&](const char* k) -> const json& {
        return b.is_object() && b.contains(k) ? b.at(k) : kNone;
      };
      const json& instances = field("instances");
      Table(instances.is_array() ? instances : json::array(), {{"id", "INSTANCE"},
                                                               {"host", "HOST"},
                                                               {"api", "API"},
                                                               {"leader", "LEADS"},
                                                               {"alive", "ALIVE"},
                                                               {"renewed", "RENEWED"}});
      const json& leader = field("leader");
      std::printf("\nleader:        %s\n", leader.is_object()
                                               ? leader.dump().c_str()
                                               : "none now (no vault holds the lease)");
      std::printf("answered by:   %s\n", field("this").dump().c_str());
    });
  }
  if (tcreate->parsed()) {
    auto ttl = ParseDuration(texpires);
    if (!ttl.ok()) return Fail("--expires: " + ttl.status().message());
    Answer a = Call(c, "POST", "/tokens",
                    json{{"name", tname}, {"role", trole}, {"expires_in_seconds", *ttl}});
    return Print(c, a, [](const json& b) {
      Show(b);
      std::fprintf(stderr, "Keep the token now: the vault shows it only this once.\n");
    });
  }
  if (tlist->parsed()) {
    return Print(c, Call(c, "GET", "/tokens"), [](const json& b) {
      Table(b, {{"id", "ID"},
                {"name", "NAME"},
                {"role", "ROLE"},
                {"expires", "EXPIRES"},
                {"revoked", "REVOKED"},
                {"last_used", "LAST USED"}});
    });
  }
  if (trevoke->parsed()) return Print(c, Call(c, "DELETE", fmt::format("/tokens/{}", tid)), Show);
  if (audit->parsed()) {
    std::string q = fmt::format("/audit?limit={}", alimit);
    if (!asince.empty()) {
      auto s = ParseDuration(asince);
      if (!s.ok()) return Fail("--since: " + s.status().message());
      q += fmt::format("&seconds={}", *s);
    }
    return Print(c, Call(c, "GET", q), [](const json& b) {
      Table(b, {{"time", "TIME"},
                {"principal", "WHO"},
                {"method", "METHOD"},
                {"path", "PATH"},
                {"status", "STATUS"},
                {"message", "MESSAGE"}});
    });
  }
  if (pcreate->parsed()) {
    auto r = ParseDuration(retention);
    auto ci = ParseDuration(crash);
    auto ai = ParseDuration(appi);
    if (!r.ok()) return Fail(r.status().message());
    if (!ci.ok()) return Fail(ci.status().message());
    if (!ai.ok()) return Fail(ai.status().message());
    auto bw = osr::ParseSize(bandwidth);
    if (!bw.ok()) return Fail(bw.status().message());
    return Print(c,
                 Call(c, "POST", "/policies",
                      json{{"name", pname},
                           {"retention_seconds", *r},
                           {"crash_interval_seconds", *ci},
                           {"app_interval_seconds", *ai},
                           {"compression", compression},
                           {"bandwidth_bytes_per_second", *bw}}),
                 Show);
  }
  if (plist->parsed()) {
    return Print(c, Call(c, "GET", "/policies"), [](const json& b) {
      Table(b, {{"name", "NAME"},
                {"retention_seconds", "RETENTION_S"},
                {"crash_interval_seconds", "CRASH_S"},
                {"app_interval_seconds", "APP_S"},
                {"compression", "COMPRESSION"},
                {"bandwidth_bytes_per_second", "BANDWIDTH_B/S"}});
    });
  }
  if (vcreate->parsed()) {
    json disks = json::array();
    for (auto& d : vdisks) {
      auto colon = d.find(':');
      if (colon == std::string::npos) return Fail("--disk takes NAME:SIZE, e.g. os:10G");
      auto size = osr::ParseSize(d.substr(colon + 1));
      if (!size.ok()) return Fail(size.status().message());
      disks.push_back({{"name", d.substr(0, colon)}, {"size_bytes", *size}});
    }
    json vspec = {{"driver", vdriver},
                  {"shutdown_timeout_ms", vstop_timeout * 1000},
                  {"hook_timeout_ms", vhook_timeout * 1000}};
    // Sent as given: the vault checks the spec (and names the field it refuses).
    if (!vcommand.empty()) vspec["command"] = vcommand;
    if (!vcommand_name.empty()) vspec["command_name"] = vcommand_name;
    if (!vqemu_args.empty()) vspec["qemu_args"] = vqemu_args;
    if (!vqemu_args_name.empty()) vspec["qemu_args_name"] = vqemu_args_name;
    if (vdriver == "qemu") {
      auto mem = osr::ParseSize(vmemory);
      if (!mem.ok()) return Fail(mem.status().message());
      vspec["memory_bytes"] = *mem;
      vspec["cpus"] = vcpus;
      if (vno_agent) vspec["guest_agent"] = false;
      for (auto& n : vnics) {
        auto c1 = n.find(',');
        if (c1 == std::string::npos) return Fail("--nic takes MAC,NETWORK[,MODEL]");
        auto c2 = n.find(',', c1 + 1);
        json nic = {{"mac", n.substr(0, c1)},
                    {"network", n.substr(c1 + 1, c2 == std::string::npos ? c2 : c2 - c1 - 1)}};
        if (c2 != std::string::npos) nic["model"] = n.substr(c2 + 1);
        vspec["nics"].push_back(nic);
      }
      if (!vboot_line.empty()) vspec["boot_check"]["console_line"] = vboot_line;
      if (vboot_timeout > 0) vspec["boot_check"]["timeout_ms"] = vboot_timeout * 1000;
    }
    for (auto [list, key, form] :
         {std::tuple{&vhooks, "name", "--hook takes HOOK=ENTRY"},
          std::tuple{&vhook_commands, "command", "--hook-command takes HOOK=COMMAND"}}) {
      for (auto& h : *list) {
        auto eq = h.find('=');
        if (eq == std::string::npos) return Fail(form);
        vspec["hooks"][h.substr(0, eq)] = json{{key, h.substr(eq + 1)}};
      }
    }
    return Print(c,
                 Call(c, "POST", "/vms",
                      json{{"name", vname}, {"site", vsite}, {"disks", disks}, {"spec", vspec}}),
                 [](const json& b) {
                   Show(json{{"name", b["name"]}, {"site", b["site"]}});
                   Table(b["disks"], {{"name", "DISK"}, {"size_bytes", "BYTES"}, {"uri", "URI"}});
                 });
  }
  if (vlist->parsed()) {
    return Print(c, Call(c, "GET", "/vms"), [](const json& b) {
      Table(b, {{"name", "NAME"},
                {"site", "RUNS AT"},
                {"driver", "DRIVER"},
                {"running", "RUNNING"},
                {"state", "STATE"},
                {"epoch", "EPOCH"}});
    });
  }
  auto vm_table = [](const json& b) {
    Show(json{{"name", b["name"]},
              {"runs at", b["site"]},
              {"driver", b.value("driver", json())},
              {"running", b.value("running", json())},
              {"state", b.value("state", json())},
              {"epoch", b.value("epoch", json())}});
    if (b.contains("site_error")) Show(json{{"site error", b["site_error"]}});
    Table(b["disks"], {{"name", "DISK"}, {"size_bytes", "BYTES"}, {"uri", "URI"}});
  };
  if (vshow->parsed()) return Print(c, Call(c, "GET", "/vms/" + vname), vm_table);
  if (vstart->parsed()) return Print(c, Call(c, "POST", "/vms/" + vname + "/start"), vm_table);
  if (vdisk_add->parsed() || vdisk_resize->parsed()) {
    std::string disk = vdisk_name, size_text = vdisk_size;
    if (vdisk_add->parsed()) {
      auto colon = vdisk_spec.find(':');
      if (colon == std::string::npos) return Fail("a disk is NAME:SIZE, e.g. data:10G");
      disk = vdisk_spec.substr(0, colon);
      size_text = vdisk_spec.substr(colon + 1);
    }
    auto size = osr::ParseSize(size_text);
    if (!size.ok()) return Fail(size.status().message());
    return Print(
        c,
        Call(c, "POST", "/vms/" + vname + "/disks",
             json{{"name", disk}, {"size_bytes", *size}, {"add", vdisk_add->parsed()}}),
        [&](const json& b) {
          vm_table(b["vm"]);
          fmt::print(
              "disk {} {} at seq {}{}\n", disk, b.value("added", false) ? "added" : "grown",
              b.value("seq", uint64_t{0}),
              b.value("restart_needed", false) ? " (the running VM sees it after a restart)" : "");
        });
  }
  if (vrepair->parsed()) {
    return Print(c,
                 Call(c, "POST", "/vms/" + vname + "/repair",
                      json{{"site", vrepair_site},
                           {"trim_image", vrepair_trim},
                           {"reset_history", vrepair_reset},
                           {"accept_changes", vrepair_accept}}),
                 Show);
  }
  if (vstop->parsed()) {
    return Print(
        c, Call(c, "POST", "/vms/" + vname + "/stop", json{{"timeout_ms", vstop_timeout * 1000}}),
        vm_table);
  }
  // An action with --dry-run prints its plan; without, it starts a job.
  auto act = [&](const std::string& path, json body) {
    if (!dry_run) return submitted(Call(c, "POST", path, body));
    body["dry_run"] = true;
    Answer a = Call(c, "POST", path, body);
    int rc = Print(c, a, ShowPlan);
    if (rc == 0 && !a.body.value("plan", json::object()).value("ok", false)) rc = 1;
    return rc;
  };
  if (fo->parsed()) {
    return act("/items/" + vname + "/failover", json{{"point", spec},
                                                     {"shutdown_source", shutdown_source},
                                                     {"planned", planned},
                                                     {"start", !no_start}});
  }
  if (vconsole->parsed()) return Console(c, vname, vconsole_drill, vconsole_follow, vconsole_bytes);
  if (cp->parsed())
    return submitted(Call(c, "POST", "/items/" + vname + "/change-point", json{{"point", spec}}));
  if (commit->parsed()) return submitted(Call(c, "POST", "/items/" + vname + "/commit"));
  if (reprotect->parsed()) return act("/items/" + vname + "/reprotect", json{{"compare", compare}});
  if (protect->parsed()) {
    return act("/vms/" + vname + "/protect", json{{"target", target}, {"policy", ppolicy}});
  }
  if (unprotect->parsed()) return Print(c, Call(c, "DELETE", "/items/" + vname), Show);
  if (ilist->parsed()) {
    return Print(c, Call(c, "GET", "/items"), [](const json& b) {
      Table(b, {{"name", "NAME"},
                {"state", "STATE"},
                {"source", "SOURCE"},
                {"target", "TARGET"},
                {"health", "HEALTH"},
                {"rpo_seconds", "RPO_S"},
                {"latest_point.time", "LATEST POINT"}});
    });
  }
  if (ishow->parsed()) return Print(c, Call(c, "GET", "/items/" + vname), Show);
  if (ptlist->parsed()) {
    return Print(c, Call(c, "GET", "/items/" + vname + "/points"), [](const json& b) {
      Table(
          b,
          {{"id", "ID"}, {"time", "TIME"}, {"seq", "SEQ"}, {"type", "TYPE"}, {"in_use", "IN USE"}});
    });
  }
  if (ptclock->parsed()) return Print(c, Call(c, "GET", "/clock"), Show);
  if (ptconfirm->parsed()) return Print(c, Call(c, "POST", "/clock/confirm"), Show);
  if (ptcreate->parsed())
    return Print(c, Call(c, "POST", "/items/" + vname + "/points", json{{"app", appflag}}), Show);
  if (tf->parsed()) {
    return act("/items/" + vname + "/test-failover",
               json{{"point", spec}, {"start", !tf_no_start}});
  }
  if (tfc->parsed())
    return submitted(
        Call(c, "POST", "/items/" + vname + "/test-failover-cleanup", json{{"notes", notes}}));
  if (jlist->parsed()) {
    std::string q = "/jobs?vm=" + jvm + "&state=" + jstate;
    return Print(c, Call(c, "GET", q), [](const json& b) {
      Table(b, {{"id", "ID"},
                {"type", "TYPE"},
                {"vm", "VM"},
                {"state", "STATE"},
                {"progress", "%"},
                {"error", "ERROR"}});
    });
  }
  if (jshow->parsed()) return Print(c, Call(c, "GET", fmt::format("/jobs/{}", jid)), job_table);
  if (jwait->parsed()) return Wait(c, jid, job_table);
  if (jcancel->parsed()) {
    return Print(c, Call(c, "POST", fmt::format("/jobs/{}/cancel", jid)), [&](const json& j) {
      job_table(j);
      if (j.value("cancel_requested", false)) {
        std::printf("  still stopping (a site call is under way): osr job wait %lld\n",
                    static_cast<long long>(jid));
      }
    });
  }
  return 2;
}
