#include "common/status.h"

#include <fmt/format.h>

#include <cctype>
#include <cstring>

namespace osr {

std::string_view CodeName(Code code) {
  switch (code) {
    case Code::kOk:
      return "ok";
    case Code::kInvalidArgument:
      return "invalid argument";
    case Code::kOutOfRange:
      return "out of range";
    case Code::kNotFound:
      return "not found";
    case Code::kAlreadyExists:
      return "already exists";
    case Code::kFailedPrecondition:
      return "failed precondition";
    case Code::kPermissionDenied:
      return "permission denied";
    case Code::kNoSpace:
      return "no space";
    case Code::kNotSupported:
      return "not supported";
    case Code::kUnavailable:
      return "unavailable";
    case Code::kCorruption:
      return "corruption";
    case Code::kIoError:
      return "I/O error";
    case Code::kInternal:
      return "internal error";
    case Code::kCancelled:
      return "cancelled";
  }
  return "unknown";
}

std::optional<Code> CodeFromName(std::string_view name) {
  for (int c = static_cast<int>(Code::kOk); c <= static_cast<int>(Code::kInternal); ++c) {
    if (CodeName(static_cast<Code>(c)) == name) return static_cast<Code>(c);
  }
  return std::nullopt;
}

Status Status::FromErrno(int err, std::string_view what) {
  Code code = Code::kIoError;
  switch (err) {
    case ENOENT:
      code = Code::kNotFound;
      break;
    case EEXIST:
      code = Code::kAlreadyExists;
      break;
    case EACCES:
    case EPERM:
    case EROFS:
      code = Code::kPermissionDenied;
      break;
    case ENOSPC:
    case EDQUOT:
      code = Code::kNoSpace;
      break;
    case EINVAL:
      code = Code::kInvalidArgument;
      break;
    case EOPNOTSUPP:
      code = Code::kNotSupported;
      break;
    case EAGAIN:
    case ECONNREFUSED:
    case ECONNRESET:
    case EPIPE:
    case ETIMEDOUT:
      code = Code::kUnavailable;
      break;
    default:
      break;
  }
  return Status(code, fmt::format("{}: {}", what, std::strerror(err)));
}

std::string Status::ToString() const {
  if (ok()) return "ok";
  return fmt::format("{}: {}", CodeName(code_), message_);
}

int Status::ToErrno() const {
  switch (code_) {
    case Code::kOk:
      return 0;
    case Code::kInvalidArgument:
    case Code::kOutOfRange:
    case Code::kNotFound:
      return EINVAL;
    case Code::kPermissionDenied:
      return EPERM;
    case Code::kNoSpace:
      return ENOSPC;
    case Code::kNotSupported:
      return EOPNOTSUPP;
    case Code::kUnavailable:
      return ESHUTDOWN;
    case Code::kCancelled:
      return ECANCELED;
    default:
      return EIO;
  }
}

int HttpStatusFor(const Status& st) {
  switch (st.code()) {
    case Code::kOk:
      return 200;
    case Code::kInvalidArgument:
    case Code::kOutOfRange:
      return 400;
    case Code::kPermissionDenied:
      return 403;
    case Code::kNotFound:
      return 404;
    case Code::kAlreadyExists:
    case Code::kCancelled:
    case Code::kFailedPrecondition:
      return 409;
    case Code::kNotSupported:
      return 501;
    case Code::kUnavailable:
      return 503;
    default:
      return 500;
  }
}

bool ValidName(std::string_view s) {
  if (s.empty() || s.size() > 64 || s[0] == '.' || s[0] == '-') return false;
  // Not shaped like an osr token ("osr_<digits>_…"): a name is shown everywhere (audit rows,
  // lists, logs); a token must not be.
  if (s.starts_with("osr_")) {
    size_t digits = s.find_first_not_of("0123456789", 4);
    if (digits != 4 && digits != std::string_view::npos && s[digits] == '_') return false;
  }
  for (char c : s) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-')) {
      return false;
    }
  }
  return true;
}

}  // namespace osr
