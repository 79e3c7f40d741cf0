// The vault API's JSON for catalog rows (docs/api.md): one writer per row type, shared by
// the routes and the jobs that put a point or a job into an answer.
#pragma once

#include <nlohmann/json.hpp>

#include "vault/catalog.h"

namespace osr::vault {

// {name, retention_seconds, crash_interval_seconds, app_interval_seconds, compression,
// bandwidth_bytes_per_second}
nlohmann::json PolicyJson(const PolicyRow& p);
// {id, time (RFC 3339), seq, type}
nlohmann::json PointJson(const PointRow& p);
// {id, type, vm, state, progress, steps, error, created, updated} and the job's result's keys.
nlohmann::json JobJson(const JobRow& j);

}  // namespace osr::vault
