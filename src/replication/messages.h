// The replication channel's control messages: the JSON payloads of HELLO, HELLO_OK,
// RESYNC_BEGIN, RESYNC_END, RESYNC_DONE and ERROR, and the typed codes an ERROR carries
// (docs/formats.md, "Replication channel", protocol version 1).
//
// Parse* read a peer's payload through json_in (STYLE.md habit 15): they never throw,
// limit size and nesting before parsing, and answer kInvalidArgument naming the field
// ("HELLO.version: must be a whole number ≥ 0, not a string"). Encode* write ours, with
// json_in::Dump (no throw on a string that is not UTF-8 either). The receiver and the
// sender call exactly these functions, and so does the fuzz target
// (tests/fuzz/fuzz_replication_hello.cc).
//
// Thread model: none (values and pure functions).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace osr::replication {

// What an ERROR frame says went wrong, chosen by what the other end should do about it.
// The numbers are the wire form (ERROR `code`); names are for logs and the site API.
// Never renumber; add at the end.
enum class ErrorCode : uint16_t {
  kInternal = 1,            // the peer failed in a way no code below says: retry later
  kBadFrame = 2,            // a malformed or unexpected frame / JSON payload (names the field)
  kCorruptFrame = 3,        // a frame or record failed its CRC (or LZ4): reconnect, resend
  kUnsupportedVersion = 4,  // HELLO `version` is not one this receiver speaks
  kUnknownGroup = 5,        // no recovery store for the group (yet): retry later
  kBadDisks = 6,            // the group's disks differ (count, names, sizes): an operator looks
  kStaleEpoch = 7,          // the sender's epoch is below the store's: the item failed over
                            // elsewhere; the sender fences its disks (invariant 5)
  kEpochAhead = 8,          // the sender's epoch is above the store's: the vault has not raised
                            // the store's epoch (yet); retry later, do not fence
  kNotAuthorized = 9,       // the peer's certificate does not name the site expected
  kStoreFailed = 10,        // the store could not take what was sent (I/O, out of order,
                            // no resync under way): reconnect and resume from durable
  kNoSpace = 11,            // the recovery site's file system is full: nothing was taken;
                            // back off (exponentially, bounded) and resend from durable;
                            // it resumes by itself once an operator frees space
};
inline constexpr uint16_t kErrorCodeLast = 11;

// "stale_epoch", "epoch_ahead", ...
std::string_view ErrorCodeName(ErrorCode code);
// The code with this wire number; nullopt for a number this build does not know.
std::optional<ErrorCode> ErrorCodeFromNumber(uint64_t n);
// The code for a local failure that has no more specific one: kCorruption ->
// kCorruptFrame, kInvalidArgument / kOutOfRange -> kBadFrame, kNotFound -> kUnknownGroup,
// kPermissionDenied -> kNotAuthorized, kNoSpace -> kNoSpace, kIoError / kAlreadyExists ->
// kStoreFailed, anything else -> kInternal.
ErrorCode ErrorCodeFor(const Status& st);

// Limits on control payloads (not RECORDS / RESYNC_DATA, which are binary).
inline constexpr size_t kControlBytesMax = 1 << 20;
inline constexpr size_t kControlDepthMax = 8;
inline constexpr size_t kHelloDisksMax = 1024;
inline constexpr size_t kErrorMessageBytesMax = 4096;

struct HelloDisk {
  std::string name;
  uint64_t size_bytes = 0;
};

// 1 HELLO, sender -> receiver.
struct Hello {
  uint64_t version = 0;  // the receiver refuses all but kProtocolVersion
  std::string group;     // a valid name (ValidName)
  uint64_t epoch = 0;    // the item's epoch as the vault gave it to the source
  bool lz4 = false;      // `compress` lists "lz4"
  std::vector<HelloDisk> disks;
};
std::string EncodeHello(const Hello& h);
// kInvalidArgument naming the field: not a JSON object, `version`, `group`, `epoch`
// missing or of another type, a bad `group` name, `disks` not an array of
// {name: string, size_bytes: number} (at most kHelloDisksMax), `compress` not an array.
Result<Hello> ParseHello(std::span<const uint8_t> payload);

// HELLO_OK `staged`: how far the store's staged copy of a resync (or initial copy) cut
// short reaches, so that the sender can go on from there (RESYNC_BEGIN `resume_bytes`).
struct HelloStaged {
  uint64_t from = 0;        // the resync's RESYNC_BEGIN.from
  bool initial = false;     // an initial copy
  uint64_t bytes = 0;       // bytes durably staged, in the order they were sent (> 0)
  uint32_t end_disk = 0;    // where the last staged byte's region ends: disk,
  uint64_t end_offset = 0;  // and the offset after it
};

// 2 HELLO_OK, receiver -> sender.
struct HelloOk {
  uint64_t durable_seq = 0;
  uint64_t base_seq = 0;
  bool lz4 = false;           // `compress` is "lz4"
  bool initial_sync = false;  // missing (an older receiver): false
  bool differential = false;  // missing: false
  // Missing (an older receiver, or nothing staged): a resync cut short starts over.
  std::optional<HelloStaged> staged;
  // The store waits for a resync to end (seqs after its start are unreadable); missing: false.
  bool resyncing = false;
};
std::string EncodeHelloOk(const HelloOk& h);
Result<HelloOk> ParseHelloOk(std::span<const uint8_t> payload);

// 6 RESYNC_BEGIN, sender -> receiver.
struct ResyncBegin {
  uint64_t from = 0;
  bool initial = false;
  // The store's history after its durable seq is replaced (from > durable: the source no
  // longer holds the records the store lacks). Not with `initial` or `resume_bytes`.
  bool replace_history = false;
  // > 0: go on with the resync the store has staged (HELLO_OK `staged`), whose first
  // `resume_bytes` bytes it holds; 0 or missing: start it (over) from its first byte.
  uint64_t resume_bytes = 0;
};
std::string EncodeResyncBegin(const ResyncBegin& b);
Result<ResyncBegin> ParseResyncBegin(std::span<const uint8_t> payload);

// 8 RESYNC_END (sender -> receiver) and 9 RESYNC_DONE (receiver -> sender).
struct ResyncEnd {
  uint64_t consistent_seq = 0;
};
std::string EncodeResyncEnd(const ResyncEnd& e);
// `what` is "RESYNC_END" or "RESYNC_DONE" (it prefixes the field in errors).
Result<ResyncEnd> ParseResyncEnd(std::span<const uint8_t> payload, std::string_view what);

// 7 RESYNC_DATA, sender -> receiver: disk u32, offset u64, then the region's bytes.
struct ResyncData {
  uint32_t disk = 0;
  uint64_t offset = 0;
  std::span<const uint8_t> bytes;  // points into the payload
};
Result<ResyncData> ParseResyncData(std::span<const uint8_t> payload);

// 5 ERROR, either way; the connection ends after it.
struct PeerError {
  ErrorCode code = ErrorCode::kInternal;
  std::string message;
};
// {"code": N, "name": "stale_epoch", "message": "..."}; the message is cut to
// kErrorMessageBytesMax.
std::string EncodeError(const PeerError& e);
// Never fails: an ERROR is an error however it is written. A payload that is not a
// JSON object with a known numeric `code` (an older peer wrote {"code": "text"}, or a
// newer one a code this build does not know) reads as kInternal with what could be
// read of it in the message (printable, at most kErrorMessageBytesMax).
PeerError ParseError(std::span<const uint8_t> payload);

}  // namespace osr::replication
