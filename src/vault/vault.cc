#include "vault/vault.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <httplib.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <chrono>
#include <ctime>
#include <filesystem>
#include <map>
#include <set>

#include "common/https.h"
#include "common/json_in.h"
#include "common/units.h"
#include "hypervisor/vm_spec.h"
#include "vault/job_steps.h"
#include "vault/point_at_time.h"
#include "vault/retention.h"

namespace osr::vault {

using nlohmann::json;

namespace {

Code CodeFromHttp(int status) {
  switch (status) {
    case 400:
      return Code::kInvalidArgument;
    case 403:
      return Code::kPermissionDenied;
    case 404:
      return Code::kNotFound;
    case 409:
      return Code::kAlreadyExists;
    case 501:
      return Code::kNotSupported;
    case 503:
      return Code::kUnavailable;
    default:
      return Code::kInternal;
  }
}

json PolicyJson(const PolicyRow& p) {
  return json{{"name", p.name},
              {"retention_seconds", p.retention_s},
              {"crash_interval_seconds", p.crash_interval_s},
              {"app_interval_seconds", p.app_interval_s},
              {"compression", p.compression},
              {"bandwidth_bytes_per_second", p.bandwidth_bytes_per_second}};
}

json PointJson(const PointRow& p) {
  return json{{"id", p.id}, {"time", FormatTimeNs(p.time_ns)}, {"seq", p.seq}, {"type", p.type}};
}

json JobJson(const JobRow& j) {
  json out = {{"id", j.id},
              {"type", j.type},
              {"vm", j.vm},
              {"state", JobStateName(j.state)},
              {"progress", j.progress},
              {"steps", j.steps},
              {"error", j.error.empty() ? json() : json(j.error)},
              {"created", FormatTimeNs(j.created_ns)},
              {"updated", FormatTimeNs(j.updated_ns)}};
  if (!j.result.is_null()) {
    for (auto& [k, v] : j.result.items()) out[k] = v;
  }
  return out;
}

}  // namespace

bool StoreConsistentAt(const json& st, uint64_t seq) {
  json_in::Fields f(st);
  bool busy =
      f.Bool("resyncing", false) || f.Bool("initial_sync", false) || f.Bool("differential", false);
  uint64_t from = f.U64("consistent_from", 0), durable = f.U64("durable_seq", 0);
  // An answer of the wrong shape is no proof of consistency.
  return f.ok() && !busy && seq >= from && seq <= durable;
}

void LogIfFailed(const Status& st, const std::string& what) {
  if (!st.ok()) spdlog::warn("vault: {}: {}", what, st.ToString());
}

// ---- SiteClient ---------------------------------------------------------------------

namespace {

// What a site said when it refused a call, fit to show to an operator: the message of
// its JSON error (one line, at most 300 characters), never its raw body, which a
// misconfigured or hostile endpoint could fill with anything.
// The code a site's error body names (its "error.code", CodeName), else the HTTP
// status's: 409 is both "already exists" and "failed precondition" (quarantined).
Code SiteErrorCode(int status, const std::string& body) {
  auto j = json_in::ParseObject(body, "answer", 64 << 10, 8);
  if (j.ok()) {
    json_in::Fields f(*j);
    if (const json* e = f.Object("error")) {
      std::string name = json_in::Fields(*e).String("code", "");
      if (auto code = CodeFromName(name); code && *code != Code::kOk) return *code;
    }
  }
  return CodeFromHttp(status);
}

std::string SiteErrorMessage(int status, const std::string& body) {
  auto j = json_in::ParseObject(body, "answer", 64 << 10, 8);
  std::string msg;
  if (j.ok()) {
    json_in::Fields f(*j);
    if (const json* e = f.Object("error")) msg = json_in::Fields(*e).String("message", "");
  }
  if (msg.empty()) return fmt::format("HTTP {}", status);
  for (char& c : msg) {
    if (static_cast<unsigned char>(c) < 0x20) c = ' ';
  }
  // Long enough for a quarantine's reason and action (docs/operations.md), bounded.
  if (msg.size() > 1000) msg = msg.substr(0, 1000) + "...";
  return msg;
}

}  // namespace

std::string QuarantineHealth(const std::string& what, const json& damage) {
  json_in::Fields f(damage);
  std::string reason = f.String("reason", "");
  std::string action = f.String("action", "");
  // A sentence starts with a capital, a command ("osr vm repair ...") stays as typed.
  if (!action.empty() && action.rfind("osr ", 0) != 0) {
    action[0] = static_cast<char>(std::toupper(action[0]));
  }
  bool one = what.find("'s recovery store") != std::string::npos;
  return fmt::format("Critical: {} {} quarantined: {}. {}", what, one ? "is" : "are",
                     reason.substr(0, 400), action.substr(0, 400));
}

Result<std::pair<int, std::string>> SiteClient::Exchange(const std::string& method,
                                                         const std::string& path,
                                                         const std::string& body,
                                                         const char* content_type,
                                                         int read_timeout_s) {
  // api = https://HOST:PORT/api/v1 (http:// on loopback)
  std::string base = site_.api;
  std::string prefix;
  auto slash = base.find('/', base.find("://") + 3);
  if (slash != std::string::npos) {
    prefix = base.substr(slash);
    base = base.substr(0, slash);
  }
  std::unique_ptr<httplib::ClientImpl> cli;
  if (base.rfind("https://", 0) == 0) {
    auto addr = ParseHostPort(base.substr(8), 7482);
    if (!addr.ok()) return InvalidArgument("site " + site_.name + ": bad API address " + site_.api);
    std::unique_ptr<httplib::SSLClient> ssl;
    if (tls_.cert.empty()) {
      ssl = std::make_unique<httplib::SSLClient>(addr->host, addr->port);
    } else {
      ssl = std::make_unique<httplib::SSLClient>(addr->host, addr->port, tls_.cert, tls_.key);
    }
    // The chain and the site's name are checked by our own verifier (common/https.h):
    // the certificate must name the site registered at this address.
    ssl->enable_server_certificate_verification(false);
    if (tls_.ca.empty()) {
      return Status(Code::kPermissionDenied,
                    "site " + site_.name +
                        ": the vault has no CA to check the site's certificate "
                        "(osrd vault --site-ca)");
    }
    OSR_RETURN_IF_ERROR(ConfigureClientTls(ssl->ssl_context(), tls_, site_.name));
    cli = std::move(ssl);
  } else {
    auto addr = ParseHostPort(base.substr(base.find("://") + 3), 7482);
    if (!addr.ok() || !IsLoopbackHost(addr->host)) {
      return Status(Code::kPermissionDenied,
                    "site " + site_.name + ": plain http:// only to a site on this host");
    }
    cli = std::make_unique<httplib::ClientImpl>(addr->host, addr->port);
  }
  cli->set_connection_timeout(2);
  cli->set_read_timeout(read_timeout_s);
  cli->set_write_timeout(60);
  std::string url = prefix + path;
  httplib::Result r = method == "GET"    ? cli->Get(url)
                      : method == "PUT"  ? cli->Put(url, body, content_type)
                      : method == "POST" ? cli->Post(url, body, content_type)
                                         : cli->Delete(url);
  if (!r) {
    return Unavailable(fmt::format("site {} ({}) is unreachable: {}", site_.name, site_.api,
                                   httplib::to_string(r.error())));
  }
  if (r->status >= 300) {
    return Status(SiteErrorCode(r->status, r->body),
                  fmt::format("site {}: {}", site_.name, SiteErrorMessage(r->status, r->body)));
  }
  return std::pair<int, std::string>{r->status, std::move(r->body)};
}

Result<json> SiteClient::Call(const std::string& method, const std::string& path,
                              const json& body) {
  OSR_ASSIGN_OR_RETURN(auto answer, Exchange(method, path, body.is_null() ? "" : body.dump(),
                                             "application/json", 30));
  if (answer.second.empty()) return json::object();
  auto j = json_in::Parse(answer.second, "site " + site_.name + "'s answer");
  if (!j.ok()) return Corruption(j.status().message());
  return std::move(*j);
}

Result<std::string> SiteClient::CallRaw(const std::string& method, const std::string& path,
                                        const std::string& body) {
  // Hashing a big disk takes its time.
  OSR_ASSIGN_OR_RETURN(auto answer, Exchange(method, path, body, "application/octet-stream", 600));
  return std::move(answer.second);
}

// ---- Vault --------------------------------------------------------------------------

Result<std::unique_ptr<Vault>> Vault::Start(const VaultConfig& cfg) {
  std::unique_ptr<Vault> v(new Vault(cfg));
  OSR_ASSIGN_OR_RETURN(v->catalog_, Catalog::Open(cfg.db_path));
  spdlog::info("vault: catalog in {}", v->catalog_->name());  // never with a password
  // The clock watch as it was saved: a step made while the vault was down is noticed at
  // its first tick (same boot), and a hold in force stays.
  v->boot_id_ = BootId();
  if (auto saved = v->catalog_->Meta("clock")) {
    auto j = json_in::ParseObject(*saved, "the catalog's clock state");
    std::lock_guard lock(v->clock_mu_);
    if (j.ok() && v->clock_watch_.Restore(*j, v->boot_id_, v->clock_.WallNs(),
                                          v->clock_.MonoNs()) == ClockWatch::Change::kStepped) {
      spdlog::warn("vault: {}", v->clock_watch_.HealthWarning());
    }
  }
  v->ObserveClock();
  // The start reads the catalog through the Result forms: a catalog that cannot be read
  // fails the start instead of reading as empty.
  OSR_ASSIGN_OR_RETURN(std::optional<PolicyRow> default_policy, v->catalog_->FindPolicy("default"));
  if (!default_policy) {
    Status made = v->catalog_->PutPolicy(PolicyRow{"default"});
    // Another vault starting on the same catalog may have made it first.
    if (!made.ok() && made.code() != Code::kAlreadyExists) return made;
  }
  OSR_ASSIGN_OR_RETURN(v->api_, VaultApi::Create(v.get(), cfg.api));
  OSR_RETURN_IF_ERROR(v->api_->Listen().status());
  // Leads (resuming the jobs left running, starting jobs and points) when it holds the
  // lease; follows otherwise (vault_leader.cc).
  OSR_RETURN_IF_ERROR(v->StartLease());
  v->api_->Start();
  return v;
}

Vault::Vault(VaultConfig cfg)
    : cfg_(std::move(cfg)),
      clock_(cfg_.clock != nullptr ? *cfg_.clock : RealClock()),
      jobs_started_(!cfg_.jobs_paused),
      clock_watch_(std::max<int64_t>(1, cfg_.clock_settle_ms) * 1000000) {}

void Vault::StartJobs() {
  {
    std::lock_guard lock(mu_);
    jobs_started_ = true;
  }
  cv_.notify_all();
}

Vault::~Vault() {
  Stop();
}

void Vault::Stop() {
  stopping_ = true;
  // A leader hands over first: its jobs stop unwritten and stay Running in the catalog,
  // for the next leader (another vault, or this one restarted) to resume.
  StopLease();
  {
    std::lock_guard lock(mu_);
    if (stop_) return;
    stop_ = true;
    // Running jobs end their waits now (and are resumed when the vault starts again).
    for (auto& [id, cancel] : running_) cancel->Cancel(JobCancel::Reason::kVaultStopping);
  }
  cv_.notify_all();
  if (api_) api_->Stop();
  for (auto& t : job_threads_) {
    if (t.joinable()) t.join();
  }
  if (point_thread_.joinable()) point_thread_.join();
}

SiteStatusBoard Vault::StatusBoard(SiteStatusBoard::Mode mode) const {
  return SiteStatusBoard([this](const SiteRow& site,
                                const std::string& path) { return Client(site).Call("GET", path); },
                         mode, [this] { return catalog_->Sites(); });
}

SiteClient Vault::Client(const SiteRow& site) const {
  return SiteClient(site, cfg_.site_tls);
}

Result<json> Vault::RegisterSite(const std::string& name, const std::string& api,
                                 const std::string& replication, bool replace) {
  if (!ValidName(name)) return InvalidArgument("'" + name + "' is not a valid site name");
  bool https = api.rfind("https://", 0) == 0;
  if (!https && api.rfind("http://", 0) != 0) {
    return InvalidArgument("api: the site's https://HOST:PORT/api/v1");
  }
  std::string hostport = api.substr(https ? 8 : 7);
  hostport = hostport.substr(0, hostport.find('/'));
  auto api_addr = ParseHostPort(hostport, 7482);
  if (!api_addr.ok()) return InvalidArgument("api: " + api_addr.status().message());
  if (!https && !IsLoopbackHost(api_addr->host)) {
    return InvalidArgument(
        "api: a site on another host is reached over https:// (mutual TLS); http:// only on "
        "loopback");
  }
  if (!ParseHostPort(replication, 7481).ok()) {
    return InvalidArgument("replication: the site's HOST:PORT");
  }
  if (auto old = catalog_->Site(name);
      old && (old->api != api || old->replication != replication)) {
    bool in_use = false;
    for (auto& v : catalog_->Vms()) in_use = in_use || v.site == name;
    for (auto& i : catalog_->Items()) in_use = in_use || i.source == name || i.target == name;
    if (in_use && !replace) {
      return Status(Code::kAlreadyExists,
                    fmt::format("site {} is registered at {} and in use; moving it to {} would "
                                "send its VMs' data there: say replace (osr site add --replace)",
                                name, old->api, api));
    }
    spdlog::warn("vault: site {} moved from {} / {} to {} / {}", name, old->api, old->replication,
                 api, replication);
  }
  OSR_RETURN_IF_ERROR(catalog_->PutSite({name, api, replication}));
  return json{{"name", name}, {"api", api}, {"replication", replication}};
}

json Vault::ListSites() {
  json out = json::array();
  for (auto& s : catalog_->Sites()) {
    auto d = Client(s).Call("GET", "/site");
    json row = {
        {"name", s.name}, {"api", s.api}, {"replication", s.replication}, {"reachable", d.ok()}};
    if (d.ok()) {
      // What a site says of itself is shown only in the shapes the vault expects.
      json_in::Fields f(*d, "site " + s.name + ": ");
      row["nbd"] = f.String("nbd", "");
      const json* groups = f.Array("groups");
      const json* stores = f.Array("stores");
      row["vms"] = groups ? *groups : json::array();
      row["stores"] = stores ? *stores : json::array();
      row["disks_served"] = f.U64("disks_served", 0);
      const json* store_bytes = f.Object("store_bytes");
      row["store_bytes"] = store_bytes ? *store_bytes : json::object();
      row["store_bytes_total"] = f.U64("store_bytes_total", 0);
      const json* fs = f.Object("filesystem");
      row["filesystem"] = fs ? *fs : json();
      if (!f.ok()) {
        row["reachable"] = false;
        row["error"] = f.status().message();
      }
    } else {
      row["error"] = d.status().message();
    }
    out.push_back(row);
  }
  return out;
}

Result<json> Vault::CreatePolicy(const PolicyRow& p) {
  if (!ValidName(p.name)) return InvalidArgument("'" + p.name + "' is not a valid policy name");
  if (p.retention_s <= 0 || p.crash_interval_s <= 0 || p.app_interval_s <= 0) {
    return InvalidArgument("retention and intervals must be positive");
  }
  if (p.compression != "lz4" && p.compression != "none") {
    return InvalidArgument("compression is lz4 or none");
  }
  if (p.bandwidth_bytes_per_second < 0) return InvalidArgument("the bandwidth limit must be >= 0");
  Status st = catalog_->PutPolicy(p);
  if (st.code() == Code::kAlreadyExists) {
    return Status(Code::kAlreadyExists, "policy " + p.name + " exists");
  }
  OSR_RETURN_IF_ERROR(st);
  return PolicyJson(p);
}

json Vault::ListPolicies() {
  json out = json::array();
  for (auto& p : catalog_->Policies()) out.push_back(PolicyJson(p));
  return out;
}

namespace {

// What the site lets a VM's spec name (GET /site "vm_commands"); a site that does not
// say takes no literal and has no entries.
Result<hypervisor::CommandPolicy> SitePolicy(SiteClient client, const SiteRow& site) {
  OSR_ASSIGN_OR_RETURN(json described, client.Call("GET", "/site"));
  hypervisor::CommandPolicy p;
  json_in::Fields f(described, "site " + site.name + ": ");
  const json* vc = f.Object("vm_commands");
  if (!f.ok()) return f.status();
  if (vc == nullptr) return p;
  json_in::Fields c(*vc, "site " + site.name + ": vm_commands.");
  p.allow_literal = c.Bool("allow_api_commands", false);
  using Names = std::pair<const char*, std::set<std::string>*>;
  for (Names names_of : {Names{"commands", &p.commands}, Names{"qemu_args", &p.qemu_args}}) {
    auto [key, out] = names_of;
    const json* names = c.Array(key);
    if (names == nullptr) continue;
    for (auto& n : *names) {
      if (!n.is_string()) {
        c.Fail(key, "must be a list of names");
        break;
      }
      out->insert(n.get<std::string>());
    }
  }
  if (!c.ok()) return c.status();
  return p;
}

}  // namespace

Result<json> Vault::CreateVm(const std::string& name, const std::string& site, const json& disks,
                             const json& spec_in) {
  if (!ValidName(name)) return InvalidArgument("'" + name + "' is not a valid VM name");
  // The whole spec, typed and in range; then what it runs, against the rules of the hosts
  // that would run it (this vault's hooks, the site's commands). Each is checked again
  // where it runs.
  OSR_ASSIGN_OR_RETURN(hypervisor::VmSpec parsed,
                       hypervisor::ParseVmSpec(spec_in, hypervisor::SpecSource::kNew));
  OSR_RETURN_IF_ERROR(CheckHooks(cfg_.hooks, parsed));
  json spec = hypervisor::VmSpecJson(parsed);
  if (catalog_->Vm(name)) return Status(Code::kAlreadyExists, "VM " + name + " exists");
  auto s = catalog_->Site(site);
  if (!s) return NotFound("no site named '" + site + "' (osr site list)");
  if (parsed.driver != hypervisor::Driver::kNone) {
    OSR_ASSIGN_OR_RETURN(hypervisor::CommandPolicy policy, SitePolicy(Client(*s), *s));
    OSR_RETURN_IF_ERROR(hypervisor::CheckCommands(parsed, policy));
  }
  OSR_ASSIGN_OR_RETURN(json created,
                       Client(*s).Call("PUT", "/groups/" + name, json{{"disks", disks}}));
  json stored = json::array();
  for (auto& d : created["disks"]) {
    stored.push_back({{"name", d["name"]}, {"size_bytes", d["size_bytes"]}});
  }
  Status st = catalog_->PutVm({name, site, stored, spec});
  if (!st.ok()) {
    (void)Client(*s).Call("DELETE", "/groups/" + name);  // nothing half-done
    return st;
  }
  return ShowVm(name);
}

json Vault::ListVms() {
  json out = json::array();
  for (auto& v : catalog_->Vms()) {
    auto shown = ShowVm(v.name);
    out.push_back(shown.ok() ? *shown : json{{"name", v.name}, {"site", v.site}});
  }
  return out;
}

Result<json> Vault::ShowVm(const std::string& name) {
  auto v = catalog_->Vm(name);
  if (!v) return NotFound("no VM named '" + name + "'");
  json out = {{"name", v->name}, {"site", v->site}};
  json disks = json::array();
  auto s = catalog_->Site(v->site);
  Result<json> g = s ? Client(*s).Call("GET", "/groups/" + name)
                     : Result<json>(NotFound("site " + v->site + " is not registered"));
  for (size_t i = 0; i < v->disks.size(); ++i) {
    json d = {{"name", v->disks[i]["name"]}, {"size_bytes", v->disks[i]["size_bytes"]}};
    d["uri"] = g.ok() && i < (*g)["disks"].size() ? (*g)["disks"][i]["uri"] : json();
    disks.push_back(d);
  }
  out["disks"] = disks;
  auto spec = hypervisor::ParseVmSpec(v->spec, hypervisor::SpecSource::kStored);
  out["driver"] = spec.ok() ? std::string(hypervisor::DriverName(spec->driver)) : "invalid";
  out["spec"] = v->spec;
  if (!spec.ok()) out["spec_error"] = spec.status().message();
  out["running"] = g.ok() ? (*g).value("vm", json::object()).value("running", false) : false;
  out["running_site"] = v->site;
  auto item = catalog_->Item(name);
  out["epoch"] = item ? item->epoch : 1;
  out["state"] = item ? item->state : "Unprotected";
  if (!g.ok()) out["site_error"] = g.status().message();
  if (g.ok() && g->is_object() && g->contains("damage")) {
    out["site_error"] = QuarantineHealth(name + "'s disks at " + v->site, (*g)["damage"]);
  }
  return out;
}

Result<json> Vault::StartVm(const std::string& name) {
  auto v = catalog_->Vm(name);
  if (!v) return NotFound("no VM named '" + name + "'");
  OSR_ASSIGN_OR_RETURN(auto spec,
                       hypervisor::ParseVmSpec(v->spec, hypervisor::SpecSource::kStored));
  if (spec.driver == hypervisor::Driver::kNone) {
    return InvalidArgument("VM " + name + " has no driver (osr vm create --driver)");
  }
  auto s = catalog_->Site(v->site);
  if (!s) return NotFound("site " + v->site + " is not registered");
  OSR_RETURN_IF_ERROR(Client(*s).Call("POST", "/groups/" + name + "/vm/start", v->spec).status());
  return ShowVm(name);
}

// A new capture log at `site` for `vm` starts above what its recovery store holds, so
// that replication goes on (1 when the VM is not protected from that site).
Result<uint64_t> Vault::FirstSeqAfterStore(const std::string& vm, const std::string& site) {
  auto item = catalog_->Item(vm);
  if (!item || item->source != site) return uint64_t{1};
  auto dst = catalog_->Site(item->target);
  if (!dst) return uint64_t{1};
  auto st = Client(*dst).Call("GET", "/stores/" + vm);
  if (!st.ok()) {
    if (st.status().code() == Code::kNotFound) return uint64_t{1};
    return Status(
        st.status().code(),
        "the recovery store's position is needed to reset the history: " + st.status().message());
  }
  json_in::Fields f(*st, "site " + dst->name + " store " + vm + ".");
  uint64_t durable = f.U64("durable_seq", 0);
  if (!f.ok()) return f.status();
  return durable + 1;
}

Result<json> Vault::RepairVm(const std::string& name, const std::string& site, bool trim_image,
                             bool reset_history, bool accept_changes) {
  if (!catalog_->Vm(name)) return NotFound("no VM named '" + name + "'");
  std::vector<SiteRow> sites;
  if (!site.empty()) {
    auto s = catalog_->Site(site);
    if (!s) return NotFound("site " + site + " is not registered");
    sites.push_back(*s);
  } else {
    sites = catalog_->Sites();
  }
  json repaired = json::array();
  std::vector<std::string> still;
  for (auto& s : sites) {
    SiteClient client = Client(s);
    for (const char* what : {"groups", "stores"}) {
      auto st = client.Call("GET", fmt::format("/{}/{}", what, name));
      if (!st.ok() || !st->is_object() || !st->contains("damage")) continue;
      json body = json::object();
      if (std::string(what) == "groups") {
        body = {{"trim_image", trim_image},
                {"reset_history", reset_history},
                {"accept_changes", accept_changes}};
        if (Result<uint64_t> next = FirstSeqAfterStore(name, s.name); next.ok()) {
          body["first_seq"] = *next;
        } else {
          still.push_back(next.status().message());
          continue;
        }
      }
      auto r = client.Call("POST", fmt::format("/{}/{}/repair", what, name), body);
      if (r.ok()) {
        repaired.push_back({{"site", s.name}, {"what", what}, {"result", *r}});
      } else {
        still.push_back(r.status().message());
      }
    }
  }
  if (!still.empty()) {
    return Status(Code::kFailedPrecondition, fmt::format("{}", fmt::join(still, "; ")));
  }
  if (repaired.empty()) {
    return InvalidArgument(fmt::format("nothing of VM {} is quarantined{}", name,
                                       site.empty() ? "" : " at site " + site));
  }
  return json{{"vm", name}, {"repaired", repaired}};
}

Result<json> Vault::StopVm(const std::string& name, int timeout_ms) {
  auto v = catalog_->Vm(name);
  if (!v) return NotFound("no VM named '" + name + "'");
  auto s = catalog_->Site(v->site);
  if (!s) return NotFound("site " + v->site + " is not registered");
  OSR_ASSIGN_OR_RETURN(json r, Client(*s).Call("POST", "/groups/" + name + "/vm/stop",
                                               json{{"timeout_ms", timeout_ms}}));
  OSR_ASSIGN_OR_RETURN(json out, ShowVm(name));
  out["stopped_cleanly"] = r.value("clean", true);
  return out;
}

namespace {

// " (1.2 MiB free of 24 MiB)" from a site's {"free_bytes", "total_bytes"}; "" without.
std::string SpaceText(const json* space, const std::string& what) {
  if (space == nullptr) return "";
  json_in::Fields f(*space, what + ".space.");
  uint64_t free_bytes = f.U64("free_bytes", 0);
  uint64_t total_bytes = f.U64("total_bytes", 0);
  if (!f.ok() || total_bytes == 0) return "";
  return fmt::format("{} free of {}", FormatSize(free_bytes), FormatSize(total_bytes));
}

// The health of a recovery store that could not write what it was sent ("" when it
// could): its `write_error` (GET /stores/{vm}), with the file system's space.
std::string StoreWriteHealth(const json& store, const ItemRow& item) {
  json_in::Fields sf(store, "site " + item.target + " store " + item.vm + ".");
  const json* err = sf.Object("write_error");
  if (err == nullptr || !sf.ok()) return "";
  json_in::Fields ef(*err, "site " + item.target + " store " + item.vm + ".write_error.");
  std::string code = ef.String("code", "io_error");
  std::string what = ef.String("what", "write");
  std::string message = ef.String("message", "");
  uint64_t needed = ef.U64("bytes_needed", 0);
  uint64_t count = ef.U64("count", 0);
  int64_t since_ns = ef.I64("since_ns", 0);
  std::string space = SpaceText(sf.Object("space"), "store");
  if (!ef.ok()) return "Critical: " + ef.status().message();
  std::string since = since_ns > 0 ? ", since " + FormatTimeNs(since_ns) : "";
  if (const json* sp = sf.Object("space"); code == "no_space" && sp != nullptr && !space.empty()) {
    // Rounded alike ("8.0 MiB free ..., 8.0 MiB needed") would hide the shortfall.
    uint64_t free_bytes = json_in::Fields(*sp).U64("free_bytes", 0);
    if (FormatSize(free_bytes) == FormatSize(needed)) {
      space = fmt::format("{} bytes free of {}", free_bytes,
                          FormatSize(json_in::Fields(*sp).U64("total_bytes", 0)));
      return fmt::format(
          "Critical: the recovery site {} is out of space for {}: {}, {} bytes needed ({} failed "
          "{} time(s){}); free space or grow the file system of its data_dir: replication "
          "resumes by itself. Meanwhile the source site keeps the changes (its capture log, then "
          "the dirty-region bitmap) and the RPO grows",
          item.target, item.vm, space, needed, what, count, since);
    }
  }
  if (code == "no_space") {
    return fmt::format(
        "Critical: the recovery site {} is out of space for {}: {}{} needed ({} failed {} "
        "time(s){}); free space or grow the file system of its data_dir: replication resumes "
        "by itself. Meanwhile the source site keeps the changes (its capture log, then the "
        "dirty-region bitmap) and the RPO grows",
        item.target, item.vm, space.empty() ? "" : space + ", ", FormatSize(needed), what, count,
        since);
  }
  return fmt::format(
      "Critical: the recovery site {} cannot write the store of {}: {} ({} failed {} time(s){}); "
      "look at that site's disk and log: replication retries by itself",
      item.target, item.vm, message, what, count, since);
}

// The health of a source whose capture log could not be written ("" when it could).
std::string CaptureWriteHealth(const json& group, const ItemRow& item) {
  json_in::Fields gf(group, "site " + item.source + " group " + item.vm + ".");
  const json* err = gf.Object("capture_write_error");
  if (err == nullptr || !gf.ok()) return "";
  json_in::Fields ef(*err, "site " + item.source + " group " + item.vm + ".capture_write_error.");
  std::string code = ef.String("code", "io_error");
  std::string message = ef.String("message", "");
  std::string space = SpaceText(ef.Object("space"), "capture");
  if (!ef.ok()) return "Critical: " + ef.status().message();
  return fmt::format(
      "Critical: the source site {} {} for the capture log of {}{}: changes are tracked in the "
      "dirty-region bitmap and sent whole by a resync that starts by itself once it can write "
      "again; free space there ({})",
      item.source, code == "no_space" ? "is out of space" : "cannot write", item.vm,
      space.empty() ? "" : " (" + space + ")", message);
}

}  // namespace

std::string Vault::FailedOverHealth(const ItemRow& item, SiteStatusBoard& board) {
  // The VM's disks are the target's failover disks now: what that site says of them.
  std::string next = item.state == "FailoverCommitted" ? "reprotect" : "commit, then reprotect";
  auto dst = board.Site(item.target);
  if (!dst) return "Critical: site " + item.target + " is not registered";
  auto g = board.Group(*dst, item.vm);
  if (!g.ok()) return "Critical: " + g.status().message();
  json_in::Fields f(*g, "site " + item.target + " group " + item.vm + ".");
  if (const json* damage = f.Object("damage"); damage != nullptr) {
    return QuarantineHealth(item.vm + "'s disks at " + item.target, *damage);
  }
  const json* vm = f.Object("vm");
  bool running = vm != nullptr && json_in::Fields(*vm).Bool("running", false);
  if (!f.ok()) return "Critical: " + f.status().message();
  auto row = catalog_->Vm(item.vm);
  auto spec = row ? hypervisor::ParseVmSpec(row->spec, hypervisor::SpecSource::kStored)
                  : Result<hypervisor::VmSpec>(NotFound("no VM"));
  if (!running && spec.ok() && spec->driver != hypervisor::Driver::kNone) {
    return "Warning: not protected: the VM's disks are at " + item.target +
           " but it is not running there (" + next + ")";
  }
  return "Warning: not protected: the VM runs at " + item.target + " (" + next + ")";
}

// The RPO of an item while one of its sites does not answer: at most the age of the newest
// write known to be at the recovery site (its store's answer, else the newest point), and
// growing until the site answers; null when nothing is known to be there. Never 0: that
// would say nothing is at risk while nobody can tell.
json Vault::RpoWithoutAnAnswer(const Result<json>& store, const std::optional<PointRow>& latest) {
  int64_t known_ns = latest ? latest->time_ns : 0;
  if (store.ok())
    known_ns = std::max(known_ns, json_in::Fields(store.value()).I64("durable_time_ns", 0));
  if (known_ns <= 0) return nullptr;
  return std::max(0.0, static_cast<double>(NowNs() - known_ns) / 1e9);
}

json Vault::ItemJson(const ItemRow& item, SiteStatusBoard& board) {
  json out = {{"name", item.vm},       {"state", item.state},   {"source", item.source},
              {"target", item.target}, {"policy", item.policy}, {"epoch", item.epoch}};
  // The newest point only (an item may keep thousands).
  std::optional<PointRow> latest = catalog_->LatestPoint(item.vm);
  out["latest_point"] = latest ? PointJson(*latest) : json();
  out["direction"] = item.source + " -> " + item.target;
  if (auto v = catalog_->Vm(item.vm)) out["running_site"] = v->site;
  if (!item.failover.is_null()) out["failover"] = item.failover;
  static const std::set<std::string> kNotReplicating = {"FailingOver",       "FailoverFailed",
                                                        "FailedOver",        "Committing",
                                                        "FailoverCommitted", "Reprotecting"};
  if (kNotReplicating.count(item.state)) {
    if (item.state == "FailoverFailed") {
      out["health"] = "Critical: the failover stopped half-way; run it again (osr failover)";
    } else if (item.state == "Reprotecting") {
      out["health"] =
          "Warning: reprotecting " + item.target + " -> " + item.source + " (see its job)";
    } else {
      out["health"] = FailedOverHealth(item, board);
    }
    out["rpo_seconds"] = nullptr;
    return out;
  }
  // Health and RPO from both sites.
  std::string health = "Normal";
  std::vector<std::string> warnings;
  json rpo = 0.0;
  auto src = board.Site(item.source);
  auto dst = board.Site(item.target);
  auto g = src ? board.Group(*src, item.vm) : Result<json>(NotFound("x"));
  auto st = dst ? board.Store(*dst, item.vm) : Result<json>(NotFound("x"));
  if (!g.ok() || !st.ok()) {
    health = "Critical: " + (!g.ok() ? g.status().message() : st.status().message());
    rpo = RpoWithoutAnAnswer(st, latest);
  } else {
    json_in::Fields gf(*g, "site " + item.source + " group " + item.vm + ".");
    json_in::Fields sf(*st, "site " + item.target + " store " + item.vm + ".");
    uint64_t last = gf.U64("last_seq", 0);
    bool overflowed = gf.Bool("capture_overflowed", false);
    const json* repl_obj = gf.Object("replication");
    uint64_t durable = sf.U64("durable_seq", 0);
    int64_t durable_ns = sf.I64("durable_time_ns", 0);
    json empty = json::object();
    json_in::Fields rf(repl_obj ? *repl_obj : empty, "site " + item.source + " replication.");
    bool resync_required = rf.Bool("resync_required", false);
    bool resyncing = rf.Bool("resyncing", false);
    uint64_t resync_done = rf.U64("resync_bytes_done", 0);
    uint64_t resync_total = rf.U64("resync_bytes_total", 0);
    bool connected = rf.Bool("connected", false);
    std::string last_error = rf.String("last_error", "");
    if (last > durable) {
      // The newest write at the recovery site is this old; newer ones are on their way.
      // (Two hosts' wall clocks: one that stepped must not show a negative RPO.)
      rpo = durable_ns > 0 ? std::max(0.0, static_cast<double>(NowNs() - durable_ns) / 1e9) : 0;
    }
    std::string store_full = StoreWriteHealth(*st, item);
    std::string capture_full = CaptureWriteHealth(*g, item);
    const json* group_damage = gf.Object("damage");
    const json* store_damage = sf.Object("damage");
    if (group_damage != nullptr || store_damage != nullptr) {
      health =
          group_damage != nullptr
              ? QuarantineHealth(item.vm + "'s disks at " + item.source, *group_damage)
              : QuarantineHealth(item.vm + "'s recovery store at " + item.target, *store_damage);
      rpo = RpoWithoutAnAnswer(st, latest);
    } else if (!gf.ok() || !sf.ok() || !rf.ok()) {
      // A site that answers in shapes the vault does not know is not a healthy one.
      const Status& bad = !gf.ok() ? gf.status() : !sf.ok() ? sf.status() : rf.status();
      health = "Critical: " + bad.message();
      rpo = RpoWithoutAnAnswer(st, latest);
    } else if (!store_full.empty()) {
      health = store_full;
    } else if (!capture_full.empty()) {
      health = capture_full;
    } else if (const json* jcut = sf.Object("journal_cut"); jcut != nullptr) {
      json_in::Fields cf(*jcut, "site " + item.target + " journal_cut.");
      health = fmt::format(
          "Warning: {}'s recovery store at {} lost the records after seq {} (its journal was "
          "damaged at its end: {}); they come again from {}, or the disks are resent whole",
          item.vm, item.target, cf.U64("after_seq", 0), cf.String("reason", "?"), item.source);
    } else if (const json* changed = gf.Array("changed_outside");
               changed != nullptr && !changed->empty() && changed->front().is_string()) {
      health = fmt::format(
          "Warning: {}'s disks at {} were changed outside osr while the site was stopped ({}) "
          "and taken as they are; they are resent whole to {}",
          item.vm, item.source, changed->front().get<std::string>().substr(0, 300), item.target);
    } else if (const json* cut = gf.Object("capture_log_cut"); cut != nullptr) {
      json_in::Fields cf(*cut, "site " + item.source + " capture_log_cut.");
      health = fmt::format(
          "Critical: {}'s capture log at {} was damaged at its end and cut after seq {} ({}); "
          "its disks are resent whole once {} is reachable",
          item.vm, item.source, cf.U64("after_seq", 0), cf.String("reason", "?"), item.target);
    } else if (resync_required || overflowed) {
      health =
          "Critical: resynchronization required (the capture log passed its limit; it "
          "starts by itself when the recovery site is reachable)";
    } else if (resyncing) {
      health = fmt::format("Warning: resynchronizing ({} of {} bytes)", resync_done, resync_total);
    } else if (uint64_t fenced = gf.U64("fenced_epoch", 0); fenced > item.epoch) {
      health = fmt::format(
          "Critical: {}'s disks at {} are fenced at epoch {}, after the catalog's epoch {}: the "
          "catalog is older than the sites (restored from a backup?) and the VM failed over "
          "since; see docs/operations.md, \"The catalog: backup, restore and a standby\"",
          item.vm, item.source, fenced, item.epoch);
    } else if (!connected && item.state != "EnablingProtection") {
      health = "Warning: replication is not connected" +
               (last_error.empty() ? std::string() : " (" + last_error + ")");
    }
    out["last_seq"] = last;
    out["durable_seq"] = durable;
    if (gf.ok() && sf.ok() && !resyncing && !resync_required && !overflowed) {
      if (auto w = PointOverdueWarning(item, latest, durable); !w.empty()) warnings.push_back(w);
    }
    if (sf.ok()) {
      if (auto w = StoreHistoryWarning(item, *st); !w.empty()) warnings.push_back(w);
    }
  }
  {
    std::lock_guard lock(clock_mu_);
    if (clock_watch_.held()) warnings.push_back(clock_watch_.HealthWarning());
  }
  // The most severe first: a Critical warning (damaged records at the recovery site) over
  // a Warning of the replication's own state; else that state, then these warnings.
  for (const std::string& w : warnings) {
    if (w.starts_with("Critical") && !health.starts_with("Critical")) {
      health = w;
      break;
    }
  }
  if (health == "Normal" && !warnings.empty()) health = warnings.front();
  if (!warnings.empty()) out["warnings"] = warnings;
  out["health"] = health;
  out["rpo_seconds"] = rpo;
  if (!item.drill.is_null()) {
    out["drill"] = DrillJson(item, &health);
    out["health"] = health;
  }
  return out;
}

// The item's drill as its recovery site has it now: the disks' URIs there (a restarted
// site serves the drill at new ports), or "lost" with the reason and no disks, and a
// Critical `health`: drill disks are never both advertised and missing.
json Vault::DrillJson(const ItemRow& item, std::string* health) {
  json drill = item.drill;
  if (!drill.is_object()) return drill;
  auto dst = catalog_->Site(item.target);
  json_in::Fields df(drill);
  std::string view = df.String("view", "");
  if (!dst || view.empty()) return drill;
  auto v = Client(*dst).Call("GET", "/views/" + view);
  std::string lost;
  if (v.ok()) {
    json_in::Fields vf(*v, "site " + dst->name + " view " + view + ".");
    lost = vf.String("lost", "");
    const json* disks = vf.Array("disks");
    if (!vf.ok()) return drill;  // an answer it cannot read: keep what the item says
    if (lost.empty() && disks != nullptr) drill["disks"] = *disks;
  } else if (v.status().code() == Code::kNotFound) {
    lost = "site " + dst->name + " has no view " + view;
  } else {
    return drill;  // the site is away: the health says so already
  }
  if (!lost.empty()) {
    drill["lost"] = lost;
    drill["disks"] = json::array();
    *health = fmt::format(
        "Critical: the drill disks of {} at {} were lost ({}); end the drill "
        "(osr test-failover-cleanup {}) and start a new one",
        item.vm, item.target, lost.substr(0, 300), item.vm);
  }
  return drill;
}

json Vault::ListItems() {
  json out = json::array();
  SiteStatusBoard board = StatusBoard(SiteStatusBoard::Mode::kBulk);
  for (auto& i : catalog_->Items()) out.push_back(ItemJson(i, board));
  return out;
}

Result<json> Vault::ShowItem(const std::string& vm) {
  auto i = catalog_->Item(vm);
  if (!i) return NotFound("VM " + vm + " is not protected (osr protect " + vm + " --target SITE)");
  SiteStatusBoard board = StatusBoard(SiteStatusBoard::Mode::kPerVm);
  return ItemJson(*i, board);
}

Result<json> Vault::ListPoints(const std::string& vm) {
  auto item = catalog_->Item(vm);
  if (!item) return NotFound("VM " + vm + " is not protected");
  std::map<int64_t, std::string> in_use;
  {
    std::lock_guard lock(points_mu_);
    in_use = PointsInUseLocked(*item);
  }
  json out = json::array();
  for (auto& p : catalog_->Points(vm)) out.push_back(PointJsonFor(p, in_use));
  return out;
}

json Vault::ClockStatus() {
  std::lock_guard lock(clock_mu_);
  json out = clock_watch_.StatusJson();
  out["time"] = FormatTimeNs(clock_.WallNs());
  return out;
}

Result<json> Vault::ConfirmClock(const std::string& who) {
  std::lock_guard lock(clock_mu_);
  bool was_held = clock_watch_.held();
  std::string was = clock_watch_.HealthWarning();
  clock_watch_.Confirm(clock_.WallNs(), clock_.MonoNs());
  OSR_RETURN_IF_ERROR(catalog_->PutMeta("clock", clock_watch_.ToJson(boot_id_).dump()));
  spdlog::info("vault: {} confirmed the clock at {}{}", who, FormatTimeNs(clock_.WallNs()),
               was_held ? "; pruning resumes (was: " + was + ")" : "");
  json out = clock_watch_.StatusJson();
  out["time"] = FormatTimeNs(clock_.WallNs());
  out["was_held"] = was_held;
  return out;
}

Result<json> Vault::Protect(const std::string& vm, const std::string& target,
                            const std::string& policy) {
  auto v = catalog_->Vm(vm);
  if (!v) return NotFound("no VM named '" + vm + "' (osr vm list)");
  if (catalog_->Item(vm)) return Status(Code::kAlreadyExists, "VM " + vm + " is protected already");
  if (!catalog_->Site(target)) return NotFound("no site named '" + target + "' (osr site list)");
  if (target == v->site) return InvalidArgument("the target site must differ from the VM's site");
  if (!catalog_->Policy(policy)) return NotFound("no policy named '" + policy + "'");
  // The VM must be able to run at its recovery site too: the entries its spec names
  // must be in that site's allow-list (or that site must take literals).
  OSR_ASSIGN_OR_RETURN(auto spec,
                       hypervisor::ParseVmSpec(v->spec, hypervisor::SpecSource::kStored));
  if (spec.driver != hypervisor::Driver::kNone) {
    auto t = *catalog_->Site(target);
    OSR_ASSIGN_OR_RETURN(hypervisor::CommandPolicy at_target, SitePolicy(Client(t), t));
    Status st = hypervisor::CheckCommands(spec, at_target);
    if (!st.ok()) {
      return InvalidArgument(
          fmt::format("VM {} could not run at {} after a failover: {}", vm, target, st.message()));
    }
  }
  OSR_RETURN_IF_ERROR(
      catalog_->PutItem({vm, v->site, target, policy, "EnablingProtection", 1, nullptr, nullptr}));
  return Submit("enable-protection", vm, json::object());
}

Result<json> Vault::Unprotect(const std::string& vm) {
  auto item = catalog_->Item(vm);
  if (!item) return NotFound("VM " + vm + " is not protected");
  static const std::set<std::string> kBusy = {"FailingOver", "FailoverFailed", "FailedOver",
                                              "Committing", "Reprotecting"};
  if (kBusy.count(item->state)) {
    std::string what = item->state == "FailedOver" ? "commit the failover first, then unprotect"
                       : item->state == "FailoverFailed"
                           ? "run the failover again first (osr failover)"
                           : "wait for its job to end";
    return InvalidArgument(fmt::format("VM {} is {}: {}", vm, item->state, what));
  }
  // The item's jobs stop first (an initial copy, a drill waiting for its point): none of
  // them must go on against a store and an item that are going away, nor hold the VM
  // against the next protect.
  std::vector<int64_t> cancelled;
  for (JobState state : {JobState::kQueued, JobState::kRunning}) {
    for (auto& j : catalog_->Jobs(vm, state)) cancelled.push_back(j.id);
  }
  OSR_RETURN_IF_ERROR(CancelJobsOf(vm));
  item = catalog_->Item(vm);
  if (!item) {  // the cancelled enable-protection job removed what it had made
    return json{{"name", vm}, {"state", "Unprotected"}, {"cancelled_jobs", cancelled}};
  }
  if (item->state == "FailoverCommitted") {
    // Nothing replicates; the old primary keeps its fenced disks until deleted there.
    OSR_RETURN_IF_ERROR(catalog_->DeleteItemAndPoints(vm));
    return json{{"name", vm}, {"state", "Unprotected"}};
  }
  auto src = catalog_->Site(item->source);
  auto dst = catalog_->Site(item->target);
  if (src) {
    auto r = Client(*src).Call("DELETE", "/groups/" + vm + "/replication");
    if (!r.ok() && r.status().code() != Code::kNotFound) return r.status();
  }
  if (dst) {
    if (!item->drill.is_null()) {
      (void)Client(*dst).Call("DELETE", "/views/" + item->drill.value("view", std::string()));
    }
    auto r = Client(*dst).Call("DELETE", "/stores/" + vm);
    if (!r.ok() && r.status().code() != Code::kNotFound) return r.status();
  }
  OSR_RETURN_IF_ERROR(catalog_->DeleteItemAndPoints(vm));
  return json{{"name", vm}, {"state", "Unprotected"}, {"cancelled_jobs", cancelled}};
}

Result<json> Vault::CreatePoint(const std::string& vm, bool app) {
  auto item = catalog_->Item(vm);
  if (!item) return NotFound("VM " + vm + " is not protected");
  if (item->state == "EnablingProtection") {
    return InvalidArgument("VM " + vm + " is still being protected; wait for its job");
  }
  if (item->state != "Protected" && item->state != "TestFailoverCompleted") {
    return InvalidArgument(fmt::format(
        "VM {} is {}: recovery points are made while it is protected", vm, item->state));
  }
  auto v = catalog_->Vm(vm);
  auto site = v ? catalog_->Site(v->site) : std::nullopt;
  // App-consistent: quiesce first — the guest agent's fsfreeze (qemu driver) when it
  // answers, else the VM's freeze hook; the point marks the position taken while frozen,
  // and the thaw runs whatever happened. Without either, the point only marks the
  // position (quiesced_by: none).
  std::string quiesced_by = "none";
  hypervisor::VmSpec spec;
  if (app && v) {
    OSR_ASSIGN_OR_RETURN(spec, hypervisor::ParseVmSpec(v->spec, hypervisor::SpecSource::kStored));
  }
  if (app && v && site && spec.driver == hypervisor::Driver::kQemu) {
    auto f =
        Client(*site).Call("POST", "/groups/" + vm + "/vm/freeze", json{{"timeout_ms", 10000}});
    if (f.ok()) {
      quiesced_by = "guest-agent";
    } else {
      spdlog::info("vault: {}: guest agent freeze: {}", vm, f.status().message());
    }
  }
  if (app && v && quiesced_by == "none" && spec.hooks.count("freeze")) {
    Status f = RunHook(*v, "freeze", json::object());
    if (!f.ok()) {
      (void)RunHook(*v, "thaw", json::object());
      return Status(f.code(), "no app-consistent point: " + f.message());
    }
    quiesced_by = "hooks";
  }
  uint64_t want = 0;
  if (site) {
    auto g = Client(*site).Call("GET", "/groups/" + vm);
    if (g.ok()) want = (*g).value("last_seq", uint64_t{0});
  }
  if (quiesced_by == "guest-agent") {
    auto t = Client(*site).Call("POST", "/groups/" + vm + "/vm/thaw");
    if (!t.ok()) spdlog::warn("vault: {}: thaw: {}", vm, t.status().ToString());
  } else if (quiesced_by == "hooks") {
    Status t = RunHook(*v, "thaw", json::object());
    if (!t.ok()) spdlog::warn("vault: {}: {}", vm, t.ToString());
  }
  OSR_ASSIGN_OR_RETURN(PointRow p,
                       PointAtLatest(*item, app ? "app" : "crash", cfg_.call_wait_ms_max, want));
  json out = PointJson(p);
  if (app) out["quiesced_by"] = quiesced_by;
  return out;
}

Result<json> Vault::TestFailover(const std::string& vm, const std::string& spec) {
  auto item = catalog_->Item(vm);
  if (!item) return NotFound("VM " + vm + " is not protected: no drill is possible");
  if (item->state != "Protected") {
    return InvalidArgument(fmt::format("VM {} is {}: a drill needs Protected", vm, item->state));
  }
  if (spec != "latest") {  // check now, so that a bad SPEC fails before any job
    OSR_RETURN_IF_ERROR(ResolvePoint(*item, spec, nullptr).status());
  }
  return Submit("test-failover", vm, json{{"point", spec}});
}

Result<json> Vault::TestFailoverCleanup(const std::string& vm, const std::string& notes) {
  auto item = catalog_->Item(vm);
  if (!item) return NotFound("VM " + vm + " is not protected");
  if (item->state != "TestFailoverCompleted") {
    return InvalidArgument(
        fmt::format("VM {} is {}: there is no drill to clean up", vm, item->state));
  }
  return Submit("test-failover-cleanup", vm, json{{"notes", notes}});
}

Result<json> Vault::Failover(const std::string& vm, const std::string& spec, bool shutdown_source,
                             bool planned, bool start) {
  auto item = catalog_->Item(vm);
  if (!item) return NotFound("VM " + vm + " is not protected: there is nothing to fail over to");
  if (item->state != "Protected" && item->state != "FailoverFailed") {
    return InvalidArgument(
        fmt::format("VM {} is {}: failover needs Protected{}", vm, item->state,
                    item->state == "TestFailoverCompleted" ? " (clean up the drill first)" : ""));
  }
  if (planned && spec != "latest") {
    return InvalidArgument("a planned failover goes to the last write (no --point)");
  }
  if (planned) {
    auto src = catalog_->Site(item->source);
    if (!src) return NotFound("site " + item->source + " is not registered");
    auto g = Client(*src).Call("GET", "/groups/" + vm);
    if (!g.ok()) {
      return Unavailable(fmt::format(
          "a planned failover needs the source site ({}); nothing was changed — an unplanned "
          "failover (without --planned) does not need it",
          g.status().message()));
    }
  }
  if (spec != "latest") OSR_RETURN_IF_ERROR(ResolvePoint(*item, spec, nullptr).status());
  return Submit("failover", vm,
                json{{"point", spec},
                     {"shutdown_source", shutdown_source},
                     {"planned", planned},
                     {"start", start}});
}

Result<json> Vault::ChangePoint(const std::string& vm, const std::string& spec) {
  auto item = catalog_->Item(vm);
  if (!item) return NotFound("VM " + vm + " is not protected");
  if (item->state != "FailedOver") {
    return InvalidArgument(fmt::format(
        "VM {} is {}: the recovery point can change only after failover and before commit", vm,
        item->state));
  }
  if (spec == "latest") {
    return InvalidArgument(
        "after failover 'latest' means nothing new: pick a point (latest-processed, latest-app, "
        "an id or a time)");
  }
  OSR_RETURN_IF_ERROR(ResolvePoint(*item, spec, nullptr).status());
  return Submit("change-point", vm, json{{"point", spec}});
}

Result<json> Vault::Commit(const std::string& vm) {
  auto item = catalog_->Item(vm);
  if (!item) return NotFound("VM " + vm + " is not protected");
  if (item->state != "FailedOver") {
    return InvalidArgument(
        fmt::format("VM {} is {}: commit needs FailedOver (osr failover first)", vm, item->state));
  }
  return Submit("commit", vm, json::object());
}

Result<json> Vault::Reprotect(const std::string& vm, bool compare) {
  auto item = catalog_->Item(vm);
  if (!item) return NotFound("VM " + vm + " is not protected");
  if (item->state != "FailoverCommitted") {
    return InvalidArgument(fmt::format(
        "VM {} is {}: reprotect needs FailoverCommitted (failover, then commit)", vm, item->state));
  }
  auto old = catalog_->Site(item->source);
  if (!old) return NotFound("site " + item->source + " is not registered");
  if (auto s = Client(*old).Call("GET", "/site"); !s.ok()) {
    return Unavailable(
        fmt::format("reprotect needs site {}: {}", item->source, s.status().message()));
  }
  return Submit("reprotect", vm, json{{"compare", compare}});
}

Result<json> Vault::ListJobs(const std::string& vm, const std::string& state) {
  std::optional<JobState> wanted;
  if (!state.empty()) {
    wanted = JobStateFromName(state);
    if (!wanted) {
      return InvalidArgument("state: '" + state +
                             "' is not a job state (Queued, Running, Succeeded, Failed, "
                             "Cancelled)");
    }
  }
  json out = json::array();
  for (auto& j : catalog_->Jobs(vm, wanted)) out.push_back(JobJson(j));
  return out;
}

Result<json> Vault::ShowJob(int64_t id) {
  auto j = catalog_->Job(id);
  if (!j) return NotFound(fmt::format("no job {}", id));
  return JobJson(*j);
}

// ---- jobs ---------------------------------------------------------------------------

Result<json> Vault::Submit(const std::string& type, const std::string& vm, const json& args) {
  // One operation on a VM at a time: a second one would be checked against a state the
  // first is about to change.
  std::lock_guard submitting(submit_mu_);
  for (JobState state : {JobState::kQueued, JobState::kRunning}) {
    for (auto& other : catalog_->Jobs(vm, state)) {
      return Status(
          Code::kAlreadyExists,
          fmt::format("VM {} has job {} ({}) {}; wait for it (osr job wait {}) or "
                      "cancel it (osr job cancel {})",
                      vm, other.id, other.type, JobStateName(other.state), other.id, other.id));
    }
  }
  JobRow j;
  j.type = type;
  j.vm = vm;
  j.state = JobState::kQueued;
  j.args = args;
  j.created_ns = j.updated_ns = NowNs();
  OSR_ASSIGN_OR_RETURN(j.id, catalog_->AddJob(j));
  {
    std::lock_guard lock(mu_);
    if (leading_) queue_.push_back({j.id, j.vm});  // else the leader's poll takes it
  }
  cv_.notify_all();
  return JobJson(j);
}

void Vault::JobLoop() {
  for (;;) {
    int64_t id;
    std::string vm;
    JobCancel cancel;  // in running_ from the pick until `release` ends
    {
      std::unique_lock lock(mu_);
      // The oldest queued job whose VM has no job running: one VM's jobs run in order,
      // different VMs' at the same time (a DR event fails many VMs over at once).
      auto pick = [&] {
        return std::find_if(queue_.begin(), queue_.end(),
                            [&](const QueuedJob& q) { return !busy_vms_.count(q.vm); });
      };
      cv_.wait(lock,
               [&] { return stop_ || leader_stop_ || (jobs_started_ && pick() != queue_.end()); });
      if (stop_ || leader_stop_) return;
      auto it = pick();
      id = it->id;
      vm = it->vm;
      queue_.erase(it);
      busy_vms_.insert(vm);
      running_[id] = &cancel;
    }
    // After the job's last row is written: whoever waits for it to stop (CancelJob,
    // Unprotect) then reads its final state.
    struct Release {
      Vault* v;
      std::string vm;
      int64_t id;
      ~Release() {
        {
          std::lock_guard lock(v->mu_);
          v->busy_vms_.erase(vm);
          v->running_.erase(id);
        }
        v->cv_.notify_all();
      }
    } release{this, vm, id};
    auto j = catalog_->Job(id);
    if (!j) continue;
    // Taken in the catalog first: a job cancelled (or taken) meanwhile does not run.
    j->updated_ns = NowNs();
    Result<bool> claimed = catalog_->ClaimJob(id, j->updated_ns);
    LogIfFailed(claimed.status(), fmt::format("job {}: recording that it runs", id));
    if (!claimed.ok() || !*claimed) continue;
    j->state = JobState::kRunning;
    try {
      RunJob(*j, cancel);
    } catch (const std::exception& e) {
      // A bug, or a site's answer (or a stored spec) of a shape nobody expected: this
      // job fails with the reason, the vault and the other jobs go on.
      spdlog::error("job {} ({} {}): {}", j->id, j->type, j->vm, e.what());
      j->state = JobState::kFailed;
      j->error = std::string("the job stopped on unexpected data: ") + e.what();
    }
    // A job that returns without an end (a bug) must not stay Running for ever.
    if (!JobEnded(j->state)) {
      j->state = JobState::kFailed;
      if (j->error.empty()) j->error = "the job ended without a result";
    }
    j->updated_ns = NowNs();
    LogIfFailed(catalog_->UpdateJob(*j), fmt::format("job {}: recording its end", id));
    spdlog::info("job {} ({} {}): {}{}", j->id, j->type, j->vm, JobStateName(j->state),
                 j->error.empty() ? "" : ": " + j->error);
  }
}

// ---- cancelling jobs ------------------------------------------------------------------

Result<bool> Vault::RequestCancel(int64_t id) {
  {
    std::lock_guard lock(mu_);
    auto q =
        std::find_if(queue_.begin(), queue_.end(), [&](const QueuedJob& j) { return j.id == id; });
    if (q != queue_.end()) {
      queue_.erase(q);
    } else if (auto r = running_.find(id); r != running_.end()) {
      r->second->Cancel(JobCancel::Reason::kCancelled);
      return true;
    }
  }
  auto j = catalog_->Job(id);
  if (!j) return NotFound(fmt::format("no job {}", id));
  // Taken off the queue before it ran (or queued or run by another vault).
  return RequestCancelElsewhere(*j);
}

bool Vault::WaitJobStopped(int64_t id) {
  std::unique_lock lock(mu_);
  if (!leading_ && !running_.count(id)) {
    lock.unlock();
    return WaitJobEndedInCatalog(id);  // the leader runs it
  }
  return cv_.wait_for(lock, std::chrono::milliseconds(cfg_.job_cancel_wait_ms_max),
                      [&] { return !running_.count(id); });
}

Result<json> Vault::CancelJob(int64_t id) {
  OSR_ASSIGN_OR_RETURN(bool asked, RequestCancel(id));
  if (!asked) {
    auto j = catalog_->Job(id);
    if (!j) return NotFound(fmt::format("no job {}", id));
    // Not queued and not running here: it ended (or is being picked: say so).
    if (JobEnded(j->state)) {
      return Status(
          Code::kFailedPrecondition,
          fmt::format("job {} is {}: there is nothing to cancel", id, JobStateName(j->state)));
    }
    return Unavailable(
        fmt::format("job {} is {} and not running yet; try again", id, JobStateName(j->state)));
  }
  bool stopped = WaitJobStopped(id);
  OSR_ASSIGN_OR_RETURN(json out, ShowJob(id));
  if (!stopped) out["cancel_requested"] = true;
  return out;
}

Status Vault::CancelJobsOf(const std::string& vm) {
  std::vector<int64_t> ids;
  for (JobState state : {JobState::kQueued, JobState::kRunning}) {
    for (auto& j : catalog_->Jobs(vm, state)) ids.push_back(j.id);
  }
  for (int64_t id : ids) {
    OSR_ASSIGN_OR_RETURN(bool asked, RequestCancel(id));
    if (asked && !WaitJobStopped(id)) {
      return Unavailable(fmt::format(
          "job {} of VM {} was asked to stop but is still running after {} s (a site call "
          "under way); nothing was removed: try again when it has stopped (osr job show {})",
          id, vm, cfg_.job_cancel_wait_ms_max / 1000, id));
    }
  }
  return Status::Ok();
}

std::string Vault::StoreHistoryWarning(const ItemRow& item, const json& store) {
  json_in::Fields sf(store, "site " + item.target + " store " + item.vm + ".");
  uint64_t damaged = sf.U64("damaged_records", 0);
  if (damaged > 0) {
    return fmt::format(
        "Critical: {} record(s) of {}'s recovery store at {} failed their check when read "
        "(see that site's log): points that need them cannot be read, and the store does not "
        "fold or compact past them",
        damaged, item.vm, item.target);
  }
  if (const json* c = sf.Object("compaction"); c != nullptr) {
    json_in::Fields cf(*c, "site " + item.target + " store " + item.vm + ".compaction.");
    if (cf.String("state", "") == "failed") {
      return fmt::format(
          "Warning: history compaction of {}'s recovery store at {} failed ({}); the journal "
          "keeps versions no kept point needs until the next one, after the next thinning",
          item.vm, item.target, cf.String("error", "?").substr(0, 300));
    }
  }
  return "";
}

std::string Vault::ReplicationTrouble(const ItemRow& item, const json& store) {
  // What stops it, as the sites say: the store's last failed write, the sender's error.
  json_in::Fields sf(store);
  if (const json* we = sf.Object("write_error"); we != nullptr) {
    json_in::Fields wf(*we);
    return fmt::format(": the recovery store cannot write ({}: {})", wf.String("what", "?"),
                       wf.String("message", "?").substr(0, 300));
  }
  auto src = catalog_->Site(item.source);
  if (!src) return "";
  auto g = Client(*src).Call("GET", "/groups/" + item.vm);
  if (!g.ok()) return ": " + g.status().message();
  json_in::Fields gf(*g);
  const json* repl = gf.Object("replication");
  if (repl == nullptr) return ": replication is not running at " + item.source;
  std::string err = json_in::Fields(*repl).String("last_error", "");
  if (!err.empty()) return ": replication from " + item.source + ": " + err.substr(0, 300);
  return "; is replication running?";
}

Result<PointRow> Vault::PointAtLatest(const ItemRow& item, const std::string& type, int wait_ms,
                                      uint64_t want, JobCancel* cancel) {
  auto src = catalog_->Site(item.source);
  auto dst = catalog_->Site(item.target);
  if (!src || !dst) return NotFound("a site of the item is not registered");
  if (want == 0) {
    OSR_ASSIGN_OR_RETURN(json g, Client(*src).Call("GET", "/groups/" + item.vm));
    json_in::Fields gf(g, "site " + item.source + " group.");
    want = gf.U64("last_seq", 0);
    if (!gf.ok()) return gf.status();
  }
  // Process everything still pending: wait until the recovery site has it.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(wait_ms);
  for (;;) {
    if (stopping_) return Unavailable("the vault is stopping");
    if (cancel) OSR_RETURN_IF_ERROR(cancel->Check());
    OSR_ASSIGN_OR_RETURN(json st, Client(*dst).Call("GET", "/stores/" + item.vm));
    json_in::Fields sf(st, "site " + item.target + " store.");
    uint64_t durable = sf.U64("durable_seq", 0);
    int64_t durable_ns = sf.I64("durable_time_ns", 0);
    if (!sf.ok()) return sf.status();
    // A point needs a consistent state: not inside a resynchronization.
    if (durable >= want && StoreConsistentAt(st, want)) {
      // Nothing new since the newest point: that point is the latest (no twin).
      auto points = catalog_->Points(item.vm);
      if (!points.empty() && points.back().seq == want &&
          (type == "crash" || points.back().type == type)) {
        return points.back();
      }
      PointRow p{0, item.vm, want, durable == want && durable_ns != 0 ? durable_ns : NowNs(), type};
      if (p.time_ns == 0) p.time_ns = NowNs();
      OSR_ASSIGN_OR_RETURN(p.id, catalog_->AddPoint(p));
      return p;
    }
    if (std::chrono::steady_clock::now() > deadline) {
      return Unavailable(
          fmt::format("the recovery site has seq {} of {} after {} s{}{} (osr item "
                      "show {})",
                      durable, want, wait_ms / 1000,
                      StoreConsistentAt(st, durable) ? "" : " and is resynchronizing",
                      ReplicationTrouble(item, st), item.vm));
    }
    if (cancel) {
      OSR_RETURN_IF_ERROR(cancel->Sleep(std::chrono::milliseconds(100)));
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
}

Result<PointRow> Vault::ResolvePoint(const ItemRow& item, const std::string& spec,
                                     JobCancel* cancel) {
  auto points = catalog_->Points(item.vm);
  if (spec == "latest") return PointAtLatest(item, "crash", cfg_.job_wait_ms_max, 0, cancel);
  if (spec == "latest-processed") {
    if (points.empty()) return NotFound("VM " + item.vm + " has no recovery point yet");
    return points.back();
  }
  if (spec == "latest-app") {
    for (auto it = points.rbegin(); it != points.rend(); ++it) {
      if (it->type == "app") return *it;
    }
    return NotFound("VM " + item.vm + " has no app-consistent point (osr point create " + item.vm +
                    " --app)");
  }
  int64_t id = 0;
  auto [p, ec] = std::from_chars(spec.data(), spec.data() + spec.size(), id);
  if (ec == std::errc() && p == spec.data() + spec.size()) {
    for (auto& pt : points) {
      if (pt.id == id) return pt;
    }
    return NotFound(
        fmt::format("VM {} has no recovery point {} (osr point list {})", item.vm, id, item.vm));
  }
  if (LooksLikeTime(spec)) {
    OSR_ASSIGN_OR_RETURN(int64_t t, ParseTimeNs(spec));
    // Within one clock era: a time a stepped clock read twice is refused (point_at_time.h).
    return PointAtTime(points, t, item.vm, spec);
  }
  return InvalidArgument("'" + spec +
                         "' is not a point: latest, latest-processed, "
                         "latest-app, a point id, or an RFC 3339 time");
}

void Vault::RunEnableProtection(JobRow& job, ItemRow item, const SiteRow& src, const SiteRow& dst,
                                Steps& steps) {
  // A step that fails or is cancelled leaves nothing behind: replication stopped, the
  // store removed, the item deleted — the VM is unprotected again and can be protected
  // anew. The job says so, or names what could not be removed.
  auto undo = [&](const Status& st, bool replication_started, bool store_made) {
    if (steps.cancel() && steps.cancel()->ByVault()) {
      // Not the operator's wish: everything stays as it is (unprotect, or protect again).
      return steps.Fail(st);
    }
    std::vector<std::string> left;
    if (replication_started) {
      auto r = Client(src).Call("DELETE", "/groups/" + job.vm + "/replication");
      if (!r.ok() && r.status().code() != Code::kNotFound) {
        left.push_back(fmt::format("replication from {} may still run ({}): osr unprotect {}",
                                   src.name, r.status().message(), job.vm));
      }
    }
    if (store_made) {
      auto r = Client(dst).Call("DELETE", "/stores/" + job.vm);
      if (!r.ok() && r.status().code() != Code::kNotFound) {
        left.push_back(fmt::format("the recovery store at {} was kept ({}): osr unprotect {}",
                                   dst.name, r.status().message(), job.vm));
      }
    }
    if (Status d = catalog_->DeleteItem(job.vm); !d.ok()) {
      left.push_back("the item stays in the catalog (" + d.message() + "): osr unprotect " +
                     job.vm);
    }
    std::string what =
        left.empty()
            ? fmt::format(
                  "{}{}the VM is unprotected again (osr protect {} --target {})",
                  replication_started ? "replication from " + src.name + " was stopped, " : "",
                  store_made ? "the store at " + dst.name + " was removed; " : "", job.vm, dst.name)
            : fmt::format("{}", fmt::join(left, "; "));
    if (st.code() == Code::kCancelled) return steps.Fail(steps.Cancelled(what));
    steps.Fail(Status(st.code(), st.message() + " (" + what + ")"));
  };
  auto v = catalog_->Vm(job.vm);
  if (!v) return undo(NotFound("VM " + job.vm + " is not registered"), false, false);
  if (Status c = steps.Check(); !c.ok()) return undo(c, false, false);
  steps.Begin(fmt::format("Create the recovery store at {}", item.target));
  // "full": the disks may hold data already; their allocated regions go first.
  auto r = Client(dst).Call(
      "PUT", "/stores/" + job.vm,
      json{{"disks", v->disks}, {"start", "full"}, {"epoch", item.epoch}, {"source", item.source}});
  if (!r.ok() && r.status().code() == Code::kAlreadyExists && job.args.contains("resumed")) {
    r = json::object();  // made before the vault restarted
  }
  if (!r.ok()) return undo(r.status(), false, false);
  steps.Done(10);
  if (Status c = steps.Check(); !c.ok()) return undo(c, false, true);
  steps.Begin(fmt::format("Start replication from {}", item.source));
  r = StartReplication(item, src, dst);
  if (!r.ok()) return undo(r.status(), true, true);
  steps.Done(20);
  steps.Begin("Initial replication");
  // No deadline while it moves (a big disk under a low bandwidth limit takes its time);
  // it fails when nothing moved for job_wait_ms_max, and stops when cancelled.
  if (Status w = WaitForReplica(job.vm, src, dst, steps, 20, 95); !w.ok()) {
    return undo(
        w.code() == Code::kCancelled ? w : Status(w.code(), "initial replication: " + w.message()),
        true, true);
  }
  steps.Done(95);
  item.state = "Protected";
  if (Status p = catalog_->PutItem(item); !p.ok()) return steps.Fail(p);
  steps.Begin("First recovery point");
  auto p = PointAtLatest(item, "crash", cfg_.job_wait_ms_max, 0, steps.cancel());
  if (!p.ok()) {
    return steps.Fail(
        p.status().code() == Code::kCancelled
            ? steps.Cancelled(
                  fmt::format("the VM is protected; points come by themselves (every {} s "
                              "under its policy)",
                              catalog_->Policy(item.policy).value_or(PolicyRow{}).crash_interval_s))
            : p.status());
  }
  steps.Done(100);
  job.state = JobState::kSucceeded;
}

void Vault::RunJob(JobRow& job, JobCancel& cancel) {
  Steps steps(catalog_.get(), &job, &cancel);
  auto found = catalog_->FindItem(job.vm);
  if (!found.ok()) return steps.Fail(found.status());  // a catalog that cannot be read
  std::optional<ItemRow>& item = *found;
  if (!item) {
    steps.Fail(NotFound("VM " + job.vm + " is no longer protected"));
    return;
  }
  // The item may have moved on since the job was queued (or a resumed job finished its
  // part): a job runs only from a state it was made for, else it changes nothing.
  {
    const std::string& st = item->state;
    bool resumed_epoch =
        job.args.contains("epoch") && job.args["epoch"].get<uint64_t>() == item->epoch;
    bool ok =
        job.type == "failover" ? st == "Protected" || st == "FailoverFailed" ||
                                     ((st == "FailingOver" || st == "FailedOver") && resumed_epoch)
        : job.type == "change-point" ? st == "FailedOver"
        : job.type == "commit"       ? st == "FailedOver" || st == "Committing"
        : job.type == "reprotect"    ? st == "FailoverCommitted" || st == "Reprotecting" ||
                                        (st == "Protected" && job.args.value("swapped", false))
        : job.type == "test-failover"         ? st == "Protected"
        : job.type == "test-failover-cleanup" ? st == "TestFailoverCompleted"
        : job.type == "enable-protection"     ? st == "EnablingProtection"
                                              : true;
    if (!ok) {
      steps.Fail(InvalidArgument(
          fmt::format("VM {} is {} now: a {} job cannot run from there; nothing was changed",
                      job.vm, st, job.type)));
      return;
    }
  }
  if (job.type == "failover") return RunFailover(job, *item, cancel);
  if (job.type == "change-point") return RunChangePoint(job, *item, cancel);
  if (job.type == "commit") return RunCommit(job, *item, cancel);
  if (job.type == "reprotect") return RunReprotect(job, *item, cancel);
  auto src = catalog_->Site(item->source);
  auto dst = catalog_->Site(item->target);
  if (!src || !dst) {
    steps.Fail(NotFound("a site of the item is not registered"));
    return;
  }
  auto fail = [&](const Status& st) {
    steps.Fail(st);
    return;
  };

  if (job.type == "enable-protection") return RunEnableProtection(job, *item, *src, *dst, steps);

  if (job.type == "test-failover") {
    steps.Begin("Resolve the recovery point");
    auto p = ResolvePoint(*item, job.args.value("point", std::string("latest")), &cancel);
    if (!p.ok() && p.status().code() == Code::kCancelled) {
      return fail(steps.Cancelled("no drill disk was opened; the item stays Protected"));
    }
    if (!p.ok()) return fail(p.status());
    // Retention keeps the point from now on: until the item records the drill, by this
    // pin; then because the drill stands on it.
    std::optional<PointPin> pin;
    if (Status pinned = PinPoint(job.vm, p->id, "test-failover", pin); !pinned.ok()) {
      return fail(pinned);
    }
    steps.Progress(30,
                   fmt::format("point {} (seq {}, {})", p->id, p->seq, FormatTimeNs(p->time_ns)));
    steps.Done(40);
    steps.Begin(fmt::format("Open the drill disks at {}", item->target));
    auto v = Client(*dst).Call("POST", "/stores/" + job.vm + "/views",
                               json{{"seq", p->seq}, {"writable", true}});
    if (!v.ok()) return fail(v.status());
    steps.Done(100);
    item->state = "TestFailoverCompleted";
    item->drill = {{"view", (*v)["id"]}, {"point", PointJson(*p)}, {"disks", (*v)["disks"]}};
    if (Status st = catalog_->PutItem(*item); !st.ok()) {
      // Unrecorded, nothing would name the drill disks: they are closed again.
      auto closed =
          Client(*dst).Call("DELETE", "/views/" + item->drill.value("view", std::string()));
      return fail(AlsoFailed(Status(st.code(),
                                    "the drill disks were opened but could not be "
                                    "recorded, so they are closed again: " +
                                        st.message()),
                             "closing them", closed.status()));
    }
    job.result = {{"disks", (*v)["disks"]}, {"point", PointJson(*p)}};
    job.state = JobState::kSucceeded;
    return;
  }

  if (job.type == "test-failover-cleanup") {
    steps.Begin("Remove the drill disks and their writes");
    auto r = Client(*dst).Call("DELETE", "/views/" + item->drill.value("view", std::string()));
    if (!r.ok() && r.status().code() != Code::kNotFound) return fail(r.status());
    steps.Done(100);
    item->state = "Protected";
    item->drill = nullptr;
    if (Status st = catalog_->PutItem(*item); !st.ok()) {
      return fail(Status(st.code(),
                         "the drill disks are removed, but the item still says "
                         "TestFailoverCompleted (clean up again to record it): " +
                             st.message()));
    }
    job.result = {{"notes", job.args.value("notes", std::string())}};
    job.state = JobState::kSucceeded;
    return;
  }
  fail(InvalidArgument("unknown job type " + job.type));
}

// ---- points -------------------------------------------------------------------------

Result<json> Vault::StartReplication(const ItemRow& item, const SiteRow& from, const SiteRow& to) {
  auto policy = catalog_->Policy(item.policy).value_or(PolicyRow{"default"});
  return Client(from).Call("PUT", "/groups/" + item.vm + "/replication",
                           json{{"target", to.replication},
                                {"target_site", to.name},
                                {"epoch", item.epoch},
                                {"compression", policy.compression},
                                {"bandwidth_bytes_per_second", policy.bandwidth_bytes_per_second}});
}

void Vault::ReconcileReplication(const ItemRow& item, SiteStatusBoard& board) {
  auto src = board.Site(item.source);
  auto dst = board.Site(item.target);
  if (!src || !dst) return;
  auto g = board.Group(*src, item.vm);
  if (!g.ok()) return;
  json_in::Fields gf(*g, "site " + item.source + " group " + item.vm + ".");
  std::string to = gf.String("replicate_to", "");
  // A quarantined group replicates nothing until it is repaired (its health says so).
  if (!gf.ok() || gf.Object("damage") != nullptr || to == dst->replication) return;
  if (to.empty() && board.Store(*dst, item.vm).status().code() == Code::kNotFound) {
    // Replication off and no store at the target: the catalog says more than the sites
    // (one restored from a backup after an unprotect). Its health says so; restarting
    // replication to a site that will refuse it helps nobody.
    return;
  }
  spdlog::info("vault: {}: pointing replication at {} ({})", item.vm, item.target,
               dst->replication);
  auto r = StartReplication(item, *src, *dst);
  if (!r.ok()) {
    // Once per cause, not once per tick.
    std::lock_guard lock(logged_mu_);
    std::string& last = reconcile_logged_[item.vm];
    if (last != r.status().ToString()) {
      last = r.status().ToString();
      spdlog::warn("vault: {}: {}", item.vm, last);
    }
  }
}

void Vault::PointLoop() {
  constexpr int64_t kRpoSampleNs = 5'000'000'000;  // the chart's resolution
  int64_t last_rpo_sample_mono_ns = INT64_MIN / 2;
  for (;;) {
    {
      std::unique_lock lock(mu_);
      if (cv_.wait_for(lock, std::chrono::milliseconds(cfg_.point_tick_ms),
                       [&] { return stop_ || leader_stop_; })) {
        return;
      }
    }
    ObserveClock();
    int64_t mono_ns = clock_.MonoNs();
    bool sample_rpo = mono_ns - last_rpo_sample_mono_ns >= kRpoSampleNs;
    if (sample_rpo) last_rpo_sample_mono_ns = mono_ns;
    int64_t tick_ns = clock_.WallNs();
    // Each site is asked once for all its groups and stores, not once per item.
    SiteStatusBoard board = StatusBoard(SiteStatusBoard::Mode::kBulk);
    TickSamples samples;  // written after the items, one transaction each
    for (auto& item : catalog_->Items()) {
      // One item's trouble (a site answering nonsense, a bug) must not stop the points
      // and the RPO of the others.
      try {
        PointTick(item, tick_ns, sample_rpo ? &samples : nullptr, board);
      } catch (const std::exception& e) {
        spdlog::error("vault: points of {}: {}", item.vm, e.what());
      }
    }
    constexpr int64_t kRpoKeepNs = 3600'000'000'000;  // the chart's span
    LogIfFailed(catalog_->AddRpoSamples(samples.rpo, tick_ns - kRpoKeepNs), "RPO samples");
    LogIfFailed(catalog_->PutItemHealth(samples.health), "the items' health");
    point_tick_times_.Note(
        sample_rpo ? PointTickTimes::Kind::kPointsAndRpo : PointTickTimes::Kind::kPoints,
        clock_.MonoNs() - mono_ns);
  }
}

void Vault::ForgetUnreadablePoints(const ItemRow& item, const std::string& site, uint64_t floor) {
  // A resync (after an overflow, a cut log, a store put back) folds the store's history:
  // points below its new floor cannot be opened. They go from the catalog, said once,
  // rather than stay listed and fail when chosen. Points in use stay (their pins keep a
  // resync from passing them).
  std::vector<int64_t> gone;
  {
    std::lock_guard lock(points_mu_);
    auto in_use = PointsInUseLocked(item);
    for (const auto& p : catalog_->Points(item.vm)) {
      if (p.seq >= floor || in_use.count(p.id)) continue;
      if (Status st = catalog_->DeletePoint(p.id); !st.ok()) {
        spdlog::warn("vault: point {} of {}: {}", p.id, item.vm, st.ToString());
        continue;
      }
      gone.push_back(p.id);
    }
  }
  if (!gone.empty()) {
    spdlog::warn(
        "vault: {}: point(s) {} can no longer be read at {} (its history before seq {} was "
        "folded by a resynchronization): removed from the catalog",
        item.vm, fmt::join(gone, ", "), site, floor);
  }
}

void Vault::PointTick(const ItemRow& item, int64_t tick_ns, TickSamples* tick,
                      SiteStatusBoard& board) {
  // What asks the sources (fencing a returning old primary, re-pointing replication, the
  // health and RPO) runs on the sampling ticks, every 5 s: the other ticks only make the
  // points that are due, from the recovery sites' stores. (A returning old primary's
  // records are refused by epoch meanwhile, invariant 5.)
  bool full = tick != nullptr;
  if (full && !item.failover.is_null() && item.state != "FailingOver") {
    ReconcileFencing(item, board);
  }
  if (full && (item.state == "Protected" || item.state == "TestFailoverCompleted")) {
    json shown = ItemJson(item, board);
    if (shown["health"].is_string()) {
      tick->health.push_back({item.vm, shown["health"].get<std::string>(), tick_ns});
    }
    if (shown["rpo_seconds"].is_number()) {
      tick->rpo.push_back({item.vm, tick_ns, shown["rpo_seconds"].get<double>()});
    }
  }
  if (item.state != "Protected" && item.state != "TestFailoverCompleted") return;
  if (full) ReconcileReplication(item, board);
  auto policy = catalog_->Policy(item.policy);
  auto dst = board.Site(item.target);
  if (!policy || !dst) return;
  if (!PointDue(item.vm, catalog_->LatestPoint(item.vm), policy->crash_interval_s)) return;
  auto st = board.Store(*dst, item.vm);
  if (!st.ok()) {  // no new point while the recovery site is away
    NotePointTrouble(item.vm, st.status().message());
    return;
  }
  json_in::Fields f(*st, "site " + dst->name + " store " + item.vm + ".");
  uint64_t durable = f.U64("durable_seq", 0);
  int64_t t = f.I64("durable_time_ns", 0);
  uint64_t base_seq = f.U64("base_seq", 0);
  uint64_t consistent_from = f.U64("consistent_from", 0);
  if (!f.ok()) {
    spdlog::warn("vault: no point for {}: {}", item.vm, f.status().message());
    NotePointTrouble(item.vm, f.status().message());
    return;
  }
  ForgetUnreadablePoints(item, dst->name, std::max(base_seq, consistent_from));
  auto points = catalog_->Points(item.vm);
  if (!points.empty() && durable <= points.back().seq) {  // nothing new: nothing to cover
    std::lock_guard lock(points_mu_);
    schedules_[item.vm].covered_mono_ns = clock_.MonoNs();
    return;
  }
  // Points pause while a resynchronization runs: no state there is consistent.
  if (!StoreConsistentAt(*st, durable)) {
    NotePointTrouble(item.vm, "the recovery site holds no consistent state (resynchronizing)");
    return;
  }
  // The point's time is when its newest write was captured (the source's clock).
  PointRow p{0, item.vm, durable, t ? t : clock_.WallNs(), "crash"};
  auto pruned = AddPointWithRetention(item.vm, *policy, p);
  if (!pruned.ok()) {
    spdlog::error("vault: point of {} at seq {}: {}", item.vm, durable, pruned.status().ToString());
    NotePointTrouble(item.vm, pruned.status().message());
    return;
  }
  // The store may forget the history before the oldest point left (none while a clock
  // step holds pruning: the fold is what cannot be undone).
  if (PruningHeld()) return;
  auto left = catalog_->Points(item.vm);
  if (!left.empty() && left.front().seq > base_seq) {
    auto fold =
        Client(*dst).Call("POST", "/stores/" + item.vm + "/fold", json{{"seq", left.front().seq}});
    LogIfFailed(fold.status(), "fold of " + item.vm);
  }
  // Thinning removed points: the versions no kept point sees go too (history compaction,
  // RecoveryStore::Compact), up to the newest point that thinning has reached.
  if (*pruned) CompactThinnedHistory(item.vm, *dst, left);
}

void Vault::CompactThinnedHistory(const std::string& vm, const SiteRow& site,
                                  const std::vector<PointRow>& points) {
  if (points.empty()) return;
  int64_t newest_ns = 0;
  for (auto& p : points) newest_ns = std::max(newest_ns, p.time_ns);
  uint64_t through = 0;
  std::vector<uint64_t> keep;
  for (auto& p : points) {
    if (p.time_ns > newest_ns - kThinAfterNs) break;  // the last hour is not thinned
    through = p.seq;
    keep.push_back(p.seq);
  }
  if (through == 0 || through <= points.front().seq) return;
  auto r = Client(site).Call("POST", "/stores/" + vm + "/compact",
                             json{{"keep", keep}, {"through", through}});
  LogIfFailed(r.status(), "history compaction of " + vm);
}

bool Vault::PointDue(const std::string& vm, const std::optional<PointRow>& latest,
                     int64_t interval_s) {
  const int64_t interval_ns = interval_s * 1000000000;
  const int64_t mono_ns = clock_.MonoNs();
  std::lock_guard lock(points_mu_);
  PointSchedule& s = schedules_[vm];
  if (s.covered_mono_ns == 0) s.covered_mono_ns = mono_ns;  // first sight: a grace period
  if (!latest) return true;
  if (latest->id != s.last_point_id) {
    // A newer point (made here, by a job or on request) starts the interval again. At
    // the first sight after a start, the wall clock says how old it is — clamped to
    // [0, interval], so a stepped clock moves the next point by at most one interval.
    int64_t age_ns = 0;
    if (s.last_point_id == 0) {
      age_ns = std::clamp<int64_t>(clock_.WallNs() - latest->time_ns, 0, interval_ns);
    }
    s.last_point_id = latest->id;
    s.last_point_mono_ns = mono_ns - age_ns;
  }
  return mono_ns - s.last_point_mono_ns >= interval_ns;
}

void Vault::NotePointTrouble(const std::string& vm, const std::string& why) {
  std::lock_guard lock(points_mu_);
  schedules_[vm].last_error = why;
}

Result<bool> Vault::AddPointWithRetention(const std::string& vm, const PolicyRow& policy,
                                          const PointRow& p) {
  // Under points_mu_: a job pins its point under it too, and the item (its drill, its
  // failover) is read fresh here, so a point is pinned, or recorded as in use, or seen
  // deleted by the job — never deleted under a job that holds it.
  std::lock_guard lock(points_mu_);
  std::vector<int64_t> prune;
  if (!PruningHeld()) {
    auto item = catalog_->Item(vm);
    if (!item) return NotFound("VM " + vm + " is no longer protected");
    std::set<int64_t> keep;
    for (auto& [id, use] : PointsInUseLocked(*item)) keep.insert(id);
    auto points = catalog_->Points(vm);
    points.push_back(p);  // the new point is the newest: never pruned
    prune = PointsToPrune(points, keep, clock_.WallNs(), policy.retention_s * 1000000000);
  }
  OSR_ASSIGN_OR_RETURN(int64_t id, catalog_->AddPointAndPrune(p, prune));
  PointSchedule& s = schedules_[vm];
  s.last_point_id = id;
  s.last_point_mono_ns = s.covered_mono_ns = clock_.MonoNs();
  s.last_error.clear();
  return !prune.empty();
}

std::string Vault::PointOverdueWarning(const ItemRow& item, const std::optional<PointRow>& latest,
                                       uint64_t durable_seq) {
  // Room for a slow site call or a busy point thread beyond two intervals.
  constexpr int64_t kSlackNs = 10'000'000'000;
  if (!latest || durable_seq <= latest->seq) return "";  // nothing new, or no point yet
  if (item.state != "Protected" && item.state != "TestFailoverCompleted") return "";
  auto policy = catalog_->Policy(item.policy);
  if (!policy) return "";
  int64_t uncovered_ns = 0;
  std::string last_error;
  {
    std::lock_guard lock(points_mu_);
    auto it = schedules_.find(item.vm);
    if (it == schedules_.end() || it->second.covered_mono_ns == 0) return "";
    uncovered_ns = clock_.MonoNs() - it->second.covered_mono_ns;
    last_error = it->second.last_error;
  }
  return PointOverdueText(uncovered_ns, durable_seq, *latest, policy->crash_interval_s, kSlackNs,
                          last_error);
}

void Vault::ObserveClock() {
  std::lock_guard lock(clock_mu_);
  auto change = clock_watch_.Observe(clock_.WallNs(), clock_.MonoNs());
  switch (change) {
    case ClockWatch::Change::kNone:
      return;
    case ClockWatch::Change::kStepped:
      spdlog::warn("vault: {}", clock_watch_.HealthWarning());
      break;
    case ClockWatch::Change::kReturned:
      spdlog::info(
          "vault: the wall clock is back in step with the monotonic clock: pruning "
          "of recovery points resumes");
      break;
    case ClockWatch::Change::kSettled:
      spdlog::info(
          "vault: the wall clock kept time since its last step: pruning of recovery "
          "points resumes on the time it shows ({})",
          FormatTimeNs(clock_.WallNs()));
      break;
    case ClockWatch::Change::kAnchored:
    case ClockWatch::Change::kConfirmed:
      break;
  }
  // The state is saved so that a restarted vault keeps its hold and its anchor.
  LogIfFailed(catalog_->PutMeta("clock", clock_watch_.ToJson(boot_id_).dump()),
              "saving the clock's state");
}

bool Vault::PruningHeld() {
  std::lock_guard lock(clock_mu_);
  return clock_watch_.held();
}

Status Vault::PinPoint(const std::string& vm, int64_t id, const std::string& use,
                       std::optional<PointPin>& pin) {
  std::lock_guard lock(points_mu_);
  bool exists = false;
  for (auto& p : catalog_->Points(vm)) exists = exists || p.id == id;
  if (!exists) {
    return NotFound(
        fmt::format("recovery point {} of VM {} was deleted by retention as it was chosen; choose "
                    "another (osr point list {})",
                    id, vm, vm));
  }
  pins_[vm][id] = use;
  pin.emplace(this, vm, id);
  return Status::Ok();
}

Vault::PointPin::~PointPin() {
  std::lock_guard lock(v_->points_mu_);
  auto it = v_->pins_.find(vm_);
  if (it == v_->pins_.end()) return;
  it->second.erase(id_);
  if (it->second.empty()) v_->pins_.erase(it);
}

std::map<int64_t, std::string> Vault::PointsInUseLocked(const ItemRow& item) {
  std::map<int64_t, std::string> out;
  // The item's JSON columns are read back through the checked layer (a row is input).
  auto point_id = [](const json& holder) -> int64_t {
    if (!holder.is_object()) return 0;
    json_in::Fields f(holder);
    const json* point = f.Object("point");
    if (point == nullptr || !f.ok()) return 0;
    json_in::Fields pf(*point);
    int64_t id = pf.I64("id", 0);
    return pf.ok() ? id : 0;
  };
  static const std::set<std::string> kFailedOverStates = {"FailingOver", "FailoverFailed",
                                                          "FailedOver", "Committing"};
  if (int64_t id = point_id(item.drill); id != 0) out[id] = "test-failover";
  if (kFailedOverStates.count(item.state)) {
    if (int64_t id = point_id(item.failover); id != 0) out[id] = "failover";
  }
  if (auto it = pins_.find(item.vm); it != pins_.end()) {
    for (auto& [id, use] : it->second) out.emplace(id, use);
  }
  return out;
}

json Vault::PointJsonFor(const PointRow& p, const std::map<int64_t, std::string>& in_use) {
  json out = PointJson(p);
  if (auto it = in_use.find(p.id); it != in_use.end()) out["in_use"] = it->second;
  return out;
}

}  // namespace osr::vault
