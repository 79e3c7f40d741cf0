// Small steps the vault's workflows share (workflows.cc): reading a VM's stored spec back.
#pragma once

#include <string>

#include "common/status.h"
#include "hypervisor/vm_spec.h"
#include "vault/catalog.h"
#include "vault/job_steps.h"
#include "vault/vault.h"

namespace osr::vault {

// The stored spec, read back through the one checked parser (a row is a peer's input).
Result<hypervisor::VmSpec> StoredSpec(const VmRow& vm);
// "none", "process" or "qemu"; "invalid" for a spec that does not parse: the site is then
// asked to start it and refuses it with a message naming the field.
std::string Driver(const VmRow& vm);
// The VM's shutdown timeout (ms, from its spec; 30000 when the spec does not parse).
int ShutdownTimeoutMs(const VmRow& vm);
// The id of the item's drill view at its recovery site ("" when it has none, or the
// stored drill is of another shape).
std::string DrillView(const ItemRow& item);
// The first point of a reprotected item could not be made: it is protected anyway (a
// cancel then says so); other errors are returned as they are.
Status FirstPointFailed(const Steps& steps, const Status& st);
// The free space a recovery store's journal should have beyond its base for `policy`,
// bytes (prechecks.cc; the rule is in docs/api.md, "Checks before acting").
uint64_t JournalHeadroomBytes(const PolicyRow& policy, uint64_t full_bytes);
// The sum of the VM's disks' sizes in the catalog, bytes (0 for a row without a disk list).
uint64_t DisksFullBytes(const VmRow& vm);
// Ok, or kFailedPrecondition naming the first failed check of `plan` (Vault::PlanAt).
Status PlanRefusal(const nlohmann::json& plan);
// Whether a site's group (GET /groups/{vm}, from `site`) has the VM's disks now: the same
// names and sizes, in order. False when the disks differ (a disk was added or grown there
// after the point the VM failed over to: reprotect then copies in full); the group's or the
// row's error (kInvalidArgument naming the field) when either is of the wrong shape.
Result<bool> GroupHasTheVmsDisks(const nlohmann::json& group, const VmRow& vm,
                                 const std::string& site);

// What one run of a workflow job holds (FailoverRun, ReprotectRun): its vault, job, the
// item as the job found it, its cancel token and its steps.
class JobRun {
 public:
  JobRun(Vault& v, JobRow& job, ItemRow item, JobCancel& cancel);

 protected:
  Vault& v_;
  JobRow& job_;
  ItemRow item_;
  JobCancel& cancel_;
  Steps steps_;
};

}  // namespace osr::vault
