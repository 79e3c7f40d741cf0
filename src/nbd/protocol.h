// The NBD wire protocol (NetworkBlockDevice/nbd doc/proto.md): constants, the
// fixed-size messages, and big-endian codecs. Every field on the wire is network
// byte order (big endian). Comments give each field's meaning once, here.
#pragma once

#include <cstdint>
#include <cstring>
#include <string_view>

namespace osr::nbd {

// ---- byte order helpers ---------------------------------------------------------
inline void Put16(uint8_t* p, uint16_t v) {
  p[0] = v >> 8;
  p[1] = v & 0xff;
}
inline void Put32(uint8_t* p, uint32_t v) {
  Put16(p, v >> 16);
  Put16(p + 2, v & 0xffff);
}
inline void Put64(uint8_t* p, uint64_t v) {
  Put32(p, v >> 32);
  Put32(p + 4, v & 0xffffffffu);
}
inline uint16_t Get16(const uint8_t* p) {
  return static_cast<uint16_t>(p[0] << 8 | p[1]);
}
inline uint32_t Get32(const uint8_t* p) {
  return uint32_t{Get16(p)} << 16 | Get16(p + 2);
}
inline uint64_t Get64(const uint8_t* p) {
  return uint64_t{Get32(p)} << 32 | Get32(p + 4);
}

// ---- handshake ----------------------------------------------------------------------
inline constexpr uint64_t kNbdMagic = 0x4e42444d41474943;  // "NBDMAGIC"
inline constexpr uint64_t kIHaveOpt = 0x49484156454F5054;  // "IHAVEOPT"
inline constexpr uint64_t kOptReplyMagic = 0x0003e889045565a9;

// Handshake flags (server -> client, 16 bits).
inline constexpr uint16_t kFlagFixedNewstyle = 1 << 0;
inline constexpr uint16_t kFlagNoZeroes = 1 << 1;
// Client flags (client -> server, 32 bits).
inline constexpr uint32_t kClientFixedNewstyle = 1 << 0;
inline constexpr uint32_t kClientNoZeroes = 1 << 1;

// Options.
enum Option : uint32_t {
  kOptExportName = 1,
  kOptAbort = 2,
  kOptList = 3,
  kOptPeekExport = 4,
  kOptStartTls = 5,
  kOptInfo = 6,
  kOptGo = 7,
  kOptStructuredReply = 8,
  kOptListMetaContext = 9,
  kOptSetMetaContext = 10,
  kOptExtendedHeaders = 11,
};

// Option reply types; errors have bit 31 set.
inline constexpr uint32_t kRepAck = 1;
inline constexpr uint32_t kRepServer = 2;
inline constexpr uint32_t kRepInfo = 3;
inline constexpr uint32_t kRepMetaContext = 4;
inline constexpr uint32_t kRepErrUnsup = 0x80000001;
inline constexpr uint32_t kRepErrPolicy = 0x80000002;
inline constexpr uint32_t kRepErrInvalid = 0x80000003;
inline constexpr uint32_t kRepErrPlatform = 0x80000004;
inline constexpr uint32_t kRepErrTlsReqd = 0x80000005;
inline constexpr uint32_t kRepErrUnknown = 0x80000006;
inline constexpr uint32_t kRepErrShutdown = 0x80000007;
inline constexpr uint32_t kRepErrBlockSizeReqd = 0x80000008;
inline constexpr uint32_t kRepErrTooBig = 0x80000009;

// NBD_OPT_INFO / NBD_OPT_GO information types.
inline constexpr uint16_t kInfoExport = 0;
inline constexpr uint16_t kInfoName = 1;
inline constexpr uint16_t kInfoDescription = 2;
inline constexpr uint16_t kInfoBlockSize = 3;

// Transmission flags (16 bits, sent with the export size).
inline constexpr uint16_t kTxHasFlags = 1 << 0;
inline constexpr uint16_t kTxReadOnly = 1 << 1;
inline constexpr uint16_t kTxSendFlush = 1 << 2;
inline constexpr uint16_t kTxSendFua = 1 << 3;
inline constexpr uint16_t kTxRotational = 1 << 4;
inline constexpr uint16_t kTxSendTrim = 1 << 5;
inline constexpr uint16_t kTxSendWriteZeroes = 1 << 6;
inline constexpr uint16_t kTxSendDf = 1 << 7;
inline constexpr uint16_t kTxCanMultiConn = 1 << 8;
inline constexpr uint16_t kTxSendResize = 1 << 9;
inline constexpr uint16_t kTxSendCache = 1 << 10;
inline constexpr uint16_t kTxSendFastZero = 1 << 11;

// ---- transmission -----------------------------------------------------------------
inline constexpr uint32_t kRequestMagic = 0x25609513;
inline constexpr uint32_t kSimpleReplyMagic = 0x67446698;
inline constexpr uint32_t kStructuredReplyMagic = 0x668e33ef;

enum Command : uint16_t {
  kCmdRead = 0,
  kCmdWrite = 1,
  kCmdDisc = 2,
  kCmdFlush = 3,
  kCmdTrim = 4,
  kCmdCache = 5,
  kCmdWriteZeroes = 6,
  kCmdBlockStatus = 7,
  kCmdResize = 8,
};

// Command flags.
inline constexpr uint16_t kCmdFlagFua = 1 << 0;
inline constexpr uint16_t kCmdFlagNoHole = 1 << 1;
inline constexpr uint16_t kCmdFlagDf = 1 << 2;
inline constexpr uint16_t kCmdFlagReqOne = 1 << 3;
inline constexpr uint16_t kCmdFlagFastZero = 1 << 4;

// Structured reply chunk flags and types.
inline constexpr uint16_t kReplyFlagDone = 1 << 0;
inline constexpr uint16_t kReplyTypeNone = 0;
inline constexpr uint16_t kReplyTypeOffsetData = 1;
inline constexpr uint16_t kReplyTypeOffsetHole = 2;
inline constexpr uint16_t kReplyTypeBlockStatus = 5;
inline constexpr uint16_t kReplyTypeError = 32769;        // (1 << 15) + 1
inline constexpr uint16_t kReplyTypeErrorOffset = 32770;  // (1 << 15) + 2

// base:allocation extent flags.
inline constexpr uint32_t kStateHole = 1 << 0;
inline constexpr uint32_t kStateZero = 1 << 1;

// Errors on the wire (the spec's own numbering, equal to Linux errno values).
inline constexpr uint32_t kEPerm = 1;
inline constexpr uint32_t kEIo = 5;
inline constexpr uint32_t kENoMem = 12;
inline constexpr uint32_t kEInval = 22;
inline constexpr uint32_t kENoSpc = 28;
inline constexpr uint32_t kEOverflow = 75;
inline constexpr uint32_t kENotSup = 95;
inline constexpr uint32_t kEShutdown = 108;

// Maps an errno of this host to the NBD error the spec allows (EIO for the rest).
uint32_t ErrnoToNbd(int err);

inline constexpr std::string_view kMetaBaseAllocation = "base:allocation";

// Option request header: magic(8) option(4) length(4).
struct OptionHeader {
  static constexpr size_t kSize = 16;
  uint64_t magic;
  uint32_t option;
  uint32_t length;  // bytes of option data that follow
  static OptionHeader Decode(const uint8_t* p) { return {Get64(p), Get32(p + 8), Get32(p + 12)}; }
};

// Option reply header: magic(8) option(4) type(4) length(4).
struct OptionReplyHeader {
  static constexpr size_t kSize = 20;
  static void Encode(uint8_t* p, uint32_t option, uint32_t type, uint32_t length) {
    Put64(p, kOptReplyMagic);
    Put32(p + 8, option);
    Put32(p + 12, type);
    Put32(p + 16, length);
  }
};

// Request: magic(4) flags(2) type(2) cookie(8) offset(8) length(4) = 28 bytes.
struct Request {
  static constexpr size_t kSize = 28;
  uint32_t magic;
  uint16_t flags;
  uint16_t type;
  uint64_t cookie;  // opaque; echoed in the reply
  uint64_t offset;
  uint32_t length;
  static Request Decode(const uint8_t* p) {
    return {Get32(p), Get16(p + 4), Get16(p + 6), Get64(p + 8), Get64(p + 16), Get32(p + 24)};
  }
  void Encode(uint8_t* p) const {
    Put32(p, magic);
    Put16(p + 4, flags);
    Put16(p + 6, type);
    Put64(p + 8, cookie);
    Put64(p + 16, offset);
    Put32(p + 24, length);
  }
};

// Simple reply: magic(4) error(4) cookie(8) = 16 bytes [+ data for READ].
struct SimpleReply {
  static constexpr size_t kSize = 16;
  static void Encode(uint8_t* p, uint32_t error, uint64_t cookie) {
    Put32(p, kSimpleReplyMagic);
    Put32(p + 4, error);
    Put64(p + 8, cookie);
  }
};

// Structured reply chunk header: magic(4) flags(2) type(2) cookie(8) length(4) = 20 bytes.
struct ChunkHeader {
  static constexpr size_t kSize = 20;
  static void Encode(uint8_t* p, uint16_t flags, uint16_t type, uint64_t cookie, uint32_t length) {
    Put32(p, kStructuredReplyMagic);
    Put16(p + 4, flags);
    Put16(p + 6, type);
    Put64(p + 8, cookie);
    Put32(p + 16, length);
  }
};

std::string_view CommandName(uint16_t type);
std::string_view OptionName(uint32_t option);

}  // namespace osr::nbd
