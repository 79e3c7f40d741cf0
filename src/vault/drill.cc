// The drill (test failover) workflows: open writable disks at a recovery point on the
// recovery site, beside replication, which goes on; and clean them up. docs/api.md,
// "Test failover".
#include <fmt/format.h>

#include "common/json_in.h"
#include "common/units.h"
#include "vault/api_json.h"
#include "vault/job_steps.h"
#include "vault/vault.h"
#include "vault/workflow_steps.h"

namespace osr::vault {

using nlohmann::json;

void Vault::RunTestFailover(JobRow& job, ItemRow item, JobCancel& cancel) {
  Steps steps(catalog_.get(), &job, &cancel);
  auto dst = RegisteredSite(item.target);
  if (!dst.ok()) return steps.Fail(dst.status());
  steps.Begin("Resolve the recovery point");
  auto p = ResolvePoint(item, json_in::Fields(job.args).String("point", "latest"), &cancel);
  if (!p.ok() && p.status().code() == Code::kCancelled) {
    return steps.Fail(steps.Cancelled("no drill disk was opened; the item stays Protected"));
  }
  if (!p.ok()) return steps.Fail(p.status());
  // Retention keeps the point from now on: until the item records the drill, by this
  // pin; then because the drill stands on it.
  std::optional<PointPin> pin;
  if (Status pinned = PinPoint(job.vm, p->id, "test-failover", pin); !pinned.ok()) {
    return steps.Fail(pinned);
  }
  steps.Progress(30, fmt::format("point {} (seq {}, {})", p->id, p->seq, FormatTimeNs(p->time_ns)));
  steps.Done(40);
  steps.Begin(fmt::format("Open the drill disks at {}", item.target));
  auto v = Client(*dst).Call("POST", "/stores/" + job.vm + "/views",
                             json{{"seq", p->seq}, {"writable", true}});
  if (!v.ok()) return steps.Fail(v.status());
  json_in::Fields vf(*v, "site " + item.target + " view.");
  std::string view_id = vf.String("id");
  const json* disks_in = vf.Array("disks", false);
  if (!vf.ok()) return steps.Fail(vf.status());
  json disks = *disks_in;
  steps.Done(100);
  item.state = ItemState::kTestFailoverCompleted;
  item.drill = {{"view", view_id}, {"point", PointJson(*p)}, {"disks", disks}};
  if (Status st = catalog_->PutItem(item); !st.ok()) {
    // Unrecorded, nothing would name the drill disks: they are closed again.
    auto closed = Client(*dst).Call("DELETE", "/views/" + DrillView(item));
    return steps.Fail(AlsoFailed(Status(st.code(),
                                        "the drill disks were opened but could not be "
                                        "recorded, so they are closed again: " +
                                            st.message()),
                                 "closing them", closed.status()));
  }
  job.result = {{"disks", disks}, {"point", PointJson(*p)}};
  job.state = JobState::kSucceeded;
}

void Vault::RunTestFailoverCleanup(JobRow& job, ItemRow item, JobCancel& cancel) {
  Steps steps(catalog_.get(), &job, &cancel);
  auto dst = RegisteredSite(item.target);
  if (!dst.ok()) return steps.Fail(dst.status());
  steps.Begin("Remove the drill disks and their writes");
  auto r = Client(*dst).Call("DELETE", "/views/" + DrillView(item));
  if (!r.ok() && r.status().code() != Code::kNotFound) return steps.Fail(r.status());
  steps.Done(100);
  item.state = ItemState::kProtected;
  item.drill = nullptr;
  if (Status st = catalog_->PutItem(item); !st.ok()) {
    return steps.Fail(Status(st.code(),
                             "the drill disks are removed, but the item still says "
                             "TestFailoverCompleted (clean up again to record it): " +
                                 st.message()));
  }
  job.result = {{"notes", json_in::Fields(job.args).String("notes", "")}};
  job.state = JobState::kSucceeded;
}

}  // namespace osr::vault
