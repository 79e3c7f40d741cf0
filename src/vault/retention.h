// Retention and thinning of recovery points: which points go.
//
// A point's time is the source site's wall clock when its newest write was captured;
// clocks step, and the order of points is their seq, not their time. So:
//   - the newest point (by seq) is never deleted, nor a point in use (a drill stands on
//     it, or a failover that is not committed);
//   - retention deletes old points from the oldest (by seq) on and stops at the first
//     point it keeps for its age: a point dated in the future (a clock that stepped
//     forward and back) holds back the points after it instead of outliving them;
//   - age is measured from min(now, the newest point's time): the vault's clock ahead of
//     the source's, or the source's ahead of the vault's, deletes nothing early; only
//     both ahead together would (which ClockWatch catches for the vault's own clock);
//   - thinning keeps, per hour older than one hour, the newest crash point by seq and
//     every app point; hours are taken from the running maximum of the times in seq
//     order, so a clock that stepped back does not split or reorder them.
//
// Thread model: none (values).
#pragma once

#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "vault/catalog.h"

namespace osr::vault {

// Thinning starts this long before the newest point: every point of the last hour stays.
inline constexpr int64_t kThinAfterNs = 3600'000'000'000;

// The ids of `points` (one VM's, in seq order, a new point not yet stored may be the
// last one, id 0) that retention and thinning delete. `keep`: ids in use; `now_ns`: the
// vault's wall clock; retention_ns > 0.
std::vector<int64_t> PointsToPrune(const std::vector<PointRow>& points,
                                   const std::set<int64_t>& keep, int64_t now_ns,
                                   int64_t retention_ns);

// The item health warning when the recovery site has held writes newer than the newest
// point (`newest`, at durable_seq now) for uncovered_ns (monotonic) — longer than two
// crash intervals and slack_ns; "" otherwise. No new writes need no new point: callers
// pass only durable data that no point covers. last_error: why the last due point was
// not made, if known.
std::string PointOverdueText(int64_t uncovered_ns, uint64_t durable_seq, const PointRow& newest,
                             int64_t crash_interval_s, int64_t slack_ns,
                             const std::string& last_error);

}  // namespace osr::vault
