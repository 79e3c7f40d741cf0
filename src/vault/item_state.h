// A replicated item's state, the operator's actions on it, and the job types that move it:
// three enums and one table each, from which the API's checks, the job gate (jobs.cc,
// RunJob), the point loop, the metrics and the web UI's offered actions (GET
// /api/v1/states, web/src/model.js) all come. Names only at the edge: the catalog's rows,
// the REST API, the CLI, the web UI. DESIGN.md, "Item states"; ASR's names.
//
//   (Unprotected) -protect-> EnablingProtection -> Protected
//   Protected -test-failover-> TestFailoverCompleted -cleanup-> Protected
//   Protected | FailoverFailed -failover-> FailingOver -> FailedOver | FailoverFailed
//   FailedOver -change-point-> FailedOver -commit-> Committing -> FailoverCommitted
//   FailoverCommitted -reprotect-> Reprotecting -> Protected (the other direction)
//   Protected | TestFailoverCompleted | FailoverCommitted | EnablingProtection -unprotect->
//   (Unprotected)
//
// Thread model: none (values and pure functions).
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "vault/job_state.h"

namespace osr::vault {

enum class ItemState : uint8_t {
  kUnprotected,  // a VM without an item (never stored in the items table)
  kEnablingProtection,
  kProtected,
  kTestFailoverCompleted,
  kFailingOver,
  kFailedOver,
  kFailoverFailed,
  kCommitting,
  kFailoverCommitted,
  kReprotecting,
};
inline constexpr int kItemStateCount = 10;

struct ItemStateInfo {
  ItemState state;
  std::string_view name;  // as stored and shown: "Protected", ...
  bool busy;              // a job is moving the item on; the operator waits for it
  bool replicating;       // the source ships to the target: points are made, RPO is sampled
  bool failed_over;       // the VM runs at the target (its health comes from there)
};

// One row per state, in enum order.
inline constexpr ItemStateInfo kItemStates[] = {
    {ItemState::kUnprotected, "Unprotected", false, false, false},
    {ItemState::kEnablingProtection, "EnablingProtection", true, false, false},
    {ItemState::kProtected, "Protected", false, true, false},
    {ItemState::kTestFailoverCompleted, "TestFailoverCompleted", false, true, false},
    {ItemState::kFailingOver, "FailingOver", true, false, false},
    {ItemState::kFailedOver, "FailedOver", false, false, true},
    {ItemState::kFailoverFailed, "FailoverFailed", false, false, false},
    {ItemState::kCommitting, "Committing", true, false, true},
    {ItemState::kFailoverCommitted, "FailoverCommitted", false, false, true},
    {ItemState::kReprotecting, "Reprotecting", true, false, false},
};
static_assert(sizeof(kItemStates) / sizeof(kItemStates[0]) == kItemStateCount);

constexpr const ItemStateInfo& Info(ItemState s) {
  return kItemStates[static_cast<int>(s)];
}
constexpr std::string_view ItemStateName(ItemState s) {
  return Info(s).name;
}
// The state named `name` (exactly as ItemStateName writes it); nullopt for any other text.
constexpr std::optional<ItemState> ItemStateFromName(std::string_view name) {
  return FromName(kItemStates, &ItemStateInfo::state, name);
}

// A set of item states.
using ItemStates = uint32_t;
constexpr ItemStates Bit(ItemState s) {
  return ItemStates{1} << static_cast<int>(s);
}
template <typename... S>
constexpr ItemStates States(S... s) {
  return (Bit(s) | ... | 0u);
}
constexpr bool In(ItemState s, ItemStates set) {
  return (Bit(s) & set) != 0;
}

// A failover stands on its recovery point until it is committed: retention keeps it.
inline constexpr ItemStates kUncommittedFailover =
    States(ItemState::kFailingOver, ItemState::kFailoverFailed, ItemState::kFailedOver,
           ItemState::kCommitting);

// What an operator asks of an item (the REST API's operations, the CLI's commands, the
// web UI's buttons).
enum class Action : uint8_t {
  kProtect,
  kUnprotect,
  kCreatePoint,
  kTestFailover,
  kTestFailoverCleanup,
  kFailover,
  kChangePoint,
  kCommit,
  kReprotect,
};
inline constexpr int kActionCount = 9;

struct ActionInfo {
  Action action;
  std::string_view name;   // the web UI's and the CLI's word: "test-failover", ...
  ItemStates from;         // the states it may start from
  std::string_view needs;  // why it was refused, after "VM x is S: "
};

inline constexpr ActionInfo kActions[] = {
    {Action::kProtect, "protect", States(ItemState::kUnprotected), "it is protected already"},
    {Action::kUnprotect, "unprotect",
     States(ItemState::kEnablingProtection, ItemState::kProtected,
            ItemState::kTestFailoverCompleted, ItemState::kFailoverCommitted),
     "wait for its job to end"},
    {Action::kCreatePoint, "create-point",
     States(ItemState::kProtected, ItemState::kTestFailoverCompleted),
     "recovery points are made while it is protected"},
    {Action::kTestFailover, "test-failover", States(ItemState::kProtected),
     "a drill needs Protected"},
    {Action::kTestFailoverCleanup, "cleanup", States(ItemState::kTestFailoverCompleted),
     "there is no drill to clean up"},
    {Action::kFailover, "failover", States(ItemState::kProtected, ItemState::kFailoverFailed),
     "failover needs Protected"},
    {Action::kChangePoint, "change-point", States(ItemState::kFailedOver),
     "the recovery point can change only after failover and before commit"},
    {Action::kCommit, "commit", States(ItemState::kFailedOver),
     "commit needs FailedOver (osr failover first)"},
    {Action::kReprotect, "reprotect", States(ItemState::kFailoverCommitted),
     "reprotect needs FailoverCommitted (failover, then commit)"},
};
static_assert(sizeof(kActions) / sizeof(kActions[0]) == kActionCount);

constexpr const ActionInfo& Info(Action a) {
  return kActions[static_cast<int>(a)];
}
constexpr bool Allows(ItemState s, Action a) {
  return In(s, Info(a).from);
}
// Why `a` is refused in state `s`: "VM {vm} is {state}: {reason}" with the table's reason,
// or a better one for a few pairs (failover during a drill: clean it up first).
std::string Refusal(const std::string& vm, ItemState s, Action a);
// The names of the actions state `s` allows, in table order (GET /api/v1/states).
std::vector<std::string> ActionNames(ItemState s);
// GET /api/v1/states (docs/api.md): {item_states: [{name, busy, replicating, failed_over,
// actions: [action names]}], job_types: [{name, action}]}, in table order. The web UI
// offers only these actions.
nlohmann::json StatesJson();

// The jobs that move an item (their names as stored in the jobs table and shown).
enum class JobType : uint8_t {
  kEnableProtection,
  kTestFailover,
  kTestFailoverCleanup,
  kFailover,
  kChangePoint,
  kCommit,
  kReprotect,
};
inline constexpr int kJobTypeCount = 7;

// What lets a resumed job run from a state its own steps recorded.
enum class ResumeProof : uint8_t {
  kNone,
  kSameEpoch,  // the job's args name the item's epoch (it made this epoch's failover)
  kSwapped,    // the job's args say it swapped the item's direction (reprotect)
};

struct JobTypeInfo {
  JobType type;
  std::string_view name;  // "enable-protection", "failover", ...
  Action action;          // the operation that submits it (its start states)
  ItemStates through;     // states its own steps record: a resumed job goes on from them
  ItemStates proved;      // states it goes on from only with `proof`
  ResumeProof proof;
};

inline constexpr JobTypeInfo kJobTypes[] = {
    {JobType::kEnableProtection, "enable-protection", Action::kProtect,
     States(ItemState::kEnablingProtection), 0, ResumeProof::kNone},
    {JobType::kTestFailover, "test-failover", Action::kTestFailover, 0, 0, ResumeProof::kNone},
    {JobType::kTestFailoverCleanup, "test-failover-cleanup", Action::kTestFailoverCleanup, 0, 0,
     ResumeProof::kNone},
    {JobType::kFailover, "failover", Action::kFailover, 0,
     States(ItemState::kFailingOver, ItemState::kFailedOver), ResumeProof::kSameEpoch},
    {JobType::kChangePoint, "change-point", Action::kChangePoint, 0, 0, ResumeProof::kNone},
    {JobType::kCommit, "commit", Action::kCommit, States(ItemState::kCommitting), 0,
     ResumeProof::kNone},
    {JobType::kReprotect, "reprotect", Action::kReprotect, States(ItemState::kReprotecting),
     States(ItemState::kProtected), ResumeProof::kSwapped},
};
static_assert(sizeof(kJobTypes) / sizeof(kJobTypes[0]) == kJobTypeCount);

constexpr const JobTypeInfo& Info(JobType t) {
  return kJobTypes[static_cast<int>(t)];
}
constexpr std::string_view JobTypeName(JobType t) {
  return Info(t).name;
}
constexpr std::optional<JobType> JobTypeFromName(std::string_view name) {
  return FromName(kJobTypes, &JobTypeInfo::type, name);
}
// Whether a job of type `t` may run with the item in state `s` (`proved`: the job's args
// carry its type's proof). The job gate: a job runs only from a state it was made for.
constexpr bool JobMayRun(JobType t, ItemState s, bool proved) {
  const JobTypeInfo& j = Info(t);
  return Allows(s, j.action) || In(s, j.through) || (proved && In(s, j.proved));
}

static_assert(Info(ItemState::kReprotecting).state == ItemState::kReprotecting);
static_assert(Info(Action::kReprotect).action == Action::kReprotect);
static_assert(Info(JobType::kReprotect).type == JobType::kReprotect);

}  // namespace osr::vault
