#include "vault/retention.h"

#include <fmt/format.h>

#include <algorithm>

#include "common/units.h"
#include "vault/clock_watch.h"

namespace osr::vault {

std::vector<int64_t> PointsToPrune(const std::vector<PointRow>& points,
                                   const std::set<int64_t>& keep, int64_t now_ns,
                                   int64_t retention_ns) {
  std::vector<int64_t> out;
  if (points.size() < 2) return out;
  const size_t newest = points.size() - 1;
  const int64_t base_ns = std::min(now_ns, points[newest].time_ns);
  const int64_t cutoff_ns = base_ns - retention_ns;
  std::vector<bool> gone(points.size(), false);
  // Retention: from the oldest on, up to the first point young enough to stay.
  for (size_t i = 0; i < newest; ++i) {
    if (keep.count(points[i].id)) continue;
    if (points[i].time_ns >= cutoff_ns) break;
    gone[i] = true;
    out.push_back(points[i].id);
  }
  // Thinning: per hour (of the running maximum time) older than kThinAfterNs, the
  // crash point with the highest seq stays. Hours are contiguous in seq order.
  const int64_t thin_before_ns = base_ns - kThinAfterNs;
  constexpr int64_t kHourNs = 3600'000'000'000;
  int64_t running_max_ns = INT64_MIN;
  std::vector<int64_t> hour(points.size());
  for (size_t i = 0; i < points.size(); ++i) {
    running_max_ns = std::max(running_max_ns, points[i].time_ns);
    hour[i] = running_max_ns < thin_before_ns ? running_max_ns / kHourNs : INT64_MAX;
  }
  for (size_t i = 0; i < newest; ++i) {
    if (gone[i] || hour[i] == INT64_MAX || points[i].type != "crash" || keep.count(points[i].id)) {
      continue;
    }
    // A later crash point of the same hour (not deleted) makes this one redundant.
    for (size_t j = i + 1; j < points.size() && hour[j] == hour[i]; ++j) {
      if (!gone[j] && points[j].type == "crash") {
        gone[i] = true;
        out.push_back(points[i].id);
        break;
      }
    }
  }
  return out;
}

std::string PointOverdueText(int64_t uncovered_ns, uint64_t durable_seq, const PointRow& newest,
                             int64_t crash_interval_s, int64_t slack_ns,
                             const std::string& last_error) {
  if (durable_seq <= newest.seq) return "";
  if (uncovered_ns <= 2 * crash_interval_s * 1000000000 + slack_ns) return "";
  return fmt::format(
      "Warning: no new recovery point for {}: the recovery site holds writes up to seq {}, "
      "the newest point is at seq {} ({}); the policy makes one every {} s ({})",
      FormatDurationNs(uncovered_ns), durable_seq, newest.seq, FormatTimeNs(newest.time_ns),
      crash_interval_s, last_error.empty() ? "see the vault's log" : "last attempt: " + last_error);
}

}  // namespace osr::vault
