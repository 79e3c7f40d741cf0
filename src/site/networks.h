// Networks: what a VM's NICs plug into at this site. A VM's spec names logical networks
// (hypervisor::Nic::network); the site's config maps each to what its hosts have, once
// for production (failover, the protected VM) and once for drills, which must be isolated
// from production (ASR's "test failover network"):
//
//   [networks.prod]
//   bridge = "br0"              # production: a Linux bridge on this host (must exist)
//   # user = true               # or QEMU user networking (a lab)
//   drill_bridge = "osr-drill0" # drills: a host-local bridge without uplink (made if
//                               # missing; refused if any port but a drill VM's TAP is
//                               # on it: a TAP osr made for a drill, with the alias
//                               # "osr drill VM")
//   # without drill_bridge: QEMU user networking with restrict=on (no way out)
//
// A NIC on a bridge is a persistent TAP device the site makes ("osr" + 8 hex digits of a
// hash of the site, the VM or drill, and the role + the NIC's index), plugs into the bridge and
// brings up before QEMU opens it by name, and deletes once the VM stopped. This needs CAP_NET_ADMIN
// (the site runs as root where it runs VMs on bridges).
//
// A NIC whose network has no mapping here is refused (kFailedPrecondition naming the
// network and the config key) before anything is made.
//
// Thread model: none (values, pure functions, and system calls on the named devices).
#pragma once

#include <toml++/toml.h>

#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "hypervisor/vm_spec.h"

namespace osr::site {

struct NetworkAttach {
  enum class Kind { kUser, kBridge };
  Kind kind = Kind::kUser;
  std::string bridge;         // kBridge
  bool restrict_out = false;  // kUser: restrict=on (the guest reaches nothing outside)
};

struct SiteNetwork {
  NetworkAttach production;
  NetworkAttach drill;  // default: kUser with restrict_out
};

using SiteNetworks = std::map<std::string, SiteNetwork>;

// Reads [networks.NAME] tables (see the file comment). kInvalidArgument naming the key.
Result<SiteNetworks> LoadNetworks(const toml::table& t, const std::string& path);

// Which mapping a VM plugs into.
enum class NetRole { kProduction, kDrill };
std::string_view NetRoleName(NetRole r);

// A TAP device to make on `bridge` before QEMU starts, and to delete after it stopped.
struct TapPlan {
  std::string name;
  std::string bridge;
  bool drill = false;  // the bridge is a drill bridge: made if missing, checked isolated
};

// One NIC as QEMU sees it.
struct NicPlan {
  std::string network;
  std::string attach;             // "bridge br0", "user", "user (restrict=on)": for plans and logs
  std::vector<std::string> args;  // -netdev ..., -device ..., -fw_cfg ...
};

struct NetworkPlan {
  std::vector<NicPlan> nics;
  std::vector<TapPlan> taps;
};

// The QEMU arguments and TAP devices for `spec`'s NICs at site `site` in `role`. `key`
// makes the TAP names unique per VM and role (the VM's name, a drill's view id).
// kFailedPrecondition when a NIC's network has no mapping here.
Result<NetworkPlan> PlanNetworks(const std::vector<hypervisor::Nic>& nics,
                                 const SiteNetworks& networks, NetRole role,
                                 const std::string& site, const std::string& key);

// Checks that every NIC's network is mapped, without making anything (pre-checks).
Status CheckNetworksMapped(const std::vector<hypervisor::Nic>& nics, const SiteNetworks& networks,
                           const std::string& site);

// Makes the TAP devices of `plan` (a drill bridge first, if missing) and plugs them in;
// on failure deletes what it made. kPermissionDenied without CAP_NET_ADMIN; kNotFound for
// a production bridge that does not exist; kFailedPrecondition for a drill bridge with a
// foreign port (not isolated).
Status MakeTaps(const std::vector<TapPlan>& taps);
// Whether the bridge of `tap` is ready: true when it exists as it should, false when it is
// a drill bridge that MakeTaps will make. kNotFound for a production bridge that does not
// exist; kFailedPrecondition for a name that is not a bridge, or a drill bridge that is
// not isolated (naming the foreign port).
Result<bool> CheckBridge(const TapPlan& tap);

// Deletes TAP devices (best effort; missing ones are fine).
void DeleteTaps(const std::vector<TapPlan>& taps);

// Whether a network interface of this name exists on the host.
bool InterfaceExists(const std::string& name);

// Whether the process status text `proc_status` (the contents of /proc/self/status) gives
// the effective capability CAP_NET_ADMIN (capabilities(7): bit 12 of CapEff), which making
// TAP devices and bridges needs. False when CapEff is missing or not hexadecimal.
bool HasNetAdmin(std::string_view proc_status);
// Ok when this process may make TAP devices and bridges; else kPermissionDenied naming the
// capability and the user it runs as.
Status CheckNetAdmin();

}  // namespace osr::site
