#include "vault/lease.h"

#include <fmt/format.h>
#include <openssl/rand.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>
#include <chrono>

namespace osr::vault {

namespace {

int64_t MonoNowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

Result<std::string> NewInstanceId() {
  std::array<unsigned char, 8> raw{};
  if (RAND_bytes(raw.data(), static_cast<int>(raw.size())) != 1) {
    return Internal("the system's random number generator failed");
  }
  std::string out;
  for (unsigned char b : raw) out += fmt::format("{:02x}", b);
  return out;
}

}  // namespace

Result<std::unique_ptr<LeaseKeeper>> LeaseKeeper::Open(const LeaseConfig& cfg_in,
                                                       Callbacks callbacks) {
  LeaseConfig cfg = cfg_in;
  cfg.ttl_ms = std::max(cfg.ttl_ms, kLeaseTtlMsMin);
  // A renewal must not wait longer than the time left to renew in (ttl/3).
  PostgresOptions pg;
  pg.connect_timeout_s = std::max(2, cfg.ttl_ms / 3 / 1000);
  pg.answer_timeout_ms = std::max(200, cfg.ttl_ms / 3);
  pg.statement_timeout_ms = pg.answer_timeout_ms;
  pg.idle_in_transaction_ms = std::max(1000, cfg.ttl_ms);
  OSR_ASSIGN_OR_RETURN(std::unique_ptr<Catalog> catalog, Catalog::Open(cfg.db, pg));
  if (cfg.token_floor > 0) {
    OSR_ASSIGN_OR_RETURN(int64_t before, catalog->RaiseLeaseToken(cfg.token_floor));
    if (before < cfg.token_floor) {
      spdlog::warn(
          "vault: --lease-token-floor {}: the lease token goes from {} to {}; the next "
          "leader's token is {} (above what the sites have seen)",
          cfg.token_floor, before, cfg.token_floor, cfg.token_floor + 1);
    } else {
      spdlog::info("vault: --lease-token-floor {}: the lease token is {} already; unchanged",
                   cfg.token_floor, before);
    }
  }
  OSR_ASSIGN_OR_RETURN(std::string id, NewInstanceId());
  OSR_RETURN_IF_ERROR(catalog->PutInstance({id, cfg.host, cfg.api, 0, 0}));
  spdlog::info("vault: instance {} ({} {}), lease TTL {} ms", id, cfg.host, cfg.api, cfg.ttl_ms);
  return std::unique_ptr<LeaseKeeper>(
      new LeaseKeeper(std::move(cfg), std::move(callbacks), std::move(catalog), std::move(id)));
}

LeaseKeeper::LeaseKeeper(LeaseConfig cfg, Callbacks callbacks, std::unique_ptr<Catalog> catalog,
                         std::string id)
    : cfg_(std::move(cfg)),
      callbacks_(std::move(callbacks)),
      catalog_(std::move(catalog)),
      id_(std::move(id)) {}

LeaseKeeper::~LeaseKeeper() {
  Stop();
}

bool LeaseKeeper::leading() const {
  std::lock_guard lock(mu_);
  return leading_;
}

Result<bool> LeaseKeeper::TryLead() {
  int64_t sent_ns = MonoNowNs();  // the lease lasts at least ttl from here
  OSR_ASSIGN_OR_RETURN(std::optional<LeaseRow> got,
                       catalog_->AcquireLease({id_, cfg_.host, cfg_.api, 0, 0}, cfg_.ttl_ms));
  if (!got) return false;
  LeaseFence* fence = nullptr;
  {
    std::lock_guard lock(mu_);
    fence_ = std::make_unique<LeaseFence>(id_, got->token, cfg_.ttl_ms);
    fence = fence_.get();
    leading_ = true;
  }
  last_renewed_mono_ns_ = sent_ns;
  spdlog::info("vault: instance {} leads now (lease token {})", id_, got->token);
  Status st;
  {
    FenceScope fenced(fence);
    st = callbacks_.gained(*fence);
  }
  if (!st.ok()) {
    EndTerm("its work could not start: " + st.ToString());
    if (Status r = catalog_->ReleaseLease(id_, got->token); !r.ok()) {
      spdlog::warn("vault: giving the lease up: {} (it lapses by itself)", r.ToString());
    }
    return st;
  }
  return true;
}

void LeaseKeeper::Start() {
  thread_ = std::thread([this] { Run(); });
}

void LeaseKeeper::Stop() {
  {
    std::lock_guard lock(mu_);
    if (stopped_) return;
    stopped_ = stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  int64_t token = 0;
  {
    std::lock_guard lock(mu_);
    if (leading_) token = fence_->token();
  }
  if (token != 0) {
    EndTerm("the vault stops");
    if (Status r = catalog_->ReleaseLease(id_, token); !r.ok()) {
      spdlog::warn("vault: giving the lease up: {} (it lapses by itself)", r.ToString());
    }
  }
  if (Status d = catalog_->DeleteInstance(id_); !d.ok()) {
    spdlog::warn("vault: removing instance {} from the catalog: {}", id_, d.ToString());
  }
}

void LeaseKeeper::EndTerm(const std::string& why) {
  {
    std::lock_guard lock(mu_);
    if (!leading_) return;
    leading_ = false;
    fence_->Lose();
  }
  spdlog::warn("vault: instance {} stops leading: {}", id_, why);
  callbacks_.lost();
  spdlog::info("vault: instance {} follows now", id_);
}

void LeaseKeeper::Renew() {
  int64_t token = 0;
  bool fenced = false;
  {
    std::lock_guard lock(mu_);
    token = fence_->token();
    fenced = fence_->lost();
  }
  if (fenced) return EndTerm("a write found the lease taken by another instance");
  int64_t sent_ns = MonoNowNs();
  Result<bool> renewed = catalog_->RenewLease(id_, token, cfg_.ttl_ms);
  if (renewed.ok() && *renewed) {
    last_renewed_mono_ns_ = sent_ns;
    last_error_.clear();
    return;
  }
  if (renewed.ok()) return EndTerm("another instance holds the lease now");
  // Not reached: stop before the lease can lapse for the others (one more attempt could
  // end after it).
  int64_t left_ms = (last_renewed_mono_ns_ - MonoNowNs()) / 1000000 + cfg_.ttl_ms;
  if (left_ms <= cfg_.ttl_ms / 3) {
    return EndTerm(fmt::format("the lease could not be renewed for {} ms: {}",
                               cfg_.ttl_ms - left_ms, renewed.status().ToString()));
  }
  if (last_error_ != renewed.status().ToString()) {
    last_error_ = renewed.status().ToString();
    spdlog::warn("vault: renewing the lease: {} ({} ms left)", last_error_, left_ms);
  }
}

void LeaseKeeper::Run() {
  const auto period = std::chrono::milliseconds(cfg_.ttl_ms / 3);
  for (;;) {
    {
      std::unique_lock lock(mu_);
      if (cv_.wait_for(lock, period, [&] { return stop_; })) return;
    }
    if (leading()) {
      Renew();
      continue;
    }
    // A follower says it lives, and takes the lease when it is free.
    Status alive = catalog_->PutInstance({id_, cfg_.host, cfg_.api, 0, 0});
    Result<bool> led = alive.ok() ? TryLead() : Result<bool>(alive);
    if (led.ok()) {
      last_error_.clear();
    } else if (last_error_ != led.status().ToString()) {
      last_error_ = led.status().ToString();
      spdlog::warn("vault: trying to lead: {}", last_error_);
    }
  }
}

}  // namespace osr::vault
