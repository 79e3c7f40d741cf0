// The vault's client of a site's HTTP API (docs/api.md, "Site API"): one request per
// call, mutual TLS for https:// sites, every call bounded in time; a site's refusal becomes
// a Status with the code its error body names and its message (bounded, one line).
//
// The leader's fence reaches the sites: a call made on a thread that runs under a lease
// term's fence (vault/catalog.h FenceScope: the job workers, the point loop, the job poll)
// carries the term's token (X-Osr-Lease-Token, common/https.h), and a site refuses a
// state-changing call whose token is lower than one it has seen (site/lease_token.h). A
// state-changing call of a term that has ended is refused here, unsent. Calls of threads
// without a fence (API handlers on any vault: an operator's start, stop, repair,
// unprotect) carry no token.
//
// Thread model: a SiteClient is a value; each call opens its own connection, so copies
// may be used from any thread.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <utility>

#include "common/status.h"
#include "common/tls.h"
#include "vault/catalog.h"

namespace osr::vault {

// A site's HTTP API. Every call has a timeout; an unreachable site is kUnavailable with
// a message naming the site.
class SiteClient {
 public:
  // `tls`: the vault's client certificate and the sites' CA, for https:// site APIs.
  SiteClient(SiteRow site, TlsFiles tls) : site_(std::move(site)), tls_(std::move(tls)) {}
  // Errors: the site's refusal (kFailedPrecondition "site S: fenced: ..." when it has seen
  // a higher lease token), kUnavailable when it does not answer, kFailedPrecondition
  // ("fenced: this vault's lease term ...") for a state-changing call of an ended term.
  Result<nlohmann::json> Call(const std::string& method, const std::string& path,
                              const nlohmann::json& body = nullptr);
  // The same with an octet-stream body and answer (disk hashes).
  Result<std::string> CallRaw(const std::string& method, const std::string& path,
                              const std::string& body = std::string());

 private:
  // The lease token this call carries: the calling thread's term's (FenceScope), 0 for
  // none. kFailedPrecondition for a state-changing call of a term that has ended.
  Result<int64_t> LeaseTokenOfCall(const std::string& method, const std::string& path) const;
  // One request; (status, body) for a 2xx answer, else the site's error as a Status.
  Result<std::pair<int, std::string>> Exchange(const std::string& method, const std::string& path,
                                               const std::string& body, const char* content_type,
                                               int read_timeout_s);
  SiteRow site_;
  TlsFiles tls_;
};

}  // namespace osr::vault
