#include "vault/metrics.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <set>

#include "common/check.h"
#include "vault/catalog.h"
#include "vault/vault.h"

namespace osr::vault {
namespace {

bool ValidName(std::string_view name) {
  if (name.empty()) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    char c = name[i];
    bool letter = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
    if (!letter && !(i > 0 && c >= '0' && c <= '9')) return false;
  }
  return true;
}

// A sample value as the format writes it (Go's ParseFloat reads it back).
std::string FormatValue(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  return fmt::format("{}", v);
}

std::string LevelOf(const std::string& health) {
  for (const char* level : {"Normal", "Warning", "Critical"}) {
    if (health.starts_with(level)) return level;
  }
  return "Unknown";
}

constexpr double kNsPerS = 1e9;

}  // namespace

std::string EscapeLabelValue(std::string_view value) {
  std::string out;
  out.reserve(value.size());
  for (char c : value) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

std::string EscapeHelp(std::string_view help) {
  std::string out;
  out.reserve(help.size());
  for (char c : help) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

void TextWriter::Family(std::string_view name, std::string_view type, std::string_view help) {
  OSR_CHECK(ValidName(name));
  out_ += fmt::format("# HELP {} {}\n# TYPE {} {}\n", name, EscapeHelp(help), name, type);
}

void TextWriter::Sample(std::string_view name, const MetricLabels& labels, double value) {
  OSR_CHECK(ValidName(name));
  out_ += name;
  if (!labels.empty()) {
    out_ += '{';
    for (size_t i = 0; i < labels.size(); ++i) {
      OSR_CHECK(ValidName(labels[i].first) && !labels[i].first.starts_with("__"));
      out_ += fmt::format("{}{}=\"{}\"", i ? "," : "", labels[i].first,
                          EscapeLabelValue(labels[i].second));
    }
    out_ += '}';
  }
  out_ += ' ';
  out_ += FormatValue(value);
  out_ += '\n';
}

Histogram::Histogram(std::vector<double> upper_bounds_s)
    : upper_bounds_s_(std::move(upper_bounds_s)), counts_(upper_bounds_s_.size(), 0) {
  OSR_CHECK(std::is_sorted(upper_bounds_s_.begin(), upper_bounds_s_.end()));
}

void Histogram::Observe(double value_s) {
  auto it = std::lower_bound(upper_bounds_s_.begin(), upper_bounds_s_.end(), value_s);
  if (it != upper_bounds_s_.end()) ++counts_[it - upper_bounds_s_.begin()];
  sum_s_ += value_s;
  ++count_;
}

void Histogram::Write(TextWriter& w, std::string_view name, const MetricLabels& labels) const {
  std::string bucket = std::string(name) + "_bucket";
  uint64_t cumulative = 0;
  auto with_le = [&](std::string le) {
    MetricLabels l = labels;
    l.emplace_back("le", std::move(le));
    return l;
  };
  for (size_t i = 0; i < upper_bounds_s_.size(); ++i) {
    cumulative += counts_[i];
    w.Sample(bucket, with_le(FormatValue(upper_bounds_s_[i])), static_cast<double>(cumulative));
  }
  w.Sample(bucket, with_le("+Inf"), static_cast<double>(count_));
  w.Sample(std::string(name) + "_sum", labels, sum_s_);
  w.Sample(std::string(name) + "_count", labels, static_cast<double>(count_));
}

const std::vector<double>& JobDurationBounds() {
  static const std::vector<double> kBounds = {1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 14400};
  return kBounds;
}

const std::vector<double>& PointTickBounds() {
  static const std::vector<double> kBounds = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                              0.5,   1,      2.5,   5,    10,    30,   60,  120};
  return kBounds;
}

PointTickTimes::Times::Times() : histogram(PointTickBounds()) {}

void PointTickTimes::Note(Kind kind, int64_t duration_ns) {
  double s = static_cast<double>(std::max<int64_t>(0, duration_ns)) / 1e9;
  std::lock_guard lock(mu_);
  Times& t = by_kind_[kind];
  t.histogram.Observe(s);
  t.last_s = s;
}

void PointTickTimes::Write(TextWriter& w) const {
  auto label = [](Kind k) -> MetricLabels {
    return {{"kind", k == Kind::kPoints ? "points" : "points_and_rpo"}};
  };
  std::lock_guard lock(mu_);
  w.Family("osr_vault_point_tick_seconds", "histogram",
           "How long the leader's point loop takes for one turn over every item; kind "
           "points_and_rpo: the ticks (every 5 s) that also sample each item's RPO and "
           "health from the sites.");
  for (const auto& [kind, t] : by_kind_) {
    t.histogram.Write(w, "osr_vault_point_tick_seconds", label(kind));
  }
  w.Family("osr_vault_point_tick_last_seconds", "gauge",
           "How long the point loop's last tick of each kind took.");
  for (const auto& [kind, t] : by_kind_) {
    w.Sample("osr_vault_point_tick_last_seconds", label(kind), t.last_s);
  }
}

void HealthBoard::Note(const std::string& vm, const std::string& health, int64_t time_ns) {
  std::lock_guard lock(mu_);
  seen_[vm] = Seen{LevelOf(health), time_ns};
}

std::string HealthBoard::Level(const std::string& vm, int64_t stale_ns) const {
  std::lock_guard lock(mu_);
  auto it = seen_.find(vm);
  if (it == seen_.end() || it->second.time_ns < stale_ns) return "Unknown";
  return it->second.level;
}

namespace {

void WriteItems(TextWriter& w, const std::vector<ItemRow>& items, const HealthBoard& health,
                const VaultMetricsState& state) {
  // Every item state, 0 when no item is in it (a gauge that goes away reads as stale).
  std::map<std::string, int> by_state;
  for (const auto& row : kItemStates) {
    if (row.state != ItemState::kUnprotected) by_state[std::string(row.name)] = 0;
  }
  std::map<std::string, int> by_health = {
      {"Normal", 0}, {"Warning", 0}, {"Critical", 0}, {"Unknown", 0}};
  for (const auto& item : items) {
    ++by_state[std::string(ItemStateName(item.state))];
    std::string level = health.Level(item.vm, state.now_ns - kHealthStaleNs);
    ++by_health[level];
  }
  w.Family("osr_vault_items", "gauge", "Replicated items (protected VMs) in each state.");
  for (const auto& [name, n] : by_state) w.Sample("osr_vault_items", {{"state", name}}, n);
  w.Family("osr_vault_items_health", "gauge",
           "Items by the level of their health as the point loop last saw it (Unknown: not "
           "seen for 60 s, or not in a replicating state).");
  for (const auto& [level, n] : by_health) {
    w.Sample("osr_vault_items_health", {{"level", level}}, n);
  }
}

void WriteRpo(TextWriter& w, const std::vector<ItemRow>& items,
              const std::vector<RpoSampleRow>& samples) {
  std::set<std::string> sampled;
  for (const auto& item : items) {
    // The point loop samples the RPO of replicating items (points.cc, PointTick).
    if (Info(item.state).replicating) sampled.insert(item.vm);
  }
  w.Family("osr_vault_item_rpo_seconds", "gauge",
           "The item's RPO at its newest sample (age of the newest write at the recovery site "
           "while newer ones are on their way; 0 when caught up).");
  for (const auto& s : samples) {
    if (sampled.count(s.vm)) w.Sample("osr_vault_item_rpo_seconds", {{"vm", s.vm}}, s.rpo_s);
  }
  w.Family("osr_vault_item_rpo_sample_timestamp_seconds", "gauge",
           "When the item's newest RPO sample was taken (Unix time): a sample older than a "
           "minute means nobody samples it (no leader, or the point loop is stuck).");
  for (const auto& s : samples) {
    if (sampled.count(s.vm)) {
      w.Sample("osr_vault_item_rpo_sample_timestamp_seconds", {{"vm", s.vm}},
               static_cast<double>(s.time_ns) / kNsPerS);
    }
  }
}

void WriteJobs(TextWriter& w, const std::vector<JobRow>& jobs) {
  std::map<std::pair<std::string, std::string>, int> ended, active;
  std::map<std::string, Histogram> durations;
  for (const auto& job : jobs) {
    auto key = std::make_pair(job.type, std::string(JobStateName(job.state)));
    if (!JobEnded(job.state)) {
      ++active[key];
      continue;
    }
    ++ended[key];
    auto [it, unused] = durations.try_emplace(job.type, JobDurationBounds());
    it->second.Observe(static_cast<double>(std::max<int64_t>(0, job.updated_ns - job.created_ns)) /
                       kNsPerS);
  }
  w.Family("osr_vault_jobs_total", "counter",
           "Jobs that ended, by type and outcome (Succeeded, Failed, Cancelled).");
  for (const auto& [key, n] : ended) {
    w.Sample("osr_vault_jobs_total", {{"type", key.first}, {"state", key.second}}, n);
  }
  w.Family("osr_vault_jobs_in_progress", "gauge", "Jobs queued or running, by type and state.");
  for (const auto& [key, n] : active) {
    w.Sample("osr_vault_jobs_in_progress", {{"type", key.first}, {"state", key.second}}, n);
  }
  w.Family("osr_vault_job_duration_seconds", "histogram",
           "Time from submission to end of the jobs that ended (queueing included), by type.");
  for (const auto& [type, h] : durations) {
    h.Write(w, "osr_vault_job_duration_seconds", {{"type", type}});
  }
}

}  // namespace

Result<std::string> VaultMetricsText(Catalog& catalog, const VaultMetricsState& state) {
  // Every read first: a failed one answers nothing rather than part of the numbers.
  OSR_ASSIGN_OR_RETURN(std::vector<ItemRow> items, catalog.ListItems());
  OSR_ASSIGN_OR_RETURN(std::vector<RpoSampleRow> samples, catalog.ListLatestRpoSamples());
  OSR_ASSIGN_OR_RETURN(std::vector<JobRow> jobs, catalog.ListJobTimes());
  // Health as the leader last wrote it: the same on every vault instance.
  OSR_ASSIGN_OR_RETURN(std::vector<ItemHealthRow> seen, catalog.ListItemHealth());
  HealthBoard health;
  for (const ItemHealthRow& h : seen) health.Note(h.vm, h.health, h.time_ns);

  TextWriter w;
  w.Family("osr_vault_catalog_up", "gauge",
           "1: this scrape read the catalog (backend: sqlite or postgresql). An unreadable "
           "catalog answers 503 instead.");
  w.Sample("osr_vault_catalog_up",
           {{"backend", catalog.dialect() == SqlDialect::kPostgres ? "postgresql" : "sqlite"}}, 1);
  w.Family("osr_vault_leader", "gauge",
           "1 when this vault instance runs jobs, points, retention and reconciliation.");
  w.Sample("osr_vault_leader", {}, state.leader ? 1 : 0);
  WriteItems(w, items, health, state);
  WriteRpo(w, items, samples);
  WriteJobs(w, jobs);
  if (state.point_ticks != nullptr) state.point_ticks->Write(w);
  return w.text();
}

bool Vault::leader() {
  std::lock_guard lock(mu_);
  return leading_;
}

Result<std::string> Vault::MetricsText() {
  return VaultMetricsText(*catalog_,
                          VaultMetricsState{leader(), clock_.WallNs(), &point_tick_times_});
}

}  // namespace osr::vault
