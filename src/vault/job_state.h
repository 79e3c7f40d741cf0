// A job's state (and a step's): one enum, one table of what follows from each state;
// names only at the edge (the catalog's rows, the REST API, the CLI, the web UI).
//
//   Queued -> Running -> Succeeded | Failed | Cancelled
//   Queued -> Cancelled (cancelled before it ran: nothing was changed)
//
// Thread model: none (values and pure functions).
#pragma once

#include <cstddef>
#include <optional>
#include <string_view>

namespace osr::vault {

// The `key` of the row of `table` named `name` (exactly as written there); nullopt for any
// other text. The one lookup of a name at the edge for every state table.
template <typename Row, size_t N, typename Key>
constexpr std::optional<Key> FromName(const Row (&table)[N], Key Row::*key, std::string_view name) {
  for (const Row& row : table) {
    if (row.name == name) return row.*key;
  }
  return std::nullopt;
}

enum class JobState {
  kQueued,
  kRunning,
  kSucceeded,
  kFailed,
  kCancelled,  // stopped on request (osr job cancel, or unprotect); its last step says
               // what it left behind
};

struct JobStateInfo {
  JobState state;
  std::string_view name;  // as shown and stored: "Queued", "Running", ...
  bool ended;             // no step runs any more; the state does not change again
};

// The table: one row per state, in enum order.
inline constexpr JobStateInfo kJobStates[] = {
    {JobState::kQueued, "Queued", false},      {JobState::kRunning, "Running", false},
    {JobState::kSucceeded, "Succeeded", true}, {JobState::kFailed, "Failed", true},
    {JobState::kCancelled, "Cancelled", true},
};

constexpr const JobStateInfo& Info(JobState s) {
  return kJobStates[static_cast<int>(s)];
}
constexpr std::string_view JobStateName(JobState s) {
  return Info(s).name;
}
constexpr bool JobEnded(JobState s) {
  return Info(s).ended;
}
// The state named `name` (exactly as JobStateName writes it); nullopt for any other text.
constexpr std::optional<JobState> JobStateFromName(std::string_view name) {
  return FromName(kJobStates, &JobStateInfo::state, name);
}

static_assert(Info(JobState::kCancelled).state == JobState::kCancelled,
              "kJobStates is in enum order");

}  // namespace osr::vault
