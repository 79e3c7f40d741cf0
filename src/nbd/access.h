// Who may see and open which export (issue 9, DESIGN invariant 8: "NBD by certificate or
// a local 0600 socket").
//
// Every connection has a Principal, fixed by how it came in:
//   - kLocalVm: it came in on a VM's own unix socket (0600, in the VM's 0700 run dir; only
//     the daemon's user reaches it). It sees that VM's disk exports only (Export::vm).
//   - kCertificate: it completed NBD_OPT_STARTTLS with a client certificate signed by the
//     CA and named (common name) by the server's Authz. It sees the exports its Authz rule
//     names by prefix (all when the rule names none).
//   - kAnonymous: plain TCP on a listener that allows it (loopback, or a site configured
//     with nbd_insecure_tcp), or the unix socket of `osrd nbd-serve`. It sees every export
//     (the listener itself is the access control).
// A principal that may not open an export does not learn that it exists: LIST leaves it
// out, INFO/GO answer NBD_REP_ERR_UNKNOWN as for a missing name.
//
// Thread model: immutable after construction; shared by every session.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace osr::nbd {

struct Principal {
  enum class Kind { kAnonymous, kLocalVm, kCertificate };
  Kind kind = Kind::kAnonymous;
  std::string name;  // kLocalVm: the VM; kCertificate: the certificate's common name
  std::string Describe() const;
};

struct AuthzRule {
  std::string identity;                      // a client certificate's common name
  std::vector<std::string> export_prefixes;  // empty: every export
};

// The TLS clients allowed in (like qemu-nbd's --tls-authz), and what each may open.
class Authz {
 public:
  Authz() = default;
  explicit Authz(std::vector<AuthzRule> rules) : rules_(std::move(rules)) {}
  // The identities allowed to complete a TLS handshake.
  std::vector<std::string> Identities() const;
  bool empty() const { return rules_.empty(); }
  // Whether `identity` may open `export_name`. An empty Authz lets every certificate the
  // CA signed open everything (qemu-nbd without --tls-authz).
  bool Allows(std::string_view identity, std::string_view export_name) const;

 private:
  std::vector<AuthzRule> rules_;
};

}  // namespace osr::nbd
