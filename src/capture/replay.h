// Replay: rebuilds a disk from its starting image and its capture log.
#pragma once

#include <cstdint>
#include <string>

#include "common/status.h"

namespace osr::capture {

struct ReplayResult {
  uint64_t records = 0;
  uint64_t first_seq = 0;
  uint64_t last_seq = 0;
};

// Copies `base` to `out` (sparse: holes stay holes) and applies the records of disk
// `disk` of the log in `log_dir` with seq <= upto, in order. Any damaged record before
// `upto` is an error. `records` counts the disk's records applied.
Result<ReplayResult> Replay(const std::string& log_dir, const std::string& base,
                            const std::string& out, uint64_t upto, uint32_t disk = 0);

}  // namespace osr::capture
