// osrd: the Open Site Recovery daemon. For now: `nbd-serve` (a disk server with an
// optional capture log) and the `capture` tools (replay, dump, dirty).
#include <malloc.h>
#include <signal.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "capture/capture_group.h"
#include "capture/dirty_bitmap.h"
#include "capture/log_reader.h"
#include "capture/replay.h"
#include "common/https.h"
#include "common/tls.h"
#include "common/units.h"
#include "nbd/file_disk.h"
#include "nbd/server.h"
#include "site/site.h"
#include "site/site_api.h"
#include "vault/sql.h"
#include "vault/vault.h"

namespace {

using namespace osr;

int Fail(const Status& st) {
  std::fprintf(stderr, "osrd: error: %s\n", st.ToString().c_str());
  return 1;
}

std::string UriFor(const ListenAddress& a, const std::string& export_name, bool tls_only) {
  if (a.kind == ListenAddress::Kind::kUnix) {
    return fmt::format("nbd+unix:///{}?socket={}", export_name, a.path);
  }
  bool v6 = a.host.find(':') != std::string::npos;
  return fmt::format("{}://{}{}{}:{}/{}", tls_only ? "nbds" : "nbd", v6 ? "[" : "", a.host,
                     v6 ? "]" : "", a.port, export_name);
}

sigset_t BlockStopSignals();

struct ServeArgs {
  std::string image;
  std::string size;
  std::string listen;
  std::string socket;
  std::string export_name;
  std::string capture;
  std::string region_size = "64K";
  uint64_t epoch = 1;
  bool read_only = false;
  // NBD TLS (STARTTLS) on the TCP listener.
  std::string tls_dir;  // a private CA here (made if missing), the server's and clients' certs
  std::vector<std::string> tls_clients;  // client certificate dirs to write: DIR/clients/NAME
  std::string tls_ca, tls_cert, tls_key;
  std::vector<std::string> tls_authz;  // client certificate names allowed in
  bool tls_optional = false;
  bool insecure_tcp = false;
  int handshake_timeout_ms = 10000;
  size_t connections_max = 128;
  size_t connections_per_address_max = 16;
};

// The TCP listener's TLS from the nbd-serve flags; fills `authz` with who may connect.
Result<nbd::ListenerOptions> ServeTls(const ServeArgs& a, nbd::Authz* authz) {
  nbd::ListenerOptions o;
  o.insecure_tcp = a.insecure_tcp;
  bool files = !a.tls_ca.empty() || !a.tls_cert.empty() || !a.tls_key.empty();
  if (!a.tls_dir.empty() && files) {
    return InvalidArgument("--tls-dir and --tls-ca/--tls-cert/--tls-key do not go together");
  }
  if (a.tls_dir.empty() && !a.tls_clients.empty())
    return InvalidArgument("--tls-client needs --tls-dir");
  if (a.tls_dir.empty() && !files) {
    if (!a.tls_authz.empty() || a.tls_optional) return InvalidArgument("TLS options without TLS");
    return o;
  }
  TlsFiles tf{a.tls_ca, a.tls_cert, a.tls_key};
  std::vector<std::string> names = a.tls_authz;
  if (!a.tls_dir.empty()) {
    OSR_ASSIGN_OR_RETURN(tf, EnsureQuickstartCertificates(a.tls_dir, "nbd-serve"));
    for (auto& c : a.tls_clients) {
      if (!ValidName(c)) return InvalidArgument("--tls-client: '" + c + "' is not a valid name");
      OSR_ASSIGN_OR_RETURN(
          std::string dir,
          WriteCertificateDir(a.tls_dir, c, a.tls_dir + "/clients/" + c, CertDirRole::kClient));
      std::printf("osrd: client certificate %s in %s\n", c.c_str(), dir.c_str());
    }
    if (names.empty()) names = a.tls_clients;
    if (names.empty()) return InvalidArgument("--tls-dir needs --tls-client or --tls-authz");
  } else if (tf.ca.empty() || tf.cert.empty() || tf.key.empty()) {
    return InvalidArgument("give all of --tls-ca, --tls-cert and --tls-key");
  } else if (names.empty()) {
    spdlog::warn("no --tls-authz: every client certificate the CA signed may connect");
  }
  std::vector<nbd::AuthzRule> rules;
  for (auto& n : names) rules.push_back({n, {}});
  *authz = nbd::Authz(rules);
  TlsOptions to;
  to.allow_tls12 = true;
  to.allowed_peer_names = names;
  OSR_ASSIGN_OR_RETURN(o.tls_context, TlsContext::Create(tf, /*server=*/true, to));
  o.tls = a.tls_optional ? nbd::TlsMode::kOptional : nbd::TlsMode::kRequired;
  return o;
}

int NbdServe(const ServeArgs& a) {
  uint64_t create_size = 0;
  if (!a.size.empty()) {
    auto s = ParseSize(a.size);
    if (!s.ok()) return Fail(s.status());
    if (*s == 0) return Fail(InvalidArgument("--size must be greater than 0"));
    create_size = *s;
  }
  auto region = ParseSize(a.region_size);
  if (!region.ok()) return Fail(region.status());
  if (!a.capture.empty() && a.read_only) {
    return Fail(InvalidArgument("--capture and --read-only do not go together"));
  }

  // Signals are taken by sigwait() below; every thread inherits this mask.
  sigset_t sigs = BlockStopSignals();

  auto image = nbd::FileDisk::Open(a.image, a.read_only, create_size);
  if (!image.ok()) return Fail(image.status());
  std::shared_ptr<nbd::Disk> disk;
  std::unique_ptr<capture::CaptureGroup> captured;
  if (!a.capture.empty()) {
    capture::CaptureOptions co;
    co.dir = a.capture;
    co.region_bytes = *region;
    co.epoch = a.epoch;
    std::vector<std::unique_ptr<nbd::Disk>> images;
    images.push_back(std::move(*image));
    auto group = capture::CaptureGroup::Open(std::move(images), co);
    if (!group.ok()) return Fail(group.status());
    captured = std::move(*group);
    disk = captured->disk(0);
  } else {
    disk = std::move(*image);
  }

  nbd::ExportTable exports;
  if (Status st = exports.Add({a.export_name, "osrd " + a.image, disk, ""}); !st.ok())
    return Fail(st);
  nbd::Authz authz;
  auto tcp_options = ServeTls(a, &authz);
  if (!tcp_options.ok()) return Fail(tcp_options.status());
  bool tls_only = tcp_options->tls == nbd::TlsMode::kRequired;
  nbd::SessionLimits limits;
  limits.handshake_timeout_ms = a.handshake_timeout_ms;
  nbd::ServerLimits server_limits;
  server_limits.tcp_connections_max = a.connections_max;
  server_limits.connections_per_address_max = a.connections_per_address_max;
  nbd::Server server(&exports, limits, server_limits, &authz);
  std::vector<ListenAddress> addrs;
  if (!a.listen.empty() || a.socket.empty()) {
    auto hp = ParseHostPort(a.listen.empty() ? "127.0.0.1:10809" : a.listen, 10809);
    if (!hp.ok()) return Fail(hp.status());
    addrs.push_back(*hp);
  }
  if (!a.socket.empty()) {
    ListenAddress u;
    u.kind = ListenAddress::Kind::kUnix;
    u.path = a.socket;
    addrs.push_back(u);
  }
  std::vector<ListenAddress> bound;
  for (auto& addr : addrs) {
    // The unix socket is plain: its 0600 mode is its access control.
    bool tcp = addr.kind == ListenAddress::Kind::kTcp;
    auto b = server.AddListener(addr, tcp ? *tcp_options : nbd::ListenerOptions{});
    if (!b.ok()) return Fail(b.status());
    bound.push_back(*b);
  }
  if (Status st = server.Start(); !st.ok()) return Fail(st);
  for (auto& b : bound) {
    std::printf("osrd: listening on %s\n", UriFor(b, a.export_name, tls_only).c_str());
  }
  std::printf("osrd: ready\n");
  std::fflush(stdout);
  spdlog::info("serving {} ({} bytes){}{}", a.image, disk->size(), a.read_only ? ", read-only" : "",
               captured ? ", capture to " + a.capture : "");

  int sig = 0;
  sigwait(&sigs, &sig);
  spdlog::info("signal {}: stopping", sig);
  server.Stop();
  int rc = 0;
  if (captured != nullptr) {
    if (Status st = captured->Close(); !st.ok()) rc = Fail(st);
  } else if (Status st = disk->Flush(); !st.ok()) {
    rc = Fail(st);
  }
  return rc;
}

int CaptureReplay(const std::string& log, const std::string& base, const std::string& out,
                  uint64_t upto, uint32_t disk) {
  auto r = capture::Replay(log, base, out, upto, disk);
  if (!r.ok()) return Fail(r.status());
  std::printf("osrd: replayed %llu records (seq %llu..%llu) onto %s\n",
              static_cast<unsigned long long>(r->records),
              static_cast<unsigned long long>(r->first_seq),
              static_cast<unsigned long long>(r->last_seq), out.c_str());
  return 0;
}

int CaptureDump(const std::string& log, bool json) {
  nlohmann::json records = nlohmann::json::array();
  auto visit = [&](const capture::RecordHeader& h, std::span<const uint8_t>) {
    if (json) {
      records.push_back({{"seq", h.seq},
                         {"epoch", h.epoch},
                         {"kind", capture::KindName(h.kind)},
                         {"offset", h.offset},
                         {"length", h.length},
                         {"time_ns", h.time_ns},
                         {"disk", h.disk},
                         {"fua", (h.flags & 1) != 0}});
    } else {
      std::printf("seq=%llu epoch=%llu kind=%s offset=%llu length=%llu time=%s crc=ok\n",
                  static_cast<unsigned long long>(h.seq), static_cast<unsigned long long>(h.epoch),
                  std::string(capture::KindName(h.kind)).c_str(),
                  static_cast<unsigned long long>(h.offset),
                  static_cast<unsigned long long>(h.length), FormatTimeNs(h.time_ns).c_str());
    }
    return true;
  };
  auto s = capture::LogReader::Scan(log, visit, /*resync=*/true);
  if (!s.ok()) return Fail(s.status());
  if (json) {
    nlohmann::json errors = nlohmann::json::array();
    for (auto& e : s->errors) {
      errors.push_back({{"segment", e.segment}, {"position", e.position}, {"message", e.message}});
    }
    std::cout << nlohmann::json{{"records", records}, {"errors", errors}}.dump(1) << "\n";
  } else {
    for (auto& e : s->errors) {
      std::printf("error: %s at byte %llu: %s\n", e.segment.c_str(),
                  static_cast<unsigned long long>(e.position), e.message.c_str());
    }
    std::printf("osrd: %llu records, seq %llu..%llu, %zu errors\n",
                static_cast<unsigned long long>(s->records),
                static_cast<unsigned long long>(s->first_seq),
                static_cast<unsigned long long>(s->last_seq), s->errors.size());
  }
  return s->errors.empty() ? 0 : 1;
}

int CaptureDirty(const std::string& log, uint32_t disk, bool json) {
  uint64_t region = 0;
  auto r = capture::DirtyBitmap::ReadDirty(capture::BitmapPath(log, disk), &region);
  if (!r.ok()) return Fail(r.status());
  if (json) {
    nlohmann::json regions = nlohmann::json::array();
    for (auto& x : *r) regions.push_back({{"offset", x.offset}, {"length", x.length}});
    std::cout << nlohmann::json{{"region_bytes", region}, {"regions", regions}}.dump() << "\n";
  } else {
    for (auto& x : *r) {
      std::printf("%llu %llu\n", static_cast<unsigned long long>(x.offset),
                  static_cast<unsigned long long>(x.length));
    }
  }
  return 0;
}

sigset_t BlockStopSignals() {
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  signal(SIGPIPE, SIG_IGN);
  return sigs;
}

int SiteMain(const std::string& config_path) {
  sigset_t sigs = BlockStopSignals();
  auto cfg = site::SiteConfig::Load(config_path);
  if (!cfg.ok()) return Fail(cfg.status());
  auto s = site::Site::Start(*cfg);
  if (!s.ok()) return Fail(s.status());
  site::SiteApi api(s->get());
  auto api_addr = api.Listen(cfg->api_listen);
  if (!api_addr.ok()) return Fail(api_addr.status());
  api.Start();
  auto nbd = (*s)->nbd_address();
  auto repl = (*s)->replication_address();
  std::printf("osrd: site %s\n", cfg->name.c_str());
  std::printf("osrd: api on %s://%s:%u/api/v1\n", cfg->api_insecure ? "http" : "https",
              api_addr->host.c_str(), api_addr->port);
  std::printf("osrd: nbd on %s:%u\n", nbd.host.c_str(), nbd.port);
  std::printf("osrd: replication on %s:%u\n", repl.host.c_str(), repl.port);
  std::printf("osrd: ready\n");
  std::fflush(stdout);
  int sig = 0;
  sigwait(&sigs, &sig);
  spdlog::info("signal {}: stopping site {}", sig, cfg->name);
  api.Stop();
  (*s)->Stop();
  return 0;
}

// The web UI's built assets: --web, else web/dist beside the build directory of this
// binary (a source tree), else /usr/share/osr/web.
std::string WebDir(const std::string& given) {
  if (!given.empty()) return given;
  std::error_code ec;
  auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    auto dist = exe.parent_path().parent_path() / "web" / "dist";
    if (std::filesystem::exists(dist / "index.html", ec)) return dist.string();
  }
  return "/usr/share/osr/web";
}

struct VaultArgs {
  std::string db = "vault.db";
  std::string listen = "127.0.0.1:7480";
  std::string web;
  std::string tls_cert, tls_key;  // HTTPS for the REST API and web UI
  bool insecure_http = false;
  std::vector<std::string> public_hosts;
  std::string site_ca, site_cert, site_key;      // mutual TLS to the sites' APIs
  std::string admin_token_file;                  // default: admin.token beside the catalog
  std::string hooks_file;                        // the hooks allow-list (--hooks)
  bool allow_api_hooks = false;                  // a lab: hook strings from the API run
  int lease_ttl_ms = vault::kLeaseTtlMsDefault;  // several vaults: the leader's lease
  int64_t lease_token_floor = 0;                 // the reset after a catalog restore
};

// Where a first admin token is written: beside a SQLite catalog; in the working
// directory when the catalog is a PostgreSQL server.
std::string AdminTokenPath(const VaultArgs& a) {
  if (!a.admin_token_file.empty()) return a.admin_token_file;
  if (vault::IsPostgresUrl(a.db)) return (std::filesystem::current_path() / "admin.token").string();
  auto dir = std::filesystem::absolute(a.db).parent_path();
  return (dir / "admin.token").string();
}

int VaultMain(const VaultArgs& a) {
  sigset_t sigs = BlockStopSignals();
  auto addr = ParseHostPort(a.listen, 7480);
  if (!addr.ok()) return Fail(addr.status());
  vault::VaultConfig vcfg;
  vcfg.db_path = a.db;
  if (auto dir = vault::IsPostgresUrl(a.db) ? std::filesystem::path()
                                            : std::filesystem::absolute(a.db).parent_path();
      !dir.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);  // 0700 (umask); a failure shows at open
  }
  vcfg.api.listen = *addr;
  vcfg.api.web_dir = WebDir(a.web);
  vcfg.api.tls = {"", a.tls_cert, a.tls_key};
  vcfg.api.insecure_http = a.insecure_http;
  vcfg.api.public_hosts = a.public_hosts;
  vcfg.site_tls = {a.site_ca, a.site_cert, a.site_key};
  vcfg.lease_ttl_ms = a.lease_ttl_ms;
  vcfg.lease_token_floor = a.lease_token_floor;
  auto hooks = vault::LoadHookConfig(a.hooks_file, a.allow_api_hooks);
  if (!hooks.ok()) return Fail(hooks.status());
  vcfg.hooks = *hooks;
  if (a.allow_api_hooks) {
    spdlog::warn("vault: --allow-api-hooks: hook commands given through the API run here");
  }
  auto v = vault::Vault::Start(vcfg);
  if (!v.ok()) return Fail(v.status());
  std::string token_path = AdminTokenPath(a);
  auto made = vault::EnsureAdminToken((*v)->catalog(), token_path);
  if (!made.ok()) return Fail(made.status());
  if (*made) std::printf("osrd: first admin token written to %s (0600)\n", token_path.c_str());
  std::printf("osrd: vault on %s://%s:%u/api/v1\n", (*v)->https() ? "https" : "http",
              (*v)->address().host.c_str(), (*v)->address().port);
  std::printf("osrd: ready\n");
  std::fflush(stdout);
  int sig = 0;
  sigwait(&sigs, &sig);
  (*v)->Stop();
  return 0;
}

// A vault and two sites, "primary" and "recovery", in one process on 127.0.0.1.
// `db`: the catalog (a SQLite path or a postgresql:// URL); "": DIR/vault.db.
int Quickstart(const std::string& dir, const std::string& vault_listen, const std::string& web,
               const std::string& db) {
  sigset_t sigs = BlockStopSignals();
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return Fail(Status::FromErrno(ec.value(), "create " + dir));
  std::string abs = std::filesystem::absolute(dir).string();
  auto vaddr = ParseHostPort(vault_listen, 7480);
  if (!vaddr.ok()) return Fail(vaddr.status());
  // A private CA on first start: each site authenticates to the other (replication) and
  // to the vault (site API) with its certificate, the vault to the sites with its own.
  auto vault_tls = EnsureQuickstartCertificates(abs + "/tls", "vault");
  if (!vault_tls.ok()) return Fail(vault_tls.status());
  vault::VaultConfig vcfg;
  vcfg.db_path = db.empty() ? abs + "/vault.db" : db;
  vcfg.api.listen = *vaddr;
  vcfg.api.web_dir = WebDir(web);
  vcfg.site_tls = *vault_tls;
  vcfg.jobs_paused = true;  // until the sites (new ports after a restart) are registered
  // A lab on one machine: commands, qemu arguments and hooks may come from the API.
  vcfg.hooks.allow_api_hooks = true;
  auto v = vault::Vault::Start(vcfg);
  if (!v.ok()) return Fail(v.status());
  std::string token_path = abs + "/admin.token";
  auto made = vault::EnsureAdminToken((*v)->catalog(), token_path);
  if (!made.ok()) return Fail(made.status());
  std::vector<std::unique_ptr<site::Site>> sites;
  std::vector<std::unique_ptr<site::SiteApi>> apis;
  // NBD clients with TLS use DIR/tls/nbd-client (QEMU's and libnbd's layout).
  auto nbd_client = WriteCertificateDir(abs + "/tls", "nbd-client", abs + "/tls/nbd-client",
                                        CertDirRole::kClient);
  if (!nbd_client.ok()) return Fail(nbd_client.status());
  for (std::string name : {"primary", "recovery"}) {
    site::SiteConfig cfg;
    cfg.name = name;
    cfg.data_dir = abs + "/" + name;
    cfg.nbd_listen.host = cfg.replication_listen.host = cfg.api_listen.host = "127.0.0.1";
    auto tls = EnsureQuickstartCertificates(abs + "/tls", name);
    if (!tls.ok()) return Fail(tls.status());
    cfg.tls = *tls;
    cfg.commands.allow_api_commands = true;
    // A lab's logical network, "lab": QEMU user networking at both sites (a drill's with
    // restrict=on: it reaches nothing outside), so that `--nic MAC,lab` works here.
    site::SiteNetwork lab;
    lab.production.kind = site::NetworkAttach::Kind::kUser;
    lab.drill.kind = site::NetworkAttach::Kind::kUser;
    lab.drill.restrict_out = true;
    cfg.networks["lab"] = lab;
    cfg.nbd_tls = *tls;  // TLS offered to NBD clients; plain too (loopback only)
    cfg.nbd_tls_optional = true;
    cfg.nbd_tls_authz = {{"nbd-client", {}}};
    auto s = site::Site::Start(cfg);
    if (!s.ok()) return Fail(s.status());
    auto api = std::make_unique<site::SiteApi>(s->get());
    auto a = api->Listen(cfg.api_listen);
    if (!a.ok()) return Fail(a.status());
    api->Start();
    auto repl = (*s)->replication_address();
    // The quickstart's sites move to new ports when it restarts: replace is its own.
    auto r = (*v)->RegisterSite(name, fmt::format("https://{}:{}/api/v1", a->host, a->port),
                                fmt::format("{}:{}", repl.host, repl.port), /*replace=*/true);
    if (!r.ok()) return Fail(r.status());
    sites.push_back(std::move(*s));
    apis.push_back(std::move(api));
  }
  (*v)->StartJobs();
  auto vurl = fmt::format("http://{}:{}", (*v)->address().host, (*v)->address().port);
  std::printf(
      "osrd quickstart: a vault and two sites (primary, recovery) on 127.0.0.1, "
      "state in %s\n",
      abs.c_str());
  std::printf("  vault: %s/api/v1\n", vurl.c_str());
  std::printf("  web UI: %s/ (sign in with the token in %s)\n", vurl.c_str(), token_path.c_str());
  std::printf("  admin token: %s (0600; the CLI finds it when run from here)\n",
              token_path.c_str());
  std::printf(
      "  a lab: VM commands, qemu arguments and hooks may be given through the API "
      "(allow_api_commands, --allow-api-hooks)\n");
  std::printf("Try (build/osr, or osr on your PATH):\n");
  std::printf("  osr site list\n");
  std::printf("  osr vm create vm1 --site primary --disk os:1G --disk data:256M\n");
  std::printf("  osr vm show vm1                      # the disks' NBD URIs: write to them\n");
  std::printf("  osr protect vm1 --target recovery --wait\n");
  std::printf("  osr point list vm1\n");
  std::printf("  osr test-failover vm1 --point latest --wait   # drill disks' URIs\n");
  std::printf("  osr test-failover-cleanup vm1 --wait\n");
  std::printf("  osr failover vm1 --point latest --wait   # then: commit, reprotect\n");
  std::printf("Ctrl-C stops everything.\n");
  std::printf("osrd: ready\n");
  std::fflush(stdout);
  int sig = 0;
  sigwait(&sigs, &sig);
  spdlog::info("signal {}: stopping the quickstart", sig);
  (*v)->Stop();
  for (auto& a : apis) a->Stop();
  for (auto& s : sites) s->Stop();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // State is private (docs/security.md): folders 0700, files 0600, whatever the caller's
  // umask; certificates are made 0644 on purpose (tls.cc).
  ::umask(077);
  // Memory follows the configured caches, not the history taken in (invariant 9). glibc's
  // defaults let the heap keep what RocksDB's flushes and the receiver's batches free: a
  // mmap threshold that rises after each large free, and an arena per busy thread. With
  // these, the recovery site's RSS held at 80/82 MB at 1/4 GiB of retained 4 KiB churn
  // (bench/store_scale.py), where it grew 67 -> 111 -> 126 MB (1/4/8 GiB) before.
  // Unless the operator set them (MALLOC_ARENA_MAX, MALLOC_MMAP_THRESHOLD_).
  if (std::getenv("MALLOC_ARENA_MAX") == nullptr) mallopt(M_ARENA_MAX, 2);
  if (std::getenv("MALLOC_MMAP_THRESHOLD_") == nullptr) mallopt(M_MMAP_THRESHOLD, 128 * 1024);
  // Many stores' open segments and index tables (docs/operations.md, "Descriptors").
  if (osr::Status st = osr::RaiseOpenFileLimit(); !st.ok()) {
    std::fprintf(stderr, "osrd: %s\n", st.ToString().c_str());
  }
  auto logger = spdlog::stderr_color_mt("osrd");
  spdlog::set_default_logger(logger);
  spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ %v");
  if (const char* lvl = std::getenv("OSR_LOG")) spdlog::set_level(spdlog::level::from_str(lvl));

  CLI::App app{"osrd: the Open Site Recovery daemon"};
  app.require_subcommand(1);

  ServeArgs serve;
  auto* ns =
      app.add_subcommand("nbd-serve", "serve a disk image over NBD, optionally capturing writes");
  ns->add_option("--image", serve.image, "raw image file")->required();
  ns->add_option("--size", serve.size, "create a sparse image of this size if it does not exist");
  ns->add_option("--listen", serve.listen, "TCP address HOST:PORT (default 127.0.0.1:10809)");
  ns->add_option("--socket", serve.socket, "unix socket path");
  ns->add_option("--export", serve.export_name, "export name (default: empty)");
  ns->add_option("--capture", serve.capture, "capture log directory");
  ns->add_option("--region-size", serve.region_size, "dirty-bitmap region size (default 64K)");
  ns->add_option("--epoch", serve.epoch, "epoch recorded with captured writes (default 1)");
  ns->add_flag("--read-only", serve.read_only, "refuse writes");
  ns->add_option("--tls-dir", serve.tls_dir,
                 "TLS on TCP with a private CA in this folder (made if missing)");
  ns->add_option("--tls-client", serve.tls_clients,
                 "with --tls-dir: write a client certificate folder DIR/clients/NAME (ca-cert.pem, "
                 "client-cert.pem, client-key.pem: QEMU's tls-creds-x509 dir, libnbd's "
                 "tls-certificates); repeatable");
  ns->add_option("--tls-ca", serve.tls_ca, "TLS on TCP: the CA of client certificates (PEM)");
  ns->add_option("--tls-cert", serve.tls_cert, "TLS on TCP: the server certificate (PEM)");
  ns->add_option("--tls-key", serve.tls_key, "TLS on TCP: its key (PEM)");
  ns->add_option("--tls-authz", serve.tls_authz,
                 "a client certificate name (CN) allowed in; repeatable (default with --tls-dir: "
                 "the --tls-client names)");
  ns->add_flag("--tls-optional", serve.tls_optional,
               "plain clients too (default: TLS required once configured)");
  ns->add_flag("--insecure-tcp", serve.insecure_tcp,
               "allow plain TCP on an address that is not loopback");
  ns->add_option("--handshake-timeout-ms", serve.handshake_timeout_ms,
                 "the whole handshake, TLS included, must end within this (default 10000)")
      ->check(CLI::Range(100, 600000));
  ns->add_option("--connections-max", serve.connections_max,
                 "TCP connections at once (default 128)")
      ->check(CLI::Range(1, 65536));
  ns->add_option("--connections-per-address-max", serve.connections_per_address_max,
                 "TCP connections at once from one client address (default 16)")
      ->check(CLI::Range(1, 65536));

  std::string site_config;
  auto* sp = app.add_subcommand("site",
                                "run a site daemon (disks, capture, replication, recovery stores)");
  sp->add_option("--config", site_config,
                 "TOML config: name, data_dir, nbd_listen, replication_listen, api_listen, "
                 "commands_file, ... (docs/api.md)")
      ->required();

  VaultArgs va;
  std::string vault_listen = "127.0.0.1:7480", qs_dir = "./osr-data", qs_db;
  auto* vp = app.add_subcommand("vault", "run the vault (catalog, REST API, jobs)");
  vp->add_option("--db", va.db,
                 "the catalog: a SQLite file (default vault.db) or a PostgreSQL server, "
                 "postgresql://USER@HOST:PORT/DB (password in a passfile: docs/operations.md)");
  vp->add_option("--listen", va.listen, "HOST:PORT (default 127.0.0.1:7480)");
  vp->add_option("--web", va.web,
                 "the web UI's built assets (default: web/dist of the source tree)");
  vp->add_option("--tls-cert", va.tls_cert, "PEM certificate: serve HTTPS");
  vp->add_option("--tls-key", va.tls_key, "PEM key of --tls-cert");
  vp->add_flag("--insecure-http", va.insecure_http,
               "serve plain HTTP on a non-loopback address (trusted networks only)");
  vp->add_option("--public-host", va.public_hosts,
                 "a host name clients use for this vault (repeatable)");
  vp->add_option("--site-ca", va.site_ca, "PEM CA that signed the sites' certificates");
  vp->add_option("--site-cert", va.site_cert, "PEM client certificate for the sites (CN vault)");
  vp->add_option("--site-key", va.site_key, "PEM key of --site-cert");
  vp->add_option("--admin-token-file", va.admin_token_file,
                 "where the first admin token is written (default: admin.token beside --db)");
  std::string web_dir;
  vp->add_option("--hooks", va.hooks_file,
                 "allow-list of hook commands ([hooks.NAME] command = \"...\"; docs/formats.md)");
  vp->add_flag("--allow-api-hooks", va.allow_api_hooks,
               "also run hook commands given as strings through the API (a lab)");
  vp->add_option("--lease-ttl-ms", va.lease_ttl_ms,
                 "several vaults on one PostgreSQL catalog: the leader's lease lasts this long "
                 "after its last renewal (default 6000; docs/operations.md)")
      ->check(CLI::Range(vault::kLeaseTtlMsMin, 3600000));
  vp->add_option("--lease-token-floor", va.lease_token_floor,
                 "after the catalog was restored from a backup: raise the lease token to N "
                 "(the highest a site's refusal names) so that the sites accept this vault's "
                 "leader again (docs/operations.md)")
      ->check(CLI::Range(int64_t{1}, static_cast<int64_t>(kLeaseTokenMax - 1)));
  auto* qs = app.add_subcommand("quickstart", "a vault and two sites on 127.0.0.1, in one process");
  qs->add_option("--dir", qs_dir, "state directory (default ./osr-data)");
  qs->add_option("--db", qs_db,
                 "the vault's catalog: a SQLite file (default DIR/vault.db) or "
                 "postgresql://USER@HOST:PORT/DB");
  qs->add_option("--vault-listen", vault_listen, "HOST:PORT (default 127.0.0.1:7480)");
  qs->add_option("--web", web_dir,
                 "the web UI's built assets (default: web/dist of the source tree)");

  std::string certs_dir;
  std::vector<std::string> cert_names;
  auto* certs = app.add_subcommand(
      "certs",
      "make a private CA in DIR (once) and a certificate for each NAME signed by it (sites by "
      "their site name, the vault as 'vault'): DIR/ca.pem, DIR/NAME.pem, DIR/NAME.key");
  certs->add_option("--dir", certs_dir, "where the CA and the certificates live")->required();
  certs->add_option("--name", cert_names, "a certificate's CN (repeat)")->required();

  auto* cap = app.add_subcommand("capture", "inspect and replay capture logs");
  cap->require_subcommand(1);
  std::string log, base, out;
  uint64_t upto = UINT64_MAX;
  uint32_t disk = 0;
  std::string output = "text";
  auto* rp = cap->add_subcommand("replay", "apply a capture log to a copy of the starting image");
  rp->add_option("--log", log, "capture log directory")->required();
  rp->add_option("--base", base, "the image as it was when capture began")->required();
  rp->add_option("--out", out, "the image to write")->required();
  rp->add_option("--upto", upto, "apply records up to this sequence number");
  rp->add_option("--disk", disk, "the disk of the group to rebuild (default 0)");
  auto* dp = cap->add_subcommand("dump", "print every record and verify its checksum");
  dp->add_option("--log", log, "capture log directory")->required();
  dp->add_option("--output", output, "text or json")->check(CLI::IsMember({"text", "json"}));
  auto* dr = cap->add_subcommand("dirty", "print the regions marked in the dirty-region bitmap");
  dr->add_option("--log", log, "capture log directory")->required();
  dr->add_option("--disk", disk, "the disk of the group (default 0)");
  dr->add_option("--output", output, "text or json")->check(CLI::IsMember({"text", "json"}));

  CLI11_PARSE(app, argc, argv);

  if (ns->parsed()) return NbdServe(serve);
  if (sp->parsed()) return SiteMain(site_config);
  if (vp->parsed()) return VaultMain(va);
  if (qs->parsed()) return Quickstart(qs_dir, vault_listen, web_dir, qs_db);
  if (certs->parsed()) {
    for (auto& n : cert_names) {
      auto f = EnsureQuickstartCertificates(certs_dir, n);
      if (!f.ok()) return Fail(f.status());
      std::printf("%s: %s %s (CA %s)\n", n.c_str(), f->cert.c_str(), f->key.c_str(), f->ca.c_str());
    }
    return 0;
  }
  if (rp->parsed()) return CaptureReplay(log, base, out, upto, disk);
  if (dp->parsed()) return CaptureDump(log, output == "json");
  if (dr->parsed()) return CaptureDirty(log, disk, output == "json");
  return 2;
}
