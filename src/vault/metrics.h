// The vault's metrics: GET /metrics in the Prometheus text exposition format, version
// 0.0.4 (docs/api.md, docs/operations.md "Metrics").
//
// Every number comes from the catalog or from the vault's memory, never from a site: a
// scrape costs the same whether the sites answer or not. Items by state and the jobs come
// from the catalog; the RPO per item is the newest sample the point loop wrote to the
// catalog (rpo_samples, every 5 s while an item is Protected or TestFailoverCompleted);
// the health per item is what the point loop last saw (HealthBoard, in memory: a follower,
// which does not run the point loop, reports its items' health as Unknown). The leader
// gauge is Vault::leader(), the lease keeper's state.
//
// Thread model: TextWriter and JobDurations are values (one thread); HealthBoard is
// thread-safe (mu_ guards its map); VaultMetricsText reads the catalog (thread-safe).
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/status.h"

namespace osr::vault {

class Catalog;

inline constexpr const char* kMetricsContentType = "text/plain; version=0.0.4; charset=utf-8";

// A label value as the format writes it inside double quotes: backslash, double quote
// and line feed escaped (\\, \", \n); every other byte as is (UTF-8).
std::string EscapeLabelValue(std::string_view value);
// A HELP text: backslash and line feed escaped (\\, \n).
std::string EscapeHelp(std::string_view help);

using MetricLabels = std::vector<std::pair<std::string, std::string>>;

// Builds one exposition: a family's HELP and TYPE lines, then its samples. Names are
// ours (constants): checked, not escaped (a bad one is a programmer error).
class TextWriter {
 public:
  // `type`: counter, gauge, histogram, summary or untyped.
  void Family(std::string_view name, std::string_view type, std::string_view help);
  // `name` is the family's or, for a histogram, name_bucket / _sum / _count.
  void Sample(std::string_view name, const MetricLabels& labels, double value);
  const std::string& text() const { return out_; }

 private:
  std::string out_;
};

// A histogram of durations in seconds, with fixed upper bounds.
class Histogram {
 public:
  explicit Histogram(std::vector<double> upper_bounds_s);
  void Observe(double value_s);
  // The series of one histogram under `name` with `labels`: name_bucket{le=...} for each
  // bound, cumulative, then le="+Inf" (= the count), name_sum and name_count.
  void Write(TextWriter& w, std::string_view name, const MetricLabels& labels) const;

 private:
  std::vector<double> upper_bounds_s_;  // ascending
  std::vector<uint64_t> counts_;        // per bound, not cumulative
  double sum_s_ = 0;
  uint64_t count_ = 0;
};

// The bounds of osr_vault_job_duration_seconds, in seconds.
const std::vector<double>& JobDurationBounds();

// The health each item had when the point loop last looked (the level word only).
class HealthBoard {
 public:
  // `health`: the item's health text ("Normal", "Warning: ...", "Critical: ...").
  void Note(const std::string& vm, const std::string& health, int64_t time_ns);
  // "Normal", "Warning", "Critical", or "Unknown" when nothing was noted since stale_ns
  // (or ever).
  std::string Level(const std::string& vm, int64_t stale_ns) const;

 private:
  struct Seen {
    std::string level;
    int64_t time_ns = 0;
  };
  mutable std::mutex mu_;
  std::map<std::string, Seen> seen_;  // guarded by mu_; by VM
};

// How long the point loop's ticks take (one turn over every item: fencing, RPO sample,
// points, retention), split by whether the tick sampled the RPO (every 5 s: it asks the
// sites about every item). Thread-safe: the point thread notes, a scrape writes.
class PointTickTimes {
 public:
  enum class Kind { kPoints, kPointsAndRpo };
  // `duration_ns`: the tick's time on the monotonic clock (negative counts as 0).
  void Note(Kind kind, int64_t duration_ns);
  // osr_vault_point_tick_seconds (histogram) and osr_vault_point_tick_last_seconds (gauge),
  // each by label kind="points" | "points_and_rpo"; only the kinds seen so far.
  void Write(TextWriter& w) const;

 private:
  struct Times {
    Times();
    Histogram histogram;
    double last_s = 0;
  };
  mutable std::mutex mu_;
  std::map<Kind, Times> by_kind_;  // guarded by mu_
};

// The bounds of osr_vault_point_tick_seconds, in seconds.
const std::vector<double>& PointTickBounds();

// A health older than this reads as Unknown (the point loop samples every 5 s).
inline constexpr int64_t kHealthStaleNs = 60'000'000'000;

// What the vault knows besides its catalog.
struct VaultMetricsState {
  bool leader = true;                           // this instance runs jobs, points, retention
  int64_t now_ns = 0;                           // the wall clock, for staleness
  const PointTickTimes* point_ticks = nullptr;  // borrowed, or nullptr: not written
};

// The whole exposition. An error (the catalog's: kUnavailable, kIoError, kCorruption)
// when any catalog read fails: the caller answers 503, never partial numbers.
Result<std::string> VaultMetricsText(Catalog& catalog, const VaultMetricsState& state);

}  // namespace osr::vault
