#include "replication/messages.h"

#include <fmt/format.h>

#include <cstring>
#include <nlohmann/json.hpp>

#include "common/json_in.h"

namespace osr::replication {

using nlohmann::json;

namespace {

constexpr std::string_view kNames[] = {
    "",                     // 0: not a code
    "internal",             // 1
    "bad_frame",            // 2
    "corrupt_frame",        // 3
    "unsupported_version",  // 4
    "unknown_group",        // 5
    "bad_disks",            // 6
    "stale_epoch",          // 7
    "epoch_ahead",          // 8
    "not_authorized",       // 9
    "store_failed",         // 10
    "no_space",             // 11
};
static_assert(std::size(kNames) == kErrorCodeLast + 1);

std::string_view Text(std::span<const uint8_t> p) {
  return {reinterpret_cast<const char*>(p.data()), p.size()};
}

Result<json> ParseControl(std::span<const uint8_t> payload, std::string_view what) {
  return json_in::ParseObject(Text(payload), what, kControlBytesMax, kControlDepthMax);
}

// What may go into a log line of ours from a peer's text: printable ASCII, at most
// kErrorMessageBytesMax bytes.
std::string Printable(std::string_view s) {
  std::string out;
  for (char c : s.substr(0, kErrorMessageBytesMax)) {
    out.push_back(c >= 0x20 && c < 0x7f ? c : '?');
  }
  if (s.size() > kErrorMessageBytesMax) out += "...";
  return out;
}

}  // namespace

std::string_view ErrorCodeName(ErrorCode code) {
  auto n = static_cast<uint16_t>(code);
  return n >= 1 && n <= kErrorCodeLast ? kNames[n] : "unknown";
}

std::optional<ErrorCode> ErrorCodeFromNumber(uint64_t n) {
  if (n < 1 || n > kErrorCodeLast) return std::nullopt;
  return static_cast<ErrorCode>(n);
}

ErrorCode ErrorCodeFor(const Status& st) {
  switch (st.code()) {
    case Code::kCorruption:
      return ErrorCode::kCorruptFrame;
    case Code::kInvalidArgument:
    case Code::kOutOfRange:
      return ErrorCode::kBadFrame;
    case Code::kNotFound:
      return ErrorCode::kUnknownGroup;
    case Code::kPermissionDenied:
      return ErrorCode::kNotAuthorized;
    case Code::kNoSpace:
      return ErrorCode::kNoSpace;
    case Code::kIoError:
    case Code::kAlreadyExists:
      return ErrorCode::kStoreFailed;
    default:
      return ErrorCode::kInternal;
  }
}

// ---- HELLO ------------------------------------------------------------------------------

std::string EncodeHello(const Hello& h) {
  json disks = json::array();
  for (auto& d : h.disks) disks.push_back({{"name", d.name}, {"size_bytes", d.size_bytes}});
  return json_in::Dump(json{{"version", h.version},
                            {"group", h.group},
                            {"epoch", h.epoch},
                            {"compress", h.lz4 ? json::array({"lz4"}) : json::array()},
                            {"disks", disks}});
}

Result<Hello> ParseHello(std::span<const uint8_t> payload) {
  OSR_ASSIGN_OR_RETURN(json j, ParseControl(payload, "HELLO"));
  json_in::Fields f(j, "HELLO.");
  Hello h;
  h.version = f.U64("version");
  h.group = f.String("group");
  h.epoch = f.U64("epoch");
  const json* disks = f.Array("disks", /*optional=*/false);
  const json* compress = f.Array("compress");
  if (f.ok() && !ValidName(h.group)) f.Fail("group", "is not a valid name");
  if (f.ok() && disks->size() > kHelloDisksMax) {
    f.Fail("disks", fmt::format("{} disks, more than {}", disks->size(), kHelloDisksMax));
  }
  if (!f.ok()) return f.status();
  for (size_t i = 0; i < disks->size(); ++i) {
    json_in::Fields d((*disks)[i], fmt::format("HELLO.disks[{}].", i));
    HelloDisk disk;
    disk.name = d.String("name");
    disk.size_bytes = d.U64("size_bytes");
    if (!d.ok()) return d.status();
    h.disks.push_back(std::move(disk));
  }
  if (compress != nullptr) {
    for (const json& c : *compress) h.lz4 = h.lz4 || (c.is_string() && c == "lz4");
  }
  return h;
}

// ---- HELLO_OK ---------------------------------------------------------------------------

std::string EncodeHelloOk(const HelloOk& h) {
  json j{{"durable_seq", h.durable_seq},       {"base_seq", h.base_seq},
         {"compress", h.lz4 ? "lz4" : "none"}, {"initial_sync", h.initial_sync},
         {"differential", h.differential},     {"resyncing", h.resyncing}};
  if (h.staged) {
    j["staged"] = {{"from", h.staged->from},
                   {"initial", h.staged->initial},
                   {"bytes", h.staged->bytes},
                   {"end_disk", h.staged->end_disk},
                   {"end_offset", h.staged->end_offset}};
  }
  return json_in::Dump(j);
}

Result<HelloOk> ParseHelloOk(std::span<const uint8_t> payload) {
  OSR_ASSIGN_OR_RETURN(json j, ParseControl(payload, "HELLO_OK"));
  json_in::Fields f(j, "HELLO_OK.");
  HelloOk h;
  h.durable_seq = f.U64("durable_seq");
  h.base_seq = f.U64("base_seq", 0);
  h.lz4 = f.String("compress", "none") == "lz4";
  h.initial_sync = f.Bool("initial_sync", false);
  h.differential = f.Bool("differential", false);
  h.resyncing = f.Bool("resyncing", false);
  const json* staged = f.Object("staged");
  if (!f.ok()) return f.status();
  if (staged != nullptr) {
    json_in::Fields sf(*staged, "HELLO_OK.staged.");
    HelloStaged st;
    st.from = sf.U64("from");
    st.initial = sf.Bool("initial", false);
    st.bytes = sf.U64("bytes");
    st.end_disk = static_cast<uint32_t>(sf.U64("end_disk", 0, {.max = UINT32_MAX}));
    st.end_offset = sf.U64("end_offset");
    if (!sf.ok()) return sf.status();
    h.staged = st;
  }
  return h;
}

// ---- resync -----------------------------------------------------------------------------

std::string EncodeResyncBegin(const ResyncBegin& b) {
  json j{{"from", b.from}, {"initial", b.initial}};
  if (b.replace_history) j["replace_history"] = true;  // older receivers refuse the resync
  if (b.resume_bytes > 0) j["resume_bytes"] = b.resume_bytes;
  return json_in::Dump(j);
}

Result<ResyncBegin> ParseResyncBegin(std::span<const uint8_t> payload) {
  OSR_ASSIGN_OR_RETURN(json j, ParseControl(payload, "RESYNC_BEGIN"));
  json_in::Fields f(j, "RESYNC_BEGIN.");
  ResyncBegin b;
  b.from = f.U64("from");
  b.initial = f.Bool("initial", false);
  b.replace_history = f.Bool("replace_history", false);
  b.resume_bytes = f.U64("resume_bytes", 0);
  if (f.ok() && b.initial && b.replace_history) {
    f.Fail("replace_history", "cannot go with initial");
  }
  if (f.ok() && b.replace_history && b.resume_bytes > 0) {
    f.Fail("resume_bytes", "cannot go with replace_history");
  }
  if (!f.ok()) return f.status();
  return b;
}

std::string EncodeResyncEnd(const ResyncEnd& e) {
  return json_in::Dump(json{{"consistent_seq", e.consistent_seq}});
}

Result<ResyncEnd> ParseResyncEnd(std::span<const uint8_t> payload, std::string_view what) {
  OSR_ASSIGN_OR_RETURN(json j, ParseControl(payload, what));
  json_in::Fields f(j, fmt::format("{}.", what));
  ResyncEnd e;
  e.consistent_seq = f.U64("consistent_seq");
  if (!f.ok()) return f.status();
  return e;
}

Result<ResyncData> ParseResyncData(std::span<const uint8_t> payload) {
  if (payload.size() < 12) {
    return InvalidArgument(
        fmt::format("RESYNC_DATA: {} bytes, shorter than its 12-byte header", payload.size()));
  }
  ResyncData d;
  std::memcpy(&d.disk, payload.data(), 4);
  std::memcpy(&d.offset, payload.data() + 4, 8);
  d.bytes = payload.subspan(12);
  return d;
}

// ---- ERROR ------------------------------------------------------------------------------

std::string EncodeError(const PeerError& e) {
  std::string message = e.message.substr(0, kErrorMessageBytesMax);
  return json_in::Dump(json{{"code", static_cast<uint16_t>(e.code)},
                            {"name", std::string(ErrorCodeName(e.code))},
                            {"message", message}});
}

PeerError ParseError(std::span<const uint8_t> payload) {
  auto j = ParseControl(payload, "ERROR");
  if (!j.ok()) return {ErrorCode::kInternal, "ERROR: " + Printable(Text(payload))};
  json_in::Fields f(*j, "ERROR.");
  uint64_t n = f.U64("code");
  std::string message = f.String("message", "");
  if (!f.ok()) {
    // An older peer's {"code": "permission denied", ...}: no typed code to act on.
    return {ErrorCode::kInternal, Printable(Text(payload))};
  }
  auto code = ErrorCodeFromNumber(n);
  if (!code) return {ErrorCode::kInternal, fmt::format("code {}: {}", n, Printable(message))};
  return {*code, Printable(message)};
}

}  // namespace osr::replication
