#include "vault/item_state.h"

#include <fmt/format.h>

namespace osr::vault {

std::string Refusal(const std::string& vm, ItemState s, Action a) {
  std::string_view reason = Info(a).needs;
  if (a == Action::kFailover && s == ItemState::kTestFailoverCompleted) {
    reason = "failover needs Protected (clean up the drill first)";
  } else if (a == Action::kUnprotect && s == ItemState::kFailedOver) {
    reason = "commit the failover first, then unprotect";
  } else if (a == Action::kUnprotect && s == ItemState::kFailoverFailed) {
    reason = "run the failover again first (osr failover)";
  } else if (a == Action::kCreatePoint && s == ItemState::kEnablingProtection) {
    reason = "it is still being protected; wait for its job";
  }
  return fmt::format("VM {} is {}: {}", vm, ItemStateName(s), reason);
}

std::vector<std::string> ActionNames(ItemState s) {
  std::vector<std::string> out;
  for (const auto& a : kActions) {
    if (In(s, a.from)) out.emplace_back(a.name);
  }
  return out;
}

nlohmann::json StatesJson() {
  nlohmann::json states = nlohmann::json::array();
  for (const auto& row : kItemStates) {
    states.push_back({{"name", row.name},
                      {"busy", row.busy},
                      {"replicating", row.replicating},
                      {"failed_over", row.failed_over},
                      {"actions", ActionNames(row.state)}});
  }
  nlohmann::json jobs = nlohmann::json::array();
  for (const auto& row : kJobTypes) {
    jobs.push_back({{"name", row.name}, {"action", Info(row.action).name}});
  }
  return {{"item_states", states}, {"job_types", jobs}};
}

}  // namespace osr::vault
