#include "site/site_api.h"

#include <fmt/format.h>
#include <httplib.h>
#include <spdlog/spdlog.h>

#include <charconv>

#include "common/https.h"
#include "common/json_in.h"

namespace osr::site {

using nlohmann::json;

namespace {

// Region lists and disk hashes of reprotect can be large (8 bytes per 64 KiB region).
constexpr size_t kBodyBytesMax = 64 << 20;
// The most kept points one compaction takes (15 days of points every 5 minutes: 4320).
constexpr size_t kCompactKeepMax = 100000;

// Epochs the vault gives: from 1 (a new item) up to the store's limit.
constexpr json_in::U64Range kEpochRange{1, store::kEpochMax};

void Reply(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(body.dump(), "application/json");
}

void Error(httplib::Response& res, const Status& st) {
  Reply(res, HttpStatusFor(st),
        json{{"error", {{"code", std::string(CodeName(st.code()))}, {"message", st.message()}}}});
}

template <typename T>
void ReplyResult(httplib::Response& res, const Result<T>& r, int ok_status = 200) {
  if (r.ok()) {
    Reply(res, ok_status, r.value());
  } else {
    Error(res, r.status());
  }
}

void ReplyStatus(httplib::Response& res, const Status& st, int ok_status = 204) {
  if (st.ok()) {
    res.status = ok_status;
  } else {
    Error(res, st);
  }
}

Result<json> Body(const httplib::Request& req) {
  if (req.body.empty()) return json::object();
  return json_in::ParseObject(req.body, "the body", kBodyBytesMax);
}

Result<std::vector<DiskSpec>> Disks(const json& j) {
  if (!j.contains("disks") || !j["disks"].is_array()) return InvalidArgument("'disks' is missing");
  std::vector<DiskSpec> out;
  for (auto& d : j["disks"]) {
    if (!d.is_object() || !d.contains("name") || !d["name"].is_string() ||
        !d.contains("size_bytes") || !d["size_bytes"].is_number_unsigned()) {
      return InvalidArgument("each disk needs 'name' and 'size_bytes'");
    }
    out.push_back({d["name"].get<std::string>(), d["size_bytes"].get<uint64_t>()});
  }
  return out;
}

// One query parameter as a whole number up to `max`: missing (nullopt), or digits only,
// given once.
Result<std::optional<uint64_t>> QueryU64(const httplib::Request& req, const char* name,
                                         uint64_t max) {
  if (!req.has_param(name)) return std::optional<uint64_t>();
  if (req.get_param_value_count(name) != 1) {
    return InvalidArgument(fmt::format("query parameter '{}' is given more than once", name));
  }
  const std::string v = req.get_param_value(name);
  uint64_t n = 0;
  auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
  if (v.empty() || ec != std::errc() || end != v.data() + v.size() || n > max) {
    return InvalidArgument(
        fmt::format("query parameter '{}' must be a whole number up to {}", name, max));
  }
  return std::optional<uint64_t>(n);
}

struct ConsoleRead {
  std::optional<uint64_t> offset;
  size_t bytes = 16 * 1024;
};

Result<ConsoleRead> ConsoleQuery(const httplib::Request& req) {
  for (auto& [k, unused] : req.params) {
    if (k != "offset" && k != "bytes") {
      return InvalidArgument("query parameter '" + k + "' is not one of offset, bytes");
    }
  }
  ConsoleRead q;
  OSR_ASSIGN_OR_RETURN(q.offset, QueryU64(req, "offset", uint64_t{1} << 62));
  OSR_ASSIGN_OR_RETURN(auto bytes, QueryU64(req, "bytes", VmRunner::kConsoleTailBytesMax));
  if (bytes && *bytes == 0) return InvalidArgument("query parameter 'bytes' must be at least 1");
  if (bytes) q.bytes = static_cast<size_t>(*bytes);
  return q;
}

}  // namespace

SiteApi::SiteApi(Site* site) : site_(site) {
  const SiteConfig& cfg = site_->config();
  if (cfg.tls.enabled() && !cfg.api_insecure) {
    // Mutual TLS: only a certificate from the sites' CA that names the vault gets in.
    auto server = std::make_unique<httplib::SSLServer>([&](SSL_CTX& ctx) {
      setup_ = ConfigureServerTls(&ctx, cfg.tls, {cfg.api_vault_name});
      return setup_.ok();
    });
    if (setup_.ok() && !server->is_valid()) setup_ = InvalidArgument("the API's TLS setup failed");
    http_ = std::move(server);
  } else {
    http_ = std::make_unique<httplib::Server>();
    if (!cfg.api_insecure) {
      setup_ = InvalidArgument(
          "the site API needs tls_ca, tls_cert and tls_key (it answers only the vault's "
          "certificate), or api_insecure = true for a lab on loopback");
    }
  }
  auto tokens = LeaseTokenFence::Open(cfg.data_dir + "/" + LeaseTokenFence::kFileName);
  if (tokens.ok()) {
    lease_tokens_ = std::move(*tokens);
  } else if (setup_.ok()) {
    setup_ = tokens.status();
  }
  auto& h = *http_;
  h.set_socket_options(ExclusiveListenerOptions);
  h.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
    // Defence in depth: the handshake already refused other certificates.
    const SiteConfig& c = site_->config();
    if (req.ssl != nullptr && PeerCommonName(req.ssl) != c.api_vault_name) {
      Error(res, Status(Code::kPermissionDenied, "this API answers only the vault"));
      return httplib::Server::HandlerResponse::Handled;
    }
    return httplib::Server::HandlerResponse::Unhandled;
  });
  h.set_exception_handler(
      [](const httplib::Request& req, httplib::Response& res, std::exception_ptr ep) {
        std::string what = "unknown";
        try {
          if (ep) std::rethrow_exception(ep);
        } catch (const std::exception& e) {
          what = e.what();
        } catch (...) {
        }
        spdlog::error("site api: {} {}: {}", req.method, req.path, what);
        Error(res, Internal("the site failed to handle this call: " + what));
      });
  h.set_payload_max_length(kBodyBytesMax);
  Add("GET", "/api/v1/site", [this](const httplib::Request&, httplib::Response& res) {
    json d = site_->Describe();
    d["lease_token"] = lease_tokens_->highest();  // the highest vault lease token seen
    Reply(res, 200, d);
  });
  Add("GET", "/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(site_->Metrics(), "text/plain; version=0.0.4");
  });
  // Every group's and every store's status in one answer (what the per-VM GETs below say,
  // as an array): the vault asks once per tick, not once per VM.
  Add("GET", "/api/v1/groups", [this](const httplib::Request&, httplib::Response& res) {
    Reply(res, 200, site_->AllGroupsStatus());
  });
  // ?since=GENERATION: only the stores that changed since (the point loop asks every
  // second; an idle site answers almost nothing).
  Add("GET", "/api/v1/stores", [this](const httplib::Request& req, httplib::Response& res) {
    if (!req.has_param("since")) return Reply(res, 200, site_->AllStoresStatus());
    if (req.get_param_value_count("since") != 1) {
      return Error(res, InvalidArgument("since: given more than once"));
    }
    ReplyResult(res, site_->StoresChangedSince(req.get_param_value("since")));
  });
  Add("PUT", R"(/api/v1/groups/([^/]+))",
      [this](const httplib::Request& req, httplib::Response& res) {
        auto body = Body(req);
        if (!body.ok()) return Error(res, body.status());
        auto disks = Disks(*body);
        if (!disks.ok()) return Error(res, disks.status());
        ReplyResult(res, site_->CreateGroup(req.matches[1], *disks), 201);
      });
  Add("GET", R"(/api/v1/groups/([^/]+))",
      [this](const httplib::Request& req, httplib::Response& res) {
        ReplyResult(res, site_->GroupStatus(req.matches[1]));
      });
  // A disk added (a name the VM has not) or grown while it runs: {"size_bytes": N}.
  Add("PUT", R"(/api/v1/groups/([^/]+)/disks/([^/]+))",
      [this](const httplib::Request& req, httplib::Response& res) {
        auto body = Body(req);
        if (!body.ok()) return Error(res, body.status());
        json_in::Fields f(*body);
        uint64_t size = f.U64("size_bytes");
        std::optional<bool> add;
        if (f.Has("add")) add = f.Bool("add", false);
        f.RefuseOthers();
        if (!f.ok()) return Error(res, f.status());
        ReplyResult(res, site_->ChangeGroupDisk(req.matches[1], req.matches[2], size, add));
      });
  Add("DELETE", R"(/api/v1/groups/([^/]+))",
      [this](const httplib::Request& req, httplib::Response& res) {
        ReplyStatus(res, site_->DeleteGroup(req.matches[1]));
      });
  Add("PUT", R"(/api/v1/groups/([^/]+)/replication)",
      [this](const httplib::Request& req, httplib::Response& res) {
        auto body = Body(req);
        if (!body.ok()) return Error(res, body.status());
        json_in::Fields f(*body);
        std::string target = f.String("target");
        uint64_t epoch = f.U64("epoch", 1, kEpochRange);
        std::string compression = f.String("compression", "lz4");
        uint64_t bandwidth = f.U64("bandwidth_bytes_per_second", 0);
        std::string target_site = f.String("target_site", "");
        if (!f.ok()) return Error(res, f.status());
        ReplyStatus(res, site_->StartReplication(req.matches[1], target, epoch,
                                                 compression == "lz4", bandwidth, target_site));
      });
  Add("POST", R"(/api/v1/groups/([^/]+)/fence)",
      [this](const httplib::Request& req, httplib::Response& res) {
        auto body = Body(req);
        if (!body.ok()) return Error(res, body.status());
        json_in::Fields f(*body);
        uint64_t epoch = f.U64("epoch");
        bool keep_shipping = f.Bool("keep_shipping", false);
        if (f.ok() && (epoch < kEpochRange.min || epoch > kEpochRange.max)) {
          f.Fail("epoch", fmt::format("{} is out of range (1..{})", epoch, kEpochRange.max));
        }
        if (!f.ok()) return Error(res, f.status());
        ReplyStatus(res, site_->FenceGroup(req.matches[1], epoch, keep_shipping));
      });
  Add("POST", R"(/api/v1/groups/([^/]+)/failover)",
      [this](const httplib::Request& req, httplib::Response& res) {
        auto body = Body(req);
        if (!body.ok()) return Error(res, body.status());
        json_in::Fields f(*body);
        uint64_t seq = f.U64("seq");
        uint64_t epoch = f.U64("epoch");
        if (f.ok() && (epoch < kEpochRange.min || epoch > kEpochRange.max)) {
          f.Fail("epoch", fmt::format("{} is out of range (1..{})", epoch, kEpochRange.max));
        }
        if (!f.ok()) return Error(res, f.status());
        ReplyResult(res, site_->FailoverGroup(req.matches[1], seq, epoch), 201);
      });
  Add("POST", R"(/api/v1/groups/([^/]+)/repair)",
      [this](const httplib::Request& req, httplib::Response& res) {
        auto body = Body(req);
        if (!body.ok()) return Error(res, body.status());
        json_in::Fields f(*body);
        RepairOptions o;
        o.trim_image = f.Bool("trim_image", false);
        o.reset_history = f.Bool("reset_history", false);
        o.accept_changes = f.Bool("accept_changes", false);
        o.first_seq = f.U64("first_seq", 1, {1, uint64_t{1} << 53});
        f.RefuseOthers();
        if (!f.ok()) return Error(res, f.status());
        ReplyResult(res, site_->RepairGroup(req.matches[1], o));
      });
  Add("POST", R"(/api/v1/stores/([^/]+)/repair)",
      [this](const httplib::Request& req, httplib::Response& res) {
        auto body = Body(req);  // takes no field: {} or nothing
        if (!body.ok()) return Error(res, body.status());
        json_in::Fields f(*body);
        f.RefuseOthers();
        if (!f.ok()) return Error(res, f.status());
        ReplyResult(res, site_->RepairStore(req.matches[1]));
      });
  Add("POST", R"(/api/v1/groups/([^/]+)/materialise)",
      [this](const httplib::Request& req, httplib::Response& res) {
        ReplyStatus(res, site_->MaterialiseGroup(req.matches[1]), 202);
      });
  Add("GET", R"(/api/v1/groups/([^/]+)/unreplicated)",
      [this](const httplib::Request& req, httplib::Response& res) {
        uint64_t after = 0;
        if (req.has_param("after")) {
          after = std::strtoull(req.get_param_value("after").c_str(), nullptr, 10);
        }
        ReplyResult(res, site_->UnreplicatedRegions(req.matches[1], after));
      });
  Add("POST", R"(/api/v1/groups/([^/]+)/regions)",
      [this](const httplib::Request& req, httplib::Response& res) {
        auto body = Body(req);
        if (!body.ok()) return Error(res, body.status());
        std::vector<capture::CaptureGroup::DiskRange> regions;
        if (!body->contains("regions") || !(*body)["regions"].is_array()) {
          return Error(res,
                       InvalidArgument("'regions' ([[disk, offset, length], ...]) is missing"));
        }
        for (auto& r : (*body)["regions"]) {
          if (!r.is_array() || r.size() != 3 || !r[0].is_number_unsigned() ||
              !r[1].is_number_unsigned() || !r[2].is_number_unsigned() ||
              r[0].get<uint64_t>() > UINT32_MAX) {
            return Error(res, InvalidArgument("each region is [disk, offset, length]"));
          }
          regions.push_back({r[0].get<uint32_t>(), {r[1].get<uint64_t>(), r[2].get<uint64_t>()}});
        }
        ReplyStatus(res, site_->MarkRegions(regions, req.matches[1]));
      });
  Add("GET", R"(/api/v1/groups/([^/]+)/hashes)",
      [this](const httplib::Request& req, httplib::Response& res) {
        uint64_t region = 64 * 1024;
        if (req.has_param("region_bytes")) {
          region = std::strtoull(req.get_param_value("region_bytes").c_str(), nullptr, 10);
        }
        auto h = site_->GroupHashes(req.matches[1], region);
        if (!h.ok()) return Error(res, h.status());
        res.set_content(*h, "application/octet-stream");
      });
  Add("POST", R"(/api/v1/groups/([^/]+)/compare)",
      [this](const httplib::Request& req, httplib::Response& res) {
        uint64_t region = 64 * 1024;
        if (req.has_param("region_bytes")) {
          region = std::strtoull(req.get_param_value("region_bytes").c_str(), nullptr, 10);
        }
        ReplyResult(res, site_->CompareHashes(req.matches[1], region, req.body));
      });
  Add("POST", R"(/api/v1/groups/([^/]+)/to-store)",
      [this](const httplib::Request& req, httplib::Response& res) {
        auto body = Body(req);
        if (!body.ok()) return Error(res, body.status());
        json_in::Fields f(*body);
        uint64_t base_seq = f.U64("base_seq");
        uint64_t epoch = f.U64("epoch");
        std::string source = f.String("source", "");
        if (f.ok() && (epoch < kEpochRange.min || epoch > kEpochRange.max)) {
          f.Fail("epoch", fmt::format("{} is out of range (1..{})", epoch, kEpochRange.max));
        }
        if (!f.ok()) return Error(res, f.status());
        ReplyResult(res, site_->GroupToStore(req.matches[1], base_seq, epoch, source), 201);
      });
  Add("POST", R"(/api/v1/groups/([^/]+)/vm/start)",
      [this](const httplib::Request& req, httplib::Response& res) {
        auto body = Body(req);
        if (!body.ok()) return Error(res, body.status());
        ReplyStatus(res, site_->StartVm(req.matches[1], *body));
      });
  Add("POST", R"(/api/v1/groups/([^/]+)/vm/freeze)",
      [this](const httplib::Request& req, httplib::Response& res) {
        auto body = Body(req);
        if (!body.ok()) return Error(res, body.status());
        json_in::Fields f(*body);
        int64_t timeout_ms = f.I64("timeout_ms", 10000, {0, 3600 * 1000});
        if (!f.ok()) return Error(res, f.status());
        ReplyStatus(res, site_->FreezeVm(req.matches[1], static_cast<int>(timeout_ms)));
      });
  Add("POST", R"(/api/v1/groups/([^/]+)/vm/thaw)",
      [this](const httplib::Request& req, httplib::Response& res) {
        ReplyStatus(res, site_->ThawVm(req.matches[1]));
      });
  Add("POST", R"(/api/v1/groups/([^/]+)/vm/stop)",
      [this](const httplib::Request& req, httplib::Response& res) {
        auto body = Body(req);
        if (!body.ok()) return Error(res, body.status());
        json_in::Fields f(*body);
        int64_t timeout_ms = f.I64("timeout_ms", 30000, {0, 3600 * 1000});
        if (!f.ok()) return Error(res, f.status());
        auto r = site_->StopVm(req.matches[1], static_cast<int>(timeout_ms));
        if (!r.ok()) return Error(res, r.status());
        Reply(res, 200, json{{"clean", *r}});
      });
  Add("DELETE", R"(/api/v1/groups/([^/]+)/replication)",
      [this](const httplib::Request& req, httplib::Response& res) {
        ReplyStatus(res, site_->StopReplication(req.matches[1]));
      });
  Add("PUT", R"(/api/v1/stores/([^/]+))",
      [this](const httplib::Request& req, httplib::Response& res) {
        auto body = Body(req);
        if (!body.ok()) return Error(res, body.status());
        auto disks = Disks(*body);
        if (!disks.ok()) return Error(res, disks.status());
        json_in::Fields f(*body);
        std::string start = f.String("start", "empty");
        // Who may write the store is the vault's word: the item's epoch and source site.
        store::StoreOrigin origin;
        origin.epoch = f.U64("epoch", 1, kEpochRange);
        origin.source = f.String("source", "");
        if (f.ok() && start != "empty" && start != "full") f.Fail("start", "is empty or full");
        if (!f.ok()) return Error(res, f.status());
        ReplyStatus(res,
                    site_->CreateStore(req.matches[1], *disks,
                                       start == "full" ? store::RecoveryStore::Start::kFullCopy
                                                       : store::RecoveryStore::Start::kEmpty,
                                       origin),
                    201);
      });
  Add("GET", R"(/api/v1/stores/([^/]+))",
      [this](const httplib::Request& req, httplib::Response& res) {
        ReplyResult(res, site_->StoreStatus(req.matches[1]));
      });
  Add("DELETE", R"(/api/v1/stores/([^/]+))",
      [this](const httplib::Request& req, httplib::Response& res) {
        ReplyStatus(res, site_->DeleteStore(req.matches[1]));
      });
  Add("POST", R"(/api/v1/stores/([^/]+)/fold)",
      [this](const httplib::Request& req, httplib::Response& res) {
        auto body = Body(req);
        if (!body.ok()) return Error(res, body.status());
        if (!body->contains("seq") || !(*body)["seq"].is_number_unsigned()) {
          return Error(res, InvalidArgument("'seq' is missing"));
        }
        ReplyResult(res, site_->FoldStore(req.matches[1], (*body)["seq"].get<uint64_t>()));
      });
  Add("POST", R"(/api/v1/stores/([^/]+)/compact)",
      [this](const httplib::Request& req, httplib::Response& res) {
        auto body = Body(req);
        if (!body.ok()) return Error(res, body.status());
        json_in::Fields f(*body);
        uint64_t through = f.U64("through");
        const json* keep = f.Array("keep", /*optional=*/false);
        f.RefuseOthers();
        std::vector<uint64_t> seqs;
        if (f.ok() && keep->size() > kCompactKeepMax) {
          f.Fail("keep", fmt::format("has more than {} seqs", kCompactKeepMax));
        }
        for (size_t i = 0; f.ok() && i < keep->size(); ++i) {
          if (!(*keep)[i].is_number_unsigned()) {
            f.Fail("keep", fmt::format("[{}] is not a seq", i));
            break;
          }
          seqs.push_back((*keep)[i].get<uint64_t>());
        }
        if (!f.ok()) return Error(res, f.status());
        ReplyResult(res, site_->CompactStore(req.matches[1], std::move(seqs), through), 202);
      });
  Add("POST", R"(/api/v1/stores/([^/]+)/views)",
      [this](const httplib::Request& req, httplib::Response& res) {
        auto body = Body(req);
        if (!body.ok()) return Error(res, body.status());
        json_in::Fields f(*body);
        uint64_t seq = f.U64("seq");
        bool writable = f.Bool("writable", false);
        if (!f.ok()) return Error(res, f.status());
        ReplyResult(res, site_->OpenView(req.matches[1], seq, writable), 201);
      });
  Add("GET", R"(/api/v1/views/([^/]+))",
      [this](const httplib::Request& req, httplib::Response& res) {
        ReplyResult(res, site_->ViewStatus(req.matches[1]));
      });
  Add("DELETE", R"(/api/v1/views/([^/]+))",
      [this](const httplib::Request& req, httplib::Response& res) {
        ReplyStatus(res, site_->CloseView(req.matches[1]));
      });
  Add("POST", R"(/api/v1/views/([^/]+)/vm/start)",
      [this](const httplib::Request& req, httplib::Response& res) {
        auto body = Body(req);
        if (!body.ok()) return Error(res, body.status());
        ReplyStatus(res, site_->StartViewVm(req.matches[1], *body));
      });
  Add("POST", R"(/api/v1/views/([^/]+)/vm/stop)",
      [this](const httplib::Request& req, httplib::Response& res) {
        auto body = Body(req);
        if (!body.ok()) return Error(res, body.status());
        json_in::Fields f(*body);
        int64_t timeout_ms = f.I64("timeout_ms", 30000, {0, 3600 * 1000});
        f.RefuseOthers();
        if (!f.ok()) return Error(res, f.status());
        auto r = site_->StopViewVm(req.matches[1], static_cast<int>(timeout_ms));
        if (!r.ok()) return Error(res, r.status());
        Reply(res, 200, json{{"clean", *r}});
      });
  Add("POST", "/api/v1/checks", [this](const httplib::Request& req, httplib::Response& res) {
    auto body = Body(req);
    if (!body.ok()) return Error(res, body.status());
    json_in::Fields f(*body);
    Site::TargetNeeds needs;
    needs.vm = f.String("vm");
    std::string role = f.String("role", "production");
    std::string name_free = f.String("name_free", "none");
    needs.bytes_needed = f.U64("bytes_needed", 0);
    needs.bytes_headroom = f.U64("bytes_headroom", 0);
    needs.bytes_full = f.U64("bytes_full", 0);
    if (f.Has("seq")) needs.seq = f.U64("seq");
    const json* spec = f.Object("spec");
    f.RefuseOthers();
    if (f.ok() && !ValidName(needs.vm)) f.Fail("vm", "is not a VM name");
    if (f.ok() && role != "production" && role != "drill")
      f.Fail("role", "must be production or drill");
    if (f.ok() && name_free != "none" && name_free != "group" && name_free != "store") {
      f.Fail("name_free", "must be none, group or store");
    }
    if (f.ok() && needs.bytes_headroom > needs.bytes_needed) {
      f.Fail("bytes_headroom", "must not be more than bytes_needed");
    }
    if (!f.ok()) return Error(res, f.status());
    needs.role = role == "drill" ? NetRole::kDrill : NetRole::kProduction;
    needs.name_free = name_free == "group"   ? Site::TargetNeeds::FreeName::kGroup
                      : name_free == "store" ? Site::TargetNeeds::FreeName::kStore
                                             : Site::TargetNeeds::FreeName::kNone;
    if (spec != nullptr) needs.spec = *spec;
    Reply(res, 200, site_->CheckTarget(needs));
  });
  // Consoles: ?offset=N (from there) or the tail; ?bytes=N (at most 64 KiB).
  Add("GET", R"(/api/v1/views/([^/]+)/console)",
      [this](const httplib::Request& req, httplib::Response& res) {
        auto q = ConsoleQuery(req);
        if (!q.ok()) return Error(res, q.status());
        ReplyResult(res, site_->ViewConsole(req.matches[1], q->offset, q->bytes));
      });
  Add("GET", R"(/api/v1/groups/([^/]+)/console)",
      [this](const httplib::Request& req, httplib::Response& res) {
        auto q = ConsoleQuery(req);
        if (!q.ok()) return Error(res, q.status());
        ReplyResult(res, site_->GroupConsole(req.matches[1], q->offset, q->bytes));
      });
  // The route table as registered, for the vault's and the tests' eyes.
  Add("GET", "/api/v1/routes", [this](const httplib::Request&, httplib::Response& res) {
    json out = json::array();
    for (auto& [method, pattern] : routes_)
      out.push_back({{"method", method}, {"pattern", pattern}});
    Reply(res, 200, out);
  });
  h.set_error_handler([](const httplib::Request&, httplib::Response& res) {
    if (res.body.empty()) {
      Reply(res, res.status,
            json{{"error", {{"code", "not found"}, {"message", "no such API path or method"}}}});
    }
  });
}

namespace {

// The call's lease token: nullopt without the header; kInvalidArgument for a bad value
// or more than one header.
Result<std::optional<uint64_t>> LeaseTokenOf(const httplib::Request& req) {
  size_t n = req.get_header_value_count(kLeaseTokenHeader);
  if (n == 0) return std::optional<uint64_t>();
  if (n > 1) return InvalidArgument(fmt::format("more than one {} header", kLeaseTokenHeader));
  OSR_ASSIGN_OR_RETURN(uint64_t token, ParseLeaseToken(req.get_header_value(kLeaseTokenHeader)));
  return std::optional<uint64_t>(token);
}

}  // namespace

void SiteApi::Add(const std::string& method, const std::string& pattern,
                  std::function<void(const httplib::Request&, httplib::Response&)> route) {
  routes_.emplace_back(method, pattern);
  auto handler = [this, changes = method != "GET", route = std::move(route)](
                     const httplib::Request& req, httplib::Response& res) {
    if (!lease_tokens_) return Error(res, Internal("the site's lease token is not loaded"));
    auto token = LeaseTokenOf(req);
    if (!token.ok()) return Error(res, token.status());
    if (!changes) {
      if (*token) lease_tokens_->NoteRead(**token);
      return route(req, res);
    }
    auto admitted = lease_tokens_->AdmitChange(*token);
    if (!admitted.ok()) {
      if (admitted.status().code() == Code::kFailedPrecondition) {
        res.set_header(kLeaseTokenSeenHeader, std::to_string(lease_tokens_->highest()));
      }
      spdlog::warn("site {}: {} {} refused: {}", site_->config().name, req.method, req.path,
                   admitted.status().message());
      return Error(res, admitted.status());
    }
    route(req, res);  // holding the admission: no higher token is recorded meanwhile
  };
  if (method == "GET") {
    http_->Get(pattern, std::move(handler));
  } else if (method == "PUT") {
    http_->Put(pattern, std::move(handler));
  } else if (method == "POST") {
    http_->Post(pattern, std::move(handler));
  } else {
    OSR_CHECK(method == "DELETE");
    http_->Delete(pattern, std::move(handler));
  }
}

SiteApi::~SiteApi() {
  Stop();
}

Result<ListenAddress> SiteApi::Listen(const ListenAddress& addr) {
  OSR_RETURN_IF_ERROR(setup_);
  if (site_->config().api_insecure && !IsLoopbackHost(addr.host)) {
    return InvalidArgument(fmt::format(
        "api_insecure serves the site API without TLS: only on loopback, not {}", addr.host));
  }
  bound_ = addr;
  if (addr.port == 0) {
    int port = http_->bind_to_any_port(addr.host);
    if (port < 0) return Unavailable("cannot bind the API to " + addr.host);
    bound_.port = static_cast<uint16_t>(port);
  } else if (!http_->bind_to_port(addr.host, addr.port)) {
    return Unavailable(fmt::format("cannot bind the API to {}:{}", addr.host, addr.port));
  }
  return bound_;
}

void SiteApi::Start() {
  thread_ = std::thread([this] { http_->listen_after_bind(); });
}

void SiteApi::Stop() {
  if (thread_.joinable()) {
    http_->stop();
    thread_.join();
  }
}

}  // namespace osr::site
