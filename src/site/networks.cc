#include "site/networks.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>
#include <xxhash.h>

#include <cctype>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "common/file.h"

namespace osr::site {

namespace fs = std::filesystem;

namespace {

Result<NetworkAttach> ReadAttach(const toml::table& net, const std::string& where, bool drill) {
  NetworkAttach a;
  const char* bridge_key = drill ? "drill_bridge" : "bridge";
  auto bridge = net[bridge_key];
  auto user = net["user"];
  if (bridge) {
    auto name = bridge.value<std::string>();
    if (!name || name->empty() || name->size() >= IFNAMSIZ ||
        name->find_first_of("/ \t\n:") != std::string::npos) {
      return InvalidArgument(
          fmt::format("{}.{}: must be a network interface name (1-{} characters)", where,
                      bridge_key, IFNAMSIZ - 1));
    }
    a.kind = NetworkAttach::Kind::kBridge;
    a.bridge = *name;
    return a;
  }
  if (drill) {
    a.restrict_out = true;  // the default drill network: no way out
    return a;
  }
  if (user) {
    if (!user.is_boolean() || !user.value_or(false)) {
      return InvalidArgument(where + ".user: must be true (or give bridge)");
    }
    return a;
  }
  return InvalidArgument(where + ": give bridge = \"NAME\" (or user = true for a lab)");
}

// Unique per site, VM (or drill) and role: two sites on one host never share one.
std::string TapName(const std::string& site, const std::string& key, NetRole role, size_t index) {
  std::string seed = site + "/" + key + "/" + std::string(NetRoleName(role));
  return fmt::format("osr{:08x}{}", static_cast<uint32_t>(XXH3_64bits(seed.data(), seed.size())),
                     index);
}

// The index of interface `name`, 0 when there is none.
int IfIndex(const std::string& name) {
  if (name.empty() || name.size() >= IFNAMSIZ) return 0;
  int sock = ::socket(AF_LOCAL, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (sock < 0) return 0;
  Fd closer(sock);
  ifreq ifr{};
  std::strncpy(ifr.ifr_name, name.c_str(), IFNAMSIZ - 1);
  if (::ioctl(sock, SIOCGIFINDEX, &ifr) < 0) return 0;
  return ifr.ifr_ifindex;
}

// A socket for the interface ioctls.
Result<Fd> IoctlSocket() {
  int fd = ::socket(AF_LOCAL, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::FromErrno(errno, "socket for interface ioctls");
  return Fd(fd);
}

Status SetUp(int sock, const std::string& name) {
  ifreq ifr{};
  std::strncpy(ifr.ifr_name, name.c_str(), IFNAMSIZ - 1);
  if (::ioctl(sock, SIOCGIFFLAGS, &ifr) < 0) return Status::FromErrno(errno, "flags of " + name);
  ifr.ifr_flags |= IFF_UP;
  if (::ioctl(sock, SIOCSIFFLAGS, &ifr) < 0) return Status::FromErrno(errno, "bring up " + name);
  return Status::Ok();
}

// The alias (ifalias) osr gives the TAP devices of drill VMs: what tells them from every
// other port (a name can be anyone's).
constexpr std::string_view kDrillTapAlias = "osr drill VM";

std::string IfAlias(const std::string& port) {
  std::ifstream in("/sys/class/net/" + port + "/ifalias");
  std::string alias;
  std::getline(in, alias);
  return alias;
}

// The ports of bridge `bridge` that are not TAP devices of osr's drill VMs (a TAP with
// the drill alias; production TAPs, other sites' included, are foreign here).
std::vector<std::string> ForeignPorts(const std::string& bridge) {
  std::vector<std::string> out;
  std::error_code ec;
  for (auto& e : fs::directory_iterator("/sys/class/net/" + bridge + "/brif", ec)) {
    std::string port = e.path().filename().string();
    bool tap = fs::exists("/sys/class/net/" + port + "/tun_flags", ec);
    if (!tap || IfAlias(port) != kDrillTapAlias) out.push_back(port);
  }
  return out;
}

Status SetAlias(const std::string& port, std::string_view alias) {
  std::ofstream out("/sys/class/net/" + port + "/ifalias");
  out << alias << "\n";
  out.flush();
  if (!out)
    return IoError("cannot set the alias of " + port + " (/sys/class/net/" + port + "/ifalias)");
  return Status::Ok();
}

Status EnsureDrillBridge(int sock, const std::string& bridge) {
  OSR_ASSIGN_OR_RETURN(bool exists, CheckBridge({"", bridge, true}));
  if (!exists && ::ioctl(sock, SIOCBRADDBR, bridge.c_str()) < 0 && errno != EEXIST) {
    return Status::FromErrno(errno, "make drill bridge " + bridge);
  }
  return SetUp(sock, bridge);
}

Status MakeTap(int sock, const TapPlan& tap) {
  int tun = ::open("/dev/net/tun", O_RDWR | O_CLOEXEC);
  if (tun < 0) return Status::FromErrno(errno, "open /dev/net/tun");
  Fd tun_fd(tun);
  ifreq ifr{};
  std::strncpy(ifr.ifr_name, tap.name.c_str(), IFNAMSIZ - 1);
  ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
  if (::ioctl(tun, TUNSETIFF, &ifr) < 0) {
    if (errno == EBUSY) {
      return Status(Code::kAlreadyExists, "network: TAP " + tap.name +
                                              " is in use by another process (a VM this site "
                                              "did not start?)");
    }
    return Status::FromErrno(errno, "make TAP " + tap.name);
  }
  if (::ioctl(tun, TUNSETPERSIST, 1) < 0) {
    return Status::FromErrno(errno, "keep TAP " + tap.name);
  }
  // Marked before it is plugged in: a drill bridge never holds an unmarked port of ours.
  OSR_RETURN_IF_ERROR(SetAlias(tap.name, tap.drill ? kDrillTapAlias : "osr VM"));
  ifreq port{};
  std::strncpy(port.ifr_name, tap.bridge.c_str(), IFNAMSIZ - 1);
  port.ifr_ifindex = IfIndex(tap.name);
  if (::ioctl(sock, SIOCBRADDIF, &port) < 0 && errno != EBUSY) {
    return Status::FromErrno(errno, "plug " + tap.name + " into bridge " + tap.bridge);
  }
  return SetUp(sock, tap.name);
}

}  // namespace

Result<bool> CheckBridge(const TapPlan& tap) {
  const std::string& bridge = tap.bridge;
  if (!InterfaceExists(bridge)) {
    if (tap.drill) return false;
    return NotFound("bridge " + bridge + " does not exist on this host");
  }
  if (!fs::exists("/sys/class/net/" + bridge + "/bridge")) {
    return Status(Code::kFailedPrecondition, bridge + " exists and is not a bridge");
  }
  if (!tap.drill) return true;
  if (auto foreign = ForeignPorts(bridge); !foreign.empty()) {
    return Status(Code::kFailedPrecondition,
                  fmt::format("drill bridge {} is not isolated: {} is plugged into it (only osr's "
                              "drill VMs may be)",
                              bridge, foreign.front()));
  }
  return true;
}

std::string_view NetRoleName(NetRole r) {
  return r == NetRole::kDrill ? "drill" : "production";
}

bool HasNetAdmin(std::string_view proc_status) {
  constexpr int kCapNetAdmin = 12;  // linux/capability.h
  constexpr std::string_view kKey = "\nCapEff:";
  std::string text = "\n" + std::string(proc_status);
  size_t at = text.find(kKey);
  if (at == std::string::npos) return false;
  size_t i = at + kKey.size();
  while (i < text.size() && (text[i] == ' ' || text[i] == '\t')) ++i;
  size_t end = i;
  while (end < text.size() && std::isxdigit(static_cast<unsigned char>(text[end]))) ++end;
  if (end == i || end - i > 16) return false;
  uint64_t caps = std::stoull(text.substr(i, end - i), nullptr, 16);
  return (caps >> kCapNetAdmin) & 1;
}

Status CheckNetAdmin() {
  // (A /proc file says it has 0 bytes: read as a stream.)
  std::ifstream in("/proc/self/status");
  std::stringstream text;
  text << in.rdbuf();
  if (in && HasNetAdmin(text.str())) return Status::Ok();
  return Status(Code::kPermissionDenied,
                fmt::format("making TAP devices and bridges needs CAP_NET_ADMIN, which this osrd "
                            "(uid {}) does not have",
                            ::getuid()));
}

bool InterfaceExists(const std::string& name) {
  return name.find('/') == std::string::npos && IfIndex(name) != 0;
}

Result<SiteNetworks> LoadNetworks(const toml::table& t, const std::string& path) {
  SiteNetworks out;
  auto node = t["networks"];
  if (!node) return out;
  const toml::table* nets = node.as_table();
  if (nets == nullptr) return InvalidArgument(path + ": 'networks' must be a table of networks");
  for (auto& [k, v] : *nets) {
    std::string name(k.str());
    std::string where = fmt::format("{}: networks.{}", path, name);
    if (!ValidName(name)) return InvalidArgument(where + ": is not a network name");
    const toml::table* net = v.as_table();
    if (net == nullptr) return InvalidArgument(where + ": must be a table");
    for (auto& [key, unused] : *net) {
      if (key != "bridge" && key != "user" && key != "drill_bridge") {
        return InvalidArgument(
            fmt::format("{}.{}: is not a key of a network (bridge, user, "
                        "drill_bridge)",
                        where, key.str()));
      }
    }
    if ((*net)["bridge"] && (*net)["user"]) {
      return InvalidArgument(where + ": give bridge or user, not both");
    }
    SiteNetwork sn;
    OSR_ASSIGN_OR_RETURN(sn.production, ReadAttach(*net, where, false));
    OSR_ASSIGN_OR_RETURN(sn.drill, ReadAttach(*net, where, true));
    if (sn.drill.kind == NetworkAttach::Kind::kBridge &&
        sn.production.kind == NetworkAttach::Kind::kBridge &&
        sn.drill.bridge == sn.production.bridge) {
      return InvalidArgument(where + ": drill_bridge must not be the production bridge");
    }
    out[name] = sn;
  }
  // A drill bridge shared with another network's production bridge is no isolation.
  for (auto& [name, sn] : out) {
    if (sn.drill.kind != NetworkAttach::Kind::kBridge) continue;
    for (auto& [other, on] : out) {
      if (on.production.kind == NetworkAttach::Kind::kBridge &&
          on.production.bridge == sn.drill.bridge) {
        return InvalidArgument(
            fmt::format("{}: networks.{}.drill_bridge {} is the production bridge of networks.{}",
                        path, name, sn.drill.bridge, other));
      }
    }
  }
  return out;
}

Status CheckNetworksMapped(const std::vector<hypervisor::Nic>& nics, const SiteNetworks& networks,
                           const std::string& site) {
  for (size_t i = 0; i < nics.size(); ++i) {
    if (!networks.count(nics[i].network)) {
      return Status(Code::kFailedPrecondition,
                    fmt::format("network: nics[{}] is on network '{}', which site {} does not map "
                                "(add [networks.{}] to its config)",
                                i, nics[i].network, site, nics[i].network));
    }
  }
  return Status::Ok();
}

Result<NetworkPlan> PlanNetworks(const std::vector<hypervisor::Nic>& nics,
                                 const SiteNetworks& networks, NetRole role,
                                 const std::string& site, const std::string& key) {
  OSR_RETURN_IF_ERROR(CheckNetworksMapped(nics, networks, site));
  NetworkPlan plan;
  for (size_t i = 0; i < nics.size(); ++i) {
    const hypervisor::Nic& nic = nics[i];
    const SiteNetwork& sn = networks.at(nic.network);
    const NetworkAttach& a = role == NetRole::kDrill ? sn.drill : sn.production;
    std::string id = fmt::format("osr-net{}", i);
    NicPlan np;
    np.network = nic.network;
    std::string netdev;
    if (a.kind == NetworkAttach::Kind::kBridge) {
      TapPlan tap{TapName(site, key, role, i), a.bridge, role == NetRole::kDrill};
      netdev = fmt::format("tap,id={},ifname={},script=no,downscript=no,vhost=off", id, tap.name);
      np.attach = fmt::format("bridge {} (TAP {})", a.bridge, tap.name);
      plan.taps.push_back(std::move(tap));
    } else {
      netdev = fmt::format("user,id={}{}", id, a.restrict_out ? ",restrict=on" : "");
      np.attach = a.restrict_out ? "user (restrict=on: no way out)" : "user";
    }
    np.args = {"-netdev", netdev, "-device",
               fmt::format("{},netdev={},mac={}", nic.model, id, nic.mac)};
    if (auto ip = nic.ip_by_site.find(site); ip != nic.ip_by_site.end()) {
      np.args.push_back("-fw_cfg");
      np.args.push_back(fmt::format("name=opt/org.osr/nic{}.ip,string={}", i, ip->second));
    }
    plan.nics.push_back(std::move(np));
  }
  return plan;
}

Status MakeTaps(const std::vector<TapPlan>& taps) {
  if (taps.empty()) return Status::Ok();
  OSR_RETURN_IF_ERROR(CheckNetAdmin());  // the capability named, not the kernel's EPERM
  OSR_ASSIGN_OR_RETURN(Fd sock, IoctlSocket());
  std::vector<TapPlan> made;
  for (auto& tap : taps) {
    Status st;
    if (tap.drill) {
      st = EnsureDrillBridge(sock.get(), tap.bridge);
    } else {
      st = CheckBridge(tap).status();
    }
    if (st.ok()) {
      DeleteTaps({tap});  // a leftover of a VM that ended with the daemon
      st = MakeTap(sock.get(), tap);
    }
    if (!st.ok()) {
      made.push_back(tap);
      DeleteTaps(made);
      if (st.code() == Code::kPermissionDenied || st.code() == Code::kFailedPrecondition ||
          st.code() == Code::kNotFound || st.code() == Code::kAlreadyExists) {
        return st;
      }
      return Status(st.code(), "network: " + st.message());
    }
    made.push_back(tap);
  }
  return Status::Ok();
}

void DeleteTaps(const std::vector<TapPlan>& taps) {
  for (auto& tap : taps) {
    if (!InterfaceExists(tap.name)) continue;
    int tun = ::open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (tun < 0) return;
    Fd tun_fd(tun);
    ifreq ifr{};
    std::strncpy(ifr.ifr_name, tap.name.c_str(), IFNAMSIZ - 1);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    if (::ioctl(tun, TUNSETIFF, &ifr) == 0) (void)::ioctl(tun, TUNSETPERSIST, 0);
  }
}

}  // namespace osr::site
