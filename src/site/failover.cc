// The site's part of failover, commit and reprotect (the vault orders the steps; see
// docs/architecture.md, "Failover and reprotect"), and the VMs that run on its disks.
#include <fmt/format.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <xxhash.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <thread>

#include "capture/log_reader.h"
#include "common/le.h"
#include "common/threads.h"
#include "site/site.h"

namespace osr::site {

namespace fs = std::filesystem;
using nlohmann::json;
using DiskRange = capture::CaptureGroup::DiskRange;

namespace {

// Merges ranges of one disk (sorted by offset) that touch or overlap.
void AddMerged(std::vector<std::pair<uint64_t, uint64_t>>* runs, uint64_t off, uint64_t len) {
  if (!runs->empty() && off <= runs->back().first + runs->back().second) {
    auto& last = runs->back();
    last.second = std::max(last.first + last.second, off + len) - last.first;
  } else {
    runs->emplace_back(off, len);
  }
}

}  // namespace

Result<json> Site::FailoverGroup(const std::string& vm, uint64_t seq, uint64_t epoch) {
  std::shared_ptr<store::RecoveryStore> st;
  {
    std::lock_guard lock(mu_);
    auto it = stores_.find(vm);
    if (it == stores_.end()) return MissingStore(vm);
    st = it->second;
    if (auto g = groups_.find(vm); g != groups_.end()) {
      Group& gr = *g->second;
      if (gr.failover && gr.failover_seq == seq &&
          gr.epoch == epoch) {  // done already (a retried job)
        json disks = json::array();
        for (auto& d : gr.disks)
          disks.push_back({{"name", d.name},
                           {"size_bytes", d.size_bytes},
                           {"uri", Uri(DiskExport(vm, d.name))}});
        return json{{"name", vm},
                    {"seq", seq},
                    {"epoch", epoch},
                    {"disks", disks},
                    {"store_durable_seq", it->second->durable_seq()}};
      }
      return Status(Code::kAlreadyExists,
                    fmt::format("VM {} already has disks at this site (failover seq {}); "
                                "change the point or commit instead",
                                vm, gr.failover_seq));
    }
  }
  if (st->initial_sync_pending() || st->differential()) {
    return Unavailable("the recovery store of " + vm +
                       " has not received its first full copy yet: no point to fail over to");
  }
  // Fence the old primary at the store first: its records are refused from now on, and
  // the session it may still have is cut. (A resync under way ends with it: points
  // before it stay readable.)
  OSR_RETURN_IF_ERROR(st->RaiseEpoch(epoch));
  receiver_->EndGroup(vm);
  std::lock_guard lock(mu_);
  if (groups_.count(vm)) return Status(Code::kAlreadyExists, "VM " + vm + " was just created");
  std::string dir = cfg_.data_dir + "/groups/" + vm;
  std::error_code ec;
  fs::remove_all(dir, ec);  // leftovers of a failover that did not finish
  fs::create_directories(dir, ec);
  if (ec) return Status::FromErrno(ec.value(), "create " + dir);
  auto g = std::make_unique<Group>();
  // The disks as they were at the point (one added after it is not there).
  for (auto& d : st->DisksAt(seq)) g->disks.push_back({d.name, d.size_bytes});
  g->epoch = epoch;
  g->failover = true;
  g->failover_seq = seq;
  g->tracking = true;
  Status opened = OpenGroupLocked(vm, *g, /*create=*/true);
  if (opened.ok()) {
    // What the store received after the point: the failed-over disks lack it, the old
    // primary has it. Marked now, while the store still knows (invariant 7).
    auto changed = st->ChangedAfter(seq);
    std::vector<DiskRange> regions;
    uint64_t bytes = 0;
    if (!changed.ok()) opened = changed.status();
    // Only what lies inside the disks as they were at the point: a disk added after it
    // is not here, and bytes a grow added after it are not part of these disks.
    for (uint32_t d = 0; changed.ok() && d < changed->size() && d < g->disks.size(); ++d) {
      const uint64_t size = g->disks[d].size_bytes;
      for (auto [off, len] : (*changed)[d]) {
        if (off >= size) continue;
        len = std::min(len, size - off);
        regions.push_back({d, {off, len}});
        bytes += len;
      }
    }
    if (opened.ok()) opened = g->capture->MarkRegions(regions);
    spdlog::info(
        "site {}: VM {} failed over to seq {} at epoch {}; {} bytes in {} range(s) "
        "changed after it are marked for reprotect",
        cfg_.name, vm, seq, epoch, bytes, regions.size());
  }
  if (!opened.ok()) {
    FreeGroup(vm, std::move(g));  // takes back what OpenGroupLocked added
    fs::remove_all(dir, ec);      // nothing half-done left behind
    return opened;
  }
  groups_[vm] = std::move(g);
  OSR_RETURN_IF_ERROR(SaveLocked());
  json disks = json::array();
  for (auto& d : groups_[vm]->disks) {
    disks.push_back(
        {{"name", d.name}, {"size_bytes", d.size_bytes}, {"uri", Uri(DiskExport(vm, d.name))}});
  }
  return json{{"name", vm},
              {"seq", seq},
              {"epoch", epoch},
              {"disks", disks},
              {"store_durable_seq", st->durable_seq()}};
}

Status Site::MaterialiseGroup(const std::string& vm) {
  std::lock_guard lock(mu_);
  auto it = groups_.find(vm);
  if (Status u = Usable(it, vm); !u.ok()) return u;
  Group& g = *it->second;
  if (!g.failover) {
    g.materialiser.MarkDone();  // plain disks already
    return Status::Ok();
  }
  // The materialiser's thread is done with the group before the group goes (every path
  // that frees one stops it first), and its `finish` takes mu_ on its own.
  Group* gp = &g;
  g.materialiser.Start(g.failover_disks, cfg_.materialise_bytes_per_second,
                       [this, vm, gp](Status copied) { return FinishMaterialise(vm, gp, copied); });
  return Status::Ok();
}

Status Site::FinishMaterialise(const std::string& vm, Group* g, Status copied) {
  if (!copied.ok()) {
    spdlog::warn("site {}: VM {}: materialising: {}", cfg_.name, vm, copied.ToString());
    return copied;
  }
  std::lock_guard lock(mu_);
  // The disks stand alone: next start opens them as plain images. Their region maps
  // (all held) go once that is recorded.
  g->failover = false;
  if (Status saved = SaveLocked(); !saved.ok()) {
    g->failover = true;  // the maps stay: a restart materialises again (all held: quick)
    spdlog::error("site {}: {}", cfg_.name, saved.ToString());
    return saved;
  }
  std::error_code ec;
  for (auto& d : g->disks) {
    fs::remove(cfg_.data_dir + "/groups/" + vm + "/" + d.name + ".img.cow", ec);
  }
  spdlog::info("site {}: VM {}: failover disks materialised", cfg_.name, vm);
  return Status::Ok();
}

Result<json> Site::UnreplicatedRegions(const std::string& vm, uint64_t after) {
  std::string log_dir;
  std::vector<std::vector<std::pair<uint64_t, uint64_t>>> ranges;
  json checks = json::array();
  {
    std::lock_guard lock(mu_);
    auto it = groups_.find(vm);
    if (Status u = Usable(it, vm); !u.ok()) return u;
    Group& g = *it->second;
    if (g.history_lost) {
      return json{
          {"history", "lost"}, {"verified", false}, {"checks", checks}, {"regions", json::array()}};
    }
    // Is the history still what it was when the disks were fenced? (Before the sync: a
    // fenced log has nothing left to write out, an unfenced one is not vouched for.)
    std::vector<std::string> names;
    for (auto& d : g.disks) names.push_back(d.name);
    for (auto& m : g.capture->CheckFenceFingerprint(after, names)) checks.push_back(m.Json(names));
    if (!checks.empty()) {
      spdlog::warn("site {}: VM {}: its history does not match its fence fingerprint: {}",
                   cfg_.name, vm, checks.front().value("reason", std::string()));
    }
    OSR_RETURN_IF_ERROR(g.capture->log().Sync());
    log_dir = g.capture->log().dir();
    ranges.resize(g.disks.size());
    for (auto& r : g.capture->DirtyRegions()) {
      ranges[r.disk].emplace_back(r.range.offset, r.range.length);
    }
  }
  // Every record the log still holds after `after` (what the recovery store had when it
  // was fenced): the recovery site never got those.
  size_t records = 0;
  OSR_RETURN_IF_ERROR(capture::LogReader::Scan(log_dir, [&](const capture::RecordHeader& h,
                                                            std::span<const uint8_t>) {
                        if (h.seq > after && h.disk < ranges.size() && h.length > 0) {
                          ranges[h.disk].emplace_back(h.offset, h.length);
                          ++records;
                        }
                        return true;
                      }).status());
  json out = json::array();
  uint64_t bytes = 0;
  for (uint32_t d = 0; d < ranges.size(); ++d) {
    std::sort(ranges[d].begin(), ranges[d].end());
    std::vector<std::pair<uint64_t, uint64_t>> runs;
    for (auto [off, len] : ranges[d]) AddMerged(&runs, off, len);
    for (auto [off, len] : runs) {
      out.push_back({d, off, len});
      bytes += len;
    }
  }
  return json{{"history", "exact"}, {"verified", checks.empty()},
              {"checks", checks},   {"records", records},
              {"bytes", bytes},     {"regions", out}};
}

Status Site::MarkRegions(const std::vector<DiskRange>& regions, const std::string& vm) {
  std::lock_guard lock(mu_);
  auto it = groups_.find(vm);
  if (Status u = Usable(it, vm); !u.ok()) return u;
  return it->second->capture->MarkRegions(regions);
}

Result<std::string> Site::GroupHashes(const std::string& vm, uint64_t region_bytes) {
  if (region_bytes < 4096 || region_bytes > (64u << 20) || region_bytes % 4096 != 0) {
    return InvalidArgument("region_bytes must be a multiple of 4096 up to 64 MiB");
  }
  std::vector<std::shared_ptr<nbd::Disk>> disks;
  {
    std::lock_guard lock(mu_);
    auto it = groups_.find(vm);
    if (Status u = Usable(it, vm); !u.ok()) return u;
    for (size_t i = 0; i < it->second->disks.size(); ++i) {
      disks.push_back(it->second->capture->disk(i));
    }
  }
  std::string out;
  std::vector<uint8_t> buf(region_bytes);
  for (auto& d : disks) {
    for (uint64_t off = 0; off < d->size(); off += region_bytes) {
      size_t n = static_cast<size_t>(std::min<uint64_t>(region_bytes, d->size() - off));
      OSR_RETURN_IF_ERROR(d->Read(off, {buf.data(), n}));
      uint8_t h[8];
      Le64(h, XXH3_64bits(buf.data(), n));
      out.append(reinterpret_cast<const char*>(h), 8);
    }
  }
  return out;
}

Result<json> Site::CompareHashes(const std::string& vm, uint64_t region_bytes,
                                 const std::string& other) {
  OSR_ASSIGN_OR_RETURN(std::string mine, GroupHashes(vm, region_bytes));
  if (mine.size() != other.size()) {
    return InvalidArgument(fmt::format("the other site sent {} hashes; this VM's disks have {}",
                                       other.size() / 8, mine.size() / 8));
  }
  std::vector<DiskRange> regions;
  uint64_t bytes = 0, count = 0;
  {
    std::lock_guard lock(mu_);
    auto it = groups_.find(vm);
    if (Status u = Usable(it, vm); !u.ok()) return u;
    size_t h = 0;
    for (uint32_t d = 0; d < it->second->disks.size(); ++d) {
      uint64_t size = it->second->disks[d].size_bytes;
      for (uint64_t off = 0; off < size; off += region_bytes, ++h) {
        if (std::memcmp(mine.data() + 8 * h, other.data() + 8 * h, 8) == 0) continue;
        uint64_t len = std::min(region_bytes, size - off);
        if (!regions.empty() && regions.back().disk == d &&
            regions.back().range.offset + regions.back().range.length == off) {
          regions.back().range.length += len;
        } else {
          regions.push_back({d, {off, len}});
        }
        bytes += len;
        ++count;
      }
    }
    OSR_RETURN_IF_ERROR(it->second->capture->MarkRegions(regions));
  }
  return json{{"regions", count}, {"bytes", bytes}, {"compared", mine.size() / 8}};
}

Result<json> Site::GroupToStore(const std::string& vm, uint64_t base_seq, uint64_t epoch,
                                const std::string& source) {
  // The store's origin is checked before the group changes role: nothing half-done.
  store::StoreOrigin origin{epoch, source};
  if (epoch < 1 || epoch > store::kEpochMax) {
    return InvalidArgument(
        fmt::format("epoch {} is out of range (1..{})", epoch, store::kEpochMax));
  }
  if (!source.empty() && !ValidName(source)) {
    return InvalidArgument("'" + source + "' is not a site name");
  }
  std::unique_ptr<Group> g;
  struct {
    uint64_t epoch = 1, fenced_epoch = 0, bandwidth_bytes_per_second = 0;
    bool history_lost = false, compress = true;
  } saved;
  {
    std::lock_guard lock(mu_);
    auto it = groups_.find(vm);
    if (Status u = Usable(it, vm); !u.ok()) return u;
    if (stores_.count(vm)) return Status(Code::kAlreadyExists, "a store for " + vm + " exists");
    Group& gr = *it->second;
    if (gr.fenced_epoch == 0 && gr.capture->fenced_epoch() == 0) {
      return InvalidArgument("VM " + vm + " is not fenced here: it may still be the primary");
    }
    if (gr.failover) {
      return InvalidArgument("VM " + vm + " runs on failover disks here; commit them first");
    }
    if (VmRunningLocked(gr)) return InvalidArgument("VM " + vm + " still runs here; stop it");
    saved.epoch = gr.epoch;
    saved.fenced_epoch = std::max(gr.fenced_epoch, gr.capture->fenced_epoch());
    saved.history_lost = gr.history_lost;
    saved.compress = gr.compress;
    saved.bandwidth_bytes_per_second = gr.bandwidth_bytes_per_second;
    g = std::move(it->second);
    groups_.erase(it);
  }
  g->materialiser.Stop();
  g->sender.reset();
  if (Status closed = CloseGroupExports(vm, *g); !closed.ok()) {
    // Its images must not move while an NBD client still holds them: the group stays.
    std::lock_guard lock(mu_);
    if (Status back = AddGroupExportsLocked(vm, *g); !back.ok()) {
      spdlog::error("site {}: VM {}: cannot serve its disks again: {}", cfg_.name, vm,
                    back.ToString());
    }
    groups_[vm] = std::move(g);
    return Unavailable("VM " + vm + ": its disks are still in use by an NBD client; try again: " +
                       closed.message());
  }
  std::vector<DiskSpec> disks = g->disks;
  g.reset();  // flushes and closes the images
  std::string gdir = cfg_.data_dir + "/groups/" + vm;
  std::string sdir = cfg_.data_dir + "/stores/" + vm;
  std::vector<std::string> images;
  std::vector<store::StoreDisk> sd;
  for (auto& d : disks) {
    images.push_back(gdir + "/" + d.name + ".img");
    sd.push_back({d.name, d.size_bytes});
  }
  auto st = store::RecoveryStore::Create(
      sdir, sd, base_seq, store::RecoveryStore::Start::kDifferential, images, origin);
  std::lock_guard lock(mu_);
  if (!st.ok()) {
    // Create put the images back where they were: so does the group go back.
    spdlog::error("site {}: VM {}: cannot make a store of its disks: {}", cfg_.name, vm,
                  st.status().ToString());
    std::error_code ec;
    bool moved_back = true;
    for (auto& img : images) moved_back = moved_back && fs::exists(img, ec);
    if (moved_back && !fs::exists(sdir + "/store.json", ec)) fs::remove_all(sdir, ec);
    auto back = std::make_unique<Group>();
    back->disks = disks;
    back->epoch = saved.epoch;
    back->fenced_epoch = saved.fenced_epoch;
    back->history_lost = saved.history_lost;
    back->compress = saved.compress;
    back->bandwidth_bytes_per_second = saved.bandwidth_bytes_per_second;
    if (Status reopened = OpenGroupLocked(vm, *back); reopened.ok()) {
      if (Status f = back->capture->Fence(std::max<uint64_t>(back->fenced_epoch, 1),
                                          /*record_fingerprint=*/false);
          !f.ok()) {
        spdlog::error("site {}: VM {}: {}", cfg_.name, vm, f.ToString());
      }
      groups_[vm] = std::move(back);
    } else {
      spdlog::error("site {}: VM {}: cannot reopen its disks: {}", cfg_.name, vm,
                    reopened.ToString());
    }
    return st.status();
  }
  stores_[vm] = std::move(*st);
  OSR_RETURN_IF_ERROR(SaveLocked());
  std::error_code ec;
  fs::remove_all(gdir, ec);
  spdlog::info("site {}: VM {}: its disks are now the base of a recovery store at seq {}",
               cfg_.name, vm, base_seq);
  return json{{"name", vm}, {"base_seq", base_seq}, {"differential", true}};
}

bool Site::VmRunningLocked(Group& g) {
  return g.vm->Refresh().running();
}

Result<VmLaunch> Site::LaunchFor(const std::string& vm, const Group& g,
                                 const hypervisor::VmSpec& spec, std::string command) const {
  VmLaunch launch;
  OSR_ASSIGN_OR_RETURN(launch.network,
                       PlanNetworks(spec.nics, cfg_.networks, NetRole::kProduction, cfg_.name, vm));
  launch.name = vm;
  launch.spec = spec;
  launch.command = std::move(command);
  launch.run_dir = cfg_.data_dir + "/groups/" + vm + "/run";
  launch.qemu_binary = cfg_.qemu_binary;
  bool tls_only = cfg_.nbd_tls.enabled() && !cfg_.nbd_tls_optional;
  for (auto& d : g.disks) {
    bool local = spec.driver == hypervisor::Driver::kQemu || tls_only;
    launch.disks.emplace_back(d.name,
                              local ? LocalUri(vm, g, d.name) : Uri(DiskExport(vm, d.name)));
  }
  return launch;
}

Result<std::pair<hypervisor::VmSpec, std::string>> Site::CheckedVmSpec(
    const std::string& who, const json& spec_json) const {
  // The spec comes from the vault's catalog: checked in full, and what it runs is checked
  // against this site's own rules, also for a spec stored before those rules existed.
  auto parsed = hypervisor::ParseVmSpec(spec_json, hypervisor::SpecSource::kStored);
  if (!parsed.ok()) return InvalidArgument(who + ": " + parsed.status().message());
  if (parsed->driver == hypervisor::Driver::kNone) {
    return InvalidArgument(who + ": the VM has no driver to start it");
  }
  Result<std::string> what = parsed->driver == hypervisor::Driver::kProcess
                                 ? cfg_.commands.ProcessCommand(*parsed)
                                 : cfg_.commands.QemuArgs(*parsed);
  if (!what.ok()) return Status(what.status().code(), who + ": " + what.status().message());
  return std::pair(std::move(*parsed), std::move(*what));
}

Status Site::StartVm(const std::string& vm, const json& spec_json) {
  OSR_ASSIGN_OR_RETURN(auto checked, CheckedVmSpec("VM " + vm, spec_json));
  const auto& [spec, what] = checked;
  std::shared_ptr<VmRunner> runner;
  VmLaunch launch;
  {
    std::lock_guard lock(mu_);
    auto it = groups_.find(vm);
    if (Status u = Usable(it, vm); !u.ok()) return u;
    Group& g = *it->second;
    if (uint64_t e = std::max(g.fenced_epoch, g.capture->fenced_epoch()); e != 0) {
      return Status(Code::kPermissionDenied,
                    fmt::format("VM {} is fenced here (epoch {}): it runs at another site", vm, e));
    }
    runner = g.vm;
    OSR_ASSIGN_OR_RETURN(launch, LaunchFor(vm, g, spec, what));
  }
  // Started outside mu_ (a QEMU takes a while to answer); the runner orders this start
  // after a stop or freeze under way, and does nothing if the VM runs already.
  OSR_RETURN_IF_ERROR(runner->Start(launch));
  std::lock_guard lock(mu_);
  auto it = groups_.find(vm);
  if (it == groups_.end() || it->second->vm != runner) {
    (void)runner->Stop(kVmStopTimeoutMs);
    return NotFound("VM " + vm + " was deleted while it started");
  }
  Group& g = *it->second;
  g.vm_spec = hypervisor::VmSpecJson(spec);
  // Not the command or the arguments (they may hold secrets): the entry's name at most.
  const hypervisor::CommandRef& ran =
      spec.driver == hypervisor::Driver::kProcess ? spec.command : spec.qemu_args;
  std::string source = !ran.name.empty()      ? "entry " + ran.name
                       : !ran.literal.empty() ? "given through the API"
                                              : "no extra arguments";
  spdlog::info("site {}: VM {} runs ({}, {}, pid {})", cfg_.name, vm,
               hypervisor::DriverName(spec.driver), source, runner->snapshot().pid);
  return SaveLocked();
}

Result<bool> Site::StopVm(const std::string& vm, int timeout_ms) {
  std::shared_ptr<VmRunner> runner;
  {
    std::lock_guard lock(mu_);
    auto it = groups_.find(vm);
    // Stopping is always safe, a quarantined group's VM too (change-point stops it before
    // it discards the damaged disks).
    if (it == groups_.end()) return Usable(it, vm);
    runner = it->second->vm;
  }
  bool was_running = runner->snapshot().running();
  OSR_ASSIGN_OR_RETURN(bool clean, runner->Stop(timeout_ms));
  if (!was_running) return clean;
  spdlog::info("site {}: VM {} stopped{}", cfg_.name, vm, clean ? "" : " (hard stop)");
  std::lock_guard lock(mu_);
  OSR_RETURN_IF_ERROR(SaveLocked());
  return clean;
}

std::shared_ptr<VmRunner> Site::RunnerOf(const std::string& vm, Status* why) {
  std::lock_guard lock(mu_);
  auto it = groups_.find(vm);
  if (Status u = Usable(it, vm); !u.ok()) {
    *why = u;
    return nullptr;
  }
  return it->second->vm;
}

Status Site::FreezeVm(const std::string& vm, int timeout_ms) {
  Status why;
  auto runner = RunnerOf(vm, &why);
  if (!runner) return why;
  // The guest agent may take its time: not under mu_.
  Status frozen = runner->Freeze(timeout_ms);
  if (frozen.code() == Code::kNotSupported) {
    return Status(Code::kNotSupported, "VM " + vm + ": " + frozen.message());
  }
  return frozen;
}

Status Site::ThawVm(const std::string& vm) {
  Status why;
  auto runner = RunnerOf(vm, &why);
  if (!runner) return why;
  return runner->Thaw();
}

}  // namespace osr::site
