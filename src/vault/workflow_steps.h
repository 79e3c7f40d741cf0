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
