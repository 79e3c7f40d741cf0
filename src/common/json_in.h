// JSON from peers, read without throwing (STYLE.md habit 15, DESIGN.md invariant 8).
//
// Every JSON that osr did not write itself in this process — an HTTP body, a site's
// answer, a replication HELLO, a spec read back from the catalog — goes through this
// layer: Parse() limits size and nesting before nlohmann-json sees it, and Fields reads
// typed values out of an object, keeping the first error, which names the field
// ("spec.hook_timeout_ms: must be a whole number, not a string").
//
// nlohmann-json's own accessors (get<T>, value(), operator[] on a const object) throw
// on a wrong type; a throw in a thread of osrd ends the daemon. Do not call them on
// peer input.
//
// Thread model: none (values).
#pragma once

#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace osr::json_in {

// Nesting deeper than this is refused (a body 100000 levels deep must not reach the
// recursive parts of a JSON library).
inline constexpr size_t kDepthMax = 64;
inline constexpr size_t kBytesMax = 64u << 20;

// Parses `text` as one JSON value. kInvalidArgument (with `what` in the message) when
// it is larger than bytes_max, nested deeper than depth_max, or not JSON (RFC 8259).
Result<nlohmann::json> Parse(std::string_view text, std::string_view what,
                             size_t bytes_max = kBytesMax, size_t depth_max = kDepthMax);
// The same, and the value must be an object.
Result<nlohmann::json> ParseObject(std::string_view text, std::string_view what,
                                   size_t bytes_max = kBytesMax, size_t depth_max = kDepthMax);

// Serialises without throwing: strings that are not UTF-8 (a path segment, a message
// from a peer) are written with U+FFFD in place of the bad bytes.
std::string Dump(const nlohmann::json& j);

// Whether `text` is well-formed UTF-8 (RFC 3629: no overlong forms, no surrogates, nothing
// above U+10FFFF). A peer's path or parameter that is not is refused before it reaches a
// database that would refuse it less clearly.
bool IsUtf8(std::string_view text);

// The largest nesting depth of `text` (0 for a scalar), counting only brackets outside
// strings; stops counting at limit + 1.
size_t NestingDepth(std::string_view text, size_t limit);

// Typed reads of an object's fields. A missing field (or null) gives the default; a
// field of another type, out of its range, or missing without a default is an error
// naming the field with `prefix` ("spec.", "HELLO."). After the first error every read
// returns its default and status() keeps that first error, so a handler reads every
// field, then checks once:
//
//   json_in::Fields f(body);
//   std::string name = f.String("name");
//   uint64_t retention_s = f.U64("retention_seconds", 86400, {.max = kRetentionSMax});
//   if (!f.ok()) return f.status();
struct U64Range {
  uint64_t min = 0;
  uint64_t max = std::numeric_limits<uint64_t>::max();
};
struct I64Range {
  int64_t min = std::numeric_limits<int64_t>::min();
  int64_t max = std::numeric_limits<int64_t>::max();
};

class Fields {
 public:
  // `obj` must outlive this reader. Not an object: status() is an error.
  explicit Fields(const nlohmann::json& obj, std::string prefix = "");

  bool ok() const { return status_.ok(); }
  const Status& status() const { return status_; }
  bool Has(std::string_view key) const;

  // Required (no default): a missing field is an error.
  std::string String(std::string_view key);
  std::string String(std::string_view key, std::string def);
  uint64_t U64(std::string_view key);
  uint64_t U64(std::string_view key, uint64_t def, U64Range range = {});
  int64_t I64(std::string_view key, int64_t def, I64Range range = {});
  bool Bool(std::string_view key, bool def);
  // A nested object or array; nullptr when missing (and then an error unless optional).
  const nlohmann::json* Object(std::string_view key, bool optional = true);
  const nlohmann::json* Array(std::string_view key, bool optional = true);

  // Records an error of the caller's about `key` (if none was recorded yet).
  void Fail(std::string_view key, std::string_view what);
  // Records an error for the first field of the object that no read above asked for (a
  // misspelt or unsupported option is refused, not ignored), naming the fields this call
  // takes. Call after the reads.
  void RefuseOthers();

 private:
  const nlohmann::json* Find(std::string_view key, bool required);
  const nlohmann::json& obj_;
  std::string prefix_;
  Status status_;
  std::vector<std::string> asked_;  // the keys the reads asked for, in order
};

}  // namespace osr::json_in
