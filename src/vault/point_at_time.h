// Which recovery point a wall-clock time names (`--point TIME`, "point": "TIME").
//
// A point's time is a wall clock's reading (the source site's, when its newest write was
// captured); points are ordered by seq. A wall clock that steps back reads the same times
// twice: points made after the step carry times earlier than points made before it. "The
// newest point at or before TIME", taken over all points by seq, can then be a point made
// after the moment the operator means — a failover past the damage they mean to go back
// before.
//
// So a time is resolved within clock eras. An era is a run of points (in seq order) whose
// times do not go back; a point dated more than kEraStepNsMin earlier than the newest time
// of its era so far starts a new era (smaller steps are NTP's ordinary corrections, as for
// ClockWatch). Each era that has a point at or before TIME offers its newest such point:
//   - one era offers one: that point. It was made before any moment at which that era's
//     clock read TIME, and later eras' clocks had not come down to TIME by their first
//     point;
//   - several eras offer one: the time was read more than once and the vault cannot know
//     which reading the operator means. Refused (kInvalidArgument), naming each era's
//     point (id, time, seq) and asking for a point id instead;
//   - none: kNotFound.
// A clock that never stepped back makes one era: the rule is then the plain "newest point
// at or before TIME". Once retention has deleted every point of the older eras, times
// resolve again without ambiguity.
//
// Thread model: none (values).
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "vault/catalog.h"

namespace osr::vault {

// A step back smaller than this does not start a new era (ClockWatch::kStepNsMin).
inline constexpr int64_t kEraStepNsMin = 5'000'000'000;
// How many eras' points an ambiguity error names at most (the newest ones).
inline constexpr size_t kEraPointsShownMax = 5;

// The point of `points` (one VM's, in seq order) that wall time `time_ns` names, by the
// rule above. `vm` and `spec` (the time as the operator wrote it) are for the messages.
// Errors: kNotFound (no point at or before the time), kInvalidArgument (the time is
// ambiguous: the message names the candidate points).
Result<PointRow> PointAtTime(const std::vector<PointRow>& points, int64_t time_ns,
                             std::string_view vm, std::string_view spec);

}  // namespace osr::vault
