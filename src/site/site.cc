#include "site/site.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <toml++/toml.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>
#include <thread>

#include "common/file.h"
#include "common/json_in.h"
#include "common/threads.h"
#include "common/units.h"

namespace osr::site {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr int kStateVersion = 1;

json DisksJson(const std::vector<DiskSpec>& disks) {
  json a = json::array();
  for (auto& d : disks) a.push_back({{"name", d.name}, {"size_bytes", d.size_bytes}});
  return a;
}

Result<std::vector<DiskSpec>> DisksFromJson(const json& a) {
  if (!a.is_array()) return InvalidArgument("disks must be a list");
  std::vector<DiskSpec> out;
  for (auto& d : a) {
    if (!d.is_object() || !d.contains("name") || !d["name"].is_string() ||
        !d.contains("size_bytes") || !d["size_bytes"].is_number_unsigned()) {
      return InvalidArgument("each disk needs a name and a size_bytes");
    }
    out.push_back({d["name"].get<std::string>(), d["size_bytes"].get<uint64_t>()});
  }
  return out;
}

std::vector<store::StoreDisk> StoreDisks(const std::vector<DiskSpec>& disks) {
  std::vector<store::StoreDisk> out;
  for (auto& d : disks) out.push_back({d.name, d.size_bytes});
  return out;
}

Result<ListenAddress> Address(const toml::table& t, const char* key, uint16_t default_port) {
  auto v = t[key].value<std::string>();
  if (!v) return InvalidArgument(fmt::format("config: '{}' (HOST:PORT) is missing", key));
  return ParseHostPort(*v, default_port);
}

// A size key: "8G" or a number of bytes; anything else is an error, not ignored.
Status SizeKey(const toml::table& t, const std::string& path, const char* key, uint64_t* out) {
  auto node = t[key];
  if (!node) return Status::Ok();
  if (auto n = node.value<int64_t>(); n && node.is_integer()) {
    if (*n < 0) return InvalidArgument(fmt::format("{}: '{}' must not be negative", path, key));
    *out = static_cast<uint64_t>(*n);
    return Status::Ok();
  }
  if (auto text = node.value<std::string>()) {
    auto v = ParseSize(*text);
    if (!v.ok())
      return InvalidArgument(fmt::format("{}: '{}': {}", path, key, v.status().message()));
    *out = *v;
    return Status::Ok();
  }
  return InvalidArgument(
      fmt::format("{}: '{}' must be a size such as \"8G\" or a number of bytes", path, key));
}

// commands_file and allow_api_commands: what the site's VMs may run.
Status CommandsKeys(const toml::table& t, const std::string& path, hypervisor::SiteCommands* out) {
  auto allow = t["allow_api_commands"];
  if (allow && !allow.is_boolean()) {
    return InvalidArgument(path + ": 'allow_api_commands' must be true or false");
  }
  auto file_node = t["commands_file"];
  if (file_node && !file_node.is_string()) {
    return InvalidArgument(path + ": 'commands_file' must be a path");
  }
  std::string file = file_node.value_or(std::string());
  if (!file.empty() && fs::path(file).is_relative()) {
    file = (fs::absolute(path).parent_path() / file).string();
  }
  OSR_ASSIGN_OR_RETURN(*out, hypervisor::LoadSiteCommands(file, allow.value_or(false)));
  return Status::Ok();
}

// A whole number key within [min, max]; absent: *out stays.
template <typename T>
Status IntKey(const toml::table& t, const std::string& path, const char* key, int64_t min,
              int64_t max, T* out) {
  auto node = t[key];
  if (!node) return Status::Ok();
  auto v = node.value<int64_t>();
  if (!node.is_integer() || !v || *v < min || *v > max) {
    return InvalidArgument(
        fmt::format("{}: '{}' must be a whole number in {}..{}", path, key, min, max));
  }
  *out = static_cast<T>(*v);
  return Status::Ok();
}

// nbd_tls_authz: a list whose entries are a certificate name ("ops": every export) or
// {identity = "NAME", exports = ["PREFIX", ...]} (exports whose names start so).
Result<std::vector<nbd::AuthzRule>> AuthzKey(const toml::table& t, const std::string& path) {
  std::vector<nbd::AuthzRule> out;
  auto node = t["nbd_tls_authz"];
  if (!node) return out;
  const toml::array* a = node.as_array();
  auto bad = [&](size_t i, const std::string& why) {
    return InvalidArgument(fmt::format("{}: nbd_tls_authz[{}]: {}", path, i, why));
  };
  if (a == nullptr) return InvalidArgument(path + ": 'nbd_tls_authz' must be a list");
  for (size_t i = 0; i < a->size(); ++i) {
    const toml::node& e = *a->get(i);
    nbd::AuthzRule r;
    if (auto name = e.value<std::string>(); name && e.is_string()) {
      r.identity = *name;
    } else if (const toml::table* tt = e.as_table()) {
      r.identity = (*tt)["identity"].value_or(std::string());
      if (auto ex = (*tt)["exports"]; ex) {
        const toml::array* ea = ex.as_array();
        if (ea == nullptr) return bad(i, "'exports' must be a list of export name prefixes");
        for (const auto& p : *ea) {
          auto v = p.value<std::string>();
          if (!v || v->empty()) return bad(i, "'exports' must hold non-empty strings");
          r.export_prefixes.push_back(*v);
        }
        if (r.export_prefixes.empty()) return bad(i, "'exports' is empty: it would allow nothing");
      }
    } else {
      return bad(i, "must be a certificate name or {identity, exports}");
    }
    if (r.identity.empty()) return bad(i, "needs a certificate name (identity)");
    out.push_back(std::move(r));
  }
  return out;
}

Status LoadNbdKeys(const toml::table& t, const std::string& path, SiteConfig* c) {
  c->nbd_tls.ca = t["nbd_tls_ca"].value_or(std::string());
  c->nbd_tls.cert = t["nbd_tls_cert"].value_or(std::string());
  c->nbd_tls.key = t["nbd_tls_key"].value_or(std::string());
  bool any = !c->nbd_tls.ca.empty() || !c->nbd_tls.cert.empty() || !c->nbd_tls.key.empty();
  if (any && (c->nbd_tls.ca.empty() || c->nbd_tls.cert.empty() || c->nbd_tls.key.empty())) {
    return InvalidArgument(path +
                           ": give all of nbd_tls_ca, nbd_tls_cert and nbd_tls_key, or none");
  }
  OSR_ASSIGN_OR_RETURN(c->nbd_tls_authz, AuthzKey(t, path));
  if (any && c->nbd_tls_authz.empty()) {
    return InvalidArgument(
        path +
        ": 'nbd_tls_authz' must name the client certificates allowed to open disks "
        "(without it every certificate of the CA would get in, other sites' included)");
  }
  if (!any && !c->nbd_tls_authz.empty()) {
    return InvalidArgument(path +
                           ": 'nbd_tls_authz' needs nbd_tls_ca, nbd_tls_cert and nbd_tls_key");
  }
  std::string mode = t["nbd_tls_mode"].value_or(std::string("require"));
  if (mode != "require" && mode != "optional") {
    return InvalidArgument(path + ": 'nbd_tls_mode' must be \"require\" or \"optional\"");
  }
  c->nbd_tls_optional = mode == "optional";
  if (auto n = t["nbd_insecure_tcp"]; n) {
    if (!n.is_boolean())
      return InvalidArgument(path + ": 'nbd_insecure_tcp' must be true or false");
    c->nbd_insecure_tcp = n.value_or(false);
  }
  OSR_RETURN_IF_ERROR(
      IntKey(t, path, "nbd_connections_max", 1, 65536, &c->nbd_limits.tcp_connections_max));
  OSR_RETURN_IF_ERROR(IntKey(t, path, "nbd_connections_per_address_max", 1, 65536,
                             &c->nbd_limits.connections_per_address_max));
  OSR_RETURN_IF_ERROR(
      IntKey(t, path, "nbd_handshake_timeout_ms", 100, 600000, &c->nbd_handshake_timeout_ms));
  return Status::Ok();
}

}  // namespace

Result<SiteConfig> SiteConfig::Load(const std::string& path) {
  toml::table t;
  try {  // toml++ reports parse errors as exceptions; they stop here
    t = toml::parse_file(path);
  } catch (const toml::parse_error& e) {
    return InvalidArgument(
        fmt::format("{}: {} (line {})", path, e.description(), e.source().begin.line));
  }
  SiteConfig c;
  c.name = t["name"].value_or(std::string());
  if (!ValidName(c.name)) return InvalidArgument(path + ": 'name' must be a site name");
  c.data_dir = t["data_dir"].value_or(std::string());
  if (c.data_dir.empty()) return InvalidArgument(path + ": 'data_dir' is missing");
  OSR_ASSIGN_OR_RETURN(c.nbd_listen, Address(t, "nbd_listen", 10809));
  OSR_ASSIGN_OR_RETURN(c.replication_listen, Address(t, "replication_listen", 7481));
  OSR_ASSIGN_OR_RETURN(c.api_listen, Address(t, "api_listen", 7482));
  OSR_RETURN_IF_ERROR(SizeKey(t, path, "capture_log_limit", &c.capture_log_bytes_max));
  OSR_RETURN_IF_ERROR(SizeKey(t, path, "materialise_rate", &c.materialise_bytes_per_second));
  OSR_RETURN_IF_ERROR(SizeKey(t, path, "console_log_limit", &c.console_log_bytes_max));
  if (c.console_log_bytes_max < kConsoleLogBytesMin) {
    return InvalidArgument(fmt::format("{}: 'console_log_limit' must be at least {} bytes", path,
                                       kConsoleLogBytesMin));
  }
  OSR_RETURN_IF_ERROR(SizeKey(t, path, "store_index_cache_bytes", &c.store_index_cache_bytes));
  if (c.store_index_cache_bytes < store::VersionIndex::kCacheBytesMin) {
    return InvalidArgument(fmt::format("{}: 'store_index_cache_bytes' must be at least {} bytes",
                                       path, store::VersionIndex::kCacheBytesMin));
  }
  c.tls.ca = t["tls_ca"].value_or(std::string());
  c.tls.cert = t["tls_cert"].value_or(std::string());
  c.tls.key = t["tls_key"].value_or(std::string());
  bool any = !c.tls.ca.empty() || !c.tls.cert.empty() || !c.tls.key.empty();
  if (any && (c.tls.ca.empty() || c.tls.cert.empty() || c.tls.key.empty())) {
    return InvalidArgument(path + ": give all of tls_ca, tls_cert and tls_key, or none");
  }
  c.api_vault_name = t["api_vault_name"].value_or(c.api_vault_name);
  c.api_insecure = t["api_insecure"].value_or(false);
  OSR_RETURN_IF_ERROR(CommandsKeys(t, path, &c.commands));
  if (auto node = t["replication_insecure"]; node) {
    auto b = node.value<bool>();
    if (!b || !node.is_boolean()) {
      return InvalidArgument(path + ": 'replication_insecure' must be true or false");
    }
    c.replication_insecure = *b;
  }
  OSR_RETURN_IF_ERROR(LoadNbdKeys(t, path, &c));
  OSR_ASSIGN_OR_RETURN(c.networks, LoadNetworks(t, path));
  c.qemu_binary = t["qemu_binary"].value_or(c.qemu_binary);
  if (c.qemu_binary.empty()) return InvalidArgument(path + ": 'qemu_binary' must not be empty");
  return c;
}

namespace {

// The NBD listener's options from the config; the error names the keys to set.
Result<nbd::ListenerOptions> NbdListenerOptions(const SiteConfig& cfg) {
  nbd::ListenerOptions o;
  o.insecure_tcp = cfg.nbd_insecure_tcp;
  if (cfg.nbd_tls.enabled()) {
    TlsOptions to;
    to.allow_tls12 = true;  // the NBD spec requires TLS 1.2 support
    for (auto& r : cfg.nbd_tls_authz) to.allowed_peer_names.push_back(r.identity);
    OSR_ASSIGN_OR_RETURN(o.tls_context, TlsContext::Create(cfg.nbd_tls, /*server=*/true, to));
    o.tls = cfg.nbd_tls_optional ? nbd::TlsMode::kOptional : nbd::TlsMode::kRequired;
  }
  bool plain = o.tls != nbd::TlsMode::kRequired;
  if (cfg.nbd_listen.kind == ListenAddress::Kind::kTcp && plain && !cfg.nbd_insecure_tcp &&
      !IsLoopbackHost(cfg.nbd_listen.host)) {
    return InvalidArgument(fmt::format(
        "site {}: nbd_listen {}:{} is not a loopback address, and NBD {}: anyone who reaches it "
        "could read and write every disk. Set nbd_tls_ca, nbd_tls_cert, nbd_tls_key and "
        "nbd_tls_authz (with nbd_tls_mode \"require\"), or nbd_insecure_tcp = true to accept "
        "that",
        cfg.name, cfg.nbd_listen.host, cfg.nbd_listen.port,
        cfg.nbd_tls.enabled() ? "TLS is optional (nbd_tls_mode = \"optional\")"
                              : "has no TLS configured"));
  }
  return o;
}

}  // namespace

Result<std::unique_ptr<Site>> Site::Start(const SiteConfig& cfg) {
  std::unique_ptr<Site> s(new Site(cfg));
  // Before any store opens: their indexes take this process's cache.
  store::VersionIndex::SetCacheBytes(cfg.store_index_cache_bytes);
  std::error_code ec;
  for (auto sub : {"groups", "stores", "views"}) {
    fs::create_directories(fs::path(cfg.data_dir) / sub, ec);
    if (ec) return Status::FromErrno(ec.value(), "create " + cfg.data_dir);
  }
  // One daemon per data_dir: two would both own site.json, the images and the logs. The
  // lock is held as long as the process lives (the kernel drops it with the process).
  std::string lock_path = cfg.data_dir + "/lock";
  int lock_fd = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (lock_fd < 0) return Status::FromErrno(errno, "open " + lock_path);
  s->data_lock_ = Fd(lock_fd);
  if (::flock(lock_fd, LOCK_EX | LOCK_NB) != 0) {
    return Status(
        Code::kAlreadyExists,
        fmt::format("{} is in use by another osrd (its lock {} is held)", cfg.data_dir, lock_path));
  }
  OSR_ASSIGN_OR_RETURN(nbd::ListenerOptions nbd_options, NbdListenerOptions(cfg));
  if (cfg.nbd_insecure_tcp && nbd_options.tls != nbd::TlsMode::kRequired) {
    spdlog::warn(
        "site {}: nbd_insecure_tcp: disks are served unencrypted and unauthenticated on {}",
        cfg.name, cfg.nbd_listen.host);
  }
  s->nbd_authz_ = nbd::Authz(cfg.nbd_tls_authz);
  nbd::SessionLimits nbd_limits;
  nbd_limits.handshake_timeout_ms = cfg.nbd_handshake_timeout_ms;
  s->nbd_ = std::make_unique<nbd::Server>(&s->exports_, nbd_limits, cfg.nbd_limits, &s->nbd_authz_);
  OSR_ASSIGN_OR_RETURN(s->nbd_bound_, s->nbd_->AddListener(cfg.nbd_listen, nbd_options));
  Site* sp = s.get();
  std::shared_ptr<TlsContext> tls_server;
  if (cfg.tls.enabled()) {
    OSR_ASSIGN_OR_RETURN(tls_server, TlsContext::Create(cfg.tls, /*server=*/true));
    OSR_ASSIGN_OR_RETURN(s->tls_client_, TlsContext::Create(cfg.tls, /*server=*/false));
  } else {
    spdlog::warn(
        "site {}: no tls_ca/tls_cert/tls_key: replication runs unencrypted and "
        "unauthenticated{}",
        cfg.name,
        cfg.replication_insecure ? " (replication_insecure: also beyond this host)"
                                 : " (on loopback addresses only)");
  }
  if (cfg.commands.allow_api_commands) {
    spdlog::warn(
        "site {}: allow_api_commands: commands and qemu arguments given through the API run "
        "here with this daemon's rights (a lab setting)",
        cfg.name);
  }
  spdlog::info("site {}: {} command(s) and {} qemu argument set(s) in the commands file{}",
               cfg.name, cfg.commands.commands.size(), cfg.commands.qemu_args.size(),
               cfg.commands.file.empty() ? " (none configured)" : " " + cfg.commands.file);
  s->receiver_ = std::make_unique<replication::Receiver>(
      [sp](const std::string& vm) -> std::shared_ptr<store::RecoveryStore> {
        std::lock_guard lock(sp->mu_);
        auto it = sp->stores_.find(vm);
        return it == sp->stores_.end() ? nullptr : it->second;
      },
      tls_server, cfg.replication_insecure);
  OSR_ASSIGN_OR_RETURN(s->repl_bound_, s->receiver_->Listen(cfg.replication_listen));
  OSR_RETURN_IF_ERROR(s->Load());
  OSR_RETURN_IF_ERROR(s->nbd_->Start());
  s->receiver_->Start();
  s->watcher_ = std::thread([sp] {
    NameThisThread("osr-site-watch");
    sp->WatchLoop();
  });
  s->maintainer_ = std::thread([sp] {
    NameThisThread("osr-site-maint");
    sp->MaintenanceLoop();
  });
  return s;
}

Site::~Site() {
  Stop();
}

void Site::Stop() {
  if (!nbd_) return;
  {
    std::lock_guard lock(watch_mu_);
    watch_stop_ = true;
  }
  watch_cv_.notify_all();
  if (watcher_.joinable()) watcher_.join();
  // A compaction under way stops at its next chunk (nothing of it stays).
  {
    std::lock_guard lock(mu_);
    for (auto& [vm, st] : stores_) st->StopMaintenance();
  }
  {
    std::lock_guard lock(maint_mu_);
    maint_stop_ = true;
  }
  maint_cv_.notify_all();
  if (maintainer_.joinable()) maintainer_.join();
  // The VMs' disks go with the daemon: their VMs (production, failed over, drills) are
  // shut down first, while the disks still answer, so that a guest's last writes land.
  // All at once (each bounded by kVmShutdownOnStopMs), outside mu_.
  std::vector<std::shared_ptr<VmRunner>> runners;
  {
    std::lock_guard lock(mu_);
    for (auto& [vm, g] : groups_) runners.push_back(g->vm);
    for (auto& [id, v] : views_) runners.push_back(v.runner);
  }
  std::vector<std::thread> stoppers;
  for (auto& r : runners) {
    if (!r->snapshot().running()) continue;
    stoppers.emplace_back([r] { (void)r->Stop(kVmShutdownOnStopMs); });
  }
  for (auto& t : stoppers) t.join();
  nbd_->Stop();
  if (receiver_) receiver_->Stop();
  // The materialisers take mu_: stop and join them before taking it here.
  std::vector<Group*> all;
  {
    std::lock_guard lock(mu_);
    for (auto& [vm, g] : groups_) all.push_back(g.get());
  }
  for (Group* g : all) g->materialiser.Stop();
  std::lock_guard lock(mu_);
  // Views and disks leave the export table before what they read from goes.
  for (auto& e : exports_.List()) exports_.Remove(e->name);
  for (auto& [vm, g] : groups_) g->nbd_socket.clear();  // the server removed the sockets
  views_.clear();
  for (auto& [vm, g] : groups_) g->sender.reset();
  for (auto& [vm, g] : groups_) g->capture.reset();
  groups_.clear();
  {
    std::lock_guard retired(retired_mu_);
    retired_.clear();  // the NBD server has stopped: nothing holds their disks any more
  }
  stores_.clear();
  nbd_.reset();
}

std::string Site::DiskExport(const std::string& vm, const std::string& disk) {
  return "vm/" + vm + "/" + disk;
}

std::string Site::ViewExport(const std::string& view_id, const std::string& disk) {
  return "view/" + view_id + "/" + disk;
}

std::string Site::Uri(const std::string& export_name) const {
  // nbds: the listener takes TLS clients only (libnbd's scheme for TLS required).
  bool tls_only = cfg_.nbd_tls.enabled() && !cfg_.nbd_tls_optional;
  bool v6 = nbd_bound_.host.find(':') != std::string::npos;
  return fmt::format("{}://{}{}{}:{}/{}", tls_only ? "nbds" : "nbd", v6 ? "[" : "", nbd_bound_.host,
                     v6 ? "]" : "", nbd_bound_.port, export_name);
}

std::string Site::LocalUri(const std::string& vm, const Group& g, const std::string& disk) const {
  if (g.nbd_socket.empty()) return Uri(DiskExport(vm, disk));
  return fmt::format("nbd+unix:///{}?socket={}", DiskExport(vm, disk), g.nbd_socket);
}

std::string Site::VmSocketPath(const std::string& vm) const {
  return cfg_.data_dir + "/groups/" + vm + "/run/nbd.sock";
}

void Site::OpenVmSocketLocked(const std::string& vm, Group& g) {
  std::string path = VmSocketPath(vm);
  std::string run = fs::path(path).parent_path().string();
  std::error_code ec;
  fs::create_directories(run, ec);
  // Only the daemon's user may reach the socket: its folders are 0700 (the socket 0600).
  if (ec || ::chmod(run.c_str(), 0700) != 0 ||
      ::chmod(fs::path(run).parent_path().c_str(), 0700) != 0) {
    spdlog::warn("site {}: VM {}: cannot make {} private ({}): no local NBD socket", cfg_.name, vm,
                 run, ec ? ec.message() : std::strerror(errno));
    return;
  }
  nbd::ListenerOptions o;
  o.local_vm = vm;
  ListenAddress a;
  a.kind = ListenAddress::Kind::kUnix;
  a.path = path;
  auto bound = nbd_->AddListener(a, o);
  if (!bound.ok()) {
    spdlog::warn("site {}: VM {}: no local NBD socket, its VM will use TCP: {}", cfg_.name, vm,
                 bound.status().ToString());
    return;
  }
  g.nbd_socket = path;
}

Status Site::CloseGroupExports(const std::string& vm, Group& g) {
  if (!g.nbd_socket.empty()) {
    Status st = nbd_->RemoveUnixListener(g.nbd_socket);
    if (!st.ok()) spdlog::warn("site {}: VM {}: {}", cfg_.name, vm, st.ToString());
    g.nbd_socket.clear();
  }
  Status result;
  for (auto& d : g.disks) {
    std::shared_ptr<const nbd::Export> e = exports_.Remove(DiskExport(vm, d.name));
    Status ended = nbd_->DisconnectExport(e);
    if (!ended.ok() && result.ok()) result = ended;
  }
  return result;
}

void Site::FreeGroup(const std::string& vm, std::unique_ptr<Group> g) {
  if (g->capture) {
    if (Status closed = CloseGroupExports(vm, *g); !closed.ok()) {
      RetireCapture(vm, std::move(g->capture), closed);
    }
  }
  g.reset();
}

void Site::RetireCapture(const std::string& vm, std::unique_ptr<capture::CaptureGroup> capture,
                         const Status& why) {
  // An NBD client still holds one of its disks past every bound (a disk stuck in I/O): the
  // disk borrows the capture group, so the group must outlive it. It stays, fenced (it
  // takes no more writes), until the site stops.
  spdlog::error("site {}: VM {}: its disks stay in memory until the daemon stops: {}", cfg_.name,
                vm, why.ToString());
  if (Status fenced = capture->Fence(store::kEpochMax); !fenced.ok()) {
    spdlog::error("site {}: VM {}: {}", cfg_.name, vm, fenced.ToString());
  }
  std::lock_guard lock(retired_mu_);
  retired_.push_back(std::move(capture));
}

std::string_view DamageKindName(DamageKind kind) {
  switch (kind) {
    case DamageKind::kStateEntry:
      return "state_entry";
    case DamageKind::kImageMissing:
      return "image_missing";
    case DamageKind::kImageSize:
      return "image_size";
    case DamageKind::kImage:
      return "image";
    case DamageKind::kCaptureHistory:
      return "capture_history";
    case DamageKind::kRegionMap:
      return "region_map";
    case DamageKind::kStoreMissing:
      return "store_missing";
    case DamageKind::kStore:
      return "store";
    case DamageKind::kImageChanged:
      return "image_changed";
  }
  return "unknown";
}

json Damage::Json() const {
  return json{{"kind", std::string(DamageKindName(kind))}, {"reason", reason}, {"action", action}};
}

// A site state's parts, or kCorruption naming what is wrong.
struct SiteState {
  json doc;
  const json* groups = nullptr;
  const json* stores = nullptr;
};
Result<SiteState> ParseSiteState(const std::string& text, const std::string& path) {
  SiteState out;
  auto j = json_in::ParseObject(text, path);
  if (!j.ok()) return Corruption(path + " is not a site state: " + j.status().message());
  out.doc = std::move(*j);
  json_in::Fields f(out.doc, path + ": ");
  uint64_t version = f.U64("version", 0);
  out.groups = f.Object("groups");
  out.stores = f.Object("stores");
  if (!f.ok()) return Corruption(f.status().message());
  if (version != kStateVersion) return Corruption(path + " is not a version-1 site state");
  return out;
}

json Site::EntryFromFolder(const std::string& vm, const std::string& why) const {
  // The copy each save keeps beside the VM's files (SaveEntriesLocked).
  std::string path = cfg_.data_dir + "/groups/" + vm + "/entry.json";
  std::error_code ec;
  if (fs::exists(path, ec)) {
    auto text = ReadSmallFile(path, 16u << 20);
    auto j = text.ok() ? json_in::ParseObject(*text, path) : Result<json>(text.status());
    if (j.ok()) {
      spdlog::warn("site {}: VM {}: {}; its entry is taken from {}", cfg_.name, vm, why, path);
      return std::move(*j);
    }
    return json{{"lost_state", why + "; and " + j.status().message()}};
  }
  return json{{"lost_state", why + "; and it has no entry.json of its own"}};
}

std::vector<std::string> Site::FolderNames(const std::string& under) const {
  std::vector<std::string> out;
  std::error_code ec;
  for (auto& e : fs::directory_iterator(fs::path(cfg_.data_dir) / under, ec)) {
    std::string name = e.path().filename().string();
    if (e.is_directory(ec) && ValidName(name)) out.push_back(name);
  }
  std::sort(out.begin(), out.end());
  return out;
}

Status Site::Load() {
  std::string path = cfg_.data_dir + "/site.json";
  std::string prev = path + ".prev";
  std::error_code ec;
  std::optional<std::string> lost;  // why the state is rebuilt from the folders
  if (!fs::exists(path, ec) && !fs::exists(prev, ec)) {
    if (FolderNames("groups").empty() && FolderNames("stores").empty()) {
      return Status::Ok();  // a new site
    }
    lost = "site.json and site.json.prev are missing";
  }
  // site.json names the groups and stores: it is only ever replaced whole
  // (WriteFileAtomic), and the state before the last change is kept in site.json.prev.
  // A damaged site.json is set aside and the site starts from the previous state (a
  // change made just before may be missing from it: the log says so).
  auto text = lost ? Result<std::string>(NotFound(*lost)) : ReadSmallFile(path, 256u << 20);
  Result<SiteState> state =
      text.ok() ? ParseSiteState(*text, path) : Result<SiteState>(text.status());
  std::string loaded = text.ok() ? *text : std::string();
  if (!state.ok() && !lost) {
    auto prev_text = ReadSmallFile(prev, 256u << 20);
    Result<SiteState> older =
        prev_text.ok() ? ParseSiteState(*prev_text, prev) : Result<SiteState>(prev_text.status());
    if (!older.ok()) {
      // Neither says what this site holds: every VM and store found under data_dir is
      // quarantined (the files are untouched) until site.json comes back from a backup.
      lost =
          fmt::format("{} (and {}: {})", state.status().message(), prev, older.status().message());
      for (const std::string& f : {path, prev}) {
        std::string aside = fmt::format("{}.damaged-{}", f, ::time(nullptr));
        fs::rename(f, aside, ec);
        spdlog::error("site {}: {} is kept as {}", cfg_.name, f, aside);
      }
    }
  }
  if (lost) {
    spdlog::error(
        "site {}: {}: every VM under {}/groups is quarantined until site.json is restored from "
        "a backup; stores are opened from their own files",
        cfg_.name, *lost, cfg_.data_dir);
    json groups = json::object(), stores = json::object();
    for (const auto& vm : FolderNames("groups")) groups[vm] = EntryFromFolder(vm, *lost);
    for (const auto& vm : FolderNames("stores")) stores[vm] = json::object();
    loaded = json{{"version", kStateVersion}, {"groups", groups}, {"stores", stores}}.dump();
    state = ParseSiteState(loaded, path);
    if (!state.ok()) return state.status();
  } else if (!state.ok()) {
    auto prev_text = ReadSmallFile(prev, 256u << 20);
    Result<SiteState> older =
        prev_text.ok() ? ParseSiteState(*prev_text, prev) : Result<SiteState>(prev_text.status());
    std::string aside = fmt::format("{}.damaged-{}", path, ::time(nullptr));
    fs::rename(path, aside, ec);
    spdlog::error(
        "site {}: {}; it is kept as {} and the site starts from {} (the state before "
        "the last change: check the VMs and stores this site lists)",
        cfg_.name, state.status().message(), aside, prev);
    state = std::move(older);
    loaded = *prev_text;
  }
  last_saved_ = loaded;
  json_in::Fields f(state->doc, path + ": ");
  const json* groups = state->groups;
  const json* stores = state->stores;
  // Folders the state does not name (site.json put back from an older backup): taken
  // from their own entry.json, else quarantined; stores open from their own files.
  json extra_groups = json::object(), extra_stores = json::object();
  for (const auto& vm : FolderNames("groups")) {
    if (groups == nullptr || !groups->contains(vm)) {
      extra_groups[vm] = EntryFromFolder(vm,
                                         "site.json does not name this VM (was it put back "
                                         "from an older backup?)");
    }
  }
  for (const auto& vm : FolderNames("stores")) {
    if (stores == nullptr || !stores->contains(vm)) extra_stores[vm] = json::object();
  }
  std::lock_guard lock(mu_);
  if (stores != nullptr) LoadStoresLocked(*stores);
  LoadStoresLocked(extra_stores);
  for (const json* set : {groups, static_cast<const json*>(&extra_groups)}) {
    if (set == nullptr) continue;
    for (auto& [vm, entry] : set->items()) {
      if (groups_.count(vm)) continue;
      if (auto g = LoadGroupLocked(vm, entry)) groups_[vm] = std::move(g);
    }
  }
  next_view_ = std::max<uint64_t>(1, f.U64("next_view", 1));
  const json* views = f.Object("views");
  LoadViewsLocked(views != nullptr ? *views : json::object());
  size_t damaged = damaged_stores_.size();
  for (auto& [vm, g] : groups_) damaged += g->damage ? 1 : 0;
  spdlog::info("site {}: {} group(s), {} store(s), {} quarantined", cfg_.name, groups_.size(),
               stores_.size() + damaged_stores_.size(), damaged);
  return SaveLocked();
}

std::string Site::OverlayPath(const std::string& id, uint32_t disk) const {
  return fmt::format("{}/views/{}-{}.overlay", cfg_.data_dir, id, disk);
}

void Site::LoadViewsLocked(const json& views) {
  std::set<std::string> kept;
  for (auto& [id, entry] : views.items()) {
    json_in::Fields f(entry, "site.json view " + id + ".");
    View v;
    v.vm = f.String("vm", "");
    v.seq = f.U64("seq", 0);
    v.writable = f.Bool("writable", false);
    if (!f.ok() || !ValidName(id) || !ValidName(v.vm)) {
      spdlog::error("site {}: view {} in site.json is not one: dropped", cfg_.name, id);
      continue;
    }
    auto st = stores_.find(v.vm);
    if (st == stores_.end()) {
      v.lost = "its recovery store " + v.vm + " is " +
               (damaged_stores_.count(v.vm) ? "quarantined" : "gone");
    } else {
      auto opened = OpenViewLocked(id, v, /*reopen=*/v.writable);
      if (!opened.ok()) v.lost = opened.status().message();
    }
    if (!v.lost.empty()) {
      spdlog::error("site {}: view {} of {} at seq {} is lost: {}", cfg_.name, id, v.vm, v.seq,
                    v.lost);
    } else {
      spdlog::info("site {}: view {} of {} at seq {} is open again", cfg_.name, id, v.vm, v.seq);
    }
    kept.insert(id + "-");
    uint64_t n = 0;
    if (id.rfind("view-", 0) == 0 &&
        std::from_chars(id.data() + 5, id.data() + id.size(), n).ec == std::errc() &&
        n >= next_view_) {
      next_view_ = n + 1;  // ids are never reused
    }
    if (v.lost.empty()) AdoptDrillVmLocked(id, v, entry);
    views_[id] = std::move(v);
  }
  // Overlays that no view names (a view closed while the site was going down).
  std::error_code ec;
  for (auto& e : fs::directory_iterator(fs::path(cfg_.data_dir) / "views", ec)) {
    std::string name = e.path().filename().string();
    bool named = false;
    for (auto& prefix : kept) named = named || name.rfind(prefix, 0) == 0;
    if (!named) fs::remove(e.path(), ec);
  }
}

void Site::LoadStoresLocked(const json& stores) {
  for (auto& [vm, entry] : stores.items()) {
    if (!ValidName(vm)) {
      spdlog::error("site {}: site.json names a store '{}', which is not a VM name: ignored",
                    cfg_.name, vm);
      continue;
    }
    auto st = store::RecoveryStore::Open(cfg_.data_dir + "/stores/" + vm);
    if (st.ok()) {
      stores_[vm] = std::move(*st);
      continue;
    }
    Damage d = StoreDamage(vm, st.status());
    spdlog::error("site {}: the store of {} is quarantined: {}", cfg_.name, vm, d.reason);
    damaged_stores_[vm] = std::move(d);
  }
}

Damage Site::StoreDamage(const std::string& vm, const Status& st) const {
  return Damage{DamageKind::kStore, st.message(),
                fmt::format("this site keeps no recovery points of {} while its store is "
                            "damaged. Restore the files under {}/stores/{} and run osr vm repair "
                            "{} --site {}; or remove the store (osr unprotect {}) and protect {} "
                            "again (a new initial copy)",
                            vm, cfg_.data_dir, vm, vm, cfg_.name, vm, vm)};
}

std::unique_ptr<Site::Group> Site::LoadGroupLocked(const std::string& vm, const json& entry,
                                                   uint64_t first_seq, bool accept_changes) {
  auto g = std::make_unique<Group>();
  g->first_seq = first_seq;
  g->accept_changes = accept_changes;
  bool became_store = false;
  std::optional<OpenFailure> failed = OpenSavedGroupLocked(vm, entry, *g, &became_store);
  if (became_store) return nullptr;
  if (failed) {
    if (g->capture) {
      if (Status closed = CloseGroupExports(vm, *g); !closed.ok()) {
        RetireCapture(vm, std::move(g->capture), closed);
      }
    }
    g->capture.reset();
    g->damage = GroupDamage(vm, *g, *failed);
    g->saved = entry;
    spdlog::error("site {}: VM {} is quarantined ({}): {}", cfg_.name, vm,
                  DamageKindName(g->damage->kind), g->damage->reason);
    return g;
  }
  if (g->fenced_epoch != 0) {
    // Kept in site.json, not witnessed now: no fingerprint (one recorded at the fence stays).
    if (Status f = g->capture->Fence(g->fenced_epoch, /*record_fingerprint=*/false); !f.ok()) {
      spdlog::error("site {}: VM {}: {}", cfg_.name, vm, f.ToString());
    }
  } else if (!g->replicate_to.empty()) {
    if (Status s = StartSenderLocked(vm, *g); !s.ok()) {
      spdlog::error("site {}: VM {}: replication does not start: {}", cfg_.name, vm, s.ToString());
    }
  }
  AdoptVmLocked(vm, *g, static_cast<pid_t>(json_in::Fields(entry).I64("vm_pid", 0)));
  return g;
}

std::optional<Site::OpenFailure> Site::OpenSavedGroupLocked(const std::string& vm,
                                                            const json& entry, Group& g,
                                                            bool* became_store) {
  auto bad_entry = [&](const std::string& why) {
    return OpenFailure{DamageKind::kStateEntry,
                       Corruption("site.json entry of " + vm + ": " + why)};
  };
  if (!ValidName(vm)) return bad_entry("not a VM name");
  if (!entry.is_object()) return bad_entry("not an object");
  if (auto it = entry.find("lost_state"); it != entry.end() && it->is_string()) {
    return OpenFailure{DamageKind::kStateEntry, Corruption(it->get<std::string>())};
  }
  json_in::Fields f(entry, "");
  const json* disks = f.Array("disks", /*optional=*/false);
  g.replicate_to = f.String("replicate_to", "");
  g.target_site = f.String("target_site", "");
  g.epoch = f.U64("epoch", 1);
  g.compress = f.Bool("compress", true);
  g.bandwidth_bytes_per_second = f.U64("bandwidth_bytes_per_second", 0);
  g.fenced_epoch = f.U64("fenced_epoch", 0);
  g.failover = f.Bool("failover", false);
  g.failover_seq = f.U64("failover_seq", 0);
  g.tracking = f.Bool("tracking", false);
  g.history_lost = f.Bool("history_lost", false);
  if (const json* c = f.Object("disk_change", /*optional=*/true); c != nullptr && f.ok()) {
    json_in::Fields cf(*c, "disk_change.");
    DiskSpec d{cf.String("name"), cf.U64("size_bytes")};
    g.disk_change_adds = cf.Bool("added", false);
    if (!cf.ok()) return bad_entry(cf.status().message());
    g.disk_change = d;
  }
  if (!f.ok()) return bad_entry(f.status().message());
  auto parsed_disks = DisksFromJson(*disks);
  if (!parsed_disks.ok()) return bad_entry(parsed_disks.status().message());
  g.disks = std::move(*parsed_disks);
  if (auto it = entry.find("vm"); it != entry.end() && !it->is_null()) {
    auto parsed = hypervisor::ParseVmSpec(*it, hypervisor::SpecSource::kStored, "site.json vm.");
    if (parsed.ok()) {
      g.vm_spec = hypervisor::VmSpecJson(*parsed);
    } else {
      spdlog::warn("site {}: VM {}: its stored spec is dropped: {}", cfg_.name, vm,
                   parsed.status().message());
    }
  }
  std::string dir = cfg_.data_dir + "/groups/" + vm;
  std::error_code ec;
  std::string sdir = cfg_.data_dir + "/stores/" + vm;
  if (!g.failover && !fs::exists(sdir + "/store.json", ec)) {
    // A reprotect stopped while it moved the disks into a store: move them back.
    for (size_t i = 0; i < g.disks.size(); ++i) {
      std::string img = dir + "/" + g.disks[i].name + ".img";
      std::string moved = fmt::format("{}/base/{}.img", sdir, i);
      if (!fs::exists(img, ec) && fs::exists(moved, ec)) {
        spdlog::warn("site {}: VM {}: moving disk {} back from an unfinished store", cfg_.name, vm,
                     g.disks[i].name);
        fs::rename(moved, img, ec);
        if (ec) {
          return OpenFailure{DamageKind::kImageMissing,
                             Status::FromErrno(ec.value(), "move " + moved + " back to " + img)};
        }
      }
    }
  }
  if (!g.failover) {
    // Region maps of failover disks that were materialised before the last save.
    for (auto& d : g.disks) fs::remove(dir + "/" + d.name + ".img.cow", ec);
  }
  if (!g.failover && !fs::exists(dir + "/" + g.disks[0].name + ".img", ec) &&
      fs::exists(sdir + "/store.json", ec) && !stores_.count(vm)) {
    // A reprotect moved the disks into a store and stopped before saying so here.
    spdlog::warn("site {}: VM {}: its disks became a recovery store; finishing that", cfg_.name,
                 vm);
    auto st = store::RecoveryStore::Open(sdir);
    if (!st.ok()) return OpenFailure{DamageKind::kStore, st.status()};
    stores_[vm] = std::move(*st);
    damaged_stores_.erase(vm);
    fs::remove_all(dir, ec);
    *became_store = true;
    return std::nullopt;
  }
  if (!fs::exists(dir + "/capture", ec) && !g.history_lost && fs::exists(dir, ec)) {
    // Its changes since the last replication cannot be known any more: reprotect must
    // compare the disks instead of trusting an empty log.
    spdlog::warn("site {}: VM {}: the capture history is missing; it counts as lost", cfg_.name,
                 vm);
    g.history_lost = true;
  }
  DamageKind kind = DamageKind::kImage;
  if (Status st = OpenGroupLocked(vm, g, /*create=*/false, &kind); !st.ok()) {
    return OpenFailure{kind, st};
  }
  // A fence the sender applied by itself is in the capture's fence record only.
  g.fenced_epoch = std::max(g.fenced_epoch, g.capture->fenced_epoch());
  return std::nullopt;
}

Damage Site::GroupDamage(const std::string& vm, const Group& g, const OpenFailure& f) const {
  std::string dir = cfg_.data_dir + "/groups/" + vm;
  std::string repair = fmt::format("osr vm repair {} --site {}", vm, cfg_.name);
  Damage d{f.kind, f.status.message(), ""};
  switch (f.kind) {
    case DamageKind::kStateEntry:
      d.action =
          "put back " + dir + "/entry.json (or restore site.json from a backup) and run " + repair;
      break;
    case DamageKind::kImageMissing:
      d.action =
          g.fenced_epoch != 0 ? "nothing to keep here: the VM runs elsewhere. osr reprotect " + vm +
                                    " copies its disks here in full"
          : !g.replicate_to.empty()
              ? "put the image back where it was and run " + repair +
                    "; or, if it is lost, fail over to the recovery site (osr failover " + vm + ")"
              : "put the image back where it was and run " + repair +
                    " (the VM is not protected: no other site has its disks)";
      break;
    case DamageKind::kImageSize:
      d.action =
          "the image was resized outside osr, which does not resize disks. If it grew and "
          "the added bytes are zeros, " +
          repair +
          " --trim-image cuts it back and takes it as it is (nothing is lost; the disk is "
          "resent whole); otherwise restore its size by hand and run " +
          repair;
      break;
    case DamageKind::kImage:
      d.action = "fix what the reason names (permissions, the device) and run " + repair;
      break;
    case DamageKind::kCaptureHistory:
      d.action = repair + " --reset-history sets the history aside (" + dir +
                 "/damaged-TIME) and resends the disks whole to the recovery site; until then "
                 "the disks are not served";
      break;
    case DamageKind::kRegionMap:
      d.action = "the failed-over disks' map of what they hold is unreadable: restore " + dir +
                 "/*.img.cow and run " + repair +
                 ", or open the disks again at a recovery point (osr change-point " + vm +
                 " --point POINT: the writes made since the failover are lost)";
      break;
    case DamageKind::kStoreMissing:
      d.action =
          "the failed-over disks read their point from this site's recovery store, which "
          "is missing or damaged: repair the store first (" +
          repair + ")";
      break;
    case DamageKind::kStore:
      d.action = "repair the store (" + repair + ")";
      break;
    case DamageKind::kImageChanged:
      d.action = "the recovery site still holds the points from before. If the change was meant, " +
                 repair +
                 " --accept-changes resends the changed disks whole (the older points then go); if "
                 "not, fail over or drill to a point from before it (osr failover " +
                 vm + " --point ID)";
      break;
  }
  return d;
}

void Site::AdoptVmLocked(const std::string& vm, Group& g, pid_t pid) {
  // The VM outlived the daemon (kill -9): take charge of it again.
  hypervisor::VmSpec spec;  // a process, unless the stored spec says otherwise
  spec.driver = hypervisor::Driver::kProcess;
  if (g.vm_spec.is_object()) {
    auto parsed = hypervisor::ParseVmSpec(g.vm_spec, hypervisor::SpecSource::kStored, "vm.");
    if (parsed.ok() && parsed->driver == hypervisor::Driver::kQemu) spec = *parsed;
  }
  auto launch = LaunchFor(vm, g, spec, "");
  if (pid <= 0 || ::kill(pid, 0) != 0) {
    // It ended while the daemon was down: what it was plugged into goes.
    if (launch.ok()) DeleteTaps(launch->network.taps);
    return;
  }
  Status a = launch.ok() ? g.vm->Adopt(pid, *launch) : launch.status();
  if (!a.ok()) {
    spdlog::warn("site {}: VM {}: {}", cfg_.name, vm, a.ToString());
    if (launch.ok()) DeleteTaps(launch->network.taps);
    return;
  }
  spdlog::info("site {}: VM {} still runs (pid {})", cfg_.name, vm, pid);
}

json Site::DamagedGroupJson(const std::string& vm, const Group& g) const {
  json disks = json::array();
  for (auto& d : g.disks) disks.push_back({{"name", d.name}, {"size_bytes", d.size_bytes}});
  json out = {{"name", vm},
              {"disks", disks},
              {"damage", g.damage->Json()},
              {"vm", {{"running", false}, {"driver", "none"}, {"pid", 0}}}};
  out.update(ReplicationFields(g));
  return out;
}

// What a group's status says of its replication and failover role, live or quarantined.
json Site::ReplicationFields(const Group& g) {
  return json{
      {"fenced_epoch", g.fenced_epoch},  // recorded (kept across restarts)
      {"replicate_to", g.replicate_to}, {"target_site", g.target_site},   {"epoch", g.epoch},
      {"failover", g.failover},         {"failover_seq", g.failover_seq}, {"tracking", g.tracking},
      {"history_lost", g.history_lost}};
}

void Site::WakeWatcher() {
  {
    std::lock_guard lock(watch_mu_);
    watch_wake_ = true;
  }
  watch_cv_.notify_all();
}

void Site::WatchLoop() {
  constexpr auto kPeriod = std::chrono::seconds(1);
  for (;;) {
    {
      std::unique_lock lock(watch_mu_);
      watch_cv_.wait_for(lock, kPeriod, [&] { return watch_stop_ || watch_wake_; });
      if (watch_stop_) return;
      watch_wake_ = false;
    }
    try {
      WatchOnce();
    } catch (const std::exception& e) {  // a bug must not end the daemon
      spdlog::error("site {}: watcher: {}", cfg_.name, e.what());
    }
  }
}

void Site::WatchOnce() {
  std::vector<std::string> to_stop;
  // Every VM's runner and a name for it, whose console is kept bounded below.
  std::vector<std::pair<std::string, std::shared_ptr<VmRunner>>> runners;
  {
    std::lock_guard lock(mu_);
    for (auto& [vm, g] : groups_) runners.emplace_back("VM " + vm, g->vm);
    for (auto& [id, view] : views_) runners.emplace_back("drill VM of view " + id, view.runner);
    bool changed = false;
    for (auto& [vm, g] : groups_) {
      if (g->damage || !g->capture) continue;
      if (uint64_t fenced = g->capture->fenced_epoch(); fenced > g->fenced_epoch) {
        // The sender fenced the disks by itself (the recovery site refused its epoch).
        spdlog::warn(
            "site {}: VM {}: fenced at epoch {} (the recovery site failed it over); "
            "recorded",
            cfg_.name, vm, fenced);
        g->fenced_epoch = fenced;
        // The sender stopped by itself on the stale_epoch refusal (it never reconnects at
        // this epoch); it stays, so that GET /groups/{vm} shows why (stopped, last_error).
        changed = true;
      }
      if (g->fenced_epoch != 0 && VmRunningLocked(*g)) to_stop.push_back(vm);
    }
    if (changed) {
      if (Status st = SaveLocked(); !st.ok()) {
        spdlog::error(
            "site {}: cannot record a fence in site.json (the capture folder's fence "
            "record holds it): {}",
            cfg_.name, st.ToString());
      }
    }
  }
  for (auto& vm : to_stop) {
    spdlog::warn("site {}: VM {} runs on fenced disks (it runs elsewhere now): stopping it",
                 cfg_.name, vm);
    auto stopped = StopVm(vm, kVmStopTimeoutMs);
    if (!stopped.ok()) {
      spdlog::error("site {}: VM {}: stop: {}", cfg_.name, vm, stopped.status().ToString());
    }
  }
  for (auto& [what, runner] : runners) {
    auto cut = runner->BoundConsole(cfg_.console_log_bytes_max);
    if (!cut.ok()) {
      spdlog::warn("site {}: {}: console log: {}", cfg_.name, what, cut.status().ToString());
    } else if (*cut) {
      spdlog::info("site {}: {}: console log passed {} bytes: moved to {}.1", cfg_.name, what,
                   cfg_.console_log_bytes_max, runner->console_path());
    }
  }
}

// Cuts images that grew outside osr back to their disk's size when what they gained is
// all zeros (truncate -s bigger adds a hole). kFailedPrecondition when an image holds
// data past the disk's size, or is smaller than the disk.
Status Site::TrimGrownImagesLocked(const std::string& vm, const Group& g) {
  constexpr uint64_t kChunk = 1 << 20;
  std::vector<uint8_t> buf(kChunk);
  for (auto& d : g.disks) {
    std::string path = cfg_.data_dir + "/groups/" + vm + "/" + d.name + ".img";
    OSR_ASSIGN_OR_RETURN(File f, File::Open(path, File::Mode::kReadWrite));
    OSR_ASSIGN_OR_RETURN(uint64_t size, f.Size());
    if (size == d.size_bytes) continue;
    if (size < d.size_bytes) {
      return Status(Code::kFailedPrecondition,
                    fmt::format("{} has {} bytes, fewer than the disk's {}: restore it by hand",
                                path, size, d.size_bytes));
    }
    for (uint64_t pos = d.size_bytes; pos < size;) {
      OSR_ASSIGN_OR_RETURN(uint64_t data, f.SeekData(pos, size));
      if (data >= size) break;
      uint64_t n = std::min<uint64_t>(kChunk, size - data);
      OSR_RETURN_IF_ERROR(f.PRead(data, {buf.data(), n}));
      for (uint64_t i = 0; i < n; ++i) {
        if (buf[i] != 0) {
          return Status(Code::kFailedPrecondition,
                        fmt::format("{} holds data at byte {}, past the disk's {} bytes: osr does "
                                    "not resize disks; nothing was changed",
                                    path, data + i, d.size_bytes));
        }
      }
      pos = data + n;
    }
    OSR_RETURN_IF_ERROR(f.Truncate(d.size_bytes));
    OSR_RETURN_IF_ERROR(f.Sync());
    spdlog::warn("site {}: VM {}: {} cut back from {} to the disk's {} bytes (zeros only)",
                 cfg_.name, vm, path, size, d.size_bytes);
  }
  return Status::Ok();
}

Result<json> Site::RepairGroup(const std::string& vm, const RepairOptions& opts) {
  std::lock_guard lock(mu_);
  auto it = groups_.find(vm);
  if (it == groups_.end()) return NotFound("no VM " + vm + " at this site");
  Group& old = *it->second;
  if (!old.damage) {
    return InvalidArgument(
        fmt::format("VM {} at site {} is not quarantined: nothing to repair", vm, cfg_.name));
  }
  json entry = old.saved;
  std::string dir = cfg_.data_dir + "/groups/" + vm;
  if (old.damage->kind == DamageKind::kStateEntry) {
    entry = EntryFromFolder(vm, old.damage->reason);  // put back by the operator, perhaps
  }
  bool resend_all = false;
  if (opts.trim_image && old.damage->kind == DamageKind::kImageSize) {
    OSR_RETURN_IF_ERROR(TrimGrownImagesLocked(vm, old));
  }
  if (opts.reset_history && old.damage->kind == DamageKind::kCaptureHistory) {
    // Never deleted: the operator may want to look at it.
    std::string aside = fmt::format("{}/damaged-{}", dir, ::time(nullptr));
    std::error_code ec;
    fs::rename(dir + "/capture", aside, ec);
    if (ec) return Status::FromErrno(ec.value(), "move " + dir + "/capture aside");
    OSR_RETURN_IF_ERROR(SyncDir(dir));
    spdlog::warn("site {}: VM {}: its capture history is set aside in {}", cfg_.name, vm, aside);
    entry["history_lost"] = true;
    old.saved = entry;
    resend_all = true;
  }
  std::unique_ptr<Group> g =
      LoadGroupLocked(vm, entry, resend_all ? opts.first_seq : 1,
                      (opts.accept_changes && old.damage->kind == DamageKind::kImageChanged) ||
                          (opts.trim_image && old.damage->kind == DamageKind::kImageSize));
  if (!g) {  // its disks were a store all along
    groups_.erase(it);
    OSR_RETURN_IF_ERROR(SaveLocked());
    return json{{"name", vm}, {"repaired", true}, {"became_store", true}};
  }
  if (g->damage) {
    Damage d = *g->damage;
    it->second = std::move(g);
    OSR_RETURN_IF_ERROR(SaveLocked());
    return Status(Code::kFailedPrecondition,
                  fmt::format("VM {} at site {} is still quarantined: {} ({})", vm, cfg_.name,
                              d.reason, d.action));
  }
  if (resend_all) {
    // What the lost history held is unknown: every byte goes to the recovery site again.
    g->sender.reset();
    OSR_RETURN_IF_ERROR(g->capture->MarkRegions(g->capture->WholeDisks()));
    if (g->fenced_epoch == 0 && !g->replicate_to.empty()) {
      OSR_RETURN_IF_ERROR(StartSenderLocked(vm, *g));
    }
  }
  it->second = std::move(g);
  OSR_RETURN_IF_ERROR(SaveLocked());
  spdlog::info("site {}: VM {} is repaired and served again", cfg_.name, vm);
  return json{{"name", vm}, {"repaired", true}, {"history_lost", it->second->history_lost}};
}

Result<json> Site::RepairStore(const std::string& vm) {
  std::lock_guard lock(mu_);
  auto d = damaged_stores_.find(vm);
  if (d == damaged_stores_.end()) {
    if (stores_.count(vm)) {
      return InvalidArgument(fmt::format(
          "the store of {} at site {} is not quarantined: nothing to repair", vm, cfg_.name));
    }
    return NotFound("no store for " + vm + " at this site");
  }
  auto st = store::RecoveryStore::Open(cfg_.data_dir + "/stores/" + vm);
  if (!st.ok()) {
    d->second = StoreDamage(vm, st.status());
    return Status(Code::kFailedPrecondition,
                  fmt::format("the store of {} at site {} is still quarantined: {}", vm, cfg_.name,
                              d->second.reason));
  }
  stores_[vm] = std::move(*st);
  damaged_stores_.erase(d);
  // Failover disks over it can open now.
  if (auto g = groups_.find(vm); g != groups_.end() && g->second->damage &&
                                 g->second->damage->kind == DamageKind::kStoreMissing) {
    if (auto again = LoadGroupLocked(vm, g->second->saved)) g->second = std::move(again);
  }
  OSR_RETURN_IF_ERROR(SaveLocked());
  spdlog::info("site {}: the store of {} is repaired", cfg_.name, vm);
  return json{{"name", vm}, {"repaired", true}};
}

Status Site::MissingStore(const std::string& vm) const {
  if (auto d = damaged_stores_.find(vm); d != damaged_stores_.end()) {
    return Status(Code::kFailedPrecondition,
                  fmt::format("the store of {} at site {} is quarantined: {} ({})", vm, cfg_.name,
                              d->second.reason, d->second.action));
  }
  return NotFound("no store for " + vm + " at this site");
}

Status Site::Usable(GroupMap::const_iterator it, const std::string& vm) const {
  if (it == groups_.end()) return NotFound("no VM " + vm + " at this site");
  if (const auto& d = it->second->damage) {
    return Status(Code::kFailedPrecondition, fmt::format("VM {} is quarantined at site {}: {} ({})",
                                                         vm, cfg_.name, d->reason, d->action));
  }
  return Status::Ok();
}

void Site::SaveEntriesLocked(const json& groups) {
  for (auto it = entries_saved_.begin(); it != entries_saved_.end();) {
    it = groups.contains(it->first) ? std::next(it) : entries_saved_.erase(it);
  }
  for (auto& [vm, entry] : groups.items()) {
    auto g = groups_.find(vm);
    if (g == groups_.end() || g->second->damage || !entry.is_object()) continue;
    std::string text = entry.dump(1);
    if (entries_saved_[vm] == text) continue;
    std::string dir = cfg_.data_dir + "/groups/" + vm;
    std::error_code ec;
    if (!fs::is_directory(dir, ec)) continue;
    // A second record only: site.json stays the one read first, so a failure here is
    // said and the save goes on (the next change writes it again).
    Status st = WriteFileAtomic(dir + "/entry.json",
                                {reinterpret_cast<const uint8_t*>(text.data()), text.size()});
    if (!st.ok()) {
      spdlog::warn("site {}: VM {}: {}", cfg_.name, vm, st.ToString());
      entries_saved_.erase(vm);
      continue;
    }
    entries_saved_[vm] = std::move(text);
  }
}

Status Site::SaveLocked() {
  json groups = json::object();
  for (auto& [vm, g] : groups_) {
    if (g->damage) {
      groups[vm] = g->saved;  // as it was, until a repair or a delete
      continue;
    }
    groups[vm] = {{"disks", DisksJson(g->disks)},
                  {"replicate_to", g->replicate_to},
                  {"target_site", g->target_site},
                  {"epoch", g->epoch},
                  {"compress", g->compress},
                  {"bandwidth_bytes_per_second", g->bandwidth_bytes_per_second},
                  {"fenced_epoch", g->fenced_epoch},
                  {"failover", g->failover},
                  {"failover_seq", g->failover_seq},
                  {"tracking", g->tracking},
                  {"history_lost", g->history_lost},
                  {"vm", g->vm_spec},
                  {"vm_pid", g->vm->snapshot().pid},
                  {"disk_change", g->disk_change ? json{{"name", g->disk_change->name},
                                                        {"size_bytes", g->disk_change->size_bytes},
                                                        {"added", g->disk_change_adds}}
                                                 : json(nullptr)}};
  }
  SaveEntriesLocked(groups);
  json stores = json::object();
  for (auto& [vm, s] : stores_) stores[vm] = json::object();
  for (auto& [vm, d] : damaged_stores_) stores[vm] = json::object();
  json views = json::object();
  for (auto& [id, v] : views_) {
    views[id] = {{"vm", v.vm}, {"seq", v.seq}, {"writable", v.writable}};
    if (!v.vm_spec.is_null()) {
      views[id]["drill_vm"] = v.vm_spec;
      views[id]["drill_vm_pid"] = v.runner->snapshot().pid;
    }
  }
  std::string text =
      json{{"version", kStateVersion}, {"name", cfg_.name}, {"groups", groups},
           {"stores", stores},         {"views", views},    {"next_view", next_view_}}
          .dump(1);
  if (text == last_saved_) return Status::Ok();
  // The state before this change: what a damaged site.json falls back to.
  if (!last_saved_.empty()) {
    OSR_RETURN_IF_ERROR(WriteFileAtomic(
        cfg_.data_dir + "/site.json.prev",
        {reinterpret_cast<const uint8_t*>(last_saved_.data()), last_saved_.size()}));
  }
  OSR_RETURN_IF_ERROR(WriteFileAtomic(
      cfg_.data_dir + "/site.json", {reinterpret_cast<const uint8_t*>(text.data()), text.size()}));
  last_saved_ = std::move(text);
  return Status::Ok();
}

Status Site::OpenGroupLocked(const std::string& vm, Group& g, bool create,
                             DamageKind* failed_kind) {
  DamageKind unused;
  DamageKind& kind = failed_kind ? *failed_kind : unused;
  std::string dir = cfg_.data_dir + "/groups/" + vm;
  std::vector<std::unique_ptr<nbd::Disk>> images;
  g.failover_disks.clear();
  std::shared_ptr<store::RecoveryStore> st;  // each failover disk shares it
  if (g.failover) {
    auto it = stores_.find(vm);
    if (it == stores_.end()) {
      kind = DamageKind::kStoreMissing;
      return Corruption(
          fmt::format("VM {} runs on failover disks over its recovery store, which is {}", vm,
                      damaged_stores_.count(vm) ? "quarantined" : "gone"));
    }
    st = it->second;
  }
  std::error_code ec;
  // A disk change begun before a stop (ChangeGroupDisk): its image is made or grown to
  // what site.json says, and its record appended again below, before any export.
  std::optional<uint32_t> change_at;
  if (g.disk_change && !g.failover) {
    for (uint32_t i = 0; i < g.disks.size(); ++i) {
      if (g.disks[i].name == g.disk_change->name) change_at = i;
    }
    if (change_at) {
      std::string path = dir + "/" + g.disk_change->name + ".img";
      auto f = File::Open(path, File::Mode::kCreate);
      auto size = f.ok() ? f->Size() : Result<uint64_t>(f.status());
      Status grown = size.ok() ? Status::Ok() : size.status();
      if (grown.ok() && *size < g.disk_change->size_bytes) {
        grown = f->Truncate(g.disk_change->size_bytes);
        if (grown.ok()) grown = f->Sync();
      }
      if (!grown.ok()) {
        kind = DamageKind::kImage;
        return grown;
      }
    }
  }
  for (size_t i = 0; i < g.disks.size(); ++i) {
    std::string path = dir + "/" + g.disks[i].name + ".img";
    if (!create && !fs::exists(path, ec)) {
      kind = DamageKind::kImageMissing;
      return NotFound(fmt::format("the image of disk {} ({}) is missing", g.disks[i].name, path));
    }
    if (st != nullptr) {
      auto fd = store::FailoverDisk::Open(path, st, static_cast<uint32_t>(i), g.failover_seq,
                                          cfg_.region_bytes);
      if (!fd.ok()) {
        kind = DamageKind::kRegionMap;
        return fd.status();
      }
      g.failover_disks.push_back(fd->get());
      images.push_back(std::move(*fd));
      continue;
    }
    auto img = nbd::FileDisk::Open(path, false, create ? g.disks[i].size_bytes : 0);
    if (!img.ok()) {
      kind = DamageKind::kImage;
      return img.status();
    }
    if ((*img)->size() != g.disks[i].size_bytes) {
      kind = DamageKind::kImageSize;
      return Corruption(fmt::format("{} has {} bytes, not the disk's {}", path, (*img)->size(),
                                    g.disks[i].size_bytes));
    }
    images.push_back(std::move(*img));
  }
  capture::CaptureOptions co;
  co.dir = dir + "/capture";
  co.region_bytes = cfg_.region_bytes;
  co.epoch = g.epoch;
  co.log_bytes_max = cfg_.capture_log_bytes_max;
  co.tracking_only = g.tracking;
  co.first_seq = g.first_seq;
  // A fence records their fingerprint. Failover disks too: fenced only after commit made
  // their images whole (a failback), and a copy still under way changes the image's times,
  // which then only sends reprotect to compare hashes.
  for (auto& d : g.disks) co.image_paths.push_back(dir + "/" + d.name + ".img");
  co.accept_outside_changes = g.accept_changes;
  if (change_at && g.disk_change_adds) co.disk_being_added = *change_at;
  auto capture = capture::CaptureGroup::Open(std::move(images), co);
  if (!capture.ok()) {
    kind = capture.status().code() == Code::kFailedPrecondition ? DamageKind::kImageChanged
                                                                : DamageKind::kCaptureHistory;
    return capture.status();
  }
  g.capture = std::move(*capture);
  if (change_at) {
    // Again: the recovery site takes a second record of one change as nothing.
    auto seq =
        g.capture->RecordDiskSize(*change_at, g.disk_change->name, g.disk_change->size_bytes);
    if (seq.ok()) {
      spdlog::info("site {}: VM {}: the change of disk {} to {} bytes is finished (seq {})",
                   cfg_.name, vm, g.disk_change->name, g.disk_change->size_bytes, *seq);
      g.disk_change.reset();
    } else {
      spdlog::error(
          "site {}: VM {}: the change of disk {} is not in the capture log: {} (it is "
          "made again at the next start)",
          cfg_.name, vm, g.disk_change->name, seq.status().ToString());
    }
  }
  kind = DamageKind::kImage;  // exports: not a damage of the files
  return AddGroupExportsLocked(vm, g);
}

Status Site::AddGroupExportsLocked(const std::string& vm, Group& g) {
  std::vector<std::string> added;
  for (size_t i = 0; i < g.disks.size(); ++i) {
    std::string name = DiskExport(vm, g.disks[i].name);
    Status st =
        exports_.Add({name, fmt::format("{} disk {} at site {}", vm, g.disks[i].name, cfg_.name),
                      g.capture->disk(i), vm});
    if (!st.ok()) {
      for (auto& n : added) exports_.Remove(n);  // only what this call added
      return st;
    }
    added.push_back(name);
  }
  OpenVmSocketLocked(vm, g);
  return Status::Ok();
}

Status Site::StartSenderLocked(const std::string& vm, Group& g) {
  OSR_ASSIGN_OR_RETURN(ListenAddress target, ParseHostPort(g.replicate_to, 7481));
  replication::SenderOptions o;
  o.group = vm;
  o.target = target;
  o.target_site = g.target_site;
  o.plaintext_beyond_loopback = cfg_.replication_insecure;
  o.epoch = g.epoch;
  o.disks = StoreDisks(g.disks);
  o.tls = tls_client_;
  o.compress = g.compress;
  o.capture_group = g.capture.get();
  o.bandwidth_bytes_per_second = g.bandwidth_bytes_per_second;
  capture::CaptureGroup* cg = g.capture.get();
  uint64_t stale = g.epoch + 1;
  std::string name = cfg_.name;
  o.on_stale_epoch = [this, cg, stale, name, vm] {
    // Only the capture group here (no site lock on the sender's thread): its fence is
    // durable (the capture folder's fence record) before a write is refused. The site's
    // watcher records it in site.json and stops the VM.
    if (cg->fenced_epoch() == 0) {
      spdlog::warn("site {}: VM {}: the recovery site says it failed over: fencing its disks", name,
                   vm);
      if (Status f = cg->Fence(stale); !f.ok()) {
        spdlog::error("site {}: VM {}: {}", name, vm, f.ToString());
      }
      WakeWatcher();
    }
  };
  g.sender = std::make_unique<replication::Sender>(o, &g.capture->log());
  g.sender->Start();
  return Status::Ok();
}

Status Site::CheckDisks(const std::string& vm, const std::vector<DiskSpec>& disks) const {
  if (!ValidName(vm)) return InvalidArgument(fmt::format("'{}' is not a valid VM name", vm));
  if (disks.empty()) return InvalidArgument("a VM needs at least one disk");
  if (disks.size() > cfg_.disks_per_vm_max) {
    return InvalidArgument(fmt::format("a VM has at most {} disks", cfg_.disks_per_vm_max));
  }
  std::set<std::string> names;
  for (auto& d : disks) {
    if (!ValidName(d.name)) {
      return InvalidArgument(fmt::format("'{}' is not a valid disk name", d.name));
    }
    if (!names.insert(d.name).second) {
      return InvalidArgument(fmt::format("two disks are named '{}'", d.name));
    }
    if (d.size_bytes == 0 || d.size_bytes > cfg_.disk_bytes_max) {
      return InvalidArgument(
          fmt::format("disk {}: size must be 1..{} bytes", d.name, cfg_.disk_bytes_max));
    }
  }
  return Status::Ok();
}

Result<json> Site::ChangeGroupDisk(const std::string& vm, const std::string& disk,
                                   uint64_t size_bytes, std::optional<bool> add) {
  if (!ValidName(disk)) return InvalidArgument(fmt::format("'{}' is not a valid disk name", disk));
  if (size_bytes == 0 || size_bytes > cfg_.disk_bytes_max) {
    return InvalidArgument(
        fmt::format("disk {}: size must be 1..{} bytes", disk, cfg_.disk_bytes_max));
  }
  std::lock_guard lock(mu_);
  auto it = groups_.find(vm);
  if (it == groups_.end()) return NotFound("no VM " + vm + " at this site");
  Group& g = *it->second;
  auto refuse = [&](std::string_view why) {
    return Status(
        Code::kFailedPrecondition,
        fmt::format("the disks of VM {} at site {} cannot change now: {}", vm, cfg_.name, why));
  };
  if (g.damage) return refuse("it is quarantined (osr vm repair)");
  if (g.fenced_epoch != 0) return refuse("it is fenced: it runs at its recovery site");
  if (g.failover) return refuse("it runs on failover disks: commit first");
  if (g.tracking) return refuse("its changes are tracked for reprotect: reprotect first");
  if (!g.failover_disks.empty()) {
    return refuse(
        "its disks were copied by commit but are served as failover disks until the "
        "site restarts (systemctl restart, or stop and start osrd)");
  }
  if (g.disk_change) return refuse("a change of disk " + g.disk_change->name + " is unfinished");
  std::optional<uint32_t> at;
  for (uint32_t i = 0; i < g.disks.size(); ++i) {
    if (g.disks[i].name == disk) at = i;
  }
  if (add && *add && at) {
    return Status(Code::kAlreadyExists, fmt::format("VM {} has a disk named {} already", vm, disk));
  }
  if (add && !*add && !at) return NotFound(fmt::format("VM {} has no disk named {}", vm, disk));
  std::vector<DiskSpec> disks = g.disks;
  if (at) {
    if (size_bytes <= disks[*at].size_bytes) {
      return InvalidArgument(
          fmt::format("disk {} of VM {} has {} bytes: a disk only grows, not to {}", disk, vm,
                      disks[*at].size_bytes, size_bytes));
    }
    disks[*at].size_bytes = size_bytes;
  } else {
    if (disks.size() >= cfg_.disks_per_vm_max) {
      return InvalidArgument(fmt::format("a VM has at most {} disks", cfg_.disks_per_vm_max));
    }
    disks.push_back({disk, size_bytes});
  }
  const std::vector<DiskSpec> had = g.disks;
  const std::string dir = cfg_.data_dir + "/groups/" + vm;
  const std::string path = dir + "/" + disk + ".img";
  std::error_code ec;
  if (!at && fs::exists(path, ec)) {
    return Status(Code::kAlreadyExists,
                  path + " exists: a new disk starts from an image osr makes");
  }
  // site.json names the change first: a stop anywhere below leaves it to the next start.
  g.disks = disks;
  g.disk_change = DiskSpec{disk, size_bytes};
  g.disk_change_adds = !at.has_value();
  if (Status st = SaveLocked(); !st.ok()) {
    g.disks = had;
    g.disk_change.reset();
    return st;
  }
  // The HELLO states the new disks before the record can reach the recovery site.
  if (g.sender) g.sender->SetDisks(StoreDisks(g.disks));
  Result<uint64_t> seq = [&]() -> Result<uint64_t> {
    if (at) return g.capture->GrowDisk(*at, disk, size_bytes);
    OSR_ASSIGN_OR_RETURN(auto image, nbd::FileDisk::Open(path, false, size_bytes));
    return g.capture->AddDisk(std::move(image), path, disk);
  }();
  if (!seq.ok()) {
    // Nothing of the change is in the log (GrowDisk and AddDisk change nothing clients
    // see when they fail): back as it was; a grown image is cut back, a new one goes.
    g.disks = had;
    g.disk_change.reset();
    if (g.sender) g.sender->SetDisks(StoreDisks(g.disks));
    if (at) {
      auto f = File::Open(path, File::Mode::kReadWrite);
      Status cut = f.ok() ? f->Truncate(had[*at].size_bytes) : f.status();
      if (!cut.ok()) {
        // The next start finds the image larger than the disk and quarantines it (osr vm
        // repair --trim-image).
        spdlog::error("site {}: VM {}: image {} not cut back: {}", cfg_.name, vm, path,
                      cut.ToString());
      }
    } else {
      fs::remove(path, ec);
    }
    if (Status st = SaveLocked(); !st.ok()) {
      spdlog::error("site {}: VM {}: {}", cfg_.name, vm, st.ToString());
    }
    return seq.status();
  }
  if (!at) {
    uint32_t i = static_cast<uint32_t>(g.disks.size() - 1);
    std::string name = DiskExport(vm, disk);
    Status st = exports_.Add(
        {name, fmt::format("{} disk {} at site {}", vm, disk, cfg_.name), g.capture->disk(i), vm});
    if (!st.ok())
      spdlog::error("site {}: VM {}: no export for disk {}: {}", cfg_.name, vm, disk,
                    st.ToString());
  }
  g.disk_change.reset();
  OSR_RETURN_IF_ERROR(SaveLocked());
  auto vm_state = g.vm->snapshot().state;
  bool running = vm_state != VmRunner::State::kStopped;
  spdlog::info("site {}: VM {}: disk {} {} {} bytes at seq {}", cfg_.name, vm, disk,
               at ? "grows to" : "added with", size_bytes, *seq);
  json out = json::array();
  for (auto& d : g.disks) {
    out.push_back(
        {{"name", d.name}, {"size_bytes", d.size_bytes}, {"uri", Uri(DiskExport(vm, d.name))}});
  }
  return json{{"name", vm},  {"disk", disk}, {"added", !at.has_value()},
              {"seq", *seq}, {"disks", out}, {"restart_needed", running}};
}

Result<json> Site::CreateGroup(const std::string& vm, const std::vector<DiskSpec>& disks) {
  OSR_RETURN_IF_ERROR(CheckDisks(vm, disks));
  std::lock_guard lock(mu_);
  if (groups_.count(vm)) return Status(Code::kAlreadyExists, "VM " + vm + " exists at this site");
  std::error_code ec;
  fs::create_directories(cfg_.data_dir + "/groups/" + vm, ec);
  if (ec) return Status::FromErrno(ec.value(), "create group dir");
  auto g = std::make_unique<Group>();
  g->disks = disks;
  if (Status st = OpenGroupLocked(vm, *g, /*create=*/true); !st.ok()) {
    g.reset();                                            // OpenGroupLocked took back what it added
    fs::remove_all(cfg_.data_dir + "/groups/" + vm, ec);  // nothing half-done left behind
    return st;
  }
  groups_[vm] = std::move(g);
  OSR_RETURN_IF_ERROR(SaveLocked());
  json out = json::array();
  for (auto& d : disks)
    out.push_back(
        {{"name", d.name}, {"size_bytes", d.size_bytes}, {"uri", Uri(DiskExport(vm, d.name))}});
  return json{{"name", vm}, {"disks", out}};
}

Status Site::DeleteGroup(const std::string& vm) {
  std::unique_ptr<Group> g;
  {
    std::lock_guard lock(mu_);
    auto it = groups_.find(vm);
    if (it == groups_.end()) return NotFound("no VM " + vm + " at this site");
    g = std::move(it->second);
    groups_.erase(it);
    OSR_RETURN_IF_ERROR(SaveLocked());
  }
  g->materialiser.Stop();
  (void)g->vm->Stop(5000);
  g->sender.reset();
  FreeGroup(vm, std::move(g));
  std::error_code ec;
  fs::remove_all(cfg_.data_dir + "/groups/" + vm, ec);
  return Status::Ok();
}

Status Site::StartReplication(const std::string& vm, const std::string& target, uint64_t epoch,
                              bool compress, uint64_t bandwidth_bytes_per_second,
                              const std::string& target_site) {
  OSR_ASSIGN_OR_RETURN(ListenAddress addr, ParseHostPort(target, 7481));
  if (!tls_client_ && !cfg_.replication_insecure && !IsLoopback(addr)) {
    return Status(Code::kPermissionDenied,
                  fmt::format("site {} has no TLS: it replicates to loopback addresses only, "
                              "not to '{}' (give it tls_ca, tls_cert and tls_key, or set "
                              "replication_insecure = true)",
                              cfg_.name, target));
  }
  if (epoch < 1 || epoch > store::kEpochMax) {
    return InvalidArgument(
        fmt::format("epoch {} is out of range (1..{})", epoch, store::kEpochMax));
  }
  if (!target_site.empty() && !ValidName(target_site)) {
    return InvalidArgument("'" + target_site + "' is not a site name");
  }
  std::lock_guard lock(mu_);
  auto it = groups_.find(vm);
  if (Status u = Usable(it, vm); !u.ok()) return u;
  Group& g = *it->second;
  g.sender.reset();
  g.replicate_to = target;
  g.target_site = target_site;
  g.epoch = epoch;
  // A failed-over VM's tracking ends here: the sender resyncs what the bitmaps hold and
  // then ships records (after a restart too: the marks are sticky).
  g.tracking = false;
  g.compress = compress;
  g.bandwidth_bytes_per_second = bandwidth_bytes_per_second;
  OSR_RETURN_IF_ERROR(StartSenderLocked(vm, g));
  return SaveLocked();
}

Status Site::FenceGroup(const std::string& vm, uint64_t epoch, bool keep_shipping) {
  std::lock_guard lock(mu_);
  auto it = groups_.find(vm);
  if (it == groups_.end()) return NotFound("no VM " + vm + " at this site");
  Group& g = *it->second;
  if (epoch == g.fenced_epoch) {
    if (keep_shipping || !g.sender) return Status::Ok();
    // A sender still shipping after the fence (a planned failover drains) changed the log
    // and bitmaps since the fingerprint: it is recorded again now that nothing moves
    // (without one, reprotect compares block hashes). One that stopped at the fence, on
    // a stale_epoch refusal, changed nothing: the fingerprint of that fence stands.
    bool shipped_on = !g.sender->stats().stopped && !g.damage;
    g.sender.reset();
    if (shipped_on) {
      if (Status fp = g.capture->RecordFenceFingerprint(); !fp.ok()) {
        spdlog::error(
            "site {}: VM {}: no fence fingerprint (reprotect will compare block hashes): {}",
            cfg_.name, vm, fp.ToString());
      }
    }
    return Status::Ok();
  }
  if (epoch <= g.epoch || epoch < g.fenced_epoch) {
    return InvalidArgument(
        fmt::format("fencing needs an epoch above the VM's {}", std::max(g.epoch, g.fenced_epoch)));
  }
  if (g.damage) {
    // Nothing of it is served; the fence is recorded for when it is repaired.
    g.saved["fenced_epoch"] = epoch;
    g.fenced_epoch = epoch;
    return SaveLocked();
  }
  if (!keep_shipping) g.sender.reset();
  Status fenced = g.capture->Fence(epoch);  // durable in the capture folder
  g.fenced_epoch = epoch;
  Status saved = SaveLocked();
  return fenced.ok() ? saved : fenced;
}

Status Site::StopReplication(const std::string& vm) {
  std::lock_guard lock(mu_);
  auto it = groups_.find(vm);
  if (Status u = Usable(it, vm); !u.ok()) return u;
  it->second->sender.reset();
  it->second->replicate_to.clear();
  return SaveLocked();
}

namespace {

// The file system under `dir`: {"free_bytes", "total_bytes"}, or null when statvfs fails.
json SpaceJson(const std::string& dir) {
  auto space = FileSystemSpace(dir);
  if (!space.ok()) return nullptr;
  return {{"free_bytes", space->free_bytes}, {"total_bytes", space->total_bytes}};
}

json WriteFailureJson(const store::RecoveryStore::WriteFailure& f) {
  return {{"what", f.what},
          {"code", f.status.code() == Code::kNoSpace ? "no_space" : "io_error"},
          {"message", f.status.message()},
          {"bytes_needed", f.bytes_needed},
          {"since_ns", f.since_ns},
          {"count", f.count}};
}

}  // namespace

Result<json> Site::GroupStatus(const std::string& vm) {
  std::lock_guard lock(mu_);
  auto it = groups_.find(vm);
  if (it == groups_.end()) return NotFound("no VM " + vm + " at this site");
  Group& g = *it->second;
  if (g.damage) return DamagedGroupJson(vm, g);
  json disks = json::array();
  for (size_t i = 0; i < g.disks.size(); ++i) {
    uint64_t dirty = 0;
    for (auto& r : g.capture->bitmap(i).DirtyRanges()) dirty += r.length;
    // What the image takes on disk now (a sparse image: its written blocks), for the
    // recovery site's space check before protection.
    struct stat st {};
    std::string img = cfg_.data_dir + "/groups/" + vm + "/" + g.disks[i].name + ".img";
    uint64_t allocated =
        ::stat(img.c_str(), &st) == 0 ? static_cast<uint64_t>(st.st_blocks) * 512 : 0;
    disks.push_back({{"name", g.disks[i].name},
                     {"size_bytes", g.disks[i].size_bytes},
                     {"allocated_bytes", allocated},
                     {"uri", Uri(DiskExport(vm, g.disks[i].name))},
                     {"dirty_bytes", dirty}});
  }
  json out = {{"name", vm},
              {"disks", disks},
              {"last_seq", g.capture->log().last_seq()},
              {"capture_overflowed", g.capture->log().overflowed()},
              {"capture_fenced_epoch", g.capture->fenced_epoch()},  // in force now
              {"capture_log_bytes", g.capture->log().held_bytes()}};
  if (auto changed = g.capture->changed_outside(); !changed.empty()) {
    out["changed_outside"] = changed;
  }
  if (auto cut = g.capture->log().pending_cut()) {
    out["capture_log_cut"] = {{"after_seq", cut->after_seq},
                              {"seq_bound", cut->seq_bound},
                              {"time", FormatTimeNs(cut->time_ns)},
                              {"reason", cut->reason}};
  }
  out.update(ReplicationFields(g));
  if (auto m = g.materialiser.snapshot(); m.state != Materialiser::State::kIdle) {
    out["materialise"] = {{"state", Materialiser::StateName(m.state)},
                          {"done_bytes", m.done_bytes},
                          {"total_bytes", m.total_bytes},
                          {"error", m.error}};
  }
  if (Status we = g.capture->log().write_error(); !we.ok()) {
    // The capture log dropped records (a full file system): the bitmap keeps their regions.
    out["capture_write_error"] = {{"code", we.code() == Code::kNoSpace ? "no_space" : "io_error"},
                                  {"message", we.message()}};
    if (json space = SpaceJson(g.capture->log().dir()); !space.is_null()) {
      out["capture_write_error"]["space"] = space;
    }
  }
  VmRunner::Snapshot vm_now = g.vm->Refresh();
  out["vm"] = {{"running", vm_now.running()},
               {"state", VmRunner::StateName(vm_now.state)},
               {"driver", g.vm_spec.is_object() ? g.vm_spec.value("driver", "none") : "none"},
               {"pid", vm_now.pid}};
  if (g.sender) {
    auto st = g.sender->stats();
    out["replication"] = {{"connected", st.connected},
                          {"acked_seq", st.acked_seq},
                          {"sent_seq", st.sent_seq},
                          {"bytes_sent", st.bytes_sent},
                          {"wire_bytes_sent", st.wire_bytes_sent},
                          {"reconnects", st.reconnects},
                          {"stopped", st.stopped},
                          {"reconnect_delay_ms", st.reconnect_delay_ms},
                          {"resync_required", st.resync_required},
                          {"resyncing", st.resyncing},
                          {"resync_bytes_total", st.resync_bytes_total},
                          {"resync_bytes_done", st.resync_bytes_done},
                          {"resync_bytes_resumed", st.resync_bytes_resumed},
                          {"resyncs_completed", st.resyncs_completed},
                          {"resyncs_resumed", st.resyncs_resumed},
                          {"last_error", st.last_error},
                          {"last_error_code", st.last_error_code}};
  }
  return out;
}

Status Site::CreateStore(const std::string& vm, const std::vector<DiskSpec>& disks,
                         store::RecoveryStore::Start start, const store::StoreOrigin& origin) {
  OSR_RETURN_IF_ERROR(CheckDisks(vm, disks));
  std::lock_guard lock(mu_);
  if (stores_.count(vm)) return Status(Code::kAlreadyExists, "a store for " + vm + " exists");
  if (auto d = damaged_stores_.find(vm); d != damaged_stores_.end()) {
    return Status(Code::kFailedPrecondition,
                  fmt::format("the store of {} at site {} is quarantined: {} ({})", vm, cfg_.name,
                              d->second.reason, d->second.action));
  }
  std::string dir = cfg_.data_dir + "/stores/" + vm;
  auto st = store::RecoveryStore::Create(dir, StoreDisks(disks), 0, start, {}, origin);
  if (!st.ok()) {
    std::error_code ec;
    if (st.status().code() != Code::kAlreadyExists) fs::remove_all(dir, ec);
    return st.status();
  }
  stores_[vm] = std::move(*st);
  return SaveLocked();
}

Status Site::StoreInUseLocked(const std::string& vm) const {
  for (auto& [id, v] : views_) {
    if (v.vm == vm) return Status(Code::kAlreadyExists, "close the views of " + vm + " first");
  }
  if (auto g = groups_.find(vm); g != groups_.end() && g->second->failover) {
    return Status(Code::kAlreadyExists, "VM " + vm +
                                            " runs on failover disks over this store; "
                                            "commit (materialise) them first");
  }
  return Status::Ok();
}

Status Site::DeleteStore(const std::string& vm) {
  std::shared_ptr<store::RecoveryStore> s;
  {
    std::lock_guard lock(mu_);
    if (damaged_stores_.count(vm)) {
      // Nothing of it is open: its files go (after site.json stops naming it).
      damaged_stores_.erase(vm);
      OSR_RETURN_IF_ERROR(SaveLocked());
      std::error_code ec;
      fs::remove_all(cfg_.data_dir + "/stores/" + vm, ec);
      if (ec) return Status::FromErrno(ec.value(), "remove the store of " + vm);
      return Status::Ok();
    }
    auto it = stores_.find(vm);
    if (it == stores_.end()) return MissingStore(vm);
    OSR_RETURN_IF_ERROR(StoreInUseLocked(vm));
    s = it->second;
  }
  // A view closed a moment ago (CloseView on another thread) may still be letting go of
  // its pin: wait for it, bounded, rather than delete what it reads.
  if (!s->WaitUnpinned(std::chrono::milliseconds(kStorePinsWaitMs))) {
    return Unavailable(fmt::format(
        "the recovery store of {} is still pinned at {} point(s) by views or failover disks "
        "that NBD clients have not let go of after {} ms; try again once they have",
        vm, s->pin_count(), kStorePinsWaitMs));
  }
  {
    std::lock_guard lock(mu_);
    auto it = stores_.find(vm);
    if (it == stores_.end() || it->second != s) return MissingStore(vm);  // deleted meanwhile
    OSR_RETURN_IF_ERROR(StoreInUseLocked(vm));                            // a view opened meanwhile
    // Pins are taken under mu_ only (OpenView, OpenGroupLocked): none can come now.
    if (size_t pins = s->pin_count(); pins != 0) {
      return Unavailable(
          fmt::format("the recovery store of {} was pinned again ({} pin(s))", vm, pins));
    }
    stores_.erase(it);
    OSR_RETURN_IF_ERROR(SaveLocked());
    // A compaction under way stops at its next extent; one queued never starts.
    s->StopMaintenance();
    std::lock_guard maint(maint_mu_);
    compactions_.erase(vm);
  }
  {
    // Its files go only once the maintenance thread has left it (it stops within one
    // extent's read and write; a slow disk is waited for, not deleted under).
    std::unique_lock maint(maint_mu_);
    while (!maint_cv_.wait_for(maint, std::chrono::seconds(10),
                               [&] { return maint_running_ != s.get(); })) {
      spdlog::warn("site {}: waiting for the compaction of {} to stop before its files go",
                   cfg_.name, vm);
    }
  }
  receiver_->EndGroup(vm);
  // Other holders (the receiver's session just ended, a fold in progress) let go soon.
  // Memory is safe either way (the last holder frees the store); the files are removed
  // once they have, unless that takes too long: an open file outlives its name.
  for (int i = 0; i < kStorePinsWaitMs / 10 && s.use_count() > 1; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (s.use_count() > 1) {
    spdlog::warn("site {}: the store of {} is still held by {} user(s); removing its files now",
                 cfg_.name, vm, s.use_count() - 1);
  }
  std::string dir = s->dir();
  s.reset();
  std::error_code ec;
  fs::remove_all(dir, ec);
  return Status::Ok();
}

Result<json> Site::FoldStore(const std::string& vm, uint64_t seq) {
  std::shared_ptr<store::RecoveryStore> s;
  {
    std::lock_guard lock(mu_);
    auto it = stores_.find(vm);
    if (it == stores_.end()) return MissingStore(vm);
    s = it->second;
  }
  OSR_ASSIGN_OR_RETURN(uint64_t base, s->TryFold(seq));  // never waits minutes for a compaction
  return json{{"name", vm}, {"base_seq", base}};
}

namespace {
int64_t WallNowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}
}  // namespace

Result<json> Site::CompactStore(const std::string& vm, std::vector<uint64_t> keep,
                                uint64_t through) {
  std::lock_guard lock(mu_);
  auto it = stores_.find(vm);
  if (it == stores_.end()) return MissingStore(vm);
  // What is wrong now is answered now (the run checks again: views may open meanwhile).
  OSR_RETURN_IF_ERROR(it->second->CheckCompaction(keep, through));
  std::lock_guard maint(maint_mu_);
  if (maint_stop_) return Unavailable("site " + cfg_.name + " is stopping");
  auto c = compactions_.find(vm);
  if (c != compactions_.end() && c->second.state == Compaction::State::kRunning) {
    c->second.next = std::pair(std::move(keep), through);
  } else if (c != compactions_.end() && c->second.state == Compaction::State::kQueued) {
    c->second.keep = std::move(keep);
    c->second.through = through;
    c->second.asked_ns = WallNowNs();
  } else {
    Compaction fresh;
    fresh.store = it->second;
    fresh.keep = std::move(keep);
    fresh.through = through;
    fresh.asked_ns = WallNowNs();
    c = compactions_.insert_or_assign(vm, std::move(fresh)).first;
    maint_queue_.push_back(vm);
    maint_cv_.notify_all();
  }
  return json{{"name", vm}, {"compaction", CompactionJson(c->second)}};
}

json Site::CompactionJson(const Compaction& c) {
  static constexpr const char* kStates[] = {"queued", "running", "done", "failed"};
  json out{{"state", kStates[static_cast<int>(c.state)]},
           {"through", c.through},
           {"kept_points_asked", c.keep.size()},
           {"asked", FormatTimeNs(c.asked_ns)}};
  if (c.started_ns) out["started"] = FormatTimeNs(c.started_ns);
  if (c.finished_ns) {
    out["finished"] = FormatTimeNs(c.finished_ns);
    out["seconds"] = static_cast<double>(c.finished_ns - c.started_ns) / 1e9;
  }
  if (c.state == Compaction::State::kDone) out["result"] = c.result;
  if (c.state == Compaction::State::kFailed) out["error"] = c.error;
  if (c.next) out["next_through"] = c.next->second;
  return out;
}

void Site::MaintenanceLoop() {
  std::unique_lock lock(maint_mu_);
  for (;;) {
    maint_cv_.wait(lock, [&] { return maint_stop_ || !maint_queue_.empty(); });
    if (maint_stop_) return;
    std::string vm = maint_queue_.front();
    maint_queue_.pop_front();
    auto c = compactions_.find(vm);
    if (c == compactions_.end() || c->second.state != Compaction::State::kQueued) continue;
    std::shared_ptr<store::RecoveryStore> s = c->second.store.lock();
    if (!s) {  // its store was deleted
      compactions_.erase(c);
      continue;
    }
    const std::weak_ptr<store::RecoveryStore> asked = c->second.store;
    std::vector<uint64_t> keep = c->second.keep;
    uint64_t through = c->second.through;
    c->second.state = Compaction::State::kRunning;
    c->second.started_ns = WallNowNs();
    maint_running_ = s.get();
    lock.unlock();
    Result<store::RecoveryStore::CompactResult> r{Status(Code::kInternal, "not run")};
    try {
      r = s->Compact(std::move(keep), through);
    } catch (const std::exception& e) {  // a bug must not end the daemon
      r = Status(Code::kInternal, std::string("the compaction threw: ") + e.what());
    }
    s.reset();
    if (!r.ok()) {
      spdlog::error("site {}: history compaction of {}: {}", cfg_.name, vm, r.status().ToString());
    }
    lock.lock();
    maint_running_ = nullptr;
    maint_cv_.notify_all();
    c = compactions_.find(vm);
    // The store was deleted meanwhile, or deleted and made again (another instance).
    if (c == compactions_.end() || c->second.store.owner_before(asked) ||
        asked.owner_before(c->second.store)) {
      continue;
    }
    Compaction& done = c->second;
    done.finished_ns = WallNowNs();
    if (r.ok()) {
      done.state = Compaction::State::kDone;
      done.result = {{"compacted_through", r->compacted_through},
                     {"kept_points", r->kept_points},
                     {"bytes_before", r->bytes_before},
                     {"bytes_after", r->bytes_after}};
    } else {
      done.state = Compaction::State::kFailed;
      done.error = r.status().ToString();
    }
    if (done.next) {  // asked for while it ran: next in line
      Compaction again;
      again.store = asked;
      again.keep = std::move(done.next->first);
      again.through = done.next->second;
      again.asked_ns = WallNowNs();
      done = std::move(again);
      maint_queue_.push_back(vm);
    }
  }
}

json Site::AllGroupsStatus() {
  std::vector<std::string> names;
  {
    std::lock_guard lock(mu_);
    for (auto& [vm, g] : groups_) names.push_back(vm);
  }
  json out = json::array();
  for (auto& vm : names) {
    if (auto st = GroupStatus(vm); st.ok()) out.push_back(std::move(*st));  // else: deleted since
  }
  return out;
}

json Site::AllStoresStatus() {
  std::vector<std::string> names;
  {
    std::lock_guard lock(mu_);
    for (auto& [vm, d] : damaged_stores_) names.push_back(vm);
    for (auto& [vm, s] : stores_) names.push_back(vm);
  }
  std::sort(names.begin(), names.end());
  names.erase(std::unique(names.begin(), names.end()), names.end());
  json out = json::array();
  for (auto& vm : names) {
    if (auto st = StoreStatus(vm); st.ok()) out.push_back(std::move(*st));  // else: deleted since
  }
  return out;
}

Result<json> Site::StoresChangedSince(const std::string& since) {
  std::vector<std::string> names;
  {
    std::lock_guard lock(mu_);
    for (auto& [vm, d] : damaged_stores_) names.push_back(vm);
    for (auto& [vm, s] : stores_) names.push_back(vm);
  }
  // Marks first, answers after: a store that changes in between is sent as it is now and
  // again next time (never missed).
  std::map<std::string, std::string> marks;
  for (auto& vm : names) {
    if (auto st = StoreStatus(vm, StoreUsage::kLeaveOut); st.ok()) marks[vm] = st->dump();
  }
  OSR_ASSIGN_OR_RETURN(StoreChangeLog::Answer changes, store_changes_.Note(since, marks));
  json stores = json::array();
  for (auto& vm : changes.changed) {
    if (auto st = StoreStatus(vm); st.ok()) stores.push_back(std::move(*st));  // else: deleted
  }
  return json{{"generation", changes.generation},
              {"full", changes.full},
              {"stores", std::move(stores)},
              {"removed", changes.removed}};
}

Result<json> Site::StoreStatus(const std::string& vm, StoreUsage usage) {
  std::lock_guard lock(mu_);
  if (auto d = damaged_stores_.find(vm); d != damaged_stores_.end()) {
    return json{{"name", vm}, {"damage", d->second.Json()}};
  }
  auto it = stores_.find(vm);
  if (it == stores_.end()) return MissingStore(vm);
  auto& s = *it->second;
  json disks = json::array();
  for (auto& d : s.disks()) disks.push_back({{"name", d.name}, {"size_bytes", d.size_bytes}});
  json out{{"name", vm},
           {"disks", disks},
           {"durable_seq", s.durable_seq()},
           {"durable_time_ns", s.durable_time_ns()},
           {"resyncing", s.resyncing()},
           {"consistent_from", s.consistent_from()},
           {"initial_sync", s.initial_sync_pending()},
           {"differential", s.differential()},
           {"epoch", s.epoch()},
           {"source", s.source()},
           {"base_seq", s.base_seq()},
           {"compacted_through", s.compacted_through()},
           {"damaged_records", s.damaged_records()}};
  if (usage == StoreUsage::kInclude) {
    out["history_bytes"] = s.history_bytes();
    out["index_cache_bytes"] = store::VersionIndex::CacheUsageBytes();
    if (json space = SpaceJson(s.dir()); !space.is_null()) out["space"] = space;
  }
  if (auto f = s.write_failure()) out["write_error"] = WriteFailureJson(*f);
  {
    std::lock_guard maint(maint_mu_);
    if (auto c = compactions_.find(vm); c != compactions_.end()) {
      out["compaction"] = CompactionJson(c->second);
    }
  }
  if (auto p = s.staged_progress()) {
    out["staged"] = {{"from", p->from}, {"initial", p->initial}, {"bytes", p->bytes}};
  }
  if (auto cut = s.journal_cut()) {
    out["journal_cut"] = {{"after_seq", cut->after_seq},
                          {"seq_bound", cut->seq_bound},
                          {"time", FormatTimeNs(cut->time_ns)},
                          {"reason", cut->reason}};
  }
  return out;
}

Result<json> Site::OpenView(const std::string& vm, uint64_t seq, bool writable) {
  std::lock_guard lock(mu_);
  if (!stores_.count(vm)) return MissingStore(vm);
  if (views_.size() >= cfg_.views_max) {
    return Unavailable(fmt::format("{} views are open; close one first", views_.size()));
  }
  std::string id = fmt::format("view-{}", next_view_++);
  View v;
  v.vm = vm;
  v.seq = seq;
  v.writable = writable;
  OSR_ASSIGN_OR_RETURN(json out, OpenViewLocked(id, v, /*reopen=*/false));
  views_[id] = std::move(v);
  // Kept in site.json: a restarted site opens the view again (a drill outlives a crash).
  if (Status saved = SaveLocked(); !saved.ok()) {
    View gone = std::move(views_[id]);
    views_.erase(id);
    for (auto& e : gone.exports) exports_.Remove(e);
    for (auto& o : gone.overlays) o->Discard();
    return saved;
  }
  return out;
}

Result<json> Site::OpenViewLocked(const std::string& id, View& v, bool reopen) {
  std::shared_ptr<store::RecoveryStore> s = stores_.at(v.vm);  // each view shares it (views.h)
  json disks = json::array();
  Status failed;
  // The disks as they were at the point: one added since is not there, one grown since
  // has its old size.
  const std::vector<store::StoreDisk> at = s->DisksAt(v.seq);
  for (uint32_t i = 0; i < at.size() && failed.ok(); ++i) {
    std::shared_ptr<nbd::Disk> disk;
    if (v.writable) {
      auto ov = store::OverlayView::Open(s, i, v.seq, OverlayPath(id, i), reopen);
      if (!ov.ok()) {
        failed = ov.status();
      } else {
        v.overlays.push_back(*ov);
        disk = *ov;
      }
    } else {
      auto pv = store::PointView::Open(s, i, v.seq);
      if (!pv.ok())
        failed = pv.status();
      else
        disk = *pv;
    }
    if (!failed.ok()) break;
    std::string name = ViewExport(id, at[i].name);
    failed =
        exports_.Add({name, fmt::format("{} at seq {}", v.vm, v.seq), disk, DrillPrincipal(id)});
    if (!failed.ok()) break;
    v.exports.push_back(name);
    disks.push_back({{"name", at[i].name}, {"uri", Uri(name)}, {"size_bytes", at[i].size_bytes}});
  }
  if (!failed.ok()) {
    for (auto& e : v.exports) exports_.Remove(e);  // nothing half-done left behind
    v.exports.clear();
    // A new view's overlays go; a reopened one's files stay for the operator to look at
    // until the view is closed.
    if (!reopen) {
      for (auto& o : v.overlays) o->Discard();
    }
    v.overlays.clear();
    return failed;
  }
  return json{{"id", id}, {"vm", v.vm}, {"seq", v.seq}, {"writable", v.writable}, {"disks", disks}};
}

Result<json> Site::ViewStatus(const std::string& id) {
  std::lock_guard lock(mu_);
  auto it = views_.find(id);
  if (it == views_.end()) return NotFound("no view " + id);
  const View& v = it->second;
  json out = {{"id", id}, {"vm", v.vm}, {"seq", v.seq}, {"writable", v.writable}};
  if (!v.lost.empty()) {
    out["lost"] = v.lost;
    out["disks"] = json::array();
    return out;
  }
  json disks = json::array();
  auto st = stores_.find(v.vm);
  for (size_t i = 0; i < v.exports.size(); ++i) {
    std::string name = st != stores_.end() && i < st->second->disks().size()
                           ? st->second->disks()[i].name
                           : std::to_string(i);
    disks.push_back({{"name", name}, {"uri", Uri(v.exports[i])}});
  }
  out["disks"] = disks;
  out["drill_vm"] = DrillVmJson(*v.runner, v.vm_spec);
  return out;
}

Status Site::CloseView(const std::string& id) {
  View v;
  {
    std::lock_guard lock(mu_);
    auto it = views_.find(id);
    if (it == views_.end()) return NotFound("no view " + id);
    v = std::move(it->second);
    views_.erase(it);
    if (Status saved = SaveLocked(); !saved.ok()) {
      views_[id] = std::move(v);  // still open, and still named in site.json
      return saved;
    }
  }
  EndDrillVm(id, v);  // its VM writes to the view: it stops before the view goes
  for (auto& o : v.overlays) o->Discard();
  if (!v.lost.empty()) {
    // Nothing of it is open: its files (if any) go now.
    std::error_code ec;
    for (auto& e : fs::directory_iterator(fs::path(cfg_.data_dir) / "views", ec)) {
      if (e.path().filename().string().rfind(id + "-", 0) == 0) fs::remove(e.path(), ec);
    }
  }
  v.overlays.clear();  // the exports hold the views now
  for (auto& name : v.exports) {
    std::shared_ptr<const nbd::Export> e = exports_.Remove(name);
    Status ended = nbd_->DisconnectExport(e);
    if (!ended.ok()) {
      // Not an error of the close: the export is gone, no client can open the view again.
      // The stuck holder frees the view (and its pin) when it lets go; the view shares its
      // store, so that is safe, and DeleteStore waits for the pin or refuses, saying so.
      spdlog::warn("site {}: view {} closed, but its pin stays until an NBD client lets go: {}",
                   cfg_.name, id, ended.ToString());
    }
    e.reset();  // normally the last reference: the view, its overlay and its pin go here
  }
  return Status::Ok();
}

json Site::Describe() {
  json groups = json::array(), stores = json::array(), views = json::array();
  json quarantined = json::array();
  std::vector<std::pair<std::string, std::string>> store_dirs;
  size_t disks_served = 0;
  {
    std::lock_guard lock(mu_);
    for (auto& [vm, g] : groups_) {
      groups.push_back(vm);
      if (g->damage) {
        quarantined.push_back({{"group", vm}, {"damage", g->damage->Json()}});
      } else {
        disks_served += g->disks.size();
      }
    }
    for (auto& [vm, d] : damaged_stores_) {
      stores.push_back(vm);
      quarantined.push_back({{"store", vm}, {"damage", d.Json()}});
    }
    for (auto& [vm, st] : stores_) {
      stores.push_back(vm);
      store_dirs.emplace_back(vm, st->dir());
    }
    for (auto& [id, v] : views_) {
      json j = {{"id", id}, {"vm", v.vm}, {"seq", v.seq}, {"writable", v.writable}};
      if (!v.lost.empty()) j["lost"] = v.lost;
      views.push_back(j);
    }
  }
  // Capacity: what the recovery stores take on disk (allocated blocks), and the file
  // system they live on. Outside mu_: it walks directories.
  json store_bytes = json::object();
  uint64_t stores_total = 0;
  for (auto& [vm, dir] : store_dirs) {
    uint64_t used = 0;
    std::error_code ec;
    for (auto it = fs::recursive_directory_iterator(dir, ec);
         !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
      struct stat st {};
      if (it->is_regular_file(ec) && ::stat(it->path().c_str(), &st) == 0) {
        used += static_cast<uint64_t>(st.st_blocks) * 512;
      }
    }
    store_bytes[vm] = used;
    stores_total += used;
  }
  struct statvfs vfs {};
  json fs_json = nullptr;
  if (::statvfs(cfg_.data_dir.c_str(), &vfs) == 0) {
    fs_json = {{"total_bytes", static_cast<uint64_t>(vfs.f_blocks) * vfs.f_frsize},
               {"free_bytes", static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize}};
  }
  return json{{"name", cfg_.name},
              {"nbd", fmt::format("{}:{}", nbd_bound_.host, nbd_bound_.port)},
              {"replication", fmt::format("{}:{}", repl_bound_.host, repl_bound_.port)},
              {"groups", groups},
              {"stores", stores},
              {"views", views},
              {"quarantined", quarantined},
              {"disks_served", disks_served + views.size()},
              {"store_bytes", store_bytes},
              {"store_bytes_total", stores_total},
              {"filesystem", fs_json},
              {"vm_commands", VmCommandsJson()}};
}

json Site::VmCommandsJson() const {
  // Names only: what an entry runs stays on this host.
  json commands = json::array(), qemu_args = json::array();
  for (auto& [name, unused] : cfg_.commands.commands) commands.push_back(name);
  for (auto& [name, unused] : cfg_.commands.qemu_args) qemu_args.push_back(name);
  return json{{"allow_api_commands", cfg_.commands.allow_api_commands},
              {"commands", commands},
              {"qemu_args", qemu_args}};
}

std::string Site::Metrics() {
  std::lock_guard lock(mu_);
  std::string out;
  auto head = [&](const char* name, const char* type, const char* help) {
    out += fmt::format("# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
  };
  head("osr_capture_last_seq", "gauge", "Highest sequence number captured for the VM.");
  for (auto& [vm, g] : groups_) {
    out += fmt::format("osr_capture_last_seq{{vm=\"{}\"}} {}\n", vm, g->capture->log().last_seq());
  }
  head("osr_capture_bytes_total", "counter",
       "Bytes changed by captured writes since the daemon started (churn: use rate()).");
  for (auto& [vm, g] : groups_) {
    out += fmt::format("osr_capture_bytes_total{{vm=\"{}\"}} {}\n", vm,
                       g->capture->log().captured_bytes_total());
  }
  head("osr_capture_log_bytes", "gauge", "Bytes held in the VM's capture log files.");
  for (auto& [vm, g] : groups_) {
    out +=
        fmt::format("osr_capture_log_bytes{{vm=\"{}\"}} {}\n", vm, g->capture->log().held_bytes());
  }
  head("osr_replication_acked_seq", "gauge",
       "Highest sequence number durable at the recovery site.");
  head("osr_replication_lag_records", "gauge",
       "Captured writes not yet durable at the recovery site.");
  head("osr_replication_unacked_bytes", "gauge", "Bytes shipped but not yet durable there.");
  head("osr_replication_rpo_seconds", "gauge",
       "Age of the oldest write shipped but not yet durable at the recovery site.");
  head("osr_replication_state", "gauge", "1 for the replication state the VM is in.");
  for (auto& [vm, g] : groups_) {
    if (!g->sender) continue;
    auto st = g->sender->stats();
    uint64_t last = g->capture->log().last_seq();
    out += fmt::format("osr_replication_acked_seq{{vm=\"{}\"}} {}\n", vm, st.acked_seq);
    out += fmt::format("osr_replication_lag_records{{vm=\"{}\"}} {}\n", vm,
                       last > st.acked_seq ? last - st.acked_seq : 0);
    out += fmt::format("osr_replication_unacked_bytes{{vm=\"{}\"}} {}\n", vm, st.unacked_bytes);
    out += fmt::format("osr_replication_rpo_seconds{{vm=\"{}\"}} {:.3f}\n", vm, st.rpo_seconds);
    std::string state = g->capture->log().overflowed() ? "resync_required"
                        : st.resyncing                 ? "resyncing"
                        : st.connected                 ? "replicating"
                                                       : "disconnected";
    out += fmt::format("osr_replication_state{{vm=\"{}\",state=\"{}\"}} 1\n", vm, state);
  }
  head("osr_store_durable_seq", "gauge", "Highest sequence number durable in the recovery store.");
  for (auto& [vm, s] : stores_) {
    out += fmt::format("osr_store_durable_seq{{vm=\"{}\"}} {}\n", vm, s->durable_seq());
  }
  return out;
}

}  // namespace osr::site
