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
#include "vault/api_json.h"
#include "vault/job_steps.h"
#include "vault/point_at_time.h"
#include "vault/retention.h"
#include "vault/workflow_steps.h"

namespace osr::vault {

using nlohmann::json;

namespace {

// kInvalidArgument naming the item's state and why, unless its state allows `a`
// (item_state.h, the one table).
Status CheckAllows(const ItemRow& item, Action a) {
  if (Allows(item.state, a)) return Status::Ok();
  return InvalidArgument(Refusal(item.vm, item.state, a));
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

namespace {

// Whether `host` is a host name (labels of letters, digits and '-', not at a label's ends;
// RFC 1123) or an IPv4 literal. IPv6 goes in brackets (CheckPeerHostPort).
bool HostNameOk(std::string_view host) {
  if (host.empty() || host.size() > 253) return false;
  size_t start = 0;
  while (start <= host.size()) {
    size_t dot = host.find('.', start);
    std::string_view label =
        host.substr(start, dot == std::string_view::npos ? host.npos : dot - start);
    if (label.empty() || label.size() > 63 || label.front() == '-' || label.back() == '-') {
      return false;
    }
    for (char c : label) {
      if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-') return false;
    }
    if (dot == std::string_view::npos) break;
    start = dot + 1;
  }
  return true;
}

// A peer's "HOST:PORT" as the vault keeps and calls it: a host name, an IPv4 literal or a
// bracketed IPv6 literal, and a port 1..65535 (no default, no user, no scheme, no path).
Result<ListenAddress> CheckPeerHostPort(std::string_view what, const std::string& text) {
  auto bad = [&](std::string_view why) {
    return InvalidArgument(fmt::format(
        "{}: the site's HOST:PORT ([IPv6]:PORT), a port 1..65535, nothing else ({})", what, why));
  };
  if (text.size() > 300) return bad("longer than 300 bytes");
  for (unsigned char c : text) {
    if (!std::isalnum(c) && c != '.' && c != '-' && c != ':' && c != '[' && c != ']') {
      return bad(c == '@' ? "no user or password in it" : "a character that is not one");
    }
  }
  auto a = ParseHostPort(text, 0);
  if (!a.ok()) return bad(a.status().message());
  bool bracketed = !text.empty() && text[0] == '[';
  if (a->port == 0) return bad("no port, or port 0");
  if (bracketed ? a->host.find(':') == std::string::npos ||
                      a->host.find_first_not_of("0123456789abcdefABCDEF:.") != std::string::npos
                : !HostNameOk(a->host)) {
    return bad("'" + a->host + "' is not a host name or address");
  }
  return *a;
}

}  // namespace

Result<json> Vault::RegisterSite(const std::string& name, const std::string& api_in,
                                 const std::string& replication, bool replace) {
  if (!ValidName(name)) return InvalidArgument("'" + name + "' is not a valid site name");
  if (name == "vault") {
    return InvalidArgument(
        "'vault' is the name the sites know the vault by (its certificate's CN, site config "
        "api_vault_name): a site needs another name");
  }
  bool https = api_in.rfind("https://", 0) == 0;
  if (!https && api_in.rfind("http://", 0) != 0) {
    return InvalidArgument("api: the site's https://HOST:PORT/api/v1");
  }
  // The address is shown (site list, errors, audit rows) and called: no credentials in it,
  // nothing a client would drop or treat apart (query, fragment), no spaces or control bytes.
  if (api_in.size() > 1000) return InvalidArgument("api: longer than 1000 bytes");
  for (unsigned char c : api_in) {
    if (c <= 0x20 || c >= 0x7f || c == '?' || c == '#') {
      return InvalidArgument(
          "api: the site's https://HOST:PORT/api/v1, without a query, a fragment, spaces or "
          "bytes past ASCII");
    }
  }
  std::string rest = api_in.substr(https ? 8 : 7);
  std::string hostport = rest.substr(0, rest.find('/'));
  std::string path = rest.substr(hostport.size());
  if (hostport.find('@') != std::string::npos) {
    return InvalidArgument(
        "api: no user or password in the address (sites are authenticated by mutual TLS)");
  }
  // The vault calls PATH/groups/..., so the path is the site API's own (a trailing '/' goes).
  if (path != "/api/v1" && path != "/api/v1/") {
    return InvalidArgument("api: the site's https://HOST:PORT/api/v1 (the path is /api/v1, not '" +
                           path + "')");
  }
  const std::string api = (https ? "https://" : "http://") + hostport + "/api/v1";
  OSR_ASSIGN_OR_RETURN(auto api_addr, CheckPeerHostPort("api", hostport));
  if (!https && !IsLoopbackHost(api_addr.host)) {
    return InvalidArgument(
        "api: a site on another host is reached over https:// (mutual TLS); http:// only on "
        "loopback");
  }
  OSR_RETURN_IF_ERROR(CheckPeerHostPort("replication", replication).status());
  OSR_ASSIGN_OR_RETURN(auto old, catalog_->FindSite(name));
  if (old && (old->api != api || old->replication != replication)) {
    OSR_ASSIGN_OR_RETURN(std::vector<VmRow> vms, catalog_->ListVms());
    OSR_ASSIGN_OR_RETURN(std::vector<ItemRow> items, catalog_->ListItems());
    bool in_use = false;
    for (auto& v : vms) in_use = in_use || v.site == name;
    for (auto& i : items) in_use = in_use || i.source == name || i.target == name;
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

Result<json> Vault::ListSites() {
  OSR_ASSIGN_OR_RETURN(std::vector<SiteRow> sites, catalog_->ListSites());
  json out = json::array();
  for (auto& s : sites) {
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

Result<json> Vault::ListPolicies() {
  OSR_ASSIGN_OR_RETURN(std::vector<PolicyRow> policies, catalog_->ListPolicies());
  json out = json::array();
  for (auto& p : policies) out.push_back(PolicyJson(p));
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
  OSR_ASSIGN_OR_RETURN(auto existing, catalog_->FindVm(name));
  if (existing) return Status(Code::kAlreadyExists, "VM " + name + " exists");
  OSR_ASSIGN_OR_RETURN(auto s, catalog_->FindSite(site));
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
    auto undone = Client(*s).Call("DELETE", "/groups/" + name);  // nothing half-done
    return AlsoFailed(st, "removing the disks made at " + site, undone.status());
  }
  return ShowVm(name);
}

Result<json> Vault::ListVms() {
  OSR_ASSIGN_OR_RETURN(std::vector<VmRow> vms, catalog_->ListVms());
  json out = json::array();
  for (auto& v : vms) {
    auto shown = ShowVm(v.name);
    out.push_back(shown.ok() ? *shown : json{{"name", v.name}, {"site", v.site}});
  }
  return out;
}

Result<json> Vault::ShowVm(const std::string& name) {
  OSR_ASSIGN_OR_RETURN(auto v, catalog_->FindVm(name));
  if (!v) return NotFound("no VM named '" + name + "'");
  json out = {{"name", v->name}, {"site", v->site}};
  json disks = json::array();
  OSR_ASSIGN_OR_RETURN(auto s, catalog_->FindSite(v->site));
  Result<json> g = s ? Client(*s).Call("GET", "/groups/" + name)
                     : Result<json>(NotFound("site " + v->site + " is not registered"));
  // The site's disks when it answers (the truth: a change it finished after a restart
  // the vault did not hear of; the catalog learns them at the next change, failover or
  // protect), else the catalog's.
  bool from_site = g.ok() && g->is_object() && !g->contains("damage") && g->contains("disks") &&
                   (*g)["disks"].is_array() && !(*g)["disks"].empty();
  for (size_t i = 0; from_site && i < (*g)["disks"].size(); ++i) {
    const json& sd = (*g)["disks"][i];
    from_site = sd.is_object() && sd.contains("name") && sd["name"].is_string() &&
                sd.contains("size_bytes") && sd["size_bytes"].is_number_unsigned();
  }
  if (from_site) {
    for (const json& sd : (*g)["disks"]) {
      disks.push_back({{"name", sd["name"]},
                       {"size_bytes", sd["size_bytes"]},
                       {"uri", sd.contains("uri") ? sd["uri"] : json()}});
    }
  } else {
    for (size_t i = 0; i < v->disks.size(); ++i) {
      json d = {{"name", v->disks[i]["name"]}, {"size_bytes", v->disks[i]["size_bytes"]}};
      d["uri"] = json();
      if (g.ok() && g->is_object() && g->contains("disks") && (*g)["disks"].is_array() &&
          i < (*g)["disks"].size() && (*g)["disks"][i].is_object() &&
          (*g)["disks"][i].contains("uri")) {
        d["uri"] = (*g)["disks"][i]["uri"];
      }
      disks.push_back(d);
    }
  }
  out["disks"] = disks;
  auto spec = hypervisor::ParseVmSpec(v->spec, hypervisor::SpecSource::kStored);
  out["driver"] = spec.ok() ? std::string(hypervisor::DriverName(spec->driver)) : "invalid";
  out["spec"] = v->spec;
  if (!spec.ok()) out["spec_error"] = spec.status().message();
  bool running = false;
  if (g.ok()) {
    const json* vm = json_in::Fields(*g).Object("vm");
    running = vm != nullptr && json_in::Fields(*vm).Bool("running", false);
  }
  out["running"] = running;
  out["running_site"] = v->site;
  OSR_ASSIGN_OR_RETURN(auto item, catalog_->FindItem(name));
  out["epoch"] = item ? item->epoch : 1;
  out["state"] = ItemStateName(item ? item->state : ItemState::kUnprotected);
  if (!g.ok()) out["site_error"] = g.status().message();
  if (g.ok() && g->is_object() && g->contains("damage")) {
    out["site_error"] = QuarantineHealth(name + "'s disks at " + v->site, (*g)["damage"]);
  }
  return out;
}

Status Vault::RecordVmDisks(const std::string& vm, const json& site_disks) {
  json disks = json::array();
  if (!site_disks.is_array() || site_disks.empty()) {
    return InvalidArgument("a VM's disks are a list of at least one");
  }
  for (const json& d : site_disks) {
    json_in::Fields df(d, "disks[].");
    std::string n = df.String("name");
    uint64_t size = df.U64("size_bytes");
    if (!df.ok()) return df.status();
    disks.push_back({{"name", n}, {"size_bytes", size}});
  }
  return catalog_->Transact([&]() -> Status {
    OSR_ASSIGN_OR_RETURN(auto v, catalog_->FindVm(vm));
    if (!v) return NotFound("no VM named '" + vm + "'");
    if (v->disks == disks) return Status::Ok();
    spdlog::info("vault: VM {}: its disks are now {}", vm, disks.dump());
    v->disks = disks;
    return catalog_->UpdateVm(*v);
  });
}

Result<json> Vault::ChangeVmDisk(const std::string& name, const std::string& disk,
                                 uint64_t size_bytes, bool add) {
  // The name goes into the site's URL path: only a name (no '/', '?', '#', NUL...).
  if (!ValidName(disk)) return InvalidArgument("'" + disk + "' is not a valid disk name");
  OSR_ASSIGN_OR_RETURN(auto v, catalog_->FindVm(name));
  if (!v) return NotFound("no VM named '" + name + "'");
  OSR_ASSIGN_OR_RETURN(auto s, catalog_->FindSite(v->site));
  if (!s) return NotFound("site " + v->site + " is not registered");
  // The site decides whether the disk exists (its disks are the truth, and the check and
  // the change are one step there, so two callers cannot both add one disk).
  auto changed = Client(*s).Call("PUT", "/groups/" + name + "/disks/" + disk,
                                 json{{"size_bytes", size_bytes}, {"add", add}});
  if (!changed.ok()) {
    // Whatever happened there, the catalog learns the disks the site has now.
    if (auto g = Client(*s).Call("GET", "/groups/" + name); g.ok() && g->contains("disks")) {
      if (Status st = RecordVmDisks(name, (*g)["disks"]); !st.ok()) {
        spdlog::warn("vault: VM {}: {}", name, st.ToString());
      }
    }
    return changed.status();
  }
  json_in::Fields f(*changed, "site " + v->site + ": ");
  const json* disks = f.Array("disks");
  uint64_t seq = f.U64("seq");
  bool added = f.Bool("added", add);
  bool restart = f.Bool("restart_needed", false);
  if (!f.ok()) return f.status();
  OSR_RETURN_IF_ERROR(RecordVmDisks(name, *disks));
  OSR_ASSIGN_OR_RETURN(json shown, ShowVm(name));
  return json{{"vm", shown}, {"seq", seq}, {"added", added}, {"restart_needed", restart}};
}

Result<json> Vault::StartVm(const std::string& name) {
  OSR_ASSIGN_OR_RETURN(auto v, catalog_->FindVm(name));
  if (!v) return NotFound("no VM named '" + name + "'");
  OSR_ASSIGN_OR_RETURN(auto spec,
                       hypervisor::ParseVmSpec(v->spec, hypervisor::SpecSource::kStored));
  if (spec.driver == hypervisor::Driver::kNone) {
    return InvalidArgument("VM " + name + " has no driver (osr vm create --driver)");
  }
  OSR_ASSIGN_OR_RETURN(auto s, catalog_->FindSite(v->site));
  if (!s) return NotFound("site " + v->site + " is not registered");
  OSR_RETURN_IF_ERROR(Client(*s).Call("POST", "/groups/" + name + "/vm/start", v->spec).status());
  return ShowVm(name);
}

// A new capture log at `site` for `vm` starts above what its recovery store holds, so
// that replication goes on (1 when the VM is not protected from that site).
Result<uint64_t> Vault::FirstSeqAfterStore(const std::string& vm, const std::string& site) {
  OSR_ASSIGN_OR_RETURN(auto item, catalog_->FindItem(vm));
  if (!item || item->source != site) return uint64_t{1};
  OSR_ASSIGN_OR_RETURN(auto dst, catalog_->FindSite(item->target));
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
  OSR_ASSIGN_OR_RETURN(auto vm, catalog_->FindVm(name));
  if (!vm) return NotFound("no VM named '" + name + "'");
  std::vector<SiteRow> sites;
  if (!site.empty()) {
    OSR_ASSIGN_OR_RETURN(auto s, catalog_->FindSite(site));
    if (!s) return NotFound("site " + site + " is not registered");
    sites.push_back(*s);
  } else {
    OSR_ASSIGN_OR_RETURN(sites, catalog_->ListSites());
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
  OSR_ASSIGN_OR_RETURN(auto v, catalog_->FindVm(name));
  if (!v) return NotFound("no VM named '" + name + "'");
  OSR_ASSIGN_OR_RETURN(auto s, catalog_->FindSite(v->site));
  if (!s) return NotFound("site " + v->site + " is not registered");
  OSR_ASSIGN_OR_RETURN(json r, Client(*s).Call("POST", "/groups/" + name + "/vm/stop",
                                               json{{"timeout_ms", timeout_ms}}));
  OSR_ASSIGN_OR_RETURN(json out, ShowVm(name));
  out["stopped_cleanly"] = json_in::Fields(r).Bool("clean", true);
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
                            const std::string& policy, bool dry_run) {
  OSR_ASSIGN_OR_RETURN(auto v, catalog_->FindVm(vm));
  if (!v) return NotFound("no VM named '" + vm + "' (osr vm list)");
  OSR_ASSIGN_OR_RETURN(auto item, catalog_->FindItem(vm));
  if (item) return Status(Code::kAlreadyExists, "VM " + vm + " is protected already");
  OSR_ASSIGN_OR_RETURN(auto target_site, catalog_->FindSite(target));
  if (!target_site) return NotFound("no site named '" + target + "' (osr site list)");
  if (target == v->site) return InvalidArgument("the target site must differ from the VM's site");
  OSR_ASSIGN_OR_RETURN(auto policy_row, catalog_->FindPolicy(policy));
  if (!policy_row) return NotFound("no policy named '" + policy + "'");
  // The VM must be able to run at its recovery site too (the entries its spec names in
  // that site's allow-list, or literals allowed there): the site's `commands` check below.
  OSR_ASSIGN_OR_RETURN(auto spec,
                       hypervisor::ParseVmSpec(v->spec, hypervisor::SpecSource::kStored));
  // The recovery site must hold the store: what the disks hold now (allocated), and the
  // journal the policy implies; and run the VM after a failover (its networks, QEMU).
  uint64_t full = DisksFullBytes(*v), allocated = 0;
  if (auto src = catalog_->FindSite(v->site); src.ok() && src->has_value()) {
    if (auto g = Client(**src).Call("GET", "/groups/" + vm); g.ok()) {
      json_in::Fields gf(*g, "site " + v->site + " group.");
      if (const json* ds = gf.Array("disks"); ds != nullptr) {
        for (auto& d : *ds) allocated += json_in::Fields(d).U64("allocated_bytes", 0);
      }
    }
  }
  uint64_t headroom = JournalHeadroomBytes(*policy_row, full);
  json needs = {{"role", "production"},
                {"name_free", "store"},
                {"bytes_needed", allocated + headroom},
                {"bytes_headroom", headroom},
                {"bytes_full", full + headroom}};
  if (spec.driver != hypervisor::Driver::kNone) needs["spec"] = v->spec;
  json plan = PlanAt(
      *target_site, "protect", vm, needs,
      json::array({fmt::format("replication of {} from {} (new; policy {})", vm, v->site, policy)}),
      json::array());
  if (dry_run) return json{{"plan", plan}};
  OSR_RETURN_IF_ERROR(PlanRefusal(plan));
  OSR_RETURN_IF_ERROR(catalog_->PutItem(
      {vm, v->site, target, policy, ItemState::kEnablingProtection, 1, nullptr, nullptr}));
  return Submit(JobType::kEnableProtection, vm, json::object());
}

Result<json> Vault::Unprotect(const std::string& vm) {
  OSR_ASSIGN_OR_RETURN(auto item, catalog_->FindItem(vm));
  if (!item) return NotFound("VM " + vm + " is not protected");
  OSR_RETURN_IF_ERROR(CheckAllows(*item, Action::kUnprotect));
  // The item's jobs stop first (an initial copy, a drill waiting for its point): none of
  // them must go on against a store and an item that are going away, nor hold the VM
  // against the next protect.
  std::vector<int64_t> cancelled;
  for (JobState state : {JobState::kQueued, JobState::kRunning}) {
    OSR_ASSIGN_OR_RETURN(std::vector<JobRow> jobs, catalog_->ListJobs(vm, state));
    for (auto& j : jobs) cancelled.push_back(j.id);
  }
  OSR_RETURN_IF_ERROR(CancelJobsOf(vm));
  OSR_ASSIGN_OR_RETURN(item, catalog_->FindItem(vm));
  if (!item) {  // the cancelled enable-protection job removed what it had made
    return json{{"name", vm},
                {"state", ItemStateName(ItemState::kUnprotected)},
                {"cancelled_jobs", cancelled}};
  }
  if (item->state == ItemState::kFailoverCommitted) {
    // Nothing replicates; the old primary keeps its fenced disks until deleted there.
    OSR_RETURN_IF_ERROR(catalog_->DeleteItemAndPoints(vm));
    return json{{"name", vm}, {"state", ItemStateName(ItemState::kUnprotected)}};
  }
  OSR_ASSIGN_OR_RETURN(auto src, catalog_->FindSite(item->source));
  OSR_ASSIGN_OR_RETURN(auto dst, catalog_->FindSite(item->target));
  if (src) {
    auto r = Client(*src).Call("DELETE", "/groups/" + vm + "/replication");
    if (!r.ok() && r.status().code() != Code::kNotFound) return r.status();
  }
  if (dst) {
    if (!item->drill.is_null()) {
      // The store's DELETE below removes its views too; this only closes the drill first.
      auto closed = Client(*dst).Call("DELETE", "/views/" + DrillView(*item));
      LogIfFailed(closed.status(), vm + ": closing the drill disks before unprotect");
    }
    auto r = Client(*dst).Call("DELETE", "/stores/" + vm);
    if (!r.ok() && r.status().code() != Code::kNotFound) return r.status();
  }
  OSR_RETURN_IF_ERROR(catalog_->DeleteItemAndPoints(vm));
  return json{{"name", vm},
              {"state", ItemStateName(ItemState::kUnprotected)},
              {"cancelled_jobs", cancelled}};
}

Result<json> Vault::CreatePoint(const std::string& vm, bool app) {
  OSR_ASSIGN_OR_RETURN(auto item, catalog_->FindItem(vm));
  if (!item) return NotFound("VM " + vm + " is not protected");
  OSR_RETURN_IF_ERROR(CheckAllows(*item, Action::kCreatePoint));
  OSR_ASSIGN_OR_RETURN(auto v, catalog_->FindVm(vm));
  std::optional<SiteRow> site;
  if (v) {
    OSR_ASSIGN_OR_RETURN(site, catalog_->FindSite(v->site));
  }
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
      LogIfFailed(RunHook(*v, "thaw", json::object()),
                  vm + ": the thaw hook after a failed freeze");
      return Status(f.code(), "no app-consistent point: " + f.message());
    }
    quiesced_by = "hooks";
  }
  uint64_t want = 0;
  if (site) {
    auto g = Client(*site).Call("GET", "/groups/" + vm);
    if (g.ok()) want = json_in::Fields(*g).U64("last_seq", 0);
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

Result<json> Vault::TestFailover(const std::string& vm, const std::string& spec, bool start,
                                 bool dry_run) {
  OSR_ASSIGN_OR_RETURN(auto item, catalog_->FindItem(vm));
  if (!item) return NotFound("VM " + vm + " is not protected: no drill is possible");
  OSR_RETURN_IF_ERROR(CheckAllows(*item, Action::kTestFailover));
  std::string at = "the latest point";
  std::optional<uint64_t> seq;  // of a point picked now: the site sizes its disks
  if (spec != "latest") {       // check now, so that a bad SPEC fails before any job
    OSR_ASSIGN_OR_RETURN(auto p, ResolvePoint(*item, spec, nullptr));
    at = fmt::format("point {} (seq {})", p.id, p.seq);
    seq = p.seq;
  }
  OSR_ASSIGN_OR_RETURN(auto v, catalog_->FindVm(vm));
  if (!v) return NotFound("no VM named '" + vm + "'");
  start = start && Driver(*v) != "none";
  OSR_ASSIGN_OR_RETURN(auto dst, catalog_->FindSite(item->target));
  if (!dst) return NotFound("site " + item->target + " is not registered");
  // A drill writes into overlays over the store: nothing is needed before it starts, and
  // its writes may take up to the disks' full size (a warning when that is not free).
  json needs = {{"role", "drill"}, {"bytes_full", DisksFullBytes(*v)}};
  if (seq) needs["seq"] = *seq;
  json creates = json::array({fmt::format("drill disks of {} at {} (writable; new)", vm, at)});
  if (start) {
    needs["spec"] = v->spec;
    // A process VM is a command on the site's host: no network of its own to isolate, no
    // console line or guest agent to check.
    creates.push_back(
        Driver(*v) == "process"
            ? fmt::format("drill VM {}: its command, on the recovery site's host (a process "
                          "VM: not in a drill network, no boot check) (new)",
                          vm)
            : fmt::format("drill VM {} on the drill networks, with a boot check (new)", vm));
  }
  json plan = PlanAt(*dst, "test-failover", vm, needs, creates, json::array(), &*v);
  if (dry_run) return json{{"plan", plan}};
  OSR_RETURN_IF_ERROR(PlanRefusal(plan));
  return Submit(JobType::kTestFailover, vm, json{{"point", spec}, {"start", start}});
}

Result<json> Vault::TestFailoverCleanup(const std::string& vm, const std::string& notes) {
  OSR_ASSIGN_OR_RETURN(auto item, catalog_->FindItem(vm));
  if (!item) return NotFound("VM " + vm + " is not protected");
  OSR_RETURN_IF_ERROR(CheckAllows(*item, Action::kTestFailoverCleanup));
  return Submit(JobType::kTestFailoverCleanup, vm, json{{"notes", notes}});
}

Result<json> Vault::Failover(const std::string& vm, const std::string& spec, bool shutdown_source,
                             bool planned, bool start, bool dry_run) {
  OSR_ASSIGN_OR_RETURN(auto item, catalog_->FindItem(vm));
  if (!item) return NotFound("VM " + vm + " is not protected: there is nothing to fail over to");
  OSR_RETURN_IF_ERROR(CheckAllows(*item, Action::kFailover));
  if (planned && spec != "latest") {
    return InvalidArgument("a planned failover goes to the last write (no --point)");
  }
  if (planned) {
    OSR_ASSIGN_OR_RETURN(auto src, catalog_->FindSite(item->source));
    if (!src) return NotFound("site " + item->source + " is not registered");
    auto g = Client(*src).Call("GET", "/groups/" + vm);
    if (!g.ok()) {
      return Unavailable(fmt::format(
          "a planned failover needs the source site ({}); nothing was changed — an unplanned "
          "failover (without --planned) does not need it",
          g.status().message()));
    }
  }
  std::string at = planned ? "the last write" : "the latest point";
  std::optional<uint64_t> seq;  // of a point picked now: the site sizes its disks
  if (spec != "latest") {
    OSR_ASSIGN_OR_RETURN(auto p, ResolvePoint(*item, spec, nullptr));
    at = fmt::format("point {} (seq {})", p.id, p.seq);
    seq = p.seq;
  }
  OSR_ASSIGN_OR_RETURN(auto v, catalog_->FindVm(vm));
  if (!v) return NotFound("no VM named '" + vm + "'");
  OSR_ASSIGN_OR_RETURN(auto dst, catalog_->FindSite(item->target));
  if (!dst) return NotFound("site " + item->target + " is not registered");
  bool runs = start && Driver(*v) != "none";
  // A failover run again after FailoverFailed finds the disks its first run made (the
  // site answers the same seq and epoch again): they are not a name clash then.
  // The failover disks are overlays over the store (nothing needed at once); commit copies
  // them into images of the disks' full size (a warning when that is not free).
  json needs = {{"role", "production"},
                {"name_free", item->state == ItemState::kFailoverFailed ? "none" : "group"},
                {"bytes_full", DisksFullBytes(*v)}};
  if (seq) needs["seq"] = *seq;
  json creates =
      json::array({fmt::format("disks of {} at {} over {} (new; the recovery "
                               "points stay until commit)",
                               vm, item->target, at)});
  if (runs) {
    needs["spec"] = v->spec;
    creates.push_back(
        fmt::format("VM {} running at {} on its production networks", vm, item->target));
  }
  json deletes = json::array();
  if (shutdown_source || planned) {
    deletes.push_back(
        fmt::format("the VM at {} is shut down (its disks stay, fenced)", item->source));
  } else {
    deletes.push_back(fmt::format(
        "writes to the VM's disks at {} are refused from then on (fenced); a VM running there "
        "is not shut down (--shutdown-source does)",
        item->source));
  }
  json plan = PlanAt(*dst, "failover", vm, needs, creates, deletes, &*v);
  if (dry_run) return json{{"plan", plan}};
  OSR_RETURN_IF_ERROR(PlanRefusal(plan));
  return Submit(JobType::kFailover, vm,
                json{{"point", spec},
                     {"shutdown_source", shutdown_source},
                     {"planned", planned},
                     {"start", start}});
}

Result<json> Vault::ChangePoint(const std::string& vm, const std::string& spec) {
  OSR_ASSIGN_OR_RETURN(auto item, catalog_->FindItem(vm));
  if (!item) return NotFound("VM " + vm + " is not protected");
  OSR_RETURN_IF_ERROR(CheckAllows(*item, Action::kChangePoint));
  if (spec == "latest") {
    return InvalidArgument(
        "after failover 'latest' means nothing new: pick a point (latest-processed, latest-app, "
        "an id or a time)");
  }
  OSR_RETURN_IF_ERROR(ResolvePoint(*item, spec, nullptr).status());
  return Submit(JobType::kChangePoint, vm, json{{"point", spec}});
}

Result<json> Vault::Commit(const std::string& vm) {
  OSR_ASSIGN_OR_RETURN(auto item, catalog_->FindItem(vm));
  if (!item) return NotFound("VM " + vm + " is not protected");
  OSR_RETURN_IF_ERROR(CheckAllows(*item, Action::kCommit));
  return Submit(JobType::kCommit, vm, json::object());
}

Result<Vault::ReprotectStart> Vault::HowReprotectStarts(const ItemRow& item, const VmRow& vm,
                                                        const SiteRow& old) {
  ReprotectStart start;
  start.store_there = Client(old).Call("GET", "/stores/" + vm.name).ok();
  if (start.store_there) return start;  // an earlier reprotect's: the job goes on with it
  auto g = Client(old).Call("GET", "/groups/" + vm.name);
  if (!g.ok() && g.status().code() != Code::kNotFound) return g.status();
  if (!g.ok()) {
    start.full_copy = true;
    start.why = "the old primary has no disk of this VM";
  } else {
    json_in::Fields gf(*g, "site " + old.name + " group " + vm.name + ".");
    const json* damage = gf.Object("damage");
    std::string kind = damage != nullptr ? json_in::Fields(*damage).String("kind", "") : "";
    if (!gf.ok()) return gf.status();
    OSR_ASSIGN_OR_RETURN(bool same, GroupHasTheVmsDisks(*g, vm, old.name));
    if (damage != nullptr && kind == "image_missing") {
      start.full_copy = true;
      start.why = "its disks at " + old.name + " are missing";
    } else if (damage == nullptr && !same) {
      start.full_copy = true;
      start.why = "its disks at " + old.name +
                  " are not the VM's now (a disk was added or grown after the point it failed "
                  "over to)";
    }
    if (start.full_copy) {
      std::string names;
      if (const json* ds = json_in::Fields(*g).Array("disks"); ds != nullptr) {
        for (auto& d : *ds) {
          json_in::Fields df(d);
          names += fmt::format("{}{} ({})", names.empty() ? "" : ", ", df.String("name", "?"),
                               FormatSize(df.U64("size_bytes", 0)));
        }
      }
      start.deletes.push_back(fmt::format("disks of {} at {}: {}", vm.name, old.name, names));
    }
  }
  if (start.full_copy) {
    // What the VM's disks hold now, where it runs (the item's target since failover).
    if (auto cur = catalog_->FindSite(item.target); cur.ok() && cur->has_value()) {
      if (auto cg = Client(**cur).Call("GET", "/groups/" + vm.name); cg.ok()) {
        if (const json* ds = json_in::Fields(*cg).Array("disks"); ds != nullptr) {
          for (auto& d : *ds) start.allocated += json_in::Fields(d).U64("allocated_bytes", 0);
        }
      }
    }
  }
  return start;
}

Result<json> Vault::Reprotect(const std::string& vm, bool compare, bool dry_run) {
  OSR_ASSIGN_OR_RETURN(auto item, catalog_->FindItem(vm));
  if (!item) return NotFound("VM " + vm + " is not protected");
  OSR_RETURN_IF_ERROR(CheckAllows(*item, Action::kReprotect));
  OSR_ASSIGN_OR_RETURN(auto old, catalog_->FindSite(item->source));
  if (!old) return NotFound("site " + item->source + " is not registered");
  if (auto s = Client(*old).Call("GET", "/site"); !s.ok()) {
    return Unavailable(
        fmt::format("reprotect needs site {}: {}", item->source, s.status().message()));
  }
  OSR_ASSIGN_OR_RETURN(auto v, catalog_->FindVm(vm));
  if (!v) return NotFound("no VM named '" + vm + "'");
  OSR_ASSIGN_OR_RETURN(auto policy_row, catalog_->FindPolicy(item->policy));
  uint64_t full = DisksFullBytes(*v);
  uint64_t headroom = policy_row ? JournalHeadroomBytes(*policy_row, full) : 0;
  OSR_ASSIGN_OR_RETURN(ReprotectStart start, HowReprotectStarts(*item, *v, *old));
  // The old primary's disks become a recovery store there (no copy): it needs the journal
  // headroom. A full copy needs what the VM's disks hold now too. Either way it must be
  // able to run the VM again at failback.
  json needs = {{"role", "production"},
                {"name_free", "store"},
                {"bytes_needed", start.full_copy ? start.allocated + headroom : headroom},
                {"bytes_headroom", headroom},
                {"bytes_full", start.full_copy ? full + headroom : headroom}};
  // A store of the VM there already is an earlier reprotect's, cut short after the old
  // disks became it: this one goes on from there (the job finds it), not refused for it.
  if (start.store_there) needs.erase("name_free");
  if (Driver(*v) != "none") needs["spec"] = v->spec;
  std::string how =
      start.full_copy
          ? "a full (sparse) copy: " + start.why
          : fmt::format(
                "the old disks at {} become its recovery store, only the differences are "
                "sent",
                item->source);
  json plan = PlanAt(*old, "reprotect", vm, needs,
                     json::array({fmt::format("replication of {} from {} to {} (new; {})", vm,
                                              item->target, item->source, how)}),
                     start.deletes);
  if (dry_run) return json{{"plan", plan}};
  OSR_RETURN_IF_ERROR(PlanRefusal(plan));
  return Submit(JobType::kReprotect, vm, json{{"compare", compare}});
}

}  // namespace osr::vault
