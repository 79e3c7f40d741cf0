// StoreChangeLog: which recovery stores changed since a generation, so that the vault's
// point loop can ask a site every second for what changed (GET /api/v1/stores?since=GEN,
// docs/api.md) instead of every store's status.
//
// Why: over 500 idle VMs the vault asked for all 500 stores' status every second, and the
// site built, sent and the vault parsed 500 objects that said nothing new. Here a store is
// sent again only when its status changed.
//
// How: each call gives every store's mark (its status without the figures that move on
// their own: the file system's space, the history's size, the shared cache's use). A store
// whose mark differs from the last one noted gets the next generation; a store no longer
// given is noted as removed at that generation. An answer lists what got a generation
// after `since`.
//
// A generation names this log's instance ("<16 hex digits>-<n>"): one from another
// instance (the site restarted), from the future, or older than the oldest removal still
// remembered gets a full answer (every store), which the caller takes as a new start.
//
// Thread model: thread-safe (mu_ guards everything); Note is called by API threads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "common/status.h"

namespace osr::site {

class StoreChangeLog {
 public:
  // Removals remembered (a bound: past it the oldest are forgotten, and a `since` older
  // than them gets a full answer).
  static constexpr size_t kRemovedMax = 4096;
  // The longest `since` taken: 16 hex digits, '-', a u64 in decimal.
  static constexpr size_t kGenerationBytesMax = 16 + 1 + 20;

  // `instance`: this log's name in its generations; 16 lowercase hex digits (a fresh
  // random one per site start: StoreChangeLog::RandomInstance()).
  explicit StoreChangeLog(std::string instance);
  static std::string RandomInstance();

  struct Answer {
    std::string generation;            // to pass as `since` next time
    bool full = false;                 // every store is in `changed`: forget what came before
    std::vector<std::string> changed;  // names, in name order
    std::vector<std::string> removed;  // names, in name order (empty when full)
  };

  // Notes `marks` (store name -> its mark, every store of the site) and answers what
  // changed after `since` ("0": everything). Errors: kInvalidArgument for a `since` that is
  // not "0" nor a generation of the form above (too long, not hex, not a number).
  Result<Answer> Note(const std::string& since, const std::map<std::string, std::string>& marks);

 private:
  struct Mark {
    std::string text;
    uint64_t generation = 0;
  };

  const std::string instance_;
  std::mutex mu_;
  uint64_t generation_ = 0;                  // the newest given; guarded by mu_
  std::map<std::string, Mark> marks_;        // guarded by mu_
  std::map<std::string, uint64_t> removed_;  // name -> generation; guarded by mu_
  uint64_t forgotten_through_ = 0;  // removals at or below it are forgotten; guarded by mu_
};

}  // namespace osr::site
