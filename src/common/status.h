// Status and Result<T>: errors as values at module boundaries.
//
// The code says what the caller should do (Abseil's rule): kInvalidArgument and
// kOutOfRange — fix the request; kUnavailable — retry later; kCorruption and
// kDataLoss — an operator must look; kIoError — the medium failed; kCancelled — someone
// asked for the operation to stop (a cancelled job): nothing to retry.
#pragma once

#include <cerrno>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

#include "common/check.h"

namespace osr {

enum class Code {
  kOk = 0,
  kInvalidArgument,
  kOutOfRange,
  kNotFound,
  kAlreadyExists,
  // The thing is there but not in a state for this (a quarantined group, a store in use):
  // an operator acts first (Abseil's FAILED_PRECONDITION). HTTP 409.
  kFailedPrecondition,
  kPermissionDenied,
  kNoSpace,
  kNotSupported,
  kUnavailable,
  kCorruption,
  kIoError,
  kInternal,
  kCancelled,
};

std::string_view CodeName(Code code);
// The inverse of CodeName; nullopt for a name that is not one.
std::optional<Code> CodeFromName(std::string_view name);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(Code code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() { return Status(); }
  // Builds a status from an errno value; `what` names the operation and its object.
  static Status FromErrno(int err, std::string_view what);

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  const std::string& message() const { return message_; }
  // "code: message", for logs and error output.
  std::string ToString() const;
  // The closest errno, for mapping to NBD errors.
  int ToErrno() const;

 private:
  Code code_ = Code::kOk;
  std::string message_;
};

// The HTTP status that tells a client what to do about `st` (REST APIs of the site and
// the vault): 400 fix the request, 403 not allowed, 404 no such thing, 409 conflicts
// with what exists, 503 try again later, 500 an operator must look.
int HttpStatusFor(const Status& st);

// Names of sites, VMs, disks, policies: 1-64 of [A-Za-z0-9._-], not starting with '.'
// or '-' (they become file and export names).
bool ValidName(std::string_view s);

inline Status InvalidArgument(std::string m) {
  return {Code::kInvalidArgument, std::move(m)};
}
inline Status Corruption(std::string m) {
  return {Code::kCorruption, std::move(m)};
}
inline Status IoError(std::string m) {
  return {Code::kIoError, std::move(m)};
}
inline Status NotFound(std::string m) {
  return {Code::kNotFound, std::move(m)};
}
inline Status Unavailable(std::string m) {
  return {Code::kUnavailable, std::move(m)};
}
inline Status NotSupported(std::string m) {
  return {Code::kNotSupported, std::move(m)};
}
inline Status Internal(std::string m) {
  return Status(Code::kInternal, std::move(m));
}
inline Status OutOfRange(std::string m) {
  return {Code::kOutOfRange, std::move(m)};
}

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) { OSR_CHECK(!std::get<Status>(v_).ok()); }

  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOkStatus;
    return ok() ? kOkStatus : std::get<Status>(v_);
  }
  T& value() & {
    OSR_CHECK(ok());
    return std::get<T>(v_);
  }
  const T& value() const& {
    OSR_CHECK(ok());
    return std::get<T>(v_);
  }
  T&& value() && {
    OSR_CHECK(ok());
    return std::get<T>(std::move(v_));
  }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace osr

#define OSR_CONCAT_INNER(a, b) a##b
#define OSR_CONCAT(a, b) OSR_CONCAT_INNER(a, b)

// Returns the status from the enclosing function when it is not ok.
#define OSR_RETURN_IF_ERROR(expr) \
  do {                            \
    ::osr::Status _st = (expr);   \
    if (!_st.ok()) [[unlikely]]   \
      return _st;                 \
  } while (0)

#define OSR_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) [[unlikely]]                     \
    return tmp.status();                          \
  lhs = std::move(tmp).value()

// OSR_ASSIGN_OR_RETURN(auto x, MakeX()); — unwraps a Result or returns its error.
#define OSR_ASSIGN_OR_RETURN(lhs, expr) \
  OSR_ASSIGN_OR_RETURN_IMPL(OSR_CONCAT(_result_, __LINE__), lhs, expr)
