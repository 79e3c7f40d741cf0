#include "vault/api_json.h"

#include "common/units.h"

namespace osr::vault {

using nlohmann::json;

json PolicyJson(const PolicyRow& p) {
  return json{{"name", p.name},
              {"retention_seconds", p.retention_s},
              {"crash_interval_seconds", p.crash_interval_s},
              {"app_interval_seconds", p.app_interval_s},
              {"compression", p.compression},
              {"bandwidth_bytes_per_second", p.bandwidth_bytes_per_second}};
}

json PointJson(const PointRow& p) {
  return json{{"id", p.id}, {"time", FormatTimeNs(p.time_ns)}, {"seq", p.seq}, {"type", p.type}};
}

json JobJson(const JobRow& j) {
  json out = {{"id", j.id},
              {"type", j.type},
              {"vm", j.vm},
              {"state", JobStateName(j.state)},
              {"progress", j.progress},
              {"steps", j.steps},
              {"error", j.error.empty() ? json() : json(j.error)},
              {"created", FormatTimeNs(j.created_ns)},
              {"updated", FormatTimeNs(j.updated_ns)}};
  if (!j.result.is_null()) {
    for (auto& [k, v] : j.result.items()) out[k] = v;
  }
  return out;
}

}  // namespace osr::vault
