#include "nbd/protocol.h"

#include <cerrno>

namespace osr::nbd {

uint32_t ErrnoToNbd(int err) {
  switch (err) {
    case 0:
      return 0;
    case EPERM:
    case EROFS:
    case EACCES:
      return kEPerm;
    case ENOMEM:
      return kENoMem;
    case EINVAL:
      return kEInval;
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
      return kENoSpc;
    case EOVERFLOW:
      return kEOverflow;
    case EOPNOTSUPP:
      return kENotSup;
    case ESHUTDOWN:
      return kEShutdown;
    default:
      return kEIo;
  }
}

std::string_view CommandName(uint16_t type) {
  switch (type) {
    case kCmdRead:
      return "READ";
    case kCmdWrite:
      return "WRITE";
    case kCmdDisc:
      return "DISC";
    case kCmdFlush:
      return "FLUSH";
    case kCmdTrim:
      return "TRIM";
    case kCmdCache:
      return "CACHE";
    case kCmdWriteZeroes:
      return "WRITE_ZEROES";
    case kCmdBlockStatus:
      return "BLOCK_STATUS";
    case kCmdResize:
      return "RESIZE";
    default:
      return "unknown";
  }
}

std::string_view OptionName(uint32_t option) {
  switch (option) {
    case kOptExportName:
      return "EXPORT_NAME";
    case kOptAbort:
      return "ABORT";
    case kOptList:
      return "LIST";
    case kOptPeekExport:
      return "PEEK_EXPORT";
    case kOptStartTls:
      return "STARTTLS";
    case kOptInfo:
      return "INFO";
    case kOptGo:
      return "GO";
    case kOptStructuredReply:
      return "STRUCTURED_REPLY";
    case kOptListMetaContext:
      return "LIST_META_CONTEXT";
    case kOptSetMetaContext:
      return "SET_META_CONTEXT";
    case kOptExtendedHeaders:
      return "EXTENDED_HEADERS";
    default:
      return "unknown";
  }
}

}  // namespace osr::nbd
