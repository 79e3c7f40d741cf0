#include "common/json_in.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>

namespace osr::json_in {

using nlohmann::json;

namespace {

std::string_view TypeName(const json& j) {
  switch (j.type()) {
    case json::value_t::null:
      return "null";
    case json::value_t::boolean:
      return "a boolean";
    case json::value_t::string:
      return "a string";
    case json::value_t::object:
      return "an object";
    case json::value_t::array:
      return "an array";
    case json::value_t::number_float:
      return "a fraction";
    case json::value_t::number_integer:
      return j.get<int64_t>() < 0 ? "a negative number" : "a number";
    case json::value_t::number_unsigned:
      return "a number";
    default:
      return "binary";
  }
}

}  // namespace

bool IsUtf8(std::string_view text) {
  // nlohmann's serializer checks UTF-8 (Hoehrmann's decoder: no overlong forms, no
  // surrogates, nothing above U+10FFFF): a text written the same whether its bad bytes are
  // dropped or replaced has none.
  json s = std::string(text);
  return s.dump(-1, ' ', false, json::error_handler_t::ignore) ==
         s.dump(-1, ' ', false, json::error_handler_t::replace);
}

size_t NestingDepth(std::string_view text, size_t limit) {
  size_t depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > deepest) deepest = depth;
      if (deepest > limit) return deepest;
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return deepest;
}

Result<json> Parse(std::string_view text, std::string_view what, size_t bytes_max,
                   size_t depth_max) {
  if (text.size() > bytes_max) {
    return InvalidArgument(
        fmt::format("{}: {} bytes, more than the {} allowed", what, text.size(), bytes_max));
  }
  if (NestingDepth(text, depth_max) > depth_max) {
    return InvalidArgument(fmt::format("{}: nested deeper than {} levels", what, depth_max));
  }
  json j = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return InvalidArgument(fmt::format("{}: not valid JSON", what));
  return j;
}

Result<json> ParseObject(std::string_view text, std::string_view what, size_t bytes_max,
                         size_t depth_max) {
  OSR_ASSIGN_OR_RETURN(json j, Parse(text, what, bytes_max, depth_max));
  if (!j.is_object()) {
    return InvalidArgument(fmt::format("{}: must be a JSON object, not {}", what, TypeName(j)));
  }
  return j;
}

std::string Dump(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

Fields::Fields(const json& obj, std::string prefix) : obj_(obj), prefix_(std::move(prefix)) {
  if (!obj_.is_object()) {
    std::string name = prefix_.empty() ? "the body" : prefix_.substr(0, prefix_.size() - 1);
    status_ =
        InvalidArgument(fmt::format("{} must be a JSON object, not {}", name, TypeName(obj_)));
  }
}

void Fields::Fail(std::string_view key, std::string_view what) {
  if (status_.ok()) status_ = InvalidArgument(fmt::format("{}{}: {}", prefix_, key, what));
}

void Fields::RefuseOthers() {
  if (!status_.ok() || !obj_.is_object()) return;
  for (auto it = obj_.begin(); it != obj_.end(); ++it) {
    if (std::find(asked_.begin(), asked_.end(), it.key()) != asked_.end()) continue;
    // A peer's key, shown in a message: cut short.
    constexpr size_t kKeyShownMax = 64;
    Fail(it.key().substr(0, kKeyShownMax),
         asked_.empty()
             ? std::string("is not a field of this call (it takes none)")
             : fmt::format("is not a field of this call (it takes {})", fmt::join(asked_, ", ")));
    return;
  }
}

bool Fields::Has(std::string_view key) const {
  if (!obj_.is_object()) return false;
  auto it = obj_.find(key);
  return it != obj_.end() && !it->is_null();
}

const json* Fields::Find(std::string_view key, bool required) {
  if (std::find(asked_.begin(), asked_.end(), key) == asked_.end()) asked_.emplace_back(key);
  if (!status_.ok()) return nullptr;
  auto it = obj_.find(key);
  if (it == obj_.end() || it->is_null()) {
    if (required) Fail(key, "is missing");
    return nullptr;
  }
  return &*it;
}

std::string Fields::String(std::string_view key) {
  const json* v = Find(key, true);
  if (v == nullptr) return {};
  if (!v->is_string()) {
    Fail(key, fmt::format("must be a string, not {}", TypeName(*v)));
    return {};
  }
  return v->get_ref<const std::string&>();
}

std::string Fields::String(std::string_view key, std::string def) {
  if (Find(key, false) == nullptr) return def;
  std::string s = String(key);
  return ok() ? s : def;
}

uint64_t Fields::U64(std::string_view key) {
  const json* v = Find(key, true);
  if (v == nullptr) return 0;
  if (!v->is_number_unsigned() && !(v->is_number_integer() && v->get<int64_t>() >= 0)) {
    Fail(key, fmt::format("must be a whole number ≥ 0, not {}", TypeName(*v)));
    return 0;
  }
  return v->get<uint64_t>();
}

uint64_t Fields::U64(std::string_view key, uint64_t def, U64Range range) {
  if (Find(key, false) == nullptr) return def;
  uint64_t x = U64(key);
  if (!ok()) return def;
  if (x < range.min || x > range.max) {
    Fail(key, fmt::format("{} is out of range ({}..{})", x, range.min, range.max));
    return def;
  }
  return x;
}

int64_t Fields::I64(std::string_view key, int64_t def, I64Range range) {
  const json* v = Find(key, false);
  if (v == nullptr) return def;
  int64_t x;
  if (v->is_number_unsigned() &&
      v->get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    x = static_cast<int64_t>(v->get<uint64_t>());
  } else if (v->is_number_integer() && !v->is_number_unsigned()) {
    x = v->get<int64_t>();
  } else {
    Fail(key, fmt::format("must be a whole number, not {}",
                          v->is_number_unsigned() ? std::string_view("that large") : TypeName(*v)));
    return def;
  }
  if (x < range.min || x > range.max) {
    Fail(key, fmt::format("{} is out of range ({}..{})", x, range.min, range.max));
    return def;
  }
  return x;
}

bool Fields::Bool(std::string_view key, bool def) {
  const json* v = Find(key, false);
  if (v == nullptr) return def;
  if (!v->is_boolean()) {
    Fail(key, fmt::format("must be true or false, not {}", TypeName(*v)));
    return def;
  }
  return v->get<bool>();
}

const json* Fields::Object(std::string_view key, bool optional) {
  const json* v = Find(key, !optional);
  if (v == nullptr) return nullptr;
  if (!v->is_object()) {
    Fail(key, fmt::format("must be an object, not {}", TypeName(*v)));
    return nullptr;
  }
  return v;
}

const json* Fields::Array(std::string_view key, bool optional) {
  const json* v = Find(key, !optional);
  if (v == nullptr) return nullptr;
  if (!v->is_array()) {
    Fail(key, fmt::format("must be an array, not {}", TypeName(*v)));
    return nullptr;
  }
  return v;
}

}  // namespace osr::json_in
