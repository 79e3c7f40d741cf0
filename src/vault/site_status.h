// SiteStatusBoard: what the sites say of their groups and stores, for one pass of the vault
// over many items (a point-loop tick, a GET /items), asked once per site and kind
// (GET /api/v1/groups, GET /api/v1/stores: docs/api.md) instead of once per item.
//
// Why: per item, a tick over 500 idle VMs was 1000 HTTP(S) exchanges a second, each a new
// connection, and a site that does not answer cost each item its own connect timeout. Here
// a pass costs two exchanges per site, and a site that does not answer costs one failure,
// which every item of that site then reads.
//
// Each lookup answers as the per-VM GET would: the group's or store's status object, a
// kNotFound naming the VM when the site listed none of that name, or the site's own
// failure (unreachable, refused, an answer of the wrong shape: kCorruption). A site whose
// API lacks the bulk routes (an older osrd answering 404) is asked per VM instead.
//
// The answers are as of the first lookup at that site in this pass: a change the pass
// makes at a site (starting replication there) is not seen until Forget() or a new board.
//
// A board given a StoreMemory (the point loop's, kept from pass to pass) asks for stores
// with GET /api/v1/stores?since=GENERATION: the site answers only the stores that changed
// since the last pass, and the memory holds the rest as last sent. An idle site then costs
// one small exchange per pass, not its every store's status. A site without that
// parameter (an older osrd answers the plain array) is read in full each pass.
//
// Thread model: not thread-safe; one board belongs to one pass on one thread.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"
#include "vault/catalog.h"

namespace osr::vault {

// The sites' stores as last listed, kept by one owner (the point loop) from one board to
// the next. Not thread-safe.
class StoreMemory {
 public:
  // Forgets every site: the next board asks each for all its stores again.
  void Clear() { sites_.clear(); }

 private:
  friend class SiteStatusBoard;
  struct Site {
    std::string generation;  // as the site answered it, for the next ?since=
    std::map<std::string, nlohmann::json> by_name;
  };
  std::map<std::string, Site> sites_;  // by site name
};

class SiteStatusBoard {
 public:
  // Asks `site` for `path` (relative to its API root: "/groups", "/stores/vm1") and
  // answers its JSON or the call's failure (SiteClient::Call).
  using Fetch = std::function<Result<nlohmann::json>(const SiteRow& site, const std::string& path)>;

  enum class Mode {
    kBulk,   // one GET /groups and one GET /stores per site, on first need
    kPerVm,  // one GET per lookup (a single item: ShowItem)
  };

  // The registered sites (the catalog's), read once per board.
  using ListSites = std::function<std::vector<SiteRow>()>;

  SiteStatusBoard(Fetch fetch, Mode mode, ListSites list_sites = {})
      : fetch_(std::move(fetch)), mode_(mode), list_sites_(std::move(list_sites)) {}

  // The registered site `name` as the catalog had it at this board's first Site() call
  // (one read for the whole pass, not one per item); nullopt when none is.
  std::optional<SiteRow> Site(const std::string& name);

  // The group `vm` at `site`, as GET /api/v1/groups/{vm} answers it. Errors: kNotFound
  // ("site S: no VM V at this site") when the site has no such group; the site's failure.
  Result<nlohmann::json> Group(const SiteRow& site, const std::string& vm);
  // The store `vm` at `site`, as GET /api/v1/stores/{vm} answers it. Errors: kNotFound
  // ("site S: no store for V at this site"); the site's failure.
  Result<nlohmann::json> Store(const SiteRow& site, const std::string& vm);

  // Forgets what was read at `site`: the next lookup there asks again.
  void Forget(const std::string& site);

  // Stores are read through `memory` (borrowed: it outlives the board): only what changed
  // since the pass that last filled it; `refresh`: everything again (?since=0), as a
  // board without memory reads it, the figures that move on their own (space, history
  // size) included. Call before the first lookup. Only for Mode::kBulk.
  void Remember(StoreMemory* memory, bool refresh) {
    memory_ = memory;
    refresh_ = refresh;
  }

  // Exchanges made so far (for tests and the bench: the cost of a pass).
  int calls() const { return calls_; }

 private:
  enum class Kind { kGroups, kStores };
  // One site's answer to GET /groups or /stores: by name, or the failure every lookup gets.
  struct Listing {
    Status status;
    bool per_vm = false;      // the site lacks the bulk route: ask per VM
    bool remembered = false;  // the entries are in memory_ (this site's), not by_name
    std::map<std::string, nlohmann::json> by_name;
  };

  Result<nlohmann::json> Lookup(Kind kind, const SiteRow& site, const std::string& vm);
  Result<nlohmann::json> FetchOne(Kind kind, const SiteRow& site, const std::string& vm);
  Listing Read(Kind kind, const SiteRow& site);
  Listing ReadChanges(const SiteRow& site);
  // The entries of an array answer by name; kCorruption naming the entry that has none.
  static Status ByName(nlohmann::json& answer, const std::string& prefix,
                       std::map<std::string, nlohmann::json>& by_name);

  Fetch fetch_;
  Mode mode_;
  ListSites list_sites_;
  StoreMemory* memory_ = nullptr;  // Remember(); nullptr: stores are read in full
  bool refresh_ = false;
  std::optional<std::map<std::string, SiteRow>> sites_;  // read at the first Site()
  int calls_ = 0;
  std::map<std::pair<std::string, Kind>, Listing> listings_;  // by (site, kind)
};

}  // namespace osr::vault
