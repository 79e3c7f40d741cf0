// TLS for the HTTP planes (the vault's REST API, the vault -> site API), over
// cpp-httplib's OpenSSL support. docs/security.md has the trust model.
//
// - ConfigureServerTls: the server's certificate and key; with a CA, clients must present
//   a certificate signed by it (mutual TLS); with `peer_names`, its CN must be one of
//   them (the site API answers only the vault's certificate).
// - ConfigureClientTls: the client's certificate and key (mutual TLS), the CA that
//   signed the server's, and the CN the server's certificate must carry (the vault
//   checks that a site's certificate names the site it registered).
//
// Both refuse TLS below 1.3. Thread model: called once per SSL_CTX, before use.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "common/tls.h"

typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_st SSL;

namespace osr {

// The HTTP header in which the vault's leader sends its lease term's fencing token to a
// site (decimal, 1..kLeaseTokenMax; docs/api.md, "Site API", "Lease tokens"): the site
// refuses a state-changing call whose token is lower than one it has seen
// (site/lease_token.h).
inline constexpr char kLeaseTokenHeader[] = "X-Osr-Lease-Token";
// The highest lease token a site accepts. `osrd vault --lease-token-floor` goes to one
// below it, so the next term's token (floor + 1) is still one a site takes: any token a
// site recorded below this can be passed; this one only by removing the site's record.
inline constexpr uint64_t kLeaseTokenMax = uint64_t{1} << 62;
// On such a refusal (409) the site says the highest token it has seen in this header.
inline constexpr char kLeaseTokenSeenHeader[] = "X-Osr-Lease-Token-Seen";

// kInvalidArgument naming the file that could not be loaded.
Status ConfigureServerTls(SSL_CTX* ctx, const TlsFiles& files,
                          const std::vector<std::string>& peer_names = {});
// `expected_peer_name`: the CN the server's certificate must have ("" : any, CA-signed).
Status ConfigureClientTls(SSL_CTX* ctx, const TlsFiles& files,
                          const std::string& expected_peer_name);

// The CN of the peer's certificate on an established connection ("" when none).
std::string PeerCommonName(const SSL* ssl);

}  // namespace osr
