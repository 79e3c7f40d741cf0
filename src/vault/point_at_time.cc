#include "vault/point_at_time.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <string>

#include "common/units.h"

namespace osr::vault {

Result<PointRow> PointAtTime(const std::vector<PointRow>& points, int64_t time_ns,
                             std::string_view vm, std::string_view spec) {
  // One candidate per era: the era's newest point (by seq) at or before time_ns.
  std::vector<const PointRow*> candidates;
  const PointRow* era_best = nullptr;
  int64_t era_max_ns = 0;
  bool first = true;
  for (const PointRow& p : points) {
    if (!first && p.time_ns < era_max_ns - kEraStepNsMin) {  // the clock stepped back
      if (era_best != nullptr) candidates.push_back(era_best);
      era_best = nullptr;
      era_max_ns = p.time_ns;
    }
    era_max_ns = first ? p.time_ns : std::max(era_max_ns, p.time_ns);
    first = false;
    if (p.time_ns <= time_ns) era_best = &p;
  }
  if (era_best != nullptr) candidates.push_back(era_best);

  if (candidates.empty()) {
    return NotFound(fmt::format("VM {} has no recovery point at or before {}", vm, spec));
  }
  if (candidates.size() == 1) return *candidates.front();
  std::vector<std::string> shown;
  size_t from = candidates.size() > kEraPointsShownMax ? candidates.size() - kEraPointsShownMax : 0;
  for (size_t i = from; i < candidates.size(); ++i) {
    const PointRow& c = *candidates[i];
    shown.push_back(fmt::format("point {} ({}, seq {})", c.id, FormatTimeNs(c.time_ns), c.seq));
  }
  return InvalidArgument(fmt::format(
      "{} is ambiguous for VM {}: the clock that dates its recovery points stepped back, so "
      "that time was read more than once, and each stretch of steady time has a point at or "
      "before it: {}{}. Name the point by its id instead (--point ID; osr point list {})",
      spec, vm, fmt::join(shown, ", "),
      from > 0 ? fmt::format(" and {} older", from) : std::string(), vm));
}

}  // namespace osr::vault
