// libFuzzer target: bodies and answers as the vault and the sites receive them (issue 9).
// The input is parsed by json_in (size and depth limits first), then read the ways the
// handlers read it: typed fields of every kind under the names the API uses, a VM spec as
// new and as stored (hypervisor::ParseVmSpec), a store status (StoreConsistentAt's
// reading), and serialised back. Nothing may throw, crash or hang; an error must name a
// field or the body.
#include <cstdint>
#include <string>
#include <string_view>

#include "common/json_in.h"
#include "hypervisor/vm_spec.h"

using namespace osr;
using nlohmann::json;

namespace {

constexpr const char* kKeys[] = {"name",
                                 "site",
                                 "disks",
                                 "spec",
                                 "retention_seconds",
                                 "point",
                                 "planned",
                                 "timeout_ms",
                                 "token",
                                 "role",
                                 "expires_in_seconds",
                                 "durable_seq",
                                 "base_seq",
                                 "resyncing",
                                 "consistent_from",
                                 "epoch",
                                 "seq",
                                 "replace",
                                 "api"};

void ReadEveryWay(const json& j) {
  json_in::Fields f(j, "body.");
  for (const char* k : kKeys) {
    (void)f.String(k, "");
    (void)f.U64(k, 0, {1, 1u << 30});
    (void)f.I64(k, 0, {-5, 1LL << 40});
    (void)f.Bool(k, false);
    if (const json* o = f.Object(k)) ReadEveryWay(*o);
    if (const json* a = f.Array(k)) {
      for (const json& e : *a) json_in::Fields(e).String("name", "");
    }
  }
  if (!f.ok() && f.status().message().empty()) __builtin_trap();
  json_in::Fields req(j);
  (void)req.String("name");
  (void)req.U64("seq");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  auto body = json_in::Parse(text, "the body", 1 << 20, json_in::kDepthMax);
  if (!body.ok()) {
    if (body.status().message().rfind("the body", 0) != 0) __builtin_trap();
    return 0;
  }
  ReadEveryWay(*body);
  for (auto source : {hypervisor::SpecSource::kNew, hypervisor::SpecSource::kStored}) {
    auto spec = hypervisor::ParseVmSpec(*body, source);
    if (spec.ok()) {
      // The normal form must read back as the same spec.
      auto again =
          hypervisor::ParseVmSpec(hypervisor::VmSpecJson(*spec), hypervisor::SpecSource::kStored);
      if (!again.ok()) __builtin_trap();
    }
  }
  (void)json_in::Dump(*body);
  return 0;
}
