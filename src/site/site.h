// Site: the site daemon's state and parts. A site serves its VMs' disks over NBD with
// capture (one consistency group per VM), ships each protected group to its recovery
// site (Sender), receives the groups it protects for others into recovery stores
// (Receiver), and serves point-in-time views of them over NBD. The vault drives it
// through the HTTP API (site_api.h).
//
//   data_dir/site.json             groups and stores (rewritten atomically on change)
//   data_dir/groups/<vm>/<disk>.img   the disks; data_dir/groups/<vm>/capture/ the log
//   data_dir/stores/<vm>/          recovery stores (store.json, base/, journal/)
//   data_dir/views/<id>-<disk>.overlay   overlays of writable views (removed with them)
//
//   data_dir/groups/<vm>/run/nbd.sock   the VM's own NBD socket (0600, run/ is 0700): its
//                                  disks only, for a QEMU (or process VM) on this host
//
// Exports, in separate namespaces (a VM's name can never take a view's export):
// "vm/<vm>/<disk>" for a VM's disks, "view/<view id>/<disk>" for views (drill disks).
// Who may open them: nbd/access.h (the VM's socket: its disks; TLS clients: by
// nbd_tls_authz; plain TCP, loopback only unless nbd_insecure_tcp: all).
//
// Thread model: thread-safe; mu_ guards the maps. Parts run their own threads (NBD
// server, receiver, senders, capture log writers).
//
// Who owns what (docs/architecture.md, "Who owns what across threads"):
//   - groups_ owns each Group, which owns its CaptureGroup (the VM's disks, and so its
//     failover disks) and its Sender (which borrows the capture log and the group: it is
//     reset before the capture, member order and every path that frees a group). The
//     Materialiser's thread borrows the Group's failover disks; it is stopped before the
//     group goes. The Group shares its VmRunner with calls under way (start, stop,
//     freeze): a runner whose group went is stopped by whoever notices.
//   - stores_ shares each RecoveryStore with the receiver's session and with every view
//     and failover disk over it: the last of them frees it.
//   - exports_ shares each export (a group's disk, a view) with the NBD sessions that
//     chose it. Removing one: ExportTable::Remove, Server::DisconnectExport (ends its
//     sessions; returns when only the remover holds it), then drop it: a view and its pin
//     go there, before CloseView returns; a capture group is freed only after all its
//     exports have drained (FreeGroup; the capture group of one whose disk a client holds past the
//     bound is kept, fenced, in retired_ until Stop).
//   - views_ holds only names: the views themselves live in their exports.
//   - DeleteStore deletes files only when no view or failover disk pins the store
//     (waiting kStorePinsWaitMs for views that are closing, else kUnavailable).
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "capture/capture_group.h"
#include "common/socket.h"
#include "common/tls.h"
#include "hypervisor/allow_list.h"
#include "hypervisor/process_driver.h"
#include "hypervisor/qemu_driver.h"
#include "nbd/access.h"
#include "nbd/export_table.h"
#include "nbd/file_disk.h"
#include "nbd/server.h"
#include "replication/receiver.h"
#include "replication/sender.h"
#include "site/materialiser.h"
#include "site/networks.h"
#include "site/store_changes.h"
#include "site/vm_runner.h"
#include "store/failover_disk.h"
#include "store/recovery_store.h"
#include "store/views.h"

namespace osr::site {

struct SiteConfig {
  std::string name;
  std::string data_dir;
  ListenAddress nbd_listen;          // disks and views
  ListenAddress replication_listen;  // the receiver
  ListenAddress api_listen;          // the HTTP API for the vault
  uint64_t region_bytes = 64 * 1024;
  uint64_t disk_bytes_max = 16ull << 40;
  size_t views_max = 64;
  size_t disks_per_vm_max = 64;
  uint64_t capture_log_bytes_max = 8ull << 30;  // per VM; past it: bitmap, then resync
  // A VM's (and a drill VM's) console log, bytes (console_log_limit): past it, while the
  // VM runs, it moves to console.log.1 and starts again (VmRunner::BoundConsole), checked
  // every second. At least kConsoleLogBytesMin.
  uint64_t console_log_bytes_max = hypervisor::kConsoleLogBytesMax;
  static constexpr uint64_t kConsoleLogBytesMin = 4096;
  // The memory every recovery store's version index of this process shares (RocksDB's
  // block cache and memtables), bytes; store_index_cache_bytes. Retained history costs
  // disk, not memory.
  uint64_t store_index_cache_bytes = 64ull << 20;
  TlsFiles tls;  // replication between sites: mutual TLS when set (tls_ca, tls_cert, tls_key)
  // The site API uses the same certificate and answers only a client certificate with
  // this CN (api_vault_name), unless api_insecure: plain HTTP, loopback only (a lab).
  std::string api_vault_name = "vault";
  bool api_insecure = false;
  // Without tls: replication listens and connects on loopback addresses only, unless
  // this is set (replication_insecure = true: a lab on a trusted network).
  bool replication_insecure = false;
  // NBD over TCP: STARTTLS with client certificates when set (nbd_tls_ca, nbd_tls_cert,
  // nbd_tls_key); then nbd_tls_authz must name the client certificates allowed in.
  TlsFiles nbd_tls;
  std::vector<nbd::AuthzRule> nbd_tls_authz;
  // nbd_tls_mode = "optional": plain clients too (SELECTIVETLS; a loopback listener or
  // nbd_insecure_tcp only). Default "require" (FORCEDTLS).
  bool nbd_tls_optional = false;
  // nbd_insecure_tcp = true: plain TCP on an nbd_listen that is not loopback.
  bool nbd_insecure_tcp = false;
  nbd::ServerLimits nbd_limits;          // nbd_connections_max, nbd_connections_per_address_max
  int nbd_handshake_timeout_ms = 10000;  // nbd_handshake_timeout_ms
  // Commit copies a failed-over VM's point into its disks while it runs: at most this
  // many bytes a second (materialise_rate; 0: no limit).
  uint64_t materialise_bytes_per_second = 0;
  // What this site's VMs may run (commands_file, allow_api_commands): named entries of
  // its allow-list file; literal commands from the API only when allow_api_commands.
  hypervisor::SiteCommands commands;
  // The QEMU this site runs VMs with (qemu_binary: a path, or a name looked up in PATH).
  std::string qemu_binary = "qemu-system-x86_64";
  // What the logical networks of VM specs plug into here, for production and for drills
  // ([networks.NAME]: networks.h).
  SiteNetworks networks;

  // Reads a TOML file: name, data_dir, nbd_listen, replication_listen, api_listen, and
  // optionally tls_ca, tls_cert, tls_key (PEM files), commands_file (read here: a bad
  // file is an error of the config; a relative path is relative to the config's folder)
  // allow_api_commands (default false), replication_insecure (a boolean) and the nbd_*
  // keys above (docs/api.md).
  static Result<SiteConfig> Load(const std::string& path);
};

struct DiskSpec {
  std::string name;
  uint64_t size_bytes;
};

// Why a group or a store is quarantined: a file it needs could not be opened as it is
// (at start, or when a repair tried again). Typed; printed only at the edge
// (DamageKindName). What the operator can do about each: docs/operations.md.
enum class DamageKind {
  kStateEntry,      // its entry in site.json is not one osr wrote
  kImageMissing,    // a disk image is not there
  kImageSize,       // a disk image has another size than the disk (changed outside osr)
  kImage,           // a disk image cannot be opened (permissions, I/O error)
  kCaptureHistory,  // the capture log, a dirty bitmap or the fence record is unreadable
  kRegionMap,       // a failover disk's region map (.cow) is unreadable
  kStoreMissing,    // the failover disks' recovery store is gone or quarantined
  kStore,           // a recovery store (store.json, base, journal) cannot be opened
  kImageChanged,    // an image differs from what the last clean stop recorded
};
std::string_view DamageKindName(DamageKind kind);

struct Damage {
  DamageKind kind;
  std::string reason;  // what is wrong, with the file and the numbers
  std::string action;  // what the operator can do
  nlohmann::json Json() const;
};

// What POST /groups/{vm}/repair may do besides opening the files again.
struct RepairOptions {
  // A grown image whose bytes past the disk's size are all zeros is cut back to the
  // disk's size (nothing is lost); an image with data there is left alone.
  bool trim_image = false;
  // An unreadable capture history is moved aside (groups/<vm>/damaged-<time>/) and the
  // disks are resent whole: the history counts as lost.
  bool reset_history = false;
  // Images changed outside osr while the site was stopped (kImageChanged) are taken as
  // they are: resent whole to the recovery site (whose older points then go, folded by
  // that resync).
  bool accept_changes = false;
  // With reset_history: the new log's first seq. Above what the recovery store holds
  // (the vault gives its durable_seq + 1), so that replication goes on from there.
  uint64_t first_seq = 1;
};

class Site {
 public:
  static Result<std::unique_ptr<Site>> Start(const SiteConfig& cfg);
  ~Site();
  void Stop();

  const SiteConfig& config() const { return cfg_; }
  const ListenAddress& nbd_address() const { return nbd_bound_; }
  // Export names (see the file comment).
  static std::string DiskExport(const std::string& vm, const std::string& disk);
  static std::string ViewExport(const std::string& view_id, const std::string& disk);
  const ListenAddress& replication_address() const { return repl_bound_; }

  // Source role: a VM's disks, captured as one group.
  Result<nlohmann::json> CreateGroup(const std::string& vm, const std::vector<DiskSpec>& disks);
  // Adds disk `disk` of size_bytes to VM, or grows it to size_bytes, while the VM runs and
  // replicates (docs/formats.md, "Disk changes"): the capture log records the change
  // before any client reaches the new bytes; clients (a running QEMU) see the new size or
  // disk on their next connection. Crash safe: site.json names the change first and a
  // start finishes it. kNotFound (no VM), kInvalidArgument (a name or size that is not
  // one, not larger, too many disks), kFailedPrecondition (quarantined, fenced, on
  // failover disks before commit, tracking only until reprotect), kUnavailable (the
  // capture log takes no record now: over its limit until the next resync).
  // `add`: true — the disk must be new (kAlreadyExists otherwise); false — it must exist
  // (kNotFound); unset — either.
  Result<nlohmann::json> ChangeGroupDisk(const std::string& vm, const std::string& disk,
                                         uint64_t size_bytes, std::optional<bool> add = {});
  Status DeleteGroup(const std::string& vm);
  // Opens a quarantined group's files again (after the operator fixed them, or doing
  // what `opts` allows); returns its status. kFailedPrecondition (with the new reason)
  // when it is still damaged, kInvalidArgument when it is not quarantined.
  Result<nlohmann::json> RepairGroup(const std::string& vm, const RepairOptions& opts);
  // Opens a quarantined store again. Same errors.
  Result<nlohmann::json> RepairStore(const std::string& vm);
  // Ships the group to `target` (HOST:PORT) at `epoch`. `target_site`: the recovery
  // site's name, which its certificate must name ("": only the CA is checked).
  // kPermissionDenied for plain TCP to an address that is not loopback (no TLS, and no
  // replication_insecure); kInvalidArgument for a bad address, epoch or name.
  Status StartReplication(const std::string& vm, const std::string& target, uint64_t epoch,
                          bool compress = true, uint64_t bandwidth_bytes_per_second = 0,
                          const std::string& target_site = "");
  Status StopReplication(const std::string& vm);
  // Fencing: the VM now runs elsewhere at `epoch`; this site refuses writes to its disks
  // and (unless keep_shipping: a planned failover drains first) stops shipping them. Kept
  // across restarts. Fencing again at the same epoch changes nothing.
  Status FenceGroup(const std::string& vm, uint64_t epoch, bool keep_shipping = false);
  Result<nlohmann::json> GroupStatus(const std::string& vm);
  // Every group's GroupStatus (a quarantined one as GroupStatus shows it), in name order:
  // one call for what the vault would otherwise ask once per VM. Each group is read under
  // mu_ on its own (not one snapshot of all); one deleted meanwhile is left out.
  nlohmann::json AllGroupsStatus();

  // Failover (this site holds the store): raises the store's epoch (the old primary's
  // records are refused from now on), then makes a group of failover disks over the
  // point at `seq` (no copy), tracking-only, with the regions the store changed after
  // `seq` marked for reprotect. Doing it again with the same seq and epoch returns the
  // same group.
  Result<nlohmann::json> FailoverGroup(const std::string& vm, uint64_t seq, uint64_t epoch);
  // Commit: copies what the failover disks do not hold yet from the point, in the
  // background; GroupStatus shows the progress. The store may go once it is done.
  Status MaterialiseGroup(const std::string& vm);
  // Reprotect, at the old primary: the regions whose changes never reached the recovery
  // site (the capture log's records after `after` and the dirty bitmaps), or history
  // "lost" when this site cannot know them.
  // Records with seq <= `after` are known to be at the recovery site. "verified" says
  // whether the disks and history are still what the fence fingerprint recorded
  // (capture/fence_fingerprint.h); "checks" lists each difference found ({check, disk?,
  // reason}). Unverified regions may be too few: the vault compares hashes instead.
  Result<nlohmann::json> UnreplicatedRegions(const std::string& vm, uint64_t after);
  // Reprotect, at the new primary: regions to send whole with the first resync.
  Status MarkRegions(const std::vector<capture::CaptureGroup::DiskRange>& regions,
                     const std::string& vm);
  // One XXH3-64 per `region_bytes` of every disk of the group, disk after disk (little
  // endian), for comparing two sites' disks when history is lost.
  Result<std::string> GroupHashes(const std::string& vm, uint64_t region_bytes);
  // Marks the regions whose hashes differ from `other` (GroupHashes of the other site);
  // returns how many regions and bytes.
  Result<nlohmann::json> CompareHashes(const std::string& vm, uint64_t region_bytes,
                                       const std::string& other);
  // Reprotect, at the old primary: its (fenced, stopped) group becomes a differential
  // store at `base_seq` of the new primary's order; its images are its base (moved). The
  // store is at `epoch` and receives from `source` (the new primary; "": any site).
  Result<nlohmann::json> GroupToStore(const std::string& vm, uint64_t base_seq, uint64_t epoch,
                                      const std::string& source = "");

  // The VM of a group: runs at this site on the group's disks. `spec` is the VM's spec
  // (hypervisor/vm_spec.h), checked in full and against this site's commands rules:
  // kInvalidArgument naming the field (a literal command where allow_api_commands is
  // off, a name that is not an entry of the commands file, a refused qemu argument).
  Status StartVm(const std::string& vm, const nlohmann::json& spec);
  // Returns whether it stopped by itself (true) or had to be killed.
  Result<bool> StopVm(const std::string& vm, int timeout_ms);
  // How long the site gives a VM it stops on its own (fenced disks, a start that lost its
  // group) before the hard stop.
  static constexpr int kVmStopTimeoutMs = 10000;
  // How long Stop gives each VM to shut down (they stop at once, side by side).
  static constexpr int kVmShutdownOnStopMs = 5000;
  // App-consistent points: the guest agent's fsfreeze/thaw (qemu driver).
  Status FreezeVm(const std::string& vm, int timeout_ms);
  Status ThawVm(const std::string& vm);

  // Recovery role: a store for another site's group, at the epoch and from the source
  // site the vault gives (origin: epoch 1 and any source by default).
  Status CreateStore(const std::string& vm, const std::vector<DiskSpec>& disks,
                     store::RecoveryStore::Start start = store::RecoveryStore::Start::kEmpty,
                     const store::StoreOrigin& origin = {});
  // kAlreadyExists while views are open or failover disks run over it; kUnavailable if
  // pins are still held kStorePinsWaitMs after that (views closing, held by NBD clients).
  Status DeleteStore(const std::string& vm);
  static constexpr int kStorePinsWaitMs = 10000;
  // Folds the store's history up to `seq` (not past an open view); returns the new base.
  Result<nlohmann::json> FoldStore(const std::string& vm, uint64_t seq);
  // Asks for a history compaction of vm's store (RecoveryStore::Compact; keep = the seqs of
  // the points the vault keeps) and returns at once: compactions run on the site's
  // maintenance thread, one store at a time (each reads and writes that store's history:
  // two at once would only slow both). A request for a store whose compaction is queued
  // replaces it; one made while it runs is queued after it. Returns {name, compaction:
  // CompactionJson}; GET /stores/VM shows the same until the next request.
  // kNotFound for no such store; kInvalidArgument for `through` beyond the store's durable
  // seq; RecoveryStore::Compact's own errors appear in the compaction's state ("failed").
  Result<nlohmann::json> CompactStore(const std::string& vm, std::vector<uint64_t> keep,
                                      uint64_t through);
  // The figures of a store's status that move on their own (the file system's space,
  // the history's size, the shared index cache's use): left out of a store's mark
  // (StoreChangeLog), so that an idle store does not read as changed.
  enum class StoreUsage { kInclude, kLeaveOut };
  Result<nlohmann::json> StoreStatus(const std::string& vm,
                                     StoreUsage usage = StoreUsage::kInclude);
  // Every store's StoreStatus (a quarantined one as {name, damage}), in name order; as
  // AllGroupsStatus.
  nlohmann::json AllStoresStatus();
  // The stores whose status changed since `since` (GET /api/v1/stores?since=, docs/api.md):
  // {generation, full, stores: [StoreStatus], removed: [name]}. Errors: kInvalidArgument
  // for a `since` that is not "0" nor a generation this API answered (StoreChangeLog).
  Result<nlohmann::json> StoresChangedSince(const std::string& since);
  Result<nlohmann::json> OpenView(const std::string& vm, uint64_t seq, bool writable);
  // Takes the view's exports off NBD, ends their sessions and frees the view (its overlay
  // and its pin) before it returns; a session stuck past Server::kDisconnectWaitMs keeps the
  // view (and the pin) until it lets go (logged; the close itself succeeds).
  Status CloseView(const std::string& id);
  // A view: {id, vm, seq, writable, disks: [{name, uri}]}; a view that could not be
  // reopened after a restart has "lost": the reason, and no disks. kNotFound: no view.
  Result<nlohmann::json> ViewStatus(const std::string& id);

  // Drill VMs (drill_vm.cc): a VM on a writable view's disks, plugged into this site's drill
  // networks (networks.h), never its production ones. Start checks the spec as StartVm
  // does, and the networks (kFailedPrecondition naming an unmapped network), then starts
  // the boot check of spec.boot_check; ViewStatus shows it ("vm": {state, boot, ...}).
  // kInvalidArgument for a read-only view (a drill VM writes), kNotFound for no view.
  Status StartViewVm(const std::string& id, const nlohmann::json& spec);
  Result<bool> StopViewVm(const std::string& id, int timeout_ms);

  // A VM's console (its serial port's log, or a process VM's output), from `offset` (its
  // end: at most max_bytes) or, without one, its last max_bytes: {offset, next, size, text,
  // cuts, cut_size} with non-printable bytes as '?'; cuts counts the times the log was cut
  // while this daemon ran (VmRunner::console_cuts), cut_size is its size at the last cut.
  // The production or failed-over VM of a group, or a drill VM. kNotFound for no such group
  // or view.
  Result<nlohmann::json> GroupConsole(const std::string& vm, std::optional<uint64_t> offset,
                                      size_t max_bytes);
  Result<nlohmann::json> ViewConsole(const std::string& id, std::optional<uint64_t> offset,
                                     size_t max_bytes);

  // Pre-checks (prechecks.cc; docs/api.md "Checks before acting"): whether this site can
  // take what a workflow is about to put here, before anything changes. Each check is
  // {name, result: passed|warning|failed, message, and its numbers}; "creates" lists what
  // the workflow would make here (marked new), "uses" what it would take as it is.
  struct TargetNeeds {
    std::string vm;
    // The VM's spec when the workflow runs it here (failover, a drill that boots), with
    // the networks of `role`; null when nothing runs here.
    nlohmann::json spec;
    NetRole role = NetRole::kProduction;
    enum class FreeName { kNone, kGroup, kStore };
    FreeName name_free = FreeName::kNone;  // a group / store named vm must not exist
    uint64_t bytes_needed = 0;             // free space needed now (failed below it)
    uint64_t bytes_headroom = 0;           // of bytes_needed: the journal's (said apart)
    uint64_t bytes_full = 0;               // free space for the whole (a warning below it)
    // The point a failover or drill opens here (its seq in the VM's store): its disks, as
    // they were then, are the whole (bytes_full) and are listed ("point_disks").
    std::optional<uint64_t> seq;
  };
  nlohmann::json CheckTarget(const TargetNeeds& needs);

  nlohmann::json Describe();
  // {allow_api_commands, commands: [NAME], qemu_args: [NAME]}: what the vault may name in
  // a VM's spec for this site (GET /api/v1/site, "vm_commands").
  nlohmann::json VmCommandsJson() const;
  std::string Metrics();

 private:
  struct Group {
    std::vector<DiskSpec> disks;
    std::unique_ptr<capture::CaptureGroup> capture;
    std::string replicate_to;  // "" when not protected
    std::string target_site;   // the recovery site's name ("": not checked)
    uint64_t epoch = 1;
    bool compress = true;
    uint64_t bandwidth_bytes_per_second = 0;  // 0: no limit
    uint64_t fenced_epoch = 0;                // 0: not fenced
    bool failover = false;                    // the disks are failover disks over store `vm` ...
    uint64_t failover_seq = 0;  // ... at this seq (0 is a seq too: a store's beginning)
    bool tracking = false;      // changes tracked in the bitmaps only (until reprotect)
    bool history_lost = false;  // the capture history was missing when the site started
    // Quarantined (its files could not be opened): nothing of it is open (capture is
    // null), nothing runs, and site.json keeps `saved`, its entry as it was.
    std::optional<Damage> damage;
    nlohmann::json saved;
    uint64_t first_seq = 1;       // of a new capture log (not kept: only a fresh log uses it)
    bool accept_changes = false;  // this open takes images changed outside osr (repair)
    std::unique_ptr<replication::Sender> sender;
    // Owned by capture's disks; valid while capture lives (the materialiser uses them).
    std::vector<store::FailoverDisk*> failover_disks;
    // Commit's copy (its own lock and thread: materialiser.h). Stopped before the group
    // (and so its capture and failover disks) goes.
    Materialiser materialiser;
    // The VM that runs on the group's disks (its own locks: vm_runner.h). Shared: its
    // calls run outside mu_, and the group may go meanwhile. vm_spec (guarded by mu_):
    // null, or the spec it last started with in normal form (hypervisor::VmSpecJson).
    std::shared_ptr<VmRunner> vm = std::make_shared<VmRunner>();
    nlohmann::json vm_spec;
    std::string nbd_socket;  // the VM's own NBD socket ("" when it has none)
    // A disk change begun (ChangeGroupDisk) and not known to be in the capture log: kept
    // in site.json ("disk_change"), finished when the group opens.
    std::optional<DiskSpec> disk_change;
    bool disk_change_adds = false;  // that change adds the disk (else it grows)
  };
  struct View {
    std::string vm;
    uint64_t seq;
    bool writable;
    std::vector<std::string> exports;
    std::vector<std::shared_ptr<store::OverlayView>> overlays;  // writable: to Discard()
    std::string lost;  // "": open; else why it could not be reopened after a restart
    // A drill VM on the view's disks (drill_vm.cc), in the drill networks. Shared as a
    // group's runner is; vm_spec (guarded by mu_): null, or the spec it started with.
    std::shared_ptr<VmRunner> runner = std::make_shared<VmRunner>();
    nlohmann::json vm_spec;
    std::string nbd_socket;  // the drill VM's own NBD socket ("": none)
  };

  using GroupMap = std::map<std::string, std::unique_ptr<Group>>;
  struct OpenFailure {
    DamageKind kind;
    Status status;
  };

  explicit Site(SiteConfig cfg) : cfg_(std::move(cfg)) {}
  // The site.json entry of VM as kept in groups/<vm>/entry.json, or a marker that
  // quarantines the group (kStateEntry) saying `why` and what is missing.
  nlohmann::json EntryFromFolder(const std::string& vm, const std::string& why) const;
  // Writes each group's entry that changed to groups/<vm>/entry.json; a failure is logged.
  void SaveEntriesLocked(const nlohmann::json& groups);
  // The VM names of the folders under data_dir/`under` ("groups", "stores"), sorted.
  std::vector<std::string> FolderNames(const std::string& under) const;
  Status Load();
  void LoadStoresLocked(const nlohmann::json& stores);
  // Views kept in site.json (drills) open again, at the same ids and export names;
  // one that cannot is kept as lost (with the reason) until it is closed.
  void LoadViewsLocked(const nlohmann::json& views);
  // Opens the exports of view `id`; `reopen`: its overlays exist already. Nothing is
  // left half-done on failure.
  Result<nlohmann::json> OpenViewLocked(const std::string& id, View& v, bool reopen);
  std::string OverlayPath(const std::string& id, uint32_t disk) const;
  // A group from its site.json entry: opened, or quarantined with the reason; nullptr
  // when its disks turned out to be a store (an interrupted reprotect, finished here).
  std::unique_ptr<Group> LoadGroupLocked(const std::string& vm, const nlohmann::json& entry,
                                         uint64_t first_seq = 1, bool accept_changes = false);
  // Parses the entry into `g` and opens it; the failure says which file and why.
  std::optional<OpenFailure> OpenSavedGroupLocked(const std::string& vm,
                                                  const nlohmann::json& entry, Group& g,
                                                  bool* became_store);
  Damage GroupDamage(const std::string& vm, const Group& g, const OpenFailure& f) const;
  Damage StoreDamage(const std::string& vm, const Status& st) const;
  void AdoptVmLocked(const std::string& vm, Group& g, pid_t pid);
  nlohmann::json DamagedGroupJson(const std::string& vm, const Group& g) const;
  static nlohmann::json ReplicationFields(const Group& g);
  // The watcher thread: records fences the senders applied by themselves (site.json) and
  // stops the VMs of fenced groups. Wakes every second, or when woken.
  void WatchLoop();
  void WatchOnce();
  void WakeWatcher();
  Status TrimGrownImagesLocked(const std::string& vm, const Group& g);
  // For a store that is not open: kFailedPrecondition naming its damage, else NotFound.
  Status MissingStore(const std::string& vm) const;
  // NotFound, or kFailedPrecondition naming the damage, unless `it` is a live group.
  Status Usable(GroupMap::const_iterator it, const std::string& vm) const;
  // Names valid and unique, sizes within limits.
  Status CheckDisks(const std::string& vm, const std::vector<DiskSpec>& disks) const;
  Status SaveLocked();  // holds mu_
  // `create`: make missing images (a new VM, new failover disks); else a missing image is
  // an error (kImageMissing), never a
  // blank disk in its place.
  // `failed_kind` (optional) says which file failed.
  Status OpenGroupLocked(const std::string& vm, Group& g, bool create = false,
                         DamageKind* failed_kind = nullptr);
  Status StartSenderLocked(const std::string& vm, Group& g);
  // Commit's last step, on the materialiser's thread: the disks stand alone (site.json
  // says so, then their region maps go). Takes mu_.
  Status FinishMaterialise(const std::string& vm, Group* g, Status copied);
  bool VmRunningLocked(Group& g);
  // What the VM of group `vm` runs with: the disks' URIs at this site (QEMU: its own
  // socket; a process: the URIs the API shows, unless TCP takes TLS clients only).
  // kFailedPrecondition when a NIC's network has no mapping here.
  Result<VmLaunch> LaunchFor(const std::string& vm, const Group& g, const hypervisor::VmSpec& spec,
                             std::string command) const;
  std::string DrillRunDir(const std::string& id) const;
  // The export owner name of view `id`'s disks ("view:ID": no VM can be named so), which
  // its drill VM's own socket may open.
  static std::string DrillPrincipal(const std::string& id) { return "view:" + id; }
  // Opens the drill VM's own NBD socket (its view's disks only); holds mu_. "" on failure.
  std::string OpenDrillSocketLocked(const std::string& id);
  // Takes the runner of a view out of service: stops its VM and closes its socket.
  void EndDrillVm(const std::string& id, View& v);
  // A drill VM that outlived the daemon (site.json drill_vm_pid): taken in charge again.
  void AdoptDrillVmLocked(const std::string& id, View& v, const nlohmann::json& entry);
  // What the launch of a drill VM on view `id` is (its socket, its drill networks).
  Result<VmLaunch> DrillLaunchLocked(const std::string& id, View& v, const hypervisor::VmSpec& spec,
                                     std::string command);
  // {state, pid, driver, boot: {state, reason, ms}}
  static nlohmann::json DrillVmJson(VmRunner& runner, const nlohmann::json& spec);
  // The spec the vault sent, checked in full and against this site's commands rules, and
  // what it runs (the command, or the extra qemu arguments). kInvalidArgument naming `who`
  // ("VM vm1", "drill view-3") and the field; driver none is one too.
  Result<std::pair<hypervisor::VmSpec, std::string>> CheckedVmSpec(
      const std::string& who, const nlohmann::json& spec_json) const;
  // The runner of group `vm`, or nullptr with *why (NotFound, quarantined).
  std::shared_ptr<VmRunner> RunnerOf(const std::string& vm, Status* why);
  std::string Uri(const std::string& export_name) const;
  // The URI a VM on this host uses for its disk: its own socket when it has one.
  std::string LocalUri(const std::string& vm, const Group& g, const std::string& disk) const;
  std::string VmSocketPath(const std::string& vm) const;
  // Opens the VM's own NBD socket (best effort: without it the VM uses TCP); holds mu_.
  void OpenVmSocketLocked(const std::string& vm, Group& g);
  // Takes the group's disks (and its socket) off NBD and ends their sessions; kUnavailable
  // if a disk is still held afterwards (Server::DisconnectExport).
  Status CloseGroupExports(const std::string& vm, Group& g);
  // Serves the group's disks (exports and the VM's socket); holds mu_.
  Status AddGroupExportsLocked(const std::string& vm, Group& g);
  // Frees a group taken out of groups_ (its sender and materialiser already stopped)
  // once its exports have drained; else keeps its capture group, fenced, in retired_.
  void FreeGroup(const std::string& vm, std::unique_ptr<Group> g);
  // Keeps a capture group whose disk an NBD client still holds (`why`) until Stop, fenced.
  void RetireCapture(const std::string& vm, std::unique_ptr<capture::CaptureGroup> capture,
                     const Status& why);
  // Why the store of `vm` cannot go now (open views, failover disks); holds mu_.
  Status StoreInUseLocked(const std::string& vm) const;

  const SiteConfig cfg_;
  Fd data_lock_;  // flock on data_dir/lock: one daemon per data_dir
  nbd::ExportTable exports_;
  nbd::Authz nbd_authz_;  // before nbd_: the server borrows it
  std::unique_ptr<nbd::Server> nbd_;
  std::unique_ptr<replication::Receiver> receiver_;
  std::shared_ptr<TlsContext> tls_client_;  // for senders; nullptr: plain TCP
  ListenAddress nbd_bound_;
  ListenAddress repl_bound_;

  std::mutex mu_;
  GroupMap groups_;                                                      // guarded by mu_
  std::map<std::string, std::shared_ptr<store::RecoveryStore>> stores_;  // guarded by mu_
  // Stores that could not be opened (site.json keeps them; their files are left alone).
  std::map<std::string, Damage> damaged_stores_;  // guarded by mu_
  std::map<std::string, View> views_;             // guarded by mu_
  uint64_t next_view_ = 1;                        // guarded by mu_
  std::string last_saved_;                        // site.json as last written; guarded by mu_
  // Each group's entry as last written to groups/<vm>/entry.json (a copy of its site.json
  // entry, so that a site whose site.json and site.json.prev are both lost rebuilds its
  // groups); guarded by mu_.
  std::map<std::string, std::string> entries_saved_;

  // Which stores changed, for StoresChangedSince (thread-safe on its own).
  StoreChangeLog store_changes_{StoreChangeLog::RandomInstance()};

  std::mutex retired_mu_;  // taken after mu_ when both are held
  // Capture groups of groups deleted while an NBD client still held one of their disks
  // past every bound; freed by Stop, after the NBD server. Guarded by retired_mu_.
  std::vector<std::unique_ptr<capture::CaptureGroup>> retired_;

  // History compactions (CompactStore): one per store at most, run by maintainer_ in the
  // order asked. All guarded by maint_mu_ (taken after mu_ when both are held).
  struct Compaction {
    enum class State { kQueued, kRunning, kDone, kFailed };
    State state = State::kQueued;
    // The store instance asked for (a store deleted and made again under the same name is
    // another one: its entry is not this run's to finish).
    std::weak_ptr<store::RecoveryStore> store;
    std::vector<uint64_t> keep;
    uint64_t through = 0;
    int64_t asked_ns = 0, started_ns = 0, finished_ns = 0;  // wall clock, ns
    nlohmann::json result;  // kDone: RecoveryStore::CompactResult's fields
    std::string error;      // kFailed
    // Asked for while this one runs: started after it.
    std::optional<std::pair<std::vector<uint64_t>, uint64_t>> next;
  };
  static nlohmann::json CompactionJson(const Compaction& c);
  void MaintenanceLoop();
  std::mutex maint_mu_;
  std::condition_variable maint_cv_;
  std::map<std::string, Compaction> compactions_;
  std::deque<std::string> maint_queue_;
  bool maint_stop_ = false;
  // The store the maintenance thread works on now (nullptr: none); DeleteStore waits until
  // it has left the store before removing its files.
  const store::RecoveryStore* maint_running_ = nullptr;
  std::thread maintainer_;

  std::thread watcher_;
  std::mutex watch_mu_;
  std::condition_variable watch_cv_;
  bool watch_stop_ = false;  // guarded by watch_mu_
  bool watch_wake_ = false;  // guarded by watch_mu_
};

}  // namespace osr::site
